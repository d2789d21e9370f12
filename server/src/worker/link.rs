//! The worker's side of lossless replacement: a retiring worker offers each connection to
//! the master for a successor, and a serving worker adopts the connections the master passes
//! it. The link to the master also carries the worker's news (ready, leaving).
//!
//! The order of steps is what makes it lossless. The retiring worker stops reading a
//! connection and takes it out of its poll before offering it, and keeps its own copy of the
//! socket until the master answers: if no successor takes it, it is served here as if
//! nothing had happened. The successor registers the socket, confirms, then reads: bytes the
//! client sent meanwhile wait in the socket and are read exactly once, by exactly one worker.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::accept::adopted_socket;
use super::{State, Worker, FIRST_CONN_TOKEN, LINK_TOKEN};
use crate::conn::{Conn, Readiness};
use crate::handover::ConnState;
use crate::master_link::{self, Incoming, Message};
use crate::service::Session;
use crate::users::PeerKey;

impl Worker {
    /// Sends `message` to the master (with a connection's socket, lent), keeping the link's
    /// writable interest in step with its outbox. False if the link is broken.
    pub(super) fn tell_master(&mut self, message: &Message, conn: Option<BorrowedFd<'_>>) -> bool {
        let sent = master_link::send(&mut self.link, message, conn);
        if let Err(e) = &sent {
            log::error!("cannot tell the master {message:?}: {e}");
        }
        self.update_link_interest();
        sent.is_ok()
    }

    fn update_link_interest(&mut self) {
        let wants = self.link.wants_write();
        if wants == self.link_writable {
            return;
        }
        let interest = if wants {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let fd = self.link.raw_fd();
        match self
            .poll
            .registry()
            .reregister(&mut SourceFd(&fd), LINK_TOKEN, interest)
        {
            Ok(()) => self.link_writable = wants,
            Err(e) => log::error!("cannot watch the link to the master: {e}"),
        }
    }

    /// Readiness of the link: sends what waits, handles what the master says.
    pub(super) fn on_link(&mut self, writable: bool, now: Instant) {
        if writable {
            if let Err(e) = self.link.flush() {
                log::error!("cannot write to the master: {e}");
            }
            self.update_link_interest();
        }
        loop {
            let received = match self.link.recv() {
                Ok(Some(received)) => received,
                Ok(None) => return,
                // The master is gone: this process dies with it (PR_SET_PDEATHSIG).
                Err(_) => return,
            };
            match master_link::decode(received) {
                Ok(incoming) => self.on_master_message(incoming, now),
                Err(e) => log::warn!("ignoring a message from the master: {e}"),
            }
        }
    }

    fn on_master_message(&mut self, incoming: Incoming, now: Instant) {
        match (incoming.message, incoming.conn) {
            (Message::Adopt { id, state }, Some(conn)) => self.adopt(id, &state, conn, now),
            (Message::HandedOver { id }, _) => self.handed_over(id),
            (Message::Bounced { id }, _) => self.taken_back(id, now),
            (other, _) => log::warn!("unexpected message from the master: {other:?}"),
        }
    }

    /// Retiring (once, when the drain starts): offers every connection that a successor can
    /// continue. Each leaves this worker's poll first and is not read again unless it comes
    /// back. A connection already closing finishes here.
    pub(super) fn offer_connections(&mut self) {
        for (_, conn) in self.conns.iter_mut() {
            conn.stay_if_unmovable();
        }
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.may_be_offered())
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            self.offer_connection(key);
        }
    }

    /// Offers connection `key` to a successor (see [`Worker::offer_connections`]).
    fn offer_connection(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let state = match conn.offer(self.poll.registry()) {
            Ok(state) => state,
            Err(e) => {
                log::warn!("cannot offer a connection: {e}");
                return;
            }
        };
        let message = Message::Handover {
            id: key as u64,
            state,
        };
        let socket = conn.socket();
        let sent = master_link::send(&mut self.link, &message, Some(socket));
        self.update_link_interest();
        if let Err(e) = sent {
            log::warn!("cannot hand a connection over ({e}): serving it here");
            self.taken_back(key as u64, Instant::now());
        }
    }

    /// Retiring, connection `key`'s wait just ended (a database reply came; see
    /// [`Conn::end_wait`]): it was not offered with the others because its request was in
    /// flight, and it is now at a request boundary: offered, unless it cannot move (then it
    /// is driven as usual, to its close).
    pub(super) fn offer_after_wait(&mut self, key: usize, now: Instant) {
        match self.conns.get(key) {
            Some(conn) if conn.may_be_offered() => self.offer_connection(key),
            Some(_) => self.on_conn_event(key, Readiness::default(), now),
            None => {}
        }
    }

    /// The successor took connection `id`: this worker's copy of the socket closes, and the
    /// connection lives on there.
    fn handed_over(&mut self, id: u64) {
        let Ok(key) = usize::try_from(id) else {
            return;
        };
        if !self.conns.get(key).is_some_and(Conn::is_offered) {
            return;
        }
        if let Some(conn) = self.conns.try_remove(key) {
            let counters = conn.counters();
            counters.open_connections.fetch_sub(1, Relaxed);
            counters.handed_over.fetch_add(1, Relaxed);
            log::debug!("connection handed over");
        }
    }

    /// No successor took connection `id`: it is served here again, to a request boundary.
    fn taken_back(&mut self, id: u64, now: Instant) {
        let Ok(key) = usize::try_from(id) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(key).filter(|conn| conn.is_offered()) else {
            return;
        };
        log::debug!("no successor took a connection: serving it to a request boundary");
        if let Err(e) = conn.take_back(self.poll.registry()) {
            log::warn!("cannot serve a connection taken back: {e}");
            self.close(key, now);
            return;
        }
        self.on_conn_event(key, Readiness::default(), now);
    }

    /// Takes over connection `id` from a retiring worker: refused (the sender keeps serving
    /// it) while this worker leaves too, is at its connection cap, or gets a state no
    /// session can continue.
    fn adopt(&mut self, id: u64, state: &ConnState, socket: OwnedFd, now: Instant) {
        let kind = state.service();
        let counters = self.cell.counters(kind);
        let at_cap = self.conns.len() >= self.settings.config.max_connections;
        let serving = matches!(self.state, State::Serving) && !at_cap;
        let adopted = adopted_socket(socket).ok().and_then(|(stream, peer)| {
            // Behind a proxy the socket's peer is the proxy: the client is the header's.
            let peer = state.client.map_or(peer, PeerKey::Ip);
            let session = Session::resume(state.session.clone(), self.sessions, peer, counters)?;
            Some((stream, session))
        });
        let (true, Some((stream, session))) = (serving, adopted) else {
            self.tell_master(&Message::Refused { id }, None);
            return;
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let mut conn = Conn::adopt(
            stream,
            Token(key + FIRST_CONN_TOKEN),
            session,
            counters,
            state,
            now,
        );
        if let Err(e) = conn.register(self.poll.registry()) {
            log::warn!("cannot register an adopted connection: {e}");
            self.tell_master(&Message::Refused { id }, None);
            return;
        }
        entry.insert(conn);
        counters.open_connections.fetch_add(1, Relaxed);
        self.tell_master(&Message::Adopted { id }, None);
        log::debug!("adopted a {} connection", kind.name());
        self.on_conn_event(key, Readiness::default(), now);
        self.pause_or_resume_accepting(now);
    }

    /// Draining and nothing left to serve or to say: the worker may exit.
    pub(super) fn finished(&self) -> bool {
        matches!(self.state, State::Draining { .. })
            && self.conns.is_empty()
            && !self.link.wants_write()
    }
}
