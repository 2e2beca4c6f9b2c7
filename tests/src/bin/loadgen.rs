//! Load generator for the benchmark and the end-to-end tests. The TCP modes use blocking threads
//! and std only; the HTTP modes (loadgen/http.rs) use hyper on tokio.
//!
//! - `echo-serve ADDR`: plain TCP echo (no banner), a thread per connection; prints `ready`.
//! - `latency ADDR [--rate R] [--conns C] [--size B] [--duration-secs S]`: open-loop
//!   request/response at a fixed rate, latency from each request's scheduled send time.
//! - `connect-rate ADDR [--threads T] [--duration-secs S]`: connect, 1 byte there and back, close.
//! - `blast ADDR --bytes N [--seed S] [--skip-banner] [--timeout-secs S]`: sends N bytes of a
//!   seeded pseudo-random stream to an echo server while reading the echo, and checks it byte
//!   for byte. Exits non-zero on any difference, short read or timeout. Also prints the local
//!   address (loopback when the capture layer took the connection).
//!
//! - `churn ADDR [--conns C] [--duration-secs S]`: holds C connections open, each echoing a byte
//!   every 50 ms (a connection that breaks is counted lost, not reopened), while one thread opens
//!   a fresh connection every 20 ms; reports the lost ones and each probe's outcome with its Unix
//!   time in ms, so a test can tell when new connections worked again.
//!
//! - `hold ADDR [--conns C] [--duration-secs S]`: opens C connections (up to 20,000), each
//!   echoing a byte, prints `ready`, holds them idle for S seconds, then echoes a byte on each
//!   again and reports how many still worked (to measure a proxy's memory per open connection).
//!
//! - `http-serve ADDR [--size B]`: answers every request with 200 and B bytes, over HTTP/1.1 or
//!   h2c prior knowledge on the same listener; prints `ready`.
//! - `http-probe ADDR [--h2] [--header NAME:VALUE]...`: one request; its status and headers.
//! - `http-latency ADDR [--h2] [--rate R] [--conns C] [--size B] [--duration-secs S]
//!   [--header NAME:VALUE]...`: open loop at a fixed rate, latency from the scheduled send time.
//! - `http-rate ADDR [--h2] [--concurrency N] [--conns C] [--size B] [--duration-secs S]
//!   [--header NAME:VALUE]...`: closed loop, N requests always in flight; requests per second.
//!
//! - `udp-send ADDR`: one datagram with `sendto` on an unconnected socket, and one with
//!   `connect` then `send`; prints each outcome (`ok`, or the error).
//! - `dns-query ADDR --name NAME [--aaaa]`: one DNS query with `sendto` on an unconnected socket (as
//!   musl's resolver sends them); prints the answer's source address, rcode and addresses.
//! - `dns-junk ADDR [--count N]`: N malformed DNS datagrams (truncated, oversized names, random
//!   bytes, responses), then one good query; prints whether the good one was answered.
//!
//! Each prints one JSON line. Every loop is bounded in time and in count.
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::json;

#[path = "loadgen/dns.rs"]
mod dns;
#[path = "loadgen/http.rs"]
mod http;
#[path = "loadgen/timer.rs"]
mod timer;

const USAGE: &str = "usage: trellis-loadgen echo-serve ADDR
       trellis-loadgen latency ADDR [--rate 1000] [--conns 4] [--size 1024] [--duration-secs 10]
       trellis-loadgen connect-rate ADDR [--threads 4] [--duration-secs 5]
       trellis-loadgen blast ADDR --bytes N [--seed 1] [--skip-banner] [--timeout-secs 120]
       trellis-loadgen churn ADDR [--conns 4] [--duration-secs 10]
       trellis-loadgen hold ADDR [--conns 4] [--duration-secs 10]
       trellis-loadgen udp-send ADDR
       trellis-loadgen dns-query ADDR --name NAME [--aaaa]
       trellis-loadgen dns-junk ADDR [--count 1000]
       trellis-loadgen http-serve ADDR [--size 1024]
       trellis-loadgen http-probe ADDR [--h2] [--header NAME:VALUE]...
       trellis-loadgen http-latency ADDR [--h2] [--rate 1000] [--conns 4] [--size 1024] [--duration-secs 10] [--header NAME:VALUE]...
       trellis-loadgen http-rate ADDR [--h2] [--concurrency 32] [--conns 4] [--size 1024] [--duration-secs 10] [--header NAME:VALUE]...";

/// How long to wait for a connection or for a peer that has gone quiet.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Warm-up before the latency run counts anything.
const WARMUP: Duration = Duration::from_secs(1);
/// Hard caps on loop counts, whatever the duration.
const MAX_REQUESTS_PER_CONN: u64 = 10_000_000;
const MAX_CONNECTS_PER_THREAD: u64 = 1_000_000;
/// At most this many connections held at once (`--conns`).
const MAX_CONNS: u64 = 20_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match Opts::parse(&args[2..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("trellis-loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd.as_str() {
        "echo-serve" => echo_serve(addr),
        "latency" => resolve(addr).and_then(|a| latency(a, &opts)),
        "connect-rate" => resolve(addr).and_then(|a| connect_rate(a, &opts)),
        "blast" => resolve(addr).and_then(|a| blast(a, &opts)),
        "churn" => resolve(addr).and_then(|a| churn(a, &opts)),
        "hold" => resolve(addr).and_then(|a| hold(a, &opts)),
        "udp-send" => resolve(addr).and_then(udp_send),
        "dns-query" => resolve(addr).and_then(|a| dns::query(a, &opts)),
        "dns-junk" => resolve(addr).and_then(|a| dns::junk(a, &opts)),
        "http-serve" => resolve(addr).and_then(|a| http::serve(a, &opts)),
        "http-probe" => resolve(addr).and_then(|a| http::probe(a, &opts)),
        "http-latency" => resolve(addr).and_then(|a| http::latency(a, &opts)),
        "http-rate" => resolve(addr).and_then(|a| http::rate(a, &opts)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("trellis-loadgen {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))
}

struct Opts {
    rate: f64,
    conns: usize,
    size: usize,
    threads: usize,
    duration: Duration,
    bytes: Option<u64>,
    seed: u64,
    skip_banner: bool,
    timeout: Duration,
    /// HTTP modes: h2c prior knowledge instead of HTTP/1.1.
    h2: bool,
    /// HTTP modes: extra request headers.
    headers: Vec<(String, String)>,
    /// http-rate: requests in flight.
    concurrency: usize,
    /// dns-query: the name asked for, and whether for AAAA (else A).
    name: String,
    aaaa: bool,
    /// dns-junk: how many malformed datagrams.
    count: u64,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self {
            rate: 1000.0,
            conns: 4,
            size: 1024,
            threads: 4,
            duration: Duration::from_secs(10),
            bytes: None,
            seed: 1,
            skip_banner: false,
            timeout: Duration::from_secs(120),
            h2: false,
            headers: Vec::new(),
            concurrency: 32,
            name: String::new(),
            aaaa: false,
            count: 1000,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            match flag.as_str() {
                "--skip-banner" => {
                    o.skip_banner = true;
                    continue;
                }
                "--h2" => {
                    o.h2 = true;
                    continue;
                }
                "--aaaa" => {
                    o.aaaa = true;
                    continue;
                }
                _ => {}
            }
            let value = it.next().ok_or(format!("{flag} needs a value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
            let num = |v: &str| v.parse::<u64>().map_err(|e| bad(&e));
            let secs = |v: &str| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s < 86_400.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| bad(&"want seconds in (0, 86400)"))
            };
            match flag.as_str() {
                "--rate" => {
                    o.rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1e6)
                        .ok_or_else(|| bad(&"want a rate in (0, 1e6]"))?
                }
                "--conns" => o.conns = num(value)?.clamp(1, MAX_CONNS) as usize,
                "--size" => o.size = num(value)?.clamp(1, 16 << 20) as usize,
                "--threads" => o.threads = num(value)?.clamp(1, 256) as usize,
                "--duration-secs" => o.duration = secs(value)?,
                "--timeout-secs" => o.timeout = secs(value)?,
                "--bytes" => o.bytes = Some(num(value)?),
                "--seed" => o.seed = num(value)?,
                "--name" => o.name = value.clone(),
                "--count" => o.count = num(value)?.clamp(1, 1_000_000),
                "--concurrency" => o.concurrency = num(value)?.clamp(1, 4096) as usize,
                "--header" => {
                    let (k, v) = value
                        .split_once(':')
                        .ok_or_else(|| bad(&"want NAME:VALUE"))?;
                    o.headers.push((k.trim().to_owned(), v.trim().to_owned()));
                }
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------- echo-serve

fn echo_serve(addr: &str) -> io::Result<bool> {
    // A thread and a descriptor per connection: `hold` opens thousands.
    rlimit::increase_nofile_limit(u64::MAX)?;
    // Binding [::] gives a dual-stack socket (net.ipv6.bindv6only is 0 in new namespaces).
    let listener = TcpListener::bind(addr)?;
    println!("ready");
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            let _ = echo(stream);
        });
    }
    Ok(true)
}

fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            // Pass the half-close on: the client reads to EOF after the last echoed byte.
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

// ---------------------------------------------------------------- latency

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
    }

    /// The latency report over a run of `duration`: counts, percentiles, achieved rate.
    fn report(mut self, duration: Duration) -> serde_json::Value {
        self.latencies_us.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        let pct = |p: f64| ms(percentile(&self.latencies_us, p));
        let requests = self.latencies_us.len() as u64;
        json!({
            "requests": requests,
            "errors": self.errors,
            "p50_ms": pct(50.0),
            "p90_ms": pct(90.0),
            "p99_ms": pct(99.0),
            "p999_ms": pct(99.9),
            "max_ms": ms(self.latencies_us.last().copied().unwrap_or(0)),
            "achieved_rps": requests as f64 / duration.as_secs_f64(),
        })
    }
}

fn latency(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let interval = Duration::from_secs_f64(o.conns as f64 / o.rate);
    // Every connection first, so that connection set-up is not part of the first requests.
    let streams: Vec<TcpStream> = (0..o.conns)
        .map(|_| connect(addr))
        .collect::<Result<_, _>>()?;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + WARMUP;
    let end = measure_from + o.duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let tally = tally.clone();
            // Connections are staggered evenly within one interval.
            let first = start + interval.mul_f64(i as f64 / o.conns as f64);
            let size = o.size;
            thread::spawn(move || {
                let t = run_connection(addr, stream, first, interval, measure_from, end, size);
                tally.lock().unwrap().add(t);
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let all = std::mem::take(&mut *tally.lock().unwrap());
    let ok = !all.latencies_us.is_empty();
    println!("{}", all.report(o.duration));
    Ok(ok)
}

/// Nearest-rank percentile of sorted samples (0 when there are none).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One connection's schedule: request k is due at `first + k * interval`. A request's latency
/// runs from when it was due if the connection was still busy with earlier ones then (so a
/// stalled server is charged for the requests it held up: no coordinated omission), otherwise
/// from when it was actually sent (so timer slack is not charged to the server). Requests due in
/// the measured window that have not completed by `end` are errors.
fn run_connection(
    addr: SocketAddr,
    stream: TcpStream,
    first: Instant,
    interval: Duration,
    measure_from: Instant,
    end: Instant,
    size: usize,
) -> Tally {
    let mut tally = Tally::default();
    let mut stream = Some(stream);
    let request: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut reply = vec![0u8; size];
    let mut free_at = Instant::now();
    for k in 0..MAX_REQUESTS_PER_CONN {
        let due = first + interval.mul_f64(k as f64);
        if due >= end {
            break;
        }
        let counted = due >= measure_from;
        let now = Instant::now();
        if now >= end {
            // Out of time with requests still due: they never completed.
            if counted {
                tally.errors += 1;
            }
            continue;
        }
        if due > now {
            thread::sleep(due - now);
        }
        let sent = Instant::now();
        let from = if free_at > due { due } else { sent };
        let ok = (|| -> io::Result<bool> {
            if stream.is_none() {
                stream = Some(connect(addr)?);
            }
            let s = stream.as_mut().expect("just set");
            s.write_all(&request)?;
            s.read_exact(&mut reply)?;
            Ok(reply == request)
        })();
        let done = Instant::now();
        free_at = done;
        match ok {
            Ok(true) if counted && done <= end => {
                tally.latencies_us.push((done - from).as_micros() as u64);
            }
            Ok(true) => {}
            Ok(false) | Err(_) => {
                // A broken or desynchronized connection is replaced for the next request.
                stream = None;
                if counted {
                    tally.errors += 1;
                }
            }
        }
    }
    tally
}

// ---------------------------------------------------------------- connect-rate

fn connect_rate(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let start = Instant::now();
    let end = start + o.duration;
    let threads: Vec<_> = (0..o.threads)
        .map(|_| {
            thread::spawn(move || {
                let (mut ok, mut errors) = (0u64, 0u64);
                for _ in 0..MAX_CONNECTS_PER_THREAD {
                    if Instant::now() >= end {
                        break;
                    }
                    let one = (|| -> io::Result<()> {
                        let mut s = connect(addr)?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        if &b != b"x" {
                            return Err(io::Error::other("wrong echo"));
                        }
                        Ok(())
                    })();
                    match one {
                        Ok(()) => ok += 1,
                        Err(_) => {
                            errors += 1;
                            // Do not spin on a refusing server.
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    let (mut connections, mut errors) = (0, 0);
    for t in threads {
        if let Ok((c, e)) = t.join() {
            connections += c;
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({ "connections": connections, "errors": errors, "per_sec": connections as f64 / secs })
    );
    Ok(connections > 0)
}

// ---------------------------------------------------------------- blast

/// splitmix64: a fast deterministic byte stream from a seed.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

const CHUNK: usize = 64 * 1024;

fn blast(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let total = o
        .bytes
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "blast needs --bytes N"))?;
    let deadline = Instant::now() + o.timeout;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    // Reported: a connection the capture layer took is bound to loopback.
    let local = stream.local_addr()?;
    // Idle limits: a stalled peer ends the run (the overall deadline is checked per chunk).
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::with_capacity(CHUNK, stream.try_clone()?);
    if o.skip_banner {
        let mut banner = String::new();
        reader.read_line(&mut banner)?;
    }
    let start = Instant::now();
    let seed = o.seed;
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> io::Result<()> {
        let mut pattern = Pattern(seed);
        let mut buf = vec![0u8; CHUNK];
        let mut left = total;
        while left > 0 {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline"));
            }
            let n = left.min(CHUNK as u64) as usize;
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write)
    });
    let received = check_echo(&mut reader, total, seed, deadline);
    let secs = start.elapsed().as_secs_f64();
    // A failed reader must not leave the sender blocked: closing both ways unblocks it.
    if received.is_err() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("sender panicked")));
    let (bytes, error) = match (received, sent) {
        (Ok(n), Ok(())) => (n, None),
        (Ok(n), Err(e)) => (n, Some(format!("sending: {e}"))),
        (Err((n, e)), _) => (n, Some(e)),
    };
    let mut out = json!({
        "bytes": bytes,
        "ok": error.is_none(),
        "secs": secs,
        "mbit_per_sec": bytes as f64 * 8.0 / secs.max(1e-9) / 1e6,
        "local": local.to_string(),
    });
    if let Some(e) = &error {
        out["error"] = json!(e);
    }
    println!("{out}");
    Ok(error.is_none())
}

/// Reads the echo and compares it with the pattern; Ok(bytes) only if exactly `total` bytes
/// came back, all equal, followed by EOF. Err((bytes matched so far, what went wrong)).
fn check_echo(
    reader: &mut impl Read,
    total: u64,
    seed: u64,
    deadline: Instant,
) -> Result<u64, (u64, String)> {
    let mut pattern = Pattern(seed);
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < total {
        if Instant::now() > deadline {
            return Err((done, format!("timed out after {done} of {total} bytes")));
        }
        let n = (total - done).min(CHUNK as u64) as usize;
        pattern.fill(&mut want[..n]);
        let mut have = 0;
        while have < n {
            match reader.read(&mut got[have..n]) {
                Ok(0) => {
                    let at = done + have as u64;
                    return Err((at, format!("EOF after {at} of {total} bytes")));
                }
                Ok(k) => have += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let at = done + have as u64;
                    return Err((at, format!("reading at byte {at}: {e}")));
                }
            }
        }
        if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
            let at = done + i as u64;
            return Err((
                at,
                format!(
                    "byte {at} differs: sent {:#04x}, got {:#04x}",
                    want[i], got[i]
                ),
            ));
        }
        done += n as u64;
    }
    let mut extra = [0u8; 1];
    match reader.read(&mut extra) {
        Ok(0) => Ok(done),
        Ok(_) => Err((done, format!("more than the {total} bytes sent came back"))),
        Err(e) => Err((done, format!("waiting for EOF after {total} bytes: {e}"))),
    }
}

// ---------------------------------------------------------------- udp-send

fn udp_send(addr: SocketAddr) -> io::Result<bool> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let outcome = |r: io::Result<usize>| match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    let unconnected = std::net::UdpSocket::bind(bind)?;
    let send_to = outcome(unconnected.send_to(b"x", addr));
    let connected = std::net::UdpSocket::bind(bind)?;
    let connect = outcome(connected.connect(addr).and_then(|()| connected.send(b"x")));
    println!("{}", json!({"send_to": send_to, "connect": connect}));
    Ok(true)
}

// ---------------------------------------------------------------- churn

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ping(s: &mut TcpStream) -> io::Result<()> {
    let mut b = [0u8; 1];
    s.write_all(b"p")?;
    s.read_exact(&mut b)
}

fn churn(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let end = Instant::now() + o.duration;
    let held: Vec<TcpStream> = (0..o.conns)
        .map(|_| connect(addr))
        .collect::<Result<_, _>>()?;
    let holders: Vec<_> = held
        .into_iter()
        .map(|mut s| {
            thread::spawn(move || {
                while Instant::now() < end {
                    if ping(&mut s).is_err() {
                        return Some(unix_ms());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                None
            })
        })
        .collect();
    let mut probes = Vec::new();
    while Instant::now() < end && probes.len() < 100_000 {
        let at = unix_ms();
        let ok = connect(addr).and_then(|mut s| ping(&mut s)).is_ok();
        probes.push(json!([at, ok]));
        thread::sleep(Duration::from_millis(20));
    }
    let lost: Vec<u64> = holders
        .into_iter()
        .filter_map(|h| h.join().ok().flatten())
        .collect();
    println!(
        "{}",
        json!({"held": o.conns, "lost": lost.len(), "lost_at_ms": lost, "probes": probes})
    );
    Ok(true)
}

// ---------------------------------------------------------------- hold

fn hold(addr: SocketAddr, o: &Opts) -> io::Result<bool> {
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    if limit < o.conns as u64 + 64 {
        return Err(io::Error::other(format!(
            "{} connections need more descriptors than the limit ({limit})",
            o.conns
        )));
    }
    // A few threads open them: each connection costs a round trip through the proxies.
    let threads = 8.min(o.conns);
    let opened: Vec<io::Result<Vec<TcpStream>>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..o.conns)
                        .step_by(threads)
                        .map(|_| {
                            let mut s = connect(addr)?;
                            ping(&mut s)?;
                            Ok(s)
                        })
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("panicked")))
            })
            .collect()
    });
    let mut held = Vec::with_capacity(o.conns);
    for streams in opened {
        held.extend(streams?);
    }
    println!("ready");
    io::stdout().flush()?;
    thread::sleep(o.duration);
    let alive = held.iter_mut().map(ping).filter(Result::is_ok).count();
    println!("{}", json!({"held": held.len(), "alive": alive}));
    Ok(alive == held.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn the_pattern_is_deterministic_and_independent_of_chunking() {
        let mut a = vec![0u8; 1000];
        Pattern(9).fill(&mut a);
        let mut b = vec![0u8; 1000];
        let mut p = Pattern(9);
        // Chunks that are multiples of 8 continue the same stream.
        p.fill(&mut b[..512]);
        p.fill(&mut b[512..]);
        assert_eq!(a, b);
        let mut c = vec![0u8; 1000];
        Pattern(10).fill(&mut c);
        assert_ne!(a, c);
    }

    #[test]
    fn check_echo_catches_differences_and_short_reads() {
        let far = Instant::now() + Duration::from_secs(10);
        let mut data = vec![0u8; 200_000];
        Pattern(3).fill(&mut data);
        assert_eq!(check_echo(&mut &data[..], 200_000, 3, far), Ok(200_000));
        assert!(check_echo(&mut &data[..199_999], 200_000, 3, far).is_err());
        assert!(
            check_echo(&mut &data[..], 199_992, 3, far).is_err(),
            "extra bytes"
        );
        data[150_001] ^= 1;
        assert_eq!(
            check_echo(&mut &data[..], 200_000, 3, far).unwrap_err().0,
            150_001
        );
    }
}
