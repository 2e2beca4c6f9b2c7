//! HBONE's HTTP/2 streams, driven with `h2` itself rather than through hyper: a CONNECT stream
//! as a byte stream whose writes go straight into h2 from the task that writes (hyper's upgrade
//! hands every write to a task of its own, which cost a copy, a channel hop and a wake-up per
//! write), and a request's or response's body received or sent on a stream.
use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use hyper::{
    HeaderMap, Response, StatusCode,
    body::{Body as _, Bytes, Frame, SizeHint},
    header::{self, HeaderName, HeaderValue},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::http::{Body, BodyError};

/// A CONNECT stream as a byte stream. Ends its side like TCP's FIN (an empty DATA frame with
/// END_STREAM); a peer's RST_STREAM with NO_ERROR or CANCEL reads as the end.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    buf: Bytes,
    ended: bool,
}

impl Tunnel {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
            ended: false,
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.buf = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                        Some(Reason::STREAM_CLOSED) => {
                            Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
                        }
                        _ => Err(to_io(e)),
                    });
                }
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf.split_to(n));
        // The window reopens as the reader takes the bytes, so a slow reader slows the sender.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(capacity(&mut self.send, buf.len(), cx))?;
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what h2 buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Waits until `send` may take some of `wanted` bytes; how many. The stream buffers at most
/// what it was granted, so a writer faster than the peer's window waits here.
fn capacity(
    send: &mut SendStream<Bytes>,
    wanted: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    send.reserve_capacity(wanted);
    loop {
        let granted = send.capacity();
        if granted > 0 {
            return Poll::Ready(Ok(granted.min(wanted)));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the HTTP/2 stream is closed",
                )));
            }
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().expect("checked")
    } else {
        io::Error::other(e)
    }
}

/// A request's or response's body arriving on a stream, as hyper's own would: its length from
/// `content-length`, the window reopened as it is read, and a RST_STREAM with NO_ERROR (an early
/// answer) its end rather than an error.
pub struct RecvBody {
    recv: RecvStream,
    length: Option<u64>,
    data_done: bool,
}

impl RecvBody {
    pub fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        let length = if recv.is_end_stream() {
            Some(0)
        } else {
            headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
        };
        Self {
            recv,
            length,
            data_done: false,
        }
    }
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let early = |e: h2::Error| match e.reason() {
            Some(Reason::NO_ERROR) => None,
            _ => Some(Err(e.into())),
        };
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(early(e)),
                None => self.data_done = true,
            }
        }
        Poll::Ready(match ready!(self.recv.poll_trailers(cx)) {
            Ok(trailers) => trailers.map(|t| Ok(Frame::trailers(t))),
            Err(e) => early(e),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.length
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// Readies a message's head for HTTP/2: without the headers HTTP/2 forbids (h2 refuses to send
/// them), and with its body's length when that is known and not stated. `status` is a
/// response's, None for a request.
pub fn h2_head(headers: &mut HeaderMap, body: &Body, status: Option<StatusCode>) {
    let request = status.is_none();
    if let Some(names) = headers.remove(header::CONNECTION) {
        for name in names.to_str().unwrap_or_default().split(',') {
            headers.remove(name.trim());
        }
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if !request || headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
    let bodiless = status.is_some_and(|s| {
        s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED
    });
    if let Some(len) = body.size_hint().exact()
        && !bodiless
        && (len > 0 || !request)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// Sends `body` on `send` to its end (trailers included), stopping early if the peer resets the
/// stream while the body has nothing to give.
pub async fn send_body(mut body: Body, mut send: SendStream<Bytes>) {
    enum Next {
        Frame(Option<Result<Frame<Bytes>, BodyError>>),
        Reset,
    }
    loop {
        let next = poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                return Poll::Ready(Next::Frame(frame));
            }
            // Only while the body is waiting: polling this also wakes on every grant of window.
            send.poll_reset(cx).map(|_| Next::Reset)
        })
        .await;
        let frame = match next {
            Next::Reset => return,
            Next::Frame(None) => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Next::Frame(Some(Err(_))) => return send.send_reset(Reason::INTERNAL_ERROR),
            Next::Frame(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => loop {
                let end = body.is_end_stream();
                if data.is_empty() {
                    if end {
                        let _ = send.send_data(Bytes::new(), true);
                        return;
                    }
                    break;
                }
                let Ok(n) = poll_fn(|cx| capacity(&mut send, data.len(), cx)).await else {
                    return;
                };
                let chunk = data.split_to(n);
                let last = end && data.is_empty();
                if send.send_data(chunk, last).is_err() || last {
                    return;
                }
            },
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = send.send_trailers(trailers);
                }
                return;
            }
        }
    }
}

/// Answers a request received on `respond` with `resp`, its body to the end.
pub async fn answer(mut respond: SendResponse<Bytes>, resp: Response<Body>) {
    let (mut head, body) = resp.into_parts();
    h2_head(&mut head.headers, &body, Some(head.status));
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(send) if !end => send_body(body, send).await,
        Ok(_) => {}
        Err(e) => debug!("answering on an HBONE connection: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;
    use hyper::{Method, Request};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A real HTTP/2 connection over an in-memory pipe, with h2's default 64 KiB windows so that
    /// flow control is exercised: the client's handle, and the server's next stream.
    async fn connection() -> (
        h2::client::SendRequest<Bytes>,
        tokio::sync::mpsc::Receiver<(hyper::Request<RecvStream>, SendResponse<Bytes>)>,
    ) {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let (streams, accepted) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.unwrap();
            while let Some(Ok(stream)) = conn.accept().await {
                streams.send(stream).await.unwrap();
            }
        });
        let (send, conn) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(conn);
        (send, accepted)
    }

    #[tokio::test]
    async fn a_tunnel_carries_bytes_both_ways_past_the_window_and_ends_like_tcp() {
        let (client, mut accepted) = connection().await;
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let server = tokio::spawn(async move {
            let (req, mut respond) = accepted.recv().await.unwrap();
            assert_eq!(req.method(), Method::CONNECT);
            let send = respond.send_response(Response::new(()), false).unwrap();
            let mut tunnel = Tunnel::new(send, req.into_body());
            // An echo that answers only once the client has ended its side.
            let mut got = Vec::new();
            tunnel.read_to_end(&mut got).await.unwrap();
            tunnel.write_all(&got).await.unwrap();
            tunnel.shutdown().await.unwrap();
            got.len()
        });
        let head = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = client
            .ready()
            .await
            .unwrap()
            .send_request(head, false)
            .unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut tunnel = Tunnel::new(send, resp.into_body());
        tunnel.write_all(&sent).await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut back = Vec::new();
        tunnel.read_to_end(&mut back).await.unwrap();
        assert_eq!(server.await.unwrap(), sent.len());
        assert!(
            back == sent,
            "{} bytes came back, not the {} sent",
            back.len(),
            sent.len()
        );
    }

    /// A body of `data`, then `trailers`.
    fn body(data: &'static str, trailers: Option<HeaderMap>) -> Body {
        let data = http_body_util::Full::new(Bytes::from_static(data.as_bytes()));
        data.with_trailers(async move { trailers.map(Ok) })
            .map_err(|never| match never {})
            .boxed()
    }

    #[tokio::test]
    async fn bodies_keep_their_data_trailers_and_length_both_ways() {
        let (client, mut accepted) = connection().await;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let answered = trailers.clone();
        let server = tokio::spawn(async move {
            let (req, respond) = accepted.recv().await.unwrap();
            let (head, recv) = req.into_parts();
            // The request stated its length in a header that HTTP/2 forbids to go with it.
            assert!(!head.headers.contains_key(header::CONNECTION));
            let received = RecvBody::new(recv, &head.headers);
            assert_eq!(received.size_hint().exact(), Some(10));
            let got = received.collect().await.unwrap();
            assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
            assert_eq!(got.to_bytes(), "helloworld");
            let mut resp = Response::new(body("bigger", Some(answered)));
            resp.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            answer(respond, resp).await;
        });
        let mut head = Request::builder()
            .method(Method::POST)
            .uri("http://app.shop/upload")
            .header(header::CONTENT_LENGTH, "10")
            .header(header::CONNECTION, "keep-alive")
            .body(())
            .unwrap();
        let body = body("helloworld", Some(trailers));
        h2_head(head.headers_mut(), &body, None);
        let (resp, send) = client
            .ready()
            .await
            .unwrap()
            .send_request(head, false)
            .unwrap();
        tokio::spawn(send_body(body, send));
        let (head, recv) = resp.await.unwrap().into_parts();
        assert!(!head.headers.contains_key(header::TRANSFER_ENCODING));
        let got = RecvBody::new(recv, &head.headers).collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(got.to_bytes(), "bigger");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_known_length_is_stated_and_an_empty_answer_ends_with_its_head() {
        let (client, mut accepted) = connection().await;
        let server = tokio::spawn(async move {
            let (_, respond) = accepted.recv().await.unwrap();
            answer(
                respond,
                super::super::http::error(StatusCode::FORBIDDEN, "denied\n"),
            )
            .await;
            let (_, respond) = accepted.recv().await.unwrap();
            let mut resp = Response::new(body("", None));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            answer(respond, resp).await;
        });
        for (status, length, text) in [
            (StatusCode::FORBIDDEN, Some("7"), "denied\n"),
            (StatusCode::NO_CONTENT, None, ""),
        ] {
            let head = Request::get("http://app.shop/").body(()).unwrap();
            let (resp, _) = client
                .clone()
                .ready()
                .await
                .unwrap()
                .send_request(head, true)
                .unwrap();
            let (head, recv) = resp.await.unwrap().into_parts();
            assert_eq!(head.status, status);
            assert_eq!(
                head.headers
                    .get(header::CONTENT_LENGTH)
                    .map(|v| v.to_str().unwrap()),
                length
            );
            let got = RecvBody::new(recv, &head.headers).collect().await.unwrap();
            assert_eq!(got.to_bytes(), text);
        }
        server.await.unwrap();
    }
}
