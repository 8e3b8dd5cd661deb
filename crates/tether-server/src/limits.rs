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
/// Default cap on one source address's connections to the public port
/// (IPv6: per /64). A browser opens a handful; a NAT'd office a few hundred.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 512;
/// Most rate buckets kept per kind (stream opens, HTTP requests, logins).
/// At the cap, buckets that have refilled are dropped first (they lose
/// nothing); if none has, the fullest goes, so the map never grows past it
/// and a throttled key (an empty bucket) is the last to be forgotten.
pub const MAX_BUCKETS: usize = 10_000;
/// Login attempts from IPv6 are counted per /64: one host usually holds a
/// whole /64, and counting per address would give it 2^64 budgets.
const LOGIN_V6_PREFIX: u8 = 64;

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
    /// Open TCP connections to the public port from one source address.
    #[serde(default = "d_max_connections_per_source")]
    pub max_connections_per_source: usize,
}

fn d_max_connections_per_source() -> usize {
    MAX_CONNECTIONS_PER_SOURCE
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
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
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

impl Bucket {
    /// Tokens the bucket would hold at `now` (refilled at `rate`, at most `burst`).
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst.max(1.0))
    }
}

/// What a rate bucket counts. Each kind has its own map, rate and cap, so
/// that making room for one kind never applies its rate to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// Stream opens per identity.
    Opens,
    /// HTTP proxy requests per identity.
    Requests,
    /// Login attempts per source address.
    Logins,
}

/// One kind's buckets, by key.
#[derive(Default)]
struct Buckets {
    opens: HashMap<String, Bucket>,
    requests: HashMap<String, Bucket>,
    logins: HashMap<String, Bucket>,
}

impl Buckets {
    fn of(&mut self, kind: Kind) -> &mut HashMap<String, Bucket> {
        match kind {
            Kind::Opens => &mut self.opens,
            Kind::Requests => &mut self.requests,
            Kind::Logins => &mut self.logins,
        }
    }
}

/// Makes room for one more key in a full map: drops every bucket that has
/// refilled at this kind's own rate, and if none has, the fullest one.
fn make_room(m: &mut HashMap<String, Bucket>, now: Instant, rate: f64, burst: f64) {
    let full = burst.max(1.0);
    m.retain(|_, b| b.level(now, rate, burst) < full);
    if m.len() < MAX_BUCKETS {
        return;
    }
    let fullest = m
        .iter()
        .max_by(|a, b| {
            a.1.level(now, rate, burst)
                .total_cmp(&b.1.level(now, rate, burst))
        })
        .map(|(k, _)| k.clone());
    if let Some(k) = fullest {
        m.remove(&k);
    }
}

/// The key a login attempt from `ip` is counted under: the address, or its
/// /64 for IPv6 (IPv4-mapped addresses count as IPv4).
fn login_key(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, LOGIN_V6_PREFIX)
            .map(|n| n.trunc().to_string())
            .unwrap_or_else(|_| v6.to_string()),
        v4 => v4.to_string(),
    }
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
    buckets: Mutex<Buckets>,
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

    /// The connection caps of the public port.
    pub(crate) fn connection_caps(&self) -> crate::admission::Caps {
        let g = self.cfg.lock().unwrap_or_else(|p| p.into_inner());
        crate::admission::Caps {
            max_connections: g.max_connections,
            max_per_source: g.max_connections_per_source,
        }
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
            Kind::Requests,
            who,
            Instant::now(),
            cfg.requests_per_sec,
            cfg.request_burst,
            "requests_per_sec",
            "HTTP requests",
        )
    }

    /// One browser login attempt from `ip` (a slow brute force is still
    /// hopeless against 256-bit tokens; this keeps the log and the CPU quiet).
    /// The caller charges only real attempts (a token was submitted and the
    /// CSRF checks passed), so nobody can lock out an address for free.
    pub fn login(&self, ip: std::net::IpAddr) -> Result<(), LimitHit> {
        self.login_at(ip, Instant::now())
    }

    fn login_at(&self, ip: std::net::IpAddr, now: Instant) -> Result<(), LimitHit> {
        self.take(
            Kind::Logins,
            &login_key(ip),
            now,
            LOGINS_PER_SEC,
            LOGIN_BURST,
            "logins_per_source",
            "login attempts",
        )
    }

    fn open_at(&self, who: &str, now: Instant) -> Result<(), LimitHit> {
        let cfg = self.cfg();
        self.take(
            Kind::Opens,
            who,
            now,
            cfg.opens_per_sec,
            cfg.open_burst,
            "opens_per_sec",
            "streams",
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn take(
        &self,
        kind: Kind,
        who: &str,
        now: Instant,
        rate: f64,
        burst: f64,
        limit: &'static str,
        what: &str,
    ) -> Result<(), LimitHit> {
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.of(kind);
        if b.len() >= MAX_BUCKETS && !b.contains_key(who) {
            make_room(b, now, rate, burst);
        }
        let e = b.entry(who.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        e.tokens = e.level(now, rate, burst);
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
    fn ipv6_logins_count_per_64() {
        let l = Limits::new(LimitsConfig::default());
        let t0 = Instant::now();
        for i in 0..LOGIN_BURST as u16 {
            let ip = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            l.login_at(ip, t0).unwrap();
        }
        // Another address of the same /64 shares the budget...
        let same: std::net::IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert!(l.login_at(same, t0).is_err());
        // ...another /64 does not, and IPv4-mapped addresses count as IPv4.
        let other: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.login_at(other, t0).is_ok());
        assert_eq!(login_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7");
    }

    #[test]
    fn bucket_maps_are_hard_capped() {
        let l = Limits::new(LimitsConfig::default());
        let t0 = Instant::now();
        // Keys that keep a drained bucket (nothing refills at t0) cannot
        // grow the map past its cap.
        for i in 0..MAX_BUCKETS + 50 {
            l.open_at(&format!("who{i}"), t0).unwrap();
        }
        let n = l.buckets.lock().unwrap().opens.len();
        assert!(n <= MAX_BUCKETS, "{n} buckets");
        // A throttled key (empty bucket) is never the one evicted.
        let l = Limits::new(LimitsConfig {
            opens_per_sec: 1.0,
            open_burst: 2.0,
            ..Default::default()
        });
        l.open_at("flood", t0).unwrap();
        l.open_at("flood", t0).unwrap();
        assert!(l.open_at("flood", t0).is_err());
        for i in 0..MAX_BUCKETS + 50 {
            l.open_at(&format!("who{i}"), t0).unwrap();
        }
        assert!(
            l.open_at("flood", t0).is_err(),
            "the flooder got a new bucket"
        );
    }

    #[test]
    fn making_room_uses_each_kinds_own_rate() {
        // A source that used up its login budget stays refused even when
        // stream opens (1000/s) fill their map: their rate must not make the
        // login bucket look refilled.
        let l = Limits::new(LimitsConfig::default());
        let t0 = Instant::now();
        let ip: std::net::IpAddr = "192.0.2.9".parse().unwrap();
        for _ in 0..LOGIN_BURST as usize {
            l.login_at(ip, t0).unwrap();
        }
        assert!(l.login_at(ip, t0).is_err());
        let later = t0 + Duration::from_millis(100);
        for i in 0..MAX_BUCKETS + 1 {
            l.open_at(&format!("who{i}"), later).unwrap();
        }
        assert_eq!(
            l.login_at(ip, later).unwrap_err().limit,
            "logins_per_source"
        );
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
