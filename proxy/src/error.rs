//! Errors that end a client session or refuse a login, and the SQLSTATE each one carries to
//! the client. The mapping lives here, at the edge, so the contract's error table has one home.

use crate::protocol::ProtocolError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("unsupported frontend protocol {0}.{1}: Chorus supports 3.0")]
    UnsupportedProtocol(i32, i32),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("role \"{0}\" does not exist")]
    NoSuchUser(String),
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    #[error("sorry, too many clients already")]
    TooManyClients,
    #[error("Chorus is shutting down")]
    ShuttingDown,
    #[error("terminating connection: this Chorus hands the leadership to another member (planned switchover); reconnect")]
    HandingOver,
    #[error("no in-sync backend can serve the request: {0}")]
    NoBackend(String),
    #[error("terminating connection: idle in a write transaction for longer than idle_in_transaction_timeout ({0:?})")]
    IdleInTransaction(std::time::Duration),
    #[error("replication connections are not supported through Chorus")]
    Replication,
    #[error("this Chorus requires TLS ([tls] mode = \"require\"): connect with sslmode=require, verify-ca or verify-full")]
    TlsRequired,
    #[error("terminating connection: a backend joined the cluster and this session holds {0}, which Chorus cannot copy to it; reconnect")]
    Unmovable(&'static str),
    #[error(
        "terminating connection: this session's connection to backend {0} ended ({1}) while the server stays healthy; reconnect"
    )]
    ConnectionLost(String, String),
    #[error("could not log in to backend {0} ({1}) while the server stays healthy; try again")]
    LoginFailed(String, String),
    /// The client went away or its socket failed: nothing can be told to it.
    #[error("client connection: {0}")]
    ClientIo(#[from] std::io::Error),
    /// The client ended the session with Terminate.
    #[error("client terminated the session")]
    Terminated,
}

impl SessionError {
    /// The SQLSTATE the client is told, or None when the client cannot be told anything.
    pub fn sqlstate(&self) -> Option<&'static str> {
        Some(match self {
            SessionError::Protocol(_) => "08P01",
            SessionError::UnsupportedProtocol(..) => "0A000",
            SessionError::NoUser | SessionError::NoSuchUser(_) | SessionError::TlsRequired => "28000",
            SessionError::AuthFailed(_) => "28P01",
            SessionError::TooManyClients => "53300",
            SessionError::ShuttingDown => "57P03",
            SessionError::HandingOver => "57P01",
            SessionError::NoBackend(_) | SessionError::ConnectionLost(..) => "08006",
            SessionError::LoginFailed(..) => "08001",
            SessionError::IdleInTransaction(_) => "25P03",
            SessionError::Replication => "0A000",
            SessionError::Unmovable(_) => "57P01",
            SessionError::ClientIo(_) | SessionError::Terminated => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_sqlstates() {
        assert_eq!(SessionError::NoBackend("x".into()).sqlstate(), Some("08006"));
        assert_eq!(SessionError::TooManyClients.sqlstate(), Some("53300"));
        assert_eq!(SessionError::ShuttingDown.sqlstate(), Some("57P03"));
        assert_eq!(SessionError::AuthFailed("a".into()).sqlstate(), Some("28P01"));
        assert_eq!(SessionError::NoSuchUser("a".into()).sqlstate(), Some("28000"));
        assert_eq!(SessionError::Protocol(ProtocolError::UnexpectedTag('?')).sqlstate(), Some("08P01"));
        assert_eq!(SessionError::Terminated.sqlstate(), None);
    }
}
