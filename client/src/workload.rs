//! What goes over a connection: the requests each mode writes and how each reply is checked.
//! The connection driver calls a [`Workload`] and never looks inside a request or a reply.
//!
//! Replies are checked as a stream: the driver hands over whatever bytes a read returned, and
//! the workload consumes the reply of the oldest request in flight, keeping the little state a
//! reply split across reads needs in that connection's [`ReplyProgress`]. Nothing allocates per
//! request except where a reply is wrong (to keep a sample) or is a bank `ERR` (its detail).

use forkpool_common::bank::{escape_for_reply, parse_reply, AccountName, Request};

use crate::book::{Book, Outcome};
use crate::load::{Mix, Op, Payload, Rng};

/// How many wrong replies each thread keeps as printable samples.
pub const MAX_SAMPLES: usize = 5;
/// Longest bank reply line accepted; a longer one is wrong.
const MAX_BANK_REPLY: usize = 4096;
/// How many bytes of a wrong line a sample shows.
const SAMPLE_BYTES: usize = 120;

/// The verdict on one complete reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Good,
    Wrong,
}

/// Per-connection state of the reply being read; reset when the connection is.
#[derive(Debug, Default)]
pub struct ReplyProgress {
    /// Echo: bytes of the expected reply already matched.
    matched: usize,
    /// The reply already differs (echo) or is too long (bank): skip to its newline.
    wrong: bool,
    /// Echo: the wrong reply as received so far, when it is kept as a sample. Bank: the start
    /// of a reply line that a read boundary cut.
    line: Vec<u8>,
    /// Echo: `line` is being kept as a sample.
    capturing: bool,
}

impl ReplyProgress {
    /// Whether part of a reply has been read (an EOF now would cut a reply in two).
    pub fn mid_reply(&self) -> bool {
        self.matched > 0 || self.wrong || !self.line.is_empty()
    }

    /// Forgets a partly read reply (the connection was dropped).
    pub fn reset(&mut self) {
        self.matched = 0;
        self.wrong = false;
        self.line.clear();
        self.capturing = false;
    }
}

/// A request generator and reply checker for one client thread.
pub trait Workload: Send {
    /// What must be remembered about a request until its reply is checked.
    type Sent: Copy + Send;

    /// Appends the next request to `out`.
    fn write_next(&mut self, out: &mut Vec<u8>) -> Self::Sent;

    /// Whether `sent` may be sent again when its connection closed cleanly before the reply
    /// (the server never processed it, or processing it twice changes nothing).
    fn idempotent(&self, sent: &Self::Sent) -> bool;

    /// Appends `sent` to `out` again, byte for byte (the re-send of an idempotent request).
    fn write_again(&self, sent: &Self::Sent, out: &mut Vec<u8>);

    /// Consumes the start of `input` as (part of) the reply to `sent`: returns how many bytes
    /// were used (at least one when `input` is not empty) and the verdict once the reply's
    /// newline has been seen.
    fn feed(
        &mut self,
        sent: &Self::Sent,
        progress: &mut ReplyProgress,
        input: &[u8],
    ) -> (usize, Option<Verdict>);

    /// The reply to `sent` will never come (its connection dropped and it is not re-sent, or
    /// the run ended).
    fn lost(&mut self, sent: &Self::Sent);

    /// Records a protocol violation that belongs to no request (bytes nobody asked for).
    fn note_unsolicited(&mut self, input: &[u8]) {
        let samples = self.samples_mut();
        if samples.len() < MAX_SAMPLES {
            samples.push(format!(
                "unsolicited bytes '{}'",
                escape_for_reply(input, SAMPLE_BYTES)
            ));
        }
    }

    /// Printable descriptions of the first wrong replies.
    fn samples(&self) -> &[String];

    /// The same, to add to.
    fn samples_mut(&mut self) -> &mut Vec<String>;
}

/// Echo: random lines from a pool, each reply compared with the pool's precomputed uppercase.
pub struct EchoWorkload {
    pool: Vec<Payload>,
    rng: Rng,
    samples: Vec<String>,
}

impl EchoWorkload {
    pub fn new(pool: Vec<Payload>, rng: Rng) -> Self {
        assert!(!pool.is_empty(), "the payload pool is never empty");
        EchoWorkload {
            pool,
            rng,
            samples: Vec::new(),
        }
    }

    fn keep_sample(&mut self, sent: u32, got: &[u8]) {
        let line = |b: &[u8]| escape_for_reply(b.strip_suffix(b"\n").unwrap_or(b), SAMPLE_BYTES);
        let expected = &self.pool[sent as usize].expected;
        self.samples
            .push(format!("expected '{}' got '{}'", line(expected), line(got)));
    }
}

/// Length of the common prefix of `a` and `b` (a memcmp when they agree, as they nearly always
/// do).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    if a[..n] == b[..n] {
        return n;
    }
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Workload for EchoWorkload {
    /// Index into the pool.
    type Sent = u32;

    fn write_next(&mut self, out: &mut Vec<u8>) -> u32 {
        let i = self.rng.below(self.pool.len() as u64) as u32;
        self.write_again(&i, out);
        i
    }

    /// Echo changes nothing on the server.
    fn idempotent(&self, _sent: &u32) -> bool {
        true
    }

    fn write_again(&self, &sent: &u32, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pool[sent as usize].line);
    }

    fn feed(
        &mut self,
        &sent: &u32,
        p: &mut ReplyProgress,
        input: &[u8],
    ) -> (usize, Option<Verdict>) {
        let mut used = 0;
        if !p.wrong {
            let expected = &self.pool[sent as usize].expected;
            let rest = &expected[p.matched..];
            let n = common_prefix(rest, input);
            if n == rest.len() {
                p.reset();
                return (n, Some(Verdict::Good));
            }
            if n == input.len() {
                p.matched += n;
                return (n, None);
            }
            p.wrong = true;
            if self.samples.len() < MAX_SAMPLES {
                p.capturing = true;
                p.line.clear();
                p.line.extend_from_slice(&expected[..p.matched + n]);
            }
            used = n;
        }
        let tail = &input[used..];
        let end = tail.iter().position(|&b| b == b'\n');
        let piece = &tail[..end.map_or(tail.len(), |i| i + 1)];
        if p.capturing && p.line.len() < 2 * SAMPLE_BYTES {
            p.line.extend_from_slice(piece);
        }
        match end {
            Some(_) => {
                if p.capturing {
                    let got = std::mem::take(&mut p.line);
                    self.keep_sample(sent, &got);
                }
                p.reset();
                (used + piece.len(), Some(Verdict::Wrong))
            }
            None => (input.len(), None),
        }
    }

    fn lost(&mut self, _sent: &u32) {}

    fn samples(&self) -> &[String] {
        &self.samples
    }

    fn samples_mut(&mut self) -> &mut Vec<String> {
        &mut self.samples
    }
}

/// Bank: random operations over the run's accounts; every reply parsed and booked.
pub struct BankWorkload {
    accounts: Vec<AccountName>,
    mix: Mix,
    rng: Rng,
    book: Book,
    samples: Vec<String>,
}

/// Largest amount a bank operation moves.
const MAX_OP_AMOUNT: u64 = 100;

impl BankWorkload {
    /// `accounts` has at least two names (transfers need distinct ends).
    pub fn new(accounts: Vec<AccountName>, mix: Mix, rng: Rng) -> Self {
        assert!(accounts.len() >= 2, "--accounts is at least 2");
        BankWorkload {
            accounts,
            mix,
            rng,
            book: Book::default(),
            samples: Vec::new(),
        }
    }

    /// What this thread booked.
    pub fn book(&self) -> &Book {
        &self.book
    }

    fn pick(&mut self) -> AccountName {
        self.accounts[self.rng.below(self.accounts.len() as u64) as usize]
    }

    fn next_request(&mut self) -> Request {
        let amount = 1 + self.rng.below(MAX_OP_AMOUNT);
        match self.mix.pick(&mut self.rng) {
            Op::Deposit => Request::Deposit {
                acct: self.pick(),
                amount,
            },
            Op::Withdraw => Request::Withdraw {
                acct: self.pick(),
                amount,
            },
            Op::Balance => Request::Balance { acct: self.pick() },
            Op::Transfer => {
                let n = self.accounts.len() as u64;
                let from = self.rng.below(n);
                let to = (from + 1 + self.rng.below(n - 1)) % n;
                Request::Transfer {
                    from: self.accounts[from as usize],
                    to: self.accounts[to as usize],
                    amount,
                }
            }
        }
    }

    fn judge(&mut self, req: &Request, line: &[u8]) -> Verdict {
        let why = match parse_reply(req, line) {
            Ok(reply) => match self.book.record(req, &reply) {
                Outcome::Applied | Outcome::Declined => return Verdict::Good,
                Outcome::Unexpected => "unexpected error".to_string(),
            },
            Err(e) => e.to_string(),
        };
        if self.samples.len() < MAX_SAMPLES {
            let mut request = Vec::new();
            req.write_to(&mut request);
            request.pop();
            self.samples.push(format!(
                "request '{}' got '{}': {why}",
                escape_for_reply(&request, SAMPLE_BYTES),
                escape_for_reply(line, SAMPLE_BYTES)
            ));
        }
        Verdict::Wrong
    }
}

impl Workload for BankWorkload {
    type Sent = Request;

    fn write_next(&mut self, out: &mut Vec<u8>) -> Request {
        let req = self.next_request();
        req.write_to(out);
        req
    }

    /// Only reads: a deposit, withdrawal or transfer whose reply never came has an unknown
    /// outcome (design note 7) and is booked as such, never sent twice.
    fn idempotent(&self, req: &Request) -> bool {
        matches!(
            req,
            Request::Balance { .. } | Request::Audit | Request::Ping
        )
    }

    fn write_again(&self, req: &Request, out: &mut Vec<u8>) {
        req.write_to(out);
    }

    fn feed(
        &mut self,
        req: &Request,
        p: &mut ReplyProgress,
        input: &[u8],
    ) -> (usize, Option<Verdict>) {
        let Some(end) = input.iter().position(|&b| b == b'\n') else {
            if p.line.len() + input.len() > MAX_BANK_REPLY {
                p.wrong = true;
                p.line.clear();
            } else if !p.wrong {
                p.line.extend_from_slice(input);
            }
            return (input.len(), None);
        };
        let verdict = if p.wrong {
            self.judge(req, b"<reply longer than 4096 bytes>")
        } else if p.line.is_empty() {
            self.judge(req, &input[..end])
        } else {
            p.line.extend_from_slice(&input[..end]);
            let line = std::mem::take(&mut p.line);
            let verdict = self.judge(req, &line);
            p.line = line;
            verdict
        };
        p.reset();
        (end + 1, Some(verdict))
    }

    fn lost(&mut self, req: &Request) {
        self.book.record_unknown(req);
    }

    fn samples(&self) -> &[String] {
        &self.samples
    }

    fn samples_mut(&mut self) -> &mut Vec<String> {
        &mut self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{payload_pool, Text};
    use forkpool_common::bank::{ErrorKind, Reply};

    /// Feeds `stream` in pieces of `chunk` bytes against the requests `sent`, returning the
    /// verdicts.
    fn run<W: Workload>(w: &mut W, sent: &[W::Sent], stream: &[u8], chunk: usize) -> Vec<Verdict> {
        let mut p = ReplyProgress::default();
        let mut verdicts = Vec::new();
        for mut piece in stream.chunks(chunk) {
            while !piece.is_empty() {
                let (used, v) = w.feed(&sent[verdicts.len()], &mut p, piece);
                assert!(used > 0 && used <= piece.len());
                piece = &piece[used..];
                verdicts.extend(v);
            }
        }
        verdicts
    }

    fn echo() -> EchoWorkload {
        EchoWorkload::new(payload_pool(&mut Rng::new(5), 40, Text::Mixed), Rng::new(6))
    }

    #[test]
    fn echo_accepts_the_uppercase_in_any_split() {
        let mut w = echo();
        let mut out = Vec::new();
        let sent: Vec<u32> = (0..20).map(|_| w.write_next(&mut out)).collect();
        let replies: Vec<u8> = sent
            .iter()
            .flat_map(|&i| w.pool[i as usize].expected.clone())
            .collect();
        for chunk in [1, 3, 7, 40, 10_000] {
            assert_eq!(
                run(&mut w, &sent, &replies, chunk),
                vec![Verdict::Good; 20],
                "chunk {chunk}"
            );
        }
        assert!(w.samples().is_empty());
    }

    #[test]
    fn echo_flags_wrong_replies_of_any_length_and_stays_in_step() {
        let pool = vec![
            Payload {
                line: b"stra\xc3\x9fe\n".to_vec(),
                expected: b"STRASSE\n".to_vec(),
            },
            Payload {
                line: b"ok\n".to_vec(),
                expected: b"OK\n".to_vec(),
            },
        ];
        let mut w = EchoWorkload::new(pool, Rng::new(1));
        let stream = b"STRA\xc3\x9fE\nOK\nSTRASSE!!\nOK\nSTRAS\nok\n";
        for chunk in [1, 2, 100] {
            let verdicts = run(&mut w, &[0, 1, 0, 1, 0, 1], stream, chunk);
            use Verdict::{Good, Wrong};
            assert_eq!(
                verdicts,
                [Wrong, Good, Wrong, Good, Wrong, Wrong],
                "chunk {chunk}"
            );
        }
        assert_eq!(w.samples()[0], "expected 'STRASSE' got 'STRA\\xc3\\x9fE'");
        assert_eq!(w.samples()[2], "expected 'STRASSE' got 'STRAS'");
        assert_eq!(w.samples().len(), MAX_SAMPLES);
    }

    fn bank() -> BankWorkload {
        let accounts = ["a", "b", "c"].map(|n| n.parse().expect("valid")).to_vec();
        BankWorkload::new(
            accounts,
            "transfer=1,deposit=1,withdraw=1".parse().expect("mix"),
            Rng::new(2),
        )
    }

    #[test]
    fn bank_requests_are_valid_and_transfers_have_distinct_ends() {
        let mut w = bank();
        let mut out = Vec::new();
        for _ in 0..500 {
            out.clear();
            let req = w.write_next(&mut out);
            assert_eq!(out.pop(), Some(b'\n'));
            assert_eq!(forkpool_common::bank::parse_request(&out), Ok(req));
        }
    }

    #[test]
    fn bank_replies_are_parsed_and_booked_across_read_boundaries() {
        let mut w = bank();
        let acct: AccountName = "a".parse().expect("valid");
        let sent = [
            Request::Deposit { acct, amount: 10 },
            Request::Withdraw { acct, amount: 3 },
            Request::Withdraw { acct, amount: 99 },
            Request::Withdraw { acct, amount: 1 },
            Request::Deposit { acct, amount: 1 },
        ];
        let mut stream = Vec::new();
        for reply in [
            Reply::Ok(10),
            Reply::Ok(7),
            Reply::error(ErrorKind::InsufficientFunds, "balance 7"),
            Reply::error(ErrorKind::NoSuchAccount, "huh"),
        ] {
            reply.write_to(&mut stream);
        }
        stream.extend_from_slice(b"OK 01\n");
        use Verdict::{Good, Wrong};
        assert_eq!(
            run(&mut w, &sent, &stream, 4),
            [Good, Good, Good, Wrong, Wrong]
        );
        assert_eq!(
            (w.book().deposited, w.book().withdrawn, w.book().declined),
            (10, 3, 1)
        );
        assert_eq!(w.samples().len(), 2);
        assert!(w.samples()[0].starts_with("request 'WITHDRAW a 1' got 'ERR no-such-account huh'"));
        w.lost(&sent[0]);
        assert_eq!(w.book().unknown_deposit_sum, 10);
    }

    #[test]
    fn overlong_bank_replies_are_wrong_not_buffered() {
        let mut w = bank();
        let mut stream = vec![b'O'; 10_000];
        stream.push(b'\n');
        let verdicts = run(&mut w, &[Request::Ping], &stream, 1000);
        assert_eq!(verdicts, [Verdict::Wrong]);
    }
}
