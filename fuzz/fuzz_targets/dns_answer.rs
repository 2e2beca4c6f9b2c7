//! The agent's DNS answers (agent/src/dns): any datagram a pod might send. Nothing panics; a
//! response is never answered (no reflection loops); whatever is answered parses, carries the
//! query's id and is a response; a mesh answer holds only the mesh's addresses.
#![no_main]

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use trellis_agent::dns::{Names, Reply, answer};

fuzz_target!(|data: &[u8]| {
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let names = Names::from([("web.shop.svc.cluster.local".to_owned(), vec![vip])]);
    let query = Message::from_vec(data).ok();
    match answer(data, "shop", &names) {
        Reply::Drop => {
            if data.len() >= 12 {
                // Only a response (or an unparsable message too short for a header) is dropped.
                assert_eq!(
                    query.map(|q| q.metadata.message_type),
                    Some(MessageType::Response)
                );
            }
        }
        Reply::Forward => {
            assert!(query.is_some_and(|q| q.metadata.message_type == MessageType::Query));
        }
        Reply::Answer(bytes) | Reply::FormErr(bytes) => {
            let out = Message::from_vec(&bytes).expect("our answers parse");
            assert_eq!(out.metadata.message_type, MessageType::Response);
            assert_eq!(out.metadata.id, u16::from_be_bytes([data[0], data[1]]));
            for r in &out.answers {
                assert_eq!(r.data.ip_addr(), Some(vip), "{r:?}");
            }
        }
    }
});
