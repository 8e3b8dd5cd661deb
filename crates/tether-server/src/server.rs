//! Binding the public port, accepting connections (with the connection caps
//! of [`crate::admission`]), the TLS handshake, and the server's life from
//! the first accept to the drain at shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tether_net::stall::WriteStall;
use tokio::net::{TcpListener, TcpStream};

use crate::auth::Authenticator;
use crate::cluster::Phase;
use crate::config::{ListenerConfig, ServerConfig};
use crate::connection::serve_connection;
use crate::reload::{Baseline, ConfigSource, Reloader};
use crate::router::Router;
use crate::state::State;
use tether_net::log_gate::LogGate;

/// The drain, once the listeners are closed: GOAWAY on client sessions and
/// graceful close of HTTP connections; live streams and requests get up to
/// `timeout` to finish (agent sessions still take opens for requests in
/// flight meanwhile); then GOAWAY `leaving` to the agents, and what is left
/// is reset.
async fn drain(state: &State, timeout: Duration) {
    let cluster = state.cluster();
    let metrics = state.metrics();
    cluster.set_phase(Phase::Closing);
    let clients = state.sessions().go_away_clients("server shutting down");
    tracing::info!(
        clients,
        streams = metrics.active_opens.get(),
        http_connections = metrics.http_connections.get(),
        ?timeout,
        "draining: GOAWAY sent to client sessions; waiting for live streams and requests"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    // Client sessions leave on their own once their streams are done (an
    // open they sent as the GOAWAY crossed it is answered going_away and
    // retried elsewhere, not cut off by closing the session under it).
    let finished = loop {
        if metrics.active_opens.get() <= 0
            && metrics.http_connections.get() <= 0
            && state.sessions().clients() == 0
        {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if !finished {
        tracing::warn!(
            streams = metrics.active_opens.get(),
            http_connections = metrics.http_connections.get(),
            client_sessions = state.sessions().clients(),
            "drain timeout: resetting what is left"
        );
    }
    let agents = state
        .sessions()
        .go_away_agents("this server replica is leaving");
    tracing::info!(
        agents = agents.len(),
        "GOAWAY (leaving) sent to agent sessions"
    );
    // Agents close their side once nothing is left on the session; give
    // them a moment, then close whatever remains.
    let closed = async {
        for c in &agents {
            c.transport_closed().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
    state.sessions().close_all("server shut down");
    tracing::info!("all sessions drained; exiting");
}

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a server stopped serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// `metrics_listen` could not be bound.
    #[error("metrics_listen {addr}: {source}")]
    MetricsListen {
        /// The address from the config.
        addr: SocketAddr,
        /// Why binding it failed.
        source: std::io::Error,
    },
}

/// A bound, not yet serving, server.
pub struct Server {
    listener: TcpListener,
    public_listeners: Vec<ListenerConfig>,
    fingerprint: Option<String>,
    metrics_listen: Option<SocketAddr>,
    state: State,
    router: Arc<Router>,
    reload: Option<(ConfigSource, Option<std::path::PathBuf>, Baseline)>,
    /// Applies reloads to what `bind` built (taken when serving starts).
    reloader: Option<Reloader>,
}

impl Server {
    /// Validates the config, loads or makes the certificate and binds the port.
    pub async fn bind(cfg: &ServerConfig) -> anyhow::Result<Server> {
        Self::check(cfg)?;
        let auth = Authenticator::from_config(cfg)?;
        auth.warn_plaintext();
        let (tls, fingerprint) = match &cfg.tls {
            None => (None, None),
            Some(t) => {
                let (a, fp) = crate::tls::build(t)?;
                (Some(a), Some(fp))
            }
        };
        let listener = tether_net::listen::bind(cfg.listen)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let state = State::new(cfg, auth, tls);
        Ok(Server {
            listener,
            public_listeners: cfg.listeners.clone(),
            fingerprint,
            metrics_listen: cfg.metrics_listen,
            router: Arc::new(state.router(cfg)),
            reloader: Some(state.reloader(cfg)),
            state,
            reload: None,
        })
    }

    /// Checks `cfg` the way [`Server::bind`] does before it reads any file
    /// or binds any port: credentials, rules, admins, listeners, `[http]`,
    /// `[cluster]`, `[session]` (`tether server --check-config`).
    pub fn check(cfg: &ServerConfig) -> anyhow::Result<()> {
        Authenticator::from_config(cfg)?;
        cfg.validate()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// What the server's parts share, for in-crate tests.
    #[cfg(test)]
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// SHA-256 fingerprint of the TLS certificate, when serving TLS.
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    /// Reloads from `source` on SIGHUP and when the config file (or a
    /// certificate, key or JWT key file it names) changes; `since` was
    /// taken before the config this server runs was read.
    pub fn with_reload(
        mut self,
        source: ConfigSource,
        config_file: Option<std::path::PathBuf>,
        since: Baseline,
    ) -> Self {
        self.reload = Some((source, config_file, since));
        self
    }

    /// A handle that makes the coming shutdown skip `shutdown_delay` (for
    /// an operator's Ctrl-C at a terminal: there is no load balancer to
    /// wait for). The drain itself still happens.
    pub fn skip_shutdown_delay_handle(&self) -> impl Fn() + Send + Sync + 'static {
        let cluster = self.state.cluster().clone();
        move || cluster.skip_shutdown_delay()
    }

    /// Accepts connections forever.
    pub async fn serve(self) -> Result<(), ServeError> {
        self.serve_until(std::future::pending()).await
    }

    /// Accepts connections until `shutdown` resolves, then drains (see
    /// [`drain`]) and returns.
    pub async fn serve_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let reloader = self.reloader.take();
        let state = &self.state;
        let cluster = state.cluster().clone();
        tracing::info!(addr = %self.local_addr(), tls = state.tls().serving(), replica = %cluster.id(), "server listening");
        if let Some(addr) = self.metrics_listen {
            let metrics = state.metrics().clone();
            let registry = state.registry().clone();
            let render = {
                let registry = registry.clone();
                Arc::new(move || {
                    metrics.agents.set(registry.online() as i64);
                    metrics.render()
                })
            };
            let probe = {
                let cluster = cluster.clone();
                Arc::new(move |path: &str, query: Option<&str>| {
                    cluster.probe(path, query, &registry)
                })
            };
            let bound = tether_net::observe::serve_observe(addr, render, probe)
                .await
                .map_err(|source| ServeError::MetricsListen { addr, source })?;
            tracing::info!(addr = %bound, "serving /metrics (not on the public port), /livez and /readyz");
        }
        let discovery = tokio::spawn(cluster.clone().discover());
        let watcher = match (self.reload.take(), reloader) {
            (Some((source, file, since)), Some(reloader)) => {
                Some(tokio::spawn(reloader.watch(source, file, since)))
            }
            _ => None,
        };
        let public: Vec<_> = self
            .public_listeners
            .iter()
            .map(|l| tokio::spawn(state.listener(l.clone()).run()))
            .collect();
        tokio::pin!(shutdown);
        self.accept_until(&mut shutdown).await;
        // Leaving: /readyz fails (404) so load balancers stop sending new
        // connections, while everything is still served for the delay.
        let (delay, drain_timeout) = cluster.drain_timers();
        cluster.set_phase(Phase::Leaving);
        tracing::info!(
            ?delay,
            "shutting down: /readyz now fails; still serving until the load balancers notice"
        );
        self.accept_until(tokio::time::sleep(delay)).await;
        drop(self.listener);
        for task in &public {
            task.abort();
        }
        if let Some(w) = &watcher {
            w.abort();
        }
        discovery.abort();
        drain(state, drain_timeout).await;
        Ok(())
    }

    /// Accepts connections until `until` resolves.
    async fn accept_until(&self, until: impl std::future::Future<Output = ()>) {
        tokio::pin!(until);
        loop {
            tokio::select! {
                (tcp, peer) = tether_net::listen::accept(&self.listener) => self.accept(tcp, peer),
                () = &mut until => return,
            }
        }
    }

    /// Admits one accepted connection (or closes it at a connection cap)
    /// and serves it in a task, after the TLS handshake if the server
    /// speaks TLS.
    fn accept(&self, tcp: TcpStream, peer: SocketAddr) {
        let state = &self.state;
        tether_net::listen::tune_accepted(&tcp);
        // Connection caps: refuse at once instead of running out of
        // file descriptors for everyone.
        let caps = state.limits().connection_caps();
        let hold = match state.admission().admit(peer.ip(), caps) {
            Ok(h) => h,
            Err(refused) => {
                state.metrics().limit_hit(refused.limit());
                static GATE: LogGate = LogGate::new();
                if let Some(skipped) = GATE.allow() {
                    tracing::warn!(skipped, %peer, open = state.admission().open(), limit = refused.limit().as_str(), raise_with = refused.limit().setting(), "connection limit reached; closing a new connection");
                }
                return;
            }
        };
        let router = self.router.clone();
        let metrics = state.metrics().clone();
        let tls = state.tls().get();
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                let tcp = WriteStall::new(tcp, caps.send_timeout);
                return serve_connection(router, metrics, tcp, peer, None, hold, caps.send_timeout)
                    .await;
            };
            // Under TLS, so that its close_notify (and the handshake's own
            // answer) is bounded too.
            let tcp = WriteStall::new(tcp, caps.send_timeout);
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => {
                    // A client certificate rustls verified against
                    // [tls] client_ca (agents with mtls = true).
                    let cert = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned());
                    serve_connection(router, metrics, s, peer, cert, hold, caps.send_timeout).await
                }
                Ok(Err(e)) => {
                    metrics.error("tls_handshake");
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    metrics.error("tls_handshake");
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}
