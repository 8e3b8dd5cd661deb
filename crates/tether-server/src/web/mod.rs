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
//! Bearer` client token) and admitted through the one open path like a CLI
//! open ([`crate::open`]).
//!
//! * [`route`]: which service a request is for (host or path routing);
//! * [`proxy`]: the proxy handler, one request from admission to the end of
//!   its response body; [`pool`]: the keep-alive pool of tunnel streams it
//!   sends requests over, [`h2_pool`] the HTTP/2 connections to services
//!   that speak only HTTP/2; [`rewrite`]: what the proxy changes in headers
//!   and cookies, both ways;
//! * [`login`] with [`logins`]: the login form and the browser sessions;
//! * [`console`]: the console; [`pages`]: the server's own pages.

pub(crate) mod admin;
pub(crate) mod console;
pub(crate) mod credential;
pub(crate) mod h2_pool;
pub mod login;
pub(crate) mod logins;
pub(crate) mod pages;
pub(crate) mod pool;
pub(crate) mod proxy;
pub mod rewrite;
pub mod route;

pub use crate::config::{split_port, WebConfig};

use http::{header, HeaderMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::AuthStore;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::open::Opener;
use crate::registry::Registry;

/// Path prefix of path-routed services: `/a/AGENT/SERVICE/`.
pub(crate) const PATH_PREFIX: &str = "/a/";

/// Largest login form body accepted.
pub(crate) const MAX_FORM_BODY: usize = 8 * 1024;

/// How long a login or logout form body may take to arrive (as long as
/// the HTTP front allows for request headers).
pub(crate) const FORM_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle keep-alive tunnel streams kept per service: as many as the
/// requests one busy service has in flight at once. A connection that
/// finds the list full is closed, and the next request opens a new tunnel
/// stream and the agent a new connection to the service: at 32, 64 browser
/// connections to one service made a fifth of their requests do that and
/// 256 connections halved the proxy's rate (`bench/ab-http.sh`, `CONNS`).
pub(crate) const POOL_IDLE_PER_SERVICE: usize = 256;

/// Idle keep-alive tunnel streams kept over all services, so that what the
/// pool holds stays within a small server's memory: each holds about 40 KiB
/// of the server's heap after small responses (hyper's request queue and
/// buffers), about 160 KiB after large ones (hyper keeps a read buffer of
/// up to 128 KiB), and a connection the agent keeps open to its service.
pub(crate) const POOL_IDLE_TOTAL: usize = 1024;

/// How long an idle keep-alive tunnel stream stays in the pool.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Browser access and the handles it uses.
pub(crate) struct Web {
    cfg: WebConfig,
    /// `[http] base_domain` and `public_name`, lowercase (once, not per
    /// request).
    base: Option<String>,
    public: Option<String>,
    /// Whether the server itself serves TLS.
    tls: bool,
    logins: Arc<logins::WebSessions>,
    pool: pool::Pool,
    h2: h2_pool::H2Pool,
    opener: Opener,
    auth: Arc<AuthStore>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
}

impl Web {
    /// Browser access with `cfg`, over these handles.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: WebConfig,
        tls: bool,
        logins: Arc<logins::WebSessions>,
        opener: Opener,
        auth: Arc<AuthStore>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        limits: Arc<Limits>,
    ) -> Web {
        Web {
            base: cfg.base(),
            public: cfg.public(),
            cfg,
            tls,
            logins,
            pool: pool::Pool::new(opener.clone()),
            h2: h2_pool::H2Pool::new(opener.clone()),
            opener,
            auth,
            registry,
            metrics,
            limits,
        }
    }

    /// Whether services are served at `/a/AGENT/SERVICE/` too (`[http]
    /// path_routing`).
    pub(crate) fn path_routing(&self) -> bool {
        self.cfg.path_routing
    }

    /// The base domain of host routing, lowercase.
    pub(crate) fn base(&self) -> Option<&str> {
        self.base.as_deref()
    }

    /// Whether cookies are marked `Secure`.
    fn secure_cookies(&self) -> bool {
        self.cfg.secure_cookies.unwrap_or(self.tls)
    }

    /// The scheme browsers use to reach this server.
    pub(crate) fn public_scheme(&self) -> &'static str {
        if self.tls || self.cfg.secure_cookies == Some(true) {
            "https"
        } else {
            "http"
        }
    }
}

/// The addresses in a request's `X-Forwarded-For` headers, left to right
/// (several headers count as one list). An entry that is not an address
/// (`unknown`, an obfuscated name, garbage) is `None`.
fn forwarded_for(h: &HeaderMap) -> Vec<Option<IpAddr>> {
    h.get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(text) => text
                .split(',')
                .map(|e| parse_forwarded_ip(e.trim()))
                .collect(),
            // A header that is not text is one unusable entry, not none: it
            // must stop the walk like any other garbage.
            Err(_) => vec![None],
        })
        .collect()
}

/// One `X-Forwarded-For` entry: an address, `[v6]`, or either with a port.
fn parse_forwarded_ip(e: &str) -> Option<IpAddr> {
    e.parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })
        .map(|ip| ip.to_canonical())
}

/// The client of a request and the proxies it came through, as far as the
/// server can vouch for them: `[client, proxy..., peer]`.
///
/// The TCP peer is the client unless it is a trusted proxy. Then
/// `X-Forwarded-For` is read from the right: each trusted address there is
/// another proxy, and the first untrusted one is the client (anything to its
/// left was written by the client and is ignored). An entry that is not an
/// address stops the walk, and the last proxy reached stands for the client.
pub(crate) fn client_chain(cfg: &WebConfig, peer: IpAddr, h: &HeaderMap) -> Vec<IpAddr> {
    let mut chain = vec![peer.to_canonical()];
    if !cfg.trusts(peer) {
        return chain;
    }
    for entry in forwarded_for(h).into_iter().rev() {
        let Some(ip) = entry else { break };
        chain.push(ip);
        if !cfg.trusts(ip) {
            break;
        }
    }
    chain.reverse();
    chain
}

/// The client's address: the first of [`client_chain`].
pub(crate) fn client_ip(cfg: &WebConfig, peer: IpAddr, h: &HeaderMap) -> IpAddr {
    client_chain(cfg, peer, h).first().copied().unwrap_or(peer)
}

/// Whether the client prefers HTML (a browser navigating) over JSON / text.
pub(crate) fn wants_html(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// The value of cookie `name` in the request's `Cookie` headers. When the
/// browser sends the name more than once (a page on a sibling host may have
/// planted a second one with a more specific path), there is no telling
/// which is ours: none is used.
pub fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = cookies(h, name);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Every value of cookie `name` in the request's `Cookie` headers (for a
/// logout, which must end the real login whatever else was planted).
pub(crate) fn cookies<'a, 'n>(
    h: &'a HeaderMap,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    // By bytes: a cookie of the service's with non-ASCII bytes in its value
    // (browsers send UTF-8 as it came) must not hide tether's login.
    h.get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|kv| {
            let kv = kv.trim_ascii();
            let i = kv.iter().position(|b| *b == b'=')?;
            (&kv[..i] == name.as_bytes())
                .then(|| std::str::from_utf8(&kv[i + 1..]).ok())
                .flatten()
        })
}

/// The host the request was addressed to (`Host`, or the URI authority in
/// HTTP/2), lowercase, with its port if any.
pub(crate) fn request_host(req: &http::Request<hyper::body::Incoming>) -> Option<String> {
    let h = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))?;
    Some(h.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_address() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let lb = ip("10.0.0.5");
        let none = WebConfig::default();
        let trusted = WebConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        let h = xff(&["198.51.100.1, 203.0.113.9"]);
        // Nobody trusted: the header is the client's word, and ignored.
        assert_eq!(client_chain(&none, lb, &h), [lb]);
        // An untrusted peer's header is ignored even when proxies are configured.
        assert_eq!(
            client_chain(&trusted, ip("192.0.2.1"), &h),
            [ip("192.0.2.1")]
        );
        // Behind a trusted proxy: the right-most entry it vouches for; what the
        // client wrote to its left is dropped.
        assert_eq!(client_chain(&trusted, lb, &h), [ip("203.0.113.9"), lb]);
        // Several trusted hops, over two header lines, with ports and v6.
        let h = xff(&["spoofed, 203.0.113.9", "10.1.1.1:4711, [10::1]"]);
        let mixed = WebConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "10::/16".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(
            client_chain(&mixed, lb, &h),
            [ip("203.0.113.9"), ip("10.1.1.1"), ip("10::1"), lb]
        );
        // Garbage between trusted hops stops the walk at the last proxy.
        let h = xff(&["203.0.113.9, unknown, 10.1.1.1"]);
        assert_eq!(client_chain(&trusted, lb, &h), [ip("10.1.1.1"), lb]);
        assert_eq!(client_ip(&trusted, lb, &h), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(client_ip(&trusted, lb, &HeaderMap::new()), lb);
        // IPv4-mapped peers (a dual-stack listener) match IPv4 networks.
        assert_eq!(
            client_ip(&trusted, ip("::ffff:10.0.0.5"), &xff(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
    }
}
