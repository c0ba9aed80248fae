//! virtio-net on a host tap device: frames the guest transmits are written to the tap, frames
//! read from the tap fill the guest's receive buffers. The tap must exist already (made by the
//! host's network set-up, `ip tuntap add NAME mode tap`), so a typo is an error rather than a
//! new, unconnected interface.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use virtio_queue::{Queue, QueueT};

use super::{Mem, VirtioBackend};

/// Feature bit: the device has a MAC address in its configuration.
const F_MAC: u64 = 1 << 5;
/// Feature bit: the configuration has a link status.
const F_STATUS: u64 = 1 << 16;
/// Link up, in the configuration's status.
const S_LINK_UP: u16 = 1;
/// The virtio-net header of virtio 1.x (with `num_buffers`).
const HDR_LEN: usize = 12;
/// Largest frame read from the tap (64 KiB + Ethernet header).
const MAX_FRAME: usize = 65_562;
const RX: usize = 0;
const TX: usize = 1;

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
    queue_sizes: [u16; 2],
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
            queue_sizes: [256, 256],
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
        F_MAC | F_STATUS
    }

    fn config(&self) -> Vec<u8> {
        let mut c = self.mac.to_vec();
        c.extend_from_slice(&S_LINK_UP.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &Mem) -> Result<bool, String> {
        match (index, queues) {
            (TX, [_, tx]) => self.transmit(tx, mem),
            (RX, [rx, _]) => self.receive(rx, mem),
            _ => Ok(false),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.file.as_raw_fd())
    }

    fn process_backend(&mut self, queues: &mut [Queue], mem: &Mem) -> Result<bool, String> {
        match queues {
            [rx, _] if rx.ready() => self.receive(rx, mem),
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
