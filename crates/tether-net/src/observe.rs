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

/// Connections served at once: a scraper or two and the kubelet's probes
/// need a handful. More are closed at accept, so that connections opened
/// and left there cannot take the process's file descriptors (which its
/// public port and its dials share).
const MAX_CONNECTIONS: usize = 64;

/// How long one connection is served, requests and idle time together.
/// Every answer is small and quick; a keep-alive scraper reconnects. Bounds
/// a connection that sends nothing, or half a request, or never reads.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// The answer to a probe path: status code and body; `None` for a path the
/// process does not serve.
pub type Probe = Arc<dyn Fn(&str) -> Option<(u16, String)> + Send + Sync>;

/// Binds `addr` and serves `/metrics` from `render` and `/healthz` until the
/// process ends. Returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    serve_observe(addr, render, Arc::new(|_: &str| None)).await
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
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = crate::listen::accept(&listener).await;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "metrics endpoint: {MAX_CONNECTIONS} connections open; closing a new one");
                continue;
            };
            let render = render.clone();
            let probe = probe.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let render = render.clone();
                    let probe = probe.clone();
                    async move {
                        let path = req.uri().path();
                        let (status, body) = match (path, probe(path)) {
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
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            });
        }
    });
    Ok(local)
}
