//! Trace context across the proxy: W3C `traceparent` is continued (same trace, a new span id for
//! this hop, the caller's span as parent) or started when absent; `tracestate` and B3 headers
//! pass through untouched. Each proxied request is one span (`tracing`), exported later.
use hyper::{HeaderMap, header::HeaderValue};

const TRACEPARENT: &str = "traceparent";

/// This hop's place in a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub trace_id: String,
    pub span_id: String,
    /// The caller's span, when the request carried one.
    pub parent_id: Option<String>,
    pub sampled: bool,
}

fn hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, not all-zero ids.
fn parse(v: &str) -> Option<(String, String, bool)> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if version != "00" || !is_hex(trace, 32) || !is_hex(span, 16) || !is_hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace.to_owned(), span.to_owned(), sampled))
}

/// Continues the request's trace (or starts one) and writes this hop's `traceparent`.
pub fn continue_trace(headers: &mut HeaderMap) -> Context {
    let incoming = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse);
    let ctx = match incoming {
        Some((trace_id, parent, sampled)) => Context {
            trace_id,
            span_id: hex(8),
            parent_id: Some(parent),
            sampled,
        },
        None => Context {
            // A B3 trace id, when the caller uses B3 only, keeps the trace one trace.
            trace_id: headers
                .get("x-b3-traceid")
                .and_then(|v| v.to_str().ok())
                .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| hex(16)),
            span_id: hex(8),
            parent_id: None,
            sampled: true,
        },
    };
    let value = format!(
        "00-{}-{}-{}",
        ctx.trace_id,
        ctx.span_id,
        if ctx.sampled { "01" } else { "00" }
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(TRACEPARENT, v);
    }
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_trace_and_starts_one_when_absent() {
        let mut h = HeaderMap::new();
        let started = continue_trace(&mut h);
        let sent = h[TRACEPARENT].to_str().unwrap().to_owned();
        assert_eq!(parse(&sent).unwrap().0, started.trace_id);
        assert!(started.parent_id.is_none());

        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let ctx = continue_trace(&mut h);
        assert_eq!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(ctx.span_id, "00f067aa0ba902b7");
        let (trace, span, sampled) = parse(h[TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(
            (trace.as_str(), span, sampled),
            (ctx.trace_id.as_str(), ctx.span_id.clone(), true)
        );

        // Malformed: a new trace, never the garbage.
        for bad in [
            "junk",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, bad.parse().unwrap());
            let ctx = continue_trace(&mut h);
            assert!(ctx.parent_id.is_none(), "{bad}");
            assert_ne!(h[TRACEPARENT].to_str().unwrap(), bad);
        }
    }
}
