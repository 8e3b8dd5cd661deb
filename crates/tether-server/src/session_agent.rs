//! Agent sessions (`/tether/v1/agent`): authentication by token or client
//! certificate, the upgrade, and the session's life in the registry (the
//! newest session of a name and instance wins; sessions of one name with
//! different instances form a pool; see [`crate::registry`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use tether_net::Connection;
use tether_proto::ErrorCode;
use tokio_rustls::rustls::pki_types::CertificateDer;

use crate::auth::{token_hash, AuthStore};
use crate::cluster::{Cluster, REPLICAS_REFRESH};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::registry::{Registry, MAX_INSTANCES};
use crate::response::{text, Resp};
use crate::sessions::{credential_holds, revoke, SessionOwner, Sessions};
use crate::upgrade::{
    accept_session, authenticated_hold, limit_refusal, require_token, tether_upgrade, unknown_token,
};
use tether_net::log_gate::LogGate;

/// How long a probe session (`X-Tether-Probe`), closed by the server right
/// after its handshake, may take to say goodbye.
const PROBE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The agent endpoint and the handles its sessions use.
pub(crate) struct AgentEndpoint {
    auth: Arc<AuthStore>,
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    sessions: Arc<Sessions>,
    /// Protocol settings of accepted sessions.
    session_config: tether_proto::Config,
}

/// A verified client certificate's claim to be agent `name` (mutual TLS):
/// one of its DNS names is `name`, byte for byte. Not webpki's server-name
/// check, which lets `*.prod.corp` stand for every agent under `prod.corp`
/// and ignores letter case (so `prod` would also be `PROD`): here a
/// certificate names one agent, the one it spells out.
fn cert_names_agent(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.valid_dns_names()
        .any(|dns| dns == name && !dns.contains('*'))
}

impl AgentEndpoint {
    /// The endpoint over these handles.
    pub(crate) fn new(
        auth: Arc<AuthStore>,
        registry: Arc<Registry>,
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        limits: Arc<Limits>,
        sessions: Arc<Sessions>,
        session_config: tether_proto::Config,
    ) -> AgentEndpoint {
        AgentEndpoint {
            auth,
            registry,
            cluster,
            metrics,
            limits,
            sessions,
            session_config,
        }
    }

    /// Authenticates an agent's upgrade request and, when it passes, runs
    /// its session in a task; returns the answer to the request.
    pub(crate) fn upgrade(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        client_cert: Option<&CertificateDer<'static>>,
    ) -> Resp {
        let checked_at = self.auth.generation();
        let auth = self.auth.get();
        let claimed = req
            .headers()
            .get(tether_proto::endpoints::AGENT_NAME_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // A client certificate naming a `mtls = true` agent, or a token.
        let by_cert = match (client_cert, &claimed) {
            (Some(cert), Some(c))
                if auth.agent_by_cert([c.as_str()]).is_some() && cert_names_agent(cert, c) =>
            {
                Some(c.clone())
            }
            _ => None,
        };
        let (name, token_hash) = match by_cert {
            Some(n) => (n, None),
            None if client_cert.is_some() && crate::auth::bearer(req.headers()).is_none() => {
                // A certificate (verified against client_ca) and no token:
                // it was meant as the credential; say why it is none,
                // rather than that a token is missing.
                let why = match &claimed {
                    None => "the upgrade names no agent (X-Tether-Agent)".to_owned(),
                    Some(c) if auth.agent_by_cert([c.as_str()]).is_none() => {
                        format!("agent {c:?} has no [[agent]] entry with mtls = true")
                    }
                    Some(c) => format!("the certificate has no DNS name {c:?}"),
                };
                self.metrics.error("bad_certificate");
                static GATE: LogGate = LogGate::new();
                if let Some(skipped) = GATE.allow() {
                    tracing::warn!(skipped, %peer, "agent client certificate not accepted: {why}");
                }
                return text(
                    StatusCode::UNAUTHORIZED,
                    format!("client certificate not accepted: {why}"),
                );
            }
            None => {
                let token = match require_token(&self.metrics, &req, peer, "agent", false) {
                    Ok(t) => t,
                    Err(r) => return *r,
                };
                let Some(name) = auth.agent(&token).map(str::to_owned) else {
                    return unknown_token(&self.metrics, peer, "agent");
                };
                (name, Some(token_hash(&token)))
            }
        };
        if let Some(claimed) = &claimed {
            if *claimed != name {
                self.metrics.error("agent_name_mismatch");
                tracing::warn!(%peer, %claimed, token_for = %name, "agent name does not match its token");
                return text(
                    StatusCode::FORBIDDEN,
                    format!("this token belongs to agent {name:?}, not {claimed:?}"),
                );
            }
        }
        let instance = match req
            .headers()
            .get(tether_proto::endpoints::AGENT_INSTANCE_HEADER)
            .map(|v| v.to_str().map(str::to_owned))
        {
            None => String::new(),
            Some(Ok(i)) if tether_proto::endpoints::valid_instance_id(&i) => i,
            Some(_) => {
                self.metrics.error("bad_instance");
                tracing::warn!(%peer, agent = %name, "agent instance id is not 1-128 visible ASCII characters");
                return text(
                    StatusCode::BAD_REQUEST,
                    "the instance id must be 1 to 128 visible ASCII characters",
                );
            }
        };
        let resp = tether_upgrade(&req);
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return resp;
        }
        let probe = req
            .headers()
            .contains_key(tether_proto::endpoints::AGENT_PROBE_HEADER);
        if !probe && self.already_held(&req, &name, &instance) {
            tracing::debug!(agent = %name, %instance, %peer, "this agent instance holds a live session here already: upgrade refused (409), its session kept");
            let mut resp = text(
                StatusCode::CONFLICT,
                format!(
                    "agent {name} instance {instance} already holds a live session to replica {}",
                    self.cluster.id()
                ),
            );
            if let Ok(id) = http::HeaderValue::from_str(self.cluster.id()) {
                resp.headers_mut()
                    .insert(tether_proto::endpoints::REPLICA_HEADER, id);
            }
            return resp;
        }
        if !probe && self.registry.is_full_for(&name, &instance) {
            self.metrics.error("agent_pool_full");
            tracing::warn!(agent = %name, %instance, %peer, "agent pool full: {MAX_INSTANCES} instances already connected; upgrade refused (503)");
            return pool_full(&name);
        }
        let slot = match self.limits.agent_session(&name) {
            Ok(s) => s,
            Err(hit) => return limit_refusal(&self.metrics, peer, hit),
        };
        let hold = authenticated_hold(&req);
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _hold = hold;
            if probe {
                this.probe(req, peer, name).await;
                return;
            }
            this.run(req, peer, name, instance, token_hash, checked_at)
                .await
        });
        resp
    }

    /// Whether the dialing agent instance says it holds this replica
    /// (`X-Tether-Held`, version 9) and a live session of it is here: a
    /// dial that landed through the load balancer on a replica the agent
    /// holds. Replacing that session would drain its streams for nothing,
    /// and an agent that keeps looking for an unreachable replica would do
    /// it every few seconds.
    fn already_held(&self, req: &Request<Incoming>, name: &str, instance: &str) -> bool {
        let me = self.cluster.id();
        let listed = req
            .headers()
            .get(tether_proto::endpoints::AGENT_HELD_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ids| {
                ids.split(',')
                    .take(tether_proto::endpoints::MAX_HELD_IDS)
                    .any(|id| id.trim() == me)
            });
        listed && self.registry.has_live(name, instance)
    }

    /// The WebSocket and the session handshake of an agent's upgrade; the
    /// server takes no opens from agents.
    async fn accept(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        label: String,
    ) -> Option<(
        Connection,
        tether_net::SessionInfo,
        tether_net::session::IncomingStreams,
    )> {
        let mut cfg = self.session_config.clone();
        cfg.accept_opens = false;
        accept_session(&self.metrics, req, cfg, label, peer).await
    }

    /// A credential check (`X-Tether-Probe`, version 9: `tether doctor
    /// --agent`): the handshake, then the session ends without being
    /// registered. Registered, it would join the agent's pool and be
    /// picked for opens it refuses, or replace an agent process.
    async fn probe(&self, req: Request<Incoming>, peer: SocketAddr, name: String) {
        let label = format!("agent={name} (probe)");
        let Some((conn, _info, _incoming)) = self.accept(req, peer, label).await else {
            return;
        };
        tracing::info!(agent = %name, %peer, "agent credential checked (probe): not registered");
        // The handshake was the answer: ended at once, the probe holds its
        // session slot no longer than any upgrade does.
        conn.close(ErrorCode::Normal, "probe done");
        let _ = tokio::time::timeout(PROBE_LINGER, conn.transport_closed()).await;
    }

    /// One agent session, from the handshake to its end.
    async fn run(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        name: String,
        instance: String,
        token_hash: Option<[u8; 32]>,
        checked_at: u64,
    ) {
        let via = if token_hash.is_some() {
            "token"
        } else {
            "certificate"
        };
        let label = if instance.is_empty() {
            format!("agent={name}")
        } else {
            format!("agent={name}/{instance}")
        };
        let Some((conn, info, _incoming)) = self.accept(req, peer, label).await else {
            return;
        };
        let owner = SessionOwner::Agent {
            name: name.clone(),
            token_hash,
        };
        // A reload during the handshake that revoked this credential: close
        // before registering, or the session would first replace a genuine
        // instance of the agent (GOAWAY `replaced`, which that agent waits
        // out for a minute) and take opens. (A reload from here on is
        // caught by `track`.)
        if !credential_holds(&owner, &self.auth, checked_at) {
            revoke(&conn);
            return;
        }
        let instances = self.metrics.agent_instances(&name);
        let registered = match self.registry.register(
            &name,
            &instance,
            conn.clone(),
            peer,
            info.peer_software.clone(),
            info.version,
            |n| {
                instances.set(n as i64);
            },
        ) {
            Ok(r) => r,
            Err(_) => {
                self.metrics.error("agent_pool_full");
                tracing::warn!(agent = %name, %instance, %peer, "agent pool full: {MAX_INSTANCES} instances already connected");
                conn.close(
                    ErrorCode::Internal,
                    &format!("agent {name} already has {MAX_INSTANCES} instances connected to this replica"),
                );
                return;
            }
        };
        if let Some(old) = registered.replaced {
            self.metrics.error("agent_replaced");
            tracing::warn!(agent = %name, %instance, old_addr = %old.addr, new_addr = %peer, "agent instance re-registered: newest session wins, draining the old one");
            old.conn.go_away(
                ErrorCode::Replaced,
                "a newer session of this agent instance connected",
            );
        }
        let key = self.sessions.track(
            conn.clone(),
            owner,
            peer,
            &info.peer_software,
            &self.auth,
            checked_at,
        );
        let live = self.metrics.session_live("agent");
        tracing::info!(agent = %name, %instance, %peer, software = %info.peer_software, version = info.version, auth = via, instances = registered.instances, "agent connected");
        let started = Instant::now();
        let why = tokio::select! {
            why = conn.closed() => why,
            () = tell_replicas(&conn, &self.cluster) => None,
        };
        drop(live);
        self.sessions.untrack(key);
        self.registry.unregister(&name, registered.generation, |n| {
            self.metrics.agent_left(&name, &instances, n);
        });
        tracing::info!(agent = %name, %instance, %peer, duration_s = started.elapsed().as_secs(), reason = why.as_deref().unwrap_or("drained"), "agent disconnected");
    }
}

/// The refusal of a session that would be a ninth instance of `name` here:
/// before the `101`, so the agent learns why without a handshake that
/// would only end at once.
fn pool_full(name: &str) -> Resp {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("agent {name} already has {MAX_INSTANCES} instances connected to this replica"),
    )
}

/// Tells the agent which replicas exist (REPLICAS, version 4): now and on
/// every change, and every [`REPLICAS_REFRESH`] where the session is older
/// than version 7. Never returns.
async fn tell_replicas(conn: &Connection, cluster: &Cluster) {
    let resend = resends_replicas(conn.version());
    let mut replicas = cluster.replicas();
    loop {
        let list = replicas.borrow_and_update().clone();
        conn.announce_replicas(list);
        let refresh = async {
            match resend {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = replicas.changed() => if r.is_err() { return std::future::pending().await },
            () = refresh => {}
        }
    }
}

/// How often an unchanged replica list is sent again on a session of
/// `version`: versions 4 to 6 were promised a resend every 30 s; from 7 a
/// list stands for the session's life, and the resend (a timer and a write
/// per idle agent) is dropped.
fn resends_replicas(version: u16) -> Option<std::time::Duration> {
    (version < tether_proto::REPLICAS_ON_CHANGE_VERSION).then_some(REPLICAS_REFRESH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_for(names: &[&str]) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        rcgen::generate_simple_self_signed(names)
            .expect("a test certificate")
            .cert
            .der()
            .clone()
    }

    #[test]
    fn a_certificate_names_only_the_agents_it_spells_out() {
        let wildcard = cert_for(&["*.prod.corp"]);
        assert!(!cert_names_agent(&wildcard, "b.prod.corp"));
        assert!(!cert_names_agent(&wildcard, "*.prod.corp"));
        let plain = cert_for(&["prod", "edge-1"]);
        assert!(cert_names_agent(&plain, "prod"));
        assert!(cert_names_agent(&plain, "edge-1"));
        assert!(!cert_names_agent(&plain, "PROD"));
        assert!(!cert_names_agent(&plain, "Prod"));
        assert!(!cert_names_agent(&plain, "prod2"));
        assert!(!cert_names_agent(
            &CertificateDer::from(vec![1u8, 2, 3]),
            "prod"
        ));
    }

    #[test]
    fn only_sessions_before_version_7_get_the_replica_list_again() {
        for v in tether_proto::REPLICAS_VERSION..tether_proto::REPLICAS_ON_CHANGE_VERSION {
            assert_eq!(resends_replicas(v), Some(REPLICAS_REFRESH), "version {v}");
        }
        assert_eq!(
            resends_replicas(tether_proto::REPLICAS_ON_CHANGE_VERSION),
            None
        );
        assert_eq!(resends_replicas(tether_proto::PROTOCOL_VERSION), None);
    }
}
