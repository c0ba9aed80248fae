//! A destination and a VM process of the `livemig` binary, started side by side for one
//! migration (used by `livemig demo` and the bench), optionally on two emulated hosts.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use livemig_engine::control::{self, Event, MigrateRequest, Request};
use livemig_engine::vm::Backend;
use serde_json::{json, Value};

use crate::support::{command_in, CpuWatch, Process};

/// How to start a pair.
pub struct PairSpec<'a> {
    /// The livemig binary.
    pub exe: &'a Path,
    /// Folder for sockets.
    pub dir: &'a Path,
    /// How both sides authenticate.
    pub auth: PairAuth<'a>,
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
    /// More `receive` options (e.g. `--storage-dir`).
    pub receive_args: Vec<String>,
}

/// How the two processes of a pair authenticate.
#[derive(Debug, Clone, Copy)]
pub enum PairAuth<'a> {
    /// A pre-shared key file both use.
    KeyFile(&'a Path),
    /// Certificates from [`crate::support::write_certs`] in this folder.
    Certificates(&'a Path),
}

impl PairAuth<'_> {
    /// The options of the destination (`destination`) or of the VM process.
    fn args(&self, destination: bool) -> Vec<std::ffi::OsString> {
        match self {
            PairAuth::KeyFile(k) => vec!["--key-file".into(), k.as_os_str().into()],
            PairAuth::Certificates(dir) => {
                let who = if destination { "destination" } else { "source" };
                vec![
                    "--cert".into(),
                    dir.join(format!("{who}.pem")).into(),
                    "--key".into(),
                    dir.join(format!("{who}-key.pem")).into(),
                    "--ca".into(),
                    dir.join("ca.pem").into(),
                ]
            }
        }
    }
}

/// A running destination and VM process.
pub struct Pair {
    dst: Process,
    src: Process,
    /// The VM's control socket.
    pub src_sock: PathBuf,
    /// The destination's control socket (after the migration).
    pub dst_sock: PathBuf,
    /// The destination's address.
    pub addr: String,
}

impl Pair {
    /// Starts the destination, then the VM (its RAM filled), and returns once both are ready.
    pub fn start(s: &PairSpec<'_>) -> Result<Pair> {
        let src_sock = s.dir.join("source.sock");
        let dst_sock = s.dir.join("destination.sock");
        let mut recv = command_in(s.ns.map(|n| n.1), s.exe);
        recv.args([
            "receive",
            "--listen",
            &s.listen,
            "--backend",
            s.backend.name(),
            "--json",
        ])
        .arg("--socket")
        .arg(&dst_sock)
        .args(s.auth.args(true))
        .env_remove("LIVEMIG_KEY")
        .stdout(Stdio::piped());
        if let Some(mib) = s.reserve_mib {
            recv.args(["--reserve-mib", &mib.to_string()]);
        }
        recv.args(&s.receive_args);
        let mut dst = Process::new(recv.spawn().context("starting livemig receive")?);
        let line = dst
            .wait_line("listening on ")
            .context("the destination exited before it was ready (see its messages above)")?;
        let addr = line.rsplit(' ').next().unwrap_or_default().to_string();

        let mut run = command_in(s.ns.map(|n| n.0), s.exe);
        run.arg("run-vm")
            .args(s.auth.args(false))
            .env_remove("LIVEMIG_KEY")
            .arg("--socket")
            .arg(&src_sock)
            .args(&s.vm_args)
            .args(["--backend", s.backend.name()])
            .stdout(Stdio::piped());
        let mut src = Process::new(run.spawn().context("starting livemig run-vm")?);
        src.wait_line("VM running")
            .context("the source VM exited before it was ready (see its messages above)")?;
        Ok(Pair {
            dst,
            src,
            src_sock,
            dst_sock,
            addr,
        })
    }

    /// Runs the migration `req` (its `to` is set to this pair's destination), handing every
    /// event to `on_event`; checks the guest runs on the destination, stops both processes
    /// and returns the report as JSON, completed with what the destination saw.
    pub fn migrate(
        mut self,
        req: &MigrateRequest,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Value> {
        let req = MigrateRequest {
            to: self.addr.clone(),
            ..req.clone()
        };
        let cpu = CpuWatch::start(&[self.src.child.id(), self.dst.child.id()]);
        let report = control::migrate(&self.src_sock, &req, on_event)?;
        let mut report = serde_json::to_value(report)?;
        // The destination prints one JSON line once the guest runs there.
        let line = self.dst.read_line()?;
        let cpu = cpu.finish();
        let dst_info: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
        let after = control::request(&self.dst_sock, &Request::Status)?;
        let src_status = control::request(&self.src_sock, &Request::Status)?;
        let _ = control::request(&self.dst_sock, &Request::Stop);
        let _ = control::request(&self.src_sock, &Request::Stop);
        let _ = self.dst.child.wait();
        let _ = self.src.child.wait();
        if let Value::Object(m) = &mut report {
            m.insert(
                "destination_reserved_ram".into(),
                dst_info["used_reserved_ram"].clone(),
            );
            m.insert("destination_phase".into(), after["phase"].clone());
            m.insert(
                "destination_switchover_steps".into(),
                dst_info["switchover_steps"].clone(),
            );
            m.insert(
                "destination_guest_counter".into(),
                after["guest_counter"].clone(),
            );
            m.insert("source_phase_after".into(), src_status["phase"].clone());
            // The engine's own figures count its migration threads; these count the whole
            // processes but their vCPU threads, as the bench counts QEMU's — less, at the
            // source, the pass over RAM that checks the digest after the switchover, which
            // QEMU does not make (kept apart as `source_verify_cpu_s`). The pages hashed
            // while they are sent and land stay counted: they take the migration's cores.
            let verify = m.get("verify_cpu_s").and_then(Value::as_f64).unwrap_or(0.0);
            let (src, dst) = (
                cpu.first().copied().unwrap_or_default(),
                cpu.get(1).copied().unwrap_or_default(),
            );
            m.insert(
                "source_process_cpu_s".into(),
                json!(src.outside.map(|c| (c - verify).max(0.0))),
            );
            m.insert("source_verify_cpu_s".into(), json!(verify));
            m.insert("destination_process_cpu_s".into(), json!(dst.outside));
            m.insert("source_guest_cpu_s".into(), json!(src.guest));
        }
        Ok(report)
    }
}
