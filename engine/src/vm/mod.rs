//! Virtual machines the engine can migrate.
//!
//! [`MigratableVm`] is the whole contract between the migration state machines and a VMM:
//! its configuration ([`VmConfig`]), guest RAM, dirty tracking, pause/resume and device state
//! as versioned sections. The built-in mini VMM ([`kvm::KvmVm`]) implements it on kvm-ioctls;
//! [`memory_only::MemoryVm`] is RAM without vCPUs for hosts without KVM; another VMM can
//! implement the same trait and use the engine unchanged.
//!
//! Rooms: [`builtin_guest`] (the built-in test guest: program, layout, RAM fill, workload),
//! [`kvm`] (the VMM: VM, vCPU threads, KVM state), [`memory_only`].

pub mod builtin_guest;
pub mod kvm;
pub mod memory_only;
pub mod pvh_guest;

pub use builtin_guest::{Fill, Pattern, VmSpec, Workload};

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyBitmap;
use crate::memory::{GuestRam, MemoryError, RamLayout};

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
    /// This host's processor cannot run the guest's (another vendor, a missing feature).
    #[error("{0}")]
    IncompatibleCpu(String),
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
    /// A VMM thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The built-in KVM mini VMM ([`kvm::KvmVm`]; needs /dev/kvm).
    #[default]
    Kvm,
    /// RAM plus a host writer thread, no vCPUs ([`memory_only::MemoryVm`]; for hosts without
    /// KVM).
    Memory,
}

crate::named_enum!(Backend, "backend", { Kvm => "kvm", Memory => "memory" });

impl Backend {
    /// The machine name a VM of this backend declares in its configuration.
    pub fn machine(self) -> &'static str {
        match self {
            Backend::Kvm => kvm::MACHINE,
            Backend::Memory => memory_only::MACHINE,
        }
    }
}

/// A VM's shape, as a destination needs it to build a skeleton: which VMM (machine), RAM
/// layout, vCPUs and devices, plus the machine section only that VMM reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Which VMM runs the VM (e.g. [`kvm::MACHINE`]); a destination refuses machines it
    /// cannot run.
    pub machine: String,
    /// Guest RAM; every page address later received is checked against it.
    pub layout: RamLayout,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The VM's devices, for checks and host-side set-up before any state moves.
    pub devices: Vec<DeviceDescriptor>,
    /// Everything else the VMM needs to rebuild the VM (guest kind, device details),
    /// opaque to the engine.
    pub machine_section: MachineSection,
}

/// A device of a VM, as the destination sees it before any state moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescriptor {
    /// What it is (`virtio-blk`, `virtio-net`, ...).
    pub kind: String,
    /// Its name in the VM (unique).
    pub id: String,
    /// Host-side details the destination may need or remap (image path, MAC, ...).
    pub properties: Vec<(String, String)>,
}

/// The VMM-owned part of a [`VmConfig`]: a versioned blob.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineSection {
    /// Format version, interpreted by the VMM.
    pub version: u32,
    /// The bytes.
    pub data: Vec<u8>,
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

/// How a guest ended its run on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestExit {
    /// It powered off.
    PowerOff,
    /// It asked for a reset (reboot); livemig ends the VM rather than reboot it.
    Reset,
}

/// One versioned piece of vCPU or device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    /// What the section holds (ids are owned by the device that saves the section; see
    /// [`crate::devices`]).
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
    /// The VM's configuration: what a destination needs to build a skeleton of it.
    fn config(&self) -> VmConfig;
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
    /// Auto-converge: takes `percent` (0–99) of every vCPU's time away from the guest, by
    /// making the vCPU threads sleep in slices; 0 lets it run at full speed again.
    fn set_throttle(&self, percent: u8) -> Result<(), VmError>;
    /// Saves vCPU and device state; the VM must be paused (or created).
    fn save_state(&self) -> Result<Vec<DeviceSection>, VmError>;
    /// Restores state saved by [`MigratableVm::save_state`] of a VM with the same spec.
    fn restore_state(&self, sections: &[DeviceSection]) -> Result<(), VmError>;
    /// The guest's progress counter: it moves while the guest runs (the built-in guest's
    /// counters; a Linux guest's console output).
    fn progress(&self) -> Result<u64, VmError>;
    /// Whether the guest powered off or reset (the VM has stopped then).
    fn guest_exit(&self) -> Option<GuestExit> {
        None
    }
    /// The VM's disks (what a storage migration moves), in a stable order.
    fn disks(&self) -> Vec<crate::storage::VmDisk> {
        Vec::new()
    }
    /// Announces every NIC on its network once (see [`crate::announce`]); returns how many
    /// were announced.
    fn announce(&self) -> Result<usize, VmError> {
        Ok(0)
    }
    /// The guest's console, if it has one.
    fn console(&self) -> Option<std::sync::Arc<crate::devices::uart::Console>> {
        None
    }
    /// Types `bytes` on the guest's console; false without a console or with too much input
    /// pending.
    fn console_input(&self, _bytes: &[u8]) -> bool {
        false
    }
    /// Stops the vCPUs for good and releases them.
    fn shutdown(&self);
}
