//! Where the bank's money lives, as the master holds it before forking: the shared-memory
//! ledger file (opened and recovered here, its mapping inherited by every worker), or a
//! PostgreSQL database (its schema created or migrated here; each worker opens its own
//! connections after the fork, see `db.rs`).

use std::os::fd::{AsRawFd, RawFd};

use forkpool_ledger::{Ledger, LedgerOptions, Overview};
use forkpool_pgledger::PgSettings;

use crate::config::Config;
use crate::inherit::Inherited;

/// The bank's ledger backend.
pub enum LedgerStore {
    File(Ledger),
    /// The database's settings as the master read them (URL completed from the environment).
    Postgres(PgSettings),
}

/// Why the ledger could not be opened or prepared.
#[derive(Debug, thiserror::Error)]
pub enum LedgerStoreError {
    #[error(transparent)]
    File(#[from] forkpool_ledger::LedgerError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Postgres(#[from] forkpool_pgledger::PrepareError),
}

impl LedgerStore {
    /// Opens the ledger `config` names: adopts the one an upgrading master passed, or opens
    /// (and recovers) the file, or prepares the database. Blocking; nothing is forked yet.
    pub fn open(
        config: &Config,
        inherited: &mut Inherited,
    ) -> Result<LedgerStore, LedgerStoreError> {
        if let Some(settings) = config.postgres()? {
            forkpool_pgledger::prepare(&settings)?;
            log::info!(
                "ledger on PostgreSQL {}: schema version {}, {} connections per worker, \
                 timeout {:?}",
                settings.target(),
                forkpool_pgledger::SCHEMA_VERSION,
                settings.connections,
                settings.deadline
            );
            return Ok(LedgerStore::Postgres(settings));
        }
        let ledger = match inherited.ledger.take() {
            // A binary upgrade: the old master's workers use the ledger right now, so its
            // locks must not be re-initialised nor recovery run.
            Some(fd) => Ledger::adopt(
                fd,
                inherited.ledger_guard.take(),
                &config.ledger,
                config.fsync,
            )?,
            None => Ledger::open(
                &config.ledger,
                &LedgerOptions {
                    max_accounts: config.max_accounts,
                    fsync: config.fsync,
                    ..LedgerOptions::default()
                },
            )?,
        };
        // A lock-free read: after an upgrade the old master's workers hold the locks.
        let audit = ledger.approximate_audit();
        log::info!(
            "ledger {}: {} accounts, total {}, fsync {}",
            config.ledger.display(),
            audit.accounts,
            audit.total,
            config.fsync
        );
        Ok(LedgerStore::File(ledger))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, LedgerStore::Postgres(_))
    }

    /// Logs (once) a ledger file truncated, overwritten, deleted or replaced under us.
    pub fn check_file(&self) {
        if let LedgerStore::File(ledger) = self {
            ledger.check_file();
        }
    }

    /// The pids holding a ledger lock right now (a database holds its own locks).
    pub fn lock_holders(&self) -> Vec<i32> {
        match self {
            LedgerStore::File(ledger) => ledger.lock_holders().iter().map(|h| h.pid).collect(),
            LedgerStore::Postgres(_) => Vec::new(),
        }
    }

    /// The descriptors a new master of a binary upgrade inherits (none for a database: it
    /// connects by itself).
    pub fn upgrade_fds(&self) -> Vec<(RawFd, &'static str)> {
        match self {
            LedgerStore::File(ledger) => vec![
                (ledger.as_raw_fd(), "ledger"),
                (ledger.guard_fd(), "ledger-guard"),
            ],
            LedgerStore::Postgres(_) => Vec::new(),
        }
    }

    /// The ledger file's health and figures for the status page.
    pub fn overview(&self) -> Option<Overview> {
        match self {
            LedgerStore::File(ledger) => Some(ledger.overview()),
            LedgerStore::Postgres(_) => None,
        }
    }
}
