//! Stop-and-copy and the switchover: pause, the last dirty pages, device state, the
//! destination's Prepared, Commit, the report.
//!
//! Between pause and Commit any failure resumes the guest here (DESIGN §5); once Commit is
//! sent the source never resumes it on its own.

use std::time::Instant;

use tracing::warn;

use super::precopy::PreCopied;
use super::{ms, Progress, Session};
use crate::digest::ram_digest_paced;
use crate::dirty::Extent;
use crate::protocol::Message;
use crate::scheduler::{thread_cpu_ns, RoundStats, RoundWork};
use crate::session::{CodecReport, DowntimeDetail, MigrationError, MigrationReport, RoundReport};

/// Nice value of the report's pass over the frozen source RAM after the guest resumed on the
/// destination (the lowest: it delays nothing but the report).
const VERIFY_NICE: libc::c_int = 19;

/// The share of one core that pass takes ([`ram_digest_paced`]). Run flat out right after the
/// resume, at the lowest priority still, it took the nested VM's guest off the network: a
/// 256 MiB Linux guest, both hosts in one VM of two vCPUs, pinged every 10 ms, answered once
/// 61-89 ms after its resume, then not for 114-305 ms, in three runs of three, each silence
/// inside the pass's 280-300 ms.
const VERIFY_DUTY: f64 = 0.25;

/// What the destination reported before Commit.
struct Prepared {
    digest: u64,
    cpu_ns: u64,
    final_round: RoundStats,
    /// The downtime's steps so far (save, harvest, final pages, prepare).
    detail: DowntimeDetail,
}

impl Session<'_> {
    /// Pauses the guest, finishes the migration and returns the report.
    pub(super) fn switchover(
        &mut self,
        pre: PreCopied,
        cpu_start: u64,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationReport, MigrationError> {
        self.storage.flush_ahead();
        // The last pre-copy round is the one before the final round.
        let t_drain = Instant::now();
        match self.plane.drain(&mut self.ctl, pre.round.saturating_sub(1)) {
            Ok(landed_round) => {
                self.tally.drain = crate::session::DrainReport {
                    ms: ms(t_drain.elapsed()),
                    landed_round,
                }
            }
            Err(e) => {
                let _ = self.vm.stop_dirty_tracking();
                self.storage.stop();
                let _ = self.vm.set_throttle(0);
                self.abort("source failed before pausing the guest");
                return Err(e);
            }
        }
        let t_pause = Instant::now();
        tracing::info!(round = pre.round, "pausing the guest");
        let paused = self.vm.pause();
        let pause_ms = ms(t_pause.elapsed());
        if let Err(e) = paused {
            // A partial pause is undone: resume whatever stopped.
            let _ = self.vm.resume();
            let _ = self.vm.stop_dirty_tracking();
            self.storage.stop();
            self.abort("source could not pause the guest");
            return Err(e.into());
        }
        let mut prepared = match self.stop_and_copy(&pre, on_progress) {
            Ok(p) => p,
            Err(e) => return Err(self.roll_back(e)),
        };
        prepared.detail.pause_ms = pause_ms;
        self.tally.rounds.push(RoundReport {
            round: pre.round,
            pages: prepared.final_round.pages,
            wire_bytes: prepared.final_round.wire_bytes,
            ms: ms(prepared.final_round.elapsed),
            dirtied_pages: 0,
            dirty_rate: 0.0,
            bandwidth: pre.conv.bandwidth(),
            predicted_downtime_ms: 0.0,
            stop_and_copy: true,
            disk_pages: prepared.final_round.disk_pages,
            throttle_pct: 0,
            redirtied_left: 0,
            eta: None,
        });
        if let Some(last) = self.tally.rounds.last() {
            on_progress(&Progress::Round(last.clone()));
        }
        let t_commit = Instant::now();
        if let Err(e) = self.commit(on_progress) {
            return Err(match e {
                // Authenticated word that the destination discarded its copy: the guest can
                // only run here.
                e @ MigrationError::Refused { .. } if self.ctl.keys().is_some() => {
                    self.roll_back(e)
                }
                e => e,
            });
        }
        let downtime = t_pause.elapsed();
        prepared.detail.resume_ms = ms(t_commit.elapsed());
        let d = &mut prepared.detail;
        d.other_ms = (ms(downtime)
            - d.pause_ms
            - d.save_state_ms
            - d.harvest_ms
            - d.final_pages_ms
            - d.storage_ms
            - d.prepare_ms
            - d.resume_ms)
            .max(0.0);
        let total = self.t0.elapsed();
        let source_cpu_ns =
            self.tally.cpu_ns + crate::scheduler::thread_cpu_ns().saturating_sub(cpu_start);
        let _ = self.vm.stop_dirty_tracking();
        Ok(self.report(prepared, total, downtime, source_cpu_ns))
    }

    /// The guest is paused: last round, device state, wait for Prepared.
    fn stop_and_copy(
        &mut self,
        pre: &PreCopied,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<Prepared, MigrationError> {
        // Device state first, then the last harvest: KVM may write guest RAM while it serves
        // the state ioctls (a vCPU preempted inside one gets its steal-time record's
        // "preempted" flag set on the way out), and those pages must be in the final round —
        // otherwise the source's RAM no longer matches what the destination received.
        let mut detail = DowntimeDetail::default();
        let t = Instant::now();
        let sections = self.vm.save_state()?;
        detail.save_state_ms = ms(t.elapsed());
        let t = Instant::now();
        let mut to_send = pre.to_send.clone();
        self.vm.harvest_dirty(&mut to_send)?;
        // The devices are quiesced: the disks' last writes are in, the rest goes now.
        self.storage.harvest();
        detail.harvest_ms = ms(t.elapsed());
        let mut disk = pre.disk.clone();
        disk.extend(self.storage.take_pending());
        self.storage.count_final(&disk);
        let pages = to_send.count() + Extent::total(&disk);
        on_progress(&Progress::Paused { pages });
        let ram = to_send.extents();
        let work = RoundWork {
            ram: &ram,
            holes: &[],
            disk: &disk,
        };
        let t = Instant::now();
        let stats = self.send_round(pre.round, &work, pages, None, &mut |_| {})?;
        detail.final_pages_ms = ms(t.elapsed());
        let t = Instant::now();
        if self.storage.copying() {
            self.ctl.send(&Message::DiskDigests {
                digests: self.storage.digests(),
            })?;
        }
        // Shared storage: flushed, the locks go to the destination (it takes them before
        // Prepared; a rollback takes them back).
        self.storage
            .release_locks()
            .map_err(MigrationError::Storage)?;
        detail.storage_ms = ms(t.elapsed());
        let t = Instant::now();
        self.ctl.send(&Message::DeviceState {
            final_round: pre.round,
            sections,
        })?;
        // Every page's last hash is in (the final round's markers wait for their hashing):
        // the digest of what was sent is computed while the destination prepares.
        let (sched, ctl, timeout) = (&self.sched, &mut self.ctl, self.opts.timeout);
        let (answer, sent) = std::thread::scope(|s| {
            let sent = s.spawn(|| sched.sent_digest());
            let answer = ctl.recv(Some(timeout), "waiting for the destination to prepare");
            (answer, sent.join())
        });
        let sent = sent.unwrap_or_else(|p| std::panic::resume_unwind(p));
        match answer? {
            Message::Prepared { digest, cpu_ns } => {
                detail.prepare_ms = ms(t.elapsed());
                // Every page the destination holds must be the one sent last: a lost or
                // altered batch is caught here, while the guest can still resume here.
                if digest != sent {
                    return Err(MigrationError::DigestMismatch {
                        sent: format!("{sent:016x}"),
                        got: format!("{digest:016x}"),
                    });
                }
                // The last look before Commit: a destination that refused or went away since
                // Prepared must not be committed to.
                self.ctl
                    .check_quiet("checking the destination before Commit")?;
                Ok(Prepared {
                    digest,
                    cpu_ns,
                    final_round: stats,
                    detail,
                })
            }
            m => Err(self.ctl.unexpected(&m, "waiting for Prepared")),
        }
    }

    /// A failure between pause and Commit: the destination discards, the guest resumes here.
    fn roll_back(&mut self, e: MigrationError) -> MigrationError {
        let cause = e.to_string();
        self.abort(&format!(
            "the source resumes the guest after a failure in stop-and-copy: {cause}"
        ));
        let _ = self.vm.stop_dirty_tracking();
        self.storage.stop();
        if let Err(le) = self.storage.retake_locks() {
            return MigrationError::Storage(format!(
                "the migration failed after the pause ({cause}) and the disks' locks could                  not be taken back: {le}"
            ));
        }
        match self.vm.resume() {
            Ok(()) if matches!(e, MigrationError::Cancelled) => MigrationError::Cancelled,
            Ok(()) => MigrationError::RolledBack { cause },
            Err(re) => MigrationError::RolledBack {
                cause: format!("{cause}; resuming on the source also failed: {re}"),
            },
        }
    }

    /// Commit: from here on the source never resumes the guest.
    fn commit(&mut self, on_progress: &mut dyn FnMut(&Progress)) -> Result<(), MigrationError> {
        if let Err(e) = self.ctl.send(&Message::Commit) {
            return Err(MigrationError::OutcomeUnknown {
                cause: format!("sending it failed ({e})"),
                id: self.id.clone(),
            });
        }
        on_progress(&Progress::Committed);
        match self.ctl.recv(
            Some(self.opts.timeout),
            "waiting for the destination to resume",
        ) {
            Ok(Message::Resumed) => Ok(()),
            Err(e @ MigrationError::Refused { .. }) if self.ctl.keys().is_some() => Err(e),
            Ok(m) => Err(MigrationError::OutcomeUnknown {
                cause: format!("the destination answered {}", m.name()),
                id: self.id.clone(),
            }),
            Err(e) => Err(MigrationError::OutcomeUnknown {
                cause: format!("no confirmation came ({e})"),
                id: self.id.clone(),
            }),
        }
    }

    /// Verification (outside the downtime: the source RAM is frozen for good) and the report.
    fn report(
        &mut self,
        prepared: Prepared,
        total: std::time::Duration,
        downtime: std::time::Duration,
        source_cpu_ns: u64,
    ) -> MigrationReport {
        // The destination reports the guest's first progress there (after a few of its
        // ticks) before this report's full pass over RAM starts: where the two hosts share
        // cores (a benchmark, a test, a nested VM) the guest's first moments come first, and
        // the pass then takes a quarter of a core at the lowest priority.
        let progress = match self.ctl.recv(
            Some(self.opts.timeout),
            "waiting for guest progress on the destination",
        ) {
            Ok(Message::Progress { delta }) => Some(delta),
            Ok(m) => {
                warn!("destination sent {} instead of Progress", m.name());
                None
            }
            Err(e) => {
                warn!("no progress report from the destination: {e}");
                None
            }
        };
        let tv = Instant::now();
        let ram = self.vm.ram();
        // The digest and the CPU time it took.
        let timed = || {
            let cpu = thread_cpu_ns();
            let d = ram_digest_paced(ram, VERIFY_DUTY);
            (d, thread_cpu_ns().saturating_sub(cpu))
        };
        let (source_digest, verify_cpu_ns) = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("livemig-verify".into())
                .spawn_scoped(s, || {
                    livemig_transport::codec::lower_thread_priority_to(VERIFY_NICE);
                    timed()
                })
                .map_or_else(|_| timed(), |h| h.join().unwrap_or_else(|_| timed()))
        });
        let verify = tv.elapsed();
        let storage = self.storage_report(progress.is_some());
        let progress = progress.unwrap_or(0);
        let digest_match = source_digest == prepared.digest;
        let ram_bytes = self.vm.ram().layout().total_bytes();
        let t = &self.tally;
        MigrationReport {
            status: if digest_match {
                "completed"
            } else {
                "digest-mismatch"
            }
            .into(),
            total_time_ms: ms(total),
            downtime_ms: ms(downtime),
            setup_ms: ms(self.setup),
            rounds: t.rounds.len() as u64,
            pages_sent: t.pages_sent,
            bytes_on_wire: t.wire,
            ram_bytes,
            effective_gbps: ram_bytes as f64 / total.as_secs_f64() / 1e9,
            digest_match,
            source_digest: format!("{source_digest:016x}"),
            destination_digest: format!("{:016x}", prepared.digest),
            verify_ms: ms(verify),
            verify_cpu_s: verify_cpu_ns as f64 / 1e9,
            guest_progress_after_resume: progress,
            transport: self.plane.name().into(),
            transport_detail: self.detail.clone(),
            encryption: match (self.ctl.keys().is_some(), self.plane.encodes()) {
                (true, true) => "aes-256-gcm",
                (true, false) => "control only (RDMA pages travel in clear)",
                (false, _) => "off",
            }
            .into(),
            channels: self.sched.channels() as u16,
            bytes_copied_staging: t.codec.bytes_staged,
            // Pages move as they are in RAM over RDMA: no codec runs.
            compress: if self.plane.encodes() {
                self.opts.compress.to_string()
            } else {
                "none".into()
            },
            codec: CodecReport::from(&t.codec),
            source_cpu_s: source_cpu_ns as f64 / 1e9,
            destination_cpu_s: prepared.cpu_ns as f64 / 1e9,
            round_details: t.rounds.clone(),
            storage,
            rails: self.plane.rails(&self.sched),
            downtime_detail: Some(prepared.detail.clone()),
            drain: t.drain.clone(),
        }
    }

    /// The disks' figures; with `--remove-source-storage`, the source images go once the
    /// destination reported back (it syncs its copies before it does: `synced`).
    fn storage_report(&mut self, synced: bool) -> Option<crate::storage::StorageReport> {
        if self.vm.disks().is_empty() {
            return None;
        }
        // The destination verified every copy against these digests before Prepared.
        let digests = self.storage.digests();
        let mut r = self.storage.report(&digests);
        if self.opts.remove_source_storage && self.storage.copying() {
            if synced {
                let errors = self.storage.remove_sources();
                r.source_removed = errors.is_empty();
                for e in errors {
                    warn!("could not remove the source image {e}");
                }
            } else {
                warn!(
                    "the destination did not confirm its copies are on disk: the source images                      are kept"
                );
            }
        }
        Some(r)
    }
}
