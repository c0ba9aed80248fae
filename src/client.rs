//! Talking to a VM process's control socket: `migrate`, `status`, `cancel`, `stop`, with
//! progress bars and the summary table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Control socket of the VM to migrate.
    #[arg(long)]
    pub vm: PathBuf,
    /// Destination address (host:port of `livemig receive`).
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub tuning: Tuning,
    /// Print one JSON object instead of progress bars and a table.
    #[arg(long)]
    pub json: bool,
}

/// Migration tuning shared by `migrate` and `demo`.
#[derive(Args, Debug, Clone)]
pub struct Tuning {
    /// Data channels (TCP connections or RDMA queue pairs carrying pages).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// Data transport: TCP connections, RDMA queue pairs (RDMA WRITEs straight into
    /// destination RAM; no compression), or auto: RDMA when a device here has an address in
    /// the destination's subnet and the destination takes RDMA, else TCP.
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    pub transport: TransportArg,
    /// RDMA device (default: the first active one with an address in the destination's
    /// subnet, else the first active one); see `livemig rdma devices`.
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// Pause the guest once the predicted downtime is at most this (ms).
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Pause the guest after at most this many pre-copy rounds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// Page encoding: zero pages always travel as markers; `auto` picks per chunk.
    #[arg(long, value_enum, default_value_t = Compress::Auto)]
    pub compress: Compress,
    /// zstd level (with `--compress zstd`).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,
    /// Cache of last-sent pages for delta encoding, in MiB (with `delta` and `auto`).
    #[arg(long, default_value_t = 64)]
    pub delta_cache_mib: u64,
}

/// `--transport` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TransportArg {
    /// TCP data connections.
    Tcp,
    /// RDMA reliable-connected queue pairs.
    Rdma,
    /// RDMA if a device reaches the destination and it takes RDMA, else TCP.
    Auto,
}

/// `--compress` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Compress {
    /// Pages raw (zero pages as markers).
    None,
    /// Zero-page markers, other pages raw.
    Zero,
    /// LZ4 per run of pages.
    Lz4,
    /// zstd per run of pages.
    Zstd,
    /// Re-sent pages as deltas against the version sent before.
    Delta,
    /// Per chunk, from measured compressor speed, link speed and ratio.
    Auto,
}

impl Tuning {
    pub fn request(&self, to: &str) -> Value {
        json!({
            "cmd": "migrate",
            "to": to,
            "channels": self.channels,
            "downtime_limit_ms": self.downtime_limit,
            "max_rounds": self.max_rounds,
            "compress": format!("{:?}", self.compress).to_lowercase(),
            "zstd_level": self.zstd_level,
            "delta_cache_mib": self.delta_cache_mib,
            "transport": format!("{:?}", self.transport).to_lowercase(),
            "rdma_device": self.rdma_device,
        })
    }
}

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket)
        .with_context(|| format!("connecting to VM control socket {}", socket.display()))
}

/// Sends one command and prints the JSON answer.
pub fn simple(socket: &Path, cmd: &str) -> Result<()> {
    let answer = request(socket, &json!({ "cmd": cmd }))?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// Sends one command and returns the JSON answer.
pub fn request(socket: &Path, req: &Value) -> Result<Value> {
    let mut s = connect(socket)?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        bail!("VM process closed the control connection without answering");
    }
    Ok(serde_json::from_str(&line)?)
}

/// `livemig migrate`. Ctrl-C cancels the migration (before the switchover the VM keeps
/// running on the source) and waits for the VM process to say how it ended.
pub fn migrate(a: &MigrateArgs) -> Result<()> {
    let socket = a.vm.clone();
    let quiet = a.json;
    let _ = ctrlc::set_handler(move || {
        if !quiet {
            eprintln!("\nlivemig: cancelling the migration (the VM stays on the source unless it already switched over) ...");
        }
        let _ = request(&socket, &json!({"cmd": "cancel"}));
    });
    let report = drive(&a.vm, &a.tuning.request(&a.to), a.json)?;
    finish(&report, a.json)
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
pub fn drive(socket: &Path, req: &Value, quiet: bool) -> Result<Value> {
    let mut s = connect(socket)?;
    writeln!(s, "{req}")?;
    let reader = BufReader::new(s);
    let show = !quiet;
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:32.cyan/blue}] {pos:>8}/{len:8} pages {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars: BTreeMap<u64, ProgressBar> = BTreeMap::new();
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
    for line in reader.lines() {
        let line = line.context("reading migration events")?;
        let ev: Value =
            serde_json::from_str(&line).with_context(|| format!("bad event line {line:?}"))?;
        match ev.get("event").and_then(Value::as_str) {
            Some("sending") if show && tty => {
                let round = ev["round"].as_u64().unwrap_or(0);
                let b = bar(round, ev["pages_total"].as_u64().unwrap_or(0));
                b.set_position(ev["pages_done"].as_u64().unwrap_or(0));
            }
            Some("round") if show => {
                let r = &ev["round"];
                let round = r["round"].as_u64().unwrap_or(0);
                let pages = r["pages"].as_u64().unwrap_or(0);
                let msg = format!(
                    "{:>8.1} MB/s  dirty {:>8.0} pages/s  left {:>7}  predicted downtime {:>6.1} ms{}",
                    r["bandwidth"].as_f64().unwrap_or(0.0) / 1e6,
                    r["dirty_rate"].as_f64().unwrap_or(0.0),
                    r["dirtied_pages"].as_u64().unwrap_or(0),
                    r["predicted_downtime_ms"].as_f64().unwrap_or(0.0),
                    if r["stop_and_copy"].as_bool() == Some(true) { "  (stop-and-copy)" } else { "" }
                );
                if tty {
                    let b = bar(round, pages);
                    b.set_length(pages.max(1));
                    b.set_position(pages.max(1));
                    b.finish_with_message(msg);
                } else {
                    eprintln!("round {round}: {pages} pages {msg}");
                }
            }
            Some("connected") if show => eprintln!(
                "transport: {}",
                ev["transport_detail"].as_str().unwrap_or("?")
            ),
            Some("paused") if show && !tty => {
                eprintln!("guest paused: stop-and-copy of {} pages", ev["pages"])
            }
            Some("done") => return Ok(ev["report"].clone()),
            Some("error") => bail!(
                "migration failed: {} (VM state on the source: {})",
                ev["error"].as_str().unwrap_or("unknown error"),
                ev["source_state"].as_str().unwrap_or("unknown")
            ),
            _ => {}
        }
    }
    bail!("the VM process closed the control connection before the migration finished")
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
        ("RAM", format!("{:.1} MiB", ram as f64 / (1 << 20) as f64)),
        ("total time", format!("{:.1} ms", f("total_time_ms"))),
        ("  of which set-up", format!("{:.1} ms", f("setup_ms"))),
        ("downtime", format!("{:.1} ms", f("downtime_ms"))),
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
                "{}: {} raw, {} zero, {} lz4, {} zstd, {} delta pages; {:.1} -> {:.1} MiB (ratio {:.2})",
                r["compress"].as_str().unwrap_or("?"),
                r["codec"]["pages_raw"],
                r["codec"]["pages_zero"],
                r["codec"]["pages_lz4"],
                r["codec"]["pages_zstd"],
                r["codec"]["pages_delta"],
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
        (
            "guest progress after resume",
            format!("+{}", u("guest_progress_after_resume")),
        ),
    ];
    println!();
    for (k, v) in rows {
        println!("  {k:<28} {v}");
    }
}
