//! How the ledger stores and places account names: the fixed-size word form kept in a slot,
//! and the keyed hash that picks an account's stripe and slot. Validation is the protocol's
//! ([`AccountName`] from `forkpool-common`), so the server and the ledger agree on what a
//! name is.

pub use forkpool_common::bank::{AccountName, MAX_ACCOUNT_LEN};

/// The name's length, in the form a slot stores.
pub(crate) fn stored_len(name: &AccountName) -> u64 {
    name.as_bytes().len() as u64
}

/// The zero-padded name as eight native-endian words, the form stored in a slot.
pub(crate) fn words(name: &AccountName) -> [u64; 8] {
    let mut padded = [0u8; MAX_ACCOUNT_LEN];
    padded[..name.as_bytes().len()].copy_from_slice(name.as_bytes());
    let mut words = [0u64; 8];
    for (word, chunk) in words.iter_mut().zip(padded.chunks_exact(8)) {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(chunk);
        *word = u64::from_ne_bytes(eight);
    }
    words
}

/// Rebuilds a name from a slot's stored words; `None` if they are not a valid name.
pub(crate) fn from_words(len: u64, words: &[u64; 8]) -> Option<AccountName> {
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_ACCOUNT_LEN)?;
    let mut bytes = [0u8; MAX_ACCOUNT_LEN];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    if bytes[len..].iter().any(|&b| b != 0) {
        return None;
    }
    AccountName::new(&bytes[..len]).ok()
}

/// The keyed hash of a name (FNV-1a seeded with the file's random key, then the splitmix64
/// finaliser). The key makes slot placement differ between files; it is not a defence against
/// an attacker who can observe timings (see docs/LEDGER.md).
pub(crate) fn hash(key: u64, name: &AccountName) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ key;
    for &b in name.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        let n = AccountName::new(&[b'q'; 64]).expect("valid name");
        assert_eq!(from_words(stored_len(&n), &words(&n)), Some(n));
        let short = AccountName::new(b"ab").expect("valid name");
        assert_eq!(from_words(stored_len(&short), &words(&short)), Some(short));
        assert_eq!(from_words(1, &words(&short)), None);
        assert_eq!(from_words(0, &[0; 8]), None);
    }
}
