//! A Linux VM's machine: what to boot, its devices (COM1, the ACPI power registers, virtio
//! block, net and rng devices), how they appear in the VM's configuration, and how a
//! destination maps them to its own host (its tap, its console).

use std::path::PathBuf;
use std::sync::Arc;

use super::boot;
use crate::devices::acpi::{MmioDeviceInfo, PowerManagement, PM_PORT, PM_PORTS};
use crate::devices::bus::Bus;
use crate::devices::uart::{Console, Uart, COM1_GSI, COM1_PORT, PORTS};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::{format_mac, parse_mac, Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{Mem, VirtioBackend, VirtioMmio};
use crate::devices::IrqLine;
use crate::storage::image::DiskImage;
use crate::storage::VmDisk;
use crate::vm::{DeviceDescriptor, MachineSection, VmError};

/// Version of the machine section of a Linux VM (version 1 is the built-in guest's).
pub const SECTION_VERSION: u32 = 2;
/// Guest kind byte of a Linux VM's machine section.
const KIND_LINUX: u8 = 1;

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Its name in the VM (`disk0`, ...).
    pub id: String,
    /// A raw image file (or a host block device).
    pub path: PathBuf,
    /// The guest cannot write it.
    pub read_only: bool,
}

/// A network adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Its name in the VM (`net0`, ...).
    pub id: String,
    /// The host tap device it is attached to.
    pub tap: String,
    /// Its MAC address.
    pub mac: [u8; 6],
}

/// Where the guest's console goes on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleSpec {
    /// A file the output is appended to.
    pub log: Option<PathBuf>,
    /// Also to this process's stdout.
    pub stdout: bool,
}

/// A Linux VM to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxSpec {
    /// RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// `vmlinux` (PVH entry) or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (livemig puts `console=ttyS0` in front unless a console is named).
    pub cmdline: String,
    /// Virtual disks.
    pub disks: Vec<DiskSpec>,
    /// Network adapters.
    pub nets: Vec<NetSpec>,
    /// A virtio-rng device.
    pub rng: bool,
    /// The console.
    pub console: ConsoleSpec,
}

/// What a destination maps a source's devices to.
#[derive(Debug, Clone, Default)]
pub struct HostResources {
    /// `(adapter id, tap)`: the tap here for that adapter (default: the source's tap name).
    pub taps: Vec<(String, String)>,
    /// `(disk id, path)`: the image here for that disk (default: the source's path, as on
    /// shared storage).
    pub disks: Vec<(String, PathBuf)>,
    /// The console here.
    pub console: ConsoleSpec,
}

/// A device before it is built: its kind, name, window slot and backend settings.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Planned {
    Disk {
        slot: u32,
        disk: DiskSpec,
        size: Option<u64>,
    },
    Net {
        slot: u32,
        net: NetSpec,
    },
    Rng {
        slot: u32,
        id: String,
    },
}

/// The machine section of a Linux VM.
pub fn machine_section() -> MachineSection {
    MachineSection {
        version: SECTION_VERSION,
        data: vec![KIND_LINUX],
    }
}

/// Whether `s` is a Linux VM's machine section.
pub fn is_linux(s: &MachineSection) -> Result<bool, VmError> {
    match (s.version, s.data.as_slice()) {
        (1, _) => Ok(false),
        (SECTION_VERSION, [KIND_LINUX]) => Ok(true),
        (v, d) => Err(VmError::InvalidSpec(format!(
            "machine section version {v} of {} bytes is not one this VMM reads (1: built-in guest, 2: Linux)",
            d.len()
        ))),
    }
}

/// The devices a Linux VM runs, built.
pub(super) struct Devices {
    pub(super) pio: Bus,
    pub(super) mmio: Bus,
    pub(super) console: Arc<Console>,
    pub(super) uart: Arc<Uart>,
    pub(super) virtio: Vec<(Arc<VirtioMmio>, MmioDeviceInfo)>,
    pub(super) descriptors: Vec<DeviceDescriptor>,
    pub(super) disks: Vec<VmDisk>,
}

impl Devices {
    /// COM1's interrupt line.
    pub(super) fn uart_irq(&self) -> &IrqLine {
        self.uart.irq()
    }
}

fn plan(spec: &LinuxSpec) -> Result<Vec<Planned>, VmError> {
    let mut out = Vec::new();
    let mut slot = 0;
    for d in &spec.disks {
        out.push(Planned::Disk {
            slot,
            disk: d.clone(),
            size: None,
        });
        slot += 1;
    }
    for n in &spec.nets {
        out.push(Planned::Net {
            slot,
            net: n.clone(),
        });
        slot += 1;
    }
    if spec.rng {
        out.push(Planned::Rng {
            slot,
            id: "rng0".into(),
        });
        slot += 1;
    }
    if slot > boot::MAX_DEVICES {
        return Err(VmError::InvalidSpec(format!(
            "{slot} devices; at most {} fit",
            boot::MAX_DEVICES
        )));
    }
    let mut ids: Vec<&str> = out.iter().map(planned_id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(VmError::InvalidSpec(format!(
            "two devices named {:?}",
            w[0]
        )));
    }
    Ok(out)
}

fn planned_id(p: &Planned) -> &str {
    match p {
        Planned::Disk { disk, .. } => &disk.id,
        Planned::Net { net, .. } => &net.id,
        Planned::Rng { id, .. } => id,
    }
}

/// Reads the source's device list back into plans, with this host's taps and disks.
fn plan_incoming(
    descriptors: &[DeviceDescriptor],
    host: &HostResources,
) -> Result<Vec<Planned>, VmError> {
    let bad = |d: &DeviceDescriptor, m: String| {
        VmError::InvalidSpec(format!("device {} ({}): {m}", d.id, d.kind))
    };
    let mut out = Vec::new();
    for d in descriptors {
        let prop = |k: &str| {
            d.properties
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| bad(d, format!("no {k:?} property")))
        };
        let slot = || -> Result<u32, VmError> {
            prop("slot")?
                .parse::<u32>()
                .ok()
                .filter(|s| *s < boot::MAX_DEVICES)
                .ok_or_else(|| bad(d, "bad slot".into()))
        };
        match d.kind.as_str() {
            "uart" => {}
            "virtio-blk" => {
                let path = host
                    .disks
                    .iter()
                    .find(|(id, _)| *id == d.id)
                    .map(|(_, p)| p.clone())
                    .unwrap_or_else(|| PathBuf::from(prop("path").unwrap_or_default()));
                out.push(Planned::Disk {
                    slot: slot()?,
                    disk: DiskSpec {
                        id: d.id.clone(),
                        path,
                        read_only: prop("read-only")? == "true",
                    },
                    size: Some(
                        prop("size")?
                            .parse()
                            .map_err(|_| bad(d, "bad size".into()))?,
                    ),
                });
            }
            "virtio-net" => {
                let tap = host
                    .taps
                    .iter()
                    .find(|(id, _)| *id == d.id)
                    .map(|(_, t)| t.clone())
                    .map_or_else(|| prop("tap").map(str::to_string), Ok)?;
                out.push(Planned::Net {
                    slot: slot()?,
                    net: NetSpec {
                        id: d.id.clone(),
                        tap,
                        mac: parse_mac(prop("mac")?).map_err(|e| bad(d, e))?,
                    },
                });
            }
            "virtio-rng" => out.push(Planned::Rng {
                slot: slot()?,
                id: d.id.clone(),
            }),
            other => {
                return Err(bad(d, format!("this VMM has no {other:?} device")));
            }
        }
    }
    let mut slots: Vec<u32> = out
        .iter()
        .map(|p| match p {
            Planned::Disk { slot, .. } | Planned::Net { slot, .. } | Planned::Rng { slot, .. } => {
                *slot
            }
        })
        .collect();
    slots.sort_unstable();
    if slots.windows(2).any(|w| w[0] == w[1]) {
        return Err(VmError::InvalidSpec(
            "two devices share a window slot".into(),
        ));
    }
    Ok(out)
}

/// A backend opened from a plan: every host resource is checked here, before the VM exists.
struct Opened {
    slot: u32,
    id: String,
    kind: &'static str,
    properties: Vec<(String, String)>,
    backend: Box<dyn VirtioBackend>,
    disk: Option<VmDisk>,
}

fn open(p: Planned) -> Result<Opened, VmError> {
    match p {
        Planned::Disk { slot, disk, size } => {
            // A destination (which knows the source's size) opens the image unlocked: the
            // migration takes the lock at the switchover.
            let image = DiskImage::open(&disk.path, disk.read_only, size.is_some())
                .map_err(|e| VmError::InvalidSpec(format!("disk {}: {e}", disk.id)))?;
            let image = Arc::new(image);
            if let Some(want) = size {
                if image.size() != want {
                    return Err(VmError::InvalidSpec(format!(
                        "disk {}: {} is {} bytes here but {want} bytes at the source",
                        disk.id,
                        disk.path.display(),
                        image.size()
                    )));
                }
            }
            Ok(Opened {
                slot,
                id: disk.id.clone(),
                kind: "virtio-blk",
                properties: vec![
                    ("slot".into(), slot.to_string()),
                    ("path".into(), disk.path.display().to_string()),
                    ("read-only".into(), disk.read_only.to_string()),
                    ("size".into(), image.size().to_string()),
                ],
                backend: Box::new(Block::new(image.clone(), &disk.id)),
                disk: Some(VmDisk {
                    id: disk.id.clone(),
                    image,
                }),
            })
        }
        Planned::Net { slot, net } => {
            let tap = Tap::open(&net.tap)
                .map_err(|e| VmError::InvalidSpec(format!("network adapter {}: {e}", net.id)))?;
            Ok(Opened {
                slot,
                id: net.id.clone(),
                kind: "virtio-net",
                properties: vec![
                    ("slot".into(), slot.to_string()),
                    ("tap".into(), net.tap.clone()),
                    ("mac".into(), format_mac(&net.mac)),
                ],
                backend: Box::new(Net::new(tap, net.mac)),
                disk: None,
            })
        }
        Planned::Rng { slot, id } => Ok(Opened {
            slot,
            id,
            kind: "virtio-rng",
            properties: vec![("slot".into(), slot.to_string())],
            backend: Box::new(Rng::default()),
            disk: None,
        }),
    }
}

/// Opens every host resource of `spec` (disks, taps): the errors a user can make surface
/// here, before a VM exists.
pub(super) fn open_devices(spec: &LinuxSpec) -> Result<Vec<OpenedDevice>, VmError> {
    plan(spec)?
        .into_iter()
        .map(|p| open(p).map(OpenedDevice))
        .collect()
}

/// Opens the devices a source described, on this host's resources.
pub(super) fn open_incoming(
    descriptors: &[DeviceDescriptor],
    host: &HostResources,
) -> Result<Vec<OpenedDevice>, VmError> {
    plan_incoming(descriptors, host)?
        .into_iter()
        .map(|p| open(p).map(OpenedDevice))
        .collect()
}

/// A device whose host resources are open, not yet on a bus.
pub(super) struct OpenedDevice(Opened);

/// Opens the console of `spec`.
pub(super) fn open_console(spec: &ConsoleSpec) -> Result<Arc<Console>, VmError> {
    let log = match &spec.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| VmError::InvalidSpec(format!("console log {}: {e}", p.display())))?,
        ),
        None => None,
    };
    Ok(Console::new(log, spec.stdout))
}

/// Puts COM1, the power registers and the opened virtio devices on their buses.
pub(super) fn build(
    opened: Vec<OpenedDevice>,
    mem: &Mem,
    console: Arc<Console>,
) -> Result<Devices, VmError> {
    let irq = |gsi| {
        IrqLine::new(gsi).map_err(|e| VmError::InvalidSpec(format!("interrupt line {gsi}: {e}")))
    };
    let bus_err = |e: String| VmError::InvalidSpec(format!("device bus: {e}"));
    let uart = Arc::new(Uart::new(irq(COM1_GSI)?, console.clone()));
    let mut pio = Bus::default();
    pio.insert(COM1_PORT, PORTS, uart.clone())
        .map_err(bus_err)?;
    pio.insert(PM_PORT, PM_PORTS, Arc::new(PowerManagement))
        .map_err(bus_err)?;
    let mut mmio = Bus::default();
    let mut virtio = Vec::new();
    let mut disks = Vec::new();
    let mut descriptors = vec![DeviceDescriptor {
        kind: "uart".into(),
        id: "com1".into(),
        properties: Vec::new(),
    }];
    for OpenedDevice(o) in opened {
        disks.extend(o.disk);
        let window = boot::device_window(o.slot);
        let dev = VirtioMmio::new(o.slot, &o.id, o.backend, irq(window.gsi)?, mem.clone())?;
        mmio.insert(window.base, window.len, dev.clone())
            .map_err(bus_err)?;
        descriptors.push(DeviceDescriptor {
            kind: o.kind.into(),
            id: o.id,
            properties: o.properties,
        });
        virtio.push((dev, window));
    }
    Ok(Devices {
        pio,
        mmio,
        console,
        uart,
        virtio,
        descriptors,
        disks,
    })
}
