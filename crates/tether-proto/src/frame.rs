//! Frame layout, encoding and decoding.
//!
//! Every frame starts with a 10-byte header, all integers big-endian:
//!
//! ```text
//! +--------+--------+-----------------+-----------------+-----------------+
//! | type:8 | flags:8|  stream id: 32  |  length: 32     | payload ...     |
//! +--------+--------+-----------------+-----------------+-----------------+
//! ```
//!
//! One WebSocket binary message carries one or more whole frames; a frame
//! never spans two messages. `docs/PROTOCOL.md` is the normative description.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

use crate::codes::{ErrorCode, OpenErrorCode, ResetCode};

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 10;

/// Largest payload of any control frame (everything but DATA). Control
/// payloads are tiny; this bound keeps a hostile peer from making us buffer
/// megabytes of "reason" text.
pub const MAX_CONTROL_PAYLOAD: usize = 4096;

/// Longest reason text we send; longer texts are cut at a character boundary.
pub const MAX_REASON_LEN: usize = 1024;

/// Longest target address accepted in an OPEN.
pub const MAX_TARGET_LEN: usize = 1024;

/// Largest CATALOG (version 3) and REPLICAS (version 4) payload: the two
/// control frames that may be bigger than [`MAX_CONTROL_PAYLOAD`], since an
/// agent may offer hundreds of services and a server may have many
/// replicas. It still fits one WebSocket message.
pub const MAX_CATALOG_PAYLOAD: usize = 60 * 1024;

/// One service in a CATALOG frame: what an agent offers by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The service name clients open (`agent/NAME`).
    pub name: String,
    /// What the service speaks, so the server knows what it can do with it.
    pub kind: ServiceKind,
    /// For HTTP services: the `Host` header value the service expects when
    /// the server is told to rewrite it (empty: keep the browser's).
    pub host: String,
}

/// What a named service speaks (CATALOG, version 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// A TCP service of unknown protocol.
    Tcp,
    /// An HTTP service the server may proxy browsers to (the agent has
    /// already taken care of TLS to the service, if any).
    Http,
    /// A UDP service.
    Udp,
    /// An HTTP service that speaks only HTTP/2 to the server (cleartext
    /// with prior knowledge, or over the agent's TLS with ALPN `h2`): gRPC
    /// and other HTTP/2-only servers (version 6).
    Http2,
    /// A kind this build does not know (shown, never proxied).
    Other(u8),
}

impl ServiceKind {
    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            ServiceKind::Tcp => 0,
            ServiceKind::Http => 1,
            ServiceKind::Udp => 2,
            ServiceKind::Http2 => 3,
            ServiceKind::Other(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => ServiceKind::Tcp,
            1 => ServiceKind::Http,
            2 => ServiceKind::Udp,
            3 => ServiceKind::Http2,
            v => ServiceKind::Other(v),
        }
    }

    /// Whether the server may proxy browsers to it (HTTP/1.1 or HTTP/2).
    pub fn is_http(self) -> bool {
        matches!(self, ServiceKind::Http | ServiceKind::Http2)
    }

    /// The kind a peer speaking protocol `version` is told: a version-5 (or
    /// older) server does not know kind 3 and could only refuse it, so an
    /// HTTP/2 service is announced to it as what it still is for that
    /// server, a TCP service.
    pub fn for_version(self, version: u16) -> ServiceKind {
        match self {
            ServiceKind::Http2 if version < crate::HTTP2_SERVICE_VERSION => ServiceKind::Tcp,
            k => k,
        }
    }

    /// Lowercase name (`tcp`, `http`, `udp`, `http2`, `kindN`).
    pub fn as_str(self) -> std::borrow::Cow<'static, str> {
        match self {
            ServiceKind::Tcp => "tcp".into(),
            ServiceKind::Http => "http".into(),
            ServiceKind::Udp => "udp".into(),
            ServiceKind::Http2 => "http2".into(),
            ServiceKind::Other(v) => format!("kind{v}").into(),
        }
    }
}

/// One server replica in a REPLICAS frame (version 4).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaEntry {
    /// The replica's id (a pod name, say); empty when the sender knows only
    /// its address (peers found by DNS).
    pub id: String,
    /// `IP:PORT` an agent may dial to reach this replica directly (TLS is
    /// still checked against the server's public name); empty when agents
    /// can reach it only through the load balancer.
    pub addr: String,
    /// This entry is the sender itself.
    pub this: bool,
}

/// The server replicas a REPLICAS frame lists (version 4): every replica the
/// sender knows of, itself included, replacing any earlier list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replicas {
    /// Grows with every change the sender makes to its list.
    pub generation: u64,
    /// The replicas.
    pub entries: Vec<ReplicaEntry>,
}

impl Replicas {
    /// The sender's own entry.
    pub fn this(&self) -> Option<&ReplicaEntry> {
        self.entries.iter().find(|e| e.this)
    }
}

/// A stream identifier, scoped to one session. 0 is the session itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

impl StreamId {
    /// The pseudo stream used by session-level frames.
    pub const SESSION: StreamId = StreamId(0);
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What kind of byte stream an OPEN asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// A TCP connection (reliable, ordered bytes).
    Tcp,
    /// A UDP flow (version 2: datagrams framed as in [`crate::datagram`]).
    Udp,
    /// A kind this build does not know; answered with OPEN_ERR `bad_target`.
    Other(u8),
}

impl TargetKind {
    fn to_u8(self) -> u8 {
        match self {
            TargetKind::Tcp => 1,
            TargetKind::Udp => 2,
            TargetKind::Other(v) => v,
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => TargetKind::Tcp,
            2 => TargetKind::Udp,
            other => TargetKind::Other(other),
        }
    }
}

/// The destination an OPEN asks for. Its meaning depends on the hop:
/// client → server it is `agent/service`; server → agent it is a service
/// name or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// TCP or UDP.
    pub kind: TargetKind,
    /// The address text, UTF-8, at most [`MAX_TARGET_LEN`] bytes.
    pub address: String,
}

impl Target {
    /// A TCP target.
    pub fn tcp(address: impl Into<String>) -> Self {
        Target {
            kind: TargetKind::Tcp,
            address: address.into(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TargetKind::Tcp => write!(f, "{}", self.address),
            TargetKind::Udp => write!(f, "udp:{}", self.address),
            TargetKind::Other(k) => write!(f, "kind{k}:{}", self.address),
        }
    }
}

/// Frame type byte values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Initiator's greeting: versions, capabilities, limits.
    Hello = 0x01,
    /// Acceptor's answer: the chosen version and its limits.
    HelloAck = 0x02,
    /// Liveness probe.
    Ping = 0x03,
    /// Answer to a PING, echoing its payload.
    Pong = 0x04,
    /// The sender takes no new streams; the session ends when drained.
    GoAway = 0x05,
    /// The services the sender offers (version 3).
    Catalog = 0x06,
    /// The server replicas the sender knows of (version 4).
    Replicas = 0x07,
    /// The heartbeat the acceptor asks of the initiator (version 7).
    Heartbeat = 0x08,
    /// Ask the peer to open a stream to a target.
    Open = 0x10,
    /// The stream is open.
    OpenOk = 0x11,
    /// The stream could not be opened.
    OpenErr = 0x12,
    /// Stream bytes.
    Data = 0x13,
    /// The sender will send no more data on this stream (half-close).
    Fin = 0x14,
    /// Abort the stream in both directions.
    Rst = 0x15,
    /// Grant the peer more send credit on a stream.
    WindowUpdate = 0x16,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x01 => FrameType::Hello,
            0x02 => FrameType::HelloAck,
            0x03 => FrameType::Ping,
            0x04 => FrameType::Pong,
            0x05 => FrameType::GoAway,
            0x06 => FrameType::Catalog,
            0x07 => FrameType::Replicas,
            0x08 => FrameType::Heartbeat,
            0x10 => FrameType::Open,
            0x11 => FrameType::OpenOk,
            0x12 => FrameType::OpenErr,
            0x13 => FrameType::Data,
            0x14 => FrameType::Fin,
            0x15 => FrameType::Rst,
            0x16 => FrameType::WindowUpdate,
            _ => return None,
        })
    }
}

/// Parameters both HELLO and HELLO_ACK carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the sender speaks (HELLO_ACK: the chosen one).
    pub min_version: u16,
    /// Highest protocol version the sender speaks (HELLO_ACK: the chosen one).
    pub max_version: u16,
    /// Capability bits (none are defined in version 1; unknown bits are ignored).
    pub capabilities: u32,
    /// The receive window the sender grants to every new stream, in bytes.
    pub initial_window: u32,
    /// The largest frame payload the sender accepts.
    pub max_frame_payload: u32,
    /// Free-form software name and version, for logs and the console.
    pub software: String,
}

/// What a HEARTBEAT frame asks (version 7): how often the initiator
/// should PING, and how long the acceptor waits in silence before it
/// declares the session dead. The server's operator sets these once for
/// every agent and client instead of on each of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// PING at least this often, in milliseconds ([`Heartbeat::MIN_INTERVAL_MS`] or more).
    pub ping_interval_ms: u32,
    /// The sender ends the session after this much silence, in
    /// milliseconds; longer than `ping_interval_ms`.
    pub idle_timeout_ms: u32,
}

impl Heartbeat {
    /// The shortest interval a HEARTBEAT may ask for.
    pub const MIN_INTERVAL_MS: u32 = 100;

    /// Whether the values are ones a peer may send: an interval of at
    /// least [`Heartbeat::MIN_INTERVAL_MS`] and an idle timeout longer than it.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.ping_interval_ms < Self::MIN_INTERVAL_MS {
            return Err("interval below 100 ms");
        }
        if self.idle_timeout_ms <= self.ping_interval_ms {
            return Err("idle timeout not longer than the interval");
        }
        Ok(())
    }
}

// `Heartbeat::check` spells the minimum out in its refusal (frame errors
// are static strings): a change to the constant must change that text.
const _: () = assert!(
    Heartbeat::MIN_INTERVAL_MS == 100,
    "update the refusal text in Heartbeat::check"
);

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`FrameType::Hello`].
    Hello(Hello),
    /// See [`FrameType::HelloAck`]; `min_version == max_version` is the chosen version.
    HelloAck(Hello),
    /// See [`FrameType::Ping`].
    Ping(u64),
    /// See [`FrameType::Pong`].
    Pong(u64),
    /// See [`FrameType::GoAway`].
    GoAway {
        /// Why the session ends.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// See [`FrameType::Catalog`]: the full list, replacing any earlier one.
    Catalog(Vec<CatalogEntry>),
    /// See [`FrameType::Replicas`]: the full list, replacing any earlier one.
    Replicas(Replicas),
    /// See [`FrameType::Heartbeat`]: replaces any earlier one.
    Heartbeat(Heartbeat),
    /// See [`FrameType::Open`].
    Open {
        /// The new stream's id (its parity says which side opened it).
        id: StreamId,
        /// What to connect to.
        target: Target,
    },
    /// See [`FrameType::OpenOk`].
    OpenOk {
        /// The stream.
        id: StreamId,
    },
    /// See [`FrameType::OpenErr`].
    OpenErr {
        /// The stream.
        id: StreamId,
        /// Why.
        code: OpenErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// See [`FrameType::Data`].
    Data {
        /// The stream.
        id: StreamId,
        /// The bytes.
        payload: Bytes,
    },
    /// See [`FrameType::Fin`].
    Fin {
        /// The stream.
        id: StreamId,
    },
    /// See [`FrameType::Rst`].
    Rst {
        /// The stream.
        id: StreamId,
        /// Why.
        code: ResetCode,
        /// Human-readable detail.
        reason: String,
    },
    /// See [`FrameType::WindowUpdate`].
    WindowUpdate {
        /// The stream.
        id: StreamId,
        /// Extra bytes of credit granted, > 0.
        increment: u32,
    },
}

/// Why bytes could not be decoded into a frame. Every variant is fatal for
/// the session that received them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The message ended in the middle of a frame.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// The type byte names no frame of this version.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The payload is longer than allowed.
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload does not have the shape its type requires.
    #[error("malformed {0} frame: {1}")]
    Malformed(&'static str, &'static str),
}

impl Frame {
    /// The stream this frame is about (0 for session frames).
    pub fn stream_id(&self) -> StreamId {
        match self {
            Frame::Hello(_)
            | Frame::HelloAck(_)
            | Frame::Ping(_)
            | Frame::Pong(_)
            | Frame::GoAway { .. }
            | Frame::Catalog(_)
            | Frame::Replicas(_)
            | Frame::Heartbeat(_) => StreamId::SESSION,
            Frame::Open { id, .. }
            | Frame::OpenOk { id }
            | Frame::OpenErr { id, .. }
            | Frame::Data { id, .. }
            | Frame::Fin { id }
            | Frame::Rst { id, .. }
            | Frame::WindowUpdate { id, .. } => *id,
        }
    }

    /// The type byte of this frame.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloAck(_) => FrameType::HelloAck,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::GoAway { .. } => FrameType::GoAway,
            Frame::Catalog(_) => FrameType::Catalog,
            Frame::Replicas(_) => FrameType::Replicas,
            Frame::Heartbeat(_) => FrameType::Heartbeat,
            Frame::Open { .. } => FrameType::Open,
            Frame::OpenOk { .. } => FrameType::OpenOk,
            Frame::OpenErr { .. } => FrameType::OpenErr,
            Frame::Data { .. } => FrameType::Data,
            Frame::Fin { .. } => FrameType::Fin,
            Frame::Rst { .. } => FrameType::Rst,
            Frame::WindowUpdate { .. } => FrameType::WindowUpdate,
        }
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match self {
            Frame::Hello(h) | Frame::HelloAck(h) => 17 + clip(&h.software, MAX_ENTRY_TEXT).len(),
            Frame::Ping(_) | Frame::Pong(_) | Frame::Heartbeat(_) => 8,
            Frame::GoAway { reason, .. } => 2 + clip(reason, MAX_REASON_LEN).len(),
            Frame::Catalog(entries) => catalog_fit(entries).map(catalog_entry_len).sum(),
            Frame::Replicas(r) => {
                8 + replicas_fit(&r.entries)
                    .map(replica_entry_len)
                    .sum::<usize>()
            }
            Frame::Open { target, .. } => 3 + target.address.len(),
            Frame::OpenOk { .. } | Frame::Fin { .. } => 0,
            Frame::OpenErr { reason, .. } | Frame::Rst { reason, .. } => {
                2 + clip(reason, MAX_REASON_LEN).len()
            }
            Frame::Data { payload, .. } => payload.len(),
            Frame::WindowUpdate { .. } => 4,
        }
    }

    /// Appends the encoded frame to `out`.
    ///
    /// Texts longer than their limit are cut (at a character boundary); the
    /// caller is responsible for keeping DATA payloads and target addresses
    /// within the peer's limits.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        let mut header = [0u8; HEADER_LEN];
        encode_header(
            self.frame_type(),
            self.stream_id(),
            self.payload_len(),
            &mut header,
        );
        out.put_slice(&header);
        match self {
            Frame::Hello(h) | Frame::HelloAck(h) => {
                out.put_u16(h.min_version);
                out.put_u16(h.max_version);
                out.put_u32(h.capabilities);
                out.put_u32(h.initial_window);
                out.put_u32(h.max_frame_payload);
                let sw = clip(&h.software, MAX_ENTRY_TEXT);
                out.put_u8(sw.len() as u8);
                out.put_slice(sw.as_bytes());
            }
            Frame::Ping(v) | Frame::Pong(v) => out.put_u64(*v),
            Frame::Heartbeat(h) => {
                out.put_u32(h.ping_interval_ms);
                out.put_u32(h.idle_timeout_ms);
            }
            Frame::GoAway { code, reason } => {
                out.put_u16(code.to_u16());
                out.put_slice(clip(reason, MAX_REASON_LEN).as_bytes());
            }
            Frame::Catalog(entries) => {
                for e in catalog_fit(entries) {
                    out.put_u8(e.kind.to_u8());
                    out.put_u8(e.name.len() as u8);
                    out.put_slice(e.name.as_bytes());
                    out.put_u8(e.host.len() as u8);
                    out.put_slice(e.host.as_bytes());
                }
            }
            Frame::Replicas(r) => {
                out.put_u64(r.generation);
                for e in replicas_fit(&r.entries) {
                    out.put_u8(u8::from(e.this));
                    out.put_u8(e.id.len() as u8);
                    out.put_slice(e.id.as_bytes());
                    out.put_u8(e.addr.len() as u8);
                    out.put_slice(e.addr.as_bytes());
                }
            }
            Frame::Open { target, .. } => {
                debug_assert!(
                    (1..=MAX_TARGET_LEN).contains(&target.address.len()),
                    "an OPEN address the peer must refuse"
                );
                out.put_u8(target.kind.to_u8());
                out.put_u16(target.address.len() as u16);
                out.put_slice(target.address.as_bytes());
            }
            Frame::OpenOk { .. } | Frame::Fin { .. } => {}
            Frame::OpenErr { code, reason, .. } => {
                out.put_u16(code.to_u16());
                out.put_slice(clip(reason, MAX_REASON_LEN).as_bytes());
            }
            Frame::Rst { code, reason, .. } => {
                out.put_u16(code.to_u16());
                out.put_slice(clip(reason, MAX_REASON_LEN).as_bytes());
            }
            Frame::Data { payload, .. } => out.put_slice(payload),
            Frame::WindowUpdate { increment, .. } => out.put_u32(*increment),
        }
    }

    /// Writes the header of a DATA frame carrying `len` payload bytes on
    /// stream `id` (the payload itself follows it on the wire).
    pub fn encode_data_header(id: StreamId, len: usize, out: &mut [u8; HEADER_LEN]) {
        encode_header(FrameType::Data, id, len, out);
    }

    /// Decodes one frame from the front of `buf`, advancing it.
    ///
    /// Returns `Ok(None)` when `buf` is empty. `max_data_payload` bounds DATA
    /// payloads (the limit this side announced); CATALOG and REPLICAS by
    /// [`MAX_CATALOG_PAYLOAD`], other control frames by
    /// [`MAX_CONTROL_PAYLOAD`]. DATA payloads are zero-copy slices of `buf`.
    pub fn decode(buf: &mut Bytes, max_data_payload: usize) -> Result<Option<Frame>, FrameError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Truncated("header"));
        }
        let ty_byte = buf[0];
        let ty = FrameType::from_u8(ty_byte).ok_or(FrameError::UnknownType(ty_byte))?;
        let id = StreamId(u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]));
        let len = u32::from_be_bytes([buf[6], buf[7], buf[8], buf[9]]) as usize;
        let max = match ty {
            FrameType::Data => max_data_payload,
            FrameType::Catalog | FrameType::Replicas => MAX_CATALOG_PAYLOAD,
            _ => MAX_CONTROL_PAYLOAD,
        };
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        if buf.len() < HEADER_LEN + len {
            return Err(FrameError::Truncated("payload"));
        }
        buf.advance(HEADER_LEN);
        let mut p = buf.split_to(len);
        let session_frame = matches!(
            ty,
            FrameType::Hello
                | FrameType::HelloAck
                | FrameType::Ping
                | FrameType::Pong
                | FrameType::GoAway
                | FrameType::Catalog
                | FrameType::Replicas
                | FrameType::Heartbeat
        );
        if session_frame != (id == StreamId::SESSION) {
            return Err(FrameError::Malformed(
                type_name(ty),
                "stream id 0 is for session frames only",
            ));
        }
        let frame = match ty {
            FrameType::Hello | FrameType::HelloAck => {
                need(&p, 17, ty)?;
                let min_version = p.get_u16();
                let max_version = p.get_u16();
                let capabilities = p.get_u32();
                let initial_window = p.get_u32();
                let max_frame_payload = p.get_u32();
                let sw_len = p.get_u8() as usize;
                if p.len() != sw_len {
                    return Err(FrameError::Malformed(type_name(ty), "bad software length"));
                }
                let software = String::from_utf8_lossy(&p).into_owned();
                let h = Hello {
                    min_version,
                    max_version,
                    capabilities,
                    initial_window,
                    max_frame_payload,
                    software,
                };
                if ty == FrameType::Hello {
                    Frame::Hello(h)
                } else {
                    Frame::HelloAck(h)
                }
            }
            FrameType::Ping | FrameType::Pong => {
                if p.len() != 8 {
                    return Err(FrameError::Malformed(
                        type_name(ty),
                        "payload must be 8 bytes",
                    ));
                }
                let v = p.get_u64();
                if ty == FrameType::Ping {
                    Frame::Ping(v)
                } else {
                    Frame::Pong(v)
                }
            }
            FrameType::Heartbeat => {
                if p.len() != 8 {
                    return Err(FrameError::Malformed(
                        "HEARTBEAT",
                        "payload must be 8 bytes",
                    ));
                }
                let h = Heartbeat {
                    ping_interval_ms: p.get_u32(),
                    idle_timeout_ms: p.get_u32(),
                };
                if let Err(why) = h.check() {
                    return Err(FrameError::Malformed("HEARTBEAT", why));
                }
                Frame::Heartbeat(h)
            }
            FrameType::GoAway => {
                need(&p, 2, ty)?;
                let code = ErrorCode::from_u16(p.get_u16());
                Frame::GoAway {
                    code,
                    reason: lossy(&p),
                }
            }
            FrameType::Catalog => {
                let mut entries = Vec::new();
                while !p.is_empty() {
                    need(&p, 2, ty)?;
                    let kind = ServiceKind::from_u8(p.get_u8());
                    let name = entry_text(&mut p, "CATALOG")?;
                    let host = entry_text(&mut p, "CATALOG")?;
                    if name.is_empty() {
                        return Err(FrameError::Malformed("CATALOG", "empty service name"));
                    }
                    entries.push(CatalogEntry { name, kind, host });
                }
                Frame::Catalog(entries)
            }
            FrameType::Replicas => {
                need(&p, 8, ty)?;
                let generation = p.get_u64();
                let mut entries = Vec::new();
                while !p.is_empty() {
                    let flags = p.get_u8();
                    let id = entry_text(&mut p, "REPLICAS")?;
                    let addr = entry_text(&mut p, "REPLICAS")?;
                    if id.is_empty() && addr.is_empty() {
                        return Err(FrameError::Malformed(
                            "REPLICAS",
                            "an entry needs an id or an address",
                        ));
                    }
                    entries.push(ReplicaEntry {
                        id,
                        addr,
                        this: flags & 1 != 0,
                    });
                }
                Frame::Replicas(Replicas {
                    generation,
                    entries,
                })
            }
            FrameType::Open => {
                need(&p, 3, ty)?;
                let kind = TargetKind::from_u8(p.get_u8());
                let alen = p.get_u16() as usize;
                if alen != p.len() || alen == 0 || alen > MAX_TARGET_LEN {
                    return Err(FrameError::Malformed("OPEN", "bad target length"));
                }
                let address = std::str::from_utf8(&p)
                    .map_err(|_| FrameError::Malformed("OPEN", "target is not UTF-8"))?
                    .to_owned();
                Frame::Open {
                    id,
                    target: Target { kind, address },
                }
            }
            FrameType::OpenOk | FrameType::Fin => {
                if !p.is_empty() {
                    return Err(FrameError::Malformed(
                        type_name(ty),
                        "payload must be empty",
                    ));
                }
                if ty == FrameType::OpenOk {
                    Frame::OpenOk { id }
                } else {
                    Frame::Fin { id }
                }
            }
            FrameType::OpenErr => {
                need(&p, 2, ty)?;
                let code = OpenErrorCode::from_u16(p.get_u16());
                Frame::OpenErr {
                    id,
                    code,
                    reason: lossy(&p),
                }
            }
            FrameType::Rst => {
                need(&p, 2, ty)?;
                let code = ResetCode::from_u16(p.get_u16());
                Frame::Rst {
                    id,
                    code,
                    reason: lossy(&p),
                }
            }
            FrameType::Data => Frame::Data { id, payload: p },
            FrameType::WindowUpdate => {
                if p.len() != 4 {
                    return Err(FrameError::Malformed(
                        "WINDOW_UPDATE",
                        "payload must be 4 bytes",
                    ));
                }
                let increment = p.get_u32();
                if increment == 0 {
                    return Err(FrameError::Malformed(
                        "WINDOW_UPDATE",
                        "increment must be > 0",
                    ));
                }
                Frame::WindowUpdate { id, increment }
            }
        };
        Ok(Some(frame))
    }
}

/// The longest text of a CATALOG or REPLICAS entry, and of HELLO's software
/// name (each carries its length in one byte).
pub const MAX_ENTRY_TEXT: usize = 255;

fn catalog_entry_len(e: &CatalogEntry) -> usize {
    3 + e.name.len() + e.host.len()
}

/// Whether the peer can take a catalog entry: a name, and texts that fit
/// their length byte. One cut short would be wrong (a `Host` header
/// missing its port), so it is left out instead, as is one without a name
/// (the decoder refuses it, and with it the session).
fn catalog_sendable(e: &CatalogEntry) -> bool {
    (1..=MAX_ENTRY_TEXT).contains(&e.name.len()) && e.host.len() <= MAX_ENTRY_TEXT
}

/// The entries of a catalog the peer can take that fit in
/// [`MAX_CATALOG_PAYLOAD`] (the rest are left out rather than making a
/// frame the peer must refuse).
fn catalog_fit(entries: &[CatalogEntry]) -> impl Iterator<Item = &CatalogEntry> {
    within_payload(
        entries.iter().filter(|e| catalog_sendable(e)),
        0,
        catalog_entry_len,
    )
}

fn replica_entry_len(e: &ReplicaEntry) -> usize {
    3 + e.id.len() + e.addr.len()
}

/// The entries of a REPLICAS list the peer can take (an id or an address,
/// each fitting its length byte) that fit in [`MAX_CATALOG_PAYLOAD`].
fn replicas_fit(entries: &[ReplicaEntry]) -> impl Iterator<Item = &ReplicaEntry> {
    let sendable = |e: &&ReplicaEntry| {
        !(e.id.is_empty() && e.addr.is_empty())
            && e.id.len() <= MAX_ENTRY_TEXT
            && e.addr.len() <= MAX_ENTRY_TEXT
    };
    within_payload(entries.iter().filter(sendable), 8, replica_entry_len)
}

/// The first of `entries` whose lengths, after `fixed` bytes, stay within
/// [`MAX_CATALOG_PAYLOAD`].
fn within_payload<'a, E: 'a>(
    entries: impl Iterator<Item = &'a E>,
    fixed: usize,
    len: fn(&E) -> usize,
) -> impl Iterator<Item = &'a E> {
    entries.scan(fixed, move |total, e| {
        *total += len(e);
        (*total <= MAX_CATALOG_PAYLOAD).then_some(e)
    })
}

/// One `len:u8 utf8[len]` text of a CATALOG or REPLICAS entry.
fn entry_text(p: &mut Bytes, frame: &'static str) -> Result<String, FrameError> {
    if p.is_empty() {
        return Err(FrameError::Malformed(frame, "truncated entry"));
    }
    let n = p.get_u8() as usize;
    if p.len() < n {
        return Err(FrameError::Malformed(frame, "truncated entry"));
    }
    let t = p.split_to(n);
    std::str::from_utf8(&t)
        .map(str::to_owned)
        .map_err(|_| FrameError::Malformed(frame, "text is not UTF-8"))
}

fn need(p: &Bytes, n: usize, ty: FrameType) -> Result<(), FrameError> {
    if p.len() < n {
        Err(FrameError::Malformed(type_name(ty), "payload too short"))
    } else {
        Ok(())
    }
}

fn lossy(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    clip(&s, MAX_REASON_LEN).to_owned()
}

/// The fixed header every frame starts with: type, flags (none defined),
/// stream id, payload length (PROTOCOL.md section 3.1).
fn encode_header(kind: FrameType, id: StreamId, len: usize, out: &mut [u8; HEADER_LEN]) {
    out[0] = kind as u8;
    out[1] = 0;
    out[2..6].copy_from_slice(&id.0.to_be_bytes());
    out[6..10].copy_from_slice(&(len as u32).to_be_bytes());
}

/// `reason` as a frame carries it: at most [`MAX_REASON_LEN`] bytes, cut on
/// a char boundary. Reasons are clipped when queued, not only when encoded:
/// a peer that provokes refusals and reads slowly must not make the session
/// hold their full text.
pub fn clip_reason(reason: &str) -> &str {
    clip(reason, MAX_REASON_LEN)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The protocol name of a frame type, as in `docs/PROTOCOL.md`.
pub fn type_name(ty: FrameType) -> &'static str {
    match ty {
        FrameType::Hello => "HELLO",
        FrameType::HelloAck => "HELLO_ACK",
        FrameType::Ping => "PING",
        FrameType::Pong => "PONG",
        FrameType::GoAway => "GOAWAY",
        FrameType::Catalog => "CATALOG",
        FrameType::Replicas => "REPLICAS",
        FrameType::Heartbeat => "HEARTBEAT",
        FrameType::Open => "OPEN",
        FrameType::OpenOk => "OPEN_OK",
        FrameType::OpenErr => "OPEN_ERR",
        FrameType::Data => "DATA",
        FrameType::Fin => "FIN",
        FrameType::Rst => "RST",
        FrameType::WindowUpdate => "WINDOW_UPDATE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let mut out = BytesMut::new();
        f.encode(&mut out);
        assert_eq!(out.len(), f.encoded_len());
        let mut b = out.freeze();
        let got = Frame::decode(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(got, f);
        assert!(b.is_empty());
    }

    /// Entries the decoder would refuse (an empty name; both texts empty)
    /// or that a length byte cannot hold are left out, not sent to end the
    /// peer's session or cut into a wrong `Host`.
    #[test]
    fn entries_the_peer_cannot_take_are_left_out() {
        let entry = |name: &str, host: String| CatalogEntry {
            name: name.into(),
            kind: ServiceKind::Http,
            host,
        };
        let good = entry("web", "web.ns.svc:8080".into());
        let f = Frame::Catalog(vec![
            entry("", String::new()),
            good.clone(),
            entry(&"n".repeat(256), String::new()),
            entry("long", format!("{}:65535", "h".repeat(250))),
        ]);
        let mut out = BytesMut::new();
        f.encode(&mut out);
        assert_eq!(out.len(), f.encoded_len());
        let got = Frame::decode(&mut out.freeze(), 1 << 20).unwrap().unwrap();
        assert_eq!(got, Frame::Catalog(vec![good]));

        let replica = |id: &str, addr: &str, this| ReplicaEntry {
            id: id.into(),
            addr: addr.into(),
            this,
        };
        let me = replica("r0", "10.0.0.1:8443", true);
        let f = Frame::Replicas(Replicas {
            generation: 1,
            entries: vec![
                replica("", "", false),
                me.clone(),
                replica(&"i".repeat(256), "", false),
            ],
        });
        let mut out = BytesMut::new();
        f.encode(&mut out);
        assert_eq!(out.len(), f.encoded_len());
        let got = Frame::decode(&mut out.freeze(), 1 << 20).unwrap().unwrap();
        assert_eq!(
            got,
            Frame::Replicas(Replicas {
                generation: 1,
                entries: vec![me]
            })
        );
    }

    /// A HEARTBEAT frame with `payload`, encoded by hand.
    fn heartbeat_bytes(payload: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(FrameType::Heartbeat as u8);
        b.put_u8(0);
        b.put_u32(0);
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        b.freeze()
    }

    #[test]
    fn heartbeats_out_of_range_are_malformed() {
        let hb = |interval: u32, idle: u32| {
            let mut p = interval.to_be_bytes().to_vec();
            p.extend_from_slice(&idle.to_be_bytes());
            Frame::decode(&mut heartbeat_bytes(&p), 1 << 20)
        };
        assert!(hb(100, 101).is_ok());
        for (interval, idle, why) in [
            (99, 30_000, "below 100 ms"),
            (0, 30_000, "below 100 ms"),
            (10_000, 10_000, "not longer"),
            (10_000, 5_000, "not longer"),
        ] {
            let e = hb(interval, idle).unwrap_err().to_string();
            assert!(
                e.contains("HEARTBEAT") && e.contains(why),
                "{interval}/{idle}: {e}"
            );
        }
        for len in [0, 4, 7, 9, 16] {
            let e = Frame::decode(&mut heartbeat_bytes(&vec![1; len]), 1 << 20).unwrap_err();
            assert!(e.to_string().contains("8 bytes"), "{len}: {e}");
        }
    }

    #[test]
    fn replica_entries_need_an_id_or_an_address() {
        // generation, then one entry with flags, empty id, empty address.
        let mut payload = vec![0u8; 8];
        payload.extend_from_slice(&[0, 0, 0]);
        let mut b = BytesMut::new();
        b.put_u8(FrameType::Replicas as u8);
        b.put_u8(0);
        b.put_u32(0);
        b.put_u32(payload.len() as u32);
        b.put_slice(&payload);
        let e = Frame::decode(&mut b.freeze(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("an id or an address"), "{e}");
    }

    #[test]
    fn every_frame_type_roundtrips() {
        let h = Hello {
            min_version: 1,
            max_version: 3,
            capabilities: 0xdead,
            initial_window: 1 << 20,
            max_frame_payload: 65536,
            software: "tether 0.1.0".into(),
        };
        roundtrip(Frame::Hello(h.clone()));
        roundtrip(Frame::HelloAck(h));
        roundtrip(Frame::Ping(7));
        roundtrip(Frame::Catalog(vec![]));
        roundtrip(Frame::Catalog(vec![
            CatalogEntry {
                name: "grafana".into(),
                kind: ServiceKind::Http,
                host: "grafana.monitoring.svc".into(),
            },
            CatalogEntry {
                name: "grpc".into(),
                kind: ServiceKind::Http2,
                host: String::new(),
            },
            CatalogEntry {
                name: "db".into(),
                kind: ServiceKind::Other(9),
                host: String::new(),
            },
        ]));
        roundtrip(Frame::Pong(u64::MAX));
        roundtrip(Frame::Replicas(Replicas::default()));
        roundtrip(Frame::Heartbeat(Heartbeat {
            ping_interval_ms: 60_000,
            idle_timeout_ms: u32::MAX,
        }));
        roundtrip(Frame::Replicas(Replicas {
            generation: 7,
            entries: vec![
                ReplicaEntry {
                    id: "tether-server-0".into(),
                    addr: "10.1.2.3:8443".into(),
                    this: true,
                },
                ReplicaEntry {
                    id: String::new(),
                    addr: "[fd00::1]:8443".into(),
                    this: false,
                },
                ReplicaEntry {
                    id: "r3".into(),
                    addr: String::new(),
                    this: false,
                },
            ],
        }));
        roundtrip(Frame::GoAway {
            code: ErrorCode::Replaced,
            reason: "newer session".into(),
        });
        roundtrip(Frame::Open {
            id: StreamId(3),
            target: Target::tcp("prod/db"),
        });
        roundtrip(Frame::OpenOk { id: StreamId(3) });
        roundtrip(Frame::OpenErr {
            id: StreamId(3),
            code: OpenErrorCode::Refused,
            reason: "connection refused".into(),
        });
        roundtrip(Frame::Data {
            id: StreamId(5),
            payload: Bytes::from_static(b"hello"),
        });
        roundtrip(Frame::Fin { id: StreamId(5) });
        roundtrip(Frame::Rst {
            id: StreamId(5),
            code: ResetCode::Other(999),
            reason: String::new(),
        });
        roundtrip(Frame::WindowUpdate {
            id: StreamId(5),
            increment: 1,
        });
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        let mut b = Bytes::from_static(&[0x13, 0, 0, 0, 0]);
        assert_eq!(
            Frame::decode(&mut b, 100),
            Err(FrameError::Truncated("header"))
        );
        let mut b = Bytes::from_static(&[0x7f, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(
            Frame::decode(&mut b, 100),
            Err(FrameError::UnknownType(0x7f))
        );
        let mut b = Bytes::from_static(&[0x13, 0, 0, 0, 0, 1, 0, 0, 1, 0]);
        assert_eq!(
            Frame::decode(&mut b, 100),
            Err(FrameError::TooLarge { len: 256, max: 100 })
        );
        let mut b = Bytes::from_static(&[0x13, 0, 0, 0, 0, 1, 0, 0, 0, 4, 1, 2]);
        assert_eq!(
            Frame::decode(&mut b, 100),
            Err(FrameError::Truncated("payload"))
        );
        // DATA on stream 0 is malformed.
        let mut b = Bytes::from_static(&[0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            Frame::decode(&mut b, 100),
            Err(FrameError::Malformed(..))
        ));
        // A zero window increment is malformed.
        let mut b = Bytes::from_static(&[0x16, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0]);
        assert!(matches!(
            Frame::decode(&mut b, 100),
            Err(FrameError::Malformed(..))
        ));
    }

    #[test]
    fn long_reasons_are_clipped_on_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN); // 2 bytes each
        let f = Frame::Rst {
            id: StreamId(1),
            code: ResetCode::Cancel,
            reason,
        };
        let mut out = BytesMut::new();
        f.encode(&mut out);
        let mut b = out.freeze();
        match Frame::decode(&mut b, 0).unwrap().unwrap() {
            Frame::Rst { reason, .. } => assert_eq!(reason.len(), MAX_REASON_LEN),
            other => panic!("unexpected {other:?}"),
        }
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder and never make it loop.
        #[test]
        fn decoder_survives_garbage(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut b = Bytes::from(data);
            for _ in 0..600 {
                match Frame::decode(&mut b, 256) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// DATA frames of any content round-trip byte-exact.
        #[test]
        fn data_roundtrips(id in 1u32.., payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            roundtrip(Frame::Data { id: StreamId(id), payload: Bytes::from(payload) });
        }
    }
}
