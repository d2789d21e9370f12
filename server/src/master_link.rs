//! The pipe on which workers tell the master about themselves: "ready to serve", and "leaving"
//! with the reason (served its `max_requests`, terminated by a signal sent to it directly, or
//! retired by the master). It is the only channel for those facts: the scoreboard's state is
//! for display.
//! Each message is one fixed-size write, smaller than PIPE_BUF, so messages from many
//! workers never interleave and a read returns whole messages.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::Pid;

const MESSAGE_BYTES: usize = 8;
const READY: u32 = 1;
const LEAVING_RECYCLED: u32 = 2;
const LEAVING_TERMINATED: u32 = 3;
const LEAVING_RETIRED: u32 = 4;

/// What a worker told the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Ready(Pid),
    /// The worker stopped accepting and drains.
    Leaving(Pid, LeaveReason),
}

/// Why a worker drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// It served its `max_requests`: its slot needs a successor.
    Recycled,
    /// SIGTERM/SIGINT reached it (sent to it directly, or to the whole process group).
    Terminated,
    /// The master retired it (SIGUSR1): a successor is already on its way.
    Retired,
}

impl LeaveReason {
    fn code(self) -> u32 {
        match self {
            LeaveReason::Recycled => LEAVING_RECYCLED,
            LeaveReason::Terminated => LEAVING_TERMINATED,
            LeaveReason::Retired => LEAVING_RETIRED,
        }
    }

    fn from_code(code: u32) -> Option<LeaveReason> {
        [
            LeaveReason::Recycled,
            LeaveReason::Terminated,
            LeaveReason::Retired,
        ]
        .into_iter()
        .find(|reason| reason.code() == code)
    }
}

/// Creates the pipe: the master keeps the receiver and hands the sender to every worker.
pub fn status_pipe() -> io::Result<(StatusReceiver, StatusSender)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    fcntl(read.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((
        StatusReceiver {
            pipe: std::fs::File::from(read),
        },
        StatusSender {
            pipe: std::fs::File::from(write),
        },
    ))
}

/// A worker's end.
#[derive(Debug)]
pub struct StatusSender {
    pipe: std::fs::File,
}

impl StatusSender {
    /// Tells the master this worker has registered its listeners and is serving.
    pub fn send_ready(&self) -> io::Result<()> {
        self.send(READY)
    }

    /// Tells the master this worker stops accepting and drains, and why.
    pub fn send_leaving(&self, reason: LeaveReason) -> io::Result<()> {
        self.send(reason.code())
    }

    fn send(&self, kind: u32) -> io::Result<()> {
        let mut message = [0u8; MESSAGE_BYTES];
        message[..4].copy_from_slice(&kind.to_le_bytes());
        message[4..].copy_from_slice(&std::process::id().to_le_bytes());
        (&self.pipe).write_all(&message)
    }
}

/// The master's end (non-blocking).
#[derive(Debug)]
pub struct StatusReceiver {
    pipe: std::fs::File,
}

impl StatusReceiver {
    pub fn raw_fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Reads every message waiting.
    pub fn messages(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        let mut buf = [0u8; MESSAGE_BYTES * 64];
        loop {
            match self.pipe.read(&mut buf) {
                Ok(0) => return messages,
                Ok(n) => {
                    for message in buf[..n].chunks_exact(MESSAGE_BYTES) {
                        let kind =
                            u32::from_le_bytes([message[0], message[1], message[2], message[3]]);
                        let pid =
                            u32::from_le_bytes([message[4], message[5], message[6], message[7]]);
                        let Ok(pid) = i32::try_from(pid).map(Pid::from_raw) else {
                            log::warn!("ignoring a worker message with a bad pid");
                            continue;
                        };
                        match (kind, LeaveReason::from_code(kind)) {
                            (READY, _) => messages.push(Message::Ready(pid)),
                            (_, Some(reason)) => messages.push(Message::Leaving(pid, reason)),
                            _ => log::warn!("ignoring a malformed worker message"),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::error!("reading the worker status pipe: {e}");
                    }
                    return messages;
                }
            }
        }
    }
}
