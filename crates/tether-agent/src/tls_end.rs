//! When a TLS service's connection ends without `close_notify`, whether
//! that is the end of what it sent or a cut.
//!
//! rustls reports any TCP close under TLS without `close_notify` as
//! `UnexpectedEof`. Many servers close that way after their last record,
//! and nginx and Go's `crypto/tls` take a close there as the end; a close in
//! the middle of a record is a cut (a service killed mid-write), and must
//! stay an error, or a truncated answer would look complete. rustls does not
//! say which it was, so [`RecordEdges`] follows the record framing of the
//! bytes it reads from the socket (a 5-byte header with the length, then
//! that many bytes), and [`EndWithoutNotify`] turns the error into an end
//! only when the socket closed between two records.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Length of a TLS record header: type, version (2), length (2).
const HEADER_LEN: usize = 5;

/// A service's socket under TLS, read as TLS records: marks whether it
/// closed between two records.
pub(crate) struct RecordEdges<S> {
    io: S,
    /// Bytes of the current record's header read so far.
    header_read: usize,
    /// Its length's high byte, once read.
    len_high: u8,
    /// Bytes of the current record's body still to come.
    body_left: usize,
    /// Set when the socket closed between two records.
    clean_close: Arc<AtomicBool>,
}

impl<S> RecordEdges<S> {
    /// Wraps `io`.
    pub(crate) fn new(io: S) -> RecordEdges<S> {
        RecordEdges {
            io,
            header_read: 0,
            len_high: 0,
            body_left: 0,
            clean_close: Arc::default(),
        }
    }

    /// The socket.
    pub(crate) fn get_ref(&self) -> &S {
        &self.io
    }

    /// The mark [`EndWithoutNotify`] reads.
    pub(crate) fn clean_close(&self) -> Arc<AtomicBool> {
        self.clean_close.clone()
    }

    /// Follows the framing over bytes read.
    fn saw(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            match self.header_read {
                3 => self.len_high = bytes[0],
                4 => self.body_left = usize::from(u16::from_be_bytes([self.len_high, bytes[0]])),
                _ => {}
            }
            self.header_read = (self.header_read + 1) % HEADER_LEN;
            bytes = &bytes[1..];
        }
    }

    fn at_edge(&self) -> bool {
        self.header_read == 0 && self.body_left == 0
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordEdges<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let read = &buf.filled()[before..];
            if read.is_empty() {
                let clean = self.at_edge();
                self.clean_close.store(clean, Ordering::Relaxed);
            } else {
                self.saw(read);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordEdges<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The read half of a TLS connection to a service, where a close without
/// `close_notify` between two records is the service's end (a FIN), not a
/// failure: a failure resets the stream (PROTOCOL.md 9.2), which throws
/// away what of the service's answer was still queued for the client. A
/// close inside a record stays an error.
pub(crate) struct EndWithoutNotify<R> {
    io: R,
    clean_close: Arc<AtomicBool>,
}

impl<R> EndWithoutNotify<R> {
    /// `io`, whose socket's [`RecordEdges::clean_close`] is `clean_close`.
    pub(crate) fn new(io: R, clean_close: Arc<AtomicBool>) -> EndWithoutNotify<R> {
        EndWithoutNotify { io, clean_close }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for EndWithoutNotify<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Err(e))
                if e.kind() == io::ErrorKind::UnexpectedEof
                    && self.clean_close.load(Ordering::Relaxed) =>
            {
                tracing::debug!(
                    "the service closed its TLS connection without close_notify, between records: taken as its end"
                );
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Reads `wire` to its end through [`RecordEdges`]: whether it closed
    /// between records.
    async fn closed_clean(wire: &[u8], piece: usize) -> bool {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut edges = RecordEdges::new(rx);
        let wire = wire.to_vec();
        let writer = tokio::spawn(async move {
            for p in wire.chunks(piece) {
                tokio::io::AsyncWriteExt::write_all(&mut tx, p)
                    .await
                    .unwrap();
            }
        });
        let mut out = Vec::new();
        edges.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        edges.clean_close.load(Ordering::Relaxed)
    }

    fn record(len: usize) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(7u8, len));
        r
    }

    #[tokio::test]
    async fn a_close_between_records_is_clean_and_inside_one_is_not() {
        let mut two = record(300);
        two.extend(record(0));
        two.extend(record(17_000));
        for piece in [1, 2, 5, 6, 4096, 1 << 16] {
            assert!(closed_clean(&two, piece).await, "piece {piece}");
            assert!(closed_clean(&[], piece).await);
            for cut in [1, 3, 4, 5, 6, 304, 306, 309, 311, 315, two.len() - 1] {
                assert!(
                    !closed_clean(&two[..cut], piece).await,
                    "cut {cut}, piece {piece}"
                );
            }
            // After the first record, and after the empty one.
            for edge in [305, 310] {
                assert!(
                    closed_clean(&two[..edge], piece).await,
                    "edge {edge}, piece {piece}"
                );
            }
        }
    }
}
