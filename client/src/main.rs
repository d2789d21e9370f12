//! forkpool-bench: the load-test client for forkpool-server. See `--help`, and the modules:
//! `args` (command line), `load` (payloads, mix, open-loop schedule), `workload` (requests and
//! reply checks), `driver` (the mio event loop of one thread), `stats`, `timer` (sub-millisecond wake-ups), `cpu` (/proc and
//! getrusage), `book` and `bank_setup` (bank bookkeeping and audit), `report`, and `run`
//! (one run start to end); `queue` is the queue mode, with its own blocking client.

mod args;
mod bank_setup;
mod book;
mod cpu;
mod driver;
mod load;
mod queue;
mod report;
mod run;
mod stats;
mod timer;
mod tls;
mod workload;

use std::process::ExitCode;

use queue::QueueReport;
use report::Report;

/// Status for a run that could not start (clap uses 2 for usage errors too).
const EXIT_CANNOT_START: u8 = 2;

fn main() -> ExitCode {
    let cli = args::parse();
    match &cli.mode {
        args::Mode::Echo(a) => finish(run::echo(a), a.load.output.json, Report::text, |r| {
            r.exit_code
        }),
        args::Mode::Bank(a) => finish(run::bank(a), a.load.output.json, Report::text, |r| {
            r.exit_code
        }),
        args::Mode::Queue(a) => finish(queue::run(a), a.output.json, QueueReport::text, |r| {
            r.exit_code
        }),
    }
}

/// Prints a run's report (JSON or text) and turns it into the exit status.
fn finish<R: serde::Serialize>(
    outcome: anyhow::Result<R>,
    json: bool,
    text: fn(&R) -> String,
    exit_code: fn(&R) -> i32,
) -> ExitCode {
    match outcome {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("forkpool-bench: cannot encode the report: {e}"),
                }
            } else {
                print!("{}", text(&report));
            }
            ExitCode::from(u8::try_from(exit_code(&report)).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("forkpool-bench: {e:#}");
            ExitCode::from(EXIT_CANNOT_START)
        }
    }
}
