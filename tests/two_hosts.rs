//! Migration between two "hosts": network namespaces joined by a veth pair. The VM process
//! runs in one, the destination in the other; pages cross the veth link.

mod common;

use std::process::Command;

use common::*;

/// Two namespaces joined by veth, deleted on drop.
struct Hosts {
    a: String,
    b: String,
    vb: String,
    addr_b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed (these tests need root and iproute2): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Hosts {
    fn new(tag: &str) -> Hosts {
        let id = std::process::id() % 100_000;
        let a = format!("lm{tag}a{id}");
        let b = format!("lm{tag}b{id}");
        let (va, vb) = (format!("v{tag}a{id}"), format!("v{tag}b{id}"));
        let net = 10 + id % 200;
        let _ = Command::new("ip").args(["netns", "del", &a]).output();
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        let addr_a = format!("10.77.{net}.1");
        let addr_b = format!("10.77.{net}.2");
        for (ns, dev, addr) in [(&a, &va, &addr_a), (&b, &vb, &addr_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Hosts { a, b, vb, addr_b }
    }

    fn exec(ns: &str) -> Vec<&str> {
        vec!["ip", "netns", "exec", ns]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).output();
    }
}

#[test]
fn migration_between_two_network_namespaces() {
    assert!(kvm_available(), "this test needs /dev/kvm");
    let hosts = Hosts::new("m");
    let dir = tmpdir("netns");
    let src = dir.join("src.sock");
    let dst = dir.join("dst.sock");
    let listen = format!("{}:7471", hosts.addr_b);
    let (_rx, addr) = receive(
        &Hosts::exec(&hosts.b),
        &listen,
        &["--socket", dst.to_str().unwrap()],
    );
    assert_eq!(addr, listen);
    let _vm = run_vm(
        &Hosts::exec(&hosts.a),
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
    let report = migrate_ok(&[], &src, &addr, &["--channels", "2"]);
    assert!(report["rounds"].as_u64().unwrap() >= 2);
    assert!(report["guest_progress_after_resume"].as_u64().unwrap() > 0);
    let c = counter(&dst);
    assert!(c > before);
    wait_counter_beyond(&dst, c);
    // The pages really crossed the veth link: B's end received at least the RAM.
    let rx_bytes: u64 =
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/rx_bytes", hosts.vb))
            .ok()
            .or_else(|| {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &hosts.b,
                        "cat",
                        &format!("/sys/class/net/{}/statistics/rx_bytes", hosts.vb),
                    ])
                    .output()
                    .ok()?;
                Some(String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    assert!(
        rx_bytes >= 128 << 20,
        "veth in B received only {rx_bytes} bytes"
    );
    request(&dst, r#"{"cmd":"stop"}"#);
    request(&src, r#"{"cmd":"stop"}"#);
}
