//! `livemig demo`: a VM process, a destination process and a migration between them, on this
//! machine, with defaults that just work.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::client::{self, Tuning};
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

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn value<T: clap::ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

fn wait_line(
    out: ChildStdout,
    what: &str,
    needle: &str,
) -> Result<(String, BufReader<ChildStdout>)> {
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("{what} exited before it was ready (see its messages above)");
        }
        if line.contains(needle) {
            return Ok((line.trim().to_string(), r));
        }
    }
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
    let src_sock: PathBuf = dir.join("source.sock");
    // A key for this demo only: both processes authenticate with it.
    let key_file = dir.join("migration.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .context("writing the demo's key")?;
        std::io::Write::write_all(&mut f, livemig_engine::auth::Key::generate().as_bytes())?;
    }
    let dst_sock: PathBuf = dir.join("destination.sock");
    let say = |m: &str| {
        if !a.json {
            eprintln!("{m}");
        }
    };

    say("livemig demo: starting the destination (livemig receive) ...");
    let mut recv = Command::new(exe);
    recv.args([
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &value(backend),
        "--json",
    ])
    .arg("--socket")
    .arg(&dst_sock)
    .arg("--key-file")
    .arg(&key_file)
    .stdout(Stdio::piped());
    if !a.no_reserve {
        recv.args(["--reserve-mib", &a.memory.to_string()]);
    }
    let mut dst = Guard(recv.spawn().context("starting livemig receive")?);
    let out = dst.0.stdout.take().context("destination stdout")?;
    let (line, mut dst_out) = wait_line(out, "the destination", "listening on ")?;
    let addr = line.rsplit(' ').next().unwrap_or_default().to_string();

    say(&format!(
        "livemig demo: starting a {} MiB {} guest (livemig run-vm) ...",
        a.memory,
        value(backend)
    ));
    let mut run = Command::new(exe);
    run.arg("run-vm")
        .arg("--key-file")
        .arg(&key_file)
        .arg("--socket")
        .arg(&src_sock)
        .args(["--memory", &a.memory.to_string()])
        .args(["--vcpus", &a.vcpus.to_string()])
        .args(["--fill", &value(a.fill)])
        .args(["--working-set", &a.working_set.to_string()])
        .args(["--dirty-rate", &a.dirty_rate.to_string()])
        .args(["--pattern", &value(a.pattern)])
        .args(["--backend", &value(backend)])
        .stdout(Stdio::piped());
    let mut src = Guard(run.spawn().context("starting livemig run-vm")?);
    let out = src.0.stdout.take().context("source stdout")?;
    let _ = wait_line(out, "the source VM", "VM running")?;
    // Let the guest run a moment so the migration catches it mid-flight.
    std::thread::sleep(Duration::from_millis(300));
    let before = client::request(&src_sock, &json!({"cmd": "status"}))?;
    say(&format!(
        "livemig demo: guest running, counter {}; migrating to {addr} ...",
        before["guest_counter"]
    ));

    let report = client::drive(&src_sock, &a.tuning.request(&addr), a.json)?;

    // The destination prints one JSON line once the guest runs there.
    let mut line = String::new();
    dst_out.read_line(&mut line)?;
    let dst_info: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
    std::thread::sleep(Duration::from_millis(100));
    let after = client::request(&dst_sock, &json!({"cmd": "status"}))?;
    let src_status = client::request(&src_sock, &json!({"cmd": "status"}))?;
    let _ = client::request(&dst_sock, &json!({"cmd": "stop"}));
    let _ = client::request(&src_sock, &json!({"cmd": "stop"}));
    drop(src);
    drop(dst);

    let mut report = report;
    if let Value::Object(m) = &mut report {
        m.insert(
            "destination_reserved_ram".into(),
            dst_info["used_reserved_ram"].clone(),
        );
        m.insert(
            "destination_guest_counter".into(),
            after["guest_counter"].clone(),
        );
        m.insert("source_phase_after".into(), src_status["phase"].clone());
    }
    client::finish(&report, a.json)?;
    if !a.json {
        println!(
            "  {:<28} {} (source: {})",
            "VM now",
            after["phase"].as_str().unwrap_or("?").to_string() + " on the destination",
            src_status["phase"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
