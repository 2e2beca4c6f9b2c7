//! The API server harness itself (`trellis_e2e::apiserver`): Debian's kube-apiserver 1.20.2 on
//! etcd takes the objects the Kubernetes tests rely on, keeps them across an API server restart,
//! and leaves nothing behind.
use std::{fs, net::TcpStream, path::Path};

use tempfile::TempDir;
use trellis_e2e::apiserver::{KubeApiServer, VERSION};

fn apply(api: &KubeApiServer, dir: &Path, name: &str, yaml: &str) {
    let file = dir.join(format!("{name}.yaml"));
    fs::write(&file, yaml).unwrap();
    api.kubectl(&["apply", "-f", &file.to_string_lossy()]);
}

fn get(api: &KubeApiServer, args: &[&str], jsonpath: &str) -> String {
    let mut all = vec!["get"];
    all.extend(args);
    let jsonpath = format!("jsonpath={jsonpath}");
    all.extend(["-o", &jsonpath]);
    api.kubectl(&all)
}

#[test]
fn objects_survive_an_apiserver_restart() {
    let mut api = KubeApiServer::start();
    let yaml = TempDir::new().unwrap();
    let version = api.kubectl(&["version", "-o", "json"]);
    assert!(
        version.contains(&format!(r#""gitVersion": "{VERSION}""#)),
        "server is not {VERSION}: {version}"
    );

    // No controller-manager runs, so nothing makes the namespace's default service account.
    apply(
        &api,
        yaml.path(),
        "objects",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: shop}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web, tier: front}}\n\
         spec: {nodeName: n1, automountServiceAccountToken: false, containers: [{name: app, image: demo}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {app: web}, ports: [{name: http, port: 8080}]}\n",
    );
    // What a kubelet would report; kubectl 1.24+ can patch the status subresource of a 1.20 server.
    api.kubectl(&[
        "patch",
        "pod",
        "web",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.244.1.10","podIPs":[{"ip":"10.244.1.10"}]}}"#,
    ]);
    api.kubectl(&["label", "pod", "web", "-n", "shop", "version=v1"]);

    let check = |api: &KubeApiServer| {
        assert_eq!(
            get(
                api,
                &["namespace", "shop"],
                "{.metadata.labels.trellis\\.dev/mesh}"
            ),
            "enabled"
        );
        assert_eq!(
            get(
                api,
                &["pod", "web", "-n", "shop"],
                "{.spec.nodeName} {.status.phase} {.status.podIP} {.metadata.labels.tier} {.metadata.labels.version}"
            ),
            "n1 Running 10.244.1.10 front v1"
        );
        let svc = get(
            api,
            &["service", "web", "-n", "shop"],
            "{.spec.clusterIP} {.spec.selector.app}",
        );
        assert!(
            svc.starts_with("10.96.") && svc.ends_with(" web"),
            "service: {svc}"
        );
    };
    check(&api);
    // The vendored reflect2 1.0.1 breaks map iteration under Go >= 1.18, which json-iterator
    // uses for YAML and pretty JSON responses (?pretty, or a curl/browser User-Agent); kubectl's
    // plain JSON goes through encoding/json and would not notice.
    let pretty = api.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/shop/pods/web?pretty=true",
    ]);
    assert!(
        pretty.contains(r#""tier": "front""#),
        "pretty JSON of a pod with labels: {pretty}"
    );
    let cluster_ip = get(&api, &["service", "web", "-n", "shop"], "{.spec.clusterIP}");

    api.restart_apiserver();
    check(&api);
    assert_eq!(
        get(&api, &["service", "web", "-n", "shop"], "{.spec.clusterIP}"),
        cluster_ip,
        "the service's cluster IP changed across the restart"
    );
    api.kubectl(&[
        "label",
        "pod",
        "web",
        "-n",
        "shop",
        "version=v2",
        "--overwrite",
    ]);
    assert_eq!(
        get(
            &api,
            &["pod", "web", "-n", "shop"],
            "{.metadata.labels.version}"
        ),
        "v2"
    );

    // Drop stops both processes and removes everything.
    let dir = api.kubeconfig_path().parent().unwrap().to_owned();
    let addr = api.server_url().trim_start_matches("https://").to_owned();
    drop(api);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        TcpStream::connect(&addr).is_err(),
        "kube-apiserver still listens on {addr}"
    );
}
