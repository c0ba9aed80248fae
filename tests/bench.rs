//! `livemig bench --quick`, the comparison's small matrix, runs to its end in CI and writes
//! every result a reader needs. It asserts nothing about speed (the machine is shared and
//! noisy; figures belong in the results, not in assertions).

mod common;

use common::*;
use serde_json::Value;

#[test]
fn the_quick_bench_measures_every_cell_of_both_systems_alike() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        qemu,
        "qemu-system-x86_64 is missing: scripts/setup.sh installs it"
    );
    let dir = tmpdir("bench");
    let out = dir.join("results");
    let run = std::process::Command::new(bin())
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench --quick failed:\n{text}\n{err}");
    for f in [
        "results.json",
        "results.csv",
        "results.md",
        "throughput.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    // Every cell of the matrix produced a row: no repetition failed for good.
    let cells = livemig_bench::matrix::matrix(true, true);
    assert_eq!(
        rows.len(),
        cells.len(),
        "cells without a figure:\n{text}\n{err}"
    );
    for r in rows {
        let what = format!(
            "{} {} {} {}",
            r["link"], r["content"], r["dirty_rate"], r["variant"]
        );
        if r["system"] == "livemig" {
            assert_eq!(r["digest_match"], true, "{what}");
        }
        // Both systems' link bytes and CPU are counted the same way, outside the programs.
        let ram = (r["memory_mib"].as_u64().unwrap() << 20) as f64;
        let link = r["link_bytes_median"].as_f64().unwrap_or(-1.0);
        assert!(link >= 0.0, "{what}: no link bytes");
        // Random RAM does not compress: all of it crosses, headers on top.
        if r["content"] == "random" {
            assert!(link >= ram * 0.95, "{what}: {link} bytes for {ram} of RAM");
        }
        if r["system"] == "livemig" {
            let sent = r["bytes_on_wire_median"].as_f64().unwrap();
            assert!(
                link >= sent * 0.95 && link <= sent * 1.2 + 2e6,
                "{what}: {link} bytes at the interface, {sent} by livemig's count"
            );
        }
        assert!(
            link <= ram * 1.3 + 4e6,
            "{what}: {link} bytes for {ram} of RAM"
        );
        for k in [
            "source_process_cpu_s",
            "destination_process_cpu_s",
            "source_guest_cpu_s",
        ] {
            assert!(r[k].as_f64().is_some_and(|c| c >= 0.0), "{what}: no {k}");
        }
    }
    // QEMU's downtime spans its source's pause to its destination's guest running.
    for run in v["runs"].as_array().unwrap() {
        let rep = &run["report"];
        if rep.get("qemu_reported_downtime_ms").is_some() {
            assert_eq!(rep["downtime_end_to_end"], true, "{run}");
            assert!(rep["downtime_ms"].as_f64().unwrap() > 0.0, "{run}");
        }
    }
    let limits = &v["meta"]["physical_limits"];
    for k in [
        "memcpy_one_core_gbps",
        "raw_tcp_loopback_x1_gbps",
        "lz4_text_one_core_gbps",
        "zstd_text_one_core_gbps",
    ] {
        assert!(limits[k].as_f64().is_some_and(|g| g > 0.0), "{k}: {limits}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
