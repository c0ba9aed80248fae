//! `livemig`: live-migrate running KVM virtual machines between hosts.
//!
//! The CLI is a thin layer over `livemig-engine`: it runs VM processes with a JSON control
//! socket, receives migrations, drives them and shows their progress.

mod bench;
mod client;
mod cpu_cli;
mod demo;
mod host;
mod linux_cli;
mod rdma_cli;
mod vm_process;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use livemig_engine::announce::AnnounceSettings;
use livemig_engine::auth::Key;
use livemig_engine::control::Request;
use livemig_engine::memory::Backing;
use livemig_engine::vm::{Backend, Fill, Pattern, VmSpec, Workload};

/// Live-migrate running KVM virtual machines between hosts.
#[derive(Parser, Debug)]
#[command(name = "livemig", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run everything on this machine: a VM, a destination, a migration, a summary.
    Demo(demo::DemoArgs),
    /// Run a VM with a JSON control socket (the migration source).
    RunVm(RunVmArgs),
    /// Wait for one incoming migration, then run the migrated VM.
    Receive(ReceiveArgs),
    /// The processor a VM started here is given (vendor, model, features), under a CPU model.
    Cpu(cpu_cli::CpuCmd),
    /// The host agent: takes incoming migrations on the host's migration networks (a VM
    /// process for each), and holds the host's limits of simultaneous migrations.
    Host(host::HostArgs),
    /// The VMs of a host (`livemig vm list`).
    Vm(host::VmCmd),
    /// RDMA devices of this host (`livemig rdma devices`).
    Rdma(rdma_cli::RdmaArgs),
    /// Migrate the VM behind a control socket to a destination.
    Migrate(client::MigrateArgs),
    /// Show a VM's state and its last migration.
    Status(SocketArg),
    /// Attach to a VM's console (or type one line on it with --send).
    Console(linux_cli::ConsoleCmd),
    /// Cancel the migration a VM is running (the VM keeps running on the source).
    Cancel(SocketArg),
    /// Announce a VM's NICs on their networks again (RARP from each MAC, and the guest asked
    /// to announce itself), as after a migration.
    Announce(SocketArg),
    /// Stop a VM process.
    Stop(SocketArg),
    /// Make a throwaway CA and a certificate and key per host (for trials and tests; an
    /// operator's own CA is the real thing): DIR/ca.pem, DIR/HOST.pem, DIR/HOST-key.pem.
    MakeCerts(MakeCertsArgs),
    /// Settle a migration left in "outcome unknown" (Commit sent, no answer): with the
    /// destination's record of its decision, the VM resumes here if the destination discarded
    /// its copy, or stops here if the destination resumed it.
    Resolve(ResolveArgs),
    /// Benchmark matrix: livemig vs QEMU vs the physical limits, tables and plots.
    Bench(bench::BenchArgs),
    /// Raw TCP throughput between two hosts (a helper of `bench`).
    #[command(hide = true)]
    BenchLink(bench::LinkArgs),
    /// What a client of a VM sees during a migration: ping gaps and a TCP stream (a helper of
    /// the Linux-guest tests).
    #[command(hide = true)]
    BenchBlackout(bench::BlackoutArgs),
}

/// A clap parser accepting exactly `names`, each parsed into a `T` of the engine's
/// vocabulary (the help lists the names).
fn one_of<T>(names: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static,
{
    clap::builder::PossibleValuesParser::new(names).try_map(|s| s.parse::<T>())
}

#[derive(Args, Debug, Clone)]
struct VmArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// RAM content written before the guest starts (mixed: a third each of zero, text-like
    /// and random 64 KiB blocks).
    #[arg(long, default_value_t = Fill::Random, value_parser = one_of::<Fill>(Fill::NAMES))]
    fill: Fill,
    /// Working set the guest writes into, in MiB.
    #[arg(long, default_value_t = 64)]
    working_set: u64,
    /// Pages the guest writes per second (0 = idle).
    #[arg(long, default_value_t = 0)]
    dirty_rate: u64,
    /// Order in which the guest writes its working set.
    #[arg(long, default_value_t = Pattern::Sequential, value_parser = one_of::<Pattern>(Pattern::NAMES))]
    pattern: Pattern,
    /// VMM backend: the built-in KVM mini VMM (needs /dev/kvm), or RAM plus a host writer
    /// thread without vCPUs (for hosts without KVM).
    #[arg(long, default_value_t = Backend::Kvm, value_parser = one_of::<Backend>(Backend::NAMES))]
    backend: Backend,
}

impl VmArgs {
    fn spec(&self) -> VmSpec {
        VmSpec {
            memory_mib: self.memory,
            vcpus: self.vcpus,
            fill: self.fill,
            workload: Workload {
                working_set_mib: self.working_set,
                dirty_rate: self.dirty_rate,
                pattern: self.pattern,
            },
        }
    }
}

#[derive(Args, Debug)]
struct RunVmArgs {
    /// Path of the JSON control socket to create.
    #[arg(long)]
    socket: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    linux: linux_cli::LinuxArgs,
    #[command(flatten)]
    auth: AuthArgs,
    /// Fault in all guest RAM once the VM runs, zero pages included, as if the guest had
    /// written every page: there are then no never-used holes for a migration to skip, and
    /// it reads every page (as QEMU reads a RAM file written in full; the benchmark's
    /// "written" cells).
    #[arg(long)]
    populate_ram: bool,
    /// Back guest RAM with 4K pages, or with 2M or 1G huge pages from the kernel's hugetlb
    /// pool (reserved when the VM starts; a short pool is a clear error).
    #[arg(long, default_value_t = Backing::Normal, value_parser = one_of::<Backing>(Backing::NAMES))]
    hugepages: Backing,
    #[command(flatten)]
    cpu: cpu_cli::CpuArgs,
}

/// The pre-shared key of the migration control channel.
#[derive(Args, Debug, Clone)]
struct AuthArgs {
    /// File holding the pre-shared key: at least 32 random bytes as hex (`openssl rand -hex
    /// 32`), readable by its owner only; or set LIVEMIG_KEY to the key.
    #[arg(long, env = "LIVEMIG_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Migrate without authentication (trusted networks only; the peer must agree).
    #[arg(long, conflicts_with = "key_file")]
    no_auth: bool,
    /// Encrypt and authenticate everything after the handshake — control messages and TCP
    /// data channels — with AES-256-GCM keys derived from the pre-shared key: `on` (the
    /// default with a key) or `off` (guest RAM, device state and disk blocks travel in clear:
    /// trusted links only). Both sides must agree. RDMA writes are never encrypted.
    #[arg(long, env = "LIVEMIG_ENCRYPT", value_parser = ["on", "off"])]
    encrypt: Option<String>,
    /// Certificates instead of a pre-shared key: this host's certificate (PEM), signed by
    /// the CA of --ca; each session is keyed by a mutual TLS 1.3 handshake (always
    /// encrypted). `livemig make-certs` makes a throwaway CA and certificates.
    #[arg(long, requires_all = ["key", "ca"], conflicts_with_all = ["key_file", "no_auth"])]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The CA (PEM) whose certificates this host accepts from peers.
    #[arg(long, requires = "cert")]
    ca: Option<PathBuf>,
}

impl AuthArgs {
    fn load(&self) -> Result<Option<Key>> {
        if let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) {
            if std::env::var_os("LIVEMIG_KEY").is_some() {
                anyhow::bail!(
                    "--cert, yet LIVEMIG_KEY holds a pre-shared key: unset it to use \
                     certificates, or drop --cert"
                );
            }
            if self.encrypt.as_deref() == Some("off") {
                anyhow::bail!(
                    "sessions keyed by certificates are always encrypted: drop --encrypt off"
                );
            }
            let id = livemig_engine::tls::TlsIdentity::load(cert, key, ca)?;
            return Ok(Some(Key::certificates(id)));
        }
        let key = self.load_key()?;
        match (self.encrypt.as_deref(), key) {
            (Some("on"), None) => anyhow::bail!(
                "--encrypt on needs the pre-shared key (--key-file or LIVEMIG_KEY) it derives its \
                 keys from; drop --no-auth"
            ),
            (Some("off"), Some(k)) => {
                tracing::warn!(
                    "--encrypt off: guest RAM, device state and disk blocks travel in clear \
                     (authenticated handshake only); use it on trusted links only"
                );
                Ok(Some(k.unsealed()))
            }
            (_, key) => Ok(key),
        }
    }

    fn load_key(&self) -> Result<Option<Key>> {
        if self.no_auth {
            if std::env::var_os("LIVEMIG_KEY").is_some() {
                anyhow::bail!(
                    "--no-auth, yet LIVEMIG_KEY holds a key: unset it to migrate without \
                     authentication, or drop --no-auth"
                );
            }
            return Ok(None);
        }
        if let Some(path) = &self.key_file {
            return Ok(Some(Key::from_file(path)?));
        }
        match std::env::var("LIVEMIG_KEY") {
            Ok(k) => Ok(Some(Key::new(k.as_bytes())?)),
            Err(_) => anyhow::bail!(
                "no migration key: pass --key-file PATH or set LIVEMIG_KEY (the same key on both \
                 hosts), or --no-auth on a trusted network"
            ),
        }
    }
}

#[derive(Args, Debug)]
struct MakeCertsArgs {
    /// Folder to write into (created).
    #[arg(long)]
    out: PathBuf,
    /// A host's names, comma-separated (host names or IP addresses the peers use); the first
    /// names its files. Repeatable.
    #[arg(long, required = true)]
    host: Vec<String>,
}

/// `livemig make-certs`.
fn make_certs(a: &MakeCertsArgs) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let hosts: Vec<Vec<String>> = a
        .host
        .iter()
        .map(|h| h.split(',').map(|n| n.trim().to_string()).collect())
        .collect();
    let (ca, certs) = livemig_engine::tls::throwaway_ca(&hosts).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.out)?;
    let write = |name: String, text: &str, mode: u32| -> Result<()> {
        let path = a.out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        Ok(())
    };
    write("ca.pem".into(), &ca, 0o644)?;
    for (names, (cert, key)) in hosts.iter().zip(&certs) {
        write(format!("{}.pem", names[0]), cert, 0o644)?;
        write(format!("{}-key.pem", names[0]), key, 0o600)?;
    }
    println!("{}", a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
struct ResolveArgs {
    /// The VM's control socket.
    #[arg(long)]
    vm: PathBuf,
    /// The destination's record of its decision: the file ID.json in its --decisions folder,
    /// ID being the migration id the source's error names.
    #[arg(long)]
    record: PathBuf,
}

#[derive(Args, Debug)]
struct ReceiveArgs {
    /// Address to listen on for the source (host:port; port 0 picks one).
    #[arg(long)]
    listen: String,
    /// Control socket of the migrated VM (default: none).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Reserve and fault in this much RAM (MiB) before accepting, like QEMU's -mem-prealloc
    /// on an -incoming VM, and make the KVM VM and its memory slots on it; used when the
    /// incoming VM has exactly this size.
    #[arg(long)]
    reserve_mib: Option<u64>,
    /// Back incoming guest RAM with 4K pages, or with 2M or 1G huge pages from the kernel's
    /// hugetlb pool (whatever the source used).
    #[arg(long, default_value_t = Backing::Normal, value_parser = one_of::<Backing>(Backing::NAMES))]
    hugepages: Backing,
    #[command(flatten)]
    cpu_without: cpu_cli::CpuWithout,
    /// The source's control connection, already accepted, as this descriptor (set by the
    /// host agent, which starts this process for each incoming migration): the data
    /// connections come to --listen, whose port the source is told.
    #[arg(long, hide = true, value_name = "FD")]
    control_fd: Option<i32>,
    /// VMM backend for the incoming VM.
    #[arg(long, default_value_t = Backend::Kvm, value_parser = one_of::<Backend>(Backend::NAMES))]
    backend: Backend,
    /// Longest silence from the source before giving up on it, in seconds (handshake,
    /// pre-copy without pages, switchover).
    #[arg(long, default_value_t = livemig_engine::defaults::TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
    /// Refuse incoming VMs with more RAM than this (MiB; default: this host's memory).
    #[arg(long, default_value_t = 0)]
    max_memory_mib: u64,
    /// RDMA device to take RDMA migrations on; repeat it for several rails (each rail of the
    /// source lands on the one in its subnet). Default: the device with an address in the
    /// source's subnet, else the first active one; see `livemig rdma devices`.
    #[arg(long)]
    rdma_device: Vec<String>,
    /// Where copies of disks go (shared-nothing migrations) when the source names no
    /// directory (`migrate --storage copy --storage-dir`).
    #[arg(long)]
    storage_dir: Option<PathBuf>,
    /// Folder where the decision about each migration (resumed here, or discarded) is
    /// recorded durably, as ID.json, before it is acted on; `livemig resolve` on the source
    /// reads it when the source was left in "outcome unknown" (default: the folder of
    /// --socket, else TMPDIR/livemig-decisions).
    #[arg(long, value_name = "DIR")]
    decisions: Option<PathBuf>,
    /// After resume, announce every NIC this many times (a RARP from its MAC into its tap,
    /// and the guest asked to announce itself), with growing gaps.
    #[arg(long, default_value_t = AnnounceSettings::default().count)]
    announce_count: u32,
    /// How much each gap between announcements grows, ms (the first is 50 ms; QEMU's
    /// announce-self does the same).
    #[arg(long, default_value_t = AnnounceSettings::default().step_ms)]
    announce_step_ms: u64,
    /// Do not announce the VM's NICs after resume (switches learn the new port only when the
    /// guest next transmits).
    #[arg(long, conflicts_with_all = ["announce_count", "announce_step_ms"])]
    no_announce: bool,
    #[command(flatten)]
    host: linux_cli::HostArgs,
    /// Exit as soon as the VM runs here, stopping it (for tests and demos).
    #[arg(long)]
    exit_after_resume: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Args, Debug)]
struct SocketArg {
    /// The VM's control socket.
    #[arg(long)]
    vm: PathBuf,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVEMIG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: logs and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Err(e) = run(cli, &matches) {
        eprintln!("livemig: error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each said once: a cause whose text its parent already quotes
/// (most errors here name their cause in their own message) is left out.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        last = text;
    }
    out
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::RunVm(a) => vm_process::run_vm(&a, a.auth.load()?),
        Command::Receive(a) => vm_process::receive(&a),
        Command::Cpu(a) => cpu_cli::show(&a),
        Command::Host(a) => host::run(&a),
        Command::Vm(a) => host::vm(&a),
        Command::Rdma(a) => rdma_cli::run(&a),
        Command::Migrate(a) => {
            let given = |id: &str| {
                matches
                    .subcommand_matches("migrate")
                    .and_then(|m| m.value_source(id))
                    .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue)
            };
            client::migrate(&a, &given)
        }
        Command::Status(a) => client::simple(&a.vm, &Request::Status),
        Command::Console(a) => linux_cli::console(&a),
        Command::Cancel(a) => client::simple(&a.vm, &Request::Cancel),
        Command::Announce(a) => client::simple(&a.vm, &Request::Announce),
        Command::Stop(a) => client::simple(&a.vm, &Request::Stop),
        Command::Resolve(a) => client::resolve(&a.vm, &a.record),
        Command::MakeCerts(a) => make_certs(&a),
        Command::Bench(a) => bench::run(a),
        Command::BenchLink(a) => bench::link(a),
        Command::BenchBlackout(a) => bench::blackout(a),
    }
}

#[cfg(test)]
mod error_tests {
    #[test]
    fn a_cause_quoted_by_its_parent_is_said_once() {
        let e = anyhow::Error::new(std::io::Error::other("Config: 0 vCPUs (1..=256)"))
            .context("protocol error from 10.0.0.1:7000: Config: 0 vCPUs (1..=256)")
            .context("incoming migration failed");
        assert_eq!(
            super::error_chain(&e),
            "incoming migration failed: protocol error from 10.0.0.1:7000: Config: 0 vCPUs \
             (1..=256)"
        );
        let e = anyhow::Error::new(std::io::Error::other("disk full")).context("writing");
        assert_eq!(super::error_chain(&e), "writing: disk full");
    }
}
