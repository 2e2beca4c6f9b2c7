//! Access logs: one record per HTTP request (Envoy's default JSON fields, with Istio's and the
//! mesh's additions) from both node proxies, and one per TCP connection at close (as ztunnel
//! logs them). Written as JSON lines on stdout (`--access-log json`, where Envoy writes its
//! own) or as `tracing` lines (`--access-log text`, target `trellis::access`), and handed to
//! any open `tap` ([`crate::tap`]).
use std::{
    io::Write as _,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use clap::ValueEnum;
use serde::Serialize;

use crate::{otlp, tap::Tap};

/// `--access-log`: how request and connection records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Not written (taps and traces still see requests).
    #[value(alias = "false")]
    Off,
    /// A `tracing` line per record (target `trellis::access`), in `--log-format`'s format.
    #[value(alias = "true")]
    Text,
    /// One JSON object per record on stdout, Envoy's default fields.
    Json,
}

/// One HTTP request as a proxy saw it. Field names and meanings are Envoy's default JSON
/// access-log format's; `null` where the proxy does not know the value (docs/agent.md says why
/// for each).
#[derive(Clone, Debug, Serialize)]
pub struct Request {
    /// `source` (the client's node proxy) or `destination` (the server's).
    pub reporter: &'static str,
    /// RFC 3339, milliseconds, UTC: when the request's head arrived.
    pub start_time: String,
    pub method: String,
    /// `x-envoy-original-path` if the request had one, else its path and query.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, …
    pub protocol: &'static str,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Milliseconds from the request's head to the response's last byte.
    pub duration: u64,
    /// Milliseconds from the request's head to the upstream's response head.
    pub upstream_service_time: Option<u64>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: Option<String>,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<String>,
    pub upstream_local_address: Option<String>,
    pub downstream_local_address: Option<String>,
    pub downstream_remote_address: Option<String>,
    pub requested_server_name: Option<String>,
    pub route_name: Option<String>,
    pub upstream_transport_failure_reason: Option<String>,
    pub connection_termination_details: Option<String>,
    pub source_workload: Option<String>,
    pub source_namespace: Option<String>,
    pub source_principal: Option<String>,
    pub destination_workload: Option<String>,
    pub destination_namespace: Option<String>,
    pub destination_principal: Option<String>,
    pub destination_service: Option<String>,
    pub trace_id: String,
    pub span_id: String,
}

/// One TCP connection, written when it closes.
#[derive(Clone, Debug, Serialize)]
pub struct Connection {
    pub reporter: &'static str,
    /// `outbound` or `inbound`, as in the proxy's other log lines.
    pub direction: &'static str,
    pub start_time: String,
    pub downstream_remote_address: String,
    /// The original destination the client connected to.
    pub downstream_local_address: String,
    pub upstream_host: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: u64,
    pub source_workload: Option<String>,
    pub source_namespace: Option<String>,
    pub source_principal: Option<String>,
    pub destination_workload: Option<String>,
    pub destination_namespace: Option<String>,
    pub destination_principal: Option<String>,
    pub destination_service: Option<String>,
    pub connection_termination_details: Option<String>,
}

/// Where the proxies' requests are reported: the access log, taps, traces. One per agent.
pub struct Observe {
    pub format: Format,
    pub tap: Tap,
    pub traces: Option<otlp::Exporter>,
    /// `--trace-sampling`: the percentage of traces started here that are sampled.
    pub sampling: f64,
    /// This node's name, in spans.
    pub node: String,
}

impl Observe {
    /// Whether request records are wanted now: when nothing consumes them, none is made.
    pub fn records(&self) -> bool {
        self.format != Format::Off || self.tap.open()
    }

    /// Writes a request's record and hands it to open taps.
    pub fn request(&self, r: Request) {
        match self.format {
            Format::Off => {}
            Format::Json => line(&r),
            Format::Text => tracing::info!(
                target: "trellis::access",
                reporter = r.reporter,
                method = r.method,
                path = r.path,
                status = r.response_code,
                response_flags = r.response_flags,
                duration_ms = r.duration,
                service = r.destination_service.as_deref().unwrap_or("unknown"),
                upstream_host = r.upstream_host.as_deref().unwrap_or("-"),
                trace_id = r.trace_id,
                span_id = r.span_id,
                "http request"
            ),
        }
        self.tap.send(r);
    }

    /// Writes a connection's record (nothing when the access log is off).
    pub fn connection(&self, c: impl FnOnce() -> Connection) {
        match self.format {
            Format::Off => {}
            Format::Json => line(&c()),
            Format::Text => {
                let c = c();
                tracing::info!(
                    target: "trellis::access",
                    reporter = c.reporter,
                    direction = c.direction,
                    client = c.downstream_remote_address,
                    orig_dst = c.downstream_local_address,
                    received = c.bytes_received,
                    sent = c.bytes_sent,
                    duration_ms = c.duration,
                    "tcp connection"
                )
            }
        }
    }
}

/// One JSON object on a line of its own, written whole.
fn line(record: &impl Serialize) {
    if let Ok(mut text) = serde_json::to_vec(record) {
        text.push(b'\n');
        let _ = std::io::stdout().lock().write_all(&text);
    }
}

/// `2026-12-04T02:05:09.123Z`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// `ip:port`, IPv4-mapped addresses shown as IPv4.
pub fn addr(a: SocketAddr) -> String {
    SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A request record to edit in tests.
    pub fn request() -> Request {
        Request {
            reporter: "source",
            start_time: timestamp(SystemTime::UNIX_EPOCH),
            method: "GET".into(),
            path: "/".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            response_flags: "-",
            bytes_received: 0,
            bytes_sent: 0,
            duration: 0,
            upstream_service_time: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local_address: None,
            downstream_local_address: None,
            downstream_remote_address: None,
            requested_server_name: None,
            route_name: None,
            upstream_transport_failure_reason: None,
            connection_termination_details: None,
            source_workload: None,
            source_namespace: None,
            source_principal: None,
            destination_workload: None,
            destination_namespace: None,
            destination_principal: None,
            destination_service: None,
            trace_id: String::new(),
            span_id: String::new(),
        }
    }

    #[test]
    fn records_have_envoys_fields_and_nulls_where_unknown() {
        let v = serde_json::to_value(request()).unwrap();
        assert_eq!(v["start_time"], "1970-01-01T00:00:00.000Z");
        for field in [
            "start_time",
            "method",
            "path",
            "protocol",
            "response_code",
            "response_flags",
            "bytes_received",
            "bytes_sent",
            "duration",
            "upstream_service_time",
            "x_forwarded_for",
            "user_agent",
            "request_id",
            "authority",
            "upstream_host",
            "upstream_cluster",
            "upstream_local_address",
            "downstream_local_address",
            "downstream_remote_address",
            "requested_server_name",
            "route_name",
            "upstream_transport_failure_reason",
            "connection_termination_details",
        ] {
            assert!(v.get(field).is_some(), "{field} missing");
        }
        assert!(v["route_name"].is_null());
        assert_eq!(addr("[::ffff:10.0.0.1]:80".parse().unwrap()), "10.0.0.1:80");
    }
}
