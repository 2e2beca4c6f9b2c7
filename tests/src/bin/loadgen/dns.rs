//! DNS clients for the capture tests: real queries sent the way musl's resolver sends them
//! (`sendto` on an unconnected socket), and a bounded burst of malformed ones.
use std::{
    io,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use serde_json::json;

use super::Opts;

fn socket(to: SocketAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

fn query_bytes(name: &str, aaaa: bool, id: u16) -> io::Result<Vec<u8>> {
    let name = Name::from_ascii(name).map_err(io::Error::other)?;
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        name,
        if aaaa {
            RecordType::AAAA
        } else {
            RecordType::A
        },
    ));
    m.to_vec().map_err(io::Error::other)
}

/// Prints `{"from", "rcode", "answers"}` for one query, or `{"error"}`.
pub fn query(to: SocketAddr, o: &Opts) -> io::Result<bool> {
    let s = socket(to)?;
    s.send_to(&query_bytes(&o.name, o.aaaa, 4242)?, to)?;
    let mut buf = [0u8; 4096];
    let (n, from) = match s.recv_from(&mut buf) {
        Ok(r) => r,
        Err(e) => {
            println!("{}", json!({"error": e.to_string()}));
            return Ok(false);
        }
    };
    let m = Message::from_vec(&buf[..n]).map_err(io::Error::other)?;
    let answers: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    println!(
        "{}",
        json!({"from": from.to_string(), "id": m.metadata.id, "rcode": m.metadata.response_code.to_string(), "answers": answers})
    );
    Ok(true)
}

/// Sends `--count` malformed datagrams of several kinds, then one good query for `--name`;
/// prints how many answers came back and whether the good query got one.
pub fn junk(to: SocketAddr, o: &Opts) -> io::Result<bool> {
    let s = socket(to)?;
    let good = query_bytes(&o.name, false, 4242)?;
    let mut seed = o.seed.max(1);
    let mut next = move || {
        // xorshift: reproducible noise without another dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut sent = 0u64;
    for i in 0..o.count {
        let d: Vec<u8> = match i % 5 {
            // A header cut short, and the good query cut in its question.
            0 => good[..5].to_vec(),
            1 => good[..good.len() - 3].to_vec(),
            // A question whose name runs past 255 bytes (labels of 63).
            2 => {
                let mut d = good[..12].to_vec();
                for _ in 0..8 {
                    d.push(63);
                    d.extend([b'a'; 63]);
                }
                d.extend([0, 0, 1, 0, 1]);
                d
            }
            // Random bytes of random length.
            3 => (0..(next() % 1400)).map(|_| next() as u8).collect(),
            // A response, which must not be answered.
            _ => {
                let mut d = good.clone();
                d[2] |= 0x80;
                d
            }
        };
        if s.send_to(&d, to).is_ok() {
            sent += 1;
        }
    }
    // Then the good query, retried as a resolver would (a burst overflows socket buffers, and
    // UDP drops what does not fit): at most 5 tries, each waiting for at most count + 1 answers.
    let mut buf = [0u8; 4096];
    let mut answers = 0u64;
    let mut good_answered = false;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    for _ in 0..5 {
        s.send_to(&good, to)?;
        for _ in 0..=o.count {
            let Ok(n) = s.recv(&mut buf) else { break };
            answers += 1;
            good_answered = Message::from_vec(&buf[..n])
                .is_ok_and(|m| m.metadata.id == 4242 && !m.answers.is_empty());
            if good_answered {
                break;
            }
        }
        if good_answered {
            break;
        }
    }
    println!(
        "{}",
        json!({"sent": sent, "answers": answers, "good_answered": good_answered})
    );
    Ok(good_answered)
}
