//! The bank line protocol: request parsing, reply formatting, and the reverse directions for the
//! client. Bytes in, values out; no I/O and no ledger.
//!
//! One request per line, one reply line per request, in order. The server calls
//! [`parse_request`] on each line (without its `\n`) and writes a [`Reply`] with
//! [`Reply::write_to`]; forkpool-bench formats requests with [`Request::write_to`] and checks the
//! answers with [`parse_reply`].
//!
//! | request | success reply |
//! | --- | --- |
//! | `DEPOSIT <acct> <amount>` | `OK <balance>` |
//! | `WITHDRAW <acct> <amount>` | `OK <balance>` |
//! | `TRANSFER <from> <to> <amount>` | `OK <from_balance> <to_balance>` |
//! | `BALANCE <acct>` | `OK <balance>` |
//! | `AUDIT` | `OK <total> <accounts>` |
//! | `PING` | `PONG` |
//! | `QUIT` | `BYE` |
//! | `AUTH <user> <token>` | `OK <user>` |
//!
//! Any request may instead be answered `ERR <kind> <detail>`, `<kind>` being one of the words of
//! [`ErrorKind`].
//!
//! # Lexical rules
//! - A trailing `\r` is stripped, so `CRLF` and `LF` line ends mean the same request.
//! - Fields are separated by runs of ASCII spaces or tabs; leading and trailing blanks are
//!   ignored. No other byte separates fields.
//! - Verbs are case-insensitive. Account names are case-sensitive: `alice` and `Alice` are two
//!   accounts.
//! - An account name is 1 to 64 bytes of `[A-Za-z0-9_.-]`.
//! - An amount is a string of ASCII decimal digits (leading zeros allowed) whose value is 1 to
//!   2^63-1. No sign, no fraction, no exponent.
//! - A user name follows the account-name rules (a separate namespace: the user `alice` and
//!   the account `alice` are unrelated until the users file says otherwise).
//! - A token is 1 to 64 bytes of printable ASCII other than the blank (`!` to `~`). A token is
//!   a secret: no reply and no `Debug` output ever quotes it.
//!
//! # Order of checks
//! [`parse_request`] reports the first failure in this order, so every line has exactly one
//! answer:
//! 1. an empty or blank line is `bad-request`;
//! 2. an unknown verb is `unknown-command` (its arguments are not looked at);
//! 3. a wrong number of fields is `bad-request` (the fields themselves are not looked at);
//! 4. the fields, left to right: an invalid name is `bad-account`, an invalid amount
//!    `bad-amount`, an invalid user name or token `bad-request` (the token unquoted);
//! 5. `TRANSFER` from an account to itself is `same-account`. The parser rejects it so that the
//!    ledger never sees such a request; whether the account exists does not matter.
//!
//! Every other failure kind (`no-such-account`, `insufficient-funds`, `overflow`, `ledger-full`,
//! `line-too-long`, `internal`, `denied`) is decided by the server, which builds it with the
//! [`ProtocolError`] constructor of that name.
//!
//! # Error details
//! One style for every detail: an account is written `account 'NAME'`; client input is quoted
//! between `'`, escaped and truncated (below); a limit comes with the setting that sets it
//! (`max_line`, `max_accounts`). The details are for people; programs match the `<kind>` word.
//!
//! # Hostile input
//! Any byte sequence (invalid UTF-8, NUL bytes, megabytes of digits) parses to a value without
//! panicking. Error details that quote client input escape every byte outside printable ASCII
//! (`\xff`) and are truncated, so a reply is always exactly one clean line.

use std::fmt;
use std::str::FromStr;

/// Longest account name, in bytes.
pub const MAX_ACCOUNT_LEN: usize = 64;

/// Largest amount or balance: 2^63-1 minor units.
pub const MAX_AMOUNT: u64 = i64::MAX as u64;

/// How many bytes of client input an error detail quotes before it is cut with `...`.
pub const MAX_QUOTED_INPUT_BYTES: usize = 32;

/// Longest error detail [`Reply::write_to`] writes, in bytes after escaping.
pub const MAX_DETAIL_BYTES: usize = 200;

/// Longest AUTH token, in bytes (a 256-bit token in hex is exactly this long).
pub const MAX_TOKEN_LEN: usize = 64;

/// A validated account name: 1 to [`MAX_ACCOUNT_LEN`] bytes of `[A-Za-z0-9_.-]`,
/// case-sensitive.
///
/// Stored inline (no heap), so it is `Copy` and cheap to pass around. Equality, ordering and
/// hashing look only at the name's bytes.
#[derive(Clone, Copy)]
pub struct AccountName {
    /// Only `bytes[..len]` is meaningful; the rest is kept zero.
    bytes: [u8; MAX_ACCOUNT_LEN],
    /// 1..=MAX_ACCOUNT_LEN.
    len: u8,
}

/// Why a byte string is not an [`AccountName`] (or a [`UserName`], which follows the same
/// rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    /// The name has no bytes.
    #[error("the name is empty")]
    Empty,
    /// The name is longer than [`MAX_ACCOUNT_LEN`] bytes.
    #[error("the name is {0} bytes long, the limit is {MAX_ACCOUNT_LEN}")]
    TooLong(usize),
    /// The name contains a byte outside `[A-Za-z0-9_.-]`.
    #[error("the name contains the byte 0x{0:02x}; allowed are A-Z a-z 0-9 _ . -")]
    BadByte(u8),
}

impl AccountName {
    /// Validates `name`. Never panics, whatever the input.
    pub fn new(name: &[u8]) -> Result<Self, InvalidName> {
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        if name.len() > MAX_ACCOUNT_LEN {
            return Err(InvalidName::TooLong(name.len()));
        }
        if let Some(&bad) = name.iter().find(|&&b| !is_account_byte(b)) {
            return Err(InvalidName::BadByte(bad));
        }
        let mut bytes = [0u8; MAX_ACCOUNT_LEN];
        bytes[..name.len()].copy_from_slice(name);
        Ok(AccountName {
            bytes,
            len: name.len() as u8,
        })
    }

    /// The name's bytes (always ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).expect("account names are validated ASCII")
    }
}

fn is_account_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

impl PartialEq for AccountName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for AccountName {}

impl std::hash::Hash for AccountName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialOrd for AccountName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AccountName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountName({:?})", self.as_str())
    }
}

impl FromStr for AccountName {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AccountName::new(s.as_bytes())
    }
}

/// A validated bank user name (AUTH, the users file): the same alphabet and length as an
/// [`AccountName`], in its own namespace.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserName(AccountName);

impl UserName {
    /// Validates `name` with the account-name rules. Never panics.
    pub fn new(name: &[u8]) -> Result<Self, InvalidName> {
        AccountName::new(name).map(UserName)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserName({:?})", self.as_str())
    }
}

impl FromStr for UserName {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UserName::new(s.as_bytes())
    }
}

/// The secret of an AUTH request: 1 to [`MAX_TOKEN_LEN`] bytes of `!` to `~`, stored inline.
/// Its `Debug` shows only its length, so logging a [`Request`] cannot leak it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthToken {
    /// Only `bytes[..len]` is meaningful; the rest is kept zero.
    bytes: [u8; MAX_TOKEN_LEN],
    /// 1..=MAX_TOKEN_LEN.
    len: u8,
}

/// Why a byte string is not an [`AuthToken`]. The messages never quote the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    #[error("the token is empty")]
    Empty,
    #[error("the token is {0} bytes long, the limit is {MAX_TOKEN_LEN}")]
    TooLong(usize),
    #[error("the token contains a byte outside printable ASCII")]
    BadByte,
}

impl AuthToken {
    /// Validates `token`. Never panics.
    pub fn new(token: &[u8]) -> Result<Self, InvalidToken> {
        if token.is_empty() {
            return Err(InvalidToken::Empty);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(InvalidToken::TooLong(token.len()));
        }
        if !token.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(InvalidToken::BadByte);
        }
        let mut bytes = [0u8; MAX_TOKEN_LEN];
        bytes[..token.len()].copy_from_slice(token);
        Ok(AuthToken {
            bytes,
            len: token.len() as u8,
        })
    }

    /// The token's bytes (to hash them; never to print them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthToken(<{} bytes, not shown>)", self.len)
    }
}

/// One bank request. Amounts are always 1..=[`MAX_AMOUNT`] when produced by [`parse_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// `DEPOSIT <acct> <amount>`: add to the account, opening it if new.
    Deposit { acct: AccountName, amount: u64 },
    /// `WITHDRAW <acct> <amount>`: take from an existing account.
    Withdraw { acct: AccountName, amount: u64 },
    /// `TRANSFER <from> <to> <amount>`: move money, opening `to` if new. `from != to`.
    Transfer {
        from: AccountName,
        to: AccountName,
        amount: u64,
    },
    /// `BALANCE <acct>`.
    Balance { acct: AccountName },
    /// `AUDIT`: sum of all balances and number of accounts, as one snapshot.
    Audit,
    /// `PING`.
    Ping,
    /// `QUIT`: the server answers `BYE` and closes.
    Quit,
    /// `AUTH <user> <token>`: become `user` on this connection (when the server has users).
    Auth { user: UserName, token: AuthToken },
}

impl Request {
    /// The request's verb as it is written on the wire (upper case).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Deposit { .. } => "DEPOSIT",
            Request::Withdraw { .. } => "WITHDRAW",
            Request::Transfer { .. } => "TRANSFER",
            Request::Balance { .. } => "BALANCE",
            Request::Audit => "AUDIT",
            Request::Ping => "PING",
            Request::Quit => "QUIT",
            Request::Auth { .. } => "AUTH",
        }
    }

    /// Appends the request as one line ending in `\n` (upper-case verb, single spaces), the
    /// canonical form that [`parse_request`] reads back to the same value. Never allocates
    /// beyond growing `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.verb().as_bytes());
        match self {
            Request::Deposit { acct, amount } | Request::Withdraw { acct, amount } => {
                push_field(out, acct.as_bytes());
                push_u64_field(out, *amount);
            }
            Request::Transfer { from, to, amount } => {
                push_field(out, from.as_bytes());
                push_field(out, to.as_bytes());
                push_u64_field(out, *amount);
            }
            Request::Balance { acct } => push_field(out, acct.as_bytes()),
            Request::Auth { user, token } => {
                push_field(out, user.as_str().as_bytes());
                push_field(out, token.as_bytes());
            }
            Request::Audit | Request::Ping | Request::Quit => {}
        }
        out.push(b'\n');
    }
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.push(b' ');
    out.extend_from_slice(field);
}

fn push_u64_field(out: &mut Vec<u8>, n: u64) {
    out.push(b' ');
    push_decimal(out, u128::from(n));
}

/// Appends `n` in decimal without going through `fmt` (no allocation, no formatter machinery).
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u128) {
    // u128::MAX has 39 decimal digits.
    let mut digits = [0u8; 39];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The failure words of the protocol, exactly as they appear after `ERR `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `unknown-command`: the verb is not one of the protocol's.
    UnknownCommand,
    /// `bad-request`: empty line, or missing or extra fields.
    BadRequest,
    /// `bad-account`: an account field is not a valid name.
    BadAccount,
    /// `bad-amount`: an amount field is not a whole number in 1..=2^63-1.
    BadAmount,
    /// `line-too-long`: the server's line limit was exceeded; the server closes afterwards.
    LineTooLong,
    /// `no-such-account`: the account was never opened.
    NoSuchAccount,
    /// `insufficient-funds`: the balance is smaller than the amount.
    InsufficientFunds,
    /// `same-account`: a transfer from an account to itself.
    SameAccount,
    /// `overflow`: the resulting balance would exceed 2^63-1; nothing changed.
    Overflow,
    /// `ledger-full`: no room for a new account.
    LedgerFull,
    /// `internal`: the server could not serve the request (a damaged ledger lock); nothing
    /// changed, and the operator has been told.
    Internal,
    /// `denied`: authentication failed or is required, or the user lacks the right; nothing
    /// changed.
    Denied,
    /// `unavailable`: the ledger's database could not be reached or did not answer in time;
    /// the request was not applied (a request whose commit may have taken effect is never
    /// answered this way).
    Unavailable,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::UnknownCommand,
        ErrorKind::BadRequest,
        ErrorKind::BadAccount,
        ErrorKind::BadAmount,
        ErrorKind::LineTooLong,
        ErrorKind::NoSuchAccount,
        ErrorKind::InsufficientFunds,
        ErrorKind::SameAccount,
        ErrorKind::Overflow,
        ErrorKind::LedgerFull,
        ErrorKind::Internal,
        ErrorKind::Denied,
        ErrorKind::Unavailable,
    ];

    /// The protocol word, e.g. `"bad-amount"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::UnknownCommand => "unknown-command",
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::BadAccount => "bad-account",
            ErrorKind::BadAmount => "bad-amount",
            ErrorKind::LineTooLong => "line-too-long",
            ErrorKind::NoSuchAccount => "no-such-account",
            ErrorKind::InsufficientFunds => "insufficient-funds",
            ErrorKind::SameAccount => "same-account",
            ErrorKind::Overflow => "overflow",
            ErrorKind::LedgerFull => "ledger-full",
            ErrorKind::Internal => "internal",
            ErrorKind::Denied => "denied",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word after `ERR ` that is not one of [`ErrorKind`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error kind {0:?}")]
pub struct UnknownErrorKind(pub String);

impl FromStr for ErrorKind {
    type Err = UnknownErrorKind;

    /// Exact, case-sensitive match of the protocol word.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownErrorKind(escape_for_reply(s.as_bytes(), MAX_QUOTED_INPUT_BYTES)))
    }
}

/// A request that cannot be carried out, as a value: `kind` maps one-to-one onto the `ERR`
/// word, `detail` is a human-readable sentence that is already safe to put on a reply line
/// (printable ASCII; quoted client input escaped and truncated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct ProtocolError {
    pub kind: ErrorKind,
    pub detail: String,
}

impl ProtocolError {
    /// Builds an error; `detail` is written as given (it is escaped again when written to a
    /// reply, so it cannot break the line).
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ProtocolError {
            kind,
            detail: detail.into(),
        }
    }
}

/// The error details, written once so that every reply says things the same way: an account
/// is always `account 'NAME'`, client input is quoted between `'` (escaped and truncated), and a
/// limit is given with the setting that sets it.
impl ProtocolError {
    /// `same-account`: `TRANSFER` from `acct` to itself.
    pub fn same_account(acct: &AccountName) -> Self {
        ProtocolError::new(
            ErrorKind::SameAccount,
            format!("cannot transfer from {} to itself", account(acct)),
        )
    }

    /// `no-such-account`: `acct` was never opened.
    pub fn no_such_account(acct: &AccountName) -> Self {
        ProtocolError::new(
            ErrorKind::NoSuchAccount,
            format!("{} does not exist", account(acct)),
        )
    }

    /// `insufficient-funds`: `acct` holds less than the amount taken from it.
    pub fn insufficient_funds(acct: &AccountName) -> Self {
        ProtocolError::new(
            ErrorKind::InsufficientFunds,
            format!("{} holds less than the amount", account(acct)),
        )
    }

    /// `overflow`: crediting `acct` would take its balance above [`MAX_AMOUNT`].
    pub fn overflow(acct: &AccountName) -> Self {
        ProtocolError::new(
            ErrorKind::Overflow,
            format!("the balance of {} would exceed {MAX_AMOUNT}", account(acct)),
        )
    }

    /// `ledger-full`: `acct` is new and the ledger already holds `capacity` accounts.
    pub fn ledger_full(acct: &AccountName, capacity: u64) -> Self {
        ProtocolError::new(
            ErrorKind::LedgerFull,
            format!(
                "cannot open {}: the ledger holds its limit of {capacity} accounts \
                 (the max_accounts setting)",
                account(acct)
            ),
        )
    }

    /// `line-too-long`: a request line exceeded `max_line` bytes; the server closes next.
    pub fn line_too_long(max_line: usize) -> Self {
        ProtocolError::new(
            ErrorKind::LineTooLong,
            format!("request line longer than {max_line} bytes (the max_line setting); closing"),
        )
    }

    /// A ledger's refusal of `request` with `kind`, naming the account it is about: the
    /// debited one (WITHDRAW's, BALANCE's, a transfer's source) for `no-such-account`,
    /// `insufficient-funds` and `same-account`; the credited one (DEPOSIT's, a transfer's
    /// destination) for `overflow` and `ledger-full` (with the ledger's `capacity`). Every
    /// ledger backend answers with it, so their replies are byte-identical.
    pub fn refusal(kind: ErrorKind, request: &Request, capacity: u64) -> Self {
        let (debited, credited) = match *request {
            Request::Deposit { acct, .. } => (None, Some(acct)),
            Request::Withdraw { acct, .. } | Request::Balance { acct } => (Some(acct), None),
            Request::Transfer { from, to, .. } => (Some(from), Some(to)),
            Request::Audit | Request::Ping | Request::Quit | Request::Auth { .. } => (None, None),
        };
        match (kind, debited, credited) {
            (ErrorKind::NoSuchAccount, Some(acct), _) => Self::no_such_account(&acct),
            (ErrorKind::InsufficientFunds, Some(acct), _) => Self::insufficient_funds(&acct),
            (ErrorKind::SameAccount, Some(acct), _) => Self::same_account(&acct),
            (ErrorKind::Overflow, _, Some(acct)) => Self::overflow(&acct),
            (ErrorKind::LedgerFull, _, Some(acct)) => Self::ledger_full(&acct, capacity),
            // The parser rejects these first; a ledger that sees one anyway says so.
            (ErrorKind::BadAmount, ..) => ProtocolError::new(
                ErrorKind::BadAmount,
                format!("amount must be a whole number from 1 to {MAX_AMOUNT}"),
            ),
            (kind, ..) => {
                ProtocolError::new(kind, format!("the ledger refused {}", request.verb()))
            }
        }
    }

    /// `unavailable`: the ledger's database did not answer within `deadline`; nothing
    /// changed. `cause` is the latest connection or database error.
    pub fn unavailable(deadline: std::time::Duration, cause: &str) -> Self {
        ProtocolError::new(
            ErrorKind::Unavailable,
            format!(
                "the ledger database did not answer within {} ms ({cause}); nothing changed",
                deadline.as_millis()
            ),
        )
    }

    /// `internal`: the ledger could not serve the request (a damaged lock); nothing changed.
    pub fn internal() -> Self {
        ProtocolError::new(
            ErrorKind::Internal,
            "the ledger cannot serve this request; nothing changed",
        )
    }
}

/// How every error detail names an account.
fn account(acct: &AccountName) -> String {
    format!("account '{acct}'")
}

impl From<ProtocolError> for Reply {
    fn from(e: ProtocolError) -> Self {
        Reply::Err {
            kind: e.kind,
            detail: e.detail,
        }
    }
}

/// Escapes `input` for quoting in an error detail: printable ASCII except `\` is kept, `\` is
/// written `\\`, every other byte `\xHH`. At most `max_input` input bytes are quoted; a longer
/// input is cut and ends in `...`.
pub fn escape_for_reply(input: &[u8], max_input: usize) -> String {
    let cut = input.len() > max_input;
    let shown = &input[..input.len().min(max_input)];
    let mut s = String::with_capacity(shown.len() + 3);
    for &b in shown {
        match b {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                s.push_str("\\x");
                s.push(char::from(HEX[usize::from(b >> 4)]));
                s.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
    if cut {
        s.push_str("...");
    }
    s
}

pub(crate) fn quote(input: &[u8]) -> String {
    escape_for_reply(input, MAX_QUOTED_INPUT_BYTES)
}

/// Parses one request line. `line` excludes the `\n`; one trailing `\r` is stripped. See the
/// module docs for the lexical rules and the order in which failures are reported. Never
/// panics; allocates only to build an error.
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // At most 4 fields are meaningful; one more tells "too many" apart.
    const MAX_FIELDS: usize = 4;
    let mut fields: [&[u8]; MAX_FIELDS] = [&[]; MAX_FIELDS];
    let mut count = 0usize;
    for field in line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|f| !f.is_empty())
    {
        if count < MAX_FIELDS {
            fields[count] = field;
        }
        count += 1;
        if count > MAX_FIELDS {
            break;
        }
    }
    if count == 0 {
        return Err(ProtocolError::new(ErrorKind::BadRequest, "empty request"));
    }
    let verb = Verb::parse(fields[0]).ok_or_else(|| {
        ProtocolError::new(
            ErrorKind::UnknownCommand,
            format!("unknown command '{}'", quote(fields[0])),
        )
    })?;
    let args = count - 1;
    if args != verb.arity() {
        let got = if count > MAX_FIELDS {
            "more".to_string()
        } else {
            args.to_string()
        };
        return Err(ProtocolError::new(
            ErrorKind::BadRequest,
            format!(
                "{} takes {} argument{}{}, got {got}",
                verb.name(),
                verb.arity(),
                if verb.arity() == 1 { "" } else { "s" },
                verb.usage(),
            ),
        ));
    }
    let req = match verb {
        Verb::Deposit => Request::Deposit {
            acct: parse_account(fields[1])?,
            amount: parse_amount(fields[2])?,
        },
        Verb::Withdraw => Request::Withdraw {
            acct: parse_account(fields[1])?,
            amount: parse_amount(fields[2])?,
        },
        Verb::Transfer => {
            let from = parse_account(fields[1])?;
            let to = parse_account(fields[2])?;
            let amount = parse_amount(fields[3])?;
            if from == to {
                return Err(ProtocolError::same_account(&from));
            }
            Request::Transfer { from, to, amount }
        }
        Verb::Balance => Request::Balance {
            acct: parse_account(fields[1])?,
        },
        Verb::Audit => Request::Audit,
        Verb::Ping => Request::Ping,
        Verb::Quit => Request::Quit,
        Verb::Auth => Request::Auth {
            user: parse_user(fields[1])?,
            token: parse_token(fields[2])?,
        },
    };
    Ok(req)
}

/// The verbs, for the arity check that precedes field validation.
#[derive(Clone, Copy)]
enum Verb {
    Deposit,
    Withdraw,
    Transfer,
    Balance,
    Audit,
    Ping,
    Quit,
    Auth,
}

impl Verb {
    const ALL: [Verb; 8] = [
        Verb::Deposit,
        Verb::Withdraw,
        Verb::Transfer,
        Verb::Balance,
        Verb::Audit,
        Verb::Ping,
        Verb::Quit,
        Verb::Auth,
    ];

    fn parse(word: &[u8]) -> Option<Verb> {
        Verb::ALL
            .into_iter()
            .find(|v| v.name().as_bytes().eq_ignore_ascii_case(word))
    }

    fn name(self) -> &'static str {
        match self {
            Verb::Deposit => "DEPOSIT",
            Verb::Withdraw => "WITHDRAW",
            Verb::Transfer => "TRANSFER",
            Verb::Balance => "BALANCE",
            Verb::Audit => "AUDIT",
            Verb::Ping => "PING",
            Verb::Quit => "QUIT",
            Verb::Auth => "AUTH",
        }
    }

    fn arity(self) -> usize {
        match self {
            Verb::Deposit | Verb::Withdraw | Verb::Auth => 2,
            Verb::Transfer => 3,
            Verb::Balance => 1,
            Verb::Audit | Verb::Ping | Verb::Quit => 0,
        }
    }

    fn usage(self) -> &'static str {
        match self {
            Verb::Deposit | Verb::Withdraw => " (<acct> <amount>)",
            Verb::Transfer => " (<from> <to> <amount>)",
            Verb::Balance => " (<acct>)",
            Verb::Auth => " (<user> <token>)",
            Verb::Audit | Verb::Ping | Verb::Quit => "",
        }
    }
}

fn parse_account(field: &[u8]) -> Result<AccountName, ProtocolError> {
    AccountName::new(field).map_err(|why| {
        ProtocolError::new(
            ErrorKind::BadAccount,
            format!("invalid account name '{}': {why}", quote(field)),
        )
    })
}

pub(crate) fn parse_user(field: &[u8]) -> Result<UserName, ProtocolError> {
    UserName::new(field).map_err(|why| {
        ProtocolError::new(
            ErrorKind::BadRequest,
            format!("invalid user name '{}': {why}", quote(field)),
        )
    })
}

/// The token is a secret: the error says what is wrong with it, never what it was.
pub(crate) fn parse_token(field: &[u8]) -> Result<AuthToken, ProtocolError> {
    AuthToken::new(field)
        .map_err(|why| ProtocolError::new(ErrorKind::BadRequest, format!("invalid token: {why}")))
}

/// Parses an amount field: ASCII digits only, value 1..=[`MAX_AMOUNT`]. Leading zeros are
/// accepted; a digit string of any length is handled without overflow.
pub fn parse_amount(field: &[u8]) -> Result<u64, ProtocolError> {
    let bad = || {
        ProtocolError::new(
            ErrorKind::BadAmount,
            format!(
                "invalid amount '{}': a whole number from 1 to {MAX_AMOUNT} is expected",
                quote(field)
            ),
        )
    };
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let significant = &field[field.iter().take_while(|&&b| b == b'0').count()..];
    // 19 digits always fit in a u64 (u64::MAX has 20); more are certainly above MAX_AMOUNT.
    if significant.len() > 19 {
        return Err(bad());
    }
    let value = significant
        .iter()
        .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
    if value == 0 || value > MAX_AMOUNT {
        return Err(bad());
    }
    Ok(value)
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK <balance>`: DEPOSIT, WITHDRAW, BALANCE.
    Ok(u64),
    /// `OK <from_balance> <to_balance>`: TRANSFER.
    OkPair(u64, u64),
    /// `OK <total> <accounts>`: AUDIT. The total can exceed 2^63-1, hence u128.
    Audit { total: u128, accounts: u64 },
    /// `PONG`.
    Pong,
    /// `BYE`: answer to QUIT, after which the server closes.
    Bye,
    /// `OK <user>`: AUTH succeeded; the connection now acts as `user`.
    Authenticated(UserName),
    /// `ERR <kind> <detail>`.
    Err { kind: ErrorKind, detail: String },
}

impl Reply {
    /// An error reply.
    pub fn error(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Reply::Err {
            kind,
            detail: detail.into(),
        }
    }

    /// Appends the reply as exactly one line ending in `\n`. An error detail is written with
    /// every byte outside printable ASCII escaped (`\xHH`) and is cut at [`MAX_DETAIL_BYTES`],
    /// so the line is clean whatever the detail holds; an empty detail writes `ERR <kind>`.
    /// Success replies never allocate beyond growing `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Ok(balance) => {
                out.extend_from_slice(b"OK ");
                push_decimal(out, u128::from(*balance));
            }
            Reply::OkPair(a, b) => {
                out.extend_from_slice(b"OK ");
                push_decimal(out, u128::from(*a));
                out.push(b' ');
                push_decimal(out, u128::from(*b));
            }
            Reply::Audit { total, accounts } => {
                out.extend_from_slice(b"OK ");
                push_decimal(out, *total);
                out.push(b' ');
                push_decimal(out, u128::from(*accounts));
            }
            Reply::Pong => out.extend_from_slice(b"PONG"),
            Reply::Bye => out.extend_from_slice(b"BYE"),
            Reply::Authenticated(user) => {
                out.extend_from_slice(b"OK ");
                out.extend_from_slice(user.as_str().as_bytes());
            }
            Reply::Err { kind, detail } => {
                out.extend_from_slice(b"ERR ");
                out.extend_from_slice(kind.as_str().as_bytes());
                if !detail.is_empty() {
                    out.push(b' ');
                    write_clean_detail(out, detail.as_bytes());
                }
            }
        }
        out.push(b'\n');
    }
}

/// Writes `detail` keeping printable ASCII (a `\` stays as it is, so an already escaped detail
/// is not escaped twice) and `\xHH` for everything else, at most [`MAX_DETAIL_BYTES`] bytes.
pub(crate) fn write_clean_detail(out: &mut Vec<u8>, detail: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    const ELLIPSIS: &[u8] = b"...";
    let start = out.len();
    for &b in detail {
        let width = if (0x20..=0x7e).contains(&b) { 1 } else { 4 };
        if out.len() - start + width > MAX_DETAIL_BYTES - ELLIPSIS.len() {
            out.extend_from_slice(ELLIPSIS);
            return;
        }
        if width == 1 {
            out.push(b);
        } else {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        }
    }
}

/// A reply line that is not a well-formed answer to the request it was matched with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reply '{line}' does not answer {verb}: expected {expected}")]
pub struct ReplyParseError {
    /// The offending line, escaped and truncated.
    pub line: String,
    /// The verb of the request it was matched with.
    pub verb: &'static str,
    /// The shape that was expected.
    pub expected: &'static str,
}

/// Parses the reply line to `req` (without its `\n`; no `\r` is accepted: the server writes
/// bare `\n`). `OK a b` means a transfer's two balances or an audit's total and count depending
/// on `req`, hence the argument. Strict: canonical decimals (no sign, no leading zeros),
/// balances at most 2^63-1, single spaces, and an `ERR` word from [`ErrorKind`]; any request may
/// be answered with `ERR`. Never panics.
pub fn parse_reply(req: &Request, line: &[u8]) -> Result<Reply, ReplyParseError> {
    let expected = match req {
        Request::Deposit { .. } | Request::Withdraw { .. } | Request::Balance { .. } => {
            "OK <balance> or ERR <kind> <detail>"
        }
        Request::Transfer { .. } => "OK <from_balance> <to_balance> or ERR <kind> <detail>",
        Request::Audit => "OK <total> <accounts> or ERR <kind> <detail>",
        Request::Ping => "PONG or ERR <kind> <detail>",
        Request::Quit => "BYE or ERR <kind> <detail>",
        Request::Auth { .. } => "OK <user> or ERR <kind> <detail>",
    };
    let fail = || ReplyParseError {
        line: quote(line),
        verb: req.verb(),
        expected,
    };
    if let Some(rest) = line.strip_prefix(b"ERR ") {
        let (word, detail) = match rest.iter().position(|&b| b == b' ') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let kind = std::str::from_utf8(word)
            .ok()
            .and_then(|w| w.parse::<ErrorKind>().ok())
            .ok_or_else(fail)?;
        let detail = std::str::from_utf8(detail).map_err(|_| fail())?;
        return Ok(Reply::Err {
            kind,
            detail: detail.to_string(),
        });
    }
    let reply = match req {
        Request::Ping => (line == b"PONG").then_some(Reply::Pong),
        Request::Quit => (line == b"BYE").then_some(Reply::Bye),
        Request::Auth { .. } => line
            .strip_prefix(b"OK ")
            .and_then(|name| UserName::new(name).ok())
            .map(Reply::Authenticated),
        _ => {
            let mut nums = line
                .strip_prefix(b"OK ")
                .ok_or_else(fail)?
                .split(|&b| b == b' ');
            let first = nums.next().and_then(parse_canonical).ok_or_else(fail)?;
            let second = nums.next().map(|n| parse_canonical(n).ok_or_else(fail));
            if nums.next().is_some() {
                return Err(fail());
            }
            let balance = |n: u128| u64::try_from(n).ok().filter(|&b| b <= MAX_AMOUNT);
            match (req, second) {
                (Request::Transfer { .. }, Some(b)) => balance(first)
                    .zip(balance(b?))
                    .map(|(a, b)| Reply::OkPair(a, b)),
                (Request::Audit, Some(n)) => u64::try_from(n?).ok().map(|accounts| Reply::Audit {
                    total: first,
                    accounts,
                }),
                (
                    Request::Deposit { .. } | Request::Withdraw { .. } | Request::Balance { .. },
                    None,
                ) => balance(first).map(Reply::Ok),
                _ => None,
            }
        }
    };
    reply.ok_or_else(fail)
}

/// A canonical unsigned decimal that fits a u128: digits only, no leading zero unless it is `0`.
fn parse_canonical(digits: &[u8]) -> Option<u128> {
    if digits.is_empty() || digits.len() > 39 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return None;
    }
    digits.iter().try_fold(0u128, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u128::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acct(s: &str) -> AccountName {
        s.parse().expect("test account names are valid")
    }

    fn err(line: &[u8]) -> (ErrorKind, String) {
        let e = parse_request(line).expect_err("line should be rejected");
        (e.kind, e.detail)
    }

    fn kind(line: &[u8]) -> ErrorKind {
        err(line).0
    }

    fn reply_line(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).expect("replies are ASCII")
    }

    fn request_line(r: &Request) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).expect("requests are ASCII")
    }

    #[test]
    fn account_names_accept_the_allowed_alphabet_up_to_64_bytes() {
        let name = "aZ09_.-";
        assert_eq!(acct(name).as_bytes(), name.as_bytes());
        assert_eq!(acct(name).to_string(), name);
        let long = "x".repeat(64);
        assert_eq!(acct(&long).as_str(), long);
    }

    #[test]
    fn account_names_reject_empty_long_and_foreign_bytes() {
        assert_eq!(AccountName::new(b""), Err(InvalidName::Empty));
        assert_eq!(
            AccountName::new("x".repeat(65).as_bytes()),
            Err(InvalidName::TooLong(65))
        );
        assert_eq!(AccountName::new(b"a b"), Err(InvalidName::BadByte(b' ')));
        assert_eq!(AccountName::new(b"a/b"), Err(InvalidName::BadByte(b'/')));
        assert_eq!(
            AccountName::new("é".as_bytes()),
            Err(InvalidName::BadByte(0xc3))
        );
        assert_eq!(AccountName::new(b"a\0"), Err(InvalidName::BadByte(0)));
    }

    #[test]
    fn account_names_are_case_sensitive_and_compare_by_bytes() {
        assert_ne!(acct("alice"), acct("Alice"));
        assert_eq!(acct("bob"), AccountName::new(b"bob").expect("valid"));
        assert!(acct("a") < acct("b"));
        assert_eq!(format!("{:?}", acct("bob")), "AccountName(\"bob\")");
    }

    #[test]
    fn every_verb_parses() {
        assert_eq!(
            parse_request(b"DEPOSIT alice 100"),
            Ok(Request::Deposit {
                acct: acct("alice"),
                amount: 100
            })
        );
        assert_eq!(
            parse_request(b"WITHDRAW alice 7"),
            Ok(Request::Withdraw {
                acct: acct("alice"),
                amount: 7
            })
        );
        assert_eq!(
            parse_request(b"TRANSFER alice bob 5"),
            Ok(Request::Transfer {
                from: acct("alice"),
                to: acct("bob"),
                amount: 5
            })
        );
        assert_eq!(
            parse_request(b"BALANCE alice"),
            Ok(Request::Balance {
                acct: acct("alice")
            })
        );
        assert_eq!(parse_request(b"AUDIT"), Ok(Request::Audit));
        assert_eq!(parse_request(b"PING"), Ok(Request::Ping));
        assert_eq!(parse_request(b"QUIT"), Ok(Request::Quit));
    }

    #[test]
    fn verbs_are_case_insensitive_and_names_are_not_folded() {
        assert_eq!(
            parse_request(b"dEpOsIt Alice 1"),
            Ok(Request::Deposit {
                acct: acct("Alice"),
                amount: 1
            })
        );
        assert_eq!(parse_request(b"ping"), Ok(Request::Ping));
        assert_eq!(parse_request(b"Quit"), Ok(Request::Quit));
    }

    #[test]
    fn blanks_crlf_and_tabs_are_tolerated() {
        let want = Ok(Request::Deposit {
            acct: acct("a"),
            amount: 5,
        });
        assert_eq!(parse_request(b"DEPOSIT a 5\r"), want);
        assert_eq!(parse_request(b"  DEPOSIT   a \t 5  "), want);
        assert_eq!(parse_request(b"\tDEPOSIT\ta\t5\t\r"), want);
        assert_eq!(parse_request(b"PING\r"), Ok(Request::Ping));
    }

    #[test]
    fn only_one_trailing_cr_is_stripped() {
        assert_eq!(kind(b"PING\r\r"), ErrorKind::UnknownCommand);
        assert_eq!(kind(b"DEPOSIT a 5\r\r"), ErrorKind::BadAmount);
        assert_eq!(kind(b"PI\rNG"), ErrorKind::UnknownCommand);
    }

    #[test]
    fn empty_and_blank_lines_are_bad_requests() {
        for line in [&b""[..], b"\r", b"   ", b" \t \r"] {
            assert_eq!(
                err(line),
                (ErrorKind::BadRequest, "empty request".to_string())
            );
        }
    }

    #[test]
    fn unknown_verbs_are_reported_with_the_verb_escaped() {
        assert_eq!(
            err(b"FROB a b c d e"),
            (
                ErrorKind::UnknownCommand,
                "unknown command 'FROB'".to_string()
            )
        );
        assert_eq!(
            err(b"\xff\x00x"),
            (
                ErrorKind::UnknownCommand,
                "unknown command '\\xff\\x00x'".to_string()
            )
        );
        assert_eq!(
            err(b"DEPOSITS a 1"),
            (
                ErrorKind::UnknownCommand,
                "unknown command 'DEPOSITS'".to_string()
            )
        );
    }

    #[test]
    fn wrong_arity_is_bad_request_before_fields_are_checked() {
        assert_eq!(
            err(b"DEPOSIT a"),
            (
                ErrorKind::BadRequest,
                "DEPOSIT takes 2 arguments (<acct> <amount>), got 1".to_string()
            )
        );
        assert_eq!(
            err(b"deposit a 1 2"),
            (
                ErrorKind::BadRequest,
                "DEPOSIT takes 2 arguments (<acct> <amount>), got 3".to_string()
            )
        );
        assert_eq!(
            err(b"TRANSFER a b c d e f"),
            (
                ErrorKind::BadRequest,
                "TRANSFER takes 3 arguments (<from> <to> <amount>), got more".to_string()
            )
        );
        assert_eq!(
            err(b"BALANCE"),
            (
                ErrorKind::BadRequest,
                "BALANCE takes 1 argument (<acct>), got 0".to_string()
            )
        );
        assert_eq!(
            err(b"PING now"),
            (
                ErrorKind::BadRequest,
                "PING takes 0 arguments, got 1".to_string()
            )
        );
        assert_eq!(kind(b"AUDIT x"), ErrorKind::BadRequest);
        assert_eq!(kind(b"QUIT x"), ErrorKind::BadRequest);
        assert_eq!(kind(b"WITHDRAW !! -1 extra"), ErrorKind::BadRequest);
    }

    #[test]
    fn bad_accounts_are_reported_with_the_reason() {
        assert_eq!(
            err(b"DEPOSIT a/b 1"),
            (
                ErrorKind::BadAccount,
                "invalid account name 'a/b': the name contains the byte 0x2f; \
                 allowed are A-Z a-z 0-9 _ . -"
                    .to_string()
            )
        );
        let long = format!("BALANCE {}", "y".repeat(65));
        assert_eq!(
            err(long.as_bytes()),
            (
                ErrorKind::BadAccount,
                format!(
                    "invalid account name '{}...': the name is 65 bytes long, the limit is 64",
                    "y".repeat(32)
                )
            )
        );
        assert_eq!(kind(b"WITHDRAW \xc3\xa9 1"), ErrorKind::BadAccount);
        assert_eq!(kind(b"TRANSFER a b\x00 1"), ErrorKind::BadAccount);
    }

    #[test]
    fn fields_are_checked_left_to_right() {
        assert_eq!(kind(b"TRANSFER !a !b 0"), ErrorKind::BadAccount);
        assert!(err(b"TRANSFER a !b 0").1.contains("'!b'"));
        assert_eq!(kind(b"TRANSFER a b 0"), ErrorKind::BadAmount);
        assert_eq!(kind(b"DEPOSIT ! 0"), ErrorKind::BadAccount);
        assert_eq!(kind(b"TRANSFER a a 0"), ErrorKind::BadAmount);
    }

    #[test]
    fn transfer_to_the_same_account_is_rejected_after_the_fields() {
        assert_eq!(
            err(b"TRANSFER a a 5"),
            (
                ErrorKind::SameAccount,
                "cannot transfer from account 'a' to itself".to_string()
            )
        );
        assert!(parse_request(b"TRANSFER a A 5").is_ok());
    }

    #[test]
    fn amounts_accept_1_to_i64_max_with_leading_zeros() {
        assert_eq!(parse_amount(b"1"), Ok(1));
        assert_eq!(parse_amount(b"0001"), Ok(1));
        assert_eq!(parse_amount(b"9223372036854775807"), Ok(MAX_AMOUNT));
        assert_eq!(
            parse_amount(b"00000000000000000009223372036854775807"),
            Ok(MAX_AMOUNT)
        );
    }

    #[test]
    fn bad_amounts_are_rejected_whatever_their_shape() {
        for amount in [
            &b"0"[..],
            b"000",
            b"-5",
            b"+5",
            b"1.5",
            b"1e3",
            b"0x10",
            b"abc",
            b"5a",
            b"9223372036854775808",
            b"18446744073709551615",
            b"18446744073709551616",
            b"99999999999999999999999999999999999999999999",
            "٣".as_bytes(),
            b"",
        ] {
            assert!(parse_amount(amount).is_err(), "{amount:?} accepted");
            assert_eq!(
                parse_amount(amount).map_err(|e| e.kind),
                Err(ErrorKind::BadAmount)
            );
        }
        let huge = vec![b'9'; 1 << 20];
        assert_eq!(
            parse_amount(&huge).map_err(|e| e.kind),
            Err(ErrorKind::BadAmount)
        );
        assert_eq!(
            err(b"DEPOSIT a -5"),
            (
                ErrorKind::BadAmount,
                "invalid amount '-5': a whole number from 1 to 9223372036854775807 is expected"
                    .to_string()
            )
        );
    }

    #[test]
    fn error_kinds_round_trip_through_their_words() {
        let words = [
            "unknown-command",
            "bad-request",
            "bad-account",
            "bad-amount",
            "line-too-long",
            "no-such-account",
            "insufficient-funds",
            "same-account",
            "overflow",
            "ledger-full",
            "internal",
            "denied",
            "unavailable",
        ];
        assert_eq!(words.len(), ErrorKind::ALL.len());
        for (kind, word) in ErrorKind::ALL.into_iter().zip(words) {
            assert_eq!(kind.as_str(), word);
            assert_eq!(kind.to_string(), word);
            assert_eq!(word.parse::<ErrorKind>(), Ok(kind));
        }
        assert!("Bad-Request".parse::<ErrorKind>().is_err());
        assert!("nope".parse::<ErrorKind>().is_err());
    }

    #[test]
    fn requests_are_written_in_canonical_form() {
        assert_eq!(
            request_line(&Request::Deposit {
                acct: acct("a"),
                amount: 10
            }),
            "DEPOSIT a 10\n"
        );
        assert_eq!(
            request_line(&Request::Withdraw {
                acct: acct("a"),
                amount: MAX_AMOUNT
            }),
            "WITHDRAW a 9223372036854775807\n"
        );
        assert_eq!(
            request_line(&Request::Transfer {
                from: acct("a"),
                to: acct("b"),
                amount: 3
            }),
            "TRANSFER a b 3\n"
        );
        assert_eq!(
            request_line(&Request::Balance { acct: acct("z") }),
            "BALANCE z\n"
        );
        assert_eq!(request_line(&Request::Audit), "AUDIT\n");
        assert_eq!(request_line(&Request::Ping), "PING\n");
        assert_eq!(request_line(&Request::Quit), "QUIT\n");
    }

    #[test]
    fn replies_are_written_as_one_line() {
        assert_eq!(reply_line(&Reply::Ok(42)), "OK 42\n");
        assert_eq!(reply_line(&Reply::Ok(0)), "OK 0\n");
        assert_eq!(reply_line(&Reply::OkPair(10, 20)), "OK 10 20\n");
        assert_eq!(
            reply_line(&Reply::Audit {
                total: u128::from(MAX_AMOUNT) * 3,
                accounts: 3
            }),
            "OK 27670116110564327421 3\n"
        );
        assert_eq!(reply_line(&Reply::Pong), "PONG\n");
        assert_eq!(reply_line(&Reply::Bye), "BYE\n");
        assert_eq!(
            reply_line(&Reply::error(ErrorKind::NoSuchAccount, "no account 'x'")),
            "ERR no-such-account no account 'x'\n"
        );
        assert_eq!(
            reply_line(&Reply::error(ErrorKind::Overflow, "")),
            "ERR overflow\n"
        );
    }

    #[test]
    fn error_details_are_cleaned_and_capped_when_written() {
        assert_eq!(
            reply_line(&Reply::error(ErrorKind::BadRequest, "a\nb\r\u{e9}\\")),
            "ERR bad-request a\\x0ab\\x0d\\xc3\\xa9\\\n"
        );
        let line = reply_line(&Reply::error(ErrorKind::BadRequest, "\u{1}".repeat(1000)));
        let detail = line
            .strip_prefix("ERR bad-request ")
            .and_then(|d| d.strip_suffix('\n'))
            .expect("shape");
        assert!(detail.len() <= MAX_DETAIL_BYTES, "{} bytes", detail.len());
        assert!(detail.ends_with("..."));
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn protocol_errors_become_err_replies() {
        let e = parse_request(b"BALANCE \xff").expect_err("bad name");
        assert_eq!(
            reply_line(&e.into()),
            "ERR bad-account invalid account name '\\xff': the name contains the byte \
             0xff; allowed are A-Z a-z 0-9 _ . -\n"
        );
        assert_eq!(
            ProtocolError::new(ErrorKind::LedgerFull, "full").to_string(),
            "ledger-full: full"
        );
    }

    /// Every detail the server decides, exactly: accounts as `account 'NAME'`, limits with
    /// their setting; even the longest name keeps the detail under the cap, uncut.
    #[test]
    fn server_decided_details_name_the_account_or_the_limit_in_one_style() {
        let line = |e: ProtocolError| reply_line(&e.into());
        assert_eq!(
            line(ProtocolError::same_account(&acct("a"))),
            "ERR same-account cannot transfer from account 'a' to itself\n"
        );
        assert_eq!(
            line(ProtocolError::no_such_account(&acct("ghost"))),
            "ERR no-such-account account 'ghost' does not exist\n"
        );
        assert_eq!(
            line(ProtocolError::insufficient_funds(&acct("bob"))),
            "ERR insufficient-funds account 'bob' holds less than the amount\n"
        );
        assert_eq!(
            line(ProtocolError::overflow(&acct("big"))),
            "ERR overflow the balance of account 'big' would exceed 9223372036854775807\n"
        );
        assert_eq!(
            line(ProtocolError::ledger_full(&acct("d"), 3)),
            "ERR ledger-full cannot open account 'd': the ledger holds its limit of 3 accounts \
             (the max_accounts setting)\n"
        );
        assert_eq!(
            line(ProtocolError::line_too_long(65536)),
            "ERR line-too-long request line longer than 65536 bytes (the max_line setting); \
             closing\n"
        );
        assert_eq!(
            line(ProtocolError::internal()),
            "ERR internal the ledger cannot serve this request; nothing changed\n"
        );
        let longest = acct(&"n".repeat(MAX_ACCOUNT_LEN));
        for e in [
            ProtocolError::overflow(&longest),
            ProtocolError::ledger_full(&longest, u64::MAX),
        ] {
            assert!(e.detail.len() <= MAX_DETAIL_BYTES, "{}", e.detail);
            assert!(line(e).contains(&format!("account '{longest}'")));
        }
    }

    #[test]
    fn escaping_quotes_printable_ascii_and_truncates() {
        assert_eq!(
            escape_for_reply(b"ok \\ \x7f\x1b", 32),
            "ok \\\\ \\x7f\\x1b"
        );
        assert_eq!(escape_for_reply(b"abcdef", 3), "abc...");
        assert_eq!(escape_for_reply(b"abc", 3), "abc");
    }

    #[test]
    fn replies_parse_against_their_request() {
        let dep = Request::Deposit {
            acct: acct("a"),
            amount: 1,
        };
        let tr = Request::Transfer {
            from: acct("a"),
            to: acct("b"),
            amount: 1,
        };
        assert_eq!(parse_reply(&dep, b"OK 42"), Ok(Reply::Ok(42)));
        assert_eq!(
            parse_reply(&Request::Balance { acct: acct("a") }, b"OK 0"),
            Ok(Reply::Ok(0))
        );
        assert_eq!(parse_reply(&tr, b"OK 10 20"), Ok(Reply::OkPair(10, 20)));
        assert_eq!(
            parse_reply(&Request::Audit, b"OK 27670116110564327421 3"),
            Ok(Reply::Audit {
                total: 27670116110564327421,
                accounts: 3
            })
        );
        assert_eq!(parse_reply(&Request::Ping, b"PONG"), Ok(Reply::Pong));
        assert_eq!(parse_reply(&Request::Quit, b"BYE"), Ok(Reply::Bye));
        assert_eq!(
            parse_reply(&tr, b"ERR insufficient-funds balance 3 < 5"),
            Ok(Reply::error(ErrorKind::InsufficientFunds, "balance 3 < 5"))
        );
        assert_eq!(
            parse_reply(&Request::Ping, b"ERR overflow"),
            Ok(Reply::error(ErrorKind::Overflow, ""))
        );
    }

    #[test]
    fn malformed_or_mismatched_replies_are_rejected() {
        let dep = Request::Deposit {
            acct: acct("a"),
            amount: 1,
        };
        let tr = Request::Transfer {
            from: acct("a"),
            to: acct("b"),
            amount: 1,
        };
        for (req, line) in [
            (&dep, &b"OK"[..]),
            (&dep, b"OK "),
            (&dep, b"OK 1 2"),
            (&dep, b"OK 01"),
            (&dep, b"OK -1"),
            (&dep, b"OK 9223372036854775808"),
            (&dep, b"ok 1"),
            (&dep, b"OK 1\r"),
            (&dep, b"OK  1"),
            (&dep, b"PONG"),
            (&tr, b"OK 1"),
            (&tr, b"OK 1 2 3"),
            (&Request::Audit, b"OK 1"),
            (&Request::Audit, b"OK 1 18446744073709551616"),
            (
                &Request::Audit,
                b"OK 9999999999999999999999999999999999999999 1",
            ),
            (&Request::Ping, b"PONG "),
            (&Request::Quit, b"OK 1"),
            (&dep, b"ERR"),
            (&dep, b"ERR "),
            (&dep, b"ERR nope detail"),
            (&dep, b"ERR bad-amount \xff"),
        ] {
            assert!(
                parse_reply(req, line).is_err(),
                "{line:?} accepted for {}",
                req.verb()
            );
        }
        let e = parse_reply(&dep, b"HELLO\x00").expect_err("garbage");
        assert_eq!(
            e.to_string(),
            "reply 'HELLO\\x00' does not answer DEPOSIT: expected OK <balance> or ERR <kind> <detail>"
        );
    }

    #[test]
    fn auth_parses_a_user_and_a_token() {
        let req = parse_request(b"auth alice s3cr3t!~\r").expect("valid AUTH");
        let Request::Auth { user, token } = req else {
            panic!("not AUTH: {req:?}");
        };
        assert_eq!(user.as_str(), "alice");
        assert_eq!(token.as_bytes(), b"s3cr3t!~");
        assert_eq!(request_line(&req), "AUTH alice s3cr3t!~\n");
        let longest = "t".repeat(MAX_TOKEN_LEN);
        assert!(parse_request(format!("AUTH a {longest}").as_bytes()).is_ok());
    }

    #[test]
    fn malformed_auth_lines_are_bad_requests_that_never_quote_the_token() {
        assert_eq!(
            err(b"AUTH alice"),
            (
                ErrorKind::BadRequest,
                "AUTH takes 2 arguments (<user> <token>), got 1".to_string()
            )
        );
        assert_eq!(kind(b"AUTH a b c"), ErrorKind::BadRequest);
        assert_eq!(
            err(b"AUTH al/ce tok"),
            (
                ErrorKind::BadRequest,
                "invalid user name 'al/ce': the name contains the byte 0x2f; \
                 allowed are A-Z a-z 0-9 _ . -"
                    .to_string()
            )
        );
        let secret = "Zq".repeat(MAX_TOKEN_LEN);
        let (kind, detail) = err(format!("AUTH alice {secret}").as_bytes());
        assert_eq!(kind, ErrorKind::BadRequest);
        assert_eq!(
            detail,
            "invalid token: the token is 128 bytes long, the limit is 64"
        );
        let (_, detail) = err(b"AUTH alice Zq\xffZq");
        assert_eq!(
            detail,
            "invalid token: the token contains a byte outside printable ASCII"
        );
        assert!(!detail.contains("Zq"));
    }

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let req = parse_request(b"AUTH alice hunter2").expect("valid AUTH");
        let shown = format!("{req:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
    }

    #[test]
    fn auth_replies_name_the_user() {
        let req = parse_request(b"AUTH alice t").expect("valid AUTH");
        let alice = UserName::new(b"alice").expect("valid name");
        assert_eq!(reply_line(&Reply::Authenticated(alice)), "OK alice\n");
        assert_eq!(
            parse_reply(&req, b"OK alice"),
            Ok(Reply::Authenticated(alice))
        );
        assert_eq!(
            parse_reply(&req, b"ERR denied invalid user or token"),
            Ok(Reply::error(ErrorKind::Denied, "invalid user or token"))
        );
        for bad in [&b"OK"[..], b"OK ", b"OK a/b", b"OK 1 2", b"PONG"] {
            assert!(parse_reply(&req, bad).is_err(), "{bad:?} accepted");
        }
    }

    fn user_strategy() -> impl Strategy<Value = UserName> {
        "[A-Za-z0-9_.-]{1,64}".prop_map(|s| UserName::new(s.as_bytes()).expect("valid name"))
    }

    fn token_strategy() -> impl Strategy<Value = AuthToken> {
        "[!-~]{1,64}".prop_map(|s| AuthToken::new(s.as_bytes()).expect("valid token"))
    }

    fn account_strategy() -> impl Strategy<Value = AccountName> {
        "[A-Za-z0-9_.-]{1,64}".prop_map(|s| acct(&s))
    }

    fn amount_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![1..=100u64, 1..=MAX_AMOUNT, Just(MAX_AMOUNT)]
    }

    fn request_strategy() -> impl Strategy<Value = Request> {
        prop_oneof![
            (account_strategy(), amount_strategy())
                .prop_map(|(acct, amount)| Request::Deposit { acct, amount }),
            (account_strategy(), amount_strategy())
                .prop_map(|(acct, amount)| Request::Withdraw { acct, amount }),
            (account_strategy(), account_strategy(), amount_strategy())
                .prop_filter("distinct accounts", |(from, to, _)| from != to)
                .prop_map(|(from, to, amount)| Request::Transfer { from, to, amount }),
            account_strategy().prop_map(|acct| Request::Balance { acct }),
            Just(Request::Audit),
            Just(Request::Ping),
            Just(Request::Quit),
            (user_strategy(), token_strategy())
                .prop_map(|(user, token)| Request::Auth { user, token }),
        ]
    }

    fn balance_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![0..=100u64, 0..=MAX_AMOUNT]
    }

    /// A request paired with a reply that can answer it.
    fn exchange_strategy() -> impl Strategy<Value = (Request, Reply)> {
        let err = (0..ErrorKind::ALL.len(), "[ -~]{0,40}")
            .prop_map(|(i, detail)| Reply::error(ErrorKind::ALL[i], detail));
        request_strategy().prop_flat_map(move |req| {
            let ok = match req {
                Request::Deposit { .. } | Request::Withdraw { .. } | Request::Balance { .. } => {
                    balance_strategy().prop_map(Reply::Ok).boxed()
                }
                Request::Transfer { .. } => (balance_strategy(), balance_strategy())
                    .prop_map(|(a, b)| Reply::OkPair(a, b))
                    .boxed(),
                Request::Audit => (any::<u128>(), any::<u64>())
                    .prop_map(|(total, accounts)| Reply::Audit { total, accounts })
                    .boxed(),
                Request::Ping => Just(Reply::Pong).boxed(),
                Request::Quit => Just(Reply::Bye).boxed(),
                Request::Auth { .. } => user_strategy().prop_map(Reply::Authenticated).boxed(),
            };
            (Just(req), prop_oneof![ok, err.clone()])
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_request(&line);
            let _ = parse_reply(&Request::Audit, &line);
            let _ = parse_reply(&Request::Ping, &line);
        }

        #[test]
        fn near_miss_lines_never_panic(
            verb in "(?i)(deposit|withdraw|transfer|balance|audit|ping|quit|auth|x)",
            fields in proptest::collection::vec("[ -~\\t\\x00\\xff]{0,25}", 0..5),
        ) {
            let line = format!("{verb} {}", fields.join(" "));
            if let Err(e) = parse_request(line.as_bytes()) {
                let mut out = Vec::new();
                Reply::from(e).write_to(&mut out);
                prop_assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
                prop_assert!(out[..out.len() - 1].iter().all(|b| (0x20..=0x7e).contains(b)));
            }
        }

        #[test]
        fn written_requests_parse_back(req in request_strategy()) {
            let mut line = Vec::new();
            req.write_to(&mut line);
            prop_assert_eq!(line.pop(), Some(b'\n'));
            prop_assert_eq!(parse_request(&line), Ok(req));
            line.extend_from_slice(b"\r");
            prop_assert_eq!(parse_request(&line), Ok(req));
        }

        #[test]
        fn written_replies_parse_back((req, reply) in exchange_strategy()) {
            let mut line = Vec::new();
            reply.write_to(&mut line);
            prop_assert_eq!(line.pop(), Some(b'\n'));
            prop_assert!(!line.contains(&b'\n'));
            prop_assert_eq!(parse_reply(&req, &line), Ok(reply));
        }
    }
}
