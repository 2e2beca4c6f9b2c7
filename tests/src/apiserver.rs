//! A real Kubernetes API server for tests: Debian's kube-apiserver 1.20.2 (built by `cargo xtask
//! setup`) on etcd, both on free loopback ports, with a throwaway CA, token authentication, RBAC
//! and service-account token signing. Everything lives in a temp dir named like the harness's
//! other objects, and is stopped and removed on drop.
use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::sys;

pub const VERSION: &str = "v1.20.2";
/// Service ClusterIPs come from here; the first is the `kubernetes` Service's.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_IP: &str = "10.96.0.1";

/// Where `cargo xtask setup` puts the binary ($TRELLIS_KUBE_APISERVER overrides).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TRELLIS_KUBE_APISERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/trellis/kube")
        .join(VERSION)
        .join("kube-apiserver")
}

pub struct KubeApiServer {
    dir: PathBuf,
    port: u16,
    etcd: Child,
    apiserver: Option<Child>,
    etcd_url: String,
    /// The address it serves and advertises on (127.0.0.1 unless it serves a real node).
    host: String,
    for_node: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl KubeApiServer {
    pub fn start() -> Self {
        Self::start_with("127.0.0.1", false)
    }

    /// An API server for a real node (`kubenode`): it serves and advertises on the node's address
    /// `host` (pods reach it through the `kubernetes` Service, whose endpoint cannot be a loopback
    /// address), admits privileged pods (the agent DaemonSet is one) and reaches kubelet at the
    /// node's InternalIP (its name does not resolve).
    pub fn start_for_node(host: &str) -> Self {
        Self::start_with(host, true)
    }

    fn start_with(host: &str, for_node: bool) -> Self {
        sys::sweep_stale();
        let bin = binary();
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo xtask setup` (it builds kube-apiserver from Debian's source)",
            bin.display()
        );
        let dir = std::env::temp_dir().join(format!("{}-kube", sys::unique_name()));
        fs::create_dir_all(&dir).unwrap();
        // A throwaway CA, a serving certificate for `host` and the `kubernetes` Service's
        // address, a service-account signing key.
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=trellis-test-ca",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=kube-apiserver",
            ],
        );
        fs::write(
            dir.join("san.ext"),
            format!(
                "subjectAltName=IP:{host},IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes.default.svc\n"
            ),
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
        openssl(&dir, &["genrsa", "-out", "sa.key", "2048"]);
        openssl(&dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        let token = format!("admin-{}", sys::unique_name());
        fs::write(
            dir.join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )
        .unwrap();

        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd = Command::new("etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd is installed (cargo xtask setup installs etcd-server)");
        let port = free_port();
        fs::write(
            dir.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
                 clusters: [{{name: test, cluster: {{server: \"https://{host}:{port}\", certificate-authority: \"{}\"}}}}]\n\
                 users: [{{name: admin, user: {{token: \"{token}\"}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: admin}}}}]\n",
                dir.join("ca.pem").display()
            ),
        )
        .unwrap();
        let mut server = Self {
            dir,
            port,
            etcd,
            apiserver: None,
            etcd_url,
            host: host.to_owned(),
            for_node,
        };
        server.spawn_apiserver();
        server
    }

    fn spawn_apiserver(&mut self) {
        let d = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        let args = [
            format!("--etcd-servers={}", self.etcd_url),
            format!("--bind-address={}", self.host),
            format!("--advertise-address={}", self.host),
            format!("--secure-port={}", self.port),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", d("certs")),
            format!("--tls-cert-file={}", d("server.pem")),
            format!("--tls-private-key-file={}", d("server.key")),
            format!("--client-ca-file={}", d("ca.pem")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--api-audiences=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--profiling=false".into(),
        ];
        let node_args = [
            "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP",
        ];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("apiserver.log"))
            .unwrap();
        let child = Command::new(binary())
            .args(&args)
            .args(node_args.iter().filter(|_| self.for_node))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting kube-apiserver");
        self.apiserver = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self
                .apiserver
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("kube-apiserver exited with {status}:\n{}", self.log_tail());
            }
            let out = self.kubectl_output(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within 90 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Its directory: CA (`ca.pem`, `ca.key`), service-account key (`sa.key`), logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// (etcd, kube-apiserver) process ids.
    pub fn pids(&self) -> (u32, u32) {
        (
            self.etcd.id(),
            self.apiserver.as_ref().map_or(0, |c| c.id()),
        )
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// The API server's CA (PEM).
    pub fn ca_pem(&self) -> String {
        fs::read_to_string(self.dir.join("ca.pem")).unwrap()
    }

    fn kubectl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig_path())
            .args(args)
            .output()
            .expect("kubectl is installed")
    }

    /// Runs kubectl as cluster admin; panics with its output if it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops and starts the API server (etcd, and so every object, stays).
    pub fn restart_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn_apiserver();
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        for c in self
            .apiserver
            .iter_mut()
            .chain(std::iter::once(&mut self.etcd))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
