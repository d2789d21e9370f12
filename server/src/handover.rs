//! What a connection is, apart from its socket, when it moves to another worker: the
//! protocol state its session holds (echo: the start of a UTF-8 sequence cut by a read, and
//! whether a line is under way; bank: the unfinished request line and the user; queue: that,
//! and the jobs it holds), the replies its client
//! has not taken yet, and, behind a proxy, the client its PROXY header named. The socket itself travels as a descriptor; bytes the client sent that
//! nobody has read stay in it for the successor.
//!
//! [`ConnState::encode`] / [`ConnState::decode`] are the wire form, part of the versioned
//! format of `master_link.rs`. A state too large for one channel message (a long unfinished
//! line, a megabyte of unsent replies) travels in a memfd instead.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use forkpool_common::bank::UserName;

use crate::service::ServiceKind;

/// States up to this size travel inside the channel message; larger ones in a memfd.
pub const INLINE_STATE_BYTES: usize = 32 * 1024;
/// The largest state a successor accepts (an unfinished line at the largest `max_line`,
/// plus unsent replies at the largest `output_limit` and one read's worth).
pub const MAX_STATE_BYTES: u64 = 1 << 31;

/// The protocol state of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    Echo {
        /// The start of a UTF-8 sequence cut by the end of the last read (at most 3 bytes).
        held: Vec<u8>,
        /// A line is under way (its start answered, its end not yet read).
        mid_line: bool,
    },
    Bank {
        /// The unfinished request line.
        partial: Vec<u8>,
        /// The user the connection authenticated as, with its token's digest.
        user: Option<(UserName, [u8; 32])>,
    },
    Queue {
        /// The unfinished request line.
        partial: Vec<u8>,
        /// Who holds the connection's jobs in the store now: (pid, connection number).
        owner: (i32, u64),
        /// The jobs the connection fetched and has not done.
        held: Vec<u64>,
        /// The user the connection authenticated as, with its token's digest.
        user: Option<(UserName, [u8; 32])>,
    },
}

/// Everything a successor needs to continue a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnState {
    pub session: SessionState,
    /// Replies written by the predecessor that the socket has not taken yet.
    pub pending: Vec<u8>,
    /// Input the predecessor read but its session did not look at (it arrived behind a
    /// request that waited): the successor feeds it before reading the socket.
    pub unread: Vec<u8>,
    /// The client has sent EOF: the successor answers what is left and closes.
    pub peer_closed: bool,
    /// The client a PROXY header named (the socket's own peer is the proxy): the successor's
    /// peer for logs and the AUTH throttle.
    pub client: Option<IpAddr>,
}

/// Why a received state cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed connection state: {0}")]
pub struct BadState(pub &'static str);

const ECHO: u8 = 1;
const BANK: u8 = 2;
const QUEUE: u8 = 3;
const PEER_CLOSED: u8 = 1;
const MID_LINE: u8 = 2;

impl ConnState {
    pub fn service(&self) -> ServiceKind {
        match self.session {
            SessionState::Echo { .. } => ServiceKind::Echo,
            SessionState::Bank { .. } => ServiceKind::Bank,
            SessionState::Queue { .. } => ServiceKind::Queue,
        }
    }

    /// The wire form: service, flags, then the session's bytes, the pending replies, the
    /// authenticated user (its name then its token's 32-byte digest; empty if none), the
    /// unread input, the proxied client's address (4 or 16 bytes; empty if none) and the
    /// queue's jobs (owner pid, connection number, held job ids, u64 little-endian each;
    /// empty for the other services), each with a u64 little-endian length.
    pub fn encode(&self) -> Vec<u8> {
        let encode_user = |user: &Option<(UserName, [u8; 32])>| {
            user.map_or_else(Vec::new, |(name, digest)| {
                [name.as_str().as_bytes(), &digest].concat()
            })
        };
        let (service, mut flags, session, user, jobs) = match &self.session {
            SessionState::Echo { held, mid_line } => {
                let flags = if *mid_line { MID_LINE } else { 0 };
                (ECHO, flags, held, Vec::new(), Vec::new())
            }
            SessionState::Bank { partial, user } => {
                (BANK, 0, partial, encode_user(user), Vec::new())
            }
            SessionState::Queue {
                partial,
                owner,
                held,
                user,
            } => {
                let words = [i64::from(owner.0) as u64, owner.1]
                    .into_iter()
                    .chain(held.iter().copied());
                let jobs = words.flat_map(u64::to_le_bytes).collect();
                (QUEUE, 0, partial, encode_user(user), jobs)
            }
        };
        if self.peer_closed {
            flags |= PEER_CLOSED;
        }
        let client = match self.client {
            None => Vec::new(),
            Some(IpAddr::V4(ip)) => ip.octets().to_vec(),
            Some(IpAddr::V6(ip)) => ip.octets().to_vec(),
        };
        let fields = [session, &self.pending, &user, &self.unread, &client, &jobs];
        let mut out = Vec::with_capacity(2 + fields.iter().map(|f| 8 + f.len()).sum::<usize>());
        out.extend_from_slice(&[service, flags]);
        for field in fields {
            out.extend_from_slice(&(field.len() as u64).to_le_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ConnState, BadState> {
        let mut reader = Fields(bytes);
        let [service, flags] = reader.take::<2>()?;
        if flags & !(PEER_CLOSED | MID_LINE) != 0 {
            return Err(BadState("unknown flags"));
        }
        let session = reader.field()?;
        let pending = reader.field()?;
        let user = reader.field()?;
        let unread = reader.field()?;
        let client = decode_client(&reader.field()?)?;
        let jobs = reader.field()?;
        if !reader.0.is_empty() {
            return Err(BadState("trailing bytes"));
        }
        let session = match service {
            ECHO if session.len() <= 3 && user.is_empty() && jobs.is_empty() => {
                SessionState::Echo {
                    held: session,
                    mid_line: flags & MID_LINE != 0,
                }
            }
            BANK if flags & MID_LINE == 0 && jobs.is_empty() => SessionState::Bank {
                partial: session,
                user: decode_user(&user)?,
            },
            QUEUE if flags & MID_LINE == 0 => decode_queue(session, decode_user(&user)?, &jobs)?,
            _ => return Err(BadState("unknown service or inconsistent session")),
        };
        Ok(ConnState {
            session,
            pending,
            unread,
            peer_closed: flags & PEER_CLOSED != 0,
            client,
        })
    }
}

/// A proxied client's address from its wire form (empty: none).
fn decode_client(bytes: &[u8]) -> Result<Option<IpAddr>, BadState> {
    Ok(match bytes.len() {
        0 => None,
        4 => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(bytes).map_err(|_| BadState("client address"))?,
        ))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).map_err(|_| BadState("client address"))?,
        ))),
        _ => return Err(BadState("client address")),
    })
}

/// A queue session from its wire form (see `encode`).
fn decode_queue(
    partial: Vec<u8>,
    user: Option<(UserName, [u8; 32])>,
    owned: &[u8],
) -> Result<SessionState, BadState> {
    if owned.len() < 16 || !owned.len().is_multiple_of(8) {
        return Err(BadState("queue owner"));
    }
    let mut words = owned.chunks_exact(8).map(|w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        u64::from_le_bytes(b)
    });
    let pid = words.next().and_then(|w| i32::try_from(w as i64).ok());
    let conn = words.next();
    let (Some(pid), Some(conn)) = (pid, conn) else {
        return Err(BadState("queue owner"));
    };
    Ok(SessionState::Queue {
        partial,
        owner: (pid, conn),
        held: words.collect(),
        user,
    })
}

/// An authenticated user from its wire form (empty: none).
fn decode_user(bytes: &[u8]) -> Result<Option<(UserName, [u8; 32])>, BadState> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let split = bytes
        .len()
        .checked_sub(32)
        .ok_or(BadState("user cut short"))?;
    let name = UserName::new(&bytes[..split]).map_err(|_| BadState("user name"))?;
    let digest = <[u8; 32]>::try_from(&bytes[split..]).map_err(|_| BadState("user digest"))?;
    Ok(Some((name, digest)))
}

/// A cursor over the wire form.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], BadState> {
        let head = self.0.get(..N).ok_or(BadState("cut short"))?;
        let array = <[u8; N]>::try_from(head).map_err(|_| BadState("cut short"))?;
        self.0 = &self.0[N..];
        Ok(array)
    }

    fn field(&mut self) -> Result<Vec<u8>, BadState> {
        let len = usize::try_from(u64::from_le_bytes(self.take::<8>()?))
            .map_err(|_| BadState("length out of range"))?;
        let bytes = self.0.get(..len).ok_or(BadState("cut short"))?.to_vec();
        self.0 = &self.0[len..];
        Ok(bytes)
    }
}

/// Puts an encoded state too large for a message into a new memfd (read back with
/// [`read_memfd`]).
pub fn write_memfd(state: &[u8]) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"forkpool-handover", MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut file = File::from(fd);
    file.write_all(state)?;
    Ok(OwnedFd::from(file))
}

/// Reads a state written by [`write_memfd`], refusing one larger than [`MAX_STATE_BYTES`].
pub fn read_memfd(fd: OwnedFd) -> io::Result<Vec<u8>> {
    let mut file = File::from(fd);
    let len = file.metadata()?.len();
    if len > MAX_STATE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handed-over state too large",
        ));
    }
    file.rewind()?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<ConnState> {
        vec![
            ConnState {
                session: SessionState::Echo {
                    held: vec![0xe2, 0x82],
                    mid_line: true,
                },
                pending: b"HALF A REPLY".to_vec(),
                unread: Vec::new(),
                peer_closed: false,
                client: Some("2001:db8::7".parse().expect("an address")),
            },
            ConnState {
                session: SessionState::Queue {
                    partial: b"GET jo".to_vec(),
                    owner: (4242, 7),
                    held: vec![65_537, 3 << 40],
                    user: Some((UserName::new(b"worker.1").expect("a name"), [9; 32])),
                },
                pending: b"JOB 65537 x\n".to_vec(),
                unread: Vec::new(),
                peer_closed: false,
                client: Some("192.0.2.7".parse().expect("an address")),
            },
            ConnState {
                session: SessionState::Queue {
                    partial: Vec::new(),
                    owner: (1, 1),
                    held: Vec::new(),
                    user: None,
                },
                pending: Vec::new(),
                unread: b"GET jobs\n".to_vec(),
                peer_closed: false,
                client: None,
            },
            ConnState {
                session: SessionState::Bank {
                    partial: b"DEPOSIT al".to_vec(),
                    user: None,
                },
                pending: Vec::new(),
                unread: b"PING\nBALANCE bob\n".to_vec(),
                peer_closed: true,
                client: None,
            },
            ConnState {
                session: SessionState::Bank {
                    partial: Vec::new(),
                    user: Some((UserName::new(b"alice").expect("a name"), [7; 32])),
                },
                pending: b"OK alice\n".to_vec(),
                unread: Vec::new(),
                peer_closed: false,
                client: Some("192.0.2.7".parse().expect("an address")),
            },
        ]
    }

    #[test]
    fn a_state_round_trips() {
        for state in states() {
            assert_eq!(ConnState::decode(&state.encode()), Ok(state));
        }
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_refused_or_decodes_to_a_valid_state() {
        for state in states() {
            let bytes = state.encode();
            for cut in 0..bytes.len() {
                assert!(ConnState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            for i in 0..bytes.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut damaged = bytes.clone();
                    damaged[i] ^= flip;
                    if let Ok(decoded) = ConnState::decode(&damaged) {
                        assert_eq!(ConnState::decode(&decoded.encode()), Ok(decoded));
                    }
                }
            }
        }
    }

    #[test]
    fn a_large_state_goes_through_a_memfd() {
        let state = ConnState {
            session: SessionState::Bank {
                partial: vec![b'x'; 100_000],
                user: None,
            },
            pending: vec![b'Y'; 1 << 20],
            unread: vec![b'Z'; 60_000],
            peer_closed: false,
            client: None,
        };
        let fd = write_memfd(&state.encode()).expect("a memfd");
        let bytes = read_memfd(fd).expect("read it back");
        assert_eq!(ConnState::decode(&bytes), Ok(state));
    }
}
