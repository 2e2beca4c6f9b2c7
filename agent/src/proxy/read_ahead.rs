//! A mutual-TLS connection's socket, read ahead in large chunks while it streams. rustls asks
//! its socket for at most 4 KB at a time, so each 16 KB record of a bulk stream took four or
//! five `recv` calls; here one `recv` takes up to `CHUNK` and rustls is served from memory.
//! Only a read that filled all rustls asked for (more is likely waiting) switches read-ahead
//! on, and the first time the socket would block it is off again and its buffer dropped: small
//! exchanges read straight into rustls as before, and an idle pooled connection holds no buffer.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Large enough for a few full TLS records per `recv`.
const CHUNK: usize = 64 * 1024;

pub struct ReadAhead<T> {
    inner: T,
    /// Read ahead, not yet handed out; empty (and unallocated) unless streaming.
    buf: BytesMut,
    streaming: bool,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            streaming: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if !this.streaming || out.remaining() >= CHUNK {
                let wanted = out.remaining();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                this.streaming = wanted > 0 && out.remaining() == 0;
                return Poll::Ready(Ok(()));
            }
            // Reuses the allocation while it is ours alone and empty.
            this.buf.reserve(CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    this.streaming = false;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: `out` stays unfilled, as the socket's own read would leave it.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_from_few_large_ones() {
        let (mut peer, socket) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data[..200_000]).await.unwrap();
        let mut reader = ReadAhead::new(socket);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < 100_000 {
            let n = reader.read(&mut small).await.unwrap();
            assert!(n > 0, "ended early");
            got.extend_from_slice(&small[..n]);
        }
        // 4 KB reads served from one large socket read: the rest of it is held here.
        assert!(!reader.buf.is_empty(), "nothing was read ahead");
        peer.write_all(&data[200_000..]).await.unwrap();
        drop(peer);
        reader.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "bytes were lost, repeated or reordered");
    }

    #[tokio::test]
    async fn small_messages_are_read_straight_through() {
        let (mut peer, socket) = tokio::io::duplex(256 * 1024);
        let mut reader = ReadAhead::new(socket);
        let mut small = [0u8; 4096];
        for message in [&b"one"[..], b"two", &[7u8; 1500]] {
            peer.write_all(message).await.unwrap();
            let n = reader.read(&mut small).await.unwrap();
            assert_eq!(&small[..n], message);
            assert_eq!(
                reader.buf.capacity(),
                0,
                "a small message allocated a buffer"
            );
        }
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut peer, socket) = tokio::io::duplex(256 * 1024);
        let mut reader = ReadAhead::new(socket);
        peer.write_all(&[1u8; 10_000]).await.unwrap();
        let mut small = [0u8; 4096];
        let mut got = 0;
        while got < 10_000 {
            got += reader.read(&mut small).await.unwrap();
        }
        assert!(
            reader.buf.capacity() > 0,
            "10 KB in 4 KB reads was not read ahead"
        );
        // Nothing more to read: the next read waits, and the buffer is let go meanwhile.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            reader.read(&mut small),
        )
        .await;
        assert!(waiting.is_err(), "a read returned with nothing sent");
        assert_eq!(reader.buf.capacity(), 0, "an idle reader kept its buffer");
        peer.write_all(b"again").await.unwrap();
        assert_eq!(reader.read(&mut small).await.unwrap(), 5);
        assert_eq!(&small[..5], b"again");
    }

    #[tokio::test]
    async fn writes_reach_the_socket_unbuffered() {
        let (mut peer, socket) = tokio::io::duplex(1024);
        let mut stream = ReadAhead::new(socket);
        stream.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
    }
}
