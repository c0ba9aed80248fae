//! Page encodings for data channels: zero-page markers, LZ4, zstd, delta against the last
//! version sent, and `auto`, which picks per chunk.
//!
//! The [`Encoder`] runs in a channel worker (never on the scheduler thread). It reads guest
//! pages in place to find zero pages; pages it compresses are first copied into a staging
//! buffer (the guest may write them meanwhile, and a compressor must see stable bytes); raw
//! pages go to the socket straight from guest memory. Every encoded body carries its raw length
//! and the decoders check it exactly: a corrupt or oversized body is an error, never a panic
//! and never a write past its page range.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Page size the codecs work in.
pub const PAGE: usize = 4096;

/// How a channel encodes pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pages raw (zero pages are markers, as in every mode).
    None,
    /// Zero-page markers only; the same wire bytes as `None`, named for clarity.
    Zero,
    /// LZ4 block compression per run of pages.
    Lz4,
    /// zstd at the given level per run of pages.
    Zstd(i32),
    /// Pages re-sent in later rounds travel as the bytes that changed since the version last
    /// sent (bounded cache); others raw.
    Delta,
    /// Per chunk: zero markers, delta for cached pages, LZ4 or zstd (at one of two levels)
    /// when measured speeds and ratios say it pays, raw otherwise.
    Auto,
}

impl Mode {
    /// `auto`, the default of requests that name no mode.
    pub fn default_for_requests() -> Mode {
        Mode::Auto
    }

    /// zstd level of plain `zstd`.
    pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
    /// Every mode's name, as the command line and the control socket spell it.
    pub const NAMES: &'static [&'static str] = &["none", "zero", "lz4", "zstd", "delta", "auto"];

    /// Name as used on the command line (without the zstd level).
    pub fn name(&self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Zero => "zero",
            Mode::Lz4 => "lz4",
            Mode::Zstd(_) => "zstd",
            Mode::Delta => "delta",
            Mode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Zstd(l) if *l != Mode::DEFAULT_ZSTD_LEVEL => write!(f, "zstd:{l}"),
            m => f.write_str(m.name()),
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    /// `none`, `zero`, `lz4`, `zstd` (level 3), `zstd:N` (N in 1..=19), `delta` or `auto`.
    fn from_str(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "none" => Mode::None,
            "zero" => Mode::Zero,
            "lz4" => Mode::Lz4,
            "zstd" => Mode::Zstd(Mode::DEFAULT_ZSTD_LEVEL),
            "delta" => Mode::Delta,
            "auto" => Mode::Auto,
            other => match other.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(l)) if (1..=19).contains(&l) => Mode::Zstd(l),
                _ => {
                    return Err(format!(
                        "unknown compression {other:?} (none, zero, lz4, zstd, zstd:1..19, delta, auto)"
                    ))
                }
            },
        })
    }
}

impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Encoding of one entry on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// Raw bytes, received straight into place.
    Raw = 1,
    /// All-zero pages; no body.
    Zero = 2,
    /// LZ4 block.
    Lz4 = 3,
    /// zstd frame.
    Zstd = 4,
    /// Delta: `(unchanged: varint, changed: varint, changed bytes)*` over one page.
    Delta = 5,
}

impl Encoding {
    /// Parses a wire byte.
    pub fn from_u8(v: u8) -> Option<Encoding> {
        Some(match v {
            1 => Encoding::Raw,
            2 => Encoding::Zero,
            3 => Encoding::Lz4,
            4 => Encoding::Zstd,
            5 => Encoding::Delta,
            _ => return None,
        })
    }
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The compressed body is corrupt.
    #[error("corrupt {codec} body: {reason}")]
    Corrupt {
        /// Codec name.
        codec: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// The body decodes to another size than announced.
    #[error("{codec} body decodes to {got} bytes, entry says {want}")]
    WrongSize {
        /// Codec name.
        codec: &'static str,
        /// Bytes produced.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
}

/// Per-codec counters of one channel (added up by the engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodecStats {
    /// Pages sent raw.
    pub pages_raw: u64,
    /// Pages sent as zero markers.
    pub pages_zero: u64,
    /// Pages sent LZ4-compressed.
    pub pages_lz4: u64,
    /// Pages sent zstd-compressed.
    pub pages_zstd: u64,
    /// Pages sent as deltas.
    pub pages_delta: u64,
    /// Pages sent as their runs of data alone, into a copy known to be zero (RDMA writes
    /// per run; TCP deltas against zero).
    pub pages_sparse: u64,
    /// Bytes of non-zero pages before encoding.
    pub bytes_in: u64,
    /// Payload bytes after encoding (framing excluded).
    pub bytes_out: u64,
    /// Page bytes copied into staging buffers (to compress them).
    pub bytes_staged: u64,
}

impl CodecStats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &CodecStats) {
        self.pages_raw += o.pages_raw;
        self.pages_zero += o.pages_zero;
        self.pages_lz4 += o.pages_lz4;
        self.pages_zstd += o.pages_zstd;
        self.pages_delta += o.pages_delta;
        self.pages_sparse += o.pages_sparse;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.bytes_staged += o.bytes_staged;
    }
}

/// Last-sent versions of re-sent pages, shared by every channel of a migration, bounded.
#[derive(Debug)]
pub struct DeltaCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

#[derive(Debug, Default)]
struct Shard {
    pages: HashMap<u64, Box<[u8]>>,
    order: VecDeque<u64>,
}

const SHARDS: usize = 64;

impl DeltaCache {
    /// A cache of at most `bytes` of pages.
    pub fn new(bytes: u64) -> Arc<DeltaCache> {
        let pages = (bytes / PAGE as u64).max(SHARDS as u64) as usize;
        Arc::new(DeltaCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: pages / SHARDS,
        })
    }

    fn shard(&self, addr: u64) -> std::sync::MutexGuard<'_, Shard> {
        let i = ((addr / PAGE as u64) as usize).wrapping_mul(0x9e37_79b9) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn contains(&self, addr: u64) -> bool {
        self.shard(addr).pages.contains_key(&addr)
    }

    /// Encodes `new` against the cached version of `addr` into `out` (cleared first) and
    /// caches `new`. Returns false (leaving the cache updated) when the page was not cached or
    /// the delta would not be smaller than `limit`.
    fn delta_and_update(&self, addr: u64, new: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
        let mut s = self.shard(addr);
        let hit = match s.pages.get_mut(&addr) {
            Some(old) => {
                let ok = delta_encode(old, new, out, limit);
                old.copy_from_slice(new);
                ok
            }
            None => {
                if s.pages.len() >= self.per_shard {
                    if let Some(victim) = s.order.pop_front() {
                        s.pages.remove(&victim);
                    }
                }
                s.pages.insert(addr, new.into());
                s.order.push_back(addr);
                false
            }
        };
        hit
    }

    fn insert(&self, addr: u64, page: &[u8]) {
        let _ = self.delta_and_update(addr, page, &mut Vec::new(), 0);
    }
}

/// One entry the encoder produced: where its body comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body {
    /// Straight from guest memory.
    Guest(*const u8),
    /// From the encoder's output buffer at this offset.
    Out(usize),
    /// No body (zero pages).
    None,
}

/// An encoded entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub addr: u64,
    pub raw_len: u64,
    pub enc_len: u64,
    pub encoding: Encoding,
    pub body: Body,
}

/// What `auto` learned: its measurements and the link's recent rates.
#[derive(Debug)]
struct Learned {
    auto: Auto,
    rates: [f64; RATE_WINDOW],
    /// Whether the receiver held the connection back in each of those samples.
    receiver_bound: [bool; RATE_WINDOW],
    next_rate: usize,
    /// Bytes the channel had queued but not yet sent, just before its last send.
    backlog: u64,
    /// Sends recorded, and those after which the queue held [`UNMEASURED_BACKLOG`] or more.
    sends: u64,
    long_sends: u64,
    /// Threads compressing the channel's chunks side by side (see [`Encoder::set_helpers`]).
    helpers: usize,
}

/// What `auto` measured of one codec on this content (EWMAs; zero until probed).
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// Input bytes per second of the compressing thread's CPU time: the codec's own speed,
    /// whatever else wanted the cores.
    cpu: f64,
    /// Input bytes per second of wall-clock time: what the codec delivered on the cores it
    /// got (the channel's other encoders, sealing and, on one host, the destination share
    /// them).
    wall: f64,
    /// Output bytes over input bytes.
    ratio: f64,
    /// As `cpu`, in probes only: every codec is probed alike (once in [`AUTO_PROBE_EVERY`]
    /// chunks, its caches cold), while the chosen one also runs on every other chunk, warm.
    /// Codecs are compared by this (on text here, level-3 zstd probed among level-1 chunks
    /// measured 660-810 MB/s, 840-870 when it ran on every chunk, level 1 about 1 100).
    probed: f64,
}

/// How to compress one chunk.
#[derive(Debug, Clone, Copy)]
struct Compress {
    encoding: Encoding,
    /// zstd: `auto`'s stronger level.
    strong: bool,
    /// One of `auto`'s probes.
    probe: bool,
}

/// A compressor `auto` can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCodec {
    /// LZ4.
    Lz4,
    /// zstd at [`AUTO_ZSTD_FAST`]: the cheaper of the two zstd levels.
    ZstdFast,
    /// zstd at [`Mode::DEFAULT_ZSTD_LEVEL`], the level of plain `zstd`: fewer bytes on a
    /// link that is slower than the cores (on text here, 30 % fewer than level 1, at 75-100 %
    /// of its speed).
    ZstdStrong,
}

impl AutoCodec {
    /// The wire encoding it produces (both zstd levels decode alike).
    pub fn encoding(self) -> Encoding {
        match self {
            AutoCodec::Lz4 => Encoding::Lz4,
            AutoCodec::ZstdFast | AutoCodec::ZstdStrong => Encoding::Zstd,
        }
    }
}

/// `auto` probes each codec once in this many chunks while a codec is chosen.
const AUTO_PROBE_EVERY: u64 = 64;

/// ... and, while the probes keep finding raw best (a link faster than the codecs, or one
/// whose queue stays short before it is measured: the sender is the bottleneck), each gap this
/// many times the one before, up to [`AUTO_PROBE_EVERY_MAX`] chunks: there no codec runs
/// but the probes, which on loopback here cost 15 % of the time of 1 GiB of text (a probe
/// set every 64 chunks: 48 MiB compressed at about 1 GB/s on cores busy sealing and sending;
/// 10 pairs, median 1.16x the time of `none`; 1.02x with no probes after the first set, 0.94x
/// with these gaps; behind shaped 10 GbE, two connections, where `auto` compresses a fifth,
/// level with the fixed gap: 6 pairs, median 1.02x). A slower link needs no probe to be
/// noticed (the remembered speeds and ratios are weighed against every new link sample); new
/// content does, within the gap.
const AUTO_PROBE_BACKOFF: u64 = 4;
/// The longest gap between probe sets (1 GiB at 1 MiB chunks).
const AUTO_PROBE_EVERY_MAX: u64 = 1024;

/// When `auto` probes: the chunk numbers of the next probe set and the gap after it.
#[derive(Debug, Clone, Copy)]
struct ProbeSchedule {
    /// The chunk (counted from 1) that probes the first codec of the next set.
    next: u64,
    /// Chunks from this set's first to the next set's.
    every: u64,
}

impl ProbeSchedule {
    const CODECS: [AutoCodec; 3] = [AutoCodec::Lz4, AutoCodec::ZstdFast, AutoCodec::ZstdStrong];

    fn new() -> Self {
        ProbeSchedule {
            next: 1,
            every: AUTO_PROBE_EVERY,
        }
    }

    /// The codec `auto` probes on its `chunk`-th chunk, if any: each codec once per set, the
    /// first chunks first, even while it sends raw, to notice when the content changes.
    fn probed_at(&self, chunk: u64) -> Option<AutoCodec> {
        let i = chunk.checked_sub(self.next)?;
        Self::CODECS.get(usize::try_from(i).ok()?).copied()
    }

    /// Whether `chunk` is the first after the current set: time to schedule the next one.
    fn set_done(&self, chunk: u64) -> bool {
        chunk == self.next + Self::CODECS.len() as u64
    }

    /// Schedules the next set after the one just done: a longer gap when `raw_wins` (no codec
    /// chosen as things stand), the shortest otherwise.
    fn reschedule(&mut self, raw_wins: bool) {
        self.next += self.every;
        self.every = if raw_wins {
            (self.every * AUTO_PROBE_BACKOFF).min(AUTO_PROBE_EVERY_MAX)
        } else {
            AUTO_PROBE_EVERY
        };
    }
}

/// Adaptive state of `auto`.
#[derive(Debug, Clone, Copy)]
struct Auto {
    /// LZ4.
    lz4: Seen,
    /// zstd at [`AUTO_ZSTD_FAST`].
    zstd: Seen,
    /// zstd at [`Mode::DEFAULT_ZSTD_LEVEL`].
    zstd_strong: Seen,
    /// Socket bytes per second (windowed maximum).
    link_speed: f64,
    chunks: u64,
    probes: ProbeSchedule,
}

/// The faster of `auto`'s two zstd levels.
pub const AUTO_ZSTD_FAST: i32 = 1;

/// Before the link is measured, `auto` sends raw only while the channel's queue holds less
/// than this: a longer queue says the link is behind already, and the socket buffer (8 MiB)
/// would otherwise fill with raw pages before the first rate sample.
pub const UNMEASURED_BACKLOG: u64 = 512 << 10;

/// ... and, after the first [`UNMEASURED_EARLY_SENDS`] sends, only where the queue was that
/// long after at least this share of the sends: a queue that builds for a moment (the receiver
/// busy) is no reason to compress. On loopback here the link went unmeasured for hundreds of
/// chunks, its queue long after 2-4 % of the sends, and such moments made `auto` compress up
/// to 99 % of 1 GiB of text with zstd level 3, the best ratio (`bench`, 8 runs: 618-1096 ms,
/// median 805); behind a shaped 10 Gbit/s link the queue was long after 5-27 % of a
/// connection's first 19-51 sends (70 % of all), and compressing then is what put `auto`
/// ahead of `none` there.
pub const UNMEASURED_LONG_SHARE: f64 = 0.1;
/// The sends over which a long queue alone counts.
pub const UNMEASURED_EARLY_SENDS: u64 = 16;

/// A channel's encoder.
pub struct Encoder {
    mode: Mode,
    cache: Option<Arc<DeltaCache>>,
    stage: Vec<u8>,
    pub(crate) out: Vec<u8>,
    tmp: Vec<u8>,
    pub(crate) entries: Vec<Entry>,
    /// What `auto` learned, shared by the encoders of one channel (see [`Encoder::sibling`]).
    learned: Arc<Mutex<Learned>>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// `auto`'s second zstd level ([`AutoCodec::ZstdStrong`]).
    zstd_strong: Option<zstd::bulk::Compressor<'static>>,
    /// The pages sent as data by any channel of the migration (see
    /// [`Encoder::with_written`]).
    written: Option<Arc<WrittenPages>>,
    /// Whether to look for sparse pages.
    gate: SparseGate,
    /// Counters since the last [`Encoder::take_stats`].
    pub stats: CodecStats,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("mode", &self.mode)
            .field("stats", &self.stats)
            .finish()
    }
}

// SAFETY: `Entry::Body::Guest` pointers are only kept between `encode` and the send of the
// same chunk; they point into guest memory that stays mapped for the whole migration, and an
// encoder moves between threads (an encoding helper and its channel) only through channels,
// which order the encode before the send. The encoder holds no other thread-bound state.
unsafe impl Send for Encoder {}

impl Encoder {
    /// An encoder for `mode`; `cache` is needed by `Delta` and used by `Auto` when given.
    pub fn new(mode: Mode, cache: Option<Arc<DeltaCache>>) -> Encoder {
        let zstd = match mode {
            Mode::Zstd(level) => zstd::bulk::Compressor::new(level).ok(),
            Mode::Auto => zstd::bulk::Compressor::new(AUTO_ZSTD_FAST).ok(),
            _ => None,
        };
        let zstd_strong = (mode == Mode::Auto)
            .then(|| zstd::bulk::Compressor::new(Mode::DEFAULT_ZSTD_LEVEL).ok())
            .flatten();
        Encoder {
            mode,
            cache,
            stage: Vec::new(),
            out: Vec::new(),
            tmp: Vec::new(),
            entries: Vec::new(),
            learned: Arc::new(Mutex::new(Learned {
                auto: Auto {
                    lz4: Seen::default(),
                    zstd: Seen::default(),
                    zstd_strong: Seen::default(),
                    link_speed: 0.0,
                    chunks: 0,
                    probes: ProbeSchedule::new(),
                },
                rates: [0.0; RATE_WINDOW],
                receiver_bound: [false; RATE_WINDOW],
                next_rate: 0,
                backlog: 0,
                helpers: 1,
                sends: 0,
                long_sends: 0,
            })),
            zstd,
            zstd_strong,
            written: None,
            gate: SparseGate::default(),
            stats: CodecStats::default(),
        }
    }

    /// This encoder, keeping track of the pages sent as data in `written` (shared by the
    /// migration's channels): in `auto` and `delta` modes, a page never sent that is sparse
    /// ([`page_shape`]) goes as a delta against the zero page the destination holds — its
    /// runs of data alone, applied in place there — unless a codec compresses the chunk.
    pub fn with_written(mut self, written: Arc<WrittenPages>) -> Encoder {
        self.written = Some(written);
        self
    }

    /// Another encoder for the same channel: same mode and delta cache, and one memory of
    /// what `auto` learned (codec speeds and ratios, the link's rate, the probing schedule),
    /// so that encoders working for one connection on several threads choose as one would.
    /// Its counters start at zero.
    pub fn sibling(&self) -> Encoder {
        let mut e = Encoder::new(self.mode, self.cache.clone());
        e.learned = self.learned.clone();
        e.written = self.written.clone();
        e
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.learned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Appends the ranges of the chunk encoded last, as pages sent with their data (`data`)
    /// and as zero pages (`zero`), each run of like entries as one range.
    pub fn sent_ranges(&self, data: &mut Vec<(u64, u64)>, zero: &mut Vec<(u64, u64)>) {
        for e in &self.entries {
            let to = if e.encoding == Encoding::Zero {
                &mut *zero
            } else {
                &mut *data
            };
            match to.last_mut() {
                Some((a, l)) if *a + *l == e.addr => *l += e.raw_len,
                _ => to.push((e.addr, e.raw_len)),
            }
        }
    }

    /// Returns and resets the counters.
    pub fn take_stats(&mut self) -> CodecStats {
        std::mem::take(&mut self.stats)
    }

    /// Records a sample of the link's rate in bytes per second (feeds `auto`), and whether
    /// the receiver held the connection back in it (see [`Encoder::auto_choice`]).
    ///
    /// Samples taken while the sender was the bottleneck (compressing, say) understate the
    /// link, so the estimate is the maximum of the last [`RATE_WINDOW`] samples, as BBR keeps
    /// its bandwidth filter.
    pub fn record_link_sample(&mut self, rate: f64, receiver_bound: bool) {
        if rate > 0.0 {
            let mut l = self.learned();
            let i = l.next_rate % RATE_WINDOW;
            l.rates[i] = rate;
            l.receiver_bound[i] = receiver_bound;
            l.next_rate += 1;
            l.auto.link_speed = l.rates.iter().copied().fold(0.0, f64::max);
        }
    }

    /// Tells `auto` that `n` threads compress this channel's chunks side by side (the
    /// encoders of [`Encoder::sibling`] on helper threads): codecs that beat raw are ranked
    /// by what `n` of them deliver together (see [`Encoder::auto_choice`]).
    pub fn set_helpers(&mut self, n: usize) {
        self.learned().helpers = n.max(1);
    }

    /// Records the bytes the channel has queued but not yet sent just before a send: what the
    /// link did not drain while the chunk was prepared (feeds `auto` while the link is not
    /// measured yet).
    pub fn record_backlog(&mut self, bytes: u64) {
        let mut l = self.learned();
        l.backlog = bytes;
        l.sends += 1;
        l.long_sends += u64::from(bytes >= UNMEASURED_BACKLOG);
    }

    /// The channel's queue as last recorded by [`Encoder::record_backlog`].
    #[cfg(test)]
    pub(crate) fn backlog(&self) -> u64 {
        self.learned().backlog
    }

    /// The codec `auto` uses now: None for raw, else LZ4 or zstd at one of two levels.
    ///
    /// Compressing can overlap with the socket draining what was queued before, so a codec of
    /// speed C and ratio r moves up to min(C, L / r) raw bytes per second against L raw, and
    /// at least 1 / (1 / C + r / L), one after the other, where no core is spare. The codecs
    /// that beat raw by 10% by the second, at the speed they deliver on the cores they get
    /// (wall clock), compete; the one that moves the most wins, with C now the codec's CPU
    /// speed in probes (a fair comparison: the chosen one also runs on every other chunk,
    /// with warm caches and beside the other encoders, so neither its wall-clock speed nor its
    /// overall CPU speed compares with the others') times the threads that compress side by
    /// side ([`Encoder::set_helpers`]), and the two times, compressing and sending, combined
    /// as their root sum of squares; raw if none beats raw. Until the link is measured it is
    /// raw — raw writes fill the socket queue and so measure the link — as long as the queue
    /// is short ([`UNMEASURED_BACKLOG`]); with a longer one — that is not a moment's
    /// ([`UNMEASURED_LONG_SHARE`]) — the probed codec with the best ratio (raw if none
    /// compresses). Probes measure the codecs.
    ///
    /// Raw, too, while most of the recent link samples were taken with the receiver holding
    /// the connection back (its receive window full): the rate measured is then the receiving
    /// threads' pace, not the network's, and the model's premise — fewer bytes on the wire
    /// move RAM faster — does not hold: the receiver still takes in every page, and decodes
    /// a compressed chunk where a raw one lands straight in guest RAM. Where both ends share
    /// the cores (one host, or the nested VM's two) the codec's own work comes off the
    /// receiver's too: in the nested VM, a 256 MiB Linux guest with LZ4 on 60 % of its pages
    /// took 2745 and 3124 ms against 2180 and 2019 raw.
    pub fn auto_choice(&self) -> Option<AutoCodec> {
        let (a, backlog, persistent, receiver_bound, helpers) = {
            let l = self.learned();
            let persistent = l.sends <= UNMEASURED_EARLY_SENDS
                || l.long_sends as f64 >= l.sends as f64 * UNMEASURED_LONG_SHARE;
            let samples = l.next_rate.min(RATE_WINDOW);
            let bound = l.receiver_bound[..samples].iter().filter(|b| **b).count();
            (
                l.auto,
                l.backlog,
                persistent,
                samples > 0 && 2 * bound > samples,
                l.helpers as f64,
            )
        };
        if receiver_bound {
            return None;
        }
        let usable = |s: &Seen| s.cpu > 0.0 && s.ratio < 0.95;
        let candidates = [
            (AutoCodec::Lz4, a.lz4),
            (AutoCodec::ZstdFast, a.zstd),
            (AutoCodec::ZstdStrong, a.zstd_strong),
        ];
        let usable = candidates
            .into_iter()
            .filter(|(c, s)| self.has(*c) && usable(s));
        if a.link_speed == 0.0 {
            if backlog < UNMEASURED_BACKLOG || !persistent {
                return None;
            }
            // The best ratio (the first of equals: the cheaper codec).
            return usable
                .min_by(|x, y| x.1.ratio.total_cmp(&y.1.ratio))
                .map(|(c, _)| c);
        }
        // Whether a codec beats raw, judged without counting on a spare core: a chunk's
        // compression and the sending of its output one after the other. Where the link is
        // many times slower than the codec the two models agree; where they are close, the
        // overlapped one promised LZ4 1.25x over raw on loopback here (mixed RAM: 2.1 GB/s,
        // ratio 0.62, link 1.7 GB/s), on a host whose cores were all busy already sending,
        // sealing and receiving.
        let serial = |s: &Seen| 1.0 / (1.0 / s.wall.max(1.0) + s.ratio / a.link_speed);
        // Among the codecs that beat raw by 10 % so at the speed they deliver on the cores
        // they get (wall clock), the one that moves the most raw bytes (the first of equals:
        // the cheaper codec). A codec best by CPU speed that delivers too little here does not
        // send the chunk raw while another one beats raw.
        //
        // Moving a byte takes compressing it — at the CPU speed in probes, on as many threads
        // as compress side by side — and sending its output over the link. The two overlap,
        // but not wholly: the cores that compress also seal and send every output byte and,
        // on one host, receive it. So the time is neither the larger of the two (overlapped,
        // min(C, L / r) as a rate) nor their sum (one after the other), but their root sum of
        // squares: the larger where one dominates, 1.41 times it where they are equal. Ranked
        // by the overlapped model, `auto` took zstd level 1 over level 3 on 1 GbE text (probed
        // 1.04-1.09 against 0.77-0.92 GB/s; ratios 0.070 and 0.050: the link then close to
        // busy with level 1's output) and was 1.09-1.12x slower than fixed level 3 (medians
        // of 8 and 10 pairs); ranked so, it takes level 3 there and gained 4 % (0.96x, 10
        // pairs, 9 faster), 1.05x fixed level 3's time.
        let moves = |s: &Seen| {
            let cpu = 1.0 / (s.probed * helpers).max(1.0);
            let link = s.ratio / a.link_speed;
            1.0 / cpu.hypot(link)
        };
        usable
            .filter(|(_, s)| serial(s) >= a.link_speed * 1.1)
            .fold(None, |best: Option<(AutoCodec, Seen)>, (c, s)| match best {
                Some((_, b)) if moves(&b) >= moves(&s) => best,
                _ => Some((c, s)),
            })
            .map(|(c, _)| c)
    }

    /// Whether this encoder has `codec`'s compressor.
    fn has(&self, codec: AutoCodec) -> bool {
        match codec {
            AutoCodec::Lz4 => true,
            AutoCodec::ZstdFast => self.zstd.is_some(),
            AutoCodec::ZstdStrong => self.zstd_strong.is_some(),
        }
    }

    /// Whether `auto` sends the next chunk raw as things stand (no probe due, no codec
    /// chosen): scanning for zero pages is then all the encoding there is, and a channel does
    /// it inline rather than hand the chunk to a helper thread. False in other modes.
    pub fn next_chunk_raw(&self) -> bool {
        if self.mode != Mode::Auto {
            return false;
        }
        let probe = {
            let l = self.learned();
            l.auto.probes.probed_at(l.auto.chunks + 1)
        };
        probe.is_none() && self.auto_choice().is_none()
    }

    /// Encodes the pages of `extents` (`(addr, len)`, page multiples; `host` gives each
    /// extent's host address) into entries. `round` > 0 means pages may have been sent before.
    ///
    /// # Safety
    ///
    /// Every `host` pointer must be valid for reads of its extent's length until the entries
    /// are sent.
    pub(crate) unsafe fn encode(&mut self, extents: &[(u64, u64, *const u8)], round: u64) {
        self.entries.clear();
        self.out.clear();
        let (probe, set_done) = {
            let mut l = self.learned();
            l.auto.chunks += 1;
            let chunk = l.auto.chunks;
            (
                l.auto.probes.probed_at(chunk),
                l.auto.probes.set_done(chunk),
            )
        };
        if self.mode == Mode::Auto && set_done {
            // Each chunk number is one encoder's, so one sibling reschedules.
            let raw_wins = self.auto_choice().is_none();
            self.learned().auto.probes.reschedule(raw_wins);
        }
        let fixed = |encoding| Compress {
            encoding,
            strong: false,
            probe: false,
        };
        let codec = match self.mode {
            Mode::Lz4 => Some(fixed(Encoding::Lz4)),
            Mode::Zstd(_) => Some(fixed(Encoding::Zstd)),
            Mode::Auto => match probe.filter(|c| self.has(*c)) {
                Some(c) => Some((c, true)),
                None => self.auto_choice().map(|c| (c, false)),
            }
            .map(|(c, probe)| Compress {
                encoding: c.encoding(),
                strong: c == AutoCodec::ZstdStrong,
                probe,
            }),
            _ => None,
        };
        for &(addr, len, host) in extents {
            let pages = (len as usize) / PAGE;
            let mut i = 0;
            while i < pages {
                // A run of zero or non-zero pages.
                // SAFETY: page `i` lies inside the extent (caller's guarantee).
                let zero = unsafe { is_zero_page(host.add(i * PAGE)) };
                let mut j = i + 1;
                // SAFETY: as above, for page `j`.
                while j < pages && unsafe { is_zero_page(host.add(j * PAGE)) } == zero {
                    j += 1;
                }
                let run_addr = addr + (i * PAGE) as u64;
                // SAFETY: the run lies inside the extent.
                let run_host = unsafe { host.add(i * PAGE) };
                let run_len = (j - i) * PAGE;
                if zero {
                    self.push_zero(run_addr, run_len as u64);
                } else {
                    // SAFETY: the run is readable (caller's guarantee).
                    unsafe { self.encode_run(run_addr, run_host, run_len, round, codec) };
                }
                i = j;
            }
        }
    }

    /// Adds zero entries for `[addr, addr + len)` without reading it (known holes).
    pub(crate) fn push_zero(&mut self, addr: u64, len: u64) {
        self.stats.pages_zero += len / PAGE as u64;
        match self.entries.last_mut() {
            Some(e)
                if e.encoding == Encoding::Zero
                    && e.addr + e.raw_len == addr
                    && e.raw_len + len <= MAX_ZERO_ENTRY =>
            {
                e.raw_len += len;
            }
            _ => self.entries.push(Entry {
                addr,
                raw_len: len,
                enc_len: 0,
                encoding: Encoding::Zero,
                body: Body::None,
            }),
        }
    }

    /// # Safety
    /// `host..host + len` must be readable.
    unsafe fn encode_run(
        &mut self,
        addr: u64,
        host: *const u8,
        len: usize,
        round: u64,
        codec: Option<Compress>,
    ) {
        if let Some(written) = self.written.clone() {
            if codec.is_none() && matches!(self.mode, Mode::Delta | Mode::Auto) {
                // SAFETY: the caller's guarantee.
                unsafe { self.encode_new_sparse(&written, addr, host, len, round) };
                return;
            }
            for k in 0..len / PAGE {
                written.mark(addr + (k * PAGE) as u64);
            }
        }
        // SAFETY: the caller's guarantee.
        unsafe { self.encode_data(addr, host, len, round, codec) };
    }

    /// Page by page: the pages never sent that are sparse as deltas against zero, the others
    /// in runs as [`Encoder::encode_data`] does; every page marked sent.
    ///
    /// # Safety
    /// `host..host + len` must be readable.
    unsafe fn encode_new_sparse(
        &mut self,
        written: &WrittenPages,
        addr: u64,
        host: *const u8,
        len: usize,
        round: u64,
    ) {
        let pages = len / PAGE;
        // The run of pages that go as encode_data sends them, from this page.
        let mut start = 0;
        for k in 0..=pages {
            let paddr = addr + (k * PAGE) as u64;
            // SAFETY: page `k` of the run, or (`k == pages`) one past its end, never read.
            let phost = unsafe { host.add(k * PAGE) };
            let sparse = if k < pages && !written.is_written(paddr) && self.gate.look() {
                // SAFETY: as above; pages are page-aligned.
                let shape = unsafe { page_shape(phost) };
                self.gate.found(matches!(shape, PageShape::Sparse { .. }));
                match shape {
                    PageShape::Sparse { runs, n } => Some((runs, n)),
                    _ => None,
                }
            } else {
                None
            };
            if k < pages {
                written.mark(paddr);
            }
            if sparse.is_none() && k < pages {
                continue;
            }
            if k > start {
                // SAFETY: pages `start..k` of the run are readable.
                unsafe {
                    self.encode_data(
                        addr + (start * PAGE) as u64,
                        host.add(start * PAGE),
                        (k - start) * PAGE,
                        round,
                        None,
                    )
                };
            }
            start = k + 1;
            if let Some((runs, n)) = sparse {
                // A delta against zero: each run is (gap since the last, length, bytes).
                let off = self.out.len();
                let mut at = 0usize;
                for &(o, l) in &runs[..n] {
                    let (o, l) = (usize::from(o), usize::from(l));
                    put_varint(&mut self.out, o - at);
                    put_varint(&mut self.out, l);
                    // SAFETY: `o + l <= PAGE`: the run lies inside the readable page.
                    self.out
                        .extend_from_slice(unsafe { std::slice::from_raw_parts(phost.add(o), l) });
                    at = o + l;
                }
                let enc_len = (self.out.len() - off) as u64;
                self.entries.push(Entry {
                    addr: paddr,
                    raw_len: PAGE as u64,
                    enc_len,
                    encoding: Encoding::Delta,
                    body: Body::Out(off),
                });
                self.stats.bytes_in += PAGE as u64;
                self.stats.bytes_out += enc_len;
                self.stats.pages_sparse += 1;
            }
        }
    }

    /// Encodes a run of non-zero pages: deltas, a codec's output, or raw.
    ///
    /// # Safety
    /// `host..host + len` must be readable.
    unsafe fn encode_data(
        &mut self,
        addr: u64,
        host: *const u8,
        len: usize,
        round: u64,
        codec: Option<Compress>,
    ) {
        self.stats.bytes_in += len as u64;
        let use_delta =
            round > 0 && matches!(self.mode, Mode::Delta | Mode::Auto) && self.cache.is_some();
        if use_delta {
            // SAFETY: the caller's guarantee.
            unsafe { self.encode_deltas(addr, host, len) };
            return;
        }
        if let Some(codec) = codec {
            // SAFETY: the caller's guarantee.
            unsafe { self.compress_run(addr, host, len, codec) };
            return;
        }
        if self.mode == Mode::Auto && round > 0 {
            if let Some(cache) = &self.cache {
                // Remember pages re-sent in later rounds: the next re-send can be a delta.
                for k in 0..len / PAGE {
                    // SAFETY: page `k` of the run is readable.
                    let page = unsafe { std::slice::from_raw_parts(host.add(k * PAGE), PAGE) };
                    cache.insert(addr + (k * PAGE) as u64, page);
                }
            }
        }
        self.push_raw_guest(addr, host, len);
    }

    /// Page by page: cached pages as deltas, the rest raw (and cached for next time).
    ///
    /// # Safety
    /// `host..host + len` must be readable.
    unsafe fn encode_deltas(&mut self, addr: u64, host: *const u8, len: usize) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        for k in 0..len / PAGE {
            let paddr = addr + (k * PAGE) as u64;
            // SAFETY: page `k` of the run is readable.
            let phost = unsafe { host.add(k * PAGE) };
            if !(cache.contains(paddr) || self.mode == Mode::Delta) {
                self.push_raw_guest(paddr, phost, PAGE);
                continue;
            }
            self.stage.clear();
            // SAFETY: page readable; the copy snapshots it so the delta and the cache agree
            // even if the guest writes it meanwhile.
            self.stage
                .extend_from_slice(unsafe { std::slice::from_raw_parts(phost, PAGE) });
            self.stats.bytes_staged += PAGE as u64;
            let mut d = std::mem::take(&mut self.tmp);
            if cache.delta_and_update(paddr, &self.stage, &mut d, PAGE / 2) {
                let off = self.out.len();
                self.out.extend_from_slice(&d);
                self.entries.push(Entry {
                    addr: paddr,
                    raw_len: PAGE as u64,
                    enc_len: d.len() as u64,
                    encoding: Encoding::Delta,
                    body: Body::Out(off),
                });
                self.stats.pages_delta += 1;
                self.stats.bytes_out += d.len() as u64;
            } else {
                // First sight (now cached) or too different: send the snapshot.
                let off = self.out.len();
                self.out.extend_from_slice(&self.stage);
                self.push_raw_out(paddr, off, PAGE);
            }
            self.tmp = d;
        }
    }

    /// Compresses a snapshot of the run as `codec` says; sends it raw when that does not pay.
    ///
    /// # Safety
    /// `host..host + len` must be readable.
    unsafe fn compress_run(&mut self, addr: u64, host: *const u8, len: usize, codec: Compress) {
        let Compress {
            encoding: codec,
            strong,
            probe,
        } = codec;
        let pages = (len / PAGE) as u64;
        self.stage.clear();
        // SAFETY: the run is readable; the snapshot gives the compressor stable bytes.
        self.stage
            .extend_from_slice(unsafe { std::slice::from_raw_parts(host, len) });
        self.stats.bytes_staged += len as u64;
        let off = self.out.len();
        // Only `auto` weighs codecs, so only it times them (two clock reads per run, a run
        // may be one page): the compressor alone — growing the output buffer (the first time:
        // fresh memory, faulted in) is not the codec's speed — by its CPU time and by the
        // wall clock (see [`Encoder::auto_choice`]).
        let timed = self.mode == Mode::Auto;
        let zstd = if strong {
            self.zstd_strong.as_mut()
        } else {
            self.zstd.as_mut()
        };
        let (enc, n, secs) = match (codec, zstd) {
            (Encoding::Zstd, Some(z)) => {
                self.out
                    .resize(off + zstd::zstd_safe::compress_bound(len), 0);
                let t = timed.then(Timer::start);
                match z.compress_to_buffer(&self.stage, &mut self.out[off..]) {
                    Ok(n) => (Encoding::Zstd, n, t.map(|t| t.secs())),
                    Err(_) => (Encoding::Raw, usize::MAX, None),
                }
            }
            _ => {
                self.out
                    .resize(off + lz4_flex::block::get_maximum_output_size(len), 0);
                let t = timed.then(Timer::start);
                match lz4_flex::block::compress_into(&self.stage, &mut self.out[off..]) {
                    Ok(n) => (Encoding::Lz4, n, t.map(|t| t.secs())),
                    Err(_) => (Encoding::Raw, usize::MAX, None),
                }
            }
        };
        if let Some((cpu, wall)) = secs {
            let mut l = self.learned();
            let m = match (enc, strong) {
                (Encoding::Zstd, true) => &mut l.auto.zstd_strong,
                (Encoding::Zstd, false) => &mut l.auto.zstd,
                _ => &mut l.auto.lz4,
            };
            m.cpu = ewma(m.cpu, len as f64 / cpu.max(1e-9));
            if probe {
                m.probed = ewma(m.probed, len as f64 / cpu.max(1e-9));
            }
            m.wall = ewma(m.wall, len as f64 / wall.max(1e-9));
            m.ratio = ewma(m.ratio, n as f64 / len as f64);
        }
        if n < len - len / 16 {
            self.out.truncate(off + n);
            self.entries.push(Entry {
                addr,
                raw_len: len as u64,
                enc_len: n as u64,
                encoding: enc,
                body: Body::Out(off),
            });
            if enc == Encoding::Zstd {
                self.stats.pages_zstd += pages;
            } else {
                self.stats.pages_lz4 += pages;
            }
            self.stats.bytes_out += n as u64;
            return;
        }
        // Not worth it: send the staged copy (already stable) raw.
        self.out.truncate(off);
        self.out.extend_from_slice(&self.stage);
        self.push_raw_out(addr, off, len);
    }

    fn push_raw_guest(&mut self, addr: u64, host: *const u8, len: usize) {
        self.stats.pages_raw += (len / PAGE) as u64;
        self.stats.bytes_out += len as u64;
        if let Some(e) = self.entries.last_mut() {
            if let Body::Guest(p) = e.body {
                if e.encoding == Encoding::Raw
                    && e.addr + e.raw_len == addr
                    && p.wrapping_add(e.raw_len as usize) == host
                {
                    e.raw_len += len as u64;
                    e.enc_len += len as u64;
                    return;
                }
            }
        }
        self.entries.push(Entry {
            addr,
            raw_len: len as u64,
            enc_len: len as u64,
            encoding: Encoding::Raw,
            body: Body::Guest(host),
        });
    }

    fn push_raw_out(&mut self, addr: u64, off: usize, len: usize) {
        self.stats.pages_raw += (len / PAGE) as u64;
        self.stats.bytes_out += len as u64;
        self.entries.push(Entry {
            addr,
            raw_len: len as u64,
            enc_len: len as u64,
            encoding: Encoding::Raw,
            body: Body::Out(off),
        });
    }
}

/// Link-rate samples `auto` keeps.
pub const RATE_WINDOW: usize = 16;

/// Largest zero entry (bytes of guest memory it stands for).
pub const MAX_ZERO_ENTRY: u64 = 1 << 30;

/// CPU time consumed by the calling thread, in nanoseconds (0 if the clock cannot be read).
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

/// Niceness of the source's compression helpers (the threads that encode chunks beside each
/// data channel): the guest's vCPUs and devices, and the data channels themselves, come
/// first on a busy host, and compression takes the cores they leave (as Hyper-V compresses
/// with spare processor time); `auto` sees the slower codec in its wall-clock speed and
/// sends raw. On an idle core the helpers run as fast as ever. (The page hashers are not
/// lowered: the digest's last pages are hashed inside the downtime.)
pub const HELPER_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority to [`HELPER_NICE`] (Linux: a thread's own nice
/// value), never raising it; a failure leaves it as it was.
pub fn lower_thread_priority() {
    lower_thread_priority_to(HELPER_NICE);
}

/// Lowers the calling thread's priority to `nice` (-20..=19), never raising it; a failure
/// leaves it as it was.
pub fn lower_thread_priority_to(nice: libc::c_int) {
    // SAFETY: getpriority takes plain integers; `who` 0 is the calling thread.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if now < nice {
        // SAFETY: setpriority takes plain integers; `who` 0 is the calling thread.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    }
}

/// Times a call by this thread's CPU time and by the wall clock.
struct Timer {
    cpu: u64,
    wall: std::time::Instant,
}

impl Timer {
    fn start() -> Self {
        Timer {
            cpu: thread_cpu_ns(),
            wall: std::time::Instant::now(),
        }
    }

    /// (CPU seconds, wall-clock seconds) since the start.
    fn secs(&self) -> (f64, f64) {
        (
            thread_cpu_ns().saturating_sub(self.cpu) as f64 / 1e9,
            self.wall.elapsed().as_secs_f64(),
        )
    }
}

fn ewma(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        new
    } else {
        old * 0.8 + new * 0.2
    }
}

/// Whether the page at `p` is all zero, reading it word by word.
///
/// # Safety
///
/// `p..p + PAGE` must be readable. The guest may write it concurrently: the answer is then
/// either state, and the dirty log catches the write.
pub unsafe fn is_zero_page(p: *const u8) -> bool {
    let w = p.cast::<u64>();
    let mut i = 0;
    while i < PAGE / 8 {
        let mut acc = 0u64;
        for k in 0..8 {
            // SAFETY: `i + k < PAGE / 8`, inside the page; volatile because the guest may write
            // it concurrently. Pages are page-aligned, so the u64 reads are aligned.
            acc |= unsafe { w.add(i + k).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    true
}

/// The guest pages a migration has sent as data, one bit per page by guest-physical address,
/// shared by its channels: where no bit is set, the destination's copy of the page is zero
/// (its RAM starts zero), so a zero page needs no write there and a sparse one only its data
/// ([`page_shape`]). A page is marked before its data is sent, whatever it holds, and stays
/// marked: once sent, the destination's copy is whatever was read then, so every later send
/// of the page carries it whole. Addresses beyond the span count as written.
#[derive(Debug)]
pub struct WrittenPages {
    bits: Vec<AtomicU64>,
}

impl WrittenPages {
    /// No page written, for guest-physical addresses below `end`.
    pub fn new(end: u64) -> Self {
        let words = (end / PAGE as u64).div_ceil(64) as usize;
        WrittenPages {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bit(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        let page = gpa / PAGE as u64;
        let w = self.bits.get((page / 64) as usize)?;
        Some((w, 1u64 << (page % 64)))
    }

    /// Whether the page at `gpa` was sent as data (or lies beyond the span).
    pub fn is_written(&self, gpa: u64) -> bool {
        self.bit(gpa)
            .is_none_or(|(w, bit)| w.load(Ordering::Relaxed) & bit != 0)
    }

    /// Marks the page at `gpa` sent.
    pub fn mark(&self, gpa: u64) {
        if let Some((w, bit)) = self.bit(gpa) {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }
}

/// Whether to look for sparse pages ([`page_shape`]): at every page while they turn up; after
/// a window of 256 pages looked at that held none, at one page in 16 only, until one of those
/// is sparse. A look reads four cache lines spread over the page that sending it may
/// not read again soon: on loopback, looking at every page of 1 GiB of text cost ~8 % of its
/// migration time.
#[derive(Debug, Clone, Default)]
pub struct SparseGate {
    looked: u32,
    found: u32,
    /// Sampling, and the pages since the last sample.
    sampling: Option<u32>,
}

/// Non-zero pages looked at per verdict of a [`SparseGate`].
const GATE_WINDOW: u32 = 256;
/// While sampling, one page in this many is looked at.
const GATE_SAMPLE: u32 = 16;

impl SparseGate {
    /// Whether to look at the next non-zero page.
    pub fn look(&mut self) -> bool {
        match &mut self.sampling {
            None => true,
            Some(since) => {
                *since += 1;
                if *since == GATE_SAMPLE {
                    *since = 0;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// What the look at a non-zero page found.
    pub fn found(&mut self, sparse: bool) {
        if self.sampling.is_some() {
            if sparse {
                *self = SparseGate::default();
            }
            return;
        }
        self.looked += 1;
        self.found += u32::from(sparse);
        if self.looked == GATE_WINDOW {
            if self.found == 0 {
                self.sampling = Some(0);
            }
            self.looked = 0;
            self.found = 0;
        }
    }
}

/// Granule of a sparse page's runs: a cache line.
pub const SPARSE_LINE: usize = 64;
/// Most runs a sparse page is written in (each run is a write of its own on the wire).
pub const SPARSE_MAX_RUNS: usize = 4;
/// Most bytes a sparse page's runs hold together: beyond, the whole page goes.
pub const SPARSE_MAX_BYTES: usize = PAGE / 4;
/// Zero lines a run spans rather than end (one write of 128 bytes more costs less than a
/// write of its own).
const SPARSE_GAP_LINES: usize = 2;

/// What a page holds, for a transport that can write parts of a page into a peer's copy
/// known to be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageShape {
    /// All zero.
    Zero,
    /// Non-zero bytes only inside `runs[..n]`: `(offset, len)` in bytes, whole cache lines,
    /// in order, apart from each other; at most [`SPARSE_MAX_BYTES`] in all.
    Sparse {
        /// The runs.
        runs: [(u16, u16); SPARSE_MAX_RUNS],
        /// How many of `runs` are used (at least one).
        n: usize,
    },
    /// Anything else: the page is written whole.
    Dense,
}

/// Whether the cache line `line` of the page at `w` holds a non-zero byte.
///
/// # Safety
///
/// As [`page_shape`]; `line < PAGE / SPARSE_LINE`.
unsafe fn line_nonzero(w: *const u64, line: usize) -> bool {
    let mut acc = 0u64;
    for k in 0..SPARSE_LINE / 8 {
        // SAFETY: inside the page (the caller's `line` bound); volatile because the guest may
        // write it concurrently; page-aligned, so aligned.
        acc |= unsafe { w.add(line * (SPARSE_LINE / 8) + k).read_volatile() };
    }
    acc != 0
}

/// The shape of the page at `p`: zero, a few short runs of data (sparse), or dense. A page
/// whose lines at four spread places mostly hold data is taken as dense without a full scan.
///
/// # Safety
///
/// `p..p + PAGE` must be readable and 8-byte aligned. The guest may write it concurrently:
/// the answer then describes some mix of both states, and the dirty log catches the write.
pub unsafe fn page_shape(p: *const u8) -> PageShape {
    const LINES: usize = PAGE / SPARSE_LINE;
    let w = p.cast::<u64>();
    let sampled = [0, LINES / 3, 2 * LINES / 3, LINES - 1]
        .iter()
        // SAFETY: lines below LINES, inside the readable page.
        .filter(|&&l| unsafe { line_nonzero(w, l) })
        .count();
    if sampled >= 3 {
        return PageShape::Dense;
    }
    let mut runs = [(0u16, 0u16); SPARSE_MAX_RUNS];
    let mut n = 0usize;
    // The open run, in lines: [start, end).
    let mut open: Option<(usize, usize)> = None;
    let mut bytes = 0usize;
    for line in 0..LINES {
        // SAFETY: `line < LINES`, inside the readable page.
        if !unsafe { line_nonzero(w, line) } {
            continue;
        }
        open = match open {
            Some((s, e)) if line - e <= SPARSE_GAP_LINES => {
                bytes += (line + 1 - e) * SPARSE_LINE;
                Some((s, line + 1))
            }
            Some((s, e)) => {
                if n == SPARSE_MAX_RUNS - 1 {
                    return PageShape::Dense;
                }
                runs[n] = ((s * SPARSE_LINE) as u16, ((e - s) * SPARSE_LINE) as u16);
                n += 1;
                bytes += SPARSE_LINE;
                Some((line, line + 1))
            }
            None => {
                bytes += SPARSE_LINE;
                Some((line, line + 1))
            }
        };
        if bytes > SPARSE_MAX_BYTES {
            return PageShape::Dense;
        }
    }
    match open {
        None => PageShape::Zero,
        Some((s, e)) => {
            runs[n] = ((s * SPARSE_LINE) as u16, ((e - s) * SPARSE_LINE) as u16);
            PageShape::Sparse { runs, n: n + 1 }
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<usize> {
    let mut v = 0usize;
    for shift in [0, 7, 14] {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes the changes from `old` to `new` (same length) as `(unchanged, changed, bytes)*`.
/// Returns false if the encoding would exceed `limit` bytes.
pub fn delta_encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    out.clear();
    let n = new.len().min(old.len());
    let mut i = 0;
    while i < n {
        let start = i;
        while i < n && old[i] == new[i] {
            i += 1;
        }
        if i == n {
            break;
        }
        let skip = i - start;
        let lit_start = i;
        // A changed run ends at the first 4 equal bytes (shorter gaps are cheaper inline).
        while i < n && !(i + 4 <= n && old[i..i + 4] == new[i..i + 4]) {
            i += 1;
        }
        put_varint(out, skip);
        put_varint(out, i - lit_start);
        out.extend_from_slice(&new[lit_start..i]);
        if out.len() > limit {
            return false;
        }
    }
    true
}

/// Applies a delta in place: `page` holds the old version and gets the new one. A corrupt
/// delta may have changed the page when this fails; [`delta_check`] first leaves it intact.
pub fn delta_apply(delta: &[u8], page: &mut [u8]) -> Result<(), DecodeError> {
    delta_walk(delta, page.len(), |at, src| {
        page[at..at + src.len()].copy_from_slice(src)
    })
}

/// Checks that `delta` is well-formed for a page of `len` bytes, changing nothing.
pub fn delta_check(delta: &[u8], len: usize) -> Result<(), DecodeError> {
    delta_walk(delta, len, |_, _| {})
}

/// Parses `delta` for a page of `len` bytes, calling `put(offset, bytes)` for each run.
fn delta_walk(
    delta: &[u8],
    len: usize,
    mut put: impl FnMut(usize, &[u8]),
) -> Result<(), DecodeError> {
    let bad = |reason: &str| DecodeError::Corrupt {
        codec: "delta",
        reason: reason.to_string(),
    };
    let mut pos = 0;
    let mut at = 0usize;
    while pos < delta.len() {
        let skip = get_varint(delta, &mut pos).ok_or_else(|| bad("bad varint"))?;
        let n = get_varint(delta, &mut pos).ok_or_else(|| bad("bad varint"))?;
        at = at.checked_add(skip).ok_or_else(|| bad("overflow"))?;
        let end = at
            .checked_add(n)
            .filter(|&e| e <= len)
            .ok_or_else(|| bad("run past the page"))?;
        let src = delta
            .get(pos..pos + n)
            .ok_or_else(|| bad("literal past the body"))?;
        put(at, src);
        pos += n;
        at = end;
    }
    Ok(())
}

/// Decodes an LZ4 or zstd body into `out`, which must come out exactly full.
pub fn decompress_into(encoding: Encoding, body: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let want = out.len();
    let (codec, got) = match encoding {
        Encoding::Lz4 => (
            "lz4",
            lz4_flex::block::decompress_into(body, out).map_err(|e| DecodeError::Corrupt {
                codec: "lz4",
                reason: e.to_string(),
            })?,
        ),
        Encoding::Zstd => (
            "zstd",
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(body, out))
                .map_err(|e| DecodeError::Corrupt {
                    codec: "zstd",
                    reason: e.to_string(),
                })?,
        ),
        _ => {
            return Err(DecodeError::Corrupt {
                codec: "none",
                reason: "not a compressed encoding".into(),
            })
        }
    };
    if got != want {
        return Err(DecodeError::WrongSize { codec, got, want });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_thread_lowers_its_own_priority_only() {
        // SAFETY: getpriority takes plain integers; `who` 0 is this thread.
        let mine = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let helper = std::thread::spawn(|| {
            lower_thread_priority();
            // SAFETY: as above.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(helper, mine.max(HELPER_NICE));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, mine);
        // Lower still, then never back up.
        let (lowest, after) = std::thread::spawn(|| {
            lower_thread_priority_to(19);
            // SAFETY: as above.
            let lowest = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            lower_thread_priority();
            // SAFETY: as above.
            (lowest, unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) })
        })
        .join()
        .unwrap();
        assert_eq!((lowest, after), (19, 19));
    }
    use proptest::prelude::*;

    #[test]
    fn zero_pages_are_found() {
        let mut p = vec![0u8; PAGE * 2];
        // SAFETY: `p` holds two pages.
        unsafe {
            assert!(is_zero_page(p.as_ptr()));
            p[PAGE + 4095] = 1;
            assert!(!is_zero_page(p.as_ptr().add(PAGE)));
        }
    }

    #[test]
    fn page_shapes_are_zero_sparse_or_dense() {
        let shape = |set: &[(usize, u8)]| {
            let mut words = vec![0u64; PAGE / 8];
            // SAFETY: `words` holds PAGE bytes, u64-aligned.
            let page = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), PAGE) };
            for &(at, v) in set {
                page[at] = v;
            }
            // SAFETY: one readable, aligned page.
            unsafe { page_shape(words.as_ptr().cast()) }
        };
        let sparse = |runs: &[(u16, u16)]| {
            let mut r = [(0, 0); SPARSE_MAX_RUNS];
            r[..runs.len()].copy_from_slice(runs);
            PageShape::Sparse {
                runs: r,
                n: runs.len(),
            }
        };
        assert_eq!(shape(&[]), PageShape::Zero);
        // One stamp: its cache line alone (the built-in and Linux test guests' working sets).
        assert_eq!(shape(&[(8, 1)]), sparse(&[(0, 64)]));
        assert_eq!(shape(&[(4095, 1)]), sparse(&[(4032, 64)]));
        // Lines two apart join one run; three apart, two runs.
        assert_eq!(shape(&[(100, 1), (300, 1)]), sparse(&[(64, 256)]));
        assert_eq!(shape(&[(100, 1), (364, 1)]), sparse(&[(64, 64), (320, 64)]));
        // Four runs at most.
        let four = [(1000, 1), (1500, 1), (2000, 1), (3000, 1)];
        assert_eq!(
            shape(&four),
            sparse(&[(960, 64), (1472, 64), (1984, 64), (2944, 64)])
        );
        assert_eq!(
            shape(&[(10, 1), (1000, 1), (1500, 1), (2000, 1), (3000, 1)]),
            PageShape::Dense
        );
        // A quarter of the page at most.
        let quarter: Vec<(usize, u8)> = (0..PAGE / 4).map(|i| (200 + i, 1)).collect();
        assert!(matches!(
            shape(&quarter[..PAGE / 4 - 200]),
            PageShape::Sparse { n: 1, .. }
        ));
        assert_eq!(shape(&quarter), PageShape::Dense);
        // Data at three of the four sampled places: dense without a scan.
        assert_eq!(shape(&[(0, 1), (1344, 1), (4095, 1)]), PageShape::Dense);
        let full: Vec<(usize, u8)> = (0..PAGE).map(|i| (i, 0x5a)).collect();
        assert_eq!(shape(&full), PageShape::Dense);
    }

    #[test]
    fn corrupt_bodies_are_errors() {
        let mut out = vec![0u8; PAGE];
        assert!(decompress_into(Encoding::Lz4, &[0xff; 20], &mut out).is_err());
        assert!(
            decompress_into(Encoding::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], &mut out).is_err()
        );
        let small = lz4_flex::block::compress(&[7u8; 100]);
        assert_eq!(
            decompress_into(Encoding::Lz4, &small, &mut out),
            Err(DecodeError::WrongSize {
                codec: "lz4",
                got: 100,
                want: PAGE
            })
        );
        // a body that would expand past the page is refused, not written past it
        let big = lz4_flex::block::compress(&vec![7u8; 2 * PAGE]);
        assert!(decompress_into(Encoding::Lz4, &big, &mut out).is_err());
        assert!(delta_apply(&[0x80, 0x80, 0x80, 0x80], &mut out).is_err());
        assert!(delta_apply(&[0, 10, 1, 2], &mut out).is_err());
        assert!(delta_apply(&[0x80, 0x20, 1, 0], &mut out).is_err());
        assert!(delta_apply(&[0xff, 0x1f, 1, 0], &mut out).is_ok());
    }

    fn seen(cpu: f64, wall: f64, ratio: f64) -> Seen {
        Seen {
            cpu,
            wall,
            ratio,
            probed: cpu,
        }
    }

    /// Tells `e`'s family what `auto` measured of LZ4 and zstd.
    fn learn(e: &Encoder, lz4: Seen, zstd: Seen) {
        let mut l = e.learned();
        l.auto.lz4 = lz4;
        l.auto.zstd = zstd;
    }

    #[test]
    fn auto_weighs_the_codecs_by_cpu_speed_and_raw_by_what_the_codec_delivers() {
        let mut e = Encoder::new(Mode::Auto, None);
        // 1 GbE text: zstd compresses to 7 %, LZ4 to 20 %; LZ4 ran on every chunk while
        // zstd's last probe ran beside other work (wall 300 MB/s against a CPU speed of 900).
        e.record_link_sample(118e6, false);
        learn(&e, seen(1000e6, 800e6, 0.2), seen(900e6, 300e6, 0.07));
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // By wall-clock speed LZ4 would have looked better (min(800, 590) against 300):
        // the same figures with equal loads choose LZ4 only when it is really faster.
        learn(&e, seen(1000e6, 800e6, 0.2), seen(500e6, 300e6, 0.07));
        assert_eq!(e.auto_choice(), Some(AutoCodec::Lz4));
        // 10 GbE shared by two connections (600 MB/s each): LZ4's own speed beats the link,
        // but on the cores it gets it delivers 500 MB/s: raw.
        let mut e = Encoder::new(Mode::Auto, None);
        e.record_link_sample(600e6, false);
        learn(&e, seen(1000e6, 500e6, 0.2), seen(700e6, 400e6, 0.07));
        assert_eq!(e.auto_choice(), None);
        // Loopback, mixed RAM, as measured here: LZ4 at 2.1 GB/s, ratio 0.62, link 1.7 GB/s.
        // Overlapped, LZ4 would move 2.1 GB/s; one after the other 1.2: raw. The same LZ4 on
        // text (ratio 0.2) against a connection's 1.2 GB/s share of 10 GbE: LZ4 (1.55).
        let mut e = Encoder::new(Mode::Auto, None);
        e.record_link_sample(1.7e9, false);
        learn(&e, seen(2100e6, 2100e6, 0.62), seen(900e6, 900e6, 0.57));
        assert_eq!(e.auto_choice(), None);
        let mut e = Encoder::new(Mode::Auto, None);
        e.record_link_sample(1.2e9, false);
        learn(&e, seen(2100e6, 2100e6, 0.2), seen(900e6, 900e6, 0.07));
        assert_eq!(e.auto_choice(), Some(AutoCodec::Lz4));
        // Incompressible content: raw whatever the speeds.
        let mut e = Encoder::new(Mode::Auto, None);
        e.record_link_sample(118e6, false);
        learn(&e, seen(3000e6, 3000e6, 1.0), seen(2000e6, 2000e6, 0.99));
        assert_eq!(e.auto_choice(), None);
    }

    #[test]
    fn auto_ranks_the_codecs_by_what_its_helpers_move_together() {
        // 1 GbE text as `auto` measured it here: zstd level 1 probed at 1.04 GB/s (ratio
        // 0.070), level 3 at 0.83 (0.050), LZ4 at 0.97 (0.198).
        let mut e = Encoder::new(Mode::Auto, None);
        e.record_link_sample(118e6, false);
        {
            let mut l = e.learned();
            l.auto.lz4 = seen(970e6, 930e6, 0.198);
            l.auto.zstd = seen(1040e6, 1000e6, 0.070);
            l.auto.zstd_strong = seen(830e6, 850e6, 0.050);
        }
        // One thread compressing: level 1 moves 885 MB/s, level 3 783 (LZ4 508).
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // Two side by side: level 1 1 310, level 3 1 358 — its fewer bytes weigh more.
        e.set_helpers(2);
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdStrong));
        // Two on a faster link (a connection's 600 MB/s share of 10 GbE), where each codec
        // still beats raw on one core's wall clock: level 1 again (2 021 against 1 644; LZ4
        // 1 634).
        e.record_link_sample(600e6, false);
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // The whole 10 GbE link: no codec beats raw on one core, however many helpers.
        e.record_link_sample(1180e6, false);
        assert_eq!(e.auto_choice(), None);
    }

    #[test]
    fn auto_sends_raw_while_the_receiver_holds_the_link_back() {
        // A link that calls for zstd (1 GbE text) ...
        let mut e = Encoder::new(Mode::Auto, None);
        learn(&e, seen(1000e6, 1000e6, 0.2), seen(900e6, 900e6, 0.07));
        for _ in 0..RATE_WINDOW {
            e.record_link_sample(118e6, false);
        }
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // ... measured with the receiver's window full in most samples: raw.
        for _ in 0..RATE_WINDOW / 2 {
            e.record_link_sample(118e6, true);
        }
        assert_eq!(
            e.auto_choice(),
            Some(AutoCodec::ZstdFast),
            "half is not most"
        );
        e.record_link_sample(118e6, true);
        assert_eq!(e.auto_choice(), None);
        // The network the bottleneck again: the codec again.
        for _ in 0..RATE_WINDOW / 2 + 1 {
            e.record_link_sample(118e6, false);
        }
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // The first samples count as they come.
        let mut e = Encoder::new(Mode::Auto, None);
        learn(&e, seen(1000e6, 1000e6, 0.2), seen(900e6, 900e6, 0.07));
        e.record_link_sample(118e6, true);
        assert_eq!(e.auto_choice(), None);
    }

    #[test]
    fn before_the_link_is_measured_auto_sends_raw_only_while_the_queue_is_short() {
        let mut e = Encoder::new(Mode::Auto, None);
        learn(&e, seen(1000e6, 1000e6, 0.2), seen(900e6, 900e6, 0.07));
        e.record_backlog(UNMEASURED_BACKLOG - 1);
        assert_eq!(e.auto_choice(), None);
        e.record_backlog(UNMEASURED_BACKLOG);
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // Only LZ4 probed so far.
        e.learned().auto.zstd = Seen::default();
        assert_eq!(e.auto_choice(), Some(AutoCodec::Lz4));
        // Past the first sends, a queue that was long after fewer than a tenth of them (a
        // moment's: the receiver busy) does not make it compress.
        for _ in 0..100 {
            e.record_backlog(0);
        }
        e.record_backlog(UNMEASURED_BACKLOG);
        assert_eq!(e.auto_choice(), None);
        for _ in 0..12 {
            e.record_backlog(UNMEASURED_BACKLOG);
        }
        assert_eq!(e.auto_choice(), Some(AutoCodec::Lz4));
        // Nothing compresses: raw.
        e.learned().auto.lz4 = seen(3000e6, 3000e6, 1.0);
        assert_eq!(e.auto_choice(), None);
    }

    #[test]
    fn auto_takes_the_stronger_zstd_level_where_the_link_is_slower_than_the_cores() {
        let e = Encoder::new(Mode::Auto, None);
        let strong = |s: Seen| e.learned().auto.zstd_strong = s;
        // 1 GbE, text as measured here: level 3 as fast as level 1, 30 % fewer bytes.
        e.learned().auto.link_speed = 118e6;
        learn(&e, seen(1150e6, 1150e6, 0.2), seen(1030e6, 800e6, 0.075));
        strong(seen(1110e6, 800e6, 0.054));
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdStrong));
        // Content on which level 3 costs more than it saves at this link: level 1.
        strong(seen(400e6, 300e6, 0.054));
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // The same speeds over a link of 20 MB/s: level 1 waits for the link (258 MB/s
        // moved), level 3 moves 272.
        e.learned().auto.link_speed = 20e6;
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdStrong));
        // Level 3 best by CPU speed but delivering 100 MB/s on the cores it gets, under the
        // link: level 1, which delivers, rather than raw.
        e.learned().auto.link_speed = 118e6;
        strong(seen(1110e6, 100e6, 0.054));
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdFast));
        // Before the link is measured, with a long queue: the best ratio.
        e.learned().auto.link_speed = 0.0;
        e.learned().backlog = UNMEASURED_BACKLOG;
        assert_eq!(e.auto_choice(), Some(AutoCodec::ZstdStrong));
    }

    #[test]
    fn auto_says_when_its_next_chunk_goes_raw() {
        let mut e = Encoder::new(Mode::Auto, None);
        // The first chunks probe each codec.
        assert!(!e.next_chunk_raw());
        e.learned().auto.chunks = 2;
        assert!(!e.next_chunk_raw());
        e.learned().auto.chunks = 3;
        // Link not measured, short queue: raw.
        assert!(e.next_chunk_raw());
        // A slow link on compressible content: compressed.
        e.record_link_sample(118e6, false);
        learn(&e, seen(1000e6, 1000e6, 0.2), seen(900e6, 900e6, 0.07));
        assert!(!e.next_chunk_raw());
        // Fixed modes never say raw (they have no helpers' choice to skip).
        assert!(!Encoder::new(Mode::Lz4, None).next_chunk_raw());
        assert!(!Encoder::new(Mode::None, None).next_chunk_raw());
    }

    /// The chunks of `e`'s family that probed, among the first `chunks` it encodes (one page
    /// of text each).
    fn probing_chunks(e: &mut Encoder, chunks: u64) -> Vec<u64> {
        let page = page_from(7, true);
        (1..=chunks)
            .filter(|_| {
                // SAFETY: `page` is one readable page.
                unsafe { e.encode(&[(0, PAGE as u64, page.as_ptr())], 0) };
                e.entries.iter().any(|x| x.encoding != Encoding::Raw)
            })
            .collect()
    }

    #[test]
    fn auto_probes_less_often_while_raw_keeps_winning_and_as_often_as_before_otherwise() {
        // A link faster than any codec could be (the probes' own measurements of one page
        // cannot change that).
        let mut e = Encoder::new(Mode::Auto, None);
        e.learned().auto.link_speed = 1e15;
        let sets = probing_chunks(&mut e, 2000);
        // Sets at 1, 65, 321 (gaps 64, 256, then 1024), each of the three codecs.
        let firsts: Vec<u64> = sets.iter().copied().step_by(3).collect();
        assert_eq!(firsts, vec![1, 65, 321, 1345]);
        assert_eq!(sets.len(), 12);
        // The same before the link is measured while the queue stays short (the sender, not
        // the link, is the bottleneck: loopback here, most runs).
        let mut e = Encoder::new(Mode::Auto, None);
        assert_eq!(probing_chunks(&mut e, 2000), sets);
        // A link slower than any codec could be: a codec wins, and the sets come every 64
        // chunks (every chunk is compressed, so count the schedule).
        let mut e = Encoder::new(Mode::Auto, None);
        e.learned().auto.link_speed = 1.0;
        let page = page_from(7, true);
        let mut starts = Vec::new();
        for c in 1..=400u64 {
            if e.learned().auto.probes.probed_at(c) == Some(AutoCodec::Lz4) {
                starts.push(c);
            }
            // SAFETY: `page` is one readable page.
            unsafe { e.encode(&[(0, PAGE as u64, page.as_ptr())], 0) };
        }
        assert_eq!(starts, vec![1, 65, 129, 193, 257, 321, 385]);
        // Once a codec wins again after a long gap, the next gap is the shortest.
        let mut s = ProbeSchedule::new();
        s.reschedule(false);
        assert_eq!((s.next, s.every), (65, 64));
        s.reschedule(true);
        s.reschedule(true);
        assert_eq!((s.next, s.every), (385, 1024));
        s.reschedule(false);
        assert_eq!((s.next, s.every), (1409, 64));
    }

    fn page_from(seed: u64, text: bool) -> Vec<u8> {
        let mut x = seed | 1;
        (0..PAGE)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if text {
                    b"the quick brown fox "[(i + (x % 3) as usize) % 20]
                } else {
                    x as u8
                }
            })
            .collect()
    }

    fn round_trip(
        mode: Mode,
        pages: &[Vec<u8>],
        round: u64,
        cache: Option<Arc<DeltaCache>>,
        dest: &mut [u8],
    ) {
        let src: Vec<u8> = pages.concat();
        let mut enc = Encoder::new(mode, cache);
        // SAFETY: `src` outlives the encoding.
        unsafe { enc.encode(&[(0, src.len() as u64, src.as_ptr())], round) };
        for e in &enc.entries {
            let at = e.addr as usize;
            let range = &mut dest[at..at + e.raw_len as usize];
            let body: &[u8] = match e.body {
                // SAFETY: points into `src`, alive.
                Body::Guest(p) => unsafe { std::slice::from_raw_parts(p, e.enc_len as usize) },
                Body::Out(off) => &enc.out[off..off + e.enc_len as usize],
                Body::None => &[],
            };
            match e.encoding {
                Encoding::Raw => range.copy_from_slice(body),
                Encoding::Zero => range.fill(0),
                Encoding::Delta => delta_apply(body, range).unwrap(),
                c => decompress_into(c, body, range).unwrap(),
            }
        }
        assert_eq!(&dest[..src.len()], &src[..]);
    }

    #[test]
    fn the_sparse_gate_looks_while_sparse_pages_turn_up_and_now_and_then_otherwise() {
        let mut g = SparseGate::default();
        // One sparse page in each window keeps every page looked at.
        for i in 0..4 * GATE_WINDOW {
            assert!(g.look());
            g.found(i % GATE_WINDOW == 7);
        }
        // A window of dense pages: then one page in GATE_SAMPLE, as long as they are dense.
        for _ in 0..GATE_WINDOW {
            assert!(g.look());
            g.found(false);
        }
        for _ in 0..3 {
            assert_eq!((1..GATE_SAMPLE).filter(|_| g.look()).count(), 0);
            assert!(g.look());
            g.found(false);
        }
        // A sampled sparse page: every page again.
        assert_eq!((1..GATE_SAMPLE).filter(|_| g.look()).count(), 0);
        assert!(g.look());
        g.found(true);
        assert!((0..GATE_WINDOW).all(|_| {
            let l = g.look();
            g.found(false);
            l
        }));
    }

    #[test]
    fn pages_never_sent_go_as_their_data_alone_when_sparse() {
        let mut words = vec![0u64; PAGE / 2];
        // SAFETY: `words` holds 4 pages, u64-aligned.
        let src =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), 4 * PAGE) };
        src[8] = 1; // page 0: one stamp
        src[PAGE..2 * PAGE].copy_from_slice(&page_from(1, false)); // page 1: dense
        src[3 * PAGE + 100] = 7; // page 3: two runs
        src[3 * PAGE + 3000] = 9;
        let src: &[u8] = src;
        let kinds = |enc: &Encoder| -> Vec<(u64, Encoding, u64)> {
            enc.entries
                .iter()
                .map(|e| (e.addr / PAGE as u64, e.encoding, e.raw_len / PAGE as u64))
                .collect()
        };
        for mode in [Mode::Delta, Mode::Auto] {
            let written = Arc::new(WrittenPages::new(4 * PAGE as u64));
            let mut enc = Encoder::new(mode, None).with_written(written.clone());
            // Past `auto`'s first probes (a zero page is all they see).
            while mode == Mode::Auto && !enc.next_chunk_raw() {
                // SAFETY: `src` outlives the encoding.
                unsafe {
                    enc.encode(
                        &[(2 * PAGE as u64, PAGE as u64, src[2 * PAGE..].as_ptr())],
                        0,
                    )
                };
            }
            // Siblings (a channel's encoding helpers) share what was sent.
            let mut sib = enc.sibling();
            let mut dest = vec![0u8; 4 * PAGE];
            // SAFETY: `src` outlives the encoding.
            unsafe { sib.encode(&[(0, src.len() as u64, src.as_ptr())], 0) };
            use Encoding::*;
            assert_eq!(
                kinds(&sib),
                vec![(0, Delta, 1), (1, Raw, 1), (2, Zero, 1), (3, Delta, 1)],
                "{mode:?}"
            );
            assert_eq!((sib.stats.pages_sparse, sib.stats.pages_raw), (2, 1));
            assert!(
                sib.stats.bytes_out < PAGE as u64 + 4 * 64,
                "{:?}",
                sib.stats
            );
            for e in &sib.entries {
                let range = &mut dest[e.addr as usize..(e.addr + e.raw_len) as usize];
                match (e.encoding, e.body) {
                    (Delta, Body::Out(off)) => {
                        let body = &sib.out[off..off + e.enc_len as usize];
                        delta_check(body, PAGE).unwrap();
                        delta_apply(body, range).unwrap();
                    }
                    // SAFETY: points into `src`, alive.
                    (Raw, Body::Guest(p)) => range.copy_from_slice(unsafe {
                        std::slice::from_raw_parts(p, e.enc_len as usize)
                    }),
                    (Zero, _) => {}
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(dest, src, "{mode:?}");
            // Sent once, a page goes whole from then on, whoever sends it.
            assert!((0..4).all(|p| written.is_written(p * PAGE as u64) == (p != 2)));
            // SAFETY: `src` outlives the encoding.
            unsafe { enc.encode(&[(0, src.len() as u64, src.as_ptr())], 1) };
            assert_eq!(
                kinds(&enc),
                vec![(0, Raw, 2), (2, Zero, 1), (3, Raw, 1)],
                "{mode:?}"
            );
        }
        // A corrupt delta is refused before anything is written.
        assert!(delta_check(&[0, 200, 1], PAGE).is_err());
        assert!(delta_check(&[0x80, 0x40, 8, 1], PAGE).is_err());
    }

    #[test]
    fn auto_probes_each_codec_in_turn_and_every_probe_decodes() {
        let src: Vec<u8> = (0..8).flat_map(|i| page_from(i, true)).collect();
        let mut enc = Encoder::new(Mode::Auto, None);
        for want in [Encoding::Lz4, Encoding::Zstd, Encoding::Zstd] {
            // SAFETY: `src` outlives the encoding.
            unsafe { enc.encode(&[(0, src.len() as u64, src.as_ptr())], 0) };
            let mut dest = vec![0u8; src.len()];
            for e in &enc.entries {
                assert_eq!(e.encoding, want);
                let Body::Out(off) = e.body else {
                    panic!("a compressed entry's body is in the output buffer")
                };
                let at = e.addr as usize;
                let body = &enc.out[off..off + e.enc_len as usize];
                decompress_into(e.encoding, body, &mut dest[at..at + e.raw_len as usize]).unwrap();
            }
            assert_eq!(dest, src);
        }
        let a = enc.learned().auto;
        for (name, s) in [("lz4", a.lz4), ("zstd", a.zstd), ("strong", a.zstd_strong)] {
            assert!(
                s.cpu > 0.0 && s.probed > 0.0 && s.ratio < 0.5,
                "{name}: {s:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn every_codec_round_trips(kinds in proptest::collection::vec(0u8..3, 1..12), seed in any::<u64>(), level in 1i32..6) {
            let pages: Vec<Vec<u8>> = kinds.iter().enumerate().map(|(i, k)| match k {
                0 => vec![0u8; PAGE],
                1 => page_from(seed + i as u64, false),
                _ => page_from(seed + i as u64, true),
            }).collect();
            for mode in [Mode::None, Mode::Zero, Mode::Lz4, Mode::Zstd(level), Mode::Delta, Mode::Auto] {
                let cache = DeltaCache::new(1 << 20);
                let mut dest = vec![0xeeu8; pages.len() * PAGE];
                round_trip(mode, &pages, 0, Some(cache.clone()), &mut dest);
                // Round 1: some pages change a little; deltas apply to what round 0 left.
                let mut changed = pages.clone();
                for (i, p) in changed.iter_mut().enumerate() {
                    if i % 2 == 0 { p[i * 7 % PAGE] ^= 0x5a; p[100] = 1; }
                }
                round_trip(mode, &changed, 1, Some(cache.clone()), &mut dest);
                round_trip(mode, &changed, 2, Some(cache), &mut dest);
            }
        }

        #[test]
        fn delta_round_trips(old in proptest::collection::vec(any::<u8>(), PAGE), edits in proptest::collection::vec((0usize..PAGE, any::<u8>()), 0..64)) {
            let mut new = old.clone();
            for (i, b) in edits { new[i] = b; }
            let mut d = Vec::new();
            prop_assert!(delta_encode(&old, &new, &mut d, usize::MAX));
            let mut page = old.clone();
            delta_apply(&d, &mut page).unwrap();
            prop_assert_eq!(page, new);
        }

        #[test]
        fn decoders_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut out = vec![0u8; PAGE];
            let _ = decompress_into(Encoding::Lz4, &body, &mut out);
            let _ = decompress_into(Encoding::Zstd, &body, &mut out);
            let _ = delta_apply(&body, &mut out);
        }
    }
}
