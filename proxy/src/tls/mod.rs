//! TLS between clients and Chorus: the server certificate and key (read again on SIGHUP), the
//! CA that client certificates are checked against, and the mode (`disable`, `allow`,
//! `require`).
//!
//! Why its own module: the listener, the startup negotiation and SCRAM's channel binding all
//! need the same loaded certificate, and a reload must swap it for every new session at once
//! without touching the sessions already running (each keeps the configuration it shook
//! hands with). rustls with the ring provider does the cryptography; nothing here is
//! hand-made but the reading of a certificate's signature algorithm for channel binding.

pub mod backend;
pub(crate) mod end_point;
pub mod https;
pub mod stream;
mod verifier;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{TlsConfig, TlsMode};

pub use stream::Stream;

/// The ALPN protocol name of PostgreSQL (17 and later), required by direct TLS negotiation.
pub const ALPN: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("sslmode {0} needs sslrootcert")]
    NoRootCert(&'static str),
    #[error("CA file {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// One loading of the files.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    /// The `tls-server-end-point` channel binding data (RFC 5929): a hash of the leaf
    /// certificate. None when its signature algorithm names no hash (Ed25519, say), as
    /// PostgreSQL then offers no SCRAM-SHA-256-PLUS either.
    pub end_point: Option<Arc<[u8]>>,
}

/// The client-facing TLS state, shared by every session.
pub struct ServerTls {
    mode: TlsMode,
    files: Files,
    alpn: &'static [u8],
    current: RwLock<Arc<Loaded>>,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

impl ServerTls {
    /// None when the mode is `disable`.
    pub fn from_config(cfg: &TlsConfig) -> Result<Option<ServerTls>, TlsError> {
        let mode = cfg.mode();
        let (Some(cert), Some(key)) = (cfg.cert_file.clone(), cfg.key_file.clone()) else { return Ok(None) };
        if mode == TlsMode::Disable {
            return Ok(None);
        }
        let files = Files { cert, key, ca: cfg.ca_file.clone() };
        let loaded = load(&files, ALPN)?;
        Ok(Some(ServerTls { mode, files, alpn: ALPN, current: RwLock::new(Arc::new(loaded)) }))
    }

    /// The admin API's HTTPS (None: `admin_https` is off): its own certificate, or the
    /// listener's.
    pub fn admin(cfg: &TlsConfig) -> Result<Option<ServerTls>, TlsError> {
        if !cfg.admin_https {
            return Ok(None);
        }
        let pair = cfg.admin_cert_file.clone().zip(cfg.admin_key_file.clone());
        let Some((cert, key)) = pair.or_else(|| cfg.cert_file.clone().zip(cfg.key_file.clone())) else { return Ok(None) };
        let files = Files { cert, key, ca: None };
        let loaded = load(&files, b"http/1.1")?;
        Ok(Some(ServerTls { mode: TlsMode::Require, files, alpn: b"http/1.1", current: RwLock::new(Arc::new(loaded)) }))
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the files again; on any error the loaded ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = Arc::new(load(&self.files, self.alpn)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(())
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read { what, path: path.into(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(read)?.collect::<Result<Vec<_>, _>>().map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.into()));
    }
    Ok(certs)
}

fn load(files: &Files, alpn: &[u8]) -> Result<Loaded, TlsError> {
    let chain = certs("certificate file", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
        what: "key file",
        path: files.key.clone(),
        source,
    })?;
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in certs("client CA file", path)? {
                roots.add(c).map_err(|e| TlsError::ClientCa { path: path.clone(), message: e.to_string() })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa { path: path.clone(), message: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let end_point = end_point::hash(&chain[0]).map(Arc::from);
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Loaded { config: Arc::new(config), end_point })
}

/// A tokio-postgres connector for Chorus's own connections to its own listener, trusting
/// exactly the configured certificate (None: TLS is off there, connect in plaintext).
pub fn own_listener(cfg: &TlsConfig) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, TlsError> {
    let Some(cert) = cfg.cert_file.as_deref().filter(|_| cfg.mode() != TlsMode::Disable) else { return Ok(None) };
    let leaf = certs("certificate file", cert)?.swap_remove(0);
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier::Verifier::new(verifier::Check::Pinned(leaf), provider())))
        .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// Reloads the certificates on every SIGHUP until Chorus stops: the listener's (`tls`, when
/// on) and the backends' CA files. A file that cannot be read leaves what was loaded from it
/// in use and logs one line.
pub fn spawn_reload_on_sighup(tls: Vec<(&'static str, Arc<ServerTls>)>, stop: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: TLS certificates are not reloaded");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            for (what, tls) in &tls {
                match tls.reload() {
                    Ok(()) => tracing::info!(listener = what, "SIGHUP: TLS certificate and key reloaded"),
                    Err(e) => {
                        tracing::error!(listener = what, error = %e, "SIGHUP: TLS files not reloaded; the loaded certificate stays in use")
                    }
                }
            }
            if let Err(e) = backend::reload() {
                tracing::error!(error = %e, "SIGHUP: a backend's sslrootcert not reloaded; the loaded one stays in use");
            }
        }
    });
}
