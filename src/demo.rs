//! `livemig demo`: a VM process, a destination process and a migration between them, on this
//! machine, with defaults that just work.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use livemig_bench::pair::{Pair, PairAuth, PairSpec};
use livemig_bench::support::{kvm_available, write_certs};
use livemig_engine::control;
use livemig_engine::vm::{Backend, Fill, Pattern};

use crate::client::{self, Tuning};
use crate::one_of;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// RAM content written before the guest starts.
    #[arg(long, default_value_t = Fill::Random, value_parser = one_of::<Fill>(Fill::NAMES))]
    fill: Fill,
    /// Working set the guest writes into, in MiB.
    #[arg(long, default_value_t = 64)]
    working_set: u64,
    /// Pages the guest writes per second (0 = idle).
    #[arg(long, default_value_t = 2000)]
    dirty_rate: u64,
    /// Order in which the guest writes its working set.
    #[arg(long, default_value_t = Pattern::Sequential, value_parser = one_of::<Pattern>(Pattern::NAMES))]
    pattern: Pattern,
    #[command(flatten)]
    tuning: Tuning,
    /// VMM backend (default: kvm when /dev/kvm is usable, else memory).
    #[arg(long, value_parser = one_of::<Backend>(Backend::NAMES))]
    backend: Option<Backend>,
    /// Do not reserve destination RAM ahead of the migration (it is then allocated and
    /// faulted in while pages arrive, inside the measured time).
    #[arg(long)]
    no_reserve: bool,
    /// Print one JSON object instead of progress bars and a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let backend = a.backend.unwrap_or_else(|| {
        if kvm_available() {
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
    // A throwaway CA for this demo only: each process has a certificate it signed, and the
    // session is keyed by a mutual TLS handshake (`--cert/--key/--ca`).
    let certs = write_certs(dir)?;
    say(&format!(
        "livemig demo: starting a destination (livemig receive) and a {} MiB {backend} guest (livemig run-vm), each with a certificate from a throwaway CA ...",
        a.memory,
    ));
    let p = Pair::start(&PairSpec {
        exe,
        dir,
        auth: PairAuth::Certificates(&certs),
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
            a.fill.to_string(),
            "--working-set".into(),
            a.working_set.to_string(),
            "--dirty-rate".into(),
            a.dirty_rate.to_string(),
            "--pattern".into(),
            a.pattern.to_string(),
        ],
        receive_args: Vec::new(),
    })?;
    // Let the guest run a moment so the migration catches it mid-flight.
    std::thread::sleep(Duration::from_millis(300));
    let before = control::status(&p.src_sock)?;
    say(&format!(
        "livemig demo: guest running, counter {}; migrating to {} ...",
        before.guest_counter.unwrap_or(0),
        p.addr
    ));
    let mut show = client::progress_display(a.json);
    let report = p.migrate(&a.tuning.request(""), &mut show)?;
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
