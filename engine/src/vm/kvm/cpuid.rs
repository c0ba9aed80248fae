//! The CPUID a vCPU is given: what KVM supports on this host, with the topology (APIC ids,
//! logical processor counts) of the VM filled in and the hypervisor bit set.

use kvm_bindings::CpuId;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;

/// CPUID of vCPU `index` of `vcpus` for the built-in guest: only the APIC ids matter.
pub fn builtin(supported: &CpuId, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

/// CPUID of vCPU `index` of `vcpus` for a Linux guest: one package of `vcpus` cores, one
/// thread each.
pub fn linux(supported: &CpuId, index: u32, vcpus: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let core_bits = 32 - (vcpus.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((vcpus & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1, and logical processors sharing the cache - 1.
                e.eax = (e.eax & 0x03ff_c3ff) | ((vcpus - 1) << 26);
            }
            0xb | 0x1f => {
                let (eax, ebx, level_type) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_bits, vcpus, 2),
                    _ => (0, 0, 0),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = index;
            }
            0x8000_0008 => {
                // AMD: number of cores - 1, and the APIC id bits they use.
                e.ecx = (e.ecx & !0xf0ff) | (vcpus - 1) | (core_bits << 12);
            }
            0x8000_001e => {
                // AMD extended APIC id, core id (one thread per core), node 0.
                e.eax = index;
                e.ebx = index & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

/// XSAVE components Linux enables whenever the CPU has them: x87, SSE, AVX, the AVX-512
/// state (opmask, ZMM_Hi256, Hi16_ZMM) and PKRU.
const LINUX_XFEATURES: u64 = 0x2e7;

/// The XSAVE state components a vCPU given `cpuid` may enable (leaf 0xD.0, EDX:EAX); 0 if
/// the leaf is missing.
pub fn xfeatures(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| u64::from(e.edx) << 32 | u64::from(e.eax))
}

/// The XCR0 a Linux guest will run with: the XSAVE components its CPUID offers that Linux
/// enables. The VMM sets it before the guest starts, so KVM's answer to CPUID leaf 0xD
/// (the XSAVE area size for the enabled components) is already right when the kernel reads
/// it — even on a nested host whose emulated SVM does not trap XSETBV, where KVM would
/// otherwise keep answering for XCR0 = x87 and the kernel would warn that the sizes differ.
pub fn linux_xcr0(cpuid: &CpuId) -> u64 {
    // (x87 alone, which XCR0 always holds, when the leaf is missing.)
    match xfeatures(cpuid) {
        0 => 1,
        x => x & LINUX_XFEATURES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0102_0304,
            ..Default::default()
        }
    }

    #[test]
    fn xcr0_is_what_linux_enables_of_what_is_offered() {
        let mut d = entry(0xd, 0);
        d.eax = 0x21f; // x87, SSE, AVX, MPX (two components), PKRU
        let c = CpuId::from_entries(&[d]).unwrap();
        assert_eq!(linux_xcr0(&c), 0x207);
        assert_eq!(linux_xcr0(&CpuId::from_entries(&[entry(1, 0)]).unwrap()), 1);
    }

    #[test]
    fn topology_of_a_four_vcpu_vm() {
        let supported = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        let c = linux(&supported, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].ecx >> 8, e[1].edx), (1, 1, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, 2));
        assert_eq!(e[3].ecx >> 8, 0, "end of levels");
        assert_eq!(e[4].ecx & 0xff, 3);
        let one = linux(&supported, 0, 1);
        assert_eq!(one.as_slice()[0].edx & EDX_HTT, 0);
    }
}
