//! virtio-net on a host tap device: frames the guest transmits are written to the tap, frames
//! read from the tap fill the guest's receive buffers. The tap must exist already (made by the
//! host's network set-up, `ip tuntap add NAME mode tap`), so a typo is an error rather than a
//! new, unconnected interface.
//!
//! Announcing (after a migration, so switches learn the NIC's new port): the device sends a
//! RARP frame from the guest's MAC into the tap, as if the guest had sent it (QEMU's
//! announce-self), and — when the driver negotiated `VIRTIO_NET_F_GUEST_ANNOUNCE` — sets
//! `VIRTIO_NET_S_ANNOUNCE` in its configuration and raises a configuration interrupt: Linux
//! then sends gratuitous ARPs and unsolicited neighbour advertisements for its own addresses,
//! and acknowledges on the control queue (`VIRTIO_NET_CTRL_ANNOUNCE_ACK`), which clears the
//! bit.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use virtio_queue::{Queue, QueueT};

use super::{Mem, VirtioBackend};

/// Feature bit: the device has a MAC address in its configuration.
const F_MAC: u64 = 1 << 5;
/// Feature bit: the configuration has a link status.
const F_STATUS: u64 = 1 << 16;
/// Feature bit: a control queue.
const F_CTRL_VQ: u64 = 1 << 17;
/// Feature bit: the guest can announce itself when the device asks.
pub const F_GUEST_ANNOUNCE: u64 = 1 << 21;
/// Link up, in the configuration's status.
const S_LINK_UP: u16 = 1;
/// The device asks the guest to announce itself, in the configuration's status.
const S_ANNOUNCE: u16 = 2;
/// Control class and command: the guest announced itself.
const CTRL_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
/// Ethertype of RARP.
const ETH_P_RARP: u16 = 0x8035;
/// The virtio-net header of virtio 1.x (with `num_buffers`).
const HDR_LEN: usize = 12;
/// Largest frame read from the tap (64 KiB + Ethernet header).
const MAX_FRAME: usize = 65_562;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot name an interface.
    #[error("tap name {0:?} is not a valid interface name (1 to 15 bytes)")]
    BadName(String),
    /// No such tap.
    #[error("no tap device {0:?} on this host (create it: ip tuntap add {0} mode tap)")]
    Missing(String),
    /// Opening or attaching failed.
    #[error("cannot attach to tap {name:?}: {source}")]
    Attach {
        /// The tap.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An attached tap device (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains('\0') {
            return Err(TapError::BadName(name.to_string()));
        }
        // tun_flags exists for tun/tap interfaces only.
        if !std::path::Path::new(&format!("/sys/class/net/{name}/tun_flags")).exists() {
            return Err(TapError::Missing(name.to_string()));
        }
        let attach = |source| TapError::Attach {
            name: name.to_string(),
            source,
        };
        let path = c"/dev/net/tun";
        // SAFETY: a valid NUL-terminated path; the call has no memory effects.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags: u16 = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) behind the pointer,
        // which `ifr` provides.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        // No offloads: this device offers none to the guest and reads frames without a
        // virtio-net header, so the kernel must finish checksums and segment before handing
        // a frame over. A tap reused after another VMM (QEMU enables checksum and TSO
        // offloads) would otherwise pass TCP frames with partial checksums the guest drops.
        const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one frame (dropped if the tap's queue is full, like a switch port would).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        match (&self.file).write(frame) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The network device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    queue_sizes: [u16; 3],
    /// The guest was asked to announce itself and has not acknowledged yet.
    announce_pending: bool,
    /// A frame read from the tap that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    frame: Vec<u8>,
}

impl Net {
    /// A NIC with address `mac` on `tap`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            queue_sizes: [256, 256, 64],
            announce_pending: false,
            pending: None,
            frame: Vec::new(),
        }
    }

    /// Transmits what the guest queued.
    fn transmit(&mut self, q: &mut Queue, mem: &Mem) -> Result<bool, String> {
        let mut used = false;
        loop {
            q.disable_notification(mem)
                .map_err(|e| format!("tx queue: {e:?}"))?;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let mut r = chain.reader(mem).map_err(|e| format!("tx chain: {e:?}"))?;
                self.frame.clear();
                let n = r.available_bytes().min(HDR_LEN + MAX_FRAME);
                self.frame.resize(n, 0);
                if r.read_exact(&mut self.frame).is_ok() && n > HDR_LEN {
                    self.tap
                        .send(&self.frame[HDR_LEN..])
                        .map_err(|e| format!("tap {}: {e}", self.tap.name()))?;
                }
                q.add_used(mem, head, 0)
                    .map_err(|e| format!("tx queue: {e:?}"))?;
                used = true;
            }
            if !q
                .enable_notification(mem)
                .map_err(|e| format!("tx queue: {e:?}"))?
            {
                return Ok(used);
            }
        }
    }

    /// Serves the control queue: the guest's announce acknowledgement; any other command
    /// (none is offered) is answered with an error.
    fn control(&mut self, q: &mut Queue, mem: &Mem) -> Result<bool, String> {
        let mut used = false;
        loop {
            q.disable_notification(mem)
                .map_err(|e| format!("ctrl queue: {e:?}"))?;
            used |= self.control_chains(q, mem)?;
            // Re-arming the notification moves the ring's avail event past what was served:
            // without it a driver using event indexes stops kicking after its first command
            // (and Linux spins for the answer with the RTNL held).
            if !q
                .enable_notification(mem)
                .map_err(|e| format!("ctrl queue: {e:?}"))?
            {
                return Ok(used);
            }
        }
    }

    fn control_chains(&mut self, q: &mut Queue, mem: &Mem) -> Result<bool, String> {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut r = chain
                .clone()
                .reader(mem)
                .map_err(|e| format!("ctrl chain: {e:?}"))?;
            let mut w = chain
                .writer(mem)
                .map_err(|e| format!("ctrl chain: {e:?}"))?;
            let mut hdr = [0u8; 2];
            let ack = match r.read_exact(&mut hdr) {
                Ok(()) if hdr == [CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK] => {
                    self.announce_pending = false;
                    CTRL_OK
                }
                _ => CTRL_ERR,
            };
            let written = if w.available_bytes() > 0 {
                let mut status = w
                    .split_at(w.available_bytes() - 1)
                    .map_err(|e| format!("ctrl chain: {e:?}"))?;
                status
                    .write_all(&[ack])
                    .map_err(|e| format!("ctrl ack: {e}"))?;
                1
            } else {
                0
            };
            q.add_used(mem, head, written)
                .map_err(|e| format!("ctrl queue: {e:?}"))?;
            used = true;
        }
        Ok(used)
    }

    /// A RARP request from the NIC's MAC for itself: what a switch needs to learn its port.
    fn rarp(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(60);
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
        f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
        f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
        f.extend_from_slice(&[6, 4]);
        f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0; 4]);
        f.resize(60, 0);
        f
    }

    /// The next frame from the tap (the pending one first); None when none waits.
    fn next_frame(&mut self) -> Result<Option<Vec<u8>>, String> {
        if let Some(f) = self.pending.take() {
            return Ok(Some(f));
        }
        let mut buf = vec![0u8; MAX_FRAME];
        match (&self.tap.file).read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(format!("tap {}: {e}", self.tap.name())),
        }
    }

    /// Delivers frames from the tap while the guest has receive buffers.
    fn receive(&mut self, q: &mut Queue, mem: &Mem) -> Result<bool, String> {
        let mut used = false;
        while let Some(frame) = self.next_frame()? {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No buffer: keep the frame; the guest's next refill delivers it.
                self.pending = Some(frame);
                if q.enable_notification(mem)
                    .map_err(|e| format!("rx queue: {e:?}"))?
                {
                    // Buffers arrived meanwhile.
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut w = chain.writer(mem).map_err(|e| format!("rx chain: {e:?}"))?;
            let mut hdr = [0u8; HDR_LEN];
            hdr[10] = 1; // num_buffers
            let room = w.available_bytes();
            let len = if room >= HDR_LEN + frame.len() {
                w.write_all(&hdr)
                    .and_then(|()| w.write_all(&frame))
                    .map_err(|e| format!("rx buffer: {e}"))?;
                (HDR_LEN + frame.len()) as u32
            } else {
                // A buffer too small for the frame: the frame is dropped.
                0
            };
            q.add_used(mem, head, len)
                .map_err(|e| format!("rx queue: {e:?}"))?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioBackend for Net {
    fn device_type(&self) -> u32 {
        1
    }

    fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE
    }

    fn config(&self) -> Vec<u8> {
        let mut c = self.mac.to_vec();
        let status = S_LINK_UP | if self.announce_pending { S_ANNOUNCE } else { 0 };
        c.extend_from_slice(&status.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &Mem) -> Result<bool, String> {
        match (index, queues) {
            (TX, [_, tx, ..]) => self.transmit(tx, mem),
            (RX, [rx, ..]) => self.receive(rx, mem),
            (CTRL, [_, _, ctrl]) => self.control(ctrl, mem),
            _ => Ok(false),
        }
    }

    fn announce(&mut self, acked_features: u64) -> Result<bool, String> {
        self.tap
            .send(&self.rarp())
            .map_err(|e| format!("tap {}: {e}", self.tap.name()))?;
        if acked_features & F_GUEST_ANNOUNCE != 0 {
            self.announce_pending = true;
            return Ok(true);
        }
        Ok(false)
    }

    fn save(&self) -> Vec<u8> {
        vec![u8::from(self.announce_pending)]
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        match data {
            [] | [0] => self.announce_pending = false,
            [1] => self.announce_pending = true,
            _ => {
                return Err(format!(
                    "{} bytes of virtio-net state (1 expected)",
                    data.len()
                ))
            }
        }
        Ok(())
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.file.as_raw_fd())
    }

    fn process_backend(&mut self, queues: &mut [Queue], mem: &Mem) -> Result<bool, String> {
        match queues {
            [rx, ..] if rx.ready() => self.receive(rx, mem),
            _ => Ok(false),
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "MAC address {s:?} is not six hex bytes (aa:bb:cc:dd:ee:ff)"
        ));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("MAC address {s:?}: {p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {s:?} is a multicast address"));
    }
    Ok(mac)
}

/// Formats a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRam, Populate, RamLayout};
    use vm_memory::{Bytes, GuestAddress};

    /// A tap for a test (root), deleted on drop.
    struct TestTap(String);

    impl TestTap {
        fn new(tag: &str) -> TestTap {
            let name = format!("lmt{tag}{}", std::process::id() % 10_000);
            let ok = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip link del {name} 2>/dev/null; ip tuntap add {name} mode tap && ip link set {name} up"
                ))
                .status()
                .unwrap()
                .success();
            assert!(ok, "creating tap {name} (needs root and iproute2)");
            TestTap(name)
        }
    }

    impl Drop for TestTap {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }

    /// A raw packet socket on interface `name`: sees what is injected into the tap.
    fn capture(name: &str) -> File {
        // SAFETY: socket(2) has no memory effects; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name living across the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set below bind it to the device.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sa.sll_ifindex = index as i32;
        // SAFETY: bind reads a sockaddr_ll from the pointer, valid for the call.
        let r = unsafe {
            libc::bind(
                f.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        f
    }

    #[test]
    fn announce_sends_rarp_asks_the_guest_and_the_ack_clears_it() {
        let t = TestTap::new("a");
        let mut cap = capture(&t.0);
        let mac = [0x52, 0x54, 0, 0x0a, 0x0b, 0x0c];
        let mut net = Net::new(Tap::open(&t.0).unwrap(), mac);
        assert!(net.features() & F_GUEST_ANNOUNCE != 0);
        // A driver without guest announce gets the RARP only.
        assert!(!net.announce(0).unwrap());
        assert_eq!(net.config()[6..8], 1u16.to_le_bytes());
        assert!(net.announce(F_GUEST_ANNOUNCE).unwrap());
        assert_eq!(net.config()[6..8], 3u16.to_le_bytes(), "link up + announce");
        assert_eq!(net.save(), [1]);
        // The switch sees RARP frames from the guest's MAC.
        let mut buf = [0u8; 2048];
        let mut rarps = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while rarps < 2 && std::time::Instant::now() < deadline {
            match cap.read(&mut buf) {
                Ok(n) if n >= 42 && buf[6..12] == mac && buf[12..14] == [0x80, 0x35] => {
                    assert_eq!(&buf[0..6], &[0xff; 6]);
                    assert_eq!(&buf[22..28], &mac, "sender hardware address");
                    rarps += 1;
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        assert_eq!(rarps, 2, "one RARP per announcement");

        // The guest acknowledges on the control queue.
        let ram = GuestRam::new(&RamLayout::single(1 << 20), Populate::Lazy).unwrap();
        let mem = ram.memory().clone();
        let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        let write_desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = desc + 16 * i;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        };
        mem.write_slice(&[CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK], GuestAddress(0x4000))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x4100)).unwrap();
        write_desc(0, 0x4000, 2, 1, 1); // header, device-readable, next
        write_desc(1, 0x4100, 1, 2, 0); // ack, device-writable
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let mut queues: Vec<Queue> = [256u16, 256, 64]
            .iter()
            .map(|&n| Queue::new(n).unwrap())
            .collect();
        let q = &mut queues[CTRL];
        q.set_size(16);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_event_idx(true);
        q.set_ready(true);
        assert!(net.process(CTRL, &mut queues, &mem).unwrap());
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4100)).unwrap(), CTRL_OK);
        // The ring's avail event (after the 16 used elements) asks the driver to kick for
        // its next command: with event indexes a stale one silences the queue for good.
        let avail_event: u16 = mem.read_obj(GuestAddress(used + 4 + 8 * 16)).unwrap();
        assert_eq!(
            avail_event, 1,
            "the driver kicks again for its next command"
        );
        assert_eq!(net.config()[6..8], 1u16.to_le_bytes(), "acknowledged");
        assert_eq!(net.save(), [0]);
        net.restore(&[1]).unwrap();
        assert!(net.announce_pending);
        assert!(net.restore(&[1, 2]).is_err());
    }

    /// Whether `ethtool -k` reports transmit checksumming on for `tap`.
    fn tx_checksumming(tap: &str) -> bool {
        let out = std::process::Command::new("ethtool")
            .args(["-k", tap])
            .output()
            .expect("ethtool (scripts/setup.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("tx-checksumming:"))
            .unwrap_or_else(|| panic!("ethtool -k {tap}: {text}"));
        line.contains(": on")
    }

    #[test]
    fn a_tap_left_with_offloads_by_another_vmm_hands_over_complete_frames() {
        let t = TestTap::new("o");
        // Another VMM (QEMU) attached with a virtio-net header and enabled checksum and TSO
        // offloads, then exited: the persistent tap keeps them.
        {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap();
            let mut ifr = [0u8; 40];
            ifr[..t.0.len()].copy_from_slice(t.0.as_bytes());
            let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
            ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
            // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq behind the pointer.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, ifr.as_mut_ptr()) };
            assert_eq!(r, 0);
            let (csum, tso4) = (1 as libc::c_ulong, 2 as libc::c_ulong);
            // SAFETY: TUNSETOFFLOAD takes its flags by value.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54d0, csum | tso4) };
            assert_eq!(r, 0);
        }
        assert!(tx_checksumming(&t.0), "the other VMM's offloads stayed");
        let _tap = Tap::open(&t.0).unwrap();
        assert!(
            !tx_checksumming(&t.0),
            "attached without a virtio-net header, the kernel must finish checksums"
        );
    }

    #[test]
    fn macs_and_missing_taps() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("01:00:00:00:00:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            "52:54:00:12:34:56"
        );
        assert!(matches!(Tap::open("nosuchtap0"), Err(TapError::Missing(_))));
        assert!(matches!(Tap::open("a/b"), Err(TapError::BadName(_))));
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
    }
}
