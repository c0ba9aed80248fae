//! Memory registered with the transport.

use std::any::Any;
use std::sync::Arc;

use crate::TransportError;

/// One registered range: `len` bytes at host address `host`, known to peers as `addr`.
#[derive(Debug, Clone, Copy)]
pub struct MappedRegion {
    /// Address peers use (guest-physical address for livemig).
    pub addr: u64,
    /// Host virtual address of the first byte.
    pub host: *mut u8,
    /// Length in bytes.
    pub len: u64,
}

/// A region whose bytes live in a file (a disk image): receivers write it with `pwrite` on
/// `fd` (offset = address - region start) instead of through the mapping, so the file's holes
/// stay holes (a write fault on a shared file mapping allocates whole folios); the region's
/// mapping of the same file serves reads.
#[derive(Debug, Clone, Copy)]
pub struct FileBacking {
    /// Start address of the region (one of the map's regions).
    pub addr: u64,
    /// The file, open for writing, kept open by the map's owner.
    pub fd: std::os::fd::RawFd,
}

/// Where received bytes of a range go.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Into memory at this host address.
    Memory(*mut u8),
    /// Into file `fd` at `offset` (with `host` mapping those bytes for reading).
    File {
        /// The file.
        fd: std::os::fd::RawFd,
        /// Offset of the range in the file.
        offset: u64,
        /// The range's bytes, mapped for reading.
        host: *mut u8,
    },
}

impl Target {
    /// The host address the range is mapped at.
    pub fn host(&self) -> *mut u8 {
        match *self {
            Target::Memory(h) | Target::File { host: h, .. } => h,
        }
    }
}

/// Registered memory: every access is bounds-checked against the regions.
#[derive(Clone)]
pub struct MemoryMap {
    regions: Vec<MappedRegion>,
    files: Vec<FileBacking>,
    _owner: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMap")
            .field("regions", &self.regions)
            .finish()
    }
}

// SAFETY: the map only hands out raw pointers into memory that `new`'s caller guaranteed valid
// for as long as `_owner` lives; reads and writes through them happen in syscalls (writev/readv)
// that tolerate concurrent access, and the map itself is immutable.
unsafe impl Send for MemoryMap {}
// SAFETY: as for `Send`; `MemoryMap` has no interior mutability.
unsafe impl Sync for MemoryMap {}

impl MemoryMap {
    /// Registers `regions`, kept valid by `owner`.
    ///
    /// # Safety
    ///
    /// Each region's `host..host + len` must be a mapping readable and writable by this
    /// process for as long as `owner` (or any clone of the map) lives, and regions must not
    /// overlap. Data may be written into it by the transport at any time while a receiver runs:
    /// the caller must not hold Rust references into it meanwhile.
    pub unsafe fn new(regions: Vec<MappedRegion>, owner: Arc<dyn Any + Send + Sync>) -> Self {
        MemoryMap {
            regions,
            files: Vec::new(),
            _owner: owner,
        }
    }

    /// Marks the regions `files` name as file-backed (see [`FileBacking`]); the map's owner
    /// keeps the files open.
    pub fn with_files(mut self, files: Vec<FileBacking>) -> Self {
        self.files = files;
        self
    }

    /// Where received bytes of `[addr, addr + len)` go; the range must lie inside one region.
    pub fn target(&self, addr: u64, len: u64) -> Result<Target, TransportError> {
        let host = self.host_ptr(addr, len)?;
        for f in &self.files {
            if let Some(r) = self
                .regions
                .iter()
                .find(|r| r.addr == f.addr && addr >= r.addr && addr - r.addr < r.len)
            {
                return Ok(Target::File {
                    fd: f.fd,
                    offset: addr - r.addr,
                    host,
                });
            }
        }
        Ok(Target::Memory(host))
    }

    /// Makes `[addr, addr + len)` read as zeros: a file-backed range becomes a hole again
    /// (`FALLOC_FL_PUNCH_HOLE`), memory is zeroed.
    ///
    /// # Safety
    ///
    /// Nothing may read or write the range concurrently, and no Rust reference into it may
    /// exist (as for the transport's own writes).
    pub unsafe fn clear(&self, addr: u64, len: u64) -> Result<(), TransportError> {
        match self.target(addr, len)? {
            // SAFETY: the range lies inside a registered region (checked by `target`); the
            // caller rules out concurrent access.
            Target::Memory(h) => unsafe { std::ptr::write_bytes(h, 0, len as usize) },
            Target::File { fd, offset, .. } => {
                // SAFETY: fallocate on a descriptor has no memory effects.
                let r = unsafe {
                    libc::fallocate(
                        fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if r != 0 {
                    return Err(TransportError::Io {
                        op: "punching a hole",
                        peer: "local file".into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The registered regions.
    pub fn regions(&self) -> &[MappedRegion] {
        &self.regions
    }

    /// Host pointer of `[addr, addr + len)`, which must lie inside one region.
    pub fn host_ptr(&self, addr: u64, len: u64) -> Result<*mut u8, TransportError> {
        let oob = TransportError::OutOfBounds { addr, len };
        let end = addr
            .checked_add(len)
            .ok_or(TransportError::OutOfBounds { addr, len })?;
        for r in self.regions.iter() {
            if addr >= r.addr && end <= r.addr + r.len {
                let off = usize::try_from(addr - r.addr).map_err(|_| oob)?;
                // `off + len <= r.len`, so the result stays inside the region.
                return Ok(r.host.wrapping_add(off));
            }
        }
        Err(oob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` outlives the map (dropped at the end of the test after the map).
        let map = unsafe {
            MemoryMap::new(
                vec![MappedRegion {
                    addr: 0x10000,
                    host: buf.as_mut_ptr(),
                    len: 4096,
                }],
                Arc::new(()),
            )
        };
        assert!(map.host_ptr(0x10000, 4096).is_ok());
        assert!(map.host_ptr(0x10800, 0x800).is_ok());
        assert!(map.host_ptr(0x10800, 0x801).is_err());
        assert!(map.host_ptr(0xffff, 2).is_err());
        assert!(map.host_ptr(u64::MAX, 2).is_err());
        drop(map);
        drop(buf);
    }
}
