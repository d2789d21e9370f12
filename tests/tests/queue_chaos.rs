//! The queue service under chaos, checked by a model: producers and consumers on three
//! workers while consumers drop their connections at random points (mid-GET, holding a job,
//! mid-DONE) and workers are SIGKILLed. Every call is recorded on one clock and the history is
//! checked against a linearizable FIFO with redelivery (`forkpool_testkit::queue_model`):
//! every job put was done, each duplicate is explained by a lost connection, the order is
//! FIFO, no GET found the queue empty while a job was surely in it, and the counters add up.
//! The checker is shown to bite on the recorded history itself, mutated.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::queue_history::{History, RecordedConn};
use forkpool_testkit::queue_model::{check, job_reply, smallest, Event, Rule, Summary};
use forkpool_testkit::{queue_stat, queue_stats, wait_until, Rng, Server};

const QUEUE: &str = "chaos";
const WORKERS: usize = 3;
const PRODUCERS: u64 = 3;
const JOBS_PER_PRODUCER: u64 = 200;
const JOBS: u64 = PRODUCERS * JOBS_PER_PRODUCER;
const CONSUMERS: u64 = 4;
/// Workers SIGKILLed, spread over the run by the number of jobs done.
const KILLS: u64 = 6;
/// Out of 100 GETs: how many are GET_NOWAIT, and how many are sent on a connection closed
/// right after.
const NOWAIT_PERCENT: u64 = 10;
const DROPPED_GET_PERCENT: u64 = 8;
/// Out of 100 jobs received: closed holding the job, and closed with its DONE just sent.
const DROPPED_HOLDING_PERCENT: u64 = 6;
const DROPPED_DONE_PERCENT: u64 = 6;
/// The longest pause between sending a request and closing its connection: the close lands
/// before, during or after the request's service.
const MAX_LINGER_MICROS: u64 = 3000;
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn chaos_history_is_a_linearizable_fifo_with_redelivery() {
    let server = Server::builder()
        .args(["--workers", &WORKERS.to_string()])
        .start();
    let addr = server.queue_addr();
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let history = Arc::clone(&history);
            std::thread::spawn(move || produce(&history, addr, p))
        })
        .collect();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|c| {
            let (history, stop) = (Arc::clone(&history), Arc::clone(&stop));
            std::thread::spawn(move || consume(&history, addr, Rng(0xc0ffee + c), &stop))
        })
        .collect();
    let mut rng = Rng(0x5eed);
    for k in 1..=KILLS {
        wait_until("progress before a kill", WAIT, || {
            (queue_stat(addr, QUEUE, "done") >= JOBS * k / (KILLS + 2)).then_some(())
        });
        let workers = server.wait_workers(WORKERS, WAIT);
        let victim = workers[rng.below(workers.len() as u64) as usize];
        history.kill(victim);
        wait_until("the killed worker to be replaced", WAIT, || {
            let now = server.workers();
            (now.len() == WORKERS && !now.contains(&victim)).then_some(())
        });
    }
    for producer in producers {
        producer.join().expect("a producer");
    }
    wait_until("every job put to be done", WAIT, || {
        let s = queue_stats(addr, QUEUE);
        (s["depth"] == 0 && s["in_flight"] == 0 && s["put"] == s["done"]).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.join().expect("a consumer");
    }
    history.final_stats(QUEUE, &queue_stats(addr, QUEUE));
    let events = history.events();
    let summary = check(&events).unwrap_or_else(|violations| {
        panic!(
            "{} violation(s) of the model; the smallest:\n{}",
            violations.len(),
            smallest(&violations, &events)
        )
    });
    eprintln!("{summary:?}");
    assert_chaos_happened(&summary);
    assert_mutations_are_rejected(&events);
}

/// Puts this producer's jobs, each payload once; a PUT cut by a kill is not tried again.
fn produce(history: &Arc<History>, addr: SocketAddr, producer: u64) {
    let mut conn = history.connect(addr);
    for n in 0..JOBS_PER_PRODUCER {
        if conn
            .request(&format!("PUT {QUEUE} 0 p{producer}-{n}"))
            .is_none()
        {
            conn = history.connect(addr);
        }
    }
}

/// Takes jobs and marks them done until `stop`, dropping its connection at random points.
fn consume(history: &Arc<History>, addr: SocketAddr, mut rng: Rng, stop: &AtomicBool) {
    let mut conn = history.connect(addr);
    while !stop.load(Ordering::Relaxed) {
        let roll = rng.below(100);
        let get = if roll < NOWAIT_PERCENT {
            format!("GET_NOWAIT {QUEUE}")
        } else {
            format!("GET {QUEUE} 100")
        };
        if roll >= 100 - DROPPED_GET_PERCENT {
            replace(&mut conn, history, addr).send_and_drop(&get, linger(&mut rng));
            continue;
        }
        let Some(reply) = conn.request(&get) else {
            conn = history.connect(addr);
            continue;
        };
        let Ok((id, _)) = job_reply(&reply) else {
            continue; // empty, or timed out
        };
        let done = format!("DONE {id}");
        let roll = rng.below(100);
        if roll < DROPPED_HOLDING_PERCENT {
            drop(replace(&mut conn, history, addr));
        } else if roll < DROPPED_HOLDING_PERCENT + DROPPED_DONE_PERCENT {
            replace(&mut conn, history, addr).send_and_drop(&done, linger(&mut rng));
        } else if conn.request(&done).is_none() {
            conn = history.connect(addr);
        }
    }
}

/// Puts a new connection in `conn`'s place and returns the old one.
fn replace(conn: &mut RecordedConn, history: &Arc<History>, addr: SocketAddr) -> RecordedConn {
    std::mem::replace(conn, history.connect(addr))
}

fn linger(rng: &mut Rng) -> Duration {
    Duration::from_micros(rng.below(MAX_LINGER_MICROS))
}

/// The run had the chaos it was meant to have.
fn assert_chaos_happened(summary: &Summary) {
    assert_eq!(summary.kills, KILLS as usize);
    assert!(
        summary.jobs as u64 >= JOBS - KILLS * PRODUCERS,
        "a kill cuts at most one PUT of each producer: {summary:?}"
    );
    assert!(summary.redeliveries > 0, "no job came back: {summary:?}");
    assert!(summary.hidden_gets > 0, "no GET was cut: {summary:?}");
    assert!(summary.unanswered_dones > 0, "no DONE was cut: {summary:?}");
    assert!(
        summary.losses.0 > 0 && summary.losses.1 > 0,
        "losses of both kinds: {summary:?}"
    );
}

/// The checker rejects the recorded history made wrong: a job delivered again after its DONE
/// was acknowledged, a job that was never put, and jobs handed out newest first for a while.
fn assert_mutations_are_rejected(events: &[Event]) {
    let (job_line, done_at) = events
        .iter()
        .find_map(|event| acknowledged_done(events, event))
        .expect("some job was done");
    let mut duplicated = events.to_vec();
    duplicated.push(Event::Call {
        conn: u64::MAX,
        inv: done_at + 1,
        request: format!("GET {QUEUE}"),
        reply: Some((done_at + 2, job_line)),
    });
    assert_rejected(&duplicated, Rule::VRepet);
    let mut ghost = events.to_vec();
    ghost.push(Event::Call {
        conn: u64::MAX,
        inv: done_at + 1,
        request: format!("GET {QUEUE}"),
        reply: Some((done_at + 2, format!("JOB {} never put", u64::MAX))),
    });
    assert_rejected(&ghost, Rule::VFresh);
    assert_rejected(&newest_first(events), Rule::VOrd);
}

/// First deliveries in the history handed out in reverse for a stretch of them.
const REVERSED_DELIVERIES: usize = 100;

/// `events` with the replies of a stretch of first deliveries reversed, as if the queue had
/// served them newest first.
fn newest_first(events: &[Event]) -> Vec<Event> {
    let mut seen = std::collections::BTreeSet::new();
    let mut first: Vec<(u64, usize)> = events
        .iter()
        .enumerate()
        .filter_map(|(index, event)| match event {
            Event::Call {
                inv,
                reply: Some((_, reply)),
                ..
            } if job_reply(reply).is_ok() => Some((*inv, index, reply.clone())),
            _ => None,
        })
        .filter(|(_, _, reply)| seen.insert(reply.clone()))
        .map(|(inv, index, _)| (inv, index))
        .collect();
    first.sort_unstable();
    let start = first.len().saturating_sub(REVERSED_DELIVERIES) / 2;
    let stretch: Vec<usize> = first
        .iter()
        .skip(start)
        .take(REVERSED_DELIVERIES)
        .map(|(_, index)| *index)
        .collect();
    let replies: Vec<Event> = stretch.iter().map(|&i| events[i].clone()).collect();
    let mut mutated = events.to_vec();
    for (&index, original) in stretch.iter().zip(replies.iter().rev()) {
        if let (
            Event::Call {
                reply: Some((_, reply)),
                ..
            },
            Event::Call {
                reply: Some((_, other)),
                ..
            },
        ) = (&mut mutated[index], original)
        {
            reply.clone_from(other);
        }
    }
    mutated
}

/// For a JOB reply whose DONE came back `OK` on the same connection: the reply, and the
/// instant the `OK` was read.
fn acknowledged_done(events: &[Event], event: &Event) -> Option<(String, u64)> {
    let Event::Call {
        conn,
        reply: Some((_, reply)),
        ..
    } = event
    else {
        return None;
    };
    let (id, _) = job_reply(reply).ok()?;
    let done_request = format!("DONE {id}");
    events.iter().find_map(|other| match other {
        Event::Call {
            conn: c,
            request,
            reply: Some((at, ok)),
            ..
        } if c == conn && *request == done_request && ok == "OK" => Some((reply.clone(), *at)),
        _ => None,
    })
}

fn assert_rejected(history: &[Event], rule: Rule) {
    let violations = check(history).expect_err("a mutated history is rejected");
    assert!(
        violations.iter().any(|v| v.rule == rule),
        "expected {rule:?}, got:\n{}",
        smallest(&violations, history)
    );
}
