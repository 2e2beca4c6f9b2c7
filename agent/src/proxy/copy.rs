//! Bidirectional copy with buffers that start small and grow only for bulk transfers, so ten
//! thousand idle or chatty connections cost kilobytes each, not the 128 KiB that two fixed
//! 64 KiB buffers (zeroed on allocation) would pin per connection.
use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Every direction starts with this much.
const SMALL: usize = 4 * 1024;
/// Large enough that bulk transfers move in few syscalls.
const LARGE: usize = 64 * 1024;
/// Reads that fill the small buffer this many times in a row make it large.
const GROW_AFTER: u8 = 4;

/// One direction: read into the buffer, write it all out, repeat; at EOF, flush and shut the
/// writer down (a half-close).
struct Direction {
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
    full_reads: u8,
    read_done: bool,
    need_flush: bool,
    copied: u64,
    state: State,
}

#[derive(PartialEq)]
enum State {
    Copying,
    ShuttingDown,
    Done,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: vec![0; SMALL],
            pos: 0,
            cap: 0,
            full_reads: 0,
            read_done: false,
            need_flush: false,
            copied: 0,
            state: State::Copying,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            match self.state {
                State::Copying => {
                    ready!(self.poll_copy(cx, r, w))?;
                    self.state = State::ShuttingDown;
                }
                State::ShuttingDown => {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.state = State::Done;
                }
                State::Done => return Poll::Ready(Ok(self.copied)),
            }
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                if self.full_reads >= GROW_AFTER && self.buf.len() < LARGE {
                    self.buf = vec![0; LARGE];
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.full_reads = if n == self.buf.len() {
                            self.full_reads.saturating_add(1)
                        } else {
                            0
                        };
                        (self.pos, self.cap) = (0, n);
                        self.read_done = n == 0;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written.
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies both ways until both sides have closed (each EOF is passed on as a shutdown of the
/// other side); returns (bytes from `a`, bytes from `b`).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::new(), Direction::new());
    poll_fn(|cx| {
        let there = a_to_b.poll(cx, a, b)?;
        let back = b_to_a.poll(cx, b, a)?;
        match (there, back) {
            (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn bulk_both_ways_arrives_whole_and_half_closes_pass_through() {
        let (mut client, mut proxy_a) = tokio::io::duplex(8 * 1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(8 * 1024);
        let copy = tokio::spawn(async move { bidirectional(&mut proxy_a, &mut proxy_b).await });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: the server sees EOF...
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap(); // ...and can still answer
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "the bytes arrived changed or cut short");
        server.write_all(b"answer after EOF").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer after EOF");
        assert_eq!(copy.await.unwrap().unwrap(), (1_000_000, 16));
    }

    #[tokio::test]
    async fn buffers_stay_small_for_small_messages_and_grow_for_bulk() {
        let (mut client, mut proxy) = tokio::io::duplex(1024 * 1024);
        let mut sink = tokio::io::sink();
        let mut d = Direction::new();
        client.write_all(&[1; 100]).await.unwrap();
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        assert!(d.poll_copy(&mut cx, &mut proxy, &mut sink).is_pending());
        assert_eq!(d.buf.len(), SMALL, "a small message made the buffer grow");
        client.write_all(&vec![2; 200_000]).await.unwrap();
        assert!(d.poll_copy(&mut cx, &mut proxy, &mut sink).is_pending());
        assert_eq!(d.buf.len(), LARGE, "a bulk transfer kept the small buffer");
        assert_eq!(d.copied, 200_100);
    }

    fn futures_task_noop() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
