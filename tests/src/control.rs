//! Runs the real `trellis-control` binary in dir mode inside the cluster's fabric namespace, at
//! `10.0.0.254:15012`, where every node's agent can reach it.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use crate::{
    node::{Cluster, binary},
    sys,
};

pub struct Control {
    dir: PathBuf,
    /// Extra command-line arguments for trellis-control.
    args: Vec<String>,
    child: Option<Child>,
}

impl Control {
    /// Starts control on the objects in `files` (name, YAML) and waits until it listens.
    pub fn start(cluster: &Cluster, files: &[(&str, &str)]) -> Self {
        Self::start_with(cluster, files, &[])
    }

    /// As `start`, with extra arguments for trellis-control (e.g. `--workload-cert-ttl 10s`).
    pub fn start_with(cluster: &Cluster, files: &[(&str, &str)], args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-control", sys::unique_name()));
        fs::create_dir_all(dir.join("yaml")).unwrap();
        fs::write(
            dir.join("token"),
            format!("bootstrap-{}", sys::unique_name()),
        )
        .unwrap();
        let control = Self {
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        for (name, yaml) in files {
            control.write(name, yaml);
        }
        let mut control = control;
        control.spawn(cluster);
        control
    }

    /// Starts control again after `kill`, on the same directory and CA.
    pub fn restart(&mut self, cluster: &Cluster) {
        self.kill();
        self.spawn(cluster);
    }

    fn spawn(&mut self, cluster: &Cluster) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("control.log"))
            .unwrap();
        let mut cmd = Command::new(binary("trellis-control"));
        cmd.arg("--source")
            .arg(format!("dir:{}", self.dir.join("yaml").display()))
            .args([
                "--listen",
                &format!("{}:15012", Cluster::SERVICES_IP),
                "--server-names",
                "trellis-control",
            ])
            .arg("--ca-dir")
            .arg(self.dir.join("ca"))
            .arg("--bootstrap-token-file")
            .arg(self.dir.join("token"))
            .args(&self.args)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(
            sys::spawn_in(cluster.fabric(), None, &mut cmd).expect("starting trellis-control"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while sys::connect_in(
            cluster.fabric(),
            format!("{}:15012", Cluster::SERVICES_IP).parse().unwrap(),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "trellis-control did not listen within 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Adds or replaces a file in control's directory (atomically).
    pub fn write(&self, name: &str, yaml: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, yaml).unwrap();
        fs::rename(tmp, self.dir.join("yaml").join(name)).unwrap();
    }

    /// Removes a file from control's directory.
    pub fn remove(&self, name: &str) {
        fs::remove_file(self.dir.join("yaml").join(name)).unwrap();
    }

    /// Arguments that point an agent at this control.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--control-url".into(),
            format!("https://{}:15012", Cluster::SERVICES_IP),
            "--control-server-name".into(),
            "trellis-control".into(),
            "--control-ca".into(),
            self.dir.join("ca/ca.pem").to_string_lossy().into_owned(),
            "--control-token-file".into(),
            self.dir.join("token").to_string_lossy().into_owned(),
        ]
    }

    /// Control's CA directory (ca.pem, ca-key.pem): tests sign certificates of their own with it.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.join("control.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
