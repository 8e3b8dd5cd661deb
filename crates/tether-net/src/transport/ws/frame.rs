//! WebSocket framing (RFC 6455 section 5) as a pure state machine: bytes in,
//! events out, no I/O, no clock. [`super::stream`] drives it over a socket.
//!
//! It exists (instead of tungstenite's codec, which the raw WebSocket
//! endpoint still uses) because a tether session moves every tunneled byte
//! through it: tungstenite zero-fills its read buffer before every read and
//! copies each outgoing message into its own buffer, which callgrind put at
//! two thirds of the server's instructions per 64-byte round trip. Here the
//! socket reads into uninitialised capacity, incoming payloads are sliced out
//! of the read buffer without a copy, and an outgoing message is written
//! behind a separately encoded header.
//!
//! What a tether session needs of WebSocket, and no more: binary messages
//! (fragmented ones are joined), pings answered, pongs ignored, the close
//! frame; one extension, `tether-unmasked` (agreed in the upgrade between a
//! dialer and a server that both know it: the dialer's frames then go
//! unmasked, see [`Decoder::unmasked_client`]). Everything else is a
//! [`FrameError`].

use bytes::{Buf, Bytes, BytesMut};
use std::io;

/// Continuation of a fragmented message.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text message (refused on a tether session).
pub const OP_TEXT: u8 = 0x1;
/// Binary message.
pub const OP_BINARY: u8 = 0x2;
/// Close.
pub const OP_CLOSE: u8 = 0x8;
/// Ping.
pub const OP_PING: u8 = 0x9;
/// Pong.
pub const OP_PONG: u8 = 0xA;

/// Longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_HEADER: usize = 14;

/// Largest payload of a control frame (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Which end of the WebSocket this is. Clients mask what they send and
/// servers require masked input (RFC 6455 section 5.1), unless both agreed
/// on `tether-unmasked`; servers send unmasked frames and clients require
/// exactly that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The end that dialed (agent, CLI client).
    Client,
    /// The end that accepted the upgrade (server).
    Server,
}

/// What the decoder hands up.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A whole binary message.
    Binary(Bytes),
    /// A ping: answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong (nothing to do: tether's own PING frames measure liveness).
    Pong,
    /// The peer's close frame, with its status code when it gave one.
    Close(Option<u16>, String),
}

/// Why the peer's bytes are not a WebSocket stream a tether session accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV1-3 set: no extension was negotiated.
    #[error("WebSocket frame with reserved bits set (no extension was negotiated)")]
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    #[error("unknown WebSocket opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A text message.
    #[error("text message on a tether session (binary frames only)")]
    Text,
    /// A client sent an unmasked frame.
    #[error("unmasked frame from a WebSocket client")]
    Unmasked,
    /// A server sent a masked frame.
    #[error("masked frame from a WebSocket server")]
    Masked,
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("fragmented or oversized WebSocket control frame")]
    BadControl,
    /// A message over the limit, refused before it is buffered.
    #[error("WebSocket message of {0} bytes or more is over the {1}-byte limit")]
    TooBig(u64, usize),
    /// A continuation frame with no fragmented message to continue.
    #[error("WebSocket continuation frame without a message to continue")]
    StrayContinuation,
    /// A new data message before the fragmented one ended.
    #[error("new WebSocket message while a fragmented one is unfinished")]
    Interleaved,
    /// A close frame of one byte, or with a reason that is not UTF-8.
    #[error("malformed WebSocket close frame")]
    BadClose,
    /// A close frame with a status code no endpoint may send (RFC 6455
    /// section 7.4: under 1000, 1004-1006, 1015, unassigned, 5000 and up).
    #[error("WebSocket close frame with the status code {0}, which no endpoint may send")]
    BadCloseCode(u16),
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Bytes the header itself takes.
    size: usize,
}

/// Parses the header at the start of `buf`; `None` until it is complete.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let (len, mut size) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        match buf.get(size..size + 4) {
            Some(m) => {
                size += 4;
                Some([m[0], m[1], m[2], m[3]])
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        mask,
        len,
        size,
    }))
}

/// Writes the header of a final (unfragmented) frame into `out` and returns
/// its length.
pub fn encode_header(
    opcode: u8,
    len: usize,
    mask: Option<[u8; 4]>,
    out: &mut [u8; MAX_HEADER],
) -> usize {
    out[0] = 0x80 | (opcode & 0x0F);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    n
}

/// A message joined from fragments, in an allocation not much larger than
/// itself: joining grows its buffer by doubling, and every chunk cut from
/// the message keeps the whole allocation alive (see `crate::chunk`).
/// Fragmented messages are rare (tether's own peers never fragment), so the
/// copy costs nothing on the usual path.
fn exact(whole: BytesMut) -> Bytes {
    if whole.capacity() > whole.len() + whole.len() / 4 {
        Bytes::copy_from_slice(&whole)
    } else {
        whole.freeze()
    }
}

/// Bytes masked per step: the key repeated to this length lets the
/// compiler XOR whole vector registers at a time.
const MASK_BLOCK: usize = 64;

/// `key` repeated over a [`MASK_BLOCK`], starting at its byte `phase`.
fn mask_pattern(key: [u8; 4], phase: usize) -> [u8; MASK_BLOCK] {
    std::array::from_fn(|i| key[(phase + i) % 4])
}

/// XORs `buf` with the repeating 4-byte `key` (masking and unmasking are
/// the same operation).
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let pattern = mask_pattern(key, 0);
    let mut blocks = buf.chunks_exact_mut(MASK_BLOCK);
    for block in &mut blocks {
        for (b, k) in block.iter_mut().zip(&pattern) {
            *b ^= k;
        }
    }
    // Whole blocks are a multiple of 4 bytes: the rest starts at phase 0.
    for (b, k) in blocks.into_remainder().iter_mut().zip(&pattern) {
        *b ^= k;
    }
}

/// Writes `src` XORed with the mask `key` into `dst` (of the same length),
/// `src` being the part of a payload that starts at byte `offset`: one pass
/// over the bytes where a copy followed by [`apply_mask`] makes two.
pub fn copy_masked(dst: &mut [u8], src: &[u8], key: [u8; 4], offset: usize) {
    debug_assert_eq!(dst.len(), src.len());
    let pattern = mask_pattern(key, offset % 4);
    let mut to = dst.chunks_exact_mut(MASK_BLOCK);
    let mut from = src.chunks_exact(MASK_BLOCK);
    for (d, s) in (&mut to).zip(&mut from) {
        for ((d, s), k) in d.iter_mut().zip(s).zip(&pattern) {
            *d = s ^ k;
        }
    }
    let rest = to.into_remainder().iter_mut().zip(from.remainder());
    for ((d, s), k) in rest.zip(&pattern) {
        *d = s ^ k;
    }
}

/// A whole control frame (pong, close) ready to write, masked with `mask`
/// when given (the client side).
pub fn control_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut header = [0u8; MAX_HEADER];
    let n = encode_header(opcode, payload.len(), mask, &mut header);
    let mut out = BytesMut::with_capacity(n + payload.len());
    out.extend_from_slice(&header[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m);
    }
    out.freeze()
}

/// The payload of a close frame: a status code and a reason, cut to fit a
/// control frame (see [`close_reason`]).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(close_reason(reason).as_bytes());
    p
}

/// The longest prefix of `reason` that fits a close frame beside its status
/// code (123 bytes), cut at a character boundary.
pub fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Turns the bytes read from one end of a WebSocket into [`Event`]s.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    /// A server's: the client may send unmasked frames (both ends agreed
    /// on [`super::UNMASKED_EXTENSION`]).
    unmasked_client: bool,
    max_message: usize,
    /// The fragments of an unfinished message.
    partial: Option<BytesMut>,
}

impl Decoder {
    /// A decoder for the `role` end (what the peer must send depends on it)
    /// that refuses messages over `max_message` bytes.
    pub fn new(role: Role, max_message: usize) -> Self {
        Decoder {
            role,
            unmasked_client: false,
            max_message,
            partial: None,
        }
    }

    /// A server's decoder that also takes unmasked frames from the client,
    /// once both ends agreed on [`super::UNMASKED_EXTENSION`] (masked ones
    /// stay valid). No change for a client's.
    pub fn unmasked_client(mut self, agreed: bool) -> Self {
        self.unmasked_client = agreed;
        self
    }

    /// Takes the next event out of `buf` (bytes read from the peer, in
    /// order), or `Ok(None)` until `buf` holds a whole frame. A header that
    /// breaks a rule is refused as soon as it is complete, before its
    /// payload is waited for.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, FrameError> {
        loop {
            let Some(h) = parse_header(buf)? else {
                return Ok(None);
            };
            self.check(&h)?;
            // `check` bounded `len` by `max_message`, a usize.
            let len = h.len as usize;
            if buf.len() < h.size + len {
                return Ok(None);
            }
            buf.advance(h.size);
            let mut payload = buf.split_to(len);
            if let Some(key) = h.mask {
                apply_mask(&mut payload, key);
            }
            match h.opcode {
                OP_BINARY if h.fin => return Ok(Some(Event::Binary(payload.freeze()))),
                OP_BINARY => self.partial = Some(payload),
                OP_CONTINUATION => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(FrameError::StrayContinuation);
                    };
                    partial.extend_from_slice(&payload);
                    if h.fin {
                        let whole = self.partial.take().unwrap_or_default();
                        return Ok(Some(Event::Binary(exact(whole))));
                    }
                }
                OP_PING => return Ok(Some(Event::Ping(payload.freeze()))),
                OP_PONG => return Ok(Some(Event::Pong)),
                _ => return parse_close(&payload).map(Some),
            }
        }
    }

    /// How many more bytes than `buf` holds the frame at its start needs
    /// (at least one): what to make room for before the next read.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        match parse_header(buf) {
            Ok(Some(h)) => usize::try_from(h.len)
                .ok()
                .and_then(|len| (h.size + len).checked_sub(buf.len()))
                .filter(|&n| n > 0)
                .unwrap_or(1),
            _ => MAX_HEADER.saturating_sub(buf.len()).max(1),
        }
    }

    fn check(&self, h: &Header) -> Result<(), FrameError> {
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) if !self.unmasked_client => return Err(FrameError::Unmasked),
            (Role::Client, true) => return Err(FrameError::Masked),
            _ => {}
        }
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin || h.len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(FrameError::BadControl);
                }
            }
            OP_TEXT => return Err(FrameError::Text),
            OP_BINARY if self.partial.is_some() => return Err(FrameError::Interleaved),
            OP_BINARY => self.check_size(h.len)?,
            OP_CONTINUATION => match &self.partial {
                None => return Err(FrameError::StrayContinuation),
                Some(p) => self.check_size((p.len() as u64).saturating_add(h.len))?,
            },
            other => return Err(FrameError::UnknownOpcode(other)),
        }
        Ok(())
    }

    fn check_size(&self, len: u64) -> Result<(), FrameError> {
        if len > self.max_message as u64 {
            return Err(FrameError::TooBig(len, self.max_message));
        }
        Ok(())
    }
}

fn parse_close(payload: &[u8]) -> Result<Event, FrameError> {
    match payload {
        [] => Ok(Event::Close(None, String::new())),
        [_] => Err(FrameError::BadClose),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !may_be_sent(code) {
                return Err(FrameError::BadCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::BadClose)?;
            Ok(Event::Close(Some(code), reason.to_owned()))
        }
    }
}

/// Whether an endpoint may put `code` in a close frame: the codes RFC 6455
/// defines for sending (1004-1006 and 1015 are reserved or only for local
/// use), the ones IANA registered since (1012-1014), and the range for
/// libraries and applications.
fn may_be_sent(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A frame as a peer in `from` would send it.
    fn frame(fin: bool, opcode: u8, payload: &[u8], from: Role) -> Vec<u8> {
        let mask = (from == Role::Client).then_some(KEY);
        let mut h = [0u8; MAX_HEADER];
        let n = encode_header(opcode, payload.len(), mask, &mut h);
        if !fin {
            h[0] &= 0x7F;
        }
        let mut out = h[..n].to_vec();
        let mut p = payload.to_vec();
        if let Some(m) = mask {
            apply_mask(&mut p, m);
        }
        out.extend_from_slice(&p);
        out
    }

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(e) = d.decode(&mut buf)? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn rfc_examples_decode() {
        // RFC 6455 section 5.7: a single-frame unmasked and masked "Hello",
        // as binary here (text is refused on a tether session).
        let mut d = Decoder::new(Role::Client, 1 << 20);
        let unmasked = [0x82, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(
            decode_all(&mut d, &unmasked),
            Ok(vec![Event::Binary(Bytes::from_static(b"Hello"))])
        );
        let mut d = Decoder::new(Role::Server, 1 << 20);
        let masked = [
            0x82, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decode_all(&mut d, &masked),
            Ok(vec![Event::Binary(Bytes::from_static(b"Hello"))])
        );
    }

    #[test]
    fn every_length_encoding_round_trips_in_both_directions() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for from in [Role::Client, Role::Server] {
                let to = if from == Role::Client {
                    Role::Server
                } else {
                    Role::Client
                };
                let bytes = frame(true, OP_BINARY, &payload, from);
                let mut d = Decoder::new(to, 1 << 20);
                assert_eq!(
                    decode_all(&mut d, &bytes),
                    Ok(vec![Event::Binary(Bytes::from(payload.clone()))]),
                    "len {len} from {from:?}"
                );
            }
        }
    }

    #[test]
    fn bytes_arriving_one_at_a_time_give_the_same_messages() {
        let mut wire = frame(true, OP_BINARY, b"first", Role::Client);
        wire.extend(frame(true, OP_PING, b"p", Role::Client));
        wire.extend(frame(true, OP_BINARY, &[7u8; 300], Role::Client));
        let mut d = Decoder::new(Role::Server, 1 << 20);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for &b in &wire {
            assert!(d.wanted(&buf) >= 1);
            buf.extend_from_slice(&[b]);
            while let Some(e) = d.decode(&mut buf).unwrap() {
                events.push(e);
            }
        }
        assert_eq!(
            events,
            vec![
                Event::Binary(Bytes::from_static(b"first")),
                Event::Ping(Bytes::from_static(b"p")),
                Event::Binary(Bytes::from(vec![7u8; 300])),
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_payload_masked_in_pieces_equals_one_masked_whole() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13 % 256) as u8).collect();
        let mut whole = payload.clone();
        apply_mask(&mut whole, key);
        // Pieces of every length from 0 to 22 and around a block's, so
        // that each starts at every phase of the key, ends both on and off
        // a word, and whole blocks are masked at every phase too.
        let lengths: Vec<usize> = (0..23).chain([63, 64, 65, 130, 201]).collect();
        let mut pieces = vec![0u8; payload.len()];
        let mut at = 0;
        for &n in lengths.iter().cycle() {
            if at == payload.len() {
                break;
            }
            let end = (at + n).min(payload.len());
            copy_masked(&mut pieces[at..end], &payload[at..end], key, at);
            at = end;
        }
        assert_eq!(pieces, whole);
        apply_mask(&mut pieces, key);
        assert_eq!(pieces, payload, "masking twice gives the bytes back");
    }

    #[test]
    fn wanted_names_the_rest_of_the_frame() {
        let d = Decoder::new(Role::Client, 1 << 20);
        assert_eq!(d.wanted(&[]), MAX_HEADER);
        let wire = frame(true, OP_BINARY, &[0u8; 1000], Role::Server);
        assert_eq!(d.wanted(&wire[..4]), 1000);
        assert_eq!(d.wanted(&wire[..500]), 504);
    }

    #[test]
    fn fragments_are_joined_with_a_control_frame_between_them() {
        let mut wire = frame(false, OP_BINARY, b"ab", Role::Server);
        wire.extend(frame(true, OP_PING, b"x", Role::Server));
        wire.extend(frame(false, OP_CONTINUATION, b"cd", Role::Server));
        wire.extend(frame(true, OP_CONTINUATION, b"ef", Role::Server));
        let mut d = Decoder::new(Role::Client, 1 << 20);
        assert_eq!(
            decode_all(&mut d, &wire),
            Ok(vec![
                Event::Ping(Bytes::from_static(b"x")),
                Event::Binary(Bytes::from_static(b"abcdef")),
            ])
        );
    }

    #[test]
    fn a_message_joined_from_fragments_keeps_no_spare_buffer_alive() {
        // Joining grows the buffer by doubling; the message handed up must
        // not keep the slack alive (its chunks would hold it in queues).
        let mut wire = frame(false, OP_BINARY, &[1; 5000], Role::Server);
        for _ in 0..9 {
            wire.extend(frame(false, OP_CONTINUATION, &[2; 7000], Role::Server));
        }
        wire.extend(frame(true, OP_CONTINUATION, &[3; 100], Role::Server));
        let mut d = Decoder::new(Role::Client, 1 << 20);
        let mut events = decode_all(&mut d, &wire).unwrap();
        let Some(Event::Binary(msg)) = events.pop() else {
            panic!("no message")
        };
        // 68 100 bytes: just past the 64 KiB the joined buffer doubles from.
        assert_eq!(msg.len(), 5000 + 9 * 7000 + 100);
        let held = msg
            .try_into_mut()
            .map(|b| b.capacity())
            .unwrap_or(usize::MAX);
        assert!(
            held <= 68_100 + 68_100 / 4,
            "a 68 100-byte message holds {held} bytes"
        );
    }

    #[test]
    fn rule_breaking_headers_are_refused_before_their_payload_arrives() {
        let cases: Vec<(Vec<u8>, Role, FrameError)> = vec![
            (
                vec![0x82 | 0x40, 0x00],
                Role::Client,
                FrameError::ReservedBits,
            ),
            (vec![0x83, 0x00], Role::Client, FrameError::UnknownOpcode(3)),
            (vec![0x81, 0x01], Role::Client, FrameError::Text),
            (vec![0x82, 0x01], Role::Server, FrameError::Unmasked),
            (
                vec![0x82, 0x81, 1, 2, 3, 4],
                Role::Client,
                FrameError::Masked,
            ),
            (vec![0x09, 0x00], Role::Client, FrameError::BadControl),
            (
                vec![0x89, 126, 0, 126],
                Role::Client,
                FrameError::BadControl,
            ),
            (
                vec![0x80, 0x01],
                Role::Client,
                FrameError::StrayContinuation,
            ),
            (
                vec![0x82, 127, 0, 0, 0, 0, 0x10, 0, 0, 0],
                Role::Client,
                FrameError::TooBig(1 << 28, 1 << 20),
            ),
            (
                vec![0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                Role::Client,
                FrameError::TooBig(u64::MAX, 1 << 20),
            ),
        ];
        for (wire, role, want) in cases {
            let mut d = Decoder::new(role, 1 << 20);
            assert_eq!(decode_all(&mut d, &wire), Err(want), "{wire:x?}");
        }
    }

    #[test]
    fn a_fragmented_message_may_not_outgrow_the_limit_or_be_interleaved() {
        let mut d = Decoder::new(Role::Client, 10);
        let mut wire = frame(false, OP_BINARY, &[1; 6], Role::Server);
        wire.extend(frame(true, OP_CONTINUATION, &[2; 6], Role::Server));
        assert_eq!(decode_all(&mut d, &wire), Err(FrameError::TooBig(12, 10)));
        let mut d = Decoder::new(Role::Client, 100);
        let mut wire = frame(false, OP_BINARY, b"a", Role::Server);
        wire.extend(frame(true, OP_BINARY, b"b", Role::Server));
        assert_eq!(decode_all(&mut d, &wire), Err(FrameError::Interleaved));
    }

    #[test]
    fn close_frames_carry_a_code_and_a_reason() {
        let mut d = Decoder::new(Role::Client, 100);
        let wire = frame(true, OP_CLOSE, &close_payload(1000, "bye"), Role::Server);
        assert_eq!(
            decode_all(&mut d, &wire),
            Ok(vec![Event::Close(Some(1000), "bye".into())])
        );
        let wire = frame(true, OP_CLOSE, b"", Role::Server);
        assert_eq!(
            decode_all(&mut d, &wire),
            Ok(vec![Event::Close(None, String::new())])
        );
        let wire = frame(true, OP_CLOSE, b"x", Role::Server);
        assert_eq!(decode_all(&mut d, &wire), Err(FrameError::BadClose));
        let wire = frame(true, OP_CLOSE, &[3, 232, 0xff], Role::Server);
        assert_eq!(decode_all(&mut d, &wire), Err(FrameError::BadClose));
        // Codes no endpoint may send fail the connection (RFC 6455 7.4).
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            let mut d = Decoder::new(Role::Client, 100);
            let wire = frame(true, OP_CLOSE, &close_payload(code, ""), Role::Server);
            assert_eq!(
                decode_all(&mut d, &wire),
                Err(FrameError::BadCloseCode(code))
            );
        }
        for code in [1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            let mut d = Decoder::new(Role::Client, 100);
            let wire = frame(true, OP_CLOSE, &close_payload(code, ""), Role::Server);
            assert_eq!(
                decode_all(&mut d, &wire),
                Ok(vec![Event::Close(Some(code), String::new())])
            );
        }
        // A long reason is cut at a character boundary to fit 125 bytes.
        let p = close_payload(1000, &"é".repeat(100));
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }

    #[test]
    fn control_frames_are_masked_on_the_client_side_only() {
        let f = control_frame(OP_PONG, b"hi", Some(KEY));
        let mut d = Decoder::new(Role::Server, 100);
        assert_eq!(decode_all(&mut d, &f), Ok(vec![Event::Pong]));
        let f = control_frame(OP_PING, b"hi", None);
        let mut d = Decoder::new(Role::Client, 100);
        assert_eq!(
            decode_all(&mut d, &f),
            Ok(vec![Event::Ping(Bytes::from_static(b"hi"))])
        );
    }

    #[test]
    fn masking_twice_restores_every_length_and_matches_the_bytewise_rule() {
        for len in 0..200 {
            let orig: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut m = orig.clone();
            apply_mask(&mut m, KEY);
            for (i, (a, b)) in orig.iter().zip(&m).enumerate() {
                assert_eq!(a ^ KEY[i % 4], *b);
            }
            apply_mask(&mut m, KEY);
            assert_eq!(m, orig);
        }
    }
}
