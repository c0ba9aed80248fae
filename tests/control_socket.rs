//! The VM's control socket is its owner's: mode 0600, every peer's uid checked, a cap on
//! connections, and a client that never finishes its request is dropped.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;

use common::*;

fn vm(tag: &str) -> (std::path::PathBuf, Proc) {
    let dir = tmpdir(tag);
    let sock = dir.join("vm.sock");
    let p = run_vm(&[], &sock, &["--backend", "memory", "--memory", "16"]);
    (sock, p)
}

fn first_line(s: UnixStream) -> String {
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

#[test]
fn the_socket_is_private_and_other_users_are_refused() {
    let (sock, _p) = vm("ctl-private");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:03o}");
    // Even through a socket someone opened up, another user gets a refusal, not the VM.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(
        sock.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["status", "--vm", sock.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("uid 65534 may not use this VM's control socket"),
        "{text}"
    );
    assert!(!text.contains("phase"), "{text}");
    // Its owner still can.
    assert_eq!(request(&sock, r#"{"cmd":"status"}"#)["phase"], "running");
}

#[test]
fn idle_connections_are_capped_and_dropped() {
    let (sock, _p) = vm("ctl-cap");
    let idle: Vec<UnixStream> = (0..32)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let line = first_line(UnixStream::connect(&sock).unwrap());
    assert!(
        line.contains("32 control connections are open already"),
        "{line:?}"
    );
    // A client that never sends its request is dropped after the request timeout (10 s;
    // this read gives up at 30 s, which fails the test).
    let mut one = idle.into_iter().next().unwrap();
    one.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut one, &mut buf);
    assert_eq!(n.ok(), Some(0), "the server closes a silent connection");
    let _ = one.write_all(b"\n");
    // Once they are gone, requests are served again.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(request(&sock, r#"{"cmd":"status"}"#)["phase"], "running");
}
