//! Hostile and heavy clients for the robustness tests, on tokio so one process holds thousands
//! of connections.
//!
//! - `echo-serve ADDR`: TCP echo, a task per connection; prints `ready`.
//! - `slowloris ADDR [--conns 500] [--interval-ms 1000] [--duration-secs 20] [--h2]`: opens the
//!   connections, then on each sends one byte of an HTTP/1.1 request head every interval (the
//!   head never ends); with `--h2`, the HTTP/2 preface and an empty SETTINGS frame once, then
//!   nothing. Reports how many the server closed and when.
//! - `hold ADDR [--conns 10000] [--rate 500] [--duration-secs 60]`: opens the connections (to an
//!   echo server) at `rate` per second, holds them idle, then checks each still echoes a byte.
//!   Reports opened, failed and alive.
//!
//! Each prints one JSON line. Every loop is bounded in count and time.
use std::{
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

const USAGE: &str = "usage: trellis-abuse echo-serve ADDR
       trellis-abuse slowloris ADDR [--conns 500] [--interval-ms 1000] [--duration-secs 20] [--h2]
       trellis-abuse hold ADDR [--conns 10000] [--rate 500] [--duration-secs 60]";

/// The most connections any mode opens, whatever it is told.
const MAX_CONNS: usize = 20_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2's client preface then an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// A request head that is never finished: one byte of it (then of the header value) at a time.
const H1_HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ";

struct Opts {
    conns: usize,
    /// New connections per second (hold).
    rate: u64,
    interval: Duration,
    duration: Duration,
    h2: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        conns: 500,
        rate: 500,
        interval: Duration::from_secs(1),
        duration: Duration::from_secs(20),
        h2: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--h2" {
            o.h2 = true;
            continue;
        }
        let value: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--conns" => o.conns = (value as usize).min(MAX_CONNS),
            "--rate" => o.rate = value.max(1),
            "--interval-ms" => o.interval = Duration::from_millis(value.max(1)),
            "--duration-secs" => o.duration = Duration::from_secs(value.min(600)),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(o)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Thousands of connections need more descriptors than the usual soft limit of 1024.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("trellis-abuse: raising the open-file limit: {e}");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let (addr, opts) = match (addr.parse::<SocketAddr>(), parse(&args[2..])) {
        (Ok(a), Ok(o)) => (a, o),
        (Err(e), _) => return usage(&format!("{addr}: {e}")),
        (_, Err(e)) => return usage(&e),
    };
    let ok = match cmd.as_str() {
        "echo-serve" => echo_serve(addr).await,
        "slowloris" => slowloris(addr, &opts).await,
        "hold" => hold(addr, &opts).await,
        _ => return usage("unknown mode"),
    };
    match ok {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-abuse {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!("trellis-abuse: {why}\n{USAGE}");
    ExitCode::from(2)
}

async fn echo_serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("ready");
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors, say: wait for some to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                if s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Opens up to `conns` connections, in batches of 50 at `rate` per second; the open ones and how
/// many failed.
async fn open_all(addr: SocketAddr, conns: usize, rate: u64) -> (Vec<TcpStream>, usize) {
    const BATCH: usize = 50;
    let (mut open, mut failed) = (Vec::with_capacity(conns), 0);
    let mut pending = JoinSet::new();
    let mut pace = tokio::time::interval(
        Duration::from_millis(1000 * BATCH as u64 / rate).max(Duration::from_millis(1)),
    );
    for i in 0..conns {
        if i % BATCH == 0 {
            pace.tick().await;
        }
        pending.spawn(connect(addr));
        if pending.len() >= BATCH || i + 1 == conns {
            while let Some(r) = pending.join_next().await {
                match r {
                    Ok(Ok(s)) => open.push(s),
                    _ => failed += 1,
                }
            }
        }
    }
    (open, failed)
}

async fn slowloris(addr: SocketAddr, o: &Opts) -> std::io::Result<()> {
    let (streams, failed) = open_all(addr, o.conns, o.rate).await;
    let opened = streams.len();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for mut s in streams {
        let (interval, duration, h2) = (o.interval, o.duration, o.h2);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let mut sent = 0usize;
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let chunk: &[u8] = match (h2, sent) {
                            (true, 0) => H2_PREFACE,
                            (true, _) => &[],
                            (false, n) => H1_HEAD.get(n..=n).unwrap_or(b"a"),
                        };
                        if !chunk.is_empty() && s.write_all(chunk).await.is_err() {
                            return Some(start.elapsed());
                        }
                        sent += 1;
                    }
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return Some(start.elapsed()),
                        Ok(_) => {} // SETTINGS, or an error answer before the close
                    },
                    () = tokio::time::sleep_until((start + duration).into()) => return None,
                }
            }
        });
    }
    let mut closed_ms = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(at)) = r {
            closed_ms.push(at.as_millis() as u64);
        }
    }
    closed_ms.sort_unstable();
    let pick = |q: f64| {
        closed_ms
            .get(((closed_ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    println!(
        "{}",
        json!({
            "opened": opened,
            "connect_failed": failed,
            "closed_by_server": closed_ms.len(),
            "still_open": opened - closed_ms.len(),
            "closed_after_ms": {"min": pick(0.0), "p50": pick(0.5), "max": pick(1.0)},
        })
    );
    Ok(())
}

async fn hold(addr: SocketAddr, o: &Opts) -> std::io::Result<()> {
    let started = Instant::now();
    let (streams, failed) = open_all(addr, o.conns, o.rate).await;
    let opened = streams.len();
    let open_ms = started.elapsed().as_millis() as u64;
    tokio::time::sleep_until((started + o.duration).into()).await;
    let mut checks = JoinSet::new();
    for mut s in streams {
        checks.spawn(async move {
            let echoed = async {
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                std::io::Result::Ok(b[0] == b'x')
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(10), echoed).await,
                Ok(Ok(true))
            )
        });
    }
    let mut alive = 0;
    while let Some(r) = checks.join_next().await {
        alive += usize::from(r.unwrap_or(false));
    }
    println!(
        "{}",
        json!({"opened": opened, "connect_failed": failed, "alive": alive, "open_ms": open_ms})
    );
    Ok(())
}
