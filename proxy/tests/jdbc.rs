//! pgjdbc (Debian's libpostgresql-jdbc-java), driven by `testkit/jdbc/ChorusJdbc.java`: server-
//! side prepared statements past the prepare threshold, batches with and without
//! reWriteBatchedInserts, binary transfer, CopyManager, notifications, Statement.cancel,
//! rollback, generated keys. The program runs once against a PostgreSQL server of its own and
//! once through Chorus with two backends; the outputs must be the same line for line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ChorusOptions, PgOptions, PgServer, Setup, APP_USER};

const JAR: &str = "/usr/share/java/postgresql.jar";

/// Compiles the program into a directory of its own.
fn compile() -> (tempfile::TempDir, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/jdbc/ChorusJdbc.java");
    assert!(Path::new(JAR).exists(), "{JAR} is missing: scripts/setup.sh installs libpostgresql-jdbc-java");
    let dir = tempfile::tempdir().unwrap();
    let out =
        Command::new("javac").args(["-cp", JAR, "-d"]).arg(dir.path()).arg(&src).output().expect("javac (default-jdk-headless)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let classes = dir.path().to_path_buf();
    (dir, classes)
}

fn run(classes: &Path, port: u16) -> Vec<String> {
    run_url(classes, &format!("jdbc:postgresql://127.0.0.1:{port}/postgres"))
}

fn run_url(classes: &Path, url: &str) -> Vec<String> {
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{JAR}:{}", classes.display()))
        .args(["ChorusJdbc", url, APP_USER.0, APP_USER.1])
        .output()
        .expect("java");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_answers_through_chorus_as_from_postgresql() {
    let (_keep, classes) = compile();
    let direct = PgServer::start(PgOptions::default()).await.unwrap();
    let s = Setup::new(2).await;
    let want = tokio::task::block_in_place(|| run(&classes, direct.port()));
    let got = tokio::task::block_in_place(|| run(&classes, s.chorus.port()));
    assert_eq!(want.len(), 12, "{want:#?}");
    assert!(want.iter().all(|l| !l.contains("FAILED")), "directly: {want:#?}");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "through Chorus, then directly");
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
    assert!(got.iter().any(|l| l == "cancel: sqlstate=57014 then=1"), "{got:#?}");
    assert!(got.iter().any(|l| l == "notifications: jch/n0,jch/n1,jch/n2"), "{got:#?}");
    assert!(got.iter().any(|l| l == "batch_error_in_a_transaction: sqlstate=23505 left=0"), "{got:#?}");
    assert!(got.iter().any(|l| l.starts_with("batch_returning_keys: keys=50 ")), "{got:#?}");
    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "{states:?}\n{}", s.chorus.log());
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}

/// The same program over TLS (`[tls] mode = "require"`, pgjdbc's `sslmode=verify-full` with the
/// test CA as `sslrootcert`): the same lines as from PostgreSQL directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_over_tls_with_verify_full() {
    let (_keep, classes) = compile();
    let dir = tempfile::Builder::new().prefix("chorus-tls-").tempdir().unwrap();
    let ca = common::tls::Ca::new(dir.path(), "ca");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    ca.issue(&cert, &key);
    let extra = format!("[tls]\nmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n", cert.display(), key.display());
    let s = Setup::with(2, ChorusOptions { auth: "scram-sha-256", extra }).await;
    let direct = PgServer::start(PgOptions::default()).await.unwrap();
    let want = tokio::task::block_in_place(|| run(&classes, direct.port()));
    let url =
        format!("jdbc:postgresql://localhost:{}/postgres?sslmode=verify-full&sslrootcert={}", s.chorus.port(), ca.file.display());
    let got = tokio::task::block_in_place(|| run_url(&classes, &url));
    assert_eq!(got, want, "over TLS through Chorus, then directly");
    let plain = tokio::task::block_in_place(|| {
        Command::new("java")
            .arg("-cp")
            .arg(format!("{JAR}:{}", classes.display()))
            .args(["ChorusJdbc", &format!("jdbc:postgresql://127.0.0.1:{}/postgres?sslmode=disable", s.chorus.port())])
            .args([APP_USER.0, APP_USER.1])
            .output()
            .unwrap()
    });
    let text = format!("{}{}", String::from_utf8_lossy(&plain.stdout), String::from_utf8_lossy(&plain.stderr));
    assert!(!plain.status.success() && text.contains("requires TLS"), "plaintext JDBC: {text}");
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}
