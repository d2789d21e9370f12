//! The operations, the lists they keep, and settling (serving the waiters that a change made
//! servable).
//!
//! Every operation takes the store lock, runs one journaled transaction ([`Tx`]) that checks
//! everything that can fail before its first write, commits, then *settles* its queue: while
//! a waiter can be served (a getter and a ready job, a putter and room, a joiner and nothing
//! unfinished) it is served, one transaction per waiter. Between two transactions the store
//! is consistent but maybe not settled; whoever next touches the queue settles it, and the
//! repair after a dead lock holder and the cold start settle every queue.
//!
//! Lists: each queue's READY jobs are a singly linked FIFO (head, tail, job NEXT); each
//! queue's waiters of one kind are a doubly linked FIFO (head, tail, count). Links are
//! `index + 1`, 0 = none.

use forkpool_shm::{my_pid, Acquired};

use crate::layout::{hdr, j, job_state, q, w, waiter_state, Geometry};
use crate::region::Tx;
use crate::{
    Attempt, Mode, OpError, Outcome, Party, QueueName, QueueStats, Store, Ticket, WakeSet,
};

/// The three kinds of wait; the value is the kind's slot in a queue record's waiter lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitKind {
    Get = 0,
    Put = 1,
    Join = 2,
}

impl WaitKind {
    pub(crate) const ALL: [WaitKind; 3] = [WaitKind::Get, WaitKind::Put, WaitKind::Join];

    pub(crate) fn from_word(word: u64) -> Option<WaitKind> {
        WaitKind::ALL.into_iter().find(|k| *k as u64 == word)
    }

    /// Field of a queue record: head of this kind's list (tail and count follow).
    pub(crate) fn head(self) -> u64 {
        q::WAITERS + 3 * self as u64
    }
}

/// The held store lock; unlocks on drop.
pub(crate) struct Locked<'a> {
    store: &'a Store,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.store.region.lock().unlock();
    }
}

/// What became of a cancelled wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The wait was withdrawn (or was already over): nothing happened on its behalf.
    Withdrawn,
    /// It had been served before the cancel: the caller now holds this outcome (a GET's job
    /// is reserved by the caller's connection: deliver it or [`Store::release`] it).
    Served(Outcome),
}

/// Packs a name into the queue record's words.
fn name_words(name: &QueueName) -> (u64, [u64; 8]) {
    let mut padded = [0u8; 64];
    let bytes = name.as_bytes();
    padded[..bytes.len()].copy_from_slice(bytes);
    let mut words = [0u64; 8];
    for (word, chunk) in words.iter_mut().zip(padded.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *word = u64::from_le_bytes(b);
    }
    (bytes.len() as u64, words)
}

/// The name stored in queue record words, if they hold a valid one (zero-padded as
/// `name_words` writes it: lookups compare every word).
pub(crate) fn name_from_words(len: u64, words: &[u64; 8]) -> Option<QueueName> {
    let len = usize::try_from(len).ok().filter(|&l| l <= 64)?;
    let mut bytes = [0u8; 64];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    if bytes[len..].iter().any(|&b| b != 0) {
        return None;
    }
    QueueName::new(&bytes[..len]).ok()
}

/// The next number of the sequence that numbers jobs and waits: 1 again after
/// [`Geometry::max_seq`] (about 2^40 operations at the largest `max_jobs`), so that a job id
/// (`seq * max_jobs + record`) never overflows.
fn next_seq(tx: &mut Tx<'_>, g: &Geometry) -> u64 {
    let seq = match tx.get(hdr::NEXT_SEQ) {
        current if current >= g.max_seq() => 1,
        current => current + 1,
    };
    tx.set(hdr::NEXT_SEQ, seq);
    seq
}

impl Store {
    /// Takes the store lock; if its holder died, rolls its operation back and settles every
    /// queue first (collecting the wake-ups into `wakes`).
    pub(crate) fn lock(&self, wakes: &mut WakeSet) -> Result<Locked<'_>, OpError> {
        self.usable()?;
        let acquired = self.region.lock().lock().map(Some);
        self.locked(acquired, wakes)
            .map(|locked| locked.expect("a waiting lock always acquires"))
    }

    /// [`Store::lock`] for an operation that brings new work (PUT, GET): refused with
    /// [`OpError::LogFull`] while the log has no room for it, so the room left serves the
    /// operations that finish work (DONE, claims, releases) until a checkpoint frees a segment.
    fn lock_with_room(&self, wakes: &mut WakeSet) -> Result<Locked<'_>, OpError> {
        let locked = self.lock(wakes)?;
        self.region.check_log_room()?;
        Ok(locked)
    }

    /// [`Store::lock`] without waiting: `None` if someone holds the lock.
    fn try_lock(&self, wakes: &mut WakeSet) -> Result<Option<Locked<'_>>, OpError> {
        self.usable()?;
        let acquired = self.region.lock().try_lock();
        self.locked(acquired, wakes)
    }

    fn locked(
        &self,
        acquired: Result<Option<Acquired>, forkpool_shm::NotRecoverable>,
        wakes: &mut WakeSet,
    ) -> Result<Option<Locked<'_>>, OpError> {
        let lock = self.region.lock();
        let locked = match acquired {
            Ok(None) => return Ok(None),
            Ok(Some(Acquired::Clean)) => Locked { store: self },
            Ok(Some(Acquired::OwnerDied)) => {
                // Under a log, an operation whose record was appended is kept (rolled
                // forward: its writes are all in place), never undone.
                let undone = if self.region.settle_append() {
                    self.region.forget_journal();
                    0
                } else {
                    self.region.roll_back()
                };
                self.region.appended();
                self.region
                    .word(hdr::RECOVERIES)
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                log::warn!(
                    "queue store {}: a process died holding the lock; rolled back {undone} writes",
                    self.path.display()
                );
                self.settle_all(wakes);
                lock.consistent();
                Locked { store: self }
            }
            Err(_) => return Err(OpError::Unrecoverable),
        };
        if self.region.log_failed() {
            return Err(OpError::LogFailed);
        }
        Ok(Some(locked))
    }

    /// PUT: appends `payload` to the queue (created on first use); when the queue holds
    /// `maxsize` ready jobs, waits (`Mode::Wait`: parks, the job kept aside) or fails with
    /// [`OpError::Full`]. Returns the job id.
    pub fn put(
        &self,
        name: &QueueName,
        payload: &[u8],
        party: Party,
        mode: Mode,
    ) -> Result<(Attempt<u64>, WakeSet), OpError> {
        let max = self.region.geometry().max_payload;
        if payload.len() > max as usize {
            return Err(OpError::PayloadTooLong {
                len: payload.len(),
                max,
            });
        }
        let mut wakes = WakeSet::default();
        let _locked = self.lock_with_room(&mut wakes)?;
        let result = self.put_locked(name, payload, party, mode, &mut wakes);
        self.checked(result.map(|attempt| (attempt, wakes)))
    }

    fn put_locked(
        &self,
        name: &QueueName,
        payload: &[u8],
        party: Party,
        mode: Mode,
        wakes: &mut WakeSet,
    ) -> Result<Attempt<u64>, OpError> {
        let mut tx = Tx::begin(&self.region);
        let qi = self.find_or_create(&mut tx, name)?;
        tx.commit();
        self.settle(qi, wakes);
        let g = *self.region.geometry();
        let maxsize = self.region.get(g.queue(qi, q::MAXSIZE));
        let full = maxsize != 0 && self.region.get(g.queue(qi, q::DEPTH)) >= maxsize;
        let queued_putters = self.region.get(g.queue(qi, WaitKind::Put.head() + 2)) > 0;
        let mut tx = Tx::begin(&self.region);
        if !full && !queued_putters {
            let (job, id) = self.alloc_job(&mut tx, qi, payload)?;
            self.push_ready(&mut tx, qi, job, false);
            tx.add(g.queue(qi, q::PUT_TOTAL), 1);
            tx.commit();
            self.settle(qi, wakes);
            return Ok(Attempt::Now(id));
        }
        if mode == Mode::NoWait {
            return Err(OpError::Full);
        }
        let (job, id) = self.alloc_job(&mut tx, qi, payload)?;
        tx.set(g.job(job, j::STATE), job_state::PENDING);
        let ticket = self.park(&mut tx, qi, WaitKind::Put, party, id)?;
        tx.commit();
        Ok(Attempt::Parked(ticket))
    }

    /// GET: hands the queue's first ready job to `party` (its payload appended to `payload`);
    /// when there is none, waits (`Mode::Wait`) or fails with [`OpError::Empty`].
    pub fn get(
        &self,
        name: &QueueName,
        party: Party,
        mode: Mode,
        payload: &mut Vec<u8>,
    ) -> Result<(Attempt<u64>, WakeSet), OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock_with_room(&mut wakes)?;
        let result = self.get_locked(name, party, mode, payload, &mut wakes);
        self.checked(result.map(|attempt| (attempt, wakes)))
    }

    fn get_locked(
        &self,
        name: &QueueName,
        party: Party,
        mode: Mode,
        payload: &mut Vec<u8>,
        wakes: &mut WakeSet,
    ) -> Result<Attempt<u64>, OpError> {
        let mut tx = Tx::begin(&self.region);
        let qi = self.find_or_create(&mut tx, name)?;
        tx.commit();
        self.settle(qi, wakes);
        let g = *self.region.geometry();
        let mut tx = Tx::begin(&self.region);
        if self.region.get(g.queue(qi, q::DEPTH)) > 0 {
            let job = self.pop_ready(&mut tx, qi);
            self.reserve(&mut tx, qi, job, my_pid(), party.conn);
            tx.commit();
            self.read_payload(job, payload);
            let id = self.region.get(g.job(job, j::ID));
            self.settle(qi, wakes);
            return Ok(Attempt::Now(id));
        }
        if mode == Mode::NoWait {
            return Err(OpError::Empty);
        }
        let ticket = self.park(&mut tx, qi, WaitKind::Get, party, 0)?;
        tx.commit();
        Ok(Attempt::Parked(ticket))
    }

    /// DONE (task_done) of job `id`, which `party`'s connection holds.
    pub fn done(&self, id: u64, party: Party) -> Result<WakeSet, OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let result = self.held_job(id, party).map(|(job, qi)| {
            let g = *self.region.geometry();
            let mut tx = Tx::begin(&self.region);
            self.free_job(&mut tx, job);
            tx.add(g.queue(qi, q::RESERVED), u64::MAX);
            tx.add(g.queue(qi, q::DONE_TOTAL), 1);
            tx.commit();
            self.settle(qi, &mut wakes);
            wakes
        });
        self.checked(result)
    }

    /// Returns job `id`, which `party`'s connection holds, to the head of its queue (the
    /// connection closes without DONE).
    pub fn release(&self, id: u64, party: Party) -> Result<WakeSet, OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let result = self.held_job(id, party).map(|(job, qi)| {
            self.requeue(job, qi);
            self.settle(qi, &mut wakes);
            wakes
        });
        self.checked(result)
    }

    /// Moves job `id`, held by connection `from` = (pid, connection) of another process, to
    /// `party`'s connection of this one (a connection handed over to this worker).
    pub fn take_over(&self, id: u64, from: (i32, u64), party: Party) -> Result<(), OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let g = *self.region.geometry();
        let job = id % u64::from(g.max_jobs);
        let field = |f| self.region.get(g.job(job, f));
        let held = job < self.region.get(hdr::JOBS_HIGH)
            && field(j::ID) == id
            && field(j::STATE) == job_state::RESERVED
            && field(j::OWNER_PID) == from.0 as u64
            && field(j::OWNER_CONN) == from.1;
        if !held {
            return self.checked(Err(OpError::NotReserved(id)));
        }
        let mut tx = Tx::begin(&self.region);
        tx.set(g.job(job, j::OWNER_PID), my_pid() as u64);
        tx.set(g.job(job, j::OWNER_CONN), party.conn);
        tx.commit();
        self.checked(Ok(()))
    }

    /// JOIN: done at once if every job put to the queue so far is done (an unknown queue has
    /// none), else parks until then.
    pub fn join(&self, name: &QueueName, party: Party) -> Result<Attempt<()>, OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let result = (|| {
            let Some(qi) = self.find(name) else {
                return Ok(Attempt::Now(()));
            };
            self.settle(qi, &mut wakes);
            let g = *self.region.geometry();
            let unfinished =
                self.region.get(g.queue(qi, q::DEPTH)) + self.region.get(g.queue(qi, q::RESERVED));
            if unfinished == 0 {
                return Ok(Attempt::Now(()));
            }
            let mut tx = Tx::begin(&self.region);
            let ticket = self.park(&mut tx, qi, WaitKind::Join, party, 0)?;
            tx.commit();
            Ok(Attempt::Parked(ticket))
        })();
        self.checked(result)
    }

    /// Sets a queue's maxsize (creating the queue), serving the putters it makes room for.
    pub fn configure(&self, name: &QueueName, maxsize: u64) -> Result<WakeSet, OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let result = (|| {
            let mut tx = Tx::begin(&self.region);
            let qi = self.find_or_create(&mut tx, name)?;
            tx.set(self.region.geometry().queue(qi, q::MAXSIZE), maxsize);
            tx.commit();
            self.settle(qi, &mut wakes);
            Ok(wakes)
        })();
        self.checked(result)
    }

    /// The outcome of a served wait (its record freed), or None while it still waits (or if
    /// the ticket is stale: already claimed or cancelled). A GET's payload is appended to
    /// `payload`.
    pub fn claim(&self, ticket: Ticket, payload: &mut Vec<u8>) -> Result<Option<Outcome>, OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let result = match self.ticket_state(ticket) {
            Some(waiter_state::SERVED) => Ok(Some(self.take_outcome(ticket.index, payload))),
            _ => Ok(None),
        };
        self.checked(result)
    }

    /// Whether the ticket's wait has been served (a lock-free read: a worker woken up asks
    /// this of each of its waits before it takes the lock to [`Store::claim`]).
    pub fn served(&self, ticket: Ticket) -> bool {
        self.ticket_state(ticket) == Some(waiter_state::SERVED)
    }

    /// Ends a wait (timeout, closing connection): withdrawn if still waiting (a PUT's job is
    /// dropped), else the outcome it was served.
    pub fn cancel(
        &self,
        ticket: Ticket,
        payload: &mut Vec<u8>,
    ) -> Result<(Cancelled, WakeSet), OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let result = match self.ticket_state(ticket) {
            Some(waiter_state::SERVED) => {
                Cancelled::Served(self.take_outcome(ticket.index, payload))
            }
            Some(waiter_state::WAITING) => {
                let qi = self.withdraw(ticket.index);
                self.settle(qi, &mut wakes);
                Cancelled::Withdrawn
            }
            _ => Cancelled::Withdrawn,
        };
        self.checked(Ok((result, wakes)))
    }

    /// A dead process's share: its waits are dropped (a served GET's job and every job it
    /// held go back to the head of their queues, oldest first). The master calls it when it
    /// reaps a worker, so it never waits for the lock: `None` if the lock is held (try
    /// again later; a stopped holder must not stop the master's loop).
    pub fn release_process(&self, pid: i32) -> Result<Option<WakeSet>, OpError> {
        let mut wakes = WakeSet::default();
        let Some(_locked) = self.try_lock(&mut wakes)? else {
            return Ok(None);
        };
        self.release_owners(|owner| owner == pid as u64, &mut wakes);
        self.checked(Ok(Some(wakes)))
    }

    /// One queue's figures.
    pub fn stats(&self, name: &QueueName) -> Result<QueueStats, OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let result = self
            .find(name)
            .map(|qi| self.queue_stats(qi))
            .ok_or(OpError::NoSuchQueue);
        self.checked(result)
    }

    /// Every queue and its figures, in creation order.
    pub fn queues(&self) -> Result<Vec<(QueueName, QueueStats)>, OpError> {
        let mut wakes = WakeSet::default();
        let _locked = self.lock(&mut wakes)?;
        let count = self.region.get(hdr::QUEUE_COUNT);
        let list = (0..count)
            .filter_map(|qi| Some((self.queue_name(qi)?, self.queue_stats(qi))))
            .collect();
        self.checked(Ok(list))
    }

    /// Every queue's figures summed, read WITHOUT the lock (for monitoring: the master must
    /// never wait for it): not one consistent instant.
    pub fn overview(&self) -> crate::Overview {
        let failed = crate::Overview {
            failed: true,
            ..crate::Overview::default()
        };
        if self.usable().is_err() {
            return failed;
        }
        let count = self
            .region
            .get(hdr::QUEUE_COUNT)
            .min(u64::from(self.region.geometry().max_queues));
        let mut overview = crate::Overview {
            queues: count,
            recoveries: self.region.get(hdr::RECOVERIES),
            ..crate::Overview::default()
        };
        for qi in 0..count {
            let s = self.queue_stats(qi);
            overview.depth += s.depth;
            overview.in_flight += s.in_flight;
            overview.put += s.put;
            overview.done += s.done;
            overview.waiting_getters += s.waiting_getters;
            overview.waiting_putters += s.waiting_putters;
            overview.waiting_joiners += s.waiting_joiners;
        }
        self.checked(Ok(overview)).unwrap_or(failed)
    }

    // ----- under the lock -----

    pub(crate) fn queue_stats(&self, qi: u64) -> QueueStats {
        let g = self.region.geometry();
        let f = |field| self.region.get(g.queue(qi, field));
        QueueStats {
            maxsize: f(q::MAXSIZE),
            depth: f(q::DEPTH),
            in_flight: f(q::RESERVED),
            put: f(q::PUT_TOTAL),
            done: f(q::DONE_TOTAL),
            waiting_getters: f(WaitKind::Get.head() + 2),
            waiting_putters: f(WaitKind::Put.head() + 2),
            waiting_joiners: f(WaitKind::Join.head() + 2),
        }
    }

    pub(crate) fn queue_name(&self, qi: u64) -> Option<QueueName> {
        let g = self.region.geometry();
        let mut words = [0u64; 8];
        for (k, word) in words.iter_mut().enumerate() {
            *word = self.region.get(g.queue(qi, q::NAME + k as u64));
        }
        name_from_words(self.region.get(g.queue(qi, q::NAME_LEN)), &words)
    }

    fn find(&self, name: &QueueName) -> Option<u64> {
        let g = self.region.geometry();
        let (len, words) = name_words(name);
        (0..self.region.get(hdr::QUEUE_COUNT)).find(|&qi| {
            self.region.get(g.queue(qi, q::NAME_LEN)) == len
                && (0..8).all(|k| self.region.get(g.queue(qi, q::NAME + k)) == words[k as usize])
        })
    }

    fn find_or_create(&self, tx: &mut Tx<'_>, name: &QueueName) -> Result<u64, OpError> {
        if let Some(qi) = self.find(name) {
            return Ok(qi);
        }
        let g = *self.region.geometry();
        let qi = tx.get(hdr::QUEUE_COUNT);
        if qi >= u64::from(g.max_queues) {
            return Err(OpError::TooManyQueues(g.max_queues));
        }
        let (len, words) = name_words(name);
        tx.set(g.queue(qi, q::NAME_LEN), len);
        for (k, word) in words.into_iter().enumerate() {
            tx.set(g.queue(qi, q::NAME + k as u64), word);
        }
        tx.set(g.queue(qi, q::MAXSIZE), self.default_maxsize);
        tx.set(hdr::QUEUE_COUNT, qi + 1);
        Ok(qi)
    }

    /// The job record and queue of job `id` if `party`'s connection (of this process) holds it.
    fn held_job(&self, id: u64, party: Party) -> Result<(u64, u64), OpError> {
        let g = self.region.geometry();
        let job = id % u64::from(g.max_jobs);
        let field = |f| self.region.get(g.job(job, f));
        let held = job < self.region.get(hdr::JOBS_HIGH)
            && field(j::ID) == id
            && field(j::STATE) == job_state::RESERVED
            && field(j::OWNER_PID) == my_pid() as u64
            && field(j::OWNER_CONN) == party.conn;
        if held {
            Ok((job, field(j::QUEUE)))
        } else {
            Err(OpError::NotReserved(id))
        }
    }

    /// Takes a free job record for queue `qi` and writes `payload` into it; the caller sets
    /// its state and links it. Returns (record, id).
    fn alloc_job(&self, tx: &mut Tx<'_>, qi: u64, payload: &[u8]) -> Result<(u64, u64), OpError> {
        let g = *self.region.geometry();
        let free = tx.get(hdr::FREE_JOBS);
        let job = if free != 0 {
            let job = free - 1;
            tx.set(hdr::FREE_JOBS, tx.get(g.job(job, j::NEXT)));
            job
        } else {
            let high = tx.get(hdr::JOBS_HIGH);
            if high >= u64::from(g.max_jobs) {
                return Err(OpError::StoreFull(g.max_jobs));
            }
            tx.set(hdr::JOBS_HIGH, high + 1);
            high
        };
        let seq = next_seq(tx, &g);
        let id = seq * u64::from(g.max_jobs) + job;
        // The record is unreachable until a journaled write links it: unjournaled is fine.
        let words = payload.chunks(8).map(|chunk| {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(b)
        });
        tx.fill(g.job(job, j::PAYLOAD), words);
        tx.set(g.job(job, j::LEN), payload.len() as u64);
        tx.set(g.job(job, j::QUEUE), qi);
        tx.set(g.job(job, j::ID), id);
        tx.set(g.job(job, j::NEXT), 0);
        tx.set(g.job(job, j::OWNER_PID), 0);
        tx.set(g.job(job, j::OWNER_CONN), 0);
        Ok((job, id))
    }

    fn free_job(&self, tx: &mut Tx<'_>, job: u64) {
        let g = self.region.geometry();
        tx.set(g.job(job, j::STATE), job_state::FREE);
        tx.set(g.job(job, j::NEXT), tx.get(hdr::FREE_JOBS));
        tx.set(hdr::FREE_JOBS, job + 1);
    }

    pub(crate) fn read_payload(&self, job: u64, out: &mut Vec<u8>) {
        let g = self.region.geometry();
        let len = self
            .region
            .get(g.job(job, j::LEN))
            .min(u64::from(g.max_payload)) as usize;
        for k in 0..len.div_ceil(8) {
            let word = self
                .region
                .get(g.job(job, j::PAYLOAD + k as u64))
                .to_le_bytes();
            out.extend_from_slice(&word[..(len - k * 8).min(8)]);
        }
    }

    /// Links READY job `job` at the tail (or head) of queue `qi`'s list.
    fn push_ready(&self, tx: &mut Tx<'_>, qi: u64, job: u64, at_head: bool) {
        let g = *self.region.geometry();
        tx.set(g.job(job, j::STATE), job_state::READY);
        tx.set(g.job(job, j::OWNER_PID), 0);
        tx.set(g.job(job, j::OWNER_CONN), 0);
        let head = tx.get(g.queue(qi, q::READY_HEAD));
        let tail = tx.get(g.queue(qi, q::READY_TAIL));
        if at_head {
            tx.set(g.job(job, j::NEXT), head);
            tx.set(g.queue(qi, q::READY_HEAD), job + 1);
            if tail == 0 {
                tx.set(g.queue(qi, q::READY_TAIL), job + 1);
            }
        } else {
            tx.set(g.job(job, j::NEXT), 0);
            if tail == 0 {
                tx.set(g.queue(qi, q::READY_HEAD), job + 1);
            } else {
                tx.set(g.job(tail - 1, j::NEXT), job + 1);
            }
            tx.set(g.queue(qi, q::READY_TAIL), job + 1);
        }
        tx.add(g.queue(qi, q::DEPTH), 1);
    }

    /// Unlinks the first READY job of queue `qi` (the caller checked DEPTH > 0).
    fn pop_ready(&self, tx: &mut Tx<'_>, qi: u64) -> u64 {
        let g = *self.region.geometry();
        let job = tx.get(g.queue(qi, q::READY_HEAD)) - 1;
        let next = tx.get(g.job(job, j::NEXT));
        tx.set(g.queue(qi, q::READY_HEAD), next);
        if next == 0 {
            tx.set(g.queue(qi, q::READY_TAIL), 0);
        }
        tx.set(g.job(job, j::NEXT), 0);
        tx.add(g.queue(qi, q::DEPTH), u64::MAX);
        job
    }

    /// Marks `job` (unlinked) RESERVED by (pid, conn).
    fn reserve(&self, tx: &mut Tx<'_>, qi: u64, job: u64, pid: i32, conn: u64) {
        let g = self.region.geometry();
        tx.set(g.job(job, j::STATE), job_state::RESERVED);
        tx.set(g.job(job, j::OWNER_PID), pid as u64);
        tx.set(g.job(job, j::OWNER_CONN), conn);
        tx.add(g.queue(qi, q::RESERVED), 1);
    }

    /// Returns RESERVED `job` of queue `qi` to the head of the queue (one transaction).
    fn requeue(&self, job: u64, qi: u64) {
        let mut tx = Tx::begin(&self.region);
        tx.add(self.region.geometry().queue(qi, q::RESERVED), u64::MAX);
        self.push_ready(&mut tx, qi, job, true);
        tx.commit();
    }

    /// Appends a waiter of `kind` for `party` to queue `qi`; `job` is a PUT's pending job id.
    fn park(
        &self,
        tx: &mut Tx<'_>,
        qi: u64,
        kind: WaitKind,
        party: Party,
        job: u64,
    ) -> Result<Ticket, OpError> {
        let g = *self.region.geometry();
        let free = tx.get(hdr::FREE_WAITERS);
        let index = if free != 0 {
            tx.set(hdr::FREE_WAITERS, tx.get(g.waiter(free - 1, w::NEXT)));
            free - 1
        } else {
            let high = tx.get(hdr::WAITERS_HIGH);
            if high >= u64::from(g.max_waiters) {
                return Err(OpError::TooManyWaiters(g.max_waiters));
            }
            tx.set(hdr::WAITERS_HIGH, high + 1);
            high
        };
        let serial = next_seq(tx, &g);
        let field = |f| g.waiter(index, f);
        tx.set(field(w::STATE), waiter_state::WAITING);
        tx.set(field(w::KIND), kind as u64);
        tx.set(field(w::QUEUE), qi);
        tx.set(field(w::OWNER_PID), my_pid() as u64);
        tx.set(field(w::OWNER_CONN), party.conn);
        tx.set(field(w::SERIAL), serial);
        tx.set(field(w::JOB), job);
        let head = g.queue(qi, kind.head());
        let tail = tx.get(head + 8);
        tx.set(field(w::PREV), tail);
        tx.set(field(w::NEXT), 0);
        if tail == 0 {
            tx.set(head, index + 1);
        } else {
            tx.set(g.waiter(tail - 1, w::NEXT), index + 1);
        }
        tx.set(head + 8, index + 1);
        tx.add(head + 16, 1);
        Ok(Ticket { index, serial })
    }

    /// Unlinks waiter `index` from its queue's list.
    fn unlink(&self, tx: &mut Tx<'_>, index: u64) {
        let g = *self.region.geometry();
        let qi = tx.get(g.waiter(index, w::QUEUE));
        let kind = WaitKind::from_word(tx.get(g.waiter(index, w::KIND)))
            .expect("a linked waiter has a valid kind (validated at the cold start)");
        let head = g.queue(qi, kind.head());
        let prev = tx.get(g.waiter(index, w::PREV));
        let next = tx.get(g.waiter(index, w::NEXT));
        if prev == 0 {
            tx.set(head, next);
        } else {
            tx.set(g.waiter(prev - 1, w::NEXT), next);
        }
        if next == 0 {
            tx.set(head + 8, prev);
        } else {
            tx.set(g.waiter(next - 1, w::PREV), prev);
        }
        tx.set(g.waiter(index, w::PREV), 0);
        tx.set(g.waiter(index, w::NEXT), 0);
        tx.add(head + 16, u64::MAX);
    }

    fn free_waiter(&self, tx: &mut Tx<'_>, index: u64) {
        let g = self.region.geometry();
        tx.set(g.waiter(index, w::STATE), waiter_state::FREE);
        tx.set(g.waiter(index, w::NEXT), tx.get(hdr::FREE_WAITERS));
        tx.set(hdr::FREE_WAITERS, index + 1);
    }

    /// The state of the ticket's waiter record, if the record is still the ticket's and is
    /// owned by this process.
    fn ticket_state(&self, ticket: Ticket) -> Option<u64> {
        let g = self.region.geometry();
        if ticket.index >= self.region.get(hdr::WAITERS_HIGH) {
            return None;
        }
        let field = |f| self.region.get(g.waiter(ticket.index, f));
        (field(w::SERIAL) == ticket.serial && field(w::OWNER_PID) == my_pid() as u64)
            .then(|| field(w::STATE))
    }

    /// Frees SERVED waiter `index` and returns what it was served.
    fn take_outcome(&self, index: u64, payload: &mut Vec<u8>) -> Outcome {
        let g = *self.region.geometry();
        let kind = WaitKind::from_word(self.region.get(g.waiter(index, w::KIND)));
        let id = self.region.get(g.waiter(index, w::JOB));
        let mut tx = Tx::begin(&self.region);
        self.free_waiter(&mut tx, index);
        tx.commit();
        match kind {
            Some(WaitKind::Get) => {
                self.read_payload(id % u64::from(g.max_jobs), payload);
                Outcome::Job(id)
            }
            Some(WaitKind::Put) => Outcome::Put(id),
            _ => Outcome::Joined,
        }
    }

    /// Unlinks and frees WAITING waiter `index` (a PUT's pending job freed too); returns its
    /// queue.
    fn withdraw(&self, index: u64) -> u64 {
        let g = *self.region.geometry();
        let qi = self.region.get(g.waiter(index, w::QUEUE));
        let mut tx = Tx::begin(&self.region);
        if tx.get(g.waiter(index, w::KIND)) == WaitKind::Put as u64 {
            let job = tx.get(g.waiter(index, w::JOB)) % u64::from(g.max_jobs);
            self.free_job(&mut tx, job);
        }
        self.unlink(&mut tx, index);
        self.free_waiter(&mut tx, index);
        tx.commit();
        qi
    }

    /// Drops the waits and returns the held jobs of every owner pid `dead` selects (one
    /// transaction per waiter and per job), then settles the queues touched.
    pub(crate) fn release_owners(&self, dead: impl Fn(u64) -> bool, wakes: &mut WakeSet) {
        let g = *self.region.geometry();
        for index in 0..self.region.get(hdr::WAITERS_HIGH) {
            let field = |f| self.region.get(g.waiter(index, f));
            if !dead(field(w::OWNER_PID)) {
                continue;
            }
            match field(w::STATE) {
                waiter_state::WAITING => {
                    self.withdraw(index);
                }
                waiter_state::SERVED => {
                    let mut tx = Tx::begin(&self.region);
                    self.free_waiter(&mut tx, index);
                    tx.commit();
                }
                _ => {}
            }
        }
        let mut held: Vec<(u64, u64)> = (0..self.region.get(hdr::JOBS_HIGH))
            .filter(|&job| {
                self.region.get(g.job(job, j::STATE)) == job_state::RESERVED
                    && dead(self.region.get(g.job(job, j::OWNER_PID)))
            })
            .map(|job| (self.region.get(g.job(job, j::ID)), job))
            .collect();
        // Newest first to the head: the oldest ends up first, as it was fetched first.
        held.sort_unstable_by(|a, b| b.cmp(a));
        for (_, job) in held {
            self.requeue(job, self.region.get(g.job(job, j::QUEUE)));
        }
        self.settle_all(wakes);
    }

    pub(crate) fn settle_all(&self, wakes: &mut WakeSet) {
        for qi in 0..self.region.get(hdr::QUEUE_COUNT) {
            self.settle(qi, wakes);
        }
    }

    /// Serves queue `qi`'s waiters while one can be served, one transaction each (none once
    /// the log has failed: every transaction would be rolled back).
    fn settle(&self, qi: u64, wakes: &mut WakeSet) {
        let g = *self.region.geometry();
        let f = |field| self.region.get(g.queue(qi, field));
        while !self.region.log_failed() {
            let depth = f(q::DEPTH);
            let maxsize = f(q::MAXSIZE);
            let first = |kind: WaitKind| f(kind.head()).checked_sub(1);
            let mut tx = Tx::begin(&self.region);
            let served = if let (true, Some(waiter)) = (depth > 0, first(WaitKind::Get)) {
                let job = self.pop_ready(&mut tx, qi);
                let pid = tx.get(g.waiter(waiter, w::OWNER_PID)) as i32;
                let conn = tx.get(g.waiter(waiter, w::OWNER_CONN));
                self.reserve(&mut tx, qi, job, pid, conn);
                tx.set(g.waiter(waiter, w::JOB), tx.get(g.job(job, j::ID)));
                waiter
            } else if let (true, Some(waiter)) =
                (maxsize == 0 || depth < maxsize, first(WaitKind::Put))
            {
                let job = tx.get(g.waiter(waiter, w::JOB)) % u64::from(g.max_jobs);
                self.push_ready(&mut tx, qi, job, false);
                tx.add(g.queue(qi, q::PUT_TOTAL), 1);
                waiter
            } else if let (0, Some(waiter)) = (depth + f(q::RESERVED), first(WaitKind::Join)) {
                waiter
            } else {
                return;
            };
            self.unlink(&mut tx, served);
            tx.set(g.waiter(served, w::STATE), waiter_state::SERVED);
            tx.commit();
            wakes.add(self.region.get(g.waiter(served, w::OWNER_PID)));
        }
    }
}
