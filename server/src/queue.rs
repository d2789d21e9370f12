//! The queue service's sessions: one request line at a time against the shared store
//! (`forkpool_queue`), a blocking GET/PUT/JOIN parking the connection (never the worker)
//! until the store serves its wait, it times out, or the worker drains.
//!
//! A session holds the ids of the jobs it fetched and has not done: when the connection
//! closes (or the session is dropped for any reason) its wait is cancelled and those jobs go
//! back to the head of their queues. Every store operation that serves other waits returns
//! the processes to wake, which are poked at once (`wakeup.rs`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use forkpool_common::codec::Flow;
use forkpool_common::queue::{Figures, QueueError, QueueErrorKind, Reply, Request};
use forkpool_queue::{Attempt, Cancelled, Mode, OpError, Outcome, Party, Store, Ticket, WakeSet};

use crate::bank::NO_USERS_DETAIL;
use crate::durability::Syncer;
use crate::users::NameScope;
use crate::wakeup::Wakeup;

/// What every queue session of a worker shares: the store and this process's wake-ups.
#[derive(Debug)]
pub struct QueueHub {
    pub store: &'static Store,
    pub wakeup: Wakeup,
    /// Under `--fsync always`, the worker's flusher of the store's log: every queue reply
    /// waits behind the connection's gate until the log covers it (`durability.rs`).
    pub syncer: Option<&'static Syncer>,
}

impl QueueHub {
    fn poke(&self, wakes: &WakeSet) {
        if !wakes.is_empty() {
            self.wakeup.poke(wakes);
        }
    }
}

/// Numbers the connections of this process (the store's owner is (pid, number)).
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A parked request.
#[derive(Debug)]
struct Wait {
    ticket: Ticket,
    /// The request line (with its `\n`), given back to the connection if the wait is
    /// withdrawn for a hand-over: the successor parks it again.
    request: Vec<u8>,
    /// `None`: waits without limit.
    deadline: Option<Instant>,
}

/// A queue connection's state apart from its line framer.
#[derive(Debug)]
pub struct QueueConn {
    hub: &'static QueueHub,
    party: Party,
    /// Jobs fetched on this connection and not done yet.
    held: Vec<u64>,
    wait: Option<Wait>,
    /// A reusable buffer for payloads read from the store.
    payload: Vec<u8>,
}

impl QueueConn {
    pub fn new(hub: &'static QueueHub) -> QueueConn {
        QueueConn {
            hub,
            party: Party {
                conn: NEXT_CONN.fetch_add(1, Relaxed),
            },
            held: Vec::new(),
            wait: None,
            payload: Vec::new(),
        }
    }

    /// The flusher whose durable LSN this connection's replies wait for (`--fsync always`).
    pub fn syncer(&self) -> Option<&'static Syncer> {
        self.hub.syncer
    }

    /// Continues a connection handed over by another process: the jobs its session held
    /// move to this one (those the store no longer gives `owner`, e.g. released because
    /// the predecessor died meanwhile, are dropped: they are delivered again).
    pub fn adopt(hub: &'static QueueHub, owner: (i32, u64), held: Vec<u64>) -> QueueConn {
        let mut conn = QueueConn::new(hub);
        for id in held {
            match hub.store.take_over(id, owner, conn.party) {
                Ok(()) => conn.held.push(id),
                Err(e) => log::debug!("queue: job {id} of an adopted connection: {e}"),
            }
        }
        conn
    }

    /// (pid, connection number) and held jobs, for a hand-over.
    pub fn export(&self) -> ((i32, u64), Vec<u64>) {
        (
            (std::process::id() as i32, self.party.conn),
            self.held.clone(),
        )
    }

    /// When the parked request gives up, if it waits with a limit.
    pub fn deadline(&self) -> Option<Instant> {
        self.wait.as_ref().and_then(|w| w.deadline)
    }

    /// Answers `request`, parsed from `line` and allowed by the access control; `queues`:
    /// those its user may see (`None`: all). [`Flow::Wait`] parks it.
    pub fn answer(
        &mut self,
        line: &[u8],
        request: Request<'_>,
        queues: Option<&NameScope>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Flow {
        match self.execute(request, queues, now, out) {
            Ok(Flow::Wait) => {
                if let Some(wait) = &mut self.wait {
                    wait.request = [line, b"\n"].concat();
                }
                Flow::Wait
            }
            Ok(flow) => flow,
            Err(error) => {
                Reply::Err(store_error(error)).write_to(out);
                Flow::Continue
            }
        }
    }

    fn execute(
        &mut self,
        request: Request<'_>,
        visible: Option<&NameScope>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Flow, OpError> {
        let store = &self.hub.store;
        let (party, deadline) = (self.party, |ms: u64| {
            (ms > 0).then(|| now + Duration::from_millis(ms))
        });
        match request {
            Request::Put {
                queue,
                timeout_ms,
                payload,
            } => {
                let (attempt, wakes) = store.put(&queue, payload, party, Mode::Wait)?;
                self.hub.poke(&wakes);
                Ok(self.now_or_park(attempt.map(Outcome::Put), deadline(timeout_ms), out))
            }
            Request::PutNowait { queue, payload } => {
                let (attempt, wakes) = store.put(&queue, payload, party, Mode::NoWait)?;
                self.hub.poke(&wakes);
                Ok(self.now_or_park(attempt.map(Outcome::Put), None, out))
            }
            Request::Get { queue, timeout_ms } => {
                self.payload.clear();
                let (attempt, wakes) = store.get(&queue, party, Mode::Wait, &mut self.payload)?;
                self.hub.poke(&wakes);
                Ok(self.now_or_park(attempt.map(Outcome::Job), deadline(timeout_ms), out))
            }
            Request::GetNowait { queue } => {
                self.payload.clear();
                let (attempt, wakes) = store.get(&queue, party, Mode::NoWait, &mut self.payload)?;
                self.hub.poke(&wakes);
                Ok(self.now_or_park(attempt.map(Outcome::Job), None, out))
            }
            Request::Done { id } => {
                let wakes = store.done(id, party)?;
                self.hub.poke(&wakes);
                self.held.retain(|&held| held != id);
                Reply::Ok.write_to(out);
                Ok(Flow::Continue)
            }
            Request::Join { queue, timeout_ms } => {
                let attempt = store.join(&queue, party)?.map(|()| Outcome::Joined);
                Ok(self.now_or_park(attempt, deadline(timeout_ms), out))
            }
            Request::Stats { queue } => {
                let s = store.stats(&queue)?;
                Reply::Stats(Figures {
                    depth: s.depth,
                    in_flight: s.in_flight,
                    put: s.put,
                    done: s.done,
                    getters: s.waiting_getters,
                    putters: s.waiting_putters,
                    joiners: s.waiting_joiners,
                    maxsize: s.maxsize,
                })
                .write_to(out);
                Ok(Flow::Continue)
            }
            Request::Queues => {
                let names: Vec<_> = store
                    .queues()?
                    .into_iter()
                    .map(|(name, _)| name)
                    .filter(|name| visible.is_none_or(|scope| scope.allows(name)))
                    .collect();
                Reply::Queues(&names).write_to(out);
                Ok(Flow::Continue)
            }
            Request::Config { queue, maxsize } => {
                let wakes = store.configure(&queue, maxsize)?;
                self.hub.poke(&wakes);
                Reply::Ok.write_to(out);
                Ok(Flow::Continue)
            }
            Request::Ping => {
                Reply::Pong.write_to(out);
                Ok(Flow::Continue)
            }
            Request::Quit => {
                Reply::Bye.write_to(out);
                Ok(Flow::Stop)
            }
            // With users, the access control answers AUTH; without, there is nobody to be.
            Request::Auth { .. } => {
                Reply::Err(QueueError::new(QueueErrorKind::Denied, NO_USERS_DETAIL)).write_to(out);
                Ok(Flow::Continue)
            }
        }
    }

    /// Writes the reply of a request done at once, or parks it.
    fn now_or_park(
        &mut self,
        attempt: Attempt<Outcome>,
        deadline: Option<Instant>,
        out: &mut Vec<u8>,
    ) -> Flow {
        match attempt {
            Attempt::Now(outcome) => {
                self.reply(outcome, out);
                Flow::Continue
            }
            Attempt::Parked(ticket) => {
                self.wait = Some(Wait {
                    ticket,
                    request: Vec::new(),
                    deadline,
                });
                Flow::Wait
            }
        }
    }

    fn reply(&mut self, outcome: Outcome, out: &mut Vec<u8>) {
        match outcome {
            Outcome::Job(id) => {
                self.held.push(id);
                Reply::Job {
                    id,
                    payload: &self.payload,
                }
                .write_to(out);
            }
            Outcome::Put(id) => Reply::Put(id).write_to(out),
            Outcome::Joined => Reply::Ok.write_to(out),
        }
    }

    /// Whether the parked request's wait was served (a lock-free look).
    pub fn served(&self) -> bool {
        self.wait
            .as_ref()
            .is_some_and(|wait| self.hub.store.served(wait.ticket))
    }

    /// A wake-up: replies with what the wait was served, or goes on waiting.
    pub fn on_wakeup(&mut self, out: &mut Vec<u8>) -> Flow {
        let Some(wait) = &self.wait else {
            return Flow::Continue;
        };
        self.payload.clear();
        match self.hub.store.claim(wait.ticket, &mut self.payload) {
            Ok(Some(outcome)) => {
                self.wait = None;
                self.reply(outcome, out);
                Flow::Continue
            }
            Ok(None) => Flow::Wait,
            Err(error) => {
                self.wait = None;
                Reply::Err(store_error(error)).write_to(out);
                Flow::Continue
            }
        }
    }

    /// Ends the wait with `kind` (timeout, shutting-down) unless it was served meanwhile, in
    /// which case what it was served is the reply. Does nothing before `deadline` when one
    /// is given (a stale timer).
    pub fn give_up(
        &mut self,
        kind: QueueErrorKind,
        now: Option<Instant>,
        out: &mut Vec<u8>,
    ) -> Flow {
        let Some(wait) = &self.wait else {
            return Flow::Continue;
        };
        if now.is_some_and(|now| wait.deadline.is_none_or(|deadline| now < deadline)) {
            return Flow::Wait;
        }
        let ticket = wait.ticket;
        self.wait = None;
        self.payload.clear();
        match self.hub.store.cancel(ticket, &mut self.payload) {
            Ok((Cancelled::Served(outcome), wakes)) => {
                self.hub.poke(&wakes);
                self.reply(outcome, out);
            }
            Ok((Cancelled::Withdrawn, wakes)) => {
                self.hub.poke(&wakes);
                let detail = match kind {
                    QueueErrorKind::Timeout => "the wait ran out; nothing changed",
                    _ => "the server is shutting down; nothing changed",
                };
                Reply::Err(QueueError::new(kind, detail)).write_to(out);
            }
            Err(error) => Reply::Err(store_error(error)).write_to(out),
        }
        Flow::Continue
    }
}

impl QueueConn {
    /// Gives the jobs this connection holds back to the head of their queues (it closes,
    /// or acts as another user from now on).
    pub fn release_held(&mut self) {
        for id in std::mem::take(&mut self.held) {
            match self.hub.store.release(id, self.party) {
                Ok(wakes) => self.hub.poke(&wakes),
                Err(e) => log::debug!("queue: job {id} given back: {e}"),
            }
        }
    }
}

/// What withdrawing a wait for a hand-over came to.
#[derive(Debug)]
pub enum Withdrawn {
    /// The wait was served meanwhile: its reply is written, the connection goes on.
    Answered,
    /// The request, to put back in front of the unread input.
    Request(Vec<u8>),
}

impl QueueConn {
    /// Withdraws the parked request so that the connection can move to a successor, which
    /// will read it again and park it there.
    pub fn withdraw(&mut self, out: &mut Vec<u8>) -> Withdrawn {
        let Some(wait) = self.wait.take() else {
            return Withdrawn::Answered;
        };
        self.payload.clear();
        match self.hub.store.cancel(wait.ticket, &mut self.payload) {
            Ok((Cancelled::Withdrawn, wakes)) => {
                self.hub.poke(&wakes);
                Withdrawn::Request(wait.request)
            }
            Ok((Cancelled::Served(outcome), wakes)) => {
                self.hub.poke(&wakes);
                self.reply(outcome, out);
                Withdrawn::Answered
            }
            Err(error) => {
                Reply::Err(store_error(error)).write_to(out);
                Withdrawn::Answered
            }
        }
    }
}

impl Drop for QueueConn {
    /// The connection is gone: its wait is withdrawn and the jobs it held go back to the
    /// head of their queues.
    fn drop(&mut self) {
        let store = &self.hub.store;
        if let Some(wait) = self.wait.take() {
            self.payload.clear();
            match store.cancel(wait.ticket, &mut self.payload) {
                Ok((Cancelled::Served(Outcome::Job(id)), wakes)) => {
                    self.hub.poke(&wakes);
                    self.held.push(id);
                }
                Ok((_, wakes)) => self.hub.poke(&wakes),
                Err(e) => log::warn!("queue: cannot withdraw a closed connection's wait: {e}"),
            }
        }
        self.release_held();
    }
}

/// A store error as the protocol says it.
fn store_error(error: OpError) -> QueueError {
    QueueError::new(error.kind(), error.to_string())
}

/// One hub for the whole test process, on a fresh store in a temporary directory (a session
/// borrows it for `'static`, as in a worker; tests use queue names of their own).
#[cfg(test)]
pub fn test_hub() -> &'static QueueHub {
    static HUB: std::sync::OnceLock<&'static QueueHub> = std::sync::OnceLock::new();
    HUB.get_or_init(make_test_hub)
}

#[cfg(test)]
fn make_test_hub() -> &'static QueueHub {
    let dir = Box::leak(Box::new(
        tempfile::tempdir().expect("a temporary directory"),
    ));
    let options = forkpool_queue::StoreOptions {
        max_jobs: 64,
        max_queues: 8,
        max_waiters: 16,
        max_payload: 64,
        ..forkpool_queue::StoreOptions::default()
    };
    let store = Store::open(&dir.path().join("queue.bin"), &options).expect("a fresh store");
    Box::leak(Box::new(QueueHub {
        store: Box::leak(Box::new(store)),
        wakeup: Wakeup::sender().expect("a wake-up socket"),
        syncer: None,
    }))
}
