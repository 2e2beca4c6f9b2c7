//! Inbound steering: sk_lookup hands connections for an enrolled pod's app ports to its 15006.
use aya_ebpf::programs::SkLookupContext;
use core::ptr::{addr_of, read_volatile};
use trellis_common::{
    ADDR_STRICT, AF_INET, AF_INET6, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, v4_mapped,
};

use crate::maps::{INBOUND_LISTENERS, POD_ADDRS};

const IPPROTO_TCP: u32 = 6;

/// Loads a context field. All loads happen up front, straight off the context pointer: once
/// LLVM has to keep a computed field address across a call, the verifier rejects the program
/// ("dereference of modified ctx ptr").
macro_rules! field {
    ($ctx:expr, $($f:tt)+) => {
        unsafe { read_volatile(addr_of!((*$ctx).$($f)+)) }
    };
}

/// False when the connection must be dropped (the client gets a reset): one addressed to the
/// inbound capture port itself, or plaintext to a STRICT pod with no proxy to take it.
pub fn sk_lookup(ctx: &SkLookupContext) -> bool {
    let l = ctx.lookup;
    let protocol = field!(l, protocol);
    let port = field!(l, local_port) as u16;
    let family = field!(l, family) as u16;
    let (local4, remote4) = (field!(l, local_ip4), field!(l, remote_ip4));
    let local6 = [
        field!(l, local_ip6[0]),
        field!(l, local_ip6[1]),
        field!(l, local_ip6[2]),
        field!(l, local_ip6[3]),
    ];
    let remote6 = [
        field!(l, remote_ip6[0]),
        field!(l, remote_ip6[1]),
        field!(l, remote_ip6[2]),
        field!(l, remote_ip6[3]),
    ];

    if protocol != IPPROTO_TCP || port == OUTBOUND_PORT || port == HBONE_PORT {
        return true;
    }
    // 15006 takes only what this program steers to it (the lookup then names the app's port):
    // a connection addressed to 15006 itself would have the proxy connect to its own listener.
    if port == INBOUND_PORT {
        return false;
    }
    let (local, remote) = match family {
        AF_INET => (
            v4_mapped(local4.to_ne_bytes()),
            v4_mapped(remote4.to_ne_bytes()),
        ),
        AF_INET6 => (bytes(local6), bytes(remote6)),
        _ => return true,
    };
    // A pod talking to itself, including the proxy's own onward connection (which it makes from
    // the pod's address), is never steered: that is what keeps the proxy from looping.
    if local == remote {
        return true;
    }
    // No listener for this address (pod not enrolled, or agent restarting): normal lookup,
    // unless the pod is STRICT: then plaintext must not reach it at all.
    INBOUND_LISTENERS.redirect_sk_lookup(ctx, local, 0).is_ok()
        || unsafe { POD_ADDRS.get(&local) }.is_none_or(|marks| marks & ADDR_STRICT == 0)
}

fn bytes(words: [u32; 4]) -> [u8; 16] {
    let mut ip = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        ip[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    ip
}
