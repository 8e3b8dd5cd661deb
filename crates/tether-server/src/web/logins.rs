//! Logged-in browsers: the session store (the server keeps only a SHA-256
//! of each session id), the login form's signed CSRF values, and the names
//! of tether's own cookies.

use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::token_hash;
use crate::identity::ClientIdentity;
use crate::streams::Revocation;

/// Name of the session cookie.
pub(crate) const SESSION_COOKIE: &str = "tether_session";
/// Name of the login form's CSRF cookie.
pub(crate) const CSRF_COOKIE: &str = "tether_csrf";
/// Name of the session cookie when it is `Secure` and host-only.
pub(crate) const HOST_SESSION_COOKIE: &str = "__Host-tether_session";
/// Name of the CSRF cookie when it is `Secure` (it is always host-only).
pub(crate) const HOST_CSRF_COOKIE: &str = "__Host-tether_csrf";
/// Every name tether's own cookies may have (the proxy keeps them all from
/// services, and services may set none of them).
pub(crate) const COOKIE_NAMES: [&str; 4] = [
    SESSION_COOKIE,
    CSRF_COOKIE,
    HOST_SESSION_COOKIE,
    HOST_CSRF_COOKIE,
];

/// How long a login form's CSRF value is accepted after it was issued.
pub(crate) const CSRF_TTL: Duration = Duration::from_secs(3600);

/// Most browser sessions kept at once; the oldest expire first beyond it.
pub(crate) const MAX_WEB_SESSIONS: usize = 100_000;
/// How many sessions a full table keeps after making room: an eighth of the
/// cap goes at once, the soonest to expire first.
const SESSIONS_KEPT_WHEN_FULL: usize = MAX_WEB_SESSIONS - MAX_WEB_SESSIONS / 8;
/// How often a login sweeps out expired sessions. A lookup never returns an
/// expired one, so the sweep only gives their memory back; once per interval
/// (or when the table is full) rather than per login, since it walks every
/// session under the lock each browser request's cookie check takes.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One logged-in browser.
#[derive(Debug, Clone)]
pub(crate) struct WebSession {
    /// Who logged in.
    pub(crate) identity: ClientIdentity,
    expires: Instant,
    /// The session's CSRF value (logout forms carry it).
    pub(crate) csrf: String,
    /// Notified when the session ends before its time (logout, a reload
    /// that removed its identity, a full table): what it opened ends too.
    pub(crate) signed_out: Arc<Revocation>,
}

impl WebSession {
    /// When the session expires.
    pub(crate) fn expires(&self) -> Instant {
        self.expires
    }
}

/// Logged-in browsers, by SHA-256 of their session id, and the key that
/// signs login forms' CSRF values.
pub(crate) struct WebSessions {
    table: Mutex<Table>,
    /// Per-process HMAC key: a restart invalidates open login forms, which
    /// then ask the user to sign in again.
    csrf_key: ring::hmac::Key,
}

impl Default for WebSessions {
    fn default() -> Self {
        let key: [u8; 32] = rand::random();
        WebSessions {
            table: Mutex::new(Table {
                map: HashMap::default(),
                next_sweep: Instant::now() + SWEEP_EVERY,
            }),
            csrf_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        }
    }
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
pub(crate) fn unix_now() -> u64 {
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
pub(crate) fn cookie_names(secure: bool, base_domain: bool) -> (&'static str, &'static str) {
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

/// The sessions by SHA-256 of their id, and when expired ones are next swept.
struct Table {
    map: HashMap<[u8; 32], WebSession>,
    next_sweep: Instant,
}

impl Table {
    /// Drops expired sessions when a sweep is due or the table is full, then,
    /// if it is still full, the soonest to expire down to
    /// [`SESSIONS_KEPT_WHEN_FULL`]: at most one walk per interval or per
    /// `MAX_WEB_SESSIONS / 8` logins.
    fn make_room(&mut self, now: Instant) {
        if now >= self.next_sweep || self.map.len() >= MAX_WEB_SESSIONS {
            self.map.retain(|_, s| s.expires > now || sign_out(s));
            self.next_sweep = now + SWEEP_EVERY;
        }
        if self.map.len() < MAX_WEB_SESSIONS {
            return;
        }
        let excess = self.map.len() - SESSIONS_KEPT_WHEN_FULL;
        let mut by_expiry: Vec<(Instant, [u8; 32])> =
            self.map.iter().map(|(k, s)| (s.expires, *k)).collect();
        by_expiry.select_nth_unstable(excess - 1);
        for (_, k) in &by_expiry[..excess] {
            if let Some(s) = self.map.remove(k) {
                sign_out(&s);
            }
        }
    }
}

impl WebSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `client`; returns its id (the cookie value).
    pub(crate) fn create(&self, client: &ClientIdentity, ttl: Duration) -> String {
        self.create_at(client, ttl, Instant::now())
    }

    fn create_at(&self, client: &ClientIdentity, ttl: Duration, now: Instant) -> String {
        let id = random_hex();
        let mut g = self.lock();
        g.make_room(now);
        g.map.insert(
            token_hash(&id),
            WebSession {
                identity: client.clone(),
                expires: now + ttl,
                csrf: random_hex(),
                signed_out: Arc::default(),
            },
        );
        id
    }

    pub(crate) fn get(&self, id: &str) -> Option<WebSession> {
        let key = token_hash(id);
        let mut g = self.lock();
        match g.map.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                g.map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session `id` (logout), and what it opened.
    pub(crate) fn remove(&self, id: &str) {
        let removed = self.lock().map.remove(&token_hash(id));
        if let Some(s) = removed {
            sign_out(&s);
        }
    }

    /// A fresh CSRF value for the login form: `TIME.NONCE.MAC`, the MAC an
    /// HMAC-SHA256 of `TIME.NONCE` under this process's key. The cookie and
    /// the form field carry the same value; an attacker who can plant a
    /// cookie still cannot make up a value the server accepts.
    pub(crate) fn issue_login_csrf(&self) -> String {
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
    pub(crate) fn login_csrf_age(&self, value: &str, now: u64) -> Option<u64> {
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
    pub(crate) fn retain(&self, mut keep: impl FnMut(&ClientIdentity) -> bool) {
        self.lock()
            .map
            .retain(|_, s| keep(&s.identity) || sign_out(s));
    }
}

/// Ends what session `s` opened (its WebSockets, long responses and console
/// event streams); false, so that `retain` drops it.
fn sign_out(s: &WebSession) -> bool {
    s.signed_out.revoke();
    false
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn who(name: &str) -> ClientIdentity {
        ClientIdentity::new(
            name.into(),
            vec![],
            crate::identity::IdentityKind::Token { hash: [0; 32] },
        )
    }

    #[test]
    fn expired_sessions_are_swept_once_per_interval_not_per_login() {
        let s = WebSessions::default();
        let t0 = Instant::now();
        let gone = s.create_at(&who("bob"), Duration::ZERO, t0);
        let live = s.create_at(&who("alice"), Duration::from_secs(3600), t0);
        // A login within the interval leaves the expired one in memory (a
        // lookup would refuse it all the same)...
        s.create_at(
            &who("carol"),
            Duration::from_secs(3600),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(s.lock().map.len(), 3);
        // ...and the first login after the interval sweeps it out.
        s.create_at(
            &who("dave"),
            Duration::from_secs(3600),
            t0 + SWEEP_EVERY + Duration::from_secs(1),
        );
        assert_eq!(s.lock().map.len(), 3);
        assert!(!s.lock().map.contains_key(&token_hash(&gone)));
        assert_eq!(s.get(&live).unwrap().identity.name, "alice");
    }

    #[test]
    fn a_full_session_table_frees_an_eighth_soonest_expiring_first() {
        let s = WebSessions::default();
        let t0 = Instant::now();
        let keeper = s.create_at(&who("keeper"), Duration::from_secs(7200), t0);
        let first = s.create_at(&who("first"), Duration::from_secs(60), t0);
        for i in 2..MAX_WEB_SESSIONS as u64 {
            s.create_at(&who("x"), Duration::from_secs(100 + i % 1000), t0);
        }
        assert_eq!(s.lock().map.len(), MAX_WEB_SESSIONS);
        s.create_at(&who("late"), Duration::from_secs(3600), t0);
        assert_eq!(s.lock().map.len(), SESSIONS_KEPT_WHEN_FULL + 1);
        assert!(
            !s.lock().map.contains_key(&token_hash(&first)),
            "the soonest to expire went first"
        );
        assert_eq!(s.get(&keeper).unwrap().identity.name, "keeper");
        // The room made lasts: the next logins up to the cap walk nothing.
        for _ in 1..MAX_WEB_SESSIONS - SESSIONS_KEPT_WHEN_FULL {
            s.create_at(&who("y"), Duration::from_secs(3600), t0);
        }
        assert_eq!(s.lock().map.len(), MAX_WEB_SESSIONS);
    }

    #[test]
    fn sessions_expire_and_are_stored_hashed() {
        let s = WebSessions::default();
        let id = s.create(&who("alice"), Duration::from_secs(60));
        assert_eq!(s.get(&id).unwrap().identity.name, "alice");
        assert!(!s.lock().map.contains_key(&[0u8; 32]));
        assert!(s.lock().map.keys().all(|k| *k == token_hash(&id)));
        let old = s.create(&who("bob"), Duration::ZERO);
        assert!(s.get(&old).is_none());
        s.retain(|id| id.name != "alice");
        assert!(s.get(&id).is_none());
    }
}
