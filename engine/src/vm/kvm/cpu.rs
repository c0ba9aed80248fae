//! The guest's CPU as a migration sees it.
//!
//! A VM starts with a CPU model: `host` (what KVM offers on this host) or `baseline` (a
//! conservative subset that x86-64 servers of the last decade share, Hyper-V's "processor
//! compatibility"), less any feature the host is configured without (`--cpu-without`). The
//! CPUID it was given ([`GuestCpu`]) travels in the machine section (version 3, see [`wrap`]);
//! a destination checks it before anything is built or any RAM moves ([`check_here`]): the same
//! vendor, and every feature the guest was given available here. It then gives the guest
//! exactly that CPUID, so the guest's view of its processor never changes under it.

use std::sync::{Mutex, PoisonError};

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::vm::{MachineSection, VmError};

/// Version of a machine section that wraps an older one (1: built-in guest, 2: Linux) with
/// the guest's CPU.
pub const SECTION_VERSION: u32 = 3;

/// The CPU model a VM is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModel {
    /// Everything KVM offers on this host.
    #[default]
    Host,
    /// A conservative common subset: x86-64-v2 (SSE4.2, POPCNT, CX16) with XSAVE of the x87
    /// and SSE state, NX, SYSCALL and the basic KVM paravirtual features.
    Baseline,
}

crate::named_enum!(CpuModel, "CPU model", { Host => "host", Baseline => "baseline" });

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A CPUID register that holds feature bits.
struct Word {
    function: u32,
    index: u32,
    reg: Reg,
    /// Linux's names of the bits (`/proc/cpuinfo`) that have one: `(bit, name)`.
    names: &'static [(u32, &'static str)],
    /// Bits that are not features of the processor: the OS or the VMM sets them.
    ignore: u32,
    /// Bits the baseline model keeps.
    baseline: u32,
}

/// Leaf 1 EDX names.
#[rustfmt::skip]
const LEAF1_EDX: &[(u32, &str)] = &[
    (0, "fpu"), (1, "vme"), (2, "de"), (3, "pse"), (4, "tsc"), (5, "msr"), (6, "pae"), (7, "mce"),
    (8, "cx8"), (9, "apic"), (11, "sep"), (12, "mtrr"), (13, "pge"), (14, "mca"), (15, "cmov"),
    (16, "pat"), (17, "pse36"), (18, "pn"), (19, "clflush"), (21, "ds"), (22, "acpi"),
    (23, "mmx"), (24, "fxsr"), (25, "sse"), (26, "sse2"), (27, "ss"), (28, "ht"), (29, "tm"),
    (30, "ia64"), (31, "pbe"),
];

/// The feature words checked and masked.
#[rustfmt::skip]
const WORDS: &[Word] = &[
    Word {
        function: 1,
        index: 0,
        reg: Reg::Edx,
        names: LEAF1_EDX,
        ignore: 1 << 28, // ht: the VM's topology
        baseline: 0x078b_fbff,
    },
    Word {
        function: 1,
        index: 0,
        reg: Reg::Ecx,
        names: &[
            (0, "pni"), (1, "pclmulqdq"), (2, "dtes64"), (3, "monitor"), (4, "ds_cpl"),
            (5, "vmx"), (6, "smx"), (7, "est"), (8, "tm2"), (9, "ssse3"), (10, "cid"),
            (11, "sdbg"), (12, "fma"), (13, "cx16"), (14, "xtpr"), (15, "pdcm"), (17, "pcid"),
            (18, "dca"), (19, "sse4_1"), (20, "sse4_2"), (21, "x2apic"), (22, "movbe"),
            (23, "popcnt"), (24, "tsc_deadline_timer"), (25, "aes"), (26, "xsave"),
            (27, "osxsave"), (28, "avx"), (29, "f16c"), (30, "rdrand"), (31, "hypervisor"),
        ],
        ignore: (1 << 27) | (1 << 31), // osxsave: the OS; hypervisor: the VMM
        baseline: 0x84b8_2203,
    },
    Word {
        function: 7,
        index: 0,
        reg: Reg::Ebx,
        names: &[
            (0, "fsgsbase"), (1, "tsc_adjust"), (2, "sgx"), (3, "bmi1"), (4, "hle"), (5, "avx2"),
            (6, "fdp_excptn_only"), (7, "smep"), (8, "bmi2"), (9, "erms"), (10, "invpcid"),
            (11, "rtm"), (12, "cqm"), (13, "zero_fcs_fds"), (14, "mpx"), (15, "rdt_a"),
            (16, "avx512f"), (17, "avx512dq"), (18, "rdseed"), (19, "adx"), (20, "smap"),
            (21, "avx512ifma"), (23, "clflushopt"), (24, "clwb"), (25, "intel_pt"),
            (26, "avx512pf"), (27, "avx512er"), (28, "avx512cd"), (29, "sha_ni"),
            (30, "avx512bw"), (31, "avx512vl"),
        ],
        ignore: 0,
        baseline: 0,
    },
    Word {
        function: 7,
        index: 0,
        reg: Reg::Ecx,
        names: &[
            (0, "prefetchwt1"), (1, "avx512vbmi"), (2, "umip"), (3, "pku"), (4, "ospke"),
            (5, "waitpkg"), (6, "avx512_vbmi2"), (7, "user_shstk"), (8, "gfni"), (9, "vaes"),
            (10, "vpclmulqdq"), (11, "avx512_vnni"), (12, "avx512_bitalg"), (13, "tme"),
            (14, "avx512_vpopcntdq"), (16, "la57"), (22, "rdpid"), (24, "bus_lock_detect"),
            (25, "cldemote"), (27, "movdiri"), (28, "movdir64b"), (29, "enqcmd"), (30, "sgx_lc"),
        ],
        ignore: 1 << 4, // ospke: the OS
        baseline: 0,
    },
    Word {
        function: 7,
        index: 0,
        reg: Reg::Edx,
        names: &[
            (2, "avx512_4vnniw"), (3, "avx512_4fmaps"), (4, "fsrm"), (8, "avx512_vp2intersect"),
            (10, "md_clear"), (14, "serialize"), (16, "tsxldtrk"), (18, "pconfig"),
            (19, "arch_lbr"), (20, "ibt"), (22, "amx_bf16"), (23, "avx512_fp16"),
            (24, "amx_tile"), (25, "amx_int8"), (26, "spec_ctrl"), (27, "intel_stibp"),
            (28, "flush_l1d"), (29, "arch_capabilities"), (30, "core_capabilities"),
            (31, "spec_ctrl_ssbd"),
        ],
        ignore: 0,
        baseline: 0,
    },
    Word {
        function: 7,
        index: 1,
        reg: Reg::Eax,
        names: &[
            (4, "avx_vnni"), (5, "avx512_bf16"),
        ],
        ignore: 0,
        baseline: 0,
    },
    Word {
        function: 0xd,
        index: 1,
        reg: Reg::Eax,
        names: &[
            (0, "xsaveopt"), (1, "xsavec"), (2, "xgetbv1"), (3, "xsaves"),
        ],
        ignore: 0,
        baseline: 0,
    },
    Word {
        function: 0x8000_0001,
        index: 0,
        reg: Reg::Ecx,
        names: &[
            (0, "lahf_lm"), (1, "cmp_legacy"), (2, "svm"), (3, "extapic"), (4, "cr8_legacy"),
            (5, "abm"), (6, "sse4a"), (7, "misalignsse"), (8, "3dnowprefetch"), (9, "osvw"),
            (10, "ibs"), (11, "xop"), (12, "skinit"), (13, "wdt"), (15, "lwp"), (16, "fma4"),
            (17, "tce"), (19, "nodeid_msr"), (21, "tbm"), (22, "topoext"), (23, "perfctr_core"),
            (24, "perfctr_nb"), (26, "bpext"), (27, "ptsc"), (28, "perfctr_llc"), (29, "mwaitx"),
        ],
        ignore: 0,
        baseline: 1, // lahf_lm
    },
    Word {
        function: 0x8000_0001,
        index: 0,
        reg: Reg::Edx,
        names: &[
            (0, "fpu"), (1, "vme"), (2, "de"), (3, "pse"), (4, "tsc"), (5, "msr"), (6, "pae"),
            (7, "mce"), (8, "cx8"), (9, "apic"), (11, "syscall"), (12, "mtrr"), (13, "pge"),
            (14, "mca"), (15, "cmov"), (16, "pat"), (17, "pse36"), (19, "mp"), (20, "nx"),
            (22, "mmxext"), (23, "mmx"), (24, "fxsr"), (25, "fxsr_opt"), (26, "pdpe1gb"),
            (27, "rdtscp"), (29, "lm"), (30, "3dnowext"), (31, "3dnow"),
        ],
        ignore: 0,
        baseline: 0x2193_fbff,
    },
    Word {
        function: 0x8000_0008,
        index: 0,
        reg: Reg::Ebx,
        names: &[
            (0, "clzero"), (1, "irperf"), (2, "xsaveerptr"), (4, "rdpru"), (9, "wbnoinvd"),
            (12, "ibpb"), (14, "ibrs"), (15, "stibp"), (24, "amd_ssbd"), (25, "virt_ssbd"),
            (26, "amd_ssb_no"),
        ],
        ignore: 0,
        baseline: 0,
    },
    Word {
        function: 0x4000_0001,
        index: 0,
        reg: Reg::Eax,
        names: &[
            (0, "kvmclock"), (1, "kvm_nopiodelay"), (2, "kvm_mmu_op"), (3, "kvmclock2"),
            (4, "kvm_async_pf"), (5, "kvm_steal_time"), (6, "kvm_pv_eoi"), (7, "kvm_pv_unhalt"),
            (9, "kvm_pv_tlb_flush"), (10, "kvm_async_pf_vmexit"), (11, "kvm_pv_send_ipi"),
            (12, "kvm_poll_control"), (13, "kvm_pv_sched_yield"), (14, "kvm_async_pf_int"),
            (15, "kvm_msi_ext_dest_id"), (16, "kvm_hc_map_gpa_range"),
            (17, "kvm_migration_control"), (24, "kvmclock_stable"),
        ],
        ignore: 0,
        baseline: 0x0100_00fb,
    },
];

/// XSAVE components the baseline model offers: x87 and SSE.
const BASELINE_XCR0: u32 = 0x3;

/// A feature bit: a feature word (a CPUID leaf's register) and a bit in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    word: usize,
    bit: u32,
}

impl Feature {
    /// Looks a feature up by its Linux name (`avx2`, `pdpe1gb`, ...).
    pub fn parse(name: &str) -> Result<Feature, String> {
        WORDS
            .iter()
            .enumerate()
            .find_map(|(word, w)| {
                w.names
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|&(bit, _)| Feature { word, bit })
            })
            .ok_or_else(|| {
                format!("unknown CPU feature {name:?} (names as in /proc/cpuinfo, e.g. avx2, pdpe1gb, rdtscp; `livemig cpu` lists this host's)")
            })
    }

    /// Its name (a description of the bit where Linux has no name for it).
    pub fn name(self) -> String {
        let w = &WORDS[self.word];
        match w.names.iter().find(|(b, _)| *b == self.bit) {
            Some((_, n)) => n.to_string(),
            None => format!(
                "CPUID {:#x}.{} {:?} bit {}",
                w.function, w.index, w.reg, self.bit
            )
            .to_lowercase(),
        }
    }
}

/// This host's CPU settings: the model a VM started here gets, and the features the host
/// offers no guest (set once at start by `run-vm` and `receive`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCpu {
    /// The model of a VM started here.
    pub model: CpuModel,
    /// Features hidden from every guest here, as if the processor lacked them.
    pub without: Vec<Feature>,
}

static HOST: Mutex<HostCpu> = Mutex::new(HostCpu {
    model: CpuModel::Host,
    without: Vec::new(),
});

/// Sets this process's CPU settings.
pub fn set_host_cpu(h: HostCpu) {
    *HOST.lock().unwrap_or_else(PoisonError::into_inner) = h;
}

/// This process's CPU settings.
pub fn host_cpu() -> HostCpu {
    HOST.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The CPU a guest was given: its model and its CPUID (before the per-vCPU topology).
#[derive(Debug, Clone, PartialEq)]
pub struct GuestCpu {
    /// The model it was started with.
    pub model: CpuModel,
    /// The CPUID entries.
    pub cpuid: CpuId,
}

impl GuestCpu {
    /// The CPU a VM started here gets: KVM's supported CPUID under `host`'s model, less its
    /// hidden features.
    pub fn for_new_vm(kvm: &Kvm, host: &HostCpu) -> Result<GuestCpu, VmError> {
        let supported = supported(kvm)?;
        Ok(GuestCpu {
            model: host.model,
            cpuid: masked(&supported, host.model, &host.without),
        })
    }

    /// [`GuestCpu::for_new_vm`] on this host's KVM.
    pub fn here(host: &HostCpu) -> Result<GuestCpu, VmError> {
        GuestCpu::for_new_vm(&open_kvm()?, host)
    }

    /// Vendor, family, model and stepping, as a person reads them.
    pub fn identity(&self) -> String {
        identity(&self.cpuid)
    }

    /// Every named feature it has.
    pub fn features(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (word, w) in WORDS.iter().enumerate() {
            let bits = reg(&self.cpuid, w) & !w.ignore;
            for &(bit, name) in w.names {
                if bits & (1 << bit) != 0 && !out.iter().any(|n| n == name) {
                    out.push(Feature { word, bit }.name());
                }
            }
        }
        out
    }
}

fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|source| VmError::Kvm {
        op: "open /dev/kvm",
        source,
    })
}

/// KVM's supported CPUID on this host.
fn supported(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Kvm {
            op: "KVM_GET_SUPPORTED_CPUID",
            source,
        })
}

/// `cpuid` under `model`, with the `without` features cleared.
fn masked(cpuid: &CpuId, model: CpuModel, without: &[Feature]) -> CpuId {
    let mut out = cpuid.clone();
    for e in out.as_mut_slice() {
        for (word, w) in WORDS.iter().enumerate() {
            if e.function != w.function || e.index != w.index {
                continue;
            }
            let mut keep = u32::MAX;
            if model == CpuModel::Baseline {
                keep &= w.baseline | w.ignore;
            }
            for f in without.iter().filter(|f| f.word == word) {
                keep &= !(1 << f.bit);
            }
            *reg_mut(e, w.reg) &= keep;
        }
        if model == CpuModel::Baseline {
            match (e.function, e.index) {
                // No leaf-7 subleaf beyond 0.
                (7, 0) => e.eax = 0,
                (0xd, 0) => {
                    e.eax &= BASELINE_XCR0;
                    e.edx = 0;
                }
                // The state components the model does not offer.
                (0xd, i) if i >= 2 => {
                    (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
                }
                _ => {}
            }
        }
    }
    out
}

/// The value of `w`'s register in `cpuid` (0 when the leaf is absent).
fn reg(cpuid: &CpuId, w: &Word) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == w.function && e.index == w.index)
        .map_or(0, |e| match w.reg {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        })
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn leaf(cpuid: &CpuId, function: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == function)
}

/// The vendor string of leaf 0 ("" when absent).
fn vendor(cpuid: &CpuId) -> String {
    leaf(cpuid, 0).map_or_else(String::new, |e| {
        let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_string()
    })
}

/// "AuthenticAMD family 0x19 model 0x1 stepping 1".
fn identity(cpuid: &CpuId) -> String {
    let eax = leaf(cpuid, 1).map_or(0, |e| e.eax);
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        ((eax >> 4) & 0xf) | ((eax >> 12) & 0xf0)
    } else {
        (eax >> 4) & 0xf
    };
    format!(
        "{} family {family:#x} model {model:#x} stepping {}",
        vendor(cpuid),
        eax & 0xf
    )
}

/// Whether this host can give a guest `guest`'s CPU: the same vendor, every feature. KVM is
/// opened to read what it supports; `host`'s hidden features count as missing.
pub fn check_here(guest: &GuestCpu, host: &HostCpu) -> Result<(), VmError> {
    let offer = masked(&supported(&open_kvm()?)?, CpuModel::Host, &host.without);
    check(&guest.cpuid, &offer).map_err(VmError::IncompatibleCpu)
}

/// Whether a host offering `offer` can run a guest given `guest`.
fn check(guest: &CpuId, offer: &CpuId) -> Result<(), String> {
    let (gv, ov) = (vendor(guest), vendor(offer));
    if gv != ov {
        return Err(format!(
            "the guest was given a {gv} processor and this host's is {ov}: live migration needs processors from the same manufacturer"
        ));
    }
    let mut missing: Vec<String> = Vec::new();
    for (word, w) in WORDS.iter().enumerate() {
        let lacking = reg(guest, w) & !reg(offer, w) & !w.ignore;
        for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
            let name = Feature { word, bit }.name();
            if !missing.contains(&name) {
                missing.push(name);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this host cannot give the guest the processor it was given ({}): it lacks {}; a VM started with `run-vm --cpu-model baseline` moves between unlike hosts",
        identity(guest),
        missing.join(", ")
    ))
}

/// Bytes of one CPUID entry in a section: function, index, flags, eax, ebx, ecx, edx.
const ENTRY_BYTES: usize = 28;

/// Wraps a machine section of version 1 or 2 with the guest's CPU (version 3): the inner
/// section's version and length, its bytes, the model (0 host, 1 baseline), the number of
/// CPUID entries and the entries.
pub fn wrap(inner: &MachineSection, cpu: &GuestCpu) -> MachineSection {
    let entries = cpu.cpuid.as_slice();
    let mut data = Vec::with_capacity(13 + inner.data.len() + entries.len() * ENTRY_BYTES);
    data.extend_from_slice(&inner.version.to_le_bytes());
    data.extend_from_slice(&(inner.data.len() as u32).to_le_bytes());
    data.extend_from_slice(&inner.data);
    data.push(match cpu.model {
        CpuModel::Host => 0,
        CpuModel::Baseline => 1,
    });
    data.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    MachineSection {
        version: SECTION_VERSION,
        data,
    }
}

/// The machine section inside `s` and the guest's CPU, if `s` carries it (a section of
/// version 1 or 2, from an older source, does not: it is returned as it is).
pub fn unwrap(s: &MachineSection) -> Result<(MachineSection, Option<GuestCpu>), VmError> {
    if s.version != SECTION_VERSION {
        return Ok((s.clone(), None));
    }
    let bad = |m: &str| {
        VmError::InvalidSpec(format!(
            "machine section version {SECTION_VERSION} of {} bytes: {m}",
            s.data.len()
        ))
    };
    let mut rest = s.data.as_slice();
    let mut take = |n: usize| -> Result<&[u8], VmError> {
        if rest.len() < n {
            return Err(bad("cut short"));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let version = u32_at(take(4)?);
    let len = u32_at(take(4)?) as usize;
    let inner = take(len)?.to_vec();
    if version == SECTION_VERSION {
        return Err(bad("it wraps another of its version"));
    }
    let model = match take(1)?[0] {
        0 => CpuModel::Host,
        1 => CpuModel::Baseline,
        m => return Err(bad(&format!("CPU model {m} is not one this VMM knows"))),
    };
    let count = u32_at(take(4)?) as usize;
    if count > KVM_MAX_CPUID_ENTRIES {
        return Err(bad(&format!(
            "{count} CPUID entries (at most {KVM_MAX_CPUID_ENTRIES})"
        )));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let b = take(ENTRY_BYTES)?;
        let v = |i: usize| u32_at(&b[i * 4..]);
        entries.push(kvm_cpuid_entry2 {
            function: v(0),
            index: v(1),
            flags: v(2),
            eax: v(3),
            ebx: v(4),
            ecx: v(5),
            edx: v(6),
            ..Default::default()
        });
    }
    if !rest.is_empty() {
        return Err(bad("bytes after the CPUID entries"));
    }
    let cpuid = CpuId::from_entries(&entries).map_err(|e| bad(&format!("CPUID entries: {e:?}")))?;
    Ok((
        MachineSection {
            version,
            data: inner,
        },
        Some(GuestCpu { model, cpuid }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    /// A small AMD-like CPUID: vendor, family 0x19, SSE2, AVX, AVX2, NX/LM, xsave x87|SSE|AVX.
    fn amd() -> CpuId {
        let v = |s: &[u8; 4]| u32::from_le_bytes(*s);
        CpuId::from_entries(&[
            entry(0, 0, [0xd, v(b"Auth"), v(b"cAMD"), v(b"enti")]),
            entry(
                1,
                0,
                [0x00a0_0f11, 0, (1 << 28) | (1 << 26) | 1, 0x078b_fbff],
            ),
            entry(7, 0, [1, (1 << 5) | (1 << 8), 0, 0]),
            entry(0xd, 0, [0x7, 0x340, 0x340, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 1, (1 << 20) | (1 << 29) | (1 << 27)]),
        ])
        .unwrap()
    }

    #[test]
    fn the_same_cpu_is_compatible_and_a_hidden_feature_is_named() {
        let host = amd();
        assert_eq!(check(&host, &host), Ok(()));
        let avx2 = Feature::parse("avx2").unwrap();
        let lacking = masked(&host, CpuModel::Host, &[avx2]);
        let err = check(&host, &lacking).unwrap_err();
        assert!(err.contains("lacks avx2"), "{err}");
        assert!(err.contains("AuthenticAMD family 0x19 model 0x1"), "{err}");
        // A guest that never had it moves there.
        assert_eq!(check(&lacking, &lacking), Ok(()));
    }

    #[test]
    fn baseline_runs_where_host_does_not() {
        let host = amd();
        let base = masked(&host, CpuModel::Baseline, &[]);
        let g = GuestCpu {
            model: CpuModel::Baseline,
            cpuid: base.clone(),
        };
        let f = g.features();
        for kept in ["sse2", "xsave", "nx", "lm", "lahf_lm"] {
            assert!(f.iter().any(|n| n == kept), "{kept} in {f:?}");
        }
        for gone in ["avx", "avx2", "bmi2", "rdtscp"] {
            assert!(!f.iter().any(|n| n == gone), "{gone} in {f:?}");
        }
        // XSAVE offers only the x87 and SSE state; the AVX component is gone.
        let d0 = leaf(&base, 0xd).unwrap();
        assert_eq!(d0.eax, BASELINE_XCR0);
        let without = masked(
            &host,
            CpuModel::Host,
            &[
                Feature::parse("avx").unwrap(),
                Feature::parse("avx2").unwrap(),
            ],
        );
        assert!(check(&host, &without).is_err());
        assert_eq!(check(&base, &without), Ok(()));
    }

    #[test]
    fn another_vendor_is_refused_naming_both() {
        let host = amd();
        let mut intel = host.clone();
        for e in intel.as_mut_slice().iter_mut().filter(|e| e.function == 0) {
            e.ebx = u32::from_le_bytes(*b"Genu");
            e.edx = u32::from_le_bytes(*b"ineI");
            e.ecx = u32::from_le_bytes(*b"ntel");
        }
        let err = check(&host, &intel).unwrap_err();
        assert!(
            err.contains("AuthenticAMD") && err.contains("GenuineIntel"),
            "{err}"
        );
        assert!(err.contains("same manufacturer"), "{err}");
    }

    #[test]
    fn features_are_parsed_by_name_and_unknown_ones_refused() {
        assert_eq!(Feature::parse("avx2").unwrap().name(), "avx2");
        assert_eq!(Feature::parse("pdpe1gb").unwrap().name(), "pdpe1gb");
        let err = Feature::parse("warp_drive").unwrap_err();
        assert!(err.contains("warp_drive"), "{err}");
        assert!(Feature::parse("").is_err());
        // A bit Linux has no name for is described by its place.
        let f = Feature { word: 0, bit: 10 };
        assert_eq!(f.name(), "cpuid 0x1.0 edx bit 10");
    }

    #[test]
    fn a_section_round_trips_and_damage_is_an_error() {
        let inner = MachineSection {
            version: 2,
            data: vec![1],
        };
        let cpu = GuestCpu {
            model: CpuModel::Baseline,
            cpuid: amd(),
        };
        let s = wrap(&inner, &cpu);
        assert_eq!(s.version, SECTION_VERSION);
        assert_eq!(unwrap(&s).unwrap(), (inner.clone(), Some(cpu)));
        // Older sections pass through without a CPU.
        assert_eq!(unwrap(&inner).unwrap(), (inner, None));
        for cut in 0..s.data.len() {
            let short = MachineSection {
                version: SECTION_VERSION,
                data: s.data[..cut].to_vec(),
            };
            assert!(unwrap(&short).is_err(), "cut at {cut}");
        }
        let mut long = s.clone();
        long.data.push(0);
        assert!(unwrap(&long).is_err());
        let mut model = s.clone();
        model.data[4 + 4 + 1] = 9;
        assert!(unwrap(&model).is_err());
        let mut count = s;
        count.data[4 + 4 + 1 + 1..4 + 4 + 1 + 1 + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unwrap(&count).is_err());
    }
}
