//! Recording a history of queue calls for the checker in `queue_model`: one monotonic clock
//! for every client thread, each request with the instants it was sent and its reply read,
//! the connections lost (dropped by the client, or closed by the server), the workers killed,
//! and the counters at the end. It records what clients saw; it judges nothing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::connect;
use crate::queue_model::{Counters, Event, LossCause, Nanos};

/// A history being recorded by many threads.
pub struct History {
    /// The clock's zero.
    start: Instant,
    events: Mutex<Vec<Event>>,
    /// Connection ids, unique within the history.
    next_conn: AtomicU64,
}

impl History {
    pub fn new() -> Arc<History> {
        Arc::new(History {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
        })
    }

    /// The instant now, on the history's clock.
    pub fn now(&self) -> Nanos {
        u64::try_from(self.start.elapsed().as_nanos()).expect("a test lasts less than 584 years")
    }

    fn push(&self, event: Event) {
        self.events.lock().expect("no recorder panics").push(event);
    }

    /// A new recorded connection to `addr`.
    pub fn connect(self: &Arc<Self>, addr: SocketAddr) -> RecordedConn {
        let stream = connect(addr);
        let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        RecordedConn {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            history: Arc::clone(self),
            last_alive: self.now(),
            lost: false,
            stream,
            reader,
        }
    }

    /// Records the kill, then SIGKILLs `pid`.
    pub fn kill(&self, pid: Pid) {
        self.push(Event::Kill {
            pid: pid.as_raw(),
            at: self.now(),
        });
        kill(pid, Signal::SIGKILL).expect("SIGKILL a worker");
    }

    /// Records `queue`'s counters, as `STATS` gave them, once every call has ended.
    pub fn final_stats(&self, queue: &str, stats: &BTreeMap<String, u64>) {
        let field = |name: &str| {
            *stats
                .get(name)
                .unwrap_or_else(|| panic!("STATS {queue} has no {name}: {stats:?}"))
        };
        self.push(Event::Final(Counters {
            queue: queue.to_string(),
            put: field("put"),
            done: field("done"),
            depth: field("depth"),
            in_flight: field("in_flight"),
        }));
    }

    /// The events recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("no recorder panics").clone()
    }
}

/// One client connection whose every request is recorded.
pub struct RecordedConn {
    id: u64,
    history: Arc<History>,
    /// The last instant the server was surely serving this connection (its connection, or the
    /// sending of the last request it answered): a loss it causes comes later.
    last_alive: Nanos,
    /// Whether the loss is recorded already (the server closed the connection).
    lost: bool,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RecordedConn {
    /// Sends `line` and reads its reply. `None`: the server closed the connection first (a
    /// loss, recorded); the connection is spent. A reply that does not come within the
    /// connection's read timeout fails the test: a hang is a bug, not a loss.
    pub fn request(&mut self, line: &str) -> Option<String> {
        let inv = self.history.now();
        let reply = self.send(line).and_then(|()| self.read_reply(line));
        match reply {
            Some(reply) => {
                self.history.push(Event::Call {
                    conn: self.id,
                    inv,
                    request: line.to_string(),
                    reply: Some((self.history.now(), reply.clone())),
                });
                self.last_alive = inv;
                Some(reply)
            }
            None => {
                self.unanswered(inv, line);
                self.lost(self.last_alive, LossCause::ClosedByServer);
                self.lost = true;
                None
            }
        }
    }

    /// Sends `line`, waits `linger` (to land the close at different points of the request's
    /// service), then closes the connection without reading the reply (see `Drop`).
    pub fn send_and_drop(mut self, line: &str, linger: Duration) {
        let inv = self.history.now();
        // A send that fails finds the connection closed by the server: a loss either way.
        let _ = self.send(line);
        self.unanswered(inv, line);
        std::thread::sleep(linger);
    }

    fn send(&mut self, line: &str) -> Option<()> {
        self.stream.write_all(format!("{line}\n").as_bytes()).ok()
    }

    fn read_reply(&mut self, line: &str) -> Option<String> {
        let mut reply = Vec::new();
        match self.reader.read_until(b'\n', &mut reply) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("c{}: no reply to {line:?} within the read timeout", self.id)
            }
            Err(_) => None,
            Ok(_) => {
                let reply = String::from_utf8_lossy(&reply);
                reply.strip_suffix('\n').map(str::to_string)
            }
        }
    }

    fn unanswered(&self, inv: Nanos, line: &str) {
        self.history.push(Event::Call {
            conn: self.id,
            inv,
            request: line.to_string(),
            reply: None,
        });
    }

    fn lost(&self, at: Nanos, cause: LossCause) {
        self.history.push(Event::Loss {
            conn: self.id,
            at,
            cause,
        });
    }
}

impl Drop for RecordedConn {
    /// The client closes the connection: a loss (whatever it holds goes back to its queue),
    /// unless the server closed it first.
    fn drop(&mut self) {
        if !self.lost {
            self.lost(self.history.now(), LossCause::DroppedByClient);
        }
    }
}
