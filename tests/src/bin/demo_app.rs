//! The demo shop's app: a tiny HTTP/1.1 server that answers JSON naming its service, version and
//! pod, the peer it saw, and the client identity the mesh vouched for (the
//! `x-forwarded-client-cert` header, when a proxy adds one), after calling its own upstreams.
//!
//! - `serve --service S --version V --pod P --listen ADDR [--call URL]... [--fail-percent N]
//!   [--fail-status CODE] [--delay-ms MS]`: a share of answers can be failures, and every answer
//!   can be slow; `GET /count` answers how many requests it served; `Upgrade: echo` switches
//!   protocols and echoes one message (a stand-in for WebSocket).
//! - `get URL [--header 'NAME: VALUE']... [--count N] [--pause-ms MS]`: N GETs on one keep-alive
//!   connection, MS apart; prints the body (a JSON array of them when N > 1); exits non-zero on
//!   any failure.
//! - `raw ADDR DATA`: sends DATA as is (`\r\n` for CR LF), prints what came back until the
//!   server closed (JSON string), for testing how malformed requests are answered.
//!
//! - `tally URL [--header ..]... [--count N]`: N GETs, one at a time, whatever they answer
//!   (reconnecting when the server closes); prints `{"statuses": {"200": n, ..}, "ms": [..]}`.
//!
//! Std only: the demo needs nothing more, and a plain app shows the mesh needs no app changes.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Request headers passed on to the app's own calls.
const FORWARDED: [&str; 8] = [
    "end-user",
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "b3",
];

struct Serve {
    /// Share of requests answered with `fail_status` instead (0-100).
    fail_percent: u32,
    fail_status: u16,
    /// Added before every answer.
    delay: Duration,
    /// Requests served so far (answered at `/count` without counting).
    served: std::sync::atomic::AtomicU64,
    service: String,
    version: String,
    pod: String,
    listen: String,
    calls: Vec<String>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => parse_serve(&args[1..]).and_then(serve),
        Some("get") if args.len() >= 2 => get_args(&args[2..]).and_then(|g| {
            let bodies = get(&args[1], &g.headers, g.count, g.pause)?;
            match g.count {
                1 => println!("{}", bodies[0]),
                _ => println!("[{}]", bodies.join(",")),
            }
            Ok(())
        }),
        Some("raw") if args.len() == 3 => raw(&args[1], &args[2]),
        Some("tally") if args.len() >= 2 => get_args(&args[2..]).and_then(|g| tally(&args[1], &g.headers, g.count)),
        _ => Err("usage: trellis-demo-app serve --service S --version V --pod P --listen ADDR [--call URL]... | get URL [--header 'NAME: VALUE']... [--count N] [--pause-ms MS] | raw ADDR DATA | tally URL [--header 'NAME: VALUE']... [--count N]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-demo-app: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_serve(args: &[String]) -> Result<Serve, String> {
    let mut s = Serve {
        fail_percent: 0,
        fail_status: 503,
        delay: Duration::ZERO,
        served: Default::default(),
        service: String::new(),
        version: "v1".into(),
        pod: String::new(),
        listen: "[::]:8080".into(),
        calls: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?.clone();
        match flag.as_str() {
            "--service" => s.service = value,
            "--version" => s.version = value,
            "--pod" => s.pod = value,
            "--listen" => s.listen = value,
            "--call" => s.calls.push(value),
            "--fail-percent" => {
                s.fail_percent = value
                    .parse()
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or("--fail-percent: 0-100")?
            }
            "--fail-status" => {
                s.fail_status = value
                    .parse()
                    .ok()
                    .filter(|c| (200..600).contains(c))
                    .ok_or("--fail-status: an HTTP status")?
            }
            "--delay-ms" => {
                s.delay = Duration::from_millis(value.parse().map_err(|_| "--delay-ms: a number")?)
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if s.service.is_empty() {
        return Err("--service is required".into());
    }
    Ok(s)
}

fn serve(cfg: Serve) -> Result<(), String> {
    let listener =
        TcpListener::bind(&cfg.listen).map_err(|e| format!("bind {}: {e}", cfg.listen))?;
    println!("ready");
    let cfg = std::sync::Arc::new(cfg);
    for stream in listener.incoming().flatten() {
        let cfg = cfg.clone();
        thread::spawn(move || {
            let _ = handle(&cfg, stream);
        });
    }
    Ok(())
}

/// Serves requests on one connection until the client closes it or asks to.
fn handle(cfg: &Serve, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    loop {
        let Some((request_line, headers)) = read_head(&mut reader)? else {
            return Ok(());
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        // `Upgrade: echo` (a stand-in for WebSocket): switch protocols, echo one message, close.
        if header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("echo")) {
            stream.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
            )?;
            let mut buf = [0u8; 4096];
            let n = reader.read(&mut buf)?;
            stream.write_all(&buf[..n])?;
            return Ok(());
        }
        // Request bodies are not used; read them so the next request starts where it should.
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        std::io::copy(&mut (&mut reader).take(length as u64), &mut std::io::sink())?;
        let identity = header("x-forwarded-client-cert").and_then(|v| {
            v.split(';')
                .find_map(|kv| kv.strip_prefix("URI="))
                .map(str::to_owned)
        });
        // Like Istio's bookinfo: the user and trace headers travel on to the upstream calls.
        let forward: Vec<String> = headers
            .iter()
            .filter(|(n, _)| FORWARDED.iter().any(|f| n.eq_ignore_ascii_case(f)))
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        let calls: Vec<Value> = cfg
            .calls
            .iter()
            .map(|url| match get(url, &forward, 1, Duration::ZERO) {
                Ok(mut bodies) => {
                    let body = bodies.remove(0);
                    serde_json::from_str(&body).unwrap_or(json!({ "url": url, "body": body }))
                }
                Err(e) => json!({ "url": url, "error": e }),
            })
            .collect();
        let body = json!({
            "service": cfg.service,
            "version": cfg.version,
            "pod": cfg.pod,
            "client": SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string(),
            "client_identity": identity,
            "path": request_line.split(' ').nth(1).unwrap_or_default(),
            "headers": headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
            "calls": calls,
            "at_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        })
        .to_string();
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        use std::sync::atomic::Ordering::Relaxed;
        let (status, body) = if request_line.split(' ').nth(1) == Some("/count") {
            (
                200,
                json!({ "served": cfg.served.load(Relaxed) }).to_string(),
            )
        } else {
            let n = cfg.served.fetch_add(1, Relaxed);
            thread::sleep(cfg.delay);
            // Deterministic: exactly fail_percent of every 100 requests fail, spread out.
            let p = u64::from(cfg.fail_percent);
            if (n + 1) * p / 100 > n * p / 100 {
                (
                    cfg.fail_status,
                    json!({ "error": "injected by --fail-percent" }).to_string(),
                )
            } else {
                (200, body)
            }
        };
        // One write per response: with Nagle off, pieces would each be a packet.
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        stream.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

/// A request or response head: the first line and the headers (name, value).
type Head = (String, Vec<(String, String)>);

/// Reads a head; None at a clean end of stream.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if reader.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok(Some((first.trim().to_owned(), headers)))
}

fn raw(addr: &str, data: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("{addr}: not IP:PORT"))?;
    let err = |e: std::io::Error| format!("{addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(err)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(err)?;
    s.write_all(data.replace("\\r\\n", "\r\n").as_bytes())
        .map_err(err)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).map_err(err)?;
    println!("{}", json!(String::from_utf8_lossy(&back)));
    Ok(())
}

/// `http://IP[:PORT]/PATH` (IP literals only: the demo has no DNS) → (address, host, path).
fn parse_url(url: &str) -> Result<(SocketAddr, &str, &str), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or(format!("{url}: only http:// URLs"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = host
        .parse()
        .or_else(|_| format!("{host}:80").parse())
        .map_err(|_| format!("{url}: host must be IP[:PORT]"))?;
    Ok((addr, host, path))
}

fn tally(url: &str, headers: &[String], count: usize) -> Result<(), String> {
    let (addr, host, path) = parse_url(url)?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let mut statuses: std::collections::BTreeMap<String, u64> = Default::default();
    let mut ms = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    for _ in 0..count {
        let start = std::time::Instant::now();
        let answer = (|| -> std::io::Result<String> {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                s.set_nodelay(true)?;
                conn = Some((s.try_clone()?, BufReader::new(s)));
            }
            let (s, reader) = conn.as_mut().expect("just set");
            s.write_all(format!("GET /{path} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n").as_bytes())?;
            let (status, headers) = read_head(reader)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
            let find = |name: &str| {
                headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            };
            let length: u64 = find("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            std::io::copy(&mut reader.take(length), &mut std::io::sink())?;
            if find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                conn = None;
            }
            Ok(status.split(' ').nth(1).unwrap_or("?").to_owned())
        })();
        let key = answer.unwrap_or_else(|e| {
            conn = None;
            format!("error: {e}")
        });
        *statuses.entry(key).or_default() += 1;
        ms.push(start.elapsed().as_millis() as u64);
    }
    println!("{}", json!({ "statuses": statuses, "ms": ms }));
    Ok(())
}

/// What `get` and `tally` are asked for.
struct Gets {
    headers: Vec<String>,
    count: usize,
    /// Between requests (`get` only).
    pause: Duration,
}

/// `--header 'NAME: VALUE'`..., `--count N` (at most 100000) and `--pause-ms MS` (at most 60000).
fn get_args(args: &[String]) -> Result<Gets, String> {
    let mut gets = Gets {
        headers: Vec::new(),
        count: 1,
        pause: Duration::ZERO,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--header", Some(h)) if h.contains(':') => gets.headers.push(h.clone()),
            ("--count", Some(n)) => {
                gets.count = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or(format!("--count {n}: want 1..=100000"))?
            }
            ("--pause-ms", Some(ms)) => {
                gets.pause = ms
                    .parse()
                    .ok()
                    .filter(|ms| *ms <= 60_000)
                    .map(Duration::from_millis)
                    .ok_or(format!("--pause-ms {ms}: want 0..=60000"))?
            }
            _ => {
                return Err(format!(
                    "expected --header 'NAME: VALUE', --count N or --pause-ms MS, got {flag}"
                ));
            }
        }
    }
    Ok(gets)
}

/// `count` GETs of `http://HOST:PORT/PATH` (IP literals only: the demo has no DNS) on one
/// keep-alive connection, `pause` apart; returns the bodies.
fn get(
    url: &str,
    headers: &[String],
    count: usize,
    pause: Duration,
) -> Result<Vec<String>, String> {
    let (addr, host, path) = parse_url(url)?;
    let err = |e: std::io::Error| format!("{url}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(err)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    let mut reader = BufReader::new(s.try_clone().map_err(err)?);
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let mut bodies = Vec::new();
    for i in 0..count {
        if i > 0 {
            thread::sleep(pause);
        }
        let close = if i + 1 == count {
            "connection: close\r\n"
        } else {
            ""
        };
        let request = format!("GET /{path} HTTP/1.1\r\nhost: {host}\r\n{extra}{close}\r\n");
        s.write_all(request.as_bytes()).map_err(err)?;
        let (status, headers) = read_head(&mut reader)
            .map_err(err)?
            .ok_or(format!("{url}: connection closed after {i} responses"))?;
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .ok_or(format!("{url}: {status}: no content-length"))?;
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(err)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("{url}: {status}: {}", body.trim()));
        }
        bodies.push(body);
    }
    Ok(bodies)
}
