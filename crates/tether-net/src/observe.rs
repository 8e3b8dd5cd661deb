//! A tiny HTTP endpoint for processes that have no HTTP server of their own
//! (agent, client): `/metrics` (Prometheus text) and `/healthz`.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Binds `addr` and serves `/metrics` from `render` and `/healthz` until the
/// process ends. Returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let render = render.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/metrics" => (StatusCode::OK, render()),
                            "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                            _ => (
                                StatusCode::NOT_FOUND,
                                "try /metrics or /healthz\n".to_owned(),
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
