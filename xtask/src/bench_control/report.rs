//! The tables `cargo xtask bench control` prints from its raw figures, with the targets.
use serde_json::Value;

use super::cluster;

/// The targets.
const P99_TARGET_MS: f64 = 200.0;
const RSS_TARGET_MB: f64 = 150.0;
const ONE_POD_TARGET_KB: f64 = 10.0;

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The figures of one source's report, as printed.
struct Summary {
    latencies: Vec<f64>,
    by_kind: Vec<(&'static str, Vec<f64>)>,
    /// Each agent's update for each one-pod change, and for each VirtualService edit (KB).
    one_pod_kb: Vec<f64>,
    vs_kb: Vec<f64>,
    snapshot_mb: Vec<f64>,
    rss_peak: f64,
}

fn summarize(r: &Value) -> Summary {
    let changes = r["changes"].as_array().cloned().unwrap_or_default();
    let latency = |c: &Value| c["latency_ms"].as_f64().unwrap_or(f64::NAN);
    let kb = |one_pod: bool| {
        sorted(
            changes
                .iter()
                .filter(|c| c["one_pod"].as_bool() == Some(one_pod))
                .flat_map(|c| c["bytes_per_agent"].as_array().cloned().unwrap_or_default())
                .filter_map(|b| b.as_f64())
                .map(|b| b / 1e3)
                .collect(),
        )
    };
    let by_kind = ["pod added", "endpoint removed", "VirtualService edited"]
        .into_iter()
        .map(|k| {
            let l = changes.iter().filter(|c| c["kind"] == k).map(latency);
            (k, sorted(l.collect()))
        })
        .collect();
    let c = &r["control"];
    let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
    Summary {
        latencies: sorted(changes.iter().map(latency).collect()),
        by_kind,
        one_pod_kb: kb(true),
        vs_kb: kb(false),
        snapshot_mb: r["snapshot_bytes_per_node"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_f64())
            .map(|b| b / 1e6)
            .collect(),
        rss_peak: f("rss_peak_start_mb").max(f("rss_peak_changes_mb")),
    }
}

pub fn print(reports: &[Value], changes: usize) {
    let sums: Vec<Summary> = reports.iter().map(summarize).collect();
    let names: Vec<String> = reports
        .iter()
        .map(|r| format!("`{}`", r["source"].as_str().unwrap_or("?")))
        .collect();
    let row = |label: &str, cell: &dyn Fn(&Value, &Summary) -> String| {
        let cells: Vec<String> = reports.iter().zip(&sums).map(|(r, s)| cell(r, s)).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    let three = |v: &[f64], p: usize| {
        if v.is_empty() {
            return "-".to_owned();
        }
        let f = |x: f64| format!("{x:.p$}");
        format!(
            "{} / {} / {}",
            f(percentile(v, 50.0)),
            f(percentile(v, 99.0)),
            f(v[v.len() - 1])
        )
    };
    println!(
        "\nControl at scale: {} pods on {} nodes, {} services, {} VirtualServices, {} agents; \
         {changes} changes per source\n",
        cluster::PODS,
        cluster::NODES,
        cluster::SERVICES,
        cluster::VIRTUAL_SERVICES,
        cluster::NODES
    );
    println!("| | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(reports.len()));
    row(
        "all agents hold the snapshot, after control starts",
        &|r, _| {
            format!(
                "{:.1} s",
                r["first_snapshots_s"].as_f64().unwrap_or(f64::NAN)
            )
        },
    );
    row("snapshot per node, min / median / max", &|_, s| {
        let v = &s.snapshot_mb;
        format!(
            "{:.2} / {:.2} / {:.2} MB",
            v[0],
            percentile(v, 50.0),
            v[v.len() - 1]
        )
    });
    row("change → all agents acked, p50 / p99 / max", &|_, s| {
        format!("{} ms", three(&s.latencies, 0))
    });
    for k in 0..3 {
        row(&format!("&nbsp;&nbsp;{}", sums[0].by_kind[k].0), &|_, s| {
            format!("{} ms", three(&s.by_kind[k].1, 0))
        });
    }
    row(
        "update per agent, one-pod change, p50 / p99 / max",
        &|_, s| format!("{} KB", three(&s.one_pod_kb, 1)),
    );
    row(
        "update per agent, VirtualService edit, p50 / p99 / max",
        &|_, s| format!("{} KB", three(&s.vs_kb, 1)),
    );
    row("control RSS: peak / after start / at end", &|r, s| {
        let c = &r["control"];
        format!(
            "{:.0} / {:.0} / {:.0} MB",
            s.rss_peak,
            c["rss_after_start_mb"].as_f64().unwrap_or(f64::NAN),
            c["rss_end_mb"].as_f64().unwrap_or(f64::NAN)
        )
    });
    row(
        "control CPU: start-up / changes (over their wall time)",
        &|r, _| {
            let c = &r["control"];
            let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
            format!(
                "{:.1} s / {:.1} s ({:.0} s)",
                f("cpu_start_s"),
                f("cpu_changes_s"),
                f("changes_wall_s")
            )
        },
    );
    row(
        "CPU beside control during the changes: agents / other processes",
        &|r, _| {
            let c = &r["cpu_during_changes"];
            let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
            format!("{:.1} s / {:.1} s", f("agents_s"), f("others_s"))
        },
    );

    println!("\n| target | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(reports.len()));
    let verdict = |value: f64, limit: f64, unit: &str| {
        let met = if value <= limit { "MET" } else { "MISSED" };
        format!("{value:.1} {unit} {met}")
    };
    row("p99 change → all agents acked ≤ 200 ms", &|_, s| {
        verdict(percentile(&s.latencies, 99.0), P99_TARGET_MS, "ms")
    });
    row("control RSS ≤ 150 MB (peak)", &|_, s| {
        verdict(s.rss_peak, RSS_TARGET_MB, "MB")
    });
    row(
        "an agent's update for a one-pod change ≤ 10 KB (max)",
        &|_, s| {
            verdict(
                s.one_pod_kb.last().copied().unwrap_or(f64::NAN),
                ONE_POD_TARGET_KB,
                "KB",
            )
        },
    );
}
