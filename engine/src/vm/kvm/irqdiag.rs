//! What the guest's interrupt controllers hold, told when a device finds an interrupt it raised
//! left unserviced for seconds (a virtio device raises it again every 200 ms and, from the
//! eighth time, asks through its [`IrqLine`](crate::devices::IrqLine)).
//!
//! A guest that stops servicing one device's interrupts while its local timer still runs has
//! either an in-service bit in its local APIC that was never cleared (an EOI lost: every
//! vector of that priority class and below is blocked, the timer's above them is not), a
//! level-triggered IOAPIC entry whose remote IRR was never acknowledged (its pin is dead), a
//! mask, or interrupts disabled. The log lines say which: the IOAPIC's entry and pending bits
//! and the PICs' for the line, from the VM (any thread); each vCPU's local APIC (ISR, IRR, TMR,
//! TPR, PPR, LVTs), `RFLAGS.IF`, its MP state and any pending injection, from the vCPU's own
//! thread at its next exit (the VMM kicks it out of `KVM_RUN`).

use std::sync::{Arc, Weak};

use kvm_bindings::{
    kvm_irqchip, kvm_lapic_state, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use vm_memory::{Bytes, GuestAddress};

use super::vcpu::{Control, ExitTally};
use crate::devices::StuckIrqHook;
use crate::memory::{GuestRam, PAGE_SIZE};

/// The hook a VMM sets on its Linux guest's interrupt lines: logs the IOAPIC's and PICs' state
/// for the line and has every vCPU log its local APIC. Holds the VM weakly: the lines belong to
/// devices the VM owns.
pub(super) fn stuck_irq_hook(vm: Weak<VmFd>, control: Weak<Control>) -> StuckIrqHook {
    Arc::new(move |gsi| {
        if let Some(vm) = vm.upgrade() {
            tracing::warn!(gsi, "interrupt controllers: {}", describe_chips(&vm, gsi));
        }
        if let Some(c) = control.upgrade() {
            c.request_lapic_report();
        }
    })
}

/// The IOAPIC's redirection entry and pending bit for `gsi`, and the PICs' registers.
fn describe_chips(vm: &VmFd, gsi: u32) -> String {
    let get = |chip_id| {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map(|_| c)
    };
    let mut out = Vec::new();
    match get(KVM_IRQCHIP_IOAPIC) {
        Ok(c) => {
            // SAFETY: KVM filled the IOAPIC variant of the union for this chip id; every
            // field is a plain integer, valid for any bits.
            let io = unsafe { c.chip.ioapic };
            let entry = io
                .redirtbl
                .get(gsi as usize)
                // SAFETY: both views of the union are plain integers of the same 64 bits.
                .map(|e| unsafe { e.bits });
            out.push(match entry {
                Some(bits) => format!(
                    "IOAPIC pin {gsi}: {}; pending pins {:#x}",
                    describe_redirection(bits),
                    io.irr
                ),
                None => format!("no IOAPIC pin {gsi}"),
            });
        }
        Err(e) => out.push(format!("KVM_GET_IRQCHIP (IOAPIC): {e}")),
    }
    for (name, id) in [
        ("master", KVM_IRQCHIP_PIC_MASTER),
        ("slave", KVM_IRQCHIP_PIC_SLAVE),
    ] {
        match get(id) {
            Ok(c) => {
                // SAFETY: KVM filled the PIC variant for this chip id; plain integers.
                let p = unsafe { c.chip.pic };
                out.push(format!(
                    "PIC {name}: irr {:#04x} imr {:#04x} isr {:#04x} elcr {:#04x}",
                    p.irr, p.imr, p.isr, p.elcr
                ));
            }
            Err(e) => out.push(format!("KVM_GET_IRQCHIP (PIC {name}): {e}")),
        }
    }
    out.join("; ")
}

/// An IOAPIC redirection entry, decoded.
fn describe_redirection(bits: u64) -> String {
    let bit = |n: u32| (bits >> n) & 1 == 1;
    format!(
        "vector {:#04x}, delivery {}, {} destination {:#x}, {}-triggered active-{}{}{}{}",
        bits & 0xff,
        (bits >> 8) & 7,
        if bit(11) { "logical" } else { "physical" },
        bits >> 56,
        if bit(15) { "level" } else { "edge" },
        if bit(13) { "low" } else { "high" },
        if bit(12) { ", delivery pending" } else { "" },
        if bit(14) {
            ", remote IRR set (waiting for an EOI)"
        } else {
            ""
        },
        if bit(16) { ", masked" } else { "" },
    )
}

/// Reads the 32-bit local APIC register at `off`.
pub(super) fn reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (k, x) in b.iter_mut().enumerate() {
        *x = l.regs[off + k] as u8;
    }
    u32::from_le_bytes(b)
}

/// Writes the 32-bit local APIC register at `off`.
pub(super) fn set_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (k, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + k] = *b as _;
    }
}

/// The vectors set in the 256-bit register of the local APIC at `base` (eight 32-bit words
/// 16 bytes apart).
fn vectors(l: &kvm_lapic_state, base: usize) -> String {
    let v: Vec<String> = (0..8)
        .flat_map(|w| {
            let word = reg(l, base + 16 * w);
            (0..32)
                .filter(move |b| word >> b & 1 == 1)
                .map(move |b| format!("{:#04x}", w * 32 + b))
        })
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}

/// A local APIC's interrupt state, decoded.
pub(super) fn describe_lapic(l: &kvm_lapic_state) -> String {
    let lvt = |off| {
        let v = reg(l, off);
        format!(
            "{:#04x}{}{}",
            v & 0xff,
            if v >> 16 & 1 == 1 { " masked" } else { "" },
            if v >> 12 & 1 == 1 { " pending" } else { "" }
        )
    };
    format!(
        "ISR {}; IRR {}; TMR {}; TPR {:#x} PPR {:#x}; {}; timer {} (count {}); LINT0 {} LINT1 {}",
        vectors(l, 0x100),
        vectors(l, 0x200),
        vectors(l, 0x180),
        reg(l, 0x80),
        reg(l, 0xa0),
        if reg(l, 0xf0) >> 8 & 1 == 1 {
            "enabled"
        } else {
            "software-disabled"
        },
        lvt(0x320),
        reg(l, 0x390),
        lvt(0x350),
        lvt(0x360),
    )
}

/// Logs vCPU `index`'s local APIC, interrupt flag, MP state and pending events, the code at
/// its RIP and the exits it took since its last report (on its thread, between two
/// `KVM_RUN`s).
pub(super) fn report_vcpu(fd: &VcpuFd, index: u32, ram: &GuestRam, tally: ExitTally) {
    tracing::warn!(vcpu = index, "{}", describe_vcpu(fd, ram, tally));
}

/// Bytes of guest code at `rip`, read through the vCPU's page tables (`KVM_TRANSLATE`): where
/// a guest spins, what it runs there.
fn code_at(fd: &VcpuFd, ram: &GuestRam, rip: u64) -> String {
    const LEN: u64 = 16;
    let t = match fd.translate_gva(rip) {
        Ok(t) if t.valid != 0 => t,
        Ok(_) => return "not mapped".into(),
        Err(e) => return format!("KVM_TRANSLATE: {e}"),
    };
    // Up to the end of the page: the next one may map elsewhere.
    let len = LEN.min(PAGE_SIZE - (t.physical_address % PAGE_SIZE)) as usize;
    let mut buf = [0u8; LEN as usize];
    match ram
        .memory()
        .read_slice(&mut buf[..len], GuestAddress(t.physical_address))
    {
        Ok(()) => format!(
            "gpa {:#x}: {}",
            t.physical_address,
            buf[..len]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Err(_) => format!("gpa {:#x}: not in RAM", t.physical_address),
    }
}

/// A vCPU's local APIC, interrupt flag, MP state and pending events, its code at RIP and its
/// exits since the last report.
fn describe_vcpu(fd: &VcpuFd, ram: &GuestRam, tally: ExitTally) -> String {
    let lapic = fd
        .get_lapic()
        .map_or_else(|e| format!("KVM_GET_LAPIC: {e}"), |l| describe_lapic(&l));
    let regs = fd.get_regs().map_or_else(
        |e| format!("KVM_GET_REGS: {e}"),
        |r| {
            format!(
                "rip {:#x}, interrupts {}; code {}",
                r.rip,
                if r.rflags & (1 << 9) != 0 {
                    "enabled"
                } else {
                    "disabled"
                },
                code_at(fd, ram, r.rip)
            )
        },
    );
    let mp = fd.get_mp_state().map_or_else(
        |e| format!("KVM_GET_MP_STATE: {e}"),
        |m| match m.mp_state {
            KVM_MP_STATE_RUNNABLE => "runnable".into(),
            KVM_MP_STATE_HALTED => "halted".into(),
            s => s.to_string(),
        },
    );
    let events = fd.get_vcpu_events().map_or_else(
        |e| format!("KVM_GET_VCPU_EVENTS: {e}"),
        |ev| {
            format!(
                "injecting {} (vector {:#04x}), shadow {}, NMI pending {} masked {}, \
                 exception injected {} pending {}, SMM {}",
                ev.interrupt.injected,
                ev.interrupt.nr,
                ev.interrupt.shadow,
                ev.nmi.pending,
                ev.nmi.masked,
                ev.exception.injected,
                ev.exception.pending,
                ev.smi.smm
            )
        },
    );
    format!(
        "local APIC: {lapic}; {regs}; MP state {mp}; {events}; exits to the VMM since the last \
         report: {} port I/O (last {:#x}), {} MMIO (last {:#x}), {} other",
        tally.pio, tally.last_port, tally.mmio, tally.last_mmio, tally.other
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::kvm::KvmVm;
    use crate::vm::MigratableVm;

    /// On a running VM (the built-in guest): the chips of a line and a vCPU's APIC are read and
    /// decoded, and a report asked of the vCPUs is taken by each at its next exit.
    #[test]
    fn a_running_vm_reports_its_interrupt_controllers() {
        let vm = KvmVm::launch(&crate::vm::kvm::tests::spec(
            2,
            1000,
            1,
            crate::vm::Pattern::Sequential,
        ))
        .unwrap();
        let chips = describe_chips(&vm.vm, 4);
        assert!(chips.starts_with("IOAPIC pin 4: vector "), "{chips}");
        assert!(chips.contains("; PIC master: irr "), "{chips}");
        assert!(chips.contains("; PIC slave: irr "), "{chips}");
        assert!(describe_chips(&vm.vm, 99).starts_with("no IOAPIC pin 99"));
        vm.pause().unwrap();
        let tally = ExitTally {
            pio: 3,
            last_port: 0x3f8,
            ..ExitTally::default()
        };
        let one = describe_vcpu(&crate::vm::kvm::lock(&vm.vcpus[0]), &vm.ram, tally);
        assert!(one.starts_with("local APIC: ISR "), "{one}");
        assert!(one.contains("; rip 0x"), "{one}");
        assert!(!one.contains("KVM_GET"), "{one}");
        // The guest's code at RIP, read through its page tables, as bytes of its RAM.
        let code = one.split("; code gpa ").nth(1).expect("no code at RIP");
        let (gpa, bytes) = code.split_once(": ").unwrap();
        let gpa = u64::from_str_radix(gpa.trim_start_matches("0x"), 16).unwrap();
        let mut want = [0u8; 4];
        vm.ram
            .memory()
            .read_slice(&mut want, GuestAddress(gpa))
            .unwrap();
        let want: Vec<String> = want.iter().map(|b| format!("{b:02x}")).collect();
        assert!(bytes.starts_with(&want.join(" ")), "{one}");
        assert!(
            one.contains("since the last report: 3 port I/O (last 0x3f8), 0 MMIO"),
            "{one}"
        );
        println!("{chips}\n{one}");
        vm.resume().unwrap();
        stuck_irq_hook(Arc::downgrade(&vm.vm), Arc::downgrade(&vm.control))(4);
        let t = std::time::Instant::now();
        while vm.control.lapic_report_pending() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "a vCPU never took its report"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        vm.shutdown();
    }

    #[test]
    fn local_apic_registers_decode_to_vectors_and_flags() {
        let mut l = kvm_lapic_state::default();
        assert!(describe_lapic(&l).starts_with("ISR none; IRR none; TMR none; TPR 0x0"));
        // ISR: vector 0x21 (word 1, bit 1) and 0xec (word 7, bit 12); IRR 0x31; TPR 0x20.
        set_reg(&mut l, 0x110, 1 << 1);
        set_reg(&mut l, 0x170, 1 << 12);
        set_reg(&mut l, 0x210, 1 << 17);
        set_reg(&mut l, 0x80, 0x20);
        set_reg(&mut l, 0xf0, 0x1ff);
        set_reg(&mut l, 0x320, 0x200ec);
        set_reg(&mut l, 0x390, 1234);
        set_reg(&mut l, 0x350, 0x10700);
        let d = describe_lapic(&l);
        assert!(
            d.starts_with("ISR 0x21 0xec; IRR 0x31; TMR none; TPR 0x20"),
            "{d}"
        );
        assert!(
            d.contains("; enabled; timer 0xec (count 1234); LINT0 0x00 masked"),
            "{d}"
        );
    }

    #[test]
    fn ioapic_entries_decode_with_their_remote_irr_and_mask() {
        // Vector 0x25, fixed, physical destination 0, level-triggered, remote IRR set.
        let d = describe_redirection(0x25 | 1 << 15 | 1 << 14);
        assert_eq!(
            d,
            "vector 0x25, delivery 0, physical destination 0x0, level-triggered active-high, \
             remote IRR set (waiting for an EOI)"
        );
        let d = describe_redirection(0x30 | 1 << 16 | 1 << 11 | 3 << 56);
        assert_eq!(
            d,
            "vector 0x30, delivery 0, logical destination 0x3, edge-triggered active-high, masked"
        );
    }
}
