//! forkpool-bench: the load-test client for forkpool-server. See `--help`, and the modules:
//! `args` (command line), `load` (payloads, mix, open-loop schedule), `workload` (requests and
//! reply checks), `driver` (the mio event loop of one thread), `stats`, `timer` (sub-millisecond wake-ups), `cpu` (/proc and
//! getrusage), `book` and `bank_setup` (bank bookkeeping and audit), `report`, and `run`
//! (one run start to end).

mod args;
mod bank_setup;
mod book;
mod cpu;
mod driver;
mod load;
mod report;
mod run;
mod stats;
mod timer;
mod tls;
mod workload;

use std::process::ExitCode;

/// Status for a run that could not start (clap uses 2 for usage errors too).
const EXIT_CANNOT_START: u8 = 2;

fn main() -> ExitCode {
    let cli = args::parse();
    let outcome = match &cli.mode {
        args::Mode::Echo(a) => run::echo(a).map(|r| (r, a.load.json)),
        args::Mode::Bank(a) => run::bank(a).map(|r| (r, a.load.json)),
    };
    match outcome {
        Ok((report, json)) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("forkpool-bench: cannot encode the report: {e}"),
                }
            } else {
                print!("{}", report.text());
            }
            ExitCode::from(u8::try_from(report.exit_code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("forkpool-bench: {e:#}");
            ExitCode::from(EXIT_CANNOT_START)
        }
    }
}
