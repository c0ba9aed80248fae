//! The command line of Linux VMs: what `run-vm --kernel` boots (disks, NICs, console), what a
//! destination maps a source's devices to (`receive --tap`, `--disk-path`), and `livemig
//! console`.

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use livemig_engine::control::{self, Request};
use livemig_engine::devices::disk_writer::DiskWriterSpec;
use livemig_engine::devices::virtio::net::parse_mac;
use livemig_engine::vm::kvm::{ConsoleSpec, DiskSpec, HostResources, LinuxSpec, NetSpec};
use livemig_engine::vm::Pattern;

/// Where a VM's console goes on this host.
#[derive(Args, Debug, Clone, Default)]
pub struct ConsoleArgs {
    /// Append the guest's console output (COM1) to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Also print the guest's console output on stdout.
    #[arg(long)]
    pub console_stdout: bool,
}

impl ConsoleArgs {
    fn spec(&self) -> ConsoleSpec {
        ConsoleSpec {
            log: self.console_log.clone(),
            stdout: self.console_stdout,
        }
    }
}

/// A Linux VM (`run-vm --kernel ...`).
#[derive(Args, Debug, Clone, Default)]
pub struct LinuxArgs {
    /// Boot this Linux kernel — an uncompressed vmlinux (PVH entry) or a bzImage — instead of
    /// the built-in test guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (after livemig's own `console=ttyS0 pci=off reboot=acpi`).
    #[arg(long, default_value = "", requires = "kernel")]
    pub cmdline: String,
    /// A virtual disk: PATH of a raw image (or a host block device), or
    /// path=PATH[,readonly=on]; repeatable (disk0, disk1, ...). The built-in guest takes one
    /// disk, which the VMM writes (see --disk-write-rate).
    #[arg(long = "disk", value_name = "DISK")]
    pub disks: Vec<String>,
    /// Built-in guest: the VMM writes its disk at this rate, MB/s (0: idle).
    #[arg(
        long,
        default_value_t = 0.0,
        requires = "disks",
        conflicts_with = "kernel"
    )]
    pub disk_write_rate: f64,
    /// Built-in guest: where the disk writes go (64 KiB each).
    #[arg(long, default_value_t = Pattern::Random, value_parser = crate::one_of::<Pattern>(Pattern::NAMES), requires = "disks", conflicts_with = "kernel")]
    pub disk_write_pattern: Pattern,
    /// Built-in guest: the region written, MiB from the start of the disk (0: all of it).
    #[arg(
        long,
        default_value_t = 0,
        requires = "disks",
        conflicts_with = "kernel"
    )]
    pub disk_write_span: u64,
    /// A network adapter on an existing tap device: TAP, or tap=TAP[,mac=MAC]; repeatable
    /// (net0, net1, ...).
    #[arg(long = "net", value_name = "NIC", requires = "kernel")]
    pub nets: Vec<String>,
    /// Give the guest a virtio-rng entropy device.
    #[arg(long, requires = "kernel")]
    pub rng: bool,
    #[command(flatten)]
    pub console: ConsoleArgs,
}

/// `key=value,key=value` (or a bare first value for `first_key`).
fn options<'a>(s: &'a str, first_key: &'a str) -> Result<Vec<(&'a str, &'a str)>> {
    s.split(',')
        .enumerate()
        .map(|(i, part)| match part.split_once('=') {
            Some((k, v)) => Ok((k, v)),
            None if i == 0 => Ok((first_key, part)),
            None => bail!("{s:?}: {part:?} is not key=value"),
        })
        .collect()
}

impl LinuxArgs {
    /// The built-in guest's disk, if `--disk` was given without `--kernel`.
    pub fn builtin_disk(&self) -> Result<Option<DiskWriterSpec>> {
        if self.kernel.is_some() {
            return Ok(None);
        }
        match self.disks.as_slice() {
            [] => Ok(None),
            [d] => {
                let mut path = None;
                for (k, v) in options(d, "path")? {
                    match (k, v) {
                        ("path", p) => path = Some(PathBuf::from(p)),
                        _ => bail!(
                            "--disk {d:?}: the built-in guest's disk is written by the VMM:                              path=PATH only"
                        ),
                    }
                }
                Ok(Some(DiskWriterSpec {
                    path: path.with_context(|| format!("--disk {d:?}: no path"))?,
                    rate_mb_s: self.disk_write_rate,
                    pattern: self.disk_write_pattern,
                    span_mib: self.disk_write_span,
                }))
            }
            _ => bail!("the built-in guest takes one --disk (a Linux VM, --kernel, takes several)"),
        }
    }

    /// The spec of the Linux VM to boot, if `--kernel` was given.
    pub fn spec(&self, memory_mib: u64, vcpus: u32) -> Result<Option<LinuxSpec>> {
        let Some(kernel) = &self.kernel else {
            return Ok(None);
        };
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let mut path = None;
            let mut read_only = false;
            for (k, v) in options(d, "path")? {
                match (k, v) {
                    ("path", p) => path = Some(PathBuf::from(p)),
                    ("readonly", "on" | "true") => read_only = true,
                    ("readonly", "off" | "false") => read_only = false,
                    _ => bail!("--disk {d:?}: unknown option {k}={v} (path=PATH,readonly=on|off)"),
                }
            }
            disks.push(DiskSpec {
                id: format!("disk{i}"),
                path: path.with_context(|| format!("--disk {d:?}: no path"))?,
                read_only,
            });
        }
        let mut nets = Vec::new();
        for (i, n) in self.nets.iter().enumerate() {
            let mut tap = None;
            let mut mac = None;
            for (k, v) in options(n, "tap")? {
                match k {
                    "tap" => tap = Some(v.to_string()),
                    "mac" => mac = Some(parse_mac(v).map_err(anyhow::Error::msg)?),
                    _ => bail!("--net {n:?}: unknown option {k} (tap=TAP,mac=MAC)"),
                }
            }
            nets.push(NetSpec {
                id: format!("net{i}"),
                tap: tap.with_context(|| format!("--net {n:?}: no tap"))?,
                mac: mac.unwrap_or_else(|| random_mac(i)),
            });
        }
        Ok(Some(LinuxSpec {
            memory_mib,
            vcpus,
            kernel: kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            disks,
            nets,
            rng: self.rng,
            console: self.console.spec(),
        }))
    }
}

/// A locally administered unicast MAC address (52:54:00 and three random bytes).
fn random_mac(index: usize) -> [u8; 6] {
    let r = livemig_engine::session::random_u64().to_le_bytes();
    [0x52, 0x54, 0x00, r[0], r[1], r[2].wrapping_add(index as u8)]
}

/// How a destination maps the source's devices (`receive`).
#[derive(Args, Debug, Clone, Default)]
pub struct HostArgs {
    /// The tap of a migrated VM's adapter on this host: ID=TAP (e.g. net0=tap-b); default:
    /// the source's tap name. Repeatable.
    #[arg(long = "tap", value_name = "ID=TAP")]
    pub taps: Vec<String>,
    /// The image of a migrated VM's disk on this host: ID=PATH (e.g. disk0=/srv/a.img);
    /// default: the source's path (shared storage). Repeatable.
    #[arg(long = "disk-path", value_name = "ID=PATH")]
    pub disk_paths: Vec<String>,
    #[command(flatten)]
    pub console: ConsoleArgs,
}

impl HostArgs {
    /// This host's resources for incoming VMs.
    pub fn resources(&self) -> Result<HostResources> {
        let pair = |s: &str, what: &str| -> Result<(String, String)> {
            let (a, b) = s
                .split_once('=')
                .with_context(|| format!("--{what} {s:?}: expected ID=VALUE"))?;
            Ok((a.to_string(), b.to_string()))
        };
        Ok(HostResources {
            taps: self
                .taps
                .iter()
                .map(|t| pair(t, "tap"))
                .collect::<Result<_>>()?,
            disks: self
                .disk_paths
                .iter()
                .map(|d| pair(d, "disk-path").map(|(a, b)| (a, PathBuf::from(b))))
                .collect::<Result<_>>()?,
            console: self.console.spec(),
        })
    }
}

/// `livemig console`.
#[derive(Args, Debug)]
pub struct ConsoleCmd {
    /// The VM's control socket.
    #[arg(long)]
    vm: PathBuf,
    /// Type this text on the guest's console (a newline is added) and exit, instead of
    /// attaching.
    #[arg(long)]
    send: Option<String>,
}

/// `livemig console`: attaches to the guest's console (output so far, then live; stdin goes
/// to the guest), or sends one line.
pub fn console(a: &ConsoleCmd) -> Result<()> {
    if let Some(text) = &a.send {
        control::request(
            &a.vm,
            &Request::ConsoleInput {
                text: format!("{text}\n"),
            },
        )?;
        return Ok(());
    }
    attach(&a.vm)
}

fn attach(socket: &Path) -> Result<()> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to VM control socket {}", socket.display()))?;
    writeln!(s, "{}", serde_json::to_string(&Request::Console)?)?;
    // Lines typed here go to the guest, one request each.
    let sock = socket.to_path_buf();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            let _ = control::request(
                &sock,
                &Request::ConsoleInput {
                    text: format!("{line}\n"),
                },
            );
        }
    });
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
}
