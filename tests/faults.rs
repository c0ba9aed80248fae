//! The fault matrix: cut the link or kill a process at every phase of a migration and check
//! the outcome DESIGN §5 promises, with guest-counter and RAM-digest checks. Prints a table.

mod common;

use std::time::Duration;

use common::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Cut,
    KillDestination,
    KillSource,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Failure before commit: the guest runs on the source, RAM intact; nothing runs on the
    /// destination.
    SourceRuns,
    /// Commit was sent, its fate unknown to the source: the source stays paused.
    OutcomeUnknown { destination_runs: bool },
    /// The source died before commit: the destination discards its copy.
    DestinationDiscards,
    /// The source died after commit: the guest runs on the destination.
    DestinationRuns,
}

struct Case {
    phase: &'static str,
    fault: Fault,
    trigger: Trigger,
    forced_rounds: bool,
    expect: Expect,
    /// The VM has a disk copied to the destination (`None`: no disk), mirrored from the
    /// start (`Some(true)`) or not.
    disk: Option<bool>,
}

const RAM_MIB: u64 = 64;
/// Allocated blocks of the disk of disk cases.
const DISK_MIB: u64 = 64;

fn cases() -> Vec<Case> {
    use Expect::*;
    use Fault::*;
    use Trigger::*;
    // Past round 0: the guest writes in bursts (a batch of pages every few ms), so a later
    // round's data can be small; 64 KiB past the RAM is certainly a later round.
    let later = DataBytes((RAM_MIB << 20) + (64 << 10));
    let c = |phase, fault, trigger, forced_rounds, expect| Case {
        phase,
        fault,
        trigger,
        forced_rounds,
        expect,
        disk: None,
    };
    let d = |phase, fault, trigger, mirror| Case {
        phase,
        fault,
        trigger,
        forced_rounds: mirror,
        expect: if fault == KillSource {
            DestinationDiscards
        } else {
            SourceRuns
        },
        disk: Some(mirror),
    };
    // Disk blocks and pages travel side by side: 32 MiB in, both are being copied; past
    // both (and the first mirrored writes), active mirroring is on.
    let bulk = DataBytes(32 << 20);
    let mirroring = DataBytes(((RAM_MIB + DISK_MIB) << 20) + (8 << 20));
    vec![
        d("disk: bulk copy", Cut, bulk, false),
        d("disk: bulk copy", KillDestination, bulk, false),
        d("disk: active mirroring", Cut, mirroring, true),
        d("disk: active mirroring", KillDestination, mirroring, true),
        d("disk: bulk copy", KillSource, bulk, false),
        c(
            "handshake",
            Cut,
            SourceFrame(kind::HELLO),
            false,
            SourceRuns,
        ),
        c(
            "authentication",
            Cut,
            SourceFrame(kind::AUTH),
            false,
            SourceRuns,
        ),
        c(
            "configuration",
            Cut,
            SourceFrame(kind::CONFIG),
            false,
            SourceRuns,
        ),
        c("first round", Cut, DataBytes(4 << 20), false, SourceRuns),
        c("later round", Cut, later, true, SourceRuns),
        c(
            "stop-and-copy (device state)",
            Cut,
            SourceFrame(kind::DEVICE_STATE),
            false,
            SourceRuns,
        ),
        c(
            "prepared, before commit",
            Cut,
            DestinationFrame(kind::PREPARED),
            false,
            SourceRuns,
        ),
        c(
            "commit",
            Cut,
            SourceFrame(kind::COMMIT),
            false,
            OutcomeUnknown {
                destination_runs: false,
            },
        ),
        c(
            "after commit",
            Cut,
            DestinationFrame(kind::RESUMED),
            false,
            OutcomeUnknown {
                destination_runs: true,
            },
        ),
        c(
            "handshake",
            KillDestination,
            SourceFrame(kind::HELLO),
            false,
            SourceRuns,
        ),
        c(
            "first round",
            KillDestination,
            DataBytes(4 << 20),
            false,
            SourceRuns,
        ),
        c("later round", KillDestination, later, true, SourceRuns),
        c(
            "stop-and-copy (device state)",
            KillDestination,
            SourceFrame(kind::DEVICE_STATE),
            false,
            SourceRuns,
        ),
        c(
            "commit",
            KillDestination,
            SourceFrame(kind::COMMIT),
            false,
            OutcomeUnknown {
                destination_runs: false,
            },
        ),
        c(
            "first round",
            KillSource,
            DataBytes(4 << 20),
            false,
            DestinationDiscards,
        ),
        c(
            "stop-and-copy (device state)",
            KillSource,
            SourceFrame(kind::DEVICE_STATE),
            false,
            DestinationDiscards,
        ),
        c(
            "after commit",
            KillSource,
            DestinationFrame(kind::RESUMED),
            false,
            DestinationRuns,
        ),
    ]
}

fn kill(pid: u32) {
    // SAFETY: kill(2) with a pid of a child this test started; no memory effects.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Whether the guest counter behind `socket` stays put for a while (paused).
/// `livemig resolve` with the destination's `record`; the VM must end in `phase`.
fn resolve(src: &std::path::Path, record: &std::path::Path, phase: &str) -> Result<(), String> {
    let out = std::process::Command::new(bin())
        .args(["resolve", "--vm", src.to_str().unwrap(), "--record"])
        .arg(record)
        .output()
        .unwrap();
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("resolve failed: {text}"));
    }
    let st = request(src, r#"{"cmd":"status"}"#);
    if st["phase"] != phase {
        return Err(format!(
            "after resolve the source is {st}, not {phase}: {text}"
        ));
    }
    Ok(())
}

fn counter_frozen(socket: &std::path::Path) -> bool {
    let a = counter(socket);
    std::thread::sleep(Duration::from_millis(150));
    counter(socket) == a
}

/// A sparse image with `DISK_MIB` of random blocks.
fn disk_image(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len((4 * DISK_MIB) << 20).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..DISK_MIB {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
}

/// What a disk case leaves: no file in the destination's directory, the source image there.
fn disk_outcome(copies: &std::path::Path, image: &std::path::Path) -> Result<(), String> {
    // The destination may still be exiting.
    std::thread::sleep(Duration::from_millis(300));
    let left: Vec<_> = std::fs::read_dir(copies)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    if !left.is_empty() {
        return Err(format!("partial images left on the destination: {left:?}"));
    }
    let len = std::fs::metadata(image).map(|m| m.len()).unwrap_or(0);
    if len != (4 * DISK_MIB) << 20 {
        return Err(format!(
            "the source image is gone or changed size ({len} bytes)"
        ));
    }
    Ok(())
}

fn run_case(i: usize, case: &Case) -> Result<String, String> {
    let dir = tmpdir(&format!("fault{i}"));
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let image = dir.join("disk.img");
    let copies = dir.join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    let (rx, dst_addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
    let mut vm_args = vec![
        "--memory".to_string(),
        RAM_MIB.to_string(),
        "--working-set".into(),
        "16".into(),
        "--dirty-rate".into(),
        "2000".into(),
        "--fill".into(),
        "random".into(),
    ];
    if case.disk.is_some() {
        disk_image(&image);
        vm_args.extend([
            "--disk".to_string(),
            image.display().to_string(),
            "--disk-write-rate".into(),
            "20".into(),
            "--disk-write-span".into(),
            "32".into(),
        ]);
    }
    let vm_args: Vec<&str> = vm_args.iter().map(String::as_str).collect();
    let mut vm = run_vm(&[], &src, &vm_args);
    let before = wait_counter_beyond(&src, 0);
    let (rx_pid, vm_pid) = (rx.child.id(), vm.child.id());
    let action: Box<dyn FnOnce() + Send> = match case.fault {
        Fault::Cut => Box::new(|| {}),
        Fault::KillDestination => Box::new(move || kill(rx_pid)),
        Fault::KillSource => Box::new(move || kill(vm_pid)),
    };
    let proxy = Proxy::start(&dst_addr, case.trigger, action);
    let mut args = vec!["--compress", "none"];
    let copy_args = [
        "--storage",
        "copy",
        "--storage-dir",
        copies.to_str().unwrap(),
    ];
    if let Some(mirror) = case.disk {
        args.extend_from_slice(&copy_args);
        if mirror {
            args.push("--active-mirror");
        }
    }
    if case.forced_rounds {
        // Never converges on its own: rounds go on (empty ones take well under a millisecond)
        // until the guest's next burst of writes crosses the trigger.
        args.extend_from_slice(ENDLESS);
    }
    let out = migrate(&[], &src, &proxy.addr, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !proxy.fired.load(std::sync::atomic::Ordering::SeqCst) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        return Err(format!(
            "the fault never fired (migrate: {stderr} {stdout})"
        ));
    }
    if out.status.success() {
        return Err("the migration succeeded despite the fault".into());
    }
    if stderr.contains("panicked") {
        return Err(format!("panic: {stderr}"));
    }
    let dest_exit = |rx: Proc| -> Result<(), String> {
        let (code, err) = rx.wait_exit(Duration::from_secs(60));
        if code == Some(0) || err.contains("panicked") {
            return Err(format!(
                "destination should discard and fail cleanly: {code:?} {err}"
            ));
        }
        Ok(())
    };
    match case.expect {
        Expect::SourceRuns => {
            let st = request(&src, r#"{"cmd":"status"}"#);
            if st["phase"] != "running" || st["run_state"] != "running" {
                return Err(format!("source not running: {st}"));
            }
            wait_counter_beyond(&src, before);
            let greeting = matches!(
                case.trigger,
                Trigger::SourceFrame(kind::HELLO) | Trigger::SourceFrame(kind::AUTH)
            );
            match (case.fault, greeting) {
                (Fault::KillDestination, _) => {}
                (_, true) => {
                    // A source lost before it proved the key is a stranger: the destination
                    // logs it and goes on waiting.
                    std::thread::sleep(Duration::from_millis(300));
                    let err = rx.kill_running();
                    if !err.contains("refused a connection") || err.contains("panicked") {
                        return Err(format!("destination should log and wait: {err}"));
                    }
                }
                _ => dest_exit(rx)?,
            }
            if case.disk.is_some() {
                disk_outcome(&copies, &image)?;
            }
            // RAM (and disk) intact: a clean migration to a fresh destination verifies every
            // byte.
            let dst2 = dir.join("dst2.sock");
            let (_rx2, addr2) = receive(&[], "127.0.0.1:0", &["--socket", dst2.to_str().unwrap()]);
            let copies2 = dir.join("copies2");
            std::fs::create_dir_all(&copies2).unwrap();
            let retry: Vec<&str> = if case.disk.is_some() {
                vec![
                    "--storage",
                    "copy",
                    "--storage-dir",
                    copies2.to_str().unwrap(),
                ]
            } else {
                Vec::new()
            };
            let report = migrate_ok(&[], &src, &addr2, &retry);
            if case.disk.is_some()
                && report["storage"]["disks"][0]["source_digest"]
                    != report["storage"]["disks"][0]["destination_digest"]
            {
                return Err(format!("retry: disk digests differ: {report}"));
            }
            let c = counter(&dst2);
            wait_counter_beyond(&dst2, c);
            request(&dst2, r#"{"cmd":"stop"}"#);
            Ok(format!(
                "source kept running (counter {before} -> {c}); retry digest {}",
                report["destination_digest"].as_str().unwrap_or("?")
            ))
        }
        Expect::OutcomeUnknown { destination_runs } => {
            if !stderr.contains("outcome unknown") {
                return Err(format!("source did not report outcome unknown: {stderr}"));
            }
            let st = request(&src, r#"{"cmd":"status"}"#);
            if st["phase"] != "outcome-unknown" || !counter_frozen(&src) {
                return Err(format!("source should stay paused: {st}"));
            }
            // The destination's record of its decision settles it (`livemig resolve`).
            let id = stderr
                .split("destination's record ")
                .nth(1)
                .and_then(|r| r.split(".json").next())
                .ok_or_else(|| format!("no migration id in: {stderr}"))?;
            let record = dir.join(format!("{id}.json"));
            if destination_runs {
                let c = counter(&dst);
                wait_counter_beyond(&dst, c);
                resolve(&src, &record, "migrated")?;
                request(&dst, r#"{"cmd":"stop"}"#);
                Ok(
                    "source paused (outcome unknown); guest runs on the destination; resolve \
                    stopped the source"
                        .into(),
                )
            } else if case.fault == Fault::Cut {
                dest_exit(rx)?;
                // Another migration's record settles nothing.
                let other = dir.join("other.json");
                let text = std::fs::read_to_string(&record).map_err(|e| e.to_string())?;
                std::fs::write(&other, text.replace(id, "0123456789abcdef")).unwrap();
                if resolve(&src, &other, "running")
                    .err()
                    .is_none_or(|e| !e.contains("the record is about migration 0123456789abcdef"))
                {
                    return Err("another migration's record was taken".into());
                }
                resolve(&src, &record, "running")?;
                let c = counter(&src);
                wait_counter_beyond(&src, c);
                Ok(
                    "source paused (outcome unknown); destination discarded; resolve resumed \
                    the source"
                        .into(),
                )
            } else {
                // A killed destination left only its pending record (written ahead): nothing
                // proves its copy is gone, so the source stays paused and resolve says why.
                let out = std::process::Command::new(bin())
                    .args(["resolve", "--vm", src.to_str().unwrap(), "--record"])
                    .arg(&record)
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() || !err.contains("had not decided yet (pending)") {
                    return Err(format!("resolve with a pending record: {err}"));
                }
                Ok(
                    "source paused (outcome unknown); destination killed before deciding; \
                    resolve refuses to guess"
                        .into(),
                )
            }
        }
        Expect::DestinationDiscards => {
            let _ = vm.child.wait();
            dest_exit(rx)?;
            if case.disk.is_some() {
                disk_outcome(&copies, &image)?;
                return Ok("destination discarded its copy and the partial image".into());
            }
            Ok("destination discarded its copy".into())
        }
        Expect::DestinationRuns => {
            let _ = vm.child.wait();
            let c = counter(&dst);
            wait_counter_beyond(&dst, c);
            request(&dst, r#"{"cmd":"stop"}"#);
            Ok("guest runs on the destination".into())
        }
    }
}

#[test]
fn fault_matrix() {
    assert!(kvm_available(), "the fault matrix needs /dev/kvm");
    let cases = cases();
    assert!(cases.len() >= 21);
    let mut rows = Vec::new();
    let mut failed = 0;
    for (i, case) in cases.iter().enumerate() {
        let t = std::time::Instant::now();
        let r = run_case(i, case);
        let secs = t.elapsed().as_secs_f64();
        if r.is_err() {
            failed += 1;
        }
        rows.push(format!(
            "| {:>2} | {:<30} | {:<16} | {:<44} | {:>5.1} s | {} |",
            i + 1,
            case.phase,
            format!("{:?}", case.fault),
            format!("{:?}", case.expect),
            secs,
            match &r {
                Ok(s) => format!("ok: {s}"),
                Err(e) => format!("FAILED: {e}"),
            }
        ));
    }
    println!("\n| #  | phase                          | fault            | expected (DESIGN §5)                         | time    | outcome |");
    println!("|----|--------------------------------|------------------|----------------------------------------------|---------|---------|");
    for r in &rows {
        println!("{r}");
    }
    println!("{} passed, {failed} failed", cases.len() - failed);
    assert_eq!(failed, 0, "fault cases failed:\n{}", rows.join("\n"));
}
