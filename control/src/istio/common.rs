//! Types shared by several kinds, and the checks on them.
use std::{collections::BTreeMap, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Istio's string match: exactly one of exact, prefix, regex (RE2 syntax).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

impl StringMatch {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        match self {
            StringMatch::Regex(re) => regex::Regex::new(re)
                .map(|_| ())
                .map_err(|e| format!("{at}.regex: invalid regex: {e}")),
            _ => Ok(()),
        }
    }
}

/// A percentage, 0 to 100.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

impl Percent {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if (0.0..=100.0).contains(&self.value) {
            Ok(())
        } else {
            Err(format!(
                "{at}.value: {} is not a percentage (0 to 100)",
                self.value
            ))
        }
    }
}

/// `matchLabels` selector (Istio's WorkloadSelector).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        crate::names::labels(&format!("{at}.matchLabels"), &self.match_labels)
    }
}

/// Parses Istio's duration strings: a decimal number then `h`, `m`, `s`, `ms` or `us`
/// (`"1.5s"`, `"300ms"`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "h" => n * 3600.0,
        "m" => n * 60.0,
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => return None,
    };
    // Fallible: a duration beyond what `Duration` holds is refused, never a panic.
    Duration::try_from_secs_f64(secs).ok()
}

pub fn check_duration(at: &str, value: &Option<String>) -> Result<(), String> {
    match value {
        Some(v) if parse_duration(v).is_none() => Err(format!(
            "{at}: {v:?} is not a duration (use e.g. \"500ms\", \"1.5s\", \"2m\")"
        )),
        _ => Ok(()),
    }
}

/// Checks an upper-case enum spelled as a string against the supported values.
pub fn check_enum(at: &str, value: &Option<String>, supported: &[&str]) -> Result<(), String> {
    match value {
        Some(v) if !supported.contains(&v.as_str()) => Err(format!(
            "{at}: {v:?} is not supported (supported: {})",
            supported.join(", ")
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        let huge = format!("{}h", "9".repeat(30));
        for bad in ["", "5", "s", "1.2.3s", "-1s", "1d", &huge] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
