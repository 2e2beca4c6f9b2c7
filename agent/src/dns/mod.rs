//! DNS for enrolled pods: the kernel steers their UDP queries (and the outbound proxy their TCP
//! ones) here; names the mesh knows (Services, ServiceEntry hosts) are answered with their
//! virtual addresses, everything else is forwarded to the resolver the pod asked.
mod serve;

use std::{collections::HashMap, net::IpAddr};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};

pub use serve::{resolve, serve_tcp, serve_udp};

/// How long a pod may cache a mesh answer: short, so a changed VIP is seen soon.
const TTL: u32 = 30;

/// The Kubernetes cluster domain that Service host names end in.
const CLUSTER_SUFFIX: &str = "svc.cluster.local";

/// Mesh host names (lower case, no trailing dot) and their virtual addresses, with the
/// namespaces a ServiceEntry host is exported to (none listed: every namespace).
#[derive(Debug, Default, serde::Serialize)]
pub struct Names {
    ips: HashMap<String, Vec<IpAddr>>,
    export_to: HashMap<String, Vec<String>>,
}

impl Names {
    /// Adds `ip` to `host`'s addresses.
    pub fn add(&mut self, host: &str, ip: IpAddr) {
        let ips = self.ips.entry(host.to_owned()).or_default();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }

    /// Only pods in `namespaces` see `host` (empty: all do).
    pub fn export(&mut self, host: &str, namespaces: &[String]) {
        if !namespaces.is_empty() {
            self.export_to.insert(host.to_owned(), namespaces.to_vec());
        }
    }

    /// `host`'s addresses, if a pod in `ns` sees it.
    pub fn get(&self, host: &str, ns: &str) -> Option<&Vec<IpAddr>> {
        let visible = self
            .export_to
            .get(host)
            .is_none_or(|to| to.iter().any(|n| n == ns));
        self.ips.get(host).filter(|_| visible)
    }
}

impl<const N: usize> From<[(String, Vec<IpAddr>); N]> for Names {
    fn from(names: [(String, Vec<IpAddr>); N]) -> Self {
        Self {
            ips: names.into(),
            export_to: HashMap::new(),
        }
    }
}

/// What to do with one DNS message from a pod.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Send this answer (for a mesh name) back.
    Answer(Vec<u8>),
    /// Send this FORMERR back: the message did not parse.
    FormErr(Vec<u8>),
    /// Not a mesh name: ask the pod's resolver.
    Forward,
    /// Not a query we can answer at all (too short to carry an id, or itself a response).
    Drop,
}

/// Answers `query` from a pod in namespace `ns` if it asks for a mesh name.
pub fn answer(query: &[u8], ns: &str, names: &Names) -> Reply {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        // The id is the first two bytes: a client that sent a header gets a FORMERR it can match.
        Err(_) if query.len() >= 12 => {
            let id = u16::from_be_bytes([query[0], query[1]]);
            let err = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return err.to_vec().map_or(Reply::Drop, Reply::FormErr);
        }
        Err(_) => return Reply::Drop,
    };
    if msg.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    let [q] = msg.queries.as_slice() else {
        return Reply::Forward;
    };
    if msg.metadata.op_code != OpCode::Query {
        return Reply::Forward;
    }
    let name = q.name().to_ascii().to_ascii_lowercase();
    let Some(ips) = lookup(name.trim_end_matches('.'), ns, names) else {
        return Reply::Forward;
    };
    let mut out = Message::response(msg.metadata.id, OpCode::Query);
    out.metadata.authoritative = true;
    out.metadata.recursion_desired = msg.metadata.recursion_desired;
    out.metadata.recursion_available = true;
    out.add_query(q.clone());
    // Other record types of a mesh name get an empty answer (NODATA), as for any name with
    // only addresses.
    for ip in ips {
        let rdata = match (ip, q.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        out.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
    }
    out.to_vec().map_or(Reply::Drop, Reply::Answer)
}

/// The first nameserver of this host's /etc/resolv.conf, on port 53.
pub fn system_resolver() -> Option<std::net::SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines().find_map(|l| {
        let ip: IpAddr = l.strip_prefix("nameserver")?.trim().parse().ok()?;
        Some((ip, 53).into())
    })
}

/// A name as a pod in `ns` may write it: the host itself, or a Service's short forms (`name`,
/// `name.ns`, `name.ns.svc`), which a resolver without the cluster's search path sends as is.
fn lookup<'a>(name: &str, ns: &str, names: &'a Names) -> Option<&'a Vec<IpAddr>> {
    if let Some(ips) = names.get(name, ns) {
        return Some(ips);
    }
    let full = match name.split('.').count() {
        1 => format!("{name}.{ns}.{CLUSTER_SUFFIX}"),
        2 => format!("{name}.{CLUSTER_SUFFIX}"),
        3 if name.ends_with(".svc") => format!("{name}.cluster.local"),
        _ => return None,
    };
    names.get(&full, ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{op::Query, rr::Name};

    fn names() -> Names {
        Names::from([
            (
                "web.shop.svc.cluster.local".into(),
                vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ),
            (
                "redis.memorystore.example".into(),
                vec!["240.240.0.1".parse().unwrap()],
            ),
        ])
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn ips(reply: Reply) -> Vec<String> {
        let Reply::Answer(bytes) = reply else {
            panic!("not answered: {reply:?}");
        };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn answers_every_form_of_a_service_name_from_the_pods_namespace() {
        let n = names();
        for name in [
            "web",
            "web.shop",
            "web.shop.svc",
            "web.shop.svc.cluster.local.",
            "WEB.Shop.svc.cluster.local",
        ] {
            assert_eq!(
                ips(answer(&query(name, RecordType::A), "shop", &n)),
                ["10.96.0.10"],
                "{name}"
            );
        }
        assert_eq!(
            ips(answer(&query("web.shop", RecordType::AAAA), "other", &n)),
            ["fd00::10"]
        );
        // Another namespace's short name is not this one's.
        assert_eq!(
            answer(&query("web", RecordType::A), "other", &n),
            Reply::Forward
        );
        // A mesh name's other record types: no data, no forwarding.
        assert!(ips(answer(&query("web", RecordType::MX), "shop", &n)).is_empty());
    }

    #[test]
    fn answers_service_entry_hosts_and_forwards_the_rest() {
        let n = names();
        assert_eq!(
            ips(answer(
                &query("redis.memorystore.example.", RecordType::A),
                "shop",
                &n
            )),
            ["240.240.0.1"]
        );
        assert_eq!(
            answer(&query("example.com.", RecordType::A), "shop", &n),
            Reply::Forward
        );
        // A search-path expansion of an external name is not a mesh name.
        assert_eq!(
            answer(
                &query(
                    "redis.memorystore.example.shop.svc.cluster.local.",
                    RecordType::A
                ),
                "shop",
                &n
            ),
            Reply::Forward
        );
    }

    #[test]
    fn malformed_messages_get_formerr_or_nothing() {
        let n = names();
        assert_eq!(answer(&[1, 2, 3], "shop", &n), Reply::Drop);
        let mut junk = vec![0xab, 0xcd];
        junk.extend([0xff; 30]);
        let Reply::FormErr(bytes) = answer(&junk, "shop", &n) else {
            panic!("a header-sized message gets FORMERR");
        };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0xabcd, ResponseCode::FormErr)
        );
        // A response sent to us is not answered (no reflection loops).
        let mut resp = Message::response(1, OpCode::Query);
        resp.add_query(Query::query(
            Name::from_ascii("web").unwrap(),
            RecordType::A,
        ));
        assert_eq!(answer(&resp.to_vec().unwrap(), "shop", &n), Reply::Drop);
    }

    #[test]
    fn a_host_exported_to_some_namespaces_is_answered_only_there() {
        let mut n = names();
        n.export("redis.memorystore.example", &["billing".to_owned()]);
        assert_eq!(
            ips(answer(
                &query("redis.memorystore.example", RecordType::A),
                "billing",
                &n
            )),
            ["240.240.0.1"]
        );
        assert_eq!(
            answer(
                &query("redis.memorystore.example", RecordType::A),
                "shop",
                &n
            ),
            Reply::Forward
        );
        // No list: every namespace.
        n.export("web.shop.svc.cluster.local", &[]);
        assert!(!ips(answer(&query("web.shop", RecordType::A), "billing", &n)).is_empty());
    }
}
