//! A destination fed garbage, truncated streams, out-of-range pages or a newer protocol exits
//! with a clear error and never panics.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use livemig_engine::auth::Key;
use livemig_engine::memory::RamLayout;
use livemig_engine::protocol::{Message, VERSION};
use livemig_engine::storage::StorageMode;
use livemig_engine::vm::{builtin_guest, VmConfig, VmSpec};
use livemig_transport::frame;

fn send(s: &mut TcpStream, m: &Message) {
    let (k, p) = m.encode();
    frame::write_frame(s, k, &p).unwrap();
}

fn recv(s: &mut TcpStream) -> Message {
    let (k, p) = frame::read_frame(s, 1 << 20, "test").unwrap();
    Message::decode(k, &p).unwrap()
}

/// A destination on the memory backend (no KVM needed for protocol errors); it exits once a
/// migrated VM runs there.
fn destination() -> (Proc, String) {
    receive(
        &[],
        "127.0.0.1:0",
        &["--backend", "memory", "--exit-after-resume"],
    )
}

/// A stranger was refused: the destination still waits, and a real source migrates to it.
/// Returns the destination's stderr, where the refusal was logged.
fn still_serves(rx: Proc, addr: &str, tag: &str) -> String {
    let src = tmpdir(tag).join("src.sock");
    let _vm = run_vm(&[], &src, &["--backend", "memory", "--memory", "16"]);
    let report = migrate_ok(&[], &src, addr, &[]);
    assert_eq!(report["status"], "completed", "{report}");
    let (code, err) = rx.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("refused a connection"), "{err}");
    err
}

/// Hello, Welcome and Auth with the test key; returns the session token.
fn authenticate(c: &mut TcpStream) -> u64 {
    let key = Key::new(TEST_KEY.as_bytes()).unwrap();
    let nonce_s = [7u8; 32];
    send(
        c,
        &Message::Hello {
            min_version: 1,
            max_version: VERSION,
            features: 0,
            nonce: nonce_s,
        },
    );
    let Message::Welcome { nonce, proof, .. } = recv(c) else {
        panic!("no Welcome")
    };
    assert_eq!(proof, key.destination_proof(&nonce_s, &nonce));
    send(
        c,
        &Message::Auth {
            proof: key.source_proof(&nonce_s, &nonce),
        },
    );
    key.session_token(&nonce_s, &nonce)
}

/// The configuration of a built-in-guest VM of `mib` MiB on `machine`.
fn config(machine: &str, mib: u64) -> VmConfig {
    VmConfig {
        machine: machine.into(),
        layout: RamLayout::single(mib << 20),
        vcpus: 1,
        devices: Vec::new(),
        machine_section: builtin_guest::encode_section(&VmSpec {
            memory_mib: mib,
            ..VmSpec::default()
        }),
    }
}

/// Config (a VM without disks) and, as protocol 2 wants, its Storage.
fn send_config(c: &mut TcpStream, vm: VmConfig, token: u64) {
    send(
        c,
        &Message::Config {
            vm,
            channels: 1,
            token,
        },
    );
    // A destination that refuses the Config may be gone before this arrives.
    let (k, p) = Message::Storage {
        mode: StorageMode::Shared,
        directory: String::new(),
        disks: Vec::new(),
    }
    .encode();
    let _ = frame::write_frame(c, k, &p);
}

/// Handshake + config for a 16 MiB VM; returns the control stream and token once Ready.
fn handshake(addr: &str) -> (TcpStream, u64) {
    let mut c = TcpStream::connect(addr).unwrap();
    let token = authenticate(&mut c);
    send_config(
        &mut c,
        config(livemig_engine::vm::memory_only::MACHINE, 16),
        token,
    );
    assert_eq!(recv(&mut c), Message::Ready);
    (c, token)
}

fn data_channel(addr: &str, token: u64) -> TcpStream {
    let mut d = TcpStream::connect(addr).unwrap();
    send(&mut d, &Message::ChannelHello { token, index: 0 });
    d
}

/// The header and entry of a data message carrying one raw extent (its bytes follow).
fn extents_message(addr: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&3u16.to_le_bytes()); // encoded pages
    v.extend_from_slice(&1u16.to_le_bytes()); // one entry
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&u64::from(len).to_le_bytes());
    v.extend_from_slice(&addr.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes()); // raw length
    v.extend_from_slice(&len.to_le_bytes()); // encoded length
    v.push(1); // raw
    v.extend_from_slice(&[0; 7]);
    v
}

#[test]
fn garbage_on_the_listening_port() {
    let (rx, addr) = destination();
    let mut c = TcpStream::connect(&addr).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .unwrap();
    let err = still_serves(rx, &addr, "garbage");
    assert!(err.contains("frame"), "{err}");
}

#[test]
fn random_bytes_on_the_listening_port() {
    let (rx, addr) = destination();
    let mut c = TcpStream::connect(&addr).unwrap();
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = c.write_all(&junk);
    still_serves(rx, &addr, "random");
}

#[test]
fn newer_protocol_is_refused_with_a_reason() {
    let (rx, addr) = destination();
    let mut c = TcpStream::connect(&addr).unwrap();
    send(
        &mut c,
        &Message::Hello {
            min_version: VERSION + 1,
            max_version: VERSION + 3,
            features: 0,
            nonce: [1; 32],
        },
    );
    match recv(&mut c) {
        Message::Refuse { reason } => assert!(reason.contains("newer"), "{reason}"),
        m => panic!("expected Refuse, got {m:?}"),
    }
    let err = still_serves(rx, &addr, "newer");
    assert!(err.contains("newer"), "{err}");
}

#[test]
fn page_batch_outside_ram_is_rejected() {
    let (rx, addr) = destination();
    let (_c, token) = handshake(&addr);
    let mut d = data_channel(&addr, token);
    let mut m = extents_message(16 << 20, 4096);
    m.extend_from_slice(&[0xaa; 4096]);
    let _ = d.write_all(&m);
    let (code, err) = rx.wait_exit(Duration::from_secs(20));
    assert_clean_error(code, &err, "outside registered memory");
}

#[test]
fn truncated_stream_is_an_error() {
    let (rx, addr) = destination();
    let (c, token) = handshake(&addr);
    let mut d = data_channel(&addr, token);
    let mut m = extents_message(0, 8192);
    m.extend_from_slice(&[0x55; 1000]);
    d.write_all(&m).unwrap();
    drop(d);
    drop(c);
    let (code, err) = rx.wait_exit(Duration::from_secs(20));
    assert_clean_error(code, &err, "closed");
}

#[test]
fn wrong_token_data_channel_is_not_accepted() {
    let (rx, addr) = destination();
    let (mut c, token) = handshake(&addr);
    let mut d = data_channel(&addr, token.wrapping_add(1));
    // The stray connection is dropped by the destination.
    let mut buf = [0u8; 1];
    d.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(d.read(&mut buf).unwrap_or(0), 0);
    // The session itself can still be aborted cleanly by its source.
    send(
        &mut c,
        &Message::Abort {
            reason: "test over".into(),
        },
    );
    let (code, err) = rx.wait_exit(Duration::from_secs(30));
    assert_clean_error(code, &err, "aborted");
}

#[test]
fn a_vm_of_another_machine_is_refused_before_any_page() {
    let (rx, addr) = destination();
    let mut c = TcpStream::connect(&addr).unwrap();
    let token = authenticate(&mut c);
    send_config(&mut c, config(livemig_engine::vm::kvm::MACHINE, 16), token);
    match recv(&mut c) {
        Message::Refuse { reason } => assert!(reason.contains("--backend"), "{reason}"),
        m => panic!("expected Refuse, got {m:?}"),
    }
    let (code, err) = rx.wait_exit(Duration::from_secs(20));
    assert_clean_error(code, &err, "destination runs");
}

#[test]
fn wrong_key_is_refused_on_both_sides_before_any_state() {
    let (rx, addr) = destination();
    let mut c = TcpStream::connect(&addr).unwrap();
    let key = Key::new("ab".repeat(32).as_bytes()).unwrap();
    let nonce_s = [9u8; 32];
    send(
        &mut c,
        &Message::Hello {
            min_version: 1,
            max_version: VERSION,
            features: 0,
            nonce: nonce_s,
        },
    );
    let Message::Welcome { nonce, proof, .. } = recv(&mut c) else {
        panic!("no Welcome")
    };
    // The destination's proof does not verify with the wrong key either.
    assert_ne!(proof, key.destination_proof(&nonce_s, &nonce));
    send(
        &mut c,
        &Message::Auth {
            proof: key.source_proof(&nonce_s, &nonce),
        },
    );
    match recv(&mut c) {
        Message::Refuse { reason } => assert!(reason.contains("does not match"), "{reason}"),
        m => panic!("expected Refuse, got {m:?}"),
    }
    let err = still_serves(rx, &addr, "wrongkey");
    assert!(err.contains("authentication failed"), "{err}");
}

#[test]
fn strangers_first_do_not_stop_a_real_source() {
    let (rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &[
            "--backend",
            "memory",
            "--exit-after-resume",
            "--timeout-secs",
            "60",
        ],
    );
    // A slowloris trickling a Hello header, a peer that connects and says nothing, and one
    // announcing a frame far beyond what a greeting needs, all before the source.
    let mut slow = TcpStream::connect(&addr).unwrap();
    let (k, _) = Message::Hello {
        min_version: 1,
        max_version: VERSION,
        features: 0,
        nonce: [1; 32],
    }
    .encode();
    slow.write_all(&k.to_le_bytes()).unwrap();
    let silent = TcpStream::connect(&addr).unwrap();
    let mut huge = TcpStream::connect(&addr).unwrap();
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&k.to_le_bytes());
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&(16u32 << 20).to_le_bytes());
    huge.write_all(&hdr).unwrap();
    let err = still_serves(rx, &addr, "strangers");
    assert!(err.contains("exceeds the 8192 byte cap"), "{err}");
    // The source was served while both strangers still held their connections (their
    // greeting deadline is 60 s): it never queued behind them.
    assert!(!err.contains("waiting for Hello"), "{err}");
    drop((slow, silent, huge));
}

#[test]
fn more_ram_than_the_destination_accepts_is_refused_before_allocating() {
    let (rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &["--backend", "memory", "--max-memory-mib", "64"],
    );
    let mut c = TcpStream::connect(&addr).unwrap();
    let token = authenticate(&mut c);
    send_config(
        &mut c,
        config(livemig_engine::vm::memory_only::MACHINE, 1 << 20),
        token,
    );
    match recv(&mut c) {
        Message::Refuse { reason } => assert!(reason.contains("at most 64 MiB"), "{reason}"),
        m => panic!("expected Refuse, got {m:?}"),
    }
    let (code, err) = rx.wait_exit(Duration::from_secs(20));
    assert_clean_error(code, &err, "accepts at most");
}

#[test]
fn a_silent_source_cannot_hold_the_destination() {
    let (rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &["--backend", "memory", "--timeout-secs", "2"],
    );
    let (_c, token) = handshake(&addr);
    let _d = data_channel(&addr, token);
    // Connected, authenticated, channels open — and then nothing.
    let (code, err) = rx.wait_exit(Duration::from_secs(30));
    assert_clean_error(code, &err, "sent neither pages nor device state");
}

/// A Linux VM with a bad kernel, initrd, disk or tap is refused with one clear error naming it,
/// before anything starts (no control socket, no VM).
#[test]
fn a_linux_vm_with_bad_files_or_devices_is_refused_before_anything_starts() {
    let dir = tmpdir("linux-bad");
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let kernel = junk.to_str().unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = disk.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--kernel", kernel],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (
            &["--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (
            &["--kernel", kernel, "--initrd", "/nonexistent/initrd.img"],
            "/nonexistent/initrd.img",
        ),
        (
            &["--kernel", kernel, "--disk", "/nonexistent/disk.img"],
            "/nonexistent/disk.img",
        ),
        (
            &["--kernel", kernel, "--disk", dir.to_str().unwrap()],
            "Is a directory",
        ),
        (
            &[
                "--kernel",
                kernel,
                "--disk",
                disk,
                "--net",
                "tap=nosuchtap9",
            ],
            "no tap device \"nosuchtap9\"",
        ),
    ];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let sock = dir.join(format!("vm{i}.sock"));
        let mut all = vec![
            "run-vm",
            "--socket",
            sock.to_str().unwrap(),
            "--memory",
            "64",
        ];
        all.extend_from_slice(args);
        let p = spawn(&[], &all);
        let (code, err) = p.wait_exit(Duration::from_secs(20));
        assert_clean_error(code, &err, needle);
        assert_eq!(
            err.matches(needle).count(),
            1,
            "the cause is said once: {err}"
        );
        assert!(!sock.exists(), "case {i}: a control socket was created");
    }
}
