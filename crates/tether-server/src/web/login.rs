//! Browser login: a form that takes a client token, and a session cookie.
//!
//! * The session cookie (`tether_session`) is `HttpOnly`, `SameSite=Lax`,
//!   `Secure` when served over TLS, and valid for the base domain when one is
//!   configured (so host-routed services are covered). The server keeps only
//!   a SHA-256 of the session id, and looks the identity up again on every
//!   request, so an allow-list change applies at once.
//! * Forms are CSRF-safe: the login form carries a random value that must
//!   match a `SameSite=Strict` cookie (double submit), logout needs the
//!   session's own CSRF value, and a cross-site `Origin` is refused.
//! * The proxy strips both cookies before a request reaches a service.

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

/// Most browser sessions kept at once; the oldest expire first beyond it.
pub const MAX_WEB_SESSIONS: usize = 100_000;

/// One logged-in browser.
#[derive(Debug, Clone)]
struct WebSession {
    identity: ClientIdentity,
    expires: Instant,
    csrf: String,
}

/// Logged-in browsers, by SHA-256 of their session id.
#[derive(Default)]
pub struct WebSessions {
    map: Mutex<HashMap<[u8; 32], WebSession>>,
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

fn random_hex() -> String {
    let b: [u8; 32] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
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
    let id = cookie(h, SESSION_COOKIE)?;
    let s = state.web_sessions.get(id)?;
    // The token behind the login must still be configured (a reload may
    // have removed it), and a JWT must not have expired.
    if !auth.client_still_valid(&s.identity) {
        state.web_sessions.remove(id);
        return None;
    }
    Some((s.identity, Via::Cookie { csrf: s.csrf }))
}

/// The bearer token of an `Authorization` header.
pub fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, t) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| t.trim().to_owned())
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

/// `GET /login`: the form, with a fresh CSRF cookie when there is none.
pub fn login_page(state: &State, req: &Request<Incoming>) -> Resp {
    let next = query_param(req.uri().query(), "next")
        .filter(|n| safe_next(&state.web, n))
        .unwrap_or_else(|| "/".to_owned());
    let csrf = cookie(req.headers(), CSRF_COOKIE)
        .filter(|c| c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .unwrap_or_else(random_hex);
    let mut r = html_page(StatusCode::OK, "Sign in", &login_form(&next, &csrf, None));
    set_cookie(&mut r, csrf_cookie(state, &csrf));
    r
}

fn csrf_cookie(state: &State, csrf: &str) -> String {
    let mut c =
        format!("{CSRF_COOKIE}={csrf}; Path=/login; Max-Age=3600; HttpOnly; SameSite=Strict");
    if state.secure_cookies() {
        c.push_str("; Secure");
    }
    c
}

/// One query or form parameter.
pub fn query_param(q: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(q?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Refuses a form POST whose `Origin` names another site.
fn cross_origin(req_headers: &HeaderMap, host: &str) -> bool {
    let Some(origin) = req_headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return false; // non-browser clients send none; the CSRF value still applies
    };
    let o = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    !o.eq_ignore_ascii_case(host)
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
    let csrf_cookie_value = cookie(&headers, CSRF_COOKIE).map(str::to_owned);
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
    if cross_origin(&headers, host) {
        state.metrics.error("csrf");
        return error(
            &headers,
            StatusCode::FORBIDDEN,
            "csrf",
            "cross-site login refused",
        );
    }
    if let Err(hit) = state.limits.login(peer.ip()) {
        state.metrics.limit_hit(hit.limit);
        tracing::warn!(%peer, "login refused: {}", hit.reason);
        return error(
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            hit.limit,
            "too many login attempts from your address; wait a few seconds",
        );
    }
    let next = form
        .get("next")
        .filter(|n| safe_next(&state.web, n))
        .cloned()
        .unwrap_or_else(|| "/".into());
    let csrf_ok = matches!((&csrf_cookie_value, form.get("csrf")), (Some(c), Some(f)) if token_hash(c) == token_hash(f));
    if !csrf_ok {
        state.metrics.error("csrf");
        tracing::warn!(%peer, "login without a matching CSRF value");
        let csrf = random_hex();
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
    let client = match state.auth().client(token) {
        Ok(c) => c,
        Err(why) => {
            state.metrics.error("bad_login");
            tracing::warn!(%peer, "browser login refused: {why}");
            let csrf = csrf_cookie_value.unwrap_or_default();
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
    tracing::info!(client = %client.name, %peer, "browser login");
    let mut r = redirect(StatusCode::SEE_OTHER, &next);
    set_cookie(
        &mut r,
        format!(
            "{SESSION_COOKIE}={id}{}",
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
    if cross_origin(&headers, host) {
        state.metrics.error("csrf");
        return error(
            &headers,
            StatusCode::FORBIDDEN,
            "csrf",
            "cross-site logout refused",
        );
    }
    let id = cookie(&headers, SESSION_COOKIE).map(str::to_owned);
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
        format!("{SESSION_COOKIE}={}", cookie_attrs(state, 0, host)),
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
