//! `tls-server-end-point` channel binding data (RFC 5929, section 4.1): the hash of the
//! server's certificate, with the hash of the certificate's own signature algorithm (SHA-256
//! where that is MD5 or SHA-1). Only the signature algorithm's identifier is read from the
//! certificate: the outer SEQUENCE, past the tbsCertificate, to the AlgorithmIdentifier's OID.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// The OIDs (DER content bytes) this knows, with the hash each one selects.
const ALGORITHMS: &[(&[u8], Hash)] = &[
    (&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x04], Hash::Sha256), // md5WithRSAEncryption
    (&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x05], Hash::Sha256), // sha1WithRSAEncryption
    (&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B], Hash::Sha256), // sha256WithRSAEncryption
    (&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0C], Hash::Sha384), // sha384WithRSAEncryption
    (&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0D], Hash::Sha512), // sha512WithRSAEncryption
    (&[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x01], Hash::Sha256),             // ecdsa-with-SHA1
    (&[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02], Hash::Sha256),       // ecdsa-with-SHA256
    (&[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03], Hash::Sha384),       // ecdsa-with-SHA384
    (&[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x04], Hash::Sha512),       // ecdsa-with-SHA512
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// The channel binding data of a DER certificate; None for an algorithm without a hash of its
/// own (Ed25519, RSASSA-PSS) or a certificate that cannot be read.
pub fn hash(der: &[u8]) -> Option<Vec<u8>> {
    Some(match signature_hash(der)? {
        Hash::Sha256 => Sha256::digest(der).to_vec(),
        Hash::Sha384 => Sha384::digest(der).to_vec(),
        Hash::Sha512 => Sha512::digest(der).to_vec(),
    })
}

fn signature_hash(der: &[u8]) -> Option<Hash> {
    let (tag, cert, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = tlv(cert)?; // tbsCertificate
    let (tag, algorithm, _) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = tlv(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    ALGORITHMS.iter().find(|(o, _)| *o == oid).map(|(_, h)| *h)
}

/// One DER tag-length-value: (tag, value, what follows).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_follows_the_certificates_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(signature_hash(cert.der()), Some(Hash::Sha256));
        assert_eq!(hash(cert.der()).unwrap(), Sha256::digest(cert.der()).to_vec());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(hash(cert.der()).unwrap().len(), 48);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(hash(cert.der()), None, "Ed25519 names no hash: no channel binding");
        for cut in [0, 1, 5, 40] {
            assert_eq!(hash(&cert.der()[..cut]), None);
        }
    }
}
