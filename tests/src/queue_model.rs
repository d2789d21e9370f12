//! A checker for recorded histories of the queue service: is what the clients saw explained by
//! a linearizable FIFO with redelivery? It judges the history only, never the server.
//!
//! # The history
//! [`Event`]s on one monotonic clock shared by every client thread: each request with the
//! instant it was sent and its reply with the instant it was read (or none: the connection was
//! lost first), the losses of connections (dropped by the client, or closed by the server
//! when its worker was SIGKILLed), the kills, and the counters (`STATS`) at the end. Payloads
//! are unique (each is put once): a job is its payload, and its id must agree everywhere.
//!
//! # The model
//! Per queue, a deque of ready jobs: `PUT` appends at the tail, `GET` takes the head (and gives
//! it to its connection), `DONE` by the holding connection ends the job for good, and a lost
//! connection's jobs go back to the HEAD of their queue at some instant after the loss (no
//! upper bound: a killed worker's jobs wait for the master). A kill may close a connection
//! before its client notices: a lost connection counts as lost at the first kill sent after
//! the last request it saw answered was sent, if that is earlier. A request without a reply may or
//! may not have taken effect: a GET without a reply is a *hidden holder* that may have taken one
//! job (at most one), which then went back to the head after its connection's loss.
//!
//! # The rules (Henzinger, Sezgin, Vafeiadis, CONCUR 2013: a history of a queue with unique
//! values is linearizable iff it has none of VFresh, VRepet, VOrd, VWit; adapted to redelivery)
//! Instants: a call's effect lies between its sending (`inv`) and its reply (`resp`).
//! - **VFresh**: a JOB whose payload no PUT put (no PUT, a PUT answered ERR, or a PUT sent only
//!   after the JOB was read), or whose id is not the one its PUT answered (or another JOB of it
//!   carried).
//! - **VRepet**: the deliveries (visible JOB replies) of one job must form a chain in which
//!   each holder but the last lost its connection before the next delivery was read
//!   (`loss < next.resp`, and `inv < next.resp`); a holder whose `DONE` was acknowledged is
//!   the last. A repetition is thus allowed only after a loss of the previous holder.
//! - **VDone**: an acknowledged `DONE` comes from a connection that was delivered the job, and
//!   a job is acknowledged done at most once.
//! - **VOrd** (FIFO): take the first delivery `g2` of job `v2`. Every job `v1` whose PUT was
//!   answered before `v2`'s PUT was sent was ahead of `v2` at the tail; a requeue only moves a
//!   job that was taken before, and `v2`'s first taking needs the head, so each such `v1` must
//!   have been taken before `g2`'s reply. If its first delivery was sent after that reply,
//!   its first taking was hidden.
//! - **VWit**: a GET answered `ERR empty` or `ERR timeout` saw its queue empty at some instant
//!   of its call; every job put (PUT answered) before the GET was sent must have been taken
//!   before the GET's reply, and if its first delivery was sent after that reply, its first
//!   taking was hidden.
//! - Hidden takings, for VOrd and VWit together: each job whose first taking was hidden needs
//!   its own GET without reply (a GET takes one job), sent before the earliest reply that
//!   showed the taking, and lost before the job's first delivery was read (the job went back
//!   in between). They are matched over the whole history (Kuhn's augmenting paths); a job
//!   left without one breaks the rule of the GET that showed it.
//! - **VCount**: the final counters of a queue add up (`put = depth + in_flight + done`), `put`
//!   lies between the PUTs acknowledged (plus the unanswered ones whose job was delivered) and
//!   that plus the other unanswered PUTs, `done` between the acknowledged DONEs and those plus
//!   the jobs with an unanswered DONE; and once the queue is drained (`depth = in_flight = 0`)
//!   every acknowledged PUT's job was done (acknowledged, or its last holder's DONE unanswered).
//!
//! Requeues are not checked against each other (their instants have no upper bound), nor is
//! the order among jobs that were already requeued: the rules are sound (a correct server's
//! history always passes) and catch the classes of bugs above whenever the chaos leaves too
//! few hidden holders to explain them.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use forkpool_common::queue::{parse_request, Request};

/// An instant of a history: nanoseconds since it began, on one monotonic clock.
pub type Nanos = u64;

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossCause {
    /// The client closed it (possibly with a request unanswered).
    DroppedByClient,
    /// The server closed or reset it (its worker was killed): a loss too.
    ClosedByServer,
}

/// One event of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request line sent on connection `conn` at `inv`; its reply line and the instant it
    /// was read, or `None` when none came (the connection was lost first).
    Call {
        conn: u64,
        inv: Nanos,
        request: String,
        reply: Option<(Nanos, String)>,
    },
    /// Connection `conn` was lost: the jobs it held go back no earlier than `at`.
    Loss {
        conn: u64,
        at: Nanos,
        cause: LossCause,
    },
    /// A worker was SIGKILLed at `at` (its connections' losses are events of their own).
    Kill { pid: i32, at: Nanos },
    /// A queue's `STATS` counters read after every call of the history ended.
    Final(Counters),
}

/// A queue's counters, as `STATS` gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub queue: String,
    pub put: u64,
    pub done: u64,
    pub depth: u64,
    pub in_flight: u64,
}

/// Which rule a history breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// The history cannot be read (a reply of the wrong form, a payload put twice).
    Malformed,
    VFresh,
    VRepet,
    VDone,
    VOrd,
    VWit,
    VCount,
}

/// One violation: the rule, what breaks it, and the events (indices into the history) that
/// together already break it: the offending sub-history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    pub detail: String,
    pub witnesses: Vec<usize>,
}

impl Violation {
    /// The violation with its sub-history, one event a line in the order of the history.
    pub fn render(&self, history: &[Event]) -> String {
        let mut out = format!("{:?}: {}\n", self.rule, self.detail);
        let mut witnesses = self.witnesses.clone();
        witnesses.sort_unstable();
        witnesses.dedup();
        for index in witnesses {
            let _ = writeln!(out, "  #{index} {}", EventLine(&history[index]));
        }
        out
    }
}

/// The smallest offending sub-history among `violations`, rendered (for a failure message).
pub fn smallest(violations: &[Violation], history: &[Event]) -> String {
    violations
        .iter()
        .min_by_key(|v| v.witnesses.len())
        .map(|v| v.render(history))
        .unwrap_or_default()
}

struct EventLine<'a>(&'a Event);

impl fmt::Display for EventLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |t: Nanos| t as f64 / 1e6;
        match self.0 {
            Event::Call {
                conn,
                inv,
                request,
                reply: Some((resp, reply)),
            } => write!(
                f,
                "c{conn} [{:.3} ms, {:.3} ms] {request} -> {reply}",
                ms(*inv),
                ms(*resp)
            ),
            Event::Call {
                conn, inv, request, ..
            } => write!(f, "c{conn} [{:.3} ms, -] {request} -> (no reply)", ms(*inv)),
            Event::Loss { conn, at, cause } => {
                write!(f, "c{conn} lost at {:.3} ms ({cause:?})", ms(*at))
            }
            Event::Kill { pid, at } => write!(f, "worker {pid} SIGKILLed at {:.3} ms", ms(*at)),
            Event::Final(Counters {
                queue,
                put,
                done,
                depth,
                in_flight,
            }) => write!(
                f,
                "STATS {queue}: put={put} done={done} depth={depth} in_flight={in_flight}"
            ),
        }
    }
}

/// What a checked history showed, for a test to see that its chaos happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Jobs put (acknowledged, or delivered after an unanswered PUT).
    pub jobs: usize,
    /// Visible deliveries (JOB replies).
    pub deliveries: usize,
    /// Deliveries of a job delivered before.
    pub redeliveries: usize,
    /// GETs without a reply (hidden holders).
    pub hidden_gets: usize,
    /// DONEs without a reply.
    pub unanswered_dones: usize,
    /// Connections lost by each cause: (dropped by the client, closed by the server).
    pub losses: (usize, usize),
    pub kills: usize,
}

/// Checks `history` against the model; every violation found otherwise.
pub fn check(history: &[Event]) -> Result<Summary, Vec<Violation>> {
    let mut violations = Vec::new();
    let facts = Facts::read(history, &mut violations);
    facts.fresh(&mut violations);
    facts.repet(&mut violations);
    facts.done(&mut violations);
    facts.order_and_witness(&mut violations);
    facts.counters(&mut violations);
    if violations.is_empty() {
        Ok(facts.summary())
    } else {
        violations.sort_by_key(|v| (v.rule, v.witnesses.len()));
        Err(violations)
    }
}

/// One call's interval and connection.
#[derive(Debug, Clone, Copy)]
struct Span {
    index: usize,
    conn: u64,
    inv: Nanos,
    /// `None`: no reply.
    resp: Option<Nanos>,
}

impl Span {
    fn resp_or_never(&self) -> Nanos {
        self.resp.unwrap_or(Nanos::MAX)
    }
}

/// How a PUT ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PutEnd {
    Put(u64),
    Refused,
    Unknown,
}

/// How a DONE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DoneEnd {
    Acknowledged,
    Refused,
    Unknown,
}

/// What the history says about one job (one payload).
#[derive(Debug, Default)]
struct Job {
    queue: String,
    put: Option<(Span, PutEnd)>,
    /// Visible deliveries: the GET's span and the id its JOB carried.
    deliveries: Vec<(Span, u64)>,
    dones: Vec<(Span, DoneEnd)>,
}

impl Job {
    fn put_acknowledged(&self) -> Option<Span> {
        self.put
            .filter(|(_, end)| matches!(end, PutEnd::Put(_)))
            .map(|(span, _)| span)
    }

    /// The delivery sent first.
    fn first_delivery(&self) -> Option<Span> {
        self.deliveries
            .iter()
            .map(|(s, _)| *s)
            .min_by_key(|s| s.inv)
    }

    fn was_put(&self) -> bool {
        self.put_acknowledged().is_some()
            || (self.put.is_some_and(|(_, end)| end == PutEnd::Unknown)
                && !self.deliveries.is_empty())
    }
}

/// The history sorted out: jobs by payload, GETs by queue, losses by connection.
#[derive(Debug, Default)]
struct Facts {
    jobs: BTreeMap<String, Job>,
    /// Every GET with its queue and outcome.
    gets: Vec<(String, Span, GetEnd)>,
    /// The earliest instant each lost connection may have been lost, and the events that
    /// show it (its loss, and the kill that may have closed it earlier).
    losses: BTreeMap<u64, (Nanos, Vec<usize>)>,
    finals: Vec<(usize, Counters)>,
    /// Which payload each id names (from PUT and JOB replies).
    ids: BTreeMap<u64, String>,
    summary: Summary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum GetEnd {
    Job(String),
    Empty,
    Refused,
    Unknown,
}

/// A job some GET shows was taken first by a hidden holder: before `by`, as the GET (and
/// PUT) in `witnesses` show by `rule`.
#[derive(Debug, Clone)]
struct Need {
    by: Nanos,
    rule: Rule,
    witnesses: Vec<usize>,
}

impl Facts {
    fn read(history: &[Event], violations: &mut Vec<Violation>) -> Facts {
        let mut facts = Facts::default();
        let mut dones = Vec::new();
        let mut kills = Vec::new();
        // The sending of the last request each connection saw answered.
        let mut alive = BTreeMap::new();
        for (index, event) in history.iter().enumerate() {
            match event {
                Event::Call {
                    conn,
                    inv,
                    request,
                    reply,
                } => {
                    let span = Span {
                        index,
                        conn: *conn,
                        inv: *inv,
                        resp: reply.as_ref().map(|(t, _)| *t),
                    };
                    if reply.is_some() {
                        let last = alive.entry(*conn).or_insert(*inv);
                        *last = (*last).max(*inv);
                    }
                    let reply = reply.as_ref().map(|(_, line)| line.as_str());
                    if let Err(detail) = facts.read_call(span, request, reply, &mut dones) {
                        violations.push(Violation {
                            rule: Rule::Malformed,
                            detail,
                            witnesses: vec![index],
                        });
                    }
                }
                Event::Loss { conn, at, cause } => {
                    facts.losses.entry(*conn).or_insert((*at, vec![index]));
                    match cause {
                        LossCause::DroppedByClient => facts.summary.losses.0 += 1,
                        LossCause::ClosedByServer => facts.summary.losses.1 += 1,
                    }
                }
                Event::Kill { at, .. } => {
                    facts.summary.kills += 1;
                    kills.push((*at, index));
                }
                Event::Final(counters) => facts.finals.push((index, counters.clone())),
            }
        }
        // DONEs name ids, which JOB replies anywhere in the history map to payloads.
        for (span, id, end) in dones {
            match facts.ids.get(&id) {
                Some(payload) => {
                    let job = facts
                        .jobs
                        .get_mut(payload)
                        .expect("an id names a known job");
                    job.dones.push((span, end));
                }
                None if end == DoneEnd::Acknowledged => violations.push(Violation {
                    rule: Rule::VDone,
                    detail: format!("DONE {id} acknowledged, but no job has id {id}"),
                    witnesses: vec![span.index],
                }),
                None => {}
            }
        }
        facts.lost_by_kills(&alive, kills);
        facts
    }

    /// A kill may have closed a connection before its client noticed (or dropped it): a lost
    /// connection may have been lost at the first kill sent after the last request it saw
    /// answered was sent (a worker SIGKILLed before a request was sent cannot answer it).
    fn lost_by_kills(&mut self, alive: &BTreeMap<u64, Nanos>, mut kills: Vec<(Nanos, usize)>) {
        kills.sort_unstable();
        for (conn, (at, witnesses)) in &mut self.losses {
            let since = alive.get(conn).copied().unwrap_or(0);
            if let Some(&(kill, index)) = kills.iter().find(|(kill, _)| *kill >= since) {
                if kill < *at {
                    *at = kill;
                    witnesses.push(index);
                }
            }
        }
    }

    /// Files one call; `Err` says why it cannot be read.
    fn read_call(
        &mut self,
        span: Span,
        request: &str,
        reply: Option<&str>,
        dones: &mut Vec<(Span, u64, DoneEnd)>,
    ) -> Result<(), String> {
        let Ok(parsed) = parse_request(request.as_bytes()) else {
            return Ok(()); // refused by the server as by us: no effect on any queue
        };
        match parsed {
            Request::Put { queue, payload, .. } | Request::PutNowait { queue, payload } => {
                let payload = String::from_utf8_lossy(payload).into_owned();
                let end = match reply {
                    None => PutEnd::Unknown,
                    Some(line) if line.starts_with("ERR ") => PutEnd::Refused,
                    Some(line) => PutEnd::Put(put_id(line)?),
                };
                if let PutEnd::Put(id) = end {
                    self.ids.insert(id, payload.clone());
                }
                let job = self.jobs.entry(payload.clone()).or_default();
                if job.put.is_some() {
                    return Err(format!(
                        "{payload:?} is put twice: the model needs unique payloads"
                    ));
                }
                job.queue = queue.as_str().to_string();
                job.put = Some((span, end));
            }
            Request::Get { queue, .. } | Request::GetNowait { queue } => {
                let end = match reply {
                    None => GetEnd::Unknown,
                    Some(line)
                        if line.starts_with("ERR empty ") || line.starts_with("ERR timeout ") =>
                    {
                        GetEnd::Empty
                    }
                    Some(line) if line.starts_with("ERR ") => GetEnd::Refused,
                    Some(line) => {
                        let (id, payload) = job_reply(line)?;
                        self.ids.entry(id).or_insert_with(|| payload.clone());
                        let job = self.jobs.entry(payload.clone()).or_default();
                        job.deliveries.push((span, id));
                        GetEnd::Job(payload)
                    }
                };
                self.gets.push((queue.as_str().to_string(), span, end));
            }
            Request::Done { id } => {
                let end = match reply {
                    None => DoneEnd::Unknown,
                    Some("OK") => DoneEnd::Acknowledged,
                    Some(line) if line.starts_with("ERR ") => DoneEnd::Refused,
                    Some(line) => return Err(format!("DONE answered {line:?}")),
                };
                dones.push((span, id, end));
            }
            _ => {}
        }
        Ok(())
    }

    /// The instant connection `conn` was lost (never: `Nanos::MAX`).
    fn loss(&self, conn: u64) -> Nanos {
        self.losses.get(&conn).map_or(Nanos::MAX, |(at, _)| *at)
    }

    fn loss_witnesses(&self, conn: u64) -> impl Iterator<Item = usize> + '_ {
        self.losses
            .get(&conn)
            .into_iter()
            .flat_map(|(_, w)| w.iter().copied())
    }

    fn fresh(&self, violations: &mut Vec<Violation>) {
        for (payload, job) in &self.jobs {
            for (delivery, id) in &job.deliveries {
                let mut witnesses = vec![delivery.index];
                let problem = match job.put {
                    None => Some("no PUT put it".to_string()),
                    Some((put, end)) => {
                        witnesses.push(put.index);
                        match end {
                            PutEnd::Refused => Some("its PUT was refused".to_string()),
                            _ if put.inv > delivery.resp_or_never() => {
                                Some("its PUT was sent after the JOB was read".to_string())
                            }
                            PutEnd::Put(put_id) if put_id != *id => {
                                Some(format!("its PUT answered id {put_id}"))
                            }
                            _ => None,
                        }
                    }
                };
                let problem = problem.or_else(|| {
                    let (other, first_id) = job.deliveries.iter().find(|(_, i)| i != id)?;
                    witnesses.push(other.index);
                    Some(format!("another JOB carried id {first_id}"))
                });
                if let Some(problem) = problem {
                    violations.push(Violation {
                        rule: Rule::VFresh,
                        detail: format!("JOB {id} {payload}: {problem}"),
                        witnesses,
                    });
                }
            }
        }
    }

    fn repet(&self, violations: &mut Vec<Violation>) {
        for (payload, job) in &self.jobs {
            if job.deliveries.len() < 2 {
                continue;
            }
            let spans: Vec<Span> = job.deliveries.iter().map(|(s, _)| *s).collect();
            let last = job
                .dones
                .iter()
                .find(|(_, end)| *end == DoneEnd::Acknowledged)
                .and_then(|(done, _)| spans.iter().position(|s| s.conn == done.conn));
            if !self.chain(job, last) {
                let mut witnesses: Vec<usize> = spans.iter().map(|s| s.index).collect();
                witnesses.extend(spans.iter().flat_map(|s| self.loss_witnesses(s.conn)));
                witnesses.extend(
                    job.dones
                        .iter()
                        .filter(|(_, end)| *end == DoneEnd::Acknowledged)
                        .map(|(s, _)| s.index),
                );
                violations.push(Violation {
                    rule: Rule::VRepet,
                    detail: format!(
                        "{payload:?} delivered {} times, not each time after its holder's loss",
                        spans.len()
                    ),
                    witnesses,
                });
            }
        }
    }

    fn done(&self, violations: &mut Vec<Violation>) {
        for (payload, job) in &self.jobs {
            let acknowledged: Vec<Span> = job
                .dones
                .iter()
                .filter(|(_, end)| *end == DoneEnd::Acknowledged)
                .map(|(s, _)| *s)
                .collect();
            if acknowledged.len() > 1 {
                violations.push(Violation {
                    rule: Rule::VDone,
                    detail: format!("{payload:?} acknowledged done {} times", acknowledged.len()),
                    witnesses: acknowledged.iter().map(|s| s.index).collect(),
                });
            }
            for done in &acknowledged {
                let held = job
                    .deliveries
                    .iter()
                    .any(|(get, _)| get.conn == done.conn && get.inv < done.resp_or_never());
                if !held {
                    violations.push(Violation {
                        rule: Rule::VDone,
                        detail: format!(
                            "{payload:?} acknowledged done on c{}, which was never delivered it",
                            done.conn
                        ),
                        witnesses: vec![done.index],
                    });
                }
            }
        }
    }

    /// VOrd and VWit: the jobs some GET shows were taken first by a hidden holder, each
    /// matched to a distinct one (Kuhn's augmenting paths); a job left over is a violation.
    fn order_and_witness(&self, violations: &mut Vec<Violation>) {
        let needs = self.hidden_takings();
        let hidden: Vec<(&str, Span)> = self
            .gets
            .iter()
            .filter(|(_, _, end)| *end == GetEnd::Unknown)
            .map(|(queue, span, _)| (queue.as_str(), *span))
            .collect();
        let mut order: Vec<(&String, &Need)> = needs.iter().map(|(p, n)| (*p, n)).collect();
        order.sort_by_key(|(payload, need)| (need.by, *payload));
        let mut taker_of: Vec<Option<&String>> = vec![None; hidden.len()];
        for (payload, need) in order {
            let mut seen = vec![false; hidden.len()];
            if self.augment(payload, &needs, &hidden, &mut taker_of, &mut seen) {
                continue;
            }
            let job = &self.jobs[payload];
            let able: Vec<Span> = hidden
                .iter()
                .filter(|(queue, h)| self.could_take(queue, h, payload, need))
                .map(|(_, h)| *h)
                .collect();
            let mut witnesses = need.witnesses.clone();
            witnesses.extend(job.put.map(|(s, _)| s.index));
            witnesses.extend(job.first_delivery().map(|s| s.index));
            witnesses.extend(able.iter().map(|s| s.index));
            witnesses.extend(able.iter().flat_map(|s| self.loss_witnesses(s.conn)));
            let what = match need.rule {
                Rule::VOrd => "was taken after a job put later",
                _ => "was in the queue while a GET found it empty",
            };
            violations.push(Violation {
                rule: need.rule,
                detail: format!(
                    "{payload:?} {what}, unless a hidden holder took it first; the {} that could \
                     were needed by other jobs",
                    able.len()
                ),
                witnesses,
            });
        }
    }

    /// For each job that some GET shows was taken before that GET's reply, though its first
    /// delivery was sent after it: the earliest such reply, and the GET (and PUT) showing it.
    /// A GET answered `JOB v2` (the first delivery of `v2`) shows it for every job whose PUT
    /// was answered before `v2`'s was sent; a GET answered empty, for every job whose PUT was
    /// answered before the GET was sent.
    fn hidden_takings(&self) -> BTreeMap<&String, Need> {
        let mut needs: BTreeMap<&String, Need> = BTreeMap::new();
        for (queue, span, end) in &self.gets {
            let (cutoff, rule, witnesses) = match end {
                GetEnd::Job(payload) => {
                    let job = &self.jobs[payload];
                    let (Some((put, _)), Some(first)) = (job.put, job.first_delivery()) else {
                        continue; // VFresh already
                    };
                    if first.index != span.index {
                        continue;
                    }
                    (put.inv, Rule::VOrd, vec![span.index, put.index])
                }
                GetEnd::Empty => (span.inv, Rule::VWit, vec![span.index]),
                GetEnd::Refused | GetEnd::Unknown => continue,
            };
            let by = span.resp_or_never();
            let skipped = self.jobs.iter().filter(|(_, job)| {
                job.queue == *queue
                    && job
                        .put_acknowledged()
                        .is_some_and(|put| put.resp_or_never() < cutoff)
                    && job.first_delivery().is_none_or(|first| first.inv > by)
            });
            for (payload, _) in skipped {
                let need = Need {
                    by,
                    rule,
                    witnesses: witnesses.clone(),
                };
                needs
                    .entry(payload)
                    .and_modify(|old| {
                        if by < old.by {
                            *old = need.clone();
                        }
                    })
                    .or_insert(need);
            }
        }
        needs
    }

    /// Whether the GET without reply `hidden` (on `queue`) could have been the first to take
    /// the job `payload`: sent before it must have been taken, and lost before the job's
    /// first delivery was read (the job went back to its queue in between).
    fn could_take(&self, queue: &str, hidden: &Span, payload: &str, need: &Need) -> bool {
        let job = &self.jobs[payload];
        let deadline = job
            .first_delivery()
            .map_or(Nanos::MAX, |first| first.resp_or_never());
        job.queue == queue
            && hidden.inv < need.by
            && (self.loss(hidden.conn) < deadline || deadline == Nanos::MAX)
    }

    /// Kuhn's step: finds `payload` a hidden holder, moving others' along if need be.
    fn augment<'a>(
        &self,
        payload: &'a String,
        needs: &BTreeMap<&'a String, Need>,
        hidden: &[(&str, Span)],
        taker_of: &mut Vec<Option<&'a String>>,
        seen: &mut Vec<bool>,
    ) -> bool {
        let need = &needs[payload];
        for (h, (queue, span)) in hidden.iter().enumerate() {
            if seen[h] || !self.could_take(queue, span, payload, need) {
                continue;
            }
            seen[h] = true;
            let free = match taker_of[h] {
                None => true,
                Some(other) => self.augment(other, needs, hidden, taker_of, seen),
            };
            if free {
                taker_of[h] = Some(payload);
                return true;
            }
        }
        false
    }

    fn counters(&self, violations: &mut Vec<Violation>) {
        for (index, stats) in &self.finals {
            let jobs: Vec<(&String, &Job)> = self
                .jobs
                .iter()
                .filter(|(_, j)| j.queue == stats.queue)
                .collect();
            let put_low = jobs.iter().filter(|(_, j)| j.was_put()).count() as u64;
            let put_high = put_low
                + jobs
                    .iter()
                    .filter(|(_, j)| {
                        !j.was_put() && j.put.is_some_and(|(_, e)| e == PutEnd::Unknown)
                    })
                    .count() as u64;
            let done_low = jobs
                .iter()
                .filter(|(_, j)| j.dones.iter().any(|(_, e)| *e == DoneEnd::Acknowledged))
                .count() as u64;
            let maybe_done: Vec<&String> = jobs
                .iter()
                .filter(|(_, j)| !j.dones.iter().any(|(_, e)| *e == DoneEnd::Acknowledged))
                .filter(|(_, j)| self.last_holder_may_have_done(j))
                .map(|(p, _)| *p)
                .collect();
            let done_high = done_low + maybe_done.len() as u64;
            let s = stats;
            let mut problems = Vec::new();
            if s.put != s.depth + s.in_flight + s.done {
                problems.push("put != depth + in_flight + done".to_string());
            }
            if !(put_low..=put_high).contains(&s.put) {
                problems.push(format!(
                    "put={} outside the {put_low}..={put_high} the calls allow",
                    s.put
                ));
            }
            if !(done_low..=done_high).contains(&s.done) {
                problems.push(format!(
                    "done={} outside the {done_low}..={done_high} the calls allow",
                    s.done
                ));
            }
            if !problems.is_empty() {
                violations.push(Violation {
                    rule: Rule::VCount,
                    detail: format!("queue {}: {}", s.queue, problems.join("; ")),
                    witnesses: vec![*index],
                });
            }
            if s.depth == 0 && s.in_flight == 0 {
                let undone = jobs.iter().filter(|(_, j)| {
                    j.put_acknowledged().is_some()
                        && !j.dones.iter().any(|(_, e)| *e == DoneEnd::Acknowledged)
                        && !self.last_holder_may_have_done(j)
                });
                for (payload, job) in undone {
                    let mut witnesses = vec![*index];
                    witnesses.extend(job.put.map(|(s, _)| s.index));
                    witnesses.extend(job.deliveries.iter().map(|(s, _)| s.index));
                    witnesses.extend(job.dones.iter().map(|(s, _)| s.index));
                    witnesses.extend(
                        job.deliveries
                            .iter()
                            .flat_map(|(s, _)| self.loss_witnesses(s.conn)),
                    );
                    violations.push(Violation {
                        rule: Rule::VCount,
                        detail: format!(
                            "queue {} is drained but {payload:?} was never done",
                            s.queue
                        ),
                        witnesses,
                    });
                }
            }
        }
    }

    /// Whether a DONE without reply may have ended `job`: one sent by a holder after its
    /// delivery, when that holder can be the last of the chain of deliveries.
    fn last_holder_may_have_done(&self, job: &Job) -> bool {
        job.deliveries.iter().enumerate().any(|(x, (get, _))| {
            job.dones.iter().any(|(done, end)| {
                *end == DoneEnd::Unknown && done.conn == get.conn && done.inv > get.inv
            }) && self.chain(job, Some(x))
        })
    }

    /// Whether `job`'s deliveries form a chain of losses ([`chain_exists`]), ending with
    /// delivery `last` if given.
    fn chain(&self, job: &Job, last: Option<usize>) -> bool {
        let spans: Vec<Span> = job.deliveries.iter().map(|(s, _)| *s).collect();
        let losses: Vec<Nanos> = spans.iter().map(|s| self.loss(s.conn)).collect();
        chain_exists(&spans, &losses, last)
    }

    fn summary(&self) -> Summary {
        let mut summary = self.summary;
        summary.jobs = self.jobs.values().filter(|j| j.was_put()).count();
        summary.deliveries = self.jobs.values().map(|j| j.deliveries.len()).sum();
        summary.redeliveries = self
            .jobs
            .values()
            .map(|j| j.deliveries.len().saturating_sub(1))
            .sum();
        summary.hidden_gets = self
            .gets
            .iter()
            .filter(|(_, _, e)| *e == GetEnd::Unknown)
            .count();
        summary.unanswered_dones = self
            .jobs
            .values()
            .flat_map(|j| &j.dones)
            .filter(|(_, e)| *e == DoneEnd::Unknown)
            .count();
        summary
    }
}

/// Most deliveries of one job the chain search takes (it is exponential in them).
const MAX_DELIVERIES: usize = 16;

/// Whether the deliveries `spans` (with their connections' losses) can be ordered so that
/// each one's holder lost its connection before the next was read, and each was sent before
/// the next was read; `last`, if given, must come last.
fn chain_exists(spans: &[Span], losses: &[Nanos], last: Option<usize>) -> bool {
    let n = spans.len();
    assert!(
        n <= MAX_DELIVERIES,
        "{n} deliveries of one job: too many to search"
    );
    let follows = |a: usize, b: usize| {
        losses[a] < spans[b].resp_or_never() && spans[a].inv < spans[b].resp_or_never()
    };
    // reachable[mask] = set of possible last elements of a chain over `mask`.
    let mut reachable = vec![0u32; 1 << n];
    for i in 0..n {
        reachable[1 << i] = 1 << i;
    }
    for mask in 1..(1usize << n) {
        let ends = reachable[mask];
        if ends == 0 {
            continue;
        }
        for a in (0..n).filter(|a| ends & (1 << a) != 0) {
            for b in (0..n).filter(|b| mask & (1 << b) == 0) {
                if follows(a, b) {
                    reachable[mask | (1 << b)] |= 1 << b;
                }
            }
        }
    }
    let all = reachable[(1 << n) - 1];
    match last {
        Some(last) => all & (1 << last) != 0,
        None => all != 0,
    }
}

/// The id of an `OK <id>` reply to a PUT.
fn put_id(line: &str) -> Result<u64, String> {
    line.strip_prefix("OK ")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| format!("a PUT answered {line:?}"))
}

/// Splits a `JOB <id> <payload>` reply.
pub fn job_reply(line: &str) -> Result<(u64, String), String> {
    line.strip_prefix("JOB ")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(id, payload)| Some((id.parse().ok()?, payload.to_string())))
        .ok_or_else(|| format!("a GET answered {line:?}"))
}

#[cfg(test)]
mod tests;
