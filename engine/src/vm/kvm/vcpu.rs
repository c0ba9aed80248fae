//! vCPU threads: each loops on `KVM_RUN`, paces the built-in guest at its I/O exits and parks
//! when the VMM asks for a pause.
//!
//! The guest exits to the VMM with `out 0x10` after every batch of page writes; at that exit
//! the thread sleeps to hold the configured dirty rate and checks for pause or stop requests.
//! The guest runs at most [`MAX_BATCH`] page writes between two exits (about 2 ms of guest
//! time on the slow nested host this was built on), so a pause request is always seen within
//! milliseconds and no signal-based kick out of `KVM_RUN` is needed. Sleeps wait on a
//! condition variable, so a pause interrupts them. Before parking, a thread re-enters
//! `KVM_RUN` with `immediate_exit` set so KVM completes the pending `out` (advances RIP): the
//! saved state is then consistent.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::lock;
use crate::memory::GuestRam;
use crate::vm::builtin_guest::PACING_PORT;
use crate::vm::{RunState, VmSpec};

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
    /// Threads that returned.
    pub(super) exited: usize,
    /// First vCPU failure.
    pub(super) failure: Option<(u32, String)>,
    /// An incoming VM whose state is not restored yet: it must not start.
    pub(super) awaiting_state: bool,
}

pub(super) struct Control {
    pub(super) ctl: Mutex<Ctl>,
    pub(super) cv: Condvar,
}

impl Control {
    pub(super) fn new(vcpus: usize) -> Control {
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

pub(super) fn vcpu_thread(
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
