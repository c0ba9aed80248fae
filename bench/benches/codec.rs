//! Page codecs, encode and decode, on RAM filled the way the guests fill it (text, random),
//! in bytes per second per core.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livemig_engine::memory::{GuestRam, Populate, RamLayout};
use livemig_engine::vm::{builtin_guest, Fill};
use livemig_transport::codec::{self, Encoding};

const BYTES: usize = 8 << 20;
const RUN: usize = 256 << 10;

fn content(fill: Fill) -> Vec<u8> {
    let ram = GuestRam::new(&RamLayout::single(BYTES as u64), Populate::Eager).unwrap();
    builtin_guest::fill(&ram, fill, 7);
    let (_, host, len) = ram.host_regions()[0];
    // SAFETY: the mapping is live and nothing else writes it.
    unsafe { std::slice::from_raw_parts(host, len as usize) }.to_vec()
}

fn codecs(c: &mut Criterion) {
    for (name, fill) in [("text", Fill::Text), ("random", Fill::Random)] {
        let data = content(fill);
        let mut g = c.benchmark_group(format!("encode_{name}"));
        g.throughput(Throughput::Bytes(BYTES as u64));
        g.sample_size(10);
        g.bench_function("zero_check", |b| {
            b.iter(|| {
                data.chunks(codec::PAGE)
                    // SAFETY: each chunk is a full page of `data`.
                    .filter(|p| unsafe { codec::is_zero_page(p.as_ptr()) })
                    .count()
            })
        });
        let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(RUN)];
        g.bench_function("lz4", |b| {
            b.iter(|| {
                data.chunks(RUN)
                    .map(|r| lz4_flex::block::compress_into(r, &mut out).unwrap())
                    .sum::<usize>()
            })
        });
        for level in [-5, 1, 3] {
            let mut z = zstd::bulk::Compressor::new(level).unwrap();
            let mut zout = vec![0u8; zstd::zstd_safe::compress_bound(RUN)];
            g.bench_with_input(BenchmarkId::new("zstd", level), &level, |b, _| {
                b.iter(|| {
                    data.chunks(RUN)
                        .map(|r| z.compress_to_buffer(r, &mut zout).unwrap())
                        .sum::<usize>()
                })
            });
        }
        let mut changed = data.clone();
        for p in changed.chunks_mut(codec::PAGE) {
            p[100] ^= 1;
            p[2000] ^= 1;
        }
        let mut d = Vec::new();
        g.bench_function("delta", |b| {
            b.iter(|| {
                data.chunks(codec::PAGE)
                    .zip(changed.chunks(codec::PAGE))
                    .map(|(o, n)| {
                        codec::delta_encode(o, n, &mut d, codec::PAGE / 2);
                        d.len()
                    })
                    .sum::<usize>()
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("decode_{name}"));
        g.throughput(Throughput::Bytes(BYTES as u64));
        g.sample_size(10);
        let lz: Vec<Vec<u8>> = data.chunks(RUN).map(lz4_flex::block::compress).collect();
        let mut dst = vec![0u8; RUN];
        g.bench_function("lz4", |b| {
            b.iter(|| {
                for body in &lz {
                    codec::decompress_into(Encoding::Lz4, body, &mut dst).unwrap();
                }
            })
        });
        let zs: Vec<Vec<u8>> = data
            .chunks(RUN)
            .map(|r| zstd::bulk::compress(r, 1).unwrap())
            .collect();
        g.bench_function("zstd_1", |b| {
            b.iter(|| {
                for body in &zs {
                    codec::decompress_into(Encoding::Zstd, body, &mut dst).unwrap();
                }
            })
        });
        let deltas: Vec<Vec<u8>> = data
            .chunks(codec::PAGE)
            .zip(changed.chunks(codec::PAGE))
            .map(|(o, n)| {
                let mut d = Vec::new();
                codec::delta_encode(o, n, &mut d, usize::MAX);
                d
            })
            .collect();
        let mut pages = data.clone();
        g.bench_function("delta", |b| {
            b.iter(|| {
                for (d, p) in deltas.iter().zip(pages.chunks_mut(codec::PAGE)) {
                    codec::delta_apply(d, p).unwrap();
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, codecs);
criterion_main!(benches);
