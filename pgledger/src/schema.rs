//! The ledger's tables and their versioned migrations, in portable SQL (PostgreSQL,
//! CockroachDB, YugabyteDB): no extensions, no advisory locks, no PostgreSQL-only types.
//!
//! `forkpool_schema` holds one row: the schema version. A migration runs in one transaction
//! that first locks that row (`SELECT ... FOR UPDATE`), so two instances starting together
//! migrate one after the other; a database whose version is newer than this binary's is
//! refused, never touched.
//!
//! Version 1:
//! - `accounts(name, balance)`: one row per open account; `CHECK` keeps the balance in
//!   0..=2^63-1 whatever the code does.
//! - `ledger_capacity(accounts, max_accounts)`: one row, the account count and the limit. Every
//!   account creation increments the count in the same transaction as its `INSERT`, with
//!   `WHERE accounts < max_accounts`: the row lock serialises creations, so the limit is exact
//!   under any concurrency (and a `CHECK` backs it).
//! - `applied_requests(origin, seq, amount, reply)`: the id of every committed mutation, written
//!   in its transaction, with its reply; how an unknown commit outcome is resolved (see
//!   `txn.rs`). `amount` carries the `CHECK` of the protocol's 1..=2^63-1.

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};

/// The schema version this binary reads and writes.
pub const SCHEMA_VERSION: i32 = 1;

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: [&[&str]; SCHEMA_VERSION as usize] = [&[
    "CREATE TABLE accounts (
        name VARCHAR(64) NOT NULL PRIMARY KEY,
        balance BIGINT NOT NULL,
        CONSTRAINT balance_in_range CHECK (balance >= 0 AND balance <= 9223372036854775807),
        CONSTRAINT name_length CHECK (CHAR_LENGTH(name) BETWEEN 1 AND 64)
    )",
    "CREATE TABLE ledger_capacity (
        id INTEGER NOT NULL PRIMARY KEY,
        accounts BIGINT NOT NULL,
        max_accounts BIGINT NOT NULL,
        CONSTRAINT one_row CHECK (id = 1),
        CONSTRAINT count_in_range CHECK (accounts >= 0 AND accounts <= max_accounts)
    )",
    "CREATE TABLE applied_requests (
        origin BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        amount BIGINT NOT NULL,
        reply VARCHAR(256) NOT NULL,
        applied_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
        PRIMARY KEY (origin, seq),
        CONSTRAINT amount_in_range CHECK (amount >= 1 AND amount <= 9223372036854775807)
    )",
    "CREATE INDEX applied_requests_by_age ON applied_requests (applied_at)",
]];

/// How many times a migration that lost a race with another instance's is tried again.
const MIGRATION_ATTEMPTS: u32 = 5;

/// Why the schema could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the ledger database has schema version {found}, newer than this binary's \
         {SCHEMA_VERSION}: upgrade forkpool-server"
    )]
    TooNew { found: i32 },
    #[error(
        "the ledger database holds at most {database} accounts but max_accounts is {configured}; \
         set max_accounts to {database}, or change the database's with \
         UPDATE ledger_capacity SET max_accounts = {configured}"
    )]
    CapacityMismatch { database: u64, configured: u64 },
    #[error("the ledger database is damaged: {0}")]
    Damaged(&'static str),
    #[error("migrating the ledger database failed: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

/// Creates or migrates the schema to [`SCHEMA_VERSION`] and checks the stored capacity against
/// `max_accounts` (storing it when the schema is new). Retries a lost race with another
/// instance migrating at the same moment.
pub async fn migrate(client: &mut Client, max_accounts: u64) -> Result<(), SchemaError> {
    let mut attempt = 1;
    loop {
        match migrate_once(client, max_accounts).await {
            Err(SchemaError::Sql(e)) if attempt < MIGRATION_ATTEMPTS && lost_race(&e) => {
                log::debug!("schema migration raced another instance, again: {e}");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// A concurrent `CREATE TABLE IF NOT EXISTS` or first insert by another instance.
fn lost_race(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        [
            SqlState::UNIQUE_VIOLATION,
            SqlState::DUPLICATE_TABLE,
            SqlState::DUPLICATE_OBJECT,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ]
        .contains(code)
    })
}

async fn migrate_once(client: &mut Client, max_accounts: u64) -> Result<(), SchemaError> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS forkpool_schema (
            id INTEGER NOT NULL PRIMARY KEY,
            version INTEGER NOT NULL,
            CONSTRAINT one_row CHECK (id = 1)
        )",
    )
    .await?;
    tx.execute(
        "INSERT INTO forkpool_schema (id, version)
         SELECT 1, 0 WHERE NOT EXISTS (SELECT 1 FROM forkpool_schema WHERE id = 1)",
        &[],
    )
    .await?;
    let found: i32 = tx
        .query_one(
            "SELECT version FROM forkpool_schema WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?
        .try_get(0)?;
    if found > SCHEMA_VERSION {
        return Err(SchemaError::TooNew { found });
    }
    let from = usize::try_from(found).map_err(|_| SchemaError::Damaged("negative version"))?;
    for statements in &MIGRATIONS[from..] {
        for statement in *statements {
            tx.batch_execute(statement).await?;
        }
    }
    if found < SCHEMA_VERSION {
        tx.execute(
            "UPDATE forkpool_schema SET version = $1 WHERE id = 1",
            &[&SCHEMA_VERSION],
        )
        .await?;
        log::info!("ledger database schema migrated from version {found} to {SCHEMA_VERSION}");
    }
    check_capacity(&tx, max_accounts).await?;
    tx.commit().await?;
    Ok(())
}

/// Stores `max_accounts` in a new ledger, or checks it against an existing one's.
async fn check_capacity(tx: &Transaction<'_>, max_accounts: u64) -> Result<(), SchemaError> {
    let configured = i64::try_from(max_accounts)
        .map_err(|_| SchemaError::Damaged("max_accounts above 2^63-1"))?;
    tx.execute(
        "INSERT INTO ledger_capacity (id, accounts, max_accounts)
         SELECT 1, 0, $1 WHERE NOT EXISTS (SELECT 1 FROM ledger_capacity WHERE id = 1)",
        &[&configured],
    )
    .await?;
    let stored: i64 = tx
        .query_one("SELECT max_accounts FROM ledger_capacity WHERE id = 1", &[])
        .await?
        .try_get(0)?;
    if stored != configured {
        return Err(SchemaError::CapacityMismatch {
            database: stored.unsigned_abs(),
            configured: max_accounts,
        });
    }
    Ok(())
}

/// The schema version of the database a connection reaches (`None`: no schema yet), so that a
/// pool connection refuses to serve a schema it was not built for.
pub async fn version(client: &Client) -> Result<Option<i32>, tokio_postgres::Error> {
    match client
        .query_opt("SELECT version FROM forkpool_schema WHERE id = 1", &[])
        .await
    {
        Ok(row) => row.map(|r| r.try_get(0)).transpose(),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(e),
    }
}
