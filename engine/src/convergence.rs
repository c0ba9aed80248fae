//! Dirty-rate and bandwidth estimates, predicted downtime, auto-converge and the stop
//! decision.
//!
//! After every pre-copy round [`Convergence::after_round`] decides: go on (possibly slowing
//! the guest down), stop and copy (the rest fits the downtime limit, or at least the hard cap
//! once rounds stop helping), or give up with the figures that say why — never a stop-and-copy
//! whose predicted downtime exceeds the cap.
//!
//! Auto-converge follows QEMU's cpu-throttle: a round that re-dirtied at least half of what it
//! sent starts the throttle at [`THROTTLE_INITIAL`] %, every later such round adds
//! [`THROTTLE_STEP`] %, up to [`THROTTLE_MAX`] %.

use std::time::Duration;

use crate::memory::PAGE_SIZE;

/// Rounds smaller than this do not update the bandwidth estimate: their timing is dominated
/// by fixed costs.
const MIN_SAMPLE_BYTES: u64 = 4 << 20;
/// Fixed cost of the switchover besides pages (device state, commit round trips), in ms.
const SWITCHOVER_OVERHEAD_MS: f64 = 5.0;
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
/// Consecutive non-shrinking rounds (with no throttle left to add) that end pre-copy.
const STALLED_ROUNDS: u32 = 2;

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
    /// Highest dirty rate seen, pages per second.
    peak_rate: f64,
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

    /// Records a round that moved `bytes` in `elapsed`, after which `dirtied` pages are dirty.
    pub fn estimate(&mut self, bytes: u64, elapsed: Duration, dirtied: u64) -> Estimate {
        let secs = elapsed.as_secs_f64().max(1e-6);
        if bytes >= MIN_SAMPLE_BYTES || self.bandwidth == 0.0 {
            self.bandwidth = bytes as f64 / secs;
        }
        let predicted = self.downtime_ms(dirtied);
        let dirty_rate = dirtied as f64 / secs;
        self.peak_dirty = self.peak_dirty.max(dirtied);
        self.peak_rate = self.peak_rate.max(dirty_rate);
        Estimate {
            bandwidth: self.bandwidth,
            dirty_rate,
            predicted_downtime_ms: predicted,
            converged: predicted <= self.policy.limit_ms as f64,
        }
    }

    /// Predicted downtime for sending `pages` with the guest paused.
    fn downtime_ms(&self, pages: u64) -> f64 {
        (pages * PAGE_SIZE) as f64 / self.bandwidth.max(1.0) * 1000.0 + SWITCHOVER_OVERHEAD_MS
    }

    /// Decides after round `round` (0-based), which sent `sent` pages and after which
    /// `est` holds (from [`Convergence::estimate`]) with `dirtied` pages dirty.
    pub fn decide(&mut self, round: u64, sent: u64, dirtied: u64, est: &Estimate) -> Decision {
        if est.converged {
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
        if !last && self.stalled < STALLED_ROUNDS {
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
        }
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
