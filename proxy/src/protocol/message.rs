//! The handful of messages Chorus reads a field of, and the handful it writes itself.
//!
//! Routing needs only: the SQL of Query and Parse, the statement and portal names of Bind,
//! Describe, Close and Execute; from backends the command tag, the SQLSTATE of an error, the
//! transaction status of ReadyForQuery. Everything else passes through unread.

use bytes::{BufMut, BytesMut};

use super::codec::{take_cstr, take_i16, take_i32, ProtocolError, HEADER_LEN};

// Frontend tags.
pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const FLUSH: u8 = b'H';
pub const SYNC: u8 = b'S';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const TERMINATE: u8 = b'X';
pub const PASSWORD: u8 = b'p';
/// A whole Sync message.
pub const SYNC_MSG: &[u8] = b"S\0\0\0\x04";

// Backend tags.
pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const ERROR_RESPONSE: u8 = b'E';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const DATA_ROW: u8 = b'D';
pub const PARAMETER_DESCRIPTION: u8 = b't';

/// Messages a backend may send at any moment, outside the reply to a request.
#[inline]
pub fn is_async_backend_message(tag: u8) -> bool {
    matches!(tag, NOTICE_RESPONSE | NOTIFICATION_RESPONSE | PARAMETER_STATUS)
}

/// The SQL text of a Query message.
pub fn query_sql(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut b = body;
    take_cstr(&mut b)
}

/// Statement name and SQL of a Parse message.
pub fn parse_fields(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let mut b = body;
    let name = take_cstr(&mut b)?;
    let sql = take_cstr(&mut b)?;
    Ok((name, sql))
}

/// Portal and statement names of a Bind message.
pub fn bind_names(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let mut b = body;
    let portal = take_cstr(&mut b)?;
    let stmt = take_cstr(&mut b)?;
    Ok((portal, stmt))
}

/// Kind ('S' statement or 'P' portal) and name of a Describe or Close message.
pub fn target_name(body: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    let (&kind, mut b) = body.split_first().ok_or(ProtocolError::Malformed("empty Describe/Close"))?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed("Describe/Close target must be 'S' or 'P'"));
    }
    Ok((kind, take_cstr(&mut b)?))
}

/// Portal name of an Execute message.
pub fn execute_portal(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut b = body;
    let portal = take_cstr(&mut b)?;
    take_i32(&mut b)?;
    Ok(portal)
}

/// The command tag of a CommandComplete message.
pub fn command_tag(body: &[u8]) -> &[u8] {
    let mut b = body;
    take_cstr(&mut b).unwrap_or(body)
}

/// Fields of an ErrorResponse or NoticeResponse that Chorus uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// The fields of an ErrorResponse or NoticeResponse body: (field type, value), in order, up
/// to the terminator or the first malformed field.
pub fn error_field_iter(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut b = body;
    std::iter::from_fn(move || {
        let (&field, rest) = b.split_first()?;
        if field == 0 {
            return None;
        }
        b = rest;
        take_cstr(&mut b).ok().map(|value| (field, value))
    })
}

pub fn error_fields(body: &[u8]) -> ErrorFields {
    let mut out = ErrorFields::default();
    for (field, value) in error_field_iter(body) {
        let value = String::from_utf8_lossy(value).into_owned();
        match field {
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            _ => {}
        }
    }
    out
}

/// The SQLSTATE of an ErrorResponse, without allocating.
pub fn error_code(body: &[u8]) -> [u8; 5] {
    error_field_iter(body)
        .find(|(field, value)| *field == b'C' && value.len() == 5)
        .and_then(|(_, value)| value.try_into().ok())
        .unwrap_or(*b"XX000")
}

/// The first FATAL or PANIC ErrorResponse among the whole frames of `buf` (a backend's
/// unread bytes), as (offset, length): a connection can close before its last frames were
/// read, and the FATAL it sent says why.
pub fn find_fatal(buf: &[u8]) -> Option<(usize, usize)> {
    let mut at = 0;
    while buf.len() >= at + 5 {
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize + 1;
        if len < 5 || buf.len() < at + len {
            return None;
        }
        if buf[at] == ERROR_RESPONSE {
            let body = &buf[at + 5..at + len];
            let field = |tag| error_field_iter(body).find(|(f, _)| *f == tag).map(|(_, v)| v);
            if matches!(field(b'V').or_else(|| field(b'S')), Some(b"FATAL" | b"PANIC")) {
                return Some((at, len));
            }
        }
        at += len;
    }
    None
}

/// The transaction status of a ReadyForQuery body: b'I', b'T' or b'E' (a body cut short
/// reads as idle, as the outcome comparison then sees every backend alike).
pub fn ready_status(body: &[u8]) -> u8 {
    body.first().copied().unwrap_or(b'I')
}

/// Name and value of a ParameterStatus message.
pub fn parameter_status(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let mut b = body;
    Ok((take_cstr(&mut b)?, take_cstr(&mut b)?))
}

/// Process id and secret of a BackendKeyData message.
pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32), ProtocolError> {
    let mut b = body;
    Ok((take_i32(&mut b)?, take_i32(&mut b)?))
}

/// The authentication request code and its data.
pub fn authentication(body: &[u8]) -> Result<(i32, &[u8]), ProtocolError> {
    let mut b = body;
    let code = take_i32(&mut b)?;
    Ok((code, b))
}

/// Mechanism name and client-first-message of a SASLInitialResponse.
pub fn sasl_initial_response(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let mut b = body;
    let mechanism = take_cstr(&mut b)?;
    let len = take_i32(&mut b)?;
    if len < 0 || len as usize != b.len() {
        return Err(ProtocolError::Malformed("SASL response length does not match"));
    }
    Ok((mechanism, b))
}

/// Number of parameters a Bind carries (used to sanity-check Bind messages in tests).
pub fn bind_param_count(body: &[u8]) -> Result<i16, ProtocolError> {
    let mut b = body;
    take_cstr(&mut b)?;
    take_cstr(&mut b)?;
    let nfmt = take_i16(&mut b)?;
    if nfmt < 0 || b.len() < nfmt as usize * 2 {
        return Err(ProtocolError::Malformed("bad Bind format count"));
    }
    b = &b[nfmt as usize * 2..];
    take_i16(&mut b)
}

/// The first column of a DataRow body, in place; None for NULL or a malformed row.
pub fn data_row_first(body: &[u8]) -> Option<&[u8]> {
    let mut b = body;
    if take_i16(&mut b).ok()? < 1 || b.len() < 4 {
        return None;
    }
    let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let len = usize::try_from(len).ok()?;
    b.get(4..4 + len)
}

/// A Bind's parameters, read in place.
pub struct BindView<'a> {
    pub formats: Vec<i16>,
    pub params: Vec<Option<&'a [u8]>>,
    /// Offsets of the parameter count and of the result-format count in the body.
    params_at: usize,
    results_at: usize,
}

impl<'a> BindView<'a> {
    /// Parameter `n` (1-based) with its format code (0 text, 1 binary).
    pub fn param(&self, n: usize) -> Option<(i16, Option<&'a [u8]>)> {
        let v = *self.params.get(n.checked_sub(1)?)?;
        let fmt = match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            _ => *self.formats.get(n - 1)?,
        };
        Some((fmt, v))
    }
}

pub fn bind_view(body: &[u8]) -> Result<BindView<'_>, ProtocolError> {
    let mut b = body;
    take_cstr(&mut b)?;
    take_cstr(&mut b)?;
    let nfmt = take_i16(&mut b)?;
    if nfmt < 0 {
        return Err(ProtocolError::Malformed("bad Bind format count"));
    }
    let mut formats = Vec::with_capacity(nfmt as usize);
    for _ in 0..nfmt {
        formats.push(take_i16(&mut b)?);
    }
    let params_at = body.len() - b.len();
    let n = take_i16(&mut b)?;
    if n < 0 {
        return Err(ProtocolError::Malformed("bad Bind parameter count"));
    }
    let mut params = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return Err(ProtocolError::Malformed("truncated Bind parameter"));
        }
        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        b = &b[4..];
        if len < 0 {
            params.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return Err(ProtocolError::Malformed("truncated Bind parameter"));
        }
        params.push(Some(&b[..len]));
        b = &b[len..];
    }
    Ok(BindView { formats, params, params_at, results_at: body.len() - b.len() })
}

/// A Bind frame equal to `body`'s with text parameters appended.
pub fn bind_with_extra(buf: &mut BytesMut, body: &[u8], extra: &[String]) -> Result<(), ProtocolError> {
    let v = bind_view(body)?;
    let n = v.params.len();
    let mut names = body;
    take_cstr(&mut names)?;
    take_cstr(&mut names)?;
    let names_len = body.len() - names.len();
    put_frame(buf, BIND, |buf| {
        buf.put_slice(&body[..names_len]);
        // Format codes: none or one text code still say "all text"; otherwise list each.
        let all_text = v.formats.is_empty() || (v.formats.len() == 1 && v.formats[0] == 0);
        if all_text {
            buf.put_slice(&body[names_len..v.params_at]);
        } else {
            buf.put_i16((n + extra.len()) as i16);
            for i in 0..n {
                buf.put_i16(if v.formats.len() == 1 { v.formats[0] } else { v.formats[i] });
            }
            for _ in extra {
                buf.put_i16(0);
            }
        }
        buf.put_i16((n + extra.len()) as i16);
        buf.put_slice(&body[v.params_at + 2..v.results_at]);
        for e in extra {
            buf.put_i32(e.len() as i32);
            buf.put_slice(e.as_bytes());
        }
        buf.put_slice(&body[v.results_at..]);
    });
    Ok(())
}

/// A Parse frame with the same name and parameter types, and new text.
pub fn parse_with_text(buf: &mut BytesMut, body: &[u8], sql: &str) -> Result<(), ProtocolError> {
    let mut b = body;
    let name = take_cstr(&mut b)?;
    take_cstr(&mut b)?;
    put_frame(buf, PARSE, |buf| {
        put_cstr(buf, name);
        put_cstr(buf, sql.as_bytes());
        buf.put_slice(b);
    });
    Ok(())
}

/// A ParameterDescription cut to its first `keep` types.
pub fn trim_parameter_description(buf: &mut BytesMut, body: &[u8], keep: usize) {
    let n = body.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize).unwrap_or(0);
    let keep = keep.min(n).min(body.len().saturating_sub(2) / 4);
    put_frame(buf, b't', |buf| {
        buf.put_i16(keep as i16);
        buf.put_slice(&body[2..2 + keep * 4]);
    });
}

/// The extended-protocol form of a statement Chorus runs in place of part of a client's
/// batch: Parse and Bind of the unnamed statement and portal, Execute, and Sync if asked.
pub fn extended_statement(buf: &mut BytesMut, sql: &str, sync: bool) {
    put_frame(buf, PARSE, |b| {
        put_cstr(b, b"");
        put_cstr(b, sql.as_bytes());
        b.put_i16(0);
    });
    put_frame(buf, BIND, |b| {
        put_cstr(b, b"");
        put_cstr(b, b"");
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    put_frame(buf, EXECUTE, |b| {
        put_cstr(b, b"");
        b.put_i32(0);
    });
    if sync {
        put_frame(buf, SYNC, |_| {});
    }
}

/// A call of a named statement Chorus prepares afresh each time: Close (no error when it does
/// not exist), Parse, Bind with `params` (each `(binary, value)`), Execute, Sync. Named, so a
/// client's unnamed statement between two of its batches survives.
pub fn prepared_call(buf: &mut BytesMut, name: &str, sql: &str, params: &[(bool, &[u8])]) {
    put_frame(buf, CLOSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, name.as_bytes());
    });
    put_frame(buf, PARSE, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, sql.as_bytes());
        b.put_i16(0);
    });
    bound_call(buf, name, params);
}

/// Bind, Execute and Sync of the named statement `name`, prepared before on the connection.
pub fn bound_call(buf: &mut BytesMut, name: &str, params: &[(bool, &[u8])]) {
    put_frame(buf, BIND, |b| {
        put_cstr(b, b"");
        put_cstr(b, name.as_bytes());
        b.put_i16(params.len() as i16);
        for (binary, _) in params {
            b.put_i16(*binary as i16);
        }
        b.put_i16(params.len() as i16);
        for (_, v) in params {
            b.put_i32(v.len() as i32);
            b.put_slice(v);
        }
        b.put_i16(0);
    });
    put_frame(buf, EXECUTE, |b| {
        put_cstr(b, b"");
        b.put_i32(0);
    });
    put_frame(buf, SYNC, |_| {});
}

/// Whether an ErrorResponse was raised by a DO block (its CONTEXT names the inline code
/// block): in a request where Chorus put its error statement, that is Chorus's error.
pub fn raised_in_do_block(body: &[u8]) -> bool {
    error_field_iter(body).any(|(field, value)| field == b'W' && value.starts_with(b"PL/pgSQL function inline_code_block"))
}

/// An ErrorResponse without its CONTEXT (`W`) field: the errors Chorus raises itself come
/// from a PL/pgSQL block whose context line PostgreSQL would never send for them.
pub fn error_without_context(buf: &mut BytesMut, body: &[u8]) {
    put_frame(buf, ERROR_RESPONSE, |out| {
        for (field, value) in error_field_iter(body).filter(|(field, _)| *field != b'W') {
            out.put_u8(field);
            put_cstr(out, value);
        }
        out.put_u8(0);
    });
}

pub fn copy_data_msg(buf: &mut BytesMut, data: &[u8]) {
    put_frame(buf, COPY_DATA, |buf| buf.put_slice(data));
}

pub fn query_msg(buf: &mut BytesMut, sql: &str) {
    put_frame(buf, QUERY, |buf| put_cstr(buf, sql.as_bytes()));
}

// ---- builders -------------------------------------------------------------------------------

/// Writes a frame: tag, then a length patched in after `body` wrote the body.
fn put_frame(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    buf.put_u8(tag);
    buf.put_u32(0);
    body(buf);
    let len = (buf.len() - start - 1) as u32;
    buf[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// Severity of a message Chorus writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let tag = if severity == Severity::Notice { NOTICE_RESPONSE } else { ERROR_RESPONSE };
    put_frame(buf, tag, |b| {
        for (field, value) in [(b'S', severity.as_str()), (b'V', severity.as_str()), (b'C', code), (b'M', message)] {
            b.put_u8(field);
            put_cstr(b, value.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    put_frame(buf, READY_FOR_QUERY, |b| b.put_u8(status));
}

pub fn auth_request(buf: &mut BytesMut, code: i32, data: &[u8]) {
    put_frame(buf, AUTHENTICATION, |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT: i32 = 3;
pub const AUTH_MD5: i32 = 5;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

pub fn parameter_status_msg(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    put_frame(buf, PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data_msg(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_frame(buf, BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unknown: &[String]) {
    put_frame(buf, NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(newest_minor);
        b.put_i32(unknown.len() as i32);
        for o in unknown {
            put_cstr(b, o.as_bytes());
        }
    });
}

/// A CancelRequest packet for one backend.
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16u32.to_be_bytes());
    out[4..8].copy_from_slice(&super::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&secret.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::FrameCodec;
    use tokio_util::codec::Decoder;

    #[test]
    fn a_fatal_behind_other_frames_is_found() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Error, "22012", "division by zero");
        let skip = buf.len();
        ready_for_query(&mut buf, b'I');
        let at = buf.len();
        error_response(&mut buf, Severity::Fatal, "57P01", "terminating connection");
        let len = buf.len() - at;
        assert_eq!(find_fatal(&buf), Some((at, len)));
        assert_eq!(find_fatal(&buf[..skip]), None);
        // A frame cut short is not read.
        assert_eq!(find_fatal(&buf[..buf.len() - 1]), None);
    }

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, "08006", "no backend");
        let frame = FrameCodec::new(1024).decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.tag, ERROR_RESPONSE);
        let f = error_fields(frame.body());
        assert_eq!((f.severity.as_str(), f.code.as_str(), f.message.as_str()), ("FATAL", "08006", "no backend"));
        assert_eq!(&error_code(frame.body()), b"08006");
    }

    #[test]
    fn reads_routing_fields() {
        assert_eq!(parse_fields(b"s1\0select 1\0\0\0").unwrap(), (&b"s1"[..], &b"select 1"[..]));
        assert_eq!(bind_names(b"p\0s1\0\0\0\0\0\0\0").unwrap(), (&b"p"[..], &b"s1"[..]));
        assert_eq!(target_name(b"Sname\0").unwrap(), (b'S', &b"name"[..]));
        assert!(target_name(b"Xname\0").is_err());
        assert!(target_name(b"").is_err());
        assert_eq!(execute_portal(b"\0\0\0\0\0").unwrap(), &b""[..]);
        assert!(execute_portal(b"\0\0").is_err());
        assert_eq!(command_tag(b"UPDATE 3\0"), b"UPDATE 3");
        assert_eq!(&error_code(b"SERROR\0Mboom\0\0"), b"XX000");
        assert_eq!(sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x03abc").unwrap(), (&b"SCRAM-SHA-256"[..], &b"abc"[..]));
        assert!(sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x09abc").is_err());
        assert_eq!(bind_param_count(b"\0s\0\0\0\0\x02").unwrap(), 2);
    }

    #[test]
    fn ready_for_query_and_key_data() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, b'T');
        assert_eq!(&buf[..], &[b'Z', 0, 0, 0, 5, b'T']);
        let mut buf = BytesMut::new();
        backend_key_data_msg(&mut buf, 7, -1);
        assert_eq!(backend_key_data(&buf[5..]).unwrap(), (7, -1));
    }
}
