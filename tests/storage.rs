//! Storage that moves with the VM: shared-nothing copies (bulk copy of allocated extents,
//! dirty-block rounds, active mirroring, digests) and shared-storage lock handover, with the
//! built-in guest's disk writer.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use livemig_engine::destination::{self, IncomingOptions};
use livemig_engine::devices::disk_writer::DiskWriterSpec;
use livemig_engine::source::{self, MigrateOptions};
use livemig_engine::storage::image::DiskImage;
use livemig_engine::storage::StorageMode;
use livemig_engine::vm::kvm::{HostResources, KvmVm};
use livemig_engine::vm::memory_only::MemoryVm;
use livemig_engine::vm::{MigratableVm, Pattern, VmSpec};

/// A sparse image of `size` bytes with `written` MiB of random data in four runs.
fn sparse_image(path: &Path, size: u64, written_mib: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut buf = vec![0u8; 1 << 20];
    let quarter = written_mib.div_ceil(4);
    let mut left = written_mib;
    for run in 0..4u64 {
        let at = run * (size / 4) + (1 << 20);
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(at)).unwrap();
        for _ in 0..quarter.min(left) {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
        left = left.saturating_sub(quarter);
    }
    f.sync_all().unwrap();
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn digest(path: &Path) -> String {
    let d = DiskImage::open(path, true, false)
        .unwrap()
        .digest()
        .unwrap();
    format!("{d:016x}")
}

/// Whether a second VM may write `image`: a run-vm on it must be refused, naming the lock.
fn second_writer_refused(dir: &Path, image: &Path) {
    let sock = dir.join(format!("second-{}.sock", std::process::id()));
    let p = spawn(
        &[],
        &[
            "run-vm",
            "--socket",
            sock.to_str().unwrap(),
            "--memory",
            "16",
            "--disk",
            image.to_str().unwrap(),
        ],
    );
    let (code, err) = p.wait_exit(Duration::from_secs(30));
    assert_clean_error(code, &err, "in use");
}

#[test]
fn copy_mode_moves_a_sparse_disk_while_the_guest_writes() {
    let dir = tmpdir("copy");
    let src_img = dir.join("disk.img");
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&dst_dir).unwrap();
    sparse_image(&src_img, 1 << 30, 256);
    let writer = DiskWriterSpec {
        path: src_img.clone(),
        rate_mb_s: 20.0,
        pattern: Pattern::Random,
        span_mib: 0,
    };
    let spec = VmSpec {
        memory_mib: 64,
        ..VmSpec::default()
    };
    let kvm = kvm_available();
    let vm: Arc<dyn MigratableVm> = if kvm {
        Arc::new(KvmVm::launch_with_disk(&spec, Some(&writer)).unwrap())
    } else {
        Arc::new(MemoryVm::launch_with_disk(&spec, Some(&writer), |_| {}).unwrap())
    };
    // The writer runs for a while before the migration starts.
    std::thread::sleep(Duration::from_millis(500));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let dst_dir2 = dst_dir.clone();
    let dest = std::thread::spawn(move || {
        // The destination's disk keeps a record of what its guest writes after resume, so
        // the copy can be compared with the source image block by block.
        let factory = |config: &livemig_engine::vm::VmConfig, ram, placed: &[(String, PathBuf)]| {
            let vm: Arc<dyn MigratableVm> = if kvm {
                let host = HostResources {
                    disks: placed.to_vec(),
                    ..HostResources::default()
                };
                Arc::new(KvmVm::new_incoming(config, ram, &host)?)
            } else {
                Arc::new(MemoryVm::new_incoming_with_disks(config, ram, placed)?)
            };
            for d in vm.disks() {
                d.image.start_tracking();
            }
            Ok(vm)
        };
        destination::receive(
            &listener,
            IncomingOptions {
                storage_dir: Some(dst_dir2),
                ..IncomingOptions::default()
            },
            &factory,
        )
        .unwrap()
    });
    let opts = MigrateOptions {
        storage: StorageMode::Copy,
        ..MigrateOptions::default()
    };
    let report = source::migrate(&*vm, &to, &opts, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let incoming = dest.join().unwrap();
    incoming.vm.pause().unwrap();
    let after_resume = incoming.vm.disks()[0].image.take_dirty();
    incoming.vm.shutdown();
    vm.shutdown();

    assert_eq!(report.status, "completed");
    assert!(report.digest_match);
    let storage = report.storage.clone().expect("disk figures in the report");
    assert_eq!(storage.mode, "copy");
    assert!(storage.bytes_copied >= 256 << 20, "{storage:?}");
    assert_eq!(storage.disks.len(), 1);
    // The source image is frozen since the pause: its digest is the one the copy was
    // verified against before Prepared.
    assert_eq!(
        storage.disks[0].source_digest,
        digest(&src_img),
        "{storage:?}"
    );
    assert_eq!(
        storage.disks[0].source_digest,
        storage.disks[0].destination_digest
    );

    // Block by block, the copy equals the source, except where the guest wrote after resume.
    let dst_img = dst_dir.join("disk.img");
    let (a, b) = (
        DiskImage::open(&src_img, true, false).unwrap(),
        DiskImage::open(&dst_img, true, false).unwrap(),
    );
    assert_eq!(a.size(), b.size());
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut differing = 0;
    for off in (0..a.size()).step_by(1 << 20) {
        a.read_at(&mut x, off).unwrap();
        b.read_at(&mut y, off).unwrap();
        for (p, (pa, pb)) in x.chunks(4096).zip(y.chunks(4096)).enumerate() {
            let page = off / 4096 + p as u64;
            let rewritten = after_resume
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0);
            if pa != pb && !rewritten {
                differing += 1;
            }
        }
    }
    assert_eq!(
        differing, 0,
        "pages differ outside the guest's writes after resume"
    );
    // Holes stay holes: the copy allocates what the source had allocated.
    let (sa, da) = (allocated(&src_img), allocated(&dst_img));
    let ratio = da as f64 / sa as f64;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "allocated: source {sa}, copy {da}"
    );
    println!(
        "copy: {:.0} MiB of disk blocks, {} rounds, {} blocks in the downtime; total {:.0} ms, \
         downtime {:.1} ms; allocated source {} MiB, copy {} MiB",
        storage.bytes_copied as f64 / (1 << 20) as f64,
        storage.rounds,
        storage.dirty_blocks_in_downtime,
        report.total_time_ms,
        report.downtime_ms,
        sa >> 20,
        da >> 20
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shared_mode_hands_the_lock_over_and_rolls_back_when_the_destination_cannot_take_it() {
    assert!(kvm_available(), "needs /dev/kvm");
    let dir = tmpdir("shared");
    let img = dir.join("shared.img");
    sparse_image(&img, 64 << 20, 16);
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let vm_args = [
        "--memory",
        "64",
        "--dirty-rate",
        "1000",
        "--disk",
        img.to_str().unwrap(),
        "--disk-write-rate",
        "5",
    ];
    let _vm = run_vm(&[], &src, &vm_args);
    second_writer_refused(&dir, &img);
    let (_rx, addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
    let report = migrate_ok(&[], &src, &addr, &["--storage", "shared"]);
    assert_eq!(report["storage"]["mode"], "shared", "{report}");
    assert_eq!(report["storage"]["bytes_copied"], 0, "{report}");
    let c = counter(&dst);
    wait_counter_beyond(&dst, c);
    // The destination holds the lock now.
    second_writer_refused(&dir, &img);
    request(&dst, r#"{"cmd":"stop"}"#);

    // A destination that cannot take the lock (another VM holds the image it would use):
    // the migration rolls back and the source runs on, still holding its own lock.
    let img2 = dir.join("second.img");
    let taken = dir.join("taken.img");
    sparse_image(&img2, 64 << 20, 4);
    sparse_image(&taken, 64 << 20, 4);
    let src2 = dir.join("src2.sock");
    let holder_sock = dir.join("holder.sock");
    let _vm2 = run_vm(
        &[],
        &src2,
        &[
            "--memory",
            "64",
            "--dirty-rate",
            "1000",
            "--disk",
            img2.to_str().unwrap(),
        ],
    );
    let _holder = run_vm(
        &[],
        &holder_sock,
        &["--memory", "16", "--disk", taken.to_str().unwrap()],
    );
    let (rx2, addr2) = receive(
        &[],
        "127.0.0.1:0",
        &["--disk-path", &format!("disk0={}", taken.display())],
    );
    let before = counter(&src2);
    let out = migrate(&[], &src2, &addr2, &["--storage", "shared"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("lock"), "{stderr}");
    assert!(
        stderr.contains("resumed on the source") || stderr.contains("running"),
        "{stderr}"
    );
    let st = request(&src2, r#"{"cmd":"status"}"#);
    assert_eq!(st["run_state"], "running", "{st}");
    wait_counter_beyond(&src2, before);
    second_writer_refused(&dir, &img2);
    let (code, err) = rx2.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0), "the destination must not run the VM: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn copies_are_refused_before_any_byte_moves_and_cancel_leaves_nothing_behind() {
    assert!(kvm_available(), "needs /dev/kvm");
    let dir = tmpdir("refuse");
    let img = dir.join("vm.img");
    sparse_image(&img, 64 << 20, 32);
    let src = dir.join("src.sock");
    let _vm = run_vm(
        &[],
        &src,
        &[
            "--memory",
            "64",
            "--disk",
            img.to_str().unwrap(),
            "--disk-write-rate",
            "5",
        ],
    );
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&dst_dir).unwrap();
    // A destination takes one migration, failed or not: a fresh one per attempt.
    let fails_at = |receive_args: &[&str], args: &[&str], needle: &str| {
        let (_rx, addr) = receive(&[], "127.0.0.1:0", receive_args);
        let out = migrate(&[], &src, &addr, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        let st = request(&src, r#"{"cmd":"status"}"#);
        assert_eq!(st["run_state"], "running", "{st}");
    };
    let fails = |args: &[&str], needle: &str| fails_at(&[], args, needle);
    let d = dst_dir.to_str().unwrap();
    // Shared storage: the destination's image has another size than the source's.
    let other = dir.join("other.img");
    sparse_image(&other, 32 << 20, 1);
    fails_at(
        &["--disk-path", &format!("disk0={}", other.display())],
        &["--storage", "shared"],
        "bytes at the source",
    );
    // An image of that name exists at the destination.
    std::fs::write(dst_dir.join("vm.img"), b"keep me").unwrap();
    fails(&["--storage", "copy", "--storage-dir", d], "exists");
    assert_eq!(std::fs::read(dst_dir.join("vm.img")).unwrap(), b"keep me");
    std::fs::remove_file(dst_dir.join("vm.img")).unwrap();
    // No directory anywhere, a missing one, options of copies on shared storage.
    fails(&["--storage", "copy"], "--storage-dir");
    fails(
        &["--storage", "copy", "--storage-dir", "/nonexistent/x"],
        "/nonexistent/x",
    );
    fails(&["--storage-dir", d], "copy");
    fails(&["--remove-source-storage"], "copy");
    // Copies travel over TCP.
    fails(
        &[
            "--storage",
            "copy",
            "--storage-dir",
            d,
            "--transport",
            "rdma",
        ],
        "--transport tcp",
    );
    // Too little space: a 4 MiB tmpfs for 32 MiB of allocated blocks.
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            small.to_str().unwrap(),
        ])
        .status()
        .unwrap()
        .success();
    assert!(mounted, "mounting a small tmpfs (root is needed)");
    fails(
        &[
            "--storage",
            "copy",
            "--storage-dir",
            small.to_str().unwrap(),
        ],
        "not enough space",
    );
    let _ = std::process::Command::new("umount").arg(&small).status();

    // Cancel in the middle of a copy that never converges: the partial copy disappears,
    // the source runs on and keeps its lock.
    let (_rx, addr) = receive(&[], "127.0.0.1:0", &[]);
    let sock = src.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        request(&sock, r#"{"cmd":"cancel"}"#)
    });
    let out = migrate(
        &[],
        &src,
        &addr,
        &["--storage", "copy", "--storage-dir", d]
            .iter()
            .chain(ENDLESS)
            .copied()
            .collect::<Vec<_>>(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(canceller.join().unwrap()["cancel_requested"] == true);
    assert!(stderr.contains("cancelled"), "{stderr}");
    std::thread::sleep(Duration::from_millis(500));
    let left: Vec<_> = std::fs::read_dir(&dst_dir).unwrap().collect();
    assert!(left.is_empty(), "partial images left: {left:?}");
    assert_eq!(request(&src, r#"{"cmd":"status"}"#)["run_state"], "running");
    second_writer_refused(&dir, &img);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pass_through_disk_is_refused_for_copies_and_source_images_go_only_when_asked() {
    assert!(kvm_available(), "needs /dev/kvm");
    let dir = tmpdir("passthrough");
    let backing = dir.join("backing.img");
    sparse_image(&backing, 16 << 20, 1);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", backing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let src = dir.join("src.sock");
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&dst_dir).unwrap();
    {
        let _vm = run_vm(&[], &src, &["--memory", "32", "--disk", &loopdev]);
        let (_rx, addr) = receive(&[], "127.0.0.1:0", &[]);
        let out = migrate(
            &[],
            &src,
            &addr,
            &[
                "--storage",
                "copy",
                "--storage-dir",
                dst_dir.to_str().unwrap(),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("pass-through"), "{stderr}");
        assert_eq!(request(&src, r#"{"cmd":"status"}"#)["run_state"], "running");
    }
    let _ = std::process::Command::new("losetup")
        .args(["-d", &loopdev])
        .status();

    // --remove-source-storage: the source image goes once the destination runs on its copy.
    let img = dir.join("moved.img");
    sparse_image(&img, 32 << 20, 8);
    let src2 = dir.join("src2.sock");
    let dst = dir.join("dst.sock");
    let _vm = run_vm(
        &[],
        &src2,
        &["--memory", "32", "--disk", img.to_str().unwrap()],
    );
    let before = digest(&img);
    let (_rx, addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
    let report = migrate_ok(
        &[],
        &src2,
        &addr,
        &[
            "--storage",
            "copy",
            "--storage-dir",
            dst_dir.to_str().unwrap(),
            "--remove-source-storage",
        ],
    );
    assert_eq!(report["storage"]["source_removed"], true, "{report}");
    assert!(!img.exists(), "the source image should be gone");
    request(&dst, r#"{"cmd":"stop"}"#);
    std::thread::sleep(Duration::from_millis(300));
    // The writer is idle: the copy holds exactly what the source held.
    assert_eq!(digest(&dst_dir.join("moved.img")), before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_heavy_guest_converges_through_active_mirroring_over_1_gbit() {
    assert!(kvm_available(), "needs /dev/kvm");
    let h = hosts("mir", "1gbit");
    let dir = tmpdir("mirror");
    let img = dir.join("busy.img");
    sparse_image(&img, 256 << 20, 64);
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&dst_dir).unwrap();
    let src = dir.join("src.sock");
    let a = NetnsHosts::exec(&h.ns_a);
    let b = NetnsHosts::exec(&h.ns_b);
    let _vm = run_vm(
        &a,
        &src,
        &[
            "--memory",
            "64",
            "--disk",
            img.to_str().unwrap(),
            "--disk-write-rate",
            "200",
            "--disk-write-span",
            "128",
        ],
    );
    let (_rx, addr) = receive(&b, &format!("{}:0", h.addr_b), &["--exit-after-resume"]);
    let report = migrate_ok(
        &a,
        &src,
        &addr,
        &[
            "--storage",
            "copy",
            "--storage-dir",
            dst_dir.to_str().unwrap(),
        ],
    );
    let s = &report["storage"];
    assert!(
        s["active_mirror_ms"].as_f64().unwrap() > 0.0,
        "200 MB/s of writes outrun 1 Gbit/s: mirroring must start: {s}"
    );
    assert!(s["mirrored_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(
        s["disks"][0]["source_digest"],
        s["disks"][0]["destination_digest"]
    );
    println!(
        "mirroring: {:.0} ms total, downtime {:.1} ms, {} rounds, {:.0} MiB copied, {:.0} MiB \
         mirrored over {:.0} ms, {} blocks in the downtime",
        report["total_time_ms"].as_f64().unwrap(),
        report["downtime_ms"].as_f64().unwrap(),
        report["rounds"],
        s["bytes_copied"].as_f64().unwrap() / (1 << 20) as f64,
        s["mirrored_bytes"].as_f64().unwrap() / (1 << 20) as f64,
        s["active_mirror_ms"].as_f64().unwrap(),
        s["dirty_blocks_in_downtime"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
