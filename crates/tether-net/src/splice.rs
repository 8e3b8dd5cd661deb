//! Copying bytes both ways between two endpoints, keeping half-close.
//!
//! Each direction runs until its source reaches EOF, then finishes (FIN /
//! `shutdown(Write)`) its destination and stops; the other direction keeps
//! going. Only an error (a reset stream, a broken socket) stops both: that is
//! the difference from a `select!` over two copies, which would cut the
//! still-open direction at the first EOF.

use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::session::{StreamReader, StreamWriter};

/// Read buffer size for sockets. Allocated only when the socket is readable,
/// so idle connections hold no buffer.
pub const SOCKET_READ_CHUNK: usize = 64 * 1024;

/// A source of byte chunks.
pub trait ChunkRead: Send {
    /// The next chunk, `Ok(None)` at EOF.
    fn read_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// A sink of byte chunks.
pub trait ChunkWrite: Send {
    /// Writes the whole chunk.
    fn write_chunk(&mut self, b: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Signals EOF to the other side (half-close).
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Ends the stream abruptly with a reason, when the endpoint can say one
    /// (a tunnel stream sends RST); sockets are simply dropped.
    fn abort(&mut self, _code: tether_proto::ResetCode, _reason: &str) {}
}

impl ChunkRead for StreamReader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.read().await?)
    }
}

impl ChunkWrite for StreamWriter {
    async fn write_chunk(&mut self, b: Bytes) -> io::Result<()> {
        Ok(self.write(b).await?)
    }
    async fn finish(&mut self) -> io::Result<()> {
        Ok(StreamWriter::finish(self).await?)
    }
    fn abort(&mut self, code: tether_proto::ResetCode, reason: &str) {
        self.reset(code, reason);
    }
}

impl ChunkRead for OwnedReadHalf {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            self.readable().await?;
            let mut buf = BytesMut::with_capacity(SOCKET_READ_CHUNK);
            match self.try_read_buf(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(buf.freeze())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl ChunkWrite for OwnedWriteHalf {
    async fn write_chunk(&mut self, b: Bytes) -> io::Result<()> {
        self.write_all(&b).await
    }
    async fn finish(&mut self) -> io::Result<()> {
        self.shutdown().await
    }
}

/// Any [`tokio::io::AsyncRead`] as a [`ChunkRead`] (e.g. a TLS stream's read half).
pub struct IoReader<R>(pub R);

/// Any [`tokio::io::AsyncWrite`] as a [`ChunkWrite`]; `finish` shuts it down.
pub struct IoWriter<W>(pub W);

impl<R: tokio::io::AsyncRead + Unpin + Send> ChunkRead for IoReader<R> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        use tokio::io::AsyncReadExt;
        let mut buf = BytesMut::with_capacity(SOCKET_READ_CHUNK);
        match self.0.read_buf(&mut buf).await? {
            0 => Ok(None),
            _ => Ok(Some(buf.freeze())),
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin + Send> ChunkWrite for IoWriter<W> {
    async fn write_chunk(&mut self, b: Bytes) -> io::Result<()> {
        self.0.write_all(&b).await?;
        self.0.flush().await
    }
    async fn finish(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

/// How a splice ended.
#[derive(Debug, Default)]
pub struct SpliceReport {
    /// Bytes copied from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes copied from `b` to `a`.
    pub b_to_a: u64,
    /// The first error, if the splice did not end with EOF both ways.
    pub error: Option<io::Error>,
}

async fn copy_one_way<R: ChunkRead, W: ChunkWrite>(
    r: &mut R,
    w: &mut W,
    count: &mut u64,
) -> io::Result<()> {
    while let Some(chunk) = r.read_chunk().await? {
        *count += chunk.len() as u64;
        w.write_chunk(chunk).await?;
    }
    w.finish().await
}

/// Copies `a_read → b_write` and `b_read → a_write` until both directions
/// reached EOF, or either failed. The endpoints are dropped on return (which
/// resets an unfinished tunnel stream and closes sockets).
pub async fn splice<AR, AW, BR, BW>(
    a_read: AR,
    a_write: AW,
    b_read: BR,
    b_write: BW,
) -> SpliceReport
where
    AR: ChunkRead,
    AW: ChunkWrite,
    BR: ChunkRead,
    BW: ChunkWrite,
{
    splice_until(a_read, a_write, b_read, b_write, std::future::pending()).await
}

/// Like [`splice`], but when `stop` resolves first both sides are aborted
/// with its code and reason (e.g. RST `forbidden` when access is revoked).
pub async fn splice_until<AR, AW, BR, BW>(
    mut a_read: AR,
    mut a_write: AW,
    mut b_read: BR,
    mut b_write: BW,
    stop: impl Future<Output = (tether_proto::ResetCode, String)>,
) -> SpliceReport
where
    AR: ChunkRead,
    AW: ChunkWrite,
    BR: ChunkRead,
    BW: ChunkWrite,
{
    let mut report = SpliceReport::default();
    let mut up = 0u64;
    let mut down = 0u64;
    let mut stopped = None;
    {
        let a_to_b = copy_one_way(&mut a_read, &mut b_write, &mut up);
        let b_to_a = copy_one_way(&mut b_read, &mut a_write, &mut down);
        tokio::pin!(a_to_b, b_to_a, stop);
        let (mut a_done, mut b_done) = (false, false);
        while !(a_done && b_done) {
            tokio::select! {
                r = &mut a_to_b, if !a_done => {
                    a_done = true;
                    if let Err(e) = r { report.error = Some(e); break; }
                }
                r = &mut b_to_a, if !b_done => {
                    b_done = true;
                    if let Err(e) = r { report.error = Some(e); break; }
                }
                why = &mut stop => {
                    stopped = Some(why);
                    break;
                }
            }
        }
    }
    if let Some((code, reason)) = stopped {
        a_write.abort(code, &reason);
        b_write.abort(code, &reason);
        report.error = Some(io::Error::new(io::ErrorKind::PermissionDenied, reason));
    }
    report.a_to_b = up;
    report.b_to_a = down;
    report
}
