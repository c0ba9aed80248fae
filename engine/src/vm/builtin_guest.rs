//! The built-in test guest: its spec (RAM, vCPUs, fill, workload), its machine section, its
//! program and memory layout, and the RAM fill.
//!
//! The guest is a few dozen bytes of 64-bit code that start in long mode (the VMM sets the
//! control registers; there is no firmware). In a loop it writes `batch` pages of its working
//! set, in the order given by a page-index table, then increments its progress counter and
//! executes `out 0x10, al`: that I/O exit is where the VMM paces the guest and parks it for a
//! pause. Everything the guest needs lives in guest RAM ([`GuestLayout`]) or in its registers
//! ([`GuestLayout::initial_regs`]), so it migrates with RAM and vCPU state.
//!
//! Guest-physical layout:
//!
//! | GPA | content |
//! |---|---|
//! | `0x1000` | GDT: null, 64-bit code (selector `0x08`), data (selector `0x10`) |
//! | `0x2000` | status page: slot `i` at `0x2000 + 64 * i`: counter `u64` at +0, batch `u64` at +16 |
//! | `0x3000` | guest code ([`GUEST_CODE`]) |
//! | `0x9000` | PML4; `0xA000` PDPT; `0xB000..` page directories (2 MiB pages, identity map of RAM) |
//! | `0x100000` | page-index table: `u32` page indices into the working set |
//! | next 2 MiB boundary | the working set |
//!
//! This module writes guest RAM before the guest starts (fill, then layout). It owns no KVM
//! file descriptor and never touches RAM of a running guest.

use std::ops::Range;
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use serde::{Deserialize, Serialize};

use super::{MachineSection, VmConfig, VmError};
use crate::memory::{GuestRam, PAGE_SIZE};

/// Content the VMM writes into guest RAM before the guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Fill {
    /// Leave RAM zeroed.
    #[default]
    Zero = 0,
    /// Incompressible pseudo-random bytes.
    Random = 1,
    /// Compressible, text-like bytes.
    Text = 2,
    /// A third each of zero, text-like and random blocks (64 KiB), interleaved.
    Mixed = 3,
}

/// Order in which the guest workload visits the pages of its working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Pattern {
    /// Page after page, wrapping around.
    #[default]
    Sequential = 0,
    /// Uniformly random pages.
    Random = 1,
    /// 90% of writes to the first 10% of the working set.
    Hotspot = 2,
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

/// A built-in-guest VM: RAM, vCPUs, RAM content and workload.
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

crate::named_enum!(Fill, "fill", {
    Zero => "zero",
    Random => "random",
    Text => "text",
    Mixed => "mixed",
});

crate::named_enum!(Pattern, "pattern", {
    Sequential => "sequential",
    Random => "random",
    Hotspot => "hotspot",
});

/// Version of the built-in machines' section ([`encode_section`]).
pub const SECTION_VERSION: u32 = 1;

/// The machine section of a built-in-guest VM (the KVM mini VMM and the memory-only VM),
/// version 1: `fill u8, pattern u8, working_set_mib u64, dirty_rate u64`, little-endian.
/// Protocol 1 carried the same bytes inline in its `Config`.
pub fn encode_section(spec: &VmSpec) -> MachineSection {
    let mut data = Vec::with_capacity(18);
    data.push(spec.fill as u8);
    data.push(spec.workload.pattern as u8);
    data.extend_from_slice(&spec.workload.working_set_mib.to_le_bytes());
    data.extend_from_slice(&spec.workload.dirty_rate.to_le_bytes());
    MachineSection {
        version: SECTION_VERSION,
        data,
    }
}

/// The spec of a built-in-guest VM from its configuration (shape and machine section).
pub fn spec_from_config(c: &VmConfig) -> Result<VmSpec, VmError> {
    let bad = |m: String| VmError::InvalidSpec(format!("machine section: {m}"));
    if c.machine_section.version != SECTION_VERSION {
        return Err(bad(format!(
            "version {} (this build reads {SECTION_VERSION})",
            c.machine_section.version
        )));
    }
    let d = &c.machine_section.data;
    if d.len() != 18 {
        return Err(bad(format!("{} bytes, expected 18", d.len())));
    }
    let fill = match d[0] {
        0 => Fill::Zero,
        1 => Fill::Random,
        2 => Fill::Text,
        3 => Fill::Mixed,
        f => return Err(bad(format!("unknown fill {f}"))),
    };
    let pattern = match d[1] {
        0 => Pattern::Sequential,
        1 => Pattern::Random,
        2 => Pattern::Hotspot,
        p => return Err(bad(format!("unknown pattern {p}"))),
    };
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[at..at + 8]);
        u64::from_le_bytes(b)
    };
    // Its devices (a disk the VMM writes) are the VMM's to check: see
    // `crate::devices::disk_writer::DiskWriter::from_devices`.
    Ok(VmSpec {
        memory_mib: c.layout.total_bytes() >> 20,
        vcpus: c.vcpus,
        fill,
        workload: Workload {
            working_set_mib: word(2),
            dirty_rate: word(10),
            pattern,
        },
    })
}

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the status page (one slot per vCPU).
pub const STATUS_ADDR: u64 = 0x2000;
/// Size of one vCPU's status slot.
pub const STATUS_SLOT_SIZE: u64 = 64;
/// Offset of the progress counter (`u64`, written by the guest) in a status slot.
pub const STATUS_COUNTER: u64 = 0;
/// Offset of the batch size (`u64` pages per exit, written by the VMM) in a status slot.
pub const STATUS_BATCH: u64 = 16;
/// Guest-physical address of the guest code.
pub const CODE_ADDR: u64 = 0x3000;
/// Guest-physical address of the PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// Guest-physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0xA000;
/// Guest-physical address of the first page directory (one per GiB of RAM).
pub const PD_ADDR: u64 = 0xB000;
/// Guest-physical address of the page-index table.
pub const TABLE_ADDR: u64 = 0x10_0000;
/// Smallest RAM the layout fits in.
pub const MIN_RAM_BYTES: u64 = 8 << 20;
/// Largest RAM the page tables map (64 page directories of 1 GiB).
pub const MAX_RAM_BYTES: u64 = 64 << 30;
/// Most vCPUs: one status page of 64-byte slots.
pub const MAX_VCPUS: u32 = (PAGE_SIZE / STATUS_SLOT_SIZE) as u32;
/// Fewest entries in the page-index table.
pub const MIN_TABLE_ENTRIES: u64 = 4096;
/// Most entries in the page-index table (4 MiB of table).
pub const MAX_TABLE_ENTRIES: u64 = 1 << 20;
/// I/O port the guest writes after each batch.
pub const PACING_PORT: u16 = 0x10;
/// Code segment selector (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector (GDT entry 2).
pub const DATA_SELECTOR: u16 = 0x10;

const HUGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// The guest program, position independent; load it at [`CODE_ADDR`].
///
/// Register interface (set by the VMM, see [`GuestLayout::initial_regs`]): `rdi` table base,
/// `rsi` table length, `rdx` working-set base, `rbx` status slot, `rcx` table position,
/// `r8` lap offset, `r9` lap step, `r10` working-set pages. Scratch: `rax`, `r11`-`r13`.
/// Page written = `(table[pos] + lap) mod ws_pages`; when `pos` wraps, `lap` advances by the
/// lap step so a working set larger than the table is still covered.
///
/// Reproduce with `as --64 -o g.o g.S && objcopy -O binary -j .text g.o g.bin` from:
///
/// ```text
///     .intel_syntax noprefix
///     .code64
/// loop:
///     mov r12, [rbx + 16]         # batch (pages per exit), set by the VMM
///     mov rax, [rbx]              # counter: the value written into pages
///     cmp r12, 0
///     je done
/// page:
///     mov r11d, [rdi + rcx*4]     # page index from the table
///     add r11, r8                 # + lap offset
///     cmp r11, r10
///     jb 1f
///     sub r11, r10                # mod ws_pages (both terms < ws_pages)
/// 1:
///     shl r11, 12
///     add r11, rdx                # page address
///     mov r13, rcx
///     shl r13, 3
///     and r13, 0xff8              # offset in page varies with the position
///     mov [r11 + r13], rax
///     inc rcx
///     cmp rcx, rsi
///     jb 2f
///     mov rcx, 0                  # table wrapped: next lap
///     add r8, r9
///     cmp r8, r10
///     jb 2f
///     sub r8, r10
/// 2:
///     sub r12, 1
///     jne page
/// done:
///     inc qword ptr [rbx]         # progress counter
///     out 0x10, al                # exit to the VMM: pacing and pause point
///     jmp loop
/// ```
pub const GUEST_CODE: &[u8] = &[
    0x4c, 0x8b, 0x63, 0x10, 0x48, 0x8b, 0x03, 0x49, 0x83, 0xfc, 0x00, 0x74, 0x48, 0x44, 0x8b, 0x1c,
    0x8f, 0x4d, 0x01, 0xc3, 0x4d, 0x39, 0xd3, 0x72, 0x03, 0x4d, 0x29, 0xd3, 0x49, 0xc1, 0xe3, 0x0c,
    0x49, 0x01, 0xd3, 0x49, 0x89, 0xcd, 0x49, 0xc1, 0xe5, 0x03, 0x49, 0x81, 0xe5, 0xf8, 0x0f, 0x00,
    0x00, 0x4b, 0x89, 0x04, 0x2b, 0x48, 0xff, 0xc1, 0x48, 0x39, 0xf1, 0x72, 0x12, 0x48, 0xc7, 0xc1,
    0x00, 0x00, 0x00, 0x00, 0x4d, 0x01, 0xc8, 0x4d, 0x39, 0xd0, 0x72, 0x03, 0x4d, 0x29, 0xd0, 0x49,
    0x83, 0xec, 0x01, 0x75, 0xb8, 0x48, 0xff, 0x03, 0xe6, 0x10, 0xeb, 0xa4,
];

/// Most pages the guest writes between two pacing points.
pub const MAX_BATCH: u64 = 256;
/// Pacing period of an idle guest (dirty rate 0): the progress counter still moves.
pub const IDLE_EXIT_PERIOD: Duration = Duration::from_millis(5);
/// Pacing points per second a vCPU aims at: its batch is its share of the dirty rate divided
/// by this, between 1 and [`MAX_BATCH`] pages.
const TARGET_EXITS_PER_SEC: u64 = 1000;
/// How far a vCPU may fall behind its pacing schedule before the schedule restarts (so a slow
/// stretch is not followed by an unbounded burst).
pub const MAX_PACING_LAG: Duration = Duration::from_millis(50);

/// How the guest of `spec` is paced, whoever paces it (livemig's VMM at the guest's port
/// exit, or the guest itself on its TSC, see [`super::pvh_guest`]): pages per batch for each
/// vCPU (0 = idle) and the period of one batch.
pub fn pacing_step(spec: &VmSpec) -> (u64, Duration) {
    let rate = spec.workload.dirty_rate;
    if rate == 0 {
        return (0, IDLE_EXIT_PERIOD);
    }
    let vcpus = u64::from(spec.vcpus.max(1));
    let per_vcpu = rate.div_ceil(vcpus);
    let batch = per_vcpu.div_ceil(TARGET_EXITS_PER_SEC).clamp(1, MAX_BATCH);
    (
        batch,
        Duration::from_secs_f64(batch as f64 * vcpus as f64 / rate as f64),
    )
}

/// GDT: null, 64-bit code (type 0xb: execute/read, accessed; L=1), data (type 0x3; D/B=1).
pub const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Where everything of the guest program lives in RAM, derived from a [`VmSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    ram_bytes: u64,
    vcpus: u32,
    pattern: Pattern,
    table_len: u64,
    ws_base: u64,
    ws_pages: u64,
}

impl GuestLayout {
    /// Computes the layout for `spec`; the working set is clamped to fit in RAM.
    ///
    /// Fails with [`VmError::InvalidSpec`] for RAM under [`MIN_RAM_BYTES`] or over
    /// [`MAX_RAM_BYTES`], 0 or more than [`MAX_VCPUS`] vCPUs, or a dirty rate with an empty
    /// working set.
    pub fn new(spec: &VmSpec) -> Result<Self, VmError> {
        let ram_bytes = spec
            .memory_mib
            .checked_mul(1 << 20)
            .filter(|b| (MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(b))
            .ok_or_else(|| {
                VmError::InvalidSpec(format!(
                    "memory {} MiB outside {}..={} MiB",
                    spec.memory_mib,
                    MIN_RAM_BYTES >> 20,
                    MAX_RAM_BYTES >> 20
                ))
            })?;
        if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
            return Err(VmError::InvalidSpec(format!(
                "{} vCPUs outside 1..={MAX_VCPUS}",
                spec.vcpus
            )));
        }
        let wanted_pages = spec
            .workload
            .working_set_mib
            .saturating_mul(1 << 20)
            .min(ram_bytes)
            / PAGE_SIZE;
        if wanted_pages == 0 && spec.workload.dirty_rate > 0 {
            return Err(VmError::InvalidSpec(format!(
                "dirty rate {} pages/s with an empty working set",
                spec.workload.dirty_rate
            )));
        }
        // The table size depends on the working set and the working set's base on the table
        // size. Shrinking the working set only shrinks the table, so one correction suffices.
        let (_, first_base) = table_and_base(wanted_pages);
        let ws_pages = wanted_pages.min((ram_bytes - first_base) / PAGE_SIZE);
        let (table_len, ws_base) = table_and_base(ws_pages);
        Ok(GuestLayout {
            ram_bytes,
            vcpus: spec.vcpus,
            pattern: spec.workload.pattern,
            table_len,
            ws_base,
            ws_pages,
        })
    }

    /// Bytes of RAM the layout maps (guest-physical `0..ram_bytes`).
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Entries in the page-index table.
    pub fn table_len(&self) -> u64 {
        self.table_len
    }

    /// Guest-physical range of the working set (2 MiB aligned start).
    pub fn working_set(&self) -> Range<u64> {
        self.ws_base..self.ws_base + self.ws_pages * PAGE_SIZE
    }

    /// Pages in the working set.
    pub fn working_set_pages(&self) -> u64 {
        self.ws_pages
    }

    /// Guest-physical address of vCPU `vcpu`'s status slot.
    pub fn status_slot(&self, vcpu: u32) -> u64 {
        STATUS_ADDR + u64::from(vcpu) * STATUS_SLOT_SIZE
    }

    /// Number of page directories (one per started GiB of RAM).
    pub fn page_directories(&self) -> u64 {
        self.ram_bytes.div_ceil(GIB)
    }

    /// How far the guest's lap offset moves each time the table wraps: `table_len mod
    /// ws_pages`, so that sequential and random patterns sweep a working set the table cannot
    /// index alone; 0 for the hotspot pattern, whose hot pages must stay put.
    pub fn lap_step(&self) -> u64 {
        match self.pattern {
            Pattern::Hotspot => 0,
            Pattern::Sequential | Pattern::Random => self.table_len % self.ws_pages.max(1),
        }
    }

    /// The entry registers of vCPU `vcpu`: RIP at the code, RFLAGS = 2 (interrupts off) and
    /// the guest's parameters (see [`GUEST_CODE`]). Each vCPU starts at its own table offset.
    pub fn initial_regs(&self, vcpu: u32) -> kvm_regs {
        kvm_regs {
            rip: CODE_ADDR,
            rflags: 2,
            rdi: TABLE_ADDR,
            rsi: self.table_len,
            rdx: self.ws_base,
            rbx: self.status_slot(vcpu),
            rcx: u64::from(vcpu) * self.table_len / u64::from(self.vcpus),
            r8: 0,
            r9: self.lap_step(),
            r10: self.ws_pages.max(1),
            ..Default::default()
        }
    }

    /// The page-index table for this layout's pattern: every entry is below
    /// [`GuestLayout::working_set_pages`]. Deterministic (fixed PRNG seed).
    pub fn table_entries(&self) -> Vec<u32> {
        let ws = self.ws_pages.max(1);
        let mut rng = SplitMix64(0x6c69_7665_6d69_6721);
        let entry = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        (0..self.table_len)
            .map(|i| match self.pattern {
                Pattern::Sequential => entry(i % ws),
                Pattern::Random => entry(rng.below(ws)),
                Pattern::Hotspot => {
                    let hot = (ws / 10).max(1);
                    if hot == ws || rng.below(10) < 9 {
                        entry(rng.below(hot))
                    } else {
                        entry(hot + rng.below(ws - hot))
                    }
                }
            })
            .collect()
    }

    /// The 4-level page tables: `(gpa, bytes)` for the PML4, the PDPT and the page directories,
    /// identity-mapping `0..ram_bytes` with 2 MiB pages.
    pub fn page_tables(&self) -> Vec<(u64, Vec<u8>)> {
        let dirs = self.page_directories();
        let mut pml4 = vec![0u64; 512];
        pml4[0] = PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE;
        let mut pdpt = vec![0u64; 512];
        for (i, e) in pdpt.iter_mut().enumerate().take(dirs as usize) {
            *e = (PD_ADDR + i as u64 * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE;
        }
        let huge_pages = self.ram_bytes.div_ceil(HUGE_PAGE);
        let pds: Vec<u64> = (0..dirs * 512)
            .map(|i| {
                if i < huge_pages {
                    (i * HUGE_PAGE) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE
                } else {
                    0
                }
            })
            .collect();
        vec![
            (PML4_ADDR, le_words(&pml4)),
            (PDPT_ADDR, le_words(&pdpt)),
            (PD_ADDR, le_words(&pds)),
        ]
    }

    /// Writes the GDT, page tables, code, page-index table and status slots (counter 0,
    /// `batch` pages per exit) into `ram` through vm-memory (so the writes are recorded as
    /// VMM-side dirty pages). Call before the guest starts.
    pub fn write(&self, ram: &GuestRam, batch: u64) -> Result<(), VmError> {
        let mut gdt = le_words(&GDT);
        gdt.resize(PAGE_SIZE as usize, 0);
        write_bytes(ram, GDT_ADDR, &gdt)?;
        let mut status = vec![0u8; PAGE_SIZE as usize];
        for v in 0..self.vcpus {
            let at = (self.status_slot(v) - STATUS_ADDR + STATUS_BATCH) as usize;
            status[at..at + 8].copy_from_slice(&batch.to_le_bytes());
        }
        write_bytes(ram, STATUS_ADDR, &status)?;
        write_bytes(ram, CODE_ADDR, GUEST_CODE)?;
        for (gpa, bytes) in self.page_tables() {
            write_bytes(ram, gpa, &bytes)?;
        }
        let table: Vec<u8> = self
            .table_entries()
            .iter()
            .flat_map(|e| e.to_le_bytes())
            .collect();
        write_bytes(ram, TABLE_ADDR, &table)
    }
}

/// Table length and working-set base for a working set of `ws_pages` pages.
fn table_and_base(ws_pages: u64) -> (u64, u64) {
    let len = ws_pages.clamp(MIN_TABLE_ENTRIES, MAX_TABLE_ENTRIES);
    (len, (TABLE_ADDR + len * 4).next_multiple_of(HUGE_PAGE))
}

fn le_words(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn write_bytes(ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<(), VmError> {
    ram.memory()
        .write_slice(bytes, GuestAddress(gpa))
        .map_err(|e| VmError::GuestAccess {
            gpa,
            reason: e.to_string(),
        })
}

/// Turns the reset-state `sregs` of a vCPU into long mode for the guest program: 64-bit flat
/// code and data segments of the GDT at [`GDT_ADDR`], paging with CR3 at [`PML4_ADDR`].
pub fn set_long_mode(sregs: &mut kvm_sregs) {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Size of the blocks [`fill`] generates and copies.
const FILL_BLOCK: usize = 64 << 10;

/// Fills all of `ram` with `fill` content (varied by `seed`): [`Fill::Zero`] leaves it as
/// is, [`Fill::Random`] writes incompressible bytes, [`Fill::Text`] text-like compressible
/// bytes. Writes go through the host mappings (not recorded as VMM-side dirty pages) and use
/// every available core.
///
/// Call before the guest runs and before anything else reads or writes `ram`: the writes are
/// plain stores into guest memory.
pub fn fill(ram: &GuestRam, fill: Fill, seed: u64) {
    if fill == Fill::Zero {
        return;
    }
    let bank = if matches!(fill, Fill::Text | Fill::Mixed) {
        text_bank(seed)
    } else {
        Vec::new()
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    for (gpa, host, len) in ram.host_regions() {
        let len = len as usize;
        let blocks = len.div_ceil(FILL_BLOCK);
        let per_thread = blocks.div_ceil(threads);
        let base = HostPtr(host);
        let bank = &bank;
        std::thread::scope(|s| {
            for t in 0..threads {
                let first = t * per_thread;
                let last = ((t + 1) * per_thread).min(blocks);
                if first >= last {
                    continue;
                }
                let base = &base;
                s.spawn(move || {
                    let off = first * FILL_BLOCK;
                    let n = (last * FILL_BLOCK).min(len) - off;
                    // Fault the range in with one call: much cheaper than a fault per page
                    // (notably under nested virtualisation). Failure (kernel < 5.14) only
                    // means the writes below fault the pages in instead. Mixed RAM's zero
                    // blocks are left unwritten, holes, as a guest's never-used RAM is: only
                    // its data blocks are faulted in, one call each.
                    if fill != Fill::Mixed {
                        // SAFETY: the range lies inside the region's mapping (see below); the
                        // advice only populates pages, it does not change their content.
                        unsafe {
                            libc::madvise(base.0.add(off).cast(), n, libc::MADV_POPULATE_WRITE);
                        }
                    }
                    let mut buf = vec![0u64; FILL_BLOCK / 8];
                    for b in first..last {
                        let off = b * FILL_BLOCK;
                        let n = FILL_BLOCK.min(len - off);
                        let block_seed = seed ^ (gpa + off as u64).wrapping_mul(0x9e37_79b9);
                        // Mixed RAM: a third each of zero, text-like and random blocks.
                        let kind = match fill {
                            Fill::Mixed => [Fill::Zero, Fill::Text, Fill::Random]
                                [((gpa as usize + off) / FILL_BLOCK) % 3],
                            f => f,
                        };
                        if kind == Fill::Zero {
                            continue;
                        }
                        if fill == Fill::Mixed {
                            // SAFETY: as the call above, for this block.
                            unsafe {
                                libc::madvise(base.0.add(off).cast(), n, libc::MADV_POPULATE_WRITE);
                            }
                        }
                        let src: &[u8] = match kind {
                            Fill::Random => {
                                let mut rng = SplitMix64(block_seed);
                                buf.iter_mut().for_each(|w| *w = rng.next());
                                words_as_bytes(&buf)
                            }
                            _ => text_block(bank, block_seed, gpa + off as u64, &mut buf),
                        };
                        // SAFETY: `base.0 + off .. + n` lies inside the region's host mapping
                        // (`off + n <= len`), which stays mapped while `ram` is borrowed. The
                        // blocks of different threads are disjoint, and the caller guarantees
                        // no guest or other thread accesses RAM during the fill. `src` is a
                        // local buffer of at least `n` bytes, not overlapping guest RAM.
                        unsafe {
                            std::ptr::copy_nonoverlapping(src.as_ptr(), base.0.add(off), n);
                        }
                    }
                });
            }
        });
    }
}

/// A region's host address, shared with the fill threads.
struct HostPtr(*mut u8);
// SAFETY: the pointer is only used for writes to disjoint blocks while the mapping is kept
// alive by the `GuestRam` borrowed for the whole `thread::scope`.
unsafe impl Sync for HostPtr {}

fn words_as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and any u64 is 8 initialised bytes; the slice covers exactly
    // the memory of `words` and borrows it immutably for the returned lifetime.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// Distinct text blocks a [`Fill::Text`] RAM is built from.
const TEXT_BANK_BLOCKS: usize = 8;

/// Sentences of the text fill; most get one word swapped for a word of [`WORDS`], which
/// makes lz4 compress the result about 3.5x per 4 KiB page (4.4x per 64 KiB).
const PHRASES: &[&str] = &[
    "the guest keeps running while its memory is copied",
    "dirty pages are sent again in the next round",
    "the remaining set is small enough for a short pause",
    "compression saves network bandwidth",
    "each round harvests the dirty log",
    "the destination receives pages into guest memory",
    "virtual machine state moves after the last round",
    "the bitmap marks every page written since the last harvest",
];

const WORDS: &[&str] = &[
    "the",
    "guest",
    "memory",
    "page",
    "is",
    "copied",
    "to",
    "destination",
    "while",
    "vcpu",
    "keeps",
    "running",
    "and",
    "dirty",
    "pages",
    "are",
    "sent",
    "again",
    "in",
    "each",
    "round",
    "until",
    "remaining",
    "set",
    "small",
    "enough",
    "for",
    "a",
    "short",
    "pause",
    "of",
    "virtual",
    "machine",
    "state",
    "migration",
    "network",
    "bandwidth",
    "with",
    "compression",
    "log",
    "bitmap",
];

/// `TEXT_BANK_BLOCKS` blocks of text, each stored twice in a row so any rotation of a block
/// is one contiguous slice.
fn text_bank(seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64(seed ^ 0x7465_7874);
    let pick =
        |rng: &mut SplitMix64, list: &[&'static str]| list[rng.below(list.len() as u64) as usize];
    let mut bank = Vec::with_capacity(TEXT_BANK_BLOCKS * 2 * FILL_BLOCK);
    for _ in 0..TEXT_BANK_BLOCKS {
        let mut block = Vec::with_capacity(FILL_BLOCK + 128);
        while block.len() < FILL_BLOCK {
            let phrase = pick(&mut rng, PHRASES);
            let words = phrase.split(' ').count() as u64;
            let swap = if rng.below(10) < 7 {
                rng.below(words)
            } else {
                u64::MAX
            };
            for (i, w) in phrase.split(' ').enumerate() {
                if i > 0 {
                    block.push(b' ');
                }
                let w = if i as u64 == swap {
                    pick(&mut rng, WORDS)
                } else {
                    w
                };
                block.extend_from_slice(w.as_bytes());
            }
            block.extend_from_slice(if rng.below(10) < 3 { b".\n" } else { b". " });
        }
        block.truncate(FILL_BLOCK);
        bank.extend_from_slice(&block);
        bank.extend_from_slice(&block);
    }
    bank
}

/// One block of text: a rotation of a bank block chosen by `seed`, stamped with its address so
/// blocks differ from each other.
fn text_block<'a>(bank: &[u8], seed: u64, gpa: u64, buf: &'a mut [u64]) -> &'a [u8] {
    let mut rng = SplitMix64(seed);
    let which = rng.below(TEXT_BANK_BLOCKS as u64) as usize;
    let rot = rng.below(FILL_BLOCK as u64) as usize;
    let start = which * 2 * FILL_BLOCK + rot;
    // SAFETY: `buf` is FILL_BLOCK bytes of u64s; any byte pattern is a valid u64, and the
    // mutable byte view is the only access to `buf` while it lives.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), FILL_BLOCK) };
    bytes.copy_from_slice(&bank[start..start + FILL_BLOCK]);
    let stamp = format!("\n[{gpa:#x}]\n");
    bytes[..stamp.len()].copy_from_slice(stamp.as_bytes());
    bytes
}

/// SplitMix64: small, fast, good enough for fill content and page orders.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Populate, RamLayout};
    use crate::vm::Workload;

    fn spec(memory_mib: u64, vcpus: u32, ws_mib: u64, pattern: Pattern) -> VmSpec {
        VmSpec {
            memory_mib,
            vcpus,
            fill: Fill::Zero,
            workload: Workload {
                working_set_mib: ws_mib,
                dirty_rate: 1000,
                pattern,
            },
        }
    }

    fn entry(bytes: &[u8], i: u64) -> u64 {
        let at = (i * 8) as usize;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn page_tables_identity_map_all_ram() {
        for mib in [8, 1000, 1024, 3 * 1024 + 2, 64 * 1024] {
            let l = GuestLayout::new(&spec(mib, 1, 4, Pattern::Sequential)).unwrap();
            let tables = l.page_tables();
            let (pml4, pdpt, pds) = (&tables[0].1, &tables[1].1, &tables[2].1);
            assert_eq!(tables[2].0, PD_ADDR);
            assert!(
                PD_ADDR + pds.len() as u64 <= TABLE_ADDR,
                "page directories fit"
            );
            // Walk the tables for a sample of addresses, as the MMU would.
            let ram = l.ram_bytes();
            let samples = [0, 0x1234, HUGE_PAGE, GIB + 5 * HUGE_PAGE + 7, ram - 1];
            for gpa in samples.into_iter().filter(|&g| g < ram) {
                let e4 = entry(pml4, (gpa >> 39) & 511);
                assert_eq!(e4 & !0xfff, PDPT_ADDR);
                let e3 = entry(pdpt, (gpa >> 30) & 511);
                assert_eq!(e3 & 3, 3);
                let pd_index = (e3 & !0xfff) - PD_ADDR;
                let e2 = entry(&pds[pd_index as usize..], (gpa >> 21) & 511);
                assert_eq!(e2 & 0x83, 0x83, "present, writable, 2 MiB page");
                assert_eq!((e2 & !0x1f_ffff) + (gpa & 0x1f_ffff), gpa, "identity");
            }
            // Nothing beyond RAM is mapped.
            let mapped = pds.chunks(8).filter(|e| e != &[0u8; 8]).count() as u64;
            assert_eq!(mapped, ram.div_ceil(HUGE_PAGE));
        }
    }

    #[test]
    fn layout_rejects_bad_specs_and_clamps_the_working_set() {
        let bad = [
            spec(7, 1, 1, Pattern::Sequential),
            spec(64 * 1024 + 1, 1, 1, Pattern::Sequential),
            spec(u64::MAX, 1, 1, Pattern::Sequential),
            spec(32, 0, 1, Pattern::Sequential),
            spec(32, MAX_VCPUS + 1, 1, Pattern::Sequential),
            spec(32, 1, 0, Pattern::Sequential),
        ];
        for s in bad {
            assert!(
                matches!(GuestLayout::new(&s), Err(VmError::InvalidSpec(_))),
                "{s:?}"
            );
        }
        let l = GuestLayout::new(&spec(8, MAX_VCPUS, 1 << 40, Pattern::Random)).unwrap();
        assert_eq!(l.working_set(), 2 << 20..8 << 20);
        assert_eq!(l.table_len(), MIN_TABLE_ENTRIES);
        let big = GuestLayout::new(&spec(64 * 1024, 1, 64 * 1024, Pattern::Random)).unwrap();
        assert_eq!(big.table_len(), MAX_TABLE_ENTRIES);
        assert_eq!(big.working_set().start, 6 << 20);
        assert_eq!(big.working_set().end, 64 << 30);
        let small = GuestLayout::new(&spec(32, 2, 1, Pattern::Sequential)).unwrap();
        assert_eq!(small.table_len(), MIN_TABLE_ENTRIES);
        assert_eq!(small.working_set(), 2 << 20..3 << 20);
        assert_eq!(small.lap_step(), MIN_TABLE_ENTRIES % 256);
        assert_eq!(small.initial_regs(1).rcx, MIN_TABLE_ENTRIES / 2);
        assert_eq!(small.initial_regs(1).rbx, STATUS_ADDR + STATUS_SLOT_SIZE);
    }

    #[test]
    fn table_follows_the_pattern() {
        let seq = GuestLayout::new(&spec(64, 1, 32, Pattern::Sequential)).unwrap();
        let t = seq.table_entries();
        assert_eq!(t.len() as u64, seq.working_set_pages());
        assert!(t.iter().enumerate().all(|(i, &e)| e as usize == i));

        let small = GuestLayout::new(&spec(64, 1, 1, Pattern::Sequential)).unwrap();
        let t = small.table_entries();
        assert!(t.iter().enumerate().all(|(i, &e)| e as usize == i % 256));

        let rnd = GuestLayout::new(&spec(64, 1, 16, Pattern::Random)).unwrap();
        let t = rnd.table_entries();
        let ws = rnd.working_set_pages();
        assert!(t.iter().all(|&e| u64::from(e) < ws));
        let distinct: std::collections::HashSet<_> = t.iter().collect();
        // Uniform draws of n from n cover about 1 - 1/e of the pages.
        assert!(
            distinct.len() as f64 > 0.55 * ws as f64,
            "{}",
            distinct.len()
        );

        let hot = GuestLayout::new(&spec(256, 1, 100, Pattern::Hotspot)).unwrap();
        let t = hot.table_entries();
        let ws = hot.working_set_pages();
        assert!(t.iter().all(|&e| u64::from(e) < ws));
        let in_hot = t.iter().filter(|&&e| u64::from(e) < ws / 10).count();
        let share = in_hot as f64 / t.len() as f64;
        assert!((0.88..0.92).contains(&share), "hot share {share}");
        assert_eq!(hot.lap_step(), 0);
    }

    #[test]
    fn write_puts_layout_in_ram() {
        let s = spec(16, 2, 4, Pattern::Sequential);
        let l = GuestLayout::new(&s).unwrap();
        let ram = GuestRam::new(&RamLayout::single(16 << 20), Populate::Lazy).unwrap();
        fill(&ram, Fill::Random, 1);
        l.write(&ram, 7).unwrap();
        let m = ram.memory();
        let mut code = vec![0u8; GUEST_CODE.len()];
        m.read_slice(&mut code, GuestAddress(CODE_ADDR)).unwrap();
        assert_eq!(code, GUEST_CODE);
        for v in 0..2 {
            let slot = l.status_slot(v);
            assert_eq!(m.read_obj::<u64>(GuestAddress(slot)).unwrap(), 0);
            assert_eq!(
                m.read_obj::<u64>(GuestAddress(slot + STATUS_BATCH))
                    .unwrap(),
                7
            );
        }
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(GDT_ADDR + 8)).unwrap(),
            GDT[1]
        );
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(TABLE_ADDR + 4 * 9)).unwrap(),
            9
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(),
            PDPT_ADDR | 3
        );
        // The layout writes are VMM-side dirty pages; the fill is not.
        let dirty = ram.take_vmm_dirty(0);
        let is =
            |gpa: u64| dirty[(gpa / PAGE_SIZE / 64) as usize] >> (gpa / PAGE_SIZE % 64) & 1 == 1;
        assert!(is(GDT_ADDR) && is(STATUS_ADDR) && is(CODE_ADDR) && is(TABLE_ADDR));
        assert!(!is(l.working_set().start));
    }

    #[test]
    fn fill_random_and_text() {
        let ram = GuestRam::new(&RamLayout::single(4 << 20), Populate::Lazy).unwrap();
        fill(&ram, Fill::Random, 42);
        let mut a = vec![0u8; 8192];
        ram.memory()
            .read_slice(&mut a, GuestAddress(1 << 20))
            .unwrap();
        let zeros = a.iter().filter(|&&b| b == 0).count();
        assert!(zeros < 100, "random bytes are rarely zero ({zeros})");
        assert_ne!(a[..4096], a[4096..]);

        fill(&ram, Fill::Text, 42);
        ram.memory()
            .read_slice(&mut a, GuestAddress(1 << 20))
            .unwrap();
        assert!(a
            .iter()
            .all(|b| b.is_ascii_lowercase() || b" .\n[]0x".contains(b) || b.is_ascii_hexdigit()));
        let mut b = vec![0u8; 8192];
        ram.memory()
            .read_slice(&mut b, GuestAddress(2 << 20))
            .unwrap();
        assert_ne!(a, b, "blocks differ");
        // Text is made of a few dozen words: a crude compressibility proxy is the number of
        // distinct 4-byte substrings, far below that of random data.
        let grams: std::collections::HashSet<&[u8]> = a.windows(4).collect();
        assert!(
            grams.len() < a.len() / 4,
            "{} distinct 4-grams",
            grams.len()
        );
    }
}
