//! The non-ASCII half of uppercasing: copying text in which multi-byte characters come every
//! few bytes, with each character replaced by its uppercase, fast. [`super::uppercase_line`]
//! calls it for input that is not all ASCII, then uppercases the ASCII letters in bulk.
//!
//! Walking such text a character at a time makes each step wait for the previous one (where
//! does the next character start?) and mispredicts a branch per character. Here the lead
//! bytes of a 64-byte block are found at once, as a bit mask; each character is decoded
//! without jumps on its length, validated, looked up in a two-level table built once from
//! the standard library's mappings, and stored as one word; the bytes between characters go
//! with one fixed-size copy. `bench/uppercase-cost` measures it; docs/BENCHMARKS.md has the figures.

use std::sync::LazyLock;

/// Builds the table now (see [`super::prepare_uppercase_tables`]).
pub(super) fn prepare_tables() {
    LazyLock::force(&UPPER_TABLE);
}

/// An uppercase is at most three times as long as its character (`ΐ`: 2 bytes to 6).
pub(super) const MAX_GROWTH: usize = 3;
/// Bytes in a machine word: the loads and stores the kernel is built from.
pub(super) const WORD: usize = 8;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Copies `input` to the front of `out` with its non-ASCII characters uppercased and its
/// ASCII as it is (the caller uppercases ASCII in bulk); returns the bytes written. `out`
/// must hold `input.len() * MAX_GROWTH + STORE_SLACK` bytes.
///
/// Each lead byte is handled on its own: the bytes since the previous character are copied
/// with one fixed-size store, and the character's replacement from [`UpperTable`] with
/// another.
pub(super) fn copy_uppercasing_non_ascii(input: &[u8], out: &mut [u8]) -> usize {
    let table = &*UPPER_TABLE;
    // input[..done] is in out[..written].
    let (mut done, mut written) = (0, 0);
    for (index, block) in input.chunks(BLOCK).enumerate() {
        let mut leads = lead_bytes(block);
        while leads != 0 {
            let at = index * BLOCK + leads.trailing_zeros() as usize;
            leads &= leads - 1;
            // Since the previous character: ASCII and stray continuation bytes, unchanged.
            written += copy_run(input, done, at, &mut out[written..]);
            let next = Character::decode(&input[at..]);
            let replacement = match table.mapping(next.code_point) {
                UNCHANGED => next.bytes,
                upper => upper,
            };
            out[written..written + WORD].copy_from_slice(&replacement.to_le_bytes());
            written += mapping_len_or(replacement, next.len);
            done = at + next.len;
        }
    }
    written + copy_run(input, done, input.len(), &mut out[written..])
}

/// Bytes whose lead bytes [`lead_bytes`] finds at once.
const BLOCK: usize = 64;
/// Room a single store may need past the end of what it counts as written.
pub(super) const STORE_SLACK: usize = 16;

/// A bit mask of the bytes in `block` (at most 64) that are 0xC0 or above: the lead bytes
/// of multi-byte sequences, and bytes that never start one.
fn lead_bytes(block: &[u8]) -> u64 {
    let Some(block) = block.first_chunk::<BLOCK>() else {
        // The short last block, a byte at a time.
        return block
            .iter()
            .enumerate()
            .fold(0, |mask, (i, &byte)| mask | u64::from(byte >= 0xC0) << i);
    };
    let mut mask = 0;
    for (i, word) in block.chunks_exact(WORD).enumerate() {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // Bit 7 of each byte whose bits 7 and 6 are both set, moved to bit 0...
        let lead_bits = (word & (word << 1) & HIGH_BITS) >> 7;
        // ...and the eight gathered into the top byte (no two partial products overlap).
        let gathered = lead_bits.wrapping_mul(0x0102_0408_1020_4080) >> 56;
        mask |= gathered << (WORD * i);
    }
    mask
}

/// Copies `input[from..to]` to the front of `out` (which has [`STORE_SLACK`] bytes more);
/// returns its length. A short run, as between characters, is one fixed-size copy.
fn copy_run(input: &[u8], from: usize, to: usize, out: &mut [u8]) -> usize {
    let len = to - from;
    match input[from..].first_chunk::<STORE_SLACK>() {
        Some(chunk) => {
            out[..STORE_SLACK].copy_from_slice(chunk);
            if len > STORE_SLACK {
                out[STORE_SLACK..len].copy_from_slice(&input[from + STORE_SLACK..to]);
            }
        }
        None => out[..len].copy_from_slice(&input[from..to]),
    }
    len
}

/// The character a byte of 0xC0 or above starts, taken for uppercasing.
struct Character {
    /// What it maps by: its code point, or 0 for an invalid byte (0 maps to [`UNCHANGED`]).
    code_point: u32,
    /// How many input bytes it covers: 1 for an invalid byte.
    len: usize,
    /// Those bytes, low byte first.
    bytes: Mapping,
}

impl Character {
    /// Takes the valid UTF-8 sequence that starts `bytes`, or its first byte alone if it
    /// does not start one (a byte that never leads, overlong form, surrogate, beyond
    /// U+10FFFF, cut short: invalid bytes go back unchanged, and decoding resumes at the
    /// next byte).
    ///
    /// The length comes from the lead byte's high bits and the code point is assembled as
    /// if four bytes long, then shifted down; the checks are combined into one jump, which
    /// valid text never takes.
    fn decode(bytes: &[u8]) -> Character {
        let word = match bytes.first_chunk::<4>() {
            Some(four) => u32::from_le_bytes(*four),
            None => {
                // Missing bytes read as 0, which is never a continuation byte.
                let mut four = [0u8; 4];
                let n = bytes.len().min(4);
                four[..n].copy_from_slice(&bytes[..n]);
                u32::from_le_bytes(four)
            }
        };
        let lead = word as u8;
        // 0 for ASCII, 1 for a continuation byte, 2 to 4 for a lead byte, more for junk.
        let len = (!lead).leading_zeros() as usize;
        if len == 1 || len > 4 {
            return Character::invalid(lead);
        }
        const CONTINUATION_MASK: [u32; 5] = [0, 0, 0xC000, 0xC0_C000, 0xC0C0_C000];
        const CONTINUATION_BITS: [u32; 5] = [0, 0, 0x8000, 0x80_8000, 0x8080_8000];
        const SMALLEST: [u32; 5] = [0, 0, 0x80, 0x800, 0x1_0000];
        // ASCII (never passed in, but valid) is a sequence of length 1. Written this way the
        // compiler keeps the arithmetic below free of jumps; variants that rule out lengths
        // 0 and 1 first measured a third slower on mixed text (bench/uppercase-cost).
        let len_or_one = len.max(1);
        let payload = |i: u32| (word >> (8 * i)) & 0x3F;
        let as_four =
            u32::from(lead & (0x7F >> len)) << 18 | payload(1) << 12 | payload(2) << 6 | payload(3);
        let code_point = as_four >> (6 * (4 - len_or_one));
        let valid = (word & CONTINUATION_MASK[len] == CONTINUATION_BITS[len])
            & (code_point >= SMALLEST[len])
            & !(0xD800..=0xDFFF).contains(&code_point)
            & (code_point <= 0x10_FFFF);
        if !valid {
            return Character::invalid(lead);
        }
        Character {
            code_point,
            len: len_or_one,
            bytes: Mapping::from(word & (u32::MAX >> (8 * (4 - len_or_one)))),
        }
    }

    fn invalid(byte: u8) -> Character {
        Character {
            code_point: 0,
            len: 1,
            bytes: Mapping::from(byte),
        }
    }
}

/// A character's uppercase packed in a word: its UTF-8 bytes (at most six) from the low
/// byte up, and their count in the top byte. [`UNCHANGED`] for a character that is its own
/// uppercase.
type Mapping = u64;
const UNCHANGED: Mapping = 0;

/// The length a mapping records, or `own_len` for a character's own bytes (which record
/// none).
fn mapping_len_or(mapping: Mapping, own_len: usize) -> usize {
    match (mapping >> 56) as usize {
        0 => own_len,
        len => len,
    }
}

/// The mapping of one code point, from the standard library. Cold: [`UpperTable`] answers
/// for the text a server sees, and this code stays out of the hot loop.
#[cold]
#[inline(never)]
fn mapping_of(code_point: u32) -> Mapping {
    let Some(c) = char::from_u32(code_point) else {
        return UNCHANGED;
    };
    let mut bytes = [0u8; WORD];
    let mut len = 0;
    for upper in c.to_uppercase() {
        len += upper.encode_utf8(&mut bytes[len..WORD - 2]).len();
    }
    let mut own = [0u8; 4];
    if bytes[..len] == *c.encode_utf8(&mut own).as_bytes() {
        return UNCHANGED;
    }
    bytes[WORD - 1] = len as u8;
    Mapping::from_le_bytes(bytes)
}

/// Every uppercase mapping below [`TABLE_END`], two-level: the standard library finds a
/// mapping by binary search (tens of ns); this is two loads. Characters from U+20000 up
/// (CJK extensions, caseless today) ask the standard library.
struct UpperTable {
    /// For each block of 256 code points, the index of its row in `rows`; row 0 is all
    /// [`UNCHANGED`] and serves every caseless block (most of them).
    block_row: Vec<u16>,
    rows: Vec<[Mapping; 256]>,
}

/// The first two planes: every cased character of Unicode 17 (the last is U+1E943).
const TABLE_END: u32 = 0x2_0000;

static UPPER_TABLE: LazyLock<UpperTable> = LazyLock::new(UpperTable::build);

impl UpperTable {
    fn build() -> UpperTable {
        let mut rows = vec![[UNCHANGED; 256]];
        let block_row = (0..TABLE_END >> 8)
            .map(|block| {
                let row: [Mapping; 256] =
                    std::array::from_fn(|low| mapping_of(block << 8 | low as u32));
                if row == rows[0] {
                    return 0;
                }
                rows.push(row);
                (rows.len() - 1) as u16
            })
            .collect();
        UpperTable { block_row, rows }
    }

    fn mapping(&self, code_point: u32) -> Mapping {
        match self.block_row.get((code_point >> 8) as usize) {
            Some(&row) => self.rows[usize::from(row)][(code_point & 0xFF) as usize],
            None => mapping_of(code_point),
        }
    }
}
