//! One client connection: its socket, its protocol session, the replies it has not taken
//! yet, and how it closes. The worker's loop calls [`Conn::on_ready`]; this module does the
//! edge-triggered I/O rules (read until the socket is drained, ask for writable only while
//! output is pending), backpressure, and the lingering close.
//!
//! A session may wait (a blocking request, a reply from a database thread): the connection
//! then reads nothing more, keeps the input the session has not looked at (`unread`, at most
//! one read's worth), and goes on when the worker calls [`Conn::resume`] with what the
//! session waited for.
//!
//! A connection of a service behind a proxy (`proxy_protocol`) starts by waiting for its
//! PROXY header: the socket is peeked at (nothing is consumed until the header is whole, so a
//! header torn across packets is simply read again with more), then exactly the header's bytes
//! are read, and the session, told who the client really is, starts at the next byte. A
//! connection without a valid header within [`PROXY_HEADER_TIMEOUT`] is closed, logged and
//! counted by outcome.
//!
//! An idle connection holds no buffer: reads go into the worker's shared buffer and replies
//! are written straight from the worker's scratch buffer; only what the socket did not take
//! is copied into the connection.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use forkpool_common::codec::Flow;
use mio::{Interest, Registry, Token};

use crate::durability::Gate;
use crate::handover::ConnState;
use crate::proxy::{self, Outcome, Parsed};
use crate::scoreboard::ServiceCounters;
use crate::service::{Session, Step};
use crate::tls::{tls_failure, Transport};
use crate::users::PeerKey;

/// How long a closing connection keeps reading (and discarding) after its last reply, so
/// that unread request bytes do not turn the close into a reset that destroys the replies.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Reads per event for one connection: past it the worker serves its other connections
/// (and beats) before coming back, so one client that never stops sending cannot starve them.
const READS_PER_TURN: usize = 4;
/// How many bytes a closing connection discards before it gives up on a clean close.
const LINGER_MAX_BYTES: usize = 1024 * 1024;
/// How long a connection behind a proxy may take to send its PROXY header (a proxy sends it
/// with the connection, so only a broken or hostile peer needs more).
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Behind a proxy: nothing is read for the session until the PROXY header, due by
    /// `until`, has named the client; `proxy` is the socket's own peer.
    AwaitingHeader {
        until: Instant,
        proxy: PeerKey,
    },
    Open,
    /// Offered to a successor (retiring worker): deregistered, neither read nor written,
    /// until the master says whether the successor took it.
    Offered,
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
    stream: Transport,
    token: Token,
    session: Session,
    /// This worker's counters for the connection's service (scoreboard).
    counters: &'static ServiceCounters,
    /// Replies the socket has not taken yet; `sent` of them are already written.
    pending: Vec<u8>,
    sent: usize,
    /// Replies that wait for the log (the ledger's, the queue store's) to be durable
    /// (`--fsync always`); they come
    /// after `pending`.
    gate: Gate,
    /// Registered for writable events (only while replies are pending).
    wants_writable: bool,
    /// The client sent EOF: nothing more will be read.
    peer_closed: bool,
    /// Reading stopped with input left in the socket (too many replies pending, or the
    /// turn's read budget spent): no new edge will announce that input.
    read_paused: bool,
    /// The read budget ran out: the worker must come back next turn.
    turn_spent: bool,
    /// A retiring worker found no successor for it: it is served here to a request
    /// boundary, then closed.
    staying: bool,
    /// The session holds a request it cannot answer yet: nothing is read until it can.
    waiting: bool,
    /// Input read from the socket that the session has not looked at (it arrived behind a
    /// request that waits); fed before anything else is read.
    unread: Vec<u8>,
    phase: Phase,
    /// The client its PROXY header named (behind a proxy): it travels with a hand-over.
    client: Option<IpAddr>,
    /// When bytes last moved either way (for the idle timeout and the drain).
    pub last_active: Instant,
}

impl Conn {
    pub fn new(
        stream: Transport,
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
            gate: Gate::default(),
            wants_writable: false,
            peer_closed: false,
            read_paused: false,
            turn_spent: false,
            staying: false,
            waiting: false,
            unread: Vec::new(),
            phase: Phase::Open,
            client: None,
            last_active: now,
        }
    }

    /// A connection continued from another worker: its unsent replies, its unread input
    /// and whether its client has sent EOF come with it. Input may already wait in the
    /// socket (no readiness edge will announce it), so the first drive reads to the end.
    pub fn adopt(
        stream: Transport,
        token: Token,
        session: Session,
        counters: &'static ServiceCounters,
        state: &ConnState,
        now: Instant,
    ) -> Conn {
        let mut conn = Conn::new(stream, token, session, counters, now);
        conn.pending = state.pending.clone();
        conn.unread = state.unread.clone();
        conn.peer_closed = state.peer_closed;
        conn.client = state.client;
        conn.read_paused = true;
        conn
    }

    pub fn counters(&self) -> &'static ServiceCounters {
        self.counters
    }

    /// The service is behind a proxy: the connection from `proxy` must start with a PROXY
    /// header, due within [`PROXY_HEADER_TIMEOUT`].
    pub fn expect_proxy_header(&mut self, proxy: PeerKey, now: Instant) {
        self.phase = Phase::AwaitingHeader {
            until: now + PROXY_HEADER_TIMEOUT,
            proxy,
        };
    }

    /// Is its PROXY header overdue (the worker then closes it: see [`Conn::abandon_header`])?
    pub fn header_overdue(&self, now: Instant) -> bool {
        matches!(self.phase, Phase::AwaitingHeader { until, .. } if now >= until)
    }

    /// Gives up on an overdue PROXY header: logged and counted; the worker closes it.
    pub fn abandon_header(&self) {
        if let Phase::AwaitingHeader { proxy, .. } = self.phase {
            self.refuse_header(proxy, Outcome::Timeout, &"no complete PROXY header in time");
        }
    }

    /// Registers the socket (for writable too while replies are pending).
    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        self.wants_writable = self.unsent() > 0;
        let interest = if self.wants_writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        registry.register(&mut self.stream, self.token, interest)
    }

    /// May this connection be offered to a successor now? Only an open one the successor
    /// can continue (a closing one finishes here) that has not come back already. A TLS
    /// session lives in this process's memory: it cannot move with its descriptor.
    pub fn may_be_offered(&self) -> bool {
        self.phase == Phase::Open && !self.staying && !self.waiting && !self.stream.is_tls()
    }

    /// Retiring: a connection that cannot be handed over (an open TLS session) is served
    /// here to a request boundary, then closed, like one no successor took.
    /// So is one still waiting for its PROXY header (the successor could not tell it from a
    /// connection that has its header).
    pub fn stay_if_unmovable(&mut self) {
        let awaiting = matches!(self.phase, Phase::AwaitingHeader { .. });
        if (self.phase == Phase::Open && self.stream.is_tls()) || awaiting {
            self.staying = true;
        }
    }

    /// Not this turn (the worker's handshake budget is spent): whatever readiness came is
    /// remembered, and the worker drives it next turn.
    pub fn defer_to_next_turn(&mut self) {
        self.read_paused = true;
        self.turn_spent = true;
    }

    /// Is a TLS handshake under way (CPU work the worker bounds per turn)?
    pub fn handshaking(&self) -> bool {
        self.stream.handshaking()
    }

    /// Offers the connection to a successor: its socket leaves this worker's poll (the
    /// registration belongs to the shared open file description) and nothing is read from
    /// it any more. Returns its state, to travel with the descriptor.
    pub fn offer(&mut self, registry: &Registry) -> io::Result<ConnState> {
        // Held replies travel as pending ones once the log covers them: flushed here, in
        // the loop (a retiring worker, a rare event).
        if let Some(syncer) = self.session.syncer().filter(|_| self.is_gated()) {
            syncer.log().flush().map_err(io::Error::other)?;
            let ready = self.gate.release_all();
            self.pending.extend_from_slice(&ready);
        }
        registry.deregister(&mut self.stream)?;
        self.phase = Phase::Offered;
        Ok(ConnState {
            session: self.session.export(),
            pending: self.pending[self.sent..].to_vec(),
            unread: self.unread.clone(),
            peer_closed: self.peer_closed,
            client: self.client,
        })
    }

    /// No successor took it: it is served here again (to a request boundary, then closed),
    /// starting with whatever input waits in the socket.
    pub fn take_back(&mut self, registry: &Registry) -> io::Result<()> {
        self.phase = Phase::Open;
        self.staying = true;
        self.read_paused = true;
        self.register(registry)
    }

    /// Is it waiting for a successor's answer?
    pub fn is_offered(&self) -> bool {
        self.phase == Phase::Offered
    }

    /// Was it offered and taken back (so it is closed at a request boundary)?
    pub fn is_staying(&self) -> bool {
        self.staying
    }

    /// Has the client sent bytes that nobody has read yet (or EOF)?
    pub fn input_waiting(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let mut byte = [0u8; 1];
        recv(
            self.stream.as_fd().as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .is_ok()
    }

    /// The socket, to pass to a successor with the state [`Conn::offer`] returned.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Is the client part-way through a request (see [`Session::mid_request`]), or is a
    /// request waiting or unread?
    pub fn mid_request(&self) -> bool {
        self.session.mid_request() || self.waiting || !self.unread.is_empty()
    }

    /// Is the connection open and idle: no reply pending or awaited, not closing?
    pub fn is_quiet(&self) -> bool {
        self.phase == Phase::Open && self.unsent() == 0 && self.gate.is_empty() && !self.waiting
    }

    /// Do replies wait for a log to be durable?
    pub fn is_gated(&self) -> bool {
        !self.gate.is_empty()
    }

    /// The log may be durable further: sends the replies it now covers and goes on serving
    /// (reading resumes if the held replies had stopped it). A failed flush closes the
    /// connection: what its replies say can no longer be promised.
    pub fn release_gate(
        &mut self,
        scratch: &mut Scratch,
        limits: Limits,
        registry: &Registry,
        now: Instant,
    ) -> Verdict {
        let Some(syncer) = self.session.syncer() else {
            return Verdict::Keep;
        };
        if syncer.failed() {
            return Verdict::Close;
        }
        let ready = self.gate.release(syncer.log().durable_lsn());
        if self.send(&ready).is_err() {
            return Verdict::Close;
        }
        self.on_ready(Readiness::default(), scratch, limits, registry, now)
    }

    /// Does the session hold a request it cannot answer yet?
    /// The connection's session (a service's wake-up reaches its state through it).
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    pub fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// The wait is over: `deliver` gives the session what it waited for and writes the
    /// reply, returning [`Flow::Wait`] if the session must go on waiting. Then the input
    /// that arrived meanwhile is answered. Nothing happens if the connection is not waiting.
    pub fn resume(
        &mut self,
        deliver: impl FnOnce(&mut Session, &mut Vec<u8>) -> Flow,
        scratch: &mut Scratch,
        limits: Limits,
        registry: &Registry,
        now: Instant,
    ) -> Verdict {
        if !self.waiting {
            return Verdict::Keep;
        }
        if self.end_wait(deliver, scratch, now) == Verdict::Close {
            return Verdict::Close;
        }
        self.on_ready(Readiness::default(), scratch, limits, registry, now)
    }

    /// The first half of [`Conn::resume`]: the session gets what it waited for and its reply
    /// is written (what the socket does not take is kept to send), but no input is fed or
    /// read. A retiring worker stops there to hand the connection over at this request
    /// boundary, the input behind it unread: a pipelining client's next request would make
    /// it wait again, and again. Nothing happens if the connection is not waiting.
    pub fn end_wait(
        &mut self,
        deliver: impl FnOnce(&mut Session, &mut Vec<u8>) -> Flow,
        scratch: &mut Scratch,
        now: Instant,
    ) -> Verdict {
        if !self.waiting {
            return Verdict::Keep;
        }
        scratch.write.clear();
        let flow = deliver(&mut self.session, &mut scratch.write);
        self.set_waiting(flow == Flow::Wait);
        if flow == Flow::Stop {
            self.phase = Phase::Closing;
            self.unread = Vec::new();
        }
        let replies = std::mem::take(&mut scratch.write);
        let sent = self.answer(&replies);
        scratch.write = replies;
        if sent.is_err() {
            return Verdict::Close;
        }
        self.last_active = now;
        // Input may have arrived while the session waited: no new edge will announce it.
        self.read_paused = true;
        Verdict::Keep
    }

    /// The service gave up a wait without answering (it cancelled a parked request, to hand
    /// the connection over or to serve it again): `request`, the waiting request's bytes, goes
    /// back in front of the unread input, to be fed again.
    pub fn cancel_wait(&mut self, request: &[u8]) {
        if !self.waiting {
            return;
        }
        self.set_waiting(false);
        self.unread.splice(0..0, request.iter().copied());
        self.read_paused = true;
    }

    fn set_waiting(&mut self, waiting: bool) {
        if waiting != self.waiting {
            let gauge = &self.counters.waiting;
            if waiting {
                gauge.fetch_add(1, Relaxed);
            } else {
                gauge.fetch_sub(1, Relaxed);
            }
            self.waiting = waiting;
        }
    }

    /// What the session made of `input`: counted, and a wait or a stop taken note of.
    fn take_step(&mut self, step: Step, input: &[u8]) {
        if step.requests > 0 {
            self.counters.requests.fetch_add(step.requests, Relaxed);
        }
        match step.flow {
            Flow::Continue => {}
            Flow::Stop => self.phase = Phase::Closing,
            Flow::Wait => {
                self.set_waiting(true);
                self.unread = input.get(step.consumed..).unwrap_or_default().to_vec();
            }
        }
    }

    /// Answers the input a wait left unread (an adopted connection's too).
    fn feed_unread(&mut self, scratch: &mut Scratch) -> io::Result<()> {
        let unread = std::mem::take(&mut self.unread);
        scratch.write.clear();
        let step = self.session.on_input(&unread, &mut scratch.write);
        self.take_step(step, &unread);
        let replies = std::mem::take(&mut scratch.write);
        let sent = self.answer(&replies);
        scratch.write = replies;
        sent
    }

    /// Waiting, the socket reported a hang-up or an error: a reset ends the connection (no
    /// reply can reach the client); an orderly EOF does not (a half-closed client may still
    /// be waiting for the answer).
    fn check_not_reset(&self) -> io::Result<()> {
        use nix::sys::socket::{recv, MsgFlags};
        let mut byte = [0u8; 1];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        match recv(self.stream.as_fd().as_raw_fd(), &mut byte, flags) {
            Err(nix::errno::Errno::EAGAIN) | Ok(_) => Ok(()),
            Err(errno) => Err(errno.into()),
        }
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
        let handshaking = self.stream.handshaking();
        let verdict = match self.drive(readiness, scratch, limits, registry, now) {
            Ok(verdict) => verdict,
            Err(e) => {
                let failed_handshake = tls_failure(&e).is_some_and(|tls| tls.is_handshake());
                if failed_handshake {
                    self.counters.tls_handshake_failures.fetch_add(1, Relaxed);
                }
                log::debug!("connection closed on error: {e}");
                return Verdict::Close;
            }
        };
        if handshaking && !self.stream.handshaking() {
            self.counters.tls_handshakes.fetch_add(1, Relaxed);
        }
        verdict
    }

    /// Starts a graceful close: pending replies go out, then the write side is shut down.
    pub fn close_gracefully(
        &mut self,
        scratch: &mut Scratch,
        registry: &Registry,
        now: Instant,
    ) -> Verdict {
        if let Phase::AwaitingHeader { .. } = self.phase {
            // Nothing read, nothing owed: the socket may simply close.
            return Verdict::Close;
        }
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
        if self.phase == Phase::Offered {
            return Ok(Verdict::Keep);
        }
        if let Phase::Lingering { .. } = self.phase {
            return self.discard_input(scratch, now);
        }
        if let Phase::AwaitingHeader { proxy, .. } = self.phase {
            if !self.read_proxy_header(proxy, readiness, scratch, now)? {
                return Ok(Verdict::Keep);
            }
            if self.phase != Phase::Open {
                return Ok(Verdict::Close);
            }
        }
        if self.waiting {
            // Nothing is read while a request waits (what arrives is read once it is over).
            if readiness.read_closed {
                self.check_not_reset()?;
            }
            if readiness.writable {
                self.flush(now)?;
            }
            self.update_interest(registry)?;
            return Ok(Verdict::Keep);
        }
        if !self.unread.is_empty() && self.phase == Phase::Open {
            self.feed_unread(scratch)?;
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
        while may_read && self.phase == Phase::Open && !self.peer_closed && !self.waiting {
            if reads == READS_PER_TURN {
                self.read_paused = true;
                self.turn_spent = true;
                break;
            }
            reads += 1;
            if self.held() >= limits.output_limit {
                self.flush(now)?;
                if self.held() >= limits.output_limit {
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

    /// Peeks at the PROXY header: once it is whole, reads exactly its bytes, tells the
    /// session who the client is, and opens the connection (to be read to the end: the
    /// client's first bytes may have come with the header). Returns false while more is
    /// needed; a refused header leaves the connection out of `Open` (the caller closes it).
    fn read_proxy_header(
        &mut self,
        proxy: PeerKey,
        readiness: Readiness,
        scratch: &mut Scratch,
        now: Instant,
    ) -> io::Result<bool> {
        use nix::sys::socket::{recv, MsgFlags};
        let fd = self.stream.as_fd().as_raw_fd();
        let window = &mut scratch.read[..proxy::MAX_HEADER_BYTES];
        let arrived = match recv(fd, window, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        // After the peer's EOF everything it sent is in the socket: nothing more will come.
        let ended = arrived == 0 || readiness.read_closed;
        let (header, len) = match proxy::parse(&window[..arrived]) {
            Ok(Parsed::Complete { header, len }) => (header, len),
            Ok(Parsed::Incomplete) if !ended => return Ok(false),
            Ok(Parsed::Incomplete) if arrived == 0 => {
                self.refuse_header(proxy, Outcome::Missing, &"closed before sending anything");
                return Ok(true);
            }
            Ok(Parsed::Incomplete) => {
                self.refuse_header(proxy, Outcome::Truncated, &"closed within its PROXY header");
                return Ok(true);
            }
            Err(e) => {
                self.refuse_header(proxy, Outcome::of_error(&e), &e);
                return Ok(true);
            }
        };
        let mut taken = 0;
        while taken < len {
            match recv(fd, &mut window[taken..len], MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => taken += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.counters.bytes_in.fetch_add(len as u64, Relaxed);
        self.counters.proxy_headers[Outcome::of_header(&header).index()].fetch_add(1, Relaxed);
        if let Some(client) = header.source() {
            log::debug!("connection from {client} through proxy {proxy}");
            self.client = Some(client.ip());
            self.session.proxied(PeerKey::Ip(client.ip()));
        } else {
            log::debug!("connection from proxy {proxy} for no named client ({header:?})");
            self.session.proxied(proxy);
        }
        self.last_active = now;
        self.phase = Phase::Open;
        self.read_paused = true;
        Ok(true)
    }

    /// A connection whose PROXY header is refused: logged with the reason and counted; it
    /// goes to `Closing` with nothing to send.
    fn refuse_header(&self, proxy: PeerKey, outcome: Outcome, reason: &dyn std::fmt::Display) {
        self.counters.proxy_headers[outcome.index()].fetch_add(1, Relaxed);
        log::warn!(
            "connection from {proxy}: PROXY header refused ({}): {reason}",
            outcome.name()
        );
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
        let step = if n == 0 {
            self.peer_closed = true;
            self.session.on_eof(out)
        } else {
            self.last_active = now;
            self.counters.bytes_in.fetch_add(n as u64, Relaxed);
            self.session.on_input(&scratch.read[..n], out)
        };
        self.take_step(step, &scratch.read[..n]);
        self.answer(&scratch.write)?;
        Ok(
            if n == 0 || self.waiting || (n < scratch.read.len() && !to_the_end) {
                ReadOutcome::Drained
            } else {
                ReadOutcome::More
            },
        )
    }

    /// Sends `replies`, or holds them behind the gate until the session's log is durable up to
    /// everything they report or read (the last LSN appended now covers it) and asks the
    /// syncer to flush. Once one reply waits, every later one waits behind it.
    fn answer(&mut self, replies: &[u8]) -> io::Result<()> {
        let Some(syncer) = self.session.syncer() else {
            return self.send(replies);
        };
        let lsn = syncer.log().appended_lsn();
        if self.gate.is_empty() && lsn <= syncer.log().durable_lsn() {
            return self.send(replies);
        }
        if !replies.is_empty() {
            self.gate.hold(replies, lsn);
            syncer.want(lsn);
        }
        Ok(())
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

    /// Writes pending replies until done or the socket is full (TLS: and the records the
    /// session holds).
    fn flush(&mut self, now: Instant) -> io::Result<()> {
        flush_records(&mut self.stream)?;
        while self.unsent() > 0 {
            let written = write_some(&mut self.stream, &self.pending[self.sent..])?;
            if written == 0 {
                return Ok(());
            }
            self.sent += written;
            self.last_active = now;
            self.counters.bytes_out.fetch_add(written as u64, Relaxed);
        }
        flush_records(&mut self.stream)?;
        // Fully sent: release the buffer so an idle connection holds no memory.
        self.pending = Vec::new();
        self.sent = 0;
        Ok(())
    }

    fn unsent(&self) -> usize {
        self.pending.len() - self.sent
    }

    /// Reply bytes not yet sent, held ones included (the backpressure measure).
    fn held(&self) -> usize {
        self.unsent() + self.gate.len()
    }

    /// Nothing waits to be written: no reply (held or pending), and no TLS record the socket
    /// has not taken.
    fn all_sent(&self) -> bool {
        self.unsent() == 0 && self.gate.is_empty() && !self.stream.wants_write()
    }

    fn update_interest(&mut self, registry: &Registry) -> io::Result<()> {
        let wants = !self.all_sent();
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
        if !self.all_sent() || self.waiting {
            return Ok(Verdict::Keep);
        }
        if self.peer_closed {
            // Nothing unread can remain after EOF, so a plain close cannot reset.
            return Ok(Verdict::Close);
        }
        if self.phase == Phase::Closing {
            self.stream.shutdown_write()?;
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
            match self.stream.read_discard(&mut scratch.read) {
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

impl Drop for Conn {
    /// A connection closed while it waited no longer counts as waiting.
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

#[derive(PartialEq, Eq)]
enum ReadOutcome {
    /// The socket has nothing more now (or the client closed).
    Drained,
    /// The read filled the buffer: read again.
    More,
}

/// Sends the TLS records a session holds (nothing for a plain socket); a full socket is not
/// an error (writable interest brings us back).
fn flush_records(stream: &mut Transport) -> io::Result<()> {
    match stream.flush() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        other => other,
    }
}

/// One write; 0 if the socket is full.
fn write_some(stream: &mut Transport, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(bytes) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config};
    use crate::service::{ServiceKind, SessionContext};
    use crate::users::PeerKey;
    use forkpool_ledger::{Ledger, LedgerOptions};
    use mio::{Events, Poll};
    use std::net::{TcpListener, TcpStream as StdStream};

    const TOKEN: Token = Token(7);
    const WAIT: Duration = Duration::from_secs(5);
    /// One poll of the test's loop.
    const STEP: Duration = Duration::from_millis(20);

    /// A connection of `kind` over loopback: the server side as a registered `Conn`, and
    /// the client's socket.
    struct Pair {
        poll: Poll,
        events: Events,
        conn: Conn,
        client: StdStream,
        scratch: Scratch,
        limits: Limits,
    }

    fn pair(kind: ServiceKind, output_limit: usize) -> Pair {
        pair_of(output_limit, |context, peer, counters| {
            Session::new(kind, context, peer, counters)
        })
    }

    /// A connection whose session waits on each line `hold` (see `Session::Hold`).
    fn holding_pair() -> Pair {
        pair_of(1 << 20, |_, _, _| {
            Session::Hold(forkpool_common::codec::LineFramer::new(64))
        })
    }

    fn pair_of(
        output_limit: usize,
        session: impl FnOnce(SessionContext, PeerKey, &'static ServiceCounters) -> Session,
    ) -> Pair {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let client = StdStream::connect(listener.local_addr().expect("bound")).expect("connect");
        client
            .set_read_timeout(Some(WAIT))
            .expect("set a read timeout");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("non-blocking");
        let dir = Box::leak(Box::new(
            tempfile::tempdir().expect("a temporary directory"),
        ));
        let ledger = Ledger::open(
            &dir.path().join("ledger.bin"),
            &LedgerOptions {
                max_accounts: 16,
                ..LedgerOptions::default()
            },
        )
        .expect("a fresh ledger");
        let config = Config::load(&Cli::default()).expect("default settings");
        let context = SessionContext {
            config: Box::leak(Box::new(config)),
            ledger: crate::bank::Backend::File(Box::leak(Box::new(ledger))),
            syncer: None,
            users: None,
            throttle: Box::leak(Box::default()),
            queue: crate::queue::test_hub(),
        };
        let counters: &'static ServiceCounters = Box::leak(Box::default());
        let poll = Poll::new().expect("a poll");
        let peer = PeerKey::Ip(server.peer_addr().expect("a peer").ip());
        let mut conn = Conn::new(
            Transport::Plain(mio::net::TcpStream::from_std(server)),
            TOKEN,
            session(context, peer, counters),
            counters,
            Instant::now(),
        );
        conn.register(poll.registry()).expect("register");
        Pair {
            poll,
            events: Events::with_capacity(8),
            conn,
            client,
            scratch: Scratch::new(64 * 1024),
            limits: Limits { output_limit },
        }
    }

    impl Pair {
        /// Waits up to one STEP for the connection's events and lets it handle them.
        fn step(&mut self) -> Verdict {
            self.poll.poll(&mut self.events, Some(STEP)).expect("poll");
            let mut readiness = Readiness::default();
            for event in self.events.iter() {
                readiness.readable |= event.is_readable();
                readiness.read_closed |= event.is_read_closed() || event.is_error();
                readiness.writable |= event.is_writable();
            }
            self.conn.on_ready(
                readiness,
                &mut self.scratch,
                self.limits,
                self.poll.registry(),
                Instant::now(),
            )
        }

        /// Ends the wait with `reply` and `flow` (what a service's wake-up does).
        fn resume(&mut self, reply: &'static [u8], flow: Flow) -> Verdict {
            self.conn.resume(
                |_, out| {
                    out.extend_from_slice(reply);
                    flow
                },
                &mut self.scratch,
                self.limits,
                self.poll.registry(),
                Instant::now(),
            )
        }

        /// Reads exactly `expected.len()` bytes from the client and compares.
        fn expect_replies(&mut self, expected: &[u8]) {
            let mut replies = vec![0u8; expected.len()];
            self.client
                .read_exact(&mut replies)
                .expect("read the replies");
            assert_eq!(
                String::from_utf8_lossy(&replies),
                String::from_utf8_lossy(expected)
            );
        }

        /// Steps until `done` says so (panics after WAIT); returns the last verdict.
        fn drive_until(
            &mut self,
            what: &str,
            mut done: impl FnMut(&Conn, Verdict) -> bool,
        ) -> Verdict {
            let deadline = Instant::now() + WAIT;
            loop {
                let verdict = self.step();
                if done(&self.conn, verdict) {
                    return verdict;
                }
                assert!(Instant::now() < deadline, "no {what} within {WAIT:?}");
            }
        }
    }

    #[test]
    fn a_line_read_is_answered_and_counted() {
        let mut pair = pair(ServiceKind::Echo, 1 << 20);
        pair.client.write_all(b"hello\n").expect("send");
        pair.drive_until("request", |conn, _| {
            conn.counters().requests.load(Relaxed) == 1
        });
        let mut reply = [0u8; 6];
        pair.client.read_exact(&mut reply).expect("read the reply");
        assert_eq!(&reply, b"HELLO\n");
        assert_eq!(pair.conn.counters().bytes_in.load(Relaxed), 6);
        assert_eq!(pair.conn.counters().bytes_out.load(Relaxed), 6);
        assert!(pair.conn.is_quiet());
    }

    #[test]
    fn a_client_that_does_not_read_stops_being_read_from_until_it_does() {
        const LIMIT: usize = 4096;
        let mut pair = pair(ServiceKind::Echo, LIMIT);
        pair.client
            .set_nonblocking(true)
            .expect("a non-blocking client");
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        let mut sent = 0usize;
        let deadline = Instant::now() + WAIT;
        // Send without reading until the connection stops reading. A write the socket takes
        // only part of is continued where it stopped, so the stream stays lines of 1 KiB.
        while !pair.conn.read_paused {
            assert!(Instant::now() < deadline, "the connection kept reading");
            loop {
                match pair.client.write(&line[sent % line.len()..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("send: {e}"),
                }
            }
            pair.step();
        }
        // Held replies are bounded by the limit plus one read's worth, not by what was sent.
        assert!(
            pair.conn.unsent() <= LIMIT + pair.scratch.read.len(),
            "{} bytes held",
            pair.conn.unsent()
        );
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while received.len() < sent {
            assert!(
                Instant::now() < deadline + WAIT,
                "only {} of {sent} bytes back",
                received.len()
            );
            match pair.client.read(&mut buf) {
                Ok(0) => panic!("the server closed"),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pair.step();
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        assert_eq!(received.len(), sent);
        let uppercased =
            |(i, &byte): (usize, &u8)| byte == line[i % line.len()].to_ascii_uppercase();
        assert!(received.iter().enumerate().all(uppercased));
    }

    #[test]
    fn a_waiting_request_holds_back_the_input_behind_it_until_it_is_resumed() {
        let mut pair = holding_pair();
        let waiting = &pair.conn.counters().waiting;
        pair.client.write_all(b"a\nhold\nb\n").expect("send");
        pair.drive_until("a wait", |conn, _| conn.is_waiting());
        pair.expect_replies(b"OK a\n");
        assert_eq!(waiting.load(Relaxed), 1);
        assert!(pair.conn.mid_request() && !pair.conn.is_quiet());
        assert!(!pair.conn.may_be_offered(), "not at a request boundary");
        // Input that arrives during the wait is left in the socket.
        let read_so_far = pair.conn.counters().bytes_in.load(Relaxed);
        pair.client.write_all(b"c\n").expect("send");
        for _ in 0..3 {
            assert_eq!(pair.step(), Verdict::Keep);
        }
        assert_eq!(pair.conn.counters().bytes_in.load(Relaxed), read_so_far);
        // A wake-up that is not the end of the wait keeps it waiting.
        assert_eq!(pair.resume(b"", Flow::Wait), Verdict::Keep);
        assert!(pair.conn.is_waiting());
        assert_eq!(pair.resume(b"RESUMED\n", Flow::Continue), Verdict::Keep);
        pair.drive_until("every request", |conn, _| {
            conn.counters().requests.load(Relaxed) == 4
        });
        pair.expect_replies(b"RESUMED\nOK b\nOK c\n");
        assert_eq!(waiting.load(Relaxed), 0);
        assert!(pair.conn.is_quiet() && !pair.conn.mid_request());
    }

    #[test]
    fn a_cancelled_wait_puts_its_request_back_in_front_of_the_unread_input() {
        let mut pair = holding_pair();
        pair.client.write_all(b"hold\nb\n").expect("send");
        pair.drive_until("a wait", |conn, _| conn.is_waiting());
        pair.conn.cancel_wait(b"hold\n");
        assert!(!pair.conn.is_waiting());
        assert!(pair.conn.may_be_offered());
        let state = pair.conn.offer(pair.poll.registry()).expect("offer");
        assert_eq!(state.unread, b"hold\nb\n", "the successor answers both");
    }

    #[test]
    fn an_ended_wait_answers_and_leaves_the_input_behind_it_for_a_successor() {
        let mut pair = holding_pair();
        pair.client.write_all(b"hold\nb\n").expect("send");
        pair.drive_until("a wait", |conn, _| conn.is_waiting());
        let ended = pair.conn.end_wait(
            |_, out| {
                out.extend_from_slice(b"DONE\n");
                Flow::Continue
            },
            &mut pair.scratch,
            Instant::now(),
        );
        assert_eq!(ended, Verdict::Keep);
        pair.expect_replies(b"DONE\n");
        assert!(pair.conn.may_be_offered(), "at a request boundary");
        let state = pair.conn.offer(pair.poll.registry()).expect("offer");
        assert_eq!(
            state.unread, b"b\n",
            "the request behind it is not answered here"
        );
        assert!(state.pending.is_empty());
    }

    #[test]
    fn a_waiting_connection_outlives_the_clients_eof_and_answers_before_closing() {
        let mut pair = holding_pair();
        pair.client.write_all(b"x\nhold").expect("send");
        pair.client
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        pair.drive_until("a wait at the end of the input", |conn, _| {
            conn.is_waiting() && conn.peer_closed
        });
        for _ in 0..3 {
            assert_eq!(pair.step(), Verdict::Keep, "the EOF does not end the wait");
        }
        assert_eq!(pair.resume(b"RESUMED\n", Flow::Continue), Verdict::Close);
        let Pair {
            conn, mut client, ..
        } = pair;
        drop(conn);
        let mut replies = Vec::new();
        client
            .read_to_end(&mut replies)
            .expect("a clean end of stream");
        assert_eq!(replies, b"OK x\nRESUMED\n");
    }

    #[test]
    fn a_reset_ends_a_wait_and_the_gauge_forgets_it() {
        let mut pair = holding_pair();
        pair.client.write_all(b"hold\n").expect("send");
        pair.drive_until("a wait", |conn, _| conn.is_waiting());
        let waiting = &pair.conn.counters().waiting;
        assert_eq!(waiting.load(Relaxed), 1);
        socket2::SockRef::from(&pair.client)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        // Close the client (a reset, with SO_LINGER 0); a connection to nowhere in particular
        // takes its place in the pair.
        let elsewhere = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let stand_in = StdStream::connect(elsewhere.local_addr().expect("bound")).expect("connect");
        drop(std::mem::replace(&mut pair.client, stand_in));
        pair.drive_until("the reset to close it", |_, verdict| {
            verdict == Verdict::Close
        });
        let Pair { conn, .. } = pair;
        drop(conn);
        assert_eq!(waiting.load(Relaxed), 0);
    }

    #[test]
    fn quit_is_answered_then_the_write_side_closes_and_the_close_lingers() {
        let mut pair = pair(ServiceKind::Bank, 1 << 20);
        pair.client.write_all(b"PING\nQUIT\nPING\n").expect("send");
        pair.drive_until("lingering close", |conn, _| {
            conn.linger_deadline().is_some()
        });
        let mut replies = Vec::new();
        pair.client
            .read_to_end(&mut replies)
            .expect("a clean end of stream");
        assert_eq!(replies, b"PONG\nBYE\n", "nothing after BYE, then EOF");
        pair.client
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let verdict = pair.drive_until("close", |_, verdict| verdict == Verdict::Close);
        assert_eq!(verdict, Verdict::Close);
    }

    #[test]
    fn the_clients_eof_answers_its_last_line_and_closes() {
        let mut pair = pair(ServiceKind::Bank, 1 << 20);
        pair.client.write_all(b"DEPOSIT carol 3").expect("send");
        pair.client
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        pair.drive_until("close", |_, verdict| verdict == Verdict::Close);
        // The worker drops a connection it is told to close.
        let Pair {
            conn, mut client, ..
        } = pair;
        drop(conn);
        let mut replies = Vec::new();
        client
            .read_to_end(&mut replies)
            .expect("a clean end of stream");
        assert_eq!(replies, b"OK 3\n");
    }
}
