//! The demo shop's app: a tiny HTTP/1.1 server that answers JSON naming its service, version and
//! pod, the peer it saw, and the client identity the mesh vouched for (the
//! `x-forwarded-client-cert` header, when a proxy adds one), after calling its own upstreams.
//!
//! - `serve --service S --version V --pod P --listen ADDR [--call URL]...`
//! - `get URL [--header 'NAME: VALUE']...`: one GET, prints the body (exit non-zero on failure).
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
        Some("get") if args.len() >= 2 => headers(&args[2..])
            .and_then(|h| get(&args[1], &h))
            .map(|body| println!("{body}")),
        _ => Err("usage: trellis-demo-app serve --service S --version V --pod P --listen ADDR [--call URL]... | get URL [--header 'NAME: VALUE']...".into()),
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

fn handle(cfg: &Serve, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut xfcc = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("x-forwarded-client-cert")
        {
            xfcc = Some(value.trim().to_owned());
        }
    }
    let identity = xfcc.as_deref().and_then(|v| {
        v.split(';')
            .find_map(|kv| kv.strip_prefix("URI="))
            .map(str::to_owned)
    });
    let calls: Vec<Value> = cfg
        .calls
        .iter()
        .map(|url| match get(url, &[]) {
            Ok(body) => serde_json::from_str(&body).unwrap_or(json!({ "url": url, "body": body })),
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
    })
    .to_string();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn headers(args: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--header", Some(h)) if h.contains(':') => out.push(h.clone()),
            _ => return Err(format!("expected --header 'NAME: VALUE', got {flag}")),
        }
    }
    Ok(out)
}

/// GET `http://HOST:PORT/PATH` (IP literals only: the demo has no DNS), returning the body.
fn get(url: &str, headers: &[String]) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or(format!("{url}: only http:// URLs"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: SocketAddr = host
        .parse()
        .or_else(|_| format!("{host}:80").parse())
        .map_err(|_| format!("{url}: host must be IP:PORT"))?;
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n"
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("{url}: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or(format!("{url}: no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{url}: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.to_owned())
}
