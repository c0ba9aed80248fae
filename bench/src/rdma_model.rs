//! `livemig bench --rdma-model`: what a 64 GiB VM would take over one 100 Gb/s RoCE port and
//! over two 200 Gb/s ports, projected from costs measured on this host, every assumption named.
//!
//! This host has no RDMA NIC (soft-RoCE runs only in an emulated VM, at tens of MB/s), so the
//! NIC itself is an assumption: its goodput for 1 MiB writes. What livemig's own threads and the
//! kernel do per byte is measured here, natively: page hashing (the destination's background
//! digest, the source's record of what it sent), pinning memory (what `ibv_reg_mr` does first,
//! for every page it registers), and turning the dirty log into chunks. The projection then
//! follows livemig's pipeline: the destination registers its RAM at set-up; round 0 writes all
//! of RAM while the source's writers register it block by block (in parallel, one block at a
//! time per writer);
//! the destination hashes each landed slice on up to 8 threads, and whatever it has not hashed
//! when the last round ends, plus the last slice, is inside the downtime.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use livemig_engine::digest::PageHashes;
use livemig_engine::dirty::DirtyBitmap;
use livemig_engine::memory::{RamLayout, PAGE_SIZE};
use livemig_engine::scheduler::{chunks, CHUNK_EXTENTS, CHUNK_PAGES};

const GIB: f64 = (1u64 << 30) as f64;

/// Costs measured on this host (per core unless said).
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    /// Page hashing (xxh3 of 4 KiB pages into the per-page table), GB/s on one core.
    pub hash_gbps: f64,
    /// Pinning populated memory (`mlock`: walk, fault-in check and pin of every 4 KiB page),
    /// seconds per GiB.
    pub pin_s_per_gib: f64,
    /// The same on 2 MiB huge pages (None: no hugetlb pool to measure on).
    pub pin_huge_s_per_gib: Option<f64>,
    /// Dirty bitmap to extents to 1 MiB chunks, seconds per GiB of RAM (1 % of pages dirty,
    /// in runs).
    pub scan_s_per_gib: f64,
    /// Cores of this host.
    pub cores: usize,
}

/// A link to project for.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Name in the table.
    pub name: &'static str,
    /// Rails (ports).
    pub rails: u32,
    /// Line rate of one rail, Gb/s.
    pub gbit: f64,
}

/// Assumptions of the projection.
#[derive(Debug, Clone, Copy)]
pub struct Assumptions {
    /// Guest RAM, GiB.
    pub ram_gib: f64,
    /// Fraction of the line rate RDMA WRITEs of 1 MiB reach (RoCE v2 headers at MTU 4096 cost
    /// ~1.5 %; perftest's ib_write_bw on ConnectX-class NICs reports 90–97 % of line rate).
    pub goodput: f64,
    /// Destination hashing threads (livemig: one per core, at most 8).
    pub hash_threads: f64,
    /// Pause, vCPU and device state, revoking the queue pairs, resume, ms.
    pub switchover_ms: f64,
    /// The busy workload: bytes per second the guest dirties, and over how much RAM.
    pub dirty_gbps: f64,
    /// Its working set, GiB.
    pub working_set_gib: f64,
    /// Stop-and-copy once the last round fits this, ms (livemig's default).
    pub downtime_limit_ms: f64,
    /// Registration beyond pinning (IOMMU/MTT entries) as a multiple of the pinning measured.
    pub reg_over_pin: f64,
    /// Source writer threads (queue pairs) per rail; each registers the blocks it reaches.
    pub writers_per_rail: f64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Assumptions {
            ram_gib: 64.0,
            goodput: 0.92,
            hash_threads: 8.0,
            switchover_ms: 20.0,
            dirty_gbps: 1.0,
            working_set_gib: 8.0,
            downtime_limit_ms: livemig_engine::defaults::DOWNTIME_LIMIT_MS as f64,
            reg_over_pin: 1.0,
            writers_per_rail: 2.0,
        }
    }
}

/// One projected migration.
#[derive(Debug, Clone)]
pub struct Projection {
    /// Link.
    pub link: &'static str,
    /// Workload and page size.
    pub case: String,
    /// Destination registration at set-up, s.
    pub setup_s: f64,
    /// Round 0's rate, GB/s, and what bounds it.
    pub round0_gbps: f64,
    /// What bounds round 0.
    pub bound: &'static str,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Total time, s.
    pub total_s: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Of the downtime, hashing still owed at the end, ms.
    pub hash_owed_ms: f64,
}

/// Measures [`Costs`] on this host.
pub fn measure() -> Result<Costs> {
    Ok(Costs {
        hash_gbps: measure_hash()?,
        pin_s_per_gib: measure_pin(false)?.context("pinning 4 KiB pages")?,
        pin_huge_s_per_gib: measure_pin(true)?,
        scan_s_per_gib: measure_scan(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

fn measure_hash() -> Result<f64> {
    const BYTES: u64 = 256 << 20;
    let buf: Vec<u8> = (0..BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let hashes = PageHashes::new_zeroed(&RamLayout::single(BYTES));
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: `buf` is readable for BYTES bytes and not written during the call.
        unsafe { hashes.update(0, BYTES, buf.as_ptr()) };
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(BYTES as f64 / best / 1e9)
}

/// Seconds to pin one GiB of populated memory (`huge`: 2 MiB hugetlb pages, None if the
/// pool cannot hold a GiB).
fn measure_pin(huge: bool) -> Result<Option<f64>> {
    const LEN: usize = 1 << 30;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
    let flags = if huge {
        flags | libc::MAP_HUGETLB
    } else {
        flags
    };
    // SAFETY: a fresh anonymous mapping, unmapped below; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        if huge {
            return Ok(None);
        }
        return Err(std::io::Error::last_os_error()).context("mmap 1 GiB");
    }
    let mut best = f64::MAX;
    let mut failed = None;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: `p..p + LEN` is our mapping.
        if unsafe { libc::mlock(p, LEN) } != 0 {
            failed = Some(std::io::Error::last_os_error());
            break;
        }
        best = best.min(t.elapsed().as_secs_f64());
        // SAFETY: as above.
        unsafe { libc::munlock(p, LEN) };
    }
    // SAFETY: as above; the mapping is not used after this.
    unsafe { libc::munmap(p, LEN) };
    match failed {
        Some(e) => Err(e).context("mlock 1 GiB (root or a large enough `ulimit -l` needed)"),
        None => Ok(Some(best)),
    }
}

fn measure_scan() -> f64 {
    const RAM: u64 = 16 << 30;
    let layout = RamLayout::single(RAM);
    let mut bitmap = DirtyBitmap::new(&layout);
    // 1 % of pages dirty, in runs of 8 pages.
    let pages = RAM / PAGE_SIZE;
    let mut p = 0;
    while p < pages {
        for k in 0..8 {
            bitmap.set_page((p + k) * PAGE_SIZE);
        }
        p += 800;
    }
    let t = Instant::now();
    let extents = bitmap.extents();
    let n = chunks(&extents, CHUNK_PAGES, CHUNK_EXTENTS).len();
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(n);
    s / (RAM as f64 / GIB)
}

/// Projects one migration of `a.ram_gib` over `link` with `costs`; `busy` adds the dirtying
/// workload; `huge` uses the huge-page pinning cost.
pub fn project(costs: &Costs, a: &Assumptions, link: Link, busy: bool, huge: bool) -> Projection {
    let ram = a.ram_gib * GIB;
    let pin = if huge {
        costs
            .pin_huge_s_per_gib
            .unwrap_or(costs.pin_s_per_gib / 512.0)
    } else {
        costs.pin_s_per_gib
    } * a.reg_over_pin;
    let link_bps = f64::from(link.rails) * link.gbit * 1e9 / 8.0 * a.goodput;
    // Source registration happens as round 0's writes reach blocks, on every writer at once.
    let reg_bps = GIB / pin * a.writers_per_rail * f64::from(link.rails);
    let hash_bps = costs.hash_gbps * 1e9 * a.hash_threads;
    let (round0_bps, bound) = if reg_bps < link_bps {
        (reg_bps, "source registration")
    } else {
        (link_bps, "link")
    };
    let setup_s = a.ram_gib * pin;
    // Round 0: all of RAM. Later rounds: what the guest dirtied meanwhile (within its working
    // set), at the link's rate (registered already).
    // Between rounds the source reads the dirty log and cuts it into chunks.
    let scan_s = costs.scan_s_per_gib * a.ram_gib;
    let mut t = ram / round0_bps + scan_s;
    let mut owed = (ram - hash_bps * t).max(0.0);
    let mut last = if busy {
        (a.dirty_gbps * 1e9 * t).min(a.working_set_gib * GIB)
    } else {
        0.0
    };
    let mut rounds = 1;
    let limit = a.downtime_limit_ms / 1e3;
    while last / link_bps > limit && rounds < livemig_engine::defaults::MAX_ROUNDS {
        let dt = last / link_bps + scan_s;
        // The destination hashes during this round: its backlog shrinks by what it can hash
        // beyond what lands.
        owed = (owed + last - hash_bps * dt).max(0.0);
        t += dt;
        last = (a.dirty_gbps * 1e9 * dt).min(a.working_set_gib * GIB);
        rounds += 1;
    }
    // Stop-and-copy: the last scan and the last round, then whatever hashing is owed — at
    // least the last slice (32 MiB at most), which can only be hashed once it landed.
    let copy_s = last / link_bps;
    let slice = (32u64 << 20) as f64;
    let after = (owed + last - hash_bps * copy_s).max(last.min(slice));
    let hash_owed_s = after / hash_bps;
    let copy_s = copy_s + scan_s;
    let downtime_s = a.switchover_ms / 1e3 + copy_s + hash_owed_s;
    Projection {
        link: link.name,
        case: format!(
            "{}, {} pages",
            if busy {
                format!(
                    "dirtying {} GB/s over {} GiB",
                    a.dirty_gbps, a.working_set_gib
                )
            } else {
                "idle".to_string()
            },
            if huge { "2 MiB" } else { "4 KiB" }
        ),
        setup_s,
        round0_gbps: round0_bps / 1e9,
        bound,
        rounds: rounds + 1,
        total_s: setup_s + t + downtime_s,
        downtime_ms: downtime_s * 1e3,
        hash_owed_ms: hash_owed_s * 1e3,
    }
}

/// The links of the model.
pub const LINKS: [Link; 2] = [
    Link {
        name: "1 x 100 Gb/s",
        rails: 1,
        gbit: 100.0,
    },
    Link {
        name: "2 x 200 Gb/s",
        rails: 2,
        gbit: 200.0,
    },
];

/// The model as markdown: measured costs, assumptions, projections.
pub fn render(costs: &Costs, a: &Assumptions, commit: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# RDMA at scale: a model for a {} GiB VM\n", a.ram_gib);
    let _ = writeln!(
        s,
        "Generated by `livemig bench --rdma-model` at commit {commit} on this host ({} cores). \
         This host has no RDMA NIC: the NIC's goodput is an assumption; livemig's and the \
         kernel's costs are measured here, natively. Model: `bench/src/rdma_model.rs`.\n",
        costs.cores
    );
    let _ = writeln!(s, "## Measured here (one core)\n");
    let _ = writeln!(s, "| cost | value |\n|---|---|");
    let _ = writeln!(
        s,
        "| page hashing (xxh3 per 4 KiB page) | {:.2} GB/s |",
        costs.hash_gbps
    );
    let _ = writeln!(
        s,
        "| pinning populated memory, 4 KiB pages (`mlock`) | {:.3} s/GiB |",
        costs.pin_s_per_gib
    );
    let _ = writeln!(
        s,
        "| pinning, 2 MiB huge pages | {} |",
        costs.pin_huge_s_per_gib.map_or(
            "not measured (no hugetlb pool of 1 GiB here; modelled as 4 KiB / 512)".into(),
            |v| format!("{v:.4} s/GiB")
        )
    );
    let _ = writeln!(
        s,
        "| dirty bitmap → extents → 1 MiB chunks (1 % dirty) | {:.0} µs per GiB of RAM |\n",
        costs.scan_s_per_gib * 1e6
    );
    let _ = writeln!(s, "## Assumptions\n");
    let _ = writeln!(
        s,
        "- RDMA WRITEs of 1 MiB reach {:.0} % of line rate (RoCE v2 headers at MTU 4096 cost \
         ~1.5 %; perftest's ib_write_bw on ConnectX-class NICs reports 90–97 %). At 1 MiB per \
         write, 100 Gb/s is 12 k writes/s per port: posting (a few hundred ns per chained \
         write) and completions (one signalled per 32) cost under 1 % of a core, so neither \
         bounds a round.",
        a.goodput * 100.0
    );
    let _ = writeln!(
        s,
        "- Registration (`ibv_reg_mr`) costs {}× the pinning measured here (the IOMMU and the \
         NIC's translation entries come on top: this is a lower bound). The destination \
         registers all its RAM at set-up (unless `receive --reserve-mib` registered it when it \
         started: then set-up is 0); the source registers 32 MiB blocks as round 0's \
         writes first reach them, on its {} writers per rail in parallel, so registration can \
         bound round 0.",
        a.reg_over_pin, a.writers_per_rail
    );
    let _ = writeln!(
        s,
        "- The destination has at least 8 cores and hashes landed slices on {} threads (one \
         per core, at most 8) at this host's per-core rate. What it has not hashed when the \
         last round lands is inside the downtime.",
        a.hash_threads
    );
    let _ = writeln!(
        s,
        "- Pause, vCPU and device state, revoking the queue pairs and resume: {} ms (an idle \
         memory-only VM's whole downtime over loopback TCP here is ~4 ms, docs/bench/latest).",
        a.switchover_ms
    );
    let _ = writeln!(
        s,
        "- Busy guest: dirties {} GB/s within a {} GiB working set; stop-and-copy once the last \
         round fits {} ms. Dirtying is not throttled (auto-converge would only shorten it).",
        a.dirty_gbps, a.working_set_gib, a.downtime_limit_ms
    );
    let _ = writeln!(
        s,
        "- Not modelled: KVM's own dirty-log calls (GET/CLEAR_DIRTY_LOG: a 2 MiB bitmap for \
         64 GiB, plus write-protecting what was dirtied), NUMA placement, and the PCIe \
         bandwidth of the NICs (a 2×200 Gb/s pair needs PCIe 5.0 x16 or two slots).\n"
    );
    let _ = writeln!(s, "## Projection\n");
    let _ = writeln!(
        s,
        "| link | guest | set-up (destination registration) s | round 0 GB/s | bound by | rounds | total s | downtime ms | of which hashing owed ms |\n|---|---|---|---|---|---|---|---|---|"
    );
    for link in LINKS {
        for (busy, huge) in [(false, false), (false, true), (true, false), (true, true)] {
            let p = project(costs, a, link, busy, huge);
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {} | {} | {:.1} | {:.0} | {:.0} |",
                p.link,
                p.case,
                p.setup_s,
                p.round0_gbps,
                p.bound,
                p.rounds,
                p.total_s,
                p.downtime_ms,
                p.hash_owed_ms
            );
        }
    }
    let heavy = Assumptions {
        reg_over_pin: 4.0,
        ..*a
    };
    let p = project(costs, &heavy, LINKS[0], false, false);
    let q = project(costs, &heavy, LINKS[1], false, false);
    let _ = writeln!(
        s,
        "\nSensitivity: if registration costs 4× the pinning measured here (IOMMU mapping and \
         translation entries for every 4 KiB page), an idle VM with 4 KiB pages takes {:.1} s \
         of set-up and round 0 runs at {:.1} GB/s ({}) on 1 x 100 Gb/s, {:.1} GB/s ({}) on \
         2 x 200 Gb/s: total {:.1} s and {:.1} s.",
        p.setup_s, p.round0_gbps, p.bound, q.round0_gbps, q.bound, p.total_s, q.total_s
    );
    let _ = writeln!(
        s,
        "\nReading it: with 4 KiB pages the source's registration, not the NIC, bounds round 0 \
         wherever its writers pin slower than the link carries; 2 MiB pages remove that bound. The \
         destination's hashing keeps up with a link while hash threads × per-core rate exceed \
         its goodput; past that, the backlog of round 0 lands in the downtime of an idle VM."
    );
    s
}

/// `livemig bench --rdma-model`: measures, projects, prints and writes `results.md` to `out`.
pub fn run(out: Option<&Path>) -> Result<()> {
    let costs = measure()?;
    let commit = crate::report::git_commit();
    let text = render(&costs, &Assumptions::default(), &commit);
    print!("{text}");
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let p: PathBuf = dir.join("results.md");
        std::fs::write(&p, &text).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> Costs {
        Costs {
            hash_gbps: 5.0,
            pin_s_per_gib: 0.2,
            pin_huge_s_per_gib: Some(0.002),
            scan_s_per_gib: 0.001,
            cores: 2,
        }
    }

    #[test]
    fn the_model_follows_its_bounds() {
        let a = Assumptions::default();
        let c = costs();
        // 4 KiB pages: registration on two writers (10.7 GB/s) bounds round 0 below
        // 100 Gb/s x 0.92.
        let p = project(&c, &a, LINKS[0], false, false);
        assert_eq!(p.bound, "source registration");
        assert!(
            (p.round0_gbps - 2.0 * GIB / 0.2 / 1e9).abs() < 1e-6,
            "{p:?}"
        );
        assert!((p.setup_s - 64.0 * 0.2).abs() < 1e-9);
        // Huge pages: the link bounds it, 11.5 GB/s.
        let h = project(&c, &a, LINKS[0], false, true);
        assert_eq!(h.bound, "link");
        assert!(
            (h.round0_gbps - 100e9 / 8.0 * 0.92 / 1e9).abs() < 1e-6,
            "{h:?}"
        );
        // Idle: two rounds (round 0 and an empty final one); hashing at 40 GB/s keeps up with
        // 11.5 GB/s, so nothing is owed and the downtime is the switchover and the last scan.
        assert_eq!(h.rounds, 2);
        let scan_ms = c.scan_s_per_gib * 64.0 * 1e3;
        assert!(
            h.hash_owed_ms < 1e-6 && (h.downtime_ms - a.switchover_ms - scan_ms).abs() < 1e-6,
            "{h:?}"
        );
        // 2 x 200 Gb/s (46 GB/s) outruns 8 x 5 GB/s of hashing: round 0 leaves a backlog that
        // lands in the downtime.
        let w = project(&c, &a, LINKS[1], false, true);
        assert!(w.hash_owed_ms > 100.0, "{w:?}");
        // A busy guest needs more rounds and stops longer than an idle one, within the limit
        // plus the switchover (and what hashing is owed).
        let b = project(&c, &a, LINKS[0], true, true);
        assert!(
            b.rounds > h.rounds && b.downtime_ms > h.downtime_ms,
            "{b:?}"
        );
        assert!(b.downtime_ms <= a.downtime_limit_ms + a.switchover_ms + b.hash_owed_ms + 1e-6);
    }
}
