//! HTTP/2 connections to other pods' HBONE ports, pooled per (source pod, destination, expected
//! identity), so repeated connections pay no TCP or TLS handshake. Each key has its own lock,
//! so a burst of first connections makes one handshake, not one each. A connection made with a
//! certificate since renewed is replaced; streams still on it finish undisturbed.
use std::{collections::HashMap, future::Future, net::SocketAddr, sync::Arc, time::SystemTime};

use anyhow::Result;
use http_body_util::Empty;
use hyper::{body::Bytes, client::conn::http2::SendRequest};
use tokio::sync::Mutex;

pub type Sender = SendRequest<Empty<Bytes>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    /// The source pod's UID: its connections leave from its own netns and address.
    pub source: String,
    pub hbone: SocketAddr,
    pub identity: String,
}

struct Slot {
    /// When the certificate the connection presented was issued to us.
    cert: SystemTime,
    sender: Sender,
}

#[derive(Default)]
pub struct Pool {
    slots: std::sync::Mutex<HashMap<Key, Arc<Mutex<Option<Slot>>>>>,
}

impl Pool {
    /// A ready sender for `key`, connecting with `connect` when there is none that is open and
    /// made with the certificate issued at `cert`.
    pub async fn get<F, Fut>(&self, key: &Key, cert: SystemTime, connect: F) -> Result<Sender>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Sender>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(s) = slot.as_ref()
            && s.cert == cert
            && !s.sender.is_closed()
        {
            return Ok(s.sender.clone());
        }
        // Dropping the old sender lets its connection close once its streams end.
        *slot = None;
        let sender = connect().await?;
        *slot = Some(Slot {
            cert,
            sender: sender.clone(),
        });
        Ok(sender)
    }
}
