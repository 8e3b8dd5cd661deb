//! `tether sample-app`: a small web application to open through the tunnel.
//!
//! The demo runs it as its `web` service, and the browser tests drive it: its
//! page loads a script, opens a WebSocket back to the app and shows the echo,
//! and it has endpoints for the proxy's header, redirect, cookie, streaming
//! and server-sent-event behaviour. All its links are relative, so it works
//! under a path prefix (`/a/AGENT/SERVICE/`) as well as on its own host.

use bytes::{Bytes, BytesMut};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Options of `tether sample-app`.
#[derive(Args)]
pub(crate) struct SampleAppArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve HTTPS with a self-signed certificate (to try `https://` services).
    #[arg(long)]
    self_signed: bool,
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tether sample app</title></head>
<body><h1>tether sample app</h1>
<p>This page came through the tunnel. Its script opened a WebSocket back to the app:</p>
<p id="ws">connecting…</p>
<p id="sse"></p>
<p><a href="headers">request headers</a> · <a href="redirect">a redirect</a> · <a href="events">events</a></p>
<script src="app.js"></script></body></html>
"#;

const SCRIPT: &str = r#""use strict";
const u = new URL("ws", location.href);
u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
const out = document.getElementById("ws");
const ws = new WebSocket(u);
ws.onopen = () => ws.send("hello through tether");
ws.onmessage = (e) => { out.textContent = "echo: " + e.data; ws.close(); };
ws.onerror = () => { out.textContent = "websocket failed"; };
const es = new EventSource("events?n=3");
const seen = [];
es.onmessage = (e) => { seen.push(e.data); document.getElementById("sse").textContent = "events: " + seen.join(", "); if (seen.length === 3) es.close(); };
"#;

/// Most bytes one `/bytes` answer sends (16 GiB), and events one `/events`
/// sends: enough for any benchmark, and no endless answer in the process
/// `tether demo` shares with its server.
const MAX_BYTES: u64 = 16 << 30;
const MAX_EVENTS: u64 = 10_000;

/// The echo WebSocket's limits: 16 MiB messages and frames (the library's
/// default message limit, 64 MiB, is more than an echo needs).
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

fn respond(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// FNV-1a, to check uploads byte for byte.
fn fnv(h: &mut u64, data: &[u8]) {
    for b in data {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100000001b3);
    }
}

/// The byte at position `i` of a `/bytes` download.
pub(crate) fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

async fn handle(mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        (Method::GET, "/app.js") => respond(StatusCode::OK, "text/javascript", SCRIPT),
        (Method::GET, "/hello") => respond(StatusCode::OK, "text/plain", "hello\n"),
        (Method::GET, "/headers") => {
            let mut headers = serde_json::Map::new();
            for (k, v) in req.headers() {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                match headers.get_mut(k.as_str()) {
                    Some(serde_json::Value::String(prev)) => {
                        prev.push_str(", ");
                        prev.push_str(&v);
                    }
                    _ => {
                        headers.insert(k.as_str().to_owned(), v.into());
                    }
                }
            }
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        (Method::GET, "/redirect") => {
            let mut r = respond(StatusCode::FOUND, "text/plain", "see /headers\n");
            let h = r.headers_mut();
            h.insert(
                header::LOCATION,
                header::HeaderValue::from_static("/headers"),
            );
            h.append(
                header::SET_COOKIE,
                header::HeaderValue::from_static("sample=1; Path=/; HttpOnly"),
            );
            r
        }
        (Method::GET, "/absolute-redirect") => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost")
                .to_owned();
            let mut r = respond(StatusCode::FOUND, "text/plain", "see /headers\n");
            if let Ok(v) = header::HeaderValue::from_str(&format!("http://{host}/headers")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        (Method::GET, "/bytes") => {
            // Capped: the demo runs the app in the server's own process.
            let total = query_u64(&req, "n").unwrap_or(1 << 20).min(MAX_BYTES);
            let stream = futures_util::stream::unfold(0u64, move |pos| async move {
                if pos >= total {
                    return None;
                }
                let n = (total - pos).min(64 * 1024);
                let mut b = BytesMut::with_capacity(n as usize);
                b.extend((pos..pos + n).map(pattern_byte));
                Some((Ok::<_, std::io::Error>(Frame::data(b.freeze())), pos + n))
            });
            let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        (Method::POST, "/upload") => {
            let mut body = req.into_body();
            let (mut n, mut h) = (0u64, 0xcbf29ce484222325u64);
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                            fnv(&mut h, d);
                        }
                    }
                    Err(e) => {
                        return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
                    }
                }
            }
            let body = serde_json::json!({"bytes": n, "fnv": format!("{h:016x}")});
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        (Method::GET, "/events") => {
            let count = query_u64(&req, "n").unwrap_or(5).min(MAX_EVENTS);
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i >= count {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let msg = Bytes::from(format!("id: {i}\ndata: tick {i}\n\n"));
                Some((Ok::<_, std::io::Error>(Frame::data(msg)), i + 1))
            });
            let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        (Method::GET, "/ws") => {
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
                return respond(StatusCode::BAD_REQUEST, "text/plain", "websocket only\n");
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on_upgrade.await else { return };
                let mut ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    Role::Server,
                    Some(ws_config()),
                )
                .await;
                while let Some(Ok(m)) = ws.next().await {
                    let echo = match m {
                        Message::Text(_) | Message::Binary(_) => m,
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(echo).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("upgrade"),
            );
            h.insert(
                header::UPGRADE,
                header::HeaderValue::from_static("websocket"),
            );
            if let Ok(v) = header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            r
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no page {path}\n"),
        ),
    }
}

async fn serve_io<S>(io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc =
        hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(handle(req).await) });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

/// Serves the app on `listener` forever (TLS when `tls` is set).
pub(crate) async fn serve_with(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let (tcp, _) = tether_net::listen::accept(&listener).await;
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_io(tcp).await,
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        serve_io(s).await
                    }
                }
            }
        });
    }
}

/// Serves the app over plain HTTP on `listener` forever.
pub(crate) async fn serve(listener: TcpListener) {
    serve_with(listener, None).await
}

/// Runs `tether sample-app`.
pub(crate) async fn run(a: SampleAppArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(a.listen).await?;
    let tls = if a.self_signed {
        let id = tether_net::transport::tls::ServerIdentity::self_signed(&[
            "localhost".into(),
            "127.0.0.1".into(),
        ])?;
        Some(tokio_rustls::TlsAcceptor::from(
            id.server_config(&[b"h2", b"http/1.1"])?,
        ))
    } else {
        None
    };
    tracing::info!(addr = %listener.local_addr()?, tls = a.self_signed, "sample app listening");
    serve_with(listener, tls).await;
    Ok(())
}
