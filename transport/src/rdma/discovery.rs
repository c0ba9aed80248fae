//! Device discovery: which verbs device, port and GID to use for a peer.

#[allow(unused_imports)]
use super::*;

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
    pub(super) fn _ibv_query_gid_table(
        context: *mut ffi::ibv_context,
        entries: *mut ffi::ibv_gid_entry,
        max_entries: usize,
        flags: u32,
        entry_size: usize,
    ) -> isize;
}

/// The device list, freed on drop.
pub(super) struct DeviceList {
    pub(super) list: *mut *mut ffi::ibv_device,
    pub(super) len: usize,
}

impl DeviceList {
    pub(super) fn get() -> Result<DeviceList, RdmaError> {
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

    pub(super) fn devices(&self) -> impl Iterator<Item = (String, *mut ffi::ibv_device)> + '_ {
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
pub(super) struct RawContext {
    pub(super) ctx: *mut ffi::ibv_context,
    pub(super) name: String,
}

impl RawContext {
    pub(super) fn open(dev: *mut ffi::ibv_device, name: &str) -> Result<RawContext, RdmaError> {
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

    pub(super) fn device_attr(&self) -> Result<ffi::ibv_device_attr, RdmaError> {
        let mut attr = MaybeUninit::<ffi::ibv_device_attr>::zeroed();
        // SAFETY: `ctx` is open; the call fills `attr`.
        let r = unsafe { ffi::ibv_query_device(self.ctx, attr.as_mut_ptr()) };
        check(r, "ibv_query_device", &self.name)?;
        // SAFETY: zero-initialised plain data, filled by a successful query.
        Ok(unsafe { attr.assume_init() })
    }

    pub(super) fn port_attr(&self, port: u8) -> Result<ffi::ibv_port_attr, RdmaError> {
        let mut attr = MaybeUninit::<ffi::ibv_port_attr>::zeroed();
        // SAFETY: `ctx` is open; the call fills `attr` (rdma-sys' port of the verbs.h inline
        // that passes the struct size to the provider).
        let r = unsafe { ffi::___ibv_query_port(self.ctx, port, attr.as_mut_ptr()) };
        check(r, "ibv_query_port", &self.name)?;
        // SAFETY: zero-initialised plain data, filled by a successful query.
        Ok(unsafe { attr.assume_init() })
    }

    pub(super) fn info(&self, dev: *mut ffi::ibv_device) -> Result<DeviceInfo, RdmaError> {
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

pub(super) fn mtu_bytes(mtu: ffi::ibv_mtu::Type) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

pub(super) fn ifname(index: u32) -> Option<String> {
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

/// Picks among the devices `names` (every device when empty) the one [`select`] finds
/// reaching `peer`, else the first usable one named.
pub fn select_among(
    devices: &[DeviceInfo],
    names: &[String],
    peer: Option<IpAddr>,
    prefix: &dyn Fn(Ipv4Addr) -> Option<u8>,
) -> Result<Selection, RdmaError> {
    let mut first = None;
    for n in names {
        let s = select(devices, Some(n), peer, prefix)?;
        if s.reaches_peer {
            return Ok(s);
        }
        first.get_or_insert(s);
    }
    match first {
        Some(s) => Ok(s),
        None => select(devices, None, peer, prefix),
    }
}

/// The rails to a peer: the devices `names` (each once, in order), or by default the device
/// [`select`] picks followed by every other active device with an address in the peer's
/// subnet — but not one holding the peer's own address (that is the peer, on this host).
/// One selection per device (its first active port).
pub fn select_rails(
    devices: &[DeviceInfo],
    names: &[String],
    peer: Option<IpAddr>,
    prefix: &dyn Fn(Ipv4Addr) -> Option<u8>,
) -> Result<Vec<Selection>, RdmaError> {
    if !names.is_empty() {
        let mut rails: Vec<Selection> = Vec::new();
        for n in names {
            if !rails.iter().any(|r| &r.device == n) {
                rails.push(select(devices, Some(n), peer, prefix)?);
            }
        }
        return Ok(rails);
    }
    let first = select(devices, None, peer, prefix)?;
    let reaches = first.reaches_peer;
    let mut rails = vec![first];
    if reaches {
        let peer4 = match peer {
            Some(IpAddr::V4(a)) => Some(a),
            Some(IpAddr::V6(a)) => a.to_ipv4_mapped(),
            None => None,
        };
        let first = rails[0].device.clone();
        for d in devices.iter().filter(|d| d.name != first) {
            if let Ok(s) = select(devices, Some(&d.name), peer, prefix) {
                if s.reaches_peer && s.gid.ipv4() != peer4 {
                    rails.push(s);
                }
            }
        }
    }
    Ok(rails)
}

pub(super) fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
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
