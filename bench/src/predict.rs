//! `livemig bench --predict`: how good `migrate --plan` is. Each cell runs the plan, then the
//! migration it forecast, with the same options, on the same pair — `--repeat` times, each on a
//! fresh pair (this machine is shared: a downtime of 2 ms reads 5 ms now and then): the median
//! prediction against the median outcome, total time and downtime, every cell shown with the
//! outcomes' range, and the median absolute errors. Beside each,
//! QEMU migrates the same guest (livemig's built-in guest booted from its PVH ELF: same RAM,
//! content, working set and rate) over the same link with auto-converge on, in the same run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use livemig_engine::control::{self, MigrateRequest, PlanRequest};
use livemig_engine::vm::{Backend, Fill, Pattern, VmSpec, Workload};
use serde::Serialize;
use serde_json::{json, Value};

use crate::matrix::Link;
use crate::pair::{Pair, PairAuth, PairSpec};
use crate::qemu::{migrate_qemu, QemuOptions};
use crate::report::{git_commit, machine, median, run_folders};
use crate::run::hosts_for;
use crate::support::{kvm_available, sync_disks, which, write_key, NetnsHosts};

/// One cell: a VM and a link.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PredictCell {
    /// The link.
    pub link: Link,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Pages per second the guest writes.
    pub dirty_rate: u64,
    /// Its working set, MiB.
    pub working_set_mib: u64,
}

/// The cells: RAM 256 MiB–4 GiB, 0–80 000 pages/s, small and large working sets, on every link.
pub fn cells(quick: bool) -> Vec<PredictCell> {
    let c = |link, memory_mib, dirty_rate, working_set_mib| PredictCell {
        link,
        memory_mib,
        dirty_rate,
        working_set_mib,
    };
    use Link::*;
    if quick {
        return vec![
            c(Loopback, 256, 0, 64),
            c(Loopback, 256, 20_000, 64),
            c(OneGbit, 128, 0, 64),
            c(OneGbit, 128, 10_000, 32),
        ];
    }
    vec![
        c(Loopback, 256, 0, 64),
        c(Loopback, 1024, 20_000, 256),
        c(Loopback, 1024, 80_000, 960),
        c(Loopback, 4096, 0, 64),
        c(Loopback, 4096, 40_000, 512),
        c(TenGbit, 512, 0, 64),
        c(TenGbit, 1024, 20_000, 128),
        c(TenGbit, 2048, 60_000, 1024),
        c(OneGbit, 256, 0, 64),
        c(OneGbit, 256, 20_000, 64),
        c(OneGbit, 512, 10_000, 256),
        c(OneGbit, 256, 60_000, 256),
        c(OneGbit, 1024, 5_000, 512),
    ]
}

/// Options of a prediction run.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Four small cells.
    pub quick: bool,
    /// Plan and migration pairs per cell (at least 1).
    pub repeat: usize,
    /// Leave QEMU out.
    pub no_qemu: bool,
    /// Results folder.
    pub out: Option<PathBuf>,
    /// The command line, for the record.
    pub command: String,
}

/// One plan and the migration it forecast.
#[derive(Debug, Clone, Serialize)]
struct Run {
    predicted_total_ms: f64,
    actual_total_ms: f64,
    predicted_downtime_ms: f64,
    actual_downtime_ms: f64,
    /// The migration's own account of its downtime, step by step (ms): the source's
    /// (`source`) and the destination's switchover (`destination`); the pages of the
    /// stop-and-copy; the wait for the last round to land before the pause (`drain`) and the
    /// plan's probe of it (`planned_drain_ms`).
    actual_downtime_detail: Value,
    predicted_rounds: u64,
    actual_rounds: u64,
    predicted_throttle_max: u64,
    actual_throttle_max: u64,
    verdict: String,
}

/// One cell's outcome: the medians of its runs.
#[derive(Debug, Clone, Serialize)]
struct Outcome {
    cell: PredictCell,
    predicted_total_ms: f64,
    actual_total_ms: f64,
    predicted_downtime_ms: f64,
    actual_downtime_ms: f64,
    /// The runs' shortest and longest downtime, ms.
    actual_downtime_range: (f64, f64),
    predicted_rounds: u64,
    actual_rounds: u64,
    predicted_throttle_max: u64,
    actual_throttle_max: u64,
    /// Every plan and migration, in order.
    runs: Vec<Run>,
    /// QEMU with auto-converge on the same guest and link: total ms, downtime ms, its highest
    /// throttle % (seen polling every 20 ms); or why it has no figures.
    qemu: Result<(f64, f64, u64), String>,
}

impl Outcome {
    /// The medians of `runs` (not empty).
    fn of(cell: PredictCell, runs: Vec<Run>) -> Self {
        let med = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let downtimes = runs.iter().map(|r| r.actual_downtime_ms);
        let range = (
            downtimes.clone().fold(f64::INFINITY, f64::min),
            downtimes.fold(0.0, f64::max),
        );
        Outcome {
            cell,
            predicted_total_ms: med(|r| r.predicted_total_ms),
            actual_total_ms: med(|r| r.actual_total_ms),
            predicted_downtime_ms: med(|r| r.predicted_downtime_ms),
            actual_downtime_ms: med(|r| r.actual_downtime_ms),
            actual_downtime_range: range,
            predicted_rounds: med(|r| r.predicted_rounds as f64) as u64,
            actual_rounds: med(|r| r.actual_rounds as f64) as u64,
            predicted_throttle_max: med(|r| r.predicted_throttle_max as f64) as u64,
            actual_throttle_max: med(|r| r.actual_throttle_max as f64) as u64,
            runs,
            qemu: Err("not run".into()),
        }
    }
}

impl Outcome {
    fn total_error(&self) -> f64 {
        rel_error(self.predicted_total_ms, self.actual_total_ms)
    }
    fn downtime_error(&self) -> f64 {
        rel_error(self.predicted_downtime_ms, self.actual_downtime_ms)
    }
}

fn rel_error(predicted: f64, actual: f64) -> f64 {
    (predicted - actual).abs() / actual.max(1e-9)
}

/// Runs every cell: plan, then migrate; writes results.{json,md} and prints the table.
pub fn run(a: &PredictOptions, exe: &Path) -> Result<()> {
    let (out, work, stamp) = run_folders(a.out.as_deref(), "predict")?;
    let key = write_key(&work)?;
    let backend = if kvm_available() {
        Backend::Kvm
    } else {
        Backend::Memory
    };
    let cells = cells(a.quick);
    let mut hosts: BTreeMap<Link, NetnsHosts> = BTreeMap::new();
    for c in &cells {
        if c.link != Link::Loopback && !hosts.contains_key(&c.link) {
            hosts.insert(c.link, hosts_for(c.link)?);
        }
    }
    let started = Instant::now();
    let qemu = which("qemu-system-x86_64");
    let mut outcomes = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        eprintln!(
            "[{}/{}] {} {} MiB, {} pages/s over {} MiB",
            i + 1,
            cells.len(),
            cell.link.name(),
            cell.memory_mib,
            cell.dirty_rate,
            cell.working_set_mib
        );
        let runs: Result<Vec<Run>> = (0..a.repeat.max(1))
            .map(|_| measure(exe, &work, &key, backend, cell, hosts.get(&cell.link)))
            .collect();
        match runs {
            Ok(runs) => {
                let mut o = Outcome::of(*cell, runs);
                o.qemu = if a.no_qemu {
                    Err("left out (--no-qemu)".into())
                } else if qemu {
                    qemu_beside(&work, cell, hosts.get(&cell.link))
                        .map_err(|e| format!("failed: {e}"))
                } else {
                    Err("qemu-system-x86_64 not found".into())
                };
                if let Err(e) = &o.qemu {
                    eprintln!("  QEMU: {e}");
                }
                outcomes.push(o)
            }
            Err(e) => eprintln!("  failed: {e:#}"),
        }
    }
    drop(hosts);
    let _ = std::fs::remove_dir_all(&work);
    let mut total_err: Vec<f64> = outcomes.iter().map(Outcome::total_error).collect();
    let mut down_err: Vec<f64> = outcomes.iter().map(Outcome::downtime_error).collect();
    let summary = json!({
        "cells": outcomes.len(),
        "median_abs_error_total": median(&mut total_err),
        "median_abs_error_downtime": median(&mut down_err),
    });
    let meta = json!({
        "date": stamp,
        "command": a.command,
        "commit": git_commit(),
        "repeat": a.repeat.max(1),
        "machine": machine(),
        "backend": backend.name(),
        "duration_s": started.elapsed().as_secs_f64(),
        "summary": summary,
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json!({"meta": meta, "cells": outcomes}))?,
    )?;
    let md = table(&outcomes, &summary, &meta);
    std::fs::write(out.join("results.md"), &md)?;
    println!("{md}");
    println!("results in {}", out.display());
    Ok(())
}

/// QEMU, auto-converge on, migrating the cell's guest over the cell's link.
fn qemu_beside(
    work: &Path,
    cell: &PredictCell,
    hosts: Option<&NetnsHosts>,
) -> Result<(f64, f64, u64), String> {
    let spec = VmSpec {
        memory_mib: cell.memory_mib,
        vcpus: 1,
        fill: Fill::Random,
        workload: Workload {
            working_set_mib: cell.working_set_mib,
            dirty_rate: cell.dirty_rate,
            pattern: Pattern::Random,
        },
    };
    let o = QemuOptions {
        written: true,
        channels: 1,
        zstd: false,
        prealloc: true,
        tls: None,
        auto_converge: true,
        downtime_limit_ms: 300,
    };
    let dir = work.join("qemu");
    let _ = std::fs::create_dir_all(&dir);
    let r = migrate_qemu(&dir, &spec, hosts, &o).map_err(|e| format!("{e:#}"))?;
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    Ok((
        f("total_time_ms"),
        f("downtime_ms"),
        r["qemu_throttle_max_pct"].as_u64().unwrap_or(0),
    ))
}

/// The markdown table.
fn table(outcomes: &[Outcome], summary: &Value, meta: &Value) -> String {
    let mut s = String::from(
        "# Prediction accuracy: `migrate --plan` against the migration it forecast\n\n",
    );
    s.push_str(&format!(
        "Commit {}, {}; each cell: plan (2 s of dirty log, link probe), then the migration \
         with the same options (1 channel, compress auto, encrypted as by default, limit \
         300 ms, auto-converge), same \
         pair, {} times (a fresh pair each time): the medians of the plans against the medians \
         of the migrations (the downtime's range in brackets); then QEMU (TCG) migrating the same guest (livemig's built-in guest \
         booted from its PVH ELF: same RAM, content, working set and rate) over the same link, \
         single stream (unencrypted), limit 300 ms, auto-converge on.\n\n",
        meta["commit"].as_str().unwrap_or("?"),
        meta["date"].as_str().unwrap_or("?"),
        meta["repeat"].as_u64().unwrap_or(1),
    ));
    s.push_str("| link | RAM MiB | pages/s | working set MiB | total predicted | total actual | error | downtime predicted | downtime actual | error | rounds p/a | throttle p/a | QEMU total | QEMU downtime | QEMU throttle |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for o in outcomes {
        let qemu = match &o.qemu {
            Ok((t, d, th)) => format!("{t:.0} ms | {d:.0} ms | {th}%"),
            Err(e) => format!("{} | — | —", e.replace('|', "/")),
        };
        let (lo, hi) = o.actual_downtime_range;
        let downtime = if o.runs.len() > 1 {
            format!("{:.1} ms ({lo:.1}–{hi:.1})", o.actual_downtime_ms)
        } else {
            format!("{:.1} ms", o.actual_downtime_ms)
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} % | {:.1} ms | {} | {:.0} % | {}/{} | {}%/{}% | {} |\n",
            o.cell.link.name(),
            o.cell.memory_mib,
            o.cell.dirty_rate,
            o.cell.working_set_mib,
            o.predicted_total_ms,
            o.actual_total_ms,
            o.total_error() * 100.0,
            o.predicted_downtime_ms,
            downtime,
            o.downtime_error() * 100.0,
            o.predicted_rounds,
            o.actual_rounds,
            o.predicted_throttle_max,
            o.actual_throttle_max,
            qemu,
        ));
    }
    s.push_str(&format!(
        "\nMedian absolute error over {} cells: total time {:.0} %, downtime {:.0} %.\n",
        summary["cells"],
        summary["median_abs_error_total"].as_f64().unwrap_or(0.0) * 100.0,
        summary["median_abs_error_downtime"].as_f64().unwrap_or(0.0) * 100.0
    ));
    s
}

/// One cell: a fresh pair, the plan, the migration.
fn measure(
    exe: &Path,
    work: &Path,
    key: &Path,
    backend: Backend,
    cell: &PredictCell,
    hosts: Option<&NetnsHosts>,
) -> Result<Run> {
    sync_disks();
    let dir = work.join("pair");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let p = Pair::start(&PairSpec {
        exe,
        dir: &dir,
        auth: PairAuth::KeyFile(key),
        backend,
        reserve_mib: Some(cell.memory_mib),
        ns: hosts.map(|h| (h.ns_a.as_str(), h.ns_b.as_str())),
        listen: hosts
            .map(|h| format!("{}:7400", h.addr_b))
            .unwrap_or_else(|| "127.0.0.1:0".into()),
        vm_args: [
            "--memory",
            &cell.memory_mib.to_string(),
            "--fill",
            "random",
            "--dirty-rate",
            &cell.dirty_rate.to_string(),
            "--working-set",
            &cell.working_set_mib.to_string(),
            "--pattern",
            "random",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        receive_args: Vec::new(),
    })?;
    // Let the guest reach its pace.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let req = MigrateRequest {
        to: p.addr.clone(),
        ..MigrateRequest::to("")
    };
    let plan = control::plan(
        &p.src_sock,
        &PlanRequest {
            migrate: req.clone(),
            window_ms: 2000,
        },
    )?;
    let report = p.migrate(&req, &mut |_| {})?;
    if report["digest_match"] != true {
        anyhow::bail!("digest mismatch: {report}");
    }
    let throttle_max = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["throttle_pct"].as_u64())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    Ok(Run {
        predicted_total_ms: plan.forecast.total_ms,
        actual_total_ms: report["total_time_ms"].as_f64().unwrap_or(0.0),
        predicted_downtime_ms: plan.forecast.downtime_ms,
        actual_downtime_ms: report["downtime_ms"].as_f64().unwrap_or(0.0),
        actual_downtime_detail: json!({
            "stop_and_copy_pages": report["round_details"]
                .as_array()
                .and_then(|r| r.last())
                .map(|r| r["pages"].clone()),
            "drain": report["drain"],
            "planned_drain_ms": plan.link.first().map(|l| l.drain_ms),
            "source": report["downtime_detail"],
            "destination": report["destination_switchover_steps"],
        }),
        predicted_rounds: plan.forecast.rounds,
        actual_rounds: report["rounds"].as_u64().unwrap_or(0),
        predicted_throttle_max: u64::from(
            plan.forecast.throttle.iter().copied().max().unwrap_or(0),
        ),
        actual_throttle_max: throttle_max(&report["round_details"]),
        verdict: plan.verdict,
    })
}
