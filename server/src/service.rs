//! The services a connection can speak, as byte-in/bytes-out sessions: the worker hands a
//! session whatever it read and sends whatever the session wrote. No socket here.

use crate::durability::Syncer;
use std::cell::RefCell;
use std::time::Instant;

use forkpool_common::bank::{parse_request, ProtocolError, Reply, Request, UserName};
use forkpool_common::codec::{Flow, Frame, LineFramer, Uppercaser};
use forkpool_common::queue;
use forkpool_pgledger::LedgerOp;

use crate::access::{Access, Screened};
use crate::bank::{self, Backend};
use crate::config::Config;
use crate::db::Pending;
use crate::handover::SessionState;
use crate::queue::{QueueConn, QueueHub};
use crate::scoreboard::ServiceCounters;
use crate::users::{AuthThrottle, ConnAuth, PeerKey, Users};

/// Which service a listener (and so each of its connections) provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Echo,
    Bank,
    Queue,
}

impl ServiceKind {
    /// Every service, in the order of per-service arrays.
    pub const ALL: [ServiceKind; 3] = [ServiceKind::Echo, ServiceKind::Bank, ServiceKind::Queue];

    /// Position in per-service arrays.
    pub fn index(self) -> usize {
        match self {
            ServiceKind::Echo => 0,
            ServiceKind::Bank => 1,
            ServiceKind::Queue => 2,
        }
    }

    /// The service called `name` (in settings, inherited descriptor names and logs).
    pub fn named(name: &str) -> Option<ServiceKind> {
        ServiceKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Echo => "echo",
            ServiceKind::Bank => "bank",
            ServiceKind::Queue => "queue",
        }
    }
}

/// What a session made of some input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// [`Flow::Stop`]: send what was written, then close. [`Flow::Wait`]: the session holds
    /// a request it cannot answer yet; the connection reads nothing more until
    /// [`crate::conn::Conn::resume`] says the wait is over.
    pub flow: Flow,
    /// Requests (lines) the input completed, the waiting one included.
    pub requests: u64,
    /// Bytes of the input looked at: all of them, except after a wait, where the rest is
    /// left for the connection to feed again once the wait is over.
    pub consumed: usize,
}

/// The protocol state of one connection.
#[derive(Debug)]
pub enum Session {
    /// Uppercase echo: a pure stream transformation, so it streams lines of any length
    /// through in constant memory and needs no line buffer.
    Echo(EchoSession),
    /// Bank: one request per line, one reply line per request, in order.
    Bank(BankSession),
    /// Queue: one request per line; a blocking request waits for the store.
    Queue(QueueSession),
    /// A service that waits (tests of the connection's waiting only): a line `hold` waits
    /// until resumed, any other line is answered `OK <line>`.
    #[cfg(test)]
    Hold(LineFramer),
}

/// An echo connection: the uppercaser's state, and where the client is in its lines.
#[derive(Debug, Default)]
pub struct EchoSession {
    upper: Uppercaser,
    /// The last byte read was not a newline: part of a line is answered, the rest is due.
    mid_line: bool,
}

/// A queue connection: its unfinished request line, its share of the store (jobs it
/// holds, its wait), and who it is (the bank's users and rules).
#[derive(Debug)]
pub struct QueueSession {
    framer: LineFramer,
    conn: QueueConn,
    access: Access,
}

/// A bank connection: its unfinished request line, the ledger it works on, and who it is.
#[derive(Debug)]
pub struct BankSession {
    framer: LineFramer,
    /// The worker's ledger, for the worker's whole life.
    ledger: Backend,
    /// The request submitted to the database whose reply the session waits for.
    pending: Option<Pending>,
    /// Under `--fsync always`: the worker's flusher, whose durable LSN gates the replies.
    syncer: Option<&'static Syncer>,
    access: Access,
}

/// What a new connection needs from its worker.
#[derive(Debug, Clone, Copy)]
pub struct SessionContext {
    /// The worker's settings (`max_line` for the bank).
    pub config: &'static Config,
    pub ledger: Backend,
    /// Under `--fsync always`, the worker's flusher (see `durability.rs`).
    pub syncer: Option<&'static Syncer>,
    /// The users of the bank and the queue, if a users file is configured.
    pub users: Option<&'static Users>,
    /// Failed AUTHs per peer, for the whole worker (one thread: a `RefCell` is enough).
    pub throttle: &'static RefCell<AuthThrottle>,
    /// The job queues and this worker's wake-ups.
    pub queue: &'static QueueHub,
}

impl Session {
    /// A new connection of `kind` from `peer` (a Unix peer whose uid maps to a user is
    /// authenticated as that user); its outcomes are counted in `counters`.
    pub fn new(
        kind: ServiceKind,
        context: SessionContext,
        peer: PeerKey,
        counters: &'static ServiceCounters,
    ) -> Session {
        let auth = match (context.users, peer) {
            (Some(users), PeerKey::Uid(uid)) => ConnAuth::for_peer_uid(users, uid),
            _ => ConnAuth::new(),
        };
        Session::open(
            kind,
            context,
            peer,
            counters,
            auth,
            LineFramer::new(context.config.max_line),
        )
    }

    fn open(
        kind: ServiceKind,
        context: SessionContext,
        peer: PeerKey,
        counters: &'static ServiceCounters,
        auth: ConnAuth,
        framer: LineFramer,
    ) -> Session {
        let access = Access::new(context.users, context.throttle, auth, peer, counters);
        match kind {
            ServiceKind::Echo => Session::Echo(EchoSession::default()),
            ServiceKind::Queue => Session::Queue(QueueSession {
                framer,
                conn: QueueConn::new(context.queue),
                access,
            }),
            ServiceKind::Bank => Session::Bank(BankSession {
                framer,
                ledger: context.ledger,
                syncer: context.syncer,
                pending: None,
                access,
            }),
        }
    }

    /// The connection comes through a proxy whose PROXY header named `client` (or, naming
    /// none, the proxy itself): logs and the AUTH throttle see that peer from now on, and the
    /// socket's Unix peer uid, the proxy's, authenticates nobody.
    pub fn proxied(&mut self, client: PeerKey) {
        match self {
            Session::Bank(session) => session.access.proxied(client),
            Session::Queue(session) => session.access.proxied(client),
            _ => {}
        }
    }

    /// Handles bytes read from the client, appending the replies to `out` (see [`Step`]).
    pub fn on_input(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        match self {
            Session::Echo(echo) => {
                echo.upper.feed(input, out);
                if let Some(&last) = input.last() {
                    echo.mid_line = last != b'\n';
                }
                Step {
                    flow: Flow::Continue,
                    requests: memchr::memchr_iter(b'\n', input).count() as u64,
                    consumed: input.len(),
                }
            }
            Session::Bank(session) => {
                let (ledger, access, pending) =
                    (session.ledger, &mut session.access, &mut session.pending);
                let max_line = session.framer.max_line();
                let mut requests = 0;
                let (flow, consumed) = session.framer.feed(input, |frame| {
                    requests += 1;
                    match frame {
                        Frame::Line(line) => answer_line(ledger, access, pending, line, out),
                        Frame::TooLong => {
                            Reply::from(ProtocolError::line_too_long(max_line)).write_to(out);
                            Flow::Stop
                        }
                    }
                });
                Step {
                    flow,
                    requests,
                    consumed,
                }
            }
            Session::Queue(session) => {
                let (conn, access, now) = (&mut session.conn, &mut session.access, Instant::now());
                let max_line = session.framer.max_line();
                let mut requests = 0;
                let (flow, consumed) = session.framer.feed(input, |frame| {
                    requests += 1;
                    match frame {
                        Frame::Line(line) => answer_queue_line(conn, access, line, now, out),
                        Frame::TooLong => {
                            Reply::from(ProtocolError::line_too_long(max_line)).write_to(out);
                            Flow::Stop
                        }
                    }
                });
                Step {
                    flow,
                    requests,
                    consumed,
                }
            }
            #[cfg(test)]
            Session::Hold(framer) => {
                let mut requests = 0;
                let (flow, consumed) = framer.feed(input, |frame| {
                    requests += 1;
                    match frame {
                        Frame::Line(b"hold") => Flow::Wait,
                        Frame::Line(line) => {
                            out.extend_from_slice(b"OK ");
                            out.extend_from_slice(line);
                            out.push(b'\n');
                            Flow::Continue
                        }
                        Frame::TooLong => Flow::Stop,
                    }
                });
                Step {
                    flow,
                    requests,
                    consumed,
                }
            }
        }
    }

    /// The flusher whose durable LSN the replies of this session wait for (a bank or queue
    /// session under `--fsync always`); `None`: replies go out at once.
    pub fn syncer(&self) -> Option<&'static Syncer> {
        match self {
            Session::Bank(session) => session.syncer,
            Session::Queue(session) => session.conn.syncer(),
            _ => None,
        }
    }

    /// Is the client part-way through a request: the start of a line read, its end not yet?
    /// A connection closed then would cut a reply (echo) or lose a request (bank).
    pub fn mid_request(&self) -> bool {
        match self {
            Session::Echo(echo) => echo.mid_line,
            Session::Bank(session) => session.framer.buffered() > 0,
            Session::Queue(session) => session.framer.buffered() > 0,
            #[cfg(test)]
            Session::Hold(framer) => framer.buffered() > 0,
        }
    }

    /// The queue connection's state, if this is a queue session.
    pub fn queue(&mut self) -> Option<&mut QueueConn> {
        match self {
            Session::Queue(session) => Some(&mut session.conn),
            _ => None,
        }
    }

    /// The state another worker needs to continue this session (see `handover.rs`).
    pub fn export(&self) -> SessionState {
        match self {
            Session::Echo(echo) => SessionState::Echo {
                held: echo.upper.held().to_vec(),
                mid_line: echo.mid_line,
            },
            Session::Bank(session) => SessionState::Bank {
                partial: session.framer.partial().unwrap_or_default().to_vec(),
                user: session.access.export(),
            },
            Session::Queue(session) => {
                let (owner, held) = session.conn.export();
                SessionState::Queue {
                    partial: session.framer.partial().unwrap_or_default().to_vec(),
                    owner,
                    held,
                    user: session.access.export(),
                }
            }
            // A test session travels as a bank session would.
            #[cfg(test)]
            Session::Hold(framer) => SessionState::Bank {
                partial: framer.partial().unwrap_or_default().to_vec(),
                user: None,
            },
        }
    }

    /// Continues a session exported by another worker, for the connection from `peer`;
    /// `None` if the state is not one a session can be in (e.g. held bytes that are no cut
    /// UTF-8 sequence). An authenticated bank or queue connection stays so if this worker's
    /// users still have its user with the same token.
    pub fn resume(
        state: SessionState,
        context: SessionContext,
        peer: PeerKey,
        counters: &'static ServiceCounters,
    ) -> Option<Session> {
        Some(match state {
            SessionState::Echo { held, mid_line } => Session::Echo(EchoSession {
                upper: Uppercaser::resume(&held)?,
                mid_line,
            }),
            SessionState::Bank { partial, user } => {
                let framer = LineFramer::resume(context.config.max_line, partial);
                let auth = resume_auth(context, user);
                Session::open(ServiceKind::Bank, context, peer, counters, auth, framer)
            }
            SessionState::Queue {
                partial,
                owner,
                held,
                user,
            } => Session::Queue(QueueSession {
                framer: LineFramer::resume(context.config.max_line, partial),
                conn: QueueConn::adopt(context.queue, owner, held),
                access: Access::new(
                    context.users,
                    context.throttle,
                    resume_auth(context, user),
                    peer,
                    counters,
                ),
            }),
        })
    }

    /// The database's reply to the request the session waits for: written, and the session
    /// goes on with the input behind it.
    pub fn ledger_reply(&mut self, reply: &Reply, out: &mut Vec<u8>) -> Flow {
        if let Session::Bank(session) = self {
            session.pending = None;
            reply.write_to(out);
        }
        Flow::Continue
    }

    /// The server closes the connection: echo sends the bytes it held back (an unfinished
    /// UTF-8 sequence, invalid on its own, goes back unchanged). An unfinished bank line is
    /// not a request and gets no reply.
    pub fn on_server_close(&mut self, out: &mut Vec<u8>) {
        if let Session::Echo(echo) = self {
            echo.upper.finish(out);
        }
    }

    /// The client half-closed: answer what is left (an unterminated last line), counted
    /// as in [`Session::on_input`]. The flow is [`Flow::Stop`], or [`Flow::Wait`] if the
    /// last line waits (the connection closes once it is answered).
    pub fn on_eof(&mut self, out: &mut Vec<u8>) -> Step {
        let answered = match self {
            Session::Echo(echo) => {
                let before = out.len();
                echo.upper.finish(out);
                out.len() > before
            }
            Session::Bank(session) => match session.framer.finish() {
                Some(line) => {
                    let flow = answer_line(
                        session.ledger,
                        &mut session.access,
                        &mut session.pending,
                        &line,
                        out,
                    );
                    if flow == Flow::Wait {
                        return Step {
                            flow,
                            requests: 1,
                            consumed: 0,
                        };
                    }
                    true
                }
                None => false,
            },
            Session::Queue(session) => match session.framer.finish() {
                Some(line) => {
                    let (conn, access) = (&mut session.conn, &mut session.access);
                    if answer_queue_line(conn, access, &line, Instant::now(), out) == Flow::Wait {
                        return Step {
                            flow: Flow::Wait,
                            requests: 1,
                            consumed: 0,
                        };
                    }
                    true
                }
                None => false,
            },
            #[cfg(test)]
            Session::Hold(framer) => {
                let waits = framer.finish().is_some_and(|line| line == b"hold");
                if waits {
                    return Step {
                        flow: Flow::Wait,
                        requests: 1,
                        consumed: 0,
                    };
                }
                false
            }
        };
        Step {
            flow: Flow::Stop,
            requests: u64::from(answered),
            consumed: 0,
        }
    }
}

/// Answers one bank request line; QUIT stops the connection after its `BYE`, and so does
/// the AUTH failure that exhausts the connection's tries.
/// With a database, a request for the ledger is submitted and the session waits
/// ([`Flow::Wait`]) for its reply, which [`Session::ledger_reply`] writes.
fn answer_line(
    ledger: Backend,
    access: &mut Access,
    pending: &mut Option<Pending>,
    line: &[u8],
    out: &mut Vec<u8>,
) -> Flow {
    let request = match parse_request(line) {
        Ok(request) => request,
        Err(error) => {
            Reply::from(error).write_to(out);
            return Flow::Continue;
        }
    };
    match access.screen(&request) {
        Screened::Serve => {}
        Screened::Authenticated(user) => {
            Reply::Authenticated(user).write_to(out);
            return Flow::Continue;
        }
        Screened::Denied { why, close } => {
            why.reply().write_to(out);
            return stop_if(close);
        }
    }
    match (ledger, LedgerOp::of(&request)) {
        (Backend::File(ledger), _) => bank::execute(ledger, &request).write_to(out),
        (Backend::Db(db), Some(op)) => {
            *pending = Some(db.submit(op));
            return Flow::Wait;
        }
        (Backend::Db(_), None) => bank::without_ledger(&request).write_to(out),
    }
    if request == Request::Quit {
        Flow::Stop
    } else {
        Flow::Continue
    }
}

/// Answers one queue request line: screened by the connection's access control, then
/// carried out (see [`QueueConn::answer`]). A connection whose user changes gives back the
/// jobs it holds first: they were fetched for the previous user, who alone may complete
/// them. The AUTH failure that exhausts the connection's tries closes it.
fn answer_queue_line(
    conn: &mut QueueConn,
    access: &mut Access,
    line: &[u8],
    now: Instant,
    out: &mut Vec<u8>,
) -> Flow {
    let request = match queue::parse_request(line) {
        Ok(request) => request,
        Err(error) => {
            queue::Reply::Err(error).write_to(out);
            return Flow::Continue;
        }
    };
    let before = access.user().map(|user| user.name);
    let screened = access.screen(&request);
    if access.user().map(|user| user.name) != before {
        conn.release_held();
    }
    match screened {
        Screened::Serve => {
            let queues = access.user().map(|user| &user.queues);
            conn.answer(line, request, queues, now, out)
        }
        Screened::Authenticated(user) => {
            queue::Reply::Authenticated(user).write_to(out);
            Flow::Continue
        }
        Screened::Denied { why, close } => {
            queue::Reply::Err(why.queue_error()).write_to(out);
            stop_if(close)
        }
    }
}

fn stop_if(close: bool) -> Flow {
    if close {
        Flow::Stop
    } else {
        Flow::Continue
    }
}

/// A handed-over connection's user, if this worker's users still have it with that token.
fn resume_auth(context: SessionContext, user: Option<(UserName, [u8; 32])>) -> ConnAuth {
    match context.users {
        Some(users) => ConnAuth::resume(users, user),
        None => ConnAuth::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use forkpool_ledger::{Ledger, LedgerOptions};

    /// A context with `max_line` and a fresh ledger, kept for the test process's life (a
    /// session borrows both for `'static`, as in a worker).
    fn context(max_line: usize) -> SessionContext {
        let dir = Box::leak(Box::new(
            tempfile::tempdir().expect("a temporary directory"),
        ));
        let options = LedgerOptions {
            max_accounts: 16,
            ..LedgerOptions::default()
        };
        let ledger =
            Ledger::open(&dir.path().join("ledger.bin"), &options).expect("a fresh ledger");
        let config = Config::load(&Cli {
            max_line: Some(max_line),
            max_accounts: Some(16),
            ..Cli::default()
        })
        .expect("valid settings");
        SessionContext {
            config: Box::leak(Box::new(config)),
            ledger: Backend::File(Box::leak(Box::new(ledger))),
            syncer: None,
            users: None,
            throttle: Box::leak(Box::default()),
            queue: crate::queue::test_hub(),
        }
    }

    /// A session of `kind` from a loopback client, with `max_line` and a fresh ledger.
    fn session(kind: ServiceKind, max_line: usize) -> Session {
        let peer = PeerKey::Ip(std::net::Ipv4Addr::LOCALHOST.into());
        Session::new(kind, context(max_line), peer, Box::leak(Box::default()))
    }

    /// Feeds `pieces` one by one; returns everything written, the last flow and the count of
    /// requests completed.
    fn feed(session: &mut Session, pieces: &[&[u8]]) -> (Vec<u8>, Flow, u64) {
        let (mut out, mut flow, mut requests) = (Vec::new(), Flow::Continue, 0);
        for piece in pieces {
            let step = session.on_input(piece, &mut out);
            if step.flow != Flow::Stop {
                assert_eq!(step.consumed, piece.len(), "echo and the bank never wait");
            }
            flow = step.flow;
            requests += step.requests;
        }
        (out, flow, requests)
    }

    #[test]
    fn echo_streams_uppercase_and_knows_when_it_is_mid_line() {
        let mut echo = session(ServiceKind::Echo, 64);
        let (out, flow, requests) = feed(&mut echo, &[b"stra\xc3", b"\x9fe\nhal"]);
        assert_eq!(
            (out.as_slice(), flow, requests),
            (&b"STRASSE\nHAL"[..], Flow::Continue, 1)
        );
        assert!(echo.mid_request(), "the line 'hal' is unfinished");
        let (out, _, _) = feed(&mut echo, &[b"f\n"]);
        assert_eq!(out, b"F\n");
        assert!(!echo.mid_request());
    }

    #[test]
    fn echo_gives_back_a_cut_utf8_sequence_when_the_server_closes() {
        let mut echo = session(ServiceKind::Echo, 64);
        let (out, _, _) = feed(&mut echo, &[b"a\xc3"]);
        assert_eq!(out, b"A", "the lead byte is held back");
        let mut rest = Vec::new();
        echo.on_server_close(&mut rest);
        assert_eq!(rest, b"\xc3");
    }

    #[test]
    fn echo_answers_an_unterminated_last_line_at_eof_and_stops() {
        let mut echo = session(ServiceKind::Echo, 64);
        let mut out = Vec::new();
        assert_eq!(
            echo.on_eof(&mut out),
            Step {
                flow: Flow::Stop,
                requests: 0,
                consumed: 0
            },
            "nothing left: no request"
        );
        let (out, _, _) = feed(&mut echo, &[b"tail"]);
        assert_eq!(out, b"TAIL");
    }

    #[test]
    fn bank_answers_each_line_in_order_across_reads() {
        let mut bank = session(ServiceKind::Bank, 64);
        let (out, flow, requests) = feed(
            &mut bank,
            &[b"DEPOSIT alice 10\r\nPI", b"NG\nBALANCE ", b"alice\n"],
        );
        assert_eq!(out, b"OK 10\nPONG\nOK 10\n");
        assert_eq!((flow, requests), (Flow::Continue, 3));
        assert!(!bank.mid_request());
        feed(&mut bank, &[b"AUD"]);
        assert!(bank.mid_request(), "half a request is buffered");
    }

    #[test]
    fn bank_quit_and_an_overlong_line_stop_the_session_after_their_reply() {
        let mut bank = session(ServiceKind::Bank, 64);
        let (out, flow, _) = feed(&mut bank, &[b"QUIT\nPING\n"]);
        assert_eq!((out.as_slice(), flow), (&b"BYE\n"[..], Flow::Stop));
        let mut bank = session(ServiceKind::Bank, 8);
        let (out, flow, requests) = feed(&mut bank, &[b"BALANCE alice\n"]);
        assert_eq!(flow, Flow::Stop);
        assert_eq!(requests, 1);
        assert!(out.starts_with(b"ERR line-too-long "), "{out:?}");
        assert!(out.ends_with(b"\n") && out.iter().filter(|&&b| b == b'\n').count() == 1);
    }

    #[test]
    fn a_queue_get_waits_and_leaves_the_input_behind_it_for_later() {
        let mut getter = session(ServiceKind::Queue, 64);
        let mut out = Vec::new();
        let input = b"GET_NOWAIT w\nGET w\nPING\n";
        let step = getter.on_input(input, &mut out);
        assert!(out.starts_with(b"ERR empty "), "{out:?}");
        assert_eq!((step.flow, step.requests), (Flow::Wait, 2));
        assert_eq!(
            &input[step.consumed..],
            b"PING\n",
            "the line after the wait is left"
        );
        assert!(!getter.queue().expect("a queue session").served());
        let mut putter = session(ServiceKind::Queue, 64);
        let (reply, _, _) = feed(&mut putter, &[b"PUT w 0 a b 1\n"]);
        assert!(reply.starts_with(b"OK "), "{reply:?}");
        let queue = getter.queue().expect("a queue session");
        assert!(queue.served());
        let mut out = Vec::new();
        assert_eq!(queue.on_wakeup(&mut out), Flow::Continue);
        assert!(
            out.starts_with(b"JOB ") && out.ends_with(b" a b 1\n"),
            "{out:?}"
        );
    }

    #[test]
    fn bank_answers_an_unterminated_last_line_at_eof() {
        let mut bank = session(ServiceKind::Bank, 64);
        feed(&mut bank, &[b"DEPOSIT bob 5"]);
        let mut out = Vec::new();
        let step = bank.on_eof(&mut out);
        assert_eq!((step.flow, step.requests), (Flow::Stop, 1));
        assert_eq!(out, b"OK 5\n");
        let mut none = Vec::new();
        bank.on_server_close(&mut none);
        assert!(none.is_empty(), "a bank session holds nothing back");
    }
}
