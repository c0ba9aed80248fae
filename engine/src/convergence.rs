//! Dirty-rate and bandwidth estimates, predicted downtime, auto-converge and the stop
//! decision.
//!
//! After every pre-copy round [`Convergence::decide`] decides: go on (possibly slowing
//! the guest down), stop and copy (the rest fits the downtime limit, or at least the hard cap
//! once rounds stop helping), or give up with the figures that say why — never a stop-and-copy
//! whose predicted downtime exceeds the cap.
//!
//! Where QEMU stops as soon as the rest fits the limit, livemig looks one round ahead: when
//! another round is predicted to at least halve the downtime's page copy (the guest re-dirties
//! little of what that round sends), it takes it — at most [`EXTRA_ROUNDS_MAX`] times, and
//! only while the copy it would save is worth it: [`EXTRA_ROUND_FLOOR_MS`], or a tenth of the
//! limit when that is less (an operator who asks for 20 ms counts single milliseconds) — so a
//! quiet guest stops far below the limit instead of spending it.
//!
//! Auto-converge follows QEMU's cpu-throttle: a round that re-dirtied at least half of what it
//! sent starts the throttle at [`THROTTLE_INITIAL`] %, every later such round adds
//! [`THROTTLE_STEP`] %, up to [`THROTTLE_MAX`] %.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::memory::PAGE_SIZE;

/// Rounds smaller than this do not update the bandwidth estimate: their timing is dominated
/// by fixed costs.
const MIN_SAMPLE_BYTES: u64 = 4 << 20;
/// Fixed cost of the switchover besides pages and the harvest (pausing and resuming the
/// vCPUs, device state, the Prepared and Commit round trips, the destination's synced
/// record), in ms ...
pub const SWITCHOVER_BASE_MS: f64 = 1.5;
/// ... plus this per GiB of guest RAM (both sides' digests of every page's last hash, the
/// vCPUs' pause and resume over more mapped memory). Measured on loopback and a shaped
/// 10 Gbit/s link, 256 MiB to 4 GiB, idle and dirtying guests (`bench --predict`, the
/// downtime's steps without the last pages): 1.7–4.5 ms.
pub const SWITCHOVER_PER_GIB_MS: f64 = 0.7;

/// The switchover's fixed cost for a guest of `ram_pages` pages, ms (the harvest of the dirty
/// log and the last pages come on top).
pub fn switchover_overhead_ms(ram_pages: u64) -> f64 {
    let gib = (ram_pages * PAGE_SIZE) as f64 / f64::from(1u32 << 30);
    SWITCHOVER_BASE_MS + SWITCHOVER_PER_GIB_MS * gib
}
/// First throttle level, percent of vCPU time taken away.
pub const THROTTLE_INITIAL: u8 = 20;
/// Throttle added per round that still re-dirties too much.
pub const THROTTLE_STEP: u8 = 10;
/// Highest throttle level.
pub const THROTTLE_MAX: u8 = 99;
/// A round that re-dirtied at least this share of the pages it sent calls for throttling.
const HIGH_DIRTY_SHARE: f64 = 0.5;
/// A round that re-dirtied at least this share of the pages it sent did not shrink the
/// dirty set.
const STALLED_SHARE: f64 = 0.9;
/// Rounds taken past the point where the rest fits the limit, at most.
pub const EXTRA_ROUNDS_MAX: u32 = 2;
/// Such a round must be predicted to leave at most this share of the downtime's page copy.
const EXTRA_ROUND_GAIN: f64 = 0.5;
/// ... and the page copy of the downtime must be at least this long (ms) to bother ...
pub const EXTRA_ROUND_FLOOR_MS: f64 = 20.0;
/// ... or this share of the downtime limit, when that is less.
const EXTRA_ROUND_FLOOR_SHARE: f64 = 0.1;

/// Estimates after a round.
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    /// Bytes per second the link moved.
    pub bandwidth: f64,
    /// Pages dirtied per second during the round.
    pub dirty_rate: f64,
    /// Downtime if the guest were paused now.
    pub predicted_downtime_ms: f64,
    /// Predicted downtime fits the limit.
    pub converged: bool,
}

/// What is left of a running migration, predicted from the link and the guest as measured so
/// far (the model [`Convergence::eta`] runs forward round by round).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Eta {
    /// Bytes still to send: the rest of this round, the predicted later rounds and the
    /// stop-and-copy.
    pub remaining_bytes: u64,
    /// Predicted time until the guest runs on the destination, ms.
    pub time_left_ms: f64,
    /// Predicted downtime of the stop-and-copy, ms.
    pub predicted_downtime_ms: f64,
    /// Whether the model reaches the downtime limit (else it ends in a stall: a stop within
    /// the cap, or giving up).
    pub converges: bool,
}

/// How pre-copy may end.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Stop-and-copy once the predicted downtime is at most this.
    pub limit_ms: u64,
    /// Never stop-and-copy with a predicted downtime above this.
    pub max_downtime_ms: u64,
    /// Throttle the guest when it dirties faster than the link drains.
    pub auto_converge: bool,
    /// Pre-copy rounds at most.
    pub max_rounds: u32,
    /// Consecutive rounds that do not shrink the dirty set (with no throttle left to add)
    /// that end pre-copy; 0: go on until `max_rounds`.
    pub stall_rounds: u32,
    /// Pages of guest RAM: the most the guest can dirty.
    pub ram_pages: u64,
    /// Measured cost of the switchover beside the last pages and [`switchover_overhead_ms`]
    /// (the dirty log's harvest), ms: part of every predicted downtime, so
    /// the limit and the cap are held to the downtime the switchover will take.
    pub switchover_ms: f64,
}

/// What to do after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Another round, with the guest throttled to this level (percent; 0 = not throttled).
    Continue {
        /// Throttle for the next round.
        throttle: u8,
    },
    /// Pause the guest and copy the rest.
    StopAndCopy {
        /// Why now.
        reason: StopReason,
    },
    /// Give up: the VM keeps running on the source. The text gives the figures.
    GiveUp(String),
}

/// Why pre-copy ended in a stop-and-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The predicted downtime fits the limit.
    Converged,
    /// Rounds stopped shrinking (or ran out); the predicted downtime fits the hard cap.
    WithinCap,
}

/// Tracks the link and the guest across rounds.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: Policy,
    bandwidth: f64,
    throttle: u8,
    stalled: u32,
    /// Largest dirty set seen after a round, pages.
    peak_dirty: u64,
    /// Highest write rate seen, pages per second.
    peak_rate: f64,
    /// Write rate of the last round, pages per second (throttled as it was then): the rate
    /// of page writes, repeats included, that leaves the dirty set it left.
    rate: f64,
    /// Throttle in force when `rate` was measured.
    rate_throttle: u8,
    /// Rounds taken after the rest already fit the limit.
    extra: u32,
}

impl Convergence {
    /// A tracker following `policy`.
    pub fn new(policy: Policy) -> Self {
        Convergence {
            policy,
            bandwidth: 0.0,
            throttle: 0,
            stalled: 0,
            peak_dirty: 0,
            peak_rate: 0.0,
            rate: 0.0,
            rate_throttle: 0,
            extra: 0,
        }
    }

    /// Current bandwidth estimate in bytes per second (0 before any sample).
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// The throttle level in force (percent).
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The switchover's measured cost beside the last pages (see [`Policy::switchover_ms`]).
    pub fn set_switchover_ms(&mut self, ms: f64) {
        self.policy.switchover_ms = ms.max(0.0);
    }

    /// What every downtime costs beside its pages, ms.
    fn overhead_ms(&self) -> f64 {
        switchover_overhead_ms(self.policy.ram_pages) + self.policy.switchover_ms
    }

    /// Records a round that moved `bytes` in `elapsed`, after which `dirtied` pages are dirty.
    pub fn estimate(&mut self, bytes: u64, elapsed: Duration, dirtied: u64) -> Estimate {
        let secs = elapsed.as_secs_f64().max(1e-6);
        if bytes >= MIN_SAMPLE_BYTES || self.bandwidth == 0.0 {
            self.bandwidth = bytes as f64 / secs;
        }
        let predicted = self.downtime_ms(dirtied);
        let dirty_rate = dirtied as f64 / secs;
        // Writes landing on random pages of W fill the dirty set as W·(1 − e^(−R·t/W)): the
        // write rate R behind `dirtied` distinct pages, with W all of RAM.
        let w = self.policy.ram_pages.max(1) as f64;
        let filled = (dirtied as f64 / w).min(0.99);
        let rate = -w / secs * (1.0 - filled).ln();
        self.peak_dirty = self.peak_dirty.max(dirtied);
        self.peak_rate = self.peak_rate.max(rate);
        self.rate = rate;
        self.rate_throttle = self.throttle;
        Estimate {
            bandwidth: self.bandwidth,
            dirty_rate,
            predicted_downtime_ms: predicted,
            converged: predicted <= self.policy.limit_ms as f64,
        }
    }

    /// Whether one more round pays: the rest fits the limit, yet a round sending the `dirty`
    /// pages (`page_s` seconds each) while the guest writes `rate` pages per second would
    /// leave at most [`EXTRA_ROUND_GAIN`] of their copy time, and that copy is worth a round
    /// ([`Convergence::extra_round_floor_ms`]); `extra` such rounds were taken already. The
    /// switchover's fixed costs are the same either way and do not count.
    fn another_round_pays(&self, dirty: f64, page_s: f64, rate: f64, extra: u32) -> bool {
        let copy_ms = dirty * page_s * 1000.0;
        if extra >= EXTRA_ROUNDS_MAX || copy_ms < self.extra_round_floor_ms() {
            return false;
        }
        let w = self.policy.ram_pages.max(1) as f64;
        let t = dirty * page_s;
        let next = w * (1.0 - (-rate * t / w).exp());
        next * page_s * 1000.0 <= copy_ms * EXTRA_ROUND_GAIN
    }

    /// The shortest page copy (ms) worth one more round: [`EXTRA_ROUND_FLOOR_MS`], or
    /// [`EXTRA_ROUND_FLOOR_SHARE`] of the limit when that is less.
    fn extra_round_floor_ms(&self) -> f64 {
        EXTRA_ROUND_FLOOR_MS.min(self.policy.limit_ms as f64 * EXTRA_ROUND_FLOOR_SHARE)
    }

    /// Predicted downtime for sending `pages` with the guest paused.
    fn downtime_ms(&self, pages: u64) -> f64 {
        (pages * PAGE_SIZE) as f64 / self.bandwidth.max(1.0) * 1000.0 + self.overhead_ms()
    }

    /// Predicts the rest of the migration while round `round` runs: `sent` of its pages are
    /// on their way after `elapsed`, `left` are still to go. The bandwidth is this round's
    /// once it moved enough to tell, else the last estimate; the write rate is the last
    /// round's, scaled to the throttle now in force, and fills the dirty set as it would
    /// (saturating at all of RAM). None before anything was measured.
    pub fn eta(&self, round: u64, (sent, left): (u64, u64), elapsed: Duration) -> Option<Eta> {
        let secs = elapsed.as_secs_f64();
        let bw = if sent * PAGE_SIZE >= MIN_SAMPLE_BYTES && secs > 0.0 {
            (sent * PAGE_SIZE) as f64 / secs
        } else {
            self.bandwidth
        };
        if bw <= 0.0 {
            return None;
        }
        let page_s = PAGE_SIZE as f64 / bw;
        let rate = self.rate * f64::from(100 - self.throttle.min(99))
            / f64::from(100 - self.rate_throttle.min(99));
        let w = self.policy.ram_pages.max(1) as f64;
        let dirtied = |t: f64| w * (1.0 - (-rate * t / w).exp());
        let mut time = left as f64 * page_s;
        let mut bytes = left * PAGE_SIZE;
        // Pages dirtied while this round runs: what the next one sends.
        let mut dirty = dirtied(secs + time);
        let mut next = round + 1;
        let mut previous = f64::INFINITY;
        let mut stalled = 0;
        let mut extra = self.extra;
        loop {
            let downtime = dirty * page_s * 1000.0 + self.overhead_ms();
            let last = next >= u64::from(self.policy.max_rounds.max(1));
            // The same look-ahead as `decide`: a round that halves a fitting downtime is taken.
            if downtime <= self.policy.limit_ms as f64
                && !last
                && self.another_round_pays(dirty, page_s, rate, extra)
            {
                extra += 1;
                let t = dirty * page_s;
                time += t;
                bytes += (dirty as u64) * PAGE_SIZE;
                previous = dirty;
                dirty = dirtied(t);
                next += 1;
                continue;
            }
            stalled = if dirty >= previous * STALLED_SHARE {
                stalled + 1
            } else {
                0
            };
            let stop = self.policy.stall_rounds != 0 && stalled >= self.policy.stall_rounds;
            if downtime <= self.policy.limit_ms as f64 || last || stop {
                return Some(Eta {
                    remaining_bytes: bytes + (dirty as u64) * PAGE_SIZE,
                    time_left_ms: time * 1000.0 + downtime,
                    predicted_downtime_ms: downtime,
                    converges: downtime <= self.policy.limit_ms as f64,
                });
            }
            let t = dirty * page_s;
            time += t;
            bytes += (dirty as u64) * PAGE_SIZE;
            previous = dirty;
            dirty = dirtied(t);
            next += 1;
        }
    }

    /// Decides after round `round` (0-based), which sent `sent` pages and after which
    /// `est` holds (from [`Convergence::estimate`]) with `dirtied` pages dirty.
    pub fn decide(&mut self, round: u64, sent: u64, dirtied: u64, est: &Estimate) -> Decision {
        if est.converged {
            let last = round + 1 >= u64::from(self.policy.max_rounds.max(1));
            let page_s = PAGE_SIZE as f64 / est.bandwidth.max(1.0);
            let rate = self.rate * f64::from(100 - self.throttle.min(99))
                / f64::from(100 - self.rate_throttle.min(99));
            if !last && self.another_round_pays(dirtied as f64, page_s, rate, self.extra) {
                self.extra += 1;
                return Decision::Continue {
                    throttle: self.throttle,
                };
            }
            return Decision::StopAndCopy {
                reason: StopReason::Converged,
            };
        }
        let share = dirtied as f64 / sent.max(1) as f64;
        // Round 0 sends all RAM, whatever the guest does; later rounds tell how it behaves.
        let high = round >= 1 && share >= HIGH_DIRTY_SHARE;
        let headroom = self.policy.auto_converge && self.throttle < THROTTLE_MAX;
        if round >= 1 && share >= STALLED_SHARE && !headroom {
            self.stalled += 1;
        } else {
            self.stalled = 0;
        }
        let last = round + 1 >= u64::from(self.policy.max_rounds.max(1));
        let stalled = self.policy.stall_rounds != 0 && self.stalled >= self.policy.stall_rounds;
        if !last && !stalled {
            if high && headroom {
                self.throttle = if self.throttle == 0 {
                    THROTTLE_INITIAL
                } else {
                    (self.throttle + THROTTLE_STEP).min(THROTTLE_MAX)
                };
            }
            return Decision::Continue {
                throttle: self.throttle,
            };
        }
        if est.predicted_downtime_ms <= self.policy.max_downtime_ms as f64 {
            return Decision::StopAndCopy {
                reason: StopReason::WithinCap,
            };
        }
        Decision::GiveUp(self.explain(round, est))
    }

    /// Why pre-copy gives up, with the figures and what would let it finish.
    fn explain(&self, round: u64, est: &Estimate) -> String {
        let mb = |bytes: f64| bytes / 1e6;
        let rate = mb(self.peak_rate * PAGE_SIZE as f64);
        let set = (self.peak_dirty * PAGE_SIZE) as f64 / f64::from(1 << 20);
        let link = mb(self.bandwidth);
        // The cap that would have let it stop now, rounded up to 100 ms.
        let allow = ((est.predicted_downtime_ms / 100.0).ceil() * 100.0) as u64;
        let why = if round + 1 >= u64::from(self.policy.max_rounds.max(1)) {
            format!("{} rounds did not converge", round + 1)
        } else {
            "rounds stopped shrinking".to_string()
        };
        let help = if self.policy.auto_converge {
            format!("even at {}% throttle", self.throttle)
        } else {
            "use --auto-converge or".to_string()
        };
        let tail = if self.policy.auto_converge {
            format!("; allow --max-downtime {allow}")
        } else {
            format!(" allow --max-downtime {allow}")
        };
        format!(
            "dirtying {rate:.0} MB/s over {set:.0} MiB, link {link:.0} MB/s: will not converge \
             ({why}; stopping now would take {:.0} ms, over the {} ms cap); {help}{tail}",
            est.predicted_downtime_ms, self.policy.max_downtime_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(auto_converge: bool) -> Policy {
        Policy {
            limit_ms: 300,
            max_downtime_ms: 2000,
            auto_converge,
            max_rounds: 30,
            stall_rounds: crate::defaults::STALL_ROUNDS,
            ram_pages: 65_536,
            switchover_ms: 0.0,
        }
    }

    #[test]
    fn a_round_that_halves_a_fitting_downtime_is_taken_at_most_twice() {
        let mut c = Convergence::new(policy(true));
        let stop = Decision::StopAndCopy {
            reason: StopReason::Converged,
        };
        // Round 0: 1 GiB in 10 s (107 MB/s); 5000 pages dirty: 196 ms fits the 300 ms limit,
        // but the guest writes ~520 pages/s, so a round of 0.19 s leaves ~100 pages (9 ms).
        let e = c.estimate(1 << 30, Duration::from_secs(10), 5000);
        assert!(e.converged && e.predicted_downtime_ms > 150.0, "{e:?}");
        assert_eq!(
            c.decide(0, 1 << 18, 5000, &e),
            Decision::Continue { throttle: 0 }
        );
        // The ETA follows the same rule: one more round, then a stop at a few ms.
        let eta = c.eta(1, (0, 5000), Duration::ZERO).unwrap();
        assert!(eta.predicted_downtime_ms < 20.0, "{eta:?}");
        // It did: what is left is under the floor, so it stops.
        let e = c.estimate(5000 * PAGE_SIZE, Duration::from_millis(190), 100);
        assert_eq!(c.decide(1, 5000, 100, &e), stop);
        // Never more than EXTRA_ROUNDS_MAX of them.
        let mut c = Convergence::new(policy(true));
        let mut extra = 0;
        for round in 0..10 {
            let e = c.estimate(1 << 30, Duration::from_secs(10), 5000);
            match c.decide(round, 1 << 18, 5000, &e) {
                Decision::Continue { .. } => extra += 1,
                d => {
                    assert_eq!(d, stop);
                    break;
                }
            }
        }
        assert_eq!(extra, EXTRA_ROUNDS_MAX);
    }

    #[test]
    fn a_small_limit_takes_a_round_for_a_few_milliseconds_a_large_one_does_not() {
        // Measured on loopback: 512 MiB in 225 ms, and 5650 pages dirty after it (a guest
        // writing 30 000 pages/s): ~9.7 ms of copy, which fits either limit; another round
        // of ~10 ms would leave ~300 pages.
        let run = |limit_ms: u64, dirty: u64| {
            let mut c = Convergence::new(Policy {
                limit_ms,
                ram_pages: 131_072,
                ..policy(true)
            });
            let e = c.estimate(512 << 20, Duration::from_millis(225), dirty);
            assert!(e.converged, "{e:?}");
            c.decide(0, 131_072, dirty, &e)
        };
        let more = Decision::Continue { throttle: 0 };
        let stop = Decision::StopAndCopy {
            reason: StopReason::Converged,
        };
        // At 20 ms, 9.7 ms is worth a round (the floor is 2 ms) ...
        assert_eq!(run(20, 5650), more);
        // ... 1.3 ms is not ...
        assert_eq!(run(20, 750), stop);
        // ... and at 300 ms the floor stays 20 ms.
        assert_eq!(run(300, 5650), stop);
    }

    #[test]
    fn a_round_that_would_not_halve_the_downtime_is_not_taken() {
        let mut c = Convergence::new(policy(true));
        // 8 MiB in 20 ms (419 MB/s) and 20 000 pages dirty: 200 ms fits, but at this write
        // rate another round would leave as much.
        let e = c.estimate(8 << 20, Duration::from_millis(20), 20_000);
        assert!(e.converged, "{e:?}");
        assert_eq!(
            c.decide(1, 2048, 20_000, &e),
            Decision::StopAndCopy {
                reason: StopReason::Converged
            }
        );
    }

    #[test]
    fn stops_when_the_rest_fits_the_budget() {
        let mut c = Convergence::new(policy(true));
        // 1 GiB in 1 s: 1 GiB/s.
        let e = c.estimate(1 << 30, Duration::from_secs(1), 1000);
        assert!(e.converged, "{e:?}");
        assert_eq!(
            c.decide(0, 1 << 18, 1000, &e),
            Decision::StopAndCopy {
                reason: StopReason::Converged
            }
        );
        // 1 GiB dirty at 1 GiB/s → 1 s > 300 ms.
        let e = c.estimate(1 << 30, Duration::from_secs(1), (1 << 30) / PAGE_SIZE);
        assert!(!e.converged);
        // a tiny round keeps the earlier estimate
        let e = c.estimate(4096, Duration::from_secs(1), 10);
        assert!((e.bandwidth - (1u64 << 30) as f64).abs() < 1.0);
    }

    /// 256 MiB at 100 MB/s, re-dirtied almost entirely every round.
    fn hot_round(c: &mut Convergence, round: u64) -> Decision {
        let pages = 60_000;
        let e = c.estimate(pages * PAGE_SIZE, Duration::from_millis(2400), pages);
        c.decide(round, pages, pages, &e)
    }

    #[test]
    fn auto_converge_throttles_step_by_step_up_to_the_cap() {
        let mut c = Convergence::new(policy(true));
        assert_eq!(hot_round(&mut c, 0), Decision::Continue { throttle: 0 });
        let mut levels = Vec::new();
        for round in 1..=10 {
            match hot_round(&mut c, round) {
                Decision::Continue { throttle } => levels.push(throttle),
                d => panic!("round {round}: {d:?}"),
            }
        }
        assert_eq!(levels, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]);
        // Two rounds at the top that still do not shrink end pre-copy, with the figures.
        let Decision::GiveUp(why) = hot_round(&mut c, 11) else {
            panic!("a stalled migration at 99 % went on");
        };
        assert!(why.contains("even at 99% throttle"), "{why}");
    }

    #[test]
    fn a_stalled_migration_gives_up_with_the_figures() {
        let mut c = Convergence::new(policy(false));
        assert_eq!(hot_round(&mut c, 0), Decision::Continue { throttle: 0 });
        assert_eq!(hot_round(&mut c, 1), Decision::Continue { throttle: 0 });
        let Decision::GiveUp(why) = hot_round(&mut c, 2) else {
            panic!("a stalled migration went on");
        };
        assert!(why.contains("will not converge"), "{why}");
        assert!(why.contains("--auto-converge"), "{why}");
        assert!(why.contains("--max-downtime 2500"), "{why}");
        assert!(why.contains("over 234 MiB"), "{why}");
    }

    #[test]
    fn a_stall_within_the_cap_stops_and_copies() {
        let mut c = Convergence::new(Policy {
            max_downtime_ms: 5000,
            ..policy(false)
        });
        hot_round(&mut c, 0);
        hot_round(&mut c, 1);
        assert_eq!(
            hot_round(&mut c, 2),
            Decision::StopAndCopy {
                reason: StopReason::WithinCap
            }
        );
    }

    #[test]
    fn the_eta_runs_the_rounds_forward() {
        let mut c = Convergence::new(policy(true));
        // Nothing measured yet: no prediction.
        assert_eq!(c.eta(0, (0, 1000), Duration::ZERO), None);
        // Round 0 half done: 32768 pages in 1 s (134 MB/s), no dirty rate known yet: the rest
        // of the round, then a stop-and-copy of nothing.
        let fixed = switchover_overhead_ms(65_536);
        assert!((fixed - 1.675).abs() < 1e-9, "{fixed}");
        let e = c.eta(0, (32_768, 32_768), Duration::from_secs(1)).unwrap();
        assert!((e.time_left_ms - (1000.0 + fixed)).abs() < 1.0, "{e:?}");
        assert!(e.converges);
        assert_eq!(e.remaining_bytes, 32_768 * PAGE_SIZE);
        // Round 0 (2 s) left 4000 of 65536 pages dirty: 2064 writes/s (some fell on the same
        // page). A round of those 4000 pages (122 ms) would dirty 251 (7.7 ms + 1.7 ms of
        // switchover): converged.
        c.estimate(65_536 * PAGE_SIZE, Duration::from_secs(2), 4000);
        let e = c.eta(1, (0, 4000), Duration::ZERO).unwrap();
        assert!(e.converges, "{e:?}");
        assert!(
            (e.time_left_ms - (122.1 + 7.7 + fixed)).abs() < 0.5,
            "{e:?}"
        );
        assert!(
            (e.predicted_downtime_ms - (7.7 + fixed)).abs() < 0.2,
            "{e:?}"
        );
        assert_eq!(e.remaining_bytes, (4000 + 251) * PAGE_SIZE);
    }

    #[test]
    fn the_eta_of_a_guest_that_outruns_the_link_ends_in_a_stall() {
        let mut c = Convergence::new(policy(false));
        hot_round(&mut c, 0);
        let e = c.eta(1, (0, 60_000), Duration::ZERO).unwrap();
        assert!(!e.converges, "{e:?}");
        assert!(e.predicted_downtime_ms > 2000.0, "{e:?}");
    }

    #[test]
    fn stall_detection_can_be_turned_off() {
        let mut c = Convergence::new(Policy {
            stall_rounds: 0,
            ..policy(false)
        });
        for round in 0..20 {
            assert_eq!(hot_round(&mut c, round), Decision::Continue { throttle: 0 });
        }
    }

    #[test]
    fn the_last_round_never_exceeds_the_cap() {
        let mut c = Convergence::new(Policy {
            max_rounds: 2,
            ..policy(true)
        });
        assert_eq!(hot_round(&mut c, 0), Decision::Continue { throttle: 0 });
        let Decision::GiveUp(why) = hot_round(&mut c, 1) else {
            panic!("went past the last round");
        };
        assert!(why.contains("2 rounds did not converge"), "{why}");
    }

    #[test]
    fn a_shrinking_dirty_set_is_left_alone() {
        let mut c = Convergence::new(policy(true));
        let e = c.estimate(60_000 * PAGE_SIZE, Duration::from_millis(2400), 20_000);
        assert_eq!(
            c.decide(1, 60_000, 20_000, &e),
            Decision::Continue { throttle: 0 }
        );
    }
}
