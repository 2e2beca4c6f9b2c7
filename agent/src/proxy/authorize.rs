//! AuthorizationPolicy in the connection handlers: a connection to a TCP port is decided when it
//! opens and again on every config change while it lasts, so a new DENY closes it (Istio leaves
//! open L4 connections alone; we do not); requests to HTTP ports are decided one by one
//! (`request`). Denials are counted (`trellis_connection_failures_total{reason="authz"}` and
//! Istio's metrics with response flag `RBAC`) and logged with the policy's name.
use std::{net::IpAddr, sync::Arc};

use hyper::{Request, Response, StatusCode, header::HeaderValue};
use tokio::sync::watch;
use tracing::info;

use super::{Failure, PodCtx, Shared, http};
use crate::{
    authz::{Conn, Decision, Http, normalize_path},
    metrics::TcpLabels,
    state::MeshState,
};

/// Who is calling, as the destination's proxy knows it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The verified SPIFFE ID; None for a plaintext caller.
    pub identity: Option<String>,
    pub ip: IpAddr,
    /// Opened by the node itself (kubelet's probes): no policy applies, or an ALLOW policy
    /// would fail the pod's health checks.
    pub from_node: bool,
}

impl Caller {
    fn conn(&self, port: u16) -> Conn<'_> {
        Conn {
            identity: self.identity.as_deref(),
            ip: self.ip,
            port,
        }
    }
}

/// Istio's response flag for a request or connection an AuthorizationPolicy denied (Envoy puts
/// the policy in `response_code_details` instead; Trellis has no such label).
pub const DENIED_FLAG: &str = "RBAC";

/// Decides a connection to a TCP `port` of `pod`; on denial logs and counts it and returns the
/// deciding policy.
pub fn connection(
    shared: &Shared,
    pod: &PodCtx,
    caller: &Caller,
    port: u16,
    labels: &TcpLabels,
) -> Result<(), String> {
    let policies = shared.state.borrow().authz(&pod.uid);
    let Some(policies) = policies.filter(|_| !caller.from_node) else {
        return Ok(());
    };
    let decision = policies.evaluate(&caller.conn(port), None);
    record(shared, pod, caller, &decision, "connection");
    match decision.denied_by() {
        None => Ok(()),
        Some(by) => {
            shared.metrics.failed(&mut labels.clone(), DENIED_FLAG);
            Err(by.to_owned())
        }
    }
}

/// Resolves, with the deciding policy, once a config change makes the pod's policies deny an
/// open connection from `caller` to `port`.
pub async fn revoked(
    mut state: watch::Receiver<Arc<MeshState>>,
    uid: &str,
    caller: &Caller,
    port: u16,
) -> String {
    loop {
        if caller.from_node || state.changed().await.is_err() {
            // Exempt, or the config follower is gone (the agent is stopping): nothing applies.
            return std::future::pending().await;
        }
        let Some(policies) = state.borrow_and_update().authz(uid) else {
            continue;
        };
        if let Some(by) = policies.evaluate(&caller.conn(port), None).denied_by() {
            return by.to_owned();
        }
    }
}

/// Decides one HTTP request to `port`: None to let it through, or the answer to send instead
/// (403 `RBAC: access denied`; for gRPC, status PERMISSION_DENIED).
pub fn request<B>(
    shared: &Shared,
    pod: &PodCtx,
    caller: &Caller,
    port: u16,
    req: &Request<B>,
) -> Option<Response<http::Body>> {
    if caller.from_node {
        return None;
    }
    let policies = shared.state.borrow().authz(&pod.uid)?;
    let path = normalize_path(req.uri().path());
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let http = Http {
        method: req.method().as_str(),
        path: &path,
        host,
        headers: req.headers(),
    };
    let decision = policies.evaluate(&caller.conn(port), Some(&http));
    record(shared, pod, caller, &decision, "request");
    decision.denied_by()?;
    Some(if http::is_grpc(req.headers()) {
        let mut resp = http::error(StatusCode::OK, "");
        let headers = resp.headers_mut();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        // PERMISSION_DENIED, as Envoy maps a local 403 for gRPC callers.
        headers.insert("grpc-status", HeaderValue::from_static("7"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("RBAC: access denied"),
        );
        resp
    } else {
        let mut resp = http::error(StatusCode::FORBIDDEN, "RBAC: access denied");
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        resp
    })
}

fn record(shared: &Shared, pod: &PodCtx, caller: &Caller, decision: &Decision, what: &str) {
    let client_identity = caller.identity.as_deref().unwrap_or("none");
    for policy in &decision.audited {
        info!(pod = %pod.name, client = %caller.ip, client_identity, policy, what, "AuthorizationPolicy audit");
    }
    if let Some(policy) = decision.denied_by()
        && let Some(suppressed) = shared.fail(Failure::authz)
    {
        let allow_policies = decision.unmatched_allow.as_str();
        info!(pod = %pod.name, client = %caller.ip, client_identity, policy, allow_policies, what, suppressed, "denied by AuthorizationPolicy");
    }
}
