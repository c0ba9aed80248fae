//! TCP receivers: one thread per data connection reads pages straight into guest RAM, a
//! hashing thread beside each keeps the per-page digest, and the receivers meet at a barrier
//! on each round's marker, so a page re-sent in round k+1 can never be overtaken by its stale
//! copy from round k on another connection.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_transport::tcp::{DataReceiver, Landed, Received};
use livemig_transport::MemoryMap;

use super::channels::{memory_map, IncomingPlane};
use crate::digest::{ram_digest, PageHashes};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::scheduler::thread_cpu_ns;
use crate::session::{Control, MigrationError};
use crate::storage::incoming::IncomingStorage;

/// The TCP data plane: receivers, their barrier and the page hashes.
pub(super) struct TcpPlane {
    shared: Arc<Shared>,
    hashes: Arc<Hashes>,
    workers: Vec<JoinHandle<()>>,
}

/// Per-page hashes of what landed: guest RAM, and the disk copies.
pub(super) struct Hashes {
    ram: PageHashes,
    disks: Option<Arc<PageHashes>>,
}

impl Hashes {
    /// The hashes `gpa` belongs to.
    fn of(&self, gpa: u64) -> &PageHashes {
        match &self.disks {
            Some(d) if gpa >= crate::storage::DISK_BASE => d,
            _ => &self.ram,
        }
    }
}

impl TcpPlane {
    /// Starts one receiver per connection, writing into `ram`. A receiver's failure cuts
    /// `ctl` too, so the control thread stops waiting. With `counted`, every marker says how
    /// many pages its round sent on its channel, and they must all have landed.
    pub(super) fn start(
        receivers: Vec<DataReceiver>,
        ram: &GuestRam,
        storage: &IncomingStorage,
        ctl: &Control,
        counted: bool,
        hashing: Hashing,
    ) -> Result<TcpPlane, MigrationError> {
        let shared = Arc::new(Shared::new(receivers.len(), counted));
        if let Ok(c) = ctl.stream().try_clone() {
            *shared.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        }
        let hashes = Arc::new(Hashes {
            ram: PageHashes::new_zeroed(ram.layout()),
            disks: storage.hashes(),
        });
        let map = memory_map(ram, Some(storage));
        let hashing = hashing.for_receivers(receivers.len());
        let mut plane = TcpPlane {
            shared,
            hashes,
            workers: Vec::new(),
        };
        for (i, rx) in receivers.into_iter().enumerate() {
            if let Ok(c) = rx.stream().try_clone() {
                plane
                    .shared
                    .streams
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
            match spawn_receiver(
                i,
                rx,
                map.clone(),
                plane.hashes.clone(),
                plane.shared.clone(),
                hashing,
            ) {
                Ok(w) => plane.workers.push(w),
                Err(e) => {
                    plane.close();
                    return Err(e);
                }
            }
        }
        Ok(plane)
    }
}

impl IncomingPlane for TcpPlane {
    fn round_progress(&mut self, _: u64, _: u64, _: bool) -> Result<(), String> {
        Err(
            "RoundProgress on a TCP migration (rounds end with markers on the data channels)"
                .into(),
        )
    }

    fn round_extents(&mut self, _: u64, _: &[(u64, u64)]) -> Result<(), String> {
        Err("RoundExtents on a TCP migration (the receivers hash what they write)".into())
    }

    fn pages(&self) -> u64 {
        self.shared.pages.load(Ordering::Relaxed)
    }

    fn wait_landed(&self, round: u64, limit: Duration) -> Result<bool, MigrationError> {
        match self.shared.wait_round(round, limit) {
            Ok(()) => Ok(true),
            // Still landing after the limit: the source pauses anyway, and the rest lands in
            // the downtime, as it would have without asking.
            Err(MigrationError::Timeout { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn finish(&mut self, final_round: u64, timeout: Duration) -> Result<(), MigrationError> {
        let r = self.shared.wait_round(final_round, timeout);
        // RAM closes here: the receivers stop and are joined before anything reads or runs
        // on it.
        self.close();
        r
    }

    fn digest(&self, _ram: &GuestRam) -> (u64, u64) {
        (
            self.hashes.ram.digest(),
            self.shared.cpu_ns.load(Ordering::Relaxed),
        )
    }

    fn failure(&self) -> Option<String> {
        self.shared.first_error()
    }

    fn close(&mut self) {
        self.shared.finish();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for TcpPlane {
    fn drop(&mut self) {
        self.close();
    }
}

/// State shared by the receivers and the control thread.
struct Shared {
    channels: usize,
    /// Markers carry the pages of their round, checked against what landed.
    counted: bool,
    barrier: Mutex<BarrierState>,
    cv: Condvar,
    streams: Mutex<Vec<TcpStream>>,
    control: Mutex<Option<TcpStream>>,
    finished: AtomicBool,
    pages: AtomicU64,
    cpu_ns: AtomicU64,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    completed: Option<u64>,
    error: Option<String>,
}

impl Shared {
    fn new(channels: usize, counted: bool) -> Self {
        Shared {
            channels,
            counted,
            barrier: Mutex::new(BarrierState::default()),
            cv: Condvar::new(),
            streams: Mutex::new(Vec::new()),
            control: Mutex::new(None),
            finished: AtomicBool::new(false),
            pages: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BarrierState> {
        self.barrier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver reached the marker of `round`: wait until every channel has.
    fn arrive(&self, round: u64) -> Result<(), ()> {
        let mut s = self.lock();
        s.arrived += 1;
        if s.arrived == self.channels {
            s.arrived = 0;
            s.completed = Some(round);
            self.cv.notify_all();
            return Ok(());
        }
        while s.completed.is_none_or(|c| c < round) && s.error.is_none() {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.error.is_some() {
            Err(())
        } else {
            Ok(())
        }
    }

    fn wait_round(&self, round: u64, timeout: Duration) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if let Some(e) = &s.error {
                return Err(MigrationError::DataChannel(e.clone()));
            }
            if s.completed.is_some_and(|c| c >= round) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MigrationError::Timeout {
                    secs: timeout.as_secs(),
                    during: "waiting for the last round of pages",
                });
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A receiver failed: record it, wake everyone, and cut every connection so the control
    /// thread stops waiting.
    fn fail(&self, reason: String) {
        if self.finished.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut s = self.lock();
            if s.error.is_none() {
                s.error = Some(reason);
            }
        }
        self.cv.notify_all();
        self.shutdown_streams();
        if let Some(c) = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn first_error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// The migration is over (either way): receivers may stop.
    fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
        {
            let mut s = self.lock();
            if s.error.is_none() {
                s.error = Some("migration finished".into());
            }
        }
        self.cv.notify_all();
        self.shutdown_streams();
    }

    fn shutdown_streams(&self) {
        for s in self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Where a receiver hashes the pages it lands (the destination's half of the RAM digest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Hashing {
    /// Chosen by the host's cores: beside where it has a core to spare per receiver, inline
    /// otherwise.
    #[default]
    Auto,
    /// In a thread of its own, in the time the receiver waits on its socket: where the host
    /// has a core to spare for it.
    Beside,
    /// In the receiving thread, right after landing each batch, while the pages are still in
    /// its core's cache: where every core is needed already (the receivers, and a vCPU or a
    /// same-host source). Hashing pages just written costs a fraction of reading them back
    /// from RAM later: on this 2-core host, 256 MiB of text over shaped 1 GbE with zstd took
    /// 0.96x the time (8 pairs, 7 faster) and loopback random in clear 0.79-0.85x the
    /// destination's CPU, the time level (1 and 2 connections, 11 pairs).
    Inline,
}

impl Hashing {
    /// As set; [`Hashing::Auto`]: beside each of `receivers` where the host has at least a core
    /// per receiver and per hasher besides one for the guest, inline otherwise.
    fn for_receivers(self, receivers: usize) -> Hashing {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        match self {
            Hashing::Auto if cores > 2 * receivers => Hashing::Beside,
            Hashing::Auto => Hashing::Inline,
            set => set,
        }
    }
}

/// Work for a receiver's hashing thread.
enum HashJob {
    /// Ranges the receiver wrote.
    Pages(Vec<(u64, u64)>),
    /// Answer with the CPU time used since the last flush once every earlier job is done.
    Flush(crossbeam_channel::Sender<u64>),
}

fn spawn_receiver(
    index: usize,
    rx: DataReceiver,
    map: MemoryMap,
    hashes: Arc<Hashes>,
    shared: Arc<Shared>,
    hashing: Hashing,
) -> Result<JoinHandle<()>, MigrationError> {
    std::thread::Builder::new()
        .name(format!("livemig-rx{index}"))
        .spawn(move || {
            // Receivers take the cores from the top down while senders (on a same-host
            // migration) take them from the bottom up, so a sender and its receiver do not
            // share a core.
            if let Some(cores) = core_affinity::get_core_ids().filter(|c| !c.is_empty()) {
                core_affinity::set_for_current(cores[cores.len() - 1 - index % cores.len()]);
            }
            let (jobs, hasher) = match hashing {
                Hashing::Auto | Hashing::Inline => (None, None),
                Hashing::Beside => match spawn_hasher(index, map.clone(), hashes.clone()) {
                    Ok((jobs, hasher)) => (Some(jobs), Some(hasher)),
                    Err(_) => {
                        shared.fail(format!("channel {index}: cannot start its hashing thread"));
                        return;
                    }
                },
            };
            let mut r = Receiver {
                index,
                rx,
                map,
                hashes,
                shared: shared.clone(),
                jobs,
                expected_round: 0,
                round_pages: 0,
                cpu: thread_cpu_ns(),
            };
            let result = r.run();
            drop(r);
            if let Some(h) = hasher {
                let _ = h.join();
            }
            if let Err(e) = result {
                shared.fail(e);
            }
        })
        .map_err(|e| {
            MigrationError::DataChannel(format!("cannot start receiver thread {index}: {e}"))
        })
}

/// Page hashing runs beside the receiver, in the time the receiver waits on its socket; each
/// round's hashing finishes before the receiver reaches the round's barrier, so no page is
/// hashed while a later round rewrites it.
fn spawn_hasher(
    index: usize,
    map: MemoryMap,
    hashes: Arc<Hashes>,
) -> std::io::Result<(crossbeam_channel::Sender<HashJob>, JoinHandle<()>)> {
    let (jobs, job_rx) = crossbeam_channel::bounded::<HashJob>(8);
    let handle = std::thread::Builder::new()
        .name(format!("livemig-hash{index}"))
        .spawn(move || {
            let mut cpu = thread_cpu_ns();
            for job in job_rx {
                match job {
                    HashJob::Pages(ranges) => {
                        for (gpa, len) in ranges {
                            if let Ok(host) = map.host_ptr(gpa, len) {
                                // SAFETY: the receiver wrote this range in the current round
                                // and nothing writes it again before the round's barrier,
                                // which waits for this job (Flush below).
                                unsafe { hashes.of(gpa).update(gpa, len, host) };
                            }
                        }
                    }
                    HashJob::Flush(done) => {
                        let now = thread_cpu_ns();
                        let _ = done.send(now - cpu);
                        cpu = now;
                    }
                }
            }
        })?;
    Ok((jobs, handle))
}

/// One data connection's receiving loop.
struct Receiver {
    index: usize,
    rx: DataReceiver,
    map: MemoryMap,
    hashes: Arc<Hashes>,
    shared: Arc<Shared>,
    /// The hashing thread's queue; None: this thread hashes ([`Hashing::Inline`]).
    jobs: Option<crossbeam_channel::Sender<HashJob>>,
    expected_round: u64,
    /// Pages landed since the last marker.
    round_pages: u64,
    cpu: u64,
}

impl Receiver {
    /// Receives until the migration finishes (`Ok`) or this channel fails (`Err`).
    fn run(&mut self) -> Result<(), String> {
        let mut landed = Landed::default();
        loop {
            landed.clear();
            match self.rx.recv(&self.map, &mut landed) {
                Ok(Received::Extents { .. }) => self.landed(&mut landed)?,
                Ok(Received::Marker(round)) if !self.shared.counted => {
                    if !self.marker(round)? {
                        return Ok(());
                    }
                }
                Ok(Received::CountedMarker { value, pages }) if self.shared.counted => {
                    let landed = std::mem::take(&mut self.round_pages);
                    if pages != landed {
                        return Err(format!(
                            "channel {}: round {value}: the source sent {pages} pages, {landed} \
                             arrived",
                            self.index
                        ));
                    }
                    if !self.marker(value)? {
                        return Ok(());
                    }
                }
                Ok(m) => {
                    return Err(format!(
                        "channel {}: {m:?} where the session agreed {} markers",
                        self.index,
                        if self.shared.counted {
                            "counted"
                        } else {
                            "plain"
                        }
                    ))
                }
                Err(e) => return Err(format!("channel {}: {e}", self.index)),
            }
        }
    }

    /// Pages landed: data is hashed (here or by the hashing thread), zero ranges are cleared
    /// where an earlier round filled them.
    fn landed(&mut self, landed: &mut Landed) -> Result<(), String> {
        let mut pages: u64 = landed.data.iter().map(|&(_, len)| len / PAGE_SIZE).sum();
        match &self.jobs {
            None => {
                for &(gpa, len) in &landed.data {
                    if let Ok(host) = self.map.host_ptr(gpa, len) {
                        // SAFETY: this receiver has just written the range, in the current
                        // round, and nothing writes it again before the round's barrier,
                        // which this thread reaches only after this call.
                        unsafe { self.hashes.of(gpa).update(gpa, len, host) };
                    }
                }
            }
            Some(jobs) => {
                if !landed.data.is_empty()
                    && jobs
                        .send(HashJob::Pages(std::mem::take(&mut landed.data)))
                        .is_err()
                {
                    return Err(format!("channel {}: hashing thread stopped", self.index));
                }
            }
        }
        for &(gpa, len) in &landed.zero {
            // Zero pages were not written by the transport: clear the ones an earlier round
            // filled (fresh RAM is zero already).
            let map = &self.map;
            self.hashes.of(gpa).clear_nonzero(gpa, len, |start, bytes| {
                // SAFETY: inside registered memory, written only by this receiver until the
                // next barrier. (A disk copy's range becomes a hole again.)
                let _ = unsafe { map.clear(start, bytes) };
            });
            pages += len / PAGE_SIZE;
        }
        self.shared.pages.fetch_add(pages, Ordering::Relaxed);
        self.round_pages = self.round_pages.saturating_add(pages);
        Ok(())
    }

    /// The marker of `round`: its pages are hashed, then this channel meets the others at the
    /// barrier. False once the migration finished.
    fn marker(&mut self, round: u64) -> Result<bool, String> {
        if round != self.expected_round {
            return Err(format!(
                "channel {}: round marker {round}, expected {}",
                self.index, self.expected_round
            ));
        }
        self.expected_round += 1;
        // Inline, the hashing is this thread's own CPU time.
        let hash_cpu = match &self.jobs {
            None => 0,
            Some(jobs) => {
                let (done, wait) = crossbeam_channel::bounded(1);
                let Some(cpu) = jobs
                    .send(HashJob::Flush(done))
                    .ok()
                    .and_then(|()| wait.recv().ok())
                else {
                    return Err(format!("channel {}: hashing thread stopped", self.index));
                };
                cpu
            }
        };
        let now = thread_cpu_ns();
        self.shared
            .cpu_ns
            .fetch_add(now - self.cpu + hash_cpu, Ordering::Relaxed);
        self.cpu = now;
        Ok(self.shared.arrive(round).is_ok())
    }
}

/// [`ram_digest`] (same value), computed on every core: it runs inside the downtime. Returns
/// the digest and the CPU time used.
pub(super) fn full_digest(ram: &GuestRam) -> (u64, u64) {
    const PIECE: u64 = 16 << 20;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    if threads == 1 {
        let cpu = thread_cpu_ns();
        let d = ram_digest(ram);
        return (d, thread_cpu_ns().saturating_sub(cpu));
    }
    let hashes = PageHashes::new_zeroed(ram.layout());
    let pieces: Vec<(u64, usize, u64)> = ram
        .host_regions()
        .into_iter()
        .flat_map(|(gpa, host, len)| {
            (0..len.div_ceil(PIECE)).map(move |i| {
                let off = i * PIECE;
                (
                    gpa + off,
                    host as usize + off as usize,
                    PIECE.min(len - off),
                )
            })
        })
        .collect();
    let next = AtomicU64::new(0);
    let cpu = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let start = thread_cpu_ns();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(gpa, host, len)) = pieces.get(i) else {
                        break;
                    };
                    // SAFETY: `host..host + len` lies inside a live mapping of `ram` (borrowed
                    // for the whole scope); the guest is not running and the source's access
                    // was revoked, so nothing writes it meanwhile.
                    unsafe { hashes.update(gpa, len, host as *const u8) };
                }
                cpu.fetch_add(thread_cpu_ns().saturating_sub(start), Ordering::Relaxed);
            });
        }
    });
    (hashes.digest(), cpu.into_inner())
}
