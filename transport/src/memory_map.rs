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

/// Registered memory: every access is bounds-checked against the regions.
#[derive(Clone)]
pub struct MemoryMap {
    regions: Vec<MappedRegion>,
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
            _owner: owner,
        }
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
