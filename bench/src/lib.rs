//! livemig benchmarks: the criterion micro-benchmarks live in `benches/`; this library is the
//! end-to-end comparison harness behind `livemig bench`, and the test support the end-to-end
//! tests share with it.
//!
//! | module | owns |
//! |---|---|
//! | [`mod@run`] | a bench run: limits, every cell, medians, the results folder |
//! | [`matrix`] | which cells a run measures |
//! | [`pair`] | a destination and a VM process of the binary, for one migration |
//! | [`predict`] | `--predict`: `migrate --plan` against the migrations it forecast |
//! | [`qemu`] | QEMU migrating the same RAM over the same link (QMP) |
//! | [`rdma_model`] | `--rdma-model`: a 64 GiB VM over 100 and 2×200 Gb/s RoCE, from costs measured here |
//! | [`limits`] | physical limits in the same run: memcpy, raw TCP per link |
//! | [`report`] | rows, CSV, JSON, markdown |
//! | [`plot`] | PNG and SVG plots |
//! | [`support`] | kill-on-drop processes, emulated hosts (network namespaces), the KVM probe, keys |
//!
//! Like the tests, this harness reports failures with `anyhow`; the engine's libraries do not.
//!
//! ```
//! use livemig_bench::report::median;
//! assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
//! ```

pub mod blackout;
pub mod limits;
pub mod matrix;
pub mod pair;
pub mod plot;
pub mod predict;
pub mod qemu;
pub mod rdma_model;
pub mod report;
pub mod run;
pub mod storage;
pub mod support;

pub use run::{redraw, run, BenchOptions};
