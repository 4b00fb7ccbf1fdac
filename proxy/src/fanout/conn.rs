//! One session's connection to one backend: opening it, logging in, and its buffers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::outcome::Outcome;
use crate::cluster::Backend;
use crate::protocol::message::{self, AUTH_CLEARTEXT, AUTH_MD5, AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL};
use crate::protocol::{Frame, FrameCodec};
use crate::tls::Stream;
use crate::wire::OutQueue;

/// A live connection from one session to one backend.
pub struct BackendConn {
    pub backend: Arc<Backend>,
    pub stream: Stream,
    /// Bytes read from the backend and not yet handled.
    pub rbuf: BytesMut,
    /// Frames waiting to be written to the backend.
    pub out: OutQueue,
    pub alive: bool,
    /// The backend's own cancel key, for forwarding CancelRequest.
    pub key: (i32, i32),
    /// Sequence numbers of the requests sent and not yet answered, oldest first.
    pub queue: VecDeque<u64>,
    /// Reply messages (async ones excluded) consumed for the oldest request.
    pub pos: u32,
    /// What the backend answered so far to the oldest request.
    pub outcome: Outcome,
    /// The connection ended on the backend's side and the session has not yet decided
    /// whether that was the backend failing or this session's connection alone.
    pub ended: Option<Ended>,
    /// Since when the backend has taken none of the frames queued for it while that queue is
    /// past the high-water mark (the session stops reading its client then).
    pub stalled_since: Option<std::time::Instant>,
    /// The session's default isolation on this server (`default_transaction_isolation` as the
    /// login left it: server, database, role and startup settings) is REPEATABLE READ or
    /// SERIALIZABLE, or could not be read.
    pub strict_default: bool,
}

/// How a session's connection ended on the backend's side.
pub struct Ended {
    /// The SQLSTATE of the FATAL it sent last, if it sent one.
    pub code: Option<[u8; 5]>,
    /// That FATAL as sent, to forward when the session ends because of it.
    pub frame: Option<BytesMut>,
    /// The request it was in the middle of, when that request may have committed on some
    /// backends and not on this one.
    pub at_risk: Option<u64>,
    pub why: String,
    /// Its requests wait for the health check before they go on without it (it ended with
    /// 57P01: a client's pid signal may have ended the whole session).
    pub held: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The backend could not be reached or broke the protocol: a fault of the backend.
    #[error("{0}")]
    Io(String),
    /// The backend refused the login with an ErrorResponse (kept whole, to forward it).
    #[error("backend refused the login: {}", message::error_fields(.0.body()).message)]
    Refused(Frame),
}

fn io(e: impl std::fmt::Display) -> LoginError {
    LoginError::Io(e.to_string())
}

/// The result of a successful login: the connection and the ParameterStatus frames it sent.
pub struct Login {
    pub conn: BackendConn,
    pub params: Vec<Frame>,
}

/// Connects to `backend` and logs in as `user` with `password`, passing the client's startup
/// parameters, by whatever method the backend asks for.
pub async fn connect(
    backend: Arc<Backend>,
    params: &[(String, String)],
    user: &str,
    password: &str,
    timeout: Duration,
) -> Result<Login, LoginError> {
    let fut = async {
        let mut stream = crate::tls::backend::open(&backend.host, &backend.addr, &backend.tls).await.map_err(io)?;
        let mut buf = BytesMut::with_capacity(512);
        startup_message(params, &mut buf);
        stream.write_all(&buf).await.map_err(io)?;
        let mut rbuf = BytesMut::with_capacity(4096);
        let mut codec = FrameCodec::new(1 << 20);
        let mut scram: Option<ScramSha256> = None;
        let mut param_frames = Vec::new();
        let mut key = (0, 0);
        loop {
            let frame = read_frame(&mut stream, &mut rbuf, &mut codec).await?;
            match frame.tag {
                message::AUTHENTICATION => {
                    let (code, data) = message::authentication(frame.body()).map_err(io)?;
                    buf.clear();
                    match code {
                        AUTH_OK => continue,
                        AUTH_CLEARTEXT if !backend.tls.may_send_cleartext() => return Err(io(cleartext_refused(&backend))),
                        AUTH_CLEARTEXT => frontend::password_message(password.as_bytes(), &mut buf).map_err(io)?,
                        AUTH_MD5 => {
                            let salt: [u8; 4] =
                                data.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| io("bad md5 salt"))?;
                            let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut buf).map_err(io)?;
                        }
                        AUTH_SASL => {
                            let (mechanism, binding) = sasl_choice(data, &stream)?;
                            let s = ScramSha256::new(password.as_bytes(), binding);
                            frontend::sasl_initial_response(mechanism, s.message(), &mut buf).map_err(io)?;
                            scram = Some(s);
                        }
                        AUTH_SASL_CONTINUE => {
                            let s = scram.as_mut().ok_or_else(|| io("SASL continue without SASL start"))?;
                            s.update(data).map_err(io)?;
                            frontend::sasl_response(s.message(), &mut buf).map_err(io)?;
                        }
                        AUTH_SASL_FINAL => {
                            let s = scram.as_mut().ok_or_else(|| io("SASL final without SASL start"))?;
                            s.finish(data).map_err(|e| io(format!("backend's SCRAM signature is wrong: {e}")))?;
                            continue;
                        }
                        other => return Err(io(format!("backend asks for unsupported authentication method {other}"))),
                    }
                    stream.write_all(&buf).await.map_err(io)?;
                }
                message::ERROR_RESPONSE => return Err(LoginError::Refused(frame)),
                message::PARAMETER_STATUS => param_frames.push(frame),
                message::BACKEND_KEY_DATA => key = message::backend_key_data(frame.body()).map_err(io)?,
                message::READY_FOR_QUERY => {
                    let strict_default = strict_default(&mut stream, &mut rbuf, &mut codec).await?;
                    let conn = BackendConn {
                        backend: backend.clone(),
                        stream,
                        rbuf,
                        out: OutQueue::default(),
                        alive: true,
                        key,
                        queue: VecDeque::new(),
                        pos: 0,
                        outcome: Outcome::new(),
                        ended: None,
                        stalled_since: None,
                        strict_default,
                    };
                    return Ok(Login { conn, params: param_frames });
                }
                // Notices and protocol negotiation during login change nothing for us.
                _ => {}
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(LoginError::Io(format!("no login within {timeout:?}"))),
    }
}

/// Runs requests on a connection that no session drives (a session's new backend before it
/// joins the session, a join's replay) and returns each one's outcome. Every request must end
/// in exactly one ReadyForQuery: a Query with what follows it (COPY data), or extended messages
/// up to a Sync. They are written at once and answered in order.
pub async fn run_requests(conn: &mut BackendConn, requests: &[(&[u8], bool)], timeout: Duration) -> Result<Vec<Outcome>, String> {
    let fut = async {
        let mut codec = FrameCodec::new((1 << 30) + 1024);
        // One write for the lot: one packet where it fits, not one per request.
        let total: usize = requests.iter().map(|(f, _)| f.len()).sum();
        let mut all = BytesMut::with_capacity(total);
        for (frames, _) in requests {
            all.extend_from_slice(frames);
        }
        conn.stream.write_all(&all).await.map_err(|e| format!("write failed: {e}"))?;
        let mut out = Vec::with_capacity(requests.len());
        let mut o = Outcome::new();
        while out.len() < requests.len() {
            let f = read_frame(&mut conn.stream, &mut conn.rbuf, &mut codec).await.map_err(|e| e.to_string())?;
            if f.tag == message::ERROR_RESPONSE {
                let e = message::error_fields(f.body());
                if e.severity == "FATAL" || e.severity == "PANIC" {
                    return Err(format!("backend ended the connection: {} {}", e.code, e.message));
                }
            }
            if message::is_async_backend_message(f.tag) {
                continue;
            }
            o.record(f.tag, f.body());
            if f.tag == message::DATA_ROW && requests[out.len()].1 {
                o.hash_row(f.body());
            }
            if f.tag == message::READY_FOR_QUERY {
                out.push(std::mem::replace(&mut o, Outcome::new()));
            }
        }
        Ok(out)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no complete answer within {timeout:?}")),
    }
}

/// Rebuilds session state on a connection: settings and statements, errors ignored (they
/// failed the same way where the session made them).
pub async fn run_script(conn: &mut BackendConn, frames: &[Bytes], timeout: Duration) -> Result<(), String> {
    let reqs: Vec<(&[u8], bool)> = frames.iter().map(|f| (&f[..], false)).collect();
    let outcomes = run_requests(conn, &reqs, timeout).await?;
    for (o, f) in outcomes.iter().zip(frames) {
        if o.error.is_some() {
            tracing::debug!(outcome = %o, frame = ?f.first().map(|&t| t as char), "restoring session state: a statement failed");
        }
    }
    Ok(())
}

/// The authentication method `b` asks `user` of `database` for (its first Authentication
/// request's code), the connection closed right after; None if it could not be read.
pub async fn first_auth_request(b: &Backend, user: &str, database: &str) -> Option<i32> {
    let fut = async {
        let mut stream = crate::tls::backend::open(&b.host, &b.addr, &b.tls).await.ok()?;
        let mut buf = BytesMut::new();
        let params = [("user".to_string(), user.to_string()), ("database".to_string(), database.to_string())];
        startup_message(&params, &mut buf);
        stream.write_all(&buf).await.ok()?;
        let (mut rbuf, mut codec) = (BytesMut::new(), FrameCodec::new(1 << 16));
        let frame = read_frame(&mut stream, &mut rbuf, &mut codec).await.ok()?;
        (frame.tag == message::AUTHENTICATION).then(|| message::authentication(frame.body()).ok().map(|(code, _)| code))?
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.ok().flatten()
}

/// The one line that says why Chorus did not send a password.
pub fn cleartext_refused(b: &Backend) -> String {
    format!(
        "backend {} asks for the password in cleartext and its sslmode is {}: refused (set sslmode = \"require\" or stronger for it, \
         or allow_cleartext_password = true)",
        b.name,
        b.tls.mode.as_str()
    )
}

/// The SASL mechanism to answer with: SCRAM-SHA-256-PLUS bound to the TLS channel when the
/// server offers it over TLS and its certificate names a hash, SCRAM-SHA-256 otherwise.
fn sasl_choice(offered: &[u8], stream: &Stream) -> Result<(&'static str, ChannelBinding), LoginError> {
    let offers = |m: &[u8]| offered.split(|&b| b == 0).any(|x| x == m);
    let end_point =
        stream.tls().and_then(|t| t.peer_certificates()).and_then(|c| c.first()).and_then(|c| crate::tls::end_point::hash(c));
    match end_point {
        Some(data) if offers(b"SCRAM-SHA-256-PLUS") => Ok(("SCRAM-SHA-256-PLUS", ChannelBinding::tls_server_end_point(data))),
        Some(_) if offers(b"SCRAM-SHA-256") => Ok(("SCRAM-SHA-256", ChannelBinding::unrequested())),
        None if offers(b"SCRAM-SHA-256") => Ok(("SCRAM-SHA-256", ChannelBinding::unsupported())),
        _ => Err(io("backend offers no SASL mechanism Chorus speaks")),
    }
}

/// Reads the login's default isolation (the routing of reads inside transactions depends on
/// it, and no ParameterStatus reports it). Anything but a clear READ COMMITTED or READ
/// UNCOMMITTED counts as strict.
async fn strict_default(stream: &mut Stream, rbuf: &mut BytesMut, codec: &mut FrameCodec) -> Result<bool, LoginError> {
    let mut q = BytesMut::new();
    message::query_msg(&mut q, "SHOW default_transaction_isolation");
    stream.write_all(&q).await.map_err(io)?;
    let mut strict = true;
    loop {
        let f = read_frame(stream, rbuf, codec).await?;
        match f.tag {
            message::DATA_ROW => {
                let value = message::data_row_first(f.body()).unwrap_or_default();
                strict = !matches!(value, b"read committed" | b"read uncommitted");
            }
            message::ERROR_RESPONSE if message::error_fields(f.body()).severity == "FATAL" => {
                return Err(LoginError::Io(format!(
                    "backend ended the connection after login: {}",
                    message::error_fields(f.body()).message
                )));
            }
            message::READY_FOR_QUERY => return Ok(strict),
            _ => {}
        }
    }
}

async fn read_frame(stream: &mut Stream, rbuf: &mut BytesMut, codec: &mut FrameCodec) -> Result<Frame, LoginError> {
    use tokio_util::codec::Decoder;
    loop {
        if let Some(f) = codec.decode(rbuf).map_err(io)? {
            return Ok(f);
        }
        if stream.read_buf(rbuf).await.map_err(io)? == 0 {
            return Err(io("backend closed the connection during login"));
        }
    }
}

/// A protocol 3.0 StartupMessage. Written by hand because the values are passed on as the
/// client sent them.
fn startup_message(params: &[(String, String)], buf: &mut BytesMut) {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_i32(crate::protocol::startup::PROTOCOL_3_0);
    for (k, v) in params {
        buf.put_slice(k.as_bytes());
        buf.put_u8(0);
        buf.put_slice(v.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}
