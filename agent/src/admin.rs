//! Admin endpoint (localhost only): health, readiness, as JSON the pods, the certificates held
//! and the proxy's config (what control sent, as the proxy uses it), and live taps of a
//! workload's requests ([`crate::tap`]).
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{identity::Svids, proxy::Shared, ready::Readiness, tap::Filter};

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin endpoint on {addr} (set --admin-addr)"))
}

pub async fn serve(listener: TcpListener, readiness: Readiness, shared: Arc<Shared>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin endpoint listening");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("admin accept: {e}");
                continue;
            }
        };
        let (readiness, shared) = (readiness.clone(), shared.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = if req.uri().path() == "/tap" {
                    tap(&req, &shared)
                } else {
                    route(&req, &readiness).map(BodyExt::boxed)
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route<B>(req: &Request<B>, readiness: &Readiness) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => readyz(readiness),
        "/pods" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&readiness.status.borrow().pods).unwrap_or_default(),
        ),
        "/certificates" => reply(
            StatusCode::OK,
            "application/json",
            certificates(&readiness.svids.borrow()),
        ),
        "/config_dump" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&**readiness.state.borrow()).unwrap_or_default(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /healthz, /readyz, /pods, /certificates, /config_dump, \
             /tap?namespace=NS&workload=NAME\n"
                .into(),
        ),
    }
}

/// `/tap?…`: the records of a workload's requests as they happen, until the client leaves.
fn tap<B>(req: &Request<B>, shared: &Shared) -> Response<BoxBody<Bytes, Infallible>> {
    match Filter::parse(req.uri().query().unwrap_or_default()) {
        Ok(filter) => {
            let mut resp = Response::new(shared.observe.tap.stream(filter).boxed());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-ndjson"),
            );
            resp
        }
        Err(e) => {
            reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")).map(BodyExt::boxed)
        }
    }
}

/// `/readyz`: 200 `ready`, or 503 with what is missing.
pub fn readyz(readiness: &Readiness) -> Response<Full<Bytes>> {
    match readiness.check() {
        Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        Err(why) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {why}\n"),
        ),
    }
}

/// The workload certificates held: identity, expiry and planned renewal (Unix seconds).
fn certificates(svids: &Svids) -> String {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let list: Vec<_> = svids
        .values()
        .map(|s| serde_json::json!({"identity": s.identity, "not_after": unix(s.not_after), "renew_at": unix(s.renew_at())}))
        .collect();
    serde_json::to_string_pretty(&list).unwrap_or_default()
}

pub fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("static header"),
    );
    resp
}
