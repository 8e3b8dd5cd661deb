//! The agent's live counters, which its `/metrics` renders.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Live counters of the agent (exported as metrics).
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Streams currently connected to services.
    pub live_streams: AtomicI64,
    /// Streams ever accepted.
    pub streams_total: AtomicU64,
    /// Opens refused (policy, dial failure).
    pub open_errors: AtomicU64,
    /// 1 while a session to the server is up.
    pub connected: AtomicI64,
    /// Sessions to server replicas that take opens.
    pub replica_sessions: AtomicI64,
    /// Replicas known but not held.
    pub replicas_missing: AtomicI64,
    /// Sessions established.
    pub sessions_total: AtomicU64,
    /// UDP flows.
    pub udp: tether_net::udp::UdpStats,
    /// Services Kubernetes discovery publishes now.
    pub discovered_services: AtomicI64,
    /// Watched namespaces whose last list or watch failed (discovery keeps
    /// what it published before, which may be stale).
    pub discovery_failing: AtomicI64,
    /// Failed lists and watches of Kubernetes discovery.
    pub discovery_errors: AtomicU64,
}

impl AgentStats {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        format!(
            "# TYPE tether_agent_connected gauge\ntether_agent_connected {}\n\
             # TYPE tether_agent_live_streams gauge\ntether_agent_live_streams {}\n\
             # TYPE tether_agent_streams_total counter\ntether_agent_streams_total {}\n\
             # TYPE tether_agent_open_errors_total counter\ntether_agent_open_errors_total {}\n\
             # TYPE tether_agent_sessions_total counter\ntether_agent_sessions_total {}\n\
             # TYPE tether_agent_replica_sessions gauge\ntether_agent_replica_sessions {}\n\
             # TYPE tether_agent_replicas_missing gauge\ntether_agent_replicas_missing {}\n\
             # TYPE tether_agent_discovered_services gauge\ntether_agent_discovered_services {}\n\
             # TYPE tether_agent_discovery_namespaces_failing gauge\ntether_agent_discovery_namespaces_failing {}\n\
             # TYPE tether_agent_discovery_errors_total counter\ntether_agent_discovery_errors_total {}\n",
            self.connected.load(Ordering::Relaxed),
            self.live_streams.load(Ordering::Relaxed),
            self.streams_total.load(Ordering::Relaxed),
            self.open_errors.load(Ordering::Relaxed),
            self.sessions_total.load(Ordering::Relaxed),
            self.replica_sessions.load(Ordering::Relaxed),
            self.replicas_missing.load(Ordering::Relaxed),
            self.discovered_services.load(Ordering::Relaxed),
            self.discovery_failing.load(Ordering::Relaxed),
            self.discovery_errors.load(Ordering::Relaxed),
        ) + &self.udp.render("tether_agent")
    }

    /// `/readyz` (200 once a session to every known replica is up) and
    /// `/livez`.
    pub fn probe(&self, path: &str) -> Option<(u16, String)> {
        match path {
            "/livez" => Some((200, "ok\n".to_owned())),
            "/readyz" => {
                let up = self.replica_sessions.load(Ordering::Relaxed);
                let missing = self.replicas_missing.load(Ordering::Relaxed);
                Some(if up > 0 && missing == 0 {
                    (200, format!("ready: {up} replica sessions\n"))
                } else {
                    (
                        503,
                        format!("{up} replica sessions, {missing} replicas missing\n"),
                    )
                })
            }
            _ => None,
        }
    }
}
