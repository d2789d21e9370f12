//! The worker process: one `mio` event loop over its slot's listeners, its connections, its
//! link to the master and its signals. It accepts until the listener is drained (or its
//! connection cap is reached), lets each connection do its I/O, and closes idle connections.
//!
//! It leaves in one of two ways. On SIGTERM it drains: it takes what is already queued on its
//! listeners, closes them, answers what its clients have sent, closes every connection
//! gracefully and exits 0. Retiring (SIGUSR1 from the master, or its `max_requests` served)
//! while a successor serves, it hands its connections over instead (`handover` below): each
//! goes, with its state, to a worker that stays, and the client notices nothing; it exits as
//! soon as every connection is handed over. A connection that finds no successor is served
//! here to a request boundary and closed.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkpool_common::codec::Flow;
use forkpool_common::queue::QueueErrorKind;
use forkpool_ledger::FsyncPolicy;
use forkpool_queue::Store;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::unistd::Pid;
use rustls::ServerConfig;
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::bank::Backend;
use crate::channel::Channel;
use crate::config::Config;
use crate::conn::{Conn, Limits, Readiness, Scratch, Verdict, LINGER_TIMEOUT};
use crate::db::DbBank;
use crate::durability::Syncer;
use crate::ledger_store::LedgerStore;
use crate::listener::ListeningSocket;
use crate::master_link::{LeaveReason, Message};
use crate::process;
use crate::queue::{QueueHub, Withdrawn};
use crate::scoreboard::{self, WorkerCell, WorkerState};
use crate::service::{ServiceKind, Session, SessionContext};
use crate::tls::ServiceTls;
use crate::users::{AuthThrottle, Users};
use crate::wakeup::Wakeup;

mod accept;
mod link;

use accept::Listening;

/// Everything a worker takes from the master at fork.
pub struct WorkerSetup {
    pub slot: usize,
    pub master: Pid,
    pub listeners: Vec<(ServiceKind, ListeningSocket)>,
    /// This worker's end of its link to the master.
    pub link: Channel,
    /// The ledger file's mapping, or the database to connect to.
    pub ledger: LedgerStore,
    pub queue: Store,
    /// This worker's scoreboard cell.
    pub cell: &'static WorkerCell,
    pub settings: WorkerSettings,
}

/// What a worker runs with: the master's settings (handed over once, at fork) and what this
/// worker derives from them.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub config: Config,
    /// Each TLS service's configuration (certificate and key as loaded by the master).
    tls: [Option<Arc<ServerConfig>>; ServiceKind::ALL.len()],
    /// The bank's users, if a users file is configured.
    users: Option<Arc<Users>>,
    /// Requests after which the worker retires (jittered for this worker); `None`: never.
    max_requests: Option<u64>,
    /// Longest time between two heartbeats (well under the master's worker timeout).
    heartbeat: Duration,
    /// How long a drain may take before the remaining connections are dropped: the graceful
    /// timeout less the lingering close that follows, so the master never kills a worker
    /// that is closing cleanly.
    drain_budget: Duration,
}

impl WorkerSettings {
    /// The settings of a worker about to be forked from a master running `config`, with
    /// the certificates and users the master has loaded.
    pub fn new(config: &Config, tls: &ServiceTls, users: Option<&Arc<Users>>) -> WorkerSettings {
        WorkerSettings {
            tls: ServiceKind::ALL.map(|kind| tls.get(kind).cloned()),
            users: users.cloned(),
            max_requests: recycle_after(
                config.max_requests,
                config.max_requests_jitter,
                jitter_seed(),
            ),
            heartbeat: heartbeat_interval(config.worker_timeout),
            drain_budget: config.graceful_timeout.saturating_sub(LINGER_TIMEOUT),
            config: config.clone(),
        }
    }
}

impl WorkerSettings {
    /// The TLS configuration of `kind`'s connections, if it speaks TLS.
    pub fn tls(&self, kind: ServiceKind) -> Option<&Arc<ServerConfig>> {
        self.tls[kind.index()].as_ref()
    }
}

/// The worker's ledger: the file's mapping inherited from the master, or a pool of database
/// connections of its own (opened now, after the fork, in the background).
fn open_ledger(store: LedgerStore, config: &Config, waker: &'static Waker) -> io::Result<Backend> {
    Ok(match store {
        LedgerStore::File(ledger) => Backend::File(Box::leak(Box::new(ledger))),
        LedgerStore::Postgres(mut settings) => {
            // A reload may have changed the pool's size and deadline since the master read
            // the URL.
            settings.connections = config.ledger_connections;
            settings.deadline = config.ledger_timeout;
            settings.label_connections(&format!("worker {}", std::process::id()));
            Backend::Db(Box::leak(Box::new(DbBank::start(settings, waker)?)))
        }
    })
}

/// How often a worker beats: at least once a second, and four times per worker timeout.
fn heartbeat_interval(worker_timeout: Option<Duration>) -> Duration {
    let second = Duration::from_secs(1);
    worker_timeout.map_or(second, |timeout| (timeout / 4).min(second))
}

/// The request count after which a worker retires: `max_requests` plus a pseudo-random
/// number in `0..=jitter` drawn from `seed`; `None` when `max_requests` is 0 (never).
fn recycle_after(max_requests: u64, jitter: u64, seed: u64) -> Option<u64> {
    if max_requests == 0 {
        return None;
    }
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    let extra = match jitter.checked_add(1) {
        Some(range) => x % range,
        None => x,
    };
    Some(max_requests.saturating_add(extra))
}

/// A seed that differs between workers forked at nearly the same time (pid and clock).
fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    nanos ^ (u64::from(std::process::id()) << 32)
}

const SIGNAL_TOKEN: Token = Token(usize::MAX - 1);
/// The link to the master.
const LINK_TOKEN: Token = Token(usize::MAX - 2);
/// The worker's own threads have news: a syncer's log may be durable further (`--fsync
/// always`), or the database pool has replies (a PostgreSQL ledger). One token, one
/// `mio::Waker` (mio allows one per poll), shared by every such thread.
const THREADS_TOKEN: Token = Token(usize::MAX - 3);
/// This worker's queue wake-ups (`wakeup.rs`).
const WAKEUP_TOKEN: Token = Token(usize::MAX - 4);
/// Connection tokens start here; lower tokens are listeners (a slot may accept from the
/// sockets of every slot of a larger pool that shrank).
const FIRST_CONN_TOKEN: usize = 1 << 16;
/// Bytes read from a socket at once.
const READ_BUFFER_BYTES: usize = 64 * 1024;
const EVENTS_CAPACITY: usize = 1024;
/// How often idle connections and lingering closes are checked.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// While draining: how often connections are checked, and how long a connection must have
/// been silent before it is closed (input still on its way is answered first).
const DRAIN_TICK: Duration = Duration::from_millis(50);
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// TLS handshakes driven per turn of the loop; more wait for the next turn.
const HANDSHAKES_PER_TURN: usize = 8;

/// Runs a worker until it has drained or is told to quit; returns its exit status.
pub fn run(setup: WorkerSetup) -> i32 {
    crate::logging::set_role(format!("worker {}", setup.slot));
    match Worker::start(setup) {
        Ok(Some(mut worker)) => match worker.serve() {
            Ok(()) => 0,
            Err(e) => {
                log::error!("worker failed: {e}");
                1
            }
        },
        // The master died before we finished starting: nobody to serve for.
        Ok(None) => 0,
        Err(e) => {
            log::error!("worker failed to start: {e}");
            1
        }
    }
}

enum State {
    Serving,
    /// Listeners are closed; connections go as `why` says, and all of them by `deadline`.
    Draining {
        why: Drain,
        deadline: Instant,
    },
}

/// Why a worker drains.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// SIGTERM: input still on its way is answered; a connection closes after a quiet spell.
    Shutdown,
    /// Retiring (max_requests, or SIGUSR1 from the master: reload, TTOU, upgrade) while a
    /// successor already serves: every connection is handed over.
    Retire,
}

/// Which connections a sweep closes.
#[derive(Clone, Copy)]
enum Sweep {
    /// Serving: those silent for the idle timeout.
    Idle(Duration),
    /// Shutting down: those silent for [`DRAIN_QUIET`].
    Shutdown,
    /// Retiring: those taken back from a failed hand-over, once answered and at a request
    /// boundary with nothing unread.
    Retire,
    /// The drain's deadline passed: all.
    All,
}

struct Worker {
    poll: Poll,
    signals: Signals,
    listeners: Vec<Listening>,
    conns: Slab<Conn>,
    scratch: Scratch,
    settings: &'static WorkerSettings,
    sessions: SessionContext,
    /// To the master: readiness, leaving, connections handed over and adopted.
    link: Channel,
    /// The link is registered for writable (messages wait in its outbox).
    link_writable: bool,
    state: State,
    cell: &'static WorkerCell,
    /// Accepting failed for lack of descriptors (logged once until an accept succeeds).
    short_of_descriptors: bool,
    /// Connections with input left unread because their turn was over.
    another_turn: Vec<usize>,
    /// Connections whose replies wait for the ledger's log to be durable.
    gated: BTreeSet<usize>,
    /// TLS handshakes this turn may still drive (see [`HANDSHAKES_PER_TURN`]).
    handshakes_left: usize,
    /// Accepting paused after EMFILE/ENFILE until then.
    accept_paused_until: Option<Instant>,
    next_sweep: Instant,
    /// The queue store and this worker's wake-ups (shared with the sessions).
    queue: &'static QueueHub,
    /// When parked queue requests give up: (deadline, connection key). An entry whose
    /// connection no longer waits with that deadline is stale and ignored.
    queue_deadlines: std::collections::BTreeSet<(Instant, usize)>,
}

impl Worker {
    /// Finishes the child's start-up (signals, parent-death link) and reports ready.
    /// Returns `None` if the master is already gone.
    fn start(setup: WorkerSetup) -> io::Result<Option<Worker>> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGUSR1])?;
        scoreboard::set_my_cell(setup.cell);
        // A worker blocked behind a stopped lock holder keeps beating: only the holder hangs.
        forkpool_ledger::set_wait_hook(Some(scoreboard::beat_from_hook));
        process::ignore_master_only_signals()?;
        if process::die_with_parent(setup.master).is_err() {
            return Ok(None);
        }
        process::unblock_signals()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)?;
        let mut listeners = Vec::new();
        for (index, (kind, socket)) in setup.listeners.into_iter().enumerate() {
            let mut listening = Listening::new(kind, socket);
            listening.watch(poll.registry(), Token(index))?;
            listeners.push(listening);
        }
        let settings: &'static WorkerSettings = Box::leak(Box::new(setup.settings));
        // The database pool and the flusher threads of `--fsync always` (one per log) exist
        // only in the worker, started after the fork; they share the loop's one waker.
        let waker: &'static Waker =
            Box::leak(Box::new(Waker::new(poll.registry(), THREADS_TOKEN)?));
        // The worker keeps its ledger (mapping or database pool) and settings for its whole
        // life; sessions borrow them.
        let ledger = open_ledger(setup.ledger, &settings.config, waker)?;
        let syncer = match ledger {
            Backend::File(file) if file.fsync_policy() == FsyncPolicy::Always => {
                Some(Syncer::start(file, waker)?)
            }
            _ => None,
        };
        let store: &'static Store = Box::leak(Box::new(setup.queue));
        let queue_syncer = match store.is_logged() {
            true => Some(Syncer::start(store, waker)?),
            false => None,
        };
        let queue: &'static QueueHub = Box::leak(Box::new(QueueHub {
            store,
            wakeup: Wakeup::bind()?,
            syncer: queue_syncer,
        }));
        poll.registry().register(
            &mut SourceFd(&queue.wakeup.raw_fd()),
            WAKEUP_TOKEN,
            Interest::READABLE,
        )?;
        let mut link = setup.link;
        poll.registry().register(
            &mut SourceFd(&link.raw_fd()),
            LINK_TOKEN,
            Interest::READABLE,
        )?;
        crate::master_link::send(&mut link, &Message::Ready, None)?;
        setup.cell.set_state(WorkerState::Idle);
        setup.cell.beat();
        log::debug!("serving");
        let now = Instant::now();
        Ok(Some(Worker {
            poll,
            signals,
            listeners,
            conns: Slab::new(),
            scratch: Scratch::new(READ_BUFFER_BYTES),
            sessions: SessionContext {
                config: &settings.config,
                ledger,
                syncer,
                users: settings.users.as_deref(),
                throttle: Box::leak(Box::new(RefCell::new(AuthThrottle::default()))),
                queue,
            },
            queue,
            queue_deadlines: std::collections::BTreeSet::new(),
            settings,
            state: State::Serving,
            cell: setup.cell,
            link,
            link_writable: false,
            accept_paused_until: None,
            another_turn: Vec::new(),
            gated: BTreeSet::new(),
            handshakes_left: HANDSHAKES_PER_TURN,
            short_of_descriptors: false,
            next_sweep: now + SWEEP_INTERVAL,
        }))
    }

    /// The database pool's replies are ready: each goes to the connection waiting for it.
    fn on_db_replies(&mut self, now: Instant) {
        let Backend::Db(db) = self.sessions.ledger else {
            return;
        };
        for (key, reply) in db.completions() {
            self.resume(key, |session, out| session.ledger_reply(&reply, out), now);
        }
        self.publish_db_stats();
    }

    /// Copies the database pool's figures to the scoreboard (after replies, and at each
    /// sweep: connections open and close without any request).
    fn publish_db_stats(&self) {
        if let Backend::Db(db) = self.sessions.ledger {
            self.cell.db.publish(&db.stats());
        }
    }

    fn serve(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let timeout = self.next_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            self.handshakes_left = HANDSHAKES_PER_TURN;
            for event in events.iter() {
                match event.token() {
                    SIGNAL_TOKEN => {
                        if self.on_signals(now).is_break() {
                            return Ok(());
                        }
                    }
                    LINK_TOKEN => self.on_link(event.is_writable(), now),
                    THREADS_TOKEN => {
                        self.on_db_replies(now);
                        self.release_gated(now);
                    }
                    WAKEUP_TOKEN => self.on_queue_wakeup(now),
                    Token(index) if index < FIRST_CONN_TOKEN => self.accept_batch(index, now),
                    Token(token) => {
                        let readiness = Readiness {
                            readable: event.is_readable(),
                            read_closed: event.is_read_closed() || event.is_error(),
                            writable: event.is_writable(),
                        };
                        self.on_conn_event(token - FIRST_CONN_TOKEN, readiness, now);
                    }
                }
            }
            self.take_another_turn(now);
            self.on_timers(now);
            self.cell.beat();
            if matches!(self.state, State::Serving) {
                let busy = !self.conns.is_empty();
                self.cell.set_state(if busy {
                    WorkerState::Busy
                } else {
                    WorkerState::Idle
                });
            }
            self.retire_if_done(now);
            if self.finished() {
                log::info!("drained, exiting");
                return Ok(());
            }
        }
    }

    fn next_timeout(&self, now: Instant) -> Duration {
        if !self.another_turn.is_empty() {
            return Duration::ZERO;
        }
        let mut wake = self.next_sweep.min(now + self.settings.heartbeat);
        if let Some(until) = self.accept_paused_until {
            wake = wake.min(until);
        }
        if let Some(&(deadline, _)) = self.queue_deadlines.first() {
            wake = wake.min(deadline);
        }
        wake.saturating_duration_since(now)
    }

    fn on_signals(&mut self, now: Instant) -> ControlFlow<()> {
        let mut quit = ControlFlow::Continue(());
        for signal in self.signals.pending() {
            match signal {
                // Repeated TERM/INT (Ctrl-C reaches every process of the group, and the
                // master forwards it too) are one drain; only the master escalates.
                SIGTERM | SIGINT => self.start_drain(now, LeaveReason::Terminated),
                // The master replaces this worker (reload, TTOU, upgrade): a successor
                // already serves, so connections go as soon as they are answered.
                SIGUSR1 => self.start_drain(now, LeaveReason::Retired),
                SIGQUIT => {
                    log::info!("quitting at once");
                    quit = ControlFlow::Break(());
                }
                _ => {}
            }
        }
        quit
    }

    /// Retires once max_requests are served: the master starts a replacement on the same
    /// listeners at once, so no connection is refused meanwhile.
    fn retire_if_done(&mut self, now: Instant) {
        let Some(limit) = self.settings.max_requests else {
            return;
        };
        if !matches!(self.state, State::Serving) {
            return;
        }
        let served: u64 = ServiceKind::ALL
            .iter()
            .map(|kind| self.cell.counters(*kind).requests.load(Relaxed))
            .sum();
        if served >= limit {
            log::info!("served {served} requests: retiring");
            self.start_drain(now, LeaveReason::Recycled);
        }
    }

    /// Stops accepting and drains (once, whatever asks again), telling the master why.
    fn start_drain(&mut self, now: Instant, reason: LeaveReason) {
        if matches!(self.state, State::Draining { .. }) {
            return;
        }
        log::info!("draining {} connections", self.conns.len());
        self.tell_master(&Message::Leaving(reason), None);
        let why = match reason {
            LeaveReason::Terminated => Drain::Shutdown,
            LeaveReason::Recycled | LeaveReason::Retired => Drain::Retire,
        };
        // Connections already in the accept queues were promised service: take them all
        // (bounded by the connection cap: a shared listener may go on filling), to drain or
        // to hand over (a slot removed by TTOU closes its listener: its queue would be lost).
        for index in 0..self.listeners.len() {
            let room = self
                .settings
                .config
                .max_connections
                .saturating_sub(self.conns.len());
            self.accept_until_blocked(index, now, room);
        }
        for mut listening in self.listeners.drain(..) {
            let _ = listening.unwatch(self.poll.registry());
        }
        self.state = State::Draining {
            why,
            deadline: now + self.settings.drain_budget,
        };
        self.cell.set_state(WorkerState::Draining);
        self.next_sweep = now;
        self.end_queue_waits(why, now);
        if why == Drain::Retire {
            self.offer_connections();
        }
    }

    fn on_conn_event(&mut self, key: usize, readiness: Readiness, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // A TLS handshake is CPU work: a bounded number per turn, so that a burst of new
        // TLS clients cannot starve the established connections.
        if conn.handshaking() {
            if self.handshakes_left == 0 {
                conn.defer_to_next_turn();
                if !self.another_turn.contains(&key) {
                    self.another_turn.push(key);
                }
                return;
            }
            self.handshakes_left -= 1;
        }
        let limits = Limits {
            output_limit: self.settings.config.output_limit,
        };
        let verdict = conn.on_ready(
            readiness,
            &mut self.scratch,
            limits,
            self.poll.registry(),
            now,
        );
        self.settle(key, verdict, now);
    }

    /// After connection `key` was driven: closed if it says so; else driven again next turn
    /// if its read budget ran out, released when the log is durable if replies wait, and
    /// answered at its deadline if a queue request waits.
    fn settle(&mut self, key: usize, verdict: Verdict, now: Instant) {
        if let Backend::Db(db) = self.sessions.ledger {
            db.claim(key);
        }
        let shutting_down = matches!(
            self.state,
            State::Draining {
                why: Drain::Shutdown,
                ..
            }
        );
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if verdict == Verdict::Close {
            self.close(key, now);
            return;
        }
        let (another_turn, gated) = (conn.needs_another_turn(), conn.is_gated());
        // A queue request that parks where nothing will serve it is answered at once
        // (`end_queue_waits` answered those parked before the drain): in a shutdown's drain,
        // or on a connection that stays in a retiring worker (TLS, or no successor took it)
        // and is closed at a request boundary. A database wait always ends with its reply.
        let queue_wait = conn.is_waiting() && conn.session().queue().is_some();
        let stranded = queue_wait && (shutting_down || conn.is_staying());
        let deadline = if conn.is_waiting() {
            conn.session().queue().and_then(|queue| queue.deadline())
        } else {
            None
        };
        if let Some(deadline) = deadline {
            self.queue_deadlines.insert((deadline, key));
        }
        if another_turn && !self.another_turn.contains(&key) {
            self.another_turn.push(key);
        }
        if gated {
            self.gated.insert(key);
        }
        if stranded {
            self.answer_shutting_down(key, now);
        }
    }

    /// The syncer says the log may be durable further: sends what it now covers.
    fn release_gated(&mut self, now: Instant) {
        let limits = Limits {
            output_limit: self.settings.config.output_limit,
        };
        for key in std::mem::take(&mut self.gated) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            let verdict = conn.release_gate(&mut self.scratch, limits, self.poll.registry(), now);
            self.settle(key, verdict, now);
        }
    }

    /// A wake-up for the waiting connection `key` (from the service that made it wait):
    /// `deliver` hands its session what it waited for (see [`Conn::resume`]). A service
    /// tags its waits with its own unique ids and maps them to keys: keys are reused once a
    /// connection closes, so a wake-up for a closed connection must not reach this.
    fn resume(
        &mut self,
        key: usize,
        deliver: impl FnOnce(&mut Session, &mut Vec<u8>) -> Flow,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if matches!(
            self.state,
            State::Draining {
                why: Drain::Retire,
                ..
            }
        ) {
            let verdict = conn.end_wait(deliver, &mut self.scratch, now);
            self.settle(key, verdict, now);
            self.offer_after_wait(key, now);
            return;
        }
        let limits = Limits {
            output_limit: self.settings.config.output_limit,
        };
        let verdict = conn.resume(
            deliver,
            &mut self.scratch,
            limits,
            self.poll.registry(),
            now,
        );
        self.settle(key, verdict, now);
    }

    /// The keys of the connections waiting on the queue.
    fn queue_waiters(&mut self) -> Vec<usize> {
        self.conns
            .iter_mut()
            .filter(|(_, conn)| conn.is_waiting())
            .filter_map(|(key, conn)| conn.session().queue().map(|_| key))
            .collect()
    }

    /// Pokes arrived: every waiting queue connection whose wait was served gets its reply.
    fn on_queue_wakeup(&mut self, now: Instant) {
        self.queue.wakeup.drain();
        for key in self.queue_waiters() {
            let served = self
                .conns
                .get_mut(key)
                .and_then(|conn| conn.session().queue().map(|q| q.served()))
                .unwrap_or(false);
            if served {
                self.resume(
                    key,
                    |session, out| session.queue().map_or(Flow::Continue, |q| q.on_wakeup(out)),
                    now,
                );
            }
        }
    }

    /// Parked queue requests whose timeout has come are answered `ERR timeout` (or with
    /// what they were served at the last instant).
    fn queue_timeouts(&mut self, now: Instant) {
        while let Some(&(deadline, key)) = self.queue_deadlines.first() {
            if deadline > now {
                break;
            }
            self.queue_deadlines.pop_first();
            self.resume(
                key,
                |session, out| {
                    session.queue().map_or(Flow::Continue, |q| {
                        q.give_up(QueueErrorKind::Timeout, Some(now), out)
                    })
                },
                now,
            );
        }
    }

    /// A drain starts: a shutdown answers every parked queue request `ERR shutting-down`;
    /// a retirement withdraws them, so the connection can move to a successor, which parks
    /// the request again (a wait served meanwhile is answered here instead), except on a
    /// connection that cannot move (a TLS session): it is answered `ERR shutting-down` too.
    fn end_queue_waits(&mut self, why: Drain, now: Instant) {
        for key in self.queue_waiters() {
            let stays = why == Drain::Retire
                && self.conns.get_mut(key).is_some_and(|conn| {
                    conn.stay_if_unmovable();
                    conn.is_staying()
                });
            if why == Drain::Shutdown || stays {
                self.answer_shutting_down(key, now);
                continue;
            }
            let mut request = None;
            self.resume(
                key,
                |session, out| match session.queue().map(|q| q.withdraw(out)) {
                    Some(Withdrawn::Request(bytes)) => {
                        request = Some(bytes);
                        Flow::Wait
                    }
                    _ => Flow::Continue,
                },
                now,
            );
            if let (Some(bytes), Some(conn)) = (request, self.conns.get_mut(key)) {
                conn.cancel_wait(&bytes);
            }
        }
    }

    /// Ends connection `key`'s queue wait with `ERR shutting-down` (or what it was served at
    /// the last instant).
    fn answer_shutting_down(&mut self, key: usize, now: Instant) {
        self.resume(
            key,
            |session, out| {
                session.queue().map_or(Flow::Continue, |q| {
                    q.give_up(QueueErrorKind::ShuttingDown, None, out)
                })
            },
            now,
        );
    }

    /// Drives again the connections whose read budget ran out last turn.
    fn take_another_turn(&mut self, now: Instant) {
        for key in std::mem::take(&mut self.another_turn) {
            self.on_conn_event(key, Readiness::default(), now);
        }
    }

    fn close(&mut self, key: usize, now: Instant) {
        if let Some(conn) = self.conns.try_remove(key) {
            conn.counters().open_connections.fetch_sub(1, Relaxed);
            self.pause_or_resume_accepting(now);
        }
    }

    fn on_timers(&mut self, now: Instant) {
        self.queue_timeouts(now);
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.pause_or_resume_accepting(now);
        }
        if now < self.next_sweep {
            return;
        }
        let (sweep, tick) = match self.state {
            State::Serving => (
                Sweep::Idle(self.settings.config.idle_timeout.unwrap_or(Duration::MAX)),
                SWEEP_INTERVAL,
            ),
            State::Draining { deadline, .. } if now >= deadline => (Sweep::All, DRAIN_TICK),
            State::Draining {
                why: Drain::Shutdown,
                ..
            } => (Sweep::Shutdown, DRAIN_TICK),
            State::Draining {
                why: Drain::Retire, ..
            } => (Sweep::Retire, DRAIN_TICK),
        };
        self.next_sweep = now + tick;
        self.sweep(now, sweep);
        self.publish_db_stats();
    }

    /// Closes the connections `sweep` names and ends overdue lingering closes. A silent
    /// connection with replies its client will not take is dropped: nothing can be saved.
    fn sweep(&mut self, now: Instant, sweep: Sweep) {
        let overdue: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| match (conn.linger_deadline(), sweep) {
                (Some(until), _) => now >= until,
                (None, Sweep::All) => true,
                (None, _) if conn.header_overdue(now) => true,
                (None, _) if conn.is_offered() => false,
                // A request waiting for a wake-up is not idleness, and a drain lets the
                // service answer it (only the drain's deadline closes it).
                (None, _) if conn.is_waiting() => false,
                (None, Sweep::Idle(quiet)) => {
                    now.saturating_duration_since(conn.last_active) >= quiet
                }
                (None, Sweep::Shutdown) => {
                    now.saturating_duration_since(conn.last_active) >= DRAIN_QUIET
                }
                // Never close a connection with input unread because of a replacement: it
                // is read and answered first.
                (None, Sweep::Retire) => {
                    conn.is_staying()
                        && conn.is_quiet()
                        && !conn.mid_request()
                        && !conn.input_waiting()
                }
            })
            .map(|(key, _)| key)
            .collect();
        let (draining, past_deadline) = match self.state {
            State::Serving => (false, false),
            State::Draining { deadline, .. } => (true, now >= deadline),
        };
        for key in overdue {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            // Replies a client does not take cannot be saved: an idle connection in that
            // state, or any at the drain's deadline, is dropped.
            let hopeless = !conn.is_quiet() && (!draining || past_deadline);
            if conn.is_staying() && conn.linger_deadline().is_none() {
                conn.counters().closed_by_replacement.fetch_add(1, Relaxed);
            }
            let overdue_header = conn.header_overdue(now);
            if overdue_header {
                conn.abandon_header();
            }
            let verdict = if conn.linger_deadline().is_some() || hopeless || overdue_header {
                Verdict::Close
            } else {
                conn.close_gracefully(&mut self.scratch, self.poll.registry(), now)
            };
            if verdict == Verdict::Close {
                self.close(key, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycling_is_off_without_max_requests() {
        assert_eq!(recycle_after(0, 0, 1), None);
        assert_eq!(recycle_after(0, 100, 1), None);
    }

    #[test]
    fn jitter_adds_at_most_its_range_and_spreads_the_workers() {
        let limits: Vec<u64> = (0..1000)
            .map(|seed| recycle_after(100, 9, seed).expect("recycling is on"))
            .collect();
        assert!(limits.iter().all(|limit| (100..=109).contains(limit)));
        let distinct: std::collections::BTreeSet<u64> = limits.into_iter().collect();
        assert_eq!(distinct.len(), 10, "every value of the range is drawn");
        assert_eq!(recycle_after(100, 0, 7), Some(100), "no jitter, no change");
    }

    /// The review's crash: `max + 1` wrapped to 0 and every worker divided by zero.
    #[test]
    fn the_largest_jitter_neither_panics_nor_overflows() {
        for seed in [0, 1, u64::MAX] {
            let limit = recycle_after(u64::MAX, u64::MAX, seed).expect("recycling is on");
            assert!(limit >= 1);
            assert!(recycle_after(1, u64::MAX, seed).expect("on") >= 1);
        }
    }

    #[test]
    fn the_drain_leaves_room_for_the_lingering_close() {
        let config = Config::load(&crate::config::Cli {
            graceful_timeout: Some(30.0),
            ..crate::config::Cli::default()
        })
        .expect("valid settings");
        let tls = ServiceTls::load(&config).expect("no TLS configured");
        let settings = WorkerSettings::new(&config, &tls, None);
        assert_eq!(
            settings.drain_budget + LINGER_TIMEOUT,
            config.graceful_timeout
        );
        assert_eq!(
            heartbeat_interval(Some(Duration::from_secs(2))),
            Duration::from_millis(500)
        );
        assert_eq!(heartbeat_interval(None), Duration::from_secs(1));
    }
}
