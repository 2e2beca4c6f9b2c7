//! The real node's configuration files. Every daemon gets its own state under the run
//! directory, its own socket and loopback ports, so nothing of the machine's defaults is used.
use std::path::Path;

use super::{BRIDGE, NETWORK, NODE_IP, PAUSE_IMAGE, POD_CIDR};

/// containerd 1.6 with the CRI plugin. `restrict_oom_score_adj`: this machine lacks
/// CAP_SYS_RESOURCE, and without it every sandbox fails ("can't get final child's PID from pipe").
/// Network namespaces live under the state dir so teardown finds them all.
pub fn containerd(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
plugin_dir = ""
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.ttrpc.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
"#
    )
}

/// A bridge of its own with host-local addresses from the pod CIDR, the node's address as the pods'
/// default route (Service addresses are routed there, where kube-proxy translates them); no
/// masquerading (pods talk to each other and the node only), so the CNI plugins add no iptables
/// rules.
pub fn cni(dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                "dataDir": dir.join("cni/ipam"),
            },
        }],
    })
    .to_string()
}

/// kubelet: cgroupfs driver (systemd is not PID 1 here), node status every 2 s (Ready in
/// seconds, not 40), pods synced every 3 s (a deleted pod is gone in 9 s instead of 15), serving on the node's bridge address only, no OOM score changes (no
/// CAP_SYS_RESOURCE).
pub fn kubelet(port: u16, healthz_port: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
cgroupDriver: cgroupfs
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 3s
failSwapOn: false
oomScoreAdj: 0
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
resolvConf: /etc/resolv.conf
containerLogMaxSize: 1Mi
podCIDR: {POD_CIDR}
"#
    )
}
