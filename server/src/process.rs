//! Process control that needs the OS directly: forking with signals blocked, tying a worker's
//! life to its master, reaping children, raising the descriptor limit. The `unsafe` of
//! process control lives here (the scoreboard's shared mapping has its own, in
//! `scoreboard.rs`).

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getppid, ForkResult, Pid};

/// Which side of a fork we are on.
pub enum Forked {
    /// The new process. Every signal is still blocked: the child drops the master's signal
    /// handling, installs its own, then calls [`unblock_signals`].
    Child,
    Parent(Pid),
}

/// Forks with every signal blocked, so that no handler of the master's runs in the child
/// before the child has replaced the master's signal handling with its own.
///
/// # Safety
/// The calling process must have exactly one thread (as nix's [`fork`] requires for a child
/// that does more than async-signal-safe calls): the child then owns a consistent copy of
/// the heap and of every lock, so it may allocate, log and run ordinary Rust code.
pub unsafe fn fork_with_signals_blocked() -> nix::Result<Forked> {
    debug_assert_eq!(
        thread_count(),
        Some(1),
        "fork needs a single-threaded caller"
    );
    let mut previous = SigSet::empty();
    nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut previous),
    )?;
    // SAFETY: this function's contract: the caller is single-threaded, so the child is an
    // exact copy with no lock held by a vanished thread.
    let result = unsafe { fork() };
    match result {
        Ok(ForkResult::Child) => Ok(Forked::Child),
        Ok(ForkResult::Parent { child }) => {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None)?;
            Ok(Forked::Parent(child))
        }
        Err(e) => {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None)?;
            Err(e)
        }
    }
}

/// How many threads this process has (from `/proc/self/task`), if that can be read.
pub fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task")
        .ok()
        .map(Iterator::count)
}

/// Unblocks every signal (the child's last step of start-up).
pub fn unblock_signals() -> nix::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Asks the kernel to SIGKILL this process when its parent dies, then closes the race in
/// which the parent died before the request: if our parent is no longer `master`, we are
/// already an orphan (compare with the saved pid, not with 1: a subreaper may adopt us).
pub fn die_with_parent(master: Pid) -> Result<(), Orphaned> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|_| Orphaned)?;
    if getppid() == master {
        Ok(())
    } else {
        Err(Orphaned)
    }
}

/// The master died before the worker finished starting.
#[derive(Debug)]
pub struct Orphaned;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    /// Did the process end because of its own failure (as opposed to a clean exit or a
    /// signal that someone else sent)? Crash signals count as the process's own failure.
    pub fn is_own_failure(self) -> bool {
        match self {
            Exit::Code(code) => code != 0,
            Exit::Signal(signal) => matches!(
                signal,
                Signal::SIGSEGV
                    | Signal::SIGBUS
                    | Signal::SIGABRT
                    | Signal::SIGILL
                    | Signal::SIGFPE
                    | Signal::SIGSYS
                    | Signal::SIGTRAP
            ),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit status {code}"),
            Exit::Signal(signal) => write!(f, "signal {}", signal.as_str()),
        }
    }
}

/// Reaps one exited child without blocking, if there is one.
pub fn reap_any() -> Option<(Pid, Exit)> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => return Some((pid, Exit::Code(code))),
            Ok(WaitStatus::Signaled(pid, signal, _)) => return Some((pid, Exit::Signal(signal))),
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return None,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("waitpid failed: {e}");
                return None;
            }
        }
    }
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: Pid, signal: Signal) {
    if let Err(e) = kill(pid, signal) {
        if e != nix::errno::Errno::ESRCH {
            log::warn!("cannot send {} to {pid}: {e}", signal.as_str());
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit (each connection is one) and
/// returns the limit now in force.
pub fn raise_nofile_limit() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Ignores the signals that only the master acts on. A worker inherits their default
/// actions, which would stop (TTIN, TTOU) or kill (HUP, USR2) it if someone signalled the
/// whole process group.
pub fn ignore_master_only_signals() -> nix::Result<()> {
    use nix::sys::signal::{signal, SigHandler};
    for sig in [
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety question
        // arises, and nothing else in this process manages these signals.
        unsafe { signal(sig, SigHandler::SigIgn) }?;
    }
    Ok(())
}
