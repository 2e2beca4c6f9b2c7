//! The original-destination tables' encoding (agent/src/redirect): any `ORIG_DST` value becomes
//! an address without panicking, and addresses survive the trip through the kernel's encoding
//! and the agent's keys, in both families and in the IPv4-mapped IPv6 form.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use trellis_agent::redirect::{conn_key, flow_key, ip_key, to_socket_addr};
use trellis_common::{AF_INET, AF_INET6, OrigDst, v4_mapped};

/// An address as a connect() might name it; `Mapped` is rare among random 16 bytes, so it is
/// asked for explicitly.
#[derive(Arbitrary, Debug)]
enum Addr {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
    Mapped([u8; 4], u16),
}

impl Addr {
    fn socket_addr(&self) -> SocketAddr {
        match *self {
            Addr::V4(ip, port) => SocketAddr::new(Ipv4Addr::from(ip).into(), port),
            Addr::V6(ip, port) => SocketAddr::new(Ipv6Addr::from(ip).into(), port),
            Addr::Mapped(ip, port) => {
                SocketAddr::new(Ipv4Addr::from(ip).to_ipv6_mapped().into(), port)
            }
        }
    }
}

/// What `connect4`/`connect6` store (ebpf/trellis-ebpf/src/outbound.rs).
fn kernel_orig_dst(a: SocketAddr) -> OrigDst {
    match a.ip() {
        IpAddr::V4(v4) => OrigDst {
            addr: v4_mapped(v4.octets()),
            port: a.port(),
            family: AF_INET,
        },
        IpAddr::V6(v6) => OrigDst {
            addr: v6.octets(),
            port: a.port(),
            family: AF_INET6,
        },
    }
}

fn check(u: &mut Unstructured) -> arbitrary::Result<()> {
    // Whatever the map holds.
    let raw = OrigDst {
        addr: u.arbitrary()?,
        port: u.arbitrary()?,
        family: u.arbitrary()?,
    };
    let a = to_socket_addr(&raw);
    assert_eq!(a.port(), raw.port);
    if raw.family == AF_INET {
        assert!(a.is_ipv4(), "{raw:?} gave {a}");
    } else {
        assert_eq!(a.ip(), IpAddr::V6(Ipv6Addr::from(raw.addr)), "{raw:?}");
    }

    let (client, dst): (Addr, Addr) = (u.arbitrary()?, u.arbitrary()?);
    let (client, dst) = (client.socket_addr(), dst.socket_addr());
    assert_eq!(to_socket_addr(&kernel_orig_dst(dst)), dst);

    for ip in [client.ip(), dst.ip()] {
        let key = ip_key(ip);
        assert_eq!(
            Ipv6Addr::from(key).to_canonical(),
            ip.to_canonical(),
            "{ip}"
        );
        // One key for an IPv4 address in either form.
        if let IpAddr::V4(v4) = ip.to_canonical() {
            assert_eq!(key, ip_key(IpAddr::V6(v4.to_ipv6_mapped())));
            assert_eq!(key, ip_key(IpAddr::V4(v4)));
        }
    }

    let flow = flow_key(client, dst);
    assert_eq!(
        (flow.src, flow.dst),
        (ip_key(client.ip()), ip_key(dst.ip()))
    );
    assert_eq!(
        (flow.src_port, flow.dst_port, flow._pad),
        (client.port(), dst.port(), 0)
    );

    let cookie = u.arbitrary()?;
    let conn = conn_key(cookie, client);
    let family = if client.is_ipv4() { AF_INET } else { AF_INET6 };
    assert_eq!(
        (conn.netns_cookie, conn.client_port, conn.family, conn._pad),
        (cookie, client.port(), family, 0)
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = check(&mut Unstructured::new(data));
});
