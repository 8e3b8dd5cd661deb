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
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Where a live stream's byte counts come from.
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
    /// Notified when the stream must end (its access was revoked).
    revoked: Arc<Notify>,
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
    ) -> (u64, Arc<Notify>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(Notify::new());
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

    /// Every live stream, oldest first.
    pub(crate) fn list(&self) -> Vec<StreamView> {
        let mut v: Vec<StreamView> = self
            .lock()
            .iter()
            .map(|(key, s)| {
                let (bytes_up, bytes_down) = s.traffic.bytes();
                let (who, kind) = match &s.owner {
                    StreamOwner::Client(id) => (id.name.clone(), "client"),
                    StreamOwner::Listener(name) => (name.to_string(), "listener"),
                };
                StreamView {
                    key: *key,
                    who,
                    kind,
                    agent: s.agent.clone(),
                    service: s.service.clone(),
                    protocol: s.protocol.as_str(),
                    since: s.since,
                    age_secs: s.started.elapsed().as_secs_f64(),
                    bytes_up,
                    bytes_down,
                }
            })
            .collect();
        v.sort_by_key(|s| s.key);
        v
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
                s.revoked.notify_one();
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
/// notified (a reload took its access away), or `expires_at` (its JWT's
/// `exp`) passed. Without either it never resolves.
pub(crate) fn ended(
    revoked: Option<Arc<Notify>>,
    expires_at: Option<Instant>,
) -> Pin<Box<dyn Future<Output = &'static str> + Send>> {
    Box::pin(async move {
        let expiry = async {
            match expires_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let revocation = async {
            match &revoked {
                Some(r) => r.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = revocation => ACCESS_REVOKED,
            _ = expiry => CREDENTIAL_EXPIRED,
        }
    })
}
