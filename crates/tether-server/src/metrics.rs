//! Prometheus metrics of the server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tether_net::udp::UdpStats;

use crate::limits::Limit;

/// Label for session kinds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    /// `agent`, `client` or `raw_ws`.
    pub(crate) kind: String,
}

/// Label for byte directions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabel {
    /// `to_agent` or `from_agent`.
    pub(crate) direction: String,
}

/// Label for error kinds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabel {
    /// A short stable name (`bad_token`, `agent_offline`, `forbidden`, ...).
    pub(crate) kind: String,
}

/// Label for limits.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LimitLabel {
    /// The limit's name (`opens_per_sec`, `sessions_per_client`, ...).
    pub(crate) limit: String,
}

/// Label for agent names (bounded: only configured agents register).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AgentLabel {
    /// The agent's name.
    pub(crate) agent: String,
}

/// Label for this replica.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReplicaLabel {
    /// The replica id.
    pub(crate) replica: String,
}

/// Label for outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    /// `ok` or `failed`.
    pub(crate) result: String,
}

/// All server metrics.
pub(crate) struct Metrics {
    registry: Registry,
    /// Registered agents.
    pub(crate) agents: Gauge,
    /// Connected instances per agent name.
    pub(crate) agent_instances: Family<AgentLabel, Gauge>,
    /// The agent names of the config, whose `agent_instances` series
    /// exist at 0 until they connect ([`Metrics::expect_agents`]).
    expected_agents: std::sync::Mutex<Vec<String>>,
    /// Names the config dropped while instances of them were still
    /// connected: their series goes when the last one leaves.
    dropped_agents: std::sync::Mutex<Vec<String>>,
    /// 1, labelled with this replica's id.
    pub(crate) replica: Family<ReplicaLabel, Gauge>,
    /// Live sessions by kind.
    pub(crate) sessions: Family<KindLabel, Gauge>,
    /// Relayed streams currently open.
    pub(crate) live_streams: Gauge,
    /// Opens towards agents waiting for an answer.
    pub(crate) pending_opens: Gauge,
    /// Streams and proxied HTTP requests admitted and not finished (a
    /// drain waits for this to reach zero).
    pub(crate) active_opens: Gauge,
    /// HTTP connections being served (not counting those upgraded to
    /// sessions or WebSockets).
    pub(crate) http_connections: Gauge,
    /// Relayed streams ever opened.
    pub(crate) streams_total: Counter,
    /// Relayed payload bytes.
    pub(crate) bytes: Family<DirectionLabel, Counter>,
    /// Errors by kind.
    pub(crate) errors: Family<ErrorLabel, Counter>,
    /// Requests refused by a limit.
    pub(crate) limit_hits: Family<LimitLabel, Counter>,
    /// Configuration reloads.
    pub(crate) reloads: Family<ResultLabel, Counter>,
    /// Opens decided by the policy.
    pub(crate) decisions: Family<ResultLabel, Counter>,
    /// The series of label sets known up front, resolved once: a family
    /// lookup hashes and allocates its labels, and these count every open,
    /// request and relayed stream.
    hot: HotSeries,
    /// Each UDP `[[listener]]`'s flow and datagram counts, by address.
    udp_listeners: Arc<UdpListeners>,
}

/// See [`Metrics::hot`].
#[derive(Default)]
struct HotSeries {
    allowed: Counter,
    denied: Counter,
    to_agent: Counter,
    from_agent: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let mut m = Metrics {
            agents: Gauge::default(),
            agent_instances: Family::default(),
            expected_agents: std::sync::Mutex::default(),
            dropped_agents: std::sync::Mutex::default(),
            replica: Family::default(),
            sessions: Family::default(),
            live_streams: Gauge::default(),
            pending_opens: Gauge::default(),
            active_opens: Gauge::default(),
            http_connections: Gauge::default(),
            streams_total: Counter::default(),
            bytes: Family::default(),
            errors: Family::default(),
            limit_hits: Family::default(),
            reloads: Family::default(),
            decisions: Family::default(),
            hot: HotSeries::default(),
            udp_listeners: Arc::default(),
            registry: Registry::default(),
        };
        let result = |r: &str| ResultLabel { result: r.into() };
        let direction = |d: &str| DirectionLabel {
            direction: d.into(),
        };
        // One statement each: a family's read guard lives to the end of its
        // statement, and the next get_or_create of the same family needs
        // the write lock.
        let allowed = m.decisions.get_or_create(&result("allowed")).clone();
        let denied = m.decisions.get_or_create(&result("denied")).clone();
        // Reload results exist at 0 from the start: the first failed
        // reload is then an increase an alert sees, not a new series at 1.
        let _ = m.reloads.get_or_create(&result("ok"));
        let _ = m.reloads.get_or_create(&result("failed"));
        let to_agent = m.bytes.get_or_create(&direction("to_agent")).clone();
        let from_agent = m.bytes.get_or_create(&direction("from_agent")).clone();
        m.hot = HotSeries {
            allowed,
            denied,
            to_agent,
            from_agent,
        };
        registry.register("agents", "Registered agents", m.agents.clone());
        registry.register(
            "agent_instances",
            "Connected instances of each agent (a pool has several)",
            m.agent_instances.clone(),
        );
        registry.register("replica", "This server replica's id", m.replica.clone());
        registry.register("sessions", "Live sessions by kind", m.sessions.clone());
        registry.register(
            "live_streams",
            "Relayed streams currently open",
            m.live_streams.clone(),
        );
        registry.register(
            "pending_opens",
            "Opens waiting for an agent's answer",
            m.pending_opens.clone(),
        );
        registry.register(
            "active_opens",
            "Streams and proxied HTTP requests admitted and not finished",
            m.active_opens.clone(),
        );
        registry.register(
            "http_connections",
            "HTTP connections being served (upgraded ones not counted)",
            m.http_connections.clone(),
        );
        registry.register("streams", "Relayed streams opened", m.streams_total.clone());
        registry.register("relayed_bytes", "Relayed payload bytes", m.bytes.clone());
        registry.register("errors", "Errors by kind", m.errors.clone());
        registry.register(
            "limit_hits",
            "Requests refused by a limit",
            m.limit_hits.clone(),
        );
        registry.register("reloads", "Configuration reloads", m.reloads.clone());
        registry.register(
            "policy_decisions",
            "Opens allowed or denied by the policy",
            m.decisions.clone(),
        );
        registry.register_collector(Box::new(m.udp_listeners.clone()));
        Metrics { registry, ..m }
    }
}

/// One live session in `tether_sessions` ([`Metrics::session_live`]):
/// uncounted when dropped, which also happens when its task is aborted (at
/// shutdown), unlike a `dec()` at the end of the task.
pub(crate) struct LiveSession(Gauge);

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Counts one error of `kind`.
    pub(crate) fn error(&self, kind: &str) {
        self.error_counter(kind).inc();
    }

    /// The `tether_errors_total` series of `kind`, to count into without a
    /// lookup each time (a count per datagram).
    pub(crate) fn error_counter(&self, kind: &str) -> Counter {
        self.errors
            .get_or_create(&ErrorLabel {
                kind: kind.to_owned(),
            })
            .clone()
    }

    /// Counts one refusal by `limit`.
    pub(crate) fn limit_hit(&self, limit: Limit) {
        self.limit_hits
            .get_or_create(&LimitLabel {
                limit: limit.as_str().to_owned(),
            })
            .inc();
    }

    /// The reload counter for `result`.
    pub(crate) fn reloads_of(&self, result: &str) -> Counter {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .clone()
    }

    /// Counts one policy decision.
    pub(crate) fn decision(&self, allowed: bool) {
        if allowed {
            self.hot.allowed.inc();
        } else {
            self.hot.denied.inc();
        }
    }

    /// Counts one live session of `kind` (`agent`, `client`, `raw_ws`,
    /// `listener`) in `tether_sessions` until the returned value is dropped.
    pub(crate) fn session_live(&self, kind: &str) -> LiveSession {
        let gauge = self
            .sessions
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .clone();
        gauge.inc();
        LiveSession(gauge)
    }

    /// Makes `tether_agent_instances` exist, at 0 until a session comes,
    /// for every configured agent: an alert on `== 0` (deploy/observability)
    /// then fires for an agent that has not connected to this replica since
    /// it started, where a series that does not exist would say nothing. A
    /// series that exists is left as it is; one of a name the config no
    /// longer has goes once it is 0, now or when its last instance leaves
    /// ([`Metrics::agent_left`]), else that alert would fire forever.
    pub(crate) fn expect_agents<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let names: Vec<String> = names.into_iter().map(str::to_owned).collect();
        for name in &names {
            self.agent_instances(name);
        }
        let mut expected = self
            .expected_agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut dropped = self
            .dropped_agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        dropped.retain(|n| !names.contains(n));
        for gone in expected.iter().filter(|n| !names.contains(n)) {
            let label = AgentLabel {
                agent: gone.clone(),
            };
            if self.agent_instances.get_or_create(&label).get() == 0 {
                self.agent_instances.remove(&label);
            } else {
                dropped.push(gone.clone());
            }
        }
        *expected = names;
    }

    /// Agent `name` has `n` instances left (`gauge` is its series).
    pub(crate) fn agent_left(&self, name: &str, gauge: &Gauge, n: usize) {
        gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        if n > 0 {
            return;
        }
        let mut dropped = self
            .dropped_agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = dropped.iter().position(|d| d == name) {
            dropped.swap_remove(i);
            self.agent_instances.remove(&AgentLabel {
                agent: name.to_owned(),
            });
        }
    }

    /// The gauge of connected instances of agent `name`.
    pub(crate) fn agent_instances(&self, name: &str) -> Gauge {
        self.agent_instances
            .get_or_create(&AgentLabel {
                agent: name.to_owned(),
            })
            .clone()
    }

    /// Adds relayed bytes.
    pub(crate) fn add_bytes(&self, to_agent: u64, from_agent: u64) {
        self.hot.to_agent.inc_by(to_agent);
        self.hot.from_agent.inc_by(from_agent);
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Metrics {
    /// The counts of the UDP listener on `listen`, shown as
    /// `tether_listener_udp_*{listen="..."}`: one set per listener for the
    /// process's life (it survives the listener's rebinds).
    pub(crate) fn udp_listener(&self, listen: std::net::SocketAddr) -> Arc<UdpStats> {
        let stats = Arc::new(UdpStats::default());
        self.udp_listeners
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((listen.to_string(), stats.clone()));
        stats
    }
}

/// Reads one of a UDP listener's counters from its stats.
type UdpCount = fn(&UdpStats) -> &AtomicU64;

/// The UDP listeners' counts, read at each scrape.
#[derive(Default)]
struct UdpListeners(Mutex<Vec<(String, Arc<UdpStats>)>>);

impl std::fmt::Debug for UdpListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UdpListeners")
    }
}

impl prometheus_client::collector::Collector for UdpListeners {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;
        let listeners = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if listeners.is_empty() {
            return Ok(());
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut m = encoder.encode_descriptor(
            "listener_udp_live_flows",
            "Flows (source addresses) a UDP listener carries now",
            None,
            MetricType::Gauge,
        )?;
        for (listen, s) in &listeners {
            m.encode_family(&[("listen", listen.as_str())])?
                .encode_gauge(&s.flows.load(Ordering::Relaxed))?;
        }
        let counters: [(&str, &str, UdpCount); 5] = [
            ("listener_udp_flows", "Flows a UDP listener started (a new source address each; refused ones too)", |s| &s.flows_total),
            ("listener_udp_evicted", "Flows a UDP listener closed to stay under its cap", |s| &s.evicted),
            ("listener_udp_drops", "Datagrams a UDP listener dropped (a source outside allow_from, a refused open, a full queue, no credit, too large)", |s| &s.drops),
            ("listener_udp_datagrams_in", "Datagrams a UDP listener sent into the tunnel", |s| &s.datagrams_in),
            ("listener_udp_datagrams_out", "Datagrams a UDP listener delivered from the tunnel", |s| &s.datagrams_out),
        ];
        for (name, help, field) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (listen, s) in &listeners {
                m.encode_family(&[("listen", listen.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&load(field(s)), None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_series_count_into_their_families() {
        let m = Metrics::default();
        m.decision(true);
        m.decision(true);
        m.decision(false);
        m.add_bytes(10, 32);
        let out = m.render();
        for line in [
            "tether_policy_decisions_total{result=\"allowed\"} 2",
            "tether_policy_decisions_total{result=\"denied\"} 1",
            "tether_relayed_bytes_total{direction=\"to_agent\"} 10",
            "tether_relayed_bytes_total{direction=\"from_agent\"} 32",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
    }

    #[test]
    fn reload_results_exist_before_the_first_reload() {
        let out = Metrics::default().render();
        for line in [
            "tether_reloads_total{result=\"ok\"} 0",
            "tether_reloads_total{result=\"failed\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
    }

    /// An agent the config no longer names loses its series when its last
    /// instance leaves, not only when it had none at the reload; one still
    /// configured keeps its series at 0.
    #[test]
    fn a_dropped_agent_s_series_goes_with_its_last_instance() {
        let m = Metrics::default();
        m.expect_agents(["kept", "dropped"]);
        let (kept, dropped) = (m.agent_instances("kept"), m.agent_instances("dropped"));
        kept.set(1);
        dropped.set(2);
        m.expect_agents(["kept"]);
        let series = |name: &str| {
            m.render()
                .lines()
                .any(|l| l.starts_with(&format!("tether_agent_instances{{agent=\"{name}\"}}")))
        };
        assert!(series("dropped"), "still connected");
        m.agent_left("dropped", &dropped, 1);
        assert!(series("dropped"), "one instance left");
        m.agent_left("dropped", &dropped, 0);
        assert!(!series("dropped"), "{}", m.render());
        m.agent_left("kept", &kept, 0);
        assert!(series("kept"), "a configured agent keeps its series at 0");
    }
}
