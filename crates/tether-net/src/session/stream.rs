//! The stream handles: [`Incoming`] (an open waiting for an answer),
//! [`Stream`] and its halves [`StreamReader`] / [`StreamWriter`].

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use tether_proto::{OpenErrorCode, ResetCode, StreamId, Target, WriteError};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use super::inbox::InboxRx;
use super::{now, Inbound, Shared};
use crate::error::StreamError;

/// A stream the peer asked to open. Answer with [`Incoming::accept`] or
/// [`Incoming::reject`]; dropping it unanswered rejects it.
pub struct Incoming {
    target: Target,
    stream: Option<Stream>,
}

impl Incoming {
    pub(super) fn new(target: Target, stream: Stream) -> Incoming {
        Incoming {
            target,
            stream: Some(stream),
        }
    }

    /// Drops the open without answering it and without touching the
    /// session (the caller answers it, holding the lock).
    pub(super) fn disarm(mut self) {
        if let Some(mut s) = self.stream.take() {
            s.detached = true;
        }
    }

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
            // Early data may arrive before the answer; it stays queued.
            Some(s) => s.inbox.reset_or_gone().await,
            None => std::future::pending().await,
        }
    }

    /// The opener's early data that has arrived so far, up to `max` bytes,
    /// taken without waiting (empty when there is none): a relay passes it
    /// on with its own open. What is taken counts as read (its credit goes
    /// back to the opener); the rest stays for the accepted stream's reader,
    /// in order.
    pub fn take_early_data(&mut self, max: usize) -> Bytes {
        let Some(s) = self.stream.as_mut() else {
            return Bytes::new();
        };
        let chunks = s.inbox.take_front_data(max);
        let n: usize = chunks.iter().map(Bytes::len).sum();
        if n == 0 {
            return Bytes::new();
        }
        let id = s.id;
        s.shared
            .with_session(|g| g.session.stream_consumed(id, n, now()));
        match <[Bytes; 1]>::try_from(chunks) {
            Ok([one]) => one,
            Err(many) => Bytes::from(many.concat()),
        }
    }

    /// Sends OPEN_OK and returns the stream. Fails when the opener gave up
    /// or the session ended meanwhile.
    pub fn accept(mut self) -> Result<Stream, StreamError> {
        let stream = self.stream.take().ok_or(StreamError::NotOpen)?;
        let shared = stream.shared.clone();
        shared
            .with_session(|g| g.session.accept(stream.id, now()))
            .map_err(|e| stream.write_error(e))?;
        shared
            .counters
            .streams_opened
            .fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// Sends OPEN_ERR with a code and a reason for the opener.
    pub fn reject(mut self, code: OpenErrorCode, reason: &str) {
        self.answer_refused(|_| (code, reason));
    }

    /// Sends OPEN_ERR with the code and reason `refusal` picks, told
    /// whether the session is draining.
    fn answer_refused<'r>(&mut self, refusal: impl FnOnce(bool) -> (OpenErrorCode, &'r str)) {
        if let Some(mut s) = self.stream.take() {
            s.detached = true;
            s.shared.with_session(|g| {
                let (code, reason) = refusal(g.session.is_draining());
                g.session.reject(s.id, code, reason)
            });
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Dropped unanswered while the session drains (its application
        // stopped taking opens at the GOAWAY, as an agent does when its
        // session is replaced): `going_away`, which openers retry on
        // another session. Otherwise this side failed to answer.
        self.answer_refused(|draining| {
            if draining {
                (OpenErrorCode::GoingAway, "the session is draining")
            } else {
                (OpenErrorCode::Internal, "open was not answered")
            }
        });
    }
}

/// Resets the stream when the last half is dropped without a clean close.
struct StreamGuard {
    shared: Arc<Shared>,
    id: StreamId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // A cleanly finished stream is already gone; this is a no-op then.
        self.shared.with_session(|g| {
            g.session.stream_release(
                self.id,
                ResetCode::Cancel,
                "stream dropped by its application",
            )
        });
    }
}

/// One multiplexed stream. Split it to read and write from two tasks.
pub struct Stream {
    shared: Arc<Shared>,
    id: StreamId,
    inbox: InboxRx,
    writable: Arc<Notify>,
    reset: Arc<OnceLock<StreamError>>,
    /// Rejected before ever being handed out: no guard, no reset on drop.
    detached: bool,
}

impl Stream {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: StreamId,
        inbox: InboxRx,
        writable: Arc<Notify>,
        reset: Arc<OnceLock<StreamError>>,
    ) -> Stream {
        Stream {
            shared,
            id,
            inbox,
            writable,
            reset,
            detached: false,
        }
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Marks the stream as relayed from another session: its bytes come
    /// from a session where they arrived in whole messages, and its own
    /// session's writer takes several messages per write even while this
    /// stream sends alone (a relay between two sessions moved 9 % more that
    /// way; a stream fed from a socket moved 7-14 % less, so only relays
    /// ask for it).
    pub fn mark_relayed(&self) {
        self.shared.with_session(|g| g.session.set_relayed(self.id));
    }

    /// Splits into a reading and a writing half. The stream is reset if both
    /// halves are dropped before it closed cleanly.
    pub fn split(mut self) -> (StreamReader, StreamWriter) {
        self.detached = true;
        let guard = Arc::new(StreamGuard {
            shared: self.shared.clone(),
            id: self.id,
        });
        let inbox = std::mem::replace(&mut self.inbox, InboxRx::closed());
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
                reset: self.reset.clone(),
                credit_wait: None,
                _guard: guard,
            },
        )
    }

    fn write_error(&self, e: WriteError) -> StreamError {
        write_error(&self.reset, e)
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

/// Why the session refused a write, finish or accept: the stream's reset
/// when there was one.
fn write_error(reset: &OnceLock<StreamError>, e: WriteError) -> StreamError {
    match e {
        WriteError::UnknownStream => reset.get().cloned().unwrap_or(StreamError::Closed),
        WriteError::NotOpen => StreamError::NotOpen,
        WriteError::Finished => StreamError::Finished,
    }
}

/// The reading half of a [`Stream`].
pub struct StreamReader {
    shared: Arc<Shared>,
    id: StreamId,
    inbox: InboxRx,
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
    pub async fn read(&mut self) -> Result<Option<Bytes>, StreamError> {
        std::future::poll_fn(|cx| self.poll_read_chunk(cx)).await
    }

    /// Poll form of [`StreamReader::read`].
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamError>> {
        if self.done {
            return Poll::Ready(Ok(None));
        }
        let Poll::Ready(next) = self.inbox.poll_recv(cx) else {
            return Poll::Pending;
        };
        Poll::Ready(match next {
            Some(Inbound::Data(b)) => {
                self.shared
                    .with_session(|g| g.session.stream_consumed(self.id, b.len(), now()));
                Ok(Some(b))
            }
            Some(Inbound::Fin) => {
                self.done = true;
                Ok(None)
            }
            Some(Inbound::Reset(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                Err(StreamError::Closed)
            }
        })
    }

    /// Data that has already arrived, without waiting: `None` when nothing
    /// is queued, or when what comes next is the end (FIN, a reset), which
    /// [`StreamReader::poll_read_chunk`] reports. The window credit is
    /// returned as for a read.
    pub fn try_read_ready(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let b = self.inbox.try_recv_data()?;
        self.shared
            .with_session(|g| g.session.stream_consumed(self.id, b.len(), now()));
        Some(b)
    }
}

/// The writing half of a [`Stream`].
pub struct StreamWriter {
    shared: Arc<Shared>,
    id: StreamId,
    writable: Arc<Notify>,
    reset: Arc<OnceLock<StreamError>>,
    /// A pending wait for credit, for [`StreamWriter::poll_write_some`].
    credit_wait: Option<Pin<Box<OwnedNotified>>>,
    _guard: Arc<StreamGuard>,
}

impl StreamWriter {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Sends all of `data`, waiting for flow-control credit as needed.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        std::future::poll_fn(|cx| self.poll_write_all(cx, &mut data)).await
    }

    /// Poll form of [`StreamWriter::write`]: queues `data` as credit allows,
    /// advancing it past what was queued; ready once all of it is.
    pub fn poll_write_all(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<Result<(), StreamError>> {
        while !data.is_empty() {
            let r = self
                .shared
                .with_session(|g| g.session.stream_write(self.id, data.clone()));
            match r {
                Ok(0) => ready!(self.poll_credit(cx)),
                Ok(n) => {
                    let _ = data.split_to(n);
                    self.count_out(n as u64);
                }
                Err(e) => return Poll::Ready(Err(write_error(&self.reset, e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Queues all of `data` if the stream has the credit for it right now,
    /// and nothing otherwise (returns `false`). For datagrams, which are
    /// dropped rather than waited for.
    pub fn try_write(&mut self, data: Bytes) -> Result<bool, StreamError> {
        let len = data.len();
        let r = self.shared.with_session(|g| {
            if g.session.send_capacity(self.id) < len {
                return Ok(false);
            }
            g.session.stream_write(self.id, data).map(|_| true)
        });
        match r {
            Ok(true) => {
                self.count_out(len as u64);
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(write_error(&self.reset, e)),
        }
    }

    /// Copies as much of `data` as the stream has credit for (at least one
    /// byte, waiting for credit when there is none). For byte-oriented
    /// callers such as [`crate::io::StreamIo`].
    pub fn poll_write_some(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<Result<usize, StreamError>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let r = self.shared.with_session(|g| {
                // With no credit, a one-byte write is refused (Ok(0)) and
                // marks the stream blocked, so a Writable event follows.
                let n = g.session.send_capacity(self.id).clamp(1, data.len());
                g.session
                    .stream_write(self.id, Bytes::copy_from_slice(&data[..n]))
            });
            match r {
                Ok(n) if n > 0 => {
                    self.credit_wait = None;
                    self.count_out(n as u64);
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(write_error(&self.reset, e))),
                Ok(_) => ready!(self.poll_credit(cx)),
            }
        }
    }

    /// Waits for the Writable notification after a write found no credit
    /// (its permit is kept if it fired before we got here).
    fn poll_credit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let wait = self
            .credit_wait
            .get_or_insert_with(|| Box::pin(self.writable.clone().notified_owned()));
        ready!(wait.as_mut().poll(cx));
        self.credit_wait = None;
        Poll::Ready(())
    }

    /// Ready with the stream's reset once it has one (the peer's RST, the
    /// session lost or drained past its deadline), for a caller that is not
    /// writing: a write would fail with it by itself.
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<StreamError> {
        loop {
            if let Some(e) = self.reset.get() {
                return Poll::Ready(e.clone());
            }
            ready!(self.poll_credit(cx));
            // A notice of credit, not a reset: whoever waits to write must
            // look again, since this took its notice.
            cx.waker().wake_by_ref();
        }
    }

    /// Half-closes at once (the non-async form of [`StreamWriter::finish`]).
    pub fn finish_now(&mut self) -> Result<(), StreamError> {
        self.shared
            .with_session(|g| {
                let r = g.session.stream_finish(self.id, super::now());
                g.deadlines_changed(); // linger starts
                r
            })
            .map_err(|e| write_error(&self.reset, e))
    }

    /// Half-closes: the peer reads EOF after everything written so far.
    pub async fn finish(&mut self) -> Result<(), StreamError> {
        self.finish_now()
    }

    /// Aborts the stream in both directions.
    pub fn reset(&mut self, code: ResetCode, reason: &str) {
        self.shared
            .with_session(|g| g.session.stream_reset(self.id, code, reason));
    }

    fn count_out(&self, n: u64) {
        self.shared
            .counters
            .bytes_out
            .fetch_add(n, Ordering::Relaxed);
    }
}
