//! `livemig host`: one agent per host, as Hyper-V's `Set-VMHost` settings.
//!
//! The agent owns the host's migration networks: it listens on the configured addresses
//! only, refuses connections from outside the allowed subnets, and starts a VM process
//! (`livemig receive`, handed the accepted connection) for each incoming migration. Every VM
//! whose control socket lies in the host's directory belongs to the host — those the agent
//! started and those an operator started there with `run-vm` — and obeys its limits: a
//! migration takes one of the host's incoming or outgoing slots (lock files, released when
//! the process ends, however it ends) and waits, queued, while none is free. The directory
//! holds the agent's effective settings (`host.json`, read by the VM processes) and an event
//! log (`events.jsonl`: one JSON object per line, written while the slot is held, so the log
//! shows exactly how many migrations were in flight at any moment).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use livemig_engine::control::{self, Request};
use livemig_engine::memory::Backing;
use livemig_engine::source::TransportChoice;
use livemig_engine::vm::kvm::cpu::Feature;
use livemig_engine::vm::Backend;
use livemig_transport::codec::Mode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::one_of;

/// The agent's effective settings in its directory, read by the host's VM processes.
pub const SETTINGS: &str = "host.json";
/// The host's event log in its directory.
pub const EVENTS: &str = "events.jsonl";
/// The host directory when none is given.
pub const DEFAULT_DIR: &str = "/run/livemig";

/// A host's migration settings: the TOML file of `livemig host --config`, every field also a
/// flag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Where the host's VMs live: their control sockets (`NAME.sock`), the logs of the VM
    /// processes the agent starts (`NAME.log`), decision records, the settings and the event
    /// log.
    pub dir: PathBuf,
    /// Migration networks: the addresses (`IP:PORT`) the agent takes incoming migrations on.
    /// A connection to any other address of the host is refused by the kernel.
    pub listen: Vec<String>,
    /// Subnets (`10.0.0.0/24`, `fd00::/64`, or one address) sources may connect from; empty:
    /// any. Connections from elsewhere are closed unread and logged.
    pub allow: Vec<String>,
    /// Most incoming migrations at once; more wait, queued.
    pub max_incoming: u32,
    /// Most outgoing migrations at once; more wait, queued.
    pub max_outgoing: u32,
    /// How long an incoming migration may wait for a slot before it is refused, seconds
    /// (below the source's 60 s answer timeout).
    pub queue_timeout_secs: u64,
    /// Default transport of migrations from this host (`tcp`, `rdma`, `auto`).
    pub transport: TransportChoice,
    /// Default page encoding of migrations from this host (`none`, `lz4`, `zstd`, `auto`, ...).
    pub compress: Mode,
    /// Default data channels of migrations from this host: TCP connections, or RDMA queue pairs
    /// per rail (None: 1 connection, 2 queue pairs per rail).
    pub channels: Option<u16>,
    /// Most MB/s one outgoing migration may send (0: no cap).
    pub migration_bandwidth_mbps: u64,
    /// Most MB/s the host's outgoing migrations send together, shared evenly among those in
    /// flight (0: no cap).
    pub host_bandwidth_mbps: u64,
    /// The pre-shared key file (hex) of incoming migrations.
    pub key_file: Option<PathBuf>,
    /// This host's certificate (PEM), with `cert_key` and `ca`: mutual TLS instead of a key.
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub cert_key: Option<PathBuf>,
    /// The operators' CA (PEM) that signs every host's certificate.
    pub ca: Option<PathBuf>,
    /// Take migrations without authentication (trusted networks only).
    pub no_auth: bool,
    /// VMM backend of incoming VMs (`kvm`, `memory`).
    pub backend: Backend,
    /// What backs incoming VMs' RAM (`4K`, `2M`, `1G`).
    pub hugepages: Backing,
    /// CPU features this host offers no guest (an incoming VM given one is refused).
    pub cpu_without: Vec<String>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            dir: PathBuf::from(DEFAULT_DIR),
            listen: vec!["0.0.0.0:7000".into()],
            allow: Vec::new(),
            max_incoming: 2,
            max_outgoing: 2,
            queue_timeout_secs: 30,
            transport: TransportChoice::Tcp,
            compress: Mode::Auto,
            channels: None,
            migration_bandwidth_mbps: 0,
            host_bandwidth_mbps: 0,
            key_file: None,
            cert: None,
            cert_key: None,
            ca: None,
            no_auth: false,
            backend: Backend::Kvm,
            hugepages: Backing::Normal,
            cpu_without: Vec::new(),
        }
    }
}

/// `livemig host`: flags override the file's fields.
#[derive(Args, Debug, Default)]
pub struct HostArgs {
    /// TOML file of the host's settings (each field below; see the README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of the host's VMs, settings and event log [default: /run/livemig].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A migration network address to listen on, IP:PORT (port 0 picks one); repeatable
    /// [default: 0.0.0.0:7000].
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<String>,
    /// A subnet sources may connect from (CIDR or one address); repeatable [default: any].
    #[arg(long = "allow", value_name = "SUBNET")]
    allow: Vec<String>,
    /// Most incoming migrations at once [default: 2].
    #[arg(long)]
    max_incoming: Option<u32>,
    /// Most outgoing migrations at once [default: 2].
    #[arg(long)]
    max_outgoing: Option<u32>,
    /// Longest wait of an incoming migration for a slot, seconds [default: 30].
    #[arg(long)]
    queue_timeout_secs: Option<u64>,
    /// Default transport of migrations from this host [default: tcp].
    #[arg(long, value_parser = one_of::<TransportChoice>(TransportChoice::NAMES))]
    transport: Option<TransportChoice>,
    /// Default page encoding of migrations from this host [default: auto].
    #[arg(long)]
    compress: Option<Mode>,
    /// Default data channels of migrations from this host: TCP connections, or RDMA queue pairs
    /// per rail [default: 1 connection; 2 queue pairs per rail].
    #[arg(long)]
    channels: Option<u16>,
    /// Most MB/s one outgoing migration may send [default: 0, no cap].
    #[arg(long)]
    migration_bandwidth_mbps: Option<u64>,
    /// Most MB/s all outgoing migrations send together, shared among those in flight
    /// [default: 0, no cap].
    #[arg(long)]
    host_bandwidth_mbps: Option<u64>,
    /// Pre-shared key file of incoming migrations.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// This host's certificate (with --cert-key and --ca).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// The certificate's private key.
    #[arg(long)]
    cert_key: Option<PathBuf>,
    /// The operators' CA.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Take migrations without authentication (trusted networks only).
    #[arg(long)]
    no_auth: bool,
    /// VMM backend of incoming VMs [default: kvm].
    #[arg(long, value_parser = one_of::<Backend>(Backend::NAMES))]
    backend: Option<Backend>,
    /// What backs incoming VMs' RAM [default: 4K].
    #[arg(long, value_parser = one_of::<Backing>(Backing::NAMES))]
    hugepages: Option<Backing>,
    /// A CPU feature this host offers no guest; repeatable.
    #[arg(long = "cpu-without", value_name = "FEATURE")]
    cpu_without: Vec<String>,
}

impl HostConfig {
    /// The file's settings (if any), overridden by the flags, checked.
    pub fn load(a: &HostArgs) -> Result<HostConfig> {
        let mut c = match &a.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading host settings {}", p.display()))?;
                toml::from_str::<HostConfig>(&text)
                    .with_context(|| format!("host settings {}", p.display()))?
            }
            None => HostConfig::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => {$(if let Some(v) = &a.$f { c.$f = v.clone(); })*};
        }
        over!(
            dir,
            max_incoming,
            max_outgoing,
            queue_timeout_secs,
            transport,
            compress
        );
        if a.channels.is_some() {
            c.channels = a.channels;
        }
        over!(
            backend,
            hugepages,
            migration_bandwidth_mbps,
            host_bandwidth_mbps
        );
        for (field, v) in [
            (&mut c.key_file, &a.key_file),
            (&mut c.cert, &a.cert),
            (&mut c.cert_key, &a.cert_key),
            (&mut c.ca, &a.ca),
        ] {
            if v.is_some() {
                *field = v.clone();
            }
        }
        if !a.listen.is_empty() {
            c.listen = a.listen.clone();
        }
        if !a.allow.is_empty() {
            c.allow = a.allow.clone();
        }
        if !a.cpu_without.is_empty() {
            c.cpu_without = a.cpu_without.clone();
        }
        c.no_auth |= a.no_auth;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        if self.listen.is_empty() {
            bail!("no migration network: give at least one listen address");
        }
        for l in &self.listen {
            l.parse::<SocketAddr>()
                .with_context(|| format!("listen address {l:?} (IP:PORT)"))?;
        }
        for s in &self.allow {
            Subnet::parse(s)?;
        }
        if self.max_incoming == 0 || self.max_outgoing == 0 {
            bail!("max_incoming and max_outgoing must be at least 1");
        }
        if let Some(n) = self
            .channels
            .filter(|&n| n == 0 || n > livemig_engine::defaults::MAX_CHANNELS)
        {
            bail!(
                "channels {n} (1..={})",
                livemig_engine::defaults::MAX_CHANNELS
            );
        }
        for f in &self.cpu_without {
            Feature::parse(f).map_err(anyhow::Error::msg)?;
        }
        let auths = usize::from(self.key_file.is_some())
            + usize::from(self.cert.is_some())
            + usize::from(self.no_auth);
        if auths != 1 {
            bail!("name exactly one way to authenticate sources: key_file, cert (with cert_key and ca), or no_auth");
        }
        if self.cert.is_some() && (self.cert_key.is_none() || self.ca.is_none()) {
            bail!("cert needs cert_key and ca");
        }
        Ok(())
    }

    /// The `receive` options of an incoming VM process, after its listen address.
    fn receive_args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--backend".into(),
            self.backend.to_string(),
            "--hugepages".into(),
            self.hugepages.to_string(),
            "--timeout-secs".into(),
            livemig_engine::defaults::TIMEOUT.as_secs().to_string(),
        ];
        for f in &self.cpu_without {
            v.extend(["--cpu-without".into(), f.clone()]);
        }
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        if self.no_auth {
            v.push("--no-auth".into());
        } else if let Some(k) = path(&self.key_file) {
            v.extend(["--key-file".into(), k]);
        } else if let (Some(c), Some(k), Some(ca)) =
            (path(&self.cert), path(&self.cert_key), path(&self.ca))
        {
            v.extend(["--cert".into(), c, "--key".into(), k, "--ca".into(), ca]);
        }
        v
    }
}

/// An allowed subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Subnet {
    net: IpAddr,
    prefix: u32,
}

impl Subnet {
    fn parse(s: &str) -> Result<Subnet> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .parse()
            .with_context(|| format!("subnet {s:?}: {ip:?} is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= max)
                .with_context(|| format!("subnet {s:?}: prefix length 0..={max}"))?,
            None => max,
        };
        Ok(Subnet { net, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u32) {
            match ip.to_canonical() {
                IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
                IpAddr::V6(a) => (u128::from(a), 128),
            }
        };
        let ((n, nw), (a, aw)) = (bits(self.net), bits(ip));
        if nw != aw {
            return false;
        }
        let shift = nw - self.prefix;
        shift >= nw || (n >> shift) == (a >> shift)
    }
}

/// The host a VM process belongs to: the directory of its control socket, when a host agent
/// set it up.
#[derive(Debug, Clone)]
pub struct HostDir {
    dir: PathBuf,
    settings: HostConfig,
    /// The VM's name there (its socket's file stem).
    pub vm: String,
}

/// Which of the host's limits a migration counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Migrations to this host.
    Incoming,
    /// Migrations from this host.
    Outgoing,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Incoming => "incoming",
            Direction::Outgoing => "outgoing",
        }
    }
}

impl HostDir {
    /// The host of the VM whose control socket is `socket` (None: not under a host agent).
    pub fn of_socket(socket: &Path) -> Option<HostDir> {
        let dir = socket.parent()?;
        let text = std::fs::read_to_string(dir.join(SETTINGS)).ok()?;
        let settings = serde_json::from_str(&text).ok()?;
        Some(HostDir {
            dir: dir.to_path_buf(),
            settings,
            vm: socket.file_stem()?.to_string_lossy().into_owned(),
        })
    }

    /// The host's settings.
    pub fn settings(&self) -> &HostConfig {
        &self.settings
    }

    /// Takes one of the host's `d` slots for this VM, waiting while none is free — until
    /// `deadline`, or until `cancelled` says so; the error says why it gave up.
    pub fn acquire(
        &self,
        d: Direction,
        deadline: Option<Instant>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Slot, String> {
        let max = match d {
            Direction::Incoming => self.settings.max_incoming,
            Direction::Outgoing => self.settings.max_outgoing,
        };
        let slots = self.dir.join("slots");
        std::fs::create_dir_all(&slots).map_err(|e| format!("{}: {e}", slots.display()))?;
        let t0 = Instant::now();
        let mut queued = false;
        loop {
            for i in 0..max {
                let path = slots.join(format!("{}-{i}.lock", d.name()));
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                // SAFETY: flock on a descriptor this function owns; no memory is passed.
                let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if r == 0 {
                    event(
                        &self.dir,
                        &format!("{}-started", d.name()),
                        &self.vm,
                        json!({"slot": i, "waited_ms": t0.elapsed().as_millis() as u64}),
                    );
                    return Ok(Slot {
                        file: Some(file),
                        dir: self.dir.clone(),
                        vm: self.vm.clone(),
                        direction: d,
                    });
                }
            }
            if !queued {
                queued = true;
                event(
                    &self.dir,
                    &format!("{}-queued", d.name()),
                    &self.vm,
                    json!({"limit": max}),
                );
            }
            if cancelled() {
                event(
                    &self.dir,
                    &format!("{}-cancelled", d.name()),
                    &self.vm,
                    json!({}),
                );
                return Err("cancelled while queued for a migration slot".into());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let waited = t0.elapsed().as_secs();
                event(
                    &self.dir,
                    &format!("{}-refused", d.name()),
                    &self.vm,
                    json!({"limit": max, "waited_s": waited}),
                );
                return Err(format!(
                    "this host runs its limit of {max} {} migrations at once and none ended \
                     within {waited} s: try again later (or raise max_{} on this host)",
                    d.name(),
                    d.name()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl HostDir {
    /// Outgoing migrations in flight on this host now: slots held (this one's included).
    fn outgoing_in_flight(&self) -> u64 {
        (0..self.settings.max_outgoing)
            .filter(|i| {
                let path = self.dir.join(format!("slots/outgoing-{i}.lock"));
                let Ok(f) = File::open(&path) else {
                    return false;
                };
                // SAFETY: flock on a descriptor owned by `f`, closed (and so unlocked) when
                // it drops at the end of this closure.
                unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
            })
            .count() as u64
    }

    /// Whether the host caps its outgoing migrations' bandwidth.
    pub fn caps_bandwidth(&self) -> bool {
        self.settings.host_bandwidth_mbps > 0 || self.settings.migration_bandwidth_mbps > 0
    }

    /// The cap of one outgoing migration now, bytes/s (0: none): the lowest of its own
    /// (`requested`), the host's per-migration cap and its share of the host's cap.
    pub fn outgoing_cap(&self, requested: u64) -> u64 {
        let s = &self.settings;
        let share = (s.host_bandwidth_mbps > 0)
            .then(|| s.host_bandwidth_mbps * 1_000_000 / self.outgoing_in_flight().max(1));
        [
            Some(requested),
            Some(s.migration_bandwidth_mbps * 1_000_000),
            share,
        ]
        .into_iter()
        .flatten()
        .filter(|&c| c > 0)
        .min()
        .unwrap_or(0)
    }
}

/// Keeps an outgoing migration's cap at its share of the host's bandwidth while it runs.
pub struct BandwidthShare {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BandwidthShare {
    /// Sets `cell` now and every 200 ms until dropped.
    pub fn start(host: HostDir, cell: Arc<AtomicU64>, requested: u64) -> BandwidthShare {
        cell.store(host.outgoing_cap(requested), Ordering::Relaxed);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("livemig-share".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    cell.store(host.outgoing_cap(requested), Ordering::Relaxed);
                }
            })
            .ok();
        BandwidthShare { stop, thread }
    }
}

impl Drop for BandwidthShare {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One of the host's migration slots, held until dropped (or the process ends).
#[derive(Debug)]
pub struct Slot {
    file: Option<File>,
    dir: PathBuf,
    vm: String,
    direction: Direction,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Logged while the slot is still held: the log never shows more in flight than the
        // limit.
        event(
            &self.dir,
            &format!("{}-finished", self.direction.name()),
            &self.vm,
            json!({}),
        );
        drop(self.file.take());
    }
}

/// Appends one event to the host's log (best effort: a log that cannot be written never stops
/// a migration).
fn event(dir: &Path, what: &str, vm: &str, extra: Value) {
    let mut line = json!({
        "t_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "event": what,
        "vm": vm,
        "pid": std::process::id(),
    });
    if let (Some(l), Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
    let text = format!("{line}\n");
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(EVENTS))
    {
        // One write per line: appends from several processes never interleave within it.
        let _ = f.write_all(text.as_bytes());
    }
}

/// `livemig host`: runs the agent until it is killed.
pub fn run(a: &HostArgs) -> Result<()> {
    let c = HostConfig::load(a)?;
    std::fs::create_dir_all(&c.dir).with_context(|| format!("creating {}", c.dir.display()))?;
    std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", c.dir.display()))?;
    let allow: Vec<Subnet> = c
        .allow
        .iter()
        .map(|s| Subnet::parse(s))
        .collect::<Result<_>>()?;
    let mut listeners = Vec::new();
    for l in &c.listen {
        let listener = TcpListener::bind(l).with_context(|| format!("listening on {l}"))?;
        listeners.push(listener);
    }
    std::fs::write(c.dir.join(SETTINGS), serde_json::to_string_pretty(&c)?)
        .with_context(|| format!("writing {}", c.dir.join(SETTINGS).display()))?;
    let bound: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    event(&c.dir, "agent-started", "", json!({"listen": bound}));
    for b in &bound {
        println!("livemig: host agent listening on {b}");
    }
    println!(
        "livemig: host agent for {} (at most {} incoming and {} outgoing migrations at once)",
        c.dir.display(),
        c.max_incoming,
        c.max_outgoing
    );
    let _ = std::io::stdout().flush();
    let c = Arc::new(c);
    let allow = Arc::new(allow);
    let count = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for listener in listeners {
        let (c, allow, count) = (c.clone(), allow.clone(), count.clone());
        threads.push(std::thread::spawn(move || {
            accept_loop(&listener, &c, &allow, &count)
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, c: &Arc<HostConfig>, allow: &[Subnet], count: &AtomicU64) {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accepting a migration connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        if !allow.is_empty() && !allow.iter().any(|s| s.contains(peer.ip())) {
            tracing::warn!(%peer, "refused a migration connection from outside the allowed subnets");
            event(
                &c.dir,
                "connection-refused",
                "",
                json!({"peer": peer.to_string(), "reason": "not in an allowed subnet"}),
            );
            continue;
        }
        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!("in-{secs}-{n}");
        match start_incoming(c, &name, stream) {
            Ok(mut child) => {
                event(
                    &c.dir,
                    "vm-started",
                    &name,
                    json!({"peer": peer.to_string(), "pid": child.id()}),
                );
                let dir = c.dir.clone();
                std::thread::spawn(move || {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    event(&dir, "vm-exited", &name, json!({"status": status}));
                });
            }
            Err(e) => {
                tracing::error!(%peer, "starting a VM process: {e:#}");
                event(
                    &c.dir,
                    "connection-refused",
                    &name,
                    json!({"peer": peer.to_string(), "reason": format!("{e:#}")}),
                );
            }
        }
    }
}

/// Starts `livemig receive` for the migration on `stream`, handed over as descriptor 3; its
/// data connections come to a port of its own on the same address.
fn start_incoming(c: &HostConfig, name: &str, stream: TcpStream) -> Result<std::process::Child> {
    let local = stream.local_addr()?;
    let exe = std::env::current_exe().context("finding the livemig executable")?;
    let log = File::create(c.dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("receive")
        .arg("--listen")
        .arg(SocketAddr::new(local.ip(), 0).to_string())
        .arg("--control-fd")
        .arg("3")
        .arg("--socket")
        .arg(c.dir.join(format!("{name}.sock")))
        .args(c.receive_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let fd = stream.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 and fcntl on a
    // descriptor that is open in the parent (kept open by `stream` until spawn returns).
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting livemig receive")?;
    drop(stream);
    Ok(child)
}

/// `livemig vm`.
#[derive(Args, Debug)]
pub struct VmCmd {
    #[command(subcommand)]
    what: VmWhat,
}

#[derive(clap::Subcommand, Debug)]
enum VmWhat {
    /// Every VM of the host (each control socket in its directory) with its phase.
    List {
        /// The host's directory [default: $LIVEMIG_HOST_DIR or /run/livemig].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The host directory: `dir`, else $LIVEMIG_HOST_DIR, else /run/livemig.
pub fn host_dir(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("LIVEMIG_HOST_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// `livemig vm list`.
pub fn vm(cmd: &VmCmd) -> Result<()> {
    let VmWhat::List { dir, json } = &cmd.what;
    let dir = host_dir(dir.as_deref());
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading host directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    names.sort();
    let rows: Vec<Value> = names
        .iter()
        .filter_map(|p| {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            let row = match control::request_timeout(p, &Request::Status, Duration::from_secs(2)) {
                Ok(s) => json!({
                    "vm": name,
                    "phase": s.get("phase").cloned().unwrap_or(Value::Null),
                    "run_state": s.get("run_state").cloned().unwrap_or(Value::Null),
                    "memory_mib": s.get("memory_mib").cloned().unwrap_or(Value::Null),
                    "vcpus": s.get("vcpus").cloned().unwrap_or(Value::Null),
                }),
                // Gone since the directory was read: its process ended (a VM stopped, or an
                // incoming migration failed).
                Err(control::ControlError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return None
                }
                Err(e) => json!({
                    "vm": name,
                    "phase": "not answering",
                    "error": format!("{:#}", anyhow::Error::new(e)),
                }),
            };
            Some(row)
        })
        .collect();
    if *json {
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<24} {:<16} {:<10} {:>8} {:>6}",
        "VM", "PHASE", "STATE", "MiB", "vCPUs"
    );
    for r in &rows {
        let s = |k: &str| match &r[k] {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            v => v.to_string(),
        };
        println!(
            "{:<24} {:<16} {:<10} {:>8} {:>6}",
            s("vm"),
            s("phase"),
            s("run_state"),
            s("memory_mib"),
            s("vcpus")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_match_by_prefix_and_refuse_nonsense() {
        let s = Subnet::parse("10.1.2.0/24").unwrap();
        assert!(s.contains("10.1.2.77".parse().unwrap()));
        assert!(!s.contains("10.1.3.1".parse().unwrap()));
        assert!(s.contains("::ffff:10.1.2.9".parse().unwrap()), "v4-mapped");
        assert!(!s.contains("fd00::1".parse().unwrap()));
        let one = Subnet::parse("192.168.0.5").unwrap();
        assert!(one.contains("192.168.0.5".parse().unwrap()));
        assert!(!one.contains("192.168.0.6".parse().unwrap()));
        let any = Subnet::parse("0.0.0.0/0").unwrap();
        assert!(any.contains("8.8.8.8".parse().unwrap()));
        let v6 = Subnet::parse("fd00:1::/32").unwrap();
        assert!(v6.contains("fd00:1:ffff::3".parse().unwrap()));
        assert!(!v6.contains("fd00:2::3".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/24",
            "nope",
            "fd00::/129",
            "10.0.0.0/x",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_config_file_takes_every_field_and_flags_override_it() {
        let dir = std::env::temp_dir().join(format!("livemig-hostcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("host.toml");
        std::fs::write(
            &file,
            r#"
dir = "/srv/vms"
listen = ["10.0.0.5:7000", "10.0.1.5:7000"]
allow = ["10.0.0.0/24"]
max_incoming = 3
max_outgoing = 1
queue_timeout_secs = 10
transport = "auto"
compress = "zstd"
channels = 8
key_file = "/etc/livemig/key"
backend = "memory"
hugepages = "2M"
cpu_without = ["avx2"]
"#,
        )
        .unwrap();
        let a = HostArgs {
            config: Some(file.clone()),
            max_outgoing: Some(2),
            ..HostArgs::default()
        };
        let c = HostConfig::load(&a).unwrap();
        assert_eq!(c.dir, PathBuf::from("/srv/vms"));
        assert_eq!(c.listen.len(), 2);
        assert_eq!((c.max_incoming, c.max_outgoing), (3, 2));
        assert_eq!(c.transport, TransportChoice::Auto);
        assert_eq!(c.channels, Some(8));
        assert_eq!(c.hugepages, Backing::Huge2M);
        assert_eq!(c.cpu_without, vec!["avx2".to_string()]);
        // Unknown fields, bad values and no way to authenticate are clear errors.
        for (text, needle) in [
            ("max_incomming = 3\nno_auth = true", "unknown field"),
            ("max_incoming = 0\nno_auth = true", "at least 1"),
            ("allow = [\"10.0.0.0/99\"]\nno_auth = true", "prefix length"),
            ("listen = [\"nowhere\"]\nno_auth = true", "listen address"),
            (
                "cpu_without = [\"warp\"]\nno_auth = true",
                "unknown CPU feature",
            ),
            ("channels = 2", "authenticate"),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = format!(
                "{:#}",
                HostConfig::load(&HostArgs {
                    config: Some(file.clone()),
                    ..HostArgs::default()
                })
                .unwrap_err()
            );
            assert!(err.contains(needle), "{text}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
