//! The agent's DNS for enrolled pods, on the real kernel: queries to the pod's resolver (a real
//! dnsmasq outside the mesh) are steered to the agent, which answers mesh names itself and
//! forwards the rest from the pod's own network namespace; the answers look as if the resolver
//! sent them, to dig, to glibc and to an unconnected `sendto` socket.
mod shop;

use std::process::{Command, Stdio};

use shop::{Shop, addr, metrics, sample};
use trellis_e2e::outside::{Dnsmasq, dig, resolv_conf, with_resolv_conf};
use trellis_e2e::{Pod, node::binary};

fn loadgen(pod: &Pod, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(binary("trellis-loadgen"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = pod.spawn_app(&mut cmd).unwrap().wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "loadgen {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// glibc's resolver (`getent ahostsv4`) in `pod` with `resolv_conf`: the first address.
fn getent(pod: &Pod, resolv_conf: &str, name: &str) -> String {
    let out = with_resolv_conf(pod, resolv_conf, &format!("getent ahostsv4 {name}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn enrolled_pods_get_mesh_names_from_the_agent_and_the_rest_from_their_resolver() {
    let shop = Shop::start();
    let dns = Dnsmasq::start(&shop.outsider);
    let (c, r4, r6) = (
        &shop.client,
        shop.outsider.ip4.to_string(),
        shop.outsider.ip6.to_string(),
    );
    let at4 = format!("@{r4}");
    let at6 = format!("@{r6}");

    // Outside the mesh, the resolver knows no Service names.
    assert_eq!(
        dig(&shop.outsider, &[&at4, "server.shop.svc.cluster.local"]),
        ""
    );

    // Every form of the Service's name, from the client's namespace, over UDP to an IPv4 and
    // an IPv6 resolver and over TCP: answered by the agent with the VIP.
    for name in [
        "server",
        "server.shop",
        "server.shop.svc",
        "server.shop.svc.cluster.local.",
    ] {
        for args in [
            vec![&at4[..], name],
            vec![&at6[..], name],
            vec![&at4[..], "+tcp", name],
        ] {
            assert_eq!(dig(c, &args), shop::VIP, "{args:?}\n{}", shop.logs());
        }
    }
    // Names outside the mesh are forwarded, over UDP and TCP, from the pod's own address.
    assert_eq!(dig(c, &[&at4, "external.example"]), "192.0.2.10");
    assert_eq!(dig(c, &[&at6, "AAAA", "external.example"]), "2001:db8::10");
    assert_eq!(
        dig(c, &[&at4, "+tcp", "www.external.example"]),
        "192.0.2.10"
    );
    let log = dns.log();
    assert!(
        log.contains(&format!("query[A] external.example from {}", c.ip4))
            && log.contains(&format!("query[AAAA] external.example from {}", c.ip6))
            && log.contains(&format!("query[A] www.external.example from {}", c.ip4)),
        "dnsmasq did not see the forwarded queries from the client pod:\n{log}"
    );
    let leaked = |ip: String| {
        log.lines()
            .any(|l| l.contains("server.shop") && l.ends_with(&ip))
    };
    assert!(
        !leaked(c.ip4.to_string()) && !leaked(c.ip6.to_string()),
        "a mesh name reached the resolver:\n{log}"
    );

    // musl-style sendto on an unconnected socket: the answer's source is the resolver itself.
    let resolver = addr(shop.outsider.ip4, 53).to_string();
    let out = loadgen(c, &["dns-query", &resolver, "--name", "server.shop"]);
    assert_eq!(out["from"], resolver.as_str(), "{out}");
    assert_eq!(out["answers"], serde_json::json!([shop::VIP]), "{out}");
    let resolver6 = addr(shop.outsider.ip6, 53).to_string();
    let out = loadgen(
        c,
        &[
            "dns-query",
            &resolver6,
            "--name",
            "external.example",
            "--aaaa",
        ],
    );
    assert_eq!(out["from"], resolver6.as_str(), "{out}");
    assert_eq!(out["answers"], serde_json::json!(["2001:db8::10"]), "{out}");

    // glibc (connected socket, checks the answer's source) with a Kubernetes search path.
    let conf = resolv_conf(&r4, "shop");
    assert_eq!(getent(c, &conf, "server"), shop::VIP);
    assert_eq!(getent(c, &conf, "external.example"), "192.0.2.10");

    // Counted.
    let m = metrics(&shop.cluster.nodes[0]);
    let mesh = sample(&m, "trellis_dns_queries_total", &[("answer", "mesh")]).unwrap_or(0.0);
    let forwarded =
        sample(&m, "trellis_dns_queries_total", &[("answer", "forwarded")]).unwrap_or(0.0);
    assert!(mesh >= 14.0 && forwarded >= 5.0, "{m}");
}

#[test]
fn malformed_and_flooding_queries_leave_the_agent_answering_with_bounded_memory() {
    let shop = Shop::start();
    let _dns = Dnsmasq::start(&shop.outsider);
    let resolver = addr(shop.outsider.ip4, 53).to_string();
    let rss = || {
        let pid = shop.agents[0].pid().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    let before = rss();
    for seed in ["1", "2", "3"] {
        let out = loadgen(
            &shop.client,
            &[
                "dns-junk",
                &resolver,
                "--count",
                "3000",
                "--seed",
                seed,
                "--name",
                "server.shop",
            ],
        );
        assert_eq!(out["good_answered"], true, "{out}\n{}", shop.logs());
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 30 * 1024,
        "the agent grew by {grown} KiB on malformed DNS"
    );
    // Still answering, both ways.
    assert_eq!(
        dig(
            &shop.client,
            &[&format!("@{}", shop.outsider.ip4), "server.shop"]
        ),
        shop::VIP
    );
    assert_eq!(
        dig(
            &shop.client,
            &[&format!("@{}", shop.outsider.ip4), "external.example"]
        ),
        "192.0.2.10"
    );
    let m = metrics(&shop.cluster.nodes[0]);
    let malformed =
        sample(&m, "trellis_dns_queries_total", &[("answer", "malformed")]).unwrap_or(0.0);
    // Reached the agent and counted (a burst overflows the socket's buffer, so not every
    // datagram does: UDP drops what does not fit, here as anywhere).
    assert!(malformed >= 500.0, "{m}");
}

/// The shop namespace, in the mesh, with its outbound traffic policy.
fn registry_only_shop() -> String {
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/mesh: enabled, \
     trellis.dev/outbound-traffic-policy: REGISTRY_ONLY}}\n"
        .to_owned()
}

#[test]
fn service_entry_hosts_get_virtual_addresses_and_reach_their_endpoints_under_registry_only() {
    let shop = Shop::start();
    // The "managed Redis" outside the mesh: the outsider's echo server on 6379, named by the
    // resolver as redis.memorystore.example.
    shop.outsider.serve(6379);
    let dns = Dnsmasq::start_with(
        &shop.outsider,
        &[
            &format!("--address=/redis.memorystore.example/{}", shop.outsider.ip4),
            &format!("--address=/redis.memorystore.example/{}", shop.outsider.ip6),
        ],
    );
    let at = format!("@{}", shop.outsider.ip4);
    shop.control.write("ns-shop.yaml", &registry_only_shop());
    shop.control.write(
        "se.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: memorystore, namespace: shop}\n\
         spec: {hosts: [redis.memorystore.example], location: MESH_EXTERNAL, resolution: DNS, \
         ports: [{number: 6379, name: tcp-redis, protocol: TCP}]}\n",
    );
    let mut vip = String::new();
    shop.eventually(
        "the ServiceEntry host answered with a virtual address",
        || {
            vip = dig(&shop.client, &[&at, "redis.memorystore.example"]);
            vip.starts_with("240.240.")
        },
    );
    let vip6 = dig(&shop.client, &[&at, "AAAA", "redis.memorystore.example"]);
    assert!(vip6.starts_with("2001:2::"), "{vip6}");

    // By name (its virtual address): through the agent, which resolves the host with the pod's
    // resolver and connects from the pod's own address.
    for to in [
        addr(vip.parse::<std::net::Ipv4Addr>().unwrap(), 6379),
        addr(vip6.parse::<std::net::Ipv6Addr>().unwrap(), 6379),
    ] {
        let out = shop.client.connect(to, "PING");
        assert_eq!(
            out["echo"],
            "PING",
            "{to}: {out}\n{}\n{}",
            shop.logs(),
            dns.log()
        );
        assert_eq!(out["banner"]["server"], "outsider", "{out}");
        let peer = out["banner"]["peer"].as_str().unwrap();
        assert!(
            peer.contains(&shop.client.ip4.to_string())
                || peer.contains(&shop.client.ip6.to_string()),
            "{out}"
        );
    }
    // Straight to the address behind the name: not in the registry, refused in the kernel.
    let out = shop.client.connect(addr(shop.outsider.ip4, 6379), "PING");
    assert!(
        out["error"]
            .as_str()
            .is_some_and(|e| e.contains("not permitted")),
        "{out}"
    );

    let m = metrics(&shop.cluster.nodes[0]);
    let opened = sample(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_service", "redis.memorystore.example"),
            ("source_workload", "client"),
        ],
    );
    assert!(opened.is_some_and(|n| n >= 2.0), "{m}");

    // STATIC endpoints at an allocated address; the entry removed, its name is the resolver's
    // again (NXDOMAIN here) and its address routes nowhere.
    shop.control.write(
        "se.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: memorystore, namespace: shop}}\n\
             spec: {{hosts: [cache.internal.example], location: MESH_EXTERNAL, resolution: STATIC, \
             ports: [{{number: 7379, name: tcp-redis, targetPort: 6379}}], endpoints: [{{address: \"{}\"}}]}}\n",
            shop.outsider.ip4
        ),
    );
    let mut static_vip = String::new();
    shop.eventually("the STATIC entry's host answered", || {
        static_vip = dig(&shop.client, &[&at, "cache.internal.example"]);
        static_vip.starts_with("240.240.")
    });
    let out = shop.client.connect(
        addr(static_vip.parse::<std::net::Ipv4Addr>().unwrap(), 7379),
        "GET",
    );
    assert_eq!(out["echo"], "GET", "{out}");
    shop.control.remove("se.yaml");
    shop.eventually("the removed entry's name left the mesh", || {
        dig(&shop.client, &[&at, "cache.internal.example"]).is_empty()
    });

    // exportTo: another namespace's entry, exported only to its own, is neither answered nor
    // reachable from shop (REGISTRY_ONLY: refused by the proxy, as the kernel's registry is the
    // node's); exported to shop as well, it is both.
    let hidden = |export: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: hidden, namespace: billing}}\n\
             spec: {{hosts: [hidden.internal.example], addresses: [240.240.250.1], location: MESH_EXTERNAL, \
             resolution: STATIC, ports: [{{number: 7380, name: tcp-redis, targetPort: 6379}}], \
             endpoints: [{{address: \"{}\"}}], exportTo: [{export}]}}\n",
            shop.outsider.ip4
        )
    };
    let to = addr("240.240.250.1".parse::<std::net::Ipv4Addr>().unwrap(), 7380);
    shop.control.write("se-hidden.yaml", &hidden("\".\""));
    shop.eventually("the entry's address known to the node", || {
        shop.logs().contains("not exported to the pod's namespace")
            || shop.client.connect(to, "x")["echo"] == "x"
    });
    let out = shop.client.connect(to, "PING");
    assert!(
        out["echo"].is_null(),
        "reached a host not exported to shop: {out}"
    );
    assert!(
        shop.agents[0]
            .log_text()
            .contains("not exported to the pod's namespace"),
        "{}",
        shop.logs()
    );
    assert_eq!(dig(&shop.client, &[&at, "hidden.internal.example"]), "");
    shop.control.write("se-hidden.yaml", &hidden("\".\", shop"));
    shop.eventually("the entry exported to shop", || {
        dig(&shop.client, &[&at, "hidden.internal.example"]) == "240.240.250.1"
            && shop.client.connect(to, "PING")["echo"] == "PING"
    });
}
