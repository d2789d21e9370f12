//! A nanosecond-resolution wake-up for the open loop: a timerfd registered in a mio `Poll`.
//!
//! `epoll_wait` takes milliseconds, so waiting for a request due in 300 µs with a poll timeout
//! would send it up to a millisecond late, and that client-side slack would show up as server
//! latency. The timerfd wakes the poll at the due time instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// A one-shot monotonic timer whose expiry makes its poll token readable.
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    /// Creates the timer and registers it under `token`.
    pub fn new(registry: &Registry, token: Token) -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; a negative result is checked below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(Timer { fd })
    }

    /// Fires once, `after` from now (at least 1 ns: zero would disarm it).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_nsec: after.subsec_nanos().into(),
            },
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for (null).
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry so the next one makes the descriptor readable again.
    pub fn clear(&self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer; EAGAIN (nothing expired) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::Instant;

    #[test]
    fn the_poll_wakes_at_sub_millisecond_precision() {
        let mut poll = Poll::new().expect("poll");
        let timer = Timer::new(poll.registry(), Token(7)).expect("timerfd");
        let mut events = Events::with_capacity(4);
        for _ in 0..3 {
            let t0 = Instant::now();
            timer.arm(Duration::from_micros(200)).expect("arm");
            poll.poll(&mut events, Some(Duration::from_secs(1)))
                .expect("poll");
            assert_eq!(events.iter().next().map(|e| e.token()), Some(Token(7)));
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "{:?}",
                t0.elapsed()
            );
            timer.clear();
        }
    }
}
