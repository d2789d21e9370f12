//! The server with its ledger on PostgreSQL (the bank suite itself runs against both ledgers,
//! see bank.rs): the database pool's metrics, and a bad ledger URL refused at start. The
//! database is this test binary's throwaway cluster (`forkpool_testkit::pg`), a fresh
//! database per test.

use std::time::Duration;

use forkpool_testkit::{
    check_with_promtool, http_request, metric, request_line, wait_until, LedgerKind, Server,
};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn database_pool_metrics_pass_promtool_and_count_the_requests() {
    let Some(builder) = Server::builder().ledger(LedgerKind::Postgres) else {
        return;
    };
    let server = builder
        .args(["--status-addr", "127.0.0.1:0", "--ledger-connections", "3"])
        .start();
    let requests = 25;
    let mut bank = server.connect_bank();
    for _ in 0..requests - 1 {
        assert!(request_line(&mut bank, "DEPOSIT m 5").starts_with("OK "));
    }
    assert_eq!(request_line(&mut bank, "AUDIT"), "OK 120 1");
    assert_eq!(
        request_line(&mut bank, "PING"),
        "PONG",
        "not a database request"
    );
    let page = wait_until("the pools' figures to catch up", WAIT, || {
        let page = server.metrics();
        (metric(&page, "forkpool_ledger_db_request_seconds_count") == f64::from(requests)
            && metric(&page, "forkpool_ledger_db_connections_open") == 6.0)
            .then_some(page)
    });
    // Two workers, three connections each.
    assert_eq!(metric(&page, "forkpool_ledger_db_connections"), 6.0);
    assert_eq!(metric(&page, "forkpool_ledger_db_in_flight"), 0.0);
    assert_eq!(metric(&page, "forkpool_ledger_db_unavailable_total"), 0.0);
    assert_eq!(
        metric(
            &page,
            "forkpool_ledger_db_request_seconds_bucket{le=\"+Inf\"}"
        ),
        f64::from(requests)
    );
    assert!(metric(&page, "forkpool_ledger_db_request_seconds_sum") > 0.0);
    assert!(
        !page.contains("forkpool_ledger_accounts"),
        "the file ledger's figures are not shown for a database"
    );
    check_with_promtool(&page);
    let (code, table) = http_request(server.status_addr(), "GET", "/status");
    assert_eq!(code, 200);
    assert!(
        table.contains("ledger on PostgreSQL: 6 of 6 connections open"),
        "{table}"
    );
}

#[test]
fn an_unreachable_or_bad_ledger_database_is_refused_at_start_on_one_line() {
    let Some(cluster) = forkpool_testkit::pg::postgres() else {
        return;
    };
    let missing = format!(
        "postgresql:///no_such_database?host={}&user=postgres",
        cluster.socket_dir().display()
    );
    let mut server = Server::builder().args(["--ledger", &missing]).spawn();
    let line = error_line(server.refused_to_start("a database that does not exist"));
    assert!(
        line.contains("ledger database") && line.contains("no_such_database"),
        "{line}"
    );
    let mut server = Server::builder()
        .args(["--ledger", "postgresql://u:hunter2@db/x?sslmode=require"])
        .spawn();
    let line = error_line(server.refused_to_start("sslmode=require"));
    assert!(line.contains("sslmode=require"), "{line}");
    assert!(
        !line.contains("hunter2"),
        "the password is never printed: {line}"
    );
}

/// The one line a failed start prints on stderr.
fn error_line(output: String) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("forkpool-server: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {output}");
    lines[0].to_string()
}
