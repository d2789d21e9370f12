//! The shape of the load: a small seeded PRNG, the random echo payloads with their expected
//! uppercase, the bank operation mix, and the open-loop schedule. Pure computation, no I/O.

use std::str::FromStr;
use std::time::{Duration, Instant};

use forkpool_common::codec::uppercase_line;

/// SplitMix64: tiny, fast, and good enough to pick payloads and operations. Not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by the multiply-shift reduction.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Characters the payloads are drawn from besides lowercase ASCII: each exercises a different
/// uppercasing rule (length change, no case, 2- to 4-byte sequences).
const UNICODE_SAMPLES: &[&str] = &[
    "ß", // -> SS: output longer than input
    "é", "ж", "ω", "ǆ", // two-byte letters, ǆ -> Ǆ (not the titlecase ǅ)
    "ﬁ", // three bytes -> "FI", two bytes
    "ŉ", // -> ʼN
    "ΐ", // -> three code points
    "ı", // dotless i -> I
    "中", "€",  // no case
    "😀", // four bytes, no case
];

/// Bytes most payload positions get: lowercase letters, digits, punctuation and space.
const ASCII_SAMPLES: &[u8] = b"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-_=+*/()[]{}<>@#$%^&~'\"\\|`";

/// What echo payloads are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Text {
    /// Mostly ASCII, about one character in eight multi-byte UTF-8, each with a different
    /// uppercasing rule: the work of a Unicode server.
    Mixed,
    /// ASCII only (letters, digits, punctuation, space): what an ASCII-only server answers
    /// right, for comparing with one.
    Ascii,
}

/// One echo request line and the reply it must get back.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The request, ending in `\n`.
    pub line: Vec<u8>,
    /// The expected reply: the uppercase of `line`, ending in `\n`.
    pub expected: Vec<u8>,
}

/// Makes one random line of exactly `size` bytes (the `\n` included) made of `text`; the line
/// is always valid UTF-8.
pub fn random_line(rng: &mut Rng, size: usize, text: Text) -> Vec<u8> {
    let body = size.saturating_sub(1);
    let mut line = Vec::with_capacity(size);
    while line.len() < body {
        let room = body - line.len();
        let sample = UNICODE_SAMPLES[rng.below(UNICODE_SAMPLES.len() as u64) as usize];
        if text == Text::Mixed && rng.below(8) == 0 && sample.len() <= room {
            line.extend_from_slice(sample.as_bytes());
        } else {
            line.push(ASCII_SAMPLES[rng.below(ASCII_SAMPLES.len() as u64) as usize]);
        }
    }
    line.push(b'\n');
    line
}

/// Total bytes of request lines a thread's payload pool holds (the expected replies add about
/// as much again).
const POOL_BYTES: usize = 4 << 20;
/// Fewest and most distinct payloads per thread.
const POOL_MIN: usize = 16;
const POOL_MAX: usize = 1024;

/// A pool of random payloads with their expected replies, built once so that sending and
/// checking a request costs a copy and a compare, never an allocation.
pub fn payload_pool(rng: &mut Rng, size: usize, text: Text) -> Vec<Payload> {
    let count = (POOL_BYTES / size.max(1)).clamp(POOL_MIN, POOL_MAX);
    (0..count)
        .map(|_| {
            let line = random_line(rng, size, text);
            let mut expected = Vec::with_capacity(line.len() + line.len() / 2);
            uppercase_line(&line, &mut expected);
            Payload { line, expected }
        })
        .collect()
}

/// Bank operations the mix can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Transfer,
    Deposit,
    Withdraw,
    Balance,
}

/// Relative weights of the bank operations (`--mix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    /// (operation, cumulative weight), in the order given.
    table: Vec<(Op, u64)>,
}

impl Mix {
    /// Picks an operation with probability proportional to its weight.
    pub fn pick(&self, rng: &mut Rng) -> Op {
        let total = self.table.last().map_or(1, |&(_, w)| w);
        let x = rng.below(total);
        self.table
            .iter()
            .find(|&&(_, cum)| x < cum)
            .map_or(Op::Transfer, |&(op, _)| op)
    }
}

impl FromStr for Mix {
    type Err = String;

    /// `transfer=80,deposit=10,withdraw=10` (any subset of transfer, deposit, withdraw,
    /// balance; weights are whole numbers, at least one positive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut table = Vec::new();
        let mut total = 0u64;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected OP=WEIGHT"))?;
            let op = match name.trim().to_ascii_lowercase().as_str() {
                "transfer" => Op::Transfer,
                "deposit" => Op::Deposit,
                "withdraw" => Op::Withdraw,
                "balance" => Op::Balance,
                other => {
                    return Err(format!(
                        "unknown operation '{other}' (transfer, deposit, withdraw, balance)"
                    ))
                }
            };
            if table.iter().any(|&(o, _)| o == op) {
                return Err(format!("'{name}' given twice"));
            }
            let weight: u64 = weight
                .trim()
                .parse()
                .map_err(|_| format!("'{part}': the weight must be a whole number"))?;
            total = total
                .checked_add(weight)
                .ok_or_else(|| "weights too large".to_string())?;
            if weight > 0 {
                table.push((op, total));
            }
        }
        if table.is_empty() {
            return Err("at least one operation needs a positive weight".into());
        }
        Ok(Mix { table })
    }
}

/// The open-loop schedule of one thread: request `k` is due at `start + k / rate`. Requests that
/// could not be sent when due stay due (a backlog); their latency counts from the due time.
#[derive(Debug, Clone)]
pub struct Schedule {
    start: Instant,
    /// Seconds between two requests.
    interval: f64,
    /// Index of the next request to hand out.
    next: u64,
}

impl Schedule {
    /// `rate` requests per second from `start` on; `rate > 0`.
    pub fn new(start: Instant, rate: f64) -> Self {
        Schedule {
            start,
            interval: 1.0 / rate,
            next: 0,
        }
    }

    /// When the next request is due.
    pub fn next_due(&self) -> Instant {
        self.start + Duration::from_secs_f64(self.next as f64 * self.interval)
    }

    /// Takes the next request if it is due at `now`, returning its due time.
    pub fn take_due(&mut self, now: Instant) -> Option<Instant> {
        let due = self.next_due();
        (due <= now).then(|| {
            self.next += 1;
            due
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_below_stays_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            assert!(x < 10);
        }
    }

    #[test]
    fn lines_have_the_exact_size_and_are_valid_utf8_with_multibyte_characters() {
        let mut rng = Rng::new(1);
        let mut saw_multibyte = false;
        for size in [1, 2, 3, 5, 16, 100, 16 * 1024] {
            let line = random_line(&mut rng, size, Text::Mixed);
            assert_eq!(line.len(), size);
            assert_eq!(line.last(), Some(&b'\n'));
            assert!(!line[..size - 1].contains(&b'\n') && !line.contains(&b'\r'));
            let text = std::str::from_utf8(&line).expect("valid UTF-8");
            saw_multibyte |= !text.is_ascii();
        }
        assert!(saw_multibyte);
    }

    #[test]
    fn ascii_lines_are_ascii_with_the_exact_size() {
        let mut rng = Rng::new(2);
        for size in [1, 2, 16, 16 * 1024] {
            let line = random_line(&mut rng, size, Text::Ascii);
            assert_eq!(line.len(), size);
            assert!(line.is_ascii() && line.ends_with(b"\n"));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        }
    }

    #[test]
    fn pool_replies_are_the_uppercase() {
        let pool = payload_pool(&mut Rng::new(3), 64, Text::Mixed);
        assert!(pool.len() >= POOL_MIN);
        for p in &pool {
            let text = std::str::from_utf8(&p.line).expect("utf8");
            assert_eq!(p.expected, text.to_uppercase().into_bytes());
        }
        assert!(
            pool.iter().any(|p| p.expected.len() != p.line.len()),
            "no ß-like payload"
        );
    }

    #[test]
    fn mix_parses_and_picks_by_weight() {
        let mix: Mix = "transfer=3, deposit=1,withdraw=0".parse().expect("valid");
        let mut rng = Rng::new(9);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[mix.pick(&mut rng) as usize] += 1;
        }
        assert_eq!(counts[Op::Withdraw as usize], 0);
        assert_eq!(counts[Op::Balance as usize], 0);
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((2.7..3.3).contains(&ratio), "transfer/deposit = {ratio}");
    }

    #[test]
    fn mix_rejects_nonsense() {
        for bad in [
            "",
            "transfer=0",
            "steal=5",
            "transfer",
            "transfer=x",
            "deposit=1,deposit=2",
        ] {
            assert!(bad.parse::<Mix>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn schedule_hands_out_requests_at_the_rate_and_keeps_the_backlog() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 1000.0);
        assert_eq!(s.take_due(t0), Some(t0));
        assert_eq!(s.take_due(t0), None);
        // 10 ms later, ten more are due, each with its own due time.
        let later = t0 + Duration::from_millis(10);
        let dues: Vec<_> = std::iter::from_fn(|| s.take_due(later)).collect();
        assert_eq!(dues.len(), 10);
        assert_eq!(dues[0], t0 + Duration::from_millis(1));
        assert_eq!(dues[9], later);
        assert!(s.next_due() > later);
    }
}
