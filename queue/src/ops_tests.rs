//! The operations' contract, one behaviour per test, each ending with the cold start's
//! consistency check on the live state.

use crate::test_support::{me, name, open_when_free, party, run_in_child, small};
use crate::{Attempt, Cancelled, Mode, OpError, Outcome, Store, StoreError};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_when_free(&dir.path().join("q.bin"), &small()).expect("open");
    (dir, store)
}

fn put(store: &Store, queue: &str, payload: &str) -> u64 {
    match store.put(&name(queue), payload.as_bytes(), party(1), Mode::NoWait) {
        Ok((Attempt::Now(id), _)) => id,
        other => panic!("put {payload}: {other:?}"),
    }
}

fn get(store: &Store, queue: &str, conn: u64) -> (u64, String) {
    let mut payload = Vec::new();
    match store.get(&name(queue), party(conn), Mode::NoWait, &mut payload) {
        Ok((Attempt::Now(id), _)) => (id, String::from_utf8(payload).expect("utf8")),
        other => panic!("get: {other:?}"),
    }
}

fn parked<T: std::fmt::Debug>(attempt: Attempt<T>) -> crate::Ticket {
    match attempt {
        Attempt::Parked(ticket) => ticket,
        other => panic!("expected a wait, got {other:?}"),
    }
}

#[test]
fn jobs_come_out_in_order_with_their_payloads_and_done_counts() {
    let (_dir, store) = store();
    let a = put(&store, "work", "first job, with spaces 1 2");
    let b = put(&store, "work", "");
    put(&store, "work", &"x".repeat(40));
    assert_eq!(
        get(&store, "work", 7),
        (a, "first job, with spaces 1 2".into())
    );
    assert_eq!(get(&store, "work", 7), (b, String::new()));
    store.done(a, party(7)).expect("done");
    let stats = store.stats(&name("work")).expect("stats");
    assert_eq!(
        (stats.depth, stats.in_flight, stats.put, stats.done),
        (1, 1, 3, 1)
    );
    assert_eq!(get(&store, "work", 7).1, "x".repeat(40));
    store.check();
}

#[test]
fn nowait_edges_and_refusals_change_nothing() {
    let (_dir, store) = store();
    let mut buf = Vec::new();
    let empty = store.get(&name("e"), party(1), Mode::NoWait, &mut buf);
    assert_eq!(empty.err(), Some(OpError::Empty));
    store.configure(&name("e"), 2).expect("configure");
    put(&store, "e", "1");
    put(&store, "e", "2");
    let full = store.put(&name("e"), b"3", party(1), Mode::NoWait);
    assert_eq!(full.err(), Some(OpError::Full));
    let long = store.put(&name("e"), &[b'y'; 41], party(1), Mode::NoWait);
    assert_eq!(
        long.err(),
        Some(OpError::PayloadTooLong { len: 41, max: 40 })
    );
    let (id, _) = get(&store, "e", 1);
    assert_eq!(store.done(id, party(2)), Err(OpError::NotReserved(id)));
    assert_eq!(
        store.done(id + 1, party(1)),
        Err(OpError::NotReserved(id + 1))
    );
    assert_eq!(store.stats(&name("nope")).err(), Some(OpError::NoSuchQueue));
    for q in ["a", "b", "c"] {
        put(&store, q, "x");
    }
    let fifth = store.put(&name("d"), b"x", party(1), Mode::NoWait);
    assert_eq!(fifth.err(), Some(OpError::TooManyQueues(4)));
    let stats = store.stats(&name("e")).expect("stats");
    assert_eq!((stats.depth, stats.in_flight, stats.put), (1, 1, 2));
    store.check();
}

#[test]
fn parked_getters_are_served_in_arrival_order_and_their_workers_woken() {
    let (_dir, store) = store();
    let mut buf = Vec::new();
    let first = parked(
        store
            .get(&name("q"), party(1), Mode::Wait, &mut buf)
            .expect("get")
            .0,
    );
    let second = parked(
        store
            .get(&name("q"), party(2), Mode::Wait, &mut buf)
            .expect("get")
            .0,
    );
    assert_eq!(store.claim(first, &mut buf), Ok(None), "still waiting");
    let (Attempt::Now(a), wakes) = store
        .put(&name("q"), b"A", party(9), Mode::Wait)
        .expect("put")
    else {
        panic!("a put with a waiting getter completes");
    };
    assert_eq!(wakes.iter().collect::<Vec<_>>(), [me()]);
    let (_, wakes) = store
        .put(&name("q"), b"B", party(9), Mode::Wait)
        .expect("put");
    assert_eq!(wakes.iter().collect::<Vec<_>>(), [me()]);
    assert_eq!(store.claim(first, &mut buf), Ok(Some(Outcome::Job(a))));
    assert_eq!(buf, b"A");
    buf.clear();
    assert!(matches!(
        store.claim(second, &mut buf),
        Ok(Some(Outcome::Job(_)))
    ));
    assert_eq!(buf, b"B");
    assert_eq!(
        store.claim(first, &mut buf),
        Ok(None),
        "a ticket is claimed once"
    );
    store
        .done(a, party(1))
        .expect("the job is the waiting connection's");
    store.check();
}

#[test]
fn a_full_queue_parks_putters_until_a_get_makes_room() {
    let (_dir, store) = store();
    store.configure(&name("q"), 1).expect("configure");
    put(&store, "q", "one");
    let ticket = parked(
        store
            .put(&name("q"), b"two", party(1), Mode::Wait)
            .expect("put")
            .0,
    );
    assert_eq!(store.stats(&name("q")).expect("stats").waiting_putters, 1);
    let mut buf = Vec::new();
    let (Attempt::Now(_), wakes) = store
        .get(&name("q"), party(2), Mode::Wait, &mut buf)
        .expect("get")
    else {
        panic!("a get on a non-empty queue completes");
    };
    assert_eq!(wakes.iter().collect::<Vec<_>>(), [me()]);
    let Ok(Some(Outcome::Put(id))) = store.claim(ticket, &mut buf) else {
        panic!("the putter was served");
    };
    assert_eq!(get(&store, "q", 2), (id, "two".into()));
    store.check();
}

#[test]
fn join_waits_for_the_last_done() {
    let (_dir, store) = store();
    assert_eq!(store.join(&name("unknown"), party(1)), Ok(Attempt::Now(())));
    put(&store, "q", "a");
    put(&store, "q", "b");
    let ticket = parked(store.join(&name("q"), party(1)).expect("join"));
    let (a, _) = get(&store, "q", 2);
    let (b, _) = get(&store, "q", 2);
    assert!(store.done(a, party(2)).expect("done").is_empty());
    let wakes = store.done(b, party(2)).expect("done");
    assert_eq!(wakes.iter().collect::<Vec<_>>(), [me()]);
    let mut buf = Vec::new();
    assert_eq!(store.claim(ticket, &mut buf), Ok(Some(Outcome::Joined)));
    assert_eq!(store.join(&name("q"), party(1)), Ok(Attempt::Now(())));
    store.check();
}

#[test]
fn cancelling_withdraws_a_wait_or_returns_what_it_was_served() {
    let (_dir, store) = store();
    let mut buf = Vec::new();
    let waiting = parked(
        store
            .get(&name("q"), party(1), Mode::Wait, &mut buf)
            .expect("get")
            .0,
    );
    assert_eq!(
        store.cancel(waiting, &mut buf).expect("cancel").0,
        Cancelled::Withdrawn
    );
    let served = parked(
        store
            .get(&name("q"), party(1), Mode::Wait, &mut buf)
            .expect("get")
            .0,
    );
    let id = put(&store, "q", "job");
    let (cancelled, _) = store.cancel(served, &mut buf).expect("cancel");
    assert_eq!(cancelled, Cancelled::Served(Outcome::Job(id)));
    store.release(id, party(1)).expect("release");
    store.configure(&name("q"), 1).expect("configure");
    let pending = parked(
        store
            .put(&name("q"), b"never", party(2), Mode::Wait)
            .expect("put")
            .0,
    );
    assert_eq!(
        store.cancel(pending, &mut buf).expect("cancel").0,
        Cancelled::Withdrawn
    );
    let stats = store.stats(&name("q")).expect("stats");
    assert_eq!((stats.depth, stats.put, stats.waiting_putters), (1, 1, 0));
    assert_eq!(
        get(&store, "q", 3).0,
        id,
        "the released job is delivered again"
    );
    store.check();
}

#[test]
fn released_jobs_go_back_to_the_head_of_their_queue() {
    let (_dir, store) = store();
    let a = put(&store, "q", "a");
    let b = put(&store, "q", "b");
    put(&store, "q", "c");
    get(&store, "q", 1);
    get(&store, "q", 1);
    store.release(b, party(1)).expect("release b");
    store.release(a, party(1)).expect("release a");
    assert_eq!(store.release(a, party(1)), Err(OpError::NotReserved(a)));
    assert_eq!(get(&store, "q", 2).0, a);
    assert_eq!(get(&store, "q", 2).0, b);
    store.check();
}

#[test]
fn a_dead_process_s_jobs_and_waits_are_released() {
    let (dir, store) = store();
    let a = put(&store, "q", "a");
    put(&store, "q", "b");
    let code = run_in_child(&store, 0, &|s| {
        let mut buf = Vec::new();
        let held = s.get(&name("q"), party(1), Mode::Wait, &mut buf).is_ok()
            && s.get(&name("q"), party(1), Mode::Wait, &mut buf).is_ok();
        let parked = s.get(&name("q"), party(1), Mode::Wait, &mut buf);
        held && matches!(parked, Ok((Attempt::Parked(_), _)))
    });
    assert_eq!(code, 0);
    let stats = store.stats(&name("q")).expect("stats");
    assert_eq!(
        (stats.depth, stats.in_flight, stats.waiting_getters),
        (0, 2, 1)
    );
    let dead_owner = store.snapshot();
    assert!(dead_owner.contains("waiter 0: 1"), "{dead_owner}");
    drop(store);
    let store = open_when_free(&dir.path().join("q.bin"), &small()).expect("reopen");
    let stats = store.stats(&name("q")).expect("stats");
    assert_eq!(
        (stats.depth, stats.in_flight, stats.waiting_getters),
        (2, 0, 0)
    );
    assert_eq!(get(&store, "q", 1).0, a, "the oldest held job comes first");
    store.check();
}

#[test]
fn release_process_returns_a_reaped_worker_s_share() {
    let (_dir, store) = store();
    put(&store, "q", "a");
    let code = run_in_child(&store, 0, &|s| {
        let mut buf = Vec::new();
        s.get(&name("q"), party(1), Mode::Wait, &mut buf).is_ok()
            && matches!(
                s.get(&name("q"), party(1), Mode::Wait, &mut buf),
                Ok((Attempt::Parked(_), _))
            )
    });
    assert_eq!(code, 0);
    let g = *store.region.geometry();
    let owner = store.region.get(g.waiter(0, crate::layout::w::OWNER_PID));
    let child_pid = i32::try_from(owner).expect("pid");
    assert!(store.release_process(child_pid).expect("release").is_some());
    let stats = store.stats(&name("q")).expect("stats");
    assert_eq!(
        (stats.depth, stats.in_flight, stats.waiting_getters),
        (1, 0, 0)
    );
    store.check();
}

#[test]
fn jobs_survive_a_restart() {
    let (dir, store) = store();
    put(&store, "q", "kept");
    drop(store);
    let store = open_when_free(&dir.path().join("q.bin"), &small()).expect("reopen");
    assert_eq!(get(&store, "q", 1).1, "kept");
}

#[test]
fn a_file_of_other_limits_is_refused() {
    let (dir, store) = store();
    drop(store);
    let mut other = small();
    other.max_jobs = 17;
    match open_when_free(&dir.path().join("q.bin"), &other) {
        Err(StoreError::LimitsMismatch {
            setting: "max_jobs",
            ..
        }) => {}
        other => panic!("expected a limits mismatch, got {other:?}"),
    }
}

/// Writes `value` at `offset` of the file, then checks that opening it is refused with a
/// `Damaged` finding and leaves every byte as it was.
fn refused_untouched(path: &std::path::Path, offset: u64, value: u64) -> String {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    file.write_all_at(&value.to_ne_bytes(), offset)
        .expect("write");
    drop(file);
    let before = std::fs::read(path).expect("read");
    let err = open_when_free(path, &small()).expect_err("a damaged file is refused");
    assert_eq!(
        std::fs::read(path).expect("read"),
        before,
        "the file was left unchanged"
    );
    match err {
        StoreError::Damaged { finding, .. } => finding.to_string(),
        other => panic!("expected Damaged, got {other}"),
    }
}

#[test]
fn damaged_files_are_refused_untouched() {
    use crate::layout::{hdr, q, Geometry, JOURNAL_OFFSET};
    let g = Geometry::new(4, 16, 40, 8);
    let cases: [(&str, u64, u64, &str); 6] = [
        ("journal naming the lock", hdr::JOURNAL_LEN, 1, "journal"),
        ("ready list cycle", g.queue(0, q::READY_HEAD), 1, "queue 0"),
        ("depth off by one", g.queue(0, q::DEPTH), 5, "queue 0"),
        ("job beyond the high mark", hdr::JOBS_HIGH, 17, "header"),
        (
            "ids would overflow",
            hdr::NEXT_SEQ,
            g.max_seq() + 1,
            "header",
        ),
        (
            "a byte after the name",
            g.queue(0, q::NAME + 7),
            1 << 56,
            "queue 0",
        ),
    ];
    for (what, offset, value, structure) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.bin");
        let store = open_when_free(&path, &small()).expect("open");
        put(&store, "q", "a");
        put(&store, "q", "b");
        drop(store);
        if what.starts_with("journal") {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open");
            file.write_all_at(&64u64.to_ne_bytes(), JOURNAL_OFFSET)
                .expect("write");
        }
        if what == "ready list cycle" {
            // Job 1's NEXT points back at job 0 (link 1), and the head is job 0.
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open");
            let next = g.job(1, crate::layout::j::NEXT);
            file.write_all_at(&1u64.to_ne_bytes(), next).expect("write");
        }
        let finding = refused_untouched(&path, offset, value);
        assert!(finding.starts_with(structure), "{what}: {finding}");
    }
}

#[test]
fn garbage_is_not_a_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.bin");
    std::fs::write(&path, vec![0x5a; 10_000]).expect("write");
    assert!(matches!(
        open_when_free(&path, &small()),
        Err(StoreError::BadMagic { .. })
    ));
    assert_eq!(std::fs::read(&path).expect("read"), vec![0x5a; 10_000]);
}

#[test]
fn the_job_sequence_starts_again_before_ids_overflow() {
    use crate::layout::{hdr, Geometry};
    use std::os::unix::fs::FileExt;
    let g = Geometry::new(4, 16, 40, 8);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.bin");
    drop(open_when_free(&path, &small()).expect("create"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.write_all_at(&g.max_seq().to_ne_bytes(), hdr::NEXT_SEQ)
        .expect("write");
    drop(file);
    let store = open_when_free(&path, &small()).expect("a last sequence number is valid");
    assert_eq!(put(&store, "q", "a"), 16, "sequence 1, record 0");
    store.check();
}

#[test]
fn an_adopted_store_is_the_same_store_untouched() {
    let (dir, store) = store();
    let id = put(&store, "q", "shared");
    let fd = std::os::fd::AsFd::as_fd(&store)
        .try_clone_to_owned()
        .expect("dup");
    let path = dir.path().join("q.bin");
    // Without the guard it inherits, a second Store on the path is refused by the guard.
    assert!(matches!(
        Store::adopt(fd.try_clone().expect("dup"), None, &path, &small()),
        Err(StoreError::PathInUse { .. })
    ));
    let guard = store.guard().try_clone_to_owned().expect("dup the guard");
    let adopted = Store::adopt(fd, Some(guard), &path, &small()).expect("adopt");
    assert_eq!(get(&adopted, "q", 1).0, id);
    assert_eq!(store.stats(&name("q")).expect("stats").in_flight, 1);
}

#[test]
fn a_handed_over_connection_takes_its_jobs_along() {
    let (_dir, store) = store();
    let id = put(&store, "q", "job");
    get(&store, "q", 1);
    let me = forkpool_shm::my_pid();
    assert_eq!(
        store.take_over(id, (me, 2), party(3)),
        Err(OpError::NotReserved(id))
    );
    store.take_over(id, (me, 1), party(3)).expect("take over");
    assert_eq!(store.done(id, party(1)), Err(OpError::NotReserved(id)));
    store.done(id, party(3)).expect("done by the new owner");
    store.check();
}
