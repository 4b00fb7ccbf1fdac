//! Shared set-up for the integration tests: real PostgreSQL servers with Chorus in front.
#![allow(dead_code, unused_imports)]

use std::path::Path;

pub mod tls;
use std::time::Duration;

pub use chorus_testkit::{assert_identical, ChorusOptions, ChorusProcess, HostAuth, PgOptions, PgServer, APP_USER};

pub struct Setup {
    pub servers: Vec<PgServer>,
    pub chorus: ChorusProcess,
}

pub fn chorus_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chorus"))
}

impl Setup {
    pub async fn new(n: usize) -> Setup {
        Self::with(n, ChorusOptions::default()).await
    }

    pub async fn with(n: usize, opts: ChorusOptions) -> Setup {
        let mut servers = Vec::new();
        for _ in 0..n {
            servers.push(PgServer::start(PgOptions::default()).await.expect("start postgres"));
        }
        let refs: Vec<&PgServer> = servers.iter().collect();
        let chorus = ChorusProcess::start(chorus_bin(), &refs, opts).await.expect("start chorus");
        Setup { servers, chorus }
    }

    pub fn refs(&self) -> Vec<&PgServer> {
        self.servers.iter().collect()
    }

    /// Every backend holds the same rows in every user table.
    pub async fn assert_identical(&self) {
        assert_identical(&self.refs(), "postgres").await;
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.chorus.client().await.expect("connect through chorus")
    }

    pub async fn wait_state(&self, backend: &str, state: &str) {
        self.chorus.wait_state(backend, state, Duration::from_secs(20)).await.expect("state");
    }
}

/// Runs a command and returns (success, stdout+stderr).
pub fn sh(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().expect("run command");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Runs `sql` on `srv` until it returns a row (every 10 ms, for at most 20 s) and returns that
/// row's first column: the condition a test awaits, read from the server itself.
pub async fn await_row<T>(srv: &PgServer, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)], what: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let c = srv.local_client("postgres").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = c.query_opt(sql, params).await.unwrap() {
            return r.get(0);
        }
        assert!(std::time::Instant::now() < deadline, "{what} on port {}", srv.port());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One HTTP/1.1 exchange with Chorus's admin API: the whole response, head and body.
pub async fn raw_http(s: &Setup, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = s.chorus.admin_url();
    let addr = url.trim_start_matches("http://");
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}

pub fn get(path: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: chorus\r\n{auth}Connection: close\r\n\r\n")
}

/// Sums every sample of a counter in Prometheus text; checks that each sample line parses.
pub fn counter(text: &str, name: &str) -> f64 {
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in: {line}"));
        let metric = series.split('{').next().unwrap();
        assert!(metric.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name: {line}");
        if metric == name {
            total += v;
        }
    }
    total
}

/// A startup packet of protocol `version` (196,608 is 3.0) with `params`.
pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}
