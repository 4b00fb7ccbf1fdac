//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it.
//!
//! Client libraries carry the client side; no maintained crate offers the server side apart
//! from a framework's socket-bound handler, so this is a small sans-IO state machine. The
//! verifier (salt, StoredKey, ServerKey) comes from `postgres_protocol::password`, the same
//! code that makes PostgreSQL-compatible SCRAM secrets. Over TLS, SCRAM-SHA-256-PLUS binds the
//! exchange to the TLS channel with `tls-server-end-point` (RFC 5929), as PostgreSQL does.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The channel binding an exchange runs under.
#[derive(Clone, Copy, Debug)]
pub enum Binding<'a> {
    /// SCRAM-SHA-256. `plus_offered`: SCRAM-SHA-256-PLUS was offered too, so a client that
    /// says it could bind but thinks the server cannot ("y") was downgraded by someone.
    None { plus_offered: bool },
    /// SCRAM-SHA-256-PLUS with this `tls-server-end-point` data.
    EndPoint(&'a [u8]),
}

/// A user's SCRAM secret, derived once from the configured password.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt_b64: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(..)")
    }
}

impl Verifier {
    pub fn from_password(password: &str) -> Verifier {
        // "SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>"
        let secret = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&secret).expect("postgres_protocol makes well-formed SCRAM secrets")
    }

    /// A verifier for a user Chorus does not know: a salt that stays the same for that name
    /// while Chorus runs (a salt that changed at every try would tell the name is unknown) and
    /// keys no password matches. The exchange runs to its end and fails like a wrong password.
    pub fn mock(user: &str) -> Verifier {
        static NONCE: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let nonce = NONCE.get_or_init(rand::random);
        let derive = |what: &[u8]| -> [u8; 32] {
            Sha256::new().chain_update(nonce).chain_update(what).chain_update(user).finalize().into()
        };
        let salt = derive(b"salt");
        Verifier {
            iterations: 4096,
            salt_b64: B64.encode(&salt[..16]),
            stored_key: derive(b"stored"),
            server_key: derive(b"server"),
        }
    }

    pub fn parse(secret: &str) -> Option<Verifier> {
        let rest = secret.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        stored_key.copy_from_slice(&B64.decode(stored).ok().filter(|k| k.len() == 32)?);
        server_key.copy_from_slice(&B64.decode(server).ok().filter(|k| k.len() == 32)?);
        Some(Verifier { iterations: iter.parse().ok()?, salt_b64: salt.to_string(), stored_key, server_key })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
}

/// The exchange after the client-first message.
pub struct ServerExchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client-final-message's `c=` must be: the gs2 header and the binding data.
    channel: String,
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

impl ServerExchange {
    /// Takes the client-first-message; returns the exchange and the server-first-message.
    pub fn start(verifier: &Verifier, client_first: &[u8], binding: Binding) -> Result<(ServerExchange, String), ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // The gs2 header: "n,," (the client cannot bind), "y,," (it could, but thinks the
        // server cannot), "p=tls-server-end-point,," (it binds). No authorization identity.
        const PLUS: &str = "p=tls-server-end-point,,";
        let (header, bare) = if let Some(b) = text.strip_prefix("n,,") {
            ("n,,", b)
        } else if let Some(b) = text.strip_prefix("y,,") {
            ("y,,", b)
        } else if let Some(b) = text.strip_prefix(PLUS) {
            (PLUS, b)
        } else if text.starts_with("p=") {
            return Err(ScramError::ChannelBinding);
        } else {
            return Err(ScramError::Malformed("bad gs2 header"));
        };
        let channel = match (binding, header) {
            (Binding::EndPoint(data), PLUS) => {
                let mut c = PLUS.as_bytes().to_vec();
                c.extend_from_slice(data);
                B64.encode(c)
            }
            (Binding::EndPoint(_), _) => return Err(ScramError::ChannelBinding),
            (Binding::None { .. }, PLUS) => return Err(ScramError::ChannelBinding),
            (Binding::None { plus_offered: true }, "y,,") => return Err(ScramError::ChannelBinding),
            (Binding::None { .. }, h) => B64.encode(h),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("missing client nonce"))?;
        let mut raw = [0u8; 18];
        rand::fill(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!("r={nonce},s={},i={}", verifier.salt_b64, verifier.iterations);
        let ex = ServerExchange {
            verifier: verifier.clone(),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            channel,
        };
        Ok((ex, server_first))
    }

    /// Takes the client-final-message; on a valid proof returns the server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if channel.is_none_or(|c| !super::constant_time_eq(c.as_bytes(), self.channel.as_bytes())) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::BadProof);
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadProof);
        }
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !super::constant_time_eq(&computed, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    const NONE: Binding = Binding::None { plus_offered: false };

    fn run(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        run_bound(server_password, client_password, ChannelBinding::unsupported(), NONE)
    }

    fn run_bound(server: &str, client: &str, cb: ChannelBinding, binding: Binding) -> Result<(), ScramError> {
        let verifier = Verifier::from_password(server);
        let mut client = ScramSha256::new(client.as_bytes(), cb);
        let (ex, server_first) = ServerExchange::start(&verifier, client.message(), binding)?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = ex.finish(client.message())?;
        client.finish(server_final.as_bytes()).expect("client accepts server signature");
        Ok(())
    }

    #[test]
    fn accepts_the_right_password() {
        run("secret", "secret").unwrap();
        run("pässwörd", "pässwörd").unwrap();
    }

    #[test]
    fn binds_to_the_tls_channel() {
        let data = [7u8; 32];
        let plus = Binding::EndPoint(&data);
        run_bound("s", "s", ChannelBinding::tls_server_end_point(data.to_vec()), plus).unwrap();
        assert_eq!(
            run_bound("s", "s", ChannelBinding::tls_server_end_point(vec![8u8; 32]), plus),
            Err(ScramError::ChannelBinding),
            "another certificate's hash: a man in the middle"
        );
        assert_eq!(run_bound("s", "x", ChannelBinding::tls_server_end_point(data.to_vec()), plus), Err(ScramError::BadProof));
        // Plain SCRAM-SHA-256 beside PLUS: "n" is fine; "y" means someone hid PLUS from the client.
        run_bound("s", "s", ChannelBinding::unsupported(), Binding::None { plus_offered: true }).unwrap();
        assert_eq!(
            run_bound("s", "s", ChannelBinding::unrequested(), Binding::None { plus_offered: true }),
            Err(ScramError::ChannelBinding)
        );
        run_bound("s", "s", ChannelBinding::unrequested(), NONE).unwrap();
        assert_eq!(
            run_bound("s", "s", ChannelBinding::tls_server_end_point(data.to_vec()), NONE),
            Err(ScramError::ChannelBinding),
            "PLUS's header under the plain mechanism"
        );
        assert_eq!(run_bound("s", "s", ChannelBinding::unsupported(), plus), Err(ScramError::ChannelBinding));
    }

    #[test]
    fn refuses_a_wrong_password() {
        assert_eq!(run("secret", "Secret"), Err(ScramError::BadProof));
    }

    #[test]
    fn refuses_malformed_messages() {
        let v = Verifier::from_password("x");
        assert!(ServerExchange::start(&v, b"garbage", NONE).is_err());
        assert_eq!(ServerExchange::start(&v, b"p=tls-server-end-point,,n=,r=abc", NONE).err(), Some(ScramError::ChannelBinding));
        assert_eq!(ServerExchange::start(&v, b"p=tls-unique,,n=,r=abc", NONE).err(), Some(ScramError::ChannelBinding));
        assert!(ServerExchange::start(&v, b"n,,n=,r=", NONE).is_err());
        let (ex, _) = ServerExchange::start(&v, b"n,,n=,r=abc", NONE).unwrap();
        assert!(ex.finish(b"c=biws,r=wrong").is_err());
        let (ex, first) = ServerExchange::start(&v, b"n,,n=,r=abc", NONE).unwrap();
        let nonce = first.split(',').next().unwrap();
        assert_eq!(ex.finish(format!("c=biws,{nonce},p=AAAA").as_bytes()), Err(ScramError::BadProof));
    }
}
