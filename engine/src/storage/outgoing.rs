//! The source's side of storage migration.
//!
//! Copy mode: every disk is mapped read-only at its transport address; round 0 carries the
//! allocated extents (holes are never read), later rounds the blocks the backend marked
//! dirty, the final round the last ones with the guest paused. When the disks' dirty set
//! shrinks less than twofold in a round — the guest writes about as fast as the link
//! carries — writes switch to
//! active mirroring: each guest write is queued on the storage channel and completes in the
//! guest once it is on the wire, so the copy converges whatever the write rate. The storage
//! channel hashes every block it sends, so the source's digests are ready at pause without
//! reading the disks again.
//!
//! Shared mode: nothing is copied. At pause the images are flushed; the locks are handed to
//! the destination just before the device state goes (the guest is paused, nothing writes),
//! and taken back if the migration rolls back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_transport::MappedRegion;

use super::image::{Mapping, MirrorHook};
use super::{disk_addr, disk_layout, offers, DiskReport, StorageMode, StorageReport, VmDisk};
use crate::digest::PageHashes;
use crate::dirty::{DirtyBitmap, Extent};
use crate::memory::PAGE_SIZE;
use crate::protocol::Message;

/// Dirty disk pages below which a slowly shrinking set is not worth mirroring for.
const MIRROR_THRESHOLD_PAGES: u64 = 256;

/// A VM's disks during an outgoing migration.
pub struct OutgoingStorage {
    mode: StorageMode,
    disks: Vec<VmDisk>,
    /// Blocks written and not sent yet.
    pending: DirtyBitmap,
    hashes: Arc<PageHashes>,
    mappings: Arc<Vec<Mapping>>,
    force_mirror: bool,
    mirror_since: Option<Instant>,
    mirrored: Duration,
    released: bool,
    report: StorageReport,
}

impl std::fmt::Debug for OutgoingStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingStorage")
            .field("mode", &self.mode)
            .field("disks", &self.disks.len())
            .finish_non_exhaustive()
    }
}

impl OutgoingStorage {
    /// Checks the disks for `mode` and, for a copy, maps them; `force_mirror` mirrors guest
    /// writes from the first round on.
    pub fn new(
        disks: Vec<VmDisk>,
        mode: StorageMode,
        force_mirror: bool,
    ) -> Result<OutgoingStorage, String> {
        super::check_disks(&disks, mode)?;
        let sizes: Vec<u64> = disks.iter().map(|d| d.image.size()).collect();
        let layout = disk_layout(&sizes);
        let mappings = if mode == StorageMode::Copy {
            disks
                .iter()
                .map(|d| d.image.map(false).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        Ok(OutgoingStorage {
            mode,
            hashes: Arc::new(PageHashes::new_zeroed(&layout)),
            pending: DirtyBitmap::new(&layout),
            mappings: Arc::new(mappings),
            force_mirror,
            mirror_since: None,
            mirrored: Duration::ZERO,
            released: false,
            report: StorageReport {
                mode: mode.to_string(),
                disks: disks
                    .iter()
                    .map(|d| DiskReport {
                        id: d.id.clone(),
                        source_path: d.image.path().display().to_string(),
                        size: d.image.size(),
                        allocated: d.image.allocated_bytes(),
                        ..DiskReport::default()
                    })
                    .collect(),
                ..StorageReport::default()
            },
            disks,
        })
    }

    /// Whether disk blocks travel (a copy of at least one disk).
    pub fn copying(&self) -> bool {
        self.mode == StorageMode::Copy && !self.disks.is_empty()
    }

    /// The disks' mappings as transport regions, and what keeps them mapped.
    pub fn regions(&self) -> (Vec<MappedRegion>, Arc<Vec<Mapping>>) {
        let regions = self
            .mappings
            .iter()
            .enumerate()
            .map(|(i, m)| MappedRegion {
                addr: disk_addr(i),
                host: m.ptr(),
                len: m.len(),
            })
            .collect();
        (regions, self.mappings.clone())
    }

    /// Hashes of what the storage channel sent.
    pub fn hashes(&self) -> Arc<PageHashes> {
        self.hashes.clone()
    }

    /// The Storage message announcing the disks.
    pub fn message(&self, directory: &str) -> Message {
        Message::Storage {
            mode: self.mode,
            directory: directory.to_string(),
            disks: offers(&self.disks),
        }
    }

    /// Copy mode: tracking starts before round 0 reads a block.
    pub fn start(&mut self) {
        if !self.copying() {
            return;
        }
        for d in self.writable() {
            d.image.start_tracking();
        }
    }

    fn writable(&self) -> impl Iterator<Item = &VmDisk> {
        self.disks.iter().filter(|d| !d.image.read_only())
    }

    /// Round 0: the allocated extents of every disk (read-only disks go once, here).
    pub fn first_round(&mut self) -> Vec<Extent> {
        if !self.copying() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            for (off, len) in d.image.allocated_extents() {
                out.push(Extent {
                    gpa: disk_addr(i) + off,
                    pages: len / PAGE_SIZE,
                });
            }
        }
        out
    }

    /// Collects the blocks written since the last harvest; returns how many blocks (pages)
    /// wait to be sent.
    pub fn harvest(&mut self) -> u64 {
        if !self.copying() {
            return 0;
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !d.image.read_only() {
                self.pending.or_words(i, &d.image.take_dirty());
            }
        }
        self.pending.count()
    }

    /// The blocks waiting to be sent, taken for a round.
    pub fn take_pending(&mut self) -> Vec<Extent> {
        let e = self.pending.extents();
        self.pending.clear();
        e
    }

    /// Counts a round's disk extents in the report.
    pub fn count(&mut self, extents: &[Extent]) {
        if extents.is_empty() {
            return;
        }
        self.report.rounds += 1;
        self.report.bytes_copied += extents.iter().map(Extent::bytes).sum::<u64>();
    }

    /// Notes the final round's disk extents (sent with the guest paused).
    pub fn count_final(&mut self, extents: &[Extent]) {
        self.report.dirty_blocks_in_downtime = Extent::total(extents);
    }

    /// After a pre-copy round that sent `sent` disk blocks and left `pending` to send:
    /// switches guest writes to active mirroring when the disks' dirty set shrinks less than
    /// twofold per round (the guest writes about as fast as the link carries, so rounds would
    /// not converge soon), or when asked to from the start. `hook(i)` makes the mirror of
    /// disk `i`.
    pub fn after_round(
        &mut self,
        sent: u64,
        pending: u64,
        hook: &dyn Fn(usize) -> Option<MirrorHook>,
    ) {
        if !self.copying() || self.mirror_since.is_some() {
            return;
        }
        let slow = pending > MIRROR_THRESHOLD_PAGES && pending * 2 >= sent;
        if self.force_mirror || slow {
            self.start_mirroring(hook);
        }
    }

    /// Mirrors from now on, if asked to from the start.
    pub fn mirror_from_start(&mut self, hook: &dyn Fn(usize) -> Option<MirrorHook>) {
        if self.copying() && self.force_mirror {
            self.start_mirroring(hook);
        }
    }

    fn start_mirroring(&mut self, hook: &dyn Fn(usize) -> Option<MirrorHook>) {
        let mut any = false;
        for (i, d) in self.disks.iter().enumerate() {
            if d.image.read_only() {
                continue;
            }
            if let Some(h) = hook(i) {
                d.image.start_mirroring(h);
                any = true;
            }
        }
        if any {
            tracing::info!("disk writes outrun the link: switching to active mirroring");
            self.mirror_since = Some(Instant::now());
        }
    }

    /// Whether guest writes are mirrored.
    pub fn mirroring(&self) -> bool {
        self.mirror_since.is_some()
    }

    /// The guest is paused: makes every write durable.
    pub fn flush(&self) -> Result<(), String> {
        for d in self.writable() {
            d.image
                .flush()
                .map_err(|e| format!("flushing disk {}: {e}", d.id))?;
        }
        Ok(())
    }

    /// Shared mode, just before the pause: makes what the guest wrote so far durable while
    /// it still runs, so that the flush inside the downtime has only the last writes left.
    /// A failure here is only logged: the flush in the downtime is the one that counts.
    pub fn flush_ahead(&self) {
        if self.mode != StorageMode::Shared {
            return;
        }
        if let Err(e) = self.flush() {
            tracing::warn!("flushing the disks ahead of the pause: {e}");
        }
    }

    /// Shared mode, guest paused and flushed: lets the destination take the locks.
    pub fn release_locks(&mut self) -> Result<(), String> {
        if self.mode != StorageMode::Shared {
            return Ok(());
        }
        self.flush()?;
        for d in self.writable() {
            d.image.unlock().map_err(|e| e.to_string())?;
        }
        self.released = true;
        Ok(())
    }

    /// The migration rolls back: takes the locks again before the guest resumes here.
    pub fn retake_locks(&mut self) -> Result<(), String> {
        if !self.released {
            return Ok(());
        }
        for d in self.writable() {
            d.image.lock().map_err(|e| {
                format!("{e}; the guest stays paused here so that two hosts never write one image")
            })?;
        }
        self.released = false;
        Ok(())
    }

    /// The digest of every disk as the storage channel sent it (copy mode).
    pub fn digests(&self) -> Vec<u64> {
        if !self.copying() {
            return Vec::new();
        }
        (0..self.disks.len())
            .map(|i| self.hashes.region_digest(i))
            .collect()
    }

    /// Ends tracking and mirroring (the migration ended either way; idempotent).
    pub fn stop(&mut self) {
        if let Some(since) = self.mirror_since.take() {
            self.mirrored += since.elapsed();
        }
        let mirrored: u64 = self.writable().map(|d| d.image.stop_tracking()).sum();
        self.report.mirrored_bytes += mirrored;
    }

    /// The report, with the digests both sides computed.
    pub fn report(&mut self, destination: &[u64]) -> StorageReport {
        self.stop();
        let source = self.digests();
        let mut r = self.report.clone();
        r.active_mirror_ms = self.mirrored.as_secs_f64() * 1000.0;
        for (i, d) in r.disks.iter_mut().enumerate() {
            if let Some(s) = source.get(i) {
                d.source_digest = format!("{s:016x}");
            }
            if let Some(x) = destination.get(i) {
                d.destination_digest = format!("{x:016x}");
            }
        }
        r
    }

    /// After a committed copy: deletes the source images (`--remove-source-storage`).
    /// Returns the errors, if any.
    pub fn remove_sources(&self) -> Vec<String> {
        if !self.copying() {
            return Vec::new();
        }
        let mut errors = Vec::new();
        for d in &self.disks {
            let p = d.image.path();
            if let Err(e) = std::fs::remove_file(&p) {
                errors.push(format!("{}: {e}", p.display()));
            }
        }
        errors
    }
}

impl Drop for OutgoingStorage {
    fn drop(&mut self) {
        self.stop();
    }
}
