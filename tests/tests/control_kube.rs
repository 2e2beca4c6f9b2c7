//! trellis-control in kube mode against a real kube-apiserver (Debian's 1.20 build, with etcd),
//! running with exactly the RBAC in deploy/rbac, and the agent's real config client
//! authenticating with a pod-bound service-account token.
mod follower;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use follower::{subscribe, until, web_ips};
use tempfile::TempDir;
use trellis_agent::config::{ControlEndpoint, NodeConfig};
use trellis_api as api;
use trellis_control::run::{Control, ControlConfig, Mode, start};
use trellis_e2e::apiserver::KubeApiServer;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

struct Cluster {
    api: KubeApiServer,
    dir: TempDir,
}

impl Cluster {
    /// The API server with Trellis's CRDs and RBAC, a mesh namespace with pod web on n1, pod
    /// reviews on n2, service reviews, and an agent pod on each node.
    fn new() -> Self {
        let api = KubeApiServer::start();
        let c = Self {
            api,
            dir: TempDir::new().unwrap(),
        };
        c.kubectl(&[
            "apply",
            "-f",
            &repo("deploy/crds/istio-subset.yaml").to_string_lossy(),
        ]);
        c.kubectl(&[
            "apply",
            "-f",
            &repo("deploy/rbac/trellis.yaml").to_string_lossy(),
        ]);
        c.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/virtualservices.networking.istio.io",
        ]);
        c.apply(
            "shop",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled}}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: shop}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n\
             spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}\n",
        );
        c.pod("shop", "web", "n1", "web", "app: web", "10.244.1.10");
        c.pod(
            "shop",
            "reviews",
            "n2",
            "default",
            "app: reviews",
            "10.244.2.10",
        );
        c.pod(
            "trellis-system",
            "agent-n1",
            "n1",
            "trellis-agent",
            "app: trellis-agent",
            "192.168.0.1",
        );
        c
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.api.kubectl(args)
    }

    fn apply(&self, name: &str, yaml: &str) {
        let file = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        self.kubectl(&["apply", "-f", &file.to_string_lossy()]);
    }

    /// A pod as the scheduler and kubelet would leave it: bound to `node`, running, with an IP.
    fn pod(&self, ns: &str, name: &str, node: &str, sa: &str, labels: &str, ip: &str) {
        self.apply(
            &format!("pod-{ns}-{name}"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
                 spec: {{nodeName: {node}, serviceAccountName: {sa}, automountServiceAccountToken: false, containers: [{{name: app, image: demo}}]}}\n"
            ),
        );
        self.set_ip(ns, name, ip);
    }

    fn set_ip(&self, ns: &str, name: &str, ip: &str) {
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
        );
        self.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ]);
    }

    /// A token for `sa`, optionally bound to a pod (as a projected volume would give).
    fn token(&self, sa: &str, bound_pod: Option<&str>) -> PathBuf {
        let mut args = vec!["create", "token", sa, "-n", "trellis-system"];
        if let Some(pod) = bound_pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        let token = self.kubectl(&args);
        let file = self
            .dir
            .path()
            .join(format!("token-{sa}-{}", bound_pod.unwrap_or("unbound")));
        std::fs::write(&file, token.trim()).unwrap();
        file
    }

    /// A client acting as control's own service account (so deploy/rbac is what is tested).
    async fn control_client(&self) -> kube::Client {
        let token = std::fs::read_to_string(self.token("trellis-control", None)).unwrap();
        let ca = self.dir.path().join("apiserver-ca.pem");
        std::fs::write(&ca, self.api.ca_pem()).unwrap();
        let kubeconfig = self.dir.path().join("control.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
                 clusters: [{{name: t, cluster: {{server: \"{}\", certificate-authority: \"{}\"}}}}]\n\
                 users: [{{name: control, user: {{token: \"{}\"}}}}]\n\
                 contexts: [{{name: t, context: {{cluster: t, user: control}}}}]\n",
                self.api.server_url(),
                ca.display(),
                token.trim()
            ),
        )
        .unwrap();
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    async fn start_control(&self, port: u16) -> Control {
        start(ControlConfig {
            mode: Mode::Kube {
                client: self.control_client().await,
                namespace: "trellis-system".into(),
                ca_secret: "trellis-ca".into(),
                agent_service_account: "trellis-agent".into(),
            },
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            trust_domain: "cluster.local".into(),
            root_namespace: "trellis-system".into(),
            registry_only: false,
            server_names: vec!["trellis-control".into()],
            workload_cert_ttl: Duration::from_secs(24 * 3600),
            metrics_listen: None,
        })
        .await
        .expect("control starts")
    }

    fn ca_secret_root(&self) -> String {
        self.kubectl(&[
            "get",
            "secret",
            "trellis-ca",
            "-n",
            "trellis-system",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])
    }

    fn endpoint(&self, control: &Control, token: PathBuf) -> ControlEndpoint {
        let root = self.dir.path().join("mesh-root.pem");
        std::fs::write(&root, control.state.ca.root_pem()).unwrap();
        ControlEndpoint {
            url: format!("https://{}", control.addr),
            ca_file: root,
            server_name: "trellis-control".into(),
            token_file: token,
        }
    }
}

fn reviews_endpoints(c: &NodeConfig) -> usize {
    c.services()
        .find(|s| s.name == "reviews")
        .map_or(0, |s| s.endpoints.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_end_to_end() {
    let mut k = Cluster::new();
    let control = k.start_control(0).await;
    let agent_token = k.token("trellis-agent", Some("agent-n1"));
    let mut n1 = subscribe(k.endpoint(&control, agent_token.clone()), "n1");

    // Initial snapshot: n1's enrolled pod, every service with endpoints derived from pods.
    let (first, config) = until(&mut n1, "the snapshot", |c| c.workloads().count() == 1).await;
    assert!(first.snapshot);
    assert_eq!(web_ips(&config), ["10.244.1.10"]);
    assert_eq!(reviews_endpoints(&config), 1);

    // The agent's token only speaks for its own node.
    let mut wrong = k
        .endpoint(&control, agent_token.clone())
        .connect()
        .await
        .unwrap();
    let err = wrong
        .subscribe(api::SubscribeRequest { node: "n2".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("runs on node n1, not n2"),
        "{}",
        err.message()
    );
    // Another service account's token, or one not bound to a pod, gets nothing.
    for token in [
        k.token("trellis-control", None),
        k.token("trellis-agent", None),
    ] {
        let mut c = k.endpoint(&control, token).connect().await.unwrap();
        let err = c
            .subscribe(api::SubscribeRequest { node: "n1".into() })
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "{err}"
        );
    }

    // Pod IP change through the status subresource.
    k.set_ip("shop", "web", "10.244.1.20");
    until(&mut n1, "web's new IP", |c| web_ips(c) == ["10.244.1.20"]).await;
    // Opt-out label, then back in.
    k.kubectl(&[
        "label",
        "pod",
        "web",
        "-n",
        "shop",
        "trellis.dev/mesh=disabled",
    ]);
    until(&mut n1, "web opted out", |c| c.workloads().count() == 0).await;
    k.kubectl(&["label", "pod", "web", "-n", "shop", "trellis.dev/mesh-"]);
    until(&mut n1, "web back", |c| c.workloads().count() == 1).await;
    // Namespace label off: the whole namespace leaves the mesh.
    k.kubectl(&["label", "namespace", "shop", "trellis.dev/mesh-"]);
    until(&mut n1, "shop left the mesh", |c| {
        c.workloads().count() == 0
    })
    .await;
    k.kubectl(&["label", "namespace", "shop", "trellis.dev/mesh=enabled"]);
    until(&mut n1, "shop back", |c| c.workloads().count() == 1).await;

    // A mesh CR the CRD schema admits but control rejects: reported, nothing else disturbed.
    k.apply(
        "bad-vs",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
         spec: {hosts: [reviews], http: [{route: [{destination: {host: a}, weight: 80}, {destination: {host: b}, weight: 30}]}]}\n",
    );
    let mut errors = control.source_errors.clone();
    let found = tokio::time::timeout(
        Duration::from_secs(20),
        errors.wait_for(|e| e.iter().any(|e| e.contains("weights add up to 110"))),
    );
    let errs = found
        .await
        .expect("control never reported the bad VirtualService")
        .unwrap()
        .clone();
    assert!(errs[0].contains("VirtualService shop/reviews"), "{errs:?}");
    k.apply(
        "bad-vs",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
         spec: {hosts: [reviews], http: [{route: [{destination: {host: a}, weight: 80}, {destination: {host: b}, weight: 20}]}]}\n",
    );
    until(&mut n1, "the fixed VirtualService", |c| {
        c.policies().count() == 1
    })
    .await;

    // A Gateway's certificate from a kubernetes.io/tls Secret, as `kubectl create secret tls`
    // makes it, reaches the gateway pod's node; other Secrets are not watched at all (the CA's
    // own is Opaque), so none is reported.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["shop.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    let (cert_file, key_file) = (k.dir.path().join("tls.crt"), k.dir.path().join("tls.key"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    k.kubectl(&[
        "create",
        "secret",
        "tls",
        "shop-cert",
        "-n",
        "shop",
        &format!("--cert={}", cert_file.display()),
        &format!("--key={}", key_file.display()),
    ]);
    k.kubectl(&[
        "create",
        "secret",
        "generic",
        "other",
        "-n",
        "shop",
        "--from-literal=a=b",
    ]);
    k.apply(
        "gw",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: web-in, namespace: shop}\n\
         spec: {selector: {app: web}, servers: [{port: {number: 443, name: https, protocol: HTTPS}, \
         hosts: [shop.example], tls: {mode: SIMPLE, credentialName: shop-cert}}]}\n",
    );
    until(&mut n1, "the gateway's certificate from the Secret", |c| {
        c.workloads().any(|w| {
            w.gateway_ports.iter().any(|g| {
                g.certificates
                    .iter()
                    .any(|x| x.source == "Secret shop/shop-cert" && x.cert_pem == cert)
            })
        })
    })
    .await;
    assert!(
        !errors.borrow().iter().any(|e| e.contains("Secret")),
        "{:?}",
        *errors.borrow()
    );

    // An unsupported field, sent past kubectl's own check (as any API client could): the API
    // server keeps it (the CRDs preserve unknown fields, where pruning would have widened the
    // rule) and control refuses the policy with the field's path.
    let file = k.dir.path().join("bad-authz.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-jwt, namespace: shop}\n\
         spec: {rules: [{from: [{source: {requestPrincipals: [\"issuer/subject\"]}}]}]}\n",
    )
    .unwrap();
    k.kubectl(&["apply", "--validate=false", "-f", &file.to_string_lossy()]);
    let stored = k.kubectl(&[
        "get",
        "authorizationpolicy",
        "only-jwt",
        "-n",
        "shop",
        "-o",
        "jsonpath={.spec.rules[0].from[0].source}",
    ]);
    assert!(stored.contains("requestPrincipals"), "pruned: {stored:?}");
    let found = tokio::time::timeout(
        Duration::from_secs(20),
        errors.wait_for(|e| e.iter().any(|e| e.contains("requestPrincipals"))),
    );
    let errs = found
        .await
        .expect("control never reported the unsupported field")
        .unwrap()
        .clone();
    assert!(
        errs.iter()
            .any(|e| e.contains("AuthorizationPolicy shop/only-jwt")
                && e.contains("spec.rules[0].from[0].source.requestPrincipals: unknown field")),
        "{errs:?}"
    );

    // Delete: the endpoint goes.
    k.kubectl(&[
        "delete",
        "pod",
        "reviews",
        "-n",
        "shop",
        "--grace-period=0",
        "--force",
    ]);
    // A pod being deleted stops being an endpoint first and leaves the mesh when it is gone.
    let (_, before) = until(&mut n1, "reviews endpoint and peer removed", |c| {
        reviews_endpoints(c) == 0 && !c.peers().any(|p| p.name == "reviews")
    })
    .await;
    assert!(
        !before.policies().any(|p| p.name == "only-jwt"),
        "the refused AuthorizationPolicy reached the node"
    );

    // Signing: only for identities running on the caller's node.
    let mut client = k
        .endpoint(&control, agent_token.clone())
        .connect()
        .await
        .unwrap();
    let (csr, _) =
        trellis_control::ca::workload_csr("spiffe://cluster.local/ns/shop/sa/web").unwrap();
    client
        .sign(api::SignRequest {
            node: "n1".into(),
            csr_pem: csr,
        })
        .await
        .expect("web's identity is on n1");
    let (csr, _) =
        trellis_control::ca::workload_csr("spiffe://cluster.local/ns/shop/sa/default").unwrap();
    let err = client
        .sign(api::SignRequest {
            node: "n1".into(),
            csr_pem: csr,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Control restart: same root (from the Secret), a fresh snapshot with the same state.
    let root = k.ca_secret_root();
    let addr = control.addr;
    drop(control);
    let control = k.start_control(addr.port()).await;
    assert_eq!(
        k.ca_secret_root(),
        root,
        "the CA root changed across a control restart"
    );
    let (update, after) = until(&mut n1, "the resync", |_| true).await;
    assert!(update.snapshot);
    assert_eq!(
        after.resources, before.resources,
        "restart changed or duplicated state"
    );

    // API server restart: the watches resume and nothing is missed.
    k.api.restart_apiserver();
    k.set_ip("shop", "web", "10.244.1.30");
    until(
        &mut n1,
        "a change made after the API server restarted",
        |c| web_ips(c) == ["10.244.1.30"],
    )
    .await;
    drop(control);
}
