//! The tether agent: runs inside the private network, dials out to the
//! server over one WebSocket, and connects the streams the server opens to
//! the services its policy allows.

#![deny(missing_docs)]

mod config;
pub mod discovery;
pub mod policy;
mod replicas;
mod stats;
mod stream;
mod tls_end;

/// Name lookups for raw targets (kept here under its old path).
pub use tether_net::dns;

use anyhow::Context;
use replicas::{Ended, Key, Supervisor};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_net::reconnect::{current_token, ConnectError, Endpoint, Established};
use tether_net::Connection;
use tether_proto::endpoints::{
    AGENT_HELD_HEADER, AGENT_INSTANCE_HEADER, AGENT_NAME_HEADER, HELD_STATUS,
};
use tether_proto::ErrorCode;

pub use config::{AgentConfig, DIAL_TIMEOUT, MAX_STREAMS};
pub use discovery::Discovered;
pub use dns::NameResolver;
pub use policy::{Resolved, ServiceSpec, TargetPolicy};
pub use stats::AgentStats;

/// A configured agent.
pub struct Agent {
    config: AgentConfig,
    identity: Option<tether_net::transport::tls::ServerIdentity>,
    policy: Arc<TargetPolicy>,
    /// Services found by Kubernetes discovery (empty without it).
    discovered: Arc<Discovered>,
    resolver: Arc<NameResolver>,
    stats: Arc<AgentStats>,
    /// This process's instance id.
    instance: String,
}

/// An instance id goes into an HTTP header: 1 to 128 visible ASCII bytes.
fn check_instance(instance: &str) -> anyhow::Result<()> {
    if !tether_proto::endpoints::valid_instance_id(instance) {
        anyhow::bail!("instance {instance:?}: 1 to 128 visible ASCII characters, no spaces");
    }
    Ok(())
}

/// A default instance id: the host name (a pod's name) and a random
/// suffix, so processes on one host differ.
fn default_instance() -> String {
    let host = tether_net::host::name().unwrap_or_else(|| "agent".to_owned());
    format!("{host}/{:08x}", rand::random::<u32>())
}

impl Agent {
    /// Checks `config` without reading any file or dialing anything: its
    /// services, allow list, DNS server, instance id and heartbeat
    /// (`tether agent --check-config`).
    pub fn check(config: &AgentConfig) -> anyhow::Result<()> {
        TargetPolicy::new(&config.services, &config.allow)
            .context("agent services / allow list")?;
        NameResolver::from_setting(config.dns_server.as_deref())?;
        if let Some(i) = &config.instance {
            check_instance(i)?;
        }
        if let Some(k8s) = &config.kubernetes {
            k8s.check()?;
        }
        config.session.validate()?;
        config.validate_timeouts()?;
        Ok(())
    }

    /// Validates the configuration.
    pub fn new(mut config: AgentConfig) -> anyhow::Result<Agent> {
        let policy = TargetPolicy::new(&config.services, &config.allow)
            .context("agent services / allow list")?;
        let resolver = NameResolver::from_setting(config.dns_server.as_deref())?
            .remembering(tether_net::dns::REMEMBER_FOR);
        config.session.validate()?;
        config.validate_timeouts()?;
        if let Some(k8s) = &config.kubernetes {
            k8s.check()?;
        }
        if let Some(f) = &config.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("token_file {}", f.display()))?;
            config.token = t.trim().to_owned();
        }
        let identity = match (&config.client_cert, &config.client_key) {
            (Some(c), Some(k)) => Some(tether_net::transport::tls::ServerIdentity::from_pem_files(
                c, k,
            )?),
            (None, None) => None,
            _ => anyhow::bail!("client_cert and client_key go together"),
        };
        if config.token.is_empty() && identity.is_none() {
            anyhow::bail!("no agent credential: set a token (token_file, TETHER_TOKEN) or client_cert + client_key");
        }
        let instance = config.instance.clone().unwrap_or_else(default_instance);
        check_instance(&instance)?;
        Ok(Agent {
            config,
            identity,
            policy: Arc::new(policy),
            discovered: Arc::default(),
            resolver: Arc::new(resolver),
            stats: Arc::default(),
            instance,
        })
    }

    /// The token: `token_file`'s current content, or the configured one.
    fn current_token(&self) -> String {
        current_token(&self.config.token, self.config.token_file.as_deref())
    }

    /// What this agent announces: its configured services, then the
    /// discovered ones (a configured name wins).
    fn catalog(&self) -> Vec<tether_proto::frame::CatalogEntry> {
        let mut entries = self.policy.catalog();
        entries.extend(
            self.discovered
                .catalog(&|name| self.policy.has_service(name)),
        );
        entries
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<AgentStats> {
        self.stats.clone()
    }

    /// Like [`Agent::run`] until `shutdown` resolves; then drains: GOAWAY
    /// on every session (servers send new opens to other instances), and
    /// the open streams get up to `drain_timeout_ms` to finish.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let sup = Supervisor::new();
        let drain = Duration::from_millis(self.config.drain_timeout_ms);
        let this = Arc::new(self);
        tokio::select! {
            () = this.clone().supervise(sup.clone()) => Ok(()),
            _ = shutdown => {
                let conns = sup.stop();
                tracing::info!(sessions = conns.len(), "shutting down: draining the sessions (GOAWAY on each); live streams may finish");
                for c in &conns {
                    c.go_away(ErrorCode::Normal, "agent shutting down");
                }
                let all_closed = async {
                    for c in &conns {
                        c.transport_closed().await;
                    }
                };
                if tokio::time::timeout(drain + Duration::from_secs(2), all_closed).await.is_err() {
                    tracing::warn!("drain timeout: closing the sessions that are left");
                }
                for c in &conns {
                    c.close(ErrorCode::Normal, "agent shut down");
                }
                Ok(())
            }
        }
    }

    /// Connects to every server replica, serves, and reconnects with
    /// backoff, forever (see the `replicas` module).
    pub async fn run(self) -> anyhow::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Dials what the supervisor says is missing, forever.
    async fn supervise(self: Arc<Self>, sup: Supervisor) {
        let url = self.config.url();
        tether_net::transport::ws::warn_if_plain(&url);
        if let Some(k8s) = &self.config.kubernetes {
            tokio::spawn(discovery::run(
                k8s.clone(),
                self.discovered.clone(),
                self.policy.clone(),
                self.stats.clone(),
            ));
        }
        let services: Vec<&str> = self.policy.service_names().collect();
        tracing::info!(name = %self.config.name, instance = %self.instance, server = %url, services = ?services, allow = ?self.config.allow, dns_server = ?self.resolver.dns_server(), "agent starting");
        let url_host = url_host_port(&url);
        let mut resolved_at: Option<Instant> = None;
        // Since when some replica has been missing, to warn once after 60 s
        // (usually a load balancer with affinity, or an unreachable address).
        let mut missing_since: Option<Instant> = None;
        loop {
            for key in sup.due() {
                tokio::spawn(self.clone().attempt(sup.clone(), key));
            }
            if let Some((host, port)) = &url_host {
                if resolved_at.is_none_or(|t| t.elapsed() >= replicas::URL_RESOLVE_EVERY) {
                    resolved_at = Some(Instant::now());
                    // Bounded: a resolver that hangs must not hold up the
                    // redials of replicas whose addresses are known.
                    let lookup = tokio::net::lookup_host((host.as_str(), *port));
                    if let Ok(Ok(found)) =
                        tokio::time::timeout(replicas::URL_LOOKUP_TIMEOUT, lookup).await
                    {
                        let mut addrs: Vec<SocketAddr> = found.collect();
                        addrs.sort();
                        addrs.dedup();
                        sup.set_url_addrs(addrs);
                    }
                }
            }
            let counts = sup.counts();
            self.stats
                .replica_sessions
                .store(counts.sessions as i64, Ordering::Relaxed);
            self.stats
                .replicas_missing
                .store(counts.missing as i64, Ordering::Relaxed);
            self.stats
                .connected
                .store(i64::from(counts.sessions > 0), Ordering::Relaxed);
            match (counts.missing, missing_since) {
                (0, _) => missing_since = None,
                (_, None) => missing_since = Some(Instant::now()),
                (n, Some(t)) if t.elapsed() >= Duration::from_secs(60) => {
                    // With the last dial's failure: the first warning of
                    // it may be long gone from the log.
                    let last_error = counts.last_error.as_deref().unwrap_or("none yet");
                    tracing::warn!(missing = n, sessions = counts.sessions, last_error, "some server replicas have been unreachable for 60 s: check that this agent can reach their advertised addresses, or that the load balancer spreads new connections");
                    missing_since = Some(Instant::now()); // again in 60 s
                }
                _ => {}
            }
            sup.tick().await;
        }
    }

    /// One dial of `key` and, when it connects, the session until it stops
    /// taking opens.
    async fn attempt(self: Arc<Self>, sup: Supervisor, key: Key) {
        let connect_to = sup.route(&key);
        let shown = match (&key, connect_to) {
            (_, Some(a)) => a.to_string(),
            (Key::Url, None) => self.config.url(),
            (k, None) => format!("{} for {k}", self.config.url()),
        };
        let held = sup.held_replicas();
        let (conn, info, incoming) = match self.connect(connect_to, &held).await {
            Ok(est) => est,
            Err(e)
                if e.refused_status() == Some(HELD_STATUS)
                    && e.refused_by().is_some_and(|r| held.iter().any(|h| h == r)) =>
            {
                // Landed on a replica we hold (through the load balancer,
                // or at a second address): it kept our session there.
                tracing::debug!(server = %shown, "{e}");
                sup.landed_on_held(&key, connect_to, e.refused_by());
                return;
            }
            Err(e) => {
                if sup.failed(&key, &e.to_string()) {
                    tracing::warn!(server = %shown, "{e} (retrying with backoff)");
                } else {
                    tracing::debug!(server = %shown, "{e}");
                }
                return;
            }
        };
        // Subscribed before the first catalog is made: a change between the
        // two is then announced too, not left for the next one.
        let mut changes = self.discovered.changes();
        conn.announce_catalog(self.catalog());
        // Discovery changed the services: tell this server again (a
        // CATALOG replaces the previous one).
        {
            let (this, conn) = (self.clone(), conn.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = changes.changed() => {
                            if r.is_err() {
                                return;
                            }
                            conn.announce_catalog(this.catalog());
                        }
                        _ = conn.closed() => return,
                    }
                }
            });
        }
        // What the replica says it is (version 4 sends it right away).
        let mut replicas = conn.peer_replicas();
        if info.version >= tether_proto::REPLICAS_VERSION {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), replicas.wait_for(|r| r.is_some()))
                    .await;
        }
        let this = conn
            .peer_replicas()
            .borrow()
            .as_ref()
            .and_then(|r| r.this().cloned());
        let replica = this
            .as_ref()
            .map_or_else(|| "-".to_owned(), |t| t.id.clone());
        let landed_elsewhere = match (&key, &this) {
            (Key::Id(want), t) => t.as_ref().is_none_or(|t| t.id != *want),
            (Key::Addr(a), t) if connect_to.is_none() => {
                t.as_ref().is_none_or(|t| t.addr != a.to_string())
            }
            _ => false,
        };
        let slot_key = if landed_elsewhere {
            // Looking for one replica through the load balancer, this
            // landed on another: keep it (it serves that one), look again.
            sup.landed_elsewhere(&key);
            Key::Url
        } else {
            key.clone()
        };
        let slot = sup.up(&slot_key, &key, conn.clone());
        tracing::info!(server = %shown, %replica, peer = %info.peer_software, version = info.version, "registered as {} (instance {})", self.config.name, self.instance);
        self.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let why = self.serve(conn.clone(), incoming).await;
        let goaway = conn.peer_goaway();
        if !sup.stopping() {
            tracing::warn!(server = %shown, %replica, reason = why.as_deref().unwrap_or("drained"), "session ended");
        }
        sup.down(
            slot,
            Ended {
                goaway,
                lasted: started.elapsed(),
            },
        );
    }

    /// Dials the server URL, or one replica's address with the URL's name,
    /// and runs the handshake.
    async fn connect(
        &self,
        connect_to: Option<SocketAddr>,
        held: &[String],
    ) -> Result<Established, ConnectError> {
        let endpoint = Endpoint {
            url: self.config.url(),
            trust: self.config.trust(),
            identity: self.identity.as_ref(),
        };
        // The token is read again for every connection, so a rotated
        // token_file (a re-mounted Secret) is picked up without a restart.
        let mut headers = vec![
            (AGENT_NAME_HEADER.to_owned(), self.config.name.clone()),
            (AGENT_INSTANCE_HEADER.to_owned(), self.instance.clone()),
        ];
        if !held.is_empty() {
            headers.push((AGENT_HELD_HEADER.to_owned(), held.join(",")));
        }
        let token = self.current_token();
        if !token.is_empty() {
            headers.push(("authorization".to_owned(), format!("Bearer {token}")));
        }
        let mut cfg = tether_proto::Config {
            software: format!("tether-agent/{}", env!("CARGO_PKG_VERSION")),
            max_peer_streams: MAX_STREAMS,
            drain_timeout: Duration::from_millis(self.config.drain_timeout_ms),
            ..Default::default()
        };
        self.config.session.apply(&mut cfg);
        let label = format!("agent={}", self.config.name);
        endpoint
            .connect_via(connect_to, &headers, cfg, &label)
            .await
    }

    /// Serves the session's streams until it ends, or until the server
    /// drains it (GOAWAY): then its open streams finish in the background
    /// while the caller registers a fresh session.
    async fn serve(
        &self,
        conn: Connection,
        mut incoming: tether_net::session::IncomingStreams,
    ) -> Option<String> {
        loop {
            tokio::select! {
                inc = incoming.recv() => match inc {
                    Some(inc) => {
                        tokio::spawn(stream::serve_stream(
                            self.policy.clone(),
                            self.discovered.clone(),
                            self.resolver.clone(),
                            self.stats.clone(),
                            Duration::from_millis(self.config.dial_timeout_ms),
                            Duration::from_millis(self.config.udp_idle_timeout_ms),
                            inc,
                        ));
                    }
                    None => return conn.closed().await,
                },
                _ = conn.draining() => {
                    if conn.is_closed() {
                        return conn.closed().await;
                    }
                    let code = conn.peer_goaway().map(|c| c.to_string()).unwrap_or_default();
                    return Some(format!("server sent GOAWAY ({code})"));
                }
            }
        }
    }
}

/// The host and port of a `ws://` / `wss://` URL whose host is a name (an
/// IP needs no lookup).
fn url_host_port(url: &str) -> Option<(String, u16)> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_net::transport::tls::ServerTrust;

    /// The agent config shipped in deploy/kubernetes/agent.yaml is valid.
    #[test]
    fn the_kubernetes_example_config_parses() {
        let yaml = include_str!("../../../deploy/kubernetes/agent.yaml");
        let block: String = yaml
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("agent.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let mut c: AgentConfig = toml::from_str(&block).unwrap();
        assert_eq!(c.name, "prod");
        assert!(c.token_file.is_some());
        c.token = "t".into(); // the file is read at start; not here
        c.token_file = None;
        let a = Agent::new(c).unwrap();
        assert_eq!(a.policy.catalog().len(), 2);
    }

    /// A zero timeout stops the agent at start (and `--check-config`),
    /// naming the setting.
    #[test]
    fn zero_timeouts_are_refused() {
        for setting in ["dial_timeout_ms", "udp_idle_timeout_ms"] {
            let c: AgentConfig = toml::from_str(&format!(
                "server = \"ws://127.0.0.1:1\"\nname = \"a\"\ntoken = \"t\"\n{setting} = 0\n"
            ))
            .unwrap();
            let e = Agent::check(&c).unwrap_err().to_string();
            assert!(e.contains(setting), "{e}");
            assert!(Agent::new(c).is_err());
        }
    }

    #[test]
    fn config_parses() {
        let c: AgentConfig = toml::from_str(
            r#"
            server = "wss://tether.example.com"
            name = "prod"
            token = "t"
            fingerprint = "AA:BB"
            allow = ["*.svc.cluster.local:*", "10.0.*.*:5432"]
            dns_server = "10.96.0.10"
            [services]
            db = "postgres.default.svc.cluster.local:5432"
            "#,
        )
        .unwrap();
        assert!(matches!(c.trust(), ServerTrust::Fingerprint(_)));
        let a = Agent::new(c.clone()).unwrap();
        assert_eq!(
            a.resolver.dns_server(),
            Some("10.96.0.10:53".parse().unwrap())
        );
        // IP globs that are not whole octets at the end, and bad DNS
        // servers, are refused at load.
        let mut bad = c.clone();
        bad.allow = vec!["10.*.0.1:*".into()];
        let e = Agent::new(bad).err().expect("refused");
        assert!(format!("{e:#}").contains("write a CIDR"), "{e:#}");
        let mut bad = c;
        bad.dns_server = Some("cluster-dns".into());
        assert!(Agent::new(bad).is_err());
    }
}
