//! One client connection: its socket, its protocol session, the replies it has not taken
//! yet, and how it closes. The worker's loop calls [`Conn::on_ready`]; this module does the
//! edge-triggered I/O rules (read until the socket is drained, ask for writable only while
//! output is pending), backpressure, and the lingering close.
//!
//! An idle connection holds no buffer: reads go into the worker's shared buffer and replies
//! are written straight from the worker's scratch buffer; only what the socket did not take
//! is copied into the connection.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use forkpool_common::codec::Flow;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::scoreboard::ServiceCounters;
use crate::service::Session;

/// How long a closing connection keeps reading (and discarding) after its last reply, so
/// that unread request bytes do not turn the close into a reset that destroys the replies.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Reads per event for one connection: past it the worker serves its other connections
/// (and beats) before coming back, so one client that never stops sending cannot starve them.
const READS_PER_TURN: usize = 4;
/// How many bytes a closing connection discards before it gives up on a clean close.
const LINGER_MAX_BYTES: usize = 1024 * 1024;

/// Buffers shared by every connection of a worker (one worker serves one connection at a
/// time, so one of each is enough).
pub struct Scratch {
    pub read: Vec<u8>,
    pub write: Vec<u8>,
}

impl Scratch {
    pub fn new(read_size: usize) -> Scratch {
        Scratch {
            read: vec![0; read_size],
            write: Vec::with_capacity(read_size * 3 + 64),
        }
    }
}

/// Limits that apply to every connection of a worker.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Pending output above which the connection is not read from.
    pub output_limit: usize,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Send the pending replies, then shut down the write side and linger.
    Closing,
    /// Write side shut down; reading and discarding until EOF or the deadline.
    Lingering {
        until: Instant,
        discarded: usize,
    },
}

/// What an event says about a connection's socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Readiness {
    pub readable: bool,
    /// The peer closed its side (or the socket has an error): reading will end.
    pub read_closed: bool,
    pub writable: bool,
}

/// What the worker should do with the connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Drop it (closing the socket): done, or failed.
    Close,
}

pub struct Conn {
    stream: TcpStream,
    token: Token,
    session: Session,
    /// This worker's counters for the connection's service (scoreboard).
    counters: &'static ServiceCounters,
    /// Replies the socket has not taken yet; `sent` of them are already written.
    pending: Vec<u8>,
    sent: usize,
    /// Registered for writable events (only while replies are pending).
    wants_writable: bool,
    /// The client sent EOF: nothing more will be read.
    peer_closed: bool,
    /// Reading stopped with input left in the socket (too many replies pending, or the
    /// turn's read budget spent): no new edge will announce that input.
    read_paused: bool,
    /// The read budget ran out: the worker must come back next turn.
    turn_spent: bool,
    phase: Phase,
    /// When bytes last moved either way (for the idle timeout and the drain).
    pub last_active: Instant,
}

impl Conn {
    pub fn new(
        stream: TcpStream,
        token: Token,
        session: Session,
        counters: &'static ServiceCounters,
        now: Instant,
    ) -> Conn {
        Conn {
            stream,
            token,
            session,
            counters,
            pending: Vec::new(),
            sent: 0,
            wants_writable: false,
            peer_closed: false,
            read_paused: false,
            turn_spent: false,
            phase: Phase::Open,
            last_active: now,
        }
    }

    pub fn counters(&self) -> &'static ServiceCounters {
        self.counters
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(&mut self.stream, self.token, Interest::READABLE)
    }

    /// Is the client part-way through a request (see [`Session::mid_request`])?
    pub fn mid_request(&self) -> bool {
        self.session.mid_request()
    }

    /// Is the connection open and idle: no reply pending, not closing?
    pub fn is_quiet(&self) -> bool {
        self.phase == Phase::Open && self.unsent() == 0
    }

    /// Did this connection stop reading only because its turn was over? The worker then
    /// drives it again on its next turn (no readiness event will come for that input).
    pub fn needs_another_turn(&self) -> bool {
        self.turn_spent && self.phase == Phase::Open
    }

    /// The lingering deadline, if the connection is lingering.
    pub fn linger_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Lingering { until, .. } => Some(until),
            _ => None,
        }
    }

    /// Handles a readiness event (or a timer's nudge, with no flag set).
    pub fn on_ready(
        &mut self,
        readiness: Readiness,
        scratch: &mut Scratch,
        limits: Limits,
        registry: &Registry,
        now: Instant,
    ) -> Verdict {
        match self.drive(readiness, scratch, limits, registry, now) {
            Ok(verdict) => verdict,
            Err(e) => {
                log::debug!("connection closed on error: {e}");
                Verdict::Close
            }
        }
    }

    /// Starts a graceful close: pending replies go out, then the write side is shut down.
    pub fn close_gracefully(
        &mut self,
        scratch: &mut Scratch,
        registry: &Registry,
        now: Instant,
    ) -> Verdict {
        if self.phase == Phase::Open {
            self.phase = Phase::Closing;
            // Bytes held back (the start of a UTF-8 sequence) go out as they are.
            scratch.write.clear();
            self.session.on_server_close(&mut scratch.write);
            let replies = std::mem::take(&mut scratch.write);
            let sent = self.send(&replies);
            scratch.write = replies;
            if sent.is_err() {
                return Verdict::Close;
            }
        }
        // A closing connection reads nothing more, so the limit plays no part.
        let limits = Limits {
            output_limit: usize::MAX,
        };
        self.on_ready(Readiness::default(), scratch, limits, registry, now)
    }

    fn drive(
        &mut self,
        readiness: Readiness,
        scratch: &mut Scratch,
        limits: Limits,
        registry: &Registry,
        now: Instant,
    ) -> io::Result<Verdict> {
        if let Phase::Lingering { .. } = self.phase {
            return self.discard_input(scratch, now);
        }
        // A connection paused by backpressure still has unread input and will get no new
        // readable edge for it: read again once replies drain below the limit.
        let mut may_read = readiness.readable || readiness.read_closed || self.read_paused;
        // A short read normally means the socket is empty (new data brings a new edge), but
        // an EOF or input left behind by a pause brought its edge earlier: read to the end.
        let to_the_end = readiness.read_closed || self.read_paused;
        if readiness.writable {
            self.flush(now)?;
        }
        let mut reads = 0;
        self.turn_spent = false;
        while may_read && self.phase == Phase::Open && !self.peer_closed {
            if reads == READS_PER_TURN {
                self.read_paused = true;
                self.turn_spent = true;
                break;
            }
            reads += 1;
            if self.unsent() >= limits.output_limit {
                self.flush(now)?;
                if self.unsent() >= limits.output_limit {
                    self.read_paused = true;
                    break;
                }
            }
            if self.read_and_answer(scratch, now, to_the_end)? == ReadOutcome::Drained {
                self.read_paused = false;
                may_read = false;
            }
        }
        self.flush(now)?;
        self.update_interest(registry)?;
        self.after_flush(scratch, now)
    }

    /// One read and the replies to it. Reports whether the socket may hold more.
    fn read_and_answer(
        &mut self,
        scratch: &mut Scratch,
        now: Instant,
        to_the_end: bool,
    ) -> io::Result<ReadOutcome> {
        let n = match self.stream.read(&mut scratch.read) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::Drained),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(ReadOutcome::More),
            Err(e) => return Err(e),
        };
        let out = &mut scratch.write;
        out.clear();
        let (flow, requests) = if n == 0 {
            self.peer_closed = true;
            self.session.on_eof(out)
        } else {
            self.last_active = now;
            self.counters.bytes_in.fetch_add(n as u64, Relaxed);
            self.session.on_input(&scratch.read[..n], out)
        };
        if flow == Flow::Stop {
            self.phase = Phase::Closing;
        }
        if requests > 0 {
            self.counters.requests.fetch_add(requests, Relaxed);
        }
        self.send(&scratch.write)?;
        Ok(if n == 0 || (n < scratch.read.len() && !to_the_end) {
            ReadOutcome::Drained
        } else {
            ReadOutcome::More
        })
    }

    /// Writes `replies` after whatever is already pending; keeps what the socket refuses.
    fn send(&mut self, replies: &[u8]) -> io::Result<()> {
        if replies.is_empty() {
            return Ok(());
        }
        if self.unsent() > 0 {
            self.pending.extend_from_slice(replies);
            return Ok(());
        }
        let written = write_some(&mut self.stream, replies)?;
        self.counters.bytes_out.fetch_add(written as u64, Relaxed);
        if written < replies.len() {
            self.pending.clear();
            self.sent = 0;
            self.pending.extend_from_slice(&replies[written..]);
        }
        Ok(())
    }

    /// Writes pending replies until done or the socket is full.
    fn flush(&mut self, now: Instant) -> io::Result<()> {
        while self.unsent() > 0 {
            let written = write_some(&mut self.stream, &self.pending[self.sent..])?;
            if written == 0 {
                return Ok(());
            }
            self.sent += written;
            self.last_active = now;
            self.counters.bytes_out.fetch_add(written as u64, Relaxed);
        }
        // Fully sent: release the buffer so an idle connection holds no memory.
        self.pending = Vec::new();
        self.sent = 0;
        Ok(())
    }

    fn unsent(&self) -> usize {
        self.pending.len() - self.sent
    }

    fn update_interest(&mut self, registry: &Registry) -> io::Result<()> {
        let wants = self.unsent() > 0;
        if wants != self.wants_writable {
            let interest = if wants {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(&mut self.stream, self.token, interest)?;
            self.wants_writable = wants;
        }
        Ok(())
    }

    /// Once every reply is out: close after the client's EOF, or shut down and linger.
    fn after_flush(&mut self, scratch: &mut Scratch, now: Instant) -> io::Result<Verdict> {
        if self.unsent() > 0 {
            return Ok(Verdict::Keep);
        }
        if self.peer_closed {
            // Nothing unread can remain after EOF, so a plain close cannot reset.
            return Ok(Verdict::Close);
        }
        if self.phase == Phase::Closing {
            self.stream.shutdown(Shutdown::Write)?;
            self.phase = Phase::Lingering {
                until: now + LINGER_TIMEOUT,
                discarded: 0,
            };
            return self.discard_input(scratch, now);
        }
        Ok(Verdict::Keep)
    }

    /// Lingering: read and drop input until EOF, the deadline, or the byte bound.
    fn discard_input(&mut self, scratch: &mut Scratch, now: Instant) -> io::Result<Verdict> {
        let Phase::Lingering {
            until,
            mut discarded,
        } = self.phase
        else {
            return Ok(Verdict::Keep);
        };
        if now >= until {
            return Ok(Verdict::Close);
        }
        loop {
            match self.stream.read(&mut scratch.read) {
                Ok(0) => return Ok(Verdict::Close),
                Ok(n) => {
                    discarded += n;
                    if discarded > LINGER_MAX_BYTES {
                        return Ok(Verdict::Close);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.phase = Phase::Lingering { until, discarded };
        Ok(Verdict::Keep)
    }
}

#[derive(PartialEq, Eq)]
enum ReadOutcome {
    /// The socket has nothing more now (or the client closed).
    Drained,
    /// The read filled the buffer: read again.
    More,
}

/// One write; 0 if the socket is full.
fn write_some(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(bytes) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
