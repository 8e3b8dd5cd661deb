//! The HTTP reverse proxy: browser requests to an agent's web service, over
//! tunnel streams.
//!
//! Requests go to the service as HTTP/1.1 through a keep-alive pool of
//! tunnel streams (hyper's pooled client, with a connector that opens
//! streams instead of sockets), so a page with fifty assets does not open
//! fifty streams. Bodies stream both ways with backpressure from the tunnel
//! windows; nothing is buffered whole. WebSocket upgrades are passed through:
//! after the service's `101`, the two upgraded connections are spliced.
//!
//! What the service learns about the request comes from the server's own
//! view, never from what the client wrote ([`set_forwarding`]): `Host` and
//! `X-Forwarded-Host` name the server (its public name, base domain or the
//! routed service name), `X-Forwarded-For` holds the client address the
//! server saw (or that trusted proxies vouch for), and every other
//! forwarding header the client sent (`Forwarded`, `X-Real-IP`,
//! `X-Forwarded-Port`, `X-Original-URL`, ...) is removed.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Instant;
use tether_net::io::StreamIo;
use tether_proto::{OpenErrorCode, ServiceKind, Target, TargetKind};

use super::login::{Via, COOKIE_NAMES};
use super::pages::error_page;
use super::{
    split_port, Body, BoxError, Resp, WebConfig, PATH_PREFIX, POOL_IDLE_PER_SERVICE,
    POOL_IDLE_TIMEOUT,
};
use crate::auth::ClientIdentity;
use crate::policy::Protocol;
use crate::relay::{admit, RelayRefusal};
use crate::State;

/// Which service a browser request is for, and how it was addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebRoute {
    /// The agent.
    pub agent: String,
    /// The service on it.
    pub service: String,
    /// `/a/AGENT/SERVICE` for path routing (stripped before forwarding);
    /// `None` for host routing.
    pub prefix: Option<String>,
}

/// Host routing: `SERVICE.AGENT.BASE` (the host without its port).
pub fn route_by_host(base: &str, host: &str) -> Option<WebRoute> {
    let (h, _) = super::split_port(host);
    let labels = h.strip_suffix(base)?.strip_suffix('.')?;
    let (service, agent) = labels.split_once('.')?;
    if service.is_empty() || agent.is_empty() {
        return None;
    }
    Some(WebRoute {
        agent: agent.to_owned(),
        service: service.to_owned(),
        prefix: None,
    })
}

/// Path routing: `/a/AGENT/SERVICE[/rest]`. Returns the route and the rest
/// of the path (`None` when the path stops right after the service name,
/// which gets a redirect to the slash form so relative links resolve).
pub fn route_by_path(path: &str) -> Option<(WebRoute, Option<&str>)> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let (agent, rest) = rest.split_once('/')?;
    let (service, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    if agent.is_empty() || service.is_empty() {
        return None;
    }
    Some((
        WebRoute {
            agent: agent.to_owned(),
            service: service.to_owned(),
            prefix: Some(format!("{PATH_PREFIX}{agent}/{service}")),
        },
        tail,
    ))
}

/// A failed tunnel open, as the connector reports it to hyper.
#[derive(Debug)]
pub struct ConnectError {
    /// Why.
    pub code: OpenErrorCode,
    /// Detail.
    pub reason: String,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

impl std::error::Error for ConnectError {}

/// A tunnel stream as hyper's client connection.
pub struct TunnelConn(TokioIo<StreamIo>);

impl Connection for TunnelConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TunnelConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Maps pool keys (URI hosts `sN.tether.invalid`) to `agent/service`.
#[derive(Default)]
struct Targets {
    by_target: HashMap<(String, String), u64>,
    by_id: HashMap<u64, (String, String)>,
}

/// Opens tunnel streams for hyper's pooled client.
#[derive(Clone)]
pub struct TunnelConnector {
    state: Weak<State>,
    targets: Arc<Mutex<Targets>>,
}

impl tower_service::Service<Uri> for TunnelConnector {
    type Response = TunnelConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TunnelConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let state = self.state.clone();
        let target = uri
            .host()
            .and_then(|h| h.strip_prefix('s'))
            .and_then(|h| h.split('.').next())
            .and_then(|n| n.parse::<u64>().ok())
            .and_then(|id| {
                self.targets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .by_id
                    .get(&id)
                    .cloned()
            });
        Box::pin(async move {
            let fail = |code, reason: String| ConnectError { code, reason };
            let (agent, service) =
                target.ok_or_else(|| fail(OpenErrorCode::Internal, "unknown pool key".into()))?;
            let state = state
                .upgrade()
                .ok_or_else(|| fail(OpenErrorCode::Internal, "server stopping".into()))?;
            let entry = state.registry.get(&agent).ok_or_else(|| {
                fail(
                    OpenErrorCode::AgentOffline,
                    format!("agent {agent} is not connected"),
                )
            })?;
            let gauge = crate::relay::PendingGauge::new(&state);
            let r = entry
                .conn
                .open(Target {
                    kind: TargetKind::Tcp,
                    address: service.clone(),
                })
                .await;
            drop(gauge);
            match r {
                Ok(s) => {
                    state.metrics.streams_total.inc();
                    Ok(TunnelConn(TokioIo::new(StreamIo::new(s))))
                }
                Err(tether_net::Refusal { code, reason }) => {
                    Err(fail(code, format!("agent {agent}: {reason}")))
                }
            }
        })
    }
}

/// The keep-alive pool of tunnel streams to web services.
pub struct Pool {
    client: Client<TunnelConnector, Body>,
    targets: Arc<Mutex<Targets>>,
}

impl Pool {
    /// A pool whose connector finds agents in `state`.
    pub fn new(state: Weak<State>) -> Pool {
        let targets: Arc<Mutex<Targets>> = Arc::default();
        let connector = TunnelConnector {
            state,
            targets: targets.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_SERVICE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .set_host(false)
            .build(connector);
        Pool { client, targets }
    }

    /// The pool key of a service: a URI authority only the connector reads.
    fn authority(&self, agent: &str, service: &str) -> String {
        let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let key = (agent.to_owned(), service.to_owned());
        let next = t.by_id.len() as u64;
        let id = *t.by_target.entry(key.clone()).or_insert(next);
        t.by_id.entry(id).or_insert(key);
        format!("s{id}.tether.invalid")
    }
}

/// Request headers that describe one hop, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Request headers that say where a request came from or what it was,
/// besides the ones the proxy sets itself. Clients can write them, and
/// services or frameworks may believe them (client address, scheme, host,
/// original URL), so they never reach a service. Every `X-Forwarded-*`
/// header the proxy does not set goes too (see [`set_forwarding`]).
const CLIENT_FORWARDING: [&str; 19] = [
    "forwarded",
    "forwarded-for",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-proxyuser-ip",
    "x-envoy-external-address",
    "x-original-forwarded-for",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-envoy-original-path",
    "x-original-host",
    "x-host",
    "x-scheme",
    "x-url-scheme",
];

/// What the proxy tells a service about a request, all from the server's
/// own view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarding<'a> {
    /// The client and the trusted proxies it came through, ending with the
    /// TCP peer ([`super::client_chain`]): `X-Forwarded-For`.
    pub chain: &'a [IpAddr],
    /// `http` or `https` as browsers reach the server: `X-Forwarded-Proto`.
    pub scheme: &'a str,
    /// The authority the server vouches for ([`forwarded_host`]):
    /// `X-Forwarded-Host`.
    pub host: &'a str,
    /// `Host`: the service's own name from the agent's catalog, or `host`.
    pub host_header: &'a str,
    /// `/a/AGENT/SERVICE` under path routing: `X-Forwarded-Prefix`.
    pub prefix: Option<&'a str>,
}

/// Replaces every forwarding header the client sent with the server's own:
/// `Host` and `X-Forwarded-{For,Proto,Host,Prefix}` are set, every other
/// `X-Forwarded-*` and the headers in [`CLIENT_FORWARDING`] are removed.
pub fn set_forwarding(h: &mut HeaderMap, f: &Forwarding<'_>) {
    let theirs: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().starts_with("x-forwarded"))
        .cloned()
        .collect();
    for n in theirs {
        h.remove(n);
    }
    for n in CLIENT_FORWARDING {
        h.remove(n);
    }
    let set = |h: &mut HeaderMap, name: HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(name, v);
        }
    };
    let xff: Vec<String> = f.chain.iter().map(IpAddr::to_string).collect();
    set(
        h,
        HeaderName::from_static("x-forwarded-for"),
        &xff.join(", "),
    );
    set(h, HeaderName::from_static("x-forwarded-proto"), f.scheme);
    set(h, HeaderName::from_static("x-forwarded-host"), f.host);
    if let Some(p) = f.prefix {
        set(h, HeaderName::from_static("x-forwarded-prefix"), p);
    }
    set(h, header::HOST, f.host_header);
}

/// The authority (`host[:port]`) the server vouches for as the one the
/// browser addressed, for `X-Forwarded-Host` (and `Host`, unless the
/// service names its own). Never a name the client made up:
///
/// * host routing: the routed name `SERVICE.AGENT.BASE` (routing checked
///   that it lies under the base domain);
/// * path routing: `[http] public_name`, else the base domain.
///
/// The port is `public_name`'s when that is set, else the one the browser
/// used (a port on the server's own name). With neither a public name nor a
/// base domain the server has no name of its own, and path routing passes
/// on the host the browser sent (the caller logs a warning once).
pub fn forwarded_host(cfg: &WebConfig, route: &WebRoute, request_host: &str) -> String {
    let (name, request_port) = split_port(request_host);
    let public = cfg.public();
    let port = match &public {
        Some(p) => split_port(p).1.to_owned(),
        None => request_port.to_owned(),
    };
    match (&route.prefix, public, cfg.base()) {
        (None, _, _) => format!("{name}{port}"),
        (Some(_), Some(p), _) => p,
        (Some(_), None, Some(base)) => format!("{base}{port}"),
        (Some(_), None, None) => request_host.to_owned(),
    }
}

/// Whether the warning about path routing without a name of the server's
/// own has been logged (once per process is enough).
static NO_PUBLIC_NAME_WARNED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn is_upgrade(h: &HeaderMap) -> Option<HeaderValue> {
    let conn_upgrade = h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| {
                s.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("upgrade"))
            })
            .unwrap_or(false)
    });
    if conn_upgrade {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header
/// names, and `Upgrade` (put back by the caller for upgrades).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

/// Whether a cookie name is one of tether's own (any letter case, so that
/// look-alikes go too).
fn is_tether_cookie(name: &[u8]) -> bool {
    COOKIE_NAMES
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// Removes tether's own cookies (under every name they may have) from the
/// `Cookie` headers: the service never sees the browser's login.
fn strip_tether_cookies(h: &mut HeaderMap) {
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| {
            let name = kv.split('=').next().unwrap_or("").trim();
            !kv.is_empty() && !is_tether_cookie(name.as_bytes())
        })
        .map(str::to_owned)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Whether a service's `Set-Cookie` may reach the browser: never one for
/// tether's own cookies. Judged by raw bytes, so a header with non-ASCII
/// bytes cannot slip through as "no name".
pub fn service_may_set(v: &HeaderValue) -> bool {
    let raw = v.as_bytes();
    let name = raw.split(|b| *b == b'=').next().unwrap_or(raw).trim_ascii();
    !is_tether_cookie(name)
}

/// Rewrites a `Location` from the service so it points back through the proxy.
pub fn rewrite_location(
    loc: &str,
    prefix: Option<&str>,
    external_origin: &str,
    service_hosts: &[&str],
) -> Option<String> {
    let prefix = prefix.unwrap_or("");
    if loc.starts_with('/') && !loc.starts_with("//") {
        return (!prefix.is_empty()).then(|| format!("{prefix}{loc}"));
    }
    for scheme in ["http://", "https://"] {
        if let Some(rest) = loc.strip_prefix(scheme) {
            let (authority, path) = match rest.find(['/', '?', '#']) {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if service_hosts
                .iter()
                .any(|h| !h.is_empty() && authority.eq_ignore_ascii_case(h))
            {
                let path = if path.starts_with('/') {
                    path.to_owned()
                } else {
                    format!("/{path}")
                };
                return Some(format!("{external_origin}{prefix}{path}"));
            }
        }
    }
    None
}

/// Rewrites a `Set-Cookie` for path routing: `Path` moves under the prefix
/// and `Domain` goes (the cookie belongs to the server's host).
pub fn rewrite_set_cookie(value: &str, prefix: &str) -> String {
    let mut parts = value.split(';');
    let mut out = parts.next().unwrap_or("").trim().to_owned();
    let mut had_path = false;
    for attr in parts {
        let a = attr.trim();
        let lower = a.to_ascii_lowercase();
        if lower.starts_with("domain=") {
            continue;
        }
        out.push_str("; ");
        if lower.starts_with("path=") {
            had_path = true;
            let p = &a[5..];
            let p = if p.starts_with('/') { p } else { "/" };
            out.push_str("Path=");
            out.push_str(prefix);
            out.push_str(p);
        } else {
            out.push_str(a);
        }
    }
    if !had_path {
        out.push_str("; Path=");
        out.push_str(prefix);
        out.push('/');
    }
    out
}

/// What the proxy needs to know about the incoming request.
pub struct ProxyContext<'a> {
    /// The browser's address.
    pub peer: SocketAddr,
    /// `http` or `https`, as the browser sees the server.
    pub scheme: &'static str,
    /// The host the browser used (with port).
    pub host: &'a str,
}

/// The audit line of one proxied request, written when its response body
/// is done (or dropped): who, what, status, bytes both ways, durations.
struct HttpAudit {
    identity: String,
    target: String,
    method: String,
    path: String,
    status: u16,
    started: Instant,
    ttfb_ms: u64,
    bytes_up: Arc<std::sync::atomic::AtomicU64>,
    bytes_down: std::sync::atomic::AtomicU64,
}

impl Drop for HttpAudit {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        tracing::info!(
            target: "audit",
            identity = %self.identity,
            target = %self.target,
            protocol = "http",
            decision = "allowed",
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes_up = self.bytes_up.load(Relaxed),
            bytes_down = self.bytes_down.load(Relaxed),
            ttfb_ms = self.ttfb_ms,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "audit"
        );
    }
}

/// Proxies one request to `route` for `client`.
pub async fn proxy(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    route: WebRoute,
    rest: &str,
    client: &ClientIdentity,
    via: Via,
    cx: ProxyContext<'_>,
) -> Resp {
    let started = Instant::now();
    let html = super::wants_html(req.headers());
    let (agent, service) = (route.agent.as_str(), route.service.as_str());
    let refuse = |status: StatusCode, code: &str, msg: String| {
        state.metrics.error(code);
        tracing::info!(client = %client.name, %agent, %service, path = %rest, status = status.as_u16(), "http request refused: {msg}");
        error_page(html, status, code, &msg)
    };
    let admission = match admit(state, client, agent, service, Protocol::Http) {
        Ok(a) => a,
        Err(RelayRefusal { code, reason }) => {
            let status = if code == OpenErrorCode::Forbidden {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            return refuse(status, code.as_str(), reason);
        }
    };
    let Some(entry) = state.registry.get(agent) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_offline",
            format!("agent {agent} is not connected"),
        );
    };
    let catalog = entry.conn.peer_catalog().borrow().clone();
    if catalog.is_none() && entry.version >= tether_proto::CATALOG_VERSION {
        // It announces its services right after connecting; until then we
        // cannot tell an HTTP service from a database.
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_starting",
            format!("agent {agent} has not announced its services yet; retry in a moment"),
        );
    }
    let mut host_header = None;
    if let Some(c) = catalog {
        match c.iter().find(|e| e.name == service) {
            None => {
                return refuse(
                    StatusCode::NOT_FOUND,
                    "unknown_service",
                    format!("agent {agent} has no service named {service}"),
                )
            }
            Some(e) if e.kind != ServiceKind::Http => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "not_http",
                    format!("{agent}/{service} is a {} service, not HTTP (mark it http in the agent's config to open it in a browser)", e.kind.as_str()),
                )
            }
            Some(e) => {
                if !e.host.is_empty() {
                    host_header = Some(e.host.clone());
                }
            }
        }
    }

    // The request as the service will see it.
    let upgrade = is_upgrade(req.headers());
    let hold = req.extensions().get::<crate::ConnectionHold>().cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let mut h = parts.headers;
    // Read the client chain before anything is stripped: a client could
    // name `X-Forwarded-For` in `Connection` to hide the proxies' entries.
    let chain = super::client_chain(&state.web, cx.peer.ip(), &h);
    strip_hop_by_hop(&mut h);
    strip_tether_cookies(&mut h);
    if via == Via::Bearer {
        // It was the credential: the service never sees it.
        h.remove(header::AUTHORIZATION);
    }
    let public_host = forwarded_host(&state.web, &route, cx.host);
    if route.prefix.is_some()
        && state.web.public().is_none()
        && state.web.base().is_none()
        && !NO_PUBLIC_NAME_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!("path routing without [http] public_name or base_domain: services get the Host the browser sent; set public_name");
    }
    set_forwarding(
        &mut h,
        &Forwarding {
            chain: &chain,
            scheme: cx.scheme,
            host: &public_host,
            host_header: host_header.as_deref().unwrap_or(&public_host),
            prefix: route.prefix.as_deref(),
        },
    );
    if let Some(u) = &upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u.clone());
    }
    let uri =
        match format!("http://{}{rest}", state.web_pool.authority(agent, service)).parse::<Uri>() {
            Ok(u) => u,
            Err(_) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_path",
                    format!("cannot forward path {rest:?}"),
                )
            }
        };
    let bytes_up: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let counted = bytes_up.clone();
    let body = body.map_frame(move |f| {
        if let Some(d) = f.data_ref() {
            counted.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        f
    });
    let mut out = Request::new(body.map_err(BoxError::from).boxed_unsync());
    *out.method_mut() = method.clone();
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = h;

    let resp = match state.web_pool.client.request(out).await {
        Ok(r) => r,
        Err(e) => {
            let (status, code, msg) = match find_connect_error(&e) {
                Some(ce) => (
                    crate::http::status_for(ce.code),
                    ce.code.as_str().to_owned(),
                    ce.reason.clone(),
                ),
                None => (
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway".to_owned(),
                    format!("{agent}/{service} did not answer with HTTP: {e}"),
                ),
            };
            // Refusals keep their meaning (404 unknown, 403 forbidden by the
            // agent); everything else is the gateway's failure.
            let status = match status {
                StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => status,
                s if s.is_server_error() => s,
                _ => StatusCode::BAD_GATEWAY,
            };
            return refuse(status, &code, msg);
        }
    };

    let mut resp = resp;
    let status = resp.status();
    let service_upgrade = if status == StatusCode::SWITCHING_PROTOCOLS {
        Some(hyper::upgrade::on(&mut resp))
    } else {
        None
    };
    let (mut parts, body) = resp.into_parts();
    let resp_upgrade = is_upgrade(&parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    // Point redirects and cookies back through the proxy.
    // Back to the browser that asked, at the host it used; an absolute
    // redirect may name the service's own host or the one we forwarded.
    let external_origin = format!("{}://{}", cx.scheme, cx.host);
    let hosts = [host_header.as_deref().unwrap_or(""), &public_host, cx.host];
    if let Some(loc) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(new) = rewrite_location(loc, route.prefix.as_deref(), &external_origin, &hosts)
        {
            if let Ok(v) = HeaderValue::from_str(&new) {
                parts.headers.insert(header::LOCATION, v);
            }
        }
    }
    // A service may not set (or clear) tether's own cookies, e.g. to sign
    // a browser in as someone else across the base domain.
    let theirs: Vec<HeaderValue> = parts
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| service_may_set(v))
        .cloned()
        .collect();
    parts.headers.remove(header::SET_COOKIE);
    for v in theirs {
        parts.headers.append(header::SET_COOKIE, v);
    }
    if let Some(prefix) = &route.prefix {
        let cookies: Vec<String> = parts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| rewrite_set_cookie(v, prefix))
            .collect();
        parts.headers.remove(header::SET_COOKIE);
        for c in cookies {
            if let Ok(v) = HeaderValue::from_str(&c) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
    }
    let audit = Arc::new(HttpAudit {
        identity: client.name.clone(),
        target: format!("{agent}/{service}"),
        method: method.to_string(),
        path: rest.to_owned(),
        status: status.as_u16(),
        started,
        ttfb_ms: started.elapsed().as_millis() as u64,
        bytes_up: bytes_up.clone(),
        bytes_down: Default::default(),
    });

    if let (Some(service_side), Some(client_side)) = (service_upgrade, client_upgrade) {
        if let Some(u) = resp_upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, u);
        }
        let state = state.clone();
        let who = client.name.clone();
        let target = format!("{agent}/{service}");
        // An upgraded connection lives on: a reload that revokes its access,
        // or its JWT expiring, ends it like any stream.
        let Some(ticket) =
            state.track_stream(client, agent, service, Protocol::Http, admission.generation)
        else {
            return refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                crate::ACCESS_REVOKED.into(),
            );
        };
        tokio::spawn(async move {
            let _permit = admission.permit;
            let _audit = audit;
            let _hold = hold;
            let (Ok(s), Ok(c)) = (service_side.await, client_side.await) else {
                tracing::debug!(%target, "upgrade did not complete");
                return;
            };
            state.metrics.live_streams.inc();
            let mut s = TokioIo::new(s);
            let mut c = TokioIo::new(c);
            let r = tokio::select! {
                r = tokio::io::copy_bidirectional(&mut c, &mut s) => r,
                why = ticket.ended() => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)),
            };
            state.metrics.live_streams.dec();
            match r {
                Ok((up, down)) => {
                    state.metrics.add_bytes(up, down);
                    tracing::info!(client = %who, %target, bytes_up = up, bytes_down = down, "upgraded connection closed")
                }
                Err(e) => tracing::info!(client = %who, %target, "upgraded connection ended: {e}"),
            }
        });
        return Response::from_parts(parts, super::empty());
    }
    // The permit lives as long as the response body, and a long response
    // (events, a download) ends when access is revoked or the JWT expires.
    let Some(ticket) =
        state.track_stream(client, agent, service, Protocol::Http, admission.generation)
    else {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            crate::ACCESS_REVOKED.into(),
        );
    };
    let permit = admission.permit;
    let body = body
        .map_frame(move |f| {
            let _ = &permit;
            if let Some(d) = f.data_ref() {
                audit
                    .bytes_down
                    .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            f
        })
        .map_err(BoxError::from)
        .boxed_unsync();
    let body = RevocableBody {
        ended: ticket.ended(),
        _ticket: ticket,
        inner: body,
        done: false,
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// A response body that ends with an error when its stream ticket is
/// revoked (a reload took the access away) or the credential expires.
struct RevocableBody {
    inner: Body,
    ended: Pin<Box<dyn Future<Output = &'static str> + Send>>,
    _ticket: crate::StreamTicket,
    done: bool,
}

impl http_body::Body for RevocableBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(why) = this.ended.as_mut().poll(cx) {
            this.done = true;
            return Poll::Ready(Some(Err(why.into())));
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn find_connect_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ConnectError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(ce) = err.downcast_ref::<ConnectError>() {
            return Some(ce);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route_by_host("tether.test", "grafana.prod.tether.test:8443"),
            Some(WebRoute {
                agent: "prod".into(),
                service: "grafana".into(),
                prefix: None
            })
        );
        assert_eq!(
            route_by_host("tether.test", "web.eu.prod.tether.test").map(|r| r.agent),
            Some("eu.prod".into())
        );
        assert_eq!(route_by_host("tether.test", "tether.test"), None);
        assert_eq!(route_by_host("tether.test", "prod.tether.test"), None);
        assert_eq!(route_by_host("tether.test", "a.b.eviltether.test"), None);
        let (r, rest) = route_by_path("/a/prod/grafana/d/x?y=1").unwrap();
        assert_eq!((r.agent.as_str(), r.service.as_str()), ("prod", "grafana"));
        assert_eq!(r.prefix.as_deref(), Some("/a/prod/grafana"));
        assert_eq!(rest, Some("/d/x?y=1"));
        assert_eq!(route_by_path("/a/prod/grafana").unwrap().1, None);
        assert!(route_by_path("/a/prod").is_none());
        assert!(route_by_path("/a//x/").is_none());
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn tether_cookies_never_reach_the_service() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1; tether_session=s3cret".parse().unwrap());
        h.append("cookie", "tether_csrf=x; b=2".parse().unwrap());
        h.append(
            "cookie",
            "__Host-tether_session=s; __Host-tether_csrf=c; __host-TETHER_SESSION=x"
                .parse()
                .unwrap(),
        );
        strip_tether_cookies(&mut h);
        assert_eq!(h.get("cookie").unwrap(), "a=1; b=2");
        let mut h = HeaderMap::new();
        h.append("cookie", "tether_session=s3cret".parse().unwrap());
        strip_tether_cookies(&mut h);
        assert!(h.get("cookie").is_none());
    }

    #[test]
    fn services_cannot_set_tethers_cookies() {
        let v = |b: &[u8]| HeaderValue::from_bytes(b).unwrap();
        assert!(service_may_set(&v(b"sid=1; Path=/")));
        assert!(!service_may_set(&v(b"tether_session=x; Domain=t.test")));
        assert!(!service_may_set(&v(b" Tether_Session=x")));
        assert!(!service_may_set(&v(
            b"tether_session=x; Path=/; x=\xc3\xa9"
        )));
        assert!(!service_may_set(&v(b"tether_csrf=1")));
        assert!(!service_may_set(&v(
            b"__Host-tether_session=1; Path=/; Secure"
        )));
        assert!(!service_may_set(&v(
            b"__Host-tether_csrf=1; Path=/; Secure"
        )));
    }

    #[test]
    fn services_get_the_servers_forwarding_headers_only() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "evil.example"),
            ("x-forwarded-for", "198.51.100.66"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-prefix", "/evil"),
            ("x-forwarded-port", "1"),
            ("x-forwarded-server", "evil"),
            ("x-forwarded-scheme", "http"),
            ("x-forwarded-user", "admin"),
            ("forwarded", "for=198.51.100.66;host=evil.example"),
            ("x-real-ip", "198.51.100.66"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-client-ip", "198.51.100.66"),
            ("true-client-ip", "198.51.100.66"),
            ("x-original-host", "evil.example"),
            ("x-host", "evil.example"),
            ("x-scheme", "http"),
            ("cf-connecting-ip", "198.51.100.66"),
            ("x-kept", "1"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        let chain: Vec<IpAddr> = vec!["203.0.113.9".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        set_forwarding(
            &mut h,
            &Forwarding {
                chain: &chain,
                scheme: "https",
                host: "tether.test",
                host_header: "grafana:3000",
                prefix: None,
            },
        );
        let mut seen: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        seen.sort();
        let want: Vec<(String, String)> = [
            ("host", "grafana:3000"),
            ("x-forwarded-for", "203.0.113.9, 10.0.0.5"),
            ("x-forwarded-host", "tether.test"),
            ("x-forwarded-proto", "https"),
            ("x-kept", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn the_forwarded_host_is_one_the_server_vouches_for() {
        let path = route_by_path("/a/prod/web/").unwrap().0;
        let host = route_by_host("tether.test", "web.prod.tether.test:8443").unwrap();
        let cfg = |base: Option<&str>, public: Option<&str>| WebConfig {
            base_domain: base.map(str::to_owned),
            public_name: public.map(str::to_owned),
            ..Default::default()
        };
        let base = cfg(Some("Tether.Test"), None);
        assert_eq!(forwarded_host(&base, &path, "evil.example"), "tether.test");
        assert_eq!(
            forwarded_host(&base, &path, "evil.example:8443"),
            "tether.test:8443"
        );
        assert_eq!(
            forwarded_host(&base, &host, "web.prod.tether.test:8443"),
            "web.prod.tether.test:8443"
        );
        let public = cfg(Some("tether.test"), Some("gw.example.com"));
        assert_eq!(
            forwarded_host(&public, &path, "evil.example:1"),
            "gw.example.com"
        );
        assert_eq!(
            forwarded_host(&public, &host, "web.prod.tether.test:8443"),
            "web.prod.tether.test",
            "the public name's port (none) wins over the browser's"
        );
        let public = cfg(None, Some("gw.example.com:8443"));
        assert_eq!(
            forwarded_host(&public, &path, "10.0.0.1:7700"),
            "gw.example.com:8443"
        );
        // No name of its own: what the browser used.
        assert_eq!(
            forwarded_host(&cfg(None, None), &path, "127.0.0.1:7700"),
            "127.0.0.1:7700"
        );
    }

    #[test]
    fn locations_and_cookies_follow_the_prefix() {
        let hosts = ["grafana:3000", "tether.test"];
        assert_eq!(
            rewrite_location("/login", Some("/a/p/g"), "https://tether.test", &hosts).as_deref(),
            Some("/a/p/g/login")
        );
        assert_eq!(
            rewrite_location(
                "http://grafana:3000/x?y",
                Some("/a/p/g"),
                "https://tether.test",
                &hosts
            )
            .as_deref(),
            Some("https://tether.test/a/p/g/x?y")
        );
        assert_eq!(
            rewrite_location(
                "https://other.example/",
                Some("/a/p/g"),
                "https://tether.test",
                &hosts
            ),
            None
        );
        assert_eq!(rewrite_location("/x", None, "https://h", &hosts), None);
        assert_eq!(
            rewrite_set_cookie("sid=1; Path=/; Domain=grafana; HttpOnly", "/a/p/g"),
            "sid=1; Path=/a/p/g/; HttpOnly"
        );
        assert_eq!(rewrite_set_cookie("sid=1", "/a/p/g"), "sid=1; Path=/a/p/g/");
    }
}
