//! Map keys and values shared by the kernel programs (`trellis-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
#![no_std]

/// Outbound capture port: `connect()` from an enrolled pod is rewritten to loopback:15001.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port: `sk_lookup` steers app-port connections here.
pub const INBOUND_PORT: u16 = 15006;
/// Inbound HBONE (mTLS) port; never steered.
pub const HBONE_PORT: u16 = 15008;
/// The capture and HBONE listeners: never a destination. An enrolled pod's connect to one of
/// them is refused in the kernel, since the proxy would otherwise connect to itself.
pub const PROXY_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// How many cgroup levels below the cgroup v2 root `connect4/6` walk looking for an enrolled pod.
/// kubelet's deepest layout (systemd driver, burstable pod, container) is 5 levels.
pub const MAX_CGROUP_DEPTH: i32 = 10;

/// `POD_ADDRS` value bit: every port of the pod is STRICT, so while no proxy listens the kernel
/// drops plaintext to it.
pub const ADDR_STRICT: u8 = 1;

/// `PodInfo::flags` bits.
pub const POD_HAS_IP4: u32 = 1;
pub const POD_HAS_IP6: u32 = 2;
/// The pod's outbound traffic policy is REGISTRY_ONLY: its connects (and UDP sends) to
/// addresses outside `REGISTRY` fail with EPERM.
pub const POD_REGISTRY_ONLY: u32 = 4;

/// The agent answers this pod's DNS on `127.0.0.1:15053` (IPv4 resolvers) and `[::1]:15053`
/// (IPv6 resolvers) in its netns: UDP to port 53 is rewritten there.
pub const POD_DNS4: u32 = 8;
pub const POD_DNS6: u32 = 16;

/// DNS. Under REGISTRY_ONLY it still goes anywhere (the agent answers or forwards it to the
/// pod's resolver).
pub const DNS_PORT: u16 = 53;
/// Where the agent answers an enrolled pod's UDP DNS, on loopback in the pod's netns.
pub const DNS_CAPTURE_PORT: u16 = 15053;

/// An IPv4 address stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one 16-byte key serves both.
pub const fn v4_mapped(ip: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
    ]
}

/// Value of `ENROLLED` (key: the pod's cgroup v2 id): the pod's own addresses, which are never
/// captured outbound (a pod talking to itself).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub flags: u32,
    pub ip4: [u8; 4],
    pub ip6: [u8; 16],
}

/// An original destination as the app asked for it. `addr` is IPv4-mapped when `family` is
/// `AF_INET`; `port` is in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
}

/// Value of `PENDING` (key: socket cookie): written by `connect4/6`, consumed by `sockops` once
/// the connection is established and its client port known.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pending {
    pub netns_cookie: u64,
    pub dst: OrigDst,
    pub _pad: u32,
}

/// Key of `ORIG_DST`: what the proxy sees on its accepted socket. The netns cookie names the pod
/// (every pod has its own netns); the client port is unique among the pod's connections to one
/// capture listener; the family separates the 127.0.0.1 and ::1 listeners, whose port spaces
/// overlap.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub client_port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Key of `NODE_CONNS`: a TCP connection as the destination pod sees it (addresses IPv4-mapped
/// for IPv4, ports in host order). The value is the network namespace cookie of the socket that
/// opened it, so the agent can tell its node's own connections (kubelet's probes) from a pod's,
/// another node's, or forwarded and NATed traffic (which no local socket opened).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::Pending {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::FlowKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<PodInfo>(), 24);
        assert_eq!(size_of::<OrigDst>(), 20);
        assert_eq!(size_of::<Pending>(), 32);
        assert_eq!(size_of::<ConnKey>(), 16);
        assert_eq!(size_of::<FlowKey>(), 40);
    }

    #[test]
    fn v4_mapped_form() {
        assert_eq!(
            v4_mapped([10, 1, 2, 3]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
    }
}
