//! Verbs objects and their lifetimes: device, protection domain, memory regions, completion
//! queues and queue pairs (prepared → connected).

#[allow(unused_imports)]
use super::*;

/// An open device with the port and GID chosen for a migration.
pub struct Device {
    pub(super) raw: RawContext,
    pub(super) sel: Selection,
    pub(super) max_qp_wr: u32,
    pub(super) max_sge: u32,
    pub(super) max_cqe: u32,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("sel", &self.sel).finish()
    }
}

// SAFETY: libibverbs verbs are thread-safe (rdma-core's documented guarantee for every verb
// but the data-path calls on one QP/CQ, which this crate only issues from one thread at a
// time); the context pointer is owned and closed once in Drop.
unsafe impl Send for Device {}
// SAFETY: as above; `Device` has no interior mutability of its own.
unsafe impl Sync for Device {}

impl Device {
    /// Opens the device of `sel`.
    pub fn open(sel: &Selection) -> Result<Arc<Device>, RdmaError> {
        let list = DeviceList::get()?;
        let (name, dev) = list
            .devices()
            .find(|(n, _)| *n == sel.device)
            .ok_or_else(|| RdmaError::UnknownDevice {
                name: sel.device.clone(),
                available: list.devices().map(|d| d.0).collect::<Vec<_>>().join(", "),
            })?;
        let raw = RawContext::open(dev, &name)?;
        let attr = raw.device_attr()?;
        Ok(Arc::new(Device {
            raw,
            sel: sel.clone(),
            max_qp_wr: attr.max_qp_wr.max(1) as u32,
            max_sge: attr.max_sge.max(1) as u32,
            max_cqe: attr.max_cqe.max(1) as u32,
        }))
    }

    /// Opens the rails to `peer` (see [`select_rails`]).
    pub fn open_rails(
        names: &[String],
        peer: Option<IpAddr>,
    ) -> Result<Vec<Arc<Device>>, RdmaError> {
        let devs = devices()?;
        select_rails(&devs, names, peer, &ipv4_prefix)?
            .iter()
            .map(Device::open)
            .collect()
    }

    /// Opens the device among `names` (all when empty) that reaches `peer` (see
    /// [`select_among`]).
    pub fn open_among(names: &[String], peer: Option<IpAddr>) -> Result<Arc<Device>, RdmaError> {
        let devs = devices()?;
        Device::open(&select_among(&devs, names, peer, &ipv4_prefix)?)
    }

    /// The device, port and GID in use.
    pub fn selection(&self) -> &Selection {
        &self.sel
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.raw.name
    }

    /// Allocates a protection domain.
    pub fn alloc_pd(self: &Arc<Self>) -> Result<Arc<ProtectionDomain>, RdmaError> {
        // SAFETY: the context is open while `self` lives.
        let pd = unsafe { ffi::ibv_alloc_pd(self.raw.ctx) };
        if pd.is_null() {
            return Err(last_err("ibv_alloc_pd", self.name()));
        }
        Ok(Arc::new(ProtectionDomain {
            pd,
            device: self.clone(),
        }))
    }
}

/// A protection domain; keeps its device open.
pub struct ProtectionDomain {
    pub(super) pd: *mut ffi::ibv_pd,
    pub(super) device: Arc<Device>,
}

// SAFETY: see `Device`: verbs on a PD are thread-safe; the pointer is freed once in Drop.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an Arc to it, so none is left; freed once.
        unsafe { ffi::ibv_dealloc_pd(self.pd) };
    }
}

/// Who may access a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The local device reads it (the source of RDMA writes).
    LocalRead,
    /// The peer writes it (the target of RDMA writes).
    RemoteWrite,
}

/// A registered memory region; keeps its protection domain and the memory it pins alive.
pub struct MemoryRegion {
    pub(super) mr: *mut ffi::ibv_mr,
    pub(super) region: MappedRegion,
    pub(super) _pd: Arc<ProtectionDomain>,
    pub(super) _map: MemoryMap,
}

// SAFETY: see `Device`; the MR is immutable after registration and freed once in Drop.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// The region registered.
    pub fn region(&self) -> MappedRegion {
        self.region
    }

    /// Local key.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is valid until Drop.
        unsafe { (*self.mr).lkey }
    }

    /// Remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mr` is valid until Drop.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr, deregistered exactly once. QPs that could still
        // access it are destroyed first (their owners hold the MRs longer than the QPs).
        unsafe { ffi::ibv_dereg_mr(self.mr) };
    }
}

impl ProtectionDomain {
    /// Registers every region of `map` for `access`. The memory stays mapped (the regions
    /// hold clones of `map`) and pinned until the regions drop.
    ///
    /// With [`Access::RemoteWrite`] the peer holding the remote key may write the memory at
    /// any time until then: [`MemoryMap::new`]'s contract (no Rust references into it while
    /// the transport may write) covers this.
    pub fn register(
        self: &Arc<Self>,
        map: &MemoryMap,
        access: Access,
    ) -> Result<Vec<MemoryRegion>, RdmaError> {
        let flags = match access {
            Access::LocalRead => 0,
            Access::RemoteWrite => {
                (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                    .0
            }
        };
        map.regions()
            .iter()
            .map(|r| self.register_part(map, *r, flags))
            .collect()
    }

    /// Registers `part` of `map` (inside one of its regions) for local reads.
    pub fn register_local_part(
        self: &Arc<Self>,
        map: &MemoryMap,
        part: MappedRegion,
    ) -> Result<MemoryRegion, RdmaError> {
        self.register_part(map, part, 0)
    }

    fn register_part(
        self: &Arc<Self>,
        map: &MemoryMap,
        part: MappedRegion,
        flags: u32,
    ) -> Result<MemoryRegion, RdmaError> {
        let inside = map.regions().iter().any(|r| {
            part.addr >= r.addr
                && part.addr + part.len <= r.addr + r.len
                && part.host as u64 == r.host as u64 + (part.addr - r.addr)
        });
        if !inside || part.len == 0 {
            return Err(RdmaError::Unmapped {
                addr: part.addr,
                len: part.len,
                side: "local",
            });
        }
        // SAFETY: `part` lies inside a region of `map` (checked above), a live mapping
        // (MemoryMap's contract) kept mapped by the clone of `map` the MR holds; the PD is
        // valid.
        let mr =
            unsafe { ffi::ibv_reg_mr(self.pd, part.host.cast(), part.len as usize, flags as i32) };
        if mr.is_null() {
            return Err(last_err("ibv_reg_mr", self.device.name()));
        }
        Ok(MemoryRegion {
            mr,
            region: part,
            _pd: self.clone(),
            _map: map.clone(),
        })
    }
}

/// A completion queue with its completion channel.
pub(super) struct CompletionQueue {
    pub(super) cq: *mut ffi::ibv_cq,
    pub(super) channel: *mut ffi::ibv_comp_channel,
    pub(super) device: Arc<Device>,
}

impl CompletionQueue {
    pub(super) fn new(device: &Arc<Device>, entries: u32) -> Result<CompletionQueue, RdmaError> {
        let name = device.name();
        // SAFETY: the context is open.
        let channel = unsafe { ffi::ibv_create_comp_channel(device.raw.ctx) };
        if channel.is_null() {
            return Err(last_err("ibv_create_comp_channel", name));
        }
        // SAFETY: `channel` is valid; its fd is ours to set non-blocking.
        unsafe {
            let fd = (*channel).fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let cqe = entries.min(device.max_cqe) as i32;
        // SAFETY: the context and channel are valid.
        let cq =
            unsafe { ffi::ibv_create_cq(device.raw.ctx, cqe, std::ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = last_err("ibv_create_cq", name);
            // SAFETY: created above, unused.
            unsafe { ffi::ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        Ok(CompletionQueue {
            cq,
            channel,
            device: device.clone(),
        })
    }

    /// Takes up to `wcs.len()` completions.
    pub(super) fn poll(
        &mut self,
        wcs: &mut [MaybeUninit<ffi::ibv_wc>],
    ) -> Result<usize, RdmaError> {
        // SAFETY: the CQ is valid; poll_cq writes at most `wcs.len()` entries.
        let n = unsafe { ffi::ibv_poll_cq(self.cq, wcs.len() as i32, wcs.as_mut_ptr().cast()) };
        if n < 0 {
            return Err(verbs_err(
                "ibv_poll_cq",
                self.device.name(),
                io::Error::other(format!("returned {n}")),
            ));
        }
        Ok(n as usize)
    }

    /// Asks for an event on the next completion.
    pub(super) fn arm(&mut self) -> Result<(), RdmaError> {
        // SAFETY: the CQ is valid.
        let r = unsafe { ffi::ibv_req_notify_cq(self.cq, 0) };
        check(r, "ibv_req_notify_cq", self.device.name())
    }

    /// Waits up to `limit` for a completion event (after [`Self::arm`]).
    pub(super) fn wait(&mut self, limit: Duration) -> Result<(), RdmaError> {
        // SAFETY: the channel is valid; its fd stays open while it lives.
        let fd = unsafe { (*self.channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, limit.as_millis().min(i32::MAX as u128) as i32) };
        if r <= 0 {
            return Ok(()); // timeout or EINTR: the caller polls the CQ again either way
        }
        let mut cq = std::ptr::null_mut();
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the channel is valid and non-blocking; on success the event is acked below,
        // as ibv_destroy_cq requires of every event got.
        if unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } == 0 {
            // SAFETY: `cq` is the CQ the event was for (ours).
            unsafe { ffi::ibv_ack_cq_events(cq, 1) };
        }
        Ok(())
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: the QP using this CQ was destroyed first (QueuePair drops its QP before its
        // CQ); every event got was acked; each object is destroyed once, CQ before channel.
        unsafe {
            ffi::ibv_destroy_cq(self.cq);
            ffi::ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// Connection parameters of one queue pair, exchanged over the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// QP number (24 bits).
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
    /// GID of the port.
    pub gid: [u8; 16],
    /// LID of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU code of the port (1 = 256 ... 5 = 4096).
    pub mtu: u8,
}

/// A region of peer memory writable with RDMA: `len` bytes known as `addr` (the guest-physical
/// address), at `remote_addr` under `rkey` on the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Address as both sides name it (guest-physical).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Address in the peer's registration.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// The queue pair itself; destroyed before its CQ and PD.
pub(super) struct QueuePair {
    pub(super) qp: *mut ffi::ibv_qp,
    pub(super) cq: CompletionQueue,
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) psn: u32,
    pub(super) sq_depth: u32,
    pub(super) max_sge: u32,
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once; the hardware stops accessing
        // memory through it when this returns, before the CQ and any MR go.
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}

impl QueuePair {
    pub(super) fn num(&self) -> u32 {
        // SAFETY: `qp` is valid until Drop.
        unsafe { (*self.qp).qp_num }
    }

    pub(super) fn device(&self) -> &Device {
        &self.pd.device
    }

    pub(super) fn modify(
        &mut self,
        attr: &mut ffi::ibv_qp_attr,
        mask: u32,
        op: &'static str,
    ) -> Result<(), RdmaError> {
        // SAFETY: `qp` is valid and `attr` holds every field `mask` names.
        let r = unsafe { ffi::ibv_modify_qp(self.qp, attr, mask as i32) };
        check(r, op, self.device().name())
    }
}

/// A reliable-connected queue pair in INIT: it has a number and a PSN to announce.
pub struct PreparedQp {
    pub(super) qp: QueuePair,
}

// SAFETY: a QP and its CQ are used by one thread at a time (the owner of this value); verbs
// are thread-safe; the pointers are freed once in Drop.
unsafe impl Send for PreparedQp {}

impl PreparedQp {
    /// Creates an RC QP on `pd` and moves it to INIT. `remote_write`: the peer may write our
    /// memory through it (destination); otherwise it grants nothing (source).
    pub fn new(pd: &Arc<ProtectionDomain>, remote_write: bool) -> Result<PreparedQp, RdmaError> {
        let device = pd.device.clone();
        let depth = SEND_QUEUE_DEPTH.min(device.max_qp_wr);
        let cq = CompletionQueue::new(&device, depth + 1)?;
        // SAFETY: plain C struct; all-zero is a valid starting value.
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq;
        init.recv_cq = cq.cq;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = MAX_SGE.min(device.max_sge);
        init.cap.max_recv_sge = 1;
        init.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: PD and CQ are valid; `init` is fully set; the provider writes back caps.
        let qp = unsafe { ffi::ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(last_err("ibv_create_qp", device.name()));
        }
        let mut q = QueuePair {
            qp,
            cq,
            pd: pd.clone(),
            psn: (crate::random_u32() & 0x00ff_ffff).max(1),
            sq_depth: init.cap.max_send_wr.max(1),
            max_sge: init.cap.max_send_sge.max(1),
        };
        let mut attr = zeroed_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = device.sel.port;
        attr.qp_access_flags = if remote_write {
            (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                .0
        } else {
            0
        };
        use ffi::ibv_qp_attr_mask as m;
        q.modify(
            &mut attr,
            (m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS).0,
            "ibv_modify_qp(INIT)",
        )?;
        Ok(PreparedQp { qp: q })
    }

    /// What the peer needs to connect to this QP.
    pub fn endpoint(&self) -> QpEndpoint {
        let sel = &self.qp.device().sel;
        QpEndpoint {
            qpn: self.qp.num(),
            psn: self.qp.psn,
            gid: sel.gid.gid,
            lid: sel.lid,
            mtu: sel.mtu_code,
        }
    }

    /// Connects to the peer's QP: INIT → RTR → RTS.
    pub fn connect(mut self, remote: &QpEndpoint) -> Result<ConnectedQp, RdmaError> {
        if remote.qpn == 0 || remote.qpn > 0x00ff_ffff || remote.psn > 0x00ff_ffff {
            return Err(RdmaError::Peer(format!(
                "QP number {:#x} / PSN {:#x} out of range",
                remote.qpn, remote.psn
            )));
        }
        if !(1..=5).contains(&remote.mtu) {
            return Err(RdmaError::Peer(format!("MTU code {}", remote.mtu)));
        }
        let sel = self.qp.device().sel.clone();
        let mut attr = zeroed_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = u32::from(remote.mtu.min(sel.mtu_code.max(1)));
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = 1;
        attr.min_rnr_timer = 12;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = ffi::ibv_gid { raw: remote.gid };
        attr.ah_attr.grh.sgid_index = sel.gid.index as u8;
        attr.ah_attr.grh.hop_limit = HOP_LIMIT;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.port_num = sel.port;
        use ffi::ibv_qp_attr_mask as m;
        self.qp.modify(
            &mut attr,
            (m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER)
                .0,
            "ibv_modify_qp(RTR)",
        )?;
        let mut attr = zeroed_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = ACK_TIMEOUT;
        attr.retry_cnt = RETRY_COUNT;
        attr.rnr_retry = 7;
        attr.sq_psn = self.qp.psn;
        attr.max_rd_atomic = 1;
        self.qp.modify(
            &mut attr,
            (m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC)
                .0,
            "ibv_modify_qp(RTS)",
        )?;
        Ok(ConnectedQp {
            qp: self.qp,
            remote: *remote,
        })
    }
}

pub(super) fn zeroed_attr() -> ffi::ibv_qp_attr {
    // SAFETY: plain C struct (with unions of plain data); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// A connected (RTS) reliable-connected queue pair.
pub struct ConnectedQp {
    pub(super) qp: QueuePair,
    pub(super) remote: QpEndpoint,
}

// SAFETY: as for PreparedQp.
unsafe impl Send for ConnectedQp {}

impl ConnectedQp {
    /// Local QP number.
    pub fn num(&self) -> u32 {
        self.qp.num()
    }

    /// The peer's endpoint.
    pub fn remote(&self) -> &QpEndpoint {
        &self.remote
    }

    /// Posts a chain of RDMA WRITEs.
    ///
    /// # Safety
    ///
    /// `wrs` must be a valid chain (`next` links, `sg_list`/`num_sge` pointing to live SGE
    /// arrays for the duration of this call). The memory every SGE names must be registered
    /// under its `lkey` and stay registered and mapped until the write *completes* (a
    /// completion of it or of a later signalled write of this QP, or the QP's destruction),
    /// not just until this call returns: the device reads it asynchronously. Likewise the
    /// peer's memory named by `remote_addr`/`rkey` receives the bytes at some point before the
    /// completion.
    pub(super) unsafe fn post(&mut self, wrs: *mut ffi::ibv_send_wr) -> Result<(), RdmaError> {
        let mut bad = std::ptr::null_mut();
        // SAFETY: the caller guarantees the chain and the memory it names; the QP is valid.
        let r = unsafe { ffi::ibv_post_send(self.qp.qp, wrs, &mut bad) };
        check(r, "ibv_post_send", self.qp.device().name())
    }

    /// Moves the QP to the error state (test hook): outstanding writes flush in error.
    pub(super) fn force_error(&mut self) -> Result<(), RdmaError> {
        let mut attr = zeroed_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        self.qp.modify(
            &mut attr,
            ffi::ibv_qp_attr_mask::IBV_QP_STATE.0,
            "ibv_modify_qp(ERR)",
        )
    }
}
