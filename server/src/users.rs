//! Users of the bank and the queue: who may connect and what each may do.
//!
//! - The users file (TOML, `[[user]]` tables) gives each user a name, the SHA-256 of its
//!   token (the token itself is never stored), its rights (`read` or `write`), optionally the
//!   accounts it may debit and the queues it may use, and optionally the Unix uid that
//!   authenticates it on a Unix socket (`SO_PEERCRED`, PostgreSQL's `peer`). One file, one
//!   AUTH, one set of rights for both services.
//! - [`Users::authenticate`] checks an AUTH: the digests are compared in constant time, and
//!   an unknown user is compared against a dummy digest, so it costs what a wrong token costs.
//! - [`authorize`] is the rights matrix: what a user (or nobody) may ask. A request says
//!   what it needs ([`Guarded`]); the matrix is the same for both services:
//!
//! | needs | bank | queue | who may |
//! | --- | --- | --- | --- |
//! | nothing | PING, QUIT, AUTH | PING, QUIT, AUTH | anyone, before AUTH too |
//! | read | BALANCE, AUDIT | STATS, QUEUES | `read` and `write` users |
//! | write | DEPOSIT, WITHDRAW, TRANSFER | PUT, PUT_NOWAIT, GET, GET_NOWAIT, DONE, JOIN, CONFIG | `write` users |
//!
//!   On top of the rights: the account a bank request debits (WITHDRAW, the source of
//!   TRANSFER) must match the user's `debit` patterns, and the queue a queue request names
//!   (STATS included) its `queues` patterns; QUEUES lists only the queues those patterns
//!   match. DONE names a job, not a queue: the store completes only a job this connection
//!   holds, and a queue connection whose user changes (another AUTH, a failed one, a
//!   revocation) gives its held jobs back first, so nobody completes another user's job.
//! - [`ConnAuth`] is one connection's state (who it is, how many AUTHs failed), and
//!   [`AuthThrottle`] the per-worker, per-peer limit on failed AUTHs. Both take the time as an
//!   argument, so they are tested without sleeping.
//!
//! Tokens are random (at least 128 bits, see [`generate_token`]), so a fast hash is the right
//! tool: nobody can search a 2^128 space, salted or not.
//!
//! # Debit and queue patterns
//! `debit` is a list of patterns; an account may be debited (WITHDRAW, the source of
//! TRANSFER) if any pattern matches its name. `queues` is the same for queue names (which
//! follow the account-name rules). A pattern is either
//! - a name (`alice`), matching exactly that account or queue (names are case-sensitive), or
//! - `prefix.*`, `prefix` being a name, matching every name that starts with `prefix.` and
//!   has at least one more byte: `alice.*` matches `alice.savings` and `alice.a.b`, not
//!   `alice` nor `alicex`.
//!
//! Nothing else (`*`, `a*`, `*.x`) is a pattern. Without `debit`, a `write` user may debit
//! any account; with `debit = []`, none. Anyone with `write` may credit any account. Without
//! `queues`, a user may use every queue; with `queues = []`, none.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkpool_common::bank::{AccountName, AuthToken, ErrorKind, Reply, Request, UserName};
use forkpool_common::queue::{self, QueueError, QueueErrorKind, QueueName};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Failed AUTHs after which a connection is closed.
pub const MAX_AUTH_FAILURES_PER_CONNECTION: u32 = 3;
/// Failed AUTHs one peer may make per [`AUTH_FAILURE_WINDOW`] (per worker).
pub const AUTH_FAILURES_PER_PEER: u32 = 10;
/// The window of [`AUTH_FAILURES_PER_PEER`].
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Peers an [`AuthThrottle`] remembers; past it the oldest window is forgotten.
pub const MAX_THROTTLED_PEERS: usize = 4096;
/// Random bytes in a token from [`generate_token`] (256 bits).
pub const TOKEN_BYTES: usize = 32;

/// The detail of `ERR denied` for a failed AUTH: the same for an unknown user and a wrong
/// token.
pub const AUTH_FAILED_DETAIL: &str = "invalid user or token";
/// The detail of `ERR denied` for an AUTH from a peer over its failure limit.
pub const THROTTLED_DETAIL: &str = "too many failed AUTH attempts from this address; retry later";

/// A SHA-256 digest.
type Digest256 = [u8; 32];

/// Compared with the digest of a token given for an unknown user, so that the unknown user
/// costs the same as a wrong token (no token has this digest that anyone knows of).
const DUMMY_DIGEST: Digest256 = [0x5a; 32];

/// What a user may do (see the matrix in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Rights {
    /// Observe: BALANCE and AUDIT; STATS and QUEUES.
    Read,
    /// Everything `read` may, and DEPOSIT, WITHDRAW, TRANSFER (debits limited by `debit`);
    /// PUT, GET, DONE, JOIN, CONFIG and their variants.
    Write,
}

impl Rights {
    pub fn as_str(self) -> &'static str {
        match self {
            Rights::Read => "read",
            Rights::Write => "write",
        }
    }
}

/// One debit or queue pattern (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountPattern {
    Exact(AccountName),
    /// `prefix.*`: holds `prefix.` (with the dot).
    Prefix(String),
}

/// Why a string is not a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pattern {pattern:?} is neither a name nor NAME.*: {why}")]
pub struct BadPattern {
    pattern: String,
    why: String,
}

impl AccountPattern {
    pub fn parse(text: &str) -> Result<AccountPattern, BadPattern> {
        let bad = |why: String| BadPattern {
            pattern: text.to_string(),
            why,
        };
        match text.strip_suffix(".*") {
            Some(prefix) => {
                AccountName::new(prefix.as_bytes()).map_err(|e| bad(e.to_string()))?;
                Ok(AccountPattern::Prefix(format!("{prefix}.")))
            }
            None => AccountName::new(text.as_bytes())
                .map(AccountPattern::Exact)
                .map_err(|e| bad(e.to_string())),
        }
    }

    pub fn matches(&self, account: &AccountName) -> bool {
        match self {
            AccountPattern::Exact(name) => name == account,
            AccountPattern::Prefix(prefix) => {
                let name = account.as_bytes();
                name.len() > prefix.len() && name.starts_with(prefix.as_bytes())
            }
        }
    }
}

/// The names a user may touch: the accounts it may debit, the queues it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameScope {
    Any,
    Only(Vec<AccountPattern>),
}

impl NameScope {
    pub fn allows(&self, name: &AccountName) -> bool {
        match self {
            NameScope::Any => true,
            NameScope::Only(patterns) => patterns.iter().any(|p| p.matches(name)),
        }
    }

    /// The scope a users-file list gives (`None`: no list, any name).
    fn parse(list: Option<&[String]>) -> Result<NameScope, BadPattern> {
        let Some(list) = list else {
            return Ok(NameScope::Any);
        };
        list.iter()
            .map(|p| AccountPattern::parse(p))
            .collect::<Result<_, _>>()
            .map(NameScope::Only)
    }
}

/// One user of the users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: UserName,
    /// SHA-256 of the token.
    digest: Digest256,
    pub rights: Rights,
    pub debit: NameScope,
    /// The queues the user may use.
    pub queues: NameScope,
    /// Authenticates on a Unix socket by the peer's uid alone.
    pub uid: Option<u32>,
}

/// Every user, by name and by uid, from one reading of the users file.
#[derive(Debug)]
pub struct Users {
    by_name: HashMap<UserName, Arc<User>>,
    by_uid: HashMap<u32, Arc<User>>,
    /// Unique per load in this process: a connection checks its user again only when the
    /// users it authenticated against are not the current ones.
    generation: u64,
}

/// Why the users file was refused; each names the file, the line, and the user if known.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read users file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("users file {path}, line {line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("users file {path}, line {line}, user {user}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        user: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: toml::Spanned<String>,
    token_sha256: toml::Spanned<String>,
    rights: toml::Spanned<Rights>,
    debit: Option<toml::Spanned<Vec<String>>>,
    queues: Option<toml::Spanned<Vec<String>>>,
    uid: Option<toml::Spanned<u32>>,
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

impl Users {
    /// Reads and checks the users file at `path`.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Users::parse(path, &text)
    }

    /// Checks the text of a users file (`path` is for the errors).
    pub fn parse(path: &Path, text: &str) -> Result<Users, UsersError> {
        let line_of =
            |span: Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
        let file: UsersFile = toml::from_str(text).map_err(|e| UsersError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map_or(1, line_of),
            message: e.message().to_string(),
        })?;
        let mut users = Users {
            by_name: HashMap::new(),
            by_uid: HashMap::new(),
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        };
        for entry in file.user {
            let user_name = entry.name.get_ref().clone();
            let invalid = |span: Range<usize>, message: String| UsersError::Invalid {
                path: path.to_path_buf(),
                line: line_of(span),
                user: user_name.clone(),
                message,
            };
            let user = Arc::new(entry_to_user(&entry).map_err(|(span, m)| invalid(span, m))?);
            if users.by_name.contains_key(&user.name) {
                return Err(invalid(
                    entry.name.span(),
                    "a second user of this name".into(),
                ));
            }
            if let Some(uid) = &entry.uid {
                if users.by_uid.contains_key(uid.get_ref()) {
                    let message = format!("uid {} already belongs to another user", uid.get_ref());
                    return Err(invalid(uid.span(), message));
                }
                users.by_uid.insert(*uid.get_ref(), Arc::clone(&user));
            }
            users.by_name.insert(user.name, user);
        }
        Ok(users)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn get(&self, name: &UserName) -> Option<&Arc<User>> {
        self.by_name.get(name)
    }

    /// The user mapped to a Unix peer's uid, if any.
    pub fn by_uid(&self, uid: u32) -> Option<&Arc<User>> {
        self.by_uid.get(&uid)
    }

    /// The user if `token` is its token. Hashes the token and compares 32 bytes in constant
    /// time whether or not the user exists.
    pub fn authenticate(&self, name: &UserName, token: &AuthToken) -> Option<&Arc<User>> {
        let digest = sha256(token.as_bytes());
        let user = self.by_name.get(name);
        let expected = user.map_or(&DUMMY_DIGEST, |user| &user.digest);
        let matches: bool = digest.ct_eq(expected).into();
        user.filter(|_| matches)
    }
}

/// Builds a user from its entry, or says which field is wrong (its span, the message).
fn entry_to_user(entry: &UserEntry) -> Result<User, (Range<usize>, String)> {
    let name = UserName::new(entry.name.get_ref().as_bytes())
        .map_err(|e| (entry.name.span(), format!("invalid user name: {e}")))?;
    let digest = parse_digest(entry.token_sha256.get_ref()).ok_or_else(|| {
        (
            entry.token_sha256.span(),
            "token_sha256 must be 64 hexadecimal digits (a SHA-256 digest)".to_string(),
        )
    })?;
    let rights = *entry.rights.get_ref();
    if let (Some(debit), Rights::Read) = (&entry.debit, rights) {
        return Err((debit.span(), "debit needs rights = \"write\"".to_string()));
    }
    let scope = |field: &'static str, list: &Option<toml::Spanned<Vec<String>>>| {
        NameScope::parse(list.as_ref().map(|l| l.get_ref().as_slice())).map_err(|e| {
            (
                list.as_ref().map_or(0..0, |l| l.span()),
                format!("{field}: {e}"),
            )
        })
    };
    Ok(User {
        name,
        digest,
        rights,
        debit: scope("debit", &entry.debit)?,
        queues: scope("queues", &entry.queues)?,
        uid: entry.uid.as_ref().map(|uid| *uid.get_ref()),
    })
}

fn sha256(bytes: &[u8]) -> Digest256 {
    Sha256::digest(bytes).into()
}

fn parse_digest(hex: &str) -> Option<Digest256> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| char::from(c).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(digest)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a request (or an AUTH) is refused; the text is the detail of `ERR denied`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("authentication required")]
    AuthenticationRequired,
    #[error("user {0} may only read")]
    ReadOnly(UserName),
    /// The account to debit is outside the user's debit patterns.
    #[error("not allowed to debit account {0}")]
    NotYourAccount(AccountName),
    /// The queue is outside the user's queue patterns.
    #[error("not allowed to use queue {0}")]
    NotYourQueue(QueueName),
    #[error("user {0} was removed or its token changed; AUTH again")]
    Revoked(UserName),
    /// A failed AUTH: the same for an unknown user and a wrong token.
    #[error("{AUTH_FAILED_DETAIL}")]
    AuthFailed,
    /// An AUTH from a peer over its failure limit.
    #[error("{THROTTLED_DETAIL}")]
    Throttled,
}

impl Denied {
    /// As the bank says it.
    pub fn reply(&self) -> Reply {
        Reply::error(ErrorKind::Denied, self.to_string())
    }

    /// As the queue says it.
    pub fn queue_error(&self) -> QueueError {
        QueueError::new(QueueErrorKind::Denied, self.to_string())
    }
}

/// What a request needs from the rights matrix (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// PING, QUIT, AUTH: anyone may.
    Nothing,
    /// Observes: any user may, within its queue patterns if it names a queue.
    Read { queue: Option<&'a QueueName> },
    /// Changes: `write` users may, the debited account within their debit patterns and the
    /// queue within their queue patterns.
    Write {
        debit: Option<&'a AccountName>,
        queue: Option<&'a QueueName>,
    },
}

/// A request the rights matrix judges: a bank or a queue request.
pub trait Guarded {
    /// What it needs.
    fn need(&self) -> Need<'_>;
    /// Its verb, for the logs.
    fn verb(&self) -> &'static str;
    /// Its user and token, if it is an AUTH.
    fn credentials(&self) -> Option<(&UserName, &AuthToken)>;
}

impl Guarded for Request {
    /// The credited account is anyone's: only the debited one (WITHDRAW's, a transfer's
    /// source) is checked.
    fn need(&self) -> Need<'_> {
        let debit = match self {
            Request::Ping | Request::Quit | Request::Auth { .. } => return Need::Nothing,
            Request::Balance { .. } | Request::Audit => return Need::Read { queue: None },
            Request::Deposit { .. } => None,
            Request::Withdraw { acct, .. } => Some(acct),
            Request::Transfer { from, .. } => Some(from),
        };
        Need::Write { debit, queue: None }
    }

    fn verb(&self) -> &'static str {
        Request::verb(self)
    }

    fn credentials(&self) -> Option<(&UserName, &AuthToken)> {
        match self {
            Request::Auth { user, token } => Some((user, token)),
            _ => None,
        }
    }
}

impl Guarded for queue::Request<'_> {
    fn need(&self) -> Need<'_> {
        use queue::Request as Q;
        match self {
            Q::Ping | Q::Quit | Q::Auth { .. } => Need::Nothing,
            Q::Stats { .. } | Q::Queues => Need::Read {
                queue: self.queue(),
            },
            Q::Put { .. }
            | Q::PutNowait { .. }
            | Q::Get { .. }
            | Q::GetNowait { .. }
            | Q::Done { .. }
            | Q::Join { .. }
            | Q::Config { .. } => Need::Write {
                debit: None,
                queue: self.queue(),
            },
        }
    }

    fn verb(&self) -> &'static str {
        queue::Request::verb(self)
    }

    fn credentials(&self) -> Option<(&UserName, &AuthToken)> {
        match self {
            queue::Request::Auth { user, token } => Some((user, token)),
            _ => None,
        }
    }
}

/// The rights matrix: may `user` (`None`: not authenticated) make `request`?
pub fn authorize(user: Option<&User>, request: &impl Guarded) -> Result<(), Denied> {
    let (debit, queue) = match request.need() {
        Need::Nothing => return Ok(()),
        Need::Read { queue } => (None, queue),
        Need::Write { debit, queue } => {
            let user = user.ok_or(Denied::AuthenticationRequired)?;
            if user.rights == Rights::Read {
                return Err(Denied::ReadOnly(user.name));
            }
            (debit, queue)
        }
    };
    let user = user.ok_or(Denied::AuthenticationRequired)?;
    if let Some(account) = debit.filter(|account| !user.debit.allows(account)) {
        return Err(Denied::NotYourAccount(*account));
    }
    if let Some(queue) = queue.filter(|queue| !user.queues.allows(queue)) {
        return Err(Denied::NotYourQueue(*queue));
    }
    Ok(())
}

/// Who a connection comes from, for the failure limit and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Ip(IpAddr),
    /// A Unix-socket peer, by its uid.
    Uid(u32),
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Ip(ip) => write!(f, "{ip}"),
            PeerKey::Uid(uid) => write!(f, "uid {uid}"),
        }
    }
}

/// Failed AUTHs per peer in fixed windows: past [`AUTH_FAILURES_PER_PEER`] failures in a
/// window, the peer's AUTHs are refused unchecked until the window ends. One per worker:
/// a peer spread over `n` workers gets `n` times the limit.
#[derive(Debug)]
pub struct AuthThrottle {
    windows: HashMap<PeerKey, FailureWindow>,
    limit: u32,
    window: Duration,
    max_peers: usize,
}

#[derive(Debug, Clone, Copy)]
struct FailureWindow {
    start: Instant,
    failures: u32,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        AuthThrottle::new(
            AUTH_FAILURES_PER_PEER,
            AUTH_FAILURE_WINDOW,
            MAX_THROTTLED_PEERS,
        )
    }
}

impl AuthThrottle {
    pub fn new(limit: u32, window: Duration, max_peers: usize) -> AuthThrottle {
        AuthThrottle {
            windows: HashMap::new(),
            limit,
            window,
            max_peers,
        }
    }

    /// May `peer` try an AUTH at `now`?
    pub fn allows(&self, peer: PeerKey, now: Instant) -> bool {
        self.windows
            .get(&peer)
            .is_none_or(|w| self.expired(w, now) || w.failures < self.limit)
    }

    /// Counts a failed AUTH of `peer`.
    pub fn record_failure(&mut self, peer: PeerKey, now: Instant) {
        if !self.windows.contains_key(&peer) && self.windows.len() >= self.max_peers {
            self.make_room(now);
        }
        let window = self.window;
        let entry = self.windows.entry(peer).or_insert(FailureWindow {
            start: now,
            failures: 0,
        });
        if now.saturating_duration_since(entry.start) >= window {
            *entry = FailureWindow {
                start: now,
                failures: 0,
            };
        }
        entry.failures += 1;
    }

    /// How many peers are remembered.
    #[cfg(test)]
    pub fn peers(&self) -> usize {
        self.windows.len()
    }

    fn expired(&self, window: &FailureWindow, now: Instant) -> bool {
        now.saturating_duration_since(window.start) >= self.window
    }

    /// Forgets the ended windows, or if none has ended, the oldest one.
    fn make_room(&mut self, now: Instant) {
        let window = self.window;
        self.windows
            .retain(|_, w| now.saturating_duration_since(w.start) < window);
        if self.windows.len() >= self.max_peers {
            if let Some(oldest) = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.start)
                .map(|(k, _)| *k)
            {
                self.windows.remove(&oldest);
            }
        }
    }
}

/// One connection's authentication: who it is, checked again after the users change.
#[derive(Debug, Default)]
pub struct ConnAuth {
    user: Option<Authenticated>,
    failures: u32,
}

#[derive(Debug)]
struct Authenticated {
    user: Arc<User>,
    /// The [`Users`] load the user was found in.
    generation: u64,
}

/// What an AUTH came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthAnswer {
    /// The user the connection now is, or why not.
    pub result: Result<UserName, Denied>,
    pub outcome: AuthOutcome,
    /// Close the connection after the reply (too many failures).
    pub close: bool,
}

/// For the metrics: AUTH successes, failures, and refusals of a throttled peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted,
    Failed,
    Throttled,
}

impl ConnAuth {
    /// A connection nobody has authenticated yet.
    pub fn new() -> ConnAuth {
        ConnAuth::default()
    }

    /// A Unix-socket connection: authenticated as the user mapped to the peer's uid, if any.
    pub fn for_peer_uid(users: &Users, uid: u32) -> ConnAuth {
        ConnAuth {
            user: users.by_uid(uid).map(|user| Authenticated {
                user: Arc::clone(user),
                generation: users.generation,
            }),
            failures: 0,
        }
    }

    /// Who the connection is, for a successor worker (lossless hand-over): the user's name
    /// and the digest of the token it authenticated with.
    pub fn export(&self) -> Option<(UserName, [u8; 32])> {
        self.user.as_ref().map(|a| (a.user.name, a.user.digest))
    }

    /// A connection handed over by another worker, authenticated there as `exported`: it
    /// stays authenticated if `users` still has that user with that token, and is logged out
    /// otherwise (removed, or given a new token: the same rule as [`ConnAuth::check`]).
    pub fn resume(users: &Users, exported: Option<(UserName, [u8; 32])>) -> ConnAuth {
        let user = exported.and_then(|(name, digest)| {
            let user = users.get(&name).filter(|user| user.digest == digest)?;
            Some(Authenticated {
                user: Arc::clone(user),
                generation: users.generation,
            })
        });
        ConnAuth { user, failures: 0 }
    }

    /// The user the connection acts as, if any (as of the last check).
    pub fn user_name(&self) -> Option<UserName> {
        self.user.as_ref().map(|a| a.user.name)
    }

    /// The user the connection acts as, if any (as of the last check).
    pub fn user(&self) -> Option<&User> {
        self.user.as_ref().map(|a| &*a.user)
    }

    /// Answers `AUTH name token` from `peer`. A success replaces the connection's user; a
    /// failure leaves it unauthenticated, is logged with the peer, and counts toward the
    /// connection's and the peer's limits.
    pub fn auth(
        &mut self,
        users: &Users,
        throttle: &mut AuthThrottle,
        peer: PeerKey,
        name: &UserName,
        token: &AuthToken,
        now: Instant,
    ) -> AuthAnswer {
        if !throttle.allows(peer, now) {
            self.user = None;
            log::warn!("AUTH as {name} from {peer} refused: too many failures from this peer");
            return AuthAnswer {
                result: Err(Denied::Throttled),
                outcome: AuthOutcome::Throttled,
                close: true,
            };
        }
        if let Some(user) = users.authenticate(name, token) {
            self.user = Some(Authenticated {
                user: Arc::clone(user),
                generation: users.generation,
            });
            return AuthAnswer {
                result: Ok(*name),
                outcome: AuthOutcome::Accepted,
                close: false,
            };
        }
        self.user = None;
        self.failures += 1;
        throttle.record_failure(peer, now);
        let close = self.failures >= MAX_AUTH_FAILURES_PER_CONNECTION;
        log::warn!(
            "AUTH as {name} from {peer} failed ({} on this connection{})",
            self.failures,
            if close { ", closing it" } else { "" }
        );
        AuthAnswer {
            result: Err(Denied::AuthFailed),
            outcome: AuthOutcome::Failed,
            close,
        }
    }

    /// May this connection make `request` (not AUTH: see [`ConnAuth::auth`]) under the
    /// current `users`? A user removed or given a new token since its AUTH is logged out.
    pub fn check(&mut self, users: &Users, request: &impl Guarded) -> Result<(), Denied> {
        if let Some(auth) = &mut self.user {
            if auth.generation != users.generation {
                match users.get(&auth.user.name) {
                    Some(now) if now.digest == auth.user.digest => {
                        auth.user = Arc::clone(now);
                        auth.generation = users.generation;
                    }
                    _ => {
                        let name = auth.user.name;
                        self.user = None;
                        return authorize(None, request).map_err(|_| Denied::Revoked(name));
                    }
                }
            }
        }
        authorize(self.user(), request)
    }
}

/// A new random token: [`TOKEN_BYTES`] from the operating system's random source, in hex.
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(to_hex(&bytes))
}

/// The users-file entry for `name` with `token`: only the token's digest is written.
pub fn user_entry(name: &UserName, token: &str, rights: Rights) -> String {
    format!(
        "[[user]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nrights = \"{}\"\n",
        to_hex(&sha256(token.as_bytes())),
        rights.as_str()
    )
}

/// `forkpool-server gen-token NAME`: prints a new token and the entry to add to the users
/// file. The token is shown once and stored nowhere.
pub fn print_new_token(name: &str, rights: Rights) -> anyhow::Result<()> {
    let name = UserName::new(name.as_bytes())
        .map_err(|e| anyhow::anyhow!("invalid user name {name:?}: {e}"))?;
    let token =
        generate_token().map_err(|e| anyhow::anyhow!("no random bytes from the OS: {e}"))?;
    println!("token: {token}");
    println!("# Give the token to {name}'s client; it is stored nowhere. Add to the users file:");
    print!("{}", user_entry(&name, &token, rights));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkpool_common::bank::parse_request;

    const ALICE_TOKEN: &str = "alice-token-0123456789";
    const READER_TOKEN: &str = "reader-token-0123456789";

    fn digest_hex(token: &str) -> String {
        to_hex(&sha256(token.as_bytes()))
    }

    /// alice (write, debits alice and alice.*, uses queues alice and alice.*, uid 1000),
    /// reader (read), admin (write, any).
    fn users_text() -> String {
        format!(
            "[[user]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\nrights = \"write\"\n\
             debit = [\"alice\", \"alice.*\"]\nqueues = [\"alice\", \"alice.*\"]\nuid = 1000\n\n\
             [[user]]\nname = \"reader\"\ntoken_sha256 = \"{}\"\nrights = \"read\"\n\n\
             [[user]]\nname = \"admin\"\ntoken_sha256 = \"{}\"\nrights = \"write\"\n",
            digest_hex(ALICE_TOKEN),
            digest_hex(READER_TOKEN),
            digest_hex("admin-token"),
        )
    }

    fn users() -> Users {
        Users::parse(Path::new("users.toml"), &users_text()).expect("valid users file")
    }

    fn name(text: &str) -> UserName {
        text.parse().expect("valid user name")
    }

    fn token(text: &str) -> AuthToken {
        AuthToken::new(text.as_bytes()).expect("valid token")
    }

    fn request(line: &str) -> Request {
        parse_request(line.as_bytes()).expect("valid request")
    }

    fn error_of(text: &str) -> String {
        Users::parse(Path::new("/etc/users.toml"), text)
            .expect_err("refused")
            .to_string()
    }

    /// deploy/users.toml parses, and its example tokens authenticate.
    #[test]
    fn the_example_users_file_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/users.toml"));
        let users = Users::load(path).expect("deploy/users.toml is valid");
        assert!(users
            .authenticate(&name("alice"), &token("example-alice-token"))
            .is_some());
        let auditor = users.authenticate(&name("auditor"), &token("example-auditor-token"));
        assert_eq!(auditor.map(|u| u.rights), Some(Rights::Read));
        assert_eq!(users.by_uid(1001).map(|u| u.name), Some(name("auditor")));
    }

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            to_hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_right_token_authenticates_and_nothing_else_does() {
        let users = users();
        assert_eq!(users.len(), 3);
        let alice = users.authenticate(&name("alice"), &token(ALICE_TOKEN));
        assert_eq!(alice.map(|u| u.name), Some(name("alice")));
        assert!(users
            .authenticate(&name("alice"), &token(READER_TOKEN))
            .is_none());
        assert!(users
            .authenticate(&name("nobody"), &token(ALICE_TOKEN))
            .is_none());
        assert!(users
            .authenticate(&name("Alice"), &token(ALICE_TOKEN))
            .is_none());
        let upper = Users::parse(
            Path::new("u.toml"),
            &users_text().replace(
                &digest_hex(ALICE_TOKEN),
                &digest_hex(ALICE_TOKEN).to_uppercase(),
            ),
        )
        .expect("upper-case hex is hex");
        assert!(upper
            .authenticate(&name("alice"), &token(ALICE_TOKEN))
            .is_some());
        assert_eq!(users.by_uid(1000).map(|u| u.name), Some(name("alice")));
        assert!(users.by_uid(0).is_none());
    }

    #[test]
    fn debit_patterns_are_exact_names_or_a_dotted_prefix() {
        let pattern = |p: &str| AccountPattern::parse(p).expect("valid pattern");
        let account = |a: &str| a.parse::<AccountName>().expect("valid account");
        let exact = pattern("alice");
        assert!(exact.matches(&account("alice")));
        for other in ["Alice", "alice.x", "alicex", "alic"] {
            assert!(!exact.matches(&account(other)), "{other}");
        }
        let prefix = pattern("alice.*");
        for yes in ["alice.savings", "alice.a.b", "alice.-"] {
            assert!(prefix.matches(&account(yes)), "{yes}");
        }
        for no in ["alice", "alice.", "alicex.y", "bob.alice.x", "Alice.x"] {
            assert!(!prefix.matches(&account(no)), "{no}");
        }
        assert!(pattern("a.b.*").matches(&account("a.b.c")));
        assert!(!pattern("a.b.*").matches(&account("a.bc")));
        for bad in [
            "*", "a*", "*.x", "a.*.b", ".*", "al ice", "", "a/b.*", "a.**",
        ] {
            assert!(AccountPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A row of a rights matrix: (request, nobody, reader, alice, admin), true = allowed.
    type MatrixRow = (&'static str, bool, bool, bool, bool);

    /// `request`, judged for a user.
    fn authorize_as<R: Guarded>(request: R) -> impl Fn(Option<&User>) -> Result<(), Denied> {
        move |user| authorize(user, &request)
    }

    /// Checks each row of `matrix` for nobody and the users of [`users_text`]; `judge` parses
    /// a row's request.
    fn check_matrix<J>(users: &Users, matrix: &[MatrixRow], judge: impl Fn(&'static str) -> J)
    where
        J: Fn(Option<&User>) -> Result<(), Denied>,
    {
        let who = |n: &str| users.get(&name(n)).map(|u| &**u);
        for &(line, nobody, reader, alice, admin) in matrix {
            let judged = judge(line);
            for (user, allowed) in [
                ("nobody", nobody),
                ("reader", reader),
                ("alice", alice),
                ("admin", admin),
            ] {
                let as_user = if user == "nobody" { None } else { who(user) };
                assert_eq!(judged(as_user).is_ok(), allowed, "{user}: {line}");
            }
        }
    }

    /// Every verb against nobody, a reader, a writer limited to its accounts, and a writer
    /// with no limit.
    #[test]
    fn the_rights_matrix() {
        let users = users();
        let alice = users.get(&name("alice")).map(|u| &**u);
        let reader = users.get(&name("reader")).map(|u| &**u);
        let matrix: [MatrixRow; 13] = [
            ("PING", true, true, true, true),
            ("QUIT", true, true, true, true),
            ("AUTH bob x", true, true, true, true),
            ("BALANCE bob", false, true, true, true),
            ("AUDIT", false, true, true, true),
            ("DEPOSIT bob 1", false, false, true, true),
            ("WITHDRAW alice 1", false, false, true, true),
            ("WITHDRAW alice.savings 1", false, false, true, true),
            ("WITHDRAW bob 1", false, false, false, true),
            ("WITHDRAW alicex 1", false, false, false, true),
            ("TRANSFER alice bob 1", false, false, true, true),
            ("TRANSFER alice.x bob 1", false, false, true, true),
            ("TRANSFER bob alice 1", false, false, false, true),
        ];
        check_matrix(&users, &matrix, |line| authorize_as(request(line)));
        assert_eq!(
            authorize(None, &request("AUDIT")).unwrap_err().reply(),
            Reply::error(ErrorKind::Denied, "authentication required")
        );
        assert_eq!(
            authorize(reader, &request("DEPOSIT a 1"))
                .unwrap_err()
                .to_string(),
            "user reader may only read"
        );
        assert_eq!(
            authorize(alice, &request("TRANSFER bob alice 1"))
                .unwrap_err()
                .to_string(),
            "not allowed to debit account bob"
        );
    }

    fn queue_request(line: &str) -> forkpool_common::queue::Request<'_> {
        forkpool_common::queue::parse_request(line.as_bytes()).expect("valid queue request")
    }

    /// Every queue verb against nobody, a reader, a writer limited to its queues, and a
    /// writer with no limit.
    #[test]
    fn the_queue_rights_matrix() {
        let users = users();
        let who = |n: &str| users.get(&name(n)).map(|u| &**u);
        let (alice, reader) = (who("alice"), who("reader"));
        let matrix: [MatrixRow; 17] = [
            ("PING", true, true, true, true),
            ("QUIT", true, true, true, true),
            ("AUTH bob x", true, true, true, true),
            ("QUEUES", false, true, true, true),
            ("STATS jobs", false, true, false, true),
            ("STATS alice.jobs", false, true, true, true),
            ("PUT alice 0 x y", false, false, true, true),
            ("PUT_NOWAIT alice.a x", false, false, true, true),
            ("GET alice.a", false, false, true, true),
            ("GET_NOWAIT alice.a", false, false, true, true),
            ("JOIN alice 5", false, false, true, true),
            ("CONFIG alice maxsize 3", false, false, true, true),
            ("DONE 7", false, false, true, true),
            ("PUT jobs 0 x", false, false, false, true),
            ("GET alicex", false, false, false, true),
            ("JOIN bob.alice", false, false, false, true),
            ("CONFIG jobs maxsize 1", false, false, false, true),
        ];
        check_matrix(&users, &matrix, |line| authorize_as(queue_request(line)));
        assert_eq!(
            authorize(alice, &queue_request("GET jobs")).map_err(|d| d.queue_error()),
            Err(QueueError::new(
                QueueErrorKind::Denied,
                "not allowed to use queue jobs"
            ))
        );
        assert_eq!(
            authorize(reader, &queue_request("PUT a 0 x"))
                .unwrap_err()
                .to_string(),
            "user reader may only read"
        );
        assert_eq!(
            authorize(None, &queue_request("QUEUES")).unwrap_err(),
            Denied::AuthenticationRequired
        );
    }

    #[test]
    fn queue_patterns_apply_to_read_users_and_an_empty_list_allows_none() {
        let text = format!(
            "[[user]]\nname = \"r\"\ntoken_sha256 = \"{}\"\nrights = \"read\"\nqueues = [\"q.*\"]\n\
             [[user]]\nname = \"w\"\ntoken_sha256 = \"{}\"\nrights = \"write\"\nqueues = []\n",
            digest_hex("t"),
            digest_hex("u")
        );
        let users = Users::parse(Path::new("u.toml"), &text).expect("valid");
        let r = users.get(&name("r")).map(|u| &**u);
        let w = users.get(&name("w")).map(|u| &**u);
        assert!(authorize(r, &queue_request("STATS q.1")).is_ok());
        assert!(authorize(r, &queue_request("STATS q")).is_err());
        assert!(authorize(w, &queue_request("PUT q 0 x")).is_err());
        assert!(authorize(w, &queue_request("DONE 1")).is_ok());
        let bad = text.replace("[\"q.*\"]", "[\"q*\"]");
        let err = Users::parse(Path::new("u.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 5, user r: queues: pattern \"q*\""),
            "{err}"
        );
    }

    #[test]
    fn an_empty_debit_list_allows_deposits_only() {
        let text = format!(
            "[[user]]\nname = \"d\"\ntoken_sha256 = \"{}\"\nrights = \"write\"\ndebit = []\n",
            digest_hex("t")
        );
        let users = Users::parse(Path::new("u.toml"), &text).expect("valid");
        let d = users.get(&name("d")).map(|u| &**u);
        assert!(authorize(d, &request("DEPOSIT x 1")).is_ok());
        assert!(authorize(d, &request("WITHDRAW d 1")).is_err());
    }

    #[test]
    fn bad_users_files_name_the_file_the_line_and_the_user() {
        let good = digest_hex("t");
        let entry = |body: &str| format!("# users\n\n[[user]]\nname = \"bob\"\n{body}");
        let cases = [
            (
                entry(&format!(
                    "token_sha256 = \"{good}\"\nrights = \"write\"\nlevel = 3\n"
                )),
                "line 7: unknown field `level`",
            ),
            (
                entry("token_sha256 = \"abc\"\nrights = \"read\"\n"),
                "line 5, user bob: token_sha256 must be 64 hexadecimal digits",
            ),
            (
                entry(&format!(
                    "token_sha256 = \"{}\"\nrights = \"read\"\n",
                    "g".repeat(64)
                )),
                "line 5, user bob: token_sha256",
            ),
            (
                entry(&format!("token_sha256 = \"{good}\"\nrights = \"admin\"\n")),
                "line 6: unknown variant `admin`",
            ),
            (
                entry(&format!(
                    "token_sha256 = \"{good}\"\nrights = \"read\"\ndebit = [\"bob\"]\n"
                )),
                "line 7, user bob: debit needs rights = \"write\"",
            ),
            (
                entry(&format!(
                    "token_sha256 = \"{good}\"\nrights = \"write\"\ndebit = [\"b*\"]\n"
                )),
                "line 7, user bob: debit: pattern \"b*\"",
            ),
            (
                entry(&format!("token_sha256 = \"{good}\"\n")),
                "missing field `rights`",
            ),
            (
                format!(
                    "{}{}",
                    entry(&format!("token_sha256 = \"{good}\"\nrights = \"read\"\n")),
                    entry(&format!("token_sha256 = \"{good}\"\nrights = \"read\"\n"))
                ),
                "line 10, user bob: a second user of this name",
            ),
            (
                format!(
                    "{}uid = 7\n[[user]]\nname = \"eve\"\ntoken_sha256 = \"{good}\"\n\
                     rights = \"read\"\nuid = 7\n",
                    entry(&format!("token_sha256 = \"{good}\"\nrights = \"read\"\n"))
                ),
                "line 12, user eve: uid 7 already belongs to another user",
            ),
            (
                format!("[[user]]\nname = \"b b\"\ntoken_sha256 = \"{good}\"\nrights = \"read\"\n"),
                "line 2, user b b: invalid user name",
            ),
            ("[[user]\n".to_string(), "line 1"),
        ];
        for (text, says) in cases {
            let message = error_of(&text);
            assert!(
                message.starts_with("users file /etc/users.toml, "),
                "{message}"
            );
            assert!(message.contains(says), "expected {says:?} in {message:?}");
        }
        let empty = Users::parse(Path::new("u.toml"), "").expect("no users is a valid file");
        assert_eq!(empty.len(), 0);
        let err = Users::load(Path::new("/nonexistent/users.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/users.toml"), "{err}");
    }

    #[test]
    fn the_failure_window_limits_each_peer_and_resets() {
        let start = Instant::now();
        let mut throttle = AuthThrottle::new(3, Duration::from_secs(60), 100);
        let peer = PeerKey::Ip("192.0.2.1".parse().expect("an address"));
        let other = PeerKey::Ip("192.0.2.2".parse().expect("an address"));
        for i in 0..3 {
            assert!(throttle.allows(peer, start), "attempt {i}");
            throttle.record_failure(peer, start + Duration::from_secs(i));
        }
        assert!(!throttle.allows(peer, start + Duration::from_secs(59)));
        assert!(throttle.allows(other, start + Duration::from_secs(59)));
        assert!(throttle.allows(peer, start + Duration::from_secs(60)));
        throttle.record_failure(peer, start + Duration::from_secs(60));
        assert!(throttle.allows(peer, start + Duration::from_secs(61)));
    }

    #[test]
    fn the_throttle_remembers_a_bounded_number_of_peers() {
        let start = Instant::now();
        let mut throttle = AuthThrottle::new(1, Duration::from_secs(60), 4);
        let peer = |n: u32| PeerKey::Uid(n);
        for n in 0..4 {
            throttle.record_failure(peer(n), start + Duration::from_secs(u64::from(n)));
        }
        throttle.record_failure(peer(9), start + Duration::from_secs(10));
        assert_eq!(throttle.peers(), 4);
        assert!(
            throttle.allows(peer(0), start + Duration::from_secs(10)),
            "oldest forgotten"
        );
        assert!(!throttle.allows(peer(1), start + Duration::from_secs(10)));
        throttle.record_failure(peer(10), start + Duration::from_secs(65));
        assert_eq!(throttle.peers(), 2, "ended windows are dropped first");
    }

    #[test]
    fn a_connection_closes_after_its_third_failed_auth_and_a_success_switches_user() {
        let users = users();
        let mut throttle = AuthThrottle::default();
        let peer = PeerKey::Ip("127.0.0.1".parse().expect("an address"));
        let now = Instant::now();
        let mut conn = ConnAuth::new();
        let ok = conn.auth(
            &users,
            &mut throttle,
            peer,
            &name("alice"),
            &token(ALICE_TOKEN),
            now,
        );
        assert_eq!(ok.result, Ok(name("alice")));
        assert_eq!((ok.outcome, ok.close), (AuthOutcome::Accepted, false));
        let again = conn.auth(
            &users,
            &mut throttle,
            peer,
            &name("reader"),
            &token(READER_TOKEN),
            now,
        );
        assert_eq!(again.outcome, AuthOutcome::Accepted);
        assert_eq!(conn.user_name(), Some(name("reader")));
        for attempt in 1..=MAX_AUTH_FAILURES_PER_CONNECTION {
            let who = if attempt % 2 == 0 { "alice" } else { "ghost" };
            let answer = conn.auth(
                &users,
                &mut throttle,
                peer,
                &name(who),
                &token("wrong"),
                now,
            );
            assert_eq!(answer.result, Err(Denied::AuthFailed));
            assert_eq!(
                Denied::AuthFailed.reply(),
                Reply::error(ErrorKind::Denied, AUTH_FAILED_DETAIL)
            );
            assert_eq!(answer.outcome, AuthOutcome::Failed);
            assert_eq!(answer.close, attempt == MAX_AUTH_FAILURES_PER_CONNECTION);
            assert_eq!(conn.user_name(), None, "a failed AUTH logs out");
        }
    }

    #[test]
    fn a_peer_over_its_limit_is_refused_without_checking_the_token() {
        let users = users();
        let mut throttle = AuthThrottle::new(2, Duration::from_secs(60), 10);
        let peer = PeerKey::Ip("198.51.100.7".parse().expect("an address"));
        let now = Instant::now();
        for _ in 0..2 {
            let mut conn = ConnAuth::new();
            conn.auth(
                &users,
                &mut throttle,
                peer,
                &name("alice"),
                &token("bad"),
                now,
            );
        }
        let mut conn = ConnAuth::new();
        let answer = conn.auth(
            &users,
            &mut throttle,
            peer,
            &name("alice"),
            &token(ALICE_TOKEN),
            now,
        );
        assert_eq!(answer.outcome, AuthOutcome::Throttled);
        assert_eq!(answer.result, Err(Denied::Throttled));
        assert_eq!(
            Denied::Throttled.queue_error(),
            QueueError::new(QueueErrorKind::Denied, THROTTLED_DETAIL)
        );
        assert!(answer.close);
        assert_eq!(conn.user_name(), None);
    }

    #[test]
    fn a_reload_revokes_removed_users_and_changed_tokens_and_applies_new_rights() {
        let users = users();
        let mut throttle = AuthThrottle::default();
        let peer = PeerKey::Uid(1);
        let now = Instant::now();
        let mut alice = ConnAuth::new();
        alice.auth(
            &users,
            &mut throttle,
            peer,
            &name("alice"),
            &token(ALICE_TOKEN),
            now,
        );
        let mut reader = ConnAuth::new();
        reader.auth(
            &users,
            &mut throttle,
            peer,
            &name("reader"),
            &token(READER_TOKEN),
            now,
        );
        assert!(alice.check(&users, &request("WITHDRAW alice 1")).is_ok());

        // alice becomes read-only; reader's token changes.
        let text = users_text()
            .replace(
                "rights = \"write\"\ndebit = [\"alice\", \"alice.*\"]",
                "rights = \"read\"",
            )
            .replace(&digest_hex(READER_TOKEN), &digest_hex("new-reader-token"));
        let reloaded = Users::parse(Path::new("u.toml"), &text).expect("valid");
        assert_eq!(
            alice.check(&reloaded, &request("WITHDRAW alice 1")),
            Err(Denied::ReadOnly(name("alice")))
        );
        assert!(alice.check(&reloaded, &request("BALANCE alice")).is_ok());
        assert_eq!(
            reader.check(&reloaded, &request("BALANCE x")),
            Err(Denied::Revoked(name("reader")))
        );
        assert_eq!(reader.user_name(), None);
        assert!(reader.check(&reloaded, &request("PING")).is_ok());

        let removed = Users::parse(Path::new("u.toml"), "").expect("valid");
        assert_eq!(
            alice.check(&removed, &request("AUDIT")),
            Err(Denied::Revoked(name("alice")))
        );
        assert_eq!(
            alice.check(&removed, &request("AUDIT")),
            Err(Denied::AuthenticationRequired)
        );
    }

    #[test]
    fn a_unix_peer_is_authenticated_by_its_uid_alone() {
        let users = users();
        let mut mapped = ConnAuth::for_peer_uid(&users, 1000);
        assert_eq!(mapped.user_name(), Some(name("alice")));
        assert!(mapped.check(&users, &request("WITHDRAW alice 5")).is_ok());
        let mut unmapped = ConnAuth::for_peer_uid(&users, 1001);
        assert_eq!(
            unmapped.check(&users, &request("BALANCE a")),
            Err(Denied::AuthenticationRequired)
        );
    }

    #[test]
    fn generated_tokens_are_fresh_256_bit_hex_and_their_entry_authenticates() {
        let first = generate_token().expect("OS randomness");
        let second = generate_token().expect("OS randomness");
        assert_ne!(first, second);
        assert_eq!(first.len(), TOKEN_BYTES * 2);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        let entry = user_entry(&name("carol"), &first, Rights::Write);
        assert!(!entry.contains(&first), "the entry holds the digest only");
        let users = Users::parse(Path::new("u.toml"), &entry).expect("the entry is valid");
        let carol = users.authenticate(&name("carol"), &token(&first));
        assert_eq!(carol.map(|u| u.rights), Some(Rights::Write));
    }
}
