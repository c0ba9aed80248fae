//! Dirty bitmap → extents → chunks, the scheduler's CPU work per round.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livemig_engine::dirty::DirtyBitmap;
use livemig_engine::memory::{RamLayout, PAGE_SIZE};
use livemig_engine::scheduler::{chunks, CHUNK_EXTENTS, CHUNK_PAGES};

fn bitmap(layout: &RamLayout, every: u64, seed: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(layout);
    let pages = layout.total_pages();
    let mut x = seed;
    for _ in 0..pages / every {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.set_page((x % pages) * PAGE_SIZE);
    }
    b
}

fn extents(c: &mut Criterion) {
    let layout = RamLayout::single(4 << 30);
    let pages = layout.total_pages();
    let mut g = c.benchmark_group("bitmap_to_extents_4GiB");
    g.throughput(Throughput::Elements(pages));
    let cases = [
        ("all_dirty", DirtyBitmap::all(&layout)),
        ("none_dirty", DirtyBitmap::new(&layout)),
        ("random_1_in_8", bitmap(&layout, 8, 1)),
        ("random_1_in_512", bitmap(&layout, 512, 2)),
    ];
    for (name, b) in &cases {
        g.bench_with_input(BenchmarkId::from_parameter(name), b, |bench, b| {
            bench.iter(|| b.extents())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("extents_to_chunks_4GiB");
    g.throughput(Throughput::Elements(pages));
    for (name, b) in &cases {
        let ext = b.extents();
        g.bench_with_input(BenchmarkId::from_parameter(name), &ext, |bench, e| {
            bench.iter(|| chunks(e, CHUNK_PAGES, CHUNK_EXTENTS))
        });
    }
    g.finish();
}

criterion_group!(benches, extents);
criterion_main!(benches);
