//! Admin endpoint (localhost only): health, readiness and the pod list as JSON.
use std::{convert::Infallible, net::SocketAddr};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

use crate::pods::AgentStatus;

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin endpoint on {addr} (set --admin-addr)"))
}

pub async fn serve(listener: TcpListener, status: watch::Receiver<AgentStatus>) {
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
        let status = status.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(route(&req, &status.borrow())) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route<B>(req: &Request<B>, status: &AgentStatus) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if status.ready => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: pods not reconciled yet\n".into(),
        ),
        "/pods" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&status.pods).unwrap_or_default(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /healthz, /readyz, /pods\n".into(),
        ),
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("static header"),
    );
    resp
}
