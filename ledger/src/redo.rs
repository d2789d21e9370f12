//! The formats of `--fsync always`'s durable state, and reading them back: the redo log's
//! records, the checkpoint, and the scan that finds which records recovery replays.
//!
//! A record carries the balances an operation left (redo values, by account name), so
//! replaying it twice, or over a state that already has it, is harmless. Every record and the
//! checkpoint end with an FNV-1a checksum of everything before it. All integers are
//! little-endian; records start on 8-byte boundaries.
//!
//! ```text
//! record:     magic "FPLR" (u32) | length (u32, a multiple of 8) | epoch | lsn | durable
//!             | kind (u8: 0 change, 1 switch) | entries (u8) | 6 zero bytes
//!             | entries: name length (u8), name, balance (u64) | zero padding | checksum (u64)
//! checkpoint: magic "FPCKPT01" | epoch | next lsn | log (0/1) | offset | accounts
//!             | accounts: name length (u8), name, balance (u64) | checksum (u64)
//! ```
//!
//! `epoch` names one life of the log: every cold start writes a checkpoint with a new epoch,
//! so records of an earlier life (a cut tail, an old segment) never join the chain. `durable`
//! is the durable LSN the appender knew: a whole record that says record `n` was durable
//! proves that a damaged record `n` is corruption, not a torn tail.

use forkpool_common::bank::AccountName;

const RECORD_MAGIC: [u8; 4] = *b"FPLR";
const CHECKPOINT_MAGIC: [u8; 8] = *b"FPCKPT01";
const RECORD_HEAD: usize = 40;
const KIND_CHANGE: u8 = 0;
const KIND_SWITCH: u8 = 1;
/// Most bytes one record takes (a transfer between two 64-byte names).
pub(crate) const MAX_RECORD: usize = RECORD_HEAD + 2 * (1 + 64 + 8) + 8 + 8;

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// The balances one operation left (one or two accounts).
    Change(Vec<(AccountName, u64)>),
    /// The log goes on at offset 0 of the other segment.
    Switch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) epoch: u64,
    pub(crate) lsn: u64,
    /// The durable LSN when the record was written.
    pub(crate) durable: u64,
    pub(crate) body: Body,
}

/// A consistent image of every account, and where the log goes on after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub(crate) epoch: u64,
    /// The LSN of the first record not in the image.
    pub(crate) next_lsn: u64,
    /// The segment (0 or 1) and offset where that record goes.
    pub(crate) log: u8,
    pub(crate) offset: u64,
    pub(crate) accounts: Vec<(AccountName, u64)>,
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn put_accounts(out: &mut Vec<u8>, accounts: &[(AccountName, u64)]) {
    for (name, balance) in accounts {
        let bytes = name.as_bytes();
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
        out.extend_from_slice(&balance.to_le_bytes());
    }
}

/// A cursor over untrusted bytes: every read is checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn account(&mut self) -> Option<(AccountName, u64)> {
        let len = usize::from(*self.take(1)?.first()?);
        let name = AccountName::new(self.take(len)?).ok()?;
        Some((name, self.u64()?))
    }
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_RECORD);
        out.extend_from_slice(&RECORD_MAGIC);
        out.extend_from_slice(&[0; 4]);
        for word in [self.epoch, self.lsn, self.durable] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        match &self.body {
            Body::Change(accounts) => {
                out.extend_from_slice(&[KIND_CHANGE, accounts.len() as u8, 0, 0, 0, 0, 0, 0]);
                put_accounts(&mut out, accounts);
            }
            Body::Switch => out.extend_from_slice(&[KIND_SWITCH, 0, 0, 0, 0, 0, 0, 0]),
        }
        out.resize(out.len().div_ceil(8) * 8, 0);
        let len = (out.len() + 8) as u32;
        out[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// The whole record at `offset` of `log`, and its length; `None` if the bytes there are
    /// not one (torn, damaged, never written).
    pub(crate) fn decode(log: &[u8], offset: usize) -> Option<(Record, usize)> {
        let head = log.get(offset..offset.checked_add(RECORD_HEAD)?)?;
        if head[0..4] != RECORD_MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(head[4..8].try_into().ok()?) as usize;
        if !len.is_multiple_of(8) || !(RECORD_HEAD + 8..=MAX_RECORD).contains(&len) {
            return None;
        }
        let bytes = log.get(offset..offset + len)?;
        let (body, sum) = bytes.split_at(len - 8);
        if u64::from_le_bytes(sum.try_into().ok()?) != checksum(body) {
            return None;
        }
        let mut r = Reader { bytes: body, at: 8 };
        let (epoch, lsn, durable) = (r.u64()?, r.u64()?, r.u64()?);
        let kind = r.take(8)?;
        let body = match kind[0] {
            KIND_CHANGE => {
                let accounts = (0..kind[1])
                    .map(|_| r.account())
                    .collect::<Option<Vec<_>>>()?;
                Body::Change(accounts)
            }
            KIND_SWITCH => Body::Switch,
            _ => return None,
        };
        let record = Record {
            epoch,
            lsn,
            durable,
            body,
        };
        Some((record, len))
    }
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(56 + self.accounts.len() * 32);
        out.extend_from_slice(&CHECKPOINT_MAGIC);
        let words = [
            self.epoch,
            self.next_lsn,
            u64::from(self.log),
            self.offset,
            self.accounts.len() as u64,
        ];
        for word in words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        put_accounts(&mut out, &self.accounts);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// The checkpoint in `bytes`, or `None` if they are not a whole, undamaged one.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Checkpoint> {
        let split = bytes.len().checked_sub(8)?;
        let (body, sum) = bytes.split_at(split);
        if body.get(..8)? != CHECKPOINT_MAGIC
            || u64::from_le_bytes(sum.try_into().ok()?) != checksum(body)
        {
            return None;
        }
        let mut r = Reader { bytes: body, at: 8 };
        let (epoch, next_lsn, log, offset, count) =
            (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let log = u8::try_from(log).ok().filter(|&l| l < 2)?;
        let accounts = (0..count)
            .map(|_| r.account())
            .collect::<Option<Vec<_>>>()?;
        (r.at == body.len()).then_some(Checkpoint {
            epoch,
            next_lsn,
            log,
            offset,
            accounts,
        })
    }
}

/// What recovery replays over a checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Replay {
    /// The changes after the checkpoint, in LSN order.
    pub(crate) changes: Vec<Vec<(AccountName, u64)>>,
    /// The LSN after the last whole record: where a torn tail was cut.
    pub(crate) next_lsn: u64,
}

/// A damaged record that later records prove was durable: refusing is the only safe answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CorruptRecord {
    pub(crate) lsn: u64,
    pub(crate) log: u8,
    pub(crate) offset: u64,
}

/// Follows the chain of records from the checkpoint's position through the two segments
/// `logs`: each must be whole, of the checkpoint's epoch and carry the next LSN; a switch
/// record continues at offset 0 of the other segment. The chain ends at the first place that
/// does not hold the next record. If any whole record of this epoch says that the missing
/// record was durable, the missing one is damaged in the middle of the log: `Err`.
pub(crate) fn scan(ckpt: &Checkpoint, logs: [&[u8]; 2]) -> Result<Replay, CorruptRecord> {
    let (mut log, mut offset, mut next) = (ckpt.log, ckpt.offset as usize, ckpt.next_lsn);
    let mut changes = Vec::new();
    while let Some((record, len)) = Record::decode(logs[usize::from(log)], offset) {
        if record.epoch != ckpt.epoch || record.lsn != next {
            break;
        }
        next += 1;
        match record.body {
            Body::Change(accounts) => {
                changes.push(accounts);
                offset += len;
            }
            Body::Switch => {
                log = 1 - log;
                offset = 0;
            }
        }
    }
    let proof = logs.iter().any(|bytes| {
        (0..bytes.len()).step_by(8).any(|at| {
            Record::decode(bytes, at)
                .is_some_and(|(r, _)| r.epoch == ckpt.epoch && r.durable >= next)
        })
    });
    if proof {
        return Err(CorruptRecord {
            lsn: next,
            log,
            offset: offset as u64,
        });
    }
    Ok(Replay {
        changes,
        next_lsn: next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AccountName {
        AccountName::new(s.as_bytes()).expect("valid name")
    }

    fn change(lsn: u64, durable: u64, acct: &str, balance: u64) -> Vec<u8> {
        let body = Body::Change(vec![(name(acct), balance)]);
        Record {
            epoch: 3,
            lsn,
            durable,
            body,
        }
        .encode()
    }

    fn ckpt() -> Checkpoint {
        Checkpoint {
            epoch: 3,
            next_lsn: 10,
            log: 0,
            offset: 0,
            accounts: vec![(name("a"), 5)],
        }
    }

    #[test]
    fn records_and_checkpoints_round_trip_and_refuse_any_damage() {
        let longest = Body::Change(vec![(name(&"x".repeat(64)), u64::MAX); 2]);
        for body in [Body::Switch, longest] {
            let record = Record {
                epoch: 1,
                lsn: 2,
                durable: 1,
                body,
            };
            let bytes = record.encode();
            assert!(bytes.len() <= MAX_RECORD && bytes.len().is_multiple_of(8));
            assert_eq!(Record::decode(&bytes, 0), Some((record, bytes.len())));
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 0x10;
                assert_eq!(Record::decode(&bad, 0), None, "flip at {i}");
            }
            assert_eq!(Record::decode(&bytes[..bytes.len() - 1], 0), None);
        }
        let bytes = ckpt().encode();
        assert_eq!(Checkpoint::decode(&bytes), Some(ckpt()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(Checkpoint::decode(&bad), None, "flip at {i}");
        }
    }

    #[test]
    fn the_chain_crosses_a_switch_and_stops_at_a_torn_tail() {
        let mut log0 = change(10, 9, "a", 6);
        log0.extend(
            Record {
                epoch: 3,
                lsn: 11,
                durable: 9,
                body: Body::Switch,
            }
            .encode(),
        );
        let mut log1 = change(12, 10, "b", 1);
        let torn = change(13, 11, "a", 7);
        log1.extend_from_slice(&torn[..torn.len() - 3]);
        // A whole record after the torn one (written, never flushed): not a proof.
        log1.extend(change(14, 12, "a", 8));
        let replay = scan(&ckpt(), [&log0, &log1]).expect("a torn tail is cut");
        assert_eq!(replay.next_lsn, 13);
        assert_eq!(replay.changes.len(), 2);
    }

    #[test]
    fn a_damaged_record_that_a_later_one_proves_durable_is_corruption() {
        let mut log0 = change(10, 9, "a", 6);
        let at = log0.len();
        log0.extend(change(11, 10, "a", 7));
        log0.extend(change(12, 11, "a", 8));
        log0[at + 20] ^= 1;
        let err = scan(&ckpt(), [&log0, &[]]).expect_err("corrupt in the middle");
        assert_eq!(
            err,
            CorruptRecord {
                lsn: 11,
                log: 0,
                offset: at as u64
            }
        );
    }

    #[test]
    fn records_of_another_epoch_or_an_old_lsn_end_the_chain() {
        let mut log0 = change(10, 9, "a", 6);
        let other_life = Record {
            epoch: 2,
            lsn: 11,
            durable: 200,
            body: Body::Change(vec![(name("a"), 1)]),
        };
        log0.extend(other_life.encode());
        let replay = scan(&ckpt(), [&log0, &[]]).expect("no proof in another epoch");
        assert_eq!(replay.next_lsn, 11);
        let mut log0 = change(10, 9, "a", 6);
        log0.extend(change(5, 4, "a", 1));
        assert_eq!(scan(&ckpt(), [&log0, &[]]).map(|r| r.next_lsn), Ok(11));
    }
}
