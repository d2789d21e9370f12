//! Descriptors handed to a starting master, by systemd (socket activation) or by the master it
//! replaces (a USR2 binary upgrade). Both use systemd's protocol: descriptors 3, 4, ... with
//! `LISTEN_FDS` (their number), `LISTEN_PID` (the pid meant to use them) and
//! `LISTEN_FDNAMES` (`echo`, `bank`, and for an upgrade `ledger` and `ledger-guard`). An upgrade also sets
//! `FORKPOOL_UPGRADE_FROM` to the old master's pid, which the new one signals once ready.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::unistd::Pid;

const UPGRADE_FROM: &str = "FORKPOOL_UPGRADE_FROM";
/// The first passed descriptor (SD_LISTEN_FDS_START).
const FIRST_FD: RawFd = 3;

/// What this process was handed at start.
#[derive(Debug, Default)]
pub struct Inherited {
    pub echo: Vec<OwnedFd>,
    pub bank: Vec<OwnedFd>,
    pub ledger: Option<OwnedFd>,
    /// The ledger path's guard, which keeps other servers off the path (an upgrade).
    pub ledger_guard: Option<OwnedFd>,
    /// The master being replaced (binary upgrade), to be told when we are ready.
    pub upgrade_from: Option<Pid>,
}

/// Takes the passed descriptors (if `LISTEN_PID` is this process) and clears the variables,
/// so that no child of ours mistakes them for its own.
pub fn take() -> io::Result<Inherited> {
    let mut inherited = Inherited {
        upgrade_from: std::env::var(UPGRADE_FROM)
            .ok()
            .and_then(|pid| pid.parse().ok())
            .map(Pid::from_raw),
        ..Inherited::default()
    };
    std::env::remove_var(UPGRADE_FROM);
    for (fd, name) in sd_notify::listen_fds_with_names(true)? {
        // SAFETY: LISTEN_PID named this process, so by the protocol descriptors 3.. are ours,
        // open, and owned by nobody else in this process; each is wrapped exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        match name.as_str() {
            "echo" => inherited.echo.push(fd),
            "bank" => inherited.bank.push(fd),
            "ledger" => inherited.ledger = Some(fd),
            "ledger-guard" => inherited.ledger_guard = Some(fd),
            other => log::warn!("ignoring an inherited descriptor named {other:?}"),
        }
    }
    Ok(inherited)
}

/// In a freshly forked child: puts `fds` at 3, 4, ... with their names, sets the variables,
/// unblocks signals and executes `exe` with `args`. Returns only on failure.
pub fn exec_with_fds(exe: &Path, args: &[OsString], fds: &[(RawFd, &str)], from: Pid) -> io::Error {
    // Move every descriptor out of the 3.. range first, so that no dup2 below overwrites a
    // descriptor still to be moved.
    let mut parked = Vec::with_capacity(fds.len());
    for (fd, _) in fds {
        match nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FIRST_FD + 1024)) {
            Ok(high) => parked.push(high),
            Err(e) => return e.into(),
        }
    }
    for (index, high) in parked.iter().enumerate() {
        let target = FIRST_FD + index as RawFd;
        // dup2 clears FD_CLOEXEC on the new descriptor: it survives the exec.
        if let Err(e) = nix::unistd::dup2(*high, target) {
            return e.into();
        }
    }
    let names: Vec<&str> = fds.iter().map(|(_, name)| *name).collect();
    std::env::set_var("LISTEN_FDS", fds.len().to_string());
    std::env::set_var("LISTEN_PID", std::process::id().to_string());
    std::env::set_var("LISTEN_FDNAMES", names.join(":"));
    std::env::set_var(UPGRADE_FROM, from.to_string());
    if let Err(e) = crate::process::unblock_signals() {
        return e.into();
    }
    use std::os::unix::process::CommandExt;
    std::process::Command::new(exe).args(args).exec()
}
