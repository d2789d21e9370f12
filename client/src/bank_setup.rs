//! The bank run's bracket, over a blocking connection (plain or TLS, authenticated if the
//! run is): the opening AUDIT, opening the accounts, and the closing AUDIT. Every read and
//! write has a deadline, so a dead server makes these fail on time instead of hanging. A
//! clean close at a reply boundary (a worker closing at a request boundary: forkpool answers
//! everything it read before closing, and reads nothing after) is a keep-alive close: the
//! client reconnects and sends the unanswered requests again (unless `--no-reconnect`); the
//! AUDIT check after opening catches any double deposit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use forkpool_common::bank::{parse_reply, AccountName, Reply, Request};
use rustls::{ClientConnection, StreamOwned};

use crate::args::Greeting;
use crate::tls::ClientTls;

/// How the setup reaches the bank: where, with TLS or not, with which greeting (AUTH), and
/// whether a clean close is reconnected.
#[derive(Debug, Clone)]
pub struct Connector {
    pub addr: SocketAddr,
    pub tls: Option<Arc<ClientTls>>,
    pub greeting: Option<Greeting>,
    pub reconnect: bool,
}

/// A blocking connection, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// Requests written before their replies are read while opening accounts (small enough that
/// neither side's socket buffer fills, so writing never blocks on unread replies).
const SETUP_BATCH: usize = 128;

/// A blocking request/reply connection with a deadline.
struct LineClient {
    to: Connector,
    reader: BufReader<Stream>,
    deadline: Instant,
    line: Vec<u8>,
}

/// The server closed the connection cleanly, at a reply boundary.
#[derive(Debug, thiserror::Error)]
#[error("the bank closed the connection")]
struct ClosedCleanly;

impl LineClient {
    fn connect(to: &Connector, deadline: Instant) -> anyhow::Result<Self> {
        let mut client = LineClient {
            reader: BufReader::new(open(to, deadline)?),
            to: to.clone(),
            deadline,
            line: Vec::new(),
        };
        client.greet()?;
        Ok(client)
    }

    fn reconnect(&mut self) -> anyhow::Result<()> {
        if !self.to.reconnect {
            bail!("the bank closed the connection (--no-reconnect)");
        }
        self.reader = BufReader::new(open(&self.to, self.deadline)?);
        self.greet()
    }

    /// Sends the greeting (AUTH) and checks its reply.
    fn greet(&mut self) -> anyhow::Result<()> {
        let Some(greeting) = self.to.greeting.clone() else {
            return Ok(());
        };
        self.write_all(&greeting.request)?;
        self.read_line()?;
        if self.line != greeting.reply[..greeting.reply.len().saturating_sub(1)] {
            bail!(
                "the bank refused the --auth greeting: {}",
                String::from_utf8_lossy(&self.line)
            );
        }
        Ok(())
    }

    /// Sends `reqs` and reads one reply each, reconnecting and re-sending the unanswered
    /// ones after a clean close.
    fn exchange(&mut self, reqs: &[Request]) -> anyhow::Result<Vec<Reply>> {
        let mut replies = Vec::with_capacity(reqs.len());
        while replies.len() < reqs.len() {
            let pending = &reqs[replies.len()..];
            let sent = self.send(pending);
            let mut closed = sent.is_err();
            if !closed {
                for req in pending {
                    match self.receive(req) {
                        Ok(reply) => replies.push(reply),
                        Err(e) if e.is::<ClosedCleanly>() => {
                            closed = true;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if closed {
                self.time_left()?;
                self.reconnect()?;
            }
        }
        Ok(replies)
    }

    fn time_left(&self) -> anyhow::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the bank did not answer in time");
        }
        Ok(left)
    }

    fn send(&mut self, reqs: &[Request]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        for r in reqs {
            r.write_to(&mut out);
        }
        self.write_all(&out)
    }

    fn write_all(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let left = self.time_left()?;
        let stream = self.reader.get_mut();
        stream.tcp().set_write_timeout(Some(left))?;
        stream.write_all(bytes).context("writing to the bank")?;
        stream.flush().context("writing to the bank")?;
        Ok(())
    }

    /// Reads one reply line into `self.line` (without its `\n`).
    fn read_line(&mut self) -> anyhow::Result<()> {
        let left = self.time_left()?;
        self.reader.get_ref().tcp().set_read_timeout(Some(left))?;
        self.line.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.line)
            .context("reading from the bank")?;
        if n == 0 {
            return Err(ClosedCleanly.into());
        }
        if self.line.pop() != Some(b'\n') {
            bail!("the bank closed the connection in the middle of a reply");
        }
        Ok(())
    }

    fn receive(&mut self, req: &Request) -> anyhow::Result<Reply> {
        self.read_line()?;
        parse_reply(req, &self.line).map_err(|e| anyhow!(e))
    }

    fn audit(&mut self) -> anyhow::Result<(u128, u64)> {
        match self.exchange(&[Request::Audit])?.pop() {
            Some(Reply::Audit { total, accounts }) => Ok((total, accounts)),
            other => bail!("AUDIT answered {other:?}"),
        }
    }
}

fn open(to: &Connector, deadline: Instant) -> anyhow::Result<Stream> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let addr = to.addr;
    let tcp = TcpStream::connect_timeout(&addr, left)
        .with_context(|| format!("cannot connect to the bank at {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(match &to.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let session = ClientConnection::new(Arc::clone(&tls.config), tls.server_name.clone())?;
            Stream::Tls(Box::new(StreamOwned::new(session, tcp)))
        }
    })
}

/// The ledger as the run found it and left it after opening the accounts.
#[derive(Debug, Clone, Copy)]
pub struct Opening {
    /// AUDIT before the run touched anything.
    pub before_total: u128,
    pub before_accounts: u64,
    /// AUDIT after the opening deposits: the total the run's bookkeeping starts from.
    pub total: u128,
}

/// Account names `PREFIX-0 .. PREFIX-(n-1)`.
pub fn account_names(prefix: &str, n: usize) -> anyhow::Result<Vec<AccountName>> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            name.parse()
                .with_context(|| format!("--prefix {prefix}: '{name}' is not a valid account name"))
        })
        .collect()
}

/// Takes the opening AUDIT, deposits `opening_balance` into every account (opening it if
/// new), and audits again: the second total must be the first plus the deposits, or someone
/// else is writing to the ledger and the run's check would be meaningless.
pub fn open_accounts(
    bank: &Connector,
    accounts: &[AccountName],
    opening_balance: u64,
    timeout: Duration,
) -> anyhow::Result<Opening> {
    let per_batch = timeout.max(Duration::from_secs(1));
    let batches = accounts.len().div_ceil(SETUP_BATCH) as u32 + 2;
    let mut c = LineClient::connect(bank, Instant::now() + per_batch * batches)?;
    let (before_total, before_accounts) = c.audit().context("opening AUDIT")?;
    for chunk in accounts.chunks(SETUP_BATCH) {
        let reqs: Vec<Request> = chunk
            .iter()
            .map(|&acct| Request::Deposit {
                acct,
                amount: opening_balance,
            })
            .collect();
        for (req, reply) in reqs.iter().zip(c.exchange(&reqs)?) {
            if !matches!(reply, Reply::Ok(_)) {
                bail!("opening deposit {req:?} answered {reply:?}");
            }
        }
    }
    let (total, _) = c.audit().context("AUDIT after opening the accounts")?;
    let expected = before_total + u128::from(opening_balance) * accounts.len() as u128;
    if total != expected {
        bail!(
            "the ledger total moved by itself during setup: {before_total} + opening deposits = \
             {expected}, AUDIT says {total} (is another client writing to it?)"
        );
    }
    Ok(Opening {
        before_total,
        before_accounts,
        total,
    })
}

/// The closing AUDIT, on a fresh connection, within `timeout`.
pub fn final_audit(bank: &Connector, timeout: Duration) -> anyhow::Result<(u128, u64)> {
    LineClient::connect(bank, Instant::now() + timeout)?
        .audit()
        .context("closing AUDIT")
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkpool_testkit::{line_server, LineReply};

    /// A bank that answers one request per connection, then closes cleanly (as a worker
    /// retiring after each request would).
    fn one_reply_per_connection_bank() -> SocketAddr {
        line_server(|_, line| {
            let reply: &[u8] = if line.starts_with(b"AUDIT") {
                b"OK 7 1\n"
            } else {
                b"OK 5\n"
            };
            LineReply::Close(reply.to_vec())
        })
    }

    #[test]
    fn a_clean_close_reconnects_and_sends_the_unanswered_requests_again() {
        let bank = Connector {
            addr: one_reply_per_connection_bank(),
            tls: None,
            greeting: None,
            reconnect: true,
        };
        let mut client =
            LineClient::connect(&bank, Instant::now() + Duration::from_secs(5)).expect("connect");
        let acct: AccountName = "a".parse().expect("valid");
        let reqs = [Request::Deposit { acct, amount: 5 }; 3];
        let replies = client
            .exchange(&reqs)
            .expect("three replies over three connections");
        assert_eq!(replies, vec![Reply::Ok(5); 3]);
        assert_eq!(client.audit().expect("audit"), (7, 1));
    }

    #[test]
    fn account_names_are_numbered_and_validated() {
        let names = account_names("acct", 3).expect("valid");
        assert_eq!(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["acct-0", "acct-1", "acct-2"]
        );
        assert!(account_names("bad name", 1).is_err());
        assert!(account_names(&"x".repeat(64), 1).is_err());
    }
}
