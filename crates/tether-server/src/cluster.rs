//! This replica among its peers: its id, the replica list agents are told
//! (REPLICAS frames), finding the peers (a static list, DNS), readiness,
//! and the phases of a shutdown.
//!
//! No replica talks to another: every agent keeps a session to every
//! replica (it learns them from this list), so any replica can serve any
//! client. See README "Running more than one server".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_net::dns::NameResolver;
use tether_proto::{ReplicaEntry, Replicas};
use tokio::sync::watch;

use crate::config::{ClusterConfig, StaticPeer};
use crate::registry::Registry;

/// How often agents of protocol versions 4 to 6 are told the list even when
/// it did not change (version 7 agents hold it for the session's life).
pub(crate) const REPLICAS_REFRESH: Duration = Duration::from_secs(30);

/// Readiness: at least this much uptime...
const READY_MIN_UPTIME: Duration = Duration::from_secs(2);
/// ...and no agent name new to this replica for this long...
const READY_QUIET: Duration = Duration::from_secs(3);
/// ...or this much uptime, whichever comes first.
const READY_MAX_WAIT: Duration = Duration::from_secs(15);

/// Opens wait for a missing agent while the replica is younger than this...
const HOLD_WHILE_STARTING: Duration = Duration::from_secs(60);
/// ...or when the agent's last session here ended less than this ago.
const HOLD_AFTER_LOSS: Duration = Duration::from_secs(15);
/// An agent seen here within this long is refused `not_here` (likely a
/// partition or a reconnect in progress), else `agent_offline`.
pub(crate) const NOT_HERE_WINDOW: Duration = Duration::from_secs(600);
/// Most opens waiting for an agent at once.
pub(crate) const MAX_HELD_OPENS: usize = 1024;

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving.
    Serving,
    /// SIGTERM came: not ready (load balancers stop sending new
    /// connections), everything still served.
    Leaving,
    /// Listeners closed, sessions told GOAWAY: live streams finish.
    Closing,
}

/// What `/readyz` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// 200: take clients.
    Ready,
    /// 503: agents are still arriving.
    Warming,
    /// 404: shutting down (HAProxy's `disable-on-404`: finish, take no new).
    Draining,
}

/// The query that asks `/readyz` to leave the shutdown delay out (as
/// kube-apiserver's `/readyz?exclude=shutdown` does): the replica answers
/// ready while it still accepts, and 404 only once its listeners close.
/// This is the Kubernetes readiness probe's question. Kubernetes marks a
/// terminating pod's endpoints not ready by itself, and keeps using them
/// while they are still *serving* (the probe passes) when a node has no
/// other: a Service with `externalTrafficPolicy: Local` would otherwise
/// drop the connections the cloud load balancer still sends that node
/// during the delay.
const EXCLUDE_SHUTDOWN: &str = "exclude=shutdown";

/// Whether a probe's query holds [`EXCLUDE_SHUTDOWN`] among its `&`-separated
/// parts.
fn excludes_shutdown(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|part| part == EXCLUDE_SHUTDOWN))
}

/// This replica's identity, its view of the peers and its phase.
pub(crate) struct Cluster {
    id: String,
    advertise: Option<SocketAddr>,
    started: Instant,
    replicas: watch::Sender<Replicas>,
    phase: watch::Sender<Phase>,
    agent_wait: Duration,
    held: AtomicUsize,
    config: ClusterConfig,
    /// Skip the shutdown delay (an operator's Ctrl-C, not an orchestrator).
    skip_delay: std::sync::atomic::AtomicBool,
}

/// A default replica id: the host name (a pod's name under Kubernetes)
/// and a random suffix, so two processes on one host differ.
fn default_replica_id() -> String {
    let host = tether_net::host::name().unwrap_or_else(|| "tether".to_owned());
    format!("{host}-{:04x}", rand::random::<u16>())
}

impl Cluster {
    /// The cluster view of a server listening on `listen`.
    pub(crate) fn new(cfg: &ClusterConfig, listen: SocketAddr) -> Cluster {
        let id = cfg.replica_id.clone().unwrap_or_else(default_replica_id);
        // A wildcard address, or port 0 (chosen at bind, as `tether demo`
        // does), is no address to dial: nothing is advertised then.
        let advertise = cfg
            .advertise
            .or_else(|| (!listen.ip().is_unspecified() && listen.port() != 0).then_some(listen));
        let this = Cluster {
            id,
            advertise,
            started: Instant::now(),
            replicas: watch::channel(Replicas::default()).0,
            phase: watch::channel(Phase::Serving).0,
            agent_wait: Duration::from_millis(cfg.agent_wait_ms),
            held: AtomicUsize::new(0),
            config: cfg.clone(),
            skip_delay: Default::default(),
        };
        let peers = cfg.static_peers().unwrap_or_default();
        if this.advertise.is_none()
            && (cfg.peers_dns.is_some() || peers.iter().any(|p| p.id.is_none()))
        {
            // Its own address among the peers then looks like another
            // replica: agents would dial it as one (and find it is us).
            tracing::warn!(%listen, "[cluster] advertise is not set and the listen address names no one IP: this replica cannot recognise its own address among the peers and lists it to agents as another replica; set advertise (under Kubernetes \"$(POD_IP):PORT\") or give each static peer its ID=");
        }
        this.set_peers(&peers, &[]);
        this
    }

    /// This replica's id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The replica list, as agents are told it; changes when peers come
    /// and go.
    pub(crate) fn replicas(&self) -> watch::Receiver<Replicas> {
        self.replicas.subscribe()
    }

    /// Replaces the peer list (static entries and addresses found by DNS);
    /// this replica is always in it, marked as the sender.
    fn set_peers(&self, statics: &[StaticPeer], found: &[SocketAddr]) {
        let mut entries = vec![ReplicaEntry {
            id: self.id.clone(),
            addr: self.advertise.map(|a| a.to_string()).unwrap_or_default(),
            this: true,
        }];
        let peers = statics
            .iter()
            .map(|p| (p.id.clone(), p.addr))
            .chain(found.iter().map(|a| (None, *a)));
        for (id, addr) in peers {
            let me = Some(addr) == self.advertise || id.as_deref() == Some(self.id.as_str());
            if me {
                continue;
            }
            if entries.iter().any(|e| e.addr == addr.to_string()) {
                continue;
            }
            entries.push(ReplicaEntry {
                id: id.unwrap_or_default(),
                addr: addr.to_string(),
                this: false,
            });
        }
        entries[1..].sort_by(|a, b| a.addr.cmp(&b.addr));
        self.replicas.send_if_modified(|r| {
            if r.entries == entries {
                return false;
            }
            r.generation += 1;
            r.entries = entries;
            tracing::info!(replicas = ?r.entries.iter().map(|e| if e.id.is_empty() { e.addr.clone() } else { format!("{}@{}", e.id, e.addr) }).collect::<Vec<_>>(), "replica list changed");
            true
        });
    }

    /// Follows `peers_dns` forever (when set): the static peers plus the
    /// name's addresses, resolved again every `peers_interval_ms`. A failed
    /// lookup keeps the last list (a stale view costs agents a few extra
    /// dials, a missing replica would cost clients errors).
    pub(crate) async fn discover(self: Arc<Self>) {
        let Ok(Some((name, port))) = self.config.peers_dns() else {
            return;
        };
        let statics = self.config.static_peers().unwrap_or_default();
        let resolver = match NameResolver::from_setting(self.config.dns_server.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("[cluster] dns_server: {e:#}; peers_dns not followed");
                return;
            }
        };
        let every = Duration::from_millis(self.config.peers_interval_ms.max(200));
        let mut failing = false;
        loop {
            match resolver.lookup(&name, port).await {
                Ok(found) => {
                    failing = false;
                    self.set_peers(&statics, &found);
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(%name, "peers_dns lookup failed ({e}); keeping the last replica list");
                }
                Err(_) => {}
            }
            tokio::time::sleep(every).await;
        }
    }

    /// How long this replica has been up.
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The current phase.
    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the phase is [`Phase::Closing`].
    pub(crate) async fn closing(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p == Phase::Closing).await;
    }

    /// Moves to a later phase.
    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// What `/readyz` answers: draining once shutdown began (with
    /// `during_delay`, only once the listeners closed); warming until the
    /// agents had a chance to arrive (≥ 2 s of uptime and no new agent name
    /// for 3 s, and with peers at least one agent; or 15 s of uptime).
    pub(crate) fn readiness(&self, registry: &Registry, during_delay: bool) -> Readiness {
        match self.phase() {
            Phase::Serving => {}
            Phase::Leaving if during_delay => {}
            Phase::Leaving | Phase::Closing => return Readiness::Draining,
        }
        let up = self.started.elapsed();
        if up >= READY_MAX_WAIT {
            return Readiness::Ready;
        }
        // A replica with peers that has seen no agent yet waits for one:
        // agents learn of a new replica only when a peer's list changes.
        let has_peers = self.replicas.borrow().entries.len() > 1;
        if has_peers && registry.last_new_name().is_none() {
            return Readiness::Warming;
        }
        // Quiet since the last agent name new here (or since the start).
        let quiet_since = registry.last_new_name().unwrap_or(self.started);
        if up >= READY_MIN_UPTIME && quiet_since.elapsed() >= READY_QUIET {
            Readiness::Ready
        } else {
            Readiness::Warming
        }
    }

    /// The answer to a health probe: `/healthz` and `/livez` (200 while the
    /// process runs, draining included), `/readyz` (see
    /// [`Cluster::readiness`]; [`EXCLUDE_SHUTDOWN`] in the query keeps it
    /// ready through the shutdown delay); `None` for other paths.
    pub(crate) fn probe(
        &self,
        path: &str,
        query: Option<&str>,
        registry: &Registry,
    ) -> Option<(u16, String)> {
        match path {
            "/healthz" | "/livez" => Some((200, "ok\n".to_owned())),
            "/readyz" => Some(match self.readiness(registry, excludes_shutdown(query)) {
                Readiness::Ready => (200, format!("ready: replica {}\n", self.id)),
                Readiness::Warming => (
                    503,
                    format!(
                        "replica {} is starting: agents are still connecting\n",
                        self.id
                    ),
                ),
                Readiness::Draining => (404, format!("replica {} is shutting down\n", self.id)),
            }),
            _ => None,
        }
    }

    /// Whether this replica started less than [`HOLD_WHILE_STARTING`] ago
    /// beside peers: agents learn of it only as its peers' lists change (a
    /// DNS re-resolve and the cluster DNS's TTL), so an agent it has not
    /// seen may well be connected to the others, and on its way here.
    pub(crate) fn new_among_peers(&self) -> bool {
        self.started.elapsed() < HOLD_WHILE_STARTING && self.replicas.borrow().entries.len() > 1
    }

    /// How long an open for `agent`, which has no live session here,
    /// should wait for one: the replica just started, or the agent's
    /// session here just ended (it is likely reconnecting). Zero when
    /// neither, or when too many opens already wait.
    pub(crate) fn hold_for(&self, registry: &Registry, agent: &str) -> Duration {
        let starting = self.started.elapsed() < HOLD_WHILE_STARTING;
        if starting || registry.seen_within(agent, HOLD_AFTER_LOSS) {
            self.agent_wait
        } else {
            Duration::ZERO
        }
    }

    /// A slot among the opens waiting for an agent; `None` when full.
    pub(crate) fn take_hold(self: &Arc<Self>) -> Option<HeldOpen> {
        if self.held.fetch_add(1, Ordering::Relaxed) >= MAX_HELD_OPENS {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(HeldOpen(self.clone()))
    }

    /// The drain settings: the shutdown delay and the drain timeout.
    pub(crate) fn drain_timers(&self) -> (Duration, Duration) {
        let delay = if self.skip_delay.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            Duration::from_millis(self.config.shutdown_delay_ms)
        };
        (delay, Duration::from_millis(self.config.drain_timeout_ms))
    }

    /// The coming shutdown skips the delay.
    pub(crate) fn skip_shutdown_delay(&self) {
        self.skip_delay.store(true, Ordering::Relaxed);
    }
}

/// One open waiting for its agent (see [`Cluster::take_hold`]).
pub(crate) struct HeldOpen(Arc<Cluster>);

impl Drop for HeldOpen {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(peers: &[&str]) -> Cluster {
        let cfg = ClusterConfig {
            replica_id: Some("r1".into()),
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        };
        Cluster::new(&cfg, "127.0.0.11:8443".parse().unwrap())
    }

    #[test]
    fn a_port_chosen_at_bind_is_not_advertised() {
        let c = Cluster::new(&ClusterConfig::default(), "127.0.0.1:0".parse().unwrap());
        let r = c.replicas().borrow().clone();
        assert!(r.this().is_none_or(|t| t.addr.is_empty()), "{r:?}");
    }

    #[test]
    fn the_list_holds_this_replica_once_and_its_peers() {
        let c = cluster(&["127.0.0.11:8443", "r2=127.0.0.12:8443"]);
        let r = c.replicas().borrow().clone();
        assert_eq!(r.generation, 1);
        let this = r.this().unwrap();
        assert_eq!(
            (this.id.as_str(), this.addr.as_str()),
            ("r1", "127.0.0.11:8443")
        );
        assert_eq!(r.entries.len(), 2, "{r:?}");
        assert_eq!(r.entries[1].id, "r2");
        // DNS finds a third; the same list again is no change.
        let statics = c.config.static_peers().unwrap();
        let found: Vec<SocketAddr> = vec!["127.0.0.13:8443".parse().unwrap()];
        c.set_peers(&statics, &found);
        c.set_peers(&statics, &found);
        let r = c.replicas().borrow().clone();
        assert_eq!(r.generation, 2);
        assert_eq!(r.entries.len(), 3);
    }

    #[test]
    fn readiness_waits_for_agents_and_ends_with_the_phase() {
        let c = cluster(&[]);
        let reg = Registry::default();
        assert_eq!(c.readiness(&reg, false), Readiness::Warming);
        c.set_phase(Phase::Leaving);
        assert_eq!(c.readiness(&reg, false), Readiness::Draining);
    }

    #[test]
    fn excluding_shutdown_keeps_ready_through_the_delay_only() {
        let c = cluster(&[]);
        let reg = Registry::default();
        let status = |q: Option<&str>| c.probe("/readyz", q, &reg).map(|(s, _)| s);
        // Warming is warming either way.
        assert_eq!(status(Some("exclude=shutdown")), Some(503));
        let mut c = cluster(&[]);
        c.started = Instant::now()
            .checked_sub(READY_MAX_WAIT)
            .expect("a clock 15 s past its origin");
        let status = |q: Option<&str>| c.probe("/readyz", q, &reg).map(|(s, _)| s);
        assert_eq!(status(None), Some(200));
        c.set_phase(Phase::Leaving);
        assert_eq!(status(None), Some(404));
        assert_eq!(status(Some("exclude=shutdown")), Some(200));
        assert_eq!(status(Some("verbose&exclude=shutdown")), Some(200));
        assert_eq!(status(Some("exclude=shutdownx")), Some(404));
        assert_eq!(status(Some("exclude")), Some(404));
        c.set_phase(Phase::Closing);
        assert_eq!(status(Some("exclude=shutdown")), Some(404));
        assert_eq!(
            c.probe("/livez", Some("exclude=shutdown"), &reg)
                .map(|(s, _)| s),
            Some(200)
        );
    }
}
