//! vCPU threads: each loops on `KVM_RUN`, serves the exits of its guest (the built-in guest's
//! pacing port, or a Linux guest's port and MMIO accesses on the VM's buses) and parks when the
//! VMM asks for a pause.
//!
//! The built-in guest exits with `out 0x10` after every batch of page writes; at that exit the
//! thread sleeps to hold the configured dirty rate. A Linux guest may sit in `KVM_RUN` (halted
//! in the in-kernel LAPIC) for as long as it likes, so a pause or stop also *kicks* the
//! threads: a signal (without `SA_RESTART`) makes `KVM_RUN` return `EINTR`. A kick that lands
//! just before a thread enters `KVM_RUN` is lost, so the VMM kicks again until the thread
//! parks. Before parking, a thread re-enters `KVM_RUN` with `immediate_exit` set so KVM
//! completes the pending I/O (advances RIP): the saved state is then consistent.
//!
//! Auto-converge throttles the guest as QEMU's cpu-throttle does: a throttler thread, every
//! [`THROTTLE_SLICE`] of run time, kicks the vCPUs and makes them sleep for
//! `slice × t / (1 - t)` (t the throttle level), so they run `1 - t` of the time. A pause or
//! stop cuts a sleep short.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::lock;
use crate::devices::bus::{Bus, VmAction};
use crate::memory::GuestRam;
use crate::vm::builtin_guest::{pacing_step, MAX_PACING_LAG, PACING_PORT};
pub use crate::vm::builtin_guest::{IDLE_EXIT_PERIOD, MAX_BATCH};
use crate::vm::{GuestExit, RunState, VmSpec};

/// How often a pause or stop kicks the vCPUs that have not parked yet.
pub const KICK_INTERVAL: Duration = Duration::from_millis(2);
/// Run time a throttled vCPU gets between two sleeps (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// KVM's system-event types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// How a vCPU thread serves its guest's exits.
pub(super) enum Exits {
    /// The built-in guest: pacing on its port.
    Builtin(Pacing),
    /// A Linux guest: port and MMIO accesses go to the buses.
    Linux {
        /// Port I/O.
        pio: Bus,
        /// MMIO.
        mmio: Bus,
    },
}

/// How a vCPU thread paces its guest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Pacing {
    /// Pages per exit (0 = idle).
    pub(super) batch: u64,
    /// Time per exit at the target rate.
    pub(super) period: Duration,
}

impl Pacing {
    pub(super) fn new(spec: &VmSpec) -> Pacing {
        let (batch, period) = pacing_step(spec);
        Pacing { batch, period }
    }
}

/// What the VMM wants the vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Park,
    Run,
    Stop,
}

pub(super) struct Ctl {
    pub(super) target: Target,
    pub(super) state: RunState,
    /// Per vCPU: parked (acknowledged a pause, or exited).
    pub(super) parked: Vec<bool>,
    /// Per vCPU: its thread, once it runs (to kick it).
    pub(super) threads: Vec<Option<libc::pthread_t>>,
    /// Threads that returned.
    pub(super) exited: usize,
    /// First vCPU failure.
    pub(super) failure: Option<(u32, String)>,
    /// The guest powered off or reset.
    pub(super) guest_exit: Option<GuestExit>,
    /// An incoming VM whose state is not restored yet: it must not start.
    pub(super) awaiting_state: bool,
    /// Auto-converge: percent of vCPU time taken from the guest (0 = none).
    pub(super) throttle: u8,
    /// Auto-converge: vCPUs sleep until then.
    pub(super) throttle_until: Option<Instant>,
    /// The throttler thread runs.
    pub(super) throttler: bool,
}

pub(super) struct Control {
    pub(super) ctl: Mutex<Ctl>,
    pub(super) cv: Condvar,
    /// Per vCPU: log its local APIC at its next exit ([`super::irqdiag`]).
    lapic_report: Vec<AtomicBool>,
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the kick handler (once per process), without `SA_RESTART` so `KVM_RUN` returns.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler that does nothing is a valid argument;
        // the previous action is not needed.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

impl Control {
    pub(super) fn new(vcpus: usize) -> Control {
        install_kick_handler();
        Control {
            ctl: Mutex::new(Ctl {
                target: Target::Park,
                state: RunState::Created,
                parked: vec![false; vcpus],
                threads: vec![None; vcpus],
                exited: 0,
                failure: None,
                guest_exit: None,
                awaiting_state: false,
                throttle: 0,
                throttle_until: None,
                throttler: false,
            }),
            cv: Condvar::new(),
            lapic_report: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Has every vCPU log its local APIC at its next exit, kicking the running ones out of
    /// `KVM_RUN` (a kick lost just before a thread enters it waits for its next exit).
    pub(super) fn request_lapic_report(&self) {
        for r in &self.lapic_report {
            r.store(true, AtomicOrdering::Relaxed);
        }
        self.kick_all(&lock(&self.ctl));
    }

    /// Whether a vCPU has a report of its local APIC still to log.
    #[cfg(test)]
    pub(super) fn lapic_report_pending(&self) -> bool {
        self.lapic_report
            .iter()
            .any(|r| r.load(AtomicOrdering::Relaxed))
    }

    /// Whether vCPU `index` was asked to log its local APIC (and no longer is).
    fn take_lapic_report(&self, index: u32) -> bool {
        self.lapic_report
            .get(index as usize)
            .is_some_and(|r| r.swap(false, AtomicOrdering::Relaxed))
    }

    /// What the vCPU should do next, once any throttle sleep it owes is over.
    fn target(&self) -> Target {
        let mut ctl = lock(&self.ctl);
        while ctl.target == Target::Run {
            let now = Instant::now();
            match ctl.throttle_until {
                Some(until) if until > now => {
                    ctl = self
                        .cv
                        .wait_timeout(ctl, until - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                _ => break,
            }
        }
        ctl.target
    }

    /// Sets the throttle level (capped at 99 %), starting the throttler thread if needed.
    pub(super) fn set_throttle(control: &Arc<Control>, percent: u8) -> std::io::Result<()> {
        let mut ctl = lock(&control.ctl);
        ctl.throttle = percent.min(99);
        if ctl.throttle == 0 {
            ctl.throttle_until = None;
            control.cv.notify_all();
            return Ok(());
        }
        if !ctl.throttler {
            let c = control.clone();
            std::thread::Builder::new()
                .name("vcpu-throttle".into())
                .spawn(move || c.throttler())?;
            ctl.throttler = true;
        }
        Ok(())
    }

    /// The throttler thread: while a throttle is set and the VM not stopped, every slice of
    /// run time is followed by a sleep of every vCPU.
    fn throttler(&self) {
        let mut ctl = lock(&self.ctl);
        while ctl.throttle != 0 && ctl.target != Target::Stop {
            let t = f64::from(ctl.throttle) / 100.0;
            let sleep = THROTTLE_SLICE.mul_f64(t / (1.0 - t));
            let now = Instant::now();
            if ctl.target == Target::Run {
                ctl.throttle_until = Some(now + sleep);
                self.kick_all(&ctl);
            }
            let wake = now + sleep + THROTTLE_SLICE;
            let level = ctl.throttle;
            loop {
                let now = Instant::now();
                if now >= wake || ctl.throttle != level || ctl.target == Target::Stop {
                    break;
                }
                ctl = self
                    .cv
                    .wait_timeout(ctl, wake - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        ctl.throttle_until = None;
        ctl.throttler = false;
        self.cv.notify_all();
    }

    /// Kicks every running vCPU thread that has not parked.
    pub(super) fn kick_all(&self, ctl: &Ctl) {
        for (t, parked) in ctl.threads.iter().zip(&ctl.parked) {
            if let (Some(t), false) = (t, parked) {
                // SAFETY: `t` is the pthread of a vCPU thread that has not exited (it is not
                // parked, and an exiting thread marks itself parked under this lock before
                // it ends), so the id is valid.
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
        }
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

    /// The guest powered off or reset: every vCPU stops.
    fn guest_exited(&self, exit: GuestExit) {
        let mut ctl = lock(&self.ctl);
        if ctl.guest_exit.is_none() {
            ctl.guest_exit = Some(exit);
        }
        ctl.target = Target::Stop;
        ctl.state = RunState::Stopped;
        self.kick_all(&ctl);
        self.cv.notify_all();
    }
}

pub(super) fn vcpu_thread(
    index: u32,
    vcpu: &Mutex<VcpuFd>,
    control: &Control,
    exits: &Exits,
    ram: GuestRam,
) {
    // SAFETY: pthread_self has no preconditions.
    lock(&control.ctl).threads[index as usize] = Some(unsafe { libc::pthread_self() });
    let outcome = vcpu_loop(index, vcpu, control, exits, &ram);
    let mut ctl = lock(&control.ctl);
    if let Err(reason) = outcome {
        tracing::error!(vcpu = index, %reason, "vCPU failed");
        if ctl.failure.is_none() {
            ctl.failure = Some((index, reason));
        }
    }
    ctl.parked[index as usize] = true;
    ctl.threads[index as usize] = None;
    ctl.exited += 1;
    control.cv.notify_all();
}

/// What one `KVM_RUN` ended with, as far as the loop cares.
enum Step {
    /// Nothing to do: run again.
    Again,
    /// The built-in guest's pacing exit.
    Paced,
    /// The guest powered off or reset.
    Exit(GuestExit),
}

/// The exits to this VMM a vCPU took since its last interrupt report (see
/// [`super::irqdiag::report_vcpu`]): a guest that polls a device shows here, one spinning in
/// its own code or in KVM does not.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ExitTally {
    /// Port I/O, and the last port.
    pub pio: u64,
    pub last_port: u16,
    /// MMIO, and the last address.
    pub mmio: u64,
    pub last_mmio: u64,
    /// `KVM_RUN` ended by a signal (a kick) or anything else.
    pub other: u64,
}

/// Runs vCPU `index` until stopped (`Ok`) or failed (`Err(reason)`).
fn vcpu_loop(
    index: u32,
    vcpu: &Mutex<VcpuFd>,
    control: &Control,
    exits: &Exits,
    ram: &GuestRam,
) -> Result<(), String> {
    let mut io_pending = false;
    let mut deadline: Option<Instant> = None;
    let mut tally = ExitTally::default();
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
        let step = {
            let mut fd = lock(vcpu);
            let step = run_once(&mut fd, exits, &mut tally);
            if control.take_lapic_report(index) {
                super::irqdiag::report_vcpu(&fd, index, ram, std::mem::take(&mut tally));
            }
            if matches!(step, Ok(Step::Paced)) || matches!(exits, Exits::Linux { .. }) {
                io_pending = true;
            }
            step.map_err(|reason| match fd.get_regs() {
                Ok(regs) => format!("{reason} at rip {:#x}", regs.rip),
                Err(_) => reason,
            })?
        };
        match step {
            Step::Again => {}
            Step::Exit(e) => {
                control.guest_exited(e);
                return Ok(());
            }
            Step::Paced => {
                if let Exits::Builtin(pacing) = exits {
                    let now = Instant::now();
                    let mut next = deadline.unwrap_or(now) + pacing.period;
                    if next + MAX_PACING_LAG < now {
                        next = now;
                    }
                    deadline = Some(next);
                    control.sleep_until(next);
                }
            }
        }
    }
}

/// One `KVM_RUN` and the service of its exit (counted in `tally`).
fn run_once(fd: &mut VcpuFd, exits: &Exits, tally: &mut ExitTally) -> Result<Step, String> {
    let exit = match fd.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            tally.other += 1;
            return Ok(Step::Again);
        }
        Err(e) => return Err(format!("KVM_RUN failed: {e}")),
    };
    match &exit {
        VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _) => {
            tally.pio += 1;
            tally.last_port = *port;
        }
        VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => {
            tally.mmio += 1;
            tally.last_mmio = *addr;
        }
        _ => tally.other += 1,
    }
    let action = match (exits, exit) {
        (Exits::Builtin(_), VcpuExit::IoOut(PACING_PORT, _)) => return Ok(Step::Paced),
        (Exits::Linux { pio, .. }, VcpuExit::IoIn(port, data)) => {
            if !pio.read(u64::from(port), data) {
                // No device: an ISA bus reads all ones.
                data.fill(0xff);
            }
            None
        }
        (Exits::Linux { pio, .. }, VcpuExit::IoOut(port, data)) => {
            pio.write(u64::from(port), data).flatten()
        }
        (Exits::Linux { mmio, .. }, VcpuExit::MmioRead(addr, data)) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
            None
        }
        (Exits::Linux { mmio, .. }, VcpuExit::MmioWrite(addr, data)) => {
            mmio.write(addr, data).flatten()
        }
        (Exits::Linux { .. }, VcpuExit::Hlt) => None,
        (Exits::Linux { .. }, VcpuExit::Shutdown) => {
            // A triple fault (or the guest's own shutdown cycle): said with where it happened,
            // since the VM ends here and nothing else would tell.
            let regs = fd.get_regs().ok();
            let sregs = fd.get_sregs().ok();
            let at = regs
                .map(|r| format!("rip {:#x} rsp {:#x}", r.rip, r.rsp))
                .unwrap_or_default();
            let cr = sregs
                .map(|s| format!("cr0 {:#x} cr3 {:#x} cr4 {:#x}", s.cr0, s.cr3, s.cr4))
                .unwrap_or_default();
            // KVM on AMD reinitialises the vCPU at a shutdown intercept (the VMCB is undefined
            // after one): what it returns then is the reset state, not the fault's.
            let reset =
                matches!((regs, sregs), (Some(r), Some(s)) if r.rip == 0xfff0 && s.cr0 & 1 == 0);
            let lost = if reset {
                " — the vCPU's state at the fault is lost: this is its reset state (KVM on AMD \
                 reinitialises a vCPU on a shutdown intercept)"
            } else {
                ""
            };
            tracing::error!(
                "the guest shut down (a triple fault, or its own reset) at {at} {cr}{lost}"
            );
            Some(VmAction::Reset)
        }
        (Exits::Linux { .. }, VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, _)) => {
            Some(VmAction::PowerOff)
        }
        (Exits::Linux { .. }, VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, _)) => {
            Some(VmAction::Reset)
        }
        (_, other) => return Err(format!("unexpected exit {other:?}")),
    };
    Ok(match action {
        Some(VmAction::PowerOff) => Step::Exit(GuestExit::PowerOff),
        Some(VmAction::Reset) => Step::Exit(GuestExit::Reset),
        None => Step::Again,
    })
}

/// Lets KVM finish the pending I/O (RIP past it) without running guest code, so the vCPU
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
