//! Runs the real `trellis-agent` binary for a node, inside the node's network namespace, and
//! reads what it reports: its JSON log lines and its admin endpoint.
use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    node::{Node, Pod, binary},
    sys,
};

pub const ADMIN: &str = "127.0.0.1:15000";
pub const NAMESPACE: &str = "default";

pub struct Agent {
    pub node: String,
    pub pin_root: PathBuf,
    cgroup_root: PathBuf,
    dir: PathBuf,
    extra: Vec<String>,
    /// Whether the agent reads its pods from a file (otherwise from control).
    pods_file: bool,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    /// Starts an agent for `node` capturing `pods`, and waits until it is ready.
    pub fn start(node: &Node, pods: &[&Pod]) -> Self {
        Self::start_with(node, pods, &[])
    }

    /// Starts an agent that takes its pods (and certificates) from control.
    pub fn start_with_control(node: &Node, control: &crate::control::Control) -> Self {
        Self::start_with_control_and(node, control, &[])
    }

    /// Like `start_with_control`, with more agent arguments (`--access-log`, say).
    pub fn start_with_control_and(
        node: &Node,
        control: &crate::control::Control,
        extra: &[&str],
    ) -> Self {
        let mut args = control.agent_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Self::prepare(node, &args.iter().map(String::as_str).collect::<Vec<_>>());
        agent.pods_file = false;
        agent.spawn();
        agent.wait_ready();
        agent
    }

    pub fn start_with(node: &Node, pods: &[&Pod], extra: &[&str]) -> Self {
        let mut agent = Self::prepare(node, extra);
        agent.set_pods(pods);
        agent.spawn();
        agent.wait_ready();
        agent
    }

    fn prepare(node: &Node, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(&node.name);
        fs::create_dir_all(&dir).expect("creating the agent's temp dir");
        Self {
            node: node.name.clone(),
            pin_root: PathBuf::from("/sys/fs/bpf/trellis"),
            cgroup_root: node.cgroup_root.clone(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            pods_file: true,
            child: None,
            runs: 0,
        }
    }

    fn pods_file(&self) -> PathBuf {
        self.dir.join("pods.json")
    }

    /// The current run's log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join(format!("agent-{}.log", self.runs))
    }

    /// Replaces the pods file (atomically, as a config manager would).
    pub fn set_pods(&self, pods: &[&Pod]) {
        let doc = serde_json::json!({ "pods": pods.iter().map(|p| p.spec(NAMESPACE)).collect::<Vec<_>>() });
        self.write_pods_file(&doc.to_string());
    }

    pub fn write_pods_file(&self, text: &str) {
        let tmp = self.dir.join("pods.json.tmp");
        fs::write(&tmp, text).expect("writing pods file");
        fs::rename(&tmp, self.pods_file()).expect("replacing pods file");
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--node",
            &self.node,
            "--pin-root",
            &self.pin_root.to_string_lossy(),
            "--cgroup-root",
            &self.cgroup_root.to_string_lossy(),
            "--admin-addr",
            ADMIN,
            "--log-format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.pods_file {
            args.extend([
                "--pods".to_owned(),
                self.pods_file().to_string_lossy().into_owned(),
            ]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    fn spawn(&mut self) {
        self.runs += 1;
        self.child = Some(
            self.spawn_extra(&self.log_file())
                .unwrap_or_else(|e| panic!("starting trellis-agent: {e}")),
        );
    }

    /// Spawns another agent process with this one's arguments, logging to `log`.
    pub fn spawn_extra(&self, log: &std::path::Path) -> std::io::Result<Child> {
        let log = fs::File::create(log)?;
        let mut cmd = Command::new(binary("trellis-agent"));
        cmd.args(self.args()).stdout(log.try_clone()?).stderr(log);
        sys::spawn_in(&self.node, None, &mut cmd)
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "trellis-agent exited with {status} during start-up:\n{}",
                    self.log_text()
                );
            }
            if matches!(self.admin("/readyz"), Ok((200, _))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "trellis-agent not ready within 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn admin(&self, path: &str) -> std::io::Result<(u16, String)> {
        sys::http_get(
            &self.node,
            ADMIN.parse::<SocketAddr>().expect("valid"),
            path,
        )
    }

    /// The admin endpoint's pod list.
    pub fn pods(&self) -> Vec<Value> {
        let (code, body) = self.admin("/pods").expect("admin /pods");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/pods is JSON")
    }

    /// Waits until `pod`'s state is `state` ("enrolled" or "failed"); returns its status.
    pub fn wait_pod_state(&self, pod: &Pod, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = self
                .pods()
                .into_iter()
                .find(|p| p["uid"] == pod.uid.as_str() && p["state"] == state)
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "pod {} never became {state}: {:?}\n{}",
                pod.name,
                self.pods(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A scratch file path in the agent's temp dir.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// The current run's JSON log lines.
    pub fn logs(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a log line matching `pred`.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.logs().into_iter().find(|v| pred(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "agent never logged {what}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The "connection captured" lines, as (direction, pod name, client, orig_dst).
    pub fn captures(&self) -> Vec<(String, String, String, String)> {
        self.logs()
            .into_iter()
            .filter(|v| v["message"] == "connection captured")
            .map(|v| {
                let f = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                (f("direction"), f("pod"), f("client"), f("orig_dst"))
            })
            .collect()
    }

    /// The running agent process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again (after `kill9`).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready();
    }

    /// Starts the agent again with `more` arguments too.
    pub fn restart_with(&mut self, more: &[&str]) {
        self.extra.extend(more.iter().map(|s| s.to_string()));
        self.restart();
    }

    /// `trellis-agent cleanup` for this node.
    pub fn cleanup(&self) -> std::process::Output {
        Command::new(binary("trellis-agent"))
            .args([
                "cleanup",
                "--node",
                &self.node,
                "--pin-root",
                &self.pin_root.to_string_lossy(),
            ])
            .output()
            .expect("running trellis-agent cleanup")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        let _ = self.cleanup();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
