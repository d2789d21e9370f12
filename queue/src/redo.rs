//! The formats of the queue store's `--fsync always` durable state, and reading them back:
//! physical redo records (the words one transaction wrote), the checkpoint (an image of the
//! region's used parts), and the scan that finds which records recovery replays.
//!
//! A record carries the new value of every word its transaction wrote (journaled words and
//! the payload words of a new job), so replaying it over the state it was written on gives
//! the state after it, and replaying it twice is harmless. Every record and the checkpoint
//! end with an FNV-1a checksum of everything before it. Integers are little-endian; records
//! start on 8-byte boundaries. The chain rules are the ledger's (`ledger/src/redo.rs`):
//!
//! ```text
//! record:     magic "FPQR" (u32) | length (u32) | epoch | lsn | durable | kind (0 writes,
//!             1 switch) | count | count x (offset, value) | checksum
//! checkpoint: magic "FPQCKPT1" | epoch | next lsn | log (0/1) | offset | extents
//!             | extents x (offset, length, bytes padded to 8) | checksum
//! ```
//!
//! `epoch` names one life of the log (a cold start starts a new one), so records of an
//! earlier life never join the chain; `durable` is the durable LSN the appender knew: a whole
//! record that says record `n` was durable proves that a damaged record `n` is corruption,
//! not a torn tail.

const RECORD_MAGIC: [u8; 4] = *b"FPQR";
const CHECKPOINT_MAGIC: [u8; 8] = *b"FPQCKPT1";
const RECORD_HEAD: usize = 48;
const KIND_WRITES: u64 = 0;
const KIND_SWITCH: u64 = 1;

/// Bytes of a record of `words` written words.
pub(crate) fn record_bytes(words: usize) -> usize {
    RECORD_HEAD + words * 16 + 8
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// One transaction's writes: (offset, new value).
    Writes(Vec<(u64, u64)>),
    /// The log goes on at offset 0 of the other segment.
    Switch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) epoch: u64,
    pub(crate) lsn: u64,
    pub(crate) durable: u64,
    pub(crate) body: Body,
}

/// The region's used parts at one instant, and where the log goes on after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub(crate) epoch: u64,
    pub(crate) next_lsn: u64,
    pub(crate) log: u8,
    pub(crate) offset: u64,
    /// (offset in the region, bytes).
    pub(crate) extents: Vec<(u64, Vec<u8>)>,
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
}

fn put(out: &mut Vec<u8>, words: &[u64]) {
    words
        .iter()
        .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (kind, writes): (u64, &[(u64, u64)]) = match &self.body {
            Body::Writes(writes) => (KIND_WRITES, writes),
            Body::Switch => (KIND_SWITCH, &[]),
        };
        let len = record_bytes(writes.len());
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&RECORD_MAGIC);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        put(
            &mut out,
            &[
                self.epoch,
                self.lsn,
                self.durable,
                kind,
                writes.len() as u64,
            ],
        );
        writes.iter().for_each(|&(o, v)| put(&mut out, &[o, v]));
        let sum = checksum(&out);
        put(&mut out, &[sum]);
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
        if len < record_bytes(0) || !len.is_multiple_of(8) {
            return None;
        }
        let bytes = log.get(offset..offset.checked_add(len)?)?;
        let (body, sum) = bytes.split_at(len - 8);
        if u64::from_le_bytes(sum.try_into().ok()?) != checksum(body) {
            return None;
        }
        let mut r = Reader { bytes: body, at: 8 };
        let (epoch, lsn, durable, kind, count) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        if record_bytes(usize::try_from(count).ok()?) != len {
            return None;
        }
        let body = match kind {
            KIND_WRITES => Body::Writes(
                (0..count)
                    .map(|_| Some((r.u64()?, r.u64()?)))
                    .collect::<Option<_>>()?,
            ),
            KIND_SWITCH if count == 0 => Body::Switch,
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
        let bytes: usize = self.extents.iter().map(|(_, b)| b.len() + 16).sum();
        let mut out = Vec::with_capacity(56 + bytes + 8 * self.extents.len());
        out.extend_from_slice(&CHECKPOINT_MAGIC);
        let words = [
            self.epoch,
            self.next_lsn,
            u64::from(self.log),
            self.offset,
            self.extents.len() as u64,
        ];
        put(&mut out, &words);
        for (at, bytes) in &self.extents {
            put(&mut out, &[*at, bytes.len() as u64]);
            out.extend_from_slice(bytes);
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        let sum = checksum(&out);
        put(&mut out, &[sum]);
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
        let extents = (0..count)
            .map(|_| {
                let (at, len) = (r.u64()?, usize::try_from(r.u64()?).ok()?);
                let bytes = r.take(len)?.to_vec();
                r.take(len.div_ceil(8) * 8 - len)?;
                Some((at, bytes))
            })
            .collect::<Option<Vec<_>>>()?;
        (r.at == body.len()).then_some(Checkpoint {
            epoch,
            next_lsn,
            log,
            offset,
            extents,
        })
    }
}

/// What recovery replays over a checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Replay {
    /// Every write of the records after the checkpoint, in LSN order.
    pub(crate) writes: Vec<(u64, u64)>,
    /// Whole records replayed.
    pub(crate) records: u64,
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
    let mut replay = Replay {
        writes: Vec::new(),
        records: 0,
        next_lsn: next,
    };
    while let Some((record, len)) = Record::decode(logs[usize::from(log)], offset) {
        if record.epoch != ckpt.epoch || record.lsn != next {
            break;
        }
        next += 1;
        match record.body {
            Body::Writes(writes) => {
                replay.writes.extend(writes);
                replay.records += 1;
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
    replay.next_lsn = next;
    Ok(replay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(lsn: u64, durable: u64, value: u64) -> Vec<u8> {
        Record {
            epoch: 3,
            lsn,
            durable,
            body: Body::Writes(vec![(4096, value), (4104, value + 1)]),
        }
        .encode()
    }

    fn ckpt() -> Checkpoint {
        Checkpoint {
            epoch: 3,
            next_lsn: 10,
            log: 0,
            offset: 0,
            extents: vec![(0, vec![1, 2, 3]), (4096, vec![9; 16])],
        }
    }

    #[test]
    fn records_and_checkpoints_round_trip_and_refuse_any_damage() {
        for body in [Body::Switch, Body::Writes(vec![(8, u64::MAX); 5])] {
            let record = Record {
                epoch: 1,
                lsn: 2,
                durable: 1,
                body,
            };
            let bytes = record.encode();
            assert!(bytes.len().is_multiple_of(8));
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
        let mut log0 = writes(10, 9, 6);
        let switch = Record {
            epoch: 3,
            lsn: 11,
            durable: 9,
            body: Body::Switch,
        };
        log0.extend(switch.encode());
        let mut log1 = writes(12, 10, 1);
        let torn = writes(13, 11, 7);
        log1.extend_from_slice(&torn[..torn.len() - 3]);
        // A whole record after the torn one (written, never flushed): not a proof.
        log1.extend(writes(14, 12, 8));
        let replay = scan(&ckpt(), [&log0, &log1]).expect("a torn tail is cut");
        assert_eq!(replay.next_lsn, 13);
        assert_eq!(replay.records, 2);
        assert_eq!(
            replay.writes,
            vec![(4096, 6), (4104, 7), (4096, 1), (4104, 2)]
        );
    }

    #[test]
    fn a_damaged_record_that_a_later_one_proves_durable_is_corruption() {
        let mut log0 = writes(10, 9, 6);
        let at = log0.len();
        log0.extend(writes(11, 10, 7));
        log0.extend(writes(12, 11, 8));
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
}
