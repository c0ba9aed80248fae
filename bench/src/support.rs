//! Test and benchmark support, defined once: a kill-on-drop child process, two emulated
//! hosts (network namespaces joined by a possibly shaped veth link), the KVM probe, a fresh
//! migration key. The end-to-end tests and the bench harness both use these.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `scripts/netns-link.sh` of this repository.
pub const NETNS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/netns-link.sh");

/// How long [`Process::wait_line`] and [`Process::read_line`] wait: far beyond any healthy VM
/// boot or migration here (a Linux guest boots in about 20 s inside the nested VM), so that a
/// process that hung fails its caller with an error instead of holding it (and a whole test
/// run) for ever.
pub const LINE_LIMIT: Duration = Duration::from_secs(600);

/// A child process, killed (and reaped) when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its stdout, when piped.
    pub stdout: Option<BufReader<ChildStdout>>,
    /// The start of a line a read that timed out had taken (the next read goes on from it).
    partial: Vec<u8>,
}

impl Process {
    /// Takes ownership of `child` (its stdout, if piped, is read through [`Process::wait_line`]).
    pub fn new(mut child: Child) -> Process {
        let stdout = child.stdout.take().map(BufReader::new);
        Process {
            child,
            stdout,
            partial: Vec::new(),
        }
    }

    /// Reads stdout lines until one contains `needle` (waiting at most [`LINE_LIMIT`]);
    /// returns it, trimmed.
    pub fn wait_line(&mut self, needle: &str) -> Result<String> {
        self.wait_line_within(needle, LINE_LIMIT)
    }

    /// [`Process::wait_line`], waiting at most `limit` in all.
    pub fn wait_line_within(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.next_line(left)? else {
                bail!("the process exited before printing {needle:?}");
            };
            if line.contains(needle) {
                return Ok(line.trim().to_string());
            }
        }
    }

    /// Reads one stdout line (empty at the end of its output), waiting at most
    /// [`LINE_LIMIT`].
    pub fn read_line(&mut self) -> Result<String> {
        self.read_line_within(LINE_LIMIT)
    }

    /// [`Process::read_line`], waiting at most `limit`.
    pub fn read_line_within(&mut self, limit: Duration) -> Result<String> {
        Ok(self.next_line(limit)?.unwrap_or_default())
    }

    /// The next stdout line, newline included (the last one may lack it); `None` at the end
    /// of the output; an error once `limit` has passed with no whole line, the process still
    /// running (a hung process fails its caller instead of holding it for ever).
    fn next_line(&mut self, limit: Duration) -> Result<Option<String>> {
        let out = self.stdout.as_mut().context("stdout is not piped")?;
        let deadline = Instant::now() + limit;
        let mut line = std::mem::take(&mut self.partial);
        loop {
            // What the reader holds already, up to a newline...
            let held = out.buffer();
            if let Some(i) = held.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&held[..=i]);
                out.consume(i + 1);
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            let n = held.len();
            line.extend_from_slice(held);
            out.consume(n);
            // ...then the pipe, once it has something (the reader is empty: `fill_buf` reads).
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let so_far = if line.is_empty() {
                    String::new()
                } else {
                    format!("; it printed {:?} so far", String::from_utf8_lossy(&line))
                };
                self.partial = line;
                bail!(
                    "no whole line on its stdout within {limit:?} (the process still runs{so_far})"
                );
            }
            let mut pfd = libc::pollfd {
                fd: out.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one pollfd, valid for the call.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("poll on the process's stdout");
                }
                continue;
            }
            if pfd.revents == 0 {
                continue;
            }
            if out.fill_buf()?.is_empty() {
                return Ok((!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned()));
            }
        }
    }

    /// Waits for the exit (at most `limit`); returns its status code and its stderr.
    pub fn wait_exit(mut self, limit: Duration) -> Result<(Option<i32>, String)> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Ok((st.code(), err));
            }
            if Instant::now() >= deadline {
                bail!("the process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process if it still runs, and returns its stderr (for a failure's report).
    pub fn kill_and_log(&mut self) -> Result<String> {
        // A process that had ended already says how (an exit code, or the signal that killed it).
        let ended = self.child.try_wait()?;
        let _ = self.child.kill();
        self.child.wait()?;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let mut out = String::new();
        if let Some(o) = self.stdout.as_mut() {
            let _ = o.read_to_string(&mut out);
        }
        if !out.trim().is_empty() {
            err.push_str(&format!(
                "\n(its stdout, unread until now:)\n{}",
                out.trim_end()
            ));
        }
        if let Some(st) = ended {
            err.push_str(&format!("\n(the process had ended on its own: {st})"));
        }
        Ok(err)
    }

    /// Kills the process, which must still be running, and returns its stderr.
    pub fn kill_running(mut self) -> Result<String> {
        if let Some(st) = self.child.try_wait()? {
            bail!("the process had exited already ({st})");
        }
        self.child.kill()?;
        self.child.wait()?;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        Ok(err)
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two emulated hosts: network namespaces joined by a veth pair, optionally shaped, made by
/// `scripts/netns-link.sh` and deleted on drop.
pub struct NetnsHosts {
    /// The pair's name.
    pub name: String,
    /// Namespace of host A.
    pub ns_a: String,
    /// Namespace of host B.
    pub ns_b: String,
    /// Host A's address.
    pub addr_a: String,
    /// Host B's address.
    pub addr_b: String,
    /// Host B's end of the link.
    pub dev_b: String,
}

impl NetnsHosts {
    /// Makes the pair `name` (at most 10 characters) with link `profile`: `none`, `1gbit`,
    /// `10gbit` or a tc rate. Needs root and iproute2.
    pub fn up(name: &str, profile: &str) -> Result<NetnsHosts> {
        let out = Command::new(NETNS_SCRIPT)
            .args(["up", name, profile])
            .output()
            .with_context(|| {
                format!("running {NETNS_SCRIPT} (emulated hosts need the repository's scripts and root)")
            })?;
        if !out.status.success() {
            bail!(
                "netns-link.sh failed (needs root and iproute2): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
                .with_context(|| format!("netns-link.sh printed no {k}: {text}"))
        };
        Ok(NetnsHosts {
            ns_a: field("NS_A")?,
            ns_b: field("NS_B")?,
            addr_a: field("A")?,
            addr_b: field("B")?,
            dev_b: field("DEV_B")?,
            name: name.to_string(),
        })
    }

    /// `ip netns exec NS`: the prefix that runs a program in namespace `ns`.
    pub fn exec(ns: &str) -> Vec<&str> {
        vec!["ip", "netns", "exec", ns]
    }

    /// Bytes received by host B's end of the link.
    pub fn rx_bytes_b(&self) -> u64 {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns_b,
                "cat",
                &format!("/sys/class/net/{}/statistics/rx_bytes", self.dev_b),
            ])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = Command::new(NETNS_SCRIPT)
            .args(["down", &self.name])
            .output();
    }
}

/// `program` run in namespace `ns` (or here).
pub fn command_in(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Writes the page cache's dirty data back (sync(2)), so that what an earlier build or cell
/// left to write does not land in a migration's measured time: the destination syncs its
/// decision record inside the downtime, and a busy disk made that one data sync take
/// 140 ms right after a build (it takes ~0.5 ms on an idle one).
pub fn sync_disks() {
    // SAFETY: sync(2) has no memory effects.
    unsafe { libc::sync() };
}

/// Whether /dev/kvm can be opened for reading and writing.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Writes a fresh migration key readable by the owner only into `dir`.
pub fn write_key(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("migration.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .context("writing a migration key")?;
    std::io::Write::write_all(&mut f, livemig_engine::auth::Key::generate().as_bytes())?;
    Ok(path)
}

/// A throwaway CA and certificates for a pair on this machine, in `dir`: `destination.pem`
/// (for 127.0.0.1 and localhost), `source.pem`, their keys and `ca.pem`. Returns `dir`.
pub fn write_certs(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let hosts = [
        vec!["127.0.0.1".to_string(), "localhost".into()],
        vec!["source".to_string()],
    ];
    let (ca, certs) = livemig_engine::tls::throwaway_ca(&hosts)
        .map_err(|e| anyhow::anyhow!("making certificates: {e}"))?;
    let write = |name: &str, text: &str| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(name))
            .with_context(|| format!("writing {name}"))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        Ok(())
    };
    write("ca.pem", &ca)?;
    for (who, (cert, key)) in ["destination", "source"].iter().zip(&certs) {
        write(&format!("{who}.pem"), cert)?;
        write(&format!("{who}-key.pem"), key)?;
    }
    Ok(dir.to_path_buf())
}

/// A TCP port free on loopback right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `cmd` is on the PATH.
pub fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a thread named `comm` runs a guest: livemig's `vcpuN`, QEMU's `CPU N/TCG` or
/// `CPU N/KVM`.
fn is_vcpu_thread(comm: &str) -> bool {
    comm.starts_with("CPU ")
        || comm
            .strip_prefix("vcpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// utime + stime of `/proc/.../stat` (a process or one thread), in clock ticks.
fn stat_ticks(path: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which may hold spaces: state is the first.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The guest's threads of process `pid` by id, with their CPU ticks so far.
pub(crate) fn vcpu_ticks(pid: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
        is_vcpu_thread(comm.trim())
            .then(|| Some((tid, stat_ticks(&format!("/proc/{pid}/task/{tid}/stat"))?)))
            .flatten()
    })
    .collect()
}

/// One process under a [`CpuWatch`].
struct Watched {
    pid: u32,
    start: Option<u64>,
    last: Option<u64>,
    /// vCPU threads: ticks when first seen (0 for a thread born after the start) and last seen.
    vcpus: BTreeMap<u32, (u64, u64)>,
}

impl Watched {
    fn sample(&mut self, first: bool) {
        if let Some(t) = stat_ticks(&format!("/proc/{}/stat", self.pid)) {
            self.last = Some(t);
        }
        for (tid, t) in vcpu_ticks(self.pid) {
            let e = self
                .vcpus
                .entry(tid)
                .or_insert((if first { t } else { 0 }, t));
            e.1 = t;
        }
    }

    fn seconds(&self) -> CpuSeconds {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let guest: u64 = self.vcpus.values().map(|(a, b)| b.saturating_sub(*a)).sum();
        let whole = self.last.zip(self.start).map(|(l, s)| l.saturating_sub(s));
        CpuSeconds {
            outside: whole.map(|w| w.saturating_sub(guest) as f64 / hz),
            guest: whole.map(|_| guest as f64 / hz),
        }
    }
}

/// CPU seconds one watched process spent during a [`CpuWatch`] (None: it could not be read).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSeconds {
    /// Outside its vCPU threads: the migration's own work (and the VMM's).
    pub outside: Option<f64>,
    /// In its vCPU threads: the guest running, with what its hypervisor does on its behalf
    /// (exits, the faults of dirty logging under KVM; TCG's translation and its own dirty
    /// tracking under QEMU's emulator).
    pub guest: Option<f64>,
}

/// CPU time processes spend outside their guest's vCPU threads while they migrate, measured
/// the same way for livemig and QEMU: the process's CPU time (`/proc/PID/stat`, which keeps
/// the time of threads that ended) from [`CpuWatch::start`] to [`CpuWatch::finish`], less
/// the time of its vCPU threads over the same span. A sampler reads the vCPU threads every
/// 10 ms, so a vCPU thread that ends meanwhile (livemig's source stops its guest once the
/// destination runs it) is subtracted as last seen. Resolution: one clock tick (10 ms).
pub struct CpuWatch {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Watched>>>,
}

impl CpuWatch {
    /// Starts watching `pids`.
    pub fn start(pids: &[u32]) -> CpuWatch {
        let mut watched: Vec<Watched> = pids
            .iter()
            .map(|&pid| Watched {
                pid,
                start: None,
                last: None,
                vcpus: BTreeMap::new(),
            })
            .collect();
        for w in &mut watched {
            w.sample(true);
            w.start = w.last;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                for w in &mut watched {
                    w.sample(false);
                }
            }
            for w in &mut watched {
                w.sample(false);
            }
            watched
        });
        CpuWatch {
            stop,
            handle: Some(handle),
        }
    }

    /// Seconds of CPU outside and inside the vCPU threads, per pid in the order given.
    pub fn finish(mut self) -> Vec<CpuSeconds> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .map(|w| w.iter().map(Watched::seconds).collect())
            .unwrap_or_default()
    }
}

impl Drop for CpuWatch {
    /// A watch given up (its migration failed) stops its sampler.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Process {
        let child = Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Process::new(child)
    }

    #[test]
    fn a_line_that_does_not_come_in_time_is_an_error_and_nothing_read_is_lost() {
        let mut p = sh("printf 'one\\ntw'; sleep 1; printf 'o\\nthree'");
        assert_eq!(p.read_line_within(Duration::from_secs(5)).unwrap(), "one\n");
        let err = p
            .read_line_within(Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("within") && err.contains("\"tw\""), "{err}");
        assert_eq!(p.read_line_within(Duration::from_secs(5)).unwrap(), "two\n");
        // The last line lacks its newline; then the end of the output.
        assert_eq!(p.read_line().unwrap(), "three");
        assert_eq!(p.read_line().unwrap(), "");
    }

    #[test]
    fn wait_line_skips_to_its_needle_and_gives_up_at_its_limit_or_the_end() {
        let mut p = sh("echo booting; echo 'VM running'; sleep 2; echo late");
        assert_eq!(
            p.wait_line_within("running", Duration::from_secs(5))
                .unwrap(),
            "VM running"
        );
        // ("late" comes 2 s on: an error, not that line, is the limit at work.)
        let err = p
            .wait_line_within("late", Duration::from_millis(300))
            .unwrap_err();
        assert!(err.to_string().contains("within"), "{err}");
        let err = p
            .wait_line_within("never", Duration::from_secs(10))
            .unwrap_err();
        assert!(err.to_string().contains("exited before"), "{err}");
    }
}
