//! forkpool-bench: the load-test client (filled in by its own issue).
use clap::Parser;

/// Load-test client for forkpool-server.
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
}
