//! Live relayed streams: what the admin API lists, and their revocation.
//!
//! Every stream the server relays for a client identity or a `[[listener]]`
//! (CLI and SOCKS streams, raw WebSockets, HTTP requests whose responses are
//! still streaming, WebSockets upgraded through the proxy, listener
//! connections and UDP flows) has an entry here for its whole life, so the
//! admin API can list it ([`Streams::list`]) and a reload can check a
//! client's against the new credentials and policy ([`Streams::enforce`])
//! and end it. Entries are added and removed by the open path's guard
//! ([`crate::open::OpenGuard`]); what ends a stream is [`ended`].

use foldhash::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tether_net::Connection;
use tether_proto::StreamId;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::auth::Revalidation;
use crate::config::Protocol;
use crate::identity::ClientIdentity;

/// Why a tracked stream must end (see [`ended`]).
pub(crate) const ACCESS_REVOKED: &str = "access revoked by the server's configuration";
/// Why a tracked stream of an expired JWT identity ends.
pub(crate) const CREDENTIAL_EXPIRED: &str = "credential expired";
/// Why what a browser login opened ends when it signs out.
pub(crate) const SIGNED_OUT: &str = "the browser login ended (signed out)";

/// Where a live stream's byte counts come from.
#[derive(Clone)]
pub(crate) enum Traffic {
    /// A stream of an agent session: the session counts its bytes.
    OnSession(Connection, StreamId),
    /// Counted by whoever relays it (the HTTP proxy counts bodies).
    Counted(Arc<ByteCounts>),
}

/// Bytes relayed each way, counted by the relay.
#[derive(Debug, Default)]
pub(crate) struct ByteCounts {
    /// From the client towards the service.
    pub(crate) up: AtomicU64,
    /// From the service towards the client.
    pub(crate) down: AtomicU64,
}

impl Traffic {
    /// Bytes (up, down) so far; zero for a stream the session forgot.
    fn bytes(&self) -> (u64, u64) {
        match self {
            Traffic::OnSession(conn, id) => conn
                .stream_bytes(*id)
                .map_or((0, 0), |b| (b.sent, b.received)),
            Traffic::Counted(c) => (c.up.load(Ordering::Relaxed), c.down.load(Ordering::Relaxed)),
        }
    }
}

/// Who a live stream is for.
#[derive(Debug, Clone)]
pub(crate) enum StreamOwner {
    /// A client identity (re-checked against the policy on reload).
    Client(ClientIdentity),
    /// A `[[listener]]`, by name (`listener ADDR`); not revocable.
    Listener(Arc<str>),
}

/// One relayed stream.
struct LiveStream {
    owner: StreamOwner,
    agent: String,
    service: String,
    protocol: Protocol,
    since: SystemTime,
    started: Instant,
    traffic: Traffic,
    /// Set when the stream must end (its access was revoked).
    revoked: Arc<Revocation>,
}

/// Whether a stream's access was revoked, for every watch on it: a flag
/// with a wake-up, so a watch that starts after the reload sees it, and
/// two watches (a proxied request's body and its response) both do.
#[derive(Default, Debug)]
pub(crate) struct Revocation {
    revoked: AtomicBool,
    wake: Notify,
}

impl Revocation {
    /// The stream must end: every watch resolves, now and later.
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    /// Whether [`revoke`](Self::revoke) was called.
    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Resolves once `r` is revoked; never without one.
    pub(crate) async fn revoked_or_never(r: Option<&Revocation>) {
        match r {
            Some(r) => r.revoked().await,
            None => std::future::pending().await,
        }
    }

    /// Resolves once the stream is revoked.
    pub(crate) async fn revoked(&self) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            // Registered before the flag is read: a revoke in between wakes it.
            woken.as_mut().enable();
            if self.revoked.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }
}

impl LiveStream {
    /// What the admin API shows of it, with its byte counts (up, down).
    fn view(&self, key: u64, (bytes_up, bytes_down): (u64, u64)) -> StreamView {
        let (who, kind) = match &self.owner {
            StreamOwner::Client(id) => (id.name.clone(), "client"),
            StreamOwner::Listener(name) => (name.to_string(), "listener"),
        };
        StreamView {
            key,
            who,
            kind,
            agent: self.agent.clone(),
            service: self.service.clone(),
            protocol: self.protocol.as_str(),
            since: self.since,
            age_secs: self.started.elapsed().as_secs_f64(),
            bytes_up,
            bytes_down,
        }
    }
}

/// What the admin API shows of one live stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StreamView {
    /// Its key in the table (stable while it lives).
    pub(crate) key: u64,
    /// The identity's name, or `listener ADDR`.
    pub(crate) who: String,
    /// `client` or `listener`.
    pub(crate) kind: &'static str,
    /// The agent it goes to.
    pub(crate) agent: String,
    /// The service (or raw target) on that agent.
    pub(crate) service: String,
    /// `tcp`, `udp` or `http`.
    pub(crate) protocol: &'static str,
    /// When it was opened.
    pub(crate) since: SystemTime,
    /// How long it has been open, in seconds.
    pub(crate) age_secs: f64,
    /// Bytes from the client towards the service.
    pub(crate) bytes_up: u64,
    /// Bytes from the service towards the client.
    pub(crate) bytes_down: u64,
}

/// Every live stream.
#[derive(Default)]
pub(crate) struct Streams {
    /// Boxed values, as in `tether_proto::Session`'s stream map: every
    /// bucket, full or not, costs the value's size, and many are empty.
    map: Mutex<HashMap<u64, Box<LiveStream>>>,
    next: AtomicU64,
}

impl Streams {
    /// Adds a stream; returns its key (for [`Streams::remove`]) and what
    /// [`Streams::enforce`] notifies to end it.
    pub(crate) fn insert(
        &self,
        owner: StreamOwner,
        agent: &str,
        service: &str,
        protocol: Protocol,
        traffic: Traffic,
    ) -> (u64, Arc<Revocation>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(Revocation::default());
        self.lock().insert(
            key,
            Box::new(LiveStream {
                owner,
                agent: agent.to_owned(),
                service: service.to_owned(),
                protocol,
                since: SystemTime::now(),
                started: Instant::now(),
                traffic,
                revoked: revoked.clone(),
            }),
        );
        (key, revoked)
    }

    /// The `n` oldest live streams, oldest first, and how many are live:
    /// only the `n` views are built (the ids of all are looked at).
    pub(crate) fn oldest(&self, n: usize) -> (usize, Vec<StreamView>) {
        // The byte counts are read after letting go of the table, as in
        // `busiest`: a lock of each stream's session under the table's
        // lock would hold up every open and close while 100 000 are read.
        let (total, listed): (usize, Vec<(StreamView, Traffic)>) = {
            let streams = self.lock();
            let mut keys: Vec<u64> = streams.keys().copied().collect();
            if keys.len() > n {
                keys.select_nth_unstable(n);
                keys.truncate(n);
            }
            let listed = keys
                .into_iter()
                .filter_map(|key| {
                    let s = streams.get(&key)?;
                    Some((s.view(key, (0, 0)), s.traffic.clone()))
                })
                .collect();
            (streams.len(), listed)
        };
        let mut v: Vec<StreamView> = listed
            .into_iter()
            .map(|(mut view, traffic)| {
                (view.bytes_up, view.bytes_down) = traffic.bytes();
                view
            })
            .collect();
        v.sort_by_key(|s| s.key);
        (total, v)
    }

    /// The `n` live streams that carried the most bytes (up and down),
    /// busiest first (the oldest first among equals), and how many are
    /// live: the view of a few without building the view of all (an
    /// admin's console asks every 2 s, and a replica may hold 100 000).
    pub(crate) fn busiest(&self, n: usize) -> (usize, Vec<StreamView>) {
        use std::cmp::Reverse;
        // The byte counts live in the sessions (a lock and a lookup each):
        // read them after letting go of the table, which every open and
        // close takes.
        let counted: Vec<(u64, Traffic)> = self
            .lock()
            .iter()
            .map(|(key, s)| (*key, s.traffic.clone()))
            .collect();
        // The best `n` so far, the least busy on top: (bytes, newer first).
        let mut best = std::collections::BinaryHeap::with_capacity(n + 1);
        for (key, traffic) in &counted {
            let (up, down) = traffic.bytes();
            best.push(Reverse((up.saturating_add(down), Reverse(*key), up, down)));
            if best.len() > n {
                best.pop();
            }
        }
        // A stream that ended meanwhile is left out (and not counted).
        let streams = self.lock();
        let views = best
            .into_sorted_vec()
            .into_iter()
            .filter_map(|Reverse((_, Reverse(key), up, down))| {
                streams.get(&key).map(|s| s.view(key, (up, down)))
            })
            .collect();
        (streams.len(), views)
    }

    /// How many streams are live.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Forgets a stream.
    pub(crate) fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Ends every stream whose identity no longer holds or that `auth`'s
    /// policy no longer allows; returns how many.
    pub(crate) fn enforce(&self, check: &mut Revalidation) -> usize {
        let mut ended = 0;
        for s in self.lock().values() {
            let StreamOwner::Client(identity) = &s.owner else {
                continue;
            };
            let allowed = check.holds(identity)
                && check
                    .auth()
                    .decide(identity, &s.agent, &s.service, s.protocol)
                    .allowed;
            if !allowed {
                s.revoked.revoke();
                ended += 1;
            }
        }
        ended
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<LiveStream>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves, with the reason, when a stream must end: `revoked` was
/// notified (a reload took its access away), `signed_out` was (the browser
/// login it came with ended), or `expires_at` (its JWT's `exp`, or its
/// login's end) passed. Without any it never resolves.
pub(crate) fn ended(
    revoked: Option<Arc<Revocation>>,
    signed_out: Option<Arc<Revocation>>,
    expires_at: Option<Instant>,
) -> Pin<Box<dyn Future<Output = &'static str> + Send>> {
    Box::pin(async move {
        let signing_out = Revocation::revoked_or_never(signed_out.as_deref());
        let expiry = async {
            match expires_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let revocation = Revocation::revoked_or_never(revoked.as_deref());
        tokio::select! {
            _ = revocation => ACCESS_REVOKED,
            _ = signing_out => SIGNED_OUT,
            _ = expiry => CREDENTIAL_EXPIRED,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener's stream whose relay has counted `up` and `down` bytes.
    fn add(streams: &Streams, up: u64, down: u64) -> u64 {
        let counts = Arc::new(ByteCounts::default());
        counts.up.store(up, Ordering::Relaxed);
        counts.down.store(down, Ordering::Relaxed);
        let owner = StreamOwner::Listener("listener 127.0.0.1:1".into());
        let traffic = Traffic::Counted(counts);
        streams
            .insert(owner, "prod", "db", Protocol::Tcp, traffic)
            .0
    }

    #[test]
    fn the_busiest_streams_come_first_and_the_oldest_among_equals() {
        let streams = Streams::default();
        let quiet = add(&streams, 1, 0);
        let old_tie = add(&streams, 500, 500);
        let busiest = add(&streams, 10, 5_000);
        let new_tie = add(&streams, 1_000, 0);
        let _idle = add(&streams, 0, 0);
        let keys = |n| -> (usize, Vec<u64>) {
            let (total, views) = streams.busiest(n);
            (total, views.iter().map(|v| v.key).collect())
        };
        assert_eq!(keys(1), (5, vec![busiest]));
        assert_eq!(keys(2), (5, vec![busiest, old_tie]));
        assert_eq!(keys(3), (5, vec![busiest, old_tie, new_tie]));
        assert_eq!(keys(4), (5, vec![busiest, old_tie, new_tie, quiet]));
        assert_eq!(keys(100).1.len(), 5);
        let (_, views) = streams.busiest(1);
        assert_eq!((views[0].bytes_up, views[0].bytes_down), (10, 5_000));
        assert_eq!(views[0].who, "listener 127.0.0.1:1");
        streams.remove(busiest);
        assert_eq!(keys(1), (4, vec![old_tie]));
    }

    #[test]
    fn the_oldest_streams_come_first_and_only_as_many_as_asked() {
        let streams = Streams::default();
        let all: Vec<u64> = (0..50).map(|i| add(&streams, i, 2 * i)).collect();
        let (total, views) = streams.oldest(10);
        assert_eq!(total, 50);
        assert_eq!(views.iter().map(|v| v.key).collect::<Vec<_>>(), all[..10]);
        assert_eq!((views[3].bytes_up, views[3].bytes_down), (3, 6));
        let (total, views) = streams.oldest(1_000);
        assert_eq!((total, views.len()), (50, 50));
        assert_eq!(views.iter().map(|v| v.key).collect::<Vec<_>>(), all);
    }
}
