//! CPU cost of uppercasing one echo line, in process: forkpool's `uppercase_line` (what the
//! server runs on every request) against the plain definition it must equal (each character
//! through `char::to_uppercase`, what a straightforward server does) and a bare copy, on
//! lines shaped like forkpool-bench's payloads (mostly ASCII, one character in eight
//! multi-byte UTF-8 from the same sample set) and on all-ASCII lines.
//!
//! `cargo run --release --manifest-path bench/uppercase-cost/Cargo.toml`
//!
//! Times are thread CPU time (schedstat), so other load on the machine inflates them less.

use forkpool_common::codec::{prepare_uppercase_tables, uppercase_line};

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

/// The definition: each valid character through `char::to_uppercase`, invalid bytes as
/// they are.
fn plain_definition(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            for upper in c.to_uppercase() {
                out.extend_from_slice(upper.encode_utf8(&mut [0; 4]).as_bytes());
            }
        }
        out.extend_from_slice(chunk.invalid());
    }
}

fn main() {
    prepare_uppercase_tables();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    println!("{:>8} {:10} {:34} {:>12}", "size", "payload", "uppercaser", "µs per line");
    for size in [16usize, 16 * 1024] {
        for multibyte in [true, false] {
            let lines: Vec<Vec<u8>> = (0..64).map(|_| line(&mut rng, size, multibyte)).collect();
            let candidates: [(&str, &dyn Fn(&[u8], &mut Vec<u8>)); 3] = [
                ("forkpool uppercase_line", &uppercase_line),
                ("plain definition (to_uppercase)", &plain_definition),
                ("memcpy only (lower bound)", &|b, o| o.extend_from_slice(b)),
            ];
            for (name, upper) in candidates {
                for l in &lines {
                    let (mut want, mut got) = (Vec::new(), Vec::new());
                    plain_definition(l, &mut want);
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
