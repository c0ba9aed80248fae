//! The control socket of a VM process: typed JSON requests, replies and migration events,
//! one JSON object per line over a Unix socket, and a small blocking client.
//!
//! A connection carries one request. `status`, `cancel`, `stop` and `consoleinput` are
//! answered by one line; `migrate` by a stream of [`Event`] lines ending with `done` or
//! `error`; `console` by the guest's console bytes.
//!
//! ```text
//! → {"cmd":"migrate","to":"host-b:7000","channels":2,"compress":"auto",...}
//! ← {"event":"connected","setup_ms":3.1,...}
//! ← {"event":"round","round":{"round":0,"pages":65536,...}}
//! ← {"event":"done","report":{"status":"completed",...}}
//! ```
//!
//! Orchestrators can drive migrations with these types (the `livemig` CLI and the bench
//! harness do).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use livemig_transport::codec::Mode;
use serde::{Deserialize, Serialize};

use crate::auth::Key;
use crate::convergence::Eta;
use crate::defaults;
use crate::session::{MigrationReport, RoundReport};
use crate::source::{MigrateOptions, Progress, TransportChoice};
use crate::storage::StorageMode;
use crate::vm::RunState;

/// Most bytes of one request line a VM process reads.
pub const MAX_REQUEST_BYTES: u64 = 64 << 10;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The VM's phase, run state, guest counter and last migration ([`StatusReply`]).
    Status,
    /// Cancels the migration under way (before the switchover) ([`CancelReply`]).
    Cancel,
    /// Stops the VM process.
    Stop,
    /// Migrates the VM; answered by [`Event`] lines.
    Migrate(MigrateRequest),
    /// Forecasts a migration without moving anything: samples the guest, probes the link
    /// ([`crate::source::PlanReport`]).
    Plan(PlanRequest),
    /// Streams the guest's console: its output so far, then live, as raw bytes until the
    /// client closes (a Linux VM's COM1).
    Console,
    /// Types `text` on the guest's console ([`OkReply`]).
    ConsoleInput {
        /// What to type.
        text: String,
    },
    /// Announces the VM's NICs on their networks again ([`AnnounceReply`]).
    Announce,
    /// Settles a migration left in "outcome unknown" with the destination's record of what
    /// it did ([`ResolveReply`]): resumes the VM here if the destination discarded its copy,
    /// stops it here if the destination resumed it.
    Resolve {
        /// The destination's record.
        record: crate::session::OutcomeRecord,
    },
}

/// A plan: the migration it is for, and how long to watch the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// The migration.
    #[serde(flatten)]
    pub migrate: MigrateRequest,
    /// How long the dirty log watches the guest, ms.
    #[serde(default = "default_plan_window")]
    pub window_ms: u64,
}

fn default_plan_window() -> u64 {
    defaults::PLAN_WINDOW_MS
}

fn default_downtime() -> u64 {
    defaults::DOWNTIME_LIMIT_MS
}
fn default_stall_rounds() -> u32 {
    defaults::STALL_ROUNDS
}

fn default_true() -> bool {
    true
}

fn default_rounds() -> u32 {
    defaults::MAX_ROUNDS
}
fn default_delta_cache() -> u64 {
    defaults::DELTA_CACHE_MIB
}

/// How to migrate: the destination and the tuning (defaults: [`crate::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Destination address (`host:port` of `livemig receive`).
    pub to: String,
    /// Data channels: TCP connections, or RDMA queue pairs per rail (None: the transport's
    /// default; left out of the request then, which an older VM process reads as one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u16>,
    /// Data transport.
    #[serde(default)]
    pub transport: TransportChoice,
    /// RDMA device (a client of an older livemig names one here).
    #[serde(default)]
    pub rdma_device: Option<String>,
    /// RDMA devices, one per rail.
    #[serde(default)]
    pub rdma_devices: Vec<String>,
    /// Page encoding.
    #[serde(default = "Mode::default_for_requests")]
    pub compress: Mode,
    /// Stop-and-copy once the predicted downtime is at most this.
    #[serde(default = "default_downtime")]
    pub downtime_limit_ms: u64,
    /// Stop-and-copy after at most this many pre-copy rounds.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Hard cap on the predicted downtime (default: 10× the limit).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Throttle the guest when it dirties faster than the link drains.
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// Non-shrinking rounds that end pre-copy (0: only max_rounds does).
    #[serde(default = "default_stall_rounds")]
    pub stall_rounds: u32,
    /// Delta-encoding cache, MiB.
    #[serde(default = "default_delta_cache")]
    pub delta_cache_mib: u64,
    /// How the VM's disks move.
    #[serde(default)]
    pub storage: StorageMode,
    /// Copy mode: the directory for the copies on the destination.
    #[serde(default)]
    pub storage_dir: Option<String>,
    /// Copy mode: delete the source images after a committed migration.
    #[serde(default)]
    pub remove_source_storage: bool,
    /// Copy mode: mirror guest writes synchronously from the start.
    #[serde(default)]
    pub active_mirror: bool,
    /// Most bytes per second the migration may send, in MB/s (None: no cap of its own; a
    /// host agent's caps may still apply).
    #[serde(default)]
    pub max_bandwidth_mbps: Option<u64>,
}

impl MigrateRequest {
    /// A request to migrate to `to` with every default.
    pub fn to(to: &str) -> Self {
        MigrateRequest {
            to: to.to_string(),
            channels: None,
            transport: TransportChoice::Tcp,
            rdma_device: None,
            rdma_devices: Vec::new(),
            compress: Mode::Auto,
            downtime_limit_ms: defaults::DOWNTIME_LIMIT_MS,
            max_rounds: defaults::MAX_ROUNDS,
            max_downtime_ms: None,
            auto_converge: true,
            stall_rounds: defaults::STALL_ROUNDS,
            delta_cache_mib: defaults::DELTA_CACHE_MIB,
            storage: StorageMode::Shared,
            storage_dir: None,
            remove_source_storage: false,
            active_mirror: false,
            max_bandwidth_mbps: None,
        }
    }

    /// The engine's options for this request, or why it is not acceptable.
    pub fn options(&self, key: Option<Key>) -> Result<MigrateOptions, String> {
        if let Some(n) = self
            .channels
            .filter(|&n| n == 0 || n > defaults::MAX_CHANNELS)
        {
            return Err(format!("{n} channels (1..={})", defaults::MAX_CHANNELS));
        }
        if self.max_rounds == 0 {
            return Err("max_rounds must be at least 1".into());
        }
        if let Some(cap) = self.max_downtime_ms {
            if cap < self.downtime_limit_ms {
                return Err(format!(
                    "max_downtime_ms {cap} is below the downtime limit {} ms",
                    self.downtime_limit_ms
                ));
            }
        }
        if self.storage == StorageMode::Shared {
            let copy_only = [
                (self.storage_dir.is_some(), "a storage directory"),
                (self.remove_source_storage, "removing the source storage"),
                (self.active_mirror, "active mirroring"),
            ];
            if let Some((_, what)) = copy_only.iter().find(|(set, _)| *set) {
                return Err(format!(
                    "{what} applies to copy migrations (--storage copy), not shared storage"
                ));
            }
        }
        Ok(MigrateOptions {
            channels: self.channels,
            transport: self.transport,
            rdma_devices: if self.rdma_devices.is_empty() {
                self.rdma_device.iter().cloned().collect()
            } else {
                self.rdma_devices.clone()
            },
            downtime_limit_ms: self.downtime_limit_ms,
            max_rounds: self.max_rounds,
            max_downtime_ms: self.max_downtime_ms,
            auto_converge: self.auto_converge,
            stall_rounds: self.stall_rounds,
            compress: self.compress,
            delta_cache_bytes: self.delta_cache_mib.clamp(1, 1 << 20) << 20,
            key,
            storage: self.storage,
            storage_dir: self.storage_dir.clone(),
            remove_source_storage: self.remove_source_storage,
            active_mirror: self.active_mirror,
            bandwidth: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
                self.max_bandwidth_mbps
                    .unwrap_or(0)
                    .saturating_mul(1_000_000),
            )),
            ..MigrateOptions::default()
        })
    }
}

/// A migration event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// Handshake done, destination ready.
    Connected {
        /// Set-up time.
        setup_ms: f64,
        /// Pages of round 0.
        total_pages: u64,
        /// `tcp` or `rdma`.
        transport: String,
        /// How the transport was chosen.
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
        /// What is left, predicted (absent until something was measured).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eta: Option<Eta>,
    },
    /// A round finished.
    Round {
        /// Its figures.
        round: RoundReport,
    },
    /// The guest is paused on the source.
    Paused {
        /// Pages of the final round.
        pages: u64,
    },
    /// Commit was sent.
    Committed,
    /// The migration completed (or its digests differ: see the report's status).
    Done {
        /// The report.
        report: Box<MigrationReport>,
    },
    /// The migration failed.
    Error {
        /// What failed.
        error: String,
        /// Where the VM is: `running` (on the source) or `paused` (outcome unknown).
        source_state: String,
    },
}

impl From<&Progress> for Event {
    fn from(p: &Progress) -> Event {
        match p {
            Progress::Connected {
                setup_ms,
                total_pages,
                transport,
                transport_detail,
            } => Event::Connected {
                setup_ms: *setup_ms,
                total_pages: *total_pages,
                transport: transport.to_string(),
                transport_detail: transport_detail.clone(),
            },
            Progress::Sending {
                round,
                pages_done,
                pages_total,
                eta,
            } => Event::Sending {
                round: *round,
                pages_done: *pages_done,
                pages_total: *pages_total,
                eta: *eta,
            },
            Progress::Round(r) => Event::Round { round: r.clone() },
            Progress::Paused { pages } => Event::Paused { pages: *pages },
            Progress::Committed => Event::Committed,
        }
    }
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    /// `running`, `migrating`, `migrated` or `outcome-unknown`.
    pub phase: String,
    /// The VM's run state.
    pub run_state: RunState,
    /// The guest's progress counter (None if the guest stopped).
    pub guest_counter: Option<u64>,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The last migration's report or failure (null before any).
    pub last_migration: serde_json::Value,
    /// While a migration runs: where it is and what is left, predicted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<LiveProgress>,
}

/// A running migration, as `status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveProgress {
    /// The round being sent.
    pub round: u64,
    /// Its pages sent so far.
    pub pages_done: u64,
    /// Its pages.
    pub pages_total: u64,
    /// Auto-converge level during the last finished round, percent.
    pub throttle_pct: u8,
    /// What is left, predicted (absent until something was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<Eta>,
}

impl LiveProgress {
    /// Takes in one migration event.
    pub fn update(&mut self, ev: &Event) {
        match ev {
            Event::Sending {
                round,
                pages_done,
                pages_total,
                eta,
            } => {
                self.round = *round;
                self.pages_done = *pages_done;
                self.pages_total = *pages_total;
                if eta.is_some() {
                    self.eta = *eta;
                }
            }
            Event::Round { round } => {
                self.round = round.round + 1;
                self.pages_done = 0;
                self.pages_total = round.dirtied_pages;
                self.eta = round.eta.or(self.eta);
            }
            _ => {}
        }
    }
}

/// The answer to [`Request::Cancel`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelReply {
    /// Whether a migration was under way and is being cancelled.
    pub cancel_requested: bool,
    /// The VM's phase.
    pub phase: String,
}

/// The answer to [`Request::Stop`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StopReply {
    /// Always true: the process exits after answering.
    pub stopping: bool,
}

/// The answer to a request done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OkReply {
    /// Always true.
    pub ok: bool,
}

/// The answer to [`Request::Resolve`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolveReply {
    /// What the destination did with the migration.
    pub outcome: crate::session::Outcome,
    /// The VM's phase here now: `running` (resumed here) or `migrated` (stopped here).
    pub phase: String,
}

/// The answer to [`Request::Announce`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnnounceReply {
    /// NICs announced in the first round (more rounds follow in the background).
    pub nics: usize,
}

/// The answer to a request that could not be served.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Why.
    pub error: String,
}

/// Errors of the control-socket client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached or failed.
    #[error("VM control socket {path}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM process answered something that is not a reply.
    #[error("VM control socket {path}: bad reply {line:?}: {reason}")]
    BadReply {
        /// The socket.
        path: String,
        /// The line.
        line: String,
        /// What was wrong.
        reason: String,
    },
    /// The VM process refused the request.
    #[error("the VM process refused: {0}")]
    Refused(String),
    /// The migration failed.
    #[error("migration failed: {error} (VM state on the source: {source_state})")]
    MigrationFailed {
        /// What failed.
        error: String,
        /// `running` or `paused`.
        source_state: String,
    },
    /// The VM process closed the connection before the migration ended.
    #[error("the VM process closed the control connection before the migration finished")]
    Closed,
}

fn connect(socket: &Path, req: &Request) -> Result<BufReader<UnixStream>, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(io)?;
    let line = serde_json::to_string(req).map_err(|e| io(std::io::Error::other(e)))?;
    match writeln!(s, "{line}") {
        Ok(()) => {}
        // The VM process refused the connection (another user, too many connections): its
        // answer, sent before it closed, is still there to read.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(io(e)),
    }
    Ok(BufReader::new(s))
}

/// Sends `req` and returns the one-line reply as JSON.
pub fn request(socket: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    request_timeout(socket, req, None)
}

/// [`request`], giving up when no reply comes within `timeout` (a VM process busy receiving a
/// migration answers only once it runs the VM).
pub fn request_timeout(
    socket: &Path,
    req: &Request,
    timeout: impl Into<Option<std::time::Duration>>,
) -> Result<serde_json::Value, ControlError> {
    let mut r = connect(socket, req)?;
    let _ = r.get_ref().set_read_timeout(timeout.into());
    let mut line = String::new();
    r.read_line(&mut line).map_err(|source| ControlError::Io {
        path: socket.display().to_string(),
        source,
    })?;
    if line.is_empty() {
        return Err(ControlError::Closed);
    }
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| ControlError::BadReply {
        path: socket.display().to_string(),
        line: line.trim().to_string(),
        reason: e.to_string(),
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(ControlError::Refused(e.to_string()));
    }
    Ok(v)
}

/// The VM's status.
pub fn status(socket: &Path) -> Result<StatusReply, ControlError> {
    let v = request(socket, &Request::Status)?;
    serde_json::from_value(v.clone()).map_err(|e| ControlError::BadReply {
        path: socket.display().to_string(),
        line: v.to_string(),
        reason: e.to_string(),
    })
}

/// Forecasts a migration of the VM behind `socket` (nothing moves).
pub fn plan(socket: &Path, req: &PlanRequest) -> Result<crate::source::PlanReport, ControlError> {
    let v = request(socket, &Request::Plan(req.clone()))?;
    serde_json::from_value(v.clone()).map_err(|e| ControlError::BadReply {
        path: socket.display().to_string(),
        line: v.to_string(),
        reason: e.to_string(),
    })
}

/// Runs a migration through the VM's socket, handing every event to `on_event`; returns
/// the report.
pub fn migrate(
    socket: &Path,
    req: &MigrateRequest,
    on_event: &mut dyn FnMut(&Event),
) -> Result<MigrationReport, ControlError> {
    let r = connect(socket, &Request::Migrate(req.clone()))?;
    for line in r.lines() {
        let line = line.map_err(|source| ControlError::Io {
            path: socket.display().to_string(),
            source,
        })?;
        let ev: Event = serde_json::from_str(&line).map_err(|e| ControlError::BadReply {
            path: socket.display().to_string(),
            line: line.clone(),
            reason: e.to_string(),
        })?;
        on_event(&ev);
        match ev {
            Event::Done { report } => return Ok(*report),
            Event::Error {
                error,
                source_state,
            } => {
                return Err(ControlError::MigrationFailed {
                    error,
                    source_state,
                })
            }
            _ => {}
        }
    }
    Err(ControlError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_form() {
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let m: Request = serde_json::from_str(
            r#"{"cmd":"migrate","to":"h:1","compress":"zstd:5","transport":"rdma","channels":3}"#,
        )
        .unwrap();
        let Request::Migrate(m) = m else {
            panic!("{m:?}")
        };
        assert_eq!(m.compress, Mode::Zstd(5));
        assert_eq!(m.transport, TransportChoice::Rdma);
        assert_eq!((m.channels, m.max_rounds), (Some(3), defaults::MAX_ROUNDS));
        let back = serde_json::to_string(&Request::Migrate(m.clone())).unwrap();
        assert!(back.contains(r#""cmd":"migrate""#), "{back}");
        assert!(back.contains(r#""compress":"zstd:5""#), "{back}");
        assert!(serde_json::from_str::<Request>(
            r#"{"cmd":"migrate","to":"h:1","compress":"lz5"}"#
        )
        .is_err());
        assert!(m.options(None).is_ok());
        assert!(MigrateRequest {
            channels: Some(0),
            ..m.clone()
        }
        .options(None)
        .is_err());
        // No channels asked: each transport's default, and the field stays out of the request
        // (an older VM process reads its absence as one channel).
        let d = MigrateRequest::to("h:1");
        let o = d.options(None).unwrap();
        assert_eq!(
            (o.channels_for(false), o.channels_for(true)),
            (defaults::CHANNELS, defaults::RDMA_QPS_PER_RAIL)
        );
        let text = serde_json::to_string(&Request::Migrate(d)).unwrap();
        assert!(!text.contains("channels"), "{text}");
        let o = m.options(None).unwrap();
        assert_eq!((o.channels_for(false), o.channels_for(true)), (3, 3));
    }
}
