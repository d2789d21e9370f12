//! The services a connection can speak, as byte-in/bytes-out sessions: the worker hands a
//! session whatever it read and sends whatever the session wrote. No socket here.

use forkpool_common::codec::{Flow, Uppercaser};

/// Which service a listener (and so each of its connections) provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Echo,
}

impl ServiceKind {
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Echo => "echo",
        }
    }
}

/// The protocol state of one connection.
#[derive(Debug)]
pub enum Session {
    /// Uppercase echo: a pure stream transformation, so it streams lines of any length
    /// through in constant memory and needs no line buffer.
    Echo(Uppercaser),
}

impl Session {
    pub fn new(kind: ServiceKind) -> Session {
        match kind {
            ServiceKind::Echo => Session::Echo(Uppercaser::default()),
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
        }
    }

    /// The client half-closed: answer what is left (an unterminated last line).
    pub fn on_eof(&mut self, out: &mut Vec<u8>) {
        match self {
            Session::Echo(upper) => upper.finish(out),
        }
    }
}
