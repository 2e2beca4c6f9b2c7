//! Trace context across the proxy: each proxied request is a span of a trace. W3C
//! `traceparent` is continued (same trace, a new span id for this hop, the caller's span as
//! parent, the caller's sampled flag honoured); without it, B3 (`x-b3-traceid`/`x-b3-spanid`/
//! `x-b3-sampled`, or the single `b3` header) is continued the same way and rewritten for this
//! hop; with neither, a trace is started, sampled at `--trace-sampling` percent. This hop's
//! `traceparent` always goes on; `tracestate` passes through.
use hyper::{HeaderMap, header::HeaderValue};

const TRACEPARENT: &str = "traceparent";
const B3: &str = "b3";
const B3_TRACE: &str = "x-b3-traceid";
const B3_SPAN: &str = "x-b3-spanid";
const B3_PARENT: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";

/// This hop's place in a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub trace_id: String,
    pub span_id: String,
    /// The caller's span, when the request carried one.
    pub parent_id: Option<String>,
    pub sampled: bool,
}

impl Context {
    /// The trace and span ids and the parent's, as OTLP carries them (bytes).
    pub fn ids(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        (
            unhex(&self.trace_id),
            unhex(&self.span_id),
            self.parent_id.as_deref().map(unhex).unwrap_or_default(),
        )
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// `bytes` random bytes in lower-case hex: one allocation, per request on both agents.
fn hex(bytes: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes);
    for _ in 0..bytes {
        let b = fastrand::u8(..);
        s.push(DIGITS[usize::from(b >> 4)].into());
        s.push(DIGITS[usize::from(b & 0xf)].into());
    }
    s
}

fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && !s.bytes().all(|b| b == b'0')
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, not all-zero ids.
fn parse(v: &str) -> Option<(String, String, bool)> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let flags_ok = flags.len() == 2 && flags.bytes().all(|b| b.is_ascii_hexdigit());
    if version != "00" || !is_hex(trace, 32) || !is_hex(span, 16) || !flags_ok {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace.to_owned(), span.to_owned(), sampled))
}

/// A B3 trace id: 128 bits, or 64 (widened with zeros, as Zipkin does).
fn b3_trace(t: &str) -> Option<String> {
    let t = t.trim().to_ascii_lowercase();
    match t.len() {
        32 if is_hex(&t, 32) => Some(t),
        16 if is_hex(&t, 16) => Some(format!("{:0>32}", t)),
        _ => None,
    }
}

/// B3's sampling state: `1`, `d` (debug) or `true` sample, `0` or `false` do not.
fn b3_sampled(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// What the request's B3 headers say: (trace id, span id, sampled), any of them missing.
fn b3(headers: &HeaderMap) -> (Option<String>, Option<String>, Option<bool>) {
    let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(single) = get(B3) {
        // `{trace}-{span}[-{sampled}[-{parent}]]`, or only the sampling state.
        let parts: Vec<&str> = single.trim().split('-').collect();
        return match parts.as_slice() {
            [state] => (None, None, b3_sampled(state)),
            [trace, span, rest @ ..] => (
                b3_trace(trace),
                is_hex(span, 16).then(|| span.to_string()),
                rest.first().and_then(|s| b3_sampled(s)),
            ),
            [] => (None, None, None),
        };
    }
    let sampled = match get(B3_FLAGS) {
        Some("1") => Some(true),
        _ => get(B3_SAMPLED).and_then(b3_sampled),
    };
    (
        get(B3_TRACE).and_then(b3_trace),
        get(B3_SPAN)
            .map(str::to_ascii_lowercase)
            .filter(|s| is_hex(s, 16)),
        sampled,
    )
}

/// Continues the request's trace (or starts one, sampled at `percent`), and writes this hop's
/// context into the request for the next hop.
pub fn continue_trace(headers: &mut HeaderMap, percent: f64) -> Context {
    let decide = || percent >= 100.0 || fastrand::f64() * 100.0 < percent;
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
        None => {
            let (trace, span, sampled) = b3(headers);
            let from_b3 = trace.is_some() && span.is_some();
            let ctx = Context {
                trace_id: trace.unwrap_or_else(|| hex(16)),
                span_id: hex(8),
                parent_id: span.filter(|_| from_b3),
                sampled: sampled.unwrap_or_else(decide),
            };
            if from_b3 {
                rewrite_b3(headers, &ctx);
            }
            ctx
        }
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

/// B3 headers naming this hop, for apps that propagate B3 only, in the form the caller used.
fn rewrite_b3(headers: &mut HeaderMap, ctx: &Context) {
    let sampled = if ctx.sampled { "1" } else { "0" };
    let single = headers.contains_key(B3);
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    if single {
        let parent = ctx.parent_id.as_deref().unwrap_or_default();
        set(
            B3,
            format!("{}-{}-{sampled}-{parent}", ctx.trace_id, ctx.span_id),
        );
    } else {
        set(B3_SPAN, ctx.span_id.clone());
        set(B3_PARENT, ctx.parent_id.clone().unwrap_or_default());
        set(B3_SAMPLED, sampled.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_trace_and_starts_one_when_absent() {
        let mut h = HeaderMap::new();
        let started = continue_trace(&mut h, 100.0);
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
        let ctx = continue_trace(&mut h, 100.0);
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
            let ctx = continue_trace(&mut h, 100.0);
            assert!(ctx.parent_id.is_none(), "{bad}");
            assert_ne!(h[TRACEPARENT].to_str().unwrap(), bad);
        }
    }

    #[test]
    fn b3_is_continued_and_rewritten_and_sampling_is_honoured() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            (B3_TRACE, "463ac35c9f6413ad48485a3953bb6124"),
            (B3_SPAN, "a2fb4a1d1a96d312"),
            (B3_SAMPLED, "0"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        let ctx = continue_trace(&mut h, 100.0);
        assert_eq!(ctx.trace_id, "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(ctx.parent_id.as_deref(), Some("a2fb4a1d1a96d312"));
        assert!(!ctx.sampled, "the caller's decision stands");
        assert_eq!(h[B3_SPAN].to_str().unwrap(), ctx.span_id);
        assert_eq!(h[B3_PARENT], "a2fb4a1d1a96d312");
        assert_eq!(h[B3_SAMPLED], "0");
        assert!(h[TRACEPARENT].to_str().unwrap().ends_with("-00"));

        // Single header, 64-bit trace id.
        let mut h = HeaderMap::new();
        h.insert(B3, "80f198ee56343ba8-e457b5a2e4d86bd1-1".parse().unwrap());
        let ctx = continue_trace(&mut h, 0.0);
        assert_eq!(ctx.trace_id, "000000000000000080f198ee56343ba8");
        assert_eq!(ctx.parent_id.as_deref(), Some("e457b5a2e4d86bd1"));
        assert!(ctx.sampled);
        assert_eq!(
            h[B3].to_str().unwrap(),
            format!("{}-{}-1-e457b5a2e4d86bd1", ctx.trace_id, ctx.span_id)
        );

        // Started traces follow the percentage; a caller's traceparent flag wins over it.
        let mut h = HeaderMap::new();
        assert!(!continue_trace(&mut h, 0.0).sampled);
        assert!(continue_trace(&mut HeaderMap::new(), 100.0).sampled);
        let mut h2 = HeaderMap::new();
        h2.insert(TRACEPARENT, h[TRACEPARENT].clone());
        assert!(!continue_trace(&mut h2, 100.0).sampled);
        let (trace, span, parent) = continue_trace(&mut h2, 100.0).ids();
        assert_eq!((trace.len(), span.len(), parent.len()), (16, 8, 8));
    }
}
