//! Where connections are served. By default thread per core: each proxy worker is a thread with
//! its own current-thread runtime, and a connection stays on the worker it is handed to, with
//! everything it starts: its requests, the pooled HBONE connections it sends them on (the pool
//! is per worker) and the connections to the app. So a request wakes no other thread and no task
//! is stolen. New connections go to the worker with the fewest open. At low rates every worker
//! wakes for its own share, where work stealing leaves one worker doing all of it;
//! docs/benchmarks.md measures both.
//!
//! Or on the agent's runtime: its one thread (`--worker-threads 1`), or tokio's work-stealing
//! pool (`--scheduler work-stealing`), which moves tasks to idle threads.
use std::{
    cell::Cell,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context as _, Result};
use tokio::{net::TcpStream, runtime::Handle, task::JoinHandle};
use tracing::debug;

thread_local! {
    /// This thread's worker index; `OFF` on threads that are not workers.
    static INDEX: Cell<usize> = const { Cell::new(OFF) };
}

const OFF: usize = usize::MAX;

/// This thread's worker index under thread per core (`usize::MAX` otherwise): keys what is
/// kept per worker, such as pooled connections.
pub fn current() -> usize {
    INDEX.get()
}

pub struct Worker {
    handle: Handle,
    /// Connections open on it.
    open: Arc<AtomicUsize>,
}

/// Where connections are served.
pub enum Workers {
    /// On the runtime that accepts them.
    Runtime,
    /// Thread per core: worker threads that live as long as the process.
    PerCore {
        workers: Vec<Worker>,
        /// Where the search for the least busy worker starts, so ties take turns.
        next: AtomicUsize,
    },
}

impl Workers {
    /// `n` new threads named `trellis-worker-<i>`, each running its own runtime.
    pub fn per_core(n: usize) -> Result<Self> {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("trellis-worker-{i}"))
                .spawn(move || {
                    INDEX.set(i);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let runtime = match runtime {
                        Ok(rt) => rt,
                        Err(e) => return drop(tx.send(Err(e))),
                    };
                    if tx.send(Ok(runtime.handle().clone())).is_ok() {
                        // Runs spawned tasks until the process ends.
                        runtime.block_on(std::future::pending::<()>());
                    }
                })
                .with_context(|| format!("starting proxy worker thread {i}"))?;
            let handle = rx
                .recv()
                .context("a proxy worker thread died at start")?
                .with_context(|| format!("starting proxy worker {i}'s runtime"))?;
            workers.push(Worker {
                handle,
                open: Arc::default(),
            });
        }
        Ok(Self::PerCore {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `task` (a long-lived one, such as an accept loop) on the next worker.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            Self::Runtime => tokio::spawn(task),
            Self::PerCore { workers, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % workers.len();
                workers[i].handle.spawn(task)
            }
        }
    }

    /// Serves the accepted `stream` with `serve`: under thread per core on the least busy
    /// worker, where it stays.
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self::PerCore { workers, next } = self else {
            tokio::spawn(serve(stream));
            return;
        };
        let i = least_busy(workers, next);
        let worker = &workers[i];
        let open = Open::new(&worker.open);
        if i == current() {
            tokio::spawn(async move {
                serve(stream).await;
                drop(open);
            });
            return;
        }
        // The socket is registered with this thread's reactor: move it to the worker's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return debug!("handing a connection to a worker: {e}"),
        };
        worker.handle.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => debug!("taking a connection on a worker: {e}"),
            }
            drop(open);
        });
    }
}

/// The worker with the fewest open connections.
fn least_busy(workers: &[Worker], next: &AtomicUsize) -> usize {
    let n = workers.len();
    let start = next.fetch_add(1, Ordering::Relaxed) % n;
    (start..start + n)
        .map(|i| i % n)
        .min_by_key(|&i| workers[i].open.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// Counts one connection open on a worker while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_busy_worker_and_stay_there() {
        let workers = Workers::per_core(3).unwrap();
        let Workers::PerCore {
            workers: threads, ..
        } = &workers
        else {
            unreachable!()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (stream, _) = rt.block_on(listener.accept()).unwrap();
            let tx = tx.clone();
            workers.serve(stream, move |mut stream| async move {
                let at = current();
                // Still on the same worker after reading and writing on the moved socket.
                let mut byte = [0u8; 1];
                tokio::io::AsyncReadExt::read_exact(&mut stream, &mut byte)
                    .await
                    .unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut stream, &byte)
                    .await
                    .unwrap();
                tx.send((at, current())).unwrap();
            });
        }
        // Six open connections over three workers: two each.
        let open: Vec<usize> = threads
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .collect();
        assert_eq!(open, [2, 2, 2]);
        for c in &mut clients {
            std::io::Write::write_all(c, b"x").unwrap();
            let mut byte = [0u8; 1];
            std::io::Read::read_exact(c, &mut byte).unwrap();
            assert_eq!(&byte, b"x");
        }
        let mut seen = vec![0; 3];
        for _ in 0..6 {
            let (at, after) = rx.recv().unwrap();
            assert_eq!(at, after);
            seen[at] += 1;
        }
        assert_eq!(seen, [2, 2, 2]);
        // Closed connections no longer count.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while threads.iter().any(|w| w.open.load(Ordering::Relaxed) > 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "connections still counted"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
