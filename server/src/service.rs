//! The services a connection can speak, as byte-in/bytes-out sessions: the worker hands a
//! session whatever it read and sends whatever the session wrote. No socket here.

use forkpool_common::bank::{parse_request, ErrorKind, Reply, Request};
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
    Echo(Uppercaser),
    /// Bank: one request per line, one reply line per request, in order.
    Bank(BankSession),
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
            ServiceKind::Echo => Session::Echo(Uppercaser::default()),
            ServiceKind::Bank => Session::Bank(BankSession {
                framer: LineFramer::new(settings.max_line),
                ledger: settings.ledger,
            }),
        }
    }

    /// Handles bytes read from the client, appending the replies to `out`.
    /// [`Flow::Stop`] means: send what is in `out`, then close.
    pub fn on_input(&mut self, input: &[u8], out: &mut Vec<u8>) -> Flow {
        match self {
            Session::Echo(upper) => {
                upper.feed(input, out);
                Flow::Continue
            }
            Session::Bank(session) => {
                let ledger = session.ledger;
                session.framer.feed(input, |frame| match frame {
                    Frame::Line(line) => answer_line(ledger, line, out),
                    Frame::TooLong => {
                        Reply::error(
                            ErrorKind::LineTooLong,
                            "request lines are limited in length; closing",
                        )
                        .write_to(out);
                        Flow::Stop
                    }
                })
            }
        }
    }

    /// The client half-closed: answer what is left (an unterminated last line).
    pub fn on_eof(&mut self, out: &mut Vec<u8>) {
        match self {
            Session::Echo(upper) => upper.finish(out),
            Session::Bank(session) => {
                if let Some(line) = session.framer.finish() {
                    answer_line(session.ledger, &line, out);
                }
            }
        }
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
