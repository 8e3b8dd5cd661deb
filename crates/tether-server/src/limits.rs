//! Limits that keep one identity from crowding out the others: sessions,
//! pending opens and the rate of opens, each per identity, plus a cap on all
//! sessions. Each refusal names the limit, counts in
//! `tether_limit_hits_total{limit=...}`, and touches nobody else's traffic.
//! (Streams per client are capped by `max_streams_per_client`; frame and
//! message sizes, handshake, idle and header-read timeouts live with the
//! protocol and the HTTP front.)

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Default cap on all live sessions (agents, clients, raw WebSockets).
pub const MAX_SESSIONS: usize = 10_000;
/// Default cap on one client identity's live sessions.
pub const MAX_SESSIONS_PER_CLIENT: usize = 64;
/// Default sustained opens (streams, HTTP requests) per second per identity.
pub const OPENS_PER_SEC: f64 = 1000.0;
/// Default burst of opens above the sustained rate.
pub const OPEN_BURST: f64 = 2000.0;
/// Default sustained HTTP proxy requests per second per identity (requests
/// reuse pooled streams, so they have their own, higher budget).
pub const REQUESTS_PER_SEC: f64 = 20_000.0;
/// Default burst of HTTP requests above the sustained rate.
pub const REQUEST_BURST: f64 = 40_000.0;
/// Login attempts per second from one source address.
pub const LOGINS_PER_SEC: f64 = 2.0;
/// Burst of login attempts from one source address.
pub const LOGIN_BURST: f64 = 20.0;
/// Default cap on one identity's opens waiting for the agent's answer.
pub const MAX_PENDING_OPENS_PER_CLIENT: usize = 512;
/// Default cap on open TCP connections to the public port.
pub const MAX_CONNECTIONS: usize = 20_000;
/// Rate buckets kept before idle full ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// `[limits]` in the server config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// All live sessions.
    #[serde(default = "d_max_sessions")]
    pub max_sessions: usize,
    /// Live sessions of one client identity.
    #[serde(default = "d_max_sessions_per_client")]
    pub max_sessions_per_client: usize,
    /// Sustained stream opens per second per identity (CLI streams, SOCKS
    /// and HTTP CONNECT streams, raw WebSockets).
    #[serde(default = "d_opens_per_sec")]
    pub opens_per_sec: f64,
    /// Burst above that rate.
    #[serde(default = "d_open_burst")]
    pub open_burst: f64,
    /// Sustained HTTP proxy requests per second per identity.
    #[serde(default = "d_requests_per_sec")]
    pub requests_per_sec: f64,
    /// Burst above that rate.
    #[serde(default = "d_request_burst")]
    pub request_burst: f64,
    /// Opens of one identity waiting for their agent's answer.
    #[serde(default = "d_max_pending")]
    pub max_pending_opens_per_client: usize,
    /// Open TCP connections to the public port (before any authentication).
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
}

fn d_max_connections() -> usize {
    MAX_CONNECTIONS
}

fn d_max_sessions() -> usize {
    MAX_SESSIONS
}
fn d_max_sessions_per_client() -> usize {
    MAX_SESSIONS_PER_CLIENT
}
fn d_opens_per_sec() -> f64 {
    OPENS_PER_SEC
}
fn d_open_burst() -> f64 {
    OPEN_BURST
}
fn d_requests_per_sec() -> f64 {
    REQUESTS_PER_SEC
}
fn d_request_burst() -> f64 {
    REQUEST_BURST
}
fn d_max_pending() -> usize {
    MAX_PENDING_OPENS_PER_CLIENT
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: MAX_SESSIONS,
            max_sessions_per_client: MAX_SESSIONS_PER_CLIENT,
            opens_per_sec: OPENS_PER_SEC,
            open_burst: OPEN_BURST,
            requests_per_sec: REQUESTS_PER_SEC,
            request_burst: REQUEST_BURST,
            max_pending_opens_per_client: MAX_PENDING_OPENS_PER_CLIENT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// A refused request: which limit, and the reason for the requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitHit {
    /// Stable name, the metric label (`opens_per_sec`, `sessions`, ...).
    pub limit: &'static str,
    /// Human-readable reason.
    pub reason: String,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_client: HashMap<String, usize>,
    pending: HashMap<String, usize>,
}

/// Live limit state.
pub struct Limits {
    cfg: Mutex<LimitsConfig>,
    buckets: Mutex<HashMap<String, Bucket>>,
    counts: Arc<Mutex<Counts>>,
}

/// Holds one session slot until dropped.
pub struct SessionSlot {
    counts: Arc<Mutex<Counts>>,
    client: Option<String>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(name) = &self.client {
            dec(&mut c.per_client, name);
        }
    }
}

/// Holds one pending-open slot until dropped.
pub struct PendingSlot {
    counts: Arc<Mutex<Counts>>,
    client: String,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        dec(&mut c.pending, &self.client);
    }
}

fn dec(m: &mut HashMap<String, usize>, k: &str) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl Limits {
    /// Limits with these settings.
    pub fn new(cfg: LimitsConfig) -> Limits {
        Limits {
            cfg: Mutex::new(cfg),
            buckets: Mutex::default(),
            counts: Arc::default(),
        }
    }

    /// Takes new settings (reload); live counts are kept.
    pub fn set_config(&self, cfg: LimitsConfig) {
        *self.cfg.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    /// The connection cap.
    pub fn max_connections(&self) -> usize {
        self.cfg
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .max_connections
    }

    fn cfg(&self) -> LimitsConfig {
        self.cfg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One stream open by `who`, if its rate allows.
    pub fn open(&self, who: &str) -> Result<(), LimitHit> {
        self.open_at(who, Instant::now())
    }

    /// One HTTP proxy request by `who`, if its rate allows.
    pub fn request(&self, who: &str) -> Result<(), LimitHit> {
        let cfg = self.cfg();
        self.take(
            &format!("http:{who}"),
            Instant::now(),
            cfg.requests_per_sec,
            cfg.request_burst,
            "requests_per_sec",
            "HTTP requests",
        )
    }

    /// One browser login attempt from `ip` (a slow brute force is still
    /// hopeless against 256-bit tokens; this keeps the log and the CPU quiet).
    pub fn login(&self, ip: std::net::IpAddr) -> Result<(), LimitHit> {
        self.take(
            &format!("login:{ip}"),
            Instant::now(),
            LOGINS_PER_SEC,
            LOGIN_BURST,
            "logins_per_source",
            "login attempts",
        )
    }

    fn open_at(&self, who: &str, now: Instant) -> Result<(), LimitHit> {
        let cfg = self.cfg();
        self.take(
            who,
            now,
            cfg.opens_per_sec,
            cfg.open_burst,
            "opens_per_sec",
            "streams",
        )
    }

    fn take(
        &self,
        who: &str,
        now: Instant,
        rate: f64,
        burst: f64,
        limit: &'static str,
        what: &str,
    ) -> Result<(), LimitHit> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_BUCKETS && !b.contains_key(who) {
            // Forget identities whose bucket has refilled: they lose nothing.
            b.retain(|_, v| v.tokens + now.duration_since(v.at).as_secs_f64() * rate < burst);
        }
        let e = b.entry(who.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
        e.tokens = (e.tokens + elapsed * rate).min(burst.max(1.0));
        e.at = now;
        if e.tokens < 1.0 {
            return Err(LimitHit {
                limit,
                reason: format!("{who}: more than {rate} {what} per second (burst {burst})"),
            });
        }
        e.tokens -= 1.0;
        Ok(())
    }

    /// A session slot (for `client`, or an agent / raw session when `None`).
    pub fn session(&self, client: Option<&str>) -> Result<SessionSlot, LimitHit> {
        let cfg = self.cfg();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= cfg.max_sessions {
            return Err(LimitHit {
                limit: "sessions",
                reason: format!("the server has {} sessions, its limit", cfg.max_sessions),
            });
        }
        if let Some(name) = client {
            let n = c.per_client.get(name).copied().unwrap_or(0);
            if n >= cfg.max_sessions_per_client {
                return Err(LimitHit {
                    limit: "sessions_per_client",
                    reason: format!(
                        "{name} already has {} sessions, its limit",
                        cfg.max_sessions_per_client
                    ),
                });
            }
            *c.per_client.entry(name.to_owned()).or_insert(0) += 1;
        }
        c.total += 1;
        Ok(SessionSlot {
            counts: self.counts.clone(),
            client: client.map(str::to_owned),
        })
    }

    /// A pending-open slot for `client`.
    pub fn pending(&self, client: &str) -> Result<PendingSlot, LimitHit> {
        let cfg = self.cfg();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.pending.entry(client.to_owned()).or_insert(0);
        if *n >= cfg.max_pending_opens_per_client {
            return Err(LimitHit {
                limit: "pending_opens",
                reason: format!(
                    "{client} already has {} opens waiting for their agent, its limit",
                    cfg.max_pending_opens_per_client
                ),
            });
        }
        *n += 1;
        Ok(PendingSlot {
            counts: self.counts.clone(),
            client: client.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_is_per_identity_and_refills() {
        let l = Limits::new(LimitsConfig {
            opens_per_sec: 10.0,
            open_burst: 5.0,
            ..Default::default()
        });
        let t0 = Instant::now();
        for _ in 0..5 {
            l.open_at("a", t0).unwrap();
        }
        assert_eq!(l.open_at("a", t0).unwrap_err().limit, "opens_per_sec");
        // Someone else is not affected.
        l.open_at("b", t0).unwrap();
        // 100 ms later one more token is there.
        l.open_at("a", t0 + Duration::from_millis(100)).unwrap();
        assert!(l.open_at("a", t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn login_attempts_are_limited_per_source() {
        let l = Limits::new(LimitsConfig::default());
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..LOGIN_BURST as usize {
            l.login(a).unwrap();
        }
        assert_eq!(l.login(a).unwrap_err().limit, "logins_per_source");
        assert!(l.login(b).is_ok());
    }

    #[test]
    fn session_and_pending_slots_are_returned() {
        let l = Limits::new(LimitsConfig {
            max_sessions: 3,
            max_sessions_per_client: 2,
            max_pending_opens_per_client: 1,
            ..Default::default()
        });
        let a1 = l.session(Some("a")).unwrap();
        let _a2 = l.session(Some("a")).unwrap();
        assert_eq!(
            l.session(Some("a")).err().unwrap().limit,
            "sessions_per_client"
        );
        let _agent = l.session(None).unwrap();
        assert_eq!(l.session(Some("b")).err().unwrap().limit, "sessions");
        drop(a1);
        let _b = l.session(Some("b")).unwrap();
        let p = l.pending("a").unwrap();
        assert_eq!(l.pending("a").err().unwrap().limit, "pending_opens");
        assert!(l.pending("b").is_ok());
        drop(p);
        assert!(l.pending("a").is_ok());
    }
}
