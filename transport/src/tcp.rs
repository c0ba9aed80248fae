//! TCP data channels: extents of registered memory and markers.
//!
//! Wire format of a data channel, all little-endian:
//!
//! ```text
//! header   kind: u16 | count: u16 | flags: u32 (0) | value: u64        16 bytes
//!   kind 1 = extents: `count` entries follow, then the bytes of every extent in order;
//!            value = total payload bytes
//!   kind 2 = marker: no body; value is opaque to the transport
//! entry    addr: u64 | len: u32 | reserved: u32 (0)                     16 bytes
//! ```
//!
//! The sender gathers the header, the entry table and the extents' bytes from registered
//! memory into one `writev`; the receiver reads the table, checks every entry against its
//! [`MemoryMap`] before touching memory, then `readv`s the bytes straight into place.

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use crate::frame::read_exact;
use crate::{MemoryMap, TransportError};

/// Most extents in one message.
pub const MAX_EXTENTS: usize = 512;
/// Most payload bytes in one message.
pub const MAX_MESSAGE_BYTES: u64 = 8 << 20;

const HEADER_LEN: usize = 16;
const ENTRY_LEN: usize = 16;
const KIND_EXTENTS: u16 = 1;
const KIND_MARKER: u16 = 2;
/// `writev`/`readv` accept at most this many buffers (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// What [`DataReceiver::recv`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Extents were written into registered memory (`bytes` in all).
    Extents {
        /// Payload bytes written.
        bytes: u64,
    },
    /// A marker with its value.
    Marker(u64),
}

/// Sending end of a data channel.
#[derive(Debug)]
pub struct DataSender {
    stream: TcpStream,
    peer: String,
    table: Vec<u8>,
}

impl DataSender {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Result<Self, TransportError> {
        let peer = peer_name(&stream);
        stream
            .set_nodelay(true)
            .map_err(|source| TransportError::Io {
                op: "setting TCP_NODELAY",
                peer: peer.clone(),
                source,
            })?;
        Ok(DataSender {
            stream,
            peer,
            table: Vec::with_capacity(HEADER_LEN + MAX_EXTENTS * ENTRY_LEN),
        })
    }

    /// Sends `extents` (`(addr, len)` pairs) read in place from `map`. At most
    /// [`MAX_EXTENTS`] extents and [`MAX_MESSAGE_BYTES`] bytes; each extent must lie in `map`.
    pub fn send_extents(
        &mut self,
        map: &MemoryMap,
        extents: &[(u64, u64)],
    ) -> Result<u64, TransportError> {
        let total: u64 = extents.iter().map(|e| e.1).sum();
        if extents.is_empty() || extents.len() > MAX_EXTENTS || total > MAX_MESSAGE_BYTES {
            return Err(TransportError::Malformed {
                peer: "local sender".into(),
                reason: format!(
                    "{} extents / {total} bytes exceed one message",
                    extents.len()
                ),
            });
        }
        self.table.clear();
        put_header(&mut self.table, KIND_EXTENTS, extents.len() as u16, total);
        let mut iov = Vec::with_capacity(extents.len() + 1);
        for &(addr, len) in extents {
            let host = map.host_ptr(addr, len)?;
            self.table.extend_from_slice(&addr.to_le_bytes());
            self.table.extend_from_slice(&(len as u32).to_le_bytes());
            self.table.extend_from_slice(&0u32.to_le_bytes());
            iov.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: len as usize,
            });
        }
        iov.insert(
            0,
            libc::iovec {
                iov_base: self.table.as_ptr() as *mut libc::c_void,
                iov_len: self.table.len(),
            },
        );
        // SAFETY: every iovec points into `self.table` or into registered memory that `map`
        // keeps mapped (bounds checked by `host_ptr`); writev only reads them.
        unsafe { transfer(self.stream.as_raw_fd(), &mut iov, Dir::Write) }.map_err(|source| {
            TransportError::Io {
                op: "writev of extents",
                peer: self.peer.clone(),
                source,
            }
        })?;
        Ok(total)
    }

    /// Sends a marker.
    pub fn send_marker(&mut self, value: u64) -> Result<(), TransportError> {
        let mut hdr = Vec::with_capacity(HEADER_LEN);
        put_header(&mut hdr, KIND_MARKER, 0, value);
        self.stream
            .write_all(&hdr)
            .map_err(|source| TransportError::Io {
                op: "sending a marker",
                peer: self.peer.clone(),
                source,
            })
    }

    /// The underlying stream (for shutdown or timeouts).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// Receiving end of a data channel.
#[derive(Debug)]
pub struct DataReceiver {
    stream: TcpStream,
    peer: String,
    table: Vec<u8>,
}

impl DataReceiver {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Result<Self, TransportError> {
        let peer = peer_name(&stream);
        set_buffer(&stream, libc::SO_RCVBUF);
        Ok(DataReceiver {
            stream,
            peer,
            table: vec![0u8; MAX_EXTENTS * ENTRY_LEN],
        })
    }

    /// Receives one message. Extents land in `map`; their `(addr, len)` are appended to
    /// `written`. Nothing is written to memory unless every entry of the table is valid.
    pub fn recv(
        &mut self,
        map: &MemoryMap,
        written: &mut Vec<(u64, u64)>,
    ) -> Result<Received, TransportError> {
        let mut hdr = [0u8; HEADER_LEN];
        read_exact(
            &mut self.stream,
            &mut hdr,
            &self.peer,
            "waiting for a data message",
        )?;
        let kind = u16::from_le_bytes([hdr[0], hdr[1]]);
        let count = usize::from(u16::from_le_bytes([hdr[2], hdr[3]]));
        let flags = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let value = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let bad = |reason: String| TransportError::Malformed {
            peer: self.peer.clone(),
            reason,
        };
        if flags != 0 {
            return Err(bad(format!("unknown data flags {flags:#x}")));
        }
        match kind {
            KIND_MARKER if count == 0 => return Ok(Received::Marker(value)),
            KIND_MARKER => return Err(bad(format!("marker with {count} entries"))),
            KIND_EXTENTS => {}
            other => return Err(bad(format!("unknown data message kind {other}"))),
        }
        if count == 0 || count > MAX_EXTENTS {
            return Err(bad(format!(
                "{count} extents in one message (1..={MAX_EXTENTS})"
            )));
        }
        if value > MAX_MESSAGE_BYTES {
            return Err(bad(format!(
                "{value} payload bytes exceed the {MAX_MESSAGE_BYTES} cap"
            )));
        }
        let table = &mut self.table[..count * ENTRY_LEN];
        read_exact(
            &mut self.stream,
            table,
            &self.peer,
            "reading an extent table",
        )?;
        let mut iov = Vec::with_capacity(count);
        let mut sum = 0u64;
        let first = written.len();
        for e in table.chunks_exact(ENTRY_LEN) {
            let addr = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
            let len = u64::from(u32::from_le_bytes(e[8..12].try_into().unwrap_or_default()));
            let reserved = u32::from_le_bytes(e[12..16].try_into().unwrap_or_default());
            if len == 0 || reserved != 0 {
                written.truncate(first);
                return Err(TransportError::Malformed {
                    peer: self.peer.clone(),
                    reason: format!("bad extent entry {addr:#x}+{len:#x} (reserved {reserved:#x})"),
                });
            }
            let host = match map.host_ptr(addr, len) {
                Ok(h) => h,
                Err(e) => {
                    written.truncate(first);
                    return Err(e);
                }
            };
            sum += len;
            iov.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: len as usize,
            });
            written.push((addr, len));
        }
        if sum != value {
            written.truncate(first);
            return Err(TransportError::Malformed {
                peer: self.peer.clone(),
                reason: format!("extent lengths add up to {sum}, header says {value}"),
            });
        }
        // SAFETY: every iovec points into registered memory (bounds checked above) that the
        // map's creator allowed the transport to write.
        unsafe { transfer(self.stream.as_raw_fd(), &mut iov, Dir::Read) }.map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                TransportError::Closed {
                    peer: self.peer.clone(),
                    during: "reading extent data",
                }
            } else {
                TransportError::Io {
                    op: "readv of extent data",
                    peer: self.peer.clone(),
                    source,
                }
            }
        })?;
        Ok(Received::Extents { bytes: value })
    }

    /// The underlying stream (for shutdown or timeouts).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn put_header(buf: &mut Vec<u8>, kind: u16, count: u16, value: u64) {
    buf.extend_from_slice(&kind.to_le_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&value.to_le_bytes());
}

/// Socket buffer size for data channels: several chunks in flight per connection, so sender
/// and receiver wake each other less often.
pub const SOCKET_BUFFER: i32 = 8 << 20;

fn set_buffer(stream: &TcpStream, opt: i32) {
    let v = SOCKET_BUFFER;
    // SAFETY: setsockopt reads `size_of::<i32>()` bytes from `&v`, a valid i32; the fd is open.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into())
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// Moves every byte described by `iov` with `readv`/`writev`, resuming after partial
/// transfers and `EINTR`.
///
/// # Safety
///
/// Every iovec must describe memory valid for the direction (readable for `Write`, writable
/// for `Read`) for the whole call.
unsafe fn transfer(fd: i32, iov: &mut [libc::iovec], dir: Dir) -> std::io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let end = (start + IOV_MAX).min(iov.len());
        let batch = &iov[start..end];
        let n = match dir {
            // SAFETY: the caller guarantees the buffers; `batch` has at most IOV_MAX entries.
            Dir::Read => unsafe { libc::readv(fd, batch.as_ptr(), batch.len() as i32) },
            // SAFETY: as above.
            Dir::Write => unsafe { libc::writev(fd, batch.as_ptr(), batch.len() as i32) },
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            let v = &mut iov[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        while start < iov.len() && iov[start].iov_len == 0 {
            start += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MappedRegion;
    use std::net::TcpListener;
    use std::sync::Arc;

    fn map(buf: &mut Vec<u8>) -> MemoryMap {
        // SAFETY: tests keep `buf` alive and untouched until the map is dropped.
        unsafe {
            MemoryMap::new(
                vec![MappedRegion {
                    addr: 0,
                    host: buf.as_mut_ptr(),
                    len: buf.len() as u64,
                }],
                Arc::new(()),
            )
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    #[test]
    fn many_extents_land_in_place() {
        let mut src: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; 1 << 20];
        let (sm, dm) = (map(&mut src), map(&mut dst));
        let (a, b) = pair();
        let extents: Vec<(u64, u64)> = (0..100).map(|i| (i * 8192, 4096)).collect();
        let ex = extents.clone();
        let t = std::thread::spawn(move || {
            let mut tx = DataSender::new(a).unwrap();
            tx.send_extents(&sm, &ex).unwrap();
            tx.send_marker(42).unwrap();
        });
        let mut rx = DataReceiver::new(b).unwrap();
        let mut w = Vec::new();
        assert_eq!(
            rx.recv(&dm, &mut w).unwrap(),
            Received::Extents { bytes: 100 * 4096 }
        );
        assert_eq!(rx.recv(&dm, &mut w).unwrap(), Received::Marker(42));
        t.join().unwrap();
        assert_eq!(w, extents);
        drop(dm);
        for (i, chunk) in dst.chunks(4096).enumerate() {
            if i % 2 == 0 && i < 200 {
                assert_eq!(chunk, &src[i * 4096..(i + 1) * 4096]);
            } else {
                assert!(chunk.iter().all(|&b| b == 0));
            }
        }
    }

    fn raw(bytes: &[u8]) -> Result<Received, TransportError> {
        let mut dst = vec![0u8; 65536];
        let dm = map(&mut dst);
        let (mut a, b) = pair();
        a.write_all(bytes).unwrap();
        drop(a);
        let mut rx = DataReceiver::new(b).unwrap();
        let r = rx.recv(&dm, &mut Vec::new());
        drop(dm);
        assert!(
            dst.iter().all(|&b| b == 0),
            "nothing may be written on error"
        );
        r
    }

    fn msg(count: u16, value: u64, entries: &[(u64, u32, u32)]) -> Vec<u8> {
        let mut v = Vec::new();
        put_header(&mut v, KIND_EXTENTS, count, value);
        for &(a, l, r) in entries {
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
            v.extend_from_slice(&r.to_le_bytes());
        }
        v
    }

    #[test]
    fn hostile_messages_are_rejected_before_writing() {
        assert!(matches!(
            raw(&msg(1, 4096, &[(65536, 4096, 0)])),
            Err(TransportError::OutOfBounds { .. })
        ));
        assert!(matches!(
            raw(&msg(2, 4096, &[(0, 4096, 0), (u64::MAX - 10, 4096, 0)])),
            Err(TransportError::OutOfBounds { .. })
        ));
        assert!(matches!(
            raw(&msg(1, 1, &[(0, 4096, 0)])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&msg(1, 0, &[(0, 0, 0)])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&msg(1, 4096, &[(0, 4096, 9)])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&msg(0, 0, &[])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&msg(600, 0, &[])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&msg(1, u64::MAX, &[])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&[1, 0, 1]),
            Err(TransportError::Closed { .. })
        ));
        // table announced but truncated
        assert!(matches!(
            raw(&msg(2, 8192, &[(0, 4096, 0)])),
            Err(TransportError::Closed { .. })
        ));
    }

    #[test]
    fn truncated_data_is_an_error() {
        let mut dst = vec![0u8; 65536];
        let dm = map(&mut dst);
        let (mut a, b) = pair();
        let mut m = msg(1, 4096, &[(0, 4096, 0)]);
        m.extend_from_slice(&[1u8; 100]);
        a.write_all(&m).unwrap();
        drop(a);
        let mut rx = DataReceiver::new(b).unwrap();
        assert!(matches!(
            rx.recv(&dm, &mut Vec::new()),
            Err(TransportError::Closed { .. })
        ));
    }
}
