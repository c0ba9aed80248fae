//! Processor compatibility before setup: a destination that cannot give the guest the
//! processor it was given (here: one feature hidden with `--cpu-without`) refuses before any
//! RAM moves, naming the feature, and the VM keeps running on the source; the same VM started
//! with `--cpu-model baseline` migrates there.

mod common;

use std::process::Command;

use common::*;

const VM: &[&str] = &[
    "--memory",
    "16",
    "--working-set",
    "2",
    "--dirty-rate",
    "500",
    "--no-auth",
];

#[test]
fn a_destination_lacking_a_feature_refuses_naming_it_and_a_baseline_vm_migrates() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let hidden = beyond_baseline();
    let dir = tmpdir("cpu");

    // The host model: refused, with the feature named; the source keeps running.
    let src = dir.join("host.sock");
    let _vm = run_vm(&[], &src, VM);
    let (dst, addr) = receive(&[], "127.0.0.1:0", &["--no-auth", "--cpu-without", &hidden]);
    let out = migrate(&[], &src, &addr, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(out.status.code(), &stderr, &format!("lacks {hidden}"));
    assert!(stderr.contains("--cpu-model baseline"), "{stderr}");
    let status = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(
        status["last_migration"]["source_state"], "running",
        "{status}"
    );
    // Refused while building the skeleton VM, which comes before any data connection.
    let error = status["last_migration"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("cannot build the VM"), "{status}");
    wait_counter_beyond(&src, counter(&src));
    let (_, log) = dst.wait_exit(std::time::Duration::from_secs(20));
    assert!(log.contains(&hidden), "{log}");
    request(&src, r#"{"cmd":"stop"}"#);

    // The same VM on the baseline model moves to that host, and keeps running there.
    let src = dir.join("baseline.sock");
    let _vm = run_vm(&[], &src, &[VM, &["--cpu-model", "baseline"]].concat());
    let dst_sock = dir.join("dst.sock");
    let (_dst, addr) = receive(
        &[],
        "127.0.0.1:0",
        &[
            "--no-auth",
            "--cpu-without",
            &hidden,
            "--socket",
            dst_sock.to_str().unwrap(),
        ],
    );
    migrate_ok(&[], &src, &addr, &[]);
    let c = wait_counter_beyond(&dst_sock, 0);
    wait_counter_beyond(&dst_sock, c);
    request(&dst_sock, r#"{"cmd":"stop"}"#);
}

#[test]
fn an_unknown_feature_name_is_a_clear_error() {
    let dir = tmpdir("cpu-bad");
    let sock = dir.join("vm.sock");
    let out = Command::new(bin())
        .args([
            "run-vm",
            "--socket",
            sock.to_str().unwrap(),
            "--memory",
            "16",
        ])
        .args(["--no-auth", "--cpu-without", "warp_drive"])
        .output()
        .unwrap();
    assert_clean_error(
        out.status.code(),
        &String::from_utf8_lossy(&out.stderr),
        "unknown CPU feature \"warp_drive\"",
    );
    assert!(!sock.exists(), "a VM started after a bad option");
}
