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
