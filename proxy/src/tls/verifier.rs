//! Certificate checks for Chorus's client side where webpki's full check is not the one
//! wanted: its own listener (`chorus verify` takes its write pause through Chorus), trusted by
//! exactly the certificate in `cert_file`; a backend under `sslmode` `prefer` or `require`,
//! whose certificate is not checked (as libpq does); and `verify-ca`, which checks the chain
//! but not the name. The signature over the handshake is always checked.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, SignatureScheme};

#[derive(Debug)]
pub enum Check {
    /// Exactly this certificate.
    Pinned(CertificateDer<'static>),
    /// Any certificate (`prefer`, `require`).
    Any,
    /// The chain up to these roots, whatever name the certificate carries (`verify-ca`).
    Chain(Arc<rustls::client::WebPkiServerVerifier>),
    /// None: the settings could not be loaded (the reason).
    Refuse(String),
}

#[derive(Debug)]
pub struct Verifier {
    check: Check,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    pub fn new(check: Check, provider: Arc<CryptoProvider>) -> Verifier {
        Verifier { check, provider }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match &self.check {
            Check::Pinned(cert) if end_entity.as_ref() == cert.as_ref() => Ok(ServerCertVerified::assertion()),
            Check::Pinned(_) => Err(Error::General("the listener's certificate is not the one in [tls] cert_file".into())),
            Check::Any => Ok(ServerCertVerified::assertion()),
            Check::Refuse(why) => Err(Error::General(why.clone())),
            Check::Chain(webpki) => match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                Err(Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
