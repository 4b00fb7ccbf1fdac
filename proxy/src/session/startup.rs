//! A client's first moments: TLS (asked for with SSLRequest, or direct), the startup packet,
//! protocol negotiation, authentication.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

use crate::config::{AuthMethod, TlsMode};
use crate::error::SessionError;
use crate::protocol::message::{self, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL, PASSWORD};
use crate::protocol::scram::{Binding, ScramError, ServerExchange, MECHANISM, MECHANISM_PLUS};
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{Frame, FrameCodec, ProtocolError};
use crate::shared::Shared;
use crate::tls::{ServerTls, Stream, ALPN};

/// What a client asked for once it is authenticated.
pub struct Started {
    pub user: String,
    /// Startup parameters to pass to the backends, `user` and `database` included.
    pub params: Vec<(String, String)>,
}

/// Authentication messages are small; PostgreSQL caps them at 64 KiB too.
const MAX_AUTH_MESSAGE: usize = 65_536;

/// The first byte of a TLS handshake record: a client that negotiates TLS directly
/// (`sslnegotiation=direct`) starts with its ClientHello instead of an SSLRequest.
const TLS_HANDSHAKE: u8 = 0x16;

/// Reads packets until a real startup arrives, answering SSLRequest with 'S' and running the
/// TLS handshake when TLS is on ('N' otherwise, and to GSSENCRequest always). Returns None
/// after handling a CancelRequest (such connections carry nothing else) or a client that left.
pub async fn read_startup(client: &mut Stream, shared: &Shared) -> Result<Option<Vec<(String, String)>>, SessionError> {
    let tls = shared.tls.as_deref();
    if let (Some(tls), Stream::Plain(tcp)) = (tls, &*client) {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE {
            handshake(client, tls, true).await?;
        }
    }
    loop {
        let len = client.read_u32().await?;
        let Ok(len) = startup::check_length(len) else {
            // As PostgreSQL does: a packet that is no startup packet at all (a client that sent
            // Terminate before its startup, a stray probe, a TLS hello where TLS is off) is
            // closed on without a word.
            tracing::debug!(length = len, "invalid length of startup packet");
            return Ok(None);
        };
        let mut body = vec![0u8; len - 4];
        client.read_exact(&mut body).await?;
        match startup::parse(&body)? {
            StartupPacket::Ssl | StartupPacket::GssEnc if client.tls().is_some() => {
                return Err(ProtocolError::Malformed("encryption requested on a connection that is encrypted already").into())
            }
            StartupPacket::Ssl => match tls {
                Some(tls) => {
                    client.write_all(b"S").await?;
                    handshake(client, tls, false).await?;
                }
                None => client.write_all(b"N").await?,
            },
            StartupPacket::GssEnc => client.write_all(b"N").await?,
            StartupPacket::Cancel { pid, secret } => {
                // Served in plaintext too, as PostgreSQL does: it carries only its key.
                shared.cancels.cancel(pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup { minor, params } => {
                if client.tls().is_none() && tls.is_some_and(|t| t.mode() == TlsMode::Require) {
                    return Err(SessionError::TlsRequired);
                }
                let unknown: Vec<String> =
                    params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
                if minor > 0 || !unknown.is_empty() {
                    let mut buf = BytesMut::new();
                    message::negotiate_protocol_version(&mut buf, startup::PROTOCOL_3_0, &unknown);
                    client.write_all(&buf).await?;
                }
                let params = params.into_iter().filter(|(k, _)| !k.starts_with("_pq_.")).collect();
                return Ok(Some(params));
            }
        }
    }
}

/// Runs the TLS handshake over the plain stream. `direct`: the client began with its hello,
/// which must name the `postgresql` ALPN protocol (as PostgreSQL 17 demands), so that a TLS
/// connection meant for another protocol is never taken for PostgreSQL's. A client offering
/// ALPN without `postgresql` is refused by rustls itself (no_application_protocol).
async fn handshake(client: &mut Stream, tls: &ServerTls, direct: bool) -> Result<(), SessionError> {
    let Stream::Plain(tcp) = std::mem::replace(client, Stream::Closed) else {
        return Err(ProtocolError::Malformed("TLS requested twice").into());
    };
    let loaded = tls.current();
    let acceptor = tokio_rustls::TlsAcceptor::from(loaded.config.clone());
    let stream = acceptor.accept(tcp).await.map_err(|e| {
        tracing::debug!(error = %e, "TLS handshake failed");
        SessionError::ClientIo(e)
    })?;
    let alpn = stream.get_ref().1.alpn_protocol() == Some(ALPN);
    *client = Stream::Tls(Box::new(stream.into()), loaded.end_point.clone());
    if direct && !alpn {
        return Err(ProtocolError::Malformed("direct TLS connection without ALPN protocol \"postgresql\"").into());
    }
    Ok(())
}

/// Checks the user and authenticates the client by the configured method.
pub async fn authenticate(client: &mut Stream, shared: &Shared, params: Vec<(String, String)>) -> Result<Started, SessionError> {
    let user = params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.clone()).ok_or(SessionError::NoUser)?;
    if params.iter().any(|(k, v)| k == "replication" && v != "false" && v != "0" && v != "off") {
        return Err(SessionError::Replication);
    }
    // An unknown name with a password method goes through the same exchange and fails the
    // same way (28P01) as a wrong password, as PostgreSQL does: names cannot be probed.
    let cfg_user = shared.cfg.user(&user);
    if cfg_user.is_none() && shared.cfg.auth.method == AuthMethod::Trust {
        return Err(SessionError::NoSuchUser(user));
    }
    let mut rbuf = BytesMut::with_capacity(1024);
    let mut out = BytesMut::new();
    match shared.cfg.auth.method {
        AuthMethod::Trust => {}
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            message::auth_request(&mut out, AUTH_MD5, &salt);
            client.write_all(&out).await?;
            let frame = read_password_message(client, &mut rbuf).await?;
            let got = frame.body().strip_suffix(&[0]).unwrap_or(frame.body());
            // The hash is computed for an unknown name too, so both take the same time.
            let password = cfg_user.map_or(&b""[..], |u| u.password.as_bytes());
            let expected = postgres_protocol::authentication::md5_hash(user.as_bytes(), password, salt);
            if cfg_user.is_none() || !crate::protocol::constant_time_eq(got, expected.as_bytes()) {
                return Err(SessionError::AuthFailed(user));
            }
        }
        AuthMethod::ScramSha256 => {
            let mock;
            let verifier = match shared.verifier(&user) {
                Some(v) => v,
                None => {
                    mock = crate::protocol::scram::Verifier::mock(&user);
                    &mock
                }
            };
            // Over TLS, the channel-bound mechanism first, as PostgreSQL lists them.
            let end_point = client.end_point().map(<[u8]>::to_vec);
            let mut mechanisms = Vec::new();
            if end_point.is_some() {
                mechanisms.extend_from_slice(MECHANISM_PLUS.as_bytes());
                mechanisms.push(0);
            }
            mechanisms.extend_from_slice(MECHANISM.as_bytes());
            mechanisms.extend_from_slice(&[0, 0]);
            message::auth_request(&mut out, AUTH_SASL, &mechanisms);
            client.write_all(&out).await?;
            let frame = read_password_message(client, &mut rbuf).await?;
            let (mechanism, first) = message::sasl_initial_response(frame.body())?;
            let binding = match (&end_point, mechanism) {
                (_, m) if m == MECHANISM.as_bytes() => Binding::None { plus_offered: end_point.is_some() },
                (Some(data), m) if m == MECHANISM_PLUS.as_bytes() => Binding::EndPoint(data),
                _ => return Err(ProtocolError::Malformed("client chose a SASL mechanism that was not offered").into()),
            };
            let failed = |e: ScramError| match e {
                // As PostgreSQL: a binding that does not match is a protocol violation.
                ScramError::ChannelBinding => SessionError::from(ProtocolError::Malformed("SCRAM channel binding check failed")),
                _ => SessionError::AuthFailed(user.clone()),
            };
            let (exchange, server_first) = ServerExchange::start(verifier, first, binding).map_err(failed)?;
            out.clear();
            message::auth_request(&mut out, AUTH_SASL_CONTINUE, server_first.as_bytes());
            client.write_all(&out).await?;
            let frame = read_password_message(client, &mut rbuf).await?;
            let server_final = exchange.finish(frame.body()).map_err(failed)?;
            out.clear();
            message::auth_request(&mut out, AUTH_SASL_FINAL, server_final.as_bytes());
            client.write_all(&out).await?;
        }
    }
    Ok(Started { user, params })
}

async fn read_password_message(client: &mut Stream, rbuf: &mut BytesMut) -> Result<Frame, SessionError> {
    let mut codec = FrameCodec::new(MAX_AUTH_MESSAGE);
    loop {
        if let Some(frame) = codec.decode(rbuf)? {
            if frame.tag != PASSWORD {
                return Err(ProtocolError::UnexpectedTag(frame.tag as char).into());
            }
            return Ok(frame);
        }
        if client.read_buf(rbuf).await? == 0 {
            return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}
