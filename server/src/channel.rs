//! A message channel between two processes of the pool (master and worker, or two masters
//! during a binary upgrade): one end of a `SOCK_SEQPACKET` Unix socket pair. One message is
//! one datagram, never split or merged, and may carry descriptors (`SCM_RIGHTS`), so a
//! connection and its state travel together.
//!
//! Both ends are non-blocking. What the peer cannot take yet waits in an outbox, descriptors
//! included, until [`Channel::flush`] is called on writable; a descriptor received is closed
//! on exec (`MSG_CMSG_CLOEXEC`), and one the kernel had to drop (the receiver was at its
//! descriptor limit) is reported as `truncated`. This module knows nothing of what the bytes
//! mean (`master_link.rs` does).

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// The longest message: a whole message must fit one datagram (larger payloads travel in a
/// memfd, see `handover.rs`).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Most descriptors one message carries.
pub const MAX_FDS: usize = 2;

/// One end of a channel.
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
    /// Messages the peer could not take yet, oldest first, with their descriptors.
    outbox: VecDeque<(Vec<u8>, Vec<OwnedFd>)>,
    /// Where messages are received (allocated once: most messages are a few bytes).
    inbox: Vec<u8>,
}

/// A message as received.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors (or bytes) that did not fit: the message is not whole.
    pub truncated: bool,
}

/// Makes a connected pair of channel ends.
pub fn pair() -> io::Result<(Channel, Channel)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    Ok((Channel::from_fd(a), Channel::from_fd(b)))
}

impl Channel {
    /// A channel over an inherited end (e.g. passed to a new binary); made non-blocking.
    pub fn from_fd(socket: OwnedFd) -> Channel {
        let _ = nix::fcntl::fcntl(
            socket.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        Channel {
            socket,
            outbox: VecDeque::new(),
            inbox: vec![0; MAX_MESSAGE_BYTES],
        }
    }

    /// Sends `bytes` with `fds` (the caller's references are given up once sent), or queues
    /// them behind earlier messages. Fails only if the peer is gone or the message is
    /// malformed (too long, too many descriptors).
    pub fn send(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) -> io::Result<()> {
        if bytes.len() > MAX_MESSAGE_BYTES || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "channel message too large",
            ));
        }
        self.outbox.push_back((bytes, fds));
        self.flush()
    }

    /// Sends what waits in the outbox until the peer's buffer is full.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some((bytes, fds)) = self.outbox.front() {
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &[IoSlice::new(bytes)],
                cmsgs,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                // Sent: the kernel holds its own references; ours are closed with the entry.
                Ok(_) => drop(self.outbox.pop_front()),
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Are messages waiting for the peer to make room (register for writable)?
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// The next message, `None` if there is none now. End of stream (the peer closed its end)
    /// is an `UnexpectedEof` error.
    pub fn recv(&mut self) -> io::Result<Option<Received>> {
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, flags, raw_fds) = loop {
            let mut iov = [IoSliceMut::new(&mut self.inbox)];
            match recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut raw_fds = Vec::new();
                    for cmsg in msg.cmsgs().into_iter().flatten() {
                        if let ControlMessageOwned::ScmRights(fds) = cmsg {
                            raw_fds.extend(fds);
                        }
                    }
                    break (msg.bytes, msg.flags, raw_fds);
                }
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        // SAFETY: SCM_RIGHTS installed these as new descriptors of this process, owned by
        // nothing else; each is wrapped exactly once.
        let fds: Vec<OwnedFd> = raw_fds
            .into_iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if len == 0 && fds.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Some(Received {
            bytes: self.inbox[..len].to_vec(),
            fds,
            truncated: flags.intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC),
        }))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_message_and_its_descriptors_arrive_whole() {
        let (mut a, mut b) = pair().expect("a channel pair");
        let (mut left, right) = std::os::unix::net::UnixStream::pair().expect("a stream pair");
        a.send(b"hello".to_vec(), vec![OwnedFd::from(right)])
            .expect("send");
        let got = b.recv().expect("receive").expect("a message");
        assert_eq!(got.bytes, b"hello");
        assert!(!got.truncated);
        let [fd] = <[OwnedFd; 1]>::try_from(got.fds).expect("one descriptor");
        let mut passed = std::os::unix::net::UnixStream::from(fd);
        passed
            .write_all(b"x")
            .expect("write through the passed descriptor");
        let mut byte = [0u8; 1];
        left.read_exact(&mut byte).expect("read");
        assert_eq!(&byte, b"x");
        assert!(b.recv().expect("receive").is_none(), "nothing more");
    }

    #[test]
    fn a_full_peer_queues_messages_in_order_and_a_closed_one_is_eof() {
        let (mut a, mut b) = pair().expect("a channel pair");
        let message = vec![7u8; 16 * 1024];
        for i in 0..64u8 {
            let mut m = message.clone();
            m[0] = i;
            a.send(m, Vec::new()).expect("send or queue");
        }
        assert!(a.wants_write(), "the peer's buffer filled up");
        let mut seen = Vec::new();
        while seen.len() < 64 {
            a.flush().expect("flush");
            while let Some(got) = b.recv().expect("receive") {
                seen.push(got.bytes[0]);
            }
        }
        assert_eq!(seen, (0..64).collect::<Vec<u8>>());
        drop(a);
        assert_eq!(
            b.recv().expect_err("end of stream").kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
