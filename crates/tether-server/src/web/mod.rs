//! Browser access: the HTTP reverse proxy to agents' web services, the
//! login, and the web console.
//!
//! | request | what |
//! |---------|------|
//! | `Host: SERVICE.AGENT.BASE_DOMAIN` | proxied to `AGENT/SERVICE` (host routing) |
//! | `/a/AGENT/SERVICE/...` | proxied to `AGENT/SERVICE` with the prefix stripped (path routing) |
//! | `/login`, `/logout` | browser login (cookie) |
//! | `/` | the console |
//! | `/api/agents`, `/api/events` | the console's data: JSON and server-sent events |
//!
//! Every proxied request is authenticated (login cookie or `Authorization:
//! Bearer` client token) and checked against the client's allow-list, like a
//! CLI open.

pub mod console;
pub mod login;
pub mod pages;
pub mod proxy;

use bytes::Bytes;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use std::time::Duration;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the server sends (static or streamed).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// A response.
pub type Resp = Response<Body>;

/// Path prefix of path-routed services: `/a/AGENT/SERVICE/`.
pub const PATH_PREFIX: &str = "/a/";

/// Default lifetime of a browser login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Largest login form body accepted.
pub const MAX_FORM_BODY: usize = 8 * 1024;

/// Idle keep-alive tunnel streams kept per service.
pub const POOL_IDLE_PER_SERVICE: usize = 32;

/// How long an idle keep-alive tunnel stream stays in the pool.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Browser access settings (`[http]` in the server config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Base domain for host routing: `SERVICE.AGENT.BASE_DOMAIN` (needs a
    /// wildcard DNS record and certificate). Path routing works without it.
    #[serde(default)]
    pub base_domain: Option<String>,
    /// Lifetime of a browser login, in seconds (default 12 hours).
    #[serde(default = "default_ttl")]
    pub session_ttl_secs: u64,
    /// Mark cookies `Secure`. Default: when the server itself serves TLS;
    /// set `true` behind a TLS-terminating load balancer.
    #[serde(default)]
    pub secure_cookies: Option<bool>,
}

fn default_ttl() -> u64 {
    SESSION_TTL.as_secs()
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            base_domain: None,
            session_ttl_secs: default_ttl(),
            secure_cookies: None,
        }
    }
}

impl WebConfig {
    /// Checks the base domain.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(d) = &self.base_domain {
            let ok = !d.is_empty()
                && !d.starts_with('.')
                && !d.ends_with('.')
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                anyhow::bail!("[http] base_domain {d:?} is not a DNS name");
            }
        }
        Ok(())
    }

    /// The base domain, lowercase.
    pub fn base(&self) -> Option<String> {
        self.base_domain.as_ref().map(|d| d.to_ascii_lowercase())
    }
}

/// Boxes a complete body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Whether the client prefers HTML (a browser navigating) over JSON / text.
pub fn wants_html(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// The value of cookie `name` in the request's `Cookie` headers. When the
/// browser sends the name more than once (a page on a sibling host may have
/// planted a second one with a more specific path), there is no telling
/// which is ours: none is used.
pub fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The host the request was addressed to (`Host`, or the URI authority in
/// HTTP/2), lowercase, with its port if any.
pub fn request_host(req: &http::Request<hyper::body::Incoming>) -> Option<String> {
    let h = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))?;
    Some(h.to_ascii_lowercase())
}

/// Splits `host[:port]` (IPv6 in brackets) into host and the `:port` suffix.
pub fn split_port(host: &str) -> (&str, &str) {
    match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            (&host[..i], &host[i..])
        }
        _ => (host, ""),
    }
}

/// A redirect.
pub fn redirect(status: StatusCode, location: &str) -> Resp {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Headers for the server's own pages: no framing, no sniffing, scripts and
/// styles only from the server itself.
pub fn harden(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_split() {
        assert_eq!(split_port("a.b:8443"), ("a.b", ":8443"));
        assert_eq!(split_port("a.b"), ("a.b", ""));
        assert_eq!(split_port("[::1]:80"), ("[::1]", ":80"));
        assert_eq!(split_port("[::1]"), ("[::1]", ""));
    }

    #[test]
    fn cookies_parse() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; tether_session=xyz".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&h, "tether_session"), Some("xyz"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
        h.append(header::COOKIE, "tether_session=planted".parse().unwrap());
        assert_eq!(cookie(&h, "tether_session"), None, "ambiguous");
    }

    #[test]
    fn base_domain_checked() {
        let mut c = WebConfig {
            base_domain: Some("tether.example.com".into()),
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        c.base_domain = Some("*.example.com".into());
        assert!(c.validate().is_err());
    }
}
