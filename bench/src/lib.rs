//! livemig benchmarks live in `benches/`.
