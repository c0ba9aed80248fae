//! virtio-rng: the guest's entropy requests are filled from the host's `getrandom`.

use std::io::Write;

use virtio_queue::{Queue, QueueT};

use super::{Mem, VirtioBackend};

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    queue_sizes: [u16; 1],
    buf: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Rng {
            queue_sizes: [256],
            buf: Vec::new(),
        }
    }
}

fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioBackend for Rng {
    fn device_type(&self) -> u32 {
        4
    }

    fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &Mem) -> Result<bool, String> {
        let Some(q) = queues.get_mut(index) else {
            return Ok(false);
        };
        let mut used = false;
        loop {
            q.disable_notification(mem)
                .map_err(|e| format!("rng queue: {e:?}"))?;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let mut w = chain.writer(mem).map_err(|e| format!("rng chain: {e:?}"))?;
                let n = w.available_bytes().min(64 << 10);
                self.buf.resize(n, 0);
                let len = if getrandom(&mut self.buf) && w.write_all(&self.buf).is_ok() {
                    n as u32
                } else {
                    0
                };
                q.add_used(mem, head, len)
                    .map_err(|e| format!("rng queue: {e:?}"))?;
                used = true;
            }
            if !q
                .enable_notification(mem)
                .map_err(|e| format!("rng queue: {e:?}"))?
            {
                return Ok(used);
            }
        }
    }
}
