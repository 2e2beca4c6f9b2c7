//! A gRPC app for the end-to-end tests (tonic over h2c, as gRPC apps in a mesh speak).
//! - `serve --version V --pod P --listen ADDR`: serves `trellis.test.v1.Greeter`; prints `ready`.
//! - `call URL (hello | count N | chat N) [--header 'NAME: VALUE']...`: one call; prints the
//!   replies as a JSON array, or fails with the gRPC status.
use std::{pin::Pin, time::Duration};

use serde_json::json;
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue, transport::Server};

mod pb {
    tonic::include_proto!("trellis.test.v1");
}
use pb::{
    CountRequest, HelloReply, HelloRequest,
    greeter_client::GreeterClient,
    greeter_server::{Greeter, GreeterServer},
};

/// How long a call may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on what one streaming call asks for.
const MAX_MESSAGES: u32 = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(&args));
    if let Err(e) = result {
        eprintln!("trellis-grpc-app: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> Result<(), String> {
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[2..]).await,
        Some("call") if args.len() >= 4 => call(&args[2], &args[3..]).await,
        _ => Err("usage: trellis-grpc-app serve --version V --pod P --listen ADDR | call URL (hello | count N | chat N) [--header 'NAME: VALUE']...".into()),
    }
}

struct Greeting {
    version: String,
    pod: String,
}

impl Greeting {
    fn reply<T>(&self, req: &Request<T>, message: String, seq: u32) -> HelloReply {
        let client_identity = req
            .metadata()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').find_map(|kv| kv.strip_prefix("URI=")))
            .unwrap_or_default()
            .to_owned();
        HelloReply {
            version: self.version.clone(),
            pod: self.pod.clone(),
            message,
            seq,
            client_identity,
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send>>;

#[tonic::async_trait]
impl Greeter for Greeting {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let message = format!("hello {}", req.get_ref().name);
        Ok(Response::new(self.reply(&req, message, 0)))
    }

    type CountStream = ReplyStream;

    async fn count(&self, req: Request<CountRequest>) -> Result<Response<ReplyStream>, Status> {
        let count = req.get_ref().count;
        if count > MAX_MESSAGES {
            return Err(Status::invalid_argument(format!("count > {MAX_MESSAGES}")));
        }
        let replies: Vec<_> = (0..count)
            .map(|i| Ok(self.reply(&req, format!("count {i}"), i)))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        req: Request<Streaming<HelloRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        // Replies carry the caller's identity as seen at the start of the call.
        let template = self.reply(&req, String::new(), 0);
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut seq = 0;
            while let Some(next) = incoming.next().await {
                let reply = next.map(|r| HelloReply {
                    message: format!("hello {}", r.name),
                    seq,
                    ..template.clone()
                });
                seq += 1;
                if tx.send(reply).await.is_err() || seq >= MAX_MESSAGES {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve(args: &[String]) -> Result<(), String> {
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or(format!("serve needs {name}"))
    };
    let greeting = Greeting {
        version: flag("--version")?,
        pod: flag("--pod")?,
    };
    let listen = flag("--listen")?;
    let addr: std::net::SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    println!("ready");
    Server::builder()
        .add_service(GreeterServer::new(greeting))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .map_err(|e| format!("serving: {e}"))
}

async fn call(url: &str, rest: &[String]) -> Result<(), String> {
    let (what, n, flags) = match rest {
        [w, flags @ ..] if w == "hello" => (w.as_str(), 1, flags),
        [w, n, flags @ ..] if w == "count" || w == "chat" => (
            w.as_str(),
            n.parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_MESSAGES).contains(n))
                .ok_or(format!("{w} {n}: want 1..={MAX_MESSAGES}"))?,
            flags,
        ),
        _ => return Err("call URL (hello | count N | chat N)".into()),
    };
    let mut headers = Vec::new();
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        match (flag.as_str(), flags.next()) {
            ("--header", Some(h)) => {
                let (name, value) = h
                    .split_once(':')
                    .ok_or(format!("--header {h:?}: want 'NAME: VALUE'"))?;
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
            (other, _) => return Err(format!("expected --header 'NAME: VALUE', got {other}")),
        }
    }
    let replies = tokio::time::timeout(TIMEOUT, async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("{url}: {e}"))?
            .connect_timeout(TIMEOUT)
            .connect()
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let mut client = GreeterClient::new(channel);
        let status = |s: Status| format!("{what}: {s}");
        let replies: Vec<HelloReply> = match what {
            "hello" => {
                let req =
                    with_metadata(Request::new(HelloRequest { name: "one".into() }), &headers)?;
                vec![client.hello(req).await.map_err(status)?.into_inner()]
            }
            "count" => {
                let req = with_metadata(Request::new(CountRequest { count: n }), &headers)?;
                let mut stream = client.count(req).await.map_err(status)?.into_inner();
                let mut out = Vec::new();
                while let Some(r) = stream.next().await {
                    out.push(r.map_err(status)?);
                }
                out
            }
            _ => {
                // Each name is sent only after the previous reply came back, so the call is
                // truly interactive (both directions stream at once).
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let req = with_metadata(Request::new(ReceiverStream::new(rx)), &headers)?;
                tx.send(HelloRequest { name: "0".into() })
                    .await
                    .map_err(|e| e.to_string())?;
                let mut stream = client.chat(req).await.map_err(status)?.into_inner();
                let mut out = Vec::new();
                while let Some(r) = stream.next().await {
                    out.push(r.map_err(status)?);
                    if out.len() as u32 == n {
                        break;
                    }
                    let name = out.len().to_string();
                    tx.send(HelloRequest { name })
                        .await
                        .map_err(|e| e.to_string())?;
                }
                out
            }
        };
        Ok::<_, String>(replies)
    })
    .await
    .map_err(|_| format!("{what} to {url} timed out after {TIMEOUT:?}"))??;
    let out: Vec<_> = replies
        .iter()
        .map(|r| {
            json!({
                "version": r.version,
                "pod": r.pod,
                "message": r.message,
                "seq": r.seq,
                "client_identity": r.client_identity,
            })
        })
        .collect();
    println!("{}", serde_json::Value::Array(out));
    Ok(())
}

/// `req` with `headers` (lowercase name, value) as gRPC metadata.
fn with_metadata<T>(
    mut req: Request<T>,
    headers: &[(String, String)],
) -> Result<Request<T>, String> {
    for (name, value) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
            .map_err(|e| format!("header {name}: {e}"))?;
        let value: MetadataValue<_> = value.parse().map_err(|e| format!("header {name}: {e}"))?;
        req.metadata_mut().insert(key, value);
    }
    Ok(req)
}
