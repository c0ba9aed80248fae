//! [`KvmVm`]: livemig's VMM, a [`MigratableVm`] on kvm-ioctls. It runs either the built-in
//! test guest ([`super::builtin_guest`]) or a Linux kernel with its devices ([`linux`]).
//!
//! A `KvmVm` owns a KVM VM with an in-kernel irqchip (LAPIC, PIC, IOAPIC), one memory slot per
//! RAM region (slot `i` = region `i` of the [`GuestRam`]), one thread per vCPU and, for Linux
//! guests, its devices (COM1, ACPI power registers, virtio-mmio devices with their worker
//! threads). Guest RAM is shared with the migration engine, which reads and writes it in
//! place.
//!
//! Rooms: [`vcpu`] (the vCPU threads: run loop, exits, pacing, pause), [`state`] (KVM state as
//! migratable devices: vCPUs, irqchips, clock), [`boot`] (loading and entering a Linux
//! kernel), [`cpuid`], [`linux`] (a Linux VM's devices and configuration), this file (the VM:
//! slots, irqchip, vCPUs, the device manager, dirty tracking, [`MigratableVm`]).
//!
//! # Dirty tracking
//!
//! Slots are registered without `KVM_MEM_LOG_DIRTY_PAGES`:
//! [`MigratableVm::start_dirty_tracking`] re-registers them with the flag (so the guest takes
//! no write-protection faults before a migration starts) and
//! [`MigratableVm::stop_dirty_tracking`] clears it. A harvest ORs the KVM log of each slot,
//! the VMM-side writes recorded by vm-memory since the previous harvest (device emulation
//! writes guest RAM through vm-memory only) and the devices' own reports into the caller's
//! bitmap; pages written before tracking started may show up in the first harvest too.
//!
//! # State
//!
//! vCPU and device state is whatever the VM's [`DeviceManager`] holds, registered in restore
//! order: the irqchips and the clock, then the devices, then the vCPUs.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use super::builtin_guest::{self, GuestLayout};
use super::{DeviceSection, GuestExit, MigratableVm, RunState, VmConfig, VmError, VmSpec};
use crate::devices::disk_writer::{DiskWriter, DiskWriterSpec};
use crate::devices::uart::Console;
use crate::devices::virtio::{VirtioMmio, QUEUE_NOTIFY};
use crate::devices::{DeviceManager, IrqLine, MigratableDevice};
use crate::dirty::DirtyBitmap;
use crate::memory::{GuestRam, Populate, RamLayout};
use crate::storage::VmDisk;

pub mod boot;
pub mod cpu;
pub mod cpuid;
mod irqdiag;
pub mod linux;
pub mod state;
pub mod vcpu;

pub use linux::{ConsoleSpec, DiskSpec, HostResources, LinuxSpec, NetSpec};
pub use state::check_sections;
use state::{Irqchips, KvmClock, VcpuContext, VcpuStates, LEGACY_XSAVE};
use vcpu::{vcpu_thread, Control, Exits, Pacing, Target};

/// Machine name of livemig's KVM VMM, checked by destinations.
pub const MACHINE: &str = "livemig-kvm-mini";
/// How long [`MigratableVm::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Address of the 3-page TSS KVM needs for real-mode emulation on some hosts (conventional).
const TSS_ADDR: u64 = 0xfffb_d000;
/// Command-line options livemig puts in front of a Linux guest's own: the console on COM1,
/// no PCI to probe (devices are virtio-mmio, described by ACPI), reboot through ACPI.
const BASE_CMDLINE: &str = "console=ttyS0 pci=off reboot=acpi";

/// What runs in the VM.
enum Guest {
    /// The built-in test guest, with its disk if it has one.
    Builtin {
        layout: GuestLayout,
        spec: VmSpec,
        disk: Option<Arc<DiskWriter>>,
    },
    /// A Linux kernel and its devices.
    Linux(LinuxMachine),
}

/// A Linux guest's devices, as the VM keeps them.
struct LinuxMachine {
    console: Arc<Console>,
    uart: Arc<crate::devices::uart::Uart>,
    virtio: Vec<Arc<VirtioMmio>>,
    descriptors: Vec<super::DeviceDescriptor>,
    disks: Vec<VmDisk>,
}

/// A KVM virtual machine.
///
/// `Send + Sync`: control methods serialise on an internal lock; the vCPU file descriptors
/// live behind per-vCPU mutexes, held by the vCPU threads only while in `KVM_RUN`.
///
/// When a vCPU fails (unexpected exit), [`MigratableVm::run_state`] reports
/// [`RunState::Stopped`] and [`MigratableVm::progress`], `pause` and `resume` return
/// [`VmError::VcpuFailed`]. When the guest powers off or resets, the VM stops and
/// [`MigratableVm::guest_exit`] says which.
pub struct KvmVm {
    // Field order matters for drop: the devices, VM and vCPU fds go before the RAM they map.
    devices: DeviceManager,
    vm: Arc<VmFd>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    control: Arc<Control>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises pause, resume, save, restore, shutdown.
    ops: Mutex<()>,
    /// Whether the slots log dirty pages; also serialises slot updates and harvests.
    tracking: Mutex<bool>,
    guest: Guest,
    /// The processor the guest was given (sent with the VM's configuration).
    cpu: cpu::GuestCpu,
    ram: GuestRam,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("vcpus", &self.vcpus.len())
            .field("run_state", &self.run_state())
            .finish_non_exhaustive()
    }
}

/// What [`KvmVm::build`] makes besides the VM: the vCPU CPUID flavour and the exits.
enum Shape {
    Builtin(GuestLayout, VmSpec, Option<DiskWriter>),
    Linux(linux::Devices),
}

impl KvmVm {
    /// Builds and starts a VM for `spec` (source side): allocates RAM, fills it, writes the
    /// guest program and its layout, creates the vCPUs in long mode and runs them.
    pub fn launch(spec: &VmSpec) -> Result<KvmVm, VmError> {
        KvmVm::launch_with_disk(spec, None)
    }

    /// [`KvmVm::launch`] with a disk the VMM writes at the spec's rate (the built-in
    /// guest's disk workload); the image is checked and locked before anything starts.
    pub fn launch_with_disk(
        spec: &VmSpec,
        disk: Option<&DiskWriterSpec>,
    ) -> Result<KvmVm, VmError> {
        let writer = disk
            .map(|d| DiskWriter::open("disk0", d, false))
            .transpose()?;
        let layout = GuestLayout::new(spec)?;
        let ram = GuestRam::new(&RamLayout::single(layout.ram_bytes()), Populate::Lazy)?;
        builtin_guest::fill(&ram, spec.fill, 0x5eed ^ spec.memory_mib);
        let pacing = Pacing::new(spec);
        layout.write(&ram, pacing.batch)?;
        let vm = KvmVm::build(
            spec.vcpus,
            Shape::Builtin(layout.clone(), spec.clone(), writer),
            ram,
            None,
        )?;
        for (i, vcpu) in vm.vcpus.iter().enumerate() {
            let fd = lock(vcpu);
            let index = i as u32;
            let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            builtin_guest::set_long_mode(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
            fd.set_regs(&layout.initial_regs(index))
                .map_err(kvm("KVM_SET_REGS"))?;
            fd.set_fpu(&initial_fpu()).map_err(kvm("KVM_SET_FPU"))?;
            // Application processors start in INIT-wait under an in-kernel LAPIC.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        }
        vm.resume()?;
        Ok(vm)
    }

    /// Boots a Linux VM: checks and opens every host resource (kernel, initrd, disks, taps,
    /// console log) before anything is created, builds the VM and its devices, loads the
    /// kernel and runs it.
    pub fn boot_linux(spec: &LinuxSpec) -> Result<KvmVm, VmError> {
        if spec.vcpus == 0 || spec.vcpus > 254 {
            return Err(VmError::InvalidSpec(format!(
                "{} vCPUs (1..=254)",
                spec.vcpus
            )));
        }
        if !(64..=(1u64 << 40 >> 20)).contains(&spec.memory_mib) {
            return Err(VmError::InvalidSpec(format!(
                "{} MiB of RAM (at least 64)",
                spec.memory_mib
            )));
        }
        for (what, p) in [
            ("kernel", Some(&spec.kernel)),
            ("initrd", spec.initrd.as_ref()),
        ] {
            if let Some(p) = p {
                std::fs::File::open(p)
                    .map_err(|e| VmError::InvalidSpec(format!("{what} {}: {e}", p.display())))?;
            }
        }
        let opened = linux::open_devices(spec)?;
        let console = linux::open_console(&spec.console)?;
        let ram = GuestRam::new(&boot::ram_layout(spec.memory_mib << 20), Populate::Lazy)?;
        let devices = linux::build(opened, ram.memory(), console)?;
        let windows: Vec<_> = devices.virtio.iter().map(|(_, w)| *w).collect();
        let cmdline = format!("{BASE_CMDLINE} {}", spec.cmdline);
        let entry = boot::load(
            &ram,
            &boot::BootSpec {
                kernel: &spec.kernel,
                initrd: spec.initrd.as_deref(),
                cmdline: cmdline.trim(),
                vcpus: spec.vcpus,
                devices: &windows,
            },
        )?;
        let vm = KvmVm::build(spec.vcpus, Shape::Linux(devices), ram, None)?;
        for (i, vcpu) in vm.vcpus.iter().enumerate() {
            let fd = lock(vcpu);
            fd.set_fpu(&initial_fpu()).map_err(kvm("KVM_SET_FPU"))?;
            let cpuid = fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm("KVM_GET_CPUID2"))?;
            let mut xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
            xcrs.nr_xcrs = 1;
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = cpuid::linux_xcr0(&cpuid);
            fd.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
            set_lint(&fd)?;
            state::set_boot_msrs(&fd)?;
            if i == 0 {
                let mut regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
                let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
                boot::boot_registers(entry, &mut regs, &mut sregs);
                fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
                fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
            }
            // Application processors stay in INIT-wait until the kernel starts them.
        }
        vm.resume()?;
        Ok(vm)
    }

    /// Builds a destination skeleton for `config` (a source's [`MigratableVm::config`]) over
    /// `ram` (allocated by the caller, content arriving from the source), its devices on
    /// `host`'s resources: same VM, irqchip, slots, vCPUs and devices, not started
    /// ([`RunState::Created`]). Call [`MigratableVm::restore_state`], then
    /// [`MigratableVm::resume`].
    ///
    /// The guest keeps the processor it was given: a guest whose CPU this host cannot give
    /// (another vendor, a feature missing here or hidden by [`cpu::HostCpu`]) is refused
    /// before anything is built. A source older than the CPU's place in the machine section
    /// sent none: that guest gets this host's CPU, as it would have then.
    ///
    /// `resume` is refused until `restore_state` succeeded.
    pub fn new_incoming(
        config: &VmConfig,
        ram: GuestRam,
        host: &HostResources,
    ) -> Result<KvmVm, VmError> {
        if config.machine != MACHINE {
            return Err(VmError::InvalidSpec(format!(
                "the source VM runs on {:?} but this destination runs {MACHINE:?} (see --backend)",
                config.machine
            )));
        }
        let (machine_section, guest_cpu) = cpu::unwrap(&config.machine_section)?;
        if let Some(c) = &guest_cpu {
            cpu::check_here(c, &cpu::host_cpu())?;
        }
        let config = &VmConfig {
            machine_section,
            ..config.clone()
        };
        let shape = if linux::is_linux(&config.machine_section)? {
            if ram.layout() != &boot::ram_layout(config.layout.total_bytes()) {
                return Err(VmError::InvalidSpec(format!(
                    "a Linux VM's RAM layout must be the standard one for {} MiB",
                    config.layout.total_bytes() >> 20
                )));
            }
            let opened = linux::open_incoming(&config.devices, host)?;
            let console = linux::open_console(&host.console)?;
            Shape::Linux(linux::build(opened, ram.memory(), console)?)
        } else {
            let spec = builtin_guest::spec_from_config(config)?;
            let layout = GuestLayout::new(&spec)?;
            check_contiguous(&ram, layout.ram_bytes())?;
            let disk = DiskWriter::from_devices(&config.devices, &host.disks)?;
            Shape::Builtin(layout, spec, disk)
        };
        let vm = KvmVm::build(config.vcpus, shape, ram, guest_cpu)?;
        lock(&vm.control.ctl).awaiting_state = true;
        Ok(vm)
    }

    /// The built-in guest's layout (working set, status slots); None for a Linux VM.
    pub fn layout(&self) -> Option<&GuestLayout> {
        match &self.guest {
            Guest::Builtin { layout, .. } => Some(layout),
            Guest::Linux(_) => None,
        }
    }

    /// Creates the KVM VM, irqchip, slots and vCPUs (CPUID set: `cpu`, or for a new VM this
    /// host's under [`cpu::host_cpu`]), wires the devices (irqfds, ioeventfds), registers the
    /// device manager and starts the parked vCPU threads.
    fn build(
        vcpu_count: u32,
        shape: Shape,
        ram: GuestRam,
        cpu: Option<cpu::GuestCpu>,
    ) -> Result<KvmVm, VmError> {
        // The shell made ahead for this very RAM, if there is one (any other is dropped).
        let (kvm_fd, vm) = match lock(&SHELL).take() {
            Some(s) if s.regions == host_regions(&ram) => {
                SHELL_USED.store(true, Ordering::Relaxed);
                (s.kvm, s.vm)
            }
            _ => new_vm(&ram)?,
        };
        let cpu = match cpu {
            Some(c) => c,
            None => cpu::GuestCpu::for_new_vm(&kvm_fd, &cpu::host_cpu())?,
        };
        let mut vcpus = Vec::with_capacity(vcpu_count as usize);
        let mut xfeatures = 0;
        for i in 0..vcpu_count {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            let cpuid = match &shape {
                Shape::Builtin(..) => cpuid::builtin(&cpu.cpuid, i),
                Shape::Linux(_) => cpuid::linux(&cpu.cpuid, i, vcpu_count),
            };
            fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
            xfeatures = cpuid::xfeatures(&cpuid);
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let msr_indices = {
            let first = vcpus
                .first()
                .ok_or_else(|| VmError::InvalidSpec("no vCPU".into()))?;
            state::supported_msrs(&kvm_fd, &lock(first))?
        };
        let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(LEGACY_XSAVE);
        // Restore order: the interrupt controllers and the clock, the devices, the vCPUs.
        let mut devices = DeviceManager::default();
        devices.register(Arc::new(Irqchips::new(vm.clone())))?;
        devices.register(Arc::new(KvmClock::new(vm.clone())))?;
        let (guest, exits) = match shape {
            Shape::Builtin(layout, spec, disk) => {
                let pacing = Pacing::new(&spec);
                let disk = disk.map(Arc::new);
                if let Some(d) = &disk {
                    devices.register(d.clone())?;
                }
                (
                    Guest::Builtin { layout, spec, disk },
                    Exits::Builtin(pacing),
                )
            }
            Shape::Linux(d) => {
                wire(&vm, &d)?;
                devices.register(d.uart.clone())?;
                let mut virtio = Vec::new();
                for (dev, _) in &d.virtio {
                    devices.register(dev.clone() as Arc<dyn MigratableDevice>)?;
                    virtio.push(dev.clone());
                }
                (
                    Guest::Linux(LinuxMachine {
                        console: d.console,
                        uart: d.uart,
                        virtio,
                        descriptors: d.descriptors,
                        disks: d.disks,
                    }),
                    Exits::Linux {
                        pio: d.pio,
                        mmio: d.mmio,
                    },
                )
            }
        };
        devices.register(Arc::new(VcpuStates::new(
            vcpus.clone(),
            VcpuContext {
                msr_indices,
                xsave_size,
                xfeatures,
                ram: Some(ram.layout().clone()),
            },
        )))?;
        let control = Arc::new(Control::new(vcpu_count as usize));
        if let Guest::Linux(m) = &guest {
            // A device that finds its interrupt unserviced for seconds has the VMM log what
            // the interrupt controllers hold for it.
            let hook = irqdiag::stuck_irq_hook(Arc::downgrade(&vm), Arc::downgrade(&control));
            m.uart.irq().on_stuck(hook.clone());
            for d in &m.virtio {
                d.irq().on_stuck(hook.clone());
            }
        }
        let vm = KvmVm {
            devices,
            vm,
            vcpus,
            control,
            threads: Mutex::new(Vec::new()),
            ops: Mutex::new(()),
            tracking: Mutex::new(false),
            guest,
            cpu,
            ram,
        };
        vm.spawn_vcpus(exits)?;
        Ok(vm)
    }

    fn spawn_vcpus(&self, exits: Exits) -> Result<(), VmError> {
        let exits = Arc::new(exits);
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            let vcpu = Arc::clone(vcpu);
            let control = Arc::clone(&self.control);
            let exits = Arc::clone(&exits);
            // The thread keeps the RAM mapped as long as it holds the vCPU fd (which keeps
            // the KVM VM and its slots alive), even if it is ever detached.
            let ram = self.ram.clone();
            let index = i as u32;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(index, &vcpu, &control, &exits, ram))
                .map_err(|e| VmError::VcpuFailed {
                    vcpu: index,
                    reason: format!("cannot spawn its thread: {e}"),
                });
            match handle {
                Ok(h) => threads.push(h),
                Err(e) => {
                    // Threads already spawned count as exited for the shutdown in Drop.
                    lock(&self.control.ctl).exited += self.vcpus.len() - threads.len();
                    *lock(&self.threads) = threads;
                    return Err(e);
                }
            }
        }
        *lock(&self.threads) = threads;
        Ok(())
    }

    fn failure(&self) -> Option<VmError> {
        lock(&self.control.ctl)
            .failure
            .as_ref()
            .map(|(vcpu, reason)| VmError::VcpuFailed {
                vcpu: *vcpu,
                reason: reason.clone(),
            })
    }

    fn require_stopped_vcpus(&self, op: &'static str) -> Result<(), VmError> {
        match self.run_state() {
            RunState::Created | RunState::Paused => Ok(()),
            state => Err(VmError::WrongState { state, op }),
        }
    }
}

/// The FPU state of a vCPU at reset.
fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// LINT0 as ExtINT and LINT1 as NMI, as firmware leaves a local APIC.
fn set_lint(fd: &VcpuFd) -> Result<(), VmError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DM_EXTINT: u32 = 7 << 8;
    const DM_NMI: u32 = 4 << 8;
    let mut lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (off, mode) in [(LVT_LINT0, DM_EXTINT), (LVT_LINT1, DM_NMI)] {
        let v = (irqdiag::reg(&lapic, off) & !0x700) | mode;
        irqdiag::set_reg(&mut lapic, off, v);
    }
    fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Registers the devices' interrupt lines (irqfds) and queue notifications (ioeventfds).
fn wire(vm: &VmFd, d: &linux::Devices) -> Result<(), VmError> {
    let irqfd = |line: &IrqLine| {
        vm.register_irqfd(line.eventfd(), line.gsi())
            .map_err(kvm("KVM_IRQFD"))
    };
    irqfd(d.uart_irq())?;
    for (dev, window) in &d.virtio {
        irqfd(dev.irq())?;
        for (i, evt) in dev.queue_eventfds().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(window.base + QUEUE_NOTIFY),
                i as u32,
            )
            .map_err(kvm("KVM_IOEVENTFD"))?;
        }
    }
    Ok(())
}

/// The built-in guest's RAM must cover `0..bytes` without holes.
fn check_contiguous(ram: &GuestRam, bytes: u64) -> Result<(), VmError> {
    let mut end = 0;
    for r in &ram.layout().regions {
        if r.gpa != end {
            return Err(VmError::InvalidSpec(format!(
                "RAM region at {:#x} leaves a hole at {end:#x}",
                r.gpa
            )));
        }
        end += r.size;
    }
    if end != bytes {
        return Err(VmError::InvalidSpec(format!(
            "RAM of {end} bytes for a spec of {bytes} bytes"
        )));
    }
    Ok(())
}

impl MigratableVm for KvmVm {
    fn config(&self) -> VmConfig {
        let (devices, machine_section) = match &self.guest {
            Guest::Builtin { spec, disk, .. } => (
                disk.iter().map(|d| d.descriptor()).collect(),
                builtin_guest::encode_section(spec),
            ),
            Guest::Linux(m) => {
                let mut d = m.descriptors.clone();
                crate::storage::refresh_paths(&mut d, &m.disks);
                (d, linux::machine_section())
            }
        };
        VmConfig {
            machine: MACHINE.into(),
            layout: self.ram.layout().clone(),
            vcpus: self.vcpus.len() as u32,
            devices,
            machine_section: cpu::wrap(&machine_section, &self.cpu),
        }
    }

    fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn run_state(&self) -> RunState {
        let ctl = lock(&self.control.ctl);
        if ctl.failure.is_some() {
            RunState::Stopped
        } else {
            ctl.state
        }
    }

    fn guest_exit(&self) -> Option<GuestExit> {
        lock(&self.control.ctl).guest_exit
    }

    fn console(&self) -> Option<Arc<Console>> {
        match &self.guest {
            Guest::Linux(m) => Some(m.console.clone()),
            Guest::Builtin { .. } => None,
        }
    }

    fn disks(&self) -> Vec<VmDisk> {
        match &self.guest {
            Guest::Builtin { disk, .. } => disk.iter().map(|d| d.disk()).collect(),
            Guest::Linux(m) => m.disks.clone(),
        }
    }

    fn announce(&self) -> Result<usize, VmError> {
        let Guest::Linux(m) = &self.guest else {
            return Ok(0);
        };
        let mut n = 0;
        for d in m.virtio.iter().filter(|d| d.device_type() == 1) {
            if d.announce().map_err(|reason| VmError::State {
                id: crate::devices::virtio::SECTION_VIRTIO,
                instance: 0,
                reason,
            })? {
                n += 1;
            }
        }
        Ok(n)
    }

    fn console_input(&self, bytes: &[u8]) -> bool {
        match &self.guest {
            Guest::Linux(m) => m.uart.input(bytes),
            Guest::Builtin { .. } => false,
        }
    }

    fn start_dirty_tracking(&self) -> Result<(), VmError> {
        let mut tracking = lock(&self.tracking);
        if !*tracking {
            set_slots(&self.vm, &self.ram, true)?;
            *tracking = true;
        }
        Ok(())
    }

    fn harvest_dirty(&self, into: &mut DirtyBitmap) -> Result<(), VmError> {
        let tracking = lock(&self.tracking);
        if !*tracking {
            return Err(VmError::WrongState {
                state: self.run_state(),
                op: "harvest dirty pages: dirty tracking is not started",
            });
        }
        for (i, (_, _, len)) in self.ram.host_regions().into_iter().enumerate() {
            let size =
                usize::try_from(len).map_err(|_| VmError::InvalidSpec("region size".into()))?;
            let words = self
                .vm
                .get_dirty_log(i as u32, size)
                .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
            into.or_words(i, &words);
            into.or_words(i, &self.ram.take_vmm_dirty(i));
        }
        self.devices.harvest_dirty(into);
        Ok(())
    }

    fn stop_dirty_tracking(&self) -> Result<(), VmError> {
        let mut tracking = lock(&self.tracking);
        if *tracking {
            set_slots(&self.vm, &self.ram, false)?;
            *tracking = false;
        }
        Ok(())
    }

    fn pause(&self) -> Result<(), VmError> {
        let _ops = lock(&self.ops);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut ctl = lock(&self.control.ctl);
        match ctl.state {
            RunState::Running => {}
            RunState::Created | RunState::Paused => return Ok(()),
            state @ RunState::Stopped => return Err(VmError::WrongState { state, op: "pause" }),
        }
        ctl.target = Target::Park;
        self.control.cv.notify_all();
        loop {
            if let Some((vcpu, reason)) = &ctl.failure {
                return Err(VmError::VcpuFailed {
                    vcpu: *vcpu,
                    reason: reason.clone(),
                });
            }
            if let Some(busy) = ctl.parked.iter().position(|p| !p) {
                let now = Instant::now();
                if now >= deadline {
                    return Err(VmError::VcpuFailed {
                        vcpu: busy as u32,
                        reason: format!("did not pause within {PAUSE_TIMEOUT:?}"),
                    });
                }
                // A vCPU halted in KVM_RUN exits only when kicked; a kick that lands just
                // before it enters is lost, hence again until it parks.
                self.control.kick_all(&ctl);
                ctl = self
                    .control
                    .cv
                    .wait_timeout(ctl, (deadline - now).min(vcpu::KICK_INTERVAL))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            } else {
                ctl.state = RunState::Paused;
                drop(ctl);
                // No vCPU runs: stop device I/O too, so no guest page changes from here on.
                return self.devices.quiesce_all();
            }
        }
    }

    fn resume(&self) -> Result<(), VmError> {
        let _ops = lock(&self.ops);
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let mut ctl = lock(&self.control.ctl);
        match ctl.state {
            state @ RunState::Created if ctl.awaiting_state => Err(VmError::WrongState {
                state,
                op: "resume an incoming VM before its state is restored",
            }),
            RunState::Created | RunState::Paused => {
                self.devices.resume_all()?;
                ctl.target = Target::Run;
                ctl.state = RunState::Running;
                self.control.cv.notify_all();
                Ok(())
            }
            RunState::Running => Ok(()),
            state @ RunState::Stopped => Err(VmError::WrongState {
                state,
                op: "resume",
            }),
        }
    }

    fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        Control::set_throttle(&self.control, percent).map_err(|source| VmError::Thread {
            what: "vCPU throttle",
            source,
        })
    }

    fn save_state(&self) -> Result<Vec<DeviceSection>, VmError> {
        let _ops = lock(&self.ops);
        self.require_stopped_vcpus("save state")?;
        self.devices.save_all()
    }

    fn restore_state(&self, sections: &[DeviceSection]) -> Result<(), VmError> {
        let _ops = lock(&self.ops);
        self.require_stopped_vcpus("restore state")?;
        // The manager checks every device's sections before any is applied: bad input
        // changes nothing.
        self.devices.restore_all(sections)?;
        lock(&self.control.ctl).awaiting_state = false;
        Ok(())
    }

    fn progress(&self) -> Result<u64, VmError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let layout = match &self.guest {
            Guest::Builtin { layout, .. } => layout,
            // A Linux guest's sign of life: what it wrote on its console.
            Guest::Linux(m) => return Ok(m.console.bytes_written()),
        };
        let mut sum = 0u64;
        for v in 0..self.vcpus.len() as u32 {
            let gpa = layout.status_slot(v) + builtin_guest::STATUS_COUNTER;
            let counter: u64 = self
                .ram
                .memory()
                .load(GuestAddress(gpa), Ordering::Relaxed)
                .map_err(|e| VmError::GuestAccess {
                    gpa,
                    reason: e.to_string(),
                })?;
            sum = sum.wrapping_add(counter);
        }
        Ok(sum)
    }

    fn shutdown(&self) {
        let _ops = lock(&self.ops);
        let threads = std::mem::take(&mut *lock(&self.threads));
        let all_exited = {
            let mut ctl = lock(&self.control.ctl);
            ctl.target = Target::Stop;
            ctl.state = RunState::Stopped;
            self.control.cv.notify_all();
            // vCPUs see the request at their next exit; a kick makes one happen.
            let deadline = Instant::now() + PAUSE_TIMEOUT;
            while ctl.exited < self.vcpus.len() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                self.control.kick_all(&ctl);
                ctl = self
                    .control
                    .cv
                    .wait_timeout(ctl, (deadline - now).min(vcpu::KICK_INTERVAL))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            ctl.exited >= self.vcpus.len()
        };
        match &self.guest {
            Guest::Linux(m) => {
                for d in &m.virtio {
                    d.stop();
                }
            }
            Guest::Builtin { disk: Some(d), .. } => d.stop(),
            Guest::Builtin { .. } => {}
        }
        for t in threads {
            // Once every thread reported its exit, each is past its loop and joins at once.
            if all_exited || t.is_finished() {
                if t.join().is_err() {
                    tracing::error!("a vCPU thread panicked");
                }
            } else {
                // Detached: it holds its own references to the vCPU fd and the RAM.
                tracing::warn!("a vCPU thread did not stop; detaching it");
            }
        }
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A KVM VM made ahead for RAM reserved before a migration arrives (`receive --reserve-mib`):
/// the VM, its irqchip and its RAM's slots, the part of building a VM that grows with RAM
/// (KVM's per-page slot metadata: ~9 ms per GiB on this host), done while the destination
/// waits rather than in the migration's set-up — as QEMU's `-incoming` VM exists before its
/// migration starts. It holds the RAM, whose mapping its slots name.
struct Shell {
    kvm: Kvm,
    vm: Arc<VmFd>,
    /// [`host_regions`] of `_ram`: the incoming VM uses the shell only for the same mapping.
    regions: Vec<(u64, usize, u64)>,
    _ram: GuestRam,
}

/// The shell made by [`prepare_shell`], until a VM is built (which takes it, used or not).
static SHELL: Mutex<Option<Shell>> = Mutex::new(None);
/// A VM of this process was built on the shell.
static SHELL_USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a VM of this process was built on the KVM VM [`prepare_shell`] made.
pub fn shell_used() -> bool {
    SHELL_USED.load(Ordering::Relaxed)
}

/// Makes the KVM VM that an incoming migration into `ram` (reserved ahead) will be built on:
/// the VM, its irqchip and `ram`'s memory slots, the part of building a VM that grows with RAM.
/// A VM built on other RAM drops it.
pub fn prepare_shell(ram: &GuestRam) -> Result<(), VmError> {
    let (kvm, vm) = new_vm(ram)?;
    *lock(&SHELL) = Some(Shell {
        kvm,
        vm,
        regions: host_regions(ram),
        _ram: ram.clone(),
    });
    Ok(())
}

/// Each region's guest address, host address and length.
fn host_regions(ram: &GuestRam) -> Vec<(u64, usize, u64)> {
    ram.host_regions()
        .into_iter()
        .map(|(gpa, host, len)| (gpa, host as usize, len))
        .collect()
}

/// A new KVM VM with its TSS, irqchip and `ram`'s slots.
fn new_vm(ram: &GuestRam) -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm = Arc::new(kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
    // The TSS is only used to emulate real mode; it must not overlap RAM, so it is skipped
    // when RAM reaches up to it.
    if ram
        .layout()
        .regions
        .iter()
        .all(|r| r.gpa + r.size <= TSS_ADDR || r.gpa > TSS_ADDR + 0x3000)
    {
        vm.set_tss_address(TSS_ADDR as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
    }
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    set_slots(&vm, ram, false)?;
    Ok((kvm_fd, vm))
}

/// Re-registers every RAM region as slot `i`, with or without dirty logging.
fn set_slots(vm: &VmFd, ram: &GuestRam, log_dirty: bool) -> Result<(), VmError> {
    for (i, (gpa, host, len)) in ram.host_regions().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: i as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of the region's `len`-byte mapping, kept alive by the
        // `GuestRam` clones held by the `KvmVm` (or the `Shell`) and by every vCPU thread,
        // i.e. as long as any fd of this VM exists; the layout's regions do not overlap.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Locks `m`, ignoring poisoning: the protected data stays consistent across our panics-free
/// critical sections.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The MSRs of KVM's index list that this vCPU can read (KVM_GET_MSRS stops at the first
/// MSR it cannot read; that one is dropped and the rest retried), plus the TSC.
#[cfg(test)]
pub(super) mod tests {
    use super::state::{decode_msrs, pod_bytes, pod_from, section, MSR_IA32_TSC, SECTION_VERSION};
    use super::vcpu::{IDLE_EXIT_PERIOD, MAX_BATCH};
    use super::*;
    use crate::memory::PAGE_SIZE;
    use crate::vm::{Fill, Pattern, Workload};
    use kvm_bindings::kvm_regs;

    /// The configuration a destination receives for `s`.
    fn config(s: &VmSpec) -> VmConfig {
        VmConfig {
            machine: MACHINE.into(),
            layout: RamLayout::single(s.memory_mib << 20),
            vcpus: s.vcpus,
            devices: Vec::new(),
            machine_section: builtin_guest::encode_section(s),
        }
    }

    /// The section `id` of vCPU `vcpu`.
    fn find(v: &[DeviceSection], id: u32, vcpu: u32) -> &DeviceSection {
        v.iter()
            .find(|s| s.id == id && s.instance == vcpu)
            .expect("section present")
    }

    pub(super) fn spec(vcpus: u32, dirty_rate: u64, ws_mib: u64, pattern: Pattern) -> VmSpec {
        VmSpec {
            memory_mib: 32,
            vcpus,
            fill: Fill::Random,
            workload: Workload {
                working_set_mib: ws_mib,
                dirty_rate,
                pattern,
            },
        }
    }

    /// Polls until `cond` holds (generous deadline; never a timed assertion of speed).
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_progress(vm: &KvmVm, beyond: u64) -> u64 {
        let mut p = 0;
        wait_for("progress", || {
            p = vm.progress().unwrap();
            p > beyond
        });
        p
    }

    fn ram_copy(ram: &GuestRam) -> Vec<u8> {
        let mut out = vec![0u8; ram.total_bytes() as usize];
        ram.memory().read_slice(&mut out, GuestAddress(0)).unwrap();
        out
    }

    fn copy_ram(from: &GuestRam, to: &GuestRam) {
        for ((_, src, len), (_, dst, dlen)) in
            from.host_regions().into_iter().zip(to.host_regions())
        {
            assert_eq!(len, dlen);
            // SAFETY: both mappings are `len` bytes long and alive while `from`/`to` are
            // borrowed; they are different memfds, so they do not overlap; the source VM is
            // paused and the destination not started, so nobody else writes either.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, len as usize) };
        }
    }

    #[test]
    fn guest_runs_and_dirties_its_working_set() {
        let vm = KvmVm::launch(&spec(1, 20_000, 2, Pattern::Sequential)).unwrap();
        assert_eq!(vm.run_state(), RunState::Running);
        vm.start_dirty_tracking().unwrap();
        let p = wait_progress(&vm, 0);
        wait_progress(&vm, p + 20);
        let mut dirty = DirtyBitmap::new(vm.ram().layout());
        vm.harvest_dirty(&mut dirty).unwrap();
        let ws = vm.layout().unwrap().working_set();
        let in_ws = (ws.start..ws.end)
            .step_by(PAGE_SIZE as usize)
            .filter(|&g| dirty.is_set(g))
            .count();
        assert!(in_ws > 0, "working-set pages are dirty");
        assert!(dirty.is_set(builtin_guest::STATUS_ADDR));
        vm.shutdown();
        assert_eq!(vm.run_state(), RunState::Stopped);
    }

    #[test]
    fn pause_stops_the_guest_and_resume_restarts_it() {
        let vm = KvmVm::launch(&spec(2, 0, 1, Pattern::Sequential)).unwrap();
        let p = wait_progress(&vm, 0);
        vm.pause().unwrap();
        assert_eq!(vm.run_state(), RunState::Paused);
        let paused = vm.progress().unwrap();
        assert!(paused >= p);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(vm.progress().unwrap(), paused, "no progress while paused");
        vm.resume().unwrap();
        wait_progress(&vm, paused);
        // Pausing twice, resuming twice: idempotent.
        vm.pause().unwrap();
        vm.pause().unwrap();
        vm.resume().unwrap();
        vm.resume().unwrap();
        assert_eq!(vm.run_state(), RunState::Running);
    }

    /// Auto-converge's throttle takes vCPU time away (the guest's progress slows to a fraction),
    /// a pause still stops a throttled guest, and throttle 0 gives it back its speed.
    #[test]
    fn a_throttled_guest_slows_down_and_still_pauses() {
        let vm = KvmVm::launch(&spec(2, 20_000, 4, Pattern::Random)).unwrap();
        wait_progress(&vm, 0);
        let window = |vm: &KvmVm| {
            let a = vm.progress().unwrap();
            std::thread::sleep(Duration::from_millis(600));
            vm.progress().unwrap() - a
        };
        let full = window(&vm);
        vm.set_throttle(90).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let throttled = window(&vm);
        assert!(
            throttled * 3 < full,
            "at 90 % throttle the guest made {throttled} steps, {full} unthrottled"
        );
        vm.pause().unwrap();
        let paused = vm.progress().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(vm.progress().unwrap(), paused, "a throttled guest paused");
        vm.resume().unwrap();
        vm.set_throttle(0).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let again = window(&vm);
        assert!(
            again * 3 > full * 2,
            "after the throttle was lifted the guest made {again} steps, {full} before"
        );
    }

    /// Every page whose content changed between two points is in the union of the harvests
    /// taken in between, and nothing outside the guest's writable pages is reported.
    #[test]
    fn dirty_log_loses_no_page() {
        let vm = KvmVm::launch(&spec(2, 50_000, 4, Pattern::Random)).unwrap();
        wait_progress(&vm, 0);
        vm.start_dirty_tracking().unwrap();
        vm.pause().unwrap();
        let mut dirty = DirtyBitmap::new(vm.ram().layout());
        vm.harvest_dirty(&mut dirty).unwrap(); // layout writes and earlier guest writes
        dirty.clear();
        let before = ram_copy(vm.ram());
        let start = vm.progress().unwrap();
        vm.resume().unwrap();
        for round in 0..5 {
            wait_progress(&vm, start + 10 * (round + 1));
            vm.harvest_dirty(&mut dirty).unwrap();
        }
        vm.pause().unwrap();
        vm.harvest_dirty(&mut dirty).unwrap();
        let after = ram_copy(vm.ram());
        let ws = vm.layout().unwrap().working_set();
        let mut changed = 0;
        for (p, (a, b)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
            let gpa = p as u64 * PAGE_SIZE;
            if a != b {
                changed += 1;
                assert!(dirty.is_set(gpa), "page {gpa:#x} changed but is not dirty");
            }
            if dirty.is_set(gpa) {
                assert!(
                    ws.contains(&gpa) || gpa == builtin_guest::STATUS_ADDR,
                    "page {gpa:#x} reported dirty but the guest cannot write it"
                );
            }
        }
        assert!(changed > 10, "{changed} pages changed");
        vm.stop_dirty_tracking().unwrap();
        let mut again = DirtyBitmap::new(vm.ram().layout());
        assert!(matches!(
            vm.harvest_dirty(&mut again),
            Err(VmError::WrongState { .. })
        ));
    }

    #[test]
    fn an_incoming_vm_keeps_the_processor_it_was_given() {
        let s = spec(1, 0, 2, Pattern::Sequential);
        let kvm_fd = Kvm::new().unwrap();
        let baseline = cpu::HostCpu {
            model: cpu::CpuModel::Baseline,
            without: Vec::new(),
        };
        let given = cpu::GuestCpu::for_new_vm(&kvm_fd, &baseline).unwrap();
        let c = VmConfig {
            machine_section: cpu::wrap(&builtin_guest::encode_section(&s), &given),
            ..config(&s)
        };
        let ram = GuestRam::new(&c.layout, Populate::Lazy).unwrap();
        let b = KvmVm::new_incoming(&c, ram, &HostResources::default()).unwrap();
        // Sent on as it came: the next migration carries the same processor.
        assert_eq!(b.config().machine_section, c.machine_section);
        // (What the vCPU then reports is KVM's business: PVM, this machine's paravirtual KVM,
        // answers KVM_GET_CPUID2 with the hardware's CPUID whatever was set.)
        let host = cpu::GuestCpu::for_new_vm(&kvm_fd, &cpu::HostCpu::default()).unwrap();
        assert_ne!(
            host.features(),
            given.features(),
            "this host is the baseline"
        );
    }

    #[test]
    fn migrates_within_the_process() {
        let s = spec(2, 5_000, 2, Pattern::Hotspot);
        let a = KvmVm::launch(&s).unwrap();
        wait_progress(&a, 10);
        a.pause().unwrap();
        let paused = a.progress().unwrap();
        let sections = a.save_state().unwrap();
        assert!(sections
            .iter()
            .all(|s| s.id != 0 && s.version == SECTION_VERSION));

        let ram = GuestRam::new(a.ram().layout(), Populate::Lazy).unwrap();
        let b = KvmVm::new_incoming(&config(&s), ram, &HostResources::default()).unwrap();
        assert_eq!(b.run_state(), RunState::Created);
        copy_ram(a.ram(), b.ram());
        b.restore_state(&sections).unwrap();
        b.start_dirty_tracking().unwrap();
        let mut dirty = DirtyBitmap::new(b.ram().layout());
        b.harvest_dirty(&mut dirty).unwrap();
        assert_eq!(dirty.count(), 0, "nothing written before the start");
        b.resume().unwrap();
        wait_progress(&b, paused + 20);
        b.pause().unwrap();
        b.harvest_dirty(&mut dirty).unwrap();
        assert_eq!(a.progress().unwrap(), paused, "the source stays paused");
        let (ra, rb) = (ram_copy(a.ram()), ram_copy(b.ram()));
        let mut differ = 0;
        for (p, (x, y)) in ra.chunks(4096).zip(rb.chunks(4096)).enumerate() {
            if x != y {
                differ += 1;
                assert!(
                    dirty.is_set(p as u64 * PAGE_SIZE),
                    "page {p} differs but B did not write it"
                );
            }
        }
        assert!(differ > 0);
        // B's vCPUs continued from A's registers.
        let regs_a: kvm_regs =
            pod_from(section::REGS, 0, &find(&sections, section::REGS, 0).data).unwrap();
        let b_sections = b.save_state().unwrap();
        let regs_b: kvm_regs =
            pod_from(section::REGS, 0, &find(&b_sections, section::REGS, 0).data).unwrap();
        assert_eq!(
            (regs_a.rdi, regs_a.rsi, regs_a.rdx, regs_a.rbx),
            (regs_b.rdi, regs_b.rsi, regs_b.rdx, regs_b.rbx)
        );
        assert_ne!(regs_a.rcx, regs_b.rcx, "table position moved on");
    }

    #[test]
    fn state_round_trips_with_two_vcpus() {
        let s = spec(2, 1_000, 1, Pattern::Sequential);
        let a = KvmVm::launch(&s).unwrap();
        wait_progress(&a, 10);
        a.pause().unwrap();
        let saved = a.save_state().unwrap();
        assert_eq!(saved.len(), 2 * 10 + 4);
        let b = KvmVm::new_incoming(
            &config(&s),
            GuestRam::new(a.ram().layout(), Populate::Lazy).unwrap(),
            &HostResources::default(),
        )
        .unwrap();
        b.restore_state(&saved).unwrap();
        let again = b.save_state().unwrap();
        assert_eq!(saved.len(), again.len());
        for (x, y) in saved.iter().zip(&again) {
            assert_eq!(
                (x.id, x.instance, x.data.len()),
                (y.id, y.instance, y.data.len())
            );
            // Time-dependent state (TSC, clock, LAPIC timer) moves on; the rest is identical.
            if [
                section::REGS,
                section::SREGS,
                section::FPU,
                section::XCRS,
                section::MP_STATE,
                section::DEBUG_REGS,
            ]
            .contains(&x.id)
            {
                assert_eq!(x.data, y.data, "section {} of vCPU {}", x.id, x.instance);
            }
        }
        // The pending `out` was completed before the pause. A vCPU found on its `out` is
        // either one whose I/O exit was left unfinished (the bug: KVM would then run the `out`
        // a second time after a restore) or one the kick stopped just before executing it
        // (legitimate, and rare: the guest spends most of its time parked after its exit).
        // Hence counted over several pauses: unfinished exits would show at nearly every one.
        // (Stock KVM completes a port write at the next KVM_RUN, RIP on the `out` until then;
        // the PVM host KVM of this project's CI reports RIP already past it at the exit, so
        // there the check holds even without the completion: `complete_io` skipped, 1 of 10.)
        let out_at = builtin_guest::CODE_ADDR
            + builtin_guest::GUEST_CODE
                .windows(2)
                .position(|w| w == [0xe6, 0x10])
                .unwrap() as u64;
        let on_out = |sections: &[DeviceSection]| {
            (0..2)
                .filter(|&v| {
                    let r = find(sections, section::REGS, v);
                    pod_from::<kvm_regs>(section::REGS, v, &r.data).unwrap().rip == out_at
                })
                .count()
        };
        let mut seen_on_out = on_out(&saved);
        // The guest's TSC continues from the source's value instead of restarting.
        let tsc = |v: &[DeviceSection]| {
            let m = v
                .iter()
                .find(|s| s.id == section::MSRS && s.instance == 1)
                .unwrap();
            let msrs = decode_msrs(1, &m.data).unwrap();
            msrs.iter().find(|e| e.index == MSR_IA32_TSC).unwrap().data
        };
        assert!(
            tsc(&again) >= tsc(&saved),
            "TSC went back: {} < {}",
            tsc(&again),
            tsc(&saved)
        );
        // Restoring onto the paused source itself also works.
        a.restore_state(&saved).unwrap();
        a.resume().unwrap();
        let p = a.progress().unwrap();
        wait_progress(&a, p);
        const PAUSES: usize = 5;
        for _ in 1..PAUSES {
            let p = a.progress().unwrap();
            wait_progress(&a, p + 2);
            a.pause().unwrap();
            seen_on_out += on_out(&a.save_state().unwrap());
            a.resume().unwrap();
        }
        assert!(
            seen_on_out <= 2,
            "a vCPU sat on its out instruction at {seen_on_out} of {} vCPU pauses: its I/O \
             exit was not completed before the pause",
            2 * PAUSES
        );
    }

    #[test]
    fn restore_rejects_bad_sections() {
        let s = spec(1, 0, 1, Pattern::Sequential);
        let a = KvmVm::launch(&s).unwrap();
        a.pause().unwrap();
        // vCPU sections first (the indices below count on it; restore takes any order), then
        // the irqchips and the clock.
        let (mut good, rest): (Vec<_>, Vec<_>) = a
            .save_state()
            .unwrap()
            .into_iter()
            .partition(|s| s.id < section::IRQCHIP);
        good.extend(rest);
        let b = KvmVm::new_incoming(
            &config(&s),
            GuestRam::new(a.ram().layout(), Populate::Lazy).unwrap(),
            &HostResources::default(),
        )
        .unwrap();
        assert!(
            matches!(b.resume(), Err(VmError::WrongState { .. })),
            "no state restored yet"
        );
        type Mutation = Box<dyn Fn(&mut Vec<DeviceSection>)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("truncated", Box::new(|v| v[1].data.truncate(10))),
            ("oversized", Box::new(|v| v[2].data.push(0))),
            ("empty", Box::new(|v| v[7].data.clear())),
            ("unknown id", Box::new(|v| v[0].id = 999)),
            ("id zero", Box::new(|v| v[0].id = 0)),
            ("vcpu out of range", Box::new(|v| v[1].instance = 1)),
            (
                "irqchip out of range",
                Box::new(|v| {
                    let i = v.iter().position(|s| s.id == section::IRQCHIP).unwrap();
                    v[i].instance = 3;
                }),
            ),
            ("wrong version", Box::new(|v| v[3].version = 2)),
            (
                "missing",
                Box::new(|v| {
                    v.remove(4);
                }),
            ),
            (
                "duplicate",
                Box::new(|v| {
                    let d = v[5].clone();
                    v.push(d);
                }),
            ),
            ("no sections", Box::new(|v| v.clear())),
            (
                "msr count over cap",
                Box::new(|v| {
                    let i = v.iter().position(|s| s.id == section::MSRS).unwrap();
                    v[i].data[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                }),
            ),
            (
                "msr count mismatch",
                Box::new(|v| {
                    let i = v.iter().position(|s| s.id == section::MSRS).unwrap();
                    let n = v[i].data.len();
                    v[i].data.truncate(n - 1);
                }),
            ),
            (
                "msr too short",
                Box::new(|v| {
                    let i = v.iter().position(|s| s.id == section::MSRS).unwrap();
                    v[i].data.truncate(2);
                }),
            ),
            (
                "irqchip id swapped",
                Box::new(|v| {
                    let i = v.iter().position(|s| s.id == section::IRQCHIP).unwrap();
                    v[i].data[0] = 2;
                }),
            ),
        ];
        for (what, mutate) in cases {
            let mut bad = good.clone();
            mutate(&mut bad);
            match b.restore_state(&bad) {
                Err(VmError::State { reason, .. }) => assert!(!reason.is_empty(), "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        b.restore_state(&good).unwrap();
        // Saving or restoring a running VM is refused.
        a.resume().unwrap();
        assert!(matches!(a.save_state(), Err(VmError::WrongState { .. })));
        assert!(matches!(
            a.restore_state(&good),
            Err(VmError::WrongState { .. })
        ));
    }

    #[test]
    fn vcpu_failure_is_reported_not_panicked() {
        let s = spec(1, 0, 1, Pattern::Sequential);
        let a = KvmVm::launch(&s).unwrap();
        a.pause().unwrap();
        let mut sections = a.save_state().unwrap();
        let r = sections.iter_mut().find(|s| s.id == section::REGS).unwrap();
        let mut regs: kvm_regs = pod_from(section::REGS, 0, &r.data).unwrap();
        regs.rip = 0xdead_0000_0000_0000; // non-canonical: #GP without an IDT: triple fault
        r.data = pod_bytes(&regs);
        let b = KvmVm::new_incoming(
            &config(&s),
            GuestRam::new(a.ram().layout(), Populate::Lazy).unwrap(),
            &HostResources::default(),
        )
        .unwrap();
        b.restore_state(&sections).unwrap();
        b.resume().unwrap();
        wait_for("the vCPU failure", || b.run_state() == RunState::Stopped);
        assert!(matches!(
            b.progress(),
            Err(VmError::VcpuFailed { vcpu: 0, .. })
        ));
        assert!(matches!(b.pause(), Err(VmError::VcpuFailed { .. })));
        assert!(matches!(b.resume(), Err(VmError::VcpuFailed { .. })));
        b.shutdown();
    }

    #[test]
    fn incoming_checks_its_ram() {
        let s = spec(1, 0, 1, Pattern::Sequential);
        let small = GuestRam::new(&RamLayout::single(16 << 20), Populate::Lazy).unwrap();
        assert!(matches!(
            KvmVm::new_incoming(&config(&s), small, &HostResources::default()),
            Err(VmError::InvalidSpec(_))
        ));
    }

    #[test]
    fn pacing_batches() {
        let p = |rate, vcpus| {
            Pacing::new(&VmSpec {
                vcpus,
                ..spec(1, rate, 1, Pattern::Sequential)
            })
        };
        assert_eq!(p(0, 1).batch, 0);
        assert_eq!(p(0, 1).period, IDLE_EXIT_PERIOD);
        assert_eq!(p(500, 1).batch, 1);
        assert_eq!(p(500, 1).period, Duration::from_millis(2));
        assert_eq!(p(100_000, 2).batch, 50);
        assert_eq!(p(100_000, 2).period, Duration::from_millis(1));
        assert_eq!(p(10_000_000, 1).batch, MAX_BATCH);
    }

    #[test]
    fn kvm_vm_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<KvmVm>();
    }
}
