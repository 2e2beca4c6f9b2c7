//! The access log's record of one TCP connection, written when it closes (as ztunnel logs
//! connections): who, where, bytes each way, how long, and why it ended if not cleanly.
use std::{
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use prometheus_client::metrics::counter::Counter;

use super::Shared;
use crate::{
    access::{self, Format, addr, millis, timestamp},
    metrics::TcpLabels,
};

pub struct ConnLog {
    direction: &'static str,
    client: SocketAddr,
    dst: SocketAddr,
    upstream: Option<SocketAddr>,
    started: Instant,
    start_time: SystemTime,
}

impl ConnLog {
    /// A connection from `client` to `dst` starts; None when the access log is off, so an
    /// unlogged connection costs nothing (boxed: a connection's task holds one pointer).
    pub fn start(
        shared: &Shared,
        direction: &'static str,
        client: SocketAddr,
        dst: SocketAddr,
    ) -> Option<Box<Self>> {
        (shared.observe.format != Format::Off).then(|| {
            Box::new(Self {
                direction,
                client,
                dst,
                upstream: None,
                started: Instant::now(),
                start_time: SystemTime::now(),
            })
        })
    }

    /// Where the proxy connected on the client's behalf.
    pub fn upstream(log: &mut Option<Box<Self>>, upstream: SocketAddr) {
        if let Some(l) = log {
            l.upstream = Some(upstream);
        }
    }

    /// The connection closed: `result` is (bytes from the client, bytes to it), or why it
    /// ended otherwise.
    fn closed(&self, shared: &Shared, labels: &TcpLabels, result: Result<(u64, u64), String>) {
        let known = |s: &str| (s != "unknown").then(|| s.to_owned());
        let (received, sent, details) = match result {
            Ok((r, s)) => (r, s, None),
            Err(e) => (0, 0, Some(e)),
        };
        shared.observe.connection(|| access::Connection {
            reporter: labels.reporter,
            direction: self.direction,
            start_time: timestamp(self.start_time),
            downstream_remote_address: addr(self.client),
            downstream_local_address: addr(self.dst),
            upstream_host: self.upstream.map(addr),
            bytes_received: received,
            bytes_sent: sent,
            duration: millis(self.started.elapsed()),
            source_workload: known(&labels.source_workload),
            source_namespace: known(&labels.source_workload_namespace),
            source_principal: known(&labels.source_principal),
            destination_workload: known(&labels.destination_workload),
            destination_namespace: known(&labels.destination_workload_namespace),
            destination_principal: known(&labels.destination_principal),
            destination_service: known(&labels.destination_service),
            connection_termination_details: details,
        });
    }
}

/// What an open connection keeps until it closes: the counter its close adds to, and its labels
/// only when the access log will write them, so thousands of idle connections do not each hold
/// seventeen label values.
pub struct Closing {
    counter: Counter,
    log: Option<(Box<ConnLog>, Box<TcpLabels>)>,
}

impl Closing {
    /// Labels come boxed: a splice's future keeps its arguments for its whole life.
    pub fn new(shared: &Shared, labels: Box<TcpLabels>, log: Option<Box<ConnLog>>) -> Self {
        Self {
            counter: shared.metrics.closing(&labels),
            log: log.map(|l| (l, labels)),
        }
    }

    /// Counts the close and logs it: `result` as for [`ConnLog::closed`].
    pub fn closed(self, shared: &Shared, result: Result<(u64, u64), String>) {
        if let Some((log, labels)) = self.log {
            log.closed(shared, &labels, result);
        }
        self.counter.inc();
    }
}
