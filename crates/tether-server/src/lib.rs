//! The tether server: the public gateway.
//!
//! It listens on one port (plain or TLS) and serves:
//!
//! | path | what |
//! |------|------|
//! | `/tether/v1/agent` | agent sessions (WebSocket, subprotocol `tether.v1`, agent token) |
//! | `/tether/v1/client` | CLI client sessions (same protocol, client token) |
//! | `/tether/v1/ws/AGENT/SERVICE` | raw WebSocket: one WebSocket = one stream |
//! | `/healthz` | liveness |
//! | `/metrics` | Prometheus metrics |
//! | `/`, `/login`, `/a/AGENT/SERVICE/`, `SERVICE.AGENT.BASE_DOMAIN` | browser access (see [`web`]) |

pub mod auth;
pub mod config;
mod http;
pub mod listeners;
pub mod metrics;
pub mod registry;
pub mod relay;
pub mod web;

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_net::transport::tls::ServerIdentity;
use tokio::net::TcpListener;

pub use config::ServerConfig;

/// Path of the agent endpoint.
pub const AGENT_PATH: &str = "/tether/v1/agent";
/// Path of the CLI client endpoint.
pub const CLIENT_PATH: &str = "/tether/v1/client";
/// Prefix of the raw WebSocket endpoint (`/tether/v1/ws/AGENT/SERVICE`).
pub const RAW_WS_PREFIX: &str = "/tether/v1/ws/";

/// Default for the most streams one client (identity, over all its
/// sessions) may have open or opening at once (`max_streams_per_client`). Well
/// below an agent's own limit (8192), so a
/// client that floods opens cannot take every stream of an agent from the
/// others.
pub const MAX_STREAMS_PER_CLIENT: usize = 512;

/// How long a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send the request headers (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every connection of the server.
pub struct State {
    /// Credential tables.
    pub auth: auth::Authenticator,
    /// Connected agents.
    pub registry: registry::Registry,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Protocol settings of accepted sessions.
    pub session_config: tether_proto::Config,
    /// Stream cap of each client identity (over all its sessions).
    pub max_streams_per_client: usize,
    /// Browser access settings.
    pub web: web::WebConfig,
    /// Logged-in browsers.
    pub web_sessions: web::login::WebSessions,
    /// Keep-alive tunnel streams to web services.
    pub web_pool: web::proxy::Pool,
    /// Whether the server itself serves TLS.
    pub tls: bool,
    /// Live relayed streams per client identity.
    client_streams: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Every live multiplexed session (agents and clients), for draining.
    sessions: std::sync::Mutex<std::collections::HashMap<u64, tether_net::Connection>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl State {
    /// Whether cookies are marked `Secure`.
    pub fn secure_cookies(&self) -> bool {
        self.web.secure_cookies.unwrap_or(self.tls)
    }

    /// The scheme browsers use to reach this server.
    pub fn public_scheme(&self) -> &'static str {
        if self.tls || self.web.secure_cookies == Some(true) {
            "https"
        } else {
            "http"
        }
    }

    /// Remembers a live session until [`State::untrack`].
    pub fn track(&self, conn: tether_net::Connection) -> u64 {
        let key = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock_sessions().insert(key, conn);
        key
    }

    /// Forgets a session.
    pub fn untrack(&self, key: u64) {
        self.lock_sessions().remove(&key);
    }

    fn lock_sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, tether_net::Connection>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends GOAWAY on every session and waits until they are all gone (each
    /// session resets its last streams at its drain deadline).
    pub async fn drain(&self, reason: &str) {
        let conns: Vec<tether_net::Connection> = self.lock_sessions().values().cloned().collect();
        tracing::info!(
            sessions = conns.len(),
            "draining: GOAWAY sent to every session"
        );
        for c in &conns {
            c.go_away(tether_proto::ErrorCode::Normal, reason);
        }
        for c in conns {
            c.closed().await;
        }
    }
}

/// A bound, not yet serving, server.
pub struct Server {
    listener: TcpListener,
    public_listeners: Vec<listeners::ListenerConfig>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    fingerprint: Option<String>,
    state: Arc<State>,
}

impl Server {
    /// Validates the config, loads or makes the certificate and binds the port.
    pub async fn bind(cfg: &ServerConfig) -> anyhow::Result<Server> {
        let auth = auth::Authenticator::from_config(cfg)?;
        for l in &cfg.listeners {
            l.validate()?;
        }
        cfg.http.validate()?;
        let (tls, fingerprint) = match &cfg.tls {
            None => (None, None),
            Some(t) => {
                let id = match (&t.cert, &t.key, t.self_signed) {
                    (Some(c), Some(k), false) => ServerIdentity::from_pem_files(c, k)?,
                    (None, None, true) => ServerIdentity::self_signed(&t.names)?,
                    _ => anyhow::bail!("[tls]: set cert and key, or self_signed = true"),
                };
                // h2 for browsers; agents and clients ask for http/1.1
                // (WebSocket upgrades need it).
                let sc = id.server_config(&[b"h2", b"http/1.1"])?;
                (
                    Some(tokio_rustls::TlsAcceptor::from(sc)),
                    Some(id.fingerprint()),
                )
            }
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let mut session_config = tether_proto::Config {
            software: format!("tether-server/{}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        cfg.session.apply(&mut session_config);
        Ok(Server {
            listener,
            public_listeners: cfg.listeners.clone(),
            tls,
            fingerprint,
            state: Arc::new_cyclic(|weak| State {
                auth,
                registry: registry::Registry::default(),
                metrics: metrics::Metrics::default(),
                session_config,
                max_streams_per_client: cfg.max_streams_per_client.max(1),
                web: cfg.http.clone(),
                web_sessions: Default::default(),
                web_pool: web::proxy::Pool::new(weak.clone()),
                tls: cfg.tls.is_some(),
                client_streams: Default::default(),
                sessions: Default::default(),
                next_session: Default::default(),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// SHA-256 fingerprint of the TLS certificate, when serving TLS.
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    /// The URL scheme agents and clients should use (`ws` or `wss`).
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "wss"
        } else {
            "ws"
        }
    }

    /// Shared state (registry, metrics).
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Accepts connections forever.
    pub async fn serve(self) -> anyhow::Result<()> {
        self.serve_until(std::future::pending()).await
    }

    /// Accepts connections until `shutdown` resolves, then stops accepting,
    /// drains every session (GOAWAY; streams get the drain deadline to
    /// finish) and returns.
    pub async fn serve_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr(), tls = self.tls.is_some(), "server listening");
        let public: Vec<_> = self
            .public_listeners
            .iter()
            .map(|l| tokio::spawn(listeners::run(self.state.clone(), l.clone())))
            .collect();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = &mut shutdown => {
                    drop(self.listener);
                    for task in &public {
                        task.abort();
                    }
                    self.state.drain("server shutting down").await;
                    tracing::info!("all sessions drained");
                    return Ok(());
                }
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let state = self.state.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => http::serve_connection(state, tcp, peer).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => http::serve_connection(state, s, peer).await,
                            Ok(Err(e)) => {
                                state.metrics.error("tls_handshake");
                                tracing::debug!(%peer, "TLS handshake failed: {e}");
                            }
                            Err(_) => {
                                state.metrics.error("tls_handshake");
                                tracing::debug!(%peer, "TLS handshake timed out");
                            }
                        }
                    }
                }
            });
        }
    }
}
