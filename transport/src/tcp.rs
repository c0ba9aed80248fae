//! TCP data channels: extents of registered memory and markers.
//!
//! Wire format of a data channel, all little-endian:
//!
//! ```text
//! header   kind: u16 | count: u16 | flags: u32 (0) | value: u64        16 bytes
//!   kind 2 = marker: no body; value is opaque to the transport
//!   kind 4 = counted marker: value as kind 2, then pages: u64 — the pages this channel sent
//!            since its previous marker (8 more bytes; a record of its own when sealed)
//!   kind 3 = encoded: `count` encoded entries follow, then their bodies in order;
//!            value = total body bytes
//!   (kind 1, plain extents, existed in protocol 1 but was never sent; it is refused)
//! encoded  addr: u64 | raw_len: u32 | enc_len: u32 | encoding: u8 | 0: [u8; 7]   24 bytes
//! ```
//!
//! Every entry covers whole, page-aligned pages of registered memory.
//!
//! Encoded entries (see [`crate::codec`]): raw bodies are read straight into place; zero
//! entries have no body and are reported, not written (the receiver's owner knows which pages
//! may hold old data); compressed and delta bodies land in a scratch buffer and are decoded into
//! place with their sizes checked exactly.
//!
//! The sender gathers the header, the entry table and the extents' bytes from registered
//! memory into one `writev`; the receiver reads the table, checks every entry against its
//! [`MemoryMap`] before touching memory, then `readv`s the bytes straight into place.
//!
//! A sealed channel ([`crate::seal`]) sends the same message as sealed records, each followed
//! by its tag: the header, the entry table, then every entry's body (zero entries have
//! none). The receiver opens the header and the table before it checks them, and opens each
//! body in place where it landed; a record that fails to open ends the connection.

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use crate::codec::{self, Body, Encoder, Encoding, MAX_ZERO_ENTRY, PAGE};
use crate::frame::read_exact;
use crate::seal::{Opener, Sealer, TAG_LEN};
use crate::{MemoryMap, Target, TransportError};

/// Most extents in one message.
pub const MAX_EXTENTS: usize = 512;
/// Most payload bytes in one message.
pub const MAX_MESSAGE_BYTES: u64 = 8 << 20;

const HEADER_LEN: usize = 16;
const KIND_MARKER: u16 = 2;
const KIND_ENCODED: u16 = 3;
const KIND_COUNTED_MARKER: u16 = 4;
const ENCODED_ENTRY_LEN: usize = 24;
/// `writev`/`readv` accept at most this many buffers (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Ranges a message landed: data written into memory, and zero ranges reported (not written).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Landed {
    /// `(addr, len)` written with data.
    pub data: Vec<(u64, u64)>,
    /// `(addr, len)` announced as all-zero; the receiver did not touch them.
    pub zero: Vec<(u64, u64)>,
}

impl Landed {
    /// Forgets everything.
    pub fn clear(&mut self) {
        self.data.clear();
        self.zero.clear();
    }
}

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
    /// A marker with its value and the pages its channel sent since the previous marker.
    CountedMarker {
        /// The marker's value.
        value: u64,
        /// Pages sent since the previous marker.
        pages: u64,
    },
}

/// Sending end of a data channel.
#[derive(Debug)]
pub struct DataSender {
    stream: TcpStream,
    peer: String,
    table: Vec<u8>,
    rate_sample: Option<(std::time::Instant, TcpProgress, bool)>,
    /// Seals every record (a sealed channel), staged in `stage`.
    seal: Option<Sealer>,
    stage: Vec<u8>,
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
            table: Vec::with_capacity(HEADER_LEN + MAX_EXTENTS * ENCODED_ENTRY_LEN),
            rate_sample: None,
            seal: None,
            stage: Vec::new(),
        })
    }

    /// Seals everything sent from now on with `sealer`.
    pub fn seal_with(&mut self, sealer: Sealer) {
        self.seal = Some(sealer);
    }

    /// Writes `buf` whole.
    fn write(&mut self, what: &'static str, buf: &[u8]) -> Result<(), TransportError> {
        self.stream
            .write_all(buf)
            .map_err(|source| TransportError::Io {
                op: what,
                peer: self.peer.clone(),
                source,
            })
    }

    /// A sealed message: the header, the table and every body as records, staged and
    /// written at once.
    fn send_sealed(&mut self, bodies: &[libc::iovec]) -> Result<u64, TransportError> {
        let Some(seal) = self.seal.as_mut() else {
            return Ok(0);
        };
        self.stage.clear();
        let (hdr, table) = self.table.split_at(HEADER_LEN.min(self.table.len()));
        seal.seal_append(&[], hdr, &mut self.stage);
        if !table.is_empty() {
            seal.seal_append(&[], table, &mut self.stage);
        }
        for b in bodies {
            // SAFETY: the caller passes iovecs of readable memory (see `send_entries`).
            let body = unsafe { std::slice::from_raw_parts(b.iov_base.cast::<u8>(), b.iov_len) };
            seal.seal_append(&[], body, &mut self.stage);
        }
        let stage = std::mem::take(&mut self.stage);
        let r = self.write("sending sealed pages", &stage);
        self.stage = stage;
        r.map(|()| self.stage.len() as u64)
    }

    /// Encodes the pages of `extents` with `enc` and sends them as one message. Returns the
    /// bytes put on the wire (framing included).
    pub fn send_encoded(
        &mut self,
        map: &MemoryMap,
        extents: &[(u64, u64)],
        enc: &mut Encoder,
        round: u64,
    ) -> Result<u64, TransportError> {
        encode_chunk(map, extents, enc, round)?;
        self.send_entries(enc)
    }

    /// Sends what [`encode_chunk`] left in `enc` as one message (the memory its raw pages
    /// point into must still be mapped: `map` of that call outlives this one). Returns the
    /// bytes put on the wire.
    pub fn send_prepared(&mut self, enc: &mut Encoder) -> Result<u64, TransportError> {
        self.send_entries(enc)
    }

    /// Sends `extents` as zero pages without reading them (the caller knows they are holes).
    pub fn send_zero(
        &mut self,
        extents: &[(u64, u64)],
        enc: &mut Encoder,
    ) -> Result<u64, TransportError> {
        enc.entries.clear();
        enc.out.clear();
        for &(addr, len) in extents {
            let mut a = addr;
            let end = addr + len;
            while a < end {
                let n = (end - a).min(MAX_ZERO_ENTRY);
                enc.push_zero(a, n);
                a += n;
            }
        }
        self.send_entries(enc)
    }

    fn send_entries(&mut self, enc: &mut Encoder) -> Result<u64, TransportError> {
        let mut wire = 0;
        let entries = std::mem::take(&mut enc.entries);
        for batch in entries.chunks(MAX_EXTENTS) {
            self.note_backlog(enc);
            let body: u64 = batch.iter().map(|e| e.enc_len).sum();
            self.table.clear();
            put_header(&mut self.table, KIND_ENCODED, batch.len() as u16, body);
            let mut iov = Vec::with_capacity(batch.len() + 1);
            iov.push(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            });
            for e in batch {
                self.table.extend_from_slice(&e.addr.to_le_bytes());
                self.table
                    .extend_from_slice(&(e.raw_len as u32).to_le_bytes());
                self.table
                    .extend_from_slice(&(e.enc_len as u32).to_le_bytes());
                self.table.push(e.encoding as u8);
                self.table.extend_from_slice(&[0u8; 7]);
                let base = match e.body {
                    Body::Guest(p) => p.cast_mut(),
                    Body::Out(off) => enc.out[off..].as_ptr().cast_mut(),
                    Body::None => continue,
                };
                iov.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: e.enc_len as usize,
                });
            }
            if self.seal.is_some() {
                // The bodies (iovecs after the first) point into the encoder's output buffer
                // or registered guest memory checked in `send_encoded`.
                wire += self.send_sealed(&iov[1..])?;
                // Sealing encrypts a copy of every body.
                enc.stats.bytes_staged += body;
                self.sample_link(enc);
                continue;
            }
            iov[0] = libc::iovec {
                iov_base: self.table.as_ptr() as *mut libc::c_void,
                iov_len: self.table.len(),
            };
            // SAFETY: the iovecs point into `self.table`, the encoder's output buffer (not
            // modified until the next encode) or registered guest memory checked in
            // `send_encoded`; writev only reads them.
            unsafe { transfer(self.stream.as_raw_fd(), &mut iov, Dir::Write) }.map_err(
                |source| TransportError::Io {
                    op: "writev of encoded pages",
                    peer: self.peer.clone(),
                    source,
                },
            )?;
            wire += self.table.len() as u64 + body;
            self.sample_link(enc);
        }
        enc.entries = entries;
        Ok(wire)
    }

    /// Tells the encoder what the connection still holds unsent just before a write: what
    /// the link did not drain while this message was being prepared. Read after the write
    /// instead, it counts the message itself: on loopback here a 1 MiB chunk written raw was
    /// still 640 KiB in the queue when the write returned, and so after a quarter of the
    /// sends, enough for `auto` to take the link for a slow one and compress 1 GiB of text
    /// with zstd level 3 (922-980 ms against 712-790 raw) on a link it never measured — the
    /// queue, drained before every write, gave no rate sample.
    fn note_backlog(&mut self, enc: &mut Encoder) {
        if enc.mode() == codec::Mode::Auto {
            if let Some(p) = tcp_progress(&self.stream) {
                enc.record_backlog(u64::from(p.queued));
            }
        }
    }

    /// Feeds the encoder the rate at which the peer acknowledged bytes since the last sample,
    /// and whether the peer's receive window held the connection back meanwhile.
    fn sample_link(&mut self, enc: &mut Encoder) {
        let now = std::time::Instant::now();
        let Some(p) = tcp_progress(&self.stream) else {
            return;
        };
        let backlogged = p.queued >= QUEUED_FOR_SAMPLE;
        match self.rate_sample {
            Some((t, before, was_backlogged)) if now.duration_since(t) >= RATE_INTERVAL => {
                // Only a window with data queued at both ends measures the link; with an empty
                // queue the sender (compressing, say) was the bottleneck, and a queue that
                // builds only at the end is the receiver's moment, not the link: on loopback
                // here such windows read 1.2-1.8 GB/s of a link that carries 2-4, and `auto`
                // then compressed with LZ4 — which, keeping the queue empty, let no later
                // window correct it (1 GiB of text in 1029-1273 ms against 544 raw).
                if backlogged && was_backlogged {
                    let rate = p.acked.saturating_sub(before.acked) as f64
                        / now.duration_since(t).as_secs_f64();
                    enc.record_link_sample(rate, p.receiver_bound_since(&before));
                }
                self.rate_sample = Some((now, p, backlogged));
            }
            Some(_) => {}
            None => self.rate_sample = Some((now, p, backlogged)),
        }
    }

    /// Sends a marker.
    pub fn send_marker(&mut self, value: u64) -> Result<(), TransportError> {
        let mut hdr = Vec::with_capacity(HEADER_LEN + TAG_LEN);
        put_header(&mut hdr, KIND_MARKER, 0, value);
        if let Some(seal) = self.seal.as_mut() {
            let tag = seal.seal(&[], &mut hdr);
            hdr.extend_from_slice(&tag);
        }
        self.write("sending a marker", &hdr)
    }

    /// Sends a marker that says how many pages this channel sent since its previous one.
    pub fn send_counted_marker(&mut self, value: u64, pages: u64) -> Result<(), TransportError> {
        let mut hdr = Vec::with_capacity(HEADER_LEN + 8 + 2 * TAG_LEN);
        put_header(&mut hdr, KIND_COUNTED_MARKER, 0, value);
        match self.seal.as_mut() {
            Some(seal) => {
                let mut out = Vec::with_capacity(hdr.len() + 8 + 2 * TAG_LEN);
                seal.seal_append(&[], &hdr, &mut out);
                seal.seal_append(&[], &pages.to_le_bytes(), &mut out);
                self.write("sending a marker", &out)
            }
            None => {
                hdr.extend_from_slice(&pages.to_le_bytes());
                self.write("sending a marker", &hdr)
            }
        }
    }

    /// Sends `bytes` as one sealed record (the channel's proof of its session, before any
    /// page), or in clear on an unsealed channel.
    pub fn send_record(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        let mut rec = Vec::with_capacity(bytes.len() + TAG_LEN);
        match self.seal.as_mut() {
            Some(seal) => seal.seal_append(&[], bytes, &mut rec),
            None => rec.extend_from_slice(bytes),
        }
        self.write("sending a channel record", &rec)
    }

    /// The underlying stream (for shutdown or timeouts).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// One checked entry of an incoming message.
struct Incoming {
    addr: u64,
    raw_len: u64,
    enc_len: u64,
    encoding: Encoding,
    host: *mut u8,
    /// File-backed range: `(fd, offset)` written with pwrite.
    file: Option<(i32, u64)>,
}

/// Receiving end of a data channel.
#[derive(Debug)]
pub struct DataReceiver {
    stream: TcpStream,
    peer: String,
    table: Vec<u8>,
    scratch: Vec<u8>,
    decoded: Vec<u8>,
    /// Opens every record (a sealed channel); `tags` holds the bodies' tags of a message.
    open: Option<Opener>,
    tags: Vec<[u8; TAG_LEN]>,
}

impl DataReceiver {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Result<Self, TransportError> {
        let peer = peer_name(&stream);
        set_buffer(&stream, libc::SO_RCVBUF, SOCKET_BUFFER);
        Ok(DataReceiver {
            stream,
            peer,
            table: vec![0u8; MAX_EXTENTS * ENCODED_ENTRY_LEN + TAG_LEN],
            scratch: Vec::new(),
            decoded: Vec::new(),
            open: None,
            tags: Vec::new(),
        })
    }

    /// Opens everything received from now on with `opener`.
    pub fn open_with(&mut self, opener: Opener) {
        self.open = Some(opener);
    }

    /// Receives one record of `out.len()` bytes (see [`DataSender::send_record`]).
    pub fn recv_record(&mut self, out: &mut [u8]) -> Result<(), TransportError> {
        let tag_len = if self.open.is_some() { TAG_LEN } else { 0 };
        let mut rec = vec![0u8; out.len() + tag_len];
        read_exact(
            &mut self.stream,
            &mut rec,
            &self.peer,
            "reading a channel record",
        )?;
        let body = match self.open.as_mut() {
            Some(o) => o.open_record(&[], &mut rec, &self.peer)?,
            None => &mut rec[..],
        };
        out.copy_from_slice(body);
        Ok(())
    }

    /// Reads `len` bytes into `self.table` and, on a sealed channel, opens them as a record.
    fn read_table_record(
        &mut self,
        len: usize,
        during: &'static str,
    ) -> Result<(), TransportError> {
        let tag_len = if self.open.is_some() { TAG_LEN } else { 0 };
        read_exact(
            &mut self.stream,
            &mut self.table[..len + tag_len],
            &self.peer,
            during,
        )?;
        if let Some(o) = self.open.as_mut() {
            o.open_record(&[], &mut self.table[..len + tag_len], &self.peer)?;
        }
        Ok(())
    }

    /// Receives one message. Extents land in `map` and are appended to `landed`. Nothing is
    /// written to memory unless every entry of the table is valid.
    pub fn recv(
        &mut self,
        map: &MemoryMap,
        landed: &mut Landed,
    ) -> Result<Received, TransportError> {
        self.read_table_record(HEADER_LEN, "waiting for a data message")?;
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&self.table[..HEADER_LEN]);
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
            KIND_MARKER if count == 0 => Ok(Received::Marker(value)),
            KIND_MARKER | KIND_COUNTED_MARKER if count != 0 => {
                Err(bad(format!("marker with {count} entries")))
            }
            KIND_COUNTED_MARKER => {
                self.read_table_record(8, "reading a marker's page count")?;
                let mut pages = [0u8; 8];
                pages.copy_from_slice(&self.table[..8]);
                Ok(Received::CountedMarker {
                    value,
                    pages: u64::from_le_bytes(pages),
                })
            }
            KIND_ENCODED => self.recv_encoded(map, landed, count, value),
            other => Err(bad(format!("unknown data message kind {other}"))),
        }
    }

    fn recv_encoded(
        &mut self,
        map: &MemoryMap,
        landed: &mut Landed,
        count: usize,
        value: u64,
    ) -> Result<Received, TransportError> {
        if count == 0 || count > MAX_EXTENTS {
            return Err(self.bad(format!(
                "{count} entries in one message (1..={MAX_EXTENTS})"
            )));
        }
        if value > MAX_MESSAGE_BYTES {
            return Err(self.bad(format!(
                "{value} body bytes exceed the {MAX_MESSAGE_BYTES} cap"
            )));
        }
        self.read_table_record(count * ENCODED_ENTRY_LEN, "reading an encoded entry table")?;
        let (entries, scratch_len) = self.check_table(map, count, value)?;
        self.read_bodies(&entries, scratch_len)?;
        self.open_bodies(&entries)?;
        self.place(&entries, landed)?;
        Ok(Received::Extents { bytes: value })
    }

    fn bad(&self, reason: String) -> TransportError {
        TransportError::Malformed {
            peer: self.peer.clone(),
            reason,
        }
    }

    /// Validates every entry of the table before anything touches memory; returns them with
    /// the scratch space their encoded bodies need.
    fn check_table(
        &self,
        map: &MemoryMap,
        count: usize,
        value: u64,
    ) -> Result<(Vec<Incoming>, usize), TransportError> {
        let mut entries = Vec::with_capacity(count);
        let mut body_sum = 0u64;
        let mut scratch_len = 0usize;
        for e in self.table[..count * ENCODED_ENTRY_LEN].chunks_exact(ENCODED_ENTRY_LEN) {
            let addr = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
            let raw_len = u64::from(u32::from_le_bytes(e[8..12].try_into().unwrap_or_default()));
            let enc_len = u64::from(u32::from_le_bytes(e[12..16].try_into().unwrap_or_default()));
            let pad = &e[17..24];
            let Some(encoding) = Encoding::from_u8(e[16]) else {
                return Err(self.bad(format!("unknown page encoding {}", e[16])));
            };
            let ok = pad.iter().all(|&b| b == 0)
                && raw_len > 0
                && addr % PAGE as u64 == 0
                && raw_len % PAGE as u64 == 0
                && match encoding {
                    Encoding::Raw => enc_len == raw_len && raw_len <= MAX_MESSAGE_BYTES,
                    Encoding::Zero => enc_len == 0 && raw_len <= MAX_ZERO_ENTRY,
                    Encoding::Lz4 | Encoding::Zstd => {
                        enc_len > 0 && enc_len <= raw_len && raw_len <= MAX_MESSAGE_BYTES
                    }
                    Encoding::Delta => raw_len == PAGE as u64 && enc_len <= 2 * PAGE as u64,
                };
            if !ok {
                return Err(self.bad(format!(
                    "bad {encoding:?} entry {addr:#x}: {raw_len} bytes encoded in {enc_len}"
                )));
            }
            let (host, file) = match map.target(addr, raw_len)? {
                Target::Memory(h) => (h, None),
                Target::File { fd, offset, host } => (host, Some((fd, offset))),
            };
            body_sum += enc_len;
            // Encoded bodies, and raw ones bound for a file, land in scratch first.
            if !matches!(encoding, Encoding::Raw | Encoding::Zero) || file.is_some() {
                scratch_len += enc_len as usize;
            }
            entries.push(Incoming {
                addr,
                raw_len,
                enc_len,
                encoding,
                host,
                file,
            });
        }
        if body_sum != value {
            return Err(self.bad(format!(
                "entry bodies add up to {body_sum}, header says {value}"
            )));
        }
        Ok((entries, scratch_len))
    }

    /// One readv: raw bodies straight into guest memory, encoded ones into scratch.
    fn read_bodies(
        &mut self,
        entries: &[Incoming],
        scratch_len: usize,
    ) -> Result<(), TransportError> {
        self.scratch.resize(scratch_len, 0);
        let sealed = self.open.is_some();
        let bodies = entries
            .iter()
            .filter(|e| e.encoding != Encoding::Zero)
            .count();
        self.tags.clear();
        self.tags
            .resize(if sealed { bodies } else { 0 }, [0u8; TAG_LEN]);
        let mut iov = Vec::with_capacity(entries.len() * 2);
        let mut off = 0usize;
        let mut tags = self.tags.iter_mut();
        for e in entries {
            match e.encoding {
                Encoding::Zero => continue,
                Encoding::Raw if e.file.is_none() => iov.push(libc::iovec {
                    iov_base: e.host.cast(),
                    iov_len: e.enc_len as usize,
                }),
                _ => {
                    iov.push(libc::iovec {
                        iov_base: self.scratch[off..].as_mut_ptr().cast(),
                        iov_len: e.enc_len as usize,
                    });
                    off += e.enc_len as usize;
                }
            }
            if let Some(t) = tags.next() {
                iov.push(libc::iovec {
                    iov_base: t.as_mut_ptr().cast(),
                    iov_len: TAG_LEN,
                });
            }
        }
        // SAFETY: raw iovecs point into registered memory (bounds checked in check_table);
        // the others into `self.scratch`, sized to hold every encoded body, or `self.tags`,
        // sized to hold one tag per body.
        unsafe { transfer(self.stream.as_raw_fd(), &mut iov, Dir::Read) }.map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                TransportError::Closed {
                    peer: self.peer.clone(),
                    during: "reading encoded pages",
                }
            } else {
                TransportError::Io {
                    op: "readv of encoded pages",
                    peer: self.peer.clone(),
                    source,
                }
            }
        })
    }

    /// A sealed channel: opens every body where it landed, in the order they were sealed.
    fn open_bodies(&mut self, entries: &[Incoming]) -> Result<(), TransportError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let mut off = 0usize;
        let mut tags = self.tags.iter();
        for e in entries.iter().filter(|e| e.encoding != Encoding::Zero) {
            let len = e.enc_len as usize;
            let body: &mut [u8] = if e.encoding == Encoding::Raw && e.file.is_none() {
                // SAFETY: `host..host + len` is registered memory (checked in check_table)
                // that only this receiver writes meanwhile, and no reference into it exists.
                unsafe { std::slice::from_raw_parts_mut(e.host, len) }
            } else {
                off += len;
                &mut self.scratch[off - len..off]
            };
            let Some(tag) = tags.next() else {
                return Err(self.bad("a body without its tag".into()));
            };
            open.open(&[], body, tag, &self.peer)?;
        }
        Ok(())
    }

    /// Decodes the encoded bodies into place and records what landed.
    fn place(&mut self, entries: &[Incoming], landed: &mut Landed) -> Result<(), TransportError> {
        let mut off = 0usize;
        for e in entries {
            let (addr, raw_len) = (e.addr, e.raw_len);
            match e.encoding {
                Encoding::Zero => landed.zero.push((addr, raw_len)),
                Encoding::Raw => {
                    if let Some((fd, at)) = e.file {
                        let body = &self.scratch[off..off + e.enc_len as usize];
                        off += e.enc_len as usize;
                        self.write_file(fd, body, at)?;
                    }
                    landed.data.push((addr, raw_len));
                }
                Encoding::Delta if e.file.is_none() => {
                    let body = &self.scratch[off..off + e.enc_len as usize];
                    off += e.enc_len as usize;
                    let malformed = |err: codec::DecodeError| TransportError::Malformed {
                        peer: self.peer.clone(),
                        reason: format!("entry {addr:#x}: {err}"),
                    };
                    // Checked whole first: a corrupt body is an error that leaves the
                    // destination page untouched; then applied in place, no copy of the page.
                    codec::delta_check(body, raw_len as usize).map_err(malformed)?;
                    // SAFETY: `host..host + raw_len` is registered memory (checked in
                    // check_table) that only this receiver writes meanwhile.
                    let page = unsafe { std::slice::from_raw_parts_mut(e.host, raw_len as usize) };
                    codec::delta_apply(body, page).map_err(malformed)?;
                    landed.data.push((addr, raw_len));
                }
                encoding => {
                    let body = &self.scratch[off..off + e.enc_len as usize];
                    off += e.enc_len as usize;
                    // Decode into a page-sized staging buffer first: a corrupt body is an
                    // error that leaves the destination range untouched.
                    self.decoded.resize(raw_len as usize, 0);
                    if encoding == Encoding::Delta {
                        // SAFETY: `host..host + raw_len` is registered memory (checked in
                        // check_table) that only this receiver writes meanwhile.
                        let old = unsafe { std::slice::from_raw_parts(e.host, raw_len as usize) };
                        self.decoded.copy_from_slice(old);
                    }
                    let r = match encoding {
                        Encoding::Delta => codec::delta_apply(body, &mut self.decoded),
                        c => codec::decompress_into(c, body, &mut self.decoded),
                    };
                    r.map_err(|err| TransportError::Malformed {
                        peer: self.peer.clone(),
                        reason: format!("entry {addr:#x}: {err}"),
                    })?;
                    match e.file {
                        Some((fd, at)) => {
                            let decoded = std::mem::take(&mut self.decoded);
                            let r = self.write_file(fd, &decoded, at);
                            self.decoded = decoded;
                            r?;
                        }
                        // SAFETY: as above; the source buffer is ours and does not overlap it.
                        None => unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.decoded.as_ptr(),
                                e.host,
                                raw_len as usize,
                            )
                        },
                    }
                    landed.data.push((addr, raw_len));
                }
            }
        }
        Ok(())
    }

    /// Writes `body` into file `fd` at `at`.
    fn write_file(&self, fd: i32, body: &[u8], at: u64) -> Result<(), TransportError> {
        use std::os::unix::fs::FileExt;
        // SAFETY: the map's owner keeps `fd` open while the map lives; ManuallyDrop keeps
        // this borrowed File from closing it.
        let f = std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        });
        f.write_all_at(body, at)
            .map_err(|source| TransportError::Io {
                op: "writing received blocks to their file",
                peer: self.peer.clone(),
                source,
            })
    }

    /// The underlying stream (for shutdown or timeouts).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// Encodes the pages of `extents` of `map` with `enc` (any thread may; the entries keep
/// pointers into `map` for the raw pages), for [`DataSender::send_prepared`] to send.
pub fn encode_chunk(
    map: &MemoryMap,
    extents: &[(u64, u64)],
    enc: &mut Encoder,
    round: u64,
) -> Result<(), TransportError> {
    let mut with_host = Vec::with_capacity(extents.len());
    for &(addr, len) in extents {
        if len % PAGE as u64 != 0 {
            return Err(TransportError::OutOfBounds { addr, len });
        }
        with_host.push((addr, len, map.host_ptr(addr, len)?.cast_const()));
    }
    // SAFETY: every pointer was bounds-checked against `map`, which keeps the memory mapped
    // for as long as this call and the send of the entries run (the caller's contract).
    unsafe { enc.encode(&with_host, round) };
    Ok(())
}

fn put_header(buf: &mut Vec<u8>, kind: u16, count: u16, value: u64) {
    buf.extend_from_slice(&kind.to_le_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&value.to_le_bytes());
}

/// Bytes the sender must still have queued for a rate sample to count.
const QUEUED_FOR_SAMPLE: u32 = 64 << 10;

/// A connection's progress, from `TCP_INFO`.
#[derive(Debug, Clone, Copy)]
struct TcpProgress {
    /// Bytes the peer acknowledged so far.
    acked: u64,
    /// Bytes queued but not yet sent.
    queued: u32,
    /// Microseconds the connection spent sending so far, and of those, held back by the
    /// peer's receive window (kernels since 4.10; None before).
    busy_us: Option<(u64, u64)>,
}

impl TcpProgress {
    /// Whether, since `before`, the peer's receive window held the connection back at least
    /// half the time it was sending: its application (the receiver's threads, on cores they
    /// may share with the sender) did not take the bytes in as fast as the network brought
    /// them, so the rate measured is the receiver's, not the network's.
    fn receiver_bound_since(&self, before: &TcpProgress) -> bool {
        match (self.busy_us, before.busy_us) {
            (Some((busy, rwnd)), Some((busy0, rwnd0))) => {
                let busy = busy.saturating_sub(busy0);
                busy > 0 && 2 * rwnd.saturating_sub(rwnd0) >= busy
            }
            _ => false,
        }
    }
}

/// The connection's progress; None if the kernel does not say.
fn tcp_progress(stream: &TcpStream) -> Option<TcpProgress> {
    let (info, len) = tcp_info(stream)?;
    (len >= std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt)).then(|| TcpProgress {
        acked: info.tcpi_bytes_acked,
        queued: info.tcpi_notsent_bytes,
        busy_us: (len >= std::mem::offset_of!(libc::tcp_info, tcpi_sndbuf_limited))
            .then_some((info.tcpi_busy_time, info.tcpi_rwnd_limited)),
    })
}

/// The socket's `TCP_INFO` and how many of its bytes this kernel filled in (older kernels
/// fill a prefix); None if it cannot be read.
pub fn tcp_info(stream: &TcpStream) -> Option<(libc::tcp_info, usize)> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which has that size.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some((info, len as usize))
}

/// Bytes written to `stream` that the peer has not acknowledged yet, unsent ones included
/// (`SIOCOUTQ`): zero once everything written has reached the peer's TCP stack. None if the
/// socket cannot tell.
pub fn unacked_bytes(stream: &TcpStream) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one int into `n`.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0).then(|| n.max(0) as u64)
}

/// Shortest interval over which the link rate is sampled.
const RATE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Socket buffer size for data channels: several chunks in flight per connection, so sender
/// and receiver wake each other less often.
pub const SOCKET_BUFFER: i32 = 8 << 20;

/// Sets the socket's buffer `opt` (`SO_RCVBUF`, `SO_SNDBUF`) to `bytes`.
fn set_buffer(stream: &TcpStream, opt: i32, bytes: i32) {
    let v = bytes;
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
    loop {
        // Empty buffers move nothing; a call with only empty buffers would read as EOF.
        while start < iov.len() && iov[start].iov_len == 0 {
            start += 1;
        }
        if start == iov.len() {
            break;
        }
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{Opener, Sealer};
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

    /// `auto`'s sign of a receiver that cannot keep up, read from a real connection: a
    /// reader that takes 64 KiB every 2 ms behind a writer that never waits for it.
    #[test]
    fn a_receiver_that_reads_slowly_holds_the_connection_back() {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        let (a, mut b) = pair();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while !done.load(Ordering::Relaxed) && b.read(&mut buf).is_ok_and(|n| n > 0) {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        let mut w = a.try_clone().unwrap();
        let writer = {
            let done = done.clone();
            std::thread::spawn(move || {
                let buf = vec![1u8; 1 << 20];
                while !done.load(Ordering::Relaxed) && w.write_all(&buf).is_ok() {}
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let before = tcp_progress(&a).expect("TCP_INFO");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let after = tcp_progress(&a).expect("TCP_INFO");
        done.store(true, Ordering::Relaxed);
        let _ = a.shutdown(std::net::Shutdown::Both);
        writer.join().unwrap();
        reader.join().unwrap();
        assert!(after.acked > before.acked, "{before:?} {after:?}");
        assert!(after.queued > 0, "nothing queued: {after:?}");
        assert!(after.receiver_bound_since(&before), "{before:?} {after:?}");
        // The same figures with the window never in the way: not the receiver's.
        let free = TcpProgress {
            busy_us: after
                .busy_us
                .map(|(busy, _)| (busy, before.busy_us.unwrap().1)),
            ..after
        };
        assert!(!free.receiver_bound_since(&before));
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    #[test]
    fn many_extents_land_in_place() {
        use crate::codec::Mode;
        let mut src: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; 1 << 20];
        let (sm, dm) = (map(&mut src), map(&mut dst));
        let (a, b) = pair();
        let extents: Vec<(u64, u64)> = (0..100).map(|i| (i * 8192, 4096)).collect();
        let ex = extents.clone();
        let t = std::thread::spawn(move || {
            let mut tx = DataSender::new(a).unwrap();
            let mut enc = Encoder::new(Mode::None, None);
            tx.send_encoded(&sm, &ex, &mut enc, 0).unwrap();
            tx.send_marker(42).unwrap();
            tx.send_counted_marker(43, 100).unwrap();
        });
        let mut rx = DataReceiver::new(b).unwrap();
        let mut w = Landed::default();
        assert_eq!(
            rx.recv(&dm, &mut w).unwrap(),
            Received::Extents { bytes: 100 * 4096 }
        );
        assert_eq!(rx.recv(&dm, &mut w).unwrap(), Received::Marker(42));
        assert_eq!(
            rx.recv(&dm, &mut w).unwrap(),
            Received::CountedMarker {
                value: 43,
                pages: 100
            }
        );
        t.join().unwrap();
        assert_eq!(w.data, extents);
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
        let r = rx.recv(&dm, &mut Landed::default());
        drop(dm);
        assert!(
            dst.iter().all(|&b| b == 0),
            "nothing may be written on error"
        );
        r
    }

    /// A message of raw entries `(addr, len, padding byte)`, announcing `value` body bytes.
    fn msg(count: u16, value: u64, entries: &[(u64, u32, u8)]) -> Vec<u8> {
        let mut v = Vec::new();
        put_header(&mut v, KIND_ENCODED, count, value);
        for &(a, l, pad) in entries {
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
            v.push(Encoding::Raw as u8);
            v.extend_from_slice(&[pad; 7]);
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
            raw(&msg(2, 4096, &[(0, 4096, 0), (!0xfff, 4096, 0)])),
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
        // kind 1 (plain extents) is not part of the protocol any more
        assert!(matches!(
            raw(&[1, 0, 1, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0]),
            Err(TransportError::Malformed { .. })
        ));
        // misaligned or partial pages
        assert!(matches!(
            raw(&msg(1, 4096, &[(0x800, 4096, 0)])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&msg(1, 16, &[(0, 16, 0)])),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&[3, 0, 1]),
            Err(TransportError::Closed { .. })
        ));
        // table announced but truncated
        assert!(matches!(
            raw(&msg(2, 8192, &[(0, 4096, 0)])),
            Err(TransportError::Closed { .. })
        ));
    }

    /// What a sealed sender puts on the wire for `pages` pages of `fill` and a marker.
    fn sealed_stream(pages: usize, fill: u8) -> Vec<u8> {
        let mut src = vec![fill; pages * PAGE];
        let sm = map(&mut src);
        let (a, mut b) = pair();
        let s2 = sm.clone();
        let t = std::thread::spawn(move || {
            let mut tx = DataSender::new(a).unwrap();
            tx.seal_with(Sealer::new(&[5; 32]));
            let mut enc = Encoder::new(crate::codec::Mode::None, None);
            tx.send_encoded(&s2, &[(0, (pages * PAGE) as u64)], &mut enc, 0)
                .unwrap();
            tx.send_marker(1).unwrap();
        });
        t.join().unwrap();
        drop(sm);
        b.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut wire = Vec::new();
        let _ = std::io::Read::read_to_end(&mut b, &mut wire);
        wire
    }

    #[test]
    fn a_sealed_channel_hides_pages_and_refuses_any_altered_byte() {
        let pages = 4;
        let wire = sealed_stream(pages, 0x5a);
        assert!(
            !wire.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)),
            "page bytes in clear on a sealed channel"
        );
        let deliver = |bytes: &[u8], key: u8| {
            let (mut a, b) = pair();
            std::io::Write::write_all(&mut a, bytes).unwrap();
            drop(a);
            let mut dst = vec![0u8; pages * PAGE];
            let dm = map(&mut dst);
            let mut rx = DataReceiver::new(b).unwrap();
            rx.open_with(Opener::new(&[key; 32]));
            let mut landed = Landed::default();
            let r: Result<u64, TransportError> = (|| loop {
                if let Received::Marker(v) = rx.recv(&dm, &mut landed)? {
                    return Ok(v);
                }
            })();
            drop(dm);
            (r, dst)
        };
        let (r, dst) = deliver(&wire, 5);
        assert_eq!(r.unwrap(), 1);
        assert!(dst.iter().all(|&b| b == 0x5a));
        // A flipped bit anywhere (header, table, a page, a tag, the marker) or another key:
        // the record fails to open and the stream ends with an error.
        for at in [
            0,
            20,
            40,
            100,
            64 + 3 * PAGE,
            wire.len() - 20,
            wire.len() - 1,
        ] {
            let mut w = wire.clone();
            w[at] ^= 0x10;
            let e = deliver(&w, 5).0.unwrap_err().to_string();
            assert!(e.contains("failed authentication"), "bit at {at}: {e}");
        }
        assert!(deliver(&wire, 6).0.is_err());
    }

    #[test]
    fn encoded_chunks_land_in_place_in_every_mode() {
        use crate::codec::{DeltaCache, Mode};
        let pages = 64usize;
        let mut src = vec![0u8; pages * PAGE];
        for (i, p) in src.chunks_mut(PAGE).enumerate() {
            match i % 4 {
                0 => {}
                1 => p
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j * 31 + i) as u8),
                _ => p.copy_from_slice(&b"text-like words repeat often "[..].repeat(200)[..PAGE]),
            }
        }
        let mut dst = vec![0u8; pages * PAGE];
        let (sm, dm) = (map(&mut src), map(&mut dst));
        for (mode, sealed) in [
            Mode::None,
            Mode::Lz4,
            Mode::Zstd(3),
            Mode::Delta,
            Mode::Auto,
        ]
        .into_iter()
        .flat_map(|m| [(m, false), (m, true)])
        {
            let (a, b) = pair();
            let s2 = sm.clone();
            let t = std::thread::spawn(move || {
                let mut tx = DataSender::new(a).unwrap();
                if sealed {
                    tx.seal_with(Sealer::new(&[3; 32]));
                }
                let mut enc = Encoder::new(mode, Some(DeltaCache::new(1 << 20)));
                for round in 0..3 {
                    tx.send_encoded(&s2, &[(0, (pages * PAGE) as u64)], &mut enc, round)
                        .unwrap();
                }
                tx.send_zero(&[(0, PAGE as u64)], &mut enc).unwrap();
                tx.send_marker(9).unwrap();
                enc.take_stats()
            });
            let mut rx = DataReceiver::new(b).unwrap();
            if sealed {
                rx.open_with(Opener::new(&[3; 32]));
            }
            let mut landed = Landed::default();
            loop {
                match rx.recv(&dm, &mut landed) {
                    Ok(Received::Marker(9)) => break,
                    Ok(_) => {}
                    Err(e) => panic!("{mode:?}: {e} (sender: {:?})", t.join()),
                }
            }
            let stats = t.join().unwrap();
            assert!(landed.zero.contains(&(0, PAGE as u64)), "{mode:?}");
            assert_eq!(stats.pages_zero, 3 * 16 + 1, "{mode:?}: {stats:?}");
            if matches!(mode, Mode::Lz4 | Mode::Zstd(_)) {
                assert!(stats.bytes_out < stats.bytes_in, "{mode:?}: {stats:?}");
            }
            if mode == Mode::Delta {
                assert!(stats.pages_delta > 0, "{stats:?}");
            }
        }
        drop((sm, dm));
        // zero pages are reported, never written: the destination was zero already
        assert_eq!(src, dst);
    }

    /// What `auto` takes for the link's queue is what the link left undrained before a write,
    /// not what the write itself left as it returned: here the receiver, behind a window
    /// smaller than a chunk, takes each chunk in before the next is sent (loopback, where the
    /// receiver runs while the sender prepares the next chunk), so the queue is empty at
    /// every write although each returns with most of its chunk still queued.
    #[test]
    fn auto_takes_the_queue_before_a_write_for_the_links() {
        use crate::codec::{Mode, UNMEASURED_BACKLOG};
        use std::sync::mpsc::channel;
        let chunk = 256usize; // pages: 1 MiB
        let chunks = 16usize;
        let mut src = b"text-like words repeat often ".repeat(chunk * PAGE / 29 + 1);
        src.truncate(chunk * PAGE);
        let mut dst = vec![0u8; chunk * PAGE];
        let (sm, dm) = (map(&mut src), map(&mut dst));
        let (a, b) = pair();
        let (sent_tx, sent) = channel::<()>();
        let (landed_tx, landed_rx) = channel::<()>();
        let s2 = sm.clone();
        let t = std::thread::spawn(move || {
            let mut tx = DataSender::new(a).unwrap();
            tx.seal_with(Sealer::new(&[5; 32]));
            let mut enc = Encoder::new(Mode::Auto, None);
            let mut seen = Vec::new();
            let mut left_by_writes = 0;
            for _ in 0..chunks {
                tx.send_encoded(&s2, &[(0, (chunk * PAGE) as u64)], &mut enc, 0)
                    .unwrap();
                seen.push(enc.backlog());
                let left = tcp_progress(tx.stream()).map_or(0, |p| u64::from(p.queued));
                left_by_writes += u64::from(left >= UNMEASURED_BACKLOG);
                sent_tx.send(()).unwrap();
                landed_rx.recv().unwrap();
            }
            (seen, left_by_writes)
        });
        let mut rx = DataReceiver::new(b).unwrap();
        rx.open_with(Opener::new(&[5; 32]));
        set_buffer(rx.stream(), libc::SO_RCVBUF, 128 << 10);
        let mut landed = Landed::default();
        while sent.recv().is_ok() {
            match rx.recv(&dm, &mut landed) {
                Ok(Received::Extents { .. }) => landed_tx.send(()).unwrap(),
                other => panic!("{other:?} (sender: {:?})", t.join()),
            }
        }
        let (seen, left_by_writes) = t.join().unwrap();
        drop((sm, dm));
        assert_eq!(src, dst);
        // The writes did leave long queues (the premise: raw chunks, a small window)...
        assert!(left_by_writes > 0, "no write left a long queue");
        // ... which `auto` never took for the link's.
        assert!(seen.iter().all(|&q| q == 0), "{seen:?}");
    }

    #[test]
    fn corrupt_or_oversized_encoded_entries_are_rejected() {
        let enc_msg = |raw: u32, body: &[u8], encoding: u8| {
            let mut v = Vec::new();
            put_header(&mut v, KIND_ENCODED, 1, body.len() as u64);
            v.extend_from_slice(&0u64.to_le_bytes());
            v.extend_from_slice(&raw.to_le_bytes());
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.push(encoding);
            v.extend_from_slice(&[0u8; 7]);
            v.extend_from_slice(body);
            v
        };
        let lz = lz4_flex::block::compress(&[5u8; 8192]);
        // decodes to more than announced
        assert!(matches!(
            raw(&enc_msg(4096, &lz, 3)),
            Err(TransportError::Malformed { .. })
        ));
        // garbage
        assert!(matches!(
            raw(&enc_msg(4096, &[0xf0; 64], 3)),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&enc_msg(4096, &[0xf0; 64], 4)),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&enc_msg(4096, &[0xff, 0xff, 0x03, 1], 5)),
            Err(TransportError::Malformed { .. })
        ));
        // compressed larger than raw, unknown encoding, zero with a body, oversized delta page
        assert!(matches!(
            raw(&enc_msg(16, &[0; 32], 3)),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&enc_msg(4096, &[0; 8], 9)),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&enc_msg(4096, &[0; 8], 2)),
            Err(TransportError::Malformed { .. })
        ));
        assert!(matches!(
            raw(&enc_msg(8192, &[0; 8], 5)),
            Err(TransportError::Malformed { .. })
        ));
        // out of bounds
        assert!(matches!(
            raw(&enc_msg(1 << 20, &[], 2)),
            Err(TransportError::OutOfBounds { .. })
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
            rx.recv(&dm, &mut Landed::default()),
            Err(TransportError::Closed { .. })
        ));
    }
}
