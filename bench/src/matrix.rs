//! The benchmark matrix: which links, RAM contents, sizes, dirty rates and variants (livemig
//! and QEMU configurations) a run measures.

use livemig_engine::vm::Fill;
use serde::Serialize;

/// A link between the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// Both hosts are this one, over loopback.
    Loopback,
    /// Two emulated hosts on a 10 Gbit/s shaped veth link.
    #[serde(rename = "10gbit")]
    TenGbit,
    /// Two emulated hosts on a 1 Gbit/s shaped veth link.
    #[serde(rename = "1gbit")]
    OneGbit,
}

impl Link {
    /// The link's name (also the netns-link.sh profile).
    pub fn name(self) -> &'static str {
        match self {
            Link::Loopback => "loopback",
            Link::TenGbit => "10gbit",
            Link::OneGbit => "1gbit",
        }
    }
}

/// What migrates the RAM.
#[derive(Debug, Clone, PartialEq)]
pub enum Variant {
    /// `reserve`: the destination reserves and faults in its RAM before the migration.
    Livemig {
        /// Data channels.
        channels: u16,
        /// `--compress` mode.
        compress: &'static str,
        /// Destination RAM reserved ahead.
        reserve: bool,
        /// Sealed session (AES-256-GCM on control and data; `--encrypt off` otherwise).
        encrypt: bool,
    },
    /// `prealloc`: the destination QEMU faults in its RAM at start (`prealloc=on`).
    Qemu {
        /// multifd channels (1: the single stream).
        channels: u16,
        /// multifd zstd compression.
        zstd: bool,
        /// Destination RAM faulted in at start.
        prealloc: bool,
        /// Migration over TLS (`tls-creds-x509`, a throwaway CA): the like-for-like peer of
        /// livemig's sealed sessions.
        tls: bool,
    },
}

impl Variant {
    /// The label in tables and plots.
    pub fn label(&self) -> String {
        match self {
            Variant::Livemig {
                channels,
                compress,
                reserve,
                encrypt,
            } => format!(
                "livemig tcp x{channels} {compress}{}{}",
                if *reserve { "" } else { " (no reserve)" },
                if *encrypt { "" } else { " (clear)" }
            ),
            Variant::Qemu {
                channels: 1,
                zstd: false,
                prealloc,
                tls,
            } => format!(
                "qemu single{}{}",
                if *tls { " tls" } else { "" },
                if *prealloc { "" } else { " (no prealloc)" }
            ),
            Variant::Qemu {
                channels,
                zstd,
                prealloc,
                tls,
            } => format!(
                "qemu multifd x{channels}{}{}{}",
                if *zstd { " zstd" } else { "" },
                if *tls { " tls" } else { "" },
                if *prealloc { "" } else { " (no prealloc)" }
            ),
        }
    }
    /// `livemig` or `qemu`.
    pub fn system(&self) -> &'static str {
        match self {
            Variant::Livemig { .. } => "livemig",
            Variant::Qemu { .. } => "qemu",
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The link between the hosts.
    pub link: Link,
    /// RAM content.
    pub fill: Fill,
    /// Zero pages written on both sides (livemig's RAM faulted in throughout, QEMU's RAM file
    /// written in full), rather than holes never written on both sides (livemig's unused
    /// memfd pages, QEMU's sparse file). Only zero and mixed content have zero pages.
    pub written: bool,
    /// RAM size.
    pub memory_mib: u64,
    /// Guest dirty rate, pages per second.
    pub dirty_rate: u64,
    /// Downtime limit both systems are given, ms.
    pub downtime_limit_ms: u64,
    /// What migrates it.
    pub variant: Variant,
}

/// The downtime limit of most cells (QEMU's default).
pub const DEFAULT_LIMIT_MS: u64 = 300;
/// The small limit some cells use: where QEMU does not spend a large default by design, whose
/// downtime is lower?
pub const SMALL_LIMIT_MS: u64 = 20;

impl Cell {
    /// `link fill MiB pages/s limit variant`, e.g.
    /// `10gbit random 512MiB 0/s 300ms livemig tcp x1 none`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {}MiB {}/s {}ms {}",
            self.link.name(),
            self.content(),
            self.memory_mib,
            self.dirty_rate,
            self.downtime_limit_ms,
            self.variant.label()
        )
    }

    /// The content's name, `-written` added where zero pages are written
    /// ([`Cell::written`]).
    pub fn content(&self) -> String {
        if self.written {
            format!("{}-written", self.fill.name())
        } else {
            self.fill.name().to_string()
        }
    }

    /// Whether `other` does the same work (link, content, RAM, dirty rate and limit), its
    /// variant aside: the cells compared with each other in a table row's "vs" columns.
    pub fn same_work(&self, other: &Cell) -> bool {
        (
            self.link,
            self.fill,
            self.written,
            self.memory_mib,
            self.dirty_rate,
            self.downtime_limit_ms,
        ) == (
            other.link,
            other.fill,
            other.written,
            other.memory_mib,
            other.dirty_rate,
            other.downtime_limit_ms,
        )
    }
}

/// The cells of a run: `quick` for CI, QEMU rows only with `qemu`.
pub fn matrix(quick: bool, qemu: bool) -> Vec<Cell> {
    let mut m = Cells {
        cells: Vec::new(),
        qemu,
    };
    if quick {
        quick_cells(&mut m);
    } else {
        full_cells(&mut m);
    }
    m.cells
}

/// RAM contents every size-and-codec cell runs with.
const CONTENTS: [Fill; 4] = [Fill::Zero, Fill::Random, Fill::Text, Fill::Mixed];

/// The cells listed so far; QEMU's are left out without QEMU.
struct Cells {
    cells: Vec<Cell>,
    qemu: bool,
}

impl Cells {
    /// One cell per variant at the default downtime limit.
    fn add(
        &mut self,
        link: Link,
        fill: Fill,
        memory_mib: u64,
        dirty_rate: u64,
        variants: Vec<Variant>,
    ) {
        self.add_limited(
            link,
            fill,
            memory_mib,
            dirty_rate,
            DEFAULT_LIMIT_MS,
            variants,
        );
    }

    /// One cell per variant whose zero pages are written on both sides ([`Cell::written`]).
    fn add_written(&mut self, link: Link, fill: Fill, memory_mib: u64, variants: Vec<Variant>) {
        let from = self.cells.len();
        self.add(link, fill, memory_mib, 0, variants);
        for c in &mut self.cells[from..] {
            c.written = true;
        }
    }

    /// One cell per variant at `downtime_limit_ms`.
    fn add_limited(
        &mut self,
        link: Link,
        fill: Fill,
        memory_mib: u64,
        dirty_rate: u64,
        downtime_limit_ms: u64,
        variants: Vec<Variant>,
    ) {
        for variant in variants {
            if matches!(variant, Variant::Qemu { .. }) && !self.qemu {
                continue;
            }
            self.cells.push(Cell {
                link,
                fill,
                written: false,
                memory_mib,
                dirty_rate,
                downtime_limit_ms,
                variant,
            });
        }
    }
}

/// livemig, encrypted (the default), destination RAM reserved.
fn lm(channels: u16, compress: &'static str) -> Variant {
    Variant::Livemig {
        channels,
        compress,
        reserve: true,
        encrypt: true,
    }
}

/// The cost of encryption, and like for like with QEMU's stream: `--encrypt off`.
fn clear(channels: u16, compress: &'static str) -> Variant {
    Variant::Livemig {
        channels,
        compress,
        reserve: true,
        encrypt: false,
    }
}

/// `v` with its destination RAM left to be faulted in as pages land: livemig without
/// `--reserve-mib`, QEMU without `prealloc=on`.
fn cold(v: Variant) -> Variant {
    match v {
        Variant::Livemig {
            channels,
            compress,
            encrypt,
            ..
        } => Variant::Livemig {
            channels,
            compress,
            reserve: false,
            encrypt,
        },
        Variant::Qemu {
            channels,
            zstd,
            tls,
            ..
        } => Variant::Qemu {
            channels,
            zstd,
            prealloc: false,
            tls,
        },
    }
}

/// QEMU with its destination RAM faulted in ahead (as our reserve).
fn q(channels: u16, zstd: bool) -> Variant {
    Variant::Qemu {
        channels,
        zstd,
        prealloc: true,
        tls: false,
    }
}

/// QEMU over TLS (the single stream, or multifd): the same work as livemig's default, sealed.
fn qtls(channels: u16) -> Variant {
    Variant::Qemu {
        channels,
        zstd: false,
        prealloc: true,
        tls: true,
    }
}

/// A small matrix for CI and a quick look: loopback and one shaped link, small RAM.
fn quick_cells(m: &mut Cells) {
    for f in CONTENTS {
        let mut v = vec![
            lm(1, "none"),
            lm(2, "none"),
            lm(1, "auto"),
            q(1, false),
            q(2, true),
        ];
        if f == Fill::Random {
            v.push(qtls(1));
        }
        m.add(Link::Loopback, f, 256, 0, v);
    }
    m.add(
        Link::OneGbit,
        Fill::Text,
        128,
        0,
        vec![lm(1, "none"), lm(1, "auto"), q(1, false)],
    );
    for rate in [0, 20_000] {
        m.add(
            Link::Loopback,
            Fill::Random,
            256,
            rate,
            vec![lm(1, "auto"), q(1, false)],
        );
    }
    m.add(
        Link::Loopback,
        Fill::Random,
        256,
        0,
        vec![clear(1, "none"), clear(2, "none")],
    );
    m.add_limited(
        Link::Loopback,
        Fill::Random,
        256,
        20_000,
        SMALL_LIMIT_MS,
        vec![lm(1, "auto"), q(1, false)],
    );
}

/// The full matrix.
fn full_cells(m: &mut Cells) {
    // The headline: 2 GiB of random RAM, one stream each.
    m.add(
        Link::Loopback,
        Fill::Random,
        2048,
        0,
        vec![lm(1, "none"), clear(1, "none"), q(1, false), qtls(1)],
    );
    for f in CONTENTS {
        m.add(
            Link::Loopback,
            f,
            1024,
            0,
            vec![
                lm(1, "none"),
                lm(2, "none"),
                clear(1, "none"),
                clear(2, "none"),
                lm(1, "auto"),
                lm(1, "lz4"),
                lm(1, "zstd"),
                q(1, false),
                q(2, false),
                q(2, true),
                qtls(1),
                qtls(2),
                // Cold on both sides: the destination's RAM faulted in as pages land.
                cold(lm(1, "none")),
                cold(clear(1, "none")),
                cold(q(1, false)),
            ],
        );
        // The zero pages of these contents left as holes above (a guest's never-used RAM:
        // livemig skips them unread, QEMU reads a sparse file); here written on both sides,
        // so that both read every page.
        if matches!(f, Fill::Zero | Fill::Mixed) {
            m.add_written(
                Link::Loopback,
                f,
                1024,
                vec![
                    lm(1, "none"),
                    clear(1, "none"),
                    clear(2, "none"),
                    lm(1, "auto"),
                    q(1, false),
                    q(2, false),
                    q(2, true),
                    qtls(1),
                ],
            );
        }
    }
    for f in [Fill::Random, Fill::Text] {
        m.add(
            Link::TenGbit,
            f,
            512,
            0,
            vec![
                lm(1, "none"),
                lm(2, "none"),
                lm(2, "auto"),
                clear(1, "none"),
                clear(2, "none"),
                q(1, false),
                q(2, true),
                qtls(1),
                qtls(2),
            ],
        );
        m.add(
            Link::OneGbit,
            f,
            256,
            0,
            vec![
                lm(1, "none"),
                lm(1, "auto"),
                lm(1, "zstd"),
                q(1, false),
                q(2, true),
                qtls(1),
            ],
        );
    }
    for rate in [0, 10_000, 30_000, 60_000] {
        m.add(
            Link::Loopback,
            Fill::Random,
            512,
            rate,
            vec![
                lm(1, "auto"),
                lm(1, "delta"),
                clear(1, "auto"),
                q(1, false),
                qtls(1),
            ],
        );
    }
    // Both at a small limit, under the same dirtying guest: the downtime each really needs.
    for rate in [0, 10_000, 30_000] {
        m.add_limited(
            Link::Loopback,
            Fill::Random,
            512,
            rate,
            SMALL_LIMIT_MS,
            vec![lm(1, "auto"), clear(1, "auto"), q(1, false), qtls(1)],
        );
    }
}
