//! The per-pod DNS servers: UDP on loopback:15053 in the pod's netns (the kernel steers the
//! pod's port-53 datagrams there) and TCP handed over by the outbound proxy. Forwarded queries
//! leave from the pod's own netns, so they reach the pod's resolver as the pod would.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};
use tracing::debug;

use super::{Reply, answer};
use crate::{
    metrics::DnsAnswer,
    proxy::{PodCtx, Shared, connect},
};

/// Queries of one pod being forwarded at once; past it new ones are dropped (the client
/// retries), so a flood cannot grow the agent's memory.
const MAX_FORWARDS: usize = 64;
/// How long the pod's resolver has to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// A TCP client that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Largest UDP message taken (EDNS clients may offer 4096-byte answers; queries are far smaller).
const UDP_MAX: usize = 4096;

/// Answers the pod's UDP queries until the task is dropped.
pub async fn serve_udp(sock: UdpSocket, pod: Arc<PodCtx>, shared: Arc<Shared>) {
    let sock = Arc::new(sock);
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from a client that went away surface here; nothing to do but go on.
                debug!(pod = %pod.name, "DNS receive: {e}");
                continue;
            }
        };
        match local(&buf[..n], &pod, &shared) {
            Reply::Answer(a) | Reply::FormErr(a) => {
                let _ = sock.send_to(&a, client).await;
            }
            Reply::Drop => {}
            Reply::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    shared.metrics.dns(DnsAnswer::dropped);
                    continue;
                };
                let (sock, pod, shared) = (sock.clone(), pod.clone(), shared.clone());
                // Only a forwarded query outlives the receive buffer.
                let query = buf[..n].to_vec();
                tokio::spawn(async move {
                    let upstream = shared.maps.dns_resolver.get(pod.netns_cookie);
                    let answer = match upstream {
                        Some(to) => forward_udp(&pod, to, &query).await,
                        None => Err(io::Error::other("no resolver recorded for the pod")),
                    };
                    let answer = settle(answer, &query, &pod, &shared, upstream);
                    if let Some(a) = answer {
                        let _ = sock.send_to(&a, client).await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Serves DNS over TCP on a captured connection to `resolver` port 53: length-prefixed
/// messages, answered in order; forwarded ones go over one connection to the resolver.
pub async fn serve_tcp(
    mut client: TcpStream,
    resolver: SocketAddr,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
) {
    let mut upstream: Option<TcpStream> = None;
    loop {
        let Ok(Ok(query)) = timeout(TCP_IDLE, read_frame(&mut client)).await else {
            return;
        };
        let answer = match local(&query, &pod, &shared) {
            Reply::Answer(a) | Reply::FormErr(a) => a,
            Reply::Drop => return,
            Reply::Forward => {
                let result = forward_tcp(&pod, resolver, &mut upstream, &query).await;
                if result.is_err() {
                    upstream = None;
                }
                match settle(result, &query, &pod, &shared, Some(resolver)) {
                    Some(a) => a,
                    None => return,
                }
            }
        };
        if write_frame(&mut client, &answer).await.is_err() {
            return;
        }
    }
}

/// The mesh's answer, counted, or what to do instead.
fn local(query: &[u8], pod: &PodCtx, shared: &Shared) -> Reply {
    let reply = answer(query, &pod.namespace, &shared.state.borrow().dns);
    match &reply {
        Reply::Answer(_) => shared.metrics.dns(DnsAnswer::mesh),
        Reply::FormErr(_) | Reply::Drop => shared.metrics.dns(DnsAnswer::malformed),
        Reply::Forward => {}
    }
    reply
}

/// A forwarded answer, counted; a failure becomes SERVFAIL (so the client tries its next
/// resolver at once rather than waiting out its timeout).
fn settle(
    result: io::Result<Vec<u8>>,
    query: &[u8],
    pod: &PodCtx,
    shared: &Shared,
    upstream: Option<SocketAddr>,
) -> Option<Vec<u8>> {
    match result {
        Ok(a) => {
            shared.metrics.dns(DnsAnswer::forwarded);
            Some(a)
        }
        Err(e) => {
            shared.metrics.dns(DnsAnswer::failed);
            debug!(pod = %pod.name, upstream = ?upstream, "forwarding a DNS query failed: {e}");
            let id = u16::from_be_bytes([query[0], query[1]]);
            Message::error_msg(id, OpCode::Query, ResponseCode::ServFail)
                .to_vec()
                .ok()
        }
    }
}

/// `host`'s first address in one family, asked of the pod's resolver (else the agent's) from
/// the pod's netns (a ServiceEntry endpoint with resolution DNS is found as the pod would
/// find it).
pub async fn resolve(pod: &PodCtx, shared: &Shared, host: &str, v4: bool) -> io::Result<IpAddr> {
    let resolver = shared
        .maps
        .dns_resolver
        .get(pod.netns_cookie)
        .or(shared.dns_upstream)
        .ok_or_else(|| {
            io::Error::other(
                "the pod has asked no resolver yet and the agent has none (--dns-upstream)",
            )
        })?;
    let name = Name::from_ascii(format!("{host}.")).map_err(io::Error::other)?;
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        name,
        if v4 { RecordType::A } else { RecordType::AAAA },
    ));
    let bytes = query.to_vec().map_err(io::Error::other)?;
    let answer = forward_udp(pod, resolver, &bytes).await?;
    let answer = Message::from_vec(&answer).map_err(io::Error::other)?;
    answer
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) if v4 => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) if !v4 => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .ok_or_else(|| {
            io::Error::other(format!(
                "{resolver} has no {} address for {host} ({})",
                if v4 { "IPv4" } else { "IPv6" },
                answer.metadata.response_code
            ))
        })
}

async fn forward_udp(pod: &PodCtx, to: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = pod.netns.run_in(&pod.home, || {
        let s = std::net::UdpSocket::bind(local)?;
        s.set_nonblocking(true)?;
        Ok::<_, io::Error>(s)
    })??;
    let sock = UdpSocket::from_std(sock)?;
    sock.connect(to).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; UDP_MAX];
    timeout(FORWARD_TIMEOUT, async {
        // A connected socket only hears from `to`; skip anything that is not this query's answer.
        loop {
            let n = sock.recv(&mut buf).await?;
            if n >= 2 && buf[..2] == query[..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{to} did not answer")))?
}

async fn forward_tcp(
    pod: &PodCtx,
    to: SocketAddr,
    conn: &mut Option<TcpStream>,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    timeout(FORWARD_TIMEOUT, async {
        let stream = match conn.take() {
            Some(s) => s,
            None => connect(pod.socket_for(to)?, to).await?,
        };
        let stream = conn.insert(stream);
        write_frame(stream, query).await?;
        read_frame(stream).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{to} did not answer")))?
}

async fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = s.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    s.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_frame(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("DNS message over 64 KiB"))?;
    let mut frame = Vec::with_capacity(msg.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    s.write_all(&frame).await
}
