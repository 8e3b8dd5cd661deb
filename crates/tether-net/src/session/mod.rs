//! The tokio driver around a sans-I/O [`Session`].
//!
//! Three tasks serve one session:
//!
//! * the **reader** feeds received messages into the session and hands the
//!   resulting events to streams. It never waits on a stream's consumer: a
//!   stream's inbox is unbounded in type but bounded by its flow-control
//!   window, which the session enforces;
//! * the **writer** is the only task that writes to the transport. It asks
//!   the session for the next batch (control frames first, then data
//!   round-robin) and sends it;
//! * the **timer** runs heartbeats, open timeouts, linger and drain.
//!
//! They share the session behind a mutex held only for short, non-blocking
//! state updates (the quinn pattern). Every update goes through
//! `Shared::with_session`, which also hands out the events the update
//! caused and wakes the writer or the timer when they have work.
//!
//! * `driver.rs`: [`Connection`] and the three tasks;
//! * `inbox.rs`: what the reader hands one stream, queued for its reader;
//! * `stream.rs`: the stream handles ([`Incoming`], [`Stream`],
//!   [`StreamReader`], [`StreamWriter`]);
//! * this file: the state they share and how a change to it is published
//!   (`Shared::with_session`, `dispatch`).

mod driver;
mod inbox;
mod stream;

pub use driver::{Connection, IncomingStreams};
pub use stream::{Incoming, Stream, StreamReader, StreamWriter};

use bytes::Bytes;
use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tether_proto::{
    CatalogEntry, ErrorCode, Event, OpenErrorCode, Session, SessionError, StreamId,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::chunk::{unpinned, unpinned_behind};
use crate::error::{Refusal, StreamError};
use crate::transport::MAX_SHARED_READ_BUFFER;

/// Unread bytes a stream may hold as slices of received messages under the
/// loose rule ([`unpinned`]); beyond this, only a chunk that is nearly its
/// whole message buffer stays a slice ([`unpinned_behind`]), so that a slow
/// reader pins little more than its unread bytes.
const UNREAD_BEFORE_COPY: usize = 64 * 1024;

/// The session's clock. Tokio's, so that tests with a paused clock drive the
/// session's deadlines too; the same as [`Instant::now`] otherwise.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What the reader tells a stream.
#[derive(Debug)]
enum Inbound {
    Data(Bytes),
    Fin,
    /// Always a [`StreamError::Reset`].
    Reset(StreamError),
}

/// Per-stream plumbing held by the driver.
struct Route {
    inbox: inbox::InboxTx,
    writable: Arc<Notify>,
    /// Why the stream was reset, for its writer (the reader learns it from
    /// its inbox).
    reset: Arc<OnceLock<StreamError>>,
    open_answer: Option<oneshot::Sender<Result<(), Refusal>>>,
}

struct Inner {
    session: Session,
    routes: HashMap<StreamId, Route>,
    incoming: Option<mpsc::Sender<Incoming>>,
    rtt: Option<Duration>,
    goaway: Option<ErrorCode>,
    /// Told once when the handshake succeeds or the session dies first.
    handshake: Option<oneshot::Sender<Result<SessionInfo, SessionError>>>,
    /// A deadline may have moved earlier: the timer must look again.
    timer_stale: bool,
    /// Length of the message being handled: its chunks are slices of a
    /// buffer of at most this or [`MAX_SHARED_READ_BUFFER`] bytes.
    input_len: usize,
}

impl Inner {
    /// Marks that the change under way may have moved a deadline earlier
    /// (an open, a GOAWAY, a half-close): `Shared::with_session` wakes the
    /// timer.
    fn deadlines_changed(&mut self) {
        self.timer_stale = true;
    }
}

/// Byte and stream counters of one connection (for logs and metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Payload bytes received on all streams.
    pub bytes_in: AtomicU64,
    /// Payload bytes sent on all streams.
    pub bytes_out: AtomicU64,
    /// Streams ever opened or accepted.
    pub streams_opened: AtomicU64,
}

/// What the peer told us in the handshake.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Negotiated protocol version.
    pub version: u16,
    /// The peer's software string.
    pub peer_software: String,
}

struct Shared {
    inner: Mutex<Inner>,
    writer_wake: Notify,
    timer_wake: Notify,
    closed_tx: watch::Sender<Option<String>>,
    /// Set when the peer's GOAWAY arrives.
    goaway_tx: watch::Sender<Option<ErrorCode>>,
    /// Set when this side starts a drain ([`Connection::go_away`]).
    own_goaway: watch::Sender<bool>,
    /// Set when the writer has closed the transport.
    transport_closed: watch::Sender<bool>,
    /// The services the peer announced (CATALOG, version 3).
    catalog: watch::Sender<Option<Vec<CatalogEntry>>>,
    /// The server replicas the peer listed (REPLICAS, version 4).
    replicas: watch::Sender<Option<tether_proto::Replicas>>,
    counters: Counters,
    label: String,
}

impl Shared {
    /// The state, for reading it. Changes go through `Shared::with_session`.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving anyway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the session: locks, runs `f`, hands every event the change
    /// caused to whoever waits for it, unlocks, then wakes the writer if
    /// there is something to send (or the session ended and the transport
    /// must close) and the timer if a deadline may have moved earlier.
    ///
    /// `f` must not block, and nothing dropped under the lock may take it
    /// again: a [`Stream`] or [`Incoming`] that `f` creates or takes must be
    /// returned and dropped by the caller, after this returns.
    fn with_session<R>(self: &Arc<Self>, f: impl FnOnce(&mut Inner) -> R) -> R {
        let (r, wake_writer, wake_timer) = {
            let mut g = self.lock();
            let r = f(&mut g);
            self.dispatch(&mut g);
            let wake_writer = g.session.wants_transmit() || g.session.is_closed();
            (r, wake_writer, std::mem::take(&mut g.timer_stale))
        };
        if wake_writer {
            self.writer_wake.notify_one();
        }
        if wake_timer {
            self.timer_wake.notify_one();
        }
        r
    }

    /// Registers the plumbing of stream `id` and returns its handle.
    fn attach(
        self: &Arc<Self>,
        g: &mut Inner,
        id: StreamId,
        open_answer: Option<oneshot::Sender<Result<(), Refusal>>>,
    ) -> Stream {
        let (tx, rx) = inbox::inbox();
        let writable = Arc::new(Notify::new());
        let reset = Arc::new(OnceLock::new());
        g.routes.insert(
            id,
            Route {
                inbox: tx,
                writable: writable.clone(),
                reset: reset.clone(),
                open_answer,
            },
        );
        Stream::new(self.clone(), id, rx, writable, reset)
    }

    /// Hands every pending session event to whoever waits for it. Runs with
    /// the lock held, at the end of `Shared::with_session`; never blocks.
    fn dispatch(self: &Arc<Self>, g: &mut Inner) {
        while let Some(ev) = g.session.poll_event() {
            match ev {
                Event::Established {
                    version,
                    peer_software,
                } => {
                    if let Some(tx) = g.handshake.take() {
                        let _ = tx.send(Ok(SessionInfo {
                            version,
                            peer_software,
                        }));
                    }
                    // The first PING is due now (its RTT seeds window tuning).
                    g.deadlines_changed();
                }
                Event::IncomingOpen { id, target } => {
                    let inc = Incoming::new(target, self.attach(g, id, None));
                    let refused = match &g.incoming {
                        Some(tx) => tx.try_send(inc).err().map(|e| match e {
                            mpsc::error::TrySendError::Full(i) => (i, "too many unanswered opens"),
                            mpsc::error::TrySendError::Closed(i) => (i, "not accepting streams"),
                        }),
                        None => Some((inc, "not accepting streams")),
                    };
                    if let Some((inc, why)) = refused {
                        // Answered right here: the Incoming's drop must not re-lock.
                        inc.disarm();
                        let code = if g.incoming.as_ref().is_some_and(|tx| !tx.is_closed()) {
                            OpenErrorCode::TooManyStreams
                        } else {
                            OpenErrorCode::NotAccepted
                        };
                        g.session.reject(id, code, why);
                    }
                }
                Event::Opened { id } => {
                    if let Some(tx) = g.routes.get_mut(&id).and_then(|r| r.open_answer.take()) {
                        let _ = tx.send(Ok(()));
                    }
                }
                Event::OpenFailed { id, code, reason } => {
                    if let Some(mut r) = g.routes.remove(&id) {
                        if let Some(tx) = r.open_answer.take() {
                            let _ = tx.send(Err(Refusal { code, reason }));
                        }
                    }
                }
                Event::Data { id, data } => {
                    self.counters
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(r) = g.routes.get(&id) {
                        // A chunk is a slice of the buffer its message was
                        // read into, and keeps all of it alive wherever it
                        // goes (an inbox, a relay's send queue). Copy it out
                        // when it is small against that buffer, and, once the
                        // reader is behind, unless it is nearly all of it (a
                        // bulk transfer's full message: a copy would free
                        // nothing, and cost a sixth of a relay's CPU).
                        let buffer = g.input_len.max(MAX_SHARED_READ_BUFFER);
                        let data = if g.session.stream_unread(id) > UNREAD_BEFORE_COPY {
                            unpinned_behind(data, buffer)
                        } else {
                            unpinned(data, buffer)
                        };
                        r.inbox.send(Inbound::Data(data));
                    }
                }
                Event::Finished { id } => {
                    if let Some(r) = g.routes.get(&id) {
                        r.inbox.send(Inbound::Fin);
                    }
                    g.deadlines_changed(); // linger starts
                }
                Event::Reset {
                    id,
                    code,
                    reason,
                    remote,
                } => {
                    if let Some(r) = g.routes.get(&id) {
                        let e = StreamError::Reset {
                            code,
                            reason,
                            remote,
                        };
                        let _ = r.reset.set(e.clone());
                        r.inbox.send(Inbound::Reset(e));
                        r.writable.notify_one();
                    }
                }
                Event::Writable { id } => {
                    if let Some(r) = g.routes.get(&id) {
                        r.writable.notify_one();
                    }
                }
                Event::Closed { id } => {
                    if let Some(r) = g.routes.remove(&id) {
                        r.writable.notify_one();
                    }
                }
                Event::GoAway { code, reason } => {
                    tracing::info!(session = %self.label, %code, %reason, "peer is draining the session (GOAWAY)");
                    g.goaway = Some(code);
                    self.goaway_tx.send_replace(Some(code));
                }
                Event::Rtt(d) => g.rtt = Some(d),
                Event::Heartbeat {
                    ping_interval,
                    idle_timeout,
                } => {
                    tracing::info!(
                        session = %self.label,
                        "heartbeat set by the server: PING every {ping_interval:?}, {idle_timeout:?} of silence ends the session"
                    );
                    g.deadlines_changed(); // the next PING may be due sooner
                }
                Event::Catalog(c) => {
                    self.catalog.send_replace(Some(c));
                }
                Event::Replicas(r) => {
                    self.replicas.send_replace(Some(r));
                }
                Event::SessionClosed { error } => {
                    // Dropping the last sender can drop queued Incomings, whose
                    // Drop takes this lock: never do it while holding it.
                    if let Some(tx) = g.incoming.take() {
                        match tokio::runtime::Handle::try_current() {
                            Ok(h) => {
                                h.spawn(async move { drop(tx) });
                            }
                            Err(_) => std::mem::forget(tx), // no runtime: process is ending
                        }
                    }
                    if let Some(tx) = g.handshake.take() {
                        let e = error
                            .clone()
                            .unwrap_or_else(|| SessionError::Transport("closed".into()));
                        let _ = tx.send(Err(e));
                    }
                    let why = error.map(|e| e.to_string()).unwrap_or_default();
                    self.closed_tx.send_replace(Some(why));
                    // The writer closes the transport (with_session wakes it:
                    // the session is closed); the timer task ends.
                    g.deadlines_changed();
                }
            }
        }
    }
}
