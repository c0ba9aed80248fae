//! QEMU migrating the same amount and kind of RAM over the same link, driven over QMP.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livemig_engine::memory::{GuestRam, Populate, RamLayout};
use livemig_engine::vm::{builtin_guest, Fill};
use serde_json::{json, Value};

use crate::matrix::Cell;
use crate::support::{free_port, NetnsHosts, Process};

/// A QMP connection.
pub(crate) struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(path: &Path) -> Result<Qmp> {
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
    pub(crate) fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            bail!("QEMU closed QMP");
        }
        Ok(serde_json::from_str(&line)?)
    }
    pub(crate) fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
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

/// A paused TCG QEMU with `mib` MiB of RAM in `mem_file`, QMP on `qmp`, and `extra` arguments
/// (drives).
pub(crate) fn qemu(
    ns: Option<&str>,
    mem_file: &Path,
    mib: u64,
    qmp: &Path,
    incoming: bool,
    prealloc: bool,
    extra: &[String],
) -> Result<Process> {
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
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    Ok(Process::new(
        c.spawn().context("starting qemu-system-x86_64")?,
    ))
}

/// QEMU migrating the same RAM (file-backed, pre-filled with the same content) of a paused
/// VM over the same link, bandwidth cap lifted, downtime limit as ours.
pub fn run_qemu(
    work: &Path,
    cell: &Cell,
    hosts: Option<&NetnsHosts>,
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
            &[],
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
            &[],
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
pub(crate) fn write_ram_file(path: &Path, mib: u64, fill: Fill) -> Result<()> {
    let ram = GuestRam::new(&RamLayout::single(mib << 20), Populate::Lazy)?;
    builtin_guest::fill(&ram, fill, 1);
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for (_, host, len) in ram.host_regions() {
        // SAFETY: the region is a live mapping of `ram`, nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host, len as usize) };
        f.write_all(bytes)?;
    }
    Ok(())
}
