//! The handles the server shares between connections, and which part of
//! the server gets which.
//!
//! No subsystem sees this struct: each is built here from the handles it
//! uses (the credential store, the registry of agents, the metrics, the
//! limits, the tables of live sessions and streams, the browser logins, the
//! TLS acceptor, and the open path built on several of them), and holds
//! those only.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::admission::Admission;
use crate::auth::{AuthStore, Authenticator};
use crate::cluster::Cluster;
use crate::config::{ListenerConfig, ServerConfig};
use crate::limits::Limits;
use crate::listeners::Listener;
use crate::metrics::Metrics;
use crate::open::Opener;
use crate::raw_ws::RawWsEndpoint;
use crate::registry::Registry;
use crate::reload::Reloader;
use crate::router::{Endpoints, Router};
use crate::session_agent::AgentEndpoint;
use crate::session_client::ClientEndpoint;
use crate::sessions::Sessions;
use crate::streams::Streams;
use crate::tls::TlsSlot;
use crate::web::admin::AdminApi;
use crate::web::logins::WebSessions;
use crate::web::Web;

/// The shared handles.
pub(crate) struct State {
    auth: Arc<AuthStore>,
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    streams: Arc<Streams>,
    sessions: Arc<Sessions>,
    logins: Arc<WebSessions>,
    tls: Arc<TlsSlot>,
    admission: Arc<Admission>,
    opener: Opener,
}

impl State {
    /// Fresh handles for `cfg`, with its checked credentials and its TLS
    /// acceptor (if it serves TLS).
    pub(crate) fn new(cfg: &ServerConfig, auth: Authenticator, tls: Option<TlsAcceptor>) -> State {
        let auth = Arc::new(AuthStore::new(auth));
        let registry = Arc::new(Registry::default());
        let cluster = Arc::new(Cluster::new(&cfg.cluster, cfg.listen));
        let metrics = Arc::new(Metrics::default());
        metrics
            .replica
            .get_or_create(&crate::metrics::ReplicaLabel {
                replica: cluster.id().to_owned(),
            })
            .set(1);
        metrics.expect_agents(cfg.agents.iter().map(|a| a.name.as_str()));
        let limits = Arc::new(Limits::new(cfg.limits.clone(), cfg.max_streams_per_client));
        let streams = Arc::new(Streams::default());
        let opener = Opener::new(
            auth.clone(),
            registry.clone(),
            cluster.clone(),
            limits.clone(),
            metrics.clone(),
            streams.clone(),
        );
        State {
            auth,
            registry,
            cluster,
            metrics,
            limits,
            streams,
            sessions: Arc::default(),
            logins: Arc::default(),
            tls: Arc::new(TlsSlot::new(tls)),
            admission: Arc::default(),
            opener,
        }
    }

    /// The router of the public port, with every endpoint it routes to.
    pub(crate) fn router(&self, cfg: &ServerConfig) -> Router {
        let mut session_config = tether_proto::Config {
            software: format!("tether-server/{}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        cfg.session.apply(&mut session_config);
        // Client sessions told GOAWAY at shutdown get the drain timeout to
        // finish their streams.
        session_config.drain_timeout =
            std::time::Duration::from_millis(cfg.cluster.drain_timeout_ms);
        let agents = AgentEndpoint::new(
            self.auth.clone(),
            self.registry.clone(),
            self.cluster.clone(),
            self.metrics.clone(),
            self.limits.clone(),
            self.sessions.clone(),
            session_config.clone(),
        );
        let clients = ClientEndpoint::new(
            self.auth.clone(),
            self.metrics.clone(),
            self.limits.clone(),
            self.sessions.clone(),
            self.opener.clone(),
            session_config,
        );
        let raw = RawWsEndpoint::new(
            self.auth.clone(),
            self.metrics.clone(),
            self.limits.clone(),
            self.opener.clone(),
        );
        let web = Web::new(
            cfg.http.clone(),
            cfg.tls.is_some(),
            self.logins.clone(),
            self.opener.clone(),
            self.auth.clone(),
            self.registry.clone(),
            self.metrics.clone(),
            self.limits.clone(),
        );
        Router::new(
            Endpoints {
                agents,
                clients,
                raw,
                web,
                admin: AdminApi::new(
                    self.registry.clone(),
                    self.sessions.clone(),
                    self.streams.clone(),
                    self.cluster.clone(),
                ),
            },
            self.metrics.clone(),
            self.registry.clone(),
            self.cluster.clone(),
            cfg.metrics_listen.is_none(),
        )
    }

    /// One `[[listener]]`.
    pub(crate) fn listener(&self, cfg: ListenerConfig) -> Listener {
        Listener::new(
            cfg,
            self.registry.clone(),
            self.metrics.clone(),
            self.opener.clone(),
            self.cluster.clone(),
            self.limits.clone(),
        )
    }

    /// What applies a reload to a server started with `cfg`.
    pub(crate) fn reloader(&self, cfg: &ServerConfig) -> Reloader {
        Reloader::new(
            cfg.clone(),
            self.auth.clone(),
            self.limits.clone(),
            self.tls.clone(),
            self.sessions.clone(),
            self.streams.clone(),
            self.logins.clone(),
            self.metrics.clone(),
        )
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The registry of connected agents.
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The limits.
    pub(crate) fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// The live sessions.
    pub(crate) fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// The TLS acceptor in force.
    pub(crate) fn tls(&self) -> &Arc<TlsSlot> {
        &self.tls
    }

    /// The public port's connection counts.
    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }
}
