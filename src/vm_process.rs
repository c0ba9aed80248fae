//! A VM process: a VM plus its JSON control socket (one JSON request per connection, answered
//! by one JSON line, or by a stream of event lines for `migrate`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livemig_engine::auth::Key;
use livemig_engine::destination::{self, IncomingOptions};
use livemig_engine::memory::{GuestRam, Populate, RamLayout};
use livemig_engine::session::MigrationError;
use livemig_engine::source::{self, MigrateOptions, Progress, TransportChoice};
use livemig_engine::vm::kvm::KvmVm;
use livemig_engine::vm::memory_only::MemoryVm;
use livemig_engine::vm::{guest, MigratableVm, VmError, VmSpec};
use livemig_transport::codec::Mode;
use serde_json::{json, Value};

use crate::{Backend, ReceiveArgs, VmArgs};

/// Builds and starts the source VM.
pub fn launch(spec: &VmSpec, backend: Backend) -> Result<Arc<dyn MigratableVm>> {
    Ok(match backend {
        Backend::Kvm => Arc::new(KvmVm::launch(spec).context("starting the KVM guest")?),
        Backend::Memory => Arc::new(
            MemoryVm::launch(spec, |ram| guest::fill(ram, spec.fill, 1))
                .context("starting the memory-only VM")?,
        ),
    })
}

fn factory(
    backend: Backend,
) -> impl Fn(&str, &VmSpec, GuestRam) -> Result<Arc<dyn MigratableVm>, VmError> {
    move |machine, spec, ram| -> Result<Arc<dyn MigratableVm>, VmError> {
        let mine = match backend {
            Backend::Kvm => livemig_engine::vm::kvm::MACHINE,
            Backend::Memory => livemig_engine::vm::memory_only::MACHINE,
        };
        if machine != mine {
            return Err(VmError::InvalidSpec(format!(
                "the source VM runs on {machine:?} but this destination runs {mine:?} (see --backend)"
            )));
        }
        Ok(match backend {
            Backend::Kvm => Arc::new(KvmVm::new_incoming(spec, ram)?),
            Backend::Memory => Arc::new(MemoryVm::new_incoming(spec, ram)?),
        })
    }
}

/// `livemig run-vm`.
pub fn run_vm(socket: &Path, args: &VmArgs, key: Option<Key>) -> Result<()> {
    let spec = args.spec();
    let vm = launch(&spec, args.backend)?;
    let listener = bind(socket)?;
    println!(
        "livemig: VM running ({} MiB, {} vCPU, {:?} backend), control socket {}",
        spec.memory_mib,
        spec.vcpus,
        args.backend,
        socket.display()
    );
    let _ = std::io::stdout().flush();
    serve(
        listener,
        socket,
        Arc::new(VmProcess::new(vm, "running", key)),
    )
}

/// `livemig receive`.
pub fn receive(args: &ReceiveArgs) -> Result<()> {
    let key = args.auth.load()?;
    let reserved = match args.reserve_mib {
        Some(mib) => Some(
            GuestRam::new(&RamLayout::single(mib << 20), Populate::Eager)
                .context("reserving destination RAM")?,
        ),
        None => None,
    };
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    let sock_listener = args.socket.as_deref().map(bind).transpose()?;
    println!("livemig: listening on {local}");
    let _ = std::io::stdout().flush();
    let make = factory(args.backend);
    let incoming = destination::receive(
        &listener,
        IncomingOptions {
            reserved,
            timeout: Duration::from_secs(args.timeout_secs),
            progress_wait: Duration::from_secs(3),
            key: key.clone(),
            max_ram_bytes: args.max_memory_mib << 20,
            rdma_device: args.rdma_device.clone(),
        },
        &make,
    )
    .context("incoming migration failed; nothing was resumed here")?;
    let progress = incoming.vm.progress().unwrap_or(0);
    if args.json {
        println!(
            "{}",
            json!({
                "status": "running",
                "pages_received": incoming.pages_received,
                "used_reserved_ram": incoming.used_reserved_ram,
                "guest_progress_after_resume": incoming.progress_after_resume,
                "guest_counter": progress,
            })
        );
    } else {
        println!(
            "livemig: migrated VM running here: {} pages received, guest counter {} (+{} since resume){}",
            incoming.pages_received,
            progress,
            incoming.progress_after_resume,
            if incoming.used_reserved_ram { ", reserved RAM used" } else { "" }
        );
    }
    let _ = std::io::stdout().flush();
    if args.exit_after_resume {
        incoming.vm.shutdown();
        return Ok(());
    }
    let process = Arc::new(VmProcess::new(incoming.vm, "running", key));
    match (sock_listener, &args.socket) {
        (Some(l), Some(path)) => serve(l, path, process),
        _ => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}

fn bind(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            bail!("{} is in use by a running VM process", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    UnixListener::bind(socket)
        .with_context(|| format!("creating control socket {}", socket.display()))
}

/// A VM with its control state.
pub struct VmProcess {
    vm: Arc<dyn MigratableVm>,
    phase: Mutex<&'static str>,
    cancel: AtomicBool,
    last: Mutex<Value>,
    key: Option<Key>,
}

impl VmProcess {
    fn new(vm: Arc<dyn MigratableVm>, phase: &'static str, key: Option<Key>) -> Self {
        VmProcess {
            vm,
            phase: Mutex::new(phase),
            cancel: AtomicBool::new(false),
            last: Mutex::new(Value::Null),
            key,
        }
    }

    fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, p: &'static str) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }

    fn status(&self) -> Value {
        json!({
            "phase": self.phase(),
            "run_state": self.vm.run_state(),
            "guest_counter": self.vm.progress().ok(),
            "memory_mib": self.vm.spec().memory_mib,
            "vcpus": self.vm.spec().vcpus,
            "last_migration": self.last.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

fn serve(listener: UnixListener, path: &Path, process: Arc<VmProcess>) -> Result<()> {
    let path = path.to_path_buf();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let p = process.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(conn, &p, &path) {
                tracing::warn!("control connection: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(conn: UnixStream, p: &Arc<VmProcess>, path: &Path) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?.take(64 * 1024));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut out = conn;
    let req: Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => {
            writeln!(out, "{}", json!({"error": format!("bad request: {e}")}))?;
            return Ok(());
        }
    };
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => writeln!(out, "{}", p.status())?,
        Some("cancel") => {
            let migrating = p.phase() == "migrating";
            if migrating {
                p.cancel.store(true, Ordering::SeqCst);
            }
            writeln!(
                out,
                "{}",
                json!({"cancel_requested": migrating, "phase": p.phase()})
            )?;
        }
        Some("stop") => {
            writeln!(out, "{}", json!({"stopping": true}))?;
            p.vm.shutdown();
            let _ = std::fs::remove_file(path);
            std::process::exit(0);
        }
        Some("migrate") => migrate(&req, p, &mut out)?,
        other => writeln!(
            out,
            "{}",
            json!({"error": format!("unknown command {other:?}")})
        )?,
    }
    Ok(())
}

fn migrate(req: &Value, p: &Arc<VmProcess>, out: &mut UnixStream) -> Result<()> {
    let Some(to) = req.get("to").and_then(Value::as_str) else {
        writeln!(
            out,
            "{}",
            json!({"event": "error", "error": "migrate needs \"to\""})
        )?;
        return Ok(());
    };
    let num = |k: &str, d: u64| req.get(k).and_then(Value::as_u64).unwrap_or(d);
    let opts = MigrateOptions {
        channels: num("channels", 1).clamp(1, 64) as u16,
        downtime_limit_ms: num("downtime_limit_ms", 300),
        max_rounds: num("max_rounds", 30).clamp(1, u64::from(u32::MAX)) as u32,
        compress: match req
            .get("compress")
            .and_then(Value::as_str)
            .unwrap_or("auto")
        {
            "none" => Mode::None,
            "zero" => Mode::Zero,
            "lz4" => Mode::Lz4,
            "zstd" => Mode::Zstd(num("zstd_level", 3).clamp(1, 19) as i32),
            "delta" => Mode::Delta,
            "auto" => Mode::Auto,
            other => {
                writeln!(
                    out,
                    "{}",
                    json!({"event": "error", "error": format!("unknown compress mode {other:?}")})
                )?;
                return Ok(());
            }
        },
        delta_cache_bytes: num("delta_cache_mib", 64).clamp(1, 1 << 20) << 20,
        transport: match req
            .get("transport")
            .and_then(Value::as_str)
            .unwrap_or("tcp")
        {
            "tcp" => TransportChoice::Tcp,
            "rdma" => TransportChoice::Rdma,
            "auto" => TransportChoice::Auto,
            other => {
                writeln!(
                    out,
                    "{}",
                    json!({"event": "error", "error": format!("unknown transport {other:?} (tcp, rdma, auto)")})
                )?;
                return Ok(());
            }
        },
        rdma_device: req
            .get("rdma_device")
            .and_then(Value::as_str)
            .map(str::to_string),
        key: p.key.clone(),
        ..MigrateOptions::default()
    };
    {
        let mut phase = p.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase != "running" {
            writeln!(
                out,
                "{}",
                json!({"event": "error", "error": format!("VM is {}, not running: cannot migrate", *phase)})
            )?;
            return Ok(());
        }
        *phase = "migrating";
    }
    p.cancel.store(false, Ordering::SeqCst);
    let mut sink = out.try_clone()?;
    let mut emit = |v: Value| {
        // The client may go away; the migration goes on regardless.
        let _ = writeln!(sink, "{v}");
    };
    let result = source::migrate(&*p.vm, to, &opts, &p.cancel, &mut |ev| {
        emit(match ev {
            Progress::Connected {
                setup_ms,
                total_pages,
                transport,
                transport_detail,
            } => {
                json!({"event": "connected", "setup_ms": setup_ms, "total_pages": total_pages,
                       "transport": transport, "transport_detail": transport_detail})
            }
            Progress::Sending {
                round,
                pages_done,
                pages_total,
            } => {
                json!({"event": "sending", "round": round, "pages_done": pages_done, "pages_total": pages_total})
            }
            Progress::Round(r) => json!({"event": "round", "round": r}),
            Progress::Paused { pages } => json!({"event": "paused", "pages": pages}),
            Progress::Committed => json!({"event": "committed"}),
        })
    });
    let (phase, msg) = match result {
        Ok(report) => {
            p.vm.shutdown();
            let v = serde_json::to_value(&report)?;
            *p.last.lock().unwrap_or_else(|e| e.into_inner()) = v.clone();
            ("migrated", json!({"event": "done", "report": v}))
        }
        Err(e) => {
            let (phase, source_state) = match &e {
                MigrationError::OutcomeUnknown { .. } => ("outcome-unknown", "paused"),
                _ => ("running", "running"),
            };
            let v =
                json!({"status": "failed", "error": e.to_string(), "source_state": source_state});
            *p.last.lock().unwrap_or_else(|e| e.into_inner()) = v.clone();
            (
                phase,
                json!({"event": "error", "error": e.to_string(), "source_state": source_state}),
            )
        }
    };
    p.set_phase(phase);
    emit(msg);
    Ok(())
}
