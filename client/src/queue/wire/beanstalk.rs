//! beanstalkd's text protocol, in a tube of the run's own: producers `use` it and `put`,
//! consumers `watch` it (and ignore `default`), `reserve-with-timeout` and `delete`.
//! Priority 1024, no delay, and a time-to-run of an hour, so beanstalkd never hands a job
//! to a second consumer while the first still holds it.

use super::{number, Delivered, Line, PutReply, QueueClient, Role, WireError, GET_WAIT};

/// Seconds a reserved job stays with its consumer before beanstalkd takes it back.
const TIME_TO_RUN_S: u32 = 3600;

pub struct Beanstalk {
    line: Line,
    /// `reserve-with-timeout <s>\r\n`.
    reserve: Vec<u8>,
}

impl Beanstalk {
    pub fn new(mut line: Line, tube: &str, role: Role) -> Result<Self, WireError> {
        let setup: &[(String, &[u8])] = match role {
            Role::Producer => &[(format!("use {tube}"), b"USING ")],
            Role::Consumer => &[
                (format!("watch {tube}"), b"WATCHING "),
                ("ignore default".to_string(), b"WATCHING "),
            ],
        };
        for (request, reply) in setup {
            exchange(&mut line, request.as_bytes(), reply)?;
        }
        let wait_s = GET_WAIT.as_secs().max(1);
        Ok(Beanstalk {
            line,
            reserve: format!("reserve-with-timeout {wait_s}\r\n").into_bytes(),
        })
    }
}

/// Sends `request` (a command line) and expects a reply line starting with `expected`.
fn exchange(line: &mut Line, request: &[u8], expected: &[u8]) -> Result<Vec<u8>, WireError> {
    line.out.extend_from_slice(request);
    line.out.extend_from_slice(b"\r\n");
    line.send()?;
    let reply = line.read_line()?;
    if reply.starts_with(expected) {
        Ok(reply)
    } else {
        Err(WireError::unexpected(&reply))
    }
}

impl QueueClient for Beanstalk {
    fn put(&mut self, payload: &[u8]) -> Result<PutReply, WireError> {
        let head = format!("put 1024 0 {TIME_TO_RUN_S} {}\r\n", payload.len());
        self.line.out.extend_from_slice(head.as_bytes());
        let reply = exchange(&mut self.line, payload, b"INSERTED ")?;
        number(&reply[b"INSERTED ".len()..], &reply).map(|_| PutReply::Queued)
    }

    fn get(&mut self) -> Result<Option<Delivered>, WireError> {
        self.line.out.extend_from_slice(&self.reserve);
        self.line.send()?;
        let reply = self.line.read_line()?;
        if reply == b"TIMED_OUT" || reply == b"DEADLINE_SOON" {
            return Ok(None);
        }
        let mut fields = reply
            .strip_prefix(b"RESERVED ")
            .ok_or_else(|| WireError::unexpected(&reply))?
            .split(|&b| b == b' ');
        let (Some(id), Some(bytes), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(WireError::unexpected(&reply));
        };
        let id = number(id, &reply)?;
        let bytes = number(bytes, &reply)?;
        let payload = self
            .line
            .read_block(usize::try_from(bytes).unwrap_or(usize::MAX))?;
        Ok(Some(Delivered { id, payload }))
    }

    fn done(&mut self, job: &Delivered) -> Result<(), WireError> {
        let request = format!("delete {}", job.id);
        let reply = exchange(&mut self.line, request.as_bytes(), b"DELETED")?;
        if reply == b"DELETED" {
            Ok(())
        } else {
            Err(WireError::unexpected(&reply))
        }
    }
}
