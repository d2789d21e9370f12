//! forkpool's queue service: `PUT <queue> <timeout_ms> <payload>` -> `OK <id>`, `GET <queue>
//! <wait_ms>` -> `JOB <id> <payload>` or `ERR timeout`, `DONE <id>` -> `OK`.

use super::{number, Delivered, Line, PutReply, QueueClient, Target, WireError, GET_WAIT};

pub struct Forkpool {
    line: Line,
    /// `PUT <queue> <timeout_ms> `, the start of every PUT.
    put: Vec<u8>,
    /// `GET <queue> <wait_ms>\n`.
    get: Vec<u8>,
}

/// How a wait that ran out is answered.
const TIMEOUT: &[u8] = b"ERR timeout";

impl Forkpool {
    pub fn new(line: Line, target: &Target) -> Self {
        let q = &target.queue;
        Forkpool {
            line,
            put: format!("PUT {q} {} ", target.timeout.as_millis()).into_bytes(),
            get: format!("GET {q} {}\n", GET_WAIT.as_millis()).into_bytes(),
        }
    }
}

impl QueueClient for Forkpool {
    fn put(&mut self, payload: &[u8]) -> Result<PutReply, WireError> {
        self.line.out.extend_from_slice(&self.put);
        self.line.out.extend_from_slice(payload);
        self.line.out.push(b'\n');
        self.line.send()?;
        let reply = self.line.read_line()?;
        match reply.strip_prefix(b"OK ") {
            Some(id) => number(id, &reply).map(|_| PutReply::Queued),
            None if reply.starts_with(TIMEOUT) => Ok(PutReply::Refused),
            None => Err(WireError::unexpected(&reply)),
        }
    }

    fn get(&mut self) -> Result<Option<Delivered>, WireError> {
        self.line.out.extend_from_slice(&self.get);
        self.line.send()?;
        let reply = self.line.read_line()?;
        if reply.starts_with(TIMEOUT) {
            return Ok(None);
        }
        let job = reply
            .strip_prefix(b"JOB ")
            .and_then(|rest| {
                let blank = rest.iter().position(|&b| b == b' ')?;
                Some((&rest[..blank], &rest[blank + 1..]))
            })
            .ok_or_else(|| WireError::unexpected(&reply))?;
        Ok(Some(Delivered {
            id: number(job.0, &reply)?,
            payload: job.1.to_vec(),
        }))
    }

    fn done(&mut self, job: &Delivered) -> Result<(), WireError> {
        self.line
            .out
            .extend_from_slice(format!("DONE {}\n", job.id).as_bytes());
        self.line.send()?;
        let reply = self.line.read_line()?;
        if reply == b"OK" {
            Ok(())
        } else {
            Err(WireError::unexpected(&reply))
        }
    }
}
