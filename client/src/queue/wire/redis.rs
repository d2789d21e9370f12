//! redis, the reliable-queue pattern in RESP: `LPUSH <queue> <job>`, `BLMOVE <queue>
//! <queue>:processing RIGHT LEFT <wait>` (the job moves to a processing list while a consumer
//! holds it), `LREM <queue>:processing 1 <job>` once done. A job is named by its payload.
//! redis does not hand the job of a consumer that went away to another: it stays in the
//! processing list (a reaper would move it back; this client has none).

use super::{number, Delivered, Line, PutReply, QueueClient, WireError, GET_WAIT};

pub struct Redis {
    line: Line,
    queue: Vec<u8>,
    processing: Vec<u8>,
    /// The BLMOVE wait in seconds, as redis reads it.
    wait: Vec<u8>,
}

impl Redis {
    pub fn new(line: Line, queue: &str) -> Self {
        Redis {
            line,
            queue: queue.as_bytes().to_vec(),
            processing: format!("{queue}:processing").into_bytes(),
            wait: format!("{}", GET_WAIT.as_secs_f64()).into_bytes(),
        }
    }
}

/// Sends one command (an array of bulk strings) and reads the reply's first line.
fn command(line: &mut Line, args: &[&[u8]]) -> Result<Vec<u8>, WireError> {
    let out = &mut line.out;
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    line.send()?;
    line.read_line()
}

/// A command whose reply must be the integer `:N` with N at least 1.
fn count(line: &mut Line, args: &[&[u8]]) -> Result<(), WireError> {
    let reply = command(line, args)?;
    match reply.strip_prefix(b":") {
        Some(n) if number(n, &reply)? >= 1 => Ok(()),
        _ => Err(WireError::unexpected(&reply)),
    }
}

impl QueueClient for Redis {
    fn put(&mut self, payload: &[u8]) -> Result<PutReply, WireError> {
        count(&mut self.line, &[b"LPUSH", &self.queue, payload]).map(|()| PutReply::Queued)
    }

    fn get(&mut self) -> Result<Option<Delivered>, WireError> {
        let reply = command(
            &mut self.line,
            &[
                b"BLMOVE",
                &self.queue,
                &self.processing,
                b"RIGHT",
                b"LEFT",
                &self.wait,
            ],
        )?;
        if reply == b"*-1" || reply == b"$-1" {
            return Ok(None);
        }
        let len = reply
            .strip_prefix(b"$")
            .ok_or_else(|| WireError::unexpected(&reply))?;
        let len = number(len, &reply)?;
        let payload = self
            .line
            .read_block(usize::try_from(len).unwrap_or(usize::MAX))?;
        Ok(Some(Delivered { id: 0, payload }))
    }

    fn done(&mut self, job: &Delivered) -> Result<(), WireError> {
        count(
            &mut self.line,
            &[b"LREM", &self.processing, b"1", &job.payload],
        )
    }
}
