//! TLS toward backends: the rustls client configuration for a backend's `sslmode` and
//! `sslrootcert` (built once per setting and kept until SIGHUP), the SSLRequest exchange for
//! the sessions' own connections, and the connector for Chorus's tokio-postgres ones.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::verifier::{Check, Verifier};
use super::{certs, provider, Stream, TlsError};
use crate::config::{BackendTls, SslMode};

/// The SSLRequest code (1234.5679).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F];

static CONFIGS: Mutex<Option<HashMap<BackendTls, Arc<ClientConfig>>>> = Mutex::new(None);

/// The client configuration for `t` (None: `disable`). Built once: a CA file changed on disk
/// is read again on SIGHUP (`reload`).
pub fn client_config(t: &BackendTls) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if t.mode == SslMode::Disable {
        return Ok(None);
    }
    if let Some(c) = CONFIGS.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new).get(t) {
        return Ok(Some(c.clone()));
    }
    let config = Arc::new(build(t)?);
    CONFIGS.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new).insert(t.clone(), config.clone());
    Ok(Some(config))
}

/// Reads every CA file in use again. One that cannot be read keeps the configuration built
/// from it before, and the error is returned (the others are reloaded).
pub fn reload() -> Result<(), TlsError> {
    let settings: Vec<BackendTls> =
        CONFIGS.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let mut first_error = None;
    for t in settings {
        match build(&t) {
            Ok(c) => {
                CONFIGS.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new).insert(t, Arc::new(c));
            }
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// A configuration whose every handshake fails with `why`: where the settings cannot be
/// loaded, a connection fails rather than goes without the check it was meant to have.
fn refusing(why: String) -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier::new(Check::Refuse(why), provider())))
        .with_no_client_auth()
}

fn roots(path: Option<&Path>, mode: SslMode) -> Result<Arc<RootCertStore>, TlsError> {
    let path = path.ok_or_else(|| TlsError::NoRootCert(mode.as_str()))?;
    let mut roots = RootCertStore::empty();
    for c in certs("sslrootcert", path)? {
        roots.add(c).map_err(|e| TlsError::ClientCa { path: path.into(), message: e.to_string() })?;
    }
    Ok(Arc::new(roots))
}

fn build(t: &BackendTls) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match t.mode {
        SslMode::VerifyFull => builder.with_root_certificates(roots(t.rootcert.as_deref(), t.mode)?).with_no_client_auth(),
        SslMode::VerifyCa => {
            let webpki =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots(t.rootcert.as_deref(), t.mode)?, provider())
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier::new(Check::Chain(webpki), provider())))
                .with_no_client_auth()
        }
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier::new(Check::Any, provider())))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// A new connection to the backend at `host`:`port` (`addr`, as `config::backend_addr` gives
/// it): its Unix-domain socket when `host` is a directory, else TCP (no Nagle delay) with TLS
/// as `t` says.
pub async fn open(host: &str, addr: &str, t: &BackendTls) -> Result<Stream, String> {
    if crate::config::is_socket_dir(host) {
        let unix = tokio::net::UnixStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
        return Ok(Stream::Unix(unix));
    }
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    negotiate(tcp, host, t).await
}

/// Asks the backend for TLS as `t` says and runs the handshake: the stream the login goes on
/// over. `host` is the name a `verify-full` certificate must carry.
pub async fn negotiate(mut tcp: TcpStream, host: &str, t: &BackendTls) -> Result<Stream, String> {
    let Some(config) = client_config(t).map_err(|e| e.to_string())? else { return Ok(Stream::Plain(tcp)) };
    tcp.write_all(&SSL_REQUEST).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    match answer[0] {
        b'S' => {}
        b'N' if t.mode == SslMode::Prefer => return Ok(Stream::Plain(tcp)),
        b'N' => return Err(format!("the server does not accept TLS connections (sslmode {})", t.mode.as_str())),
        other => return Err(format!("unexpected answer {:?} to SSLRequest", other as char)),
    }
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host} as a TLS server name: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake (sslmode {}): {e}", t.mode.as_str()))?;
    Ok(Stream::Tls(Box::new(tls.into()), None))
}

/// The connector for Chorus's tokio-postgres connections to a backend, with the sslmode to
/// give tokio-postgres.
pub fn connector(t: &BackendTls) -> (tokio_postgres_rustls::MakeRustlsConnect, tokio_postgres::config::SslMode) {
    use tokio_postgres::config::SslMode as Pg;
    let (config, mode) = match client_config(t) {
        Ok(None) => (refusing("sslmode disable".into()), Pg::Disable),
        Ok(Some(c)) => ((*c).clone(), if t.mode == SslMode::Prefer { Pg::Prefer } else { Pg::Require }),
        Err(e) => {
            tracing::error!(error = %e, "backend TLS settings cannot be loaded");
            (refusing(e.to_string()), Pg::Require)
        }
    };
    (tokio_postgres_rustls::MakeRustlsConnect::new(config), mode)
}

/// The environment libpq's tools (pg_dump, pg_restore, psql) read the same settings from.
pub fn tool_env(t: &BackendTls) -> Vec<(&'static str, String)> {
    let mut env = vec![("PGSSLMODE", t.mode.as_str().to_string())];
    if let Some(root) = &t.rootcert {
        env.push(("PGSSLROOTCERT", root.display().to_string()));
    }
    env
}
