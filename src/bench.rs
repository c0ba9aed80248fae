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
}

/// `livemig bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(dir) = &a.redraw {
        return livemig_bench::redraw(dir);
    }
    let exe = std::env::current_exe().context("locating the livemig binary")?;
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
