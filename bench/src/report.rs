//! What a run writes: the per-cell rows (medians and spread), CSV, JSON, the markdown table
//! and the plots, with the machine and commit recorded.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One measured cell: the median and spread of its repetitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `livemig` or `qemu`.
    pub system: String,
    /// Variant label.
    pub variant: String,
    /// Link name.
    pub link: String,
    /// RAM content.
    pub content: String,
    /// RAM size, MiB.
    pub memory_mib: u64,
    /// Guest dirty rate, pages per second.
    pub dirty_rate: u64,
    /// Downtime limit both systems were given, ms (results from before it was a column: 300).
    #[serde(default = "default_limit")]
    pub downtime_limit_ms: u64,
    /// Repetitions that produced a figure.
    pub repetitions: usize,
    /// Total time, median.
    pub total_ms_median: f64,
    /// Total time, fastest.
    pub total_ms_min: f64,
    /// Total time, slowest.
    pub total_ms_max: f64,
    /// Downtime, median.
    pub downtime_ms_median: f64,
    /// Bytes on the wire, median.
    pub bytes_on_wire_median: f64,
    /// RAM / median total time, GB/s.
    pub throughput_gbps: f64,
    /// Every livemig repetition had matching digests (None for QEMU).
    pub digest_match: Option<bool>,
    /// Source CPU seconds, median.
    pub source_cpu_s: Option<f64>,
    /// Destination CPU seconds, median.
    pub destination_cpu_s: Option<f64>,
    /// Source process CPU seconds outside its vCPU threads, median (both systems alike).
    #[serde(default)]
    pub source_process_cpu_s: Option<f64>,
    /// Destination process CPU seconds outside its vCPU threads, median.
    #[serde(default)]
    pub destination_process_cpu_s: Option<f64>,
    /// Bytes that crossed the link into the destination's host, counted at its interface,
    /// median (both systems alike).
    #[serde(default)]
    pub link_bytes_median: Option<f64>,
    /// CPU seconds of the source's vCPU threads during the migration, median (both systems
    /// alike): what the guest took from the cores the migration runs on.
    #[serde(default)]
    pub source_guest_cpu_s: Option<f64>,
}

fn default_limit() -> u64 {
    crate::matrix::DEFAULT_LIMIT_MS
}

/// The median of `v` (sorted in place; 0 when empty).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// The repository's commit.
pub fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// CPU, cores, memory and kernel of this machine.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": mem,
        "kernel": kernel.trim(),
    })
}

/// `YYYYmmdd-HHMMSS` now.
pub fn chrono_stamp() -> String {
    let out = Command::new("date").arg("+%Y%m%d-%H%M%S").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "now".into())
}

/// Writes results.json, results.csv, results.md and the plots into `out`.
pub fn write_outputs(out: &Path, meta: &Value, rows: &[Row], raw: &[Value]) -> Result<()> {
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json!({"meta": meta, "rows": rows, "runs": raw}))?,
    )?;
    let mut csv = String::from(
        "system,variant,link,content,memory_mib,dirty_rate,downtime_limit_ms,repetitions,total_ms_median,total_ms_min,total_ms_max,downtime_ms_median,bytes_on_wire_median,throughput_gbps,digest_match,source_cpu_s,destination_cpu_s,source_process_cpu_s,destination_process_cpu_s,link_bytes_median,source_guest_cpu_s\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.0},{:.3},{},{},{},{},{},{},{}\n",
            r.system,
            r.variant,
            r.link,
            r.content,
            r.memory_mib,
            r.dirty_rate,
            r.downtime_limit_ms,
            r.repetitions,
            r.total_ms_median,
            r.total_ms_min,
            r.total_ms_max,
            r.downtime_ms_median,
            r.bytes_on_wire_median,
            r.throughput_gbps,
            r.digest_match.map(|d| d.to_string()).unwrap_or_default(),
            csv_opt(r.source_cpu_s, 2),
            csv_opt(r.destination_cpu_s, 2),
            csv_opt(r.source_process_cpu_s, 2),
            csv_opt(r.destination_process_cpu_s, 2),
            csv_opt(r.link_bytes_median, 0),
            csv_opt(r.source_guest_cpu_s, 2),
        ));
    }
    std::fs::write(out.join("results.csv"), csv)?;
    std::fs::write(out.join("results.md"), markdown(meta, rows))?;
    crate::plot::plots(
        out,
        rows.iter().map(|r| crate::plot::Point {
            variant: r.variant.clone(),
            link: r.link.clone(),
            content: r.content.clone(),
            memory_mib: r.memory_mib,
            dirty_rate: r.dirty_rate,
            gbps: r.throughput_gbps,
            total_ms: r.total_ms_median,
            downtime_ms: r.downtime_ms_median,
            wire_ratio: r.link_bytes_median.unwrap_or(r.bytes_on_wire_median)
                / (r.memory_mib << 20) as f64,
        }),
    )?;
    Ok(())
}

/// A CSV field: `v` with `decimals`, or empty.
fn csv_opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|x| format!("{x:.decimals$}")).unwrap_or_default()
}

fn markdown(meta: &Value, rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Command: `{}` — commit {} — {} — {} cores, {}\n\n",
        meta["command"].as_str().unwrap_or(""),
        meta["commit"].as_str().unwrap_or(""),
        meta["date"].as_str().unwrap_or(""),
        meta["machine"]["cores"],
        meta["machine"]["cpu"].as_str().unwrap_or("")
    ));
    s.push_str("Physical limits measured in the same run: ");
    if let Some(l) = meta["physical_limits"].as_object() {
        let parts: Vec<String> = l
            .iter()
            .map(|(k, v)| format!("{k} = {:.2}", v.as_f64().unwrap_or(0.0)))
            .collect();
        s.push_str(&parts.join(", "));
    }
    s.push_str(
        "\n\nTotal time: from the migrate command to the guest running on the destination, on \
         both sides (QEMU: the command to its destination's RESUME event; its own total-time, \
         which ends when its source has sent the last byte, is in the JSON). \
         Downtime: from the source's pause to the guest running on the destination, on \
         both sides (QEMU: its source's STOP to its destination's RESUME event). Link bytes: \
         what crossed into the destination's host, counted at its interface for both (headers \
         included; on loopback, `lo` of a namespace of their own, both directions); \
         `*` marks a program's own count where the interface was not read. CPU: seconds per \
         GiB of guest RAM, each process's CPU time outside its vCPU threads, for both \
         (`/proc`, 10 ms resolution), livemig's source less its digest check after the \
         switchover (a pass over RAM QEMU does not make; `source_verify_cpu_s` in the \
         JSON). Guest CPU s: the source's vCPU threads over the migration, for both — the \
         guest's own running and what its hypervisor does for it (KVM's exits and dirty-log \
         faults for livemig's guest, TCG's emulation for QEMU's), taken from the same two \
         cores.\n",
    );
    s.push_str(
        "\nvs QEMU best: against the fastest QEMU variant of the cell, whatever it is (in clear \
         too); vs QEMU TLS best: an encrypted livemig row (no `(clear)`) against the fastest \
         QEMU variant over TLS — the same work, sealed on both sides.\n",
    );
    s.push_str("\n| link | content | RAM MiB | dirty pages/s | limit ms | variant | total ms (median [min–max]) | downtime ms | GB/s | link bytes / RAM | CPU s/GiB src / dst | guest CPU s | vs QEMU single | vs QEMU best | vs QEMU TLS best | digest |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    // The same cell (link, content, RAM, rate, limit) in the same destination-RAM regime.
    let peers = |r: &Row| {
        let cold = |v: &str| v.contains("(no reserve)") || v.contains("(no prealloc)");
        rows.iter()
            .filter(|q| {
                q.system == "qemu"
                    && q.variant != r.variant
                    && cold(&q.variant) == cold(&r.variant)
                    && q.link == r.link
                    && q.content == r.content
                    && q.memory_mib == r.memory_mib
                    && q.dirty_rate == r.dirty_rate
                    && q.downtime_limit_ms == r.downtime_limit_ms
            })
            .collect::<Vec<_>>()
    };
    // QEMU's single stream in clear: the yardstick of the 'vs QEMU single' column.
    let clear_single = |v: &str| v.starts_with("qemu single") && !v.contains(" tls");
    for r in rows {
        let p = peers(r);
        let single = p
            .iter()
            .find(|q| clear_single(&q.variant))
            .map(|q| q.total_ms_median);
        let best = p
            .iter()
            .map(|q| q.total_ms_median)
            .min_by(|a, b| a.total_cmp(b));
        let tls_best = p
            .iter()
            .filter(|q| q.variant.contains(" tls"))
            .map(|q| q.total_ms_median)
            .min_by(|a, b| a.total_cmp(b));
        let sealed = r.system == "livemig" && !r.variant.contains("(clear)");
        let vs = |q: Option<f64>| q.map_or_else(|| "—".into(), |q| speed(q, r.total_ms_median));
        let ram = (r.memory_mib << 20) as f64;
        let gib = ram / f64::from(1u32 << 30);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} [{:.0}–{:.0}] | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.link,
            r.content,
            r.memory_mib,
            r.dirty_rate,
            r.downtime_limit_ms,
            r.variant,
            r.total_ms_median,
            r.total_ms_min,
            r.total_ms_max,
            r.downtime_ms_median,
            // RAM over time means a rate only where the RAM really crossed the link.
            if r.bytes_on_wire_median >= 0.5 * (r.memory_mib << 20) as f64 {
                format!("{:.2}", r.throughput_gbps)
            } else {
                "—".into()
            },
            match r.link_bytes_median {
                Some(b) => format!("{:.3}", b / ram),
                None => format!("{:.3}*", r.bytes_on_wire_median / ram),
            },
            match (r.source_process_cpu_s, r.destination_process_cpu_s) {
                (Some(a), Some(b)) => format!("{:.2} / {:.2}", a / gib, b / gib),
                _ => "—".into(),
            },
            r.source_guest_cpu_s
                .map_or_else(|| "—".into(), |g| format!("{g:.2}")),
            if r.system == "qemu" && clear_single(&r.variant) {
                "—".into()
            } else {
                vs(single)
            },
            if r.system == "qemu" { "—".into() } else { vs(best) },
            if sealed { vs(tls_best) } else { "—".into() },
            match r.digest_match {
                Some(true) => "match",
                Some(false) => "MISMATCH",
                None => "n/a",
            }
        ));
    }
    s
}

/// `theirs` against `ours` (total times): "1.25× faster" or "1.60× slower", never a fraction
/// of "faster".
fn speed(theirs: f64, ours: f64) -> String {
    let ratio = theirs / ours.max(1e-9);
    if ratio >= 1.0 {
        format!("{ratio:.2}× faster")
    } else {
        format!("{:.2}× slower", 1.0 / ratio.max(1e-9))
    }
}

/// The folders of a bench run named `name`: its results folder (`out`, or
/// `results/NAME-STAMP`) and a scratch folder under the system's temporary folder, both
/// created; and the run's time stamp.
pub fn run_folders(
    out: Option<&std::path::Path>,
    name: &str,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, String)> {
    use anyhow::Context as _;
    let stamp = chrono_stamp();
    let out = out.map_or_else(
        || std::path::PathBuf::from(format!("results/{name}-{stamp}")),
        std::path::Path::to_path_buf,
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let work = std::env::temp_dir().join(format!("livemig-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    Ok((out, work, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slower_row_says_slower_not_a_fraction_of_faster() {
        assert_eq!(speed(125.0, 100.0), "1.25× faster");
        assert_eq!(speed(100.0, 125.0), "1.25× slower");
        assert_eq!(speed(100.0, 100.0), "1.00× faster");
    }
}
