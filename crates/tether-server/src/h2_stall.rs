//! An HTTP/2 answer that waits on the client's flow-control window for
//! `[limits] send_timeout_secs` is reset, like nginx's `send_timeout`.
//!
//! HTTP/1.1 needs nothing of this: a client that reads nothing stalls the
//! socket, and [`tether_net::stall::WriteStall`] fails the write. Over
//! HTTP/2 a client can read its socket, answer PINGs and still grant no
//! window to the answers it asked for; hyper then holds each of them (and
//! our side of the tunnel stream behind it) for as long as the client
//! stays. That is not a slow reader: a slow reader opens its window now
//! and then. Nor is it a quiet answer (server-sent events, a watch), which
//! waits on its own source with the window open.
//!
//! The two are told apart by who waits. hyper hands h2 an answer's chunk
//! once the window has room for one byte beyond what h2 still keeps of the
//! stream (h2 keeps what of a chunk has no window yet), and then asks the
//! body for the next chunk at once. So [`Watched`] marks a body that has
//! handed hyper a chunk and not been asked again since: hyper holds that
//! chunk for window. [`StreamExecutor`], which runs each HTTP/2 stream's
//! task, times that mark and ends the task when it has stood for the
//! limit. Dropping the task drops the stream, and h2 resets it
//! (`RST_STREAM CANCEL`), freeing what it held; the connection and its
//! other streams go on. A request body still being uploaded holds the
//! stream too (h2 resets a stream once nothing holds it), so the proxy
//! hands it over as an [`Upload`], which the task drops at the same time,
//! read or not.
//!
//! What h2 keeps of a chunk sent short of window is timed by the next
//! chunk's wait; after the last chunk of an answer, or before a quiet
//! spell, there is no next chunk. So [`Watched`] hands over the last byte
//! of each chunk its body yields on its own: hyper holds that byte, under
//! the mark, until everything before it has window, and then sends it
//! whole. Nothing is ever left in h2 without window and without a watch.
//! (One more DATA frame, of one byte, per chunk the body yields.)
//!
//! [`Watched`] hands hyper at most [`MAX_CHUNK`] at a time: the wait it
//! times is for the chunk before to get window, so the smaller the chunk,
//! the slower a reader may be without being taken for a stalled one (16 KiB
//! per `send_timeout_secs`: 273 bytes a second at the default).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use futures_util::task::AtomicWaker;

use crate::limits::Limit;
use crate::metrics::Metrics;
use crate::response::BoxError;
use tether_net::log_gate::LogGate;

/// The most of an answer handed to hyper at a time (h2's default frame
/// size): see the module doc.
pub(crate) const MAX_CHUNK: usize = 16 * 1024;

tokio::task_local! {
    /// The mark of the HTTP/2 stream whose task is running (unset outside
    /// one: HTTP/1.1 requests run in their connection's task).
    static MARK: Arc<WaitMark>;
}

/// Whether a stream's answer is waiting for window, and since which chunk.
#[derive(Default)]
pub(crate) struct WaitMark {
    /// Bit 0: a chunk was handed to hyper and the body not asked since.
    /// The bits above count the chunks handed over, so a new wait is told
    /// from the one before it.
    state: AtomicU64,
    /// Drops the stream's [`Upload`], if it has one, when the task is ended.
    release: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl WaitMark {
    fn handed_over(&self) {
        let s = self.state.load(Ordering::Relaxed);
        self.state.store((s | 1) + 2, Ordering::Relaxed);
    }

    fn asked(&self) {
        let s = self.state.load(Ordering::Relaxed);
        if s & 1 == 1 {
            self.state.store(s & !1, Ordering::Relaxed);
        }
    }

    /// `Some(wait)` while a chunk waits for window; `wait` names this wait.
    fn waiting(&self) -> Option<u64> {
        let s = self.state.load(Ordering::Relaxed);
        (s & 1 == 1).then_some(s)
    }

    fn cut(&self) {
        let release = self
            .release
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(release) = release {
            release();
        }
    }
}

/// A request body uploaded on an HTTP/2 stream, dropped (and whoever reads
/// it woken, to an error) when its stream's task is ended for an answer
/// given no window. Dropped there and then, not at its next read: the
/// reader may be waiting on the service, and not read it again.
pub(crate) struct Upload<B> {
    slot: Arc<UploadSlot<B>>,
}

struct UploadSlot<B> {
    body: std::sync::Mutex<Option<B>>,
    waker: AtomicWaker,
}

impl<B: Send + 'static> Upload<B> {
    /// Wraps `body` if it is uploaded on an HTTP/2 stream run by
    /// [`StreamExecutor`]; `Err(body)` otherwise (HTTP/1.1).
    pub(crate) fn in_stream_task(body: B) -> Result<Upload<B>, B> {
        let Ok(mark) = MARK.try_with(Arc::clone) else {
            return Err(body);
        };
        let slot = Arc::new(UploadSlot {
            body: std::sync::Mutex::new(Some(body)),
            waker: AtomicWaker::new(),
        });
        let held = Arc::downgrade(&slot);
        *mark.release.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(move || {
            if let Some(slot) = held.upgrade() {
                let body = slot.body.lock().unwrap_or_else(|p| p.into_inner()).take();
                drop(body);
                slot.waker.wake();
            }
        }));
        Ok(Upload { slot })
    }
}

impl<B> Body for Upload<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.slot.waker.register(cx.waker());
        let mut body = self.slot.body.lock().unwrap_or_else(|p| p.into_inner());
        match body.as_mut() {
            Some(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            None => Poll::Ready(Some(Err(
                "the client's stream was reset: it granted the answer no window".into(),
            ))),
        }
    }

    fn is_end_stream(&self) -> bool {
        // A dropped upload is not complete: it must end in an error.
        let body = self.slot.body.lock().unwrap_or_else(|p| p.into_inner());
        body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let body = self.slot.body.lock().unwrap_or_else(|p| p.into_inner());
        body.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

/// Runs hyper's HTTP/2 stream tasks, each under [`Guarded`]. One per
/// connection (it names the peer in its log line).
#[derive(Clone)]
pub(crate) struct StreamExecutor {
    limit: Duration,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
}

impl StreamExecutor {
    /// Streams of `peer`'s connection whose answer waits on window for
    /// `limit` are reset (and counted in `metrics`).
    pub(crate) fn new(limit: Duration, peer: SocketAddr, metrics: Arc<Metrics>) -> StreamExecutor {
        StreamExecutor {
            limit,
            peer,
            metrics,
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let mark = Arc::new(WaitMark::default());
        tokio::spawn(Guarded {
            task: Box::pin(MARK.scope(mark.clone(), fut)),
            mark,
            limit: self.limit,
            peer: self.peer,
            metrics: self.metrics.clone(),
            timer: None,
            timing: None,
        });
    }
}

/// One HTTP/2 stream's task, ended when its answer has waited on window for
/// the limit.
struct Guarded<F> {
    task: Pin<Box<F>>,
    mark: Arc<WaitMark>,
    limit: Duration,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
    /// Allocated at the first wait; most answers never wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// The wait `timer` runs for.
    timing: Option<u64>,
}

impl<F: Future> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = self.get_mut();
        if me.task.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // The body was polled inside the task just now, if at all: the
        // mark says whether it is waiting after that.
        let Some(wait) = me.mark.waiting() else {
            me.timing = None;
            return Poll::Pending;
        };
        let deadline = Instant::now() + me.limit;
        let timer = match &mut me.timer {
            Some(t) => {
                if me.timing != Some(wait) {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => me
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        me.timing = Some(wait);
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        me.metrics.limit_hit(Limit::SendTimeout);
        static GATE: LogGate = LogGate::new();
        if let Some(skipped) = GATE.allow() {
            tracing::info!(
                skipped,
                peer = %me.peer,
                limit = Limit::SendTimeout.as_str(),
                raise_with = Limit::SendTimeout.setting(),
                "resetting an HTTP/2 stream: the client granted its answer no window for {} s",
                me.limit.as_secs()
            );
        }
        // Returning drops the task, and with it the stream: h2 resets it
        // once the upload, if one is still going, is dropped too.
        me.mark.cut();
        Poll::Ready(())
    }
}

/// A response body that marks, for its stream's [`Guarded`] task, when it
/// has handed hyper a chunk and waits to be asked for the next.
pub(crate) struct Watched<B> {
    inner: B,
    mark: Arc<WaitMark>,
    /// What is left of the body's last chunk to hand over (more than
    /// [`MAX_CHUNK`], or its last byte).
    rest: Bytes,
}

impl<B> Watched<B> {
    /// Wraps `body` if it answers an HTTP/2 stream run by
    /// [`StreamExecutor`]; `Err(body)` otherwise (HTTP/1.1).
    pub(crate) fn in_stream_task(body: B) -> Result<Watched<B>, B> {
        match MARK.try_with(Arc::clone) {
            Ok(mark) => Ok(Watched {
                inner: body,
                mark,
                rest: Bytes::new(),
            }),
            Err(_) => Err(body),
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = self.get_mut();
        me.mark.asked();
        if me.rest.is_empty() {
            let r = Pin::new(&mut me.inner).poll_frame(cx);
            let Poll::Ready(Some(Ok(frame))) = r else {
                return r;
            };
            match frame.into_data() {
                Ok(data) if !data.is_empty() => me.rest = data,
                Ok(empty) => return Poll::Ready(Some(Ok(Frame::data(empty)))),
                Err(other) => return Poll::Ready(Some(Ok(other))),
            }
        }
        me.mark.handed_over();
        Poll::Ready(Some(Ok(Frame::data(next_piece(&mut me.rest)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(hint.lower().saturating_add(rest));
        hint
    }
}

/// The next piece of `rest` to hand hyper: at most [`MAX_CHUNK`], and the
/// last byte on its own (see the module doc).
fn next_piece(rest: &mut Bytes) -> Bytes {
    let n = match rest.len() {
        0 | 1 => rest.len(),
        len if len <= MAX_CHUNK => len - 1,
        _ => MAX_CHUNK,
    };
    rest.split_to(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn a_mark_tells_each_wait_apart() {
        let m = WaitMark::default();
        assert_eq!(m.waiting(), None);
        m.handed_over();
        let first = m.waiting().expect("waiting after a chunk");
        assert_eq!(m.waiting(), Some(first), "the same wait until asked");
        m.asked();
        assert_eq!(m.waiting(), None);
        m.handed_over();
        let second = m.waiting().expect("waiting again");
        assert_ne!(first, second, "a new wait restarts the clock");
    }

    #[tokio::test]
    async fn a_body_outside_a_stream_task_is_left_alone() {
        let body = crate::response::full("x");
        assert!(Watched::in_stream_task(body).is_err());
    }

    #[tokio::test]
    async fn a_body_marks_a_chunk_until_asked_again() {
        let mark = Arc::new(WaitMark::default());
        let m = mark.clone();
        MARK.scope(mark.clone(), async move {
            let Ok(mut body) = Watched::in_stream_task(crate::response::full("abc")) else {
                panic!("inside a stream task");
            };
            // The chunk, then its last byte on its own: each a wait.
            for piece in [&b"ab"[..], b"c"] {
                let frame = body.frame().await.expect("a piece").expect("no error");
                assert_eq!(frame.data_ref().map(|d| &d[..]), Some(piece));
                assert!(m.waiting().is_some(), "handed over, not asked since");
            }
            assert!(http_body::Body::is_end_stream(&body));
            assert!(body.frame().await.is_none());
            assert_eq!(m.waiting(), None, "asked again: not waiting");
        })
        .await;
    }

    /// A task whose body waits longer than the limit is ended; one whose
    /// body waits on its own source (a quiet answer) is not.
    #[tokio::test(start_paused = true)]
    async fn only_a_wait_for_window_ends_the_task() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        let metrics = Arc::new(Metrics::default());
        let exec = StreamExecutor::new(Duration::from_secs(5), peer, metrics);
        let (upload_tx, upload_rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        // Hands over one chunk and is never asked again (no window).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let stuck = async move {
            let _done = done_tx;
            // An upload, handed to a reader that never reads it (as a
            // pooled connection waiting on its service).
            let upload = http_body_util::StreamBody::new(tokio_stream_of(upload_rx));
            let Ok(upload) = Upload::in_stream_task(upload) else {
                panic!("inside a stream task");
            };
            tokio::spawn(async move {
                let _held = upload;
                std::future::pending::<()>().await;
            });
            let Ok(mut body) = Watched::in_stream_task(crate::response::full("abc")) else {
                panic!("inside a stream task");
            };
            let _ = body.frame().await;
            std::future::pending::<()>().await;
        };
        hyper::rt::Executor::execute(&exec, stuck);
        // Waits on its own source: asked, nothing to hand over.
        let (quiet_tx, quiet_rx) = tokio::sync::oneshot::channel::<()>();
        let quiet = async move {
            let _done = quiet_tx;
            let (_keep, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            let body = http_body_util::StreamBody::new(tokio_stream_of(rx));
            let Ok(mut body) = Watched::in_stream_task(body) else {
                panic!("inside a stream task");
            };
            let _ = body.frame().await;
        };
        hyper::rt::Executor::execute(&exec, quiet);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut done_rx = done_rx;
        assert!(still_running(&mut done_rx), "ended before the limit");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let dropped = tokio::time::timeout(Duration::from_secs(1), done_rx).await;
        assert!(
            matches!(dropped, Ok(Err(_))),
            "the stuck task was not dropped"
        );
        assert!(upload_tx.is_closed(), "the unread upload was not dropped");
        tokio::time::sleep(Duration::from_secs(60)).await;
        let mut quiet_rx = quiet_rx;
        assert!(still_running(&mut quiet_rx), "a quiet answer was ended");
    }

    /// Whether the task holding `rx`'s sender still runs (its sender is
    /// neither used nor dropped).
    fn still_running(rx: &mut tokio::sync::oneshot::Receiver<()>) -> bool {
        matches!(
            rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    }

    /// A long chunk goes to hyper in pieces of at most [`MAX_CHUNK`], its
    /// last byte alone, each a new wait; the body ends only after the last
    /// piece.
    #[tokio::test]
    async fn a_long_chunk_is_handed_over_in_pieces() {
        let mark = Arc::new(WaitMark::default());
        let m = mark.clone();
        MARK.scope(mark, async move {
            let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
            let Ok(mut body) = Watched::in_stream_task(crate::response::full(data.clone())) else {
                panic!("inside a stream task");
            };
            assert_eq!(http_body::Body::size_hint(&body).exact(), Some(40_000));
            let mut got = Vec::new();
            let mut waits = Vec::new();
            let mut sizes = Vec::new();
            while let Some(frame) = body.frame().await {
                let d = frame.expect("no error").into_data().expect("data");
                sizes.push(d.len());
                got.extend_from_slice(&d);
                waits.push(m.waiting().expect("each piece is a wait"));
                if got.len() < data.len() {
                    assert!(!http_body::Body::is_end_stream(&body));
                    let left = (data.len() - got.len()) as u64;
                    assert_eq!(http_body::Body::size_hint(&body).exact(), Some(left));
                }
            }
            assert_eq!(got, data);
            assert!(http_body::Body::is_end_stream(&body));
            assert_eq!(sizes, [MAX_CHUNK, MAX_CHUNK, 40_000 - 2 * MAX_CHUNK - 1, 1]);
            assert!(waits.windows(2).all(|w| w[0] != w[1]), "{waits:?}");
        })
        .await;
    }

    /// An upload being read is woken to an error when it is dropped.
    #[tokio::test]
    async fn a_dropped_upload_ends_its_reader_in_an_error() {
        let mark = Arc::new(WaitMark::default());
        let m = mark.clone();
        MARK.scope(mark, async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            let body = http_body_util::StreamBody::new(tokio_stream_of(rx));
            let Ok(mut upload) = Upload::in_stream_task(body) else {
                panic!("inside a stream task");
            };
            let reader = tokio::spawn(async move { upload.frame().await.map(|f| f.is_err()) });
            tokio::task::yield_now().await;
            m.cut();
            let ended = tokio::time::timeout(Duration::from_secs(5), reader).await;
            assert!(matches!(ended, Ok(Ok(Some(true)))), "{ended:?}");
            assert!(tx.is_closed(), "the body was not dropped");
        })
        .await;
    }

    /// A stream of the frames sent on `rx`.
    fn tokio_stream_of(
        rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Unpin {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) })
            .boxed()
    }

    use futures_util::StreamExt;
}
