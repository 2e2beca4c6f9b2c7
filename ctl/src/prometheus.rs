//! Instant queries to a Prometheus server's HTTP API.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{fetch::Endpoint, prom::Sample};

/// An instant query's series: each one's labels and value (`name` is the metric's, if kept).
pub async fn query_vector(prometheus: &Endpoint, promql: &str) -> Result<Vec<Sample>> {
    let path = format!(
        "/api/v1/query?{}",
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish()
    );
    // The error names Prometheus, not the (long, encoded) query.
    let reply = prometheus
        .get(&path)
        .await
        .map_err(|e| anyhow::anyhow!("querying Prometheus at {prometheus}: {}", e.root_cause()))?;
    let v: Value = serde_json::from_str(&reply.body).with_context(|| {
        format!(
            "Prometheus at {prometheus} answered HTTP {} with no JSON",
            reply.status
        )
    })?;
    if v["status"] != "success" {
        bail!(
            "Prometheus refused {promql:?}: {}",
            v["error"].as_str().unwrap_or("no reason given")
        );
    }
    let mut out = Vec::new();
    for series in v["data"]["result"].as_array().into_iter().flatten() {
        let labels: BTreeMap<String, String> = series["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
        let value = series["value"][1]
            .as_str()
            .with_context(|| format!("Prometheus answered {promql:?} with no value"))?;
        out.push(Sample {
            name: labels.get("__name__").cloned().unwrap_or_default(),
            labels,
            value: match value {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .with_context(|| format!("Prometheus value {v:?}"))?,
            },
        });
    }
    Ok(out)
}

/// An instant query's single value; None when it returned no series.
pub async fn query(prometheus: &Endpoint, promql: &str) -> Result<Option<f64>> {
    Ok(query_vector(prometheus, promql)
        .await?
        .first()
        .map(|s| s.value))
}

/// `http://HOST:PORT` of a Prometheus server, reached from `netns` if given.
pub async fn endpoint(url: &str, netns: Option<&str>) -> Result<Endpoint> {
    let u = url::Url::parse(url)
        .with_context(|| format!("--prometheus {url:?}: not a URL (e.g. http://127.0.0.1:9090)"))?;
    if u.scheme() != "http" {
        bail!("--prometheus {url:?}: only http:// is supported");
    }
    let host = u.host_str().context("--prometheus: no host")?;
    let port = u.port_or_known_default().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("--prometheus {url:?}: resolving {host}"))?
        .next()
        .with_context(|| format!("--prometheus {url:?}: {host} has no address"))?;
    Ok(Endpoint::new(netns.map(crate::fetch::netns_path), addr))
}
