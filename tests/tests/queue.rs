//! The queue service over real TCP: the producer-consumer seed scenario across workers
//! (maxsize 3, JOIN returning when the last job is done, every job delivered once), blocked
//! getters served in order across workers, timeouts and the _NOWAIT variants, jobs of closed
//! connections and of SIGKILLed workers delivered again (one at a time; under load in
//! `queue_chaos.rs`), persistence across a restart, a foreign store file refused untouched, every
//! malformed line answered on one line, drains and reloads with a waiting GET, metrics.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkpool_testkit::{
    connect, log_phrase, metric, queue_job, queue_stat, queue_stats, read_line, request_line,
    socket_owner, wait_until, Server, Signal,
};

const WAIT: Duration = Duration::from_secs(20);

fn queue(server: &Server) -> TcpStream {
    connect(server.queue_addr())
}

#[test]
fn producers_and_consumers_across_workers_each_job_once_and_join_at_the_last_done() {
    const PRODUCERS: usize = 4;
    const CONSUMERS: usize = 4;
    const PER_PRODUCER: usize = 30;
    const TOTAL: usize = PRODUCERS * PER_PRODUCER;
    let server = Server::builder().args(["--workers", "3"]).start();
    let addr = server.queue_addr();
    assert_eq!(
        request_line(&mut queue(&server), "CONFIG seed maxsize 3"),
        "OK"
    );
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            std::thread::spawn(move || {
                let mut conn = connect(addr);
                for i in 0..PER_PRODUCER {
                    let reply =
                        request_line(&mut conn, &format!("PUT seed 0 job {p}-{i} with spaces 42"));
                    assert!(reply.starts_with("OK "), "{reply}");
                }
            })
        })
        .collect();
    // Consumers take jobs until TOTAL - 1 are done; the last job is held, not done, so that
    // JOIN can be seen waiting for it.
    let (tx, rx) = std::sync::mpsc::channel::<(u64, String, usize)>();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|c| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut conn = connect(addr);
                loop {
                    let reply = request_line(&mut conn, "GET seed 300");
                    if reply.starts_with("ERR timeout") {
                        return conn;
                    }
                    let (id, payload) = queue_job(&reply);
                    tx.send((id, payload, c)).expect("the test listens");
                    let done = request_line(&mut conn, &format!("DONE {id}"));
                    assert_eq!(done, "OK");
                }
            })
        })
        .collect();
    drop(tx);
    for producer in producers {
        producer.join().expect("producer");
    }
    let mut seen = BTreeMap::new();
    for (id, payload, _) in rx.iter().take(TOTAL) {
        assert!(
            seen.insert(payload.clone(), id).is_none(),
            "{payload} delivered twice"
        );
    }
    assert_eq!(seen.len(), TOTAL);
    for p in 0..PRODUCERS {
        for i in 0..PER_PRODUCER {
            assert!(seen.contains_key(&format!("job {p}-{i} with spaces 42")));
        }
    }
    for consumer in consumers {
        consumer.join().expect("consumer");
    }
    let s = queue_stats(addr, "seed");
    assert_eq!(
        (s["put"], s["done"], s["depth"], s["in_flight"]),
        (TOTAL as u64, TOTAL as u64, 0, 0)
    );
    // JOIN now: nothing unfinished, at once. With one job held, it waits for its DONE.
    assert_eq!(request_line(&mut queue(&server), "JOIN seed"), "OK");
    let mut holder = queue(&server);
    assert!(request_line(&mut holder, "PUT seed 0 last").starts_with("OK "));
    let (last, _) = queue_job(&request_line(&mut holder, "GET seed"));
    let mut joiner = queue(&server);
    joiner.write_all(b"JOIN seed\n").expect("send JOIN");
    wait_until("JOIN to wait", WAIT, || {
        (queue_stat(addr, "seed", "joiners") == 1).then_some(())
    });
    assert_eq!(request_line(&mut holder, &format!("DONE {last}")), "OK");
    assert_eq!(read_line(&mut joiner), "OK");
}

#[test]
fn parked_getters_on_several_workers_are_served_in_arrival_order() {
    let server = Server::builder().args(["--workers", "2"]).start();
    let addr = server.queue_addr();
    let mut getters = Vec::new();
    for n in 1..=4 {
        let mut conn = queue(&server);
        conn.write_all(b"GET fair\n").expect("send GET");
        wait_until("the getter to park", WAIT, || {
            (queue_stat(addr, "fair", "getters") == n).then_some(())
        });
        getters.push(conn);
    }
    let mut producer = queue(&server);
    for n in 1..=4 {
        assert!(request_line(&mut producer, &format!("PUT fair 0 p{n}")).starts_with("OK "));
    }
    for (n, conn) in getters.iter_mut().enumerate() {
        assert_eq!(queue_job(&read_line(conn)).1, format!("p{}", n + 1));
    }
}

#[test]
fn timeouts_nowait_and_full_and_empty_edges() {
    let server = Server::start();
    let addr = server.queue_addr();
    let mut conn = queue(&server);
    assert!(request_line(&mut conn, "GET_NOWAIT e").starts_with("ERR empty "));
    let start = Instant::now();
    assert!(request_line(&mut conn, "GET e 100").starts_with("ERR timeout "));
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert_eq!(request_line(&mut conn, "CONFIG e maxsize 1"), "OK");
    let first = request_line(&mut conn, "PUT_NOWAIT e one");
    assert!(first.starts_with("OK "), "{first}");
    assert!(request_line(&mut conn, "PUT_NOWAIT e two").starts_with("ERR full "));
    assert!(request_line(&mut conn, "PUT e 50 two").starts_with("ERR timeout "));
    let s = queue_stats(addr, "e");
    assert_eq!(
        (s["depth"], s["put"], s["putters"]),
        (1, 1, 0),
        "the timed-out PUT put nothing"
    );
    // A blocked PUT enters once a GET makes room, and its reply comes then.
    let mut putter = queue(&server);
    putter.write_all(b"PUT e 0 two\n").expect("send PUT");
    wait_until("the putter to park", WAIT, || {
        (queue_stat(addr, "e", "putters") == 1).then_some(())
    });
    assert_eq!(queue_job(&request_line(&mut conn, "GET_NOWAIT e")).1, "one");
    assert!(read_line(&mut putter).starts_with("OK "));
    assert_eq!(queue_job(&request_line(&mut conn, "GET e 1000")).1, "two");
    assert_eq!(request_line(&mut conn, "QUEUES"), "OK 1 e");
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
    assert_eq!(request_line(&mut conn, "QUIT"), "BYE");
}

#[test]
fn a_job_of_a_closed_connection_is_delivered_again_first() {
    let server = Server::start();
    let mut producer = queue(&server);
    for n in 1..=2 {
        assert!(request_line(&mut producer, &format!("PUT r 0 j{n}")).starts_with("OK "));
    }
    let mut consumer = queue(&server);
    let (id, payload) = queue_job(&request_line(&mut consumer, "GET r"));
    assert_eq!(payload, "j1");
    drop(consumer);
    wait_until("the closed connection's job to be released", WAIT, || {
        (queue_stat(server.queue_addr(), "r", "depth") == 2).then_some(())
    });
    let mut again = queue(&server);
    let (id2, payload2) = queue_job(&request_line(&mut again, "GET r 5000"));
    assert_eq!(
        (id2, payload2.as_str()),
        (id, "j1"),
        "the released job comes back first"
    );
    let mut stranger = queue(&server);
    assert!(request_line(&mut stranger, &format!("DONE {id}")).starts_with("ERR not-reserved "));
    assert_eq!(request_line(&mut again, &format!("DONE {id}")), "OK");
}

#[test]
fn jobs_of_a_sigkilled_worker_are_delivered_again() {
    let server = Server::builder().args(["--workers", "2"]).start();
    let workers = server.wait_workers(2, WAIT);
    let mut producer = queue(&server);
    assert!(request_line(&mut producer, "PUT k 0 survivor").starts_with("OK "));
    let mut consumer = queue(&server);
    let (id, _) = queue_job(&request_line(&mut consumer, "GET k"));
    let owner = socket_owner(&consumer, &workers).expect("a worker serves the consumer");
    nix::sys::signal::kill(owner, Signal::SIGKILL).expect("kill the worker");
    let mut again = queue(&server);
    let (id2, payload) = queue_job(&request_line(&mut again, "GET k 10000"));
    assert_eq!((id2, payload.as_str()), (id, "survivor"));
    assert_eq!(request_line(&mut again, &format!("DONE {id}")), "OK");
}

#[test]
fn jobs_survive_a_restart_and_a_foreign_store_is_refused_untouched() {
    let mut server = Server::start();
    let dir = server.data_dir();
    assert!(request_line(&mut queue(&server), "PUT keep 0 kept job").starts_with("OK "));
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    let again = Server::builder().data_dir(dir.clone()).start();
    assert_eq!(
        queue_job(&request_line(&mut queue(&again), "GET keep 5000")).1,
        "kept job"
    );
    drop(again);
    let store = dir.path().join("queue.bin");
    let garbage = vec![0x5a_u8; 8192];
    std::fs::write(&store, &garbage).expect("write garbage");
    let mut refused = Server::builder().data_dir(dir.clone()).spawn();
    let output = refused.refused_to_start("a foreign queue store");
    assert!(output.contains("not a forkpool queue file"), "{output}");
    assert_eq!(
        std::fs::read(&store).expect("read"),
        garbage,
        "the file was left unchanged"
    );
}

#[test]
fn every_malformed_line_gets_one_error_line_and_the_connection_goes_on() {
    let server = Server::start();
    let mut conn = queue(&server);
    let cases = [
        ("", "ERR bad-request "),
        ("FETCH q", "ERR unknown-command "),
        ("PUT q 10", "ERR bad-request "),
        ("GET q 1 2", "ERR bad-request "),
        ("GET b@d", "ERR bad-queue "),
        ("GET q soon", "ERR bad-timeout "),
        ("DONE x", "ERR bad-id "),
        ("DONE 12345", "ERR not-reserved "),
        ("CONFIG q maxsize -1", "ERR bad-maxsize "),
        ("STATS nosuch", "ERR no-such-queue "),
        (
            &format!("PUT_NOWAIT q {}", "x".repeat(1025)),
            "ERR payload-too-long ",
        ),
    ];
    for (line, expected) in cases {
        let reply = request_line(&mut conn, line);
        assert!(reply.starts_with(expected), "{line:?}: {reply:?}");
    }
    // Arbitrary bytes: one reply line each, never a dropped connection.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..200 {
        let mut line = Vec::new();
        for _ in 0..(seed % 40) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let b = (seed % 256) as u8;
            if b != b'\n' {
                line.push(b);
            }
        }
        line.push(b'\n');
        conn.write_all(&line).expect("send");
        let reply = read_line(&mut conn);
        assert!(
            reply.starts_with("ERR ")
                || reply.starts_with("OK")
                || reply.starts_with("JOB ")
                || reply == "PONG",
            "{line:?}: {reply:?}"
        );
    }
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
}

#[test]
fn the_readme_netcat_session_replays() {
    let server = Server::builder()
        .args(["--queue-max-jobs", "65536"])
        .start();
    let mut conn = queue(&server);
    for (request, reply) in [
        ("CONFIG jobs maxsize 3", "OK"),
        ("PUT jobs 0 resize photo 42.jpg", "OK 65536"),
        ("GET jobs", "JOB 65536 resize photo 42.jpg"),
        ("DONE 65536", "OK"),
        ("JOIN jobs", "OK"),
        (
            "GET jobs 100",
            "ERR timeout the wait ran out; nothing changed",
        ),
    ] {
        assert_eq!(request_line(&mut conn, request), reply, "{request}");
    }
}

#[test]
fn a_drain_answers_a_waiting_get_and_a_reload_moves_it_to_a_new_worker() {
    let mut server = Server::start();
    let addr = server.queue_addr();
    // Reload: the workers retire and hand their connections over; the waiting GET is
    // withdrawn, parked again by the successor, and served there.
    let mut moved = queue(&server);
    assert!(request_line(&mut moved, "PUT move 0 held").starts_with("OK "));
    let (held, _) = queue_job(&request_line(&mut moved, "GET move"));
    moved.write_all(b"GET move\n").expect("send GET");
    wait_until("the getter to park", WAIT, || {
        (queue_stat(addr, "move", "getters") == 1).then_some(())
    });
    let before = server.workers();
    server.signal(Signal::SIGHUP);
    wait_until("the old workers to leave", WAIT, || {
        let now = server.workers();
        (!now.is_empty() && now.iter().all(|pid| !before.contains(pid))).then_some(())
    });
    wait_until("the getter to park again", WAIT, || {
        (queue_stat(addr, "move", "getters") == 1).then_some(())
    });
    assert!(request_line(&mut queue(&server), "PUT move 0 after reload").starts_with("OK "));
    assert_eq!(queue_job(&read_line(&mut moved)).1, "after reload");
    // The job fetched before the reload moved with the connection: its DONE is accepted.
    assert_eq!(request_line(&mut moved, &format!("DONE {held}")), "OK");
    // Shutdown: the waiting GET is answered, not dropped.
    let mut waiting = queue(&server);
    waiting.write_all(b"GET idle\n").expect("send GET");
    wait_until("the getter to park", WAIT, || {
        (queue_stat(addr, "idle", "getters") == 1).then_some(())
    });
    server.signal(Signal::SIGTERM);
    assert!(read_line(&mut waiting).starts_with("ERR shutting-down "));
    assert!(server.wait_exit(WAIT).success());
}

#[test]
fn a_get_that_parks_after_the_shutdown_began_is_answered_at_once() {
    // One worker and a drain far longer than the reply's read timeout (20 s): only an answer
    // at once passes, not the drain's deadline closing the connection.
    let mut server = Server::builder()
        .args(["--workers", "1", "--graceful-timeout", "120"])
        .start();
    let mut conn = queue(&server);
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
    // A client that keeps talking: the drain does not close its connection as quiet.
    let stop = Arc::new(AtomicBool::new(false));
    let mut pinger = conn.try_clone().expect("clone the connection");
    let pinging = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && pinger.write_all(b"PING\n").is_ok() {
                std::thread::sleep(Duration::from_millis(10)); // the client's pace
            }
        })
    };
    server.signal(Signal::SIGTERM);
    server.wait_log(log_phrase::WORKER_DRAINING_ONE, WAIT);
    conn.write_all(b"GET late 0\n").expect("send GET");
    let answer = loop {
        let line = read_line(&mut conn);
        if line != "PONG" {
            break line;
        }
    };
    stop.store(true, Ordering::Relaxed);
    pinging.join().expect("the pinger ends");
    assert!(
        answer.starts_with("ERR shutting-down "),
        "a GET parked during the drain got {answer:?}"
    );
    drop(conn);
    assert!(server.wait_exit(WAIT).success());
}

#[test]
fn metrics_show_depth_in_flight_and_parked_requests() {
    let server = Server::builder()
        .args(["--status-addr", "127.0.0.1:0"])
        .start();
    let mut conn = queue(&server);
    for n in 1..=3 {
        assert!(request_line(&mut conn, &format!("PUT m 0 j{n}")).starts_with("OK "));
    }
    queue_job(&request_line(&mut conn, "GET m"));
    let mut waiter = queue(&server);
    waiter.write_all(b"GET empty\n").expect("send GET");
    let page = wait_until("a parked GET in the metrics", WAIT, || {
        let page = server.metrics();
        (metric(&page, "forkpool_queue_waiting{kind=\"get\"}") == 1.0).then_some(page)
    });
    assert_eq!(metric(&page, "forkpool_queue_depth"), 2.0);
    assert_eq!(metric(&page, "forkpool_queue_in_flight"), 1.0);
    assert_eq!(metric(&page, "forkpool_queue_put_total"), 3.0);
    assert_eq!(metric(&page, "forkpool_queue_queues"), 2.0);
}
