//! Fault injection: the route's delay (DI), then its abort (FI), which answers without
//! reaching upstream.
use tower::Layer;

use super::{Next, Req, around, decision, local, outcome};

pub fn layer() -> impl Layer<Next, Service = Next> + Clone {
    around(|req: Req, next: Next| async move {
        let Some(d) = decision(&req) else {
            return next.call(req).await;
        };
        let (delay, abort) = d.policy.fault.roll();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if let Some(status) = abort {
            return local(status, "fault filter abort\n", "FI");
        }
        let mut resp = next.call(req).await;
        // A delayed request that then failed is reported by its failure.
        if delay.is_some() && outcome(&mut resp).flags == "-" {
            outcome(&mut resp).flags = "DI";
        }
        resp
    })
}
