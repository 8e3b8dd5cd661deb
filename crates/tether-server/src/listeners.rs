//! Server-side listeners: a public TCP port on the server bound to one
//! `agent/service`, for clients that cannot run the tether CLI (like
//! rathole's or frp's public ports).
//!
//! A listener is bound only while its agent is connected, and closed when the
//! agent goes away, so nobody connects to a port that leads nowhere. A newer
//! session of the same agent takes over without the port ever closing. The
//! socket is bound with `SO_REUSEADDR`, so rebinding after the agent returns
//! never fails with "address already in use" because of old connections.

use crate::admission::SourceCounts;
use anyhow::Context;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_proto::Target;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::relay::run_relay;
use crate::State;

/// How long to wait before retrying a bind that failed.
const REBIND_DELAY: Duration = Duration::from_secs(5);

/// One `[[listener]]` of the server config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Public address to listen on.
    pub listen: SocketAddr,
    /// `agent/service` (or `agent/host:port`) the connections go to.
    pub target: String,
    /// Source networks allowed to connect; empty means anyone.
    #[serde(default)]
    pub allow_from: Vec<IpNet>,
    /// Send a PROXY protocol v2 header to the service first, so it sees the
    /// real client address (TCP only).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// `tcp` (default) or `udp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Most TCP connections one source address may have open through this
    /// listener at once (default 64), so one source cannot take the agent's
    /// streams from everyone else.
    #[serde(default = "default_per_source")]
    pub max_connections_per_source: usize,
}

fn default_protocol() -> String {
    "tcp".into()
}

/// Default for `max_connections_per_source`.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 64;

fn default_per_source() -> usize {
    MAX_CONNECTIONS_PER_SOURCE
}

impl ListenerConfig {
    fn agent(&self) -> &str {
        self.target.split_once('/').map_or("", |(a, _)| a)
    }

    fn service(&self) -> &str {
        self.target.split_once('/').map_or("", |(_, s)| s)
    }

    /// Checks the target shape.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.protocol != "tcp" && self.protocol != "udp" {
            anyhow::bail!("listener {}: protocol must be tcp or udp", self.listen);
        }
        if self.protocol == "udp" && self.proxy_protocol {
            anyhow::bail!(
                "listener {}: proxy_protocol is for TCP listeners",
                self.listen
            );
        }
        if self.agent().is_empty() || self.service().is_empty() {
            anyhow::bail!(
                "listener {}: target {:?} is not AGENT/SERVICE",
                self.listen,
                self.target
            );
        }
        Ok(())
    }

    fn allows(&self, peer: &SocketAddr) -> bool {
        self.allow_from.is_empty() || self.allow_from.iter().any(|n| n.contains(&peer.ip()))
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Runs one listener forever: bound while its agent is connected.
pub async fn run(state: Arc<State>, cfg: ListenerConfig) {
    if cfg.protocol == "udp" {
        return run_udp(state, Arc::new(cfg)).await;
    }
    let cfg = Arc::new(cfg);
    let per_source: Arc<SourceCounts> = Arc::default();
    let mut changes = state.registry.subscribe();
    loop {
        // Wait for the agent.
        while state.registry.get(cfg.agent()).is_none() {
            if changes.changed().await.is_err() {
                return;
            }
        }
        let listener = match bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen)) {
            Ok(l) => l,
            Err(e) => {
                state.metrics.error("listener_bind");
                tracing::error!(listen = %cfg.listen, target = %cfg.target, "{e:#}; retrying in {REBIND_DELAY:?}");
                tokio::time::sleep(REBIND_DELAY).await;
                continue;
            }
        };
        tracing::info!(listen = %cfg.listen, target = %cfg.target, "listener open (agent connected)");
        let gauge = state.metrics.sessions_of("listener");
        gauge.inc();
        loop {
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() || state.registry.get(cfg.agent()).is_none() {
                        break;
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let Some(slot) = per_source.take(peer.ip(), cfg.max_connections_per_source.max(1)) else {
                            state.metrics.limit_hit("listener_connections_per_source");
                            tracing::warn!(listen = %cfg.listen, %peer, max = cfg.max_connections_per_source, "source has too many connections through this listener; closed");
                            continue;
                        };
                        let state = state.clone();
                        let cfg = cfg.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            serve_one(state, cfg, tcp, peer).await
                        });
                    }
                    Err(e) => {
                        tracing::warn!(listen = %cfg.listen, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        gauge.dec();
        tracing::info!(listen = %cfg.listen, target = %cfg.target, "listener closed (agent gone)");
    }
}

async fn serve_one(state: Arc<State>, cfg: Arc<ListenerConfig>, tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    if !cfg.allows(&peer) {
        state.metrics.error("listener_source_denied");
        tracing::warn!(listen = %cfg.listen, %peer, "connection from a source outside allow_from; closed");
        return;
    }
    let _ = tcp.set_nodelay(true);
    let Some(entry) = state.registry.get(cfg.agent()) else {
        state.metrics.error("agent_offline");
        tracing::info!(listen = %cfg.listen, %peer, target = %cfg.target, "agent offline; connection closed");
        return;
    };
    state.metrics.pending_opens.inc();
    let opened = entry.conn.open(Target::tcp(cfg.service())).await;
    state.metrics.pending_opens.dec();
    let stream = match opened {
        Ok(s) => s,
        Err(tether_net::Refusal { code, reason }) => {
            state.metrics.error(code.as_str());
            tracing::info!(listen = %cfg.listen, %peer, target = %cfg.target, %code, "open refused: {reason}");
            return;
        }
    };
    let (sr, mut sw) = stream.split();
    if cfg.proxy_protocol {
        let local = tcp.local_addr().unwrap_or(cfg.listen);
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (peer, local),
        )
        .build();
        match header {
            Ok(h) => {
                if let Err(e) = sw.write(bytes::Bytes::from(h)).await {
                    tracing::info!(%peer, "stream closed before the PROXY header: {e}");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(%peer, "cannot build PROXY header: {e}");
                return;
            }
        }
    }
    let (tr, tw) = tcp.into_split();
    let who = format!("listener {} from {peer}", cfg.listen);
    run_relay(&state, &who, &cfg.target, started, None, (tr, tw), (sr, sw)).await;
}

/// A UDP listener: every source address is a flow (one tunnel stream).
async fn run_udp(state: Arc<State>, cfg: Arc<ListenerConfig>) {
    let mut changes = state.registry.subscribe();
    let stats = Arc::new(tether_net::udp::UdpStats::default());
    loop {
        while state.registry.get(cfg.agent()).is_none() {
            if changes.changed().await.is_err() {
                return;
            }
        }
        let socket = match tokio::net::UdpSocket::bind(cfg.listen).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                state.metrics.error("listener_bind");
                tracing::error!(listen = %cfg.listen, target = %cfg.target, "binding udp: {e}; retrying in {REBIND_DELAY:?}");
                tokio::time::sleep(REBIND_DELAY).await;
                continue;
            }
        };
        tracing::info!(listen = %cfg.listen, target = %cfg.target, "udp listener open (agent connected)");
        let gauge = state.metrics.sessions_of("listener");
        gauge.inc();
        let open = {
            let state = state.clone();
            let cfg = cfg.clone();
            move || {
                let entry = state.registry.get(cfg.agent());
                let service = cfg.service().to_owned();
                async move {
                    let entry = entry.ok_or_else(|| "agent offline".to_owned())?;
                    entry
                        .conn
                        .open(Target {
                            kind: tether_proto::TargetKind::Udp,
                            address: service,
                        })
                        .await
                        .map_err(|r| r.to_string())
                }
            }
        };
        let allow = {
            let cfg = cfg.clone();
            move |peer: &SocketAddr| cfg.allows(peer)
        };
        let server = tokio::spawn(tether_net::udp::serve_socket(
            socket,
            open,
            tether_net::udp::UdpLimits::default(),
            stats.clone(),
            allow,
        ));
        while state.registry.get(cfg.agent()).is_some() {
            if changes.changed().await.is_err() {
                break;
            }
        }
        server.abort();
        gauge.dec();
        tracing::info!(listen = %cfg.listen, target = %cfg.target, "udp listener closed (agent gone)");
    }
}
