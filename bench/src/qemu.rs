//! QEMU migrating the same amount and kind of RAM over the same link, driven over QMP. A cell
//! with a dirty rate boots livemig's built-in guest in QEMU from its PVH ELF
//! ([`livemig_engine::vm::pvh_guest`]): the same table, working set, batch and rate.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livemig_engine::memory::{GuestRam, Populate, RamLayout};
use livemig_engine::vm::pvh_guest::{measure_tsc_hz, pvh_guest, PvhGuest};
use livemig_engine::vm::{builtin_guest, Fill, Pattern, VmSpec, Workload};
use serde_json::{json, Value};

use crate::matrix::Cell;
use crate::support::{free_port, CpuWatch, NetnsHosts, Process};

/// A QMP connection.
pub(crate) struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Events received so far, in order.
    pub(crate) events: Vec<Value>,
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
            events: Vec::new(),
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
                self.events.push(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }

    /// When event `name` last came, in µs of the host's clock (QMP stamps every event).
    pub(crate) fn event_us(&self, name: &str) -> Option<i64> {
        self.events
            .iter()
            .rev()
            .find(|e| e["event"] == name)
            .and_then(|e| {
                Some(
                    e["timestamp"]["seconds"].as_i64()? * 1_000_000
                        + e["timestamp"]["microseconds"].as_i64()?,
                )
            })
    }

    /// The `u64` at guest-physical `gpa` (HMP's `xp`).
    pub(crate) fn read_u64(&mut self, gpa: u64) -> Result<u64> {
        let out = self.cmd(
            "human-monitor-command",
            json!({"command-line": format!("xp /1gx {gpa:#x}")}),
        )?;
        let text = out.as_str().unwrap_or_default();
        text.split_whitespace()
            .nth(1)
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .with_context(|| format!("no value in QEMU's answer {text:?}"))
    }
}

/// A TCG QEMU (a source paused until `cont`) with `mib` MiB of RAM in `mem_file`, QMP on `qmp`, and `extra` arguments
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
        // Thread names ("CPU 0/TCG"), so that its vCPU threads' time is told apart from the
        // migration's as livemig's is ([`CpuWatch`]); without them every thread is
        // "qemu-system-x86" and the guest's time counted as the migration's.
        "-name",
        "bench,debug-threads=on",
        "-accel",
        "tcg",
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
    // The source waits for `cont`; the destination starts its guest as soon as the
    // migration is in, if the source's was running (QEMU's default), which marks the end of
    // the downtime as the guest sees it.
    if incoming {
        c.args(["-incoming", "defer"]);
    } else {
        c.arg("-S");
    }
    Ok(Process::new(
        c.spawn().context("starting qemu-system-x86_64")?,
    ))
}

/// How QEMU migrates.
#[derive(Debug, Clone, Copy)]
pub struct QemuOptions {
    /// multifd channels (1: the single stream, unless `zstd`).
    pub channels: u16,
    /// multifd with zstd.
    pub zstd: bool,
    /// The destination faults its RAM in before the migration (ours reserves it).
    pub prealloc: bool,
    /// Over TLS: both sides get `tls-creds-x509` from a throwaway CA and `tls-creds` set; the
    /// destination's certificate carries this name (the source checks it is
    /// [`TLS_HOSTNAME`]). None: in clear.
    pub tls: Option<&'static str>,
    /// QEMU's auto-converge (cpu-throttle 20 % first, +10 % per step: its defaults).
    pub auto_converge: bool,
    /// `downtime-limit`, ms.
    pub downtime_limit_ms: u64,
    /// The RAM file's zero pages written (else left as holes).
    pub written: bool,
}

/// QEMU migrating the same RAM (file-backed, pre-filled with the same content) of a VM over
/// the same link, bandwidth cap lifted, the cell's downtime limit (as ours): paused for an idle cell, the
/// built-in guest booted from its PVH ELF for a dirtying one (see [`migrate_qemu`]).
pub fn run_qemu(
    work: &Path,
    cell: &Cell,
    hosts: Option<&NetnsHosts>,
    channels: u16,
    zstd: bool,
    prealloc: bool,
    tls: bool,
) -> Result<Value> {
    let spec = VmSpec {
        memory_mib: cell.memory_mib,
        vcpus: 1,
        fill: cell.fill,
        workload: Workload {
            working_set_mib: crate::run::WORKING_SET_MIB,
            dirty_rate: cell.dirty_rate,
            pattern: Pattern::Random,
        },
    };
    let o = QemuOptions {
        channels,
        zstd,
        prealloc,
        tls: tls.then_some(TLS_HOSTNAME),
        auto_converge: false,
        downtime_limit_ms: cell.downtime_limit_ms,
        written: cell.written,
    };
    migrate_qemu(work, &spec, hosts, &o)
}

/// The name the destination's TLS certificate carries and the source checks (`tls-hostname`).
pub const TLS_HOSTNAME: &str = "livemig-bench-destination";

/// A folder of QEMU x509 credentials under `work` (`ca-cert.pem`, `server-cert.pem`,
/// `server-key.pem` for `name`), fresh from a throwaway CA, and the `-object` arguments of each side's
/// `tls-creds-x509` (id `tls0`): the destination's (server) and the source's (client).
fn tls_credentials(work: &Path, name: &str) -> Result<[Vec<String>; 2]> {
    let dir = work.join("qemu-tls");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (ca, certs) = livemig_engine::tls::throwaway_ca(&[vec![name.to_string()]])
        .map_err(|e| anyhow::anyhow!("making QEMU's TLS certificates: {e}"))?;
    let (cert, key) = &certs[0];
    for (name, pem) in [
        ("ca-cert.pem", &ca),
        ("server-cert.pem", cert),
        ("server-key.pem", key),
    ] {
        std::fs::write(dir.join(name), pem)?;
    }
    // The destination asks the source for no certificate; the source checks the
    // destination's against the CA and the name.
    let object = |endpoint: &str, verify: &str| {
        vec![
            "-object".to_string(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer={verify}",
                dir.display()
            ),
        ]
    };
    Ok([object("server", "off"), object("client", "on")])
}

/// QEMU migrating a VM of `spec`'s RAM size and content: livemig's built-in guest of `spec`
/// (one vCPU) booted from its PVH ELF and running (writing pages at its rate, or idle) before
/// the migration starts, as livemig's runs; a paused VM only where the PVH guest does not fit
/// an idle `spec`. Reports bytes as QEMU counts them; the total time from the `migrate`
/// command to the destination's `RESUME`, and the downtime from the source's `STOP` to that
/// `RESUME` (QMP's event stamps, on this host's clock: the spans livemig's figures cover —
/// QEMU's own figures end when the source has sent the last byte, before the destination has
/// loaded it, and are kept as `qemu_reported_total_ms` and `qemu_reported_downtime_ms`; a
/// paused VM, which does not resume there, keeps them); and both processes' CPU time outside
/// their vCPU threads ([`CpuWatch`]).
pub fn migrate_qemu(
    work: &Path,
    spec: &VmSpec,
    hosts: Option<&NetnsHosts>,
    o: &QemuOptions,
) -> Result<Value> {
    let prealloc = o.prealloc;
    // Unique per call: two migrations of one process (tests run in parallel) never share RAM.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let src_ram = PathBuf::from(format!(
        "/dev/shm/livemig-bench-qemu-src-{}-{call}",
        std::process::id()
    ));
    let dst_ram = PathBuf::from(format!(
        "/dev/shm/livemig-bench-qemu-dst-{}-{call}",
        std::process::id()
    ));
    let cleanup = || {
        let _ = std::fs::remove_file(&src_ram);
        let _ = std::fs::remove_file(&dst_ram);
    };
    let r = (|| {
        write_ram_file(&src_ram, spec.memory_mib, spec.fill, o.written)?;
        let _ = std::fs::remove_file(&dst_ram);
        let (qs, qd) = (work.join("qemu-src.qmp"), work.join("qemu-dst.qmp"));
        // The built-in guest's workload, booted from its PVH ELF on both sides (the
        // destination needs the same firmware blobs to take the migration).
        let guest = if spec.workload.dirty_rate > 0 {
            Some(guest_elf(work, spec)?)
        } else {
            guest_elf(work, spec).ok()
        };
        let extra: Vec<String> = match &guest {
            Some((path, _)) => vec!["-kernel".into(), path.display().to_string()],
            None => Vec::new(),
        };
        let [tls_dst, tls_src] = match o.tls {
            Some(name) => tls_credentials(work, name)?,
            None => Default::default(),
        };
        let src_proc = qemu(
            hosts.map(|h| h.ns_a.as_str()),
            &src_ram,
            spec.memory_mib,
            &qs,
            false,
            false,
            &[extra.clone(), tls_src].concat(),
        )?;
        // With prealloc the destination faults its RAM in before the migration starts, as
        // ours does with its reserve.
        let dst_proc = qemu(
            hosts.map(|h| h.ns_b.as_str()),
            &dst_ram,
            spec.memory_mib,
            &qd,
            true,
            prealloc,
            &[extra, tls_dst].concat(),
        )?;
        let mut s = Qmp::connect(&qs)?;
        let mut d = Qmp::connect(&qd)?;
        for q in [&mut s, &mut d] {
            set_migration_options(q, o)?;
        }
        let (host, port) = match hosts {
            Some(h) => (h.addr_b.clone(), 7401),
            None => ("127.0.0.1".to_string(), free_port()?),
        };
        d.cmd(
            "migrate-incoming",
            json!({"uri": format!("tcp:{host}:{port}")}),
        )?;
        if let Some((_, g)) = &guest {
            start_guest(&mut s, g)?;
        }
        let cpu = CpuWatch::start(&[src_proc.child.id(), dst_proc.child.id()]);
        let started_us = unix_us();
        s.cmd("migrate", json!({"uri": format!("tcp:{host}:{port}")}))?;
        wait_completed(
            &mut s,
            &mut d,
            guest.is_some(),
            cpu,
            (spec.memory_mib << 20, started_us),
        )
    })();
    cleanup();
    r
}

/// Both sides' migration capabilities and parameters of `o` (multifd with its channels and
/// compression, auto-converge, bandwidth cap lifted, the downtime limit).
fn set_migration_options(q: &mut Qmp, o: &QemuOptions) -> Result<()> {
    let multifd = o.channels > 1 || o.zstd;
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "multifd", "state": multifd},
            {"capability": "auto-converge", "state": o.auto_converge},
        ]}),
    )?;
    let mut params = json!({
        "max-bandwidth": 100_000_000_000u64,
        "downtime-limit": o.downtime_limit_ms,
    });
    if multifd {
        params["multifd-channels"] = json!(o.channels);
        params["multifd-compression"] = json!(if o.zstd { "zstd" } else { "none" });
    }
    if o.tls.is_some() {
        params["tls-creds"] = json!("tls0");
        params["tls-hostname"] = json!(TLS_HOSTNAME);
    }
    q.cmd("migrate-set-parameters", params)?;
    Ok(())
}

/// Polls the source `s` until its migration completed and returns the cell's figures: with a
/// `running` guest, the total time from `started_us` (the migrate command, µs since the epoch)
/// and the downtime from its STOP, each to the destination `d`'s RESUME; `cpu` is finished
/// once the guest runs there.
fn wait_completed(
    s: &mut Qmp,
    d: &mut Qmp,
    running: bool,
    cpu: CpuWatch,
    (ram_bytes, started_us): (u64, i64),
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut completed_polls = 0;
    // QEMU reports its current throttle only while it migrates (it lifts the throttle at
    // the end): the highest seen while polling.
    let mut throttle_max = 0;
    loop {
        let st = s.cmd("query-migrate", json!({}))?;
        throttle_max = throttle_max.max(st["cpu-throttle-percentage"].as_u64().unwrap_or(0));
        match st["status"].as_str() {
            Some("completed") => {
                // QEMU sets the completed status a moment before it fills in the total
                // time and downtime (together, in one function): ask again until the total
                // is there. Its downtime, whole milliseconds, may then be 0 (under 1 ms: an
                // idle guest with little left to send, seen in CI's quick bench).
                let (Some(total), Some(down), Some(wire)) = (
                    st["total-time"].as_f64().filter(|t| *t > 0.0),
                    st["downtime"].as_f64(),
                    st["ram"]["transferred"].as_f64(),
                ) else {
                    completed_polls += 1;
                    if completed_polls > 200 {
                        bail!("QEMU reported completion without its figures: {st}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                // The guest runs again once the destination says RESUME.
                let resumed = if running {
                    Some(wait_event(d, "RESUME")?)
                } else {
                    None
                };
                let cpu = cpu.finish();
                let end_to_end = resumed
                    .zip(s.event_us("STOP"))
                    .map(|(r, p)| (r - p) as f64 / 1000.0);
                let total_end_to_end = resumed.map(|r| (r - started_us) as f64 / 1000.0);
                return Ok(json!({
                    "total_time_ms": total_end_to_end.unwrap_or(total),
                    "total_end_to_end": total_end_to_end.is_some(),
                    "qemu_reported_total_ms": total,
                    "downtime_ms": end_to_end.unwrap_or(down),
                    "downtime_end_to_end": end_to_end.is_some(),
                    "qemu_reported_downtime_ms": down,
                    "bytes_on_wire": wire,
                    "ram_bytes": ram_bytes,
                    "source_process_cpu_s": cpu.first().and_then(|c| c.outside),
                    "destination_process_cpu_s": cpu.get(1).and_then(|c| c.outside),
                    "source_guest_cpu_s": cpu.first().and_then(|c| c.guest),
                    "qemu_throttle_max_pct": throttle_max,
                    // QEMU's own view of the guest's dirtying (pages/s, last sync) and
                    // how many times it synced the dirty log.
                    "qemu_dirty_pages_rate": st["ram"]["dirty-pages-rate"],
                    "qemu_dirty_syncs": st["ram"]["dirty-sync-count"],
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
}

/// The built-in guest of `spec` as a PVH ELF in `work`.
fn guest_elf(work: &Path, spec: &VmSpec) -> Result<(PathBuf, PvhGuest)> {
    let g = pvh_guest(spec, measure_tsc_hz(Duration::from_millis(50)))?;
    let path = work.join("livemig-guest.pvh.elf");
    std::fs::write(&path, &g.elf).with_context(|| format!("writing {}", path.display()))?;
    Ok((path, g))
}

/// Now, in µs since the epoch (the clock of QMP's event stamps).
fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Waits (10 s at most) for QMP event `name` and returns its stamp in µs.
fn wait_event(q: &mut Qmp, name: &str) -> Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(t) = q.event_us(name) {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("QEMU sent no {name} event within 10 s");
        }
        q.cmd("query-status", json!({}))?;
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts the paused source and waits until its guest has booted and runs its loop (its
/// progress counter moves), so that the migration starts under the cell's dirty rate as
/// livemig's does.
fn start_guest(q: &mut Qmp, g: &PvhGuest) -> Result<()> {
    q.cmd("cont", json!({}))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if q.read_u64(g.status_gpa)? > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the guest in QEMU did not start its workload within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file of `mib` MiB with the same content generator our guests use: its zero pages
/// `written` (allocated, as a guest that wrote zeros leaves them), or holes (as a guest's
/// never-used RAM: the file is sparse there, as livemig's RAM is where it was never written).
pub(crate) fn write_ram_file(path: &Path, mib: u64, fill: Fill, written: bool) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let ram = GuestRam::new(&RamLayout::single(mib << 20), Populate::Lazy)?;
    builtin_guest::fill(&ram, fill, 1);
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(mib << 20)?;
    for (_, host, len) in ram.host_regions() {
        // SAFETY: the region is a live mapping of `ram`, nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host, len as usize) };
        if written {
            f.write_all(bytes)?;
            continue;
        }
        // Each run of pages holding data in one write; the zero pages between stay holes.
        let data = |i: usize| {
            // SAFETY: page `i` lies inside `bytes` (`i < pages`), which is readable.
            !unsafe { livemig_transport::codec::is_zero_page(bytes[i * 4096..].as_ptr()) }
        };
        let pages = bytes.len() / 4096;
        let mut i = 0;
        while i < pages {
            if !data(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < pages && data(i) {
                i += 1;
            }
            f.write_all_at(&bytes[start * 4096..i * 4096], (start * 4096) as u64)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::{Link, Variant};

    fn cell(memory_mib: u64, dirty_rate: u64) -> Cell {
        Cell {
            link: Link::Loopback,
            fill: Fill::Random,
            written: false,
            memory_mib,
            dirty_rate,
            downtime_limit_ms: crate::matrix::DEFAULT_LIMIT_MS,
            variant: Variant::Qemu {
                channels: 1,
                zstd: false,
                prealloc: false,
                tls: false,
            },
        }
    }

    fn work(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("livemig-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_builtin_guest_boots_in_qemu_and_writes_its_pages_at_its_rate() {
        let dir = work("pvh");
        let c = cell(128, 8000);
        let spec = VmSpec {
            memory_mib: c.memory_mib,
            workload: Workload {
                working_set_mib: crate::run::WORKING_SET_MIB,
                dirty_rate: c.dirty_rate,
                pattern: Pattern::Random,
            },
            ..VmSpec::default()
        };
        let (elf, g) = guest_elf(&dir, &spec).unwrap();
        let ram = dir.join("ram");
        write_ram_file(&ram, c.memory_mib, c.fill, true).unwrap();
        let qmp = dir.join("q.qmp");
        let _q = qemu(
            None,
            &ram,
            c.memory_mib,
            &qmp,
            false,
            false,
            &["-kernel".into(), elf.display().to_string()],
        )
        .unwrap();
        let mut q = Qmp::connect(&qmp).unwrap();
        start_guest(&mut q, &g).unwrap();
        let (c0, t0) = (q.read_u64(g.status_gpa).unwrap(), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        let (c1, t1) = (q.read_u64(g.status_gpa).unwrap(), Instant::now());
        let rate = (c1 - c0) as f64 * g.batch as f64 / (t1 - t0).as_secs_f64();
        // The pacing itself, not speed: a rate far off means the TSC pacing is wrong (a
        // starved emulator only falls behind, and catches up within 50 ms).
        assert!(
            (0.5..1.5).contains(&(rate / 8000.0)),
            "{rate:.0} pages/s, not 8000 ({} batches of {} in {:?})",
            c1 - c0,
            g.batch,
            t1 - t0
        );
        // The first page of the table holds a counter value, not the random fill.
        let layout = builtin_guest::GuestLayout::new(&spec).unwrap();
        let first = layout.working_set().start + u64::from(layout.table_entries()[0]) * 4096;
        let v = q.read_u64(first).unwrap();
        assert!(
            v <= c1,
            "page {first:#x} holds {v:#x}, not a counter value (<= {c1})"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// QEMU's vCPU thread carries its name, so that the CPU columns tell it apart from the
    /// migration's threads as they do livemig's.
    #[test]
    fn the_vcpu_threads_of_qemu_are_told_apart() {
        let dir = work("qemu-threads");
        let mem = dir.join("ram");
        std::fs::File::create(&mem)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut q = qemu(None, &mem, 64, &dir.join("qmp"), false, false, &[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut found = Vec::new();
        while found.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            found = crate::support::vcpu_ticks(q.id());
        }
        let _ = q.kill_and_log();
        assert_eq!(
            found.len(),
            1,
            "QEMU's one vCPU thread not found by its name"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Over TLS QEMU migrates, and its source refuses a destination whose certificate names
    /// another host: the stream is TLS, checked.
    #[test]
    fn qemu_migrates_over_tls_and_checks_the_destination() {
        let dir = work("qemu-tls");
        let r = run_qemu(&dir, &cell(64, 0), None, 1, false, true, true).unwrap();
        assert!(r["total_time_ms"].as_f64().unwrap() > 0.0, "{r}");
        let spec = VmSpec {
            memory_mib: 64,
            vcpus: 1,
            fill: Fill::Random,
            workload: Workload {
                working_set_mib: crate::run::WORKING_SET_MIB,
                dirty_rate: 0,
                pattern: Pattern::Random,
            },
        };
        let o = QemuOptions {
            written: true,
            channels: 1,
            zstd: false,
            prealloc: true,
            tls: Some("someone-else"),
            auto_converge: false,
            downtime_limit_ms: 300,
        };
        let err = format!("{:#}", migrate_qemu(&dir, &spec, None, &o).unwrap_err());
        assert!(err.contains("does not match the hostname"), "{err}");
        println!("QEMU TLS, wrong destination name: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn qemu_migrates_the_dirtying_builtin_guest() {
        let dir = work("qemu-dirty");
        let r = run_qemu(&dir, &cell(128, 20_000), None, 1, false, false, false).unwrap();
        assert!(r["total_time_ms"].as_f64().unwrap() > 0.0, "{r}");
        // The pages the guest wrote during the migration went again: a paused VM's migration
        // carries its RAM plus ~0.3 % (page headers), this one several percent more.
        let wire = r["bytes_on_wire"].as_f64().unwrap();
        let ram = r["ram_bytes"].as_f64().unwrap();
        assert!(wire > ram * 1.02, "QEMU sent no re-dirtied pages: {r}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
