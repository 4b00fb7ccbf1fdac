//! The configuration file: one TOML document, every key documented in docs/configuration.md.
//!
//! Unknown keys are refused so that a typo never silently falls back to a default. Secrets can
//! come from the environment instead of the file (see `apply_env`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadPolicy {
    /// One in-sync backend, the least busy.
    #[default]
    One,
    /// Every in-sync backend; the first reply wins.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnsafeStatements {
    /// Refuse with 0A000 (G5).
    #[default]
    Refuse,
    /// Pass them through: the user's risk.
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CommitAck {
    #[default]
    All,
    First,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub method: AuthMethod,
}

/// Whether clients may, must or cannot use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// SSLRequest answered 'N'; a direct TLS hello is closed on.
    Disable,
    /// TLS when the client asks for it, plaintext otherwise.
    Allow,
    /// A plaintext startup is refused with 28000.
    Require,
}

/// `[tls]`: TLS between clients and Chorus.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Default: `allow` when a certificate is given, `disable` otherwise.
    #[serde(default)]
    pub mode: Option<TlsMode>,
    /// The server certificate chain (PEM), leaf first.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against; a client that
    /// presents none is still admitted (authentication stays the password's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Serve the admin API over HTTPS.
    #[serde(default)]
    pub admin_https: bool,
    /// The admin API's own certificate and key (default: `cert_file`, `key_file`).
    #[serde(default)]
    pub admin_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub admin_key_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn mode(&self) -> TlsMode {
        self.mode.unwrap_or(if self.cert_file.is_some() { TlsMode::Allow } else { TlsMode::Disable })
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(default)]
    pub password: String,
}

impl std::fmt::Debug for UserConfig {
    // Passwords never reach a log line, not even through a Debug print of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig").field("name", &self.name).field("password", &"<redacted>").finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// TLS to this backend (default: `backend_sslmode`).
    #[serde(default)]
    pub sslmode: Option<SslMode>,
    /// CA certificates (PEM) for `verify-ca` and `verify-full` (default: `backend_sslrootcert`).
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
}

/// TLS toward a backend, as libpq's `sslmode` (without `allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext.
    Disable,
    /// TLS when the server offers it, without checking its certificate; plaintext otherwise.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by `sslrootcert`'s CAs.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the backend's host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How Chorus reaches one backend: its TLS settings, whichever connection it opens (sessions,
/// health checks, verify, joins, catch-up, the tools' environment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct BackendTls {
    pub mode: SslMode,
    pub rootcert: Option<PathBuf>,
    /// `allow_cleartext_password`.
    pub allow_cleartext: bool,
}

impl BackendTls {
    /// A server asking for the password in cleartext gets it only over a connection that had
    /// to be encrypted (`require` and above), or where the operator allowed it.
    pub fn may_send_cleartext(&self) -> bool {
        self.allow_cleartext || self.mode >= SslMode::Require
    }
}

impl BackendConfig {
    pub fn addr(&self) -> String {
        backend_addr(&self.host, self.port)
    }
}

/// Whether a backend `host` is a directory holding the server's Unix-domain socket (as libpq,
/// PgBouncer and pgpool-II take it): a path, not a name.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// Where a backend listens: `host:port`, or the socket file `host/.s.PGSQL.port` in a
/// directory.
pub fn backend_addr(host: &str, port: u16) -> String {
    if is_socket_dir(host) {
        format!("{}/.s.PGSQL.{port}", host.trim_end_matches('/'))
    } else {
        format!("{host}:{port}")
    }
}

/// Backends a cluster can know, configured and joined (a session's connections fit a u64 mask).
pub const MAX_BACKENDS: usize = 64;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "defaults::listen")]
    pub listen: String,
    #[serde(default = "defaults::admin_listen")]
    pub admin_listen: String,
    #[serde(default)]
    pub admin_token: String,
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub read_policy: ReadPolicy,
    /// Reads stay on the highest-priority backend until it has this many requests in flight.
    #[serde(default = "defaults::read_capacity")]
    pub read_capacity: u32,
    #[serde(default)]
    pub commit_ack: CommitAck,
    #[serde(default = "defaults::max_client_connections")]
    pub max_client_connections: usize,
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: usize,
    /// Client logins that may be logging in to the backends at once; the rest queue.
    #[serde(default = "defaults::login_concurrency")]
    pub login_concurrency: usize,
    #[serde(default = "defaults::login_timeout", deserialize_with = "duration")]
    pub login_timeout: Duration,
    /// A failed client login is answered after this long, one at a time per client address.
    #[serde(default = "defaults::auth_failure_delay", deserialize_with = "duration")]
    pub auth_failure_delay: Duration,
    #[serde(default = "defaults::idle_in_transaction_timeout", deserialize_with = "duration")]
    pub idle_in_transaction_timeout: Duration,
    #[serde(default = "defaults::backend_timeout", deserialize_with = "duration")]
    pub backend_timeout: Duration,
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "defaults::shutdown_timeout", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    #[serde(default = "defaults::health_check_interval", deserialize_with = "duration")]
    pub health_check_interval: Duration,
    #[serde(default = "defaults::health_check_timeout", deserialize_with = "duration")]
    pub health_check_timeout: Duration,
    #[serde(default = "defaults::health_check_failures")]
    pub health_check_failures: u32,
    #[serde(default = "defaults::health_check_database")]
    pub health_check_database: String,
    #[serde(default)]
    pub health_check_user: Option<String>,
    /// What to do with statements Chorus cannot make deterministic.
    #[serde(default)]
    pub unsafe_statements: UnsafeStatements,
    /// How long a write may wait for Chorus's locks before it fails with 55P03.
    #[serde(default = "defaults::lock_timeout", deserialize_with = "duration")]
    pub lock_timeout: Duration,
    /// Threads serving clients; 0 picks one per core.
    #[serde(default)]
    pub worker_threads: usize,
    /// Directories holding pg_dump, pg_restore and psql of each PostgreSQL major version the
    /// joins may need (Chorus asks each `pg_dump --version`); empty: the usual Debian places
    /// (`/usr/lib/postgresql/*/bin`) and PATH.
    #[serde(default)]
    pub pg_tools: Vec<PathBuf>,
    /// Parallel jobs of pg_dump and pg_restore during a join.
    #[serde(default = "defaults::join_jobs")]
    pub join_jobs: usize,
    /// How long a join may pause new writes at detach and attach before it gives up.
    #[serde(default = "defaults::join_pause_timeout", deserialize_with = "duration")]
    pub join_pause_timeout: Duration,
    /// Keep the update history: every unit recorded in its own transaction on every backend,
    /// so a crash of Chorus is recovered from exactly (see docs/operations.md).
    #[serde(default = "defaults::history")]
    pub history: bool,
    /// How long history entries are kept once every in-sync backend has them.
    #[serde(default = "defaults::history_retention", deserialize_with = "duration")]
    pub history_retention: Duration,
    /// The most the history's entries may take in each database, in bytes (0: no limit):
    /// the oldest are pruned first, whatever their age.
    #[serde(default)]
    pub history_retention_bytes: u64,
    /// The largest unit (its statements and data, in bytes) the history keeps; a bigger
    /// transaction is rolled back with 54000.
    #[serde(default = "defaults::history_unit_max")]
    pub history_unit_max: usize,
    /// Bring a `down` backend back from the update history as soon as it answers again.
    #[serde(default = "defaults::auto_catch_up")]
    pub auto_catch_up: bool,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    /// TLS toward backends without an `sslmode` of their own, and joined ones.
    #[serde(default)]
    pub backend_sslmode: SslMode,
    #[serde(default)]
    pub backend_sslrootcert: Option<PathBuf>,
    /// Send a password to a backend that asks for it in cleartext over a connection whose
    /// sslmode is below `require`.
    #[serde(default)]
    pub allow_cleartext_password: bool,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Leadership on etcd with a standby (None: this instance runs alone).
    #[serde(default)]
    pub ha: Option<HaConfig>,
}

/// `[ha]`: this instance is one member of a group on etcd; one member leads (serves clients),
/// the others stand by with their client port closed (docs/operations.md, "Two instances").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// etcd's client URLs, e.g. ["http://10.0.0.1:2379", "http://10.0.0.2:2379"].
    pub etcd_endpoints: Vec<String>,
    /// The group's name: members with the same name share one leader key.
    #[serde(default = "defaults::ha_cluster")]
    pub cluster: String,
    /// This member's name, unique in the group (default: the host name).
    #[serde(default)]
    pub node_name: Option<String>,
    /// The lease that holds the leadership: a leader that cannot renew it stops serving
    /// before it can expire, and a standby takes over once it has.
    #[serde(default = "defaults::lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// Where clients reach this member (shown to operators and in the leader key); default
    /// `listen`, with 0.0.0.0 or [::] replaced by `node_name`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// How long a planned switchover (`chorusctl switchover`) lets open transactions run to
    /// their end before the sessions still in one are ended and the leadership handed over.
    #[serde(default = "defaults::switchover_timeout", deserialize_with = "duration")]
    pub switchover_timeout: Duration,
}

impl HaConfig {
    /// Where clients reach this member: `advertise`, else `listen` with an address that means
    /// "every interface" (0.0.0.0, [::]) replaced by the node's name, which in a container is
    /// its host name.
    pub fn address(&self, listen: &str) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        match listen.rsplit_once(':') {
            Some(("0.0.0.0" | "[::]" | "", port)) => format!("{}:{port}", self.node()),
            _ => listen.to_string(),
        }
    }

    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "chorus".into())
        })
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("backends", &self.backends)
            .field("users", &self.users)
            .finish_non_exhaustive()
    }
}

mod defaults {
    pub fn ha_cluster() -> String {
        "chorus".into()
    }
    pub fn lease_ttl() -> std::time::Duration {
        std::time::Duration::from_secs(5)
    }
    pub fn switchover_timeout() -> std::time::Duration {
        std::time::Duration::from_secs(5)
    }
    use std::path::PathBuf;
    use std::time::Duration;
    pub fn listen() -> String {
        "127.0.0.1:6432".into()
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:6433".into()
    }
    pub fn data_dir() -> PathBuf {
        "./chorus-data".into()
    }
    pub fn history() -> bool {
        true
    }
    pub fn history_retention() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn auto_catch_up() -> bool {
        true
    }
    pub fn history_unit_max() -> usize {
        64 << 20
    }
    pub fn read_capacity() -> u32 {
        8
    }
    pub fn max_client_connections() -> usize {
        1000
    }
    pub fn login_concurrency() -> usize {
        32
    }
    pub fn max_message_size() -> usize {
        64 * 1024 * 1024
    }
    pub fn auth_failure_delay() -> Duration {
        Duration::from_millis(500)
    }
    pub fn login_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn idle_in_transaction_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn backend_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn join_jobs() -> usize {
        2
    }
    pub fn join_pause_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn lock_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn health_check_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_check_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_check_failures() -> u32 {
        2
    }
    pub fn health_check_database() -> String {
        "postgres".into()
    }
}

/// Parses "250ms", "5s", "2m", "1h"; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.into(), message },
            other => other,
        })?;
        if let Some(warning) = exposed_secrets(path, &cfg) {
            tracing::warn!("{warning}");
        }
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string().trim().replace('\n', " ") })
    }

    /// Secrets from the environment win over the file: `CHORUS_ADMIN_TOKEN`, and
    /// `CHORUS_PASSWORD_<USER>` (user name upper-cased, other characters as `_`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(t) = get("CHORUS_ADMIN_TOKEN") {
            self.admin_token = t;
        }
        for u in &mut self.users {
            if let Some(p) = get(&password_env_var(&u.name)) {
                u.password = p;
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.backends.is_empty() {
            return bad("at least one [[backends]] entry is required".into());
        }
        let mut names = HashSet::new();
        for b in &self.backends {
            if !valid_backend_name(&b.name) {
                return bad(format!("backend name {:?} must be non-empty letters, digits, '-' or '_'", b.name));
            }
            if !names.insert(&b.name) {
                return bad(format!("backend name {:?} appears twice", b.name));
            }
        }
        if self.users.is_empty() {
            return bad("at least one [[users]] entry is required".into());
        }
        let mut users = HashSet::new();
        for u in &self.users {
            if !users.insert(&u.name) {
                return bad(format!("user {:?} appears twice", u.name));
            }
            if u.password.is_empty() && self.auth.method != AuthMethod::Trust {
                return bad(format!("user {:?} needs a password with auth method other than trust", u.name));
            }
        }
        if let Some(h) = &self.health_check_user {
            if !users.contains(h) {
                return bad(format!("health_check_user {h:?} is not one of [[users]]"));
            }
        }
        if self.max_client_connections == 0 {
            return bad("max_client_connections must be at least 1".into());
        }
        if self.login_concurrency == 0 {
            return bad("login_concurrency must be at least 1".into());
        }
        if self.max_message_size < 1024 {
            return bad("max_message_size must be at least 1024 bytes".into());
        }
        if self.backends.len() > MAX_BACKENDS {
            return bad(format!("at most {MAX_BACKENDS} backends are supported"));
        }
        if self.join_jobs == 0 {
            return bad("join_jobs must be at least 1".into());
        }
        for b in &self.backends {
            if is_socket_dir(&b.host) && b.sslmode.is_some_and(|m| m >= SslMode::Require) {
                return bad(format!(
                    "backend {:?}: TLS does not apply to a Unix-domain socket ({}): drop its sslmode",
                    b.name, b.host
                ));
            }
            let t = self.backend_tls(&b.host, b.port);
            if t.mode >= SslMode::VerifyCa && t.rootcert.is_none() {
                return bad(format!(
                    "backend {:?}: sslmode {} needs sslrootcert (or backend_sslrootcert)",
                    b.name,
                    t.mode.as_str()
                ));
            }
        }
        if self.backend_sslmode >= SslMode::VerifyCa && self.backend_sslrootcert.is_none() {
            return bad(format!("backend_sslmode {} needs backend_sslrootcert", self.backend_sslmode.as_str()));
        }
        let tls = &self.tls;
        if tls.mode() != TlsMode::Disable && (tls.cert_file.is_none() || tls.key_file.is_none()) {
            return bad("[tls] mode allow or require needs cert_file and key_file".into());
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return bad("[tls] cert_file and key_file go together".into());
        }
        if tls.admin_cert_file.is_some() != tls.admin_key_file.is_some() {
            return bad("[tls] admin_cert_file and admin_key_file go together".into());
        }
        if tls.admin_https && tls.admin_cert_file.is_none() && tls.cert_file.is_none() {
            return bad("[tls] admin_https needs admin_cert_file and admin_key_file, or cert_file and key_file".into());
        }
        for (key, d) in [
            ("login_timeout", self.login_timeout),
            ("backend_timeout", self.backend_timeout),
            ("connect_timeout", self.connect_timeout),
            ("health_check_interval", self.health_check_interval),
            ("health_check_timeout", self.health_check_timeout),
            ("history_retention", self.history_retention),
        ] {
            if d.is_zero() {
                return bad(format!("{key} must be greater than zero"));
            }
        }
        if let Some(ha) = &self.ha {
            if ha.etcd_endpoints.is_empty() {
                return bad("[ha] etcd_endpoints needs at least one URL".into());
            }
            if ha.lease_ttl < Duration::from_secs(2) {
                return bad("[ha] lease_ttl must be at least 2s".into());
            }
            if ha.switchover_timeout.is_zero() {
                return bad("[ha] switchover_timeout must be greater than zero".into());
            }
            if ha.cluster.is_empty() || ha.cluster.contains('/') || ha.node().is_empty() || ha.node().contains('/') {
                return bad("[ha] cluster and node_name must be non-empty and without '/'".into());
            }
            if !self.history {
                return bad(
                    "[ha] needs history = true: a new leader recovers from the update history and fences through it".into()
                );
            }
        }
        Ok(())
    }

    /// The TLS settings for the backend at `host`:`port`: its [[backends]] entry's, falling
    /// back to `backend_sslmode` and `backend_sslrootcert` (joined backends have no entry).
    pub fn backend_tls(&self, host: &str, port: u16) -> BackendTls {
        if is_socket_dir(host) {
            // As for libpq: no TLS over a Unix-domain socket, which never leaves the host.
            return BackendTls { mode: SslMode::Disable, rootcert: None, allow_cleartext: true };
        }
        let entry = self.backends.iter().find(|b| b.host == host && b.port == port);
        BackendTls {
            mode: entry.and_then(|b| b.sslmode).unwrap_or(self.backend_sslmode),
            rootcert: entry.and_then(|b| b.sslrootcert.clone()).or_else(|| self.backend_sslrootcert.clone()),
            allow_cleartext: self.allow_cleartext_password,
        }
    }

    /// The number of runtime threads to start.
    pub fn threads(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The user health checks log in as.
    pub fn health_user(&self) -> &UserConfig {
        self.health_check_user.as_deref().and_then(|n| self.user(n)).unwrap_or(&self.users[0])
    }
}

/// A warning when the file at `path` holds secrets (the admin token, a user's password) and
/// others than its owner may read it.
pub fn exposed_secrets(path: &Path, file: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let secrets = !file.admin_token.is_empty() || file.users.iter().any(|u| !u.password.is_empty());
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (secrets && mode & 0o077 != 0).then(|| {
        format!(
            "{} holds secrets and others may read it (mode {mode:03o}): chmod 600 it, or move the secrets to \
             CHORUS_ADMIN_TOKEN and CHORUS_PASSWORD_<USER>",
            path.display()
        )
    })
}

/// A backend name: 1 to 63 letters, digits, '-' or '_'. Names become file names in the data
/// directory, metric labels and log fields, so nothing else is let in at any entrance.
pub fn valid_backend_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub fn password_env_var(user: &str) -> String {
    let up: String = user.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("CHORUS_PASSWORD_{up}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:6433"
admin_token = "change-me"
data_dir = "./chorus-data"
read_policy = "one"          # or "all"
commit_ack = "all"           # or "first"
[auth]
method = "scram-sha-256"     # or "md5", "trust"
[[users]]
name = "app"
password = "secret"          # also used to log in to the backends
[[backends]]
name = "pg1"
host = "127.0.0.1"
port = 5432
"#;

    #[test]
    fn a_backend_host_that_is_a_directory_is_its_unix_socket() {
        let unix = SAMPLE.replace("host = \"127.0.0.1\"\nport = 5432", "host = \"/var/run/postgresql/\"\nport = 5433");
        let c = Config::parse(&unix).unwrap();
        c.validate().unwrap();
        assert_eq!(c.backends[0].addr(), "/var/run/postgresql/.s.PGSQL.5433");
        let t = c.backend_tls("/var/run/postgresql/", 5433);
        assert_eq!(t.mode, SslMode::Disable, "no TLS over a Unix-domain socket, as for libpq");
        assert!(t.may_send_cleartext(), "the socket never leaves the host");
        let required = unix.replace("port = 5433", "port = 5433\nsslmode = \"require\"");
        let e = Config::parse(&required).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("Unix-domain socket"), "{e}");
    }

    #[test]
    fn accepts_the_documented_sample() {
        let c = Config::parse(SAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.read_policy, ReadPolicy::One);
        assert_eq!(c.commit_ack, CommitAck::All);
        assert_eq!(c.auth.method, AuthMethod::ScramSha256);
        assert_eq!(c.backends[0].addr(), "127.0.0.1:5432");
        assert_eq!(c.idle_in_transaction_timeout, Duration::from_secs(60));
    }

    #[test]
    fn refuses_unknown_keys() {
        let err = Config::parse(&format!("{SAMPLE}\nbogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Config::parse(&SAMPLE.replace("port = 5432", "port = 5432\nweight = 2")).unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }

    #[test]
    fn refuses_bad_values() {
        assert!(Config::parse(&SAMPLE.replace("\"one\"", "\"some\"")).is_err());
        assert!(Config::parse(&format!("login_timeout = \"5 parsecs\"\n{SAMPLE}")).is_err());
        let c = Config::parse(&SAMPLE.replace("password = \"secret\"", "")).unwrap();
        assert!(c.validate().is_err());
        let dup = format!("{SAMPLE}\n[[backends]]\nname = \"pg1\"\nhost = \"h\"\nport = 1\n");
        assert!(Config::parse(&dup).unwrap().validate().is_err());
    }

    #[test]
    fn environment_overrides_secrets() {
        let mut c = Config::parse(SAMPLE).unwrap();
        c.apply_env(|k| match k {
            "CHORUS_ADMIN_TOKEN" => Some("tok".into()),
            "CHORUS_PASSWORD_APP" => Some("pw".into()),
            _ => None,
        });
        assert_eq!(c.admin_token, "tok");
        assert_eq!(c.users[0].password, "pw");
        assert!(!format!("{c:?}").contains("pw\""));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn secrets_in_a_file_others_may_read_are_pointed_out() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chorus.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        let with_secret = Config::parse(SAMPLE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = exposed_secrets(&path, &with_secret).expect("a warning");
        assert!(w.contains("mode 644") && w.contains("chmod 600"), "{w}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed_secrets(&path, &with_secret), None);
        // No secret in the file (all from the environment): nothing to say.
        let mut without = with_secret.clone();
        without.admin_token.clear();
        without.users.iter_mut().for_each(|u| u.password.clear());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(exposed_secrets(&path, &without), None);
    }
}
