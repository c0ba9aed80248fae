//! `livemig demo`: a VM process, a destination process and a migration between them, on this
//! machine, with defaults that just work.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::client::{self, Tuning};
use crate::pair::{self, Pair, PairSpec};
use crate::{Backend, FillArg, PatternArg};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// RAM content written before the guest starts.
    #[arg(long, value_enum, default_value_t = FillArg::Random)]
    fill: FillArg,
    /// Working set the guest writes into, in MiB.
    #[arg(long, default_value_t = 64)]
    working_set: u64,
    /// Pages the guest writes per second (0 = idle).
    #[arg(long, default_value_t = 2000)]
    dirty_rate: u64,
    /// Order in which the guest writes its working set.
    #[arg(long, value_enum, default_value_t = PatternArg::Sequential)]
    pattern: PatternArg,
    #[command(flatten)]
    tuning: Tuning,
    /// VMM backend (default: kvm when /dev/kvm is usable, else memory).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Do not reserve destination RAM ahead of the migration (it is then allocated and
    /// faulted in while pages arrive, inside the measured time).
    #[arg(long)]
    no_reserve: bool,
    /// Print one JSON object instead of progress bars and a table.
    #[arg(long)]
    json: bool,
}

pub fn value<T: clap::ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

pub fn run(a: DemoArgs) -> Result<()> {
    let backend = a.backend.unwrap_or_else(|| {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            Backend::Kvm
        } else {
            eprintln!(
                "livemig demo: /dev/kvm is not usable here; using the memory-only VM backend"
            );
            Backend::Memory
        }
    });
    let exe = std::env::current_exe().context("locating the livemig binary")?;
    let dir = std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&a, backend, &exe, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(a: &DemoArgs, backend: Backend, exe: &Path, dir: &Path) -> Result<()> {
    let say = |m: &str| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    // A key for this demo only: both processes authenticate with it.
    let key_file = pair::write_key(dir)?;
    say(&format!(
        "livemig demo: starting a destination (livemig receive) and a {} MiB {} guest (livemig run-vm) ...",
        a.memory,
        value(backend)
    ));
    let p = Pair::start(&PairSpec {
        exe,
        dir,
        key_file: &key_file,
        backend,
        reserve_mib: (!a.no_reserve).then_some(a.memory),
        ns: None,
        listen: "127.0.0.1:0".into(),
        vm_args: vec![
            "--memory".into(),
            a.memory.to_string(),
            "--vcpus".into(),
            a.vcpus.to_string(),
            "--fill".into(),
            value(a.fill),
            "--working-set".into(),
            a.working_set.to_string(),
            "--dirty-rate".into(),
            a.dirty_rate.to_string(),
            "--pattern".into(),
            value(a.pattern),
        ],
    })?;
    // Let the guest run a moment so the migration catches it mid-flight.
    std::thread::sleep(Duration::from_millis(300));
    let before = client::request(&p.src_sock, &json!({"cmd": "status"}))?;
    say(&format!(
        "livemig demo: guest running, counter {}; migrating to {} ...",
        before["guest_counter"], p.addr
    ));
    let report = p.migrate(&a.tuning.request(""), a.json)?;
    client::finish(&report, a.json)?;
    if !a.json {
        println!(
            "  {:<28} {} on the destination (source: {})",
            "VM now",
            report["destination_phase"].as_str().unwrap_or("?"),
            report["source_phase_after"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
