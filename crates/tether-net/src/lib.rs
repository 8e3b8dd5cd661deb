//! The I/O half of tether: a tokio driver around the sans-I/O
//! [`tether_proto::Session`], the transports that carry it (WebSocket over
//! plain TCP or TLS), and the splicing of stream bytes onto sockets.
//!
//! * [`session`]: [`Connection`] (a running session) and [`Stream`] (one
//!   multiplexed stream, split into [`StreamReader`] / [`StreamWriter`]).
//! * [`error`]: why a stream operation failed ([`StreamError`], keeping the
//!   reset code) and why an open was refused ([`Refusal`]).
//! * [`transport`]: the message-transport seam ([`transport::MessageSink`],
//!   [`transport::MessageSource`]), its WebSocket and TLS implementations,
//!   and an in-memory pair for tests ([`transport::mem`]).
//! * [`splice`]: copying bytes both ways between two endpoints while keeping
//!   half-close.
//! * [`io`]: a stream as an `AsyncRead` + `AsyncWrite` byte pipe.
//! * [`stall`]: a byte pipe whose writes fail once its peer stops reading.
//! * [`reconnect`]: how an agent or a client reaches its server (trust,
//!   token, dial and handshake, the reconnect loop).

#![deny(missing_docs)]

pub mod chunk;
pub mod error;
pub mod io;
pub mod session;
pub mod splice;
pub mod transport;

pub use error::{Refusal, StreamError};
pub use session::{Connection, Incoming, SessionInfo, Stream, StreamReader, StreamWriter};

pub mod backoff;
pub mod dns;
pub mod early;
pub mod host;
pub mod keepalive;
pub mod listen;
pub mod log_gate;
pub mod observe;
pub mod pattern;
pub mod reconnect;
mod scratch;
pub mod sources;
pub mod stall;
pub mod tuning;
pub mod udp;
