//! [`KvmVm`]: the built-in mini VMM, a [`MigratableVm`] on kvm-ioctls.
//!
//! A `KvmVm` owns a KVM VM with an in-kernel irqchip (LAPIC, PIC, IOAPIC), one memory slot per
//! RAM region (slot `i` = region `i` of the [`GuestRam`]) and one thread per vCPU running the
//! guest program of [`super::guest`]. It owns the vCPU threads and the KVM file descriptors;
//! guest RAM is shared with the migration engine, which reads and writes it in place.
//!
//! # vCPU threads, pacing and pause
//!
//! Each vCPU thread loops on `KVM_RUN`. The guest exits to the VMM with `out 0x10` after every
//! batch of page writes; at that exit the thread sleeps to hold the configured dirty rate and
//! checks for pause or stop requests. The guest runs at most [`MAX_BATCH`] page writes
//! between two exits (about 2 ms of guest time on the slow nested host this was built on), so
//! a pause request is always seen within milliseconds and no signal-based kick out of
//! `KVM_RUN` is needed. Sleeps wait on a condition variable, so a pause interrupts them.
//! Before parking, a thread re-enters `KVM_RUN` with `immediate_exit` set so KVM completes the
//! pending `out` (advances RIP): the saved state is then consistent.
//!
//! # Dirty tracking
//!
//! Slots are registered without `KVM_MEM_LOG_DIRTY_PAGES`:
//! [`MigratableVm::start_dirty_tracking`] re-registers them with the flag (so the guest takes
//! no write-protection faults before a migration starts) and
//! [`MigratableVm::stop_dirty_tracking`] clears it. A harvest ORs the KVM log of each slot and
//! the VMM-side writes recorded by vm-memory since the previous harvest into the caller's
//! bitmap; pages written before tracking started may show up in the first harvest too.
//!
//! # State sections
//!
//! vCPU and device state travel as [`DeviceSection`]s with the ids of [`section`], version 1.
//! KVM structures are encoded as their raw bytes (they are plain integers); MSRs as a `u32`
//! count followed by `(index u32, data u64)` pairs, little-endian. Decoding checks every
//! length and never panics.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use super::guest::{self, GuestLayout, PACING_PORT};
use super::{DeviceSection, MigratableVm, RunState, VmError, VmSpec};
use crate::dirty::DirtyBitmap;
use crate::memory::{GuestRam, Populate, RamLayout};

/// Ids of the [`DeviceSection`]s [`KvmVm`] saves. vCPU sections have the vCPU index as
/// instance; [`section::IRQCHIP`] has the KVM chip id (0 PIC master, 1 PIC slave, 2 IOAPIC);
/// [`section::CLOCK`] has instance 0.
pub mod section {
    /// `kvm_regs`.
    pub const REGS: u32 = 1;
    /// `kvm_sregs`.
    pub const SREGS: u32 = 2;
    /// `kvm_fpu`.
    pub const FPU: u32 = 3;
    /// XSAVE area (`kvm_xsave`, or larger when KVM reports a bigger `KVM_CAP_XSAVE2`).
    pub const XSAVE: u32 = 4;
    /// `kvm_xcrs`.
    pub const XCRS: u32 = 5;
    /// MSRs: `u32` count, then `(index u32, data u64)` pairs, little-endian.
    pub const MSRS: u32 = 6;
    /// `kvm_lapic_state`.
    pub const LAPIC: u32 = 7;
    /// `kvm_vcpu_events`.
    pub const VCPU_EVENTS: u32 = 8;
    /// `kvm_mp_state`.
    pub const MP_STATE: u32 = 9;
    /// `kvm_debugregs`.
    pub const DEBUG_REGS: u32 = 10;
    /// `kvm_irqchip` (instance = chip id).
    pub const IRQCHIP: u32 = 16;
    /// `kvm_clock_data`.
    pub const CLOCK: u32 = 17;

    /// The per-vCPU sections, in save order.
    pub const VCPU: [u32; 10] = [
        MP_STATE,
        REGS,
        SREGS,
        FPU,
        XSAVE,
        XCRS,
        DEBUG_REGS,
        LAPIC,
        MSRS,
        VCPU_EVENTS,
    ];
}

/// Format version of every section.
pub const SECTION_VERSION: u32 = 1;
/// Most MSRs a [`section::MSRS`] section may carry.
pub const MAX_MSRS: usize = 1024;
/// How long [`MigratableVm::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most pages the guest writes between two exits.
pub const MAX_BATCH: u64 = 256;
/// Exit period of an idle guest (dirty rate 0): the progress counter still moves.
pub const IDLE_EXIT_PERIOD: Duration = Duration::from_millis(5);

/// Exits per second a paced vCPU aims at: its batch is its share of the dirty rate divided by
/// this, between 1 and [`MAX_BATCH`] pages.
const TARGET_EXITS_PER_SEC: u64 = 1000;
/// How far a vCPU may fall behind its pacing schedule before the schedule restarts (so a slow
/// stretch is not followed by an unbounded burst).
const MAX_LAG: Duration = Duration::from_millis(50);
/// Address of the 3-page TSS KVM needs for real-mode emulation on some hosts (conventional).
const TSS_ADDR: u64 = 0xfffb_d000;
/// MSR index of the TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// Size of the legacy `kvm_xsave` area.
const LEGACY_XSAVE: usize = std::mem::size_of::<kvm_xsave>();

/// A KVM virtual machine running the built-in guest program.
///
/// `Send + Sync`: control methods serialise on an internal lock; the vCPU file descriptors
/// live behind per-vCPU mutexes, held by the vCPU threads only while in `KVM_RUN`.
///
/// When a vCPU fails (unexpected exit), [`MigratableVm::run_state`] reports
/// [`RunState::Stopped`] and [`MigratableVm::progress`], `pause` and `resume` return
/// Machine name of the built-in KVM VMM, checked by destinations.
pub const MACHINE: &str = "livemig-kvm-mini";

/// [`VmError::VcpuFailed`].
pub struct KvmVm {
    // Field order matters for drop: the VM and vCPU fds go before the RAM they map.
    vm: VmFd,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    control: Arc<Control>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises pause, resume, save, restore, shutdown.
    ops: Mutex<()>,
    /// Whether the slots log dirty pages; also serialises slot updates and harvests.
    tracking: Mutex<bool>,
    msr_indices: Vec<u32>,
    xsave_size: usize,
    layout: GuestLayout,
    spec: VmSpec,
    ram: GuestRam,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("spec", &self.spec)
            .field("run_state", &self.run_state())
            .finish_non_exhaustive()
    }
}

impl KvmVm {
    /// Builds and starts a VM for `spec` (source side): allocates RAM, fills it, writes the
    /// guest program and its layout, creates the vCPUs in long mode and runs them.
    pub fn launch(spec: &VmSpec) -> Result<KvmVm, VmError> {
        let layout = GuestLayout::new(spec)?;
        let ram = GuestRam::new(&RamLayout::single(layout.ram_bytes()), Populate::Lazy)?;
        guest::fill(&ram, spec.fill, 0x5eed ^ spec.memory_mib);
        let pacing = Pacing::new(spec);
        layout.write(&ram, pacing.batch)?;
        let vm = KvmVm::build(spec, layout, ram)?;
        for (i, vcpu) in vm.vcpus.iter().enumerate() {
            let fd = lock(vcpu);
            let index = i as u32;
            let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            guest::set_long_mode(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
            fd.set_regs(&vm.layout.initial_regs(index))
                .map_err(kvm("KVM_SET_REGS"))?;
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            fd.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
            // Application processors start in INIT-wait under an in-kernel LAPIC.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        }
        vm.resume()?;
        Ok(vm)
    }

    /// Builds a destination skeleton for `spec` over `ram` (allocated by the caller, content
    /// arriving from the source): same VM, irqchip, slots and vCPUs, not started
    /// ([`RunState::Created`]). Call [`MigratableVm::restore_state`], then
    /// [`MigratableVm::resume`].
    ///
    /// `ram` must cover guest-physical `0..spec.memory_mib MiB` without holes. `resume` is
    /// refused until `restore_state` succeeded.
    pub fn new_incoming(spec: &VmSpec, ram: GuestRam) -> Result<KvmVm, VmError> {
        let layout = GuestLayout::new(spec)?;
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
        if end != layout.ram_bytes() {
            return Err(VmError::InvalidSpec(format!(
                "RAM of {end} bytes for a spec of {} bytes",
                layout.ram_bytes()
            )));
        }
        let vm = KvmVm::build(spec, layout, ram)?;
        lock(&vm.control.ctl).awaiting_state = true;
        Ok(vm)
    }

    /// The guest layout (working set, status slots) of this VM.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Creates the KVM VM, irqchip, slots and vCPUs (CPUID set) and the parked vCPU threads.
    fn build(spec: &VmSpec, layout: GuestLayout, ram: GuestRam) -> Result<KvmVm, VmError> {
        let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        // The TSS is only used to emulate real mode, which this guest never enters; it must
        // not overlap RAM, so it is skipped when RAM reaches up to it.
        if ram.total_bytes() <= TSS_ADDR {
            vm.set_tss_address(TSS_ADDR as usize)
                .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        }
        vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        set_slots(&vm, &ram, false)?;
        let cpuid = kvm_fd
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(spec.vcpus as usize);
        for i in 0..spec.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&vcpu_cpuid(&cpuid, i))
                .map_err(kvm("KVM_SET_CPUID2"))?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let msr_indices = {
            let first = vcpus
                .first()
                .ok_or_else(|| VmError::InvalidSpec("no vCPU".into()))?;
            supported_msrs(&kvm_fd, &lock(first))?
        };
        let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(LEGACY_XSAVE);
        let control = Arc::new(Control::new(spec.vcpus as usize));
        let pacing = Pacing::new(spec);
        let mut threads = Vec::with_capacity(vcpus.len());
        let vm = KvmVm {
            vm,
            vcpus,
            control,
            threads: Mutex::new(Vec::new()),
            ops: Mutex::new(()),
            tracking: Mutex::new(false),
            msr_indices,
            xsave_size,
            layout,
            spec: spec.clone(),
            ram,
        };
        for (i, vcpu) in vm.vcpus.iter().enumerate() {
            let vcpu = Arc::clone(vcpu);
            let control = Arc::clone(&vm.control);
            // The thread keeps the RAM mapped as long as it holds the vCPU fd (which keeps
            // the KVM VM and its slots alive), even if it is ever detached.
            let ram = vm.ram.clone();
            let index = i as u32;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(index, &vcpu, &control, pacing, ram))
                .map_err(|e| VmError::VcpuFailed {
                    vcpu: index,
                    reason: format!("cannot spawn its thread: {e}"),
                });
            match handle {
                Ok(h) => threads.push(h),
                Err(e) => {
                    // Threads already spawned count as exited for the shutdown in Drop.
                    lock(&vm.control.ctl).exited += vm.vcpus.len() - threads.len();
                    *lock(&vm.threads) = threads;
                    return Err(e);
                }
            }
        }
        *lock(&vm.threads) = threads;
        Ok(vm)
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

    fn save_vcpu(
        &self,
        index: u32,
        fd: &VcpuFd,
        out: &mut Vec<DeviceSection>,
    ) -> Result<(), VmError> {
        let mut push = |id: u32, data: Vec<u8>| {
            out.push(DeviceSection {
                id,
                instance: index,
                version: SECTION_VERSION,
                data,
            })
        };
        // Order after Firecracker: MP state first (it may update LAPIC state), events last.
        push(
            section::MP_STATE,
            pod_bytes(&fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
        );
        push(
            section::REGS,
            pod_bytes(&fd.get_regs().map_err(kvm("KVM_GET_REGS"))?),
        );
        push(
            section::SREGS,
            pod_bytes(&fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?),
        );
        push(
            section::FPU,
            pod_bytes(&fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?),
        );
        push(section::XSAVE, self.get_xsave(fd)?);
        push(
            section::XCRS,
            pod_bytes(&fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?),
        );
        push(
            section::DEBUG_REGS,
            pod_bytes(&fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?),
        );
        push(
            section::LAPIC,
            pod_bytes(&fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?),
        );
        push(
            section::MSRS,
            encode_msrs(&read_msrs(fd, index, &self.msr_indices)?),
        );
        push(
            section::VCPU_EVENTS,
            pod_bytes(&fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?),
        );
        Ok(())
    }

    fn get_xsave(&self, fd: &VcpuFd) -> Result<Vec<u8>, VmError> {
        if self.xsave_size == LEGACY_XSAVE {
            return Ok(pod_bytes(&fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?));
        }
        let mut xsave = xsave2_buffer(self.xsave_size)?;
        // SAFETY: `xsave` holds `xsave_size` bytes of XSAVE area, the size KVM_CAP_XSAVE2
        // reported; this process never enables more XSTATE features afterwards.
        unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm("KVM_GET_XSAVE2"))?;
        // The area is the legacy 4 KiB of the header followed by the FAM entries.
        let mut bytes = pod_bytes(&xsave.as_fam_struct_ref().xsave);
        bytes.extend(xsave.as_slice().iter().flat_map(|w| w.to_ne_bytes()));
        bytes.truncate(self.xsave_size);
        Ok(bytes)
    }

    fn set_xsave(&self, fd: &VcpuFd, index: u32, data: &[u8]) -> Result<(), VmError> {
        if data.len() != self.xsave_size {
            return Err(state_err(
                section::XSAVE,
                index,
                format!(
                    "{} bytes, this host's XSAVE area is {}",
                    data.len(),
                    self.xsave_size
                ),
            ));
        }
        if self.xsave_size == LEGACY_XSAVE {
            let xsave: kvm_xsave = pod_from(section::XSAVE, index, data)?;
            // SAFETY: KVM_CAP_XSAVE2 reported no more than the legacy 4 KiB, so KVM reads
            // only `size_of::<kvm_xsave>()` bytes from `xsave`.
            return unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"));
        }
        let mut xsave = xsave2_buffer(self.xsave_size)?;
        let (legacy, extra) = data.split_at(LEGACY_XSAVE);
        let legacy: kvm_xsave = pod_from(section::XSAVE, index, legacy)?;
        // SAFETY: only the legacy area is replaced; the FAM length is not changed.
        unsafe { xsave.as_mut_fam_struct() }.xsave = legacy;
        for (w, b) in xsave.as_mut_slice().iter_mut().zip(extra.chunks(4)) {
            let mut word = [0u8; 4];
            word[..b.len()].copy_from_slice(b);
            *w = u32::from_ne_bytes(word);
        }
        // SAFETY: `xsave` is allocated for the `xsave_size` bytes KVM_CAP_XSAVE2 reported.
        unsafe { fd.set_xsave2(&xsave) }.map_err(kvm("KVM_SET_XSAVE2"))
    }

    fn restore_vcpu(&self, index: u32, fd: &VcpuFd, s: &VcpuState<'_>) -> Result<(), VmError> {
        // Order after Firecracker and Cloud Hypervisor: CPUID was set at creation; REGS before
        // VCPU_EVENTS (SET_REGS clears pending exceptions), SREGS before LAPIC (apic base),
        // LAPIC before MSRS (TSC deadline needs the LAPIC configured).
        fd.set_mp_state(s.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
        self.set_xsave(fd, index, s.xsave)?;
        fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        write_msrs(fd, index, &s.msrs)?;
        fd.set_vcpu_events(&s.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl MigratableVm for KvmVm {
    fn machine(&self) -> &'static str {
        MACHINE
    }

    fn spec(&self) -> &VmSpec {
        &self.spec
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
                ctl = self
                    .control
                    .cv
                    .wait_timeout(ctl, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            } else {
                ctl.state = RunState::Paused;
                return Ok(());
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

    fn save_state(&self) -> Result<Vec<DeviceSection>, VmError> {
        let _ops = lock(&self.ops);
        self.require_stopped_vcpus("save state")?;
        let mut out = Vec::new();
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            self.save_vcpu(i as u32, &lock(vcpu), &mut out)?;
        }
        for chip in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut irqchip = kvm_irqchip {
                chip_id: chip,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut irqchip)
                .map_err(kvm("KVM_GET_IRQCHIP"))?;
            out.push(DeviceSection {
                id: section::IRQCHIP,
                instance: chip,
                version: SECTION_VERSION,
                data: pod_bytes(&irqchip),
            });
        }
        let clock = self.vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        out.push(DeviceSection {
            id: section::CLOCK,
            instance: 0,
            version: SECTION_VERSION,
            data: pod_bytes(&clock),
        });
        Ok(out)
    }

    fn restore_state(&self, sections: &[DeviceSection]) -> Result<(), VmError> {
        let _ops = lock(&self.ops);
        self.require_stopped_vcpus("restore state")?;
        // Decode and check everything before touching KVM: bad input changes nothing.
        let state = DecodedState::decode(sections, self.spec.vcpus, self.xsave_size)?;
        for irqchip in &state.irqchips {
            self.vm
                .set_irqchip(irqchip)
                .map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        let mut clock = state.clock;
        // Keep only KVM_CLOCK_REALTIME: with it KVM advances the clock by the wall time since
        // the save (the downtime); kernels before 5.16 accept no flag and never report it.
        clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
        self.vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for (i, vcpu) in state.vcpus.iter().enumerate() {
            self.restore_vcpu(i as u32, &lock(&self.vcpus[i]), vcpu)?;
        }
        lock(&self.control.ctl).awaiting_state = false;
        Ok(())
    }

    fn progress(&self) -> Result<u64, VmError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let mut sum = 0u64;
        for v in 0..self.spec.vcpus {
            let gpa = self.layout.status_slot(v) + guest::STATUS_COUNTER;
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
            // Running vCPUs see the request at their next exit, within milliseconds.
            let deadline = Instant::now() + PAUSE_TIMEOUT;
            while ctl.exited < self.vcpus.len() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                ctl = self
                    .control
                    .cv
                    .wait_timeout(ctl, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            ctl.exited >= self.vcpus.len()
        };
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
        // `GuestRam` clones held by the `KvmVm` and by every vCPU thread, i.e. as long as any
        // fd of this VM exists; the layout's regions do not overlap.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The supported CPUID with vCPU `index`'s APIC id in leaves 0x1, 0xB and 0x1F.
fn vcpu_cpuid(supported: &CpuId, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

/// The MSRs of KVM's index list that this vCPU can read (KVM_GET_MSRS stops at the first
/// MSR it cannot read; that one is dropped and the rest retried), plus the TSC.
fn supported_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VmError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    if !candidates.contains(&MSR_IA32_TSC) {
        candidates.insert(0, MSR_IA32_TSC);
    }
    let mut supported = Vec::with_capacity(candidates.len());
    let mut start = 0;
    while start < candidates.len() {
        let chunk = &candidates[start..(start + KVM_MAX_MSR_ENTRIES).min(candidates.len())];
        let mut msrs = msr_buffer(chunk.iter().map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        }))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        supported.extend_from_slice(&chunk[..read.min(chunk.len())]);
        start += read + usize::from(read < chunk.len());
    }
    Ok(supported)
}

fn msr_buffer(entries: impl Iterator<Item = kvm_msr_entry>) -> Result<Msrs, VmError> {
    let entries: Vec<kvm_msr_entry> = entries.collect();
    Msrs::from_entries(&entries).map_err(|e| VmError::State {
        id: section::MSRS,
        instance: 0,
        reason: format!(
            "cannot build an MSR buffer of {} entries: {e:?}",
            entries.len()
        ),
    })
}

fn read_msrs(fd: &VcpuFd, index: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VmError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let mut msrs = msr_buffer(chunk.iter().map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        }))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read != chunk.len() {
            return Err(state_err(
                section::MSRS,
                index,
                format!(
                    "KVM read {read} of {} MSRs (stopped at {:#x})",
                    chunk.len(),
                    chunk[read.min(chunk.len() - 1)]
                ),
            ));
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, index: u32, entries: &[kvm_msr_entry]) -> Result<(), VmError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = msr_buffer(chunk.iter().copied())?;
        let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if written != chunk.len() {
            return Err(state_err(
                section::MSRS,
                index,
                format!(
                    "KVM accepted {written} of {} MSRs; rejected {:#x}",
                    chunk.len(),
                    chunk[written.min(chunk.len() - 1)].index
                ),
            ));
        }
    }
    Ok(())
}

fn encode_msrs(entries: &[kvm_msr_entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * 12);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.index.to_le_bytes());
        out.extend_from_slice(&e.data.to_le_bytes());
    }
    out
}

fn decode_msrs(instance: u32, data: &[u8]) -> Result<Vec<kvm_msr_entry>, VmError> {
    let err = |reason: String| state_err(section::MSRS, instance, reason);
    let (count, rest) = data
        .split_first_chunk::<4>()
        .ok_or_else(|| err(format!("{} bytes, too short for the count", data.len())))?;
    let count = u32::from_le_bytes(*count) as usize;
    if count > MAX_MSRS {
        return Err(err(format!("{count} MSRs exceeds the limit of {MAX_MSRS}")));
    }
    if rest.len() != count * 12 {
        return Err(err(format!(
            "{count} MSRs need {} bytes, got {}",
            count * 12,
            rest.len()
        )));
    }
    Ok(rest
        .chunks_exact(12)
        .map(|c| {
            let (index, value) = c.split_at(4);
            kvm_msr_entry {
                index: u32::from_le_bytes(index.try_into().unwrap_or_default()),
                data: u64::from_le_bytes(value.try_into().unwrap_or_default()),
                ..Default::default()
            }
        })
        .collect())
}

/// A `kvm_xsave2` buffer with room for `size` bytes of XSAVE area.
fn xsave2_buffer(size: usize) -> Result<kvm_bindings::Xsave, VmError> {
    let entries = (size - LEGACY_XSAVE).div_ceil(std::mem::size_of::<u32>());
    kvm_bindings::Xsave::new(entries).map_err(|e| VmError::State {
        id: section::XSAVE,
        instance: 0,
        reason: format!("cannot allocate an XSAVE area of {size} bytes: {e:?}"),
    })
}

/// Sections of one vCPU, decoded.
struct VcpuState<'a> {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xsave: &'a [u8],
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

/// All sections of a VM, decoded and checked for completeness.
struct DecodedState<'a> {
    vcpus: Vec<VcpuState<'a>>,
    irqchips: Vec<kvm_irqchip>,
    clock: kvm_clock_data,
}

impl<'a> DecodedState<'a> {
    fn decode(
        sections: &'a [DeviceSection],
        vcpus: u32,
        xsave_size: usize,
    ) -> Result<Self, VmError> {
        // slots[v][k] = section of id section::VCPU[k] for vCPU v.
        let mut slots: Vec<[Option<&DeviceSection>; 10]> = vec![[None; 10]; vcpus as usize];
        let mut chips: [Option<&DeviceSection>; 3] = [None; 3];
        let mut clock = None;
        for s in sections {
            if s.version != SECTION_VERSION {
                return Err(state_err(
                    s.id,
                    s.instance,
                    format!("unsupported version {}", s.version),
                ));
            }
            let slot = if let Some(k) = section::VCPU.iter().position(|&id| id == s.id) {
                if s.instance >= vcpus {
                    return Err(state_err(
                        s.id,
                        s.instance,
                        format!("no such vCPU (VM has {vcpus})"),
                    ));
                }
                &mut slots[s.instance as usize][k]
            } else if s.id == section::IRQCHIP {
                chips
                    .get_mut(s.instance as usize)
                    .ok_or_else(|| state_err(s.id, s.instance, "no such irqchip (0..=2)".into()))?
            } else if s.id == section::CLOCK {
                if s.instance != 0 {
                    return Err(state_err(
                        s.id,
                        s.instance,
                        "the clock has instance 0 only".into(),
                    ));
                }
                &mut clock
            } else {
                return Err(state_err(s.id, s.instance, "unknown section id".into()));
            };
            if slot.replace(s).is_some() {
                return Err(state_err(s.id, s.instance, "duplicate section".into()));
            }
        }
        let take = |s: Option<&'a DeviceSection>, id: u32, instance: u32| {
            s.ok_or_else(|| state_err(id, instance, "missing section".into()))
        };
        let mut decoded = Vec::with_capacity(vcpus as usize);
        for (v, slot) in slots.iter().enumerate() {
            let i = v as u32;
            let get = |id: u32| {
                let k = section::VCPU.iter().position(|&x| x == id).unwrap_or(0);
                take(slot[k], id, i)
            };
            let pod = |id: u32| -> Result<&'a [u8], VmError> { Ok(&get(id)?.data) };
            let xsave = pod(section::XSAVE)?;
            if xsave.len() != xsave_size {
                return Err(state_err(
                    section::XSAVE,
                    i,
                    format!(
                        "{} bytes, this host's XSAVE area is {xsave_size}",
                        xsave.len()
                    ),
                ));
            }
            decoded.push(VcpuState {
                mp_state: pod_from(section::MP_STATE, i, pod(section::MP_STATE)?)?,
                regs: pod_from(section::REGS, i, pod(section::REGS)?)?,
                sregs: pod_from(section::SREGS, i, pod(section::SREGS)?)?,
                fpu: pod_from(section::FPU, i, pod(section::FPU)?)?,
                xsave,
                xcrs: pod_from(section::XCRS, i, pod(section::XCRS)?)?,
                debug_regs: pod_from(section::DEBUG_REGS, i, pod(section::DEBUG_REGS)?)?,
                lapic: pod_from(section::LAPIC, i, pod(section::LAPIC)?)?,
                msrs: decode_msrs(i, pod(section::MSRS)?)?,
                events: pod_from(section::VCPU_EVENTS, i, pod(section::VCPU_EVENTS)?)?,
            });
        }
        let mut irqchips = Vec::with_capacity(3);
        for (c, s) in chips.iter().enumerate() {
            let s = take(*s, section::IRQCHIP, c as u32)?;
            let chip: kvm_irqchip = pod_from(section::IRQCHIP, c as u32, &s.data)?;
            if chip.chip_id != c as u32 {
                return Err(state_err(
                    section::IRQCHIP,
                    c as u32,
                    format!("holds chip id {}", chip.chip_id),
                ));
            }
            irqchips.push(chip);
        }
        let clock = pod_from(section::CLOCK, 0, &take(clock, section::CLOCK, 0)?.data)?;
        Ok(DecodedState {
            vcpus: decoded,
            irqchips,
            clock,
        })
    }
}

/// Checks device-state sections as [`KvmVm`]'s restore would (ids, instances, versions, sizes,
/// completeness for `vcpus` vCPUs and an XSAVE area of `xsave_size` bytes) without a VM. For
/// fuzzing and for refusing bad state early.
pub fn check_sections(
    sections: &[DeviceSection],
    vcpus: u32,
    xsave_size: usize,
) -> Result<(), VmError> {
    DecodedState::decode(sections, vcpus, xsave_size).map(|_| ())
}

/// KVM uapi structures that are plain old data.
///
/// # Safety
///
/// Implementors are `#[repr(C)]`, contain only integers (arrays, nested structs and unions of
/// integers), have no implicit padding (uapi structs spell their padding out as fields), and
/// every bit pattern is a valid value.
unsafe trait Pod {}

// SAFETY: kvm_regs, like every type below, is a bindgen-generated uapi struct of integer
// fields with explicit padding fields; kvm-bindings checks its size and field offsets against
// the C headers.
unsafe impl Pod for kvm_regs {}
// SAFETY: see above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: see above; the trailing flexible array is zero-sized.
unsafe impl Pod for kvm_xsave {}
// SAFETY: see above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: see above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: see above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: see above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: see above; the chip union is 512 bytes of integers, zeroed by `Default` before
// KVM_GET_IRQCHIP fills it, so every byte is initialised.
unsafe impl Pod for kvm_irqchip {}
// SAFETY: see above.
unsafe impl Pod for kvm_clock_data {}

/// The raw bytes of `v`.
fn pod_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes behind the reference are
    // initialised; the slice borrows `v` immutably and is copied out at once.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

/// Decodes a `T` from exactly `size_of::<T>()` bytes.
fn pod_from<T: Pod>(id: u32, instance: u32, data: &[u8]) -> Result<T, VmError> {
    if data.len() != std::mem::size_of::<T>() {
        return Err(state_err(
            id,
            instance,
            format!(
                "{} bytes, expected {}",
                data.len(),
                std::mem::size_of::<T>()
            ),
        ));
    }
    // SAFETY: `data` holds exactly `size_of::<T>()` readable bytes; `read_unaligned` copes
    // with any alignment, and every bit pattern is a valid `T` (`T: Pod`).
    Ok(unsafe { std::ptr::read_unaligned(data.as_ptr().cast::<T>()) })
}

fn state_err(id: u32, instance: u32, reason: String) -> VmError {
    VmError::State {
        id,
        instance,
        reason,
    }
}

fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Locks `m`, ignoring poisoning: the protected data stays consistent across our panics-free
/// critical sections.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a vCPU thread paces its guest.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pacing {
    /// Pages per exit (0 = idle).
    batch: u64,
    /// Time per exit at the target rate.
    period: Duration,
}

impl Pacing {
    fn new(spec: &VmSpec) -> Pacing {
        let rate = spec.workload.dirty_rate;
        if rate == 0 {
            return Pacing {
                batch: 0,
                period: IDLE_EXIT_PERIOD,
            };
        }
        let vcpus = u64::from(spec.vcpus.max(1));
        let per_vcpu = rate.div_ceil(vcpus);
        let batch = per_vcpu.div_ceil(TARGET_EXITS_PER_SEC).clamp(1, MAX_BATCH);
        Pacing {
            batch,
            period: Duration::from_secs_f64(batch as f64 * vcpus as f64 / rate as f64),
        }
    }
}

/// What the VMM wants the vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Park,
    Run,
    Stop,
}

struct Ctl {
    target: Target,
    state: RunState,
    /// Per vCPU: parked (acknowledged a pause, or exited).
    parked: Vec<bool>,
    /// Threads that returned.
    exited: usize,
    /// First vCPU failure.
    failure: Option<(u32, String)>,
    /// An incoming VM whose state is not restored yet: it must not start.
    awaiting_state: bool,
}

struct Control {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Control {
    fn new(vcpus: usize) -> Control {
        Control {
            ctl: Mutex::new(Ctl {
                target: Target::Park,
                state: RunState::Created,
                parked: vec![false; vcpus],
                exited: 0,
                failure: None,
                awaiting_state: false,
            }),
            cv: Condvar::new(),
        }
    }

    fn target(&self) -> Target {
        lock(&self.ctl).target
    }

    /// Parks vCPU `index` until told to run (true) or stop (false).
    fn park(&self, index: usize) -> bool {
        let mut ctl = lock(&self.ctl);
        ctl.parked[index] = true;
        self.cv.notify_all();
        while ctl.target == Target::Park {
            ctl = self.cv.wait(ctl).unwrap_or_else(PoisonError::into_inner);
        }
        ctl.parked[index] = false;
        ctl.target == Target::Run
    }

    /// Sleeps until `deadline` or until the target is no longer `Run`.
    fn sleep_until(&self, deadline: Instant) {
        let mut ctl = lock(&self.ctl);
        loop {
            let now = Instant::now();
            if ctl.target != Target::Run || now >= deadline {
                return;
            }
            ctl = self
                .cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn vcpu_thread(
    index: u32,
    vcpu: &Mutex<VcpuFd>,
    control: &Control,
    pacing: Pacing,
    _ram: GuestRam,
) {
    let outcome = vcpu_loop(index, vcpu, control, pacing);
    let mut ctl = lock(&control.ctl);
    if let Err(reason) = outcome {
        tracing::error!(vcpu = index, %reason, "vCPU failed");
        if ctl.failure.is_none() {
            ctl.failure = Some((index, reason));
        }
    }
    ctl.parked[index as usize] = true;
    ctl.exited += 1;
    control.cv.notify_all();
}

/// Runs vCPU `index` until stopped (`Ok`) or failed (`Err(reason)`).
fn vcpu_loop(
    index: u32,
    vcpu: &Mutex<VcpuFd>,
    control: &Control,
    pacing: Pacing,
) -> Result<(), String> {
    let mut io_pending = false;
    let mut deadline: Option<Instant> = None;
    loop {
        if control.target() != Target::Run {
            if io_pending {
                complete_io(vcpu)?;
                io_pending = false;
            }
            if !control.park(index as usize) {
                return Ok(());
            }
            deadline = None;
        }
        let exit = {
            let mut fd = lock(vcpu);
            let exit = match fd.run() {
                Ok(VcpuExit::IoOut(PACING_PORT, _)) => Ok(true),
                Ok(other) => Err(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(false),
                Err(e) => Err(format!("KVM_RUN failed: {e}")),
            };
            exit.map_err(|reason| match fd.get_regs() {
                Ok(regs) => format!("{reason} at rip {:#x}", regs.rip),
                Err(_) => reason,
            })?
        };
        if exit {
            io_pending = true;
            let now = Instant::now();
            let mut next = deadline.unwrap_or(now) + pacing.period;
            if next + MAX_LAG < now {
                next = now;
            }
            deadline = Some(next);
            control.sleep_until(next);
        }
    }
}

/// Lets KVM finish the pending `out` (RIP past it) without running guest code, so the vCPU
/// state is consistent for saving.
fn complete_io(vcpu: &Mutex<VcpuFd>) -> Result<(), String> {
    let mut fd = lock(vcpu);
    fd.set_kvm_immediate_exit(1);
    let result = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(exit) => Err(format!("unexpected exit {exit:?} while completing I/O")),
        Err(e) => Err(format!("KVM_RUN (immediate exit) failed: {e}")),
    };
    fd.set_kvm_immediate_exit(0);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;
    use crate::vm::{Fill, Pattern, Workload};

    fn spec(vcpus: u32, dirty_rate: u64, ws_mib: u64, pattern: Pattern) -> VmSpec {
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
        let ws = vm.layout().working_set();
        let in_ws = (ws.start..ws.end)
            .step_by(PAGE_SIZE as usize)
            .filter(|&g| dirty.is_set(g))
            .count();
        assert!(in_ws > 0, "working-set pages are dirty");
        assert!(dirty.is_set(guest::STATUS_ADDR));
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
        let ws = vm.layout().working_set();
        let mut changed = 0;
        for (p, (a, b)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
            let gpa = p as u64 * PAGE_SIZE;
            if a != b {
                changed += 1;
                assert!(dirty.is_set(gpa), "page {gpa:#x} changed but is not dirty");
            }
            if dirty.is_set(gpa) {
                assert!(
                    ws.contains(&gpa) || gpa == guest::STATUS_ADDR,
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
        let b = KvmVm::new_incoming(&s, ram).unwrap();
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
        let regs_a: kvm_regs = pod_from(section::REGS, 0, &sections[1].data).unwrap();
        let b_sections = b.save_state().unwrap();
        let regs_b: kvm_regs = pod_from(section::REGS, 0, &b_sections[1].data).unwrap();
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
        assert_eq!(saved.len(), 2 * section::VCPU.len() + 4);
        let b = KvmVm::new_incoming(&s, GuestRam::new(a.ram().layout(), Populate::Lazy).unwrap())
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
        // The pending `out` was completed before the pause: no vCPU sits on it.
        let out_at = guest::CODE_ADDR
            + guest::GUEST_CODE
                .windows(2)
                .position(|w| w == [0xe6, 0x10])
                .unwrap() as u64;
        for v in 0..2 {
            let r = saved
                .iter()
                .find(|s| s.id == section::REGS && s.instance == v)
                .unwrap();
            let regs: kvm_regs = pod_from(section::REGS, v, &r.data).unwrap();
            assert_ne!(regs.rip, out_at, "vCPU {v} paused on its out instruction");
        }
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
    }

    #[test]
    fn restore_rejects_bad_sections() {
        let s = spec(1, 0, 1, Pattern::Sequential);
        let a = KvmVm::launch(&s).unwrap();
        a.pause().unwrap();
        let good = a.save_state().unwrap();
        let b = KvmVm::new_incoming(&s, GuestRam::new(a.ram().layout(), Populate::Lazy).unwrap())
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
        let b = KvmVm::new_incoming(&s, GuestRam::new(a.ram().layout(), Populate::Lazy).unwrap())
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
            KvmVm::new_incoming(&s, small),
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
