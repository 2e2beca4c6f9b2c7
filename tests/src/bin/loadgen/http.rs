//! The HTTP modes: a server answering a fixed body over HTTP/1.1 and h2c (prior knowledge) on one
//! listener, a one-request probe, an open-loop latency run at a fixed rate and a closed-loop
//! maximum-rate run. hyper on a multi-threaded tokio runtime.
use std::{
    convert::Infallible,
    io::{self, Write as _},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    client::conn::{http1, http2},
    header::{HOST, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Mutex,
    task::JoinSet,
    time::timeout,
};

use super::{IO_TIMEOUT, MAX_REQUESTS_PER_CONN, Opts, Tally, WARMUP, timer::Timer};

/// The server copies this request header into its answer, so a client sees whether a proxy on
/// the way set it (a route's header rule ran).
const ROUTE_HEADER: &str = "x-bench-route";

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

// ---------------------------------------------------------------- server

pub fn serve(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let body = Bytes::from(vec![b'x'; o.size]);
    runtime()?.block_on(accept(addr, body))
}

async fn accept(addr: SocketAddr, body: Bytes) -> io::Result<bool> {
    let listener = TcpListener::bind(addr).await?;
    println!("ready");
    io::stdout().flush()?;
    // Like echo-serve, this runs until it is killed.
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let answer = service_fn(move |req: Request<Incoming>| {
                let mut resp = Response::new(Full::new(body.clone()));
                if let Some(v) = req.headers().get(ROUTE_HEADER) {
                    resp.headers_mut().insert(ROUTE_HEADER, v.clone());
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            // auto: HTTP/1.1, or HTTP/2 when the connection opens with the h2 preface.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), answer)
                .await;
        });
    }
}

// ---------------------------------------------------------------- client

/// A client connection: HTTP/1.1 (one request at a time) or h2c prior knowledge (streams).
enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, req: Request<Empty<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Conn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Conn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// What every request of a run is: GET / with the given headers, and the answer it expects.
struct Call {
    addr: SocketAddr,
    h2: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
    size: usize,
}

type Answer = Result<(StatusCode, HeaderMap, usize), String>;

impl Call {
    fn new(addr: SocketAddr, o: &Opts) -> io::Result<Self> {
        let bad =
            |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
        let headers = o
            .headers
            .iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::try_from(k.as_str()).map_err(|e| bad(&e))?,
                    HeaderValue::try_from(v.as_str()).map_err(|e| bad(&e))?,
                ))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            addr,
            h2: o.h2,
            headers,
            size: o.size,
        })
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        // h2 carries scheme and authority as pseudo-headers, taken from the URI.
        let mut b = if self.h2 {
            Request::get(format!("http://{}/", self.addr))
        } else {
            Request::get("/").header(HOST, self.addr.to_string())
        };
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        b.body(Empty::new()).expect("a GET with valid headers")
    }

    /// A good answer is the server's: 200 and the whole body.
    fn ok(&self, a: &Answer) -> bool {
        matches!(a, Ok((status, _, n)) if *status == StatusCode::OK && *n == self.size)
    }

    fn proto(&self) -> &'static str {
        if self.h2 { "h2c" } else { "http/1.1" }
    }
}

async fn connect(addr: SocketAddr, h2: bool) -> io::Result<Conn> {
    let handshake = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        Ok(if h2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = http1::handshake(io).await.map_err(io::Error::other)?;
            tokio::spawn(conn);
            Conn::H1(send)
        })
    };
    timeout(IO_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}")))?
}

/// One request and its whole answer, within IO_TIMEOUT.
async fn fetch(conn: &mut Conn, call: &Call) -> Answer {
    let exchange = async {
        let resp = conn.send(call.request()).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, body.len()))
    };
    timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {IO_TIMEOUT:?}"))?
}

/// A connection that callers share, replaced when it breaks.
type Slot = Arc<Mutex<Option<Conn>>>;

/// One request on the connection in `slot`, (re)connecting first if there is none. An HTTP/1.1
/// connection is used under the lock (one request at a time) and dropped after a failed
/// exchange (its state is unknown); an h2 one is cloned out, so the callers sharing it run their
/// streams side by side.
async fn fetch_shared(slot: &Slot, call: &Call) -> bool {
    let mut guard = slot.lock().await;
    if guard.as_ref().is_none_or(Conn::is_closed) {
        *guard = connect(call.addr, call.h2).await.ok();
    }
    if let Some(Conn::H2(s)) = guard.as_ref() {
        let mut stream = Conn::H2(s.clone());
        drop(guard);
        return call.ok(&fetch(&mut stream, call).await);
    }
    let ok = match guard.as_mut() {
        Some(c) => call.ok(&fetch(c, call).await),
        None => false,
    };
    if !ok {
        *guard = None;
    }
    ok
}

async fn connect_all(call: &Call, n: usize) -> io::Result<Vec<Slot>> {
    let mut slots = Vec::with_capacity(n);
    for _ in 0..n {
        let conn = connect(call.addr, call.h2).await?;
        slots.push(Arc::new(Mutex::new(Some(conn))));
    }
    Ok(slots)
}

// ---------------------------------------------------------------- probe

/// One request; prints its status, headers and body size.
pub fn probe(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let call = Call::new(addr, o)?;
    let (status, headers, bytes) = runtime()?.block_on(async {
        let mut conn = connect(addr, call.h2).await?;
        fetch(&mut conn, &call).await.map_err(io::Error::other)
    })?;
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
        .collect();
    println!(
        "{}",
        json!({ "proto": call.proto(), "status": status.as_u16(), "headers": headers, "bytes": bytes })
    );
    Ok(true)
}

// ---------------------------------------------------------------- latency (open loop)

/// When a connection's requests are due: request k at `first + k * interval`; those due in
/// `[measure_from, end)` are measured.
#[derive(Clone, Copy)]
struct Schedule {
    first: Instant,
    interval: Duration,
    measure_from: Instant,
    end: Instant,
}

impl Schedule {
    fn due(&self, k: u64) -> Instant {
        self.first + self.interval.mul_f64(k as f64)
    }
}

pub fn latency(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let call = Arc::new(Call::new(addr, o)?);
    let interval = Duration::from_secs_f64(o.conns as f64 / o.rate);
    let all = runtime()?.block_on(async {
        // Every connection first, so that connection set-up is not part of the first requests.
        let slots = connect_all(&call, o.conns).await?;
        let start = Instant::now() + Duration::from_millis(20);
        let mut tasks = JoinSet::new();
        for (i, slot) in slots.into_iter().enumerate() {
            let s = Schedule {
                // Connections are staggered evenly within one interval.
                first: start + interval.mul_f64(i as f64 / o.conns as f64),
                interval,
                measure_from: start + WARMUP,
                end: start + WARMUP + o.duration,
            };
            let call = call.clone();
            if call.h2 {
                tasks.spawn(streams(slot, s, call));
            } else {
                tasks.spawn(sequential(slot, s, call));
            }
        }
        let mut all = Tally::default();
        while let Some(t) = tasks.join_next().await {
            all.add(t.map_err(io::Error::other)??);
        }
        Ok::<_, io::Error>(all)
    })?;
    let ok = !all.latencies_us.is_empty();
    let mut report = all.report(o.duration);
    report["proto"] = json!(call.proto());
    println!("{report}");
    Ok(ok)
}

/// HTTP/1.1: one request at a time on the connection. As in the TCP `latency` mode, a request's
/// latency counts from when it was due if the connection was still busy then (a stall is
/// charged for every request it held up), else from its actual send (the client's wake-up is
/// not charged). Requests due in the window that could not be sent before its end are errors.
async fn sequential(slot: Slot, s: Schedule, call: Arc<Call>) -> io::Result<Tally> {
    let mut timer = Timer::new()?;
    let mut tally = Tally::default();
    let mut free_at = Instant::now();
    for k in 0..MAX_REQUESTS_PER_CONN {
        let due = s.due(k);
        if due >= s.end {
            break;
        }
        let counted = due >= s.measure_from;
        if Instant::now() >= s.end {
            tally.errors += u64::from(counted);
            continue;
        }
        timer.sleep_until(due).await?;
        let sent = Instant::now();
        let from = if free_at > due { due } else { sent };
        let ok = fetch_shared(&slot, &call).await;
        let done = Instant::now();
        free_at = done;
        match (counted, ok) {
            (true, true) => tally.latencies_us.push((done - from).as_micros() as u64),
            (true, false) => tally.errors += 1,
            (false, _) => {}
        }
    }
    Ok(tally)
}

/// HTTP/2: each request is its own stream, sent when due whatever the earlier ones are doing,
/// so its latency counts from when it was due.
async fn streams(slot: Slot, s: Schedule, call: Arc<Call>) -> io::Result<Tally> {
    let mut timer = Timer::new()?;
    let mut tally = Tally::default();
    let mut inflight = JoinSet::new();
    let record = |tally: &mut Tally, r: Result<(bool, bool, Duration), _>| match r {
        Ok((true, true, took)) => tally.latencies_us.push(took.as_micros() as u64),
        Ok((true, false, _)) | Err(_) => tally.errors += 1,
        Ok((false, _, _)) => {}
    };
    for k in 0..MAX_REQUESTS_PER_CONN {
        let due = s.due(k);
        if due >= s.end {
            break;
        }
        timer.sleep_until(due).await?;
        let (slot, call) = (slot.clone(), call.clone());
        inflight.spawn(async move {
            let ok = fetch_shared(&slot, &call).await;
            (due >= s.measure_from, ok, due.elapsed())
        });
        // Reap as we go, so finished streams do not pile up.
        while let Some(r) = inflight.try_join_next() {
            record(&mut tally, r);
        }
    }
    // Each stream ends within IO_TIMEOUT (plus a reconnect).
    while let Some(r) = inflight.join_next().await {
        record(&mut tally, r);
    }
    Ok(tally)
}

// ---------------------------------------------------------------- rate (closed loop)

/// `concurrency` requests always in flight for the duration: HTTP/1.1 on a connection each, h2
/// as streams over `conns` connections. Counts the good answers and the failures.
pub fn rate(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let call = Arc::new(Call::new(addr, o)?);
    let conns = if call.h2 {
        o.conns.min(o.concurrency)
    } else {
        o.concurrency
    };
    let (requests, errors, secs) = runtime()?.block_on(async {
        let slots = connect_all(&call, conns).await?;
        let start = Instant::now();
        let end = start + o.duration;
        let mut workers = JoinSet::new();
        for w in 0..o.concurrency {
            let (slot, call) = (slots[w % conns].clone(), call.clone());
            workers.spawn(async move {
                let (mut ok, mut errors) = (0u64, 0u64);
                for _ in 0..MAX_REQUESTS_PER_CONN {
                    if Instant::now() >= end {
                        break;
                    }
                    if fetch_shared(&slot, &call).await {
                        ok += 1;
                    } else {
                        errors += 1;
                        // Do not spin on a refusing server.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                (ok, errors)
            });
        }
        let (mut requests, mut errors) = (0, 0);
        while let Some(w) = workers.join_next().await {
            let (ok, e) = w.map_err(io::Error::other)?;
            requests += ok;
            errors += e;
        }
        Ok::<_, io::Error>((requests, errors, start.elapsed().as_secs_f64()))
    })?;
    println!(
        "{}",
        json!({
            "proto": call.proto(),
            "concurrency": o.concurrency,
            "conns": conns,
            "requests": requests,
            "errors": errors,
            "secs": secs,
            "rps": requests as f64 / secs,
        })
    );
    Ok(requests > 0)
}
