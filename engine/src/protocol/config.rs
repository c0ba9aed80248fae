//! The VM configuration a `Config` message carries: the VM's shape (machine, RAM layout,
//! vCPUs, device list) and the machine section, an opaque versioned blob that only the VM
//! backend named by `machine` reads.
//!
//! Version 2 layout, little-endian:
//!
//! ```text
//! machine: str | regions: u16, (gpa u64, size u64)* | vcpus: u32
//! devices: u16, (kind str, id str, properties: u16, (key str, value str)*)*
//! machine section: version u32, bytes (u32 length + data)
//! ```
//!
//! Version 1 carried the built-in guest's workload in place of the devices and the machine
//! section (`memory_mib u64, vcpus u32, fill u8, pattern u8, working_set_mib u64,
//! dirty_rate u64`, then the regions). It is converted on load: those four workload fields
//! are, byte for byte, version 1 of the built-in machines' section.

use super::{
    put_bytes, put_str, put_u16, put_u32, put_u64, ProtocolError, Reader, MAX_DEVICES,
    MAX_MACHINE_SECTION, MAX_PROPERTIES, MAX_VCPUS,
};
use crate::memory::{RamLayout, RamRegionSpec, MAX_REGIONS};
use crate::vm::{DeviceDescriptor, MachineSection, VmConfig};

/// Appends the version-2 encoding of `c` (also protocol 3's).
pub fn encode_config(w: &mut Vec<u8>, c: &VmConfig) {
    put_str(w, &c.machine);
    put_u16(w, c.layout.regions.len() as u16);
    for r in &c.layout.regions {
        put_u64(w, r.gpa);
        put_u64(w, r.size);
    }
    put_u32(w, c.vcpus);
    put_u16(w, c.devices.len() as u16);
    for d in &c.devices {
        put_str(w, &d.kind);
        put_str(w, &d.id);
        put_u16(w, d.properties.len() as u16);
        for (k, v) in &d.properties {
            put_str(w, k);
            put_str(w, v);
        }
    }
    put_u32(w, c.machine_section.version);
    put_bytes(w, &c.machine_section.data);
}

/// Decodes a configuration encoded by protocol `version` and checks it.
pub(crate) fn decode_config(r: &mut Reader<'_>, version: u16) -> Result<VmConfig, ProtocolError> {
    match version {
        1 => decode_v1(r),
        // Protocol 3 changed the KVM machine's section, not this encoding.
        2 | 3 => decode_v2(r),
        v => Err(ProtocolError::Version(v)),
    }
}

fn decode_v2(r: &mut Reader<'_>) -> Result<VmConfig, ProtocolError> {
    let machine = r.string()?;
    let layout = regions(r)?;
    let vcpus = r.u32()?;
    let n = usize::from(r.u16()?);
    if n > MAX_DEVICES {
        return Err(r.invalid(format!("{n} devices (at most {MAX_DEVICES})")));
    }
    let mut devices = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = r.string()?;
        let id = r.string()?;
        let np = usize::from(r.u16()?);
        if np > MAX_PROPERTIES {
            return Err(r.invalid(format!(
                "device {id:?}: {np} properties (at most {MAX_PROPERTIES})"
            )));
        }
        let mut properties = Vec::with_capacity(np);
        for _ in 0..np {
            properties.push((r.string()?, r.string()?));
        }
        devices.push(DeviceDescriptor {
            kind,
            id,
            properties,
        });
    }
    let section_version = r.u32()?;
    let data = r.byte_string(MAX_MACHINE_SECTION)?;
    let c = VmConfig {
        machine,
        layout,
        vcpus,
        devices,
        machine_section: MachineSection {
            version: section_version,
            data,
        },
    };
    check(r, &c)?;
    Ok(c)
}

fn decode_v1(r: &mut Reader<'_>) -> Result<VmConfig, ProtocolError> {
    let machine = r.string()?;
    let memory_mib = r.u64()?;
    let vcpus = r.u32()?;
    // fill u8, pattern u8, working_set_mib u64, dirty_rate u64: the built-in machines'
    // section, version 1 (checked by the backend that reads it).
    let workload = r.bytes(18)?.to_vec();
    let layout = regions(r)?;
    if layout.total_bytes() != memory_mib.saturating_mul(1 << 20) {
        return Err(r.invalid(format!(
            "layout holds {} bytes but the spec says {memory_mib} MiB",
            layout.total_bytes()
        )));
    }
    let c = VmConfig {
        machine,
        layout,
        vcpus,
        devices: Vec::new(),
        machine_section: MachineSection {
            version: 1,
            data: workload,
        },
    };
    check(r, &c)?;
    Ok(c)
}

fn regions(r: &mut Reader<'_>) -> Result<RamLayout, ProtocolError> {
    let n = usize::from(r.u16()?);
    if n == 0 || n > MAX_REGIONS {
        return Err(r.invalid(format!("{n} RAM regions (1..={MAX_REGIONS})")));
    }
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        regions.push(RamRegionSpec {
            gpa: r.u64()?,
            size: r.u64()?,
        });
    }
    let layout = RamLayout { regions };
    layout.validate().map_err(|e| r.invalid(e.to_string()))?;
    Ok(layout)
}

fn check(r: &Reader<'_>, c: &VmConfig) -> Result<(), ProtocolError> {
    if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
        return Err(r.invalid(format!("{} vCPUs (1..={MAX_VCPUS})", c.vcpus)));
    }
    let mut ids: Vec<&str> = c.devices.iter().map(|d| d.id.as_str()).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(r.invalid(format!("two devices named {:?}", w[0])));
    }
    Ok(())
}
