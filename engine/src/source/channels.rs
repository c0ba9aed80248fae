//! The outgoing data plane: TCP data connections or RDMA queue pairs, both feeding the same
//! page scheduler. What differs between them after set-up is behind [`OutgoingPlane`]: over
//! RDMA the destination sees no page arrive, so the source tells it how each round goes on
//! the control channel.

use std::net::IpAddr;
use std::sync::Arc;

use livemig_transport::seal::Sealer;
use livemig_transport::tcp::DataSender;
use livemig_transport::{frame, MappedRegion, MemoryMap, TransportError};

use super::handshake::connect;
use super::{MigrateOptions, TransportChoice};
use crate::auth::{Direction, SessionKeys};
use crate::dirty::Extent;
use crate::protocol::Message;
use crate::scheduler::Scheduler;
use crate::session::{Control, MigrationError};
use crate::storage::outgoing::OutgoingStorage;
use crate::vm::MigratableVm;

/// The RDMA devices opened for a migration, one per rail, the first reaching the destination
/// (an uninhabited type without the `rdma` feature).
#[cfg(feature = "rdma")]
pub(super) type RdmaDevice = Vec<Arc<livemig_transport::rdma::Device>>;
#[cfg(not(feature = "rdma"))]
pub(super) type RdmaDevice = std::convert::Infallible;

/// A scheduler over the plane's channels, the plane, and a line describing it.
pub(super) type Plane = (Scheduler, Box<dyn OutgoingPlane>, String);

/// What the source's state machine needs to know of the transport once pages move.
pub(super) trait OutgoingPlane {
    /// `tcp` or `rdma`.
    fn name(&self) -> &'static str;
    /// Whether pages go through the codecs (TCP) or move as they are in RAM (RDMA).
    fn encodes(&self) -> bool;
    /// While a round runs: `pages` of it are queued.
    fn round_progress(&self, ctl: &mut Control, round: u64, pages: u64);
    /// Pages after which a round's RAM goes through the transport's barrier and is listed to
    /// the destination with [`OutgoingPlane::landed`] (None: a round goes in one piece).
    fn landing_slice(&self, _ctl: &Control) -> Option<u64> {
        None
    }
    /// The RAM pages of `ram`, part of `round`, passed the transport's barrier: they are in
    /// destination RAM.
    fn landed(
        &self,
        _ctl: &mut Control,
        _round: u64,
        _ram: &[Extent],
    ) -> Result<(), MigrationError> {
        Ok(())
    }
    /// Every page of `round` (`pages` in all) is delivered as far as this transport's barrier
    /// requires.
    fn round_complete(
        &self,
        ctl: &mut Control,
        round: u64,
        pages: u64,
    ) -> Result<(), MigrationError>;
    /// Before the guest pauses: waits (boundedly) until what was sent up to `round` (the
    /// last pre-copy round) reached the destination; returns the round when the destination
    /// confirmed all of it is in its RAM.
    fn drain(&self, _ctl: &mut Control, _round: u64) -> Result<Option<u64>, MigrationError> {
        Ok(None)
    }
    /// What each rail carried (RDMA over several devices; empty otherwise).
    fn rails(&self, _sched: &Scheduler) -> Vec<crate::session::RailReport> {
        Vec::new()
    }
}

/// TCP: round markers travel in-band on every data connection.
struct Tcp {
    /// The RAM data connections (clones), to see what they still have in flight.
    data: Vec<std::net::TcpStream>,
    /// The destination answers `AwaitLanded` ([`crate::protocol::FEATURE_LANDED`]).
    landed: bool,
}

/// Longest wait for the data connections to drain before the guest pauses.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest wait for `Landed` (the destination answers within a second of its own).
const LANDED_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl OutgoingPlane for Tcp {
    fn name(&self) -> &'static str {
        "tcp"
    }
    fn encodes(&self) -> bool {
        true
    }
    fn round_progress(&self, _: &mut Control, _: u64, _: u64) {}
    fn round_complete(&self, _: &mut Control, _: u64, _: u64) -> Result<(), MigrationError> {
        Ok(())
    }
    /// A round ends when its marker is written, with up to a socket buffer (and, on a shaped
    /// or long link, a queue) of it still on the way: the pause waits until the destination
    /// acknowledged all of it, so the downtime does not spend that draining while the guest
    /// could still run — and, where the destination answers `AwaitLanded`, until its
    /// receivers also worked through what its socket buffers held (compressed pages can be
    /// many milliseconds of decoding behind what its kernel acknowledged).
    fn drain(&self, ctl: &mut Control, round: u64) -> Result<Option<u64>, MigrationError> {
        let t = std::time::Instant::now();
        while t.elapsed() < DRAIN_LIMIT
            && self
                .data
                .iter()
                .any(|s| livemig_transport::tcp::unacked_bytes(s).is_some_and(|n| n > 0))
        {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        if !self.landed {
            return Ok(None);
        }
        ctl.send(&Message::AwaitLanded { round })?;
        match ctl.recv(Some(LANDED_WAIT), "waiting for the last round to land")? {
            Message::Landed { round: r, complete } if r == round => Ok(complete.then_some(round)),
            m => Err(ctl.unexpected(&m, "waiting for Landed")),
        }
    }
}

/// Pages of one RDMA landing slice (32 MiB): a barrier drains the queue pairs' windows that
/// often, and at most this much is left for the destination to hash when a round ends.
#[cfg(feature = "rdma")]
const LANDING_SLICE_PAGES: u64 = 8192;

/// RDMA: the destination CPU sees nothing arrive; rounds are announced on the control
/// channel.
#[cfg(feature = "rdma")]
struct Rdma {
    /// Per rail: its device, the destination's, and the scheduler channels of its QPs.
    rails: Vec<Rail>,
}

/// One rail: a local device and the queue pairs through it.
#[cfg(feature = "rdma")]
struct Rail {
    device: String,
    peer_gid: std::net::Ipv6Addr,
    channels: std::ops::Range<usize>,
}

#[cfg(feature = "rdma")]
impl OutgoingPlane for Rdma {
    fn name(&self) -> &'static str {
        "rdma"
    }
    fn encodes(&self) -> bool {
        false
    }
    fn round_progress(&self, ctl: &mut Control, round: u64, pages: u64) {
        // Tells the destination the source is alive; a failure here shows up as failed
        // writes or at the round's end.
        let _ = ctl.send(&Message::RoundProgress {
            round,
            pages,
            complete: false,
        });
    }
    fn landing_slice(&self, ctl: &Control) -> Option<u64> {
        // Protocol 3 lists the pages that landed (older destinations hash all RAM at the
        // end): a large round is listed in slices, so the destination hashes while the rest
        // of the round is written and only the last slice is left to hash when it ends.
        (ctl.version() >= 3).then_some(LANDING_SLICE_PAGES)
    }
    fn landed(&self, ctl: &mut Control, round: u64, ram: &[Extent]) -> Result<(), MigrationError> {
        if ctl.version() >= 3 {
            for part in ram.chunks(crate::protocol::MAX_ROUND_EXTENTS) {
                ctl.send(&Message::RoundExtents {
                    round,
                    extents: part.iter().map(|e| (e.gpa, e.pages)).collect(),
                })?;
            }
        }
        Ok(())
    }
    fn round_complete(
        &self,
        ctl: &mut Control,
        round: u64,
        pages: u64,
    ) -> Result<(), MigrationError> {
        ctl.send(&Message::RoundProgress {
            round,
            pages,
            complete: true,
        })
    }
    fn rails(&self, sched: &Scheduler) -> Vec<crate::session::RailReport> {
        if self.rails.len() < 2 {
            return Vec::new();
        }
        let bytes = sched.channel_bytes();
        self.rails
            .iter()
            .map(|r| crate::session::RailReport {
                device: r.device.clone(),
                destination_gid: r.peer_gid.to_string(),
                queue_pairs: r.channels.len() as u16,
                bytes: r.channels.clone().map(|c| bytes[c]).sum(),
                failed: sched
                    .lost()
                    .iter()
                    .find(|(c, _)| r.channels.contains(c))
                    .map(|(_, e)| e.clone()),
            })
            .collect()
    }
}

/// The regions of `vm`'s RAM as the transport sees them, and the disks being copied.
fn memory_map(vm: &dyn MigratableVm, storage: Option<&OutgoingStorage>) -> MemoryMap {
    let ram = vm.ram().clone();
    let mut regions: Vec<MappedRegion> = ram
        .host_regions()
        .into_iter()
        .map(|(addr, host, len)| MappedRegion { addr, host, len })
        .collect();
    let disks = storage.filter(|s| s.copying()).map(|s| {
        let (r, owner) = s.regions();
        regions.extend(r);
        owner
    });
    // SAFETY: the regions are the live mappings of `ram` and of the disks, kept alive by the
    // clones passed as owner; the data path only reads them (writev, or the RDMA device
    // through a local-read registration), which tolerates the guest writing.
    unsafe { MemoryMap::new(regions, Arc::new((ram, disks))) }
}

/// Opens the session's TCP data connections, each bound by its ChannelHello.
pub(super) fn open_tcp(
    vm: &dyn MigratableVm,
    to: &str,
    opts: &MigrateOptions,
    (token, counted, landed): (u64, bool, bool),
    keys: Option<&SessionKeys>,
    storage: &OutgoingStorage,
) -> Result<Plane, MigrationError> {
    let mut senders = Vec::new();
    let mut data = Vec::new();
    let channels = opts.channels_for(false);
    // A copy of disks adds the storage lane, the last channel.
    for index in 0..channels + u16::from(storage.copying()) {
        let mut s = connect(to, opts, "data channel")?;
        let _ = s.set_write_timeout(Some(opts.timeout));
        // A sealed session never shows its token: the channel proves it in its first
        // sealed record instead.
        let hello_token = if keys.is_some() { 0 } else { token };
        let (kind, payload) = Message::ChannelHello {
            token: hello_token,
            index,
        }
        .encode();
        frame::write_frame(&mut s, kind, &payload).map_err(|source| TransportError::Io {
            op: "opening a data channel",
            peer: to.to_string(),
            source,
        })?;
        // The RAM channels are idle between rounds; the storage lane carries the guest's
        // mirrored disk writes at any time, so it is not waited on.
        if index < channels {
            if let Ok(c) = s.try_clone() {
                data.push(c);
            }
        }
        let mut tx = DataSender::new(s)?;
        if let Some(k) = keys {
            tx.seal_with(Sealer::new(
                &k.key(1 + u32::from(index), Direction::ToDestination),
            ));
            tx.send_record(&token.to_le_bytes())?;
        }
        senders.push(tx);
    }
    let sched = Scheduler::new(
        senders,
        memory_map(vm, Some(storage)),
        vm.ram().layout(),
        (opts.pin_workers, opts.bandwidth.clone()),
        (opts.compress, opts.delta_cache_bytes),
        storage.copying().then(|| storage.hashes()),
        counted,
    );
    Ok((sched, Box::new(Tcp { data, landed }), String::new()))
}

/// Connects the session's RDMA queue pairs (see [`connect_rdma`]); an Abort tells the
/// destination if that fails.
pub(super) fn open_rdma(
    ctl: &mut Control,
    vm: &dyn MigratableVm,
    dev: &RdmaDevice,
    opts: &MigrateOptions,
) -> Result<Plane, MigrationError> {
    #[cfg(feature = "rdma")]
    {
        let map = memory_map(vm, None);
        match connect_rdma(ctl, dev, &map, opts) {
            Ok((senders, rails, d)) => Ok((
                Scheduler::new_rdma(
                    senders,
                    map,
                    vm.ram().layout(),
                    (opts.pin_workers, rails.len() > 1),
                    opts.bandwidth.clone(),
                ),
                Box::new(Rdma { rails }),
                d,
            )),
            Err(e) => {
                let _ = ctl.send(&Message::Abort {
                    reason: format!("source could not set up RDMA: {e}"),
                });
                Err(e)
            }
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = (ctl, vm, opts);
        match *dev {}
    }
}

/// Decides the transport before connecting: an open RDMA device, or none (TCP), and a line
/// saying why.
pub(super) fn plan_transport(
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
            let rails = livemig_transport::rdma::Device::open_rails(&opts.rdma_devices, peer)
                .map_err(|e| {
                    MigrationError::TransportUnavailable(format!("--transport rdma: {e}"))
                })?;
            let d = describe_rails(&rails, &peer_name);
            Ok((Some(rails), format!("rdma: {d}")))
        }
        #[cfg(feature = "rdma")]
        TransportChoice::Auto if opts.key.as_ref().is_some_and(crate::auth::Key::seals) => Ok((
            None,
            "auto: tcp (RDMA writes pages in clear and this session is encrypted; \
             --transport rdma, or --encrypt off, lets it use RDMA)"
                .into(),
        )),
        #[cfg(feature = "rdma")]
        TransportChoice::Auto => {
            use livemig_transport::rdma::{self, RdmaError};
            let named = !opts.rdma_devices.is_empty();
            let sel = rdma::devices()
                .and_then(|d| rdma::select_rails(&d, &opts.rdma_devices, peer, &rdma::ipv4_prefix));
            match sel {
                Ok(sel) if sel[0].reaches_peer || named => {
                    match sel
                        .iter()
                        .map(rdma::Device::open)
                        .collect::<Result<Vec<_>, _>>()
                    {
                        Ok(rails) => {
                            let d = describe_rails(&rails, &peer_name);
                            Ok((Some(rails), format!("auto: rdma ({d})")))
                        }
                        Err(e) => Ok((None, format!("auto: tcp (RDMA: {e})"))),
                    }
                }
                Ok(sel) => Ok((
                    None,
                    format!(
                        "auto: tcp (no RDMA device has an address in {peer_name}'s subnet; {} \
                         would not reach it)",
                        sel[0].device
                    ),
                )),
                Err(RdmaError::NoDevice) => Ok((None, "auto: tcp (no RDMA device here)".into())),
                Err(e) => Ok((None, format!("auto: tcp ({e})"))),
            }
        }
    }
}

/// The rails, described.
#[cfg(feature = "rdma")]
fn describe_rails(rails: &[Arc<livemig_transport::rdma::Device>], peer: &str) -> String {
    let each: Vec<String> = rails.iter().map(|d| describe_device(d, peer)).collect();
    match each.len() {
        1 => each.join(""),
        n => format!("{n} rails: {}", each.join("; ")),
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

/// Announces the source's queue pairs (`channels` per rail), connects them to the
/// destination's and makes one sender per pair. Over several rails the destination answers one
/// RdmaAccept per rail, in order: each rail writes into its own registration there.
#[cfg(feature = "rdma")]
fn connect_rdma(
    ctl: &mut Control,
    rails: &RdmaDevice,
    map: &MemoryMap,
    opts: &MigrateOptions,
) -> Result<(Vec<livemig_transport::rdma::RdmaSender>, Vec<Rail>, String), MigrationError> {
    use crate::protocol::RdmaQp;
    use livemig_transport::rdma::{
        check_remote_regions, QpEndpoint, RdmaError, RdmaSender, RdmaSource, RemoteRegion,
    };
    let rdma_err = |e: RdmaError| MigrationError::Transport(e.into());
    let per_rail = usize::from(opts.channels_for(true).max(1));
    let mut prepared = Vec::new();
    for dev in rails {
        let source = RdmaSource::new(dev, map.clone()).map_err(rdma_err)?;
        for _ in 0..per_rail {
            prepared.push((source.clone(), source.prepare_qp().map_err(rdma_err)?));
        }
    }
    let qps = prepared
        .iter()
        .map(|(_, p)| {
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
    let mut prepared = prepared.into_iter();
    let mut senders = Vec::with_capacity(rails.len() * per_rail);
    let mut out = Vec::with_capacity(rails.len());
    for dev in rails {
        let (qps, regions) = match ctl.recv(
            Some(opts.timeout),
            "waiting for the destination's RDMA queue pairs",
        )? {
            Message::RdmaAccept { qps, regions } => (qps, regions),
            m => return Err(ctl.unexpected(&m, "waiting for RdmaAccept")),
        };
        if qps.len() != per_rail {
            return Err(rdma_err(RdmaError::Peer(format!(
                "{} queue pairs for our {per_rail} on {}",
                qps.len(),
                dev.name()
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
        let first = senders.len();
        for q in &qps {
            let Some((source, p)) = prepared.next() else {
                return Err(rdma_err(RdmaError::Peer(
                    "more queue pairs than ours".into(),
                )));
            };
            let qp = p
                .connect(&QpEndpoint {
                    qpn: q.qpn,
                    psn: q.psn,
                    gid: q.gid,
                    lid: q.lid,
                    mtu: q.mtu,
                })
                .map_err(rdma_err)?;
            senders.push(
                RdmaSender::new(&source, qp, remote.clone(), opts.timeout).map_err(rdma_err)?,
            );
        }
        out.push(Rail {
            device: dev.name().to_string(),
            peer_gid: std::net::Ipv6Addr::from(qps[0].gid),
            channels: first..senders.len(),
        });
    }
    let gids: Vec<String> = out.iter().map(|r| r.peer_gid.to_string()).collect();
    let d = format!(
        "destination GID {}; {} RC queue pair{}{}, RDMA WRITEs of at most {} KiB",
        gids.join(", "),
        senders.len(),
        if senders.len() == 1 { "" } else { "s" },
        if out.len() > 1 {
            format!(" ({per_rail} per rail)")
        } else {
            String::new()
        },
        livemig_transport::rdma::MAX_WRITE_BYTES >> 10
    );
    Ok((senders, out, d))
}
