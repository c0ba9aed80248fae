//! The migration wire protocol: control messages, their encoding and the version rule.
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
//!   | Config {machine, spec, layout, channels,  |
//!   |         token} -------------------------> |  builds the VM skeleton, allocates RAM
//!   | <------------------------------- Ready     |
//!   | N data connections: ChannelHello{token,i} |
//!   | data: round 0 pages ... Marker(0)          |  receivers meet at a barrier per round
//!   | data: round k pages ... Marker(k)          |
//!   |   (source pauses the guest)                |
//!   | data: final round pages ... Marker(n)      |
//!   |   -- or, with RDMA (FEATURE_RDMA in Hello and Welcome) --
//!   | RdmaConnect {N QPs: qpn, psn, gid} ------> |  registers RAM for remote writes,
//!   | <---- RdmaAccept {N QPs, rkey per region}  |  connects N QPs to the source's
//!   | RDMA WRITEs of round k (destination CPU idle); when all completed:
//!   | RoundProgress {k, pages, complete} ------> |  (also sent while a long round runs)
//!   |   (source pauses the guest; final round n the same way)
//!   | DeviceState {final_round, sections} -----> |  RDMA: revokes the source's access
//!   |   -- both --                               |  waits for round n, restores state
//!   | <--------------------- Prepared {digest}   |
//!   | Commit -------------------------------->   |  resumes the guest
//!   | <------------------------------- Resumed   |
//!   | <----------------------- Progress {delta}  |
//! Abort {reason} may be sent by the source at any point before Commit: the destination
//! discards its copy. Refuse {reason} may be sent by the destination instead of any reply.
//! ```
//!
//! Encoding: every message is one frame (`livemig_transport::frame`) whose kind is the message
//! type; payloads are little-endian, fixed-width fields. Decoding never panics and checks every
//! count and length against a cap before allocating.
//!
//! Versions: the source offers `[min, max]`; the destination picks the highest version it
//! implements within that range. A stream whose *minimum* is newer than the destination's
//! newest version is refused with a message that says so: older sources may migrate to newer
//! destinations, never the reverse.

use crate::memory::{RamLayout, RamRegionSpec, MAX_REGIONS, PAGE_SIZE};
use crate::vm::{DeviceSection, Fill, Pattern, VmSpec, Workload};

/// "LVMG" little-endian: first bytes of a Hello.
pub const MAGIC: u32 = 0x474d_564c;
/// Protocol version this build speaks (newest).
pub const VERSION: u16 = 1;
/// Oldest protocol version this build still accepts.
pub const MIN_VERSION: u16 = 1;
/// Cap on a control frame (device state of many vCPUs fits well below).
pub const MAX_CONTROL_FRAME: u32 = 16 << 20;
/// Cap on device-state sections in one message.
pub const MAX_SECTIONS: usize = 4096;
/// Cap on one section's bytes.
pub const MAX_SECTION_BYTES: usize = 1 << 20;
/// Cap on a reason string.
pub const MAX_REASON: usize = 4096;
/// Cap on data channels.
pub const MAX_CHANNELS: u16 = 64;
/// Cap on vCPUs.
pub const MAX_VCPUS: u32 = 256;
/// Feature bit: the source offers (Hello) / the destination accepts (Welcome) RDMA data
/// channels.
pub const FEATURE_RDMA: u64 = 1;
/// Largest RDMA queue pair number or packet sequence number (24 bits).
pub const MAX_QPN: u32 = 0x00ff_ffff;

/// Connection parameters of one RDMA queue pair (reliable connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaQp {
    /// QP number (1..=[`MAX_QPN`]).
    pub qpn: u32,
    /// First packet sequence number (at most [`MAX_QPN`]).
    pub psn: u32,
    /// GID of the port (IPv6 form; IPv4-mapped on RoCE v2 over IPv4).
    pub gid: [u8; 16],
    /// LID of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU code of the port: 1 = 256 bytes ... 5 = 4096 bytes.
    pub mtu: u8,
}

/// A region of destination RAM the source may write with RDMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaRegion {
    /// Guest-physical start (page aligned).
    pub gpa: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
    /// Address of `gpa` in the destination's registration.
    pub addr: u64,
    /// Remote key.
    pub rkey: u32,
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
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source → destination: protocol versions and features offered.
    Hello {
        /// Oldest version the source can speak.
        min_version: u16,
        /// Newest version the source can speak.
        max_version: u16,
        /// Feature bits.
        features: u64,
        /// The source's challenge.
        nonce: [u8; 32],
    },
    /// Destination → source: the chosen version and the destination's key proof.
    Welcome {
        /// Version both sides use.
        version: u16,
        /// Feature bits accepted.
        features: u64,
        /// The destination's challenge.
        nonce: [u8; 32],
        /// HMAC proof of the key (zero without a key).
        proof: [u8; 32],
    },
    /// Source → destination: the source's key proof.
    Auth {
        /// HMAC proof of the key (zero without a key).
        proof: [u8; 32],
    },
    /// Either side: refusal with a reason; the connection closes after it.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Source → destination: what to build.
    Config {
        /// Which VMM runs the VM.
        machine: String,
        /// VM spec.
        spec: VmSpec,
        /// RAM layout; every page address later received is checked against it.
        layout: RamLayout,
        /// Number of data channels the source will open.
        channels: u16,
        /// Session token the data channels present.
        token: u64,
    },
    /// Destination → source: skeleton built, RAM allocated, data channels may connect.
    Ready,
    /// First message on a data channel.
    ChannelHello {
        /// Session token from Config.
        token: u64,
        /// Channel index, `0..channels`.
        index: u16,
    },
    /// Source → destination: the guest is paused; `final_round` is the last round of pages.
    DeviceState {
        /// Last round of pages.
        final_round: u64,
        /// vCPU and device state.
        sections: Vec<DeviceSection>,
    },
    /// Destination → source: every page and the state applied; ready to resume.
    Prepared {
        /// Digest of destination RAM (see `crate::digest`).
        digest: u64,
        /// CPU nanoseconds the destination's receivers used.
        cpu_ns: u64,
    },
    /// Source → destination: resume the guest; the source will never resume it again.
    Commit,
    /// Destination → source: the guest runs on the destination.
    Resumed,
    /// Destination → source: how far the guest's counter moved after resume.
    Progress {
        /// Counter delta.
        delta: u64,
    },
    /// Source → destination: migration abandoned; discard everything.
    Abort {
        /// Why.
        reason: String,
    },
    /// Source → destination (after Ready, instead of data connections): the source's RDMA
    /// queue pairs, one per channel.
    RdmaConnect {
        /// The queue pairs.
        qps: Vec<RdmaQp>,
    },
    /// Destination → source: the destination's queue pairs (connected to the source's, in
    /// the same order) and its RAM regions registered for remote writes.
    RdmaAccept {
        /// The queue pairs.
        qps: Vec<RdmaQp>,
        /// One per RAM region of the layout, in order.
        regions: Vec<RdmaRegion>,
    },
    /// Source → destination, RDMA only (the destination CPU sees no page arrive): pages of
    /// `round` written so far; `complete` once every write of the round completed.
    RoundProgress {
        /// Round number.
        round: u64,
        /// Pages of the round written (complete) or queued (not yet complete).
        pages: u64,
        /// Every write of the round completed.
        complete: bool,
    },
}

const T_HELLO: u16 = 1;
const T_WELCOME: u16 = 2;
const T_REFUSE: u16 = 3;
const T_CONFIG: u16 = 4;
const T_READY: u16 = 5;
const T_CHANNEL_HELLO: u16 = 6;
const T_DEVICE_STATE: u16 = 7;
const T_PREPARED: u16 = 8;
const T_COMMIT: u16 = 9;
const T_RESUMED: u16 = 10;
const T_PROGRESS: u16 = 11;
const T_ABORT: u16 = 12;
const T_AUTH: u16 = 13;
const T_RDMA_CONNECT: u16 = 14;
const T_RDMA_ACCEPT: u16 = 15;
const T_ROUND_PROGRESS: u16 = 16;

impl Message {
    /// Short name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Auth { .. } => "Auth",
            Message::Refuse { .. } => "Refuse",
            Message::Config { .. } => "Config",
            Message::Ready => "Ready",
            Message::ChannelHello { .. } => "ChannelHello",
            Message::DeviceState { .. } => "DeviceState",
            Message::Prepared { .. } => "Prepared",
            Message::Commit => "Commit",
            Message::Resumed => "Resumed",
            Message::Progress { .. } => "Progress",
            Message::Abort { .. } => "Abort",
            Message::RdmaConnect { .. } => "RdmaConnect",
            Message::RdmaAccept { .. } => "RdmaAccept",
            Message::RoundProgress { .. } => "RoundProgress",
        }
    }

    /// Encodes into `(frame kind, payload)`.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut w = Vec::new();
        let kind = match self {
            Message::Hello {
                min_version,
                max_version,
                features,
                nonce,
            } => {
                put_u32(&mut w, MAGIC);
                put_u16(&mut w, *min_version);
                put_u16(&mut w, *max_version);
                put_u64(&mut w, *features);
                w.extend_from_slice(nonce);
                T_HELLO
            }
            Message::Welcome {
                version,
                features,
                nonce,
                proof,
            } => {
                put_u16(&mut w, *version);
                put_u64(&mut w, *features);
                w.extend_from_slice(nonce);
                w.extend_from_slice(proof);
                T_WELCOME
            }
            Message::Auth { proof } => {
                w.extend_from_slice(proof);
                T_AUTH
            }
            Message::Refuse { reason } => {
                put_str(&mut w, reason);
                T_REFUSE
            }
            Message::Config {
                machine,
                spec,
                layout,
                channels,
                token,
            } => {
                put_str(&mut w, machine);
                put_u64(&mut w, spec.memory_mib);
                put_u32(&mut w, spec.vcpus);
                w.push(fill_code(spec.fill));
                w.push(pattern_code(spec.workload.pattern));
                put_u64(&mut w, spec.workload.working_set_mib);
                put_u64(&mut w, spec.workload.dirty_rate);
                put_u16(&mut w, layout.regions.len() as u16);
                for r in &layout.regions {
                    put_u64(&mut w, r.gpa);
                    put_u64(&mut w, r.size);
                }
                put_u16(&mut w, *channels);
                put_u64(&mut w, *token);
                T_CONFIG
            }
            Message::Ready => T_READY,
            Message::ChannelHello { token, index } => {
                put_u64(&mut w, *token);
                put_u16(&mut w, *index);
                T_CHANNEL_HELLO
            }
            Message::DeviceState {
                final_round,
                sections,
            } => {
                put_u64(&mut w, *final_round);
                put_u32(&mut w, sections.len() as u32);
                for s in sections {
                    put_u32(&mut w, s.id);
                    put_u32(&mut w, s.instance);
                    put_u32(&mut w, s.version);
                    put_u32(&mut w, s.data.len() as u32);
                    w.extend_from_slice(&s.data);
                }
                T_DEVICE_STATE
            }
            Message::Prepared { digest, cpu_ns } => {
                put_u64(&mut w, *digest);
                put_u64(&mut w, *cpu_ns);
                T_PREPARED
            }
            Message::Commit => T_COMMIT,
            Message::Resumed => T_RESUMED,
            Message::Progress { delta } => {
                put_u64(&mut w, *delta);
                T_PROGRESS
            }
            Message::Abort { reason } => {
                put_str(&mut w, reason);
                T_ABORT
            }
            Message::RdmaConnect { qps } => {
                put_qps(&mut w, qps);
                T_RDMA_CONNECT
            }
            Message::RdmaAccept { qps, regions } => {
                put_qps(&mut w, qps);
                put_u16(&mut w, regions.len() as u16);
                for r in regions {
                    put_u64(&mut w, r.gpa);
                    put_u64(&mut w, r.len);
                    put_u64(&mut w, r.addr);
                    put_u32(&mut w, r.rkey);
                }
                T_RDMA_ACCEPT
            }
            Message::RoundProgress {
                round,
                pages,
                complete,
            } => {
                put_u64(&mut w, *round);
                put_u64(&mut w, *pages);
                w.push(u8::from(*complete));
                T_ROUND_PROGRESS
            }
        };
        (kind, w)
    }

    /// Decodes a frame of type `kind`.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, ProtocolError> {
        let name = match kind {
            T_HELLO => "Hello",
            T_WELCOME => "Welcome",
            T_REFUSE => "Refuse",
            T_CONFIG => "Config",
            T_READY => "Ready",
            T_CHANNEL_HELLO => "ChannelHello",
            T_DEVICE_STATE => "DeviceState",
            T_PREPARED => "Prepared",
            T_COMMIT => "Commit",
            T_RESUMED => "Resumed",
            T_PROGRESS => "Progress",
            T_ABORT => "Abort",
            T_AUTH => "Auth",
            T_RDMA_CONNECT => "RdmaConnect",
            T_RDMA_ACCEPT => "RdmaAccept",
            T_ROUND_PROGRESS => "RoundProgress",
            other => return Err(ProtocolError::UnknownType(other)),
        };
        let mut r = Reader {
            buf: payload,
            msg: name,
        };
        let m = match kind {
            T_HELLO => {
                let magic = r.u32()?;
                if magic != MAGIC {
                    return Err(ProtocolError::BadMagic(magic));
                }
                let min_version = r.u16()?;
                let max_version = r.u16()?;
                let features = r.u64()?;
                if min_version == 0 || min_version > max_version {
                    return Err(r.invalid(format!("version range {min_version}..={max_version}")));
                }
                Message::Hello {
                    min_version,
                    max_version,
                    features,
                    nonce: r.array()?,
                }
            }
            T_WELCOME => Message::Welcome {
                version: r.u16()?,
                features: r.u64()?,
                nonce: r.array()?,
                proof: r.array()?,
            },
            T_AUTH => Message::Auth { proof: r.array()? },
            T_REFUSE => Message::Refuse {
                reason: r.string()?,
            },
            T_CONFIG => {
                let machine = r.string()?;
                let memory_mib = r.u64()?;
                let vcpus = r.u32()?;
                let fill = match r.u8()? {
                    0 => Fill::Zero,
                    1 => Fill::Random,
                    2 => Fill::Text,
                    3 => Fill::Mixed,
                    f => return Err(r.invalid(format!("unknown fill {f}"))),
                };
                let pattern = match r.u8()? {
                    0 => Pattern::Sequential,
                    1 => Pattern::Random,
                    2 => Pattern::Hotspot,
                    p => return Err(r.invalid(format!("unknown pattern {p}"))),
                };
                let working_set_mib = r.u64()?;
                let dirty_rate = r.u64()?;
                let n = usize::from(r.u16()?);
                if n == 0 || n > MAX_REGIONS {
                    return Err(r.invalid(format!("{n} RAM regions (1..={MAX_REGIONS})")));
                }
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    regions.push(RamRegionSpec {
                        gpa: r.u64()?,
                        size: r.u64()?,
                    });
                }
                let layout = RamLayout { regions };
                layout.validate().map_err(|e| r.invalid(e.to_string()))?;
                if layout.total_bytes() != memory_mib.saturating_mul(1 << 20) {
                    return Err(r.invalid(format!(
                        "layout holds {} bytes but the spec says {memory_mib} MiB",
                        layout.total_bytes()
                    )));
                }
                if vcpus == 0 || vcpus > MAX_VCPUS {
                    return Err(r.invalid(format!("{vcpus} vCPUs (1..={MAX_VCPUS})")));
                }
                let channels = r.u16()?;
                if channels == 0 || channels > MAX_CHANNELS {
                    return Err(r.invalid(format!("{channels} channels (1..={MAX_CHANNELS})")));
                }
                Message::Config {
                    machine,
                    spec: VmSpec {
                        memory_mib,
                        vcpus,
                        fill,
                        workload: Workload {
                            working_set_mib,
                            dirty_rate,
                            pattern,
                        },
                    },
                    layout,
                    channels,
                    token: r.u64()?,
                }
            }
            T_READY => Message::Ready,
            T_CHANNEL_HELLO => Message::ChannelHello {
                token: r.u64()?,
                index: r.u16()?,
            },
            T_DEVICE_STATE => {
                let final_round = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_SECTIONS {
                    return Err(r.invalid(format!("{n} sections (at most {MAX_SECTIONS})")));
                }
                let mut sections = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    let id = r.u32()?;
                    let instance = r.u32()?;
                    let version = r.u32()?;
                    let len = r.u32()? as usize;
                    if id == 0 || len > MAX_SECTION_BYTES {
                        return Err(r.invalid(format!("section id {id} of {len} bytes")));
                    }
                    sections.push(DeviceSection {
                        id,
                        instance,
                        version,
                        data: r.bytes(len)?.to_vec(),
                    });
                }
                Message::DeviceState {
                    final_round,
                    sections,
                }
            }
            T_PREPARED => Message::Prepared {
                digest: r.u64()?,
                cpu_ns: r.u64()?,
            },
            T_COMMIT => Message::Commit,
            T_RESUMED => Message::Resumed,
            T_PROGRESS => Message::Progress { delta: r.u64()? },
            T_RDMA_CONNECT => Message::RdmaConnect { qps: r.qps()? },
            T_RDMA_ACCEPT => {
                let qps = r.qps()?;
                let n = usize::from(r.u16()?);
                if n == 0 || n > MAX_REGIONS {
                    return Err(r.invalid(format!("{n} RDMA regions (1..={MAX_REGIONS})")));
                }
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    let (gpa, len, addr, rkey) = (r.u64()?, r.u64()?, r.u64()?, r.u32()?);
                    if len == 0
                        || gpa % PAGE_SIZE != 0
                        || len % PAGE_SIZE != 0
                        || gpa.checked_add(len).is_none()
                        || addr.checked_add(len).is_none()
                    {
                        return Err(r.invalid(format!(
                            "RDMA region {gpa:#x}+{len:#x} at {addr:#x}: unaligned, empty or wrapping"
                        )));
                    }
                    regions.push(RdmaRegion {
                        gpa,
                        len,
                        addr,
                        rkey,
                    });
                }
                Message::RdmaAccept { qps, regions }
            }
            T_ROUND_PROGRESS => Message::RoundProgress {
                round: r.u64()?,
                pages: r.u64()?,
                complete: match r.u8()? {
                    0 => false,
                    1 => true,
                    c => return Err(r.invalid(format!("complete flag {c}"))),
                },
            },
            _ => Message::Abort {
                reason: r.string()?,
            },
        };
        r.finish()?;
        Ok(m)
    }
}

/// What a destination answers to a Hello offering `[min, max]`: the version to use, or the
/// reason to refuse.
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

fn fill_code(f: Fill) -> u8 {
    match f {
        Fill::Zero => 0,
        Fill::Random => 1,
        Fill::Text => 2,
        Fill::Mixed => 3,
    }
}

fn pattern_code(p: Pattern) -> u8 {
    match p {
        Pattern::Sequential => 0,
        Pattern::Random => 1,
        Pattern::Hotspot => 2,
    }
}

fn put_u16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_qps(w: &mut Vec<u8>, qps: &[RdmaQp]) {
    put_u16(w, qps.len() as u16);
    for q in qps {
        put_u32(w, q.qpn);
        put_u32(w, q.psn);
        w.extend_from_slice(&q.gid);
        put_u16(w, q.lid);
        w.push(q.mtu);
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_REASON)];
    // Cut on a char boundary so the receiver gets valid UTF-8.
    let b = match std::str::from_utf8(b) {
        Ok(_) => b,
        Err(e) => &b[..e.valid_up_to()],
    };
    put_u32(w, b.len() as u32);
    w.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
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
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn qps(&mut self) -> Result<Vec<RdmaQp>, ProtocolError> {
        let n = self.u16()?;
        if n == 0 || n > MAX_CHANNELS {
            return Err(self.invalid(format!("{n} RDMA queue pairs (1..={MAX_CHANNELS})")));
        }
        let mut qps = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let q = RdmaQp {
                qpn: self.u32()?,
                psn: self.u32()?,
                gid: self.array()?,
                lid: self.u16()?,
                mtu: self.u8()?,
            };
            if q.qpn == 0 || q.qpn > MAX_QPN || q.psn > MAX_QPN || !(1..=5).contains(&q.mtu) {
                return Err(self.invalid(format!(
                    "RDMA queue pair {:#x} (psn {:#x}, mtu code {}) out of range",
                    q.qpn, q.psn, q.mtu
                )));
            }
            qps.push(q);
        }
        Ok(qps)
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_REASON {
            return Err(self.invalid(format!("string of {n} bytes (at most {MAX_REASON})")));
        }
        let b = self.bytes(n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }
    fn invalid(&self, reason: String) -> ProtocolError {
        ProtocolError::Invalid {
            msg: self.msg,
            reason,
        }
    }
    fn finish(&self) -> Result<(), ProtocolError> {
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
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                min_version: 1,
                max_version: 3,
                features: 5,
                nonce: [3; 32],
            },
            Message::Welcome {
                version: 1,
                features: 0,
                nonce: [4; 32],
                proof: [5; 32],
            },
            Message::Auth { proof: [6; 32] },
            Message::Refuse {
                reason: "nope".into(),
            },
            Message::Config {
                machine: "m".into(),
                spec: VmSpec {
                    memory_mib: 64,
                    vcpus: 2,
                    fill: Fill::Text,
                    workload: Workload {
                        working_set_mib: 8,
                        dirty_rate: 1000,
                        pattern: Pattern::Hotspot,
                    },
                },
                layout: RamLayout::single(64 << 20),
                channels: 4,
                token: 99,
            },
            Message::Ready,
            Message::ChannelHello { token: 7, index: 3 },
            Message::DeviceState {
                final_round: 4,
                sections: vec![DeviceSection {
                    id: 1,
                    instance: 0,
                    version: 1,
                    data: vec![1, 2, 3],
                }],
            },
            Message::Prepared {
                digest: 0xabc,
                cpu_ns: 5,
            },
            Message::Commit,
            Message::Resumed,
            Message::Progress { delta: 12 },
            Message::Abort {
                reason: "cancelled".into(),
            },
            Message::RdmaConnect {
                qps: vec![rdma_qp(17), rdma_qp(18)],
            },
            Message::RdmaAccept {
                qps: vec![rdma_qp(33)],
                regions: vec![RdmaRegion {
                    gpa: 0,
                    len: 64 << 20,
                    addr: 0x7f00_0000_0000,
                    rkey: 0x1234,
                }],
            },
            Message::RoundProgress {
                round: 2,
                pages: 77,
                complete: true,
            },
        ]
    }

    fn rdma_qp(qpn: u32) -> RdmaQp {
        RdmaQp {
            qpn,
            psn: 0xabcdef,
            gid: [7; 16],
            lid: 0,
            mtu: 3,
        }
    }

    #[test]
    fn rdma_messages_are_checked() {
        let bad_qp = |q: RdmaQp| {
            let (k, p) = Message::RdmaConnect { qps: vec![q] }.encode();
            Message::decode(k, &p)
        };
        assert!(bad_qp(rdma_qp(1)).is_ok());
        for q in [
            rdma_qp(0),
            rdma_qp(MAX_QPN + 1),
            RdmaQp {
                psn: MAX_QPN + 1,
                ..rdma_qp(1)
            },
            RdmaQp {
                mtu: 0,
                ..rdma_qp(1)
            },
            RdmaQp {
                mtu: 6,
                ..rdma_qp(1)
            },
        ] {
            assert!(
                matches!(bad_qp(q), Err(ProtocolError::Invalid { .. })),
                "{q:?}"
            );
        }
        let (k, p) = Message::RdmaConnect { qps: vec![] }.encode();
        assert!(Message::decode(k, &p).is_err());
        let (k, p) = Message::RdmaConnect {
            qps: vec![rdma_qp(1); MAX_CHANNELS as usize + 1],
        }
        .encode();
        assert!(Message::decode(k, &p).is_err());
        let region = |gpa, len, addr| {
            let (k, p) = Message::RdmaAccept {
                qps: vec![rdma_qp(1)],
                regions: vec![RdmaRegion {
                    gpa,
                    len,
                    addr,
                    rkey: 1,
                }],
            }
            .encode();
            Message::decode(k, &p)
        };
        assert!(region(0, 4096, 0).is_ok());
        assert!(region(0, 0, 0).is_err());
        assert!(region(1, 4096, 0).is_err());
        assert!(region(0, 4095, 0).is_err());
        assert!(region(u64::MAX - 4095, 8192, 0).is_err());
        assert!(region(0, 8192, u64::MAX - 10).is_err());
        let (k, mut p) = Message::RoundProgress {
            round: 0,
            pages: 0,
            complete: false,
        }
        .encode();
        p[16] = 2;
        assert!(Message::decode(k, &p).is_err());
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let (k, p) = m.encode();
            assert_eq!(Message::decode(k, &p).unwrap(), m);
            // every strict prefix is an error, never a panic
            for cut in 0..p.len() {
                assert!(
                    Message::decode(k, &p[..cut]).is_err(),
                    "{} cut at {cut}",
                    m.name()
                );
            }
            let mut longer = p.clone();
            longer.push(0);
            assert!(Message::decode(k, &longer).is_err());
        }
    }

    #[test]
    fn caps_and_ranges_are_enforced() {
        assert_eq!(Message::decode(0, &[]), Err(ProtocolError::UnknownType(0)));
        assert_eq!(
            Message::decode(999, &[]),
            Err(ProtocolError::UnknownType(999))
        );
        let mut bad_magic = Vec::new();
        put_u32(&mut bad_magic, 0x1234);
        assert!(matches!(
            Message::decode(T_HELLO, &bad_magic),
            Err(ProtocolError::BadMagic(_))
        ));
        // DeviceState with a huge section count or length
        let mut d = Vec::new();
        put_u64(&mut d, 0);
        put_u32(&mut d, u32::MAX);
        assert!(matches!(
            Message::decode(T_DEVICE_STATE, &d),
            Err(ProtocolError::Invalid { .. })
        ));
        let mut d = Vec::new();
        put_u64(&mut d, 0);
        put_u32(&mut d, 1);
        for v in [1u32, 0, 1, u32::MAX] {
            put_u32(&mut d, v);
        }
        assert!(matches!(
            Message::decode(T_DEVICE_STATE, &d),
            Err(ProtocolError::Invalid { .. })
        ));
        // Config whose layout disagrees with the spec, or with absurd channel counts
        if let Message::Config { spec, .. } = &samples()[3] {
            let m = Message::Config {
                machine: "m".into(),
                spec: spec.clone(),
                layout: RamLayout::single(32 << 20),
                channels: 1,
                token: 0,
            };
            let (k, p) = m.encode();
            assert!(Message::decode(k, &p).is_err());
            let m = Message::Config {
                machine: "m".into(),
                spec: spec.clone(),
                layout: RamLayout::single(64 << 20),
                channels: 0,
                token: 0,
            };
            let (k, p) = m.encode();
            assert!(Message::decode(k, &p).is_err());
        }
    }

    #[test]
    fn newer_streams_are_refused_with_a_reason() {
        assert_eq!(negotiate(1, 1), Ok(1));
        assert_eq!(negotiate(1, 7), Ok(VERSION));
        let err = negotiate(VERSION + 1, VERSION + 2).unwrap_err();
        assert!(err.contains("newer"), "{err}");
    }

    proptest! {
        #[test]
        fn decode_never_panics(kind in 0u16..20, bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(kind, &bytes);
        }
    }
}
