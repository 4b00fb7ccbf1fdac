//! `chorus cluster`: the compose cluster's topology (`docker-compose.yml`) with local
//! processes, for machines without a container engine and for the tests.
//!
//! Why a subcommand and not a shell script alone: the servers come from testkit, which knows
//! how to run PostgreSQL as an unprivileged user when started as root and where the newer
//! majors live; `scripts/cluster.sh` wraps this command with `up` and `down`. The Chorus
//! config is the compose file's own (`deploy/chorus.toml`), with each backend's host and port
//! replaced by the local server's and the listen addresses moved to loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use chorus_testkit::{bin_dir_for, PgOptions, PgServer};

use crate::config::Config;
use crate::server::Server;

/// The spare server that the compose file leaves out of the cluster (a newer major to join).
pub struct Spare {
    pub name: String,
    pub major: u32,
}

impl Spare {
    /// "pg18:18" → name pg18, major 18.
    pub fn parse(s: &str) -> Result<Spare, String> {
        let (name, major) = s.split_once(':').ok_or_else(|| format!("--spare {s:?}: use NAME:MAJOR"))?;
        let major = major.parse().map_err(|_| format!("--spare {s:?}: the major version is not a number"))?;
        if !crate::config::valid_backend_name(name) {
            return Err(format!("--spare {s:?}: not a backend name"));
        }
        Ok(Spare { name: name.into(), major })
    }
}

fn loopback(addr: &str) -> Result<String, String> {
    let a: SocketAddr = addr.parse().map_err(|_| format!("{addr:?} is not an address:port"))?;
    Ok(format!("127.0.0.1:{}", a.port()))
}

pub async fn run(file: &Path, dir: PathBuf, spare: Option<Spare>) -> Result<(), String> {
    let mut cfg = Config::load(file).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut servers = Vec::new();
    for b in &mut cfg.backends {
        let s = PgServer::start(PgOptions::default()).await.map_err(|e| format!("{}: {e}", b.name))?;
        (b.host, b.port) = ("127.0.0.1".into(), s.port());
        servers.push(s);
    }
    let spare = match spare {
        Some(sp) => {
            let bin =
                bin_dir_for(sp.major).ok_or_else(|| format!("no PostgreSQL {} binaries (run scripts/setup.sh)", sp.major))?;
            // A join into it needs its major's pg_dump and pg_restore (the image has them in
            // /usr/lib/postgresql/18/bin, which Chorus searches by default).
            cfg.pg_tools.push(bin.clone());
            let s = PgServer::start(PgOptions { bin_dir: Some(bin), ..PgOptions::default() }).await.map_err(|e| e.to_string())?;
            Some((sp.name, s))
        }
        None => None,
    };
    cfg.listen = loopback(&cfg.listen)?;
    cfg.admin_listen = loopback(&cfg.admin_listen)?;
    // The servers are new at every start: state from an earlier run describes others.
    cfg.data_dir = dir.join("chorus-data");
    if cfg.data_dir.exists() {
        std::fs::remove_dir_all(&cfg.data_dir).map_err(|e| format!("cannot clear {}: {e}", cfg.data_dir.display()))?;
    }
    if cfg.admin_token.is_empty() {
        cfg.admin_token = format!("local-{:016x}", rand::random::<u64>());
    }
    cfg.validate().map_err(|e| e.to_string())?;
    let server = Server::start(cfg).await.map_err(|e| e.to_string())?;
    let shared = server.shared().clone();
    // What scripts/cluster.sh and the tests read: one shell assignment a line.
    let mut env = format!(
        "CHORUS_ADDR={}\nCHORUS_ADMIN=http://{}\nCHORUS_ADMIN_TOKEN={}\n",
        server.local_addr().ok_or("the local cluster has no client port")?,
        server.admin_addr().map(|a| a.to_string()).unwrap_or_default(),
        shared.cfg.admin_token
    );
    for (b, s) in shared.cfg.backends.iter().zip(&servers) {
        env.push_str(&format!("BACKEND_{}=127.0.0.1:{}:{}\n", b.name.to_uppercase(), s.port(), s.version()));
    }
    if let Some((name, s)) = &spare {
        env.push_str(&format!("SPARE_NAME={name}\nSPARE_PORT={}\nSPARE_VERSION={}\n", s.port(), s.version()));
    }
    let env_file = dir.join("cluster.env");
    std::fs::write(&env_file, env).map_err(|e| format!("cannot write {}: {e}", env_file.display()))?;
    tracing::info!(file = %env_file.display(), "the local cluster is up");
    server.run(crate::demo::shutdown_signal()).await;
    drop(servers);
    drop(spare);
    let _ = std::fs::remove_file(env_file);
    Ok(())
}
