//! Message transports: whatever carries whole protocol messages between two
//! session ends.
//!
//! The session driver only needs "send one message" and "receive one
//! message"; every transport implements [`MessageSink`] and
//! [`MessageSource`]. Today that is a WebSocket ([`ws`]) over plain TCP or
//! TLS ([`tls`]); a QUIC transport would be one more file here. [`mem`] is
//! an in-memory pair of ends, for tests that run sessions in-process.

pub mod mem;
pub mod tls;
pub mod ws;

use bytes::Bytes;
use std::future::Future;
use std::io;

/// Largest message (a batch of whole frames) a writer puts on the transport.
/// Small enough that a control frame (PONG, WINDOW_UPDATE) queued while a
/// lone stream's message is being written waits at most ~64 KiB of wire
/// time (several streams' messages, or a relayed stream's, go out four at a
/// time, see [`MAX_SEND_BATCH`]); large enough that a bulk stream's frame
/// in it is nearly as large as the peer's 64 KiB `max_frame_payload`.
///
/// 256 bytes under 64 KiB so that a message with its WebSocket header (and,
/// over TLS, its five records' overhead) fits one 64 KiB TCP segment (the
/// loopback MSS is 65 483) or GSO packet: a message of exactly 64 KiB went
/// out as a full segment and a sliver of a few dozen bytes, 1.7 segments
/// per message, each with its own wake-up of the reader. 3-hop transfers
/// moved 5-7 % more with the smaller message (bench/README.md, session 23).
pub const MAX_SEND_MESSAGE: usize = 64 * 1024 - 256;

// A full message, its longest WebSocket header and the overhead of the five
// TLS 1.3 records it spans (5-byte header, content type, 16-byte tag) stay
// within one loopback segment (MSS 65 483): see above.
const _: () = assert!(MAX_SEND_MESSAGE + ws::frame::MAX_HEADER + 5 * 22 <= 65_483);

/// Most bytes of messages a session writer hands the transport at once
/// while two or more streams have data waiting, or a stream relayed from
/// another session is next (`Session::batch_sends`): the transport writes them
/// with one call. With one write per 64 KiB message, a server carrying 8
/// bulk streams to an agent spent most of its time in the kernel, arming
/// TCP's pacing timer and waking the agent once per message (a message of
/// exactly 64 KiB also left a full segment and a sliver, before the size
/// above); four messages per write took 8 streams through a listener from
/// 10.6 to 13.9 Gbit/s here. A lone stream keeps one message per write (its
/// batches measured slower, bench/README.md, session 20) unless it is
/// relayed from another session: a server's relay between a CLI client and
/// an agent moved 9 % more with its streams batched (session 21). Also what
/// a control frame queued during such a transfer may wait behind.
pub const MAX_SEND_BATCH: usize = 4 * MAX_SEND_MESSAGE;

/// Largest message a reader accepts; anything bigger is a protocol violation.
pub const MAX_RECV_MESSAGE: usize = 1024 * 1024;

/// A received message may share its allocation with others, but the
/// allocation is at most this size or the message's own (plus its
/// WebSocket header), whichever is larger: the WebSocket reader keeps to
/// it. The session's chunks stay slices of that allocation, so this is
/// what a chunk can keep alive (see [`crate::chunk`]). (The in-memory pair,
/// for tests, hands over the sender's buffers as they are.)
pub const MAX_SHARED_READ_BUFFER: usize = 64 * 1024;

/// The sending half of a message transport.
pub trait MessageSink: Send + 'static {
    /// Sends one message (one or more whole frames).
    fn send(&mut self, msg: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends one message given as parts, in order (see
    /// [`tether_proto::Transmit`]). A transport that
    /// [takes parts](Self::takes_parts) writes them as they are or copies
    /// them once on its own terms; the default joins them into one buffer.
    fn send_parts(&mut self, parts: Vec<Bytes>) -> impl Future<Output = io::Result<()>> + Send {
        async move { self.send(joined(parts)).await }
    }
    /// Sends several messages, each given as parts, in order, taking them
    /// out of `messages` (which the caller keeps, with its room, for the
    /// next batch); a transport may write them with one call. The default
    /// sends them one by one.
    fn send_batch(
        &mut self,
        messages: &mut Vec<Vec<Bytes>>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            for parts in messages.drain(..) {
                self.send_parts(parts).await?;
            }
            Ok(())
        }
    }
    /// Whether [`send_parts`](Self::send_parts) wants the parts as they are
    /// (a WebSocket server writes them gathered, a client copies them once
    /// while masking); the session writer then keeps large payloads by
    /// reference instead of copying them into the message first.
    fn takes_parts(&self) -> bool {
        false
    }
    /// Closes the transport, telling the peer `reason` if the transport can.
    fn close(&mut self, reason: &str) -> impl Future<Output = ()> + Send;
}

/// A message's parts as one buffer: the part itself when there is one
/// (no copy), else a copy.
pub(crate) fn joined(parts: Vec<Bytes>) -> Bytes {
    match <[Bytes; 1]>::try_from(parts) {
        Ok([one]) => one,
        Err(parts) => Bytes::from(parts.concat()),
    }
}

/// The receiving half of a message transport.
pub trait MessageSource: Send + 'static {
    /// The next message, `Ok(None)` on an orderly close.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}
