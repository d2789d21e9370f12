//! What the PgBank tests share: a fresh database on the test binary's cluster, a blocking
//! client for the non-blocking pool, and the shared-memory ledger answering the same
//! requests the way the server's bank service does.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::time::Duration;

use forkpool_common::bank::{parse_request, AccountName, ProtocolError, Reply, Request};
use forkpool_ledger::{Ledger, LedgerOptions};
use forkpool_pgledger::{LedgerOp, PgSettings, PgStats};
use forkpool_testkit::pg::{postgres, PgCluster};

/// Longest a test waits for one reply: the pool's deadline plus a generous margin for a busy
/// machine (an in-doubt request may take a reconnection longer).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A fresh database, its schema prepared for `max_accounts`.
pub struct Database {
    pub cluster: &'static PgCluster,
    pub name: String,
    pub settings: PgSettings,
}

impl Database {
    /// `None` when PostgreSQL is not installed (and not under CI).
    pub fn new(max_accounts: u64) -> Option<Database> {
        let cluster = postgres()?;
        let name = cluster.new_database();
        let settings = PgSettings::from_url(&cluster.url(&name), max_accounts)
            .expect("the cluster's URL is valid");
        forkpool_pgledger::prepare(&settings).expect("prepare the schema");
        Some(Database {
            cluster,
            name,
            settings,
        })
    }

    pub fn teller(&self) -> Teller {
        Teller::start(self.settings.clone())
    }

    pub fn psql(&self, sql: &str) -> String {
        self.cluster.psql(&self.name, sql)
    }
}

/// A [`forkpool_pgledger::Teller`] whose calls fail the test when no reply comes.
pub struct Teller(pub forkpool_pgledger::Teller);

impl Teller {
    pub fn start(settings: PgSettings) -> Teller {
        Teller(forkpool_pgledger::Teller::start(settings).expect("start the pool"))
    }

    /// Submits `op` and waits for its reply.
    pub fn call(&self, op: LedgerOp) -> Reply {
        self.0
            .call(op, REPLY_TIMEOUT)
            .unwrap_or_else(|| panic!("no reply to {op:?} within {REPLY_TIMEOUT:?}"))
    }

    /// The pool's counters.
    pub fn stats(&self) -> PgStats {
        self.0.bank.stats()
    }

    /// Parses `line` as a client would send it and answers it as a line.
    pub fn line(&self, line: &str) -> String {
        let request = parse_request(line.as_bytes()).expect("a valid request");
        let op = LedgerOp::of(&request).expect("a ledger request");
        reply_line(&self.call(op))
    }
}

/// A reply as it goes on the wire, without its newline.
pub fn reply_line(reply: &Reply) -> String {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    out.pop();
    String::from_utf8(out).expect("replies are ASCII")
}

/// The shared-memory ledger answering a request as the server's bank service does.
pub fn shm_reply(ledger: &Ledger, request: &Request) -> Reply {
    let outcome = match *request {
        Request::Deposit { acct, amount } => ledger.deposit(&acct, amount).map(Reply::Ok),
        Request::Withdraw { acct, amount } => ledger.withdraw(&acct, amount).map(Reply::Ok),
        Request::Transfer { from, to, amount } => ledger
            .transfer(&from, &to, amount)
            .map(|(a, b)| Reply::OkPair(a, b)),
        Request::Balance { acct } => ledger.balance(&acct).map(Reply::Ok),
        Request::Audit => ledger.audit().map(|audit| Reply::Audit {
            total: audit.total,
            accounts: audit.accounts,
        }),
        Request::Ping | Request::Quit | Request::Auth { .. } => {
            panic!("not a ledger request: {request:?}")
        }
    };
    outcome.unwrap_or_else(|e| ProtocolError::refusal(e.kind(), request, ledger.capacity()).into())
}

/// A shared-memory ledger in a temporary directory.
pub fn shm_ledger(max_accounts: u64) -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let options = LedgerOptions {
        max_accounts,
        ..LedgerOptions::default()
    };
    let ledger = Ledger::open(&dir.path().join("ledger.bin"), &options).expect("open the ledger");
    (dir, ledger)
}

pub fn acct(name: &str) -> AccountName {
    name.parse().expect("a valid test account name")
}
