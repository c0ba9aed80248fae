//! The page-scheduler core shared by every transport.
//!
//! ```text
//! DirtyBitmap → extents → chunks (bounded) → channel queues (crossbeam, bounded) → workers
//! ```
//!
//! The scheduler thread only cuts extents into chunks and hands each to whichever channel's
//! queue has room first (work stealing: a slow channel takes less); page work (reading guest
//! RAM, syscalls) happens in the channel workers, one per channel, pinned to a core when asked;
//! a TCP channel that compresses (LZ4, zstd) hands the encoding to helper threads, its share
//! of the cores, and sends their output in the order it handed the chunks out.
//! RDMA over several rails fails over: a channel that fails is dropped and the chunks it had
//! not confirmed at a marker go to the others. A round ends with a marker on every channel; the destination's receivers meet at a
//! barrier on each marker, so a page re-sent in round k+1 can never be overtaken by its stale
//! copy from round k on another channel.
//!
//! Workers come in two kinds sharing this core: TCP workers encode chunks and write them to a
//! data connection, and the marker travels in-band; RDMA workers (feature `rdma`) post one-sided
//! RDMA WRITEs for chunks and, at the marker, poll their queue pair's completions until every
//! write of the round completed — reliable-connected completions mean the data is placed in
//! destination RAM, so the barrier holds on the source side (the source then tells the
//! destination over the control channel). Zero ranges cost RDMA nothing: destination RAM
//! starts zero — holes, and pages found zero that no write of this migration has touched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Select, Sender};
use livemig_transport::codec::WrittenPages;
#[cfg(feature = "rdma")]
use livemig_transport::codec::{is_zero_page, page_shape, PageShape, SparseGate};
use livemig_transport::codec::{CodecStats, DeltaCache, Encoder, Mode};
#[cfg(feature = "rdma")]
use livemig_transport::rdma::RdmaSender;
use livemig_transport::tcp::DataSender;
use livemig_transport::{MemoryMap, TransportError};

use crate::digest::PageHashes;
use crate::dirty::Extent;
use crate::memory::{RamLayout, PAGE_SIZE};
use crate::storage::image::MirrorHook;

/// Most pages in one chunk (1 MiB).
pub const CHUNK_PAGES: u64 = 256;
/// Most pages in one chunk of disk blocks (256 KiB): a mirrored guest write waits for at most
/// one such chunk on the storage lane.
pub const DISK_CHUNK_PAGES: u64 = 64;
/// Mirrored writes queued on the storage lane before a writer waits to queue.
pub const MIRROR_QUEUE_DEPTH: usize = 64;
/// Most extents in one chunk.
pub const CHUNK_EXTENTS: usize = 64;
/// Chunks queued per channel before the scheduler blocks (backpressure).
pub const QUEUE_DEPTH: usize = 4;
/// Chunks between two progress reports.
pub const PROGRESS_EVERY: usize = 32;
/// Framing bytes of a marker message.
pub const MESSAGE_OVERHEAD: u64 = 16;

pub use livemig_transport::codec::thread_cpu_ns;

/// Errors of the data path.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A channel failed.
    #[error("data channel {channel}: {source}")]
    Channel {
        /// Channel index.
        channel: usize,
        /// Transport error.
        #[source]
        source: TransportError,
    },
    /// A channel worker vanished without a report.
    #[error("data channel {0} worker stopped")]
    WorkerGone(usize),
    /// The migration was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Splits extents into chunks of at most `max_pages` pages and `max_extents` extents, in
/// order, each chunk a list of `(gpa, bytes)`.
pub fn chunks(extents: &[Extent], max_pages: u64, max_extents: usize) -> Vec<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(u64, u64)> = Vec::new();
    let mut cur_pages = 0u64;
    for e in extents {
        let mut gpa = e.gpa;
        let mut left = e.pages;
        while left > 0 {
            if cur_pages == max_pages || cur.len() == max_extents {
                out.push(std::mem::take(&mut cur));
                cur_pages = 0;
            }
            let n = left.min(max_pages - cur_pages);
            cur.push((gpa, n * PAGE_SIZE));
            cur_pages += n;
            gpa += n * PAGE_SIZE;
            left -= n;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// What a channel worker drives: one data channel of some transport.
trait ChannelSender: Send + 'static {
    /// Sends the pages of a chunk; returns the bytes put on the wire.
    fn chunk(
        &mut self,
        map: &MemoryMap,
        extents: &[(u64, u64)],
        round: u64,
        stop: &AtomicBool,
    ) -> Result<u64, TransportError>;
    /// Announces zero ranges (never-written holes); returns the bytes put on the wire.
    fn zero(&mut self, extents: &[(u64, u64)]) -> Result<u64, TransportError>;
    /// Ends a round on this channel, which sent `pages` pages in it; returns when the
    /// round's data is delivered as far as this transport's barrier requires, with the bytes
    /// the marker cost.
    fn marker(&mut self, round: u64, pages: u64, stop: &AtomicBool) -> Result<u64, TransportError>;
    /// Codec counters since the last call.
    fn take_stats(&mut self) -> CodecStats;
    /// CPU time of helper threads working for this channel since the last call.
    fn take_helper_cpu_ns(&mut self) -> u64 {
        0
    }
    /// The RAM ranges this channel put on the wire since the last call, as pages sent with
    /// their data and as pages it found zero, where it tells them; None where it does not,
    /// and the worker takes each chunk's pages as sent when it hands them over.
    fn take_sent(&mut self) -> Option<SentRanges> {
        None
    }
    /// The channel failed: cut it so the peer notices.
    fn abort(&mut self);
}

/// RAM ranges put on the wire: `(gpa, bytes)` sent with their data, and found zero (sent as
/// zero markers).
#[derive(Debug, Default)]
struct SentRanges {
    data: Vec<(u64, u64)>,
    zero: Vec<(u64, u64)>,
}

/// A TCP data connection with its page encoder, and with encoders on helper threads when its
/// mode compresses.
struct TcpChannel {
    tx: DataSender,
    enc: Encoder,
    /// What went on the wire since the worker last asked ([`ChannelSender::take_sent`]).
    sent: SentRanges,
    /// Markers say how many pages the round sent (the destination agreed to check).
    counted: bool,
    /// Compressing modes: chunks are encoded on helper threads while this one sends.
    pool: Option<EncodePool>,
}

/// One chunk for an encoding helper: its sequence number, the encoder to use, the pages.
struct EncodeJob {
    seq: u64,
    enc: Encoder,
    extents: Vec<(u64, u64)>,
    round: u64,
}

/// The error of a channel whose encoding helpers are gone.
fn helpers_gone() -> TransportError {
    TransportError::Malformed {
        peer: "this host".into(),
        reason: "the page encoding threads stopped".into(),
    }
}

/// An encoded chunk back from a helper, with the helper's CPU time for it.
type Encoded = (u64, Encoder, Result<(), TransportError>, u64);

/// Encoders on helper threads, so that one connection compresses on several cores: the
/// channel hands each chunk with a free encoder to whichever helper is idle and sends the
/// encoded chunks in the order it handed them out (so a round's marker still follows all of
/// its pages). Twice as many encoders as helpers keep the helpers busy while chunks wait to
/// be sent.
struct EncodePool {
    jobs: Option<Sender<EncodeJob>>,
    done: Receiver<Encoded>,
    free: Vec<Encoder>,
    /// Encoded chunks that came back ahead of their turn.
    ready: std::collections::BTreeMap<u64, (Encoder, Result<(), TransportError>)>,
    next_seq: u64,
    next_send: u64,
    /// Helpers' CPU time not yet reported.
    cpu_ns: u64,
    helpers: Vec<JoinHandle<()>>,
}

impl EncodePool {
    /// `helpers` threads (named after channel `index`) encoding pages of `map` with encoders
    /// made by `make`. None if no thread could be started.
    fn start(
        index: usize,
        helpers: usize,
        map: &MemoryMap,
        make: impl Fn() -> Encoder,
    ) -> Option<EncodePool> {
        let (jobs, rx) = unbounded::<EncodeJob>();
        let (done_tx, done) = unbounded::<Encoded>();
        let threads: Vec<JoinHandle<()>> = (0..helpers)
            .filter_map(|h| {
                let (rx, done_tx, map) = (rx.clone(), done_tx.clone(), map.clone());
                std::thread::Builder::new()
                    .name(format!("livemig-enc{index}.{h}"))
                    .spawn(move || {
                        livemig_transport::codec::lower_thread_priority();
                        for mut job in rx {
                            let cpu = thread_cpu_ns();
                            let r = livemig_transport::tcp::encode_chunk(
                                &map,
                                &job.extents,
                                &mut job.enc,
                                job.round,
                            );
                            let used = thread_cpu_ns().saturating_sub(cpu);
                            if done_tx.send((job.seq, job.enc, r, used)).is_err() {
                                return;
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        if threads.is_empty() {
            return None;
        }
        let free: Vec<Encoder> = (0..2 * threads.len()).map(|_| make()).collect();
        Some(EncodePool {
            jobs: Some(jobs),
            done,
            free,
            ready: std::collections::BTreeMap::new(),
            next_seq: 0,
            next_send: 0,
            cpu_ns: 0,
            helpers: threads,
        })
    }

    /// The next chunk in handing-out order once encoded (waiting for it with `wait`), or None.
    fn next_encoded(&mut self, wait: bool) -> Option<(Encoder, Result<(), TransportError>)> {
        if self.next_send == self.next_seq {
            return None;
        }
        loop {
            if let Some(e) = self.ready.remove(&self.next_send) {
                self.next_send += 1;
                return Some(e);
            }
            let got = if wait {
                self.done.recv().ok()
            } else {
                self.done.try_recv().ok()
            };
            let (seq, enc, r, cpu) = got?;
            self.cpu_ns += cpu;
            self.ready.insert(seq, (enc, r));
        }
    }
}

impl Drop for EncodePool {
    fn drop(&mut self) {
        // Helpers finish the chunk in hand (they read guest RAM, which outlives the pool)
        // and exit once the job queue is closed.
        self.jobs = None;
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

impl TcpChannel {
    /// Sends encoded chunks in order: every one handed out with `all`, else those already
    /// encoded, waiting only while no encoder is free. Returns the bytes put on the wire.
    fn send_encoded_chunks(&mut self, all: bool) -> Result<u64, TransportError> {
        let Some(pool) = self.pool.as_mut() else {
            return Ok(0);
        };
        let mut wire = 0;
        loop {
            let wait = all || pool.free.is_empty();
            let Some((mut enc, r)) = pool.next_encoded(wait) else {
                return Ok(wire);
            };
            let sent = r.and_then(|()| self.tx.send_prepared(&mut enc));
            if sent.is_ok() {
                enc.sent_ranges(&mut self.sent.data, &mut self.sent.zero);
            }
            pool.free.push(enc);
            wire += sent?;
        }
    }
}

impl ChannelSender for TcpChannel {
    fn chunk(
        &mut self,
        map: &MemoryMap,
        extents: &[(u64, u64)],
        round: u64,
        _stop: &AtomicBool,
    ) -> Result<u64, TransportError> {
        if self.pool.is_none() || self.enc.next_chunk_raw() {
            // Inline: no helpers, or `auto` sends this chunk raw (scanning for zero pages is
            // all its encoding, and a hand-off to a helper thread costs more than it saves:
            // loopback, text, 1 GiB, two runs of three: 570 and 534 ms against 736 and 574
            // through the helpers). Chunks handed out before go first.
            let wire = self.send_encoded_chunks(true)?;
            let sent = self.tx.send_encoded(map, extents, &mut self.enc, round)?;
            self.enc
                .sent_ranges(&mut self.sent.data, &mut self.sent.zero);
            return Ok(wire + sent);
        }
        // A free encoder first (sending chunks encoded meanwhile), then the chunk to a helper.
        let mut wire = self.send_encoded_chunks(false)?;
        if let Some(pool) = self.pool.as_mut() {
            let (Some(enc), Some(jobs)) = (pool.free.pop(), pool.jobs.as_ref()) else {
                return Err(helpers_gone());
            };
            let job = EncodeJob {
                seq: pool.next_seq,
                enc,
                extents: extents.to_vec(),
                round,
            };
            jobs.send(job).map_err(|_| helpers_gone())?;
            pool.next_seq += 1;
        }
        wire += self.send_encoded_chunks(false)?;
        Ok(wire)
    }

    fn zero(&mut self, extents: &[(u64, u64)]) -> Result<u64, TransportError> {
        let wire = self.send_encoded_chunks(true)?;
        Ok(wire + self.tx.send_zero(extents, &mut self.enc)?)
    }

    fn marker(
        &mut self,
        round: u64,
        pages: u64,
        _stop: &AtomicBool,
    ) -> Result<u64, TransportError> {
        // The round's pages all go before its marker.
        let wire = self.send_encoded_chunks(true)?;
        if self.counted {
            self.tx
                .send_counted_marker(round, pages)
                .map(|()| wire + MESSAGE_OVERHEAD + 8)
        } else {
            self.tx.send_marker(round).map(|()| wire + MESSAGE_OVERHEAD)
        }
    }

    fn take_stats(&mut self) -> CodecStats {
        let mut stats = self.enc.take_stats();
        if let Some(pool) = self.pool.as_mut() {
            for e in &mut pool.free {
                stats.add(&e.take_stats());
            }
        }
        stats
    }

    fn take_helper_cpu_ns(&mut self) -> u64 {
        self.pool
            .as_mut()
            .map_or(0, |p| std::mem::take(&mut p.cpu_ns))
    }

    fn take_sent(&mut self) -> Option<SentRanges> {
        Some(std::mem::take(&mut self.sent))
    }

    fn abort(&mut self) {
        let _ = self.tx.stream().shutdown(std::net::Shutdown::Both);
    }
}

/// An RDMA queue pair writing into destination RAM; nothing is encoded or copied.
#[cfg(feature = "rdma")]
struct RdmaChannel {
    tx: RdmaSender,
    stats: CodecStats,
    /// The pages any queue pair of this migration has written (shared by all).
    written: Arc<WrittenPages>,
    /// Whether to look for sparse pages.
    gate: SparseGate,
}

/// `extents` as the writes that bring the destination up to date, given that its RAM
/// is zero wherever no write went yet: a zero page never written is left out, a page
/// never written that holds a few short runs of data (a [`PageShape::Sparse`] one) is
/// written as those runs alone, any other page whole. A page the guest writes after it
/// was read here is dirty and goes in a later round (the final one runs with the guest
/// paused), whole if part of it was written.
#[cfg(feature = "rdma")]
fn data_extents(
    written: &WrittenPages,
    map: &MemoryMap,
    extents: &[(u64, u64)],
    gate: &mut SparseGate,
) -> DataExtents {
    let mut out = DataExtents {
        writes: Vec::with_capacity(extents.len()),
        ..DataExtents::default()
    };
    for &(addr, len) in extents {
        let Ok(host) = map.host_ptr(addr, len) else {
            out.writes.push((addr, len)); // the write reports the bad range
            out.whole += len / PAGE_SIZE;
            continue;
        };
        let pages = len / PAGE_SIZE;
        // The open run of whole pages, from this page index.
        let mut run: Option<u64> = None;
        for i in 0..=pages {
            let gpa = addr + i * PAGE_SIZE;
            let shape = if i == pages {
                PageShape::Zero // closes the open run
            } else if written.is_written(gpa) {
                PageShape::Dense
            } else {
                // SAFETY: page `i` lies inside `host..host + len`, a live mapping of
                // `map`, page-aligned. The guest may write it meanwhile: the answer then
                // only decides how this round writes the page, and a written page is
                // dirty.
                let page = unsafe { host.add((i * PAGE_SIZE) as usize) };
                let shape = if gate.look() {
                    // SAFETY: as above.
                    let shape = unsafe { page_shape(page) };
                    if shape != PageShape::Zero {
                        gate.found(matches!(shape, PageShape::Sparse { .. }));
                    }
                    shape
                } else {
                    // SAFETY: as above.
                    let zero = unsafe { is_zero_page(page) };
                    if zero {
                        PageShape::Zero
                    } else {
                        PageShape::Dense
                    }
                };
                if shape != PageShape::Zero {
                    written.mark(gpa);
                }
                shape
            };
            if let (PageShape::Dense, None) = (shape, run) {
                run = Some(i);
            }
            if shape == PageShape::Dense {
                out.whole += 1;
                continue;
            }
            if let Some(s) = run.take() {
                out.writes.push((addr + s * PAGE_SIZE, (i - s) * PAGE_SIZE));
            }
            match shape {
                PageShape::Sparse { runs, n } => {
                    out.sparse += 1;
                    out.writes.extend(
                        runs[..n]
                            .iter()
                            .map(|&(off, l)| (gpa + u64::from(off), u64::from(l))),
                    );
                }
                _ if i < pages => out.skipped += 1,
                _ => {}
            }
        }
    }
    out
}

/// The writes of [`WrittenPages::data_extents`] and what became of the pages.
#[cfg(feature = "rdma")]
#[derive(Debug, Default, PartialEq, Eq)]
struct DataExtents {
    /// `(addr, len)`, in order.
    writes: Vec<(u64, u64)>,
    /// Pages written whole.
    whole: u64,
    /// Pages written as their runs of data.
    sparse: u64,
    /// Zero pages never written: left out.
    skipped: u64,
}

/// The end of `ram`'s highest region: the guest-physical span a [`WrittenPages`] covers.
fn ram_end(ram: &RamLayout) -> u64 {
    ram.regions
        .iter()
        .map(|r| r.gpa + r.size)
        .max()
        .unwrap_or(0)
}

#[cfg(feature = "rdma")]
impl ChannelSender for RdmaChannel {
    fn chunk(
        &mut self,
        map: &MemoryMap,
        extents: &[(u64, u64)],
        _round: u64,
        stop: &AtomicBool,
    ) -> Result<u64, TransportError> {
        let data = data_extents(&self.written, map, extents, &mut self.gate);
        let bytes = if data.writes.is_empty() {
            0
        } else {
            self.tx.write_extents(&data.writes, stop)?
        };
        self.stats.pages_zero += data.skipped;
        self.stats.pages_raw += data.whole;
        self.stats.pages_sparse += data.sparse;
        self.stats.bytes_in += (data.whole + data.sparse) * PAGE_SIZE;
        self.stats.bytes_out += bytes;
        Ok(bytes)
    }

    fn zero(&mut self, extents: &[(u64, u64)]) -> Result<u64, TransportError> {
        // Destination RAM is fresh and zero: holes need no write at all.
        self.stats.pages_zero += extents.iter().map(|e| e.1 / PAGE_SIZE).sum::<u64>();
        Ok(0)
    }

    fn marker(
        &mut self,
        _round: u64,
        _pages: u64,
        stop: &AtomicBool,
    ) -> Result<u64, TransportError> {
        self.tx.flush(stop)?;
        Ok(0)
    }

    fn take_stats(&mut self) -> CodecStats {
        std::mem::take(&mut self.stats)
    }

    fn abort(&mut self) {
        // Nothing to cut: the QP is destroyed when the worker drops it.
    }
}

enum Work {
    /// Pages to read, encode and send, with the round they belong to.
    Chunk(Vec<(u64, u64)>, u64),
    /// Ranges known to be zero (never-written holes): markers only, nothing read.
    Zero(Vec<(u64, u64)>),
    Marker(u64),
    /// A mirrored guest write (storage lane): sent, then the writer is told.
    Mirror(Vec<(u64, u64)>, u64, Sender<()>),
    /// The migration is over.
    Exit,
}

/// A channel worker: takes work from its queue and drives its channel.
struct Worker {
    index: usize,
    ev: Sender<Event>,
    map: MemoryMap,
    stop: Arc<AtomicBool>,
    /// The storage lane's record of what it sent.
    hashes: Option<Arc<PageHashes>>,
    /// Hashes of the RAM pages every lane sent: the digest the destination must match.
    sent: Arc<PageHashes>,
    /// The storage lane's mirrored writes, served first.
    mirror: Option<Receiver<Work>>,
    /// The storage lane: cleared when it stops, so that no guest write waits on it.
    lane_up: Option<Arc<AtomicBool>>,
    /// The thread hashing the RAM pages this worker sent (off the sending path), started
    /// with the worker's first chunk.
    hasher: Option<Hasher>,
    /// The migration's bandwidth cap, shared by its workers.
    limit: Arc<RateLimit>,
}

/// Bytes per second a migration may send, as a shared cell: its holder may change it while
/// the migration runs (a host's bandwidth shared among its migrations in flight); 0: no cap.
pub type Bandwidth = Arc<AtomicU64>;

/// How far ahead of the cap sending may get after a pause (a burst), in time at the cap.
const RATE_BURST: Duration = Duration::from_millis(20);

/// A cap on a migration's sending rate, shared by its workers: a virtual clock advanced by
/// each chunk's bytes at the cap; a worker that gets ahead of it sleeps.
#[derive(Debug)]
pub struct RateLimit {
    rate: Bandwidth,
    /// When the bytes sent so far are paid for at the cap.
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// A limit following `rate`.
    pub fn new(rate: Bandwidth) -> RateLimit {
        RateLimit {
            rate,
            next: Mutex::new(None),
        }
    }

    /// Accounts for `bytes` just sent and waits while sending is ahead of the cap (waking
    /// early when `stop` is set).
    pub fn spend(&self, bytes: u64, stop: &AtomicBool) {
        let rate = self.rate.load(Ordering::Relaxed);
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        if rate == 0 {
            *next = None;
            return;
        }
        let now = Instant::now();
        let from = match *next {
            Some(n) if n + RATE_BURST > now => n,
            _ => now.checked_sub(RATE_BURST).unwrap_or(now),
        };
        let due = from + Duration::from_secs_f64(bytes as f64 / rate as f64);
        *next = Some(due);
        drop(next);
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if due <= now {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
        }
    }
}

/// A thread that hashes sent pages into [`Worker::sent`], in the order they were sent.
struct Hasher {
    jobs: Sender<HashJob>,
    handle: JoinHandle<()>,
}

enum HashJob {
    /// Ranges sent.
    Pages(Vec<(u64, u64)>),
    /// Answer with the CPU time used since the last flush once every earlier job is done.
    Flush(Sender<u64>),
}

impl Hasher {
    fn start(index: usize, map: MemoryMap, sent: Arc<PageHashes>) -> Option<Hasher> {
        let (jobs, rx) = bounded::<HashJob>(8);
        let handle = std::thread::Builder::new()
            .name(format!("livemig-txhash{index}"))
            .spawn(move || {
                let mut cpu = thread_cpu_ns();
                for job in rx {
                    match job {
                        HashJob::Pages(ranges) => {
                            for (addr, len) in ranges {
                                if let Ok(host) = map.host_ptr(addr, len) {
                                    // SAFETY: `host..host + len` lies in a live mapping of
                                    // `map`. The guest may write it meanwhile; such a page is
                                    // dirty, sent again and hashed again by a later job (the
                                    // round's flush orders the jobs of successive rounds), so
                                    // the last hash of every page is taken after its last write
                                    // (the guest is paused for the final round).
                                    unsafe { sent.update(addr, len, host) };
                                }
                            }
                        }
                        HashJob::Flush(done) => {
                            let now = thread_cpu_ns();
                            let _ = done.send(now.saturating_sub(cpu));
                            cpu = now;
                        }
                    }
                }
            })
            .ok()?;
        Some(Hasher { jobs, handle })
    }

    /// Waits until every page sent so far is hashed; the hashing CPU time since the last
    /// flush (None: the hasher is gone).
    fn flush(&self) -> Option<u64> {
        let (done, wait) = bounded(1);
        self.jobs.send(HashJob::Flush(done)).ok()?;
        wait.recv().ok()
    }
}

impl Worker {
    /// The worker stopped: the storage lane lets every mirrored write waiting on it go.
    fn retire(&mut self) {
        if let Some(h) = self.hasher.take() {
            drop(h.jobs);
            let _ = h.handle.join();
        }
        if let Some(up) = &self.lane_up {
            up.store(false, Ordering::SeqCst);
        }
        if let Some(m) = self.mirror.take() {
            while m.try_recv().is_ok() {}
        }
    }
}

impl Worker {
    /// The next work: a mirrored write if one waits (a guest write blocks on it), else
    /// whatever comes first. None once the queue is closed.
    fn next(&mut self, queue: &Receiver<Work>) -> Option<Work> {
        loop {
            let Some(m) = &self.mirror else {
                return queue.recv().ok();
            };
            if let Ok(w) = m.try_recv() {
                return Some(w);
            }
            crossbeam_channel::select! {
                recv(m) -> w => match w {
                    Ok(w) => return Some(w),
                    Err(_) => self.mirror = None,
                },
                recv(queue) -> w => return w.ok(),
            }
        }
    }

    fn run<C: ChannelSender>(&mut self, mut tx: C, queue: &Receiver<Work>) {
        let mut bytes = 0u64;
        let mut pages = 0u64;
        let count = |ext: &[(u64, u64)]| ext.iter().map(|e| e.1 / PAGE_SIZE).sum::<u64>();
        let mut cpu = thread_cpu_ns();
        while let Some(w) = self.next(queue) {
            let r = match w {
                Work::Chunk(ext, round) => self.chunk(&mut tx, &ext, round).map(|b| {
                    bytes += b;
                    pages += count(&ext);
                }),
                Work::Mirror(ext, round, done) => {
                    let r = self.chunk(&mut tx, &ext, round).map(|b| {
                        bytes += b;
                        pages += count(&ext);
                    });
                    let _ = done.send(());
                    r
                }
                Work::Zero(ext) => tx.zero(&ext).map(|b| {
                    // Chunks encoded before went out first.
                    self.hash_sent(&mut tx);
                    for &(addr, len) in &ext {
                        self.sent.clear_nonzero(addr, len, |_, _| {});
                    }
                    bytes += b;
                    pages += count(&ext);
                }),
                Work::Marker(round) => tx
                    .marker(round, std::mem::take(&mut pages), &self.stop)
                    .and_then(|b| {
                        // The round's last chunks went out before its marker; its pages are
                        // all hashed before the round counts as sent.
                        self.hash_sent(&mut tx);
                        let hash_cpu = match &self.hasher {
                            Some(h) => h.flush().ok_or(TransportError::Malformed {
                                peer: "this host".into(),
                                reason: "the page hashing thread stopped".into(),
                            })?,
                            None => 0,
                        };
                        Ok((b, hash_cpu))
                    })
                    .map(|(b, hash_cpu)| {
                        let now = thread_cpu_ns();
                        let _ = self.ev.send(Event::MarkerSent {
                            channel: self.index,
                            round,
                            bytes: bytes + b,
                            codec: tx.take_stats(),
                            cpu_ns: now.saturating_sub(cpu) + hash_cpu + tx.take_helper_cpu_ns(),
                        });
                        cpu = now;
                        bytes = 0;
                    }),
                Work::Exit => return,
            };
            if let Err(error) = r {
                // Every page this worker hashed is hashed before the scheduler hears of the
                // failure: a chunk it re-sends elsewhere is hashed again after that.
                if let Some(h) = self.hasher.take() {
                    drop(h.jobs);
                    let _ = h.handle.join();
                }
                let _ = self.ev.send(Event::Failed {
                    channel: self.index,
                    error,
                });
                tx.abort();
                return;
            }
        }
    }

    /// Hashes the RAM pages `tx` says it has put on the wire since it was last asked: those it
    /// sent with their data by the hashing thread, those it found zero as zero pages, without
    /// reading them again (a page of a chunk handed to an encoding helper goes out later, at
    /// the next call, or at the round's marker). False where `tx` does not tell (RDMA), or on
    /// the storage lane, which hashes its chunks as it hands them over.
    fn hash_sent<C: ChannelSender>(&mut self, tx: &mut C) -> bool {
        let Some(SentRanges { data, zero }) = tx.take_sent() else {
            return false;
        };
        if self.hashes.is_some() {
            return false;
        }
        for (addr, len) in zero {
            self.sent.clear_nonzero(addr, len, |_, _| {});
        }
        if data.is_empty() {
            return true;
        }
        if self.hasher.is_none() {
            self.hasher = Hasher::start(self.index, self.map.clone(), self.sent.clone());
        }
        let data = match &self.hasher {
            Some(h) => match h.jobs.send(HashJob::Pages(data)) {
                Ok(()) => return true,
                Err(e) => match e.into_inner() {
                    HashJob::Pages(d) => d,
                    HashJob::Flush(_) => return true,
                },
            },
            None => data,
        };
        for (addr, len) in data {
            if let Ok(host) = self.map.host_ptr(addr, len) {
                // SAFETY: `host..host + len` lies in a live mapping of `map`. The guest may
                // write it meanwhile; such a page is dirty and is sent and hashed again after
                // the write, so the last hash of every page is taken after its last write (the
                // guest is paused for the final round).
                unsafe { self.sent.update(addr, len, host) };
            }
        }
        true
    }

    /// Sends a chunk, then hashes what it sent (RAM pages, or disk blocks on the storage
    /// lane).
    fn chunk<C: ChannelSender>(
        &mut self,
        tx: &mut C,
        ext: &[(u64, u64)],
        round: u64,
    ) -> Result<u64, TransportError> {
        let b = tx.chunk(&self.map, ext, round, &self.stop)?;
        self.limit.spend(b, &self.stop);
        if self.hash_sent(tx) {
            return Ok(b);
        }
        if self.hashes.is_none() {
            // RAM: hashed by this worker's hashing thread, off the sending path.
            if self.hasher.is_none() {
                self.hasher = Hasher::start(self.index, self.map.clone(), self.sent.clone());
            }
            if let Some(h) = &self.hasher {
                if h.jobs.send(HashJob::Pages(ext.to_vec())).is_ok() {
                    return Ok(b);
                }
            }
        }
        let hashes = self.hashes.as_deref().unwrap_or(&self.sent);
        for &(addr, len) in ext {
            if let Ok(host) = self.map.host_ptr(addr, len) {
                // SAFETY: `host..host + len` lies in a live mapping of `map`. The guest may
                // write it meanwhile; such a page (or block) is dirty or mirrored and is sent
                // and hashed again after the write, so the last hash of every page is taken
                // after its last write (the guest is paused for the final round).
                unsafe { hashes.update(addr, len, host) };
            }
        }
        Ok(b)
    }
}

enum Event {
    MarkerSent {
        channel: usize,
        round: u64,
        bytes: u64,
        codec: CodecStats,
        cpu_ns: u64,
    },
    Failed {
        channel: usize,
        error: TransportError,
    },
}

/// What a round sends.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundWork<'a> {
    /// Guest RAM pages.
    pub ram: &'a [Extent],
    /// Never-written RAM: zero markers, nothing read.
    pub holes: &'a [Extent],
    /// Disk blocks (storage lane).
    pub disk: &'a [Extent],
}

/// What one round moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundStats {
    /// Pages sent (RAM and disk blocks).
    pub pages: u64,
    /// Of which disk blocks.
    pub disk_pages: u64,
    /// Bytes put on the wire (pages plus framing).
    pub wire_bytes: u64,
    /// Time from the first chunk to the last marker written.
    pub elapsed: Duration,
    /// What the encoders did.
    pub codec: CodecStats,
    /// CPU time of the channel workers.
    pub cpu_ns: u64,
    /// Pages of the round left to the next one: the guest wrote them again before their
    /// slice went (set by the source's session, not by the scheduler).
    pub redirtied_left: u64,
}

/// Fans chunks out to channel workers and runs round barriers.
pub struct Scheduler {
    queues: Vec<Sender<Work>>,
    events: Receiver<Event>,
    workers: Vec<JoinHandle<()>>,
    /// Tells workers waiting on their transport (RDMA completions) to give up.
    stop: Arc<AtomicBool>,
    /// Whether the last channel is the storage lane.
    storage: bool,
    /// The storage lane's queue of mirrored writes (served before its other work).
    mirror: Option<Sender<Work>>,
    /// The round being sent (mirrored writes belong to it).
    round: Arc<AtomicU64>,
    /// Hashes of the RAM pages sent so far.
    sent: Arc<PageHashes>,
    /// The storage lane still serves mirrored writes.
    lane_up: Arc<AtomicBool>,
    /// Whether a failed channel is dropped and its unconfirmed chunks re-sent on the others
    /// (RDMA over several rails) instead of failing the migration.
    failover: bool,
    /// Per channel: still up.
    alive: Vec<bool>,
    /// Per channel: bytes it put on the wire (counted at its markers).
    channel_bytes: Vec<u64>,
    /// Channels dropped, with why.
    lost: Vec<(usize, String)>,
}

/// A chunk waiting to be handed out, and whether it is counted yet (a chunk re-sent after its
/// channel failed was counted when first handed out).
type Pending = Option<(Vec<(u64, u64)>, bool)>;

/// Where a round stands: what each channel owes and what must be sent again.
struct RoundState {
    round: u64,
    /// Per channel: chunks handed out since its last confirmed marker (failover only).
    unconfirmed: Vec<Vec<Vec<(u64, u64)>>>,
    /// Per channel: a marker still to be queued.
    need_marker: Vec<bool>,
    /// Per channel: markers queued and not yet confirmed.
    markers_out: Vec<usize>,
    /// Chunks of failed channels, to hand out again.
    again: std::collections::VecDeque<Vec<(u64, u64)>>,
    wire_bytes: u64,
    codec: CodecStats,
    cpu_ns: u64,
}

/// What a select operation of [`Scheduler::send_round`] queues.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Queued {
    Ram,
    Disk,
    Marker,
}

impl Scheduler {
    /// Starts one worker per sender, each with an encoder for `mode` (sharing one delta
    /// cache of `delta_cache_bytes`); `pin` pins worker `i` to core `i % cores`.
    ///
    /// With `storage_hashes`, the last sender is the storage lane: it carries disk blocks
    /// only and records the hash of every page it sent there. With `counted`, each marker
    /// says how many pages its channel sent in the round. The workers send at most `rate`
    /// bytes per second together (0: no cap).
    pub fn new(
        senders: Vec<DataSender>,
        map: MemoryMap,
        ram: &RamLayout,
        (pin, rate): (bool, Bandwidth),
        (mode, delta_cache_bytes): (Mode, u64),
        storage_hashes: Option<Arc<PageHashes>>,
        counted: bool,
    ) -> Scheduler {
        let cache =
            matches!(mode, Mode::Delta | Mode::Auto).then(|| DeltaCache::new(delta_cache_bytes));
        // LZ4, zstd and `auto` encode on every core, however few the connections: each
        // channel gets its share of the cores as encoding helpers. The storage lane keeps
        // encoding inline: a mirrored guest write waits until its blocks are sent.
        let n = senders.len();
        let lane = storage_hashes.is_some() && n >= 2;
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let helpers = (cores / n.max(1)).clamp(1, 8);
        // `auto` still judges whether a codec beats raw by one core's speed: counted once per
        // helper, on this 2-core host (where sealing and the destination need the same cores)
        // it took LZ4 on loopback where raw was faster (mixed RAM, 1 GiB: 560-617 ms against
        // 432-540). The helpers count only in ranking the codecs that do beat raw.
        let compresses = matches!(mode, Mode::Lz4 | Mode::Zstd(_) | Mode::Auto);
        // `auto` and `delta` send a sparse page never sent as its data alone.
        let written = matches!(mode, Mode::Auto | Mode::Delta)
            .then(|| Arc::new(WrittenPages::new(ram_end(ram))));
        let channels = senders
            .into_iter()
            .enumerate()
            .map(|(i, tx)| {
                let mut enc = Encoder::new(mode, cache.clone());
                if let Some(w) = &written {
                    enc = enc.with_written(w.clone());
                }
                let pool = (compresses && !(lane && i == n - 1))
                    .then(|| EncodePool::start(i, helpers, &map, || enc.sibling()))
                    .flatten();
                if let Some(p) = &pool {
                    enc.set_helpers(p.helpers.len());
                }
                TcpChannel {
                    tx,
                    enc,
                    sent: SentRanges::default(),
                    counted,
                    pool,
                }
            })
            .collect();
        Self::start(channels, map, ram, pin, storage_hashes, rate)
    }

    /// Starts one RDMA worker per queue pair (`map` is the memory the senders write from).
    /// With `failover` (several rails), a queue pair that fails is dropped and the chunks it
    /// had not confirmed are written again through the others; the migration fails only when
    /// none is left.
    #[cfg(feature = "rdma")]
    pub fn new_rdma(
        senders: Vec<RdmaSender>,
        map: MemoryMap,
        ram: &RamLayout,
        (pin, failover): (bool, bool),
        rate: Bandwidth,
    ) -> Scheduler {
        let written = Arc::new(WrittenPages::new(ram_end(ram)));
        let channels = senders
            .into_iter()
            .map(|tx| RdmaChannel {
                tx,
                stats: CodecStats::default(),
                written: written.clone(),
                gate: SparseGate::default(),
            })
            .collect();
        let mut s = Self::start(channels, map, ram, pin, None, rate);
        s.failover = failover;
        s
    }

    fn start<C: ChannelSender>(
        senders: Vec<C>,
        map: MemoryMap,
        ram: &RamLayout,
        pin: bool,
        storage_hashes: Option<Arc<PageHashes>>,
        rate: Bandwidth,
    ) -> Scheduler {
        let limit = Arc::new(RateLimit::new(rate));
        let storage = storage_hashes.is_some() && senders.len() >= 2;
        let lanes = senders.len();
        let (ev_tx, events) = unbounded();
        let cores = if pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(PageHashes::new_zeroed(ram));
        let lane_up = Arc::new(AtomicBool::new(true));
        let mut queues = Vec::new();
        let mut workers = Vec::new();
        let (mirror_tx, mirror_rx) = bounded::<Work>(MIRROR_QUEUE_DEPTH);
        for (i, tx) in senders.into_iter().enumerate() {
            let (q_tx, q_rx) = bounded::<Work>(QUEUE_DEPTH);
            queues.push(q_tx);
            let lane = storage && i == lanes - 1;
            let mut worker = Worker {
                index: i,
                ev: ev_tx.clone(),
                map: map.clone(),
                stop: stop.clone(),
                hashes: storage_hashes.clone().filter(|_| lane),
                sent: sent.clone(),
                mirror: lane.then(|| mirror_rx.clone()),
                lane_up: lane.then(|| lane_up.clone()),
                hasher: None,
                limit: limit.clone(),
            };
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("livemig-tx{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    worker.run(tx, &q_rx);
                    worker.retire();
                });
            match handle {
                Ok(h) => workers.push(h),
                Err(_) => {
                    // Without a worker the queue's receiver is gone: the first send to it fails
                    // and reports WorkerGone.
                }
            }
        }
        Scheduler {
            queues,
            events,
            workers,
            stop,
            storage,
            mirror: storage.then_some(mirror_tx),
            round: Arc::new(AtomicU64::new(0)),
            sent,
            lane_up,
            failover: false,
            alive: vec![true; lanes],
            channel_bytes: vec![0; lanes],
            lost: Vec::new(),
        }
    }

    /// Bytes each channel put on the wire so far (counted at its round markers).
    pub fn channel_bytes(&self) -> &[u64] {
        &self.channel_bytes
    }

    /// The channels dropped after failing, with why (RDMA rails: see [`Self::new_rdma`]).
    pub fn lost(&self) -> &[(usize, String)] {
        &self.lost
    }

    /// The digest of the RAM pages sent so far, each as it was when last sent (holes as
    /// zero pages). Once the final round's markers went out with the guest paused, it is
    /// what the destination's RAM must hash to.
    pub fn sent_digest(&self) -> u64 {
        self.sent.digest()
    }

    /// The channels that carry RAM (every channel but the storage lane).
    fn ram_lanes(&self) -> usize {
        self.queues.len() - usize::from(self.storage)
    }

    /// The mirror of disk `index` (storage lane only): a guest write of `(offset, bytes)`
    /// is queued on the lane and returns once the lane sent it (or failed).
    pub fn mirror_hook(&self, index: usize) -> Option<MirrorHook> {
        let lane = self.mirror.clone()?;
        let round = self.round.clone();
        let up = self.lane_up.clone();
        let base = crate::storage::disk_addr(index);
        Some(Arc::new(move |offset: u64, bytes: &[u8]| {
            let start = offset / PAGE_SIZE * PAGE_SIZE;
            let end = (offset + bytes.len() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
            let ext = [Extent {
                gpa: base + start,
                pages: (end - start) / PAGE_SIZE,
            }];
            // The lane may fail at any time: a guest write waits for it only while it is up
            // (otherwise the migration fails, and the write stands).
            const POLL: Duration = Duration::from_millis(50);
            for chunk in chunks(&ext, DISK_CHUNK_PAGES, CHUNK_EXTENTS) {
                let (done, wait) = bounded(1);
                let mut work = Work::Mirror(chunk, round.load(Ordering::Relaxed), done);
                loop {
                    if !up.load(Ordering::SeqCst) {
                        return;
                    }
                    match lane.send_timeout(work, POLL) {
                        Ok(()) => break,
                        Err(crossbeam_channel::SendTimeoutError::Timeout(w)) => work = w,
                        Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return,
                    }
                }
                loop {
                    match wait.recv_timeout(POLL) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout)
                            if up.load(Ordering::SeqCst) => {}
                        _ => break,
                    }
                }
            }
        }))
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.queues.len()
    }

    /// Sends every page of `extents` (RAM) and `disk` (disk blocks, on the storage lane) as
    /// round `round`, then a marker on every channel, and waits until every worker has
    /// written its marker. `on_progress` hears the pages queued so far, every
    /// [`PROGRESS_EVERY`] chunks.
    ///
    /// A chunk goes to whichever RAM channel has room first (work stealing: a slow channel
    /// cannot hold the others up). With failover, a channel that fails is dropped, and the
    /// chunks it had not confirmed with a marker are handed to the others, followed by one
    /// more marker each.
    pub fn send_round(
        &mut self,
        round: u64,
        work: &RoundWork<'_>,
        cancel: &AtomicBool,
        on_progress: &mut dyn FnMut(u64),
    ) -> Result<RoundStats, SchedulerError> {
        let start = Instant::now();
        self.round.store(round, Ordering::Relaxed);
        let n = self.queues.len();
        let mut st = RoundState {
            round,
            unconfirmed: vec![Vec::new(); n],
            need_marker: self.alive.clone(),
            markers_out: vec![0; n],
            again: Default::default(),
            wire_bytes: 0,
            codec: CodecStats::default(),
            cpu_ns: 0,
        };
        let mut pages = self.send_holes(work.holes)?;
        let disk_pages = Extent::total(work.disk);
        // Without a storage lane, disk blocks ride with RAM (each once per round, like pages).
        let (ram, disk) = if self.storage {
            (work.ram.to_vec(), work.disk)
        } else {
            ([work.ram, work.disk].concat(), &[][..])
        };
        let mut ram = chunks(&ram, CHUNK_PAGES, CHUNK_EXTENTS).into_iter();
        let mut disk = chunks(disk, DISK_CHUNK_PAGES, CHUNK_EXTENTS).into_iter();
        let mut next_ram: Pending = None;
        let mut next_disk = disk.next();
        let lane = n - 1;
        let mut sent = 0usize;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(SchedulerError::Cancelled);
            }
            while let Ok(ev) = self.events.try_recv() {
                self.on_event(ev, &mut st)?;
            }
            if next_ram.is_none() {
                next_ram = match st.again.pop_front() {
                    Some(c) => Some((c, false)),
                    None => ram.next().map(|c| (c, true)),
                };
            }
            let mut sel = Select::new();
            let mut ops: Vec<(Queued, usize)> = Vec::new();
            if next_ram.is_some() {
                for ch in (0..self.ram_lanes()).filter(|&c| self.alive[c]) {
                    sel.send(&self.queues[ch]);
                    ops.push((Queued::Ram, ch));
                }
            }
            if next_disk.is_some() {
                sel.send(&self.queues[lane]);
                ops.push((Queued::Disk, lane));
            }
            if next_ram.is_none() && next_disk.is_none() {
                for ch in (0..n).filter(|&c| self.alive[c] && st.need_marker[c]) {
                    sel.send(&self.queues[ch]);
                    ops.push((Queued::Marker, ch));
                }
            }
            if ops.is_empty() {
                // Everything is queued: wait for the markers.
                if (0..n).all(|c| !self.alive[c] || st.markers_out[c] == 0) {
                    break;
                }
                match self.events.recv_timeout(Duration::from_millis(200)) {
                    Ok(ev) => self.on_event(ev, &mut st)?,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        let ch = (0..n).find(|&c| self.alive[c]).unwrap_or(0);
                        return Err(SchedulerError::WorkerGone(ch));
                    }
                }
                continue;
            }
            let Ok(op) = sel.select_timeout(Duration::from_millis(200)) else {
                continue;
            };
            let (what, ch) = ops[op.index()];
            let work = match what {
                Queued::Ram => {
                    let (chunk, fresh) = next_ram.take().expect("a RAM chunk is ready");
                    if fresh {
                        pages += chunk.iter().map(|c| c.1 / PAGE_SIZE).sum::<u64>();
                        sent += 1;
                        if sent % PROGRESS_EVERY == 0 {
                            on_progress(pages);
                        }
                    }
                    if self.failover {
                        st.unconfirmed[ch].push(chunk.clone());
                    }
                    Work::Chunk(chunk, round)
                }
                Queued::Disk => {
                    let chunk = next_disk.take().expect("a disk chunk is ready");
                    pages += chunk.iter().map(|c| c.1 / PAGE_SIZE).sum::<u64>();
                    next_disk = disk.next();
                    sent += 1;
                    if sent % PROGRESS_EVERY == 0 {
                        on_progress(pages);
                    }
                    Work::Chunk(chunk, round)
                }
                Queued::Marker => {
                    st.need_marker[ch] = false;
                    st.markers_out[ch] += 1;
                    Work::Marker(round)
                }
            };
            if op.send(&self.queues[ch], work).is_err() {
                // The worker is gone: it reports why (and, with failover, what it owed is
                // queued again).
                self.await_failure(ch, &mut st)?;
            }
        }
        Ok(RoundStats {
            pages,
            disk_pages,
            wire_bytes: st.wire_bytes,
            elapsed: start.elapsed(),
            codec: st.codec,
            cpu_ns: st.cpu_ns,
            redirtied_left: 0,
        })
    }

    /// Takes one worker event into the round's state.
    fn on_event(&mut self, ev: Event, st: &mut RoundState) -> Result<(), SchedulerError> {
        match ev {
            Event::MarkerSent {
                channel,
                round,
                bytes,
                codec,
                cpu_ns,
            } => {
                self.channel_bytes[channel] += bytes;
                if round == st.round {
                    st.markers_out[channel] = st.markers_out[channel].saturating_sub(1);
                    if st.markers_out[channel] == 0 {
                        st.unconfirmed[channel].clear();
                    }
                    st.wire_bytes += bytes;
                    st.codec.add(&codec);
                    st.cpu_ns += cpu_ns;
                }
                Ok(())
            }
            Event::Failed { channel, error } => self.drop_channel(channel, error, st),
        }
    }

    /// Channel `ch` failed with `error`: the round fails, or (failover, another RAM channel
    /// up) the channel is dropped and what it had not confirmed goes to the others.
    fn drop_channel(
        &mut self,
        ch: usize,
        error: TransportError,
        st: &mut RoundState,
    ) -> Result<(), SchedulerError> {
        let others = (0..self.ram_lanes()).filter(|&c| c != ch && self.alive[c]);
        let lane = self.storage && ch == self.queues.len() - 1;
        if !self.failover || lane || others.count() == 0 {
            return Err(SchedulerError::Channel {
                channel: ch,
                source: error,
            });
        }
        if !self.alive[ch] {
            return Ok(());
        }
        self.alive[ch] = false;
        let owed = std::mem::take(&mut st.unconfirmed[ch]);
        let pages: u64 = owed.iter().flatten().map(|c| c.1 / PAGE_SIZE).sum();
        tracing::warn!(
            "data channel {ch} failed ({error}); dropped, its {pages} unconfirmed pages are              written again through the other channels"
        );
        self.lost.push((ch, error.to_string()));
        st.again.extend(owed);
        st.markers_out[ch] = 0;
        st.need_marker[ch] = false;
        // The pages sent again must pass a barrier too: one more marker on every channel.
        for c in 0..self.queues.len() {
            if self.alive[c] {
                st.need_marker[c] = true;
            }
        }
        Ok(())
    }

    /// A send to `ch` failed (its worker exited): waits for the worker's report and takes it
    /// (and the events before it) into the round's state.
    fn await_failure(&mut self, ch: usize, st: &mut RoundState) -> Result<(), SchedulerError> {
        let until = Instant::now() + Duration::from_secs(1);
        while self.alive[ch] {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => self.on_event(ev, st)?,
                Err(_) => {
                    let gone = TransportError::Malformed {
                        peer: "this host".into(),
                        reason: format!("data channel {ch}'s worker stopped without a report"),
                    };
                    if self.failover {
                        self.drop_channel(ch, gone, st)?;
                    } else {
                        return Err(SchedulerError::WorkerGone(ch));
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues the zero ranges, spread over the RAM channels in large pieces (they cost a
    /// marker each); returns their pages.
    fn send_holes(&mut self, holes: &[Extent]) -> Result<u64, SchedulerError> {
        let up: Vec<usize> = (0..self.ram_lanes()).filter(|&c| self.alive[c]).collect();
        if up.is_empty() {
            return Err(SchedulerError::WorkerGone(0));
        }
        let mut pages = 0;
        for (i, piece) in holes
            .chunks(holes.len().div_ceil(up.len()).max(1))
            .enumerate()
        {
            let ch = up[i % up.len()];
            pages += Extent::total(piece);
            let ranges = piece.iter().map(|e| (e.gpa, e.bytes())).collect();
            if self.queues[ch].send(Work::Zero(ranges)).is_err() {
                return Err(self.failure(ch));
            }
        }
        Ok(pages)
    }

    fn failure(&self, ch: usize) -> SchedulerError {
        match self.events.recv_timeout(Duration::from_secs(1)) {
            Ok(Event::Failed { channel, error }) => SchedulerError::Channel {
                channel,
                source: error,
            },
            _ => SchedulerError::WorkerGone(ch),
        }
    }

    /// Stops the workers (their sockets close, their queue pairs are destroyed when they
    /// exit); a worker waiting for RDMA completions gives up.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        // An explicit exit: a mirror hook may still hold a sender of the storage lane's
        // mirror queue, which keeps the worker's select waiting.
        for q in &self.queues {
            let _ = q.try_send(Work::Exit);
        }
        drop(self.queues);
        drop(self.mirror);
        for w in self.workers {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_paces_senders_and_can_change_while_they_run() {
        let rate: Bandwidth = Arc::new(AtomicU64::new(100_000_000));
        let limit = RateLimit::new(rate.clone());
        let stop = AtomicBool::new(false);
        // 10 MB at 100 MB/s: at least 100 ms less the burst allowance (a lower bound the cap
        // guarantees, not a speed claim).
        let t = Instant::now();
        for _ in 0..10 {
            limit.spend(1_000_000, &stop);
        }
        assert!(
            t.elapsed() >= Duration::from_millis(75),
            "{:?}",
            t.elapsed()
        );
        // No cap: no debt is kept (a GiB at no cap, then a cap, owes nothing).
        rate.store(0, Ordering::Relaxed);
        limit.spend(1 << 30, &stop);
        assert!(limit.next.lock().unwrap().is_none());
        // A stopped migration never sleeps out its debt (1 MB at 1 kB/s would take 17
        // minutes: the test would hang).
        rate.store(1_000, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        limit.spend(1_000_000, &stop);
    }
    #[cfg(feature = "rdma")]
    #[test]
    fn rdma_writes_new_pages_by_their_data_and_old_ones_whole() {
        use livemig_transport::MappedRegion;
        let p = PAGE_SIZE as usize;
        // u64 words: pages are read word by word, aligned.
        let mut words = vec![0u64; p];
        let bytes = words.as_mut_ptr().cast::<u8>();
        // SAFETY: `words` holds 8 * p bytes and outlives `buf` and `map`.
        let buf = unsafe { std::slice::from_raw_parts_mut(bytes, 8 * p) };
        buf[p] = 1; // page 1: one stamp
        buf[2 * p..4 * p].fill(0x5a); // pages 2 and 3: full
        buf[4 * p + p - 1] = 7; // the last byte of page 4

        // SAFETY: `words` outlives `map` (dropped at the end of the test, after it).
        let map = unsafe {
            MemoryMap::new(
                vec![MappedRegion {
                    addr: 0x10_0000,
                    host: buf.as_mut_ptr(),
                    len: buf.len() as u64,
                }],
                Arc::new(()),
            )
        };
        let ram = RamLayout::single(0x10_0000 + 8 * PAGE_SIZE);
        let w = WrittenPages::new(ram_end(&ram));
        let mut gate = SparseGate::default();
        let at = |page: u64| 0x10_0000 + page * PAGE_SIZE;
        let d = data_extents(&w, &map, &[(at(0), 6 * PAGE_SIZE)], &mut gate);
        assert_eq!(
            d,
            DataExtents {
                writes: vec![(at(1), 64), (at(2), 2 * PAGE_SIZE), (at(4) + 4032, 64)],
                whole: 2,
                sparse: 2,
                skipped: 2,
            }
        );
        // Pages 1 and 4 now hold zero: the destination has their old bytes, so they are
        // written again, whole, as are pages 2 and 3; pages never written stay skipped, page 5
        // is new data.
        buf[p] = 0;
        buf[4 * p + p - 1] = 0;
        buf[5 * p + 100] = 3;
        let d = data_extents(&w, &map, &[(at(0), 8 * PAGE_SIZE)], &mut gate);
        assert_eq!(
            d,
            DataExtents {
                writes: vec![(at(1), 4 * PAGE_SIZE), (at(5) + 64, 64)],
                whole: 4,
                sparse: 1,
                skipped: 3,
            }
        );
        // A range outside the map is handed to the write, which reports it.
        let d = data_extents(&w, &map, &[(at(9), PAGE_SIZE)], &mut gate);
        assert_eq!(d.writes, vec![(at(9), PAGE_SIZE)]);
    }

    /// A channel that logs what it sends and can fail at its n-th chunk.
    struct Fake {
        id: usize,
        fail_at: Option<usize>,
        chunks: usize,
        log: Arc<Mutex<Vec<(usize, u64)>>>,
    }

    impl ChannelSender for Fake {
        fn chunk(
            &mut self,
            _: &MemoryMap,
            extents: &[(u64, u64)],
            _: u64,
            _: &AtomicBool,
        ) -> Result<u64, TransportError> {
            self.chunks += 1;
            if Some(self.chunks) == self.fail_at {
                return Err(TransportError::Malformed {
                    peer: "test".into(),
                    reason: "rail cut".into(),
                });
            }
            let mut log = self.log.lock().unwrap();
            let mut bytes = 0;
            for &(addr, len) in extents {
                log.extend((0..len / PAGE_SIZE).map(|i| (self.id, addr / PAGE_SIZE + i)));
                bytes += len;
            }
            Ok(bytes)
        }
        fn zero(&mut self, _: &[(u64, u64)]) -> Result<u64, TransportError> {
            Ok(0)
        }
        fn marker(&mut self, _: u64, _: u64, _: &AtomicBool) -> Result<u64, TransportError> {
            Ok(0)
        }
        fn take_stats(&mut self) -> CodecStats {
            CodecStats::default()
        }
        fn abort(&mut self) {}
    }

    /// A round's outcome, the scheduler, `(channel, page)` sent, pages in all.
    type Outcome = (
        Result<RoundStats, SchedulerError>,
        Scheduler,
        Vec<(usize, u64)>,
        u64,
    );

    /// Three channels over 24 MiB of RAM, channel 1 failing at its second chunk.
    fn failing_round(failover: bool) -> Outcome {
        const PAGES: u64 = 24 * CHUNK_PAGES;
        let buf: &'static mut [u8] =
            Box::leak(vec![0u8; (PAGES * PAGE_SIZE) as usize].into_boxed_slice());
        let regions = vec![livemig_transport::MappedRegion {
            addr: 0,
            host: buf.as_mut_ptr(),
            len: PAGES * PAGE_SIZE,
        }];
        // SAFETY: the buffer is leaked (lives forever) and only read through the map.
        let map = unsafe { MemoryMap::new(regions, Arc::new(())) };
        let log = Arc::new(Mutex::new(Vec::new()));
        let fakes = (0..3)
            .map(|id| Fake {
                id,
                fail_at: (id == 1).then_some(2),
                chunks: 0,
                log: log.clone(),
            })
            .collect();
        let layout = RamLayout::single(PAGES * PAGE_SIZE);
        let mut s = Scheduler::start(
            fakes,
            map,
            &layout,
            false,
            None,
            Arc::new(AtomicU64::new(0)),
        );
        s.failover = failover;
        let ram = [Extent {
            gpa: 0,
            pages: PAGES,
        }];
        let work = RoundWork {
            ram: &ram,
            ..Default::default()
        };
        let r = s.send_round(0, &work, &AtomicBool::new(false), &mut |_| {});
        let sent = log.lock().unwrap().clone();
        (r, s, sent, PAGES)
    }

    #[test]
    fn a_failed_channel_is_dropped_and_its_unconfirmed_chunks_go_through_the_others() {
        let (r, mut s, sent, pages) = failing_round(true);
        let stats = r.expect("the round completes on the other channels");
        assert_eq!(stats.pages, pages, "pages sent again are counted once");
        assert_eq!(s.lost().len(), 1);
        assert_eq!(s.lost()[0].0, 1);
        assert!(s.lost()[0].1.contains("rail cut"), "{:?}", s.lost());
        // Every page was sent by a channel still up (the failed one confirmed nothing).
        let mut by_survivors: Vec<u64> = sent
            .iter()
            .filter(|(c, _)| *c != 1)
            .map(|(_, p)| *p)
            .collect();
        by_survivors.sort_unstable();
        by_survivors.dedup();
        assert_eq!(by_survivors, (0..pages).collect::<Vec<_>>());
        assert_eq!(s.channel_bytes()[1], 0);
        assert_eq!(
            s.channel_bytes()[0] + s.channel_bytes()[2],
            stats.wire_bytes
        );
        // The next round runs on the two left.
        let ram = [Extent {
            gpa: 0,
            pages: 2 * CHUNK_PAGES,
        }];
        let work = RoundWork {
            ram: &ram,
            ..Default::default()
        };
        let st = s
            .send_round(1, &work, &AtomicBool::new(false), &mut |_| {})
            .unwrap();
        assert_eq!(st.pages, 2 * CHUNK_PAGES);
        s.shutdown();
    }

    #[test]
    fn without_failover_a_failed_channel_fails_the_round() {
        let (r, s, _, _) = failing_round(false);
        match r {
            Err(SchedulerError::Channel { channel: 1, source }) => {
                assert!(source.to_string().contains("rail cut"), "{source}")
            }
            other => panic!(
                "expected channel 1 to fail the round: {:?}",
                other.map(|s| s.pages)
            ),
        }
        assert!(s.lost().is_empty());
        s.shutdown();
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chunks_cover_extents_exactly_within_bounds(
            runs in proptest::collection::vec((0u64..4, 1u64..1500), 0..40),
            max_pages in 1u64..600,
            max_extents in 1usize..70,
        ) {
            let mut extents = Vec::new();
            let mut gpa = 0;
            for (gap, pages) in runs {
                gpa += (gap + 1) * PAGE_SIZE;
                extents.push(Extent { gpa, pages });
                gpa += pages * PAGE_SIZE;
            }
            let cs = chunks(&extents, max_pages, max_extents);
            let mut flat: Vec<u64> = Vec::new();
            for c in &cs {
                prop_assert!(!c.is_empty() && c.len() <= max_extents);
                prop_assert!(c.iter().map(|x| x.1).sum::<u64>() <= max_pages * PAGE_SIZE);
                for &(g, len) in c {
                    prop_assert!(len > 0 && len % PAGE_SIZE == 0);
                    flat.extend((0..len / PAGE_SIZE).map(|i| g + i * PAGE_SIZE));
                }
            }
            let want: Vec<u64> = extents.iter().flat_map(|e| (0..e.pages).map(move |i| e.gpa + i * PAGE_SIZE)).collect();
            prop_assert_eq!(flat, want);
        }
    }
}
