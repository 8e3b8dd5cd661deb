//! HTTP front: routing, WebSocket upgrades, health and metrics.

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming as Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_net::splice::{ChunkRead, ChunkWrite};
use tether_net::transport::ws::{server_from_upgraded, ws_config};
use tether_net::Connection;
use tether_proto::{ErrorCode, OpenErrorCode, Role, TargetKind, SUBPROTOCOL};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::relay::{open_on_agent, run_relay, RelayRefusal};
use crate::{State, AGENT_PATH, CLIENT_PATH, HEADER_READ_TIMEOUT, HTTP2_KEEPALIVE, RAW_WS_PREFIX};

use crate::web::{self, full, Resp};

/// A connection with no request in flight is closed (gracefully: responses
/// still streaming finish first) after this long without a new request.
/// HTTP/1.1 connections are also cut by hyper's header-read timeout; this
/// is what ends idle HTTP/2 connections, which answer PINGs forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How soon a connection accepted into the session reserve must send its
/// request, and how long it may stay idle after it.
const RESERVE_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves HTTP/1.1 and HTTP/2 (with upgrades) on one accepted connection.
pub async fn serve_connection<S>(
    state: Arc<State>,
    io: S,
    peer: SocketAddr,
    client_cert: Option<CertificateDer<'static>>,
    hold: crate::ConnectionHold,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_cert = client_cert.map(Arc::new);
    let activity = Arc::new(Activity::new());
    let reserve_only = hold.reserve_only();
    let svc = {
        let activity = activity.clone();
        service_fn(move |mut req: Request<Body>| {
            let busy = activity.begin();
            req.extensions_mut().insert(hold.clone());
            let state = state.clone();
            let cert = client_cert.clone();
            async move {
                let _busy = busy;
                if reserve_only && !reserve_may_serve(&req) {
                    return Ok::<_, Infallible>(reserve_refusal(&state, peer));
                }
                Ok::<_, Infallible>(route(state, req, peer, cert).await)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // HTTP/2 has no header-read timeout: ping idle connections to drop
    // dead ones, and close live but idle ones below.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEPALIVE)
        .keep_alive_timeout(HEADER_READ_TIMEOUT)
        .max_concurrent_streams(256);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let (first, idle) = if reserve_only {
        (RESERVE_IDLE_TIMEOUT, RESERVE_IDLE_TIMEOUT)
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
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, "http connection ended: {e}");
    }
}

/// Requests in flight on one connection and when the last one started.
struct Activity {
    in_flight: AtomicUsize,
    last_start: std::sync::Mutex<tokio::time::Instant>,
    started: AtomicBool,
}

/// One request in flight (until its response head is sent).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_start: std::sync::Mutex::new(tokio::time::Instant::now()),
            started: AtomicBool::new(false),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started.store(true, Ordering::Relaxed);
        *self.last_start.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
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
            let due = *self.last_start.lock().unwrap_or_else(|p| p.into_inner()) + limit;
            if tokio::time::Instant::now() >= due && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep_until(
                due.max(tokio::time::Instant::now() + Duration::from_millis(500)),
            )
            .await;
        }
    }
}

/// What a connection accepted into the session reserve may ask for:
/// agent and client session upgrades (they authenticate at once) and
/// health checks.
fn reserve_may_serve(req: &Request<Body>) -> bool {
    let path = req.uri().path();
    matches!(path, AGENT_PATH | CLIENT_PATH | "/healthz" | "/readyz")
        || path.starts_with(RAW_WS_PREFIX)
}

/// 503 for anything else on a reserve connection.
fn reserve_refusal(state: &State, peer: SocketAddr) -> Resp {
    state.metrics.limit_hit("connections_reserved");
    tracing::warn!(%peer, "connection slots are full: only agent and client sessions are served");
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "server busy: the remaining connection slots are kept for agent and client sessions",
    );
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// The connection's hold from a request, marked as carrying an
/// authenticated session (it leaves the anonymous share).
fn authenticated_hold(req: &Request<Body>) -> Option<crate::ConnectionHold> {
    let hold = req.extensions().get::<crate::ConnectionHold>().cloned();
    if let Some(h) = &hold {
        h.authenticated();
    }
    hold
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(full(body.into() + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    web::api_headers(r.headers_mut());
    r
}

/// The bearer token of a request: `Authorization: Bearer T`, or (when
/// `allow_query`) `?token=T` for WebSocket clients that cannot set headers.
fn bearer_token(req: &Request<Body>, allow_query: bool) -> Option<String> {
    if let Some(t) = web::login::bearer(req.headers()) {
        return Some(t);
    }
    if !allow_query {
        return None;
    }
    req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_owned)
    })
}

fn is_websocket_upgrade(h: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, needle: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(needle)))
                .unwrap_or(false)
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

fn offers_subprotocol(h: &HeaderMap, proto: &str) -> bool {
    h.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|p| p.trim() == proto))
            .unwrap_or(false)
    })
}

/// The 101 answer to a WebSocket upgrade, or an error response (any other
/// status) explaining what is wrong with the request.
fn switching_protocols(req: &Request<Body>, subprotocol: Option<&str>) -> Resp {
    if !is_websocket_upgrade(req.headers()) {
        return text(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket only",
        );
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return text(StatusCode::BAD_REQUEST, "WebSocket version 13 required");
    }
    let mut r = Response::new(web::empty());
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
    if let Some(p) = subprotocol {
        if let Ok(v) = header::HeaderValue::from_str(p) {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    r
}

async fn route(
    state: Arc<State>,
    req: Request<Body>,
    peer: SocketAddr,
    client_cert: Option<Arc<CertificateDer<'static>>>,
) -> Resp {
    let path = req.uri().path().to_owned();
    let host = web::request_host(&req).unwrap_or_default();
    // Our own static files, on every host (also host-routed service hosts,
    // whose error pages use them).
    match path.as_str() {
        "/_tether/style.css" => return web::pages::asset(web::pages::STYLE_CSS, "text/css"),
        "/_tether/console.js" => {
            return web::pages::asset(web::pages::CONSOLE_JS, "text/javascript")
        }
        _ => {}
    }
    // Host routing: every other path of SERVICE.AGENT.BASE is the service's.
    if let Some(base) = state.web.base() {
        if let Some(route) = web::proxy::route_by_host(&base, &host) {
            let rest = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into());
            return web_proxy(state, req, peer, route, rest, host).await;
        }
    }
    match path.as_str() {
        "/healthz" => text(StatusCode::OK, "ok"),
        "/metrics" if state.public_metrics => {
            state.metrics.agents.set(state.registry.len() as i64);
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        AGENT_PATH => agent_upgrade(state, req, peer, client_cert.as_deref()),
        CLIENT_PATH => client_upgrade(state, req, peer),
        p if p.starts_with(RAW_WS_PREFIX) => {
            let rest = p[RAW_WS_PREFIX.len()..].to_owned();
            raw_ws(state, req, peer, &rest).await
        }
        "/login" if req.method() == http::Method::POST => {
            web::login::login_submit(&state, req, peer, &host).await
        }
        "/login" => web::login::login_page(&state, &req),
        "/logout" => web::login::logout(&state, req, &host).await,
        "/" | "/api/agents" | "/api/events" => {
            let Some((client, via)) = web::login::identify(&state, req.headers()) else {
                return web::login::login_required(&state, &req, &host);
            };
            let scheme = state.public_scheme();
            let port = web::split_port(&host).1.to_owned();
            match path.as_str() {
                "/" => web::console::page(&client, &via),
                "/api/agents" => web::console::agents_json(&state, &client, scheme, &port),
                _ => web::console::events(state.clone(), client, scheme, port),
            }
        }
        p if p.starts_with(web::PATH_PREFIX) => {
            let Some((route, tail)) = web::proxy::route_by_path(p) else {
                return web::pages::error(
                    req.headers(),
                    StatusCode::NOT_FOUND,
                    "bad_path",
                    "expected /a/AGENT/SERVICE/",
                );
            };
            let Some(tail) = tail else {
                // `/a/AGENT/SERVICE` → `/a/AGENT/SERVICE/` so relative links resolve.
                let q = req
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                return web::redirect(StatusCode::PERMANENT_REDIRECT, &format!("{p}/{q}"));
            };
            let rest = match req.uri().query() {
                Some(q) => format!("{tail}?{q}"),
                None => tail.to_owned(),
            };
            web_proxy(state, req, peer, route, rest, host).await
        }
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// Authenticates a browser or API request and proxies it to its service.
async fn web_proxy(
    state: Arc<State>,
    req: Request<Body>,
    peer: SocketAddr,
    route: web::proxy::WebRoute,
    rest: String,
    host: String,
) -> Resp {
    let Some((client, via)) = web::login::identify(&state, req.headers()) else {
        if let Some(t) = web::login::bearer(req.headers()) {
            let why = state.auth().client(&t).err().unwrap_or_default();
            state.metrics.error("bad_token");
            tracing::warn!(%peer, "http request with a refused credential: {why}");
            return web::pages::error(
                req.headers(),
                StatusCode::UNAUTHORIZED,
                "bad_token",
                "invalid client token",
            );
        }
        return web::login::login_required(&state, &req, &host);
    };
    let scheme = state.public_scheme();
    let cx = web::proxy::ProxyContext {
        peer,
        scheme,
        host: &host,
    };
    web::proxy::proxy(&state, req, route, &rest, &client, via, cx).await
}

fn check_tether_upgrade(req: &Request<Body>) -> Resp {
    if is_websocket_upgrade(req.headers()) && !offers_subprotocol(req.headers(), SUBPROTOCOL) {
        return text(
            StatusCode::BAD_REQUEST,
            format!("WebSocket subprotocol {SUBPROTOCOL} required (this server speaks protocol versions 1 to 3)"),
        );
    }
    switching_protocols(req, Some(SUBPROTOCOL))
}

/// The request's bearer token, or the 401 answer for `who` (agent, client).
fn require_token(
    state: &State,
    req: &Request<Body>,
    peer: SocketAddr,
    who: &str,
    allow_query: bool,
) -> Result<String, Box<Resp>> {
    bearer_token(req, allow_query).ok_or_else(|| {
        state.metrics.error("missing_token");
        tracing::warn!(%peer, "{who} connection without a token");
        Box::new(text(
            StatusCode::UNAUTHORIZED,
            format!("missing {who} token (Authorization: Bearer ...)"),
        ))
    })
}

fn unknown_token(state: &State, peer: SocketAddr, who: &str) -> Resp {
    state.metrics.error("bad_token");
    tracing::warn!(%peer, "{who} connection with an unknown token");
    text(StatusCode::UNAUTHORIZED, format!("invalid {who} token"))
}

/// Completes the upgrade and the protocol handshake of an accepted session.
async fn accept_session(
    state: &State,
    req: Request<Body>,
    cfg: tether_proto::Config,
    label: String,
    peer: SocketAddr,
) -> Option<(
    Connection,
    tether_net::SessionInfo,
    tether_net::session::IncomingStreams,
)> {
    let io = upgraded(req).await?;
    let (sink, source) = server_from_upgraded(io).await;
    match Connection::start(Role::Acceptor, cfg, sink, source, label.clone()).await {
        Ok(x) => Some(x),
        Err(e) => {
            state.metrics.error("handshake");
            tracing::warn!(session = %label, %peer, "handshake failed: {e}");
            None
        }
    }
}

/// A verified client certificate's claim to be agent `name` (mutual TLS).
fn cert_names_agent(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(server_name) = tokio_rustls::rustls::pki_types::ServerName::try_from(name) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// Refuses a request that hit a limit.
fn limit_refusal(state: &State, peer: SocketAddr, hit: crate::limits::LimitHit) -> Resp {
    state.metrics.limit_hit(hit.limit);
    tracing::warn!(%peer, limit = hit.limit, "refused: {}", hit.reason);
    let status = if hit.limit == "sessions" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    text(status, hit.reason)
}

fn agent_upgrade(
    state: Arc<State>,
    req: Request<Body>,
    peer: SocketAddr,
    client_cert: Option<&CertificateDer<'static>>,
) -> Resp {
    let auth = state.auth();
    let claimed = req
        .headers()
        .get(tether_proto::endpoints::AGENT_NAME_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // A client certificate naming a `mtls = true` agent, or a token.
    let by_cert = match (client_cert, &claimed) {
        (Some(cert), Some(c))
            if auth.agent_by_cert([c.as_str()]).is_some() && cert_names_agent(cert, c) =>
        {
            Some(c.clone())
        }
        _ => None,
    };
    let (name, token_hash) = match by_cert {
        Some(n) => (n, None),
        None => {
            let token = match require_token(&state, &req, peer, "agent", false) {
                Ok(t) => t,
                Err(r) => return *r,
            };
            let Some(name) = auth.agent(&token).map(str::to_owned) else {
                return unknown_token(&state, peer, "agent");
            };
            (name, Some(crate::auth::token_hash(&token)))
        }
    };
    if let Some(claimed) = &claimed {
        if *claimed != name {
            state.metrics.error("agent_name_mismatch");
            tracing::warn!(%peer, %claimed, token_for = %name, "agent name does not match its token");
            return text(
                StatusCode::FORBIDDEN,
                format!("this token belongs to agent {name:?}, not {claimed:?}"),
            );
        }
    }
    let resp = check_tether_upgrade(&req);
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    let slot = match state.limits.session(None) {
        Ok(s) => s,
        Err(hit) => return limit_refusal(&state, peer, hit),
    };
    let via = if token_hash.is_some() {
        "token"
    } else {
        "certificate"
    };
    let hold = authenticated_hold(&req);
    tokio::spawn(async move {
        let _slot = slot;
        let _hold = hold;
        let mut cfg = state.session_config.clone();
        cfg.accept_opens = false; // agents do not open streams towards the server
        let label = format!("agent={name}");
        let Some((conn, info, _incoming)) = accept_session(&state, req, cfg, label, peer).await
        else {
            return;
        };
        let (generation, old) = state.registry.register(
            &name,
            conn.clone(),
            peer,
            info.peer_software.clone(),
            info.version,
        );
        if let Some(old) = old {
            state.metrics.error("agent_replaced");
            tracing::warn!(agent = %name, old_addr = %old.addr, new_addr = %peer, "agent re-registered: newest session wins, draining the old one");
            old.conn.go_away(
                ErrorCode::Replaced,
                "a newer session of this agent connected",
            );
        }
        let owner = crate::SessionOwner::Agent {
            name: name.clone(),
            token_hash,
        };
        let key = state.track(conn.clone(), Some(owner));
        let sessions = state.metrics.sessions_of("agent");
        sessions.inc();
        state.metrics.agents.set(state.registry.len() as i64);
        tracing::info!(agent = %name, %peer, software = %info.peer_software, version = info.version, auth = via, "agent connected");
        let started = Instant::now();
        let why = conn.closed().await;
        sessions.dec();
        state.untrack(key);
        state.registry.unregister(&name, generation);
        state.metrics.agents.set(state.registry.len() as i64);
        tracing::info!(agent = %name, %peer, duration_s = started.elapsed().as_secs(), reason = why.as_deref().unwrap_or("drained"), "agent disconnected");
    });
    resp
}

/// The client a request's bearer credential names, or the 401 answer.
fn authenticate_client(
    state: &State,
    req: &Request<Body>,
    peer: SocketAddr,
    allow_query: bool,
) -> Result<crate::auth::ClientIdentity, Box<Resp>> {
    let token = require_token(state, req, peer, "client", allow_query)?;
    state.auth().client(&token).map_err(|why| {
        state.metrics.error("bad_token");
        tracing::warn!(%peer, "client credential refused: {why}");
        // The reason is for the log only: callers learn nothing about
        // which check failed.
        Box::new(text(StatusCode::UNAUTHORIZED, "invalid client token"))
    })
}

fn client_upgrade(state: Arc<State>, req: Request<Body>, peer: SocketAddr) -> Resp {
    let client = match authenticate_client(&state, &req, peer, false) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let resp = check_tether_upgrade(&req);
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    let slot = match state.limits.session(Some(&client.key())) {
        Ok(s) => s,
        Err(hit) => return limit_refusal(&state, peer, hit),
    };
    let hold = authenticated_hold(&req);
    tokio::spawn(async move {
        let _slot = slot;
        let _hold = hold;
        let label = format!("client={}", client.name);
        let mut cfg = state.session_config.clone();
        // One client must not be able to take all of an agent's streams.
        cfg.max_peer_streams = state.max_streams_per_client;
        let Some((conn, _info, mut incoming)) = accept_session(&state, req, cfg, label, peer).await
        else {
            return;
        };
        let key = state.track(
            conn.clone(),
            Some(crate::SessionOwner::Client(client.clone())),
        );
        let sessions = state.metrics.sessions_of("client");
        sessions.inc();
        tracing::info!(client = %client.name, %peer, "client connected");
        // A JWT identity's session ends when its token does.
        if let Some(left) = client.expires_in() {
            let c = conn.clone();
            let who = client.name.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(left) => {
                        tracing::info!(client = %who, "credential expired: closing the session");
                        c.close(ErrorCode::Unauthorized, "credential expired");
                    }
                    _ = c.closed() => {}
                }
            });
        }
        while let Some(inc) = incoming.recv().await {
            tokio::spawn(crate::relay::relay_client_stream(
                state.clone(),
                client.clone(),
                inc,
            ));
        }
        let why = conn.closed().await;
        sessions.dec();
        state.untrack(key);
        tracing::info!(client = %client.name, %peer, reason = why.as_deref().unwrap_or("closed"), "client disconnected");
    });
    resp
}

async fn upgraded(req: Request<Body>) -> Option<TokioIo<hyper::upgrade::Upgraded>> {
    match hyper::upgrade::on(req).await {
        Ok(u) => Some(TokioIo::new(u)),
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            None
        }
    }
}

/// HTTP status for a refused open.
pub fn status_for(code: OpenErrorCode) -> StatusCode {
    match code {
        OpenErrorCode::Forbidden => StatusCode::FORBIDDEN,
        OpenErrorCode::AgentOffline => StatusCode::SERVICE_UNAVAILABLE,
        OpenErrorCode::UnknownService => StatusCode::NOT_FOUND,
        OpenErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        OpenErrorCode::TooManyStreams => StatusCode::TOO_MANY_REQUESTS,
        OpenErrorCode::BadTarget => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// `/tether/v1/ws/AGENT/SERVICE`: one WebSocket carries one stream's bytes.
async fn raw_ws(state: Arc<State>, req: Request<Body>, peer: SocketAddr, rest: &str) -> Resp {
    let client = match authenticate_client(&state, &req, peer, true) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    // Validate the upgrade before dialing anything.
    let resp = switching_protocols(&req, None);
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    let slot = match state.limits.session(Some(&client.key())) {
        Ok(s) => s,
        Err(hit) => return limit_refusal(&state, peer, hit),
    };
    let started = Instant::now();
    let (agent_stream, grant) = match open_on_agent(&state, &client, TargetKind::Tcp, rest).await {
        Ok(x) => x,
        Err(RelayRefusal { code, reason }) => {
            tracing::info!(client = %client.name, %peer, target = %rest, %code, "raw websocket refused: {reason}");
            return text(status_for(code), reason);
        }
    };
    let target = rest.to_owned();
    let hold = authenticated_hold(&req);
    tokio::spawn(async move {
        let _slot = slot;
        let _hold = hold;
        let Some(io) = upgraded(req).await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(io, WsRole::Server, Some(ws_config())).await;
        let (tx, rx) = ws.split();
        let sessions = state.metrics.sessions_of("raw_ws");
        sessions.inc();
        tracing::info!(client = %client.name, %peer, %target, "raw websocket stream open");
        let (ar, aw) = agent_stream.split();
        run_relay(
            &state,
            &client.name,
            &target,
            started,
            Some(grant),
            (RawWsReader(rx), RawWsWriter(tx)),
            (ar, aw),
        )
        .await;
        sessions.dec();
    });
    resp
}

/// Reads a raw WebSocket's binary (or text) messages as stream bytes.
struct RawWsReader<S>(SplitStream<WebSocketStream<S>>);
/// Writes stream bytes as binary messages; EOF closes the WebSocket.
struct RawWsWriter<S>(SplitSink<WebSocketStream<S>, Message>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ChunkRead for RawWsReader<S> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match self.0.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                Some(Ok(Message::Text(t))) => return Ok(Some(Bytes::from(t.as_str().to_owned()))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(io::Error::other(e.to_string())),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ChunkWrite for RawWsWriter<S> {
    async fn write_chunk(&mut self, b: Bytes) -> io::Result<()> {
        self.0
            .send(Message::Binary(b))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
    }
    async fn finish(&mut self) -> io::Result<()> {
        // WebSocket has no half-close: the service finishing ends the socket.
        let _ = self.0.send(Message::Close(None)).await;
        Ok(())
    }
}
