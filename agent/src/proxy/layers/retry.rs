//! Retry: when the route has `retries`, the request body is kept (up to 1 MiB) and the request
//! tried again, each time on a freshly balanced endpoint, while the answer is one `retryOn`
//! names and tries remain; the last answer stands, flagged URX when it was retryable. Upgrades
//! and larger bodies are sent once.
use std::time::Duration;

use http_body_util::{BodyExt as _, Limited};
use hyper::{Request, StatusCode, body::Body as _, upgrade::OnUpgrade};
use tower::Layer;
use tracing::debug;

use super::{
    Failure, Next, Req, around, decision, full, is_upgrade, local, outcome, upstream::PerTryTimeout,
};

/// Request bodies up to this size are kept so that a retry can send them again.
pub const BODY_LIMIT: usize = 1 << 20;
const BACKOFF: Duration = Duration::from_millis(25);

pub fn layer() -> impl Layer<Next, Service = Next> + Clone {
    around(|req: Req, next: Next| async move {
        let retry = match decision(&req).and_then(|d| d.policy.retry.clone()) {
            Some(r) if !is_upgrade(&req) && req.body().size_hint().lower() <= BODY_LIMIT as u64 => {
                r
            }
            _ => return next.call(req).await,
        };
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, BODY_LIMIT).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                debug!("reading the request body: {e}");
                return local(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large to retry\n",
                    "-",
                );
            }
        };
        let mut attempt = 0;
        loop {
            let mut req = Request::from_parts(parts.clone(), full(body.clone()));
            // The downstream connection's upgrade handle stays behind.
            req.extensions_mut().remove::<OnUpgrade>();
            if let Some(t) = retry.per_try_timeout {
                req.extensions_mut().insert(PerTryTimeout(t));
            }
            let mut resp = next.call(req).await;
            let again = match outcome(&mut resp).failure {
                None => retry.on.status(resp.status()),
                Some(Failure::Connect) => retry.on.connect_failure,
                Some(Failure::Reset) => retry.on.reset,
                // As Envoy: a try that timed out counts as a 504.
                Some(Failure::PerTryTimeout) => retry.on.status(StatusCode::GATEWAY_TIMEOUT),
            };
            if !again {
                return resp;
            }
            if attempt == retry.attempts {
                outcome(&mut resp).flags = "URX";
                return resp;
            }
            attempt += 1;
            tokio::time::sleep(BACKOFF * attempt).await;
            debug!(attempt, "retrying");
        }
    })
}
