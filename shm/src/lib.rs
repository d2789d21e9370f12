//! State shared between forked processes through a `MAP_SHARED` file mapping: the building
//! blocks that need `unsafe`, kept together so that the crates built on them (the ledger)
//! need none for their shared state.
//!
//! * [`Mapping`]: a file mapped read-write and shared, read as [`Plain`] types at checked
//!   offsets, synced by object;
//! * [`LockWord`]: a robust process-shared pthread mutex with its holder's pid, living in a
//!   mapping;
//! * the SIGBUS answer (`fault.rs`): a mapping whose file shrinks or cannot be read gets a
//!   zero page instead of killing the process, and [`Mapping::faulted`] says so;
//! * [`SharedWord`]: one atomic word shared with the processes forked after it was made;
//! * [`create_allocated`] and [`try_lock`]: making a shared file that no one sees half made,
//!   and the exclusive flock that marks a file in use.
//! * [`futex_wait`] / [`futex_wake_all`]: sleep until a shared word changes (`futex.rs`).
//! * [`LogStore`] / [`FileStore`]: the redo log's segments and checkpoint of `--fsync always`
//!   (`logstore.rs`; no `unsafe`), and under feature `sim` a simulated disk for power-loss
//!   tests ([`sim`]).
//! * opening such a file by a hostile path ([`FilePath`], [`open_locked`], `path.rs`),
//!   keeping a second server off its path ([`PathGuard`], `guard.rs`) and noticing what
//!   others do to it while it is mapped ([`FileWatch`], `watch.rs`): shared by the ledger and
//!   the queue store.

mod create;
mod fault;
mod futex;
mod guard;
mod lock;
mod logstore;
mod mapping;
mod path;
#[cfg(feature = "sim")]
pub mod sim;
mod watch;

pub use create::{create_allocated, temp_prefix, try_lock, CreateError};
pub use futex::{futex_wait, futex_wake_all};
pub use guard::{display_name as guard_name, GuardError, PathGuard};
pub use lock::{
    my_pid, pid_alive, register_atfork, run_wait_hook, set_wait_hook, Acquired, LockWord,
    NotRecoverable, LOCK_WAIT_SLICE, MUTEX_BYTES,
};
pub use logstore::{has_checkpoint, FileStore, LogStore};
pub use mapping::{Mapping, Plain, SharedWord, PAGE};
pub use path::{
    lock_exclusive, open_locked, remove_stale_temps, FileId, FilePath, PathError, OPEN_ATTEMPTS,
};
pub use watch::{FileChange, FileWatch};
