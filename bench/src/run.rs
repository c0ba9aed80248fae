//! A bench run: the physical limits, then every cell of the matrix, livemig beside QEMU, each
//! repeated; medians into the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use livemig_engine::control::MigrateRequest;
use livemig_engine::vm::Backend;
use livemig_transport::codec::Mode;
use serde_json::{json, Value};

use crate::limits::{compressor_gbps, memcpy_gbps, raw_tcp_gbps};
use crate::matrix::{matrix, Cell, Link, Variant};
use crate::pair::{Pair, PairAuth, PairSpec};
use crate::qemu::run_qemu;
use crate::report::{git_commit, machine, median, run_folders, write_outputs, Row};
use crate::support::{kvm_available, sync_disks, which, write_key, NetnsHosts};

/// Working set of the bench's dirtying guests (livemig's and, booted from the same
/// program's PVH ELF, QEMU's), in MiB, written in random order.
pub(crate) const WORKING_SET_MIB: u64 = 64;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// A small matrix (loopback and one shaped link, small RAM, one repetition).
    pub quick: bool,
    /// Results folder (default: results/bench-DATE-TIME).
    pub out: Option<PathBuf>,
    /// Repetitions per cell (default: 3, or 1 with `quick`).
    pub repeat: Option<usize>,
    /// Leave QEMU out.
    pub no_qemu: bool,
    /// The command line, as recorded in the results.
    pub command: String,
    /// Only the cells whose description (`link fill MiB pages/s variant`) contains one of
    /// these (empty: every cell).
    pub only: Vec<String>,
}

/// Two emulated hosts joined by `link` (loopback: both in one namespace of their own, so that
/// its `lo` counts only their traffic).
pub(crate) fn hosts_for(link: Link) -> Result<NetnsHosts> {
    let name = format!(
        "lmb{}{}",
        std::process::id() % 10_000,
        match link {
            Link::Loopback => "l",
            Link::TenGbit => "t",
            Link::OneGbit => "o",
        }
    );
    NetnsHosts::up(&name, link.name())
}

/// Redraws the table and plots of an earlier run's results folder.
pub fn redraw(dir: &Path) -> Result<()> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("results.json"))?)
        .context("reading results.json")?;
    let rows: Vec<Row> = serde_json::from_value(v["rows"].clone()).context("results.json rows")?;
    let raw = v["runs"].as_array().cloned().unwrap_or_default();
    write_outputs(dir, &v["meta"], &rows, &raw)?;
    println!("{}", std::fs::read_to_string(dir.join("results.md"))?);
    Ok(())
}

/// Runs the matrix with the `livemig` binary `exe`, writes the results folder and prints the
/// table.
pub fn run(a: &BenchOptions, exe: &Path) -> Result<()> {
    let (out, work, stamp) = run_folders(a.out.as_deref(), "bench")?;
    let qemu = !a.no_qemu && which("qemu-system-x86_64");
    if !a.no_qemu && !qemu {
        eprintln!("livemig bench: qemu-system-x86_64 not found: QEMU rows left out (scripts/bench.sh installs it)");
    }
    let backend = if kvm_available() {
        Backend::Kvm
    } else {
        Backend::Memory
    };
    let repeat = a.repeat.unwrap_or(if a.quick { 1 } else { 3 }).max(1);
    let cells: Vec<Cell> = matrix(a.quick, qemu)
        .into_iter()
        .filter(|c| a.only.is_empty() || a.only.iter().any(|o| c.describe().contains(o.as_str())))
        .collect();
    if cells.is_empty() {
        anyhow::bail!("no cell of the matrix matches --only {:?}", a.only);
    }
    let started = Instant::now();
    let bar = ProgressBar::new((cells.len() * repeat) as u64 + 3);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40.cyan/blue}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut links: Vec<Link> = cells.iter().map(|c| c.link).collect();
    links.sort();
    links.dedup();
    let mut hosts: BTreeMap<Link, NetnsHosts> = BTreeMap::new();
    for &link in &links {
        hosts.insert(link, hosts_for(link)?);
    }
    let limits = physical_limits(exe, &links, &hosts, &bar)?;
    let key_file = write_key(&work)?;
    let setting = Setting {
        exe,
        work: &work,
        key: &key_file,
        backend,
    };
    let mut rows = Vec::new();
    let mut raw = Vec::new();
    // The variants of the same work take turns, one repetition each (A B C A B C ...): the
    // load this shared host is under changes over minutes, and every variant compared in a
    // row then meets the same moments.
    for group in cells.chunk_by(|a, b| a.same_work(b)) {
        let mut reps: Vec<Vec<Value>> = vec![Vec::new(); group.len()];
        for rep in 0..repeat {
            for (cell, got) in group.iter().zip(reps.iter_mut()) {
                if let Some(r) = measure(&setting, cell, hosts.get(&cell.link), rep, &bar) {
                    raw.push(json!({"cell": format!("{cell:?}"), "repetition": rep, "report": r}));
                    got.push(r);
                }
            }
        }
        for (cell, got) in group.iter().zip(&reps) {
            rows.extend(row(cell, got));
        }
    }
    bar.finish_with_message(format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    drop(hosts);
    let _ = std::fs::remove_dir_all(&work);

    let meta = json!({
        "date": stamp,
        "command": a.command.clone(),
        "commit": git_commit(),
        "machine": machine(),
        "backend": backend.name(),
        "repetitions": repeat,
        "duration_s": started.elapsed().as_secs_f64(),
        "physical_limits": limits,
    });
    write_outputs(&out, &meta, &rows, &raw)?;
    println!("{}", std::fs::read_to_string(out.join("results.md"))?);
    println!("results in {}", out.display());
    if rows.iter().any(|r| r.digest_match == Some(false)) {
        bail!("a livemig migration ended with a digest mismatch");
    }
    Ok(())
}

/// memcpy and the compressors on one core, and raw TCP RAM to RAM over every link, 1 and 2
/// streams.
fn physical_limits(
    exe: &Path,
    links: &[Link],
    hosts: &BTreeMap<Link, NetnsHosts>,
    bar: &ProgressBar,
) -> Result<BTreeMap<String, Value>> {
    bar.set_message("physical limits: memcpy");
    let mut limits = BTreeMap::new();
    limits.insert("memcpy_one_core_gbps".to_string(), json!(memcpy_gbps()));
    bar.set_message("physical limits: compressors");
    for (k, g) in compressor_gbps()? {
        limits.insert(k, json!(g));
    }
    bar.inc(1);
    for &link in links {
        bar.set_message(format!("physical limits: raw TCP over {}", link.name()));
        for streams in [1u16, 2] {
            let bytes = if link == Link::OneGbit {
                64 << 20
            } else {
                1 << 30
            };
            let g = raw_tcp_gbps(exe, hosts.get(&link), streams, bytes)?;
            limits.insert(format!("raw_tcp_{}_x{streams}_gbps", link.name()), json!(g));
        }
    }
    bar.inc(2);
    Ok(limits)
}

/// One repetition of a cell: its report, or None (said on the progress bar) when it failed.
fn measure(
    s: &Setting<'_>,
    cell: &Cell,
    hosts: Option<&NetnsHosts>,
    rep: usize,
    bar: &ProgressBar,
) -> Option<Value> {
    bar.set_message(format!(
        "{} {} {} MiB {} rate {} (#{})",
        cell.variant.label(),
        cell.link.name(),
        cell.memory_mib,
        cell.fill.name(),
        cell.dirty_rate,
        rep + 1
    ));
    sync_disks();
    let link_before = hosts.map(NetnsHosts::rx_bytes_b);
    let r = match &cell.variant {
        Variant::Livemig {
            channels,
            compress,
            reserve,
            encrypt,
        } => run_livemig(s, cell, hosts, (*channels, compress, *reserve, *encrypt)),
        Variant::Qemu {
            channels,
            zstd,
            prealloc,
            tls,
        } => run_qemu(s.work, cell, hosts, *channels, *zstd, *prealloc, *tls),
    };
    bar.inc(1);
    // What crossed the link into the destination's host, counted at its interface the same
    // way for both systems (headers included; on loopback, both directions).
    let r = r.map(|mut r| {
        if let (Some(b), Some(h), Value::Object(m)) = (link_before, hosts, &mut r) {
            m.insert("link_bytes".into(), json!(h.rx_bytes_b().saturating_sub(b)));
        }
        r
    });
    match r {
        Ok(r)
            if r["total_time_ms"]
                .as_f64()
                .is_some_and(|t| t.is_finite() && t > 0.0) =>
        {
            Some(r)
        }
        Ok(r) => {
            say(
                bar,
                format!("{}: no total time in {r}", cell.variant.label()),
            );
            None
        }
        Err(e) => {
            say(bar, format!("{}: {e:#}", cell.variant.label()));
            None
        }
    }
}

/// Prints why a run has no figures: above the progress bar on a terminal, else on stderr
/// (a hidden bar prints nothing, and CI logs must say why a cell is missing).
fn say(bar: &ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}

/// The row of a cell from its repetitions' reports (None without any).
fn row(cell: &Cell, reps: &[Value]) -> Option<Row> {
    if reps.is_empty() {
        return None;
    }
    let col = |k: &str| -> Vec<f64> { reps.iter().filter_map(|r| r[k].as_f64()).collect() };
    let mut totals = col("total_time_ms");
    let min = totals.iter().copied().fold(f64::MAX, f64::min);
    let max = totals.iter().copied().fold(0.0, f64::max);
    let total = median(&mut totals);
    let digest = reps
        .iter()
        .map(|r| r.get("digest_match").and_then(Value::as_bool))
        .try_fold(true, |all, d| d.map(|d| all && d));
    let (mut src_cpu, mut dst_cpu) = (col("source_cpu_s"), col("destination_cpu_s"));
    let (mut src_proc, mut dst_proc) = (
        col("source_process_cpu_s"),
        col("destination_process_cpu_s"),
    );
    let mut link_bytes = col("link_bytes");
    let mut guest = col("source_guest_cpu_s");
    let opt_median = |v: &mut Vec<f64>| (!v.is_empty()).then(|| median(v));
    Some(Row {
        system: cell.variant.system().into(),
        variant: cell.variant.label(),
        link: cell.link.name().into(),
        content: cell.content(),
        memory_mib: cell.memory_mib,
        dirty_rate: cell.dirty_rate,
        downtime_limit_ms: cell.downtime_limit_ms,
        repetitions: reps.len(),
        total_ms_median: total,
        total_ms_min: min,
        total_ms_max: max,
        downtime_ms_median: median(&mut col("downtime_ms")),
        bytes_on_wire_median: median(&mut col("bytes_on_wire")),
        throughput_gbps: (cell.memory_mib << 20) as f64 / (total / 1000.0) / 1e9,
        digest_match: if cell.variant.system() == "qemu" {
            None
        } else {
            digest
        },
        source_cpu_s: (!src_cpu.is_empty()).then(|| median(&mut src_cpu)),
        destination_cpu_s: (!dst_cpu.is_empty()).then(|| median(&mut dst_cpu)),
        source_process_cpu_s: opt_median(&mut src_proc),
        destination_process_cpu_s: opt_median(&mut dst_proc),
        link_bytes_median: opt_median(&mut link_bytes),
        source_guest_cpu_s: opt_median(&mut guest),
    })
}

/// Where a livemig cell runs: the binary, a work folder, the key, the backend.
struct Setting<'a> {
    exe: &'a Path,
    work: &'a Path,
    key: &'a Path,
    backend: Backend,
}

fn run_livemig(
    s: &Setting<'_>,
    cell: &Cell,
    hosts: Option<&NetnsHosts>,
    (channels, compress, reserve, encrypt): (u16, &str, bool, bool),
) -> Result<Value> {
    let clear: Vec<String> = if encrypt {
        Vec::new()
    } else {
        vec!["--encrypt".into(), "off".into()]
    };
    let (exe, work, key, backend) = (s.exe, s.work, s.key, s.backend);
    let dir = work.join("pair");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let p = Pair::start(&PairSpec {
        exe,
        dir: &dir,
        auth: PairAuth::KeyFile(key),
        backend,
        reserve_mib: reserve.then_some(cell.memory_mib),
        ns: hosts.map(|h| (h.ns_a.as_str(), h.ns_b.as_str())),
        listen: hosts
            .map(|h| format!("{}:7400", h.addr_b))
            .unwrap_or_else(|| "127.0.0.1:0".into()),
        vm_args: vec![
            "--memory".into(),
            cell.memory_mib.to_string(),
            "--fill".into(),
            cell.fill.name().into(),
            "--dirty-rate".into(),
            cell.dirty_rate.to_string(),
            "--working-set".into(),
            WORKING_SET_MIB.to_string(),
            "--pattern".into(),
            "random".into(),
        ]
        .into_iter()
        .chain(cell.written.then(|| "--populate-ram".to_string()))
        .chain(clear.iter().cloned())
        .collect(),
        receive_args: clear.clone(),
    })?;
    let req = MigrateRequest {
        channels: Some(channels),
        compress: compress.parse::<Mode>().map_err(|e| anyhow::anyhow!(e))?,
        downtime_limit_ms: cell.downtime_limit_ms,
        max_rounds: 30,
        ..MigrateRequest::to("")
    };
    p.migrate(&req, &mut |_| {})
}
