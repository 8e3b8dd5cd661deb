//! The tokio side of a tether session's WebSocket: [`WsSink`] writes each
//! message as one frame, header and payload in one vectored write (a batch
//! of messages, every frame in one write);
//! [`WsSource`] reads into uninitialised buffer space and hands up payloads
//! sliced out of it. The framing rules are in [`super::frame`].

use bytes::{Buf, Bytes, BytesMut};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::frame::{self, Decoder, Event, Role, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_PONG};
use crate::transport::{MessageSink, MessageSource, MAX_RECV_MESSAGE, MAX_SHARED_READ_BUFFER};

/// Room made in the read buffer before each read (more when the frame in
/// progress needs it). Idle sessions keep this much; the pages the kernel
/// never wrote to cost no memory.
const READ_ROOM: usize = 32 * 1024;
const _: () = assert!(READ_ROOM <= MAX_SHARED_READ_BUFFER);

/// Least room an allocation that no message refers to any more must offer
/// to be reused; else a fresh one.
const MIN_READ: usize = 4 * 1024;

/// How long closing may take (writing the close frame, shutting down).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a pong's write may wait for the socket: as long as the session
/// lets any write take before it judges the peer gone. Without a
/// bound, the pong's task would hold the write half, and so the socket,
/// open after the session ended, for as long as the peer's kernel keeps
/// answering with a zero window.
const PONG_TIMEOUT: Duration = Duration::from_secs(30);

/// The writing half, shared: the sink writes messages, the source answers
/// pings.
struct Writer<S> {
    io: tokio::sync::Mutex<WriteHalf<S>>,
    /// A client's, unless both ends agreed on
    /// [`super::UNMASKED_EXTENSION`].
    masks: bool,
    /// The payload of the latest ping not answered yet. One slot, so a peer
    /// that floods pings and never reads holds one pong here, not one task
    /// per ping (RFC 6455 lets an endpoint answer only the latest ping).
    pending_pong: std::sync::Mutex<Option<Bytes>>,
    /// A write was given up part way through a frame (its future dropped
    /// by a timeout): the peer's framing would be broken by any further
    /// bytes, so none are written but the shutdown.
    broken: AtomicBool,
    /// Our close frame is written or being written: no pong may follow it.
    closing: AtomicBool,
}

impl<S: AsyncWrite> Writer<S> {
    /// A fresh random mask for a client's frame; none for a server's.
    fn mask(&self) -> Option<[u8; 4]> {
        self.masks.then(rand::random)
    }
}

/// Marks its writer [`Writer::broken`] unless [`WriteGuard::done`] is
/// called: held across every frame write, so a write future dropped mid-frame
/// leaves the writer refusing more bytes.
struct WriteGuard<'a>(&'a AtomicBool);

impl<'a> WriteGuard<'a> {
    /// Refuses to start when an earlier write was given up mid-frame.
    fn start(broken: &'a AtomicBool) -> io::Result<Self> {
        if broken.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier WebSocket write was cut off mid-frame",
            ));
        }
        Ok(WriteGuard(broken))
    }

    /// Passes the write's result through, the frame written whole or not
    /// at all (an error from the socket ends the session anyway).
    fn done<T>(self, r: io::Result<T>) -> io::Result<T> {
        std::mem::forget(self);
        r
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs one write under a [`WriteGuard`]: refused after a write was cut off
/// mid-frame, and marking the writer broken when this one is (its future
/// dropped before `write` finished).
async fn guarded(
    broken: &AtomicBool,
    write: impl std::future::Future<Output = io::Result<()>>,
) -> io::Result<()> {
    let guard = WriteGuard::start(broken)?;
    guard.done(write.await)
}

/// Writes `a` then `b` and flushes (TLS holds records until then).
async fn write_flushed<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    write_two(w, a, b).await?;
    w.flush().await
}

/// Writes `a` then `b`, as one vectored write when the socket takes it.
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut b = b;
    while !a.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    w.write_all(b).await
}

/// A message's parts as one [`Buf`], so that a vectored write takes as many
/// as it can at once (and resumes mid-part after a short write).
struct PartList {
    /// None of them empty; `parts[next..]` are still to write.
    parts: Vec<Bytes>,
    next: usize,
    remaining: usize,
}

impl PartList {
    fn new(mut parts: Vec<Bytes>) -> Self {
        parts.retain(|p| !p.is_empty());
        let remaining = parts.iter().map(Bytes::len).sum();
        PartList {
            parts,
            next: 0,
            remaining,
        }
    }
}

impl Buf for PartList {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.get(self.next).map_or(&[], |p| &p[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts[self.next..]) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advanced past the end");
        self.remaining -= cnt;
        while cnt > 0 {
            let part = &mut self.parts[self.next];
            if cnt < part.len() {
                part.advance(cnt);
                return;
            }
            cnt -= part.len();
            self.next += 1;
        }
    }
}

/// The sending half of a session's WebSocket.
pub struct WsSink<S> {
    writer: Arc<Writer<S>>,
    /// A client's masked copy of the frames it is sending, headers
    /// included (RFC 6455 section 5.3: a client masks every byte), kept for
    /// the next write.
    masked: Vec<u8>,
    /// When the last message larger than [`KEEP_MASKED`] went out.
    masked_large_at: tokio::time::Instant,
}

/// The receiving half of a session's WebSocket.
pub struct WsSource<S> {
    io: ReadHalf<S>,
    buf: BytesMut,
    /// Size of the allocation `buf` is in.
    allocated: usize,
    /// Room to make before reading the next frame's first bytes: the size of
    /// the frame just read when it was larger than [`READ_ROOM`], up to
    /// [`MAX_SHARED_READ_BUFFER`] (a bulk transfer's next frame is likely as
    /// large, and is then read straight into a buffer of its size instead of
    /// being copied out of a [`READ_ROOM`] one), else nothing beyond the
    /// header. A small message after a large one resets it, so an idle
    /// session's next read is into [`READ_ROOM`] again.
    expected: usize,
    decoder: Decoder,
    writer: Arc<Writer<S>>,
}

/// Splits an established WebSocket connection (the handshake done) into
/// transport halves. `unmasked`: both ends agreed on
/// [`super::UNMASKED_EXTENSION`], so the client's frames go unmasked (a
/// pass over every byte less on both ends). `read_ahead` is whatever was
/// read past the handshake.
pub fn from_io<S>(io: S, role: Role, unmasked: bool, read_ahead: Bytes) -> (WsSink<S>, WsSource<S>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    let writer = Arc::new(Writer {
        io: tokio::sync::Mutex::new(w),
        masks: role == Role::Client && !unmasked,
        pending_pong: std::sync::Mutex::new(None),
        broken: AtomicBool::new(false),
        closing: AtomicBool::new(false),
    });
    let allocated = READ_ROOM.max(read_ahead.len());
    let mut buf = BytesMut::with_capacity(allocated);
    buf.extend_from_slice(&read_ahead);
    (
        WsSink {
            writer: writer.clone(),
            masked: Vec::new(),
            masked_large_at: tokio::time::Instant::now(),
        },
        WsSource {
            io: r,
            buf,
            allocated,
            expected: 0,
            decoder: Decoder::new(role, MAX_RECV_MESSAGE).unmasked_client(unmasked),
            writer,
        },
    )
}

/// A kept masking buffer larger than this is let go once no message of
/// that size went out for [`MASKED_IDLE`]: a bulk transfer is over, and an
/// idle client keeps no message-sized buffer for its heartbeats. (Letting
/// go at the first small message would make a transfer with window updates
/// between its messages allocate and zero a buffer for every message.)
const KEEP_MASKED: usize = 16 * 1024;
const MASKED_IDLE: Duration = Duration::from_secs(1);

impl<S> WsSink<S> {
    /// Makes `self.masked` at least `len` bytes long, after letting a large
    /// buffer go once nothing larger than [`KEEP_MASKED`] went out for
    /// [`MASKED_IDLE`].
    fn masked_room(&mut self, len: usize) {
        let now = tokio::time::Instant::now();
        if len > KEEP_MASKED {
            self.masked_large_at = now;
        } else if self.masked.capacity() > KEEP_MASKED
            && now.saturating_duration_since(self.masked_large_at) >= MASKED_IDLE
        {
            self.masked = Vec::new();
        }
        if self.masked.len() < len {
            self.masked.reserve_exact(len - self.masked.len());
            self.masked.resize(len, 0);
        }
    }

    /// Writes `messages` into `self.masked` as binary frames, each with its
    /// header and masked with a fresh key on the way (one pass over the
    /// bytes, the stream's chunks left untouched), and returns how many
    /// bytes of it they fill.
    fn mask_messages(&mut self, messages: &[Vec<Bytes>]) -> usize {
        let bound = messages
            .iter()
            .map(|parts| MAX_HEADER + parts.iter().map(Bytes::len).sum::<usize>())
            .sum();
        self.masked_room(bound);
        let mut at = 0;
        for parts in messages {
            let key = rand::random();
            let len = parts.iter().map(Bytes::len).sum();
            let mut header = [0u8; MAX_HEADER];
            let n = frame::encode_header(OP_BINARY, len, Some(key), &mut header);
            self.masked[at..at + n].copy_from_slice(&header[..n]);
            at += n;
            let mut phase = 0;
            for part in parts {
                let end = at + part.len();
                frame::copy_masked(&mut self.masked[at..end], part, key, phase);
                phase += part.len();
                at = end;
            }
        }
        at
    }

    /// Writes the first `len` bytes of `self.masked`.
    async fn write_masked(&self, len: usize) -> io::Result<()>
    where
        S: AsyncWrite,
    {
        let mut io = self.writer.io.lock().await;
        guarded(
            &self.writer.broken,
            write_flushed(&mut *io, &self.masked[..len], &[]),
        )
        .await
    }
}

impl<S> MessageSink for WsSink<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    async fn send(&mut self, msg: Bytes) -> io::Result<()> {
        self.send_parts(vec![msg]).await
    }

    async fn send_parts(&mut self, parts: Vec<Bytes>) -> io::Result<()> {
        if self.writer.masks {
            let len = self.mask_messages(std::slice::from_ref(&parts));
            return self.write_masked(len).await;
        }
        let mut header = [0u8; MAX_HEADER];
        let parts = PartList::new(parts);
        let n = frame::encode_header(OP_BINARY, parts.remaining(), None, &mut header);
        let mut io = self.writer.io.lock().await;
        guarded(&self.writer.broken, async {
            io.write_all_buf(&mut Buf::chain(&header[..n], parts))
                .await?;
            io.flush().await
        })
        .await
    }

    async fn send_batch(&mut self, messages: &mut Vec<Vec<Bytes>>) -> io::Result<()> {
        if messages.len() == 1 {
            return self.send_parts(messages.pop().unwrap_or_default()).await;
        }
        if self.writer.masks {
            let len = self.mask_messages(messages);
            messages.clear();
            return self.write_masked(len).await;
        }
        // The headers share one small allocation; every message's parts
        // follow its header in one vectored write.
        let mut headers = BytesMut::with_capacity(MAX_HEADER * messages.len());
        let mut list = Vec::with_capacity(messages.iter().map(|m| m.len() + 1).sum());
        for parts in messages.drain(..) {
            let len = parts.iter().map(Bytes::len).sum();
            let mut header = [0u8; MAX_HEADER];
            let n = frame::encode_header(OP_BINARY, len, None, &mut header);
            headers.extend_from_slice(&header[..n]);
            list.push(headers.split().freeze());
            list.extend(parts);
        }
        let mut io = self.writer.io.lock().await;
        guarded(&self.writer.broken, async {
            io.write_all_buf(&mut PartList::new(list)).await?;
            io.flush().await
        })
        .await
    }

    fn takes_parts(&self) -> bool {
        true
    }

    async fn close(&mut self, reason: &str) {
        self.writer.closing.store(true, Ordering::Release);
        let close = frame::control_frame(
            OP_CLOSE,
            &frame::close_payload(1000, reason),
            self.writer.mask(),
        );
        // One lock for both, so no pong lands between the close frame and
        // the shutdown; after a write cut off mid-frame, only the shutdown.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let mut io = self.writer.io.lock().await;
            let _ = guarded(&self.writer.broken, write_flushed(&mut *io, &close, &[])).await;
            let _ = io.shutdown().await;
        })
        .await;
    }
}

impl<S> MessageSource for WsSource<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            while let Some(event) = self.decoder.decode(&mut self.buf)? {
                match event {
                    Event::Binary(msg) => {
                        // Within MAX_SHARED_READ_BUFFER: a small message
                        // read into this room must not be in a larger buffer.
                        self.expected = if msg.len() > READ_ROOM {
                            (msg.len() + MAX_HEADER).min(MAX_SHARED_READ_BUFFER)
                        } else {
                            0
                        };
                        return Ok(Some(msg));
                    }
                    Event::Ping(payload) => self.answer_ping(payload),
                    Event::Pong => {}
                    Event::Close(..) => return Ok(None),
                }
            }
            // Keep reading into the current allocation while the rest of
            // the frame fits: payloads handed up still point into it, so
            // asking for a full READ_ROOM every time would allocate anew for
            // every message. (A buffer sized to a large frame has exactly
            // the rest of that frame as room: a trickle of it is read in
            // place, not copied into a new buffer per read.)
            let wanted = if self.buf.is_empty() && self.expected > 0 {
                // Nothing of the next frame read yet: room for what the
                // last one was, when that was large.
                self.expected
            } else {
                self.decoder.wanted(&self.buf)
            };
            if self.buf.capacity() - self.buf.len() < wanted {
                self.make_room(wanted);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed without a WebSocket close frame",
                ));
            }
        }
    }
}

impl<S> WsSource<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    /// Makes room for the `wanted` rest of the frame in progress (more when
    /// the frame is small). Every message stays a slice of the buffer it was
    /// read into and keeps all of it alive, so the buffer is sized to what
    /// comes: the frame alone when it is larger than [`READ_ROOM`], else
    /// [`READ_ROOM`] shared by the messages that follow. The allocation is
    /// reused only when no message refers to it any more and it is not far
    /// larger than that; never grown in place, which could leave small
    /// messages in a buffer sized for a large one
    /// ([`MAX_SHARED_READ_BUFFER`]).
    fn make_room(&mut self, wanted: usize) {
        let size = self.buf.len().saturating_add(wanted).max(READ_ROOM);
        if self.allocated <= size.max(MAX_SHARED_READ_BUFFER)
            && self.buf.try_reclaim(wanted.max(MIN_READ))
        {
            return;
        }
        let mut fresh = BytesMut::with_capacity(size);
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
        self.allocated = size;
    }

    /// Answers a ping from a task of its own: a write can wait for the
    /// peer to read, and the peer may be waiting for us to read. While a
    /// pong is still waiting, a newer ping only replaces its payload. No
    /// pong follows our close frame, and none waits longer than
    /// [`PONG_TIMEOUT`].
    fn answer_ping(&self, payload: Bytes) {
        if self.writer.closing.load(Ordering::Acquire) {
            return;
        }
        let was_idle = {
            let mut slot = lock(&self.writer.pending_pong);
            slot.replace(payload).is_none()
        };
        if !was_idle {
            return;
        }
        let writer = self.writer.clone();
        tokio::spawn(async move {
            // The wait for the lock needs no bound of its own: the
            // session's writes and its close hold it only within theirs.
            let mut io = writer.io.lock().await;
            let Some(payload) = lock(&writer.pending_pong).take() else {
                return;
            };
            if writer.closing.load(Ordering::Acquire) {
                return;
            }
            let pong = frame::control_frame(OP_PONG, &payload, writer.mask());
            // Given up on by the timeout: the writer is broken.
            let write = guarded(&writer.broken, write_flushed(&mut *io, &pong, &[]));
            let _ = tokio::time::timeout(PONG_TIMEOUT, write).await;
        });
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ws::frame::{OP_PING, OP_TEXT};

    /// A server end over one side of an in-memory pipe, and the raw other side.
    fn server_and_raw() -> (
        WsSink<tokio::io::DuplexStream>,
        WsSource<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (sink, source) = from_io(a, Role::Server, false, Bytes::new());
        (sink, source, b)
    }

    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [9, 8, 7, 6];
        let mut h = [0u8; MAX_HEADER];
        let n = frame::encode_header(opcode, payload.len(), Some(key), &mut h);
        let mut p = payload.to_vec();
        frame::apply_mask(&mut p, key);
        [&h[..n], &p[..]].concat()
    }

    #[tokio::test]
    async fn a_client_and_a_server_exchange_messages_of_every_size() {
        // Masked as RFC 6455 has it, and unmasked as both ends may agree.
        for unmasked in [false, true] {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let (mut ctx, mut crx) = from_io(a, Role::Client, unmasked, Bytes::new());
            let (mut stx, mut srx) = from_io(b, Role::Server, unmasked, Bytes::new());
            let sizes = [0usize, 1, 125, 126, 65535, 65536, 300_000];
            let send = async {
                for &n in &sizes {
                    ctx.send(Bytes::from(vec![n as u8; n])).await.unwrap();
                    stx.send(Bytes::from(vec![!(n as u8); n])).await.unwrap();
                }
                ctx.send_batch(&mut vec![
                    vec![Bytes::from_static(b"a")],
                    vec![Bytes::from_static(b"b")],
                ])
                .await
                .unwrap();
            };
            let recv = async {
                for &n in &sizes {
                    assert_eq!(srx.recv().await.unwrap().unwrap(), vec![n as u8; n]);
                    assert_eq!(crx.recv().await.unwrap().unwrap(), vec![!(n as u8); n]);
                }
                assert_eq!(srx.recv().await.unwrap().unwrap(), "a");
                assert_eq!(srx.recv().await.unwrap().unwrap(), "b");
            };
            tokio::join!(send, recv);
            ctx.close("done").await;
            assert_eq!(srx.recv().await.unwrap(), None, "a close frame ends it");
        }
    }

    #[tokio::test]
    async fn an_agreed_client_sends_unmasked_frames_that_only_an_agreeing_server_takes() {
        // On the wire: the mask bit clear and the payload as it is.
        let (a, mut raw) = tokio::io::duplex(1024);
        let (mut sink, _source) = from_io(a, Role::Client, true, Bytes::new());
        sink.send(Bytes::from_static(b"plain")).await.unwrap();
        let mut wire = [0u8; 7];
        raw.read_exact(&mut wire).await.unwrap();
        assert_eq!(wire, [0x82, 5, b'p', b'l', b'a', b'i', b'n']);

        for agreed in [true, false] {
            let (a, b) = tokio::io::duplex(1024);
            let (mut ctx, _crx) = from_io(a, Role::Client, true, Bytes::new());
            let (_stx, mut srx) = from_io(b, Role::Server, agreed, Bytes::new());
            ctx.send(Bytes::from_static(b"x")).await.unwrap();
            if agreed {
                assert_eq!(srx.recv().await.unwrap().unwrap(), "x");
            } else {
                let e = srx.recv().await.unwrap_err();
                assert!(e.to_string().contains("unmasked"), "{e}");
            }
        }
        // An agreeing server still takes a masking client's frames.
        let (a, b) = tokio::io::duplex(1024);
        let (mut ctx, _crx) = from_io(a, Role::Client, false, Bytes::new());
        let (_stx, mut srx) = from_io(b, Role::Server, true, Bytes::new());
        ctx.send(Bytes::from_static(b"masked")).await.unwrap();
        assert_eq!(srx.recv().await.unwrap().unwrap(), "masked");
    }

    #[tokio::test]
    async fn a_message_in_parts_arrives_whole_through_short_writes() {
        // A 4 KiB pipe: every vectored write is cut short, often mid-part;
        // 150 parts are more than one write takes at once.
        let (a, b) = tokio::io::duplex(4096);
        let (mut stx, mut srx) = from_io(a, Role::Server, false, Bytes::new());
        let (mut ctx, mut crx) = from_io(b, Role::Client, false, Bytes::new());
        let parts: Vec<Bytes> = (0..150usize)
            .map(|i| {
                Bytes::from(
                    (0..(i * 37) % 5000)
                        .map(|j| (i + j) as u8)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let whole = parts.concat();
        assert!(stx.takes_parts() && ctx.takes_parts());
        let send = async {
            stx.send_parts(parts.clone()).await.unwrap();
            ctx.send_parts(parts).await.unwrap(); // masked into one buffer
        };
        let recv = async {
            assert_eq!(crx.recv().await.unwrap().unwrap(), whole);
            assert_eq!(srx.recv().await.unwrap().unwrap(), whole);
        };
        tokio::join!(send, recv);
    }

    #[tokio::test]
    async fn a_batch_arrives_as_its_messages_each_whole_and_in_order() {
        // Sizes around the WebSocket header's length forms (125/126,
        // 65 535/65 536), a message given as many parts, and one as none;
        // a small pipe cuts every write short.
        let (a, b) = tokio::io::duplex(8192);
        let (mut stx, mut srx) = from_io(a, Role::Server, false, Bytes::new());
        let (mut ctx, mut crx) = from_io(b, Role::Client, false, Bytes::new());
        let message = |n: usize, seed: usize| -> Vec<Bytes> {
            let bytes: Vec<u8> = (0..n).map(|j| (j * 7 + seed) as u8).collect();
            // Parts of 999 bytes: each starts at another phase of the mask.
            bytes.chunks(999).map(Bytes::copy_from_slice).collect()
        };
        let sizes = [125, 126, 65_535, 65_536, 3, 0, 70_000];
        let mut batch: Vec<Vec<Bytes>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| message(n, i))
            .collect();
        let wholes: Vec<Bytes> = batch.iter().map(|m| Bytes::from(m.concat())).collect();
        let send = async {
            stx.send_batch(&mut batch.clone()).await.unwrap();
            ctx.send_batch(&mut batch).await.unwrap(); // masked, a fresh key per message
        };
        let recv = async {
            for whole in &wholes {
                assert_eq!(&crx.recv().await.unwrap().unwrap(), whole);
            }
            for whole in &wholes {
                assert_eq!(&srx.recv().await.unwrap().unwrap(), whole);
            }
        };
        tokio::join!(send, recv);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_lets_go_of_its_masking_buffer_once_bulk_is_over() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (mut ctx, _crx) = from_io(a, Role::Client, false, Bytes::new());
        let (_stx, mut srx) = from_io(b, Role::Server, false, Bytes::new());
        let large = vec![Bytes::from(vec![1u8; 100_001]), Bytes::from(vec![2u8; 3])];
        ctx.send_parts(large.clone()).await.unwrap();
        assert!(ctx.masked.len() >= 100_004, "grown to the message");
        // A window update between two bulk messages: the buffer stays.
        ctx.send(Bytes::from_static(b"update")).await.unwrap();
        assert!(
            ctx.masked.capacity() >= 100_004,
            "kept between bulk messages"
        );
        tokio::time::advance(MASKED_IDLE).await;
        ctx.send(Bytes::from_static(b"ping")).await.unwrap();
        assert!(
            ctx.masked.capacity() <= KEEP_MASKED,
            "an idle client keeps no bulk buffer"
        );
        assert_eq!(srx.recv().await.unwrap().unwrap(), large.concat());
        assert_eq!(srx.recv().await.unwrap().unwrap(), "update");
        assert_eq!(srx.recv().await.unwrap().unwrap(), "ping");
    }

    #[tokio::test]
    async fn a_message_holds_no_buffer_much_bigger_than_itself() {
        // A message is a slice of the buffer it was read into, and keeps
        // that buffer alive as long as any chunk of it lives: after a large
        // message, a small one must not land in a buffer grown to fit it.
        for (before, size) in [
            (300_000, 10),
            (1_000_000, 10),
            (70_000, 5),
            (60_000, 10), // room made for another 60 000 before the read
            (10, 300_000),
            (200_000, 300_000),
        ] {
            let (a, mut raw) = tokio::io::duplex(1 << 21);
            let (sink, mut source) = from_io(a, Role::Server, false, Bytes::new());
            for n in [before, size] {
                raw.write_all(&client_frame(OP_BINARY, &vec![7u8; n]))
                    .await
                    .unwrap();
            }
            assert_eq!(source.recv().await.unwrap().unwrap().len(), before);
            let msg = source.recv().await.unwrap().unwrap();
            drop((sink, source, raw));
            // Nothing else refers to the buffer now: what the message can
            // reach of it is what it keeps alive.
            let held = msg.try_into_mut().expect("the last reference").capacity();
            assert!(
                held <= size.max(MAX_SHARED_READ_BUFFER),
                "after {before} bytes, a {size}-byte message keeps {held} bytes"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_a_large_frame_arriving_in_drips_is_read_in_place() {
        // A buffer sized to a large frame has exactly the rest of the frame
        // as room: each drip is read into it, not copied with everything
        // before it into a new buffer (which a peer could make cost a
        // megabyte of copying per byte it sends).
        let (a, mut raw) = tokio::io::duplex(1 << 20);
        let (_sink, mut source) = from_io(a, Role::Server, false, Bytes::new());
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let frame = client_frame(OP_BINARY, &payload);
        let (most, drips) = frame.split_at(frame.len() - 3000);
        raw.write_all(most).await.unwrap();
        let pending = tokio::time::timeout(Duration::from_millis(10), source.recv()).await;
        assert!(pending.is_err(), "the frame is not complete yet");
        let start = source.buf.as_ptr();
        // Holds the allocation, so that a new buffer cannot reuse its address.
        let _hold = source.buf.split_to(0);
        for byte in &drips[..100] {
            raw.write_all(std::slice::from_ref(byte)).await.unwrap();
            let pending = tokio::time::timeout(Duration::from_millis(10), source.recv()).await;
            assert!(pending.is_err(), "the frame is not complete yet");
            assert_eq!(
                source.buf.as_ptr(),
                start,
                "the frame moved to a new buffer"
            );
        }
        raw.write_all(&drips[100..]).await.unwrap();
        let msg = source.recv().await.unwrap().unwrap();
        assert!(msg == payload[..], "bytes lost or changed");
    }

    #[tokio::test]
    async fn bytes_read_past_the_handshake_come_first() {
        let (a, mut b) = tokio::io::duplex(1024);
        let first = Bytes::from(client_frame(OP_BINARY, b"early"));
        let (_sink, mut source) = from_io(a, Role::Server, false, first);
        b.write_all(&client_frame(OP_BINARY, b"late"))
            .await
            .unwrap();
        assert_eq!(source.recv().await.unwrap().unwrap(), "early");
        assert_eq!(source.recv().await.unwrap().unwrap(), "late");
    }

    #[tokio::test]
    async fn pings_are_answered_with_their_payload() {
        let (_sink, mut source, mut raw) = server_and_raw();
        raw.write_all(&client_frame(OP_PING, b"are you there"))
            .await
            .unwrap();
        raw.write_all(&client_frame(OP_BINARY, b"after"))
            .await
            .unwrap();
        assert_eq!(source.recv().await.unwrap().unwrap(), "after");
        let mut pong = [0u8; 15];
        raw.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong[..2], [0x80 | OP_PONG, 13]);
        assert_eq!(&pong[2..], b"are you there");
    }

    #[tokio::test]
    async fn a_ping_flood_from_a_peer_that_never_reads_holds_one_pong() {
        // A 4 KiB pipe: the pongs stop fitting at once, the peer reads nothing.
        let (a, mut raw) = tokio::io::duplex(4096);
        let (_sink, mut source) = from_io(a, Role::Server, false, Bytes::new());
        let pings: Vec<u8> = (0..5000u32)
            .flat_map(|i| client_frame(OP_PING, &i.to_be_bytes()))
            .collect();
        let last = client_frame(OP_BINARY, b"last");
        let flood = async {
            raw.write_all(&pings).await.unwrap();
            raw.write_all(&last).await.unwrap();
            raw
        };
        let (raw, got) = tokio::join!(flood, source.recv());
        assert_eq!(got.unwrap().unwrap(), "last");
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert!(tasks <= 1, "{tasks} pong tasks alive after 5000 pings");
        drop(raw);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pong_the_peer_never_reads_lets_the_socket_go() {
        // A 64-byte pipe: a 102-byte pong is cut off part way.
        let (a, mut raw) = tokio::io::duplex(64);
        let (sink, mut source) = from_io(a, Role::Server, false, Bytes::new());
        let ping = client_frame(OP_PING, &[7; 100]);
        let (sent, read) = tokio::join!(
            raw.write_all(&ping),
            tokio::time::timeout(Duration::from_secs(1), source.recv())
        );
        sent.unwrap();
        assert!(read.is_err(), "nothing but the ping was sent");
        // The session ends while the pong waits on the socket.
        drop((sink, source));
        tokio::time::sleep(PONG_TIMEOUT + Duration::from_secs(1)).await;
        // The pong's task gave up and let go of the write half: the peer
        // sees the end of the stream, not a pong finished later.
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got)).await;
        assert!(end.is_ok(), "the socket is still held open");
        assert_eq!(got.len(), 64, "the pong's cut-off start, then the end");
    }

    #[tokio::test]
    async fn a_write_cut_off_mid_frame_lets_no_more_frames_out() {
        let (a, mut raw) = tokio::io::duplex(1024);
        let (mut sink, _source) = from_io(a, Role::Server, false, Bytes::new());
        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            sink.send(Bytes::from(vec![1; 4096])),
        )
        .await;
        assert!(cut.is_err(), "the pipe takes 1024 bytes only");
        // Bytes after the cut would land inside the frame's payload.
        let e = sink.send(Bytes::from_static(b"next")).await.unwrap_err();
        assert!(e.to_string().contains("mid-frame"), "{e}");
        let closing = tokio::spawn(async move { sink.close("bye").await });
        let mut got = Vec::new();
        raw.read_to_end(&mut got).await.unwrap();
        closing.await.unwrap();
        assert_eq!(got.len(), 1024, "no close frame after the cut-off one");
    }

    #[tokio::test]
    async fn bad_frames_and_a_vanished_peer_are_errors_that_say_why() {
        let (_sink, mut source, mut raw) = server_and_raw();
        raw.write_all(&client_frame(OP_TEXT, b"hi")).await.unwrap();
        let e = source.recv().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("text message"), "{e}");

        let (_sink, mut source, mut raw) = server_and_raw();
        let f = client_frame(OP_BINARY, b"cut short");
        raw.write_all(&f[..5]).await.unwrap();
        drop(raw);
        let e = source.recv().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_client_masks_with_a_fresh_key_and_a_shared_buffer_is_left_intact() {
        let (a, mut raw) = tokio::io::duplex(1024);
        let (mut sink, _source) = from_io(a, Role::Client, false, Bytes::new());
        let msg = Bytes::from_static(b"same payload");
        let keep = msg.clone();
        sink.send(msg.clone()).await.unwrap();
        sink.send(msg).await.unwrap();
        assert_eq!(
            keep, "same payload",
            "a shared buffer is copied, not masked"
        );
        let mut d = Decoder::new(Role::Server, 1024);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut masks = Vec::new();
        while got.len() < 2 {
            let mut chunk = [0u8; 64];
            let n = raw.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 6 && got.len() < 2 {
                let key = [buf[2], buf[3], buf[4], buf[5]];
                match d.decode(&mut buf).unwrap() {
                    Some(Event::Binary(m)) => {
                        masks.push(key);
                        got.push(m);
                    }
                    Some(other) => panic!("{other:?}"),
                    None => break,
                }
            }
        }
        assert_eq!(got, vec!["same payload", "same payload"]);
        assert_ne!(masks[0], masks[1], "each frame gets its own mask");
    }
}
