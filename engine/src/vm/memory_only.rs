//! A memory-only VM: guest RAM plus a host thread that keeps writing pages.
//!
//! It has no vCPUs: the "guest" is a host thread that writes its working set through
//! vm-memory, so every write lands in vm-memory's dirty bitmap. It runs where there is no KVM
//! (inside the soft-RoCE test VM) and exercises the real scheduler, transports, protocol and
//! switchover through the same [`MigratableVm`] trait. Its state is one section holding the
//! writer's position, so a migrated writer continues where it stopped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::{builtin_guest, DeviceSection, MigratableVm, RunState, VmConfig, VmError, VmSpec};
use crate::devices::disk_writer::{self, DiskWriter, DiskWriterSpec};
use crate::devices::MigratableDevice;
use crate::dirty::DirtyBitmap;
use crate::memory::{GuestRam, Populate, RamLayout, PAGE_SIZE};
use crate::storage::VmDisk;

/// Section id of the writer state.
pub const SECTION_WRITER: u32 = 0x100;
/// Machine name of the memory-only VM, checked by destinations.
pub const MACHINE: &str = "livemig-memory-only";
/// Guest address of the progress counter.
const COUNTER_GPA: u64 = 0;

#[derive(Debug, Default)]
struct Control {
    state: Option<RunState>,
    paused_ack: bool,
    position: u64,
    /// Auto-converge: percent of the writer's time spent sleeping.
    throttle: u8,
}

/// A VM made of RAM and a writer thread.
pub struct MemoryVm {
    spec: VmSpec,
    disk: Option<Arc<DiskWriter>>,
    ram: GuestRam,
    ctl: Arc<(Mutex<Control>, Condvar)>,
    tracking: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MemoryVm {
    /// Builds and starts a memory-only VM for `spec` (RAM filled by `fill`).
    pub fn launch(spec: &VmSpec, fill: impl FnOnce(&GuestRam)) -> Result<Self, VmError> {
        MemoryVm::launch_with_disk(spec, None, fill)
    }

    /// [`MemoryVm::launch`] with a disk the VMM writes (the built-in guest's disk workload);
    /// the image is checked and locked before anything starts.
    pub fn launch_with_disk(
        spec: &VmSpec,
        disk: Option<&DiskWriterSpec>,
        fill: impl FnOnce(&GuestRam),
    ) -> Result<Self, VmError> {
        let disk = disk
            .map(|d| DiskWriter::open("disk0", d, false))
            .transpose()?;
        let ram = GuestRam::new(&RamLayout::single(spec.memory_mib << 20), Populate::Lazy)?;
        fill(&ram);
        // The guest's counter starts at zero whatever the fill wrote there.
        ram.memory()
            .write_obj(0u64, GuestAddress(COUNTER_GPA))
            .map_err(|e| VmError::GuestAccess {
                gpa: COUNTER_GPA,
                reason: e.to_string(),
            })?;
        let vm = Self::build(spec, ram, disk)?;
        vm.resume()?;
        Ok(vm)
    }

    /// A stopped skeleton of the VM `config` describes over `ram`, for the destination.
    pub fn new_incoming(config: &VmConfig, ram: GuestRam) -> Result<Self, VmError> {
        MemoryVm::new_incoming_with_disks(config, ram, &[])
    }

    /// [`MemoryVm::new_incoming`], its disk (if it has one) at the path `disks` names for
    /// its id, else at the source's path.
    pub fn new_incoming_with_disks(
        config: &VmConfig,
        ram: GuestRam,
        disks: &[(String, PathBuf)],
    ) -> Result<Self, VmError> {
        if config.machine != MACHINE {
            return Err(VmError::InvalidSpec(format!(
                "the source VM runs on {:?} but this destination runs {MACHINE:?} (see --backend)",
                config.machine
            )));
        }
        let disk = DiskWriter::from_devices(&config.devices, disks)?;
        Self::build(&builtin_guest::spec_from_config(config)?, ram, disk)
    }

    fn build(spec: &VmSpec, ram: GuestRam, disk: Option<DiskWriter>) -> Result<Self, VmError> {
        if ram.total_bytes() < 2 * PAGE_SIZE {
            return Err(VmError::InvalidSpec(
                "memory-only VM needs at least 2 pages".into(),
            ));
        }
        Ok(MemoryVm {
            spec: spec.clone(),
            disk: disk.map(Arc::new),
            ram,
            ctl: Arc::new((
                Mutex::new(Control {
                    state: Some(RunState::Created),
                    ..Control::default()
                }),
                Condvar::new(),
            )),
            tracking: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.ctl.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn_writer(&self) {
        let ram = self.ram.clone();
        let ctl = self.ctl.clone();
        let pages = (ram.total_bytes() / PAGE_SIZE - 1)
            .min((self.spec.workload.working_set_mib << 20) / PAGE_SIZE)
            .max(1);
        let rate = self.spec.workload.dirty_rate;
        let handle = std::thread::spawn(move || {
            let batch = (rate / 200).clamp(1, 256);
            let period = if rate == 0 {
                Duration::from_millis(5)
            } else {
                Duration::from_secs_f64(batch as f64 / rate as f64)
            };
            let mut next = Instant::now();
            loop {
                let (pos, throttle) = {
                    let mut c = ctl.0.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        match c.state {
                            Some(RunState::Running) => break,
                            Some(RunState::Paused) => {
                                c.paused_ack = true;
                                ctl.1.notify_all();
                                c = ctl.1.wait(c).unwrap_or_else(|p| p.into_inner());
                                next = Instant::now();
                            }
                            _ => {
                                c.paused_ack = true;
                                ctl.1.notify_all();
                                return;
                            }
                        }
                    }
                    (c.position, c.throttle)
                };
                let n = if rate == 0 { 0 } else { batch };
                let mut p = pos;
                for _ in 0..n {
                    let gpa = PAGE_SIZE + (p % pages) * PAGE_SIZE + (p * 8) % PAGE_SIZE;
                    let _ = ram.memory().write_obj(p, GuestAddress(gpa));
                    p += 1;
                }
                let counter: u64 = ram
                    .memory()
                    .read_obj(GuestAddress(COUNTER_GPA))
                    .unwrap_or(0);
                let _ = ram
                    .memory()
                    .write_obj(counter + 1, GuestAddress(COUNTER_GPA));
                {
                    let mut c = ctl.0.lock().unwrap_or_else(|p| p.into_inner());
                    c.position = p;
                }
                // Throttled, a batch takes 1/(1 - t) of its time: the rest is sleep.
                next += period.mul_f64(100.0 / f64::from(100 - throttle.min(99)));
                let now = Instant::now();
                if next > now {
                    let c = ctl.0.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = ctl
                        .1
                        .wait_timeout_while(c, next - now, |c| c.state == Some(RunState::Running));
                } else {
                    next = now;
                }
            }
        });
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }
}

impl MigratableVm for MemoryVm {
    fn config(&self) -> VmConfig {
        VmConfig {
            machine: MACHINE.into(),
            layout: self.ram.layout().clone(),
            vcpus: self.spec.vcpus,
            devices: self.disk.iter().map(|d| d.descriptor()).collect(),
            machine_section: builtin_guest::encode_section(&self.spec),
        }
    }

    fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn run_state(&self) -> RunState {
        self.lock().state.unwrap_or(RunState::Stopped)
    }

    fn disks(&self) -> Vec<VmDisk> {
        self.disk.iter().map(|d| d.disk()).collect()
    }

    fn start_dirty_tracking(&self) -> Result<(), VmError> {
        self.tracking.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn harvest_dirty(&self, into: &mut DirtyBitmap) -> Result<(), VmError> {
        for i in 0..self.ram.layout().regions.len() {
            into.or_words(i, &self.ram.take_vmm_dirty(i));
        }
        Ok(())
    }

    fn stop_dirty_tracking(&self) -> Result<(), VmError> {
        self.tracking.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn pause(&self) -> Result<(), VmError> {
        let mut c = self.lock();
        match c.state {
            Some(RunState::Running) => {}
            Some(RunState::Paused) => return Ok(()),
            state => {
                return Err(VmError::WrongState {
                    state: state.unwrap_or(RunState::Stopped),
                    op: "pause",
                })
            }
        }
        c.state = Some(RunState::Paused);
        c.paused_ack = false;
        self.ctl.1.notify_all();
        let (c, t) = self
            .ctl
            .1
            .wait_timeout_while(c, Duration::from_secs(5), |c| !c.paused_ack)
            .unwrap_or_else(|p| p.into_inner());
        if t.timed_out() && !c.paused_ack {
            return Err(VmError::VcpuFailed {
                vcpu: 0,
                reason: "writer did not stop within 5 s".into(),
            });
        }
        drop(c);
        match &self.disk {
            Some(d) => d.quiesce(),
            None => Ok(()),
        }
    }

    fn resume(&self) -> Result<(), VmError> {
        let first = {
            let mut c = self.lock();
            let first = match c.state {
                Some(RunState::Created) => true,
                Some(RunState::Paused) => false,
                Some(RunState::Running) => return Ok(()),
                state => {
                    return Err(VmError::WrongState {
                        state: state.unwrap_or(RunState::Stopped),
                        op: "resume",
                    })
                }
            };
            c.state = Some(RunState::Running);
            self.ctl.1.notify_all();
            first
        };
        if first {
            self.spawn_writer();
        }
        match &self.disk {
            Some(d) => d.resume(),
            None => Ok(()),
        }
    }

    fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        self.lock().throttle = percent.min(99);
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<DeviceSection>, VmError> {
        let c = self.lock();
        let mut out = vec![DeviceSection {
            id: SECTION_WRITER,
            instance: 0,
            version: 1,
            data: c.position.to_le_bytes().to_vec(),
        }];
        if let Some(d) = &self.disk {
            out.extend(d.save()?);
        }
        Ok(out)
    }

    fn restore_state(&self, sections: &[DeviceSection]) -> Result<(), VmError> {
        let mut position = None;
        let mut disk = Vec::new();
        for s in sections {
            let bad = |reason: String| VmError::State {
                id: s.id,
                instance: s.instance,
                reason,
            };
            if s.id == disk_writer::SECTION && self.disk.is_some() {
                disk.push(s);
                continue;
            }
            if s.id != SECTION_WRITER || s.instance != 0 || s.version != 1 {
                return Err(bad("unknown section for a memory-only VM".into()));
            }
            let bytes: [u8; 8] = s
                .data
                .as_slice()
                .try_into()
                .map_err(|_| bad(format!("{} bytes, expected 8", s.data.len())))?;
            position = Some(u64::from_le_bytes(bytes));
        }
        let position = position.ok_or(VmError::State {
            id: SECTION_WRITER,
            instance: 0,
            reason: "missing".into(),
        })?;
        if let Some(d) = &self.disk {
            d.check(&disk)?;
            d.restore(&disk)?;
        }
        self.lock().position = position;
        Ok(())
    }

    fn progress(&self) -> Result<u64, VmError> {
        self.ram
            .memory()
            .read_obj(GuestAddress(COUNTER_GPA))
            .map_err(|e| VmError::GuestAccess {
                gpa: COUNTER_GPA,
                reason: e.to_string(),
            })
    }

    fn shutdown(&self) {
        {
            let mut c = self.lock();
            c.state = Some(RunState::Stopped);
            self.ctl.1.notify_all();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        if let Some(d) = &self.disk {
            d.stop();
        }
    }
}

impl Drop for MemoryVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
