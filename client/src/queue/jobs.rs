//! The run's record of every job, shared by the producer and consumer threads: what each
//! producer issued and what the server said to its PUT, how often each job was delivered and
//! done, and the backlog bound that keeps producers from running ahead of consumers.
//!
//! One lane per producer (indexed by sequence number) behind its own mutex: a producer
//! touches only its lane, a consumer the lane of the job it got.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;

use super::tag::Tag;

/// What the server said to a job's PUT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Put {
    /// Sent, no reply yet.
    #[default]
    Sent,
    /// Acknowledged: the job is in the queue.
    Acked,
    /// The connection dropped before the reply: the job may or may not be in the queue.
    Unknown,
    /// Refused (a PUT that timed out): the job is not in the queue.
    Refused,
}

#[derive(Debug, Clone, Copy, Default)]
struct Job {
    put: Put,
    delivered: u32,
    done: u32,
}

/// How a delivered payload compares with what was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    First,
    /// Delivered before: legitimate only after a consumer connection dropped holding it.
    Again,
    /// No producer issued it, or its PUT was refused.
    NeverPut,
}

/// The tallies at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobSummary {
    /// Jobs issued by the producers (PUTs sent).
    pub issued: u64,
    /// PUTs acknowledged.
    pub put: u64,
    /// PUTs whose reply never came (a dropped connection).
    pub put_unknown: u64,
    /// PUTs refused (timed out on a full queue).
    pub put_refused: u64,
    /// Jobs done at least once.
    pub done: u64,
    /// Deliveries beyond a job's first.
    pub redelivered: u64,
    /// Jobs acknowledged as put and never done.
    pub missing: u64,
}

/// The shared record.
pub struct JobBook {
    lanes: Vec<Mutex<Vec<Job>>>,
    backlog: Backlog,
}

impl JobBook {
    pub fn new(producers: usize, backlog: u64) -> Self {
        JobBook {
            lanes: (0..producers).map(|_| Mutex::default()).collect(),
            backlog: Backlog {
                open: Mutex::new(0),
                room: Condvar::new(),
                limit: backlog,
            },
        }
    }

    fn lane(&self, producer: usize) -> MutexGuard<'_, Vec<Job>> {
        // A thread that panicked holding a lane left it consistent (each change is one store).
        self.lanes[producer]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for room in the backlog (until `until`), then issues the next job of `producer`:
    /// its sequence number, or None if no room came in time.
    pub fn issue(&self, producer: usize, until: Instant) -> Option<u64> {
        if !self.backlog.enter(until) {
            return None;
        }
        let mut lane = self.lane(producer);
        lane.push(Job::default());
        Some(lane.len() as u64 - 1)
    }

    /// Records the server's answer to the PUT of job `seq` of `producer`.
    pub fn answered(&self, producer: usize, seq: u64, put: Put) {
        if let Some(job) = self.lane(producer).get_mut(seq as usize) {
            job.put = put;
        }
        if put == Put::Refused {
            self.backlog.leave();
        }
    }

    /// Records a delivery of the job `tag` names.
    pub fn delivered(&self, tag: &Tag) -> Delivery {
        let mut lane = match self.lanes.get(tag.producer as usize) {
            Some(_) => self.lane(tag.producer as usize),
            None => return Delivery::NeverPut,
        };
        match lane.get_mut(tag.seq as usize) {
            Some(job) if job.put != Put::Refused => {
                job.delivered += 1;
                if job.delivered == 1 {
                    Delivery::First
                } else {
                    Delivery::Again
                }
            }
            _ => Delivery::NeverPut,
        }
    }

    /// Records that the job `tag` names (delivered before) was done.
    pub fn done(&self, tag: &Tag) {
        let first = self
            .lane(tag.producer as usize)
            .get_mut(tag.seq as usize)
            .map(|job| {
                job.done += 1;
                job.done == 1
            });
        if first == Some(true) {
            self.backlog.leave();
        }
    }

    /// Jobs issued and not yet done (or refused).
    pub fn open(&self) -> u64 {
        self.backlog.open()
    }

    pub fn summary(&self) -> JobSummary {
        let mut s = JobSummary::default();
        for producer in 0..self.lanes.len() {
            for job in self.lane(producer).iter() {
                s.issued += 1;
                match job.put {
                    Put::Acked => s.put += 1,
                    Put::Sent | Put::Unknown => s.put_unknown += 1,
                    Put::Refused => s.put_refused += 1,
                }
                s.done += u64::from(job.done > 0);
                s.redelivered += u64::from(job.delivered.saturating_sub(1));
                s.missing += u64::from(job.put == Put::Acked && job.done == 0);
            }
        }
        s
    }
}

/// Jobs issued and not yet done, bounded by `limit`.
struct Backlog {
    open: Mutex<u64>,
    room: Condvar,
    limit: u64,
}

impl Backlog {
    fn count(&self) -> MutexGuard<'_, u64> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> u64 {
        *self.count()
    }

    /// Takes a place, waiting while the backlog is full; false if `until` came first.
    fn enter(&self, until: Instant) -> bool {
        let mut open = self.count();
        while *open >= self.limit {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            open = match self.room.wait_timeout(open, left) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        *open += 1;
        true
    }

    fn leave(&self) {
        let mut open = self.count();
        *open = open.saturating_sub(1);
        self.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tag(producer: u32, seq: u64) -> Tag {
        Tag {
            producer,
            seq,
            put_ns: 0,
        }
    }

    #[test]
    fn every_job_is_accounted_for() {
        let book = JobBook::new(2, 10);
        let soon = Instant::now() + Duration::from_secs(5);
        for _ in 0..3 {
            book.issue(0, soon).expect("room");
        }
        book.issue(1, soon).expect("room");
        book.answered(0, 0, Put::Acked);
        book.answered(0, 1, Put::Acked);
        book.answered(0, 2, Put::Refused);
        book.answered(1, 0, Put::Unknown);
        assert_eq!(book.delivered(&tag(0, 0)), Delivery::First);
        assert_eq!(book.delivered(&tag(0, 0)), Delivery::Again);
        assert_eq!(book.delivered(&tag(0, 2)), Delivery::NeverPut, "refused");
        assert_eq!(
            book.delivered(&tag(0, 9)),
            Delivery::NeverPut,
            "never issued"
        );
        assert_eq!(
            book.delivered(&tag(7, 0)),
            Delivery::NeverPut,
            "no such producer"
        );
        book.done(&tag(0, 0));
        book.done(&tag(0, 0));
        assert_eq!(book.open(), 2, "job 0/1 and the unknown one are open");
        let s = book.summary();
        assert_eq!(
            (s.issued, s.put, s.put_unknown, s.put_refused),
            (4, 2, 1, 1)
        );
        assert_eq!((s.done, s.redelivered, s.missing), (1, 1, 1));
    }

    #[test]
    fn producers_wait_for_room_until_their_deadline() {
        let book = JobBook::new(1, 1);
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(book.issue(0, soon), Some(0));
        let started = Instant::now();
        assert_eq!(book.issue(0, started + Duration::from_millis(20)), None);
        assert!(started.elapsed() >= Duration::from_millis(20));
        book.answered(0, 0, Put::Acked);
        book.delivered(&tag(0, 0));
        book.done(&tag(0, 0));
        assert_eq!(book.issue(0, soon), Some(1));
    }
}
