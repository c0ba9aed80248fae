//! The migration wire protocol: message types, framing rules, versions.
//!
//! One TCP control connection carries the exchange below; `channels` TCP data connections
//! carry pages (see `livemig_transport::tcp`), each opened with a [`Message::ChannelHello`]
//! bound to the session token — or, when both sides agreed on [`FEATURE_RDMA`], `channels`
//! RDMA queue pairs write pages straight into destination RAM (see `livemig_transport::rdma`)
//! and no data connection is opened.
//!
//! ```text
//! source                                   destination
//!   | Hello {versions, features, nonce} -------> |  refuses newer-only streams (Refuse)
//!   | <------- Welcome {version, nonce, proof}   |
//!   | Auth {proof} ---------------------------> |  checks the key (see `crate::auth`)
//!   |   -- sealed sessions (FEATURE_SEALED in Hello and Welcome): from here on every
//!   |   control frame's payload is an AES-256-GCM record under its clear header, and
//!   |   each data connection after its ChannelHello {token 0, i} proves the session
//!   |   with a sealed record holding the token, then sends only sealed records --
//!   | Config {VM shape: machine, RAM layout,    |
//!   |   vCPUs, devices; machine section;        |
//!   |   channels, token} ---------------------> |  builds the VM skeleton, allocates RAM
//!   | Storage {mode, directory, disks} -------> |  (protocol 2) shared: opens the images
//!   |                                           |  unlocked; copy: checks space and names,
//!   |                                           |  creates unnamed sparse images
//!   | <----------------------- DataPort {port}   |  (protocol 3) behind a host agent: the
//!   |                                           |  data connections go to this port
//!   | <------------------------------- Ready     |
//!   | N data connections: ChannelHello{token,i} |
//!   | data: round 0 pages ... Marker(0)          |  receivers meet at a barrier per round
//!   | data: round k pages ... Marker(k)          |
//!   | AwaitLanded {k} ------------------------> |  (FEATURE_LANDED) once round k's pages
//!   | <-------------------------- Landed {k}     |  are in RAM (at most 1 s later)
//!   |   (source pauses the guest)                |
//!   | data: final round pages ... Marker(n)      |
//!   |   -- or, with RDMA (FEATURE_RDMA in Hello and Welcome) --
//!   | RdmaConnect {N QPs: qpn, psn, gid} ------> |  registers RAM for remote writes,
//!   | <---- RdmaAccept {N QPs, rkey per region}  |  connects N QPs to the source's
//!   |   (FEATURE_RAILS: one RdmaAccept per rail, the source's QPs grouped by GID)
//!   | RDMA WRITEs of round k (destination CPU idle); when all completed:
//!   | RoundExtents {k, [gpa, pages]...} -------> |  (protocol 3) hashed in the background
//!   | RoundProgress {k, pages, complete} ------> |  (also sent while a long round runs)
//!   |   (source pauses the guest; final round n the same way)
//!   | DiskDigests {per disk} ------------------> |  (protocol 2) copy: checked before Prepared
//!   | DeviceState {final_round, sections} -----> |  RDMA: revokes the source's access
//!   |   -- both --                               |  waits for round n, restores state;
//!   |                                           |  shared storage: takes the image locks
//!   | <--------------------- Prepared {digest}   |
//!   | Commit -------------------------------->   |  resumes the guest
//!   | <------------------------------- Resumed   |
//!   | <----------------------- Progress {delta}  |
//! Abort {reason} may be sent by the source at any point before Commit: the destination
//! discards its copy. Refuse {reason} may be sent by the destination instead of any reply.
//! ```
//!
//! # Framing
//!
//! Every message is one frame (`livemig_transport::frame`) whose kind is its [`MessageType`];
//! payloads are little-endian, fixed-width fields. Decoding never panics and checks every
//! count and length against a cap before allocating.
//!
//! # Versions
//!
//! The source offers `[min, max]`; the destination picks the highest version it implements
//! within that range. A stream whose *minimum* is newer than the destination's newest version
//! is refused up front with a message naming both: older sources may migrate to newer
//! destinations, never the reverse.
//!
//! | version | what changed |
//! |---|---|
//! | 1 | first release: `Config` carried the built-in guest's workload |
//! | 2 | `Config` carries the VM's shape (RAM layout, vCPUs, device list) and an opaque, versioned machine section owned by the VM backend; `Storage` and `DiskDigests` move disks (storage channel: one more data connection, index `channels`) |
//! | 3 | the KVM machine's section (its version 3) wraps the older one with the processor the guest was given (CPU model and CPUID table); the destination refuses another vendor or a missing feature before it builds anything, and gives the guest that CPUID. Over RDMA, `RoundExtents` lists each round's written pages before its completing `RoundProgress`: the destination hashes them in the background instead of hashing all RAM in the downtime. A destination started by a host agent names the port of its data connections with `DataPort` before Ready |
//!
//! A destination decodes each message by the version agreed in the handshake; a version-1
//! `Config` is converted on load (its workload fields are the built-in machine's section,
//! version 1). Device state travels as versioned sections ([`crate::vm::DeviceSection`]),
//! each upgraded by the device that owns it.
//!
//! The module's rooms: [`messages`] (the [`Message`] enum, encoding and decoding),
//! [`config`] (the VM configuration of `Config`), and the byte-level reader and writer here.

pub mod config;
pub mod messages;

pub use config::encode_config;
pub use messages::{Message, RdmaQp, RdmaRegion};

use crate::defaults;

/// "LVMG" little-endian: first bytes of a Hello.
pub const MAGIC: u32 = 0x474d_564c;
/// Protocol version this build speaks (newest); a source offers only this one.
pub const VERSION: u16 = 3;
/// Oldest protocol version a destination of this build still accepts.
pub const MIN_VERSION: u16 = 1;
/// Cap on a control frame (device state of many vCPUs fits well below).
pub const MAX_CONTROL_FRAME: u32 = 16 << 20;
/// Cap on device-state sections in one message.
pub const MAX_SECTIONS: usize = 4096;
/// Cap on one section's bytes.
pub const MAX_SECTION_BYTES: usize = 1 << 20;
/// Cap on a reason or name string.
pub const MAX_REASON: usize = 4096;
/// Cap on data channels.
pub const MAX_CHANNELS: u16 = defaults::MAX_CHANNELS;
/// Cap on vCPUs.
pub const MAX_VCPUS: u32 = defaults::MAX_VCPUS;
/// Cap on devices in a VM configuration.
pub const MAX_DEVICES: usize = 64;
/// Cap on properties of one device.
pub const MAX_PROPERTIES: usize = 32;
/// Cap on disks in a Storage message.
pub const MAX_DISKS: usize = crate::storage::MAX_DISKS;
/// Cap on the machine section of a VM configuration.
pub const MAX_MACHINE_SECTION: usize = 64 << 10;
/// Most extents in one [`Message::RoundExtents`] (16 bytes each: 1 MiB).
pub const MAX_ROUND_EXTENTS: usize = 1 << 16;
/// Feature bit: the source offers (Hello) / the destination accepts (Welcome) RDMA data
/// channels.
pub const FEATURE_RDMA: u64 = 1;
/// Feature bit: the source offers (Hello) / the destination agrees (Welcome) to seal the
/// session: every control frame after Auth and every TCP data channel is encrypted and
/// authenticated (see [`crate::auth`]). A side that wants it refuses a peer that does not.
pub const FEATURE_SEALED: u64 = 2;
/// Feature bit: the source offers (Hello) / the destination agrees (Welcome) that every TCP
/// round marker says how many pages its channel sent in the round; the destination checks
/// them all arrived before the round's barrier passes.
pub const FEATURE_ROUND_COUNTS: u64 = 4;
/// Feature bit: the destination serves link probes (`Probe` instead of `Config`: a stream of
/// `ProbeData` answered by `ProbeResult`; nothing migrates and the destination keeps waiting).
pub const FEATURE_PROBE: u64 = 8;
/// Feature bit: the source offers (Hello) / the destination agrees (Welcome) to RDMA over
/// several rails: `RdmaConnect` lists the queue pairs of every rail (each rail's QPs share its
/// GID, rails in order) and the destination answers one `RdmaAccept` per rail, in that order,
/// each with the regions of the registration that rail writes into.
pub const FEATURE_RAILS: u64 = 16;
/// Feature bit: the source offers (Hello) / the destination agrees (Welcome) to answer
/// `AwaitLanded {round}` with `Landed {round}` once every page of that TCP round is in its RAM
/// (decoded and written, not only acknowledged by its kernel), at most a second later: the
/// source asks before it pauses the guest, so the downtime does not wait for the destination
/// to work through what its socket buffers held.
pub const FEATURE_LANDED: u64 = 32;
/// Most bytes one probe may send.
pub const MAX_PROBE_BYTES: u64 = 1 << 30;
/// Most bytes of one `ProbeData` frame.
pub const MAX_PROBE_CHUNK: usize = 1 << 20;
/// Largest RDMA queue pair number or packet sequence number (24 bits).
pub const MAX_QPN: u32 = 0x00ff_ffff;

/// The type of a control message: the kind of its frame. Zero is reserved as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    /// Never sent: a zero kind is refused by the framing layer.
    Invalid = 0,
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Welcome`].
    Welcome = 2,
    /// [`Message::Refuse`].
    Refuse = 3,
    /// [`Message::Config`].
    Config = 4,
    /// [`Message::Ready`].
    Ready = 5,
    /// [`Message::ChannelHello`].
    ChannelHello = 6,
    /// [`Message::DeviceState`].
    DeviceState = 7,
    /// [`Message::Prepared`].
    Prepared = 8,
    /// [`Message::Commit`].
    Commit = 9,
    /// [`Message::Resumed`].
    Resumed = 10,
    /// [`Message::Progress`].
    Progress = 11,
    /// [`Message::Abort`].
    Abort = 12,
    /// [`Message::Auth`].
    Auth = 13,
    /// [`Message::RdmaConnect`].
    RdmaConnect = 14,
    /// [`Message::RdmaAccept`].
    RdmaAccept = 15,
    /// [`Message::RoundProgress`].
    RoundProgress = 16,
    /// [`Message::Storage`].
    Storage = 17,
    /// [`Message::DiskDigests`].
    DiskDigests = 18,
    /// [`Message::Probe`].
    Probe = 19,
    /// [`Message::ProbeData`].
    ProbeData = 20,
    /// [`Message::ProbeResult`].
    ProbeResult = 21,
    /// [`Message::RoundExtents`].
    RoundExtents = 22,
    /// [`Message::DataPort`].
    DataPort = 23,
    /// [`Message::AwaitLanded`].
    AwaitLanded = 24,
    /// [`Message::Landed`].
    Landed = 25,
}

impl MessageType {
    /// Every valid type, in wire order.
    pub const ALL: [MessageType; 25] = [
        MessageType::Hello,
        MessageType::Welcome,
        MessageType::Refuse,
        MessageType::Config,
        MessageType::Ready,
        MessageType::ChannelHello,
        MessageType::DeviceState,
        MessageType::Prepared,
        MessageType::Commit,
        MessageType::Resumed,
        MessageType::Progress,
        MessageType::Abort,
        MessageType::Auth,
        MessageType::RdmaConnect,
        MessageType::RdmaAccept,
        MessageType::RoundProgress,
        MessageType::Storage,
        MessageType::DiskDigests,
        MessageType::Probe,
        MessageType::ProbeData,
        MessageType::ProbeResult,
        MessageType::RoundExtents,
        MessageType::DataPort,
        MessageType::AwaitLanded,
        MessageType::Landed,
    ];

    /// The frame kind.
    pub fn kind(self) -> u16 {
        self as u16
    }

    /// The type's name.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Invalid => "Invalid",
            MessageType::Hello => "Hello",
            MessageType::Welcome => "Welcome",
            MessageType::Refuse => "Refuse",
            MessageType::Config => "Config",
            MessageType::Ready => "Ready",
            MessageType::ChannelHello => "ChannelHello",
            MessageType::DeviceState => "DeviceState",
            MessageType::Prepared => "Prepared",
            MessageType::Commit => "Commit",
            MessageType::Resumed => "Resumed",
            MessageType::Progress => "Progress",
            MessageType::Abort => "Abort",
            MessageType::Auth => "Auth",
            MessageType::RdmaConnect => "RdmaConnect",
            MessageType::RdmaAccept => "RdmaAccept",
            MessageType::RoundProgress => "RoundProgress",
            MessageType::Storage => "Storage",
            MessageType::DiskDigests => "DiskDigests",
            MessageType::Probe => "Probe",
            MessageType::ProbeData => "ProbeData",
            MessageType::ProbeResult => "ProbeResult",
            MessageType::RoundExtents => "RoundExtents",
            MessageType::DataPort => "DataPort",
            MessageType::AwaitLanded => "AwaitLanded",
            MessageType::Landed => "Landed",
        }
    }
}

impl TryFrom<u16> for MessageType {
    type Error = ProtocolError;

    /// Any valid type; `0` and unknown kinds are [`ProtocolError::UnknownType`].
    fn try_from(kind: u16) -> Result<MessageType, ProtocolError> {
        MessageType::ALL
            .iter()
            .copied()
            .find(|t| t.kind() == kind)
            .ok_or(ProtocolError::UnknownType(kind))
    }
}

/// Errors decoding a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The message ended early.
    #[error("{msg} message truncated: needed {needed} more bytes")]
    Truncated {
        /// Message type name.
        msg: &'static str,
        /// Missing bytes.
        needed: usize,
    },
    /// Bytes left after the message.
    #[error("{msg} message has {extra} trailing bytes")]
    Trailing {
        /// Message type name.
        msg: &'static str,
        /// Extra bytes.
        extra: usize,
    },
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u16),
    /// A field is out of range.
    #[error("{msg}: {reason}")]
    Invalid {
        /// Message type name.
        msg: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Not a livemig stream.
    #[error("not a livemig migration stream (bad magic {0:#010x})")]
    BadMagic(u32),
    /// A version this build does not decode.
    #[error("protocol version {0} is not supported here ({MIN_VERSION}..={VERSION})")]
    Version(u16),
}

/// What a destination answers to a Hello offering `[min, max]`: the version to use, or the
/// reason to refuse (naming both sides' versions).
pub fn negotiate(min_version: u16, max_version: u16) -> Result<u16, String> {
    if min_version > VERSION {
        return Err(format!(
            "the source speaks migration protocol {min_version}..={max_version}, newer than this \
             destination (livemig {}, protocol {MIN_VERSION}..={VERSION}): migrating from a newer \
             livemig to an older one is not supported; upgrade the destination",
            env!("CARGO_PKG_VERSION")
        ));
    }
    if max_version < MIN_VERSION {
        return Err(format!(
            "the source speaks protocol {min_version}..={max_version}, older than this \
             destination still accepts ({MIN_VERSION}..={VERSION})"
        ));
    }
    Ok(max_version.min(VERSION))
}

pub(crate) fn put_u16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

/// A length-prefixed UTF-8 string, cut at [`MAX_REASON`] bytes on a char boundary.
pub(crate) fn put_str(w: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_REASON)];
    // Cut on a char boundary so the receiver gets valid UTF-8.
    let b = match std::str::from_utf8(b) {
        Ok(_) => b,
        Err(e) => &b[..e.valid_up_to()],
    };
    put_u32(w, b.len() as u32);
    w.extend_from_slice(b);
}

/// The count of a queue-pair list.
pub(crate) fn put_qps_header(w: &mut Vec<u8>, n: usize) {
    put_u16(w, n as u16);
}

/// A length-prefixed byte string.
pub(crate) fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len() as u32);
    w.extend_from_slice(b);
}

/// Reads fields of one message, each checked against what is left.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) msg: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], msg: &'static str) -> Self {
        Reader { buf, msg }
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated {
                msg: self.msg,
                needed: n - self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A string of at most [`MAX_REASON`] bytes (invalid UTF-8 replaced).
    pub(crate) fn string(&mut self) -> Result<String, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_REASON {
            return Err(self.invalid(format!("string of {n} bytes (at most {MAX_REASON})")));
        }
        let b = self.bytes(n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }
    /// A byte string of at most `cap` bytes.
    pub(crate) fn byte_string(&mut self, cap: usize) -> Result<Vec<u8>, ProtocolError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(self.invalid(format!("{n} bytes (at most {cap})")));
        }
        Ok(self.bytes(n)?.to_vec())
    }
    pub(crate) fn invalid(&self, reason: String) -> ProtocolError {
        ProtocolError::Invalid {
            msg: self.msg,
            reason,
        }
    }
    pub(crate) fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Trailing {
                msg: self.msg,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_types_round_trip_and_zero_is_invalid() {
        for t in MessageType::ALL {
            assert_eq!(MessageType::try_from(t.kind()), Ok(t));
            assert_ne!(t.kind(), 0);
        }
        assert_eq!(MessageType::try_from(0), Err(ProtocolError::UnknownType(0)));
        assert_eq!(
            MessageType::try_from(26),
            Err(ProtocolError::UnknownType(26))
        );
    }

    #[test]
    fn newer_streams_are_refused_naming_both_versions() {
        assert_eq!(negotiate(1, 1), Ok(1));
        assert_eq!(negotiate(1, 7), Ok(VERSION));
        assert_eq!(negotiate(VERSION, VERSION), Ok(VERSION));
        let err = negotiate(VERSION + 1, VERSION + 2).unwrap_err();
        assert!(err.contains("newer"), "{err}");
        assert!(
            err.contains(&format!("{}..={}", VERSION + 1, VERSION + 2)),
            "{err}"
        );
        assert!(err.contains(&format!("{MIN_VERSION}..={VERSION}")), "{err}");
    }
}

/// The rounds an RDMA source reports with [`Message::RoundProgress`]: they complete one after
/// another from round 0, each once; the pages they report add up (saturating: the count is
/// a sign of life, never an allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundSequence {
    completed: Option<u64>,
    pages: u64,
}

impl RoundSequence {
    /// The source reports `pages` of `round`, which is `complete` or still running; a round
    /// out of sequence is an error that names both.
    pub fn progress(&mut self, round: u64, pages: u64, complete: bool) -> Result<(), String> {
        let next = self.completed.map_or(Some(0), |c| c.checked_add(1));
        if Some(round) != next {
            return Err(match next {
                Some(n) => format!("round {round} while round {n} is under way"),
                None => format!("round {round} after the last possible round"),
            });
        }
        if complete {
            self.completed = Some(round);
            self.pages = self.pages.saturating_add(pages);
        }
        Ok(())
    }

    /// The last round completed, if any.
    pub fn completed(&self) -> Option<u64> {
        self.completed
    }

    /// Pages of the completed rounds.
    pub fn pages(&self) -> u64 {
        self.pages
    }
}
