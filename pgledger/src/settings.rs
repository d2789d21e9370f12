//! The pool's settings: the database URL (completed from the usual `PG*` environment variables,
//! as libpq does), how many connections, the per-request deadline and the ledger's capacity.

use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::Config;

/// Default per-request deadline: a request not answered by then gets `ERR unavailable`
/// (unless its commit may have taken effect, see the crate docs).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// Default number of database connections of one pool (one pool per worker process).
pub const DEFAULT_CONNECTIONS: usize = 4;

/// Most connections one pool may open.
pub const MAX_CONNECTIONS: usize = 256;

/// Where libpq looks for a local server's socket when neither the URL nor `PGHOST` says.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Default port, when neither the URL nor `PGPORT` says.
pub const DEFAULT_PORT: u16 = 5432;

/// How the pool reaches and uses the database.
#[derive(Clone)]
pub struct PgSettings {
    /// Host(s), port, user, database, password: the URL completed from the environment.
    pub(crate) config: Config,
    /// Database connections of the pool (1..=[`MAX_CONNECTIONS`]).
    pub connections: usize,
    /// Per-request deadline (see [`DEFAULT_DEADLINE`]).
    pub deadline: Duration,
    /// Most accounts the ledger holds: stored in the database when the schema is created, and
    /// [`crate::prepare`] refuses a different value afterwards (as the ledger file does).
    pub max_accounts: u64,
}

/// A database URL or setting the pool cannot use. The URL itself is never quoted: it may hold a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("the ledger URL does not parse: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("environment variable {name} = {value:?} is invalid: {reason}")]
    Environment {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "sslmode=require: TLS to the database is not built in yet; use a Unix socket or a \
         trusted network with sslmode=disable or prefer"
    )]
    TlsRequired,
    #[error("the ledger URL names no user and the environment gives none (PGUSER, USER)")]
    NoUser,
    #[error("{name} = {value}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl PgSettings {
    /// Reads a `postgres://` or `postgresql://` URL (the libpq key=value form is accepted too).
    /// What the URL leaves out is taken from `PGHOST`, `PGPORT` (both only when the URL names
    /// no host: a host without a port means 5432), `PGUSER`, `PGPASSWORD`,
    /// `PGDATABASE`, `PGSSLMODE`, `PGAPPNAME` and `PGCONNECT_TIMEOUT`, then from libpq's
    /// defaults (socket directory [`DEFAULT_SOCKET_DIR`], port 5432, the login name as user, the
    /// user as database). Connections, deadline and capacity start at their defaults.
    pub fn from_url(url: &str, max_accounts: u64) -> Result<PgSettings, SettingsError> {
        Self::from_url_with_env(url, max_accounts, |name| std::env::var(name).ok())
    }

    /// [`PgSettings::from_url`] with the environment given as a function (for tests).
    pub fn from_url_with_env(
        url: &str,
        max_accounts: u64,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<PgSettings, SettingsError> {
        let mut config: Config = url.parse().map_err(SettingsError::Url)?;
        complete_from_env(&mut config, &env)?;
        if config.get_ssl_mode() == SslMode::Require {
            return Err(SettingsError::TlsRequired);
        }
        let settings = PgSettings {
            config,
            connections: DEFAULT_CONNECTIONS,
            deadline: DEFAULT_DEADLINE,
            max_accounts,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the numbers against their ranges.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(SettingsError::Invalid {
                name: "connections",
                value: self.connections.to_string(),
                reason: "must be 1 to 256",
            });
        }
        if self.deadline < Duration::from_millis(10) {
            return Err(SettingsError::Invalid {
                name: "deadline",
                value: format!("{:?}", self.deadline),
                reason: "must be at least 10 ms",
            });
        }
        if !(1..=i64::MAX as u64).contains(&self.max_accounts) {
            return Err(SettingsError::Invalid {
                name: "max_accounts",
                value: self.max_accounts.to_string(),
                reason: "must be 1 to 2^63-1",
            });
        }
        Ok(())
    }

    /// Appends ` {label}` to the connections' `application_name` (e.g. the worker's pid, so
    /// that `pg_stat_activity` tells which process each connection serves).
    pub fn label_connections(&mut self, label: &str) {
        let name = self.config.get_application_name().unwrap_or("forkpool");
        let labelled = format!("{name} {label}");
        self.config.application_name(labelled);
    }

    /// Where the pool connects, for logs (no user, no password).
    pub fn target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(name)) => name.clone(),
            Some(Host::Unix(dir)) => dir.display().to_string(),
            None => DEFAULT_SOCKET_DIR.to_string(),
        };
        let port = self
            .config
            .get_ports()
            .first()
            .copied()
            .unwrap_or(DEFAULT_PORT);
        let db = self.config.get_dbname().unwrap_or("");
        format!("{host}:{port}/{db}")
    }
}

/// Fills what the URL left out from the environment and libpq's defaults.
fn complete_from_env(
    config: &mut Config,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), SettingsError> {
    if config.get_hosts().is_empty() {
        match env("PGHOST").filter(|h| !h.is_empty()) {
            Some(hosts) => {
                for host in hosts.split(',') {
                    config.host(host);
                }
            }
            None => {
                config.host_path(DEFAULT_SOCKET_DIR);
            }
        }
    }
    // tokio-postgres gives every host of the URL a port (5432 when none is written).
    if config.get_ports().is_empty() {
        if let Some(port) = env("PGPORT").filter(|p| !p.is_empty()) {
            let number = port.parse().map_err(|_| SettingsError::Environment {
                name: "PGPORT",
                value: port.clone(),
                reason: "not a port number",
            })?;
            config.port(number);
        }
    }
    if config.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .filter(|u| !u.is_empty())
            .ok_or(SettingsError::NoUser)?;
        config.user(user);
    }
    if config.get_password().is_none() {
        if let Some(password) = env("PGPASSWORD") {
            config.password(password);
        }
    }
    if config.get_dbname().is_none() {
        let db = env("PGDATABASE")
            .filter(|d| !d.is_empty())
            .or_else(|| config.get_user().map(str::to_owned));
        if let Some(db) = db {
            config.dbname(db);
        }
    }
    if let Some(mode) = env("PGSSLMODE") {
        // The URL's own sslmode wins; tokio-postgres cannot tell an explicit `prefer` from
        // its default, so only a URL without `sslmode` takes the environment's.
        if config.get_ssl_mode() == SslMode::Prefer {
            config.ssl_mode(match mode.as_str() {
                "disable" => SslMode::Disable,
                "allow" | "prefer" => SslMode::Prefer,
                "require" | "verify-ca" | "verify-full" => SslMode::Require,
                _ => {
                    return Err(SettingsError::Environment {
                        name: "PGSSLMODE",
                        value: mode,
                        reason: "not an sslmode",
                    })
                }
            });
        }
    }
    if config.get_application_name().is_none() {
        config.application_name(env("PGAPPNAME").unwrap_or_else(|| "forkpool".to_string()));
    }
    if config.get_connect_timeout().is_none() {
        if let Some(seconds) = env("PGCONNECT_TIMEOUT").filter(|s| !s.is_empty()) {
            let seconds: u64 = seconds.parse().map_err(|_| SettingsError::Environment {
                name: "PGCONNECT_TIMEOUT",
                value: seconds.clone(),
                reason: "not a whole number of seconds",
            })?;
            config.connect_timeout(Duration::from_secs(seconds));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn settings(url: &str, vars: &[(&str, &str)]) -> Result<PgSettings, SettingsError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PgSettings::from_url_with_env(url, 100, |name| vars.get(name).cloned())
    }

    #[test]
    fn the_url_wins_over_the_environment() {
        let s = settings(
            "postgres://bank:pw@db.example:6000/money",
            &[("PGHOST", "other"), ("PGPORT", "1"), ("PGUSER", "x")],
        )
        .expect("valid");
        assert_eq!(s.config.get_hosts(), &[Host::Tcp("db.example".into())]);
        assert_eq!(s.config.get_ports(), &[6000]);
        assert_eq!(s.config.get_user(), Some("bank"));
        assert_eq!(s.config.get_password(), Some(&b"pw"[..]));
        assert_eq!(s.config.get_dbname(), Some("money"));
        assert_eq!(s.target(), "db.example:6000/money");
        let mut s = settings("postgres://u@h/db", &[]).expect("valid");
        s.label_connections("worker 42");
        assert_eq!(s.config.get_application_name(), Some("forkpool worker 42"));
    }

    #[test]
    fn the_environment_fills_what_the_url_leaves_out() {
        let s = settings(
            "postgresql://",
            &[
                ("PGHOST", "/tmp/pg"),
                ("PGPORT", "5433"),
                ("PGUSER", "teller"),
                ("PGPASSWORD", "s3"),
                ("PGSSLMODE", "disable"),
            ],
        )
        .expect("valid");
        assert_eq!(
            s.config.get_hosts(),
            &[Host::Unix(PathBuf::from("/tmp/pg"))]
        );
        assert_eq!(s.config.get_ports(), &[5433]);
        assert_eq!(s.config.get_user(), Some("teller"));
        assert_eq!(s.config.get_password(), Some(&b"s3"[..]));
        // libpq's default database is the user's name.
        assert_eq!(s.config.get_dbname(), Some("teller"));
        assert_eq!(s.config.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn a_socket_directory_can_be_given_in_the_url() {
        let s = settings("postgresql://u@%2Ftmp%2Fsock/db", &[]).expect("valid");
        assert_eq!(
            s.config.get_hosts(),
            &[Host::Unix(PathBuf::from("/tmp/sock"))]
        );
        let s = settings("postgresql:///db?host=/tmp/sock&user=u", &[]).expect("valid");
        assert_eq!(
            s.config.get_hosts(),
            &[Host::Unix(PathBuf::from("/tmp/sock"))]
        );
        let s = settings("postgresql:///db", &[("USER", "me")]).expect("valid");
        assert_eq!(
            s.config.get_hosts(),
            &[Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))]
        );
    }

    #[test]
    fn bad_urls_and_variables_are_refused_without_quoting_the_url() {
        let e = settings("postgres://u:topsecret@h:notaport/db", &[])
            .err()
            .expect("bad");
        assert!(!e.to_string().contains("topsecret"), "{e}");
        assert!(matches!(
            settings("postgres:///db", &[("PGPORT", "x"), ("PGUSER", "u")]),
            Err(SettingsError::Environment { name: "PGPORT", .. })
        ));
        assert!(matches!(
            settings("postgres://u@h/db?sslmode=require", &[]),
            Err(SettingsError::TlsRequired)
        ));
        assert!(matches!(
            settings("postgres://h/db", &[]),
            Err(SettingsError::NoUser)
        ));
        assert!(matches!(
            PgSettings::from_url_with_env("postgres://u@h/db", 0, |_| None),
            Err(SettingsError::Invalid {
                name: "max_accounts",
                ..
            })
        ));
    }
}
