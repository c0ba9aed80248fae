//! Physical limits measured in the same run: memcpy on one core and raw TCP over each link.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Result};

use crate::support::{NetnsHosts, Process};

/// memcpy bandwidth of one core between two populated 512 MiB buffers.
pub fn memcpy_gbps() -> f64 {
    let n = 512 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.max(n as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Raw TCP throughput over the link with `streams` connections, measured by `livemig bench-link`.
pub fn raw_tcp_gbps(
    exe: &Path,
    hosts: Option<&NetnsHosts>,
    streams: u16,
    bytes: u64,
) -> Result<f64> {
    let listen = hosts
        .map(|h| format!("{}:7402", h.addr_b))
        .unwrap_or_else(|| "127.0.0.1:7402".into());
    let mut sink = match hosts {
        Some(h) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &h.ns_b]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut sink = Process::new(
        sink.args([
            "bench-link",
            "sink",
            "--listen",
            &listen,
            "--streams",
            &streams.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?,
    );
    sink.wait_line("listening")?;
    let mut src = match hosts {
        Some(h) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &h.ns_a]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let status = src
        .args([
            "bench-link",
            "source",
            "--to",
            &listen,
            "--streams",
            &streams.to_string(),
        ])
        .args(["--bytes", &bytes.to_string()])
        .status()?;
    if !status.success() {
        bail!("bench-link source failed");
    }
    Ok(sink.read_line()?.trim().parse().unwrap_or(0.0))
}

/// The receiving end of a raw TCP measurement: accepts `streams` connections on `listen`,
/// prints `listening`, then the GB/s received once every sender closed.
pub fn link_sink(listen: &str, streams: u16) -> Result<()> {
    let l = TcpListener::bind(listen)?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(l.accept()?.0);
    }
    let t = Instant::now();
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    println!("{}", total as f64 / t.elapsed().as_secs_f64() / 1e9);
    Ok(())
}

/// The sending end: `bytes` in all over `streams` connections to `to`.
pub fn link_source(to: &str, streams: u16, bytes: u64) -> Result<()> {
    let per = bytes / u64::from(streams.max(1));
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let to = to.to_string();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(&to)?;
                let buf = vec![0x5au8; 1 << 20];
                let mut left = per;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    s.write_all(&buf[..k])?;
                    left -= k as u64;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    }
    Ok(())
}
