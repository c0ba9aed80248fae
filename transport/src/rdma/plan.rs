//! Write planning: extents of registered memory → RDMA WRITEs with SGE lists. Pure: tested
//! without a device.

#[allow(unused_imports)]
use super::*;

/// Local registered memory, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSegment {
    /// Address (guest-physical).
    pub addr: u64,
    /// Host virtual address of `addr`.
    pub host: u64,
    /// Length.
    pub len: u64,
    /// Local key.
    pub lkey: u32,
}

/// One scatter-gather entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// Host address.
    pub host: u64,
    /// Length.
    pub len: u32,
    /// Local key.
    pub lkey: u32,
}

/// One RDMA WRITE: `sges[first..first + count]` gathered into `remote_addr` under `rkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedWrite {
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
    /// First SGE.
    pub first: usize,
    /// Number of SGEs.
    pub count: usize,
    /// Bytes written.
    pub bytes: u64,
}

/// The end of the local extent `(addr, len)`, or an error if it overflows.
pub(super) fn extent_end(addr: u64, len: u64) -> Result<u64, RdmaError> {
    addr.checked_add(len).ok_or(RdmaError::Unmapped {
        addr,
        len,
        side: "local",
    })
}

/// The segment of `local` (sorted by address: thousands of blocks for a large VM) holding
/// `addr`.
pub(super) fn segment_at(local: &[LocalSegment], addr: u64) -> Option<&LocalSegment> {
    local[..local.partition_point(|s| s.addr <= addr)]
        .last()
        .filter(|s| addr - s.addr < s.len)
}

/// Turns `extents` (`(addr, len)`) of `local` (sorted by address) into RDMA WRITEs of at most `max_bytes` and `max_sge`
/// entries each: a write covers a range contiguous on the remote side under one key; its
/// SGEs follow the local memory, one per locally contiguous piece. Appends to `wrs`/`sges`.
pub fn plan_writes(
    local: &[LocalSegment],
    remote: &[RemoteRegion],
    extents: &[(u64, u64)],
    max_bytes: u64,
    max_sge: usize,
    wrs: &mut Vec<PlannedWrite>,
    sges: &mut Vec<Sge>,
) -> Result<(), RdmaError> {
    let max_bytes = max_bytes.clamp(1, u64::from(u32::MAX));
    let max_sge = max_sge.max(1);
    // Only merge into writes of this call.
    let first_wr = wrs.len();
    for &(addr, len) in extents {
        let end = extent_end(addr, len)?;
        let mut pos = addr;
        while pos < end {
            let l = segment_at(local, pos).ok_or(RdmaError::Unmapped {
                addr: pos,
                len: end - pos,
                side: "local",
            })?;
            let r = remote
                .iter()
                .find(|s| pos >= s.addr && pos - s.addr < s.len)
                .ok_or(RdmaError::Unmapped {
                    addr: pos,
                    len: end - pos,
                    side: "remote",
                })?;
            let host = l.host + (pos - l.addr);
            let raddr = r.remote_addr + (pos - r.addr);
            let mut piece = (end - pos)
                .min(l.addr + l.len - pos)
                .min(r.addr + r.len - pos);
            // Extend the last write of this call when the remote side continues it.
            let ours = wrs.len() > first_wr;
            let extend = match wrs.last_mut() {
                Some(w)
                    if ours
                        && w.rkey == r.rkey
                        && w.remote_addr + w.bytes == raddr
                        && w.bytes < max_bytes =>
                {
                    let last = sges[w.first + w.count - 1];
                    let contiguous = last.lkey == l.lkey && last.host + u64::from(last.len) == host;
                    if contiguous || w.count < max_sge {
                        Some((w, contiguous))
                    } else {
                        None
                    }
                }
                _ => None,
            };
            match extend {
                Some((w, contiguous)) => {
                    piece = piece.min(max_bytes - w.bytes);
                    if contiguous {
                        let s = &mut sges[w.first + w.count - 1];
                        s.len += piece as u32;
                    } else {
                        sges.push(Sge {
                            host,
                            len: piece as u32,
                            lkey: l.lkey,
                        });
                        w.count += 1;
                    }
                    w.bytes += piece;
                }
                None => {
                    piece = piece.min(max_bytes);
                    sges.push(Sge {
                        host,
                        len: piece as u32,
                        lkey: l.lkey,
                    });
                    wrs.push(PlannedWrite {
                        remote_addr: raddr,
                        rkey: r.rkey,
                        first: sges.len() - 1,
                        count: 1,
                        bytes: piece,
                    });
                }
            }
            pos += piece;
        }
    }
    Ok(())
}
