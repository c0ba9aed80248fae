//! Booting a Linux kernel: the RAM layout, loading the kernel (the uncompressed `vmlinux` by
//! its PVH entry, or a bzImage by the 64-bit boot protocol, both with rust-vmm's
//! `linux-loader`), the initrd and command line, the memory map, the ACPI tables, and the
//! boot vCPU's registers for the chosen entry.
//!
//! Guest-physical layout:
//!
//! | GPA | content |
//! |---|---|
//! | `0x500` | boot GDT |
//! | `0x6000` | PVH `hvm_start_info`, its memory map and module list after it |
//! | `0x7000` | zero page (`boot_params`, 64-bit protocol) |
//! | `0x9000` | page tables of the 64-bit protocol (identity map of the first 4 GiB) |
//! | `0x20000` | command line |
//! | `0xe0000` | ACPI tables (RSDP first) |
//! | `0x100000`.. | the kernel; the initrd at the top of low RAM |
//! | `0xd0000000` | virtio-mmio windows (RAM above 3 GiB continues at 4 GiB) |

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::acpi::{self, MmioDeviceInfo};
use crate::memory::{GuestRam, RamLayout, RamRegionSpec, PAGE_SIZE};
use crate::vm::VmError;

/// Start of the 32-bit MMIO hole: RAM below 4 GiB ends here at most.
pub const LOW_RAM_END: u64 = 3 << 30;
/// Where RAM above the hole continues.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// First virtio-mmio window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// First GSI of virtio devices (COM1 is 4; 5..=23 are free IOAPIC pins).
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Most virtio devices (IOAPIC pins 5..=23).
pub const MAX_DEVICES: u32 = 19;

const GDT_ADDR: u64 = 0x500;
const START_INFO_ADDR: u64 = 0x6000;
const ZERO_PAGE_ADDR: u64 = 0x7000;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
const HIMEM_START: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// The RAM layout of a Linux VM of `bytes`: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_layout(bytes: u64) -> RamLayout {
    let mut regions = vec![RamRegionSpec {
        gpa: 0,
        size: bytes.min(LOW_RAM_END),
    }];
    if bytes > LOW_RAM_END {
        regions.push(RamRegionSpec {
            gpa: HIGH_RAM_START,
            size: bytes - LOW_RAM_END,
        });
    }
    RamLayout { regions }
}

/// The window and GSI of virtio device slot `slot`.
pub fn device_window(slot: u32) -> MmioDeviceInfo {
    MmioDeviceInfo {
        base: MMIO_BASE + u64::from(slot) * crate::devices::virtio::WINDOW,
        len: crate::devices::virtio::WINDOW,
        gsi: FIRST_DEVICE_GSI + slot,
    }
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// PVH: 32-bit protected mode at `entry`, RBX = the start info.
    Pvh(u64),
    /// The 64-bit boot protocol: long mode at `entry`, RSI = the zero page.
    Linux64(u64),
}

/// What to boot.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// `vmlinux` (ELF) or bzImage.
    pub kernel: &'a Path,
    /// Initial ramdisk.
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPUs (for the MADT).
    pub vcpus: u32,
    /// virtio-mmio devices (for the DSDT).
    pub devices: &'a [MmioDeviceInfo],
}

fn boot_err(what: &str, e: impl std::fmt::Display) -> VmError {
    VmError::InvalidSpec(format!("{what}: {e}"))
}

/// Loads everything into `ram`; returns the boot vCPU's entry.
pub fn load(ram: &GuestRam, spec: &BootSpec<'_>) -> Result<Entry, VmError> {
    let mem = ram.memory();
    let mut kernel = File::open(spec.kernel)
        .map_err(|e| boot_err(&format!("kernel {}", spec.kernel.display()), e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let (entry, setup_header) = match Elf::load(mem, None, &mut kernel, himem) {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => (Entry::Pvh(a.0), None),
            _ => (Entry::Linux64(r.kernel_load.0), None),
        },
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            let r = BzImage::load(mem, None, &mut kernel, himem).map_err(|e| {
                boot_err(
                    &format!(
                        "kernel {}: neither an ELF vmlinux nor a bzImage",
                        spec.kernel.display()
                    ),
                    e,
                )
            })?;
            // The 64-bit entry point is 0x200 past the protected-mode code.
            (Entry::Linux64(r.kernel_load.0 + 0x200), r.setup_header)
        }
        Err(e) => return Err(boot_err(&format!("kernel {}", spec.kernel.display()), e)),
    };
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(ram, p)?),
        None => None,
    };
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| boot_err("command line", e))?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| boot_err(&format!("command line {:?}", spec.cmdline), e))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| boot_err("writing the command line", e))?;
    for (gpa, bytes) in acpi::tables(spec.vcpus, spec.devices).map_err(|e| boot_err("ACPI", e))? {
        write(ram, gpa, &bytes)?;
    }
    write(ram, GDT_ADDR, &gdt_bytes())?;
    let map = memory_map(ram.layout());
    match entry {
        Entry::Pvh(_) => write_start_info(ram, &map, initrd)?,
        Entry::Linux64(_) => {
            write_zero_page(ram, &map, initrd, setup_header, spec.cmdline.len())?;
            write_page_tables(ram)?;
        }
    }
    Ok(entry)
}

fn write(ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<(), VmError> {
    ram.memory()
        .write_slice(bytes, GuestAddress(gpa))
        .map_err(|e| VmError::GuestAccess {
            gpa,
            reason: e.to_string(),
        })
}

/// Loads the initrd at the top of low RAM; returns `(gpa, size)`.
fn load_initrd(ram: &GuestRam, path: &Path) -> Result<(u64, u64), VmError> {
    let data =
        std::fs::read(path).map_err(|e| boot_err(&format!("initrd {}", path.display()), e))?;
    let size = data.len() as u64;
    let low_end = ram.layout().regions[0].size;
    let gpa = low_end
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= 16 << 20)
        .ok_or_else(|| {
            boot_err(
                &format!("initrd {}", path.display()),
                format!("{size} bytes do not fit in {} MiB of RAM", low_end >> 20),
            )
        })?;
    write(ram, gpa, &data)?;
    Ok((gpa, size))
}

/// The e820 map: low RAM below the EBDA, RAM from 1 MiB, the ACPI area reserved, RAM above
/// 4 GiB.
fn memory_map(layout: &RamLayout) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (
            acpi::ACPI_BASE,
            acpi::ACPI_END - acpi::ACPI_BASE,
            E820_RESERVED,
        ),
        (HIMEM_START, layout.regions[0].size - HIMEM_START, E820_RAM),
    ];
    for r in &layout.regions[1..] {
        map.push((r.gpa, r.size, E820_RAM));
    }
    map
}

fn write_start_info(
    ram: &GuestRam,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), VmError> {
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let memmap_addr = START_INFO_ADDR + std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr =
        memmap_addr + (entries.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: acpi::ACPI_BASE,
        memmap_paddr: memmap_addr,
        memmap_entries: entries.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_addr } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&entries, GuestAddress(memmap_addr));
    if let Some((paddr, size)) = initrd {
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(modlist_addr),
        );
    }
    PvhBootConfigurator::write_bootparams(&params, ram.memory())
        .map_err(|e| boot_err("PVH start info", e))
}

fn write_zero_page(
    ram: &GuestRam,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
) -> Result<(), VmError> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32 + 1;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((gpa, size)) = initrd {
        p.hdr.ramdisk_image = gpa as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = acpi::ACPI_BASE;
    for (i, &(addr, size, type_)) in map.iter().enumerate().take(p.e820_table.len()) {
        p.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    p.e820_entries = map.len().min(p.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&p, GuestAddress(ZERO_PAGE_ADDR)),
        ram.memory(),
    )
    .map_err(|e| boot_err("zero page", e))
}

/// Identity-maps the first 4 GiB with 2 MiB pages (the 64-bit protocol enters with paging).
fn write_page_tables(ram: &GuestRam) -> Result<(), VmError> {
    const P: u64 = 1;
    const RW: u64 = 2;
    const PS: u64 = 1 << 7;
    write(ram, PML4_ADDR, &(PDPT_ADDR | P | RW).to_le_bytes())?;
    for g in 0..4u64 {
        let pd = PD_ADDR + g * PAGE_SIZE;
        write(ram, PDPT_ADDR + g * 8, &(pd | P | RW).to_le_bytes())?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) + (i << 21)) | P | RW | PS).to_le_bytes())
            .collect();
        write(ram, pd, &entries)?;
    }
    Ok(())
}

/// Null, 64-bit code, 32-bit code, data.
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
];

fn gdt_bytes() -> Vec<u8> {
    GDT.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The boot vCPU's registers for `entry`.
pub fn boot_registers(entry: Entry, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    *regs = kvm_regs {
        rflags: 2,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    let data = segment(0x18, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    match entry {
        Entry::Pvh(rip) => {
            regs.rip = rip;
            regs.rbx = START_INFO_ADDR;
            sregs.cs = segment(0x10, 0xb, false);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Entry::Linux64(rip) => {
            regs.rip = rip;
            regs.rsi = ZERO_PAGE_ADDR;
            sregs.cs = segment(0x08, 0xb, true);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_leave_the_mmio_hole() {
        assert_eq!(ram_layout(256 << 20).regions.len(), 1);
        let big = ram_layout(5 << 30);
        assert_eq!(big.regions.len(), 2);
        assert_eq!(big.regions[0].size, LOW_RAM_END);
        assert_eq!(big.regions[1].gpa, HIGH_RAM_START);
        assert_eq!(big.total_bytes(), 5 << 30);
        big.validate().unwrap();
        let last = device_window(MAX_DEVICES - 1);
        assert!(last.base + last.len <= u64::from(acpi::IOAPIC_ADDR));
        const { assert!(MMIO_BASE >= LOW_RAM_END) };
        assert_eq!(last.gsi, 23);
    }

    #[test]
    fn bad_kernels_are_clear_errors() {
        let ram = GuestRam::new(&ram_layout(64 << 20), crate::memory::Populate::Lazy).unwrap();
        let dir = std::env::temp_dir().join(format!("livemig-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        let spec = |k: &'static str| BootSpec {
            kernel: Path::new(k),
            initrd: None,
            cmdline: "console=ttyS0",
            vcpus: 1,
            devices: &[],
        };
        let e = load(&ram, &spec("/nonexistent/vmlinux"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
        let jp: &'static str = Box::leak(junk.display().to_string().into_boxed_str());
        let e = load(&ram, &spec(jp)).unwrap_err().to_string();
        assert!(e.contains("neither an ELF vmlinux nor a bzImage"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
