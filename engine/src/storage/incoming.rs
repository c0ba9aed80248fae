//! The destination's side of storage migration.
//!
//! Copy mode: before any byte moves, the destination checks its directory (it exists, no
//! image of the same name is there, there is room for what the source has allocated), then
//! creates each copy as an unnamed sparse file (`O_TMPFILE`) of the source's size. The VM is
//! built on those files, the storage channel writes blocks into them through a shared
//! mapping (holes the source never sends stay holes) and page hashes follow every block.
//! Before Prepared the copies are verified against the source's digests and linked under
//! their final names. Until Commit any failure — or the process dying — leaves nothing
//! behind: an unnamed file vanishes with its last descriptor, a linked one is unlinked
//! again.
//!
//! Shared mode: the VM opens the source's image paths (or those given with `--disk-path`)
//! without locking them; the locks are taken after the device state arrived, before
//! Prepared. If another process holds one, the destination refuses and the source resumes.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use livemig_transport::{FileBacking, MappedRegion};

use super::image::Mapping;
use super::{disk_addr, disk_layout, DiskOffer, StorageMode, VmDisk};
use crate::digest::PageHashes;

/// An unnamed copy being received.
#[derive(Debug)]
struct Copy {
    file: File,
    /// Where it goes at the end.
    target: PathBuf,
    /// Linked under `target` (removed again if the migration fails).
    linked: bool,
}

impl Copy {
    /// The path the VM opens it by.
    fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// A VM's disks during an incoming migration.
#[derive(Debug, Default)]
pub struct IncomingStorage {
    mode: StorageMode,
    offers: Vec<DiskOffer>,
    copies: Vec<Copy>,
    disks: Vec<VmDisk>,
    mappings: Arc<Vec<Mapping>>,
    hashes: Option<Arc<PageHashes>>,
    committed: bool,
}

impl IncomingStorage {
    /// Storage as a protocol-1 source (no disks) migrates it.
    pub fn none() -> IncomingStorage {
        IncomingStorage::default()
    }

    /// Checks and prepares what the source announced. Copy mode: `directory` (the source's,
    /// else `default_dir`) must exist and have room; the copies are created there, unnamed.
    pub fn prepare(
        mode: StorageMode,
        directory: &str,
        offers: Vec<DiskOffer>,
        default_dir: Option<&Path>,
    ) -> Result<IncomingStorage, String> {
        let mut ids: Vec<&str> = offers.iter().map(|o| o.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err("two disks share a name".into());
        }
        let mut s = IncomingStorage::none();
        s.mode = mode;
        s.offers = offers;
        if mode == StorageMode::Copy && !s.offers.is_empty() {
            let dir = match (directory, default_dir) {
                ("", Some(d)) => d.to_path_buf(),
                ("", None) => {
                    return Err(
                        "a copy migration needs a directory for the disks: --storage-dir \
                                on migrate, or on receive"
                            .into(),
                    )
                }
                (d, _) => PathBuf::from(d),
            };
            s.copies = create_copies(&dir, &s.offers)?;
        }
        Ok(s)
    }

    /// Whether disk blocks arrive (a copy of at least one disk).
    pub fn copying(&self) -> bool {
        self.mode == StorageMode::Copy && !self.offers.is_empty()
    }

    /// Copy mode: `(disk id, path)` the VM opens its disks by.
    pub fn placement(&self) -> Vec<(String, PathBuf)> {
        self.offers
            .iter()
            .zip(&self.copies)
            .map(|(o, c)| (o.id.clone(), c.fd_path()))
            .collect()
    }

    /// The VM is built: its disks must be the ones announced; copies are mapped for the
    /// receivers.
    pub fn attach(&mut self, disks: Vec<VmDisk>) -> Result<(), String> {
        if disks.len() != self.offers.len() {
            return Err(format!(
                "the VM has {} disks but the source announced {}",
                disks.len(),
                self.offers.len()
            ));
        }
        for (d, o) in disks.iter().zip(&self.offers) {
            if d.id != o.id || d.image.size() != o.size {
                return Err(format!(
                    "disk {} ({} bytes) does not match the announced disk {} ({} bytes)",
                    d.id,
                    d.image.size(),
                    o.id,
                    o.size
                ));
            }
        }
        if self.copying() {
            let maps = disks
                .iter()
                // Read-only: blocks are written with pwrite (holes stay holes), see
                // `livemig_transport::FileBacking`.
                .map(|d| d.image.map(false).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            self.mappings = Arc::new(maps);
            let sizes: Vec<u64> = disks.iter().map(|d| d.image.size()).collect();
            self.hashes = Some(Arc::new(PageHashes::new_zeroed(&disk_layout(&sizes))));
        }
        self.disks = disks;
        Ok(())
    }

    /// The copies' mappings as transport regions, with what keeps them mapped.
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

    /// The copies' files, written by the receivers with positioned writes.
    pub fn files(&self) -> Vec<FileBacking> {
        if !self.copying() {
            return Vec::new();
        }
        // The copies' own descriptors: writable even when the VM opened a disk read-only.
        self.copies
            .iter()
            .enumerate()
            .map(|(i, c)| FileBacking {
                addr: disk_addr(i),
                fd: c.file.as_raw_fd(),
            })
            .collect()
    }

    /// Hashes of the blocks received (copy mode).
    pub fn hashes(&self) -> Option<Arc<PageHashes>> {
        self.hashes.clone()
    }

    /// The digest of every copy as received.
    pub fn digests(&self) -> Vec<u64> {
        match &self.hashes {
            Some(h) => (0..self.offers.len()).map(|i| h.region_digest(i)).collect(),
            None => Vec::new(),
        }
    }

    /// Every block arrived: checks the copies against the source's digests and links them
    /// under their final names; shared mode takes the image locks. Any error refuses the
    /// migration (the source resumes).
    pub fn complete(&mut self, source_digests: &[u64]) -> Result<(), String> {
        if self.copying() {
            let mine = self.digests();
            if mine.len() != source_digests.len() {
                return Err(format!(
                    "{} disk digests for {} disks",
                    source_digests.len(),
                    mine.len()
                ));
            }
            for ((o, m), s) in self.offers.iter().zip(&mine).zip(source_digests) {
                if m != s {
                    return Err(format!(
                        "disk {}: the copy's digest {m:016x} differs from the source's {s:016x}",
                        o.id
                    ));
                }
            }
            self.link()?;
        } else if !source_digests.is_empty() {
            return Err("disk digests on a migration that copies no disk".into());
        }
        // Whoever runs the VM holds the locks: shared images move from the source, copies
        // are new and taken at once.
        for d in self.disks.iter().filter(|d| !d.image.read_only()) {
            d.image
                .lock()
                .map_err(|e| format!("disk {}: cannot take its lock: {e}", d.id))?;
        }
        Ok(())
    }

    fn link(&mut self) -> Result<(), String> {
        // The page cache is coherent between the mapping and the file: naming needs no
        // write-back (durability comes after resume, in `sync`).
        for (c, d) in self.copies.iter_mut().zip(&self.disks) {
            let from =
                CString::new(c.fd_path().as_os_str().as_bytes()).map_err(|e| e.to_string())?;
            let to = CString::new(c.target.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: both are NUL-terminated paths living across the call.
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if r != 0 {
                return Err(format!(
                    "naming the copy {}: {}",
                    c.target.display(),
                    std::io::Error::last_os_error()
                ));
            }
            c.linked = true;
            d.image.set_path(&c.target);
        }
        Ok(())
    }

    /// The guest runs here: the copies stay.
    pub fn commit(&mut self) {
        self.committed = true;
    }

    /// Makes the copies durable (after resume, before the source may delete its images).
    pub fn sync(&self) -> Result<(), String> {
        if !self.copying() {
            return Ok(());
        }
        for (c, o) in self.copies.iter().zip(&self.offers) {
            c.file
                .sync_all()
                .map_err(|e| format!("syncing disk {}: {e}", o.id))?;
        }
        Ok(())
    }
}

impl Drop for IncomingStorage {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for c in &self.copies {
            if c.linked {
                let _ = std::fs::remove_file(&c.target);
            }
        }
    }
}

/// The checks before any byte moves, then one unnamed sparse file per disk.
fn create_copies(dir: &Path, offers: &[DiskOffer]) -> Result<Vec<Copy>, String> {
    if !dir.is_absolute() {
        return Err(format!(
            "the storage directory {} is not an absolute path",
            dir.display()
        ));
    }
    let meta = std::fs::metadata(dir)
        .map_err(|e| format!("the storage directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    for o in offers {
        let target = dir.join(&o.file_name);
        if target.symlink_metadata().is_ok() {
            return Err(format!(
                "{} exists: a copy never overwrites an image (disk {})",
                target.display(),
                o.id
            ));
        }
    }
    let need: u64 = offers.iter().map(|o| o.allocated).sum();
    let free = free_bytes(dir)?;
    // Room for what is allocated now, plus 5 % for what the guest writes meanwhile.
    if need + need / 20 > free {
        return Err(format!(
            "not enough space in {}: the copies need {} MiB, {} MiB are free",
            dir.display(),
            (need + need / 20).div_ceil(1 << 20),
            free >> 20
        ));
    }
    let mut out = Vec::with_capacity(offers.len());
    for o in offers {
        let file = create_unnamed(dir)
            .and_then(|f| f.set_len(o.size).map(|()| f))
            .map_err(|e| {
                format!(
                    "creating the copy of disk {} in {}: {e}",
                    o.id,
                    dir.display()
                )
            })?;
        out.push(Copy {
            file,
            target: dir.join(&o.file_name),
            linked: false,
        });
    }
    Ok(out)
}

/// An unnamed file in `dir` (gone when its last descriptor closes).
fn create_unnamed(dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
}

fn free_bytes(dir: &Path) -> Result<u64, String> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a zeroed statvfs is valid; statvfs fills it from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; both pointers are valid across the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "the storage directory {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(name: &str, size: u64, allocated: u64) -> DiskOffer {
        DiskOffer {
            id: format!("id-{name}"),
            file_name: name.into(),
            size,
            allocated,
            read_only: false,
        }
    }

    #[test]
    fn copies_are_checked_then_unnamed_until_linked() {
        let dir = std::env::temp_dir().join(format!("livemig-incoming-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let prep = |o: Vec<DiskOffer>| {
            IncomingStorage::prepare(StorageMode::Copy, dir.to_str().unwrap(), o, None)
        };
        // An existing image, too little space, a relative or missing directory: refused.
        std::fs::write(dir.join("taken.img"), b"x").unwrap();
        let e = prep(vec![offer("taken.img", 1 << 20, 0)]).unwrap_err();
        assert!(e.contains("exists"), "{e}");
        let e = prep(vec![offer("big.img", 1 << 60, 1 << 60)]).unwrap_err();
        assert!(e.contains("not enough space"), "{e}");
        let e = IncomingStorage::prepare(StorageMode::Copy, "rel", vec![offer("a", 4096, 0)], None)
            .unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = IncomingStorage::prepare(StorageMode::Copy, "", vec![offer("a", 4096, 0)], None)
            .unwrap_err();
        assert!(e.contains("--storage-dir"), "{e}");

        let s = prep(vec![offer("new.img", 8 << 20, 0)]).unwrap();
        let (_, path) = &s.placement()[0];
        assert_eq!(std::fs::metadata(path).unwrap().len(), 8 << 20);
        assert!(!dir.join("new.img").exists(), "unnamed until linked");
        drop(s);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "nothing left but the existing image"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
