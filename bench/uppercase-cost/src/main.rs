//! CPU cost of uppercasing one echo line, in process: forkpool's `uppercase_line` (what the
//! server runs on every request) against two candidates that give the same bytes, on lines
//! shaped like forkpool-bench's payloads (mostly ASCII, one character in eight multi-byte
//! UTF-8 from the same sample set) and on all-ASCII lines.
//!
//! `cargo run --release --manifest-path bench/uppercase-cost/Cargo.toml`
//!
//! Times are thread CPU time (schedstat), so other load on the machine inflates them less.

use forkpool_common::codec::uppercase_line;

/// The same characters forkpool-bench mixes into its payloads.
const UNICODE: &[&str] = &["ß", "é", "ж", "ω", "ǆ", "ﬁ", "ŉ", "ΐ", "ı", "中", "€", "😀"];
const ASCII: &[u8] = b"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-_=+*/()[]{}<>@#$%^&~'\"\\|`";

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat is readable on Linux")
}

struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn line(rng: &mut XorShift, size: usize, multibyte: bool) -> Vec<u8> {
    let mut l = Vec::with_capacity(size);
    while l.len() < size - 1 {
        let sample = UNICODE[rng.below(UNICODE.len())];
        if multibyte && rng.below(8) == 0 && sample.len() <= size - 1 - l.len() {
            l.extend_from_slice(sample.as_bytes());
        } else {
            l.push(ASCII[rng.below(ASCII.len())]);
        }
    }
    l.push(b'\n');
    l
}

/// Candidate 1: ASCII runs copied and uppercased in bulk; each non-ASCII sequence goes
/// through `uppercase_line` alone.
fn ascii_runs(bytes: &[u8], out: &mut Vec<u8>) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let run = rest.iter().position(|&b| b >= 0x80).unwrap_or(rest.len());
        let start = out.len();
        out.extend_from_slice(&rest[..run]);
        out[start..].make_ascii_uppercase();
        rest = &rest[run..];
        if rest.is_empty() {
            break;
        }
        let len = sequence_len(rest[0]).min(rest.len());
        uppercase_line(&rest[..len], out);
        rest = &rest[len..];
    }
}

/// Candidate 2: as candidate 1, plus a precomputed table for two-byte sequences (U+0080 to
/// U+07FF: Latin, Greek, Cyrillic), where most cased non-ASCII text lives.
fn ascii_runs_and_table(table: &[([u8; 8], u8)], bytes: &[u8], out: &mut Vec<u8>) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let run = rest.iter().position(|&b| b >= 0x80).unwrap_or(rest.len());
        let start = out.len();
        out.extend_from_slice(&rest[..run]);
        out[start..].make_ascii_uppercase();
        rest = &rest[run..];
        if rest.is_empty() {
            break;
        }
        if rest.len() >= 2 && (0xC2..=0xDF).contains(&rest[0]) && rest[1] & 0xC0 == 0x80 {
            let cp = (usize::from(rest[0] & 0x1F) << 6) | usize::from(rest[1] & 0x3F);
            let (upper, n) = &table[cp];
            out.extend_from_slice(&upper[..usize::from(*n)]);
            rest = &rest[2..];
            continue;
        }
        let len = sequence_len(rest[0]).min(rest.len());
        uppercase_line(&rest[..len], out);
        rest = &rest[len..];
    }
}

fn sequence_len(lead: u8) -> usize {
    match lead {
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

fn two_byte_table() -> Vec<([u8; 8], u8)> {
    (0u32..0x800)
        .map(|cp| {
            let mut entry = ([0u8; 8], 0u8);
            if let Some(c) = char::from_u32(cp) {
                let upper: String = c.to_uppercase().collect();
                entry.0[..upper.len()].copy_from_slice(upper.as_bytes());
                entry.1 = upper.len() as u8;
            }
            entry
        })
        .collect()
}

fn main() {
    let table = two_byte_table();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    println!("{:>8} {:10} {:34} {:>12}", "size", "payload", "uppercaser", "µs per line");
    for size in [16usize, 16 * 1024] {
        for multibyte in [true, false] {
            let lines: Vec<Vec<u8>> = (0..64).map(|_| line(&mut rng, size, multibyte)).collect();
            let candidates: [(&str, &dyn Fn(&[u8], &mut Vec<u8>)); 4] = [
                ("forkpool uppercase_line", &uppercase_line),
                ("ASCII runs in bulk", &ascii_runs),
                ("ASCII runs + two-byte table", &|b, o| ascii_runs_and_table(&table, b, o)),
                ("memcpy only (lower bound)", &|b, o| o.extend_from_slice(b)),
            ];
            for (name, upper) in candidates {
                for l in &lines {
                    let (mut want, mut got) = (Vec::new(), Vec::new());
                    uppercase_line(l, &mut want);
                    upper(l, &mut got);
                    assert!(name.starts_with("memcpy") || want == got, "{name} differs");
                }
                let iters = if size == 16 { 2_000_000 } else { 20_000 };
                let mut out = Vec::with_capacity(size * 3 + 64);
                let start = thread_cpu_ns();
                for i in 0..iters {
                    out.clear();
                    upper(std::hint::black_box(&lines[i % lines.len()]), &mut out);
                    std::hint::black_box(&out);
                }
                let us = (thread_cpu_ns() - start) as f64 / 1e3 / iters as f64;
                let kind = if multibyte { "1/8 UTF-8" } else { "ASCII" };
                println!("{size:>8} {kind:10} {name:34} {us:>12.3}");
            }
        }
    }
}
