//! Shared by the control tests: the agent's real config client, following control as a node.
use std::time::Duration;

use tokio::sync::mpsc;
use trellis_agent::config::{ControlEndpoint, NodeConfig, follow};
use trellis_api as api;

pub type Updates = mpsc::UnboundedReceiver<(api::ConfigUpdate, NodeConfig)>;

/// Follows control as `node`; each applied update arrives with the config after it.
pub fn subscribe(endpoint: ControlEndpoint, node: &str) -> Updates {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(follow(endpoint, node.to_owned(), move |config, update| {
        let _ = tx.send((update.clone(), config.clone()));
    }));
    rx
}

/// Waits (at most 20 s) for an update after which `pred` holds.
pub async fn until(
    rx: &mut Updates,
    what: &str,
    pred: impl Fn(&NodeConfig) -> bool,
) -> (api::ConfigUpdate, NodeConfig) {
    let wait = async {
        loop {
            let (update, config) = rx.recv().await.expect("follower stopped");
            if pred(&config) {
                return (update, config);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("never received: {what}"))
}

pub fn web_ips(c: &NodeConfig) -> Vec<String> {
    c.workloads()
        .filter(|w| w.name == "web")
        .flat_map(|w| w.ips.clone())
        .collect()
}
