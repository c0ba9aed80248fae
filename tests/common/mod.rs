//! Helpers for end-to-end tests: VM processes, destinations and migrations through the
//! `livemig` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use livemig_bench::support::{kvm_available, NetnsHosts, Process};
use serde_json::Value;

/// The key every test process shares (through LIVEMIG_KEY) unless a test says otherwise.
pub const TEST_KEY: &str = "6c69766d69672d746573742d6b65792d30313233343536373839616263646566";

/// The livemig binary: `LIVEMIG_BIN` if set (tests run inside the soft-RoCE VM, where
/// cargo's path does not exist), else the one cargo built.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("LIVEMIG_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_livemig").to_string())
    })
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A child process killed on drop (the shared [`Process`]), with panicking helpers.
pub struct Proc(pub Process);

impl std::ops::Deref for Proc {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.0
    }
}

impl Proc {
    /// Reads stdout lines until one contains `needle`.
    pub fn wait_line(&mut self, needle: &str) -> String {
        self.0
            .wait_line(needle)
            .unwrap_or_else(|e| panic!("waiting for {needle:?}: {e:#}"))
    }

    /// Waits for exit (bounded) and returns (status code, stderr).
    pub fn wait_exit(self, limit: Duration) -> (Option<i32>, String) {
        self.0.wait_exit(limit).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Kills the process if it still runs, and returns its stderr.
    pub fn kill_and_log(&mut self) -> String {
        self.0.kill_and_log().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Kills the process, which must still be running, and returns its stderr.
    pub fn kill_running(self) -> String {
        self.0.kill_running().unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// `prefix` (e.g. `ip netns exec A`) + livemig + args, stdout and stderr piped.
pub fn spawn(prefix: &[&str], args: &[&str]) -> Proc {
    let mut cmd = if let Some((first, rest)) = prefix.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(bin());
        c
    } else {
        Command::new(bin())
    };
    // The shared key, unless the test chose its own or none.
    if !args
        .iter()
        .any(|a| *a == "--no-auth" || *a == "--key-file" || *a == "--cert")
    {
        cmd.env("LIVEMIG_KEY", TEST_KEY);
    }
    let child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc(Process::new(child))
}

/// Starts a VM process; returns it once its control socket answers.
pub fn run_vm(prefix: &[&str], socket: &Path, args: &[&str]) -> Proc {
    let mut all = vec!["run-vm", "--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut p = spawn(prefix, &all);
    p.wait_line("VM running");
    p
}

/// Starts a destination; returns it and the address it listens on.
pub fn receive(prefix: &[&str], listen: &str, args: &[&str]) -> (Proc, String) {
    let mut all = vec!["receive", "--listen", listen, "--json"];
    all.extend_from_slice(args);
    let mut p = spawn(prefix, &all);
    let line = p.wait_line("listening on ");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (p, addr)
}

/// How long [`request`] waits for an answer: a VM process answers in milliseconds, so one
/// that does not in a minute is hung (its test fails saying so, rather than hanging).
pub const REQUEST_LIMIT: Duration = Duration::from_secs(60);

/// One request on a control socket; panics, saying which, if the VM process does not answer.
pub fn request(socket: &Path, req: &str) -> Value {
    let at = socket.display();
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("{req} to {at}: {e}"));
    s.set_read_timeout(Some(REQUEST_LIMIT)).unwrap();
    writeln!(s, "{req}").unwrap_or_else(|e| panic!("{req} to {at}: {e}"));
    let mut line = String::new();
    if let Err(e) = BufReader::new(s).read_line(&mut line) {
        panic!("{req} to {at}: no answer within {REQUEST_LIMIT:?} ({e}); got {line:?}");
    }
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{req} to {at}: answer {line:?}: {e}"))
}

pub fn counter(socket: &Path) -> u64 {
    request(socket, r#"{"cmd":"status"}"#)["guest_counter"]
        .as_u64()
        .unwrap()
}

/// Waits (bounded) until the guest counter behind `socket` moves past `after`.
pub fn wait_counter_beyond(socket: &Path, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A destination answers `{"phase":"incoming"}`, without a counter, until it serves
        // the VM it resumed — a moment after it told the source so.
        let st = request(socket, r#"{"cmd":"status"}"#);
        if let Some(c) = st["guest_counter"].as_u64().filter(|&c| c > after) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "guest counter not past {after} after 20 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `livemig migrate --json`; returns the process output.
pub fn migrate(prefix: &[&str], socket: &Path, to: &str, args: &[&str]) -> Output {
    let mut cmd = if let Some((first, rest)) = prefix.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(bin());
        c
    } else {
        Command::new(bin())
    };
    cmd.args([
        "migrate",
        "--json",
        "--vm",
        socket.to_str().unwrap(),
        "--to",
        to,
    ])
    .args(args);
    output_within(cmd, MIGRATE_LIMIT)
}

/// How long a test waits for `livemig migrate` to end: far beyond any migration the tests run
/// (the slowest, a Linux guest inside the nested VM, takes about 10 s), so that one that hung
/// fails its test with what the command printed instead of holding the run for ever.
pub const MIGRATE_LIMIT: Duration = Duration::from_secs(600);

/// `cmd`'s output, like `Command::output`, waiting at most `limit`: then the process is killed
/// (its status says so, by signal) and its stderr ends with a line saying why.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both pipes are drained while it runs (a full pipe would stop it).
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let mut killed = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            killed = true;
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap();
    let mut stderr = err.join().unwrap();
    if killed {
        stderr.extend_from_slice(
            format!("\n(killed by the test: it had not ended after {limit:?})\n").as_bytes(),
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Runs a migration that must succeed and returns its report.
pub fn migrate_ok(prefix: &[&str], socket: &Path, to: &str, args: &[&str]) -> Value {
    report_ok(&migrate(prefix, socket, to, args))
}

/// The report of a `migrate --json` that must have succeeded.
pub fn report_ok(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {stdout}\n{stderr}");
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["digest_match"], true, "{report}");
    assert_eq!(report["source_digest"], report["destination_digest"]);
    report
}

/// Asserts a failed process ended with a clear error and no panic.
pub fn assert_clean_error(code: Option<i32>, stderr: &str, needle: &str) {
    assert_eq!(code, Some(1), "expected a clean failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.contains("error"), "no error message: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "error does not mention {needle:?}: {stderr}"
    );
}

/// Two emulated hosts named after `tag` (namespaces joined by a veth link shaped to
/// `profile`), deleted on drop.
pub fn hosts(tag: &str, profile: &str) -> NetnsHosts {
    NetnsHosts::up(&format!("lm{tag}{}", std::process::id() % 10_000), profile)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Where a [`Proxy`] cuts a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// When the source sends a control frame of this kind (before it is forwarded).
    SourceFrame(u16),
    /// When the destination sends a control frame of this kind (before it is forwarded).
    DestinationFrame(u16),
    /// When more than this many bytes went source → destination on data channels.
    DataBytes(u64),
    /// A man in the middle: flips one bit of the first control frame of this kind the source
    /// sends (its last payload byte, or its kind when it has none) and forwards everything.
    FlipSourceFrame(u16),
    /// A man in the middle: flips one bit of the source → destination data byte at this
    /// offset (data channels counted together) and forwards everything.
    FlipData(u64),
    /// A passive listener: forwards everything and keeps a copy in [`Proxy::captured`].
    Capture,
}

/// Control frame kinds.
pub mod kind {
    use livemig_engine::protocol::MessageType;
    pub const HELLO: u16 = MessageType::Hello as u16;
    pub const CONFIG: u16 = MessageType::Config as u16;
    pub const DEVICE_STATE: u16 = MessageType::DeviceState as u16;
    pub const PREPARED: u16 = MessageType::Prepared as u16;
    pub const COMMIT: u16 = MessageType::Commit as u16;
    pub const RESUMED: u16 = MessageType::Resumed as u16;
    pub const AUTH: u16 = MessageType::Auth as u16;
}

/// A TCP proxy in front of a destination that fires once at a trigger: it calls the action
/// (e.g. kill a process) and cuts every connection of the session.
pub struct Proxy {
    pub addr: String,
    /// The trigger fired (a cut, or a bit flipped).
    pub fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Every byte forwarded, both ways ([`Trigger::Capture`]).
    pub captured: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Proxy {
    pub fn start(upstream: &str, trigger: Trigger, action: Box<dyn FnOnce() + Send>) -> Proxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let upstream = upstream.to_string();
        let fired = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let action = Arc::new(Mutex::new(Some(action)));
        let data = Arc::new(AtomicU64::new(0));
        let captured: Arc<Mutex<Vec<u8>>> = Arc::default();
        let cap = captured.clone();
        let f2 = fired.clone();
        std::thread::spawn(move || {
            let fire = {
                let conns = conns.clone();
                let fired = f2.clone();
                let action = action.clone();
                move || {
                    if !fired.swap(true, Ordering::SeqCst) {
                        if let Some(a) = action.lock().unwrap().take() {
                            a();
                        }
                        // Shut down and close: once every copy is gone, whatever the peers
                        // still send is answered with a reset, as from a vanished host.
                        for c in conns.lock().unwrap().drain(..) {
                            let _ = c.shutdown(Shutdown::Both);
                        }
                    }
                }
            };
            for (n, down) in l.incoming().enumerate() {
                let Ok(down) = down else { continue };
                if f2.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                conns.lock().unwrap().push(down.try_clone().unwrap());
                conns.lock().unwrap().push(up.try_clone().unwrap());
                let control = n == 0;
                for (from, to, src_side) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap(), true),
                    (up.try_clone().unwrap(), down.try_clone().unwrap(), false),
                ] {
                    let fire = fire.clone();
                    let data = data.clone();
                    let seen = Seen {
                        fired: f2.clone(),
                        captured: cap.clone(),
                    };
                    std::thread::spawn(move || {
                        pump(from, to, control, src_side, trigger, &data, &fire, &seen)
                    });
                }
            }
        });
        Proxy {
            addr,
            fired,
            captured,
        }
    }
}

/// What a pump records: a tampering trigger that fired, and the bytes it forwarded.
struct Seen {
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    captured: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Seen {
    /// Whether this is the first tampering (which then happens).
    fn first(&self) -> bool {
        !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    fn keep(&self, trigger: Trigger, bytes: &[u8]) {
        if trigger == Trigger::Capture {
            self.captured.lock().unwrap().extend_from_slice(bytes);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    control: bool,
    src_side: bool,
    trigger: Trigger,
    data: &std::sync::atomic::AtomicU64,
    fire: &dyn Fn(),
    seen: &Seen,
) {
    use std::sync::atomic::Ordering;
    if control {
        // Forward frame by frame so a trigger can stop a frame before it is delivered.
        loop {
            let mut hdr = [0u8; 8];
            if from.read_exact(&mut hdr).is_err() {
                break;
            }
            let k = u16::from_le_bytes([hdr[0], hdr[1]]);
            let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
            let mut body = vec![0u8; len.min(64 << 20)];
            if from.read_exact(&mut body).is_err() {
                break;
            }
            let hit = match trigger {
                Trigger::SourceFrame(t) => src_side && t == k,
                Trigger::DestinationFrame(t) => !src_side && t == k,
                _ => false,
            };
            if hit {
                fire();
                break;
            }
            if trigger == Trigger::FlipSourceFrame(k) && src_side && seen.first() {
                match body.last_mut() {
                    Some(b) => *b ^= 0x01,
                    None => hdr[0] ^= 0x01,
                }
            }
            seen.keep(trigger, &hdr);
            seen.keep(trigger, &body);
            if to
                .write_all(&hdr)
                .and_then(|()| to.write_all(&body))
                .is_err()
            {
                break;
            }
        }
    } else {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if src_side {
                let total = data.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if let Trigger::DataBytes(limit) = trigger {
                    if total > limit {
                        fire();
                        break;
                    }
                }
                if let Trigger::FlipData(at) = trigger {
                    let before = total - n as u64;
                    if (before..total).contains(&at) && seen.first() {
                        buf[(at - before) as usize] ^= 0x10;
                    }
                }
            }
            seen.keep(trigger, &buf[..n]);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// `migrate` options of a migration that never ends on its own (it runs until cancelled or
/// cut): no downtime budget, no stall rule, no throttle, rounds without end.
pub const ENDLESS: &[&str] = &[
    "--downtime-limit",
    "0",
    "--max-rounds",
    "1000000",
    "--stall-rounds",
    "0",
    "--no-auto-converge",
];

/// The 2 MiB hugetlb pool grown by `pages` for a test, shrunk back on drop.
pub struct HugePool {
    before: u64,
}

/// The 2 MiB pool's sysfs folder.
pub const POOL_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// A counter of the 2 MiB pool (`nr_hugepages`, `free_hugepages`, ...).
pub fn pool_value(name: &str) -> u64 {
    std::fs::read_to_string(format!("{POOL_2M}/{name}"))
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

impl HugePool {
    /// Grows the pool by `pages` (root); panics if the kernel cannot.
    pub fn grow(pages: u64) -> HugePool {
        let before = pool_value("nr_hugepages");
        std::fs::write(
            format!("{POOL_2M}/nr_hugepages"),
            (before + pages).to_string(),
        )
        .expect("growing the 2M hugetlb pool (needs root)");
        assert!(
            pool_value("free_hugepages") >= pages,
            "the kernel gave only {} free 2M pages",
            pool_value("free_hugepages")
        );
        HugePool { before }
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{POOL_2M}/nr_hugepages"), self.before.to_string());
    }
}

/// The CPU features a VM started here with `args` is given (`livemig cpu --json`).
pub fn cpu_features(args: &[&str]) -> Vec<String> {
    let out = Command::new(bin())
        .args(["cpu", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

/// A CPU feature the host model gives and the baseline does not (avx2 where there is one).
pub fn beyond_baseline() -> String {
    let host = cpu_features(&[]);
    let baseline = cpu_features(&["--cpu-model", "baseline"]);
    assert!(
        baseline.iter().all(|f| host.contains(f)),
        "baseline {baseline:?} is not a subset of host {host:?}"
    );
    let extra: Vec<&String> = host.iter().filter(|f| !baseline.contains(f)).collect();
    extra
        .iter()
        .find(|f| f.as_str() == "avx2")
        .or(extra.first())
        .expect("the host model offers nothing beyond the baseline")
        .to_string()
}
