//! Splits one node update into `ConfigUpdate` messages small enough to send: about `CHUNK_BYTES`
//! of resources each, so no message nears the gRPC limit however large the config grows. The
//! agent applies the update when its last message (`more` unset) arrives.
use prost::Message as _;
use trellis_api as api;

use crate::compile::Key;

/// Target size of the resources in one message. Each node's stream keeps an encode buffer as
/// large as the largest message it sent, for as long as it is open: at 1 MiB, 50 nodes held
/// 100 MB of them after their snapshots. Per message overhead is a few bytes, so small is cheap.
pub const CHUNK_BYTES: usize = 64 << 10;

/// Room left in a message for everything but its resources (version, flags, trust domain).
const ENVELOPE_BYTES: usize = 64 << 10;

/// The largest single resource that can be sent: one alone in a message must fit the limit.
pub const MAX_RESOURCE_BYTES: usize = api::MAX_MESSAGE_BYTES - ENVELOPE_BYTES;

/// A resource too large to send, and its encoded size.
#[derive(Debug, PartialEq)]
pub struct Oversized {
    pub key: Key,
    pub bytes: usize,
}

/// `r`'s encoded size if a message can carry it; else None, and it is recorded in `oversized`.
pub fn fits(
    key: &Key,
    r: &api::Resource,
    max_bytes: usize,
    oversized: &mut Vec<Oversized>,
) -> Option<usize> {
    let bytes = r.encoded_len();
    if bytes <= max_bytes {
        return Some(bytes);
    }
    oversized.push(Oversized {
        key: key.clone(),
        bytes,
    });
    None
}

/// Gathers the messages of one update: removals, then upserts, about `chunk_bytes` of them each
/// (a resource larger than that goes alone). A message is handed out as soon as the next item
/// would overflow it, so a snapshot is never held decoded whole: only the message being filled.
pub struct Chunker {
    header: api::ConfigUpdate,
    current: api::ConfigUpdate,
    size: usize,
    chunk_bytes: usize,
}

impl Chunker {
    pub fn new(header: api::ConfigUpdate, chunk_bytes: usize) -> Self {
        Self {
            current: header.clone(),
            header,
            size: 0,
            chunk_bytes,
        }
    }

    /// The full message to send before adding `bytes` more, if they would overflow it.
    fn room_for(&mut self, bytes: usize) -> Option<api::ConfigUpdate> {
        let empty = self.current.upserts.is_empty() && self.current.removals.is_empty();
        let full = (!empty && self.size + bytes > self.chunk_bytes).then(|| {
            self.size = 0;
            let full = std::mem::replace(&mut self.current, self.header.clone());
            api::ConfigUpdate { more: true, ..full }
        });
        self.size += bytes;
        full
    }

    /// Adds a removal; returns a full message to send first, if any.
    pub fn remove(&mut self, key: api::ResourceKey) -> Option<api::ConfigUpdate> {
        let full = self.room_for(key.encoded_len());
        self.current.removals.push(key);
        full
    }

    /// Adds an upsert of `bytes` encoded; returns a full message to send first, if any.
    pub fn upsert(&mut self, r: &api::Resource, bytes: usize) -> Option<api::ConfigUpdate> {
        let full = self.room_for(bytes);
        self.current.upserts.push(r.clone());
        full
    }

    /// The update's last message (always one, even for an empty update).
    pub fn finish(self) -> api::ConfigUpdate {
        api::ConfigUpdate {
            more: false,
            ..self.current
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, spec_bytes: usize) -> api::Resource {
        api::Resource {
            resource: Some(api::resource::Resource::Policy(api::Policy {
                kind: "VirtualService".into(),
                namespace: "shop".into(),
                name: name.into(),
                spec_json: "x".repeat(spec_bytes),
            })),
        }
    }

    /// The messages `Chunker` hands out for one update.
    fn split(
        header: &api::ConfigUpdate,
        upserts: Vec<api::Resource>,
        removals: Vec<api::ResourceKey>,
        chunk_bytes: usize,
    ) -> Vec<api::ConfigUpdate> {
        let mut chunker = Chunker::new(header.clone(), chunk_bytes);
        let mut msgs: Vec<_> = removals
            .into_iter()
            .filter_map(|k| chunker.remove(k))
            .collect();
        msgs.extend(
            upserts
                .iter()
                .filter_map(|r| chunker.upsert(r, r.encoded_len())),
        );
        msgs.push(chunker.finish());
        msgs
    }

    fn header() -> api::ConfigUpdate {
        api::ConfigUpdate {
            version: 7,
            snapshot: true,
            trust_domain: "cluster.local".into(),
            ..Default::default()
        }
    }

    #[test]
    fn updates_split_into_messages_near_the_chunk_size() {
        let upserts: Vec<_> = (0..10).map(|i| policy(&format!("p{i}"), 300)).collect();
        let removals = vec![api::ResourceKey {
            kind: api::Kind::Service as i32,
            name: "shop/old".into(),
        }];
        let msgs = split(&header(), upserts.clone(), removals.clone(), 1000);
        assert!(msgs.len() >= 4, "{} messages", msgs.len());
        for m in &msgs {
            assert_eq!(
                (m.version, m.snapshot, m.trust_domain.as_str()),
                (7, true, "cluster.local")
            );
            let bytes: usize = m.upserts.iter().map(|r| r.encoded_len()).sum();
            assert!(bytes <= 1000, "{bytes} bytes in one message");
        }
        let more: Vec<bool> = msgs.iter().map(|m| m.more).collect();
        assert!(more[..more.len() - 1].iter().all(|m| *m) && !more[more.len() - 1]);
        let all: Vec<_> = msgs.iter().flat_map(|m| m.upserts.clone()).collect();
        assert_eq!(all, upserts, "every resource once, in order");
        assert_eq!(msgs[0].removals, removals);

        // A resource over the chunk size goes alone; an empty update is still one message.
        let msgs = split(
            &header(),
            vec![policy("big", 5000), policy("small", 1)],
            vec![],
            1000,
        );
        assert_eq!(
            msgs.iter().map(|m| m.upserts.len()).collect::<Vec<_>>(),
            [1, 1]
        );
        let msgs = split(&header(), vec![], vec![], 1000);
        assert_eq!(msgs.len(), 1);
        assert!(!msgs[0].more);
    }

    #[test]
    fn resources_too_large_for_any_message_are_withheld_with_their_size() {
        let key = |n: &str| (api::Kind::Policy as i32, n.to_owned());
        let mut oversized = Vec::new();
        let mut upserts = vec![
            (key("small"), policy("small", 10)),
            (key("huge"), policy("huge", 2000)),
        ];
        upserts.retain(|(k, r)| fits(k, r, 1000, &mut oversized).is_some());
        assert_eq!(upserts.len(), 1);
        assert_eq!(upserts[0].0, key("small"));
        assert_eq!(oversized.len(), 1);
        assert_eq!(oversized[0].key, key("huge"));
        assert!(oversized[0].bytes > 2000, "{}", oversized[0].bytes);
    }
}
