//! Browser login: a form that takes a client token, and a session cookie.
//!
//! * The session cookie (`tether_session`) is `HttpOnly`, `SameSite=Lax`,
//!   `Secure` when served over TLS, and valid for the base domain when one is
//!   configured (so host-routed services are covered). The server keeps only
//!   a SHA-256 of the session id, and looks the identity up again on every
//!   request, so an allow-list change applies at once.
//! * When cookies are `Secure` and carry no `Domain` (no base domain), they
//!   are named `__Host-tether_session` / `__Host-tether_csrf`: browsers then
//!   refuse any cookie of that name set from another host, another path or
//!   plain HTTP, so a neighbour cannot plant one. The login form's CSRF
//!   cookie never has a `Domain`, so it is `__Host-` whenever it is `Secure`.
//! * Forms are CSRF-safe: the login form carries a value that must match a
//!   `SameSite=Strict` cookie (double submit) *and* carry this process's
//!   signature (an HMAC over its issue time and a nonce), so only values the
//!   server handed out in the last hour pass. Logout needs the session's own
//!   CSRF value (random, kept with the session). An `Origin` that is not
//!   this server's exact scheme, host and port is refused.
//! * Login attempts are limited per client address (see
//!   [`crate::limits::Limits::login`]); only real attempts are charged: a
//!   token was submitted, and the `Origin` and CSRF checks passed. Behind
//!   trusted proxies (`[http] trusted_proxies`) the address comes from
//!   `X-Forwarded-For` ([`super::client_ip`]).
//! * The proxy strips every tether cookie before a request reaches a service.

use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::logins::{cookie_names, unix_now, CSRF_TTL};
use super::pages::{error, escape, html_page};
use super::{cookie, split_port, Web, WebConfig, FORM_READ_TIMEOUT, MAX_FORM_BODY};
use crate::auth::{bearer, several_bearers, token_hash, CredentialError};
use crate::identity::ClientIdentity;
use crate::response::{page_policy, redirect, Resp};
use crate::streams::Revocation;
use tether_net::log_gate::LogGate;

/// How a request proved who it is.
#[derive(Debug, Clone)]
pub(crate) enum Via {
    /// The login cookie.
    Cookie {
        /// The session's CSRF value (for logout).
        csrf: String,
        /// Notified when the login ends before its time (logout).
        signed_out: Arc<Revocation>,
        /// When the login ends.
        expires: std::time::Instant,
    },
    /// `Authorization: Bearer` with a client token.
    Bearer,
}

impl Via {
    /// For a login cookie: its sign-out signal and when the login ends.
    pub(crate) fn login_end(&self) -> Option<(Arc<Revocation>, std::time::Instant)> {
        match self {
            Via::Cookie {
                signed_out,
                expires,
                ..
            } => Some((signed_out.clone(), *expires)),
            Via::Bearer => None,
        }
    }
}

/// The session cookie's name on this server (the only one it accepts).
fn session_cookie_name(web: &Web) -> &'static str {
    cookie_names(web.secure_cookies(), web.base().is_some()).0
}

/// The CSRF cookie's name on this server (the only one it accepts).
fn csrf_cookie_name(web: &Web) -> &'static str {
    cookie_names(web.secure_cookies(), web.base().is_some()).1
}

/// The client identity of a request: a bearer client token, else the
/// session cookie.
///
/// A bearer that is not one of ours beside a valid login is the service's
/// own (a single-page app calling its API with its token): the login
/// identifies the request and the header goes to the service untouched.
/// Not with several bearers: one of them could be a tether token, which
/// only a bearer identity strips.
pub(crate) fn identify(web: &Web, h: &HeaderMap) -> Option<(ClientIdentity, Via)> {
    let auth = web.auth.get();
    if let Some(t) = bearer(h) {
        return match auth.client(&t) {
            Ok(c) => Some((c, Via::Bearer)),
            Err(e) => identify_beside(web, h, &e),
        };
    }
    identify_by_login(web, h)
}

/// The identity of a request whose bearer credential `refused` was
/// refused: its login, when the bearer is not ours at all (the service's
/// own) and alone; else none. One of ours refused (an expired JWT) is never
/// passed on, and of several bearers another could be a tether token.
pub(crate) fn identify_beside(
    web: &Web,
    h: &HeaderMap,
    refused: &CredentialError,
) -> Option<(ClientIdentity, Via)> {
    if refused.is_foreign() && !several_bearers(h) {
        identify_by_login(web, h)
    } else {
        None
    }
}

/// The client identity of a request's session cookie.
fn identify_by_login(web: &Web, h: &HeaderMap) -> Option<(ClientIdentity, Via)> {
    let auth = web.auth.get();
    let id = cookie(h, session_cookie_name(web))?;
    let s = web.logins.get(id)?;
    // The token behind the login must still be configured (a reload may
    // have removed it), and a JWT must not have expired.
    if !auth.client_still_valid(&s.identity) {
        web.logins.remove(id);
        return None;
    }
    let expires = s.expires();
    Some((
        s.identity,
        Via::Cookie {
            csrf: s.csrf,
            signed_out: s.signed_out,
            expires,
        },
    ))
}

/// Whether `h` carries a bearer credential that [`identify`] refused; if so
/// it is counted (`bad_token`) and logged with why, at most once a second
/// (anyone can send one): `tether status` with an expired JWT, or a
/// console script with a stale token, would otherwise fail with no trace
/// on the server.
pub(crate) fn refused_bearer(web: &Web, h: &HeaderMap, peer: SocketAddr, path: &str) -> bool {
    let Some(token) = bearer(h) else {
        return false;
    };
    web.metrics.error("bad_token");
    static GATE: LogGate = LogGate::new();
    if let Some(skipped) = GATE.allow() {
        let why = web
            .auth
            .get()
            .client(&token)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        tracing::warn!(skipped, %peer, %path, "client credential refused: {why}");
    }
    true
}

/// The answer to a refused bearer credential: 401 `bad_token`, with the
/// `WWW-Authenticate` challenge RFC 6750 gives an invalid token.
pub(crate) fn bad_token(h: &HeaderMap) -> Resp {
    let mut r = error(
        h,
        StatusCode::UNAUTHORIZED,
        "bad_token",
        "invalid client token",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tether\", error=\"invalid_token\""),
    );
    r
}

/// Where the login page is for a request to `host` (`host` may be a
/// host-routed service name; the login lives on the base domain then).
pub(crate) fn login_url(cfg: &WebConfig, scheme: &str, host: &str, next: &str) -> String {
    let next_q: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
    match (service_host(cfg, host), cfg.base()) {
        (true, Some(base)) => {
            let port = split_port(host).1;
            format!("{scheme}://{base}{port}/login?next={next_q}")
        }
        _ => format!("/login?next={next_q}"),
    }
}

/// Whether `host` is a host-routed service (`SERVICE.AGENT.BASE`), not the
/// server's own name.
fn service_host(cfg: &WebConfig, host: &str) -> bool {
    let h = split_port(host).0;
    cfg.base()
        .is_some_and(|base| h != base && h.ends_with(&format!(".{base}")))
}

/// Whether `next` is a safe place to send the browser after login: a path
/// on this server, or a URL on the base domain (never another site).
pub fn safe_next(cfg: &WebConfig, next: &str) -> bool {
    // Browsers drop tabs and newlines from URLs and treat `\` as `/`, so
    // `/\t/evil.com` would become `//evil.com`: refuse all of them.
    if next
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'\\')
        || !next.is_ascii()
    {
        return false;
    }
    if next.starts_with('/') {
        return !next.starts_with("//") && !next.starts_with("/\\");
    }
    let Some(base) = cfg.base() else { return false };
    let Some(rest) = next
        .strip_prefix("https://")
        .or_else(|| next.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') || authority.contains('\\') {
        return false;
    }
    let (h, _) = split_port(authority);
    let h = h.to_ascii_lowercase();
    h == base || h.ends_with(&format!(".{base}"))
}

/// Attributes of the session cookie for a response to `host`: valid for
/// the whole base domain when the browser is on it (so host-routed services
/// are covered), host-only otherwise (e.g. reached by IP address).
fn cookie_attrs(web: &Web, max_age: u64, host: &str) -> String {
    let mut a = format!("; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax");
    if web.secure_cookies() {
        a.push_str("; Secure");
    }
    if let Some(base) = web.base() {
        let (h, _) = split_port(host);
        if h == base || h.ends_with(&format!(".{base}")) {
            a.push_str("; Domain=");
            a.push_str(base);
        }
    }
    a
}

fn set_cookie(r: &mut Resp, value: String) {
    if let Ok(v) = header::HeaderValue::from_str(&value) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn login_form(next: &str, csrf: &str, message: Option<&str>) -> String {
    let msg = message
        .map(|m| {
            format!(
                "<p class=\"error\" id=\"message\" role=\"alert\">{}</p>",
                escape(m)
            )
        })
        .unwrap_or_default();
    format!(
        "<main class=\"narrow\"><h1>tether</h1><p class=\"muted\">Sign in with your client token to reach \
         the services behind your agents.</p>{msg}\
         <form method=\"post\" action=\"/login\" class=\"card\">\
         <label for=\"token\">Client token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
         <input type=\"hidden\" name=\"next\" value=\"{}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button id=\"login\" type=\"submit\">Sign in</button></form></main>",
        escape(next),
        escape(csrf)
    )
}

/// `GET /login`: the form, and its CSRF cookie. A value this server issued
/// less than half its lifetime ago is kept, so that two open login tabs do
/// not invalidate each other; anything else is replaced.
pub(crate) fn login_page(web: &Web, req: &Request<Incoming>) -> Resp {
    let next = query_param(req.uri().query(), "next")
        .filter(|n| safe_next(&web.cfg, n))
        .unwrap_or_else(|| "/".to_owned());
    let csrf = cookie(req.headers(), csrf_cookie_name(web))
        .filter(|c| {
            web.logins
                .login_csrf_age(c, unix_now())
                .is_some_and(|age| age < CSRF_TTL.as_secs() / 2)
        })
        .map(str::to_owned)
        .unwrap_or_else(|| web.logins.issue_login_csrf());
    let mut r = sign_in_page(web, StatusCode::OK, &next, &csrf, None);
    set_cookie(&mut r, csrf_cookie(web, &csrf));
    r
}

/// The sign-in page (`message` above the form, if any). Its form may be
/// answered with a redirect to a host-routed service (`next`) on a
/// subdomain of the base domain, which the page's `form-action` must allow.
fn sign_in_page(
    web: &Web,
    status: StatusCode,
    next: &str,
    csrf: &str,
    message: Option<&str>,
) -> Resp {
    let mut r = html_page(status, "Sign in", &login_form(next, csrf, message));
    if let Some(base) = web.base() {
        r.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            page_policy(Some(&format!("*.{base}:*"))),
        );
    }
    r
}

/// The `Set-Cookie` value of the login form's CSRF cookie.
fn csrf_cookie(web: &Web, csrf: &str) -> String {
    let max_age = CSRF_TTL.as_secs();
    let name = csrf_cookie_name(web);
    if web.secure_cookies() {
        // `__Host-` requires `Path=/`.
        format!("{name}={csrf}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict; Secure")
    } else {
        format!("{name}={csrf}; Path=/login; Max-Age={max_age}; HttpOnly; SameSite=Strict")
    }
}

/// One query or form parameter.
fn query_param(q: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(q?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Whether a form POST comes from another origin. Browsers send `Origin`
/// with every POST, and it must be this server's own origin: the same
/// scheme, host and port as the browser addressed it (`host`), or as
/// `[http] public_name` names it. An `http://` page may not post to an
/// `https://` server of the same name, nor another port's page to ours.
fn cross_origin(web: &Web, req_headers: &HeaderMap, host: &str) -> bool {
    let Some(origin) = req_headers.get(header::ORIGIN) else {
        return false; // non-browser clients send none; the CSRF value still applies
    };
    let ours: Vec<String> = std::iter::once(host.to_owned())
        .chain(web.public.clone())
        .collect();
    !origin
        .to_str()
        .is_ok_and(|o| same_origin(o, web.public_scheme(), &ours))
}

/// Whether `origin` is `scheme://` one of `authorities`, comparing scheme,
/// host and port (default ports filled in) without regard to letter case.
fn same_origin(origin: &str, scheme: &str, authorities: &[String]) -> bool {
    let Some(theirs) = parse_origin(origin) else {
        return false; // `null`, a path, userinfo: not ours
    };
    authorities
        .iter()
        .filter_map(|a| parse_origin(&format!("{scheme}://{a}")))
        .any(|o| o == theirs)
}

/// `scheme://host[:port]` as scheme, host and port, lowercase, the port
/// filled in for `http` / `https`; `None` for anything else.
fn parse_origin(o: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = o.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if rest.contains(['/', '?', '#', '@', '\\']) {
        return None;
    }
    let (host, port) = split_port(rest);
    if host.is_empty() {
        return None;
    }
    let port = match port.strip_prefix(':') {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

/// Reads a form body of at most `MAX_FORM_BODY` bytes within
/// `FORM_READ_TIMEOUT`; a failure is the status and reason that say which
/// limit (or the connection) failed.
async fn read_form(
    req: Request<Incoming>,
) -> Result<HashMap<String, String>, (StatusCode, &'static str)> {
    let read = Limited::new(req.into_body(), MAX_FORM_BODY).collect();
    let body = match tokio::time::timeout(FORM_READ_TIMEOUT, read).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return Err((StatusCode::PAYLOAD_TOO_LARGE, "login form too large"))
        }
        Ok(Err(_)) => return Err((StatusCode::BAD_REQUEST, "login form unreadable")),
        Err(_) => {
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                "login form not received in time",
            ))
        }
    };
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

/// `POST /login`: checks the CSRF value and the token, starts a session.
pub(crate) async fn login_submit(
    web: &Web,
    req: Request<Incoming>,
    peer: SocketAddr,
    host: &str,
) -> Resp {
    let headers = req.headers().clone();
    let csrf_cookie_value = cookie(&headers, csrf_cookie_name(web)).map(str::to_owned);
    // Read the (small, bounded) form first: answering before the body is
    // read makes HTTP/2 clients see a reset stream instead of our answer.
    let form = match read_form(req).await {
        Ok(form) => form,
        Err((status, why)) => return error(&headers, status, "bad_form", why),
    };
    if cross_origin(web, &headers, host) {
        return csrf_refusal(web, &headers, "cross-site login refused");
    }
    let next = form
        .get("next")
        .filter(|n| safe_next(&web.cfg, n))
        .cloned()
        .unwrap_or_else(|| "/".into());
    // Double submit, and the value must be one this process signed.
    let csrf_ok = match (&csrf_cookie_value, form.get("csrf")) {
        (Some(c), Some(f)) => {
            token_hash(c) == token_hash(f) && web.logins.login_csrf_age(c, unix_now()).is_some()
        }
        _ => false,
    };
    if !csrf_ok {
        web.metrics.error("csrf");
        static GATE: LogGate = LogGate::new();
        if let Some(skipped) = GATE.allow() {
            tracing::warn!(skipped, %peer, "login without a valid, matching CSRF value");
        }
        let csrf = web.logins.issue_login_csrf();
        let mut r = sign_in_page(
            web,
            StatusCode::FORBIDDEN,
            &next,
            &csrf,
            Some("Your login form expired; please sign in again."),
        );
        set_cookie(&mut r, csrf_cookie(web, &csrf));
        return r;
    }
    // Trimmed as a `Bearer` header's and the CLI's are: a pasted token
    // often carries a space or a line end.
    let token = form.get("token").map_or("", |t| t.trim());
    let csrf = csrf_cookie_value.unwrap_or_default();
    if token.is_empty() {
        // Nothing to check, so nothing charged to the address.
        return sign_in_page(
            web,
            StatusCode::UNAUTHORIZED,
            &next,
            &csrf,
            Some("Enter your client token."),
        );
    }
    // Only now is this a real attempt: charge it to the client's address
    // (so token-less or forged posts cannot lock out a shared address).
    let source = super::client_ip(&web.cfg, peer.ip(), &headers);
    if let Err(hit) = web.limits.login(source) {
        web.metrics.limit_hit(hit.limit);
        static GATE: LogGate = LogGate::new();
        if let Some(skipped) = GATE.allow() {
            tracing::warn!(skipped, %peer, %source, "login refused: {}", hit.reason);
        }
        return error(
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            hit.limit.as_str(),
            "too many login attempts from your address; wait a few seconds",
        );
    }
    // A refused token: counted, logged with why (`who`: the identity, when
    // the token named one), and the form again with what to tell the user.
    let refused = |who: &str, why: &str, say: &str| {
        web.metrics.error("bad_login");
        tracing::warn!(%peer, %source, client = %who, "browser login refused: {why}");
        sign_in_page(web, StatusCode::UNAUTHORIZED, &next, &csrf, Some(say))
    };
    // Read before the check: a reload between the check and the login's
    // creation sweeps logins before this one exists (see below).
    let generation = web.auth.generation();
    let client = match web.auth.get().client(token) {
        Ok(c) => c,
        Err(why) => return refused("", &why.to_string(), "That token is not valid."),
    };
    // A JWT login lasts no longer than the JWT.
    let mut ttl = Duration::from_secs(web.cfg.session_ttl_secs.max(60));
    if let Some(left) = client.expires_in() {
        ttl = ttl.min(left);
    }
    // A JWT accepted within its leeway, or about to expire, would give a
    // login that ends at once (`Max-Age=0` deletes the cookie): say so.
    if ttl < Duration::from_secs(1) {
        return refused(
            &client.name,
            "the token has expired",
            "That token has expired.",
        );
    }
    let id = web.logins.create(&client, ttl);
    // A reload since the check may have revoked the credential, its sweep
    // of logins done before this one was made: checked again under it.
    if web.auth.generation() != generation && !web.auth.get().client_revalidate(&client) {
        web.logins.remove(&id);
        return refused(
            &client.name,
            "the credential was revoked as it signed in",
            "That token is not valid.",
        );
    }
    tracing::info!(client = %client.name, %peer, %source, "browser login");
    let mut r = redirect(StatusCode::SEE_OTHER, &next);
    set_cookie(
        &mut r,
        format!(
            "{}={id}{}",
            session_cookie_name(web),
            cookie_attrs(web, ttl.as_secs(), host)
        ),
    );
    r
}

/// 403 for a form that fails the CSRF checks (cross-site, or without the
/// session's CSRF value), counted as `csrf`.
fn csrf_refusal(web: &Web, headers: &HeaderMap, why: &str) -> Resp {
    web.metrics.error("csrf");
    error(headers, StatusCode::FORBIDDEN, "csrf", why)
}

/// `POST /logout`: ends the session (the form carries its CSRF value).
pub(crate) async fn logout(web: &Web, req: Request<Incoming>, host: &str) -> Resp {
    let headers = req.headers().clone();
    if req.method() != Method::POST {
        return error(
            &headers,
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            "log out with POST",
        );
    }
    let form = read_form(req).await.unwrap_or_default();
    if cross_origin(web, &headers, host) {
        return csrf_refusal(web, &headers, "cross-site logout refused");
    }
    // Every session cookie sent, not just a lone one: a sibling host may
    // have planted a second, and a logout that ended nothing while the
    // browser's cookie is deleted would leave the login usable by whoever
    // holds its value. The login whose CSRF value the form carries ends.
    let csrf = form.get("csrf").map(|f| token_hash(f));
    let mut live = false;
    let mut ended = false;
    for id in super::cookies(&headers, session_cookie_name(web)) {
        let Some(s) = web.logins.get(id) else {
            continue;
        };
        live = true;
        if csrf.as_ref() == Some(&token_hash(&s.csrf)) {
            web.logins.remove(id);
            tracing::info!(client = %s.identity.name, "browser logout");
            ended = true;
        }
    }
    if live && !ended {
        return csrf_refusal(web, &headers, "logout without the session's CSRF value");
    }
    let mut r = redirect(StatusCode::SEE_OTHER, "/login");
    set_cookie(
        &mut r,
        format!(
            "{}={}",
            session_cookie_name(web),
            cookie_attrs(web, 0, host)
        ),
    );
    r
}

/// The answer to a request that needs a login: a redirect to the login page
/// for a browser, 401 for an API client.
pub(crate) fn login_required(web: &Web, req: &Request<Incoming>, host: &str) -> Resp {
    if super::wants_html(req.headers()) && req.method() == Method::GET {
        let scheme = web.public_scheme();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // The login page lives on the base domain: coming back to a service
        // host needs the full URL.
        let next = if service_host(&web.cfg, host) {
            format!("{scheme}://{host}{path}")
        } else {
            path.to_owned()
        };
        return redirect(StatusCode::FOUND, &login_url(&web.cfg, scheme, host, &next));
    }
    let mut r = error(
        req.headers(),
        StatusCode::UNAUTHORIZED,
        "login_required",
        "sign in at /login, or send Authorization: Bearer with a client token",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"tether\""),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WebConfig {
        WebConfig {
            base_domain: Some("tether.test".into()),
            ..Default::default()
        }
    }

    #[test]
    fn next_must_stay_on_this_site() {
        let c = cfg();
        assert!(safe_next(&c, "/a/prod/web/"));
        assert!(!safe_next(&c, "//evil.com/"));
        assert!(!safe_next(&c, "/\\evil.com"));
        assert!(safe_next(&c, "https://web.prod.tether.test:8443/x"));
        assert!(safe_next(&c, "https://tether.test/"));
        assert!(!safe_next(&c, "https://tether.test.evil.com/"));
        assert!(!safe_next(&c, "https://eviltether.test/"));
        assert!(!safe_next(&c, "https://tether.test@evil.com/"));
        assert!(!safe_next(&c, "javascript:alert(1)"));
        assert!(!safe_next(&c, "/\t/evil.com"));
        assert!(!safe_next(&c, "/\n/evil.com"));
        assert!(!safe_next(&c, "/a\\b"));
        assert!(!safe_next(&WebConfig::default(), "https://tether.test/"));
    }

    #[test]
    fn login_lives_on_the_base_domain() {
        let c = cfg();
        assert_eq!(
            login_url(
                &c,
                "https",
                "web.prod.tether.test:8443",
                "https://web.prod.tether.test:8443/x"
            ),
            "https://tether.test:8443/login?next=https%3A%2F%2Fweb.prod.tether.test%3A8443%2Fx"
        );
        assert_eq!(
            login_url(&c, "https", "tether.test", "/a/b/c/"),
            "/login?next=%2Fa%2Fb%2Fc%2F"
        );
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let ours = [
            "tether.test:8443".to_owned(),
            "tether.example.com".to_owned(),
        ];
        assert!(same_origin("https://tether.test:8443", "https", &ours));
        assert!(same_origin("HTTPS://Tether.Test:8443", "https", &ours));
        assert!(same_origin("https://tether.example.com", "https", &ours));
        assert!(same_origin(
            "https://tether.example.com:443",
            "https",
            &ours
        ));
        assert!(
            !same_origin("http://tether.test:8443", "https", &ours),
            "scheme"
        );
        assert!(
            !same_origin("https://tether.test:9443", "https", &ours),
            "port"
        );
        assert!(
            !same_origin("https://tether.test", "https", &ours),
            "default port"
        );
        assert!(!same_origin(
            "https://tether.example.com:8443",
            "https",
            &ours
        ));
        assert!(!same_origin("https://evil.example", "https", &ours));
        assert!(!same_origin("null", "https", &ours));
        assert!(!same_origin("https://tether.test:8443/", "https", &ours));
        assert!(!same_origin("https://x@tether.test:8443", "https", &ours));
        assert!(same_origin(
            "http://127.0.0.1:7700",
            "http",
            &["127.0.0.1:7700".into()]
        ));
        assert!(same_origin("http://[::1]", "http", &["[::1]:80".into()]));
    }
}
