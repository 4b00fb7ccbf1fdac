//! Client logins by md5 and trust, and backend logins by whatever each backend asks for.

mod common;

use chorus_testkit::HostAuth;
use common::{chorus_bin, ChorusOptions, ChorusProcess, PgOptions, PgServer};

async fn write_through(chorus: &ChorusProcess, servers: &[&PgServer]) {
    let c = chorus.client().await.expect("login through chorus");
    c.batch_execute("CREATE TABLE a (v int); INSERT INTO a VALUES (1), (2);").await.unwrap();
    assert_eq!(c.query_one("SELECT sum(v) FROM a", &[]).await.unwrap().get::<_, i64>(0), 3);
    common::assert_identical(servers, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_client_with_md5_and_cleartext_backends() {
    let a = PgServer::start(PgOptions { host_auth: HostAuth::Md5, ..Default::default() }).await.unwrap();
    let b = PgServer::start(PgOptions { host_auth: HostAuth::Password, ..Default::default() }).await.unwrap();
    // A cleartext password over plaintext needs the operator's yes (tests/tls.rs: refused without it).
    let opts = ChorusOptions { auth: "md5", extra: "allow_cleartext_password = true\n".into() };
    let chorus = ChorusProcess::start(chorus_bin(), &[&a, &b], opts).await.unwrap();
    write_through(&chorus, &[&a, &b]).await;
    let bad = format!("host=127.0.0.1 port={} user=app password=nope dbname=postgres", chorus.port());
    let err = tokio_postgres::connect(&bad, tokio_postgres::NoTls).await.err().unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
    // An unknown name is asked for its password and refused as a wrong password is.
    let unknown = format!("host=127.0.0.1 port={} user=nobody password=nope dbname=postgres", chorus.port());
    let err = tokio_postgres::connect(&unknown, tokio_postgres::NoTls).await.err().unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
    assert_eq!(err.as_db_error().unwrap().message(), "password authentication failed for user \"nobody\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_client_with_scram_and_trust_backends() {
    let a = PgServer::start(PgOptions::default()).await.unwrap();
    let b = PgServer::start(PgOptions { host_auth: HostAuth::Trust, ..Default::default() }).await.unwrap();
    let chorus =
        ChorusProcess::start(chorus_bin(), &[&a, &b], ChorusOptions { auth: "trust", ..Default::default() }).await.unwrap();
    write_through(&chorus, &[&a, &b]).await;
    let unknown = format!("host=127.0.0.1 port={} user=nobody dbname=postgres", chorus.port());
    let err = tokio_postgres::connect(&unknown, tokio_postgres::NoTls).await.err().unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("28000"));
}
