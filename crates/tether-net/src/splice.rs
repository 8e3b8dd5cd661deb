//! Copying bytes both ways between two endpoints, keeping half-close.
//!
//! Each direction runs until its source reaches EOF, then finishes (FIN /
//! `shutdown(Write)`) its destination and stops; the other direction keeps
//! going. Only an error (a reset stream, a broken socket) stops both: that is
//! the difference from a `select!` over two copies, which would cut the
//! still-open direction at the first EOF.
//!
//! An error is passed on as one, never as an end: both destinations are
//! aborted (a tunnel stream gets RST with the reset's own code and reason,
//! or `io_error` when a socket failed; a socket is reset, RST instead of
//! FIN), so an application behind any number of relays sees a failed
//! transfer fail, not end early and look complete.
//!
//! The endpoints are polled, not awaited: a splice is one small state
//! machine ([`Splice`], a few hundred bytes) instead of a tree of nested
//! `async fn` futures, each holding its own copy of its arguments (over a
//! kilobyte). Every idle connection holds one, in every process it crosses.

use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::chunk::unpinned;
use crate::error::StreamError;
use crate::scratch::{with_scratch, SCRATCH_LEN};
use crate::session::{StreamReader, StreamWriter};

/// Read buffer size for sockets. Allocated only when the socket is readable,
/// so idle connections hold no buffer.
pub const SOCKET_READ_CHUNK: usize = 64 * 1024;

// A small-mode read takes the whole scratch buffer: as much as a normal one.
const _: () = assert!(SCRATCH_LEN == SOCKET_READ_CHUNK);

/// Read buffer size for a socket whose reads keep filling
/// [`SOCKET_READ_CHUNK`] (a bulk transfer; see [`SocketReader`]). Half a
/// stream's send buffer, and within `MAX_GATHER_BYTES`, what the other
/// direction may hold beyond the session's own buffers.
pub const BULK_READ_CHUNK: usize = 128 * 1024;

/// Most chunks one gathered write sends (see [`ChunkWrite::gathers`]).
const MAX_GATHER_CHUNKS: usize = 16;

/// Most bytes a splice takes ahead from its source for one gathered write:
/// what a direction holds beyond the chunk it is writing.
const MAX_GATHER_BYTES: usize = 256 * 1024;

/// A source of byte chunks.
pub trait ChunkRead: Send + Unpin {
    /// The next chunk, `Ok(None)` at EOF.
    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;

    /// Another chunk that is ready now, without waiting, for a gathered
    /// write; `None` when there is none (EOF and errors come from
    /// [`ChunkRead::poll_next_chunk`]). Sources that hold no queue keep the
    /// default.
    fn ready_chunk(&mut self) -> Option<Bytes> {
        None
    }
}

/// A sink of byte chunks.
pub trait ChunkWrite: Send + Unpin {
    /// Writes from `chunk`, advancing it past what was written; ready once
    /// all of it is written (`chunk` is then empty) and, for a writer that
    /// buffers (TLS, a WebSocket sink), flushed. A writer may take all of
    /// `chunk` and still be pending on its flush: it is then called again,
    /// with `chunk` empty, until ready.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes)
        -> Poll<io::Result<()>>;
    /// Signals EOF to the other side (half-close).
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Whether several chunks go out in one call ([`ChunkWrite::poll_write_gather`]):
    /// a socket's `writev`, one system call instead of one per chunk.
    fn gathers(&self) -> bool {
        false
    }
    /// Writes `first`, then `more` in order, in as few calls as it can,
    /// advancing `first` and moving the next of `more` into it as bytes go
    /// out; ready once everything is written. The default writes one chunk
    /// at a time.
    fn poll_write_gather(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut Bytes,
        more: &mut Vec<Bytes>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_write_chunk(cx, first))?;
            if more.is_empty() {
                return Poll::Ready(Ok(()));
            }
            *first = more.remove(0);
        }
    }
    /// Ends the destination abruptly, because the splice failed or was
    /// stopped: a tunnel stream sends RST with `code` and `reason`, a
    /// socket is reset. The default (any other writer) does nothing: it is
    /// simply dropped.
    fn abort(&mut self, _code: tether_proto::ResetCode, _reason: &str) {}
    /// Ready with the error once the destination was reset from its far
    /// side (or its session was lost) while nothing is being written to
    /// it. A tunnel stream learns of its reset this way; a writer that
    /// cannot (a socket, whose errors surface on its own reads and writes)
    /// keeps the default, never.
    fn poll_reset(&mut self, _cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Pending
    }
}

impl ChunkRead for StreamReader {
    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        StreamReader::poll_read_chunk(self, cx).map_err(io::Error::from)
    }
    fn ready_chunk(&mut self) -> Option<Bytes> {
        self.try_read_ready()
    }
}

impl ChunkWrite for StreamWriter {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        StreamWriter::poll_write_all(self, cx, chunk).map_err(io::Error::from)
    }
    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish_now().map_err(io::Error::from))
    }
    fn abort(&mut self, code: tether_proto::ResetCode, reason: &str) {
        self.reset(code, reason);
    }
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        StreamWriter::poll_reset(self, cx).map(io::Error::from)
    }
}

/// A TCP connection's halves for a splice: a [`SocketReader`] and a
/// [`SocketWriter`].
pub fn socket_halves(tcp: TcpStream) -> (SocketReader, SocketWriter) {
    let (r, w) = tcp.into_split();
    (SocketReader::new(r), SocketWriter(Some(w)))
}

/// A socket's writing half as a [`ChunkWrite`]: chunks gathered into
/// `writev`, `finish` sends FIN, and `abort` resets the connection.
pub struct SocketWriter(Option<OwnedWriteHalf>);

impl SocketWriter {
    /// The write half, or the error a write after an abort gets.
    fn half(&mut self) -> io::Result<&mut OwnedWriteHalf> {
        self.0.as_mut().ok_or_else(|| {
            io::Error::new(io::ErrorKind::BrokenPipe, "connection reset by the relay")
        })
    }
}

/// A socket's reading half as a [`ChunkRead`]. It reads
/// [`SOCKET_READ_CHUNK`] at a time, and [`BULK_READ_CHUNK`] while the reads
/// keep coming back full: in a bulk transfer half as many reads carry the
/// same bytes, and on loopback each read that opens the receive window also
/// sends an ACK whose processing, and the sender's next segments, the
/// reader's CPU pays for. (One stream through a server listener: the
/// server's CPU per byte fell by about 8 %. Reads of 256 KiB were worse
/// than 64 KiB for one stream: one chunk then fills a stream's whole send
/// buffer, and reading and sending no longer overlap.) A read that comes
/// back smaller than a normal one ends the bulk mode, so that the copy a
/// short read's chunk gets ([`crate::chunk`]) stays small.
///
/// A new reader starts there: while reads come back small (requests,
/// answers, keystrokes: under `SMALL_READ`, 4 KiB), a read goes into the
/// thread's scratch buffer and its
/// bytes are copied into a chunk of their own: a small chunk is copied out
/// of its buffer anyway, and a fresh buffer per message would cost an
/// allocation of [`SOCKET_READ_CHUNK`] and its release on top.
pub struct SocketReader {
    half: OwnedReadHalf,
    mode: ReadMode,
}

/// How big the next read of a [`SocketReader`] is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// The last read was under [`SMALL_READ`]: read into the thread's
    /// scratch buffer ([`crate::scratch`]).
    Small,
    /// Read into a fresh buffer of [`SOCKET_READ_CHUNK`].
    Normal,
    /// The last read filled [`SOCKET_READ_CHUNK`]: a fresh [`BULK_READ_CHUNK`].
    Bulk,
}

impl ReadMode {
    /// The mode after a read of `n` bytes.
    fn after(n: usize) -> ReadMode {
        if n >= SOCKET_READ_CHUNK {
            ReadMode::Bulk
        } else if n < SMALL_READ {
            ReadMode::Small
        } else {
            ReadMode::Normal
        }
    }
}

/// Reads shorter than this keep a [`SocketReader`] reading into the
/// thread's scratch buffer. Small messages; reads up to a quarter of
/// [`SOCKET_READ_CHUNK`] are copied out too ([`unpinned`]), but taking them
/// through the scratch buffer as well sends more of a bulk transfer's reads
/// through a copy (each after a short read), and measured slower: 2-hop
/// down 11.2 -> 10.7 Gbit/s, 3-hop 7.7 -> 7.5 (3 alternating rounds).
const SMALL_READ: usize = 4 * 1024;

impl SocketReader {
    /// Wraps a socket's reading half.
    pub fn new(half: OwnedReadHalf) -> Self {
        SocketReader {
            half,
            mode: ReadMode::Small,
        }
    }

    /// A read into the thread's scratch buffer, copied out.
    fn poll_read_small(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        with_scratch(|scratch| {
            let mut buf = tokio::io::ReadBuf::new(scratch);
            ready!(Pin::new(&mut self.half).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(None));
            }
            self.mode = ReadMode::after(n);
            Poll::Ready(Ok(Some(Bytes::copy_from_slice(buf.filled()))))
        })
    }
}

impl ChunkRead for SocketReader {
    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        // Wait for readiness first, so that an idle socket holds no buffer.
        ready!(self.half.as_ref().poll_read_ready(cx))?;
        // Read through `AsyncRead`, not `try_read_buf`: a read that leaves
        // room in the buffer has drained the socket, and tokio's `poll_read`
        // then clears the readiness, so the next chunk waits for epoll
        // instead of spending a `recvfrom` on EAGAIN (one per small message).
        // If the readiness was stale, the buffer is dropped with the Pending.
        let size = match self.mode {
            ReadMode::Small => return self.poll_read_small(cx),
            ReadMode::Normal => SOCKET_READ_CHUNK,
            ReadMode::Bulk => BULK_READ_CHUNK,
        };
        let mut buf = BytesMut::with_capacity(size);
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.half),
            cx,
            &mut buf
        ))? {
            0 => Poll::Ready(Ok(None)),
            n => {
                self.mode = ReadMode::after(n);
                // A short read's chunk must not keep the whole buffer alive
                // in the queues it goes through (see crate::chunk).
                Poll::Ready(Ok(Some(unpinned(buf.freeze(), size))))
            }
        }
    }
}

impl ChunkWrite for SocketWriter {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        poll_write_all(Pin::new(self.half()?), cx, chunk)
    }
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.half()?).poll_shutdown(cx)
    }
    fn gathers(&self) -> bool {
        true
    }
    /// Resets the connection: `SO_LINGER` of zero makes the close send RST
    /// and drop what is still unsent, and the half is forgotten so that
    /// dropping it sends no FIN first (the socket closes with the read
    /// half, when the splice ends).
    fn abort(&mut self, _code: tether_proto::ResetCode, _reason: &str) {
        if let Some(half) = self.0.take() {
            // Best effort: if it fails the peer sees a FIN, as before.
            let _ =
                socket2::SockRef::from(half.as_ref()).set_linger(Some(std::time::Duration::ZERO));
            half.forget();
        }
    }
    fn poll_write_gather(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut Bytes,
        more: &mut Vec<Bytes>,
    ) -> Poll<io::Result<()>> {
        let half = self.half()?;
        while first.is_empty() && !more.is_empty() {
            *first = more.remove(0);
        }
        while !first.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_GATHER_CHUNKS];
            slices[0] = IoSlice::new(first);
            let mut n = 1;
            for (slot, b) in slices[1..].iter_mut().zip(more.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            let mut written =
                match ready!(Pin::new(&mut *half).poll_write_vectored(cx, &slices[..n]))? {
                    0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    w => w,
                };
            // Advance over what went out: whole chunks, then part of one.
            loop {
                let k = written.min(first.len());
                first.advance(k);
                written -= k;
                if !first.is_empty() || more.is_empty() {
                    break;
                }
                *first = more.remove(0);
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Any [`AsyncRead`] as a [`ChunkRead`] (e.g. a TLS stream's read half).
///
/// An `AsyncRead` needs a buffer to learn whether bytes are ready, so this
/// one holds a buffer while it waits (unlike a bare socket's read half).
pub struct IoReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R> IoReader<R> {
    /// Wraps `io`.
    pub fn new(io: R) -> Self {
        IoReader {
            io,
            buf: BytesMut::new(),
        }
    }
}

/// Any [`AsyncWrite`] as a [`ChunkWrite`]; each chunk is flushed, and
/// `finish` shuts the writer down.
pub struct IoWriter<W>(pub W);

impl<R: AsyncRead + Unpin + Send> ChunkRead for IoReader<R> {
    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if self.buf.capacity() == 0 {
            self.buf.reserve(SOCKET_READ_CHUNK);
        }
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))? {
            0 => Poll::Ready(Ok(None)),
            _ => {
                let chunk = std::mem::take(&mut self.buf).freeze();
                Poll::Ready(Ok(Some(unpinned(chunk, SOCKET_READ_CHUNK))))
            }
        }
    }
}

impl<W: AsyncWrite + Unpin + Send> ChunkWrite for IoWriter<W> {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        ready!(poll_write_all(Pin::new(&mut self.0), cx, chunk))?;
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Writes all of `chunk` to `w`, advancing it as bytes go out.
fn poll_write_all<W: AsyncWrite + ?Sized>(
    mut w: Pin<&mut W>,
    cx: &mut Context<'_>,
    chunk: &mut Bytes,
) -> Poll<io::Result<()>> {
    while !chunk.is_empty() {
        match ready!(w.as_mut().poll_write(cx, chunk))? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            n => chunk.advance(n),
        }
    }
    Poll::Ready(Ok(()))
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

/// Where one direction of a splice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading chunks and writing them on.
    Copying,
    /// The source ended: finishing the destination.
    Finishing,
    /// Finished (or failed).
    Done,
}

/// One direction: chunks from `r` written to `w`.
struct OneWay<R, W> {
    r: R,
    w: W,
    /// The chunk read and not yet (wholly) written.
    chunk: Bytes,
    /// A write has begun and its writer has not said ready: its bytes may
    /// sit in the writer's buffer (TLS records) until its flush is done,
    /// even after `chunk` is empty.
    writing: bool,
    /// Chunks read after `chunk` for one gathered write: `None` unless the
    /// writer gathers and more had arrived (boxed: every idle splice holds
    /// this field, in every process a connection crosses).
    #[allow(
        clippy::box_collection,
        reason = "8 bytes in every idle splice instead of a Vec's 24; allocated only to gather"
    )]
    more: Option<Box<Vec<Bytes>>>,
    phase: Phase,
    count: u64,
}

impl<R: ChunkRead, W: ChunkWrite> OneWay<R, W> {
    fn new(r: R, w: W) -> Self {
        OneWay {
            r,
            w,
            chunk: Bytes::new(),
            writing: false,
            more: None,
            phase: Phase::Copying,
            count: 0,
        }
    }

    /// Copies until the source's EOF has been passed on, or an error.
    fn poll_copy(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.phase {
                Phase::Copying if self.writing => {
                    match &mut self.more {
                        None => ready!(self.w.poll_write_chunk(cx, &mut self.chunk))?,
                        Some(more) => {
                            ready!(self.w.poll_write_gather(cx, &mut self.chunk, more))?;
                            // Written: an idle direction keeps no allocation.
                            self.more = None;
                        }
                    }
                    self.writing = false;
                }
                Phase::Copying => match ready!(self.r.poll_next_chunk(cx))? {
                    // (An empty chunk, say an empty DATA frame, is skipped:
                    // `chunk` stays empty and the next one is read.)
                    Some(chunk) => {
                        self.count += chunk.len() as u64;
                        self.chunk = chunk;
                        self.writing = !self.chunk.is_empty();
                        if self.w.gathers() && self.writing {
                            self.gather();
                        }
                    }
                    None => self.phase = Phase::Finishing,
                },
                Phase::Finishing => {
                    ready!(self.w.poll_finish(cx))?;
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Takes what else the source has ready (within the gather limits) to
    /// go out with `chunk` in one write.
    fn gather(&mut self) {
        let (mut chunks, mut bytes) = (1, self.chunk.len());
        while chunks < MAX_GATHER_CHUNKS && bytes < MAX_GATHER_BYTES {
            let Some(next) = self.r.ready_chunk() else {
                break;
            };
            bytes += next.len();
            self.count += next.len() as u64;
            if !next.is_empty() {
                self.more.get_or_insert_with(Box::default).push(next);
                chunks += 1;
            }
        }
    }

    /// Polls unless done: `Ok(true)` once done, `Ok(false)` while
    /// copying; an error ends the direction.
    fn poll_done(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        if self.phase == Phase::Done {
            return Ok(true);
        }
        let Poll::Ready(r) = self.poll_copy(cx) else {
            return Ok(false);
        };
        self.phase = Phase::Done;
        r.map(|()| true)
    }

    /// Whether its source is not being read: past its end (finishing or
    /// done: a stream reader that has had FIN reports nothing more), or
    /// busy writing.
    fn not_reading(&self) -> bool {
        self.phase != Phase::Copying || self.writing
    }

    /// The destination's reset, while this direction writes nothing to it
    /// (a write in progress fails with it by itself). Without this, a
    /// reset arriving while neither direction reads the stream (the client
    /// finished sending and the service is silent, or the service stopped
    /// reading) went unnoticed: the service's connection, and the task,
    /// stayed until the service next wrote.
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.writing {
            return None;
        }
        match self.w.poll_reset(cx) {
            Poll::Ready(e) => Some(e),
            Poll::Pending => None,
        }
    }
}

/// The RST a failed splice passes on: a peer's reset keeps its code and
/// reason across the relay; a reset this side's session decided (it was
/// lost, or drained past its deadline) is `upstream` to the far side; any
/// other failure (a socket's) is `io_error`.
fn failure_reset(e: &io::Error) -> (tether_proto::ResetCode, String) {
    match StreamError::from_io(e) {
        Some(StreamError::Reset {
            code,
            reason,
            remote: true,
        }) => (*code, reason.clone()),
        Some(local @ StreamError::Reset { .. }) => {
            (tether_proto::ResetCode::Upstream, local.to_string())
        }
        _ => (tether_proto::ResetCode::IoError, e.to_string()),
    }
}

pin_project_lite::pin_project! {
    /// A running splice (see [`splice_until`]): resolves to its report.
    #[must_use = "a splice does nothing unless polled"]
    pub struct Splice<AR, AW, BR, BW, S> {
        a_to_b: Option<OneWay<AR, BW>>,
        b_to_a: Option<OneWay<BR, AW>>,
        #[pin]
        stop: S,
    }
}

/// Copies `a_read → b_write` and `b_read → a_write` until both directions
/// reached EOF, or either failed. The endpoints are dropped on return (which
/// resets an unfinished tunnel stream and closes sockets).
pub fn splice<AR, AW, BR, BW>(
    a_read: AR,
    a_write: AW,
    b_read: BR,
    b_write: BW,
) -> Splice<AR, AW, BR, BW, std::future::Pending<(tether_proto::ResetCode, String)>>
where
    AR: ChunkRead,
    AW: ChunkWrite,
    BR: ChunkRead,
    BW: ChunkWrite,
{
    splice_until(a_read, a_write, b_read, b_write, std::future::pending())
}

/// Like [`splice`], but when `stop` resolves first both sides are aborted
/// with its code and reason (e.g. RST `forbidden` when access is revoked).
pub fn splice_until<AR, AW, BR, BW, S>(
    a_read: AR,
    a_write: AW,
    b_read: BR,
    b_write: BW,
    stop: S,
) -> Splice<AR, AW, BR, BW, S>
where
    AR: ChunkRead,
    AW: ChunkWrite,
    BR: ChunkRead,
    BW: ChunkWrite,
    S: Future<Output = (tether_proto::ResetCode, String)>,
{
    Splice {
        a_to_b: Some(OneWay::new(a_read, b_write)),
        b_to_a: Some(OneWay::new(b_read, a_write)),
        stop,
    }
}

impl<AR, AW, BR, BW, S> Future for Splice<AR, AW, BR, BW, S>
where
    AR: ChunkRead,
    AW: ChunkWrite,
    BR: ChunkRead,
    BW: ChunkWrite,
    S: Future<Output = (tether_proto::ResetCode, String)>,
{
    type Output = SpliceReport;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SpliceReport> {
        let this = self.project();
        let (Some(up), Some(down)) = (this.a_to_b.as_mut(), this.b_to_a.as_mut()) else {
            panic!("Splice polled after it finished");
        };
        // The first error ends both directions (`down` is not polled after
        // `up` failed); `stop` matters only while one is still copying.
        let both_done = up
            .poll_done(cx)
            .and_then(|up_done| Ok(down.poll_done(cx)? && up_done));
        // A failure or a stop aborts both destinations (see the module doc).
        let (error, abort) = match both_done {
            Ok(true) => (None, None),
            Err(e) => {
                let abort = failure_reset(&e);
                (Some(e), Some(abort))
            }
            Ok(false) => {
                // A direction's destination is the other direction's
                // source: while that one reads it, a reset reaches it there.
                // Only while it does not (past its end, or busy writing)
                // is the reset looked for here, so a relay in full flow
                // pays nothing for this.
                let reset = down
                    .not_reading()
                    .then(|| up.poll_reset(cx))
                    .flatten()
                    .or_else(|| up.not_reading().then(|| down.poll_reset(cx)).flatten());
                if let Some(e) = reset {
                    let abort = failure_reset(&e);
                    (Some(e), Some(abort))
                } else {
                    let (code, reason) = ready!(this.stop.poll(cx));
                    let e = io::Error::new(io::ErrorKind::PermissionDenied, reason.clone());
                    (Some(e), Some((code, reason)))
                }
            }
        };
        if let Some((code, reason)) = abort {
            up.w.abort(code, &reason);
            down.w.abort(code, &reason);
        }
        let report = SpliceReport {
            a_to_b: up.count,
            b_to_a: down.count,
            error,
        };
        // Dropping the endpoints now resets an unfinished stream and closes
        // the sockets, before the caller logs the end.
        *this.a_to_b = None;
        *this.b_to_a = None;
        Poll::Ready(report)
    }
}
