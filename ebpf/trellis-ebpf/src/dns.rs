//! DNS capture: an enrolled pod's UDP to port 53 goes to the agent on loopback:15053 in the
//! pod's netns; answers come back looking as if the pod's own resolver sent them.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use trellis_common::{
    AF_INET, AF_INET6, DNS_CAPTURE_PORT, DNS_PORT, OrigDst, POD_DNS4, POD_DNS6, v4_mapped,
};

use crate::{
    maps::{DNS_ORIG, DNS_RESOLVER},
    outbound::{Pod, capture_v4, capture_v6, dst4, dst6, set_ip4, set_ip6, set_port, v4_in_v6},
};

const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];

fn remember(ctx: &SockAddrContext, dst: &OrigDst) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Without the socket's record the answer could not be given the resolver's address.
    DNS_ORIG.insert(&cookie, dst, 0).is_ok() && DNS_RESOLVER.insert(&netns, dst, 0).is_ok()
}

/// An enrolled pod's UDP connect or send to an IPv4 resolver: steered to 127.0.0.1:15053.
pub fn steer4(ctx: &SockAddrContext, pod: Pod) {
    let sa = ctx.sock_addr;
    let (ip, port) = dst4(sa);
    let serves = pod.is_some_and(|(_, p)| p.flags & POD_DNS4 != 0);
    if port != DNS_PORT || !serves || !capture_v4(pod, ip, port) {
        return;
    }
    let dst = OrigDst {
        addr: v4_mapped(ip),
        port,
        family: AF_INET,
    };
    if remember(ctx, &dst) {
        set_ip4(sa, LOOPBACK4);
        set_port(sa, DNS_CAPTURE_PORT);
    }
}

/// The same for an IPv6 socket: IPv4-mapped resolvers to `::ffff:127.0.0.1`, IPv6 ones to `::1`.
pub fn steer6(ctx: &SockAddrContext, pod: Pod) {
    let sa = ctx.sock_addr;
    let (ip, port) = dst6(sa);
    if port != DNS_PORT {
        return;
    }
    let Some((_, info)) = pod else {
        return;
    };
    let (to, dst) = match v4_in_v6(&ip) {
        Some(v4) if info.flags & POD_DNS4 != 0 && capture_v4(pod, v4, port) => (
            v4_mapped(LOOPBACK4),
            OrigDst {
                addr: ip,
                port,
                family: AF_INET,
            },
        ),
        None if info.flags & POD_DNS6 != 0 && capture_v6(pod, &ip, port) => {
            let mut lo = [0u8; 16];
            lo[15] = 1;
            (
                lo,
                OrigDst {
                    addr: ip,
                    port,
                    family: AF_INET6,
                },
            )
        }
        _ => return,
    };
    if remember(ctx, &dst) {
        set_ip6(sa, &to);
        set_port(sa, DNS_CAPTURE_PORT);
    }
}

/// recvmsg4/getpeername4: an answer from 127.0.0.1:15053 on a steered socket shows the
/// resolver's address instead.
pub fn restore4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (ip, port) = dst4(sa);
    if ip != LOOPBACK4 || port != DNS_CAPTURE_PORT {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { DNS_ORIG.get(&cookie) }).copied() else {
        return;
    };
    let Some(v4) = v4_in_v6(&orig.addr) else {
        return;
    };
    set_ip4(sa, v4);
    set_port(sa, orig.port);
}

/// recvmsg6/getpeername6: the same for `[::1]:15053` and `[::ffff:127.0.0.1]:15053`.
pub fn restore6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (ip, port) = dst6(sa);
    let loopback = ip == v4_mapped(LOOPBACK4) || ip[..15].iter().all(|b| *b == 0) && ip[15] == 1;
    if !loopback || port != DNS_CAPTURE_PORT {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { DNS_ORIG.get(&cookie) }).copied() else {
        return;
    };
    set_ip6(sa, &orig.addr);
    set_port(sa, orig.port);
}
