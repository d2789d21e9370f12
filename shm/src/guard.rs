//! The path guard: at most one live server per shared file's path (the ledger's, the queue
//! store's), even after its file is gone.
//!
//! The exclusive flock belongs to the file's inode. If someone deletes or replaces the file
//! under a running server, the flock protects nothing any more: a second server would create
//! (or open) a new file at the same path and run beside the first, which still serves from
//! the old inode. The guard is a name that outlives the file: an abstract Unix socket
//! (`@forkpool-<kind>:<canonical path>`, e.g. `@forkpool-ledger:/var/lib/forkpool/ledger.bin`,
//! or a hash of a long path) bound by the server that opens the file before it touches the
//! path. Workers inherit the socket across fork, a new binary receives it with the file at an
//! upgrade, and the kernel releases the name when the
//! last process holding it is gone (no stale lock file to clean up after SIGKILL). `ss -xlp`
//! shows who holds it.
//!
//! Abstract socket names belong to the network namespace: two servers in different network
//! namespaces that share a file system are kept apart by the flock while the file exists, not
//! by the guard once it is deleted.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};

/// Longest abstract socket name (`sun_path` minus the leading NUL).
const MAX_NAME: usize = 107;
/// How much of a long path's end its guard name keeps (after a hash of the whole path).
const TAIL: usize = 64;

/// A held guard (the bound socket).
#[derive(Debug)]
pub struct PathGuard {
    socket: OwnedFd,
}

/// Why a guard was not acquired.
#[derive(Debug)]
pub enum GuardError {
    /// Another live process holds the name: a server runs on this path.
    Held,
    /// The socket could not be made or bound for another reason.
    Os(std::io::Error),
}

impl PathGuard {
    /// Binds the guard name of `canonical` (the file's path with every symbolic link
    /// resolved, so that every spelling of one file gets one name) for files of `kind`
    /// (`ledger`, `queue`: each kind has its own names).
    pub fn acquire(kind: &str, canonical: &Path) -> Result<PathGuard, GuardError> {
        let os = |e: Errno| GuardError::Os(e.into());
        let address = UnixAddr::new_abstract(&name_for(kind, canonical)).map_err(os)?;
        let socket = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(os)?;
        match bind(socket.as_raw_fd(), &address) {
            Ok(()) => Ok(PathGuard { socket }),
            Err(Errno::EADDRINUSE) => Err(GuardError::Held),
            Err(e) => Err(os(e)),
        }
    }

    /// A guard inherited from the server this one replaces (binary upgrade).
    pub fn inherited(socket: OwnedFd) -> PathGuard {
        PathGuard { socket }
    }
}

impl AsRawFd for PathGuard {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for PathGuard {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// The abstract socket name guarding `canonical`: the path itself if it fits, else a hash of
/// it and its end.
fn name_for(kind: &str, canonical: &Path) -> Vec<u8> {
    let path = canonical.as_os_str().as_bytes();
    let mut name = format!("forkpool-{kind}:").into_bytes();
    if name.len() + path.len() <= MAX_NAME {
        name.extend_from_slice(path);
    } else {
        name.extend_from_slice(format!("{:016x}:", fnv1a(path)).as_bytes());
        name.extend_from_slice(&path[path.len() - TAIL..]);
    }
    name
}

/// FNV-1a, 64 bits: spreads long paths over guard names (a collision would refuse a server
/// on an unrelated path, at odds of 2^-64 per pair).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// For messages: the guard name of `canonical`, as `ss -xl` prints it.
pub fn display_name(kind: &str, canonical: &Path) -> String {
    format!(
        "@{}",
        OsStr::from_bytes(&name_for(kind, canonical)).to_string_lossy()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_path_one_guard_released_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.bin");
        let guard = PathGuard::acquire("test", &path).expect("first");
        assert!(matches!(
            PathGuard::acquire("test", &path),
            Err(GuardError::Held)
        ));
        let other = PathGuard::acquire("test", &dir.path().join("other.bin")).expect("another");
        let other_kind = PathGuard::acquire("test2", &path).expect("another kind");
        drop(guard);
        drop(PathGuard::acquire("test", &path).expect("free again"));
        drop((other, other_kind));
    }

    #[test]
    fn long_paths_get_a_hashed_name_that_fits() {
        let long = Path::new("/").join("d".repeat(300)).join("ledger.bin");
        let name = name_for("ledger", &long);
        assert!(name.len() <= MAX_NAME, "{}", name.len());
        assert!(name.ends_with(b"/ledger.bin"));
        let other = Path::new("/").join("e".repeat(300)).join("ledger.bin");
        assert_ne!(name, name_for("ledger", &other));
    }
}
