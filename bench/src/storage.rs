//! Shared-nothing storage migration, side by side: livemig's `--storage copy`, QEMU's
//! shared-nothing path (an NBD server on the destination, `blockdev-mirror` to it until the
//! job is ready, then the RAM migration, then the mirror completed) and the raw copy limit of
//! the link, in one run over the same emulated link, alternating repetitions.
//!
//! Both VMs are idle (QEMU's is paused, ours neither dirties RAM nor writes its disk), with
//! the same random RAM content and the same sparse image; both destinations fault their RAM
//! in ahead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livemig_engine::control::MigrateRequest;
use livemig_engine::storage::StorageMode;
use livemig_engine::vm::{Backend, Fill};
use livemig_transport::codec::Mode;
use serde_json::{json, Value};

use crate::limits::raw_tcp_gbps;
use crate::pair::{Pair, PairAuth, PairSpec};
use crate::qemu::{qemu, write_ram_file, Qmp};
use crate::report::{git_commit, machine, median, run_folders};
use crate::support::{kvm_available, which, write_key, NetnsHosts};

/// What to measure.
#[derive(Debug, Clone)]
pub struct StorageBench {
    /// Guest RAM, MiB.
    pub ram_mib: u64,
    /// Disk size, MiB.
    pub disk_mib: u64,
    /// Of which allocated (random data), MiB.
    pub allocated_mib: u64,
    /// Link profile of `scripts/netns-link.sh` (`10gbit`, `1gbit`, `none`).
    pub link: String,
    /// Repetitions of each system.
    pub repeat: usize,
    /// Leave QEMU out.
    pub no_qemu: bool,
    /// Results folder (default: results/bench-storage-DATE-TIME).
    pub out: Option<PathBuf>,
}

impl Default for StorageBench {
    fn default() -> Self {
        StorageBench {
            ram_mib: 1024,
            disk_mib: 4096,
            allocated_mib: 1024,
            link: "10gbit".into(),
            repeat: 3,
            no_qemu: false,
            out: None,
        }
    }
}

/// A sparse image of `size_mib` MiB with `allocated_mib` MiB of random data in four runs.
fn sparse_image(path: &Path, size_mib: u64, allocated_mib: u64) -> Result<()> {
    use std::io::Seek;
    let mut f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    f.set_len(size_mib << 20)?;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; 1 << 20];
    let per_run = allocated_mib.div_ceil(4);
    let mut left = allocated_mib;
    for run in 0..4 {
        f.seek(std::io::SeekFrom::Start((run * size_mib / 4) << 20))?;
        for _ in 0..per_run.min(left) {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf)?;
        }
        left = left.saturating_sub(per_run);
    }
    f.sync_all()?;
    Ok(())
}

/// Runs the comparison with the `livemig` binary `exe`; writes `results.json` and
/// `results.md` and prints the table.
pub fn run(b: &StorageBench, exe: &Path) -> Result<()> {
    let (out, work, stamp) = run_folders(b.out.as_deref(), "bench-storage")?;
    let qemu_on = !b.no_qemu && which("qemu-system-x86_64");
    let hosts = NetnsHosts::up(&format!("lms{}", std::process::id() % 10_000), &b.link)?;
    let image = work.join("disk.img");
    eprintln!(
        "storage bench: {} MiB image ({} MiB allocated) + {} MiB RAM over {}",
        b.disk_mib, b.allocated_mib, b.ram_mib, b.link
    );
    sparse_image(&image, b.disk_mib, b.allocated_mib)?;
    let key = write_key(&work)?;
    let moved = (b.ram_mib + b.allocated_mib) << 20;
    let raw = raw_tcp_gbps(exe, Some(&hosts), 2, 2 << 30)?;
    let mut runs = Vec::new();
    for rep in 0..b.repeat.max(1) {
        eprintln!("storage bench: repetition {}", rep + 1);
        // Each run starts with the page cache's dirty data written back (the previous run's
        // copy), so no run pays for another's writeback.
        settle();
        let ours = livemig(b, exe, &work, &key, &image, &hosts)
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        runs.push(json!({"system": "livemig", "repetition": rep, "report": ours}));
        if qemu_on {
            settle();
            let theirs = qemu_mirror(b, &work, &image, &hosts)
                .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
            runs.push(json!({"system": "qemu", "repetition": rep, "report": theirs}));
        }
    }
    drop(hosts);
    let _ = std::fs::remove_dir_all(&work);
    let summary = |system: &str, key: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r["system"] == system)
            .filter_map(|r| r["report"][key].as_f64())
            .collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let raw_ms = moved as f64 / (raw * 1e9) * 1e3;
    let mut md = format!(
        "# Storage migration: {} MiB image ({} MiB allocated) + {} MiB RAM over {}\n\n\
         median of {} repetitions, alternating; raw TCP limit of the link {raw:.2} GB/s (2 \
         streams)\n\n| system | total time | downtime | vs raw copy limit |\n|---|---|---|---|\n",
        b.disk_mib,
        b.allocated_mib,
        b.ram_mib,
        b.link,
        b.repeat.max(1)
    );
    md += &format!("| raw copy of RAM + allocated blocks | {raw_ms:.0} ms | – | 1.00× |\n");
    for system in ["livemig", "qemu"] {
        if let (Some(t), Some(d)) = (
            summary(system, "total_time_ms"),
            summary(system, "downtime_ms"),
        ) {
            md += &format!(
                "| {system} | {t:.0} ms | {d:.1} ms | {:.2}× the limit's time |\n",
                t / raw_ms
            );
        }
    }
    if let (Some(a), Some(q)) = (
        summary("livemig", "total_time_ms"),
        summary("qemu", "total_time_ms"),
    ) {
        md += &format!(
            "\nlivemig / QEMU total time: {:.2} ({})\n",
            a / q,
            if a <= q {
                "livemig faster"
            } else {
                "livemig slower"
            }
        );
    }
    let results = json!({
        "meta": {
            "date": stamp,
            "commit": git_commit(),
            "machine": machine(),
            "ram_mib": b.ram_mib,
            "disk_mib": b.disk_mib,
            "allocated_mib": b.allocated_mib,
            "link": b.link,
            "raw_tcp_gbps": raw,
            "raw_copy_ms": raw_ms,
        },
        "runs": runs,
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("results.md"), &md)?;
    println!("{md}\nresults in {}", out.display());
    Ok(())
}

/// Writes dirty page-cache data back and lets the machine settle.
fn settle() {
    crate::support::sync_disks();
    std::thread::sleep(Duration::from_secs(1));
}

/// livemig: the built-in guest with the image as its disk, `--storage copy`.
fn livemig(
    b: &StorageBench,
    exe: &Path,
    work: &Path,
    key: &Path,
    image: &Path,
    hosts: &NetnsHosts,
) -> Result<Value> {
    let dir = work.join("livemig");
    let _ = std::fs::remove_dir_all(&dir);
    let copies = dir.join("copies");
    std::fs::create_dir_all(&copies)?;
    let backend = if kvm_available() {
        Backend::Kvm
    } else {
        Backend::Memory
    };
    let p = Pair::start(&PairSpec {
        exe,
        dir: &dir,
        auth: PairAuth::KeyFile(key),
        backend,
        reserve_mib: Some(b.ram_mib),
        ns: Some((hosts.ns_a.as_str(), hosts.ns_b.as_str())),
        listen: format!("{}:7403", hosts.addr_b),
        vm_args: vec![
            "--memory".into(),
            b.ram_mib.to_string(),
            "--fill".into(),
            Fill::Random.name().into(),
            "--disk".into(),
            image.display().to_string(),
        ],
        receive_args: vec!["--storage-dir".into(), copies.display().to_string()],
    })?;
    let req = MigrateRequest {
        compress: Mode::None,
        storage: StorageMode::Copy,
        ..MigrateRequest::to("")
    };
    let report = p.migrate(&req, &mut |_| {})?;
    if report["status"] != "completed" {
        bail!("livemig: {report}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// QEMU: NBD export of the destination's (empty) image, mirror of the source drive to it
/// until ready, RAM migration, then the mirror completed. Total time from the mirror's start
/// to the migration's completion.
fn qemu_mirror(b: &StorageBench, work: &Path, image: &Path, hosts: &NetnsHosts) -> Result<Value> {
    let dir = work.join("qemu");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (src_ram, dst_ram) = (
        PathBuf::from(format!("/dev/shm/livemig-bench-sq-{}", std::process::id())),
        PathBuf::from(format!("/dev/shm/livemig-bench-dq-{}", std::process::id())),
    );
    let dst_img = dir.join("copy.img");
    std::fs::File::create(&dst_img)?.set_len(b.disk_mib << 20)?;
    let r = (|| {
        write_ram_file(&src_ram, b.ram_mib, Fill::Random, true)?;
        let drive = |img: &Path| {
            vec![
                "-blockdev".to_string(),
                format!(
                    "driver=file,filename={},node-name=file0,cache.direct=off",
                    img.display()
                ),
                "-blockdev".to_string(),
                "driver=raw,file=file0,node-name=disk0".to_string(),
                "-device".to_string(),
                "virtio-blk-pci,drive=disk0,id=vblk0".to_string(),
            ]
        };
        let (qs, qd) = (dir.join("src.qmp"), dir.join("dst.qmp"));
        let _src = qemu(
            Some(&hosts.ns_a),
            &src_ram,
            b.ram_mib,
            &qs,
            false,
            false,
            &drive(image),
        )?;
        let _dst = qemu(
            Some(&hosts.ns_b),
            &dst_ram,
            b.ram_mib,
            &qd,
            true,
            true,
            &drive(&dst_img),
        )?;
        let mut s = Qmp::connect(&qs)?;
        let mut d = Qmp::connect(&qd)?;
        for q in [&mut s, &mut d] {
            q.cmd(
                "migrate-set-parameters",
                json!({"max-bandwidth": 100_000_000_000u64, "downtime-limit": 300}),
            )?;
        }
        let host = &hosts.addr_b;
        d.cmd(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": host, "port": "7404"}}}),
        )?;
        d.cmd(
            "nbd-server-add",
            json!({"device": "disk0", "writable": true}),
        )?;
        d.cmd(
            "migrate-incoming",
            json!({"uri": format!("tcp:{host}:7405")}),
        )?;
        let t0 = Instant::now();
        s.cmd(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "target0",
                   "server": {"type": "inet", "host": host, "port": "7404"},
                   "export": "disk0"}),
        )?;
        s.cmd(
            "blockdev-mirror",
            json!({"job-id": "mirror0", "device": "disk0", "target": "target0",
                   "sync": "full"}),
        )?;
        wait_ready(&mut s)?;
        let mirror_ms = t0.elapsed().as_secs_f64() * 1e3;
        s.cmd("migrate", json!({"uri": format!("tcp:{host}:7405")}))?;
        let (down, wire) = wait_migrated(&mut s)?;
        let total = t0.elapsed().as_secs_f64() * 1e3;
        s.cmd("block-job-cancel", json!({"device": "mirror0"}))?;
        let _ = d.cmd("nbd-server-stop", json!({}));
        Ok(json!({
            "total_time_ms": total,
            "downtime_ms": down,
            "mirror_ready_ms": mirror_ms,
            "ram_bytes_on_wire": wire,
        }))
    })();
    let _ = std::fs::remove_file(&src_ram);
    let _ = std::fs::remove_file(&dst_ram);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Waits until the mirror job is ready (source and target in sync).
fn wait_ready(s: &mut Qmp) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = s.cmd("query-block-jobs", json!({}))?;
        let job = jobs.as_array().and_then(|j| j.first()).cloned();
        match job {
            Some(j) if j["ready"] == true => return Ok(()),
            Some(_) => {}
            None => bail!("the mirror job vanished before it was ready"),
        }
        if Instant::now() > deadline {
            bail!("the mirror was not ready in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the RAM migration; returns QEMU's downtime and RAM bytes sent.
fn wait_migrated(s: &mut Qmp) -> Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = s.cmd("query-migrate", json!({}))?;
        match st["status"].as_str() {
            Some("completed") => {
                if let Some(d) = st["downtime"].as_f64().filter(|d| *d > 0.0) {
                    return Ok((d, st["ram"]["transferred"].as_f64().unwrap_or(0.0)));
                }
            }
            Some("failed") | Some("cancelled") => bail!("QEMU migration: {st}"),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("QEMU's migration did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
