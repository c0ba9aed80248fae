//! livemig-workload: the service that runs inside livemig's Linux test guests (L2).
//!
//! A single std-only file so it builds with plain rustc, statically, without cargo or crates:
//!
//!     rustc -O -C target-feature=+crt-static --edition 2021 guest/workload.rs -o workload
//!
//! (scripts/linux-guest.sh does this). It gives a migration test four things to check:
//!   * memory: a working set of `livemig.ws` MiB, one u64 written into one of its pages
//!     `livemig.rate` times per second, in `livemig.pattern` order (seq or random) — a steady,
//!     known dirty rate;
//!   * liveness: `livemig-workload: tick N` on stdout every 100 ms, N rising by 1 — a test
//!     proves the guest kept running on the destination by N advancing after resume;
//!   * storage: every second the current N is appended to `livemig.disk` and fsynced, so the
//!     disk image's last line tells how far the guest got (checked across migrations);
//!   * network (optional): a TCP echo server on port `livemig.echo`.
//!
//! It obeys line commands on stdin (the serial console): sync, poweroff, reboot, quiet, loud,
//! pause-writes, resume-writes, hello (one UDP broadcast on eth0: the guest's first
//! transmission in a test of a migration without announce), status.
//!
//! Parameters come from /proc/cmdline (`livemig.ws=64 livemig.rate=2000 ...`); `livemig.*`
//! arguments on our own command line override them, which makes host-side testing easy:
//!     ./workload livemig.ws=8 livemig.disk=/tmp/c livemig.echo=7777
//!
//! libc calls go through `extern "C"` declarations (no libc crate): the numbers below are the
//! x86_64 Linux ABI values.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn clock_gettime(clk: i32, ts: *mut Timespec) -> i32;
    fn clock_nanosleep(clk: i32, flags: i32, req: *const Timespec, rem: *mut Timespec) -> i32;
    fn sync();
    fn reboot(cmd: i32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const u8, len: u32) -> i32;
}
const SOL_SOCKET: i32 = 1;
const SO_BINDTODEVICE: i32 = 25;

const CLOCK_MONOTONIC: i32 = 1;
const TIMER_ABSTIME: i32 = 1;
const LINUX_REBOOT_CMD_POWER_OFF: i32 = 0x4321_FEDCu32 as i32;
const LINUX_REBOOT_CMD_RESTART: i32 = 0x0123_4567;
const PAGE: usize = 4096;
const TICK_NS: u64 = 100_000_000;

/// Set just before poweroff/reboot: no more ticks, so "powering off" is the last line and no
/// tick gets cut in half by the kernel's own shutdown messages.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// CLOCK_MONOTONIC in ns. Explicitly monotonic (not wall time): pacing must not jump when the
/// guest's wall clock is stepped, e.g. after a migration.
fn now_ns() -> u64 {
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_until_ns(t: u64) {
    let ts = Timespec {
        tv_sec: (t / 1_000_000_000) as i64,
        tv_nsec: (t % 1_000_000_000) as i64,
    };
    // EINTR just means an early wake-up; every caller re-checks the clock.
    unsafe { clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, std::ptr::null_mut()) };
}

/// One whole line per write, flushed at once: the console is shared by threads and the host
/// parses it line by line, so lines must never interleave or sit in a buffer.
fn say(msg: &str) {
    let out = std::io::stdout();
    let mut out = out.lock();
    let _ = writeln!(out, "livemig-workload: {msg}");
    let _ = out.flush();
}

struct Config {
    ws_mib: usize,
    rate: u64,
    random: bool,
    disk: Option<String>,
    disk_explicit: bool,
    echo: u16,
}

/// `livemig.KEY=VALUE` pairs, later ones winning. A plain list rather than a HashMap: std's
/// HashMap seeds itself from getrandom(2), which needs no waiting on 6.1 but is one more thing
/// that could stall a program started first thing after boot.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, key: &str) -> Option<&String> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

fn params() -> Params {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut list = Vec::new();
    for tok in cmdline
        .split_whitespace()
        .map(str::to_owned)
        .chain(std::env::args().skip(1))
    {
        if let Some(kv) = tok.strip_prefix("livemig.") {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            list.push((k.to_owned(), v.to_owned()));
        }
    }
    Params(list)
}

fn config() -> Config {
    let p = params();
    fn num<T: std::str::FromStr>(p: &Params, k: &str, def: T) -> T {
        match p.get(k) {
            None => def,
            Some(v) => v.parse().unwrap_or_else(|_| {
                say(&format!("error: bad livemig.{k}={v}, using the default"));
                def
            }),
        }
    }
    let random = match p.get("pattern").map(String::as_str) {
        None | Some("random") => true,
        Some("seq") => false,
        Some(other) => {
            say(&format!(
                "error: bad livemig.pattern={other} (seq|random), using random"
            ));
            true
        }
    };
    let disk = match p.get("disk").map(String::as_str) {
        None => Some("/mnt/counter".to_owned()),
        Some("" | "none" | "off") => None,
        Some(path) => Some(path.to_owned()),
    };
    Config {
        ws_mib: num(&p, "ws", 64usize).max(1),
        rate: num(&p, "rate", 2000u64),
        random,
        disk,
        disk_explicit: p.get("disk").is_some(),
        echo: num(&p, "echo", 0u16),
    }
}

/// Is `path` on a real (block-backed or network) filesystem? In the guest the initramfs root is
/// rootfs/tmpfs; a counter file there would vanish with the guest and prove nothing, so without
/// a disk mounted at (a parent of) the path we keep no file. The longest matching mount point in
/// /proc/mounts is the filesystem the path lives on. The default path must also be below a mount
/// point other than "/", so that a test run on a host never litters its /mnt.
fn on_real_fs(path: &str, explicit: bool) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = f[1].replace("\\040", " ");
        let under = mp == "/" || path == mp || path.starts_with(&format!("{mp}/"));
        if under && best.as_ref().is_none_or(|(l, _)| mp.len() >= *l) {
            best = Some((mp.len(), f[2].to_owned()));
        }
    }
    matches!(best, Some((len, fs)) if !matches!(fs.as_str(), "rootfs" | "tmpfs" | "ramfs")
        && (explicit || len > 1))
}

/// The working set as raw memory. A Vec would do, but its pointer is all we need and the writer
/// must use volatile stores so the compiler cannot drop "useless" writes.
struct WorkingSet {
    base: *mut u8,
    pages: usize,
}
unsafe impl Send for WorkingSet {}

fn allocate(mib: usize) -> WorkingSet {
    let pages = mib * 1024 * 1024 / PAGE;
    let mut v: Vec<u8> = Vec::with_capacity(pages * PAGE);
    let base = v.as_mut_ptr();
    std::mem::forget(v); // lives for the whole program
                         // Touch every page with a non-zero stamp: the pages become resident, and they are not zero
                         // pages, which a migration would skip or send as a marker only.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..pages {
        x = xorshift(x);
        unsafe { std::ptr::write_volatile(base.add(i * PAGE) as *mut u64, x | 1) };
    }
    WorkingSet { base, pages }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Writes `rate` pages/s. The target count is derived from the clock (not from counting sleeps),
/// so the long-run rate is exact whatever the sleep granularity. Wake-ups are batched to at
/// most one per 5 ms: under nested virtualization every timer wake-up is a costly exit. A
/// backlog (guest paused by a migration, vCPU starved) is capped at 100 ms worth of writes so a
/// resume does not start with a burst that would distort the destination's dirty rate.
fn writer(
    ws: WorkingSet,
    rate: u64,
    random: bool,
    paused: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) {
    if rate == 0 {
        return;
    }
    const SLICE_NS: u64 = 5_000_000;
    let max_backlog = (rate / 10).max(1);
    let (mut rng, mut seq) = (0x2545_F491_4F6C_DD1Du64, 0usize);
    let start = now_ns();
    let mut done = 0u64; // writes accounted for since `start` (done or skipped)
    loop {
        let now = now_ns();
        let due = ((now - start) as u128 * rate as u128 / 1_000_000_000) as u64;
        if due > done + max_backlog {
            done = due - max_backlog;
        }
        let n = due - done;
        if !paused.load(Relaxed) {
            for _ in 0..n {
                let page = if random {
                    rng = xorshift(rng);
                    (rng % ws.pages as u64) as usize
                } else {
                    seq = (seq + 1) % ws.pages;
                    seq
                };
                let c = writes.fetch_add(1, Relaxed) + 1;
                // Offset varies inside the page so successive versions of a page differ in more
                // than one spot (delta/XBZRLE encoders see realistic changes).
                let off = (c as usize * 8) % PAGE;
                unsafe { std::ptr::write_volatile(ws.base.add(page * PAGE + off) as *mut u64, c) };
            }
        }
        done += n;
        // Next wake-up: when the next write is due, but not sooner than one slice from now.
        let next = start + ((done + 1) as u128 * 1_000_000_000 / rate as u128) as u64;
        sleep_until_ns(next.max(now + SLICE_NS));
    }
}

/// Appends the tick counter to the disk file once a second and fsyncs, so the file's last line
/// is a lower bound on how far the guest got before a crash/poweroff.
fn disk_writer(path: String, tick: Arc<AtomicU64>) {
    let mut f = match OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => return say(&format!("error: cannot open {path}: {e}; no disk writes")),
    };
    loop {
        thread::sleep(Duration::from_secs(1));
        let n = tick.load(Relaxed);
        if let Err(e) = f
            .write_all(format!("{n}\n").as_bytes())
            .and_then(|_| f.sync_all())
        {
            say(&format!("error: writing {path}: {e}"));
            thread::sleep(Duration::from_secs(5));
        }
    }
}

fn last_line(path: &str) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.lines().last().map(str::to_owned)
}

fn echo_server(port: u16) {
    // A SocketAddr, not a "host:port" string: name resolution would pull glibc's NSS into a
    // static binary (and warn at link time).
    let l = match TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)) {
        Ok(l) => l,
        Err(e) => return say(&format!("error: echo server on port {port}: {e}")),
    };
    say(&format!("echo server on port {port}"));
    for conn in l.incoming().flatten() {
        thread::spawn(move || echo(conn));
    }
}

fn echo(mut c: TcpStream) {
    let _ = c.set_nodelay(true);
    let mut buf = [0u8; 16384];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// eth0 as the guest sees it: packets and drops each way, and how often the kernel's transmit
/// watchdog found its queue stuck (a device that stopped completing transmits).
fn nic_status() -> String {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/class/net/eth0/{f}"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "eth0: rx_packets={} rx_dropped={} tx_packets={} tx_dropped={} tx_timeouts={} carrier={}",
        read("statistics/rx_packets"),
        read("statistics/rx_dropped"),
        read("statistics/tx_packets"),
        read("statistics/tx_dropped"),
        read("queues/tx-0/tx_timeout"),
        read("carrier")
    )
}

fn hello() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    s.set_broadcast(true)?;
    // The limited broadcast needs an interface when there is no default route.
    let dev = b"eth0\0";
    // SAFETY: a valid socket and a NUL-terminated name that outlives the call.
    if unsafe { setsockopt(s.as_raw_fd(), SOL_SOCKET, SO_BINDTODEVICE, dev.as_ptr(), 5) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.send_to(b"livemig-workload hello", SocketAddrV4::new(Ipv4Addr::BROADCAST, 9))?;
    Ok(())
}

fn commands(
    paused: Arc<AtomicBool>,
    quiet: Arc<AtomicBool>,
    tick: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        // The console may deliver \r\n; blank lines are just noise.
        match line.trim() {
            "" => {}
            "sync" => {
                unsafe { sync() };
                say("synced");
            }
            cmd @ ("poweroff" | "reboot") => {
                unsafe { sync() };
                let (what, how) = if cmd == "poweroff" {
                    ("powering off", LINUX_REBOOT_CMD_POWER_OFF)
                } else {
                    ("rebooting", LINUX_REBOOT_CMD_RESTART)
                };
                STOPPING.store(true, Relaxed);
                say(what);
                // Only a livemig guest's /init sets LIVEMIG_GUEST=1: run by hand on a host (as
                // root), "poweroff" must not take the host down. There we just exit.
                if std::env::var_os("LIVEMIG_GUEST").is_none_or(|v| v != "1") {
                    say("not in a livemig guest (LIVEMIG_GUEST!=1): exiting instead");
                    std::process::exit(0);
                }
                // reboot(2) doesn't wait for the UART to drain: give the line time to get out.
                thread::sleep(Duration::from_millis(200));
                unsafe { reboot(how) };
                say(&format!("error: reboot(2) failed: {}", std::io::Error::last_os_error()));
                STOPPING.store(false, Relaxed);
            }
            // This program transmits nothing on its own (the echo server only answers), so these
            // only flip the flag and acknowledge; they exist so harnesses can use one protocol.
            "quiet" => {
                quiet.store(true, Relaxed);
                say("quiet");
            }
            "loud" => {
                quiet.store(false, Relaxed);
                say("loud");
            }
            "pause-writes" => {
                paused.store(true, Relaxed);
                say("writes paused");
            }
            "resume-writes" => {
                paused.store(false, Relaxed);
                say("writes resumed");
            }
            // One UDP broadcast (to the discard port): the guest's first transmission after a
            // migration without announce, which teaches switches where it is.
            "hello" => match hello() {
                Ok(()) => say("hello sent"),
                Err(e) => say(&format!("error: hello: {e}")),
            },
            "status" => say(&format!(
                "status tick={} writes={} writes_paused={} quiet={} {}",
                tick.load(Relaxed),
                writes.load(Relaxed),
                paused.load(Relaxed),
                quiet.load(Relaxed),
                nic_status()
            )),
            other => say(&format!("error: unknown command {other:?} (sync|poweroff|reboot|quiet|loud|pause-writes|resume-writes|hello|status)")),
        }
    }
    // EOF on stdin (host-side runs with </dev/null): keep running without commands.
}

fn main() {
    let cfg = config();
    let t0 = now_ns();
    let ws = allocate(cfg.ws_mib);
    say(&format!(
        "start ws={}MiB pages={} rate={}/s pattern={} disk={} echo={} (touched in {} ms)",
        cfg.ws_mib,
        ws.pages,
        cfg.rate,
        if cfg.random { "random" } else { "seq" },
        cfg.disk.as_deref().unwrap_or("none"),
        cfg.echo,
        (now_ns() - t0) / 1_000_000
    ));

    let paused = Arc::new(AtomicBool::new(false));
    let quiet = Arc::new(AtomicBool::new(false));
    let tick = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));

    {
        let (p, w) = (paused.clone(), writes.clone());
        let (rate, random) = (cfg.rate, cfg.random);
        thread::spawn(move || writer(ws, rate, random, p, w));
    }
    match cfg.disk {
        Some(path) if on_real_fs(&path, cfg.disk_explicit) => {
            say(&format!(
                "disk {path} last={}",
                last_line(&path).unwrap_or_else(|| "none".into())
            ));
            let t = tick.clone();
            thread::spawn(move || disk_writer(path, t));
        }
        Some(path) => say(&format!(
            "no disk: {path} is not on a mounted disk filesystem"
        )),
        None => {}
    }
    if cfg.echo != 0 {
        let port = cfg.echo;
        thread::spawn(move || echo_server(port));
    }
    {
        let (p, q, t, w) = (paused.clone(), quiet.clone(), tick.clone(), writes.clone());
        thread::spawn(move || commands(p, q, t, w));
    }

    // Ticks on absolute deadlines (no drift), but a missed deadline is skipped rather than
    // caught up: after a pause (migration downtime) N resumes at +1, not with a burst, so the
    // console shows the gap in time while N stays "one per tick printed".
    let mut next = now_ns() + TICK_NS;
    let mut n = 0u64;
    loop {
        sleep_until_ns(next);
        if STOPPING.load(Relaxed) {
            next += TICK_NS;
            continue;
        }
        n += 1;
        tick.store(n, Relaxed);
        say(&format!("tick {n}"));
        next += TICK_NS;
        let now = now_ns();
        if now > next {
            next = now + TICK_NS;
        }
    }
}
