//! Chorus: a PostgreSQL wire-protocol proxy that replicates by sending every change to every
//! in-sync backend and answering with the first good reply.
//!
//! The data path, in module order: `server` accepts a client; `tls` secures it when asked;
//! `session` runs it; `protocol`
//! cuts and reads frames; `sql` classifies statements; `order` decides when a write may run;
//! `fanout` holds the backend connections and compares their outcomes; `cluster` owns the
//! backends' states. `verify` compares the backends' data at a quiesced point.

pub mod admin;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod difflog;
pub mod error;
pub mod fanout;
mod fuzz;
pub mod ha;
pub mod history;
pub mod join;
pub mod local;
pub mod order;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shared;
pub mod sql;
pub mod supervise;
pub mod tls;
pub mod verify;
pub mod watchdog;
pub mod wire;
