//! A real Prometheus (Debian's `prometheus`) in the cluster's fabric namespace at
//! `10.0.0.254:9090`, scraping every node's agent on `:15020` and control on `:15014` each
//! second, with queries over its HTTP API.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{node::Cluster, sys};

pub struct Prometheus {
    netns: String,
    dir: PathBuf,
    child: Child,
}

impl Prometheus {
    pub const PORT: u16 = 9090;

    /// Starts Prometheus for `cluster`'s nodes and control, and waits until it is ready.
    pub fn start(cluster: &Cluster) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", sys::unique_name()));
        fs::create_dir_all(&dir).expect("creating Prometheus's directory");
        let agents: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("'10.0.0.{}:15020'", n.index))
            .collect();
        fs::write(dir.join("prometheus.yml"), config(&agents.join(", ")))
            .expect("writing prometheus.yml");
        let log = fs::File::create(dir.join("prometheus.log")).expect("Prometheus's log");
        let mut cmd = Command::new(binary());
        cmd.arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!(
            "--web.listen-address={}:{}",
            Cluster::SERVICES_IP,
            Self::PORT
        ))
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        let child = sys::spawn_in(cluster.fabric(), None, &mut cmd).expect("starting prometheus");
        let prometheus = Self {
            netns: cluster.fabric().to_owned(),
            dir,
            child,
        };
        prometheus.wait("ready", Duration::from_secs(30), |p| {
            p.get("/-/ready").is_ok_and(|(code, _)| code == 200)
        });
        prometheus
    }

    /// `http://10.0.0.254:9090`, inside the fabric namespace.
    pub fn url(&self) -> String {
        format!("http://{}:{}", Cluster::SERVICES_IP, Self::PORT)
    }

    /// The fabric namespace it runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        sys::http_get(
            &self.netns,
            format!("{}:{}", Cluster::SERVICES_IP, Self::PORT)
                .parse()
                .expect("an address"),
            path,
        )
    }

    /// The `data.result` of an instant query; panics on an API error (a bad query is the test's bug).
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let (code, body) = self
            .get(&format!("/api/v1/query?query={}", encode(promql)))
            .expect("querying Prometheus");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Prometheus answered {code} with no JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "query {promql}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (at most 30 s) until every scrape target is up: both agents and control.
    pub fn wait_targets_up(&self, count: usize) {
        self.wait("every target up", Duration::from_secs(30), |p| {
            let up = p.query("up == 1");
            up.len() == count
        });
    }

    /// Polls until `ok` holds, at most `limit`; on timeout panics with Prometheus's log.
    pub fn wait(&self, what: &str, limit: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "Prometheus: {what}: not within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Debian's binary, installed by `cargo xtask setup`.
fn binary() -> PathBuf {
    let path = PathBuf::from("/usr/bin/prometheus");
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs Debian's prometheus)",
        path.display()
    );
    path
}

/// Scrapes each second, so a test sees a rate a few seconds after traffic starts.
fn config(agents: &str) -> String {
    format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         scrape_configs:\n\
         - job_name: trellis-agent\n  static_configs: [{{targets: [{agents}]}}]\n\
         - job_name: trellis-control\n  static_configs: [{{targets: ['{}:15014']}}]\n",
        Cluster::SERVICES_IP
    )
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters pass).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_parameters_are_percent_encoded() {
        assert_eq!(
            super::encode("sum(rate(x{a=\"b c\"}[1m]))"),
            "sum%28rate%28x%7Ba%3D%22b%20c%22%7D%5B1m%5D%29%29"
        );
    }
}
