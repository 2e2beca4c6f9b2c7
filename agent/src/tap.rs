//! `GET /tap?namespace=NS&workload=NAME[&path_prefix=/x][&method=GET]` on the admin endpoint:
//! the access-log records of the requests through one workload (as source or destination),
//! streamed live as NDJSON while the client stays connected. Records go out through one small
//! broadcast queue: a reader that falls behind loses records (counted in
//! `trellis_tap_records_dropped_total`) and never holds a request up; with no tap open no
//! record is even made.
use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use hyper::body::{Body, Bytes, Frame};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{broadcast, mpsc};

use crate::access::Request;

/// Records queued for all taps together; a tap this far behind loses the oldest.
const CAPACITY: usize = 256;
/// Lines queued for one tap's connection.
const LINES: usize = 16;

pub struct Tap {
    tx: broadcast::Sender<Arc<Request>>,
    /// Taps open now: read on every request, so it is an atomic, not the channel's lock.
    open: Arc<AtomicUsize>,
    dropped: Counter,
}

impl Tap {
    pub fn new(dropped: Counter) -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
            open: Arc::default(),
            dropped,
        }
    }

    pub fn open(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    pub fn send(&self, r: Request) {
        if self.open() {
            let _ = self.tx.send(Arc::new(r));
        }
    }

    /// A stream of the records `filter` selects, as NDJSON, until its reader goes away.
    pub fn stream(&self, filter: Filter) -> Lines {
        let mut records = self.tx.subscribe();
        let open = Opened::new(self.open.clone());
        let dropped = self.dropped.clone();
        let (tx, rx) = mpsc::channel(LINES);
        tokio::spawn(async move {
            let _open = open;
            loop {
                let record = tokio::select! {
                    r = records.recv() => r,
                    () = tx.closed() => return,
                };
                let record = match record {
                    Ok(r) => r,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        dropped.inc_by(n);
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !filter.matches(&record) {
                    continue;
                }
                let Ok(mut line) = serde_json::to_vec(&*record) else {
                    continue;
                };
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }
}

/// Counts a tap as open for as long as it lives.
struct Opened(Arc<AtomicUsize>);

impl Opened {
    fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A tap's response body: one JSON record a line, sent as they come.
pub struct Lines(mpsc::Receiver<Bytes>);

impl Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|l| l.map(|l| Ok(Frame::data(l))))
    }
}

/// Which requests a tap shows.
#[derive(Debug, PartialEq)]
pub struct Filter {
    namespace: String,
    workload: String,
    path_prefix: Option<String>,
    method: Option<String>,
}

impl Filter {
    /// From the tap's query string; says what is missing or unknown.
    pub fn parse(query: &str) -> Result<Self, String> {
        let (mut namespace, mut workload, mut path_prefix, mut method) = (None, None, None, None);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*k {
                "namespace" => &mut namespace,
                "workload" => &mut workload,
                "path_prefix" => &mut path_prefix,
                "method" => &mut method,
                _ => {
                    return Err(format!(
                        "unknown tap parameter {k:?}: use namespace, workload, path_prefix, method"
                    ));
                }
            };
            *slot = Some(v.into_owned());
        }
        match (namespace, workload) {
            (Some(namespace), Some(workload)) => Ok(Self {
                namespace,
                workload,
                path_prefix,
                method: method.map(|m| m.to_ascii_uppercase()),
            }),
            _ => Err("a tap needs ?namespace=NS&workload=NAME (and may take \
                      &path_prefix=/x&method=GET)"
                .into()),
        }
    }

    fn matches(&self, r: &Request) -> bool {
        let is = |ns: &Option<String>, w: &Option<String>| {
            ns.as_deref() == Some(&self.namespace) && w.as_deref() == Some(&self.workload)
        };
        (is(&r.source_namespace, &r.source_workload)
            || is(&r.destination_namespace, &r.destination_workload))
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| r.path.starts_with(p.as_str()))
            && self.method.as_ref().is_none_or(|m| *m == r.method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_needs_namespace_and_workload_and_matches_either_end() {
        assert!(Filter::parse("namespace=shop").is_err());
        assert!(Filter::parse("namespace=shop&workload=web&colour=red").is_err());
        let f = Filter::parse("namespace=shop&workload=web&path_prefix=%2Fapi&method=get").unwrap();
        let mut r = crate::access::tests::request();
        r.destination_namespace = Some("shop".into());
        r.destination_workload = Some("web".into());
        r.path = "/api/x".into();
        assert!(f.matches(&r));
        r.method = "POST".into();
        assert!(!f.matches(&r));
        r.method = "GET".into();
        r.path = "/other".into();
        assert!(!f.matches(&r));
        r.path = "/api".into();
        (r.source_namespace, r.source_workload) = (
            r.destination_namespace.take(),
            r.destination_workload.take(),
        );
        assert!(f.matches(&r));
        r.source_namespace = Some("other".into());
        assert!(!f.matches(&r));
    }

    #[tokio::test]
    async fn a_tap_counts_as_open_only_while_read_and_a_slow_one_drops() {
        use http_body_util::BodyExt as _;
        let dropped = Counter::default();
        let tap = Tap::new(dropped.clone());
        assert!(!tap.open());
        let mut lines = tap.stream(Filter::parse("namespace=shop&workload=web").unwrap());
        assert!(tap.open());
        let mut r = crate::access::tests::request();
        r.source_namespace = Some("shop".into());
        r.source_workload = Some("web".into());
        // Far more than the queues hold, none read yet: the surplus is dropped and counted.
        for _ in 0..(CAPACITY + LINES) * 4 {
            tap.send(r.clone());
            tokio::task::yield_now().await;
        }
        // Reading lets the tap's task go on, and find out what it missed.
        for _ in 0..LINES * 2 {
            let frame = lines.frame().await.unwrap().unwrap().into_data().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
            assert_eq!(v["method"], "GET");
            if dropped.get() > 0 {
                break;
            }
        }
        assert!(dropped.get() > 0, "nothing counted as dropped");
        drop(lines);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tap.open() {
            assert!(std::time::Instant::now() < deadline, "the tap never closed");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
