//! Socket plumbing shared by the client side and the backend side: an output queue of frames
//! written with vectored writes, so forwarded frames go out as they arrived, without a copy.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

#[derive(Default)]
pub struct OutQueue {
    q: VecDeque<Bytes>,
    bytes: usize,
}

impl OutQueue {
    #[inline]
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.bytes += b.len();
            self.q.push_back(b);
        }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.bytes
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Writes as much as the socket takes; Ready(Ok) once everything is written (and, over
    /// TLS, the last record has left the TLS layer's buffer too).
    pub fn poll_flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.q.is_empty() {
            let mut slices = [IoSlice::new(&[]); 32];
            let n = self.q.iter().zip(slices.iter_mut()).map(|(b, s)| *s = IoSlice::new(b)).count();
            match Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(mut written)) => {
                    self.bytes -= written;
                    while written > 0 {
                        let Some(front) = self.q.front_mut() else {
                            break;
                        };
                        if written >= front.len() {
                            written -= front.len();
                            self.q.pop_front();
                        } else {
                            front.advance(written);
                            written = 0;
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(stream).poll_flush(cx)
    }
}

/// Closes both directions of a socket now, without waiting: the peer sees the end at once
/// (a backend rolls back the session's transaction) even though the value lives on.
pub fn shutdown_now(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
}
