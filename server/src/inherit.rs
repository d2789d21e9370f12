//! Descriptors handed to a starting master, by systemd (socket activation) or by the master it
//! replaces (a USR2 binary upgrade). Both use systemd's protocol: descriptors 3, 4, ... with
//! `LISTEN_FDS` (their number), `LISTEN_PID` (the pid meant to use them) and
//! `LISTEN_FDNAMES` (`echo`, `bank`, and for an upgrade `ledger`, `ledger-guard` and
//! `handover`, the link on which the old master passes its workers' connections). An upgrade also sets
//! `FORKPOOL_UPGRADE_FROM` to the old master's pid, which the new one signals once ready; it
//! is believed only from our parent, with the ledger file or the hand-over link passed (a
//! master whose ledger is a database passes no ledger descriptor).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::unistd::Pid;

use crate::service::ServiceKind;

const UPGRADE_FROM: &str = "FORKPOOL_UPGRADE_FROM";
/// The first passed descriptor (SD_LISTEN_FDS_START).
const FIRST_FD: RawFd = 3;

/// What this process was handed at start.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Listening sockets, by the service their name says.
    listeners: Vec<(ServiceKind, OwnedFd)>,
    pub ledger: Option<OwnedFd>,
    /// The ledger path's guard, which keeps other servers off the path (an upgrade).
    pub ledger_guard: Option<OwnedFd>,
    /// The queue store file (an upgrade), its flock held by the old master's description.
    pub queue: Option<OwnedFd>,
    /// The queue store path's guard (an upgrade).
    pub queue_guard: Option<OwnedFd>,
    /// The link to the master being replaced (binary upgrade), on which it passes its
    /// workers' connections.
    pub handover: Option<OwnedFd>,
    /// The master being replaced (binary upgrade), to be told when we are ready.
    pub upgrade_from: Option<Pid>,
}

impl Inherited {
    /// Takes the listening sockets passed for `kind`.
    pub fn take_listeners(&mut self, kind: ServiceKind) -> Vec<OwnedFd> {
        let (theirs, rest) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|(k, _)| *k == kind);
        self.listeners = rest;
        theirs.into_iter().map(|(_, fd)| fd).collect()
    }
}

/// Why the descriptors and variables handed to this process cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("cannot take the passed descriptors (LISTEN_FDS): {0}")]
    ListenFds(#[source] io::Error),
    /// `FORKPOOL_UPGRADE_FROM` does not name the master that started us: obeying it would
    /// SIGTERM an arbitrary process once we are ready.
    #[error(
        "{UPGRADE_FROM}={value} is not the master that started this process ({why}); \
         refusing to start (unset it: only a forkpool master sets it, for a binary upgrade)"
    )]
    UntrustedUpgrade { value: String, why: &'static str },
}

/// Takes the passed descriptors (if `LISTEN_PID` is this process) and clears the variables,
/// so that no child of ours mistakes them for its own. `FORKPOOL_UPGRADE_FROM` is trusted only
/// if it names our parent and that parent passed us the ledger or the hand-over link, as an
/// upgrading master does.
pub fn take() -> Result<Inherited, TakeError> {
    let upgrade_from = std::env::var_os(UPGRADE_FROM);
    std::env::remove_var(UPGRADE_FROM);
    let mut inherited = Inherited::default();
    for (fd, name) in sd_notify::listen_fds_with_names(true).map_err(TakeError::ListenFds)? {
        // SAFETY: LISTEN_PID named this process, so by the protocol descriptors 3.. are ours,
        // open, and owned by nobody else in this process; each is wrapped exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        match (name.as_str(), ServiceKind::named(&name)) {
            (_, Some(kind)) => inherited.listeners.push((kind, fd)),
            ("ledger", None) => inherited.ledger = Some(fd),
            ("ledger-guard", None) => inherited.ledger_guard = Some(fd),
            ("queue-store", None) => inherited.queue = Some(fd),
            ("queue-guard", None) => inherited.queue_guard = Some(fd),
            ("handover", None) => inherited.handover = Some(fd),
            (other, None) => log::warn!("ignoring an inherited descriptor named {other:?}"),
        }
    }
    if let Some(value) = upgrade_from {
        let passed = inherited.ledger.is_some() || inherited.handover.is_some();
        inherited.upgrade_from = Some(verify_upgrade_from(&value, passed)?);
    }
    Ok(inherited)
}

/// The pid in `value`, if it is our parent and it passed us what only an upgrading master
/// passes (`got_upgrade_fds`).
fn verify_upgrade_from(value: &OsStr, got_upgrade_fds: bool) -> Result<Pid, TakeError> {
    let untrusted = |why| TakeError::UntrustedUpgrade {
        value: value.to_string_lossy().into_owned(),
        why,
    };
    let pid = value
        .to_str()
        .and_then(|text| text.parse::<i32>().ok())
        .filter(|&pid| pid > 0)
        .ok_or_else(|| untrusted("not a process id"))?;
    if Pid::from_raw(pid) != nix::unistd::getppid() {
        return Err(untrusted("it is not our parent"));
    }
    if !got_upgrade_fds {
        return Err(untrusted(
            "it passed neither a ledger nor a hand-over descriptor",
        ));
    }
    Ok(Pid::from_raw(pid))
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
