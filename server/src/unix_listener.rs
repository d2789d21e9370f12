//! Listening on a Unix socket (`unix:/path` addresses): binding over the stale socket file
//! of a dead server but never over a live one, and giving the file its mode and group before
//! anyone can connect.
//!
//! "Dead" is decided by connecting: a socket file nobody listens on refuses the connection
//! (ECONNREFUSED) and is replaced; one that accepts belongs to a live server, and the bind is
//! refused. A path that is not a socket is never removed. The mode and group are applied
//! between `bind` and `listen`: until `listen`, a connection is refused, so no client ever
//! reaches the socket with the umask's permissions.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::UnixSocketSettings;

/// Why a Unix socket could not be listened on; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    #[error("{path} is in use by a running server")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("cannot check whether {path} is in use: {source}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("socket_group {group}: no such group")]
    UnknownGroup { group: String },
    #[error("cannot give {path} the group {group}: {source}")]
    Chown {
        path: PathBuf,
        group: String,
        source: io::Error,
    },
    #[error("cannot set the mode of {path} to {mode:o}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
}

/// Listens on `path` with `backlog`, replacing a stale socket file, with the mode and group
/// of `settings`. The listener is blocking and close-on-exec; set it non-blocking before
/// handing it to mio.
pub fn bind_unix(
    path: &Path,
    backlog: u32,
    settings: &UnixSocketSettings,
) -> Result<UnixListener, UnixBindError> {
    remove_if_stale(path)?;
    let bind_error = |source| UnixBindError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(bind_error)?;
    let addr = SockAddr::unix(path).map_err(bind_error)?;
    socket.bind(&addr).map_err(bind_error)?;
    if let Err(e) = apply_owner_and_mode(path, settings) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    socket.listen(backlog).map_err(bind_error)?;
    Ok(socket.into())
}

/// Removes `path` if it is a socket nobody listens on; refuses a live socket or a non-socket.
fn remove_if_stale(path: &Path) -> Result<(), UnixBindError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(UnixBindError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(UnixBindError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(UnixBindError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| UnixBindError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(UnixBindError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn apply_owner_and_mode(path: &Path, settings: &UnixSocketSettings) -> Result<(), UnixBindError> {
    if let Some(group) = &settings.group {
        let gid = resolve_group(group)?;
        std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(|source| {
            UnixBindError::Chown {
                path: path.to_path_buf(),
                group: group.clone(),
                source,
            }
        })?;
    }
    if let Some(mode) = settings.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| UnixBindError::Chmod {
                path: path.to_path_buf(),
                mode,
                source,
            },
        )?;
    }
    Ok(())
}

/// A group by name, or by number if it is all digits.
fn resolve_group(group: &str) -> Result<Gid, UnixBindError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(group) {
        Ok(Some(found)) => Ok(found.gid),
        _ => Err(UnixBindError::UnknownGroup {
            group: group.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn settings(mode: Option<u32>, group: Option<String>) -> UnixSocketSettings {
        UnixSocketSettings { mode, group }
    }

    #[test]
    fn a_new_socket_gets_its_mode_and_group_and_accepts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bank.sock");
        let gid = nix::unistd::getegid().as_raw();
        let by_number = settings(Some(0o640), Some(gid.to_string()));
        let listener = bind_unix(&path, 16, &by_number).expect("bind");
        let meta = std::fs::metadata(&path).expect("the socket file");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(meta.gid(), gid);
        let _client = UnixStream::connect(&path).expect("connect");
        listener.accept().expect("accept");

        let name = Group::from_gid(Gid::from_raw(gid))
            .ok()
            .flatten()
            .expect("the test's group has a name")
            .name;
        let other = dir.path().join("echo.sock");
        bind_unix(&other, 16, &settings(Some(0o600), Some(name))).expect("by name");
        assert_eq!(
            std::fs::metadata(&other).expect("file").mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.sock");
        let live = bind_unix(&path, 16, &UnixSocketSettings::default()).expect("bind");
        let err = bind_unix(&path, 16, &UnixSocketSettings::default()).unwrap_err();
        assert!(matches!(err, UnixBindError::InUse { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        // A dead server leaves its socket file behind: nobody listens on it any more.
        drop(live);
        assert!(path.exists());
        let replaced = bind_unix(&path, 16, &UnixSocketSettings::default()).expect("stale");
        let _client = UnixStream::connect(&path).expect("connect to the new socket");
        replaced.accept().expect("accept");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("data.sock");
        std::fs::write(&path, "precious").expect("write");
        let err = bind_unix(&path, 16, &UnixSocketSettings::default()).unwrap_err();
        assert!(matches!(err, UnixBindError::NotASocket { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("still there"),
            "precious"
        );
    }

    #[test]
    fn an_unknown_group_is_an_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("g.sock");
        let err =
            bind_unix(&path, 16, &settings(None, Some("no-such-group-xyz".into()))).unwrap_err();
        assert!(err.to_string().contains("no-such-group-xyz"), "{err}");
        assert!(!path.exists());
        let missing_dir = dir.path().join("nope/s.sock");
        let err = bind_unix(&missing_dir, 16, &UnixSocketSettings::default()).unwrap_err();
        assert!(err.to_string().contains("nope/s.sock"), "{err}");
    }
}
