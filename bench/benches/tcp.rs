//! The TCP data path over loopback: extents sent from registered memory with writev and
//! received into registered memory with readv, as the migration does.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livemig_transport::codec::{Encoder, Mode};
use livemig_transport::tcp::{DataReceiver, DataSender, Landed, Received};
use livemig_transport::{MappedRegion, MemoryMap};

const BYTES: u64 = 256 << 20;

/// A populated anonymous mapping registered as one region.
fn region(len: u64) -> MemoryMap {
    // SAFETY: anonymous private mapping with no fixed address; checked for MAP_FAILED below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    // SAFETY: the mapping is never unmapped (the benchmark process exits), so it outlives the
    // map; only the transport touches it.
    unsafe {
        MemoryMap::new(
            vec![MappedRegion {
                addr: 0,
                host: host.cast(),
                len,
            }],
            Arc::new(()),
        )
    }
}

fn tcp(c: &mut Criterion) {
    let src = region(BYTES);
    let dst = region(BYTES);
    let mut g = c.benchmark_group("tcp_loopback_256MiB");
    g.sample_size(10);
    // 2 MiB contiguous chunks (round 0) and 64 scattered pages per chunk (later rounds).
    for (name, chunk, stride) in [
        ("contiguous_2MiB", 2u64 << 20, 2u64 << 20),
        ("contiguous_512KiB", 512 << 10, 512 << 10),
        ("contiguous_256KiB", 256 << 10, 256 << 10),
        ("scattered_4KiB", 4096, 8192),
    ] {
        // Bytes actually moved: every `stride`, one `chunk`.
        g.throughput(Throughput::Bytes(BYTES / stride * chunk));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap();
                let s = src.clone();
                let t = std::thread::spawn(move || {
                    let mut tx = DataSender::new(TcpStream::connect(addr).unwrap()).unwrap();
                    let mut enc = Encoder::new(Mode::None, None);
                    let per = (64 * 4096 / chunk).max(1) as usize;
                    let mut ext = Vec::new();
                    let mut off = 0;
                    while off + chunk <= BYTES {
                        ext.push((off, chunk));
                        off += stride;
                        if ext.len() == per {
                            tx.send_encoded(&s, &ext, &mut enc, 0).unwrap();
                            ext.clear();
                        }
                    }
                    if !ext.is_empty() {
                        tx.send_encoded(&s, &ext, &mut enc, 0).unwrap();
                    }
                    tx.send_marker(0).unwrap();
                });
                let mut rx = DataReceiver::new(l.accept().unwrap().0).unwrap();
                let mut w = Landed::default();
                while rx.recv(&dst, &mut w).unwrap() != Received::Marker(0) {
                    w.clear();
                }
                t.join().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, tcp);
criterion_main!(benches);
