//! `cargo xtask demo`: one node, three pods, the real agent. `web` and `catalog` are enrolled,
//! `legacy` is not; web and legacy call catalog over IPv4 and IPv6, and the summary shows what
//! the capture layer did with each call.
use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail};
use trellis_e2e::{Agent, Node, Pod};

use crate::{cmd, setup};

pub fn run(once: bool) -> Result<()> {
    setup::run()?;
    cmd::require_root("cargo xtask demo")?;
    cmd::run(cmd::cargo().args(["build", "--bins"]))?;

    eprintln!("demo: creating a node (network namespace + bridge) with pods web, catalog, legacy");
    let node = Node::new(1);
    let web = node.add_pod("web");
    let catalog = node.add_pod("catalog");
    let legacy = node.add_pod("legacy");
    catalog.serve(8080);
    eprintln!(
        "demo: starting trellis-agent for node {} (web and catalog enrolled)",
        node.name
    );
    let agent = Agent::start(&node, &[&web, &catalog]);
    agent.wait_pod_state(&web, "enrolled");
    agent.wait_pod_state(&catalog, "enrolled");

    println!("\nTrellis demo: eBPF capture on node {}", node.name);
    println!(
        "  pins: /sys/fs/bpf/trellis/{}   cgroup root: {}",
        node.name,
        node.cgroup_root.display()
    );
    for (pod, enrolled) in [(&web, true), (&catalog, true), (&legacy, false)] {
        let state = if enrolled { "enrolled" } else { "not enrolled" };
        println!(
            "  pod {:<8} {:<13} {} / {}",
            pod.name, state, pod.ip4, pod.ip6
        );
    }
    println!();
    let mut failures = 0;
    for (from, ip) in [
        (&web, IpAddr::V4(catalog.ip4)),
        (&web, IpAddr::V6(catalog.ip6)),
        (&legacy, IpAddr::V4(catalog.ip4)),
    ] {
        let dst = SocketAddr::new(ip, 8080);
        match call(&agent, from, dst) {
            Ok(line) => println!("  {:<7} -> {dst:<24} {line}", from.name),
            Err(e) => {
                failures += 1;
                println!("  {:<7} -> {dst:<24} FAILED: {e:#}", from.name);
            }
        }
    }
    if failures > 0 {
        bail!("{failures} demo call(s) failed");
    }
    if !once {
        println!("\n  agent log: {}", agent.log_file().display());
        println!(
            "  admin: ip netns exec {} curl -s http://127.0.0.1:15000/pods",
            node.name
        );
        println!("\nUp. Press Ctrl-C to remove everything.");
        wait_for_signal();
    }
    eprintln!("demo: removing the agent's pins, pods and node");
    Ok(())
}

/// One call through the test app, described by what the agent reported for it.
fn call(agent: &Agent, from: &Pod, dst: SocketAddr) -> Result<String> {
    let inbound_lines = |agent: &Agent| {
        agent
            .captures()
            .iter()
            .filter(|(d, p, _, o)| {
                d == "inbound" && p.ends_with("/catalog") && o == &dst.to_string()
            })
            .count()
    };
    let inbound_before = inbound_lines(agent);
    let out = from.connect(dst, "hello");
    if out["echo"] != "hello" {
        bail!("no echo: {out}");
    }
    let local: SocketAddr = out["local"].as_str().unwrap_or_default().parse()?;
    let captures = agent.captures();
    let outbound = captures.iter().any(|(d, _, c, o)| {
        d == "outbound" && o == &dst.to_string() && c.ends_with(&format!(":{}", local.port()))
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while inbound_lines(agent) == inbound_before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let inbound = inbound_lines(agent) > inbound_before;
    let how = match (local.ip().is_loopback(), outbound) {
        (true, true) => "captured at web's 15001 (agent saw orig dst)",
        (true, false) => "redirected but the agent did not report it",
        (false, _) => "direct (not captured)",
    };
    Ok(format!(
        "{how}; {}; echo ok",
        if inbound {
            "catalog's 15006 took it inbound"
        } else {
            "no inbound capture yet"
        }
    ))
}

fn wait_for_signal() {
    // SAFETY: blocking SIGINT/SIGTERM on this thread, then waiting for one of them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}
