//! Dirty-rate and bandwidth estimates, predicted downtime and the stop decision.

use std::time::Duration;

use crate::memory::PAGE_SIZE;

/// Rounds smaller than this do not update the bandwidth estimate: their timing is dominated
/// by fixed costs.
const MIN_SAMPLE_BYTES: u64 = 4 << 20;
/// Fixed cost of the switchover besides pages (device state, commit round trips), in ms.
const SWITCHOVER_OVERHEAD_MS: f64 = 5.0;

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

/// Tracks the link and the guest across rounds.
#[derive(Debug, Clone)]
pub struct Convergence {
    limit_ms: f64,
    bandwidth: f64,
}

impl Convergence {
    /// A tracker for a downtime limit of `limit_ms`.
    pub fn new(limit_ms: u64) -> Self {
        Convergence {
            limit_ms: limit_ms as f64,
            bandwidth: 0.0,
        }
    }

    /// Current bandwidth estimate in bytes per second (0 before any sample).
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// Records a round that moved `bytes` in `elapsed`, after which `dirtied` pages are dirty.
    pub fn after_round(&mut self, bytes: u64, elapsed: Duration, dirtied: u64) -> Estimate {
        let secs = elapsed.as_secs_f64().max(1e-6);
        if bytes >= MIN_SAMPLE_BYTES || self.bandwidth == 0.0 {
            self.bandwidth = bytes as f64 / secs;
        }
        let bw = self.bandwidth.max(1.0);
        let predicted = (dirtied * PAGE_SIZE) as f64 / bw * 1000.0 + SWITCHOVER_OVERHEAD_MS;
        Estimate {
            bandwidth: self.bandwidth,
            dirty_rate: dirtied as f64 / secs,
            predicted_downtime_ms: predicted,
            converged: predicted <= self.limit_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_when_the_rest_fits_the_budget() {
        let mut c = Convergence::new(300);
        // 1 GiB in 1 s: 1 GiB/s.
        let e = c.after_round(1 << 30, Duration::from_secs(1), 1000);
        assert!(e.converged, "{e:?}");
        // 1 GiB dirty at 1 GiB/s → 1 s > 300 ms.
        let e = c.after_round(1 << 30, Duration::from_secs(1), (1 << 30) / PAGE_SIZE);
        assert!(!e.converged);
        // a tiny round keeps the earlier estimate
        let e = c.after_round(4096, Duration::from_secs(1), 10);
        assert!((e.bandwidth - (1u64 << 30) as f64).abs() < 1.0);
    }
}
