//! Hostile and broken clients: each gets a clear ErrorResponse or a clean disconnect, Chorus
//! never panics, and a healthy session running alongside is unaffected.

mod common;

use std::time::Duration;

use common::{startup_packet, ChorusOptions, Setup, APP_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::Client;

async fn setup() -> (Setup, Client) {
    let opts = ChorusOptions {
        auth: "scram-sha-256",
        extra: "max_message_size = 65536\nlogin_timeout = \"2s\"\nmax_client_connections = 6\n".into(),
    };
    let s = Setup::with(2, opts).await;
    let healthy = s.client().await;
    healthy.batch_execute("CREATE TABLE canary (n int); INSERT INTO canary VALUES (1);").await.unwrap();
    (s, healthy)
}

/// The healthy session still reads and writes, and Chorus is still running.
async fn still_healthy(s: &Setup, c: &Client) {
    c.execute("UPDATE canary SET n = n + 1", &[]).await.expect("healthy session broken");
    assert!(!s.chorus.log().contains("panicked"), "{}", s.chorus.log());
    s.assert_identical().await;
}

/// Reads what the server sends until it closes; returns the SQLSTATE of an ErrorResponse.
async fn read_error(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("server did not close the connection");
    let mut i = 0;
    while i + 5 <= buf.len() {
        let tag = buf[i];
        let len = u32::from_be_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]) as usize;
        let body = &buf[i + 5..(i + 1 + len).min(buf.len())];
        if tag == b'E' {
            let mut fields = body.split(|&b| b == 0);
            return fields.find_map(|f| f.strip_prefix(b"C")).map(|c| String::from_utf8_lossy(c).into_owned());
        }
        i += 1 + len;
    }
    None
}

fn startup(user: &str) -> Vec<u8> {
    startup_packet(196_608, &[("user", user), ("database", "postgres")])
}

/// A logged-in raw connection (through tokio-postgres's SCRAM is more work than needed here,
/// so raw sessions log in as a trust user on a separate Chorus).
async fn raw_session(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&startup(APP_USER.0)).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during login");
        got.extend_from_slice(&buf[..n]);
        // ReadyForQuery ends the login.
        if got.len() >= 6 && got[got.len() - 6] == b'Z' {
            return s;
        }
    }
}

/// A first packet that is no startup packet: an oversized one, or Terminate sent before any
/// startup (node-postgres's `connect()` then `end()`). PostgreSQL closes without a word; so
/// does Chorus, byte for byte the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_packet_that_is_no_startup_is_closed_on_silently() {
    let (s, healthy) = setup().await;
    let oversized = [&20_000u32.to_be_bytes()[..], &[0u8; 64]].concat();
    let terminate = b"X\0\0\0\x04".to_vec();
    for packet in [oversized, terminate] {
        let mut replies = Vec::new();
        for port in [s.chorus.port(), s.servers[0].port()] {
            let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            c.write_all(&packet).await.unwrap();
            let mut buf = Vec::new();
            // Closed, or reset: a server that closes with unread bytes in its socket sends RST.
            let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf)).await.expect("closed");
            replies.push(buf);
        }
        assert_eq!(replies[0], replies[1], "Chorus and PostgreSQL answer {packet:?} alike");
        assert!(replies[0].is_empty(), "{:?}", replies[0]);
    }
    still_healthy(&s, &healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user() {
    let (s, healthy) = setup().await;
    let bad = format!("host=127.0.0.1 port={} user={} password=wrong dbname=postgres", s.chorus.port(), APP_USER.0);
    let err = tokio_postgres::connect(&bad, tokio_postgres::NoTls).await.err().expect("wrong password accepted");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    let wrong = err.as_db_error().unwrap().message().to_string();
    // An unknown name fails exactly as a wrong password does (SQLSTATE and words), after the
    // same SCRAM exchange: names cannot be probed.
    let unknown = format!("host=127.0.0.1 port={} user=nobody password=x dbname=postgres", s.chorus.port());
    let err = tokio_postgres::connect(&unknown, tokio_postgres::NoTls).await.err().expect("unknown user accepted");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    assert_eq!(err.as_db_error().unwrap().message(), wrong.replace(APP_USER.0, "nobody"));
    // The salt offered for a name is the same at every try, known or not, with the same
    // iteration count.
    for user in [APP_USER.0, "nobody"] {
        let first = scram_salt(s.chorus.port(), user).await;
        assert_eq!(first, scram_salt(s.chorus.port(), user).await, "{user}");
        assert!(first.ends_with(",i=4096"), "{first}");
    }
    still_healthy(&s, &healthy).await;
}

/// One message from the server: (tag, body).
async fn read_msg(c: &mut TcpStream) -> (u8, Vec<u8>) {
    let tag = c.read_u8().await.unwrap();
    let len = c.read_u32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    c.read_exact(&mut body).await.unwrap();
    (tag, body)
}

/// The salt and iteration count of the server-first SCRAM message offered to `user`.
async fn scram_salt(port: u16, user: &str) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(&startup(user)).await.unwrap();
    let (tag, body) = read_msg(&mut c).await;
    assert_eq!((tag, &body[..4]), (b'R', &10i32.to_be_bytes()[..]), "AuthenticationSASL");
    let first = b"n,,n=,r=0123456789abcdef";
    let mut msg = vec![b'p'];
    let payload = [&b"SCRAM-SHA-256\0"[..], &(first.len() as i32).to_be_bytes(), first].concat();
    msg.extend_from_slice(&((payload.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&payload);
    c.write_all(&msg).await.unwrap();
    let (tag, body) = read_msg(&mut c).await;
    assert_eq!((tag, &body[..4]), (b'R', &11i32.to_be_bytes()[..]), "AuthenticationSASLContinue");
    let server_first = String::from_utf8(body[4..].to_vec()).unwrap();
    server_first.split_once(",s=").unwrap().1.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_login_timeout() {
    let (s, healthy) = setup().await;
    let mut c = TcpStream::connect(("127.0.0.1", s.chorus.port())).await.unwrap();
    let started = std::time::Instant::now();
    let code = read_error(&mut c).await;
    assert_eq!(code.as_deref(), Some("08P01"));
    assert!(started.elapsed() >= Duration::from_millis(1900), "dropped too early: {:?}", started.elapsed());
    still_healthy(&s, &healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients() {
    let (s, healthy) = setup().await;
    // The healthy session is one; five more fill max_client_connections = 6.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(s.client().await);
    }
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    let err = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.err().expect("a seventh client was admitted");
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    drop(held);
    still_healthy(&s, &healthy).await;
}

/// Raw-protocol cases need a login without SCRAM: a trust Chorus over the same servers. Two
/// Chorus instances would hand out the same serials, so this one keeps no history.
async fn trust_chorus(s: &Setup) -> common::ChorusProcess {
    let opts = ChorusOptions { auth: "trust", extra: "max_message_size = 65536\nhistory = false\n".into() };
    common::ChorusProcess::start(common::chorus_bin(), &s.refs(), opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_the_size_limit() {
    let (s, healthy) = setup().await;
    let t = trust_chorus(&s).await;
    let mut c = raw_session(t.port()).await;
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&(10_000_000u32).to_be_bytes());
    msg.extend_from_slice(b"SELECT 1");
    c.write_all(&msg).await.unwrap();
    assert_eq!(read_error(&mut c).await.as_deref(), Some("08P01"));
    assert!(!t.log().contains("panicked"));
    still_healthy(&s, &healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_type() {
    let (s, healthy) = setup().await;
    let t = trust_chorus(&s).await;
    let mut c = raw_session(t.port()).await;
    c.write_all(&[b'y', 0, 0, 0, 8, 1, 2, 3, 4]).await.unwrap();
    assert_eq!(read_error(&mut c).await.as_deref(), Some("08P01"));
    still_healthy(&s, &healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_then_disconnect() {
    let (s, healthy) = setup().await;
    let t = trust_chorus(&s).await;
    let mut c = raw_session(t.port()).await;
    // Half an UPDATE: nothing of it may reach a backend.
    let sql = b"UPDATE canary SET n = 1000\0";
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(&sql[..10]);
    c.write_all(&msg).await.unwrap();
    drop(c);
    // The raw session's end is seen by Chorus; the canary row was never set to 1000.
    let probe = t.client_as(APP_USER, "postgres").await.unwrap();
    assert_eq!(probe.query_one("SELECT n FROM canary", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert!(!t.log().contains("panicked"));
    still_healthy(&s, &healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_gss_and_newer_protocol_versions_are_negotiated() {
    let (s, healthy) = setup().await;
    let t = trust_chorus(&s).await;
    let mut c = TcpStream::connect(("127.0.0.1", t.port())).await.unwrap();
    for code in [80_877_103i32, 80_877_104] {
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        c.write_all(&req).await.unwrap();
        let mut answer = [0u8; 1];
        c.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
    }
    // Protocol 3.2 with an unknown _pq_ option: NegotiateProtocolVersion names 3.0 and the option.
    let msg = startup_packet(196_608 + 2, &[("user", APP_USER.0), ("database", "postgres"), ("_pq_.magic", "1")]);
    c.write_all(&msg).await.unwrap();
    let mut head = [0u8; 5];
    c.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'v');
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut rest = vec![0u8; len - 4];
    c.read_exact(&mut rest).await.unwrap();
    assert_eq!(i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]), 196_608);
    assert_eq!(i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]), 1);
    assert_eq!(&rest[8..], b"_pq_.magic\0");
    // Then the login goes on: AuthenticationOk follows.
    c.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R');
    still_healthy(&s, &healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_is_forwarded() {
    let (s, healthy) = setup().await;
    let t = trust_chorus(&s).await;
    let oid: u32 = healthy.query_one("SELECT 'abs(integer)'::regprocedure::oid", &[]).await.unwrap().get(0);
    let mut c = raw_session(t.port()).await;
    // FunctionCall: oid, 1 format code (text), 1 argument "-42", result format text.
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&3i32.to_be_bytes());
    body.extend_from_slice(b"-42");
    body.extend_from_slice(&0i16.to_be_bytes());
    let mut msg = vec![b'F'];
    msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(&body);
    c.write_all(&msg).await.unwrap();
    // FunctionCallResponse 'V' with "42", then ReadyForQuery.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"Z\0\0\0\x05I") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&got[..11], b"V\0\0\0\x0a\0\0\0\x0242", "{}", String::from_utf8_lossy(&got));
    still_healthy(&s, &healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_address_are_answered_one_per_delay() {
    let delay = Duration::from_millis(300);
    let opts = ChorusOptions { auth: "scram-sha-256", extra: "auth_failure_delay = \"300ms\"\n".into() };
    let s = Setup::with(1, opts).await;
    let bad = format!("host=127.0.0.1 port={} user={} password=wrong dbname=postgres", s.chorus.port(), APP_USER.0);
    let start = std::time::Instant::now();
    let tries: Vec<_> = (0..4)
        .map(|_| {
            let bad = bad.clone();
            tokio::spawn(async move {
                let e = tokio_postgres::connect(&bad, tokio_postgres::NoTls).await.err().expect("a wrong password was accepted");
                (e.code().map(|c| c.code().to_string()), start.elapsed())
            })
        })
        .collect();
    // The right password from the same address meanwhile is not refused.
    let good = s.client().await;
    assert_eq!(good.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let mut answered = Vec::new();
    for t in tries {
        let (code, at) = t.await.unwrap();
        assert_eq!(code.as_deref(), Some("28P01"));
        answered.push(at);
    }
    answered.sort();
    // Four guesses from one address take at least four delays: one guess per delay.
    for (k, at) in answered.iter().enumerate() {
        assert!(*at >= delay * (k as u32 + 1), "guess {k} answered after {at:?}");
    }
}

/// A login through tokio-postgres from a chosen loopback address (127.0.0.x).
async fn login_from(from: [u8; 4], port: u16, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(from), 0).into()).unwrap();
    let stream = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(APP_USER.0).password(password).dbname("postgres");
    let (client, conn) = cfg.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// 1,000 wrong passwords from one address are answered one per `auth_failure_delay`, so they
/// take at least 1,000 delays; meanwhile clients from another address log in at once: their
/// 20 logins all end while the guesses are still being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_wrong_passwords_are_slowed_and_other_clients_are_not() {
    let delay = Duration::from_millis(10);
    let opts = ChorusOptions { auth: "scram-sha-256", extra: "auth_failure_delay = \"10ms\"\nlogin_timeout = \"60s\"\n".into() };
    let s = Setup::with(1, opts).await;
    let port = s.chorus.port();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = std::time::Instant::now();
    // 25 guessers of 40 guesses each, all from 127.0.0.1.
    let guessers: Vec<_> = (0..25)
        .map(|_| {
            let answered = answered.clone();
            tokio::spawn(async move {
                for _ in 0..40 {
                    let Err(e) = login_from([127, 0, 0, 1], port, "wrong").await else { panic!("a wrong password was accepted") };
                    assert_eq!(e.code().map(|c| c.code()), Some("28P01"));
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Until the guessing is under way.
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..20 {
        let c = login_from([127, 0, 0, 2], port, APP_USER.1).await.expect("a good login from another address");
        assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    }
    let by_then = answered.load(std::sync::atomic::Ordering::SeqCst);
    assert!(by_then < 1000, "the good logins waited behind the guesses: {by_then} guesses answered first");
    for g in guessers {
        g.await.unwrap();
    }
    let took = start.elapsed();
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 1000);
    assert!(took >= delay * 1000, "1,000 guesses from one address answered in {took:?}");
    eprintln!("1,000 wrong passwords took {took:?}; 20 good logins from another address ended after {by_then} of them");
}
