//! One accepted connection on the public port: HTTP/1.1 and HTTP/2 with
//! upgrades, the slowloris and idle timeouts, and the session reserve (a
//! connection accepted into it serves only session upgrades and health
//! checks; see [`crate::admission`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::CertificateDer;

use crate::admission::ConnectionHold;
use crate::h2_stall::{StreamExecutor, Watched};
use crate::limits::Limit;
use crate::metrics::Metrics;
use crate::response::{text, Resp};
use crate::router::Router;
use crate::web::credential::ConnectionCredential;
use tether_net::log_gate::LogGate;

/// How long a client may take to send the request headers (slowloris
/// guard), and the first request on a connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an HTTP/2 connection is pinged (it is dropped when a ping goes
/// unanswered for [`HEADER_READ_TIMEOUT`]).
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);

/// The most an HTTP/1.1 connection buffers: a request head must fit (431
/// otherwise; a browser's is a few KiB, cookies included), and what it
/// queues of an answer. hyper's default (about 400 KiB) let each of the
/// 18 000 anonymous connections hold that much of an unfinished head for
/// the header-read timeout: 7 GiB from a few dozen sources.
const MAX_HTTP1_BUFFER: usize = 64 * 1024;

/// A connection with no request in flight is closed (gracefully: responses
/// still streaming finish first) after this long without a new request.
/// HTTP/1.1 connections are also cut by hyper's header-read timeout; this
/// is what ends idle HTTP/2 connections, which answer PINGs forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How soon a connection accepted into the session reserve must send its
/// one request (it is closed after answering it, unless it upgraded).
const RESERVE_FIRST_REQUEST: Duration = Duration::from_secs(5);

/// Serves HTTP/1.1 and HTTP/2 (with upgrades) on one accepted connection.
/// An HTTP/2 answer that waits `send_timeout` on the client's window is
/// reset ([`crate::h2_stall`]; HTTP/1.1's stuck writes fail below, in the
/// `WriteStall` that `io` is).
pub(crate) async fn serve_connection<S>(
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    io: S,
    peer: SocketAddr,
    client_cert: Option<CertificateDer<'static>>,
    hold: ConnectionHold,
    send_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_cert = client_cert.map(Arc::new);
    let activity = Arc::new(Activity::new());
    metrics.http_connections.inc();
    let _counted = CountedConnection(metrics.clone());
    let closing = router.clone();
    let reserve_only = hold.reserve_only();
    let credential = Arc::new(ConnectionCredential::default());
    let executor = StreamExecutor::new(send_timeout, peer, metrics.clone());
    let conn_metrics = metrics.clone();
    let svc = {
        let activity = activity.clone();
        service_fn(move |mut req: Request<Incoming>| {
            let busy = activity.begin();
            // Only an upgrade (a session, a raw or proxied WebSocket)
            // takes the hold past its request; other requests skip the
            // extensions insert (a map allocated per request).
            if req.headers().contains_key(header::UPGRADE) {
                req.extensions_mut().insert(hold.clone());
            }
            let router = router.clone();
            let metrics = metrics.clone();
            let cert = client_cert.clone();
            let activity = activity.clone();
            let credential = credential.clone();
            let http2 = req.version() == http::Version::HTTP_2;
            async move {
                let _busy = busy;
                if !reserve_only {
                    let resp = router.route(req, peer, cert, &credential).await;
                    return Ok::<_, Infallible>(watched(resp, http2));
                }
                // A reserve connection carries one request: a session
                // upgrade keeps it (as the session), anything else ends it,
                // so anonymous clients cannot hold reserve slots.
                let http1 = req.version() < http::Version::HTTP_2;
                let mut resp = if router.reserve_may_serve(&req) {
                    router.route(req, peer, cert, &credential).await
                } else {
                    reserve_refusal(&metrics, peer)
                };
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    // HTTP/1.1: hyper closes after a response that says so
                    // (no race with a next request); HTTP/2: a GOAWAY once
                    // nothing is in flight.
                    if http1 {
                        resp.headers_mut().insert(
                            header::CONNECTION,
                            header::HeaderValue::from_static("close"),
                        );
                    }
                    activity.close_after_this();
                }
                Ok::<_, Infallible>(watched(resp, http2))
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(executor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HTTP1_BUFFER);
    // HTTP/2 has no header-read timeout: ping idle connections to drop
    // dead ones, and close live but idle ones below.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEPALIVE)
        .keep_alive_timeout(HEADER_READ_TIMEOUT)
        // A reserve connection carries one request: one stream at a time,
        // or an anonymous client could send 256 on one reserve slot.
        .max_concurrent_streams(if reserve_only { 1 } else { 256 });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let (first, idle) = if reserve_only {
        (RESERVE_FIRST_REQUEST, RESERVE_FIRST_REQUEST)
    } else {
        (HEADER_READ_TIMEOUT, IDLE_TIMEOUT)
    };
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = activity.idle_for(first, idle) => {
            tracing::debug!(%peer, "closing an idle connection");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = closing.closing() => {
            // The server is draining: HTTP/1.1 finishes the request in
            // flight and closes, HTTP/2 sends GOAWAY and finishes its streams.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        if tether_net::stall::is_send_stall(&*e) {
            conn_metrics.limit_hit(Limit::SendTimeout);
            static GATE: LogGate = LogGate::new();
            if let Some(skipped) = GATE.allow() {
                tracing::info!(skipped, %peer, limit = Limit::SendTimeout.as_str(), raise_with = Limit::SendTimeout.setting(), "closing a connection: its client read nothing of the answers for {} s", send_timeout.as_secs());
            }
        } else {
            tracing::debug!(%peer, "http connection ended: {e}");
        }
    }
}

/// An HTTP/2 answer's body, watched for waits on the client's window
/// ([`crate::h2_stall`]); an HTTP/1.1 one as it is, without the task-local
/// lookup and the move of its response.
fn watched(resp: Resp, http2: bool) -> Resp {
    if !http2 {
        return resp;
    }
    resp.map(|body| match Watched::in_stream_task(body) {
        Ok(w) => http_body_util::BodyExt::boxed_unsync(w),
        Err(body) => body,
    })
}

/// Counts the connection in `tether_http_connections` while it is served.
struct CountedConnection(Arc<Metrics>);

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.0.http_connections.dec();
    }
}

/// Requests in flight on one connection, and when the last one started or
/// was answered.
struct Activity {
    in_flight: AtomicUsize,
    last_seen: std::sync::Mutex<tokio::time::Instant>,
    started: AtomicBool,
    /// Close as soon as nothing is in flight (a reserve connection's one
    /// request was answered).
    closing: AtomicBool,
}

/// One request in flight (until its response head is sent).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        // Idle counts from the answer, not the start: a request that took
        // most of the idle timeout leaves its connection the whole of it.
        *self.0.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        // Release: whoever sees the count drop sees the time above.
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_seen: std::sync::Mutex::new(tokio::time::Instant::now()),
            started: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }
    }

    /// Ends the connection once what is in flight is answered.
    fn close_after_this(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started.store(true, Ordering::Relaxed);
        *self.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        Busy(self.clone())
    }

    /// Resolves once no request is in flight and none started for `first`
    /// (before the first request) or `idle` (after it).
    async fn idle_for(&self, first: Duration, idle: Duration) {
        loop {
            let limit = if self.started.load(Ordering::Relaxed) {
                idle
            } else {
                first
            };
            // The count first: a request answered just now is either still
            // counted or has already moved `last_seen`.
            let idle = self.in_flight.load(Ordering::Acquire) == 0;
            let due = *self.last_seen.lock().unwrap_or_else(|p| p.into_inner()) + limit;
            let closing = self.closing.load(Ordering::Relaxed);
            if idle && (closing || tokio::time::Instant::now() >= due) {
                return;
            }
            // Closing waits only for the answer in flight: look again soon.
            let now = tokio::time::Instant::now();
            let wake = if closing {
                now + Duration::from_millis(20)
            } else {
                due.max(now + Duration::from_millis(500))
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// 503 for anything else on a reserve connection.
fn reserve_refusal(metrics: &Metrics, peer: SocketAddr) -> Resp {
    let limit = Limit::ConnectionsReserved;
    metrics.limit_hit(limit);
    static GATE: LogGate = LogGate::new();
    if let Some(skipped) = GATE.allow() {
        tracing::warn!(skipped, %peer, limit = limit.as_str(), raise_with = limit.setting(), "connection slots are full: only agent and client sessions are served");
    }
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "server busy ({}): the remaining connection slots are kept for agent and client sessions; the operator can raise {}",
            limit.as_str(),
            limit.setting()
        ),
    );
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}
