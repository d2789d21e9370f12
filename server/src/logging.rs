//! Logging set-up: env_logger (`RUST_LOG`, default `info`) with every line saying which
//! process wrote it, the master or a worker with its slot, and its pid.

use std::io::Write;
use std::sync::Mutex;

/// The name of this process in log lines; a forked worker replaces the master's.
static ROLE: Mutex<String> = Mutex::new(String::new());

/// Installs the logger; lines are tagged `master` until [`set_role`] says otherwise.
pub fn init() {
    set_role("master".to_string());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let role = ROLE.lock().map(|r| r.clone()).unwrap_or_default();
            writeln!(
                buf,
                "{} {:<5} [{} pid={}] {}",
                buf.timestamp_millis(),
                record.level(),
                role,
                std::process::id(),
                record.args()
            )
        })
        .init();
}

/// Names this process in every later log line (e.g. `worker 3`).
pub fn set_role(role: String) {
    if let Ok(mut current) = ROLE.lock() {
        *current = role;
    }
}
