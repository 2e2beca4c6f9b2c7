//! The traffic graph page, in a real browser: `trellisctl graph` serves it in the fabric from
//! the demo's Prometheus, headless Chromium loads it there, and the drawn edges must show the
//! shop's calls with their rates over mutual TLS. A screenshot lands in target/demo/graph.png.
use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use trellis_e2e::{Cluster, node::binary, prometheus::Prometheus, sys};

use crate::cmd;

pub const PORT: u16 = 15080;

/// `trellisctl graph`, running until dropped.
pub struct GraphPage {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for GraphPage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the page in the fabric, reading the demo's Prometheus.
pub fn start(cluster: &Cluster, prometheus: &Prometheus) -> Result<GraphPage> {
    let addr: SocketAddr = format!("{}:{PORT}", Cluster::SERVICES_IP).parse()?;
    // Beside the screenshot, and overwritten by the next demo rather than left in /tmp.
    let log = fs::File::create(out_dir()?.join("graph.log"))?;
    let mut cmd = Command::new(binary("trellisctl"));
    cmd.args([
        "graph",
        "--prometheus",
        &prometheus.url(),
        "--listen",
        &addr.to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(log);
    let child =
        sys::spawn_in(cluster.fabric(), None, &mut cmd).context("starting trellisctl graph")?;
    let page = GraphPage { child, addr };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sys::connect_in(cluster.fabric(), addr).is_err() {
        if Instant::now() > deadline {
            bail!("trellisctl graph did not listen on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(page)
}

/// `target/demo`, made if missing: where the page's log and screenshot go.
fn out_dir() -> Result<PathBuf> {
    let dir = cmd::root().join("target/demo");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// One drawn edge, as the page's DOM carries it.
#[derive(Debug)]
struct Drawn {
    rps: f64,
    mtls: bool,
}

/// Loads the page in headless Chromium, checks the edges user → web, web → catalog and
/// web → reviews are drawn with non-zero rates over mutual TLS, saves a screenshot; prints
/// what it saw.
pub fn check_in_browser(cluster: &Cluster, page: &GraphPage, failures: &mut Vec<String>) {
    let url = format!("http://{}/", page.addr);
    let shot = match out_dir() {
        Ok(dir) => dir.join("graph.png"),
        Err(e) => return failures.push(format!("the graph page's screenshot: {e:#}")),
    };
    let dom = match chromium(cluster, &url, &shot) {
        Ok(dom) => dom,
        Err(e) => return failures.push(format!("the graph page in Chromium: {e:#}")),
    };
    let edges = drawn_edges(&dom);
    println!("\n  The traffic graph page (trellisctl graph), as headless Chromium drew it:");
    for ((from, to), e) in &edges {
        println!(
            "  {from:<24} -> {to:<24} {:>7.2} req/s  {}",
            e.rps,
            if e.mtls { "mTLS" } else { "plaintext" }
        );
    }
    for (from, to) in [("user", "web"), ("web", "catalog"), ("web", "reviews")] {
        let key = (
            format!("workload:shop/{from}"),
            format!("service:shop/{to}"),
        );
        match edges.get(&key) {
            Some(e) if e.rps > 0.0 && e.mtls => {}
            Some(e) => failures.push(format!("graph page: edge {from} -> {to} drawn as {e:?}")),
            None => failures.push(format!("graph page: no edge {from} -> {to} in the DOM")),
        }
    }
    println!("  screenshot: {}", shot.display());
}

/// The page's DOM after its script has drawn, and a screenshot at `shot`.
fn chromium(cluster: &Cluster, url: &str, shot: &std::path::Path) -> Result<String> {
    let profile = std::env::temp_dir().join(format!("{}-chromium", cluster.fabric()));
    let run = |extra: &[String]| -> Result<Vec<u8>> {
        let mut cmd = Command::new(chromium_binary()?);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        // Time for the script's first fetch of /graph.json and its drawing.
        .arg("--virtual-time-budget=8000")
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let child = sys::spawn_in(cluster.fabric(), None, &mut cmd).context("starting chromium")?;
        let out = wait_bounded(child, Duration::from_secs(60))?;
        if !out.status.success() {
            bail!("chromium exited with {}", out.status);
        }
        Ok(out.stdout)
    };
    let dom = String::from_utf8_lossy(&run(&["--dump-dom".into()])?).into_owned();
    run(&[
        "--window-size=1760,460".into(),
        format!("--screenshot={}", shot.display()),
    ])?;
    let _ = fs::remove_dir_all(&profile);
    if !shot.is_file() {
        bail!("chromium wrote no screenshot at {}", shot.display());
    }
    Ok(dom)
}

fn chromium_binary() -> Result<PathBuf> {
    crate::setup::which("chromium")
        .context("chromium is missing: run `cargo xtask setup` (it installs Debian's chromium)")
}

/// Waits for `child` at most `limit`, killing it past that.
fn wait_bounded(mut child: Child, limit: Duration) -> Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

/// The edges the page drew: `<g class="edge …" data-source=… data-target=… data-rps=…
/// data-mtls=…>`, by (source, target).
fn drawn_edges(dom: &str) -> BTreeMap<(String, String), Drawn> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[start..].split('"').next()?.to_owned())
    };
    dom.split("<g class=\"edge")
        .skip(1)
        .filter_map(|rest| {
            let tag = rest.split('>').next()?;
            Some((
                (attr(tag, "data-source")?, attr(tag, "data-target")?),
                Drawn {
                    rps: attr(tag, "data-rps")?.parse().ok()?,
                    mtls: attr(tag, "data-mtls")? == "true",
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn edges_are_read_from_the_drawn_dom() {
        let dom = r#"<svg><g id="edges"><g class="edge ok" data-source="workload:shop/user" data-target="service:shop/web" data-protocol="http" data-rps="2.5" data-mtls="true"><path d="M 1 2"></path></g><g class="edge tcp plaintext" data-source="workload:shop/cart" data-target="service:shop/redis" data-rps="0" data-mtls="false"></g></g></svg>"#;
        let edges = super::drawn_edges(dom);
        let web = &edges[&("workload:shop/user".into(), "service:shop/web".into())];
        assert_eq!((web.rps, web.mtls), (2.5, true));
        let redis = &edges[&("workload:shop/cart".into(), "service:shop/redis".into())];
        assert!(!redis.mtls);
        assert_eq!(edges.len(), 2);
    }
}
