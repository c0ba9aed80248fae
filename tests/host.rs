//! Host agents: many VMs at once within the hosts' limits, and migration networks.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Starts `livemig host` (under `prefix`) on `dir` with `args`; returns it and the address it
/// listens on.
fn agent(prefix: &[&str], dir: &Path, args: &[&str]) -> (Proc, String) {
    let mut all = vec!["host", "--dir", dir.to_str().unwrap(), "--no-auth"];
    all.extend_from_slice(args);
    let mut p = spawn(prefix, &all);
    let line = p.wait_line("host agent listening on ");
    let addr = line.rsplit(' ').next().unwrap().trim().to_string();
    p.wait_line("host agent for ");
    (p, addr)
}

/// The host's event log.
fn events(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The most `direction` migrations in flight at once, by the log's order.
fn most_in_flight(events: &[Value], direction: &str) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in events {
        let ev = e["event"].as_str().unwrap_or_default();
        if ev == format!("{direction}-started") {
            now += 1;
            most = most.max(now);
        } else if ev == format!("{direction}-finished") {
            now = now.saturating_sub(1);
        }
    }
    most
}

fn vm_list(dir: &Path) -> Vec<Value> {
    let out = Command::new(bin())
        .args(["vm", "list", "--json", "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn four_vms_migrate_at_once_between_agents_with_a_limit_of_two() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let root = tmpdir("agents");
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let (_a, _) = agent(
        &[],
        &a_dir,
        &["--listen", "127.0.0.1:0", "--max-outgoing", "2"],
    );
    let (_b, b_addr) = agent(
        &[],
        &b_dir,
        &["--listen", "127.0.0.1:0", "--max-incoming", "2"],
    );
    let names = ["vm1", "vm2", "vm3", "vm4"];
    let sockets: Vec<PathBuf> = names
        .iter()
        .map(|n| a_dir.join(format!("{n}.sock")))
        .collect();
    let _vms: Vec<Proc> = sockets
        .iter()
        .map(|s| {
            run_vm(
                &[],
                s,
                &[
                    "--memory",
                    "256",
                    "--working-set",
                    "64",
                    "--dirty-rate",
                    "5000",
                    "--no-auth",
                ],
            )
        })
        .collect();
    // The agent adopts VMs started in its directory.
    let listed = vm_list(&a_dir);
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(listed.iter().all(|v| v["phase"] == "running"), "{listed:?}");

    // One command, four VMs by name.
    let out = Command::new(bin())
        .env("LIVEMIG_HOST_DIR", &a_dir)
        .args(["migrate", "--json", "--to", &b_addr])
        .args(names.iter().flat_map(|n| ["--vm", n]))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 4, "{stdout}");
    for r in &reports {
        assert_eq!(r["report"]["status"], "completed", "{r}");
        assert_eq!(r["report"]["digest_match"], true, "{r}");
    }
    // Never more than two in flight on either side — and two did run at once.
    let (a_events, b_events) = (events(&a_dir), events(&b_dir));
    assert_eq!(most_in_flight(&a_events, "outgoing"), 2, "{a_events:#?}");
    assert_eq!(most_in_flight(&b_events, "incoming"), 2, "{b_events:#?}");
    let queued = a_events
        .iter()
        .filter(|e| e["event"] == "outgoing-queued")
        .count();
    assert!(queued >= 2, "two VMs waited for a slot: {a_events:#?}");
    // Host B runs the four VMs, each in a VM process its agent started.
    let arrived = vm_list(&b_dir);
    assert_eq!(arrived.len(), 4, "{arrived:?}");
    for v in &arrived {
        assert_eq!(v["phase"], "running", "{arrived:?}");
        let sock = b_dir.join(format!("{}.sock", v["vm"].as_str().unwrap()));
        let c = wait_counter_beyond(&sock, 0);
        wait_counter_beyond(&sock, c);
        request(&sock, r#"{"cmd":"stop"}"#);
    }
    for s in &sockets {
        request(s, r#"{"cmd":"stop"}"#);
    }
}

#[test]
fn connections_outside_the_migration_networks_are_refused() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let hosts = hosts("ha", "none");
    let root = tmpdir("agent-nets");
    let b_dir = root.join("b");
    let listen = format!("{}:7473", hosts.addr_b);
    // B takes migrations on its link address only, and only from 192.0.2.0/24 — not A.
    let (_b, addr) = agent(
        &NetnsHosts::exec(&hosts.ns_b),
        &b_dir,
        &["--listen", &listen, "--allow", "192.0.2.0/24"],
    );
    assert_eq!(addr, listen);
    let src = root.join("src.sock");
    let _vm = run_vm(
        &NetnsHosts::exec(&hosts.ns_a),
        &src,
        &["--memory", "64", "--dirty-rate", "500", "--no-auth"],
    );
    let out = migrate(&[], &src, &addr, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(out.status.code(), &stderr, "migration failed");
    let status = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(
        status["last_migration"]["source_state"], "running",
        "{status}"
    );
    wait_counter_beyond(&src, counter(&src));
    let refused: Vec<Value> = events(&b_dir)
        .into_iter()
        .filter(|e| e["event"] == "connection-refused")
        .collect();
    assert!(
        refused
            .iter()
            .any(|e| e["peer"].as_str().unwrap_or("").starts_with(&hosts.addr_a)),
        "{refused:?}"
    );
    assert!(
        vm_list(&b_dir).is_empty(),
        "a VM process started for a refused source"
    );

    // Another address of host B, on the same link, is not a migration network: the kernel
    // refuses the connection.
    let (net, _) = hosts.addr_b.rsplit_once('.').unwrap();
    let other = format!("{net}.77");
    let ip = |ns: &str, args: &[&str]| {
        let s = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .status()
            .unwrap();
        assert!(s.success(), "{args:?}");
    };
    ip(
        &hosts.ns_b,
        &[
            "ip",
            "addr",
            "add",
            &format!("{other}/24"),
            "dev",
            &hosts.dev_b,
        ],
    );
    let out = migrate(&[], &src, &format!("{other}:7473"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(out.status.code(), &stderr, "refused");
    request(&src, r#"{"cmd":"stop"}"#);
}

/// Holds host `dir`'s incoming slot 0 (as a running migration would) until dropped (the
/// file is kept only for its lock).
struct HeldSlot(#[allow(dead_code)] std::fs::File);

impl HeldSlot {
    fn take(dir: &Path) -> HeldSlot {
        std::fs::create_dir_all(dir.join("slots")).unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("slots/incoming-0.lock"))
            .unwrap();
        // SAFETY: flock on a descriptor owned by `f`.
        let r = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        assert_eq!(r, 0, "slot already held");
        HeldSlot(f)
    }
}

#[test]
fn an_incoming_migration_past_the_limit_waits_then_is_refused_saying_why() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let root = tmpdir("agent-queue");
    let b_dir = root.join("b");
    let (_b, addr) = agent(
        &[],
        &b_dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--max-incoming",
            "1",
            "--queue-timeout-secs",
            "2",
        ],
    );
    let src = root.join("src.sock");
    let _vm = run_vm(
        &[],
        &src,
        &["--memory", "64", "--dirty-rate", "500", "--no-auth"],
    );
    // Another migration holds the only slot for longer than the queue's bound: refused.
    let held = HeldSlot::take(&b_dir);
    let out = migrate(&[], &src, &addr, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(
        out.status.code(),
        &stderr,
        "limit of 1 incoming migrations at once and none ended within 2 s",
    );
    let status = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(
        status["last_migration"]["source_state"], "running",
        "{status}"
    );
    let ev = events(&b_dir);
    assert!(
        ev.iter().any(|e| e["event"] == "incoming-queued"),
        "{ev:#?}"
    );
    assert!(
        ev.iter().any(|e| e["event"] == "incoming-refused"),
        "{ev:#?}"
    );

    // The slot frees while the next one waits: it goes ahead.
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        drop(held);
    });
    migrate_ok(&[], &src, &addr, &[]);
    release.join().unwrap();
    let started: Vec<Value> = events(&b_dir)
        .into_iter()
        .filter(|e| e["event"] == "incoming-started")
        .collect();
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(
        started[0]["waited_ms"].as_u64().unwrap() >= 300,
        "{started:?}"
    );
    // The refused attempt's VM process left nothing behind: one VM, running.
    let listed = vm_list(&b_dir);
    let [vm] = listed.as_slice() else {
        panic!("{listed:?}")
    };
    assert_eq!(vm["phase"], "running", "{listed:?}");
    request(
        &b_dir.join(format!("{}.sock", vm["vm"].as_str().unwrap())),
        r#"{"cmd":"stop"}"#,
    );
}

#[test]
fn one_failing_migration_never_disturbs_the_others() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let hidden = beyond_baseline();
    let root = tmpdir("agent-isolation");
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let (_a, _) = agent(&[], &a_dir, &["--listen", "127.0.0.1:0"]);
    // Host B lacks a feature: a VM given it is refused, the baseline ones move.
    let (_b, b_addr) = agent(
        &[],
        &b_dir,
        &["--listen", "127.0.0.1:0", "--cpu-without", &hidden],
    );
    let vm = |name: &str, model: &str| {
        run_vm(
            &[],
            &a_dir.join(format!("{name}.sock")),
            &[
                "--memory",
                "64",
                "--dirty-rate",
                "2000",
                "--no-auth",
                "--cpu-model",
                model,
            ],
        )
    };
    let _vms = [
        vm("ok1", "baseline"),
        vm("bad", "host"),
        vm("ok2", "baseline"),
    ];
    let out = Command::new(bin())
        .env("LIVEMIG_HOST_DIR", &a_dir)
        .args([
            "migrate", "--to", &b_addr, "--vm", "ok1", "--vm", "bad", "--vm", "ok2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(out.status.code(), &stderr, "1 migration(s) failed");
    assert!(stderr.contains("bad.sock"), "{stderr}");
    for ok in ["ok1", "ok2"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("{ok}.sock: completed")) && l.contains("digest match")),
            "{stdout}"
        );
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("bad.sock: failed") && l.contains(&format!("lacks {hidden}"))),
        "{stdout}"
    );
    assert!(stdout.contains("2 of 3 VMs migrated"), "{stdout}");
    // The refused VM runs on at the source; the others run on B.
    let bad = a_dir.join("bad.sock");
    wait_counter_beyond(&bad, counter(&bad));
    // The refused VM's destination process on B ends on its own, its control socket gone
    // first; until it has, B lists it arriving.
    let deadline = Instant::now() + Duration::from_secs(20);
    let arrived = loop {
        let arrived = vm_list(&b_dir);
        if arrived.len() == 2 || Instant::now() > deadline {
            break arrived;
        }
        assert!(
            arrived.iter().all(|v| v["phase"] != "not answering"),
            "{arrived:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(arrived.len(), 2, "{arrived:?}");
    for v in &arrived {
        assert_eq!(v["phase"], "running", "{arrived:?}");
        request(
            &b_dir.join(format!("{}.sock", v["vm"].as_str().unwrap())),
            r#"{"cmd":"stop"}"#,
        );
    }
    for n in ["ok1", "bad", "ok2"] {
        request(&a_dir.join(format!("{n}.sock")), r#"{"cmd":"stop"}"#);
    }
}

/// Bytes a migration put on the wire per second of its total time.
fn wire_rate(report: &Value) -> f64 {
    report["bytes_on_wire"].as_f64().unwrap() / (report["total_time_ms"].as_f64().unwrap() / 1e3)
}

#[test]
fn bandwidth_caps_hold_per_migration_and_per_host() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let root = tmpdir("agent-caps");
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    // Two migrations share the host's 40 MB/s.
    let (_a, _) = agent(
        &[],
        &a_dir,
        &["--listen", "127.0.0.1:0", "--host-bandwidth-mbps", "40"],
    );
    let (_b, b_addr) = agent(&[], &b_dir, &["--listen", "127.0.0.1:0"]);
    let vm_args = [
        "--memory",
        "32",
        "--fill",
        "random",
        "--dirty-rate",
        "200",
        "--no-auth",
    ];
    let _vms = [
        run_vm(&[], &a_dir.join("c1.sock"), &vm_args),
        run_vm(&[], &a_dir.join("c2.sock"), &vm_args),
    ];
    let t = std::time::Instant::now();
    let out = Command::new(bin())
        .env("LIVEMIG_HOST_DIR", &a_dir)
        .args(["migrate", "--json", "--compress", "none", "--to", &b_addr])
        .args(["--vm", "c1", "--vm", "c2"])
        .output()
        .unwrap();
    let wall = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes: f64 = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["report"]["bytes_on_wire"]
                .as_f64()
                .unwrap()
        })
        .sum();
    assert!(bytes >= 64e6, "{stdout}");
    // Together never faster than the host's cap (a little slack for the burst allowance).
    assert!(
        bytes / wall <= 40e6 * 1.1,
        "{:.1} MB/s: {stdout}",
        bytes / wall / 1e6
    );

    // Without a host: the migration's own cap.
    let src = root.join("solo.sock");
    let _vm = run_vm(&[], &src, &vm_args);
    let (_dst, addr) = receive(&[], "127.0.0.1:0", &["--no-auth"]);
    let report = migrate_ok(
        &[],
        &src,
        &addr,
        &["--compress", "none", "--max-bandwidth", "20"],
    );
    assert!(wire_rate(&report) <= 20e6 * 1.1, "{report}");
    for v in vm_list(&b_dir) {
        request(
            &b_dir.join(format!("{}.sock", v["vm"].as_str().unwrap())),
            r#"{"cmd":"stop"}"#,
        );
    }
}
