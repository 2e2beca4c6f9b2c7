//! Outbound capture: connect4/6 rewrite the destination and remember it; sock_ops re-keys it.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use trellis_common::{
    AF_INET, AF_INET6, ConnKey, DNS_PORT, FlowKey, MAX_CGROUP_DEPTH, OUTBOUND_PORT, OrigDst,
    POD_HAS_IP4, POD_HAS_IP6, POD_REGISTRY_ONLY, PROXY_PORTS, Pending, PodInfo, v4_mapped,
};

use crate::{
    dns,
    maps::{
        EGRESS_REFUSED, ENROLLED, EXCLUDE_PORTS, EXCLUDE_V4, EXCLUDE_V6, NODE_CONNS, ORIG_DST,
        PENDING, POD_ADDRS, REGISTRY,
    },
};

const SOCK_STREAM: u32 = 1;
const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An enrolled pod: its cgroup id (`ENROLLED`'s key) and what the kernel knows of it.
pub(crate) type Pod = Option<(u64, PodInfo)>;

/// The pod whose cgroup contains the calling task, if it is enrolled. Containers sit in
/// sub-cgroups of the pod cgroup, so walk the ancestors from the top.
pub(crate) fn enrolled_pod() -> Pod {
    for level in 1..=MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        if let Some(pod) = unsafe { ENROLLED.get(&id) } {
            return Some((id, *pod));
        }
    }
    None
}

/// Whether REGISTRY_ONLY refuses the calling pod this destination (`ip` IPv4-mapped for IPv4);
/// counted when it does. Loopback, the pod itself, excluded destinations (the operator's
/// explicit bypass) and DNS (answered or forwarded by the agent) stay reachable.
fn egress_refused(pod: Pod, ip: &[u8; 16], port: u16) -> bool {
    let Some((id, pod)) = pod else {
        return false;
    };
    if pod.flags & POD_REGISTRY_ONLY == 0 || port == DNS_PORT || port_excluded(port) {
        return false;
    }
    let v4 = v4_in_v6(ip);
    let own = match v4 {
        Some(v4) => v4[0] == 127 || (pod.flags & POD_HAS_IP4 != 0 && pod.ip4 == v4),
        None => *ip == LOOPBACK_V6 || (pod.flags & POD_HAS_IP6 != 0 && pod.ip6 == *ip),
    };
    let excluded = match v4 {
        Some(v4) => EXCLUDE_V4.get(Key::new(32, v4)).is_some(),
        None => EXCLUDE_V6.get(Key::new(128, *ip)).is_some(),
    };
    if own || excluded || REGISTRY.get(Key::new(128, *ip)).is_some() {
        return false;
    }
    match EGRESS_REFUSED.get_ptr_mut(&id) {
        // This CPU's own counter: no other writer.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = EGRESS_REFUSED.insert(&id, &1, 0);
        }
    }
    true
}

fn port_excluded(port: u16) -> bool {
    unsafe { EXCLUDE_PORTS.get(&port) }.is_some()
}

fn remember(ctx: &SockAddrContext, dst: OrigDst) -> bool {
    let pending = Pending {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dst,
        _pad: 0,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Without a record the proxy could not route the connection: leave it uncaptured.
    PENDING.insert(&cookie, &pending, 0).is_ok()
}

fn stream_socket(sa: *const bpf_sock_addr) -> bool {
    unsafe { read_volatile(addr_of!((*sa).type_)) == SOCK_STREAM }
}

pub(crate) fn set_ip4(sa: *mut bpf_sock_addr, ip: [u8; 4]) {
    unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(ip)) };
}

pub(crate) fn set_port(sa: *mut bpf_sock_addr, port: u16) {
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be())) };
}

pub(crate) fn set_ip6(sa: *mut bpf_sock_addr, ip: &[u8; 16]) {
    // Separate 32-bit stores: the verifier rejects wider writes to user_ip6.
    for i in 0..4 {
        let word = u32::from_ne_bytes([ip[i * 4], ip[i * 4 + 1], ip[i * 4 + 2], ip[i * 4 + 3]]);
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip6[i]), word) };
    }
}

/// An enrolled pod's connect to one of the proxy's own listeners is refused (the app gets
/// EPERM): whether the proxy took it as captured traffic or as a destination, it would end up
/// connecting to itself.
fn refused(pod: Pod, port: u16) -> bool {
    PROXY_PORTS.contains(&port) && pod.is_some()
}

pub(crate) fn dst4(sa: *const bpf_sock_addr) -> ([u8; 4], u16) {
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) }.to_ne_bytes();
    let port = u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16);
    (ip, port)
}

pub(crate) fn dst6(sa: *const bpf_sock_addr) -> ([u8; 16], u16) {
    let mut ip = [0u8; 16];
    for i in 0..4 {
        let word = unsafe { read_volatile(addr_of!((*sa).user_ip6[i])) }.to_ne_bytes();
        ip[i * 4..i * 4 + 4].copy_from_slice(&word);
    }
    let port = u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16);
    (ip, port)
}

/// False when the connect must fail.
pub fn connect4(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    let (ip, port) = dst4(sa);
    let pod = enrolled_pod();
    if !stream_socket(sa) {
        if egress_refused(pod, &v4_mapped(ip), port) {
            return false;
        }
        dns::steer4(ctx, pod);
        return true;
    }
    if refused(pod, port) || egress_refused(pod, &v4_mapped(ip), port) {
        return false;
    }
    if !capture_v4(pod, ip, port) || !remember(ctx, v4_dst(ip, port)) {
        return true;
    }
    set_ip4(sa, [127, 0, 0, 1]);
    set_port(sa, OUTBOUND_PORT);
    debug!(
        ctx,
        "connect4 captured {:i}:{}",
        u32::from_be_bytes(ip),
        port
    );
    true
}

/// False when the connect must fail.
pub fn connect6(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    let (ip, port) = dst6(sa);
    let pod = enrolled_pod();
    if !stream_socket(sa) {
        if egress_refused(pod, &ip, port) {
            return false;
        }
        dns::steer6(ctx, pod);
        return true;
    }
    if refused(pod, port) || egress_refused(pod, &ip, port) {
        return false;
    }
    let dst = match v4_in_v6(&ip) {
        Some(v4) if capture_v4(pod, v4, port) => v4_dst(v4, port),
        Some(_) => return true,
        None if capture_v6(pod, &ip, port) => OrigDst {
            addr: ip,
            port,
            family: AF_INET6,
        },
        None => return true,
    };
    if !remember(ctx, dst) {
        return true;
    }
    set_ip6(sa, &LOOPBACK_V6);
    set_port(sa, OUTBOUND_PORT);
    debug!(ctx, "connect6 captured [{:i}]:{}", ip, port);
    true
}

/// False when the datagram must not be sent (UDP without a prior connect).
pub fn sendmsg4(ctx: &SockAddrContext) -> bool {
    let (ip, port) = dst4(ctx.sock_addr);
    let pod = enrolled_pod();
    if egress_refused(pod, &v4_mapped(ip), port) {
        return false;
    }
    dns::steer4(ctx, pod);
    true
}

/// False when the datagram must not be sent.
pub fn sendmsg6(ctx: &SockAddrContext) -> bool {
    let (ip, port) = dst6(ctx.sock_addr);
    let pod = enrolled_pod();
    if egress_refused(pod, &ip, port) {
        return false;
    }
    dns::steer6(ctx, pod);
    true
}

fn v4_dst(ip: [u8; 4], port: u16) -> OrigDst {
    OrigDst {
        addr: v4_mapped(ip),
        port,
        family: AF_INET,
    }
}

pub(crate) fn v4_in_v6(ip: &[u8; 16]) -> Option<[u8; 4]> {
    if ip[..10].iter().all(|b| *b == 0) && ip[10] == 0xff && ip[11] == 0xff {
        Some([ip[12], ip[13], ip[14], ip[15]])
    } else {
        None
    }
}

pub(crate) fn capture_v4(pod: Pod, ip: [u8; 4], port: u16) -> bool {
    if ip[0] == 127 {
        return false;
    }
    let Some((_, pod)) = pod else {
        return false;
    };
    if pod.flags & POD_HAS_IP4 != 0 && pod.ip4 == ip {
        return false;
    }
    !port_excluded(port) && EXCLUDE_V4.get(Key::new(32, ip)).is_none()
}

pub(crate) fn capture_v6(pod: Pod, ip: &[u8; 16], port: u16) -> bool {
    if *ip == LOOPBACK_V6 {
        return false;
    }
    let Some((_, pod)) = pod else {
        return false;
    };
    if pod.flags & POD_HAS_IP6 != 0 && pod.ip6 == *ip {
        return false;
    }
    !port_excluded(port) && EXCLUDE_V6.get(Key::new(128, *ip)).is_none()
}

pub fn sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record_connect_to_pod(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => rekey_orig_dst(ctx),
        _ => {}
    }
}

/// Just before the SYN of a connect to an enrolled pod: remember who opened it (by netns
/// cookie), keyed as the pod will see the flow. Addresses and ports are assigned by now.
/// A connection that reaches the pod with no such record was made by no socket on this node:
/// forwarded or NATed traffic, which must not pass as the node's own (kubelet's probes).
fn record_connect_to_pod(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // Every field is loaded straight off the context pointer at a constant offset: a computed
    // field address (an indexed loop) is "dereference of modified ctx ptr" to the verifier.
    macro_rules! field {
        ($($f:tt)+) => {
            unsafe { read_volatile(addr_of!((*ops).$($f)+)) }
        };
    }
    // All up front, not per family: LLVM would otherwise merge the two paths' loads into one
    // with a variable offset.
    let family = field!(family) as u16;
    let (local4, remote4) = (field!(local_ip4), field!(remote_ip4));
    let local6 = [
        field!(local_ip6[0]),
        field!(local_ip6[1]),
        field!(local_ip6[2]),
        field!(local_ip6[3]),
    ];
    let remote6 = [
        field!(remote_ip6[0]),
        field!(remote_ip6[1]),
        field!(remote_ip6[2]),
        field!(remote_ip6[3]),
    ];
    let (src_port, remote_port) = (field!(local_port), field!(remote_port));
    let (src, dst) = match family {
        AF_INET => (
            v4_mapped(local4.to_ne_bytes()),
            v4_mapped(remote4.to_ne_bytes()),
        ),
        AF_INET6 => (words_to_bytes(local6), words_to_bytes(remote6)),
        _ => return,
    };
    if unsafe { POD_ADDRS.get(&dst) }.is_none() {
        return;
    }
    let key = FlowKey {
        src,
        dst,
        // local_port is host order; remote_port holds the network-order port in its upper half.
        src_port: src_port as u16,
        dst_port: u16::from_be((remote_port >> 16) as u16),
        _pad: 0,
    };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let _ = NODE_CONNS.insert(&key, &netns, 0);
}

fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut ip = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        ip[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    ip
}

/// Once a captured connection is established, re-key its original destination by what the
/// proxy sees on its accepted socket.
fn rekey_orig_dst(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pending) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return;
    };
    let _ = PENDING.remove(&cookie);
    let key = ConnKey {
        netns_cookie: pending.netns_cookie,
        // local_port is host order in sock_ops (remote_port is not).
        client_port: ctx.local_port() as u16,
        family: ctx.family() as u16,
        _pad: 0,
    };
    if ORIG_DST.insert(&key, &pending.dst, 0).is_err() {
        debug!(
            ctx,
            "sockops: ORIG_DST insert failed for client port {}", key.client_port
        );
    }
}
