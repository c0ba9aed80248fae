//! A VM process: a VM plus its JSON control socket (one JSON request per connection, answered
//! by one JSON line, or by a stream of event lines for `migrate`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livemig_engine::announce::{announce, AnnounceSettings};
use livemig_engine::auth::Key;
use livemig_engine::control::{
    AnnounceReply, CancelReply, ErrorReply, Event, LiveProgress, MigrateRequest, OkReply,
    PlanRequest, Request, ResolveReply, StatusReply, StopReply, MAX_REQUEST_BYTES,
};
use livemig_engine::destination::{self, DiskPlacement, IncomingOptions};
use livemig_engine::devices::disk_writer::DiskWriterSpec;
use livemig_engine::memory::{GuestRam, Populate, RamLayout};
use livemig_engine::session::{MigrationError, Outcome, OutcomeRecord};
use livemig_engine::source;
use livemig_engine::vm::kvm::{HostResources, KvmVm};
use livemig_engine::vm::memory_only::MemoryVm;
use livemig_engine::vm::{
    builtin_guest, Backend, GuestExit, MigratableVm, VmConfig, VmError, VmSpec,
};
use serde_json::{json, Value};

use crate::host::{BandwidthShare, Direction, HostDir};
use crate::{ReceiveArgs, RunVmArgs};

/// Builds and starts the source VM (the built-in guest, with its disk if it has one).
pub fn launch(
    spec: &VmSpec,
    backend: Backend,
    disk: Option<&DiskWriterSpec>,
) -> Result<Arc<dyn MigratableVm>> {
    Ok(match backend {
        Backend::Kvm => {
            Arc::new(KvmVm::launch_with_disk(spec, disk).context("starting the KVM guest")?)
        }
        Backend::Memory => Arc::new(
            MemoryVm::launch_with_disk(spec, disk, |ram| builtin_guest::fill(ram, spec.fill, 1))
                .context("starting the memory-only VM")?,
        ),
    })
}

/// Builds incoming VMs on `backend` (each backend refuses another's machine), their devices
/// on `host`'s resources.
fn factory(
    backend: Backend,
    host: HostResources,
) -> impl Fn(&VmConfig, GuestRam, &DiskPlacement) -> Result<Arc<dyn MigratableVm>, VmError> {
    move |config, ram, placed| -> Result<Arc<dyn MigratableVm>, VmError> {
        // Disks this migration placed (copies) come first, then --disk-path, then the
        // source's paths (shared storage).
        let mut host = host.clone();
        host.disks.splice(0..0, placed.iter().cloned());
        Ok(match backend {
            Backend::Kvm => Arc::new(KvmVm::new_incoming(config, ram, &host)?),
            Backend::Memory => {
                Arc::new(MemoryVm::new_incoming_with_disks(config, ram, &host.disks)?)
            }
        })
    }
}

/// `livemig run-vm`.
pub fn run_vm(args: &RunVmArgs, key: Option<Key>) -> Result<()> {
    livemig_engine::memory::set_backing(args.hugepages);
    args.cpu.apply()?;
    let socket = &args.socket;
    let vm: Arc<dyn MigratableVm> = match args.linux.spec(args.vm.memory, args.vm.vcpus)? {
        Some(spec) => {
            if args.vm.backend != Backend::Kvm {
                bail!("a Linux kernel runs on the kvm backend only");
            }
            Arc::new(KvmVm::boot_linux(&spec).context("booting the Linux VM; nothing was started")?)
        }
        None => launch(
            &args.vm.spec(),
            args.vm.backend,
            args.linux.builtin_disk()?.as_ref(),
        )?,
    };
    if args.populate_ram {
        vm.ram()
            .populate_all()
            .context("faulting in all guest RAM (--populate-ram)")?;
    }
    let listener = bind(socket)?;
    let config = vm.config();
    println!(
        "livemig: VM running ({} MiB, {} vCPU, {} backend{}), control socket {}",
        config.layout.total_bytes() >> 20,
        config.vcpus,
        args.vm.backend,
        if args.linux.kernel.is_some() {
            ", Linux"
        } else {
            ""
        },
        socket.display()
    );
    let _ = std::io::stdout().flush();
    watch_guest_exit(vm.clone(), Some(socket.to_path_buf()));
    serve(
        listener,
        socket,
        Arc::new(VmProcess::new(
            vm,
            "running",
            key,
            HostDir::of_socket(socket),
        )),
    )
}

/// Ends the process when the guest powers off (status 0) or resets (a VM reboot ends it too),
/// removing the control socket.
fn watch_guest_exit(vm: Arc<dyn MigratableVm>, socket: Option<std::path::PathBuf>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(e) = vm.guest_exit() {
            println!(
                "livemig: the guest {}; the VM has stopped",
                match e {
                    GuestExit::PowerOff => "powered off",
                    GuestExit::Reset => "rebooted (livemig ends the VM on reboot)",
                }
            );
            let _ = std::io::stdout().flush();
            vm.shutdown();
            if let Some(s) = &socket {
                let _ = std::fs::remove_file(s);
            }
            std::process::exit(0);
        }
    });
}

/// Whether this host has any RDMA device (`/sys/class/infiniband`).
fn has_rdma_devices() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// `--reserve-mib`: destination RAM faulted in ahead, the KVM VM made on it, and the RAM
/// registered for RDMA writes now when this host has a device, so an incoming migration does
/// not pay these at set-up (a failure only costs them then).
fn reserve_ram(
    args: &ReceiveArgs,
) -> Result<(Option<GuestRam>, Option<destination::RdmaRegistration>)> {
    let reserved = match args.reserve_mib {
        Some(mib) => Some(
            GuestRam::new(&RamLayout::single(mib << 20), Populate::Eager)
                .context("reserving destination RAM")?,
        ),
        None => None,
    };
    if let (Some(ram), Backend::Kvm) = (&reserved, args.backend) {
        // The KVM VM and its memory slots too (KVM's per-page metadata for the slots takes
        // ~9 ms per GiB here): built now, not in the migration's set-up. A failure only
        // costs it then.
        let t = Instant::now();
        match livemig_engine::vm::kvm::prepare_shell(ram) {
            Ok(()) => tracing::info!(
                ms = t.elapsed().as_millis() as u64,
                "KVM VM made ahead for the reserved RAM"
            ),
            Err(e) => tracing::warn!("KVM VM not made ahead for the reserved RAM: {e}"),
        }
    }
    let reserved_rdma = reserved
        .as_ref()
        .filter(|_| has_rdma_devices())
        .and_then(|ram| {
            let t = Instant::now();
            match destination::register_reserved(ram, &args.rdma_device) {
                Ok(r) => {
                    tracing::info!(
                        ?r,
                        ms = t.elapsed().as_millis() as u64,
                        "reserved RAM registered for RDMA"
                    );
                    Some(r)
                }
                Err(e) => {
                    tracing::warn!("reserved RAM not registered for RDMA ahead: {e}");
                    None
                }
            }
        });
    Ok((reserved, reserved_rdma))
}

/// The migrated VM's line: what arrived and what the switchover cost here.
fn report_arrival(args: &ReceiveArgs, incoming: &destination::Incoming) {
    let progress = incoming.vm.progress().unwrap_or(0);
    if args.json {
        println!(
            "{}",
            json!({
                "status": "running",
                "pages_received": incoming.pages_received,
                "used_reserved_ram": incoming.used_reserved_ram,
                "vm_made_ahead": livemig_engine::vm::kvm::shell_used(),
                "guest_progress_after_resume": incoming.progress_after_resume,
                "guest_counter": progress,
                "switchover_steps": incoming.steps,
            })
        );
    } else {
        let st = &incoming.steps;
        println!(
            "livemig: migrated VM running here: {} pages received, guest counter {} (+{} since resume){}; \
             switchover here: last pages landed {:.1}, storage {:.1}, digest {:.1}, restore {:.1}, \
             record {:.1}, resume {:.1} ms",
            incoming.pages_received,
            progress,
            incoming.progress_after_resume,
            if incoming.used_reserved_ram { ", reserved RAM used" } else { "" },
            st.land_ms,
            st.storage_ms,
            st.digest_ms,
            st.restore_ms,
            st.record_ms,
            st.resume_ms
        );
    }
}

/// `livemig receive`.
pub fn receive(args: &ReceiveArgs) -> Result<()> {
    livemig_engine::memory::set_backing(args.hugepages);
    // The model of an incoming VM is its source's; only hidden features matter here.
    args.cpu_without.apply(Default::default())?;
    let key = args.auth.load()?;
    let (reserved, reserved_rdma) = reserve_ram(args)?;
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    let sock_listener = args.socket.as_deref().map(bind).transpose()?;
    let host = args.socket.as_deref().and_then(HostDir::of_socket);
    let control = args.control_fd.map(control_connection).transpose()?;
    // Under a host agent the incoming migration waits for one of the host's slots (bounded).
    let admit = host.clone().map(|h| -> livemig_engine::destination::Admit {
        Box::new(move |_config| {
            let deadline = Instant::now() + Duration::from_secs(h.settings().queue_timeout_secs);
            h.acquire(Direction::Incoming, Some(deadline), &|| false)
                .map(|slot| Box::new(slot) as Box<dyn std::any::Any>)
        })
    });
    // Until the VM runs here, its control socket says it is arriving.
    // (Shared with `on_resumed`, which ends it on resume; a failure ends it below.)
    let arriving = Arc::new(Mutex::new(
        sock_listener.as_ref().map(Arriving::start).transpose()?,
    ));
    // Once the VM runs here, its control socket serves it at once, before the source is told
    // the migration is over: whoever asks after `migrate` returns finds it running.
    let (served_tx, served_rx) = std::sync::mpsc::channel();
    let on_resumed = match (sock_listener, args.socket.clone()) {
        (Some(l), Some(path)) if !args.exit_after_resume => {
            let (arriving, key, host) = (arriving.clone(), key.clone(), host.clone());
            Some(Box::new(move |vm: Arc<dyn MigratableVm>| {
                drop(Arriving::take(&arriving));
                let process = Arc::new(VmProcess::new(vm, "running", key, host));
                let spawned = std::thread::Builder::new()
                    .name("livemig-control".into())
                    .spawn(move || serve(l, &path, process));
                let _ = served_tx.send(spawned);
            }) as destination::OnResumed)
        }
        _ => None,
    };
    println!("livemig: listening on {local}");
    let _ = std::io::stdout().flush();
    let make = factory(args.backend, args.host.resources()?);
    let incoming = destination::receive(
        &listener,
        IncomingOptions {
            control,
            admit,
            on_resumed,
            reserved,
            reserved_rdma,
            timeout: Duration::from_secs(args.timeout_secs),
            progress_wait: Duration::from_secs(3),
            key: key.clone(),
            max_ram_bytes: args.max_memory_mib << 20,
            rdma_devices: args.rdma_device.clone(),
            storage_dir: args.storage_dir.clone(),
            decisions: Some(args.decisions.clone().unwrap_or_else(|| {
                args.socket
                    .as_deref()
                    .and_then(Path::parent)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| std::env::temp_dir().join("livemig-decisions"))
            })),
            announce: AnnounceSettings {
                count: if args.no_announce {
                    0
                } else {
                    args.announce_count
                },
                step_ms: args.announce_step_ms,
                ..AnnounceSettings::default()
            },
            receiver_hashing: destination::Hashing::Auto,
        },
        &make,
    );
    let incoming = match incoming {
        Ok(i) => i,
        Err(e) => {
            // No VM here: its control socket goes (a host's VM list shows no ghost) — its
            // name first, then the arriving thread answers whoever still waits (closed
            // first, a `vm list` in between would find a socket that resets it).
            if let Some(p) = &args.socket {
                let _ = std::fs::remove_file(p);
            }
            if let Some(a) = Arriving::take(&arriving) {
                a.fail();
            }
            // A link probe through the host agent: served, and this process is done.
            if matches!(e, MigrationError::ProbeServed) && args.control_fd.is_some() {
                return Ok(());
            }
            return Err(anyhow::Error::new(e)
                .context("incoming migration failed; nothing was resumed here"));
        }
    };
    drop(Arriving::take(&arriving));
    report_arrival(args, &incoming);
    let _ = std::io::stdout().flush();
    if args.exit_after_resume {
        incoming.vm.shutdown();
        return Ok(());
    }
    watch_guest_exit(incoming.vm.clone(), args.socket.clone());
    match served_rx.try_recv() {
        Ok(spawned) => spawned
            .context("starting the control socket's thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("the control socket's thread panicked"))?,
        Err(_) => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}

/// The migration connection a host agent handed over as descriptor `fd`.
fn control_connection(fd: i32) -> Result<TcpStream> {
    if fd < 3 {
        bail!("--control-fd {fd}: not a descriptor a host agent hands over (3 or more)");
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_TYPE writes one int into `ty`; a descriptor that is not an open socket
    // makes the call fail, and nothing else is touched.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut ty).cast(),
            &raw mut len,
        )
    };
    if r != 0 || ty != libc::SOCK_STREAM {
        bail!("--control-fd {fd}: not an open TCP connection");
    }
    // SAFETY: the descriptor is an open stream socket this process inherited and nothing
    // else owns.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

/// Answers the control socket while a migration arrives: status says `incoming`; anything
/// else is refused until the VM runs here.
struct Arriving {
    stop: Arc<AtomicBool>,
    /// Set with `stop` when the migration failed: the thread then answers the connections
    /// still waiting (status says `failed`) before it ends, rather than leave them to be
    /// reset when the process exits.
    failed: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Arriving {
    fn start(listener: &UnixListener) -> Result<Arriving> {
        let l = listener.try_clone()?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let (s, f) = (stop.clone(), failed.clone());
        let thread = std::thread::Builder::new()
            .name("livemig-arriving".into())
            .spawn(move || {
                loop {
                    let stopping = s.load(Ordering::Relaxed);
                    let failed = f.load(Ordering::Relaxed);
                    if stopping && !failed {
                        // The VM runs here: the waiting connections are the control
                        // socket's to serve.
                        break;
                    }
                    match l.accept() {
                        Ok((mut conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                            let mut line = String::new();
                            let _ = BufReader::new(&conn).read_line(&mut line);
                            let answer = match serde_json::from_str::<Request>(&line) {
                                Ok(Request::Status) if failed => json!({"phase": "failed"}),
                                Ok(Request::Status) => json!({"phase": "incoming"}),
                                _ if failed => json!({
                                    "error": "the incoming migration failed: no VM here"
                                }),
                                _ => json!({
                                    "error": "the VM is arriving here: only status until it runs"
                                }),
                            };
                            let _ = writeln!(conn, "{answer}");
                        }
                        // None waiting, and the socket's name is gone: none can come.
                        Err(_) if stopping => break,
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                let _ = l.set_nonblocking(false);
            })?;
        Ok(Arriving {
            stop,
            failed,
            thread: Some(thread),
        })
    }

    /// The one shared between `receive` and its `on_resumed` hook, if neither has ended it.
    fn take(shared: &Mutex<Option<Arriving>>) -> Option<Arriving> {
        shared.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Ends it for a migration that failed, once the socket's name is removed: the
    /// connections already waiting are answered.
    fn fail(self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
    let l = UnixListener::bind(socket)
        .with_context(|| format!("creating control socket {}", socket.display()))?;
    // Whoever can connect can migrate or stop the VM: its owner only (every connection's
    // peer is checked as well, which also covers the moment before this chmod).
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making control socket {} private", socket.display()))?;
    Ok(l)
}

/// Control connections served at once; more are refused with a message.
const MAX_CONTROL_CONNECTIONS: usize = 32;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The uid of the process at the other end of `conn` (SO_PEERCRED).
fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a `ucred` owned here, and
    // updates `len`; the descriptor is open for the call.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether the peer may use this VM's control socket: root or this process's user.
fn peer_allowed(conn: &UnixStream) -> Result<(), String> {
    // SAFETY: geteuid has no memory effects and cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(conn) {
        Ok(uid) if uid == 0 || uid == me => Ok(()),
        Ok(uid) => Err(format!(
            "uid {uid} may not use this VM's control socket (only uid {me} and root)"
        )),
        Err(e) => Err(format!("cannot identify the peer: {e}")),
    }
}

/// A VM with its control state.
pub struct VmProcess {
    vm: Arc<dyn MigratableVm>,
    phase: Mutex<&'static str>,
    cancel: AtomicBool,
    last: Mutex<Value>,
    key: Option<Key>,
    /// The migration left in "outcome unknown", by id.
    unsettled: Mutex<Option<String>>,
    /// The running migration's progress (None when none runs).
    live: Mutex<Option<LiveProgress>>,
    /// The host agent's directory this VM lives in: its migrations take the host's slots.
    host: Option<HostDir>,
}

impl VmProcess {
    fn new(
        vm: Arc<dyn MigratableVm>,
        phase: &'static str,
        key: Option<Key>,
        host: Option<HostDir>,
    ) -> Self {
        VmProcess {
            vm,
            phase: Mutex::new(phase),
            cancel: AtomicBool::new(false),
            last: Mutex::new(Value::Null),
            key,
            unsettled: Mutex::new(None),
            live: Mutex::new(None),
            host,
        }
    }

    fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, p: &'static str) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }

    fn status(&self) -> StatusReply {
        let config = self.vm.config();
        StatusReply {
            phase: self.phase().to_string(),
            run_state: self.vm.run_state(),
            guest_counter: self.vm.progress().ok(),
            memory_mib: config.layout.total_bytes() >> 20,
            vcpus: config.vcpus,
            last_migration: self.last.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            migration: self.live.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// Writes one JSON line.
fn reply(out: &mut UnixStream, v: &impl serde::Serialize) -> Result<()> {
    writeln!(out, "{}", serde_json::to_string(v)?)?;
    Ok(())
}

fn serve(listener: UnixListener, path: &Path, process: Arc<VmProcess>) -> Result<()> {
    let path = path.to_path_buf();
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if let Err(e) = peer_allowed(&conn) {
            tracing::warn!("control connection refused: {e}");
            let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
            let _ = reply(&mut conn, &ErrorReply { error: e });
            continue;
        }
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONTROL_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
            let _ = reply(
                &mut conn,
                &ErrorReply {
                    error: format!(
                        "{MAX_CONTROL_CONNECTIONS} control connections are open already; try again"
                    ),
                },
            );
            continue;
        }
        let p = process.clone();
        let path = path.clone();
        let mine = active.clone();
        // (Named: an outgoing migration runs on its request's thread.)
        let spawned = std::thread::Builder::new()
            .name("livemig-ctl".into())
            .spawn(move || {
                if let Err(e) = handle(conn, &p, &path) {
                    tracing::warn!("control connection: {e:#}");
                }
                mine.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("control connection: no thread for it: {e}");
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

fn handle(conn: UnixStream, p: &Arc<VmProcess>, path: &Path) -> Result<()> {
    // A client that connects and says nothing is dropped.
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?.take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut out = conn;
    let req: Request = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => {
            return reply(
                &mut out,
                &ErrorReply {
                    error: format!("bad request: {e}"),
                },
            )
        }
    };
    match req {
        Request::Status => reply(&mut out, &p.status()),
        Request::Cancel => {
            let migrating = matches!(p.phase(), "migrating" | "queued");
            if migrating {
                p.cancel.store(true, Ordering::SeqCst);
            }
            reply(
                &mut out,
                &CancelReply {
                    cancel_requested: migrating,
                    phase: p.phase().to_string(),
                },
            )
        }
        Request::Stop => {
            reply(&mut out, &StopReply { stopping: true })?;
            p.vm.shutdown();
            let _ = std::fs::remove_file(path);
            std::process::exit(0);
        }
        Request::Migrate(m) => migrate(&m, p, &mut out),
        Request::Plan(m) => match plan(&m, p) {
            Ok(r) => reply(&mut out, &r),
            Err(error) => reply(&mut out, &ErrorReply { error }),
        },
        Request::Console => stream_console(p, &mut out),
        Request::Resolve { record } => match resolve(p, &record) {
            Ok(r) => reply(&mut out, &r),
            Err(error) => reply(&mut out, &ErrorReply { error }),
        },
        Request::Announce => match announce(p.vm.clone(), AnnounceSettings::default()) {
            Ok(nics) => reply(&mut out, &AnnounceReply { nics }),
            Err(e) => reply(
                &mut out,
                &ErrorReply {
                    error: format!("announcing: {e}"),
                },
            ),
        },
        Request::ConsoleInput { text } => {
            if p.vm.console_input(text.as_bytes()) {
                reply(&mut out, &OkReply { ok: true })
            } else {
                reply(
                    &mut out,
                    &ErrorReply {
                        error: "this VM has no console, or too much input is pending".into(),
                    },
                )
            }
        }
    }
}

/// The guest's console output so far, then live, until the client goes away.
fn stream_console(p: &Arc<VmProcess>, out: &mut UnixStream) -> Result<()> {
    let Some(console) = p.vm.console() else {
        return reply(
            out,
            &ErrorReply {
                error: "this VM has no console (the built-in guest)".into(),
            },
        );
    };
    let (history, live) = console.subscribe();
    out.write_all(&history)?;
    for chunk in live {
        out.write_all(&chunk)?;
    }
    Ok(())
}

/// Settles a migration left in "outcome unknown" with the destination's `record`: the VM
/// resumes here only if the destination discarded its copy, and stops here if it resumed.
fn resolve(p: &Arc<VmProcess>, record: &OutcomeRecord) -> Result<ResolveReply, String> {
    let mut unsettled = p.unsettled.lock().unwrap_or_else(|e| e.into_inner());
    let Some(id) = unsettled.clone() else {
        return Err(format!(
            "nothing to resolve: the VM is {}, not waiting on a migration's outcome",
            p.phase()
        ));
    };
    if record.migration != id {
        return Err(format!(
            "the record is about migration {}, the VM waits on the outcome of migration {id}",
            record.migration
        ));
    }
    let phase = match record.outcome {
        Outcome::Discarded => {
            p.vm.resume().map_err(|e| {
                format!("the destination discarded its copy, but resuming here failed: {e}")
            })?;
            "running"
        }
        Outcome::Resumed => {
            p.vm.shutdown();
            "migrated"
        }
        Outcome::Pending => {
            return Err(
                "the destination's record says it had not decided yet (pending): if the \
                 destination is still running it may still resume the VM; wait for its final \
                 record"
                    .into(),
            )
        }
    };
    *unsettled = None;
    p.set_phase(phase);
    tracing::info!(migration = %id, outcome = ?record.outcome, phase, "outcome resolved");
    Ok(ResolveReply {
        outcome: record.outcome,
        phase: phase.into(),
    })
}

/// Forecasts a migration: the VM keeps running, nothing moves.
fn plan(req: &PlanRequest, p: &Arc<VmProcess>) -> std::result::Result<source::PlanReport, String> {
    let opts = req
        .migrate
        .options(p.key.clone())
        .map_err(|e| format!("bad plan request: {e}"))?;
    if !(100..=60_000).contains(&req.window_ms) {
        return Err(format!(
            "a sampling window of {} ms (100..=60000)",
            req.window_ms
        ));
    }
    {
        let mut phase = p.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase != "running" {
            return Err(format!("VM is {}, not running: cannot plan", *phase));
        }
        *phase = "planning";
    }
    let r = source::plan(
        &*p.vm,
        &req.migrate.to,
        &opts,
        Duration::from_millis(req.window_ms),
    );
    p.set_phase("running");
    r.map_err(|e| format!("plan failed: {e}"))
}

fn migrate(req: &MigrateRequest, p: &Arc<VmProcess>, out: &mut UnixStream) -> Result<()> {
    let fail = |out: &mut UnixStream, error: String| {
        reply(
            out,
            &Event::Error {
                error,
                source_state: "running".into(),
            },
        )
    };
    let opts = match req.options(p.key.clone()) {
        Ok(o) => o,
        Err(e) => return fail(out, format!("bad migrate request: {e}")),
    };
    {
        let mut phase = p.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase != "running" {
            let msg = format!("VM is {}, not running: cannot migrate", *phase);
            drop(phase);
            return fail(out, msg);
        }
        *phase = if p.host.is_some() {
            "queued"
        } else {
            "migrating"
        };
    }
    p.cancel.store(false, Ordering::SeqCst);
    // A VM of a host agent's directory waits, queued, for one of the host's outgoing slots.
    let _slot = match &p.host {
        Some(h) => match h.acquire(Direction::Outgoing, None, &|| {
            p.cancel.load(Ordering::SeqCst)
        }) {
            Ok(slot) => {
                p.set_phase("migrating");
                Some(slot)
            }
            Err(e) => {
                p.set_phase("running");
                return fail(out, e);
            }
        },
        None => None,
    };
    // The host's bandwidth caps (when it has any), its share re-evaluated as migrations start
    // and end; without them the request's own cap stands as set.
    let _share = p.host.clone().filter(HostDir::caps_bandwidth).map(|h| {
        let requested = req
            .max_bandwidth_mbps
            .unwrap_or(0)
            .saturating_mul(1_000_000);
        BandwidthShare::start(h, opts.bandwidth.clone(), requested)
    });
    let mut sink = EventSink::new(out.try_clone()?);
    *p.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(LiveProgress::default());
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        source::migrate(&*p.vm, &req.to, &opts, &p.cancel, &mut |ev| {
            let ev = Event::from(ev);
            if let Some(live) = p.live.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                live.update(&ev);
                if let Event::Round { round } = &ev {
                    live.throttle_pct = round.throttle_pct;
                }
            }
            sink.emit(&ev)
        })
    }));
    *p.live.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let result = match run {
        Ok(r) => r,
        // A bug, not a failure the engine foresaw: the client still hears what happened and
        // where the guest is, instead of a connection closed without a word.
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            let running = p.vm.run_state() == livemig_engine::vm::RunState::Running;
            let (phase, source_state, after) = if running {
                ("running", "running", "the guest runs on here")
            } else {
                (
                    "outcome-unknown",
                    "paused",
                    "the guest stays paused here: check the destination before resuming either \
                     side",
                )
            };
            let error = format!(
                "internal error (a bug; please report it): the migration panicked: {what}; {after}"
            );
            tracing::error!("{error}");
            *p.last.lock().unwrap_or_else(|e| e.into_inner()) =
                json!({"status": "failed", "error": error, "source_state": source_state});
            p.set_phase(phase);
            sink.finish(&Event::Error {
                error,
                source_state: source_state.into(),
            });
            return Ok(());
        }
    };
    let (phase, ev) = match result {
        Ok(report) => {
            p.vm.shutdown();
            *p.last.lock().unwrap_or_else(|e| e.into_inner()) = serde_json::to_value(&report)?;
            (
                "migrated",
                Event::Done {
                    report: Box::new(report),
                },
            )
        }
        Err(e) => {
            let (phase, source_state) = match &e {
                MigrationError::OutcomeUnknown { id, .. } => {
                    *p.unsettled.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.clone());
                    ("outcome-unknown", "paused")
                }
                _ => ("running", "running"),
            };
            *p.last.lock().unwrap_or_else(|e| e.into_inner()) =
                json!({"status": "failed", "error": e.to_string(), "source_state": source_state});
            (
                phase,
                Event::Error {
                    error: e.to_string(),
                    source_state: source_state.into(),
                },
            )
        }
    };
    p.set_phase(phase);
    sink.finish(&ev);
    Ok(())
}

/// Events queued for a control client: at most this many wait; more progress is dropped.
const EVENT_QUEUE: usize = 256;
/// How long a client may leave an event unread before the writer gives up on it.
const EVENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A migration's events, written to its client by a thread of their own: a client that stops
/// reading never holds the migration (with the guest paused, that would strand it). When the
/// queue is full, progress events are dropped; the final event waits for room.
struct EventSink {
    tx: Option<std::sync::mpsc::SyncSender<String>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl EventSink {
    fn new(mut out: UnixStream) -> EventSink {
        let _ = out.set_write_timeout(Some(EVENT_WRITE_TIMEOUT));
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(EVENT_QUEUE);
        let writer = std::thread::Builder::new()
            .name("livemig-events".into())
            .spawn(move || {
                for line in rx {
                    // The client went away or stopped reading: the migration goes on.
                    if writeln!(out, "{line}").is_err() {
                        return;
                    }
                }
            })
            .ok();
        EventSink {
            tx: writer.is_some().then_some(tx),
            writer,
        }
    }

    /// Queues `ev` unless the queue is full; never blocks.
    fn emit(&mut self, ev: &Event) {
        if let (Some(tx), Ok(line)) = (&self.tx, serde_json::to_string(ev)) {
            let _ = tx.try_send(line);
        }
    }

    /// Queues the final event (waiting for room while the writer still writes), then lets
    /// the writer finish.
    fn finish(mut self, ev: &Event) {
        if let (Some(tx), Ok(line)) = (self.tx.take(), serde_json::to_string(ev)) {
            let _ = tx.send(line);
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_stops_reading_never_holds_the_migration() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        let migration = std::thread::spawn(move || {
            let mut sink = EventSink::new(ours);
            // Far more than a socket buffer holds (~30 bytes each): with a blocking writer
            // this would hang here, as the migration did with the guest paused.
            for i in 0..50_000 {
                sink.emit(&Event::Sending {
                    round: 1,
                    pages_done: i,
                    pages_total: 50_000,
                    eta: None,
                });
            }
            done_tx.send(()).unwrap();
            // The final event waits for the writer, which gives up once the client is gone.
            sink.finish(&Event::Paused { pages: 1 });
        });
        done.recv_timeout(Duration::from_secs(60))
            .expect("emitting events blocked on a client that does not read");
        drop(theirs);
        migration.join().unwrap();
    }

    #[test]
    fn a_reading_client_gets_the_final_event() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut sink = EventSink::new(ours);
        sink.emit(&Event::Paused { pages: 7 });
        sink.finish(&Event::Paused { pages: 8 });
        let lines: Vec<String> = BufReader::new(theirs).lines().map(|l| l.unwrap()).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].contains('8'), "{lines:?}");
    }
}
