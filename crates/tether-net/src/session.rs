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
//! state updates (the quinn pattern).

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tether_proto::{
    CatalogEntry, Config, ErrorCode, Event, OpenErrorCode, ResetCode, Role, Session, SessionError,
    StreamId, StreamStats, Target, WriteError,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::transport::{MessageSink, MessageSource, MAX_SEND_MESSAGE};

/// After the session closed, how long the reader waits for the peer's close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A transport write that takes longer than this (the peer stopped reading)
/// fails the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// While frames wait to be sent, the peer must take at least
/// [`MIN_DRAIN_BYTES`] in every [`DRAIN_WINDOW`] (4 KiB/s on average), or the
/// session fails. A peer that reads a few bytes now and then keeps each
/// single write going; this judges it by what it drains instead. (What it
/// can make us hold meanwhile is bounded by the session's send buffers.)
const DRAIN_WINDOW: Duration = Duration::from_secs(30);
const MIN_DRAIN_BYTES: u64 = 120 * 1024;

/// Unread bytes a stream may hold as slices of received messages; beyond
/// this, new chunks are copied so that a slow reader pins no message buffer.
const UNREAD_BEFORE_COPY: usize = 64 * 1024;

/// Most incoming opens waiting for the application before new ones are refused.
const MAX_UNANSWERED_OPENS: usize = 256;

/// What the reader tells a stream.
#[derive(Debug)]
enum Inbound {
    Data(Bytes),
    Fin,
    Reset(ResetCode, String),
}

/// Per-stream plumbing held by the driver.
struct Route {
    inbox: mpsc::UnboundedSender<Inbound>,
    writable: Arc<Notify>,
    open_answer: Option<oneshot::Sender<Result<(), (OpenErrorCode, String)>>>,
}

struct Inner {
    session: Session,
    routes: HashMap<StreamId, Route>,
    incoming: Option<mpsc::Sender<Incoming>>,
    rtt: Option<Duration>,
    goaway: Option<ErrorCode>,
    /// Told once when the handshake succeeds or the session dies first.
    handshake: Option<oneshot::Sender<Result<SessionInfo, SessionError>>>,
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

struct Shared {
    inner: Mutex<Inner>,
    writer_wake: Notify,
    timer_wake: Notify,
    closed_tx: watch::Sender<Option<String>>,
    /// Set when the peer's GOAWAY arrives.
    goaway_tx: watch::Sender<Option<ErrorCode>>,
    /// Set when the writer has closed the transport.
    transport_closed: watch::Sender<bool>,
    /// The services the peer announced (CATALOG, version 3).
    catalog: watch::Sender<Option<Vec<CatalogEntry>>>,
    counters: Counters,
    label: String,
}

/// What the peer told us in the handshake.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Negotiated protocol version.
    pub version: u16,
    /// The peer's software string.
    pub peer_software: String,
}

/// A running session. Cheap to clone; every clone drives the same session.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

/// Receives the streams the peer opens.
pub type IncomingStreams = mpsc::Receiver<Incoming>;

impl Connection {
    /// Starts the driver on a transport and waits for the handshake.
    ///
    /// `label` names the session in logs (e.g. `agent=prod`). Incoming opens
    /// arrive on the returned receiver when `config.accept_opens` is set.
    pub async fn start<W: MessageSink, R: MessageSource>(
        role: Role,
        config: Config,
        sink: W,
        source: R,
        label: impl Into<String>,
    ) -> Result<(Connection, SessionInfo, IncomingStreams), SessionError> {
        let handshake_timeout = config.handshake_timeout;
        let (incoming_tx, incoming_rx) = mpsc::channel(MAX_UNANSWERED_OPENS);
        let (closed_tx, _) = watch::channel(None);
        let (est_tx, est_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                session: Session::new(role, config, Instant::now()),
                routes: HashMap::new(),
                incoming: Some(incoming_tx),
                rtt: None,
                goaway: None,
                handshake: Some(est_tx),
            }),
            writer_wake: Notify::new(),
            timer_wake: Notify::new(),
            closed_tx,
            goaway_tx: watch::channel(None).0,
            transport_closed: watch::channel(false).0,
            catalog: watch::channel(None).0,
            counters: Counters::default(),
            label: label.into(),
        });
        let conn = Connection { shared };
        tokio::spawn(reader_task(conn.shared.clone(), source));
        tokio::spawn(writer_task(conn.shared.clone(), sink));
        tokio::spawn(timer_task(conn.shared.clone()));
        conn.shared.writer_wake.notify_one(); // the initiator's HELLO
        match tokio::time::timeout(handshake_timeout + Duration::from_secs(1), est_rx).await {
            Ok(Ok(Ok(info))) => Ok((conn, info, incoming_rx)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) | Err(_) => {
                conn.close(ErrorCode::Timeout, "handshake did not finish");
                Err(SessionError::Timeout(handshake_timeout))
            }
        }
    }

    /// The label given at start (for logs).
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// Opens a stream and waits for the peer's answer.
    pub async fn open(&self, target: Target) -> Result<Stream, (OpenErrorCode, String)> {
        let (tx, rx) = oneshot::channel();
        let stream = {
            let mut g = self.lock();
            let id = g
                .session
                .open(target, Instant::now())
                .map_err(|e| (open_error_code(&e), e.to_string()))?;
            let s = self.attach(&mut g, id, Some(tx));
            self.shared.dispatch(&mut g);
            s
        };
        self.shared.writer_wake.notify_one();
        self.shared.timer_wake.notify_one();
        match rx.await {
            Ok(Ok(())) => {
                self.shared
                    .counters
                    .streams_opened
                    .fetch_add(1, Ordering::Relaxed);
                Ok(stream)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err((OpenErrorCode::SessionLost, "session ended".into())),
        }
    }

    /// Starts a graceful drain (GOAWAY).
    pub fn go_away(&self, code: ErrorCode, reason: &str) {
        let mut g = self.lock();
        g.session.go_away(code, reason, Instant::now());
        self.shared.dispatch(&mut g);
        drop(g);
        self.shared.writer_wake.notify_one();
        self.shared.timer_wake.notify_one();
    }

    /// Tells the peer which services this side offers (sent only when the
    /// session speaks version 3; a later call replaces the list).
    pub fn announce_catalog(&self, entries: Vec<CatalogEntry>) {
        let mut g = self.lock();
        g.session.announce_catalog(entries);
        drop(g);
        self.shared.writer_wake.notify_one();
    }

    /// The services the peer announced; `None` until it sends a catalog
    /// (a version 1 or 2 peer never does).
    pub fn peer_catalog(&self) -> watch::Receiver<Option<Vec<CatalogEntry>>> {
        self.shared.catalog.subscribe()
    }

    /// Closes the session now; every stream is reset.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        let mut g = self.lock();
        g.session.close(code, reason);
        self.shared.dispatch(&mut g);
        drop(g);
        self.shared.writer_wake.notify_one();
    }

    /// Resolves when the session is over, with the reason if it failed.
    pub async fn closed(&self) -> Option<String> {
        let mut rx = self.shared.closed_tx.subscribe();
        loop {
            if let Some(r) = rx.borrow().clone() {
                return if r.is_empty() { None } else { Some(r) };
            }
            if rx.changed().await.is_err() {
                return Some("driver gone".into());
            }
        }
    }

    /// Resolves when the peer sent GOAWAY (open new streams on a new
    /// session from now on) or the session ended.
    pub async fn draining(&self) {
        let mut goaway = self.shared.goaway_tx.subscribe();
        let mut closed = self.shared.closed_tx.subscribe();
        loop {
            if goaway.borrow().is_some() || closed.borrow().is_some() {
                return;
            }
            tokio::select! {
                r = goaway.changed() => if r.is_err() { return },
                r = closed.changed() => if r.is_err() { return },
            }
        }
    }

    /// Resolves once the writer closed the transport (after flushing the
    /// last frames, e.g. a GOAWAY, and the WebSocket close).
    pub async fn transport_closed(&self) {
        let mut rx = self.shared.transport_closed.subscribe();
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.shared.closed_tx.borrow().is_some()
    }

    /// Whether the peer sent GOAWAY (open new streams elsewhere).
    pub fn is_draining(&self) -> bool {
        let g = self.lock();
        g.goaway.is_some() || g.session.is_draining()
    }

    /// The code of the GOAWAY the peer sent, if it sent one.
    pub fn peer_goaway(&self) -> Option<ErrorCode> {
        self.lock().goaway
    }

    /// Stream counters of the session.
    pub fn stats(&self) -> StreamStats {
        self.lock().session.stats()
    }

    /// Latest measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.lock().rtt
    }

    /// Byte counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    fn attach(
        &self,
        g: &mut Inner,
        id: StreamId,
        open_answer: Option<oneshot::Sender<Result<(), (OpenErrorCode, String)>>>,
    ) -> Stream {
        let (tx, rx) = mpsc::unbounded_channel();
        let writable = Arc::new(Notify::new());
        g.routes.insert(
            id,
            Route {
                inbox: tx,
                writable: writable.clone(),
                open_answer,
            },
        );
        Stream::new(self.shared.clone(), id, rx, writable)
    }
}

fn open_error_code(e: &tether_proto::OpenError) -> OpenErrorCode {
    match e {
        tether_proto::OpenError::GoingAway => OpenErrorCode::GoingAway,
        tether_proto::OpenError::Closed | tether_proto::OpenError::NotEstablished => {
            OpenErrorCode::SessionLost
        }
        tether_proto::OpenError::IdsExhausted => OpenErrorCode::TooManyStreams,
        tether_proto::OpenError::BadTarget(_) => OpenErrorCode::BadTarget,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving anyway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands every pending session event to whoever waits for it. Called with
    /// the lock held after each change; never blocks.
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
                    self.timer_wake.notify_one();
                }
                Event::IncomingOpen { id, target } => {
                    let conn = Connection {
                        shared: self.clone(),
                    };
                    let stream = conn.attach(g, id, None);
                    let inc = Incoming {
                        target,
                        stream: Some(stream),
                    };
                    let refused = match &g.incoming {
                        Some(tx) => tx.try_send(inc).err().map(|e| match e {
                            mpsc::error::TrySendError::Full(i) => (i, "too many unanswered opens"),
                            mpsc::error::TrySendError::Closed(i) => (i, "not accepting streams"),
                        }),
                        None => Some((inc, "not accepting streams")),
                    };
                    if let Some((mut inc, why)) = refused {
                        // Answer right here; the Incoming's drop must not re-lock.
                        if let Some(mut s) = inc.stream.take() {
                            s.detached = true;
                        }
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
                            let _ = tx.send(Err((code, reason)));
                        }
                    }
                }
                Event::Data { id, data } => {
                    self.counters
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(r) = g.routes.get(&id) {
                        // A chunk is a slice of the whole transport message;
                        // kept in a slow reader's inbox it would pin all of
                        // it. Copy it out once the reader is behind.
                        let data = if g.session.stream_unread(id) > UNREAD_BEFORE_COPY {
                            Bytes::copy_from_slice(&data)
                        } else {
                            data
                        };
                        let _ = r.inbox.send(Inbound::Data(data));
                    }
                }
                Event::Finished { id } => {
                    if let Some(r) = g.routes.get(&id) {
                        let _ = r.inbox.send(Inbound::Fin);
                    }
                    self.timer_wake.notify_one(); // linger starts
                }
                Event::Reset {
                    id, code, reason, ..
                } => {
                    if let Some(r) = g.routes.get(&id) {
                        let _ = r.inbox.send(Inbound::Reset(code, reason));
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
                Event::Catalog(c) => {
                    self.catalog.send_replace(Some(c));
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
                    self.writer_wake.notify_one();
                    self.timer_wake.notify_one();
                }
            }
        }
    }
}

async fn reader_task<R: MessageSource>(shared: Arc<Shared>, mut source: R) {
    let mut closed = shared.closed_tx.subscribe();
    loop {
        let msg = tokio::select! {
            m = source.recv() => m,
            _ = async { let _ = closed.wait_for(Option::is_some).await; } => {
                // Closed by this side (timeout, error, drain): give the writer
                // a moment to send its GOAWAY and close, then let the socket go.
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    while let Ok(Some(_)) = source.recv().await {}
                })
                .await;
                return;
            }
        };
        let mut g = shared.lock();
        let result = match msg {
            Ok(Some(m)) => g.session.handle_input(m, Instant::now()),
            Ok(None) => {
                g.session.transport_lost("peer closed the connection");
                Err(SessionError::Transport(String::new()))
            }
            Err(e) => {
                let why = e.to_string();
                g.session.transport_lost(&why);
                Err(SessionError::Transport(why))
            }
        };
        shared.dispatch(&mut g);
        let wants = g.session.wants_transmit();
        let closed = g.session.is_closed();
        drop(g);
        if wants || closed {
            shared.writer_wake.notify_one();
        }
        if let Err(e) = &result {
            match e {
                // An orderly close of the transport is not worth a warning.
                SessionError::Transport(why) if why.is_empty() => {
                    tracing::debug!(session = %shared.label, "peer closed the transport")
                }
                _ => tracing::warn!(session = %shared.label, "session failed: {e}"),
            }
        }
        if closed {
            return;
        }
    }
}

async fn writer_task<W: MessageSink>(shared: Arc<Shared>, sink: W) {
    write_loop(&shared, sink).await;
    shared.transport_closed.send_replace(true);
}

async fn write_loop<W: MessageSink>(shared: &Arc<Shared>, mut sink: W) {
    let mut buf = BytesMut::new();
    let mut drain = DrainMeter::default();
    loop {
        let (has, closed) = {
            let mut g = shared.lock();
            buf.reserve(MAX_SEND_MESSAGE + 64 * 1024);
            let has = g
                .session
                .poll_transmit_at(&mut buf, MAX_SEND_MESSAGE, Some(Instant::now()));
            shared.dispatch(&mut g);
            (has, g.session.is_closed())
        };
        if has {
            let msg = buf.split().freeze();
            let len = msg.len();
            let sent = match tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("peer read nothing for {WRITE_TIMEOUT:?}"),
                )),
            };
            let sent = sent.and_then(|()| drain.sent(len, Instant::now()));
            if let Err(e) = sent {
                {
                    let mut g = shared.lock();
                    g.session.transport_lost(&format!("write failed: {e}"));
                    shared.dispatch(&mut g);
                }
                sink.close("write failed").await;
                return;
            }
        } else if closed {
            let why = shared.closed_tx.borrow().clone().unwrap_or_default();
            sink.close(if why.is_empty() {
                "session closed"
            } else {
                &why
            })
            .await;
            return;
        } else {
            drain.idle();
            shared.writer_wake.notified().await;
        }
    }
}

/// Measures how fast the peer takes what we send while a backlog lasts.
#[derive(Default)]
struct DrainMeter {
    /// Start of the current measuring window (None: no backlog).
    since: Option<Instant>,
    bytes: u64,
}

impl DrainMeter {
    /// The writer ran out of work: the peer keeps up.
    fn idle(&mut self) {
        self.since = None;
    }

    /// A message of `len` bytes went out at `now`; fails when the window
    /// ended with less than [`MIN_DRAIN_BYTES`] drained.
    fn sent(&mut self, len: usize, now: Instant) -> io::Result<()> {
        let since = *self.since.get_or_insert(now);
        self.bytes += len as u64;
        if now.saturating_duration_since(since) < DRAIN_WINDOW {
            return Ok(());
        }
        let drained = std::mem::take(&mut self.bytes);
        self.since = Some(now);
        if drained < MIN_DRAIN_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("peer took only {drained} bytes in {DRAIN_WINDOW:?} while more waited"),
            ));
        }
        Ok(())
    }
}

async fn timer_task(shared: Arc<Shared>) {
    loop {
        let deadline = {
            let g = shared.lock();
            match g.session.poll_timeout() {
                Some(d) => d,
                None => return,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                let mut g = shared.lock();
                g.session.handle_timeout(Instant::now());
                shared.dispatch(&mut g);
                let wants = g.session.wants_transmit() || g.session.is_closed();
                drop(g);
                if wants {
                    shared.writer_wake.notify_one();
                }
            }
            _ = shared.timer_wake.notified() => {}
        }
    }
}

/// A stream the peer asked to open. Answer with [`Incoming::accept`] or
/// [`Incoming::reject`]; dropping it unanswered rejects it.
pub struct Incoming {
    target: Target,
    stream: Option<Stream>,
}

impl Incoming {
    /// What the peer wants to reach.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The stream id (for logs).
    pub fn id(&self) -> StreamId {
        self.stream.as_ref().map_or(StreamId(0), |s| s.id)
    }

    /// Resolves if the opener gives up (RST) or the session ends before
    /// this open was answered.
    pub async fn cancelled(&mut self) {
        match self.stream.as_mut() {
            Some(s) => {
                // Nothing but a reset can arrive before OPEN_OK.
                let _ = s.inbox.recv().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Sends OPEN_OK and returns the stream.
    pub fn accept(mut self) -> io::Result<Stream> {
        let stream = self
            .stream
            .take()
            .ok_or_else(|| io::Error::other("already answered"))?;
        let shared = stream.shared.clone();
        {
            let mut g = shared.lock();
            let r = g.session.accept(stream.id, Instant::now());
            shared.dispatch(&mut g);
            r.map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e.to_string()))?;
        }
        shared.writer_wake.notify_one();
        shared
            .counters
            .streams_opened
            .fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// Sends OPEN_ERR with a code and a reason for the opener.
    pub fn reject(mut self, code: OpenErrorCode, reason: &str) {
        if let Some(mut s) = self.stream.take() {
            s.detached = true;
            let mut g = s.shared.lock();
            g.session.reject(s.id, code, reason);
            s.shared.dispatch(&mut g);
            drop(g);
            s.shared.writer_wake.notify_one();
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(mut s) = self.stream.take() {
            s.detached = true;
            let mut g = s.shared.lock();
            g.session
                .reject(s.id, OpenErrorCode::Internal, "open was not answered");
            s.shared.dispatch(&mut g);
            drop(g);
            s.shared.writer_wake.notify_one();
        }
    }
}

/// Why a stream operation failed.
fn stream_gone(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, why.into())
}

/// Resets the stream when the last half is dropped without a clean close.
struct StreamGuard {
    shared: Arc<Shared>,
    id: StreamId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut g = self.shared.lock();
        // A cleanly finished stream is already gone; this is a no-op then.
        g.session.stream_release(
            self.id,
            ResetCode::Cancel,
            "stream dropped by its application",
        );
        self.shared.dispatch(&mut g);
        let wants = g.session.wants_transmit();
        drop(g);
        if wants {
            self.shared.writer_wake.notify_one();
        }
    }
}

/// One multiplexed stream. Split it to read and write from two tasks.
pub struct Stream {
    shared: Arc<Shared>,
    id: StreamId,
    inbox: mpsc::UnboundedReceiver<Inbound>,
    writable: Arc<Notify>,
    /// Rejected before ever being handed out: no guard, no reset on drop.
    detached: bool,
}

impl Stream {
    fn new(
        shared: Arc<Shared>,
        id: StreamId,
        inbox: mpsc::UnboundedReceiver<Inbound>,
        writable: Arc<Notify>,
    ) -> Stream {
        Stream {
            shared,
            id,
            inbox,
            writable,
            detached: false,
        }
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Splits into a reading and a writing half. The stream is reset if both
    /// halves are dropped before it closed cleanly.
    pub fn split(mut self) -> (StreamReader, StreamWriter) {
        self.detached = true;
        let guard = Arc::new(StreamGuard {
            shared: self.shared.clone(),
            id: self.id,
        });
        let (dummy_tx, dummy_rx) = mpsc::unbounded_channel();
        drop(dummy_tx);
        let inbox = std::mem::replace(&mut self.inbox, dummy_rx);
        (
            StreamReader {
                shared: self.shared.clone(),
                id: self.id,
                inbox,
                done: false,
                _guard: guard.clone(),
            },
            StreamWriter {
                shared: self.shared.clone(),
                id: self.id,
                writable: self.writable.clone(),
                credit_wait: None,
                _guard: guard,
            },
        )
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.detached {
            let _ = StreamGuard {
                shared: self.shared.clone(),
                id: self.id,
            };
        }
    }
}

/// The reading half of a [`Stream`].
pub struct StreamReader {
    shared: Arc<Shared>,
    id: StreamId,
    inbox: mpsc::UnboundedReceiver<Inbound>,
    done: bool,
    _guard: Arc<StreamGuard>,
}

impl StreamReader {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The next chunk of bytes; `Ok(None)` once the peer finished (FIN).
    /// Reading a chunk returns its bytes to the peer's send window.
    pub async fn read(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_read_chunk(cx)).await
    }

    /// Poll form of [`StreamReader::read`].
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<Option<Bytes>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(Ok(None));
        }
        let Poll::Ready(next) = self.inbox.poll_recv(cx) else {
            return Poll::Pending;
        };
        Poll::Ready(match next {
            Some(Inbound::Data(b)) => {
                let mut g = self.shared.lock();
                g.session.stream_consumed(self.id, b.len(), Instant::now());
                let wants = g.session.wants_transmit();
                drop(g);
                if wants {
                    self.shared.writer_wake.notify_one();
                }
                Ok(Some(b))
            }
            Some(Inbound::Fin) => {
                self.done = true;
                Ok(None)
            }
            Some(Inbound::Reset(code, reason)) => {
                self.done = true;
                Err(stream_gone(format!("stream reset: {code}: {reason}")))
            }
            None => {
                self.done = true;
                Err(stream_gone("stream closed"))
            }
        })
    }
}

/// The writing half of a [`Stream`].
pub struct StreamWriter {
    shared: Arc<Shared>,
    id: StreamId,
    writable: Arc<Notify>,
    /// A pending wait for credit, for [`StreamWriter::poll_write_some`].
    credit_wait: Option<std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>>,
    _guard: Arc<StreamGuard>,
}

impl StreamWriter {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Sends all of `data`, waiting for flow-control credit as needed.
    pub async fn write(&mut self, mut data: Bytes) -> io::Result<()> {
        let total = data.len() as u64;
        while !data.is_empty() {
            let r = {
                let mut g = self.shared.lock();
                let r = g.session.stream_write(self.id, data.clone());
                self.shared.dispatch(&mut g);
                r
            };
            match r {
                Ok(0) => self.writable.notified().await,
                Ok(n) => {
                    let _ = data.split_to(n);
                    self.shared.writer_wake.notify_one();
                }
                Err(WriteError::UnknownStream) => return Err(stream_gone("stream is closed")),
                Err(e) => return Err(stream_gone(e.to_string())),
            }
        }
        self.shared
            .counters
            .bytes_out
            .fetch_add(total, Ordering::Relaxed);
        Ok(())
    }

    /// Queues all of `data` if the stream has the credit for it right now,
    /// and nothing otherwise (returns `false`). For datagrams, which are
    /// dropped rather than waited for.
    pub fn try_write(&mut self, data: Bytes) -> io::Result<bool> {
        let len = data.len();
        let r = {
            let mut g = self.shared.lock();
            if g.session.send_capacity(self.id) < len {
                return Ok(false);
            }
            let r = g.session.stream_write(self.id, data);
            self.shared.dispatch(&mut g);
            r
        };
        match r {
            Ok(_) => {
                self.shared.writer_wake.notify_one();
                self.shared
                    .counters
                    .bytes_out
                    .fetch_add(len as u64, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => Err(stream_gone(e.to_string())),
        }
    }

    /// Copies as much of `data` as the stream has credit for (at least one
    /// byte, waiting for credit when there is none). For byte-oriented
    /// callers such as [`crate::io::StreamIo`].
    pub fn poll_write_some(
        &mut self,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let r = {
                let mut g = self.shared.lock();
                // With no credit, a one-byte write is refused (Ok(0)) and
                // marks the stream blocked, so a Writable event follows.
                let n = g.session.send_capacity(self.id).clamp(1, data.len());
                let r = g
                    .session
                    .stream_write(self.id, Bytes::copy_from_slice(&data[..n]));
                self.shared.dispatch(&mut g);
                r
            };
            match r {
                Ok(n) if n > 0 => {
                    self.credit_wait = None;
                    self.shared.writer_wake.notify_one();
                    self.shared
                        .counters
                        .bytes_out
                        .fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(n));
                }
                Err(WriteError::UnknownStream) => {
                    return Poll::Ready(Err(stream_gone("stream is closed")))
                }
                Err(e) => return Poll::Ready(Err(stream_gone(e.to_string()))),
                Ok(_) => {
                    // No credit: wait for the Writable notification (its
                    // permit is kept if it fired before we got here).
                    let wait = self
                        .credit_wait
                        .get_or_insert_with(|| Box::pin(self.writable.clone().notified_owned()));
                    match std::future::Future::poll(wait.as_mut(), cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) => self.credit_wait = None,
                    }
                }
            }
        }
    }

    /// Half-closes at once (the non-async form of [`StreamWriter::finish`]).
    pub fn finish_now(&mut self) -> io::Result<()> {
        let r = {
            let mut g = self.shared.lock();
            let r = g.session.stream_finish(self.id);
            self.shared.dispatch(&mut g);
            r
        };
        self.shared.writer_wake.notify_one();
        self.shared.timer_wake.notify_one(); // linger starts
        r.map_err(|e| stream_gone(e.to_string()))
    }

    /// Half-closes: the peer reads EOF after everything written so far.
    pub async fn finish(&mut self) -> io::Result<()> {
        let r = {
            let mut g = self.shared.lock();
            let r = g.session.stream_finish(self.id);
            self.shared.dispatch(&mut g);
            r
        };
        self.shared.writer_wake.notify_one();
        self.shared.timer_wake.notify_one(); // linger starts
        r.map_err(|e| stream_gone(e.to_string()))
    }

    /// Aborts the stream in both directions.
    pub fn reset(&mut self, code: ResetCode, reason: &str) {
        let mut g = self.shared.lock();
        g.session.stream_reset(self.id, code, reason);
        self.shared.dispatch(&mut g);
        drop(g);
        self.shared.writer_wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_meter_fails_a_trickle_and_passes_a_slow_reader() {
        let t0 = Instant::now();
        let mut m = DrainMeter::default();
        // 1 KiB every 10 s through one window: too little.
        for i in 0..3 {
            assert!(m.sent(1024, t0 + DRAIN_WINDOW / 3 * i).is_ok());
        }
        assert!(m.sent(1024, t0 + DRAIN_WINDOW).is_err());

        // 64 KiB every 10 s (6.4 KiB/s): slow, but alive.
        let mut m = DrainMeter::default();
        for i in 0..10 {
            assert!(m.sent(64 * 1024, t0 + DRAIN_WINDOW / 3 * i).is_ok());
        }

        // Gaps with nothing to send start a new window.
        let mut m = DrainMeter::default();
        assert!(m.sent(10, t0).is_ok());
        m.idle();
        assert!(m.sent(10, t0 + DRAIN_WINDOW * 2).is_ok());
    }
}
