//! The master's side of the worker links: news from the workers (ready, leaving) and the
//! brokering of live connections from a retiring worker to one that stays.
//!
//! A retiring worker offers each connection ([`Message::Handover`]); the broker keeps a copy
//! of its descriptor and state (a *parcel*) and passes it ([`Message::Adopt`]) to the least
//! loaded serving worker with room, or, during a binary upgrade once this master is leaving,
//! to the new master, which brokers it to one of its own workers. The target answers
//! `Adopted` (the origin is told `HandedOver` and closes its copy) or `Refused` (another
//! target is tried). A parcel that finds no target in time, or any parcel while this master
//! drains without a successor, is `Bounced`: its origin, which kept its copy and has not
//! read from it since, serves it to a request boundary and closes it. A target that dies
//! before answering has its parcels tried elsewhere.
//!
//! The other master of an upgrade is a *peer*: the new master opens the link with `Hello`
//! and its format version; an old master that does not speak that version bounces instead
//! of passing connections on (they are then closed at a request boundary, as before
//! hand-over existed).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::unistd::Pid;

use crate::channel::Channel;
use crate::handover::ConnState;
use crate::master_link::{self, Incoming, LeaveReason, Message, FORMAT_VERSION};

/// How long a connection waits in the master for a worker to take it (a successor still
/// starting) before it goes back to its origin.
pub const PARCEL_WAIT: Duration = Duration::from_secs(5);
/// Targets a connection is offered to before it goes back to its origin.
const MAX_ATTEMPTS: usize = 4;

/// What a worker told the master about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerNews {
    Ready,
    Leaving(LeaveReason),
}

/// A serving worker that may take connections, and how many it has.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub token: Token,
    pub connections: usize,
}

/// Where a parcel may go, as the master's phase allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Running: to a serving worker; wait for one if none has room yet.
    Local,
    /// Leaving after an upgrade: to the new master if it speaks our format, else back.
    ToSuccessor,
    /// Draining for shutdown: nowhere; every connection goes back to its origin.
    Nowhere,
}

/// Which side of an upgrade the peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerRole {
    /// The new master: it may take our connections.
    Successor,
    /// The old master: it passes us its connections.
    Predecessor,
}

struct Peer {
    channel: Channel,
    token: Token,
    role: PeerRole,
    /// The format version its `Hello` announced (a successor's only).
    version: Option<u8>,
    writable: bool,
}

struct WorkerLink {
    pid: Pid,
    channel: Channel,
    writable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A retiring worker of ours and its number for the connection.
    Worker { token: Token, id: u64 },
    /// The old master and its number for the connection.
    Peer { id: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Worker(Token),
    Peer,
}

/// A connection in the master's hands.
struct Parcel {
    origin: Origin,
    state: ConnState,
    conn: OwnedFd,
    since: Instant,
    /// Targets that refused it (or died holding it).
    tried: Vec<Target>,
}

impl Parcel {
    /// A connection that just arrived from `origin`, not offered to anyone yet.
    fn arrived(origin: Origin, state: ConnState, conn: OwnedFd) -> Parcel {
        Parcel {
            origin,
            state,
            conn,
            since: Instant::now(),
            tried: Vec::new(),
        }
    }
}

/// The links to the workers and to a peer master, and the connections between them.
pub struct Broker {
    links: HashMap<Token, WorkerLink>,
    peer: Option<Peer>,
    /// Parcels offered to a target, by the master's number for them.
    in_flight: HashMap<u64, (Parcel, Target)>,
    /// Parcels waiting for a target.
    waiting: VecDeque<Parcel>,
    next_id: u64,
}

impl Broker {
    pub fn new() -> Broker {
        Broker {
            links: HashMap::new(),
            peer: None,
            in_flight: HashMap::new(),
            waiting: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Links a new worker, whose channel end is registered under `token`.
    pub fn add_worker(
        &mut self,
        token: Token,
        pid: Pid,
        channel: Channel,
        registry: &Registry,
    ) -> std::io::Result<()> {
        registry.register(&mut SourceFd(&channel.raw_fd()), token, Interest::READABLE)?;
        self.links.insert(
            token,
            WorkerLink {
                pid,
                channel,
                writable: false,
            },
        );
        Ok(())
    }

    /// The link to the new master of an upgrade (this master is the old one).
    pub fn add_successor(&mut self, token: Token, channel: Channel, registry: &Registry) {
        self.set_peer(token, channel, PeerRole::Successor, registry);
    }

    /// The link to the old master of an upgrade (this master is the new one); announces
    /// `version` (ours, unless a test pretends otherwise).
    pub fn add_predecessor(
        &mut self,
        token: Token,
        channel: Channel,
        version: u8,
        registry: &Registry,
    ) {
        self.set_peer(token, channel, PeerRole::Predecessor, registry);
        self.send_to(Target::Peer, &Message::Hello { version }, None, registry);
    }

    fn set_peer(&mut self, token: Token, channel: Channel, role: PeerRole, registry: &Registry) {
        if let Err(e) =
            registry.register(&mut SourceFd(&channel.raw_fd()), token, Interest::READABLE)
        {
            log::error!("cannot watch the link to the other master: {e}");
            return;
        }
        self.peer = Some(Peer {
            channel,
            token,
            role,
            version: None,
            writable: false,
        });
    }

    /// The upgrade's new master is gone (failed, or never spoke): its parcels go elsewhere.
    pub fn drop_successor(&mut self, registry: &Registry) {
        if self
            .peer
            .as_ref()
            .is_some_and(|p| p.role == PeerRole::Successor)
        {
            self.drop_peer(registry);
        }
    }

    fn drop_peer(&mut self, registry: &Registry) {
        if let Some(peer) = self.peer.take() {
            let _ = registry.deregister(&mut SourceFd(&peer.channel.raw_fd()));
        }
        self.retry_parcels_of(Target::Peer);
    }

    /// Handles readiness of a worker's link (or the peer's); returns the workers' news.
    pub fn on_event(
        &mut self,
        token: Token,
        writable: bool,
        registry: &Registry,
    ) -> Vec<(Pid, WorkerNews)> {
        let is_peer = self.peer.as_ref().is_some_and(|p| p.token == token);
        if writable {
            self.flush(token, is_peer, registry);
        }
        let mut news = Vec::new();
        loop {
            let received = match self.channel_mut(token, is_peer).map(Channel::recv) {
                Some(Ok(Some(received))) => received,
                Some(Ok(None)) | None => break,
                Some(Err(e)) => {
                    if is_peer {
                        log::info!("the other master closed its link: {e}");
                        self.drop_peer(registry);
                    }
                    // A worker's closed link is handled when the worker is reaped.
                    break;
                }
            };
            match master_link::decode(received) {
                Ok(incoming) if is_peer => self.on_peer_message(incoming, registry),
                Ok(incoming) => {
                    if let Some(item) = self.on_worker_message(token, incoming, registry) {
                        news.push(item);
                    }
                }
                Err(e) => log::warn!("ignoring a message from {}: {e}", self.describe(token)),
            }
        }
        news
    }

    fn on_worker_message(
        &mut self,
        token: Token,
        incoming: Incoming,
        registry: &Registry,
    ) -> Option<(Pid, WorkerNews)> {
        let pid = self.links.get(&token)?.pid;
        match (incoming.message, incoming.conn) {
            (Message::Ready, _) => return Some((pid, WorkerNews::Ready)),
            (Message::Leaving(reason), _) => return Some((pid, WorkerNews::Leaving(reason))),
            (Message::Handover { id, state }, Some(conn)) => {
                let origin = Origin::Worker { token, id };
                self.waiting.push_back(Parcel::arrived(origin, state, conn));
            }
            (Message::Adopted { id }, _) => self.answered(id, true, registry),
            (Message::Refused { id }, _) => self.answered(id, false, registry),
            (other, _) => log::warn!("unexpected message from worker {pid}: {other:?}"),
        }
        None
    }

    fn on_peer_message(&mut self, incoming: Incoming, registry: &Registry) {
        match (incoming.message, incoming.conn) {
            (Message::Hello { version }, _) => {
                if version != FORMAT_VERSION {
                    log::warn!(
                        "the new master speaks hand-over format {version}, this one \
                         {FORMAT_VERSION}: retiring workers close their connections at a \
                         request boundary instead of handing them over"
                    );
                }
                if let Some(peer) = &mut self.peer {
                    peer.version = Some(version);
                }
            }
            (Message::Adopt { id, state }, Some(conn)) => {
                let origin = Origin::Peer { id };
                self.waiting.push_back(Parcel::arrived(origin, state, conn));
            }
            (Message::Adopted { id }, _) => self.answered(id, true, registry),
            (Message::Refused { id }, _) => self.answered(id, false, registry),
            (other, _) => log::warn!("unexpected message from the other master: {other:?}"),
        }
    }

    /// A target answered parcel `id`.
    fn answered(&mut self, id: u64, adopted: bool, registry: &Registry) {
        let Some((mut parcel, target)) = self.in_flight.remove(&id) else {
            return;
        };
        if adopted {
            self.tell_origin(parcel.origin, true, registry);
        } else {
            parcel.tried.push(target);
            self.waiting.push_front(parcel);
        }
    }

    /// Passes waiting parcels to targets as `routing` allows; bounces those that cannot go
    /// anywhere, or waited too long.
    pub fn dispatch(&mut self, routing: Routing, candidates: &[Candidate], registry: &Registry) {
        let mut load: HashMap<Token, usize> = candidates
            .iter()
            .map(|c| (c.token, c.connections))
            .collect();
        for (_, target) in self.in_flight.values() {
            if let Target::Worker(token) = target {
                *load.entry(*token).or_default() += 1;
            }
        }
        let now = Instant::now();
        for parcel in std::mem::take(&mut self.waiting) {
            match self.choose(routing, &parcel, &load) {
                Some(target) => {
                    if let Target::Worker(token) = target {
                        *load.entry(token).or_default() += 1;
                    }
                    self.offer(parcel, target, registry);
                }
                None if routing == Routing::Local
                    && now.saturating_duration_since(parcel.since) < PARCEL_WAIT
                    && parcel.tried.len() < MAX_ATTEMPTS =>
                {
                    self.waiting.push_back(parcel);
                }
                None => self.tell_origin(parcel.origin, false, registry),
            }
        }
    }

    fn choose(
        &self,
        routing: Routing,
        parcel: &Parcel,
        load: &HashMap<Token, usize>,
    ) -> Option<Target> {
        if parcel.tried.len() >= MAX_ATTEMPTS {
            return None;
        }
        match routing {
            Routing::Local => load
                .iter()
                .filter(|(token, _)| !parcel.tried.contains(&Target::Worker(**token)))
                .min_by_key(|(token, connections)| (**connections, token.0))
                .map(|(token, _)| Target::Worker(*token)),
            Routing::ToSuccessor => self
                .peer
                .as_ref()
                .filter(|p| p.role == PeerRole::Successor && p.version == Some(FORMAT_VERSION))
                .filter(|_| !parcel.tried.contains(&Target::Peer))
                .map(|_| Target::Peer),
            Routing::Nowhere => None,
        }
    }

    /// Sends `parcel` to `target` as an `Adopt`, keeping it until the answer.
    fn offer(&mut self, parcel: Parcel, target: Target, registry: &Registry) {
        let id = self.next_id;
        self.next_id += 1;
        let message = Message::Adopt {
            id,
            state: parcel.state.clone(),
        };
        if self.send_to(target, &message, Some(parcel.conn.as_fd()), registry) {
            self.in_flight.insert(id, (parcel, target));
        } else {
            let mut parcel = parcel;
            parcel.tried.push(target);
            self.waiting.push_back(parcel);
        }
    }

    /// Tells a parcel's origin how it ended (the parcel's descriptor is closed here).
    fn tell_origin(&mut self, origin: Origin, adopted: bool, registry: &Registry) {
        let (target, message) = match (origin, adopted) {
            (Origin::Worker { token, id }, true) => {
                (Target::Worker(token), Message::HandedOver { id })
            }
            (Origin::Worker { token, id }, false) => {
                (Target::Worker(token), Message::Bounced { id })
            }
            (Origin::Peer { id }, true) => (Target::Peer, Message::Adopted { id }),
            (Origin::Peer { id }, false) => (Target::Peer, Message::Refused { id }),
        };
        // An origin that is gone needs no answer: its copy of the connection went with it.
        self.send_to(target, &message, None, registry);
    }

    /// Sends on a link; false if the link is missing or broken.
    fn send_to(
        &mut self,
        target: Target,
        message: &Message,
        conn: Option<std::os::fd::BorrowedFd<'_>>,
        registry: &Registry,
    ) -> bool {
        let (token, is_peer) = match target {
            Target::Worker(token) => (token, false),
            Target::Peer => match &self.peer {
                Some(peer) => (peer.token, true),
                None => return false,
            },
        };
        let Some(channel) = self.channel_mut(token, is_peer) else {
            return false;
        };
        let sent = master_link::send(channel, message, conn);
        if let Err(e) = &sent {
            log::warn!("cannot send to {}: {e}", self.describe(token));
        }
        self.update_interest(token, is_peer, registry);
        sent.is_ok()
    }

    fn flush(&mut self, token: Token, is_peer: bool, registry: &Registry) {
        if let Some(channel) = self.channel_mut(token, is_peer) {
            if let Err(e) = channel.flush() {
                log::warn!("cannot send on a worker link: {e}");
            }
        }
        self.update_interest(token, is_peer, registry);
    }

    /// Watches a link for writable only while it has messages waiting.
    fn update_interest(&mut self, token: Token, is_peer: bool, registry: &Registry) {
        let (channel, writable) = match (is_peer, &mut self.peer) {
            (true, Some(peer)) => (&peer.channel, &mut peer.writable),
            (true, None) => return,
            (false, _) => match self.links.get_mut(&token) {
                Some(link) => (&link.channel, &mut link.writable),
                None => return,
            },
        };
        let wants = channel.wants_write();
        if wants != *writable {
            let interest = if wants {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if registry
                .reregister(&mut SourceFd(&channel.raw_fd()), token, interest)
                .is_ok()
            {
                *writable = wants;
            }
        }
    }

    fn channel_mut(&mut self, token: Token, is_peer: bool) -> Option<&mut Channel> {
        if is_peer {
            self.peer.as_mut().map(|p| &mut p.channel)
        } else {
            self.links.get_mut(&token).map(|l| &mut l.channel)
        }
    }

    fn describe(&self, token: Token) -> String {
        match self.links.get(&token) {
            Some(link) => format!("worker {}", link.pid),
            None => "the other master".to_string(),
        }
    }

    /// A worker was reaped: what it still had to say is read, its link closed, and the
    /// connections offered to it go elsewhere.
    pub fn worker_gone(&mut self, token: Token, registry: &Registry) -> Vec<(Pid, WorkerNews)> {
        let news = self.on_event(token, false, registry);
        if let Some(link) = self.links.remove(&token) {
            let _ = registry.deregister(&mut SourceFd(&link.channel.raw_fd()));
        }
        self.retry_parcels_of(Target::Worker(token));
        news
    }

    /// Parcels offered to `target` (gone) wait for another target.
    fn retry_parcels_of(&mut self, target: Target) {
        let ids: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (_, t))| *t == target)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((mut parcel, _)) = self.in_flight.remove(&id) {
                parcel.tried.push(target);
                self.waiting.push_front(parcel);
            }
        }
    }

    /// When the oldest waiting parcel must go back if no target turns up.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|p| p.since + PARCEL_WAIT).min()
    }

    /// Are connections waiting for a target?
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("links", &self.links.len())
            .field("in_flight", &self.in_flight.len())
            .field("waiting", &self.waiting.len())
            .finish()
    }
}
