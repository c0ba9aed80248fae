//! The I/O buses a vCPU's port and MMIO exits are dispatched on: non-overlapping address
//! ranges, each owned by a device, which sees offsets into its range.

use std::sync::Arc;

/// What a device access asks of the VM besides its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
}

/// A device on a bus. Methods take `&self`: devices keep their own locks, and a vCPU exit
/// never waits on another vCPU.
pub trait BusDevice: Send + Sync {
    /// A guest read of `data.len()` bytes at `offset` into the device's range; unknown
    /// registers read as zeros (ports as ones, see [`Bus::read`]).
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Option<VmAction>;
}

/// One bus: sorted, non-overlapping ranges.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, Arc<dyn BusDevice>)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, l, _)| (b, l)))
            .finish()
    }
}

impl Bus {
    /// Places `device` at `[base, base + len)`; refused if it overlaps another range.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), String> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| format!("bad range {base:#x}+{len:#x}"))?;
        if let Some((b, l, _)) = self
            .ranges
            .iter()
            .find(|(b, l, _)| base < b + l && *b < end)
        {
            return Err(format!("range {base:#x}+{len:#x} overlaps {b:#x}+{l:#x}"));
        }
        self.ranges.push((base, len, device));
        self.ranges.sort_by_key(|r| r.0);
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Arc<dyn BusDevice>)> {
        let i = self
            .ranges
            .partition_point(|r| r.0 <= addr)
            .checked_sub(1)?;
        let (base, size, dev) = &self.ranges[i];
        let off = addr - base;
        (off.checked_add(len as u64)? <= *size).then_some((off, dev))
    }

    /// Reads at `addr`; false (and `data` untouched) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.read(off, data);
                true
            }
            None => false,
        }
    }

    /// Writes at `addr`; `None` in the outer option when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<Option<VmAction>> {
        self.find(addr, data.len())
            .map(|(off, dev)| dev.write(off, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Reg(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Reg {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) -> Option<VmAction> {
            self.0.lock().unwrap().push((offset, data.to_vec()));
            (data == [0xff]).then_some(VmAction::PowerOff)
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let mut bus = Bus::default();
        let a = Arc::new(Reg(Mutex::new(Vec::new())));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x200, 0x10, Arc::new(Reg(Mutex::new(Vec::new()))))
            .unwrap();
        assert!(bus.insert(0x10f, 2, a.clone()).is_err());
        assert!(bus.insert(0, 0, a.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err());
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(!bus.read(0x10f, &mut b), "straddles the end");
        assert!(!bus.read(0x50, &mut b));
        assert_eq!(bus.write(0x101, &[1]), Some(None));
        assert_eq!(bus.write(0x101, &[0xff]), Some(Some(VmAction::PowerOff)));
        assert_eq!(bus.write(0x300, &[1]), None);
        assert_eq!(a.0.lock().unwrap()[0], (1, vec![1]));
    }
}
