//! ACPI for Linux guests: the tables (RSDP, XSDT, a hardware-reduced FADT, MADT, a DSDT that
//! describes COM1 and the virtio-mmio devices) and the power-management registers the FADT
//! points at, through which a guest powers off or resets.
//!
//! Why hardware-reduced ACPI with virtio-mmio: Debian's kernel has `VIRTIO_MMIO=m` without
//! command-line devices but `ACPI=y`, and its virtio-mmio driver binds devices described in
//! the DSDT (`_HID "LNRO0005"`). A hardware-reduced platform has no PIC, PIT, PM timer or
//! SCI for Linux to probe: the guest needs only the LAPIC, the IOAPIC and these registers.
//! (virtio-pci would need a PCI host bridge, config space and MSI-X on top.)
//!
//! Tables are built with rust-vmm's `acpi_tables` and placed in the legacy BIOS area
//! (`0xe0000`), where Linux also finds the RSDP by scanning.

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use super::bus::{BusDevice, VmAction};

/// Guest-physical address of the RSDP (tables follow it).
pub const ACPI_BASE: u64 = 0x000e_0000;
/// End of the area the tables may use (the legacy BIOS area).
pub const ACPI_END: u64 = 0x0010_0000;
/// I/O port of the sleep control register (the sleep status register follows it, then the
/// reset register).
pub const PM_PORT: u64 = 0x600;
/// Ports of the power-management device.
pub const PM_PORTS: u64 = 3;
/// Value the guest writes to the reset register.
const RESET_VALUE: u8 = 1;
/// Sleep type of S5 (soft off), as the DSDT's `_S5_` declares it.
const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN bit of the sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
/// Local APIC address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

const OEM_ID: [u8; 6] = *b"LVMIGR";

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Register window base.
    pub base: u64,
    /// Register window length.
    pub len: u64,
    /// Its interrupt (an IOAPIC pin, edge-triggered, active high).
    pub gsi: u32,
}

/// The ACPI power-management registers: sleep control (S5 = power off), sleep status, reset.
#[derive(Debug, Default)]
pub struct PowerManagement;

impl BusDevice for PowerManagement {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VmAction> {
        let v = *data.first()?;
        match offset {
            0 if v & SLEEP_ENABLE != 0 && (v >> 2) & 7 == S5_SLEEP_TYPE => Some(VmAction::PowerOff),
            2 if v == RESET_VALUE => Some(VmAction::Reset),
            _ => None,
        }
    }
}

/// The tables for a VM of `vcpus` vCPUs with COM1 and `mmio` devices: `(gpa, bytes)` pieces
/// to write into guest RAM, the RSDP first at [`ACPI_BASE`]. Fails if they do not fit the
/// legacy BIOS area.
pub fn tables(vcpus: u32, mmio: &[MmioDeviceInfo]) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut at = ACPI_BASE + 64; // the RSDP goes first
    let mut place = |bytes: Vec<u8>, out: &mut Vec<(u64, Vec<u8>)>| {
        let gpa = at;
        at = (at + bytes.len() as u64).next_multiple_of(16);
        out.push((gpa, bytes));
        gpa
    };
    let dsdt = place(dsdt(mmio), &mut out);
    let fadt = place(fadt(dsdt), &mut out);
    let madt = place(madt(vcpus)?, &mut out);
    let mut xsdt = XSDT::new(OEM_ID, *b"LVMGXSDT", 1);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(aml_bytes(&xsdt), &mut out);
    if at > ACPI_END {
        return Err(format!(
            "ACPI tables need {} bytes, more than the {} bytes of the BIOS area",
            at - ACPI_BASE,
            ACPI_END - ACPI_BASE
        ));
    }
    out.insert(0, (ACPI_BASE, aml_bytes(&Rsdp::new(OEM_ID, xsdt))));
    Ok(out)
}

/// AML encoded already (a device built in a loop, whose parts borrow loop locals).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// COM1, the virtio-mmio devices and the S5 sleep type.
fn dsdt(mmio: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut body);
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, super::uart::COM1_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let mut com1 = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut com1);
    let mut devices: Vec<Box<dyn Aml>> = vec![Box::new(RawAml(com1))];
    for (i, d) in mmio.iter().enumerate() {
        let mut dev = Vec::new();
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        aml::Device::new(
            format!("V{i:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut dev);
        devices.push(Box::new(RawAml(dev)));
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d.as_ref()).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"LVMGDSDT", 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Hardware-reduced FADT: the sleep and reset registers of [`PowerManagement`], no legacy
/// devices (no VGA, no CMOS RTC, no 8042, no MSI through PCI).
fn fadt(dsdt: u64) -> Vec<u8> {
    let io = |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut f = FADTBuilder::new(OEM_ID, *b"LVMGFADT", 1)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    f.sleep_control_reg = io(PM_PORT);
    f.sleep_status_reg = io(PM_PORT + 1);
    f.reset_reg = io(PM_PORT + 2);
    f.reset_value = RESET_VALUE;
    // IAPC_BOOT_ARCH: no VGA (bit 2), MSI not supported (bit 3), no CMOS RTC (bit 5).
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 3) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"LIVEMIG\0").into();
    aml_bytes(&f.finalize())
}

/// MADT: a local APIC per vCPU, the IOAPIC, LINT1 as NMI on every CPU.
fn madt(vcpus: u32) -> Result<Vec<u8>, String> {
    if vcpus == 0 || vcpus > 254 {
        return Err(format!("{vcpus} vCPUs do not fit an xAPIC MADT (1..=254)"));
    }
    let mut sdt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"LVMGMADT", 1);
    sdt.write_u32(36, LAPIC_ADDR);
    sdt.write_u32(40, 0); // no dual-8259 compatibility: hardware-reduced
    for i in 0..vcpus as u8 {
        // Processor local APIC: uid, APIC id, enabled.
        sdt.append_slice(&[0, 8, i, i, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    sdt.append_slice(&ioapic);
    // Local APIC NMI: all processors (0xff), flags 0, LINT1.
    sdt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    Ok(sdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_fit_checksum_and_link_up() {
        let mmio = [
            MmioDeviceInfo {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let t = tables(2, &mmio).unwrap();
        assert_eq!(t[0].0, ACPI_BASE);
        assert_eq!(&t[0].1[..8], b"RSD PTR ");
        assert!(checksum_ok(&t[0].1[..20]) && checksum_ok(&t[0].1));
        let xsdt = u64::from_le_bytes(t[0].1[24..32].try_into().unwrap());
        let by_addr = |a: u64| &t.iter().find(|(g, _)| *g == a).unwrap().1;
        let x = by_addr(xsdt);
        assert_eq!(&x[..4], b"XSDT");
        let fadt = by_addr(u64::from_le_bytes(x[36..44].try_into().unwrap()));
        let madt = by_addr(u64::from_le_bytes(x[44..52].try_into().unwrap()));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(&madt[..4], b"APIC");
        let dsdt = by_addr(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        for (gpa, b) in &t[1..] {
            assert!(checksum_ok(b), "table at {gpa:#x}");
            assert_eq!(
                u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
                b.len()
            );
            assert!(*gpa + b.len() as u64 <= ACPI_END);
        }
        // Both devices and COM1 are in the DSDT.
        let has = |n: &[u8]| dsdt.windows(n.len()).any(|w| w == n);
        assert!(has(b"LNRO0005") && has(b"V000") && has(b"V001") && has(b"COM1") && has(b"_S5_"));
        // Two local APICs, an IOAPIC and an NMI entry.
        assert_eq!(madt.len(), 44 + 2 * 8 + 12 + 6);
        assert!(tables(0, &[]).is_err());
    }

    #[test]
    fn power_registers() {
        let pm = PowerManagement;
        assert_eq!(
            pm.write(0, &[(5 << 2) | (1 << 5)]),
            Some(VmAction::PowerOff)
        );
        assert_eq!(pm.write(0, &[5 << 2]), None, "without SLP_EN");
        assert_eq!(
            pm.write(0, &[(3 << 2) | (1 << 5)]),
            None,
            "S3 is not supported"
        );
        assert_eq!(pm.write(2, &[RESET_VALUE]), Some(VmAction::Reset));
        assert_eq!(pm.write(1, &[0xff]), None);
    }
}
