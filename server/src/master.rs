//! The master process: it binds the listeners, forks the workers, and supervises them.
//!
//! The loop is a list of verbs run each time something happens: handle the queued signals,
//! read worker reports, reap dead children, start the workers that are due, announce
//! readiness, and finish a drain. Signal handlers do no work: signal-hook turns each signal
//! into a readable event on the loop's poll.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGQUIT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use forkpool_ledger::{Ledger, LedgerOptions};

use crate::config::Config;
use crate::listener::ListenerGroup;
use crate::master_link::{self, StatusReceiver, StatusSender};
use crate::process::{self, Exit, Forked};
use crate::service::ServiceKind;
use crate::worker::{self, WorkerSettings, WorkerSetup};

const SIGNAL_TOKEN: Token = Token(0);
const STATUS_TOKEN: Token = Token(1);
/// A worker that fails on its own within this time of starting counts as a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(10);
/// Delay before the second start of a crash-looping slot; doubles with each crash.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A listening service: its kind and one listener per worker slot.
struct Service {
    kind: ServiceKind,
    group: ListenerGroup,
}

/// One place in the pool; a dead worker's replacement takes over its slot and listeners.
#[derive(Debug, Default)]
struct Slot {
    worker: Option<RunningWorker>,
    /// Consecutive crashes (deaths before ready, or own failures soon after start).
    crashes: u32,
    /// When to start the next worker, if the slot is empty.
    start_at: Option<Instant>,
}

#[derive(Debug)]
struct RunningWorker {
    pid: Pid,
    started: Instant,
    ready: bool,
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
    status: StatusReceiver,
}

pub struct Master {
    config: Config,
    io: Option<MasterIo>,
    /// The workers' end of the status pipe, handed to each new worker.
    status_sender: Option<StatusSender>,
    /// The bank ledger, opened (and recovered) before any fork; every worker inherits the
    /// mapping. The master itself never operates on it.
    ledger: Option<Ledger>,
    services: Vec<Service>,
    slots: Vec<Slot>,
    phase: Phase,
    pid: Pid,
    announced: bool,
}

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    #[error(transparent)]
    Ledger(#[from] forkpool_ledger::LedgerError),
    #[error("the ledger cannot be audited: {0}")]
    Audit(String),
    #[error("cannot set up the master's event loop: {0}")]
    Io(#[from] io::Error),
}

impl Master {
    /// Binds every listener; nothing is forked yet.
    pub fn new(config: Config) -> Result<Master, StartError> {
        let workers = config.workers;
        let services = vec![
            Service {
                kind: ServiceKind::Echo,
                group: ListenerGroup::bind(
                    config.echo_addr,
                    workers,
                    config.backlog,
                    config.accept,
                )?,
            },
            Service {
                kind: ServiceKind::Bank,
                group: ListenerGroup::bind(
                    config.bank_addr,
                    workers,
                    config.backlog,
                    config.accept,
                )?,
            },
        ];
        let ledger = Ledger::open(
            &config.ledger,
            &LedgerOptions {
                max_accounts: config.max_accounts,
                fsync: config.fsync,
                ..LedgerOptions::default()
            },
        )?;
        let audit = ledger
            .audit()
            .map_err(|e| StartError::Audit(e.to_string()))?;
        log::info!(
            "ledger {}: {} accounts, total {}, fsync {}",
            config.ledger.display(),
            audit.accounts,
            audit.total,
            config.fsync
        );
        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGCHLD])?;
        poll.registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)?;
        let (status, status_sender) = master_link::status_pipe()?;
        poll.registry().register(
            &mut SourceFd(&status.raw_fd()),
            STATUS_TOKEN,
            Interest::READABLE,
        )?;
        Ok(Master {
            io: Some(MasterIo {
                poll,
                signals,
                status,
            }),
            ledger: Some(ledger),
            status_sender: Some(status_sender),
            services,
            slots: (0..workers).map(|_| Slot::default()).collect(),
            phase: Phase::Running,
            pid: nix::unistd::getpid(),
            announced: false,
            config,
        })
    }

    /// Supervises until shutdown. Returns only in the master; a forked worker exits inside.
    pub fn run(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for slot in &mut self.slots {
            slot.start_at = Some(now);
        }
        let mut events = Events::with_capacity(64);
        loop {
            self.start_due_workers();
            self.announce_ready();
            if self.drain_finished() {
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
            let ready = io.status.ready_workers();
            let signals: Vec<i32> = io.signals.pending().collect();
            self.mark_ready(&ready);
            for signal in signals {
                if self.on_signal(signal) == Stop::Now {
                    self.stop_now();
                    return Ok(());
                }
            }
            self.reap_workers();
        }
    }

    fn on_signal(&mut self, signal: i32) -> Stop {
        match signal {
            SIGTERM | SIGINT => match self.phase {
                Phase::Running => {
                    self.start_drain();
                    Stop::Later
                }
                Phase::Draining { .. } => {
                    log::warn!("second shutdown signal: stopping now");
                    Stop::Now
                }
            },
            SIGQUIT => {
                log::info!("SIGQUIT: stopping now");
                Stop::Now
            }
            // SIGCHLD: reaping follows every wake-up.
            _ => Stop::Later,
        }
    }

    fn start_drain(&mut self) {
        let deadline = Instant::now() + self.config.graceful_timeout;
        log::info!(
            "draining: waiting up to {:?} for {} workers",
            self.config.graceful_timeout,
            self.live_workers().count()
        );
        self.phase = Phase::Draining { deadline };
        // Our copies of the listeners would keep queueing connections that nobody accepts.
        self.services.clear();
        for slot in &mut self.slots {
            slot.start_at = None;
        }
        self.signal_workers(Signal::SIGTERM);
    }

    /// Kills every worker, reaps them all and returns (SIGQUIT, second TERM, drain timeout).
    fn stop_now(&mut self) {
        self.signal_workers(Signal::SIGKILL);
        for slot in &mut self.slots {
            if let Some(worker) = slot.worker.take() {
                match nix::sys::wait::waitpid(worker.pid, None) {
                    Ok(status) => log::info!("worker {} killed: {status:?}", worker.pid),
                    Err(e) => log::warn!("waiting for worker {}: {e}", worker.pid),
                }
            }
        }
        while process::reap_any().is_some() {}
        log::info!("stopped");
    }

    fn drain_finished(&mut self) -> bool {
        let Phase::Draining { deadline } = self.phase else {
            return false;
        };
        if self.live_workers().count() == 0 {
            log::info!("every worker has drained; exiting");
            return true;
        }
        if Instant::now() >= deadline {
            log::warn!(
                "graceful timeout: killing {} workers still draining",
                self.live_workers().count()
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
        self.slots
            .iter()
            .filter_map(|slot| slot.start_at)
            .chain(drain)
            .min()
            .map(|wake| wake.saturating_duration_since(now))
    }

    fn live_workers(&self) -> impl Iterator<Item = &RunningWorker> {
        self.slots.iter().filter_map(|slot| slot.worker.as_ref())
    }

    fn signal_workers(&self, signal: Signal) {
        for worker in self.live_workers() {
            process::signal(worker.pid, signal);
        }
    }

    fn mark_ready(&mut self, pids: &[Pid]) {
        for pid in pids {
            if let Some(worker) = self
                .slots
                .iter_mut()
                .filter_map(|slot| slot.worker.as_mut())
                .find(|worker| worker.pid == *pid)
            {
                worker.ready = true;
            }
        }
    }

    /// Prints the ready line once every slot has a worker serving.
    fn announce_ready(&mut self) {
        if self.announced || !matches!(self.phase, Phase::Running) {
            return;
        }
        let all_ready = self
            .slots
            .iter()
            .all(|slot| slot.worker.as_ref().is_some_and(|w| w.ready));
        if !all_ready {
            return;
        }
        self.announced = true;
        let mut line = String::from("forkpool ready");
        for service in &self.services {
            line.push_str(&format!(" {}={}", service.kind.name(), service.group.addr));
        }
        line.push_str(&format!(" pid={}", self.pid));
        log::info!("{} workers serving", self.slots.len());
        // A closed stdout must not stop the server: the line is a courtesy to scripts.
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    }

    /// Reaps every dead child and schedules replacements.
    fn reap_workers(&mut self) {
        while let Some((pid, exit)) = process::reap_any() {
            let Some(index) = self
                .slots
                .iter()
                .position(|slot| slot.worker.as_ref().is_some_and(|w| w.pid == pid))
            else {
                log::info!("reaped process {pid}: {exit}");
                continue;
            };
            self.on_worker_exit(index, pid, exit);
        }
    }

    fn on_worker_exit(&mut self, index: usize, pid: Pid, exit: Exit) {
        let slot = &mut self.slots[index];
        let Some(worker) = slot.worker.take() else {
            return;
        };
        if let Phase::Draining { .. } = self.phase {
            log::info!("worker {index} (pid {pid}) exited: {exit}");
            return;
        }
        let crashed =
            !worker.ready || (exit.is_own_failure() && worker.started.elapsed() < CRASH_WINDOW);
        slot.crashes = if crashed { slot.crashes + 1 } else { 0 };
        let delay = backoff(slot.crashes);
        slot.start_at = Some(Instant::now() + delay);
        if delay.is_zero() {
            log::warn!("worker {index} (pid {pid}) died: {exit}; replacing it");
        } else {
            log::warn!(
                "worker {index} (pid {pid}) died: {exit}; {} crashes in a row, next start in {delay:?}",
                slot.crashes
            );
        }
    }

    fn start_due_workers(&mut self) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.worker.is_none() && slot.start_at.is_some_and(|at| now >= at) {
                self.start_worker(index, now);
            }
        }
    }

    fn start_worker(&mut self, index: usize, now: Instant) {
        match process::fork_with_signals_blocked() {
            Ok(Forked::Child) => {
                let setup = self.take_worker_setup(index);
                std::process::exit(worker::run(setup));
            }
            Ok(Forked::Parent(pid)) => {
                log::info!("worker {index} started (pid {pid})");
                let slot = &mut self.slots[index];
                slot.start_at = None;
                slot.worker = Some(RunningWorker {
                    pid,
                    started: now,
                    ready: false,
                });
            }
            Err(e) => {
                log::error!("cannot fork worker {index}: {e}; retrying");
                self.slots[index].start_at = Some(now + MAX_BACKOFF);
            }
        }
    }

    /// In a freshly forked child: drops everything that is the master's business (its poll,
    /// its signal registrations, the status pipe's reading end, the other slots' listeners)
    /// and keeps what the worker of slot `index` needs.
    fn take_worker_setup(&mut self, index: usize) -> WorkerSetup {
        drop(self.io.take());
        let listeners = self
            .services
            .drain(..)
            .map(|mut service| (service.kind, service.group.slots.swap_remove(index)))
            .collect();
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
            settings: WorkerSettings {
                max_line: self.config.max_line,
                max_connections: self.config.max_connections,
                idle_timeout: self.config.idle_timeout,
                graceful_timeout: self.config.graceful_timeout,
                output_limit: self.config.output_limit,
            },
        }
    }
}

#[derive(PartialEq, Eq)]
enum Stop {
    Now,
    Later,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_then_doubles_to_a_cap() {
        let delays: Vec<u64> = (0..10).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(delays, [0, 0, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
