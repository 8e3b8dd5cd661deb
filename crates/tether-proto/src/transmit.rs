//! Where [`Session::poll_transmit`](crate::Session::poll_transmit) puts the
//! frames it sends: [`FrameBuf`], implemented by a plain [`BytesMut`] (every
//! byte copied into one buffer) and by [`Transmit`] (large DATA payloads
//! kept by reference).
//!
//! A relay moves most of its bytes as DATA payloads that arrived as `Bytes`
//! (a socket read, or a slice of a message from the other session). Copying
//! each into the outgoing message costs a pass over every byte in user
//! space; a transport that writes vectored (a WebSocket server's frames are
//! not masked), or that rewrites every byte as it copies it anyway (a
//! WebSocket client's masking), can instead take the payloads as they are.
//! The bytes on the wire are the same either way.

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, StreamId, HEADER_LEN};

/// DATA payloads shorter than this are copied into the message even by a
/// [`Transmit`] that keeps payloads by reference: below it, a copy costs
/// less than one more part for the transport to gather.
pub const INLINE_PAYLOAD: usize = 2048;

/// Somewhere encoded frames are appended.
pub trait FrameBuf {
    /// Bytes appended so far.
    fn len(&self) -> usize;
    /// Whether nothing was appended yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends one frame.
    fn push(&mut self, frame: Frame);
    /// Appends one DATA frame for stream `id` whose payload is `parts`
    /// joined, leaving `parts` empty: a frame gathered from several queued
    /// chunks goes out whole, not cut where the chunks were.
    fn push_data(&mut self, id: StreamId, parts: &mut Vec<Bytes>);
}

/// The header of a DATA frame carrying `len` bytes.
fn data_header(id: StreamId, len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    Frame::encode_data_header(id, len, &mut header);
    header
}

/// The bytes of `parts` joined.
fn total_len(parts: &[Bytes]) -> usize {
    parts.iter().map(Bytes::len).sum()
}

impl FrameBuf for BytesMut {
    fn len(&self) -> usize {
        BytesMut::len(self)
    }
    fn push(&mut self, frame: Frame) {
        frame.encode(self);
    }
    fn push_data(&mut self, id: StreamId, parts: &mut Vec<Bytes>) {
        self.extend_from_slice(&data_header(id, total_len(parts)));
        for part in parts.drain(..) {
            self.extend_from_slice(&part);
        }
    }
}

/// One outgoing transport message as a list of parts: encoded frames, and
/// DATA payloads of at least [`INLINE_PAYLOAD`] bytes by reference.
#[derive(Debug, Default)]
pub struct Transmit {
    /// Finished parts, in order.
    parts: Vec<Bytes>,
    /// Frames encoded since the last payload kept by reference.
    tail: BytesMut,
    /// Every part's length plus the tail's.
    len: usize,
    /// Whether large payloads are kept by reference (else copied, as into a
    /// `BytesMut`).
    by_reference: bool,
    /// Room the tail reserves at its first frame (unless it has enough, see
    /// [`Transmit::with_buffer`]).
    capacity: usize,
}

impl Transmit {
    /// An empty message. With `by_reference`, large DATA payloads become
    /// parts of their own; without, everything is copied into one buffer
    /// (for a transport that wants the message whole).
    pub fn new(by_reference: bool) -> Self {
        Transmit {
            by_reference,
            ..Transmit::default()
        }
    }

    /// Like [`Transmit::new`], reserving `capacity` bytes for the encoded
    /// frames when the first one arrives (an empty message allocates
    /// nothing), so that filling a message does not move it as it grows.
    pub fn with_capacity(by_reference: bool, capacity: usize) -> Self {
        Transmit {
            by_reference,
            capacity,
            ..Transmit::default()
        }
    }

    /// Like [`Transmit::with_capacity`], with the frames written into
    /// `buffer`'s spare room while it has at least half of `capacity` (all
    /// of it without `by_reference`; `buffer`'s bytes, if any, are dropped):
    /// what [`Transmit::into_parts_and_buffer`] left of the last message's.
    /// A writer that passes its buffer on from message to message allocates
    /// one per many small messages instead of one per message.
    pub fn with_buffer(by_reference: bool, mut buffer: BytesMut, capacity: usize) -> Self {
        buffer.clear(); // only its room is wanted
        Transmit {
            by_reference,
            capacity,
            tail: buffer,
            ..Transmit::default()
        }
    }

    /// Reserves the tail's room at the message's first frame. A buffer
    /// passed on from the last message is used while it has at least half
    /// the room asked for when it takes frame headers and small payloads
    /// (more comes as a frame needs it), all of it when it takes every byte
    /// of the message (growing would copy them).
    fn reserve_first(&mut self) {
        let enough = if self.by_reference {
            self.capacity / 2
        } else {
            self.capacity
        };
        if self.len == 0 && self.tail.capacity() < enough {
            self.tail.reserve(self.capacity);
        }
    }

    /// Appends a DATA header for a payload of `len` bytes, which
    /// [`Transmit::push_payload`] then appends.
    fn push_data_header(&mut self, id: StreamId, len: usize) {
        self.len += HEADER_LEN + len;
        self.tail.extend_from_slice(&data_header(id, len));
    }

    /// Appends DATA payload bytes, as a part of their own when they are
    /// large and kept by reference, else copied into the tail.
    fn push_payload(&mut self, part: Bytes) {
        if self.by_reference && part.len() >= INLINE_PAYLOAD {
            if !self.tail.is_empty() {
                self.parts.push(self.tail.split().freeze());
            }
            self.parts.push(part);
        } else {
            self.tail.extend_from_slice(&part);
        }
    }

    /// The parts in order; one part when nothing was kept by reference, none
    /// when the message is empty.
    pub fn into_parts(self) -> Vec<Bytes> {
        self.into_parts_and_buffer().0
    }

    /// The parts, as [`Transmit::into_parts`], and the unused room of the
    /// buffer the frames went into, for the next message
    /// ([`Transmit::with_buffer`]).
    pub fn into_parts_and_buffer(mut self) -> (Vec<Bytes>, BytesMut) {
        if !self.tail.is_empty() {
            self.parts.push(self.tail.split().freeze());
        }
        (self.parts, self.tail)
    }
}

impl FrameBuf for Transmit {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, frame: Frame) {
        self.reserve_first();
        match frame {
            Frame::Data { id, payload } => {
                self.push_data_header(id, payload.len());
                self.push_payload(payload);
            }
            frame => {
                self.len += frame.encoded_len();
                frame.encode(&mut self.tail);
            }
        }
    }

    fn push_data(&mut self, id: StreamId, parts: &mut Vec<Bytes>) {
        self.reserve_first();
        self.push_data_header(id, total_len(parts));
        for part in parts.drain(..) {
            self.push_payload(part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::StreamId;

    fn frames() -> Vec<Frame> {
        let data = |id: u32, n: usize| Frame::Data {
            id: StreamId(id),
            payload: Bytes::from(
                (0..n)
                    .map(|i| (i * 7 + id as usize) as u8)
                    .collect::<Vec<_>>(),
            ),
        };
        vec![
            Frame::Ping(7),
            data(1, INLINE_PAYLOAD - 1),
            data(3, INLINE_PAYLOAD),
            Frame::Fin { id: StreamId(3) },
            data(5, 40_000),
            data(7, 10),
            data(9, 33_000),
        ]
    }

    #[test]
    fn the_parts_join_to_the_bytes_a_buffer_gets() {
        let mut flat = BytesMut::new();
        let mut by_ref = Transmit::new(true);
        let mut copied = Transmit::new(false);
        for f in frames() {
            flat.push(f.clone());
            by_ref.push(f.clone());
            copied.push(f);
            assert_eq!(by_ref.len(), flat.len());
            assert_eq!(copied.len(), flat.len());
        }
        let parts = by_ref.into_parts();
        // ping + small data + header | 2048 | fin + header | 40000 | 10-byte data + header | 33000
        assert_eq!(parts.len(), 6, "three payloads kept by reference");
        assert_eq!(parts.concat(), flat[..]);
        let one = copied.into_parts();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0], flat);
    }

    #[test]
    fn a_gathered_frame_is_the_frame_of_its_joined_payload() {
        let parts = [10, INLINE_PAYLOAD, 5, 40_000, INLINE_PAYLOAD - 1, 3_000];
        let parts: Vec<Bytes> = parts
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8 + 1; n]))
            .collect();
        let id = StreamId(9);
        let mut whole = BytesMut::new();
        whole.push(Frame::Ping(1));
        whole.push(Frame::Data {
            id,
            payload: Bytes::from(parts.concat()),
        });
        for by_reference in [true, false] {
            let mut flat = BytesMut::new();
            let mut t = Transmit::new(by_reference);
            flat.push(Frame::Ping(1));
            t.push(Frame::Ping(1));
            flat.push_data(id, &mut parts.clone());
            let mut gathered = parts.clone();
            t.push_data(id, &mut gathered);
            assert!(gathered.is_empty(), "the parts are taken");
            assert_eq!(flat, whole);
            assert_eq!(t.len(), whole.len());
            let out = t.into_parts();
            // ping + header + 10 | 2048 | 5 | 40000 | 2047 | 3000
            let expected = if by_reference { 6 } else { 1 };
            assert_eq!(out.len(), expected, "by_reference={by_reference}");
            assert_eq!(out.concat(), whole[..]);
        }
    }

    #[test]
    fn messages_passing_their_buffer_on_share_one_allocation() {
        let mut buffer = BytesMut::new();
        let mut sent = Vec::new();
        for i in 0..3u64 {
            let mut t = Transmit::with_buffer(true, std::mem::take(&mut buffer), 1024);
            t.push(Frame::Ping(i));
            let mut flat = BytesMut::new();
            flat.push(Frame::Ping(i));
            let (parts, rest) = t.into_parts_and_buffer();
            assert_eq!(parts.concat(), flat[..], "message {i}");
            sent.push(parts);
            buffer = rest;
        }
        // Each message starts where the one before it ended, in the same
        // buffer, while the earlier ones are still held.
        for w in sent.windows(2) {
            let end = w[0][0].as_ptr_range().end;
            assert_eq!(w[1][0].as_ptr(), end, "one allocation, not one per message");
        }
        // An empty message hands its buffer back untouched.
        let t = Transmit::with_buffer(true, buffer, 1024);
        let (parts, rest) = t.into_parts_and_buffer();
        assert!(parts.is_empty());
        assert!(rest.capacity() > 0, "the room is passed on");
    }

    #[test]
    fn an_empty_message_has_no_parts() {
        assert!(Transmit::new(true).into_parts().is_empty());
        let mut t = Transmit::new(true);
        t.push(Frame::Data {
            id: StreamId(1),
            payload: Bytes::from(vec![1u8; 4096]),
        });
        let parts = t.into_parts();
        assert_eq!(parts.len(), 2, "header, payload; no empty tail");
        assert_eq!(parts[0].len(), HEADER_LEN);
    }
}
