//! The I/O half of tether: a tokio driver around the sans-I/O
//! [`tether_proto::Session`], the transports that carry it (WebSocket over
//! plain TCP or TLS), and the splicing of stream bytes onto sockets.
//!
//! * [`session`]: [`Connection`] (a running session) and [`Stream`] (one
//!   multiplexed stream, split into [`StreamReader`] / [`StreamWriter`]).
//! * [`transport`]: the message-transport seam ([`transport::MessageSink`],
//!   [`transport::MessageSource`]) and its WebSocket and TLS implementations.
//! * [`splice`]: copying bytes both ways between two endpoints while keeping
//!   half-close.
//! * [`io`]: a stream as an `AsyncRead` + `AsyncWrite` byte pipe.

pub mod io;
pub mod session;
pub mod splice;
pub mod transport;

pub use session::{Connection, Incoming, SessionInfo, Stream, StreamReader, StreamWriter};

pub mod backoff;
pub mod observe;
pub mod pattern;
pub mod tuning;
pub mod udp;
