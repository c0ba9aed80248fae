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
//! Device discovery ([`devices`], [`select`]) and the test hook ([`FAULT_ENV`]) live here too.
//!
//! Libraries: `rdma-sys` links the host's own `libibverbs.so.1` (and `librdmacm.so.1`) at
//! build time and libibverbs loads the host's providers (rxe, mlx5, ...) at run time.

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
/// Most bytes of writes in flight per queue pair. Enough to cover any link's bandwidth-delay
/// product; bounded so that a round's end is near its last post (the owner hears progress
/// while the data actually moves, and a cancel does not wait behind a long queue).
pub const MAX_INFLIGHT_BYTES: u64 = 32 << 20;
/// Test hook: the source's RDMA writers read this variable. `qp-error-after:N` moves the QP
/// to the error state after it posted N writes; `wrong-rkey-after:N` uses a wrong remote key
/// from the N+1th write on. Either fires once per process (the first QP to get there), so a
/// retry in the same process succeeds.
pub const FAULT_ENV: &str = "LIVEMIG_RDMA_FAULT";

/// `ibv_port_attr.link_layer` values (an anonymous enum in verbs.h).
const LINK_LAYER_INFINIBAND: u8 = 1;
const LINK_LAYER_ETHERNET: u8 = 2;
/// Local ACK timeout exponent: 4.096 µs × 2^16 ≈ 268 ms per try (generous: soft-RoCE under
/// emulation can be slow to ACK); with [`RETRY_COUNT`] retries a vanished peer is detected
/// in about two seconds.
const ACK_TIMEOUT: u8 = 16;
/// Transport retries before a write fails. Not 7: soft-RoCE (rxe) treats 7 as "retry forever".
const RETRY_COUNT: u8 = 6;
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

// ---------------------------------------------------------------------------------------------
// Discovery

/// Kind of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    /// InfiniBand (or RoCE v1 on old kernels).
    Ib,
    /// RoCE v1 (Ethernet, no IP header).
    RoceV1,
    /// RoCE v2 (UDP/IP: routable).
    RoceV2,
}

impl std::fmt::Display for GidKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GidKind::Ib => "IB",
            GidKind::RoceV1 => "RoCE v1",
            GidKind::RoceV2 => "RoCE v2",
        })
    }
}

/// One valid GID of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidInfo {
    /// Index in the port's GID table.
    pub index: u32,
    /// The GID (an IPv6 address; IPv4-mapped for RoCE on IPv4).
    pub gid: [u8; 16],
    /// Its kind.
    pub kind: GidKind,
    /// The netdev it belongs to (RoCE).
    pub netdev: Option<String>,
}

impl GidInfo {
    /// The IPv4 address of an IPv4-mapped GID.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        Ipv6Addr::from(self.gid).to_ipv4_mapped()
    }
}

/// One port of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port number (from 1).
    pub port: u8,
    /// Link state as libibverbs names it (`active`, `down`, `init`, ...).
    pub state: String,
    /// Whether the port is active (usable).
    pub active: bool,
    /// `InfiniBand`, `Ethernet` or `unspecified`.
    pub link_layer: &'static str,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// Active MTU as the `ibv_mtu` code (1 = 256 ... 5 = 4096).
    pub mtu_code: u8,
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Valid GIDs.
    pub gids: Vec<GidInfo>,
}

/// A verbs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name (`rxe0`, `mlx5_0`, ...).
    pub name: String,
    /// Node GUID.
    pub node_guid: String,
    /// Ports.
    pub ports: Vec<PortInfo>,
}

extern "C" {
    // In libibverbs since rdma-core 31 (IBVERBS_1.11); verbs.h wraps it in a static inline
    // `ibv_query_gid_table`, which bindgen does not see.
    fn _ibv_query_gid_table(
        context: *mut ffi::ibv_context,
        entries: *mut ffi::ibv_gid_entry,
        max_entries: usize,
        flags: u32,
        entry_size: usize,
    ) -> isize;
}

/// The device list, freed on drop.
struct DeviceList {
    list: *mut *mut ffi::ibv_device,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<DeviceList, RdmaError> {
        let mut n = 0i32;
        // SAFETY: ibv_get_device_list writes the count into `n` and returns a list we free in
        // Drop (or NULL).
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() || n <= 0 {
            if !list.is_null() {
                // SAFETY: `list` came from ibv_get_device_list and is freed once.
                unsafe { ffi::ibv_free_device_list(list) };
            }
            return Err(RdmaError::NoDevice);
        }
        Ok(DeviceList {
            list,
            len: n as usize,
        })
    }

    fn devices(&self) -> impl Iterator<Item = (String, *mut ffi::ibv_device)> + '_ {
        (0..self.len).filter_map(move |i| {
            // SAFETY: the list holds `len` valid device pointers while `self` lives.
            let dev = unsafe { *self.list.add(i) };
            if dev.is_null() {
                return None;
            }
            // SAFETY: `dev` is valid; the name is a NUL-terminated string owned by it.
            let name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            Some((name, dev))
        })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: `list` came from ibv_get_device_list and is freed exactly once; contexts
        // opened from it stay valid after the list is freed.
        unsafe { ffi::ibv_free_device_list(self.list) };
    }
}

/// An open device context, closed on drop.
struct RawContext {
    ctx: *mut ffi::ibv_context,
    name: String,
}

impl RawContext {
    fn open(dev: *mut ffi::ibv_device, name: &str) -> Result<RawContext, RdmaError> {
        // SAFETY: `dev` is a valid device from a live device list.
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(last_err("ibv_open_device", name));
        }
        Ok(RawContext {
            ctx,
            name: name.to_string(),
        })
    }

    fn device_attr(&self) -> Result<ffi::ibv_device_attr, RdmaError> {
        let mut attr = MaybeUninit::<ffi::ibv_device_attr>::zeroed();
        // SAFETY: `ctx` is open; the call fills `attr`.
        let r = unsafe { ffi::ibv_query_device(self.ctx, attr.as_mut_ptr()) };
        check(r, "ibv_query_device", &self.name)?;
        // SAFETY: zero-initialised plain data, filled by a successful query.
        Ok(unsafe { attr.assume_init() })
    }

    fn port_attr(&self, port: u8) -> Result<ffi::ibv_port_attr, RdmaError> {
        let mut attr = MaybeUninit::<ffi::ibv_port_attr>::zeroed();
        // SAFETY: `ctx` is open; the call fills `attr` (rdma-sys' port of the verbs.h inline
        // that passes the struct size to the provider).
        let r = unsafe { ffi::___ibv_query_port(self.ctx, port, attr.as_mut_ptr()) };
        check(r, "ibv_query_port", &self.name)?;
        // SAFETY: zero-initialised plain data, filled by a successful query.
        Ok(unsafe { attr.assume_init() })
    }

    fn info(&self, dev: *mut ffi::ibv_device) -> Result<DeviceInfo, RdmaError> {
        let attr = self.device_attr()?;
        // SAFETY: `dev` is valid while the list lives (the caller holds it).
        let guid = u64::from_be(unsafe { ffi::ibv_get_device_guid(dev) });
        let mut ports = Vec::new();
        let mut table_len = 0usize;
        for port in 1..=attr.phys_port_cnt {
            let pa = self.port_attr(port)?;
            table_len += pa.gid_tbl_len.max(0) as usize;
            // SAFETY: returns a static string for any value.
            let state = unsafe { CStr::from_ptr(ffi::ibv_port_state_str(pa.state)) }
                .to_string_lossy()
                .into_owned();
            ports.push(PortInfo {
                port,
                state,
                active: pa.state == ffi::ibv_port_state::IBV_PORT_ACTIVE,
                link_layer: match pa.link_layer {
                    LINK_LAYER_INFINIBAND => "InfiniBand",
                    LINK_LAYER_ETHERNET => "Ethernet",
                    _ => "unspecified",
                },
                active_mtu: mtu_bytes(pa.active_mtu),
                mtu_code: pa.active_mtu as u8,
                lid: pa.lid,
                gids: Vec::new(),
            });
        }
        let mut entries: Vec<ffi::ibv_gid_entry> = Vec::with_capacity(table_len);
        // SAFETY: `entries` has room for `table_len` entries of the size we pass; the call
        // writes at most that many and returns how many it wrote (or -errno).
        let n = unsafe {
            _ibv_query_gid_table(
                self.ctx,
                entries.as_mut_ptr(),
                table_len,
                0,
                std::mem::size_of::<ffi::ibv_gid_entry>(),
            )
        };
        if n < 0 {
            return Err(verbs_err(
                "ibv_query_gid_table",
                &self.name,
                io::Error::from_raw_os_error(-n as i32),
            ));
        }
        // SAFETY: the call initialised the first `n <= table_len` entries.
        unsafe { entries.set_len((n as usize).min(table_len)) };
        for e in &entries {
            // SAFETY: every bit pattern of the union is a valid byte array.
            let gid = unsafe { e.gid.raw };
            let Some(p) = ports.iter_mut().find(|p| u32::from(p.port) == e.port_num) else {
                continue;
            };
            p.gids.push(GidInfo {
                index: e.gid_index,
                gid,
                kind: match e.gid_type {
                    ffi::IBV_GID_TYPE_ROCE_V2 => GidKind::RoceV2,
                    ffi::IBV_GID_TYPE_ROCE_V1 => GidKind::RoceV1,
                    _ => GidKind::Ib,
                },
                netdev: ifname(e.ndev_ifindex),
            });
        }
        for p in &mut ports {
            p.gids.sort_by_key(|g| g.index);
        }
        Ok(DeviceInfo {
            name: self.name.clone(),
            node_guid: format!(
                "{:04x}:{:04x}:{:04x}:{:04x}",
                guid >> 48,
                (guid >> 32) & 0xffff,
                (guid >> 16) & 0xffff,
                guid & 0xffff
            ),
            ports,
        })
    }
}

impl Drop for RawContext {
    fn drop(&mut self) {
        // SAFETY: `ctx` was opened by ibv_open_device and is closed exactly once, after every
        // object created from it (which hold an Arc to the owner of this context).
        unsafe { ffi::ibv_close_device(self.ctx) };
    }
}

fn mtu_bytes(mtu: ffi::ibv_mtu::Type) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

fn ifname(index: u32) -> Option<String> {
    if index == 0 {
        return None;
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Every verbs device with its ports and GIDs.
pub fn devices() -> Result<Vec<DeviceInfo>, RdmaError> {
    let list = DeviceList::get()?;
    let mut out = Vec::new();
    for (name, dev) in list.devices() {
        let ctx = RawContext::open(dev, &name)?;
        out.push(ctx.info(dev)?);
    }
    Ok(out)
}

/// Which device, port and GID to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Device name.
    pub device: String,
    /// Port number.
    pub port: u8,
    /// Active MTU code of the port.
    pub mtu_code: u8,
    /// LID of the port.
    pub lid: u16,
    /// The GID used as source address.
    pub gid: GidInfo,
    /// Whether that GID's IPv4 subnet holds the peer's address.
    pub reaches_peer: bool,
}

/// Picks a device: `name` if given, else the first active device with a GID in the peer's
/// IPv4 subnet, else the first active device. `prefix` tells the prefix length of a local
/// IPv4 address (see [`ipv4_prefix`]).
pub fn select(
    devices: &[DeviceInfo],
    name: Option<&str>,
    peer: Option<IpAddr>,
    prefix: &dyn Fn(Ipv4Addr) -> Option<u8>,
) -> Result<Selection, RdmaError> {
    if devices.is_empty() {
        return Err(RdmaError::NoDevice);
    }
    let candidates: Vec<&DeviceInfo> = match name {
        Some(n) => {
            let d: Vec<_> = devices.iter().filter(|d| d.name == n).collect();
            if d.is_empty() {
                return Err(RdmaError::UnknownDevice {
                    name: n.to_string(),
                    available: devices
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            d
        }
        None => devices.iter().collect(),
    };
    let peer4 = match peer {
        Some(IpAddr::V4(a)) => Some(a),
        Some(IpAddr::V6(a)) => a.to_ipv4_mapped(),
        None => None,
    };
    let reaches = |g: &GidInfo| -> bool {
        let (Some(p), Some(mine)) = (peer4, g.ipv4()) else {
            return false;
        };
        g.kind == GidKind::RoceV2 && prefix(mine).is_some_and(|len| same_subnet(mine, p, len))
    };
    let mut fallback = None;
    for d in &candidates {
        for p in d.ports.iter().filter(|p| p.active) {
            let pick = |gid: &GidInfo, reaches_peer| Selection {
                device: d.name.clone(),
                port: p.port,
                mtu_code: p.mtu_code,
                lid: p.lid,
                gid: gid.clone(),
                reaches_peer,
            };
            if let Some(g) = p.gids.iter().find(|g| reaches(g)) {
                return Ok(pick(g, true));
            }
            if fallback.is_none() {
                // RoCE v2 on IPv4 first (routable, what rxe and most NICs use), then any
                // RoCE v2, then the first GID (InfiniBand).
                let g = p
                    .gids
                    .iter()
                    .find(|g| g.kind == GidKind::RoceV2 && g.ipv4().is_some())
                    .or_else(|| p.gids.iter().find(|g| g.kind == GidKind::RoceV2))
                    .or_else(|| p.gids.first());
                if let Some(g) = g {
                    fallback = Some(pick(g, false));
                }
            }
        }
    }
    fallback.ok_or_else(|| RdmaError::NoActivePort {
        devices: candidates
            .iter()
            .map(|d| {
                let ports: Vec<String> = d
                    .ports
                    .iter()
                    .map(|p| format!("port {} {}", p.port, p.state))
                    .collect();
                format!("{} ({})", d.name, ports.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; "),
    })
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

/// Prefix length of the local interface address `addr` (from `getifaddrs`).
pub fn ipv4_prefix(addr: Ipv4Addr) -> Option<u8> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family field is always readable.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: for AF_INET both the address and the netmask are sockaddr_in.
        let (a, m) = unsafe {
            (
                *(ifa.ifa_addr as *const libc::sockaddr_in),
                *(ifa.ifa_netmask as *const libc::sockaddr_in),
            )
        };
        if Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)) == addr {
            found = Some(u32::from_be(m.sin_addr.s_addr).count_ones() as u8);
            break;
        }
    }
    // SAFETY: `ifap` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

// ---------------------------------------------------------------------------------------------
// Verbs objects

/// An open device with the port and GID chosen for a migration.
pub struct Device {
    raw: RawContext,
    sel: Selection,
    max_qp_wr: u32,
    max_sge: u32,
    max_cqe: u32,
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

    /// Opens the device [`select`] picks among [`devices`].
    pub fn open_for(name: Option<&str>, peer: Option<IpAddr>) -> Result<Arc<Device>, RdmaError> {
        let devs = devices()?;
        Device::open(&select(&devs, name, peer, &ipv4_prefix)?)
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
    pd: *mut ffi::ibv_pd,
    device: Arc<Device>,
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
    mr: *mut ffi::ibv_mr,
    region: MappedRegion,
    _pd: Arc<ProtectionDomain>,
    _map: MemoryMap,
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
        let mut out = Vec::new();
        for r in map.regions() {
            // SAFETY: `r.host..r.host + r.len` is a live mapping (MemoryMap's contract), kept
            // mapped by the clone of `map` the region holds; the PD is valid.
            let mr =
                unsafe { ffi::ibv_reg_mr(self.pd, r.host.cast(), r.len as usize, flags as i32) };
            if mr.is_null() {
                return Err(last_err("ibv_reg_mr", self.device.name()));
            }
            out.push(MemoryRegion {
                mr,
                region: *r,
                _pd: self.clone(),
                _map: map.clone(),
            });
        }
        Ok(out)
    }
}

/// A completion queue with its completion channel.
struct CompletionQueue {
    cq: *mut ffi::ibv_cq,
    channel: *mut ffi::ibv_comp_channel,
    device: Arc<Device>,
}

impl CompletionQueue {
    fn new(device: &Arc<Device>, entries: u32) -> Result<CompletionQueue, RdmaError> {
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
    fn poll(&mut self, wcs: &mut [MaybeUninit<ffi::ibv_wc>]) -> Result<usize, RdmaError> {
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
    fn arm(&mut self) -> Result<(), RdmaError> {
        // SAFETY: the CQ is valid.
        let r = unsafe { ffi::ibv_req_notify_cq(self.cq, 0) };
        check(r, "ibv_req_notify_cq", self.device.name())
    }

    /// Waits up to `limit` for a completion event (after [`Self::arm`]).
    fn wait(&mut self, limit: Duration) -> Result<(), RdmaError> {
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
struct QueuePair {
    qp: *mut ffi::ibv_qp,
    cq: CompletionQueue,
    pd: Arc<ProtectionDomain>,
    psn: u32,
    sq_depth: u32,
    max_sge: u32,
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once; the hardware stops accessing
        // memory through it when this returns, before the CQ and any MR go.
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}

impl QueuePair {
    fn num(&self) -> u32 {
        // SAFETY: `qp` is valid until Drop.
        unsafe { (*self.qp).qp_num }
    }

    fn device(&self) -> &Device {
        &self.pd.device
    }

    fn modify(
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
    qp: QueuePair,
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

fn zeroed_attr() -> ffi::ibv_qp_attr {
    // SAFETY: plain C struct (with unions of plain data); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// A connected (RTS) reliable-connected queue pair.
pub struct ConnectedQp {
    qp: QueuePair,
    remote: QpEndpoint,
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
    unsafe fn post(&mut self, wrs: *mut ffi::ibv_send_wr) -> Result<(), RdmaError> {
        let mut bad = std::ptr::null_mut();
        // SAFETY: the caller guarantees the chain and the memory it names; the QP is valid.
        let r = unsafe { ffi::ibv_post_send(self.qp.qp, wrs, &mut bad) };
        check(r, "ibv_post_send", self.qp.device().name())
    }

    /// Moves the QP to the error state (test hook): outstanding writes flush in error.
    fn force_error(&mut self) -> Result<(), RdmaError> {
        let mut attr = zeroed_attr();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        self.qp.modify(
            &mut attr,
            ffi::ibv_qp_attr_mask::IBV_QP_STATE.0,
            "ibv_modify_qp(ERR)",
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Write planning (pure: tested without a device)

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

/// Turns `extents` (`(addr, len)`) into RDMA WRITEs of at most `max_bytes` and `max_sge`
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
        let end = addr.checked_add(len).ok_or(RdmaError::Unmapped {
            addr,
            len,
            side: "local",
        })?;
        let mut pos = addr;
        while pos < end {
            let l = local
                .iter()
                .find(|s| pos >= s.addr && pos - s.addr < s.len)
                .ok_or(RdmaError::Unmapped {
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

// ---------------------------------------------------------------------------------------------
// Source and destination ends

/// The source end: a protection domain, the source memory (registered on first use) and the
/// queue pairs made from it.
pub struct RdmaSource {
    pd: Arc<ProtectionDomain>,
    map: MemoryMap,
    local: Mutex<Option<Arc<LocalMemory>>>,
}

/// Registered source memory.
struct LocalMemory {
    _mrs: Vec<MemoryRegion>,
    segments: Vec<LocalSegment>,
}

impl RdmaSource {
    /// A source end on `device` for the memory of `map`.
    pub fn new(device: &Arc<Device>, map: MemoryMap) -> Result<Arc<RdmaSource>, RdmaError> {
        Ok(Arc::new(RdmaSource {
            pd: device.alloc_pd()?,
            map,
            local: Mutex::new(None),
        }))
    }

    /// A new queue pair to announce to the peer.
    pub fn prepare_qp(&self) -> Result<PreparedQp, RdmaError> {
        PreparedQp::new(&self.pd, false)
    }

    /// The registered memory, registering it on first use. Registration pins (and so faults
    /// in) every page; it is deferred to the first write so that a caller can look for
    /// never-written holes of the memory before (a hole faulted in reads as data afterwards).
    fn local(&self) -> Result<Arc<LocalMemory>, RdmaError> {
        let mut g = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = &*g {
            return Ok(l.clone());
        }
        let mrs = self.pd.register(&self.map, Access::LocalRead)?;
        let segments = mrs
            .iter()
            .map(|m| LocalSegment {
                addr: m.region.addr,
                host: m.region.host as u64,
                len: m.region.len,
                lkey: m.lkey(),
            })
            .collect();
        let l = Arc::new(LocalMemory {
            _mrs: mrs,
            segments,
        });
        *g = Some(l.clone());
        Ok(l)
    }
}

/// The test hook, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    QpErrorAfter(u64),
    WrongRkeyAfter(u64),
}

/// Set once a fault fired in this process.
static FAULT_FIRED: AtomicBool = AtomicBool::new(false);

impl Fault {
    fn from_env() -> Result<Fault, RdmaError> {
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
    qp: ConnectedQp,
    local: Option<Arc<LocalMemory>>,
    source: Arc<RdmaSource>,
    remote: Arc<[RemoteRegion]>,
    posted: u64,
    completed: u64,
    /// Bytes posted so far, and per posted batch `(last write, bytes posted up to it)`, to
    /// credit completed bytes.
    posted_bytes: u64,
    completed_bytes: u64,
    batches: std::collections::VecDeque<(u64, u64)>,
    timeout: Duration,
    fault: Fault,
    fault_fired: bool,
    wrs: Vec<PlannedWrite>,
    sges: Vec<Sge>,
    stats: WriteStats,
}

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
        let local = match &self.local {
            Some(l) => l.clone(),
            None => {
                let l = self.source.local()?;
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

    fn post_batch(&mut self, first: usize, n: usize) -> Result<(), RdmaError> {
        let mut sge_list: Vec<ffi::ibv_sge> = Vec::with_capacity(n * 2);
        for w in &self.wrs[first..first + n] {
            for s in &self.sges[w.first..w.first + w.count] {
                sge_list.push(ffi::ibv_sge {
                    addr: s.host,
                    length: s.len,
                    lkey: s.lkey,
                });
            }
        }
        // SAFETY: plain C structs; all-zero is a valid starting value.
        let mut chain: Vec<ffi::ibv_send_wr> =
            (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
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
        unsafe { self.qp.post(chain.as_mut_ptr())? };
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
        self.wait_completed(target, stop)
    }

    /// Writes and bytes since the last call.
    pub fn take_stats(&mut self) -> WriteStats {
        std::mem::take(&mut self.stats)
    }

    fn wait_completed(&mut self, target: u64, stop: &AtomicBool) -> Result<(), RdmaError> {
        let mut last_progress = Instant::now();
        let mut wcs = [const { MaybeUninit::<ffi::ibv_wc>::uninit() }; 16];
        while self.completed < target {
            if self.reap(&mut wcs)? > 0 {
                last_progress = Instant::now();
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                return Err(RdmaError::Stopped);
            }
            if last_progress.elapsed() >= self.timeout {
                return Err(RdmaError::CompletionTimeout {
                    qp: self.qp.num(),
                    secs: self.timeout.as_secs(),
                    outstanding: self.posted - self.completed,
                });
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

    fn reap(&mut self, wcs: &mut [MaybeUninit<ffi::ibv_wc>]) -> Result<usize, RdmaError> {
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

fn fire_once() -> bool {
    !FAULT_FIRED.swap(true, Ordering::SeqCst)
}

/// The destination end: its memory registered for remote writes and one connected QP per
/// source QP. Dropping it revokes the peer's access (QPs destroyed, then regions
/// deregistered).
pub struct RdmaTarget {
    // Field order is drop order: QPs before the regions they give access to.
    qps: Vec<ConnectedQp>,
    mrs: Vec<MemoryRegion>,
    _pd: Arc<ProtectionDomain>,
}

impl std::fmt::Debug for RdmaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTarget")
            .field("qps", &self.qps.iter().map(|q| q.num()).collect::<Vec<_>>())
            .field("regions", &self.regions())
            .finish()
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
        let pd = device.alloc_pd()?;
        let mrs = pd.register(map, Access::RemoteWrite)?;
        let mut qps = Vec::with_capacity(sources.len());
        for s in sources {
            qps.push(PreparedQp::new(&pd, true)?.connect(s)?);
        }
        Ok(RdmaTarget { qps, mrs, _pd: pd })
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
    #[ignore = "needs an RDMA device: run scripts/test-rdma.sh"]
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
