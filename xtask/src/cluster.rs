//! `cargo xtask cluster up|down|status`: a real single-node Kubernetes on this machine
//! (`trellis_e2e::kubenode`), for trying things by hand with kubectl.
use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Subcommand;
use trellis_e2e::kubenode::{self, KubeNode, State};

use crate::{cmd, setup};

#[derive(Subcommand)]
pub enum Action {
    /// Start the node and stay up until `cargo xtask cluster down` or Ctrl-C.
    Up,
    /// Stop the node and remove everything it made.
    Down,
    /// Say whether each daemon runs, and show the node and its pods.
    Status,
}

pub fn run(action: Action) -> Result<()> {
    cmd::require_root("cargo xtask cluster")?;
    match action {
        Action::Up => up(),
        Action::Down => down(),
        Action::Status => status(),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn up() -> Result<()> {
    setup::run()?;
    let node = KubeNode::start()?;
    // A handler (not a blocked mask, which the daemons would inherit) so Ctrl-C and `down`
    // end in an orderly teardown.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let kubeconfig = node.kubeconfig().display().to_string();
    println!(
        "\nA real Kubernetes node ({}) is up: kubelet, containerd, kube-proxy, kube-apiserver {}.\n\
         kubeconfig: {kubeconfig}\n\n  \
           export KUBECONFIG={kubeconfig}\n  \
           kubectl get nodes,pods -A\n\n\
         No registry is reachable: import images with\n  \
           ctr --address {} --namespace k8s.io images import IMAGE.tar\n\
         and use imagePullPolicy: IfNotPresent. Pods get addresses in {} on bridge {}.\n\
         Logs: {}/*.log. Stop with Ctrl-C or `cargo xtask cluster down`.",
        kubenode::NODE_NAME,
        trellis_e2e::apiserver::VERSION,
        node.state().dir.join("containerd.sock").display(),
        kubenode::POD_CIDR,
        kubenode::BRIDGE,
        node.state().dir.display(),
    );
    let mut died = None;
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        // Ctrl-C reaches the whole process group: etcd and kube-apiserver die of it too.
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        if let Some((name, _)) = node
            .state()
            .daemons
            .iter()
            .find(|(name, _)| !node.state().alive(name))
        {
            died = Some(name.clone());
            break;
        }
    }
    if let Some(name) = &died {
        eprintln!(
            "cluster: {name} exited; its log ends:\n{}",
            node.log_tail(name, 20)
        );
    }
    eprintln!("cluster: removing the node");
    let state = node.state().clone();
    let start = Instant::now();
    let problems = node.stop();
    report_removal(&state, &problems, start)?;
    if let Some(name) = died {
        bail!("{name} exited");
    }
    Ok(())
}

fn down() -> Result<()> {
    let Some(state) = State::load() else {
        println!("cluster: no node runs on this machine");
        return Ok(());
    };
    let start = Instant::now();
    if state.owner_alive() {
        eprintln!(
            "cluster: asking `cluster up` (pid {}) to remove the node",
            state.owner
        );
        unsafe { libc::kill(state.owner as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        while state.owner_alive() {
            if Instant::now() > deadline {
                bail!("process {} did not stop within 2 minutes", state.owner);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Killed before it could remove the node: its state is still recorded.
        let problems = kubenode::sweep_leftovers();
        report_removal(&state, &problems, start)
    } else {
        let problems = kubenode::sweep_leftovers();
        report_removal(&state, &problems, start)
    }
}

fn report_removal(state: &State, problems: &[String], start: Instant) -> Result<()> {
    let left = kubenode::leftovers(state);
    if problems.is_empty() && left.is_empty() {
        println!(
            "cluster: removed in {:.1} s; nothing is left (daemons, KUBE-* chains, cgroups, \
             bridge, mounts, directories, kernel settings checked)",
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    bail!(
        "the node was not removed completely:\n  {}",
        problems
            .iter()
            .chain(&left)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    )
}

fn status() -> Result<()> {
    let Some(state) = State::load() else {
        println!("cluster: no node runs on this machine (`cargo xtask cluster up` starts one)");
        return Ok(());
    };
    println!(
        "node {} started by pid {} ({}); kubeconfig {}",
        kubenode::NODE_NAME,
        state.owner,
        if state.owner_alive() {
            "running"
        } else {
            "gone"
        },
        state.kubeconfig.display()
    );
    for (name, pid) in &state.daemons {
        println!(
            "  {name:<24} pid {pid:<8} {}",
            if state.alive(name) {
                "running"
            } else {
                "NOT RUNNING"
            }
        );
    }
    println!(
        "  memory (RSS of daemons, shims and pods): {} MB",
        state.memory_bytes() / 1_000_000
    );
    if Path::new(&state.kubeconfig).is_file() {
        let _ = cmd::run(
            std::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&state.kubeconfig)
                .args(["get", "nodes,pods", "-A", "-o", "wide"]),
        );
    }
    Ok(())
}
