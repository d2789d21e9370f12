//! One bank request as database work: the decision (the protocol's check order, in Rust, on
//! rows locked `FOR UPDATE`) and the transaction that applies it, pipelined into two round
//! trips (three when an account is opened).
//!
//! A mutation runs as: `BEGIN` + `SELECT balance ... FOR UPDATE` for each account in ascending
//! name order (so two transfers never wait for each other in a cycle), then the decision, then
//! the new balances + the request's id and reply in `applied_requests` + `COMMIT`. Opening an
//! account first increments the capacity row (`WHERE accounts < max_accounts`: zero rows means
//! `ledger-full`). A refusal writes nothing and rolls back, except in a *fence* attempt (below).
//!
//! # Commit outcome
//! From the moment `COMMIT` may have been sent until its answer arrives, the outcome is unknown
//! if the connection breaks. The attempt marks the request in doubt before sending it. A
//! request in doubt is never answered `ERR unavailable`; it is tried again on a new connection
//! with the same id, as a fence: its `INSERT` into `applied_requests` waits for (or collides
//! with) the earlier attempt's uncommitted row, so it either finds the earlier attempt committed
//! (unique violation: the stored reply is the answer) or is the only attempt that commits. A
//! fence attempt records refusals too, for the same reason.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use forkpool_common::bank::{
    parse_reply, AccountName, ErrorKind, ProtocolError, Reply, Request, MAX_AMOUNT,
};
use futures_util::future::{join, join3, join_all};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

/// A request that the ledger serves (PING, QUIT and AUTH are the connection's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerOp {
    Change(Change),
    Balance { acct: AccountName },
    Audit,
}

/// A request that changes balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Deposit {
        acct: AccountName,
        amount: u64,
    },
    Withdraw {
        acct: AccountName,
        amount: u64,
    },
    Transfer {
        from: AccountName,
        to: AccountName,
        amount: u64,
    },
}

impl LedgerOp {
    /// The ledger's part of a request; `None` for PING, QUIT and AUTH.
    pub fn of(request: &Request) -> Option<LedgerOp> {
        Some(match *request {
            Request::Deposit { acct, amount } => LedgerOp::Change(Change::Deposit { acct, amount }),
            Request::Withdraw { acct, amount } => {
                LedgerOp::Change(Change::Withdraw { acct, amount })
            }
            Request::Transfer { from, to, amount } => {
                LedgerOp::Change(Change::Transfer { from, to, amount })
            }
            Request::Balance { acct } => LedgerOp::Balance { acct },
            Request::Audit => LedgerOp::Audit,
            Request::Ping | Request::Quit | Request::Auth { .. } => return None,
        })
    }

    /// The request again.
    pub fn request(&self) -> Request {
        match *self {
            LedgerOp::Change(change) => change.request(),
            LedgerOp::Balance { acct } => Request::Balance { acct },
            LedgerOp::Audit => Request::Audit,
        }
    }
}

impl Change {
    /// The request again (to read a stored reply with the protocol's own parser).
    fn request(&self) -> Request {
        match *self {
            Change::Deposit { acct, amount } => Request::Deposit { acct, amount },
            Change::Withdraw { acct, amount } => Request::Withdraw { acct, amount },
            Change::Transfer { from, to, amount } => Request::Transfer { from, to, amount },
        }
    }

    fn amount(&self) -> u64 {
        match *self {
            Change::Deposit { amount, .. }
            | Change::Withdraw { amount, .. }
            | Change::Transfer { amount, .. } => amount,
        }
    }

    /// The accounts it locks, as (first, second) of [`decide`].
    fn accounts(&self) -> (AccountName, Option<AccountName>) {
        match *self {
            Change::Deposit { acct, .. } | Change::Withdraw { acct, .. } => (acct, None),
            Change::Transfer { from, to, .. } => (from, Some(to)),
        }
    }
}

/// A request as the pool serves it: a change carries its id.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Work {
    Change { change: Change, id: RequestId },
    Balance { acct: AccountName },
    Audit,
}

/// A mutation's id, unique across every process sharing the database: a random origin per
/// pool and a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RequestId {
    pub(crate) origin: i64,
    pub(crate) seq: i64,
}

/// The statements of one connection, prepared once when it opens.
pub(crate) struct Statements {
    lock: Statement,
    set: Statement,
    open: Statement,
    create: Statement,
    record: Statement,
    stored: Statement,
    balance: Statement,
    audit: Statement,
    prune: Statement,
    sweep: Statement,
}

/// How long a finished request's id is kept when its pool did not prune it (its process
/// died): rows of abandoned origins older than this are swept.
pub(crate) const RETENTION_SQL: &str = "1 day";

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lock: client
                .prepare("SELECT balance FROM accounts WHERE name = $1 FOR UPDATE")
                .await?,
            set: client
                .prepare("UPDATE accounts SET balance = $2 WHERE name = $1")
                .await?,
            open: client
                .prepare(
                    "UPDATE ledger_capacity SET accounts = accounts + 1 \
                     WHERE id = 1 AND accounts < max_accounts",
                )
                .await?,
            create: client
                .prepare("INSERT INTO accounts (name, balance) VALUES ($1, $2)")
                .await?,
            record: client
                .prepare(
                    "INSERT INTO applied_requests (origin, seq, amount, reply) \
                     VALUES ($1, $2, $3, $4)",
                )
                .await?,
            stored: client
                .prepare("SELECT reply FROM applied_requests WHERE origin = $1 AND seq = $2")
                .await?,
            balance: client
                .prepare("SELECT balance FROM accounts WHERE name = $1")
                .await?,
            audit: client
                .prepare(
                    "SELECT CAST(COALESCE(SUM(balance), 0) AS VARCHAR(48)), COUNT(*) FROM accounts",
                )
                .await?,
            prune: client
                .prepare("DELETE FROM applied_requests WHERE origin = $1 AND seq < $2")
                .await?,
            sweep: client
                .prepare(&format!(
                    "DELETE FROM applied_requests \
                     WHERE applied_at < CURRENT_TIMESTAMP - INTERVAL '{RETENTION_SQL}'"
                ))
                .await?,
        })
    }
}

/// Why an attempt did not produce a reply.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Nothing was applied and trying again may succeed: a serialization failure, a deadlock,
    /// or a lost race to open the same account.
    Retry(tokio_postgres::Error),
    /// The database refused the transaction for a reason a retry will not fix; nothing of
    /// this attempt was applied.
    Refused(tokio_postgres::Error),
    /// The connection broke; it must be dropped. If the attempt had marked the request in
    /// doubt, its outcome is unknown.
    Connection(tokio_postgres::Error),
    /// The database holds something the ledger never writes.
    Damaged(&'static str),
}

impl Failure {
    /// Sorts a client error: server-side errors mean this attempt's transaction is rolled
    /// back; anything else (I/O, closed) leaves the connection unusable.
    fn of(e: tokio_postgres::Error) -> Failure {
        let retryable = [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::UNIQUE_VIOLATION,
        ];
        match e.as_db_error() {
            Some(db) if retryable.contains(db.code()) => Failure::Retry(e),
            Some(_) => Failure::Refused(e),
            None => Failure::Connection(e),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::of(e)
    }
}

/// Serves `work` once on `client`. `in_doubt` holds when a previous attempt of this request
/// may have committed (this attempt is then a fence), and is set by this attempt just before
/// it sends `COMMIT`. After a `Retry` or `Refused` failure the connection is usable (the
/// transaction was rolled back).
pub(crate) async fn attempt(
    client: &Client,
    statements: &Statements,
    work: &Work,
    capacity: u64,
    in_doubt: &mut Option<Instant>,
) -> Result<Reply, Failure> {
    match work {
        Work::Balance { acct } => balance(client, statements, acct, capacity).await,
        Work::Audit => audit(client, statements).await,
        Work::Change { change, id } => {
            let outcome = mutate(client, statements, change, *id, capacity, in_doubt).await;
            if !matches!(outcome, Err(Failure::Retry(_) | Failure::Refused(_))) {
                return outcome;
            }
            rollback(client).await?;
            match outcome {
                Err(Failure::Retry(e)) if in_doubt.is_some() && is_id_collision(&e) => {
                    stored_reply(client, statements, change, *id).await
                }
                other => other,
            }
        }
    }
}

/// The error is the id's unique violation: an earlier attempt committed this request.
fn is_id_collision(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &SqlState::UNIQUE_VIOLATION
            && (db.table() == Some("applied_requests")
                || db.constraint() == Some("applied_requests_pkey"))
    })
}

async fn rollback(client: &Client) -> Result<(), Failure> {
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(Failure::Connection)
}

async fn balance(
    client: &Client,
    st: &Statements,
    acct: &AccountName,
    capacity: u64,
) -> Result<Reply, Failure> {
    let row = client.query_opt(&st.balance, &[&acct.as_str()]).await?;
    match row {
        None => {
            let request = Request::Balance { acct: *acct };
            Ok(ProtocolError::refusal(ErrorKind::NoSuchAccount, &request, capacity).into())
        }
        Some(row) => Ok(Reply::Ok(stored_balance(row.try_get(0)?)?)),
    }
}

async fn audit(client: &Client, st: &Statements) -> Result<Reply, Failure> {
    let row = client.query_one(&st.audit, &[]).await?;
    let total: &str = row.try_get(0)?;
    let accounts: i64 = row.try_get(1)?;
    Ok(Reply::Audit {
        total: total
            .parse()
            .map_err(|_| Failure::Damaged("a total that is not a whole number"))?,
        accounts: u64::try_from(accounts).map_err(|_| Failure::Damaged("a negative count"))?,
    })
}

fn stored_balance(balance: i64) -> Result<u64, Failure> {
    u64::try_from(balance).map_err(|_| Failure::Damaged("a negative balance"))
}

/// What a mutation does to the rows it locked.
#[derive(Debug, PartialEq, Eq)]
struct Effect {
    /// New balances of existing accounts.
    set: Vec<(AccountName, u64)>,
    /// An account to open, with its first balance (checked against the capacity last).
    open: Option<(AccountName, u64)>,
    reply: Reply,
}

/// The protocol's check order (docs/LEDGER.md, "Semantics and check order") on the balances
/// found: `first` is the balance of the request's first account (a transfer's source),
/// `second` of a transfer's destination; `None` for an account that does not exist.
fn decide(change: &Change, first: Option<u64>, second: Option<u64>) -> Result<Effect, ErrorKind> {
    let checked_amount = |amount: u64| {
        if (1..=MAX_AMOUNT).contains(&amount) {
            Ok(amount)
        } else {
            Err(ErrorKind::BadAmount)
        }
    };
    let credit = |balance: u64, amount: u64| {
        balance
            .checked_add(amount)
            .filter(|&b| b <= MAX_AMOUNT)
            .ok_or(ErrorKind::Overflow)
    };
    match *change {
        Change::Deposit { acct, amount } => {
            let amount = checked_amount(amount)?;
            Ok(match first {
                Some(balance) => {
                    let new = credit(balance, amount)?;
                    Effect {
                        set: vec![(acct, new)],
                        open: None,
                        reply: Reply::Ok(new),
                    }
                }
                None => Effect {
                    set: vec![],
                    open: Some((acct, amount)),
                    reply: Reply::Ok(amount),
                },
            })
        }
        Change::Withdraw { acct, amount } => {
            let amount = checked_amount(amount)?;
            let balance = first.ok_or(ErrorKind::NoSuchAccount)?;
            let new = balance
                .checked_sub(amount)
                .ok_or(ErrorKind::InsufficientFunds)?;
            Ok(Effect {
                set: vec![(acct, new)],
                open: None,
                reply: Reply::Ok(new),
            })
        }
        Change::Transfer { from, to, amount } => {
            let amount = checked_amount(amount)?;
            if from == to {
                return Err(ErrorKind::SameAccount);
            }
            let from_balance = first.ok_or(ErrorKind::NoSuchAccount)?;
            let from_new = from_balance
                .checked_sub(amount)
                .ok_or(ErrorKind::InsufficientFunds)?;
            Ok(match second {
                Some(to_balance) => {
                    let to_new = credit(to_balance, amount)?;
                    Effect {
                        set: vec![(from, from_new), (to, to_new)],
                        open: None,
                        reply: Reply::OkPair(from_new, to_new),
                    }
                }
                None => Effect {
                    set: vec![(from, from_new)],
                    open: Some((to, amount)),
                    reply: Reply::OkPair(from_new, amount),
                },
            })
        }
    }
}

type Step<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

async fn mutate(
    client: &Client,
    st: &Statements,
    change: &Change,
    id: RequestId,
    capacity: u64,
    in_doubt: &mut Option<Instant>,
) -> Result<Reply, Failure> {
    let (first, second) = change.accounts();
    let (first_balance, second_balance) = lock(client, st, first, second).await?;
    let refusal = |kind| ProtocolError::refusal(kind, &change.request(), capacity).into();
    let effect = match decide(change, first_balance, second_balance) {
        Ok(effect) => effect,
        Err(kind) => return refuse(client, st, change, id, in_doubt, refusal(kind)).await,
    };
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(5);
    if let Some((name, balance)) = &effect.open {
        if client.execute(&st.open, &[]).await? == 0 {
            let full = refusal(ErrorKind::LedgerFull);
            return refuse(client, st, change, id, in_doubt, full).await;
        }
        let name = name.as_str();
        let balance = signed(*balance);
        steps.push(Box::pin(async move {
            client.execute(&st.create, &[&name, &balance]).await
        }));
    }
    for (name, balance) in &effect.set {
        let name = name.as_str();
        let balance = signed(*balance);
        steps.push(Box::pin(async move {
            client.execute(&st.set, &[&name, &balance]).await
        }));
    }
    commit(client, st, change, id, in_doubt, &effect.reply, steps).await
}

/// Locks the accounts in ascending name order (pipelined with `BEGIN`) and returns their
/// balances as (first, second).
async fn lock(
    client: &Client,
    st: &Statements,
    first: AccountName,
    second: Option<AccountName>,
) -> Result<(Option<u64>, Option<u64>), Failure> {
    let read = |name: AccountName| async move {
        client
            .query_opt(&st.lock, &[&name.as_str()])
            .await
            .map(|row| row.map(|r| r.try_get::<_, i64>(0)))
    };
    let begin = client.batch_execute("BEGIN");
    let (begun, balances) = match second {
        None => {
            let (begun, a) = join(begin, read(first)).await;
            (begun, (a, Ok(None)))
        }
        Some(second) if first < second => {
            let (begun, a, b) = join3(begin, read(first), read(second)).await;
            (begun, (a, b))
        }
        Some(second) => {
            let (begun, b, a) = join3(begin, read(second), read(first)).await;
            (begun, (a, b))
        }
    };
    begun?;
    let balance = |found: Result<Option<Result<i64, _>>, tokio_postgres::Error>| match found? {
        None => Ok(None),
        Some(value) => stored_balance(value?).map(Some),
    };
    Ok((balance(balances.0)?, balance(balances.1)?))
}

/// Ends a refused mutation with `reply`: a plain rollback, or in a fence attempt a recorded
/// refusal.
async fn refuse(
    client: &Client,
    st: &Statements,
    change: &Change,
    id: RequestId,
    in_doubt: &mut Option<Instant>,
    reply: Reply,
) -> Result<Reply, Failure> {
    if in_doubt.is_none() {
        rollback(client).await?;
        return Ok(reply);
    }
    commit(client, st, change, id, in_doubt, &reply, Vec::new()).await
}

/// Sends `steps`, the id with `reply`, and `COMMIT` in one pipeline, marking the request in
/// doubt first. Any server-side error among them means the transaction rolled back.
async fn commit<'a>(
    client: &'a Client,
    st: &'a Statements,
    change: &Change,
    id: RequestId,
    in_doubt: &mut Option<Instant>,
    reply: &Reply,
    mut steps: Vec<Step<'a>>,
) -> Result<Reply, Failure> {
    let mut line = Vec::new();
    reply.write_to(&mut line);
    line.pop();
    let text = String::from_utf8(line).expect("replies are ASCII");
    let amount = signed(change.amount());
    steps.push(Box::pin(async move {
        client
            .execute(&st.record, &[&id.origin, &id.seq, &amount, &text])
            .await
    }));
    steps.push(Box::pin(async move {
        client.batch_execute("COMMIT").await.map(|()| 0)
    }));
    in_doubt.get_or_insert_with(Instant::now);
    let results = join_all(steps).await;
    // A server-side error anywhere aborted the transaction (COMMIT then rolls back): not
    // applied. Otherwise an error is the connection's, and the outcome is unknown.
    let mut broken = None;
    for result in results {
        match result {
            Err(e) if e.as_db_error().is_some() => return Err(Failure::of(e)),
            Err(e) => broken = Some(e),
            Ok(_) => {}
        }
    }
    match broken {
        Some(e) => Err(Failure::Connection(e)),
        None => {
            *in_doubt = None;
            Ok(reply.clone())
        }
    }
}

/// The reply stored with a committed request's id.
async fn stored_reply(
    client: &Client,
    st: &Statements,
    change: &Change,
    id: RequestId,
) -> Result<Reply, Failure> {
    let row = client
        .query_opt(&st.stored, &[&id.origin, &id.seq])
        .await?
        .ok_or(Failure::Damaged("a collided request id without its row"))?;
    let text: &str = row.try_get(0)?;
    parse_reply(&change.request(), text.as_bytes())
        .map_err(|_| Failure::Damaged("a stored reply that does not parse"))
}

/// Deletes this origin's ids below `below` (all answered, never looked up again) and every
/// id older than [`RETENTION_SQL`] (left by pools that died). Returns the rows deleted.
pub(crate) async fn prune(
    client: &Client,
    st: &Statements,
    origin: i64,
    below: i64,
) -> Result<u64, tokio_postgres::Error> {
    let own = client.execute(&st.prune, &[&origin, &below]).await?;
    let abandoned = client.execute(&st.sweep, &[]).await?;
    Ok(own + abandoned)
}

/// A balance or amount as the database's BIGINT (always in range: 0..=2^63-1).
fn signed(value: u64) -> i64 {
    i64::try_from(value).expect("balances and amounts are at most 2^63-1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acct(name: &str) -> AccountName {
        name.parse().expect("valid test name")
    }

    fn transfer(amount: u64) -> Change {
        Change::Transfer {
            from: acct("a"),
            to: acct("b"),
            amount,
        }
    }

    #[test]
    fn transfer_checks_run_in_the_protocol_order() {
        let same = Change::Transfer {
            from: acct("a"),
            to: acct("a"),
            amount: 0,
        };
        assert_eq!(decide(&same, None, None), Err(ErrorKind::BadAmount));
        let same = Change::Transfer {
            from: acct("a"),
            to: acct("a"),
            amount: 1,
        };
        assert_eq!(decide(&same, None, None), Err(ErrorKind::SameAccount));
        assert_eq!(
            decide(&transfer(5), None, Some(0)),
            Err(ErrorKind::NoSuchAccount)
        );
        assert_eq!(
            decide(&transfer(5), Some(4), None),
            Err(ErrorKind::InsufficientFunds)
        );
        assert_eq!(
            decide(&transfer(5), Some(5), Some(MAX_AMOUNT)),
            Err(ErrorKind::Overflow)
        );
        let opened = decide(&transfer(5), Some(7), None).expect("applies");
        assert_eq!(opened.open, Some((acct("b"), 5)));
        assert_eq!(opened.reply, Reply::OkPair(2, 5));
    }

    #[test]
    fn an_emptied_account_stays_and_a_full_one_overflows() {
        let withdraw = Change::Withdraw {
            acct: acct("a"),
            amount: 3,
        };
        assert_eq!(
            decide(&withdraw, Some(3), None).expect("ok").reply,
            Reply::Ok(0)
        );
        let deposit = Change::Deposit {
            acct: acct("a"),
            amount: 1,
        };
        assert_eq!(
            decide(&deposit, Some(MAX_AMOUNT), None),
            Err(ErrorKind::Overflow)
        );
        assert_eq!(
            decide(&deposit, Some(MAX_AMOUNT - 1), None)
                .expect("ok")
                .reply,
            Reply::Ok(MAX_AMOUNT)
        );
    }

    #[test]
    fn only_ledger_requests_become_ledger_ops() {
        assert_eq!(LedgerOp::of(&Request::Ping), None);
        assert_eq!(LedgerOp::of(&Request::Audit), Some(LedgerOp::Audit));
        let deposit = Request::Deposit {
            acct: acct("x"),
            amount: 9,
        };
        match LedgerOp::of(&deposit) {
            Some(LedgerOp::Change(change)) => assert_eq!(change.request(), deposit),
            other => panic!("a deposit is a change, got {other:?}"),
        }
    }
}
