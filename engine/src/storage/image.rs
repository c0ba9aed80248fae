//! A disk image: a raw (possibly sparse) file or a host block device, with what migration
//! needs of it — the exclusive lock of whoever runs the VM, the allocated extents, a
//! dirty-block bitmap while a copy runs, an active-mirror hook, a mapping for the transport,
//! and a digest.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::defaults::PAGE_SIZE;

/// Sector size of disks.
pub const SECTOR: u64 = 512;
/// Granule of dirty-block tracking (a guest page, so disk blocks travel like pages).
pub const BLOCK: u64 = PAGE_SIZE;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Errors of a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("disk image {path}: {source}")]
    Open {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is not usable as a disk.
    #[error("disk image {path}: {reason}")]
    Unusable {
        /// The image.
        path: String,
        /// Why.
        reason: String,
    },
    /// Another process holds the image.
    #[error(
        "disk image {path} is in use: another process (a VM on this or another host sharing the storage) holds its lock"
    )]
    Locked {
        /// The image.
        path: String,
    },
    /// Locking, mapping or syncing failed.
    #[error("disk image {path}: {op} failed: {source}")]
    Io {
        /// The image.
        path: String,
        /// What failed.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where a mirrored write goes: `(offset, bytes)`; returns once the bytes are on their way
/// (on the transport's wire), so a guest write waits for the link.
pub type MirrorHook = Arc<dyn Fn(u64, &[u8]) + Send + Sync>;

/// What tracks writes while a copy runs.
#[derive(Default)]
struct Tracking {
    /// One bit per [`BLOCK`] written since the last harvest.
    dirty: Option<Vec<u64>>,
    /// Writes are mirrored (and not marked dirty).
    mirror: Option<MirrorHook>,
    /// Bytes mirrored so far.
    mirrored: u64,
}

/// An open disk image.
pub struct DiskImage {
    file: File,
    /// Where it lives (changes once when a copied image gets its final name).
    path: Mutex<PathBuf>,
    size: u64,
    read_only: bool,
    block_device: bool,
    locked: Mutex<bool>,
    tracking: Mutex<Tracking>,
}

impl std::fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path())
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl DiskImage {
    /// Opens `path` for reading and, unless `read_only`, writing. A writable image is locked
    /// (see [`DiskImage::lock`]) unless `unlocked` (a destination that takes the lock at
    /// switchover).
    pub fn open(path: &Path, read_only: bool, unlocked: bool) -> Result<DiskImage, DiskError> {
        let p = path.display().to_string();
        let open_err = |source| DiskError::Open {
            path: p.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            let mut f = &file;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(open_err)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(DiskError::Unusable {
                path: p,
                reason: "not a regular file or block device".into(),
            });
        };
        if size == 0 || size % SECTOR != 0 {
            return Err(DiskError::Unusable {
                path: p,
                reason: format!("{size} bytes is not a whole, non-zero number of 512-byte sectors"),
            });
        }
        let image = DiskImage {
            file,
            path: Mutex::new(path.to_path_buf()),
            size,
            read_only,
            block_device,
            locked: Mutex::new(false),
            tracking: Mutex::new(Tracking::default()),
        };
        if !read_only && !unlocked {
            image.lock()?;
        }
        Ok(image)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where it lives.
    pub fn path(&self) -> PathBuf {
        lock(&self.path).clone()
    }

    /// Records the image's new name (a copy linked into place under its final name).
    pub fn set_path(&self, path: &Path) {
        *lock(&self.path) = path.to_path_buf();
    }

    fn name(&self) -> String {
        lock(&self.path).display().to_string()
    }

    /// Whether guest writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image's descriptor (for positioned writes by the transport; the image keeps it
    /// open).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Whether it is a host block device (a pass-through disk) rather than a file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Takes the exclusive write lock (an open-file-description lock on the whole image,
    /// honoured across hosts by NFS v4): whoever runs the VM holds it, so two hosts never
    /// write one image. Refused with [`DiskError::Locked`] when another holder has it.
    pub fn lock(&self) -> Result<(), DiskError> {
        self.set_lock(libc::F_WRLCK as libc::c_short)?;
        *lock(&self.locked) = true;
        Ok(())
    }

    /// Releases the lock (after a flush: the next holder sees every write).
    pub fn unlock(&self) -> Result<(), DiskError> {
        if !*lock(&self.locked) {
            return Ok(());
        }
        self.set_lock(libc::F_UNLCK as libc::c_short)?;
        *lock(&self.locked) = false;
        Ok(())
    }

    /// Whether this process holds the lock.
    pub fn is_locked(&self) -> bool {
        *lock(&self.locked)
    }

    fn set_lock(&self, kind: libc::c_short) -> Result<(), DiskError> {
        // SAFETY: a zeroed `flock` is a valid value; the fields set below describe the whole
        // file.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 0;
        fl.l_len = 0;
        // SAFETY: F_OFD_SETLK reads the `flock` behind the pointer, which lives across the call.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Err(DiskError::Locked { path: self.name() }),
            _ => Err(DiskError::Io {
                path: self.name(),
                op: "locking",
                source: e,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset` (a guest write): the blocks are marked dirty while a copy
    /// tracks them, or mirrored — the call then returns once they are on their way.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut t = lock(&self.tracking);
        self.file.write_all_at(buf, offset)?;
        if let Some(m) = t.mirror.clone() {
            t.mirrored += buf.len() as u64;
            // Under the tracking lock: a mirrored write and the switch to mirroring are
            // ordered, and writes reach the mirror in the order they were made.
            m(offset, buf);
        } else if let Some(d) = t.dirty.as_mut() {
            mark(d, offset, buf.len() as u64);
        }
        Ok(())
    }

    /// Makes written data durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Starts tracking written blocks (a copy starts).
    pub fn start_tracking(&self) {
        let mut t = lock(&self.tracking);
        t.dirty = Some(vec![0; self.size.div_ceil(BLOCK).div_ceil(64) as usize]);
        t.mirror = None;
        t.mirrored = 0;
    }

    /// The blocks written since the last call (one bit per [`BLOCK`]), cleared.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut t = lock(&self.tracking);
        match t.dirty.as_mut() {
            Some(d) => std::mem::replace(d, vec![0; d.len()]),
            None => Vec::new(),
        }
    }

    /// From now on, guest writes are sent through `hook` before they complete (active
    /// mirroring).
    pub fn start_mirroring(&self, hook: MirrorHook) {
        lock(&self.tracking).mirror = Some(hook);
    }

    /// Stops tracking and mirroring (the copy ended, either way); returns the bytes mirrored.
    pub fn stop_tracking(&self) -> u64 {
        let mut t = lock(&self.tracking);
        t.dirty = None;
        t.mirror = None;
        std::mem::take(&mut t.mirrored)
    }

    /// The allocated extents, `(offset, len)` in [`BLOCK`] multiples (holes are never read:
    /// `SEEK_DATA`/`SEEK_HOLE`; a block device is allocated throughout).
    pub fn allocated_extents(&self) -> Vec<(u64, u64)> {
        if self.block_device {
            return vec![(0, self.size)];
        }
        let fd = self.file.as_raw_fd();
        let seek = |off: u64, whence: i32| -> Option<u64> {
            // SAFETY: lseek on an open descriptor has no memory effects.
            let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
            (r >= 0).then_some(r as u64)
        };
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let Some(data) = seek(pos, libc::SEEK_DATA) else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE)
                .unwrap_or(self.size)
                .min(self.size);
            let start = data / BLOCK * BLOCK;
            let end = hole.div_ceil(BLOCK) * BLOCK;
            let end = end.min(self.size.div_ceil(BLOCK) * BLOCK);
            if end > start {
                out.push((start, end - start));
            }
            pos = hole.max(data + 1);
        }
        out
    }

    /// Bytes allocated on the host.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        if self.block_device {
            return self.size;
        }
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Maps the image shared, writable or not (for the transport: pages of a copy are read
    /// from or written into it in place).
    pub fn map(&self, writable: bool) -> Result<Mapping, DiskError> {
        let len = self.size.div_ceil(BLOCK) * BLOCK;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of our own file; nothing in this process aliases it
        // as a Rust reference.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DiskError::Io {
                path: self.name(),
                op: "mapping",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// The digest of the image's content: the digest of its pages (as RAM digests are made:
    /// xxh3 over the per-page hashes), holes hashed as zero pages without being read.
    pub fn digest(&self) -> Result<u64, DiskError> {
        use std::hash::Hasher;

        let zero = crate::digest::page_hash(&[0u8; BLOCK as usize]);
        let mut h = twox_hash::XxHash3_64::new();
        let pages = self.size.div_ceil(BLOCK);
        let mut next = 0u64; // next page to feed
        let mut buf = vec![0u8; 1 << 20];
        let io = |source| DiskError::Io {
            path: self.name(),
            op: "reading for the digest",
            source,
        };
        for (off, len) in self.allocated_extents() {
            for _ in next..off / BLOCK {
                h.write(&zero.to_le_bytes());
            }
            let mut at = off;
            while at < off + len {
                let n = (off + len - at).min(buf.len() as u64) as usize;
                let avail = self.size.saturating_sub(at).min(n as u64) as usize;
                buf[..n].fill(0);
                self.file.read_exact_at(&mut buf[..avail], at).map_err(io)?;
                for page in buf[..n].chunks(BLOCK as usize) {
                    h.write(&crate::digest::page_hash(page).to_le_bytes());
                }
                at += n as u64;
            }
            next = (off + len) / BLOCK;
        }
        for _ in next..pages {
            h.write(&zero.to_le_bytes());
        }
        Ok(h.finish())
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        // The lock dies with the file description; flush first so a successor sees it all.
        if !self.read_only {
            let _ = self.file.sync_data();
        }
    }
}

/// A shared mapping of an image, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: u64,
}

// SAFETY: the mapping is plain shared memory; access goes through the transport's bounds
// checks and raw pointers with their own SAFETY notes.
unsafe impl Send for Mapping {}
// SAFETY: see above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The start of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length (the image size rounded up to a block).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty (never: images are not empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the mapping's dirty pages back to the file.
    pub fn sync(&self) -> std::io::Result<()> {
        // SAFETY: the range is this mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len as usize, libc::MS_SYNC) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is this mapping, not used after this point.
        unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
    }
}

/// Marks the blocks of `[offset, offset + len)` in `words`.
fn mark(words: &mut [u64], offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let first = offset / BLOCK;
    let last = (offset + len - 1) / BLOCK;
    for b in first..=last {
        if let Some(w) = words.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("livemig-image-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn one_writer_holds_the_lock() {
        let d = dir("lock");
        let p = image(&d, "a.img", 1 << 20);
        let a = DiskImage::open(&p, false, false).unwrap();
        assert!(a.is_locked());
        assert!(matches!(
            DiskImage::open(&p, false, false),
            Err(DiskError::Locked { .. })
        ));
        let b = DiskImage::open(&p, false, true).unwrap();
        assert!(matches!(b.lock(), Err(DiskError::Locked { .. })));
        a.unlock().unwrap();
        b.lock().unwrap();
        assert!(matches!(a.lock(), Err(DiskError::Locked { .. })));
        drop(b);
        a.lock().unwrap();
        // Read-only opens take no lock.
        let ro = DiskImage::open(&p, true, false).unwrap();
        assert!(!ro.is_locked());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn extents_tracking_mirroring_and_digest() {
        let d = dir("track");
        let p = image(&d, "b.img", 8 << 20);
        let img = DiskImage::open(&p, false, false).unwrap();
        assert!(img.allocated_extents().is_empty());
        let empty = img.digest().unwrap();
        img.write_at(&[1; 4096], 1 << 20).unwrap();
        img.write_at(&[2; 100], 3 << 20).unwrap();
        let ext = img.allocated_extents();
        assert!(
            ext.iter().any(|&(o, l)| o <= 1 << 20 && o + l > 1 << 20),
            "{ext:?}"
        );
        assert!(ext.iter().all(|&(o, l)| o % BLOCK == 0 && l % BLOCK == 0));
        let total: u64 = ext.iter().map(|e| e.1).sum();
        assert!(total < 8 << 20, "holes stay holes: {ext:?}");
        assert_ne!(img.digest().unwrap(), empty);

        img.start_tracking();
        img.write_at(&[3; 8192], 4096 * 10).unwrap();
        let dirty = img.take_dirty();
        assert_eq!(dirty[0], (1 << 10) | (1 << 11));
        assert!(img.take_dirty().iter().all(|w| *w == 0), "harvest clears");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        img.start_mirroring(Arc::new(move |off, b: &[u8]| {
            lock(&s2).push((off, b.len()))
        }));
        img.write_at(&[4; 512], 4096 * 20).unwrap();
        assert_eq!(*lock(&seen), vec![(4096 * 20, 512)]);
        assert!(
            img.take_dirty().iter().all(|w| *w == 0),
            "mirrored writes are not dirty"
        );
        assert_eq!(img.stop_tracking(), 512);

        // The mapping sees what was written, and writes through it reach the file.
        let m = img.map(true).unwrap();
        // SAFETY: inside the mapping; nothing else accesses it in this test.
        unsafe {
            assert_eq!(*m.ptr().add(1 << 20), 1);
            *m.ptr().add(5 << 20) = 9;
        }
        m.sync().unwrap();
        let mut b = [0u8; 1];
        img.read_at(&mut b, 5 << 20).unwrap();
        assert_eq!(b, [9]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
