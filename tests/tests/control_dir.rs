//! trellis-control in dir mode, in process on loopback, with the agent's real config client
//! subscribing over TLS: what a node receives, and how bad input and restarts are handled.
mod follower;

use std::{net::SocketAddr, time::Duration};

use follower::{subscribe, until, web_ips};
use tempfile::TempDir;
use trellis_agent::config::ControlEndpoint;
use trellis_api::{self as api, mesh_control_client::MeshControlClient};
use trellis_control::run::{Control, ControlConfig, Mode, start};

const TOKEN: &str = "test-bootstrap-token-0123456789";

struct Fixture {
    yaml: TempDir,
    state: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Self {
            yaml: TempDir::new().unwrap(),
            state: TempDir::new().unwrap(),
        };
        std::fs::write(f.state.path().join("token"), TOKEN).unwrap();
        f.write("shop.yaml", &shop(&["10.244.1.10"], ""));
        f
    }

    fn write(&self, name: &str, text: &str) {
        // Write then rename, as editors and config managers do, so a reader never sees half a file.
        let tmp = self.yaml.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.yaml.path().join(name)).unwrap();
    }

    async fn start(&self, port: u16) -> Control {
        self.start_with_ttl(port, Duration::from_secs(24 * 3600))
            .await
    }

    async fn start_with_ttl(&self, port: u16, workload_cert_ttl: Duration) -> Control {
        start(ControlConfig {
            mode: Mode::Dir {
                path: self.yaml.path().to_owned(),
                ca_dir: self.state.path().join("ca"),
                bootstrap_token_file: self.state.path().join("token"),
            },
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            trust_domain: "cluster.local".into(),
            root_namespace: "trellis-system".into(),
            registry_only: false,
            server_names: vec!["trellis-control".into()],
            workload_cert_ttl,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        })
        .await
        .expect("control starts")
    }

    fn endpoint(&self, addr: SocketAddr) -> ControlEndpoint {
        ControlEndpoint {
            url: format!("https://{addr}"),
            ca_file: self.state.path().join("ca/ca.pem"),
            server_name: "trellis-control".into(),
            token_file: self.state.path().join("token"),
        }
    }
}

/// A mesh namespace, pods web (node n1) and reviews (n2), and a service for reviews.
fn shop(web_ips: &[&str], web_labels: &str) -> String {
    let ips: Vec<String> = web_ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{trellis.dev/mesh: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: 11111111-0000-4000-8000-000000000001, labels: {{app: web{web_labels}}}}}\n\
         spec: {{nodeName: n1, serviceAccountName: web, containers: []}}\nstatus: {{phase: Running, podIPs: [{}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v1, namespace: shop, labels: {{app: reviews, version: v1}}}}\n\
         spec: {{nodeName: n2, serviceAccountName: reviews, containers: [{{name: app, ports: [{{name: http, containerPort: 9080}}]}}]}}\n\
         status: {{podIP: 10.244.2.10}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.0.20, selector: {{app: reviews}}, ports: [{{name: http, port: 9080, targetPort: http}}]}}\n",
        ips.join(", ")
    )
}

#[tokio::test]
async fn snapshot_then_incremental_updates_and_acks() {
    let f = Fixture::new();
    let control = f.start(0).await;
    let mut n1 = subscribe(f.endpoint(control.addr), "n1");

    let (first, config) = until(&mut n1, "the snapshot", |_| true).await;
    assert!(first.snapshot);
    assert_eq!(config.trust_domain, "cluster.local");
    let workloads: Vec<_> = config
        .workloads()
        .map(|w| (w.name.clone(), w.identity.clone()))
        .collect();
    assert_eq!(
        workloads,
        [(
            "web".to_string(),
            "spiffe://cluster.local/ns/shop/sa/web".to_string()
        )],
        "only n1's pods"
    );
    let reviews = config
        .services()
        .find(|s| s.name == "reviews")
        .expect("service reviews");
    assert_eq!(reviews.vips, ["10.96.0.20"]);
    assert_eq!(reviews.endpoints.len(), 1);
    assert_eq!(
        (
            reviews.endpoints[0].node.as_str(),
            reviews.endpoints[0].ports["http"]
        ),
        ("n2", 9080)
    );

    // Pod IP change: one incremental update.
    f.write("shop.yaml", &shop(&["10.244.1.11", "fd00:244:1::11"], ""));
    let (update, _) = until(&mut n1, "web's new IPs", |c| {
        web_ips(c) == ["10.244.1.11", "fd00:244:1::11"]
    })
    .await;
    assert!(!update.snapshot);
    assert_eq!(update.upserts.len(), 1, "only web changed: {update:?}");

    // Opt-out label: the workload goes away.
    f.write(
        "shop.yaml",
        &shop(&["10.244.1.11"], ", trellis.dev/mesh: disabled"),
    );
    let (update, _) = until(&mut n1, "web opted out", |c| c.workloads().count() == 0).await;
    assert_eq!(update.removals.len(), 1);

    // Delete the file: everything it defined is removed.
    std::fs::remove_file(f.yaml.path().join("shop.yaml")).unwrap();
    let (update, _) = until(&mut n1, "the service removed", |c| {
        c.services().count() == 0
    })
    .await;

    // The agent acknowledged every version; control recorded the last.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while control.state.nodes()["n1"].accepted != Some(update.version) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            control.state.nodes()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(control.state.nodes()["n1"].rejected, None);
}

#[tokio::test]
async fn bad_files_are_reported_and_the_last_good_config_kept() {
    let f = Fixture::new();
    let control = f.start(0).await;
    let mut n1 = subscribe(f.endpoint(control.addr), "n1");
    until(&mut n1, "the snapshot", |c| c.workloads().count() == 1).await;
    let mut errors = control.source_errors.clone();
    let mut next_error = async |want: &str| {
        tokio::time::timeout(
            Duration::from_secs(10),
            errors.wait_for(|e| e.iter().any(|e| e.contains(want))),
        )
        .await
        .unwrap_or_else(|_| panic!("no error containing {want:?}"))
        .unwrap()
        .join("\n")
    };

    f.write(
        "shop.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [broken\n",
    );
    let e = next_error("not valid YAML").await;
    assert!(e.contains("shop.yaml"), "{e}");

    f.write(
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n    mirrorPercent: 50\n",
    );
    let e = next_error("mirrorPercent").await;
    assert!(
        e.contains("routes.yaml")
            && e.contains("VirtualService shop/reviews")
            && e.contains("spec.http[0]"),
        "{e}"
    );

    f.write(
        "extra.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
    );
    let e = next_error("unsupported kind Deployment").await;
    assert!(e.contains("extra.yaml"), "{e}");

    // Nothing the bad files said reached the node: it still has web.
    f.write(
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v1}, weight: 80}, {destination: {host: reviews, subset: v2}, weight: 20}]\n",
    );
    let (_, config) = until(&mut n1, "the valid VirtualService", |c| {
        c.policies().count() == 1
    })
    .await;
    assert_eq!(
        config.workloads().count(),
        1,
        "the last good shop.yaml still applies"
    );
    let vs = config.policies().next().unwrap();
    assert!(vs.spec_json.contains("\"weight\":80"), "{}", vs.spec_json);
}

#[tokio::test]
async fn callers_without_the_token_or_the_root_get_nothing() {
    let f = Fixture::new();
    let control = f.start(0).await;
    let wrong = f.state.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-bootstrap-token-000").unwrap();
    let mut ep = f.endpoint(control.addr);
    ep.token_file = wrong;
    let mut client = ep.connect().await.unwrap();
    let err = client
        .subscribe(api::SubscribeRequest { node: "n1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .sign(api::SignRequest {
            node: "n1".into(),
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // No token at all, over a plain TLS channel.
    let ca = std::fs::read_to_string(f.state.path().join("ca/ca.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("trellis-control");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", control.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = MeshControlClient::new(channel)
        .subscribe(api::SubscribeRequest { node: "n1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // A client that does not trust the mesh root cannot even connect.
    let other = TempDir::new().unwrap();
    let (root, _) = trellis_control::ca::Ca::generate_root("elsewhere").unwrap();
    std::fs::write(other.path().join("ca.pem"), root).unwrap();
    let mut ep = f.endpoint(control.addr);
    ep.ca_file = other.path().join("ca.pem");
    let result = match ep.connect().await {
        Ok(mut c) => c
            .subscribe(api::SubscribeRequest { node: "n1".into() })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("{e:#}")),
    };
    assert!(
        result.is_err(),
        "a client with another root talked to control"
    );
}

#[tokio::test]
async fn sign_issues_svids_only_for_identities_on_the_node() {
    let f = Fixture::new();
    let control = f.start(0).await;
    let mut client = f.endpoint(control.addr).connect().await.unwrap();
    let (csr, _key) =
        trellis_control::ca::workload_csr("spiffe://cluster.local/ns/shop/sa/web").unwrap();
    let resp = client
        .sign(api::SignRequest {
            node: "n1".into(),
            csr_pem: csr.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.cert_chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert_eq!(
        resp.root_pem,
        std::fs::read_to_string(f.state.path().join("ca/ca.pem")).unwrap()
    );

    // web runs on n1, not n2.
    let err = client
        .sign(api::SignRequest {
            node: "n2".into(),
            csr_pem: csr,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("no pod on node n2 runs as spiffe://cluster.local/ns/shop/sa/web"),
        "{}",
        err.message()
    );
    let (csr, _) =
        trellis_control::ca::workload_csr("spiffe://other.domain/ns/shop/sa/web").unwrap();
    let err = client
        .sign(api::SignRequest {
            node: "n1".into(),
            csr_pem: csr,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_restarted_control_keeps_its_root_and_agents_resync() {
    let f = Fixture::new();
    let control = f.start(0).await;
    let addr = control.addr;
    let root = std::fs::read_to_string(f.state.path().join("ca/ca.pem")).unwrap();
    let mut n1 = subscribe(f.endpoint(addr), "n1");
    let (_, before) = until(&mut n1, "the snapshot", |c| c.workloads().count() == 1).await;

    drop(control);
    // While control is away the agent keeps its config; a change made meanwhile arrives after.
    f.write("shop.yaml", &shop(&["10.244.1.12"], ""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let control = f.start(addr.port()).await;
    let (update, after) = until(&mut n1, "the resync", |c| web_ips(c) == ["10.244.1.12"]).await;
    assert!(update.snapshot, "a new stream starts with a snapshot");
    assert_eq!(
        after.resources.len(),
        before.resources.len(),
        "no duplicate state"
    );
    assert_eq!(
        std::fs::read_to_string(f.state.path().join("ca/ca.pem")).unwrap(),
        root,
        "root changed on restart"
    );
    assert_eq!(control.state.nodes()["n1"].streams, 1);
}

#[tokio::test]
async fn identities_are_issued_for_local_accounts_and_renewed_at_half_life() {
    use std::collections::BTreeSet;
    use tokio::sync::watch;
    use trellis_agent::identity::{Svids, manage};

    let f = Fixture::new();
    let control = f.start_with_ttl(0, Duration::from_secs(4)).await;
    let web = "spiffe://cluster.local/ns/shop/sa/web".to_string();
    let reviews = "spiffe://cluster.local/ns/shop/sa/reviews".to_string(); // runs on n2, not n1
    let (wanted_tx, wanted) = watch::channel(BTreeSet::from([web.clone(), reviews.clone()]));
    let (svids_tx, mut svids) = watch::channel(Svids::new());
    tokio::spawn(manage(
        f.endpoint(control.addr),
        "n1".into(),
        wanted,
        svids_tx,
    ));
    async fn wait(
        rx: &mut watch::Receiver<Svids>,
        what: &str,
        pred: impl Fn(&Svids) -> bool,
    ) -> Svids {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| pred(s)))
            .await
            .unwrap_or_else(|_| panic!("never: {what}"))
            .unwrap()
            .clone()
    }

    let first = wait(&mut svids, "web's certificate", |s| s.contains_key(&web)).await[&web].clone();
    let root = std::fs::read_to_string(f.state.path().join("ca/ca.pem")).unwrap();
    assert_eq!(first.root_pem, root);
    let (_, leaf) = x509_parser::pem::parse_x509_pem(first.cert_chain_pem.as_bytes()).unwrap();
    let (_, ca) = x509_parser::pem::parse_x509_pem(root.as_bytes()).unwrap();
    let (leaf, ca) = (leaf.parse_x509().unwrap(), ca.parse_x509().unwrap());
    leaf.verify_signature(Some(ca.public_key()))
        .expect("signed by the mesh root");
    assert!(
        first.key_pem.contains("PRIVATE KEY"),
        "the key stays on the node"
    );

    // Renewed at half life (4 s certificates: after about 2 s), before the old one expires.
    let renewed = wait(&mut svids, "a renewal", |s| {
        s.get(&web)
            .is_some_and(|c| c.cert_chain_pem != first.cert_chain_pem)
    })
    .await[&web]
        .clone();
    let now = std::time::SystemTime::now();
    assert!(
        now >= first.renew_at() && now < first.not_after,
        "renewed outside [half life, expiry)"
    );
    assert!(renewed.not_after > first.not_after);
    assert!(
        !svids.borrow().contains_key(&reviews),
        "an identity with no pod on n1 got a certificate"
    );

    // An identity no longer wanted is dropped.
    wanted_tx.send_replace(BTreeSet::from([reviews.clone()]));
    wait(&mut svids, "web dropped", |s| !s.contains_key(&web)).await;
}

/// The text of control's `/metrics`.
async fn scrape(control: &Control) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = control.metrics_addr.expect("metrics served");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: control\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of one sample (`name{labels}`) in a scrape; 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The hostile tester's VirtualService: weights whose sum overflows 32 bits. It used to panic
/// the source task and stop all config; now it is refused, and everything else keeps flowing.
#[tokio::test]
async fn an_overflowing_virtual_service_is_refused_and_other_config_keeps_flowing() {
    let f = Fixture::new();
    let control = f.start(0).await;
    let mut n1 = subscribe(f.endpoint(control.addr), "n1");
    until(&mut n1, "the snapshot", |c| c.workloads().count() == 1).await;
    let vs = |name: &str, route: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  hosts: [reviews]\n  http:\n  - route: [{route}]\n"
        )
    };
    let good = "{destination: {host: reviews}, weight: 100}";
    f.write("routes.yaml", &vs("reviews", good));
    until(&mut n1, "the good VirtualService", |c| {
        c.policies().count() == 1
    })
    .await;

    let hostile = "{destination: {host: reviews, subset: a}, weight: 2147483647}, \
                   {destination: {host: reviews, subset: b}, weight: 2147483647}, \
                   {destination: {host: reviews, subset: c}, weight: 102}";
    f.write("routes.yaml", &vs("reviews", hostile));
    let mut errors = control.source_errors.clone();
    let e = tokio::time::timeout(Duration::from_secs(10), errors.wait_for(|e| !e.is_empty()))
        .await
        .expect("the VirtualService is refused")
        .unwrap()
        .join("\n");
    assert!(
        e.contains(
            "routes.yaml: document 1 (VirtualService shop/reviews): spec.http[0].route[0].weight: \
             2147483647 is not 0 to 100"
        ),
        "{e}"
    );

    // Other objects still reach the node, and the refused one keeps its last good version.
    f.write("shop.yaml", &shop(&["10.244.1.12"], ""));
    f.write("more.yaml", &vs("reviews-too", good));
    let (_, config) = until(&mut n1, "the other changes", |c| {
        web_ips(c) == ["10.244.1.12"] && c.policies().count() == 2
    })
    .await;
    let reviews = config
        .policies()
        .find(|p| p.name == "reviews")
        .expect("last good kept");
    assert!(
        reviews.spec_json.contains("\"weight\":100"),
        "{}",
        reviews.spec_json
    );
    let metrics = scrape(&control).await;
    assert_eq!(
        sample(&metrics, "trellis_control_objects_rejected"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "trellis_control_source_restarts_total{source=\"dir\"}"
        ),
        0.0,
        "{metrics}"
    );

    // Fixing the file recovers; deleting it removes the object.
    f.write(
        "routes.yaml",
        &vs("reviews", "{destination: {host: reviews}, weight: 60}, {destination: {host: reviews}, weight: 40}"),
    );
    until(&mut n1, "the fixed VirtualService", |c| {
        c.policies()
            .any(|p| p.name == "reviews" && p.spec_json.contains("\"weight\":60"))
    })
    .await;
    assert_eq!(*control.source_errors.borrow(), Vec::<String>::new());
    std::fs::remove_file(f.yaml.path().join("routes.yaml")).unwrap();
    until(&mut n1, "the VirtualService removed", |c| {
        c.policies().all(|p| p.name != "reviews")
    })
    .await;
    assert_eq!(
        sample(&scrape(&control).await, "trellis_control_objects_rejected"),
        0.0
    );
}

/// Loose input the hostile tester found accepted is refused, each with the field named.
#[tokio::test]
async fn names_and_labels_are_checked_as_kubernetes_does() {
    let f = Fixture::new();
    let control = f.start(0).await;
    let cases = [
        (
            "subset.yaml",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\n\
             spec: {host: reviews, subsets: [{name: version one, labels: {version: v1}}]}\n",
            "subsets[0].name: \"version one\" is not a DNS-1123 label",
        ),
        (
            "key.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: shop, labels: {\"bad label!!/=x\": a}}\n",
            "metadata.labels: label key \"bad label!!/=x\"",
        ),
        (
            "value.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: shop, labels: {app: \"a\\0b\"}}\n",
            "metadata.labels: label value \"a\\0b\"",
        ),
        (
            "weight.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: w, namespace: shop}\n\
             spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}, weight: 150}]}]}\n",
            "spec.http[0].route[0].weight: 150 is not 0 to 100",
        ),
    ];
    for (file, yaml, _) in &cases {
        f.write(file, yaml);
    }
    let many = vec!["apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"; 1025].join("---\n");
    f.write("many.yaml", &many);
    let mut errors = control.source_errors.clone();
    let errors = tokio::time::timeout(
        Duration::from_secs(10),
        errors.wait_for(|e| e.len() == cases.len() + 1),
    )
    .await
    .unwrap_or_else(|_| panic!("errors: {:?}", control.source_errors.borrow()))
    .unwrap()
    .clone();
    for (file, _, want) in cases {
        assert!(
            errors.iter().any(|e| e.contains(file) && e.contains(want)),
            "{want} in {errors:#?}"
        );
    }
    assert!(
        errors.iter().any(|e| e.contains("many.yaml")
            && e.contains("file has more than 1024 documents (the limit; split it)")),
        "{errors:#?}"
    );
}

/// A cluster big enough to need several messages per update, and a VirtualService of about
/// 6 MB (with its routes compiled into its service, over the 4 MiB gRPC default on its own):
/// three nodes, each following control with the agent's real client, get all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_cluster_and_a_6_mb_virtual_service_reach_every_node() {
    const PODS: usize = 10_000;
    const SERVICES: usize = 1_000;
    const PER_FILE: usize = 500;
    let started = std::time::Instant::now();
    let f = Fixture::new();
    for file in 0..PODS / PER_FILE {
        let pods: Vec<String> = (file * PER_FILE..(file + 1) * PER_FILE)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: p-{i}, namespace: shop, labels: {{app: svc-{}}}}}\n\
                     spec: {{nodeName: n{}, serviceAccountName: sa-{}, containers: []}}\n\
                     status: {{podIP: 10.{}.{}.{}}}\n",
                    i % SERVICES,
                    i % 3 + 1,
                    i % 50,
                    100 + i / 65536,
                    (i / 256) % 256,
                    i % 256
                )
            })
            .collect();
        f.write(&format!("pods-{file}.yaml"), &pods.join("---\n"));
    }
    let services: Vec<String> = (0..SERVICES)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: shop}}\n\
                 spec: {{clusterIP: 10.96.{}.{}, selector: {{app: svc-{i}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    f.write("services.yaml", &services.join("---\n"));
    const ROUTES: usize = 3_000;
    let value = "v".repeat(2_000);
    let mut vs = String::from(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: big, namespace: shop}\n\
         spec:\n  hosts: [svc-0]\n  http:\n",
    );
    for i in 0..ROUTES {
        vs.push_str(&format!(
            "  - match: [{{headers: {{x-route: {{exact: \"{i}-{value}\"}}}}}}]\n    route: [{{destination: {{host: svc-0}}}}]\n"
        ));
    }
    assert!(vs.len() > 6_000_000, "{} bytes", vs.len());
    f.write("big-vs.yaml", &vs);
    let written = started.elapsed();

    let control = f.start(0).await;
    let nodes = ["n1", "n2", "n3"];
    let mut followers: Vec<_> = nodes
        .iter()
        .map(|n| subscribe(f.endpoint(control.addr), n))
        .collect();
    let complete = |c: &trellis_agent::config::NodeConfig| {
        c.services().count() == SERVICES + 1 // and shop/reviews
            && c.workloads().count() + c.peers().count() == PODS + 2 // and web, reviews-v1
            && c.services().any(|s| {
                s.name == "svc-0" && s.ports[0].http_routes.len() == ROUTES && s.endpoints.len() == 10
            })
            && c.policies().any(|p| p.name == "big" && p.spec_json.len() > 6_000_000)
    };
    for (node, rx) in nodes.iter().zip(&mut followers) {
        let wait = async {
            loop {
                let (update, config) = rx.recv().await.expect("follower stopped");
                if complete(&config) {
                    return (update, config);
                }
            }
        };
        let (update, config) = tokio::time::timeout(Duration::from_secs(50), wait)
            .await
            .unwrap_or_else(|_| panic!("{node} never got the whole config"));
        assert!(update.snapshot);
        assert!(config.workloads().all(|w| w.node == *node));
    }
    let delivered = started.elapsed();

    let metrics = scrape(&control).await;
    let mut report = Vec::new();
    for node in nodes {
        let labels = format!("{{node=\"{node}\"}}");
        let messages = sample(
            &metrics,
            &format!("trellis_control_config_messages_total{labels}"),
        );
        let bytes = sample(
            &metrics,
            &format!("trellis_control_config_bytes_total{labels}"),
        );
        let largest = sample(
            &metrics,
            &format!("trellis_control_config_largest_message_bytes{labels}"),
        );
        assert!(messages > 3.0, "{node}: {messages} messages");
        assert!(
            largest > 4_194_304.0 && largest < api::MAX_MESSAGE_BYTES as f64,
            "{node}: largest message {largest}"
        );
        assert_eq!(
            sample(
                &metrics,
                &format!("trellis_control_undeliverable_resources{labels}")
            ),
            0.0
        );
        report.push(format!(
            "{node}: {messages} messages, {:.1} MB, largest {:.1} MB",
            bytes / 1e6,
            largest / 1e6
        ));
    }

    // Incremental updates still flow, and small: one pod's IP.
    f.write("shop.yaml", &shop(&["10.244.1.13"], ""));
    let (update, _) = until(&mut followers[0], "web's new IP", |c| {
        web_ips(c) == ["10.244.1.13"]
    })
    .await;
    assert!(!update.snapshot);
    let total = started.elapsed();
    eprintln!(
        "files written in {written:?}; every node complete after {delivered:?}; incremental after {total:?}\n{}",
        report.join("\n")
    );
    assert!(total < Duration::from_secs(60), "took {total:?}");
}
