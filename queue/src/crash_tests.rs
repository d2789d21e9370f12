//! Crash-point tests of recovery. A forked child runs a scenario's steps with crash point `k`
//! armed and `_exit`s there, as if SIGKILLed at that instruction (the lock held, the journal
//! half written); the parent then takes the lock (which rolls the dead operation back and
//! settles every queue) and the state must be consistent (the cold start's check) and equal
//! the state before a step or after it, computed on a twin store that ran the steps cleanly.
//! The store must then still take operations, and a cold start of the same file must accept
//! it. `k` runs from 1 until the child completes. Every scenario runs under both fsync
//! policies: under `always` the crash points of the log's append count too, and the cold
//! start, which rebuilds the file from the checkpoint and the log, must find the state the
//! repaired store had (the log and the memory agree after a repair).

use std::path::Path;

use crate::crash::CRASH_STATUS;
use crate::test_support::{name, open_when_free, party, run_in_child, small};
use crate::{Attempt, FsyncPolicy, Mode, Store, StoreOptions};

type Step = dyn Fn(&Store) -> bool;

struct Scenario<'a> {
    name: &'a str,
    setup: &'a dyn Fn(&Store),
    steps: &'a [&'a Step],
}

fn open(path: &Path, fsync: FsyncPolicy) -> Store {
    let options = StoreOptions {
        fsync,
        log_segment_bytes: 1 << 16,
        ..small()
    };
    open_when_free(path, &options).expect("open store")
}

/// The snapshots before the first step and after each prefix of the steps, each prefix run
/// cleanly in one child on its own twin store, as the sweep runs them (owners are the child's).
fn reference(dir: &Path, s: &Scenario<'_>) -> Vec<String> {
    (0..=s.steps.len())
        .map(|n| {
            let store = open(&dir.join(format!("reference{n}.bin")), FsyncPolicy::Never);
            (s.setup)(&store);
            if n > 0 {
                let code = run_in_child(&store, 0, &run_steps(&s.steps[..n]));
                assert_eq!(code, 0, "{}: {n} steps succeed when not killed", s.name);
            }
            store.snapshot()
        })
        .collect()
}

fn run_steps<'a>(steps: &'a [&'a Step]) -> impl Fn(&Store) -> bool + 'a {
    move |store| steps.iter().all(|step| step(store))
}

fn check_repaired(
    store: Store,
    path: &Path,
    fsync: FsyncPolicy,
    s: &Scenario<'_>,
    expected: &[String],
    k: u32,
) {
    store.stats(&name("probe")).ok();
    store.check();
    let seen = store.snapshot();
    assert!(
        expected.contains(&seen),
        "{}, killed at step {k}: a state no clean run has:\n{seen}\nexpected one of:\n{}",
        s.name,
        expected.join("--\n")
    );
    assert_eq!(store.lock_holder(), 0, "{}: the lock is free", s.name);
    let mut buf = Vec::new();
    store
        .put(&name("probe"), b"p", party(1), Mode::NoWait)
        .expect("the store still takes a put");
    store
        .get(&name("probe"), party(1), Mode::NoWait, &mut buf)
        .expect("and a get");
    store.check();
    let view = store.durable_view();
    drop(store);
    let reopened = open(path, fsync);
    reopened.check();
    assert_eq!(
        reopened.durable_view(),
        view,
        "{}, killed at step {k}: the cold start",
        s.name
    );
}

fn sweep(s: &Scenario<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = reference(dir.path(), s);
    for fsync in [FsyncPolicy::Never, FsyncPolicy::Always] {
        sweep_with(s, fsync, dir.path(), &expected);
    }
}

fn sweep_with(s: &Scenario<'_>, fsync: FsyncPolicy, dir: &Path, expected: &[String]) {
    for k in 1.. {
        let path = dir.join(format!("{fsync}-k{k}.bin"));
        let store = open(&path, fsync);
        (s.setup)(&store);
        match run_in_child(&store, k, &run_steps(s.steps)) {
            0 => {
                assert!(k > 3, "{}: the steps have crash points", s.name);
                assert_eq!(store.snapshot(), expected[expected.len() - 1], "{}", s.name);
                return;
            }
            CRASH_STATUS => check_repaired(store, &path, fsync, s, expected, k),
            code => panic!("{}: child exited {code} at step {k}", s.name),
        }
    }
}

fn configure(store: &Store, maxsize: u64) {
    store.configure(&name("q"), maxsize).expect("configure");
}

fn put_now(store: &Store, payload: &[u8]) {
    let done = store.put(&name("q"), payload, party(1), Mode::NoWait);
    assert!(matches!(done, Ok((Attempt::Now(_), _))), "{done:?}");
}

fn park_get(store: &Store) {
    let mut buf = Vec::new();
    let parked = store.get(&name("q"), party(9), Mode::Wait, &mut buf);
    assert!(matches!(parked, Ok((Attempt::Parked(_), _))), "{parked:?}");
}

fn put_step(store: &Store) -> bool {
    store
        .put(&name("q"), b"a payload of some words", party(1), Mode::Wait)
        .is_ok()
}

/// The job the last GET step got, for a DONE step of the same child.
static GOT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn get_step(store: &Store) -> bool {
    let mut buf = Vec::new();
    match store.get(&name("q"), party(1), Mode::NoWait, &mut buf) {
        Ok((Attempt::Now(id), _)) => {
            GOT.store(id, std::sync::atomic::Ordering::Relaxed);
            true
        }
        _ => false,
    }
}

fn done_step(store: &Store) -> bool {
    let id = GOT.load(std::sync::atomic::Ordering::Relaxed);
    store.done(id, party(1)).is_ok()
}

#[test]
fn a_put_is_all_or_nothing() {
    sweep(&Scenario {
        name: "put",
        setup: &|s| {
            configure(s, 0);
            put_now(s, b"first");
        },
        steps: &[&put_step],
    });
}

#[test]
fn a_put_handed_to_a_parked_getter_is_all_or_nothing() {
    sweep(&Scenario {
        name: "put to a parked getter",
        setup: &|s| {
            configure(s, 0);
            park_get(s);
            park_get(s);
        },
        steps: &[&put_step, &put_step],
    });
}

#[test]
fn a_get_that_admits_a_parked_putter_is_all_or_nothing() {
    sweep(&Scenario {
        name: "get with a parked putter",
        setup: &|s| {
            configure(s, 1);
            put_now(s, b"one");
            let parked = s.put(&name("q"), b"two", party(9), Mode::Wait);
            assert!(matches!(parked, Ok((Attempt::Parked(_), _))));
        },
        steps: &[&get_step],
    });
}

#[test]
fn a_done_that_ends_a_join_is_all_or_nothing() {
    sweep(&Scenario {
        name: "done ending a join",
        setup: &|s| {
            configure(s, 0);
            put_now(s, b"only");
            let parked = s.join(&name("q"), party(9));
            assert!(matches!(parked, Ok(Attempt::Parked(_))));
        },
        steps: &[&get_step, &done_step],
    });
}

#[test]
fn withdrawing_a_dead_worker_s_blocked_put_is_all_or_nothing() {
    sweep(&Scenario {
        name: "dead worker's blocked put withdrawn",
        setup: &|s| {
            configure(s, 1);
            put_now(s, b"one");
            let parked = run_in_child(s, 0, &|s| {
                let parked = s.put(&name("q"), b"two", party(1), Mode::Wait);
                matches!(parked, Ok((Attempt::Parked(_), _)))
            });
            assert_eq!(parked, 0);
            let g = *s.region.geometry();
            let pid = s.region.get(g.waiter(0, crate::layout::w::OWNER_PID));
            DEAD.store(pid, std::sync::atomic::Ordering::Relaxed);
        },
        steps: &[&|s: &Store| {
            let pid = DEAD.load(std::sync::atomic::Ordering::Relaxed) as i32;
            matches!(s.release_process(pid), Ok(Some(_)))
        }],
    });
}

/// The pid of the child that parked the blocked put (set by the setup, read by the step).
static DEAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
