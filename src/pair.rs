//! A destination and a VM process of this binary, started side by side for one migration
//! (used by `demo` and `bench`), optionally in two network namespaces.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::client;
use crate::Backend;

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How to start a pair.
pub struct PairSpec<'a> {
    /// The livemig binary.
    pub exe: &'a Path,
    /// Folder for sockets.
    pub dir: &'a Path,
    /// Pre-shared key file both sides use.
    pub key_file: &'a Path,
    /// VMM backend.
    pub backend: Backend,
    /// Destination RAM to reserve ahead (MiB).
    pub reserve_mib: Option<u64>,
    /// Namespaces of the source and the destination (None: this one).
    pub ns: Option<(&'a str, &'a str)>,
    /// Address the destination listens on.
    pub listen: String,
    /// `run-vm` guest options.
    pub vm_args: Vec<String>,
}

/// A running destination and VM process.
pub struct Pair {
    dst: Guard,
    src: Guard,
    dst_out: BufReader<ChildStdout>,
    /// The VM's control socket.
    pub src_sock: PathBuf,
    /// The destination's control socket (after the migration).
    pub dst_sock: PathBuf,
    /// The destination's address.
    pub addr: String,
}

/// Writes a fresh key readable by the owner only.
pub fn write_key(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("migration.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .context("writing a migration key")?;
    std::io::Write::write_all(&mut f, livemig_engine::auth::Key::generate().as_bytes())?;
    Ok(path)
}

fn command(exe: &Path, ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    }
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

fn name(b: Backend) -> &'static str {
    match b {
        Backend::Kvm => "kvm",
        Backend::Memory => "memory",
    }
}

impl Pair {
    /// Starts the destination, then the VM (its RAM filled), and returns once both are ready.
    pub fn start(s: &PairSpec<'_>) -> Result<Pair> {
        let src_sock = s.dir.join("source.sock");
        let dst_sock = s.dir.join("destination.sock");
        let mut recv = command(s.exe, s.ns.map(|n| n.1));
        recv.args([
            "receive",
            "--listen",
            &s.listen,
            "--backend",
            name(s.backend),
            "--json",
        ])
        .arg("--socket")
        .arg(&dst_sock)
        .arg("--key-file")
        .arg(s.key_file)
        .stdout(Stdio::piped());
        if let Some(mib) = s.reserve_mib {
            recv.args(["--reserve-mib", &mib.to_string()]);
        }
        let mut dst = Guard(recv.spawn().context("starting livemig receive")?);
        let out = dst.0.stdout.take().context("destination stdout")?;
        let (line, dst_out) = wait_line(out, "the destination", "listening on ")?;
        let addr = line.rsplit(' ').next().unwrap_or_default().to_string();

        let mut run = command(s.exe, s.ns.map(|n| n.0));
        run.arg("run-vm")
            .arg("--key-file")
            .arg(s.key_file)
            .arg("--socket")
            .arg(&src_sock)
            .args(&s.vm_args)
            .args(["--backend", name(s.backend)])
            .stdout(Stdio::piped());
        let mut src = Guard(run.spawn().context("starting livemig run-vm")?);
        let out = src.0.stdout.take().context("source stdout")?;
        let _ = wait_line(out, "the source VM", "VM running")?;
        Ok(Pair {
            dst,
            src,
            dst_out,
            src_sock,
            dst_sock,
            addr,
        })
    }

    /// Runs the migration `req` (a migrate request without `to`), checks the guest runs on
    /// the destination, stops both processes and returns the report, completed with what
    /// the destination saw.
    pub fn migrate(mut self, req: &Value, quiet: bool) -> Result<Value> {
        let mut req = req.clone();
        req["to"] = json!(self.addr);
        let mut report = client::drive(&self.src_sock, &req, quiet)?;
        // The destination prints one JSON line once the guest runs there.
        let mut line = String::new();
        self.dst_out.read_line(&mut line)?;
        let dst_info: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
        let after = client::request(&self.dst_sock, &json!({"cmd": "status"}))?;
        let src_status = client::request(&self.src_sock, &json!({"cmd": "status"}))?;
        let _ = client::request(&self.dst_sock, &json!({"cmd": "stop"}));
        let _ = client::request(&self.src_sock, &json!({"cmd": "stop"}));
        let _ = self.dst.0.wait();
        let _ = self.src.0.wait();
        if let Value::Object(m) = &mut report {
            m.insert(
                "destination_reserved_ram".into(),
                dst_info["used_reserved_ram"].clone(),
            );
            m.insert("destination_phase".into(), after["phase"].clone());
            m.insert(
                "destination_guest_counter".into(),
                after["guest_counter"].clone(),
            );
            m.insert("source_phase_after".into(), src_status["phase"].clone());
        }
        Ok(report)
    }
}
