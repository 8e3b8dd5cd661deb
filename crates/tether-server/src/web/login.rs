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

use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::pages::{error, escape, html_page};
use super::{cookie, redirect, split_port, Resp, WebConfig, MAX_FORM_BODY};
use crate::auth::{token_hash, ClientIdentity};
use crate::State;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "tether_session";
/// Name of the login form's CSRF cookie.
pub const CSRF_COOKIE: &str = "tether_csrf";
/// Name of the session cookie when it is `Secure` and host-only.
pub const HOST_SESSION_COOKIE: &str = "__Host-tether_session";
/// Name of the CSRF cookie when it is `Secure` (it is always host-only).
pub const HOST_CSRF_COOKIE: &str = "__Host-tether_csrf";
/// Every name tether's own cookies may have (the proxy keeps them all from
/// services, and services may set none of them).
pub const COOKIE_NAMES: [&str; 4] = [
    SESSION_COOKIE,
    CSRF_COOKIE,
    HOST_SESSION_COOKIE,
    HOST_CSRF_COOKIE,
];

/// How long a login form's CSRF value is accepted after it was issued.
pub const CSRF_TTL: Duration = Duration::from_secs(3600);

/// Most browser sessions kept at once; the oldest expire first beyond it.
pub const MAX_WEB_SESSIONS: usize = 100_000;

/// One logged-in browser.
#[derive(Debug, Clone)]
struct WebSession {
    identity: ClientIdentity,
    expires: Instant,
    csrf: String,
}

/// Logged-in browsers, by SHA-256 of their session id, and the key that
/// signs login forms' CSRF values.
pub struct WebSessions {
    map: Mutex<HashMap<[u8; 32], WebSession>>,
    /// Per-process HMAC key: a restart invalidates open login forms, which
    /// then ask the user to sign in again.
    csrf_key: ring::hmac::Key,
}

impl Default for WebSessions {
    fn default() -> Self {
        let key: [u8; 32] = rand::random();
        WebSessions {
            map: Mutex::default(),
            csrf_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        }
    }
}

/// How a request proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The login cookie; carries the session's CSRF value (for logout).
    Cookie {
        /// The session's CSRF value.
        csrf: String,
    },
    /// `Authorization: Bearer` with a client token.
    Bearer,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_hex() -> String {
    let b: [u8; 32] = rand::random();
    hex(&b)
}

/// Decodes lowercase or uppercase hex; `None` on anything else.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the login CSRF MAC covers: a fixed label (so the key signs nothing
/// else by accident), then `TIME.NONCE`.
fn csrf_input(body: &str) -> Vec<u8> {
    format!("tether login csrf\n{body}").into_bytes()
}

/// The names of the session and CSRF cookies. `__Host-` needs `Secure`,
/// `Path=/` and no `Domain`: the CSRF cookie never has a `Domain`, the
/// session cookie has none when there is no base domain.
fn cookie_names(secure: bool, base_domain: bool) -> (&'static str, &'static str) {
    let session = if secure && !base_domain {
        HOST_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    };
    let csrf = if secure {
        HOST_CSRF_COOKIE
    } else {
        CSRF_COOKIE
    };
    (session, csrf)
}

/// The session cookie's name on this server (the only one it accepts).
pub fn session_cookie_name(state: &State) -> &'static str {
    cookie_names(state.secure_cookies(), state.web.base().is_some()).0
}

/// The CSRF cookie's name on this server (the only one it accepts).
pub fn csrf_cookie_name(state: &State) -> &'static str {
    cookie_names(state.secure_cookies(), state.web.base().is_some()).1
}

impl WebSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], WebSession>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `client`; returns its id (the cookie value).
    fn create(&self, client: &ClientIdentity, ttl: Duration) -> String {
        let id = random_hex();
        let now = Instant::now();
        let mut g = self.lock();
        g.retain(|_, s| s.expires > now);
        if g.len() >= MAX_WEB_SESSIONS {
            if let Some(oldest) = g.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) {
                g.remove(&oldest);
            }
        }
        g.insert(
            token_hash(&id),
            WebSession {
                identity: client.clone(),
                expires: now + ttl,
                csrf: random_hex(),
            },
        );
        id
    }

    fn get(&self, id: &str) -> Option<WebSession> {
        let key = token_hash(id);
        let mut g = self.lock();
        match g.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                g.remove(&key);
                None
            }
            None => None,
        }
    }

    fn remove(&self, id: &str) {
        self.lock().remove(&token_hash(id));
    }

    /// A fresh CSRF value for the login form: `TIME.NONCE.MAC`, the MAC an
    /// HMAC-SHA256 of `TIME.NONCE` under this process's key. The cookie and
    /// the form field carry the same value; an attacker who can plant a
    /// cookie still cannot make up a value the server accepts.
    fn issue_login_csrf(&self) -> String {
        self.login_csrf_at(unix_now())
    }

    fn login_csrf_at(&self, issued: u64) -> String {
        let nonce: [u8; 16] = rand::random();
        let body = format!("{issued}.{}", hex(&nonce));
        let mac = ring::hmac::sign(&self.csrf_key, &csrf_input(&body));
        format!("{body}.{}", hex(mac.as_ref()))
    }

    /// How old (seconds) a login CSRF value is, if this process issued it
    /// and it has not expired. The MAC is checked in constant time.
    fn login_csrf_age(&self, value: &str, now: u64) -> Option<u64> {
        let (body, mac) = value.rsplit_once('.')?;
        let (issued, nonce) = body.split_once('.')?;
        if nonce.len() != 32 {
            return None;
        }
        ring::hmac::verify(&self.csrf_key, &csrf_input(body), &unhex(mac)?).ok()?;
        let age = now.checked_sub(issued.parse::<u64>().ok()?)?;
        (age < CSRF_TTL.as_secs()).then_some(age)
    }

    /// Keeps only the sessions whose identity passes `keep`.
    pub fn retain(&self, keep: impl Fn(&ClientIdentity) -> bool) {
        self.lock().retain(|_, s| keep(&s.identity));
    }

    /// Ends every session of a client (its token was removed).
    pub fn remove_client(&self, client: &str) {
        self.lock().retain(|_, s| s.identity.name != client);
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The client identity of a request: the session cookie or a bearer token.
pub fn identify(state: &State, h: &HeaderMap) -> Option<(ClientIdentity, Via)> {
    let auth = state.auth();
    if let Some(t) = bearer(h) {
        return auth.client(&t).ok().map(|c| (c, Via::Bearer));
    }
    let id = cookie(h, session_cookie_name(state))?;
    let s = state.web_sessions.get(id)?;
    // The token behind the login must still be configured (a reload may
    // have removed it), and a JWT must not have expired.
    if !auth.client_still_valid(&s.identity) {
        state.web_sessions.remove(id);
        return None;
    }
    Some((s.identity, Via::Cookie { csrf: s.csrf }))
}

/// The credential of an `Authorization: Bearer` header. The scheme is
/// matched in any letter case and may be followed by any run of spaces and
/// tabs (RFC 9110 5.6.3, 11.4): a bearer header the server failed to
/// recognise would not count as the credential, and would go on to the
/// service, token and all. A bearer header without a credential yields an
/// empty one, which is then refused rather than ignored.
pub fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.as_bytes().trim_ascii();
    let end = v
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(v.len());
    let (scheme, credential) = v.split_at(end);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| String::from_utf8_lossy(credential.trim_ascii()).into_owned())
}

/// Where the login page is for a request to `host` (`host` may be a
/// host-routed service name; the login lives on the base domain then).
pub fn login_url(cfg: &WebConfig, scheme: &str, host: &str, next: &str) -> String {
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
fn cookie_attrs(state: &State, max_age: u64, host: &str) -> String {
    let mut a = format!("; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax");
    if state.secure_cookies() {
        a.push_str("; Secure");
    }
    if let Some(base) = state.web.base() {
        let (h, _) = split_port(host);
        if h == base || h.ends_with(&format!(".{base}")) {
            a.push_str("; Domain=");
            a.push_str(&base);
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
pub fn login_page(state: &State, req: &Request<Incoming>) -> Resp {
    let next = query_param(req.uri().query(), "next")
        .filter(|n| safe_next(&state.web, n))
        .unwrap_or_else(|| "/".to_owned());
    let csrf = cookie(req.headers(), csrf_cookie_name(state))
        .filter(|c| {
            state
                .web_sessions
                .login_csrf_age(c, unix_now())
                .is_some_and(|age| age < CSRF_TTL.as_secs() / 2)
        })
        .map(str::to_owned)
        .unwrap_or_else(|| state.web_sessions.issue_login_csrf());
    let mut r = html_page(StatusCode::OK, "Sign in", &login_form(&next, &csrf, None));
    set_cookie(&mut r, csrf_cookie(state, &csrf));
    r
}

/// The `Set-Cookie` value of the login form's CSRF cookie.
fn csrf_cookie(state: &State, csrf: &str) -> String {
    let max_age = CSRF_TTL.as_secs();
    let name = csrf_cookie_name(state);
    if state.secure_cookies() {
        // `__Host-` requires `Path=/`.
        format!("{name}={csrf}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict; Secure")
    } else {
        format!("{name}={csrf}; Path=/login; Max-Age={max_age}; HttpOnly; SameSite=Strict")
    }
}

/// One query or form parameter.
pub fn query_param(q: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(q?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Whether a form POST comes from another origin. Browsers send `Origin`
/// with every POST, and it must be this server's own origin: the same
/// scheme, host and port as the browser addressed it (`host`), or as
/// `[http] public_name` names it. An `http://` page may not post to an
/// `https://` server of the same name, nor another port's page to ours.
fn cross_origin(state: &State, req_headers: &HeaderMap, host: &str) -> bool {
    let Some(origin) = req_headers.get(header::ORIGIN) else {
        return false; // non-browser clients send none; the CSRF value still applies
    };
    let ours: Vec<String> = std::iter::once(host.to_owned())
        .chain(state.web.public())
        .collect();
    !origin
        .to_str()
        .is_ok_and(|o| same_origin(o, state.public_scheme(), &ours))
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

async fn read_form(req: Request<Incoming>) -> Option<HashMap<String, String>> {
    let read = Limited::new(req.into_body(), MAX_FORM_BODY).collect();
    let body = tokio::time::timeout(crate::HEADER_READ_TIMEOUT, read)
        .await
        .ok()?
        .ok()?
        .to_bytes();
    Some(form_urlencoded::parse(&body).into_owned().collect())
}

/// `POST /login`: checks the CSRF value and the token, starts a session.
pub async fn login_submit(
    state: &State,
    req: Request<Incoming>,
    peer: SocketAddr,
    host: &str,
) -> Resp {
    let headers = req.headers().clone();
    let csrf_cookie_value = cookie(&headers, csrf_cookie_name(state)).map(str::to_owned);
    // Read the (small, bounded) form first: answering before the body is
    // read makes HTTP/2 clients see a reset stream instead of our answer.
    let Some(form) = read_form(req).await else {
        return error(
            &headers,
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad_form",
            "login form too large or unreadable",
        );
    };
    if cross_origin(state, &headers, host) {
        state.metrics.error("csrf");
        return error(
            &headers,
            StatusCode::FORBIDDEN,
            "csrf",
            "cross-site login refused",
        );
    }
    let next = form
        .get("next")
        .filter(|n| safe_next(&state.web, n))
        .cloned()
        .unwrap_or_else(|| "/".into());
    // Double submit, and the value must be one this process signed.
    let csrf_ok = match (&csrf_cookie_value, form.get("csrf")) {
        (Some(c), Some(f)) => {
            token_hash(c) == token_hash(f)
                && state.web_sessions.login_csrf_age(c, unix_now()).is_some()
        }
        _ => false,
    };
    if !csrf_ok {
        state.metrics.error("csrf");
        tracing::warn!(%peer, "login without a valid, matching CSRF value");
        let csrf = state.web_sessions.issue_login_csrf();
        let mut r = html_page(
            StatusCode::FORBIDDEN,
            "Sign in",
            &login_form(
                &next,
                &csrf,
                Some("Your login form expired; please sign in again."),
            ),
        );
        set_cookie(&mut r, csrf_cookie(state, &csrf));
        return r;
    }
    let token = form.get("token").map(String::as_str).unwrap_or("");
    let csrf = csrf_cookie_value.unwrap_or_default();
    if token.trim().is_empty() {
        // Nothing to check, so nothing charged to the address.
        return html_page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            &login_form(&next, &csrf, Some("Enter your client token.")),
        );
    }
    // Only now is this a real attempt: charge it to the client's address
    // (so token-less or forged posts cannot lock out a shared address).
    let source = super::client_ip(&state.web, peer.ip(), &headers);
    if let Err(hit) = state.limits.login(source) {
        state.metrics.limit_hit(hit.limit);
        tracing::warn!(%peer, %source, "login refused: {}", hit.reason);
        return error(
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            hit.limit,
            "too many login attempts from your address; wait a few seconds",
        );
    }
    let client = match state.auth().client(token) {
        Ok(c) => c,
        Err(why) => {
            state.metrics.error("bad_login");
            tracing::warn!(%peer, %source, "browser login refused: {why}");
            return html_page(
                StatusCode::UNAUTHORIZED,
                "Sign in",
                &login_form(&next, &csrf, Some("That token is not valid.")),
            );
        }
    };
    // A JWT login lasts no longer than the JWT.
    let mut ttl = Duration::from_secs(state.web.session_ttl_secs.max(60));
    if let Some(left) = client.expires_in() {
        ttl = ttl.min(left);
    }
    let id = state.web_sessions.create(&client, ttl);
    tracing::info!(client = %client.name, %peer, %source, "browser login");
    let mut r = redirect(StatusCode::SEE_OTHER, &next);
    set_cookie(
        &mut r,
        format!(
            "{}={id}{}",
            session_cookie_name(state),
            cookie_attrs(state, ttl.as_secs(), host)
        ),
    );
    r
}

/// `POST /logout`: ends the session (the form carries its CSRF value).
pub async fn logout(state: &State, req: Request<Incoming>, host: &str) -> Resp {
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
    if cross_origin(state, &headers, host) {
        state.metrics.error("csrf");
        return error(
            &headers,
            StatusCode::FORBIDDEN,
            "csrf",
            "cross-site logout refused",
        );
    }
    let id = cookie(&headers, session_cookie_name(state)).map(str::to_owned);
    let session = id.as_deref().and_then(|i| state.web_sessions.get(i));
    match (id, session) {
        (Some(id), Some(s))
            if form
                .get("csrf")
                .is_some_and(|f| token_hash(f) == token_hash(&s.csrf)) =>
        {
            state.web_sessions.remove(&id);
            tracing::info!(client = %s.identity.name, "browser logout");
        }
        (Some(_), Some(_)) => {
            state.metrics.error("csrf");
            return error(
                &headers,
                StatusCode::FORBIDDEN,
                "csrf",
                "logout without the session's CSRF value",
            );
        }
        _ => {}
    }
    let mut r = redirect(StatusCode::SEE_OTHER, "/login");
    set_cookie(
        &mut r,
        format!(
            "{}={}",
            session_cookie_name(state),
            cookie_attrs(state, 0, host)
        ),
    );
    r
}

/// The answer to a request that needs a login: a redirect to the login page
/// for a browser, 401 for an API client.
pub fn login_required(state: &State, req: &Request<Incoming>, host: &str) -> Resp {
    if super::wants_html(req.headers()) && req.method() == Method::GET {
        let scheme = state.public_scheme();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // The login page lives on the base domain: coming back to a service
        // host needs the full URL.
        let next = if service_host(&state.web, host) {
            format!("{scheme}://{host}{path}")
        } else {
            path.to_owned()
        };
        return redirect(
            StatusCode::FOUND,
            &login_url(&state.web, scheme, host, &next),
        );
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
    fn bearer_is_recognised_in_any_case_and_spacing() {
        let auth = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                header::HeaderValue::from_bytes(v).unwrap(),
            );
            bearer(&h)
        };
        for v in [
            &b"Bearer tok"[..],
            b"bearer tok",
            b"BEARER  tok",
            b"Bearer\ttok",
            b"Bearer \t tok ",
            b" bEaReR\t\ttok\t",
        ] {
            assert_eq!(auth(v).as_deref(), Some("tok"), "{v:?}");
        }
        // A bearer header without a usable credential is still a bearer
        // header (refused later), never passed over.
        assert_eq!(auth(b"Bearer").as_deref(), Some(""));
        assert_eq!(auth(b"Bearer   ").as_deref(), Some(""));
        assert!(auth(b"Bearer tok\xff").is_some());
        assert_eq!(auth(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(auth(b"Bearertok"), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn login_csrf_values_are_signed_and_expire() {
        let s = WebSessions::default();
        let now = unix_now();
        let v = s.issue_login_csrf();
        assert_eq!(s.login_csrf_age(&v, now), Some(0));
        // Anything the server did not sign fails, however well formed.
        assert_eq!(s.login_csrf_age(&random_hex(), now), None);
        assert_eq!(s.login_csrf_age("x", now), None);
        assert_eq!(s.login_csrf_age("", now), None);
        let (body, mac) = v.rsplit_once('.').unwrap();
        let mut forged = mac.to_owned();
        forged.replace_range(0..1, if mac.starts_with('0') { "1" } else { "0" });
        assert_eq!(s.login_csrf_age(&format!("{body}.{forged}"), now), None);
        let (_, rest) = body.split_once('.').unwrap();
        assert_eq!(
            s.login_csrf_age(&format!("{}.{rest}.{mac}", now + 10), now),
            None,
            "the time is signed too"
        );
        // Another process (another key) did not sign it.
        assert_eq!(WebSessions::default().login_csrf_age(&v, now), None);
        // Expired after CSRF_TTL; never valid from the future.
        let old = s.login_csrf_at(now - CSRF_TTL.as_secs());
        assert_eq!(s.login_csrf_age(&old, now), None);
        let young = s.login_csrf_at(now - 10);
        assert_eq!(s.login_csrf_age(&young, now), Some(10));
        let future = s.login_csrf_at(now + 100);
        assert_eq!(s.login_csrf_age(&future, now), None);
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

    #[test]
    fn host_prefixed_cookies_when_secure_and_host_only() {
        assert_eq!(
            cookie_names(true, false),
            (HOST_SESSION_COOKIE, HOST_CSRF_COOKIE)
        );
        // With a base domain the session cookie carries `Domain`, which
        // `__Host-` forbids; the CSRF cookie never does.
        assert_eq!(cookie_names(true, true), (SESSION_COOKIE, HOST_CSRF_COOKIE));
        assert_eq!(cookie_names(false, false), (SESSION_COOKIE, CSRF_COOKIE));
        assert_eq!(cookie_names(false, true), (SESSION_COOKIE, CSRF_COOKIE));
    }

    #[test]
    fn sessions_expire_and_are_stored_hashed() {
        let s = WebSessions::default();
        let who = |n: &str| ClientIdentity {
            name: n.into(),
            groups: vec![],
            kind: crate::auth::IdentityKind::Token { hash: [0; 32] },
        };
        let id = s.create(&who("alice"), Duration::from_secs(60));
        assert_eq!(s.get(&id).unwrap().identity.name, "alice");
        assert!(!s.lock().contains_key(&[0u8; 32]));
        assert!(s.lock().keys().all(|k| *k == token_hash(&id)));
        let old = s.create(&who("bob"), Duration::ZERO);
        assert!(s.get(&old).is_none());
        s.remove_client("alice");
        assert!(s.get(&id).is_none());
    }
}
