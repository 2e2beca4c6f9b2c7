//! A tiny app for test pods. `serve ADDR...` accepts connections, sends one JSON banner line
//! naming itself and what it saw, then echoes. `connect ADDR` talks to one and prints JSON.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 3 => serve(&args[1], &args[2..]),
        Some("connect") if args.len() >= 2 => {
            connect(&args[1], args.get(2).map_or("", String::as_str))
        }
        _ => {
            eprintln!(
                "usage: trellis-testpod serve NAME ADDR... | trellis-testpod connect ADDR [DATA]"
            );
            ExitCode::from(2)
        }
    }
}

fn serve(name: &str, addrs: &[String]) -> ExitCode {
    let mut threads = Vec::new();
    for addr in addrs {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.to_owned();
        threads.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || {
                    let _ = echo(&name, stream);
                });
            }
        }));
    }
    println!("ready");
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn echo(name: &str, mut stream: TcpStream) -> std::io::Result<()> {
    let banner = serde_json::json!({
        "server": name,
        "local": canonical(stream.local_addr()?),
        "peer": canonical(stream.peer_addr()?),
    });
    writeln!(stream, "{banner}")?;
    let mut buf = [0u8; 65536];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// The listener is dual-stack: show IPv4 clients as IPv4.
fn canonical(a: SocketAddr) -> String {
    SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
}

fn connect(addr: &str, data: &str) -> ExitCode {
    let result = (|| -> std::io::Result<serde_json::Value> {
        let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let local = stream.local_addr()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut banner = String::new();
        reader.read_line(&mut banner)?;
        stream.write_all(data.as_bytes())?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut echo = String::new();
        reader.read_to_string(&mut echo)?;
        let banner: serde_json::Value = serde_json::from_str(banner.trim())
            .map_err(|e| std::io::Error::other(format!("bad banner {banner:?}: {e}")))?;
        Ok(serde_json::json!({ "local": local.to_string(), "banner": banner, "echo": echo }))
    })();
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", serde_json::json!({ "error": e.to_string() }));
            ExitCode::FAILURE
        }
    }
}
