//! The L7 section of `cargo xtask bench`: HTTP/1.1 and HTTP/2 (h2c prior knowledge) from the
//! client pod to an HTTP server in the server pod, directly, through one haproxy, through the
//! haproxy mTLS pair, and through Trellis with a VirtualService route on the port. Each: latency
//! at a fixed rate, then the maximum request rate with the proxies' CPU. See docs/benchmarks.md.
pub mod authz;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::{
    Pod,
    serde_json::{Value, json},
};

use super::{
    NAMESPACE, Server, cpu_secs, f, haproxy, loadgen, pair::Pair, profile, run_in, start_app,
};

/// The server pod's HTTP port, and the Service in front of it: port 80 named `http`, so the mesh
/// proxies it per request.
pub const HTTP_PORT: u16 = 8080;
const SERVICE: &str = "bench-http";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 71);
/// The same for the server pod on the client's node (the same-node section).
const NEAR_SERVICE: &str = "bench-http-near";
const NEAR_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 72);
const SERVICE_PORT: u16 = 80;
/// The route both proxies apply: requests with MATCH go on with SET added; others get 404.
pub const MATCH: (&str, &str) = ("x-bench", "l7");
pub const SET: (&str, &str) = ("x-bench-route", "l7");
/// The latency run: 1 KB answers at 1000 requests/s; the max-rate run: 32 requests in flight.
const RATE: u32 = 1000;
const SIZE: u32 = 1024;
const CONCURRENCY: u32 = 32;
/// Targets from the issue, shown beside the figures.
const TARGET_ADDED_P99_MS: f64 = 0.5;

#[derive(Clone, Copy)]
enum Proto {
    H1,
    H2,
}

const PROTOS: [Proto; 2] = [Proto::H1, Proto::H2];

impl Proto {
    fn key(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2 => "h2",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2 (h2c)",
        }
    }

    /// Latency run: HTTP/1.1 needs a few connections to carry 1000 req/s one request at a time;
    /// HTTP/2 carries them as streams on one.
    fn latency_conns(self) -> u32 {
        match self {
            Proto::H1 => 4,
            Proto::H2 => 1,
        }
    }

    /// Max-rate run: a connection per request in flight for HTTP/1.1; for HTTP/2 a few
    /// connections carrying many streams.
    fn rate_conns(self) -> u32 {
        match self {
            Proto::H1 => CONCURRENCY,
            Proto::H2 => 2,
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Proto::H1 => &[],
            Proto::H2 => &["--h2"],
        }
    }
}

/// One way from the client to the server: where to send each protocol, whether a route is
/// applied on the way, and the proxy processes (name, pid) whose CPU to count.
pub struct Path {
    name: &'static str,
    h1: SocketAddr,
    h2: SocketAddr,
    routed: bool,
    proxies: Vec<(String, u32)>,
}

impl Path {
    pub fn direct(server: &Pod) -> Self {
        let to = SocketAddr::new(IpAddr::V4(server.ip4), HTTP_PORT);
        Self {
            name: "direct",
            h1: to,
            h2: to,
            routed: false,
            proxies: Vec::new(),
        }
    }

    pub fn haproxy(pod: &Pod, proxy: &haproxy::HaProxy) -> Self {
        let at = |port| SocketAddr::new(IpAddr::V4(pod.ip4), port);
        Self {
            name: "haproxy",
            h1: at(haproxy::H1_PORT),
            h2: at(haproxy::H2_PORT),
            routed: true,
            proxies: vec![("haproxy".into(), proxy.pid)],
        }
    }

    /// To the client side of the haproxy mTLS pair.
    pub fn pair(pair: &Pair) -> Self {
        let at = |port| SocketAddr::new(pair.at, port);
        Self {
            name: "haproxy mTLS pair",
            h1: at(haproxy::H1_PORT),
            h2: at(haproxy::H2_PORT),
            routed: true,
            proxies: pair.procs(),
        }
    }

    /// Through the service VIP, which the capture layer hands to the client node's agent.
    pub fn trellis(agents: Vec<(String, u32)>) -> Self {
        let vip = SocketAddr::new(IpAddr::V4(VIP), SERVICE_PORT);
        Self {
            name: "trellis",
            h1: vip,
            h2: vip,
            routed: true,
            proxies: agents,
        }
    }

    /// The same-node section's: directly to the near server pod, or through its service VIP
    /// with node 1's agent alone on the way.
    pub fn near(server: &Pod, agent: Option<(String, u32)>) -> Self {
        match agent {
            None => Self {
                name: "direct-same-node",
                ..Self::direct(server)
            },
            Some(agent) => {
                let vip = SocketAddr::new(IpAddr::V4(NEAR_VIP), SERVICE_PORT);
                Self {
                    name: "trellis-same-node",
                    h1: vip,
                    h2: vip,
                    routed: true,
                    proxies: vec![agent],
                }
            }
        }
    }

    fn target(&self, proto: Proto) -> SocketAddr {
        match proto {
            Proto::H1 => self.h1,
            Proto::H2 => self.h2,
        }
    }
}

pub fn upstream(server: &Pod) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(server.ip4), HTTP_PORT)
}

/// The HTTP server, as the server pod's app (HTTP/1.1 and h2c on one port).
pub fn start_server(server: &Pod) -> Result<Server> {
    start_app(
        server,
        &[
            "http-serve",
            &format!("[::]:{HTTP_PORT}"),
            "--size",
            &SIZE.to_string(),
        ],
    )
}

/// Control's files for the HTTP service: the Service, and a VirtualService whose route makes
/// the proxy work per request (match a header, set one) as haproxy's configuration does.
pub fn control_files() -> Vec<(&'static str, String)> {
    vec![
        ("http-service.yaml", service(SERVICE, VIP, "bench-server")),
        ("http-route.yaml", route(SERVICE)),
    ]
}

/// The same-node section's Service and route, to the server pod on the client's node (app
/// `app`): one file, written when that pod joins the mesh.
pub fn near_control_file(app: &str) -> (&'static str, String) {
    (
        "http-near.yaml",
        format!(
            "{}---\n{}",
            service(NEAR_SERVICE, NEAR_VIP, app),
            route(NEAR_SERVICE)
        ),
    )
}

fn service(name: &str, vip: Ipv4Addr, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: {app}}}, ports: [\
         {{name: http, port: {SERVICE_PORT}, targetPort: {HTTP_PORT}}}]}}\n"
    )
}

fn route(service: &str) -> String {
    let ((m, mv), (s, sv)) = (MATCH, SET);
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: {service}, namespace: {NAMESPACE}}}\n\
         spec: {{hosts: [{service}], http: [{{match: [{{headers: {{{m}: {{exact: {mv}}}}}}}], \
         headers: {{request: {{set: {{{s}: {sv}}}}}}}, route: [{{destination: {{host: {service}}}}}]}}]}}\n"
    )
}

/// Both protocols over `path`: each checked to answer as routed, then latency at RATE, then the
/// maximum rate with the proxies' CPU. A step that fails fails the run, named.
/// The latency step runs `repeat` times in a row; `latency` is the first, `latency_runs` all.
pub fn phase(client: &Pod, path: &Path, duration: Duration, repeat: u32) -> Result<Value> {
    let mut out = json!({});
    for proto in PROTOS {
        let target = path.target(proto);
        let step = |s: &str| format!("L7 phase {}, {}: {s} ({target})", path.name, proto.label());
        eprintln!("bench: {}", step("route check"));
        wait_routed(client, proto, target, path.routed).with_context(|| step("route check"))?;

        let mut runs = Vec::new();
        for i in 1..=repeat {
            eprintln!(
                "bench: {}",
                step(&format!("latency at {RATE}/s, run {i} of {repeat}"))
            );
            let latency = loadgen_run(client, proto, target, duration, &latency_args(proto))
                .with_context(|| step("latency"))?;
            few_errors(&latency).with_context(|| step("latency"))?;
            runs.push(latency);
        }

        eprintln!(
            "bench: {}",
            step(&format!("max rate, {CONCURRENCY} in flight"))
        );
        let pids: Vec<u32> = path.proxies.iter().map(|p| p.1).collect();
        let (cpu0, t0) = (cpu_secs(&pids)?, Instant::now());
        let name = format!("{}-{}-max-rate", path.name, proto.key());
        let rate = profile::around(&name, &pids, duration, || {
            loadgen_run(client, proto, target, duration, &rate_args(proto))
        })
        .with_context(|| step("max rate"))?;
        let (cpu1, wall) = (cpu_secs(&pids)?, t0.elapsed().as_secs_f64());
        few_errors(&rate).with_context(|| step("max rate"))?;

        let mut row = json!({
            "target": target.to_string(),
            "latency": runs[0],
            "latency_runs": runs,
            "max_rate": rate,
        });
        if !pids.is_empty() {
            let used: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).collect();
            let total: f64 = used.iter().sum();
            let per_process: Vec<Value> = path
                .proxies
                .iter()
                .zip(&used)
                .map(|((name, pid), cpu)| {
                    json!({ "name": name, "pid": pid, "cpu_secs": cpu, "cores": cpu / wall })
                })
                .collect();
            row["proxy"] = json!({
                "per_process": per_process,
                "cpu_secs": total,
                "wall_secs": wall,
                "cores": total / wall,
                // Requests per CPU-second of all the path's proxies together.
                "rps_per_core": f(&rate["requests"]).filter(|_| total > 0.0).map(|r| r / total),
            });
        }
        // Also on stderr: figures of the steps that passed survive a later step's failure.
        eprintln!("bench: {}: {row}", step("figures"));
        out[proto.key()] = row;
    }
    Ok(out)
}

fn latency_args(proto: Proto) -> Vec<String> {
    vec![
        "http-latency".into(),
        "--rate".into(),
        RATE.to_string(),
        "--conns".into(),
        proto.latency_conns().to_string(),
    ]
}

fn rate_args(proto: Proto) -> Vec<String> {
    vec![
        "http-rate".into(),
        "--concurrency".into(),
        CONCURRENCY.to_string(),
        "--conns".into(),
        proto.rate_conns().to_string(),
    ]
}

/// `trellis-loadgen MODE TARGET ...` in the client pod, with the route's header, for `duration`.
fn loadgen_run(
    client: &Pod,
    proto: Proto,
    target: SocketAddr,
    duration: Duration,
    mode: &[String],
) -> Result<Value> {
    let header = format!("{}:{}", MATCH.0, MATCH.1);
    let (target, secs, size) = (
        target.to_string(),
        duration.as_secs().to_string(),
        SIZE.to_string(),
    );
    let mut args = vec![mode[0].as_str(), target.as_str()];
    args.extend(mode[1..].iter().map(String::as_str));
    args.extend([
        "--duration-secs",
        secs.as_str(),
        "--size",
        size.as_str(),
        "--header",
        header.as_str(),
    ]);
    args.extend(proto.flags());
    run_in(
        client,
        &loadgen(),
        &args,
        duration + Duration::from_secs(30),
    )
}

/// A run in which more than 1% of the requests failed does not measure the path.
fn few_errors(v: &Value) -> Result<()> {
    let (ok, errors) = (v["requests"].as_u64(), v["errors"].as_u64());
    match (ok, errors) {
        (Some(ok), Some(errors)) if errors * 100 <= ok + errors => Ok(()),
        _ => bail!("too many requests failed: {v}"),
    }
}

/// Polls (20 s at most) until `target` answers as the path's route says: a request with the
/// MATCH header gets 200 (with SET echoed back by the server when routed) and, when routed, one
/// without it gets 404. So the route is in force before anything is measured.
fn wait_routed(client: &Pod, proto: Proto, target: SocketAddr, routed: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match check_routed(client, proto, target, routed) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("not answering as routed within 20 s"));
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn check_routed(client: &Pod, proto: Proto, target: SocketAddr, routed: bool) -> Result<()> {
    let probe = |with_header: bool| {
        let header = format!("{}:{}", MATCH.0, MATCH.1);
        let target = target.to_string();
        let mut args = vec!["http-probe", target.as_str()];
        if with_header {
            args.extend(["--header", header.as_str()]);
        }
        args.extend(proto.flags());
        run_in(client, &loadgen(), &args, Duration::from_secs(10))
    };
    let with = probe(true)?;
    if with["status"] != 200 {
        bail!(
            "a request with {}: {} was answered {with}",
            MATCH.0,
            MATCH.1
        );
    }
    if routed {
        if with["headers"][SET.0] != SET.1 {
            bail!("the route did not set {}: {} (answer {with})", SET.0, SET.1);
        }
        let without = probe(false)?;
        if without["status"] != 404 {
            bail!(
                "a request without {} was answered {without}, not 404",
                MATCH.0
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- report

/// The section's JSON: its load, each phase, and the summary against the targets.
pub fn report(direct: Value, haproxy: Value, pair: Value, trellis: Value) -> Value {
    let summary = summary(&direct, &pair, &trellis);
    json!({
        "load": {
            "rate": RATE,
            "size": SIZE,
            "latency_conns": { "h1": Proto::H1.latency_conns(), "h2": Proto::H2.latency_conns() },
            "concurrency": CONCURRENCY,
            "rate_conns": { "h1": Proto::H1.rate_conns(), "h2": Proto::H2.rate_conns() },
            "route": { "match": { MATCH.0: MATCH.1 }, "set": { SET.0: SET.1 } },
        },
        "direct": direct,
        "haproxy": haproxy,
        "pair": pair,
        "trellis": trellis,
        "summary": summary,
    })
}

fn summary(direct: &Value, pair: &Value, trellis: &Value) -> Value {
    let mut out = json!({
        "targets": {
            "added_p99_ms_max": TARGET_ADDED_P99_MS,
            "rps_per_core_min": "the haproxy mTLS pair's",
        }
    });
    for proto in PROTOS {
        let k = proto.key();
        let p99 = |p: &Value| f(&p[k]["latency"]["p99_ms"]);
        let per_core = |p: &Value| f(&p[k]["proxy"]["rps_per_core"]);
        let added = |p: &Value| p99(p).zip(p99(direct)).map(|(a, d)| a - d);
        let (t, h) = (per_core(trellis), per_core(pair));
        // Run i of a phase against run i of direct: the target holds only if every run meets it.
        let added_runs = |p: &Value| -> Vec<Option<f64>> {
            let p99s = |p: &Value| -> Vec<Option<f64>> {
                p[k]["latency_runs"]
                    .as_array()
                    .map(|a| a.iter().map(|r| f(&r["p99_ms"])).collect())
                    .unwrap_or_default()
            };
            p99s(p)
                .into_iter()
                .zip(p99s(direct))
                .map(|(a, d)| a.zip(d).map(|(a, d)| a - d))
                .collect()
        };
        let trellis_runs = added_runs(trellis);
        let all_met = trellis_runs
            .iter()
            .map(|a| a.map(|a| a <= TARGET_ADDED_P99_MS))
            .collect::<Option<Vec<bool>>>()
            .filter(|v| !v.is_empty())
            .map(|v| v.iter().all(|m| *m));
        out[k] = json!({
            "added_p99_ms": added(trellis),
            "added_p99_ms_runs": trellis_runs,
            "pair_added_p99_ms": added(pair),
            "pair_added_p99_ms_runs": added_runs(pair),
            "rps_per_core": { "trellis": t, "pair": h },
            "met": {
                "added_p99": all_met,
                "rps_per_core": t.zip(h).map(|(t, h)| t >= h),
            },
        });
    }
    out
}

/// The section's table rows: metric, direct, haproxy, the pair, trellis, trellis against
/// direct, target.
pub fn rows(l7: &Value) -> Vec<Vec<String>> {
    let phases = [&l7["direct"], &l7["haproxy"], &l7["pair"], &l7["trellis"]];
    let num = |v: &Value, digits: usize| f(v).map_or("-".into(), |x| format!("{x:.digits$}"));
    let verdict = |met: &Value, target: &str| match met.as_bool() {
        Some(true) => format!("{target} (met)"),
        Some(false) => format!("{target} (MISSED)"),
        None => target.to_owned(),
    };
    let mut rows = vec![
        [
            "metric",
            "direct",
            "haproxy",
            "haproxy mTLS pair",
            "trellis",
            "trellis vs direct",
            "target",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for proto in PROTOS {
        let (k, label) = (proto.key(), proto.label());
        let met = &l7["summary"][k]["met"];
        let conns = proto.latency_conns();
        for (key, name) in [
            ("p50_ms", "p50"),
            ("p90_ms", "p90"),
            ("p99_ms", "p99"),
            ("p999_ms", "p99.9"),
            ("max_ms", "max"),
        ] {
            let v = phases.map(|p| &p[k]["latency"][key]);
            let delta = f(v[3])
                .zip(f(v[0]))
                .map_or("-".into(), |(t, d)| format!("{:+.3} ms", t - d));
            let target = if key == "p99_ms" {
                verdict(
                    &met["added_p99"],
                    &format!("≤ +{TARGET_ADDED_P99_MS:.2} ms"),
                )
            } else {
                String::new()
            };
            let mut row = vec![format!(
                "{label} latency {name}, 1 KB at {RATE}/s, {conns} conn{} (ms)",
                if conns == 1 { "" } else { "s" }
            )];
            row.extend(v.map(|x| num(x, 3)));
            row.extend([delta, target]);
            rows.push(row);
        }
        let runs = |p: &Value| -> Vec<String> {
            p[k]["latency_runs"]
                .as_array()
                .map(|a| a.iter().map(|r| num(&r["p99_ms"], 3)).collect())
                .unwrap_or_default()
        };
        let n = runs(phases[0]).len();
        if n > 1 {
            let added: Vec<String> = l7["summary"][k]["added_p99_ms_runs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| f(x).map_or("-".into(), |v| format!("{v:+.3}")))
                        .collect()
                })
                .unwrap_or_default();
            let mut row = vec![format!("  p99 of each of {n} consecutive runs (ms)")];
            row.extend(phases.map(|p| runs(p).join(" ")));
            row.push(format!("{} ms", added.join(" ")));
            row.push(verdict(
                &met["added_p99"],
                &format!("each ≤ +{TARGET_ADDED_P99_MS:.2} ms"),
            ));
            rows.push(row);
        }
        let mut row = vec!["  requests completed / errors".to_owned()];
        row.extend(phases.map(|p| {
            let l = &p[k]["latency"];
            format!("{} / {}", num(&l["requests"], 0), num(&l["errors"], 0))
        }));
        row.extend([String::new(), String::new()]);
        rows.push(row);

        let rps = phases.map(|p| &p[k]["max_rate"]["rps"]);
        let mut row = vec![format!(
            "{label} max req/s, {CONCURRENCY} in flight, {} conns",
            proto.rate_conns()
        )];
        row.extend(rps.map(|x| num(x, 0)));
        row.push(match (f(rps[0]), f(rps[3])) {
            (Some(d), Some(t)) if d > 0.0 => format!("{:.0}%", t / d * 100.0),
            _ => "-".into(),
        });
        row.push(String::new());
        rows.push(row);

        let mut row = vec!["  errors".to_owned()];
        row.extend(phases.map(|p| num(&p[k]["max_rate"]["errors"], 0)));
        row.extend([String::new(), String::new()]);
        rows.push(row);

        // Cores of proxy CPU during the max-rate run; for Trellis the sum and each agent's.
        let mut row = vec!["  proxy CPU during it (cores)".to_owned()];
        row.extend(phases.map(|p| {
            let proxy = &p[k]["proxy"];
            let each: Vec<String> = proxy["per_process"]
                .as_array()
                .map(|a| a.iter().map(|e| num(&e["cores"], 2)).collect())
                .unwrap_or_default();
            match each.len() {
                0 => "-".into(),
                1 => num(&proxy["cores"], 2),
                _ => format!("{} ({})", num(&proxy["cores"], 2), each.join(" + ")),
            }
        }));
        row.extend([String::new(), String::new()]);
        rows.push(row);

        let per_core = phases.map(|p| &p[k]["proxy"]["rps_per_core"]);
        let mut row = vec!["  req/s per proxy core".to_owned()];
        row.extend(per_core.map(|x| num(x, 0)));
        row.push(match (f(per_core[2]), f(per_core[3])) {
            (Some(h), Some(t)) if h > 0.0 => format!("{:.0}% of the pair", t / h * 100.0),
            _ => "-".into(),
        });
        row.push(verdict(&met["rps_per_core"], "≥ 1.0× the pair"));
        rows.push(row);
    }
    rows
}
