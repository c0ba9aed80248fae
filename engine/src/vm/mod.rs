//! Virtual machines the engine can migrate.
//!
//! [`MigratableVm`] is the whole contract between the migration state machines and a VMM:
//! guest RAM, dirty tracking, pause/resume and device state as versioned sections. The
//! built-in mini VMM ([`kvm::KvmVm`]) implements it on kvm-ioctls; another VMM can implement
//! the same trait and use the engine unchanged.

pub mod guest;
pub mod kvm;
pub mod memory_only;

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyBitmap;
use crate::memory::{GuestRam, MemoryError};

/// Errors of a VM operation.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation that failed.
        op: &'static str,
        /// Error reported by kvm-ioctls.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// Guest RAM access through vm-memory failed.
    #[error("guest memory access at gpa {gpa:#x} failed: {reason}")]
    GuestAccess {
        /// Address accessed.
        gpa: u64,
        /// What vm-memory reported.
        reason: String,
    },
    /// The VM specification is not usable.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// A device-state section could not be restored.
    #[error("device state section {id} (instance {instance}): {reason}")]
    State {
        /// Section id.
        id: u32,
        /// Instance (vCPU index, device index).
        instance: u32,
        /// What was wrong with it.
        reason: String,
    },
    /// The operation is not valid in the VM's current run state.
    #[error("VM is {state:?}: cannot {op}")]
    WrongState {
        /// Current state.
        state: RunState,
        /// Attempted operation.
        op: &'static str,
    },
    /// A vCPU stopped unexpectedly (guest fault, unexpected exit).
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        reason: String,
    },
}

/// Content the VMM writes into guest RAM before the guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Leave RAM zeroed.
    #[default]
    Zero,
    /// Incompressible pseudo-random bytes.
    Random,
    /// Compressible, text-like bytes.
    Text,
    /// A third each of zero, text-like and random blocks (64 KiB), interleaved.
    Mixed,
}

/// Order in which the guest workload visits the pages of its working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Page after page, wrapping around.
    #[default]
    Sequential,
    /// Uniformly random pages.
    Random,
    /// 90% of writes to the first 10% of the working set.
    Hotspot,
}

/// What the guest does while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Working set the guest writes into, in MiB.
    pub working_set_mib: u64,
    /// Pages written per second (0 = idle: only the progress counter moves).
    pub dirty_rate: u64,
    /// Page visiting order.
    pub pattern: Pattern,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            working_set_mib: 64,
            dirty_rate: 0,
            pattern: Pattern::Sequential,
        }
    }
}

/// Everything needed to build a VM, on the source or (as a skeleton) on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// RAM size in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM content written by the VMM before the guest starts.
    pub fill: Fill,
    /// Guest workload.
    pub workload: Workload,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            memory_mib: 256,
            vcpus: 1,
            fill: Fill::Random,
            workload: Workload::default(),
        }
    }
}

/// Run state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Built, guest not started yet (destination skeleton).
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused; state can be saved.
    Paused,
    /// Shut down.
    Stopped,
}

/// One versioned piece of vCPU or device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    /// What the section holds (see [`kvm::section`] for the built-in VMM's ids).
    pub id: u32,
    /// Which instance (vCPU index, chip index).
    pub instance: u32,
    /// Format version of `data`.
    pub version: u32,
    /// Opaque bytes, interpreted by the VMM.
    pub data: Vec<u8>,
}

/// A VM the engine can migrate.
///
/// Methods take `&self`: a VM is shared between its control socket and a migration.
pub trait MigratableVm: Send + Sync {
    /// The spec the destination needs to build a skeleton of this VM.
    fn spec(&self) -> &VmSpec;
    /// Which VMM runs this VM (its device state only restores into the same kind).
    fn machine(&self) -> &'static str;
    /// Guest RAM.
    fn ram(&self) -> &GuestRam;
    /// Current run state.
    fn run_state(&self) -> RunState;
    /// Starts dirty tracking; every later write to guest RAM is recorded until stopped.
    fn start_dirty_tracking(&self) -> Result<(), VmError>;
    /// ORs every page written since the previous harvest (KVM dirty log and VMM-side writes)
    /// into `into`, and resets the VM's own logs.
    fn harvest_dirty(&self, into: &mut DirtyBitmap) -> Result<(), VmError>;
    /// Stops dirty tracking.
    fn stop_dirty_tracking(&self) -> Result<(), VmError>;
    /// Stops every vCPU; returns once none runs guest code.
    fn pause(&self) -> Result<(), VmError>;
    /// Starts (or restarts) every vCPU.
    fn resume(&self) -> Result<(), VmError>;
    /// Saves vCPU and device state; the VM must be paused (or created).
    fn save_state(&self) -> Result<Vec<DeviceSection>, VmError>;
    /// Restores state saved by [`MigratableVm::save_state`] of a VM with the same spec.
    fn restore_state(&self, sections: &[DeviceSection]) -> Result<(), VmError>;
    /// The guest's progress counter (sum over vCPUs): it moves while the guest runs.
    fn progress(&self) -> Result<u64, VmError>;
    /// Stops the vCPUs for good and releases them.
    fn shutdown(&self);
}
