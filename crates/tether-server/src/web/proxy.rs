//! The HTTP reverse proxy handler: one browser or API request to an agent's
//! web service, from its credential to the end of its response.
//!
//! A request is admitted through the one open path like a CLI open
//! ([`crate::open::Opener::admit_request`]: rate, policy with protocol
//! `http`, a stream slot), checked against the agent's catalog, rewritten
//! ([`super::rewrite`]) and sent over the pool's keep-alive tunnel streams
//! ([`super::pool`]), or, to a service that speaks only HTTP/2, as HTTP/2
//! streams on one tunnel stream per caller ([`super::h2_pool`]). Bodies
//! stream both ways with backpressure from the tunnel windows; nothing is
//! buffered whole. The request's guard lives as
//! long as its response body, which ends when a reload revokes the access
//! or the JWT expires. WebSocket upgrades are passed through: after the
//! service's `101`, the two upgraded connections are spliced, under the
//! same guard.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tether_net::{Refusal, StreamError};
use tether_proto::{CatalogEntry, ResetCode, ServiceKind};

use super::credential::{identify_on, ConnectionCredential};
use super::login::{bad_token, login_required, refused_bearer, Via};
use super::pages::error_page;
use super::pool::{refusal_of, with_causes};
use super::rewrite::{
    forwarded_host, other_transfer_coding, rewrite_response, set_forwarding, strip_hop_by_hop,
    strip_tether_cookies, websocket_upgrade, Forwarding,
};
use super::route::WebRoute;
use super::{client_chain, wants_html, Web};
use crate::admission::ConnectionHold;
use crate::metrics::Metrics;
use crate::open::{http_status, Caller, OpenGuard};
use crate::policy::target_name;
use crate::response::{empty, BoxError, Resp};
use crate::streams::{ByteCounts, Traffic, ACCESS_REVOKED};

/// Whether the warning about path routing without a name of the server's
/// own has been logged (once per process is enough).
static NO_PUBLIC_NAME_WARNED: AtomicBool = AtomicBool::new(false);

/// What the proxy needs to know about the incoming request.
struct ProxyContext<'a> {
    /// The browser's address.
    peer: SocketAddr,
    /// `http` or `https`, as the browser sees the server.
    scheme: &'static str,
    /// The host the browser used (with port).
    host: &'a str,
}

/// Authenticates a browser or API request (login cookie or bearer token,
/// the latter remembered on the request's connection) and proxies it to
/// `route`; `rest` is the path and query to forward, `host` the host the
/// browser used.
pub(crate) async fn serve(
    web: &Web,
    req: Request<Incoming>,
    peer: SocketAddr,
    route: WebRoute,
    rest: String,
    host: String,
    credential: &ConnectionCredential,
) -> Resp {
    let Some((client, via)) = identify_on(web, req.headers(), credential) else {
        if refused_bearer(web, req.headers(), peer, req.uri().path()) {
            return bad_token(req.headers());
        }
        return login_required(web, &req, &host);
    };
    let cx = ProxyContext {
        peer,
        scheme: web.public_scheme(),
        host: &host,
    };
    proxy(web, req, route, &rest, Caller::Client(client), via, cx).await
}

/// Proxies one request to `route` for `caller`.
async fn proxy(
    web: &Web,
    mut req: Request<Incoming>,
    route: WebRoute,
    rest: &str,
    caller: Caller,
    via: Via,
    cx: ProxyContext<'_>,
) -> Resp {
    let started = Instant::now();
    let html = wants_html(req.headers());
    let (agent, service) = (route.agent.as_str(), route.service.as_str());
    let name = caller.name();
    let refuse = |status: StatusCode, code: &str, msg: String| {
        web.metrics.error(code);
        tracing::info!(client = %name, %agent, %service, path = %rest, status = status.as_u16(), "http request refused: {msg}");
        let mut r = error_page(html, status, code, &msg);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // The agent may well be reachable through another replica or in
            // a moment: retry soon, on a new connection (the load balancer
            // may pick another replica).
            let h = r.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    };
    let mut guard = match web.opener.admit_request(&caller, agent, service) {
        Ok(g) => g,
        Err(Refusal { code, reason }) => {
            return refuse(crate::open::http_status(code), code.as_str(), reason)
        }
    };
    // What a login opened (a WebSocket, a long response) ends with it.
    if let Some((signed_out, expires)) = via.login_end() {
        guard.end_with_login(signed_out, tokio::time::Instant::from_std(expires));
    }
    let ServiceHttp { host_header, http2 } = match check_service(web, agent, service).await {
        Ok(h) => h,
        Err((status, code, msg)) => return refuse(status, code, msg),
    };

    // The request as the service will see it.
    let upgrade = websocket_upgrade(req.headers());
    if http2 && upgrade {
        // RFC 8441's extended CONNECT would carry it; not implemented.
        return refuse(
            StatusCode::NOT_IMPLEMENTED,
            "upgrade_unsupported",
            format!("{agent}/{service} speaks HTTP/2 only: protocol upgrades (WebSocket) to it are not supported"),
        );
    }
    if other_transfer_coding(req.headers()) {
        // RFC 9112 6.1: a coding the server does not understand is 501.
        return refuse(
            StatusCode::NOT_IMPLEMENTED,
            "transfer_coding",
            "the request has a transfer coding other than chunked".into(),
        );
    }
    let hold = req.extensions().get::<ConnectionHold>().cloned();
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let mut h = parts.headers;
    // `TE: trailers` says the client takes trailers (gRPC's status comes in
    // them): passed on (HTTP/2 allows no other `TE` value), since a service
    // may send trailers only when asked (hyper's HTTP/1.1 server does).
    let te_trailers = accepts_trailers(&h);
    let public_host = outbound_headers(
        web,
        &mut h,
        &route,
        &via,
        &cx,
        host_header.as_deref(),
        upgrade,
    );
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // HTTP/2 names the host in `:authority`, which hyper takes from the
    // URI: the `Host` the service should see. The pool's URIs name a pool
    // key instead.
    let uri = if http2 {
        h2_uri(h.remove(header::HOST), rest)
    } else {
        origin_form(rest)
    };
    let Some(uri) = uri else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_path",
            if http2 {
                format!(
                    "cannot forward path {rest:?} with host {:?} as HTTP/2",
                    host_header.as_deref().unwrap_or(&public_host)
                )
            } else {
                format!("cannot forward path {rest:?}")
            },
        );
    };
    let bytes: Arc<ByteCounts> = Arc::default();
    // Live from here, not from the response: a reload that revokes the
    // access, or the credential expiring, ends the request while it is sent
    // (a long upload) and while the service works on it (a long poll).
    if guard
        .track(&caller, agent, service, Traffic::Counted(bytes.clone()))
        .is_err()
    {
        return refuse(StatusCode::FORBIDDEN, "forbidden", ACCESS_REVOKED.into());
    }
    let guard = Arc::new(guard);
    // A body still on its way holds the guard (and so its stream slot and
    // revocation entry) after the response is done, and ends with an error
    // when the guard's stream must end.
    let body = if http_body::Body::is_end_stream(&body) {
        body.map_err(BoxError::from).boxed_unsync()
    } else {
        // Over HTTP/2 the upload holds the client's stream too: it is
        // dropped when that stream is reset for an answer given no window.
        match crate::h2_stall::Upload::in_stream_task(body) {
            Ok(held) => GuardedBody::upload(held, &guard, &bytes).boxed_unsync(),
            Err(body) => GuardedBody::upload(body, &guard, &bytes).boxed_unsync(),
        }
    };
    let mut out = Request::new(body);
    *out.method_mut() = method.clone();
    *out.uri_mut() = uri;
    *out.headers_mut() = h;
    let caller_key = guard.key().clone();
    // Boxed: raced against the guard, the send would otherwise widen the
    // request's future, which hyper moves per request.
    let send = Box::pin(async {
        if http2 {
            *out.version_mut() = Version::HTTP_2;
            // Boxed: an HTTP/2 service's request future is the largest, and
            // would otherwise size the boxed send of every HTTP/1.1 request.
            Box::pin(web.h2.request(caller_key, agent, service, out)).await
        } else {
            *out.version_mut() = Version::HTTP_11;
            web.pool.request(caller_key, agent, service, out).await
        }
    });
    // Awaited again by the response body: one watch for the whole request.
    let mut ended = guard.ended();
    let sent = tokio::select! {
        biased; // no random pick per request: the answer is the usual end
        sent = send => sent,
        why = &mut ended => return refuse(StatusCode::FORBIDDEN, "forbidden", why.into()),
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let (status, code, msg) = gateway_refusal(&*e, agent, service);
            return refuse(status, &code, msg);
        }
    };

    if other_transfer_coding(resp.headers()) {
        return refuse(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            format!("{agent}/{service} answered with a transfer coding other than chunked, which the proxy cannot pass on"),
        );
    }
    let status = resp.status();
    let service_upgrade = if status == StatusCode::SWITCHING_PROTOCOLS {
        if !(upgrade && websocket_upgrade(resp.headers())) {
            return refuse(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("{agent}/{service} switched to a protocol it was not asked for"),
            );
        }
        Some(hyper::upgrade::on(&mut resp))
    } else {
        None
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // Back to the browser that asked, at the host it used; an absolute
    // redirect may name the service's own host or the one we forwarded.
    // (Formatted only for a response that has a `Location` to rewrite.)
    let external_origin = || format!("{}://{}", cx.scheme, cx.host);
    let hosts = [host_header.as_deref().unwrap_or(""), &public_host, cx.host];
    rewrite_response(
        &mut parts.headers,
        route.prefix.as_deref(),
        external_origin,
        &hosts,
    );
    let audit = HttpAudit {
        identity: name.to_owned(),
        target: target_name(agent, service),
        method: method.as_str().to_owned(),
        path: rest.to_owned(),
        status: status.as_u16(),
        started,
        ttfb_ms: started.elapsed().as_millis() as u64,
        bytes: bytes.clone(),
        cut: None,
    };
    // The response lives on (a long download, server-sent events, an
    // upgraded connection): a reload that revokes its access, or its JWT
    // expiring, ends it like any stream (the guard's `ended`).
    if let (Some(service_side), Some(client_side)) = (service_upgrade, client_upgrade) {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let who = name.to_owned();
        let upgrade = splice_upgraded(
            web.metrics.clone(),
            ended,
            guard,
            audit,
            who,
            service_side,
            client_side,
        );
        tokio::spawn(async move {
            let _hold = hold;
            upgrade.await
        });
        return Response::from_parts(parts, empty());
    }
    let body = GuardedBody {
        inner: body,
        ended,
        _guard: guard,
        bytes,
        way: Way::Down,
        audit: Some(audit),
        done: false,
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// Rewrites the client's request headers `h` for the service (see
/// [`super::rewrite`]); returns the authority the server vouches for
/// (`X-Forwarded-Host`).
fn outbound_headers(
    web: &Web,
    h: &mut HeaderMap,
    route: &WebRoute,
    via: &Via,
    cx: &ProxyContext<'_>,
    host_header: Option<&str>,
    upgrade: bool,
) -> String {
    // Read the client chain before anything is stripped: a client could
    // name `X-Forwarded-For` in `Connection` to hide the proxies' entries.
    let chain = client_chain(&web.cfg, cx.peer.ip(), h);
    strip_hop_by_hop(h);
    strip_tether_cookies(h);
    if matches!(via, Via::Bearer) {
        // It was the credential: the service never sees it.
        crate::auth::strip_bearer(h);
    }
    let public_host = forwarded_host(&web.cfg, route, cx.host);
    if route.prefix.is_some()
        && web.public.is_none()
        && web.base.is_none()
        && !NO_PUBLIC_NAME_WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!("path routing without [http] public_name or base_domain: services get the Host the browser sent; set public_name");
    }
    set_forwarding(
        h,
        &Forwarding {
            chain: &chain,
            scheme: cx.scheme,
            host: &public_host,
            host_header: host_header.unwrap_or(&public_host),
            prefix: route.prefix.as_deref(),
        },
    );
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    public_host
}

/// Whether the request's `TE` names `trailers`.
fn accepts_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// `path_and_query` as an HTTP/1.1 request target: origin form only
/// (`OPTIONS *` and absolute forms are not forwarded).
fn origin_form(path_and_query: &str) -> Option<http::Uri> {
    if !path_and_query.starts_with('/') {
        return None;
    }
    http::Uri::try_from(path_and_query).ok()
}

/// The absolute URI of `path_and_query` at `host` (the `Host` the service
/// should see), for an HTTP/2 request.
fn h2_uri(host: Option<HeaderValue>, path_and_query: &str) -> Option<http::Uri> {
    if !path_and_query.starts_with('/') {
        return None;
    }
    let authority = http::uri::Authority::try_from(host?.as_bytes()).ok()?;
    http::Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .ok()
}

/// The answer to a request the pool could not deliver: status, code and
/// message. Refusals keep their meaning (404 unknown, 403 forbidden by the
/// agent); everything else is the gateway's failure.
fn gateway_refusal(
    e: &(dyn std::error::Error + 'static),
    agent: &str,
    service: &str,
) -> (StatusCode, String, String) {
    let (status, code, msg) = match refusal_of(e) {
        Some(r) => (
            http_status(r.code),
            r.code.as_str().to_owned(),
            r.reason.clone(),
        ),
        None => {
            // hyper's own text is a generic phrase ("connection error"); the
            // cause is further down: a reset with its code and reason, the
            // socket's error. A session lost on the way is the server's
            // trouble reaching the agent, not the service's answer: 503.
            let reset = stream_error_of(e).and_then(StreamError::reset_code);
            if reset == Some(ResetCode::SessionLost) {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResetCode::SessionLost.as_str().to_owned(),
                    format!(
                        "the session to agent {agent} was lost before {agent}/{service} answered: {}",
                        with_causes(e)
                    ),
                )
            } else {
                (
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway".to_owned(),
                    format!(
                        "{agent}/{service} did not answer with HTTP: {}",
                        with_causes(e)
                    ),
                )
            }
        }
    };
    let status = match status {
        StatusCode::NOT_FOUND | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => status,
        s if s.is_server_error() => s,
        _ => StatusCode::BAD_GATEWAY,
    };
    (status, code, msg)
}

/// The stream error somewhere in `e`'s causes, if any (inside an
/// `io::Error` or on its own).
fn stream_error_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a StreamError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(s) = err.downcast_ref::<StreamError>() {
            return Some(s);
        }
        if let Some(s) = err
            .downcast_ref::<std::io::Error>()
            .and_then(StreamError::from_io)
        {
            return Some(s);
        }
        cur = err.source();
    }
    None
}

/// Splices a WebSocket upgrade once both sides have switched,
/// under the request's guard: it ends when the access is revoked or the
/// credential expires. The audit line is written when it is over.
async fn splice_upgraded(
    metrics: Arc<Metrics>,
    ended: Pin<Box<dyn Future<Output = &'static str> + Send>>,
    _guard: Arc<OpenGuard>,
    audit: HttpAudit,
    who: String,
    service_side: OnUpgrade,
    client_side: OnUpgrade,
) {
    let _audit = audit;
    let target = &_audit.target;
    let (Ok(s), Ok(c)) = (service_side.await, client_side.await) else {
        tracing::debug!(%target, "upgrade did not complete");
        return;
    };
    metrics.live_streams.inc();
    let mut s = TokioIo::new(s);
    let mut c = TokioIo::new(c);
    let r = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut s) => r,
        why = ended => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)),
    };
    metrics.live_streams.dec();
    match r {
        Ok((up, down)) => {
            metrics.add_bytes(up, down);
            tracing::info!(client = %who, %target, bytes_up = up, bytes_down = down, "upgraded connection closed")
        }
        Err(e) => tracing::info!(client = %who, %target, "upgraded connection ended: {e}"),
    }
}

/// How a service takes HTTP, from its agent's catalog.
struct ServiceHttp {
    /// The `Host` it wants, when the agent rewrites it.
    host_header: Option<String>,
    /// It speaks HTTP/2 only.
    http2: bool,
}

/// Whether `agent` is connected and offers `service` over HTTP; `Ok` with
/// how it takes HTTP (from the agent's catalog), else the refusal's status,
/// code and message.
async fn check_service(
    web: &Web,
    agent: &str,
    service: &str,
) -> Result<ServiceHttp, (StatusCode, &'static str, String)> {
    let entry = match web.opener.find_agent(agent).await {
        Ok(e) => e,
        Err(Refusal { code, reason }) => return Err((http_status(code), code.as_str(), reason)),
    };
    let mut rx = entry.conn.peer_catalog();
    let catalog_kept = entry.version >= tether_proto::CATALOG_VERSION;
    if catalog_kept && rx.borrow().is_none() {
        // It announces its services right after connecting (this session
        // may be seconds old: the replica just started, or the agent just
        // reconnected): wait a moment for the list.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            rx.wait_for(Option::is_some),
        )
        .await;
    }
    // Looked up in place: the catalog may hold thousands of services (a
    // cluster's discovery), too many to copy for every request.
    let catalog = rx.borrow();
    let Some(c) = catalog.as_deref() else {
        if catalog_kept {
            // It announces its services right after connecting; until then
            // we cannot tell an HTTP service from a database.
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "agent_starting",
                format!("agent {agent} has not announced its services yet; retry in a moment"),
            ));
        }
        // A version 1 or 2 agent: no catalog, HTTP/1.1 to any allowed name.
        return Ok(ServiceHttp {
            host_header: None,
            http2: false,
        });
    };
    if let Some(e) = c.iter().find(|e| e.name == service) {
        return service_http(agent, service, e);
    }
    // Released first: the catalog's lock is never held while the
    // registry's is taken (a session's reader takes them the other way).
    drop(catalog);
    // Another member of the agent's pool may offer it (a pool in the middle
    // of a change): the open would go there (`OpenGuard::dial`).
    let other = web
        .registry
        .pick_listing(agent, service, Some(entry.generation))
        .map(|other| other.conn.peer_catalog());
    let other = other.as_ref().map(|rx| rx.borrow());
    match other
        .as_ref()
        .and_then(|c| c.as_deref()?.iter().find(|e| e.name == service))
    {
        Some(e) => service_http(agent, service, e),
        None => Err((
            StatusCode::NOT_FOUND,
            "unknown_service",
            format!("agent {agent} has no service named {service}"),
        )),
    }
}

/// How `agent`'s catalog entry `e` for `service` takes HTTP: refused when
/// it is not an HTTP service.
fn service_http(
    agent: &str,
    service: &str,
    e: &CatalogEntry,
) -> Result<ServiceHttp, (StatusCode, &'static str, String)> {
    if !e.kind.is_http() {
        return Err((
            StatusCode::BAD_REQUEST,
            "not_http",
            format!("{agent}/{service} is a {} service, not HTTP (mark it http in the agent's config to open it in a browser)", e.kind.as_str()),
        ));
    }
    Ok(ServiceHttp {
        host_header: (!e.host.is_empty()).then(|| e.host.clone()),
        http2: e.kind == ServiceKind::Http2,
    })
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
    /// Body bytes both ways (also shown live by the admin API).
    bytes: Arc<ByteCounts>,
    /// Why the answer was cut short, when the server cut it (a reload
    /// revoked the access, the credential expired, the login signed out).
    cut: Option<&'static str>,
}

impl Drop for HttpAudit {
    fn drop(&mut self) {
        tracing::info!(
            target: "audit",
            identity = %self.identity,
            target = %self.target,
            protocol = "http",
            decision = "allowed",
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes_up = self.bytes.up.load(Ordering::Relaxed),
            bytes_down = self.bytes.down.load(Ordering::Relaxed),
            ttfb_ms = self.ttfb_ms,
            duration_ms = self.started.elapsed().as_millis() as u64,
            cut = self.cut,
            "audit"
        );
    }
}

/// Which way a proxied body goes (the byte count it adds to).
#[derive(Clone, Copy)]
enum Way {
    /// The request's, to the service.
    Up,
    /// The response's, to the client.
    Down,
}

/// A proxied body, either way: holds the request's open guard (its stream
/// slot and revocation entry) until done (a request body may still be on
/// its way after the response, a service answering before reading it all),
/// and a response's audit line; counts its bytes; and ends with an error
/// when the guard's stream must end (a reload took the access away, or the
/// credential expired).
struct GuardedBody<B> {
    inner: B,
    ended: Pin<Box<dyn Future<Output = &'static str> + Send>>,
    _guard: Arc<OpenGuard>,
    bytes: Arc<ByteCounts>,
    way: Way,
    /// Written when the response body is done (dropped).
    audit: Option<HttpAudit>,
    /// Over (`ended` fired: it is not polled again).
    done: bool,
}

impl<B> GuardedBody<B> {
    /// The client's request body on its way to the service.
    fn upload(inner: B, guard: &Arc<OpenGuard>, bytes: &Arc<ByteCounts>) -> GuardedBody<B> {
        GuardedBody {
            inner,
            ended: guard.ended(),
            _guard: guard.clone(),
            bytes: bytes.clone(),
            way: Way::Up,
            audit: None,
            done: false,
        }
    }
}

impl<B> http_body::Body for GuardedBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
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
            if let Some(audit) = &mut this.audit {
                audit.cut = Some(why);
            }
            return Poll::Ready(Some(Err(why.into())));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                let count = match this.way {
                    Way::Up => &this.bytes.up,
                    Way::Down => &this.bytes.down,
                };
                count.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that says only a generic phrase and keeps its cause, as
    /// hyper's do.
    #[derive(Debug)]
    struct Generic(std::io::Error);

    impl std::fmt::Display for Generic {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection error")
        }
    }

    impl std::error::Error for Generic {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// A failed answer says why, from the causes hyper keeps below its own
    /// phrase; a session lost on the way is a 503, not the service's 502.
    #[test]
    fn a_gateway_error_names_its_cause() {
        let reset = |code| {
            Generic(
                StreamError::Reset {
                    code,
                    reason: "service closed the connection".into(),
                    remote: true,
                }
                .into(),
            )
        };
        let (status, _, msg) = gateway_refusal(&reset(ResetCode::IoError), "prod", "web");
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            msg,
            "prod/web did not answer with HTTP: connection error: stream reset: io_error: service closed the connection"
        );
        let (status, code, msg) = gateway_refusal(&reset(ResetCode::SessionLost), "prod", "web");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(code, "session_lost");
        assert!(
            msg.starts_with("the session to agent prod was lost"),
            "{msg}"
        );
    }
}
