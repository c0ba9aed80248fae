//! Accepting the incoming data plane: the session's TCP data connections (each bound by its
//! ChannelHello) or, when RDMA was agreed, the source's queue pairs on the control
//! connection. After that, what differs between the two is behind [`IncomingPlane`].

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_transport::tcp::DataReceiver;
use livemig_transport::{MappedRegion, MemoryMap};
use tracing::{info, warn};

use super::handshake::{Agreed, Built};
use super::receive::TcpPlane;
use super::{refuse, Session};
use crate::auth::SessionKeys;
use crate::digest::PageHashes;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::protocol::{Message, RdmaQp, RoundSequence};
use crate::scheduler::thread_cpu_ns;
use crate::session::{Control, MigrationError};
use crate::storage::incoming::IncomingStorage;

/// The RDMA device opened for a migration, reaching the source, and the devices this side may
/// take further rails on (an uninhabited type without the `rdma` feature).
#[cfg(feature = "rdma")]
pub(super) type RdmaDevice = Arc<RdmaHere>;

/// See [`RdmaDevice`].
#[cfg(feature = "rdma")]
pub(super) struct RdmaHere {
    primary: Arc<livemig_transport::rdma::Device>,
    /// `--rdma-device` names (empty: any device).
    names: Vec<String>,
}
#[cfg(not(feature = "rdma"))]
pub(super) type RdmaDevice = std::convert::Infallible;

/// Destination RAM registered for RDMA writes ahead of a migration (an uninhabited type without
/// the `rdma` feature).
#[cfg(feature = "rdma")]
pub type RdmaRegistration = livemig_transport::rdma::RdmaRegistration;
/// See above.
#[cfg(not(feature = "rdma"))]
pub type RdmaRegistration = std::convert::Infallible;

/// Registers reserved RAM for RDMA writes on the first of `devices` that works (the first
/// active device when none is named), so an RDMA migration into it skips that at set-up.
pub fn register_reserved(ram: &GuestRam, devices: &[String]) -> Result<RdmaRegistration, String> {
    #[cfg(feature = "rdma")]
    {
        let dev = livemig_transport::rdma::Device::open_among(devices, None)
            .map_err(|e| e.to_string())?;
        RdmaRegistration::new(&dev, &memory_map(ram, None)).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = (ram, devices);
        Err("this livemig was built without RDMA".into())
    }
}

/// The source's RDMA access to destination RAM: revoked before anything here reads or runs on
/// that RAM; dropping it releases the registrations too.
trait Revoke: Send {
    /// No write of the source can land any more.
    fn revoke(&mut self);
}

#[cfg(feature = "rdma")]
impl Revoke for Vec<livemig_transport::rdma::RdmaTarget> {
    fn revoke(&mut self) {
        for t in self {
            t.revoke();
        }
    }
}

type RdmaAccess = Box<dyn Revoke>;

/// What the destination's state machine needs of the data plane once it is accepted.
pub(super) trait IncomingPlane {
    /// The source reports on an RDMA round (the destination sees no page arrive); a plane
    /// that carries its own round markers refuses this.
    fn round_progress(&mut self, round: u64, pages: u64, complete: bool) -> Result<(), String>;
    /// The source lists pages it wrote in `round`, all landed (RDMA from protocol 3); a plane
    /// whose receivers see the pages refuses this.
    fn round_extents(&mut self, round: u64, extents: &[(u64, u64)]) -> Result<(), String>;
    /// Pages landed so far (a sign of life during a long pre-copy).
    fn pages(&self) -> u64;
    /// Waits, at most `limit`, until every page of pre-copy round `round` is in RAM (the
    /// source asks before it pauses the guest: [`crate::protocol::FEATURE_LANDED`]); false
    /// if they were not all in by then. A plane whose pages are in RAM once the source hears
    /// of them (RDMA) returns at once.
    fn wait_landed(&self, _round: u64, _limit: Duration) -> Result<bool, MigrationError> {
        Ok(true)
    }
    /// The device state names `final_round` as the last: wait until every page of it
    /// landed, then close guest RAM to the source for good.
    fn finish(&mut self, final_round: u64, timeout: Duration) -> Result<(), MigrationError>;
    /// Digest of guest RAM as it stands, and the CPU time the plane used.
    fn digest(&self, ram: &GuestRam) -> (u64, u64);
    /// Whether [`IncomingPlane::digest`] reads guest RAM (a full pass) rather than the hashes
    /// taken as pages landed: then it must not overlap the state restore, which writes RAM.
    fn digest_reads_ram(&self) -> bool {
        false
    }
    /// Why the data path failed, if it did (explains a control connection cut because of it).
    fn failure(&self) -> Option<String>;
    /// Stops and releases everything (idempotent; after success or failure).
    fn close(&mut self);
}

/// The regions of `ram` as the transport sees them, and the disks being copied.
pub(super) fn memory_map(ram: &GuestRam, storage: Option<&IncomingStorage>) -> MemoryMap {
    let mut regions: Vec<MappedRegion> = ram
        .host_regions()
        .into_iter()
        .map(|(addr, host, len)| MappedRegion { addr, host, len })
        .collect();
    let copying = storage.filter(|s| s.copying());
    let disks = copying.map(|s| {
        let (r, owner) = s.regions();
        regions.extend(r);
        owner
    });
    let files = copying.map(|s| s.files()).unwrap_or_default();
    // SAFETY: the regions are the live mappings of `ram` and of the disk copies, kept alive
    // by the clones passed as owner (the copies' files stay open with the VM's images, which
    // outlive the plane). Until the plane finishes only the receivers write them (a page at
    // most once per round, rounds separated by the barrier; disk blocks on one ordered lane)
    // and no Rust reference into them exists.
    unsafe { MemoryMap::new(regions, Arc::new((ram.clone(), disks))) }.with_files(files)
}

impl Session {
    /// Accepts the data plane the handshake agreed on.
    pub(super) fn accept_plane(
        &mut self,
        listener: &TcpListener,
        agreed: &Agreed,
        built: &Built,
    ) -> Result<Box<dyn IncomingPlane>, MigrationError> {
        let rdma = agreed.rdma.clone();
        let copying = self.storage.copying();
        let keys = self.ctl.keys().cloned();
        match accept_channels(
            listener,
            &mut self.ctl,
            keys.as_ref(),
            // A copy of disks adds the storage lane, the last channel.
            agreed.channels + u16::from(copying),
            agreed.token,
            self.timeout,
            rdma.is_some(),
        )? {
            Channels::Tcp(receivers) => Ok(Box::new(TcpPlane::start(
                receivers,
                &built.ram,
                &self.storage,
                &self.ctl,
                self.round_counts,
                self.opts.receiver_hashing,
            )?)),
            Channels::Rdma(_) if copying => {
                Err(self
                    .refuse("a copy of disks travels on a TCP storage lane, not over RDMA".into()))
            }
            Channels::Rdma(qps) => {
                // Reserved RAM may be registered already (`receive --reserve-mib`).
                let pre = if built.used_reserved_ram {
                    self.opts.reserved_rdma.take()
                } else {
                    None
                };
                let access = accept_rdma(
                    &mut self.ctl,
                    (rdma, pre),
                    &built.ram,
                    agreed.channels,
                    &qps,
                )?;
                // From protocol 3 the source lists each round's pages: they are hashed
                // while the migration runs, not all of RAM inside the downtime.
                let hasher = (self.ctl.version() >= 3).then(|| Hasher::start(&built.ram));
                Ok(Box::new(RdmaPlane::new(access, hasher)))
            }
        }
    }
}

/// RDMA: the source writes RAM unseen and reports each round on the control channel.
struct RdmaPlane {
    access: Option<RdmaAccess>,
    rounds: RoundSequence,
    /// Hashes the pages each round wrote (None: a source older than protocol 3, whose RAM
    /// is hashed in one pass inside the downtime).
    hasher: Mutex<Option<Hasher>>,
}

impl RdmaPlane {
    fn new(access: RdmaAccess, hasher: Option<Hasher>) -> Self {
        RdmaPlane {
            access: Some(access),
            rounds: RoundSequence::default(),
            hasher: Mutex::new(hasher),
        }
    }
}

/// Threads that hash the pages each completed round wrote. A page always goes to the same
/// thread (its 2 MiB shard's), which hashes its queue in order: a page the NIC rewrites later
/// is listed again in that later round and hashed again after it, so every page's last hash
/// follows its last write. Several threads, because one core hashes slower than a fast link
/// writes: the backlog left at the end of a round would land in the downtime.
struct Hasher {
    ram: GuestRam,
    hashes: Arc<PageHashes>,
    txs: Vec<crossbeam_channel::Sender<Vec<(u64, u64)>>>,
    threads: Vec<JoinHandle<u64>>,
}

/// The unit of work a hashing thread owns.
const HASH_SHARD: u64 = 2 << 20;

impl Hasher {
    fn start(ram: &GuestRam) -> Hasher {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        Hasher::with_threads(ram, n)
    }

    fn with_threads(ram: &GuestRam, n: usize) -> Hasher {
        let hashes = Arc::new(PageHashes::new_zeroed(ram.layout()));
        let mut txs = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded::<Vec<(u64, u64)>>();
            let (r, h) = (ram.clone(), hashes.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("livemig-hash{i}"))
                .spawn(move || {
                    let cpu = thread_cpu_ns();
                    let regions = r.host_regions();
                    for batch in rx {
                        for (gpa, pages) in batch {
                            hash_extent(&regions, &h, gpa, pages * PAGE_SIZE);
                        }
                    }
                    thread_cpu_ns().saturating_sub(cpu)
                });
            match spawned {
                Ok(t) => {
                    txs.push(tx);
                    threads.push(t);
                }
                // Fewer threads than asked: the shards spread over those that started (none:
                // the plane hashes all RAM at the end).
                Err(_) => break,
            }
        }
        Hasher {
            ram: ram.clone(),
            hashes,
            txs,
            threads,
        }
    }

    /// Queues `extents` after checking each lies in guest RAM.
    fn queue(&self, extents: &[(u64, u64)]) -> Result<(), String> {
        let layout = self.ram.layout();
        for &(gpa, pages) in extents {
            let end = pages
                .checked_mul(PAGE_SIZE)
                .and_then(|len| gpa.checked_add(len));
            let inside = end.is_some_and(|end| {
                pages > 0
                    && gpa % PAGE_SIZE == 0
                    && layout
                        .regions
                        .iter()
                        .any(|r| gpa >= r.gpa && end <= r.gpa + r.size)
            });
            if !inside {
                return Err(format!(
                    "extent of {pages} pages at {gpa:#x} is not in guest RAM"
                ));
            }
        }
        let n = self.txs.len();
        if n == 0 {
            return Ok(());
        }
        let mut per: Vec<Vec<(u64, u64)>> = vec![Vec::new(); n];
        for &(gpa, pages) in extents {
            let end = gpa + pages * PAGE_SIZE;
            let mut pos = gpa;
            while pos < end {
                let shard = pos / HASH_SHARD;
                let stop = end.min((shard + 1) * HASH_SHARD);
                per[(shard % n as u64) as usize].push((pos, (stop - pos) / PAGE_SIZE));
                pos = stop;
            }
        }
        for (tx, batch) in self.txs.iter().zip(per) {
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
        }
        Ok(())
    }

    /// Waits for every queued page to be hashed: the RAM digest, and the CPU time spent.
    fn finish(mut self) -> Option<(u64, u64)> {
        if self.threads.is_empty() {
            return None;
        }
        self.txs.clear();
        let mut cpu = 0;
        for t in std::mem::take(&mut self.threads) {
            cpu += t.join().ok()?;
        }
        Some((self.hashes.digest(), cpu))
    }
}

/// Hashes `len` bytes of guest RAM at `gpa` (inside one region of `regions`, as checked).
fn hash_extent(regions: &[(u64, *mut u8, u64)], hashes: &PageHashes, gpa: u64, len: u64) {
    if let Some(&(base, host, _)) = regions
        .iter()
        .find(|&&(b, _, size)| gpa >= b && gpa + len <= b + size)
    {
        // SAFETY: the extent lies in the region mapped at `host` (checked when queued), kept
        // mapped by the GuestRam clone the thread holds. The source completed every write to
        // it before listing it; a later write by the NIC only makes this hash stale, and that
        // page is listed and hashed again after the later round.
        unsafe { hashes.update(gpa, len, host.add((gpa - base) as usize)) };
    }
}

impl IncomingPlane for RdmaPlane {
    fn round_progress(&mut self, round: u64, pages: u64, complete: bool) -> Result<(), String> {
        self.rounds.progress(round, pages, complete)
    }

    fn round_extents(&mut self, round: u64, extents: &[(u64, u64)]) -> Result<(), String> {
        if self.rounds.completed().is_some_and(|c| c >= round) {
            return Err(format!("extents of round {round}, which already completed"));
        }
        match &*self.hasher.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(h) => h.queue(extents),
            None => Err("RoundExtents from a source of protocol 2 or older".into()),
        }
    }

    fn pages(&self) -> u64 {
        self.rounds.pages()
    }

    fn finish(&mut self, final_round: u64, _timeout: Duration) -> Result<(), MigrationError> {
        // Every write the source will make is done: revoke its access (QPs destroyed) before
        // anything here reads or runs on that RAM. RAM is deregistered at close, once the VM
        // runs: that cost, which grows with RAM, stays out of the downtime.
        let t = Instant::now();
        if let Some(a) = self.access.as_mut() {
            a.revoke();
        }
        info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            "RDMA access revoked (queue pairs destroyed)"
        );
        let completed = self.rounds.completed();
        if completed.is_none_or(|c| c < final_round) {
            return Err(MigrationError::DataChannel(format!(
                "the source sent device state for final round {final_round} but completed only {}",
                completed.map_or("no round".to_string(), |c| format!("round {c}"))
            )));
        }
        Ok(())
    }

    fn digest_reads_ram(&self) -> bool {
        self.hasher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    fn digest(&self, ram: &GuestRam) -> (u64, u64) {
        let t = Instant::now();
        let hasher = self
            .hasher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(d) = hasher.and_then(Hasher::finish) {
            info!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                "RAM digest (last round's pages)"
            );
            return d;
        }
        // No receiver saw the pages, and the source did not list them: hash all of RAM once
        // (inside the downtime).
        let d = super::receive::full_digest(ram);
        info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            "RAM digest (full pass)"
        );
        d
    }

    fn failure(&self) -> Option<String> {
        None
    }

    fn close(&mut self) {
        if let Some(mut a) = self.access.take() {
            // Revoked first in any case (a failed migration may not have finished).
            a.revoke();
            let t = Instant::now();
            drop(a);
            info!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                "RDMA registrations released"
            );
        }
    }
}

/// How the source sends pages.
enum Channels {
    /// TCP data connections, one receiver each.
    Tcp(Vec<DataReceiver>),
    /// RDMA: the source's queue pairs.
    Rdma(Vec<RdmaQp>),
}

/// Most data connections greeted at once (strangers beyond it are dropped unread).
const MAX_PENDING_HELLOS: usize = 16;

/// Accepts the data connections of the session — or, when `rdma` was agreed, the source's
/// RdmaConnect on the control connection.
fn accept_channels(
    listener: &TcpListener,
    ctl: &mut Control,
    keys: Option<&SessionKeys>,
    channels: u16,
    token: u64,
    timeout: Duration,
    rdma: bool,
) -> Result<Channels, MigrationError> {
    let mut slots: Vec<Option<DataReceiver>> = (0..channels).map(|_| None).collect();
    let mut rdma_qps = None;
    let deadline = Instant::now() + timeout;
    // ChannelHellos are read concurrently, each on its own thread within its deadline: a
    // stranger that connects and says nothing delays no real channel.
    let (hello_tx, hellos) = crossbeam_channel::unbounded();
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _ = listener.set_nonblocking(true);
    let result = (|| {
        while slots.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                return Err(MigrationError::Timeout {
                    secs: timeout.as_secs(),
                    during: "waiting for data channels",
                });
            }
            while let Ok(hello) = hellos.try_recv() {
                match hello {
                    Some((i, rx)) if slots.get(usize::from(i)).is_some_and(Option::is_none) => {
                        let rx: DataReceiver = rx;
                        let _ = rx.stream().set_read_timeout(None);
                        slots[usize::from(i)] = Some(rx);
                    }
                    _ => warn!("dropped a connection that is not a data channel of this session"),
                }
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(qps) = control_quiet(ctl, rdma)? {
                        rdma_qps = Some(qps);
                        return Ok(());
                    }
                    // A connection or a control message ends the wait at once; a greeting
                    // that ends (on its own thread) is seen within 2 ms.
                    super::accept::wait_readable(
                        &[listener.as_raw_fd(), ctl.stream().as_raw_fd()],
                        Duration::from_millis(2),
                    );
                    continue;
                }
                Err(source) => {
                    return Err(MigrationError::Connect {
                        addr: "data listener".into(),
                        source,
                    })
                }
            };
            let _ = stream.set_nonblocking(false);
            use std::sync::atomic::Ordering;
            if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HELLOS {
                pending.fetch_sub(1, Ordering::SeqCst);
                warn!("dropped a data connection: {MAX_PENDING_HELLOS} are still greeting");
                continue;
            }
            let (tx, left, keys) = (hello_tx.clone(), pending.clone(), keys.cloned());
            let spawned = std::thread::Builder::new()
                .name("livemig-hello".into())
                .spawn(move || {
                    let r = crate::session::channel_hello(stream, timeout, token, keys.as_ref());
                    left.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(r);
                });
            if spawned.is_err() {
                pending.fetch_sub(1, Ordering::SeqCst);
                warn!("dropped a data connection: no thread to greet it");
            }
        }
        Ok(())
    })();
    let _ = listener.set_nonblocking(false);
    result?;
    if let Some(qps) = rdma_qps {
        return Ok(Channels::Rdma(qps));
    }
    Ok(Channels::Tcp(slots.into_iter().flatten().collect()))
}

/// While waiting for data channels, the source may abort or vanish on the control connection
/// — or, with `rdma` agreed, send its queue pairs instead.
fn control_quiet(ctl: &mut Control, rdma: bool) -> Result<Option<Vec<RdmaQp>>, MigrationError> {
    if ctl.has_unread() || !ctl.has_input() {
        return Ok(None);
    }
    // Data, EOF or an error: let the control reader say what it is.
    match ctl.recv(Some(Duration::from_secs(5)), "waiting for data channels")? {
        Message::RdmaConnect { qps } if rdma => Ok(Some(qps)),
        // The source sent its last round and device state (or, before pausing, asked for its
        // last round to land) before this side greeted its last channel: kept for the
        // switchover, which waits for that round's pages.
        m @ (Message::DeviceState { .. }
        | Message::DiskDigests { .. }
        | Message::AwaitLanded { .. })
            if !rdma =>
        {
            ctl.unread(m);
            Ok(None)
        }
        m => Err(ctl.unexpected(&m, "waiting for data channels")),
    }
}

/// Opens the RDMA device for a source that offers RDMA; None (with a warning) when this side
/// cannot take it.
pub(super) fn open_rdma(rdma_devices: &[String], ctl: &Control) -> Option<RdmaDevice> {
    #[cfg(feature = "rdma")]
    {
        let peer = ctl.stream().peer_addr().ok().map(|a| a.ip());
        match livemig_transport::rdma::Device::open_among(rdma_devices, peer) {
            Ok(d) => {
                let sel = d.selection();
                info!(
                    device = %sel.device,
                    port = sel.port,
                    gid = %std::net::Ipv6Addr::from(sel.gid.gid),
                    "taking RDMA"
                );
                Some(Arc::new(RdmaHere {
                    primary: d,
                    names: rdma_devices.to_vec(),
                }))
            }
            Err(e) => {
                warn!("the source offers RDMA but this destination cannot take it: {e}");
                None
            }
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = (rdma_devices, ctl);
        warn!("the source offers RDMA but this livemig was built without it");
        None
    }
}

/// The source's queue pairs grouped into rails: runs of QPs sharing a GID, in order, each of
/// `channels` QPs (a rail's GID appears in one run only).
fn rails_of(qps: &[RdmaQp], channels: u16) -> Result<Vec<&[RdmaQp]>, String> {
    let per = usize::from(channels.max(1));
    if qps.is_empty() || qps.len() % per != 0 {
        return Err(format!(
            "{} RDMA queue pairs for {channels} channels per rail",
            qps.len()
        ));
    }
    let rails: Vec<&[RdmaQp]> = qps.chunks(per).collect();
    for (i, r) in rails.iter().enumerate() {
        if r.iter().any(|q| q.gid != r[0].gid) {
            return Err(format!("rail {i}'s queue pairs have different GIDs"));
        }
        if rails[..i].iter().any(|o| o[0].gid == r[0].gid) {
            return Err(format!("rail {i} repeats an earlier rail's GID"));
        }
    }
    Ok(rails)
}

/// Registers RAM for the source's writes and connects a queue pair to each of the source's;
/// answers RdmaAccept, one per rail. Each rail of the source lands on this side's device in
/// its subnet (among `--rdma-device`, when given; else the device that took the session):
/// RAM is registered once per device used. The returned access, when dropped, revokes it all.
fn accept_rdma(
    ctl: &mut Control,
    (dev, mut pre): (Option<RdmaDevice>, Option<RdmaRegistration>),
    ram: &GuestRam,
    channels: u16,
    qps: &[RdmaQp],
) -> Result<RdmaAccess, MigrationError> {
    let rails = match rails_of(qps, channels) {
        Ok(r) => r,
        Err(e) => return Err(refuse(ctl, e)),
    };
    let Some(dev) = dev else {
        return Err(refuse(ctl, "RDMA was not agreed".into()));
    };
    #[cfg(feature = "rdma")]
    {
        use crate::protocol::RdmaRegion;
        use livemig_transport::rdma::{Device, QpEndpoint, RdmaTarget};
        // Per rail, the device it lands on (index into `devices`).
        let mut devices: Vec<Arc<Device>> = vec![dev.primary.clone()];
        let mut lands = Vec::with_capacity(rails.len());
        for r in &rails {
            let from = std::net::Ipv6Addr::from(r[0].gid)
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4);
            let pick = if rails.len() == 1 {
                None
            } else {
                livemig_transport::rdma::devices()
                    .and_then(|d| {
                        livemig_transport::rdma::select_among(
                            &d,
                            &dev.names,
                            from,
                            &livemig_transport::rdma::ipv4_prefix,
                        )
                    })
                    .ok()
                    .filter(|s| s.reaches_peer)
            };
            let i = match pick {
                None => 0,
                Some(sel) => match devices.iter().position(|d| d.name() == sel.device) {
                    Some(i) => i,
                    None => match Device::open(&sel) {
                        Ok(d) => {
                            devices.push(d);
                            devices.len() - 1
                        }
                        Err(e) => {
                            warn!(
                                "RDMA device {} for a rail: {e}; using {}",
                                sel.device,
                                devices[0].name()
                            );
                            0
                        }
                    },
                },
            };
            lands.push(i);
        }
        let map = memory_map(ram, None);
        let mut targets = Vec::with_capacity(devices.len());
        for (i, d) in devices.iter().enumerate() {
            let sources: Vec<QpEndpoint> = rails
                .iter()
                .zip(&lands)
                .filter(|(_, &l)| l == i)
                .flat_map(|(r, _)| r.iter())
                .map(|q| QpEndpoint {
                    qpn: q.qpn,
                    psn: q.psn,
                    gid: q.gid,
                    lid: q.lid,
                    mtu: q.mtu,
                })
                .collect();
            if sources.is_empty() {
                // The device that took the session carries no rail: nothing registered there.
                targets.push(None);
                continue;
            }
            let ready = pre
                .take_if(|r| r.device_name() == d.name() && r.matches(&map))
                .inspect(|r| info!(?r, "RAM registered ahead for RDMA: taken"));
            let made = match ready {
                Some(r) => RdmaTarget::on(r, &sources),
                None => RdmaTarget::new(d, &map, &sources),
            };
            match made {
                Ok(t) => targets.push(Some(t)),
                Err(e) => return Err(refuse(ctl, format!("destination cannot set up RDMA: {e}"))),
            }
        }
        // Each target's endpoints are in the order of its rails: hand them out rail by rail.
        let mut taken = vec![0usize; targets.len()];
        for (r, &i) in rails.iter().zip(&lands) {
            let Some(t) = &targets[i] else { continue };
            let eps = t.endpoints();
            let mine = &eps[taken[i]..taken[i] + r.len()];
            taken[i] += r.len();
            ctl.send(&Message::RdmaAccept {
                qps: mine
                    .iter()
                    .map(|e| RdmaQp {
                        qpn: e.qpn,
                        psn: e.psn,
                        gid: e.gid,
                        lid: e.lid,
                        mtu: e.mtu,
                    })
                    .collect(),
                regions: t
                    .regions()
                    .into_iter()
                    .map(|r| RdmaRegion {
                        gpa: r.addr,
                        len: r.len,
                        addr: r.remote_addr,
                        rkey: r.rkey,
                    })
                    .collect(),
            })?;
        }
        let targets: Vec<RdmaTarget> = targets.into_iter().flatten().collect();
        info!(
            ?targets,
            rails = rails.len(),
            "RDMA queue pairs connected; RAM open to the source's writes"
        );
        Ok(Box::new(targets))
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = (ram, rails, &mut pre);
        match dev {}
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn queue_pairs_group_into_rails_by_gid() {
        let qp = |n: u32, g: u8| RdmaQp {
            qpn: n,
            psn: 1,
            gid: [g; 16],
            lid: 0,
            mtu: 3,
        };
        let qps = [qp(1, 1), qp(2, 1), qp(3, 2), qp(4, 2)];
        let rails = rails_of(&qps, 2).unwrap();
        assert_eq!(rails.len(), 2);
        assert_eq!(rails[1][0].qpn, 3);
        assert_eq!(
            rails_of(&qps, 4).unwrap_err(),
            "rail 0's queue pairs have different GIDs"
        );
        assert!(rails_of(&qps, 3)
            .unwrap_err()
            .contains("4 RDMA queue pairs for 3"));
        assert!(rails_of(&[], 1).is_err());
        let again = [qp(1, 1), qp(2, 2), qp(3, 1)];
        assert!(rails_of(&again, 1).unwrap_err().contains("repeats"));
    }
    use crate::memory::{Populate, RamLayout};

    #[test]
    fn listed_pages_hash_to_the_digest_of_all_ram_and_strays_are_refused() {
        for threads in [1, 3] {
            listed_pages_hash_to_the_digest(threads);
        }
    }

    fn listed_pages_hash_to_the_digest(threads: usize) {
        let ram = GuestRam::new(&RamLayout::single(8 << 20), Populate::Lazy).unwrap();
        let h = Hasher::with_threads(&ram, threads);
        assert_eq!(h.threads.len(), threads);
        let write = |gpa: u64, pages: u64, byte: u8| {
            let data = vec![byte; (pages * PAGE_SIZE) as usize];
            ram.memory().write_slice(&data, GuestAddress(gpa)).unwrap();
        };
        // Round 0 writes two runs; round 1 rewrites part of one.
        write(3 * PAGE_SIZE, 1, 0xa5);
        write(100 * PAGE_SIZE, 10, 0x5a);
        h.queue(&[(3 * PAGE_SIZE, 1), (100 * PAGE_SIZE, 10)])
            .unwrap();
        write(104 * PAGE_SIZE, 2, 0x33);
        h.queue(&[(104 * PAGE_SIZE, 2)]).unwrap();
        // An extent across shards (2 MiB = 512 pages), rewritten page by page afterwards:
        // each page's last hash must be of its last content, whichever thread owns it.
        write(500 * PAGE_SIZE, 1100, 0x11);
        h.queue(&[(500 * PAGE_SIZE, 1100)]).unwrap();
        for p in (500..1600).step_by(7) {
            write(p * PAGE_SIZE, 1, (p % 251) as u8);
            h.queue(&[(p * PAGE_SIZE, 1)]).unwrap();
        }
        for stray in [
            (8 << 20, 1),                  // beyond RAM
            ((8 << 20) - PAGE_SIZE, 2),    // runs off its end
            (0, 0),                        // empty
            (1, 1),                        // not page-aligned
            (u64::MAX - 4095, 2),          // overflows
            (0, u64::MAX / PAGE_SIZE + 1), // overflows
        ] {
            assert!(h.queue(&[stray]).is_err(), "{stray:?} accepted");
        }
        let (digest, _) = h.finish().unwrap();
        assert_eq!(digest, crate::digest::ram_digest(&ram));
    }
}
