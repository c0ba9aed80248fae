//! Physical limits measured in the same run: memcpy on one core, raw TCP over each link (RAM
//! to RAM: both ends' buffers populated and larger than any cache) and the compressors'
//! speed on one core.

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

/// Bytes each raw TCP stream sends from, and its receiver writes into: populated, and far
/// larger than the last-level cache, so that every byte sent comes from RAM and lands in RAM
/// as a migration's pages do.
const COLD_BUFFER: usize = 256 << 20;

/// A buffer of `len` bytes, every page written (populated) with non-zero bytes.
fn populated(len: usize) -> Vec<u8> {
    vec![0x5a; len]
}

/// Compression speed on one core, in GB/s of input, of LZ4 and of zstd at the level
/// `--compress zstd` uses, over 64 MiB of the guests' `text` and `random` contents in runs of
/// one chunk (256 pages, as the codec compresses a run of non-zero pages).
pub fn compressor_gbps() -> Result<Vec<(String, f64)>> {
    use livemig_engine::memory::{GuestRam, Populate, RamLayout};
    use livemig_engine::vm::{builtin_guest, Fill};
    let len = 64usize << 20;
    let block = 256 * 4096;
    let mut out = Vec::new();
    for fill in [Fill::Text, Fill::Random] {
        let ram = GuestRam::new(&RamLayout::single(len as u64), Populate::Lazy)?;
        builtin_guest::fill(&ram, fill, 1);
        let mut src = vec![0u8; len];
        for (addr, host, n) in ram.host_regions() {
            // SAFETY: the region is a live mapping of `ram`, nothing writes it meanwhile.
            let bytes = unsafe { std::slice::from_raw_parts(host, n as usize) };
            src[addr as usize..addr as usize + n as usize].copy_from_slice(bytes);
        }
        let mut dst = vec![0u8; lz4_flex::block::get_maximum_output_size(block) + 4096];
        let t = Instant::now();
        for b in src.chunks(block) {
            std::hint::black_box(lz4_flex::block::compress_into(b, &mut dst)?);
        }
        out.push((
            format!("lz4_{}_one_core_gbps", fill.name()),
            len as f64 / t.elapsed().as_secs_f64() / 1e9,
        ));
        let mut z =
            zstd::bulk::Compressor::new(livemig_transport::codec::Mode::DEFAULT_ZSTD_LEVEL)?;
        let t = Instant::now();
        for b in src.chunks(block) {
            std::hint::black_box(z.compress_to_buffer(b, &mut dst)?);
        }
        out.push((
            format!("zstd_{}_one_core_gbps", fill.name()),
            len as f64 / t.elapsed().as_secs_f64() / 1e9,
        ));
    }
    Ok(out)
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
    // Buffers populated before the clock starts, as a destination's reserved RAM.
    let mut bufs: Vec<Vec<u8>> = (0..streams).map(|_| populated(COLD_BUFFER)).collect();
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
            let mut buf = bufs.pop().unwrap_or_default();
            std::thread::spawn(move || {
                let (mut n, mut at) = (0u64, 0usize);
                loop {
                    let end = (at + (1 << 20)).min(buf.len());
                    match c.read(&mut buf[at..end]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k as u64;
                            at = if at + k >= buf.len() { 0 } else { at + k };
                        }
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    println!("{}", total as f64 / t.elapsed().as_secs_f64() / 1e9);
    Ok(())
}

/// The sending end: `bytes` in all over `streams` connections to `to`, each stream sending
/// from its own populated buffer far larger than the caches (wrapping around).
pub fn link_source(to: &str, streams: u16, bytes: u64) -> Result<()> {
    let per = bytes / u64::from(streams.max(1));
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let to = to.to_string();
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = populated(COLD_BUFFER);
                let mut s = TcpStream::connect(&to)?;
                let (mut left, mut at) = (per, 0usize);
                while left > 0 {
                    let k = left.min(1 << 20).min((buf.len() - at) as u64) as usize;
                    s.write_all(&buf[at..at + k])?;
                    left -= k as u64;
                    at = (at + k) % buf.len();
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
