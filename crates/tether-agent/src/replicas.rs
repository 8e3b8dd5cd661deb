//! One session to every server replica.
//!
//! Server replicas tell the agent which replicas exist (REPLICAS frames,
//! protocol version 4). The agent keeps one session to each, so whichever
//! replica a client lands on can reach it. A [`Supervisor`] holds the view
//! and the live sessions and, every half second or when something changed,
//! dials what is missing:
//!
//! * a replica advertised with an address is dialed at that address (TLS
//!   and the `Host` header still use the server URL's name);
//! * a replica advertised by id only is looked for through the URL (the
//!   load balancer), keeping whatever session lands, until one lands on it;
//! * with no session at all, or a server that advertises nothing (older
//!   than version 4: one replica), the URL itself is dialed;
//! * a URL host with several addresses counts each as a replica, unless a
//!   session at one of them landed on a replica already held (one replica
//!   at two addresses is held once; checked again each minute).
//!
//! A replica leaves the view 60 s after no live session lists it (each
//! session's latest REPLICAS stands until the session ends), and
//! at once when it said it is leaving (GOAWAY `leaving`), unless it is
//! advertised again. Additions count at once: a stale view costs a few
//! dials, never a missed replica.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_net::backoff::Backoff;
use tether_net::Connection;
use tether_proto::endpoints::MAX_HELD_IDS;
use tether_proto::{ErrorCode, ReplicaEntry};
use tokio::sync::Notify;

/// How long a replica stays in the view after no session advertised it.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Longest wait between dials of a replica that is advertised.
const ADVERTISED_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// First dial of a replica that appeared while others are held: spread
/// over this long, so a fleet of agents does not arrive at once.
const FIRST_DIAL_SPREAD: Duration = Duration::from_secs(2);
/// Most replicas one session's REPLICAS adds to the view: a server that
/// listed thousands (a bug, or a compromised replica) would have the agent
/// dial each of them.
const MAX_ADVERTISED: usize = 64;
/// Most replicas in the view, remembered ones included: a session that
/// advertised a fresh list at every tick would otherwise grow it by
/// [`MAX_ADVERTISED`] a tick for [`FORGET_AFTER`] (7 680 dials at once).
const MAX_VIEW: usize = 2 * MAX_ADVERTISED;
/// How often the view and the sessions are looked at.
const TICK: Duration = Duration::from_millis(500);
/// Looking for a replica through the load balancer: the wait after landing
/// on another one, in milliseconds (at most about 30 dials a minute).
const LB_RETRY: (u64, u64) = (1000, 3000);
/// Another process with our name and instance took a session: wait this
/// long before taking it back (they would flap).
pub(crate) const REPLACED_RETRY: Duration = Duration::from_secs(60);
/// How often a server URL name is resolved for its addresses.
pub(crate) const URL_RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for those addresses (the view keeps the last answer).
pub(crate) const URL_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a session replaced while one of our dials was under way waits
/// for that dial to turn out to be the replacement: a dial waits up to 2 s
/// for the replica to say who it is.
const OWN_REPLACE_WAIT: Duration = Duration::from_secs(5);

/// How a replica is dialed, and what a dial is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// The server URL (the load balancer), for any replica.
    Url,
    /// A replica's own address.
    Addr(SocketAddr),
    /// A replica known by id only: through the URL until one lands on it.
    Id(String),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Url => f.write_str("server URL"),
            Key::Addr(a) => write!(f, "{a}"),
            Key::Id(i) => write!(f, "replica {i} (via the server URL)"),
        }
    }
}

/// A session that is up.
struct Live {
    key: Key,
    conn: Connection,
}

impl Live {
    /// The replica this session reached, as it told (version 4).
    fn this(&self) -> Option<ReplicaEntry> {
        self.conn.peer_replicas().borrow().as_ref()?.this().cloned()
    }

    /// Whether it takes opens and stands for `key`. `reached` is the
    /// replica a session dialed for `key` last landed on: one replica
    /// reachable at two addresses (an A and an AAAA record, a server on
    /// `0.0.0.0` advertising no address) is held once, not dialed again at
    /// its other address (whose session would replace this one, and so on).
    fn covers(&self, key: &Key, reached: Option<&str>) -> bool {
        if self.conn.is_closed() || self.conn.is_draining() {
            return false;
        }
        if self.key == *key {
            return true;
        }
        let this = self.this();
        if let (Some(id), Some(t)) = (reached, &this) {
            if !id.is_empty() && t.id == id {
                return true;
            }
        }
        match (key, this) {
            (Key::Addr(a), Some(t)) => t.addr == a.to_string(),
            (Key::Id(i), Some(t)) => t.id == *i,
            // A server that advertises nothing is the only replica.
            (Key::Url, None) => self.conn.version() < tether_proto::REPLICAS_VERSION,
            _ => false,
        }
    }
}

/// Dial state of one key.
struct Target {
    backoff: Backoff,
    next_attempt: Instant,
    busy: bool,
    /// Dials failed in a row (the first is a warning, the rest debug).
    failures: u32,
    /// Why the last one failed: a new reason is a warning again.
    last_error: String,
}

/// What the view knows of a replica.
struct Seen {
    last: Instant,
}

#[derive(Default)]
struct State {
    live: HashMap<u64, Live>,
    next_slot: u64,
    targets: HashMap<Key, Target>,
    view: HashMap<Key, Seen>,
    /// Addresses of the server URL's name, when it has several.
    url_addrs: Vec<SocketAddr>,
    /// Those of them a session has stood for: the others may be out of
    /// this agent's reach for good (an AAAA record on an IPv4-only
    /// network, an address its egress policy blocks) and are dialed
    /// without counting as missing.
    url_addrs_held: HashSet<SocketAddr>,
    /// Replicas that said they are leaving and have not come back, with
    /// the id that left: still dialed (a restart comes back at the same
    /// address), not "missing" — until another replica is advertised there.
    left: HashMap<Key, String>,
    stopping: bool,
    /// Every session not yet closed (draining ones too), for the shutdown.
    all: Vec<Connection>,
    /// The replica (id) each key's last session landed on, and when: it
    /// stands for `FORGET_AFTER`, then the key is dialed again (a replica
    /// may have moved and another taken its address; the dial replaces our
    /// session on a replica still there, which lets its streams finish).
    reached: HashMap<Key, (String, Instant)>,
    /// Dials under way (connecting, or waiting for the replica to say who
    /// it is): a GOAWAY `replaced` may come from one of them.
    dialing: usize,
    /// Sessions replaced while a dial of ours was under way: our own new
    /// session, unless none lands on that replica within `OWN_REPLACE_WAIT`.
    replaced: Vec<Replaced>,
}

/// A session replaced by a session not (yet) known to be ours.
struct Replaced {
    key: Key,
    replica: String,
    at: Instant,
}

impl State {
    /// Whether `key` is an address of the server URL's name that no
    /// session has stood for yet.
    fn unproven_url_addr(&self, key: &Key) -> bool {
        matches!(key, Key::Addr(a) if self.url_addrs.contains(a) && !self.url_addrs_held.contains(a))
    }

    /// Whether a live session stands for `key`.
    fn covered(&self, key: &Key) -> bool {
        let reached = self
            .reached
            .get(key)
            .filter(|(_, at)| at.elapsed() < FORGET_AFTER)
            .map(|(id, _)| id.as_str());
        self.live.values().any(|l| l.covers(key, reached))
    }
}

/// How a session ended, as the supervisor needs it.
pub(crate) struct Ended {
    /// GOAWAY code the server sent, if any.
    pub(crate) goaway: Option<ErrorCode>,
    /// How long the session was up.
    pub(crate) lasted: Duration,
}

/// The view of replicas and the sessions to them.
#[derive(Clone)]
pub(crate) struct Supervisor {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
}

/// The numbers for `/metrics` and `/readyz`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts {
    /// Sessions up and taking opens.
    pub(crate) sessions: usize,
    /// Replicas wanted but not held.
    pub(crate) missing: usize,
    /// Why the last dial of one of them failed, if one did.
    pub(crate) last_error: Option<String>,
}

impl Supervisor {
    pub(crate) fn new() -> Supervisor {
        Supervisor {
            state: Arc::default(),
            wake: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at the view again now.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits for the next look.
    pub(crate) async fn tick(&self) {
        let _ = tokio::time::timeout(TICK, self.wake.notified()).await;
    }

    /// Sessions up, and replicas missing.
    pub(crate) fn counts(&self) -> Counts {
        let st = self.lock();
        let wanted = wanted(&st);
        let missing: Vec<&Key> = wanted
            .iter()
            .filter(|k| !st.left.contains_key(*k) && !st.unproven_url_addr(k) && !st.covered(k))
            .collect();
        let last_error = missing
            .iter()
            .filter_map(|k| st.targets.get(*k))
            .find(|t| t.failures > 0 && !t.last_error.is_empty())
            .map(|t| t.last_error.clone());
        let sessions = st
            .live
            .values()
            .filter(|l| !l.conn.is_closed() && !l.conn.is_draining())
            .count();
        Counts {
            sessions,
            missing: missing.len(),
            last_error,
        }
    }

    /// Records the server URL's addresses (several: each is a replica).
    pub(crate) fn set_url_addrs(&self, addrs: Vec<SocketAddr>) {
        let mut st = self.lock();
        st.url_addrs = if addrs.len() > 1 { addrs } else { vec![] };
        let st = &mut *st;
        st.url_addrs_held.retain(|a| st.url_addrs.contains(a));
    }

    /// The keys to dial now (marked busy): missing from the held set, not
    /// dialing already, and past their backoff.
    pub(crate) fn due(&self) -> Vec<Key> {
        let mut st = self.lock();
        if st.stopping {
            return vec![];
        }
        let now = Instant::now();
        // Refresh the view from what live sessions advertise.
        let mut advertised: Vec<(Key, String)> = vec![];
        for l in st.live.values() {
            if l.conn.is_closed() {
                continue;
            }
            if let Some(r) = l.conn.peer_replicas().borrow().as_ref() {
                advertised.extend(
                    r.entries
                        .iter()
                        .take(MAX_ADVERTISED)
                        .filter_map(|e| Some((key_of(e)?, e.id.clone()))),
                );
            }
        }
        advertised.extend(st.url_addrs.iter().map(|a| (Key::Addr(*a), String::new())));
        let holding = st.live.values().any(|l| !l.conn.is_closed());
        for (k, id) in advertised {
            // Another replica at the address of one that left: a new
            // replica to hold, not the old one coming back.
            if st
                .left
                .get(&k)
                .is_some_and(|gone| !id.is_empty() && *gone != id)
            {
                st.left.remove(&k);
            }
            let new = !st.view.contains_key(&k);
            if new && st.view.len() >= MAX_VIEW {
                // Full: the replica advertised longest ago makes room; if
                // every one was advertised this time, the new one waits.
                let stalest = st
                    .view
                    .iter()
                    .filter(|(_, s)| s.last < now)
                    .min_by_key(|(_, s)| s.last)
                    .map(|(k, _)| k.clone());
                let Some(old) = stalest else { continue };
                st.view.remove(&old);
            }
            st.view.insert(k.clone(), Seen { last: now });
            if new && holding {
                // Spread the first dial of a replica that just appeared.
                let spread = rand::random_range(0..FIRST_DIAL_SPREAD.as_millis() as u64);
                target(&mut st.targets, &k, now).next_attempt = now + Duration::from_millis(spread);
            }
        }
        st.view
            .retain(|_, s| now.duration_since(s.last) < FORGET_AFTER);
        st.reached
            .retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
        // What the view forgot needs no dial state and no "left" mark.
        let st = &mut *st;
        st.left.retain(|k, _| st.view.contains_key(k));
        st.targets
            .retain(|k, t| t.busy || *k == Key::Url || st.view.contains_key(k));
        // A replacement no dial of ours turned out to be: another process
        // with our name and instance.
        let (theirs, waiting): (Vec<Replaced>, Vec<Replaced>) = std::mem::take(&mut st.replaced)
            .into_iter()
            .partition(|r| now.duration_since(r.at) >= OWN_REPLACE_WAIT);
        st.replaced = waiting;
        for r in theirs {
            replaced_by_another(&r.key);
            target(&mut st.targets, &r.key, now).next_attempt = now + REPLACED_RETRY;
        }
        let wanted = wanted(st);
        let mut due = vec![];
        for k in wanted {
            if st.covered(&k) {
                if let Key::Addr(a) = k {
                    if st.url_addrs.contains(&a) {
                        st.url_addrs_held.insert(a);
                    }
                }
                continue;
            }
            let t = target(&mut st.targets, &k, now);
            if !t.busy && now >= t.next_attempt {
                t.busy = true;
                due.push(k);
            }
        }
        st.dialing += due.len();
        due
    }

    /// A dial of `key` failed because of `why`; returns whether this is
    /// the first failure in a row or a new reason (worth a warning; the
    /// rest are logged at debug). A server that comes back refusing the
    /// token is not hidden behind the "connection refused" of its restart.
    pub(crate) fn failed(&self, key: &Key, why: &str) -> bool {
        let mut st = self.lock();
        st.dialing = st.dialing.saturating_sub(1);
        // (An address of the URL no session stood for may never answer,
        // and a replica that left may be gone for good: the full backoff,
        // not the advertised cap.)
        let advertised =
            st.view.contains_key(key) && !st.unproven_url_addr(key) && !st.left.contains_key(key);
        let t = target(&mut st.targets, key, Instant::now());
        t.busy = false;
        t.failures += 1;
        let new_reason = t.last_error != why;
        if new_reason {
            t.last_error = why.to_owned();
        }
        let first = t.failures == 1 || new_reason;
        let delay = if advertised {
            t.backoff.next_delay_within(ADVERTISED_BACKOFF_CAP)
        } else {
            t.backoff.next_delay()
        };
        t.next_attempt = Instant::now() + delay;
        first
    }

    /// A session for `key` is up (`dialed`: the key whose dial brought it,
    /// which differs when a search through the load balancer landed
    /// elsewhere); returns its slot.
    pub(crate) fn up(&self, key: &Key, dialed: &Key, conn: Connection) -> u64 {
        let mut st = self.lock();
        st.dialing = st.dialing.saturating_sub(1);
        if st.stopping {
            // Dialed before the shutdown, up after its GOAWAYs went out.
            conn.go_away(ErrorCode::Normal, "agent shutting down");
        }
        if let Some(t) = st.targets.get_mut(key) {
            t.failures = 0;
        }
        if let Some(id) = conn
            .peer_replicas()
            .borrow()
            .as_ref()
            .and_then(|r| r.this())
            .map(|t| t.id.clone())
            .filter(|id| !id.is_empty())
        {
            // A session of ours replaced on this replica was replaced by
            // this one: nothing to wait for, and its key is covered.
            st.replaced.retain(|r| r.replica != id);
            if key == dialed {
                st.reached.insert(key.clone(), (id, Instant::now()));
            }
        }
        st.left.remove(key);
        let slot = st.next_slot;
        st.next_slot += 1;
        st.all.retain(|c| !c.is_closed());
        st.all.push(conn.clone());
        st.live.insert(
            slot,
            Live {
                key: key.clone(),
                conn,
            },
        );
        drop(st);
        self.wake();
        slot
    }

    /// The session in `slot` stopped taking opens (drained or lost).
    pub(crate) fn down(&self, slot: u64, ended: Ended) {
        let mut st = self.lock();
        let Some(live) = st.live.remove(&slot) else {
            return;
        };
        let now = Instant::now();
        let this = live.this();
        // Another of our sessions reaches the same replica: this one was a
        // duplicate (a landing through the load balancer), nothing to redo.
        let duplicate = this.as_ref().is_some_and(|t| {
            st.live
                .values()
                .any(|l| l.this().is_some_and(|o| o.id == t.id && !o.id.is_empty()))
        });
        if ended.goaway == Some(ErrorCode::Leaving) {
            tracing::info!(key = %live.key, replica = ?this.as_ref().map(|t| &t.id), "replica is leaving");
            // Forgotten unless a live session still advertises it (a
            // restart at the same address), and not dialed at once.
            let id = this.as_ref().map(|t| t.id.clone()).unwrap_or_default();
            if let Some(k) = this.as_ref().and_then(key_of) {
                st.view.remove(&k);
                st.left.insert(k, id.clone());
            }
            if matches!(live.key, Key::Addr(_)) {
                st.left.insert(live.key.clone(), id);
            }
        }
        let advertised = st.view.contains_key(&live.key);
        // Replaced while a dial of ours is under way: most likely by that
        // dial, which has not said yet which replica it reached (judged in
        // `due`).
        let maybe_ours = match (&this, ended.goaway) {
            (Some(t), Some(ErrorCode::Replaced)) if !duplicate && st.dialing > 0 => {
                st.replaced.push(Replaced {
                    key: live.key.clone(),
                    replica: t.id.clone(),
                    at: now,
                });
                true
            }
            _ => false,
        };
        let t = target(&mut st.targets, &live.key, now);
        t.busy = false;
        if ended.lasted >= tether_net::reconnect::HEALTHY_SESSION {
            t.backoff.reset();
        }
        let delay = match ended.goaway {
            Some(ErrorCode::Replaced) if duplicate => {
                tracing::debug!(key = %live.key, "a newer session of ours to the same replica took over");
                Duration::ZERO
            }
            Some(ErrorCode::Replaced) if maybe_ours => {
                tracing::debug!(key = %live.key, "replaced while a dial of ours is under way");
                OWN_REPLACE_WAIT
            }
            Some(ErrorCode::Replaced) => {
                replaced_by_another(&live.key);
                REPLACED_RETRY
            }
            Some(ErrorCode::Leaving) => {
                t.backoff.reset();
                t.backoff.next_delay()
            }
            Some(ErrorCode::Normal) => {
                t.backoff.reset();
                Duration::ZERO
            }
            _ if advertised => t.backoff.next_delay_within(ADVERTISED_BACKOFF_CAP),
            _ => t.backoff.next_delay(),
        };
        if let Some(t) = st.targets.get_mut(&live.key) {
            t.next_attempt = now + delay;
        }
        drop(st);
        self.wake();
    }

    /// The ids of the replicas this agent holds a live session to (at most
    /// [`MAX_HELD_IDS`]), for the `X-Tether-Held` header of its next dial.
    pub(crate) fn held_replicas(&self) -> Vec<String> {
        let st = self.lock();
        let mut ids: Vec<String> = st
            .live
            .values()
            .filter(|l| !l.conn.is_closed() && !l.conn.is_draining())
            .filter_map(|l| l.this().map(|t| t.id))
            .filter(|id| fits_held_header(id))
            .collect();
        ids.sort();
        ids.dedup();
        ids.truncate(MAX_HELD_IDS);
        ids
    }

    /// Where to dial `key` this time: its address, or (`None`) the server
    /// URL. A replica whose address failed twice in a row is looked for
    /// through the URL every other attempt: an agent outside the servers'
    /// network cannot reach pod addresses, but the load balancer can.
    /// A replica that said it is leaving is dialed at its address only:
    /// no search through the load balancer can find it (each would be a
    /// handshake on a replica we hold, answered 409), while a restart
    /// comes back at its address.
    pub(crate) fn route(&self, key: &Key) -> Option<SocketAddr> {
        let Key::Addr(a) = key else { return None };
        let st = self.lock();
        let failures = st.targets.get(key).map_or(0, |t| t.failures);
        (failures < 2 || failures % 2 == 1 || st.left.contains_key(key)).then_some(*a)
    }

    /// A dial through the URL for `key` landed on another replica: look
    /// again in a moment.
    pub(crate) fn landed_elsewhere(&self, key: &Key) {
        let mut st = self.lock();
        let t = target(&mut st.targets, key, Instant::now());
        t.busy = false;
        t.failures += 1;
        t.next_attempt =
            Instant::now() + Duration::from_millis(rand::random_range(LB_RETRY.0..LB_RETRY.1));
    }

    /// A dial of `key` (to `connect_to`, or through the URL) was refused
    /// by `replica` because we hold it already (version 9). Dialed at the
    /// key's own address, that address is the replica we hold: it counts
    /// as held, as if a session had landed there, and is checked again
    /// after a while. Through the URL, it is a search that landed
    /// elsewhere.
    pub(crate) fn landed_on_held(
        &self,
        key: &Key,
        connect_to: Option<SocketAddr>,
        replica: Option<&str>,
    ) {
        let at_its_address = matches!(key, Key::Addr(a) if connect_to == Some(*a));
        {
            let mut st = self.lock();
            st.dialing = st.dialing.saturating_sub(1);
            match replica.filter(|id| !id.is_empty()) {
                Some(id) if at_its_address => {
                    st.reached
                        .insert(key.clone(), (id.to_owned(), Instant::now()));
                    let t = target(&mut st.targets, key, Instant::now());
                    t.busy = false;
                    t.failures = 0;
                }
                _ => {
                    drop(st);
                    self.landed_elsewhere(key);
                }
            }
        }
        self.wake();
    }

    /// Stops dialing; returns every session not yet closed.
    pub(crate) fn stop(&self) -> Vec<Connection> {
        let mut st = self.lock();
        st.stopping = true;
        st.all.retain(|c| !c.is_closed());
        st.all.clone()
    }

    /// Whether [`Supervisor::stop`] was called.
    pub(crate) fn stopping(&self) -> bool {
        self.lock().stopping
    }
}

/// Another agent process with our name and instance took the session for
/// `key`: it is dialed again only after `REPLACED_RETRY` (they would flap).
fn replaced_by_another(key: &Key) {
    tracing::error!(%key, "another agent process with this name and instance id replaced this session; retrying in {REPLACED_RETRY:?} (give each agent process its own --instance)");
}

/// What to dial for an advertised replica.
fn key_of(e: &ReplicaEntry) -> Option<Key> {
    if let Ok(a) = e.addr.parse::<SocketAddr>() {
        return Some(Key::Addr(a));
    }
    (!e.id.is_empty()).then(|| Key::Id(e.id.clone()))
}

/// The replicas to hold: the view; the URL when nothing is held (or the
/// servers advertise nothing).
fn wanted(st: &State) -> Vec<Key> {
    let mut keys: Vec<Key> = st.view.keys().cloned().collect();
    let holding = st
        .live
        .values()
        .any(|l| !l.conn.is_closed() && !l.conn.is_draining());
    if keys.is_empty() || !holding {
        keys.push(Key::Url);
    }
    keys
}

fn target<'a>(targets: &'a mut HashMap<Key, Target>, key: &Key, now: Instant) -> &'a mut Target {
    targets.entry(key.clone()).or_insert_with(|| Target {
        backoff: Backoff::default(),
        next_attempt: now,
        busy: false,
        failures: 0,
        last_error: String::new(),
    })
}

/// Whether a replica id can be listed in `X-Tether-Held`: a replica's own
/// id is 1-200 visible ASCII characters without a comma. One that is not
/// (a control character in a replica's list) would make every later dial's
/// header invalid, and the agent unable to reconnect anywhere.
fn fits_held_header(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_net::transport::mem;
    use tether_proto::Replicas;

    fn entry(id: &str, addr: &str, this: bool) -> ReplicaEntry {
        ReplicaEntry {
            id: id.into(),
            addr: addr.into(),
            this,
        }
    }

    /// The server side lists `entries`; returns once the agent side has it.
    async fn announce(
        agent: &Connection,
        server: &Connection,
        generation: u64,
        entries: Vec<ReplicaEntry>,
    ) {
        server.announce_replicas(Replicas {
            generation,
            entries,
        });
        agent
            .peer_replicas()
            .wait_for(|r| r.as_ref().is_some_and(|r| r.generation == generation))
            .await
            .unwrap();
    }

    /// An agent's session to a server that lists `entries`: (agent side,
    /// server side).
    async fn session(entries: Vec<ReplicaEntry>) -> (Connection, Connection) {
        let ((agent, _), (server, _)) = mem::sessions().await.unwrap();
        announce(&agent, &server, 1, entries).await;
        (agent, server)
    }

    #[test]
    fn held_ids_are_header_safe() {
        assert!(fits_held_header("tether-server-0"));
        assert!(!fits_held_header(""));
        assert!(!fits_held_header("a,b"));
        assert!(!fits_held_header("a\nb"));
        assert!(!fits_held_header("a b"));
        assert!(!fits_held_header("caf\u{e9}"));
    }

    /// A dial failing again for the same reason is not worth another
    /// warning; for a new reason it is (a server back from a restart that
    /// now refuses the token).
    #[test]
    fn a_new_reason_to_fail_is_a_warning_again() {
        let sup = Supervisor::new();
        let key = Key::Url;
        assert_eq!(sup.counts().last_error, None);
        assert!(sup.failed(&key, "connection refused"));
        // The missing replicas' warning can say why.
        assert_eq!(sup.counts().missing, 1);
        assert_eq!(
            sup.counts().last_error.as_deref(),
            Some("connection refused")
        );
        assert!(!sup.failed(&key, "connection refused"));
        assert!(sup.failed(&key, "HTTP 401: invalid agent token"));
        assert!(!sup.failed(&key, "HTTP 401: invalid agent token"));
    }

    /// A session that advertises a fresh list of 64 replicas at every look
    /// grows the view to at most `MAX_VIEW`, not by 64 a look for a minute.
    #[tokio::test]
    async fn a_changing_list_cannot_grow_the_view_without_bound() {
        let list = |round: u16| -> Vec<ReplicaEntry> {
            let mut v = vec![entry("r0", "127.0.0.1:7000", true)];
            v.extend((1..64u16).map(|i| {
                entry(
                    &format!("r{round}-{i}"),
                    &format!("127.0.{}.{i}:7000", round + 1),
                    false,
                )
            }));
            v
        };
        let key = Key::Addr("127.0.0.1:7000".parse().unwrap());
        let sup = Supervisor::new();
        let (agent, server) = session(list(0)).await;
        let _slot = sup.up(&key, &key, agent.clone());
        for round in 0..6u16 {
            announce(&agent, &server, u64::from(round) + 2, list(round)).await;
            let _ = sup.due();
            assert!(
                sup.lock().view.len() <= MAX_VIEW,
                "round {round}: {}",
                sup.lock().view.len()
            );
        }
        assert_eq!(sup.lock().view.len(), MAX_VIEW);
        // This look's list is all in the view: the newest win.
        assert!(sup
            .lock()
            .view
            .contains_key(&Key::Addr("127.0.6.9:7000".parse().unwrap())));
    }

    /// The server URL's name has an A and an AAAA record, and this agent
    /// reaches only the first: the other is dialed, with the full backoff,
    /// but is not a missing replica (the agent would never be ready). Once
    /// a session has stood for an address, losing it is missing again.
    #[tokio::test]
    async fn an_address_of_the_url_never_reached_is_not_missing() {
        let v4: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::10]:7001".parse().unwrap();
        let sup = Supervisor::new();
        sup.set_url_addrs(vec![v4, v6]);
        let (s, _server) = session(vec![entry("r1", "10.0.0.1:7001", true)]).await;
        let key4 = Key::Addr(v4);
        let slot = sup.up(&key4, &key4, s);
        let _ = sup.due();
        assert!(sup.lock().view.contains_key(&Key::Addr(v6)), "not dialed");
        assert_eq!(sup.counts().missing, 0, "an address never held is missing");
        // Its dials back off past the advertised replicas' 2 s cap.
        let mut longest = Duration::ZERO;
        for _ in 0..10 {
            sup.failed(&Key::Addr(v6), "network unreachable");
            let next = sup.lock().targets[&Key::Addr(v6)].next_attempt;
            longest = longest.max(next.saturating_duration_since(Instant::now()));
        }
        assert!(longest > ADVERTISED_BACKOFF_CAP, "{longest:?}");
        // The address that was held is missing once its session is lost.
        sup.down(
            slot,
            Ended {
                goaway: None,
                lasted: Duration::from_secs(100),
            },
        );
        let _ = sup.due();
        assert!(sup.counts().missing >= 1);
    }

    /// A replica that said it is leaving, still listed by the others, is
    /// dialed at its address only (never searched for through the load
    /// balancer) and with the full backoff, not every 2 s.
    #[tokio::test]
    async fn a_departed_replica_is_dialed_at_its_address_and_backs_off() {
        let (a, b) = ("127.0.0.1:7001", "127.0.0.1:7002");
        let (key_a, key_b) = (Key::Addr(a.parse().unwrap()), Key::Addr(b.parse().unwrap()));
        let sup = Supervisor::new();
        let (s1, _server1) = session(vec![entry("r1", a, true), entry("r2", b, false)]).await;
        let _slot1 = sup.up(&key_a, &key_a, s1);
        let (s2, _server2) = session(vec![entry("r2", b, true), entry("r1", a, false)]).await;
        let slot2 = sup.up(&key_b, &key_b, s2);
        let _ = sup.due();
        sup.down(
            slot2,
            Ended {
                goaway: Some(ErrorCode::Leaving),
                lasted: Duration::from_secs(100),
            },
        );
        let _ = sup.due();
        let mut longest = Duration::ZERO;
        for _ in 0..10 {
            sup.failed(&key_b, "connection refused");
            assert_eq!(sup.route(&key_b), Some(b.parse().unwrap()));
            let next = sup.lock().targets[&key_b].next_attempt;
            longest = longest.max(next.saturating_duration_since(Instant::now()));
        }
        assert!(longest > ADVERTISED_BACKOFF_CAP, "{longest:?}");
    }

    /// A replica that left is not "missing" while the others still list
    /// it (it may come back at its address); a new replica advertised at
    /// that address is, until it is held.
    #[tokio::test]
    async fn a_new_replica_at_a_departed_replicas_address_is_missing() {
        let (a, b) = ("127.0.0.1:7001", "127.0.0.1:7002");
        let (key_a, key_b) = (Key::Addr(a.parse().unwrap()), Key::Addr(b.parse().unwrap()));
        let sup = Supervisor::new();
        let (s1, server1) = session(vec![entry("r1", a, true), entry("r2", b, false)]).await;
        let _slot1 = sup.up(&key_a, &key_a, s1.clone());
        let (s2, _server2) = session(vec![entry("r2", b, true), entry("r1", a, false)]).await;
        let slot2 = sup.up(&key_b, &key_b, s2);
        let _ = sup.due();
        assert_eq!(sup.counts().missing, 0);
        sup.down(
            slot2,
            Ended {
                goaway: Some(ErrorCode::Leaving),
                lasted: Duration::from_secs(100),
            },
        );
        let _ = sup.due();
        assert_eq!(sup.counts().missing, 0, "r2 left: not missing");
        announce(
            &s1,
            &server1,
            2,
            vec![entry("r1", a, true), entry("r3", b, false)],
        )
        .await;
        let _ = sup.due();
        assert_eq!(
            sup.counts().missing,
            1,
            "r3 at r2's address is a replica not held"
        );
    }
}
