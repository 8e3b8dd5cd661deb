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
use tokio::net::TcpListener;

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
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (tcp, _) = crate::listen::accept(&listener).await;
            let render = render.clone();
            let probe = probe.clone();
            tokio::spawn(async move {
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
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(local)
}
