//! Limits that keep one identity from crowding out the others: sessions,
//! streams, pending opens and the rate of opens, each per identity, plus a
//! cap on all sessions. Each refusal names the limit ([`Limit`]), counts in
//! `tether_limit_hits_total{limit=...}`, and touches nobody else's traffic.
//! (Frame and message sizes, handshake, idle and header-read timeouts live
//! with the protocol and the HTTP front; the settings are
//! [`crate::config::LimitsConfig`].)
//!
//! Stream and pending-open slots are taken and given back by the open path
//! only ([`crate::open`]), whose one guard releases them on drop.

use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::LimitsConfig;

/// Login attempts per second from one source address.
pub(crate) const LOGINS_PER_SEC: f64 = 2.0;
/// Burst of login attempts from one source address.
pub(crate) const LOGIN_BURST: f64 = 20.0;
/// Most rate buckets kept per kind (stream opens, HTTP requests, logins).
/// At the cap, buckets that have refilled are dropped first (they lose
/// nothing); if too few have, the fullest go, so the map never grows past it
/// and a throttled key (an empty bucket) is the last to be forgotten.
pub(crate) const MAX_BUCKETS: usize = 10_000;
/// How many buckets a full map keeps after making room (an eighth of the
/// cap goes at once; see `make_room`).
const REFILL_MARK: usize = MAX_BUCKETS - MAX_BUCKETS / 8;
/// Console event streams (`/api/events`, one per open console tab) one
/// identity may hold at once. Each recomputes the identity's view of every
/// agent once a second, so without a cap one client could keep the server
/// busy with thousands.
pub(crate) const CONSOLE_STREAMS_PER_CLIENT: usize = 16;
/// Login attempts from IPv6 are counted per /64: one host usually holds a
/// whole /64, and counting per address would give it 2^64 budgets.
const LOGIN_V6_PREFIX: u8 = 64;

/// Every limit the server enforces, by the name operators see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Limit {
    /// Stream opens per second per identity.
    OpensPerSec,
    /// HTTP proxy requests per second per identity.
    RequestsPerSec,
    /// Login attempts per second per source address.
    LoginsPerSource,
    /// All live sessions.
    Sessions,
    /// Live sessions of one client identity.
    SessionsPerClient,
    /// Streams of one identity, over all its sessions.
    StreamsPerClient,
    /// Opens of one identity waiting for their agent.
    PendingOpens,
    /// Open connections to the public port.
    Connections,
    /// Open connections to the public port from one source.
    ConnectionsPerSource,
    /// The anonymous share of the public port is full: only sessions.
    ConnectionsReserved,
    /// Connections from one source through one `[[listener]]`.
    ListenerConnectionsPerSource,
    /// New connections per second from one source through one `[[listener]]`.
    ListenerOpensPerSource,
    /// Console event streams of one identity.
    ConsoleStreams,
    /// Sessions of one agent name, handshakes and probes included.
    SessionsPerAgent,
    /// A client that read nothing of its connection's answers (the
    /// connection is closed), or granted an HTTP/2 answer no window (its
    /// stream is reset), for `send_timeout_secs`.
    SendTimeout,
}

/// Sessions one agent name may hold on one replica at once, handshakes and
/// credential probes included: its pool's live and draining instances
/// (twice `MAX_INSTANCES`) with room to spare. Without it one agent token
/// could take every one of `max_sessions` with upgrades that never finish
/// their handshake.
pub(crate) const MAX_SESSIONS_PER_AGENT: usize = 4 * crate::registry::MAX_INSTANCES;

impl Limit {
    /// The `tether_limit_hits_total{limit}` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::OpensPerSec => "opens_per_sec",
            Limit::RequestsPerSec => "requests_per_sec",
            Limit::LoginsPerSource => "logins_per_source",
            Limit::Sessions => "sessions",
            Limit::SessionsPerClient => "sessions_per_client",
            Limit::StreamsPerClient => "streams_per_client",
            Limit::PendingOpens => "pending_opens",
            Limit::Connections => "connections",
            Limit::ConnectionsPerSource => "connections_per_source",
            Limit::ConnectionsReserved => "connections_reserved",
            Limit::ListenerConnectionsPerSource => "listener_connections_per_source",
            Limit::ListenerOpensPerSource => "listener_opens_per_source",
            Limit::ConsoleStreams => "console_streams",
            Limit::SessionsPerAgent => "sessions_per_agent",
            Limit::SendTimeout => "send_timeout",
        }
    }
}

impl Limit {
    /// The setting that raises it, for refusals and log lines.
    pub(crate) fn setting(self) -> &'static str {
        match self {
            Limit::OpensPerSec => "[limits] opens_per_sec and open_burst",
            Limit::RequestsPerSec => "[limits] requests_per_sec and request_burst",
            Limit::LoginsPerSource => "nothing (fixed: 2 per second, burst 20)",
            Limit::Sessions => "[limits] max_sessions",
            Limit::SessionsPerClient => "[limits] max_sessions_per_client",
            Limit::StreamsPerClient => "max_streams_per_client (top level; at restart)",
            Limit::PendingOpens => "[limits] max_pending_opens_per_client",
            Limit::Connections | Limit::ConnectionsReserved => "[limits] max_connections",
            Limit::ConnectionsPerSource => "[limits] max_connections_per_source",
            Limit::ListenerConnectionsPerSource => "max_connections_per_source of the [[listener]]",
            Limit::ListenerOpensPerSource => "opens_per_sec_per_source of the [[listener]] (default: half of [limits] opens_per_sec)",
            Limit::ConsoleStreams => "nothing (fixed: 16 open consoles per client)",
            Limit::SessionsPerAgent => "nothing (fixed: 32 per agent name and replica)",
            Limit::SendTimeout => "[limits] send_timeout_secs",
        }
    }

    /// How the limit is raised, for the end of a refusal's reason: the
    /// server's setting, or that there is none.
    pub(crate) fn raise_hint(self) -> String {
        match self {
            Limit::LoginsPerSource | Limit::ConsoleStreams | Limit::SessionsPerAgent => {
                "a fixed limit".to_owned()
            }
            _ => format!("the server's {} raises it", self.setting()),
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: which limit, and the reason for the requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitHit {
    /// Which limit.
    pub(crate) limit: Limit,
    /// Human-readable reason.
    pub(crate) reason: String,
}

/// The connection caps of the public port in force (read per accept, so a
/// reload applies at once).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    /// `max_connections`.
    pub(crate) max_connections: usize,
    /// `max_connections_per_source`.
    pub(crate) max_per_source: usize,
    /// `send_timeout_secs`: how long a write may wait on a client that
    /// reads nothing (or an HTTP/2 answer on a window it does not grant).
    pub(crate) send_timeout: std::time::Duration,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second, one taken
/// per event.
#[derive(Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub(crate) fn full(now: Instant, burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Tokens the bucket would hold at `now` (refilled at `rate`, at most `burst`).
    pub(crate) fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst.max(1.0))
    }

    /// Takes a token at `now`, if there is one.
    pub(crate) fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.tokens = self.level(now, rate, burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
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

/// Makes room in a full map: drops every bucket that has refilled at this
/// kind's own rate, and if that leaves the map above [`REFILL_MARK`], the
/// fullest buckets down to it. Freeing a batch rather than one slot keeps a
/// flood of new keys (login attempts from ever new source addresses) at one
/// O(n) sweep per `MAX_BUCKETS - REFILL_MARK` keys: a sweep per key cost
/// ~0.3 ms each under the lock every rate check takes.
fn make_room(m: &mut HashMap<String, Bucket>, now: Instant, rate: f64, burst: f64) {
    let full = burst.max(1.0);
    m.retain(|_, b| b.level(now, rate, burst) < full);
    let Some(excess) = m.len().checked_sub(REFILL_MARK).filter(|&n| n > 0) else {
        return;
    };
    let mut by_level: Vec<(f64, &String)> = m
        .iter()
        .map(|(k, b)| (b.level(now, rate, burst), k))
        .collect();
    // The `excess` fullest first; their order among themselves does not matter.
    by_level.select_nth_unstable_by(excess - 1, |a, b| b.0.total_cmp(&a.0));
    let drop: Vec<String> = by_level[..excess]
        .iter()
        .map(|(_, k)| (*k).clone())
        .collect();
    for k in drop {
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
    per_agent: HashMap<String, usize>,
    pending: HashMap<String, usize>,
    console: HashMap<String, usize>,
}

/// Live limit state.
pub(crate) struct Limits {
    cfg: Mutex<LimitsConfig>,
    /// `max_streams_per_client` (restart only, so not in `cfg`).
    max_streams: usize,
    buckets: Mutex<Buckets>,
    counts: Arc<Mutex<Counts>>,
    /// Streams per identity; their own lock, as every open and HTTP
    /// request takes one.
    streams: Mutex<HashMap<Arc<str>, usize>>,
}

/// Holds one session slot until dropped.
pub(crate) struct SessionSlot {
    counts: Arc<Mutex<Counts>>,
    client: Option<String>,
    agent: Option<String>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(name) = &self.client {
            dec(&mut c.per_client, name);
        }
        if let Some(name) = &self.agent {
            dec(&mut c.per_agent, name);
        }
    }
}

/// Holds one console event stream slot until dropped.
pub(crate) struct ConsoleSlot {
    counts: Arc<Mutex<Counts>>,
    client: String,
}

impl Drop for ConsoleSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        dec(&mut c.console, &self.client);
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
    /// Limits with these settings, and at most `max_streams` streams per
    /// identity.
    pub(crate) fn new(cfg: LimitsConfig, max_streams: usize) -> Limits {
        Limits {
            cfg: Mutex::new(cfg),
            max_streams: max_streams.max(1),
            buckets: Mutex::default(),
            counts: Arc::default(),
            streams: Mutex::default(),
        }
    }

    /// Takes new settings (reload); live counts are kept.
    pub(crate) fn set_config(&self, cfg: LimitsConfig) {
        *self.cfg.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    /// `max_streams_per_client`.
    pub(crate) fn max_streams(&self) -> usize {
        self.max_streams
    }

    /// The connection caps of the public port.
    pub(crate) fn connection_caps(&self) -> Caps {
        let g = self.cfg.lock().unwrap_or_else(|p| p.into_inner());
        Caps {
            max_connections: g.max_connections,
            max_per_source: g.max_connections_per_source,
            send_timeout: std::time::Duration::from_secs(g.send_timeout_secs),
        }
    }

    fn cfg(&self) -> LimitsConfig {
        self.cfg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `opens_per_sec` in force (a listener's per-source rate is half of it
    /// unless set).
    pub(crate) fn opens_per_sec(&self) -> f64 {
        self.cfg
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .opens_per_sec
    }

    /// One stream open by `who`, if its rate allows.
    pub(crate) fn open(&self, who: &str) -> Result<(), LimitHit> {
        self.open_at(who, Instant::now())
    }

    /// One HTTP proxy request by `who`, if its rate allows.
    pub(crate) fn request(&self, who: &str) -> Result<(), LimitHit> {
        let cfg = self.cfg();
        self.take(
            Kind::Requests,
            who,
            Instant::now(),
            cfg.requests_per_sec,
            cfg.request_burst,
            Limit::RequestsPerSec,
            "HTTP requests",
        )
    }

    /// One browser login attempt from `ip` (a slow brute force is still
    /// hopeless against 256-bit tokens; this keeps the log and the CPU quiet).
    /// The caller charges only real attempts (a token was submitted and the
    /// CSRF checks passed), so nobody can lock out an address for free.
    pub(crate) fn login(&self, ip: std::net::IpAddr) -> Result<(), LimitHit> {
        self.login_at(ip, Instant::now())
    }

    fn login_at(&self, ip: std::net::IpAddr, now: Instant) -> Result<(), LimitHit> {
        self.take(
            Kind::Logins,
            &login_key(ip),
            now,
            LOGINS_PER_SEC,
            LOGIN_BURST,
            Limit::LoginsPerSource,
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
            Limit::OpensPerSec,
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
        limit: Limit,
        what: &str,
    ) -> Result<(), LimitHit> {
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.of(kind);
        if b.len() >= MAX_BUCKETS && !b.contains_key(who) {
            make_room(b, now, rate, burst);
        }
        let e = b
            .entry(who.to_owned())
            .or_insert_with(|| Bucket::full(now, burst));
        if !e.take(now, rate, burst) {
            return Err(LimitHit {
                limit,
                reason: format!(
                    "{who}: more than {rate} {what} per second (burst {burst}); {}",
                    limit.raise_hint()
                ),
            });
        }
        Ok(())
    }

    /// A session slot (for `client`, or an agent / raw session when `None`).
    pub(crate) fn session(&self, client: Option<&str>) -> Result<SessionSlot, LimitHit> {
        let cfg = self.cfg();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= cfg.max_sessions {
            return Err(LimitHit {
                limit: Limit::Sessions,
                reason: format!(
                    "the server has {} sessions, its limit ({} raises it)",
                    cfg.max_sessions,
                    Limit::Sessions.setting()
                ),
            });
        }
        if let Some(name) = client {
            let n = c.per_client.get(name).copied().unwrap_or(0);
            if n >= cfg.max_sessions_per_client {
                return Err(LimitHit {
                    limit: Limit::SessionsPerClient,
                    reason: format!(
                        "{name} already has {} sessions, its limit (the server's {} raises it)",
                        cfg.max_sessions_per_client,
                        Limit::SessionsPerClient.setting()
                    ),
                });
            }
            *c.per_client.entry(name.to_owned()).or_insert(0) += 1;
        }
        c.total += 1;
        Ok(SessionSlot {
            counts: self.counts.clone(),
            client: client.map(str::to_owned),
            agent: None,
        })
    }

    /// A session slot for agent `name` (its handshake and probes too):
    /// within `max_sessions` and [`MAX_SESSIONS_PER_AGENT`].
    pub(crate) fn agent_session(&self, name: &str) -> Result<SessionSlot, LimitHit> {
        let mut slot = self.session(None)?;
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.per_agent.entry(name.to_owned()).or_insert(0);
        if *n >= MAX_SESSIONS_PER_AGENT {
            drop(c); // the slot's drop gives `total` back under the same lock
            return Err(LimitHit {
                limit: Limit::SessionsPerAgent,
                reason: format!(
                    "agent {name} already has {MAX_SESSIONS_PER_AGENT} sessions on this replica; {}",
                    Limit::SessionsPerAgent.raise_hint()
                ),
            });
        }
        *n += 1;
        slot.agent = Some(name.to_owned());
        Ok(slot)
    }

    /// Takes one of `who`'s stream slots, if it has one left; the caller
    /// gives it back with [`Limits::release_stream`].
    pub(crate) fn take_stream(&self, who: &Arc<str>) -> bool {
        let mut g = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(who.clone()).or_insert(0);
        if *n >= self.max_streams {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a slot [`Limits::take_stream`] took.
    pub(crate) fn release_stream(&self, who: &str) {
        let mut g = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(who);
            }
        }
    }

    /// Takes one of `who`'s pending-open slots; the caller gives it back
    /// with [`Limits::release_pending`].
    pub(crate) fn take_pending(&self, who: &str) -> Result<(), LimitHit> {
        let cfg = self.cfg();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.pending.entry(who.to_owned()).or_insert(0);
        if *n >= cfg.max_pending_opens_per_client {
            return Err(LimitHit {
                limit: Limit::PendingOpens,
                reason: format!(
                    "{who} already has {} opens waiting for their agent, its limit (the server's {} raises it)",
                    cfg.max_pending_opens_per_client,
                    Limit::PendingOpens.setting()
                ),
            });
        }
        *n += 1;
        Ok(())
    }

    /// A console event stream slot for `who`.
    pub(crate) fn console_stream(&self, who: &str) -> Result<ConsoleSlot, LimitHit> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.console.entry(who.to_owned()).or_insert(0);
        if *n >= CONSOLE_STREAMS_PER_CLIENT {
            return Err(LimitHit {
                limit: Limit::ConsoleStreams,
                reason: format!(
                    "{who} already has {CONSOLE_STREAMS_PER_CLIENT} consoles open with live updates, a fixed limit; close one (a console over the limit refreshes every 3 s instead)"
                ),
            });
        }
        *n += 1;
        Ok(ConsoleSlot {
            counts: self.counts.clone(),
            client: who.to_owned(),
        })
    }

    /// Gives back a slot [`Limits::take_pending`] took.
    pub(crate) fn release_pending(&self, who: &str) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        dec(&mut c.pending, who);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One agent name holds at most MAX_SESSIONS_PER_AGENT sessions; a
    /// refused one gives its place in the total back; others are not held
    /// up by it.
    #[test]
    fn one_agent_cannot_take_every_session() {
        let l = Limits::new(LimitsConfig::default(), 1);
        let held: Vec<_> = (0..MAX_SESSIONS_PER_AGENT)
            .map(|_| l.agent_session("prod").unwrap())
            .collect();
        let hit = l.agent_session("prod").err().unwrap();
        assert_eq!(hit.limit, Limit::SessionsPerAgent);
        assert!(hit.reason.contains("32 sessions"), "{}", hit.reason);
        assert_eq!(l.counts.lock().unwrap().total, MAX_SESSIONS_PER_AGENT);
        let _other = l.agent_session("staging").unwrap();
        drop(held);
        let _again = l.agent_session("prod").unwrap();
        assert_eq!(l.counts.lock().unwrap().total, 2);
    }

    #[test]
    fn rate_is_per_identity_and_refills() {
        let l = Limits::new(
            LimitsConfig {
                opens_per_sec: 10.0,
                open_burst: 5.0,
                ..Default::default()
            },
            1,
        );
        let t0 = Instant::now();
        for _ in 0..5 {
            l.open_at("a", t0).unwrap();
        }
        assert_eq!(l.open_at("a", t0).unwrap_err().limit, Limit::OpensPerSec);
        // Someone else is not affected.
        l.open_at("b", t0).unwrap();
        // 100 ms later one more token is there.
        l.open_at("a", t0 + Duration::from_millis(100)).unwrap();
        assert!(l.open_at("a", t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn login_attempts_are_limited_per_source() {
        let l = Limits::new(LimitsConfig::default(), 1);
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..LOGIN_BURST as usize {
            l.login(a).unwrap();
        }
        assert_eq!(l.login(a).unwrap_err().limit, Limit::LoginsPerSource);
        assert!(l.login(b).is_ok());
    }

    #[test]
    fn ipv6_logins_count_per_64() {
        let l = Limits::new(LimitsConfig::default(), 1);
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
        let l = Limits::new(LimitsConfig::default(), 1);
        let t0 = Instant::now();
        // Keys that keep a drained bucket (nothing refills at t0) cannot
        // grow the map past its cap.
        for i in 0..MAX_BUCKETS + 50 {
            l.open_at(&format!("who{i}"), t0).unwrap();
        }
        let n = l.buckets.lock().unwrap().opens.len();
        assert!(n <= MAX_BUCKETS, "{n} buckets");
        // A throttled key (empty bucket) is never the one evicted.
        let l = Limits::new(
            LimitsConfig {
                opens_per_sec: 1.0,
                open_burst: 2.0,
                ..Default::default()
            },
            1,
        );
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
    fn a_full_bucket_map_frees_a_batch_so_new_keys_do_not_sweep_it_each() {
        let l = Limits::new(LimitsConfig::default(), 1);
        let t0 = Instant::now();
        let ip = |i: u32| std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        // A hundred sources that used up their budget, then sources that
        // used a little of theirs: nothing refills at t0.
        let drained: Vec<_> = (0..100).map(|i| ip(900_000 + i)).collect();
        for &d in &drained {
            while l.login_at(d, t0).is_ok() {}
        }
        for i in 100..MAX_BUCKETS as u32 {
            l.login_at(ip(i), t0).unwrap();
        }
        let len = || l.buckets.lock().unwrap().logins.len();
        assert_eq!(len(), MAX_BUCKETS);
        // One more source frees an eighth of the map at once...
        l.login_at(ip(MAX_BUCKETS as u32), t0).unwrap();
        assert_eq!(len(), REFILL_MARK + 1);
        // ...so the next ones up to the cap find room without a sweep, and
        // the map never passes its cap.
        for i in 1..(MAX_BUCKETS - REFILL_MARK) as u32 {
            l.login_at(ip(MAX_BUCKETS as u32 + i), t0).unwrap();
        }
        assert_eq!(len(), MAX_BUCKETS);
        l.login_at(ip(800_000), t0).unwrap();
        assert_eq!(len(), REFILL_MARK + 1);
        // The drained sources were in neither batch that went (the fullest
        // go first; a random pick would have dropped some of them).
        for &d in &drained {
            assert_eq!(l.login_at(d, t0).unwrap_err().limit, Limit::LoginsPerSource);
        }
    }

    #[test]
    fn making_room_uses_each_kinds_own_rate() {
        // A source that used up its login budget stays refused even when
        // stream opens (1000/s) fill their map: their rate must not make the
        // login bucket look refilled.
        let l = Limits::new(LimitsConfig::default(), 1);
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
            Limit::LoginsPerSource
        );
    }

    #[test]
    fn console_streams_are_capped_per_identity_and_returned() {
        let l = Limits::new(LimitsConfig::default(), 1);
        let held: Vec<ConsoleSlot> = (0..CONSOLE_STREAMS_PER_CLIENT)
            .map(|_| l.console_stream("alice").unwrap())
            .collect();
        let hit = l.console_stream("alice").err().unwrap();
        assert_eq!(hit.limit, Limit::ConsoleStreams);
        assert!(hit.reason.contains("16"), "{}", hit.reason);
        // Nobody else's budget is touched, and a closed one frees a slot.
        assert!(l.console_stream("bob").is_ok());
        drop(held);
        assert!(l.console_stream("alice").is_ok());
        assert!(!l.counts.lock().unwrap().console.contains_key("alice"));
    }

    #[test]
    fn session_and_pending_slots_are_returned() {
        let l = Limits::new(
            LimitsConfig {
                max_sessions: 3,
                max_sessions_per_client: 2,
                max_pending_opens_per_client: 1,
                ..Default::default()
            },
            1,
        );
        let a1 = l.session(Some("a")).unwrap();
        let _a2 = l.session(Some("a")).unwrap();
        assert_eq!(
            l.session(Some("a")).err().unwrap().limit,
            Limit::SessionsPerClient
        );
        let _agent = l.agent_session("prod").unwrap();
        assert_eq!(l.session(Some("b")).err().unwrap().limit, Limit::Sessions);
        assert_eq!(
            l.agent_session("prod").err().unwrap().limit,
            Limit::Sessions
        );
        drop(a1);
        let _b = l.session(Some("b")).unwrap();
        l.take_pending("a").unwrap();
        assert_eq!(
            l.take_pending("a").err().unwrap().limit,
            Limit::PendingOpens
        );
        assert!(l.take_pending("b").is_ok());
        l.release_pending("a");
        assert!(l.take_pending("a").is_ok());
        let a: Arc<str> = "a".into();
        let l = Limits::new(LimitsConfig::default(), 2);
        assert!(l.take_stream(&a) && l.take_stream(&a) && !l.take_stream(&a));
        l.release_stream("a");
        assert!(l.take_stream(&a));
    }
}
