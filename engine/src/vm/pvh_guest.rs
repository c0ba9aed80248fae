//! The built-in guest as a bootable PVH ELF, for other VMMs: QEMU runs it from `-kernel`
//! (the benchmark's comparison), with the same page-index table, working set, batch and rate
//! as livemig's built-in guest ([`super::builtin_guest`]). Only the pacing differs: here the
//! guest paces itself on its TSC, sleeping (`hlt`) between batches on a 2 kHz PIT tick,
//! instead of exiting to the VMM after each batch — so a VMM that knows nothing of the guest
//! sees the same dirtying, and the guest costs its host about as little CPU as under livemig.
//!
//! PVH (Xen's direct-boot protocol, which QEMU follows for an ELF with the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note) enters in 32-bit protected mode, paging and interrupts off.
//! The ELF loads two segments, both at or above 1 MiB, because QEMU places them before the
//! firmware runs and SeaBIOS then uses low memory (its stack sits at 0x7000; a first version
//! with the built-in guest's low layout found its GDT and page tables overwritten):
//!
//! | GPA | content |
//! |---|---|
//! | [`TABLE_ADDR`] | the page-index table, as in the built-in guest (above the working set when the boot block finds no room below it) |
//! | boot block (4 KiB aligned, after the table, before the working set's 2 MiB boundary) | +0 code ([`PVH_CODE`]), +0x200 GDTR, +0x206 IDTR, +0x210 parameters, +0x280 GDT, +0x2c0 status slot (counter at +0, batch at +16), +0x300 IDT, stack below +0x1000, +0x1000 PML4, +0x2000 PDPT, +0x3000 page directories |
//! | the working set | as in the built-in guest |
//!
//! The guest's progress counter is at [`PvhGuest::status_gpa`]; one vCPU only.

use super::builtin_guest::{
    pacing_step, GuestLayout, VmSpec, GDT as GDT_ENTRIES, MAX_PACING_LAG, TABLE_ADDR,
};
use super::VmError;
use crate::memory::PAGE_SIZE;

/// The program, assembled at offset 0 of the boot block. The 32-bit immediates at
/// the relocation offsets are block-relative and get the block's address added; the 64-bit part
/// addresses the block RIP-relative.
///
/// Register use in the loop (as [`super::builtin_guest::GUEST_CODE`], except `r9` working-set
/// base and `rbp` lap step, since `rdtsc` writes `rdx`): `rdi` table, `rsi` table length,
/// `rbx` status slot, `rcx` table position, `r8` lap offset, `r10` working-set pages,
/// `r14` TSC deadline of the next batch, `r15` TSC ticks per batch.
///
/// Reproduce with `as --64 -o b.o b.S && ld -m elf_x86_64 -Ttext=0 -o b.elf b.o &&
/// objcopy -O binary -j .text b.elf b.bin` (first 0x191 bytes) from:
///
/// ```text
///     .intel_syntax noprefix
///     .code32
/// _start:                         # PVH entry: 32-bit, paging and interrupts off
///     cli
///     lgdt [gdtr]
///     mov eax, cr4
///     or eax, 0x20                # PAE
///     mov cr4, eax
///     mov eax, offset pml4
///     mov cr3, eax
///     mov ecx, 0xC0000080         # EFER.LME
///     rdmsr
///     or eax, 0x100
///     wrmsr
///     mov eax, cr0
///     or eax, 0x80000001          # PG | PE
///     mov cr0, eax
///     ljmp 0x08, offset long
///     .org 0x40
///     .code64
/// long:
///     mov eax, 0x10
///     mov ds, eax
///     mov es, eax
///     mov ss, eax
///     lea rsp, [rip + stack_top]
///     lea rax, [rip + tick]       # IDT: 48 interrupt gates, all to tick
///     lea rdi, [rip + idt]
///     mov ecx, 48
/// 3:
///     mov word ptr [rdi], ax
///     mov word ptr [rdi + 2], 0x08
///     mov word ptr [rdi + 4], 0x8e00
///     mov rdx, rax
///     shr rdx, 16
///     mov word ptr [rdi + 6], dx
///     shr rdx, 16
///     mov dword ptr [rdi + 8], edx
///     mov dword ptr [rdi + 12], 0
///     add rdi, 16
///     dec ecx
///     jne 3b
///     lidt [rip + idtr]
///     mov al, 0x11                # 8259s: vectors 0x20/0x28, only IRQ 0 unmasked
///     out 0x20, al
///     out 0xa0, al
///     mov al, 0x20
///     out 0x21, al
///     mov al, 0x28
///     out 0xa1, al
///     mov al, 4
///     out 0x21, al
///     mov al, 2
///     out 0xa1, al
///     mov al, 1
///     out 0x21, al
///     out 0xa1, al
///     mov al, 0xfe
///     out 0x21, al
///     mov al, 0xff
///     out 0xa1, al
///     mov al, 0x34                # PIT channel 0, rate generator, 1193182 / 597 = 2 kHz
///     out 0x43, al
///     mov al, 0x55
///     out 0x40, al
///     mov al, 0x02
///     out 0x40, al
///     sti
///     mov rdi, [rip + p_table]
///     mov rsi, [rip + p_table_len]
///     mov r9, [rip + p_ws_base]
///     lea rbx, [rip + status]
///     mov rbp, [rip + p_lap_step]
///     mov r10, [rip + p_ws_pages]
///     mov r15, [rip + p_ticks]
///     xor ecx, ecx
///     xor r8d, r8d
///     rdtsc
///     shl rdx, 32
///     or rax, rdx
///     mov r14, rax
/// loop:                           # one batch, as the built-in guest
///     mov r12, [rbx + 16]
///     mov rax, [rbx]
///     test r12, r12
///     je done
/// page:
///     mov r11d, [rdi + rcx*4]
///     add r11, r8
///     cmp r11, r10
///     jb 1f
///     sub r11, r10
/// 1:
///     shl r11, 12
///     add r11, r9
///     mov r13, rcx
///     shl r13, 3
///     and r13, 0xff8
///     mov [r11 + r13], rax
///     inc rcx
///     cmp rcx, rsi
///     jb 2f
///     xor ecx, ecx
///     add r8, rbp
///     cmp r8, r10
///     jb 2f
///     sub r8, r10
/// 2:
///     sub r12, 1
///     jne page
/// done:
///     inc qword ptr [rbx]
///     add r14, r15                # the next batch is due one period later
/// wait:
///     rdtsc
///     shl rdx, 32
///     or rax, rdx
///     cmp rax, r14
///     jae late
///     hlt                         # until the next tick
///     jmp wait
/// late:                           # due: run it, unless too far behind (then start afresh)
///     sub rax, r14
///     cmp rax, [rip + p_max_lag]
///     jb loop
///     add rax, r14
///     mov r14, rax
///     jmp loop
/// tick:
///     push rax
///     mov al, 0x20                # end of interrupt
///     out 0x20, al
///     pop rax
///     iretq
///     .org 0x200
/// gdtr: .word 23
///     .long gdt
///     .org 0x206
/// idtr: .word 48 * 16 - 1
///     .quad idt
///     .org 0x210
/// p_table: .quad 0
/// p_table_len: .quad 0
/// p_ws_base: .quad 0
/// p_lap_step: .quad 0
/// p_ws_pages: .quad 0
/// p_ticks: .quad 0
/// p_max_lag: .quad 0
///     .org 0x280
/// gdt: .quad 0, 0x00af9b000000ffff, 0x00cf93000000ffff
///     .org 0x2c0
/// status: .quad 0, 0, 0, 0, 0, 0, 0, 0
///     .org 0x300
/// idt:
///     .org 0x1000
/// stack_top:
/// pml4:
/// ```
pub const PVH_CODE: &[u8] = &[
    0xfa, 0x0f, 0x01, 0x15, 0x00, 0x02, 0x00, 0x00, 0x0f, 0x20, 0xe0, 0x83, 0xc8, 0x20, 0x0f, 0x22,
    0xe0, 0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32,
    0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x0d, 0x01, 0x00, 0x00, 0x80, 0x0f,
    0x22, 0xc0, 0xea, 0x40, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xb8, 0x10, 0x00, 0x00, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0x48, 0x8d, 0x25, 0xae, 0x0f,
    0x00, 0x00, 0x48, 0x8d, 0x05, 0x30, 0x01, 0x00, 0x00, 0x48, 0x8d, 0x3d, 0xa0, 0x02, 0x00, 0x00,
    0xb9, 0x30, 0x00, 0x00, 0x00, 0x66, 0x89, 0x07, 0x66, 0xc7, 0x47, 0x02, 0x08, 0x00, 0x66, 0xc7,
    0x47, 0x04, 0x00, 0x8e, 0x48, 0x89, 0xc2, 0x48, 0xc1, 0xea, 0x10, 0x66, 0x89, 0x57, 0x06, 0x48,
    0xc1, 0xea, 0x10, 0x89, 0x57, 0x08, 0xc7, 0x47, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x48, 0x83, 0xc7,
    0x10, 0xff, 0xc9, 0x75, 0xd0, 0x0f, 0x01, 0x1d, 0x6a, 0x01, 0x00, 0x00, 0xb0, 0x11, 0xe6, 0x20,
    0xe6, 0xa0, 0xb0, 0x20, 0xe6, 0x21, 0xb0, 0x28, 0xe6, 0xa1, 0xb0, 0x04, 0xe6, 0x21, 0xb0, 0x02,
    0xe6, 0xa1, 0xb0, 0x01, 0xe6, 0x21, 0xe6, 0xa1, 0xb0, 0xfe, 0xe6, 0x21, 0xb0, 0xff, 0xe6, 0xa1,
    0xb0, 0x34, 0xe6, 0x43, 0xb0, 0x55, 0xe6, 0x40, 0xb0, 0x02, 0xe6, 0x40, 0xfb, 0x48, 0x8b, 0x3d,
    0x3c, 0x01, 0x00, 0x00, 0x48, 0x8b, 0x35, 0x3d, 0x01, 0x00, 0x00, 0x4c, 0x8b, 0x0d, 0x3e, 0x01,
    0x00, 0x00, 0x48, 0x8d, 0x1d, 0xd7, 0x01, 0x00, 0x00, 0x48, 0x8b, 0x2d, 0x38, 0x01, 0x00, 0x00,
    0x4c, 0x8b, 0x15, 0x39, 0x01, 0x00, 0x00, 0x4c, 0x8b, 0x3d, 0x3a, 0x01, 0x00, 0x00, 0x31, 0xc9,
    0x45, 0x31, 0xc0, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x49, 0x89, 0xc6, 0x4c,
    0x8b, 0x63, 0x10, 0x48, 0x8b, 0x03, 0x4d, 0x85, 0xe4, 0x74, 0x43, 0x44, 0x8b, 0x1c, 0x8f, 0x4d,
    0x01, 0xc3, 0x4d, 0x39, 0xd3, 0x72, 0x03, 0x4d, 0x29, 0xd3, 0x49, 0xc1, 0xe3, 0x0c, 0x4d, 0x01,
    0xcb, 0x49, 0x89, 0xcd, 0x49, 0xc1, 0xe5, 0x03, 0x49, 0x81, 0xe5, 0xf8, 0x0f, 0x00, 0x00, 0x4b,
    0x89, 0x04, 0x2b, 0x48, 0xff, 0xc1, 0x48, 0x39, 0xf1, 0x72, 0x0d, 0x31, 0xc9, 0x49, 0x01, 0xe8,
    0x4d, 0x39, 0xd0, 0x72, 0x03, 0x4d, 0x29, 0xd0, 0x49, 0x83, 0xec, 0x01, 0x75, 0xbd, 0x48, 0xff,
    0x03, 0x4d, 0x01, 0xfe, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x4c, 0x39, 0xf0,
    0x73, 0x03, 0xf4, 0xeb, 0xef, 0x4c, 0x29, 0xf0, 0x48, 0x3b, 0x05, 0xc1, 0x00, 0x00, 0x00, 0x72,
    0x8e, 0x4c, 0x01, 0xf0, 0x49, 0x89, 0xc6, 0xeb, 0x86, 0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0x48,
    0xcf,
];

/// Offsets in the boot block of the block-relative addresses to relocate: `(offset, bytes)`
/// for the `lgdt` operand, the PML4 address, the far jump's target, the GDTR's base and the
/// IDTR's base.
const RELOCATIONS: [(usize, usize); 5] = [(4, 4), (0x12, 4), (0x33, 4), (0x202, 4), (0x208, 8)];
/// Boot-block offsets of the GDTR, the IDTR's limit, the parameters, the GDT and the status slot.
const GDTR: usize = 0x200;
const IDTR: usize = 0x206;
const PARAMS: usize = 0x210;
const GDT: usize = 0x280;
const STATUS: usize = 0x2c0;
/// Boot-block offset of the PML4 (then the PDPT, then the page directories).
const PML4: u64 = 0x1000;
/// Kept clear at the top of RAM below 4 GiB: SeaBIOS's own data lives there (it relocated
/// itself about 16 MiB below the top of a 256 MiB VM).
const FIRMWARE_HIGH: u64 = 32 << 20;
/// Where QEMU's `pc` machine ends RAM below 4 GiB when it has 3.5 GiB or more (the rest goes
/// above 4 GiB); with less, all of RAM is below. The working set and the boot block must lie
/// below it.
pub const PC_LOW_RAM_SPLIT: u64 = 3 << 30;
/// Xen's ELF note type for the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// A PVH ELF of the built-in guest and where to watch it.
#[derive(Debug, Clone)]
pub struct PvhGuest {
    /// The ELF file's bytes.
    pub elf: Vec<u8>,
    /// Guest-physical address of the progress counter (`u64`, +1 per batch).
    pub status_gpa: u64,
    /// Pages per batch (0: idle).
    pub batch: u64,
    /// TSC ticks per batch.
    pub ticks_per_batch: u64,
}

/// The built-in guest of `spec` as a PVH ELF whose guest paces itself on a TSC running at
/// `tsc_hz` (the host's: QEMU's TCG and KVM both give the guest the host's TSC rate; see
/// [`measure_tsc_hz`]).
///
/// Fails for more than one vCPU, a working set reaching past QEMU's RAM below 4 GiB (see
/// [`PC_LOW_RAM_SPLIT`]), or no room for the boot block: between the table and the working set,
/// or else (a table ending on the working set's 2 MiB boundary: a 1 GiB working set) for table
/// and block above the working set.
pub fn pvh_guest(spec: &VmSpec, tsc_hz: u64) -> Result<PvhGuest, VmError> {
    if spec.vcpus != 1 {
        return Err(VmError::InvalidSpec(format!(
            "the PVH guest runs on one vCPU, not {}",
            spec.vcpus
        )));
    }
    let layout = GuestLayout::new(spec)?;
    let ram = layout.ram_bytes();
    let low = if ram >= PC_LOW_RAM_SPLIT + (512 << 20) {
        PC_LOW_RAM_SPLIT
    } else {
        ram
    };
    let ws = layout.working_set();
    if ws.end > low {
        return Err(VmError::InvalidSpec(format!(
            "the PVH guest's working set must end below {} MiB, where QEMU's pc machine splits \
             {} MiB of RAM (it ends at {} MiB)",
            low >> 20,
            ram >> 20,
            ws.end >> 20
        )));
    }
    let dirs = layout.page_directories();
    let block_len = PML4 + (2 + dirs) * PAGE_SIZE;
    let table_end = (TABLE_ADDR + layout.table_len() * 4).next_multiple_of(PAGE_SIZE);
    // QEMU hands the ELF's whole span, lowest to highest loaded byte, to its loader ROM,
    // which copies it after the firmware ran: the span must not cover the working set, or its
    // fill would be overwritten with zeros. The block goes in the slack between the table and
    // the working set's 2 MiB boundary; where there is none (a table ending on it), table and
    // block go above the working set instead (the guest finds its table through its
    // parameters), clear of the firmware's data at the top of low RAM.
    let table_bytes = layout.table_len() * 4;
    let (table_at, base) = if table_end + block_len <= ws.start {
        (TABLE_ADDR, table_end)
    } else {
        let table_at = ws.end.next_multiple_of(PAGE_SIZE);
        let base = (table_at + table_bytes).next_multiple_of(PAGE_SIZE);
        if base + block_len + FIRMWARE_HIGH > low {
            return Err(VmError::InvalidSpec(format!(
                "no room for the PVH guest's page-index table and boot block ({} KiB) beside its \
                 {} MiB working set in {} MiB of RAM below 4 GiB",
                (table_bytes + block_len) >> 10,
                (ws.end - ws.start) >> 20,
                low >> 20
            )));
        }
        (table_at, base)
    };

    let (batch, period) = pacing_step(spec);
    let ticks_per_batch = ((period.as_secs_f64() * tsc_hz as f64) as u64).max(1);
    let max_lag = (MAX_PACING_LAG.as_secs_f64() * tsc_hz as f64) as u64;

    let mut block = vec![0u8; block_len as usize];
    block[..PVH_CODE.len()].copy_from_slice(PVH_CODE);
    put(&mut block, GDTR, &23u16.to_le_bytes());
    put(&mut block, GDTR + 2, &(GDT as u32).to_le_bytes());
    put(&mut block, IDTR, &(48u16 * 16 - 1).to_le_bytes());
    put(&mut block, IDTR + 2, &0x300u64.to_le_bytes());
    let params = [
        table_at,
        layout.table_len(),
        ws.start,
        layout.lap_step(),
        layout.working_set_pages().max(1),
        ticks_per_batch,
        max_lag,
    ];
    for (i, p) in params.iter().enumerate() {
        put(&mut block, PARAMS + 8 * i, &p.to_le_bytes());
    }
    for (i, g) in GDT_ENTRIES.iter().enumerate() {
        put(&mut block, GDT + 8 * i, &g.to_le_bytes());
    }
    put(&mut block, STATUS + 16, &batch.to_le_bytes());
    for (at, bytes) in RELOCATIONS {
        let mut v = [0u8; 8];
        v[..bytes].copy_from_slice(&block[at..at + bytes]);
        let moved = u64::from_le_bytes(v) + base;
        put(&mut block, at, &moved.to_le_bytes()[..bytes]);
    }
    // Page tables: the built-in guest's identity map, at the block's own addresses.
    let entry = |addr: u64| (addr | 0b11).to_le_bytes();
    put(&mut block, PML4 as usize, &entry(base + PML4 + PAGE_SIZE));
    for d in 0..dirs {
        put(
            &mut block,
            (PML4 + PAGE_SIZE + 8 * d) as usize,
            &entry(base + PML4 + (2 + d) * PAGE_SIZE),
        );
    }
    let huge = 2u64 << 20;
    for i in 0..ram.div_ceil(huge) {
        let at = (PML4 + 2 * PAGE_SIZE + 8 * i) as usize;
        put(&mut block, at, &((i * huge) | 0x83).to_le_bytes());
    }

    let table: Vec<u8> = layout
        .table_entries()
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    Ok(PvhGuest {
        elf: elf64(base, &[(base, &block), (table_at, &table)]),
        status_gpa: base + STATUS as u64,
        batch,
        ticks_per_batch,
    })
}

fn put(block: &mut [u8], at: usize, bytes: &[u8]) {
    block[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A minimal ELF64 executable: the Xen PVH entry note and one loadable segment per
/// `(address, bytes)`.
fn elf64(entry: u64, segments: &[(u64, &[u8])]) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let mut note = Vec::new();
    for v in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(entry as u32).to_le_bytes());
    let phnum = segments.len() as u64 + 1;
    let mut offset = EHDR + PHDR * phnum;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&EHDR.to_le_bytes()); // program headers right after
    out.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in [EHDR as u16, PHDR as u16, phnum as u16, 64, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |out: &mut Vec<u8>, kind: u32, flags: u32, addr: u64, len: u64, off: u64| {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        for v in [off, addr, addr, len, len, 4] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut out, 4, 4, 0, note.len() as u64, offset); // PT_NOTE, readable
    offset += note.len() as u64;
    for (addr, bytes) in segments {
        phdr(&mut out, 1, 7, *addr, bytes.len() as u64, offset); // PT_LOAD, rwx
        offset += bytes.len() as u64;
    }
    out.extend_from_slice(&note);
    for (_, bytes) in segments {
        out.extend_from_slice(bytes);
    }
    out
}

/// The host's TSC rate in Hz, timed against the monotonic clock over `window`.
pub fn measure_tsc_hz(window: std::time::Duration) -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (std::time::Instant::now(), tsc());
    std::thread::sleep(window);
    let (c1, t1) = (tsc(), std::time::Instant::now());
    (c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{Pattern, Workload};

    fn spec(memory_mib: u64, working_set_mib: u64, dirty_rate: u64) -> VmSpec {
        VmSpec {
            memory_mib,
            workload: Workload {
                working_set_mib,
                dirty_rate,
                pattern: Pattern::Random,
            },
            ..VmSpec::default()
        }
    }

    fn u(b: &[u8], at: usize, n: usize) -> u64 {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&b[at..at + n]);
        u64::from_le_bytes(v)
    }

    /// `(type, file offset, address, size)` of each program header.
    fn segments(elf: &[u8]) -> Vec<(u32, usize, u64, usize)> {
        let (phoff, phnum) = (u(elf, 32, 8) as usize, u(elf, 56, 2) as usize);
        (0..phnum)
            .map(|i| {
                let p = phoff + 56 * i;
                let kind = u(elf, p, 4) as u32;
                (
                    kind,
                    u(elf, p + 8, 8) as usize,
                    u(elf, p + 16, 8),
                    u(elf, p + 32, 8) as usize,
                )
            })
            .collect()
    }

    #[test]
    fn the_elf_has_the_pvh_entry_note_and_loads_nothing_below_1_mib() {
        let s = spec(256, 64, 10_000);
        let g = pvh_guest(&s, 2_000_000_000).unwrap();
        let elf = &g.elf;
        assert_eq!(&elf[..4], b"\x7fELF");
        let segs = segments(elf);
        let (_, note_off, _, note_len) = segs[0];
        assert_eq!(segs[0].0, 4, "the first header is the note");
        let note = &elf[note_off..note_off + note_len];
        assert_eq!(u(note, 8, 4), 18, "XEN_ELFNOTE_PHYS32_ENTRY");
        assert_eq!(&note[12..16], b"Xen\0");
        let entry = u(note, 16, 4);
        let loads: Vec<_> = segs.iter().filter(|s| s.0 == 1).collect();
        assert_eq!(loads.len(), 2);
        assert!(loads.iter().all(|s| s.2 >= 1 << 20), "{loads:?}");
        // The entry is the boot block, which holds the code, relocated.
        let block = loads
            .iter()
            .find(|s| s.2 == entry)
            .expect("the entry's segment");
        let b = &elf[block.1..block.1 + block.3];
        assert_eq!(&b[..0x191][..4], &PVH_CODE[..4]);
        assert_eq!(u(b, 4, 4), entry + GDTR as u64, "lgdt operand");
        assert_eq!(u(b, 0x12, 4), entry + PML4, "CR3");
        assert_eq!(u(b, 0x33, 4), entry + 0x40, "far jump into 64-bit code");
        assert_eq!(u(b, GDTR + 2, 4), entry + GDT as u64);
        assert_eq!(u(b, IDTR + 2, 8), entry + 0x300);
        assert_eq!(g.status_gpa, entry + STATUS as u64);
        // Same table, working set and batch as the built-in guest of the same spec.
        let layout = GuestLayout::new(&s).unwrap();
        assert_eq!(u(b, PARAMS, 8), TABLE_ADDR);
        assert_eq!(u(b, PARAMS + 8, 8), layout.table_len());
        assert_eq!(u(b, PARAMS + 16, 8), layout.working_set().start);
        assert_eq!(u(b, PARAMS + 32, 8), layout.working_set_pages());
        assert_eq!(u(b, STATUS + 16, 8), pacing_step(&s).0);
        assert_eq!(g.batch, 10);
        assert_eq!(
            g.ticks_per_batch, 2_000_000,
            "10 pages at 10 000/s: 1 ms of a 2 GHz TSC"
        );
        let table = loads.iter().find(|s| s.2 == TABLE_ADDR).unwrap();
        let entries: Vec<u32> = layout.table_entries();
        assert_eq!(table.3, entries.len() * 4);
        assert_eq!(u(elf, table.1 + 4, 4), u64::from(entries[1]));
        // The block lies outside the working set.
        let ws = layout.working_set();
        assert!(entry + block.3 as u64 <= ws.start || entry >= ws.end);
    }

    #[test]
    fn a_table_that_fills_its_2_mib_moves_above_the_working_set_with_the_block() {
        // 1 GiB of working set: a table of 1 MiB ends at the working set's start.
        let s = spec(1536, 1024, 1000);
        let g = pvh_guest(&s, 1_000_000_000).unwrap();
        let layout = GuestLayout::new(&s).unwrap();
        let ws = layout.working_set();
        let segs = segments(&g.elf);
        let loads: Vec<_> = segs.iter().filter(|s| s.0 == 1).collect();
        assert!(loads.iter().all(|s| s.2 >= ws.end), "{loads:?} vs {ws:x?}");
        let table = loads
            .iter()
            .find(|s| s.3 == layout.table_len() as usize * 4)
            .unwrap();
        let block = loads.iter().find(|s| s.2 == g.status_gpa & !0xfff).unwrap();
        assert_eq!(
            u(&g.elf, block.1 + PARAMS, 8),
            table.2,
            "the guest's table address"
        );
    }

    #[test]
    fn what_the_pvh_guest_cannot_be_is_refused_clearly() {
        let two = VmSpec {
            vcpus: 2,
            ..spec(256, 64, 0)
        };
        let e = pvh_guest(&two, 1_000_000_000).unwrap_err().to_string();
        assert!(e.contains("one vCPU"), "{e}");
        // 4 GiB: QEMU puts 1 GiB above 4 GiB; a working set reaching there is refused.
        let e = pvh_guest(&spec(4096, 3500, 0), 1_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must end below 3072 MiB"), "{e}");
        assert!(pvh_guest(&spec(4096, 512, 0), 1_000_000_000).is_ok());
        // A 1 GiB working set filling RAM: its 1 MiB table ends on the working set's start,
        // and nothing is left above.
        let e = pvh_guest(&spec(1026, 1024, 0), 1_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no room"), "{e}");
    }

    #[test]
    fn the_tsc_measures_near_the_cpus_rate() {
        let hz = measure_tsc_hz(std::time::Duration::from_millis(20));
        assert!((100_000_000..20_000_000_000).contains(&hz), "{hz}");
    }
}
