//! The status page, served by the master from the scoreboard (so it costs the serving path
//! nothing): `GET /metrics` in the Prometheus text format and `GET /status`, a plain-text
//! table like Apache's mod_status. One request per connection, answered and closed.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use forkpool_ledger::{Health, Overview};
use forkpool_pgledger::{PgStats, LATENCY_BUCKETS_US};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use crate::pool::{RestartCounts, RestartReason};
use crate::proxy;
use crate::scoreboard::{Lasting, ServiceTotals, WorkerCell, WorkerState};
use crate::service::ServiceKind;

/// Longest request head read; a longer one gets 431.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Status connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 64;

/// A live worker as the status page shows it.
pub struct WorkerView {
    pub slot: usize,
    pub pid: i32,
    pub retiring: bool,
    pub cell: &'static WorkerCell,
}

/// Everything the page reports, gathered by the master.
pub struct PoolView<'a> {
    pub pid: i32,
    pub configured_workers: usize,
    pub workers: &'a [WorkerView],
    /// Worker exits by reason.
    pub restarts: &'a RestartCounts,
    /// What workers already gone did, per service (so totals never go backwards).
    pub finished: [ServiceTotals; ServiceKind::ALL.len()],
    /// The ledger's health and a lock-free snapshot of it (not one consistent instant).
    pub ledger: Option<Overview>,
    /// The job queues' figures, summed, read without the store lock.
    pub queue: Option<forkpool_queue::Overview>,
    /// With a PostgreSQL ledger: the database pools of every worker, live or gone, summed.
    pub db: Option<PgStats>,
}

struct StatusConn {
    stream: TcpStream,
    accepted: std::time::Instant,
    request: Vec<u8>,
    response: Vec<u8>,
    sent: usize,
}

/// The status listener and its connections.
pub struct StatusServer {
    listener: TcpListener,
    addr: SocketAddr,
    /// Token of the listener; connection `i` has token `first_token + 1 + i`.
    first_token: usize,
    conns: Vec<Option<StatusConn>>,
}

impl StatusServer {
    pub fn bind(
        addr: SocketAddr,
        registry: &Registry,
        first_token: usize,
    ) -> io::Result<StatusServer> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, Token(first_token), Interest::READABLE)?;
        Ok(StatusServer {
            addr: listener.local_addr()?,
            listener,
            first_token,
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Handles readiness of the listener or of status connections.
    pub fn on_events(&mut self, tokens: &[Token], registry: &Registry, view: &PoolView<'_>) {
        for token in tokens {
            if token.0 == self.first_token {
                self.accept(registry);
            } else if let Some(index) = token.0.checked_sub(self.first_token + 1) {
                self.drive(index, registry, view);
            }
        }
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            // Full: the oldest connection makes room (a client that connects and sends
            // nothing must not lock the page out).
            let index = match self.conns.iter().position(Option::is_none) {
                Some(index) => index,
                None => {
                    let oldest = (0..self.conns.len())
                        .min_by_key(|&i| self.conns[i].as_ref().map(|c| c.accepted))
                        .unwrap_or(0);
                    if let Some(mut conn) = self.conns[oldest].take() {
                        let _ = registry.deregister(&mut conn.stream);
                    }
                    oldest
                }
            };
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let token = Token(self.first_token + 1 + index);
                    if registry
                        .register(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        self.conns[index] = Some(StatusConn {
                            stream,
                            accepted: std::time::Instant::now(),
                            request: Vec::new(),
                            response: Vec::new(),
                            sent: 0,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn drive(&mut self, index: usize, registry: &Registry, view: &PoolView<'_>) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let done = match conn.progress(view) {
            Ok(true) => true,
            Ok(false) => {
                let interest = if conn.response.is_empty() {
                    Interest::READABLE
                } else {
                    Interest::READABLE | Interest::WRITABLE
                };
                let token = Token(self.first_token + 1 + index);
                registry
                    .reregister(&mut conn.stream, token, interest)
                    .is_err()
            }
            Err(_) => true,
        };
        if done {
            if let Some(mut conn) = self.conns[index].take() {
                let _ = registry.deregister(&mut conn.stream);
            }
        }
    }
}

impl StatusConn {
    /// Reads the request, then writes the response; true once finished.
    fn progress(&mut self, view: &PoolView<'_>) -> io::Result<bool> {
        if self.response.is_empty() {
            let mut buf = [0u8; 2048];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return Ok(true),
                    Ok(n) => self.request.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                if self.request.len() > MAX_REQUEST_BYTES {
                    break;
                }
            }
            let complete = self.request.windows(4).any(|w| w == b"\r\n\r\n")
                || self.request.windows(2).any(|w| w == b"\n\n");
            if !complete && self.request.len() <= MAX_REQUEST_BYTES {
                return Ok(false);
            }
            self.response = respond(&self.request, view);
        }
        while self.sent < self.response.len() {
            match self.stream.write(&self.response[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // The request head was read whole, so closing cannot reset the response.
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Ok(true)
    }
}

/// The full HTTP response to a request head.
fn respond(request: &[u8], view: &PoolView<'_>) -> Vec<u8> {
    if request.len() > MAX_REQUEST_BYTES {
        return http(431, "text/plain", "request header too large\n");
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let (method, target) = (fields.next(), fields.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => http(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &metrics(view),
        ),
        (Some(b"GET"), Some(b"/status")) => {
            http(200, "text/plain; charset=utf-8", &status_table(view))
        }
        (Some(b"GET"), _) => http(404, "text/plain", "not found: try /metrics or /status\n"),
        _ => http(405, "text/plain", "only GET is served\n"),
    }
}

fn http(code: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The Prometheus text exposition.
pub fn metrics(view: &PoolView<'_>) -> String {
    let mut out = String::new();
    family_block(
        &mut out,
        "forkpool_workers_configured",
        "gauge",
        "Worker slots in the pool.",
        |b| {
            let _ = writeln!(b, "forkpool_workers_configured {}", view.configured_workers);
        },
    );
    family_block(
        &mut out,
        "forkpool_workers",
        "gauge",
        "Live worker processes by state.",
        |b| {
            for state in WorkerState::LIVE {
                let count = view
                    .workers
                    .iter()
                    .filter(|w| w.cell.state() == state)
                    .count();
                let state = state.name();
                let _ = writeln!(b, "forkpool_workers{{state=\"{state}\"}} {count}");
            }
        },
    );
    family_block(
        &mut out,
        "forkpool_worker_restarts_total",
        "counter",
        "Worker exits by reason.",
        |b| {
            for reason in RestartReason::ALL {
                let _ = writeln!(
                    b,
                    "forkpool_worker_restarts_total{{reason=\"{reason}\"}} {}",
                    view.restarts.get(reason)
                );
            }
        },
    );
    let totals = service_totals(view);
    for (name, help, count) in [
        (
            "forkpool_requests_total",
            "Requests served (lines), all workers ever.",
            Lasting::Requests,
        ),
        (
            "forkpool_connections_handed_over_total",
            "Connections a replaced worker passed to a successor, all workers ever.",
            Lasting::HandedOver,
        ),
        (
            "forkpool_connections_closed_by_replacement_total",
            "Connections closed because their worker was replaced (no successor took them).",
            Lasting::ClosedByReplacement,
        ),
        (
            "forkpool_tls_handshakes_total",
            "TLS handshakes completed.",
            Lasting::TlsHandshakes,
        ),
        (
            "forkpool_tls_handshake_failures_total",
            "TLS handshakes that failed (plain-text or distrustful clients, garbage).",
            Lasting::TlsHandshakeFailures,
        ),
    ] {
        family_block(&mut out, name, "counter", help, |b| {
            for kind in ServiceKind::ALL {
                let value = totals[kind.index()].get(count);
                let _ = writeln!(b, "{name}{{service=\"{}\"}} {value}", kind.name());
            }
        });
    }
    family_block(
        &mut out,
        "forkpool_proxy_headers_total",
        "counter",
        "PROXY protocol headers on services behind a proxy, by outcome (v1, v2, local: \
         accepted; missing, malformed, truncated, timeout: connection closed).",
        |b| {
            for kind in ServiceKind::ALL {
                for outcome in proxy::Outcome::ALL {
                    let value = totals[kind.index()].get(Lasting::ProxyHeaders(outcome));
                    let _ = writeln!(
                        b,
                        "forkpool_proxy_headers_total{{service=\"{}\",result=\"{}\"}} {value}",
                        kind.name(),
                        outcome.name()
                    );
                }
            }
        },
    );
    for (kind, title) in [(ServiceKind::Bank, "Bank"), (ServiceKind::Queue, "Queue")] {
        let counts = totals[kind.index()];
        let auth = format!("forkpool_{}_auth_total", kind.name());
        family_block(
            &mut out,
            &auth,
            "counter",
            &format!(
                "{title} AUTH requests by outcome (throttled: refused unchecked, too many \
                 failures)."
            ),
            |b| {
                for (result, count) in [
                    ("accepted", Lasting::AuthAccepted),
                    ("failed", Lasting::AuthFailed),
                    ("throttled", Lasting::AuthThrottled),
                ] {
                    let value = counts.get(count);
                    let _ = writeln!(b, "{auth}{{result=\"{result}\"}} {value}");
                }
            },
        );
        let denied = format!("forkpool_{}_denied_total", kind.name());
        family_block(
            &mut out,
            &denied,
            "counter",
            &format!("{title} requests denied: not authenticated, or beyond the user's rights."),
            |b| {
                let _ = writeln!(b, "{denied} {}", counts.get(Lasting::Denied));
            },
        );
    }
    per_worker(
        &mut out,
        view,
        "forkpool_worker_open_connections",
        "gauge",
        "Open connections per worker.",
        |c| c.open_connections.load(Relaxed),
    );
    per_worker(
        &mut out,
        view,
        "forkpool_worker_waiting_connections",
        "gauge",
        "Connections per worker whose request waits for a wake-up (a blocking request, a database reply).",
        |c| c.waiting.load(Relaxed),
    );
    per_worker(
        &mut out,
        view,
        "forkpool_worker_requests_total",
        "counter",
        "Requests served per live worker.",
        |c| c.requests.load(Relaxed),
    );
    per_worker(
        &mut out,
        view,
        "forkpool_worker_accepted_connections_total",
        "counter",
        "Connections accepted per live worker.",
        |c| c.accepted.load(Relaxed),
    );
    per_worker(
        &mut out,
        view,
        "forkpool_worker_received_bytes_total",
        "counter",
        "Bytes read from clients per live worker.",
        |c| c.bytes_in.load(Relaxed),
    );
    per_worker(
        &mut out,
        view,
        "forkpool_worker_sent_bytes_total",
        "counter",
        "Bytes written to clients per live worker.",
        |c| c.bytes_out.load(Relaxed),
    );
    if let Some(ledger) = view.ledger {
        ledger_metrics(&mut out, &ledger);
    }
    if let Some(queue) = view.queue {
        queue_metrics(&mut out, &queue);
    }
    if let Some(db) = &view.db {
        db_metrics(&mut out, db);
    }
    out
}

/// The job queues' families (every queue summed; STATS gives one queue's).
fn queue_metrics(out: &mut String, queue: &forkpool_queue::Overview) {
    family_block(
        out,
        "forkpool_queue_failed",
        "gauge",
        "1 once the queue store file was truncated, deleted, replaced or written to under the \
         server (queue requests answer ERR internal until a restart).",
        |b| {
            let _ = writeln!(b, "forkpool_queue_failed {}", u8::from(queue.failed));
        },
    );
    if queue.failed {
        return;
    }
    let gauges = [
        ("forkpool_queue_queues", "Job queues created.", queue.queues),
        (
            "forkpool_queue_depth",
            "Jobs ready to be fetched.",
            queue.depth,
        ),
        (
            "forkpool_queue_in_flight",
            "Jobs fetched and not yet done.",
            queue.in_flight,
        ),
    ];
    for (name, help, value) in gauges {
        family_block(out, name, "gauge", help, |b| {
            let _ = writeln!(b, "{name} {value}");
        });
    }
    family_block(
        out,
        "forkpool_queue_waiting",
        "gauge",
        "Requests parked on the queues, by kind.",
        |b| {
            for (kind, value) in [
                ("get", queue.waiting_getters),
                ("put", queue.waiting_putters),
                ("join", queue.waiting_joiners),
            ] {
                let _ = writeln!(b, "forkpool_queue_waiting{{kind=\"{kind}\"}} {value}");
            }
        },
    );
    let counters = [
        ("forkpool_queue_put_total", "Jobs put.", queue.put),
        ("forkpool_queue_done_total", "Jobs done.", queue.done),
        (
            "forkpool_queue_recoveries_total",
            "Queue operations rolled back after their process died.",
            queue.recoveries,
        ),
    ];
    for (name, help, value) in counters {
        family_block(out, name, "counter", help, |b| {
            let _ = writeln!(b, "{name} {value}");
        });
    }
}

/// The PostgreSQL ledger's families: the workers' database pools summed.
fn db_metrics(out: &mut String, db: &PgStats) {
    for (name, kind, help, value) in [
        (
            "forkpool_ledger_db_connections",
            "gauge",
            "Database connections the workers' pools are configured to open.",
            db.connections,
        ),
        (
            "forkpool_ledger_db_connections_open",
            "gauge",
            "Database connections open right now.",
            db.connections_up,
        ),
        (
            "forkpool_ledger_db_in_flight",
            "gauge",
            "Bank requests submitted to the database and not answered yet.",
            db.in_flight,
        ),
        (
            "forkpool_ledger_db_errors_total",
            "counter",
            "Failed connection attempts, broken connections and database errors.",
            db.errors,
        ),
        (
            "forkpool_ledger_db_retries_total",
            "counter",
            "Transactions tried again (serialization failure, deadlock, lost race).",
            db.retries,
        ),
        (
            "forkpool_ledger_db_unavailable_total",
            "counter",
            "Bank requests answered ERR unavailable (nothing changed).",
            db.unavailable,
        ),
        (
            "forkpool_ledger_db_resolved_total",
            "counter",
            "Changes whose commit outcome was unknown, read back from the database.",
            db.resolved,
        ),
    ] {
        family_block(out, name, kind, help, |b| {
            let _ = writeln!(b, "{name} {value}");
        });
    }
    let name = "forkpool_ledger_db_request_seconds";
    family_block(
        out,
        name,
        "histogram",
        "Time from a bank request's submission to the database pool to its reply.",
        |b| {
            let mut cumulative = 0;
            for (bound, count) in LATENCY_BUCKETS_US.iter().zip(&db.latency) {
                cumulative += count;
                let le = *bound as f64 / 1e6;
                let _ = writeln!(b, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
            }
            let total: u64 = db.latency.iter().sum();
            let _ = writeln!(b, "{name}_bucket{{le=\"+Inf\"}} {total}");
            let sum = db.latency_sum_us as f64 / 1e6;
            let _ = writeln!(b, "{name}_sum {sum}\n{name}_count {total}");
        },
    );
}

/// The ledger's families: whether its file failed, and its figures while they can be read.
fn ledger_metrics(out: &mut String, ledger: &Overview) {
    family_block(
        out,
        "forkpool_ledger_failed",
        "gauge",
        "1 once the ledger file was truncated, deleted or replaced under the server (bank \
         requests answer ERR internal until a restart).",
        |b| {
            let failed = u8::from(ledger.health != Health::Healthy);
            let _ = writeln!(b, "forkpool_ledger_failed {failed}");
        },
    );
    if let Some(audit) = ledger.audit {
        family_block(
            out,
            "forkpool_ledger_accounts",
            "gauge",
            "Open bank accounts.",
            |b| {
                let _ = writeln!(b, "forkpool_ledger_accounts {}", audit.accounts);
            },
        );
        family_block(
            out,
            "forkpool_ledger_total_balance",
            "gauge",
            "Sum of all balances (minor units).",
            |b| {
                let _ = writeln!(b, "forkpool_ledger_total_balance {}", audit.total);
            },
        );
    }
    if let Some(recoveries) = ledger.recoveries {
        family_block(
            out,
            "forkpool_ledger_lock_recoveries_total",
            "counter",
            "Ledger locks repaired after a holder died.",
            |b| {
                let _ = writeln!(b, "forkpool_ledger_lock_recoveries_total {recoveries}");
            },
        );
    }
}

/// Per service, the live workers' counts plus those of the workers already gone.
fn service_totals(view: &PoolView<'_>) -> [ServiceTotals; ServiceKind::ALL.len()] {
    let mut totals = view.finished;
    for worker in view.workers {
        for kind in ServiceKind::ALL {
            totals[kind.index()].add(ServiceTotals::of(worker.cell.counters(kind)));
        }
    }
    totals
}

fn family_block(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    body: impl FnOnce(&mut String),
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    body(out);
}

fn per_worker(
    out: &mut String,
    view: &PoolView<'_>,
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&crate::scoreboard::ServiceCounters) -> u64,
) {
    family_block(out, name, kind, help, |b| {
        for worker in view.workers {
            for service in ServiceKind::ALL {
                let _ = writeln!(
                    b,
                    "{name}{{slot=\"{}\",pid=\"{}\",service=\"{}\"}} {}",
                    worker.slot,
                    worker.pid,
                    service.name(),
                    value(worker.cell.counters(service))
                );
            }
        }
    });
}

/// The human-readable table.
pub fn status_table(view: &PoolView<'_>) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "forkpool master pid {}: {} worker slots, {} live workers",
        view.pid,
        view.configured_workers,
        view.workers.len()
    );
    if let Some(ledger) = view.ledger {
        if let Health::Failed(fault) = ledger.health {
            let refused = if fault.refuses_reads() {
                "every bank request answers"
            } else {
                "writes answer"
            };
            let _ = writeln!(
                out,
                "ledger: FAILED: {fault}; {refused} ERR internal until the server is restarted"
            );
        }
        if let Some(audit) = ledger.audit {
            let _ = writeln!(
                out,
                "ledger: {} accounts, total {}",
                audit.accounts, audit.total
            );
        }
    }
    if view.queue.is_some_and(|queue| queue.failed) {
        let _ = writeln!(
            out,
            "queue store: FAILED; every queue request answers ERR internal until the server is \
             restarted"
        );
    }
    if let Some(db) = &view.db {
        let _ = writeln!(
            out,
            "ledger on PostgreSQL: {} of {} connections open, {} requests in flight, {} \
             answered, {} unavailable, {} errors, {} retries",
            db.connections_up,
            db.connections,
            db.in_flight,
            db.completed,
            db.unavailable,
            db.errors,
            db.retries
        );
    }
    let _ = writeln!(
        out,
        "\n{:>4} {:>8} {:<9} {:>10} {:>10} {:>6} {:>12} {:>6} {:>12} {:>14} {:>14}",
        "slot",
        "pid",
        "state",
        "heartbeat",
        "started",
        "echo",
        "echo req",
        "bank",
        "bank req",
        "bytes in",
        "bytes out"
    );
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for worker in view.workers {
        let cell = worker.cell;
        let echo = cell.counters(ServiceKind::Echo);
        let bank = cell.counters(ServiceKind::Bank);
        let state = if worker.retiring && cell.state() != WorkerState::Draining {
            "retiring"
        } else {
            cell.state().name()
        };
        let _ = writeln!(
            out,
            "{:>4} {:>8} {:<9} {:>8}ms {:>9}s {:>6} {:>12} {:>6} {:>12} {:>14} {:>14}",
            worker.slot,
            worker.pid,
            state,
            cell.silence().as_millis(),
            now_unix.saturating_sub(cell.started_unix.load(Relaxed)),
            echo.open_connections.load(Relaxed),
            echo.requests.load(Relaxed),
            bank.open_connections.load(Relaxed),
            bank.requests.load(Relaxed),
            echo.bytes_in.load(Relaxed) + bank.bytes_in.load(Relaxed),
            echo.bytes_out.load(Relaxed) + bank.bytes_out.load(Relaxed),
        );
    }
    out
}
