//! Bidirectional copy that holds no buffer while a connection is idle and grows one only for
//! bulk transfers, so ten thousand idle or chatty connections cost little each, not the 128 KiB
//! that two fixed 64 KiB buffers (zeroed on allocation) would pin per connection. Small reads
//! land in a buffer on the stack and go straight out; only what the writer cannot take at once
//! is kept, in a buffer of its size, dropped once written.
use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads of up to this much go through the stack.
const SMALL: usize = 4 * 1024;
/// Large enough that bulk transfers move in few syscalls.
const LARGE: usize = 64 * 1024;
/// Reads that fill the stack buffer this many times in a row get a large buffer of their own.
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
            buf: Vec::new(),
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
                let mut stack = [0u8; SMALL];
                let on_stack = self.buf.len() < LARGE;
                let mut rb = ReadBuf::new(if on_stack { &mut stack } else { &mut self.buf });
                let n = match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => rb.filled().len(),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written.
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                };
                let filled = if on_stack { SMALL } else { self.buf.len() };
                self.full_reads = if n == filled {
                    self.full_reads.saturating_add(1)
                } else {
                    0
                };
                self.read_done = n == 0;
                if on_stack {
                    let written = match self.write_some(cx, w, &stack[..n]) {
                        Poll::Ready(written) => written?,
                        Poll::Pending => 0,
                    };
                    if written < n {
                        // The writer is full: keep the rest (it woke us when it has room).
                        self.buf = stack[written..n].to_vec();
                        (self.pos, self.cap) = (0, n - written);
                        return Poll::Pending;
                    }
                    (self.pos, self.cap) = (0, 0);
                } else {
                    (self.pos, self.cap) = (0, n);
                }
            }
            if self.pos < self.cap {
                let (start, end) = (self.pos, self.cap);
                let buf = std::mem::take(&mut self.buf);
                let written = self.write_some(cx, w, &buf[start..end]);
                self.buf = buf;
                self.pos += ready!(written)?;
                if self.pos < self.cap {
                    return Poll::Pending;
                }
                if self.buf.len() < LARGE {
                    // A rest kept from the stack is done with.
                    self.buf = Vec::new();
                    (self.pos, self.cap) = (0, 0);
                }
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Writes as much of `data` as `w` takes now; Pending only if it took none of it.
    fn write_some<W>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        data: &[u8],
    ) -> Poll<io::Result<usize>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut done = 0;
        while done < data.len() {
            match Pin::new(&mut *w).poll_write(cx, &data[done..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    done += n;
                    self.copied += n as u64;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if done == 0 && !data.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(done))
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
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        assert!(d.poll_copy(&mut cx, &mut proxy, &mut sink).is_pending());
        assert!(d.buf.is_empty(), "an idle direction holds a buffer");
        client.write_all(&[1; 100]).await.unwrap();
        assert!(d.poll_copy(&mut cx, &mut proxy, &mut sink).is_pending());
        assert!(
            d.buf.is_empty(),
            "a small message written at once left a buffer"
        );
        client.write_all(&vec![2; 200_000]).await.unwrap();
        assert!(d.poll_copy(&mut cx, &mut proxy, &mut sink).is_pending());
        assert_eq!(d.buf.len(), LARGE, "a bulk transfer kept the small buffer");
        assert_eq!(d.copied, 200_100);
    }

    #[tokio::test]
    async fn what_a_full_writer_cannot_take_is_kept_and_sent_when_it_has_room() {
        let (mut client, mut proxy_a) = tokio::io::duplex(64 * 1024);
        // The writer takes at most 1 KB until its reader drains it.
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        let mut d = Direction::new();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
        client.write_all(&data).await.unwrap();
        assert!(
            d.poll_copy(&mut cx, &mut proxy_a, &mut proxy_b)
                .is_pending()
        );
        // The 3000 bytes came in one read; the writer took 1024 of them.
        assert_eq!(
            d.cap - d.pos,
            1976,
            "the rest the writer did not take is kept"
        );
        assert_eq!(
            d.buf.len(),
            1976,
            "the kept rest is in a buffer of its size"
        );
        let mut got = Vec::new();
        for _ in 0..10 {
            let mut chunk = [0; 1024];
            let n = server.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
            let _ = d.poll_copy(&mut cx, &mut proxy_a, &mut proxy_b);
            if got.len() == data.len() {
                break;
            }
        }
        assert!(got == data, "the bytes arrived changed or cut short");
        assert!(d.buf.is_empty(), "the rest's buffer outlived it");
        assert_eq!(d.copied, 3000);
    }

    fn futures_task_noop() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
