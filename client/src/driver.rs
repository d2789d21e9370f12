//! The connection driver: one client thread's event loop over its share of the connections.
//!
//! Each thread owns a mio `Poll`, its connections, one read buffer and its own statistics, so
//! threads share nothing on the hot path but an optional request budget. Connections are
//! registered once for both readable and writable readiness (edge-triggered): reads drain until
//! `WouldBlock`, writes go out in one batch per loop turn and wait for the next writable edge
//! only when the socket is full.
//!
//! Load shape: in the closed loop a connection refills its pipeline as soon as replies come
//! back; in the open loop a [`Schedule`] hands out due requests to connections with room, and a
//! request's latency counts from its due time (so a stall shows up as latency, not as fewer
//! requests).
//!
//! Connections end in two ways, told apart as an HTTP client tells a keep-alive close from a
//! failure. A clean close (EOF at a reply boundary: a worker recycled, drained or timed out an
//! idle connection) is normal: the connection is reopened after a back-off, and the requests
//! it had sent without reply are written again on the new connection if the workload says
//! they are idempotent (echo), or reported lost (a bank operation's outcome is unknown, design
//! note 7). A failure (reset, failed connect, reply timeout, or an EOF in the middle of a
//! reply) loses every request in flight and counts as a network error. Either way the loop
//! ends at the hard deadline whatever the server does.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkpool_common::tls::Transport;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::args::Greeting;
use crate::load::Schedule;
use crate::stats::{Counters, Latencies};
use crate::timer::Timer;
use crate::tls::ClientTls;
use crate::workload::{ReplyProgress, Verdict, Workload};

/// Bytes read per `read` call (one buffer per thread).
const READ_BUF_BYTES: usize = 64 * 1024;
/// How often timeouts, reconnects and the live counters are looked at.
const SWEEP_INTERVAL: Duration = Duration::from_millis(10);
/// First and longest wait before reconnecting a dropped connection.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Poll token of the open loop's timer (connections use their index).
const TIMER: Token = Token(usize::MAX);

/// The run's timeline, shared by every thread.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// When load starts (warm-up begins).
    pub start: Instant,
    /// Start of the measured window.
    pub window_start: Instant,
    /// No request is sent from here on.
    pub window_end: Instant,
    /// Hard end: whatever is still in flight is abandoned.
    pub deadline: Instant,
}

/// Which replies count toward the figures.
#[derive(Debug, Clone)]
pub enum Counting {
    /// Replies received inside the window.
    Window,
    /// Requests that claimed one unit of this shared budget (sent after the window started).
    Budget(Arc<AtomicI64>),
}

/// Figures a thread publishes for the progress display.
#[derive(Debug, Default)]
pub struct Live {
    pub completed: AtomicU64,
    pub mismatches: AtomicU64,
    pub errors: AtomicU64,
}

/// One thread's share of the work.
pub struct Plan {
    /// Never empty: connection `i` goes to `addrs[i % addrs.len()]`.
    pub addrs: Vec<SocketAddr>,
    /// `--tls`: each connection starts a session with these settings.
    pub tls: Option<Arc<ClientTls>>,
    pub connections: usize,
    pub pipeline: usize,
    /// Open loop at this many requests per second (this thread's share); closed loop if None.
    pub rate: Option<f64>,
    pub timeout: Duration,
    pub clock: Clock,
    pub counting: Counting,
    pub live: Arc<Live>,
    /// Reopen a connection the server closed cleanly (else it stays closed: `--no-reconnect`).
    pub reconnect: bool,
    /// Sent first on every connection, its reply checked before the load's (`--auth`).
    pub greeting: Option<Arc<Greeting>>,
}

/// What a thread hands back.
pub struct Outcome<W> {
    pub counters: Counters,
    pub latencies: Latencies,
    /// When the last counted reply arrived.
    pub last_counted: Option<Instant>,
    pub workload: W,
}

/// A request waiting for its reply.
struct Pending<S> {
    /// Latency origin: when the request was due (open loop) or first sent (closed loop); a
    /// re-send keeps it, so the reconnect shows in the latency.
    origin: Instant,
    /// When it was last queued for sending; the reply timeout counts from here.
    sent_at: Instant,
    /// It claimed a unit of the budget (Counting::Budget).
    claimed: bool,
    sent: S,
}

enum State {
    /// Not connected; (re)connect at this time.
    Waiting {
        retry_at: Instant,
    },
    Connecting {
        since: Instant,
    },
    Open,
    /// Closed by the server and not to be reopened (`--no-reconnect`).
    Gone,
}

struct Conn<S> {
    stream: Option<Transport>,
    state: State,
    /// Requests not yet written, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// Requests awaiting their reply, oldest first. While the connection is not open, these
    /// are the idempotent requests of a cleanly closed connection, written again (in order)
    /// as soon as the next connection opens.
    inflight: VecDeque<Pending<S>>,
    progress: ReplyProgress,
    /// The greeting's reply received so far, while it is awaited.
    greeting_reply: Option<Vec<u8>>,
    backoff: Duration,
    /// Listed in `Driver::to_fill` (closed loop) or `Driver::ready` (open loop).
    listed: bool,
    /// Listed in `Driver::to_flush`.
    dirty: bool,
}

/// Why a connection was dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drop {
    ConnectFailed,
    /// An error on the socket, or an EOF that cut a reply in two.
    Reset,
    /// A clean close: EOF at a reply boundary.
    Closed,
    Timeout,
    Protocol,
}

struct Driver<W: Workload> {
    plan: Plan,
    work: W,
    poll: Poll,
    conns: Vec<Conn<W::Sent>>,
    read_buf: Vec<u8>,
    counters: Counters,
    latencies: Latencies,
    last_counted: Option<Instant>,
    schedule: Option<Schedule>,
    /// Open loop: wakes the poll when the next request is due.
    timer: Option<Timer>,
    /// Closed loop: connections whose pipeline has room.
    to_fill: Vec<usize>,
    /// Open loop: connections with room, served round-robin.
    ready: VecDeque<usize>,
    to_flush: Vec<usize>,
    in_flight: usize,
    /// The budget ran out: send no more.
    exhausted: bool,
}

/// Runs one thread's connections until the window ends and the replies in flight are in, or
/// until the hard deadline.
pub fn run<W: Workload>(plan: Plan, work: W) -> io::Result<Outcome<W>> {
    let n = plan.connections;
    let pipeline = plan.pipeline;
    let schedule = plan.rate.map(|r| Schedule::new(plan.clock.start, r));
    let poll = Poll::new()?;
    let timer = match schedule {
        Some(_) => Some(Timer::new(poll.registry(), TIMER)?),
        None => None,
    };
    let mut d = Driver {
        poll,
        timer,
        conns: (0..n)
            .map(|_| Conn {
                stream: None,
                state: State::Waiting {
                    retry_at: plan.clock.start,
                },
                out: Vec::new(),
                out_pos: 0,
                inflight: VecDeque::with_capacity(pipeline),
                progress: ReplyProgress::default(),
                greeting_reply: None,
                backoff: MIN_BACKOFF,
                listed: false,
                dirty: false,
            })
            .collect(),
        plan,
        work,
        read_buf: vec![0; READ_BUF_BYTES],
        counters: Counters::default(),
        latencies: Latencies::default(),
        last_counted: None,
        schedule,
        to_fill: Vec::with_capacity(n),
        ready: VecDeque::with_capacity(n),
        to_flush: Vec::with_capacity(n),
        in_flight: 0,
        exhausted: false,
    };
    d.event_loop()?;
    Ok(Outcome {
        counters: d.counters,
        latencies: d.latencies,
        last_counted: d.last_counted,
        workload: d.work,
    })
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

impl<W: Workload> Driver<W> {
    fn event_loop(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now();
        loop {
            let now = Instant::now();
            if now >= self.plan.clock.deadline {
                self.abandon_all();
                return Ok(());
            }
            if !self.sending(now) && self.in_flight == 0 {
                return Ok(());
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP_INTERVAL;
            }
            self.send(now);
            let mut wake = next_sweep.min(self.plan.clock.deadline);
            if self.sending(now) {
                wake = wake.min(self.plan.clock.window_end);
                if let (Some(s), Some(t), false) =
                    (&self.schedule, &self.timer, self.ready.is_empty())
                {
                    let due = s.next_due();
                    if due < wake {
                        t.arm(due.saturating_duration_since(now))?;
                    }
                }
            }
            match self
                .poll
                .poll(&mut events, Some(wake.saturating_duration_since(now)))
            {
                Ok(()) => {}
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for event in events.iter() {
                if event.token() == TIMER {
                    if let Some(t) = &self.timer {
                        t.clear();
                    }
                    continue;
                }
                let i = event.token().0;
                if matches!(self.conns[i].state, State::Connecting { .. }) {
                    self.finish_connect(i, now);
                    // The same edge may already carry the server's data or EOF (a server
                    // that accepts and closes at once): it must be read now, no new edge
                    // will come for it.
                    if !matches!(self.conns[i].state, State::Open) {
                        continue;
                    }
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(i, now);
                }
                if event.is_writable() && self.conns[i].stream.is_some() {
                    self.flush(i, now);
                }
            }
        }
    }

    /// Whether new requests may still be sent.
    fn sending(&self, now: Instant) -> bool {
        now < self.plan.clock.window_end && !self.exhausted
    }

    /// Writes due requests into connections with room, then flushes each touched connection
    /// once.
    fn send(&mut self, now: Instant) {
        if self.sending(now) {
            if self.schedule.is_some() {
                self.send_open_loop(now);
            } else {
                for k in 0..self.to_fill.len() {
                    let i = self.to_fill[k];
                    self.conns[i].listed = false;
                    while self.has_room(i) && self.sending(now) {
                        self.push_request(i, now, now);
                    }
                }
                self.to_fill.clear();
            }
        }
        for k in 0..self.to_flush.len() {
            let i = self.to_flush[k];
            self.conns[i].dirty = false;
            if self.conns[i].stream.is_some() {
                self.flush(i, now);
            }
        }
        self.to_flush.clear();
    }

    fn send_open_loop(&mut self, now: Instant) {
        while let Some(&i) = self.ready.front() {
            let Some(due) = self.schedule.as_ref().map(Schedule::next_due) else {
                return;
            };
            if due > now || !self.sending(now) {
                return;
            }
            self.ready.pop_front();
            if !self.has_room(i) {
                self.conns[i].listed = false;
                continue;
            }
            if let Some(s) = self.schedule.as_mut() {
                s.take_due(now);
            }
            self.push_request(i, due, now);
            if self.has_room(i) {
                self.ready.push_back(i);
            } else {
                self.conns[i].listed = false;
            }
        }
    }

    fn has_room(&self, i: usize) -> bool {
        let c = &self.conns[i];
        matches!(c.state, State::Open) && c.inflight.len() < self.plan.pipeline
    }

    /// Queues one request on connection `i`.
    fn push_request(&mut self, i: usize, origin: Instant, now: Instant) {
        let claimed = match &self.plan.counting {
            Counting::Budget(budget) if now >= self.plan.clock.window_start => {
                if budget.fetch_sub(1, Ordering::Relaxed) <= 0 {
                    self.exhausted = true;
                    return;
                }
                true
            }
            _ => false,
        };
        let c = &mut self.conns[i];
        let sent = self.work.write_next(&mut c.out);
        c.inflight.push_back(Pending {
            origin,
            sent_at: now,
            claimed,
            sent,
        });
        self.in_flight += 1;
        if !c.dirty {
            c.dirty = true;
            self.to_flush.push(i);
        }
    }

    /// Marks connection `i` as having pipeline room.
    fn list_for_sending(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.listed {
            return;
        }
        c.listed = true;
        if self.schedule.is_some() {
            self.ready.push_back(i);
        } else {
            self.to_fill.push(i);
        }
    }

    fn in_window(&self, now: Instant) -> bool {
        now >= self.plan.clock.window_start && now < self.plan.clock.window_end
    }

    fn flush(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        let mut written = 0u64;
        // TLS records the socket refused before (the handshake too) go out first.
        let mut failed = stream.flush().is_err();
        while !failed && c.out_pos < c.out.len() {
            match stream.write(&c.out[c.out_pos..]) {
                Ok(n) => {
                    c.out_pos += n;
                    written += n as u64;
                }
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if c.out_pos == c.out.len() {
            c.out.clear();
            c.out_pos = 0;
        }
        if self.in_window(now) {
            self.counters.bytes_sent += written;
        }
        if failed {
            self.drop_conn(i, Drop::Reset, now);
        }
    }

    fn read(&mut self, i: usize, now: Instant) {
        let mut buf = std::mem::take(&mut self.read_buf);
        while let Some(stream) = self.conns[i].stream.as_mut() {
            match stream.read(&mut buf) {
                Ok(0) => {
                    let why = if self.conns[i].progress.mid_reply() {
                        Drop::Reset
                    } else {
                        Drop::Closed
                    };
                    self.drop_conn(i, why, now);
                    break;
                }
                Ok(n) => {
                    if self.in_window(now) {
                        self.counters.bytes_received += n as u64;
                    }
                    if !self.consume(i, &buf[..n], now) {
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(_) => {
                    self.drop_conn(i, Drop::Reset, now);
                    break;
                }
            }
        }
        self.read_buf = buf;
    }

    /// Checks received bytes against the requests in flight; false if the connection was
    /// dropped.
    fn consume(&mut self, i: usize, mut data: &[u8], now: Instant) -> bool {
        if self.conns[i].greeting_reply.is_some() {
            match self.greet(i, data, now) {
                Some(rest) => data = rest,
                None => return false,
            }
        }
        while !data.is_empty() {
            let c = &mut self.conns[i];
            let Some(front) = c.inflight.front() else {
                self.work.note_unsolicited(data);
                self.counters.mismatches += 1;
                self.drop_conn(i, Drop::Protocol, now);
                return false;
            };
            let (used, verdict) = self.work.feed(&front.sent, &mut c.progress, data);
            data = &data[used..];
            let Some(verdict) = verdict else { continue };
            let done = c
                .inflight
                .pop_front()
                .expect("the front request was just read");
            c.backoff = MIN_BACKOFF;
            self.in_flight -= 1;
            self.complete(&done, verdict, now);
            self.list_for_sending(i);
        }
        true
    }

    fn complete(&mut self, done: &Pending<W::Sent>, verdict: Verdict, now: Instant) {
        self.counters.replies += 1;
        if verdict == Verdict::Wrong {
            self.counters.mismatches += 1;
        }
        let counts = match self.plan.counting {
            Counting::Window => self.in_window(now),
            Counting::Budget(_) => done.claimed,
        };
        if counts {
            self.counters.completed += 1;
            let ns = now.saturating_duration_since(done.origin).as_nanos();
            self.latencies.record(u64::try_from(ns).unwrap_or(u64::MAX));
            self.last_counted = Some(now);
        }
    }

    /// Closes connection `i` and schedules a reconnect. After a clean close (or a failed
    /// connect, which wrote nothing) the idempotent requests in flight stay queued to be sent
    /// again; every other request in flight is reported lost.
    fn drop_conn(&mut self, i: usize, why: Drop, now: Instant) {
        match why {
            Drop::ConnectFailed => self.counters.connect_errors += 1,
            Drop::Reset => self.counters.resets += 1,
            Drop::Closed => self.counters.closed += 1,
            Drop::Timeout => self.counters.timeouts += 1,
            Drop::Protocol => {}
        }
        let c = &mut self.conns[i];
        if let Some(mut stream) = c.stream.take() {
            // Deregistering can only fail if the stream was never registered; it is closed
            // right after either way.
            let _ = self.poll.registry().deregister(&mut stream);
        }
        // Requests in flight on a connection that will be reopened are sent again if they
        // are idempotent; on one that stays closed (`--no-reconnect`), all are lost.
        let reopens = why != Drop::Closed || self.plan.reconnect;
        let keep_idempotent = reopens && matches!(why, Drop::Closed | Drop::ConnectFailed);
        let work = &mut self.work;
        let before = c.inflight.len();
        c.inflight.retain(|p| {
            let keep = keep_idempotent && work.idempotent(&p.sent);
            if !keep {
                work.lost(&p.sent);
            }
            keep
        });
        self.in_flight -= before - c.inflight.len();
        if why == Drop::Closed && reopens {
            self.counters.retried += c.inflight.len() as u64;
        }
        c.progress.reset();
        c.greeting_reply = None;
        c.out.clear();
        c.out_pos = 0;
        // A clean close is the server's keep-alive close (a worker recycled or replaced):
        // reconnect at once, unless told not to. Failures back off.
        if !reopens {
            c.state = State::Gone;
        } else if why == Drop::Closed {
            c.state = State::Waiting { retry_at: now };
        } else {
            c.state = State::Waiting {
                retry_at: now + c.backoff,
            };
            c.backoff = (c.backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn connect(&mut self, i: usize, now: Instant) {
        let addr = self.plan.addrs[i % self.plan.addrs.len()];
        let transport = TcpStream::connect(addr).and_then(|tcp| match &self.plan.tls {
            None => Ok(Transport::Plain(tcp)),
            Some(tls) => tls.transport(tcp).map_err(io::Error::other),
        });
        match transport {
            Ok(mut stream) => {
                let registered = self.poll.registry().register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                );
                let c = &mut self.conns[i];
                c.stream = Some(stream);
                c.state = State::Connecting { since: now };
                if registered.is_err() {
                    self.drop_conn(i, Drop::ConnectFailed, now);
                }
            }
            Err(_) => {
                self.conns[i].state = State::Waiting { retry_at: now };
                self.drop_conn(i, Drop::ConnectFailed, now);
            }
        }
    }

    fn finish_connect(&mut self, i: usize, now: Instant) {
        let Some(stream) = self.conns[i].stream.as_ref().and_then(Transport::tcp) else {
            return;
        };
        let outcome = match stream.take_error() {
            Ok(Some(_)) | Err(_) => Err(()),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(_) => Err(()),
            },
        };
        match outcome {
            Ok(true) => {
                // Requests are written in batches already; Nagle would only delay them.
                let _ = stream.set_nodelay(true);
                self.counters.connects += 1;
                self.resend(i, now);
                self.list_for_sending(i);
            }
            Ok(false) => {}
            Err(()) => self.drop_conn(i, Drop::ConnectFailed, now),
        }
    }

    /// Takes the greeting's reply from the start of `data` on connection `i`: the rest of
    /// `data`, or `None` if the connection was dropped (a wrong reply).
    fn greet<'d>(&mut self, i: usize, data: &'d [u8], now: Instant) -> Option<&'d [u8]> {
        let expected = &self.plan.greeting.as_ref()?.reply;
        let c = &mut self.conns[i];
        let got = c.greeting_reply.as_mut()?;
        let end = data.iter().position(|&b| b == b'\n').map(|p| p + 1);
        got.extend_from_slice(&data[..end.unwrap_or(data.len())]);
        let rest = &data[end.unwrap_or(data.len())..];
        if end.is_none() && got.len() < expected.len() {
            return Some(rest);
        }
        if got != expected {
            let got = String::from_utf8_lossy(got).into_owned();
            self.work.note_unsolicited(got.as_bytes());
            self.counters.mismatches += 1;
            self.drop_conn(i, Drop::Protocol, now);
            return None;
        }
        c.greeting_reply = None;
        Some(rest)
    }

    /// Opens connection `i` for sending: first the greeting, if any, then again the requests
    /// kept from its cleanly closed predecessor (in their original order, so replies stay in
    /// step).
    fn resend(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        c.state = State::Open;
        if let Some(greeting) = &self.plan.greeting {
            c.out.extend_from_slice(&greeting.request);
            c.greeting_reply = Some(Vec::new());
            if !c.dirty {
                c.dirty = true;
                self.to_flush.push(i);
            }
        }
        if c.inflight.is_empty() {
            return;
        }
        for p in c.inflight.iter_mut() {
            self.work.write_again(&p.sent, &mut c.out);
            p.sent_at = now;
        }
        if !c.dirty {
            c.dirty = true;
            self.to_flush.push(i);
        }
    }

    /// Timeouts, reconnects and the live counters; runs every [`SWEEP_INTERVAL`].
    fn sweep(&mut self, now: Instant) {
        let timeout = self.plan.timeout;
        let sending = self.sending(now);
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            // Requests waiting to be sent again still need a connection after the window.
            let wanted = sending || !c.inflight.is_empty();
            match c.state {
                State::Waiting { retry_at } if wanted && now >= retry_at => self.connect(i, now),
                State::Connecting { since } if now - since >= timeout => {
                    self.drop_conn(i, Drop::ConnectFailed, now)
                }
                State::Open => {
                    if let Some(p) = c.inflight.front() {
                        if now - p.sent_at >= timeout {
                            self.drop_conn(i, Drop::Timeout, now);
                        }
                    }
                }
                _ => {}
            }
        }
        let live = &self.plan.live;
        live.completed
            .store(self.counters.completed, Ordering::Relaxed);
        live.mismatches
            .store(self.counters.mismatches, Ordering::Relaxed);
        live.errors
            .store(self.counters.network_errors(), Ordering::Relaxed);
    }

    /// The hard deadline: every request still in flight is lost.
    fn abandon_all(&mut self) {
        for c in &mut self.conns {
            for p in c.inflight.drain(..) {
                self.work.lost(&p.sent);
                self.counters.abandoned += 1;
            }
        }
        self.in_flight = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{Payload, Rng};
    use crate::workload::{BankWorkload, EchoWorkload};
    use forkpool_testkit::{line_server, LineReply};

    /// How a test server ends each connection after answering `answered` lines.
    #[derive(Clone, Copy)]
    enum Ending {
        /// Reads one more line without answering it, then closes cleanly (SHUT_WR, read to EOF),
        /// as a recycled forkpool worker does.
        CleanAfterUnanswered,
        /// Writes half of the next reply, then closes.
        MidReply,
    }

    /// A loopback server that uppercases (echo) or answers `OK 1` (bank) for `answered` lines
    /// per connection, then ends the connection as `ending` says.
    fn closing_server(answered: usize, ending: Ending, bank: bool) -> SocketAddr {
        line_server(move |index, line| match (index < answered, &ending) {
            (true, _) if bank => LineReply::Answer(b"OK 1\n".to_vec()),
            (true, _) => LineReply::Answer(line.to_ascii_uppercase()),
            (false, Ending::CleanAfterUnanswered) => LineReply::Close(Vec::new()),
            (false, Ending::MidReply) => LineReply::Close(b"O".to_vec()),
        })
    }

    fn plan(addr: SocketAddr, window: Duration) -> Plan {
        let start = Instant::now();
        Plan {
            addrs: vec![addr],
            tls: None,
            connections: 2,
            pipeline: 4,
            rate: None,
            timeout: Duration::from_secs(2),
            clock: Clock {
                start,
                window_start: start,
                window_end: start + window,
                deadline: start + window + Duration::from_secs(2),
            },
            counting: Counting::Window,
            live: Arc::default(),
            reconnect: true,
            greeting: None,
        }
    }

    /// ASCII lines starting with `o` (the test server uppercases ASCII only, and `MidReply`
    /// cuts a reply after a correct `O`).
    fn echo() -> EchoWorkload {
        let pool = ["ok then\n", "on and on\n"].map(|l| Payload {
            line: l.as_bytes().to_vec(),
            expected: l.to_ascii_uppercase().into_bytes(),
        });
        EchoWorkload::new(pool.to_vec(), Rng::new(3))
    }

    #[test]
    fn a_clean_close_resends_unanswered_echo_requests_and_is_no_error() {
        let addr = closing_server(5, Ending::CleanAfterUnanswered, false);
        let out = run(plan(addr, Duration::from_millis(300)), echo()).expect("run");
        let c = out.counters;
        assert!(c.closed >= 2, "{c:?}");
        assert!(c.retried >= c.closed, "{c:?}");
        assert_eq!(
            (c.mismatches, c.network_errors(), c.abandoned),
            (0, 0, 0),
            "{c:?}"
        );
        assert!(c.completed >= 5, "{c:?}");
    }

    #[test]
    fn a_clean_close_leaves_unanswered_bank_operations_unknown() {
        let addr = closing_server(3, Ending::CleanAfterUnanswered, true);
        let accounts = ["a", "b"].map(|n| n.parse().expect("valid")).to_vec();
        let work = BankWorkload::new(accounts, "deposit=1".parse().expect("mix"), Rng::new(4));
        let out = run(plan(addr, Duration::from_millis(200)), work).expect("run");
        let c = out.counters;
        assert!(c.closed >= 2, "{c:?}");
        assert_eq!((c.retried, c.network_errors()), (0, 0), "{c:?}");
        let book = out.workload.book();
        assert_eq!(book.applied, c.replies, "{c:?} {book:?}");
        assert!(book.unknown_deposits >= c.closed, "{c:?} {book:?}");
    }

    #[test]
    fn an_eof_in_the_middle_of_a_reply_is_a_reset() {
        let addr = closing_server(2, Ending::MidReply, false);
        let out = run(plan(addr, Duration::from_millis(200)), echo()).expect("run");
        let c = out.counters;
        assert!(c.resets >= 2, "{c:?}");
        assert_eq!((c.closed, c.retried, c.mismatches), (0, 0, 0), "{c:?}");
    }

    #[test]
    fn without_reconnect_a_closed_connection_stays_closed() {
        let addr = closing_server(3, Ending::CleanAfterUnanswered, false);
        let plan = Plan {
            reconnect: false,
            ..plan(addr, Duration::from_millis(300))
        };
        let out = run(plan, echo()).expect("run");
        let c = out.counters;
        assert_eq!((c.connects, c.closed, c.retried), (2, 2, 0), "{c:?}");
        assert_eq!(
            c.completed, 6,
            "three replies on each of the two connections"
        );
    }

    #[test]
    fn connections_are_spread_round_robin_over_the_addresses() {
        let counters: [Arc<AtomicU64>; 2] = Default::default();
        let addrs: Vec<SocketAddr> = counters
            .iter()
            .map(|connections| {
                let connections = Arc::clone(connections);
                line_server(move |index, line| {
                    if index == 0 {
                        connections.fetch_add(1, Ordering::SeqCst);
                    }
                    LineReply::Answer(line.to_ascii_uppercase())
                })
            })
            .collect();
        let plan = Plan {
            addrs: addrs.clone(),
            connections: 5,
            ..plan(addrs[0], Duration::from_millis(200))
        };
        let c = run(plan, echo()).expect("run").counters;
        assert_eq!((c.mismatches, c.network_errors()), (0, 0), "{c:?}");
        let spread = counters.map(|n| n.load(Ordering::SeqCst));
        assert_eq!(
            spread,
            [3, 2],
            "connections 0, 2, 4 to the first, 1, 3 to the second"
        );
    }

    /// A server that wants `AUTH u t` first (answered `reply`), then uppercases.
    fn greeted_server(reply: &'static [u8]) -> SocketAddr {
        line_server(move |index, line| match index {
            0 if line == b"AUTH u t\n" => LineReply::Answer(reply.to_vec()),
            0 => LineReply::Close(b"ERR no greeting\n".to_vec()),
            _ => LineReply::Answer(line.to_ascii_uppercase()),
        })
    }

    #[test]
    fn the_greeting_goes_first_and_its_reply_is_checked() {
        let greeting = Arc::new(Greeting {
            request: b"AUTH u t\n".to_vec(),
            reply: b"OK u\n".to_vec(),
        });
        let greeted = |reply| Plan {
            greeting: Some(Arc::clone(&greeting)),
            ..plan(greeted_server(reply), Duration::from_millis(200))
        };
        let c = run(greeted(b"OK u\n"), echo()).expect("run").counters;
        assert_eq!((c.mismatches, c.network_errors()), (0, 0), "{c:?}");
        assert!(c.completed > 0, "{c:?}");
        let c = run(greeted(b"ERR denied\n"), echo()).expect("run").counters;
        assert!(
            c.mismatches > 0,
            "a refused greeting is a wrong reply: {c:?}"
        );
        assert_eq!(c.completed, 0, "{c:?}");
    }
}
