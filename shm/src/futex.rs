//! Process-shared futex wait and wake on an atomic word that lives in a `MAP_SHARED` mapping:
//! a process sleeps until another one (or another thread) changes the word and wakes it,
//! without a lock and without polling.
//!
//! The futex is keyed by the word's page in the mapped file (no `FUTEX_PRIVATE_FLAG`), so it
//! works across the processes that map the same file, forked or not.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `word` holds `expected`, for at most `timeout`. Returns when the word no
/// longer holds `expected` (it may return early: a wake, a signal, the timeout; callers
/// re-check their condition in a loop).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live reference to an aligned 32-bit atomic for the whole call; the
    // kernel only reads it (and compares it with `expected`); `ts` is a valid relative
    // timeout for the call's duration; the unused arguments are ignored by FUTEX_WAIT.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every thread of every process sleeping in [`futex_wait`] on `word`. Change the word
/// first, then wake.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live reference to an aligned 32-bit atomic; FUTEX_WAKE does not
    // access memory besides looking the word's key up; the unused arguments are ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedWord;
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Instant;

    #[test]
    fn a_waiter_in_another_process_is_woken_by_a_change() {
        let word = SharedWord::new().expect("shared word");
        // SAFETY: the child only waits on the futex, stores to an atomic and `_exit`s.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                while word.get().load(SeqCst) == 0 {
                    futex_wait(word.get(), 0, Duration::from_secs(10));
                }
                word.get().store(2, SeqCst);
                futex_wake_all(word.get());
                // SAFETY: _exit is async-signal-safe and never returns.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                word.get().store(1, SeqCst);
                futex_wake_all(word.get());
                let deadline = Instant::now() + Duration::from_secs(10);
                while word.get().load(SeqCst) != 2 && Instant::now() < deadline {
                    futex_wait(word.get(), 1, Duration::from_millis(100));
                }
                nix::sys::wait::waitpid(child, None).expect("waitpid");
            }
        }
        assert_eq!(word.get().load(SeqCst), 2);
    }

    #[test]
    fn a_wait_on_a_changed_word_returns_at_once() {
        let word = AtomicU32::new(5);
        let start = Instant::now();
        futex_wait(&word, 4, Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
