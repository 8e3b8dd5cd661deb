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

mod admission;
pub(crate) use admission::ConnectionHold;
pub mod auth;
pub mod config;
mod http;
pub mod jwt;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod relay;
pub mod reload;
pub mod web;

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub use config::ServerConfig;

pub use tether_proto::endpoints::{AGENT_PATH, CLIENT_PATH, RAW_WS_PREFIX};

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
/// How often an HTTP/2 connection is pinged (it is dropped when a ping goes
/// unanswered for [`HEADER_READ_TIMEOUT`]).
pub const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);

/// Who a tracked multiplexed session belongs to (re-checked on reload).
#[derive(Debug, Clone)]
pub enum SessionOwner {
    /// An agent, by token (its SHA-256) or by certificate (`None`).
    Agent {
        /// Agent name.
        name: String,
        /// SHA-256 of the token it used, if any.
        token_hash: Option<[u8; 32]>,
    },
    /// A CLI client.
    Client(auth::ClientIdentity),
}

/// One relayed stream, re-checked against the policy on reload.
pub struct LiveStream {
    /// Who opened it.
    pub identity: auth::ClientIdentity,
    /// Agent.
    pub agent: String,
    /// Service or `host:port`.
    pub service: String,
    /// Protocol.
    pub protocol: policy::Protocol,
    /// Notified when the stream must end (its access was revoked).
    pub revoked: Arc<tokio::sync::Notify>,
}

/// Why a tracked stream must end (see [`StreamTicket::ended`]).
pub const ACCESS_REVOKED: &str = "access revoked by the server's configuration";
/// Why a tracked stream of an expired JWT identity ends.
pub const CREDENTIAL_EXPIRED: &str = "credential expired";

/// Removes a live stream from the table when dropped.
pub struct StreamTicket {
    state: Arc<State>,
    key: u64,
    revoked: Arc<tokio::sync::Notify>,
    expires_at: Option<tokio::time::Instant>,
}

impl StreamTicket {
    /// Resolves, with the reason, when the stream must end: a reload
    /// revoked its access, or its identity's credential (a JWT) expired.
    pub fn ended(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = &'static str> + Send>> {
        let revoked = self.revoked.clone();
        let expires_at = self.expires_at;
        Box::pin(async move {
            let expiry = async {
                match expires_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = revoked.notified() => ACCESS_REVOKED,
                _ = expiry => CREDENTIAL_EXPIRED,
            }
        })
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        self.state
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// State shared by every connection of the server.
pub struct State {
    /// Credential tables and policy (swapped whole on reload).
    auth: std::sync::RwLock<Arc<auth::Authenticator>>,
    /// Bumped by every [`State::set_auth`], so an open admitted before a
    /// reload can tell that it must be checked again.
    auth_generation: std::sync::atomic::AtomicU64,
    /// Per-identity and global limits.
    pub limits: limits::Limits,
    /// Current TLS acceptor (swapped on reload).
    tls_acceptor: std::sync::RwLock<Option<tokio_rustls::TlsAcceptor>>,
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
    /// Whether `/metrics` is served on the public port (no `metrics_listen`).
    pub public_metrics: bool,
    /// Who may hold a connection on the public port.
    admission: Arc<admission::Admission>,
    /// Live relayed streams per client identity.
    client_streams: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Every live multiplexed session (agents and clients), for draining
    /// and for re-checking credentials on reload.
    sessions: std::sync::Mutex<
        std::collections::HashMap<u64, (tether_net::Connection, Option<SessionOwner>)>,
    >,
    /// Every relayed stream opened by a client identity.
    streams: std::sync::Mutex<std::collections::HashMap<u64, LiveStream>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl State {
    /// The current credential tables and policy.
    pub fn auth(&self) -> Arc<auth::Authenticator> {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs new credential tables and policy.
    pub fn set_auth(&self, a: auth::Authenticator) {
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(a);
        self.auth_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The current auth generation; read it *before* deciding an open and
    /// pass it to [`State::track_stream`].
    pub fn auth_generation(&self) -> u64 {
        self.auth_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current TLS acceptor.
    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls_acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs a new TLS acceptor (new handshakes use it).
    pub fn set_tls_acceptor(&self, a: tokio_rustls::TlsAcceptor) {
        *self.tls_acceptor.write().unwrap_or_else(|p| p.into_inner()) = Some(a);
    }

    /// Registers a relayed stream for revocation checks; keep the ticket
    /// for the stream's life. `admitted_under` is the auth generation the
    /// open was decided under: when a reload happened since (while the
    /// agent was dialing, say), the stream was not in the table when that
    /// reload checked it, so it is checked now, and `None` means it is no
    /// longer allowed.
    pub fn track_stream(
        self: &Arc<Self>,
        identity: &auth::ClientIdentity,
        agent: &str,
        service: &str,
        protocol: policy::Protocol,
        admitted_under: u64,
    ) -> Option<StreamTicket> {
        let key = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let revoked = Arc::new(tokio::sync::Notify::new());
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                LiveStream {
                    identity: identity.clone(),
                    agent: agent.to_owned(),
                    service: service.to_owned(),
                    protocol,
                    revoked: revoked.clone(),
                },
            );
        let ticket = StreamTicket {
            state: self.clone(),
            key,
            revoked,
            expires_at: identity
                .expires_in()
                .map(|d| tokio::time::Instant::now() + d),
        };
        if self.auth_generation() != admitted_under {
            let auth = self.auth();
            if !auth.client_revalidate(identity)
                || !auth.decide(identity, agent, service, protocol).allowed
            {
                return None;
            }
        }
        Some(ticket)
    }

    /// Closes sessions whose credentials no longer hold and ends streams the
    /// policy no longer allows. Returns (sessions closed, streams ended).
    pub fn enforce(&self) -> (usize, usize) {
        let auth = self.auth();
        let mut closed = 0;
        for (conn, owner) in self.lock_sessions().values() {
            let valid = match owner {
                None => true,
                Some(SessionOwner::Agent { name, token_hash }) => {
                    auth.agent_still_valid(name, token_hash.as_ref())
                }
                Some(SessionOwner::Client(id)) => auth.client_revalidate(id),
            };
            if !valid && !conn.is_closed() {
                tracing::warn!(session = %conn.label(), "credentials revoked: closing the session");
                conn.close(
                    tether_proto::ErrorCode::Unauthorized,
                    "credentials revoked by the server's configuration",
                );
                closed += 1;
            }
        }
        let mut ended = 0;
        for s in self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let allowed = auth.client_revalidate(&s.identity)
                && auth
                    .decide(&s.identity, &s.agent, &s.service, s.protocol)
                    .allowed;
            if !allowed {
                s.revoked.notify_one();
                ended += 1;
            }
        }
        // Browser logins whose credential no longer holds end now.
        self.web_sessions.retain(|id| auth.client_revalidate(id));
        (closed, ended)
    }

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
    pub fn track(&self, conn: tether_net::Connection, owner: Option<SessionOwner>) -> u64 {
        let key = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock_sessions().insert(key, (conn, owner));
        key
    }

    /// Forgets a session.
    pub fn untrack(&self, key: u64) {
        self.lock_sessions().remove(&key);
    }

    #[allow(clippy::type_complexity)]
    fn lock_sessions(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<u64, (tether_net::Connection, Option<SessionOwner>)>,
    > {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends GOAWAY on every session and waits until they are all gone (each
    /// session resets its last streams at its drain deadline).
    pub async fn drain(&self, reason: &str) {
        let conns: Vec<tether_net::Connection> = self
            .lock_sessions()
            .values()
            .map(|(c, _)| c.clone())
            .collect();
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
    fingerprint: Option<String>,
    metrics_listen: Option<SocketAddr>,
    state: Arc<State>,
    reload: Option<(reload::ConfigSource, Option<std::path::PathBuf>)>,
}

impl Server {
    /// Validates the config, loads or makes the certificate and binds the port.
    pub async fn bind(cfg: &ServerConfig) -> anyhow::Result<Server> {
        let auth = auth::Authenticator::from_config(cfg)?;
        auth.warn_plaintext();
        for l in &cfg.listeners {
            l.validate()?;
        }
        cfg.http.validate()?;
        let (tls, fingerprint) = match &cfg.tls {
            None => (None, None),
            Some(t) => {
                let (a, fp) = reload::build_tls(t)?;
                (Some(a), Some(fp))
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
            fingerprint,
            metrics_listen: cfg.metrics_listen,
            reload: None,
            state: Arc::new_cyclic(|weak| State {
                auth: std::sync::RwLock::new(Arc::new(auth)),
                auth_generation: Default::default(),
                limits: limits::Limits::new(cfg.limits.clone()),
                tls_acceptor: std::sync::RwLock::new(tls),
                streams: Default::default(),
                registry: registry::Registry::default(),
                metrics: metrics::Metrics::default(),
                session_config,
                max_streams_per_client: cfg.max_streams_per_client.max(1),
                web: cfg.http.clone(),
                web_sessions: Default::default(),
                web_pool: web::proxy::Pool::new(weak.clone()),
                tls: cfg.tls.is_some(),
                public_metrics: cfg.metrics_listen.is_none(),
                admission: Default::default(),
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

    /// Reloads from `source` on SIGHUP and when the config file (or a
    /// certificate, key or JWT key file it names) changes.
    pub fn with_reload(
        mut self,
        source: reload::ConfigSource,
        config_file: Option<std::path::PathBuf>,
    ) -> Self {
        self.reload = Some((source, config_file));
        self
    }

    /// The URL scheme agents and clients should use (`ws` or `wss`).
    pub fn scheme(&self) -> &'static str {
        if self.state.tls {
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
        tracing::info!(addr = %self.local_addr(), tls = self.state.tls, "server listening");
        if let Some(addr) = self.metrics_listen {
            let state = self.state.clone();
            let render = Arc::new(move || {
                state.metrics.agents.set(state.registry.len() as i64);
                state.metrics.render()
            });
            let bound = tether_net::observe::serve_metrics(addr, render)
                .await
                .with_context(|| format!("metrics_listen {addr}"))?;
            tracing::info!(addr = %bound, "serving /metrics (not on the public port)");
        }
        let watcher = self
            .reload
            .clone()
            .map(|(source, file)| tokio::spawn(reload::watch(self.state.clone(), source, file)));
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
                    if let Some(w) = &watcher {
                        w.abort();
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
            // Connection caps: refuse at once instead of running out of
            // file descriptors for everyone.
            let hold = match self
                .state
                .admission
                .admit(peer.ip(), self.state.limits.connection_caps())
            {
                Ok(h) => h,
                Err(refused) => {
                    self.state.metrics.limit_hit(refused.limit());
                    tracing::warn!(%peer, open = self.state.admission.open(), limit = refused.limit(), "connection limit reached; closing a new connection");
                    continue;
                }
            };
            let state = self.state.clone();
            let tls = self.state.tls_acceptor();
            tokio::spawn(async move {
                match tls {
                    None => http::serve_connection(state, tcp, peer, None, hold).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => {
                                // A client certificate rustls verified against
                                // [tls] client_ca (agents with mtls = true).
                                let cert = s
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| c.clone().into_owned());
                                http::serve_connection(state, s, peer, cert, hold).await
                            }
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
