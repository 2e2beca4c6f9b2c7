//! The maps, pinned by name so they outlive an agent restart. Sizes are the node's limits.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, SockHash},
};
use trellis_common::{ConnKey, FlowKey, OrigDst, Pending, PodInfo};

/// Enrolled pods by cgroup v2 id (the pod-level cgroup, not a container's).
#[map]
pub static ENROLLED: HashMap<u64, PodInfo> = HashMap::pinned(4096, 0);

/// Destination ports never captured outbound (value unused).
#[map]
pub static EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);

/// Destination CIDRs never captured outbound.
#[map]
pub static EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(1024, 0);
#[map]
pub static EXCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(1024, 0);

/// Captured connects waiting to be established, by socket cookie. LRU: a connect that never
/// completes leaves an entry that ages out.
#[map]
pub static PENDING: LruHashMap<u64, Pending> = LruHashMap::pinned(65536, 0);

/// Original destinations of established captured connections, for the proxy (which deletes
/// each entry once read).
#[map]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// Each enrolled pod's 15006 listener, by pod IP (IPv4-mapped for IPv4).
#[map]
pub static INBOUND_LISTENERS: SockHash<[u8; 16]> = SockHash::pinned(8192, 0);

/// Enrolled pods' addresses (IPv4-mapped for IPv4): the node's own connects to them are recorded
/// in `NODE_CONNS`. Valued `ADDR_STRICT` for pods whose every port is STRICT: when no proxy
/// listener serves such a pod (the agent is restarting), plaintext to it is dropped, not let
/// through.
#[map]
pub static POD_ADDRS: HashMap<[u8; 16], u8> = HashMap::pinned(8192, 0);

/// Every destination the mesh knows (pods, Service VIPs, ServiceEntry addresses), IPv4 as
/// IPv4-mapped: all a REGISTRY_ONLY pod may reach.
#[map]
pub static REGISTRY: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(65536, 0);

/// Connects and UDP sends refused by REGISTRY_ONLY, counted per pod cgroup id (`ENROLLED`'s
/// key), per CPU (so no count is lost to a race; the agent sums them). LRU: counters of pods
/// long gone age out.
#[map]
pub static EGRESS_REFUSED: LruPerCpuHashMap<u64, u64> = LruPerCpuHashMap::pinned(4096, 0);

/// Connections the node itself opened to an enrolled pod, by the pod's view of the flow; the value
/// is the opening socket's netns cookie. The proxy consumes each entry when it accepts the
/// connection. LRU: entries of connections that never arrive age out.
#[map]
pub static NODE_CONNS: LruHashMap<FlowKey, u64> = LruHashMap::pinned(16384, 0);

/// The resolver each captured DNS socket asked for, by socket cookie: restored as the answer's
/// source (recvmsg) and the socket's peer (getpeername), so the app's resolver accepts it.
#[map]
pub static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(16384, 0);

/// The resolver each enrolled pod last asked, by netns cookie: where the agent forwards the
/// pod's UDP queries for names outside the mesh.
#[map]
pub static DNS_RESOLVER: LruHashMap<u64, OrigDst> = LruHashMap::pinned(4096, 0);
