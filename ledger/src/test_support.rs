//! What the crate's own tests share: account names, opening a ledger that a forked child of
//! another test may briefly hold, and running an operation in a child killed at a crash point.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use crate::crash::arm;
use crate::{AccountName, Ledger, LedgerError, LedgerOptions};

/// How long a test waits for a ledger that a forked child of another test holds.
const HELD_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn acct(name: &str) -> AccountName {
    AccountName::new(name.as_bytes()).expect("test account names are valid")
}

/// Opens a ledger (a new file gets the hash key `new_key()`). A child forked by a test
/// running in another thread inherits every descriptor of this process, including this
/// file's and its path guard's, so the flock or the guard may stay held until that child
/// exits: this polls for that with a deadline. Other errors are returned.
pub(crate) fn open_when_free(
    path: &Path,
    options: &LedgerOptions,
    new_key: &dyn Fn() -> u64,
) -> Result<Ledger, LedgerError> {
    when_free(|| Ledger::open_keyed(path, options, new_key, None))
}

/// Runs `open` until it no longer finds the ledger held (see [`open_when_free`]).
pub(crate) fn when_free(
    open: impl Fn() -> Result<Ledger, LedgerError>,
) -> Result<Ledger, LedgerError> {
    let deadline = Instant::now() + HELD_TIMEOUT;
    loop {
        match open() {
            Err(LedgerError::Locked { .. } | LedgerError::PathInUse { .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            result => return result,
        }
    }
}

/// Exits the child if the operation unwinds (a bug), so a child never returns to the harness.
pub(crate) struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(99) }
    }
}

/// Runs `op` in a forked child with crash point `k` armed (0 = none); returns its exit code
/// (CRASH_STATUS if it died at the point, 0 if `op` returned true).
pub(crate) fn run_in_child(ledger: &Ledger, k: u32, op: &dyn Fn(&Ledger) -> bool) -> i32 {
    // SAFETY: the child runs only `arm`, the ledger operation (no allocation, no locks of
    // this process's other threads) and `_exit`; it never returns into the test harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let guard = ExitOnUnwind;
            arm(k);
            let ok = op(ledger);
            std::mem::forget(guard);
            // SAFETY: as above.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Exited(_, code) => code,
            other => panic!("child ended unexpectedly: {other:?}"),
        },
    }
}

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={value} is not a number")))
}

/// splitmix64: small, fast, and the same everywhere (the simulated disk's generator).
pub(crate) use forkpool_shm::sim::Rng;

/// A directory for the test files: tmpfs if there is one (each accepted open msyncs).
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}
