//! The producer and consumer loops, one blocking connection per thread (a consumer's DONE
//! needs its GET's reply, so a connection has one request in flight at a time).
//!
//! A producer issues a job (waiting for room in the backlog), writes its tagged payload and
//! PUTs it, until the window ends. A consumer GETs a job, checks its payload against the job
//! book, DONEs it and counts it (with its put-to-done latency) if the DONE came back inside
//! the window; it stops once the producers have stopped and every job is done, or at the
//! deadline. A dropped connection is reopened after a back-off; what it held is booked: the
//! PUT in flight as of unknown outcome, the job a consumer held as abandoned (the server may
//! deliver it again).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::jobs::{Delivery, JobBook, Put};
use super::tag::Tag;
use super::wire::{connect, PutReply, QueueClient, Role, Target, WireError};
use crate::stats::Latencies;
use crate::workload::MAX_SAMPLES;

/// First and longest wait before reconnecting.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The run's timeline and what every thread shares.
pub struct Shared<'a> {
    pub target: &'a Target,
    pub book: &'a JobBook,
    /// Load starts (latencies count from here).
    pub start: Instant,
    pub window_start: Instant,
    /// Producers stop here.
    pub window_end: Instant,
    /// Consumers stop here at the latest.
    pub deadline: Instant,
    /// Producers that have stopped.
    pub producers_done: AtomicUsize,
    pub producers: usize,
}

/// What happened on a run's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueCounters {
    /// Jobs whose DONE was acknowledged inside the window.
    pub completed: u64,
    pub connects: u64,
    pub connect_errors: u64,
    /// Connections that failed (reset, broken pipe, ...).
    pub resets: u64,
    /// Connections the server closed.
    pub closed: u64,
    /// Replies that did not come within the timeout.
    pub timeouts: u64,
    /// Replies a request cannot get, and payloads that were damaged or never put.
    pub wrong: u64,
    /// Jobs a consumer held (or may have been handed) when its connection dropped.
    pub abandoned: u64,
}

impl QueueCounters {
    /// Failed connects, resets and timeouts.
    pub fn network_errors(&self) -> u64 {
        self.connect_errors + self.resets + self.timeouts
    }
}

impl std::ops::AddAssign for QueueCounters {
    fn add_assign(&mut self, o: QueueCounters) {
        self.completed += o.completed;
        self.connects += o.connects;
        self.connect_errors += o.connect_errors;
        self.resets += o.resets;
        self.closed += o.closed;
        self.timeouts += o.timeouts;
        self.wrong += o.wrong;
        self.abandoned += o.abandoned;
    }
}

/// What one thread measured.
#[derive(Default)]
pub struct Outcome {
    pub counters: QueueCounters,
    /// Put-to-done latencies of the jobs counted.
    pub latencies: Latencies,
    /// Descriptions of the first wrong replies.
    pub samples: Vec<String>,
}

impl Outcome {
    fn wrong(&mut self, what: String) {
        self.counters.wrong += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(what);
        }
    }

    /// Books a failed exchange.
    fn failed(&mut self, e: &WireError) {
        match e {
            WireError::Io(_) => self.counters.resets += 1,
            WireError::Timeout => self.counters.timeouts += 1,
            WireError::Closed => self.counters.closed += 1,
            WireError::Unexpected(_) => self.wrong(e.to_string()),
        }
    }
}

/// One thread's connection, opened (again) when needed.
struct Link {
    role: Role,
    client: Option<Box<dyn QueueClient>>,
    backoff: Duration,
}

impl Link {
    fn new(role: Role) -> Self {
        Link {
            role,
            client: None,
            backoff: MIN_BACKOFF,
        }
    }

    /// The open connection, or None after a failed attempt (and its back-off, cut short at
    /// `until`).
    fn open(&mut self, target: &Target, out: &mut Outcome, until: Instant) -> bool {
        if self.client.is_some() {
            return true;
        }
        match connect(target, self.role) {
            Ok(client) => {
                out.counters.connects += 1;
                self.client = Some(client);
                self.backoff = MIN_BACKOFF;
                true
            }
            Err(e) => {
                match e {
                    WireError::Unexpected(_) => out.failed(&e),
                    _ => out.counters.connect_errors += 1,
                }
                let nap = self
                    .backoff
                    .min(until.saturating_duration_since(Instant::now()));
                std::thread::sleep(nap);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                false
            }
        }
    }

    /// Drops the connection after `e`.
    fn drop_after(&mut self, e: &WireError, out: &mut Outcome) {
        out.failed(e);
        self.client = None;
    }
}

/// Producer `p`: PUTs tagged jobs until the window ends.
pub fn producer(p: usize, sh: &Shared) -> Outcome {
    let mut out = Outcome::default();
    let mut link = Link::new(Role::Producer);
    let mut payload = Vec::with_capacity(sh.target.size);
    while Instant::now() < sh.window_end {
        if !link.open(sh.target, &mut out, sh.window_end) {
            continue;
        }
        let Some(seq) = sh.book.issue(p, sh.window_end) else {
            break;
        };
        payload.clear();
        let put_ns = sh.start.elapsed().as_nanos() as u64;
        Tag {
            producer: p as u32,
            seq,
            put_ns,
        }
        .write(sh.target.size, &mut payload);
        let Some(client) = link.client.as_mut() else {
            continue;
        };
        match client.put(&payload) {
            Ok(PutReply::Queued) => sh.book.answered(p, seq, Put::Acked),
            Ok(PutReply::Refused) => sh.book.answered(p, seq, Put::Refused),
            Err(e) => {
                sh.book.answered(p, seq, Put::Unknown);
                link.drop_after(&e, &mut out);
            }
        }
    }
    sh.producers_done.fetch_add(1, Ordering::Release);
    out
}

/// A consumer: GETs, checks and DONEs jobs until every job is done after the producers
/// stopped, or the deadline.
pub fn consumer(sh: &Shared) -> Outcome {
    let mut out = Outcome::default();
    let mut link = Link::new(Role::Consumer);
    loop {
        let finished =
            sh.producers_done.load(Ordering::Acquire) == sh.producers && sh.book.open() == 0;
        if finished || Instant::now() >= sh.deadline {
            return out;
        }
        if !link.open(sh.target, &mut out, sh.deadline) {
            continue;
        }
        let Some(client) = link.client.as_mut() else {
            continue;
        };
        let job = match client.get() {
            Ok(Some(job)) => job,
            Ok(None) => continue,
            Err(e) => {
                // The server may have handed this connection a job whose reply was lost.
                out.counters.abandoned += 1;
                link.drop_after(&e, &mut out);
                continue;
            }
        };
        let tag = check(sh.book, &job.payload, &mut out);
        match client.done(&job) {
            Ok(()) => {
                if let Some(tag) = tag {
                    sh.book.done(&tag);
                    count(sh, &tag, &mut out);
                }
            }
            Err(e) => {
                out.counters.abandoned += 1;
                link.drop_after(&e, &mut out);
            }
        }
    }
}

/// The job a payload names, if it is one that was put; a wrong one is booked.
fn check(book: &JobBook, payload: &[u8], out: &mut Outcome) -> Option<Tag> {
    let printable = || forkpool_common::bank::escape_for_reply(payload, 120);
    match Tag::parse(payload) {
        Ok(tag) => match book.delivered(&tag) {
            Delivery::First | Delivery::Again => Some(tag),
            Delivery::NeverPut => {
                out.wrong(format!("job '{}' was never put", printable()));
                None
            }
        },
        Err(e) => {
            out.wrong(format!("job '{}': {e}", printable()));
            None
        }
    }
}

/// Counts a job done now, with its latency, if now is inside the window.
fn count(sh: &Shared, tag: &Tag, out: &mut Outcome) {
    let now = Instant::now();
    if now < sh.window_start || now >= sh.window_end {
        return;
    }
    out.counters.completed += 1;
    let since_start = now.saturating_duration_since(sh.start).as_nanos() as u64;
    out.latencies.record(since_start.saturating_sub(tag.put_ns));
}
