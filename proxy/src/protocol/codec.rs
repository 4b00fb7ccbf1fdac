//! Frame cutting: a tag byte, a big-endian length that counts itself, a body.
//!
//! The codec never copies a frame: `decode` splits it off the read buffer, so the frame shares
//! the buffer's memory and can be forwarded as it arrived. Only the header is inspected.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Bytes in a frame header: one tag byte and a four-byte length.
pub const HEADER_LEN: usize = 5;

/// How much to grow a read buffer at a time while a large frame arrives, so that a peer that
/// merely announces a huge frame does not make us allocate it up front.
const GROW_STEP: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength { tag: char, len: u32 },
    #[error("message of type '{tag}' is {len} bytes, over the limit of {max} bytes")]
    TooLarge { tag: char, len: usize, max: usize },
    #[error("invalid startup packet length {0}")]
    BadStartupLength(u32),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unexpected message type '{0}'")]
    UnexpectedTag(char),
    #[error("i/o: {0}")]
    Io(String),
}

impl From<std::io::Error> for ProtocolError {
    fn from(e: std::io::Error) -> Self {
        ProtocolError::Io(e.to_string())
    }
}

/// One whole protocol frame, header included, sharing the read buffer's memory.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub data: BytesMut,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.data[HEADER_LEN..]
    }
}

/// Looks at the head of `buf`: `Ok(Some((tag, total)))` when a frame of `total` bytes
/// (header included) is announced, `Ok(None)` when not even a header is there yet.
#[inline]
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength { tag: tag as char, len });
    }
    let total = len as usize + 1;
    if total > max_len {
        return Err(ProtocolError::TooLarge { tag: tag as char, len: total, max: max_len });
    }
    Ok(Some((tag, total)))
}

/// Cuts whole frames off a buffer; partial frames stay until more bytes arrive.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    pub max_len: usize,
}

impl FrameCodec {
    pub fn new(max_len: usize) -> Self {
        FrameCodec { max_len }
    }

    /// Like `decode`, but only reports whether a whole frame is there and what it is.
    #[inline]
    pub fn peek(&self, buf: &[u8]) -> Result<Option<(u8, usize)>, ProtocolError> {
        match peek_header(buf, self.max_len)? {
            Some((tag, total)) if buf.len() >= total => Ok(Some((tag, total))),
            _ => Ok(None),
        }
    }

    /// Makes room in `buf` for the rest of a partial frame, a bounded step at a time.
    pub fn reserve_for_partial(&self, buf: &mut BytesMut) {
        let want = match peek_header(buf, self.max_len) {
            Ok(Some((_, total))) if total > buf.len() => (total - buf.len()).min(GROW_STEP),
            _ => 0,
        };
        let want = want.max(8 * 1024);
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        match self.peek(buf)? {
            Some((tag, total)) => Ok(Some(Frame { tag, data: buf.split_to(total) })),
            None => {
                self.reserve_for_partial(buf);
                Ok(None)
            }
        }
    }
}

/// Reads a big-endian i32 from the front of a slice, advancing it.
pub fn take_i32(buf: &mut &[u8]) -> Result<i32, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::Malformed("truncated integer"));
    }
    Ok(buf.get_i32())
}

/// Reads a big-endian i16 from the front of a slice, advancing it.
pub fn take_i16(buf: &mut &[u8]) -> Result<i16, ProtocolError> {
    if buf.len() < 2 {
        return Err(ProtocolError::Malformed("truncated integer"));
    }
    Ok(buf.get_i16())
}

/// Reads a NUL-terminated string from the front of a slice, advancing past the NUL.
pub fn take_cstr<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], ProtocolError> {
    let end = buf.iter().position(|&b| b == 0).ok_or(ProtocolError::Malformed("string without terminator"))?;
    let s = &buf[..end];
    *buf = &buf[end + 1..];
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn cuts_whole_frames_and_keeps_partial_ones() {
        let mut bytes = frame(b'Q', b"select 1\0");
        bytes.extend_from_slice(&frame(b'S', b""));
        let tail = frame(b'X', b"");
        bytes.extend_from_slice(&tail[..3]);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = FrameCodec::new(1024);
        let f = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"select 1\0");
        let f = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!((f.tag, f.data.len()), (b'S', 5));
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 3);
        buf.extend_from_slice(&tail[3..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().tag, b'X');
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_lengths_below_four() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(FrameCodec::new(100).decode(&mut buf).unwrap_err(), ProtocolError::BadLength { tag: 'Q', len: 3 });
    }

    #[test]
    fn rejects_oversized_frames_from_the_header_alone() {
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0, 0, 0][..]);
        let err = FrameCodec::new(1 << 20).decode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { tag: 'd', .. }));
    }

    #[test]
    fn does_not_reserve_the_announced_size_up_front() {
        let mut buf = BytesMut::from(&[b'd', 0x10, 0, 0, 0][..]);
        let mut codec = FrameCodec::new(1 << 30);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn cstr_and_ints() {
        let mut b: &[u8] = b"abc\0\0\0\0\x07\0\x02rest";
        assert_eq!(take_cstr(&mut b).unwrap(), b"abc");
        assert_eq!(take_i32(&mut b).unwrap(), 7);
        assert_eq!(take_i16(&mut b).unwrap(), 2);
        assert_eq!(b, b"rest");
        assert!(take_cstr(&mut b).is_err());
        let mut short: &[u8] = b"\0";
        assert!(take_i32(&mut short).is_err());
    }
}

/// Randomised robustness test: arbitrary and mutated byte streams never panic the decoder or
/// the field readers, and every frame it yields is exactly what its header announced.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::protocol::{message, startup};

    fn seeds() -> Vec<Vec<u8>> {
        let mut q = vec![b'Q', 0, 0, 0, 13];
        q.extend_from_slice(b"select 1\0");
        let p = b"P\0\0\0\x13s1\0select $1\0\0\x01\0\0\0\x17".to_vec();
        let b = b"B\0\0\0\x0e\0s1\0\0\0\0\0\0\0".to_vec();
        vec![q, p, b, vec![b'S', 0, 0, 0, 4], vec![b'X', 0, 0, 0, 4]]
    }

    #[test]
    fn random_streams_never_panic() {
        let mut stream = Vec::new();
        for _ in 0..20_000 {
            let mut s = seeds()[rand::random_range(0..5)].clone();
            // Mutate: flip bytes, truncate, or append garbage.
            match rand::random_range(0..4) {
                0 => {
                    let i = rand::random_range(0..s.len());
                    s[i] = rand::random();
                }
                1 => s.truncate(rand::random_range(0..s.len())),
                2 => s.extend((0..rand::random_range(0..16)).map(|_| rand::random::<u8>())),
                _ => {}
            }
            stream.extend_from_slice(&s);
        }
        let mut codec = FrameCodec::new(1 << 16);
        let mut buf = BytesMut::new();
        for chunk in stream.chunks(97) {
            buf.extend_from_slice(chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(f)) => {
                        let announced = u32::from_be_bytes([f.data[1], f.data[2], f.data[3], f.data[4]]) as usize;
                        assert_eq!(f.data.len(), announced + 1);
                        let body = f.body();
                        let _ = message::query_sql(body);
                        let _ = message::parse_fields(body);
                        let _ = message::bind_names(body);
                        let _ = message::bind_param_count(body);
                        let _ = message::target_name(body);
                        let _ = message::execute_portal(body);
                        let _ = message::error_fields(body);
                        let _ = message::error_code(body);
                        let _ = message::sasl_initial_response(body);
                        let _ = startup::parse(body);
                        let _ = crate::sql::classify(body);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // A real session ends here; resynchronise the test at a random point.
                        let skip = rand::random_range(1..=buf.len().max(1));
                        let _ = buf.split_to(skip.min(buf.len()));
                        if buf.is_empty() {
                            break;
                        }
                    }
                }
            }
        }
    }
}
