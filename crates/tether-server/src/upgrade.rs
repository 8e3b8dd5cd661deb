//! WebSocket upgrade mechanics shared by the three upgrade endpoints (agent
//! and client sessions, raw WebSockets): checking the request, the `101`
//! answer, the bearer credential and its refusals, the session limits, and
//! taking over the connection once hyper hands it over.

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tether_net::transport::ws::{accept_upgrade, names_unmasked, server_from_upgraded};
use tether_net::Connection;
use tether_proto::{Role, SUBPROTOCOL};

use crate::admission::ConnectionHold;
use crate::auth::{bearer, AuthStore};
use crate::identity::ClientIdentity;
use crate::limits::{Limit, LimitHit};
use crate::metrics::Metrics;
use crate::response::{empty, text, Resp};
use tether_net::log_gate::LogGate;

/// The connection taken over from hyper after a `101`.
pub(crate) type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// The 101 answer to a WebSocket upgrade (no subprotocol: the raw
/// endpoint), or an error response explaining what is wrong with it.
pub(crate) fn switching_protocols(req: &Request<Incoming>) -> Resp {
    websocket_answer(req, None)
}

/// [`switching_protocols`] for a tether session: the subprotocol is required.
pub(crate) fn tether_upgrade(req: &Request<Incoming>) -> Resp {
    websocket_answer(req, Some(SUBPROTOCOL))
}

/// The checks and the `101` headers come from the transport
/// ([`accept_upgrade`]); this turns them into a response.
fn websocket_answer(req: &Request<Incoming>, subprotocol: Option<&'static str>) -> Resp {
    match accept_upgrade(req.method(), req.headers(), subprotocol) {
        Ok(headers) => {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            *r.headers_mut() = headers;
            r
        }
        Err(e) => {
            let mut r = text(e.status(), e.to_string());
            for (name, value) in e.headers() {
                r.headers_mut().insert(name, value);
            }
            r
        }
    }
}

/// The connection's hold from a request, marked as carrying an
/// authenticated session (it leaves the anonymous share).
pub(crate) fn authenticated_hold(req: &Request<Incoming>) -> Option<ConnectionHold> {
    let hold = req.extensions().get::<ConnectionHold>().cloned();
    if let Some(h) = &hold {
        h.authenticated();
    }
    hold
}

/// The bearer token of a request: `Authorization: Bearer T`, or (when
/// `allow_query`) `?token=T` for WebSocket clients that cannot set headers.
fn bearer_token(req: &Request<Incoming>, allow_query: bool) -> Option<String> {
    if let Some(t) = bearer(req.headers()) {
        return Some(t);
    }
    if !allow_query {
        return None;
    }
    req.uri().query().and_then(query_token)
}

/// `token` of a URL query, percent-decoded as a URL carries it
/// (`encodeURIComponent`): a token with `/`, `=` or `%` would otherwise
/// never match. A `+` stays a `+` (a URL's query is not a form: only forms
/// write a space that way), so a token pasted into a URL as it is still
/// works.
fn query_token(query: &str) -> Option<String> {
    let query = query.replace('+', "%2B");
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// The request's bearer token, or the 401 answer for `who` (agent, client).
pub(crate) fn require_token(
    metrics: &Metrics,
    req: &Request<Incoming>,
    peer: SocketAddr,
    who: &str,
    allow_query: bool,
) -> Result<String, Box<Resp>> {
    bearer_token(req, allow_query).ok_or_else(|| {
        metrics.error("missing_token");
        static GATE: LogGate = LogGate::new();
        if let Some(skipped) = GATE.allow() {
            tracing::warn!(skipped, %peer, "{who} connection without a token");
        }
        Box::new(text(
            StatusCode::UNAUTHORIZED,
            format!("missing {who} token (Authorization: Bearer ...)"),
        ))
    })
}

/// The 401 answer to a token nobody has.
pub(crate) fn unknown_token(metrics: &Metrics, peer: SocketAddr, who: &str) -> Resp {
    metrics.error("bad_token");
    static GATE: LogGate = LogGate::new();
    if let Some(skipped) = GATE.allow() {
        tracing::warn!(skipped, %peer, "{who} connection with an unknown token");
    }
    text(StatusCode::UNAUTHORIZED, format!("invalid {who} token"))
}

/// The client a request's bearer credential names, or the 401 answer.
pub(crate) fn authenticate_client(
    auth: &AuthStore,
    metrics: &Metrics,
    req: &Request<Incoming>,
    peer: SocketAddr,
    allow_query: bool,
) -> Result<ClientIdentity, Box<Resp>> {
    let token = require_token(metrics, req, peer, "client", allow_query)?;
    auth.get().client(&token).map_err(|why| {
        metrics.error("bad_token");
        static GATE: LogGate = LogGate::new();
        if let Some(skipped) = GATE.allow() {
            tracing::warn!(skipped, %peer, "client credential refused: {why}");
        }
        // The reason is for the log only: callers learn nothing about
        // which check failed.
        Box::new(text(StatusCode::UNAUTHORIZED, "invalid client token"))
    })
}

/// Refuses an upgrade that hit a session limit.
pub(crate) fn limit_refusal(metrics: &Metrics, peer: SocketAddr, hit: LimitHit) -> Resp {
    metrics.limit_hit(hit.limit);
    tracing::warn!(%peer, limit = hit.limit.as_str(), "refused: {}", hit.reason);
    let status = if hit.limit == Limit::Sessions {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    text(status, hit.reason)
}

/// The upgraded connection, once hyper has sent the `101`.
pub(crate) async fn upgraded(req: Request<Incoming>) -> Option<Upgraded> {
    match hyper::upgrade::on(req).await {
        Ok(u) => Some(TokioIo::new(u)),
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            None
        }
    }
}

/// Completes the upgrade and the protocol handshake of an accepted session.
pub(crate) async fn accept_session(
    metrics: &Metrics,
    req: Request<Incoming>,
    cfg: tether_proto::Config,
    label: String,
    peer: SocketAddr,
) -> Option<(
    Connection,
    tether_net::SessionInfo,
    tether_net::session::IncomingStreams,
)> {
    // The 101 agreed to unmasked frames when the request offered them
    // (`tether_upgrade`).
    let unmasked = names_unmasked(req.headers());
    let io = upgraded(req).await?;
    let (sink, source) = server_from_upgraded(io, unmasked);
    match Connection::start(Role::Acceptor, cfg, sink, source, label.clone()).await {
        Ok(x) => Some(x),
        Err(e) => {
            metrics.error("handshake");
            tracing::warn!(session = %label, %peer, "handshake failed: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_token_is_percent_decoded_and_keeps_its_plus() {
        assert_eq!(query_token("token=a%2Fb%3D%3D").as_deref(), Some("a/b=="));
        assert_eq!(query_token("x=1&token=a+b").as_deref(), Some("a+b"));
        assert_eq!(
            query_token("token=plain&token=second").as_deref(),
            Some("plain")
        );
        assert_eq!(query_token("tokens=x"), None);
    }
}
