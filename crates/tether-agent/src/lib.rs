//! The tether agent: runs inside the private network, dials out to the
//! server over one WebSocket, and connects the streams the server opens to
//! the services its policy allows.

#![deny(missing_docs)]

pub mod discovery;
pub mod policy;
mod replicas;

/// Name lookups for raw targets (kept here under its old path).
pub use tether_net::dns;

use anyhow::Context;
use replicas::{Ended, Key, Supervisor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_net::reconnect::{current_token, server_trust, Endpoint, Established};
use tether_net::splice::{socket_halves, splice, IoReader, IoWriter};
use tether_net::transport::tls::ServerTrust;
use tether_net::transport::ws::endpoint_url;
use tether_net::Refusal;
use tether_net::{Connection, Incoming};
use tether_proto::{ErrorCode, OpenErrorCode, TargetKind};
use tokio::net::TcpStream;

pub use discovery::Discovered;
pub use dns::NameResolver;
pub use policy::{Resolved, ServiceSpec, TargetPolicy};

/// How long the agent waits, by default, for a service to accept a TCP connection.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

fn default_dial_timeout_ms() -> u64 {
    DIAL_TIMEOUT.as_millis() as u64
}

/// Most streams the server may have open on this agent at once (all clients
/// together; each client is held to a smaller share by the server).
pub const MAX_STREAMS: usize = 8192;

use tether_proto::endpoints::{AGENT_INSTANCE_HEADER, AGENT_NAME_HEADER, AGENT_PATH};

fn default_drain_timeout_ms() -> u64 {
    30_000
}

/// Agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Server URL, `wss://host:port` (the agent path is added if missing).
    pub server: String,
    /// The name to register under (must match the token's name on the server).
    pub name: String,
    /// This process's instance id: agent processes with one name and
    /// different instance ids form a pool (opens are spread over them).
    /// Default: the host name (a pod's name) and a random suffix.
    #[serde(default)]
    pub instance: Option<String>,
    /// On shutdown, how long live streams may take to finish, in
    /// milliseconds.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The agent token (prefer `token_file` or `TETHER_TOKEN`: a config
    /// file should not hold secrets).
    #[serde(default)]
    pub token: String,
    /// File holding the token (e.g. a mounted Kubernetes Secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (the server's agent entry has
    /// `mtls = true`); with it, no token is needed.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// PEM CA file to verify the server with (instead of system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Pinned SHA-256 fingerprint of the server certificate.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Named services: `db = "postgres.default.svc.cluster.local:5432"`,
    /// `grafana = "http://grafana.monitoring:3000"`, or a table
    /// (see [`policy::ServiceTable`]).
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    /// Raw `host:port` targets clients may ask for: `*.svc.cluster.local:*`,
    /// `10.0.0.0/8:5432`, `localhost:8000-8100`. Every address a name
    /// resolves to is checked too; loopback, link-local and cloud metadata
    /// addresses need a rule of their own (see [`policy::builtin_deny`]).
    #[serde(default)]
    pub allow: Vec<String>,
    /// DNS server for the names of raw targets (`IP` or `IP:PORT`, port 53
    /// by default), instead of the system resolver: e.g. the cluster DNS.
    /// Named services always use the system resolver.
    #[serde(default)]
    pub dns_server: Option<String>,
    /// How long to wait for a service to accept a connection, in milliseconds.
    #[serde(default = "default_dial_timeout_ms")]
    pub dial_timeout_ms: u64,
    /// Close a UDP flow after this long without datagrams, in milliseconds.
    #[serde(default = "default_udp_idle_ms")]
    pub udp_idle_timeout_ms: u64,
    /// Heartbeat settings.
    #[serde(default)]
    pub session: tether_net::tuning::SessionTuning,
    /// Publish Services found in the Kubernetes API (see [`discovery`]).
    #[serde(default)]
    pub kubernetes: Option<discovery::KubernetesDiscovery>,
}

fn default_udp_idle_ms() -> u64 {
    tether_net::udp::DEFAULT_IDLE_TIMEOUT.as_millis() as u64
}

impl AgentConfig {
    /// How to check the server's certificate.
    pub fn trust(&self) -> ServerTrust {
        server_trust(self.fingerprint.as_ref(), self.ca_file.as_ref())
    }

    /// The full URL of the agent endpoint.
    pub fn url(&self) -> String {
        endpoint_url(&self.server, AGENT_PATH)
    }
}

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
             # TYPE tether_agent_replicas_missing gauge\ntether_agent_replicas_missing {}\n",
            self.connected.load(Ordering::Relaxed),
            self.live_streams.load(Ordering::Relaxed),
            self.streams_total.load(Ordering::Relaxed),
            self.open_errors.load(Ordering::Relaxed),
            self.sessions_total.load(Ordering::Relaxed),
            self.replica_sessions.load(Ordering::Relaxed),
            self.replicas_missing.load(Ordering::Relaxed),
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
    if instance.is_empty()
        || instance.len() > tether_proto::endpoints::MAX_INSTANCE_ID_LEN
        || !instance.bytes().all(|b| b.is_ascii_graphic())
    {
        anyhow::bail!("instance {instance:?}: 1 to 128 visible ASCII characters, no spaces");
    }
    Ok(())
}

/// A default instance id: the host name (a pod's name) and a random
/// suffix, so processes on one host differ.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".to_owned());
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
        config.session.validate()?;
        Ok(())
    }

    /// Validates the configuration.
    pub fn new(mut config: AgentConfig) -> anyhow::Result<Agent> {
        let policy = TargetPolicy::new(&config.services, &config.allow)
            .context("agent services / allow list")?;
        let resolver = NameResolver::from_setting(config.dns_server.as_deref())?
            .remembering(tether_net::dns::REMEMBER_FOR);
        config.session.validate()?;
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
    /// backoff, forever (see [`replicas`]).
    pub async fn run(self) -> anyhow::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Dials what the supervisor says is missing, forever.
    async fn supervise(self: Arc<Self>, sup: Supervisor) {
        let url = self.config.url();
        tether_net::transport::ws::warn_if_plain(&url);
        if let Some(k8s) = &self.config.kubernetes {
            tokio::spawn(discovery::run(k8s.clone(), self.discovered.clone()));
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
                    if let Ok(found) = tokio::net::lookup_host((host.as_str(), *port)).await {
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
                    tracing::warn!(missing = n, sessions = counts.sessions, "some server replicas have been unreachable for 60 s: check that this agent can reach their advertised addresses, or that the load balancer spreads new connections");
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
        let (conn, info, incoming) = match self.connect(connect_to).await {
            Ok(est) => est,
            Err(e) => {
                if sup.failed(&key) {
                    tracing::warn!(server = %shown, "{e} (retrying with backoff)");
                } else {
                    tracing::debug!(server = %shown, "{e}");
                }
                return;
            }
        };
        conn.announce_catalog(self.catalog());
        // Discovery changed the services: tell this server again (a
        // CATALOG replaces the previous one).
        {
            let (this, conn) = (self.clone(), conn.clone());
            let mut changes = self.discovered.changes();
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
        let slot = sup.up(&slot_key, conn.clone());
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
            &self.config.name,
        );
    }

    /// Dials the server URL, or one replica's address with the URL's name,
    /// and runs the handshake.
    async fn connect(&self, connect_to: Option<SocketAddr>) -> Result<Established, String> {
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
                        tokio::spawn(serve_stream(
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

fn dial_error_code(e: &io::Error) -> OpenErrorCode {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => OpenErrorCode::Refused,
        io::ErrorKind::TimedOut => OpenErrorCode::Timeout,
        _ => OpenErrorCode::Unreachable,
    }
}

/// Counts, logs and answers a failed open: "refused" when the policy said
/// no, "failed" when the service could not be reached.
fn refuse(stats: &AgentStats, inc: Incoming, code: OpenErrorCode, reason: &str) {
    stats.open_errors.fetch_add(1, Ordering::Relaxed);
    let (id, target) = (inc.id(), inc.target().clone());
    let by_policy = matches!(
        code,
        OpenErrorCode::Forbidden | OpenErrorCode::UnknownService | OpenErrorCode::BadTarget
    );
    if by_policy {
        tracing::info!(stream = %id, target = %target, %code, "open refused: {reason}");
    } else {
        tracing::info!(stream = %id, target = %target, %code, "open failed: {reason}");
    }
    inc.reject(code, reason);
}

/// The exact addresses to dial for a target the policy let through: a
/// named service's address as the system resolves it, or a raw target's
/// addresses from the agent's resolver once every one passed the policy.
async fn dial_addresses(
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
) -> Result<Vec<SocketAddr>, Refusal> {
    let found = match (&resolved.raw, resolved.host_port()) {
        (Some(raw), _) => resolver.lookup(&raw.host, raw.port).await,
        (None, Some((host, port))) => resolver.lookup_system(host, port).await,
        // Not reached: a service's address was checked when the config loaded.
        (None, None) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address is not HOST:PORT",
        )),
    };
    let addrs: Vec<SocketAddr> = found.map_err(|e| {
        Refusal::new(
            OpenErrorCode::Unreachable,
            format!("cannot resolve {}: {e}", resolved.address),
        )
    })?;
    match &resolved.raw {
        Some(raw) => policy.check_addresses(raw, &addrs)?,
        None if addrs.is_empty() => {
            return Err(Refusal::new(
                OpenErrorCode::Unreachable,
                format!("{} resolves to no address", resolved.address),
            ))
        }
        None => {}
    }
    Ok(addrs)
}

/// Resolves and connects within `dial_timeout`, to the checked addresses
/// in turn: the connection and the address that answered. When none
/// answers, the name's remembered addresses are forgotten, so the next open
/// looks it up again.
async fn connect_tcp(
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
    dial_timeout: Duration,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let dial = async {
        let addrs = dial_addresses(policy, resolver, resolved).await?;
        let mut last = None;
        for &addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok((tcp, addr)),
                Err(e) => last = Some(e),
            }
        }
        // Never empty here (dial_addresses refuses an empty answer).
        let e = last.unwrap_or_else(|| io::Error::other("no address"));
        Err(Refusal::new(
            dial_error_code(&e),
            format!("dialing {} ({addrs:?}): {e}", resolved.address),
        ))
    };
    let result = match tokio::time::timeout(dial_timeout, dial).await {
        Ok(r) => r,
        Err(_) => Err(Refusal::new(
            OpenErrorCode::Timeout,
            format!(
                "{} did not answer within {dial_timeout:?}",
                resolved.address
            ),
        )),
    };
    if let (Err(_), Some((host, _))) = (&result, resolved.host_port()) {
        resolver.forget(host);
    }
    result
}

/// What `target` means here: a configured service, then a discovered one
/// (dialed as the raw target it names, so the allow list decides), then a
/// raw `host:port`.
fn resolve_target(
    policy: &TargetPolicy,
    discovered: &Discovered,
    target: &str,
) -> Result<Resolved, Refusal> {
    if !policy.has_service(target) {
        if let Some(found) = discovered.get(target) {
            return match policy.resolve(&found.address) {
                Ok(mut r) => {
                    r.service = Some(target.to_owned());
                    Ok(r)
                }
                Err(Refusal { code, reason }) => Err(Refusal::new(
                    code,
                    format!(
                        "discovered service {target} ({}, {}): {reason}",
                        found.source, found.address
                    ),
                )),
            };
        }
    }
    policy.resolve(target)
}

async fn serve_stream(
    policy: Arc<TargetPolicy>,
    discovered: Arc<Discovered>,
    resolver: Arc<NameResolver>,
    stats: Arc<AgentStats>,
    dial_timeout: Duration,
    udp_idle: Duration,
    inc: Incoming,
) {
    let target = inc.target().clone();
    let id = inc.id();
    if !matches!(target.kind, TargetKind::Tcp | TargetKind::Udp) {
        refuse(&stats, inc, OpenErrorCode::BadTarget, "unknown stream kind");
        return;
    }
    let resolved = match resolve_target(&policy, &discovered, &target.address) {
        Ok(r) => r,
        Err(Refusal { code, reason }) => return refuse(&stats, inc, code, &reason),
    };
    let started = Instant::now();
    if target.kind == TargetKind::Udp {
        // Boxed, like the dial below: a TCP stream's task should not carry
        // the UDP flow's state for its whole life.
        return Box::pin(open_udp(
            stats,
            &policy,
            &resolver,
            &resolved,
            inc,
            dial_timeout,
            udp_idle,
        ))
        .await;
    }
    // Boxed: the dial's state lives only while dialing, the task's for the
    // stream's whole life.
    let (io, peer) = match Box::pin(dial_service(&policy, &resolver, &resolved, dial_timeout)).await
    {
        Ok(x) => x,
        Err(Refusal { code, reason }) => return refuse(&stats, inc, code, &reason),
    };
    let stream = match inc.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(stream = %id, "stream gone before accept: {e}");
            return;
        }
    };
    stats.streams_total.fetch_add(1, Ordering::Relaxed);
    stats.live_streams.fetch_add(1, Ordering::Relaxed);
    // One info line per stream, at its end (below); the server's admin API
    // lists the streams that are live.
    tracing::debug!(stream = %id, target = %target, address = %resolved.address, %peer, tls = resolved.tls.is_some(), "stream open");
    let (sr, sw) = stream.split();
    let report = match io {
        ServiceIo::Tls(tls) => {
            let (tr, tw) = tokio::io::split(*tls);
            splice(sr, sw, IoReader::new(tr), IoWriter(tw)).await
        }
        ServiceIo::Plain(tcp) => {
            let (tr, tw) = socket_halves(tcp);
            splice(sr, sw, tr, tw).await
        }
    };
    stats.live_streams.fetch_sub(1, Ordering::Relaxed);
    let ms = started.elapsed().as_millis() as u64;
    match report.error {
        None => {
            tracing::info!(stream = %id, target = %target, %peer, bytes_in = report.a_to_b, bytes_out = report.b_to_a, duration_ms = ms, "stream closed")
        }
        Some(e) => {
            tracing::info!(stream = %id, target = %target, %peer, bytes_in = report.a_to_b, bytes_out = report.b_to_a, duration_ms = ms, "stream ended with error: {e}")
        }
    }
}

/// The service's end of a TCP stream: the socket, or TLS over it.
enum ServiceIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Dials a TCP service (TLS towards it included, inside the dial timeout):
/// its connection and peer address (for the log).
async fn dial_service(
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
    dial_timeout: Duration,
) -> Result<(ServiceIo, SocketAddr), Refusal> {
    let (tcp, peer) = connect_tcp(policy, resolver, resolved, dial_timeout).await?;
    let _ = tcp.set_nodelay(true);
    let Some(t) = &resolved.tls else {
        return Ok((ServiceIo::Plain(tcp), peer));
    };
    let hs = t.connector.connect(t.server_name.clone(), tcp);
    match tokio::time::timeout(dial_timeout, hs).await {
        Ok(Ok(s)) => match t.require_alpn {
            Some(want) if s.get_ref().1.alpn_protocol() != Some(want) => Err(Refusal::new(
                OpenErrorCode::Unreachable,
                format!(
                    "TLS to {}: the service did not agree to {} (ALPN); is it an HTTP/2 server? (set http2 = false for HTTP/1.1)",
                    resolved.address,
                    String::from_utf8_lossy(want)
                ),
            )),
            _ => Ok((ServiceIo::Tls(Box::new(s)), peer)),
        },
        Ok(Err(e)) => Err(Refusal::new(
            OpenErrorCode::Unreachable,
            format!("TLS to {}: {e}", resolved.address),
        )),
        Err(_) => Err(Refusal::new(
            OpenErrorCode::Timeout,
            format!(
                "TLS to {} did not finish in {dial_timeout:?}",
                resolved.address
            ),
        )),
    }
}

/// Resolves a UDP service and serves the flow, or refuses the open.
async fn open_udp(
    stats: Arc<AgentStats>,
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
    inc: Incoming,
    dial_timeout: Duration,
    udp_idle: Duration,
) {
    let found =
        tokio::time::timeout(dial_timeout, dial_addresses(policy, resolver, resolved)).await;
    match found {
        Ok(Ok(addrs)) => serve_udp(stats, &resolved.address, &addrs, inc, udp_idle).await,
        Ok(Err(Refusal { code, reason })) => refuse(&stats, inc, code, &reason),
        Err(_) => {
            let reason = format!("resolving {} took over {dial_timeout:?}", resolved.address);
            refuse(&stats, inc, OpenErrorCode::Timeout, &reason);
        }
    }
}

/// Connects a UDP socket to the first of the service's checked addresses
/// and serves the flow.
async fn serve_udp(
    stats: Arc<AgentStats>,
    address: &str,
    addrs: &[SocketAddr],
    inc: Incoming,
    idle: Duration,
) {
    let id = inc.id();
    let Some(&addr) = addrs.first() else {
        let reason = format!("{address} resolves to no address");
        return refuse(&stats, inc, OpenErrorCode::Unreachable, &reason);
    };
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = match tokio::net::UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                &stats,
                inc,
                OpenErrorCode::Internal,
                &format!("udp socket: {e}"),
            );
        }
    };
    if let Err(e) = socket.connect(addr).await {
        return refuse(
            &stats,
            inc,
            OpenErrorCode::Unreachable,
            &format!("udp {addr}: {e}"),
        );
    }
    let Ok(stream) = inc.accept() else { return };
    stats.streams_total.fetch_add(1, Ordering::Relaxed);
    stats.live_streams.fetch_add(1, Ordering::Relaxed);
    stats.udp.flows.fetch_add(1, Ordering::Relaxed);
    stats.udp.flows_total.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(stream = %id, %address, peer = %addr, "udp flow open");
    tether_net::udp::serve_flow(stream, socket, idle, &stats.udp).await;
    stats.udp.flows.fetch_sub(1, Ordering::Relaxed);
    stats.live_streams.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(stream = %id, %address, "udp flow closed");
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A named service's host is looked up once and then remembered; when
    /// none of its addresses answers, it is forgotten, so the next open
    /// asks the resolver again (the service may have moved).
    #[tokio::test]
    async fn a_service_name_is_remembered_until_a_dial_fails() {
        let listener = tether_net::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let c: AgentConfig = toml::from_str(&format!(
            "server = \"ws://127.0.0.1:1\"\nname = \"a\"\ntoken = \"t\"\n[services]\nweb = \"localhost:{port}\"\n"
        ))
        .unwrap();
        let a = Agent::new(c).unwrap();
        let web = a.policy.resolve("web").unwrap();
        let wait = Duration::from_secs(2);
        assert!(!a.resolver.remembers("localhost"));
        let (_tcp, peer) = connect_tcp(&a.policy, &a.resolver, &web, wait)
            .await
            .unwrap();
        assert_eq!(peer, listener.local_addr().unwrap());
        assert!(a.resolver.remembers("localhost"));
        drop(listener);
        let refused = connect_tcp(&a.policy, &a.resolver, &web, wait)
            .await
            .unwrap_err();
        assert_eq!(refused.code, OpenErrorCode::Refused, "{}", refused.reason);
        assert!(!a.resolver.remembers("localhost"));
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
