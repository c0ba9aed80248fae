//! Older sources migrate to newer destinations: migrations recorded from a protocol-1 and a
//! protocol-2 source (tests/fixtures/protocol-v1, protocol-v2) are replayed into today's
//! destination, which converts their configuration and sections on load; the VM resumes with
//! the source's RAM and keeps running.
//! And a newer source is refused up front by an older destination, both versions named.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use livemig_engine::protocol::{Message, MessageType, MIN_VERSION, VERSION};
use livemig_transport::frame;

/// The recorded sources' RAM digests at pause (see each fixture's README).
const V1_DIGEST: u64 = 0x25af_869a_37ec_5424;
const V2_DIGEST: u64 = 0x3f78_99be_19cd_51e5;

fn fixture(version: u16, name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/protocol-v{version}"))
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The frames of a recorded control stream: (kind, whole frame bytes).
fn frames(mut bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let whole = bytes;
        let (kind, payload) = frame::read_frame(&mut bytes, 16 << 20, "fixture").unwrap();
        let n = frame::HEADER_LEN + payload.len();
        out.push((kind, whole[..n].to_vec()));
    }
    out
}

fn reply(c: &mut TcpStream) -> Message {
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (k, p) = frame::read_frame(c, 16 << 20, "destination").unwrap();
    Message::decode(k, &p).unwrap_or_else(|e| panic!("reply kind {k}: {e}"))
}

#[test]
fn a_recorded_protocol_1_migration_resumes_on_todays_destination() {
    replay(1, V1_DIGEST);
}

#[test]
fn a_recorded_protocol_2_migration_resumes_on_todays_destination() {
    replay(2, V2_DIGEST);
}

/// Replays the recorded migration of protocol `version` into a fresh destination.
fn replay(version: u16, source_digest: u64) {
    assert!(version < VERSION, "a recording of an older version");
    assert!(kvm_available(), "this test needs /dev/kvm");
    let dir = tmpdir(&format!("v{version}-replay"));
    let sock = dir.join("dst.sock");
    let (_rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &["--no-auth", "--socket", sock.to_str().unwrap()],
    );
    let control = frames(&fixture(version, "conn-0.bin"));
    assert_eq!(control[0].0, MessageType::Hello as u16);
    let mut c = TcpStream::connect(&addr).unwrap();
    let mut data = Vec::new();
    let mut digest = None;
    for (i, (kind, bytes)) in control.iter().enumerate() {
        c.write_all(bytes).unwrap();
        let next = control.get(i + 1).map(|(k, _)| *k);
        match MessageType::try_from(*kind).unwrap() {
            MessageType::Hello => match reply(&mut c) {
                Message::Welcome { version: v, .. } => {
                    assert_eq!(v, version, "a stream is decoded by its own version")
                }
                m => panic!("expected Welcome, got {m:?}"),
            },
            // Protocol 2 and later follow Config with Storage; Ready answers the last.
            MessageType::Config if next == Some(MessageType::Storage as u16) => {}
            MessageType::Config | MessageType::Storage => {
                assert_eq!(reply(&mut c), Message::Ready);
                for name in ["conn-1.bin", "conn-2.bin"] {
                    let mut d = TcpStream::connect(&addr).unwrap();
                    d.write_all(&fixture(version, name)).unwrap();
                    data.push(d);
                }
            }
            MessageType::DeviceState => match reply(&mut c) {
                Message::Prepared { digest: d, .. } => digest = Some(d),
                m => panic!("expected Prepared, got {m:?}"),
            },
            MessageType::Commit => assert_eq!(reply(&mut c), Message::Resumed),
            _ => {}
        }
    }
    assert_eq!(
        digest,
        Some(source_digest),
        "the destination's RAM is not the recorded source's"
    );
    assert!(matches!(reply(&mut c), Message::Progress { .. }));
    // The guest runs on: its counter keeps moving.
    let c1 = wait_counter_beyond(&sock, 0);
    wait_counter_beyond(&sock, c1);
    request(&sock, r#"{"cmd":"stop"}"#);
}

#[test]
fn a_newer_source_is_refused_by_this_destination_naming_both_versions() {
    let (rx, addr) = receive(&[], "127.0.0.1:0", &["--backend", "memory"]);
    let mut c = TcpStream::connect(&addr).unwrap();
    let (k, p) = Message::Hello {
        min_version: VERSION + 1,
        max_version: VERSION + 1,
        features: 0,
        nonce: [0; 32],
    }
    .encode();
    frame::write_frame(&mut c, k, &p).unwrap();
    match reply(&mut c) {
        Message::Refuse { reason } => {
            assert!(
                reason.contains(&format!("{}..={}", VERSION + 1, VERSION + 1)),
                "{reason}"
            );
            assert!(
                reason.contains(&format!("{MIN_VERSION}..={VERSION}")),
                "{reason}"
            );
            assert!(reason.contains("newer"), "{reason}");
        }
        m => panic!("expected Refuse, got {m:?}"),
    }
    // The destination logs the refusal and goes on waiting for a source it can take.
    std::thread::sleep(Duration::from_millis(300));
    let err = rx.kill_running();
    assert!(
        err.contains("refused a connection") && err.contains("newer"),
        "{err}"
    );
}
