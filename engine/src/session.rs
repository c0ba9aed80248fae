//! What both ends of a migration share: the control connection, errors and the report.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use livemig_transport::seal::{Opener, Sealer, TAG_LEN};
use livemig_transport::tcp::DataReceiver;
use livemig_transport::{frame, TransportError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{Direction, SessionKeys};
use crate::protocol::{Message, ProtocolError, MAX_CONTROL_FRAME};
use crate::scheduler::SchedulerError;
use crate::vm::VmError;

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The control connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Destination address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer refused the migration.
    #[error("refused by {peer}: {reason}")]
    Refused {
        /// Peer address.
        peer: String,
        /// The peer's reason.
        reason: String,
    },
    /// The source abandoned the migration (seen by the destination).
    #[error("source aborted the migration: {0}")]
    Aborted(String),
    /// The connection a host agent handed over was a link probe (`migrate --plan`), served;
    /// nothing migrated.
    #[error("the connection was a link probe, served; nothing migrated")]
    ProbeServed,
    /// The data path failed on this side (a data channel, a receiver, RDMA rounds).
    #[error("data channel failed: {0}")]
    DataChannel(String),
    /// The peer broke the protocol.
    #[error("protocol error from {peer}: {source}")]
    Protocol {
        /// Peer address.
        peer: String,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// The peer sent a valid message at the wrong time.
    #[error("unexpected {got} from {peer} while {during}")]
    Unexpected {
        /// Peer address.
        peer: String,
        /// Message received.
        got: &'static str,
        /// What we were waiting for.
        during: &'static str,
    },
    /// A connection failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The data path failed.
    #[error(transparent)]
    DataPath(#[from] SchedulerError),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The destination's RAM does not hash to the pages sent (checked before Commit).
    #[error(
        "the destination's RAM digest {got} differs from that of the pages sent ({sent}): \
         pages were lost or altered on the way"
    )]
    DigestMismatch {
        /// Digest of the pages the source sent.
        sent: String,
        /// Digest the destination reported.
        got: String,
    },
    /// Pre-copy could not end within the downtime cap; the VM still runs on the source.
    #[error("pre-copy stopped, the VM keeps running on the source: {0}")]
    WillNotConverge(String),
    /// Cancelled before the switchover; the VM still runs on the source.
    #[error("migration cancelled; the VM keeps running on the source")]
    Cancelled,
    /// Failed between pause and commit; the source resumed the guest.
    #[error("migration failed after the guest was paused ({cause}); the guest was resumed on the source")]
    RolledBack {
        /// What failed.
        cause: String,
    },
    /// Commit was sent but not confirmed: the guest stays paused on the source.
    #[error(
        "outcome unknown — commit was sent but {cause}; the source stays paused and will not \
         resume on its own: settle it with `livemig resolve --vm SOCKET --record FILE`, FILE \
         being the destination's record {id}.json (in its --decisions folder)"
    )]
    OutcomeUnknown {
        /// What failed.
        cause: String,
        /// The migration's id, which names the destination's record of its decision.
        id: String,
    },
    /// The transport asked for cannot be used (no RDMA device, a destination without RDMA,
    /// a build without the `rdma` feature).
    #[error("{0}")]
    TransportUnavailable(String),
    /// The VM's disks cannot migrate as asked (checked before anything moves), or their
    /// handover failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A wait ran out.
    #[error("timed out after {secs} s while {during}")]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// What we waited for.
        during: &'static str,
    },
}

/// The control connection: framed [`Message`]s over TCP, decoded by the protocol version
/// agreed in the handshake.
#[derive(Debug)]
pub struct Control {
    stream: TcpStream,
    peer: String,
    version: u16,
    max_frame: u32,
    /// Hash of every frame so far, until the session is sealed.
    transcript: Option<Sha256>,
    /// A sealed session: this side's sealer and opener, and the keys they came from.
    seal: Option<(Sealer, Opener)>,
    keys: Option<SessionKeys>,
    /// A message read ahead of its time, returned by the next [`Control::recv`].
    unread: Option<Message>,
}

/// The largest frame a peer may send before it authenticated (Hello, Welcome and Auth are a
/// few dozen bytes; a Refuse carries at most a 4 KiB reason).
pub const MAX_PRE_AUTH_FRAME: u32 = 8192;

/// Reads with one absolute deadline for a whole frame: a peer trickling bytes cannot hold a
/// reader longer than the frame's deadline. Counts the bytes read, so a timeout inside a
/// frame can be told from one between frames.
struct FrameReader<'a> {
    stream: &'a TcpStream,
    deadline: Option<Instant>,
    /// Once a frame's first bytes arrived, the rest of it has this long from then (at least:
    /// the wait for a frame to begin and the frame itself are bounded separately, so a frame
    /// that begins just before the caller's deadline is not cut in two).
    body: Option<Duration>,
    read: usize,
}

impl std::io::Read for FrameReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        let n = std::io::Read::read(&mut self.stream, buf)?;
        if self.read == 0 && n > 0 {
            if let (Some(d), Some(b)) = (self.deadline, self.body) {
                self.deadline = Some(d.max(Instant::now() + b));
            }
        }
        self.read += n;
        Ok(n)
    }
}

impl Control {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Control {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into());
        let _ = stream.set_nodelay(true);
        Control {
            stream,
            peer,
            version: crate::protocol::VERSION,
            max_frame: MAX_PRE_AUTH_FRAME,
            transcript: Some(Sha256::new()),
            seal: None,
            keys: None,
            unread: None,
        }
    }

    /// The hash of every frame sent and received so far (the handshake's transcript).
    pub fn transcript(&self) -> [u8; 32] {
        self.transcript
            .clone()
            .map(|t| t.finalize().into())
            .unwrap_or_default()
    }

    /// Seals every frame from now on with the session's `keys`; this side sends `sending`.
    pub fn seal(&mut self, keys: SessionKeys, sending: Direction) {
        let receiving = match sending {
            Direction::ToDestination => Direction::ToSource,
            Direction::ToSource => Direction::ToDestination,
        };
        self.transcript = None;
        self.seal = Some((
            Sealer::new(&keys.key(0, sending)),
            Opener::new(&keys.key(0, receiving)),
        ));
        self.keys = Some(keys);
    }

    /// A sealed session's keys (for its data channels).
    pub fn keys(&self) -> Option<&SessionKeys> {
        self.keys.as_ref()
    }

    fn record(&mut self, kind: u16, payload: &[u8]) {
        if let Some(t) = self.transcript.as_mut() {
            t.update(kind.to_le_bytes());
            t.update((payload.len() as u64).to_le_bytes());
            t.update(payload);
        }
    }

    /// Accepts frames up to the protocol's cap: the peer authenticated (or, without a key,
    /// the handshake is done).
    pub fn authenticated(&mut self) {
        self.max_frame = MAX_CONTROL_FRAME;
    }

    /// Decodes the peer's messages as protocol `version` from now on.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The protocol version agreed.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The stream (to clone it for shutdown, or set timeouts).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends a message.
    pub fn send(&mut self, m: &Message) -> Result<(), MigrationError> {
        let (kind, mut payload) = m.encode();
        self.record(kind, &payload);
        if let Some((sealer, _)) = self.seal.as_mut() {
            let hdr = sealed_header(kind, payload.len() + TAG_LEN);
            let tag = sealer.seal(&hdr, &mut payload);
            payload.extend_from_slice(&tag);
        }
        frame::write_frame(&mut self.stream, kind, &payload)
            .and_then(|()| self.stream.flush())
            .map_err(|source| {
                TransportError::Io {
                    op: "sending a control message",
                    peer: self.peer.clone(),
                    source,
                }
                .into()
            })
    }

    /// Receives a message, waiting at most `timeout` (None = forever). A `Refuse` from the
    /// peer becomes [`MigrationError::Refused`], an `Abort` [`MigrationError::Aborted`].
    pub fn recv(
        &mut self,
        timeout: Option<Duration>,
        during: &'static str,
    ) -> Result<Message, MigrationError> {
        if let Some(m) = self.unread.take() {
            return Ok(m);
        }
        if timeout.is_none() {
            let _ = self.stream.set_read_timeout(None);
        }
        let mut r = FrameReader {
            stream: &self.stream,
            deadline: timeout.map(|t| Instant::now() + t),
            body: timeout,
            read: 0,
        };
        let cap = self.max_frame
            + if self.seal.is_some() {
                TAG_LEN as u32
            } else {
                0
            };
        let (kind, mut payload) = match frame::read_frame(&mut r, cap, &self.peer) {
            Ok(f) => f,
            Err(TransportError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let secs = timeout.map(|t| t.as_secs()).unwrap_or(0);
                if r.read > 0 {
                    // The stream cannot be resynchronised: fatal, not a wait to repeat.
                    return Err(TransportError::Malformed {
                        peer: self.peer.clone(),
                        reason: format!(
                            "the peer stopped after {} bytes of a frame ({secs} s while {during})",
                            r.read
                        ),
                    }
                    .into());
                }
                return Err(MigrationError::Timeout { secs, during });
            }
            Err(e) => return Err(e.into()),
        };
        if let Some((_, opener)) = self.seal.as_mut() {
            let hdr = sealed_header(kind, payload.len());
            let plain = opener.open_record(&hdr, &mut payload, &self.peer)?.len();
            payload.truncate(plain);
        }
        self.record(kind, &payload);
        match Message::decode_version(kind, &payload, self.version) {
            Ok(Message::Refuse { reason }) => Err(MigrationError::Refused {
                peer: self.peer.clone(),
                reason,
            }),
            Ok(Message::Abort { reason }) => Err(MigrationError::Aborted(reason)),
            Ok(m) => Ok(m),
            Err(source) => Err(MigrationError::Protocol {
                peer: self.peer.clone(),
                source,
            }),
        }
    }

    /// Puts `m` back: the next [`Control::recv`] returns it.
    pub fn unread(&mut self, m: Message) {
        self.unread = Some(m);
    }

    /// Whether a message was put back.
    pub fn has_unread(&self) -> bool {
        self.unread.is_some()
    }

    /// Whether the peer sent something (or closed, or the connection failed) that a read
    /// would return now, without waiting.
    pub fn has_input(&self) -> bool {
        let mut b = [0u8; 1];
        let _ = self.stream.set_nonblocking(true);
        let peeked = self.stream.peek(&mut b);
        let _ = self.stream.set_nonblocking(false);
        !matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Checks, without waiting, that the peer has neither closed the connection nor sent
    /// anything (a Refuse, say) that would make the next step wrong: the source's last look
    /// before Commit.
    pub fn check_quiet(&mut self, during: &'static str) -> Result<(), MigrationError> {
        if !self.has_input() {
            return Ok(());
        }
        let m = self.recv(Some(Duration::from_secs(1)), during)?;
        Err(self.unexpected(&m, during))
    }

    /// An [`MigrationError::Unexpected`] for `m`.
    pub fn unexpected(&self, m: &Message, during: &'static str) -> MigrationError {
        MigrationError::Unexpected {
            peer: self.peer.clone(),
            got: m.name(),
            during,
        }
    }
}

/// A data connection's ChannelHello and, in a sealed session, its first record: the
/// session token, sealed with the key of the channel it claims. Returns the channel's index
/// and its receiver when it belongs to this session.
pub fn channel_hello(
    stream: TcpStream,
    timeout: Duration,
    token: u64,
    keys: Option<&SessionKeys>,
) -> Option<(u16, DataReceiver)> {
    let _ = stream.set_read_timeout(Some(timeout.min(Duration::from_secs(10))));
    let (kind, payload) = frame::read_frame(&mut &stream, 64, "data channel").ok()?;
    let Message::ChannelHello {
        token: shown,
        index,
    } = Message::decode(kind, &payload).ok()?
    else {
        return None;
    };
    let mut rx = DataReceiver::new(stream).ok()?;
    match keys {
        None => (shown == token).then_some((index, rx)),
        Some(k) => {
            rx.open_with(Opener::new(
                &k.key(1 + u32::from(index), Direction::ToDestination),
            ));
            let mut proof = [0u8; 8];
            rx.recv_record(&mut proof).ok()?;
            (shown == 0 && u64::from_le_bytes(proof) == token).then_some((index, rx))
        }
    }
}

/// A migration's id: derived from its session token (which it does not reveal), known to
/// both sides, naming the destination's record of its decision.
pub fn migration_id(token: u64) -> String {
    format!(
        "{:016x}",
        twox_hash::XxHash3_64::oneshot(&[b"livemig id".as_slice(), &token.to_le_bytes()].concat())
    )
}

/// What a destination decided about a migration, recorded durably before it acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The guest was resumed on the destination: the source must never resume it.
    Resumed,
    /// The destination discarded its copy for good: the source may resume.
    Discarded,
    /// Written ahead, before any decision: nothing was decided yet (the destination may
    /// still resume if it is alive).
    Pending,
}

/// A destination's durable record of an [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// The migration ([`migration_id`]).
    pub migration: String,
    /// What the destination did.
    pub outcome: Outcome,
    /// When, in seconds since the Unix epoch.
    pub at: u64,
}

/// Bytes of a record file: every record is padded to this (JSON ignores trailing spaces), so
/// a decision overwrites the pending record in place, within one disk sector.
const RECORD_LEN: usize = 512;

impl OutcomeRecord {
    /// The record as file bytes: JSON padded with spaces to [`RECORD_LEN`].
    fn bytes(&self) -> std::io::Result<Vec<u8>> {
        let mut b = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        if b.len() > RECORD_LEN - 1 {
            return Err(std::io::Error::other(
                "a decision record longer than 511 bytes",
            ));
        }
        b.resize(RECORD_LEN - 1, b' ');
        b.push(b'\n');
        Ok(b)
    }

    /// Creates `dir/ID.json` holding a [`Outcome::Pending`] record for `migration`, durable
    /// (file and folder synced), ahead of any decision: recording the decision later is one
    /// in-place write and a data sync ([`RecordSlot::decide`]), not a new file in the
    /// downtime.
    pub fn prepare(dir: &std::path::Path, migration: &str) -> std::io::Result<RecordSlot> {
        use std::io::Write as _;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{migration}.json"));
        let tmp = dir.join(format!(".{migration}.json.tmp"));
        let pending = OutcomeRecord {
            migration: migration.to_string(),
            outcome: Outcome::Pending,
            at: unix_now(),
        };
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&pending.bytes()?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(RecordSlot {
            file: f,
            path,
            decided: false,
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A decision record written ahead as pending ([`OutcomeRecord::prepare`]). Dropped without a
/// decision (the migration failed before the source could send Commit), it is removed.
#[derive(Debug)]
pub struct RecordSlot {
    file: std::fs::File,
    path: std::path::PathBuf,
    decided: bool,
}

impl RecordSlot {
    /// Records `outcome` in place and makes it durable (data sync) before returning: only
    /// then may the destination act on it.
    pub fn decide(&mut self, outcome: Outcome) -> std::io::Result<&std::path::Path> {
        use std::os::unix::fs::FileExt as _;
        let migration = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let record = OutcomeRecord {
            migration,
            outcome,
            at: unix_now(),
        };
        self.file.write_all_at(&record.bytes()?, 0)?;
        self.file.sync_data()?;
        self.decided = true;
        Ok(&self.path)
    }
}

impl Drop for RecordSlot {
    fn drop(&mut self) {
        if !self.decided {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The clear header of a sealed control frame, bound to its record as associated data.
fn sealed_header(kind: u16, len: usize) -> [u8; frame::HEADER_LEN] {
    let mut h = [0u8; frame::HEADER_LEN];
    h[..2].copy_from_slice(&kind.to_le_bytes());
    h[4..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// One pre-copy or stop-and-copy round, as reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number (0 = full RAM).
    pub round: u64,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Milliseconds spent sending.
    pub ms: f64,
    /// Pages dirtied while the round ran.
    pub dirtied_pages: u64,
    /// Dirty rate in pages per second.
    pub dirty_rate: f64,
    /// Bandwidth estimate after this round, bytes per second.
    pub bandwidth: f64,
    /// Predicted downtime for stopping now, milliseconds.
    pub predicted_downtime_ms: f64,
    /// Whether this was the stop-and-copy round.
    pub stop_and_copy: bool,
    /// Of the pages, disk blocks (storage copies).
    #[serde(default)]
    pub disk_pages: u64,
    /// Auto-converge: percent of vCPU time taken from the guest during the round.
    #[serde(default)]
    pub throttle_pct: u8,
    /// Pages of the round not sent in it because the guest wrote them again before their
    /// turn: the next round sends them.
    #[serde(default)]
    pub redirtied_left: u64,
    /// What is left after this round, predicted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<crate::convergence::Eta>,
}

/// The summary of a migration, as printed by `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    /// `completed`, or `digest-mismatch`.
    pub status: String,
    /// From the migrate command to the guest running on the destination.
    pub total_time_ms: f64,
    /// From pausing on the source to the destination confirming resume.
    pub downtime_ms: f64,
    /// Connect, handshake, destination VM and RAM set-up.
    pub setup_ms: f64,
    /// Rounds, the stop-and-copy round included.
    pub rounds: u64,
    /// Pages sent in all rounds.
    pub pages_sent: u64,
    /// Bytes sent on data and control connections.
    pub bytes_on_wire: u64,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// `ram_bytes / total_time`, GB/s.
    pub effective_gbps: f64,
    /// Source digest at pause equals destination digest before resume.
    pub digest_match: bool,
    /// Digest of source RAM at pause.
    pub source_digest: String,
    /// Digest of destination RAM before resume.
    pub destination_digest: String,
    /// Time to compute the source digest (after the switchover, outside the downtime).
    pub verify_ms: f64,
    /// CPU seconds that pass took (outside `source_cpu_s`).
    #[serde(default)]
    pub verify_cpu_s: f64,
    /// Guest counter movement on the destination after resume.
    pub guest_progress_after_resume: u64,
    /// Transport used: `tcp` or `rdma`.
    pub transport: String,
    /// How the transport was chosen and what it runs on (device, GIDs, why `auto` chose it).
    pub transport_detail: String,
    /// What the session encrypted: `aes-256-gcm` (control and data), `control only` (RDMA:
    /// pages travel in clear) or `off`.
    #[serde(default)]
    pub encryption: String,
    /// Data channels.
    pub channels: u16,
    /// Page bytes copied through intermediate buffers on the source (pages compressed or
    /// delta-encoded are snapshotted first; raw pages move from and into guest RAM in place).
    pub bytes_copied_staging: u64,
    /// Page encoding mode.
    pub compress: String,
    /// What the encoders did.
    pub codec: CodecReport,
    /// CPU seconds of the source's migration threads (scheduler and channel workers).
    pub source_cpu_s: f64,
    /// CPU seconds of the destination's receivers.
    pub destination_cpu_s: f64,
    /// Per round.
    pub round_details: Vec<RoundReport>,
    /// Disk figures, when the VM has disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::storage::StorageReport>,
    /// Per RDMA rail, when there were several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rails: Vec<RailReport>,
    /// Where the downtime went, step by step, as the source saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_detail: Option<DowntimeDetail>,
    /// The wait before the pause for the last pre-copy round to reach the destination.
    #[serde(default)]
    pub drain: DrainReport,
}

/// Before the pause, the source waits until the last pre-copy round reached the destination,
/// so that the downtime does not spend that while the guest could still run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DrainReport {
    /// How long the source waited, ms (not part of the downtime).
    pub ms: f64,
    /// The round the destination confirmed was all in its RAM (TCP with
    /// [`crate::protocol::FEATURE_LANDED`]); none where it was not asked (RDMA writes land in
    /// place, an older destination cannot answer) or where it was still landing after a
    /// second.
    pub landed_round: Option<u64>,
}

/// The downtime's steps, in milliseconds, in the order they happen; they add up to
/// [`MigrationReport::downtime_ms`] (the rest, bookkeeping between them, is `other_ms`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DowntimeDetail {
    /// Stopping the vCPUs and quiescing the devices (in-flight I/O completes).
    pub pause_ms: f64,
    /// Saving vCPU, interrupt controller, clock and device state.
    pub save_state_ms: f64,
    /// The last dirty-log harvest (RAM and disks).
    pub harvest_ms: f64,
    /// Sending the last dirty pages (and disk blocks) until every channel confirmed them.
    pub final_pages_ms: f64,
    /// Disks: their digests sent (copy), or flushed and their locks released (shared).
    #[serde(default)]
    pub storage_ms: f64,
    /// From the device state sent to Prepared: the destination lands the last pages,
    /// checks and restores the state, computes its digest.
    pub prepare_ms: f64,
    /// From Commit to the destination's word that the guest runs there.
    pub resume_ms: f64,
    /// The rest: messages and checks between those steps.
    pub other_ms: f64,
}

/// What one RDMA rail (a local device and its queue pairs) carried.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RailReport {
    /// Local RDMA device.
    pub device: String,
    /// GID of the destination's device this rail writes to.
    pub destination_gid: String,
    /// Queue pairs on this rail.
    pub queue_pairs: u16,
    /// Bytes written through it (counted at round barriers).
    pub bytes: u64,
    /// Why it was dropped during the migration (its writes went on the other rails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Per-codec counters of a migration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CodecReport {
    /// Pages sent raw.
    pub pages_raw: u64,
    /// Pages sent as zero markers.
    pub pages_zero: u64,
    /// Pages sent LZ4-compressed.
    pub pages_lz4: u64,
    /// Pages sent zstd-compressed.
    pub pages_zstd: u64,
    /// Pages sent as deltas.
    pub pages_delta: u64,
    /// Pages sent as their runs of data alone: never sent before (the destination's copy
    /// zero) and holding a few short runs of data — an RDMA write per run, or over TCP
    /// (`auto`, `delta`) a delta against zero.
    #[serde(default)]
    pub pages_sparse: u64,
    /// Bytes of non-zero pages before encoding.
    pub bytes_before: u64,
    /// Their bytes after encoding.
    pub bytes_after: u64,
    /// `bytes_before / bytes_after` (1 = no gain).
    pub compression_ratio: f64,
}

impl From<&livemig_transport::codec::CodecStats> for CodecReport {
    fn from(c: &livemig_transport::codec::CodecStats) -> Self {
        CodecReport {
            pages_raw: c.pages_raw,
            pages_zero: c.pages_zero,
            pages_lz4: c.pages_lz4,
            pages_zstd: c.pages_zstd,
            pages_delta: c.pages_delta,
            pages_sparse: c.pages_sparse,
            bytes_before: c.bytes_in,
            bytes_after: c.bytes_out,
            compression_ratio: if c.bytes_out == 0 {
                1.0
            } else {
                c.bytes_in as f64 / c.bytes_out as f64
            },
        }
    }
}

/// A random 64-bit value from the kernel.
pub fn random_u64() -> u64 {
    let mut v = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into `v`, which is valid for 8 bytes.
    let n = unsafe { libc::getrandom((&raw mut v).cast(), 8, 0) };
    if n != 8 {
        // getrandom cannot fail for 8 bytes once the pool is ready; fall back to time-based
        // bits rather than a fixed token.
        v = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (Control, Control) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (Control::new(a), Control::new(l.accept().unwrap().0))
    }

    /// The source's last look before Commit: quiet goes on; a Refuse or a closed connection
    /// stops it (the guest then resumes on the source).
    #[test]
    fn the_last_look_before_commit_sees_a_refusal_or_a_closed_peer() {
        let (mut src, mut dst) = pair();
        assert!(src.check_quiet("test").is_ok());
        dst.send(&Message::Refuse {
            reason: "changed my mind".into(),
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(
            src.check_quiet("test"),
            Err(MigrationError::Refused { reason, .. }) if reason == "changed my mind"
        ));
        drop(dst);
        std::thread::sleep(Duration::from_millis(50));
        assert!(src.check_quiet("test").is_err());
    }

    /// A sealed pair talks; a frame altered on the way fails to open; the message put back
    /// is read first.
    #[test]
    fn decision_records_are_written_ahead_and_decided_in_place() {
        let dir = std::env::temp_dir().join(format!("livemig-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let read = |p: &std::path::Path| -> OutcomeRecord {
            serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
        };
        let mut slot = OutcomeRecord::prepare(&dir, "00000000000000aa").unwrap();
        let path = dir.join("00000000000000aa.json");
        assert_eq!(read(&path).outcome, Outcome::Pending);
        slot.decide(Outcome::Resumed).unwrap();
        let r = read(&path);
        assert_eq!(
            (r.migration.as_str(), r.outcome),
            ("00000000000000aa", Outcome::Resumed)
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RECORD_LEN as u64);
        drop(slot);
        assert!(path.exists(), "a decided record stays");
        // Undecided (the migration failed before Commit): the pending record goes.
        let slot = OutcomeRecord::prepare(&dir, "00000000000000bb").unwrap();
        drop(slot);
        assert!(!dir.join("00000000000000bb.json").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A frame that begins just before the wait's deadline gets its own time to arrive (in CI
    /// a device-state frame straddled a 60 s wait and was cut in two); a frame that stops
    /// half-way is still an error, bounded.
    #[test]
    fn a_frame_straddling_the_deadline_is_read_and_a_stalled_one_is_an_error() {
        let (src, mut dst) = pair();
        let (k, p) = Message::Abort {
            reason: "x".repeat(100),
        }
        .encode();
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, k, &p).unwrap();
        let (head, rest) = bytes.split_at(8);
        let writer = src.stream.try_clone().unwrap();
        let (head, rest) = (head.to_vec(), rest.to_vec());
        let t = std::thread::spawn(move || {
            let mut w = &writer;
            std::thread::sleep(Duration::from_millis(300));
            w.write_all(&head).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            w.write_all(&rest).unwrap();
            // Then a frame whose body never comes.
            w.write_all(&head).unwrap();
        });
        // The header comes at 300 ms, within the 400 ms wait; the body at 600 ms, after it.
        match dst.recv(Some(Duration::from_millis(400)), "t") {
            Err(MigrationError::Aborted(r)) => assert_eq!(r.len(), 100),
            other => panic!("the straddling frame was not read: {other:?}"),
        }
        t.join().unwrap();
        let e = dst.recv(Some(Duration::from_millis(400)), "t").unwrap_err();
        assert!(e.to_string().contains("stopped after 8 bytes"), "{e}");
    }

    #[test]
    fn sealed_control_frames_open_only_unaltered() {
        let (mut src, mut dst) = pair();
        let key = crate::auth::Key::new(crate::auth::Key::generate().as_bytes()).unwrap();
        let keys = key.session_keys(&[1; 32], &[2; 32], &src.transcript());
        src.seal(keys.clone(), Direction::ToDestination);
        dst.seal(keys, Direction::ToSource);
        src.send(&Message::Commit).unwrap();
        assert_eq!(
            dst.recv(Some(Duration::from_secs(5)), "t").unwrap(),
            Message::Commit
        );
        dst.unread(Message::Ready);
        assert_eq!(
            dst.recv(Some(Duration::from_secs(5)), "t").unwrap(),
            Message::Ready
        );
        dst.send(&Message::Resumed).unwrap();
        assert_eq!(
            src.recv(Some(Duration::from_secs(5)), "t").unwrap(),
            Message::Resumed
        );
        // A frame in clear on a sealed connection.
        let (k, p) = Message::Commit.encode();
        frame::write_frame(&mut &src.stream, k, &p).unwrap();
        let refused = dst.recv(Some(Duration::from_secs(5)), "t").unwrap_err();
        assert!(refused.to_string().contains("has no tag"), "{refused}");
    }
}
