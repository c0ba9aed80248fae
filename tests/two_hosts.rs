//! Migration between two "hosts": network namespaces joined by a veth pair (made by
//! `scripts/netns-link.sh`). The VM process runs in one, the destination in the other; pages
//! cross the veth link.

mod common;

use common::*;

#[test]
fn migration_between_two_network_namespaces() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let hosts = hosts("m", "none");
    let dir = tmpdir("netns");
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let listen = format!("{}:7471", hosts.addr_b);
    let (_rx, addr) = receive(
        &NetnsHosts::exec(&hosts.ns_b),
        &listen,
        &["--socket", dst.to_str().unwrap()],
    );
    assert_eq!(addr, listen);
    let _vm = run_vm(
        &NetnsHosts::exec(&hosts.ns_a),
        &src,
        &[
            "--memory",
            "128",
            "--fill",
            "text",
            "--dirty-rate",
            "2000",
            "--working-set",
            "16",
            "--pattern",
            "hotspot",
        ],
    );
    let before = wait_counter_beyond(&src, 0);
    // The migrate command talks to the VM over its Unix socket; the VM process in namespace
    // A opens the TCP connections to namespace B.
    let report = migrate_ok(&[], &src, &addr, &["--channels", "2", "--compress", "none"]);
    assert!(report["rounds"].as_u64().unwrap() >= 2);
    assert!(report["guest_progress_after_resume"].as_u64().unwrap() > 0);
    let c = counter(&dst);
    assert!(c > before);
    wait_counter_beyond(&dst, c);
    // The pages really crossed the veth link: B's end received at least the RAM.
    let rx = hosts.rx_bytes_b();
    assert!(rx >= 128 << 20, "veth in B received only {rx} bytes");
    request(&dst, r#"{"cmd":"stop"}"#);
    request(&src, r#"{"cmd":"stop"}"#);
}

#[test]
fn auto_compresses_text_on_a_slow_link() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let hosts = hosts("s", "200mbit");
    let dir = tmpdir("shaped");
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let listen = format!("{}:7472", hosts.addr_b);
    let (_rx, addr) = receive(
        &NetnsHosts::exec(&hosts.ns_b),
        &listen,
        &["--socket", dst.to_str().unwrap()],
    );
    let _vm = run_vm(
        &NetnsHosts::exec(&hosts.ns_a),
        &src,
        &["--memory", "128", "--fill", "text", "--dirty-rate", "500"],
    );
    wait_counter_beyond(&src, 0);
    let report = migrate_ok(&[], &src, &addr, &["--compress", "auto"]);
    let ram = report["ram_bytes"].as_u64().unwrap();
    let wire = report["bytes_on_wire"].as_u64().unwrap();
    // On 200 Mbit/s the compressors outrun the link many times over, even on cores busy with
    // other work: auto compresses text. (At 1 Gbit/s, on two cores that other processes
    // kept busy, the receiver became the bottleneck and auto rightly sent most chunks raw:
    // `none`, `lz4` and `zstd` all took 2.3-2.8 s there.)
    assert!(
        wire * 100 <= ram * 35,
        "auto sent {wire} bytes for {ram} of text: {report}"
    );
    let codec = &report["codec"];
    let compressed = codec["pages_lz4"].as_u64().unwrap() + codec["pages_zstd"].as_u64().unwrap();
    assert!(
        compressed * 4 >= ram / 4096 * 3,
        "auto compressed only {compressed} pages: {report}"
    );
    let rx = hosts.rx_bytes_b();
    assert!(rx < ram / 2, "the link carried {rx} bytes");
    request(&dst, r#"{"cmd":"stop"}"#);
    request(&src, r#"{"cmd":"stop"}"#);
}
