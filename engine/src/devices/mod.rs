//! The device seam: every piece of VM state that migrates — a device model, or state KVM
//! keeps on the VMM's behalf (vCPU registers, interrupt controllers, timers, the clock) — is
//! a [`MigratableDevice`], owned by the VM's [`DeviceManager`].
//!
//! A device saves its state as versioned [`DeviceSection`]s whose ids it owns, checks
//! sections exactly as its restore would before anything is applied, quiesces its I/O when
//! the VM pauses (in-flight requests complete first) and reports guest pages it wrote outside
//! vm-memory's dirty bitmap. Adding a device = its own file + one `register` line in the VMM
//! that builds it.
//!
//! Rooms: [`bus`] (port and MMIO dispatch), [`uart`] (COM1 and the console), [`acpi`] (the
//! ACPI tables and power registers), [`virtio`] (the virtio-mmio transport with block, net and
//! rng backends). The KVM state devices live with the VMM (`crate::vm::kvm::state`).
//!
//! What this module must not touch: KVM file descriptors. Devices reach guest RAM through
//! vm-memory only (so their writes are in the dirty bitmap) and raise interrupts through
//! [`IrqLine`]s the VMM registers.
//!
//! ```
//! use livemig_engine::devices::{DeviceManager, MigratableDevice};
//! use livemig_engine::vm::{DeviceSection, VmError};
//! use std::sync::Mutex;
//!
//! /// A counter that migrates as one section (id 0x900, version 1).
//! struct Counter(Mutex<u64>);
//!
//! impl MigratableDevice for Counter {
//!     fn name(&self) -> &str { "counter" }
//!     fn section_ids(&self) -> &[u32] { &[0x900] }
//!     fn save(&self) -> Result<Vec<DeviceSection>, VmError> {
//!         let v = *self.0.lock().unwrap();
//!         Ok(vec![DeviceSection { id: 0x900, instance: 0, version: 1, data: v.to_le_bytes().to_vec() }])
//!     }
//!     fn check(&self, s: &[&DeviceSection]) -> Result<(), VmError> {
//!         match s {
//!             [one] if one.version == 1 && one.data.len() == 8 => Ok(()),
//!             _ => Err(VmError::State { id: 0x900, instance: 0, reason: "want one 8-byte v1 section".into() }),
//!         }
//!     }
//!     fn restore(&self, s: &[&DeviceSection]) -> Result<(), VmError> {
//!         let b: [u8; 8] = s[0].data.as_slice().try_into().unwrap();
//!         *self.0.lock().unwrap() = u64::from_le_bytes(b);
//!         Ok(())
//!     }
//! }
//!
//! let mut a = DeviceManager::default();
//! a.register(std::sync::Arc::new(Counter(Mutex::new(7)))).unwrap();
//! let saved = a.save_all().unwrap();
//! let b_counter = std::sync::Arc::new(Counter(Mutex::new(0)));
//! let mut b = DeviceManager::default();
//! b.register(b_counter.clone()).unwrap();
//! b.restore_all(&saved).unwrap();
//! assert_eq!(*b_counter.0.lock().unwrap(), 7);
//! // A section nobody owns is refused before anything is restored.
//! let mut bad = saved.clone();
//! bad.push(DeviceSection { id: 0x901, instance: 0, version: 1, data: vec![] });
//! assert!(b.restore_all(&bad).is_err());
//! ```

pub mod acpi;
pub mod bus;
pub mod disk_writer;
pub mod uart;
pub mod virtio;

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dirty::DirtyBitmap;
use crate::vm::{DeviceSection, VmError};

/// What the VMM does when a device finds an interrupt it raised left unserviced: logs what the
/// interrupt controllers hold for the line (the argument: its GSI).
pub type StuckIrqHook = Arc<dyn Fn(u32) + Send + Sync>;

/// An interrupt line of the in-kernel irqchip: an eventfd the VMM registers as an irqfd for
/// `gsi`; raising it never involves a vCPU thread.
#[derive(Clone)]
pub struct IrqLine {
    evt: Arc<EventFd>,
    gsi: u32,
    /// Set by the VMM that registered the line (shared by its clones).
    stuck: Arc<std::sync::OnceLock<StuckIrqHook>>,
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IrqLine(gsi {})", self.gsi)
    }
}

impl IrqLine {
    /// A line for `gsi` (not yet registered with KVM).
    pub fn new(gsi: u32) -> std::io::Result<IrqLine> {
        Ok(IrqLine {
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            gsi,
            stuck: Arc::default(),
        })
    }

    /// The VMM's diagnosis for [`IrqLine::report_stuck`] (the first one set stays).
    pub fn on_stuck(&self, hook: StuckIrqHook) {
        let _ = self.stuck.set(hook);
    }

    /// The device raised this line and the guest has not serviced it for a long time: the
    /// VMM logs the interrupt controllers' state for it (nothing without a VMM hook).
    pub fn report_stuck(&self) {
        if let Some(h) = self.stuck.get() {
            h(self.gsi);
        }
    }

    /// Raises the interrupt (an edge).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The GSI it raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

/// A piece of VM state that migrates.
///
/// Methods take `&self`: devices are shared between the VM's threads and the migration.
pub trait MigratableDevice: Send + Sync {
    /// The device's name, for errors and logs.
    fn name(&self) -> &str;
    /// The section ids this device saves and restores.
    fn section_ids(&self) -> &[u32];
    /// The one instance of its ids this device owns, when several devices share the ids
    /// (one per instance, like virtio devices by slot); None when it owns every instance.
    fn section_instance(&self) -> Option<u32> {
        None
    }
    /// Saves the device's state; the VM is paused and the device quiesced.
    fn save(&self) -> Result<Vec<DeviceSection>, VmError>;
    /// Checks `sections` (every section of this device's ids, in stream order) as
    /// [`MigratableDevice::restore`] would — versions, sizes, ranges, completeness — and
    /// changes nothing. After a successful check, restore fails only if the host does.
    fn check(&self, sections: &[&DeviceSection]) -> Result<(), VmError>;
    /// Restores state checked by [`MigratableDevice::check`], upgrading older section
    /// versions.
    fn restore(&self, sections: &[&DeviceSection]) -> Result<(), VmError>;
    /// The VM is pausing: stop taking new I/O and complete what is in flight, so that no
    /// guest page changes after this returns.
    fn quiesce(&self) -> Result<(), VmError> {
        Ok(())
    }
    /// The VM runs again (here or, after a restore, on a destination): resume I/O, including
    /// requests the guest queued while the device was quiesced.
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
    /// ORs guest pages the device wrote outside vm-memory's bitmap since the last call into
    /// `into` (writes through [`crate::memory::GuestRam`]'s mapping are tracked already).
    fn harvest_dirty(&self, _into: &mut DirtyBitmap) {}
}

/// The devices of a VM, in registration order (the order of save, restore, quiesce; resume
/// runs in reverse).
#[derive(Default)]
pub struct DeviceManager {
    devices: Vec<Arc<dyn MigratableDevice>>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|d| d.name().to_string()))
            .finish()
    }
}

impl DeviceManager {
    /// Adds a device; refused if another device already owns one of its sections.
    pub fn register(&mut self, device: Arc<dyn MigratableDevice>) -> Result<(), VmError> {
        for other in &self.devices {
            let shared = device
                .section_ids()
                .iter()
                .find(|id| other.section_ids().contains(id));
            let distinct = matches!(
                (device.section_instance(), other.section_instance()),
                (Some(a), Some(b)) if a != b
            );
            if let (Some(id), false) = (shared, distinct) {
                return Err(VmError::InvalidSpec(format!(
                    "devices {} and {} both claim state section {id:#x}",
                    other.name(),
                    device.name()
                )));
            }
        }
        self.devices.push(device);
        Ok(())
    }

    /// The registered devices.
    pub fn devices(&self) -> &[Arc<dyn MigratableDevice>] {
        &self.devices
    }

    /// Every device's sections, in registration order.
    pub fn save_all(&self) -> Result<Vec<DeviceSection>, VmError> {
        let mut out = Vec::new();
        for d in &self.devices {
            out.extend(d.save()?);
        }
        Ok(out)
    }

    /// Routes each section to its owner, checks every device's share, and only then
    /// restores them in registration order: bad input changes nothing.
    pub fn restore_all(&self, sections: &[DeviceSection]) -> Result<(), VmError> {
        let shares = self.route(sections)?;
        for (d, share) in self.devices.iter().zip(&shares) {
            d.check(share)?;
        }
        for (d, share) in self.devices.iter().zip(&shares) {
            d.restore(share)?;
        }
        Ok(())
    }

    fn route<'a>(
        &self,
        sections: &'a [DeviceSection],
    ) -> Result<Vec<Vec<&'a DeviceSection>>, VmError> {
        let mut shares: Vec<Vec<&DeviceSection>> = vec![Vec::new(); self.devices.len()];
        for s in sections {
            let i = self
                .devices
                .iter()
                .position(|d| {
                    d.section_ids().contains(&s.id)
                        && d.section_instance().is_none_or(|i| i == s.instance)
                })
                .ok_or_else(|| VmError::State {
                    id: s.id,
                    instance: s.instance,
                    reason: "unknown section id (no device of this VM owns it)".into(),
                })?;
            shares[i].push(s);
        }
        Ok(shares)
    }

    /// Quiesces every device, in registration order.
    pub fn quiesce_all(&self) -> Result<(), VmError> {
        for d in &self.devices {
            d.quiesce()?;
        }
        Ok(())
    }

    /// Resumes every device, in reverse registration order.
    pub fn resume_all(&self) -> Result<(), VmError> {
        for d in self.devices.iter().rev() {
            d.resume()?;
        }
        Ok(())
    }

    /// ORs every device's own dirty pages into `into`.
    pub fn harvest_dirty(&self, into: &mut DirtyBitmap) {
        for d in &self.devices {
            d.harvest_dirty(into);
        }
    }
}

/// Checks that `sections` hold exactly one section per `(id, instance)` for each id of `ids`
/// and each instance in `0..instances`, each of `version` (or older where `accepted` allows),
/// returning them indexed `[instance][position of id in ids]`.
pub fn index_sections<'a>(
    sections: &[&'a DeviceSection],
    ids: &[u32],
    instances: u32,
    accepted: impl Fn(u32, u32) -> bool,
) -> Result<Vec<Vec<&'a DeviceSection>>, VmError> {
    let mut slots: Vec<Vec<Option<&DeviceSection>>> =
        vec![vec![None; ids.len()]; instances as usize];
    for s in sections {
        if !accepted(s.id, s.version) {
            return Err(VmError::State {
                id: s.id,
                instance: s.instance,
                reason: format!("unsupported version {}", s.version),
            });
        }
        let k = ids
            .iter()
            .position(|&id| id == s.id)
            .ok_or_else(|| VmError::State {
                id: s.id,
                instance: s.instance,
                reason: "unknown section id".into(),
            })?;
        let slot = slots
            .get_mut(s.instance as usize)
            .ok_or_else(|| VmError::State {
                id: s.id,
                instance: s.instance,
                reason: format!("no such instance (0..{instances})"),
            })?;
        if slot[k].replace(s).is_some() {
            return Err(VmError::State {
                id: s.id,
                instance: s.instance,
                reason: "duplicate section".into(),
            });
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, slot)| {
            slot.into_iter()
                .zip(ids)
                .map(|(s, &id)| {
                    s.ok_or_else(|| VmError::State {
                        id,
                        instance: i as u32,
                        reason: "missing section".into(),
                    })
                })
                .collect()
        })
        .collect()
}
