//! The PostgreSQL v3 wire protocol, sans-IO.
//!
//! Everything here works on byte buffers and never touches a socket, so it can be unit tested
//! and fuzzed on its own: `codec` cuts frames, `message` reads the few fields routing needs and
//! builds the few messages Chorus itself sends, `startup` reads the startup packet, `scram` is
//! the server side of SCRAM-SHA-256 for client logins.

pub mod codec;
pub mod message;
pub mod scram;
pub mod startup;

pub use codec::{Frame, FrameCodec, ProtocolError};

/// Equal bytes, compared without an early exit: how long it takes says nothing of where two
/// secrets (a password hash, a SCRAM key, the admin token) first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"secret ", b"secret"), "a trailing space makes another secret");
    }
}
