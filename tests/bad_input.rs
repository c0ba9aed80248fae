//! A hostile peer, before and after authentication: a destination fed garbage, truncated
//! streams, out-of-range, misaligned, replayed or unsealed pages, bad device state, messages
//! out of order or a newer protocol ends the session with a clear error, within its deadline,
//! and never panics; strangers never stop it from serving a real source. After
//! authentication the hostile source speaks the sealed protocol (its own keys), so what is
//! tested is what a compromised source could do.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use livemig_engine::auth::{Direction, Key, SessionKeys};
use livemig_engine::memory::RamLayout;
use livemig_engine::protocol::{Message, FEATURE_ROUND_COUNTS, FEATURE_SEALED, VERSION};
use livemig_engine::session::{Control, MigrationError};
use livemig_engine::storage::StorageMode;
use livemig_engine::vm::{builtin_guest, VmConfig, VmSpec};
use livemig_transport::frame;
use livemig_transport::seal::Sealer;

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

/// An authenticated, sealed control connection, as a (hostile) source holds it.
struct Session {
    ctl: Control,
    token: u64,
    keys: SessionKeys,
}

impl Session {
    fn send(&mut self, m: &Message) {
        let _ = self.ctl.send(m);
    }

    /// The destination's next message; a Refuse becomes its reason.
    fn recv(&mut self) -> Result<Message, String> {
        match self.ctl.recv(Some(Duration::from_secs(20)), "test") {
            Ok(m) => Ok(m),
            Err(MigrationError::Refused { reason, .. }) => Err(reason),
            Err(e) => panic!("{e}"),
        }
    }
}

/// Hello, Welcome and Auth with the test key, offering to seal the session (as every source
/// with a key does); the control connection is sealed from here on.
fn authenticate(c: TcpStream) -> Session {
    let key = Key::new(TEST_KEY.as_bytes()).unwrap();
    let nonce_s = [7u8; 32];
    let mut ctl = Control::new(c);
    ctl.send(&Message::Hello {
        min_version: 1,
        max_version: VERSION,
        features: FEATURE_SEALED | FEATURE_ROUND_COUNTS,
        nonce: nonce_s,
    })
    .unwrap();
    let Ok(Message::Welcome {
        nonce,
        proof,
        features,
        ..
    }) = ctl.recv(Some(Duration::from_secs(20)), "test")
    else {
        panic!("no Welcome")
    };
    assert_eq!(proof, key.destination_proof(&nonce_s, &nonce));
    assert_eq!(features & FEATURE_SEALED, FEATURE_SEALED);
    ctl.send(&Message::Auth {
        proof: key.source_proof(&nonce_s, &nonce),
    })
    .unwrap();
    ctl.authenticated();
    let keys = key.session_keys(&nonce_s, &nonce, &ctl.transcript());
    ctl.seal(keys.clone(), Direction::ToDestination);
    Session {
        ctl,
        token: key.session_token(&nonce_s, &nonce),
        keys,
    }
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
fn send_config(c: &mut Session, vm: VmConfig) {
    let token = c.token;
    c.send(&Message::Config {
        vm,
        channels: 1,
        token,
    });
    // A destination that refuses the Config may be gone before this arrives.
    c.send(&Message::Storage {
        mode: StorageMode::Shared,
        directory: String::new(),
        disks: Vec::new(),
    });
}

/// Handshake + config for a 16 MiB VM; returns the session once Ready.
fn handshake(addr: &str) -> Session {
    let mut c = authenticate(TcpStream::connect(addr).unwrap());
    send_config(&mut c, config(livemig_engine::vm::memory_only::MACHINE, 16));
    assert_eq!(c.recv(), Ok(Message::Ready));
    c
}

/// Data channel 0 of the session, bound by its sealed token record (`token`: the token it
/// proves, normally the session's).
fn data_channel(addr: &str, s: &Session, token: u64) -> DataChannel {
    let mut d = TcpStream::connect(addr).unwrap();
    send(&mut d, &Message::ChannelHello { token: 0, index: 0 });
    let mut seal = Sealer::new(&s.keys.key(1, Direction::ToDestination));
    let mut rec = Vec::new();
    seal.seal_append(&[], &token.to_le_bytes(), &mut rec);
    d.write_all(&rec).unwrap();
    DataChannel { stream: d, seal }
}

/// A sealed data channel.
struct DataChannel {
    stream: TcpStream,
    seal: Sealer,
}

impl DataChannel {
    /// Sends a data message (header and table) and its `body`, sealed as the protocol
    /// says: header, table, body each a record.
    fn send(&mut self, message: &[u8], body: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::new();
        self.seal.seal_append(&[], &message[..16], &mut out);
        if message.len() > 16 {
            self.seal.seal_append(&[], &message[16..], &mut out);
        }
        if !body.is_empty() {
            self.seal.seal_append(&[], body, &mut out);
        }
        self.stream.write_all(&out)
    }
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
    let c = handshake(&addr);
    let mut d = data_channel(&addr, &c, c.token);
    let _ = d.send(&extents_message(16 << 20, 4096), &[0xaa; 4096]);
    let (code, err) = rx.wait_exit(Duration::from_secs(20));
    assert_clean_error(code, &err, "outside registered memory");
}

#[test]
fn truncated_stream_is_an_error() {
    let (rx, addr) = destination();
    let c = handshake(&addr);
    let mut d = data_channel(&addr, &c, c.token);
    // The header and table, then 1000 of the 8192 bytes announced.
    d.send(&extents_message(0, 8192), &[]).unwrap();
    d.stream.write_all(&[0x55; 1000]).unwrap();
    drop(d);
    drop(c);
    let (code, err) = rx.wait_exit(Duration::from_secs(20));
    assert_clean_error(code, &err, "closed");
}

#[test]
fn wrong_token_data_channel_is_not_accepted() {
    let (rx, addr) = destination();
    let mut c = handshake(&addr);
    // A wrong token, and a token shown in clear in the ChannelHello: both dropped.
    let d = data_channel(&addr, &c, c.token.wrapping_add(1));
    let mut clear = TcpStream::connect(&addr).unwrap();
    send(
        &mut clear,
        &Message::ChannelHello {
            token: c.token,
            index: 0,
        },
    );
    for mut s in [d.stream, clear] {
        let mut buf = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    }
    // The session itself can still be aborted cleanly by its source.
    c.send(&Message::Abort {
        reason: "test over".into(),
    });
    let (code, err) = rx.wait_exit(Duration::from_secs(30));
    assert_clean_error(code, &err, "aborted");
}

#[test]
fn a_vm_of_another_machine_is_refused_before_any_page() {
    let (rx, addr) = destination();
    let mut c = authenticate(TcpStream::connect(&addr).unwrap());
    send_config(&mut c, config(livemig_engine::vm::kvm::MACHINE, 16));
    match c.recv() {
        Err(reason) => assert!(reason.contains("--backend"), "{reason}"),
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
    let mut c = authenticate(TcpStream::connect(&addr).unwrap());
    send_config(
        &mut c,
        config(livemig_engine::vm::memory_only::MACHINE, 1 << 20),
    );
    match c.recv() {
        Err(reason) => assert!(reason.contains("at most 64 MiB"), "{reason}"),
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
    let c = handshake(&addr);
    let _d = data_channel(&addr, &c, c.token);
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

/// A data message: the marker ending `round`, which sent `pages` pages on its channel.
fn marker(round: u64, pages: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&4u16.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&round.to_le_bytes());
    v.extend_from_slice(&pages.to_le_bytes());
    v
}

/// An authenticated source turned hostile. Each case runs against its own destination
/// (deadline 3 s), which must end with a clear error naming the problem, no panic, well
/// within its deadline, and nothing resumed.
#[test]
fn a_hostile_authenticated_source_is_refused_cleanly() {
    type Case = (&'static str, &'static str, fn(&str, &mut Session));
    let cases: [Case; 10] = [
        (
            "a round missing pages",
            "sent 2 pages, 1 arrived",
            |addr, c| {
                let mut d = data_channel(addr, c, c.token);
                d.send(&extents_message(0, 4096), &[3; 4096]).unwrap();
                let _ = d.send(&marker(0, 2), &[]);
            },
        ),
        ("misaligned extent", "bad Raw entry", |addr, c| {
            let mut d = data_channel(addr, c, c.token);
            let _ = d.send(&extents_message(0x1800, 4096), &[1; 4096]);
        }),
        ("part of a page", "bad Raw entry", |addr, c| {
            let mut d = data_channel(addr, c, c.token);
            let _ = d.send(&extents_message(0, 16), &[1; 16]);
        }),
        (
            "wrapping address",
            "outside registered memory",
            |addr, c| {
                let mut d = data_channel(addr, c, c.token);
                let _ = d.send(&extents_message(u64::MAX - 0xfff, 4096), &[1; 4096]);
            },
        ),
        ("commit out of order", "unexpected Commit", |addr, c| {
            let _d = data_channel(addr, c, c.token);
            c.send(&Message::Commit);
            std::thread::sleep(Duration::from_millis(500));
        }),
        ("bad device state", "section", |addr, c| {
            let mut d = data_channel(addr, c, c.token);
            d.send(&extents_message(0, 4096), &[3; 4096]).unwrap();
            d.send(&marker(0, 1), &[]).unwrap();
            c.send(&Message::DeviceState {
                final_round: 0,
                sections: vec![livemig_engine::vm::DeviceSection {
                    id: 0xdead,
                    instance: 7,
                    version: 99,
                    data: vec![0xff; 100],
                }],
            });
            // The source's rollback path: it hears the refusal.
            assert!(c.recv().is_err());
        }),
        ("final round never sent", "timed out", |addr, c| {
            let _d = data_channel(addr, c, c.token);
            c.send(&Message::DeviceState {
                final_round: 5,
                sections: Vec::new(),
            });
            std::thread::sleep(Duration::from_secs(5));
        }),
        (
            "pages in clear on a sealed channel",
            "failed authentication",
            |addr, c| {
                let mut d = data_channel(addr, c, c.token);
                let mut m = extents_message(0, 4096);
                m.extend_from_slice(&[0x42; 4096]);
                let _ = d.stream.write_all(&m);
            },
        ),
        (
            "a replayed page batch",
            "failed authentication",
            |addr, c| {
                let mut d = data_channel(addr, c, c.token);
                // The same sealed records twice: the second copy has the wrong sequence number.
                let mut out = Vec::new();
                let mut twin = Sealer::new(&c.keys.key(1, Direction::ToDestination));
                twin.seal_append(&[], &0u64.to_le_bytes(), &mut Vec::new());
                let m = extents_message(0, 4096);
                twin.seal_append(&[], &m[..16], &mut out);
                twin.seal_append(&[], &m[16..], &mut out);
                twin.seal_append(&[], &[9; 4096], &mut out);
                d.send(&m, &[9; 4096]).unwrap();
                let _ = d.stream.write_all(&out);
            },
        ),
        (
            "control message in clear",
            "failed authentication",
            |_, c| {
                let (k, p) = Message::Abort {
                    reason: "forged by someone on the path".into(),
                }
                .encode();
                let mut s = c.ctl.stream().try_clone().unwrap();
                let _ = frame::write_frame(&mut s, k, &p);
                std::thread::sleep(Duration::from_millis(500));
            },
        ),
    ];
    for (what, needle, attack) in cases {
        let (rx, addr) = receive(
            &[],
            "127.0.0.1:0",
            &["--backend", "memory", "--timeout-secs", "3"],
        );
        let mut c = handshake(&addr);
        attack(&addr, &mut c);
        // Its deadline is 3 s (the longest attack sleeps 5 s): a destination still waiting
        // after 12 s fails the test.
        let (code, err) = rx.wait_exit(Duration::from_secs(12));
        println!("{what}: {}", err.trim());
        assert_clean_error(code, &err, needle);
        assert!(err.contains("nothing was resumed here"), "{what}: {err}");
    }
}

/// A source with the key that will not seal the session is refused by a destination that
/// seals (the default), once it proved its key and before any state.
#[test]
fn a_source_that_will_not_encrypt_is_refused_before_any_state() {
    let (rx, addr) = destination();
    let mut c = Control::new(TcpStream::connect(&addr).unwrap());
    let key = Key::new(TEST_KEY.as_bytes()).unwrap();
    let nonce_s = [5u8; 32];
    c.send(&Message::Hello {
        min_version: 1,
        max_version: VERSION,
        features: 0,
        nonce: nonce_s,
    })
    .unwrap();
    let Ok(Message::Welcome {
        nonce, features, ..
    }) = c.recv(Some(Duration::from_secs(20)), "test")
    else {
        panic!("no Welcome")
    };
    assert_eq!(features & FEATURE_SEALED, 0);
    c.send(&Message::Auth {
        proof: key.source_proof(&nonce_s, &nonce),
    })
    .unwrap();
    match c.recv(Some(Duration::from_secs(20)), "test") {
        Err(MigrationError::Refused { reason, .. }) => {
            assert!(reason.contains("does not encrypt"), "{reason}")
        }
        m => panic!("expected Refuse, got {m:?}"),
    }
    let err = still_serves(rx, &addr, "unsealed");
    assert!(err.contains("does not encrypt"), "{err}");
}

/// Strangers that connect to the data port and say nothing delay no real channel: the
/// session's channels are greeted beside them and the switchover goes on.
#[test]
fn idle_strangers_on_the_data_port_do_not_delay_the_channels() {
    let (rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &["--backend", "memory", "--timeout-secs", "30"],
    );
    let mut c = handshake(&addr);
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut d = data_channel(&addr, &c, c.token);
    d.send(&extents_message(0, 4096), &[3; 4096]).unwrap();
    d.send(&marker(0, 1), &[]).unwrap();
    c.send(&Message::DeviceState {
        final_round: 0,
        sections: vec![livemig_engine::vm::DeviceSection {
            id: livemig_engine::vm::memory_only::SECTION_WRITER,
            instance: 0,
            version: 1,
            data: 0u64.to_le_bytes().to_vec(),
        }],
    });
    // Each stranger may be waited on for 10 s: Prepared later than 8 s would mean the
    // channel queued behind them, and the read fails then.
    let m = c.ctl.recv(Some(Duration::from_secs(8)), "test");
    if !matches!(m, Ok(Message::Prepared { .. })) {
        let (_, err) = rx.wait_exit(Duration::from_secs(30));
        panic!("{m:?}: {err}");
    }
    c.send(&Message::Abort {
        reason: "test over".into(),
    });
    let (code, err) = rx.wait_exit(Duration::from_secs(30));
    assert_clean_error(code, &err, "aborted");
    drop(idle);
}
