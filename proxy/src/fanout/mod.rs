//! Fan-out: a session's connections to the in-sync backends, and the comparison of what they
//! answered.
//!
//! `conn` opens and logs into one backend connection per session; `outcome` condenses a
//! backend's reply to one request into what the contract compares (success or error, SQLSTATE,
//! command tags with row counts) and votes among backends. The session drives both.

pub mod conn;
pub mod outcome;

pub use conn::{connect, BackendConn, Ended, LoginError};
pub use outcome::{vote, Outcome, Vote};
