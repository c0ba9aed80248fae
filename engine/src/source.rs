//! The source state machine: pre-copy rounds, the stop decision, stop-and-copy and the
//! switchover (DESIGN §5).
//!
//! Invariants kept here:
//! - before the guest is paused, any failure or cancel leaves it running, unchanged;
//! - between pause and commit, a failure resumes it on the source;
//! - once Commit is sent, the source never resumes it: a lost answer is "outcome unknown".
//!
//! The data path is TCP connections or RDMA queue pairs ([`TransportChoice`]); both feed the
//! same page scheduler. With RDMA the source announces each finished round on the control
//! channel (the destination sees no page arrive).

use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_transport::codec::{CodecStats, Mode};
use livemig_transport::tcp::DataSender;
use livemig_transport::{frame, MappedRegion, MemoryMap, TransportError};
use tracing::{info, warn};

use crate::auth::{self, Key};
use crate::convergence::Convergence;
use crate::digest::ram_digest;
use crate::dirty::DirtyBitmap;
use crate::protocol::{Message, FEATURE_RDMA, MIN_VERSION, VERSION};
use crate::scheduler::Scheduler;
use crate::session::{
    random_u64, CodecReport, Control, MigrationError, MigrationReport, RoundReport,
};
use crate::vm::MigratableVm;

/// Which data transport carries pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// TCP data connections.
    #[default]
    Tcp,
    /// RDMA queue pairs; the migration fails if no usable device here or at the destination.
    Rdma,
    /// RDMA when a device here has an address in the destination's subnet and the destination
    /// takes RDMA; TCP otherwise. The report says which and why.
    Auto,
}

impl TransportChoice {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TransportChoice::Tcp => "tcp",
            TransportChoice::Rdma => "rdma",
            TransportChoice::Auto => "auto",
        }
    }
}

/// An RDMA device opened for a migration (an uninhabited type without the `rdma` feature).
#[cfg(feature = "rdma")]
type RdmaDevice = Arc<livemig_transport::rdma::Device>;
#[cfg(not(feature = "rdma"))]
type RdmaDevice = std::convert::Infallible;

/// Options of an outgoing migration.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Data channels (TCP connections or RDMA queue pairs for pages).
    pub channels: u16,
    /// Data transport.
    pub transport: TransportChoice,
    /// RDMA device to use (default: the first active device with an address in the
    /// destination's subnet, else the first active device).
    pub rdma_device: Option<String>,
    /// Stop-and-copy once the predicted downtime is at most this.
    pub downtime_limit_ms: u64,
    /// Stop-and-copy after at most this many pre-copy rounds.
    pub max_rounds: u32,
    /// Pin channel workers to cores.
    pub pin_workers: bool,
    /// Longest wait for any single answer of the destination.
    pub timeout: Duration,
    /// Page encoding.
    pub compress: Mode,
    /// Bytes of last-sent page versions kept for delta encoding.
    pub delta_cache_bytes: u64,
    /// Pre-shared key; None only talks to destinations without one (`--no-auth`).
    pub key: Option<Key>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            channels: 1,
            transport: TransportChoice::Tcp,
            rdma_device: None,
            downtime_limit_ms: 300,
            max_rounds: 30,
            pin_workers: true,
            timeout: Duration::from_secs(60),
            compress: Mode::Auto,
            delta_cache_bytes: 64 << 20,
            key: None,
        }
    }
}

/// Progress of an outgoing migration.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Handshake done, destination ready.
    Connected {
        /// Set-up time.
        setup_ms: f64,
        /// Pages to send in round 0.
        total_pages: u64,
        /// `tcp` or `rdma`.
        transport: &'static str,
        /// How the transport was chosen and what it runs on.
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
    },
    /// A round finished.
    Round(RoundReport),
    /// The guest is paused; the final round starts.
    Paused {
        /// Pages left to send.
        pages: u64,
    },
    /// Commit was sent.
    Committed,
}

/// Migrates `vm` to the destination listening at `to`.
pub fn migrate(
    vm: &dyn MigratableVm,
    to: &str,
    opts: &MigrateOptions,
    cancel: &AtomicBool,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    let t0 = Instant::now();
    let layout = vm.ram().layout().clone();
    let connect = |what: &str| -> Result<TcpStream, MigrationError> {
        let err = |source| MigrationError::Connect {
            addr: to.to_string(),
            source,
        };
        let addrs: Vec<_> = to.to_socket_addrs().map_err(err)?.collect();
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no address for {what}"),
        );
        for a in addrs {
            match TcpStream::connect_timeout(&a, opts.timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(err(last))
    };

    // The transport is chosen before connecting: asking for RDMA without a usable device
    // fails here, before the destination hears of this migration.
    let peer_ip: Option<IpAddr> = to
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| a.ip());
    let (mut rdma, mut detail) = plan_transport(opts, peer_ip)?;

    // Set-up: handshake, config, data channels. The VM is untouched so far.
    let mut ctl = Control::new(connect("control")?);
    let _ = ctl.stream().set_write_timeout(Some(opts.timeout));
    let nonce_s = auth::nonce();
    ctl.send(&Message::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        features: if rdma.is_some() { FEATURE_RDMA } else { 0 },
        nonce: nonce_s,
    })?;
    let (nonce_d, proof_d, features) = match ctl.recv(Some(opts.timeout), "waiting for Welcome")? {
        Message::Welcome {
            nonce,
            proof,
            features,
            ..
        } => (nonce, proof, features),
        m => return Err(ctl.unexpected(&m, "waiting for Welcome")),
    };
    // The destination proves the key first; only then does the source prove it and send state.
    let refuse = |ctl: &mut Control, reason: &str| {
        let _ = ctl.send(&Message::Refuse {
            reason: reason.into(),
        });
        MigrationError::Refused {
            peer: ctl.peer().to_string(),
            reason: format!("refused the destination: {reason}"),
        }
    };
    if rdma.is_some() && features & FEATURE_RDMA == 0 {
        if opts.transport == TransportChoice::Rdma {
            let reason = "the destination cannot take RDMA (no usable RDMA device there, or a \
                          livemig built without RDMA): use --transport tcp or auto";
            let _ = ctl.send(&Message::Refuse {
                reason: reason.into(),
            });
            return Err(MigrationError::TransportUnavailable(reason.into()));
        }
        rdma = None;
        detail = "auto: tcp (the destination has no usable RDMA device)".into();
    }
    let token = match &opts.key {
        Some(k) => {
            if !auth::proofs_equal(&proof_d, &k.destination_proof(&nonce_s, &nonce_d)) {
                return Err(refuse(
                    &mut ctl,
                    if proof_d == [0; 32] {
                        "authentication failed: the destination has no key (this source requires one)"
                    } else {
                        "authentication failed: the destination's key does not match this source's"
                    },
                ));
            }
            ctl.send(&Message::Auth {
                proof: k.source_proof(&nonce_s, &nonce_d),
            })?;
            k.session_token(&nonce_s, &nonce_d)
        }
        None => {
            if proof_d != [0; 32] {
                return Err(refuse(
                    &mut ctl,
                    "authentication failed: the destination requires a key and this source has none",
                ));
            }
            ctl.send(&Message::Auth { proof: [0; 32] })?;
            random_u64()
        }
    };
    ctl.send(&Message::Config {
        machine: vm.machine().to_string(),
        spec: vm.spec().clone(),
        layout: layout.clone(),
        channels: opts.channels,
        token,
    })?;
    match ctl.recv(
        Some(opts.timeout),
        "waiting for the destination to allocate RAM",
    )? {
        Message::Ready => {}
        m => return Err(ctl.unexpected(&m, "waiting for Ready")),
    }

    let ram = vm.ram().clone();
    let regions = ram
        .host_regions()
        .into_iter()
        .map(|(addr, host, len)| MappedRegion { addr, host, len })
        .collect();
    // SAFETY: the regions are the live mappings of `ram`, kept alive by the Arc'd clone passed
    // as owner; the data path only reads them (writev, or the RDMA device through a
    // local-read registration), which tolerates the guest writing.
    let map = unsafe { MemoryMap::new(regions, Arc::new(ram)) };
    let is_rdma = rdma.is_some();
    let mut sched = match rdma {
        Some(dev) => {
            #[cfg(feature = "rdma")]
            {
                match connect_rdma(&mut ctl, &dev, &map, opts) {
                    Ok((senders, d)) => {
                        detail = format!("{detail}; {d}");
                        Scheduler::new_rdma(senders, map, opts.pin_workers)
                    }
                    Err(e) => {
                        let _ = ctl.send(&Message::Abort {
                            reason: format!("source could not set up RDMA: {e}"),
                        });
                        return Err(e);
                    }
                }
            }
            #[cfg(not(feature = "rdma"))]
            match dev {}
        }
        None => {
            let mut senders = Vec::new();
            for index in 0..opts.channels {
                let mut s = connect("data channel")?;
                let _ = s.set_write_timeout(Some(opts.timeout));
                let (kind, payload) = Message::ChannelHello { token, index }.encode();
                frame::write_frame(&mut s, kind, &payload).map_err(|source| {
                    TransportError::Io {
                        op: "opening a data channel",
                        peer: to.to_string(),
                        source,
                    }
                })?;
                senders.push(DataSender::new(s)?);
            }
            Scheduler::new(
                senders,
                map,
                opts.pin_workers,
                opts.compress,
                opts.delta_cache_bytes,
            )
        }
    };
    let setup = t0.elapsed();
    let total_pages = layout.total_pages();
    on_progress(&Progress::Connected {
        setup_ms: ms(setup),
        total_pages,
        transport: if is_rdma { "rdma" } else { "tcp" },
        transport_detail: detail.clone(),
    });

    let result = run_rounds(
        vm,
        &mut ctl,
        &mut sched,
        &DataPlane {
            rdma: is_rdma,
            detail,
        },
        opts,
        cancel,
        on_progress,
        t0,
        setup,
    );
    sched.shutdown();
    result
}

/// What carries the pages, as `run_rounds` needs to know it.
struct DataPlane {
    /// RDMA: rounds are announced on the control channel.
    rdma: bool,
    /// For the report.
    detail: String,
}

/// Decides the transport before connecting: an open RDMA device, or none (TCP), and a line
/// saying why.
fn plan_transport(
    opts: &MigrateOptions,
    peer: Option<IpAddr>,
) -> Result<(Option<RdmaDevice>, String), MigrationError> {
    #[cfg(feature = "rdma")]
    let peer_name = peer.map_or_else(|| "the destination".to_string(), |p| p.to_string());
    #[cfg(not(feature = "rdma"))]
    let _ = peer;
    match opts.transport {
        TransportChoice::Tcp => Ok((None, "tcp".into())),
        #[cfg(not(feature = "rdma"))]
        TransportChoice::Rdma => Err(MigrationError::TransportUnavailable(
            "this livemig was built without RDMA support (cargo feature `rdma`): use \
             --transport tcp"
                .into(),
        )),
        #[cfg(not(feature = "rdma"))]
        TransportChoice::Auto => Ok((
            None,
            "auto: tcp (this livemig was built without RDMA support)".into(),
        )),
        #[cfg(feature = "rdma")]
        TransportChoice::Rdma => {
            let dev = livemig_transport::rdma::Device::open_for(opts.rdma_device.as_deref(), peer)
                .map_err(|e| {
                    MigrationError::TransportUnavailable(format!("--transport rdma: {e}"))
                })?;
            let d = describe_device(&dev, &peer_name);
            Ok((Some(dev), format!("rdma: {d}")))
        }
        #[cfg(feature = "rdma")]
        TransportChoice::Auto => {
            use livemig_transport::rdma::{self, RdmaError};
            let name = opts.rdma_device.as_deref();
            let sel =
                rdma::devices().and_then(|d| rdma::select(&d, name, peer, &rdma::ipv4_prefix));
            match sel {
                Ok(sel) if sel.reaches_peer || name.is_some() => match rdma::Device::open(&sel) {
                    Ok(dev) => {
                        let d = describe_device(&dev, &peer_name);
                        Ok((Some(dev), format!("auto: rdma ({d})")))
                    }
                    Err(e) => Ok((None, format!("auto: tcp (RDMA device {}: {e})", sel.device))),
                },
                Ok(sel) => Ok((
                    None,
                    format!(
                        "auto: tcp (no RDMA device has an address in {peer_name}'s subnet; {} \
                         would not reach it)",
                        sel.device
                    ),
                )),
                Err(RdmaError::NoDevice) => Ok((None, "auto: tcp (no RDMA device here)".into())),
                Err(e) => Ok((None, format!("auto: tcp ({e})"))),
            }
        }
    }
}

#[cfg(feature = "rdma")]
fn describe_device(dev: &livemig_transport::rdma::Device, peer: &str) -> String {
    let sel = dev.selection();
    format!(
        "{} port {} GID {} ({}{}){}",
        sel.device,
        sel.port,
        std::net::Ipv6Addr::from(sel.gid.gid),
        sel.gid.kind,
        sel.gid
            .netdev
            .as_deref()
            .map(|n| format!(" on {n}"))
            .unwrap_or_default(),
        if sel.reaches_peer {
            format!(", in {peer}'s subnet")
        } else {
            String::new()
        }
    )
}

/// Announces the source's queue pairs, connects them to the destination's and makes one
/// sender per pair.
#[cfg(feature = "rdma")]
fn connect_rdma(
    ctl: &mut Control,
    dev: &RdmaDevice,
    map: &MemoryMap,
    opts: &MigrateOptions,
) -> Result<(Vec<livemig_transport::rdma::RdmaSender>, String), MigrationError> {
    use crate::protocol::RdmaQp;
    use livemig_transport::rdma::{
        check_remote_regions, QpEndpoint, RdmaError, RdmaSender, RdmaSource, RemoteRegion,
    };
    let rdma_err = |e: RdmaError| MigrationError::Transport(e.into());
    let source = RdmaSource::new(dev, map.clone()).map_err(rdma_err)?;
    let prepared = (0..opts.channels)
        .map(|_| source.prepare_qp())
        .collect::<Result<Vec<_>, _>>()
        .map_err(rdma_err)?;
    let qps = prepared
        .iter()
        .map(|p| {
            let e = p.endpoint();
            RdmaQp {
                qpn: e.qpn,
                psn: e.psn,
                gid: e.gid,
                lid: e.lid,
                mtu: e.mtu,
            }
        })
        .collect();
    ctl.send(&Message::RdmaConnect { qps })?;
    let (qps, regions) = match ctl.recv(
        Some(opts.timeout),
        "waiting for the destination's RDMA queue pairs",
    )? {
        Message::RdmaAccept { qps, regions } => (qps, regions),
        m => return Err(ctl.unexpected(&m, "waiting for RdmaAccept")),
    };
    if qps.len() != prepared.len() {
        return Err(rdma_err(RdmaError::Peer(format!(
            "{} queue pairs for our {}",
            qps.len(),
            prepared.len()
        ))));
    }
    let remote: Vec<RemoteRegion> = regions
        .iter()
        .map(|r| RemoteRegion {
            addr: r.gpa,
            len: r.len,
            remote_addr: r.addr,
            rkey: r.rkey,
        })
        .collect();
    check_remote_regions(map, &remote).map_err(rdma_err)?;
    let remote: Arc<[RemoteRegion]> = remote.into();
    let mut senders = Vec::with_capacity(qps.len());
    for (p, q) in prepared.into_iter().zip(&qps) {
        let qp = p
            .connect(&QpEndpoint {
                qpn: q.qpn,
                psn: q.psn,
                gid: q.gid,
                lid: q.lid,
                mtu: q.mtu,
            })
            .map_err(rdma_err)?;
        senders.push(RdmaSender::new(&source, qp, remote.clone(), opts.timeout).map_err(rdma_err)?);
    }
    Ok((
        senders,
        format!(
            "destination GID {}; {} RC queue pair{}, RDMA WRITEs of at most {} KiB",
            std::net::Ipv6Addr::from(qps[0].gid),
            qps.len(),
            if qps.len() == 1 { "" } else { "s" },
            livemig_transport::rdma::MAX_WRITE_BYTES >> 10
        ),
    ))
}

#[allow(clippy::too_many_arguments)]
fn run_rounds(
    vm: &dyn MigratableVm,
    ctl: &mut Control,
    sched: &mut Scheduler,
    plane: &DataPlane,
    opts: &MigrateOptions,
    cancel: &AtomicBool,
    on_progress: &mut dyn FnMut(&Progress),
    t0: Instant,
    setup: Duration,
) -> Result<MigrationReport, MigrationError> {
    let layout = vm.ram().layout().clone();
    let abort = |ctl: &mut Control, reason: &str| {
        let _ = ctl.send(&Message::Abort {
            reason: reason.to_string(),
        });
    };

    // Pre-copy. Tracking starts before round 0 reads a single page, so every later write is
    // caught by a harvest.
    if let Err(e) = vm.start_dirty_tracking() {
        abort(ctl, "source could not start dirty tracking");
        return Err(e.into());
    }
    let mut dirty = DirtyBitmap::new(&layout);
    if let Err(e) = vm.harvest_dirty(&mut dirty) {
        let _ = vm.stop_dirty_tracking();
        abort(ctl, "source could not read its dirty log");
        return Err(e.into());
    }
    let mut to_send = DirtyBitmap::all(&layout);
    let mut conv = Convergence::new(opts.downtime_limit_ms);
    let mut rounds: Vec<RoundReport> = Vec::new();
    let mut pages_sent = 0u64;
    let mut wire = 0u64;
    let mut round = 0u64;
    let mut codec = CodecStats::default();
    let mut cpu_ns = 0u64;
    let cpu_start = crate::scheduler::thread_cpu_ns();
    let precopy: Result<(), MigrationError> = (|| loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        // Round 0 covers all RAM: pages in holes of the backing memory were never written and
        // go as zero markers without being read.
        let (extents, holes) = if round == 0 {
            vm.ram().split_holes(&to_send.extents())
        } else {
            (to_send.extents(), Vec::new())
        };
        let pages_total = to_send.count();
        let sent = sched.send_round(round, &extents, &holes, cancel, &mut |pages_done| {
            if plane.rdma {
                // The destination sees no page arrive: tell it the source is alive. A
                // failure here shows up as failed writes or at the round's end.
                let _ = ctl.send(&Message::RoundProgress {
                    round,
                    pages: pages_done,
                    complete: false,
                });
            }
            on_progress(&Progress::Sending {
                round,
                pages_done,
                pages_total,
            })
        });
        let stats = end_round(sent, ctl, plane, round)?;
        pages_sent += stats.pages;
        wire += stats.wire_bytes;
        codec.add(&stats.codec);
        cpu_ns += stats.cpu_ns;
        to_send.clear();
        vm.harvest_dirty(&mut to_send)?;
        let dirtied = to_send.count();
        let est = conv.after_round(stats.wire_bytes, stats.elapsed, dirtied);
        let report = RoundReport {
            round,
            pages: stats.pages,
            wire_bytes: stats.wire_bytes,
            ms: ms(stats.elapsed),
            dirtied_pages: dirtied,
            dirty_rate: est.dirty_rate,
            bandwidth: est.bandwidth,
            predicted_downtime_ms: est.predicted_downtime_ms,
            stop_and_copy: false,
        };
        info!(
            round,
            pages = stats.pages,
            dirtied,
            predicted_ms = est.predicted_downtime_ms,
            "pre-copy round done"
        );
        on_progress(&Progress::Round(report.clone()));
        rounds.push(report);
        round += 1;
        if est.converged || round >= u64::from(opts.max_rounds.max(1)) {
            return Ok(());
        }
    })();
    if let Err(e) = precopy {
        let _ = vm.stop_dirty_tracking();
        abort(
            ctl,
            if matches!(e, MigrationError::Cancelled) {
                "cancelled on the source"
            } else {
                "source failed during pre-copy"
            },
        );
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        let _ = vm.stop_dirty_tracking();
        abort(ctl, "cancelled on the source");
        return Err(MigrationError::Cancelled);
    }

    // Stop-and-copy.
    let t_pause = Instant::now();
    if let Err(e) = vm.pause() {
        // A partial pause is undone: resume whatever stopped.
        let _ = vm.resume();
        let _ = vm.stop_dirty_tracking();
        abort(ctl, "source could not pause the guest");
        return Err(e.into());
    }
    let switch: Result<(u64, u64, crate::scheduler::RoundStats), MigrationError> = (|| {
        vm.harvest_dirty(&mut to_send)?;
        on_progress(&Progress::Paused {
            pages: to_send.count(),
        });
        let sent = sched.send_round(round, &to_send.extents(), &[], cancel, &mut |_| {});
        let stats = end_round(sent, ctl, plane, round)?;
        let sections = vm.save_state()?;
        ctl.send(&Message::DeviceState {
            final_round: round,
            sections,
        })?;
        match ctl.recv(Some(opts.timeout), "waiting for the destination to prepare")? {
            Message::Prepared { digest, cpu_ns } => Ok((digest, cpu_ns, stats)),
            m => Err(ctl.unexpected(&m, "waiting for Prepared")),
        }
    })();
    let (dest_digest, dest_cpu_ns, final_stats) = match switch {
        Ok(v) => v,
        Err(e) => {
            abort(ctl, "source failed during stop-and-copy");
            let _ = vm.stop_dirty_tracking();
            let cause = e.to_string();
            return match vm.resume() {
                Ok(()) if matches!(e, MigrationError::Cancelled) => Err(MigrationError::Cancelled),
                Ok(()) => Err(MigrationError::RolledBack { cause }),
                Err(re) => Err(MigrationError::RolledBack {
                    cause: format!("{cause}; resuming on the source also failed: {re}"),
                }),
            };
        }
    };
    pages_sent += final_stats.pages;
    wire += final_stats.wire_bytes;
    codec.add(&final_stats.codec);
    cpu_ns += final_stats.cpu_ns;
    rounds.push(RoundReport {
        round,
        pages: final_stats.pages,
        wire_bytes: final_stats.wire_bytes,
        ms: ms(final_stats.elapsed),
        dirtied_pages: 0,
        dirty_rate: 0.0,
        bandwidth: conv.bandwidth(),
        predicted_downtime_ms: 0.0,
        stop_and_copy: true,
    });
    on_progress(&Progress::Round(rounds[rounds.len() - 1].clone()));

    // Commit: from here on the source never resumes the guest.
    if let Err(e) = ctl.send(&Message::Commit) {
        return Err(MigrationError::OutcomeUnknown {
            cause: format!("sending it failed ({e})"),
        });
    }
    on_progress(&Progress::Committed);
    match ctl.recv(Some(opts.timeout), "waiting for the destination to resume") {
        Ok(Message::Resumed) => {}
        Ok(m) => {
            return Err(MigrationError::OutcomeUnknown {
                cause: format!("the destination answered {}", m.name()),
            })
        }
        Err(e) => {
            return Err(MigrationError::OutcomeUnknown {
                cause: format!("no confirmation came ({e})"),
            })
        }
    }
    let total = t0.elapsed();
    let downtime = t_pause.elapsed();
    let source_cpu_ns = cpu_ns + crate::scheduler::thread_cpu_ns().saturating_sub(cpu_start);
    let _ = vm.stop_dirty_tracking();

    // Verification, outside the downtime: the source RAM is frozen for good.
    let tv = Instant::now();
    let source_digest = ram_digest(vm.ram());
    let verify = tv.elapsed();
    let progress = match ctl.recv(
        Some(opts.timeout),
        "waiting for guest progress on the destination",
    ) {
        Ok(Message::Progress { delta }) => delta,
        Ok(m) => {
            warn!("destination sent {} instead of Progress", m.name());
            0
        }
        Err(e) => {
            warn!("no progress report from the destination: {e}");
            0
        }
    };
    let digest_match = source_digest == dest_digest;
    let ram_bytes = layout.total_bytes();
    Ok(MigrationReport {
        status: if digest_match {
            "completed"
        } else {
            "digest-mismatch"
        }
        .into(),
        total_time_ms: ms(total),
        downtime_ms: ms(downtime),
        setup_ms: ms(setup),
        rounds: rounds.len() as u64,
        pages_sent,
        bytes_on_wire: wire,
        ram_bytes,
        effective_gbps: ram_bytes as f64 / total.as_secs_f64() / 1e9,
        digest_match,
        source_digest: format!("{source_digest:016x}"),
        destination_digest: format!("{dest_digest:016x}"),
        verify_ms: ms(verify),
        guest_progress_after_resume: progress,
        transport: if plane.rdma { "rdma" } else { "tcp" }.into(),
        transport_detail: plane.detail.clone(),
        channels: sched.channels() as u16,
        bytes_copied_staging: codec.bytes_staged,
        // Pages move as they are in RAM over RDMA: no codec runs.
        compress: if plane.rdma {
            "none"
        } else {
            opts.compress.name()
        }
        .into(),
        codec: CodecReport::from(&codec),
        source_cpu_s: source_cpu_ns as f64 / 1e9,
        destination_cpu_s: dest_cpu_ns as f64 / 1e9,
        round_details: rounds,
    })
}

/// Turns a round's outcome into the migration's terms and, over RDMA (where the destination
/// sees no page arrive), tells the destination the round is complete.
fn end_round(
    sent: Result<crate::scheduler::RoundStats, crate::scheduler::SchedulerError>,
    ctl: &mut Control,
    plane: &DataPlane,
    round: u64,
) -> Result<crate::scheduler::RoundStats, MigrationError> {
    let stats = sent.map_err(|e| match e {
        crate::scheduler::SchedulerError::Cancelled => MigrationError::Cancelled,
        e => e.into(),
    })?;
    if plane.rdma {
        ctl.send(&Message::RoundProgress {
            round,
            pages: stats.pages,
            complete: true,
        })?;
    }
    Ok(stats)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
