//! A nanosecond-resolution wake-up for the open loop: a timerfd registered in a mio `Poll`.
//!
//! `epoll_wait` takes milliseconds, so waiting for a request due in 300 µs with a poll timeout
//! would send it up to a millisecond late, and that client-side slack would show up as server
//! latency. The timerfd wakes the poll at the due time instead.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// A one-shot monotonic timer whose expiry makes its poll token readable.
pub struct Timer {
    fd: TimerFd,
}

impl Timer {
    /// Creates the timer and registers it under `token`.
    pub fn new(registry: &Registry, token: Token) -> io::Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        registry.register(
            &mut SourceFd(&fd.as_fd().as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        Ok(Timer { fd })
    }

    /// Fires once, `after` from now (at least 1 ns: zero would disarm it).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = TimeSpec::from_duration(after.max(Duration::from_nanos(1)));
        self.fd
            .set(Expiration::OneShot(after), TimerSetTimeFlags::empty())?;
        Ok(())
    }

    /// Consumes an expiry so the next one makes the descriptor readable again.
    pub fn clear(&self) {
        // On this non-blocking timer, "nothing expired" is EAGAIN: nothing to consume.
        let _ = self.fd.wait();
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
