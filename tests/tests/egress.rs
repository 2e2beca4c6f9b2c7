//! End-to-end tests of the outbound traffic policy on the real kernel: under REGISTRY_ONLY a
//! meshed pod's connects (and UDP sends) to addresses the mesh does not know fail with EPERM in
//! the connect and sendmsg programs, before any packet; registered destinations, open
//! connections and DNS are unaffected; an agent restart never opens a window.
mod shop;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::Duration,
};

use shop::*;
use trellis_e2e::{Pod, node::binary};

fn shop_namespace(mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{trellis.dev/mesh: enabled, \
         trellis.dev/outbound-traffic-policy: {mode}}}}}\n"
    )
}

/// The connect failed in the kernel (EPERM), not on the network.
fn refused_in_kernel(out: &serde_json::Value) -> bool {
    out["error"]
        .as_str()
        .is_some_and(|e| e.contains("not permitted"))
}

fn udp(pod: &Pod, to: SocketAddr) -> serde_json::Value {
    let mut cmd = Command::new(binary("trellis-loadgen"));
    cmd.args(["udp-send", &to.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = pod.spawn_app(&mut cmd).unwrap().wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("udp-send: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn registry_only_refuses_unregistered_destinations_in_the_kernel_and_survives_a_restart() {
    let mut shop = Shop::start();
    // The outsider (namespace legacy, no Service) is not in the mesh registry.
    shop.outsider.serve(8080);
    let unregistered = addr(shop.outsider.ip4, 8080);
    let unregistered6 = addr(shop.outsider.ip6, 8080);
    let out = shop.client.connect(unregistered, "hi");
    assert_eq!(out["echo"], "hi", "ALLOW_ANY (the default): {out}");
    assert_eq!(udp(&shop.client, unregistered)["send_to"], "ok");

    // Switched on while traffic flows: held connections to a Service stay up.
    let held = churn(&shop.client, shop.vip(7000), 3, 5);
    std::thread::sleep(Duration::from_millis(1000));
    shop.control
        .write("ns-shop.yaml", &shop_namespace("REGISTRY_ONLY"));
    let took = shop.eventually("REGISTRY_ONLY in force", || {
        refused_in_kernel(&shop.client.connect(unregistered, "hi"))
    });
    println!("REGISTRY_ONLY in force {took:?} after the namespace label was written");
    let report = report(held);
    assert_eq!(report["lost"], 0, "{report}");
    let failed_probes = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[1] != true)
        .count();
    assert_eq!(
        failed_probes, 0,
        "new connections to the Service failed: {report}"
    );

    // Registered: the Service, the mesh pod by address (both families).
    for to in [
        shop.vip(80),
        addr(shop.server.ip4, 8080),
        addr(shop.server.ip6, 8080),
    ] {
        let out = shop.client.connect(to, "ok");
        assert_eq!(out["echo"], "ok", "{to}: {out}\n{}", shop.logs());
    }
    // Unregistered, both families; UDP with and without connect; DNS still goes anywhere.
    let out = shop.client.connect(unregistered6, "hi");
    assert!(refused_in_kernel(&out), "{out}");
    let out = udp(&shop.client, unregistered);
    assert!(
        out["send_to"].as_str().unwrap().contains("not permitted")
            && out["connect"].as_str().unwrap().contains("not permitted"),
        "{out}"
    );
    let out = udp(&shop.client, addr(shop.outsider.ip4, 53));
    assert_eq!(
        (&out["send_to"], &out["connect"]),
        (&"ok".into(), &"ok".into()),
        "{out}"
    );
    // Only the labelled namespace: the outsider's own pod is not held to it.
    let out = shop.outsider.connect(addr(shop.client.ip4, 8080), "x");
    assert_eq!(out["echo"], "x", "{out}");

    // Counted per pod, shown on the admin endpoint and logged.
    shop.agents[0].wait_log("the refusals", |v| {
        v["message"] == "egress refused in the kernel: not in the mesh registry (REGISTRY_ONLY)"
            && v["pod"] == "shop/client"
    });
    // Read by the agent every half second: the fourth refusal may not be counted yet.
    shop.eventually("the refusals on /pods", || {
        shop.agents[0].pods().iter().any(|p| {
            p["name"] == "client"
                && p["registry_only"] == true
                && p["egress_refused"].as_u64().is_some_and(|n| n >= 4)
        })
    });
    let m = metrics(&shop.cluster.nodes[0]);
    let n = sample(
        &m,
        "trellis_egress_refused_total",
        &[("pod", "shop/client")],
    );
    assert!(n.is_some_and(|n| n >= 4.0), "{m}");

    // A registry change reaches the kernel: a ServiceEntry for the outsider's address.
    shop.control.write(
        "se.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: legacy-box, namespace: shop}}\n\
             spec: {{hosts: [legacy.example], addresses: [\"{}/32\"], ports: [{{number: 8080, name: tcp, protocol: TCP}}], \
             location: MESH_EXTERNAL, resolution: STATIC, endpoints: [{{address: \"{}\"}}]}}\n",
            shop.outsider.ip4, shop.outsider.ip4
        ),
    );
    shop.eventually("the ServiceEntry's address registered", || {
        shop.client.connect(unregistered, "se")["echo"] == "se"
    });
    assert!(refused_in_kernel(&shop.client.connect(unregistered6, "hi")));
    shop.control.remove("se.yaml");
    shop.eventually("the ServiceEntry gone", || {
        refused_in_kernel(&shop.client.connect(unregistered, "hi"))
    });

    // The agent dies and restarts: at no moment does an unregistered connect get through.
    let stop = AtomicBool::new(false);
    let (tried, through) = (AtomicU32::new(0), AtomicU32::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) && tried.load(Ordering::Relaxed) < 100_000 {
                let out = shop.client.connect(unregistered, "sneak");
                tried.fetch_add(1, Ordering::Relaxed);
                if !refused_in_kernel(&out) {
                    through.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        shop.agents[0].kill9();
        std::thread::sleep(Duration::from_millis(700));
        shop.agents[0].restart();
        shop.agents[0].wait_pod_state(&shop.client, "enrolled");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    println!(
        "{} connects to an unregistered address across the restart, {} got through",
        tried.load(Ordering::Relaxed),
        through.load(Ordering::Relaxed)
    );
    assert!(tried.load(Ordering::Relaxed) >= 10);
    assert_eq!(through.load(Ordering::Relaxed), 0, "{}", shop.logs());

    // Off again: ALLOW_ANY.
    shop.control
        .write("ns-shop.yaml", &shop_namespace("ALLOW_ANY"));
    shop.eventually("ALLOW_ANY back", || {
        shop.client.connect(unregistered, "free")["echo"] == "free"
    });
    assert_eq!(udp(&shop.client, unregistered)["send_to"], "ok");
}

#[test]
fn the_mesh_wide_outbound_policy_and_root_namespace_are_control_flags() {
    let shop = Shop::start_on(
        2,
        &[
            "--outbound-traffic-policy",
            "REGISTRY_ONLY",
            "--root-namespace",
            "mesh-root",
        ],
    );
    // No label anywhere: the flag's REGISTRY_ONLY holds.
    shop.eventually("REGISTRY_ONLY from the flag", || {
        refused_in_kernel(&shop.client.connect(addr(shop.outsider.ip4, 8080), "hi"))
    });
    let out = shop.client.connect(shop.vip(80), "ok");
    assert_eq!(out["echo"], "ok", "{out}");
    // The root namespace's label overrides the flag for every namespace without one.
    shop.outsider.serve(8080);
    shop.control.write(
        "ns-root.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh-root, labels: {trellis.dev/outbound-traffic-policy: ALLOW_ANY}}\n",
    );
    shop.eventually("ALLOW_ANY from the root namespace's label", || {
        shop.client.connect(addr(shop.outsider.ip4, 8080), "hi")["echo"] == "hi"
    });
    // A selector-less policy in the root namespace applies mesh-wide.
    shop.control.write(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-echo, namespace: mesh-root}\n\
         spec: {action: DENY, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}\n",
    );
    shop.eventually("the root namespace's DENY", || {
        shop.client.connect(shop.vip(80), "ok")["echo"] != "ok"
    });
}
