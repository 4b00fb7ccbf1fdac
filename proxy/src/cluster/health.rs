//! Health checks: connect and `SHOW server_version` on every in-sync backend at an interval.
//!
//! A backend that fails `health_check_failures` checks in a row leaves as `down`. Sessions find
//! failures on their own connections faster; this catches a backend nobody is using.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backend, BackendState, Cluster};
use crate::config::Config;

/// Where and how Chorus's own connections (health checks, catalog loads, verify) log in.
pub struct Login<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
    pub application: &'a str,
    pub timeout: Duration,
}

impl<'a> Login<'a> {
    /// Chorus's own login as the health check user (health checks, catalog, verify, joins).
    pub fn health(cfg: &'a Config, host: &'a str, port: u16, database: &'a str, application: &'a str) -> Login<'a> {
        let user = cfg.health_user();
        Login { host, port, user: &user.name, password: &user.password, database, application, timeout: cfg.connect_timeout }
    }

    /// Connects, with the connection driven by a task of its own.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = self.config().connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Connects over TLS with `tls` (plaintext when None), driven by a task of its own.
    pub async fn connect_with(
        &self,
        tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let Some(tls) = tls else { return self.connect().await };
        let mut pg = self.config();
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, conn) = pg.connect(tls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    pub fn config(&self) -> tokio_postgres::Config {
        let mut pg = tokio_postgres::Config::new();
        pg.host(self.host)
            .port(self.port)
            .user(self.user)
            .password(self.password)
            .dbname(self.database)
            .application_name(self.application)
            .connect_timeout(self.timeout);
        pg
    }
}

/// One check: log in as the health user and read the server's version within `timeout`.
pub async fn probe(cfg: &Config, b: &Backend, timeout: Duration) -> Result<(), String> {
    let user = cfg.health_user();
    let pg = Login {
        host: &b.host,
        port: b.port,
        user: &user.name,
        password: &user.password,
        database: &cfg.health_check_database,
        application: "chorus-health",
        timeout,
    }
    .config();
    let check = async {
        let (client, conn) = match pg.connect(tokio_postgres::NoTls).await {
            Ok(c) => c,
            // The server answered and refused for lack of resources (too many connections, out
            // of memory): it is up; its clients' logins are their own outcome.
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code().starts_with("53")) => return Ok(()),
            Err(e) => return Err(pg_error(&e)),
        };
        let conn = tokio::spawn(conn);
        let res = match client.simple_query("SHOW server_version").await {
            Ok(msgs) => {
                for m in msgs {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        b.set_version(r.get(0).unwrap_or_default().to_string());
                    }
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        drop(client);
        let _ = conn.await;
        res
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// An on-demand check of `b`, as a session asks when it lost a connection and must tell a
/// failed server from a connection of its own that ended. Callers that start waiting at the
/// same moment share one probe: the result of a check that began after the caller asked is
/// the caller's answer.
pub async fn check(cfg: &Config, b: &Backend) -> Result<(), String> {
    let asked = std::time::Instant::now();
    let mut last = b.last_check.lock().await;
    if let Some((at, r)) = &*last {
        if *at >= asked {
            return r.clone();
        }
    }
    let started = std::time::Instant::now();
    let r = probe(cfg, b, cfg.health_check_timeout).await;
    // Stamped with its start: only callers that asked before it began may share it.
    *last = Some((started, r.clone()));
    r
}

pub fn spawn_health_checks(cfg: Arc<Config>, cluster: Arc<Cluster>, stop: CancellationToken) {
    for b in cluster.backends().iter().cloned() {
        spawn_health_check(cfg.clone(), cluster.clone(), b, stop.clone());
    }
}

/// The health check of one backend (also started for a backend that joins).
pub fn spawn_health_check(cfg: Arc<Config>, cluster: Arc<Cluster>, b: Arc<Backend>, stop: CancellationToken) {
    {
        tokio::spawn(async move {
            let mut failures = 0u32;
            let mut tick = tokio::time::interval(cfg.health_check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if b.state() != BackendState::InSync {
                    failures = 0;
                    continue;
                }
                match probe(&cfg, &b, cfg.health_check_timeout).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(backend = %b.name, failures, error = %e, "health check failed");
                        if failures >= cfg.health_check_failures {
                            cluster.eject(b.idx, BackendState::Down, &format!("health check failed {failures} times: {e}"));
                        }
                    }
                }
            }
        });
    }
}

/// What a server said, for an error line: tokio-postgres shows a server's error as "db error"
/// alone; the message, its detail and the SQLSTATE are what an operator needs.
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({}; SQLSTATE {})", d.message(), detail, d.code().code()),
            None => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        },
        None => e.to_string(),
    }
}
