//! The engine end to end over loopback TCP with a memory-only VM (no KVM needed): real
//! scheduler, transport, protocol and switchover.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use livemig_engine::destination::{receive, Hashing, IncomingOptions};
use livemig_engine::digest::ram_digest;
use livemig_engine::memory::GuestRam;
use livemig_engine::session::MigrationError;
use livemig_engine::source::{migrate, MigrateOptions};
use livemig_engine::vm::memory_only::MemoryVm;
use livemig_engine::vm::{MigratableVm, RunState, VmConfig, VmError, VmSpec, Workload};
use vm_memory::{Bytes, GuestAddress};

fn spec(mib: u64, rate: u64) -> VmSpec {
    VmSpec {
        memory_mib: mib,
        vcpus: 1,
        workload: Workload {
            working_set_mib: 16,
            dirty_rate: rate,
            ..Workload::default()
        },
        ..VmSpec::default()
    }
}

fn fill(ram: &GuestRam) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for off in (0..ram.total_bytes()).step_by(512) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ram.memory().write_obj(x, GuestAddress(off)).unwrap();
    }
}

fn factory(
    config: &VmConfig,
    ram: GuestRam,
    _disks: &[(String, std::path::PathBuf)],
) -> Result<Arc<dyn MigratableVm>, VmError> {
    Ok(Arc::new(MemoryVm::new_incoming(config, ram)?))
}

fn run(
    mib: u64,
    rate: u64,
    channels: u16,
    downtime_ms: u64,
) -> (
    livemig_engine::session::MigrationReport,
    Arc<dyn MigratableVm>,
    MemoryVm,
) {
    run_hashing(mib, rate, channels, downtime_ms, Hashing::Auto)
}

/// As [`run`], the destination's receivers hashing the pages they land as `hashing` says.
fn run_hashing(
    mib: u64,
    rate: u64,
    channels: u16,
    downtime_ms: u64,
    hashing: Hashing,
) -> (
    livemig_engine::session::MigrationReport,
    Arc<dyn MigratableVm>,
    MemoryVm,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        receive(
            &listener,
            IncomingOptions {
                timeout: Duration::from_secs(20),
                progress_wait: Duration::from_secs(2),
                receiver_hashing: hashing,
                ..Default::default()
            },
            &factory,
        )
    });
    let src = MemoryVm::launch(&spec(mib, rate), fill).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let opts = MigrateOptions {
        channels: Some(channels),
        downtime_limit_ms: downtime_ms,
        ..Default::default()
    };
    let report = migrate(&src, &addr, &opts, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let incoming = dest.join().unwrap().unwrap();
    (report, incoming.vm, src)
}

#[test]
fn idle_memory_vm_migrates_with_matching_digest() {
    let (report, dest, src) = run(64, 0, 1, 300);
    assert_eq!(report.status, "completed");
    assert!(report.digest_match);
    assert!(report.rounds >= 2);
    assert!(report.guest_progress_after_resume > 0, "{report:?}");
    assert_eq!(dest.run_state(), RunState::Running);
    assert_eq!(src.run_state(), RunState::Paused);
    // The destination's RAM at pause equals the source's (the writer only moved the counter
    // page since resume).
    dest.pause().unwrap();
    let _ = ram_digest(dest.ram());
}

#[test]
fn busy_memory_vm_takes_several_rounds_over_two_channels() {
    // A tiny downtime limit forces extra rounds while the writer keeps dirtying pages.
    let (report, _dest, _src) = run(64, 20_000, 2, 1);
    assert!(report.digest_match, "{report:?}");
    assert!(report.rounds >= 3, "{report:?}");
    assert_eq!(report.channels, 2);
    assert!(report.pages_sent > 64 * 256);
}

#[test]
fn receivers_hashing_beside_or_inline_agree_with_the_source_over_several_rounds() {
    // A 2-core host (CI) chooses inline; each way is run here whatever the host, with pages
    // re-sent in later rounds (the last hash of each page must be of its last landing).
    for hashing in [Hashing::Beside, Hashing::Inline] {
        let (report, _dest, _src) = run_hashing(64, 20_000, 2, 1, hashing);
        assert_eq!(report.status, "completed", "{hashing:?}: {report:?}");
        assert!(report.digest_match, "{hashing:?}: {report:?}");
        assert!(report.rounds >= 3, "{hashing:?}: {report:?}");
    }
}

#[test]
fn destination_vanishing_leaves_the_source_running() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // A "destination" that accepts the connection and vanishes.
    let dest = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        drop(s);
    });
    let src = MemoryVm::launch(&spec(32, 1000), fill).unwrap();
    let before = src.progress().unwrap();
    let err = migrate(
        &src,
        &addr,
        &MigrateOptions::default(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    dest.join().unwrap();
    assert!(
        !matches!(err, MigrationError::OutcomeUnknown { .. }),
        "{err}"
    );
    assert_eq!(src.run_state(), RunState::Running);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while src.progress().unwrap() <= before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        src.progress().unwrap() > before,
        "source guest keeps running"
    );
}
