//! The destination state machine: accept a source, build the VM skeleton, receive pages into
//! guest RAM on every data channel in parallel, apply device state, resume on commit.
//!
//! Nothing is resumed before the source's Commit; any failure before it discards the VM and
//! its RAM. Every address received is checked against the declared layout by the transport
//! before a byte is written.
//!
//! With RDMA (the source offers it in Hello, this side accepts it in Welcome when it has a
//! usable device) there are no receivers: RAM is registered for remote writes, the source's
//! queue pairs write pages into it unseen, and the source announces finished rounds on the
//! control channel. The registration and the queue pairs are torn down as soon as the device
//! state arrives (the source has no business writing after that) and whenever the migration
//! fails; the RAM digest is then computed with a full pass.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_transport::tcp::{DataReceiver, Landed, Received};
use livemig_transport::{frame, MappedRegion, MemoryMap};
use tracing::{info, warn};

use crate::auth::{self, Key};
use crate::digest::{ram_digest, PageHashes};
use crate::memory::{GuestRam, Populate, RamLayout, PAGE_SIZE};
use crate::protocol::{negotiate, Message, ProtocolError, RdmaQp, FEATURE_RDMA, MAX_VCPUS};
use crate::scheduler::thread_cpu_ns;
use crate::session::{Control, MigrationError};
use crate::vm::{MigratableVm, VmError, VmSpec};

/// Builds a VM skeleton over received RAM.
/// Builds a VM skeleton of the named machine over received RAM; refuses machines it cannot run.
pub type VmFactory<'a> =
    &'a dyn Fn(&str, &VmSpec, GuestRam) -> Result<Arc<dyn MigratableVm>, VmError>;

/// Options of an incoming migration.
#[derive(Default)]
pub struct IncomingOptions {
    /// RAM reserved and faulted in ahead of time (like QEMU's `-mem-prealloc` on an
    /// `-incoming` VM). Used when its layout matches the incoming one.
    pub reserved: Option<GuestRam>,
    /// Longest wait for the source during handshake and switchover (data may flow for much
    /// longer during pre-copy).
    pub timeout: Duration,
    /// How long to watch the guest's counter after resume before reporting.
    pub progress_wait: Duration,
    /// Pre-shared key; None accepts only sources without one (`--no-auth`).
    pub key: Option<Key>,
    /// Largest RAM an incoming VM may declare (0: this host's physical memory).
    pub max_ram_bytes: u64,
    /// RDMA device to take RDMA migrations on (default: the first active device with an
    /// address in the source's subnet, else the first active device).
    pub rdma_device: Option<String>,
}

/// An RDMA device opened for a migration (an uninhabited type without the `rdma` feature).
#[cfg(feature = "rdma")]
type RdmaDevice = Arc<livemig_transport::rdma::Device>;
#[cfg(not(feature = "rdma"))]
type RdmaDevice = std::convert::Infallible;

/// The source's RDMA access to destination RAM; dropping it revokes that access.
type RdmaAccess = Box<dyn std::any::Any + Send>;

/// A migrated VM, running on the destination.
pub struct Incoming {
    /// The VM, resumed.
    pub vm: Arc<dyn MigratableVm>,
    /// Pages received in all rounds.
    pub pages_received: u64,
    /// Whether the reserved RAM was used.
    pub used_reserved_ram: bool,
    /// Guest counter movement seen after resume.
    pub progress_after_resume: u64,
}

/// Receives one migration on `listener`.
pub fn receive(
    listener: &TcpListener,
    mut opts: IncomingOptions,
    factory: VmFactory<'_>,
) -> Result<Incoming, MigrationError> {
    let timeout = if opts.timeout.is_zero() {
        Duration::from_secs(60)
    } else {
        opts.timeout
    };
    let (stream, _) = listener
        .accept()
        .map_err(|source| MigrationError::Connect {
            addr: listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            source,
        })?;
    let mut ctl = Control::new(stream);
    let _ = ctl.stream().set_write_timeout(Some(timeout));
    info!(peer = ctl.peer(), "incoming migration");

    // Handshake: version, then mutual proof of the key, before any state is read.
    let nonce_d = auth::nonce();
    let mut rdma_dev: Option<RdmaDevice> = None;
    let nonce_s = match ctl.recv(Some(timeout), "waiting for Hello")? {
        Message::Hello {
            min_version,
            max_version,
            nonce,
            features,
        } => match negotiate(min_version, max_version) {
            Ok(version) => {
                let proof = opts
                    .key
                    .as_ref()
                    .map(|k| k.destination_proof(&nonce, &nonce_d))
                    .unwrap_or([0; 32]);
                if features & FEATURE_RDMA != 0 {
                    rdma_dev = open_rdma(&opts, &ctl);
                }
                ctl.send(&Message::Welcome {
                    version,
                    features: if rdma_dev.is_some() { FEATURE_RDMA } else { 0 },
                    nonce: nonce_d,
                    proof,
                })?;
                nonce
            }
            Err(reason) => {
                let _ = ctl.send(&Message::Refuse {
                    reason: reason.clone(),
                });
                return Err(MigrationError::Refused {
                    peer: ctl.peer().to_string(),
                    reason: format!("refused the source: {reason}"),
                });
            }
        },
        m => return Err(ctl.unexpected(&m, "waiting for Hello")),
    };
    let proof = match ctl.recv(Some(timeout), "waiting for the source's key proof")? {
        Message::Auth { proof } => proof,
        m => return Err(ctl.unexpected(&m, "waiting for Auth")),
    };
    let expected_token = match &opts.key {
        Some(k) => {
            if !auth::proofs_equal(&proof, &k.source_proof(&nonce_s, &nonce_d)) {
                let reason = if proof == [0; 32] {
                    "authentication failed: the source has no key (this destination requires one)"
                } else {
                    "authentication failed: the source's key does not match this destination's"
                };
                let _ = ctl.send(&Message::Refuse {
                    reason: reason.into(),
                });
                return Err(MigrationError::Refused {
                    peer: ctl.peer().to_string(),
                    reason: format!("refused the source: {reason}"),
                });
            }
            Some(k.session_token(&nonce_s, &nonce_d))
        }
        None => None,
    };
    let (machine, spec, layout, channels, token) =
        match ctl.recv(Some(timeout), "waiting for Config")? {
            Message::Config {
                machine,
                spec,
                layout,
                channels,
                token,
            } => (machine, spec, layout, channels, token),
            m => return Err(ctl.unexpected(&m, "waiting for Config")),
        };
    if expected_token.is_some_and(|t| t != token) {
        let _ = ctl.send(&Message::Refuse {
            reason: "session token does not match the authenticated session".into(),
        });
        return Err(MigrationError::Refused {
            peer: ctl.peer().to_string(),
            reason: "refused the source: wrong session token".into(),
        });
    }
    if spec.vcpus > MAX_VCPUS {
        return Err(MigrationError::Vm(VmError::InvalidSpec(format!(
            "{} vCPUs",
            spec.vcpus
        ))));
    }

    // A peer cannot make this host allocate more than it is willing to host: the RAM (and the
    // per-page hashes, 1/512 of it) is bounded before anything is allocated.
    let max_ram = if opts.max_ram_bytes == 0 {
        host_memory_bytes()
    } else {
        opts.max_ram_bytes
    };
    if layout.total_bytes() > max_ram {
        let reason = format!(
            "the VM has {} MiB of RAM; this destination accepts at most {} MiB (see --max-memory-mib)",
            layout.total_bytes() >> 20,
            max_ram >> 20
        );
        let _ = ctl.send(&Message::Refuse {
            reason: reason.clone(),
        });
        return Err(MigrationError::Vm(VmError::InvalidSpec(reason)));
    }

    // Skeleton VM and RAM.
    let (ram, used_reserved_ram) = match opts.reserved.take() {
        Some(r) if r.layout() == &layout => (r, true),
        _ => (
            GuestRam::new(&layout, Populate::Lazy).map_err(VmError::from)?,
            false,
        ),
    };
    let populating = Arc::new(AtomicBool::new(!used_reserved_ram));
    let populate = (!used_reserved_ram).then(|| spawn_populate(&ram, populating.clone()));
    let vm = match factory(&machine, &spec, ram.clone()) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = ctl.send(&Message::Refuse {
                reason: format!("destination cannot build the VM: {e}"),
            });
            return Err(e.into());
        }
    };
    let hashes = Arc::new(PageHashes::new_zeroed(&layout));
    ctl.send(&Message::Ready)?;

    // Data channels.
    let shared = Arc::new(Shared::new(channels as usize));
    if let Ok(c) = ctl.stream().try_clone() {
        *shared.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }
    let result = (|| {
        let receivers = match accept_channels(
            listener,
            &mut ctl,
            channels,
            token,
            timeout,
            rdma_dev.is_some(),
        )? {
            Channels::Tcp(r) => r,
            Channels::Rdma(qps) => {
                let access = accept_rdma(&mut ctl, rdma_dev.take(), &ram, channels, &qps)?;
                return switchover(
                    &mut ctl,
                    &*vm,
                    &hashes,
                    &shared,
                    timeout,
                    &layout,
                    Some(access),
                );
            }
        };
        let map = memory_map(&ram);
        let mut workers = Vec::new();
        for (i, rx) in receivers.into_iter().enumerate() {
            if let Ok(c) = rx.stream().try_clone() {
                shared
                    .streams
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
            workers.push(spawn_receiver(
                i,
                rx,
                map.clone(),
                hashes.clone(),
                shared.clone(),
            )?);
        }
        let r = switchover(&mut ctl, &*vm, &hashes, &shared, timeout, &layout, None);
        // A receiver's failure explains a control connection we cut because of it.
        let data_error = shared.first_error();
        shared.finish();
        for w in workers {
            let _ = w.join();
        }
        match (r, data_error) {
            (Err(MigrationError::Transport(_)), Some(e)) => {
                Err(MigrationError::Aborted(format!("data channel failed: {e}")))
            }
            (r, _) => r,
        }
    })();
    populating.store(false, Ordering::Relaxed);
    if let Some(p) = populate {
        let _ = p.join();
    }
    if let Err(e) = result {
        vm.shutdown();
        return Err(e);
    }
    let pages_received = shared.pages.load(Ordering::Relaxed);

    // Resumed: report how far the guest gets.
    let base = vm.progress().unwrap_or(0);
    let deadline = Instant::now() + opts.progress_wait.max(Duration::from_millis(100));
    let mut delta = 0;
    while Instant::now() < deadline {
        delta = vm.progress().unwrap_or(base).saturating_sub(base);
        if delta >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = ctl.send(&Message::Progress { delta });
    Ok(Incoming {
        vm,
        pages_received,
        used_reserved_ram,
        progress_after_resume: delta,
    })
}

/// Waits for the device state, restores it, answers Prepared and resumes on Commit. With
/// `rdma` (the source's access to RAM), RDMA rounds are followed on the control channel and
/// the access is revoked when the device state arrives.
fn switchover(
    ctl: &mut Control,
    vm: &dyn MigratableVm,
    hashes: &PageHashes,
    shared: &Shared,
    timeout: Duration,
    layout: &RamLayout,
    mut rdma: Option<RdmaAccess>,
) -> Result<(), MigrationError> {
    let is_rdma = rdma.is_some();
    // Pre-copy may last long: wait for device state as long as pages keep arriving; a source
    // that sends nothing for `timeout` is given up on (it cannot hold the destination forever).
    let mut seen = shared.pages.load(Ordering::Relaxed);
    let (final_round, sections) = loop {
        match ctl.recv(Some(timeout), "waiting for device state") {
            Ok(Message::DeviceState {
                final_round,
                sections,
            }) => break (final_round, sections),
            Ok(Message::RoundProgress {
                round,
                pages,
                complete,
            }) if is_rdma => {
                if let Err(reason) = shared.rdma_round(round, pages, complete) {
                    return Err(MigrationError::Protocol {
                        peer: ctl.peer().to_string(),
                        source: ProtocolError::Invalid {
                            msg: "RoundProgress",
                            reason,
                        },
                    });
                }
            }
            Ok(m) => return Err(ctl.unexpected(&m, "waiting for DeviceState")),
            Err(MigrationError::Timeout { .. }) => {
                let now = shared.pages.load(Ordering::Relaxed);
                if now == seen {
                    return Err(MigrationError::Timeout {
                        secs: timeout.as_secs(),
                        during: "pre-copy: the source sent neither pages nor device state",
                    });
                }
                seen = now;
            }
            Err(e) => return Err(e),
        }
    };
    if is_rdma {
        // Every write the source will make is done: revoke its access (QPs destroyed, RAM
        // deregistered) before anything here reads or runs on that RAM.
        drop(rdma.take());
        let done = shared.lock().completed;
        if done.is_none_or(|c| c < final_round) {
            return Err(MigrationError::Aborted(format!(
                "the source sent device state for final round {final_round} but completed \
                 only {}",
                done.map_or("no round".to_string(), |c| format!("round {c}"))
            )));
        }
    } else {
        shared.wait_round(final_round, timeout)?;
    }
    vm.restore_state(&sections)?;
    let (digest, cpu_ns) = if is_rdma {
        // No receiver saw the pages: hash all of RAM once (inside the downtime).
        let t = Instant::now();
        let (d, cpu) = full_digest(vm.ram());
        info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            "RAM digest (full pass)"
        );
        (d, cpu)
    } else {
        (hashes.digest(), shared.cpu_ns.load(Ordering::Relaxed))
    };
    info!(
        final_round,
        digest = format!("{digest:016x}"),
        bytes = layout.total_bytes(),
        "prepared"
    );
    ctl.send(&Message::Prepared { digest, cpu_ns })?;
    match ctl.recv(Some(timeout), "waiting for Commit")? {
        Message::Commit => {}
        m => return Err(ctl.unexpected(&m, "waiting for Commit")),
    }
    vm.resume()?;
    if let Err(e) = ctl.send(&Message::Resumed) {
        // The guest runs here now; the source will report "outcome unknown".
        warn!("could not confirm resume to the source: {e}");
    }
    Ok(())
}

/// [`ram_digest`] (same value), computed on every core: it runs inside the downtime. Returns
/// the digest and the CPU time used.
fn full_digest(ram: &GuestRam) -> (u64, u64) {
    const PIECE: u64 = 16 << 20;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    if threads == 1 {
        let cpu = thread_cpu_ns();
        let d = ram_digest(ram);
        return (d, thread_cpu_ns().saturating_sub(cpu));
    }
    let hashes = PageHashes::new_zeroed(ram.layout());
    let pieces: Vec<(u64, usize, u64)> = ram
        .host_regions()
        .into_iter()
        .flat_map(|(gpa, host, len)| {
            (0..len.div_ceil(PIECE)).map(move |i| {
                let off = i * PIECE;
                (
                    gpa + off,
                    host as usize + off as usize,
                    PIECE.min(len - off),
                )
            })
        })
        .collect();
    let next = AtomicU64::new(0);
    let cpu = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let start = thread_cpu_ns();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(gpa, host, len)) = pieces.get(i) else {
                        break;
                    };
                    // SAFETY: `host..host + len` lies inside a live mapping of `ram` (borrowed
                    // for the whole scope); the guest is not running and the source's access
                    // was revoked, so nothing writes it meanwhile.
                    unsafe { hashes.update(gpa, len, host as *const u8) };
                }
                cpu.fetch_add(thread_cpu_ns().saturating_sub(start), Ordering::Relaxed);
            });
        }
    });
    (hashes.digest(), cpu.into_inner())
}

/// How the source sends pages.
enum Channels {
    /// TCP data connections, one receiver each.
    Tcp(Vec<DataReceiver>),
    /// RDMA: the source's queue pairs.
    Rdma(Vec<RdmaQp>),
}

/// Accepts the data connections of the session — or, when `rdma` was agreed, the source's
/// RdmaConnect on the control connection.
fn accept_channels(
    listener: &TcpListener,
    ctl: &mut Control,
    channels: u16,
    token: u64,
    timeout: Duration,
    rdma: bool,
) -> Result<Channels, MigrationError> {
    let mut slots: Vec<Option<DataReceiver>> = (0..channels).map(|_| None).collect();
    let mut rdma_qps = None;
    let deadline = Instant::now() + timeout;
    let _ = listener.set_nonblocking(true);
    let result = (|| {
        while slots.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                return Err(MigrationError::Timeout {
                    secs: timeout.as_secs(),
                    during: "waiting for data channels",
                });
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(qps) = control_quiet(ctl, rdma)? {
                        rdma_qps = Some(qps);
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(2));
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
            match channel_hello(&stream, timeout) {
                Some((t, i))
                    if t == token && slots.get(i as usize).is_some_and(Option::is_none) =>
                {
                    let _ = stream.set_read_timeout(None);
                    slots[i as usize] = Some(DataReceiver::new(stream)?);
                }
                _ => warn!("dropped a connection that is not a data channel of this session"),
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
    let _ = ctl.stream().set_nonblocking(true);
    let mut b = [0u8; 1];
    let peeked = ctl.stream().peek(&mut b);
    let _ = ctl.stream().set_nonblocking(false);
    match peeked {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        // Data, EOF or an error: let the control reader say what it is.
        _ => match ctl.recv(Some(Duration::from_secs(5)), "waiting for data channels")? {
            Message::RdmaConnect { qps } if rdma => Ok(Some(qps)),
            m => Err(ctl.unexpected(&m, "waiting for data channels")),
        },
    }
}

/// Opens the RDMA device for a source that offers RDMA; None (with a warning) when this side
/// cannot take it.
fn open_rdma(opts: &IncomingOptions, ctl: &Control) -> Option<RdmaDevice> {
    #[cfg(feature = "rdma")]
    {
        let peer = ctl.stream().peer_addr().ok().map(|a| a.ip());
        match livemig_transport::rdma::Device::open_for(opts.rdma_device.as_deref(), peer) {
            Ok(d) => {
                let sel = d.selection();
                info!(
                    device = %sel.device,
                    port = sel.port,
                    gid = %std::net::Ipv6Addr::from(sel.gid.gid),
                    "taking RDMA"
                );
                Some(d)
            }
            Err(e) => {
                warn!("the source offers RDMA but this destination cannot take it: {e}");
                None
            }
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = (opts, ctl);
        warn!("the source offers RDMA but this livemig was built without it");
        None
    }
}

/// Registers RAM for the source's writes and connects a queue pair to each of the source's;
/// answers RdmaAccept. The returned access, when dropped, revokes it all.
fn accept_rdma(
    ctl: &mut Control,
    dev: Option<RdmaDevice>,
    ram: &GuestRam,
    channels: u16,
    qps: &[RdmaQp],
) -> Result<RdmaAccess, MigrationError> {
    let refuse = |ctl: &mut Control, reason: String| {
        let _ = ctl.send(&Message::Refuse {
            reason: reason.clone(),
        });
        MigrationError::Refused {
            peer: ctl.peer().to_string(),
            reason: format!("refused the source: {reason}"),
        }
    };
    if qps.len() != usize::from(channels) {
        return Err(refuse(
            ctl,
            format!("{} RDMA queue pairs for {channels} channels", qps.len()),
        ));
    }
    let Some(dev) = dev else {
        return Err(refuse(ctl, "RDMA was not agreed".into()));
    };
    #[cfg(feature = "rdma")]
    {
        use crate::protocol::RdmaRegion;
        use livemig_transport::rdma::{QpEndpoint, RdmaTarget};
        let sources: Vec<QpEndpoint> = qps
            .iter()
            .map(|q| QpEndpoint {
                qpn: q.qpn,
                psn: q.psn,
                gid: q.gid,
                lid: q.lid,
                mtu: q.mtu,
            })
            .collect();
        let target = match RdmaTarget::new(&dev, &memory_map(ram), &sources) {
            Ok(t) => t,
            Err(e) => return Err(refuse(ctl, format!("destination cannot set up RDMA: {e}"))),
        };
        ctl.send(&Message::RdmaAccept {
            qps: target
                .endpoints()
                .into_iter()
                .map(|e| RdmaQp {
                    qpn: e.qpn,
                    psn: e.psn,
                    gid: e.gid,
                    lid: e.lid,
                    mtu: e.mtu,
                })
                .collect(),
            regions: target
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
        info!(
            ?target,
            "RDMA queue pairs connected; RAM open to the source's writes"
        );
        Ok(Box::new(target))
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = ram;
        match dev {}
    }
}

fn channel_hello(mut stream: &TcpStream, timeout: Duration) -> Option<(u64, u16)> {
    let _ = stream.set_read_timeout(Some(timeout.min(Duration::from_secs(10))));
    let (kind, payload) = frame::read_frame(&mut stream, 64, "data channel").ok()?;
    match Message::decode(kind, &payload).ok()? {
        Message::ChannelHello { token, index } => Some((token, index)),
        _ => None,
    }
}

fn memory_map(ram: &GuestRam) -> MemoryMap {
    let regions = ram
        .host_regions()
        .into_iter()
        .map(|(addr, host, len)| MappedRegion { addr, host, len })
        .collect();
    // SAFETY: the regions are the live mappings of `ram`, kept alive by the clone passed as
    // owner. Until resume only the receivers write them (a page at most once per round, rounds
    // separated by the barrier) and no Rust reference into them exists.
    unsafe { MemoryMap::new(regions, Arc::new(ram.clone())) }
}

/// Faults destination RAM in ahead of the receivers (MADV_POPULATE_WRITE), so they write into
/// populated pages instead of taking a fault per page.
fn spawn_populate(ram: &GuestRam, running: Arc<AtomicBool>) -> JoinHandle<()> {
    let regions: Vec<(usize, u64)> = ram
        .host_regions()
        .into_iter()
        .map(|(_, host, len)| (host as usize, len))
        .collect();
    let ram = ram.clone();
    std::thread::spawn(move || {
        const STEP: u64 = 32 << 20;
        for (host, len) in regions {
            let mut off = 0;
            while off < len && running.load(Ordering::Relaxed) {
                let n = STEP.min(len - off);
                // SAFETY: `host + off .. + n` lies inside a live mapping of `ram` (held by this
                // thread); MADV_POPULATE_WRITE only faults pages in, it does not change them.
                unsafe {
                    libc::madvise((host + off as usize) as *mut libc::c_void, n as usize, 23);
                }
                off += n;
            }
        }
        drop(ram);
    })
}

/// State shared by the receivers and the control thread.
struct Shared {
    channels: usize,
    barrier: Mutex<BarrierState>,
    cv: Condvar,
    streams: Mutex<Vec<TcpStream>>,
    control: Mutex<Option<TcpStream>>,
    finished: AtomicBool,
    pages: AtomicU64,
    cpu_ns: AtomicU64,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    completed: Option<u64>,
    error: Option<String>,
}

impl Shared {
    fn new(channels: usize) -> Self {
        Shared {
            channels,
            barrier: Mutex::new(BarrierState::default()),
            cv: Condvar::new(),
            streams: Mutex::new(Vec::new()),
            control: Mutex::new(None),
            finished: AtomicBool::new(false),
            pages: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BarrierState> {
        self.barrier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver reached the marker of `round`: wait until every channel has.
    fn arrive(&self, round: u64) -> Result<(), ()> {
        let mut s = self.lock();
        s.arrived += 1;
        if s.arrived == self.channels {
            s.arrived = 0;
            s.completed = Some(round);
            self.cv.notify_all();
            return Ok(());
        }
        while s.completed.is_none_or(|c| c < round) && s.error.is_none() {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.error.is_some() {
            Err(())
        } else {
            Ok(())
        }
    }

    fn wait_round(&self, round: u64, timeout: Duration) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if let Some(e) = &s.error {
                return Err(MigrationError::Aborted(format!("data channel failed: {e}")));
            }
            if s.completed.is_some_and(|c| c >= round) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MigrationError::Timeout {
                    secs: timeout.as_secs(),
                    during: "waiting for the last round of pages",
                });
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A receiver failed: record it, wake everyone, and cut every connection so the control
    /// thread stops waiting.
    fn fail(&self, reason: String) {
        if self.finished.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut s = self.lock();
            if s.error.is_none() {
                s.error = Some(reason);
            }
        }
        self.cv.notify_all();
        self.shutdown_streams();
        if let Some(c) = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// RDMA: the source reports round `round` (`complete` once all its writes completed).
    fn rdma_round(&self, round: u64, pages: u64, complete: bool) -> Result<(), String> {
        let mut s = self.lock();
        let next = s.completed.map_or(0, |c| c + 1);
        if round != next {
            return Err(format!("round {round} while round {next} is under way"));
        }
        if complete {
            s.completed = Some(round);
            self.pages.fetch_add(pages, Ordering::Relaxed);
            self.cv.notify_all();
        }
        Ok(())
    }

    fn first_error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// The migration is over (either way): receivers may stop.
    fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
        {
            let mut s = self.lock();
            if s.error.is_none() {
                s.error = Some("migration finished".into());
            }
        }
        self.cv.notify_all();
        self.shutdown_streams();
    }

    fn shutdown_streams(&self) {
        for s in self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Work for a receiver's hashing thread.
enum HashJob {
    /// Ranges the receiver wrote.
    Pages(Vec<(u64, u64)>),
    /// Answer with the CPU time used since the last flush once every earlier job is done.
    Flush(crossbeam_channel::Sender<u64>),
}

fn spawn_receiver(
    index: usize,
    mut rx: DataReceiver,
    map: MemoryMap,
    hashes: Arc<PageHashes>,
    shared: Arc<Shared>,
) -> Result<JoinHandle<()>, MigrationError> {
    std::thread::Builder::new()
        .name(format!("livemig-rx{index}"))
        .spawn(move || {
            // Receivers take the cores from the top down while senders (on a same-host
            // migration) take them from the bottom up, so a sender and its receiver do not
            // share a core.
            if let Some(cores) = core_affinity::get_core_ids().filter(|c| !c.is_empty()) {
                core_affinity::set_for_current(cores[cores.len() - 1 - index % cores.len()]);
            }
            // Page hashing runs beside the receiver, in the time the receiver waits on its
            // socket; each round's hashing finishes before the receiver reaches the round's
            // barrier, so no page is hashed while a later round rewrites it.
            let (jobs, job_rx) = crossbeam_channel::bounded::<HashJob>(8);
            let hasher = {
                let map = map.clone();
                let hashes = hashes.clone();
                std::thread::Builder::new()
                    .name(format!("livemig-hash{index}"))
                    .spawn(move || {
                        let mut cpu = thread_cpu_ns();
                        for job in job_rx {
                            match job {
                                HashJob::Pages(ranges) => {
                                    for (gpa, len) in ranges {
                                        if let Ok(host) = map.host_ptr(gpa, len) {
                                            // SAFETY: the receiver wrote this range in the
                                            // current round and nothing writes it again
                                            // before the round's barrier, which waits for
                                            // this job (Flush below).
                                            unsafe { hashes.update(gpa, len, host) };
                                        }
                                    }
                                }
                                HashJob::Flush(done) => {
                                    let now = thread_cpu_ns();
                                    let _ = done.send(now - cpu);
                                    cpu = now;
                                }
                            }
                        }
                    })
            };
            let Ok(hasher) = hasher else {
                shared.fail(format!("channel {index}: cannot start its hashing thread"));
                return;
            };
            let mut landed = Landed::default();
            let mut expected_round = 0u64;
            let mut cpu = thread_cpu_ns();
            let result = loop {
                landed.clear();
                match rx.recv(&map, &mut landed) {
                    Ok(Received::Extents { .. }) => {
                        let mut pages = 0;
                        for &(_, len) in &landed.data {
                            pages += len / PAGE_SIZE;
                        }
                        if !landed.data.is_empty()
                            && jobs
                                .send(HashJob::Pages(std::mem::take(&mut landed.data)))
                                .is_err()
                        {
                            break Err(format!("channel {index}: hashing thread stopped"));
                        }
                        for &(gpa, len) in &landed.zero {
                            // Zero pages were not written by the transport: clear the ones an
                            // earlier round filled (fresh RAM is zero already).
                            hashes.clear_nonzero(gpa, len, |start, bytes| {
                                if let Ok(host) = map.host_ptr(start, bytes) {
                                    // SAFETY: inside registered RAM, written only by this
                                    // receiver until the next barrier.
                                    unsafe { std::ptr::write_bytes(host, 0, bytes as usize) };
                                }
                            });
                            pages += len / PAGE_SIZE;
                        }
                        shared.pages.fetch_add(pages, Ordering::Relaxed);
                    }
                    Ok(Received::Marker(round)) => {
                        if round != expected_round {
                            break Err(format!(
                                "channel {index}: round marker {round}, expected {expected_round}"
                            ));
                        }
                        expected_round += 1;
                        // The round's pages are hashed before this channel reaches the barrier.
                        let (done, wait) = crossbeam_channel::bounded(1);
                        let hash_cpu = match jobs
                            .send(HashJob::Flush(done))
                            .ok()
                            .and_then(|()| wait.recv().ok())
                        {
                            Some(ns) => ns,
                            None => break Err(format!("channel {index}: hashing thread stopped")),
                        };
                        let now = thread_cpu_ns();
                        shared
                            .cpu_ns
                            .fetch_add(now - cpu + hash_cpu, Ordering::Relaxed);
                        cpu = now;
                        if shared.arrive(round).is_err() {
                            break Ok(());
                        }
                    }
                    Err(e) => break Err(format!("channel {index}: {e}")),
                }
            };
            drop(jobs);
            let _ = hasher.join();
            if let Err(e) = result {
                shared.fail(e);
            }
        })
        .map_err(|e| MigrationError::Aborted(format!("cannot start receiver thread {index}: {e}")))
}

/// Physical memory of this host, in bytes (a conservative 1 GiB if it cannot be read).
fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kib| kib * 1024)
        .unwrap_or(1 << 30)
}
