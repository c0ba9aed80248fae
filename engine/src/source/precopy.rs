//! Pre-copy: rounds of pages while the guest runs, until the predicted downtime fits the
//! limit or the rounds run out. Dirty tracking starts before round 0 reads a single page, so
//! every later write is caught by a harvest. Any failure or cancel here leaves the guest
//! running, unchanged.

use std::sync::atomic::Ordering;

use tracing::info;

use super::{ms, Progress, Session};
use crate::convergence::{Convergence, Decision, Policy};
use crate::dirty::{DirtyBitmap, Extent};
use crate::scheduler::{RoundStats, RoundWork, SchedulerError};
use crate::session::{MigrationError, RoundReport};

/// Where pre-copy left off: the pages still dirty, the next round's number, the estimates.
pub(super) struct PreCopied {
    pub(super) to_send: DirtyBitmap,
    /// Disk blocks still to send.
    pub(super) disk: Vec<Extent>,
    pub(super) round: u64,
    pub(super) conv: Convergence,
}

impl Session<'_> {
    /// Runs pre-copy rounds; on failure stops tracking and tells the destination.
    pub(super) fn precopy(
        &mut self,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<PreCopied, MigrationError> {
        if let Err(e) = self.vm.start_dirty_tracking() {
            self.abort("source could not start dirty tracking");
            return Err(e.into());
        }
        self.storage.start();
        let sched = &self.sched;
        self.storage.mirror_from_start(&|i| sched.mirror_hook(i));
        let result = self.rounds(on_progress).and_then(|pre| {
            if self.cancel.load(Ordering::Relaxed) {
                Err(MigrationError::Cancelled)
            } else {
                Ok(pre)
            }
        });
        if let Err(e) = &result {
            let _ = self.vm.stop_dirty_tracking();
            self.storage.stop();
            let _ = self.vm.set_throttle(0);
            self.abort(match e {
                MigrationError::Cancelled => "cancelled on the source",
                MigrationError::WillNotConverge(_) => {
                    "the source stopped pre-copy: it would not converge within its downtime cap"
                }
                _ => "source failed during pre-copy",
            });
        }
        result
    }

    fn rounds(
        &mut self,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<PreCopied, MigrationError> {
        let layout = self.vm.ram().layout().clone();
        // Round 0 sends all RAM, so what the logs hold from before it is dropped.
        let mut before = DirtyBitmap::new(&layout);
        self.vm.harvest_dirty(&mut before)?;
        let mut to_send = DirtyBitmap::all(&layout);
        let mut conv = Convergence::new(Policy {
            limit_ms: self.opts.downtime_limit_ms,
            max_downtime_ms: self.opts.max_downtime(),
            auto_converge: self.opts.auto_converge,
            max_rounds: self.opts.max_rounds,
            stall_rounds: self.opts.stall_rounds,
            ram_pages: layout.total_pages(),
            switchover_ms: 0.0,
        });
        let mut round = 0u64;
        // Round 0 copies what the disks hold; later rounds what the guest wrote since.
        let mut disk = self.storage.first_round();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(MigrationError::Cancelled);
            }
            // Round 0 covers all RAM: pages in holes of the backing memory were never written
            // and go as zero markers without being read.
            let (extents, holes) = if round == 0 {
                self.vm.ram().split_holes(&to_send.extents())
            } else {
                (to_send.extents(), Vec::new())
            };
            let pages_total = to_send.count() + Extent::total(&disk);
            let work = RoundWork {
                ram: &extents,
                holes: &holes,
                disk: &disk,
            };
            // Pages dirtied while the round runs: the next round's; the round reads them from
            // the dirty log between its slices and leaves them to that round.
            let mut next = DirtyBitmap::new(&layout);
            let stats = self.send_round(
                round,
                &work,
                pages_total,
                Some((&conv, &mut next)),
                on_progress,
            )?;
            to_send = next;
            let harvest = std::time::Instant::now();
            self.vm.harvest_dirty(&mut to_send)?;
            // The switchover harvests once more: its cost is part of the downtime.
            conv.set_switchover_ms(harvest.elapsed().as_secs_f64() * 1000.0);
            let disk_dirty = self.storage.harvest();
            let dirtied = to_send.count() + disk_dirty;
            let sched = &self.sched;
            self.storage
                .after_round(stats.disk_pages, disk_dirty, &|i| sched.mirror_hook(i));
            disk = self.storage.take_pending();
            let est = conv.estimate(stats.wire_bytes, stats.elapsed, dirtied);
            let throttle = conv.throttle();
            // The round's share of the dirty set is what it was given, including the pages
            // it left to this next round.
            let decision = conv.decide(round, stats.pages + stats.redirtied_left, dirtied, &est);
            let eta = conv.eta(round + 1, (0, dirtied), std::time::Duration::ZERO);
            let report = RoundReport {
                round,
                pages: stats.pages,
                wire_bytes: stats.wire_bytes,
                ms: ms(stats.elapsed),
                dirtied_pages: dirtied,
                dirty_rate: est.dirty_rate,
                bandwidth: est.bandwidth,
                predicted_downtime_ms: est.predicted_downtime_ms,
                stop_and_copy: false,
                disk_pages: stats.disk_pages,
                throttle_pct: throttle,
                redirtied_left: stats.redirtied_left,
                eta,
            };
            info!(
                round,
                pages = stats.pages,
                dirtied,
                predicted_ms = est.predicted_downtime_ms,
                "pre-copy round done"
            );
            on_progress(&Progress::Round(report.clone()));
            self.tally.rounds.push(report);
            round += 1;
            match decision {
                Decision::Continue { throttle: level } => {
                    if level != throttle {
                        info!(
                            round,
                            throttle = level,
                            "auto-converge: throttling the guest"
                        );
                        self.vm.set_throttle(level)?;
                    }
                }
                Decision::StopAndCopy { reason } => {
                    info!(round, ?reason, "stop-and-copy");
                    return Ok(PreCopied {
                        to_send,
                        disk,
                        round,
                        conv,
                    });
                }
                Decision::GiveUp(why) => return Err(MigrationError::WillNotConverge(why)),
            }
        }
    }

    /// Sends one round (pre-copy or final) through the scheduler and ends it on the data
    /// plane; counts it in the tally. A plane that lists landed pages (RDMA) gets the round's
    /// RAM in slices, each through the barrier and listed before the next.
    ///
    /// A pre-copy round comes with the estimates and the next round's bitmap: before each
    /// slice after the first, the dirty log is read into that bitmap, and the slice's pages
    /// the guest wrote again since the round began are left to the next round, which sends
    /// them anyway (Xen's save loop skipped such pages the same way) — on a link as slow as
    /// the guest is busy, that is a real share of each round.
    pub(super) fn send_round(
        &mut self,
        round: u64,
        work: &RoundWork<'_>,
        pages_total: u64,
        mut precopy: Option<(&Convergence, &mut DirtyBitmap)>,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<RoundStats, MigrationError> {
        let start = std::time::Instant::now();
        let Session {
            vm,
            sched,
            plane,
            ctl,
            cancel,
            ..
        } = self;
        let conv = precopy.as_ref().map(|(c, _)| *c);
        let cut;
        let pieces: Vec<&[Extent]> = match plane.landing_slice(ctl) {
            Some(n) => {
                cut = slices(work.ram, n);
                cut.iter().map(Vec::as_slice).collect()
            }
            None => vec![work.ram],
        };
        let mut stats = RoundStats::default();
        for (i, &ram) in pieces.iter().enumerate() {
            let kept;
            let ram = match precopy.as_mut() {
                Some((_, next)) if i > 0 => {
                    vm.harvest_dirty(next)?;
                    kept = next.outside(ram);
                    stats.redirtied_left += Extent::total(ram) - Extent::total(&kept);
                    kept.as_slice()
                }
                _ => ram,
            };
            let left_out = stats.redirtied_left;
            // Holes and disk blocks go with the first slice.
            let part = RoundWork {
                ram,
                holes: if i == 0 { work.holes } else { &[] },
                disk: if i == 0 { work.disk } else { &[] },
            };
            let before = stats.pages;
            let sent = sched.send_round(round, &part, cancel, &mut |pages_done| {
                let pages_done = before + pages_done;
                plane.round_progress(ctl, round, pages_done);
                let left = pages_total.saturating_sub(pages_done + left_out);
                let eta = conv.and_then(|c| c.eta(round, (pages_done, left), start.elapsed()));
                on_progress(&Progress::Sending {
                    round,
                    pages_done,
                    pages_total,
                    eta,
                })
            });
            let s = sent.map_err(|e| match e {
                SchedulerError::Cancelled => MigrationError::Cancelled,
                e => e.into(),
            })?;
            plane.landed(ctl, round, ram)?;
            stats.pages += s.pages;
            stats.disk_pages += s.disk_pages;
            stats.wire_bytes += s.wire_bytes;
            stats.codec.add(&s.codec);
            stats.cpu_ns += s.cpu_ns;
        }
        stats.elapsed = start.elapsed();
        self.plane
            .round_complete(&mut self.ctl, round, stats.pages)?;
        self.tally.add(&stats);
        self.storage.count(work.disk);
        Ok(stats)
    }
}

/// `ram` cut into pieces of `pages` pages (the last may be shorter; an extent may be cut);
/// always at least one piece, maybe empty.
fn slices(ram: &[Extent], pages: u64) -> Vec<Vec<Extent>> {
    let pages = pages.max(1);
    let mut out = vec![Vec::new()];
    let mut room = pages;
    for e in ram {
        let mut e = *e;
        while e.pages > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = pages;
            }
            let take = e.pages.min(room);
            out.last_mut().expect("one piece at least").push(Extent {
                gpa: e.gpa,
                pages: take,
            });
            e.gpa += take * crate::memory::PAGE_SIZE;
            e.pages -= take;
            room -= take;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(gpa_page: u64, pages: u64) -> Extent {
        Extent {
            gpa: gpa_page * crate::memory::PAGE_SIZE,
            pages,
        }
    }

    #[test]
    fn a_round_is_sliced_by_pages_and_keeps_every_page_once() {
        assert_eq!(slices(&[], 4), vec![Vec::new()]);
        let ram = [ext(0, 3), ext(10, 7), ext(30, 1)];
        let s = slices(&ram, 4);
        assert_eq!(
            s,
            vec![
                vec![ext(0, 3), ext(10, 1)],
                vec![ext(11, 4)],
                vec![ext(15, 2), ext(30, 1)],
            ]
        );
        // Every page once, in order.
        let flat: Vec<u64> = s
            .iter()
            .flatten()
            .flat_map(|e| (0..e.pages).map(move |p| e.gpa / crate::memory::PAGE_SIZE + p))
            .collect();
        let want: Vec<u64> = (0..3).chain(10..17).chain(30..31).collect();
        assert_eq!(flat, want);
        assert_eq!(slices(&ram, 100).len(), 1);
    }
}
