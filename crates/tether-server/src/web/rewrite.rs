//! What the proxy changes in the headers it passes on, both ways.
//!
//! Towards the service ([`set_forwarding`], [`strip_hop_by_hop`],
//! [`strip_tether_cookies`]): what the service learns about the request
//! comes from the server's own view, never from what the client wrote.
//! `Host` and `X-Forwarded-Host` name the server (its public name, base
//! domain or the routed service name), `X-Forwarded-For` holds the client
//! address the server saw (or that trusted proxies vouch for), and every
//! other forwarding header the client sent (`Forwarded`, `X-Real-IP`,
//! `X-Forwarded-Port`, `X-Original-URL`, ...) is removed, with hop-by-hop
//! headers and tether's own cookies.
//!
//! Back to the browser ([`rewrite_response`]): redirects and cookies point
//! back through the proxy, and the service can set none of tether's
//! cookies.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

use super::logins::COOKIE_NAMES;
use super::route::WebRoute;
use super::{split_port, WebConfig};

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1).
/// (`Trailer` is not one: it names the trailers to come, end to end, and
/// hyper's HTTP/1.1 side sends only the trailers it names.)
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
];

/// Request headers that say where a request came from or what it was,
/// besides the ones the proxy sets itself. Clients can write them, and
/// services or frameworks may believe them (client address, scheme, host,
/// original URL), so they never reach a service. Every `X-Forwarded-*`
/// header the proxy does not set goes too (see [`set_forwarding`]).
const CLIENT_FORWARDING: [&str; 23] = [
    "forwarded",
    "forwarded-for",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
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
pub(crate) struct Forwarding<'a> {
    /// The client and the trusted proxies it came through, ending with the
    /// TCP peer ([`super::client_chain`]): `X-Forwarded-For`.
    pub(crate) chain: &'a [IpAddr],
    /// `http` or `https` as browsers reach the server: `X-Forwarded-Proto`.
    pub(crate) scheme: &'static str,
    /// The authority the server vouches for ([`forwarded_host`]):
    /// `X-Forwarded-Host`.
    pub(crate) host: &'a str,
    /// `Host`: the service's own name from the agent's catalog, or `host`.
    pub(crate) host_header: &'a str,
    /// `/a/AGENT/SERVICE` under path routing: `X-Forwarded-Prefix`.
    pub(crate) prefix: Option<&'a str>,
}

/// Replaces every forwarding header the client sent with the server's own:
/// `Host` and `X-Forwarded-{For,Proto,Host,Prefix}` are set, every other
/// `X-Forwarded-*` and the headers in [`CLIENT_FORWARDING`] are removed,
/// spelt with `_` for `-` too (servers that read headers as CGI variables,
/// `HTTP_X_FORWARDED_FOR`, take `X_Forwarded_For` for the real one).
pub(crate) fn set_forwarding(h: &mut HeaderMap, f: &Forwarding<'_>) {
    remove_where(h, |n| {
        let forwarding = |n: &str| n.starts_with("x-forwarded") || CLIENT_FORWARDING.contains(&n);
        if n.contains('_') {
            forwarding(&n.replace('_', "-"))
        } else {
            forwarding(n)
        }
    });
    let set = |h: &mut HeaderMap, name: HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(name, v);
        }
    };
    let xff = match f.chain {
        // Most requests come straight from the browser: one address.
        [one] => ip_text(one),
        chain => chain.iter().map(ip_text).collect::<Vec<_>>().join(", "),
    };
    set(h, HeaderName::from_static("x-forwarded-for"), &xff);
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(f.scheme),
    );
    set(h, HeaderName::from_static("x-forwarded-host"), f.host);
    if let Some(p) = f.prefix {
        set(h, HeaderName::from_static("x-forwarded-prefix"), p);
    }
    set(h, header::HOST, f.host_header);
}

/// An address as `X-Forwarded-For` writes it; IPv4 without `fmt`, which
/// took about 1 000 instructions for the one address of every proxied
/// request.
fn ip_text(ip: &IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if octet >= 100 {
            s.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            s.push(char::from(b'0' + octet / 10 % 10));
        }
        s.push(char::from(b'0' + octet % 10));
    }
    s
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
pub(crate) fn forwarded_host(cfg: &WebConfig, route: &WebRoute, request_host: &str) -> String {
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

/// Whether a request or a `101` response switches to WebSocket: the one
/// upgrade the proxy carries (`Connection: upgrade` and a `websocket` token in
/// `Upgrade`, both case-insensitive).
///
/// `Upgrade` is hop-by-hop (RFC 9110 7.8), so any other protocol (`h2c`,
/// `TLS/1.0`) is dropped with it and the request goes on as HTTP/1.1: spliced
/// as raw bytes, a second protocol would carry requests and responses past the
/// proxy's per-request checks, audit and `Set-Cookie` filter.
pub(crate) fn websocket_upgrade(h: &HeaderMap) -> bool {
    let lists = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
        })
    };
    lists(header::CONNECTION, "upgrade") && lists(header::UPGRADE, "websocket")
}

/// Removes hop-by-hop headers, including those the `Connection` header
/// names, and `Upgrade` (put back by the caller for upgrades).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // The body was framed by its chunks, not by a `Content-Length` sent
    // beside them (RFC 9112 6.3): forwarded without the chunking, that
    // length would frame it, cut short or waiting for bytes that never
    // come. An intermediary must drop it.
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
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
    remove_where(h, |n| HOP_BY_HOP.contains(&n) || n == "upgrade");
}

/// Whether `h` names a transfer coding besides `chunked` (`gzip, chunked`):
/// hyper undoes only the chunks, so the body would still be coded, and the
/// `Transfer-Encoding` that says so goes with the hop.
pub fn other_transfer_coding(h: &HeaderMap) -> bool {
    h.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|c| {
            let c = c.trim_ascii();
            !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked")
        })
    })
}

/// Removes every header whose (lower-case) name `doomed` picks.
///
/// One pass over the few headers a request has, instead of a removal per
/// listed name: each `HeaderMap::remove` by `&str` parses and hashes the
/// name first, which made the 27 listed names a tenth of the proxy's CPU
/// per request (callgrind, `bench/README.md`).
fn remove_where(h: &mut HeaderMap, doomed: impl Fn(&str) -> bool) {
    let names: Vec<HeaderName> = h.keys().filter(|n| doomed(n.as_str())).cloned().collect();
    for n in names {
        h.remove(n);
    }
}

/// Whether a cookie name is one of tether's own (any letter case, so that
/// look-alikes go too).
fn is_tether_cookie(name: &[u8]) -> bool {
    COOKIE_NAMES
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// Removes tether's own cookies (under every name they may have) from the
/// `Cookie` headers: the service never sees the browser's login. By bytes,
/// so that a cookie with non-ASCII bytes in its value (browsers send UTF-8
/// as it came) is kept, and keeps the others. Several `Cookie` headers (as
/// HTTP/2 sends them) become one, as an HTTP/1.1 service expects.
pub(crate) fn strip_tether_cookies(h: &mut HeaderMap) {
    let pairs = || {
        h.get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .map(<[u8]>::trim_ascii)
    };
    let tethers = |kv: &[u8]| {
        let name = kv.split(|b| *b == b'=').next().unwrap_or(kv);
        is_tether_cookie(name.trim_ascii())
    };
    let headers = h.get_all(header::COOKIE).iter().count();
    if headers <= 1 && !pairs().any(tethers) {
        return;
    }
    let mut kept: Vec<u8> = Vec::new();
    for kv in pairs().filter(|kv| !kv.is_empty() && !tethers(kv)) {
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(kv);
    }
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(&kept) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Whether a service's `Set-Cookie` may reach the browser: never one for
/// tether's own cookies. Judged by raw bytes, so a header with non-ASCII
/// bytes cannot slip through as "no name", and by the name the browser
/// will send the cookie back under: a nameless cookie (`=tether_session=x`,
/// or no `=` at all) returns as its bare value, which reads as
/// `tether_session=x` (RFC 6265bis 5.6).
pub(crate) fn service_may_set(v: &HeaderValue) -> bool {
    let raw = v.as_bytes();
    let pair = raw.split(|b| *b == b';').next().unwrap_or(raw);
    let (name, value) = match pair.iter().position(|b| *b == b'=') {
        Some(i) => (&pair[..i], &pair[i + 1..]),
        None => (&b""[..], pair),
    };
    let sent_as = if name.trim_ascii().is_empty() {
        value.split(|b| *b == b'=').next().unwrap_or(value)
    } else {
        name
    };
    !is_tether_cookie(sent_as.trim_ascii())
}

/// Whether `path` is already under the routing prefix (the prefix itself,
/// or it and then `/`, `?` or `#`): a service told the prefix
/// (`X-Forwarded-Prefix`, or a configured root URL) puts it in its own
/// redirects and cookie paths, and a second one would lead nowhere.
fn under_prefix(path: &[u8], prefix: &str) -> bool {
    !prefix.is_empty()
        && path
            .strip_prefix(prefix.as_bytes())
            .is_some_and(|rest| matches!(rest.first(), None | Some(b'/' | b'?' | b'#')))
}

/// `Service-Worker-Allowed` kept under the routing prefix: it widens the
/// scope a service worker may claim beyond its script's folder, and a worker
/// scoped to `/` would see every request on tether's origin (the login
/// form's token among them) for as long as it stays installed. Browsers
/// compare scopes as plain string prefixes, so the value must end in the
/// prefix's `/` (`/a/prod/web` would allow `/a/prod/webby/`). A path the
/// service names from its own root is put under the prefix, as a redirect
/// is; anything else (a URL, a relative path, dot segments, escapes, more
/// than one value) is dropped, leaving the script's folder as the limit.
fn scope_service_worker(h: &mut HeaderMap, prefix: &str) {
    let name = HeaderName::from_static("service-worker-allowed");
    let mut values = h.get_all(&name).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        h.remove(&name);
        return;
    };
    let path = v.as_bytes();
    let plain = path.first() == Some(&b'/')
        && path.get(1) != Some(&b'/')
        && path
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(b))
        && !path
            .split(|b| *b == b'/')
            .any(|seg| seg == b"." || seg == b"..");
    if !plain {
        h.remove(&name);
        return;
    }
    let rest = path.strip_prefix(prefix.as_bytes());
    if rest.is_some_and(|r| r.first() == Some(&b'/')) {
        return;
    }
    let mut scoped = prefix.as_bytes().to_vec();
    match rest {
        Some([]) => scoped.push(b'/'),
        _ => scoped.extend_from_slice(path),
    }
    match HeaderValue::from_bytes(&scoped) {
        Ok(v) => {
            h.insert(name, v);
        }
        Err(_) => {
            h.remove(&name);
        }
    }
}

/// What a service may clear with `Clear-Site-Data` under host routing: the
/// types that stay within its own origin. `"cookies"` goes (it clears the
/// whole site's, tether's login among them), and so do types this list does
/// not know.
const CLEARS_OWN_ORIGIN: [&str; 6] = [
    "\"cache\"",
    "\"storage\"",
    "\"executionContexts\"",
    "\"clientHints\"",
    "\"prefetchCache\"",
    "\"prerenderCache\"",
];

/// What `"*"` stands for, less `"cookies"`.
const CLEARS_ALL_BUT_COOKIES: [&str; 3] = ["\"cache\"", "\"storage\"", "\"executionContexts\""];

/// `Clear-Site-Data` as a host-routed service may send it: without
/// `"cookies"` (see [`CLEARS_OWN_ORIGIN`]); gone when nothing is left.
fn clear_own_origin_only(h: &mut HeaderMap) {
    let name = HeaderName::from_static("clear-site-data");
    if !h.contains_key(&name) {
        return;
    }
    let mut kept: Vec<&str> = Vec::new();
    for v in h.get_all(&name) {
        for t in v.to_str().unwrap_or("").split(',').map(str::trim) {
            if t == "\"*\"" {
                kept.extend(CLEARS_ALL_BUT_COOKIES);
            } else if CLEARS_OWN_ORIGIN.contains(&t) {
                kept.push(t);
            }
        }
    }
    kept.sort_unstable();
    kept.dedup();
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(v) if !kept.is_empty() => {
            h.insert(name, v);
        }
        _ => {
            h.remove(name);
        }
    }
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
        return (!prefix.is_empty() && !under_prefix(loc.as_bytes(), prefix))
            .then(|| format!("{prefix}{loc}"));
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
                if under_prefix(path.as_bytes(), prefix) {
                    return Some(format!("{external_origin}{path}"));
                }
                return Some(format!("{external_origin}{prefix}{path}"));
            }
        }
    }
    None
}

/// Rewrites a `Set-Cookie` for path routing: `Path` moves under the prefix
/// and `Domain` goes (the cookie belongs to the server's host). Attribute
/// names are matched as a browser matches them (case and whitespace
/// around `=` ignored); bytes are kept as they came, non-ASCII included.
pub fn rewrite_set_cookie(value: &[u8], prefix: &str) -> Vec<u8> {
    let mut parts = value.split(|b| *b == b';');
    let mut out = parts.next().unwrap_or_default().trim_ascii().to_vec();
    let mut had_path = false;
    for attr in parts {
        let a = attr.trim_ascii();
        let (name, val) = match a.iter().position(|b| *b == b'=') {
            Some(i) => (a[..i].trim_ascii(), a[i + 1..].trim_ascii()),
            None => (a, &b""[..]),
        };
        if name.eq_ignore_ascii_case(b"domain") {
            continue;
        }
        out.extend_from_slice(b"; ");
        if name.eq_ignore_ascii_case(b"path") {
            had_path = true;
            let p = if val.starts_with(b"/") { val } else { b"/" };
            out.extend_from_slice(b"Path=");
            if !under_prefix(p, prefix) {
                out.extend_from_slice(prefix.as_bytes());
            }
            out.extend_from_slice(p);
        } else {
            out.extend_from_slice(a);
        }
    }
    if !had_path {
        out.extend_from_slice(b"; Path=");
        out.extend_from_slice(prefix.as_bytes());
        out.push(b'/');
    }
    out
}

/// Response headers that set a policy for the whole origin. Under path
/// routing the origin is tether's own (its console, its login page, every
/// other service), so a service sets none of them: a reporting policy
/// would report every later request on it, other services' URLs included,
/// and `Clear-Site-Data` would clear the console's storage and the site's
/// cookies (tether's login among them).
const ORIGIN_WIDE: [&str; 4] = ["nel", "report-to", "reporting-endpoints", "clear-site-data"];

/// Rewrites a service's response headers for the browser: `Location`
/// back through the proxy (`external_origin` is `scheme://host` as the
/// browser addressed the server; `service_hosts` the names an absolute
/// redirect may use for the service), no `Set-Cookie` for tether's own
/// cookies, and, under path routing (`prefix`), cookies and service workers
/// scoped to the prefix and none of the [`ORIGIN_WIDE`] headers; under host
/// routing, `Clear-Site-Data` without `"cookies"`.
pub(crate) fn rewrite_response(
    h: &mut HeaderMap,
    prefix: Option<&str>,
    external_origin: impl FnOnce() -> String,
    service_hosts: &[&str],
) {
    // One look over the names first: most answers carry none of these,
    // and the lookups by name cost about 1 800 instructions a request
    // (`bench/http-instructions.sh`).
    let policy = |n: &HeaderName| {
        let n = n.as_str();
        ORIGIN_WIDE.contains(&n) || n == "service-worker-allowed"
    };
    if h.keys().any(policy) {
        if let Some(prefix) = prefix {
            for name in ORIGIN_WIDE {
                h.remove(name);
            }
            scope_service_worker(h, prefix);
        } else {
            clear_own_origin_only(h);
        }
    }
    if let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
        if let Some(new) = rewrite_location(loc, prefix, &external_origin(), service_hosts) {
            if let Ok(v) = HeaderValue::from_str(&new) {
                h.insert(header::LOCATION, v);
            }
        }
    }
    // A service may not set (or clear) tether's own cookies, e.g. to sign
    // a browser in as someone else across the base domain.
    let theirs: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| service_may_set(v))
        .cloned()
        .collect();
    h.remove(header::SET_COOKIE);
    for v in theirs {
        h.append(header::SET_COOKIE, v);
    }
    if let Some(prefix) = prefix {
        let cookies: Vec<Vec<u8>> = h
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| rewrite_set_cookie(v.as_bytes(), prefix))
            .collect();
        h.remove(header::SET_COOKIE);
        for c in cookies {
            if let Ok(v) = HeaderValue::from_bytes(&c) {
                h.append(header::SET_COOKIE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::route::{route_by_host, route_by_path};

    #[test]
    fn addresses_read_as_std_writes_them() {
        for a in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.5",
            "127.0.0.1",
            "1.20.100.9",
            "203.0.113.199",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(ip_text(&ip), ip.to_string());
        }
    }

    #[test]
    fn only_a_websocket_upgrade_is_one() {
        let with = |connection: &str, upgrade: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, connection.parse().unwrap());
            h.insert(header::UPGRADE, upgrade.parse().unwrap());
            websocket_upgrade(&h)
        };
        assert!(with("Upgrade", "websocket"));
        assert!(with("keep-alive, UPGRADE", "WebSocket"));
        assert!(with("upgrade", "h2c, websocket"));
        assert!(!with("Upgrade, HTTP2-Settings", "h2c"));
        assert!(!with("upgrade", "TLS/1.0"));
        assert!(!with("keep-alive", "websocket"));
        assert!(!websocket_upgrade(&HeaderMap::new()));
    }

    #[test]
    fn a_service_sets_no_policy_for_tether_s_origin() {
        let answer = || {
            let mut h = HeaderMap::new();
            for (k, v) in [
                (
                    "nel",
                    r#"{"report_to":"x","max_age":86400,"success_fraction":1}"#,
                ),
                (
                    "report-to",
                    r#"{"group":"x","max_age":86400,"endpoints":[]}"#,
                ),
                ("reporting-endpoints", r#"x="https://evil.example/r""#),
                ("clear-site-data", r#""cookies""#),
                ("content-type", "text/html"),
            ] {
                h.insert(HeaderName::from_static(k), v.parse().unwrap());
            }
            h
        };
        let mut h = answer();
        rewrite_response(&mut h, Some("/a/prod/web"), || "http://t".into(), &[]);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
        // Under host routing the origin is the service's own; the site's
        // cookies are still tether's too.
        let mut h = answer();
        rewrite_response(&mut h, None, || "http://t".into(), &[]);
        assert!(h.contains_key("nel") && h.contains_key("report-to"));
        assert!(!h.contains_key("clear-site-data"));
        let clears = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("clear-site-data", v.parse().unwrap());
            rewrite_response(&mut h, None, || "http://t".into(), &[]);
            h.get("clear-site-data")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            clears(r#""cookies", "storage""#).as_deref(),
            Some(r#""storage""#)
        );
        assert_eq!(
            clears(r#""*""#).as_deref(),
            Some(r#""cache", "executionContexts", "storage""#)
        );
        assert_eq!(clears(r#""cookies""#), None);
        assert_eq!(
            clears(r#""newThing", "cache""#).as_deref(),
            Some(r#""cache""#)
        );
    }

    #[test]
    fn a_service_worker_stays_under_the_prefix() {
        let scope = |v: &str, prefix: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert("service-worker-allowed", v.parse().unwrap());
            rewrite_response(&mut h, prefix, || "http://t".into(), &[]);
            h.get("service-worker-allowed")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let p = Some("/a/prod/web");
        assert_eq!(scope("/", p).as_deref(), Some("/a/prod/web/"));
        assert_eq!(scope("/app/", p).as_deref(), Some("/a/prod/web/app/"));
        assert_eq!(scope("/a/prod/web/x", p).as_deref(), Some("/a/prod/web/x"));
        // Scopes are string prefixes: the bare prefix would allow /a/prod/webby/.
        assert_eq!(scope("/a/prod/web", p).as_deref(), Some("/a/prod/web/"));
        assert_eq!(
            scope("/a/prod/webby", p).as_deref(),
            Some("/a/prod/web/a/prod/webby")
        );
        for escape in [
            "/a/prod/web/../../",
            "/a/prod/web/%2e%2e/",
            "https://t/",
            "//t/",
            "../",
            "/a/prod/web/..",
            "/a\\b",
        ] {
            assert_eq!(scope(escape, p), None, "{escape}");
        }
        assert_eq!(scope("/", None).as_deref(), Some("/"), "host routing");
        let mut h = HeaderMap::new();
        h.append("service-worker-allowed", "/a/prod/web/x".parse().unwrap());
        h.append("service-worker-allowed", "/".parse().unwrap());
        rewrite_response(&mut h, p, || "http://t".into(), &[]);
        assert!(!h.contains_key("service-worker-allowed"), "two values");
    }

    #[test]
    fn forwarding_headers_go_in_cgi_spelling_too() {
        let mut h = HeaderMap::new();
        for k in [
            "x_forwarded_for",
            "x_forwarded_port",
            "x_real_ip",
            "client-ip",
            "client_ip",
            "x-originating-ip",
            "x_custom",
        ] {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                "1.2.3.4".parse().unwrap(),
            );
        }
        let chain = ["10.0.0.9".parse().unwrap()];
        set_forwarding(
            &mut h,
            &Forwarding {
                chain: &chain,
                scheme: "https",
                host: "t",
                host_header: "t",
                prefix: None,
            },
        );
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "host",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x_custom"
            ]
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.9");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        h.insert("trailer", "x-checksum".parse().unwrap());
        h.insert("content-length", "5".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
        assert!(h.contains_key("x-kept"));
        assert!(h.contains_key("content-length"));
        assert_eq!(h.get("trailer").unwrap(), "x-checksum");
        // A length beside chunks framed nothing: it goes with them.
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        assert!(!other_transfer_coding(&h));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("content-length") && !h.contains_key("transfer-encoding"));
        for (coding, other) in [
            ("gzip, chunked", true),
            ("Chunked", false),
            ("chunked, x", true),
        ] {
            h.insert("transfer-encoding", coding.parse().unwrap());
            assert_eq!(other_transfer_coding(&h), other, "{coding}");
        }
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
        // Nameless cookies go back as their value: `tether_session=x`.
        assert!(!service_may_set(&v(b"=tether_session=x; Path=/")));
        assert!(!service_may_set(&v(b" =tether_csrf=x")));
        assert!(!service_may_set(&v(b"tether_session; Path=/")));
        assert!(service_may_set(&v(b"=sid=x; Path=/")));
    }

    #[test]
    fn path_routing_keeps_a_cookie_with_non_ascii_bytes() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_bytes(b"p=\xc3\xa9").unwrap(),
        );
        rewrite_response(&mut h, Some("/a/p/g"), String::new, &[]);
        let all: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].as_bytes(), b"p=\xc3\xa9; Path=/a/p/g/");
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
        let cookie = |v: &str| String::from_utf8(rewrite_set_cookie(v.as_bytes(), "/a/p/g"));
        assert_eq!(
            cookie("sid=1; Path=/; Domain=grafana; HttpOnly").unwrap(),
            "sid=1; Path=/a/p/g/; HttpOnly"
        );
        assert_eq!(cookie("sid=1").unwrap(), "sid=1; Path=/a/p/g/");
        // Browsers trim around `=` and ignore case: so does the rewrite.
        assert_eq!(
            cookie("sid=1; Domain =x.test; DOMAIN\t=y; path = /app").unwrap(),
            "sid=1; Path=/a/p/g/app"
        );
        // A service that knows its prefix (X-Forwarded-Prefix, a root URL)
        // puts it in its redirects and cookie paths already: once is enough.
        for (loc, want) in [
            ("/a/p/g/login", None),
            ("/a/p/g", None),
            ("/a/p/g?next=1", None),
            ("/a/p/gx/login", Some("/a/p/g/a/p/gx/login")),
        ] {
            assert_eq!(
                rewrite_location(loc, Some("/a/p/g"), "https://tether.test", &hosts).as_deref(),
                want,
                "{loc}"
            );
        }
        assert_eq!(
            rewrite_location(
                "http://grafana:3000/a/p/g/x",
                Some("/a/p/g"),
                "https://tether.test",
                &hosts
            )
            .as_deref(),
            Some("https://tether.test/a/p/g/x")
        );
        assert_eq!(
            cookie("grafana_session=1; Path=/a/p/g").unwrap(),
            "grafana_session=1; Path=/a/p/g"
        );
        assert_eq!(
            cookie("sid=1; Path=/a/p/g/api").unwrap(),
            "sid=1; Path=/a/p/g/api"
        );
    }

    #[test]
    fn a_cookie_with_non_ascii_bytes_keeps_the_others_and_the_login() {
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_bytes(b"tether_session=s3cret; sid=1; lang=\xc3\xa9").unwrap(),
        );
        assert_eq!(
            crate::web::cookies(&h, "tether_session").collect::<Vec<_>>(),
            ["s3cret"],
            "the login is still found"
        );
        strip_tether_cookies(&mut h);
        assert_eq!(h.get("cookie").unwrap().as_bytes(), b"sid=1; lang=\xc3\xa9");
        // No tether cookie, one header: left as it came.
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1;b=2".parse().unwrap());
        strip_tether_cookies(&mut h);
        assert_eq!(h.get("cookie").unwrap(), "a=1;b=2");
    }
}
