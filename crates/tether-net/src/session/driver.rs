//! [`Connection`]: a running session, and the three tasks that drive it
//! (reader, writer, timer; see the [module docs](super)).

use bytes::{Bytes, BytesMut};
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use tether_proto::{
    CatalogEntry, Config, ErrorCode, FrameBuf, OpenError, OpenErrorCode, Role, Session,
    SessionError, StreamStats, Target, Transmit,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::{now, Counters, Incoming, Inner, SessionInfo, Shared, Stream};
use crate::error::Refusal;
use crate::transport::{MessageSink, MessageSource, MAX_SEND_BATCH, MAX_SEND_MESSAGE};

/// After the session closed, how long the reader waits for the peer's close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A transport write that takes longer than this per message it carries
/// (the peer stopped reading) fails the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// While frames wait to be sent, the peer must take at least
/// [`MIN_DRAIN_BYTES`] in every [`DRAIN_WINDOW`] (4 KiB/s on average), or the
/// session fails. A peer that reads a few bytes now and then keeps each
/// single write going; this judges it by what it drains instead. (What it
/// can make us hold meanwhile is bounded by the session's send buffers.)
const DRAIN_WINDOW: Duration = Duration::from_secs(30);
const MIN_DRAIN_BYTES: u64 = 120 * 1024;

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
        // As many unanswered opens as the peer may have streams: a burst of
        // opens in one message (a 64 KiB message holds ~2000) is queued, not
        // refused to whoever happens to be in it; the session itself refuses
        // opens beyond max_peer_streams.
        let (incoming_tx, incoming_rx) = mpsc::channel(config.max_peer_streams.max(1));
        let (est_tx, est_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                session: Session::new(role, config, now()),
                routes: Default::default(),
                incoming: Some(incoming_tx),
                rtt: None,
                goaway: None,
                handshake: Some(est_tx),
                timer_stale: false,
                input_len: 0,
            }),
            writer_wake: Notify::new(),
            timer_wake: Notify::new(),
            closed_tx: watch::channel(None).0,
            goaway_tx: watch::channel(None).0,
            own_goaway: watch::channel(false).0,
            transport_closed: watch::channel(false).0,
            catalog: watch::channel(None).0,
            replicas: watch::channel(None).0,
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
    pub async fn open(&self, target: Target) -> Result<Stream, Refusal> {
        self.open_with(target, Bytes::new()).await
    }

    /// Opens a stream whose first bytes (at most
    /// [`tether_proto::MAX_EARLY_DATA`]) travel with the OPEN when the peer
    /// speaks version 5, and waits for the peer's answer. A refusal from
    /// the acceptor that holds the target means `early` never reached it;
    /// a session lost before the answer, a relay's refusal or one made
    /// here (this side reset the open) does not say either way
    /// (PROTOCOL.md 6.3).
    pub async fn open_with(&self, target: Target, early: Bytes) -> Result<Stream, Refusal> {
        let (tx, rx) = oneshot::channel();
        let stream = self.shared.with_session(|g| {
            let id = g
                .session
                .open_with(target, early, now())
                .map_err(|e| Refusal::new(open_error_code(&e), e.to_string()))?;
            g.deadlines_changed(); // the open timeout
            Ok::<_, Refusal>(self.shared.attach(g, id, Some(tx)))
        })?;
        match rx.await {
            Ok(Ok(())) => {
                self.shared
                    .counters
                    .streams_opened
                    .fetch_add(1, Ordering::Relaxed);
                Ok(stream)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Refusal::new(OpenErrorCode::SessionLost, "session ended")),
        }
    }

    /// Whether `other` is a handle to this same session.
    pub fn same_session(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// A number that tells this session from every other one alive (the
    /// address its handles share): a key for state kept per session. A
    /// session that ended may leave its number to a new one.
    pub fn key(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// The negotiated protocol version (0 before the handshake).
    pub fn version(&self) -> u16 {
        self.shared.lock().session.version()
    }

    /// Starts a graceful drain (GOAWAY).
    pub fn go_away(&self, code: ErrorCode, reason: &str) {
        self.shared.with_session(|g| {
            g.session.go_away(code, reason, now());
            g.deadlines_changed(); // the drain deadline
        });
        self.shared.own_goaway.send_replace(true);
    }

    /// Tells the peer which services this side offers (sent only when the
    /// session speaks version 3; a later call replaces the list).
    pub fn announce_catalog(&self, entries: Vec<CatalogEntry>) {
        self.shared
            .with_session(|g| g.session.announce_catalog(entries));
    }

    /// The services the peer announced; `None` until it sends a catalog
    /// (a version 1 or 2 peer never does).
    pub fn peer_catalog(&self) -> watch::Receiver<Option<Vec<CatalogEntry>>> {
        self.shared.catalog.subscribe()
    }

    /// Tells the peer (an agent) which server replicas exist (sent only
    /// when the session speaks version 4; a later call replaces the list).
    pub fn announce_replicas(&self, replicas: tether_proto::Replicas) {
        self.shared
            .with_session(|g| g.session.announce_replicas(replicas));
    }

    /// The replicas the peer (a server) listed; `None` until it sends a
    /// list (a server older than version 4 never does).
    pub fn peer_replicas(&self) -> watch::Receiver<Option<tether_proto::Replicas>> {
        self.shared.replicas.subscribe()
    }

    /// Closes the session now; every stream is reset.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        self.shared.with_session(|g| g.session.close(code, reason));
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

    /// Resolves when either side began a drain (this side's
    /// [`Connection::go_away`] or the peer's GOAWAY) or the session ended:
    /// what [`Connection::is_draining`] says, awaited. For state kept for
    /// new streams on this session (a pool of idle ones), which must go
    /// whoever started the drain; [`Connection::draining`] is the peer's
    /// word alone.
    pub async fn drain_begun(&self) {
        let mut own = self.shared.own_goaway.subscribe();
        tokio::select! {
            () = self.draining() => {}
            _ = own.wait_for(|begun| *begun) => {}
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

    /// Whether either side began a drain (open new streams elsewhere).
    pub fn is_draining(&self) -> bool {
        let g = self.shared.lock();
        g.goaway.is_some() || g.session.is_draining()
    }

    /// The code of the GOAWAY the peer sent, if it sent one.
    pub fn peer_goaway(&self) -> Option<ErrorCode> {
        self.shared.lock().goaway
    }

    /// Stream counters of the session.
    pub fn stats(&self) -> StreamStats {
        self.shared.lock().session.stats()
    }

    /// Bytes written and received on stream `id` of this session so far
    /// (`None` once the stream is gone).
    pub fn stream_bytes(&self, id: tether_proto::StreamId) -> Option<tether_proto::StreamBytes> {
        self.shared.lock().session.stream_bytes(id)
    }

    /// Latest measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.lock().rtt
    }

    /// Byte counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }
}

fn open_error_code(e: &OpenError) -> OpenErrorCode {
    match e {
        OpenError::GoingAway => OpenErrorCode::GoingAway,
        OpenError::Closed | OpenError::NotEstablished => OpenErrorCode::SessionLost,
        OpenError::IdsExhausted => OpenErrorCode::TooManyStreams,
        OpenError::BadTarget(_) => OpenErrorCode::BadTarget,
        OpenError::EarlyDataTooLarge(_) => OpenErrorCode::Internal,
    }
}

async fn reader_task<R: MessageSource>(shared: Arc<Shared>, mut source: R) {
    let mut closed = shared.closed_tx.subscribe();
    // One wait for the whole session, not one per message: a fresh
    // `wait_for` registers with the channel again each time (about 250
    // instructions per message read, 2 % of a relay's round trip).
    let closing = async move {
        let _ = closed.wait_for(Option::is_some).await;
    };
    tokio::pin!(closing);
    loop {
        let msg = tokio::select! {
            m = source.recv() => m,
            _ = &mut closing => {
                // Closed by this side (timeout, error, drain): give the writer
                // a moment to send its GOAWAY and close, then let the socket go.
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    while let Ok(Some(_)) = source.recv().await {}
                })
                .await;
                return;
            }
        };
        let (result, closed) = shared.with_session(|g| {
            let result = match msg {
                Ok(Some(m)) => {
                    g.input_len = m.len();
                    g.session.handle_input(m, now())
                }
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
            (result, g.session.is_closed())
        });
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

/// `write`, failed with `TimedOut` if it takes longer than `limit`. The
/// timer is armed only for a write that does not finish at its first poll:
/// most do (the socket has room), and arming and dropping a timer for each
/// costs a small message more than its write's own work (about 400 of some
/// 12 000 instructions a relay spends per 64-byte round trip; bench/README.md,
/// session 46).
/// (`write` comes pinned where it was made: moved in here, a large future
/// would be copied twice more.)
async fn within<F: Future<Output = io::Result<()>>>(
    limit: Duration,
    mut write: Pin<&mut F>,
) -> io::Result<()> {
    if let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
    {
        return done;
    }
    match tokio::time::timeout(limit, write).await {
        Ok(done) => done,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("peer read nothing for {limit:?}"),
        )),
    }
}

async fn writer_task<W: MessageSink>(shared: Arc<Shared>, sink: W) {
    write_loop(&shared, sink).await;
    shared.transport_closed.send_replace(true);
}

thread_local! {
    /// The room the last message encoded on this thread left in its buffer,
    /// where the next one is encoded (see `Transmit::with_buffer`): one
    /// allocation per many small messages. Per thread, not per session, so
    /// that an idle session holds none.
    static SPARE_ROOM: Cell<BytesMut> = Cell::new(BytesMut::new());
}

async fn write_loop<W: MessageSink>(shared: &Arc<Shared>, mut sink: W) {
    // A transport that takes the parts as they are (a WebSocket writes
    // them vectored, or masks them into its own buffer in one pass) gets
    // large payloads by reference; any other, one buffer to write whole.
    let by_reference = sink.takes_parts();
    // A message may pass MAX_SEND_MESSAGE by the frame that crosses it.
    let room = if by_reference {
        8 * 1024 // frame headers and small payloads
    } else {
        MAX_SEND_MESSAGE + 64 * 1024
    };
    let mut drain = DrainMeter::default();
    // The messages of one write, kept with its room from write to write (a
    // small message each time would otherwise allocate it).
    let mut batch: Vec<Vec<Bytes>> = Vec::new();
    // Whether the last message written was full: a bulk transfer is on.
    let mut last_full = false;
    loop {
        if std::mem::take(&mut last_full) {
            // Let the tasks that fill the streams run before the next
            // message is framed. A writer that never waits drains a bulk
            // stream's whole send buffer while the task refilling it (woken
            // at half) cannot run, so every buffer's last bytes went as a
            // small message of their own, one in five on a lone stream,
            // each a segment and a wake-up on every hop after it. After the
            // refill they fill the next message. One scheduler round per
            // 64 KiB; small messages never get here.
            tokio::task::yield_now().await;
        }
        // A full message while two or more streams still wait (a
        // multiplexed bulk transfer), or while a relayed stream is next
        // (Session::batch_sends): take up to MAX_SEND_BATCH for one write
        // (see there). (When more is left, this wakes the writer itself: at
        // most one extra look once the backlog is gone.)
        batch.clear(); // (a failed write may leave some)
        let mut len = 0;
        let mut spare = SPARE_ROOM.take();
        let mut notice = false;
        let closed = shared.with_session(|g| {
            while len < MAX_SEND_BATCH {
                let mut msg = Transmit::with_buffer(by_reference, std::mem::take(&mut spare), room);
                let more = g
                    .session
                    .poll_transmit_at(&mut msg, MAX_SEND_MESSAGE, Some(now()));
                let msg_len = msg.len();
                let (parts, rest) = msg.into_parts_and_buffer();
                spare = rest;
                if !more {
                    break;
                }
                len += msg_len;
                let full = msg_len >= MAX_SEND_MESSAGE;
                last_full = full;
                batch.push(parts);
                if !full || !g.session.batch_sends() {
                    break;
                }
            }
            // A probe PING is in this write: its answer is awaited from
            // when the write is done (Session::transmitted).
            notice = g.session.wants_transmit_notice();
            g.session.is_closed()
        });
        SPARE_ROOM.set(spare);
        if !batch.is_empty() {
            // A batch gets each message's time: a slow but live peer is
            // judged by the drain rate below, not by how many messages one
            // write happens to carry.
            let timeout = WRITE_TIMEOUT * batch.len() as u32;
            let sent = {
                let send = std::pin::pin!(sink.send_batch(&mut batch));
                within(timeout, send).await
            };
            let sent = sent.and_then(|()| drain.sent(len, now()));
            if let Err(e) = sent {
                shared.with_session(|g| g.session.transport_lost(&format!("write failed: {e}")));
                sink.close("write failed").await;
                return;
            }
            if notice {
                shared.with_session(|g| {
                    g.session.transmitted(now());
                    g.deadlines_changed(); // the probe's deadline starts now
                });
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

    /// A write of `len` bytes (one message or a batch) went out at `now`;
    /// fails when the window ended with less than [`MIN_DRAIN_BYTES`]
    /// drained.
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
                shared.with_session(|g| g.session.handle_timeout(now()));
            }
            _ = shared.timer_wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_is_timed_only_once_it_waits() {
        let limit = Duration::from_secs(30);
        // Done at the first poll: no timer, the write's own result.
        let done = std::pin::pin!(async { Err(io::Error::other("refused")) });
        let r = within(limit, done).await;
        assert_eq!(r.map_err(|e| e.to_string()), Err("refused".to_owned()));
        // Done after a wait shorter than the limit.
        let t0 = tokio::time::Instant::now();
        let slow = std::pin::pin!(async {
            tokio::time::sleep(Duration::from_secs(29)).await;
            Ok(())
        });
        assert!(within(limit, slow).await.is_ok());
        assert_eq!(t0.elapsed(), Duration::from_secs(29));
        // Never done: timed out at the limit, counted from the first poll.
        let t0 = tokio::time::Instant::now();
        let stuck = std::pin::pin!(std::future::pending::<io::Result<()>>());
        let r = within(limit, stuck).await;
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::TimedOut));
        assert_eq!(t0.elapsed(), limit);
    }

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
