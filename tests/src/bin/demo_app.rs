//! The demo shop's app: a tiny HTTP/1.1 server that answers JSON naming its service, version and
//! pod, the peer it saw, and the client identity the mesh vouched for (the
//! `x-forwarded-client-cert` header, when a proxy adds one), after calling its own upstreams.
//!
//! - `serve --service S --version V --pod P --listen ADDR [--call URL]...`
//! - `get URL [--header 'NAME: VALUE']... [--count N]`: N GETs on one keep-alive connection;
//!   prints the body (a JSON array of them when N > 1); exits non-zero on any failure.
//! - `raw ADDR DATA`: sends DATA as is (`\r\n` for CR LF), prints what came back until the
//!   server closed (JSON string), for testing how malformed requests are answered.
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

struct Serve {
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
        Some("get") if args.len() >= 2 => get_args(&args[2..]).and_then(|(h, count)| {
            let bodies = get(&args[1], &h, count)?;
            match count {
                1 => println!("{}", bodies[0]),
                _ => println!("[{}]", bodies.join(",")),
            }
            Ok(())
        }),
        Some("raw") if args.len() == 3 => raw(&args[1], &args[2]),
        _ => Err("usage: trellis-demo-app serve --service S --version V --pod P --listen ADDR [--call URL]... | get URL [--header 'NAME: VALUE']... [--count N] | raw ADDR DATA".into()),
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
        let Some((_, headers)) = read_head(&mut reader)? else {
            return Ok(());
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
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
        let calls: Vec<Value> = cfg
            .calls
            .iter()
            .map(|url| match get(url, &[], 1) {
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
            "calls": calls,
            "at_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        })
        .to_string();
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        // One write per response: with Nagle off, pieces would each be a packet.
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
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

/// `--header 'NAME: VALUE'`... and `--count N` (at most 100000).
fn get_args(args: &[String]) -> Result<(Vec<String>, usize), String> {
    let (mut headers, mut count) = (Vec::new(), 1);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--header", Some(h)) if h.contains(':') => headers.push(h.clone()),
            ("--count", Some(n)) => {
                count = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or(format!("--count {n}: want 1..=100000"))?
            }
            _ => {
                return Err(format!(
                    "expected --header 'NAME: VALUE' or --count N, got {flag}"
                ));
            }
        }
    }
    Ok((headers, count))
}

/// `count` GETs of `http://HOST:PORT/PATH` (IP literals only: the demo has no DNS) on one
/// keep-alive connection; returns the bodies.
fn get(url: &str, headers: &[String], count: usize) -> Result<Vec<String>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or(format!("{url}: only http:// URLs"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: SocketAddr = host
        .parse()
        .or_else(|_| format!("{host}:80").parse())
        .map_err(|_| format!("{url}: host must be IP:PORT"))?;
    let err = |e: std::io::Error| format!("{url}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(err)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    let mut reader = BufReader::new(s.try_clone().map_err(err)?);
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let mut bodies = Vec::new();
    for i in 0..count {
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
