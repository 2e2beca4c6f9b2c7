//! Where the cluster model comes from: a directory of YAML (`dir`) or the Kubernetes API (`kube`).
//! Each runs under `supervise`, which restarts it if it fails or panics.
pub mod dir;
pub mod kube;

use std::{any::Any, future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use anyhow::Result;
use futures_util::FutureExt as _;
use tokio::{sync::watch, time::Instant};
use tracing::error;

use crate::{
    metrics::Metrics,
    model::{Cluster, Object, parse_object},
};

/// What a source publishes. Owned outside the source task, so a source that is restarted
/// never closes the channels agents' streams are reading.
pub struct Outputs {
    pub model: watch::Sender<Arc<Cluster>>,
    /// Errors of bad source objects, as they stand.
    pub errors: watch::Sender<Vec<String>>,
    /// True once the source has read the cluster.
    pub ready: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
}

impl Outputs {
    /// Publishes the model (if it changed) and the errors, and marks the source ready.
    pub fn publish(&self, cluster: Cluster, errors: Vec<String>) {
        self.model.send_if_modified(|m| {
            let changed = **m != cluster;
            if changed {
                *m = Arc::new(cluster);
            }
            changed
        });
        self.metrics.set_rejected(errors.len());
        self.errors.send_if_modified(|e| {
            let changed = *e != errors;
            *e = errors;
            changed
        });
        self.ready.send_if_modified(|r| !std::mem::replace(r, true));
    }
}

/// Pause before restarting a failed source, doubling up to `RESTART_MAX` while it keeps
/// failing quickly; a source that ran for `HEALTHY_RUN` starts again from `RESTART_MIN`.
const RESTART_MIN: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(30);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs the source `run` makes until control stops. A source that returns (with an error or
/// not) or panics is logged, counted in `trellis_control_source_restarts` and started again:
/// the model keeps its last value meanwhile, so agents keep their config.
pub async fn supervise<F, Fut>(name: &'static str, metrics: Arc<Metrics>, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut pause = RESTART_MIN;
    loop {
        let started = Instant::now();
        match AssertUnwindSafe(run()).catch_unwind().await {
            Ok(Ok(())) => error!(source = name, "source stopped; restarting it"),
            Ok(Err(e)) => error!(source = name, "source failed: {e:#}; restarting it"),
            Err(panic) => error!(
                source = name,
                "source panicked (a bug; please report it): {}; restarting it",
                panic_message(&*panic)
            ),
        }
        metrics.source_restarted(name);
        if started.elapsed() >= HEALTHY_RUN {
            pause = RESTART_MIN;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RESTART_MAX);
    }
}

/// Parses one object; a panic while parsing is a bug, and refuses this object, never the others.
pub fn parse_contained(doc: &serde_json::Value) -> Result<Object, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| parse_object(doc))) {
        Ok(parsed) => parsed.map_err(|e| format!("{e:#}")),
        Err(panic) => Err(format!(
            "internal error (a bug in trellis-control; please report it): {}",
            panic_message(&*panic)
        )),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A source that panics, then fails, is started again each time; the model it published
    /// stays, and so do the channels.
    #[tokio::test]
    async fn failing_sources_are_restarted_and_counted() {
        let metrics = Metrics::new();
        let (model, model_rx) = watch::channel(Arc::new(Cluster::default()));
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let task = tokio::spawn(supervise("dir", metrics.clone(), move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let model = model.clone();
            async move {
                match n {
                    0 => panic!("attempt to add with overflow"),
                    1 => anyhow::bail!("directory vanished"),
                    _ => {
                        let mut c = Cluster::default();
                        c.namespaces.insert("shop".into(), Default::default());
                        model.send_replace(Arc::new(c));
                        std::future::pending().await
                    }
                }
            }
        }));
        let mut rx = model_rx.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|c| !c.namespaces.is_empty()),
        )
        .await
        .expect("the third run published")
        .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(
            metrics
                .encode()
                .contains("trellis_control_source_restarts_total{source=\"dir\"} 2"),
            "{}",
            metrics.encode()
        );
        task.abort();
    }
}
