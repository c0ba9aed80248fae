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
}

const RAM_MIB: u64 = 64;

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
    };
    vec![
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
fn counter_frozen(socket: &std::path::Path) -> bool {
    let a = counter(socket);
    std::thread::sleep(Duration::from_millis(150));
    counter(socket) == a
}

fn run_case(i: usize, case: &Case) -> Result<String, String> {
    let dir = tmpdir(&format!("fault{i}"));
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let (rx, dst_addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
    let mut vm = run_vm(
        &[],
        &src,
        &[
            "--memory",
            &RAM_MIB.to_string(),
            "--working-set",
            "16",
            "--dirty-rate",
            "2000",
            "--fill",
            "random",
        ],
    );
    let before = wait_counter_beyond(&src, 0);
    let (rx_pid, vm_pid) = (rx.child.id(), vm.child.id());
    let action: Box<dyn FnOnce() + Send> = match case.fault {
        Fault::Cut => Box::new(|| {}),
        Fault::KillDestination => Box::new(move || kill(rx_pid)),
        Fault::KillSource => Box::new(move || kill(vm_pid)),
    };
    let proxy = Proxy::start(&dst_addr, case.trigger, action);
    let mut args = vec!["--compress", "none"];
    if case.forced_rounds {
        // Never converges on its own: rounds go on (empty ones take well under a millisecond)
        // until the guest's next burst of writes crosses the trigger.
        args.extend_from_slice(&["--downtime-limit", "0", "--max-rounds", "1000000"]);
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
            if case.fault != Fault::KillDestination {
                dest_exit(rx)?;
            }
            // RAM intact: a clean migration to a fresh destination verifies every byte.
            let dst2 = dir.join("dst2.sock");
            let (_rx2, addr2) = receive(&[], "127.0.0.1:0", &["--socket", dst2.to_str().unwrap()]);
            let report = migrate_ok(&[], &src, &addr2, &[]);
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
            if destination_runs {
                let c = counter(&dst);
                wait_counter_beyond(&dst, c);
                request(&dst, r#"{"cmd":"stop"}"#);
                Ok("source paused (outcome unknown); guest runs on the destination".into())
            } else {
                if case.fault == Fault::Cut {
                    dest_exit(rx)?;
                }
                Ok("source paused (outcome unknown); destination did not resume".into())
            }
        }
        Expect::DestinationDiscards => {
            let _ = vm.child.wait();
            dest_exit(rx)?;
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
    assert!(cases.len() >= 16);
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
