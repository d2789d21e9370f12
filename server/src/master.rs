//! The master process: it binds the listeners, opens the ledger, forks the workers, and
//! supervises them.
//!
//! The loop is a list of verbs run each time something happens: handle the queued signals,
//! read worker reports, reap dead children, kill hung workers, start the workers that are
//! due, announce readiness, serve the status page, and finish a drain. Signal handlers do no
//! work: signal-hook turns each signal into a readable event on the loop's poll.
//!
//! The pool is a list of slots (each owning one listener per service); a worker serves one
//! slot. A worker that must go without disrupting its clients (recycled, removed by TTOU,
//! replaced by a reload) is *retired*: it drains while its slot is already served by a new
//! worker.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use signal_hook::consts::{
    SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
};
use signal_hook_mio::v1_0::Signals;

use forkpool_ledger::{Ledger, LedgerOptions};

use crate::config::{Cli, Config, MAX_WORKERS};
use crate::inherit::{self, Inherited};
use crate::listener::ListenerGroup;
use crate::master_link::{self, Message, StatusReceiver, StatusSender};
use crate::pidfile::PidFile;
use crate::process::{self, Exit, Forked};
use crate::scoreboard::{Scoreboard, WorkerState};
use crate::service::ServiceKind;
use crate::status::{PoolView, StatusServer, WorkerView};
use crate::worker::{self, WorkerSettings, WorkerSetup};

const SIGNAL_TOKEN: Token = Token(0);
const STATUS_PIPE_TOKEN: Token = Token(1);
/// Tokens of the status page's listener and connections start here.
const STATUS_HTTP_TOKENS: usize = 16;
/// A worker that fails on its own within this time of starting counts as a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(10);
/// Delay before the second start of a crash-looping slot; doubles with each crash.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the scoreboard is inspected (heartbeats, self-draining and overdue workers).
const INSPECTION_INTERVAL: Duration = Duration::from_millis(250);
/// How long a new binary (USR2) has to become ready before it is killed.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
/// Scoreboard cells: room for a full pool plus as many workers draining.
const SCOREBOARD_CELLS: usize = 2 * MAX_WORKERS;

/// A listening service: its kind and one listener per worker slot.
struct Service {
    kind: ServiceKind,
    group: ListenerGroup,
}

/// One place in the pool.
#[derive(Debug)]
struct Slot {
    /// Consecutive crashes (deaths before ready, or own failures soon after start).
    crashes: u32,
    /// When to start the slot's next worker, if it has none.
    start_at: Option<Instant>,
}

/// A live worker process.
#[derive(Debug)]
struct Worker {
    pid: Pid,
    slot: usize,
    /// Its scoreboard cell.
    cell: usize,
    started: Instant,
    ready: bool,
    /// Draining while another worker serves its slot, since then.
    retiring: Option<Instant>,
    /// Killed by the master for missing its heartbeats.
    hung: bool,
}

/// What the master is doing.
enum Phase {
    Running,
    /// Graceful shutdown: no respawns; workers drain until `deadline`.
    Draining {
        deadline: Instant,
    },
}

/// The master's own event sources; a forked worker drops them first thing.
struct MasterIo {
    poll: Poll,
    signals: Signals,
    status_pipe: StatusReceiver,
    status_http: Option<StatusServer>,
}

pub struct Master {
    cli: Cli,
    config: Config,
    io: Option<MasterIo>,
    /// The workers' end of the status pipe, handed to each new worker.
    status_sender: Option<StatusSender>,
    /// The bank ledger, opened (and recovered) before any fork; every worker inherits the
    /// mapping. The master itself never takes a ledger lock.
    ledger: Option<Ledger>,
    scoreboard: Scoreboard,
    services: Vec<Service>,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    phase: Phase,
    pid: Pid,
    /// Held (locked) from the ready line to exit.
    pid_file: Option<PidFile>,
    announced: bool,
    next_inspection: Instant,
    /// Worker exits by reason, for `/metrics`.
    restarts: BTreeMap<&'static str, u64>,
    /// Requests served by workers already reaped, per service.
    finished_requests: [u64; 2],
    /// How this binary was started, to start it again on USR2.
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
    /// A new master started by USR2 that has not taken over yet.
    upgrade: Option<Upgrade>,
    /// The master this one replaces (it is told to drain once we are ready).
    replaces: Option<Pid>,
}

/// A binary upgrade in progress.
#[derive(Debug)]
struct Upgrade {
    pid: Pid,
    deadline: Instant,
}

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    #[error(transparent)]
    Ledger(#[from] forkpool_ledger::LedgerError),
    #[error(transparent)]
    PidFile(#[from] crate::pidfile::PidFileError),
    #[error("cannot set up the master's event loop: {0}")]
    Io(#[from] io::Error),
    #[error("cannot map the scoreboard: {0}")]
    Scoreboard(#[from] nix::Error),
    #[error(transparent)]
    Inherit(#[from] crate::listener::InheritError),
}

impl Master {
    /// Checks the pid file, binds every listener and opens the ledger; nothing is forked.
    pub fn new(cli: Cli, config: Config) -> Result<Master, StartError> {
        let pid_file = config.pid_file.as_deref().map(PidFile::claim).transpose()?;
        match Master::open(cli, config) {
            Ok(master) => Ok(Master { pid_file, ..master }),
            Err(e) => {
                // The file was created (or taken over) for a master that never started.
                if let Some(pid_file) = pid_file {
                    pid_file.remove();
                }
                Err(e)
            }
        }
    }

    fn open(cli: Cli, config: Config) -> Result<Master, StartError> {
        let exe = std::env::current_exe()?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let mut inherited = inherit::take()?;
        let services = listen(&config, &mut inherited)?;
        let ledger = match inherited.ledger.take() {
            // A binary upgrade: the old master's workers use the ledger right now, so its
            // locks must not be re-initialised nor recovery run.
            Some(fd) => Ledger::adopt(
                fd,
                inherited.ledger_guard.take(),
                &config.ledger,
                config.fsync,
            )?,
            None => Ledger::open(
                &config.ledger,
                &LedgerOptions {
                    max_accounts: config.max_accounts,
                    fsync: config.fsync,
                    ..LedgerOptions::default()
                },
            )?,
        };
        // A lock-free read: after an upgrade the old master's workers hold the locks.
        let audit = ledger.approximate_audit();
        log::info!(
            "ledger {}: {} accounts, total {}, fsync {}",
            config.ledger.display(),
            audit.accounts,
            audit.total,
            config.fsync
        );
        let poll = Poll::new()?;
        let mut signals = Signals::new([
            SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
        ])?;
        poll.registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)?;
        let (status_pipe, status_sender) = master_link::status_pipe()?;
        poll.registry().register(
            &mut SourceFd(&status_pipe.raw_fd()),
            STATUS_PIPE_TOKEN,
            Interest::READABLE,
        )?;
        let status_http = match config.status_addr {
            Some(addr) => Some(StatusServer::bind(
                addr,
                poll.registry(),
                STATUS_HTTP_TOKENS,
            )?),
            None => None,
        };
        Ok(Master {
            io: Some(MasterIo {
                poll,
                signals,
                status_pipe,
                status_http,
            }),
            status_sender: Some(status_sender),
            ledger: Some(ledger),
            scoreboard: Scoreboard::new(SCOREBOARD_CELLS)?,
            services,
            slots: Vec::new(),
            workers: Vec::new(),
            phase: Phase::Running,
            pid: nix::unistd::getpid(),
            pid_file: None,
            announced: false,
            next_inspection: Instant::now(),
            restarts: BTreeMap::new(),
            finished_requests: [0; 2],
            exe,
            args,
            upgrade: None,
            replaces: inherited.upgrade_from,
            cli,
            config,
        })
    }

    /// Supervises until shutdown. Returns only in the master; a forked worker exits inside.
    pub fn run(&mut self) -> io::Result<()> {
        let now = Instant::now();
        self.slots = (0..self.config.workers).map(|_| Slot::due(now)).collect();
        let mut events = Events::with_capacity(64);
        loop {
            self.start_due_workers();
            self.announce_ready();
            if self.drain_finished() {
                self.remove_pid_file();
                return Ok(());
            }
            let timeout = self.next_timeout(Instant::now());
            let io = self
                .io
                .as_mut()
                .expect("the master keeps its event sources until it exits");
            if let Err(e) = io.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let messages = io.status_pipe.messages();
            let signals: Vec<i32> = io.signals.pending().collect();
            let http_events: Vec<Token> = events
                .iter()
                .map(|event| event.token())
                .filter(|token| token.0 >= STATUS_HTTP_TOKENS)
                .collect();
            for message in messages {
                self.on_message(message);
            }
            for signal in signals {
                if self.on_signal(signal) == Stop::Now {
                    self.stop_now();
                    self.remove_pid_file();
                    return Ok(());
                }
            }
            self.reap_workers();
            self.check_upgrade_deadline();
            self.inspect_workers();
            self.serve_status(&http_events);
        }
    }

    fn on_signal(&mut self, signal: i32) -> Stop {
        let running = matches!(self.phase, Phase::Running);
        match signal {
            SIGTERM | SIGINT if running => {
                self.start_drain();
                Stop::Later
            }
            SIGTERM | SIGINT => {
                log::warn!("second shutdown signal: stopping now");
                Stop::Now
            }
            SIGQUIT => {
                log::info!("SIGQUIT: stopping now");
                Stop::Now
            }
            SIGTTIN if running => {
                self.add_slot();
                Stop::Later
            }
            SIGTTOU if running => {
                self.remove_slot();
                Stop::Later
            }
            SIGHUP if running => {
                notify(&[sd_notify::NotifyState::Reloading]);
                self.reload();
                notify(&[sd_notify::NotifyState::Ready]);
                Stop::Later
            }
            SIGUSR2 if running => {
                self.upgrade();
                Stop::Later
            }
            // SIGCHLD: reaping follows every wake-up. SIGUSR1 is the master's order to its
            // workers; sent to the master (e.g. to the whole group) it does nothing. Pool
            // changes wait while draining.
            _ => Stop::Later,
        }
    }

    fn on_message(&mut self, message: Message) {
        match message {
            Message::Ready(pid) => {
                if let Some(worker) = self.workers.iter_mut().find(|w| w.pid == pid) {
                    worker.ready = true;
                }
            }
            Message::Retiring(pid) => {
                let Some(index) = self
                    .workers
                    .iter()
                    .position(|w| w.pid == pid && w.retiring.is_none())
                else {
                    return;
                };
                let slot = self.workers[index].slot;
                log::info!("worker {slot} (pid {pid}) served its max_requests: replacing it");
                self.workers[index].retiring = Some(Instant::now());
                self.count_restart("recycled");
                if let Some(slot) = self.slots.get_mut(slot) {
                    slot.start_at = Some(Instant::now());
                }
            }
        }
    }

    fn start_drain(&mut self) {
        notify(&[sd_notify::NotifyState::Stopping]);
        let deadline = Instant::now() + self.config.graceful_timeout;
        log::info!(
            "draining: waiting up to {:?} for {} workers",
            self.config.graceful_timeout,
            self.workers.len()
        );
        self.phase = Phase::Draining { deadline };
        // A worker that died just now (Ctrl-C signals the whole group, so the workers drain
        // on their own) must count as gone before slots are staffed.
        self.reap_workers();
        // During an upgrade the TERM is the new master's "I serve now": its workers already
        // take the connections, so ours hand theirs over at the next request boundary.
        let handover = self.upgrade.take().is_some();
        if !handover {
            self.staff_empty_slots();
        }
        // Our copies of the listeners would keep queueing connections that nobody accepts.
        self.services.clear();
        for slot in &mut self.slots {
            slot.start_at = None;
        }
        if handover {
            log::info!("handing over to the new master");
        }
        self.signal_workers(if handover {
            Signal::SIGUSR1
        } else {
            Signal::SIGTERM
        });
    }

    /// At shutdown, a slot whose worker is down (just died, or in crash back-off) still has
    /// connections in its listener's queue: a worker is started to drain them, or closing
    /// the listener would reset them.
    fn staff_empty_slots(&mut self) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            if !self
                .workers
                .iter()
                .any(|w| w.slot == index && w.retiring.is_none())
            {
                log::info!("slot {index} has no worker: starting one to drain its queue");
                self.start_worker(index, now);
            }
        }
    }

    /// Kills every worker, reaps them all and returns (SIGQUIT, second TERM, drain timeout).
    fn stop_now(&mut self) {
        self.signal_workers(Signal::SIGKILL);
        for worker in self.workers.drain(..) {
            match nix::sys::wait::waitpid(worker.pid, None) {
                Ok(status) => log::info!("worker {} killed: {status:?}", worker.pid),
                Err(e) => log::warn!("waiting for worker {}: {e}", worker.pid),
            }
        }
        while process::reap_any().is_some() {}
        log::info!("stopped");
    }

    fn drain_finished(&mut self) -> bool {
        let Phase::Draining { deadline } = self.phase else {
            return false;
        };
        if self.workers.is_empty() {
            log::info!("every worker has drained; exiting");
            return true;
        }
        if Instant::now() >= deadline {
            log::warn!(
                "graceful timeout: killing {} workers still draining",
                self.workers.len()
            );
            self.stop_now();
            return true;
        }
        false
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let drain = match self.phase {
            Phase::Draining { deadline } => Some(deadline),
            Phase::Running => None,
        };
        let inspection = (!self.workers.is_empty()).then_some(self.next_inspection);
        let upgrade = self.upgrade.as_ref().map(|u| u.deadline);
        self.slots
            .iter()
            .filter_map(|slot| slot.start_at)
            .chain(drain)
            .chain(inspection)
            .chain(upgrade)
            .min()
            .map(|wake| wake.saturating_duration_since(now))
    }

    fn signal_workers(&self, signal: Signal) {
        for worker in &self.workers {
            process::signal(worker.pid, signal);
        }
    }

    /// Prints the ready line once every slot has a worker serving.
    fn announce_ready(&mut self) {
        if self.announced || !matches!(self.phase, Phase::Running) {
            return;
        }
        let serving = (0..self.slots.len()).all(|slot| {
            self.workers
                .iter()
                .any(|w| w.slot == slot && w.retiring.is_none() && w.ready)
        });
        if !serving {
            return;
        }
        self.announced = true;
        let mut line = String::from("forkpool ready");
        for service in &self.services {
            line.push_str(&format!(" {}={}", service.kind.name(), service.group.addr));
        }
        if let Some(status) = self.io.as_ref().and_then(|io| io.status_http.as_ref()) {
            line.push_str(&format!(" status={}", status.addr()));
        }
        line.push_str(&format!(" pid={}", self.pid));
        log::info!("{} workers serving", self.slots.len());
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
        if let Some(old) = self.replaces.take() {
            log::info!("upgrade complete: telling the old master (pid {old}) to drain");
            process::signal(old, Signal::SIGTERM);
        }
    }

    fn remove_pid_file(&mut self) {
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.remove();
        }
    }

    /// Reaps every dead child and schedules replacements.
    fn reap_workers(&mut self) {
        while let Some((pid, exit)) = process::reap_any() {
            if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
                log::error!(
                    "upgrade failed: the new master (pid {pid}) exited: {exit}; carrying on"
                );
                self.abandon_upgrade();
                continue;
            }
            let Some(index) = self.workers.iter().position(|w| w.pid == pid) else {
                log::info!("reaped process {pid}: {exit}");
                continue;
            };
            let worker = self.workers.swap_remove(index);
            let cell = self.scoreboard.cell(worker.cell);
            for kind in [ServiceKind::Echo, ServiceKind::Bank] {
                self.finished_requests[kind.index()] += cell
                    .counters(kind)
                    .requests
                    .load(std::sync::atomic::Ordering::Relaxed);
            }
            cell.set_state(WorkerState::Free);
            self.on_worker_exit(worker, exit);
        }
    }

    fn on_worker_exit(&mut self, worker: Worker, exit: Exit) {
        let (slot_index, pid) = (worker.slot, worker.pid);
        if worker.retiring.is_some() {
            log::info!("worker {slot_index} (pid {pid}) exited after draining: {exit}");
            return;
        }
        if matches!(self.phase, Phase::Draining { .. }) {
            log::info!("worker {slot_index} (pid {pid}) exited during the drain: {exit}");
            return;
        }
        let own_failure = exit.is_own_failure();
        let reason = match exit {
            _ if worker.hung => "hung",
            Exit::Code(0) => "exited",
            _ if own_failure => "crashed",
            _ => "killed",
        };
        self.count_restart(reason);
        let Some(slot) = self.slots.get_mut(slot_index) else {
            return;
        };
        let crashed = !worker.ready || (own_failure && worker.started.elapsed() < CRASH_WINDOW);
        slot.crashes = if crashed { slot.crashes + 1 } else { 0 };
        let delay = backoff(slot.crashes);
        slot.start_at = Some(Instant::now() + delay);
        if delay.is_zero() {
            log::warn!("worker {slot_index} (pid {pid}) died: {exit}; replacing it");
        } else {
            log::warn!(
                "worker {slot_index} (pid {pid}) died: {exit}; {} crashes in a row, next start in {delay:?}",
                slot.crashes
            );
        }
    }

    fn count_restart(&mut self, reason: &'static str) {
        *self.restarts.entry(reason).or_insert(0) += 1;
    }

    /// Looks at every worker's scoreboard cell, four times a second: checks the ledger file,
    /// starts a replacement for a worker that drains on its own (someone signalled it
    /// directly), kills a retiring worker still draining after the graceful timeout, and
    /// kills hung workers.
    fn inspect_workers(&mut self) {
        let now = Instant::now();
        if now < self.next_inspection {
            return;
        }
        self.next_inspection = now + INSPECTION_INTERVAL;
        // Logs (once) a ledger file truncated, deleted or replaced under us.
        if let Some(ledger) = &self.ledger {
            ledger.check_file();
        }
        self.replace_self_draining(now);
        self.kill_overdue_retirees(now);
        self.kill_hung_workers();
    }

    /// A worker draining without being told by us (a SIGTERM sent to it directly) no longer
    /// accepts: its slot gets a successor at once, or the slot's queue would go unserved.
    fn replace_self_draining(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        for worker in &mut self.workers {
            let draining = self.scoreboard.cell(worker.cell).state() == WorkerState::Draining;
            if draining && worker.retiring.is_none() {
                log::warn!(
                    "worker {} (pid {}) is draining on its own: starting its successor",
                    worker.slot,
                    worker.pid
                );
                worker.retiring = Some(now);
                if let Some(slot) = self.slots.get_mut(worker.slot) {
                    slot.start_at = Some(now);
                }
            }
        }
    }

    /// A retiring worker gets the graceful timeout to finish, like a shutdown.
    fn kill_overdue_retirees(&mut self, now: Instant) {
        let timeout = self.config.graceful_timeout;
        for worker in &self.workers {
            if worker
                .retiring
                .is_some_and(|since| now.saturating_duration_since(since) > timeout)
            {
                log::warn!(
                    "worker {} (pid {}) still draining after {timeout:?}: killing it",
                    worker.slot,
                    worker.pid
                );
                process::signal(worker.pid, Signal::SIGKILL);
            }
        }
    }

    /// Kills workers that stopped beating for longer than `worker_timeout` (a stopped or
    /// wedged process); their slots are restarted when they are reaped. A worker blocked on
    /// a ledger lock keeps beating, so only the real culprit (often the lock's holder) goes.
    fn kill_hung_workers(&mut self) {
        let Some(timeout) = self.config.worker_timeout else {
            return;
        };
        let limit_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let holders: Vec<i32> = self
            .ledger
            .as_ref()
            .map(|ledger| ledger.lock_holders().iter().map(|h| h.pid).collect())
            .unwrap_or_default();
        let mut hung: Vec<(Pid, usize, u64)> = self
            .workers
            .iter()
            .filter(|w| !w.hung)
            .map(|w| (w.pid, w.slot, self.scoreboard.cell(w.cell).silent_ms()))
            .filter(|&(_, _, silent)| silent > limit_ms)
            .collect();
        // Lock holders first: they are what the others wait for.
        hung.sort_by_key(|(pid, _, _)| !holders.contains(&pid.as_raw()));
        for (pid, slot, silent) in hung {
            log::error!("worker {slot} (pid {pid}) sent no heartbeat for {silent} ms: killing it");
            process::signal(pid, Signal::SIGKILL);
            if let Some(worker) = self.workers.iter_mut().find(|w| w.pid == pid) {
                worker.hung = true;
            }
        }
    }

    /// TTIN: one more slot, with its own listeners, started at once.
    fn add_slot(&mut self) {
        if self.slots.len() >= MAX_WORKERS {
            log::warn!("SIGTTIN: already at {MAX_WORKERS} workers");
            return;
        }
        for service in &mut self.services {
            if let Err(e) = service.group.add_slot() {
                log::error!(
                    "SIGTTIN: cannot add a {} listener: {e}",
                    service.kind.name()
                );
                return;
            }
        }
        self.slots.push(Slot::due(Instant::now()));
        log::info!("SIGTTIN: {} workers", self.slots.len());
    }

    /// TTOU: one slot fewer (never below 1); its worker drains gracefully.
    fn remove_slot(&mut self) {
        if self.slots.len() <= 1 {
            log::warn!("SIGTTOU: keeping the last worker");
            return;
        }
        let slot = self.slots.len() - 1;
        self.slots.pop();
        for service in &mut self.services {
            service.group.remove_slot();
        }
        self.retire_slot_workers(slot);
        log::info!("SIGTTOU: {} workers", self.slots.len());
    }

    /// Retires the (non-retiring) workers of `slot`: SIGUSR1 makes a worker stop accepting
    /// and close each connection as soon as it has answered it.
    fn retire_slot_workers(&mut self, slot: usize) {
        let now = Instant::now();
        for worker in self
            .workers
            .iter_mut()
            .filter(|w| w.slot == slot && w.retiring.is_none())
        {
            worker.retiring = Some(now);
            process::signal(worker.pid, Signal::SIGUSR1);
        }
    }

    /// HUP: re-read the config file. An invalid one changes nothing; a valid one re-binds the
    /// listeners whose address changed, then replaces every worker with one running the new
    /// settings (the old ones drain).
    fn reload(&mut self) {
        let new = match Config::load(&self.cli) {
            Ok(new) => new,
            Err(e) => {
                log::error!("SIGHUP: reload refused, keeping the current settings: {e}");
                return;
            }
        };
        for (name, changed) in [
            ("ledger", new.ledger != self.config.ledger),
            ("max_accounts", new.max_accounts != self.config.max_accounts),
            ("status_addr", new.status_addr != self.config.status_addr),
            ("pid_file", new.pid_file != self.config.pid_file),
        ] {
            if changed {
                log::warn!("SIGHUP: {name} cannot change while running; restart to apply it");
            }
        }
        let services = if new.echo_addr != self.config.echo_addr
            || new.bank_addr != self.config.bank_addr
            || new.workers != self.slots.len()
            || new.accept != self.config.accept
            || new.backlog != self.config.backlog
        {
            match self.rebind(&new) {
                Ok(services) => Some(services),
                Err(e) => {
                    log::error!("SIGHUP: reload refused, keeping the current settings: {e}");
                    return;
                }
            }
        } else {
            None
        };
        log::info!("SIGHUP: reloading with {} workers", new.workers);
        if let Some(services) = services {
            self.services = services;
        }
        let (ledger, max_accounts, status_addr, pid_file) = (
            self.config.ledger.clone(),
            self.config.max_accounts,
            self.config.status_addr,
            self.config.pid_file.clone(),
        );
        self.config = Config {
            ledger,
            max_accounts,
            status_addr,
            pid_file,
            ..new
        };
        let now = Instant::now();
        for worker in &mut self.workers {
            if worker.retiring.is_none() {
                worker.retiring = Some(now);
                process::signal(worker.pid, Signal::SIGUSR1);
            }
        }
        self.slots = (0..self.config.workers).map(|_| Slot::due(now)).collect();
    }

    /// New listener groups for `new`, keeping the sockets of an unchanged address (so no
    /// connection is refused while they are handed over).
    fn rebind(&mut self, new: &Config) -> Result<Vec<Service>, crate::listener::BindError> {
        let mut services = Vec::new();
        for (kind, addr) in [
            (ServiceKind::Echo, new.echo_addr),
            (ServiceKind::Bank, new.bank_addr),
        ] {
            let current = self.services.iter_mut().find(|s| {
                s.kind == kind
                    && addr_matches(s.group.addr, addr)
                    && new.accept == self.config.accept
            });
            let group = match current {
                Some(service) => service.group.resized(new.workers)?,
                None => ListenerGroup::bind(addr, new.workers, new.backlog, new.accept)?,
            };
            services.push(Service { kind, group });
        }
        Ok(services)
    }

    /// USR2: starts the binary on disk as a new master that inherits the listeners and the
    /// ledger. This master serves on until the new one is ready and sends it SIGTERM; if the
    /// new one exits or is not ready within the deadline, it is killed and nothing changes.
    fn upgrade(&mut self) {
        if let Some(upgrade) = &self.upgrade {
            log::warn!(
                "SIGUSR2: an upgrade (pid {}) is already in progress",
                upgrade.pid
            );
            return;
        }
        if let Some(pid_file) = &mut self.pid_file {
            if let Err(e) = pid_file.move_aside() {
                log::error!("SIGUSR2: upgrade refused: {e}");
                return;
            }
        }
        let mut fds: Vec<(std::os::fd::RawFd, &str)> = Vec::new();
        for service in &self.services {
            let name = service.kind.name();
            fds.extend(service.group.raw_fds().into_iter().map(|fd| (fd, name)));
        }
        if let Some(ledger) = &self.ledger {
            fds.push((std::os::fd::AsRawFd::as_raw_fd(ledger), "ledger"));
            fds.push((ledger.guard_fd(), "ledger-guard"));
        }
        match process::fork_with_signals_blocked() {
            Ok(Forked::Child) => {
                let error = inherit::exec_with_fds(&self.exe, &self.args, &fds, self.pid);
                eprintln!(
                    "forkpool-server: cannot start {}: {error}",
                    self.exe.display()
                );
                std::process::exit(127);
            }
            Ok(Forked::Parent(pid)) => {
                log::info!(
                    "SIGUSR2: started {} as the new master (pid {pid})",
                    self.exe.display()
                );
                self.upgrade = Some(Upgrade {
                    pid,
                    deadline: Instant::now() + UPGRADE_TIMEOUT,
                });
            }
            Err(e) => {
                log::error!("SIGUSR2: cannot fork the new master: {e}");
                self.abandon_upgrade();
            }
        }
    }

    /// Kills a new master that did not make it in time.
    fn check_upgrade_deadline(&mut self) {
        let Some(upgrade) = &self.upgrade else {
            return;
        };
        if Instant::now() >= upgrade.deadline {
            log::error!(
                "upgrade failed: the new master (pid {}) was not ready within {UPGRADE_TIMEOUT:?}; killing it",
                upgrade.pid
            );
            process::signal(upgrade.pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(upgrade.pid, None);
            self.abandon_upgrade();
        }
    }

    fn abandon_upgrade(&mut self) {
        self.upgrade = None;
        if let Some(pid_file) = &mut self.pid_file {
            if let Err(e) = pid_file.move_back() {
                log::error!("{e}");
            }
        }
    }

    fn start_due_workers(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let due = self.slots[index].start_at.is_some_and(|at| now >= at);
            let served = self
                .workers
                .iter()
                .any(|w| w.slot == index && w.retiring.is_none());
            if due && !served {
                self.start_worker(index, now);
            }
        }
    }

    fn start_worker(&mut self, index: usize, now: Instant) {
        let in_use: Vec<usize> = self.workers.iter().map(|w| w.cell).collect();
        let Some(cell) = (0..self.scoreboard.capacity()).find(|c| !in_use.contains(c)) else {
            log::warn!("no scoreboard cell free for worker {index}: too many workers draining");
            self.slots[index].start_at = Some(now + FIRST_BACKOFF);
            return;
        };
        self.scoreboard.cell(cell).reset(index);
        match process::fork_with_signals_blocked() {
            Ok(Forked::Child) => {
                let setup = self.take_worker_setup(index, cell);
                std::process::exit(worker::run(setup));
            }
            Ok(Forked::Parent(pid)) => {
                log::info!("worker {index} started (pid {pid})");
                self.slots[index].start_at = None;
                self.workers.push(Worker {
                    pid,
                    slot: index,
                    cell,
                    started: now,
                    ready: false,
                    retiring: None,
                    hung: false,
                });
            }
            Err(e) => {
                log::error!("cannot fork worker {index}: {e}; retrying");
                self.slots[index].start_at = Some(now + MAX_BACKOFF);
            }
        }
    }

    /// In a freshly forked child: drops everything that is the master's business (its poll,
    /// its signal registrations, the status pipe's reading end, the other slots' listeners,
    /// the pid file) and keeps what the worker of slot `index` needs.
    fn take_worker_setup(&mut self, index: usize, cell: usize) -> WorkerSetup {
        drop(self.io.take());
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.forget();
        }
        let listeners = self
            .services
            .drain(..)
            .filter_map(|mut service| {
                let listener = service.group.take_slot(index)?;
                Some((service.kind, listener))
            })
            .collect();
        let max_requests = match self.config.max_requests {
            0 => None,
            n => Some(n + jitter(self.config.max_requests_jitter)),
        };
        WorkerSetup {
            slot: index,
            master: self.pid,
            listeners,
            status: self
                .status_sender
                .take()
                .expect("the master keeps the status sender while it runs"),
            ledger: self
                .ledger
                .take()
                .expect("the master keeps the ledger while it runs"),
            cell: self.scoreboard.cell(cell),
            settings: WorkerSettings {
                max_line: self.config.max_line,
                max_connections: self.config.max_connections,
                idle_timeout: self.config.idle_timeout,
                graceful_timeout: self.config.graceful_timeout,
                output_limit: self.config.output_limit,
                max_requests,
                heartbeat: heartbeat_interval(self.config.worker_timeout),
            },
        }
    }

    /// Answers status-page connections from the scoreboard.
    fn serve_status(&mut self, tokens: &[Token]) {
        let Some(io) = self.io.as_mut() else {
            return;
        };
        let Some(server) = io.status_http.as_mut() else {
            return;
        };
        if tokens.is_empty() {
            return;
        }
        let workers: Vec<WorkerView> = self
            .workers
            .iter()
            .map(|w| WorkerView {
                slot: w.slot,
                pid: w.pid.as_raw(),
                retiring: w.retiring.is_some(),
                cell: self.scoreboard.cell(w.cell),
            })
            .collect();
        let view = PoolView {
            pid: self.pid.as_raw(),
            configured_workers: self.slots.len(),
            workers: &workers,
            restarts: &self.restarts,
            finished_requests: self.finished_requests,
            ledger: self.ledger.as_ref().map(Ledger::overview),
        };
        server.on_events(tokens, io.poll.registry(), &view);
    }
}

impl Slot {
    fn due(now: Instant) -> Slot {
        Slot {
            crashes: 0,
            start_at: Some(now),
        }
    }
}

/// The listeners of every service: the inherited ones where there are any, else bound to the
/// configured address.
fn listen(config: &Config, inherited: &mut Inherited) -> Result<Vec<Service>, StartError> {
    let mut services = Vec::new();
    for (kind, addr, fds) in [
        (
            ServiceKind::Echo,
            config.echo_addr,
            std::mem::take(&mut inherited.echo),
        ),
        (
            ServiceKind::Bank,
            config.bank_addr,
            std::mem::take(&mut inherited.bank),
        ),
    ] {
        let group = if fds.is_empty() {
            ListenerGroup::bind(addr, config.workers, config.backlog, config.accept)?
        } else {
            let group = ListenerGroup::inherit(fds, config.workers, config.backlog)?;
            log::info!("{} listens on inherited socket {}", kind.name(), group.addr);
            group
        };
        services.push(Service { kind, group });
    }
    Ok(services)
}

/// Tells systemd (if it started us with `Type=notify`) about a state change.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// Does a configured address (possibly port 0) name the socket bound as `bound`?
fn addr_matches(bound: std::net::SocketAddr, configured: std::net::SocketAddr) -> bool {
    bound.ip() == configured.ip() && (configured.port() == 0 || bound.port() == configured.port())
}

#[derive(PartialEq, Eq)]
enum Stop {
    Now,
    Later,
}

/// How often a worker beats: at least once a second, and four times per worker timeout.
fn heartbeat_interval(worker_timeout: Option<Duration>) -> Duration {
    let second = Duration::from_secs(1);
    worker_timeout.map_or(second, |timeout| (timeout / 4).min(second))
}

/// No delay for a first crash, then 100 ms doubling up to 5 s.
fn backoff(crashes: u32) -> Duration {
    if crashes <= 1 {
        return Duration::ZERO;
    }
    FIRST_BACKOFF
        .saturating_mul(1 << (crashes - 2).min(16))
        .min(MAX_BACKOFF)
}

/// A pseudo-random number in 0..=max, different in each worker (seeded by pid and time).
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % (max + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_then_doubles_to_a_cap() {
        let delays: Vec<u64> = (0..10).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(delays, [0, 0, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn jitter_stays_in_range() {
        assert_eq!(jitter(0), 0);
        assert!((0..100).all(|_| jitter(5) <= 5));
    }
}
