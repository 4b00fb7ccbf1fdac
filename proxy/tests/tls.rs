//! TLS between clients and Chorus (issue 14, point 1 and 2): libpq's sslmode=verify-full and
//! channel_binding=require, tokio-postgres and sqlx over rustls, direct TLS negotiation with
//! ALPN, a plaintext client refused under `mode = "require"`, and the certificate reloaded on
//! SIGHUP under a pgbench load. Certificates come from a test CA made here with rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::tls::Ca;
use common::{sh, ChorusOptions, Setup, APP_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Tls {
    _dir: tempfile::TempDir,
    ca: Ca,
    cert: PathBuf,
    key: PathBuf,
    s: Setup,
}

async fn setup(backends: usize, mode: &str) -> Tls {
    let dir = tempfile::Builder::new().prefix("chorus-tls-").tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca1");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    ca.issue(&cert, &key);
    let extra = format!("[tls]\nmode = \"{mode}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n", cert.display(), key.display());
    let s = Setup::with(backends, ChorusOptions { auth: "scram-sha-256", extra }).await;
    Tls { _dir: dir, ca, cert, key, s }
}

/// A libpq connection string to Chorus by name (so verify-full checks the name).
fn libpq(t: &Tls, more: &str) -> String {
    format!("host=localhost port={} user={} password={} dbname=postgres {more}", t.s.chorus.port(), APP_USER.0, APP_USER.1)
}

fn psql(conn: &str, sql: &str) -> (bool, String) {
    sh(Command::new("psql").args(["-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql, conn]))
}

fn rustls_client(ca: &Path, alpn: Option<&[u8]>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(a) = alpn {
        cfg.alpn_protocols = vec![a.to_vec()];
    }
    cfg
}

use rustls::pki_types::pem::PemObject;

/// Every backend holds the same rows, and `chorus verify` (over TLS to the listener where it
/// is on) says so.
async fn assert_equal(s: &Setup) {
    s.assert_identical().await;
    let (ok, out) = s.chorus.verify();
    assert!(ok, "verify: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_verify_full_with_channel_binding_and_plaintext_refused() {
    let t = setup(2, "require").await;
    let verify = format!("sslmode=verify-full sslrootcert={}", t.ca.file.display());
    // verify-full: the chain and the name are checked; SCRAM-SHA-256-PLUS binds the login to
    // this TLS channel (channel_binding=require fails unless the server offers and runs it).
    let (ok, out) =
        psql(&libpq(&t, &format!("{verify} channel_binding=require")), "CREATE TABLE t (n int); INSERT INTO t VALUES (1)");
    assert!(ok, "{out}");
    let (ok, out) = sh(Command::new("psql").args(["-X", "-c", "\\conninfo", &libpq(&t, &verify)]));
    assert!(ok && out.contains("SSL connection (protocol: TLSv1.3"), "{out}");
    // verify-ca checks the chain alone: a name the certificate does not carry still passes.
    let by_ip = format!(
        "host=chorus.test hostaddr=127.0.0.1 port={} user={} password={} dbname=postgres sslmode=verify-ca sslrootcert={}",
        t.s.chorus.port(),
        APP_USER.0,
        APP_USER.1,
        t.ca.file.display()
    );
    let (ok, out) = psql(&by_ip, "SELECT 1");
    assert!(ok, "verify-ca: {out}");
    let (ok, out) = psql(&by_ip.replace("verify-ca", "verify-full"), "SELECT 1");
    assert!(!ok && out.contains("does not match host name"), "verify-full by another name: {out}");
    // Another CA's clients refuse the certificate: the check above was a real one.
    let other = Ca::new(t._dir.path(), "other");
    let (ok, out) = psql(&libpq(&t, &format!("sslmode=verify-ca sslrootcert={}", other.file.display())), "SELECT 1");
    assert!(!ok && out.contains("certificate verify failed"), "{out}");
    // A plaintext client is refused with 28000, whatever its password.
    let (ok, out) = psql(&libpq(&t, "sslmode=disable"), "SELECT 1");
    assert!(!ok && out.contains("requires TLS"), "{out}");
    let plain =
        tokio_postgres::connect(&libpq(&t, "sslmode=disable"), tokio_postgres::NoTls).await.err().expect("plaintext accepted");
    assert_eq!(plain.code(), Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION), "{plain}");
    let (ok, out) = psql(&libpq(&t, &format!("{verify} channel_binding=require")), "UPDATE t SET n = n + 1 RETURNING n");
    assert_eq!((ok, out.trim()), (true, "2"), "{out}");
    assert_equal(&t.s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_and_sqlx_over_rustls() {
    let t = setup(2, "require").await;
    // tokio-postgres with tokio-postgres-rustls, channel binding required.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client(&t.ca.file, None));
    let (c, conn) = tokio_postgres::connect(&libpq(&t, "sslmode=require channel_binding=require"), tls).await.expect("TLS login");
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE t (n int PRIMARY KEY, v text)").await.unwrap();
    let stmt = c.prepare("INSERT INTO t VALUES ($1, $2)").await.unwrap();
    for i in 0..200 {
        c.execute(&stmt, &[&i, &format!("row {i}")]).await.unwrap();
    }
    // sqlx with its rustls (ring) feature, verify-full against the test CA.
    let opts = sqlx::postgres::PgConnectOptions::new()
        .host("localhost")
        .port(t.s.chorus.port())
        .username(APP_USER.0)
        .password(APP_USER.1)
        .database("postgres")
        .ssl_mode(sqlx::postgres::PgSslMode::VerifyFull)
        .ssl_root_cert(&t.ca.file);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(opts).await.expect("sqlx TLS login");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 200);
    sqlx::query("UPDATE t SET v = v || $1 WHERE n < $2").bind("!").bind(50).execute(&pool).await.unwrap();
    // A large result crosses many TLS records (of at most 16 KiB each).
    let big: String =
        sqlx::query_scalar("SELECT string_agg(v, ',') FROM t, generate_series(1, 200)").fetch_one(&pool).await.unwrap();
    let per_round: usize = (0..200).map(|i| format!("row {i}").len() + usize::from(i < 50)).sum();
    assert_eq!(big.len(), 200 * per_round + 200 * 200 - 1);
    pool.close().await;
    assert_equal(&t.s).await;
}

/// PostgreSQL 17's direct negotiation: the TLS hello first, with ALPN `postgresql`; without
/// that ALPN the connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_negotiation_needs_the_postgresql_alpn() {
    let t = setup(1, "allow").await;
    let startup = common::startup_packet(196_608, &[("user", APP_USER.0), ("database", "postgres")]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let direct = |alpn: Option<&'static [u8]>| {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&t.ca.file, alpn)));
        let port = t.s.chorus.port();
        let name = name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            connector.connect(name, tcp).await
        }
    };
    let mut s = direct(Some(b"postgresql")).await.expect("direct TLS handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    s.write_all(&startup).await.unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R', "an authentication request over the direct TLS connection");
    assert_eq!(i32::from_be_bytes([head[5], head[6], head[7], head[8]]), 10, "AuthenticationSASL");
    // Without ALPN: the handshake completes, then a FATAL 08P01 and the end.
    let mut s = direct(None).await.expect("handshake");
    s.write_all(&startup).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await.expect("not closed");
    let text = String::from_utf8_lossy(&got);
    assert!(got.first() == Some(&b'E') && text.contains("08P01") && text.contains("ALPN"), "{text}");
    // Another protocol's ALPN: rustls refuses the handshake itself.
    assert!(direct(Some(b"http/1.1")).await.is_err());
    // Mode allow: a plaintext client is still served.
    let c = t.s.client().await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert!(!t.s.chorus.log().contains("panicked"));
}

/// The certificate replaced and SIGHUP sent while pgbench connects anew for every transaction
/// over TLS: no client error; new connections get the new certificate; a bad file on the next
/// reload keeps the loaded one and says so in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_reloaded_on_sighup_under_load() {
    let t = setup(2, "require").await;
    let ca2 = Ca::new(t._dir.path(), "ca2");
    let both = t._dir.path().join("both.crt");
    std::fs::write(&both, format!("{}{}", t.ca.cert.pem(), ca2.cert.pem())).unwrap();
    let (ok, out) = sh(Command::new("pgbench").args(["-i", "-q", "-s", "1"]).arg(libpq(&t, "sslmode=require")));
    assert!(ok, "{out}");
    let only_new = libpq(&t, &format!("sslmode=verify-full sslrootcert={}", ca2.file.display()));
    let (ok, out) = psql(&only_new, "SELECT 1");
    assert!(!ok && out.contains("certificate verify failed"), "the new CA does not sign the loaded certificate yet: {out}");
    let load = Command::new("pgbench")
        .args(["-n", "-C", "-c", "4", "-j", "2", "-T", "12", "--verbose-errors"])
        .arg(libpq(&t, &format!("sslmode=verify-full sslrootcert={}", both.display())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench");
    // A session over TLS opened before the reload: it keeps its TLS session and works after.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client(&t.ca.file, None));
    let (before, conn) = tokio_postgres::connect(&libpq(&t, "sslmode=require"), tls).await.expect("TLS login");
    tokio::spawn(conn);
    let pid = t.s.chorus.pid().expect("chorus runs") as i32;
    // Under way: transactions are being recorded.
    let _: i64 =
        common::await_row(&t.s.servers[0], "SELECT count(*) FROM pgbench_history HAVING count(*) > 20", &[], "no load").await;
    ca2.issue(&t.cert, &t.key);
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloaded = || t.s.chorus.log().contains("TLS certificate and key reloaded");
    for _ in 0..200 {
        if reloaded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded(), "{}", t.s.chorus.log());
    let (ok, out) = psql(&only_new, "SELECT 1");
    assert!(ok, "a new connection sees the new certificate: {out}");
    // A broken file: the loaded certificate stays, one line says why.
    std::fs::write(&t.key, "not a key").unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let refused = || t.s.chorus.log().matches("TLS files not reloaded").count();
    for _ in 0..200 {
        if refused() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused(), 1, "{}", t.s.chorus.log());
    let (ok, out) = psql(&only_new, "SELECT 1");
    assert!(ok, "the loaded certificate stays in use: {out}");
    let n: i64 = before.query_one("SELECT count(*) FROM pgbench_branches", &[]).await.expect("the session from before").get(0);
    assert_eq!(n, 1);
    let out = load.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("error"), "pgbench:\n{text}");
    let failed =
        text.lines().find(|l| l.starts_with("number of failed transactions")).unwrap_or("number of failed transactions: 0");
    assert!(failed.contains(": 0"), "{text}");
    let processed = text.lines().find(|l| l.starts_with("number of transactions actually processed")).unwrap_or_default();
    eprintln!("pgbench over TLS, reconnecting each transaction: {processed}; {failed}");
    assert_equal(&t.s).await;
}

/// Servers for the backend side: `ssl = on`, TCP logins only over TLS, a certificate from `ca`.
async fn tls_servers(ca: &Ca, dir: &Path, n: usize) -> Vec<common::PgServer> {
    let (cert, key) = (dir.join("pg.crt"), dir.join("pg.key"));
    ca.issue(&cert, &key);
    let pem = (std::fs::read_to_string(&cert).unwrap(), std::fs::read_to_string(&key).unwrap());
    let mut out = Vec::new();
    for _ in 0..n {
        let opts = common::PgOptions { tls: Some(pem.clone()), ssl_only: true, ..Default::default() };
        out.push(common::PgServer::start(opts).await.expect("start postgres with TLS"));
    }
    out
}

/// TCP sessions on `srv`: (over TLS, in plaintext).
async fn tcp_sessions(srv: &common::PgServer) -> (i64, i64) {
    let c = srv.local_client("postgres").await.unwrap();
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.client_addr IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Backends with `ssl = on` and hostssl-only pg_hba: Chorus connects with verify-full (its
/// sessions, health checks and verify), a third backend joins over TLS (pg_dump and
/// pg_restore given the settings through their environment), and verify compares all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_tls_with_verify_full_a_join_and_verify() {
    let dir = tempfile::Builder::new().prefix("chorus-tls-").tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let mut servers = tls_servers(&ca, dir.path(), 3).await;
    let newcomer = servers.pop().unwrap();
    let extra = format!("backend_sslmode = \"verify-full\"\nbackend_sslrootcert = \"{}\"\n", ca.file.display());
    let refs: Vec<&common::PgServer> = servers.iter().collect();
    let chorus = common::ChorusProcess::start(common::chorus_bin(), &refs, ChorusOptions { auth: "scram-sha-256", extra })
        .await
        .expect("chorus over TLS backends");
    let s = Setup { servers, chorus };
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE t (n serial PRIMARY KEY, v text); INSERT INTO t (v) SELECT 'v' || g FROM generate_series(1, 500) g",
    )
    .await
    .unwrap();
    for srv in &s.servers {
        let (tls, plain) = tcp_sessions(srv).await;
        assert!(tls >= 1 && plain == 0, "{tls} TLS and {plain} plaintext sessions on a backend");
    }
    let port = newcomer.port().to_string();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port]);
    assert!(ok && out.contains("pg3 is in sync"), "join over TLS: {out}\n{}", s.chorus.log());
    c.execute("UPDATE t SET v = v || '!' WHERE n % 7 = 0", &[]).await.unwrap();
    assert_eq!(s.chorus.states().get("pg3").map(String::as_str), Some("in_sync"));
    let (ok, out) = s.chorus.verify();
    assert!(ok, "verify: {out}");
    let all: Vec<&common::PgServer> = s.servers.iter().chain([&newcomer]).collect();
    common::assert_identical(&all, "postgres").await;
    let (_, plain) = tcp_sessions(&newcomer).await;
    assert_eq!(plain, 0);
    // A CA that did not sign the backends' certificates: Chorus does not start.
    let other = Ca::new(dir.path(), "other");
    let extra = format!("backend_sslmode = \"verify-ca\"\nbackend_sslrootcert = \"{}\"\n", other.file.display());
    let refused =
        common::ChorusProcess::start(common::chorus_bin(), &refs_of(&s), ChorusOptions { auth: "scram-sha-256", extra }).await;
    let e = refused.err().expect("a backend with an unknown CA's certificate was accepted").to_string();
    assert!(e.contains("UnknownIssuer") || e.contains("unknown issuer") || e.contains("invalid peer certificate"), "{e}");
}

/// A backend killed and started again comes back by catch-up over TLS (the applier's logins and
/// its reads of the histories use the backends' sslmode too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_is_caught_up_over_tls() {
    let dir = tempfile::Builder::new().prefix("chorus-tls-").tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let servers = tls_servers(&ca, dir.path(), 2).await;
    let extra = format!("backend_sslmode = \"verify-full\"\nbackend_sslrootcert = \"{}\"\n", ca.file.display());
    let refs: Vec<&common::PgServer> = servers.iter().collect();
    let chorus = common::ChorusProcess::start(common::chorus_bin(), &refs, ChorusOptions { auth: "scram-sha-256", extra })
        .await
        .expect("chorus over TLS backends");
    let mut s = Setup { servers, chorus };
    let c = s.client().await;
    c.batch_execute("CREATE TABLE t (n int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    s.servers[1].kill();
    // A write finds pg2 gone; the health checks take it out.
    c.execute("INSERT INTO t SELECT g, 'w' FROM generate_series(101, 300) g", &[]).await.unwrap();
    s.chorus.wait_state("pg2", "down", Duration::from_secs(30)).await.unwrap();
    for i in 0..50 {
        c.execute("UPDATE t SET v = v || '.' WHERE n = $1", &[&(i * 3)]).await.unwrap();
    }
    s.servers[1].restart().await.unwrap();
    s.chorus.wait_state("pg2", "in_sync", Duration::from_secs(60)).await.unwrap();
    assert!(s.chorus.log().contains("caught up from the update history"), "{}", s.chorus.log());
    let (_, plain) = tcp_sessions(&s.servers[1]).await;
    assert_eq!(plain, 0);
    assert_equal(&s).await;
}

fn refs_of(s: &Setup) -> Vec<&common::PgServer> {
    s.servers.iter().collect()
}

/// A backend that asks for the password in cleartext over a connection not required to be
/// encrypted gets no password: Chorus says so in one line; `allow_cleartext_password` lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleartext_password_is_sent_only_over_tls_or_when_allowed() {
    let opts = common::PgOptions { host_auth: common::HostAuth::Password, ..Default::default() };
    let srv = common::PgServer::start(opts).await.unwrap();
    let refused = common::ChorusProcess::start(common::chorus_bin(), &[&srv], ChorusOptions::default()).await;
    let e = refused.err().expect("a cleartext password was sent over plaintext").to_string();
    assert!(e.contains("asks for the password in cleartext and its sslmode is prefer: refused"), "{e}");
    assert_eq!(e.matches("asks for the password in cleartext").count(), 1, "{e}");
    let opts = ChorusOptions { auth: "scram-sha-256", extra: "allow_cleartext_password = true\n".into() };
    let chorus = common::ChorusProcess::start(common::chorus_bin(), &[&srv], opts).await.expect("allowed");
    let c = chorus.client().await.unwrap();
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

/// The admin API over HTTPS with the listener's certificate: chorusctl checks it against
/// `--cacert`, refuses it without; plain HTTP gets nothing. Without HTTPS on an address
/// beyond loopback, Chorus warns at startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_over_https_and_a_warning_without_it() {
    let dir = tempfile::Builder::new().prefix("chorus-tls-").tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    ca.issue(&cert, &key);
    let extra = format!(
        "[tls]\nmode = \"allow\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nadmin_https = true\n",
        cert.display(),
        key.display()
    );
    let mut s = Setup::with(1, ChorusOptions { auth: "scram-sha-256", extra }).await;
    let port = s.chorus.admin_url().rsplit(':').next().unwrap().to_string();
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(common::chorus_bin().with_file_name("chorusctl"));
        cmd.args(["--admin", &format!("https://localhost:{port}"), "--token", chorus_testkit::ADMIN_TOKEN]).args(args);
        sh(&mut cmd)
    };
    let (ok, out) = ctl(&["--cacert", &ca.file.display().to_string(), "backends"]);
    assert!(ok && out.contains("pg1") && out.contains("in_sync"), "{out}");
    let (ok, out) = ctl(&["backends"]);
    assert!(!ok && out.to_lowercase().contains("certificate"), "the web's roots do not know the test CA: {out}");
    let (ok, out) = common::sh(Command::new(common::chorus_bin().with_file_name("chorusctl")).args([
        "--admin",
        &format!("http://127.0.0.1:{port}"),
        "--token",
        chorus_testkit::ADMIN_TOKEN,
        "backends",
    ]));
    assert!(!ok, "plain HTTP answered on the HTTPS port: {out}");
    assert!(!s.chorus.log().contains("beyond loopback"));
    // Without HTTPS, on every address: one warning line at startup.
    s.chorus.stop();
    let config = std::fs::read_to_string(s.chorus.config_path()).unwrap();
    let config = config.replace("admin_listen = \"127.0.0.1:", "admin_listen = \"0.0.0.0:").replace("admin_https = true\n", "");
    std::fs::write(s.chorus.config_path(), config).unwrap();
    s.chorus.launch().await.unwrap();
    let warned = || s.chorus.log().matches("the admin API listens beyond loopback without TLS").count();
    // The client port takes connections from its bind on; "ready" is logged once all is set
    // (the log holds the first start's lines too).
    for _ in 0..200 {
        if s.chorus.log().matches("Chorus is ready").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(warned(), 1, "{}", s.chorus.log());
}

/// `ca_file`: a client certificate signed by that CA is accepted, one signed by another CA is
/// refused at the handshake, and a client without one is admitted on its password alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_checked_against_ca_file() {
    let dir = tempfile::Builder::new().prefix("chorus-tls-").tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let clients = Ca::new(dir.path(), "clients");
    let stranger = Ca::new(dir.path(), "stranger");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    ca.issue(&cert, &key);
    let extra = format!(
        "[tls]\nmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        cert.display(),
        key.display(),
        clients.file.display()
    );
    let s = Setup::with(1, ChorusOptions { auth: "scram-sha-256", extra }).await;
    let conn = |more: &str| {
        format!(
            "host=localhost port={} user={} password={} dbname=postgres sslmode=verify-full sslrootcert={} {more}",
            s.chorus.port(),
            APP_USER.0,
            APP_USER.1,
            ca.file.display()
        )
    };
    let client_pair = |signer: &Ca, name: &str| {
        let (c, k) = (dir.path().join(format!("{name}.crt")), dir.path().join(format!("{name}.key")));
        signer.issue(&c, &k);
        std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        format!("sslcert={} sslkey={}", c.display(), k.display())
    };
    let (ok, out) = psql(&conn(&client_pair(&clients, "good")), "SELECT 1");
    assert!(ok, "a certificate from ca_file's CA: {out}");
    let (ok, out) = psql(&conn(&client_pair(&stranger, "bad")), "SELECT 1");
    assert!(!ok && out.contains("alert unknown ca"), "a stranger's certificate: {out}");
    let (ok, out) = psql(&conn(""), "SELECT 1");
    assert!(ok, "no certificate, the password decides: {out}");
}
