//! The master process: the supervision loop.
//!
//! Each turn of [`Master::run`] is a short list of verbs: start the workers that are due,
//! announce readiness, take over from the master we replace, finish a drain; then wait for
//! something to happen and handle it: worker reports, signals (each a named verb: drain,
//! stop, grow, shrink, reload, upgrade), reaping, hung-worker detection and the status page.
//! Signal handlers do no work: signal-hook turns each signal into a readable event.
//!
//! The bookkeeping of slots and workers is [`Pool`]'s, the listeners are [`Listeners`]', the
//! binary upgrade is `upgrade.rs`'. A forked worker leaves this loop at once: [`Master::run`]
//! returns its [`WorkerSetup`] and the caller drops the master before running the worker.

use std::ffi::OsString;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use forkpool_queue::Store;

use crate::broker::{Broker, Candidate, Routing, WorkerNews};
use crate::channel::{self, Channel};
use crate::config::{Cli, Config, MAX_WORKERS};
use crate::ledger_store::LedgerStore;
use crate::listener::Listeners;
use crate::master_link::LeaveReason;
use crate::pidfile::PidFile;
use crate::pool::{ExitVerdict, Pool, WorkerPhase, MAX_BACKOFF};
use crate::process::{self, Exit, Forked};
use crate::scoreboard::{Lasting, ServiceTotals};
use crate::service::ServiceKind;
use crate::status::{PoolView, StatusServer, WorkerView};
use crate::tls::ServiceTls;
use crate::upgrade::{Takeover, Upgrade};
use crate::users::Users;
use crate::wakeup::Wakeup as QueueWakeup;
use crate::worker::{WorkerSettings, WorkerSetup};

mod start;

const SIGNAL_TOKEN: Token = Token(0);
/// The link to the other master of a binary upgrade.
const PEER_TOKEN: Token = Token(1);
/// Tokens of the status page's listener and connections start here.
const STATUS_HTTP_TOKENS: usize = 16;
/// Worker links: this plus the worker's scoreboard cell index.
const LINK_TOKENS: usize = 1 << 16;
/// Set (to a number) by tests only: the hand-over format version a new master announces to
/// the old one, to simulate an upgrade between binaries that do not speak the same format.
const ANNOUNCED_VERSION_VAR: &str = "FORKPOOL_TEST_HANDOVER_VERSION";
/// How often the scoreboard is inspected (heartbeats, overdue retirees).
const INSPECTION_INTERVAL: Duration = Duration::from_millis(250);
/// Scoreboard cells: room for a full pool plus as many workers retiring.
const SCOREBOARD_CELLS: usize = 2 * MAX_WORKERS;

/// What the master is doing.
#[derive(Clone, Copy)]
enum Phase {
    Running,
    /// Graceful shutdown: no respawns; workers drain until `deadline`. `routing` says where
    /// their connections may go: nowhere (a shutdown), or to the new master (an upgrade).
    Draining {
        deadline: Instant,
        routing: Routing,
    },
}

/// How [`Master::run`] ended, in this process.
pub enum Outcome {
    /// The master shut down.
    Stopped,
    /// This is a freshly forked worker: run it (after dropping the master).
    Worker(Box<WorkerSetup>),
}

/// The master's own event sources; a forked worker drops them with the master.
struct MasterIo {
    poll: Poll,
    signals: Signals,
    status_http: Option<StatusServer>,
}

/// What woke the master, besides signals.
#[derive(Default)]
struct Wakeup {
    /// Readiness of the status page's sockets.
    status: Vec<Token>,
    /// Readiness of worker links and the peer link: (token, writable).
    links: Vec<(Token, bool)>,
}

pub struct Master {
    /// The command line, to re-read the settings file on HUP.
    cli: Cli,
    config: Config,
    io: MasterIo,
    /// The links to the workers (and to the other master of an upgrade), and the live
    /// connections passed between them.
    broker: Broker,
    /// The bank ledger, opened (and recovered) or prepared before any fork; every worker
    /// inherits the file's mapping or connects to the database. The master itself never
    /// takes a ledger lock.
    ledger: LedgerStore,
    /// The job queues, opened (and recovered) before any fork; every worker inherits the
    /// mapping. The master only returns a dead worker's jobs and waits to the store.
    queue: Store,
    /// Wakes the workers whose waits a dead worker's released jobs served.
    wakeup: QueueWakeup,
    /// Dead workers whose share of the queue store is not released yet (the store lock was
    /// busy: the master never waits for it).
    unreleased: Vec<Pid>,
    /// The TLS services' certificates, loaded at start and re-read on HUP (a bad file keeps
    /// the current one); each new worker gets them.
    tls: ServiceTls,
    /// The bank's users (a users file), re-read on HUP; each new worker gets them.
    users: Option<Arc<Users>>,
    /// The master holds every slot's sockets for its whole life, so connections queued for
    /// a slot whose worker died wait for the replacement instead of being reset.
    listeners: Listeners,
    pool: Pool,
    phase: Phase,
    pid: Pid,
    /// Held (locked) from the start to exit; written once ready.
    pid_file: Option<PidFile>,
    /// The ready line has been printed.
    announced: bool,
    next_inspection: Instant,
    /// How this binary was started, to start it again on USR2.
    exe: PathBuf,
    args: Vec<OsString>,
    /// A new master started by USR2 that has not taken over yet.
    upgrade: Option<Upgrade>,
    /// The master this one replaces, told to drain once we serve.
    takeover: Option<Takeover>,
}

impl Master {
    /// Supervises until shutdown. In a forked worker it returns at once with the worker's
    /// setup, leaving the master's loop and tables behind.
    pub fn run(mut self) -> io::Result<Outcome> {
        let mut events = Events::with_capacity(64);
        loop {
            if let Some(child) = self.start_due_workers() {
                return Ok(Outcome::Worker(Box::new(self.into_worker(child)?)));
            }
            self.announce_ready();
            self.complete_takeover();
            if self.drain_finished() {
                self.remove_pid_file();
                return Ok(Outcome::Stopped);
            }
            let wakeup = self.wait(&mut events)?;
            for (token, writable) in wakeup.links {
                let news = self
                    .broker
                    .on_event(token, writable, self.io.poll.registry());
                self.on_news(news);
            }
            let signals: Vec<i32> = self.io.signals.pending().collect();
            for signal in signals {
                if self.on_signal(signal).is_break() {
                    self.stop_now();
                    self.remove_pid_file();
                    return Ok(Outcome::Stopped);
                }
            }
            self.reap_children();
            self.check_upgrade_deadline();
            self.inspect_workers();
            self.dispatch_connections();
            self.serve_status(&wakeup.status);
        }
    }

    /// Sleeps until an event or the next timer; returns what woke it (signals are read
    /// from their own source).
    fn wait(&mut self, events: &mut Events) -> io::Result<Wakeup> {
        let timeout = self.next_timeout(Instant::now());
        if let Err(e) = self.io.poll.poll(events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let mut wakeup = Wakeup::default();
        for event in events.iter() {
            match event.token() {
                SIGNAL_TOKEN => {}
                token if token == PEER_TOKEN || token.0 >= LINK_TOKENS => {
                    wakeup.links.push((token, event.is_writable()));
                }
                token => wakeup.status.push(token),
            }
        }
        Ok(wakeup)
    }

    fn on_signal(&mut self, signal: i32) -> ControlFlow<()> {
        let running = matches!(self.phase, Phase::Running);
        match signal {
            SIGTERM | SIGINT if running => self.start_drain(),
            SIGTERM | SIGINT => {
                log::warn!("second shutdown signal: stopping now");
                return ControlFlow::Break(());
            }
            SIGQUIT => {
                log::info!("SIGQUIT: stopping now");
                return ControlFlow::Break(());
            }
            SIGTTIN if running => self.add_slot(),
            SIGTTOU if running => self.remove_slot(),
            SIGHUP if running => self.reload(),
            SIGUSR2 if running => self.start_upgrade(),
            // SIGCHLD: reaping follows every wake-up. SIGUSR1 is the master's order to its
            // workers; sent to the master (e.g. to the whole group) it does nothing. Pool
            // changes wait while draining.
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn on_news(&mut self, news: Vec<(Pid, WorkerNews)>) {
        for (pid, item) in news {
            match item {
                WorkerNews::Ready => self.pool.mark_ready(pid),
                WorkerNews::Leaving(reason) => self.on_worker_leaving(pid, reason),
            }
        }
    }

    /// A worker stopped accepting on its own: its slot gets a successor at once, or the
    /// slot's queue would go unserved.
    fn on_worker_leaving(&mut self, pid: Pid, reason: LeaveReason) {
        let Some(slot) = self.pool.worker_mut(pid).map(|w| w.slot) else {
            return;
        };
        if !matches!(self.phase, Phase::Running) || !self.pool.retire(pid) {
            return;
        }
        match reason {
            LeaveReason::Recycled => {
                log::info!("worker {slot} (pid {pid}) served its max_requests: replacing it");
                self.pool.count_recycled();
            }
            LeaveReason::Terminated | LeaveReason::Retired => log::warn!(
                "worker {slot} (pid {pid}) is draining on its own: starting its successor"
            ),
        }
    }

    /// SIGTERM/SIGINT: no more respawns; every worker drains.
    fn start_drain(&mut self) {
        notify(&[sd_notify::NotifyState::Stopping]);
        let deadline = Instant::now() + self.config.graceful_timeout;
        log::info!(
            "draining: waiting up to {:?} for {} workers",
            self.config.graceful_timeout,
            self.pool.workers().len()
        );
        // During an upgrade the TERM is the new master's "I serve now": its workers already
        // take the connections, so ours retire (hand them over) instead of draining.
        let handover = self.upgrade.take().is_some();
        let routing = if handover {
            Routing::ToSuccessor
        } else {
            Routing::Nowhere
        };
        self.phase = Phase::Draining { deadline, routing };
        // A worker that died just now (Ctrl-C signals the whole group, so the workers drain
        // on their own) must count as gone before slots are staffed.
        self.reap_children();
        let order = if handover {
            log::info!("handing over to the new master");
            Signal::SIGUSR1
        } else {
            // A slot whose worker is down (just died, or in crash back-off) still has
            // connections in its listener's queue: a worker is started to drain them.
            let staffed = self.pool.staff_empty_slots_now();
            if staffed > 0 {
                log::info!("{staffed} slots have no worker: starting one each to drain");
            }
            Signal::SIGTERM
        };
        for worker in self.pool.workers() {
            process::signal(worker.pid, order);
        }
    }

    /// Kills every worker, reaps them all (SIGQUIT, second TERM, drain timeout).
    fn stop_now(&mut self) {
        for worker in self.pool.workers() {
            process::signal(worker.pid, Signal::SIGKILL);
        }
        for worker in self.pool.workers() {
            match nix::sys::wait::waitpid(worker.pid, None) {
                Ok(status) => log::info!("worker {} killed: {status:?}", worker.pid),
                Err(e) => log::warn!("waiting for worker {}: {e}", worker.pid),
            }
        }
        while process::reap_any().is_some() {}
        log::info!("stopped");
    }

    fn drain_finished(&mut self) -> bool {
        let Phase::Draining { deadline, .. } = self.phase else {
            return false;
        };
        if self.pool.workers().is_empty() {
            log::info!("every worker has drained; exiting");
            return true;
        }
        if Instant::now() >= deadline {
            log::warn!(
                "graceful timeout: killing {} workers still draining",
                self.pool.workers().len()
            );
            self.stop_now();
            return true;
        }
        false
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let drain = match self.phase {
            Phase::Draining { deadline, .. } => Some(deadline),
            Phase::Running => None,
        };
        let inspection = (!self.pool.workers().is_empty()).then_some(self.next_inspection);
        let upgrade = self.upgrade.as_ref().map(|u| u.deadline);
        let parcels = self.broker.next_deadline();
        [self.pool.next_start(), drain, inspection, upgrade, parcels]
            .into_iter()
            .flatten()
            .min()
            .map(|wake| wake.saturating_duration_since(now))
    }

    /// Prints the ready line once every slot has a worker serving.
    fn announce_ready(&mut self) {
        if self.announced || !matches!(self.phase, Phase::Running) || !self.pool.all_serving() {
            return;
        }
        self.announced = true;
        let mut line = String::from("forkpool ready");
        for (kind, addr) in self.listeners.addrs() {
            line.push_str(&format!(" {}={addr}", kind.name()));
        }
        if let Some(status) = &self.io.status_http {
            line.push_str(&format!(" status={}", status.addr()));
        }
        line.push_str(&format!(" pid={}", self.pid));
        log::info!("{} workers serving", self.pool.size());
        if let Some(pid_file) = &mut self.pid_file {
            if let Err(e) = pid_file.write(self.pid) {
                log::error!("{e}");
            }
        }
        // A closed stdout must not stop the server: the line is a courtesy to scripts.
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
        drop(stdout);
        let main_pid = u32::try_from(self.pid.as_raw()).unwrap_or_default();
        notify(&[
            sd_notify::NotifyState::MainPid(main_pid),
            sd_notify::NotifyState::Ready,
        ]);
    }

    /// After a binary upgrade, once this master serves: the old one drains.
    fn complete_takeover(&mut self) {
        if self.announced {
            if let Some(takeover) = self.takeover.take() {
                takeover.complete();
            }
        }
    }

    fn remove_pid_file(&mut self) {
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.remove();
        }
    }

    /// Reaps every dead child (workers and a failed new master) and schedules replacements.
    fn reap_children(&mut self) {
        while let Some((pid, exit)) = process::reap_any() {
            if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
                log::error!(
                    "upgrade failed: the new master (pid {pid}) exited: {exit}; carrying on"
                );
                self.abandon_upgrade(true);
                continue;
            }
            self.on_worker_exit(pid, exit);
        }
    }

    /// Returns the queue jobs and waits of dead workers to the store (those whose release
    /// found the lock busy are tried again at the next inspection).
    fn release_queue_shares(&mut self, dead: Option<Pid>) {
        self.unreleased.extend(dead);
        let store = &self.queue;
        let wakeup = &self.wakeup;
        self.unreleased
            .retain(|pid| match store.release_process(pid.as_raw()) {
                Ok(Some(wakes)) => {
                    wakeup.poke(&wakes);
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    log::error!("queue store: cannot release the jobs of pid {pid}: {e}");
                    false
                }
            });
    }

    fn on_worker_exit(&mut self, pid: Pid, exit: Exit) {
        self.release_queue_shares(Some(pid));
        // What it said before it died counts; the connections offered to it go elsewhere.
        if let Some(worker) = self.pool.workers().iter().find(|w| w.pid == pid) {
            let token = link_token(worker.cell_index);
            let news = self.broker.worker_gone(token, self.io.poll.registry());
            self.on_news(news);
        }
        let draining = matches!(self.phase, Phase::Draining { .. });
        let Some((worker, verdict)) = self.pool.on_exit(pid, exit, draining) else {
            log::info!("reaped process {pid}: {exit}");
            return;
        };
        let slot = worker.slot;
        match verdict {
            ExitVerdict::Expected => {
                let totals =
                    ServiceKind::ALL.map(|kind| ServiceTotals::of(worker.cell.counters(kind)));
                let handed_over: u64 = totals.iter().map(|t| t.get(Lasting::HandedOver)).sum();
                let closed: u64 = totals
                    .iter()
                    .map(|t| t.get(Lasting::ClosedByReplacement))
                    .sum();
                let (how, since) = match (worker.phase, self.phase) {
                    (WorkerPhase::Retiring { since, .. }, _) => ("after retiring", Some(since)),
                    (_, Phase::Draining { deadline, .. }) => (
                        "during the drain",
                        deadline.checked_sub(self.config.graceful_timeout),
                    ),
                    _ => ("after its slot went away", None),
                };
                let took = since.map_or(Duration::ZERO, |since| since.elapsed());
                log::info!(
                    "worker {slot} (pid {pid}) exited {how}: {exit}; {handed_over} connections \
                     handed over, {closed} closed by the replacement, {} ms after it was told",
                    took.as_millis()
                );
            }
            ExitVerdict::Replace {
                delay, crashes, ..
            } if !delay.is_zero() => log::warn!(
                "worker {slot} (pid {pid}) died: {exit}; {crashes} crashes in a row, next start in {delay:?}"
            ),
            ExitVerdict::Replace { .. } => {
                log::warn!("worker {slot} (pid {pid}) died: {exit}; replacing it");
            }
        }
    }

    /// Four times a second: kills retiring workers past the graceful timeout, and hung ones.
    fn inspect_workers(&mut self) {
        let now = Instant::now();
        if now < self.next_inspection {
            return;
        }
        self.next_inspection = now + INSPECTION_INTERVAL;
        self.ledger.check_file();
        self.queue.check_file();
        self.release_queue_shares(None);
        let timeout = self.config.graceful_timeout;
        for pid in self.pool.overdue_retirees(now, timeout) {
            log::warn!("worker (pid {pid}) still retiring after {timeout:?}: killing it");
            process::signal(pid, Signal::SIGKILL);
        }
        self.kill_hung_workers();
    }

    /// Kills workers that stopped beating for longer than `worker_timeout` (a stopped or
    /// wedged process); their slots are restarted when they are reaped. A worker blocked on
    /// a ledger lock keeps beating, so only the real culprit (often the lock's holder) goes.
    fn kill_hung_workers(&mut self) {
        let Some(timeout) = self.config.worker_timeout else {
            return;
        };
        let holders = self.ledger.lock_holders();
        let mut hung = self.pool.silent_workers(timeout);
        // Lock holders first: they are what the others wait for.
        hung.sort_by_key(|(pid, _, _)| !holders.contains(&pid.as_raw()));
        for (pid, slot, silence) in hung {
            log::error!(
                "worker {slot} (pid {pid}) sent no heartbeat for {} ms: killing it",
                silence.as_millis()
            );
            process::signal(pid, Signal::SIGKILL);
        }
    }

    /// TTIN: one more slot, started at once.
    fn add_slot(&mut self) {
        if self.pool.size() >= MAX_WORKERS {
            log::warn!("SIGTTIN: already at {MAX_WORKERS} workers");
            return;
        }
        match self.listeners.resize(self.pool.size() + 1) {
            Ok(moved) => {
                self.pool.add_slot();
                self.retire_slots(moved);
                log::info!("SIGTTIN: {} workers", self.pool.size());
            }
            Err(e) => log::error!("SIGTTIN: {e}"),
        }
    }

    /// TTOU: one slot fewer (never below 1); its worker retires, handing its connections
    /// over, and its sockets go to the slots that remain (none is closed: that would reset
    /// the connections queued on it).
    fn remove_slot(&mut self) {
        if self.pool.size() <= 1 {
            log::warn!("SIGTTOU: keeping the last worker");
            return;
        }
        let removed = self.pool.remove_last_slot();
        match self.listeners.resize(self.pool.size()) {
            Ok(moved) => self.retire_slots(moved),
            Err(e) => log::error!("SIGTTOU: {e}"),
        }
        self.retire(self.pool.holders_of(removed));
        log::info!("SIGTTOU: {} workers", self.pool.size());
    }

    /// Replaces the workers of `slots`, whose sockets changed with the pool's size.
    fn retire_slots(&mut self, slots: Vec<usize>) {
        for slot in slots {
            self.retire(self.pool.holders_of(slot));
        }
    }

    /// Retires `workers`: each stops accepting and leaves once its clients are served.
    fn retire(&mut self, workers: Vec<Pid>) {
        for pid in workers {
            if self.pool.retire(pid) {
                process::signal(pid, Signal::SIGUSR1);
            }
        }
    }

    /// HUP: re-read the config file. An invalid one changes nothing; a valid one re-binds the
    /// listeners whose address changed, then replaces every worker with one running the new
    /// settings (the old ones retire).
    fn reload(&mut self) {
        notify(&[sd_notify::NotifyState::Reloading]);
        match self.apply_reload() {
            Ok(()) => log::info!("SIGHUP: reloaded with {} workers", self.pool.size()),
            Err(e) => log::error!("SIGHUP: reload refused, keeping the current settings: {e}"),
        }
        notify(&[sd_notify::NotifyState::Ready]);
    }

    fn apply_reload(&mut self) -> anyhow::Result<()> {
        let mut new = Config::load(&self.cli)?;
        new.keep_fixed_settings(&self.config);
        let users = start::load_users(&new)?;
        if let Some(listeners) = self.listeners.for_reload(&self.config, &new)? {
            self.listeners = listeners;
        }
        self.tls.reload(&new);
        self.users = users;
        self.config = new;
        self.retire(self.pool.holders());
        self.pool.resize(self.config.workers);
        Ok(())
    }

    /// USR2: starts the binary on disk as a new master (see `upgrade.rs`).
    fn start_upgrade(&mut self) {
        if let Some(upgrade) = &self.upgrade {
            log::warn!(
                "SIGUSR2: an upgrade (pid {}) is already in progress",
                upgrade.pid
            );
            return;
        }
        let mut fds = self.listeners.named_fds();
        fds.extend(self.ledger.upgrade_fds());
        fds.push((std::os::fd::AsRawFd::as_raw_fd(&self.queue), "queue-store"));
        fds.push((
            std::os::fd::AsRawFd::as_raw_fd(&self.queue.guard()),
            "queue-guard",
        ));
        match Upgrade::start(
            &self.exe,
            &self.args,
            &fds,
            self.pid,
            self.pid_file.as_mut(),
        ) {
            Ok((upgrade, link)) => {
                log::info!(
                    "SIGUSR2: started {} as the new master (pid {})",
                    self.exe.display(),
                    upgrade.pid
                );
                self.upgrade = Some(upgrade);
                self.broker
                    .add_successor(PEER_TOKEN, link, self.io.poll.registry());
            }
            Err(e) => log::error!("SIGUSR2: upgrade refused: {e}"),
        }
    }

    /// Kills a new master that did not make it in time.
    fn check_upgrade_deadline(&mut self) {
        if let Some(upgrade) = self
            .upgrade
            .as_ref()
            .filter(|u| Instant::now() >= u.deadline)
        {
            log::error!(
                "upgrade failed: the new master (pid {}) was not ready within {:?}; killing it",
                upgrade.pid,
                crate::upgrade::UPGRADE_TIMEOUT
            );
            self.abandon_upgrade(false);
        }
    }

    fn abandon_upgrade(&mut self, exited: bool) {
        if let Some(upgrade) = self.upgrade.take() {
            upgrade.abandon(self.pid_file.as_mut(), exited);
            self.broker.drop_successor(self.io.poll.registry());
        }
    }

    /// Passes connections offered by retiring workers on, as the phase allows: to a serving
    /// worker with room, to the new master after an upgrade, or back to their origin.
    fn dispatch_connections(&mut self) {
        if !self.broker.has_waiting() {
            return;
        }
        let routing = match self.phase {
            Phase::Running => Routing::Local,
            Phase::Draining { routing, .. } => routing,
        };
        let max = self.config.max_connections;
        let candidates: Vec<Candidate> = self
            .pool
            .workers()
            .iter()
            .filter(|w| w.phase == WorkerPhase::Serving)
            .map(|w| Candidate {
                token: link_token(w.cell_index),
                connections: ServiceKind::ALL
                    .iter()
                    .map(|&kind| w.cell.counters(kind).open_connections.load(Relaxed) as usize)
                    .sum(),
            })
            .filter(|c| c.connections < max)
            .collect();
        self.broker
            .dispatch(routing, &candidates, self.io.poll.registry());
    }

    /// Forks a worker for each slot that is due one. Returns `Some` in the child; the parent
    /// records the worker and returns `None`.
    fn start_due_workers(&mut self) -> Option<NewWorker> {
        let draining = matches!(self.phase, Phase::Draining { .. });
        for slot in self.pool.due_slots(Instant::now()) {
            let Some((cell_index, _)) = self.pool.free_cell() else {
                log::warn!("no scoreboard cell free for worker {slot}: too many workers retiring");
                self.pool.retry_slot(slot, INSPECTION_INTERVAL);
                continue;
            };
            let (ours, theirs) = match channel::pair() {
                Ok(pair) => pair,
                Err(e) => {
                    log::error!("cannot make a link for worker {slot}: {e}; retrying");
                    self.pool.retry_slot(slot, MAX_BACKOFF);
                    continue;
                }
            };
            // SAFETY: the master never starts a thread, so it is single-threaded here.
            match unsafe { process::fork_with_signals_blocked() } {
                Ok(Forked::Child) => {
                    return Some(NewWorker {
                        slot,
                        cell_index,
                        link: theirs,
                    })
                }
                Ok(Forked::Parent(pid)) => {
                    log::info!("worker {slot} started (pid {pid})");
                    self.pool.add_worker(pid, slot, cell_index);
                    let registry = self.io.poll.registry();
                    if let Err(e) =
                        self.broker
                            .add_worker(link_token(cell_index), pid, ours, registry)
                    {
                        log::error!("cannot watch worker {slot}'s link: {e}");
                    }
                    if draining {
                        // Started to drain its slot's queue: it drains from the start (the
                        // signal waits, blocked, until the worker handles it).
                        process::signal(pid, Signal::SIGTERM);
                    }
                }
                Err(e) => {
                    log::error!("cannot fork worker {slot}: {e}; retrying");
                    self.pool.retry_slot(slot, MAX_BACKOFF);
                }
            }
        }
        if draining {
            // Every worker that will drain a queue has its listener: ours would keep
            // queueing connections that nobody accepts.
            self.listeners.close();
        }
        None
    }

    /// In a freshly forked child: keeps what the worker of `slot` needs and drops the rest of
    /// the master (its poll, its signal registrations, the status pipe's reading end, the
    /// other slots' listeners, the pid file's descriptor).
    fn into_worker(mut self, child: NewWorker) -> io::Result<WorkerSetup> {
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.forget();
        }
        Ok(WorkerSetup {
            slot: child.slot,
            master: self.pid,
            listeners: self.listeners.for_slot(child.slot)?,
            link: child.link,
            ledger: self.ledger,
            queue: self.queue,
            cell: self.pool.cell(child.cell_index),
            settings: WorkerSettings::new(&self.config, &self.tls, self.users.as_ref()),
        })
    }

    /// Answers status-page connections from the scoreboard.
    fn serve_status(&mut self, tokens: &[Token]) {
        let Some(server) = self.io.status_http.as_mut() else {
            return;
        };
        if tokens.is_empty() {
            return;
        }
        let workers: Vec<WorkerView> = self
            .pool
            .workers()
            .iter()
            .map(|w| WorkerView {
                slot: w.slot,
                pid: w.pid.as_raw(),
                retiring: matches!(w.phase, WorkerPhase::Retiring { .. }),
                cell: w.cell,
            })
            .collect();
        let view = PoolView {
            pid: self.pid.as_raw(),
            configured_workers: self.pool.size(),
            workers: &workers,
            restarts: self.pool.restarts(),
            finished: self.pool.finished(),
            ledger: self.ledger.overview(),
            queue: Some(self.queue.overview()),
            db: self.ledger.is_postgres().then(|| self.pool.db_stats()),
        };
        server.on_events(tokens, self.io.poll.registry(), &view);
    }
}

/// What a freshly forked worker takes with it out of the master's loop.
struct NewWorker {
    slot: usize,
    cell_index: usize,
    /// The worker's end of its link to the master.
    link: Channel,
}

/// The poll token of the link of the worker on scoreboard cell `cell_index`.
fn link_token(cell_index: usize) -> Token {
    Token(LINK_TOKENS + cell_index)
}

/// Tells systemd (if it started us with `Type=notify`) about a state change.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("cannot notify systemd: {e}");
    }
}
