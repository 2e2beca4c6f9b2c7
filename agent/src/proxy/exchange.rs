//! One HTTP request watched from its head to its response's last byte, on either node proxy:
//! then it becomes an access-log record (and a tap's) and, when its trace is sampled and traces
//! are exported, an OTLP span. Nothing is made for a request that nobody would see.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::BodyExt as _;
use hyper::{
    HeaderMap, Request, Response, Version,
    body::{Bytes, Frame},
};
use opentelemetry_proto::tonic::trace::v1::{
    Span, Status, span::SpanKind, status::StatusCode as SpanStatus,
};

use super::{
    Shared,
    http::{Body, BodyError},
    trace,
};
use crate::{
    access::{self, addr, millis, timestamp},
    otlp::{attribute, int_attribute},
    state::Workload,
};

/// Which proxy sees the request: the client's (`source`, an OTLP CLIENT span) or the
/// server's (`destination`, a SERVER span).
#[derive(Clone, Copy, PartialEq)]
pub enum Side {
    Source,
    Destination,
}

/// Who is at either end, as far as the proxy knows.
#[derive(Default)]
pub struct Ends {
    pub source: Option<Arc<Workload>>,
    pub source_principal: Option<String>,
    pub destination: Option<Arc<Workload>>,
    pub destination_principal: Option<String>,
    pub service: Option<String>,
}

/// What the proxy learnt once the response head was there.
#[derive(Default)]
pub struct Answer {
    pub code: u16,
    pub flags: &'static str,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub failure: Option<String>,
    pub ends: Ends,
}

pub struct Exchange {
    shared: Arc<Shared>,
    side: Side,
    trace: trace::Context,
    /// The `tracing` span the text access-log line goes in.
    span: tracing::Span,
    started: Instant,
    start_time: SystemTime,
    method: String,
    path: String,
    protocol: &'static str,
    x_forwarded_for: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    authority: Option<String>,
    downstream_local: Option<SocketAddr>,
    downstream_remote: Option<SocketAddr>,
    request_bytes: Arc<AtomicU64>,
    answered: Option<(Answer, u64)>,
}

/// A proxied request's trace context (continued from its headers, or started and sampled at
/// `shared`'s rate) and the `trellis::access` span its handling runs in.
pub fn request_span<B>(
    shared: &Shared,
    pod: &str,
    req: &mut Request<B>,
) -> (trace::Context, tracing::Span) {
    let trace = trace::continue_trace(req.headers_mut(), shared.observe.sampling);
    let span = tracing::info_span!(
        target: "trellis::access",
        "http_request",
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        parent_id = trace.parent_id.as_deref().unwrap_or(""),
        pod = %pod,
        method = %req.method(),
        path = req.uri().path(),
    );
    (trace, span)
}

impl Exchange {
    /// Starts watching `req` if anyone will look at it: the access log, a tap, or a sampled
    /// trace's exporter. `local` is where the client connected, `remote` the client.
    pub fn begin<B>(
        shared: &Arc<Shared>,
        side: Side,
        req: &Request<B>,
        trace: &trace::Context,
        span: &tracing::Span,
        (local, remote): (Option<SocketAddr>, Option<SocketAddr>),
    ) -> Option<Self>
    where
        B: hyper::body::Body,
    {
        let observe = &shared.observe;
        let traced = trace.sampled && observe.traces.is_some();
        if !traced && !observe.records() {
            return None;
        }
        let header = |h: &HeaderMap, name: &str| {
            h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        let h = req.headers();
        let path = header(h, "x-envoy-original-path").unwrap_or_else(|| {
            req.uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
        });
        Some(Self {
            shared: shared.clone(),
            side,
            trace: trace.clone(),
            span: span.clone(),
            started: Instant::now(),
            start_time: SystemTime::now(),
            method: req.method().as_str().to_owned(),
            path,
            protocol: protocol(req.version()),
            x_forwarded_for: header(h, "x-forwarded-for"),
            user_agent: header(h, "user-agent"),
            request_id: header(h, "x-request-id"),
            authority: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| header(h, "host")),
            downstream_local: local,
            downstream_remote: remote,
            request_bytes: Arc::new(AtomicU64::new(req.body().size_hint().exact().unwrap_or(0))),
            answered: None,
        })
    }

    /// Counts the request body's bytes as they pass (the declared length stands until then).
    pub fn count_request(&self, req: Request<Body>) -> Request<Body> {
        let bytes = self.request_bytes.clone();
        bytes.store(0, Ordering::Relaxed);
        req.map(|body| {
            Counted {
                body,
                bytes: 0,
                on_end: Some(Box::new(move |n| bytes.store(n, Ordering::Relaxed))),
            }
            .boxed()
        })
    }

    /// Takes the response head's news and reports the exchange when its body has gone out.
    pub fn respond(mut self, answer: Answer, resp: Response<Body>) -> Response<Body> {
        let upstream_time = millis(self.started.elapsed());
        self.answered = Some((answer, upstream_time));
        resp.map(|body| {
            Counted {
                body,
                bytes: 0,
                on_end: Some(Box::new(move |n| self.finish(n))),
            }
            .boxed()
        })
    }

    fn finish(self, bytes_sent: u64) {
        let Some((answer, upstream_time)) = self.answered else {
            return;
        };
        let took = self.started.elapsed();
        let observe = &self.shared.observe;
        let name = |w: &Option<Arc<Workload>>| w.as_ref().map(|w| w.name.to_string());
        let ns = |w: &Option<Arc<Workload>>| w.as_ref().map(|w| w.namespace.to_string());
        let ends = &answer.ends;
        let record = access::Request {
            reporter: match self.side {
                Side::Source => "source",
                Side::Destination => "destination",
            },
            start_time: timestamp(self.start_time),
            method: self.method,
            path: self.path,
            protocol: self.protocol,
            response_code: answer.code,
            response_flags: answer.flags,
            bytes_received: self.request_bytes.load(Ordering::Relaxed),
            bytes_sent,
            duration: millis(took),
            // Only when an upstream answered: not for a failed try or the proxy's own answer.
            upstream_service_time: (answer.upstream_host.is_some() && answer.failure.is_none())
                .then_some(upstream_time),
            x_forwarded_for: self.x_forwarded_for,
            user_agent: self.user_agent,
            request_id: self.request_id,
            authority: self.authority,
            upstream_host: answer.upstream_host.map(addr),
            upstream_cluster: answer.upstream_cluster.clone(),
            upstream_local_address: None,
            downstream_local_address: self.downstream_local.map(addr),
            downstream_remote_address: self.downstream_remote.map(addr),
            requested_server_name: None,
            route_name: None,
            upstream_transport_failure_reason: answer.failure.clone(),
            connection_termination_details: None,
            source_workload: name(&ends.source),
            source_namespace: ns(&ends.source),
            source_principal: ends.source_principal.clone(),
            destination_workload: name(&ends.destination),
            destination_namespace: ns(&ends.destination),
            destination_principal: ends.destination_principal.clone(),
            destination_service: ends.service.clone(),
            trace_id: self.trace.trace_id.clone(),
            span_id: self.trace.span_id.clone(),
        };
        if let Some(traces) = &observe.traces
            && self.trace.sampled
        {
            let local = match self.side {
                Side::Source => &ends.source,
                Side::Destination => &ends.destination,
            };
            traces.send(span(
                &record,
                &self.trace,
                self.side,
                local.as_deref(),
                &self.shared,
                (self.start_time, took),
            ));
        }
        if observe.records() {
            self.span.in_scope(|| observe.request(record));
        }
    }
}

/// The OTLP span of one exchange, with the attributes Istio's proxies give theirs.
fn span(
    r: &access::Request,
    trace: &trace::Context,
    side: Side,
    local: Option<&Workload>,
    shared: &Shared,
    (start, took): (SystemTime, std::time::Duration),
) -> Span {
    let (trace_id, span_id, parent_span_id) = trace.ids();
    let start_ns = start
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let host = r
        .destination_service
        .clone()
        .or_else(|| r.authority.clone())
        .unwrap_or_default();
    let mut attributes = vec![
        attribute("component", "proxy"),
        attribute("node_id", shared.observe.node.clone()),
        attribute("http.method", r.method.clone()),
        attribute(
            "http.url",
            format!(
                "http://{}{}",
                r.authority.as_deref().unwrap_or(&host),
                r.path
            ),
        ),
        attribute("http.protocol", r.protocol),
        int_attribute("http.status_code", r.response_code.into()),
        attribute("response_flags", r.response_flags),
        attribute(
            "upstream_cluster",
            r.upstream_cluster.clone().unwrap_or_default(),
        ),
        int_attribute("request_size", r.bytes_received as i64),
        int_attribute("response_size", r.bytes_sent as i64),
    ];
    let mut optional = |key: &str, value: &Option<String>| {
        if let Some(v) = value {
            attributes.push(attribute(key, v.clone()));
        }
    };
    optional("peer.address", &r.downstream_remote_address);
    optional("upstream_host", &r.upstream_host);
    optional("user_agent", &r.user_agent);
    optional("guid:x-request-id", &r.request_id);
    optional("source.principal", &r.source_principal);
    optional("source.workload", &r.source_workload);
    optional("source.namespace", &r.source_namespace);
    optional("destination.principal", &r.destination_principal);
    optional("destination.workload", &r.destination_workload);
    optional("destination.namespace", &r.destination_namespace);
    optional("destination.service", &r.destination_service);
    if let Some(w) = local {
        attributes.extend([
            attribute("istio.canonical_service", w.canonical_service.to_string()),
            attribute("istio.canonical_revision", w.canonical_revision.to_string()),
            attribute("istio.namespace", w.namespace.to_string()),
        ]);
    }
    let error = r.response_code >= 500 || r.response_code == 0;
    Span {
        trace_id,
        span_id,
        parent_span_id,
        flags: 0x100 | u32::from(trace.sampled),
        name: format!("{host}{}", r.path.split('?').next().unwrap_or_default()),
        kind: match side {
            Side::Source => SpanKind::Client,
            Side::Destination => SpanKind::Server,
        } as i32,
        start_time_unix_nano: start_ns,
        end_time_unix_nano: start_ns + took.as_nanos() as u64,
        attributes,
        status: Some(Status {
            code: if error {
                SpanStatus::Error
            } else {
                SpanStatus::Unset
            } as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

type OnEnd = Box<dyn FnOnce(u64) + Send + Sync>;

/// A body whose data bytes are counted, and told once when it ends or is dropped.
struct Counted {
    body: Body,
    bytes: u64,
    on_end: Option<OnEnd>,
}

impl Counted {
    fn end(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes);
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.body.is_end_stream() {
                    self.end();
                }
            }
            Poll::Ready(_) => self.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.end();
    }
}
