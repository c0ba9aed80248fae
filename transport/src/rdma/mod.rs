//! RDMA data channels: one-sided RDMA WRITEs from registered source memory straight into
//! registered destination memory, on libibverbs (through `rdma-sys`).
//!
//! ```text
//! source                                               destination
//!   Device ── ProtectionDomain ──┬─ MemoryRegion (local read) per region
//!                                └─ PreparedQp ×N (INIT) ─┐
//!                          QpEndpoint ×N ──── control channel ───> RdmaTarget::new:
//!                                                          MemoryRegion (REMOTE_WRITE) per region,
//!                                                          N QPs connected to the source's (RTR/RTS)
//!               <─── QpEndpoint ×N + RemoteRegion per region
//!   PreparedQp::connect ──> ConnectedQp (RTR/RTS) ──> RdmaSender ×N
//!   RdmaSender::write_extents: extents → RDMA WRITEs (≤ MAX_WRITE_BYTES each, SGE lists
//!   where local memory is discontiguous), selectively signalled
//!   RdmaSender::flush: every posted write completed (RC: the data is placed remotely)
//! ```
//!
//! What this module owns: verbs objects and their lifetimes. Each object keeps what it depends
//! on alive (a memory region holds its protection domain and the [`MemoryMap`] whose memory it
//! pins; a queue pair holds its completion queue and protection domain), and everything is
//! released in `Drop`, queue pairs before the memory regions they point into, whatever the
//! outcome of a migration: no peer keeps access to memory after the owner lets go.
//! What it must not touch: page contents. The destination CPU never sees the data arrive.
//!
//! The module's rooms:
//! - device discovery: [`devices`], [`select`] — which device, port and GID reach a peer;
//! - verbs objects: [`Device`], [`ProtectionDomain`], [`MemoryRegion`], queue pairs as types
//!   per stage ([`PreparedQp`] → [`ConnectedQp`]);
//! - write planning: [`plan_writes`] turns extents into RDMA WRITEs with SGE lists (pure);
//! - the two ends: [`RdmaSource`]/[`RdmaSender`] and [`RdmaTarget`];
//! - the test hook [`FAULT_ENV`].
//!
//! Libraries: `rdma-sys` links the host's own `libibverbs.so.1` (and `librdmacm.so.1`) at
//! build time and libibverbs loads the host's providers (rxe, mlx5, ...) at run time.

mod discovery;
mod endpoints;
mod plan;
mod verbs;

pub use discovery::*;
pub use endpoints::*;
pub use plan::*;
pub use verbs::*;

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdma_sys as ffi;

use crate::{MappedRegion, MemoryMap};

/// Largest RDMA WRITE (one work request); longer extents are split.
pub const MAX_WRITE_BYTES: u64 = 1 << 20;
/// Send-queue depth asked for (the device may cap it).
pub const SEND_QUEUE_DEPTH: u32 = 512;
/// Most scatter-gather entries per write asked for (the device may cap it).
pub const MAX_SGE: u32 = 16;
/// Every this many writes one is signalled (the last write of each batch always is).
pub const SIGNAL_EVERY: u64 = 32;
/// Source memory is registered in blocks of this size, each when a write first reaches it.
pub const LOCAL_BLOCK_BYTES: u64 = 32 << 20;
/// How long a writer polls the completion queue before it arms the completion channel and
/// sleeps (perftest and NCCL poll; a wake-up costs several microseconds).
pub const SPIN_BEFORE_ARM: Duration = Duration::from_micros(20);
/// Most bytes of writes in flight per queue pair: 4 MiB is ~330 µs at 100 Gb/s, far beyond a
/// data-centre link's bandwidth-delay product (tens of µs) and a writer's wake-up. Measured,
/// not guessed: with 32 MiB, two queue pairs on soft-RoCE (nested VM) left the VM's CPUs idle
/// for a fifth of the migration and reached ~0.75 of ib_write_bw in the same boot; with 4 MiB
/// idle fell to 2-5 % and the ratio to ~1.0 (work a queue pair has taken is work no other
/// can steal). A short queue also keeps a round's end near its last post and a cancel quick.
pub const MAX_INFLIGHT_BYTES: u64 = 4 << 20;
/// Test hook: the source's RDMA writers read this variable. `qp-error-after:N` moves the QP
/// to the error state after it posted N writes; `wrong-rkey-after:N` uses a wrong remote key
/// from the N+1th write on. Either fires once per process (the first QP to get there), so a
/// retry in the same process succeeds.
pub const FAULT_ENV: &str = "LIVEMIG_RDMA_FAULT";

/// `ibv_port_attr.link_layer` values (an anonymous enum in verbs.h).
const LINK_LAYER_INFINIBAND: u8 = 1;
const LINK_LAYER_ETHERNET: u8 = 2;
/// Local ACK timeout exponent: 4.096 µs × 2^17 ≈ 537 ms per try (generous: soft-RoCE under
/// emulation can be slow to ACK, more so while another rail's queue pairs retry into a dead
/// link); with [`RETRY_COUNT`] retries a vanished peer or a cut rail is detected in about four
/// seconds.
const ACK_TIMEOUT: u8 = 17;
/// Transport retries before a write fails. Not 7: soft-RoCE (rxe) treats 7 as "retry forever".
const RETRY_COUNT: u8 = 6;
/// A queue pair with writes outstanding that completes none for this long (well beyond its
/// ACK timeout × (retries + 1), about 4 s, after which the device fails the write itself)
/// is taken for dead; it stays well under the peer's timeout for silence, so that its rail's
/// writes can be handed to the other rails before the destination gives the migration up.
pub const STALL_LIMIT: Duration = Duration::from_secs(20);
/// Hop limit of the GRH (RoCE v2 needs more than 1).
const HOP_LIMIT: u8 = 64;

/// Errors of the RDMA transport.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No verbs device at all.
    #[error(
        "no RDMA device: load rdma_rxe and `rdma link add rxe0 type rxe netdev eth0`, or use \
         --transport tcp"
    )]
    NoDevice,
    /// The requested device does not exist.
    #[error(
        "no RDMA device named {name:?} (devices here: {available}); see `livemig rdma devices`"
    )]
    UnknownDevice {
        /// Name asked for.
        name: String,
        /// Names present.
        available: String,
    },
    /// No port of the device(s) is active.
    #[error(
        "no active port on RDMA device(s) {devices}: check `rdma link` and the link of the \
         netdev under it, or use --transport tcp"
    )]
    NoActivePort {
        /// Devices looked at.
        devices: String,
    },
    /// A verbs call failed.
    #[error("{op} on RDMA device {device}: {source}")]
    Verbs {
        /// The verb.
        op: &'static str,
        /// Device name.
        device: String,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// A work request completed in error.
    #[error(
        "RDMA write on QP {qp} completed in error: {status} (status {code}, vendor error \
         {vendor_err:#x}, write #{wr_id}){note}"
    )]
    Completion {
        /// Local QP number.
        qp: u32,
        /// `ibv_wc_status_str` of the status.
        status: String,
        /// The status code.
        code: u32,
        /// Vendor error.
        vendor_err: u32,
        /// Sequence number of the write.
        wr_id: u64,
        /// Extra explanation (a fault injected by the test hook).
        note: &'static str,
    },
    /// Writes stopped completing.
    #[error(
        "RDMA QP {qp}: no completion for {secs} s with {outstanding} writes outstanding (is the \
         peer gone?)"
    )]
    CompletionTimeout {
        /// Local QP number.
        qp: u32,
        /// Seconds waited.
        secs: u64,
        /// Writes posted but not completed.
        outstanding: u64,
    },
    /// Another queue pair of the same device failed: the rail is down.
    #[error("RDMA QP {qp}: its rail is down ({cause})")]
    RailDown {
        /// Local QP number.
        qp: u32,
        /// The sibling's failure.
        cause: String,
    },
    /// An extent is not covered by registered memory on one side.
    #[error("extent {addr:#x}+{len:#x} is not covered by {side} registered memory")]
    Unmapped {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// `local` or `remote`.
        side: &'static str,
    },
    /// The peer's queue pairs or regions do not fit ours.
    #[error("unusable RDMA parameters from the peer: {0}")]
    Peer(String),
    /// The owner asked the writer to stop.
    #[error("RDMA writes stopped: the migration is ending")]
    Stopped,
    /// The test hook is set to something unknown.
    #[error("{FAULT_ENV}={0:?} is not a known fault (qp-error-after:N or wrong-rkey-after:N)")]
    BadFaultSpec(String),
}

fn verbs_err(op: &'static str, device: &str, source: io::Error) -> RdmaError {
    RdmaError::Verbs {
        op,
        device: device.to_string(),
        source,
    }
}

fn last_err(op: &'static str, device: &str) -> RdmaError {
    verbs_err(op, device, io::Error::last_os_error())
}

/// A verbs call returning 0 or an errno (or -1 with errno set, depending on the provider).
fn check(ret: i32, op: &'static str, device: &str) -> Result<(), RdmaError> {
    match ret {
        0 => Ok(()),
        r if r > 0 => Err(verbs_err(op, device, io::Error::from_raw_os_error(r))),
        _ => Err(last_err(op, device)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gid4(a: [u8; 4]) -> [u8; 16] {
        Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    fn dev(name: &str, active: bool, ip: [u8; 4]) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            node_guid: "0".into(),
            ports: vec![PortInfo {
                port: 1,
                state: if active { "active" } else { "down" }.into(),
                active,
                link_layer: "Ethernet",
                active_mtu: 1024,
                mtu_code: 3,
                lid: 0,
                gids: vec![
                    GidInfo {
                        index: 0,
                        gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                        kind: GidKind::RoceV1,
                        netdev: Some("eth".into()),
                    },
                    GidInfo {
                        index: 1,
                        gid: gid4(ip),
                        kind: GidKind::RoceV2,
                        netdev: Some("eth".into()),
                    },
                ],
            }],
        }
    }

    #[test]
    fn selection_prefers_the_peers_subnet_then_the_first_active_device() {
        let devs = vec![
            dev("a", false, [10, 0, 0, 1]),
            dev("b", true, [192, 168, 1, 5]),
            dev("c", true, [10, 0, 99, 1]),
        ];
        let p24 = |_: Ipv4Addr| Some(24);
        let s = select(&devs, None, Some("10.0.99.7".parse().unwrap()), &p24).unwrap();
        assert_eq!(
            (s.device.as_str(), s.gid.index, s.reaches_peer),
            ("c", 1, true)
        );
        let s = select(&devs, None, Some("172.16.0.1".parse().unwrap()), &p24).unwrap();
        assert_eq!((s.device.as_str(), s.reaches_peer), ("b", false));
        let s = select(&devs, Some("b"), Some("10.0.99.7".parse().unwrap()), &p24).unwrap();
        assert_eq!((s.device.as_str(), s.reaches_peer), ("b", false));
        assert!(matches!(
            select(&devs, Some("a"), None, &p24),
            Err(RdmaError::NoActivePort { .. })
        ));
        let e = select(&devs, Some("zz"), None, &p24).unwrap_err();
        assert!(e.to_string().contains("a, b, c"), "{e}");
        let e = select(&[], None, None, &p24).unwrap_err();
        assert!(e.to_string().contains("rdma link add"), "{e}");
    }

    #[test]
    fn rails_are_the_named_devices_or_every_device_in_the_peers_subnet_but_the_peer() {
        let devs = vec![
            dev("a", true, [10, 0, 99, 1]),
            dev("b", true, [10, 0, 98, 1]),
            dev("c", true, [10, 0, 99, 3]),
            dev("peer", true, [10, 0, 99, 2]),
            dev("down", false, [10, 0, 99, 4]),
        ];
        let p24 = |_: Ipv4Addr| Some(24);
        let peer = Some("10.0.99.2".parse().unwrap());
        let names = |r: Vec<Selection>| r.into_iter().map(|s| s.device).collect::<Vec<_>>();
        // Default: every active device reaching the peer, not the one holding its address.
        assert_eq!(
            names(select_rails(&devs, &[], peer, &p24).unwrap()),
            ["a", "c"]
        );
        // Named: those, in order, each once, reaching the peer or not.
        let named = ["b".to_string(), "a".to_string(), "b".to_string()];
        assert_eq!(
            names(select_rails(&devs, &named, peer, &p24).unwrap()),
            ["b", "a"]
        );
        assert!(select_rails(&devs, &["down".to_string()], peer, &p24).is_err());
        // Nothing in the peer's subnet: one rail, the fallback.
        let far = Some("172.16.0.1".parse().unwrap());
        assert_eq!(names(select_rails(&devs, &[], far, &p24).unwrap()), ["a"]);
        // Among named devices, the one reaching the peer wins; else the first named.
        let s = select_among(&devs, &named, Some("10.0.99.9".parse().unwrap()), &p24).unwrap();
        assert_eq!((s.device.as_str(), s.reaches_peer), ("a", true));
        let s = select_among(&devs, &named, far, &p24).unwrap();
        assert_eq!((s.device.as_str(), s.reaches_peer), ("b", false));
    }

    #[test]
    fn subnets() {
        let a: Ipv4Addr = "10.0.99.1".parse().unwrap();
        assert!(same_subnet(a, "10.0.99.200".parse().unwrap(), 24));
        assert!(!same_subnet(a, "10.0.98.1".parse().unwrap(), 24));
        assert!(same_subnet(a, "10.9.9.9".parse().unwrap(), 8));
        assert!(same_subnet(a, "1.2.3.4".parse().unwrap(), 0));
        assert_eq!(ipv4_prefix(Ipv4Addr::LOCALHOST), Some(8));
    }

    #[test]
    fn fault_specs() {
        std::env::remove_var(FAULT_ENV);
        assert_eq!(Fault::from_env().unwrap(), Fault::None);
    }

    #[test]
    fn registered_blocks_cover_what_they_hold_and_nothing_else() {
        const B: u64 = LOCAL_BLOCK_BYTES;
        let seg = |addr: u64| LocalSegment {
            addr,
            host: 0x7000_0000_0000 + addr,
            len: B,
            lkey: 1,
        };
        let none = endpoints::LocalMemory::default();
        assert!(none.covers(&[]));
        assert!(!none.covers(&[(0, 4096)]));
        // Blocks 0, 1 and 3 registered: block 2 is a hole.
        let l = endpoints::LocalMemory {
            mrs: Vec::new(),
            segments: vec![seg(0), seg(B), seg(3 * B)],
        };
        assert!(l.covers(&[(0, 4096), (B - 4096, 8192), (3 * B, B)]));
        assert!(!l.covers(&[(2 * B, 4096)]));
        assert!(!l.covers(&[(B, B + 4096)]), "runs into the hole");
        assert!(!l.covers(&[(4 * B, 4096)]), "past the end");
    }

    #[test]
    fn sges_follow_discontiguous_local_memory() {
        // One remote region over two local segments whose host addresses are far apart.
        let local = [
            LocalSegment {
                addr: 0,
                host: 0x10_0000,
                len: 0x2000,
                lkey: 1,
            },
            LocalSegment {
                addr: 0x2000,
                host: 0x90_0000,
                len: 0x2000,
                lkey: 2,
            },
        ];
        let remote = [RemoteRegion {
            addr: 0,
            len: 0x4000,
            remote_addr: 0x5000_0000,
            rkey: 9,
        }];
        let (mut w, mut s) = (Vec::new(), Vec::new());
        plan_writes(
            &local,
            &remote,
            &[(0x1000, 0x2000)],
            1 << 20,
            16,
            &mut w,
            &mut s,
        )
        .unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].remote_addr, 0x5000_1000);
        assert_eq!(w[0].bytes, 0x2000);
        assert_eq!(
            s,
            vec![
                Sge {
                    host: 0x10_1000,
                    len: 0x1000,
                    lkey: 1
                },
                Sge {
                    host: 0x90_0000,
                    len: 0x1000,
                    lkey: 2
                },
            ]
        );
        // Not covered remotely / locally.
        assert!(matches!(
            plan_writes(
                &local,
                &remote[..0],
                &[(0, 0x1000)],
                1 << 20,
                16,
                &mut w,
                &mut s
            ),
            Err(RdmaError::Unmapped { side: "remote", .. })
        ));
        assert!(matches!(
            plan_writes(
                &local,
                &remote,
                &[(0x3000, 0x2000)],
                1 << 20,
                16,
                &mut w,
                &mut s
            ),
            Err(RdmaError::Unmapped { side: "local", .. })
        ));
    }

    fn map(buf: &mut [u8], pieces: usize) -> MemoryMap {
        let step = buf.len() / pieces;
        let regions = (0..pieces)
            .map(|i| MappedRegion {
                addr: (i * step) as u64,
                host: buf[i * step..].as_mut_ptr(),
                len: step as u64,
            })
            .collect();
        // SAFETY: the tests keep `buf` alive and take no references into it until every
        // clone of the map (held by memory regions) is gone.
        unsafe { MemoryMap::new(regions, Arc::new(())) }
    }

    /// The devices to use: `LIVEMIG_RDMA_DEVICES` (set by scripts/rdma-vm.sh), first and last.
    fn device_pair() -> (Arc<Device>, Arc<Device>) {
        let devs = devices().expect("an RDMA device");
        let names: Vec<String> = std::env::var("LIVEMIG_RDMA_DEVICES")
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_else(|_| devs.iter().map(|d| d.name.clone()).collect());
        let open =
            |n: &str| Device::open(&select(&devs, Some(n), None, &ipv4_prefix).unwrap()).unwrap();
        (open(&names[0]), open(&names[names.len() - 1]))
    }

    #[test]
    #[ignore = "needs an RDMA device: run scripts/test-nested.sh"]
    fn writes_land_in_place_and_a_vanished_peer_is_an_error() {
        let (a, b) = device_pair();
        let len = 8 << 20;
        let mut src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; len];
        // Two regions on each side: extents crossing the boundary split into two writes.
        let (sm, dm) = (map(&mut src, 2), map(&mut dst, 2));
        let source = RdmaSource::new(&a, sm.clone()).unwrap();
        let prepared: Vec<PreparedQp> = (0..2).map(|_| source.prepare_qp().unwrap()).collect();
        let eps: Vec<QpEndpoint> = prepared.iter().map(|p| p.endpoint()).collect();
        let target = RdmaTarget::new(&b, &dm, &eps).unwrap();
        let regions: Arc<[RemoteRegion]> = target.regions().into();
        check_remote_regions(&sm, &regions).unwrap();
        let mut senders: Vec<RdmaSender> = prepared
            .into_iter()
            .zip(target.endpoints())
            .map(|(p, e)| {
                RdmaSender::new(
                    &source,
                    p.connect(&e).unwrap(),
                    regions.clone(),
                    Duration::from_secs(20),
                )
                .unwrap()
            })
            .collect();
        let stop = AtomicBool::new(false);
        // Every other 64 KiB on QP 0, a 3 MiB run across the region boundary on QP 1, and
        // many single pages (more writes than the send queue holds) on QP 0.
        let ex0: Vec<(u64, u64)> = (0..16).map(|i| ((i * 128) << 10, 64 << 10)).collect();
        let pages: Vec<(u64, u64)> = (0..600u64)
            .map(|i| ((6 << 20) + i * 2 * 1024, 1024))
            .collect();
        assert_eq!(
            senders[0].write_extents(&ex0, &stop).unwrap(),
            16 * (64 << 10)
        );
        assert_eq!(
            senders[1]
                .write_extents(&[(3 << 20, 3 << 20)], &stop)
                .unwrap(),
            3 << 20
        );
        assert_eq!(senders[0].write_extents(&pages, &stop).unwrap(), 600 * 1024);
        for s in &mut senders {
            s.flush(&stop).unwrap();
        }
        let st = senders[1].take_stats();
        assert_eq!(st.bytes, 3 << 20);
        assert_eq!(st.writes, 3, "{st:?}");
        // The peer goes away: its QPs and registrations are gone, writes fail.
        drop(target);
        let t = Instant::now();
        let r = senders[1]
            .write_extents(&[(0, 1 << 20)], &stop)
            .and_then(|_| senders[1].flush(&stop));
        let e = r.unwrap_err();
        println!("after the peer vanished ({:?}): {e}", t.elapsed());
        assert!(matches!(e, RdmaError::Completion { .. }), "{e}");
        drop(senders);
        drop(source);
        drop((sm, dm));
        let mut want = vec![0u8; len];
        for &(a, l) in ex0.iter().chain(&[(3 << 20, 3 << 20)]).chain(&pages) {
            let (a, l) = (a as usize, l as usize);
            want[a..a + l].copy_from_slice(&src[a..a + l]);
        }
        assert!(dst == want, "destination differs from the writes");
    }

    proptest! {
        #[test]
        fn planned_writes_cover_extents_exactly_within_bounds(
            cuts in proptest::collection::vec(1u64..40, 1..6),
            rcuts in proptest::collection::vec(1u64..40, 1..6),
            runs in proptest::collection::vec((0u64..3, 1u64..30), 1..20),
            max_pages in 1u64..12,
            max_sge in 1usize..4,
        ) {
            const P: u64 = 4096;
            // Local segments: consecutive addresses, scattered host addresses.
            let mut local = Vec::new();
            let mut a = 0;
            for (i, c) in cuts.iter().enumerate() {
                local.push(LocalSegment { addr: a, host: (i as u64 + 1) << 32, len: c * P, lkey: i as u32 });
                a += c * P;
            }
            let total = a;
            let mut remote = Vec::new();
            let mut a = 0;
            for (i, c) in rcuts.iter().enumerate() {
                let len = (c * P).min(total - a);
                if len == 0 { break; }
                remote.push(RemoteRegion { addr: a, len, remote_addr: (i as u64 + 1) << 40, rkey: 100 + i as u32 });
                a += len;
            }
            if a < total {
                remote.push(RemoteRegion { addr: a, len: total - a, remote_addr: 99 << 40, rkey: 999 });
            }
            let mut extents = Vec::new();
            let mut g = 0;
            for (gap, n) in runs {
                g += gap * P;
                if g >= total { break; }
                let len = (n * P).min(total - g);
                extents.push((g, len));
                g += len;
            }
            let (mut wrs, mut sges) = (Vec::new(), Vec::new());
            plan_writes(&local, &remote, &extents, max_pages * P, max_sge, &mut wrs, &mut sges).unwrap();
            // Replay: every byte of every extent written exactly once, to the right place.
            let mut got = Vec::new();
            for w in &wrs {
                prop_assert!(w.count >= 1 && w.count <= max_sge);
                prop_assert!(w.bytes <= max_pages * P);
                let r = remote.iter().find(|r| r.rkey == w.rkey).unwrap();
                prop_assert!(w.remote_addr >= r.remote_addr && w.remote_addr + w.bytes <= r.remote_addr + r.len);
                let mut gpa = r.addr + (w.remote_addr - r.remote_addr);
                let mut sum = 0;
                for s in &sges[w.first..w.first + w.count] {
                    let l = local.iter().find(|l| l.lkey == s.lkey).unwrap();
                    prop_assert_eq!(s.host, l.host + (gpa - l.addr));
                    prop_assert!(gpa + u64::from(s.len) <= l.addr + l.len);
                    got.push((gpa, u64::from(s.len)));
                    gpa += u64::from(s.len);
                    sum += u64::from(s.len);
                }
                prop_assert_eq!(sum, w.bytes);
            }
            let flat = |v: &[(u64, u64)]| -> Vec<u64> {
                v.iter().flat_map(|&(a, l)| (0..l / P).map(move |i| a + i * P)).collect()
            };
            prop_assert_eq!(flat(&got), flat(&extents));
        }
    }
}
