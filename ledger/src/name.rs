//! Account names: validation, the fixed-size in-memory form used by the ledger (no heap, so a
//! forked child may use it), and the keyed hash that places an account in a stripe and a slot.

use std::fmt;

use crate::error::BadAccount;

/// Longest account name in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A validated account name: 1..=64 bytes of `[A-Za-z0-9_.-]`, case-sensitive.
///
/// Stored inline (no allocation), zero-padded to 64 bytes so that comparing two names is
/// comparing eight words.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountName {
    len: u8,
    bytes: [u8; MAX_NAME_LEN],
}

impl AccountName {
    /// Validates `bytes` as an account name.
    pub fn new(bytes: &[u8]) -> Result<AccountName, BadAccount> {
        if bytes.is_empty() {
            return Err(BadAccount::Empty);
        }
        if bytes.len() > MAX_NAME_LEN {
            return Err(BadAccount::TooLong(bytes.len()));
        }
        if let Some(offset) = bytes.iter().position(|&b| !is_name_byte(b)) {
            return Err(BadAccount::BadByte {
                byte: bytes[offset],
                offset,
            });
        }
        let mut padded = [0u8; MAX_NAME_LEN];
        padded[..bytes.len()].copy_from_slice(bytes);
        Ok(AccountName {
            // The length was checked against MAX_NAME_LEN (64) above.
            len: bytes.len() as u8,
            bytes: padded,
        })
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The name as a string (always ASCII).
    pub fn as_str(&self) -> &str {
        // Validation admits only ASCII bytes, so this never fails; fall back to "" rather
        // than panic.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub(crate) fn len(&self) -> u64 {
        u64::from(self.len)
    }

    /// The zero-padded name as eight native-endian words, the form stored in a slot.
    pub(crate) fn words(&self) -> [u64; 8] {
        let mut words = [0u64; 8];
        for (word, chunk) in words.iter_mut().zip(self.bytes.chunks_exact(8)) {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(chunk);
            *word = u64::from_ne_bytes(eight);
        }
        words
    }

    /// Rebuilds a name from a slot's stored words; `None` if they are not a valid name.
    pub(crate) fn from_words(len: u64, words: &[u64; 8]) -> Option<AccountName> {
        let len = usize::try_from(len).ok().filter(|&l| l <= MAX_NAME_LEN)?;
        let mut bytes = [0u8; MAX_NAME_LEN];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        if bytes[len..].iter().any(|&b| b != 0) {
            return None;
        }
        AccountName::new(&bytes[..len]).ok()
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'
}

impl fmt::Debug for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountName({:?})", self.as_str())
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    fn names_are_validated() {
        assert_eq!(AccountName::new(b""), Err(BadAccount::Empty));
        assert_eq!(AccountName::new(&[b'a'; 65]), Err(BadAccount::TooLong(65)));
        assert_eq!(
            AccountName::new(b"ab c"),
            Err(BadAccount::BadByte {
                byte: b' ',
                offset: 2
            })
        );
        assert!(AccountName::new(&[b'z'; 64]).is_ok());
        let n = AccountName::new(b"Alice_1.x-Y").expect("valid name");
        assert_eq!(n.as_bytes(), b"Alice_1.x-Y");
        assert_ne!(n, AccountName::new(b"alice_1.x-Y").expect("valid name"));
    }

    #[test]
    fn words_round_trip() {
        let n = AccountName::new(&[b'q'; 64]).expect("valid name");
        assert_eq!(AccountName::from_words(n.len(), &n.words()), Some(n));
        let short = AccountName::new(b"ab").expect("valid name");
        assert_eq!(
            AccountName::from_words(short.len(), &short.words()),
            Some(short)
        );
        assert_eq!(AccountName::from_words(1, &short.words()), None);
        assert_eq!(AccountName::from_words(0, &[0; 8]), None);
    }
}
