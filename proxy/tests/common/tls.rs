//! Certificates for the TLS tests: a throwaway CA made with rcgen, and server or client
//! certificates it signs for localhost and 127.0.0.1.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// A certificate authority and a server certificate it signed, as PEM files in `dir`.
pub struct Ca {
    pub cert: rcgen::Certificate,
    key: KeyPair,
    pub file: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, format!("Chorus test CA {name}"));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        let file = dir.join(format!("{name}.crt"));
        std::fs::write(&file, cert.pem()).unwrap();
        Ca { cert, key, file }
    }

    /// A certificate for localhost and 127.0.0.1 written to `cert` and `key`.
    pub fn issue(&self, cert: &Path, key: &Path) {
        let k = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        let c = p.signed_by(&k, &self.cert, &self.key).unwrap();
        std::fs::write(cert, c.pem()).unwrap();
        std::fs::write(key, k.serialize_pem()).unwrap();
    }
}
