//! Cancelling a migration (`livemig cancel`, or Ctrl-C on `livemig migrate`) before the
//! switchover leaves the VM running on the source, intact; the destination frees everything
//! and exits saying why.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn setup(tag: &str) -> (std::path::PathBuf, Proc, String, Proc, u64) {
    assert!(kvm_available(), "these tests need /dev/kvm");
    let dir = tmpdir(tag);
    let src = dir.join("src.sock");
    let (rx, addr) = receive(&[], "127.0.0.1:0", &[]);
    let vm = run_vm(
        &[],
        &src,
        &[
            "--memory",
            "64",
            "--working-set",
            "16",
            "--dirty-rate",
            "20000",
        ],
    );
    let before = wait_counter_beyond(&src, 0);
    (src, rx, addr, vm, before)
}

/// A migration that never converges on its own.
fn endless(src: &std::path::Path, addr: &str) -> std::process::Child {
    Command::new(bin())
        .args(["migrate", "--vm", src.to_str().unwrap(), "--to", addr])
        .args(ENDLESS)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn check_cancelled(src: &std::path::Path, out: std::process::Output, rx: Proc, before: u64) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let st = request(src, r#"{"cmd":"status"}"#);
    assert_eq!(st["phase"], "running", "{st}");
    assert_eq!(st["last_migration"]["source_state"], "running", "{st}");
    wait_counter_beyond(src, before);
    let (code, err) = rx.wait_exit(Duration::from_secs(30));
    assert_clean_error(code, &err, "cancelled on the source");
    // RAM intact: a full migration afterwards verifies every byte.
    let dst = src.with_file_name("dst2.sock");
    let (_rx2, addr2) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
    migrate_ok(&[], src, &addr2, &[]);
    let c = counter(&dst);
    wait_counter_beyond(&dst, c);
    request(&dst, r#"{"cmd":"stop"}"#);
}

#[test]
fn cancel_command_during_pre_copy() {
    let (src, rx, addr, _vm, before) = setup("cancel");
    let child = endless(&src, &addr);
    std::thread::sleep(Duration::from_millis(800));
    let st = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(st["phase"], "migrating", "{st}");
    let answer = request(&src, r#"{"cmd":"cancel"}"#);
    assert_eq!(answer["cancel_requested"], true);
    check_cancelled(&src, child.wait_with_output().unwrap(), rx, before);
}

#[test]
fn ctrl_c_on_migrate_cancels() {
    let (src, rx, addr, _vm, before) = setup("ctrlc");
    let child = endless(&src, &addr);
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    check_cancelled(&src, child.wait_with_output().unwrap(), rx, before);
}
