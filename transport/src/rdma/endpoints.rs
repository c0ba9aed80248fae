//! The two ends of an RDMA migration: the source ([`RdmaSource`], [`RdmaSender`]) and the
//! destination ([`RdmaTarget`]).

#[allow(unused_imports)]
use super::*;

/// The source end: a protection domain, the source memory (registered block by block as
/// writes first reach it) and the queue pairs made from it.
pub struct RdmaSource {
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) map: MemoryMap,
    pub(super) local: Mutex<Arc<LocalMemory>>,
    /// The first link failure seen by any queue pair of this device (its rail): the others
    /// give up at once instead of waiting out their own retries (soft-RoCE can leave a
    /// queue pair of a downed link with writes that never complete).
    pub(super) rail_fault: std::sync::OnceLock<String>,
}

/// Source memory registered so far. A newer one holds every registration of the older ones:
/// a sender's snapshot keeps what it posts against registered.
#[derive(Default)]
pub(super) struct LocalMemory {
    pub(super) mrs: Vec<Arc<MemoryRegion>>,
    /// Sorted by address.
    pub(super) segments: Vec<LocalSegment>,
}

impl LocalMemory {
    /// The segment holding `addr`.
    pub(super) fn segment(&self, addr: u64) -> Option<&LocalSegment> {
        segment_at(&self.segments, addr)
    }

    /// Whether every byte of `extents` is registered.
    pub(super) fn covers(&self, extents: &[(u64, u64)]) -> bool {
        extents.iter().all(|&(addr, len)| {
            let end = addr.saturating_add(len);
            let mut pos = addr;
            while pos < end {
                match self.segment(pos) {
                    Some(s) => pos = s.addr + s.len,
                    None => return false,
                }
            }
            true
        })
    }
}

impl RdmaSource {
    /// A source end on `device` for the memory of `map`.
    pub fn new(device: &Arc<Device>, map: MemoryMap) -> Result<Arc<RdmaSource>, RdmaError> {
        Ok(Arc::new(RdmaSource {
            pd: device.alloc_pd()?,
            map,
            local: Mutex::new(Arc::default()),
            rail_fault: std::sync::OnceLock::new(),
        }))
    }

    /// A new queue pair to announce to the peer.
    pub fn prepare_qp(&self) -> Result<PreparedQp, RdmaError> {
        PreparedQp::new(&self.pd, false)
    }

    /// Registered memory covering `extents`, registering the blocks of
    /// [`LOCAL_BLOCK_BYTES`] they reach that are not yet. Registration pins (and so faults
    /// in) every page of a block: a block no write reaches (all hole) is never pinned, and
    /// the cost is spread over round 0 instead of a pass over all of RAM before its first
    /// write. (Holes are found before round 0 writes anything: a hole pinned later reads as
    /// zero data, never as a hole.)
    pub(super) fn local_for(&self, extents: &[(u64, u64)]) -> Result<Arc<LocalMemory>, RdmaError> {
        let blocks = {
            let g = self.local.lock().unwrap_or_else(|p| p.into_inner());
            if g.covers(extents) {
                return Ok(g.clone());
            }
            self.missing_blocks(&g, extents)?
        };
        // Registered outside the lock: writers needing different blocks register them in
        // parallel (pinning is most of round 0's set-up cost for a large VM).
        let mut fresh = Vec::with_capacity(blocks.len());
        for b in blocks {
            fresh.push((b, Arc::new(self.pd.register_local_part(&self.map, b)?)));
        }
        let mut g = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = LocalMemory {
            mrs: g.mrs.clone(),
            segments: g.segments.clone(),
        };
        for (b, mr) in fresh {
            if g.segment(b.addr).is_some() {
                // Another writer registered this block meanwhile: ours is released.
                continue;
            }
            next.segments.push(LocalSegment {
                addr: b.addr,
                host: b.host as u64,
                len: b.len,
                lkey: mr.lkey(),
            });
            next.mrs.push(mr);
        }
        next.segments.sort_by_key(|s| s.addr);
        *g = Arc::new(next);
        Ok(g.clone())
    }

    /// The blocks of [`LOCAL_BLOCK_BYTES`] that `extents` reach and `have` does not hold.
    fn missing_blocks(
        &self,
        have: &LocalMemory,
        extents: &[(u64, u64)],
    ) -> Result<Vec<MappedRegion>, RdmaError> {
        let mut blocks: Vec<MappedRegion> = Vec::new();
        for &(addr, len) in extents {
            let end = extent_end(addr, len)?;
            let mut pos = addr;
            while pos < end {
                if let Some(s) = have.segment(pos) {
                    pos = s.addr + s.len;
                    continue;
                }
                let r = self
                    .map
                    .regions()
                    .iter()
                    .find(|r| pos >= r.addr && pos - r.addr < r.len)
                    .ok_or(RdmaError::Unmapped {
                        addr: pos,
                        len: end - pos,
                        side: "local",
                    })?;
                let start = r.addr + (pos - r.addr) / LOCAL_BLOCK_BYTES * LOCAL_BLOCK_BYTES;
                let stop = (start + LOCAL_BLOCK_BYTES).min(r.addr + r.len);
                if !blocks.iter().any(|b| b.addr == start) {
                    blocks.push(MappedRegion {
                        addr: start,
                        // Inside region `r` (plain address arithmetic).
                        host: r.host.wrapping_add((start - r.addr) as usize),
                        len: stop - start,
                    });
                }
                pos = stop;
            }
        }
        Ok(blocks)
    }
}

/// The test hook, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    None,
    QpErrorAfter(u64),
    WrongRkeyAfter(u64),
}

/// Set once a fault fired in this process.
pub(super) static FAULT_FIRED: AtomicBool = AtomicBool::new(false);

impl Fault {
    pub(super) fn from_env() -> Result<Fault, RdmaError> {
        let Ok(v) = std::env::var(FAULT_ENV) else {
            return Ok(Fault::None);
        };
        let bad = || RdmaError::BadFaultSpec(v.clone());
        let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
        match v.split_once(':') {
            Some(("qp-error-after", x)) => Ok(Fault::QpErrorAfter(n(x)?)),
            Some(("wrong-rkey-after", x)) => Ok(Fault::WrongRkeyAfter(n(x)?)),
            _ if v.is_empty() => Ok(Fault::None),
            _ => Err(bad()),
        }
    }
}

/// What a sender moved since the last [`RdmaSender::take_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Writes posted.
    pub writes: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// One RDMA data channel of the source: a connected QP writing into the peer's regions.
pub struct RdmaSender {
    // Field order is drop order: the QP goes before the memory it reads.
    pub(super) qp: ConnectedQp,
    pub(super) local: Option<Arc<LocalMemory>>,
    pub(super) source: Arc<RdmaSource>,
    pub(super) remote: Arc<[RemoteRegion]>,
    pub(super) posted: u64,
    pub(super) completed: u64,
    /// Bytes posted so far, and per posted batch `(last write, bytes posted up to it)`, to
    /// credit completed bytes.
    pub(super) posted_bytes: u64,
    pub(super) completed_bytes: u64,
    pub(super) batches: std::collections::VecDeque<(u64, u64)>,
    pub(super) timeout: Duration,
    pub(super) fault: Fault,
    pub(super) fault_fired: bool,
    pub(super) wrs: Vec<PlannedWrite>,
    pub(super) sges: Vec<Sge>,
    /// The scatter lists of the batch being posted, kept between posts (no allocation per
    /// batch once it has grown).
    pub(super) sge_buf: Vec<ffi::ibv_sge>,
    /// The work requests of the batch being posted, kept between posts likewise.
    pub(super) wr_buf: WrBuf,
    pub(super) stats: WriteStats,
}

/// A chain of work requests reused from post to post.
#[derive(Default)]
pub(super) struct WrBuf(Vec<ffi::ibv_send_wr>);

// SAFETY: the raw pointers inside (`next`, `sg_list`) are written for each post and read only
// by `ibv_post_send` during it; between posts they are stale and never dereferenced, so the
// buffer may move to another thread with its sender.
unsafe impl Send for WrBuf {}

impl std::fmt::Debug for RdmaSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaSender")
            .field("qp", &self.qp.num())
            .field("posted", &self.posted)
            .field("completed", &self.completed)
            .finish()
    }
}

impl RdmaSender {
    /// A data channel writing through `qp` into `remote` (which must cover every address the
    /// caller will write). A write that sees no completion for `timeout` fails.
    pub fn new(
        source: &Arc<RdmaSource>,
        qp: ConnectedQp,
        remote: Arc<[RemoteRegion]>,
        timeout: Duration,
    ) -> Result<RdmaSender, RdmaError> {
        Ok(RdmaSender {
            qp,
            local: None,
            source: source.clone(),
            remote,
            posted: 0,
            completed: 0,
            posted_bytes: 0,
            completed_bytes: 0,
            batches: std::collections::VecDeque::new(),
            timeout,
            fault: Fault::from_env()?,
            fault_fired: false,
            wrs: Vec::new(),
            sges: Vec::new(),
            sge_buf: Vec::new(),
            wr_buf: WrBuf::default(),
            stats: WriteStats::default(),
        })
    }

    /// Local QP number.
    pub fn qp_num(&self) -> u32 {
        self.qp.num()
    }

    /// Posts RDMA WRITEs for `extents` (`(addr, len)`) of the source memory to the same
    /// addresses on the peer, waiting for send-queue room as needed; returns the bytes
    /// posted. The writes complete later: see [`Self::flush`]. `stop` aborts a wait.
    pub fn write_extents(
        &mut self,
        extents: &[(u64, u64)],
        stop: &AtomicBool,
    ) -> Result<u64, RdmaError> {
        let r = self.write_extents_inner(extents, stop);
        self.note_failure(r)
    }

    /// Records a link failure for the rail's other queue pairs.
    fn note_failure<T>(&self, r: Result<T, RdmaError>) -> Result<T, RdmaError> {
        if let Err(
            e @ (RdmaError::Completion { .. }
            | RdmaError::CompletionTimeout { .. }
            | RdmaError::Verbs { .. }),
        ) = &r
        {
            let _ = self.source.rail_fault.set(e.to_string());
        }
        r
    }

    /// Fails if another queue pair of this rail saw the link fail.
    fn check_rail(&self) -> Result<(), RdmaError> {
        match self.source.rail_fault.get() {
            Some(cause) => Err(RdmaError::RailDown {
                qp: self.qp.num(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn write_extents_inner(
        &mut self,
        extents: &[(u64, u64)],
        stop: &AtomicBool,
    ) -> Result<u64, RdmaError> {
        self.check_rail()?;
        let local = match &self.local {
            Some(l) if l.covers(extents) => l.clone(),
            _ => {
                let l = self.source.local_for(extents)?;
                self.local = Some(l.clone());
                l
            }
        };
        self.wrs.clear();
        self.sges.clear();
        plan_writes(
            &local.segments,
            &self.remote,
            extents,
            MAX_WRITE_BYTES,
            self.qp.qp.max_sge as usize,
            &mut self.wrs,
            &mut self.sges,
        )?;
        let total: u64 = self.wrs.iter().map(|w| w.bytes).sum();
        let depth = u64::from(self.qp.qp.sq_depth);
        let mut next = 0;
        while next < self.wrs.len() {
            // Room in the send queue and under the in-flight cap (an empty queue always has
            // room); every batch ends signalled, so waiting always ends.
            let room = depth.saturating_sub(self.posted - self.completed) as usize;
            let mut n = 0;
            let mut bytes = 0;
            let inflight = self.posted_bytes - self.completed_bytes;
            while n < room.min(self.wrs.len() - next) {
                let b = self.wrs[next + n].bytes;
                if (inflight > 0 || n > 0) && inflight + bytes + b > MAX_INFLIGHT_BYTES {
                    break;
                }
                bytes += b;
                n += 1;
            }
            if n == 0 {
                let target = self.completed + 1;
                self.wait_completed(target, stop)?;
                continue;
            }
            self.post_batch(next, n)?;
            self.posted_bytes += bytes;
            self.batches.push_back((self.posted, self.posted_bytes));
            next += n;
        }
        self.stats.writes += self.wrs.len() as u64;
        self.stats.bytes += total;
        Ok(total)
    }

    pub(super) fn post_batch(&mut self, first: usize, n: usize) -> Result<(), RdmaError> {
        let mut sge_list = std::mem::take(&mut self.sge_buf);
        sge_list.clear();
        for w in &self.wrs[first..first + n] {
            for s in &self.sges[w.first..w.first + w.count] {
                sge_list.push(ffi::ibv_sge {
                    addr: s.host,
                    length: s.len,
                    lkey: s.lkey,
                });
            }
        }
        let mut chain = std::mem::take(&mut self.wr_buf.0);
        chain.clear();
        // SAFETY: plain C structs; all-zero is a valid starting value.
        chain.resize_with(n, || unsafe { std::mem::zeroed() });
        let mut sge_at = 0usize;
        let mut fire_error = false;
        for (i, w) in self.wrs[first..first + n].iter().enumerate() {
            let seq = self.posted + 1 + i as u64;
            let mut rkey = w.rkey;
            match self.fault {
                Fault::WrongRkeyAfter(k) if seq > k && (self.fault_fired || fire_once()) => {
                    self.fault_fired = true;
                    rkey ^= 0x00ff_0f0f;
                }
                Fault::QpErrorAfter(k) if seq == k && !self.fault_fired && fire_once() => {
                    self.fault_fired = true;
                    fire_error = true;
                }
                _ => {}
            }
            let wr = &mut chain[i];
            wr.wr_id = seq;
            wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
            // SAFETY: `sge_at..sge_at + count` is inside `sge_list`, which outlives the post.
            wr.sg_list = unsafe { sge_list.as_mut_ptr().add(sge_at) };
            wr.num_sge = w.count as i32;
            sge_at += w.count;
            // Selective signalling: every SIGNAL_EVERY-th write, and the last of each batch so
            // that waiting for send-queue room or for a flush always ends.
            let signal = seq % SIGNAL_EVERY == 0 || i + 1 == n;
            wr.send_flags = if signal {
                ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            wr.wr.rdma = ffi::rdma_t {
                remote_addr: w.remote_addr,
                rkey,
            };
        }
        for i in 0..n.saturating_sub(1) {
            let next: *mut ffi::ibv_send_wr = &mut chain[i + 1];
            chain[i].next = next;
        }
        // SAFETY: the chain and its SGE arrays live until `post` returns. Every SGE names
        // source memory inside a registered region (planned against `local.segments`) under
        // its lkey; `self.local` keeps the regions registered, and the memory mapped, for as
        // long as this sender lives, and the QP (destroyed first when the sender drops) is the
        // only thing that reads it. The remote side was registered by the peer for writing.
        let posted = unsafe { self.qp.post(chain.as_mut_ptr()) };
        self.wr_buf.0 = chain;
        self.sge_buf = sge_list;
        posted?;
        self.posted += n as u64;
        if fire_error {
            self.qp.force_error()?;
        }
        Ok(())
    }

    /// Waits until every write posted so far completed: RC completions mean the data was
    /// placed in the peer's memory.
    pub fn flush(&mut self, stop: &AtomicBool) -> Result<(), RdmaError> {
        let target = self.posted;
        let r = self.wait_completed(target, stop);
        self.note_failure(r)
    }

    /// Writes and bytes since the last call.
    pub fn take_stats(&mut self) -> WriteStats {
        std::mem::take(&mut self.stats)
    }

    pub(super) fn wait_completed(
        &mut self,
        target: u64,
        stop: &AtomicBool,
    ) -> Result<(), RdmaError> {
        let mut last_progress = Instant::now();
        let mut wcs = [const { MaybeUninit::<ffi::ibv_wc>::uninit() }; 16];
        // A live queue pair completes a write, or fails it after its retries, within seconds:
        // waiting longer than STALL_LIMIT means the link is gone, and the peer must hear of it
        // well before its own timeout gives the whole migration up.
        let stall = self.timeout.min(STALL_LIMIT);
        while self.completed < target {
            if self.reap(&mut wcs)? > 0 {
                last_progress = Instant::now();
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                return Err(RdmaError::Stopped);
            }
            self.check_rail()?;
            if last_progress.elapsed() >= stall {
                return Err(RdmaError::CompletionTimeout {
                    qp: self.qp.num(),
                    secs: stall.as_secs(),
                    outstanding: self.posted - self.completed,
                });
            }
            // A completion due within microseconds is cheaper to poll for than to sleep on:
            // spin briefly before arming the channel (a system call and a wake-up).
            let spin = Instant::now();
            let mut got = 0;
            while got == 0 && spin.elapsed() < SPIN_BEFORE_ARM {
                got = self.reap(&mut wcs)?;
                std::hint::spin_loop();
            }
            if got > 0 {
                last_progress = Instant::now();
                continue;
            }
            self.qp.qp.cq.arm()?;
            // A completion that arrived before arming raises no event: look once more.
            if self.reap(&mut wcs)? > 0 {
                last_progress = Instant::now();
                continue;
            }
            self.qp.qp.cq.wait(Duration::from_millis(100))?;
        }
        Ok(())
    }

    pub(super) fn reap(
        &mut self,
        wcs: &mut [MaybeUninit<ffi::ibv_wc>],
    ) -> Result<usize, RdmaError> {
        let n = self.qp.qp.cq.poll(wcs)?;
        for wc in &wcs[..n] {
            // SAFETY: poll_cq initialised the first `n` entries.
            let wc = unsafe { wc.assume_init_ref() };
            if wc.status != ffi::ibv_wc_status::IBV_WC_SUCCESS {
                // SAFETY: returns a static string for any status.
                let status = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(wc.status)) }
                    .to_string_lossy()
                    .into_owned();
                return Err(RdmaError::Completion {
                    qp: self.qp.num(),
                    status,
                    code: wc.status,
                    vendor_err: wc.vendor_err,
                    wr_id: wc.wr_id,
                    note: if self.fault_fired {
                        " (fault injected by the LIVEMIG_RDMA_FAULT test hook)"
                    } else {
                        ""
                    },
                });
            }
            // RC completes in order: a completion covers every earlier write.
            self.completed = self.completed.max(wc.wr_id);
        }
        while let Some(&(last, bytes)) = self.batches.front() {
            if last > self.completed {
                break;
            }
            self.completed_bytes = bytes;
            self.batches.pop_front();
        }
        Ok(n)
    }
}

pub(super) fn fire_once() -> bool {
    !FAULT_FIRED.swap(true, Ordering::SeqCst)
}

/// The destination end: its memory registered for remote writes and one connected QP per
/// source QP. Dropping it revokes the peer's access (QPs destroyed, then regions
/// deregistered).
pub struct RdmaTarget {
    // Field order is drop order: QPs before the regions they give access to.
    pub(super) qps: Vec<ConnectedQp>,
    pub(super) mrs: Vec<MemoryRegion>,
    pub(super) _pd: Arc<ProtectionDomain>,
}

impl std::fmt::Debug for RdmaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTarget")
            .field("qps", &self.qps.iter().map(|q| q.num()).collect::<Vec<_>>())
            .field("regions", &self.regions())
            .finish()
    }
}

/// Memory registered for remote writes on one device: made for a migration, or ahead of one
/// (a destination's reserved RAM, so the registration is not part of the set-up).
pub struct RdmaRegistration {
    mrs: Vec<MemoryRegion>,
    pd: Arc<ProtectionDomain>,
}

impl std::fmt::Debug for RdmaRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaRegistration")
            .field("device", &self.pd.device.name())
            .field("regions", &self.mrs.len())
            .finish()
    }
}

impl RdmaRegistration {
    /// Registers `map` for remote writes on `device`.
    pub fn new(device: &Arc<Device>, map: &MemoryMap) -> Result<RdmaRegistration, RdmaError> {
        let pd = device.alloc_pd()?;
        let mrs = pd.register(map, Access::RemoteWrite)?;
        Ok(RdmaRegistration { mrs, pd })
    }

    /// The device it is registered on.
    pub fn device_name(&self) -> &str {
        self.pd.device.name()
    }

    /// Whether it registers exactly the regions of `map` (same addresses, host mappings and
    /// lengths, in order).
    pub fn matches(&self, map: &MemoryMap) -> bool {
        let mine = map.regions();
        mine.len() == self.mrs.len()
            && mine.iter().zip(&self.mrs).all(|(r, m)| {
                r.addr == m.region.addr && r.host == m.region.host && r.len == m.region.len
            })
    }
}

impl RdmaTarget {
    /// Registers `map` for remote writes on `device` and connects one QP to each of
    /// `sources`.
    pub fn new(
        device: &Arc<Device>,
        map: &MemoryMap,
        sources: &[QpEndpoint],
    ) -> Result<RdmaTarget, RdmaError> {
        RdmaTarget::on(RdmaRegistration::new(device, map)?, sources)
    }

    /// Connects one QP to each of `sources` into memory registered already.
    pub fn on(reg: RdmaRegistration, sources: &[QpEndpoint]) -> Result<RdmaTarget, RdmaError> {
        let mut qps = Vec::with_capacity(sources.len());
        for s in sources {
            qps.push(PreparedQp::new(&reg.pd, true)?.connect(s)?);
        }
        Ok(RdmaTarget {
            qps,
            mrs: reg.mrs,
            _pd: reg.pd,
        })
    }

    /// This side's QPs, in the order of the sources given to [`Self::new`].
    pub fn endpoints(&self) -> Vec<QpEndpoint> {
        self.qps
            .iter()
            .map(|q| {
                let sel = &q.qp.device().sel;
                QpEndpoint {
                    qpn: q.num(),
                    psn: q.qp.psn,
                    gid: sel.gid.gid,
                    lid: sel.lid,
                    mtu: sel.mtu_code,
                }
            })
            .collect()
    }

    /// Closes memory to the source for good: the QPs are destroyed, so no write can land any
    /// more (they are the only QPs of this protection domain). The registrations stay until
    /// the target drops — after the VM resumed, outside the downtime.
    pub fn revoke(&mut self) {
        self.qps.clear();
    }

    /// The registered regions, as the source addresses them.
    pub fn regions(&self) -> Vec<RemoteRegion> {
        self.mrs
            .iter()
            .map(|m| RemoteRegion {
                addr: m.region.addr,
                len: m.region.len,
                remote_addr: m.region.host as u64,
                rkey: m.rkey(),
            })
            .collect()
    }
}

/// Checks that `regions` from a peer cover `map` exactly, region for region.
pub fn check_remote_regions(map: &MemoryMap, regions: &[RemoteRegion]) -> Result<(), RdmaError> {
    let mine = map.regions();
    if mine.len() != regions.len() {
        return Err(RdmaError::Peer(format!(
            "{} remote regions for {} local ones",
            regions.len(),
            mine.len()
        )));
    }
    for (m, r) in mine.iter().zip(regions) {
        if m.addr != r.addr || m.len != r.len || r.remote_addr.checked_add(r.len).is_none() {
            return Err(RdmaError::Peer(format!(
                "remote region {:#x}+{:#x} does not match local region {:#x}+{:#x}",
                r.addr, r.len, m.addr, m.len
            )));
        }
    }
    Ok(())
}
