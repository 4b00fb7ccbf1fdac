//! `chorus cluster`: the compose cluster's topology (`docker-compose.yml`) with local
//! processes, for machines without a container engine and for the tests.
//!
//! Why a subcommand and not a shell script alone: the servers (and etcd) come from testkit,
//! which knows how to run PostgreSQL and etcd as an unprivileged user when started as root and
//! where the newer majors live; `scripts/cluster.sh` wraps this command with `up` and `down`.
//! The Chorus config is the compose file's own (`deploy/chorus.toml`), with each backend's host
//! and port replaced by the local server's, the listen addresses moved to loopback and, with
//! `[ha]`, three local etcd members and two Chorus members (`chorus-a` on the file's ports,
//! `chorus-b` ten ports up, as the compose file publishes them), each its own process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chorus_testkit::etcd::Etcd;
use chorus_testkit::{bin_dir_for, PgOptions, PgServer};
use toml::{Table, Value};

use crate::config::Config;

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

/// The members with `[ha]`, as docker-compose.yml names them, and how far each one's ports are
/// moved up from the file's.
pub const MEMBERS: [(&str, u16); 2] = [("chorus-a", 0), ("chorus-b", 10)];

/// One Chorus process of the local cluster.
struct Member {
    name: String,
    listen: String,
    admin: String,
    child: Child,
}

fn loopback(addr: &str, up: u16) -> Result<String, String> {
    let a: SocketAddr = addr.parse().map_err(|_| format!("{addr:?} is not an address:port"))?;
    Ok(format!("127.0.0.1:{}", a.port() + up))
}

pub async fn run(file: &Path, dir: PathBuf, spare: Option<Spare>) -> Result<(), String> {
    let cfg = Config::load(file).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut doc: Table = text.parse().map_err(|e| format!("{}: {e}", file.display()))?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut servers = Vec::new();
    let backends = doc.get_mut("backends").and_then(Value::as_array_mut).ok_or("the config names no [[backends]]")?;
    for (b, entry) in cfg.backends.iter().zip(backends.iter_mut()) {
        let s = PgServer::start(PgOptions::default()).await.map_err(|e| format!("{}: {e}", b.name))?;
        if let Some(t) = entry.as_table_mut() {
            t.insert("host".into(), "127.0.0.1".into());
            t.insert("port".into(), i64::from(s.port()).into());
        }
        servers.push(s);
    }
    let spare = match spare {
        Some(sp) => {
            let bin =
                bin_dir_for(sp.major).ok_or_else(|| format!("no PostgreSQL {} binaries (run scripts/setup.sh)", sp.major))?;
            // A join into it needs its major's pg_dump and pg_restore (the image has them in
            // /usr/lib/postgresql/18/bin, which Chorus searches by default).
            let mut tools: Vec<Value> = cfg.pg_tools.iter().map(|p| p.display().to_string().into()).collect();
            tools.push(bin.display().to_string().into());
            doc.insert("pg_tools".into(), tools.into());
            let s = PgServer::start(PgOptions { bin_dir: Some(bin), ..PgOptions::default() }).await.map_err(|e| e.to_string())?;
            Some((sp.name, s))
        }
        None => None,
    };
    // Secrets stay out of the files written here: the members read them from the environment.
    let token = match cfg.admin_token.is_empty() {
        true => format!("local-{:016x}", rand::random::<u64>()),
        false => cfg.admin_token.clone(),
    };
    let etcd = match cfg.ha {
        Some(_) => Some(Etcd::start(3).await.map_err(|e| format!("etcd: {e}"))?),
        None => None,
    };
    let names: Vec<(&str, u16)> = if etcd.is_some() { MEMBERS.to_vec() } else { vec![("chorus", 0)] };
    let mut members = Vec::new();
    for (name, up) in names {
        match start_member(&doc, &cfg, &dir, name, up, etcd.as_ref(), &token) {
            Ok(m) => members.push(m),
            Err(e) => {
                stop(&mut members);
                return Err(e);
            }
        }
    }
    let result = serve(&members, &servers, spare.as_ref(), &dir, &token).await;
    stop(&mut members);
    drop(etcd);
    drop(servers);
    drop(spare);
    result
}

/// Writes a member's config (the file's, with its ports, data directory and etcd) and starts it.
fn start_member(
    doc: &Table,
    cfg: &Config,
    dir: &Path,
    name: &str,
    up: u16,
    etcd: Option<&Etcd>,
    token: &str,
) -> Result<Member, String> {
    let mut doc = doc.clone();
    let listen = loopback(&cfg.listen, up)?;
    let admin = loopback(&cfg.admin_listen, up)?;
    doc.insert("listen".into(), listen.clone().into());
    doc.insert("admin_listen".into(), admin.clone().into());
    // The servers are new at every start: state from an earlier run describes others.
    let data = dir.join(format!("{name}-data"));
    if data.exists() {
        std::fs::remove_dir_all(&data).map_err(|e| format!("cannot clear {}: {e}", data.display()))?;
    }
    doc.insert("data_dir".into(), data.display().to_string().into());
    if let (Some(etcd), Some(Value::Table(ha))) = (etcd, doc.get_mut("ha")) {
        let endpoints: Vec<Value> = etcd.endpoints().into_iter().map(Value::from).collect();
        ha.insert("etcd_endpoints".into(), endpoints.into());
        ha.insert("node_name".into(), name.into());
    }
    let path = dir.join(format!("{name}.toml"));
    let text = toml::to_string(&doc).map_err(|e| format!("{name}'s config: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| format!("{name}.log: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--config")
        .arg(&path)
        .arg("run")
        .env("CHORUS_ADMIN_TOKEN", token)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // A member outlives nothing: if this process dies, so do they.
    // SAFETY: prctl in the child before exec; no allocation, no lock.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
    Ok(Member { name: name.into(), listen, admin, child })
}

/// Waits for a leader, writes `cluster.env`, and serves until asked to stop.
async fn serve(
    members: &[Member],
    servers: &[PgServer],
    spare: Option<&(String, PgServer)>,
    dir: &Path,
    token: &str,
) -> Result<(), String> {
    let started = Instant::now();
    let leader = loop {
        let mut found = None;
        for m in members {
            if let Ok(r) = chorus_testkit::etcd::http_get(&format!("http://{}/leader", m.admin)).await {
                if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") {
                    found = Some(m);
                }
            }
        }
        if let Some(m) = found {
            break m;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("no Chorus member served within 120 s (logs in {})", dir.display()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // What scripts/cluster.sh and the tests read: one shell assignment a line.
    let ports: Vec<&str> = members.iter().map(|m| m.listen.rsplit(':').next().unwrap_or_default()).collect();
    let mut env = format!(
        "CHORUS_ADDR={}\nCHORUS_ADMIN=http://{}\nCHORUS_ADMIN_TOKEN={token}\nCHORUS_HOSTS={}\nCHORUS_PORTS={}\nCHORUS_MEMBERS=\"{}\"\n",
        leader.listen,
        leader.admin,
        vec!["127.0.0.1"; members.len()].join(","),
        ports.join(","),
        members.iter().map(|m| format!("{}=http://{}", m.name, m.admin)).collect::<Vec<_>>().join(" "),
    );
    let names: Vec<String> = Config::load(&dir.join(format!("{}.toml", leader.name)))
        .map(|c| c.backends.iter().map(|b| b.name.clone()).collect())
        .unwrap_or_default();
    for (b, s) in names.iter().zip(servers) {
        env.push_str(&format!("BACKEND_{}=127.0.0.1:{}:{}\n", b.to_uppercase(), s.port(), s.version()));
    }
    if let Some((name, s)) = spare {
        env.push_str(&format!("SPARE_NAME={name}\nSPARE_PORT={}\nSPARE_VERSION={}\n", s.port(), s.version()));
    }
    let env_file = dir.join("cluster.env");
    std::fs::write(&env_file, env).map_err(|e| format!("cannot write {}: {e}", env_file.display()))?;
    tracing::info!(file = %env_file.display(), leader = %leader.name, "the local cluster is up");
    crate::demo::shutdown_signal().await;
    let _ = std::fs::remove_file(env_file);
    Ok(())
}

/// Stops the members (SIGTERM: each gives its lease back and lets open transactions finish).
fn stop(members: &mut [Member]) {
    for m in members.iter() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(m.child.id() as i32, libc::SIGTERM);
        }
    }
    for m in members.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(m.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(m.child.try_wait(), Ok(None)) {
            tracing::warn!(member = %m.name, "did not stop within 60 s: killed");
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
    }
}
