//! A wire nobody can tamper with: a man in the middle who flips one bit — in a page batch, in
//! the device state, in Commit — is caught, the migration fails cleanly and the guest keeps
//! running on the source alone; a passive listener sees no guest RAM; and without encryption
//! the RAM digest, compared before Commit, still catches an altered page.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A source VM (memory backend: text-like RAM, dirtied) and a destination behind a proxy.
struct Setup {
    _vm: Proc,
    sock: std::path::PathBuf,
    dst: Proc,
    proxy: Proxy,
}

fn setup(name: &str, trigger: Trigger, encrypt: &str) -> Setup {
    let dir = tmpdir(name);
    let sock = dir.join("src.sock");
    let vm = run_vm(
        &[],
        &sock,
        &[
            "--backend",
            "memory",
            "--memory",
            "32",
            "--fill",
            "text",
            "--dirty-rate",
            "200",
            "--encrypt",
            encrypt,
        ],
    );
    let (dst, addr) = receive(
        &[],
        "127.0.0.1:0",
        &[
            "--backend",
            "memory",
            "--exit-after-resume",
            "--timeout-secs",
            "10",
            "--encrypt",
            encrypt,
        ],
    );
    let proxy = Proxy::start(&addr, trigger, Box::new(|| {}));
    Setup {
        _vm: vm,
        sock,
        dst,
        proxy,
    }
}

/// The guest still runs on the source (and only there: the destination ended without
/// resuming); returns the source's and the destination's error text.
fn failed_cleanly(s: Setup, out: std::process::Output) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        s.proxy.fired.load(std::sync::atomic::Ordering::SeqCst),
        "the tampering never happened: {stderr}"
    );
    assert_clean_error(out.status.code(), &stderr, "error");
    assert_running(&s.sock);
    let (code, dst_err) = s.dst.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0), "the destination succeeded: {dst_err}");
    assert!(!dst_err.contains("panicked"), "{dst_err}");
    assert!(
        dst_err.contains("nothing was resumed here"),
        "the destination resumed: {dst_err}"
    );
    (stderr, dst_err)
}

fn assert_running(sock: &Path) {
    let st = request(sock, r#"{"cmd":"status"}"#);
    assert_eq!(st["phase"], "running", "{st}");
    let c = counter(sock);
    wait_counter_beyond(sock, c);
}

#[test]
fn one_flipped_bit_in_pages_device_state_or_commit_fails_cleanly_with_the_source_running() {
    for (what, trigger, needle) in [
        ("pages", Trigger::FlipData(3 << 20), "failed authentication"),
        (
            "device state",
            Trigger::FlipSourceFrame(kind::DEVICE_STATE),
            "failed authentication",
        ),
        (
            "commit",
            Trigger::FlipSourceFrame(kind::COMMIT),
            "discarded its copy",
        ),
    ] {
        let s = setup(&format!("mitm-{}", what.replace(' ', "-")), trigger, "on");
        let out = migrate(&[], &s.sock, &s.proxy.addr, &["--compress", "none"]);
        let (src_err, dst_err) = failed_cleanly(s, out);
        println!("{what}: source: {}", src_err.trim());
        // Before the pause it kept running; after, it resumed.
        assert!(
            src_err.contains("resumed on the source") || src_err.contains("source: running"),
            "{what}: {src_err}"
        );
        assert!(
            dst_err.contains(needle) || src_err.contains(needle),
            "{what}: {src_err} / {dst_err}"
        );
    }
}

#[test]
fn without_encryption_an_altered_page_is_caught_by_the_digest_before_commit() {
    let s = setup("mitm-clear", Trigger::FlipData(3 << 20), "off");
    let out = migrate(&[], &s.sock, &s.proxy.addr, &["--compress", "none"]);
    let (src_err, _) = failed_cleanly(s, out);
    assert!(
        src_err.contains("RAM digest") && src_err.contains("resumed on the source"),
        "{src_err}"
    );
}

/// Whether `bytes` hold a run of 64 text-like bytes (the guest's RAM is text-like; random or
/// encrypted bytes practically never are).
fn has_text_run(bytes: &[u8]) -> bool {
    let mut run = 0;
    for &b in bytes {
        run = if (0x20..0x7f).contains(&b) || b == b'\n' {
            run + 1
        } else {
            0
        };
        if run >= 64 {
            return true;
        }
    }
    false
}

#[test]
fn a_passive_capture_of_an_encrypted_migration_holds_no_guest_ram() {
    let mut reports: Vec<(String, bool, Value)> = Vec::new();
    for encrypt in ["off", "on"] {
        let s = setup(&format!("capture-{encrypt}"), Trigger::Capture, encrypt);
        let out = migrate(&[], &s.sock, &s.proxy.addr, &["--compress", "none"]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{encrypt}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(r["digest_match"], true, "{r}");
        let captured = s.proxy.captured.lock().unwrap().clone();
        assert!(captured.len() > 32 << 20, "{} bytes", captured.len());
        reports.push((encrypt.to_string(), has_text_run(&captured), r));
        let _ = s.dst.wait_exit(Duration::from_secs(30));
    }
    // In clear the guest's text is there to find: the search works.
    assert!(reports[0].1, "no guest text in the clear capture");
    assert_eq!(reports[0].2["encryption"], "off");
    assert!(!reports[1].1, "guest text in the encrypted capture");
    assert_eq!(reports[1].2["encryption"], "aes-256-gcm");
}
