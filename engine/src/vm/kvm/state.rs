//! KVM state as migratable devices: the vCPUs ([`VcpuStates`], table-driven: one row per
//! section), the in-kernel interrupt controllers ([`Irqchips`]) and the VM clock
//! ([`KvmClock`]). Each saves versioned sections whose ids it owns ([`section`]) and checks
//! incoming ones completely before any ioctl.
//!
//! Encoding: KVM structures travel as their raw bytes (they are plain integers); MSRs as a
//! `u32` count followed by `(index u32, data u64)` pairs, little-endian. Decoding checks
//! every length and never panics.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::{kvm, lock};
use crate::devices::{index_sections, MigratableDevice};
use crate::memory::RamLayout;
use crate::vm::{DeviceSection, VmError};

/// Ids of the sections of the KVM state devices. vCPU sections have the vCPU index as
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
}

/// Format version of the KVM state sections.
pub const SECTION_VERSION: u32 = 1;
/// Most MSRs a [`section::MSRS`] section may carry.
pub const MAX_MSRS: usize = 1024;
/// MSR index of the TSC.
pub(super) const MSR_IA32_TSC: u32 = 0x10;
/// Size of the legacy `kvm_xsave` area.
pub(super) const LEGACY_XSAVE: usize = std::mem::size_of::<kvm_xsave>();

/// What a vCPU row needs beyond the vCPU's fd.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    /// MSRs saved per vCPU (those KVM lists and this vCPU can read).
    pub msr_indices: Vec<u32>,
    /// Size of this host's XSAVE area.
    pub xsave_size: usize,
    /// The XSAVE state components this VM's vCPUs may hold (the XCR0 mask of their CPUID
    /// leaf 0xD: what KVM_SET_XSAVE accepts); 0 when not known (nothing is checked).
    pub xfeatures: u64,
    /// The VM's guest RAM, where a paging vCPU's page-table root must lie; `None` when not
    /// known (nothing is checked).
    pub ram: Option<RamLayout>,
}

/// Where the page-table root of a paging vCPU with these control registers lies in
/// guest-physical memory, and how many bytes of it the CPU reads first: the top-level table
/// (4-level or 5-level long mode, 32-bit paging) or the four PDPTEs of PAE paging. `None`
/// when paging is off.
pub(super) fn paging_root(sregs: &kvm_sregs) -> Option<(u64, u64)> {
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LMA: u64 = 1 << 10;
    if sregs.cr0 & CR0_PG == 0 {
        return None;
    }
    Some(if sregs.efer & EFER_LMA != 0 {
        // Bits 51:12; below them the PCID (or cache controls), above them reserved and
        // the no-flush bit of a CR3 write.
        (sregs.cr3 & 0x000f_ffff_ffff_f000, 4096)
    } else if sregs.cr4 & CR4_PAE != 0 {
        (sregs.cr3 & 0xffff_ffe0, 32)
    } else {
        (sregs.cr3 & 0xffff_f000, 4096)
    })
}

/// Refuses a vCPU state whose paging root lies outside guest RAM: such a guest cannot run
/// one instruction (every fetch walks from the root), so the state is not the guest's —
/// seen under TCG's emulation of nested SVM, where the CR3 KVM returned at a pause was an
/// address of the host's own RAM, and the guest, resumed from it, looped on a page fault it
/// could not deliver.
fn check_paging_root(ctx: &VcpuContext, vcpu: u32, sregs: &kvm_sregs) -> Result<(), VmError> {
    let (Some(ram), Some((root, len))) = (&ctx.ram, paging_root(sregs)) else {
        return Ok(());
    };
    if ram.contains(root, len) {
        return Ok(());
    }
    Err(state_err(
        section::SREGS,
        vcpu,
        format!(
            "the vCPU pages with a page-table root at {root:#x} (CR3 {:#x}, CR0 {:#x}, CR4 \
             {:#x}, EFER {:#x}) outside guest RAM ({} MiB): not a state this guest can run",
            sregs.cr3,
            sregs.cr0,
            sregs.cr4,
            sregs.efer,
            ram.total_bytes() >> 20
        ),
    ))
}

/// One row of the vCPU table: a section, how to check, save and restore it.
struct VcpuRow {
    id: u32,
    check: fn(&VcpuContext, u32, &[u8]) -> Result<(), VmError>,
    save: fn(&VcpuContext, u32, &VcpuFd) -> Result<Vec<u8>, VmError>,
    restore: fn(&VcpuContext, u32, &VcpuFd, &[u8]) -> Result<(), VmError>,
}

/// A row for a KVM structure saved and restored whole by a get/set ioctl pair.
macro_rules! pod_row {
    ($id:expr, $ty:ty, $get:ident, $set:ident, $get_name:literal, $set_name:literal) => {
        VcpuRow {
            id: $id,
            check: |_, i, d| pod_from::<$ty>($id, i, d).map(|_| ()),
            save: |_, _, fd| Ok(pod_bytes(&fd.$get().map_err(kvm($get_name))?)),
            restore: |_, i, fd, d| {
                let v: $ty = pod_from($id, i, d)?;
                fd.$set(&v).map_err(kvm($set_name))
            },
        }
    };
}

/// The vCPU sections in save and restore order, after Firecracker and Cloud Hypervisor:
/// MP state first (it may update LAPIC state), REGS before VCPU_EVENTS (SET_REGS clears
/// pending exceptions), SREGS before LAPIC (APIC base), LAPIC before MSRS (the TSC deadline
/// needs the LAPIC configured), events last. CPUID is set when the vCPU is created.
const VCPU_ROWS: [VcpuRow; 10] = [
    VcpuRow {
        id: section::MP_STATE,
        check: |_, i, d| pod_from::<kvm_mp_state>(section::MP_STATE, i, d).map(|_| ()),
        save: |_, _, fd| {
            Ok(pod_bytes(
                &fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            ))
        },
        restore: |_, i, fd, d| {
            let v: kvm_mp_state = pod_from(section::MP_STATE, i, d)?;
            fd.set_mp_state(v).map_err(kvm("KVM_SET_MP_STATE"))
        },
    },
    pod_row!(
        section::REGS,
        kvm_regs,
        get_regs,
        set_regs,
        "KVM_GET_REGS",
        "KVM_SET_REGS"
    ),
    VcpuRow {
        id: section::SREGS,
        check: |ctx, i, d| check_paging_root(ctx, i, &pod_from(section::SREGS, i, d)?),
        save: |ctx, i, fd| {
            let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            // A source never sends a state its guest cannot run: the migration fails before
            // the switchover and the VM goes on here.
            check_paging_root(ctx, i, &sregs)?;
            Ok(pod_bytes(&sregs))
        },
        restore: |ctx, i, fd, d| {
            let sregs: kvm_sregs = pod_from(section::SREGS, i, d)?;
            check_paging_root(ctx, i, &sregs)?;
            fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))
        },
    },
    pod_row!(
        section::FPU,
        kvm_fpu,
        get_fpu,
        set_fpu,
        "KVM_GET_FPU",
        "KVM_SET_FPU"
    ),
    VcpuRow {
        id: section::XSAVE,
        check: |c, i, d| check_xsave(c, i, d),
        save: |c, _, fd| get_xsave(c, fd),
        restore: |c, i, fd, d| set_xsave(c, i, fd, d),
    },
    pod_row!(
        section::XCRS,
        kvm_xcrs,
        get_xcrs,
        set_xcrs,
        "KVM_GET_XCRS",
        "KVM_SET_XCRS"
    ),
    pod_row!(
        section::DEBUG_REGS,
        kvm_debugregs,
        get_debug_regs,
        set_debug_regs,
        "KVM_GET_DEBUGREGS",
        "KVM_SET_DEBUGREGS"
    ),
    pod_row!(
        section::LAPIC,
        kvm_lapic_state,
        get_lapic,
        set_lapic,
        "KVM_GET_LAPIC",
        "KVM_SET_LAPIC"
    ),
    VcpuRow {
        id: section::MSRS,
        check: |_, i, d| decode_msrs(i, d).map(|_| ()),
        save: |c, i, fd| Ok(encode_msrs(&read_msrs(fd, i, &c.msr_indices)?)),
        restore: |c, i, fd, d| write_msrs(fd, i, &restorable_msrs(c, i, decode_msrs(i, d)?)?),
    },
    pod_row!(
        section::VCPU_EVENTS,
        kvm_vcpu_events,
        get_vcpu_events,
        set_vcpu_events,
        "KVM_GET_VCPU_EVENTS",
        "KVM_SET_VCPU_EVENTS"
    ),
];

/// The ids of [`VCPU_ROWS`], in order.
const VCPU_IDS: [u32; 10] = [
    section::MP_STATE,
    section::REGS,
    section::SREGS,
    section::FPU,
    section::XSAVE,
    section::XCRS,
    section::DEBUG_REGS,
    section::LAPIC,
    section::MSRS,
    section::VCPU_EVENTS,
];

/// Every vCPU's architectural state.
pub struct VcpuStates {
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    ctx: VcpuContext,
}

impl VcpuStates {
    /// The state device of `vcpus`.
    pub fn new(vcpus: Vec<Arc<Mutex<VcpuFd>>>, ctx: VcpuContext) -> Self {
        VcpuStates { vcpus, ctx }
    }

    /// Checks the vCPU sections of a VM of `vcpus` vCPUs without one.
    pub fn check_sections(
        sections: &[&DeviceSection],
        vcpus: u32,
        ctx: &VcpuContext,
    ) -> Result<(), VmError> {
        let by_vcpu = index_sections(sections, &VCPU_IDS, vcpus, accepts_v1)?;
        for (i, row) in by_vcpu.iter().enumerate() {
            for (r, s) in VCPU_ROWS.iter().zip(row) {
                (r.check)(ctx, i as u32, &s.data)?;
            }
        }
        Ok(())
    }
}

impl MigratableDevice for VcpuStates {
    fn name(&self) -> &str {
        "vcpus"
    }

    fn section_ids(&self) -> &[u32] {
        &VCPU_IDS
    }

    fn save(&self) -> Result<Vec<DeviceSection>, VmError> {
        let mut out = Vec::with_capacity(self.vcpus.len() * VCPU_ROWS.len());
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            let fd = lock(vcpu);
            for r in &VCPU_ROWS {
                out.push(DeviceSection {
                    id: r.id,
                    instance: i as u32,
                    version: SECTION_VERSION,
                    data: (r.save)(&self.ctx, i as u32, &fd)?,
                });
            }
        }
        Ok(out)
    }

    fn check(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        VcpuStates::check_sections(sections, self.vcpus.len() as u32, &self.ctx)
    }

    fn restore(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        let by_vcpu = index_sections(sections, &VCPU_IDS, self.vcpus.len() as u32, accepts_v1)?;
        for (i, row) in by_vcpu.iter().enumerate() {
            let fd = lock(&self.vcpus[i]);
            for (r, s) in VCPU_ROWS.iter().zip(row) {
                (r.restore)(&self.ctx, i as u32, &fd, &s.data)?;
            }
        }
        Ok(())
    }
}

/// The in-kernel PIC pair and IOAPIC.
pub struct Irqchips {
    vm: Arc<VmFd>,
}

/// The chips, instance = KVM chip id.
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl Irqchips {
    /// The irqchip state device of `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Irqchips { vm }
    }

    /// Checks irqchip sections without a VM.
    pub fn check_sections(sections: &[&DeviceSection]) -> Result<Vec<kvm_irqchip>, VmError> {
        let chips = index_sections(
            sections,
            &[section::IRQCHIP],
            CHIPS.len() as u32,
            accepts_v1,
        )?;
        chips
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let chip: kvm_irqchip = pod_from(section::IRQCHIP, c as u32, &s[0].data)?;
                if chip.chip_id != c as u32 {
                    return Err(state_err(
                        section::IRQCHIP,
                        c as u32,
                        format!("holds chip id {}", chip.chip_id),
                    ));
                }
                Ok(chip)
            })
            .collect()
    }
}

impl MigratableDevice for Irqchips {
    fn name(&self) -> &str {
        "irqchip"
    }

    fn section_ids(&self) -> &[u32] {
        &[section::IRQCHIP]
    }

    fn save(&self) -> Result<Vec<DeviceSection>, VmError> {
        CHIPS
            .iter()
            .map(|&chip| {
                let mut irqchip = kvm_irqchip {
                    chip_id: chip,
                    ..Default::default()
                };
                self.vm
                    .get_irqchip(&mut irqchip)
                    .map_err(kvm("KVM_GET_IRQCHIP"))?;
                Ok(DeviceSection {
                    id: section::IRQCHIP,
                    instance: chip,
                    version: SECTION_VERSION,
                    data: pod_bytes(&irqchip),
                })
            })
            .collect()
    }

    fn check(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        Irqchips::check_sections(sections).map(|_| ())
    }

    fn restore(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        for chip in Irqchips::check_sections(sections)? {
            self.vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// The VM's kvmclock.
pub struct KvmClock {
    vm: Arc<VmFd>,
}

impl KvmClock {
    /// The clock state device of `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmClock { vm }
    }

    /// Checks the clock section without a VM.
    pub fn check_sections(sections: &[&DeviceSection]) -> Result<kvm_clock_data, VmError> {
        let s = index_sections(sections, &[section::CLOCK], 1, accepts_v1)?;
        pod_from(section::CLOCK, 0, &s[0][0].data)
    }
}

impl MigratableDevice for KvmClock {
    fn name(&self) -> &str {
        "kvmclock"
    }

    fn section_ids(&self) -> &[u32] {
        &[section::CLOCK]
    }

    fn save(&self) -> Result<Vec<DeviceSection>, VmError> {
        let clock = self.vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        Ok(vec![DeviceSection {
            id: section::CLOCK,
            instance: 0,
            version: SECTION_VERSION,
            data: pod_bytes(&clock),
        }])
    }

    fn check(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        KvmClock::check_sections(sections).map(|_| ())
    }

    fn restore(&self, sections: &[&DeviceSection]) -> Result<(), VmError> {
        let mut clock = KvmClock::check_sections(sections)?;
        // Keep only KVM_CLOCK_REALTIME: with it KVM advances the clock by the wall time since
        // the save (the downtime); kernels before 5.16 accept no flag and never report it.
        clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
        self.vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
    }
}

/// Every KVM state section id of this module, for routing without a VM.
const ALL_IDS: [u32; 12] = [
    section::MP_STATE,
    section::REGS,
    section::SREGS,
    section::FPU,
    section::XSAVE,
    section::XCRS,
    section::DEBUG_REGS,
    section::LAPIC,
    section::MSRS,
    section::VCPU_EVENTS,
    section::IRQCHIP,
    section::CLOCK,
];

/// Checks KVM state sections as a [`super::KvmVm`] of `vcpus` vCPUs with an XSAVE area of
/// `xsave_size` bytes would before restoring them (ids, instances, versions, sizes,
/// completeness), without a VM. For fuzzing and for refusing bad state early.
pub fn check_sections(
    sections: &[DeviceSection],
    vcpus: u32,
    xsave_size: usize,
) -> Result<(), VmError> {
    if let Some(s) = sections.iter().find(|s| !ALL_IDS.contains(&s.id)) {
        return Err(state_err(s.id, s.instance, "unknown section id".into()));
    }
    let of = |ids: &[u32]| -> Vec<&DeviceSection> {
        sections.iter().filter(|s| ids.contains(&s.id)).collect()
    };
    let ctx = VcpuContext {
        msr_indices: Vec::new(),
        xsave_size,
        xfeatures: 0,
        ram: None,
    };
    VcpuStates::check_sections(&of(&VCPU_IDS), vcpus, &ctx)?;
    Irqchips::check_sections(&of(&[section::IRQCHIP]))?;
    KvmClock::check_sections(&of(&[section::CLOCK]))?;
    Ok(())
}

/// MSRs firmware leaves set when an OS starts: fast strings, and write-back as the default
/// memory type with MTRRs enabled.
pub(super) fn set_boot_msrs(fd: &VcpuFd) -> Result<(), VmError> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_MEM_TYPE_WB: u64 = 6;
    write_msrs(
        fd,
        0,
        &[
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: MISC_ENABLE_FAST_STRING,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                data: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
                ..Default::default()
            },
        ],
    )
}

/// Every KVM state section is at version 1 (the only one so far).
fn accepts_v1(_id: u32, version: u32) -> bool {
    version == SECTION_VERSION
}

/// Where an XSAVE area's header keeps XSTATE_BV, the state components the area holds.
const XSTATE_BV: std::ops::Range<usize> = 512..520;

fn check_xsave(c: &VcpuContext, index: u32, data: &[u8]) -> Result<(), VmError> {
    if data.len() != c.xsave_size {
        return Err(state_err(
            section::XSAVE,
            index,
            format!(
                "{} bytes, this host's XSAVE area is {}",
                data.len(),
                c.xsave_size
            ),
        ));
    }
    Ok(())
}

/// Why KVM refused the XSAVE area `data`, when the reason is one worth naming: it holds
/// state of a component this VM's CPU lacks here (a source whose processor has a feature
/// this one does not: a recording with PKRU state on a host without PKU, say), which KVM
/// refuses with a bare EINVAL.
fn lacking_xsave_components(c: &VcpuContext, index: u32, data: &[u8]) -> Option<VmError> {
    let bv = data
        .get(XSTATE_BV)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)?;
    let lacking = bv & !c.xfeatures;
    (c.xfeatures != 0 && lacking != 0).then(|| {
        state_err(
            section::XSAVE,
            index,
            format!(
                "the saved FPU and vector state holds XSAVE components {} (XSTATE_BV {bv:#x}) \
                 that this VM's CPU here does not offer (XCR0 mask {:#x}): the source's \
                 processor has features this host's lacks",
                xsave_components(lacking),
                c.xfeatures
            ),
        )
    })
}

/// The names of the XSAVE state components in `bits` (Intel SDM vol. 1, 13.1).
fn xsave_components(bits: u64) -> String {
    const NAMES: [(u32, &str); 11] = [
        (0, "x87"),
        (1, "SSE"),
        (2, "AVX"),
        (3, "MPX BNDREGS"),
        (4, "MPX BNDCSR"),
        (5, "AVX-512 opmask"),
        (6, "AVX-512 ZMM_Hi256"),
        (7, "AVX-512 Hi16_ZMM"),
        (9, "PKRU"),
        (17, "AMX TILECFG"),
        (18, "AMX TILEDATA"),
    ];
    (0..64)
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| {
            NAMES
                .iter()
                .find(|(n, _)| *n == b)
                .map_or(format!("bit {b}"), |(_, name)| format!("{b} ({name})"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn get_xsave(c: &VcpuContext, fd: &VcpuFd) -> Result<Vec<u8>, VmError> {
    if c.xsave_size == LEGACY_XSAVE {
        return Ok(pod_bytes(&fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?));
    }
    let mut xsave = xsave2_buffer(c.xsave_size)?;
    // SAFETY: `xsave` holds `xsave_size` bytes of XSAVE area, the size KVM_CAP_XSAVE2
    // reported; this process never enables more XSTATE features afterwards.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm("KVM_GET_XSAVE2"))?;
    // The area is the legacy 4 KiB of the header followed by the FAM entries.
    let mut bytes = pod_bytes(&xsave.as_fam_struct_ref().xsave);
    bytes.extend(xsave.as_slice().iter().flat_map(|w| w.to_ne_bytes()));
    bytes.truncate(c.xsave_size);
    Ok(bytes)
}

fn set_xsave(c: &VcpuContext, index: u32, fd: &VcpuFd, data: &[u8]) -> Result<(), VmError> {
    check_xsave(c, index, data)?;
    // A refusal is explained when its reason can be named (KVM says EINVAL only).
    put_xsave(c, index, fd, data).map_err(|e| lacking_xsave_components(c, index, data).unwrap_or(e))
}

/// KVM_SET_XSAVE, or KVM_SET_XSAVE2 for an area larger than the legacy 4 KiB.
fn put_xsave(c: &VcpuContext, index: u32, fd: &VcpuFd, data: &[u8]) -> Result<(), VmError> {
    if c.xsave_size == LEGACY_XSAVE {
        let xsave: kvm_xsave = pod_from(section::XSAVE, index, data)?;
        // SAFETY: KVM_CAP_XSAVE2 reported no more than the legacy 4 KiB, so KVM reads
        // only `size_of::<kvm_xsave>()` bytes from `xsave`.
        return unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"));
    }
    let mut xsave = xsave2_buffer(c.xsave_size)?;
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

pub(super) fn supported_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VmError> {
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
            let rejected = chunk[written.min(chunk.len() - 1)];
            return Err(state_err(
                section::MSRS,
                index,
                format!(
                    "KVM accepted {written} of {} MSRs; rejected MSR {:#x} = {:#x}",
                    chunk.len(),
                    rejected.index,
                    rejected.data
                ),
            ));
        }
    }
    Ok(())
}

/// The source's MSRs this host's KVM can hold. One it cannot (another host kind lists other
/// MSRs: Intel's KVM lists IA32_FEATURE_CONTROL, AMD's does not) is left out when the source
/// held it at 0, its reset value, so nothing the guest had is lost; one with any other value
/// refuses the migration, naming it (the source keeps the VM).
fn restorable_msrs(
    c: &VcpuContext,
    instance: u32,
    entries: Vec<kvm_msr_entry>,
) -> Result<Vec<kvm_msr_entry>, VmError> {
    if c.msr_indices.is_empty() {
        return Ok(entries); // nothing known of this host: KVM decides
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if c.msr_indices.contains(&e.index) {
            out.push(e);
        } else if e.data == 0 {
            tracing::debug!(
                msr = e.index,
                "MSR not held by this host's KVM, 0 at the source: left out"
            );
        } else {
            return Err(state_err(
                section::MSRS,
                instance,
                format!(
                    "the source's MSR {:#x} = {:#x} cannot be restored: this host's KVM does not hold it",
                    e.index, e.data
                ),
            ));
        }
    }
    Ok(out)
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

pub(super) fn decode_msrs(instance: u32, data: &[u8]) -> Result<Vec<kvm_msr_entry>, VmError> {
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

/// KVM uapi structures that are plain old data.
///
/// # Safety
///
/// Implementors are `#[repr(C)]`, contain only integers (arrays, nested structs and unions of
/// integers), have no implicit padding (uapi structs spell their padding out as fields), and
/// every bit pattern is a valid value.
pub(super) unsafe trait Pod {}

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
pub(super) fn pod_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes behind the reference are
    // initialised; the slice borrows `v` immutably and is copied out at once.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

/// Decodes a `T` from exactly `size_of::<T>()` bytes.
pub(super) fn pod_from<T: Pod>(id: u32, instance: u32, data: &[u8]) -> Result<T, VmError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn a_refused_xsave_area_names_the_components_this_cpu_lacks() {
        let mut area = vec![0u8; 4096];
        // x87, SSE, AVX and PKRU.
        area[XSTATE_BV].copy_from_slice(&0x207u64.to_le_bytes());
        let with = |xfeatures| VcpuContext {
            msr_indices: Vec::new(),
            xsave_size: 4096,
            xfeatures,
            ram: None,
        };
        assert!(
            lacking_xsave_components(&with(0x2e7), 1, &area).is_none(),
            "PKRU offered"
        );
        assert!(
            lacking_xsave_components(&with(0), 1, &area).is_none(),
            "nothing known"
        );
        let e = lacking_xsave_components(&with(0xe7), 1, &area)
            .unwrap()
            .to_string();
        assert!(e.contains("9 (PKRU)") && !e.contains("AVX"), "{e}");
        assert!(e.contains("section 4") && e.contains("instance 1"), "{e}");
    }

    #[test]
    fn a_paging_root_outside_guest_ram_is_refused() {
        let ctx = VcpuContext {
            msr_indices: Vec::new(),
            xsave_size: 4096,
            xfeatures: 0,
            ram: Some(RamLayout::single(256 << 20)),
        };
        let long = |cr3| kvm_sregs {
            cr0: 0x8005_0033,
            cr3,
            cr4: 0x3506f0,
            efer: 0xd01,
            ..Default::default()
        };
        // Long mode: PCID and the no-flush bit are not part of the address.
        let ok = long(0x0fc4_c000 | 0x5 | 1 << 63);
        assert_eq!(paging_root(&ok), Some((0x0fc4_c000, 4096)));
        check_paging_root(&ctx, 0, &ok).unwrap();
        // The CR3 a paused guest's KVM returned under TCG's nested SVM: the host's RAM.
        let e = check_paging_root(&ctx, 1, &long(0xbfc4_c000))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0xbfc4c000") && e.contains("outside guest RAM (256 MiB)"),
            "{e}"
        );
        assert!(e.contains("instance 1"), "{e}");
        // Paging off (a vCPU in real mode, an AP in INIT-wait): CR3 means nothing.
        let real = kvm_sregs {
            cr3: 0xbfc4_c000,
            ..Default::default()
        };
        assert_eq!(paging_root(&real), None);
        check_paging_root(&ctx, 0, &real).unwrap();
        // PAE without long mode: 32-byte aligned PDPTEs, only their 32 bytes must be in RAM.
        let pae = kvm_sregs {
            cr0: 0x8000_0011,
            cr3: 0x0fff_ffe0,
            cr4: 0x20,
            ..Default::default()
        };
        assert_eq!(paging_root(&pae), Some((0x0fff_ffe0, 32)));
        check_paging_root(&ctx, 0, &pae).unwrap();
        // Nothing known of the RAM: nothing checked.
        let unknown = VcpuContext { ram: None, ..ctx };
        check_paging_root(&unknown, 0, &long(0xbfc4_c000)).unwrap();
    }

    #[test]
    fn an_msr_this_host_lacks_is_left_out_at_zero_and_refused_otherwise() {
        let c = VcpuContext {
            msr_indices: vec![MSR_IA32_TSC, 0x10a],
            xsave_size: 4096,
            xfeatures: 0,
            ram: None,
        };
        let kept = restorable_msrs(&c, 0, vec![msr(MSR_IA32_TSC, 7), msr(0x3a, 0)]).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].index, kept[0].data), (MSR_IA32_TSC, 7));

        let e = restorable_msrs(&c, 2, vec![msr(MSR_IA32_TSC, 7), msr(0x3a, 5)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0x3a = 0x5") && e.contains("does not hold it"),
            "{e}"
        );
        assert!(e.contains("instance 2"), "{e}");

        // Nothing known of the host: every MSR goes to KVM, which decides.
        let none = VcpuContext {
            msr_indices: Vec::new(),
            xsave_size: 4096,
            xfeatures: 0,
            ram: None,
        };
        assert_eq!(
            restorable_msrs(&none, 0, vec![msr(0x3a, 5)]).unwrap().len(),
            1
        );
    }
}
