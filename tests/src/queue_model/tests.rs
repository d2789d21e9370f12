//! The checker on small hand-made histories: what a correct queue may do passes, and each
//! class of bug the module comment names is rejected by its rule.

use super::{check, smallest, Counters, Event, LossCause, Rule};

/// A hand-made history, instants in nanoseconds.
#[derive(Default)]
struct H(Vec<Event>);

impl H {
    fn call(mut self, conn: u64, inv: u64, request: &str, resp: u64, reply: &str) -> H {
        self.0.push(Event::Call {
            conn,
            inv,
            request: request.to_string(),
            reply: Some((resp, reply.to_string())),
        });
        self
    }

    fn unanswered(mut self, conn: u64, inv: u64, request: &str) -> H {
        self.0.push(Event::Call {
            conn,
            inv,
            request: request.to_string(),
            reply: None,
        });
        self
    }

    fn loss(mut self, conn: u64, at: u64) -> H {
        self.0.push(Event::Loss {
            conn,
            at,
            cause: LossCause::DroppedByClient,
        });
        self
    }

    fn stats(mut self, put: u64, done: u64, depth: u64, in_flight: u64) -> H {
        self.0.push(Event::Final(Counters {
            queue: "q".to_string(),
            put,
            done,
            depth,
            in_flight,
        }));
        self
    }

    /// The rules the history breaks (none: it passes).
    fn broken(&self) -> Vec<Rule> {
        match check(&self.0) {
            Ok(_) => Vec::new(),
            Err(violations) => {
                let mut rules: Vec<Rule> = violations.iter().map(|v| v.rule).collect();
                rules.dedup();
                rules
            }
        }
    }
}

/// `a` then `b` put on connection 1.
fn two_puts() -> H {
    H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(1, 2, "PUT q 0 b", 3, "OK 2")
}

#[test]
fn a_plain_fifo_run_passes() {
    let h = two_puts()
        .call(2, 4, "GET q", 5, "JOB 1 a")
        .call(2, 6, "DONE 1", 7, "OK")
        .call(2, 8, "GET q 100", 9, "JOB 2 b")
        .call(2, 10, "DONE 2", 11, "OK")
        .call(2, 12, "GET_NOWAIT q", 13, "ERR empty the queue is empty")
        .stats(2, 2, 0, 0);
    assert_eq!(h.broken(), []);
    let summary = check(&h.0).expect("passes");
    assert_eq!(
        (summary.jobs, summary.deliveries, summary.redeliveries),
        (2, 2, 0)
    );
}

#[test]
fn a_job_of_a_lost_connection_comes_back_first() {
    let h = two_puts()
        .call(2, 4, "GET q", 5, "JOB 1 a")
        .loss(2, 6)
        .call(3, 7, "GET q", 8, "JOB 1 a")
        .call(3, 9, "DONE 1", 10, "OK")
        .call(3, 11, "GET q", 12, "JOB 2 b")
        .call(3, 13, "DONE 2", 14, "OK")
        .stats(2, 2, 0, 0);
    assert_eq!(h.broken(), []);
}

#[test]
fn a_hidden_get_explains_one_skipped_job_not_two() {
    // c2's GET got no reply: it may have taken `a`, which came back only later.
    let skipped = two_puts()
        .unanswered(2, 4, "GET q")
        .loss(2, 5)
        .call(3, 6, "GET q", 7, "JOB 2 b")
        .call(3, 8, "DONE 2", 9, "OK")
        .call(3, 10, "GET q", 11, "JOB 1 a")
        .call(3, 12, "DONE 1", 13, "OK")
        .stats(2, 2, 0, 0);
    assert_eq!(skipped.broken(), []);
    let two_skipped = two_puts()
        .call(1, 4, "PUT q 0 c", 5, "OK 3")
        .unanswered(2, 6, "GET q")
        .loss(2, 7)
        .call(3, 8, "GET q", 9, "JOB 3 c")
        .call(3, 10, "GET q", 11, "JOB 1 a")
        .call(3, 12, "GET q", 13, "JOB 2 b");
    assert_eq!(two_skipped.broken(), [Rule::VOrd]);
}

#[test]
fn one_hidden_get_cannot_explain_two_skips_at_different_times() {
    // The unanswered GET may have taken `a` (skipped by the first GET) or `c` (skipped by
    // the last), not both.
    let h = two_puts()
        .unanswered(2, 4, "GET q")
        .loss(2, 5)
        .call(3, 6, "GET q", 7, "JOB 2 b")
        .call(3, 8, "GET q", 9, "JOB 1 a")
        .call(1, 10, "PUT q 0 c", 11, "OK 3")
        .call(1, 12, "PUT q 0 d", 13, "OK 4")
        .call(3, 14, "GET q", 15, "JOB 4 d")
        .call(3, 16, "GET q", 17, "JOB 3 c");
    assert_eq!(h.broken(), [Rule::VOrd]);
}

#[test]
fn a_duplicate_read_late_from_a_killed_worker_passes() {
    // c2's JOB was written by a worker killed right after; the job went back and c3 got it
    // before c2's thread read its reply.
    let mut h = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 10, "GET q", 50, "JOB 1 a")
        .call(3, 20, "GET q", 30, "JOB 1 a")
        .call(3, 31, "DONE 1", 32, "OK");
    h.0.push(Event::Loss {
        conn: 2,
        at: 10,
        cause: LossCause::ClosedByServer,
    });
    assert_eq!(h.broken(), []);
}

#[test]
fn a_kill_the_holder_never_noticed_explains_a_duplicate() {
    let before = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 2, "GET q", 3, "JOB 1 a");
    let after = |h: H| {
        h.call(3, 5, "GET q", 6, "JOB 1 a")
            .call(3, 7, "DONE 1", 8, "OK")
            .loss(2, 9)
    };
    let mut killed = before;
    killed.0.push(Event::Kill { pid: 42, at: 4 });
    assert_eq!(after(killed).broken(), []);
    // A kill sent before the holder's last answered request was sent closed nothing of it.
    let mut early = H::default().call(1, 0, "PUT q 0 a", 1, "OK 1");
    early.0.push(Event::Kill { pid: 42, at: 1 });
    let early = early.call(2, 2, "GET q", 3, "JOB 1 a");
    assert_eq!(after(early).broken(), [Rule::VRepet]);
}

#[test]
fn a_job_delivered_twice_with_no_loss_between_is_rejected() {
    let h = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 2, "GET q", 3, "JOB 1 a")
        .call(3, 4, "GET q", 5, "JOB 1 a")
        .loss(2, 6);
    assert_eq!(h.broken(), [Rule::VRepet]);
}

#[test]
fn a_job_delivered_after_its_done_was_acknowledged_is_rejected() {
    let h = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 2, "GET q", 3, "JOB 1 a")
        .call(2, 4, "DONE 1", 5, "OK")
        .loss(2, 6)
        .call(3, 7, "GET q", 8, "JOB 1 a");
    assert_eq!(h.broken(), [Rule::VRepet]);
}

#[test]
fn a_job_never_put_is_rejected() {
    let ghost = H::default().call(2, 2, "GET q", 3, "JOB 9 ghost");
    assert_eq!(ghost.broken(), [Rule::VFresh]);
    let refused = H::default()
        .call(1, 0, "PUT_NOWAIT q a", 1, "ERR full the queue is full")
        .call(2, 2, "GET q", 3, "JOB 1 a");
    assert_eq!(refused.broken(), [Rule::VFresh]);
    let early = H::default()
        .call(2, 2, "GET q", 3, "JOB 1 a")
        .call(1, 4, "PUT q 0 a", 5, "OK 1");
    assert_eq!(early.broken(), [Rule::VFresh]);
    let other_id = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 2, "GET q", 3, "JOB 7 a");
    assert_eq!(other_id.broken(), [Rule::VFresh]);
}

#[test]
fn a_job_taken_before_one_put_earlier_is_rejected() {
    let h = two_puts()
        .call(2, 4, "GET q", 5, "JOB 2 b")
        .call(2, 6, "GET q", 7, "JOB 1 a");
    assert_eq!(h.broken(), [Rule::VOrd]);
    // Overlapping PUTs have no order: either may come first.
    let overlapping = H::default()
        .call(1, 0, "PUT q 0 a", 3, "OK 1")
        .call(4, 1, "PUT q 0 b", 2, "OK 2")
        .call(2, 4, "GET q", 5, "JOB 2 b")
        .call(2, 6, "GET q", 7, "JOB 1 a");
    assert_eq!(overlapping.broken(), []);
}

#[test]
fn an_empty_answer_while_a_job_was_surely_queued_is_rejected() {
    let empty = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 2, "GET_NOWAIT q", 3, "ERR empty the queue is empty")
        .call(2, 4, "GET q", 5, "JOB 1 a");
    assert_eq!(empty.broken(), [Rule::VWit]);
    let timeout = H::default().call(1, 0, "PUT q 0 a", 1, "OK 1").call(
        2,
        2,
        "GET q 100",
        103,
        "ERR timeout the wait ran out; nothing changed",
    );
    assert_eq!(timeout.broken(), [Rule::VWit]);
    // A PUT still unanswered when the GET was sent may come after it.
    let racing = H::default().call(1, 0, "PUT q 0 a", 3, "OK 1").call(
        2,
        2,
        "GET_NOWAIT q",
        3,
        "ERR empty the queue is empty",
    );
    assert_eq!(racing.broken(), []);
}

#[test]
fn counters_that_do_not_add_up_are_rejected() {
    let done = two_puts()
        .call(2, 4, "GET q", 5, "JOB 1 a")
        .call(2, 6, "DONE 1", 7, "OK")
        .call(2, 8, "GET q", 9, "JOB 2 b")
        .call(2, 10, "DONE 2", 11, "OK");
    assert_eq!(H(done.0.clone()).stats(2, 2, 0, 0).broken(), []);
    assert_eq!(H(done.0.clone()).stats(2, 1, 0, 0).broken(), [Rule::VCount]);
    assert_eq!(H(done.0).stats(3, 2, 1, 0).broken(), [Rule::VCount]);
    // Counters that add up, but `b` was never done by anyone: put != done.
    let undone = two_puts()
        .call(2, 4, "GET q", 5, "JOB 1 a")
        .call(2, 6, "DONE 1", 7, "OK")
        .call(2, 8, "GET q", 9, "JOB 2 b")
        .stats(2, 2, 0, 0);
    assert_eq!(undone.broken(), [Rule::VCount]);
    // An unanswered DONE by the last holder may have counted.
    let maybe = two_puts()
        .call(2, 4, "GET q", 5, "JOB 1 a")
        .call(2, 6, "DONE 1", 7, "OK")
        .call(2, 8, "GET q", 9, "JOB 2 b")
        .unanswered(2, 10, "DONE 2")
        .loss(2, 11)
        .stats(2, 2, 0, 0);
    assert_eq!(maybe.broken(), []);
    // The last holder is the one whose GET was served last, not sent last: c2's GET was
    // parked first and served after c3's holder was lost; c2's unanswered DONE may count.
    let parked = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(3, 20, "GET q", 21, "JOB 1 a")
        .loss(3, 22)
        .call(2, 10, "GET q", 30, "JOB 1 a")
        .unanswered(2, 31, "DONE 1")
        .loss(2, 32)
        .stats(1, 1, 0, 0);
    assert_eq!(parked.broken(), []);
}

#[test]
fn a_done_twice_or_by_a_stranger_is_rejected() {
    let twice = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 2, "GET q", 3, "JOB 1 a")
        .call(2, 4, "DONE 1", 5, "OK")
        .call(2, 6, "DONE 1", 7, "OK");
    assert_eq!(twice.broken(), [Rule::VDone]);
    let stranger = H::default()
        .call(1, 0, "PUT q 0 a", 1, "OK 1")
        .call(2, 2, "GET q", 3, "JOB 1 a")
        .call(3, 4, "DONE 1", 5, "OK");
    assert!(stranger.broken().contains(&Rule::VDone));
}

#[test]
fn the_smallest_offending_sub_history_is_printed() {
    let h = two_puts()
        .call(1, 4, "PUT q 0 c", 5, "OK 3")
        .call(2, 6, "GET q", 7, "JOB 1 a")
        .call(3, 8, "GET q", 9, "JOB 1 a");
    let violations = check(&h.0).expect_err("a duplicate");
    let text = smallest(&violations, &h.0);
    assert!(text.starts_with("VRepet: "), "{text}");
    assert!(
        text.contains("#3 c2 [0.000 ms, 0.000 ms] GET q -> JOB 1 a"),
        "{text}"
    );
    assert!(!text.contains("PUT q 0 c"), "{text}");
}
