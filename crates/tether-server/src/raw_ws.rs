//! The raw WebSocket endpoint (`/tether/v1/ws/AGENT/SERVICE`): one
//! WebSocket carries one stream's bytes, for clients that speak WebSocket
//! but not the tether protocol (browser JavaScript, websocat). It counts as
//! a session of its client, and its stream is opened through the one open
//! path before the `101`, so a refusal is an HTTP status.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use tether_net::chunk::unpinned;
use tether_net::splice::{ChunkRead, ChunkWrite};
use tether_net::transport::ws::frame::close_reason;
use tether_net::transport::ws::ws_config;
use tether_net::transport::MAX_RECV_MESSAGE;
use tether_net::Refusal;
use tether_proto::TargetKind;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::auth::AuthStore;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::open::{http_status, Caller, Opener};
use crate::relay::run_relay;
use crate::response::{text, Resp};
use crate::upgrade::{
    authenticate_client, authenticated_hold, limit_refusal, switching_protocols, upgraded,
};

/// The raw WebSocket endpoint and the handles it uses.
pub(crate) struct RawWsEndpoint {
    auth: Arc<AuthStore>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    opener: Opener,
}

impl RawWsEndpoint {
    /// The endpoint over these handles.
    pub(crate) fn new(
        auth: Arc<AuthStore>,
        metrics: Arc<Metrics>,
        limits: Arc<Limits>,
        opener: Opener,
    ) -> RawWsEndpoint {
        RawWsEndpoint {
            auth,
            metrics,
            limits,
            opener,
        }
    }

    /// Authenticates the request, opens `target` (`AGENT/SERVICE`) and, when
    /// that worked, relays the upgraded WebSocket in a task.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        target: &str,
    ) -> Resp {
        let client = match authenticate_client(&self.auth, &self.metrics, &req, peer, true) {
            Ok(c) => c,
            Err(r) => return *r,
        };
        // Validate the upgrade before dialing anything.
        let resp = switching_protocols(&req);
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return resp;
        }
        let slot = match self.limits.session(Some(client.key())) {
            Ok(s) => s,
            Err(hit) => return limit_refusal(&self.metrics, peer, hit),
        };
        let started = Instant::now();
        let caller = Caller::Client(client);
        let (agent_stream, guard) = match self
            .opener
            .open(&caller, target, TargetKind::Tcp, bytes::Bytes::new())
            .await
        {
            Ok(x) => x,
            Err(Refusal { code, reason }) => {
                tracing::info!(client = %caller.name(), %peer, %target, %code, "raw websocket refused: {reason}");
                return text(http_status(code), reason);
            }
        };
        let target = target.to_owned();
        let hold = authenticated_hold(&req);
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _hold = hold;
            let Some(io) = upgraded(req).await else {
                return;
            };
            let ws = WebSocketStream::from_raw_socket(io, WsRole::Server, Some(ws_config())).await;
            let (tx, rx) = ws.split();
            let shared = Arc::new(Shared::default());
            let _live = this.metrics.session_live("raw_ws");
            let name = caller.name();
            tracing::info!(client = %name, %peer, %target, "raw websocket stream open");
            run_relay(
                &this.metrics,
                &name,
                &target,
                started,
                &guard,
                (
                    RawWsReader {
                        stream: rx,
                        shared: shared.clone(),
                        close_reply_due: None,
                    },
                    RawWsWriter {
                        sink: tx,
                        close_sent: false,
                        shared,
                    },
                ),
                agent_stream.split(),
            )
            .await;
        });
        resp
    }
}

/// How long the client has to answer our close frame (sent when the
/// service finished) with its own before the connection is dropped: RFC
/// 6455 7.1.1 lets the server close the TCP connection after a reasonable
/// time, and without a bound a client that never answers would keep its
/// stream and its slots.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the two halves of one raw WebSocket tell each other.
#[derive(Default)]
struct Shared {
    /// The close code the client's own error calls for (0: none yet), for
    /// the writer's close frame.
    failed_with: AtomicU16,
    /// The writer sent its close frame: the reader waits
    /// [`CLOSE_REPLY_TIMEOUT`] at most for the client's. (Both halves are
    /// polled by the relay's one splice task: the writer wakes that task,
    /// and with it the reader.)
    close_sent: AtomicBool,
    /// That close frame has been flushed to the client.
    close_flushed: AtomicBool,
}

/// Reads a raw WebSocket's binary (or text) messages as stream bytes.
struct RawWsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    shared: Arc<Shared>,
    /// When the client's close reply is due, once our close frame is out.
    close_reply_due: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Writes stream bytes as binary messages; EOF closes the WebSocket, and a
/// failure closes it with a code and the reason.
struct RawWsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    close_sent: bool,
    shared: Arc<Shared>,
}

fn ws_error(e: WsError) -> io::Error {
    io::Error::other(e.to_string())
}

/// The close code for a failure the client caused: a message over the
/// limit is 1009, a text message that is not UTF-8 1007, anything else it
/// sent wrong 1002 (RFC 6455 7.4.1).
fn client_fault(e: &WsError) -> Option<u16> {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => Some(1009),
        WsError::Utf8(_) => Some(1007),
        WsError::Capacity(_) | WsError::Protocol(_) => Some(1002),
        _ => None,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ChunkRead for RawWsReader<S> {
    fn poll_next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if self.shared.close_sent.load(Ordering::Acquire) {
            let due = self
                .close_reply_due
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_REPLY_TIMEOUT)));
            if due.as_mut().poll(cx).is_ready() {
                // Our close frame went out: the client's silence ends its
                // side, and FIN goes towards the service (PROTOCOL.md 2.5).
                if self.shared.close_flushed.load(Ordering::Acquire) {
                    return Poll::Ready(Ok(None));
                }
                // An error, not an end: the splice then drops both ways,
                // also a close frame the client is not reading.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client did not answer the close frame within {CLOSE_REPLY_TIMEOUT:?}"
                    ),
                )));
            }
        }
        loop {
            return Poll::Ready(match ready!(self.stream.poll_next_unpin(cx)) {
                None => Ok(None),
                // The client's Close: tungstenite queues the answering
                // Close and writes it on its next read, which then ends
                // the stream. Read on, or the client would wait for that
                // answer until the service writes or closes.
                Some(Ok(Message::Close(_))) => continue,
                // tungstenite slices messages out of a read buffer that
                // grows to fit the largest one (≤ MAX_RECV_MESSAGE): a
                // small one must not keep it alive in the relay's queues.
                Some(Ok(Message::Binary(b))) => Ok(Some(unpinned(b, MAX_RECV_MESSAGE))),
                Some(Ok(Message::Text(t))) => Ok(Some(Bytes::from(t.as_str().to_owned()))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    if let Some(code) = client_fault(&e) {
                        self.shared.failed_with.store(code, Ordering::Relaxed);
                    }
                    Err(ws_error(e))
                }
            });
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ChunkWrite for RawWsWriter<S> {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if !chunk.is_empty() {
            ready!(self.sink.poll_ready_unpin(cx)).map_err(ws_error)?;
            let message = Message::Binary(std::mem::take(chunk));
            self.sink.start_send_unpin(message).map_err(ws_error)?;
        }
        self.sink.poll_flush_unpin(cx).map_err(ws_error)
    }
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // WebSocket has no half-close: the service finishing ends the socket.
        // A socket already broken needs no Close.
        if !self.close_sent {
            if ready!(self.sink.poll_ready_unpin(cx)).is_err()
                || self
                    .sink
                    .start_send_unpin(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    })))
                    .is_err()
            {
                return Poll::Ready(Ok(()));
            }
            self.close_sent = true;
            self.shared.close_sent.store(true, Ordering::Release);
            // The reader may wait on a client that sends nothing: polled
            // again by this same task, it starts the reply's deadline.
            cx.waker().wake_by_ref();
        }
        if ready!(self.sink.poll_flush_unpin(cx)).is_ok() {
            self.shared.close_flushed.store(true, Ordering::Release);
        }
        Poll::Ready(Ok(()))
    }
    /// Closes the WebSocket with a code and the reason, best effort: the
    /// close frame is queued and flushed without waiting (the splice drops
    /// the socket right after), which a close frame's few bytes almost
    /// always survive. 1009 or 1002 when the client's own message was at
    /// fault, 1008 when access was revoked, 1011 when the far side failed
    /// (not 1014, "bad gateway": common clients such as tungstenite refuse
    /// it as a protocol error and lose the reason).
    fn abort(&mut self, code: tether_proto::ResetCode, reason: &str) {
        if self.close_sent {
            return;
        }
        let code = match self.shared.failed_with.load(Ordering::Relaxed) {
            0 if code == tether_proto::ResetCode::Forbidden => 1008,
            0 => 1011,
            own => own,
        };
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: close_reason(reason).to_owned().into(),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Ok(())) = self.sink.poll_ready_unpin(&mut cx) {
            if self
                .sink
                .start_send_unpin(Message::Close(Some(frame)))
                .is_ok()
            {
                self.close_sent = true;
                let _ = self.sink.poll_flush_unpin(&mut cx);
            }
        }
    }
}
