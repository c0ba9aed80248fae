//! `livemig bench` and its hidden helper `bench-link`: the command line of the comparison
//! harness, which lives in the `livemig-bench` crate.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use livemig_bench::storage::{self, StorageBench};
use livemig_bench::{limits, BenchOptions};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A small matrix (loopback and one shaped link, small RAM, one repetition): ~3 minutes.
    #[arg(long)]
    quick: bool,
    /// Results folder (default: results/bench-DATE-TIME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Repetitions per cell (default: 3, or 1 with --quick).
    #[arg(long)]
    repeat: Option<usize>,
    /// Leave QEMU out.
    #[arg(long)]
    no_qemu: bool,
    /// Redraw the table and plots of an earlier run's results folder instead of measuring.
    #[arg(long, value_name = "DIR")]
    redraw: Option<PathBuf>,
    /// Instead of the matrix: shared-nothing storage migration of a 4 GiB image (1 GiB
    /// allocated) with 1 GiB of RAM over the shaped 10 GbE link, beside QEMU's NBD +
    /// blockdev-mirror path and the link's raw copy limit (--quick: a quarter of that).
    #[arg(long, conflicts_with = "redraw")]
    storage: bool,
    /// Instead of the matrix: the blackout a client of a Linux VM sees (longest gap in 10 ms
    /// pings, TCP echo stream) during a migration, livemig beside QEMU's announce-self, in the
    /// nested VM (scripts/bench-blackout.sh; --repeat migrations of each, default 3).
    #[arg(long, conflicts_with_all = ["redraw", "storage"])]
    blackout: bool,
    /// Instead of the matrix: prediction accuracy — in each cell (RAM, dirty rate, working
    /// set, link) `migrate --plan`, then the migration it forecast; predicted against actual
    /// total time and downtime (--quick: four small cells).
    #[arg(long, conflicts_with_all = ["redraw", "storage", "blackout"])]
    predict: bool,
    /// Instead of the matrix: a model of a 64 GiB VM over one 100 Gb/s and two 200 Gb/s RoCE
    /// ports, projected from costs measured on this host (page hashing, pinning, dirty-log
    /// scans) with every assumption named; writes results.md to --out when given.
    #[arg(long, conflicts_with_all = ["redraw", "storage", "blackout", "predict"])]
    rdma_model: bool,
    /// Only the matrix cells whose description (`link fill MiB pages/s limit variant`, e.g.
    /// `10gbit random 512MiB 0/s 300ms livemig tcp x1 none (clear)`) contains this; repeatable.
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
}

/// `scripts/bench-blackout.sh` of this repository.
const BLACKOUT_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-blackout.sh");

/// `livemig bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(dir) = &a.redraw {
        return livemig_bench::redraw(dir);
    }
    let exe = std::env::current_exe().context("locating the livemig binary")?;
    if a.blackout {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(BLACKOUT_SCRIPT)
            .arg("--repeat")
            .arg(a.repeat.unwrap_or(if a.quick { 1 } else { 3 }).to_string())
            .env("LIVEMIG_BIN", &exe);
        if let Some(out) = &a.out {
            cmd.arg("--out").arg(out);
        }
        let status = cmd
            .status()
            .with_context(|| format!("running {BLACKOUT_SCRIPT}"))?;
        if !status.success() {
            bail!("the blackout comparison failed ({status})");
        }
        return Ok(());
    }
    if a.rdma_model {
        return livemig_bench::rdma_model::run(a.out.as_deref());
    }
    if a.predict {
        return livemig_bench::predict::run(
            &livemig_bench::predict::PredictOptions {
                quick: a.quick,
                repeat: a.repeat.unwrap_or(if a.quick { 1 } else { 3 }),
                no_qemu: a.no_qemu,
                out: a.out,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            },
            &exe,
        );
    }
    if a.storage {
        let d = StorageBench::default();
        let (q, r) = (
            if a.quick { 4 } else { 1 },
            a.repeat.unwrap_or(if a.quick { 1 } else { 3 }),
        );
        return storage::run(
            &StorageBench {
                ram_mib: d.ram_mib / q,
                disk_mib: d.disk_mib / q,
                allocated_mib: d.allocated_mib / q,
                repeat: r,
                no_qemu: a.no_qemu,
                out: a.out,
                ..d
            },
            &exe,
        );
    }
    livemig_bench::run(
        &BenchOptions {
            quick: a.quick,
            out: a.out,
            repeat: a.repeat,
            no_qemu: a.no_qemu,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            only: a.only,
        },
        &exe,
    )
}

/// `livemig bench-link`: raw TCP throughput between two hosts (a helper of `bench`).
#[derive(Args, Debug)]
pub struct LinkArgs {
    /// `sink` (receives, prints GB/s) or `source` (sends).
    role: String,
    /// Address to listen on (sink).
    #[arg(long)]
    listen: Option<String>,
    /// Address to send to (source).
    #[arg(long)]
    to: Option<String>,
    /// Connections.
    #[arg(long, default_value_t = 1)]
    streams: u16,
    /// Bytes to send in all.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
}

/// `livemig bench-link`.
pub fn link(a: LinkArgs) -> Result<()> {
    match a.role.as_str() {
        "sink" => limits::link_sink(a.listen.as_deref().context("--listen")?, a.streams),
        "source" => limits::link_source(a.to.as_deref().context("--to")?, a.streams, a.bytes),
        r => bail!("unknown role {r:?} (sink or source)"),
    }
}

/// `livemig bench-blackout`: what a client of a VM sees during a migration (a helper of the
/// Linux-guest tests and comparisons): pings every `--interval-ms` and, with `--echo-port`, a
/// TCP stream through the guest's echo service; prints one JSON object.
#[derive(Args, Debug)]
pub struct BlackoutArgs {
    /// The VM's IPv4 address.
    #[arg(long)]
    target: std::net::Ipv4Addr,
    /// The guest's TCP echo port (no stream without it).
    #[arg(long)]
    echo_port: Option<u16>,
    /// Between two pings, ms.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// How long to measure, s.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Bytes the stream writes per interval.
    #[arg(long, default_value_t = 1024)]
    stream_chunk: usize,
}

/// `livemig bench-blackout`.
pub fn blackout(a: BlackoutArgs) -> Result<()> {
    let r = livemig_bench::blackout::measure(&livemig_bench::blackout::BlackoutOptions {
        target: a.target,
        echo_port: a.echo_port,
        interval: std::time::Duration::from_millis(a.interval_ms),
        duration: std::time::Duration::from_secs(a.duration_s),
        stream_chunk: a.stream_chunk.clamp(1, 1 << 20),
    })?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
