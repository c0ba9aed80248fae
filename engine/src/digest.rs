//! RAM digests that prove a migration copied every byte.
//!
//! The digest of a RAM is xxh3-64 over the sequence of per-page xxh3-64 hashes (little-endian,
//! in layout order). The source computes it from its frozen RAM after the guest paused; the
//! destination keeps per-page hashes up to date as pages land (the receive path knows exactly
//! which pages it wrote, and nothing else writes destination RAM before resume), so its digest
//! costs no extra pass over RAM during the downtime.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};

use twox_hash::XxHash3_64;

use crate::dirty::Extent;
use crate::memory::{GuestRam, RamLayout, PAGE_SIZE};

/// Hash of one page: XXH3-64, seed 0 (twox-hash picks AVX2 or SSE2 at run time; the value
/// is the same either way).
pub fn page_hash(page: &[u8]) -> u64 {
    XxHash3_64::oneshot(page)
}

/// Per-page hashes of a RAM layout, updated concurrently by receivers.
#[derive(Debug)]
pub struct PageHashes {
    /// `(gpa, first index)` per region.
    regions: Vec<(u64, u64, usize)>,
    hashes: Vec<AtomicU64>,
    zero: u64,
}

impl PageHashes {
    /// Hashes for `layout`, every page starting as a zero page (fresh RAM is zero).
    pub fn new_zeroed(layout: &RamLayout) -> Self {
        let zero = page_hash(&[0u8; PAGE_SIZE as usize]);
        let mut regions = Vec::new();
        let mut idx = 0usize;
        for r in &layout.regions {
            regions.push((r.gpa, r.size, idx));
            idx += (r.size / PAGE_SIZE) as usize;
        }
        PageHashes {
            regions,
            hashes: (0..idx).map(|_| AtomicU64::new(zero)).collect(),
            zero,
        }
    }

    /// Re-hashes the pages of `[gpa, gpa + len)` whose bytes start at `host`.
    ///
    /// # Safety
    ///
    /// `host..host + len` must be readable and not written concurrently for the duration of
    /// the call.
    pub unsafe fn update(&self, gpa: u64, len: u64, host: *const u8) {
        let Some(&(base, _, first)) = self
            .regions
            .iter()
            .find(|(b, s, _)| gpa >= *b && gpa + len <= b + s)
        else {
            return;
        };
        let first_page = first + ((gpa - base) / PAGE_SIZE) as usize;
        for i in 0..(len / PAGE_SIZE) as usize {
            // SAFETY: page `i` lies inside `host..host + len`, which the caller guarantees
            // readable and stable.
            let page = unsafe {
                std::slice::from_raw_parts(host.add(i * PAGE_SIZE as usize), PAGE_SIZE as usize)
            };
            if let Some(h) = self.hashes.get(first_page + i) {
                h.store(page_hash(page), Ordering::Relaxed);
            }
        }
    }

    /// For the pages of `[gpa, gpa + len)` whose hash is not the zero page's, calls
    /// `clear(start, bytes)` on each run of them and records them as zero.
    pub fn clear_nonzero(&self, gpa: u64, len: u64, mut clear: impl FnMut(u64, u64)) {
        let Some(&(base, _, first)) = self
            .regions
            .iter()
            .find(|(b, s, _)| gpa >= *b && gpa + len <= b + s)
        else {
            return;
        };
        let first_page = first + ((gpa - base) / PAGE_SIZE) as usize;
        let pages = (len / PAGE_SIZE) as usize;
        let mut run: Option<usize> = None;
        for i in 0..=pages {
            let nonzero = i < pages
                && self
                    .hashes
                    .get(first_page + i)
                    .is_some_and(|h| h.load(Ordering::Relaxed) != self.zero);
            match (nonzero, run) {
                (true, None) => run = Some(i),
                (false, Some(s)) => {
                    clear(gpa + s as u64 * PAGE_SIZE, (i - s) as u64 * PAGE_SIZE);
                    for k in s..i {
                        self.hashes[first_page + k].store(self.zero, Ordering::Relaxed);
                    }
                    run = None;
                }
                _ => {}
            }
        }
    }

    /// Whether `gpa` lies in one of the hashed regions.
    pub fn covers(&self, gpa: u64) -> bool {
        self.regions
            .iter()
            .any(|&(b, s, _)| gpa >= b && gpa - b < s)
    }

    /// The digest of region `index` alone (a disk's digest: the same construction as
    /// [`crate::storage::image::DiskImage::digest`]); 0 for a region that does not exist.
    pub fn region_digest(&self, index: usize) -> u64 {
        let Some(&(_, size, first)) = self.regions.get(index) else {
            return 0;
        };
        let pages = (size / PAGE_SIZE) as usize;
        fold(&self.hashes[first..first + pages])
    }

    /// The digest of the hashed RAM.
    pub fn digest(&self) -> u64 {
        fold(&self.hashes)
    }
}

/// xxh3-64 over `hashes` as little-endian bytes, streamed through a small buffer: the
/// destination computes it inside the downtime, where building the byte string first (8 MiB
/// for 4 GiB of RAM, freshly allocated, so faulted in) cost ~30 ms.
fn fold(hashes: &[AtomicU64]) -> u64 {
    const BATCH: usize = 512;
    let mut h = XxHash3_64::new();
    let mut buf = [0u8; BATCH * 8];
    for batch in hashes.chunks(BATCH) {
        for (out, v) in buf.chunks_exact_mut(8).zip(batch) {
            out.copy_from_slice(&v.load(Ordering::Relaxed).to_le_bytes());
        }
        h.write(&buf[..batch.len() * 8]);
    }
    h.finish()
}

/// Digest of `ram`: every page that may hold data is read; pages in holes of the backing
/// memfd (never written since the RAM was allocated: zero) keep the zero page's hash without
/// being touched, so untouched RAM costs no page fault. The guest must not run meanwhile.
pub fn ram_digest(ram: &GuestRam) -> u64 {
    ram_digest_paced(ram, 1.0)
}

/// Pages [`ram_digest_paced`] hashes between its pauses (2 MiB).
const PACED_SLICE_PAGES: u64 = 512;

/// [`ram_digest`] on at most `duty` (0 to 1) of one core: after each slice of
/// 512 pages (2 MiB) it sleeps so that its work is that share of the time it takes.
/// Where the pass shares cores with a guest that has just resumed (both hosts on one machine:
/// a benchmark, the nested VM), the guest keeps the rest.
pub fn ram_digest_paced(ram: &GuestRam, duty: f64) -> u64 {
    let idle = if duty > 0.0 && duty < 1.0 {
        (1.0 - duty) / duty
    } else {
        0.0
    };
    let hashes = PageHashes::new_zeroed(ram.layout());
    for (gpa, host, len) in ram.host_regions() {
        let whole = [Extent {
            gpa,
            pages: len / PAGE_SIZE,
        }];
        for e in ram.split_holes(&whole).0 {
            let mut done = 0;
            while done < e.pages {
                let pages = (e.pages - done).min(PACED_SLICE_PAGES);
                let at = e.gpa + done * PAGE_SIZE;
                let t = std::time::Instant::now();
                // SAFETY: the slice lies inside `host..host + len`, a live mapping of `ram`;
                // the caller guarantees the guest is not running, so nothing writes it.
                unsafe { hashes.update(at, pages * PAGE_SIZE, host.add((at - gpa) as usize)) };
                if idle > 0.0 {
                    std::thread::sleep(t.elapsed().mul_f64(idle));
                }
                done += pages;
            }
        }
    }
    hashes.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Populate;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn incremental_hashes_match_a_full_pass() {
        let layout = RamLayout::single(1 << 20);
        let ram = GuestRam::new(&layout, Populate::Lazy).unwrap();
        let fresh = PageHashes::new_zeroed(&layout);
        assert_eq!(fresh.digest(), ram_digest(&ram));
        ram.memory().write_obj(7u64, GuestAddress(0x5008)).unwrap();
        assert_ne!(fresh.digest(), ram_digest(&ram));
        let (gpa, host, _) = ram.host_regions()[0];
        // SAFETY: the mapping is live and nothing writes it during the call.
        unsafe { fresh.update(gpa + 0x5000, 0x1000, host.add(0x5000)) };
        assert_eq!(fresh.digest(), ram_digest(&ram));
    }

    #[test]
    fn a_paced_pass_gives_the_same_digest_at_about_its_share_of_a_core() {
        let layout = RamLayout::single(16 << 20);
        let ram = GuestRam::new(&layout, Populate::Lazy).unwrap();
        for i in 0..(16u64 << 20) / PAGE_SIZE {
            if i % 3 != 0 {
                ram.memory()
                    .write_obj(i * 0x9e37_79b9, GuestAddress(i * PAGE_SIZE + 8 * (i % 500)))
                    .unwrap();
            }
        }
        let full = ram_digest(&ram);
        let t = std::time::Instant::now();
        let cpu = crate::scheduler::thread_cpu_ns();
        assert_eq!(ram_digest_paced(&ram, 0.25), full);
        let (wall, cpu) = (
            t.elapsed().as_nanos() as f64,
            crate::scheduler::thread_cpu_ns().saturating_sub(cpu) as f64,
        );
        // A quarter of a core: its CPU time a quarter of its wall-clock time, or less (the
        // sleeps take at least what they ask for; a busy host only lowers the share).
        assert!(cpu <= 0.4 * wall, "cpu {cpu} ns of {wall} ns");
        assert_eq!(ram_digest_paced(&ram, 0.0), full);
    }

    #[test]
    fn page_hashes_and_folds_are_xxh3_64_as_older_versions_computed_them() {
        // Known answers of the reference XXH3-64 (seed 0), as the digests of every earlier
        // version were computed: a destination must compute what an older source compares.
        assert_eq!(page_hash(&[0u8; PAGE_SIZE as usize]), 0x93d7_6fe1_48c6_89ba);
        let page: Vec<u8> = (0..PAGE_SIZE as u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(page_hash(&page), 0x5d90_27c8_4d5f_33f7);
        assert_eq!(page_hash(&[]), 0x2d06_8005_38d3_94c2);
        let hashes: Vec<AtomicU64> = (0..1000).map(AtomicU64::new).collect();
        assert_eq!(fold(&hashes), 0x2946_2356_e2d9_061a);
    }

    #[test]
    fn the_streamed_digest_is_xxh3_over_the_page_hashes() {
        // Not a multiple of the fold's batch, so its last batch is a short one.
        let layout = RamLayout::single(1037 * PAGE_SIZE);
        let ram = GuestRam::new(&layout, Populate::Lazy).unwrap();
        for i in 0..1037u64 {
            ram.memory()
                .write_obj(i * 31 + 1, GuestAddress(i * PAGE_SIZE + 8 * (i % 7)))
                .unwrap();
        }
        let (gpa, host, len) = ram.host_regions()[0];
        let hashes = PageHashes::new_zeroed(&layout);
        // SAFETY: the mapping is live and nothing writes it during the call.
        unsafe { hashes.update(gpa, len, host) };
        let mut bytes = Vec::new();
        for i in 0..1037 {
            // SAFETY: page `i` lies inside the live mapping, written above, not written now.
            let page = unsafe {
                std::slice::from_raw_parts(host.add((i * PAGE_SIZE) as usize), PAGE_SIZE as usize)
            };
            bytes.extend_from_slice(&page_hash(page).to_le_bytes());
        }
        assert_eq!(hashes.digest(), XxHash3_64::oneshot(&bytes));
        assert_eq!(hashes.region_digest(0), XxHash3_64::oneshot(&bytes));
    }

    #[test]
    fn the_digest_reads_written_pages_and_leaves_holes_untouched() {
        let layout = RamLayout::single(4 << 20);
        let ram = GuestRam::new(&layout, Populate::Lazy).unwrap();
        ram.memory().write_obj(7u64, GuestAddress(0x5008)).unwrap();
        ram.memory()
            .write_obj(9u64, GuestAddress(0x20_0000))
            .unwrap();
        // Every page hashed, read or not, gives the same digest.
        let full = PageHashes::new_zeroed(&layout);
        let (gpa, host, len) = ram.host_regions()[0];
        let digest = ram_digest(&ram);
        // SAFETY: the mapping is live and nothing writes it during the call.
        unsafe { full.update(gpa, len, host) };
        assert_eq!(digest, full.digest());
        let mut written = PageHashes::new_zeroed(&layout);
        assert_ne!(digest, written.digest());
        // The digest itself did not fault the untouched pages in: they are still holes.
        let whole = [Extent {
            gpa,
            pages: len / PAGE_SIZE,
        }];
        let fresh = GuestRam::new(&layout, Populate::Lazy).unwrap();
        fresh
            .memory()
            .write_obj(7u64, GuestAddress(0x5008))
            .unwrap();
        let _ = ram_digest(&fresh);
        let (data, holes) = fresh.split_holes(&whole);
        assert_eq!(Extent::total(&data), 1, "{data:?}");
        assert_eq!(Extent::total(&holes), len / PAGE_SIZE - 1);
        written = PageHashes::new_zeroed(&layout);
        let (fgpa, fhost, _) = fresh.host_regions()[0];
        // SAFETY: as above.
        unsafe { written.update(fgpa + 0x5000, 0x1000, fhost.add(0x5000)) };
        assert_eq!(ram_digest(&fresh), written.digest());
    }
}
