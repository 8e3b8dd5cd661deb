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
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;
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
    /// Networks of load balancers whose `X-Forwarded-For` the server
    /// believes (CIDRs). Default: none, and the TCP peer is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// The name (`host[:port]`) browsers use to reach the server itself.
    /// Path-routed services get it as `Host` / `X-Forwarded-Host` instead of
    /// whatever the client sent, and its port goes with host-routed names.
    /// Default: the base domain, with the port the browser used.
    #[serde(default)]
    pub public_name: Option<String>,
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
            trusted_proxies: vec![],
            public_name: None,
        }
    }
}

/// Whether `d` is a DNS name: dot-separated labels of letters, digits and `-`.
fn is_dns_name(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Whether `a` is `host[:port]` with a DNS name, an IPv4 address or a
/// bracketed IPv6 address, and a port from 1 to 65535.
fn is_authority(a: &str) -> bool {
    let (host, port) = split_port(a);
    let port_ok = port.is_empty() || port[1..].parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || is_dns_name(host),
    };
    port_ok && host_ok
}

impl WebConfig {
    /// Checks the base domain and the public name.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(d) = &self.base_domain {
            if !is_dns_name(d) {
                anyhow::bail!("[http] base_domain {d:?} is not a DNS name");
            }
        }
        if let Some(n) = &self.public_name {
            if !is_authority(n) {
                anyhow::bail!(
                    "[http] public_name {n:?}: expected HOST or HOST:PORT (a DNS name or an IP address)"
                );
            }
        }
        Ok(())
    }

    /// The base domain, lowercase.
    pub fn base(&self) -> Option<String> {
        self.base_domain.as_ref().map(|d| d.to_ascii_lowercase())
    }

    /// The public name, lowercase.
    pub fn public(&self) -> Option<String> {
        self.public_name.as_ref().map(|d| d.to_ascii_lowercase())
    }

    /// Whether the server believes `X-Forwarded-For` from `ip`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
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
pub fn client_chain(cfg: &WebConfig, peer: IpAddr, h: &HeaderMap) -> Vec<IpAddr> {
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
pub fn client_ip(cfg: &WebConfig, peer: IpAddr, h: &HeaderMap) -> IpAddr {
    client_chain(cfg, peer, h).first().copied().unwrap_or(peer)
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

/// Headers for the server's own data (JSON, event streams, error bodies):
/// never sniffed into something a browser would run, never cached.
pub fn api_headers(h: &mut HeaderMap) {
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
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

    #[test]
    fn public_name_checked() {
        let ok = |n: &str| {
            WebConfig {
                public_name: Some(n.into()),
                ..Default::default()
            }
            .validate()
            .is_ok()
        };
        for good in [
            "tether.example.com",
            "tether.example.com:8443",
            "192.0.2.1:80",
            "[2001:db8::1]:443",
            "[::1]",
        ] {
            assert!(ok(good), "{good}");
        }
        for bad in [
            "",
            "https://t.example",
            "t.example/x",
            "t.example:0",
            "t.example:99999",
            "a@b",
            "[::1",
            "t example",
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }

    #[test]
    fn trusted_proxies_parse_from_toml() {
        #[derive(Deserialize)]
        struct T {
            http: WebConfig,
        }
        let t: T =
            toml::from_str("[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"fd00::/8\"]\n").unwrap();
        assert!(t.http.trusts("10.1.2.3".parse().unwrap()));
        assert!(
            t.http.trusts("::ffff:10.1.2.3".parse().unwrap()),
            "IPv4-mapped"
        );
        assert!(t.http.trusts("fd00::1".parse().unwrap()));
        assert!(!t.http.trusts("192.0.2.1".parse().unwrap()));
        assert!(toml::from_str::<T>("[http]\ntrusted_proxies = [\"not-a-net\"]\n").is_err());
        assert!(
            WebConfig::default().trusted_proxies.is_empty(),
            "trust nobody by default"
        );
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
