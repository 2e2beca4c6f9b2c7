//! Readiness, one answer for both `/readyz` endpoints (admin and metrics): the capture
//! programs are attached (before either endpoint serves), the pods are reconciled against
//! their source (control's config, or the pods file), and a current certificate is held for
//! every enrolled pod's identity.
use std::{collections::BTreeSet, sync::Arc, time::SystemTime};

use tokio::sync::watch;

use crate::{identity::Svids, pods::AgentStatus, state::MeshState};

/// What readiness reads, each owned elsewhere.
#[derive(Clone)]
pub struct Readiness {
    pub status: watch::Receiver<AgentStatus>,
    pub svids: watch::Receiver<Svids>,
    pub state: watch::Receiver<Arc<MeshState>>,
}

impl Readiness {
    /// `Ok` when ready, else what is missing.
    pub fn check(&self) -> Result<(), String> {
        check(
            &self.status.borrow(),
            &self.svids.borrow(),
            &self.state.borrow(),
        )
    }
}

fn check(status: &AgentStatus, svids: &Svids, state: &MeshState) -> Result<(), String> {
    if !status.ready {
        return Err("pods not reconciled yet (waiting for control's config)".into());
    }
    let now = SystemTime::now();
    let missing: BTreeSet<&str> = status
        .pods
        .iter()
        .filter(|p| p.state == "enrolled")
        .filter_map(|p| p.ips.iter().find_map(|ip| state.workloads.get(ip)))
        .filter_map(|w| w.identity.as_deref())
        .filter(|id| svids.get(*id).is_none_or(|s| s.not_after <= now))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "no current certificate yet for {}",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{identity::Svid, pods::PodStatus, state::Workload};

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn svid(not_after: SystemTime) -> Arc<Svid> {
        Arc::new(Svid {
            identity: ID.into(),
            cert_chain_pem: String::new(),
            key_pem: String::new(),
            root_pem: String::new(),
            received: SystemTime::now(),
            not_after,
        })
    }

    #[test]
    fn ready_needs_reconciled_pods_and_a_current_certificate_for_each_enrolled_identity() {
        let ip = "10.244.1.2".parse().unwrap();
        let pod = PodStatus {
            uid: "u".into(),
            namespace: "shop".into(),
            name: "web".into(),
            ips: vec![ip],
            state: "enrolled",
            error: None,
            registry_only: false,
            egress_refused: 0,
        };
        let mut status = AgentStatus {
            ready: false,
            pods: vec![pod],
        };
        let mut state = MeshState::default();
        state.workloads.insert(
            ip,
            Arc::new(Workload::new(
                "web",
                "shop",
                Some(ID.into()),
                "n1",
                &Default::default(),
            )),
        );
        let mut svids = Svids::new();
        assert!(
            check(&status, &svids, &state)
                .unwrap_err()
                .contains("reconciled")
        );
        status.ready = true;
        assert!(check(&status, &svids, &state).unwrap_err().contains(ID));
        svids.insert(ID.into(), svid(SystemTime::now() - Duration::from_secs(1)));
        assert!(
            check(&status, &svids, &state).unwrap_err().contains(ID),
            "expired"
        );
        svids.insert(
            ID.into(),
            svid(SystemTime::now() + Duration::from_secs(600)),
        );
        assert_eq!(check(&status, &svids, &state), Ok(()));
        // A pod that failed to enroll needs no certificate to be ready.
        status.pods[0].state = "failed";
        svids.clear();
        assert_eq!(check(&status, &svids, &state), Ok(()));
    }
}
