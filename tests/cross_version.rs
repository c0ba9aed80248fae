//! Older sources migrate to newer destinations: migrations recorded from a protocol-1 and a
//! protocol-2 source (tests/fixtures/protocol-v1, protocol-v2-amd, protocol-v2-intel) are
//! replayed into today's destination, which converts their configuration and sections on load;
//! the VM resumes with the source's RAM and keeps running. A recording holds its host's KVM
//! structures (MSR list, XSAVE size): the protocol-2 one made on a host of this host's CPU
//! vendor must resume; the other vendor's may be refused before the VM resumes, never lost.
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
const V2_INTEL_DIGEST: u64 = 0x3f78_99be_19cd_51e5;
const V2_AMD_DIGEST: u64 = 0xb501_bdcd_9c00_893d;

/// A protocol-2 recording: its fixture directory and its source's RAM digest at pause.
type Recording = (&'static str, u64);

/// The protocol-2 recordings: (made on a host of this host's CPU vendor, made on the other).
fn v2_recordings() -> (Recording, Recording) {
    let intel = ("protocol-v2-intel", V2_INTEL_DIGEST);
    let amd = ("protocol-v2-amd", V2_AMD_DIGEST);
    let r = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [r.ebx, r.edx, r.ecx]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    match &vendor[..] {
        b"AuthenticAMD" => (amd, intel),
        b"GenuineIntel" => (intel, amd),
        v => panic!(
            "no protocol-2 recording made on a {} host: record one (tests/fixtures/protocol-v2-amd/README.md says how)",
            String::from_utf8_lossy(v)
        ),
    }
}

fn fixture(dir: &str, name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir)
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
    let outcome = replay(1, "protocol-v1", V1_DIGEST);
    assert_eq!(outcome, Ok(()));
}

/// The same vendor's recording resumes — unless this host's processor lacks a feature whose
/// state the recording holds: then it is refused before Prepared, naming the XSAVE
/// components (a host of the same vendor without PKU, as under some nested hypervisors,
/// cannot hold the recording's PKRU; a protocol-2 source sent no CPU to check up front).
#[test]
fn a_recorded_protocol_2_migration_resumes_on_todays_destination() {
    let ((dir, digest), _) = v2_recordings();
    match replay(2, dir, digest) {
        Ok(()) => {}
        Err(reason)
            if reason.contains("device state section 4")
                && reason.contains("XSAVE components")
                && reason.contains("does not offer") =>
        {
            println!("{dir}: refused before resume: {reason}")
        }
        Err(reason) => panic!("{dir}: {reason}"),
    }
}

/// The other CPU vendor's recording: its MSRs and XSAVE layout are another host kind's. It
/// resumes if this host's KVM can hold all of it, or is refused before Prepared with the state
/// section named and the MSR or the XSAVE components this host cannot hold; either way the
/// destination neither crashes nor runs a half-restored VM. (On AMD, the Intel recording is
/// refused: its IA32_ARCH_CAPABILITIES, 0x10a, holds bits AMD's KVM does not offer; on an
/// Intel host without PKU, the AMD recording is refused for its PKRU state.)
#[test]
fn another_cpu_vendors_protocol_2_recording_resumes_or_is_refused_before_resume() {
    let (_, (dir, digest)) = v2_recordings();
    if let Err(reason) = replay(2, dir, digest) {
        println!("{dir}: refused before resume: {reason}");
        let xsave = reason.contains("XSAVE components") && reason.contains("does not offer");
        assert!(
            reason.contains("device state section") && (reason.contains("MSR") || xsave),
            "{dir}: {reason}"
        );
    }
}

/// Replays the recorded migration of protocol `version` (fixture directory `dir`) into a fresh
/// destination: Ok once the VM resumed with the recorded RAM and runs on, or the reason the
/// destination refused the device state with (after which it must hold no running VM).
fn replay(version: u16, dir: &str, source_digest: u64) -> Result<(), String> {
    assert!(version < VERSION, "a recording of an older version");
    assert!(kvm_available(), "this test needs /dev/kvm");
    let tmp = tmpdir(&format!("v{version}-replay"));
    let sock = tmp.join("dst.sock");
    let (_rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &["--no-auth", "--socket", sock.to_str().unwrap()],
    );
    let control = frames(&fixture(dir, "conn-0.bin"));
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
                    d.write_all(&fixture(dir, name)).unwrap();
                    data.push(d);
                }
            }
            MessageType::DeviceState => match reply(&mut c) {
                Message::Prepared { digest: d, .. } => digest = Some(d),
                Message::Refuse { reason } => {
                    // Refused before Prepared: the VM must not run here.
                    std::thread::sleep(Duration::from_millis(300));
                    let running = std::os::unix::net::UnixStream::connect(&sock).is_ok()
                        && request(&sock, r#"{"cmd":"status"}"#)["guest_counter"].is_u64();
                    assert!(!running, "refused ({reason}), yet a VM runs here");
                    return Err(reason);
                }
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
    Ok(())
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
