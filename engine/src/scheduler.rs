//! The page-scheduler core shared by every transport.
//!
//! ```text
//! DirtyBitmap → extents → chunks (bounded) → channel queues (crossbeam, bounded) → workers
//! ```
//!
//! The scheduler thread only cuts extents into chunks and hands them out; page work (reading
//! guest RAM, syscalls) happens in the channel workers, one per channel, pinned to a core when
//! asked. A round ends with a marker on every channel; the destination's receivers meet at a
//! barrier on each marker, so a page re-sent in round k+1 can never be overtaken by its stale
//! copy from round k on another channel.
//!
//! Workers come in two kinds sharing this core: TCP workers encode chunks and write them to a
//! data connection, and the marker travels in-band; RDMA workers (feature `rdma`) post one-sided
//! RDMA WRITEs for chunks and, at the marker, poll their queue pair's completions until every
//! write of the round completed — reliable-connected completions mean the data is placed in
//! destination RAM, so the barrier holds on the source side (the source then tells the
//! destination over the control channel). Zero ranges cost RDMA nothing: destination RAM
//! starts zero.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use livemig_transport::codec::{CodecStats, DeltaCache, Encoder, Mode};
#[cfg(feature = "rdma")]
use livemig_transport::rdma::RdmaSender;
use livemig_transport::tcp::DataSender;
use livemig_transport::{MemoryMap, TransportError};

use crate::dirty::Extent;
use crate::memory::PAGE_SIZE;

/// Most pages in one chunk (2 MiB).
pub const CHUNK_PAGES: u64 = 256;
/// Most extents in one chunk.
pub const CHUNK_EXTENTS: usize = 64;
/// Chunks queued per channel before the scheduler blocks (backpressure).
pub const QUEUE_DEPTH: usize = 4;
/// Chunks between two progress reports.
pub const PROGRESS_EVERY: usize = 32;
/// Framing bytes of a marker message.
pub const MESSAGE_OVERHEAD: u64 = 16;

/// CPU time consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which is valid.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

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
    /// Ends a round on this channel; returns when the round's data is delivered as far as
    /// this transport's barrier requires, with the bytes the marker cost.
    fn marker(&mut self, round: u64, stop: &AtomicBool) -> Result<u64, TransportError>;
    /// Codec counters since the last call.
    fn take_stats(&mut self) -> CodecStats;
    /// The channel failed: cut it so the peer notices.
    fn abort(&mut self);
}

/// A TCP data connection with its page encoder.
struct TcpChannel {
    tx: DataSender,
    enc: Encoder,
}

impl ChannelSender for TcpChannel {
    fn chunk(
        &mut self,
        map: &MemoryMap,
        extents: &[(u64, u64)],
        round: u64,
        _stop: &AtomicBool,
    ) -> Result<u64, TransportError> {
        self.tx.send_encoded(map, extents, &mut self.enc, round)
    }

    fn zero(&mut self, extents: &[(u64, u64)]) -> Result<u64, TransportError> {
        self.tx.send_zero(extents, &mut self.enc)
    }

    fn marker(&mut self, round: u64, _stop: &AtomicBool) -> Result<u64, TransportError> {
        self.tx.send_marker(round).map(|()| MESSAGE_OVERHEAD)
    }

    fn take_stats(&mut self) -> CodecStats {
        self.enc.take_stats()
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
}

#[cfg(feature = "rdma")]
impl ChannelSender for RdmaChannel {
    fn chunk(
        &mut self,
        _map: &MemoryMap,
        extents: &[(u64, u64)],
        _round: u64,
        stop: &AtomicBool,
    ) -> Result<u64, TransportError> {
        let bytes = self.tx.write_extents(extents, stop)?;
        self.stats.pages_raw += bytes / PAGE_SIZE;
        self.stats.bytes_in += bytes;
        self.stats.bytes_out += bytes;
        Ok(bytes)
    }

    fn zero(&mut self, extents: &[(u64, u64)]) -> Result<u64, TransportError> {
        // Destination RAM is fresh and zero: holes need no write at all.
        self.stats.pages_zero += extents.iter().map(|e| e.1 / PAGE_SIZE).sum::<u64>();
        Ok(0)
    }

    fn marker(&mut self, _round: u64, stop: &AtomicBool) -> Result<u64, TransportError> {
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
}

enum Event {
    MarkerSent {
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

/// What one round moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundStats {
    /// Pages sent.
    pub pages: u64,
    /// Bytes put on the wire (pages plus framing).
    pub wire_bytes: u64,
    /// Time from the first chunk to the last marker written.
    pub elapsed: Duration,
    /// What the encoders did.
    pub codec: CodecStats,
    /// CPU time of the channel workers.
    pub cpu_ns: u64,
}

/// Fans chunks out to channel workers and runs round barriers.
pub struct Scheduler {
    queues: Vec<Sender<Work>>,
    events: Receiver<Event>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    /// Tells workers waiting on their transport (RDMA completions) to give up.
    stop: Arc<AtomicBool>,
}

impl Scheduler {
    /// Starts one worker per sender, each with an encoder for `mode` (sharing one delta
    /// cache of `delta_cache_bytes`); `pin` pins worker `i` to core `i % cores`.
    pub fn new(
        senders: Vec<DataSender>,
        map: MemoryMap,
        pin: bool,
        mode: Mode,
        delta_cache_bytes: u64,
    ) -> Scheduler {
        let cache =
            matches!(mode, Mode::Delta | Mode::Auto).then(|| DeltaCache::new(delta_cache_bytes));
        let channels = senders
            .into_iter()
            .map(|tx| TcpChannel {
                tx,
                enc: Encoder::new(mode, cache.clone()),
            })
            .collect();
        Self::start(channels, map, pin)
    }

    /// Starts one RDMA worker per queue pair (`map` is the memory the senders write from).
    #[cfg(feature = "rdma")]
    pub fn new_rdma(senders: Vec<RdmaSender>, map: MemoryMap, pin: bool) -> Scheduler {
        let channels = senders
            .into_iter()
            .map(|tx| RdmaChannel {
                tx,
                stats: CodecStats::default(),
            })
            .collect();
        Self::start(channels, map, pin)
    }

    fn start<C: ChannelSender>(senders: Vec<C>, map: MemoryMap, pin: bool) -> Scheduler {
        let (ev_tx, events) = unbounded();
        let cores = if pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut queues = Vec::new();
        let mut workers = Vec::new();
        for (i, mut tx) in senders.into_iter().enumerate() {
            let (q_tx, q_rx) = bounded::<Work>(QUEUE_DEPTH);
            queues.push(q_tx);
            let ev = ev_tx.clone();
            let map = map.clone();
            let stop = stop.clone();
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("livemig-tx{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    let mut bytes = 0u64;
                    let mut cpu = thread_cpu_ns();
                    for w in q_rx {
                        let r = match w {
                            Work::Chunk(ext, round) => {
                                tx.chunk(&map, &ext, round, &stop).map(|b| bytes += b)
                            }
                            Work::Zero(ext) => tx.zero(&ext).map(|b| bytes += b),
                            Work::Marker(round) => tx.marker(round, &stop).map(|b| {
                                let now = thread_cpu_ns();
                                let _ = ev.send(Event::MarkerSent {
                                    round,
                                    bytes: bytes + b,
                                    codec: tx.take_stats(),
                                    cpu_ns: now.saturating_sub(cpu),
                                });
                                cpu = now;
                                bytes = 0;
                            }),
                        };
                        if let Err(error) = r {
                            let _ = ev.send(Event::Failed { channel: i, error });
                            tx.abort();
                            return;
                        }
                    }
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
            next: 0,
            stop,
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.queues.len()
    }

    /// Sends every page of `extents` as round `round`, then a marker on every channel, and
    /// waits until every worker has written its marker. `on_progress` hears the pages queued so
    /// far, every [`PROGRESS_EVERY`] chunks.
    pub fn send_round(
        &mut self,
        round: u64,
        extents: &[Extent],
        holes: &[Extent],
        cancel: &AtomicBool,
        on_progress: &mut dyn FnMut(u64),
    ) -> Result<RoundStats, SchedulerError> {
        let start = Instant::now();
        let mut pages = 0u64;
        // Holes first, spread over the channels in large pieces: they cost a marker each.
        for (i, piece) in holes
            .chunks(holes.len().div_ceil(self.queues.len()).max(1))
            .enumerate()
        {
            let ch = i % self.queues.len();
            pages += piece.iter().map(|e| e.pages).sum::<u64>();
            let ranges = piece.iter().map(|e| (e.gpa, e.bytes())).collect();
            if self.queues[ch].send(Work::Zero(ranges)).is_err() {
                return Err(self.failure(ch));
            }
        }
        for (i, chunk) in chunks(extents, CHUNK_PAGES, CHUNK_EXTENTS)
            .into_iter()
            .enumerate()
        {
            if cancel.load(Ordering::Relaxed) {
                return Err(SchedulerError::Cancelled);
            }
            if i % PROGRESS_EVERY == PROGRESS_EVERY - 1 {
                on_progress(pages);
            }
            pages += chunk.iter().map(|c| c.1 / PAGE_SIZE).sum::<u64>();
            let ch = self.next % self.queues.len();
            self.next += 1;
            if self.queues[ch].send(Work::Chunk(chunk, round)).is_err() {
                return Err(self.failure(ch));
            }
        }
        for ch in 0..self.queues.len() {
            if self.queues[ch].send(Work::Marker(round)).is_err() {
                return Err(self.failure(ch));
            }
        }
        let mut pending = self.queues.len();
        let mut wire_bytes = 0;
        let mut codec = CodecStats::default();
        let mut cpu_ns = 0;
        while pending > 0 {
            match self.events.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::MarkerSent {
                    round: r,
                    bytes,
                    codec: c,
                    cpu_ns: t,
                }) if r == round => {
                    pending -= 1;
                    wire_bytes += bytes;
                    codec.add(&c);
                    cpu_ns += t;
                }
                Ok(Event::MarkerSent { .. }) => {}
                Ok(Event::Failed { channel, error }) => {
                    return Err(SchedulerError::Channel {
                        channel,
                        source: error,
                    })
                }
                Err(_) if cancel.load(Ordering::Relaxed) => return Err(SchedulerError::Cancelled),
                Err(_) => {}
            }
        }
        Ok(RoundStats {
            pages,
            wire_bytes,
            elapsed: start.elapsed(),
            codec,
            cpu_ns,
        })
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
        drop(self.queues);
        for w in self.workers {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
