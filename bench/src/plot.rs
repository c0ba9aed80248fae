//! Plots of a `livemig bench` run (plotters; PNG and SVG): throughput per variant and content,
//! total time and downtime against the dirty rate, and bytes on the wire per variant.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One measured cell, as plotted.
pub struct Point {
    /// Variant label.
    pub variant: String,
    /// Link name.
    pub link: String,
    /// RAM content.
    pub content: String,
    /// RAM size.
    pub memory_mib: u64,
    /// Guest dirty rate.
    pub dirty_rate: u64,
    /// RAM / total time, GB/s.
    pub gbps: f64,
    /// Total time, ms (median).
    pub total_ms: f64,
    /// Downtime, ms (median).
    pub downtime_ms: f64,
    /// Bytes on the wire / RAM.
    pub wire_ratio: f64,
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT} (Debian's fonts-dejavu-core; scripts/bench.sh installs it)")
    })?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))
}

/// Writes throughput, dirty-rate and wire plots as PNG and SVG into `out`.
pub fn plots(out: &Path, points: impl Iterator<Item = Point>) -> Result<()> {
    register_font()?;
    let points: Vec<Point> = points.collect();
    // The loopback cells of the most common RAM size, guest idle.
    let size = {
        let mut sizes: Vec<u64> = points
            .iter()
            .filter(|p| p.link == "loopback" && p.dirty_rate == 0)
            .map(|p| p.memory_mib)
            .collect();
        sizes.sort();
        let mut best = (0, 0);
        for s in sizes.iter() {
            let n = sizes.iter().filter(|x| *x == s).count();
            if n > best.1 {
                best = (*s, n);
            }
        }
        best.0
    };
    let bars: Vec<&Point> = points
        .iter()
        .filter(|p| p.link == "loopback" && p.dirty_rate == 0 && p.memory_mib == size)
        .collect();
    // The dirty-rate sweep: livemig cells on loopback random RAM whose variant and size were
    // measured at several dirty rates.
    let swept = |p: &Point| {
        p.link == "loopback"
            && p.content == "random"
            && p.variant.starts_with("livemig")
            && points
                .iter()
                .filter(|q| {
                    q.variant == p.variant
                        && q.memory_mib == p.memory_mib
                        && q.link == p.link
                        && q.content == p.content
                })
                .map(|q| q.dirty_rate)
                .collect::<BTreeSet<_>>()
                .len()
                > 1
    };
    let sweep: Vec<&Point> = points.iter().filter(|p| swept(p)).collect();
    let rates: BTreeSet<u64> = sweep.iter().map(|p| p.dirty_rate).collect();
    let mut which = vec!["throughput", "wire"];
    if rates.len() > 1 {
        which.push("dirty_rate");
    }
    for name in which {
        let png = out.join(format!("{name}.png"));
        let area = BitMapBackend::new(&png, (1100, 600)).into_drawing_area();
        plot(&area, name, size, &bars, &sweep)?;
        area.present().map_err(plot_err)?;
        let svg = out.join(format!("{name}.svg"));
        let area = SVGBackend::new(&svg, (1100, 600)).into_drawing_area();
        plot(&area, name, size, &bars, &sweep)?;
        area.present().map_err(plot_err)?;
    }
    Ok(())
}

fn plot<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    name: &str,
    size: u64,
    bars: &[&Point],
    sweep: &[&Point],
) -> Result<()> {
    area.fill(&WHITE).map_err(plot_err)?;
    match name {
        "throughput" => grouped_bars(
            area,
            &format!("Migration throughput, loopback, {size} MiB (RAM / total time)"),
            "GB/s",
            bars,
            |p| p.gbps,
        ),
        "wire" => grouped_bars(
            area,
            &format!("Bytes on the wire / RAM, loopback, {size} MiB"),
            "wire / RAM",
            bars,
            |p| p.wire_ratio,
        ),
        _ => dirty_lines(area, sweep),
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

fn grouped_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    points: &[&Point],
    value: impl Fn(&Point) -> f64,
) -> Result<()> {
    let contents: Vec<String> = {
        let mut c = Vec::new();
        for p in points {
            if !c.contains(&p.content) {
                c.push(p.content.clone());
            }
        }
        c
    };
    let variants: Vec<String> = {
        let mut v = Vec::new();
        for p in points {
            if !v.contains(&p.variant) {
                v.push(p.variant.clone());
            }
        }
        v
    };
    // Log scale: zero pages move tens of times faster than data pages.
    let floor = 0.1;
    let max = points.iter().map(|p| value(p)).fold(floor, f64::max) * 3.0;
    let n = variants.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..contents.len() as f64, (floor..max).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(contents.iter().enumerate().map(|(i, c)| {
            Text::new(
                c.clone(),
                (i as f64 + 0.45, max / 1.6),
                ("sans-serif", 18).into_font(),
            )
        }))
        .map_err(plot_err)?;
    for (vi, v) in variants.iter().enumerate() {
        let color = Palette99::pick(vi).mix(0.9);
        let bars: Vec<(f64, f64)> = contents
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| {
                points
                    .iter()
                    .find(|p| &p.variant == v && &p.content == c)
                    .map(|p| (ci as f64, value(p).max(floor)))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x, y)| {
                let x0 = x + 0.1 + 0.8 * vi as f64 / n;
                Rectangle::new([(x0, floor), (x0 + 0.8 / n, y)], color.filled())
            }))
            .map_err(plot_err)?
            .label(v.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn dirty_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, points: &[&Point]) -> Result<()> {
    let max_rate = points
        .iter()
        .map(|p| p.dirty_rate)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_ms = points
        .iter()
        .map(|p| p.total_ms.max(p.downtime_ms))
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Total time and downtime vs guest dirty rate (loopback, random RAM)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate * 1.05, 0.0..max_ms)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("pages dirtied per second")
        .y_desc("ms")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    let variants: BTreeSet<&str> = points.iter().map(|p| p.variant.as_str()).collect();
    for (i, v) in variants.iter().enumerate() {
        let mut pts: Vec<&&Point> = points.iter().filter(|p| p.variant == *v).collect();
        pts.sort_by_key(|p| p.dirty_rate);
        for (k, (what, get)) in [
            ("total", (|p: &Point| p.total_ms) as fn(&Point) -> f64),
            ("downtime", |p: &Point| p.downtime_ms),
        ]
        .into_iter()
        .enumerate()
        {
            let color = Palette99::pick(i * 2 + k);
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.dirty_rate as f64, get(p))),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(format!("{v}: {what}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                });
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}
