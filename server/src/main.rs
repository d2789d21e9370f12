//! forkpool-server: parse the settings, start the master, and turn a start-up failure into
//! one clear line on stderr and a non-zero exit status.

mod access;
mod bank;
mod broker;
mod channel;
mod config;
mod conn;
mod db;
mod durability;
mod handover;
mod inherit;
mod ledger_store;
mod listener;
mod logging;
mod master;
mod master_link;
mod pidfile;
mod pool;
mod process;
mod proxy;
mod queue;
mod scoreboard;
mod service;
mod status;
mod tls;
mod unix_listener;
mod upgrade;
mod users;
mod wakeup;
mod worker;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

fn main() -> ExitCode {
    logging::init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkpool-server: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = config::Cli::parse();
    if let Some(config::Command::GenToken { name, rights }) = &cli.command {
        return users::print_new_token(name, *rights);
    }
    let config = config::Config::load(&cli)?;
    let nofile = process::raise_nofile_limit();
    // Built once here, the tables are shared by every worker forked from this process.
    forkpool_common::codec::prepare_uppercase_tables();
    let master = master::Master::new(cli, config)?;
    // Logged once the start can no longer fail: a failed start is one line on stderr.
    match nofile {
        Ok(limit) => log::info!("open file limit: {limit}"),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
    match master.run().context("master event loop failed")? {
        master::Outcome::Stopped => Ok(()),
        // A forked child: the master is gone from this process; serve until told to stop.
        master::Outcome::Worker(setup) => std::process::exit(worker::run(*setup)),
    }
}

/// The error and its causes on one line, without repeating a cause that a message already
/// quotes (our error types name their OS error themselves).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}
