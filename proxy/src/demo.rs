//! `chorus demo`: throwaway local PostgreSQL servers with Chorus in front, for a first look.

use std::path::PathBuf;

use chorus_testkit::{PgOptions, PgServer};

use crate::config::{AuthMethod, BackendConfig, Config, UserConfig};
use crate::server::Server;

pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CHORUS_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: log files and journals get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub async fn run(n: usize, listen: String, dir: Option<PathBuf>) -> Result<(), String> {
    if n == 0 || n > 16 {
        return Err("--backends takes 1 to 16".into());
    }
    let base = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            tempfile::Builder::new().prefix("chorus-demo-").tempdir_in(d)
        }
        None => tempfile::Builder::new().prefix("chorus-demo-").tempdir(),
    }
    .map_err(|e| format!("cannot make the demo directory: {e}"))?;
    eprintln!("starting {n} PostgreSQL server(s)...");
    let mut servers = Vec::new();
    for _ in 0..n {
        let s = PgServer::start(PgOptions { trust: true, ..PgOptions::default() }).await.map_err(|e| e.to_string())?;
        servers.push(s);
    }
    let cfg = Config {
        listen: listen.clone(),
        data_dir: base.path().join("chorus-data"),
        auth: crate::config::AuthConfig { method: AuthMethod::Trust },
        // The admin API on any free port, with a token made up for this run.
        admin_listen: "127.0.0.1:0".into(),
        admin_token: std::env::var("CHORUS_ADMIN_TOKEN").unwrap_or_else(|_| format!("demo-{:016x}", rand::random::<u64>())),
        users: vec![UserConfig { name: "postgres".into(), password: String::new() }],
        backends: servers
            .iter()
            .enumerate()
            .map(|(i, s)| BackendConfig {
                name: format!("pg{}", i + 1),
                host: "127.0.0.1".into(),
                port: s.port(),
                sslmode: None,
                sslrootcert: None,
            })
            .collect(),
        ..Config::parse("backends = []").map_err(|e| e.to_string())?
    };
    cfg.validate().map_err(|e| e.to_string())?;
    let server = Server::start(cfg).await.map_err(|e| e.to_string())?;
    let addr = server.local_addr().ok_or("the demo has no client port")?;
    let admin = server.admin_addr();
    println!("Chorus demo is running with {n} backend(s).");
    for (i, s) in servers.iter().enumerate() {
        println!("  backend pg{}: 127.0.0.1:{} (PostgreSQL {})", i + 1, s.port(), s.version());
    }
    println!("Connect with:\n  psql \"host={} port={} user=postgres dbname=postgres\"", addr.ip(), addr.port());
    if let Some(a) = admin {
        let token = &server.shared().cfg.admin_token;
        println!("Admin API (join, remove, verify, /metrics):\n  chorusctl --admin http://{a} --token {token} backends");
    }
    println!("State lives in {}. Press Ctrl-C to stop and remove everything.", base.path().display());
    server.run(shutdown_signal()).await;
    drop(servers);
    Ok(())
}
