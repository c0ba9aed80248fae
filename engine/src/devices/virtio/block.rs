//! virtio-blk on a raw image file: read, write, flush, get-id. Requests are served one at a
//! time under the device lock with positioned file I/O, so a quiesced device has none half
//! done. The image is a [`DiskImage`] opened by the VMM, which checks it before anything
//! starts; writes go through it, so a storage migration sees them (dirty blocks, mirroring).

use std::io::{Read, Write};
use std::sync::Arc;

use crate::storage::image::DiskImage;

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{AtomicBitmap, BS};

use super::{Mem, VirtioBackend};

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = crate::storage::image::SECTOR;
/// Feature bit: the device is read-only.
const F_RO: u64 = 1 << 5;
/// Feature bit: the device supports flush.
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Length of a virtio-blk device id.
const ID_LEN: usize = 20;
/// Largest transfer served with one bounce buffer pass.
const CHUNK: usize = 1 << 20;

/// The block device.
pub struct Block {
    disk: Arc<DiskImage>,
    id: [u8; ID_LEN],
    queue_sizes: [u16; 1],
    buf: Vec<u8>,
}

impl Block {
    /// A block device on `disk` whose id (serial) is `id` (cut to 20 bytes).
    pub fn new(disk: Arc<DiskImage>, id: &str) -> Block {
        let mut idb = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            disk,
            id: idb,
            queue_sizes: [256],
            buf: Vec::new(),
        }
    }

    /// Serves one request; returns the bytes written into guest memory.
    fn request(
        &mut self,
        chain: virtio_queue::DescriptorChain<&Mem>,
        mem: &Mem,
    ) -> Result<u32, String> {
        let mut reader = chain
            .clone()
            .reader(mem)
            .map_err(|e| format!("request chain: {e:?}"))?;
        let mut writer = chain
            .writer(mem)
            .map_err(|e| format!("request chain: {e:?}"))?;
        let mut hdr = [0u8; 16];
        if writer.available_bytes() < 1 || reader.read_exact(&mut hdr).is_err() {
            // No room for a status or no header: nothing can be answered.
            return Ok(0);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let mut status_w = writer
            .split_at(writer.available_bytes() - 1)
            .map_err(|e| format!("request chain: {e:?}"))?;
        let mut written = 0u32;
        let status = match kind {
            T_IN => {
                let len = writer.available_bytes();
                match self.range(sector, len) {
                    Some(off) => match self.read_into(&mut writer, off, len) {
                        Ok(()) => {
                            written = len as u32;
                            S_OK
                        }
                        Err(_) => S_IOERR,
                    },
                    None => S_IOERR,
                }
            }
            T_OUT if self.disk.read_only() => S_IOERR,
            T_OUT => {
                let len = reader.available_bytes();
                match self.range(sector, len) {
                    Some(off) => match self.write_from(&mut reader, off, len) {
                        Ok(()) => S_OK,
                        Err(_) => S_IOERR,
                    },
                    None => S_IOERR,
                }
            }
            T_FLUSH => match self.disk.flush() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => {
                        written = n as u32;
                        S_OK
                    }
                    Err(_) => S_IOERR,
                }
            }
            _ => S_UNSUPP,
        };
        status_w
            .write_all(&[status])
            .map_err(|e| format!("writing a request status: {e}"))?;
        Ok(written + 1)
    }

    /// The byte offset of `len` bytes from `sector`, if they lie inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        (off.checked_add(len as u64)? <= self.disk.size()).then_some(off)
    }

    fn read_into(
        &mut self,
        w: &mut virtio_queue::Writer<'_, BS<'_, AtomicBitmap>>,
        mut off: u64,
        mut len: usize,
    ) -> std::io::Result<()> {
        while len > 0 {
            let n = len.min(CHUNK);
            self.buf.resize(n, 0);
            self.disk.read_at(&mut self.buf[..n], off)?;
            w.write_all(&self.buf[..n])?;
            off += n as u64;
            len -= n;
        }
        Ok(())
    }

    fn write_from(
        &mut self,
        r: &mut virtio_queue::Reader<'_, BS<'_, AtomicBitmap>>,
        mut off: u64,
        mut len: usize,
    ) -> std::io::Result<()> {
        while len > 0 {
            let n = len.min(CHUNK);
            self.buf.resize(n, 0);
            r.read_exact(&mut self.buf[..n])?;
            self.disk.write_at(&self.buf[..n], off)?;
            off += n as u64;
            len -= n;
        }
        Ok(())
    }
}

impl VirtioBackend for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.disk.read_only() { F_RO } else { 0 }
    }

    fn config(&self) -> Vec<u8> {
        // capacity (sectors); the fields after it belong to features we do not offer.
        let mut c = vec![0u8; 60];
        c[..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        c
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &Mem) -> Result<bool, String> {
        let Some(q) = queues.get_mut(index) else {
            return Ok(false);
        };
        let mut used = false;
        loop {
            q.disable_notification(mem)
                .map_err(|e| format!("queue {index}: {e:?}"))?;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = self.request(chain, mem)?;
                q.add_used(mem, head, len)
                    .map_err(|e| format!("queue {index}: {e:?}"))?;
                used = true;
            }
            if !q
                .enable_notification(mem)
                .map_err(|e| format!("queue {index}: {e:?}"))?
            {
                return Ok(used);
            }
        }
    }

    fn quiesce(&mut self) -> Result<(), String> {
        if self.disk.read_only() {
            return Ok(());
        }
        self.disk
            .flush()
            .map_err(|e| format!("flushing {}: {e}", self.disk.path().display()))
    }
}
