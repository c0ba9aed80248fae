//! Dirty bitmaps and the extents built from them.
//!
//! A [`DirtyBitmap`] holds one bit per guest page, one word vector per RAM region (region `i`
//! of the layout = KVM slot `i`). The VM ORs the KVM dirty log and the VMM's own writes into
//! it; the scheduler turns it into [`Extent`]s. This module knows nothing of KVM or transports.

use crate::memory::{RamLayout, PAGE_SIZE};

/// A run of contiguous dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u64,
}

impl Extent {
    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Pages in all of `extents`.
    pub fn total(extents: &[Extent]) -> u64 {
        extents.iter().map(|e| e.pages).sum()
    }
}

/// One bit per guest page, per region of a [`RamLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// `(gpa, pages, words)` per region.
    regions: Vec<(u64, u64, Vec<u64>)>,
}

impl DirtyBitmap {
    /// An all-clear bitmap for `layout`.
    pub fn new(layout: &RamLayout) -> Self {
        DirtyBitmap {
            regions: layout
                .regions
                .iter()
                .map(|r| {
                    let pages = r.size / PAGE_SIZE;
                    (r.gpa, pages, vec![0u64; pages.div_ceil(64) as usize])
                })
                .collect(),
        }
    }

    /// A bitmap with every page of `layout` set.
    pub fn all(layout: &RamLayout) -> Self {
        let mut b = Self::new(layout);
        for (_, pages, words) in &mut b.regions {
            words.iter_mut().for_each(|w| *w = u64::MAX);
            clear_tail(words, *pages);
        }
        b
    }

    /// ORs `words` (bit `i` = page `i` of region `region`) into the bitmap. Extra words or bits
    /// past the region's end are ignored.
    pub fn or_words(&mut self, region: usize, words: &[u64]) {
        if let Some((_, pages, mine)) = self.regions.get_mut(region) {
            for (m, w) in mine.iter_mut().zip(words) {
                *m |= *w;
            }
            clear_tail(mine, *pages);
        }
    }

    /// Marks the page holding `gpa` dirty (no-op outside the layout).
    pub fn set_page(&mut self, gpa: u64) {
        for (base, pages, words) in &mut self.regions {
            if gpa >= *base && gpa < *base + *pages * PAGE_SIZE {
                let p = (gpa - *base) / PAGE_SIZE;
                words[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
    }

    /// True when the page holding `gpa` is dirty.
    pub fn is_set(&self, gpa: u64) -> bool {
        self.regions.iter().any(|(base, pages, words)| {
            gpa >= *base && gpa < *base + *pages * PAGE_SIZE && {
                let p = (gpa - *base) / PAGE_SIZE;
                words[(p / 64) as usize] & (1 << (p % 64)) != 0
            }
        })
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, _, w)| w.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        for (_, _, words) in &mut self.regions {
            words.iter_mut().for_each(|w| *w = 0);
        }
    }

    /// The pages of `extents` whose bit is clear, as extents in the same order (pages outside
    /// the layout are kept).
    pub fn outside(&self, extents: &[Extent]) -> Vec<Extent> {
        let mut out = Vec::new();
        for e in extents {
            let region = self
                .regions
                .iter()
                .find(|(base, pages, _)| e.gpa >= *base && e.gpa < *base + *pages * PAGE_SIZE);
            let Some((base, pages, words)) = region else {
                out.push(*e);
                continue;
            };
            let first = (e.gpa - base) / PAGE_SIZE;
            let end = first + e.pages;
            let mut run: Option<u64> = None; // first clear page of the current run
            let mut p = first;
            while p < end {
                let set = p < *pages && words[(p / 64) as usize] & (1 << (p % 64)) != 0;
                match (set, run) {
                    (false, None) => run = Some(p),
                    (true, Some(s)) => {
                        out.push(Extent {
                            gpa: base + s * PAGE_SIZE,
                            pages: p - s,
                        });
                        run = None;
                    }
                    _ => {}
                }
                p += 1;
            }
            if let Some(s) = run {
                out.push(Extent {
                    gpa: base + s * PAGE_SIZE,
                    pages: end - s,
                });
            }
        }
        out
    }

    /// Runs of dirty pages, in address order. No extent crosses a region boundary.
    pub fn extents(&self) -> Vec<Extent> {
        let mut out = Vec::new();
        for (base, _, words) in &self.regions {
            let mut run: Option<(u64, u64)> = None; // (first page, count)
            for (wi, &w) in words.iter().enumerate() {
                let first = wi as u64 * 64;
                if w == 0 {
                    if let Some((s, n)) = run.take() {
                        out.push(Extent {
                            gpa: base + s * PAGE_SIZE,
                            pages: n,
                        });
                    }
                    continue;
                }
                if w == u64::MAX {
                    match &mut run {
                        Some((_, n)) => *n += 64,
                        None => run = Some((first, 64)),
                    }
                    continue;
                }
                let mut bits = w;
                let mut pos = 0u64;
                while pos < 64 {
                    let zeros = u64::from(bits.trailing_zeros()).min(64 - pos);
                    if zeros > 0 {
                        if let Some((s, n)) = run.take() {
                            out.push(Extent {
                                gpa: base + s * PAGE_SIZE,
                                pages: n,
                            });
                        }
                        pos += zeros;
                        bits = bits.checked_shr(zeros as u32).unwrap_or(0);
                        if pos >= 64 {
                            break;
                        }
                    }
                    let ones = u64::from(bits.trailing_ones());
                    match &mut run {
                        Some((_, n)) => *n += ones,
                        None => run = Some((first + pos, ones)),
                    }
                    pos += ones;
                    bits = bits.checked_shr(ones as u32).unwrap_or(0);
                }
            }
            if let Some((s, n)) = run.take() {
                out.push(Extent {
                    gpa: base + s * PAGE_SIZE,
                    pages: n,
                });
            }
        }
        out
    }
}

fn clear_tail(words: &mut [u64], pages: u64) {
    let full = (pages / 64) as usize;
    let rem = pages % 64;
    if rem != 0 {
        if let Some(w) = words.get_mut(full) {
            *w &= (1u64 << rem) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RamRegionSpec;
    use proptest::prelude::*;

    fn layout() -> RamLayout {
        RamLayout {
            regions: vec![
                RamRegionSpec {
                    gpa: 0,
                    size: 200 * PAGE_SIZE,
                },
                RamRegionSpec {
                    gpa: 1 << 30,
                    size: 130 * PAGE_SIZE,
                },
            ],
        }
    }

    #[test]
    fn all_covers_every_page_once() {
        let l = layout();
        let b = DirtyBitmap::all(&l);
        assert_eq!(b.count(), 330);
        assert_eq!(
            b.extents(),
            vec![
                Extent { gpa: 0, pages: 200 },
                Extent {
                    gpa: 1 << 30,
                    pages: 130
                }
            ]
        );
    }

    #[test]
    fn runs_span_words_but_not_regions() {
        let l = layout();
        let mut b = DirtyBitmap::new(&l);
        for p in 60..70 {
            b.set_page(p * PAGE_SIZE);
        }
        b.set_page(199 * PAGE_SIZE);
        b.set_page(1 << 30);
        assert_eq!(
            b.extents(),
            vec![
                Extent {
                    gpa: 60 * PAGE_SIZE,
                    pages: 10
                },
                Extent {
                    gpa: 199 * PAGE_SIZE,
                    pages: 1
                },
                Extent {
                    gpa: 1 << 30,
                    pages: 1
                }
            ]
        );
    }

    #[test]
    fn or_words_ignores_bits_past_the_region() {
        let l = layout();
        let mut b = DirtyBitmap::new(&l);
        b.or_words(1, &[u64::MAX, u64::MAX, u64::MAX, u64::MAX]);
        b.or_words(7, &[1]);
        assert_eq!(b.count(), 130);
    }

    proptest! {
        #[test]
        fn outside_keeps_exactly_the_clear_pages(
            set in proptest::collection::btree_set(0u64..330, 0..200),
            cuts in proptest::collection::btree_set(1u64..330, 0..12),
        ) {
            let l = layout();
            let gpa = |p: u64| if p < 200 { p * PAGE_SIZE } else { (1 << 30) + (p - 200) * PAGE_SIZE };
            let mut b = DirtyBitmap::new(&l);
            for &p in &set {
                b.set_page(gpa(p));
            }
            // All pages, cut into extents at `cuts` and at the region boundary.
            let mut edges: Vec<u64> = cuts.into_iter().chain([200]).collect();
            edges.sort_unstable();
            edges.dedup();
            let mut input = Vec::new();
            let mut start = 0;
            for &c in edges.iter().chain([330].iter()) {
                if c > start {
                    input.push(Extent { gpa: gpa(start), pages: c - start });
                }
                start = c;
            }
            let mut kept = Vec::new();
            for e in b.outside(&input) {
                prop_assert!(e.pages > 0);
                for i in 0..e.pages {
                    kept.push(e.gpa + i * PAGE_SIZE);
                }
            }
            let want: Vec<u64> = (0..330).filter(|p| !set.contains(p)).map(gpa).collect();
            prop_assert_eq!(kept, want);
        }

        #[test]
        fn extents_are_exactly_the_set_pages(pages in proptest::collection::btree_set(0u64..330, 0..200)) {
            let l = layout();
            let mut b = DirtyBitmap::new(&l);
            let gpa = |p: u64| if p < 200 { p * PAGE_SIZE } else { (1 << 30) + (p - 200) * PAGE_SIZE };
            for &p in &pages {
                b.set_page(gpa(p));
            }
            let ext = b.extents();
            let mut seen = Vec::new();
            for e in &ext {
                prop_assert!(e.pages > 0);
                prop_assert!(l.contains(e.gpa, e.bytes()));
                for i in 0..e.pages {
                    seen.push(e.gpa + i * PAGE_SIZE);
                }
            }
            let want: Vec<u64> = pages.iter().map(|&p| gpa(p)).collect();
            prop_assert_eq!(seen, want);
            // maximal runs: no two extents touch
            for w in ext.windows(2) {
                prop_assert!(w[0].gpa + w[0].bytes() < w[1].gpa);
            }
        }
    }
}
