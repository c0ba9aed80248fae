//! Control messages and their encoding.

use super::config::{decode_config, encode_config};
use super::{
    put_qps_header, put_str, put_u16, put_u32, put_u64, MessageType, ProtocolError, Reader, MAGIC,
    MAX_CHANNELS, MAX_DISKS, MAX_PROBE_BYTES, MAX_PROBE_CHUNK, MAX_QPN, MAX_ROUND_EXTENTS,
    MAX_SECTIONS, MAX_SECTION_BYTES, VERSION,
};
use crate::memory::{MAX_REGIONS, PAGE_SIZE};
use crate::storage::{DiskOffer, StorageMode};
use crate::vm::{DeviceSection, VmConfig};

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
        /// The VM: machine, RAM layout (every page address later received is checked
        /// against it), vCPUs, devices and the machine section.
        vm: VmConfig,
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
    /// Source → destination (protocol 2, after Config): how the VM's disks move.
    Storage {
        /// Shared images or copies.
        mode: StorageMode,
        /// Copy mode: the directory on the destination for the copies (empty: the
        /// destination's default).
        directory: String,
        /// The disks, in the VM's order (disk `i` travels at `crate::storage::disk_addr(i)`).
        disks: Vec<DiskOffer>,
    },
    /// Source → destination (protocol 2, before DeviceState): the digest of every disk as
    /// copied, for the destination to verify before Prepared.
    DiskDigests {
        /// One per disk of Storage, in order (empty in shared mode).
        digests: Vec<u64>,
    },
    /// Source → destination, after Auth and instead of Config: a link probe of `bytes` bytes
    /// (FEATURE_PROBE). Nothing migrates; the destination keeps waiting for a source.
    Probe {
        /// Bytes of `ProbeData` that follow.
        bytes: u64,
    },
    /// Source → destination: probe filler (at most [`MAX_PROBE_CHUNK`] bytes).
    ProbeData {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Destination → source: the probe's bytes arrived, over this long (from the first
    /// `ProbeData` to the last).
    ProbeResult {
        /// Bytes received.
        bytes: u64,
        /// Nanoseconds between the first and the last byte.
        nanos: u64,
    },
    /// Source → destination, RDMA from protocol 3: pages the source wrote in `round`, all
    /// landed (sent before the round's completing `RoundProgress`, in as many messages as
    /// needed); the destination hashes them while the next round runs.
    RoundExtents {
        /// Round number.
        round: u64,
        /// `(gpa, pages)` of each run of written pages.
        extents: Vec<(u64, u64)>,
    },
    /// Destination → source, from protocol 3, before Ready: the data connections go to this
    /// port of the control connection's address (a destination started by a host agent,
    /// which keeps the migration port for new sources).
    DataPort {
        /// The TCP port.
        port: u16,
    },
    /// Source → destination, TCP with [`crate::protocol::FEATURE_LANDED`], before the pause:
    /// answer once every page of `round` is in RAM.
    AwaitLanded {
        /// The round (the last one sent).
        round: u64,
    },
    /// Destination → source: the answer to `AwaitLanded`, at most a second later.
    Landed {
        /// The round asked about.
        round: u64,
        /// Every page of it is in RAM (else the destination stopped waiting).
        complete: bool,
    },
}

impl Message {
    /// The message's type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::Welcome { .. } => MessageType::Welcome,
            Message::Auth { .. } => MessageType::Auth,
            Message::Refuse { .. } => MessageType::Refuse,
            Message::Config { .. } => MessageType::Config,
            Message::Ready => MessageType::Ready,
            Message::ChannelHello { .. } => MessageType::ChannelHello,
            Message::DeviceState { .. } => MessageType::DeviceState,
            Message::Prepared { .. } => MessageType::Prepared,
            Message::Commit => MessageType::Commit,
            Message::Resumed => MessageType::Resumed,
            Message::Progress { .. } => MessageType::Progress,
            Message::Abort { .. } => MessageType::Abort,
            Message::RdmaConnect { .. } => MessageType::RdmaConnect,
            Message::RdmaAccept { .. } => MessageType::RdmaAccept,
            Message::RoundProgress { .. } => MessageType::RoundProgress,
            Message::Storage { .. } => MessageType::Storage,
            Message::DiskDigests { .. } => MessageType::DiskDigests,
            Message::Probe { .. } => MessageType::Probe,
            Message::ProbeData { .. } => MessageType::ProbeData,
            Message::ProbeResult { .. } => MessageType::ProbeResult,
            Message::RoundExtents { .. } => MessageType::RoundExtents,
            Message::DataPort { .. } => MessageType::DataPort,
            Message::AwaitLanded { .. } => MessageType::AwaitLanded,
            Message::Landed { .. } => MessageType::Landed,
        }
    }

    /// Short name, for errors and logs.
    pub fn name(&self) -> &'static str {
        self.message_type().name()
    }

    /// Encodes into `(frame kind, payload)`, in the newest protocol version.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut w = Vec::new();
        match self {
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
            }
            Message::Auth { proof } => w.extend_from_slice(proof),
            Message::Refuse { reason } | Message::Abort { reason } => put_str(&mut w, reason),
            Message::Config {
                vm,
                channels,
                token,
            } => {
                encode_config(&mut w, vm);
                put_u16(&mut w, *channels);
                put_u64(&mut w, *token);
            }
            Message::Ready | Message::Commit | Message::Resumed => {}
            Message::ChannelHello { token, index } => {
                put_u64(&mut w, *token);
                put_u16(&mut w, *index);
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
            }
            Message::Prepared { digest, cpu_ns } => {
                put_u64(&mut w, *digest);
                put_u64(&mut w, *cpu_ns);
            }
            Message::Progress { delta } => put_u64(&mut w, *delta),
            Message::RdmaConnect { qps } => put_qps(&mut w, qps),
            Message::RdmaAccept { qps, regions } => {
                put_qps(&mut w, qps);
                put_u16(&mut w, regions.len() as u16);
                for r in regions {
                    put_u64(&mut w, r.gpa);
                    put_u64(&mut w, r.len);
                    put_u64(&mut w, r.addr);
                    put_u32(&mut w, r.rkey);
                }
            }
            Message::RoundProgress {
                round,
                pages,
                complete,
            } => {
                put_u64(&mut w, *round);
                put_u64(&mut w, *pages);
                w.push(u8::from(*complete));
            }
            Message::Storage {
                mode,
                directory,
                disks,
            } => {
                w.push(mode.to_wire());
                put_str(&mut w, directory);
                put_u16(&mut w, disks.len() as u16);
                for d in disks {
                    put_str(&mut w, &d.id);
                    put_str(&mut w, &d.file_name);
                    put_u64(&mut w, d.size);
                    put_u64(&mut w, d.allocated);
                    w.push(u8::from(d.read_only));
                }
            }
            Message::DiskDigests { digests } => {
                put_u16(&mut w, digests.len() as u16);
                for d in digests {
                    put_u64(&mut w, *d);
                }
            }
            Message::RoundExtents { round, extents } => {
                put_u64(&mut w, *round);
                put_u32(&mut w, extents.len() as u32);
                for (gpa, pages) in extents {
                    put_u64(&mut w, *gpa);
                    put_u64(&mut w, *pages);
                }
            }
            Message::Probe { bytes } => put_u64(&mut w, *bytes),
            Message::DataPort { port } => put_u16(&mut w, *port),
            Message::AwaitLanded { round } => put_u64(&mut w, *round),
            Message::Landed { round, complete } => {
                put_u64(&mut w, *round);
                w.push(u8::from(*complete));
            }
            Message::ProbeData { data } => {
                put_u32(&mut w, data.len() as u32);
                w.extend_from_slice(data);
            }
            Message::ProbeResult { bytes, nanos } => {
                put_u64(&mut w, *bytes);
                put_u64(&mut w, *nanos);
            }
        }
        (self.message_type().kind(), w)
    }

    /// Decodes a frame of type `kind` in the newest protocol version.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, ProtocolError> {
        Message::decode_version(kind, payload, VERSION)
    }

    /// Decodes a frame of type `kind` sent by a peer speaking protocol `version`.
    pub fn decode_version(
        kind: u16,
        payload: &[u8],
        version: u16,
    ) -> Result<Message, ProtocolError> {
        let t = MessageType::try_from(kind)?;
        let mut r = Reader::new(payload, t.name());
        let m = match t {
            MessageType::Invalid => return Err(ProtocolError::UnknownType(kind)),
            MessageType::Hello => {
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
            MessageType::Welcome => Message::Welcome {
                version: r.u16()?,
                features: r.u64()?,
                nonce: r.array()?,
                proof: r.array()?,
            },
            MessageType::Auth => Message::Auth { proof: r.array()? },
            MessageType::Refuse => Message::Refuse {
                reason: r.string()?,
            },
            MessageType::Abort => Message::Abort {
                reason: r.string()?,
            },
            MessageType::Config => {
                let vm = decode_config(&mut r, version)?;
                let channels = r.u16()?;
                if channels == 0 || channels > MAX_CHANNELS {
                    return Err(r.invalid(format!("{channels} channels (1..={MAX_CHANNELS})")));
                }
                Message::Config {
                    vm,
                    channels,
                    token: r.u64()?,
                }
            }
            MessageType::Ready => Message::Ready,
            MessageType::Commit => Message::Commit,
            MessageType::Resumed => Message::Resumed,
            MessageType::ChannelHello => Message::ChannelHello {
                token: r.u64()?,
                index: r.u16()?,
            },
            MessageType::DeviceState => decode_device_state(&mut r)?,
            MessageType::Prepared => Message::Prepared {
                digest: r.u64()?,
                cpu_ns: r.u64()?,
            },
            MessageType::Progress => Message::Progress { delta: r.u64()? },
            MessageType::RdmaConnect => Message::RdmaConnect { qps: qps(&mut r)? },
            MessageType::RdmaAccept => {
                let qps = qps(&mut r)?;
                Message::RdmaAccept {
                    qps,
                    regions: rdma_regions(&mut r)?,
                }
            }
            MessageType::RoundProgress => Message::RoundProgress {
                round: r.u64()?,
                pages: r.u64()?,
                complete: match r.u8()? {
                    0 => false,
                    1 => true,
                    c => return Err(r.invalid(format!("complete flag {c}"))),
                },
            },
            MessageType::Storage => decode_storage(&mut r)?,
            MessageType::DiskDigests => {
                let n = usize::from(r.u16()?);
                if n > MAX_DISKS {
                    return Err(r.invalid(format!("{n} disks (at most {MAX_DISKS})")));
                }
                Message::DiskDigests {
                    digests: (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?,
                }
            }
            MessageType::Probe => {
                let bytes = r.u64()?;
                if bytes > MAX_PROBE_BYTES {
                    return Err(r.invalid(format!(
                        "probe of {bytes} bytes (at most {MAX_PROBE_BYTES})"
                    )));
                }
                Message::Probe { bytes }
            }
            MessageType::ProbeData => {
                let n = r.u32()? as usize;
                if n > MAX_PROBE_CHUNK {
                    return Err(r.invalid(format!(
                        "{n} bytes of probe data (at most {MAX_PROBE_CHUNK})"
                    )));
                }
                Message::ProbeData {
                    data: r.bytes(n)?.to_vec(),
                }
            }
            MessageType::ProbeResult => Message::ProbeResult {
                bytes: r.u64()?,
                nanos: r.u64()?,
            },
            MessageType::RoundExtents => {
                let round = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_ROUND_EXTENTS {
                    return Err(r.invalid(format!("{n} extents (at most {MAX_ROUND_EXTENTS})")));
                }
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    extents.push((r.u64()?, r.u64()?));
                }
                Message::RoundExtents { round, extents }
            }
            MessageType::DataPort => match r.u16()? {
                0 => return Err(r.invalid("data port 0".into())),
                port => Message::DataPort { port },
            },
            MessageType::AwaitLanded => Message::AwaitLanded { round: r.u64()? },
            MessageType::Landed => Message::Landed {
                round: r.u64()?,
                complete: match r.u8()? {
                    0 => false,
                    1 => true,
                    c => return Err(r.invalid(format!("complete flag {c}"))),
                },
            },
        };
        r.finish()?;
        Ok(m)
    }
}

fn decode_storage(r: &mut Reader<'_>) -> Result<Message, ProtocolError> {
    let m = r.u8()?;
    let mode = StorageMode::from_wire(m).ok_or_else(|| r.invalid(format!("storage mode {m}")))?;
    let directory = r.string()?;
    let n = usize::from(r.u16()?);
    if n > MAX_DISKS {
        return Err(r.invalid(format!("{n} disks (at most {MAX_DISKS})")));
    }
    let mut disks = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.string()?;
        let file_name = r.string()?;
        let size = r.u64()?;
        let allocated = r.u64()?;
        let read_only = match r.u8()? {
            0 => false,
            1 => true,
            f => return Err(r.invalid(format!("read-only flag {f}"))),
        };
        if size == 0 || size % 512 != 0 || size > crate::storage::DISK_STRIDE {
            return Err(r.invalid(format!("disk {id:?}: size {size}")));
        }
        let plain = !file_name.is_empty()
            && file_name != "."
            && file_name != ".."
            && !file_name.contains('/')
            && !file_name.contains('\0');
        if !plain {
            return Err(r.invalid(format!("disk {id:?}: file name {file_name:?}")));
        }
        disks.push(DiskOffer {
            id,
            file_name,
            size,
            allocated,
            read_only,
        });
    }
    Ok(Message::Storage {
        mode,
        directory,
        disks,
    })
}

fn decode_device_state(r: &mut Reader<'_>) -> Result<Message, ProtocolError> {
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
    Ok(Message::DeviceState {
        final_round,
        sections,
    })
}

fn put_qps(w: &mut Vec<u8>, qps: &[RdmaQp]) {
    put_qps_header(w, qps.len());
    for q in qps {
        put_u32(w, q.qpn);
        put_u32(w, q.psn);
        w.extend_from_slice(&q.gid);
        put_u16(w, q.lid);
        w.push(q.mtu);
    }
}

fn qps(r: &mut Reader<'_>) -> Result<Vec<RdmaQp>, ProtocolError> {
    let n = r.u16()?;
    if n == 0 || n > MAX_CHANNELS {
        return Err(r.invalid(format!("{n} RDMA queue pairs (1..={MAX_CHANNELS})")));
    }
    let mut qps = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let q = RdmaQp {
            qpn: r.u32()?,
            psn: r.u32()?,
            gid: r.array()?,
            lid: r.u16()?,
            mtu: r.u8()?,
        };
        if q.qpn == 0 || q.qpn > MAX_QPN || q.psn > MAX_QPN || !(1..=5).contains(&q.mtu) {
            return Err(r.invalid(format!(
                "RDMA queue pair {:#x} (psn {:#x}, mtu code {}) out of range",
                q.qpn, q.psn, q.mtu
            )));
        }
        qps.push(q);
    }
    Ok(qps)
}

fn rdma_regions(r: &mut Reader<'_>) -> Result<Vec<RdmaRegion>, ProtocolError> {
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
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RamLayout;
    use crate::protocol::MIN_VERSION;
    use crate::vm::{DeviceDescriptor, MachineSection};
    use proptest::prelude::*;

    fn vm_config() -> VmConfig {
        VmConfig {
            machine: "m".into(),
            layout: RamLayout::single(64 << 20),
            vcpus: 2,
            devices: vec![DeviceDescriptor {
                kind: "virtio-blk".into(),
                id: "disk0".into(),
                properties: vec![("path".into(), "/images/a.raw".into())],
            }],
            machine_section: MachineSection {
                version: 3,
                data: vec![1, 2, 3],
            },
        }
    }

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
                vm: vm_config(),
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
            Message::Storage {
                mode: StorageMode::Copy,
                directory: "/srv/vms".into(),
                disks: vec![DiskOffer {
                    id: "disk0".into(),
                    file_name: "root.img".into(),
                    size: 1 << 30,
                    allocated: 256 << 20,
                    read_only: false,
                }],
            },
            Message::DiskDigests {
                digests: vec![1, 2],
            },
            Message::Probe { bytes: 8 << 20 },
            Message::ProbeData {
                data: vec![0x5a; 100],
            },
            Message::ProbeResult {
                bytes: 8 << 20,
                nanos: 70_000_000,
            },
            Message::RoundExtents {
                round: 3,
                extents: vec![(0, 16), (1 << 20, 1)],
            },
            Message::DataPort { port: 7001 },
            Message::AwaitLanded { round: 4 },
            Message::Landed {
                round: 4,
                complete: true,
            },
        ]
    }

    #[test]
    fn probes_are_capped() {
        let (k, p) = Message::Probe {
            bytes: MAX_PROBE_BYTES + 1,
        }
        .encode();
        assert!(Message::decode(k, &p).is_err());
        let (k, p) = Message::ProbeData {
            data: vec![0; MAX_PROBE_CHUNK + 1],
        }
        .encode();
        assert!(Message::decode(k, &p).is_err());
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
    fn every_type_has_a_sample() {
        let mut types: Vec<u16> = samples().iter().map(|m| m.encode().0).collect();
        types.sort_unstable();
        let all: Vec<u16> = MessageType::ALL.iter().map(|t| t.kind()).collect();
        assert_eq!(types, all);
    }

    #[test]
    fn storage_offers_are_checked() {
        let storage = |file_name: &str, size: u64| {
            let (k, p) = Message::Storage {
                mode: StorageMode::Copy,
                directory: String::new(),
                disks: vec![DiskOffer {
                    id: "d".into(),
                    file_name: file_name.into(),
                    size,
                    allocated: 0,
                    read_only: false,
                }],
            }
            .encode();
            Message::decode(k, &p)
        };
        assert!(storage("a.img", 1 << 20).is_ok());
        for name in ["", ".", "..", "../etc/passwd", "a/b", "x\0y"] {
            assert!(storage(name, 1 << 20).is_err(), "{name:?}");
        }
        assert!(storage("a.img", 0).is_err());
        assert!(storage("a.img", 1000).is_err());
        let (k, mut p) = Message::Storage {
            mode: StorageMode::Shared,
            directory: String::new(),
            disks: Vec::new(),
        }
        .encode();
        p[0] = 7;
        assert!(Message::decode(k, &p).is_err(), "unknown mode");
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
            Message::decode(MessageType::Hello.kind(), &bad_magic),
            Err(ProtocolError::BadMagic(_))
        ));
        // DeviceState with a huge section count or length
        let mut d = Vec::new();
        put_u64(&mut d, 0);
        put_u32(&mut d, u32::MAX);
        assert!(matches!(
            Message::decode(MessageType::DeviceState.kind(), &d),
            Err(ProtocolError::Invalid { .. })
        ));
        let mut d = Vec::new();
        put_u64(&mut d, 0);
        put_u32(&mut d, 1);
        for v in [1u32, 0, 1, u32::MAX] {
            put_u32(&mut d, v);
        }
        assert!(matches!(
            Message::decode(MessageType::DeviceState.kind(), &d),
            Err(ProtocolError::Invalid { .. })
        ));
        // Configs with absurd channel or vCPU counts, duplicate device names, oversized
        // machine sections
        let bad = |vm: VmConfig, channels: u16| {
            let (k, p) = Message::Config {
                vm,
                channels,
                token: 0,
            }
            .encode();
            Message::decode(k, &p)
        };
        assert!(bad(vm_config(), 1).is_ok());
        assert!(bad(vm_config(), 0).is_err());
        assert!(bad(vm_config(), MAX_CHANNELS + 1).is_err());
        assert!(bad(
            VmConfig {
                vcpus: 0,
                ..vm_config()
            },
            1
        )
        .is_err());
        let mut twice = vm_config();
        twice.devices.push(twice.devices[0].clone());
        assert!(bad(twice, 1).is_err());
        let mut big = vm_config();
        big.machine_section.data = vec![0; crate::protocol::MAX_MACHINE_SECTION + 1];
        assert!(bad(big, 1).is_err());
    }

    /// A version-1 Config (as today's livemig 0.1 sends it) converts into the VM's shape with
    /// its workload as the machine section, version 1.
    #[test]
    fn version_one_config_is_converted() {
        let mut p = Vec::new();
        put_str(&mut p, "livemig-kvm-mini");
        put_u64(&mut p, 64);
        put_u32(&mut p, 2);
        let workload = [2u8, 1, 8, 0, 0, 0, 0, 0, 0, 0, 0xe8, 3, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&workload);
        put_u16(&mut p, 1);
        put_u64(&mut p, 0);
        put_u64(&mut p, 64 << 20);
        put_u16(&mut p, 3);
        put_u64(&mut p, 77);
        let m = Message::decode_version(MessageType::Config.kind(), &p, MIN_VERSION).unwrap();
        let Message::Config {
            vm,
            channels,
            token,
        } = m
        else {
            panic!("{m:?}");
        };
        assert_eq!((channels, token, vm.vcpus), (3, 77, 2));
        assert_eq!(vm.machine, "livemig-kvm-mini");
        assert_eq!(vm.layout, RamLayout::single(64 << 20));
        assert!(vm.devices.is_empty());
        assert_eq!(vm.machine_section.version, 1);
        assert_eq!(vm.machine_section.data, workload);
        // the v1 size check holds
        let mut wrong = p.clone();
        wrong[4 + 16..4 + 16 + 8].copy_from_slice(&65u64.to_le_bytes());
        assert!(Message::decode_version(MessageType::Config.kind(), &wrong, 1).is_err());
        // and an unknown version is an error, not a guess
        assert_eq!(
            Message::decode_version(MessageType::Config.kind(), &p, 9),
            Err(ProtocolError::Version(9))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(kind in 0u16..20, version in 0u16..4, bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode_version(kind, &bytes, version);
        }
    }
}
