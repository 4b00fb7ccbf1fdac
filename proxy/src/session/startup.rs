//! A client's first moments: the startup packet, protocol negotiation, authentication.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

use crate::config::AuthMethod;
use crate::error::SessionError;
use crate::protocol::message::{self, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL, PASSWORD};
use crate::protocol::scram::{ServerExchange, MECHANISM};
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{Frame, FrameCodec, ProtocolError};
use crate::shared::Shared;

/// What a client asked for once it is authenticated.
pub struct Started {
    pub user: String,
    /// Startup parameters to pass to the backends, `user` and `database` included.
    pub params: Vec<(String, String)>,
}

/// Authentication messages are small; PostgreSQL caps them at 64 KiB too.
const MAX_AUTH_MESSAGE: usize = 65_536;

/// Reads packets until a real startup arrives, answering SSL/GSS requests with 'N'.
/// Returns None after handling a CancelRequest (such connections carry nothing else).
pub async fn read_startup(client: &mut TcpStream, shared: &Shared) -> Result<Option<Vec<(String, String)>>, SessionError> {
    loop {
        let len = client.read_u32().await?;
        let Ok(len) = startup::check_length(len) else {
            // As PostgreSQL does: a packet that is no startup packet at all (a client that sent
            // Terminate before its startup, a stray probe) is closed on without a word.
            tracing::debug!(length = len, "invalid length of startup packet");
            return Ok(None);
        };
        let mut body = vec![0u8; len - 4];
        client.read_exact(&mut body).await?;
        match startup::parse(&body)? {
            StartupPacket::Ssl | StartupPacket::GssEnc => client.write_all(b"N").await?,
            StartupPacket::Cancel { pid, secret } => {
                shared.cancels.cancel(pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup { minor, params } => {
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

/// Checks the user and authenticates the client by the configured method.
pub async fn authenticate(
    client: &mut TcpStream,
    shared: &Shared,
    params: Vec<(String, String)>,
) -> Result<Started, SessionError> {
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
            let mut mechanisms = MECHANISM.as_bytes().to_vec();
            mechanisms.extend_from_slice(&[0, 0]);
            message::auth_request(&mut out, AUTH_SASL, &mechanisms);
            client.write_all(&out).await?;
            let frame = read_password_message(client, &mut rbuf).await?;
            let (mechanism, first) = message::sasl_initial_response(frame.body())?;
            if mechanism != MECHANISM.as_bytes() {
                return Err(ProtocolError::Malformed("client chose a SASL mechanism that was not offered").into());
            }
            let (exchange, server_first) =
                ServerExchange::start(verifier, first).map_err(|_| SessionError::AuthFailed(user.clone()))?;
            out.clear();
            message::auth_request(&mut out, AUTH_SASL_CONTINUE, server_first.as_bytes());
            client.write_all(&out).await?;
            let frame = read_password_message(client, &mut rbuf).await?;
            let server_final = exchange.finish(frame.body()).map_err(|_| SessionError::AuthFailed(user.clone()))?;
            out.clear();
            message::auth_request(&mut out, AUTH_SASL_FINAL, server_final.as_bytes());
            client.write_all(&out).await?;
        }
    }
    Ok(Started { user, params })
}

async fn read_password_message(client: &mut TcpStream, rbuf: &mut BytesMut) -> Result<Frame, SessionError> {
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
