//! Kubernetes' own naming rules (apimachinery's `validation` package), so control refuses the
//! names, label keys and label values the API server would, whichever source they came from.
use std::collections::BTreeMap;

const LABEL_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;

fn alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= LABEL_MAX
        && s.starts_with(alnum_lower)
        && s.ends_with(alnum_lower)
        && s.chars().all(|c| alnum_lower(c) || c == '-')
}

/// Namespace names, DestinationRule subset names: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if is_dns1123_label(s) {
        return Ok(());
    }
    Err(format!(
        "{s:?} is not a DNS-1123 label (at most 63 characters: lower-case letters, digits and '-', \
         starting and ending with a letter or digit)"
    ))
}

/// Most object names: dot-separated DNS-1123 labels, at most 253 characters in all.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    // Each part is a DNS-1123 label in charset; only the whole is limited in length.
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.starts_with(alnum_lower)
            && p.ends_with(alnum_lower)
            && p.chars().all(|c| alnum_lower(c) || c == '-')
    };
    if !s.is_empty() && s.len() <= SUBDOMAIN_MAX && s.split('.').all(part_ok) {
        return Ok(());
    }
    Err(format!(
        "{s:?} is not a DNS-1123 subdomain (at most 253 characters: lower-case letters, digits, \
         '-' and '.', each dot-separated part starting and ending with a letter or digit)"
    ))
}

/// Service names: a DNS-1123 label that starts with a letter.
pub fn dns1035_label(s: &str) -> Result<(), String> {
    if is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Ok(());
    }
    Err(format!(
        "{s:?} is not a DNS-1035 label (at most 63 characters: lower-case letters, digits and '-', \
         starting with a letter and ending with a letter or digit)"
    ))
}

/// The name part of a label key, and a non-empty label value:
/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters.
fn is_qualified_part(s: &str) -> bool {
    let edge = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= LABEL_MAX
        && s.starts_with(edge)
        && s.ends_with(edge)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A label key: an optional DNS-1123 subdomain prefix and '/', then a name.
pub fn label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if prefix.is_some_and(|p| dns1123_subdomain(p).is_err()) {
        return Err(format!(
            "label key {s:?}: the prefix before '/' must be a DNS-1123 subdomain (e.g. example.com)"
        ));
    }
    if !is_qualified_part(name) {
        return Err(format!(
            "label key {s:?}: the name must be 1 to 63 characters: letters, digits, '-', '_' \
             and '.', starting and ending with a letter or digit (optionally after a DNS \
             subdomain prefix and '/')"
        ));
    }
    Ok(())
}

/// A label value: empty, or as the name part of a key.
pub fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() || is_qualified_part(s) {
        return Ok(());
    }
    Err(format!(
        "label value {s:?}: must be empty or 1 to 63 characters: letters, digits, '-', '_' and \
         '.', starting and ending with a letter or digit"
    ))
}

/// Checks every key and value of a label map (labels, selectors); errors start with `at`.
pub fn labels(at: &str, map: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in map {
        label_key(k)
            .and_then(|()| label_value(v))
            .map_err(|e| format!("{at}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_kubernetes() {
        for ok in [
            "app",
            "trellis.dev/mesh",
            "app.kubernetes.io/name",
            "A_b-c.D",
            "x",
        ] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        let long_name = "a".repeat(64);
        let long_prefix = format!("{}/x", "a".repeat(254));
        for bad in [
            "",
            "bad label!!/=x",
            "/x",
            "x/",
            "a/b/c",
            "-x",
            "x_",
            "Upper.Case/x",
            &long_name,
            &long_prefix,
        ] {
            assert!(label_key(bad).is_err(), "{bad:?} accepted");
        }
        for ok in ["", "v1", "a.b_c-D", &"a".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["a\0b", "with space", "-x", "x.", "é", &"a".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?} accepted");
        }
        let map = [("app".to_string(), "a\0".to_string())].into();
        let e = labels("metadata.labels", &map).unwrap_err();
        assert!(
            e.starts_with("metadata.labels: label value \"a\\0\""),
            "{e}"
        );
    }

    #[test]
    fn names_follow_kubernetes() {
        assert_eq!(dns1123_label("v1-canary"), Ok(()));
        for bad in ["", "v 1", "V1", "-v1", "v1-", "a.b", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(dns1123_subdomain("reviews.shop-1"), Ok(()));
        assert_eq!(dns1123_subdomain(&"a".repeat(253)), Ok(()));
        for bad in ["", "a..b", ".a", "a.", "A", "a_b", &"a".repeat(254)] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(dns1035_label("reviews"), Ok(()));
        assert!(dns1035_label("1reviews").is_err());
    }
}
