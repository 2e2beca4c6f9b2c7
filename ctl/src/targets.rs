//! Where the agents and control are: `--agent NODE=NETNS|HOST:PORT|local` and
//! `--control-metrics ADDR [--control-netns NETNS]`.
use std::{net::SocketAddr, path::PathBuf, str::FromStr};

use anyhow::{Result, bail};

use crate::fetch::{Endpoint, Forward, netns_path};

/// The agent's admin endpoint: localhost only, in the node's network namespace.
pub const ADMIN_PORT: u16 = 15000;
/// The agent's metrics, `/healthz` and `/readyz`.
pub const METRICS_PORT: u16 = 15020;

/// How one node's agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// From inside a network namespace (the node's): both ports on 127.0.0.1.
    Netns(PathBuf),
    /// From this process's own namespace: trellisctl runs on the node.
    Local,
    /// The metrics endpoint at an address; the admin endpoint is out of reach.
    Metrics(SocketAddr),
    /// Both endpoints through the API server, by port-forwards to the agent's pod (`--kube`).
    Pod(Forward),
}

/// One node's agent: `NODE=NETNS`, `NODE=local`, `NODE=HOST:PORT` (metrics only), or `NODE`
/// alone for a node whose network namespace has its name (the test harness's nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub node: String,
    pub reach: Reach,
}

impl FromStr for Agent {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (node, at) = s.split_once('=').unwrap_or((s, s));
        if node.is_empty() || at.is_empty() {
            bail!(
                "--agent {s:?}: expected NODE=NETNS, NODE=local or NODE=HOST:PORT (the agent's metrics port, 15020)"
            );
        }
        let reach = if at == "local" {
            Reach::Local
        } else if let Ok(addr) = at.parse() {
            Reach::Metrics(addr)
        } else if at.contains(':') {
            bail!(
                "--agent {s:?}: {at:?} is not HOST:PORT with an IP address (e.g. 10.0.0.1:15020)"
            );
        } else {
            Reach::Netns(netns_path(at))
        };
        Ok(Self {
            node: node.to_owned(),
            reach,
        })
    }
}

impl Agent {
    /// The agent on this host, named by its host name (the node name kubelet uses by default).
    pub fn local() -> Self {
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        Self {
            node,
            reach: Reach::Local,
        }
    }

    pub fn metrics(&self) -> Endpoint {
        let local = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
        match &self.reach {
            Reach::Netns(ns) => Endpoint::new(Some(ns.clone()), local),
            Reach::Local => Endpoint::new(None, local),
            Reach::Metrics(addr) => Endpoint::new(None, *addr),
            Reach::Pod(pod) => Endpoint::forwarded(pod.clone(), METRICS_PORT),
        }
    }

    /// The admin endpoint, or why it cannot be reached.
    pub fn admin(&self) -> Result<Endpoint> {
        let local = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
        match &self.reach {
            Reach::Netns(ns) => Ok(Endpoint::new(Some(ns.clone()), local)),
            Reach::Local => Ok(Endpoint::new(None, local)),
            Reach::Pod(pod) => Ok(Endpoint::forwarded(pod.clone(), ADMIN_PORT)),
            Reach::Metrics(addr) => bail!(
                "node {}'s admin endpoint listens on the node's localhost only, out of reach from \
                 {addr}: give --agent {0}=NETNS (the node's network namespace), or run trellisctl \
                 on the node with --agent {0}=local",
                self.node
            ),
        }
    }
}

/// The agents named on the command line; none: the one on this host.
pub fn agents(given: &[Agent]) -> Vec<Agent> {
    if given.is_empty() {
        vec![Agent::local()]
    } else {
        given.to_vec()
    }
}

/// `node`'s agent: the one `--agent` named so, else `node` read as an `--agent` value itself.
pub fn agent_for(node: &str, given: &[Agent]) -> Result<Agent> {
    match given.iter().find(|a| a.node == node) {
        Some(a) => Ok(a.clone()),
        None => node.parse(),
    }
}

/// Control's metrics endpoint (`/metrics`, `/healthz`, `/readyz`).
pub fn control(addr: SocketAddr, netns: Option<&str>) -> Endpoint {
    Endpoint::new(netns.map(netns_path), addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_values_name_how_to_reach_it() {
        let a: Agent = "n1=trl1x0".parse().unwrap();
        assert_eq!(a.node, "n1");
        assert_eq!(a.reach, Reach::Netns("/var/run/netns/trl1x0".into()));
        assert_eq!(a.metrics().addr.port(), METRICS_PORT);
        assert_eq!(a.admin().unwrap().addr.port(), ADMIN_PORT);

        let a: Agent = "trl1x0".parse().unwrap();
        assert_eq!(
            (a.node.as_str(), a.reach),
            ("trl1x0", Reach::Netns("/var/run/netns/trl1x0".into()))
        );

        let a: Agent = "n1=/proc/1/ns/net".parse().unwrap();
        assert_eq!(a.reach, Reach::Netns("/proc/1/ns/net".into()));

        let a: Agent = "n2=10.0.0.2:15020".parse().unwrap();
        assert_eq!(
            a.metrics(),
            Endpoint::new(None, "10.0.0.2:15020".parse().unwrap())
        );
        let e = a.admin().unwrap_err().to_string();
        assert!(
            e.contains("--agent n2=NETNS") && e.contains("n2=local"),
            "{e}"
        );

        assert_eq!("n3=local".parse::<Agent>().unwrap().reach, Reach::Local);
    }

    #[test]
    fn bad_agent_values_say_what_is_expected() {
        for bad in ["=x", "n1=", "n1=node:15020", "n1=10.0.0.1:99999"] {
            let e = bad.parse::<Agent>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_node_not_given_is_read_as_an_agent_value() {
        let given = vec!["n1=trl1x0".parse().unwrap()];
        assert_eq!(agent_for("n1", &given).unwrap(), given[0]);
        assert_eq!(
            agent_for("trl2x0", &given).unwrap().reach,
            Reach::Netns("/var/run/netns/trl2x0".into())
        );
    }
}
