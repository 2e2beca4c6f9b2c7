//! The capture layer's userspace half: loads the kernel programs, attaches them (adopting what an
//! earlier agent pinned), and keeps the maps that say which pods are enrolled.
mod pins;

use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::Mutex,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuHashMap, SockHash, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, links::FdLink},
};
use aya_log::EbpfLogger;
use ipnet::IpNet;
use trellis_common::{
    ADDR_STRICT, AF_INET, ConnKey, FlowKey, OrigDst, POD_HAS_IP4, POD_HAS_IP6, POD_REGISTRY_ONLY,
    PodInfo, v4_mapped,
};

use crate::netns::Netns;
pub use pins::PinDir;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trellis"));

/// The cgroup programs, by program name and link pin name.
const CGROUP_PROGRAMS: [(&str, &str); 9] = [
    ("trellis_connect4", "connect4"),
    ("trellis_connect6", "connect6"),
    ("trellis_sendmsg4", "sendmsg4"),
    ("trellis_sendmsg6", "sendmsg6"),
    ("trellis_recvmsg4", "recvmsg4"),
    ("trellis_recvmsg6", "recvmsg6"),
    ("trellis_getpeername4", "getpeername4"),
    ("trellis_getpeername6", "getpeername6"),
    ("trellis_sock_ops", "sockops"),
];
const SK_LOOKUP: &str = "trellis_sk_lookup";

pub struct RedirectConfig {
    pub pin_root: PathBuf,
    pub node: String,
    pub cgroup_root: PathBuf,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    /// Whether the kernel programs emit their debug log records (they cost a ring-buffer write).
    pub kernel_debug_log: bool,
}

/// `BPF_NOEXIST`: insert only where the key is absent.
const BPF_NOEXIST: u64 = 1;

/// Sole owner of the enrollment maps and the pinned links.
pub struct Redirect {
    pins: PinDir,
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodInfo>,
    listeners: SockHash<MapData, [u8; 16]>,
    /// `POD_ADDRS`: every enrolled pod address, valued `ADDR_STRICT` or 0.
    addrs: HashMap<MapData, [u8; 16], u8>,
    /// `REGISTRY`: what REGISTRY_ONLY pods may reach.
    registry: LpmTrie<MapData, [u8; 16], u8>,
    /// `EGRESS_REFUSED`: refusals per pod cgroup id, counted by the kernel.
    egress_refused: PerCpuHashMap<MapData, u64, u64>,
}

/// The proxy's view: original destinations of captured connections, consumed once each.
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
}

impl OrigDstTable {
    /// The original destination of the connection the proxy accepted from `client` in the netns
    /// with `netns_cookie`; the entry is removed.
    pub fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = conn_key(netns_cookie, client);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(to_socket_addr(&dst))
    }
}

/// The proxy's view of `NODE_CONNS`: which network namespace opened a connection to a STRICT
/// pod, consumed once each.
pub struct NodeConnTable {
    map: Mutex<HashMap<MapData, FlowKey, u64>>,
}

impl NodeConnTable {
    /// The netns cookie of the socket on this node that opened the connection from `client` to
    /// `local` (the pod's address); None when no socket here opened it (forwarded or NATed).
    pub fn take(&self, client: SocketAddr, local: SocketAddr) -> Option<u64> {
        let key = flow_key(client, local);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let netns = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(netns)
    }
}

/// The proxy's view of `DNS_RESOLVER`: the resolver each pod last sent a UDP query to.
pub struct ResolverTable {
    map: Mutex<HashMap<MapData, u64, OrigDst>>,
}

impl ResolverTable {
    /// The resolver the pod in the netns with `netns_cookie` last asked (the entry stays).
    pub fn get(&self, netns_cookie: u64) -> Option<SocketAddr> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&netns_cookie, 0).ok().map(|d| to_socket_addr(&d))
    }
}

/// The kernel tables the proxy reads on its accept paths.
pub struct ProxyMaps {
    pub orig_dst: OrigDstTable,
    pub node_conns: NodeConnTable,
    pub dns_resolver: ResolverTable,
}

/// The `ORIG_DST` key of a connection from `client` accepted in the netns with `netns_cookie`.
pub fn conn_key(netns_cookie: u64, client: SocketAddr) -> ConnKey {
    ConnKey {
        netns_cookie,
        client_port: client.port(),
        family: if client.is_ipv4() {
            AF_INET
        } else {
            trellis_common::AF_INET6
        },
        _pad: 0,
    }
}

/// The `NODE_CONNS` key of a connection from `client` to `local`.
pub fn flow_key(client: SocketAddr, local: SocketAddr) -> FlowKey {
    FlowKey {
        src: ip_key(client.ip()),
        dst: ip_key(local.ip()),
        src_port: client.port(),
        dst_port: local.port(),
        _pad: 0,
    }
}

/// An `ORIG_DST` value as an address. Any value gives one: an `AF_INET` value that is not
/// IPv4-mapped (the kernel never writes one) becomes 0.0.0.0 rather than a panic.
pub fn to_socket_addr(dst: &OrigDst) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(dst.addr);
    let ip = if dst.family == AF_INET {
        IpAddr::V4(
            ip.to_ipv4_mapped()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        )
    } else {
        IpAddr::V6(ip)
    };
    SocketAddr::new(ip, dst.port)
}

/// A `REGISTRY` key: IPv4 networks as IPv4-mapped (prefix + 96).
pub fn registry_key(net: IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(n) => Key::new(
            96 + u32::from(n.prefix_len()),
            v4_mapped(n.network().octets()),
        ),
        IpNet::V6(n) => Key::new(u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// A map's 16-byte address key: IPv4 (also in its IPv4-mapped IPv6 form) as IPv4-mapped.
pub fn ip_key(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl Redirect {
    /// Detaches and unpins everything this agent pinned for its node (`cleanup`, from inside).
    pub fn remove_all(self) -> Result<()> {
        self.pins.remove_all()
    }

    /// Loads and attaches everything, adopting the pins of an earlier agent for this node.
    pub fn open(
        cfg: &RedirectConfig,
    ) -> Result<(Self, ProxyMaps, EbpfLogger<&'static dyn log::Log>)> {
        let pins = PinDir::lock(&cfg.pin_root, &cfg.node)?;
        let level = if cfg.kernel_debug_log {
            aya_log::Level::Debug
        } else {
            aya_log::Level::Warn
        } as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)
            .context(
                "loading the kernel programs (is this kernel ≥ 5.15 with BTF, and are we root?)",
            )?;
        let logger =
            EbpfLogger::init(&mut ebpf).context("starting the kernel program log reader")?;

        let cgroup = File::open(&cfg.cgroup_root)
            .with_context(|| format!("opening cgroup root {}", cfg.cgroup_root.display()))?;
        for (prog, pin) in CGROUP_PROGRAMS {
            let link = attach_cgroup(&mut ebpf, prog, &cgroup)
                .with_context(|| format!("attaching {prog} to {}", cfg.cgroup_root.display()))?;
            pins::replace_pinned_link(link, &pins.link(pin))?;
        }
        let sk_lookup: &mut SkLookup = program(&mut ebpf, SK_LOOKUP)?.try_into()?;
        sk_lookup.load().context("loading sk_lookup")?;

        sync_exclusions(&mut ebpf, cfg)?;
        let enrolled = HashMap::try_from(take_map(&mut ebpf, "ENROLLED")?)?;
        let listeners = SockHash::try_from(take_map(&mut ebpf, "INBOUND_LISTENERS")?)?;
        let addrs = HashMap::try_from(take_map(&mut ebpf, "POD_ADDRS")?)?;
        let registry = LpmTrie::try_from(take_map(&mut ebpf, "REGISTRY")?)?;
        let egress_refused = PerCpuHashMap::try_from(take_map(&mut ebpf, "EGRESS_REFUSED")?)?;
        let maps = ProxyMaps {
            orig_dst: OrigDstTable {
                map: Mutex::new(HashMap::try_from(take_map(&mut ebpf, "ORIG_DST")?)?),
            },
            node_conns: NodeConnTable {
                map: Mutex::new(HashMap::try_from(take_map(&mut ebpf, "NODE_CONNS")?)?),
            },
            dns_resolver: ResolverTable {
                map: Mutex::new(HashMap::try_from(take_map(&mut ebpf, "DNS_RESOLVER")?)?),
            },
        };
        Ok((
            Self {
                pins,
                ebpf,
                enrolled,
                listeners,
                addrs,
                registry,
                egress_refused,
            },
            maps,
            logger,
        ))
    }

    /// Starts capturing a pod: its inbound listener serves its addresses, sk_lookup is attached
    /// to its netns, and its cgroup is marked enrolled (last, so capture never finds the proxy
    /// missing). `dns` is `POD_DNS4`/`POD_DNS6` for the DNS sockets the agent has in the pod.
    pub fn enroll(
        &mut self,
        uid: &str,
        cgroup_id: u64,
        ips: &[IpAddr],
        netns: &Netns,
        inbound_listener: &std::net::TcpListener,
        dns: u32,
    ) -> Result<()> {
        for ip in ips {
            self.listeners
                .insert(ip_key(*ip), inbound_listener.as_raw_fd(), 0)
                .with_context(|| format!("registering the inbound listener for {ip}"))?;
            // Known from now on, so the node's own connects to it are recorded; a STRICT mark an
            // earlier agent left stays until `set_strict` says otherwise.
            match self.addrs.insert(ip_key(*ip), 0, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).with_context(|| format!("registering {ip}")),
            }
        }
        let dir = self.pins.pod_dir(uid);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let prog: &mut SkLookup = program(&mut self.ebpf, SK_LOOKUP)?.try_into()?;
        let id = prog
            .attach(netns)
            .context("attaching sk_lookup to the pod's network namespace")?;
        let link: FdLink = prog.take_link(id)?.into();
        pins::replace_pinned_link(link, &dir.join("sk_lookup"))?;

        // A REGISTRY_ONLY mark an earlier agent left stays until `set_registry_only` says
        // otherwise: egress never opens while the agent restarts.
        let mut info = PodInfo {
            flags: self
                .enrolled
                .get(&cgroup_id, 0)
                .map_or(0, |old| old.flags & POD_REGISTRY_ONLY)
                | dns,
            ..PodInfo::default()
        };
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => (info.flags, info.ip4) = (info.flags | POD_HAS_IP4, v4.octets()),
                IpAddr::V6(v6) => (info.flags, info.ip6) = (info.flags | POD_HAS_IP6, v6.octets()),
            }
        }
        self.enrolled
            .insert(cgroup_id, info, 0)
            .context("marking the pod's cgroup enrolled")?;
        Ok(())
    }

    /// Marks a pod's addresses STRICT (or not) for the kernel, which then drops plaintext to
    /// them whenever no proxy listener is there to refuse it.
    pub fn set_strict(&mut self, ips: &[IpAddr], strict: bool) -> Result<()> {
        let mark = if strict { ADDR_STRICT } else { 0 };
        for ip in ips {
            self.addrs
                .insert(ip_key(*ip), mark, 0)
                .with_context(|| format!("marking {ip} STRICT={strict}"))?;
        }
        Ok(())
    }

    /// Sets or clears a pod's REGISTRY_ONLY mark (by its cgroup id).
    pub fn set_registry_only(&mut self, cgroup_id: u64, on: bool) -> Result<()> {
        let mut info = self
            .enrolled
            .get(&cgroup_id, 0)
            .context("the pod's cgroup is not marked enrolled")?;
        info.flags = if on {
            info.flags | POD_REGISTRY_ONLY
        } else {
            info.flags & !POD_REGISTRY_ONLY
        };
        self.enrolled
            .insert(cgroup_id, info, 0)
            .with_context(|| format!("setting REGISTRY_ONLY={on}"))
    }

    /// Makes `REGISTRY` hold exactly `nets`, adding before removing so that nothing still
    /// registered is refused in between.
    pub fn sync_registry(&mut self, nets: &BTreeSet<IpNet>) -> Result<()> {
        sync_trie(&mut self.registry, nets.iter().map(|n| registry_key(*n)))
            .context("updating the egress registry (65,536 entries at most)")
    }

    /// How many connects and UDP sends REGISTRY_ONLY has refused a pod (by its cgroup id).
    pub fn egress_refused(&self, cgroup_id: u64) -> u64 {
        self.egress_refused
            .get(&cgroup_id, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Stops capturing a pod; connections already proxied are left to finish.
    pub fn unenroll(&mut self, uid: &str, cgroup_id: Option<u64>, ips: &[IpAddr]) -> Result<()> {
        if let Some(id) = cgroup_id {
            let _ = self.enrolled.remove(&id); // absent is fine: already not captured
        }
        let dir = self.pins.pod_dir(uid);
        pins::unpin_link(&dir.join("sk_lookup"))?;
        if dir.exists() {
            std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        for ip in ips {
            let _ = self.listeners.remove(&ip_key(*ip)); // closed listeners drop out by themselves
            let _ = self.addrs.remove(&ip_key(*ip)); // absent is fine
        }
        Ok(())
    }

    /// Drops what an earlier agent enrolled that is not enrolled now (a pod deleted while no
    /// agent ran).
    pub fn forget_others(
        &mut self,
        keep_cgroups: &HashSet<u64>,
        keep_uids: &HashSet<String>,
        keep_ips: &HashSet<IpAddr>,
    ) -> Result<Vec<String>> {
        let keep: HashSet<[u8; 16]> = keep_ips.iter().map(|ip| ip_key(*ip)).collect();
        let stale: Vec<[u8; 16]> = self
            .addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in stale {
            let _ = self.addrs.remove(&k);
        }
        let stale: Vec<u64> = self
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !keep_cgroups.contains(id))
            .collect();
        for id in stale {
            let _ = self.enrolled.remove(&id);
        }
        let mut forgotten = Vec::new();
        for uid in self.pins.pinned_pods()? {
            if !keep_uids.contains(&uid) {
                self.unenroll(&uid, None, &[])?;
                forgotten.push(uid);
            }
        }
        Ok(forgotten)
    }
}

/// `trellis-agent cleanup`: detach and unpin everything for the node.
pub fn cleanup(pin_root: &std::path::Path, node: &str) -> Result<()> {
    PinDir::lock(pin_root, node)?.remove_all()
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the kernel object"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the kernel object"))
}

/// Attaches a cgroup program through a BPF link. Links coexist with other programs on the cgroup
/// whatever the mode (the kernel rejects link flags), so `Single` here means "no flags".
fn attach_cgroup(ebpf: &mut Ebpf, name: &str, cgroup: &File) -> Result<FdLink> {
    let prog = program(ebpf, name)?;
    if let Ok(p) = <&mut SockOps>::try_from(&mut *prog) {
        p.load()?;
        let id = p.attach(cgroup, CgroupAttachMode::Single)?;
        return Ok(p.take_link(id)?.try_into()?);
    }
    let p: &mut CgroupSockAddr = prog.try_into()?;
    p.load()?;
    let id = p.attach(cgroup, CgroupAttachMode::Single)?;
    Ok(p.take_link(id)?.try_into()?)
}

/// Makes the exclusion maps hold exactly the configured ports and CIDRs.
fn sync_exclusions(ebpf: &mut Ebpf, cfg: &RedirectConfig) -> Result<()> {
    let mut ports: HashMap<&mut MapData, u16, u8> =
        HashMap::try_from(map_mut(ebpf, "EXCLUDE_PORTS")?)?;
    let old: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
    for p in old {
        ports.remove(&p)?;
    }
    for p in &cfg.exclude_ports {
        ports
            .insert(p, 1, 0)
            .with_context(|| format!("excluding port {p}"))?;
    }
    let v4 = cfg.exclude_cidrs.iter().filter_map(|n| match n {
        IpNet::V4(n) => Some(Key::new(u32::from(n.prefix_len()), n.network().octets())),
        IpNet::V6(_) => None,
    });
    let mut trie: LpmTrie<&mut MapData, [u8; 4], u8> =
        LpmTrie::try_from(map_mut(ebpf, "EXCLUDE_V4")?)?;
    sync_trie(&mut trie, v4).context("excluding CIDRs")?;
    let v6 = cfg.exclude_cidrs.iter().filter_map(|n| match n {
        IpNet::V6(n) => Some(Key::new(u32::from(n.prefix_len()), n.network().octets())),
        IpNet::V4(_) => None,
    });
    let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> =
        LpmTrie::try_from(map_mut(ebpf, "EXCLUDE_V6")?)?;
    sync_trie(&mut trie, v6).context("excluding CIDRs")?;
    Ok(())
}

/// Makes an LPM trie hold exactly `keys`, adding before removing, so that nothing wanted both
/// before and after is ever missing.
fn sync_trie<T, K>(trie: &mut LpmTrie<T, K, u8>, keys: impl Iterator<Item = Key<K>>) -> Result<()>
where
    T: std::borrow::BorrowMut<MapData>,
    K: aya::Pod + Eq + std::hash::Hash,
{
    let plain = |k: Key<K>| (k.prefix_len(), k.data());
    let want: HashSet<(u32, K)> = keys.map(plain).collect();
    let have: HashSet<(u32, K)> = trie.keys().filter_map(Result::ok).map(plain).collect();
    for (len, data) in want.difference(&have) {
        trie.insert(&Key::new(*len, *data), 1, 0)
            .context("adding a CIDR (is the map full?)")?;
    }
    for (len, data) in have.difference(&want) {
        let _ = trie.remove(&Key::new(*len, *data)); // absent is fine
    }
    Ok(())
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the kernel object"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orig_dst_round_trips_both_families() {
        let v4 = OrigDst {
            addr: v4_mapped([10, 244, 1, 3]),
            port: 8080,
            family: AF_INET,
        };
        assert_eq!(to_socket_addr(&v4), "10.244.1.3:8080".parse().unwrap());
        let ip: std::net::Ipv6Addr = "fd00:244:1::3".parse().unwrap();
        let v6 = OrigDst {
            addr: ip.octets(),
            port: 443,
            family: trellis_common::AF_INET6,
        };
        assert_eq!(to_socket_addr(&v6), "[fd00:244:1::3]:443".parse().unwrap());
    }

    #[test]
    fn listener_keys_map_v4_into_v6() {
        assert_eq!(
            ip_key("10.0.0.1".parse().unwrap()),
            v4_mapped([10, 0, 0, 1])
        );
    }
}
