//! Virtio devices on the MMIO transport (virtio 1.x, "modern" register layout, version 2).
//!
//! A [`VirtioMmio`] is one device window: the transport registers (features, status, queue
//! set-up, interrupt status, config space), the queues (rust-vmm's `virtio-queue`) and a
//! [`VirtioBackend`] that serves them (block, net, rng). Queue notifications arrive on
//! ioeventfds the VMM registers for the QueueNotify register, and interrupts leave through an
//! irqfd ([`super::IrqLine`]), so neither touches a vCPU thread. A worker thread per device
//! waits on those eventfds and the backend's own fd (a tap's receive side) and serves the
//! queues.
//!
//! Migration: the transport is a [`MigratableDevice`] whose one section holds the transport
//! registers, every queue's state (size, ready, addresses, next avail/used, event index) and
//! the backend's own bytes. Quiescing takes the device lock the worker serves requests under:
//! once it is held, no request is half done — a block request has completed (and is in the
//! used ring, whose page is dirty) or has not been taken from the avail ring. Requests the
//! guest queues while the device is quiesced stay in the avail ring; on resume (here or, after
//! a restore, on the destination) the worker serves every queue once, so they are done
//! exactly once. Every guest write of the device goes through vm-memory, so its pages land in
//! the dirty bitmap the migration harvests.

pub mod block;
pub mod net;
pub mod rng;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{BusDevice, VmAction};
use super::{IrqLine, MigratableDevice};
use crate::vm::{DeviceSection, VmError};

/// Guest memory as devices access it (writes recorded in its dirty bitmap).
pub type Mem = GuestMemoryMmap<AtomicBitmap>;

/// Section id of a virtio-mmio device's state (instance = its slot).
pub const SECTION_VIRTIO: u32 = 0x300;
/// Version of [`SECTION_VIRTIO`].
pub const SECTION_VERSION: u32 = 1;
/// Size of a device's register window.
pub const WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register (the VMM registers ioeventfds there).
pub const QUEUE_NOTIFY: u64 = 0x050;

/// Feature bit: virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/avail event indices.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// Interrupt status bit: a used ring changed.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x474d_564c; // "LVMG"
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;
const MAX_BACKEND_STATE: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What serves a virtio device's queues.
pub trait VirtioBackend: Send {
    /// Virtio device type (1 net, 2 block, 4 entropy).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue.
    fn queue_sizes(&self) -> &[u16];
    /// Device feature bits (the transport adds [`F_VERSION_1`] and [`F_RING_EVENT_IDX`]).
    fn features(&self) -> u64;
    /// The device configuration space.
    fn config(&self) -> Vec<u8>;
    /// The driver acked `features` (called when it sets FEATURES_OK).
    fn ack_features(&mut self, _features: u64) {}
    /// Serves queue `index`; true when used entries were added.
    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &Mem) -> Result<bool, String>;
    /// A file descriptor the worker also waits on (edge-triggered), e.g. a tap's receive side.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The backend fd became readable (or the device resumed): serve it; true when used
    /// entries were added.
    fn process_backend(&mut self, _queues: &mut [Queue], _mem: &Mem) -> Result<bool, String> {
        Ok(false)
    }
    /// The VM pauses: make what was written durable (a disk's flush).
    fn quiesce(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Backend state that migrates with the device (empty for most).
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Asked to announce the device on its network (after a migration): does what the host
    /// side can, and returns true when the driver (which acked `acked_features`) should be
    /// told through a configuration change.
    fn announce(&mut self, _acked_features: u64) -> Result<bool, String> {
        Ok(false)
    }
    /// Restores [`VirtioBackend::save`]'s bytes.
    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        if data.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes of backend state for a device without any",
                data.len()
            ))
        }
    }
}

/// The transport registers and queues, under the device lock.
struct Transport {
    backend: Box<dyn VirtioBackend>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    /// How many times the driver acknowledged an interrupt (wrapping): a status bit seen at two
    /// ticks is only unacknowledged if no acknowledgement came between them.
    acks: u32,
    config_generation: u32,
    /// The driver set DRIVER_OK: the queues are served.
    activated: bool,
    /// The VM is paused: nothing is served.
    paused: bool,
    /// Resumed since the worker last looked: re-raise a pending interrupt.
    resumed: bool,
}

impl Transport {
    fn device_features(&self) -> u64 {
        self.backend.features() | F_VERSION_1 | F_RING_EVENT_IDX
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.activated = false;
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }
}

/// One virtio-mmio device.
pub struct VirtioMmio {
    slot: u32,
    name: String,
    inner: Arc<Mutex<Transport>>,
    irq: IrqLine,
    mem: Mem,
    queue_evts: Vec<EventFd>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for VirtioMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio")
            .field("slot", &self.slot)
            .field("name", &self.name)
            .finish()
    }
}

impl VirtioMmio {
    /// A device in window `slot` named `name`, served by `backend`, raising `irq`, over
    /// `mem`; its worker thread starts at once (serving nothing until the driver is ready).
    pub fn new(
        slot: u32,
        name: &str,
        backend: Box<dyn VirtioBackend>,
        irq: IrqLine,
        mem: Mem,
    ) -> Result<Arc<VirtioMmio>, VmError> {
        let io = |what: &str, e: std::io::Error| {
            VmError::InvalidSpec(format!("virtio device {name}: {what}: {e}"))
        };
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &size in backend.queue_sizes() {
            queues.push(Queue::new(size).map_err(|e| {
                VmError::InvalidSpec(format!("virtio device {name}: queue of {size}: {e:?}"))
            })?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(|e| io("eventfd", e))?);
        }
        let dev = Arc::new(VirtioMmio {
            slot,
            name: name.to_string(),
            inner: Arc::new(Mutex::new(Transport {
                backend,
                queues,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                status: 0,
                interrupt_status: 0,
                acks: 0,
                config_generation: 0,
                activated: false,
                paused: false,
                resumed: false,
            })),
            irq,
            mem,
            queue_evts,
            wake: EventFd::new(EFD_NONBLOCK).map_err(|e| io("eventfd", e))?,
            stop: Arc::new(AtomicBool::new(false)),
            worker: Mutex::new(None),
        });
        let worker = Worker::new(&dev).map_err(|e| io("worker set-up", e))?;
        let handle = std::thread::Builder::new()
            .name(format!("virtio-{name}"))
            .spawn(move || worker.run())
            .map_err(|e| io("worker thread", e))?;
        *lock(&dev.worker) = Some(handle);
        Ok(dev)
    }

    /// The eventfd of queue `index`'s notifications (for the VMM's ioeventfd).
    pub fn queue_eventfds(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Its interrupt line.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    /// Announces the device (see [`VirtioBackend::announce`]); a change for the driver
    /// raises a configuration interrupt. Returns false, doing nothing, while the driver is
    /// not ready or the device is paused.
    pub fn announce(&self) -> Result<bool, String> {
        let mut t = lock(&self.inner);
        if !t.activated || t.paused {
            return Ok(false);
        }
        let features = t.driver_features;
        if t.backend.announce(features)? {
            t.config_generation = t.config_generation.wrapping_add(1);
            t.interrupt_status |= INT_CONFIG;
            drop(t);
            self.irq
                .trigger()
                .map_err(|e| format!("{}: configuration interrupt: {e}", self.name))?;
        }
        Ok(true)
    }

    /// The virtio device type of its backend (1 = net).
    pub fn device_type(&self) -> u32 {
        lock(&self.inner).backend.device_type()
    }

    /// Stops the worker (the VM shuts down).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
    }

    fn read_reg(&self, t: &mut Transport, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => t.backend.device_type(),
            0x00c => VENDOR,
            0x010 => match t.device_features_sel {
                0 => t.device_features() as u32,
                1 => (t.device_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => t.selected().map_or(0, |q| u32::from(q.max_size())),
            0x044 => t.selected().map_or(0, |q| u32::from(q.ready())),
            0x060 => t.interrupt_status,
            0x070 => t.status,
            0x0b0 | 0x0b4 => u32::MAX, // no shared memory regions
            0x0fc => t.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&self, t: &mut Transport, offset: u64, v: u32) {
        let ready = t.selected().is_some_and(|q| q.ready());
        match offset {
            0x014 => t.device_features_sel = v,
            0x020 => match t.driver_features_sel {
                0 => t.driver_features = (t.driver_features & !0xffff_ffff) | u64::from(v),
                1 => t.driver_features = (t.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            0x024 => t.driver_features_sel = v,
            0x030 => t.queue_sel = v,
            0x038 if !ready => {
                if let Some(q) = t.selected() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = t.selected() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; a notification that exits here is passed on.
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x064 => {
                t.interrupt_status &= !v;
                t.acks = t.acks.wrapping_add(1);
            }
            0x070 => self.set_status(t, v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if !ready => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = t.selected() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(lo, hi),
                        0x090 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    fn set_status(&self, t: &mut Transport, v: u32) {
        if v == 0 {
            t.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && t.status & STATUS_FEATURES_OK == 0 {
            let offered = t.device_features();
            if t.driver_features & !offered != 0 || t.driver_features & F_VERSION_1 == 0 {
                // The driver asked for what we do not offer: refuse FEATURES_OK.
                v &= !STATUS_FEATURES_OK;
            } else {
                let acked = t.driver_features;
                t.backend.ack_features(acked);
                let event_idx = acked & F_RING_EVENT_IDX != 0;
                for q in &mut t.queues {
                    q.set_event_idx(event_idx);
                }
            }
        }
        t.status = v;
        if v & STATUS_DRIVER_OK != 0 && !t.activated && v & STATUS_FAILED == 0 {
            t.activated = true;
            let _ = self.wake.write(1);
        }
    }
}

impl BusDevice for VirtioMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut t = lock(&self.inner);
        if offset >= 0x100 {
            let config = t.backend.config();
            let start = (offset - 0x100) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = self.read_reg(&mut t, offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VmAction> {
        if offset >= 0x100 || data.len() != 4 {
            // The configuration spaces of our devices are read-only.
            return None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let mut t = lock(&self.inner);
        self.write_reg(&mut t, offset, v);
        None
    }
}

/// The worker of one device: waits on the queue eventfds, the backend fd and the wake-up
/// eventfd, and serves under the device lock.
struct Worker {
    inner: Arc<Mutex<Transport>>,
    irq: IrqLine,
    mem: Mem,
    epoll: Epoll,
    queue_evts: Vec<EventFd>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
}

const WAKE_TOKEN: u64 = u64::MAX;
const BACKEND_TOKEN: u64 = u64::MAX - 1;
/// How often a worker looks at its rings and its interrupt whatever happens: a notification
/// the driver never saw is served, and an interrupt it never acknowledged is raised again.
const TICK: std::time::Duration = std::time::Duration::from_millis(200);
/// Re-raises of an unserviced interrupt after which the VMM is asked what the guest's
/// interrupt controllers hold for it (then at every power of two).
const STUCK_REPORT_AFTER: u64 = 8;

impl Worker {
    fn new(dev: &VirtioMmio) -> std::io::Result<Worker> {
        let epoll = Epoll::new()?;
        let queue_evts = dev
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        for (i, e) in queue_evts.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                e.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let wake = dev.wake.try_clone()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        if let Some(fd) = lock(&dev.inner).backend.backend_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, BACKEND_TOKEN),
            )?;
        }
        Ok(Worker {
            inner: dev.inner.clone(),
            irq: dev.irq.clone(),
            mem: dev.mem.clone(),
            epoll,
            queue_evts,
            wake,
            stop: dev.stop.clone(),
        })
    }

    fn run(self) {
        let mut events = vec![EpollEvent::default(); 16];
        let mut next_tick = std::time::Instant::now() + TICK;
        let mut unacked = (0u32, 0u32);
        let mut recovered = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            if std::time::Instant::now() >= next_tick {
                next_tick += TICK;
                self.tick(&mut unacked, &mut recovered);
            }
            let wait = next_tick.saturating_duration_since(std::time::Instant::now());
            let n = match self.epoll.wait(wait.as_millis() as i32 + 1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio worker: epoll failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                        self.serve_all();
                    }
                    BACKEND_TOKEN => self.serve(None),
                    i => {
                        if let Some(e) = self.queue_evts.get(i as usize) {
                            let _ = e.read();
                        }
                        self.serve(Some(i as usize));
                    }
                }
            }
        }
    }

    /// Serves queue `index` (None: the backend fd), then raises the interrupt if the driver
    /// wants one.
    fn serve(&self, index: Option<usize>) {
        let mut t = lock(&self.inner);
        if !t.activated || t.paused || t.status & STATUS_FAILED != 0 {
            return;
        }
        let Transport {
            backend, queues, ..
        } = &mut *t;
        let r = match index {
            Some(i) if i < queues.len() => backend
                .process(i, queues, &self.mem)
                // A receive queue that got buffers may unblock waiting backend input.
                .and_then(|a| Ok(a | backend.process_backend(queues, &self.mem)?)),
            Some(_) => Ok(false),
            None => backend.process_backend(queues, &self.mem),
        };
        match r {
            Ok(true) => self.notify(&mut t),
            Ok(false) => {}
            Err(e) => {
                tracing::error!("virtio device failed: {e}");
                t.status |= STATUS_FAILED;
            }
        }
    }

    /// Every [`TICK`]: serves every ring (a kick that got lost leaves chains waiting), and
    /// raises again an interrupt whose status bits stayed unacknowledged since the last tick:
    /// set then and now, with no acknowledgement in between (the driver acknowledges within
    /// microseconds when it sees one). Under steady traffic a bit is often set at both ticks
    /// and acknowledged and set again in between: not a lost interrupt (counting it as one
    /// logged a dozen false alarms per nested Linux migration). Counted in the log: it should
    /// not happen.
    fn tick(&self, unacked: &mut (u32, u32), recovered: &mut u64) {
        self.serve_all();
        let t = lock(&self.inner);
        if !t.activated || t.paused || t.status & STATUS_FAILED != 0 {
            *unacked = (0, 0);
            return;
        }
        let (pending, acks) = (t.interrupt_status, t.acks);
        drop(t);
        if pending & unacked.0 != 0 && acks == unacked.1 {
            *recovered += 1;
            if recovered.is_power_of_two() {
                tracing::warn!(
                    gsi = self.irq.gsi(),
                    times = *recovered,
                    "virtio: an interrupt stayed unacknowledged for {} ms; raised again",
                    TICK.as_millis()
                );
                // From the eighth on, what the guest's interrupt controllers hold for it
                // (an in-service bit never cleared, a remote IRR never acknowledged, a mask).
                if *recovered >= STUCK_REPORT_AFTER {
                    self.irq.report_stuck();
                }
            }
            let _ = self.irq.trigger();
        }
        *unacked = (pending, acks);
    }

    /// After a wake-up (activation, resume): every queue, the backend, a pending interrupt.
    fn serve_all(&self) {
        let n = lock(&self.inner).queues.len();
        for i in 0..n {
            self.serve(Some(i));
        }
        self.serve(None);
        let mut t = lock(&self.inner);
        if std::mem::take(&mut t.resumed) && t.activated && !t.paused && t.interrupt_status != 0 {
            // An edge raised just before a migration may not have reached this side's
            // interrupt controller: raise it again (the driver reads the status anyway).
            let _ = self.irq.trigger();
        }
    }

    fn notify(&self, t: &mut Transport) {
        let mem = &self.mem;
        let wanted = t
            .queues
            .iter_mut()
            .any(|q| q.ready() && q.needs_notification(mem).unwrap_or(true));
        if wanted {
            t.interrupt_status |= INT_VRING;
            let _ = self.irq.trigger();
        }
    }
}

impl MigratableDevice for VirtioMmio {
    fn name(&self) -> &str {
        &self.name
    }

    fn section_ids(&self) -> &[u32] {
        &[SECTION_VIRTIO]
    }

    fn section_instance(&self) -> Option<u32> {
        Some(self.slot)
    }

    fn save(&self) -> Result<Vec<DeviceSection>, VmError> {
        let t = lock(&self.inner);
        let mut d = Vec::new();
        d.extend_from_slice(&t.backend.device_type().to_le_bytes());
        for v in [t.device_features_sel, t.driver_features_sel] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&t.driver_features.to_le_bytes());
        for v in [
            t.queue_sel,
            t.status,
            t.interrupt_status,
            t.config_generation,
        ] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.push(u8::from(t.activated));
        d.extend_from_slice(&(t.queues.len() as u16).to_le_bytes());
        for q in &t.queues {
            let s = q.state();
            d.extend_from_slice(&s.max_size.to_le_bytes());
            d.extend_from_slice(&s.size.to_le_bytes());
            d.push(u8::from(s.ready));
            d.extend_from_slice(&s.next_avail.to_le_bytes());
            d.extend_from_slice(&s.next_used.to_le_bytes());
            d.push(u8::from(s.event_idx_enabled));
            for a in [s.desc_table, s.avail_ring, s.used_ring] {
                d.extend_from_slice(&a.to_le_bytes());
            }
        }
        let b = t.backend.save();
        d.extend_from_slice(&(b.len() as u32).to_le_bytes());
        d.extend_from_slice(&b);
        Ok(vec![DeviceSection {
            id: SECTION_VIRTIO,
            instance: self.slot,
            version: SECTION_VERSION,
            data: d,
        }])
    }

    fn check(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        let t = lock(&self.inner);
        self.decode(&t, sections).map(|_| ())
    }

    fn restore(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        let mut t = lock(&self.inner);
        let s = self.decode(&t, sections)?;
        t.backend
            .restore(&s.backend)
            .map_err(|e| self.err(format!("backend state: {e}")))?;
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.driver_features = s.driver_features;
        t.queue_sel = s.queue_sel;
        t.status = s.status;
        t.interrupt_status = s.interrupt_status;
        t.config_generation = s.config_generation;
        t.activated = s.activated;
        t.queues = s.queues;
        if s.driver_features != 0 {
            t.backend.ack_features(s.driver_features);
        }
        Ok(())
    }

    fn quiesce(&self) -> Result<(), VmError> {
        // Taking the lock waits for a request being served to complete.
        let mut t = lock(&self.inner);
        t.paused = true;
        t.backend
            .quiesce()
            .map_err(|e| VmError::InvalidSpec(format!("virtio device {}: {e}", self.name)))
    }

    fn resume(&self) -> Result<(), VmError> {
        {
            let mut t = lock(&self.inner);
            t.paused = false;
            t.resumed = true;
        }
        let _ = self.wake.write(1);
        Ok(())
    }
}

/// A device's section, decoded.
struct Saved {
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    queues: Vec<Queue>,
    backend: Vec<u8>,
}

impl VirtioMmio {
    fn err(&self, reason: String) -> VmError {
        VmError::State {
            id: SECTION_VIRTIO,
            instance: self.slot,
            reason: format!("{}: {reason}", self.name),
        }
    }

    fn decode(&self, t: &Transport, sections: &[&DeviceSection]) -> Result<Saved, VmError> {
        let mine: Vec<&&DeviceSection> = sections
            .iter()
            .filter(|s| s.instance == self.slot)
            .collect();
        let [s] = mine.as_slice() else {
            return Err(self.err(format!(
                "{} sections for this device, expected 1",
                mine.len()
            )));
        };
        if s.version != SECTION_VERSION {
            return Err(self.err(format!("unsupported version {}", s.version)));
        }
        let mut r = Cursor(&s.data);
        let bad = |m: &str| self.err(m.to_string());
        let device_type = r.u32().ok_or_else(|| bad("truncated"))?;
        if device_type != t.backend.device_type() {
            return Err(self.err(format!(
                "state of a device of type {device_type}, this one is type {}",
                t.backend.device_type()
            )));
        }
        let trunc = || bad("truncated");
        let device_features_sel = r.u32().ok_or_else(trunc)?;
        let driver_features_sel = r.u32().ok_or_else(trunc)?;
        let driver_features = r.u64().ok_or_else(trunc)?;
        let queue_sel = r.u32().ok_or_else(trunc)?;
        let status = r.u32().ok_or_else(trunc)?;
        let interrupt_status = r.u32().ok_or_else(trunc)?;
        let config_generation = r.u32().ok_or_else(trunc)?;
        let activated = r.u8().ok_or_else(trunc)? != 0;
        let n = usize::from(r.u16().ok_or_else(trunc)?);
        if n != t.queues.len() {
            return Err(self.err(format!("{n} queues, this device has {}", t.queues.len())));
        }
        if driver_features & !t.device_features() != 0 {
            return Err(self.err(format!(
                "driver features {driver_features:#x} not offered here ({:#x})",
                t.device_features()
            )));
        }
        let mut queues = Vec::with_capacity(n);
        for (i, mine) in t.queues.iter().enumerate() {
            let state = QueueState {
                max_size: r.u16().ok_or_else(trunc)?,
                size: r.u16().ok_or_else(trunc)?,
                ready: r.u8().ok_or_else(trunc)? != 0,
                next_avail: r.u16().ok_or_else(trunc)?,
                next_used: r.u16().ok_or_else(trunc)?,
                event_idx_enabled: r.u8().ok_or_else(trunc)? != 0,
                desc_table: r.u64().ok_or_else(trunc)?,
                avail_ring: r.u64().ok_or_else(trunc)?,
                used_ring: r.u64().ok_or_else(trunc)?,
            };
            if state.max_size != mine.max_size() {
                return Err(self.err(format!(
                    "queue {i}: maximum size {} here, {} in the state",
                    mine.max_size(),
                    state.max_size
                )));
            }
            let ready = state.ready;
            let q = Queue::try_from(state).map_err(|e| self.err(format!("queue {i}: {e:?}")))?;
            if ready && !q.is_valid(&self.mem) {
                return Err(self.err(format!("queue {i}: rings outside guest RAM")));
            }
            queues.push(q);
        }
        let blen = r.u32().ok_or_else(trunc)? as usize;
        if blen > MAX_BACKEND_STATE {
            return Err(self.err(format!("{blen} bytes of backend state")));
        }
        let backend = r.bytes(blen).ok_or_else(trunc)?.to_vec();
        if !r.0.is_empty() {
            return Err(self.err(format!("{} trailing bytes", r.0.len())));
        }
        Ok(Saved {
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            status,
            interrupt_status,
            config_generation,
            activated,
            queues,
            backend,
        })
    }
}

/// Little-endian reads off a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::block::Block;
    use super::*;
    use crate::memory::{GuestRam, Populate, RamLayout};
    use crate::storage::image::DiskImage;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn reg(d: &VirtioMmio, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    fn read_reg(d: &VirtioMmio, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The driver side of device initialisation, queue 0 of 16 entries.
    fn bring_up(d: &VirtioMmio) {
        assert_eq!(read_reg(d, 0), MAGIC);
        assert_eq!(read_reg(d, 8), 2, "a block device");
        reg(d, 0x70, 1);
        reg(d, 0x70, 3);
        reg(d, 0x14, 1);
        assert_eq!(read_reg(d, 0x10) & 1, 1, "VERSION_1 offered");
        reg(d, 0x24, 1);
        reg(d, 0x20, 1); // VERSION_1
        reg(d, 0x24, 0);
        reg(d, 0x20, 0);
        reg(d, 0x70, 3 | STATUS_FEATURES_OK);
        assert_ne!(read_reg(d, 0x70) & STATUS_FEATURES_OK, 0);
        reg(d, 0x30, 0);
        assert_eq!(read_reg(d, 0x34), 256);
        reg(d, 0x38, 16);
        reg(d, 0x80, DESC as u32);
        reg(d, 0x84, 0);
        reg(d, 0x90, AVAIL as u32);
        reg(d, 0x94, 0);
        reg(d, 0xa0, USED as u32);
        reg(d, 0xa4, 0);
        reg(d, 0x44, 1);
        reg(d, 0x70, 3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    fn desc(mem: &Mem, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * i);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(DESC + 16 * i + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(DESC + 16 * i + 12))
            .unwrap();
        mem.write_obj(next, GuestAddress(DESC + 16 * i + 14))
            .unwrap();
    }

    /// Queues a request of type `kind` for `sector` with a data buffer at `data` (chain head
    /// `head`, avail slot `slot`); the avail index becomes `slot + 1` only if `publish`.
    fn request(mem: &Mem, head: u16, kind: u32, sector: u64, data: u64, write_only_data: bool) {
        let h = u64::from(head);
        let hdr = 0x4000 + 0x100 * h;
        mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        desc(mem, h, hdr, 16, 1, head + 1);
        desc(
            mem,
            h + 1,
            data,
            4096,
            1 | if write_only_data { 2 } else { 0 },
            head + 2,
        );
        desc(mem, h + 2, hdr + 0x80, 1, 2, 0);
    }

    fn publish(mem: &Mem, slot: u16, head: u16) {
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        mem.write_obj(slot + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(mem: &Mem) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn wait_used(mem: &Mem, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_idx(mem) < n {
            assert!(
                Instant::now() < deadline,
                "used index stuck at {}",
                used_idx(mem)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn disk(dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("disk.img");
        let mut content = vec![0u8; 1 << 20];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        std::fs::write(&p, &content).unwrap();
        p
    }

    /// A block device on a fresh test disk in its own directory, brought up by a test driver.
    fn block_device(tag: &str) -> (std::path::PathBuf, GuestRam, Mem, IrqLine, Arc<VirtioMmio>) {
        let dir = std::env::temp_dir().join(format!("livemig-virtio-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = disk(&dir);
        let ram = GuestRam::new(&RamLayout::single(1 << 20), Populate::Lazy).unwrap();
        let mem = ram.memory().clone();
        let irq = IrqLine::new(5).unwrap();
        let backend = Box::new(Block::new(
            Arc::new(DiskImage::open(&path, false, false).unwrap()),
            "disk0",
        ));
        let a = VirtioMmio::new(0, "disk0", backend, irq.clone(), mem.clone()).unwrap();
        bring_up(&a);
        (dir, ram, mem, irq, a)
    }

    /// An interrupt the driver never acknowledged (lost on its way) is raised again at the
    /// worker's next ticks; once acknowledged, no more.
    #[test]
    fn an_interrupt_left_unacknowledged_is_raised_again() {
        let (dir, _ram, mem, irq, a) = block_device("irq");
        request(&mem, 0, 0, 8, 0x8000, true);
        publish(&mem, 0, 0);
        a.queue_eventfds()[0].write(1).unwrap();
        wait_used(&mem, 1);
        // Three ticks with the status unacknowledged.
        std::thread::sleep(TICK * 3 + Duration::from_millis(100));
        let raised = irq.eventfd().read().unwrap();
        assert!(raised >= 2, "raised {raised} time(s)");
        reg(&a, 0x64, INT_VRING);
        let _ = irq.eventfd().read();
        std::thread::sleep(TICK * 3);
        assert!(
            irq.eventfd().read().is_err(),
            "raised after the acknowledgement"
        );
        a.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Traffic that keeps the status bit set at every tick, each interrupt acknowledged before
    /// the next one is raised, is not mistaken for a lost interrupt: nothing is raised again.
    #[test]
    fn a_status_set_again_after_its_acknowledgement_is_not_raised_again() {
        let (dir, _ram, mem, irq, a) = block_device("irq-busy");
        let requests = 10u16;
        for slot in 0..requests {
            request(&mem, 0, 0, 8, 0x8000, true);
            publish(&mem, slot, 0);
            a.queue_eventfds()[0].write(1).unwrap();
            wait_used(&mem, slot + 1);
            // Acknowledged, then the next request sets it again: the bit is set at every tick.
            std::thread::sleep(TICK / 4);
            reg(&a, 0x64, INT_VRING);
        }
        let raised = irq.eventfd().read().unwrap();
        assert_eq!(raised, u64::from(requests), "one interrupt per request");
        a.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A block device served end to end through the transport, then migrated with a request
    /// queued while it was quiesced: the request is served once, by the destination.
    #[test]
    fn block_requests_and_migration_of_queued_work() {
        let (dir, ram, mem, irq, a) = block_device("blk");
        let path = dir.join("disk.img");
        // Read sector 8 into 0x8000.
        request(&mem, 0, 0, 8, 0x8000, true);
        publish(&mem, 0, 0);
        let _ = ram.take_vmm_dirty(0); // what the test's "driver" wrote
        a.queue_eventfds()[0].write(1).unwrap();
        wait_used(&mem, 1);
        // The device's writes (the data, the status byte, the used ring) are dirty pages.
        let dirty = ram.take_vmm_dirty(0);
        let is_dirty =
            |gpa: u64| dirty[(gpa / 4096 / 64) as usize] & (1 << ((gpa / 4096) % 64)) != 0;
        assert!(
            is_dirty(0x8000) && is_dirty(0x4080) && is_dirty(USED),
            "{dirty:x?}"
        );
        let mut got = [0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        for (i, sector) in got.chunks(512).enumerate() {
            assert!(
                sector.iter().all(|&b| b as usize == 8 + i),
                "sector {}",
                8 + i
            );
        }
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x4080)).unwrap(),
            0,
            "status OK"
        );
        assert_ne!(read_reg(&a, 0x60) & INT_VRING, 0);
        assert!(irq.eventfd().read().unwrap() >= 1, "interrupt raised");
        reg(&a, 0x64, INT_VRING);
        assert_eq!(read_reg(&a, 0x60), 0);

        // Pause, then the guest queues a write of 0xab into sector 16: not served.
        a.quiesce().unwrap();
        mem.write_slice(&[0xab; 4096], GuestAddress(0x9000))
            .unwrap();
        request(&mem, 3, 1, 16, 0x9000, false);
        publish(&mem, 1, 3);
        a.queue_eventfds()[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(used_idx(&mem), 1, "a quiesced device serves nothing");
        let saved = a.save().unwrap();
        a.stop();

        // The destination: same RAM (copied), same disk, state restored, then resumed.
        let ram_b = GuestRam::new(&RamLayout::single(1 << 20), Populate::Lazy).unwrap();
        let mut all = vec![0u8; 1 << 20];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        ram_b.memory().write_slice(&all, GuestAddress(0)).unwrap();
        let mem_b = ram_b.memory().clone();
        // Opened unlocked, as a destination opens it (the source still holds the lock).
        let backend = Box::new(Block::new(
            Arc::new(DiskImage::open(&path, false, true).unwrap()),
            "disk0",
        ));
        let b =
            VirtioMmio::new(0, "disk0", backend, IrqLine::new(5).unwrap(), mem_b.clone()).unwrap();
        let refs: Vec<&DeviceSection> = saved.iter().collect();
        b.check(&refs).unwrap();
        b.restore(&refs).unwrap();
        b.resume().unwrap();
        wait_used(&mem_b, 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(used_idx(&mem_b), 2, "served exactly once");
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[16 * 512..16 * 512 + 4096]
            .iter()
            .all(|&b| b == 0xab));
        assert!(
            on_disk[24 * 512..25 * 512].iter().all(|&b| b == 24),
            "nothing else written"
        );

        // Bad state is refused before anything changes.
        let mut bad = saved[0].clone();
        bad.data[0] = 1; // a net device's state
        assert!(b.check(&[&bad]).is_err());
        let mut bad = saved[0].clone();
        bad.data.truncate(20);
        assert!(b.check(&[&bad]).is_err());
        let mut bad = saved[0].clone();
        bad.instance = 7;
        assert!(b.check(&[&bad]).is_err());
        b.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Requests outside the disk and writes to a read-only disk fail with an I/O error status.
    #[test]
    fn out_of_range_and_read_only_requests_fail_cleanly() {
        let dir = std::env::temp_dir().join(format!("livemig-virtio-ro-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = disk(&dir);
        let ram = GuestRam::new(&RamLayout::single(1 << 20), Populate::Lazy).unwrap();
        let mem = ram.memory().clone();
        let backend = Box::new(Block::new(
            Arc::new(DiskImage::open(&path, true, false).unwrap()),
            "ro",
        ));
        let d = VirtioMmio::new(0, "ro", backend, IrqLine::new(5).unwrap(), mem.clone()).unwrap();
        bring_up(&d);
        request(&mem, 0, 0, (1 << 20) / 512 - 2, 0x8000, true); // runs past the end
        publish(&mem, 0, 0);
        request(&mem, 3, 1, 0, 0x9000, false); // a write
        publish(&mem, 1, 3);
        d.queue_eventfds()[0].write(1).unwrap();
        wait_used(&mem, 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4080)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4380)).unwrap(), 1);
        d.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
