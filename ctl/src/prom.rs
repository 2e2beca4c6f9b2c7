//! Reading the Prometheus/OpenMetrics text the agents and control serve, and the arithmetic
//! Prometheus would do on it (`histogram_quantile`). Only the sample lines matter here: no
//! crate that parses this format is kept up well enough to take on, and the format is a line
//! per sample.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Every sample of a text exposition; comments, `# EOF`, timestamps and exemplars are ignored.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| sample(l).with_context(|| format!("metrics line {}: {l:?}", i + 1)))
        .collect()
}

fn sample(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').context("a label without '='")?;
            let key = rest[..eq].trim().to_owned();
            let quoted = rest[eq + 1..]
                .strip_prefix('"')
                .context("a label value not in quotes")?;
            let (value, after) = unquote(quoted)?;
            labels.insert(key, value);
            rest = after;
        }
    }
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .with_context(|| format!("{v:?} is not a number"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// A quoted label value (after its opening quote): the value, and what follows the closing quote.
fn unquote(s: &str) -> Result<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, c)) => out.push(c),
                None => break,
            },
            c => out.push(c),
        }
    }
    bail!("a label value without its closing quote")
}

/// Prometheus's `histogram_quantile`: the `q` quantile from cumulative `(le, count)` buckets,
/// interpolated linearly within the bucket it falls in. None without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                // As Prometheus: the highest finite bound.
                return Some(below.0);
            }
            let (lower, seen) = below;
            if count == seen {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - seen) / (count - seen));
        }
        below = (le, count);
    }
    Some(below.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_escaped_labels_exemplars_and_infinities() {
        let text = "# HELP x help\n# TYPE x counter\n\
            istio_requests_total{reporter=\"destination\",response_code=\"200\",path=\"a\\\"b\\\\c\"} 42\n\
            d_bucket{le=\"+Inf\"} 7 # {trace_id=\"abc\"} 1.0\n\
            up 1 1700000000\n# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "istio_requests_total");
        assert_eq!(s[0].label("path"), "a\"b\\c");
        assert_eq!(s[0].label("response_code"), "200");
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[1].label("le"), "+Inf");
        assert_eq!(s[1].value, 7.0);
        assert_eq!((s[2].name.as_str(), s[2].value), ("up", 1.0));
    }

    #[test]
    fn broken_lines_are_named() {
        let e = format!("{:#}", parse("ok 1\nbad{x=\"1} 2\n").unwrap_err());
        assert!(
            e.contains("metrics line 2") && e.contains("closing quote"),
            "{e}"
        );
        let e = format!("{:#}", parse("x{a=\"1\"} nope\n").unwrap_err());
        assert!(e.contains("\"nope\" is not a number"), "{e}");
    }

    #[test]
    fn quantiles_interpolate_as_prometheus_does() {
        // 10 observations: 4 up to 1 ms, 4 more up to 5 ms, 2 more up to 10 ms.
        let b = [(1.0, 4.0), (5.0, 8.0), (10.0, 10.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.5, &b), Some(2.0));
        assert_eq!(histogram_quantile(0.2, &b), Some(0.5));
        assert_eq!(histogram_quantile(0.9, &b), Some(7.5));
        assert_eq!(histogram_quantile(1.0, &b), Some(10.0));
        // Beyond the last finite bound: that bound.
        let b = [(1.0, 1.0), (f64::INFINITY, 3.0)];
        assert_eq!(histogram_quantile(0.99, &b), Some(1.0));
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }
}
