//! The binary upgrade (`USR2`), from both sides.
//!
//! The old master starts the binary on disk as its child, passing every listener, the ledger
//! and one end of a link by descriptor (systemd's protocol, see `inherit.rs`), and moves its
//! pid file to `PATH.oldbin` as nginx does. It serves on meanwhile. The new master opens the
//! passed sockets and the ledger (without recovery: the old workers are using it), starts its
//! own workers, and once they serve it *takes over*: it sends the old master `SIGTERM`, and
//! the old workers hand their connections over the link to the new master's workers (see
//! `broker.rs`) and exit. If the new master exits, or is not ready within [`UPGRADE_TIMEOUT`], the
//! old master kills it, puts its pid file back and carries on as if nothing happened.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::channel::{self, Channel};
use crate::inherit;
use crate::pidfile::{PidFile, PidFileError};
use crate::process::{self, Forked};

/// How long a new binary has to become ready before it is killed.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// A new master started by `USR2` that has not taken over yet (the old master's side).
#[derive(Debug)]
pub struct Upgrade {
    pub pid: Pid,
    pub deadline: Instant,
}

/// Why an upgrade did not start; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    #[error("cannot fork the new master: {0}")]
    Fork(nix::Error),
    #[error("cannot make the link to the new master: {0}")]
    Link(std::io::Error),
}

impl Upgrade {
    /// Starts `exe` with `args` as the new master, handing it `fds` (descriptor and name),
    /// `master` (this process) as the master it replaces, and one end of a link on which the
    /// old workers' connections will pass (returned: the other end). The pid file, if any,
    /// moves to `PATH.oldbin` first (and back if the fork fails).
    pub fn start(
        exe: &Path,
        args: &[OsString],
        fds: &[(RawFd, &str)],
        master: Pid,
        pid_file: Option<&mut PidFile>,
    ) -> Result<(Upgrade, Channel), UpgradeError> {
        let (ours, theirs) = channel::pair().map_err(UpgradeError::Link)?;
        let mut fds = fds.to_vec();
        fds.push((theirs.raw_fd(), "handover"));
        let mut pid_file = pid_file;
        if let Some(file) = pid_file.as_deref_mut() {
            file.move_aside()?;
        }
        // SAFETY: only the master calls this, and the master never starts a thread.
        match unsafe { process::fork_with_signals_blocked() } {
            Ok(Forked::Child) => {
                let error = inherit::exec_with_fds(exe, args, &fds, master);
                eprintln!("forkpool-server: cannot start {}: {error}", exe.display());
                std::process::exit(127);
            }
            Ok(Forked::Parent(pid)) => Ok((
                Upgrade {
                    pid,
                    deadline: Instant::now() + UPGRADE_TIMEOUT,
                },
                ours,
            )),
            Err(e) => {
                put_back(pid_file);
                Err(UpgradeError::Fork(e))
            }
        }
    }

    /// The new master did not make it: killed (unless it is gone already) and reaped, and
    /// the pid file put back.
    pub fn abandon(self, pid_file: Option<&mut PidFile>, exited: bool) {
        if !exited {
            process::signal(self.pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(self.pid, None);
        }
        put_back(pid_file);
    }
}

fn put_back(pid_file: Option<&mut PidFile>) {
    if let Some(file) = pid_file {
        if let Err(e) = file.move_back() {
            log::error!("{e}");
        }
    }
}

/// The new master's side: the master it replaces, told to drain once this one serves.
#[derive(Debug)]
pub struct Takeover {
    old_master: Pid,
}

impl Takeover {
    /// `old_master` comes from [`inherit::take`], which checked that it is our parent.
    pub fn new(old_master: Pid) -> Takeover {
        Takeover { old_master }
    }

    /// This master serves: the old one drains (its workers hand over to ours).
    pub fn complete(self) {
        log::info!(
            "upgrade complete: telling the old master (pid {}) to drain",
            self.old_master
        );
        process::signal(self.old_master, Signal::SIGTERM);
    }
}
