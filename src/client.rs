//! Talking to a VM process's control socket: `migrate`, `status`, `cancel`, `stop`, with
//! progress bars and the summary table.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use livemig_engine::control::{self, Event, MigrateRequest, PlanRequest, Request};
use livemig_engine::convergence::Eta;
use livemig_engine::defaults;
use livemig_engine::session::MigrationReport;
use livemig_engine::source::{Forecast, TransportChoice};
use livemig_engine::storage::StorageMode;
use livemig_transport::codec::Mode;
use serde_json::Value;

use crate::host::{host_dir, HostDir};
use crate::one_of;

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Control socket of the VM to migrate, or its name in the host's directory
    /// ($LIVEMIG_HOST_DIR, else /run/livemig); repeatable: the VMs migrate at once, each
    /// queued while the source host's outgoing limit is reached.
    #[arg(long, required = true)]
    pub vm: Vec<PathBuf>,
    /// Destination address (host:port of `livemig receive`).
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub tuning: Tuning,
    /// Print one JSON object instead of progress bars and a table.
    #[arg(long)]
    pub json: bool,
    /// Forecast instead of migrating: watch the guest's writes, probe the link to the
    /// destination (which keeps waiting), and predict rounds, total time and downtime for
    /// these options and for alternatives. Nothing moves.
    #[arg(long)]
    pub plan: bool,
    /// With --plan: how long to watch the guest's writes, ms.
    #[arg(long, default_value_t = defaults::PLAN_WINDOW_MS, requires = "plan")]
    pub plan_window_ms: u64,
}

/// Migration tuning shared by `migrate` and `demo`.
#[derive(Args, Debug, Clone)]
pub struct Tuning {
    /// Data channels: TCP connections, or RDMA queue pairs per rail [default: 1 TCP
    /// connection; 2 queue pairs per RDMA rail].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(defaults::MAX_CHANNELS)))]
    pub channels: Option<u16>,
    /// Data transport: TCP connections, RDMA queue pairs (RDMA WRITEs straight into
    /// destination RAM; no compression), or auto: RDMA when a device here has an address in
    /// the destination's subnet and the destination takes RDMA, else TCP.
    #[arg(long, default_value_t = TransportChoice::Tcp, value_parser = one_of::<TransportChoice>(TransportChoice::NAMES))]
    pub transport: TransportChoice,
    /// RDMA device; repeat it to stripe over several rails (NICs or ports). Default: every
    /// active device with an address in the destination's subnet (else the first active
    /// one); see `livemig rdma devices`.
    #[arg(long)]
    pub rdma_device: Vec<String>,
    /// Pause the guest once the predicted downtime is at most this (ms).
    #[arg(long, default_value_t = defaults::DOWNTIME_LIMIT_MS)]
    pub downtime_limit: u64,
    /// Pause the guest after at most this many pre-copy rounds.
    #[arg(long, default_value_t = defaults::MAX_ROUNDS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// Never pause the guest for longer than this (ms, predicted): a migration whose rounds
    /// stop shrinking with more left than fits gives up and the VM keeps running here, with
    /// the figures (default: 10× --downtime-limit).
    #[arg(long)]
    pub max_downtime: Option<u64>,
    /// Do not throttle the guest's vCPUs when it dirties memory faster than the link carries
    /// it (auto-converge is on by default: 20 % first, +10 % per round that does not shrink,
    /// at most 99 %).
    #[arg(long, overrides_with = "auto_converge")]
    pub no_auto_converge: bool,
    /// End pre-copy after this many rounds in a row that do not shrink the dirty set (with
    /// no throttle left to add): stop and copy within --max-downtime, or give up. 0: keep
    /// going until --max-rounds, as QEMU does.
    #[arg(long, default_value_t = defaults::STALL_ROUNDS)]
    pub stall_rounds: u32,
    /// Throttle the guest when needed (the default; undoes an earlier --no-auto-converge).
    #[arg(long, overrides_with = "no_auto_converge")]
    pub auto_converge: bool,
    /// Page encoding: none, zero, lz4, zstd (level 3), zstd:LEVEL (1..19), delta, or auto
    /// (picks per chunk). Zero pages always travel as markers.
    #[arg(long, default_value_t = Mode::Auto)]
    pub compress: Mode,
    /// Cache of last-sent pages for delta encoding, in MiB (with `delta` and `auto`).
    #[arg(long, default_value_t = defaults::DELTA_CACHE_MIB)]
    pub delta_cache_mib: u64,
    /// How the VM's disks move: shared (the destination opens the same images; their locks
    /// move) or copy (shared nothing: the images are copied while the VM runs).
    #[arg(long, default_value_t = StorageMode::Shared, value_parser = one_of::<StorageMode>(StorageMode::NAMES))]
    pub storage: StorageMode,
    /// Copy mode: the directory on the destination for the copies (default: the
    /// destination's `receive --storage-dir`).
    #[arg(long)]
    pub storage_dir: Option<String>,
    /// Copy mode: delete the source images once the VM runs on its copies (as Hyper-V
    /// does); without it they stay.
    #[arg(long)]
    pub remove_source_storage: bool,
    /// Copy mode: every guest write waits until it is on its way to the destination from
    /// the start (default: only once the disks' dirty blocks stop shrinking).
    #[arg(long)]
    pub active_mirror: bool,
    /// Send at most this many MB/s (the host agent's caps apply as well, whichever is lower).
    #[arg(long, value_name = "MB/s", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_bandwidth: Option<u64>,
}

impl Tuning {
    /// The control-socket request for a migration to `to`.
    pub fn request(&self, to: &str) -> MigrateRequest {
        MigrateRequest {
            to: to.to_string(),
            channels: self.channels,
            transport: self.transport,
            rdma_device: None,
            rdma_devices: self.rdma_device.clone(),
            compress: self.compress,
            downtime_limit_ms: self.downtime_limit,
            max_rounds: self.max_rounds,
            max_downtime_ms: self.max_downtime,
            auto_converge: !self.no_auto_converge,
            stall_rounds: self.stall_rounds,
            delta_cache_mib: self.delta_cache_mib,
            storage: self.storage,
            storage_dir: self.storage_dir.clone(),
            remove_source_storage: self.remove_source_storage,
            active_mirror: self.active_mirror,
            max_bandwidth_mbps: self.max_bandwidth,
        }
    }
}

/// Sends one request and prints the JSON answer.
pub fn simple(socket: &Path, req: &Request) -> Result<()> {
    let answer = control::request(socket, req)
        .with_context(|| format!("talking to VM control socket {}", socket.display()))?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// `livemig resolve`: sends the destination's record to the VM process, which resumes or
/// stops the VM accordingly.
pub fn resolve(socket: &Path, record: &Path) -> Result<()> {
    let text = std::fs::read_to_string(record)
        .with_context(|| format!("reading the destination's record {}", record.display()))?;
    let record: livemig_engine::session::OutcomeRecord = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a livemig decision record", record.display()))?;
    let answer = control::request(socket, &Request::Resolve { record })
        .with_context(|| format!("talking to VM control socket {}", socket.display()))?;
    if let Some(e) = answer.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{e}");
    }
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// `livemig migrate`. Ctrl-C cancels the migration (before the switchover the VM keeps
/// running on the source) and waits for the VM process to say how it ended.
///
/// `given` says whether an option was given on the command line: those that were not take
/// the source host's defaults (transport, compression, channels) when the VM belongs to a
/// host agent's directory.
pub fn migrate(a: &MigrateArgs, given: &dyn Fn(&str) -> bool) -> Result<()> {
    let vms: Vec<PathBuf> = a.vm.iter().map(|v| resolve_vm(v)).collect();
    let request = |vm: &Path| {
        let mut t = a.tuning.clone();
        if let Some(h) = HostDir::of_socket(vm) {
            let s = h.settings();
            if !given("transport") {
                t.transport = s.transport;
            }
            if !given("compress") {
                t.compress = s.compress;
            }
            if !given("channels") && s.channels.is_some() {
                t.channels = s.channels;
            }
        }
        t.request(&a.to)
    };
    if a.plan {
        let [vm] = vms.as_slice() else {
            bail!("--plan forecasts one VM: give one --vm");
        };
        return plan(a, vm, request(vm));
    }
    let sockets = vms.clone();
    let quiet = a.json;
    let _ = ctrlc::set_handler(move || {
        if !quiet {
            eprintln!("\nlivemig: cancelling the migration (the VM stays on the source unless it already switched over) ...");
        }
        for s in &sockets {
            let _ = control::request(s, &Request::Cancel);
        }
    });
    if let [vm] = vms.as_slice() {
        let report = drive(vm, &request(vm), a.json)?;
        return finish(&serde_json::to_value(report)?, a.json);
    }
    let reqs: Vec<MigrateRequest> = vms.iter().map(|vm| request(vm)).collect();
    many(&vms, reqs, a.json)
}

/// A VM given by name: its socket in the host's directory.
fn resolve_vm(v: &Path) -> PathBuf {
    if v.components().count() == 1 && !v.exists() {
        let mut name = v.as_os_str().to_owned();
        name.push(".sock");
        host_dir(None).join(name)
    } else {
        v.to_path_buf()
    }
}

/// Several VMs at once: each VM process takes one of its host's outgoing slots (queued
/// while none is free); one failing never stops the others. A line per VM as it ends (JSON
/// with `json`), then an error if any failed.
fn many(vms: &[PathBuf], reqs: Vec<MigrateRequest>, json: bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    let results: Vec<(String, Result<MigrationReport, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .zip(reqs)
            .map(|(vm, req)| {
                s.spawn(move || {
                    let name = vm.display().to_string();
                    let r = control::migrate(vm, &req, &mut |_| {}).map_err(|e| e.to_string());
                    let line = match &r {
                        Ok(rep) if json => {
                            serde_json::json!({"vm": name, "report": rep}).to_string()
                        }
                        Err(e) if json => serde_json::json!({"vm": name, "error": e}).to_string(),
                        Ok(rep) => format!(
                            "{name}: {} in {:.0} ms, downtime {:.1} ms, digest {}",
                            rep.status,
                            rep.total_time_ms,
                            rep.downtime_ms,
                            if rep.digest_match {
                                "match"
                            } else {
                                "MISMATCH"
                            }
                        ),
                        Err(e) => format!("{name}: failed: {e}"),
                    };
                    println!("{line}");
                    (name, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (String::new(), Err("a migration thread panicked".into())))
            })
            .collect()
    });
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(rep) if rep.digest_match))
        .map(|(n, _)| n.as_str())
        .collect();
    if !json {
        println!(
            "{} of {} VMs migrated in {:.1} s",
            results.len() - failed.len(),
            results.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    if !failed.is_empty() {
        bail!(
            "{} migration(s) failed: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// `livemig migrate --plan`: the forecast, as a table or JSON.
fn plan(a: &MigrateArgs, vm: &Path, migrate: MigrateRequest) -> Result<()> {
    let req = PlanRequest {
        migrate,
        window_ms: a.plan_window_ms,
    };
    if !a.json {
        eprintln!(
            "planning: watching the guest for {} ms and probing the link to {} ...",
            a.plan_window_ms, a.to
        );
    }
    let r = control::plan(vm, &req)
        .with_context(|| format!("planning a migration of {}", vm.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mib = |b: f64| b / f64::from(1 << 20);
    println!("\n  {}\n", r.verdict);
    println!(
        "  guest        {:.0} MiB RAM; writes {:.0} pages/s ({:.0} MB/s) over a working set of {:.0} MiB",
        mib(r.ram_bytes as f64),
        r.dirty.write_rate,
        r.dirty.write_rate * 4096.0 / 1e6,
        mib((r.dirty.working_set_pages * 4096) as f64)
    );
    println!(
        "  content      {:.0} MiB never written; {:.0}% zero pages; LZ4 to {:.0}% at {:.0} MB/s per core",
        mib((r.content.hole_pages * 4096) as f64),
        r.content.zero_share * 100.0,
        r.content.lz4_ratio * 100.0,
        r.content.lz4_bytes_per_s / 1e6
    );
    for l in &r.link {
        println!(
            "  link         {:.0} MB/s over {} connection{} ({:.0} MiB in {:.0} ms)",
            l.bytes_per_s / 1e6,
            l.connections,
            if l.connections == 1 { "" } else { "s" },
            mib(l.bytes as f64),
            l.ms
        );
    }
    println!("  set-up       {:.0} ms\n", r.setup_ms);
    println!(
        "  {:<9} {:>6} {:>10} {:>12}  {:<22} options",
        "", "rounds", "total", "downtime", "outcome"
    );
    let row = |label: &str, f: &Forecast| {
        let outcome = match (&f.gives_up, f.throttle.iter().max().copied().unwrap_or(0)) {
            (Some(_), _) => "gives up".to_string(),
            (None, 0) if f.converges => "converges".to_string(),
            (None, 0) => "over the limit".to_string(),
            (None, t) => format!("throttled up to {t}%"),
        };
        println!(
            "  {label:<9} {:>6} {:>8.1} s {:>9.0} ms  {outcome:<22} {}",
            f.rounds,
            f.total_ms / 1000.0,
            f.downtime_ms,
            f.options
        );
    };
    row("as asked", &r.forecast);
    for f in &r.alternatives {
        row("or", f);
    }
    println!("\n  assumes: {}", r.assumptions.join("; "));
    Ok(())
}

/// Prints the report and turns a digest mismatch into an error.
pub fn finish(report: &Value, json_out: bool) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print_summary(report);
    }
    if report.get("digest_match") != Some(&Value::Bool(true)) {
        bail!("RAM digest mismatch between source at pause and destination before resume");
    }
    Ok(())
}

/// Runs a migration through the VM's socket, showing progress unless `quiet`; returns the
/// report.
pub fn drive(socket: &Path, req: &MigrateRequest, quiet: bool) -> Result<MigrationReport> {
    let mut show = progress_display(quiet);
    Ok(control::migrate(socket, req, &mut |ev| show(ev))?)
}

/// An event handler that draws per-round progress bars (or plain lines without a terminal);
/// silent when `quiet`.
pub fn progress_display(quiet: bool) -> impl FnMut(&Event) {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:32.cyan/blue}] {pos:>8}/{len:8} pages {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars: BTreeMap<u64, ProgressBar> = BTreeMap::new();
    move |ev: &Event| {
        if quiet {
            return;
        }
        let mut bar = |round: u64, len: u64| -> ProgressBar {
            bars.entry(round)
                .or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(len.max(1)));
                    b.set_style(style.clone());
                    b.set_prefix(format!("round {round}"));
                    b
                })
                .clone()
        };
        match ev {
            Event::Sending {
                round,
                pages_done,
                pages_total,
                eta,
            } if tty => {
                let b = bar(*round, *pages_total);
                b.set_position(*pages_done);
                if let Some(e) = eta {
                    b.set_message(eta_text(e));
                }
            }
            Event::Round { round: r } => {
                let msg = format!(
                    "{:>8.1} MB/s  dirty {:>8.0} pages/s  left {:>7}  predicted downtime {:>6.1} ms{}",
                    r.bandwidth / 1e6,
                    r.dirty_rate,
                    r.dirtied_pages,
                    r.predicted_downtime_ms,
                    if r.stop_and_copy {
                        "  (stop-and-copy)".to_string()
                    } else {
                        let throttle = if r.throttle_pct > 0 {
                            format!("  guest throttled {}%", r.throttle_pct)
                        } else {
                            String::new()
                        };
                        let skipped = if r.redirtied_left > 0 {
                            format!("  {} written again, left to the next round", r.redirtied_left)
                        } else {
                            String::new()
                        };
                        let eta = r.eta.as_ref().map(eta_text).unwrap_or_default();
                        format!("{throttle}{skipped}  {eta}")
                    }
                );
                if tty {
                    let b = bar(r.round, r.pages);
                    b.set_length(r.pages.max(1));
                    b.set_position(r.pages.max(1));
                    b.finish_with_message(msg);
                } else {
                    eprintln!("round {}: {} pages {msg}", r.round, r.pages);
                }
            }
            Event::Connected {
                transport_detail, ..
            } => eprintln!("transport: {transport_detail}"),
            Event::Paused { pages } if !tty => {
                eprintln!("guest paused: stop-and-copy of {pages} pages")
            }
            _ => {}
        }
    }
}

fn print_summary(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let u = |k: &str| r[k].as_u64().unwrap_or(0);
    let ram = u("ram_bytes");
    let wire = u("bytes_on_wire");
    let rows = [
        ("status", r["status"].as_str().unwrap_or("?").to_string()),
        (
            "transport",
            format!(
                "{} x{}",
                r["transport"].as_str().unwrap_or("?"),
                u("channels")
            ),
        ),
        (
            "  chosen",
            r["transport_detail"].as_str().unwrap_or("?").to_string(),
        ),
        (
            "encryption",
            r["encryption"].as_str().unwrap_or("?").to_string(),
        ),
        ("RAM", format!("{:.1} MiB", ram as f64 / (1 << 20) as f64)),
        ("total time", format!("{:.1} ms", f("total_time_ms"))),
        ("  of which set-up", format!("{:.1} ms", f("setup_ms"))),
        ("downtime", format!("{:.1} ms", f("downtime_ms"))),
        ("  of which", downtime_detail(&r["downtime_detail"])),
        (
            "effective throughput",
            format!("{:.2} GB/s (RAM / total time)", f("effective_gbps")),
        ),
        (
            "rounds",
            format!("{} (stop-and-copy included)", u("rounds")),
        ),
        ("pages sent", u("pages_sent").to_string()),
        (
            "bytes on wire",
            format!(
                "{:.1} MiB ({:.3} x RAM)",
                wire as f64 / (1 << 20) as f64,
                wire as f64 / ram.max(1) as f64
            ),
        ),
        (
            "encoding",
            format!(
                "{}: {} raw, {} zero, {} lz4, {} zstd, {} delta{} pages; {:.1} -> {:.1} MiB (ratio {:.2})",
                r["compress"].as_str().unwrap_or("?"),
                r["codec"]["pages_raw"],
                r["codec"]["pages_zero"],
                r["codec"]["pages_lz4"],
                r["codec"]["pages_zstd"],
                r["codec"]["pages_delta"],
                match r["codec"]["pages_sparse"].as_u64() {
                    Some(n) if n > 0 => format!(", {n} sparse"),
                    _ => String::new(),
                },
                r["codec"]["bytes_before"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                r["codec"]["bytes_after"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                r["codec"]["compression_ratio"].as_f64().unwrap_or(1.0)
            ),
        ),
        (
            "staging copies",
            format!("{} bytes", u("bytes_copied_staging")),
        ),
        (
            "CPU",
            format!("source {:.2} s, destination {:.2} s", f("source_cpu_s"), f("destination_cpu_s")),
        ),
        (
            "RAM digest",
            format!(
                "{} (source {} / destination {}, verified in {:.0} ms)",
                if r["digest_match"].as_bool() == Some(true) {
                    "match"
                } else {
                    "MISMATCH"
                },
                r["source_digest"].as_str().unwrap_or("?"),
                r["destination_digest"].as_str().unwrap_or("?"),
                f("verify_ms")
            ),
        ),
        ("auto-converge", throttle_summary(&r["round_details"])),
        (
            "guest progress after resume",
            format!("+{}", u("guest_progress_after_resume")),
        ),
    ];
    println!();
    for (k, v) in rows.into_iter().chain(storage_rows(&r["storage"])) {
        println!("  {k:<28} {v}");
    }
}

/// A prediction of what is left, in words.
fn eta_text(e: &Eta) -> String {
    format!(
        "ETA {:.1} s, {:.0} MiB left, downtime ~{:.0} ms{}",
        e.time_left_ms / 1000.0,
        e.remaining_bytes as f64 / f64::from(1 << 20),
        e.predicted_downtime_ms,
        if e.converges { "" } else { " (not converging)" }
    )
}

/// The throttle levels of the rounds, or that none was needed.
fn throttle_summary(rounds: &Value) -> String {
    let levels: Vec<u64> = rounds
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["throttle_pct"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    if levels.iter().all(|&l| l == 0) {
        return "not needed".into();
    }
    let per_round: Vec<String> = levels.iter().map(|l| format!("{l}%")).collect();
    format!("guest throttled per round: {}", per_round.join(" "))
}

/// The disks' rows of the summary (none for a VM without disks).
fn storage_rows(s: &Value) -> Vec<(&'static str, String)> {
    if s.is_null() {
        return Vec::new();
    }
    let u = |k: &str| s[k].as_u64().unwrap_or(0);
    let mut rows = vec![(
        "storage",
        format!(
            "{}: {:.1} MiB of disk blocks in {} rounds, {} blocks in the downtime{}",
            s["mode"].as_str().unwrap_or("?"),
            u("bytes_copied") as f64 / (1 << 20) as f64,
            u("rounds"),
            u("dirty_blocks_in_downtime"),
            if s["source_removed"].as_bool() == Some(true) {
                "; source images removed"
            } else {
                ""
            }
        ),
    )];
    if s["active_mirror_ms"].as_f64().unwrap_or(0.0) > 0.0 {
        rows.push((
            "  active mirroring",
            format!(
                "{:.0} ms, {:.1} MiB of guest writes mirrored",
                s["active_mirror_ms"].as_f64().unwrap_or(0.0),
                u("mirrored_bytes") as f64 / (1 << 20) as f64
            ),
        ));
    }
    for d in s["disks"].as_array().into_iter().flatten() {
        rows.push((
            "  disk",
            format!(
                "{} {} ({:.0} MiB, {:.0} MiB allocated){}",
                d["id"].as_str().unwrap_or("?"),
                d["source_path"].as_str().unwrap_or("?"),
                d["size"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                d["allocated"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                match d["source_digest"].as_str() {
                    Some(x) if !x.is_empty() => format!(", digest {x} verified by the destination"),
                    _ => String::new(),
                }
            ),
        ));
    }
    rows
}

/// The downtime's steps in one line ("-" from a source that does not report them).
fn downtime_detail(d: &serde_json::Value) -> String {
    if !d.is_object() {
        return "-".into();
    }
    [
        ("pause", "pause_ms"),
        ("save state", "save_state_ms"),
        ("harvest", "harvest_ms"),
        ("last pages", "final_pages_ms"),
        ("disks", "storage_ms"),
        ("destination prepares", "prepare_ms"),
        ("resume", "resume_ms"),
        ("other", "other_ms"),
    ]
    .iter()
    .map(|(name, key)| format!("{name} {:.1}", d[*key].as_f64().unwrap_or(0.0)))
    .collect::<Vec<_>>()
    .join(", ")
        + " ms"
}
