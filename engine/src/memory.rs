//! Guest RAM: memfd-backed regions mapped with vm-memory.
//!
//! This module owns the host mappings of guest RAM and the RAM layout that travels to the
//! destination. It knows nothing of KVM or of the wire: the VM registers these regions as KVM
//! memory slots (slot `i` = region `i`), the scheduler reads pages from them in place and the
//! destination receives pages straight into them.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;

use crate::dirty::Extent;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

pub use crate::defaults::{MAX_RAM_BYTES, PAGE_SIZE};
/// Largest number of RAM regions in a layout.
pub const MAX_REGIONS: usize = 64;

/// Errors of guest RAM set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The declared layout is not usable.
    #[error("invalid RAM layout: {0}")]
    InvalidLayout(String),
    /// memfd_create or ftruncate failed.
    #[error("cannot create memfd for region at gpa {gpa:#x} ({size} bytes)")]
    Memfd {
        /// Guest physical address of the region.
        gpa: u64,
        /// Size of the region.
        size: u64,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// Huge pages cannot back a region.
    #[error("huge pages for the region at gpa {gpa:#x} ({size} bytes): {reason}")]
    HugePages {
        /// Guest physical address of the region.
        gpa: u64,
        /// Size of the region.
        size: u64,
        /// Why.
        reason: String,
    },
    /// mmap of a region failed.
    #[error("cannot map region at gpa {gpa:#x} ({size} bytes): {reason}")]
    Mmap {
        /// Guest physical address of the region.
        gpa: u64,
        /// Size of the region.
        size: u64,
        /// What vm-memory reported.
        reason: String,
    },
    /// Faulting a region's pages in failed (`MADV_POPULATE_WRITE`: Linux 5.14 or later).
    #[error("cannot fault in the region at gpa {gpa:#x}")]
    Populate {
        /// Guest physical address of the region.
        gpa: u64,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One contiguous range of guest-physical RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegionSpec {
    /// Guest physical start address (page aligned).
    pub gpa: u64,
    /// Length in bytes (page multiple).
    pub size: u64,
}

/// The RAM layout of a VM: sorted, non-overlapping, page-aligned regions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamLayout {
    /// Regions, sorted by address.
    pub regions: Vec<RamRegionSpec>,
}

impl RamLayout {
    /// One region of `bytes` starting at guest address 0.
    pub fn single(bytes: u64) -> Self {
        RamLayout {
            regions: vec![RamRegionSpec {
                gpa: 0,
                size: bytes,
            }],
        }
    }

    /// Checks alignment, ordering, overlap and the global size cap.
    pub fn validate(&self) -> Result<(), MemoryError> {
        let bad = |m: String| Err(MemoryError::InvalidLayout(m));
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS {
            return bad(format!(
                "{} regions (1..={MAX_REGIONS} allowed)",
                self.regions.len()
            ));
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.gpa % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 {
                return bad(format!(
                    "region {i} ({:#x}+{:#x}) not page aligned or empty",
                    r.gpa, r.size
                ));
            }
            if i > 0 && r.gpa < end {
                return bad(format!(
                    "region {i} at {:#x} overlaps or is out of order",
                    r.gpa
                ));
            }
            end = match r.gpa.checked_add(r.size) {
                Some(e) => e,
                None => return bad(format!("region {i} wraps the address space")),
            };
            total = total.saturating_add(r.size);
        }
        if total > MAX_RAM_BYTES {
            return bad(format!(
                "{total} bytes of RAM exceeds the {MAX_RAM_BYTES} byte limit"
            ));
        }
        Ok(())
    }

    /// Total bytes of RAM.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total pages of RAM.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// True when `[gpa, gpa + len)` lies inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.regions
            .iter()
            .any(|r| gpa >= r.gpa && end <= r.gpa + r.size)
    }
}

/// How the host pages behind guest RAM are faulted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// Lazily, on first touch.
    Lazy,
    /// Up front, at mapping time (`MAP_POPULATE`).
    Eager,
}

/// What backs guest RAM: ordinary pages or hugetlbfs pages (`--hugepages`), a setting of the
/// host process (a VM process or a destination), not of the VM: a VM moves between hosts
/// that back it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Backing {
    /// 4 KiB pages (memfd, allocated on first touch).
    #[default]
    #[serde(rename = "4K")]
    Normal,
    /// 2 MiB huge pages from the hugetlb pool.
    #[serde(rename = "2M")]
    Huge2M,
    /// 1 GiB huge pages from the hugetlb pool.
    #[serde(rename = "1G")]
    Huge1G,
}

crate::named_enum!(Backing, "page size", { Normal => "4K", Huge2M => "2M", Huge1G => "1G" });

impl Backing {
    /// Bytes per backing page.
    pub fn page_bytes(self) -> u64 {
        match self {
            Backing::Normal => PAGE_SIZE,
            Backing::Huge2M => 2 << 20,
            Backing::Huge1G => 1 << 30,
        }
    }

    /// memfd_create flags for this backing.
    fn memfd_flags(self) -> libc::c_uint {
        // MFD_HUGE_SHIFT is 26: the page size's log2 goes above it.
        match self {
            Backing::Normal => 0,
            Backing::Huge2M => libc::MFD_HUGETLB | (21 << 26),
            Backing::Huge1G => libc::MFD_HUGETLB | (30 << 26),
        }
    }

    /// The sysfs folder of this size's pool.
    fn pool(self) -> &'static str {
        match self {
            Backing::Normal => "",
            Backing::Huge2M => "/sys/kernel/mm/hugepages/hugepages-2048kB",
            Backing::Huge1G => "/sys/kernel/mm/hugepages/hugepages-1048576kB",
        }
    }

    /// Free pages of this size's pool (None: no such pool).
    pub fn free_pages(self) -> Option<u64> {
        std::fs::read_to_string(format!("{}/free_hugepages", self.pool()))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

/// Asks for transparent huge pages behind `len` bytes of ordinary guest RAM at `host`, as
/// QEMU does for its RAM: KVM then maps the guest's RAM 2 MiB at a time where the host has
/// such a page, so that a guest resumed on a destination — whose second-level page tables
/// start empty — takes one nested-paging fault per 2 MiB rather than per 4 KiB page it
/// touches. Guest RAM is a memfd, so this takes effect where the host lets shared memory have
/// huge pages (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`: `advise`, `within_size`
/// or `always`; most distributions ship `never`, where it does nothing). Where it takes
/// effect, a guest page written makes its whole 2 MiB data to [`GuestRam::split_holes`]. In
/// the nested VM, with `advise`, a resumed 256 MiB Linux guest took 0-64 such faults per
/// 60-100 ms sample instead of 100-520, and the longest silence after its first ping reply
/// was 53-128 ms in four migrations against 76-209 with 4 KiB pages (its first reply came no
/// sooner).
fn advise_huge(host: *mut u8, len: usize) {
    // SAFETY: advice on a live mapping of `len` bytes; it changes no byte of it. A kernel
    // without transparent huge pages refuses it (EINVAL), which leaves small pages.
    let _ = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
}

/// Faults in every page of the region at `gpa` not yet allocated, zero-filled
/// (`MADV_POPULATE_WRITE`), leaving the contents of the others as they are.
///
/// # Safety
///
/// `host` must be a live mapping of `len` bytes.
unsafe fn fault_in(gpa: u64, host: *mut u8, len: usize) -> Result<(), MemoryError> {
    // SAFETY: the caller's mapping; the advice only allocates missing pages and writes no byte
    // of an existing one.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
        return Err(MemoryError::Populate {
            gpa,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The backing of guest RAM this process allocates ([`set_backing`]).
static BACKING: AtomicU8 = AtomicU8::new(0);

/// Sets what backs the guest RAM this process allocates from now on (`--hugepages`).
pub fn set_backing(b: Backing) {
    BACKING.store(b as u8, Ordering::Relaxed);
}

/// What backs the guest RAM this process allocates.
pub fn backing() -> Backing {
    match BACKING.load(Ordering::Relaxed) {
        1 => Backing::Huge2M,
        2 => Backing::Huge1G,
        _ => Backing::Normal,
    }
}

/// Guest RAM: the regions of a [`RamLayout`], each backed by its own memfd and mapped shared.
#[derive(Debug, Clone)]
pub struct GuestRam {
    layout: RamLayout,
    memory: GuestMemoryMmap<AtomicBitmap>,
    backing: Backing,
}

impl GuestRam {
    /// Allocates RAM for `layout`, one memfd per region.
    pub fn new(layout: &RamLayout, populate: Populate) -> Result<Self, MemoryError> {
        layout.validate()?;
        let backing = backing();
        let huge = backing != Backing::Normal;
        let mut regions = Vec::with_capacity(layout.regions.len());
        for r in &layout.regions {
            let huge_err = |reason: String| MemoryError::HugePages {
                gpa: r.gpa,
                size: r.size,
                reason,
            };
            if huge && r.size % backing.page_bytes() != 0 {
                return Err(huge_err(format!(
                    "the region is not a multiple of {backing} pages"
                )));
            }
            if huge && backing.free_pages().is_none() {
                return Err(huge_err(format!(
                    "this kernel has no {backing} huge-page pool ({})",
                    backing.pool()
                )));
            }
            let file = memfd(r, backing)?;
            // Huge pages are reserved at mmap time (a short pool fails here, not with SIGBUS
            // on a later touch).
            let mut flags = libc::MAP_SHARED;
            if !huge {
                flags |= libc::MAP_NORESERVE;
            }
            // Ordinary pages are faulted in after the advice below, or they would all be
            // small.
            if populate == Populate::Eager && huge {
                flags |= libc::MAP_POPULATE;
            }
            let mmap_err = |reason: String| {
                if huge {
                    huge_err(format!(
                        "{reason}: {} pages of {backing} needed, {} free in the pool \
                         (reserve more: echo N > {}/nr_hugepages)",
                        r.size / backing.page_bytes(),
                        backing.free_pages().unwrap_or(0),
                        backing.pool()
                    ))
                } else {
                    MemoryError::Mmap {
                        gpa: r.gpa,
                        size: r.size,
                        reason,
                    }
                }
            };
            let size = usize::try_from(r.size).map_err(|e| mmap_err(e.to_string()))?;
            let mapping = MmapRegionBuilder::new_with_bitmap(
                size,
                <AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(size),
            )
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_file_offset(FileOffset::new(file, 0))
            .build()
            .map_err(|e| mmap_err(e.to_string()))?;
            if !huge {
                advise_huge(mapping.as_ptr(), size);
                if populate == Populate::Eager {
                    // SAFETY: `mapping` is a live mapping of `size` bytes.
                    unsafe { fault_in(r.gpa, mapping.as_ptr(), size)? };
                }
            }
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                .ok_or_else(|| mmap_err("address overflow".into()))?;
            regions.push(Arc::new(region));
        }
        let memory = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| MemoryError::InvalidLayout(e.to_string()))?;
        Ok(GuestRam {
            layout: layout.clone(),
            memory,
            backing,
        })
    }

    /// What backs it.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The layout this RAM was built from.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The vm-memory view of guest RAM (its bitmap records VMM-side writes).
    pub fn memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.memory
    }

    /// Host mappings of each region, in layout order: `(gpa, host address, length)`.
    pub fn host_regions(&self) -> Vec<(u64, *mut u8, u64)> {
        self.memory
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr(), r.len()))
            .collect()
    }

    /// Total bytes of RAM.
    pub fn total_bytes(&self) -> u64 {
        self.layout.total_bytes()
    }

    /// Faults in every page of guest RAM that is not yet, leaving contents as they are: a
    /// hole becomes an allocated zero page, as if the guest had written zeros there. The
    /// source then has no hole to skip and reads every page, as QEMU reads a RAM file
    /// written in full (`run-vm --populate-ram`, the benchmark's "written" cells).
    pub fn populate_all(&self) -> Result<(), MemoryError> {
        for (gpa, host, len) in self.host_regions() {
            // SAFETY: the region is a live mapping of `len` bytes at `host`.
            unsafe { fault_in(gpa, host, len as usize)? };
        }
        Ok(())
    }

    /// Splits `extents` into pages that may hold data and pages in holes of the backing memfd
    /// (never written since the RAM was allocated, so zero), without touching any page.
    pub fn split_holes(&self, extents: &[Extent]) -> (Vec<Extent>, Vec<Extent>) {
        if self.backing != Backing::Normal {
            // hugetlbfs does not tell data from holes (no SEEK_DATA): all of it is data.
            return (extents.to_vec(), Vec::new());
        }
        let mut data = Vec::new();
        let mut holes = Vec::new();
        for e in extents {
            let Some(region) = self.memory.iter().find(|r| {
                e.gpa >= r.start_addr().0 && e.gpa + e.bytes() <= r.start_addr().0 + r.len()
            }) else {
                data.push(*e);
                continue;
            };
            let Some(fo) = region.file_offset() else {
                data.push(*e);
                continue;
            };
            // A memfd with every page allocated has no hole, one with none is all hole:
            // either is told by its block count, without walking its pages (SEEK_HOLE over
            // a fully written memfd walks every page: ~9 ms per GiB here, in front of the
            // first page sent).
            match allocation(fo.file()) {
                Allocation::Full => {
                    data.push(*e);
                    continue;
                }
                Allocation::Empty => {
                    holes.push(*e);
                    continue;
                }
                Allocation::Partial => {}
            }
            let base = region.start_addr().0;
            let (start, end) = (e.gpa - base, e.gpa - base + e.bytes());
            let mut pos = start;
            while pos < end {
                let off = fo.start() + pos;
                let next_data = seek(fo.file(), off, libc::SEEK_DATA).map(|d| d - fo.start());
                let d = match next_data {
                    Some(d) => (d / PAGE_SIZE * PAGE_SIZE).min(end),
                    None => end,
                };
                if d > pos {
                    holes.push(Extent {
                        gpa: base + pos,
                        pages: (d - pos) / PAGE_SIZE,
                    });
                }
                if d >= end {
                    break;
                }
                let h = seek(fo.file(), fo.start() + d, libc::SEEK_HOLE)
                    .map(|h| (h - fo.start()).div_ceil(PAGE_SIZE) * PAGE_SIZE)
                    .unwrap_or(end)
                    .min(end);
                let h = h.max(d + PAGE_SIZE);
                data.push(Extent {
                    gpa: base + d,
                    pages: (h - d) / PAGE_SIZE,
                });
                pos = h;
            }
        }
        (data, holes)
    }

    /// Takes the VMM-side dirty bits of region `index` (pages written through vm-memory since
    /// the last call), one bit per page, and clears them.
    pub fn take_vmm_dirty(&self, index: usize) -> Vec<u64> {
        self.memory
            .iter()
            .nth(index)
            .map(|r| vm_memory::mmap::MmapRegion::bitmap(r).get_and_reset())
            .unwrap_or_default()
    }
}

/// How much of a memfd has pages behind it.
#[derive(Debug, PartialEq, Eq)]
enum Allocation {
    /// Every page.
    Full,
    /// None.
    Empty,
    /// Some, or unknown.
    Partial,
}

/// A memfd's allocation from its size and block count (shmem counts every page it holds,
/// swapped out or not, in `st_blocks`).
fn allocation(file: &File) -> Allocation {
    use std::os::unix::fs::MetadataExt;
    match file.metadata() {
        Ok(m) if m.blocks() == 0 => Allocation::Empty,
        Ok(m) if m.blocks().saturating_mul(512) >= m.len() => Allocation::Full,
        _ => Allocation::Partial,
    }
}

/// `lseek(fd, off, whence)`; None when there is no further data/hole (ENXIO) or on error.
fn seek(file: &File, off: u64, whence: i32) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

fn memfd(r: &RamRegionSpec, backing: Backing) -> Result<File, MemoryError> {
    let err = |source| MemoryError::Memfd {
        gpa: r.gpa,
        size: r.size,
        source,
    };
    // SAFETY: the name is a valid NUL-terminated C string; the call has no memory effects.
    let fd = unsafe {
        libc::memfd_create(
            c"livemig-ram".as_ptr(),
            libc::MFD_CLOEXEC | backing.memfd_flags(),
        )
    };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(r.size).map_err(err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_rejects_bad_regions() {
        assert!(RamLayout::single(1 << 20).validate().is_ok());
        assert!(RamLayout::single(0).validate().is_err());
        assert!(RamLayout::single(4095).validate().is_err());
        let overlap = RamLayout {
            regions: vec![
                RamRegionSpec {
                    gpa: 0,
                    size: 0x2000,
                },
                RamRegionSpec {
                    gpa: 0x1000,
                    size: 0x1000,
                },
            ],
        };
        assert!(overlap.validate().is_err());
        assert!(RamLayout::single(MAX_RAM_BYTES + PAGE_SIZE)
            .validate()
            .is_err());
        let wrap = RamLayout {
            regions: vec![RamRegionSpec {
                gpa: !0xfff,
                size: 0x2000,
            }],
        };
        assert!(wrap.validate().is_err());
    }

    #[test]
    fn holes_are_found_without_touching_pages() {
        let ram = GuestRam::new(&RamLayout::single(64 << 20), Populate::Lazy).unwrap();
        ram.memory().write_obj(1u8, GuestAddress(0x5000)).unwrap();
        ram.memory()
            .write_obj(1u8, GuestAddress(0x20_0000))
            .unwrap();
        let all = [Extent {
            gpa: 0,
            pages: (64 << 20) / PAGE_SIZE,
        }];
        let (data, holes) = ram.split_holes(&all);
        assert_eq!(
            Extent::total(&data) + Extent::total(&holes),
            (64 << 20) / PAGE_SIZE
        );
        assert!(data
            .iter()
            .any(|e| e.gpa <= 0x5000 && 0x5000 < e.gpa + e.bytes()));
        assert!(data
            .iter()
            .any(|e| e.gpa <= 0x20_0000 && 0x20_0000 < e.gpa + e.bytes()));
        assert!(Extent::total(&data) < 1024, "{data:?}");
        for h in &holes {
            for d in &data {
                assert!(h.gpa + h.bytes() <= d.gpa || d.gpa + d.bytes() <= h.gpa);
            }
        }
    }

    /// Whether this host gives shared memory transparent huge pages where asked.
    fn shmem_huge_pages() -> bool {
        let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        !(s.is_empty() || s.contains("[never]") || s.contains("[deny]"))
    }

    /// The `VmFlags` of this process's mapping that starts at `host`.
    fn vm_flags(host: *mut u8) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", host as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "no mapping at {start}");
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn ordinary_guest_ram_asks_for_transparent_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return; // a kernel without them refuses the advice
        }
        for populate in [Populate::Lazy, Populate::Eager] {
            let ram = GuestRam::new(&RamLayout::single(4 << 20), populate).unwrap();
            let (_, host, _) = ram.host_regions()[0];
            let flags = vm_flags(host);
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "{populate:?}: {flags}"
            );
        }
    }

    #[test]
    fn a_memfd_all_written_or_never_written_is_told_by_its_block_count() {
        let pages = (4 << 20) / PAGE_SIZE;
        let all = [Extent { gpa: 0, pages }];
        let file = |ram: &GuestRam| {
            ram.memory()
                .iter()
                .next()
                .unwrap()
                .file_offset()
                .unwrap()
                .file()
                .try_clone()
                .unwrap()
        };
        let fresh = GuestRam::new(&RamLayout::single(4 << 20), Populate::Lazy).unwrap();
        assert_eq!(allocation(&file(&fresh)), Allocation::Empty);
        assert_eq!(fresh.split_holes(&all), (vec![], all.to_vec()));
        let full = GuestRam::new(&RamLayout::single(4 << 20), Populate::Eager).unwrap();
        assert_eq!(allocation(&file(&full)), Allocation::Full);
        assert_eq!(full.split_holes(&all), (all.to_vec(), vec![]));
        // One page written: walked, and only that page is data — or its whole 2 MiB where
        // the host gives shared memory huge pages (see `advise_huge`).
        let one = GuestRam::new(&RamLayout::single(4 << 20), Populate::Lazy).unwrap();
        one.memory().write_obj(1u8, GuestAddress(0x3000)).unwrap();
        assert_eq!(allocation(&file(&one)), Allocation::Partial);
        let (data, holes) = one.split_holes(&all);
        let page = Extent {
            gpa: 0x3000,
            pages: 1,
        };
        // (A host short of free 2 MiB pages gives a small one even so.)
        let huge = Extent { gpa: 0, pages: 512 };
        assert!(
            data == vec![page] || (shmem_huge_pages() && data == vec![huge]),
            "{data:?}"
        );
        assert_eq!(Extent::total(&holes), pages - Extent::total(&data));
        // Faulted in throughout: no hole left, and the written page keeps its byte.
        one.populate_all().unwrap();
        assert_eq!(allocation(&file(&one)), Allocation::Full);
        assert_eq!(one.split_holes(&all), (all.to_vec(), vec![]));
        assert_eq!(
            one.memory().read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            1
        );
        assert_eq!(
            one.memory().read_obj::<u8>(GuestAddress(0x4000)).unwrap(),
            0
        );
    }

    #[test]
    fn contains_checks_bounds() {
        let l = RamLayout::single(0x10000);
        assert!(l.contains(0, 0x10000));
        assert!(!l.contains(0xf000, 0x2000));
        assert!(!l.contains(u64::MAX, 2));
    }

    #[test]
    fn ram_is_shared_memfd_and_tracks_vmm_writes() {
        let ram = GuestRam::new(&RamLayout::single(1 << 20), Populate::Lazy).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x3000))
            .unwrap();
        let region = ram.memory().iter().next().unwrap();
        assert!(region.file_offset().is_some());
        let words = ram.take_vmm_dirty(0);
        assert_eq!(words[0], 1 << 3);
        assert_eq!(
            ram.memory().read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0xdead_beef
        );
    }
}
