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
    pub tls: crate::config::BackendTls,
}

impl<'a> Login<'a> {
    /// Chorus's own login as the health check user (health checks, catalog, verify, joins).
    pub fn health(cfg: &'a Config, host: &'a str, port: u16, database: &'a str, application: &'a str) -> Login<'a> {
        let user = cfg.health_user();
        Login {
            host,
            port,
            user: &user.name,
            password: &user.password,
            database,
            application,
            timeout: cfg.connect_timeout,
            tls: cfg.backend_tls(host, port),
        }
    }

    /// Connects, with the connection driven by a task of its own.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.open().await.map(|(client, _)| client)
    }

    /// Connects with the backend's TLS settings; the connection is driven by the task whose
    /// handle is returned (it ends when the client is dropped).
    pub async fn open(&self) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let mut pg = self.config();
        let (tls, mode) = crate::tls::backend::connector(&self.tls);
        pg.ssl_mode(mode);
        let (client, conn) = pg.connect(tls).await?;
        Ok((
            client,
            tokio::spawn(async move {
                let _ = conn.await;
            }),
        ))
    }

    /// Connects to Chorus's own listener: over TLS with `tls`, in plaintext when None (the
    /// backends' TLS settings do not apply there).
    pub async fn connect_with(
        &self,
        tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut pg = self.config();
        let client = match tls {
            Some(tls) => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, conn) = pg.connect(tls).await?;
                tokio::spawn(conn);
                client
            }
            None => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
            }
        };
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
        tls: b.tls.clone(),
    };
    let check = async {
        if !b.tls.may_send_cleartext() && asks_cleartext(b, &user.name, &cfg.health_check_database).await {
            return Err(crate::fanout::conn::cleartext_refused(b));
        }
        let (client, conn) = match pg.open().await {
            Ok(c) => c,
            // The server answered and refused for lack of resources (too many connections, out
            // of memory): it is up; its clients' logins are their own outcome.
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code().starts_with("53")) => return Ok(()),
            Err(e) => return Err(pg_error(&e)),
        };
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
    let r = match tokio::time::timeout(timeout, check).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    if r.is_err() {
        *b.no_cleartext.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    r
}

/// Whether `b` asks `user` for the password in cleartext at login: the first authentication
/// request read and the connection closed, before tokio-postgres (which would answer it) logs
/// in. Remembered once a backend is seen not to ask, until a check fails.
async fn asks_cleartext(b: &Backend, user: &str, db: &str) -> bool {
    let key = (b.addr.clone(), user.to_string(), db.to_string());
    if b.no_cleartext.lock().unwrap_or_else(|p| p.into_inner()).as_ref() == Some(&key) {
        return false;
    }
    let asks = crate::fanout::conn::first_auth_request(b, user, db).await == Some(crate::protocol::message::AUTH_CLEARTEXT);
    if !asks {
        *b.no_cleartext.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }
    asks
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
        crate::supervise::spawn_restarting("health_check", move || {
            let (cfg, cluster, b, stop) = (cfg.clone(), cluster.clone(), b.clone(), stop.clone());
            async move {
                let mut failures = 0u32;
                let mut tick = tokio::time::interval(cfg.health_check_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    crate::watchdog::marks().checked();
                    if b.state() != BackendState::InSync {
                        failures = 0;
                        continue;
                    }
                    match probe(&cfg, &b, cfg.health_check_timeout).await {
                        Ok(()) => {
                            failures = 0;
                            hold_history(&cfg, &cluster, &b).await;
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(backend = %b.name, failures, error = %e, "health check failed");
                            if failures >= cfg.health_check_failures {
                                cluster.eject(b.idx, BackendState::Down, &format!("health check failed {failures} times: {e}"));
                            }
                        }
                    }
                }
            }
        });
    }
}

/// A backend this instance writes the history of keeps its writer lock (taken again after the
/// backend restarted, or when it came back in sync); one whose lock another instance holds
/// leaves the in-sync set.
async fn hold_history(cfg: &Config, cluster: &Cluster, b: &Backend) {
    if !cluster.history_writer() {
        return;
    }
    match super::writer::take(cfg, b, std::time::Duration::ZERO, false).await {
        Ok(()) => {}
        Err(e @ super::writer::WriterError::Held { .. }) => {
            cluster.eject(b.idx, BackendState::Down, &e.to_string());
        }
        // Unreachable: the next check says so.
        Err(e) => tracing::debug!(backend = %b.name, error = %e, "writer lock not taken"),
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
        // tokio-postgres's own text hides the cause ("error performing TLS handshake").
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let more = c.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                cause = c.source();
            }
            text
        }
    }
}
