//! A byte pipe whose writes fail once the peer has read nothing for a while.
//!
//! A peer that stops reading leaves a writer pending forever: TCP keepalive
//! does not end a connection whose peer still acknowledges (a zero window is
//! not a dead peer), and a graceful close waits for the flush of what is
//! still buffered. [`WriteStall`] turns such a write, flush or shutdown into
//! an error ([`io::ErrorKind::TimedOut`]) once it has been waiting, with no
//! byte going out, for its limit: what nginx calls `send_timeout`. A slow
//! reader is not cut; only one that takes nothing at all for that long.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An [`AsyncRead`] + [`AsyncWrite`] whose writing side fails after being
/// stuck for `limit` (see the module doc). Reads pass through untouched.
pub struct WriteStall<S> {
    inner: S,
    limit: Duration,
    /// The timer of the write now waiting; kept between waits (allocated at
    /// the first one) so that a transfer to a slow reader allocates once.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for a write that is waiting now.
    armed: bool,
}

impl<S> WriteStall<S> {
    /// Wraps `inner`; its writes fail once stuck for `limit`.
    pub fn new(inner: S, limit: Duration) -> WriteStall<S> {
        WriteStall {
            inner,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// Passes a write's result on, timing a pending one.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let deadline = Instant::now() + self.limit;
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.armed {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        if timer.as_mut().poll(cx).is_ready() {
            self.armed = false;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                SendStalled {
                    secs: self.limit.as_secs(),
                },
            )));
        }
        Poll::Pending
    }
}

/// The error inside the [`io::ErrorKind::TimedOut`] a stuck write fails
/// with: told apart from the kernel's own `ETIMEDOUT` (a peer that vanished)
/// by [`is_send_stall`].
#[derive(Debug, thiserror::Error)]
#[error("the peer read nothing for {secs} s")]
pub struct SendStalled {
    /// The limit that ran out, in seconds.
    pub secs: u64,
}

/// Whether `e`, or an error below it, is a [`WriteStall`] giving up.
pub fn is_send_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<SendStalled>() {
            return true;
        }
        // An `io::Error`'s `source` skips the error it wraps.
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<SendStalled>()) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An error with another below it, as hyper's are.
    #[derive(Debug, thiserror::Error)]
    #[error("connection error")]
    struct Wrapped(#[source] io::Error);

    /// A peer that reads nothing: the write fails after the limit, not
    /// before; one that reads a little now and then keeps it going.
    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_limit() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut a = WriteStall::new(a, Duration::from_secs(60));
        let started = Instant::now();
        let e = a.write_all(&[7; 64 * 1024]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(is_send_stall(&e), "{e}");
        // Wrapped, as hyper reports it, it is still found; the kernel's
        // own timeout is not one.
        let wrapped = Wrapped(e);
        assert!(is_send_stall(&wrapped));
        assert!(!is_send_stall(&io::Error::from(io::ErrorKind::TimedOut)));
        assert_eq!(started.elapsed().as_secs(), 60);

        // A reader taking 1 KiB every 50 s keeps the writer alive.
        let (a, b2) = tokio::io::duplex(1024);
        let mut a = WriteStall::new(a, Duration::from_secs(60));
        let reader = tokio::spawn(async move {
            let mut b2 = b2;
            let mut buf = [0; 1024];
            let mut got = 0;
            while got < 8 * 1024 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                got += b2.read(&mut buf).await.unwrap();
            }
            got
        });
        a.write_all(&[7; 8 * 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 8 * 1024);
    }
}
