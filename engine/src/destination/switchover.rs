//! The destination's switchover: wait for the device state (following RDMA rounds meanwhile),
//! close RAM, restore, answer Prepared with the RAM digest, resume only on Commit.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::channels::IncomingPlane;
use super::Session;
use crate::protocol::{Message, ProtocolError};
use crate::session::{MigrationError, Outcome};
use crate::source::ms;
use crate::vm::{DeviceSection, MigratableVm};

/// Longest wait for a round's pages to land before answering `AwaitLanded`.
const LANDED_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Session {
    /// From pre-copy to the guest running here.
    pub(super) fn switchover(
        &mut self,
        vm: &Arc<dyn MigratableVm>,
        plane: &mut dyn IncomingPlane,
    ) -> Result<(), MigrationError> {
        let r = self.prepare(&**vm, plane);
        match (r, plane.failure()) {
            // A data channel's failure explains a control connection cut because of it.
            (Err(MigrationError::Transport(_)), Some(e)) => Err(MigrationError::DataChannel(e)),
            // Tell the source why (best effort: the connection may be what failed), unless
            // it is the source that refused or aborted.
            (Err(e @ (MigrationError::Refused { .. } | MigrationError::Aborted(_))), _) => Err(e),
            (Err(e), _) => {
                let _ = self.ctl.send(&Message::Refuse {
                    reason: format!("the destination failed before Prepared: {e}"),
                });
                Err(e)
            }
            (Ok(()), _) => self.commit(vm),
        }
    }

    /// Device state, every page of the final round, restore, Prepared.
    fn prepare(
        &mut self,
        vm: &dyn MigratableVm,
        plane: &mut dyn IncomingPlane,
    ) -> Result<(), MigrationError> {
        let (final_round, sections, disk_digests) = self.wait_device_state(plane)?;
        let t = Instant::now();
        plane.finish(final_round, self.timeout)?;
        self.steps.land_ms = ms(t.elapsed());
        // Every block landed: the copies are verified and named, or shared images locked;
        // if that fails the source resumes.
        let t = Instant::now();
        if let Err(e) = self.storage.complete(&disk_digests) {
            return Err(self.refuse(format!("storage: {e}")));
        }
        self.steps.storage_ms = ms(t.elapsed());
        // The digest covers what arrived, not what the restore writes: KVM itself writes
        // guest RAM when some state is restored (the kvmclock wall-clock MSR makes it write
        // the wall-clock structure), which the source's RAM at pause does not show. From the
        // hashes taken as pages landed it reads no RAM, so it runs beside the restore (two
        // steps of the downtime at once); a full pass over RAM goes first.
        let restore = |sections: &[DeviceSection]| {
            let t = Instant::now();
            (vm.restore_state(sections), ms(t.elapsed()))
        };
        let ((digest, cpu_ns), digest_ms, (restored, restore_ms)) = if plane.digest_reads_ram() {
            let t = Instant::now();
            let d = plane.digest(vm.ram());
            let digest_ms = ms(t.elapsed());
            (d, digest_ms, restore(&sections))
        } else {
            std::thread::scope(|s| {
                let r = s.spawn(|| restore(&sections));
                let t = Instant::now();
                let d = plane.digest(vm.ram());
                let digest_ms = ms(t.elapsed());
                let r = r.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                (d, digest_ms, r)
            })
        };
        self.steps.digest_ms = digest_ms;
        self.steps.restore_ms = restore_ms;
        restored?;
        info!(
            final_round,
            digest = format!("{digest:016x}"),
            bytes = vm.ram().layout().total_bytes(),
            "prepared"
        );
        self.ctl.send(&Message::Prepared { digest, cpu_ns })
    }

    /// Pre-copy may last long: waits for device state as long as pages keep arriving; a
    /// source that sends nothing for the timeout is given up on (it cannot hold the
    /// destination forever).
    fn wait_device_state(
        &mut self,
        plane: &mut dyn IncomingPlane,
    ) -> Result<(u64, Vec<DeviceSection>, Vec<u64>), MigrationError> {
        let mut seen = plane.pages();
        let mut disk_digests = None;
        loop {
            match self
                .ctl
                .recv(Some(self.timeout), "waiting for device state")
            {
                Ok(Message::DeviceState {
                    final_round,
                    sections,
                }) => return Ok((final_round, sections, disk_digests.unwrap_or_default())),
                Ok(Message::DiskDigests { digests }) if disk_digests.is_none() => {
                    disk_digests = Some(digests);
                }
                Ok(Message::AwaitLanded { round }) => {
                    let complete = plane.wait_landed(round, LANDED_LIMIT)?;
                    self.ctl.send(&Message::Landed { round, complete })?;
                }
                Ok(Message::RoundProgress {
                    round,
                    pages,
                    complete,
                }) => {
                    if let Err(reason) = plane.round_progress(round, pages, complete) {
                        return Err(MigrationError::Protocol {
                            peer: self.ctl.peer().to_string(),
                            source: ProtocolError::Invalid {
                                msg: "RoundProgress",
                                reason,
                            },
                        });
                    }
                }
                Ok(Message::RoundExtents { round, extents }) => {
                    if let Err(reason) = plane.round_extents(round, &extents) {
                        return Err(MigrationError::Protocol {
                            peer: self.ctl.peer().to_string(),
                            source: ProtocolError::Invalid {
                                msg: "RoundExtents",
                                reason,
                            },
                        });
                    }
                }
                Ok(m) => return Err(self.ctl.unexpected(&m, "waiting for DeviceState")),
                Err(MigrationError::Timeout { .. }) => {
                    let now = plane.pages();
                    if now == seen {
                        return Err(MigrationError::Timeout {
                            secs: self.timeout.as_secs(),
                            during: "pre-copy: the source sent neither pages nor device state",
                        });
                    }
                    seen = now;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Resumes the guest on the source's Commit.
    fn commit(&mut self, vm: &Arc<dyn MigratableVm>) -> Result<(), MigrationError> {
        let e = match self.ctl.recv(Some(self.timeout), "waiting for Commit") {
            Ok(Message::Commit) => None,
            Ok(m) => Some(self.ctl.unexpected(&m, "waiting for Commit")),
            Err(e) => Some(e),
        };
        if let Some(e) = e {
            // This copy will never run: recorded, and said, so that a source that sent Commit
            // (and got this instead of Resumed) knows it may resume (in a sealed session,
            // where nobody else can have written this).
            if let Err(re) = self.record(Outcome::Discarded) {
                warn!("could not record the discard: {re}");
            }
            let _ = self.ctl.send(&Message::Refuse {
                reason: format!("the destination discarded its copy of the VM: {e}"),
            });
            return Err(e);
        }
        // Resuming is recorded durably first: a record that cannot be written means no
        // resume (the source, told so, resumes instead).
        let t = Instant::now();
        let recorded = self.record(Outcome::Resumed);
        self.steps.record_ms = ms(t.elapsed());
        if let Err(re) = recorded {
            let reason = format!(
                "the destination discarded its copy of the VM: it could not record its decision \
                 to resume ({re})"
            );
            let _ = self.record(Outcome::Discarded);
            let _ = self.ctl.send(&Message::Refuse {
                reason: reason.clone(),
            });
            return Err(MigrationError::Refused {
                peer: self.ctl.peer().to_string(),
                reason: format!("refused the source: {reason}"),
            });
        }
        // The source will never resume: the copies are the VM's disks now.
        self.storage.commit();
        // The network follows the VM before it runs (QEMU's order too): the switches learn
        // its MACs behind this host's ports while the vCPUs start, and what they forward here
        // meanwhile waits in the taps and the restored receive queues. Sent after the
        // vCPUs started, the first frame left 7-15 ms after the resume in the nested VM, where
        // the resumed guest and this thread share two vCPUs with the rest. The later rounds'
        // thread starts once the guest runs (outside the downtime).
        let s = self.opts.announce;
        let announced = crate::announce::first_round(&**vm, s).unwrap_or_else(|e| {
            warn!("announcing the VM's NICs: {e}");
            0
        });
        let t = Instant::now();
        vm.resume()?;
        self.steps.resume_ms = ms(t.elapsed());
        info!("resumed");
        if let Err(e) = self.ctl.send(&Message::Resumed) {
            // The guest runs here now; the source will report "outcome unknown".
            warn!("could not confirm resume to the source: {e}");
        }
        if announced > 0 {
            crate::announce::repeat(vm.clone(), s);
        }
        Ok(())
    }
}
