//! A tiny plain-HTTP endpoint for metrics and probes, off the public port:
//! `/metrics` (Prometheus text), `/healthz`, and whatever else the process
//! answers (the server's and the agent's `/livez` and `/readyz`).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::sources::SourceCounts;

/// Connections served at once: a scraper or two and the kubelet's probes
/// need a handful. More are closed at accept, so that connections opened
/// and left there cannot take the process's file descriptors (which its
/// public port and its dials share).
const MAX_CONNECTIONS: usize = 256;

/// Connections served at once from one source address: a Prometheus and a
/// kubelet each come from their own, so one that opens connections and
/// leaves them fills its own share, not the probes' (the pod would be
/// restarted for failing them).
const MAX_PER_SOURCE: usize = 8;

/// How long one connection is served, requests and idle time together;
/// then it is closed gracefully (an answer being written is finished, for
/// at most [`CLOSE_GRACE`]). Every answer is small and quick; a keep-alive
/// scraper reconnects. Bounds a connection that sends nothing, or half a
/// request, or never reads.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// How long a graceful close at [`CONNECTION_LIFETIME`] may take.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The answer to a probe: given the path and the query (if any), status
/// code and body; `None` for a path the process does not serve.
pub type Probe = Arc<dyn Fn(&str, Option<&str>) -> Option<(u16, String)> + Send + Sync>;

/// Binds `addr` and serves `/metrics` from `render` and `/healthz` until the
/// process ends. Returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    serve_observe(addr, render, Arc::new(|_: &str, _: Option<&str>| None)).await
}

/// Like [`serve_metrics`], answering other paths with `probe` first
/// (`/livez`, `/readyz`).
pub async fn serve_observe(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    probe: Probe,
) -> std::io::Result<SocketAddr> {
    let listener = crate::listen::bind(addr)?;
    let local = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = Arc::new(SourceCounts::default());
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = crate::listen::accept(&listener).await;
            let Some(source) = sources.take(peer.ip(), MAX_PER_SOURCE) else {
                tracing::debug!(%peer, "metrics endpoint: {MAX_PER_SOURCE} connections open from this source; closing a new one");
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "metrics endpoint: {MAX_CONNECTIONS} connections open; closing a new one");
                continue;
            };
            let render = render.clone();
            let probe = probe.clone();
            tokio::spawn(async move {
                let _slots = (slot, source);
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let render = render.clone();
                    let probe = probe.clone();
                    async move {
                        let path = req.uri().path();
                        let (status, body) = match (path, probe(path, req.uri().query())) {
                            (_, Some((code, body))) => (
                                StatusCode::from_u16(code)
                                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                                body,
                            ),
                            ("/metrics", None) => (StatusCode::OK, render()),
                            ("/healthz", None) => (StatusCode::OK, "ok\n".to_owned()),
                            _ => (
                                StatusCode::NOT_FOUND,
                                "try /metrics, /healthz, /livez or /readyz\n".to_owned(),
                            ),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                tokio::pin!(conn);
                if tokio::time::timeout(CONNECTION_LIFETIME, conn.as_mut())
                    .await
                    .is_err()
                {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
                }
            });
        }
    });
    Ok(local)
}
