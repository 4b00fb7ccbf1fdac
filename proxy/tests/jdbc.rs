//! pgjdbc (Debian's libpostgresql-jdbc-java), driven by `testkit/jdbc/ChorusJdbc.java`: server-
//! side prepared statements past the prepare threshold, batches with and without
//! reWriteBatchedInserts, binary transfer, CopyManager, notifications, Statement.cancel,
//! rollback, generated keys. The program runs once against a PostgreSQL server of its own and
//! once through Chorus with two backends; the outputs must be the same line for line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{PgOptions, PgServer, Setup, APP_USER};

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
    let url = format!("jdbc:postgresql://127.0.0.1:{port}/postgres");
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{JAR}:{}", classes.display()))
        .args(["ChorusJdbc", &url, APP_USER.0, APP_USER.1])
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
    assert_eq!(want.len(), 10, "{want:#?}");
    assert!(want.iter().all(|l| !l.contains("FAILED")), "directly: {want:#?}");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "through Chorus, then directly");
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
    assert!(got.iter().any(|l| l == "cancel: sqlstate=57014 then=1"), "{got:#?}");
    assert!(got.iter().any(|l| l == "notifications: jch/n0,jch/n1,jch/n2"), "{got:#?}");
    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "{states:?}\n{}", s.chorus.log());
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}
