//! The tether wire protocol, without any I/O.
//!
//! This crate holds two things:
//!
//! * [`frame`]: the binary frame format (see `docs/PROTOCOL.md`), encoding and a
//!   decoder that never panics on hostile input;
//! * [`Session`]: the session and stream state machine. It consumes bytes
//!   received from the peer ([`Session::handle_input`]), produces bytes to send
//!   ([`Session::poll_transmit`]), reports what happened ([`Session::poll_event`])
//!   and tells when it next needs the clock ([`Session::poll_timeout`]).
//!
//! Nothing here touches a socket, a task or the system clock: time is passed
//! in as [`std::time::Instant`] values. The tokio driver in `tether-net` is a
//! thin shell around it, and the tests in this crate drive two sessions
//! against each other deterministically.

#![deny(missing_docs)]

pub mod codes;
pub mod endpoints;
pub mod frame;
pub mod queue;
mod session;
mod stream;
pub mod target;
pub mod transmit;

pub use codes::{ErrorCode, OpenErrorCode, ResetCode};
pub use frame::{
    CatalogEntry, Frame, FrameError, FrameType, Heartbeat, ReplicaEntry, Replicas, ServiceKind,
    StreamId, Target, TargetKind,
};
pub use queue::InlineQueue;
pub use session::{
    Config, Event, OpenError, Role, Session, SessionError, StreamBytes, StreamStats, WriteError,
    DEFAULT_DRAIN_TIMEOUT,
};
pub use stream::CHUNK_COST;
pub use transmit::{FrameBuf, Transmit};

/// The WebSocket subprotocol that carries version 1 of this protocol.
pub const SUBPROTOCOL: &str = "tether.v1";

/// The newest protocol version this build speaks. Version 2 adds UDP
/// streams (kind 2, length-prefixed datagrams); version 3 adds the CATALOG
/// frame (the services an agent offers); version 4 adds the REPLICAS frame
/// (the server replicas an agent should hold a session to); version 5 lets
/// the opener send its first bytes with the OPEN (early data); version 6
/// adds the catalog kind HTTP/2; version 7 adds the HEARTBEAT frame (the
/// acceptor sets the initiator's PING interval) and sends REPLICAS only on a
/// change; version 8 adds the `tether-unmasked` WebSocket extension, agreed
/// in the upgrade, before HELLO (tether-net's `transport::ws`); version 9
/// adds the agent's `X-Tether-Held` upgrade header and the server's `409`
/// refusal ([`endpoints::AGENT_HELD_HEADER`]); everything else is as in 1.
pub const PROTOCOL_VERSION: u16 = 9;

/// The first version whose servers know the agent's `X-Tether-Held` and
/// `X-Tether-Probe` upgrade headers ([`endpoints`]).
pub const PROBE_VERSION: u16 = 9;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The first version that carries UDP streams.
pub const UDP_VERSION: u16 = 2;

/// The first version that carries CATALOG frames.
pub const CATALOG_VERSION: u16 = 3;

/// The first version that carries REPLICAS frames.
pub const REPLICAS_VERSION: u16 = 4;

/// The first version in which the opener may send DATA (early data) on a
/// stream before its OPEN_OK.
pub const EARLY_DATA_VERSION: u16 = 5;

/// The first version whose CATALOG may carry kind 3 (an HTTP/2 service).
pub const HTTP2_SERVICE_VERSION: u16 = 6;

/// The first version that carries HEARTBEAT frames.
pub const HEARTBEAT_VERSION: u16 = 7;

/// The first version in which a server sends REPLICAS only after HELLO_ACK
/// and when its list changes; earlier sessions also get it every 30 s, as
/// version 4 promised them.
pub const REPLICAS_ON_CHANGE_VERSION: u16 = 7;

/// Most early data [`Session::open_with`] takes: the smallest receive
/// window a peer may announce, so it always fits the peer's credit, and
/// small enough that it may bypass the send buffers' limits.
pub const MAX_EARLY_DATA: usize = 4096;

pub mod datagram;
