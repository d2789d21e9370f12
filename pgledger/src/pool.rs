//! The pool's thread: a current-thread tokio runtime running one task per database
//! connection, which take queued requests one at a time, and a deadline task that answers
//! requests still queued at their deadline. Completions go to a list that the worker drains,
//! and the worker's waker is called after each.
//!
//! A connection task owns its request until it is answered: on a broken connection it
//! reconnects (with jittered back-off) and tries again while the deadline allows, or, for a
//! request in doubt, until the database says what happened (see `txn.rs`).

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use forkpool_common::bank::{ErrorKind, ProtocolError, Reply};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout_at;
use tokio_postgres::{Client, NoTls};

use crate::schema::{self, SCHEMA_VERSION};
use crate::stats::Counters;
use crate::txn::{self, Failure, RequestId, Statements, Work};
use crate::LedgerOp;
use crate::PgSettings;

/// First wait after a failed connection attempt or a retryable conflict; doubled each time.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// Longest wait between two connection attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a conflicting transaction.
const RETRY_CAP: Duration = Duration::from_millis(100);
/// Every this many completed changes, a connection prunes the ids no longer needed.
const PRUNE_EVERY: u64 = 1024;
/// A request in doubt for this long can no longer be resolved safely: its id may have been
/// swept as abandoned (after a day, `txn::RETENTION_SQL`; an hour's margin for clocks).
const IN_DOUBT_LIMIT: Duration = Duration::from_secs(23 * 3600);

/// The ids handed out: the next sequence number and those not yet answered. One lock for
/// both, so that "every id below the smallest unanswered one (or below the next, if none) is
/// answered" holds at every instant a pruner looks.
struct Ids {
    origin: i64,
    next_seq: i64,
    unanswered: BTreeSet<i64>,
}

impl Ids {
    /// The ids below this are answered and will never be looked up again.
    fn prunable_below(&self) -> i64 {
        self.unanswered.first().copied().unwrap_or(self.next_seq)
    }
}

/// One submitted request.
pub(crate) struct Job {
    pub(crate) ticket: u64,
    pub(crate) work: Work,
    pub(crate) submitted: Instant,
    pub(crate) deadline: Instant,
}

/// What the worker's thread and the pool's thread share.
pub(crate) struct Shared {
    queue: Mutex<VecDeque<Job>>,
    /// A job was queued (for the connection tasks).
    queued: Notify,
    /// The queue's front may have changed (for the deadline task).
    front: Notify,
    done: Mutex<Vec<(u64, Reply)>>,
    wake: Box<dyn Fn() + Send + Sync>,
    ids: Mutex<Ids>,
    /// The latest connection or database error, for `ERR unavailable` details.
    last_error: Mutex<String>,
    pub(crate) counters: Counters,
    changes_done: AtomicU64,
    pub(crate) stop: Notify,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a push, pop or swap: a panic cannot leave the data
    // half-changed, so a poisoned lock's data is still good.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// `origin`: this pool's random id prefix (see `txn::RequestId`).
    pub(crate) fn new(origin: i64, wake: Box<dyn Fn() + Send + Sync>) -> Shared {
        Shared {
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            front: Notify::new(),
            done: Mutex::new(Vec::new()),
            wake,
            ids: Mutex::new(Ids {
                origin,
                next_seq: 1,
                unanswered: BTreeSet::new(),
            }),
            last_error: Mutex::new("no connection yet".to_string()),
            counters: Counters::default(),
            changes_done: AtomicU64::new(0),
            stop: Notify::new(),
        }
    }

    /// Queues `op`, giving a change its id.
    pub(crate) fn submit(&self, ticket: u64, op: LedgerOp, deadline: Duration) {
        let work = match op {
            LedgerOp::Change(change) => {
                let mut ids = locked(&self.ids);
                let id = RequestId {
                    origin: ids.origin,
                    seq: ids.next_seq,
                };
                ids.next_seq += 1;
                ids.unanswered.insert(id.seq);
                Work::Change { change, id }
            }
            LedgerOp::Balance { acct } => Work::Balance { acct },
            LedgerOp::Audit => Work::Audit,
        };
        let submitted = Instant::now();
        let job = Job {
            ticket,
            work,
            submitted,
            deadline: submitted + deadline,
        };
        Counters::bump(&self.counters.submitted);
        let was_empty = {
            let mut queue = locked(&self.queue);
            queue.push_back(job);
            queue.len() == 1
        };
        self.queued.notify_one();
        if was_empty {
            self.front.notify_one();
        }
    }

    pub(crate) fn origin(&self) -> i64 {
        locked(&self.ids).origin
    }

    pub(crate) fn drain(&self) -> Vec<(u64, Reply)> {
        std::mem::take(&mut *locked(&self.done))
    }

    /// Hands `reply` to the worker. Returns whether this completion makes pruning due (every
    /// [`PRUNE_EVERY`] changes).
    fn complete(&self, job: &Job, reply: Reply) -> bool {
        let mut prune_due = false;
        if let Work::Change { id, .. } = job.work {
            locked(&self.ids).unanswered.remove(&id.seq);
            prune_due = (self.changes_done.fetch_add(1, Relaxed) + 1).is_multiple_of(PRUNE_EVERY);
        }
        if matches!(
            &reply,
            Reply::Err {
                kind: ErrorKind::Unavailable,
                ..
            }
        ) {
            Counters::bump(&self.counters.unavailable);
        }
        self.counters.completed_in(job.submitted.elapsed());
        locked(&self.done).push((job.ticket, reply));
        (self.wake)();
        prune_due
    }

    async fn next_job(&self) -> Job {
        loop {
            let notified = self.queued.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = locked(&self.queue).pop_front() {
                self.front.notify_one();
                return job;
            }
            notified.await;
        }
    }

    fn note_error(&self, what: &str, error: &dyn std::fmt::Display) {
        Counters::bump(&self.counters.errors);
        let text = format!("{what}: {error}");
        log::debug!("ledger database: {text}");
        *locked(&self.last_error) = text;
    }

    fn unavailable(&self, deadline: Duration) -> Reply {
        ProtocolError::unavailable(deadline, &locked(&self.last_error)).into()
    }
}

/// The pool's body, run by its thread until `stop` is notified: the connection tasks and the
/// deadline task.
pub(crate) async fn run(shared: Arc<Shared>, settings: Arc<PgSettings>) {
    let mut tasks: Vec<JoinHandle<()>> = (0..settings.connections)
        .map(|_| tokio::spawn(connection_task(Arc::clone(&shared), Arc::clone(&settings))))
        .collect();
    tasks.push(tokio::spawn(expire_queued(
        Arc::clone(&shared),
        settings.deadline,
    )));
    shared.stop.notified().await;
    for task in tasks {
        task.abort();
    }
}

/// Answers `ERR unavailable` to every request still queued at its deadline (all connections
/// busy, or reconnecting). Queued requests never reached the database.
async fn expire_queued(shared: Arc<Shared>, deadline: Duration) {
    loop {
        let front = shared.front.notified();
        tokio::pin!(front);
        front.as_mut().enable();
        let next = locked(&shared.queue).front().map(|job| job.deadline);
        match next {
            None => front.await,
            // Either the front's deadline comes, or the front changes.
            Some(at) if at > Instant::now() => _ = timeout_at(at.into(), front).await,
            Some(_) => {
                let expired = {
                    let mut queue = locked(&shared.queue);
                    let now = Instant::now();
                    let live = queue.iter().take_while(|job| job.deadline <= now).count();
                    queue.drain(..live).collect::<Vec<_>>()
                };
                // Expired changes never reached the database: pruning waits for a connection.
                for job in expired {
                    let reply = shared.unavailable(deadline);
                    shared.complete(&job, reply);
                }
            }
        }
    }
}

/// An open connection: its client, its prepared statements, and the task driving its socket.
struct Connection {
    client: Client,
    statements: Statements,
    _driver: Driver,
    shared: Arc<Shared>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.counters.connections_up.fetch_sub(1, Relaxed);
    }
}

/// The task driving a connection's socket, aborted on drop: that closes the socket, and the
/// server then rolls back whatever the connection had not committed.
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a connection could not be made ready.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("no ledger schema in the database (the server creates it at start)")]
    NoSchema,
    #[error("schema version {0}, this binary serves version {SCHEMA_VERSION}")]
    WrongSchema(i32),
}

/// Opens a connection, checks the schema version and prepares the statements.
async fn connect(shared: &Arc<Shared>, settings: &PgSettings) -> Result<Connection, ConnectError> {
    let (client, connection) = settings.config.connect(NoTls).await?;
    let driver = Driver(tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("ledger database connection ended: {e}");
        }
    }));
    let statements = match schema::version(&client).await? {
        Some(SCHEMA_VERSION) => Statements::prepare(&client).await?,
        Some(other) => return Err(ConnectError::WrongSchema(other)),
        None => return Err(ConnectError::NoSchema),
    };
    shared.counters.connections_up.fetch_add(1, Relaxed);
    Ok(Connection {
        client,
        statements,
        _driver: driver,
        shared: Arc::clone(shared),
    })
}

/// Waits `delay` with ±50 % jitter (so that many tasks retrying together spread out).
async fn jittered_sleep(delay: Duration) {
    let factor = 0.5 + fastrand::f64();
    tokio::time::sleep(delay.mul_f64(factor)).await;
}

/// The exponential back-off of one task's connection attempts.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// The wait before the next attempt, doubling up to the cap.
    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        now
    }
}

/// One connection of the pool: connect (eagerly, so the pool is warm), then serve queued
/// requests one at a time, pruning old ids every [`PRUNE_EVERY`] changes.
async fn connection_task(shared: Arc<Shared>, settings: Arc<PgSettings>) {
    let mut server = Server {
        shared,
        settings,
        connection: None,
        backoff: Backoff::new(),
    };
    let warm_up = Instant::now() + server.settings.deadline;
    server.reconnect(warm_up).await;
    loop {
        let mut job = server.shared.next_job().await;
        let reply = server.serve(&mut job).await;
        if server.shared.complete(&job, reply) {
            server.prune().await;
        }
    }
}

/// A connection task's state.
struct Server {
    shared: Arc<Shared>,
    settings: Arc<PgSettings>,
    connection: Option<Connection>,
    backoff: Backoff,
}

impl Server {
    /// Tries to open the connection until `until`; false if it is still closed then.
    async fn reconnect(&mut self, until: Instant) -> bool {
        while self.connection.is_none() {
            match timeout_at(until.into(), connect(&self.shared, &self.settings)).await {
                Ok(Ok(connection)) => {
                    self.connection = Some(connection);
                    self.backoff.reset();
                    log::debug!("ledger database connection open");
                }
                Ok(Err(e)) => {
                    self.shared.note_error("cannot connect", &e);
                    let wait = self.backoff.step();
                    if Instant::now() + wait >= until {
                        return false;
                    }
                    jittered_sleep(wait).await;
                }
                Err(_) => {
                    self.shared.note_error("cannot connect", &"timed out");
                    return false;
                }
            }
        }
        true
    }

    /// Answers `job`: tries until it succeeds, until its deadline (if its outcome is known),
    /// or until the database says what an in-doubt attempt did.
    async fn serve(&mut self, job: &mut Job) -> Reply {
        let mut in_doubt: Option<Instant> = None;
        let mut retry_wait = BACKOFF_FIRST;
        loop {
            let attempt_until = match in_doubt {
                None if Instant::now() >= job.deadline => {
                    return self.shared.unavailable(self.settings.deadline)
                }
                None => job.deadline,
                Some(since) if since.elapsed() > IN_DOUBT_LIMIT => return outcome_unknown(),
                // Each resolution attempt is bounded too, so a hung one is abandoned.
                Some(_) => Instant::now() + self.settings.deadline,
            };
            if !self.reconnect(attempt_until).await {
                // The next connection attempt is not due before the deadline.
                if in_doubt.is_none() {
                    return self.shared.unavailable(self.settings.deadline);
                }
                jittered_sleep(self.backoff.step()).await;
                continue;
            }
            let connection = self
                .connection
                .as_ref()
                .expect("reconnect returned true, so a connection is open");
            let was_in_doubt = in_doubt.is_some();
            let attempt = txn::attempt(
                &connection.client,
                &connection.statements,
                &job.work,
                self.settings.max_accounts,
                &mut in_doubt,
            );
            match timeout_at(attempt_until.into(), attempt).await {
                Ok(Ok(reply)) => {
                    if was_in_doubt {
                        Counters::bump(&self.shared.counters.resolved);
                    }
                    return reply;
                }
                Ok(Err(Failure::Retry(e))) => {
                    Counters::bump(&self.shared.counters.retries);
                    log::debug!("ledger transaction conflict, trying again: {e}");
                    jittered_sleep(retry_wait).await;
                    retry_wait = (retry_wait * 2).min(RETRY_CAP);
                }
                Ok(Err(Failure::Refused(e))) => {
                    self.shared.note_error("database error", &e);
                    log::error!("ledger database refused a transaction: {e}");
                    if in_doubt.is_none() {
                        return self.shared.unavailable(self.settings.deadline);
                    }
                    jittered_sleep(self.backoff.step()).await;
                }
                Ok(Err(Failure::Connection(e))) => {
                    self.shared.note_error("connection lost", &e);
                    self.connection = None;
                }
                Ok(Err(Failure::Damaged(what))) => {
                    log::error!("ledger database holds {what}");
                    return Reply::error(
                        ErrorKind::Internal,
                        format!("the ledger database holds {what}"),
                    );
                }
                Err(_) => {
                    self.shared.note_error("no answer", &"timed out");
                    // Closing the socket makes the server roll back what was not committed.
                    self.connection = None;
                }
            }
        }
    }

    /// Deletes the ids that will never be looked up again. A failure only delays the pruning
    /// to the next [`PRUNE_EVERY`] changes.
    async fn prune(&mut self) {
        let Some(connection) = &self.connection else {
            return;
        };
        let below = locked(&self.shared.ids).prunable_below();
        let until = Instant::now() + self.settings.deadline;
        let pruning = txn::prune(
            &connection.client,
            &connection.statements,
            self.shared.origin(),
            below,
        );
        match timeout_at(until.into(), pruning).await {
            Ok(Ok(rows)) => log::debug!("pruned {rows} request ids"),
            Ok(Err(e)) => self.shared.note_error("pruning request ids", &e),
            Err(_) => self.connection = None,
        }
    }
}

/// The reply to a request in doubt for longer than [`IN_DOUBT_LIMIT`]: neither "applied" nor
/// "not applied" can be said any more.
fn outcome_unknown() -> Reply {
    Reply::error(
        ErrorKind::Internal,
        "the ledger database was unreachable for a day while this request was committing; \
         whether it took effect is unknown: check the balances",
    )
}
