//! The services a connection can speak, as byte-in/bytes-out sessions: the worker hands a
//! session whatever it read and sends whatever the session wrote. No socket here.

use forkpool_common::bank::{parse_request, ProtocolError, Reply, Request};
use forkpool_common::codec::{Flow, Frame, LineFramer, Uppercaser};
use forkpool_ledger::Ledger;

use crate::bank;

/// Which service a listener (and so each of its connections) provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Echo,
    Bank,
}

impl ServiceKind {
    /// Position in per-service arrays.
    pub fn index(self) -> usize {
        match self {
            ServiceKind::Echo => 0,
            ServiceKind::Bank => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Echo => "echo",
            ServiceKind::Bank => "bank",
        }
    }
}

/// The protocol state of one connection.
#[derive(Debug)]
pub enum Session {
    /// Uppercase echo: a pure stream transformation, so it streams lines of any length
    /// through in constant memory and needs no line buffer.
    Echo(EchoSession),
    /// Bank: one request per line, one reply line per request, in order.
    Bank(BankSession),
}

/// An echo connection: the uppercaser's state, and where the client is in its lines.
#[derive(Debug, Default)]
pub struct EchoSession {
    upper: Uppercaser,
    /// The last byte read was not a newline: part of a line is answered, the rest is due.
    mid_line: bool,
}

/// A bank connection: its unfinished request line and the ledger it works on.
#[derive(Debug)]
pub struct BankSession {
    framer: LineFramer,
    /// The worker's ledger, mapped for the worker's whole life.
    ledger: &'static Ledger,
}

/// What a new connection needs from its worker.
#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    /// Longest bank request line.
    pub max_line: usize,
    pub ledger: &'static Ledger,
}

impl Session {
    pub fn new(kind: ServiceKind, settings: SessionSettings) -> Session {
        match kind {
            ServiceKind::Echo => Session::Echo(EchoSession::default()),
            ServiceKind::Bank => Session::Bank(BankSession {
                framer: LineFramer::new(settings.max_line),
                ledger: settings.ledger,
            }),
        }
    }

    /// Handles bytes read from the client, appending the replies to `out`; returns whether
    /// to go on ([`Flow::Stop`]: send what is in `out`, then close) and how many requests
    /// (lines) the input completed.
    pub fn on_input(&mut self, input: &[u8], out: &mut Vec<u8>) -> (Flow, u64) {
        match self {
            Session::Echo(echo) => {
                echo.upper.feed(input, out);
                if let Some(&last) = input.last() {
                    echo.mid_line = last != b'\n';
                }
                (
                    Flow::Continue,
                    memchr::memchr_iter(b'\n', input).count() as u64,
                )
            }
            Session::Bank(session) => {
                let (ledger, max_line) = (session.ledger, session.framer.max_line());
                let mut requests = 0;
                let flow = session.framer.feed(input, |frame| {
                    requests += 1;
                    match frame {
                        Frame::Line(line) => answer_line(ledger, line, out),
                        Frame::TooLong => {
                            Reply::from(ProtocolError::line_too_long(max_line)).write_to(out);
                            Flow::Stop
                        }
                    }
                });
                (flow, requests)
            }
        }
    }

    /// Is the client part-way through a request: the start of a line read, its end not yet?
    /// A connection closed then would cut a reply (echo) or lose a request (bank).
    pub fn mid_request(&self) -> bool {
        match self {
            Session::Echo(echo) => echo.mid_line,
            Session::Bank(session) => session.framer.buffered() > 0,
        }
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
    /// as in [`Session::on_input`].
    pub fn on_eof(&mut self, out: &mut Vec<u8>) -> (Flow, u64) {
        let answered = match self {
            Session::Echo(echo) => {
                let before = out.len();
                echo.upper.finish(out);
                out.len() > before
            }
            Session::Bank(session) => match session.framer.finish() {
                Some(line) => {
                    answer_line(session.ledger, &line, out);
                    true
                }
                None => false,
            },
        };
        (Flow::Stop, u64::from(answered))
    }
}

/// Answers one bank request line; QUIT stops the connection after its `BYE`.
fn answer_line(ledger: &Ledger, line: &[u8], out: &mut Vec<u8>) -> Flow {
    match parse_request(line) {
        Ok(request) => {
            bank::execute(ledger, &request).write_to(out);
            if request == Request::Quit {
                Flow::Stop
            } else {
                Flow::Continue
            }
        }
        Err(error) => {
            Reply::from(error).write_to(out);
            Flow::Continue
        }
    }
}
