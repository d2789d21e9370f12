//! Waking another process's waiting queue connections: each worker binds a datagram socket
//! in the abstract Unix namespace named after its pid, and whoever serves one of its waits
//! (a PUT in another worker, the master releasing a dead worker's jobs) sends it one byte.
//!
//! Named by pid rather than made by the master per slot before forking: the store records
//! a waiter's process by pid, and more workers than slots can be alive at once (a retiring
//! worker beside its replacement, a reload's or an upgrade's overlap). A pid names one live
//! process; a poke to a process that is gone finds no socket and is dropped. A full socket
//! buffer means a wake-up is already pending, so that error is ignored too.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use forkpool_queue::WakeSet;

/// The abstract socket name of process `pid`'s wake-ups.
fn address(pid: i32) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("forkpool-queue-wakeup-{pid}"))
}

/// This process's wake-up socket (non-blocking), or an unbound one that only sends.
#[derive(Debug)]
pub struct Wakeup {
    socket: UnixDatagram,
}

impl Wakeup {
    /// Binds this process's wake-up socket (a worker, after fork).
    pub fn bind() -> io::Result<Wakeup> {
        let socket = UnixDatagram::bind_addr(&address(std::process::id() as i32)?)?;
        socket.set_nonblocking(true)?;
        Ok(Wakeup { socket })
    }

    /// A socket that only pokes others (the master).
    pub fn sender() -> io::Result<Wakeup> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Wakeup { socket })
    }

    /// Pokes every process of `wakes` (this one included, through its own socket).
    pub fn poke(&self, wakes: &WakeSet) {
        for pid in wakes.iter() {
            let sent = address(pid).and_then(|addr| self.socket.send_to_addr(&[1], &addr));
            match sent {
                Ok(_) => {}
                // Gone, or already poked and not yet read: either way nothing to do.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNREFUSED | libc::ENOENT | libc::EAGAIN)
                    ) => {}
                Err(e) => log::warn!("queue: cannot wake pid {pid}: {e}"),
            }
        }
    }

    /// Reads every pending poke (their content means nothing).
    pub fn drain(&self) {
        let mut byte = [0u8; 16];
        while self.socket.recv(&mut byte).is_ok() {}
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }
}
