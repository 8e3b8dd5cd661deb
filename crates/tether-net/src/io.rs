//! A tunnel stream as a byte pipe ([`AsyncRead`] + [`AsyncWrite`]), for code
//! that wants one: the server's HTTP proxy hands it to hyper, the agent wraps
//! it in TLS for HTTPS services.
//!
//! Reads hand out the stream's chunks without copying until the caller's
//! buffer is smaller than a chunk; writes copy once into the stream's send
//! queue. Shutdown is a half-close (FIN), never a reset, so a peer that
//! reads to EOF still gets everything.

use bytes::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::session::{Stream, StreamReader, StreamWriter};

/// A [`Stream`] as an [`AsyncRead`] + [`AsyncWrite`] byte pipe.
pub struct StreamIo {
    reader: StreamReader,
    writer: StreamWriter,
    /// The rest of the chunk a short read did not take.
    pending: Bytes,
}

impl StreamIo {
    /// Wraps an open stream.
    pub fn new(stream: Stream) -> StreamIo {
        let (reader, writer) = stream.split();
        StreamIo {
            reader,
            writer,
            pending: Bytes::new(),
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match this.reader.poll_read_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())), // EOF
                Poll::Ready(Ok(Some(b))) => this.pending = b,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .writer
            .poll_write_some(cx, buf)
            .map_err(Into::into)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already queued for the session's writer task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().writer.finish_now().map_err(Into::into))
    }
}
