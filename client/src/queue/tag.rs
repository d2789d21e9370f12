//! A job's payload: who put it (producer, sequence number), when (nanoseconds since the run
//! started, for the put-to-done latency), padding to the requested size, and a checksum over
//! all of it, so a consumer can tell a job that was put from a damaged or invented one.
//!
//! Layout, ASCII: `<producer> <seq> <put_ns> <padding> <checksum: 16 hex digits>`.

/// Bytes of the checksum and the blank before it.
const CHECKSUM_BYTES: usize = 17;

/// What identifies a job and when it was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub producer: u32,
    pub seq: u64,
    pub put_ns: u64,
}

/// Why a payload is not one a producer wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("the checksum does not match the payload")]
    Checksum,
    #[error("not a job payload of this run")]
    Malformed,
}

/// FNV-1a, 64 bits: cheap, and any changed byte changes it.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Tag {
    /// Appends the payload of this job, `size` bytes (more if the fields need them), no
    /// newline; the padding depends on the sequence number so that payloads differ.
    pub fn write(&self, size: usize, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(
            format!("{} {} {} ", self.producer, self.seq, self.put_ns).as_bytes(),
        );
        let pad = size
            .saturating_sub(out.len() - start + CHECKSUM_BYTES)
            .max(1);
        out.extend((0..pad as u64).map(|i| b'a' + ((self.seq + i) % 26) as u8));
        let sum = checksum(&out[start..]);
        out.extend_from_slice(format!(" {sum:016x}").as_bytes());
    }

    /// The job a payload describes, if its checksum holds.
    pub fn parse(payload: &[u8]) -> Result<Tag, TagError> {
        let split = payload
            .len()
            .checked_sub(CHECKSUM_BYTES)
            .ok_or(TagError::Malformed)?;
        let (body, sum) = payload.split_at(split);
        let sum = std::str::from_utf8(&sum[1..])
            .ok()
            .filter(|_| sum[0] == b' ')
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or(TagError::Malformed)?;
        if checksum(body) != sum {
            return Err(TagError::Checksum);
        }
        let text = std::str::from_utf8(body).map_err(|_| TagError::Malformed)?;
        let mut fields = text.split(' ');
        let mut next = || fields.next().and_then(|f| f.parse::<u64>().ok());
        match (next(), next(), next()) {
            (Some(producer), Some(seq), Some(put_ns)) => Ok(Tag {
                producer: u32::try_from(producer).map_err(|_| TagError::Malformed)?,
                seq,
                put_ns,
            }),
            _ => Err(TagError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_round_trips_at_its_size() {
        let tag = Tag {
            producer: 15,
            seq: 123_456,
            put_ns: 9_876_543_210,
        };
        for size in [64, 100, 1000] {
            let mut out = Vec::new();
            tag.write(size, &mut out);
            assert_eq!(out.len(), size);
            assert!(!out.contains(&b'\n') && !out.contains(&b'\r'));
            assert_eq!(Tag::parse(&out), Ok(tag));
        }
    }

    #[test]
    fn any_changed_byte_is_caught() {
        let mut out = Vec::new();
        Tag {
            producer: 1,
            seq: 2,
            put_ns: 3,
        }
        .write(64, &mut out);
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x01;
            assert!(Tag::parse(&bad).is_err(), "byte {i}");
        }
        assert_eq!(Tag::parse(b"short"), Err(TagError::Malformed));
        assert_eq!(Tag::parse(&out[1..]), Err(TagError::Checksum));
    }
}
