//! Live migration of real KVM guests through the `livemig` binary over loopback TCP.

mod common;

use common::*;
use std::time::Duration;

fn require_kvm() {
    assert!(
        kvm_available(),
        "these tests need /dev/kvm (read-write); run them on a host with KVM"
    );
}

#[test]
fn idle_guest_migrates_and_keeps_running_on_the_destination() {
    require_kvm();
    let dir = tmpdir("idle");
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let (mut rx, addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
    let _vm = run_vm(
        &[],
        &src,
        &["--memory", "64", "--fill", "random", "--dirty-rate", "0"],
    );
    let before = wait_counter_beyond(&src, 0);
    let report = migrate_ok(&[], &src, &addr, &[]);
    assert!(report["rounds"].as_u64().unwrap() >= 2);
    assert!(report["guest_progress_after_resume"].as_u64().unwrap() > 0);
    assert_eq!(report["ram_bytes"], 64 << 20);
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0);
    // The downtime's steps account for all of it, each measured.
    let d = &report["downtime_detail"];
    let steps = [
        "pause_ms",
        "save_state_ms",
        "harvest_ms",
        "final_pages_ms",
        "storage_ms",
        "prepare_ms",
        "resume_ms",
        "other_ms",
    ];
    let sum: f64 = steps
        .iter()
        .map(|k| {
            let v = d[*k].as_f64().unwrap_or_else(|| panic!("no {k}: {d}"));
            assert!(v >= 0.0, "{k} < 0: {d}");
            v
        })
        .sum();
    assert!(
        (sum - downtime).abs() < 0.5,
        "steps {sum} ms vs downtime {downtime} ms: {d}"
    );
    for k in ["pause_ms", "save_state_ms", "prepare_ms", "resume_ms"] {
        assert!(d[k].as_f64().unwrap() > 0.0, "{k} not measured: {d}");
    }
    // The destination's own steps fit inside its share (prepare and resume).
    let arrived: serde_json::Value =
        serde_json::from_str(&rx.wait_line("switchover_steps")).unwrap();
    let st = &arrived["switchover_steps"];
    let step = |k: &str| st[k].as_f64().unwrap_or_else(|| panic!("no {k}: {st}"));
    // The digest runs beside the restore.
    let here = step("land_ms")
        + step("storage_ms")
        + step("digest_ms").max(step("restore_ms"))
        + step("record_ms")
        + step("resume_ms");
    assert!(st["restore_ms"].as_f64().unwrap() > 0.0, "{st}");
    assert!(
        here <= d["prepare_ms"].as_f64().unwrap() + d["resume_ms"].as_f64().unwrap() + 0.5,
        "destination steps {here} ms exceed what the source waited for them: {st} / {d}"
    );
    assert_eq!(report["transport"], "tcp");
    // The guest continues on the destination from where it was: its counter is past the
    // source's and keeps moving.
    let c1 = counter(&dst);
    assert!(
        c1 > before,
        "destination counter {c1} <= source counter {before}"
    );
    wait_counter_beyond(&dst, c1);
    let st = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(st["phase"], "migrated");
    request(&dst, r#"{"cmd":"stop"}"#);
    request(&src, r#"{"cmd":"stop"}"#);
}

/// A VM whose RAM was never written sends its round 0 as zero markers in no time: the
/// source asks for it to have landed (`AwaitLanded`) while the destination may still be
/// greeting its data connections; the question waits there for the switchover (it failed
/// the migration once: "unexpected AwaitLanded ... while waiting for data channels").
#[test]
fn an_untouched_vm_asks_for_its_round_to_land_before_the_channels_are_all_greeted() {
    require_kvm();
    for channels in ["1", "2"] {
        let dir = tmpdir(&format!("untouched-{channels}"));
        let src = dir.join("src.sock");
        let dst = dir.join("dst.sock");
        let (_rx, addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
        let _vm = run_vm(&[], &src, &["--memory", "256", "--fill", "zero"]);
        wait_counter_beyond(&src, 0);
        let report = migrate_ok(
            &[],
            &src,
            &addr,
            &["--compress", "none", "--channels", channels],
        );
        assert_eq!(report["drain"]["landed_round"], 0, "{report}");
        let c = counter(&dst);
        wait_counter_beyond(&dst, c);
        request(&dst, r#"{"cmd":"stop"}"#);
    }
}

/// Zero RAM the guest writes a word into here and there: with `auto` and `delta` each such
/// page's first send is a delta against zero (a few bytes), with `none` the whole page; the
/// digests prove the destination's copy whole either way.
#[test]
fn new_sparse_pages_go_as_their_data_alone_over_tcp() {
    require_kvm();
    for (compress, sparse) in [("auto", true), ("delta", true), ("none", false)] {
        let dir = tmpdir(&format!("sparse-{compress}"));
        let src = dir.join("src.sock");
        let dst = dir.join("dst.sock");
        let (_rx, addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
        let _vm = run_vm(
            &[],
            &src,
            &[
                "--memory",
                "64",
                "--fill",
                "zero",
                "--working-set",
                "48",
                "--dirty-rate",
                "5000",
            ],
        );
        // Well into its working set before migrating (`auto` compresses its first chunks,
        // probing the codecs: the pages must reach beyond them).
        wait_counter_beyond(&src, 0);
        std::thread::sleep(Duration::from_secs(2));
        let report = migrate_ok(&[], &src, &addr, &["--compress", compress]);
        let c = &report["codec"];
        let pages = c["pages_sparse"].as_u64().unwrap();
        if sparse {
            assert!(pages > 100, "{compress}: {report}");
            // A sparse page costs a few dozen bytes where a raw one costs 4096.
            let data: u64 = ["pages_raw", "pages_lz4", "pages_zstd", "pages_sparse"]
                .iter()
                .map(|k| c[k].as_u64().unwrap())
                .sum();
            let after = c["bytes_after"].as_u64().unwrap();
            assert!(
                after < data * 4096 / 2,
                "{compress}: sparse pages went whole: {report}"
            );
        } else {
            assert_eq!(pages, 0, "{compress}: {report}");
        }
        let n = counter(&dst);
        wait_counter_beyond(&dst, n);
        request(&dst, r#"{"cmd":"stop"}"#);
    }
}

#[test]
fn busy_guest_needs_several_rounds() {
    require_kvm();
    let dir = tmpdir("busy");
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let (_rx, addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
    let _vm = run_vm(
        &[],
        &src,
        &[
            "--memory",
            "128",
            "--working-set",
            "32",
            "--dirty-rate",
            "5000",
            "--pattern",
            "random",
            "--vcpus",
            "2",
        ],
    );
    wait_counter_beyond(&src, 0);
    // A 1 ms downtime budget cannot be met while the guest writes 5000 pages/s: the engine
    // runs pre-copy rounds until max-rounds, then stops and copies (within a generous cap).
    let report = migrate_ok(
        &[],
        &src,
        &addr,
        &[
            "--downtime-limit",
            "1",
            "--max-rounds",
            "4",
            "--max-downtime",
            "60000",
            "--channels",
            "2",
        ],
    );
    assert_eq!(report["rounds"], 5, "{report}");
    let rounds = report["round_details"].as_array().unwrap();
    assert!(
        rounds[1]["pages"].as_u64().unwrap() > 0,
        "guest dirtied pages during round 0"
    );
    assert!(report["pages_sent"].as_u64().unwrap() > (128 << 20) / 4096);
    assert_eq!(report["channels"], 2);
    let c = counter(&dst);
    wait_counter_beyond(&dst, c);
    request(&dst, r#"{"cmd":"stop"}"#);
}

/// Compressing codecs encode on helper threads (every core, one connection) and send in
/// order: a busy guest over several rounds still lands exactly, and the codec counters of
/// every helper's encoder reach the report.
#[test]
fn a_busy_guest_migrates_over_one_compressing_connection_with_every_codec() {
    require_kvm();
    for codec in ["lz4", "zstd", "auto"] {
        let dir = tmpdir(&format!("codec-{codec}"));
        let src = dir.join("src.sock");
        let dst = dir.join("dst.sock");
        let (_rx, addr) = receive(&[], "127.0.0.1:0", &["--socket", dst.to_str().unwrap()]);
        let _vm = run_vm(
            &[],
            &src,
            &[
                "--memory",
                "96",
                "--fill",
                "text",
                "--working-set",
                "16",
                "--dirty-rate",
                "5000",
                "--pattern",
                "random",
            ],
        );
        wait_counter_beyond(&src, 0);
        let report = migrate_ok(
            &[],
            &src,
            &addr,
            &[
                "--compress",
                codec,
                "--channels",
                "1",
                "--downtime-limit",
                "1",
                "--max-rounds",
                "3",
                "--max-downtime",
                "60000",
            ],
        );
        assert_eq!(report["rounds"], 4, "{codec}: {report}");
        // Before the pause the destination confirmed the last pre-copy round (round 2; the
        // fourth round is the stop-and-copy) was all decoded into its RAM.
        assert_eq!(report["drain"]["landed_round"], 2, "{codec}: {report}");
        let c = &report["codec"];
        let counted: u64 = [
            "pages_raw",
            "pages_zero",
            "pages_lz4",
            "pages_zstd",
            "pages_delta",
            "pages_sparse",
        ]
        .iter()
        .map(|k| c[k].as_u64().unwrap_or(0))
        .sum();
        assert_eq!(
            counted,
            report["pages_sent"].as_u64().unwrap(),
            "{codec}: {report}"
        );
        if codec != "auto" {
            let key = format!("pages_{codec}");
            assert!(c[key.as_str()].as_u64().unwrap() > 0, "{codec}: {report}");
        }
        let n = counter(&dst);
        wait_counter_beyond(&dst, n);
        request(&dst, r#"{"cmd":"stop"}"#);
    }
}

#[test]
fn destination_vanishing_mid_migration_leaves_the_source_running() {
    require_kvm();
    let dir = tmpdir("vanish");
    let src = dir.join("src.sock");
    let (mut rx, addr) = receive(&[], "127.0.0.1:0", &["--backend", "kvm"]);
    let _vm = run_vm(
        &[],
        &src,
        &[
            "--memory",
            "128",
            "--working-set",
            "32",
            "--dirty-rate",
            "4000",
        ],
    );
    wait_counter_beyond(&src, 0);
    // With a zero downtime budget the migration never converges on its own: it is still in
    // pre-copy when the destination dies.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        let _ = rx.child.kill();
        let _ = rx.child.wait();
    });
    let out = migrate(&[], &src, &addr, ENDLESS);
    killer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("migration failed"), "{stderr}");
    assert!(stderr.contains("running"), "{stderr}");
    let st = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(st["phase"], "running", "{st}");
    assert_eq!(st["run_state"], "running", "{st}");
    let c = counter(&src);
    wait_counter_beyond(&src, c);
    request(&src, r#"{"cmd":"stop"}"#);
}

#[test]
fn an_unwritable_decisions_folder_refuses_before_any_ram_moves() {
    require_kvm();
    let dir = tmpdir("decisions");
    let src = dir.join("src.sock");
    // (root writes anywhere but in /proc)
    let (rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &["--decisions", "/proc/livemig-decisions"],
    );
    let _vm = run_vm(&[], &src, &["--memory", "64", "--dirty-rate", "1000"]);
    let before = wait_counter_beyond(&src, 0);
    let out = migrate(&[], &src, &addr, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(out.status.code(), &stderr, "cannot keep a decision record");
    assert!(stderr.contains("/proc/livemig-decisions"), "{stderr}");
    let st = request(&src, r#"{"cmd":"status"}"#);
    assert_eq!(st["run_state"], "running", "{st}");
    assert!(st["last_migration"]["bytes_on_wire"].is_null(), "{st}");
    wait_counter_beyond(&src, before);
    let (code, err) = rx.wait_exit(Duration::from_secs(30));
    assert_clean_error(code, &err, "cannot keep a decision record");
}

/// `receive --reserve-mib` makes the KVM VM and its RAM's slots ahead; a VM of that size is
/// built on them (the destination's line says so), one of another size on its own, and the
/// guest runs on after both migrations.
#[test]
fn reserved_ram_is_migrated_into_the_vm_made_ahead_and_other_sizes_still_arrive() {
    require_kvm();
    let dir = tmpdir("ahead");
    for (reserve, memory, ahead) in [("64", "64", true), ("96", "64", false)] {
        let src = dir.join(format!("src{reserve}.sock"));
        let dst = dir.join(format!("dst{reserve}.sock"));
        let (mut rx, addr) = receive(
            &[],
            "127.0.0.1:0",
            &["--socket", dst.to_str().unwrap(), "--reserve-mib", reserve],
        );
        let _vm = run_vm(
            &[],
            &src,
            &[
                "--memory",
                memory,
                "--fill",
                "random",
                "--dirty-rate",
                "2000",
            ],
        );
        let before = wait_counter_beyond(&src, 0);
        let report = migrate_ok(&[], &src, &addr, &[]);
        assert_eq!(report["digest_match"], true, "{report}");
        let arrival: serde_json::Value =
            serde_json::from_str(&rx.wait_line("\"vm_made_ahead\"")).unwrap();
        assert_eq!(
            arrival["used_reserved_ram"], ahead,
            "reserve {reserve} MiB, VM {memory} MiB: {arrival}"
        );
        assert_eq!(
            arrival["vm_made_ahead"], ahead,
            "reserve {reserve} MiB, VM {memory} MiB: {arrival}"
        );
        let c = counter(&dst);
        assert!(c > before);
        wait_counter_beyond(&dst, c);
        request(&dst, r#"{"cmd":"stop"}"#);
    }
}

#[test]
fn a_huge_page_backed_vm_migrates_to_a_huge_page_backed_destination() {
    require_kvm();
    // 128 MiB on each side: 64 pages of 2 MiB each.
    let _pool = HugePool::grow(128);
    let free = pool_value("free_hugepages");
    let dir = tmpdir("huge");
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let _vm = run_vm(
        &[],
        &src,
        &[
            "--memory",
            "128",
            "--hugepages",
            "2M",
            "--dirty-rate",
            "2000",
            "--fill",
            "random",
        ],
    );
    // The VM's RAM came out of the pool, reserved up front.
    assert!(
        pool_value("free_hugepages") + 64 <= free,
        "the VM did not take its 64 huge pages: {} free of {free}",
        pool_value("free_hugepages")
    );
    let (_rx, addr) = receive(
        &[],
        "127.0.0.1:0",
        &["--socket", dst.to_str().unwrap(), "--hugepages", "2M"],
    );
    let before = wait_counter_beyond(&src, 0);
    let report = migrate_ok(&[], &src, &addr, &["--channels", "2"]);
    assert!(
        report["pages_sent"].as_u64().unwrap() >= 128 << 8,
        "{report}"
    );
    let c = counter(&dst);
    assert!(c > before);
    wait_counter_beyond(&dst, c);
    request(&dst, r#"{"cmd":"stop"}"#);
}

#[test]
fn huge_pages_that_cannot_back_the_vm_are_a_clear_error() {
    require_kvm();
    let dir = tmpdir("huge-bad");
    // 100 MiB is not a whole number of 1 GiB pages.
    let out = std::process::Command::new(bin())
        .args(["run-vm", "--socket"])
        .arg(dir.join("a.sock"))
        .args(["--memory", "100", "--hugepages", "1G", "--no-auth"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(out.status.code(), &err, "not a multiple of 1G pages");
    // A pool too small: 1 GiB pages, of which this machine keeps none unless told to.
    let nr_1g: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
    if nr_1g == 0 {
        let out = std::process::Command::new(bin())
            .args(["run-vm", "--socket"])
            .arg(dir.join("b.sock"))
            .args(["--memory", "1024", "--hugepages", "1G", "--no-auth"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_clean_error(out.status.code(), &err, "1 pages of 1G needed, 0 free");
        assert!(err.contains("nr_hugepages"), "{err}");
    }
}
