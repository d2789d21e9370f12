//! The cold start's read-only check of a store file: the journal that recovery would apply,
//! and every list and counter as they will be once it is applied. It reads the mapping
//! through an overlay of the journal's before-images, so nothing is written before the whole
//! file is known to make sense: a damaged or foreign file is refused untouched.

use std::collections::HashMap;

use crate::layout::{hdr, j, job_state, q, w, waiter_state, Geometry, JOURNAL_CAP};
use crate::ops::{name_from_words, WaitKind};
use crate::region::Region;

/// What is wrong with a store file, found before recovery applied anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{structure}: {problem}")]
pub struct Finding {
    /// The structure at fault, e.g. "journal", "queue 3", "job 17".
    pub structure: String,
    pub problem: String,
}

fn finding(structure: impl Into<String>, problem: impl Into<String>) -> Finding {
    Finding {
        structure: structure.into(),
        problem: problem.into(),
    }
}

/// The file as it will be once the journal is rolled back.
struct View<'a> {
    region: &'a Region,
    g: Geometry,
    overlay: HashMap<u64, u64>,
}

impl View<'_> {
    fn get(&self, offset: u64) -> u64 {
        self.overlay
            .get(&offset)
            .copied()
            .unwrap_or_else(|| self.region.get(offset))
    }
}

/// Checks the journal and the state it leaves. Reads only.
pub(crate) fn check(region: &Region) -> Result<(), Finding> {
    let g = *region.geometry();
    let len = region.journal_len();
    if len > JOURNAL_CAP {
        return Err(finding(
            "journal",
            format!("{len} entries, at most {JOURNAL_CAP}"),
        ));
    }
    let mut overlay = HashMap::new();
    for i in (0..len).rev() {
        let (offset, old) = region.journal_entry(i);
        if !g.writable(offset) {
            return Err(finding(
                "journal",
                format!("entry {i} names offset {offset}, which no operation writes"),
            ));
        }
        overlay.insert(offset, old);
    }
    let view = View { region, g, overlay };
    view.check_counts()?;
    let jobs = view.check_jobs()?;
    view.check_waiters(&jobs)
}

impl View<'_> {
    fn check_counts(&self) -> Result<(), Finding> {
        let limits = [
            ("queue count", hdr::QUEUE_COUNT, self.g.max_queues),
            ("job high-water mark", hdr::JOBS_HIGH, self.g.max_jobs),
            (
                "waiter high-water mark",
                hdr::WAITERS_HIGH,
                self.g.max_waiters,
            ),
        ];
        for (what, offset, max) in limits {
            let value = self.get(offset);
            if value > u64::from(max) {
                return Err(finding("header", format!("{what} {value} above {max}")));
            }
        }
        let seq = self.get(hdr::NEXT_SEQ);
        if seq > self.g.max_seq() {
            return Err(finding(
                "header",
                format!(
                    "job sequence {seq} above {} (job ids would overflow)",
                    self.g.max_seq()
                ),
            ));
        }
        let mut names = HashMap::new();
        for qi in 0..self.get(hdr::QUEUE_COUNT) {
            let mut words = [0u64; 8];
            for (k, word) in words.iter_mut().enumerate() {
                *word = self.get(self.g.queue(qi, q::NAME + k as u64));
            }
            let Some(name) = name_from_words(self.get(self.g.queue(qi, q::NAME_LEN)), &words)
            else {
                return Err(finding(
                    format!("queue {qi}"),
                    "its name is not a valid name",
                ));
            };
            if let Some(first) = names.insert(name, qi) {
                return Err(finding(
                    format!("queue {qi}"),
                    format!("its name '{}' is queue {first}'s too", name.as_str()),
                ));
            }
        }
        Ok(())
    }

    /// Walks a list of `next`-linked records from `head`, at most `bound` long; returns them.
    fn walk(
        &self,
        what: &str,
        head: u64,
        bound: u64,
        next: impl Fn(u64) -> u64,
    ) -> Result<Vec<u64>, Finding> {
        let mut out = Vec::new();
        let mut link = head;
        while link != 0 {
            let index = link - 1;
            if index >= bound || out.len() as u64 >= bound {
                return Err(finding(
                    what,
                    format!("link {link} out of range or a cycle"),
                ));
            }
            out.push(index);
            link = next(index);
        }
        Ok(out)
    }

    /// Checks every job record and list; returns each job's state (jobs below the high mark).
    fn check_jobs(&self) -> Result<Vec<u64>, Finding> {
        let g = self.g;
        let high = self.get(hdr::JOBS_HIGH);
        let queues = self.get(hdr::QUEUE_COUNT);
        let job = |i, f| self.get(g.job(i, f));
        let states: Vec<u64> = (0..high).map(|i| job(i, j::STATE)).collect();
        let mut seen = vec![false; high as usize];
        for (i, &state) in states.iter().enumerate() {
            let i = i as u64;
            let name = || format!("job {i}");
            if state > job_state::RESERVED {
                return Err(finding(name(), format!("state {state}")));
            }
            if state == job_state::FREE {
                continue;
            }
            if job(i, j::QUEUE) >= queues || job(i, j::ID) % u64::from(g.max_jobs) != i {
                return Err(finding(name(), "queue or id out of range"));
            }
            if job(i, j::LEN) > u64::from(g.max_payload) {
                return Err(finding(name(), "payload longer than max_payload"));
            }
        }
        let free = self.walk("free job list", self.get(hdr::FREE_JOBS), high, |i| {
            job(i, j::NEXT)
        })?;
        for i in free {
            if states[i as usize] != job_state::FREE
                || std::mem::replace(&mut seen[i as usize], true)
            {
                return Err(finding(
                    "free job list",
                    format!("job {i} is not free or listed twice"),
                ));
            }
        }
        for qi in 0..queues {
            let name = format!("queue {qi}");
            let ready = self.walk(&name, self.get(g.queue(qi, q::READY_HEAD)), high, |i| {
                job(i, j::NEXT)
            })?;
            for &i in &ready {
                let listed = std::mem::replace(&mut seen[i as usize], true);
                if listed || states[i as usize] != job_state::READY || job(i, j::QUEUE) != qi {
                    return Err(finding(
                        &name,
                        format!("job {i} in its ready list is not ready there"),
                    ));
                }
            }
            let tail = ready.last().map_or(0, |i| i + 1);
            let depth = self.get(g.queue(qi, q::DEPTH));
            if self.get(g.queue(qi, q::READY_TAIL)) != tail || ready.len() as u64 != depth {
                return Err(finding(
                    &name,
                    "ready list tail or depth disagrees with the list",
                ));
            }
            let reserved = (0..high)
                .filter(|&i| states[i as usize] == job_state::RESERVED && job(i, j::QUEUE) == qi)
                .count() as u64;
            let put = self.get(g.queue(qi, q::PUT_TOTAL));
            let done = self.get(g.queue(qi, q::DONE_TOTAL));
            if self.get(g.queue(qi, q::RESERVED)) != reserved
                || put.checked_sub(done) != Some(depth + reserved)
            {
                return Err(finding(&name, "its counters do not add up"));
            }
        }
        let unlisted = (0..high as usize)
            .find(|&i| !seen[i] && matches!(states[i], job_state::FREE | job_state::READY));
        if let Some(i) = unlisted {
            return Err(finding(format!("job {i}"), "free or ready but in no list"));
        }
        Ok(states)
    }

    fn check_waiters(&self, jobs: &[u64]) -> Result<(), Finding> {
        let g = self.g;
        let high = self.get(hdr::WAITERS_HIGH);
        let queues = self.get(hdr::QUEUE_COUNT);
        let waiter = |i, f| self.get(g.waiter(i, f));
        let mut seen = vec![false; high as usize];
        let free = self.walk("free waiter list", self.get(hdr::FREE_WAITERS), high, |i| {
            waiter(i, w::NEXT)
        })?;
        for i in free {
            if waiter(i, w::STATE) != waiter_state::FREE
                || std::mem::replace(&mut seen[i as usize], true)
            {
                return Err(finding(
                    "free waiter list",
                    format!("waiter {i} not free or listed twice"),
                ));
            }
        }
        let mut pending_claims = 0u64;
        for qi in 0..queues {
            for kind in WaitKind::ALL {
                let name = format!("queue {qi} {kind:?} waiters");
                let head = g.queue(qi, kind.head());
                let list = self.walk(&name, self.get(head), high, |i| waiter(i, w::NEXT))?;
                let mut prev = 0;
                for &i in &list {
                    let ok = !std::mem::replace(&mut seen[i as usize], true)
                        && waiter(i, w::STATE) == waiter_state::WAITING
                        && waiter(i, w::KIND) == kind as u64
                        && waiter(i, w::QUEUE) == qi
                        && waiter(i, w::PREV) == prev;
                    if !ok {
                        return Err(finding(&name, format!("waiter {i} does not belong there")));
                    }
                    if kind == WaitKind::Put {
                        let id = waiter(i, w::JOB);
                        let job = id % u64::from(g.max_jobs);
                        let pending = jobs.get(job as usize) == Some(&job_state::PENDING)
                            && self.get(g.job(job, j::ID)) == id;
                        if !pending {
                            return Err(finding(&name, format!("waiter {i} names no pending job")));
                        }
                        pending_claims += 1;
                    }
                    prev = i + 1;
                }
                if self.get(head + 8) != prev || self.get(head + 16) != list.len() as u64 {
                    return Err(finding(&name, "tail or count disagrees with the list"));
                }
            }
        }
        let pending = jobs.iter().filter(|&&s| s == job_state::PENDING).count() as u64;
        if pending != pending_claims {
            return Err(finding("jobs", "a pending job belongs to no waiting PUT"));
        }
        for i in 0..high {
            let state = waiter(i, w::STATE);
            let listed = seen[i as usize];
            let ok = match state {
                waiter_state::FREE | waiter_state::WAITING => listed,
                waiter_state::SERVED => {
                    !listed && WaitKind::from_word(waiter(i, w::KIND)).is_some()
                }
                _ => false,
            };
            if !ok {
                return Err(finding(
                    format!("waiter {i}"),
                    format!("state {state} disagrees with the lists"),
                ));
            }
        }
        Ok(())
    }
}
