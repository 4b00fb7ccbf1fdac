//! A connection, a client's or a backend's: plain TCP, TLS over it, or a Unix-domain socket to
//! a backend on the same host, one type for the session to read and write, so nothing past the
//! negotiation knows which it has.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    /// To a backend whose `host` is a socket directory.
    Unix(UnixStream),
    /// With the `tls-server-end-point` data of the certificate Chorus shook hands with, on a
    /// client's connection.
    Tls(Box<TlsStream<TcpStream>>, Option<Arc<[u8]>>),
    /// Between the plain stream's hand-over to the TLS handshake and its end; after a failed
    /// handshake. Reads see the end; writes fail.
    Closed,
}

fn closed() -> io::Error {
    io::ErrorKind::NotConnected.into()
}

impl Stream {
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s, _) => Some(s.get_ref().0),
            Stream::Unix(_) | Stream::Closed => None,
        }
    }

    /// Shuts the socket down at once, both ways (the peer sees the end now, not at drop).
    pub fn shutdown_now(&self) {
        match self {
            Stream::Unix(s) => {
                let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Both);
            }
            _ => {
                if let Some(tcp) = self.tcp() {
                    crate::wire::shutdown_now(tcp);
                }
            }
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().ok_or_else(closed)?.peer_addr()
    }

    /// The channel binding data (None: not TLS, or a certificate without it).
    pub fn end_point(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(_, e) => e.as_deref(),
            _ => None,
        }
    }

    /// The TLS session's state (None: not TLS).
    pub fn tls(&self) -> Option<&rustls::CommonState> {
        match self {
            Stream::Tls(s, _) => Some(s.get_ref().1),
            _ => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tls(s, _) => s.is_write_vectored(),
            Stream::Closed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}
