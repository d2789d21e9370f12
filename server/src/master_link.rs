//! What the processes of a pool tell each other over their [`Channel`]s, and its versioned
//! wire form.
//!
//! A worker tells its master that it serves ([`Message::Ready`]), that it drains and why
//! ([`Message::Leaving`]: this is the only channel for that fact, the scoreboard's state is
//! for display), and, retiring, offers each connection for a successor
//! ([`Message::Handover`]). The master passes the connection on ([`Message::Adopt`]) to a
//! worker that stays, or during a binary upgrade to the new master, which passes it to one of
//! its workers; the answer ([`Message::Adopted`] or [`Message::Refused`]) travels back, and
//! the retiring worker learns [`Message::HandedOver`] (it closes its copy) or
//! [`Message::Bounced`] (it serves the connection to a request boundary and closes it). A new
//! master opens its link to the old one with [`Message::Hello`] and its format version: an
//! old master that does not speak that version bounces every connection.
//!
//! Every message starts with `FPL` and [`FORMAT_VERSION`]; a connection's descriptor (and,
//! for a large state, a memfd holding it) rides along as `SCM_RIGHTS`.

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::channel::{Channel, Received};
use crate::handover::{self, BadState, ConnState, INLINE_STATE_BYTES};

/// The version of this wire form and of [`ConnState`]'s; bump on any change.
/// (3: a connection's state carries the client a PROXY header named; 4: a queue
/// connection's state carries its authenticated user, its jobs in a field of their own.)
pub const FORMAT_VERSION: u8 = 4;
const MAGIC: [u8; 3] = *b"FPL";

/// Why a worker drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// It served its `max_requests`: its slot needs a successor.
    Recycled,
    /// SIGTERM/SIGINT reached it (sent to it directly, or to the whole process group).
    Terminated,
    /// The master retired it (SIGUSR1): a successor is already on its way.
    Retired,
}

/// One message between two processes of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Worker to master: registered its listeners, serving.
    Ready,
    /// Worker to master: stopped accepting, draining.
    Leaving(LeaveReason),
    /// Retiring worker to master: connection `id` (the worker's number for it) with its
    /// state; its descriptor rides along.
    Handover { id: u64, state: ConnState },
    /// Master to a worker (or old master to new master): take connection `id` (the
    /// sender's number for it).
    Adopt { id: u64, state: ConnState },
    /// Answer to `Adopt`: the connection is served here now.
    Adopted { id: u64 },
    /// Answer to `Adopt`: not taken (at the connection cap, or no descriptor arrived).
    Refused { id: u64 },
    /// Master to retiring worker: connection `id` is served elsewhere; close your copy.
    HandedOver { id: u64 },
    /// Master to retiring worker: connection `id` found no successor; serve it yourself.
    Bounced { id: u64 },
    /// New master to old master, first thing: the format version it speaks.
    Hello { version: u8 },
}

/// Why a received message cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("not a forkpool message")]
    BadMagic,
    #[error("message format version {0}, this build speaks {FORMAT_VERSION}")]
    WrongVersion(u8),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    State(#[from] BadState),
    #[error("the message's descriptors did not arrive")]
    Truncated,
}

const READY: u8 = 1;
const LEAVING: u8 = 2;
const HANDOVER: u8 = 3;
const ADOPT: u8 = 4;
const ADOPTED: u8 = 5;
const REFUSED: u8 = 6;
const HANDED_OVER: u8 = 7;
const BOUNCED: u8 = 8;
const HELLO: u8 = 9;
/// Set on a `Handover`/`Adopt` whose state is in a memfd (the second descriptor).
const STATE_IN_MEMFD: u8 = 0x80;

impl LeaveReason {
    const ALL: [LeaveReason; 3] = [
        LeaveReason::Recycled,
        LeaveReason::Terminated,
        LeaveReason::Retired,
    ];

    fn code(self) -> u8 {
        match self {
            LeaveReason::Recycled => 1,
            LeaveReason::Terminated => 2,
            LeaveReason::Retired => 3,
        }
    }
}

/// A received message with the connection it carries, if any.
#[derive(Debug)]
pub struct Incoming {
    pub message: Message,
    pub conn: Option<OwnedFd>,
}

/// Sends `message` on `channel`; `conn` is the connection's descriptor for `Handover` and
/// `Adopt`, lent: the sender keeps its own reference (the peer gets a duplicate).
pub fn send(
    channel: &mut Channel,
    message: &Message,
    conn: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let (bytes, memfd) = encode(message, FORMAT_VERSION)?;
    let mut fds = Vec::new();
    if let Some(conn) = conn {
        fds.push(conn.try_clone_to_owned()?);
    }
    fds.extend(memfd);
    channel.send(bytes, fds)
}

/// The wire form of `message` as `version` (a test may speak another), and the memfd holding
/// a large state.
pub fn encode(message: &Message, version: u8) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&MAGIC);
    out.push(version);
    let mut memfd = None;
    match message {
        Message::Ready => out.push(READY),
        Message::Leaving(reason) => out.extend_from_slice(&[LEAVING, reason.code()]),
        Message::Handover { id, state } | Message::Adopt { id, state } => {
            let kind = if matches!(message, Message::Handover { .. }) {
                HANDOVER
            } else {
                ADOPT
            };
            let state = state.encode();
            if state.len() > INLINE_STATE_BYTES {
                out.push(kind | STATE_IN_MEMFD);
                out.extend_from_slice(&id.to_le_bytes());
                memfd = Some(handover::write_memfd(&state)?);
            } else {
                out.push(kind);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&state);
            }
        }
        Message::Adopted { id } => push_id(&mut out, ADOPTED, *id),
        Message::Refused { id } => push_id(&mut out, REFUSED, *id),
        Message::HandedOver { id } => push_id(&mut out, HANDED_OVER, *id),
        Message::Bounced { id } => push_id(&mut out, BOUNCED, *id),
        Message::Hello { version } => out.extend_from_slice(&[HELLO, *version]),
    }
    Ok((out, memfd))
}

fn push_id(out: &mut Vec<u8>, kind: u8, id: u64) {
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
}

/// Decodes a received message. A `Hello` of any version decodes (its purpose is to say the
/// version); every other message must be of [`FORMAT_VERSION`].
pub fn decode(received: Received) -> Result<Incoming, LinkError> {
    let Received {
        bytes,
        fds,
        truncated,
    } = received;
    let mut fds = fds.into_iter();
    let (conn, memfd) = (fds.next(), fds.next());
    let head = bytes.get(..5).ok_or(LinkError::Malformed("cut short"))?;
    if head[..3] != MAGIC {
        return Err(LinkError::BadMagic);
    }
    let (version, kind, body) = (head[3], head[4], &bytes[5..]);
    if kind == HELLO {
        let [peer] = <[u8; 1]>::try_from(body).map_err(|_| LinkError::Malformed("hello"))?;
        return Ok(Incoming {
            message: Message::Hello { version: peer },
            conn: None,
        });
    }
    if version != FORMAT_VERSION {
        return Err(LinkError::WrongVersion(version));
    }
    if truncated {
        return Err(LinkError::Truncated);
    }
    let id = || -> Result<u64, LinkError> {
        let bytes = body.get(..8).ok_or(LinkError::Malformed("no id"))?;
        let array = <[u8; 8]>::try_from(bytes).map_err(|_| LinkError::Malformed("no id"))?;
        Ok(u64::from_le_bytes(array))
    };
    let exact = |len: usize| {
        (body.len() == len)
            .then_some(())
            .ok_or(LinkError::Malformed("wrong length"))
    };
    let message = match kind & !STATE_IN_MEMFD {
        READY => exact(0).map(|()| Message::Ready)?,
        LEAVING => {
            exact(1)?;
            let reason = LeaveReason::ALL
                .into_iter()
                .find(|reason| reason.code() == body[0])
                .ok_or(LinkError::Malformed("leave reason"))?;
            Message::Leaving(reason)
        }
        HANDOVER | ADOPT => {
            let id = id()?;
            let state = if kind & STATE_IN_MEMFD != 0 {
                exact(8)?;
                let memfd = memfd.ok_or(LinkError::Truncated)?;
                let bytes = handover::read_memfd(memfd)
                    .map_err(|_| LinkError::Malformed("unreadable state memfd"))?;
                ConnState::decode(&bytes)?
            } else {
                ConnState::decode(&body[8..])?
            };
            if conn.is_none() {
                return Err(LinkError::Truncated);
            }
            if kind & !STATE_IN_MEMFD == HANDOVER {
                Message::Handover { id, state }
            } else {
                Message::Adopt { id, state }
            }
        }
        ADOPTED => exact(8).and_then(|()| Ok(Message::Adopted { id: id()? }))?,
        REFUSED => exact(8).and_then(|()| Ok(Message::Refused { id: id()? }))?,
        HANDED_OVER => exact(8).and_then(|()| Ok(Message::HandedOver { id: id()? }))?,
        BOUNCED => exact(8).and_then(|()| Ok(Message::Bounced { id: id()? }))?,
        _ => return Err(LinkError::Malformed("unknown message")),
    };
    let conn = match message {
        Message::Handover { .. } | Message::Adopt { .. } => conn,
        _ => None,
    };
    Ok(Incoming { message, conn })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel;
    use crate::handover::SessionState;

    fn state(partial: usize) -> ConnState {
        ConnState {
            session: SessionState::Bank {
                partial: vec![b'p'; partial],
                user: None,
            },
            pending: b"OK 1\n".to_vec(),
            unread: b"PING\n".to_vec(),
            peer_closed: false,
            client: None,
        }
    }

    fn round_trip(message: Message, with_conn: bool) -> Incoming {
        let (mut a, mut b) = channel::pair().expect("a channel pair");
        let (conn, _keep) = std::os::unix::net::UnixStream::pair().expect("a stream pair");
        let raw = with_conn.then(|| std::os::fd::AsFd::as_fd(&conn));
        send(&mut a, &message, raw).expect("send");
        decode(b.recv().expect("receive").expect("a message")).expect("decode")
    }

    #[test]
    fn every_message_round_trips() {
        for message in [
            Message::Ready,
            Message::Leaving(LeaveReason::Recycled),
            Message::Leaving(LeaveReason::Terminated),
            Message::Leaving(LeaveReason::Retired),
            Message::Adopted { id: 7 },
            Message::Refused { id: 8 },
            Message::HandedOver { id: u64::MAX },
            Message::Bounced { id: 0 },
            Message::Hello { version: 42 },
        ] {
            let got = round_trip(message.clone(), false);
            assert_eq!(got.message, message);
            assert!(got.conn.is_none());
        }
        for partial in [0, 10, 100_000] {
            for message in [
                Message::Handover {
                    id: 3,
                    state: state(partial),
                },
                Message::Adopt {
                    id: 4,
                    state: state(partial),
                },
            ] {
                let got = round_trip(message.clone(), true);
                assert_eq!(got.message, message, "state of {partial} bytes");
                assert!(got.conn.is_some());
            }
        }
    }

    /// Bytes as they came off the link, with no descriptor.
    fn bare(bytes: Vec<u8>) -> Received {
        Received {
            bytes,
            fds: Vec::new(),
            truncated: false,
        }
    }

    #[test]
    fn another_version_is_refused_but_its_hello_is_heard() {
        let (bytes, _) = encode(&Message::Adopted { id: 1 }, FORMAT_VERSION + 1).expect("encode");
        assert_eq!(
            decode(bare(bytes)).map(|i| i.message),
            Err(LinkError::WrongVersion(FORMAT_VERSION + 1))
        );
        let (bytes, _) = encode(&Message::Hello { version: 9 }, 9).expect("encode");
        assert_eq!(
            decode(bare(bytes)).map(|i| i.message),
            Ok(Message::Hello { version: 9 })
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let mut framed = b"FPL\x01".to_vec();
            framed.extend_from_slice(&bytes);
            for candidate in [bytes, framed] {
                let _ = decode(bare(candidate));
            }
        }
    }
}
