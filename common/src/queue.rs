//! The queue line protocol: request parsing and reply formatting. Bytes in, values out; no
//! I/O and no store. The lexical rules, the quoting of client input in error details and the
//! `ERR <kind> <detail>` form are the bank's (`bank.rs`); queue names follow the bank's
//! account-name rules.
//!
//! | request | success reply |
//! | --- | --- |
//! | `PUT <queue> <timeout_ms> <payload>` | `OK <id>` (waits while the queue is full) |
//! | `PUT_NOWAIT <queue> <payload>` | `OK <id>`, or `ERR full` |
//! | `GET <queue> [timeout_ms]` | `JOB <id> <payload>` (waits while it is empty) |
//! | `GET_NOWAIT <queue>` | `JOB <id> <payload>`, or `ERR empty` |
//! | `DONE <id>` | `OK` |
//! | `JOIN <queue> [timeout_ms]` | `OK` once every job put so far is done |
//! | `STATS <queue>` | `OK depth=D in_flight=F put=P done=N getters=G putters=U joiners=J maxsize=M` |
//! | `QUEUES` | `OK <count> <queue>...` |
//! | `CONFIG <queue> maxsize <n>` | `OK` |
//! | `PING` | `PONG` |
//! | `QUIT` | `BYE` |
//! | `AUTH <user> <token>` | `OK <user>` (the bank's AUTH: same users, same rules) |
//!
//! # Rules beyond the bank's
//! - A timeout is 0 to 4294967295 milliseconds; 0, or no timeout field, waits without limit.
//!   A wait that runs out is answered `ERR timeout` and changed nothing.
//! - The payload is the rest of the line after the one blank that ends the field before it:
//!   spaces, tabs and digits in it are payload, never arguments. It is 1 to `max_payload`
//!   bytes of anything but `\n` (a trailing `\r` is stripped with the line's). A job's reply
//!   carries it back byte for byte.
//! - A job id is a decimal number as `OK <id>` and `JOB <id>` print it; `maxsize` is 0
//!   (unbounded) to 2^63-1.
//!
//! # Order of checks
//! As in the bank: empty line, unknown verb, field count, then the fields left to right.
//! Failures the server decides (`full`, `empty`, `timeout`, `not-reserved`, `no-such-queue`,
//! `payload-too-long`, `store-full`, `too-many-queues`, `too-many-waiters`,
//! `shutting-down`, `line-too-long`, `internal`, `denied`) are built with
//! [`QueueError::new`] and one of the [`QueueErrorKind`] words.

use std::fmt;

use crate::bank::{
    parse_amount, parse_token, parse_user, push_decimal, quote, write_clean_detail, AccountName,
    AuthToken, ProtocolError, UserName,
};

/// A queue's name: the bank's account-name rules (1 to 64 bytes of `[A-Za-z0-9_.-]`).
pub type QueueName = AccountName;

/// Longest timeout, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = u32::MAX as u64;

/// One request. The payload borrows the request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Put {
        queue: QueueName,
        timeout_ms: u64,
        payload: &'a [u8],
    },
    PutNowait {
        queue: QueueName,
        payload: &'a [u8],
    },
    Get {
        queue: QueueName,
        timeout_ms: u64,
    },
    GetNowait {
        queue: QueueName,
    },
    Done {
        id: u64,
    },
    Join {
        queue: QueueName,
        timeout_ms: u64,
    },
    Stats {
        queue: QueueName,
    },
    Queues,
    Config {
        queue: QueueName,
        maxsize: u64,
    },
    Ping,
    Quit,
    /// `AUTH <user> <token>`: become `user` on this connection (when the server has users).
    Auth {
        user: UserName,
        token: AuthToken,
    },
}

impl Request<'_> {
    /// The request's verb as it is written on the wire (upper case).
    pub fn verb(&self) -> &'static str {
        let verb = match self {
            Request::Put { .. } => Verb::Put,
            Request::PutNowait { .. } => Verb::PutNowait,
            Request::Get { .. } => Verb::Get,
            Request::GetNowait { .. } => Verb::GetNowait,
            Request::Done { .. } => Verb::Done,
            Request::Join { .. } => Verb::Join,
            Request::Stats { .. } => Verb::Stats,
            Request::Queues => Verb::Queues,
            Request::Config { .. } => Verb::Config,
            Request::Ping => Verb::Ping,
            Request::Quit => Verb::Quit,
            Request::Auth { .. } => Verb::Auth,
        };
        verb.name()
    }

    /// The queue the request names, if it names one.
    pub fn queue(&self) -> Option<&QueueName> {
        match self {
            Request::Put { queue, .. }
            | Request::PutNowait { queue, .. }
            | Request::Get { queue, .. }
            | Request::GetNowait { queue }
            | Request::Join { queue, .. }
            | Request::Stats { queue }
            | Request::Config { queue, .. } => Some(queue),
            Request::Done { .. }
            | Request::Queues
            | Request::Ping
            | Request::Quit
            | Request::Auth { .. } => None,
        }
    }
}

/// The failure words of the queue protocol, as they appear after `ERR `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueErrorKind {
    UnknownCommand,
    BadRequest,
    BadQueue,
    BadTimeout,
    BadId,
    BadMaxsize,
    LineTooLong,
    PayloadTooLong,
    Full,
    Empty,
    Timeout,
    NoSuchQueue,
    NotReserved,
    StoreFull,
    TooManyQueues,
    TooManyWaiters,
    ShuttingDown,
    Internal,
    Denied,
}

impl QueueErrorKind {
    pub const ALL: [QueueErrorKind; 19] = [
        QueueErrorKind::UnknownCommand,
        QueueErrorKind::BadRequest,
        QueueErrorKind::BadQueue,
        QueueErrorKind::BadTimeout,
        QueueErrorKind::BadId,
        QueueErrorKind::BadMaxsize,
        QueueErrorKind::LineTooLong,
        QueueErrorKind::PayloadTooLong,
        QueueErrorKind::Full,
        QueueErrorKind::Empty,
        QueueErrorKind::Timeout,
        QueueErrorKind::NoSuchQueue,
        QueueErrorKind::NotReserved,
        QueueErrorKind::StoreFull,
        QueueErrorKind::TooManyQueues,
        QueueErrorKind::TooManyWaiters,
        QueueErrorKind::ShuttingDown,
        QueueErrorKind::Internal,
        QueueErrorKind::Denied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueErrorKind::UnknownCommand => "unknown-command",
            QueueErrorKind::BadRequest => "bad-request",
            QueueErrorKind::BadQueue => "bad-queue",
            QueueErrorKind::BadTimeout => "bad-timeout",
            QueueErrorKind::BadId => "bad-id",
            QueueErrorKind::BadMaxsize => "bad-maxsize",
            QueueErrorKind::LineTooLong => "line-too-long",
            QueueErrorKind::PayloadTooLong => "payload-too-long",
            QueueErrorKind::Full => "full",
            QueueErrorKind::Empty => "empty",
            QueueErrorKind::Timeout => "timeout",
            QueueErrorKind::NoSuchQueue => "no-such-queue",
            QueueErrorKind::NotReserved => "not-reserved",
            QueueErrorKind::StoreFull => "store-full",
            QueueErrorKind::TooManyQueues => "too-many-queues",
            QueueErrorKind::TooManyWaiters => "too-many-waiters",
            QueueErrorKind::ShuttingDown => "shutting-down",
            QueueErrorKind::Internal => "internal",
            QueueErrorKind::Denied => "denied",
        }
    }
}

impl fmt::Display for QueueErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that cannot be carried out: the `ERR` word and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct QueueError {
    pub kind: QueueErrorKind,
    pub detail: String,
}

impl QueueError {
    pub fn new(kind: QueueErrorKind, detail: impl Into<String>) -> Self {
        QueueError {
            kind,
            detail: detail.into(),
        }
    }
}

/// One queue's figures as `STATS` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    pub depth: u64,
    pub in_flight: u64,
    pub put: u64,
    pub done: u64,
    pub getters: u64,
    pub putters: u64,
    pub joiners: u64,
    pub maxsize: u64,
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `OK`: DONE, JOIN, CONFIG.
    Ok,
    /// `OK <id>`: PUT.
    Put(u64),
    /// `JOB <id> <payload>`: GET.
    Job {
        id: u64,
        payload: &'a [u8],
    },
    /// `OK depth=...`: STATS.
    Stats(Figures),
    /// `OK <count> <queue>...`: QUEUES.
    Queues(&'a [QueueName]),
    Pong,
    Bye,
    /// `OK <user>`: AUTH succeeded; the connection now acts as `user`.
    Authenticated(UserName),
    Err(QueueError),
}

impl Reply<'_> {
    /// Appends the reply as exactly one line ending in `\n` (an error detail escaped and cut
    /// as in the bank).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Ok => out.extend_from_slice(b"OK"),
            Reply::Put(id) => {
                out.extend_from_slice(b"OK ");
                push_decimal(out, u128::from(*id));
            }
            Reply::Job { id, payload } => {
                out.extend_from_slice(b"JOB ");
                push_decimal(out, u128::from(*id));
                out.push(b' ');
                out.extend_from_slice(payload);
            }
            Reply::Stats(f) => {
                out.extend_from_slice(b"OK");
                let fields = [
                    ("depth", f.depth),
                    ("in_flight", f.in_flight),
                    ("put", f.put),
                    ("done", f.done),
                    ("getters", f.getters),
                    ("putters", f.putters),
                    ("joiners", f.joiners),
                    ("maxsize", f.maxsize),
                ];
                for (name, value) in fields {
                    out.push(b' ');
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    push_decimal(out, u128::from(value));
                }
            }
            Reply::Queues(names) => {
                out.extend_from_slice(b"OK ");
                push_decimal(out, names.len() as u128);
                for name in names.iter() {
                    out.push(b' ');
                    out.extend_from_slice(name.as_bytes());
                }
            }
            Reply::Pong => out.extend_from_slice(b"PONG"),
            Reply::Bye => out.extend_from_slice(b"BYE"),
            Reply::Authenticated(user) => {
                out.extend_from_slice(b"OK ");
                out.extend_from_slice(user.as_str().as_bytes());
            }
            Reply::Err(e) => {
                out.extend_from_slice(b"ERR ");
                out.extend_from_slice(e.kind.as_str().as_bytes());
                if !e.detail.is_empty() {
                    out.push(b' ');
                    write_clean_detail(out, e.detail.as_bytes());
                }
            }
        }
        out.push(b'\n');
    }
}

/// The verbs: name, fields before the payload (or all fields), optional trailing timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Put,
    PutNowait,
    Get,
    GetNowait,
    Done,
    Join,
    Stats,
    Queues,
    Config,
    Ping,
    Quit,
    Auth,
}

impl Verb {
    const ALL: [Verb; 12] = [
        Verb::Put,
        Verb::PutNowait,
        Verb::Get,
        Verb::GetNowait,
        Verb::Done,
        Verb::Join,
        Verb::Stats,
        Verb::Queues,
        Verb::Config,
        Verb::Ping,
        Verb::Quit,
        Verb::Auth,
    ];

    fn name(self) -> &'static str {
        match self {
            Verb::Put => "PUT",
            Verb::PutNowait => "PUT_NOWAIT",
            Verb::Get => "GET",
            Verb::GetNowait => "GET_NOWAIT",
            Verb::Done => "DONE",
            Verb::Join => "JOIN",
            Verb::Stats => "STATS",
            Verb::Queues => "QUEUES",
            Verb::Config => "CONFIG",
            Verb::Ping => "PING",
            Verb::Quit => "QUIT",
            Verb::Auth => "AUTH",
        }
    }

    /// The usage line quoted when the field count is wrong.
    fn usage(self) -> &'static str {
        match self {
            Verb::Put => "PUT <queue> <timeout_ms> <payload>",
            Verb::PutNowait => "PUT_NOWAIT <queue> <payload>",
            Verb::Get => "GET <queue> [timeout_ms]",
            Verb::GetNowait => "GET_NOWAIT <queue>",
            Verb::Done => "DONE <id>",
            Verb::Join => "JOIN <queue> [timeout_ms]",
            Verb::Stats => "STATS <queue>",
            Verb::Queues => "QUEUES",
            Verb::Config => "CONFIG <queue> maxsize <n>",
            Verb::Ping => "PING",
            Verb::Quit => "QUIT",
            Verb::Auth => "AUTH <user> <token>",
        }
    }

    /// Fields after the verb: (at least, at most); for PUT verbs, the fields before the
    /// payload (which is required).
    fn arity(self) -> (usize, usize) {
        match self {
            Verb::Put => (2, 2),
            Verb::PutNowait | Verb::GetNowait | Verb::Done | Verb::Stats => (1, 1),
            Verb::Get | Verb::Join => (1, 2),
            Verb::Config => (3, 3),
            Verb::Auth => (2, 2),
            Verb::Queues | Verb::Ping | Verb::Quit => (0, 0),
        }
    }

    fn has_payload(self) -> bool {
        matches!(self, Verb::Put | Verb::PutNowait)
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Splits off the first field of `rest` (leading blanks skipped): (field, what follows it).
fn next_field(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let start = rest.iter().position(|&b| !is_blank(b))?;
    let rest = &rest[start..];
    let end = rest.iter().position(|&b| is_blank(b)).unwrap_or(rest.len());
    Some((&rest[..end], &rest[end..]))
}

/// Parses one request line (without its `\n`; one trailing `\r` is stripped). Never panics.
pub fn parse_request(line: &[u8]) -> Result<Request<'_>, QueueError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let bad = |detail: String| Err(QueueError::new(QueueErrorKind::BadRequest, detail));
    let Some((word, mut rest)) = next_field(line) else {
        return bad("empty request".into());
    };
    let verb = Verb::ALL
        .into_iter()
        .find(|v| v.name().as_bytes().eq_ignore_ascii_case(word))
        .ok_or_else(|| {
            QueueError::new(
                QueueErrorKind::UnknownCommand,
                format!("unknown command '{}'", quote(word)),
            )
        })?;
    let (min, max) = verb.arity();
    let mut fields: [&[u8]; 3] = [&[]; 3];
    let mut count = 0;
    while count < max {
        let Some((field, after)) = next_field(rest) else {
            break;
        };
        fields[count] = field;
        count += 1;
        rest = after;
    }
    let payload = if verb.has_payload() {
        // The one blank that ended the last field, then everything.
        rest.get(1..).filter(|p| !p.is_empty())
    } else {
        None
    };
    let extra = !verb.has_payload() && next_field(rest).is_some();
    if count < min || extra || (verb.has_payload() && payload.is_none()) {
        return bad(format!("usage: {}", verb.usage()));
    }
    let payload = payload.unwrap_or_default();
    let timeout = |i: usize| {
        if i < count {
            parse_timeout(fields[i])
        } else {
            Ok(0)
        }
    };
    Ok(match verb {
        Verb::Put => Request::Put {
            queue: parse_queue(fields[0])?,
            timeout_ms: timeout(1)?,
            payload,
        },
        Verb::PutNowait => Request::PutNowait {
            queue: parse_queue(fields[0])?,
            payload,
        },
        Verb::Get => Request::Get {
            queue: parse_queue(fields[0])?,
            timeout_ms: timeout(1)?,
        },
        Verb::GetNowait => Request::GetNowait {
            queue: parse_queue(fields[0])?,
        },
        Verb::Done => Request::Done {
            id: parse_id(fields[0])?,
        },
        Verb::Join => Request::Join {
            queue: parse_queue(fields[0])?,
            timeout_ms: timeout(1)?,
        },
        Verb::Stats => Request::Stats {
            queue: parse_queue(fields[0])?,
        },
        Verb::Config => {
            let queue = parse_queue(fields[0])?;
            if !fields[1].eq_ignore_ascii_case(b"maxsize") {
                return bad(format!(
                    "unknown setting '{}': usage: {}",
                    quote(fields[1]),
                    verb.usage()
                ));
            }
            Request::Config {
                queue,
                maxsize: parse_number(fields[2], QueueErrorKind::BadMaxsize, "maxsize")?,
            }
        }
        Verb::Queues => Request::Queues,
        Verb::Ping => Request::Ping,
        Verb::Quit => Request::Quit,
        Verb::Auth => Request::Auth {
            user: parse_user(fields[0]).map_err(from_bank)?,
            token: parse_token(fields[1]).map_err(from_bank)?,
        },
    })
}

/// A field error of the bank's AUTH parsing (always `bad-request`), in the queue's words.
fn from_bank(error: ProtocolError) -> QueueError {
    QueueError::new(QueueErrorKind::BadRequest, error.detail)
}

fn parse_queue(field: &[u8]) -> Result<QueueName, QueueError> {
    QueueName::new(field).map_err(|why| {
        QueueError::new(
            QueueErrorKind::BadQueue,
            format!("invalid queue name '{}': {why}", quote(field)),
        )
    })
}

/// A decimal 0..=2^63-1 (the bank's amount rules, zero allowed).
fn parse_number(field: &[u8], kind: QueueErrorKind, what: &str) -> Result<u64, QueueError> {
    let all_zeros = !field.is_empty() && field.iter().all(|&b| b == b'0');
    if all_zeros {
        return Ok(0);
    }
    parse_amount(field).map_err(|_| {
        QueueError::new(
            kind,
            format!(
                "invalid {what} '{}': a whole number from 0 to 9223372036854775807",
                quote(field)
            ),
        )
    })
}

fn parse_timeout(field: &[u8]) -> Result<u64, QueueError> {
    let invalid = || {
        QueueError::new(
            QueueErrorKind::BadTimeout,
            format!(
                "invalid timeout '{}': a whole number of milliseconds from 0 to {MAX_TIMEOUT_MS}",
                quote(field)
            ),
        )
    };
    match parse_number(field, QueueErrorKind::BadTimeout, "timeout") {
        Ok(ms) if ms <= MAX_TIMEOUT_MS => Ok(ms),
        _ => Err(invalid()),
    }
}

fn parse_id(field: &[u8]) -> Result<u64, QueueError> {
    parse_number(field, QueueErrorKind::BadId, "job id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(s: &str) -> QueueName {
        QueueName::new(s.as_bytes()).expect("valid")
    }

    fn kind(line: &[u8]) -> QueueErrorKind {
        parse_request(line).expect_err("an error").kind
    }

    #[test]
    fn the_payload_is_the_rest_of_the_line() {
        assert_eq!(
            parse_request(b"PUT jobs 250  two spaces, 3 digits 42 \r"),
            Ok(Request::Put {
                queue: q("jobs"),
                timeout_ms: 250,
                payload: b" two spaces, 3 digits 42 ",
            })
        );
        assert_eq!(
            parse_request(b"put_nowait jobs\t7 0"),
            Ok(Request::PutNowait {
                queue: q("jobs"),
                payload: b"7 0",
            })
        );
    }

    #[test]
    fn every_verb_parses() {
        assert_eq!(
            parse_request(b"GET a"),
            Ok(Request::Get {
                queue: q("a"),
                timeout_ms: 0
            })
        );
        assert_eq!(
            parse_request(b"get a 0100"),
            Ok(Request::Get {
                queue: q("a"),
                timeout_ms: 100
            })
        );
        assert_eq!(
            parse_request(b"GET_NOWAIT a"),
            Ok(Request::GetNowait { queue: q("a") })
        );
        assert_eq!(parse_request(b"DONE 0"), Ok(Request::Done { id: 0 }));
        assert_eq!(
            parse_request(b"JOIN a 5"),
            Ok(Request::Join {
                queue: q("a"),
                timeout_ms: 5
            })
        );
        assert_eq!(
            parse_request(b"STATS a"),
            Ok(Request::Stats { queue: q("a") })
        );
        assert_eq!(parse_request(b" QUEUES "), Ok(Request::Queues));
        assert_eq!(
            parse_request(b"CONFIG a MAXSIZE 3"),
            Ok(Request::Config {
                queue: q("a"),
                maxsize: 3
            })
        );
        assert_eq!(parse_request(b"PING"), Ok(Request::Ping));
        assert_eq!(parse_request(b"QUIT"), Ok(Request::Quit));
        let Ok(Request::Auth { user, token }) = parse_request(b"auth alice s3cret!") else {
            panic!("AUTH parses");
        };
        assert_eq!(
            (user.as_str(), token.as_bytes()),
            ("alice", &b"s3cret!"[..])
        );
    }

    #[test]
    fn auth_fields_are_checked_and_the_token_is_never_quoted() {
        for (line, says) in [
            (&b"AUTH alice"[..], "usage: AUTH <user> <token>"),
            (b"AUTH alice t extra", "usage: AUTH <user> <token>"),
            (b"AUTH al/ice t", "invalid user name 'al/ice'"),
            (
                b"AUTH alice s\xffcret",
                "invalid token: the token contains a byte",
            ),
        ] {
            let error = parse_request(line).expect_err("refused");
            assert_eq!(error.kind, QueueErrorKind::BadRequest);
            assert!(error.detail.contains(says), "{}", error.detail);
            assert!(!error.detail.contains("cret"), "{}", error.detail);
        }
        let long = [b"AUTH a ".to_vec(), vec![b'x'; 300]].concat();
        assert!(parse_request(&long)
            .expect_err("too long")
            .detail
            .starts_with("invalid token: the token is 300 bytes long"));
    }

    #[test]
    fn every_malformed_line_gets_its_kind() {
        use QueueErrorKind::*;
        let cases: [(&[u8], QueueErrorKind); 16] = [
            (b"", BadRequest),
            (b"  \t", BadRequest),
            (b"FETCH a", UnknownCommand),
            (b"PUT a 10", BadRequest),
            (b"PUT a 10 ", BadRequest),
            (b"PUT_NOWAIT a", BadRequest),
            (b"GET", BadRequest),
            (b"GET a 1 2", BadRequest),
            (b"QUEUES now", BadRequest),
            (b"CONFIG a size 3", BadRequest),
            (b"PUT b@d 1 x", BadQueue),
            (b"GET a -1", BadTimeout),
            (b"GET a 4294967296", BadTimeout),
            (b"PUT a 1e3 x", BadTimeout),
            (b"DONE x", BadId),
            (b"CONFIG a maxsize 99999999999999999999", BadMaxsize),
        ];
        for (line, expected) in cases {
            assert_eq!(kind(line), expected, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn a_bad_timeout_names_the_range_it_must_be_in() {
        for line in [
            &b"GET a -1"[..],
            b"GET a 4294967296",
            b"PUT a 99999999999999999999 x",
        ] {
            let detail = parse_request(line).expect_err("a bad timeout").detail;
            assert!(
                detail.ends_with("a whole number of milliseconds from 0 to 4294967295"),
                "{detail}"
            );
        }
    }

    #[test]
    fn replies_are_one_line_each() {
        let mut out = Vec::new();
        Reply::Put(42).write_to(&mut out);
        Reply::Job {
            id: 7,
            payload: b"a b 1",
        }
        .write_to(&mut out);
        Reply::Ok.write_to(&mut out);
        Reply::Authenticated(UserName::new(b"alice").expect("a name")).write_to(&mut out);
        Reply::Queues(&[q("a"), q("b")]).write_to(&mut out);
        Reply::Stats(Figures {
            depth: 1,
            maxsize: 3,
            ..Figures::default()
        })
        .write_to(&mut out);
        Reply::Err(QueueError::new(
            QueueErrorKind::Timeout,
            "no job within 5 ms\n",
        ))
        .write_to(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "OK 42\nJOB 7 a b 1\nOK\nOK alice\nOK 2 a b\n\
             OK depth=1 in_flight=0 put=0 done=0 getters=0 putters=0 joiners=0 maxsize=3\n\
             ERR timeout no job within 5 ms\\x0a\n"
        );
    }

    #[test]
    fn every_kind_has_its_own_word() {
        let words: std::collections::HashSet<_> =
            QueueErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(words.len(), QueueErrorKind::ALL.len());
    }

    proptest! {
        #[test]
        fn any_line_parses_without_panicking_and_errors_are_one_clean_line(
            line in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            let line: Vec<u8> = line.into_iter().filter(|&b| b != b'\n').collect();
            if let Err(e) = parse_request(&line) {
                let mut out = Vec::new();
                Reply::Err(e).write_to(&mut out);
                prop_assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
                prop_assert!(out.iter().all(|&b| b == b'\n' || (0x20..=0x7e).contains(&b)));
            }
        }

        #[test]
        fn a_put_round_trips_its_payload(
            payload in proptest::collection::vec(any::<u8>().prop_filter("no newline", |&b| b != b'\n'), 1..100)
        ) {
            let mut line = b"PUT q 0 ".to_vec();
            line.extend_from_slice(&payload);
            let expected = payload.strip_suffix(b"\r").unwrap_or(&payload);
            match parse_request(&line) {
                Ok(Request::Put { payload: got, .. }) => prop_assert_eq!(got, expected),
                Err(e) => prop_assert!(expected.is_empty(), "{}", e),
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
