//! The source state machine: set-up, pre-copy rounds, the stop decision, stop-and-copy and
//! the switchover (DESIGN §5).
//!
//! Invariants kept here:
//! - before the guest is paused, any failure or cancel leaves it running, unchanged;
//! - between pause and commit, a failure resumes it on the source;
//! - once Commit is sent, the source never resumes it: a lost answer is "outcome unknown".
//!
//! A migration is a `Session` taken through its phases, one room each: `handshake`
//! (connect, versions, key, configuration, the transport decision), `channels` (the data
//! plane: TCP connections or RDMA queue pairs behind `channels::OutgoingPlane`, both
//! feeding the same page scheduler), `precopy` (rounds while the guest runs) and
//! `switchover` (pause, last round, device state, commit, report).

mod channels;
mod handshake;
mod plan;
mod precopy;
mod switchover;

pub use plan::{plan, ContentSample, DirtySample, Forecast, LinkProbe, PlanReport};

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use livemig_transport::codec::{CodecStats, Mode};
use serde::{Deserialize, Serialize};

use crate::auth::Key;
use crate::defaults;
use crate::scheduler::{Bandwidth, RoundStats, Scheduler};
use crate::session::{Control, MigrationError, MigrationReport, RoundReport};
use crate::storage::outgoing::OutgoingStorage;
use crate::storage::StorageMode;
use crate::vm::MigratableVm;

use channels::OutgoingPlane;

/// Which data transport carries pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// TCP data connections.
    #[default]
    Tcp,
    /// RDMA queue pairs; the migration fails if no usable device here or at the destination.
    Rdma,
    /// RDMA when a device here has an address in the destination's subnet and the destination
    /// takes RDMA; TCP otherwise. The report says which and why.
    Auto,
}

crate::named_enum!(TransportChoice, "transport", { Tcp => "tcp", Rdma => "rdma", Auto => "auto" });

/// Options of an outgoing migration.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Data channels: TCP connections, or RDMA queue pairs per rail (None: the transport's
    /// default, see [`MigrateOptions::channels_for`]).
    pub channels: Option<u16>,
    /// Data transport.
    pub transport: TransportChoice,
    /// RDMA devices, one per rail (default: every active device with an address in the
    /// destination's subnet, else the first active device).
    pub rdma_devices: Vec<String>,
    /// Stop-and-copy once the predicted downtime is at most this.
    pub downtime_limit_ms: u64,
    /// Stop-and-copy after at most this many pre-copy rounds.
    pub max_rounds: u32,
    /// Hard cap on the predicted downtime (None: [`defaults::MAX_DOWNTIME_FACTOR`] × the
    /// limit): a migration that cannot stop within it gives up and the VM keeps running here.
    pub max_downtime_ms: Option<u64>,
    /// Throttle the guest's vCPUs when it dirties memory faster than the link drains it.
    pub auto_converge: bool,
    /// Non-shrinking rounds that end pre-copy (0: only `max_rounds` does).
    pub stall_rounds: u32,
    /// Pin channel workers to cores.
    pub pin_workers: bool,
    /// Longest wait for any single answer of the destination.
    pub timeout: Duration,
    /// Page encoding.
    pub compress: Mode,
    /// Bytes of last-sent page versions kept for delta encoding.
    pub delta_cache_bytes: u64,
    /// Pre-shared key; None only talks to destinations without one (`--no-auth`).
    pub key: Option<Key>,
    /// How the VM's disks move.
    pub storage: StorageMode,
    /// Copy mode: the directory for the copies on the destination (None: the destination's
    /// default).
    pub storage_dir: Option<String>,
    /// Copy mode: delete the source images once the destination runs the VM on its copies.
    pub remove_source_storage: bool,
    /// Copy mode: mirror guest writes synchronously from the start (otherwise only once the
    /// disks' dirty set stops shrinking).
    pub active_mirror: bool,
    /// Bytes per second the migration may send (0: no cap); its holder may change it while
    /// the migration runs.
    pub bandwidth: Bandwidth,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            channels: None,
            transport: TransportChoice::Tcp,
            rdma_devices: Vec::new(),
            downtime_limit_ms: defaults::DOWNTIME_LIMIT_MS,
            max_rounds: defaults::MAX_ROUNDS,
            max_downtime_ms: None,
            auto_converge: true,
            stall_rounds: defaults::STALL_ROUNDS,
            pin_workers: true,
            timeout: defaults::TIMEOUT,
            compress: Mode::Auto,
            delta_cache_bytes: defaults::DELTA_CACHE_MIB << 20,
            key: None,
            storage: StorageMode::Shared,
            storage_dir: None,
            remove_source_storage: false,
            active_mirror: false,
            bandwidth: Bandwidth::default(),
        }
    }
}

impl MigrateOptions {
    /// The hard cap on the predicted downtime, in ms.
    pub fn max_downtime(&self) -> u64 {
        self.max_downtime_ms.unwrap_or(
            self.downtime_limit_ms
                .saturating_mul(defaults::MAX_DOWNTIME_FACTOR),
        )
    }

    /// The data channels over RDMA (`rdma`: queue pairs per rail) or TCP (connections): those
    /// asked for, else the transport's default.
    pub fn channels_for(&self, rdma: bool) -> u16 {
        self.channels.unwrap_or(if rdma {
            defaults::RDMA_QPS_PER_RAIL
        } else {
            defaults::CHANNELS
        })
    }
}

/// Progress of an outgoing migration.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Handshake done, destination ready.
    Connected {
        /// Set-up time.
        setup_ms: f64,
        /// Pages to send in round 0.
        total_pages: u64,
        /// `tcp` or `rdma`.
        transport: &'static str,
        /// How the transport was chosen and what it runs on.
        transport_detail: String,
    },
    /// Pages of a round are being sent.
    Sending {
        /// Round number.
        round: u64,
        /// Pages queued so far.
        pages_done: u64,
        /// Pages in the round.
        pages_total: u64,
        /// What is left, predicted (None until something was measured).
        eta: Option<crate::convergence::Eta>,
    },
    /// A round finished.
    Round(RoundReport),
    /// The guest is paused; the final round starts.
    Paused {
        /// Pages left to send.
        pages: u64,
    },
    /// Commit was sent.
    Committed,
}

/// Migrates `vm` to the destination listening at `to`. `cancel` is honoured until the
/// switchover; `on_progress` hears every phase and round.
pub fn migrate(
    vm: &dyn MigratableVm,
    to: &str,
    opts: &MigrateOptions,
    cancel: &AtomicBool,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    let mut s = Session::open(vm, to, opts, cancel)?;
    on_progress(&Progress::Connected {
        setup_ms: ms(s.setup),
        total_pages: s.vm.ram().layout().total_pages(),
        transport: s.plane.name(),
        transport_detail: s.detail.clone(),
    });
    let result = s.run(on_progress);
    // Whatever happened, a guest still running here runs at full speed again.
    let _ = vm.set_throttle(0);
    // Mirror hooks hold the storage lane: they go before the scheduler.
    s.storage.stop();
    s.sched.shutdown();
    result
}

/// One outgoing migration, from the open control connection to the report.
struct Session<'a> {
    vm: &'a dyn MigratableVm,
    opts: &'a MigrateOptions,
    cancel: &'a AtomicBool,
    ctl: Control,
    sched: Scheduler,
    plane: Box<dyn OutgoingPlane>,
    /// How the transport was chosen and what it runs on.
    detail: String,
    t0: Instant,
    setup: Duration,
    tally: Tally,
    storage: OutgoingStorage,
    /// The migration's id ([`crate::session::migration_id`]).
    id: String,
}

/// What the rounds moved so far.
#[derive(Default)]
struct Tally {
    rounds: Vec<RoundReport>,
    drain: crate::session::DrainReport,
    pages_sent: u64,
    wire: u64,
    codec: CodecStats,
    cpu_ns: u64,
}

impl Tally {
    fn add(&mut self, stats: &RoundStats) {
        self.pages_sent += stats.pages;
        self.wire += stats.wire_bytes;
        self.codec.add(&stats.codec);
        self.cpu_ns += stats.cpu_ns;
    }
}

impl Session<'_> {
    /// Pre-copy, then the switchover.
    fn run(
        &mut self,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationReport, MigrationError> {
        let cpu_start = crate::scheduler::thread_cpu_ns();
        let pre = self.precopy(on_progress)?;
        self.switchover(pre, cpu_start, on_progress)
    }

    /// Tells the destination the migration is abandoned (best effort).
    fn abort(&mut self, reason: &str) {
        let _ = self.ctl.send(&crate::protocol::Message::Abort {
            reason: reason.to_string(),
        });
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
