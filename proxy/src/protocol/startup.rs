//! The untagged packets a client may open a connection with.

use super::codec::{take_cstr, ProtocolError};

/// PostgreSQL's own cap on a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_LEN: u32 = 10_000;
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// A protocol 3.x startup: its minor version and parameters in order.
    Startup {
        minor: i32,
        params: Vec<(String, String)>,
    },
}

/// Validates the announced length of a startup packet (length word included).
pub fn check_length(len: u32) -> Result<usize, ProtocolError> {
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ProtocolError::BadStartupLength(len));
    }
    Ok(len as usize)
}

/// Parses a startup packet body (everything after the length word).
pub fn parse(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    if body.len() < 4 {
        return Err(ProtocolError::Malformed("startup packet too short"));
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST_CODE => {
            if rest.len() != 8 {
                return Err(ProtocolError::Malformed("bad CancelRequest length"));
            }
            let pid = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let secret = i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
            Ok(StartupPacket::Cancel { pid, secret })
        }
        c if c >> 16 == 3 => {
            let mut params = Vec::new();
            let mut b = rest;
            loop {
                let name = take_cstr(&mut b)?;
                if name.is_empty() {
                    break;
                }
                let value = take_cstr(&mut b)?;
                let name =
                    String::from_utf8(name.to_vec()).map_err(|_| ProtocolError::Malformed("parameter name is not UTF-8"))?;
                // Values keep their bytes: a LATIN1 application_name must reach the servers as sent.
                let value = String::from_utf8_lossy(value).into_owned();
                params.push((name, value));
            }
            Ok(StartupPacket::Startup { minor: c & 0xffff, params })
        }
        _ => Err(ProtocolError::Malformed("unsupported frontend protocol")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn parses_startup_parameters() {
        let p = parse(&packet(PROTOCOL_3_0, b"user\0app\0database\0db\0\0")).unwrap();
        assert_eq!(
            p,
            StartupPacket::Startup { minor: 0, params: vec![("user".into(), "app".into()), ("database".into(), "db".into())] }
        );
    }

    #[test]
    fn reports_minor_version() {
        let p = parse(&packet(PROTOCOL_3_0 + 2, b"user\0a\0\0")).unwrap();
        assert!(matches!(p, StartupPacket::Startup { minor: 2, .. }));
    }

    #[test]
    fn special_requests() {
        assert_eq!(parse(&packet(SSL_REQUEST_CODE, b"")).unwrap(), StartupPacket::Ssl);
        assert_eq!(parse(&packet(GSSENC_REQUEST_CODE, b"")).unwrap(), StartupPacket::GssEnc);
        let mut rest = 5i32.to_be_bytes().to_vec();
        rest.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(parse(&packet(CANCEL_REQUEST_CODE, &rest)).unwrap(), StartupPacket::Cancel { pid: 5, secret: 9 });
    }

    #[test]
    fn rejects_bad_packets() {
        assert!(parse(&packet(PROTOCOL_3_0, b"user\0app")).is_err());
        assert!(parse(&packet(2 << 16, b"\0")).is_err());
        assert!(parse(b"\0\0").is_err());
        assert!(check_length(7).is_err());
        assert!(check_length(10_001).is_err());
        assert_eq!(check_length(8).unwrap(), 8);
    }
}
