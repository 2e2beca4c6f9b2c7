//! Trellis kernel programs. The agent loads this object, pins the maps and links under
//! `/sys/fs/bpf/trellis/<node>`, and fills the maps; see docs/capture.md.
#![no_std]
#![no_main]

mod dns;
mod inbound;
mod maps;
mod outbound;

use aya_ebpf::{
    macros::{cgroup_sock_addr, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};

/// `cgroup/connect4`: rewrite an enrolled pod's TCP connect to 127.0.0.1:15001; refuse (0) its
/// connects to the proxy's own ports and, under REGISTRY_ONLY, to unregistered addresses (UDP
/// connects too).
#[cgroup_sock_addr(connect4)]
pub fn trellis_connect4(ctx: SockAddrContext) -> i32 {
    i32::from(outbound::connect4(&ctx))
}

/// `cgroup/connect6`: the same for IPv6 (and IPv4-mapped) destinations, to [::1]:15001.
#[cgroup_sock_addr(connect6)]
pub fn trellis_connect6(ctx: SockAddrContext) -> i32 {
    i32::from(outbound::connect6(&ctx))
}

/// `cgroup/sendmsg4`: an enrolled REGISTRY_ONLY pod's UDP datagrams to unregistered addresses
/// fail (EPERM); DNS goes to the agent (as for UDP connects).
#[cgroup_sock_addr(sendmsg4)]
pub fn trellis_sendmsg4(ctx: SockAddrContext) -> i32 {
    i32::from(outbound::sendmsg4(&ctx))
}

/// `cgroup/sendmsg6`: the same for IPv6.
#[cgroup_sock_addr(sendmsg6)]
pub fn trellis_sendmsg6(ctx: SockAddrContext) -> i32 {
    i32::from(outbound::sendmsg6(&ctx))
}

/// `cgroup/recvmsg4`: a DNS answer from the agent shows the pod's resolver as its source.
#[cgroup_sock_addr(recvmsg4)]
pub fn trellis_recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::restore4(&ctx);
    1
}

/// `cgroup/recvmsg6`: the same for IPv6 sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn trellis_recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::restore6(&ctx);
    1
}

/// `cgroup/getpeername4`: a DNS socket connected to its resolver still names the resolver.
#[cgroup_sock_addr(getpeername4)]
pub fn trellis_getpeername4(ctx: SockAddrContext) -> i32 {
    dns::restore4(&ctx);
    1
}

/// `cgroup/getpeername6`: the same for IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn trellis_getpeername6(ctx: SockAddrContext) -> i32 {
    dns::restore6(&ctx);
    1
}

/// `sockops`: once a captured connection is established, re-key its original destination by
/// (netns cookie, client port, family) so the proxy can find it from its accepted socket; and
/// record which netns opened each connection to an enrolled pod.
#[sock_ops]
pub fn trellis_sock_ops(ctx: SockOpsContext) -> u32 {
    outbound::sock_ops(&ctx);
    0
}

/// `sk_lookup`, attached per pod netns: steer connections to app ports to the agent's 15006.
#[sk_lookup]
pub fn trellis_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SK_PASS: with a socket assigned it goes there, otherwise the normal lookup runs.
    if inbound::sk_lookup(&ctx) { 1 } else { 0 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
