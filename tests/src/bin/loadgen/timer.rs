//! Sleeping until an exact instant inside tokio. Tokio's own timer rounds up to whole
//! milliseconds, as large as the latencies measured at 1000 req/s; a timerfd wakes within
//! microseconds, as `thread::sleep` does for the blocking modes.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Instant,
};

use tokio::io::unix::AsyncFd;

pub struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd it returns is owned from here on.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns; the OwnedFd keeps it open for as
        // long as the AsyncFd that owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: as above, and an OwnedFd always returns the same descriptor.
        Ok(Self(unsafe { AsyncFd::register(owned) }?))
    }

    /// Returns at `at` (at once if it has passed). Instant is CLOCK_MONOTONIC on Linux.
    pub async fn sleep_until(&mut self, at: Instant) -> io::Result<()> {
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = libc::itimerspec {
            it_interval: zero,
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        let fd = self.0.get_ref().as_raw_fd();
        // SAFETY: fd is our timerfd; spec outlives the call.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Bounded: the timer fires once, after `wait`; a spurious wake-up reads EAGAIN.
        loop {
            let mut guard = self.0.readable().await?;
            let read = guard.try_io(|fd| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads 8 bytes into a buffer of 8.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n == 8 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
            if let Ok(result) = read {
                return result;
            }
        }
    }
}
