//! `livemig bench`: a matrix of real migrations (transports, codecs, RAM content, dirty
//! rates, links) beside QEMU migrating the same RAM over the same link, and the physical
//! limits measured in the same run; CSV, JSON, a markdown table and plots in a results folder.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use livemig_engine::memory::{GuestRam, Populate, RamLayout};
use livemig_engine::vm::{guest, Fill};
use serde::Serialize;
use serde_json::{json, Value};

use crate::pair::{self, Pair, PairSpec};
use crate::Backend;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A small matrix (loopback and one shaped link, small RAM, one repetition): ~3 minutes.
    #[arg(long)]
    quick: bool,
    /// Results folder (default: results/bench-DATE-TIME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Repetitions per cell (default: 3, or 1 with --quick).
    #[arg(long)]
    repeat: Option<usize>,
    /// Leave QEMU out.
    #[arg(long)]
    no_qemu: bool,
    /// Redraw the table and plots of an earlier run's results folder instead of measuring.
    #[arg(long, value_name = "DIR")]
    redraw: Option<PathBuf>,
}

/// A link between the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Link {
    Loopback,
    #[serde(rename = "10gbit")]
    TenGbit,
    #[serde(rename = "1gbit")]
    OneGbit,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Loopback => "loopback",
            Link::TenGbit => "10gbit",
            Link::OneGbit => "1gbit",
        }
    }
}

/// What migrates the RAM.
#[derive(Debug, Clone, PartialEq)]
enum Variant {
    /// `reserve`: the destination reserves and faults in its RAM before the migration.
    Livemig {
        channels: u16,
        compress: &'static str,
        reserve: bool,
    },
    /// `prealloc`: the destination QEMU faults in its RAM at start (`prealloc=on`).
    Qemu {
        channels: u16,
        zstd: bool,
        prealloc: bool,
    },
}

impl Variant {
    fn label(&self) -> String {
        match self {
            Variant::Livemig {
                channels,
                compress,
                reserve,
            } => format!(
                "livemig tcp x{channels} {compress}{}",
                if *reserve { "" } else { " (no reserve)" }
            ),
            Variant::Qemu {
                channels: 1,
                zstd: false,
                prealloc,
            } => format!(
                "qemu single{}",
                if *prealloc { "" } else { " (no prealloc)" }
            ),
            Variant::Qemu {
                channels,
                zstd,
                prealloc,
            } => format!(
                "qemu multifd x{channels}{}{}",
                if *zstd { " zstd" } else { "" },
                if *prealloc { "" } else { " (no prealloc)" }
            ),
        }
    }
    fn system(&self) -> &'static str {
        match self {
            Variant::Livemig { .. } => "livemig",
            Variant::Qemu { .. } => "qemu",
        }
    }
}

#[derive(Debug, Clone)]
struct Cell {
    link: Link,
    fill: Fill,
    memory_mib: u64,
    dirty_rate: u64,
    variant: Variant,
}

/// One measured cell: the median and spread of its repetitions.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Row {
    system: String,
    variant: String,
    link: String,
    content: String,
    memory_mib: u64,
    dirty_rate: u64,
    repetitions: usize,
    total_ms_median: f64,
    total_ms_min: f64,
    total_ms_max: f64,
    downtime_ms_median: f64,
    bytes_on_wire_median: f64,
    throughput_gbps: f64,
    digest_match: Option<bool>,
    source_cpu_s: Option<f64>,
    destination_cpu_s: Option<f64>,
}

fn fill_name(f: Fill) -> &'static str {
    match f {
        Fill::Zero => "zero",
        Fill::Random => "random",
        Fill::Text => "text",
        Fill::Mixed => "mixed",
    }
}

fn matrix(quick: bool, qemu: bool) -> Vec<Cell> {
    let mut cells = Vec::new();
    let lm = |channels, compress| Variant::Livemig {
        channels,
        compress,
        reserve: true,
    };
    let q = |channels, zstd| Variant::Qemu {
        channels,
        zstd,
        prealloc: true,
    };
    let mut add = |link, fill, memory_mib, dirty_rate, variants: Vec<Variant>| {
        for v in variants {
            if matches!(v, Variant::Qemu { .. }) && !qemu {
                continue;
            }
            cells.push(Cell {
                link,
                fill,
                memory_mib,
                dirty_rate,
                variant: v,
            });
        }
    };
    let contents = [Fill::Zero, Fill::Random, Fill::Text, Fill::Mixed];
    if quick {
        for f in contents {
            add(
                Link::Loopback,
                f,
                256,
                0,
                vec![
                    lm(1, "none"),
                    lm(2, "none"),
                    lm(1, "auto"),
                    q(1, false),
                    q(2, true),
                ],
            );
        }
        add(
            Link::OneGbit,
            Fill::Text,
            128,
            0,
            vec![lm(1, "none"), lm(1, "auto"), q(1, false)],
        );
        for rate in [0, 20_000] {
            add(Link::Loopback, Fill::Random, 256, rate, vec![lm(1, "auto")]);
        }
        return cells;
    }
    // The headline: 2 GiB of random RAM, one stream each.
    add(
        Link::Loopback,
        Fill::Random,
        2048,
        0,
        vec![lm(1, "none"), q(1, false)],
    );
    for f in contents {
        add(
            Link::Loopback,
            f,
            1024,
            0,
            vec![
                lm(1, "none"),
                lm(2, "none"),
                lm(1, "auto"),
                lm(1, "lz4"),
                lm(1, "zstd"),
                q(1, false),
                q(2, false),
                q(2, true),
            ],
        );
    }
    for f in [Fill::Random, Fill::Text] {
        add(
            Link::TenGbit,
            f,
            512,
            0,
            vec![
                lm(1, "none"),
                lm(2, "none"),
                lm(2, "auto"),
                q(1, false),
                q(2, true),
            ],
        );
        add(
            Link::OneGbit,
            f,
            256,
            0,
            vec![
                lm(1, "none"),
                lm(1, "auto"),
                lm(1, "zstd"),
                q(1, false),
                q(2, true),
            ],
        );
    }
    for rate in [0, 10_000, 30_000, 60_000] {
        add(
            Link::Loopback,
            Fill::Random,
            512,
            rate,
            vec![lm(1, "auto"), lm(1, "delta")],
        );
    }
    cells
}

/// Two namespaces for a shaped link, made and removed by scripts/netns-link.sh.
struct Hosts {
    name: String,
    ns_a: String,
    ns_b: String,
    addr_b: String,
}

const NETNS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-link.sh");

impl Hosts {
    fn up(link: Link) -> Result<Hosts> {
        let name = format!(
            "lmb{}{}",
            std::process::id() % 10_000,
            if link == Link::TenGbit { "t" } else { "o" }
        );
        let out = Command::new(NETNS_SCRIPT)
            .args(["up", &name, link.name()])
            .output()
            .with_context(|| {
                format!(
                    "running {NETNS_SCRIPT} (shaped links need the repository's scripts and root)"
                )
            })?;
        if !out.status.success() {
            bail!(
                "netns-link.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
                .with_context(|| format!("netns-link.sh printed no {k}"))
        };
        Ok(Hosts {
            ns_a: field("NS_A")?,
            ns_b: field("NS_B")?,
            addr_b: field("B")?,
            name,
        })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new(NETNS_SCRIPT)
            .args(["down", &self.name])
            .output();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(dir) = &a.redraw {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("results.json"))?)
            .context("reading results.json")?;
        let rows: Vec<Row> =
            serde_json::from_value(v["rows"].clone()).context("results.json rows")?;
        let raw = v["runs"].as_array().cloned().unwrap_or_default();
        write_outputs(dir, &v["meta"], &rows, &raw)?;
        println!("{}", std::fs::read_to_string(dir.join("results.md"))?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the livemig binary")?;
    let stamp = chrono_stamp();
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("results/bench-{stamp}")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let work = std::env::temp_dir().join(format!("livemig-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let qemu = !a.no_qemu && which("qemu-system-x86_64");
    if !a.no_qemu && !qemu {
        eprintln!("livemig bench: qemu-system-x86_64 not found: QEMU rows left out (scripts/bench.sh installs it)");
    }
    let backend = if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        Backend::Kvm
    } else {
        Backend::Memory
    };
    let repeat = a.repeat.unwrap_or(if a.quick { 1 } else { 3 }).max(1);
    let cells = matrix(a.quick, qemu);
    let started = Instant::now();
    let bar = ProgressBar::new((cells.len() * repeat) as u64 + 3);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40.cyan/blue}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // Physical limits, same run.
    bar.set_message("physical limits: memcpy");
    let memcpy = memcpy_gbps();
    bar.inc(1);
    let mut limits = BTreeMap::new();
    limits.insert("memcpy_one_core_gbps".to_string(), json!(memcpy));
    let links: Vec<Link> = {
        let mut l: Vec<Link> = cells.iter().map(|c| c.link).collect();
        l.sort();
        l.dedup();
        l
    };
    let mut hosts: BTreeMap<Link, Hosts> = BTreeMap::new();
    for &link in &links {
        if link != Link::Loopback {
            hosts.insert(link, Hosts::up(link)?);
        }
    }
    for &link in &links {
        bar.set_message(format!("physical limits: raw TCP over {}", link.name()));
        for streams in [1u16, 2] {
            let g = raw_tcp_gbps(
                &exe,
                hosts.get(&link),
                streams,
                if link == Link::OneGbit {
                    64 << 20
                } else {
                    1 << 30
                },
            )?;
            limits.insert(format!("raw_tcp_{}_x{streams}_gbps", link.name()), json!(g));
        }
    }
    bar.inc(2);

    let key_file = pair::write_key(&work)?;
    let mut rows = Vec::new();
    let mut raw = Vec::new();
    for cell in &cells {
        let mut totals = Vec::new();
        let mut downs = Vec::new();
        let mut wires = Vec::new();
        let mut digest = Some(true);
        let mut cpu = (Vec::new(), Vec::new());
        for rep in 0..repeat {
            bar.set_message(format!(
                "{} {} {} MiB {} rate {} (#{})",
                cell.variant.label(),
                cell.link.name(),
                cell.memory_mib,
                fill_name(cell.fill),
                cell.dirty_rate,
                rep + 1
            ));
            let r = match &cell.variant {
                Variant::Livemig {
                    channels,
                    compress,
                    reserve,
                } => run_livemig(
                    &exe,
                    &work,
                    &key_file,
                    backend,
                    cell,
                    hosts.get(&cell.link),
                    (*channels, compress, *reserve),
                ),
                Variant::Qemu {
                    channels,
                    zstd,
                    prealloc,
                } => run_qemu(
                    &work,
                    cell,
                    hosts.get(&cell.link),
                    *channels,
                    *zstd,
                    *prealloc,
                ),
            };
            bar.inc(1);
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    bar.println(format!("{}: {e:#}", cell.variant.label()));
                    continue;
                }
            };
            let Some(total) = r["total_time_ms"]
                .as_f64()
                .filter(|t| t.is_finite() && *t > 0.0)
            else {
                bar.println(format!("{}: no total time in {r}", cell.variant.label()));
                continue;
            };
            totals.push(total);
            downs.push(r["downtime_ms"].as_f64().unwrap_or(0.0));
            wires.push(r["bytes_on_wire"].as_f64().unwrap_or(0.0));
            if let Some(d) = r.get("digest_match").and_then(Value::as_bool) {
                digest = digest.map(|x| x && d);
            } else {
                digest = None;
            }
            if let (Some(s), Some(d)) =
                (r["source_cpu_s"].as_f64(), r["destination_cpu_s"].as_f64())
            {
                cpu.0.push(s);
                cpu.1.push(d);
            }
            raw.push(json!({"cell": format!("{cell:?}"), "repetition": rep, "report": r}));
        }
        if totals.is_empty() {
            continue;
        }
        let n = totals.len();
        let min = totals.iter().copied().fold(f64::MAX, f64::min);
        let max = totals.iter().copied().fold(0.0, f64::max);
        let total = median(&mut totals);
        rows.push(Row {
            system: cell.variant.system().into(),
            variant: cell.variant.label(),
            link: cell.link.name().into(),
            content: fill_name(cell.fill).into(),
            memory_mib: cell.memory_mib,
            dirty_rate: cell.dirty_rate,
            repetitions: n,
            total_ms_median: total,
            total_ms_min: min,
            total_ms_max: max,
            downtime_ms_median: median(&mut downs),
            bytes_on_wire_median: median(&mut wires),
            throughput_gbps: (cell.memory_mib << 20) as f64 / (total / 1000.0) / 1e9,
            digest_match: if cell.variant.system() == "qemu" {
                None
            } else {
                digest
            },
            source_cpu_s: (!cpu.0.is_empty()).then(|| median(&mut cpu.0)),
            destination_cpu_s: (!cpu.1.is_empty()).then(|| median(&mut cpu.1)),
        });
    }
    bar.finish_with_message(format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    drop(hosts);
    let _ = std::fs::remove_dir_all(&work);

    let meta = json!({
        "date": stamp,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "commit": git_commit(),
        "machine": machine(),
        "backend": format!("{backend:?}").to_lowercase(),
        "repetitions": repeat,
        "duration_s": started.elapsed().as_secs_f64(),
        "physical_limits": limits,
    });
    write_outputs(&out, &meta, &rows, &raw)?;
    println!("{}", std::fs::read_to_string(out.join("results.md"))?);
    println!("results in {}", out.display());
    if rows.iter().any(|r| r.digest_match == Some(false)) {
        bail!("a livemig migration ended with a digest mismatch");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_livemig(
    exe: &Path,
    work: &Path,
    key: &Path,
    backend: Backend,
    cell: &Cell,
    hosts: Option<&Hosts>,
    (channels, compress, reserve): (u16, &str, bool),
) -> Result<Value> {
    let dir = work.join("pair");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let p = Pair::start(&PairSpec {
        exe,
        dir: &dir,
        key_file: key,
        backend,
        reserve_mib: reserve.then_some(cell.memory_mib),
        ns: hosts.map(|h| (h.ns_a.as_str(), h.ns_b.as_str())),
        listen: hosts
            .map(|h| format!("{}:7400", h.addr_b))
            .unwrap_or_else(|| "127.0.0.1:0".into()),
        vm_args: vec![
            "--memory".into(),
            cell.memory_mib.to_string(),
            "--fill".into(),
            fill_name(cell.fill).into(),
            "--dirty-rate".into(),
            cell.dirty_rate.to_string(),
            "--working-set".into(),
            "64".into(),
            "--pattern".into(),
            "random".into(),
        ],
    })?;
    p.migrate(
        &json!({"cmd": "migrate", "channels": channels, "compress": compress, "downtime_limit_ms": 300, "max_rounds": 30}),
        true,
    )
}

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e).context("connecting to QMP"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }
    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            bail!("QEMU closed QMP");
        }
        Ok(serde_json::from_str(&line)?)
    }
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        writeln!(self.w, "{}", json!({"execute": name, "arguments": args}))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(
    ns: Option<&str>,
    mem_file: &Path,
    mib: u64,
    qmp: &Path,
    incoming: bool,
    prealloc: bool,
) -> Result<Killed> {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    c.args([
        "-accel",
        "tcg",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        &format!("{mib}M"),
    ])
    .args(["-machine", "pc,memory-backend=ram"])
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=ram,size={mib}M,mem-path={},share=on,prealloc={}",
        mem_file.display(),
        if prealloc { "on" } else { "off" }
    ))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    Ok(Killed(c.spawn().context("starting qemu-system-x86_64")?))
}

/// QEMU migrating the same RAM (file-backed, pre-filled with the same content) of a paused
/// VM over the same link, bandwidth cap lifted, downtime limit as ours.
fn run_qemu(
    work: &Path,
    cell: &Cell,
    hosts: Option<&Hosts>,
    channels: u16,
    zstd: bool,
    prealloc: bool,
) -> Result<Value> {
    let src_ram = PathBuf::from(format!(
        "/dev/shm/livemig-bench-qemu-src-{}",
        std::process::id()
    ));
    let dst_ram = PathBuf::from(format!(
        "/dev/shm/livemig-bench-qemu-dst-{}",
        std::process::id()
    ));
    let cleanup = || {
        let _ = std::fs::remove_file(&src_ram);
        let _ = std::fs::remove_file(&dst_ram);
    };
    let r = (|| {
        write_ram_file(&src_ram, cell.memory_mib, cell.fill)?;
        let _ = std::fs::remove_file(&dst_ram);
        let (qs, qd) = (work.join("qemu-src.qmp"), work.join("qemu-dst.qmp"));
        let _src = qemu(
            hosts.map(|h| h.ns_a.as_str()),
            &src_ram,
            cell.memory_mib,
            &qs,
            false,
            false,
        )?;
        // With prealloc the destination faults its RAM in before the migration starts, as
        // ours does with its reserve.
        let _dst = qemu(
            hosts.map(|h| h.ns_b.as_str()),
            &dst_ram,
            cell.memory_mib,
            &qd,
            true,
            prealloc,
        )?;
        let mut s = Qmp::connect(&qs)?;
        let mut d = Qmp::connect(&qd)?;
        let multifd = channels > 1 || zstd;
        for q in [&mut s, &mut d] {
            q.cmd(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "multifd", "state": multifd}]}),
            )?;
            let mut params = json!({"max-bandwidth": 100_000_000_000u64, "downtime-limit": 300});
            if multifd {
                params["multifd-channels"] = json!(channels);
                params["multifd-compression"] = json!(if zstd { "zstd" } else { "none" });
            }
            q.cmd("migrate-set-parameters", params)?;
        }
        let (host, port) = match hosts {
            Some(h) => (h.addr_b.clone(), 7401),
            None => ("127.0.0.1".to_string(), free_port()?),
        };
        d.cmd(
            "migrate-incoming",
            json!({"uri": format!("tcp:{host}:{port}")}),
        )?;
        s.cmd("migrate", json!({"uri": format!("tcp:{host}:{port}")}))?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut completed_polls = 0;
        loop {
            let st = s.cmd("query-migrate", json!({}))?;
            match st["status"].as_str() {
                Some("completed") => {
                    // QEMU sets the completed status a moment before it fills in the total
                    // time and downtime: ask again until they are there.
                    let (Some(total), Some(down), Some(wire)) = (
                        st["total-time"].as_f64().filter(|t| *t > 0.0),
                        st["downtime"].as_f64().filter(|d| *d > 0.0),
                        st["ram"]["transferred"].as_f64(),
                    ) else {
                        completed_polls += 1;
                        if completed_polls > 200 {
                            bail!("QEMU reported completion without its figures: {st}");
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    return Ok(json!({
                        "total_time_ms": total,
                        "downtime_ms": down,
                        "bytes_on_wire": wire,
                        "ram_bytes": cell.memory_mib << 20,
                    }));
                }
                Some("failed") | Some("cancelled") => {
                    bail!("QEMU migration {}: {st}", st["status"])
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("QEMU migration did not finish in 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    cleanup();
    r
}

/// A file of `mib` MiB with the same content generator our guests use.
fn write_ram_file(path: &Path, mib: u64, fill: Fill) -> Result<()> {
    let ram = GuestRam::new(&RamLayout::single(mib << 20), Populate::Lazy)?;
    guest::fill(&ram, fill, 1);
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for (_, host, len) in ram.host_regions() {
        // SAFETY: the region is a live mapping of `ram`, nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host, len as usize) };
        f.write_all(bytes)?;
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// memcpy bandwidth of one core between two populated 512 MiB buffers.
fn memcpy_gbps() -> f64 {
    let n = 512 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.max(n as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Raw TCP throughput over the link with `streams` connections, measured by `livemig bench-link`.
fn raw_tcp_gbps(exe: &Path, hosts: Option<&Hosts>, streams: u16, bytes: u64) -> Result<f64> {
    let listen = hosts
        .map(|h| format!("{}:7402", h.addr_b))
        .unwrap_or_else(|| "127.0.0.1:7402".into());
    let mut sink = match hosts {
        Some(h) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &h.ns_b]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut sink = Killed(
        sink.args([
            "bench-link",
            "sink",
            "--listen",
            &listen,
            "--streams",
            &streams.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?,
    );
    let mut out = BufReader::new(sink.0.stdout.take().context("sink stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?; // "listening"
    let mut src = match hosts {
        Some(h) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &h.ns_a]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let status = src
        .args([
            "bench-link",
            "source",
            "--to",
            &listen,
            "--streams",
            &streams.to_string(),
        ])
        .args(["--bytes", &bytes.to_string()])
        .status()?;
    if !status.success() {
        bail!("bench-link source failed");
    }
    line.clear();
    out.read_line(&mut line)?;
    Ok(line.trim().parse().unwrap_or(0.0))
}

/// `livemig bench-link`: raw TCP throughput between two hosts (a helper of `bench`).
#[derive(Args, Debug)]
pub struct LinkArgs {
    /// `sink` (receives, prints GB/s) or `source` (sends).
    role: String,
    /// Address to listen on (sink).
    #[arg(long)]
    listen: Option<String>,
    /// Address to send to (source).
    #[arg(long)]
    to: Option<String>,
    /// Connections.
    #[arg(long, default_value_t = 1)]
    streams: u16,
    /// Bytes to send in all.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
}

pub fn link(a: LinkArgs) -> Result<()> {
    match a.role.as_str() {
        "sink" => {
            let l = TcpListener::bind(a.listen.as_deref().context("--listen")?)?;
            println!("listening");
            std::io::stdout().flush()?;
            let mut conns = Vec::new();
            for _ in 0..a.streams {
                conns.push(l.accept()?.0);
            }
            let t = Instant::now();
            let handles: Vec<_> = conns
                .into_iter()
                .map(|mut c| {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 20];
                        let mut n = 0u64;
                        while let Ok(k) = c.read(&mut buf) {
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                        }
                        n
                    })
                })
                .collect();
            let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            println!("{}", total as f64 / t.elapsed().as_secs_f64() / 1e9);
            Ok(())
        }
        "source" => {
            let to = a.to.context("--to")?;
            let per = a.bytes / u64::from(a.streams.max(1));
            let handles: Vec<_> = (0..a.streams)
                .map(|_| {
                    let to = to.clone();
                    std::thread::spawn(move || -> std::io::Result<()> {
                        let mut s = TcpStream::connect(&to)?;
                        let buf = vec![0x5au8; 1 << 20];
                        let mut left = per;
                        while left > 0 {
                            let k = left.min(buf.len() as u64) as usize;
                            s.write_all(&buf[..k])?;
                            left -= k as u64;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
            }
            Ok(())
        }
        r => bail!("unknown role {r:?} (sink or source)"),
    }
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": mem,
        "kernel": kernel.trim(),
    })
}

fn chrono_stamp() -> String {
    let out = Command::new("date").arg("+%Y%m%d-%H%M%S").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "now".into())
}

fn write_outputs(out: &Path, meta: &Value, rows: &[Row], raw: &[Value]) -> Result<()> {
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json!({"meta": meta, "rows": rows, "runs": raw}))?,
    )?;
    let mut csv = String::from(
        "system,variant,link,content,memory_mib,dirty_rate,repetitions,total_ms_median,total_ms_min,total_ms_max,downtime_ms_median,bytes_on_wire_median,throughput_gbps,digest_match,source_cpu_s,destination_cpu_s\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.0},{:.3},{},{},{}\n",
            r.system,
            r.variant,
            r.link,
            r.content,
            r.memory_mib,
            r.dirty_rate,
            r.repetitions,
            r.total_ms_median,
            r.total_ms_min,
            r.total_ms_max,
            r.downtime_ms_median,
            r.bytes_on_wire_median,
            r.throughput_gbps,
            r.digest_match.map(|d| d.to_string()).unwrap_or_default(),
            r.source_cpu_s
                .map(|c| format!("{c:.2}"))
                .unwrap_or_default(),
            r.destination_cpu_s
                .map(|c| format!("{c:.2}"))
                .unwrap_or_default(),
        ));
    }
    std::fs::write(out.join("results.csv"), csv)?;
    std::fs::write(out.join("results.md"), markdown(meta, rows))?;
    crate::bench_plot::plots(
        out,
        rows.iter().map(|r| crate::bench_plot::Point {
            variant: r.variant.clone(),
            link: r.link.clone(),
            content: r.content.clone(),
            memory_mib: r.memory_mib,
            dirty_rate: r.dirty_rate,
            gbps: r.throughput_gbps,
            total_ms: r.total_ms_median,
            downtime_ms: r.downtime_ms_median,
            wire_ratio: r.bytes_on_wire_median / (r.memory_mib << 20) as f64,
        }),
    )?;
    Ok(())
}

fn markdown(meta: &Value, rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Command: `{}` — commit {} — {} — {} cores, {}\n\n",
        meta["command"].as_str().unwrap_or(""),
        meta["commit"].as_str().unwrap_or(""),
        meta["date"].as_str().unwrap_or(""),
        meta["machine"]["cores"],
        meta["machine"]["cpu"].as_str().unwrap_or("")
    ));
    s.push_str("Physical limits measured in the same run: ");
    if let Some(l) = meta["physical_limits"].as_object() {
        let parts: Vec<String> = l
            .iter()
            .map(|(k, v)| format!("{k} = {:.2}", v.as_f64().unwrap_or(0.0)))
            .collect();
        s.push_str(&parts.join(", "));
    }
    s.push_str("\n\n| link | content | RAM MiB | dirty pages/s | variant | total ms (median [min–max]) | downtime ms | GB/s | wire / RAM | vs QEMU single | digest |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    // Each row against QEMU's single stream in the same destination-RAM regime.
    let qemu_single = |r: &Row| {
        let cold = r.variant.ends_with("(no reserve)") || r.variant.ends_with("(no prealloc)");
        let peer = if cold {
            "qemu single (no prealloc)"
        } else {
            "qemu single"
        };
        rows.iter()
            .find(|q| {
                q.variant == peer
                    && q.variant != r.variant
                    && q.link == r.link
                    && q.content == r.content
                    && q.memory_mib == r.memory_mib
                    && q.dirty_rate == r.dirty_rate
            })
            .map(|q| q.total_ms_median)
    };
    for r in rows {
        let vs = qemu_single(r)
            .map(|q| format!("{:.2}× faster", q / r.total_ms_median.max(1e-9)))
            .unwrap_or_else(|| "—".into());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} [{:.0}–{:.0}] | {:.1} | {:.2} | {:.3} | {} | {} |\n",
            r.link,
            r.content,
            r.memory_mib,
            r.dirty_rate,
            r.variant,
            r.total_ms_median,
            r.total_ms_min,
            r.total_ms_max,
            r.downtime_ms_median,
            r.throughput_gbps,
            r.bytes_on_wire_median / (r.memory_mib << 20) as f64,
            vs,
            match r.digest_match {
                Some(true) => "match",
                Some(false) => "MISMATCH",
                None => "n/a",
            }
        ));
    }
    s
}
