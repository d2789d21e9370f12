//! The bank ledger on PostgreSQL, or on an engine that speaks its protocol and SQL
//! (CockroachDB, YugabyteDB): the same requests, replies and check order as the shared-memory
//! ledger (`forkpool-ledger`), for instances on several machines sharing one ledger.
//!
//! A worker's event loop must never block on the database, so [`PgBank`] is a queue in front
//! of a pool of connections served by the pool's own thread: the worker [`PgBank::submit`]s a
//! request with a ticket, the pool calls the worker's waker after each completion, and the
//! worker drains the replies with [`PgBank::completions`]. Each request has a deadline
//! ([`PgSettings::deadline`]): a request not answered by then gets `ERR unavailable`, unless
//! its `COMMIT` may have taken effect, in which case the pool first finds out from the
//! database (see `txn.rs`: every change writes its id in its own transaction).
//!
//! The client is `tokio-postgres` on a current-thread runtime that exists only on the pool's
//! thread (created by [`PgBank::start`], i.e. after the worker's fork: a runtime, like an open
//! connection, must never cross a fork). Asynchronous rather than the synchronous `postgres`
//! crate because every step can then be bounded by the deadline (a synchronous call blocked on
//! a frozen server cannot be interrupted), one thread serves all the connections of the pool,
//! and the statements of a transaction are pipelined: a transfer costs two round trips.
//!
//! [`prepare`] creates or migrates the schema and checks the capacity; the master calls it
//! once before forking (it opens and closes its own connection).
//!
//! What this crate does not do: TLS to the database (`sslmode=require` is refused), and
//! ordering: a worker submits one request of a client connection at a time.

mod pool;
mod schema;
mod settings;
mod stats;
mod teller;
mod txn;

use std::sync::Arc;
use std::thread::JoinHandle;

pub use forkpool_common::bank::Reply;
pub use schema::{SchemaError, SCHEMA_VERSION};
pub use settings::{
    PgSettings, SettingsError, DEFAULT_CONNECTIONS, DEFAULT_DEADLINE, MAX_CONNECTIONS,
};
pub use stats::{PgStats, LATENCY_BUCKETS_US};
pub use teller::Teller;
pub use txn::{Change, LedgerOp};

use pool::Shared;

/// Why [`prepare`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot reach the ledger database {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("ledger database {target}: no answer within {seconds} s")]
    TimedOut { target: String, seconds: u64 },
    #[error("ledger database {target}: {source}")]
    Schema {
        target: String,
        #[source]
        source: SchemaError,
    },
    #[error("cannot start a thread for the ledger database: {0}")]
    Thread(#[source] std::io::Error),
}

/// Creates the schema in a new database or migrates an older one to [`SCHEMA_VERSION`], and
/// checks `max_accounts` against the one stored (see [`SchemaError::CapacityMismatch`]).
/// Blocking; bounded by five times the deadline. Runs on a thread of its own that is gone when
/// it returns, so the caller may fork afterwards.
pub fn prepare(settings: &PgSettings) -> Result<(), PrepareError> {
    let settings = settings.clone();
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("ledger-prepare".to_string())
            .spawn_scoped(scope, || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(PrepareError::Thread)?;
                let outcome = runtime.block_on(prepare_on(&settings));
                // Dropping the runtime joins its blocking threads (name lookups) before the
                // caller goes on to fork.
                drop(runtime);
                outcome
            })
            .map_err(PrepareError::Thread)?;
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

async fn prepare_on(settings: &PgSettings) -> Result<(), PrepareError> {
    let target = settings.target();
    let limit = settings.deadline * 5;
    let work = async {
        let (mut client, connection) = settings
            .config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|source| PrepareError::Connect {
                target: target.clone(),
                source,
            })?;
        let driver = tokio::spawn(connection);
        let outcome = schema::migrate(&mut client, settings.max_accounts).await;
        drop(client);
        driver.abort();
        outcome.map_err(|source| PrepareError::Schema {
            target: target.clone(),
            source,
        })
    };
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(PrepareError::TimedOut {
            target: target.clone(),
            seconds: limit.as_secs(),
        })
    })
}

/// The ledger on a database, served by a pool of connections on a thread of its own.
/// Dropping it stops the thread and closes the connections (a request still in flight gets
/// no reply).
pub struct PgBank {
    shared: Arc<Shared>,
    settings: Arc<PgSettings>,
    thread: Option<JoinHandle<()>>,
}

impl PgBank {
    /// Starts the pool's thread, which opens `settings.connections` connections (in the
    /// background: a database that is down makes requests fail with `ERR unavailable`, not
    /// this call). `wake` is called on the pool's thread after each completion (a worker
    /// passes its `mio::Waker::wake`). Call it after the fork, in the process that uses it.
    /// Fails only if the settings are out of range ([`PgSettings::validate`], as
    /// `InvalidInput`) or the thread or its runtime cannot be created.
    pub fn start(
        settings: PgSettings,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Result<PgBank, std::io::Error> {
        settings
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let shared = Arc::new(Shared::new(new_origin()?, wake));
        let settings = Arc::new(settings);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("ledger-pool".to_string())
            .spawn({
                let shared = Arc::clone(&shared);
                let settings = Arc::clone(&settings);
                move || runtime.block_on(pool::run(shared, settings))
            })?;
        Ok(PgBank {
            shared,
            settings,
            thread: Some(thread),
        })
    }

    /// Queues `op`; never blocks. Its reply comes back from [`PgBank::completions`] with
    /// `ticket`, within the deadline (or, for a change whose commit outcome became unknown,
    /// as soon as the database can say what happened).
    pub fn submit(&self, ticket: u64, op: LedgerOp) {
        self.shared.submit(ticket, op, self.settings.deadline);
    }

    /// The replies completed since the last call, each with its ticket.
    pub fn completions(&self) -> Vec<(u64, Reply)> {
        self.shared.drain()
    }

    /// The pool's counters (for the status endpoint).
    pub fn stats(&self) -> PgStats {
        self.shared.counters.snapshot(self.settings.connections)
    }

    /// This pool's request-id origin (its ids in `applied_requests`).
    pub fn origin(&self) -> i64 {
        self.shared.origin()
    }
}

impl Drop for PgBank {
    fn drop(&mut self) {
        self.shared.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the ledger pool thread panicked");
            }
        }
    }
}

/// A random positive 63-bit origin: unique among the pools sharing a database with
/// overwhelming probability, and never reused by a restarted process (unlike a pid).
fn new_origin() -> Result<i64, std::io::Error> {
    let random = getrandom::u64().map_err(std::io::Error::from)?;
    Ok((random >> 1) as i64)
}
