//! `trellisctl stat deploy/NAME [-n NS]`: a workload's golden metrics (success rate, requests per
//! second, latency p50/p95/p99) from Istio's request metrics: from Prometheus when given, else
//! from two scrapes of every agent's `/metrics`.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{
    fetch::Endpoint,
    prom::{self, Sample, histogram_quantile},
    prometheus::query,
    table,
    targets::Agent,
};

const REQUESTS: &str = "istio_requests_total";
const DURATION_BUCKETS: &str = "istio_request_duration_milliseconds_bucket";

/// `deploy/NAME` (also `deployment/NAME`, `workload/NAME` or `NAME`): Istio's workload label.
pub fn workload_name(target: &str) -> Result<&str> {
    let name = match target.split_once('/') {
        None => target,
        Some(("deploy" | "deployment" | "deployments" | "workload", name)) => name,
        Some((kind, _)) => bail!(
            "{target:?}: {kind:?} is not a kind trellisctl reads; give deploy/NAME (Istio's destination_workload)"
        ),
    };
    if name.is_empty() {
        bail!("{target:?}: no name; give deploy/NAME");
    }
    Ok(name)
}

/// The golden metrics of one workload over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Golden {
    /// `destination` (the workload's own node proxy) or `source` (its callers').
    pub reporter: &'static str,
    pub requests: f64,
    pub rps: f64,
    /// Share of requests that were not 5xx; None without requests.
    pub success: Option<f64>,
    /// Milliseconds.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

pub fn render(name: &str, namespace: &str, g: &Golden) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}ms"));
    table::render(
        &[
            "NAME",
            "NAMESPACE",
            "REPORTER",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
        ],
        &[vec![
            name.to_owned(),
            namespace.to_owned(),
            g.reporter.to_owned(),
            g.success
                .map_or("-".into(), |s| format!("{:.2}%", s * 100.0)),
            format!("{:.2}", g.rps),
            ms(g.p50),
            ms(g.p95),
            ms(g.p99),
        ]],
    )
}

/// From the agents: every agent's `/metrics` now and after `window`, the difference.
pub async fn from_agents(
    agents: &[Agent],
    name: &str,
    namespace: &str,
    window: Duration,
) -> Result<Golden> {
    let before = scrape(agents).await?;
    tokio::time::sleep(window).await;
    let after = scrape(agents).await?;
    Ok(golden(&before, &after, name, namespace, window))
}

pub async fn scrape(agents: &[Agent]) -> Result<Vec<Sample>> {
    let mut all = Vec::new();
    for a in agents {
        let text = a
            .metrics()
            .get("/metrics")
            .await?
            .ok_body("/metrics")
            .with_context(|| format!("node {}", a.node))?;
        // Series are per node: the node keeps them apart when two agents report the same labels.
        for mut s in prom::parse(&text).with_context(|| format!("node {}'s /metrics", a.node))? {
            s.labels.insert("node".into(), a.node.clone());
            all.push(s);
        }
    }
    Ok(all)
}

/// The golden metrics between two scrapes, from the destination's reports if there are any for
/// the workload, else from its callers'.
pub fn golden(
    before: &[Sample],
    after: &[Sample],
    name: &str,
    namespace: &str,
    window: Duration,
) -> Golden {
    let of = |s: &Sample, reporter: &str| {
        s.label("reporter") == reporter
            && s.label("destination_workload") == name
            && s.label("destination_workload_namespace") == namespace
    };
    let reporter = if after
        .iter()
        .any(|s| s.name == REQUESTS && of(s, "destination"))
    {
        "destination"
    } else {
        "source"
    };
    let series = |samples: &[Sample], metric: &str| -> BTreeMap<BTreeMap<String, String>, f64> {
        samples
            .iter()
            .filter(|s| s.name == metric && of(s, reporter))
            .map(|s| (s.labels.clone(), s.value))
            .collect()
    };
    // What each series grew by; a series that restarted (an agent restart) counts from zero.
    let grown = |metric: &str| -> Vec<(BTreeMap<String, String>, f64)> {
        let old = series(before, metric);
        series(after, metric)
            .into_iter()
            .map(|(labels, v)| {
                let was = old.get(&labels).copied().filter(|w| *w <= v).unwrap_or(0.0);
                (labels, v - was)
            })
            .collect()
    };
    let requests = grown(REQUESTS);
    let total: f64 = requests.iter().map(|(_, v)| v).sum();
    let failed: f64 = requests
        .iter()
        .filter(|(l, _)| l.get("response_code").is_some_and(|c| c.starts_with('5')))
        .map(|(_, v)| v)
        .sum();
    let mut buckets: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (labels, v) in grown(DURATION_BUCKETS) {
        let le = labels.get("le").cloned().unwrap_or_default();
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        buckets.entry(le).or_insert((bound, 0.0)).1 += v;
    }
    let buckets: Vec<(f64, f64)> = buckets.into_values().filter(|(b, _)| !b.is_nan()).collect();
    Golden {
        reporter,
        requests: total,
        rps: total / window.as_secs_f64(),
        success: (total > 0.0).then(|| (total - failed) / total),
        p50: histogram_quantile(0.5, &buckets),
        p95: histogram_quantile(0.95, &buckets),
        p99: histogram_quantile(0.99, &buckets),
    }
}

/// From Prometheus: Istio's dashboard queries over the last minute, `reporter="destination"`.
pub async fn from_prometheus(prometheus: &Endpoint, name: &str, namespace: &str) -> Result<Golden> {
    let sel = format!(
        "reporter=\"destination\",destination_workload=\"{}\",destination_workload_namespace=\"{}\"",
        escape(name),
        escape(namespace)
    );
    let rps = query(prometheus, &format!("sum(rate({REQUESTS}{{{sel}}}[1m]))")).await?;
    // One query for the ratio, as Istio's dashboard: two would be evaluated at different instants.
    let success = query(
        prometheus,
        &format!(
            "sum(rate({REQUESTS}{{{sel},response_code!~\"5..\"}}[1m])) / sum(rate({REQUESTS}{{{sel}}}[1m]))"
        ),
    )
    .await?
    .filter(|v| v.is_finite());
    let q = |p: f64| {
        format!("histogram_quantile({p}, sum(rate({DURATION_BUCKETS}{{{sel}}}[1m])) by (le))")
    };
    let rps_v = rps.unwrap_or(0.0);
    Ok(Golden {
        reporter: "destination",
        requests: rps_v * 60.0,
        rps: rps_v,
        success: success.or((rps_v > 0.0).then_some(0.0)),
        p50: query(prometheus, &q(0.5)).await?.filter(|v| v.is_finite()),
        p95: query(prometheus, &q(0.95)).await?.filter(|v| v.is_finite()),
        p99: query(prometheus, &q(0.99)).await?.filter(|v| v.is_finite()),
    })
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(text: &str) -> Vec<Sample> {
        prom::parse(text).unwrap()
    }

    const L: &str = "destination_workload=\"web\",destination_workload_namespace=\"shop\"";

    #[test]
    fn rates_success_and_quantiles_from_two_scrapes() {
        let before = samples(&format!(
            "istio_requests_total{{reporter=\"destination\",{L},response_code=\"200\"}} 100\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"200\",le=\"1\"}} 50\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"200\",le=\"5\"}} 100\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"200\",le=\"+Inf\"}} 100\n"
        ));
        let after = samples(&format!(
            "istio_requests_total{{reporter=\"destination\",{L},response_code=\"200\"}} 130\n\
             istio_requests_total{{reporter=\"destination\",{L},response_code=\"503\"}} 10\n\
             istio_requests_total{{reporter=\"source\",{L},response_code=\"200\"}} 999\n\
             istio_requests_total{{reporter=\"destination\",destination_workload=\"other\",destination_workload_namespace=\"shop\",response_code=\"200\"}} 999\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"200\",le=\"1\"}} 70\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"200\",le=\"5\"}} 130\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"200\",le=\"+Inf\"}} 130\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"503\",le=\"1\"}} 0\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"503\",le=\"5\"}} 0\n\
             istio_request_duration_milliseconds_bucket{{reporter=\"destination\",{L},response_code=\"503\",le=\"+Inf\"}} 10\n"
        ));
        let g = golden(&before, &after, "web", "shop", Duration::from_secs(4));
        assert_eq!(g.reporter, "destination");
        assert_eq!(g.requests, 40.0);
        assert_eq!(g.rps, 10.0);
        assert_eq!(g.success, Some(0.75));
        // 40 in the window: 20 ≤ 1 ms, 10 more ≤ 5 ms, 10 beyond.
        assert_eq!(g.p50, Some(1.0));
        assert_eq!(g.p95, Some(5.0));
        let table = render("web", "shop", &g);
        assert!(
            table.contains("75.00%") && table.contains("10.00") && table.contains("1.0ms"),
            "{table}"
        );
    }

    #[test]
    fn callers_reports_when_the_destination_reports_none() {
        let after = samples(&format!(
            "istio_requests_total{{reporter=\"source\",{L},response_code=\"200\"}} 6\n"
        ));
        let g = golden(&[], &after, "web", "shop", Duration::from_secs(2));
        assert_eq!(
            (g.reporter, g.rps, g.success, g.p99),
            ("source", 3.0, Some(1.0), None)
        );
    }

    #[test]
    fn targets_name_a_workload() {
        assert_eq!(workload_name("deploy/web").unwrap(), "web");
        assert_eq!(workload_name("web").unwrap(), "web");
        assert!(
            workload_name("svc/web")
                .unwrap_err()
                .to_string()
                .contains("deploy/NAME")
        );
        assert!(workload_name("deploy/").is_err());
    }
}
