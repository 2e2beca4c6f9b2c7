//! HTTP/2 connections to other pods' HBONE ports, pooled per (source pod, destination, expected
//! identity), so repeated connections pay no TCP or TLS handshake. Each key has its own lock,
//! so a burst of first connections makes one handshake, not one each. A connection made with a
//! certificate since renewed is replaced; streams still on it finish undisturbed.
//!
//! Each worker thread has its own connections.
//!
//! Each connection also remembers which of the destination's ports its agent takes HTTP/2
//! requests on directly (see `hbone::DIRECT`): learned from its answers to CONNECT, forgotten
//! with the connection.
use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::SystemTime,
};

use anyhow::Result;
use tokio::sync::Mutex;

use super::hbone::Sender;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    /// The worker thread that uses it (`workers::current`): a connection is driven on the
    /// worker that made it, so sharing it would wake another thread for each request.
    pub worker: usize,
    /// The source pod's UID: its connections leave from its own netns and address.
    pub source: String,
    pub hbone: SocketAddr,
    pub identity: String,
}

struct Slot {
    /// When the certificate the connection presented was issued to us.
    cert: SystemTime,
    sender: Sender,
    /// Targets whose requests may go on this connection without a tunnel.
    direct: HashSet<SocketAddr>,
}

impl Slot {
    fn current(&self, cert: SystemTime) -> bool {
        self.cert == cert && !self.sender.is_closed()
    }
}

#[derive(Default)]
pub struct Pool {
    slots: std::sync::Mutex<HashMap<Key, Arc<Mutex<Option<Slot>>>>>,
}

impl Pool {
    fn slot(&self, key: &Key) -> Arc<Mutex<Option<Slot>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// A ready sender for `key`, connecting with `connect` when there is none that is open and
    /// made with the certificate issued at `cert`.
    pub async fn get<F, Fut>(&self, key: &Key, cert: SystemTime, connect: F) -> Result<Sender>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Sender>>,
    {
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| s.current(cert)) {
            return Ok(s.sender.clone());
        }
        // Dropping the old sender lets its connection close once its streams end.
        *slot = None;
        let sender = connect().await?;
        *slot = Some(Slot {
            cert,
            sender: sender.clone(),
            direct: HashSet::new(),
        });
        Ok(sender)
    }

    /// The open connection for `key`, if its peer has said it takes requests for `target`
    /// directly.
    pub async fn direct(&self, key: &Key, cert: SystemTime, target: SocketAddr) -> Option<Sender> {
        let slot = self.slot(key);
        let slot = slot.lock().await;
        slot.as_ref()
            .filter(|s| s.current(cert) && s.direct.contains(&target))
            .map(|s| s.sender.clone())
    }

    /// Records whether `key`'s connection takes requests for `target` directly.
    pub async fn set_direct(&self, key: &Key, target: SocketAddr, direct: bool) {
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
        if let Some(s) = slot.as_mut() {
            if direct {
                s.direct.insert(target);
            } else {
                s.direct.remove(&target);
            }
        }
    }
}
