//! The control channel is authenticated with a pre-shared key: a wrong key or no key is
//! refused on both sides before any state is read or RAM written, with a clear message.

mod common;

use std::time::Duration;

use common::*;

fn key_file(dir: &std::path::Path, name: &str, key: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_str().unwrap().to_string()
}

/// Runs a migration between a destination and a source started with the given extra args;
/// returns the migrate stderr and the destination's stderr.
fn attempt(dst_args: &[&str], src_args: &[&str]) -> (String, String) {
    let dir = tmpdir(&format!("auth{}", dst_args.len() * 10 + src_args.len()));
    let src = dir.join("src.sock");
    let mut a = vec!["--backend", "memory"];
    a.extend_from_slice(dst_args);
    let (rx, addr) = receive(&[], "127.0.0.1:0", &a);
    let mut b = vec![
        "--backend",
        "memory",
        "--memory",
        "32",
        "--dirty-rate",
        "100",
    ];
    b.extend_from_slice(src_args);
    let _vm = run_vm(&[], &src, &b);
    let before = wait_counter_beyond(&src, 0);
    let out = migrate(&[], &src, &addr, &[]);
    assert!(!out.status.success());
    // A refused peer does not end the destination's wait: it logs why and keeps listening.
    std::thread::sleep(Duration::from_millis(500));
    let dst_err = rx.kill_running();
    assert!(dst_err.contains("refused a connection"), "{dst_err}");
    assert!(!dst_err.contains("panicked"), "{dst_err}");
    // The source VM never stopped.
    let st = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(st["phase"], "running", "{st}");
    wait_counter_beyond(&src, before);
    (String::from_utf8_lossy(&out.stderr).to_string(), dst_err)
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let dir = tmpdir("keys");
    let k1 = key_file(&dir, "k1", &"0f".repeat(32));
    let k2 = key_file(&dir, "k2", &"e1".repeat(32));
    let (src_err, dst_err) = attempt(&["--key-file", &k1], &["--key-file", &k2]);
    assert!(src_err.contains("key does not match"), "{src_err}");
    assert!(dst_err.contains("authentication failed"), "{dst_err}");
}

#[test]
fn a_source_without_key_is_refused() {
    let (src_err, dst_err) = attempt(&[], &["--no-auth"]);
    assert!(
        src_err.contains("requires a key and this source has none"),
        "{src_err}"
    );
    assert!(dst_err.contains("this source has none"), "{dst_err}");
}

#[test]
fn a_destination_without_key_is_refused() {
    let (src_err, _dst_err) = attempt(&["--no-auth"], &[]);
    assert!(src_err.contains("the destination has no key"), "{src_err}");
}

#[test]
fn a_process_without_any_key_says_how_to_get_one() {
    let out = std::process::Command::new(bin())
        .args(["receive", "--listen", "127.0.0.1:0"])
        .env_remove("LIVEMIG_KEY")
        .env_remove("LIVEMIG_KEY_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--key-file") && err.contains("LIVEMIG_KEY"),
        "{err}"
    );
}

#[test]
fn weak_keys_exposed_key_files_and_no_auth_beside_a_key_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("weak-keys");
    let run = |args: &[&str], key: Option<&str>| {
        let mut c = std::process::Command::new(bin());
        c.args(["receive", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("LIVEMIG_KEY")
            .env_remove("LIVEMIG_KEY_FILE");
        if let Some(k) = key {
            c.env("LIVEMIG_KEY", k);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        (out.status.code(), err)
    };
    // A passphrase is not a key.
    let (code, err) = run(&[], Some("livemig-test-key-0123456789"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("at least 32 random bytes written as hex"),
        "{err}"
    );
    // 32 bytes of hex in a file others can read.
    let open_file = key_file(&dir, "open", &"5a".repeat(32));
    std::fs::set_permissions(&open_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = run(&["--key-file", &open_file], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("mode 644") && err.contains("chmod 600"),
        "{err}"
    );
    // --no-auth never silently wins over a key.
    let (code, err) = run(&["--no-auth"], Some(&"5a".repeat(32)));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--no-auth, yet LIVEMIG_KEY holds a key"),
        "{err}"
    );
    let private = key_file(&dir, "private", &"5a".repeat(32));
    let (code, err) = run(&["--no-auth", "--key-file", &private], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}

/// Certificates from `livemig make-certs` in `dir/name`: (cert, key, ca) for host `host`.
fn certs(dir: &std::path::Path, name: &str, hosts: &[&str]) -> std::path::PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "make-certs".to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    for h in hosts {
        args.extend(["--host".to_string(), h.to_string()]);
    }
    let st = std::process::Command::new(bin())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

fn cert_args(dir: &std::path::Path, host: &str, ca_dir: &std::path::Path) -> Vec<String> {
    vec![
        "--cert".into(),
        dir.join(format!("{host}.pem")).display().to_string(),
        "--key".into(),
        dir.join(format!("{host}-key.pem")).display().to_string(),
        "--ca".into(),
        ca_dir.join("ca.pem").display().to_string(),
    ]
}

/// Mutual certificates key a sealed session; a source whose certificate another CA signed
/// is refused on both sides before any state, and keeps running.
#[test]
fn certificates_key_an_encrypted_session_and_a_foreign_ca_is_refused() {
    let dir = tmpdir("certs");
    let ours = certs(&dir, "ours", &["127.0.0.1,localhost", "source"]);
    let theirs = certs(&dir, "theirs", &["source"]);
    let dst_args = cert_args(&ours, "127.0.0.1", &ours);
    let dst_args: Vec<&str> = dst_args.iter().map(String::as_str).collect();
    for (what, src_dir, ok) in [("foreign CA", &theirs, false), ("our CA", &ours, true)] {
        let mut rx_args = vec!["--backend", "memory", "--exit-after-resume"];
        rx_args.extend_from_slice(&dst_args);
        let (rx, addr) = receive(&[], "127.0.0.1:0", &rx_args);
        let src = dir.join(format!("src-{ok}.sock"));
        let src_args = cert_args(src_dir, "source", src_dir);
        let mut vm_args: Vec<&str> = vec!["--backend", "memory", "--memory", "32"];
        vm_args.extend(src_args.iter().map(String::as_str));
        let _vm = run_vm(&[], &src, &vm_args);
        let out = migrate(&[], &src, &addr, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if ok {
            assert!(out.status.success(), "{what}: {stdout} {stderr}");
            let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            assert_eq!(r["digest_match"], true, "{r}");
            assert_eq!(r["encryption"], "aes-256-gcm", "{r}");
            let (code, err) = rx.wait_exit(Duration::from_secs(30));
            assert_eq!(code, Some(0), "{err}");
        } else {
            assert!(!out.status.success(), "{what}: {stdout}");
            assert!(stderr.contains("TLS handshake"), "{what}: {stderr}");
            assert_eq!(request(&src, r#"{"cmd":"status"}"#)["phase"], "running");
            std::thread::sleep(Duration::from_millis(300));
            let err = rx.kill_running();
            assert!(err.contains("refused a connection"), "{what}: {err}");
        }
    }
}
