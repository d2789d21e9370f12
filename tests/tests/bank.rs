//! The bank service over real TCP: every request and failure kind with its exact reply, the
//! line limit, linearizable concurrent withdrawals and transfers across worker processes,
//! money conservation while workers are SIGKILLed, persistence across restarts, refusal of
//! bad or busy ledger files, and bank and echo served by the same worker.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use forkpool_testkit::{
    exchange, log_phrase, one_error_line, read_line, request_line, subset_reaching, wait_until,
    LedgerKind, Rng, Server, Signal, Transfer,
};
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;

/// Largest amount and balance: 2^63-1.
const MAX: u64 = i64::MAX as u64;

/// Runs each listed test, a `fn(LedgerKind)`, once per ledger backend: `NAME::file` and
/// `NAME::postgres` (both give byte-identical replies and the same guarantees).
macro_rules! on_both_ledgers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn file() {
                super::$name(forkpool_testkit::LedgerKind::File);
            }
            #[test]
            fn postgres() {
                super::$name(forkpool_testkit::LedgerKind::Postgres);
            }
        }
    )*};
}

on_both_ledgers!(
    every_request_kind_gets_its_exact_reply,
    verbs_ignore_case_blanks_and_crlf_but_account_names_are_case_sensitive,
    malformed_requests_get_their_error_kind_change_nothing_and_the_connection_stays_usable,
    ledger_failures_get_their_error_kind_and_change_nothing,
    audit_reports_an_exact_total_above_two_to_the_63,
    ledger_full_is_exact_at_max_accounts,
    every_error_detail_names_what_it_is_about_in_one_style,
    the_readme_bank_session_is_what_the_server_answers,
    a_line_over_max_line_is_answered_line_too_long_then_closed_and_not_applied,
    a_ten_mib_line_at_the_default_limit_is_refused_then_closed_and_not_applied,
    the_unterminated_last_request_before_a_half_close_is_answered,
    twenty_thousand_pipelined_requests_are_answered_in_order,
    quit_answers_bye_and_the_requests_pipelined_after_it_are_not_applied,
    one_hundred_clients_grabbing_ten_tickets_at_once_get_exactly_ten,
    concurrent_random_transfers_conserve_money_and_match_the_acknowledged_ones,
    workers_sigkilled_every_fifty_ms_lose_no_money_and_no_acknowledged_transfer,
    one_worker_serves_bank_and_echo_connections_at_the_same_time,
);

/// A server whose ledger is `ledger`, with `args`; `None` if that ledger cannot be had here
/// (PostgreSQL not installed).
fn bank_server(ledger: LedgerKind, args: &[&str]) -> Option<Server> {
    Some(
        Server::builder()
            .ledger(ledger)?
            .args(args.iter().copied())
            .start(),
    )
}

// ---------------------------------------------------------------------------------------
// Every request kind and every failure kind
// ---------------------------------------------------------------------------------------

fn every_request_kind_gets_its_exact_reply(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    let mut bank = server.connect_bank();
    expect_replies(
        &mut bank,
        &[
            ("DEPOSIT alice 100", "OK 100"),
            ("WITHDRAW alice 30", "OK 70"),
            // The destination of a transfer is opened if new.
            ("TRANSFER alice bob 50", "OK 20 50"),
            ("BALANCE bob", "OK 50"),
            ("BALANCE alice", "OK 20"),
            ("AUDIT", "OK 70 2"),
            ("PING", "PONG"),
            // An emptied account stays open with 0.
            ("WITHDRAW alice 20", "OK 0"),
            ("BALANCE alice", "OK 0"),
            ("AUDIT", "OK 50 2"),
            ("TRANSFER bob alice 50", "OK 0 50"),
            ("DEPOSIT bob 1", "OK 1"),
            ("AUDIT", "OK 51 2"),
            // The extremes of names and amounts are accepted.
            (
                &format!("DEPOSIT {} {MAX}", "n".repeat(64)),
                &format!("OK {MAX}"),
            ),
            ("DEPOSIT A-Z_a.z-09 0000000000000000000000000000007", "OK 7"),
            ("TRANSFER A-Z_a.z-09 bob 7", "OK 0 8"),
            // Without a users file there is nobody to become, and nothing is refused.
            (
                "AUTH alice 0123456789abcdef",
                "ERR denied no users are configured on this server",
            ),
            ("BALANCE bob", "OK 8"),
        ],
    );
    assert_eq!(request_line(&mut bank, "QUIT"), "BYE");
    assert_closed(&mut bank, "after BYE");
}

fn verbs_ignore_case_blanks_and_crlf_but_account_names_are_case_sensitive(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    let mut bank = server.connect_bank();
    expect_replies(
        &mut bank,
        &[
            ("deposit carol 5", "OK 5"),
            ("Deposit carol 5\r", "OK 10"),
            ("  \tTRANSFER \t carol\t\tdave   3 \t", "OK 7 3"),
            ("tRaNsFeR carol dave 1\r", "OK 6 4"),
            ("wIThdraw dave 4", "OK 0"),
            ("bAlAnCe carol\r", "OK 6"),
            ("audit", "OK 6 2"),
            ("\tping  \r", "PONG"),
            // carol and Carol are two accounts.
            ("DEPOSIT Carol 1", "OK 1"),
            ("BALANCE carol", "OK 6"),
            ("AUDIT", "OK 7 3"),
        ],
    );
    assert_err(
        &request_line(&mut bank, "BALANCE CAROL"),
        "no-such-account",
        b"BALANCE CAROL",
    );
    bank.write_all(b"qUiT\r\n").expect("send QUIT");
    assert_eq!(read_line(&mut bank), "BYE");
    assert_closed(&mut bank, "after BYE");
}

fn malformed_requests_get_their_error_kind_change_nothing_and_the_connection_stays_usable(
    ledger: LedgerKind,
) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    let mut bank = server.connect_bank();
    expect_replies(
        &mut bank,
        &[("DEPOSIT a 10", "OK 10"), ("DEPOSIT b 5", "OK 5")],
    );
    let long_name = "x".repeat(65);
    let cases: Vec<(Vec<u8>, &str)> = [
        // Unknown verbs; their arguments are not looked at.
        (b"FOO".to_vec(), "unknown-command"),
        (b"DEPOSITS a 1".to_vec(), "unknown-command"),
        (b"DEP a 1".to_vec(), "unknown-command"),
        ("DÉPOSIT a 1".as_bytes().to_vec(), "unknown-command"),
        (b"\xff\xfe a 1".to_vec(), "unknown-command"),
        (b"DEPOSIT\x00 a 1".to_vec(), "unknown-command"),
        // Empty lines and wrong field counts.
        (b"".to_vec(), "bad-request"),
        (b"   \t ".to_vec(), "bad-request"),
        (b"\r".to_vec(), "bad-request"),
        (b"DEPOSIT".to_vec(), "bad-request"),
        (b"DEPOSIT a".to_vec(), "bad-request"),
        (b"DEPOSIT a 1 2".to_vec(), "bad-request"),
        (b"WITHDRAW a".to_vec(), "bad-request"),
        (b"WITHDRAW a 1 1".to_vec(), "bad-request"),
        (b"TRANSFER a b".to_vec(), "bad-request"),
        (b"TRANSFER a b 1 2".to_vec(), "bad-request"),
        (b"BALANCE".to_vec(), "bad-request"),
        (b"BALANCE a b".to_vec(), "bad-request"),
        (b"AUDIT x".to_vec(), "bad-request"),
        (b"PING x".to_vec(), "bad-request"),
        (b"QUIT now".to_vec(), "bad-request"),
        // Amounts: only digits, 1..=2^63-1.
        (b"DEPOSIT a 0".to_vec(), "bad-amount"),
        (b"DEPOSIT a 0000".to_vec(), "bad-amount"),
        (b"DEPOSIT a -5".to_vec(), "bad-amount"),
        (b"DEPOSIT a +5".to_vec(), "bad-amount"),
        (b"DEPOSIT a 1.5".to_vec(), "bad-amount"),
        (b"DEPOSIT a 1,5".to_vec(), "bad-amount"),
        (b"DEPOSIT a 1e3".to_vec(), "bad-amount"),
        (b"DEPOSIT a 0x10".to_vec(), "bad-amount"),
        (b"DEPOSIT a 10abc".to_vec(), "bad-amount"),
        (b"DEPOSIT a ten".to_vec(), "bad-amount"),
        (b"DEPOSIT a \xd9\xa3".to_vec(), "bad-amount"),
        (b"DEPOSIT a 9223372036854775808".to_vec(), "bad-amount"),
        (b"DEPOSIT a 18446744073709551616".to_vec(), "bad-amount"),
        (
            "DEPOSIT a ".bytes().chain([b'9'; 5000]).collect(),
            "bad-amount",
        ),
        (b"WITHDRAW a 0".to_vec(), "bad-amount"),
        (b"WITHDRAW a -1".to_vec(), "bad-amount"),
        (b"TRANSFER a b 0".to_vec(), "bad-amount"),
        (b"TRANSFER a b 2.0".to_vec(), "bad-amount"),
        // Amount before existence: the account need not exist.
        (b"WITHDRAW ghost 0".to_vec(), "bad-amount"),
        // Names: 1..=64 bytes of [A-Za-z0-9_.-].
        (format!("DEPOSIT {long_name} 1").into_bytes(), "bad-account"),
        (format!("BALANCE {long_name}").into_bytes(), "bad-account"),
        (b"DEPOSIT a,b 1".to_vec(), "bad-account"),
        (b"DEPOSIT a/b 1".to_vec(), "bad-account"),
        (b"DEPOSIT a\x00b 1".to_vec(), "bad-account"),
        (b"DEPOSIT a\rb 1".to_vec(), "bad-account"),
        ("DEPOSIT café 1".as_bytes().to_vec(), "bad-account"),
        (b"DEPOSIT \xff\xfe 1".to_vec(), "bad-account"),
        (b"BALANCE caf\xe9".to_vec(), "bad-account"),
        (b"WITHDRAW a! 1".to_vec(), "bad-account"),
        (b"TRANSFER a b\xff 1".to_vec(), "bad-account"),
        (b"TRANSFER \x80 b 1".to_vec(), "bad-account"),
        // Names before amounts, left to right.
        (b"DEPOSIT a! 0".to_vec(), "bad-account"),
        // A transfer to itself, whether or not the account exists.
        (b"TRANSFER a a 1".to_vec(), "same-account"),
        (b"TRANSFER ghost ghost 1".to_vec(), "same-account"),
    ]
    .into_iter()
    .collect();
    for (request, kind) in &cases {
        let reply = ask_raw(&mut bank, request);
        assert_err(&reply, kind, request);
        assert_eq!(
            request_line(&mut bank, "PING"),
            "PONG",
            "the connection stays usable after {:?}",
            String::from_utf8_lossy(request)
        );
    }
    expect_replies(
        &mut bank,
        &[
            ("BALANCE a", "OK 10"),
            ("BALANCE b", "OK 5"),
            ("AUDIT", "OK 15 2"),
        ],
    );
    assert_err(
        &request_line(&mut bank, "BALANCE ghost"),
        "no-such-account",
        b"BALANCE ghost",
    );
}

fn ledger_failures_get_their_error_kind_and_change_nothing(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    let mut bank = server.connect_bank();
    expect_replies(
        &mut bank,
        &[
            ("DEPOSIT a 10", "OK 10"),
            (&format!("DEPOSIT big {MAX}"), &format!("OK {MAX}")),
        ],
    );
    let cases: &[(&str, &str)] = &[
        ("WITHDRAW ghost 1", "no-such-account"),
        ("BALANCE ghost", "no-such-account"),
        ("TRANSFER ghost a 1", "no-such-account"),
        ("WITHDRAW a 11", "insufficient-funds"),
        ("TRANSFER a b 11", "insufficient-funds"),
        ("DEPOSIT big 1", "overflow"),
        ("TRANSFER a big 1", "overflow"),
        (&format!("DEPOSIT a {}", MAX - 9), "overflow"),
    ];
    for (request, kind) in cases {
        assert_err(&request_line(&mut bank, request), kind, request.as_bytes());
        assert_eq!(
            request_line(&mut bank, "PING"),
            "PONG",
            "usable after {request}"
        );
    }
    expect_replies(
        &mut bank,
        &[
            ("BALANCE a", "OK 10"),
            ("BALANCE big", &format!("OK {MAX}")),
            ("AUDIT", &format!("OK {} 2", u128::from(MAX) + 10)),
            // Withdrawing everything leaves an open account with 0.
            ("WITHDRAW a 10", "OK 0"),
            ("BALANCE a", "OK 0"),
            ("AUDIT", &format!("OK {MAX} 2")),
            (&format!("DEPOSIT a {}", MAX), &format!("OK {MAX}")),
        ],
    );
    // Neither the refused transfer to `b` nor the refused deposit opened an account.
    for request in ["BALANCE b", "BALANCE ghost"] {
        assert_err(
            &request_line(&mut bank, request),
            "no-such-account",
            request.as_bytes(),
        );
    }
}

fn audit_reports_an_exact_total_above_two_to_the_63(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    let mut bank = server.connect_bank();
    for name in ["m1", "m2", "m3"] {
        assert_eq!(
            request_line(&mut bank, &format!("DEPOSIT {name} {MAX}")),
            format!("OK {MAX}")
        );
    }
    assert_eq!(request_line(&mut bank, "DEPOSIT small 5"), "OK 5");
    let total = 3 * u128::from(MAX) + 5;
    assert_eq!(request_line(&mut bank, "AUDIT"), format!("OK {total} 4"));
    assert_eq!(total.to_string(), "27670116110564327426");
}

fn ledger_full_is_exact_at_max_accounts(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &["--max-accounts", "3"]) else {
        return;
    };
    let mut bank = server.connect_bank();
    expect_replies(
        &mut bank,
        &[
            ("DEPOSIT a 10", "OK 10"),
            ("DEPOSIT b 10", "OK 10"),
            ("TRANSFER a c 4", "OK 6 4"),
        ],
    );
    for request in ["DEPOSIT d 1", "TRANSFER a d 1"] {
        assert_err(
            &request_line(&mut bank, request),
            "ledger-full",
            request.as_bytes(),
        );
    }
    expect_replies(
        &mut bank,
        &[
            // Existing accounts keep working; an emptied one stays and still counts.
            ("DEPOSIT a 1", "OK 7"),
            ("TRANSFER a b 7", "OK 0 17"),
            ("WITHDRAW c 4", "OK 0"),
            ("AUDIT", "OK 17 3"),
        ],
    );
    for (request, kind) in [
        ("DEPOSIT d 1", "ledger-full"),
        ("BALANCE d", "no-such-account"),
    ] {
        assert_err(&request_line(&mut bank, request), kind, request.as_bytes());
    }
}

/// Every error detail, exactly: one style (an account is `account 'NAME'`, client input is
/// quoted between `'`, a limit comes with its setting), and the account a failure is about.
fn every_error_detail_names_what_it_is_about_in_one_style(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &["--max-accounts", "3", "--max-line", "40"]) else {
        return;
    };
    let mut bank = server.connect_bank();
    let details = format!(
        "DEPOSIT a 10\nOK 10\n\
         DEPOSIT big {MAX}\nOK {MAX}\n\
         FROB\nERR unknown-command unknown command 'FROB'\n\
         \nERR bad-request empty request\n\
         DEPOSIT a\nERR bad-request DEPOSIT takes 2 arguments (<acct> <amount>), got 1\n\
         DEPOSIT a/b 1\nERR bad-account invalid account name 'a/b': the name contains \
         the byte 0x2f; allowed are A-Z a-z 0-9 _ . -\n\
         DEPOSIT a -5\nERR bad-amount invalid amount '-5': a whole number from 1 to {MAX} is \
         expected\n\
         TRANSFER a a 1\nERR same-account cannot transfer from account 'a' to itself\n\
         WITHDRAW ghost 1\nERR no-such-account account 'ghost' does not exist\n\
         TRANSFER ghost a 1\nERR no-such-account account 'ghost' does not exist\n\
         BALANCE ghost\nERR no-such-account account 'ghost' does not exist\n\
         WITHDRAW a 11\nERR insufficient-funds account 'a' holds less than the amount\n\
         TRANSFER a b 11\nERR insufficient-funds account 'a' holds less than the amount\n\
         DEPOSIT big 1\nERR overflow the balance of account 'big' would exceed {MAX}\n\
         TRANSFER a big 1\nERR overflow the balance of account 'big' would exceed {MAX}\n\
         DEPOSIT c 1\nOK 1\n\
         DEPOSIT d 1\nERR ledger-full cannot open account 'd': the ledger holds its limit of 3 \
         accounts (the max_accounts setting)\n\
         TRANSFER a d 1\nERR ledger-full cannot open account 'd': the ledger holds its limit \
         of 3 accounts (the max_accounts setting)\n"
    );
    let lines: Vec<&str> = details.lines().collect();
    for pair in lines.chunks(2) {
        expect_replies(&mut bank, &[(pair[0], pair[1])]);
    }
    // 41 bytes: one over the limit; the server answers, then closes.
    let over = format!("DEPOSIT a {}", "0".repeat(31));
    assert_eq!(over.len(), 41);
    assert_eq!(
        request_line(&mut bank, &over),
        "ERR line-too-long request line longer than 40 bytes (the max_line setting); closing"
    );
    assert_closed(&mut bank, "after line-too-long");
}

/// The README's netcat session of the bank, replayed line by line: its replies are the
/// server's, byte for byte.
fn the_readme_bank_session_is_what_the_server_answers(ledger: LedgerKind) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md is readable");
    let session: Vec<&str> = readme
        .lines()
        .skip_while(|line| !line.starts_with("$ nc 127.0.0.1 7879"))
        .skip(1)
        .take_while(|line| !line.starts_with("```") && !line.starts_with('$'))
        .collect();
    assert!(
        session.len() >= 8 && session.len().is_multiple_of(2),
        "the README has a bank session of requests and replies: {session:?}"
    );
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    let mut bank = server.connect_bank();
    for pair in session.chunks(2) {
        expect_replies(&mut bank, &[(pair[0], pair[1])]);
    }
    assert_closed(&mut bank, "after the session's QUIT");
}

// ---------------------------------------------------------------------------------------
// Line framing: the limit, half-close, QUIT
// ---------------------------------------------------------------------------------------

fn a_line_over_max_line_is_answered_line_too_long_then_closed_and_not_applied(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &["--max-line", "32"]) else {
        return;
    };
    // 32 bytes (the limit) is served; 33 is refused, and nothing after it is read.
    let at_limit = "DEPOSIT a 0000000000000000000001";
    let over = "DEPOSIT a 00000000000000000000001";
    assert_eq!((at_limit.len(), over.len()), (32, 33));
    let replies = exchange(
        server.connect_bank(),
        format!("{at_limit}\n{over}\nDEPOSIT a 5\n").as_bytes(),
    );
    let replies = String::from_utf8_lossy(&replies);
    let lines: Vec<&str> = replies.lines().collect();
    assert_eq!(lines.len(), 2, "two replies, then the close: {replies:?}");
    assert_eq!(lines[0], "OK 1");
    assert_err(lines[1], "line-too-long", over.as_bytes());
    // A long line still unterminated when the limit is crossed is refused as well.
    let replies = exchange(server.connect_bank(), format!("PING\n{over}").as_bytes());
    let replies = String::from_utf8_lossy(&replies);
    let lines: Vec<&str> = replies.lines().collect();
    assert_eq!(lines.len(), 2, "{replies:?}");
    assert_eq!(lines[0], "PONG");
    assert_err(lines[1], "line-too-long", over.as_bytes());
    // A CRLF ending is the same request as LF: its `\r` does not count against the limit.
    let replies = exchange(server.connect_bank(), format!("{at_limit}\r\n").as_bytes());
    assert_eq!(String::from_utf8_lossy(&replies), "OK 2\n");
    let mut bank = server.connect_bank();
    assert_eq!(request_line(&mut bank, "BALANCE a"), "OK 2");
}

fn a_ten_mib_line_at_the_default_limit_is_refused_then_closed_and_not_applied(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    // Were it not refused, this line would be `DEPOSIT tenmib 1`.
    let mut request = b"PING\nDEPOSIT tenmib".to_vec();
    request.resize(request.len() + 10 * 1024 * 1024, b' ');
    request.extend_from_slice(b"1\nDEPOSIT after 1\n");
    let stream = server.connect_bank();
    let started = Instant::now();
    let (replies, write_result) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| (&stream).write_all(&request));
        let mut replies = Vec::new();
        // The server may reset the connection once it stops draining the rest of the line;
        // what it answered before is kept in `replies` either way.
        let _ = (&stream).read_to_end(&mut replies);
        (replies, writer.join().expect("the writer does not panic"))
    });
    let replies = String::from_utf8_lossy(&replies);
    let lines: Vec<&str> = replies.lines().collect();
    assert_eq!(lines.len(), 2, "two replies, then the close: {replies:?}");
    assert_eq!(lines[0], "PONG");
    assert_err(lines[1], "line-too-long", b"a 10 MiB line");
    eprintln!(
        "10 MiB line refused and closed in {:?}; the client's write {}",
        started.elapsed(),
        match write_result {
            Ok(()) => "completed".to_string(),
            Err(e) => format!("failed: {e}"),
        }
    );
    let mut bank = server.connect_bank();
    for name in ["tenmib", "after"] {
        assert_err(
            &request_line(&mut bank, &format!("BALANCE {name}")),
            "no-such-account",
            name.as_bytes(),
        );
    }
    assert_eq!(request_line(&mut bank, "AUDIT"), "OK 0 0");
}

fn the_unterminated_last_request_before_a_half_close_is_answered(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    assert_eq!(exchange(server.connect_bank(), b"PING"), b"PONG\n".to_vec());
    assert_eq!(
        exchange(server.connect_bank(), b"DEPOSIT u 5\nBALANCE u"),
        b"OK 5\nOK 5\n".to_vec()
    );
    assert_eq!(
        exchange(server.connect_bank(), b"deposit u 1\r"),
        b"OK 6\n".to_vec()
    );
    assert_eq!(exchange(server.connect_bank(), b""), b"".to_vec());
}

fn twenty_thousand_pipelined_requests_are_answered_in_order(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    let request: String = (0..10_000).map(|_| "DEPOSIT p 1\nbalance p\n").collect();
    let replies = exchange(server.connect_bank(), request.as_bytes());
    let expected: String = (1..=10_000).map(|i| format!("OK {i}\nOK {i}\n")).collect();
    assert_eq!(replies.len(), expected.len());
    assert!(
        replies == expected.as_bytes(),
        "replies differ from the expected order"
    );
}

fn quit_answers_bye_and_the_requests_pipelined_after_it_are_not_applied(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &[]) else {
        return;
    };
    assert_eq!(
        exchange(server.connect_bank(), b"PING\nQUIT\nDEPOSIT q 1\n"),
        b"PONG\nBYE\n".to_vec()
    );
    let mut bank = server.connect_bank();
    assert_err(
        &request_line(&mut bank, "BALANCE q"),
        "no-such-account",
        b"BALANCE q",
    );
}

// ---------------------------------------------------------------------------------------
// Concurrency across worker processes
// ---------------------------------------------------------------------------------------

fn one_hundred_clients_grabbing_ten_tickets_at_once_get_exactly_ten(ledger: LedgerKind) {
    grabbing_ten_tickets(ledger, &[]);
}

/// Linearizable under `--fsync always` too: a reply that waits for its flush must not let
/// a later withdrawal see a balance out of order.
#[test]
fn one_hundred_clients_grabbing_ten_tickets_with_fsync_always_get_exactly_ten() {
    grabbing_ten_tickets(LedgerKind::File, &["--fsync", "always"]);
}

fn grabbing_ten_tickets(ledger: LedgerKind, args: &[&str]) {
    const GRABBERS: usize = 100;
    const PRICE: u64 = 7;
    let Some(server) = bank_server(ledger, args) else {
        return;
    };
    let mut admin = server.connect_bank();
    assert_eq!(
        request_line(&mut admin, &format!("DEPOSIT tickets {}", 10 * PRICE)),
        format!("OK {}", 10 * PRICE)
    );
    // Every connection is open (and accepted) before anyone withdraws.
    let mut clients: Vec<TcpStream> = (0..GRABBERS).map(|_| server.connect_bank()).collect();
    for client in &mut clients {
        assert_eq!(request_line(client, "PING"), "PONG");
    }
    let barrier = Arc::new(Barrier::new(GRABBERS));
    let grabbers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                request_line(&mut client, &format!("WITHDRAW tickets {PRICE}"))
            })
        })
        .collect();
    let replies: Vec<String> = grabbers
        .into_iter()
        .map(|grabber| grabber.join().expect("a grabber does not panic"))
        .collect();
    let mut left: Vec<u64> = replies
        .iter()
        .filter_map(|reply| reply.strip_prefix("OK ")?.parse().ok())
        .collect();
    left.sort_unstable();
    // Linearizable: the ten successes saw the ten balances 63, 56, ..., 0, each once.
    let expected: Vec<u64> = (0..10).map(|i| i * PRICE).collect();
    assert_eq!(left, expected, "replies: {replies:?}");
    for reply in replies.iter().filter(|reply| !reply.starts_with("OK ")) {
        assert_err(reply, "insufficient-funds", b"WITHDRAW tickets");
    }
    assert_eq!(request_line(&mut admin, "BALANCE tickets"), "OK 0");
    assert_eq!(request_line(&mut admin, "AUDIT"), "OK 0 1");
    let workers = wait_for_pids_logging(&server, log_phrase::ACCEPTED_BANK, 2);
    eprintln!("{GRABBERS} grabbers served by workers {workers:?}");
}

fn concurrent_random_transfers_conserve_money_and_match_the_acknowledged_ones(ledger: LedgerKind) {
    concurrent_random_transfers(ledger, &[]);
}

#[test]
fn concurrent_random_transfers_conserve_money_with_fsync_always() {
    concurrent_random_transfers(LedgerKind::File, &["--fsync", "always"]);
}

fn concurrent_random_transfers(ledger: LedgerKind, extra: &[&str]) {
    let args = [&["--workers", "2"], extra].concat();
    let Some(server) = bank_server(ledger, &args) else {
        return;
    };
    let load = Load::open(&server);
    let addr = server.bank_addr();
    let stop_auditing = AtomicBool::new(false);
    let (tallies, audits) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                scope.spawn(move || {
                    let mut batches = 0;
                    run_transfers(addr, ledger, client, 32, || {
                        batches += 1;
                        batches <= 40
                    })
                })
            })
            .collect();
        let auditor = scope.spawn(|| audit_while(addr, &stop_auditing));
        let tallies: Vec<Tally> = clients
            .into_iter()
            .map(|client| client.join().expect("a load client does not panic"))
            .collect();
        stop_auditing.store(true, Ordering::SeqCst);
        (tallies, auditor.join().expect("the auditor does not panic"))
    });
    let drops: usize = tallies.iter().map(|t| t.drops).sum();
    assert_eq!(drops, 0, "no connection may drop without a crash");
    load.check_audits(&audits);
    // With nothing unknown, every balance is exactly initial + acknowledged transfers.
    let checked = load.check_balances(&server, &tallies);
    let workers = wait_for_pids_logging(&server, log_phrase::ACCEPTED_BANK, 2);
    eprintln!(
        "{} transfers acknowledged, {} concurrent AUDITs exact, total {}, workers {workers:?}",
        checked.acked,
        audits.len(),
        load.total
    );
    assert!(
        checked.acked > 1000,
        "the load did little: {}",
        checked.acked
    );
}

fn workers_sigkilled_every_fifty_ms_lose_no_money_and_no_acknowledged_transfer(ledger: LedgerKind) {
    workers_sigkilled_every_fifty_ms(ledger, &[]);
}

#[test]
fn workers_sigkilled_every_fifty_ms_with_fsync_always_lose_nothing_acknowledged() {
    workers_sigkilled_every_fifty_ms(LedgerKind::File, &["--fsync", "always"]);
}

fn workers_sigkilled_every_fifty_ms(ledger: LedgerKind, extra: &[&str]) {
    const CHAOS: Duration = Duration::from_secs(3);
    const MIN_KILLS: usize = 30;
    let args = [&["--workers", "2"], extra].concat();
    let Some(server) = bank_server(ledger, &args) else {
        return;
    };
    let load = Load::open(&server);
    let addr = server.bank_addr();
    let stop = AtomicBool::new(false);
    let mut kills = 0usize;
    let mut rng = Rng(0xdead_beef);
    let (tallies, audits) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let stop = &stop;
                scope.spawn(move || {
                    run_transfers(addr, ledger, client, 8, || !stop.load(Ordering::SeqCst))
                })
            })
            .collect();
        let auditor = scope.spawn(|| audit_while(addr, &stop));
        // The killer: a random worker, every ~50 ms. Only workers that are serving: one
        // killed before it is ready counts as a crash and delays its replacement (back-off),
        // which is the supervisor's business, not this test's.
        // At least CHAOS long and MIN_KILLS kills, however slow the machine is.
        let chaos_started = Instant::now();
        while chaos_started.elapsed() < CHAOS || kills < MIN_KILLS {
            assert!(
                chaos_started.elapsed() < CHAOS * 20,
                "only {kills} kills in {:?}: no worker became ready to kill",
                chaos_started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(25 + rng.below(50)));
            let serving = server.pids_logging("] serving");
            let candidates: Vec<Pid> = server
                .workers()
                .into_iter()
                .filter(|pid| serving.contains(pid))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let victim = candidates[rng.below(candidates.len() as u64) as usize];
            if kill(victim, Signal::SIGKILL).is_ok() {
                kills += 1;
            }
        }
        stop.store(true, Ordering::SeqCst);
        let tallies: Vec<Tally> = clients
            .into_iter()
            .map(|client| client.join().expect("a load client does not panic"))
            .collect();
        (tallies, auditor.join().expect("the auditor does not panic"))
    });
    // Every AUDIT answered during the chaos saw no half-applied transfer.
    load.check_audits(&audits);

    // The pool serves again, and no lock is left held: AUDIT takes every stripe lock. A
    // stuck lock would show as a read timeout here.
    server.wait_workers(2, Duration::from_secs(10));
    for _ in 0..8 {
        let fresh = load_connection(addr);
        let replies = send_batch(&fresh, b"PING\nAUDIT\n", 2);
        assert_eq!(
            replies.lines,
            ["PONG".to_string(), load.audit_reply()],
            "every connection, whichever worker takes it, is served and sees the exact total"
        );
    }
    let checked = load.check_balances(&server, &tallies);
    let drops: usize = tallies.iter().map(|t| t.drops).sum();
    let unknown: usize = tallies.iter().map(|t| t.unknown.len()).sum();
    eprintln!(
        "{kills} workers SIGKILLed in {CHAOS:?}; {drops} connections dropped; {} transfers \
         acknowledged, {} more proven applied by witnesses, {unknown} unknown ({} of them \
         applied); {} AUDITs during the chaos and the final total {} exact",
        checked.acked,
        checked.witnessed_only,
        checked.unknown_applied,
        audits.len(),
        load.total
    );
    assert!(drops > 0, "no kill hit a loaded worker");
    assert!(checked.acked > 0, "no transfer was acknowledged");
}

// ---------------------------------------------------------------------------------------
// Persistence and the ledger file
// ---------------------------------------------------------------------------------------

#[test]
fn balances_survive_a_graceful_restart_and_a_sigkill_of_the_whole_process_group() {
    balances_survive_restarts("never");
}

#[test]
fn balances_survive_restarts_with_fsync_always() {
    balances_survive_restarts("always");
}

fn balances_survive_restarts(fsync: &str) {
    let start = |dir: Option<std::sync::Arc<tempfile::TempDir>>| {
        let builder = Server::builder().args(["--fsync", fsync]);
        match dir {
            Some(dir) => builder.data_dir(dir).start(),
            None => builder.start(),
        }
    };
    let mut server = start(None);
    let mut bank = server.connect_bank();
    let long_name = "L".repeat(64);
    expect_replies(
        &mut bank,
        &[
            ("DEPOSIT alice 100", "OK 100"),
            ("DEPOSIT Alice 7", "OK 7"),
            ("TRANSFER alice bob 40", "OK 60 40"),
            ("DEPOSIT empty 5", "OK 5"),
            ("WITHDRAW empty 5", "OK 0"),
            (&format!("DEPOSIT {long_name} {MAX}"), &format!("OK {MAX}")),
            (&format!("DEPOSIT max2 {MAX}"), &format!("OK {MAX}")),
        ],
    );
    let names = ["alice", "Alice", "bob", "empty", &long_name, "max2"];
    let before = snapshot(&mut bank, &names);
    assert_eq!(
        before.last().map(String::as_str),
        Some("OK 18446744073709551721 6")
    );
    drop(bank);

    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    let mut server = start(Some(server.data_dir()));
    let mut bank = server.connect_bank();
    assert_eq!(
        snapshot(&mut bank, &names),
        before,
        "after SIGTERM and restart"
    );

    expect_replies(
        &mut bank,
        &[
            ("TRANSFER Alice carol 7", "OK 0 7"),
            ("WITHDRAW max2 1", &format!("OK {}", MAX - 1)),
        ],
    );
    let names = [
        "alice", "Alice", "bob", "carol", "empty", &long_name, "max2",
    ];
    let before = snapshot(&mut bank, &names);
    drop(bank);
    killpg(server.pid, Signal::SIGKILL).expect("SIGKILL the process group");
    // The output ends once the master and every worker are gone (and the ledger unlocked).
    server.wait_exit(Duration::from_secs(10));
    let server = start(Some(server.data_dir()));
    let mut bank = server.connect_bank();
    assert_eq!(
        snapshot(&mut bank, &names),
        before,
        "after SIGKILL and restart"
    );
}

#[test]
fn a_corrupted_truncated_or_other_version_ledger_is_refused_untouched() {
    let valid = valid_ledger_bytes();
    let mut rng = Rng(42);
    let garbage: Vec<u8> = (0..valid.len()).map(|_| rng.next_u64() as u8).collect();
    let mut other_version = valid.clone();
    // The layout version: a little-endian u32 right after the 8-byte magic.
    assert_eq!(&other_version[8..12], &1u32.to_le_bytes());
    other_version[8..12].copy_from_slice(&2u32.to_le_bytes());
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("garbage", garbage, "not a forkpool ledger"),
        ("truncated", valid[..valid.len() / 2].to_vec(), "truncated"),
        (
            "cut by a page",
            valid[..valid.len() - 4096].to_vec(),
            "truncated",
        ),
        ("empty", Vec::new(), "truncated"),
        ("other version", other_version, "version 2"),
    ];
    for (what, bytes, cause) in cases {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("ledger.bin");
        std::fs::write(&path, &bytes).expect("write the ledger file");
        let mut server = Server::builder()
            .args(ledger_args(&path, SMALL_CAPACITY))
            .spawn();
        let output = server.wait_refused(what);
        let error = one_error_line(&output, &path, what);
        assert!(
            error.contains(cause),
            "{what}: expected {cause:?} in {error:?}"
        );
        assert!(
            std::fs::read(&path).expect("read the ledger file") == bytes,
            "{what}: the refused file was modified"
        );
    }
}

#[test]
fn a_ledger_of_another_capacity_is_refused_untouched() {
    let valid = valid_ledger_bytes();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("ledger.bin");
    std::fs::write(&path, &valid).expect("write the ledger file");
    let mut server = Server::builder()
        .args(ledger_args(&path, SMALL_CAPACITY + 1))
        .spawn();
    let output = server.wait_refused("another capacity");
    let error = one_error_line(&output, &path, "another capacity");
    assert!(error.contains(&SMALL_CAPACITY.to_string()), "{error}");
    assert!(std::fs::read(&path).expect("read the ledger file") == valid);
}

#[test]
fn a_second_server_on_a_ledger_in_use_is_refused_and_the_first_keeps_serving() {
    let first = Server::start();
    let mut bank = first.connect_bank();
    assert_eq!(request_line(&mut bank, "DEPOSIT kept 42"), "OK 42");
    let path = first.data_dir().path().join("ledger.bin");
    let mut second = Server::builder()
        .args(["--ledger", path.to_str().expect("a UTF-8 path")])
        .spawn();
    let output = second.wait_refused("a ledger in use");
    let error = one_error_line(&output, &path, "a ledger in use");
    assert!(error.contains("locked"), "{error}");
    expect_replies(
        &mut bank,
        &[("BALANCE kept", "OK 42"), ("AUDIT", "OK 42 1")],
    );
    let mut fresh = first.connect_bank();
    assert_eq!(request_line(&mut fresh, "DEPOSIT kept 1"), "OK 43");
}

// ---------------------------------------------------------------------------------------
// Bank and echo together
// ---------------------------------------------------------------------------------------

fn one_worker_serves_bank_and_echo_connections_at_the_same_time(ledger: LedgerKind) {
    let Some(server) = bank_server(ledger, &["--workers", "1"]) else {
        return;
    };
    let worker = server.wait_workers(1, Duration::from_secs(5))[0];
    let mut echo = server.connect_echo();
    let mut bank = server.connect_bank();
    // Half a request on each, then the rest: each connection keeps its own state.
    echo.write_all(b"ping and ").expect("send to echo");
    bank.write_all(b"DEPOSIT sh").expect("send to bank");
    echo.write_all(b"deposit\n").expect("send to echo");
    bank.write_all(b"ared 5\n").expect("send to bank");
    assert_eq!(read_line(&mut bank), "OK 5");
    assert_eq!(read_line(&mut echo), "PING AND DEPOSIT");
    for i in 1..=20u64 {
        echo.write_all(format!("round {i}\n").as_bytes())
            .expect("send to echo");
        bank.write_all(b"deposit shared 1\n").expect("send to bank");
        assert_eq!(read_line(&mut bank), format!("OK {}", 5 + i));
        assert_eq!(read_line(&mut echo), format!("ROUND {i}"));
    }
    assert_eq!(request_line(&mut bank, "ping"), "PONG");
    assert_eq!(request_line(&mut echo, "ping"), "PING");
    let accepted_bank = wait_for_pids_logging(&server, log_phrase::ACCEPTED_BANK, 1);
    let accepted_echo = wait_for_pids_logging(&server, log_phrase::ACCEPTED_ECHO, 1);
    assert_eq!(accepted_bank, BTreeSet::from([worker]));
    assert_eq!(accepted_echo, BTreeSet::from([worker]));
}

// ---------------------------------------------------------------------------------------
// Helpers: requests and replies
// ---------------------------------------------------------------------------------------

/// Sends each request in turn and checks its exact reply.
#[track_caller]
fn expect_replies(stream: &mut TcpStream, transcript: &[(&str, &str)]) {
    for (request, reply) in transcript {
        assert_eq!(
            request_line(stream, request),
            *reply,
            "reply to {request:?}"
        );
    }
}

/// Sends one raw request line (any bytes) and returns the reply line.
fn ask_raw(stream: &mut TcpStream, request: &[u8]) -> String {
    let mut line = request.to_vec();
    line.push(b'\n');
    stream.write_all(&line).expect("send a request");
    read_line(stream)
}

/// Checks that `reply` is `ERR <kind> <detail>` with a detail that is one non-empty line of
/// printable ASCII (the exact wording is checked once, in
/// `every_error_detail_names_what_it_is_about_in_one_style`).
#[track_caller]
fn assert_err(reply: &str, kind: &str, request: &[u8]) {
    let request = String::from_utf8_lossy(&request[..request.len().min(80)]).into_owned();
    let detail = reply
        .strip_prefix("ERR ")
        .and_then(|rest| rest.strip_prefix(kind))
        .and_then(|rest| rest.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{request:?}: expected ERR {kind} <detail>, got {reply:?}"));
    assert!(
        !detail.trim().is_empty() && detail.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "{request:?}: the detail must be one non-empty printable line: {reply:?}"
    );
}

/// Reads until the server closes the connection; anything more than EOF is a failure.
#[track_caller]
fn assert_closed(stream: &mut TcpStream, when: &str) {
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("{when}: expected a clean close, got {e}"));
    assert!(rest.is_empty(), "{when}: unexpected bytes {rest:?}");
}

/// BALANCE of each name, then AUDIT: the replies, for comparing two moments.
fn snapshot(bank: &mut TcpStream, names: &[&str]) -> Vec<String> {
    let mut replies: Vec<String> = names
        .iter()
        .map(|name| request_line(bank, &format!("BALANCE {name}")))
        .collect();
    replies.push(request_line(bank, "AUDIT"));
    replies
}

/// Waits until at least `count` distinct processes logged `fragment` and returns them.
fn wait_for_pids_logging(server: &Server, fragment: &str, count: usize) -> BTreeSet<Pid> {
    wait_until(
        &format!("{count} processes to log {fragment:?}"),
        Duration::from_secs(5),
        || {
            let pids = server.pids_logging(fragment);
            (pids.len() >= count).then_some(pids)
        },
    )
}

// ---------------------------------------------------------------------------------------
// Helpers: the transfer load
// ---------------------------------------------------------------------------------------
//
// Load clients move money at random among ACCOUNTS shared accounts, in pipelined batches.
// Between any two of its transfers (and before the first and after the last) a client moves
// 1 between two accounts of its own, its *witnesses*: `W T W T ... T W`. A connection's
// requests are carried out in order, so when a worker dies with a batch in hand, the
// witness balance (read after reconnecting) says how far it got: every transfer before the
// last applied witness was applied, the one right after it may or may not have been, and
// the rest were not. So at most one transfer per dropped connection has an unknown outcome.
// Balances (10^9) dwarf amounts (at most 10^6), so no transfer is ever refused: a transfer
// that was carried out was applied.

/// Accounts the load moves money between.
const ACCOUNTS: usize = 100;
/// Concurrent load clients, each on its own connection.
const CLIENTS: usize = 16;
/// Opening balance of every account of the load (the shared ones get their index added).
const OPENING_BALANCE: u64 = 1_000_000_000;
/// Largest amount of one transfer of the load. Large, random amounts make it unlikely that
/// a lost transfer is mistaken for a combination of unknown ones.
const MAX_TRANSFER: u64 = 1_000_000;
/// How long a load client waits for a reply before declaring the server stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn account_name(index: usize) -> String {
    format!("acct-{index:02}")
}

/// The two witness accounts of a client: (source, destination).
fn witness_names(client: usize) -> (String, String) {
    (format!("w{client:02}.src"), format!("w{client:02}.dst"))
}

/// The accounts of the load, opened before any client starts.
struct Load {
    /// Opening balance of each shared account.
    initial: Vec<u64>,
    /// Money in the ledger, which the load must conserve exactly.
    total: u128,
    /// Accounts in the ledger: the shared ones and two witnesses per client.
    accounts: usize,
}

/// What [`Load::check_balances`] established.
struct Checked {
    /// Transfers answered `OK`.
    acked: usize,
    /// Transfers without a reply that witnesses prove applied.
    witnessed_only: usize,
    /// Unknown transfers that the balances say were applied.
    unknown_applied: usize,
}

impl Load {
    /// Opens the shared accounts (balance OPENING_BALANCE + index) and every client's
    /// witnesses (OPENING_BALANCE and 1: an account opens with a deposit).
    fn open(server: &Server) -> Load {
        let initial: Vec<u64> = (0..ACCOUNTS as u64).map(|i| OPENING_BALANCE + i).collect();
        let mut requests: Vec<(String, u64)> = initial
            .iter()
            .enumerate()
            .map(|(i, &balance)| (account_name(i), balance))
            .collect();
        for client in 0..CLIENTS {
            let (source, destination) = witness_names(client);
            requests.push((source, OPENING_BALANCE));
            requests.push((destination, 1));
        }
        let lines: String = requests
            .iter()
            .map(|(name, amount)| format!("DEPOSIT {name} {amount}\n"))
            .collect();
        let replies = send_batch(&server.connect_bank(), lines.as_bytes(), requests.len());
        assert!(
            !replies.dropped,
            "the connection dropped while opening accounts"
        );
        let expected: Vec<String> = requests.iter().map(|(_, b)| format!("OK {b}")).collect();
        assert_eq!(replies.lines, expected);
        Load {
            total: requests.iter().map(|(_, b)| u128::from(*b)).sum(),
            accounts: requests.len(),
            initial,
        }
    }

    /// The exact AUDIT reply: all the money, every account.
    fn audit_reply(&self) -> String {
        format!("OK {} {}", self.total, self.accounts)
    }

    /// Every AUDIT taken during the load saw all the money and every account: never a
    /// half-applied transfer.
    #[track_caller]
    fn check_audits(&self, audits: &[String]) {
        let exact = self.audit_reply();
        assert!(!audits.is_empty(), "no AUDIT was answered during the load");
        if let Some(wrong) = audits.iter().find(|audit| **audit != exact) {
            panic!("an AUDIT during the load answered {wrong:?}, expected {exact:?}");
        }
    }

    /// Checks the final balances: each witness pair holds exactly what its client counted;
    /// each shared account holds its opening balance plus every transfer known applied
    /// plus some subset of the unknown ones; AUDIT is exact.
    fn check_balances(&self, server: &Server, tallies: &[Tally]) -> Checked {
        let mut names: Vec<String> = (0..ACCOUNTS).map(account_name).collect();
        for client in 0..CLIENTS {
            let (source, destination) = witness_names(client);
            names.extend([source, destination]);
        }
        let mut bank = server.connect_bank();
        let balances = balances(&bank, &names);
        for (client, tally) in tallies.iter().enumerate() {
            let at = ACCOUNTS + 2 * client;
            assert_eq!(
                (balances[at], balances[at + 1]),
                (OPENING_BALANCE - tally.witnessed, 1 + tally.witnessed),
                "client {client}'s witnesses"
            );
        }
        let known: Vec<&Transfer> = tallies.iter().flat_map(|t| &t.applied).collect();
        let unknown: Vec<&Transfer> = tallies.iter().flat_map(|t| &t.unknown).collect();
        let mut unknown_applied = 0;
        for (account, &balance) in balances[..ACCOUNTS].iter().enumerate() {
            // In i128: the clients' transfers interleave in no order known here.
            let expected = i128::from(self.initial[account])
                + known.iter().map(|t| t.delta(account)).sum::<i128>();
            let difference = i128::from(balance) - expected;
            let candidates: Vec<i128> = unknown
                .iter()
                .map(|t| t.delta(account))
                .filter(|&d| d != 0)
                .collect();
            let applied = subset_reaching(&candidates, difference).unwrap_or_else(|| {
                panic!(
                    "account {} holds {balance}, but its opening balance and the transfers \
                     known applied make {expected}; no subset of its unknown transfers \
                     {candidates:?} explains the difference {difference}",
                    account_name(account)
                )
            });
            unknown_applied += applied;
        }
        assert_eq!(request_line(&mut bank, "AUDIT"), self.audit_reply());
        let acked: usize = tallies.iter().map(|t| t.acked).sum();
        Checked {
            acked,
            witnessed_only: known.len() - acked,
            // Each applied unknown transfer was counted at both of its accounts.
            unknown_applied: unknown_applied / 2,
        }
    }
}

/// The balance of each account, pipelined on one connection.
fn balances(bank: &TcpStream, names: &[String]) -> Vec<u64> {
    let requests: String = names
        .iter()
        .map(|name| format!("BALANCE {name}\n"))
        .collect();
    let replies = send_batch(bank, requests.as_bytes(), names.len());
    assert!(
        !replies.dropped,
        "the connection dropped while reading balances"
    );
    replies
        .lines
        .iter()
        .map(|line| {
            line.strip_prefix("OK ")
                .and_then(|b| b.parse().ok())
                .unwrap_or_else(|| panic!("BALANCE answered {line:?}"))
        })
        .collect()
}

/// What one load client saw.
#[derive(Debug, Default)]
struct Tally {
    /// Transfers known applied: answered `OK`, or followed by an applied witness.
    applied: Vec<Transfer>,
    /// How many of `applied` were answered.
    acked: usize,
    /// Transfers that may or may not have been applied (at most one per drop).
    unknown: Vec<Transfer>,
    /// Connections that dropped (EOF or reset) with replies outstanding.
    drops: usize,
    /// Witness transfers applied (the witness destination's balance minus 1).
    witnessed: u64,
}

/// One load client: `batch` random transfers per pipelined round trip, interleaved with
/// witness transfers, for as long as `more()` says. A connection that drops is replaced,
/// and the witness balance then classifies the batch's unanswered transfers.
fn run_transfers(
    addr: SocketAddr,
    ledger: LedgerKind,
    client: usize,
    batch: usize,
    mut more: impl FnMut() -> bool,
) -> Tally {
    let mut rng = Rng(client as u64);
    let (source, destination) = witness_names(client);
    let witness = format!("TRANSFER {source} {destination} 1\n");
    let mut tally = Tally::default();
    let mut stream = None;
    while more() {
        let transfers: Vec<Transfer> = (0..batch)
            .map(|_| {
                let from = rng.below(ACCOUNTS as u64) as usize;
                let to = (from + 1 + rng.below(ACCOUNTS as u64 - 1) as usize) % ACCOUNTS;
                let amount = 1 + rng.below(MAX_TRANSFER);
                Transfer { from, to, amount }
            })
            .collect();
        // W T W T ... T W: reply 2i+1 answers transfer i, the even ones the witnesses.
        let mut requests = witness.clone();
        for t in &transfers {
            requests.push_str(&format!(
                "TRANSFER {} {} {}\n{witness}",
                account_name(t.from),
                account_name(t.to),
                t.amount
            ));
        }
        let witnessed_before = tally.witnessed;
        let connection = stream.get_or_insert_with(|| load_connection(addr));
        let replies = send_batch(connection, requests.as_bytes(), 2 * batch + 1);
        for (at, reply) in replies.lines.iter().enumerate() {
            let balances = transfer_reply(reply)
                .unwrap_or_else(|| panic!("client {client}: unexpected reply {reply:?}"));
            if at % 2 == 0 {
                tally.witnessed += 1;
                assert_eq!(
                    balances.1,
                    1 + tally.witnessed,
                    "client {client}: a witness reply out of step"
                );
            } else {
                tally.applied.push(transfers[at / 2]);
                tally.acked += 1;
            }
        }
        if replies.dropped {
            tally.drops += 1;
            // How many of this batch's witnesses were applied, replies or not.
            settle_killed_requests(ledger);
            let (held, fresh) = balance_on_a_fresh_connection(addr, &destination);
            stream = Some(fresh);
            let applied = usize::try_from(held - 1 - witnessed_before).expect("a small count");
            let answered = replies.lines.len();
            assert!(
                applied <= batch + 1 && answered.div_ceil(2) <= applied,
                "client {client}: {applied} witnesses applied, {answered} replies received"
            );
            tally.witnessed = held - 1;
            // Transfer i comes after witness i and before witness i + 1.
            let unanswered = answered / 2..transfers.len();
            for i in unanswered {
                if i + 1 < applied {
                    tally.applied.push(transfers[i]);
                } else if i + 1 == applied {
                    tally.unknown.push(transfers[i]);
                }
            }
        }
    }
    tally
}

/// Waits until every request of a killed worker has its final outcome: at once with the
/// ledger file (a killed worker's operation is repaired before anyone reads), after the
/// killed workers' database connections are gone with PostgreSQL.
fn settle_killed_requests(ledger: LedgerKind) {
    if ledger == LedgerKind::Postgres {
        if let Some(cluster) = forkpool_testkit::pg::postgres() {
            cluster.wait_dead_workers_gone();
        }
    }
}

/// Reads an account's balance on a new connection (again if a kill drops that one too) and
/// returns the connection with it.
fn balance_on_a_fresh_connection(addr: SocketAddr, name: &str) -> (u64, TcpStream) {
    let request = format!("BALANCE {name}\n");
    wait_until(&format!("the balance of {name}"), REPLY_TIMEOUT, || {
        let stream = load_connection(addr);
        let replies = send_batch(&stream, request.as_bytes(), 1);
        let line = replies.lines.first()?;
        let balance = line
            .strip_prefix("OK ")
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("BALANCE {name} answered {line:?}"));
        Some((balance, stream))
    })
}

/// The two balances of `OK <from_balance> <to_balance>`, each within 0..=2^63-1.
fn transfer_reply(reply: &str) -> Option<(u64, u64)> {
    let mut fields = reply.strip_prefix("OK ")?.split(' ');
    let from: u64 = fields.next()?.parse().ok()?;
    let to: u64 = fields.next()?.parse().ok()?;
    (fields.next().is_none() && from <= MAX && to <= MAX).then_some((from, to))
}

/// A connection for a load client, retried while a killed worker's slot waits for its
/// replacement.
fn load_connection(addr: SocketAddr) -> TcpStream {
    let stream = wait_until("a connection to the bank", REPLY_TIMEOUT, || {
        TcpStream::connect_timeout(&addr, REPLY_TIMEOUT).ok()
    });
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("set a read timeout");
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .expect("set a write timeout");
    stream.set_nodelay(true).expect("set TCP_NODELAY");
    stream
}

/// The complete reply lines to a pipelined batch, in order, and whether the connection
/// dropped (EOF or reset) before all of them arrived. A reply line cut by the drop is not
/// counted.
struct BatchReplies {
    lines: Vec<String>,
    dropped: bool,
}

/// Sends `requests` from one thread while reading the `expected` replies on this one (a
/// client that only writes could deadlock on backpressure). A read timeout fails the test:
/// the server is stuck.
fn send_batch(stream: &TcpStream, requests: &[u8], expected: usize) -> BatchReplies {
    std::thread::scope(|scope| {
        // A failed write shows up as a dropped connection on the reading side.
        scope.spawn(|| {
            let mut writer = stream;
            let _ = writer.write_all(requests);
        });
        let mut reader = BufReader::new(stream);
        let mut lines = Vec::with_capacity(expected);
        while lines.len() < expected {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(_) if line.last() == Some(&b'\n') => {
                    line.pop();
                    lines.push(String::from_utf8_lossy(&line).into_owned());
                }
                Ok(_) => {
                    return BatchReplies {
                        lines,
                        dropped: true,
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "no reply within {REPLY_TIMEOUT:?} ({} of {expected} received): \
                         the server is stuck",
                        lines.len()
                    )
                }
                Err(_) => {
                    return BatchReplies {
                        lines,
                        dropped: true,
                    }
                }
            }
        }
        BatchReplies {
            lines,
            dropped: false,
        }
    })
}

/// Sends AUDIT over and over until `stop`, reconnecting after a drop; returns every answer.
fn audit_while(addr: SocketAddr, stop: &AtomicBool) -> Vec<String> {
    let mut answers = Vec::new();
    let mut stream = None;
    while !stop.load(Ordering::SeqCst) {
        let connection = stream.get_or_insert_with(|| load_connection(addr));
        let replies = send_batch(connection, b"AUDIT\n", 1);
        answers.extend(replies.lines);
        if replies.dropped {
            stream = None;
        }
    }
    answers
}

// ---------------------------------------------------------------------------------------
// Helpers: ledger files
// ---------------------------------------------------------------------------------------

/// Capacity of the ledgers made for the bad-file tests (a small file is quick to copy).
const SMALL_CAPACITY: u64 = 1000;

fn ledger_args(path: &Path, capacity: u64) -> Vec<String> {
    vec![
        "--ledger".into(),
        path.to_str().expect("a UTF-8 path").into(),
        "--max-accounts".into(),
        capacity.to_string(),
    ]
}

/// The bytes of a valid ledger file with a few accounts, written by a real server that then
/// stopped gracefully.
fn valid_ledger_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("ledger.bin");
    let mut server = Server::builder()
        .args(ledger_args(&path, SMALL_CAPACITY))
        .start();
    let mut bank = server.connect_bank();
    expect_replies(
        &mut bank,
        &[
            ("DEPOSIT alice 100", "OK 100"),
            ("TRANSFER alice bob 1", "OK 99 1"),
        ],
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    std::fs::read(&path).expect("read the ledger file")
}
