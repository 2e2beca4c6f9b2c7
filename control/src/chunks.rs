//! Splits one node update into `ConfigUpdate` messages small enough to send: about `CHUNK_BYTES`
//! of resources each, so no message nears the gRPC limit however large the config grows. The
//! agent applies the update when its last message (`more` unset) arrives.
use prost::Message as _;
use trellis_api as api;

use crate::compile::Key;

/// Target size of the resources in one message. Small enough that a message costs little memory
/// and time to encode on both ends, large enough that a big snapshot takes few messages.
pub const CHUNK_BYTES: usize = 1 << 20;

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

/// Drops (and returns) the upserts larger than `max_bytes`: no message could carry them.
pub fn withhold_oversized(
    upserts: &mut Vec<(Key, api::Resource)>,
    max_bytes: usize,
) -> Vec<Oversized> {
    let mut oversized = Vec::new();
    upserts.retain(|(key, r)| {
        let bytes = r.encoded_len();
        let fits = bytes <= max_bytes;
        if !fits {
            oversized.push(Oversized {
                key: key.clone(),
                bytes,
            });
        }
        fits
    });
    oversized
}

/// The messages of one update: removals, then upserts, at most about `chunk_bytes` of them
/// each (a resource larger than that goes alone); always at least one message.
pub fn split(
    header: &api::ConfigUpdate,
    upserts: Vec<api::Resource>,
    removals: Vec<api::ResourceKey>,
    chunk_bytes: usize,
) -> Vec<api::ConfigUpdate> {
    let mut messages = Vec::new();
    let mut current = header.clone();
    let mut size = 0;
    let mut room_for = |bytes: usize, current: &mut api::ConfigUpdate| {
        let empty = current.upserts.is_empty() && current.removals.is_empty();
        if !empty && size + bytes > chunk_bytes {
            let full = std::mem::replace(current, header.clone());
            messages.push(api::ConfigUpdate { more: true, ..full });
            size = 0;
        }
        size += bytes;
    };
    for key in removals {
        room_for(key.encoded_len(), &mut current);
        current.removals.push(key);
    }
    for r in upserts {
        room_for(r.encoded_len(), &mut current);
        current.upserts.push(r);
    }
    messages.push(api::ConfigUpdate {
        more: false,
        ..current
    });
    messages
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
        let mut upserts = vec![
            (key("small"), policy("small", 10)),
            (key("huge"), policy("huge", 2000)),
        ];
        let oversized = withhold_oversized(&mut upserts, 1000);
        assert_eq!(upserts.len(), 1);
        assert_eq!(upserts[0].0, key("small"));
        assert_eq!(oversized.len(), 1);
        assert_eq!(oversized[0].key, key("huge"));
        assert!(oversized[0].bytes > 2000, "{}", oversized[0].bytes);
    }
}
