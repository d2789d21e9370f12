//! The three queue servers behind one blocking interface, so the same producer and consumer
//! loops drive each: [`QueueClient`] (put a payload, get a job waiting a little while the
//! queue is empty, mark a job done), a buffered [`Line`] connection for the text and RESP
//! protocols, and [`connect`]. One module per server: `forkpool`, `beanstalk`, `redis`.

mod beanstalk;
mod forkpool;
mod redis;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::args::Protocol;
use forkpool_common::bank::escape_for_reply;

/// How long a GET waits on the server for a job before it returns empty-handed (so consumers
/// look at the run's end regularly). beanstalkd counts whole seconds and waits 1 s.
const GET_WAIT: Duration = Duration::from_millis(250);
/// Bytes of a reply beyond its payload that a reply line may have.
const REPLY_OVERHEAD: usize = 64;

/// A job as a consumer got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The server's id of the job (0 for redis, which names a job by its payload).
    pub id: u64,
    pub payload: Vec<u8>,
}

/// What a PUT came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutReply {
    Queued,
    /// The server refused it in time (forkpool's `ERR timeout` on a full queue).
    Refused,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no reply within the timeout")]
    Timeout,
    #[error("the server closed the connection")]
    Closed,
    /// A reply that is not one the request can get: the server is wrong, not the network.
    #[error("unexpected reply '{0}'")]
    Unexpected(String),
}

impl WireError {
    /// The reply `line`, printable, as an [`WireError::Unexpected`].
    fn unexpected(line: &[u8]) -> Self {
        WireError::Unexpected(escape_for_reply(line, 120))
    }
}

/// One connection to a queue server, in one role.
pub trait QueueClient: Send {
    /// Puts one job whose payload is `payload`.
    fn put(&mut self, payload: &[u8]) -> Result<PutReply, WireError>;
    /// Gets the next job, waiting a little ([`GET_WAIT`]) while there is none.
    fn get(&mut self) -> Result<Option<Delivered>, WireError>;
    /// Marks a job this connection got as done.
    fn done(&mut self, job: &Delivered) -> Result<(), WireError>;
}

/// What a connection is for (beanstalkd needs to know: producers `use` the tube, consumers
/// `watch` it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer,
    Consumer,
}

/// What every connection of a run shares.
#[derive(Debug, Clone)]
pub struct Target {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    pub queue: String,
    /// Longest payload.
    pub size: usize,
    /// Longest wait for a connection or a reply beyond the server's own waits.
    pub timeout: Duration,
}

/// Opens a connection and sets it up for `role`.
pub fn connect(target: &Target, role: Role) -> Result<Box<dyn QueueClient>, WireError> {
    let stream = TcpStream::connect_timeout(&target.addr, target.timeout)?;
    stream.set_nodelay(true)?;
    // The server may hold a request up to the PUT timeout or a GET wait (beanstalkd's 1 s).
    stream.set_read_timeout(Some(2 * target.timeout + Duration::from_secs(1)))?;
    let line = Line::new(stream, target.size + REPLY_OVERHEAD)?;
    Ok(match target.protocol {
        Protocol::Forkpool => Box::new(forkpool::Forkpool::new(line, target)),
        Protocol::Beanstalk => Box::new(beanstalk::Beanstalk::new(line, &target.queue, role)?),
        Protocol::Redis => Box::new(redis::Redis::new(line, &target.queue)),
    })
}

/// A buffered connection: requests are built in `out` and written at once, replies read by
/// line (with a cap) or by length.
pub struct Line {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The request being built.
    pub out: Vec<u8>,
    max_line: usize,
}

impl Line {
    fn new(stream: TcpStream, max_line: usize) -> io::Result<Self> {
        Ok(Line {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            out: Vec::with_capacity(max_line),
            max_line,
        })
    }

    /// Writes the request in `out` and empties it.
    fn send(&mut self) -> Result<(), WireError> {
        let sent = self.writer.write_all(&self.out);
        self.out.clear();
        sent.map_err(classify)
    }

    /// The next reply line, without its `\n` or `\r\n`.
    fn read_line(&mut self) -> Result<Vec<u8>, WireError> {
        let mut line = Vec::new();
        let limit = self.max_line as u64 + 2;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .map_err(classify)?;
        if n == 0 {
            return Err(WireError::Closed);
        }
        if line.pop() != Some(b'\n') {
            return Err(if n as u64 == limit {
                WireError::unexpected(b"<reply line too long>")
            } else {
                WireError::Closed
            });
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(line)
    }

    /// Exactly `n` bytes followed by `\r\n` (a length-prefixed payload).
    fn read_block(&mut self, n: usize) -> Result<Vec<u8>, WireError> {
        if n > self.max_line {
            return Err(WireError::unexpected(b"<payload longer than any put>"));
        }
        let mut block = vec![0; n + 2];
        self.reader.read_exact(&mut block).map_err(classify)?;
        if block.split_off(n) != b"\r\n" {
            return Err(WireError::unexpected(b"<payload not followed by CRLF>"));
        }
        Ok(block)
    }
}

/// Sorts an I/O error: a read timeout, an EOF, or another failure.
fn classify(e: io::Error) -> WireError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => WireError::Timeout,
        io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    }
}

/// The decimal number `field` holds, or an unexpected `reply`.
fn number(field: &[u8], reply: &[u8]) -> Result<u64, WireError> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| WireError::unexpected(reply))
}
