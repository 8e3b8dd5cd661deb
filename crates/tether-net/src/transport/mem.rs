//! An in-memory message transport: two connected ends in one process.
//!
//! For tests of anything that runs a session, in milliseconds and without
//! sockets: the driver's own tests, and any crate's in-process tests.
//!
//! ```
//! # async fn demo() -> Result<(), tether_proto::SessionError> {
//! use tether_net::transport::mem;
//! use tether_net::Connection;
//! use tether_proto::{Config, Role};
//!
//! let (a, b) = mem::pair();
//! let silence_b = b.sink.valve(); // what b sends, a no longer hears
//! let server = tokio::spawn(Connection::start(
//!     Role::Acceptor, Config::default(), b.sink, b.source, "b",
//! ));
//! let (client, _info, _incoming) =
//!     Connection::start(Role::Initiator, Config::default(), a.sink, a.source, "a").await?;
//! silence_b.pause(); // from now on `client` hears nothing: its idle timeout will fire
//! # drop((server, client)); Ok(()) }
//! ```
//!
//! Each direction is a bounded queue of whole messages: a sender waits when
//! it is full, as on a socket whose reader stopped reading. Each direction
//! can be paused with its [`Valve`]: nothing more is delivered (not even
//! the close) until it resumes, and nothing is lost, which is how a peer
//! that goes silent, or stops reading its socket, looks from the other end.
//! Closing a sink (or dropping it) ends the other end's source with an
//! orderly close (`Ok(None)`) once the queued messages are read.

use bytes::Bytes;
use std::io;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

use super::{MessageSink, MessageSource};

/// Messages each direction of [`pair`] holds before a sender waits.
pub const DEFAULT_CAPACITY: usize = 16;

/// One end of an in-memory link: hand both halves to
/// [`crate::Connection::start`].
pub struct MemEnd {
    /// Sends to the other end.
    pub sink: MemSink,
    /// Receives what the other end sends.
    pub source: MemSource,
}

/// Two connected ends, each direction holding [`DEFAULT_CAPACITY`] messages.
pub fn pair() -> (MemEnd, MemEnd) {
    pair_with_capacity(DEFAULT_CAPACITY)
}

/// A session over [`pair`], both ends through their handshake with the
/// default [`tether_proto::Config`]: the initiator (an agent's or client's
/// side) and the acceptor (the server's), each with the opens the other
/// sends it.
pub async fn sessions() -> Result<
    (
        (crate::Connection, crate::session::IncomingStreams),
        (crate::Connection, crate::session::IncomingStreams),
    ),
    tether_proto::SessionError,
> {
    use tether_proto::{Config, Role};
    let (initiator_end, acceptor_end) = pair();
    let acceptor = tokio::spawn(crate::Connection::start(
        Role::Acceptor,
        Config::default(),
        acceptor_end.sink,
        acceptor_end.source,
        "acceptor",
    ));
    let (initiator, _, initiator_opens) = crate::Connection::start(
        Role::Initiator,
        Config::default(),
        initiator_end.sink,
        initiator_end.source,
        "initiator",
    )
    .await?;
    let (acceptor, _, acceptor_opens) = acceptor
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    Ok(((initiator, initiator_opens), (acceptor, acceptor_opens)))
}

/// Two connected ends, each direction holding `messages` messages (at least
/// one) before a sender waits.
pub fn pair_with_capacity(messages: usize) -> (MemEnd, MemEnd) {
    let (a_sink, b_source) = direction(messages);
    let (b_sink, a_source) = direction(messages);
    (
        MemEnd {
            sink: a_sink,
            source: a_source,
        },
        MemEnd {
            sink: b_sink,
            source: b_source,
        },
    )
}

fn direction(messages: usize) -> (MemSink, MemSource) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let valve = Valve(Arc::new(watch::channel(false).0));
    (
        MemSink {
            tx: Some(tx),
            valve: valve.clone(),
        },
        MemSource { rx, valve },
    )
}

/// Pauses and resumes one direction of a link (see the [module docs](self)).
/// Clones control the same direction.
#[derive(Clone, Debug)]
pub struct Valve(Arc<watch::Sender<bool>>);

impl Valve {
    /// Stops delivering: the receiving end hears nothing more (the sender's
    /// messages wait in the queue, then the sender waits).
    pub fn pause(&self) {
        self.0.send_replace(true);
    }

    /// Delivers again, starting with what waited.
    pub fn resume(&self) {
        self.0.send_replace(false);
    }

    /// Whether the direction is paused.
    pub fn is_paused(&self) -> bool {
        *self.0.borrow()
    }
}

/// The sending half of one end.
pub struct MemSink {
    /// `None` once closed.
    tx: Option<mpsc::Sender<Bytes>>,
    valve: Valve,
}

impl MemSink {
    /// The valve of the direction this sink sends on.
    pub fn valve(&self) -> Valve {
        self.valve.clone()
    }
}

impl MessageSink for MemSink {
    async fn send(&mut self, msg: Bytes) -> io::Result<()> {
        let Some(tx) = &self.tx else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "transport closed",
            ));
        };
        tx.send(msg)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the other end is gone"))
    }

    async fn close(&mut self, _reason: &str) {
        self.tx = None;
    }
}

/// The receiving half of one end.
pub struct MemSource {
    rx: mpsc::Receiver<Bytes>,
    valve: Valve,
}

impl MemSource {
    /// The valve of the direction this source receives on.
    pub fn valve(&self) -> Valve {
        self.valve.clone()
    }
}

impl MessageSource for MemSource {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        // The valve's sender lives in `self.valve`: the waits below end
        // only by the valve turning.
        let mut gate = self.valve.0.subscribe();
        loop {
            let _ = gate.wait_for(|paused| !*paused).await.map(|_| ());
            tokio::select! {
                biased;
                _ = gate.wait_for(|paused| *paused) => continue,
                m = self.rx.recv() => return Ok(m),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn delivers_in_order_holds_while_paused_and_closes() {
        let (mut a, mut b) = pair_with_capacity(2);
        a.sink.send(Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(b.source.recv().await.unwrap().unwrap(), "1");

        let valve = a.sink.valve();
        valve.pause();
        assert!(b.source.valve().is_paused());
        a.sink.send(Bytes::from_static(b"2")).await.unwrap();
        a.sink.send(Bytes::from_static(b"3")).await.unwrap();
        // Full: the sender waits; the receiver hears nothing.
        let more = tokio::time::timeout(
            Duration::from_millis(20),
            a.sink.send(Bytes::from_static(b"4")),
        );
        assert!(more.await.is_err());
        let heard = tokio::time::timeout(Duration::from_millis(20), b.source.recv());
        assert!(heard.await.is_err());

        a.sink.close("bye").await;
        valve.resume();
        assert_eq!(b.source.recv().await.unwrap().unwrap(), "2");
        assert_eq!(b.source.recv().await.unwrap().unwrap(), "3");
        assert!(b.source.recv().await.unwrap().is_none());
        assert!(a.sink.send(Bytes::from_static(b"5")).await.is_err());

        // The other direction is independent, and sending to a dropped end fails.
        b.sink.send(Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(a.source.recv().await.unwrap().unwrap(), "x");
        drop(a);
        let e = b.sink.send(Bytes::from_static(b"y")).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
