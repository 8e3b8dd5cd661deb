//! Who gets a TCP connection on the public port, before anyone is known.
//!
//! Three rules, checked at accept:
//!
//! * at most `max_connections` open connections in all;
//! * at most `max_connections_per_source` from one source address (IPv6
//!   counted per /64), so one host cannot take every slot;
//! * anonymous connections (nothing authenticated on them yet) may fill the
//!   cap only up to a reserve: the last tenth is kept for agent and client
//!   sessions. A connection accepted into the reserve is *reserve-only*: it
//!   may carry a session upgrade or a health check and nothing else, and
//!   must send its request quickly.
//!
//! A connection stops counting as anonymous once an agent or client session
//! is authenticated on it ([`ConnectionHold::authenticated`]).
//!
//! A `[[listener]]` port counts connections per source the same way
//! ([`SourceCounts`]), and also their rate per source ([`SourceRates`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tether_net::sources::{source_key, SourceCounts, SourceSlot};

use crate::limits::{Bucket, Caps, Limit};

/// Most sources whose connection rate one [`SourceRates`] follows at once.
/// Past it, sources whose bucket has refilled are forgotten, in one sweep a
/// second at most (a sweep per accept would be a scan of the whole map per
/// connection from a new address); a new source that finds no room is let
/// through unmetered (the listener's own rate still applies): refusing it
/// would let many busy sources lock out every other.
const MAX_RATED_SOURCES: usize = 65_536;

/// How often a full [`SourceRates`] map may be swept.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// New connections per source address through one `[[listener]]`, as a
/// token bucket per source (burst: two seconds' worth). The listener's opens
/// share one rate (`opens_per_sec` of its pseudo-identity), so without this
/// one source connecting and closing as fast as it can would spend all of
/// it and every other source would be refused.
#[derive(Default)]
pub(crate) struct SourceRates(Mutex<Rated>);

/// [`SourceRates`]' buckets and when they were last swept.
#[derive(Default)]
struct Rated {
    buckets: HashMap<IpAddr, Bucket>,
    swept: Option<std::time::Instant>,
}

impl SourceRates {
    /// Takes one connection for `ip` at `rate` per second, if its bucket
    /// has a token.
    pub(crate) fn take(&self, ip: IpAddr, rate: f64, now: std::time::Instant) -> bool {
        let burst = (rate * 2.0).max(1.0);
        let key = source_key(ip);
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Rated { buckets, swept } = &mut *r;
        if buckets.len() >= MAX_RATED_SOURCES && !buckets.contains_key(&key) {
            if swept.is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY) {
                return true;
            }
            *swept = Some(now);
            // A refilled bucket says nothing a fresh one would not.
            buckets.retain(|_, b| b.level(now, rate, burst) < burst);
            if buckets.len() >= MAX_RATED_SOURCES {
                return true;
            }
        }
        buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(now, burst))
            .take(now, rate, burst)
    }
}

/// Why a connection was refused at accept (the metric label and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_connections` reached.
    Connections,
    /// `max_connections_per_source` reached for this source.
    PerSource,
}

impl Refused {
    /// The limit that refused it.
    pub(crate) fn limit(self) -> Limit {
        match self {
            Refused::Connections => Limit::Connections,
            Refused::PerSource => Limit::ConnectionsPerSource,
        }
    }
}

/// The public port's connection counts.
#[derive(Default)]
pub(crate) struct Admission {
    total: AtomicUsize,
    anonymous: AtomicUsize,
    sources: Arc<SourceCounts>,
}

/// Slots anonymous connections may not take: a tenth of the cap.
fn reserve(caps: Caps) -> usize {
    (caps.max_connections / 10).max(1)
}

impl Admission {
    /// Admits a new connection from `ip`, or says which cap refused it.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        caps: Caps,
    ) -> Result<ConnectionHold, Refused> {
        let source = self
            .sources
            .take(ip, caps.max_per_source.max(1))
            .ok_or(Refused::PerSource)?;
        let total = self.total.fetch_add(1, Ordering::Relaxed);
        let anonymous = self.anonymous.fetch_add(1, Ordering::Relaxed);
        let guard = ConnectionGuard {
            admission: self.clone(),
            authenticated: AtomicBool::new(false),
            // The reserve is the last tenth of all connections: counted on
            // the anonymous ones alone, it was gone once sessions held more
            // than a tenth (15 000 agents of 20 000: anonymous connections
            // could take every slot left, and a reconnecting agent none).
            reserve_only: anonymous.max(total)
                >= caps.max_connections.saturating_sub(reserve(caps)),
            _source: source,
        };
        if total >= caps.max_connections {
            return Err(Refused::Connections); // the guard gives the counts back
        }
        Ok(ConnectionHold(Arc::new(guard)))
    }

    /// Open connections on the public port.
    pub(crate) fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// Counts one connection until dropped.
pub(crate) struct ConnectionGuard {
    admission: Arc<Admission>,
    authenticated: AtomicBool,
    reserve_only: bool,
    _source: SourceSlot,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
        if !self.authenticated.load(Ordering::Relaxed) {
            self.admission.anonymous.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A shared hold on a connection's slot. Requests carry it (as an
/// extension) so that WebSocket upgrades, which outlive hyper's connection
/// task, keep counting.
#[derive(Clone)]
pub(crate) struct ConnectionHold(Arc<ConnectionGuard>);

impl ConnectionHold {
    /// An agent or client session was authenticated on this connection: it
    /// no longer counts against the anonymous share.
    pub(crate) fn authenticated(&self) {
        if !self.0.authenticated.swap(true, Ordering::Relaxed) {
            self.0.admission.anonymous.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Accepted into the reserve: serve only session upgrades and health
    /// checks on it.
    pub(crate) fn reserve_only(&self) -> bool {
        self.0.reserve_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full map is swept at most once a second; until a sweep frees
    /// room, new sources pass unmetered.
    #[test]
    fn a_full_map_is_swept_once_a_second() {
        let rates = SourceRates::default();
        let t0 = std::time::Instant::now();
        let source = |i: usize| IpAddr::from((i as u32 | 0x0a00_0000).to_be_bytes());
        for i in 0..MAX_RATED_SOURCES {
            // A slow rate: each bucket, once taken from, stays below full.
            assert!(rates.take(source(i), 0.01, t0));
        }
        let swept = || rates.0.lock().unwrap().swept;
        let len = || rates.0.lock().unwrap().buckets.len();
        assert_eq!(swept(), None);
        assert!(rates.take(source(MAX_RATED_SOURCES), 0.01, t0));
        assert_eq!(swept(), Some(t0), "the first new source sweeps");
        assert_eq!(len(), MAX_RATED_SOURCES, "nothing had refilled");
        let t1 = t0 + std::time::Duration::from_millis(500);
        assert!(rates.take(source(MAX_RATED_SOURCES + 1), 0.01, t1));
        assert_eq!(swept(), Some(t0), "no second sweep within a second");
        // Two minutes on, every bucket has refilled: the sweep empties it.
        let t2 = t0 + std::time::Duration::from_secs(120);
        assert!(rates.take(source(MAX_RATED_SOURCES + 2), 0.01, t2));
        assert_eq!(swept(), Some(t2));
        assert_eq!(len(), 1);
    }

    /// A source gets its burst (two seconds' worth), then its rate; another
    /// source has its own bucket; IPv6 counts per /64.
    #[test]
    fn each_source_has_its_own_rate() {
        let rates = SourceRates::default();
        let t0 = std::time::Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let taken = (0..10).filter(|_| rates.take(a, 2.0, t0)).count();
        assert_eq!(taken, 4);
        assert!(rates.take("192.0.2.2".parse().unwrap(), 2.0, t0));
        assert!(rates.take(a, 2.0, t0 + std::time::Duration::from_millis(500)));
        assert!(!rates.take(a, 2.0, t0 + std::time::Duration::from_millis(600)));
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!((0..4).all(|_| rates.take(v6("2001:db8::1"), 2.0, t0)));
        assert!(!rates.take(v6("2001:db8::2"), 2.0, t0), "the same /64");
    }

    fn caps(max: usize, per_source: usize) -> Caps {
        Caps {
            max_connections: max,
            max_per_source: per_source,
            send_timeout: std::time::Duration::from_secs(60),
        }
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let a = Arc::new(Admission::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| a.admit(ip, caps(100, 3)).unwrap()).collect();
        assert_eq!(a.admit(ip, caps(100, 3)).err(), Some(Refused::PerSource));
        assert!(a.admit("192.0.2.2".parse().unwrap(), caps(100, 3)).is_ok());
        drop(held);
        assert!(a.admit(ip, caps(100, 3)).is_ok());
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a = Arc::new(Admission::default());
        let _h = a
            .admit("2001:db8::1".parse().unwrap(), caps(100, 1))
            .unwrap();
        let other_host_same_64 = "2001:db8::ffff".parse().unwrap();
        assert_eq!(
            a.admit(other_host_same_64, caps(100, 1)).err(),
            Some(Refused::PerSource)
        );
        assert!(a
            .admit("2001:db8:0:1::1".parse().unwrap(), caps(100, 1))
            .is_ok());
    }

    #[test]
    fn the_last_tenth_is_kept_for_sessions() {
        let a = Arc::new(Admission::default());
        let mut held = vec![];
        for i in 0..9u8 {
            let h = a.admit(IpAddr::from([10, 0, 0, i]), caps(10, 5)).unwrap();
            assert!(!h.reserve_only());
            held.push(h);
        }
        // The tenth anonymous connection gets in, but only for sessions.
        let r = a.admit("10.0.1.1".parse().unwrap(), caps(10, 5)).unwrap();
        assert!(r.reserve_only());
        assert_eq!(
            a.admit("10.0.1.2".parse().unwrap(), caps(10, 5)).err(),
            Some(Refused::Connections)
        );
        // Authenticated sessions count towards the reserve's line too: with
        // 8 anonymous connections and one session, the tenth slot is still
        // the reserve.
        r.authenticated();
        drop(held.pop());
        let h = a.admit("10.0.1.3".parse().unwrap(), caps(10, 5)).unwrap();
        assert!(h.reserve_only());
        assert_eq!(a.open(), 10);
        drop((h, held.pop()));
        let h = a.admit("10.0.1.4".parse().unwrap(), caps(10, 5)).unwrap();
        assert!(!h.reserve_only(), "below the reserve's line");
    }

    /// Sessions holding more than the reserve do not hand it to anonymous
    /// connections: with 6 of 10 slots held by sessions, anonymous ones
    /// get 3 more, and the last only for a session.
    #[test]
    fn sessions_holding_many_slots_keep_the_reserve() {
        let a = Arc::new(Admission::default());
        let sessions: Vec<_> = (0..6u8)
            .map(|i| {
                let h = a.admit(IpAddr::from([10, 0, 0, i]), caps(10, 5)).unwrap();
                h.authenticated();
                h
            })
            .collect();
        let anonymous: Vec<_> = (0..3u8)
            .map(|i| a.admit(IpAddr::from([10, 0, 1, i]), caps(10, 5)).unwrap())
            .collect();
        assert!(anonymous.iter().all(|h| !h.reserve_only()));
        let last = a.admit("10.0.2.1".parse().unwrap(), caps(10, 5)).unwrap();
        assert!(
            last.reserve_only(),
            "the reserve went to an anonymous connection"
        );
        drop((sessions, anonymous, last));
    }
}
