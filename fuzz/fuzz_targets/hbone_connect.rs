//! HBONE CONNECT requests (agent/src/proxy/inbound.rs `connect_target`): the request is built
//! from raw pseudo-headers the way h2's server builds it, and a target is accepted only if it is
//! one of the pod's addresses on a port that is not the proxy's own.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use hyper::{
    Method, Request, StatusCode,
    http::uri::{Authority, Parts, PathAndQuery, Scheme},
};
use libfuzzer_sys::fuzz_target;
use trellis_agent::proxy::{Refused, connect_target};
use trellis_common::PROXY_PORTS;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: &'a [u8],
    authority: Option<&'a [u8]>,
    scheme: Option<&'a [u8]>,
    path: Option<&'a [u8]>,
    headers: Vec<(&'a [u8], &'a [u8])>,
    pod_v4: Vec<[u8; 4]>,
    pod_v6: Vec<[u8; 16]>,
    /// Aim at one of the pod's addresses, which random bytes rarely are.
    aim: Option<(u8, u16)>,
}

fuzz_target!(|input: Input| {
    let pod: Vec<IpAddr> = (input
        .pod_v4
        .iter()
        .map(|a| IpAddr::from(Ipv4Addr::from(*a))))
    .chain(
        input
            .pod_v6
            .iter()
            .map(|a| IpAddr::from(Ipv6Addr::from(*a))),
    )
    .collect();
    let authority = match (input.aim, pod.is_empty()) {
        (Some((i, port)), false) => Some(
            SocketAddr::new(pod[usize::from(i) % pod.len()], port)
                .to_string()
                .into_bytes(),
        ),
        _ => input.authority.map(<[u8]>::to_vec),
    };
    // As h2's server turns pseudo-headers into a request (h2 src/server.rs, `convert_poll_message`).
    let Ok(method) = Method::from_bytes(input.method) else {
        return;
    };
    let mut parts = Parts::default();
    if let Some(a) = authority {
        let Ok(a) = Authority::from_maybe_shared(a) else {
            return;
        };
        parts.authority = Some(a);
    }
    if let Some(s) = input.scheme {
        let Ok(s) = Scheme::try_from(s) else { return };
        if parts.authority.is_some() {
            parts.scheme = Some(s);
        }
    }
    if let Some(p) = input.path {
        let Ok(p) = PathAndQuery::try_from(p) else {
            return;
        };
        parts.path_and_query = Some(p);
    }
    let mut req = Request::builder().method(method).uri(parts);
    for (k, v) in &input.headers {
        req = req.header(*k, *v);
    }
    let Ok(req) = req.body(()) else { return };

    match connect_target(req.method(), req.uri(), &pod) {
        Ok(target) => {
            assert_eq!(req.method(), Method::CONNECT);
            assert!(pod.contains(&target.ip()), "{target} is not the pod's");
            assert!(
                !PROXY_PORTS.contains(&target.port()),
                "{target} is a proxy port"
            );
            let authority = req.uri().authority().expect("an authority").as_str();
            assert_eq!(authority.parse::<SocketAddr>().ok(), Some(target));
        }
        Err(refused) => {
            assert_ne!(refused.status(), StatusCode::OK);
            match refused {
                Refused::NotConnect => assert_ne!(req.method(), Method::CONNECT),
                Refused::NotThisPod(t) => assert!(!pod.contains(&t.ip())),
                Refused::ProxyPort(t) => assert!(PROXY_PORTS.contains(&t.port())),
                Refused::BadAuthority => {}
            }
        }
    }
});
