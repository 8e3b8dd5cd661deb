//! The one open path: every stream the server opens on an agent (CLI and
//! SOCKS / HTTP CONNECT streams, raw WebSockets, browser requests through
//! the HTTP proxy, `[[listener]]` connections and UDP flows) is admitted,
//! counted and tracked here, the same way, and holds one [`OpenGuard`] that
//! gives everything back when dropped, also when the open is cancelled
//! halfway (a client that gives up, a UDP flow evicted while it opens).
//!
//! An open runs up to three stages, always in this order:
//!
//! 1. **admit** ([`OpenGuard::admit`]): the caller's rate (stream opens, or
//!    HTTP requests), the policy (for client identities only: listeners are
//!    the operator's and bypass it, SECURITY.md 2.2), and one of the
//!    caller's stream slots (`max_streams_per_client`);
//! 2. **dial** ([`OpenGuard::dial`]): the agent's session, one of the
//!    caller's pending-open slots (`max_pending_opens_per_client`) and the
//!    `tether_pending_opens` gauge, held only while the agent answers;
//! 3. **track** ([`OpenGuard::track`]): the stream's entry in the table of
//!    live streams, so a reload or a JWT's expiry ends it; an open admitted
//!    before a reload is checked again here.
//!
//! [`Opener::open`] runs all three. The HTTP proxy splits them because its
//! streams are pooled: a request is admitted and tracked
//! ([`Opener::admit_request`]), and the pool's connector dials new streams
//! ([`Opener::dial_pooled`]), charged to the caller whose request needed
//! one.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use tether_net::log_gate::LogGate;
use tether_net::{Connection, Refusal, Stream};
use tether_proto::target::ClientTarget;
use tether_proto::{OpenErrorCode, Target, TargetKind};
use tokio::time::Instant;

use crate::auth::AuthStore;
use crate::cluster::{Cluster, NOT_HERE_WINDOW};
use crate::config::Protocol;
use crate::identity::{ClientIdentity, IdentityKind};
use crate::limits::{Limit, Limits};
use crate::metrics::Metrics;
use crate::policy::target_name;
use crate::registry::{AgentEntry, Registry};
use crate::streams::{self, StreamOwner, Streams, Traffic, ACCESS_REVOKED};

/// Who opens: whether the policy applies, and the identity the limits are
/// counted under.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// An authenticated client: the policy decides, and its limits are
    /// counted under [`ClientIdentity::key`].
    Client(ClientIdentity),
    /// A server-side `[[listener]]`: configured by the operator, so no
    /// policy; its connections and flows together are one pseudo-identity
    /// for the limits (`listener:ADDR`).
    Listener(ListenerCaller),
}

/// A `[[listener]]` as a caller: its limit key and its name, spelled once
/// when the listener is set up rather than at each of its connections.
#[derive(Debug, Clone)]
pub(crate) struct ListenerCaller {
    key: Arc<str>,
    name: Arc<str>,
}

impl Caller {
    /// The caller for the listener on `addr`: `listener:ADDR` for TCP,
    /// `listener:udp:ADDR` for UDP. A TCP and a UDP listener may share a
    /// port (DNS); each has limits of its own, or the TCP connections would
    /// take the stream slots the UDP flow table counts on.
    pub(crate) fn listener(addr: SocketAddr, udp: bool) -> Caller {
        let (key, name) = if udp {
            (
                format!("listener:udp:{addr}"),
                format!("listener udp {addr}"),
            )
        } else {
            (format!("listener:{addr}"), format!("listener {addr}"))
        };
        Caller::Listener(ListenerCaller {
            key: key.into(),
            name: name.into(),
        })
    }

    /// The key its limits are counted under.
    pub(crate) fn key(&self) -> Arc<str> {
        match self {
            Caller::Client(c) => c.key().clone(),
            Caller::Listener(l) => l.key.clone(),
        }
    }

    /// The name in logs and audit lines.
    pub(crate) fn name(&self) -> &str {
        match self {
            Caller::Client(c) => &c.name,
            Caller::Listener(l) => &l.name,
        }
    }

    /// How it is named in a refusal ("client alice", "listener ADDR").
    fn describe(&self) -> String {
        match self {
            Caller::Client(c) => format!("client {}", c.name),
            Caller::Listener(l) => l.name.to_string(),
        }
    }
}

/// The policy's protocol for a stream kind.
pub(crate) fn protocol_of(kind: TargetKind) -> Protocol {
    match kind {
        TargetKind::Udp => Protocol::Udp,
        _ => Protocol::Tcp,
    }
}

/// The HTTP status that answers a refused open.
pub(crate) fn http_status(code: OpenErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY)
}

/// The handles an open uses.
struct Handles {
    auth: Arc<AuthStore>,
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    streams: Arc<Streams>,
}

/// Opens streams on agents (cheap to clone).
#[derive(Clone)]
pub(crate) struct Opener(Arc<Handles>);

impl Opener {
    /// An opener over these handles.
    pub(crate) fn new(
        auth: Arc<AuthStore>,
        registry: Arc<Registry>,
        cluster: Arc<Cluster>,
        limits: Arc<Limits>,
        metrics: Arc<Metrics>,
        streams: Arc<Streams>,
    ) -> Opener {
        Opener(Arc::new(Handles {
            auth,
            registry,
            cluster,
            limits,
            metrics,
            streams,
        }))
    }

    /// A guard that holds nothing yet, for `key`. The auth generation is
    /// read first: a reload after this point makes [`OpenGuard::track`]
    /// check the open again.
    fn guard(&self, key: Arc<str>, protocol: Protocol) -> OpenGuard {
        OpenGuard {
            h: self.0.clone(),
            generation: self.0.auth.generation(),
            key,
            protocol,
            stream_slot: false,
            pending: false,
            live: None,
            expires_at: None,
            login: None,
            early_bytes: 0,
        }
    }

    /// Opens a stream to `target` (`AGENT/SERVICE` as the caller wrote it,
    /// parsed with the one grammar of [`ClientTarget`]) for `caller`: admit,
    /// dial, track. Refusals are counted (`tether_errors_total`, and
    /// `tether_limit_hits_total` for limits). The guard must live as long
    /// as the stream. `early` is the stream's first bytes, if the caller
    /// has them already (at most [`tether_proto::MAX_EARLY_DATA`]): they
    /// travel with the open to the agent.
    pub(crate) async fn open(
        &self,
        caller: &Caller,
        target: &str,
        kind: TargetKind,
        early: Bytes,
    ) -> Result<(Stream, OpenGuard), Refusal> {
        let refuse = |r: Refusal| {
            self.0.metrics.error(r.code.as_str());
            r
        };
        let parsed = match ClientTarget::parse(target) {
            Ok(parsed) => parsed,
            Err(e) => {
                // A bad target costs an open like any other: its refusals
                // would otherwise come at no rate.
                if let Err(hit) = self.0.limits.open(&caller.key()) {
                    self.0.metrics.limit_hit(hit.limit);
                    return Err(refuse(Refusal::new(
                        OpenErrorCode::TooManyStreams,
                        hit.reason,
                    )));
                }
                return Err(refuse(Refusal::new(
                    OpenErrorCode::BadTarget,
                    e.to_string(),
                )));
            }
        };
        let agent = parsed.agent.as_str();
        let service = parsed.service.to_string();
        let protocol = protocol_of(kind);
        let mut guard = self.guard(caller.key(), protocol);
        guard.admit(caller, agent, &service)?;
        guard.early_bytes = early.len() as u64;
        // Boxed: the dial's state is large and lives only while dialing; the
        // relay task that awaits this open keeps every byte of its own
        // state for the stream's whole life.
        let (stream, conn) = match Box::pin(guard.dial(agent, &service, kind, early)).await {
            Ok(dialed) => dialed,
            Err(Dial::Server(r)) => return Err(refuse(r)),
            Err(Dial::Agent(r)) => {
                tracing::info!(target: "audit", identity = %caller.name(), %target, protocol = protocol.as_str(), decision = "allowed", result = %r.code, reason = %r.reason, "audit");
                return Err(refuse(Refusal::new(
                    r.code,
                    format!("agent {agent}: {}", r.reason),
                )));
            }
        };
        let traffic = Traffic::OnSession(conn, stream.id());
        guard
            .track(caller, agent, &service, traffic)
            .map_err(refuse)?;
        Ok((stream, guard))
    }

    /// Admits one HTTP request through the proxy to `agent`/`service`: the
    /// request's rate, the policy (protocol `http`) and a stream slot, held
    /// by the guard until the response is done. Call [`OpenGuard::track`]
    /// once the response is there; the stream itself comes from the pool
    /// ([`Opener::dial_pooled`]).
    pub(crate) fn admit_request(
        &self,
        client: &Caller,
        agent: &str,
        service: &str,
    ) -> Result<OpenGuard, Refusal> {
        // The proxy's route names the service as the URL spelled it: a raw
        // target must already be in its one spelling (see
        // tether_proto::target), or a rule about it could be walked around.
        if service.contains(':') && !tether_proto::target::RawTarget::is_canonical(service) {
            return Err(Refusal {
                code: OpenErrorCode::BadTarget,
                reason: format!("{agent}/{service} is not a target in its canonical form"),
            });
        }
        let mut guard = self.guard(client.key(), Protocol::Http);
        guard.admit(client, agent, service)?;
        Ok(guard)
    }

    /// Dials a stream for the HTTP proxy's pool, charged to `key` (the
    /// caller whose request needs it) while the agent answers; with the
    /// agent session it runs on. Refusals are counted by the proxy, which
    /// answers them.
    pub(crate) async fn dial_pooled(
        &self,
        key: Arc<str>,
        agent: &str,
        service: &str,
    ) -> Result<(Stream, Connection), Refusal> {
        // A new tunnel stream is an open like any: charged to the caller's
        // open rate, not only its request rate (requests whose connection
        // never goes back to the pool, such as WebSocket upgrades or logins
        // bound to their connection, dial one each).
        if let Err(hit) = self.0.limits.open(&key) {
            self.0.metrics.limit_hit(hit.limit);
            return Err(Refusal::new(OpenErrorCode::TooManyStreams, hit.reason));
        }
        let mut guard = self.guard(key, Protocol::Http);
        match guard
            .dial(agent, service, TargetKind::Tcp, Bytes::new())
            .await
        {
            Ok(s) => {
                self.0.metrics.streams_total.inc();
                Ok(s)
            }
            Err(Dial::Server(r)) => Err(r),
            Err(Dial::Agent(r)) => {
                Err(Refusal::new(r.code, format!("agent {agent}: {}", r.reason)))
            }
        }
    }
}

impl Opener {
    /// A live session of `agent` to open on: at once when this replica has
    /// one; else, when the replica just started or the agent's session here
    /// just ended, the first to arrive within `[cluster] agent_wait_ms`.
    /// The refusal says which replica and why: `not_here` when the agent
    /// was connected here lately (a reconnect or a partition: another
    /// replica, or a retry, may well reach it), `agent_offline` otherwise.
    pub(crate) async fn find_agent(&self, agent: &str) -> Result<AgentEntry, Refusal> {
        find_agent(&self.0, agent, None, true).await
    }
}

/// A live session of `agent` other than `except`; when there is none and
/// `hold`, waits for one as [`Opener::find_agent`] says.
async fn find_agent(
    h: &Handles,
    agent: &str,
    except: Option<u64>,
    hold: bool,
) -> Result<AgentEntry, Refusal> {
    if let Some(e) = h.registry.pick(agent, except) {
        return Ok(e);
    }
    let wait = if hold {
        h.cluster.hold_for(&h.registry, agent)
    } else {
        std::time::Duration::ZERO
    };
    // A wait for the agent's session, if this open may wait and a wait is
    // free. With every wait taken, the refusal says so, or it would read as
    // a plain "not connected".
    let held = (!wait.is_zero()).then(|| h.cluster.take_hold());
    let no_wait_left = matches!(held, Some(None));
    if let Some(Some(_held)) = held {
        let mut changes = h.registry.subscribe();
        let deadline = Instant::now() + wait;
        loop {
            if let Some(e) = h.registry.pick(agent, except) {
                tracing::debug!(%agent, "an open waited for the agent's session and got it");
                return Ok(e);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
    let replica = h.cluster.id();
    if no_wait_left {
        h.metrics.error("held_opens_full");
        return Err(Refusal::new(
            OpenErrorCode::NotHere,
            format!(
                "replica {replica} has no session to agent {agent} yet, and the {} opens it lets wait for reconnecting agents are all waiting; retry",
                crate::cluster::MAX_HELD_OPENS
            ),
        ));
    }
    let draining = !h.registry.instances(agent).is_empty();
    Err(if draining {
        Refusal::new(
            OpenErrorCode::NotHere,
            format!("replica {replica}: every session of agent {agent} is draining"),
        )
    } else if h.registry.seen_within(agent, NOT_HERE_WINDOW) {
        Refusal::new(
            OpenErrorCode::NotHere,
            format!("replica {replica} has no session to agent {agent} right now (it was connected here lately; retry)"),
        )
    } else if h.cluster.new_among_peers() && h.auth.get().is_agent_name(agent) {
        // Not "offline": this replica cannot know yet. A client retries
        // not_here through the load balancer, likely onto a peer that has
        // the agent. (A name no agent may register under is offline for
        // sure.)
        Refusal::new(
            OpenErrorCode::NotHere,
            format!("replica {replica} started {} s ago and agent {agent} has not reached it yet (retry)", h.cluster.uptime().as_secs()),
        )
    } else {
        Refusal::new(
            OpenErrorCode::AgentOffline,
            format!("agent {agent} is not connected (to replica {replica})"),
        )
    })
}

/// Why a dial failed: refused here, or by the agent.
enum Dial {
    Server(Refusal),
    Agent(Refusal),
}

/// Everything one open holds, given back on drop: the caller's stream slot,
/// its pending-open slot and the `tether_pending_opens` gauge while the
/// agent has not answered, and the stream's entry in the table of live
/// streams.
pub(crate) struct OpenGuard {
    h: Arc<Handles>,
    /// The auth generation the open was decided under.
    generation: u64,
    /// The caller's limits key.
    key: Arc<str>,
    protocol: Protocol,
    stream_slot: bool,
    pending: bool,
    /// Key and revocation signal in the table of live streams.
    live: Option<(u64, Arc<crate::streams::Revocation>)>,
    /// When the caller's credential expires (a JWT), or the browser login
    /// it came with.
    expires_at: Option<Instant>,
    /// Notified when the browser login it came with signs out.
    login: Option<Arc<crate::streams::Revocation>>,
    /// Bytes that went to the agent with the open (early data).
    early_bytes: u64,
}

impl OpenGuard {
    /// Stage 1: the caller's rate, the policy for client identities, and a
    /// stream slot, each refusal with its metric and audit line.
    fn admit(&mut self, caller: &Caller, agent: &str, service: &str) -> Result<(), Refusal> {
        let h = &self.h;
        let protocol = self.protocol;
        let deny = |code: OpenErrorCode, reason: String| {
            // A UDP listener's flow source costs nothing to make up
            // (spoofed addresses, a port per datagram): its denials are
            // written a second apart at most, with how many were not. (A
            // client's are its own, and all written.)
            static UDP_GATE: LogGate = LogGate::new();
            let gated = matches!((protocol, caller), (Protocol::Udp, Caller::Listener(_)));
            let written = if gated { UDP_GATE.allow() } else { Some(0) };
            if let Some(skipped) = written {
                let target = target_name(agent, service);
                let skipped = gated.then_some(skipped);
                tracing::info!(target: "audit", identity = %caller.name(), %target, protocol = protocol.as_str(), decision = "denied", %reason, skipped, "audit");
            }
            Err(Refusal::new(code, reason))
        };
        let rate = match protocol {
            Protocol::Http => h.limits.request(&self.key),
            _ => h.limits.open(&self.key),
        };
        if let Err(hit) = rate {
            h.metrics.limit_hit(hit.limit);
            return deny(OpenErrorCode::TooManyStreams, hit.reason);
        }
        if let Caller::Client(client) = caller {
            let d = h.auth.get().decide(client, agent, service, protocol);
            h.metrics.decision(d.allowed);
            if !d.allowed {
                h.metrics.error("forbidden");
                return deny(OpenErrorCode::Forbidden, d.reason);
            }
        }
        if !h.limits.take_stream(&self.key) {
            h.metrics.limit_hit(Limit::StreamsPerClient);
            return deny(
                OpenErrorCode::TooManyStreams,
                format!(
                    "{} already has {} streams open (the limit, over all its sessions; the server's {} raises it)",
                    caller.describe(),
                    h.limits.max_streams(),
                    Limit::StreamsPerClient.setting()
                ),
            );
        }
        self.stream_slot = true;
        h.metrics.active_opens.inc();
        Ok(())
    }

    /// Stage 2: takes a pending-open slot, finds the agent's session and
    /// opens the stream. The slot and the gauge are given back when the
    /// agent answers, or when this future is dropped. The slot comes first:
    /// an open waiting for its agent to (re)connect here waits in the
    /// replica's shared pool of held opens, and one identity must not fill
    /// it past its own pending-open cap.
    async fn dial(
        &mut self,
        agent: &str,
        service: &str,
        kind: TargetKind,
        early: Bytes,
    ) -> Result<(Stream, Connection), Dial> {
        if let Err(hit) = self.h.limits.take_pending(&self.key) {
            self.h.metrics.limit_hit(hit.limit);
            return Err(Dial::Server(Refusal::new(
                OpenErrorCode::TooManyStreams,
                hit.reason,
            )));
        }
        self.h.metrics.pending_opens.inc();
        self.pending = true;
        let entry = find_agent(&self.h, agent, None, true)
            .await
            .map_err(Dial::Server)?;
        let target = Target {
            kind,
            address: service.to_owned(),
        };
        let mut session = entry.conn.clone();
        let mut opened = session.open_with(target.clone(), early.clone()).await;
        if let Err(r) = &opened {
            // The member left (or began draining, or went silent) before it
            // answered: no byte has moved yet, so the open goes once to
            // another member, or, when the member is draining (an agent
            // restarting), to its next session here (the short hold); with
            // none, the refusal says not_here and the client retries
            // through another replica. A session lost to silence is a
            // partition: no hold, the agent will not come back here soon.
            // Early data goes again with the retry (PROTOCOL.md 6.3: in
            // the rare case that the lost member had passed it on, the
            // service sees it twice, the first time on a connection the
            // member then closed).
            if matches!(
                r.code,
                OpenErrorCode::SessionLost | OpenErrorCode::GoingAway
            ) {
                let hold = r.code == OpenErrorCode::GoingAway;
                match find_agent(&self.h, agent, Some(entry.generation), hold).await {
                    Ok(other) => {
                        tracing::debug!(%agent, instance = %other.instance, "open retried on another session: {r}");
                        session = other.conn.clone();
                        opened = session.open_with(target.clone(), early.clone()).await;
                        if let Err(again) = &opened {
                            if matches!(
                                again.code,
                                OpenErrorCode::SessionLost | OpenErrorCode::GoingAway
                            ) {
                                // Two sessions of the agent here are gone:
                                // another replica is the better bet.
                                self.end_pending();
                                return Err(Dial::Server(Refusal::new(
                                    OpenErrorCode::NotHere,
                                    format!(
                                        "replica {}: the sessions of agent {agent} here were lost ({})",
                                        self.h.cluster.id(),
                                        again.reason
                                    ),
                                )));
                            }
                        }
                    }
                    Err(refusal) => {
                        self.end_pending();
                        return Err(Dial::Server(refusal));
                    }
                }
            }
        }
        if let Err(r) = &opened {
            // The member picked by load does not offer the service, and
            // another does (a pool in the middle of a change): no byte has
            // moved, so the open goes there.
            if r.code == OpenErrorCode::UnknownService {
                let picked = entry.generation;
                if let Some(other) = self.h.registry.pick_listing(agent, service, Some(picked)) {
                    tracing::debug!(%agent, %service, instance = %other.instance, "open retried on a member that lists the service");
                    session = other.conn.clone();
                    opened = session.open_with(target, early.clone()).await;
                }
            }
        }
        self.end_pending();
        opened.map(|s| (s, session)).map_err(Dial::Agent)
    }

    /// Stage 3: enters the stream in the table of live streams, with where
    /// its byte counts come from (`traffic`). A client identity's stream is
    /// revocable: when a reload happened since [`OpenGuard::admit`] (while
    /// the agent was dialing, say), that reload could not see this stream,
    /// so it is checked against the current tables now. A listener's
    /// streams are the operator's and only listed.
    pub(crate) fn track(
        &mut self,
        caller: &Caller,
        agent: &str,
        service: &str,
        traffic: Traffic,
    ) -> Result<(), Refusal> {
        let owner = match caller {
            Caller::Client(identity) => StreamOwner::Client(identity.clone()),
            Caller::Listener(l) => StreamOwner::Listener(l.name.clone()),
        };
        self.live = Some(
            self.h
                .streams
                .insert(owner, agent, service, self.protocol, traffic),
        );
        // Listeners are the operator's: no credential to expire or revoke.
        let Caller::Client(identity) = caller else {
            return Ok(());
        };
        if matches!(identity.kind, IdentityKind::Jwt { .. }) {
            let leeway = self.h.auth.get().jwt_leeway();
            let jwt = identity.expires_at_within(Instant::now(), leeway);
            self.expires_at = earliest(self.expires_at, jwt);
        }
        if self.h.auth.generation() != self.generation {
            let auth = self.h.auth.get();
            if !auth.client_revalidate(identity)
                || !auth.decide(identity, agent, service, self.protocol).allowed
            {
                return Err(Refusal::new(
                    OpenErrorCode::Forbidden,
                    ACCESS_REVOKED.to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// Ties the stream to the browser login the request came with: it
    /// ends when `signed_out` is notified (logout, or the login pushed out
    /// of a full table) or at `expires` (the login's end).
    pub(crate) fn end_with_login(
        &mut self,
        signed_out: Arc<crate::streams::Revocation>,
        expires: Instant,
    ) {
        self.login = Some(signed_out);
        self.expires_at = earliest(self.expires_at, Some(expires));
    }

    /// Resolves, with the reason, when the stream must end: a reload
    /// revoked its access, its caller's credential (a JWT) expired, or the
    /// browser login it came with ended. Never, for a stream that is
    /// neither tracked nor tied to a login.
    pub(crate) fn ended(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = &'static str> + Send>> {
        streams::ended(
            self.live.as_ref().map(|(_, n)| n.clone()),
            self.login.clone(),
            self.expires_at,
        )
    }

    /// The protocol the open was admitted for.
    pub(crate) fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Bytes that went to the agent with the open (early data): part of
    /// what the caller sent, though the relay's splice never saw them.
    pub(crate) fn early_bytes(&self) -> u64 {
        self.early_bytes
    }

    /// The caller's limits key (the HTTP proxy's pool charges its dials to
    /// it).
    pub(crate) fn key(&self) -> &Arc<str> {
        &self.key
    }

    fn end_pending(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.h.limits.release_pending(&self.key);
            self.h.metrics.pending_opens.dec();
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some((key, _)) = self.live.take() {
            self.h.streams.remove(key);
        }
        if std::mem::take(&mut self.stream_slot) {
            self.h.limits.release_stream(&self.key);
            self.h.metrics.active_opens.dec();
        }
        // The gauge last: once it reads zero, everything else is back too.
        self.end_pending();
    }
}

/// The earlier of two deadlines, either of which may be absent.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;
    use crate::config::{LimitsConfig, ServerConfig};
    use std::time::Duration;
    use tether_net::session::IncomingStreams;
    use tether_net::transport::mem;
    use tether_net::Connection;

    /// An opener whose agent `prod` never answers an open (it holds them),
    /// with at most one pending open and `max_streams` streams per caller.
    /// `alice` may open `prod/web` only.
    async fn silent_agent(max_streams: usize) -> (Opener, Connection, IncomingStreams) {
        let h = opener(r#"["prod/web"]"#, max_streams);
        let ((agent_conn, held), (conn, _)) = mem::sessions().await.unwrap();
        let _ = h.0.registry.register(
            "prod",
            "",
            conn,
            "127.0.0.1:1".parse().unwrap(),
            "agent".into(),
            3,
            |_| {},
        );
        (h, agent_conn, held)
    }

    /// An opener (its replica just started, no agent connected) where
    /// `alice` may open `allow`, with at most one pending open.
    fn opener(allow: &str, max_streams: usize) -> Opener {
        let cfg: ServerConfig = toml::from_str(&format!(
            "[[client]]\nname = \"alice\"\ntoken = \"alice-token\"\nallow = {allow}\n"
        ))
        .unwrap();
        let limits = LimitsConfig {
            max_pending_opens_per_client: 1,
            ..Default::default()
        };
        Opener::new(
            Arc::new(AuthStore::new(Authenticator::from_config(&cfg).unwrap())),
            Arc::default(),
            Arc::new(Cluster::new(
                &Default::default(),
                "127.0.0.1:7700".parse().unwrap(),
            )),
            Arc::new(Limits::new(limits, max_streams)),
            Arc::default(),
            Arc::default(),
        )
    }

    /// Opens waiting for an agent to connect here count as pending: one
    /// identity cannot hold more of the replica's waiting slots than its
    /// pending-open cap.
    #[tokio::test]
    async fn an_open_waiting_for_its_agent_holds_a_pending_slot() {
        let h = opener(r#"["ghost/web"]"#, 4);
        let first = tokio::spawn({
            let h = h.clone();
            async move {
                let alice = alice(&h);
                h.open(&alice, "ghost/web", TargetKind::Tcp, Bytes::new())
                    .await
            }
        });
        let waited = std::time::Instant::now();
        while pending(&h) == 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(2),
                "the open waiting for its agent holds no pending slot"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = std::time::Instant::now();
        let second = h
            .open(&alice(&h), "ghost/web", TargetKind::Tcp, Bytes::new())
            .await;
        let refusal = second.err().unwrap();
        assert_eq!(refusal.code, OpenErrorCode::TooManyStreams, "{refusal}");
        assert!(started.elapsed() < Duration::from_secs(1), "it waited");
        first.abort();
        let _ = first.await;
        assert_eq!(pending(&h), 0);
    }

    /// With every wait for a reconnecting agent taken, an open is refused
    /// at once, and the refusal names that limit rather than reading as
    /// "not connected".
    #[tokio::test]
    async fn an_open_with_no_wait_left_says_so() {
        let h = opener(r#"["ghost/web"]"#, 4);
        let held: Vec<_> = std::iter::from_fn(|| h.0.cluster.take_hold())
            .take(crate::cluster::MAX_HELD_OPENS + 1)
            .collect();
        assert_eq!(held.len(), crate::cluster::MAX_HELD_OPENS);
        let started = std::time::Instant::now();
        let refusal = h.find_agent("ghost").await.err().unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "it waited");
        assert_eq!(refusal.code, OpenErrorCode::NotHere, "{refusal}");
        assert!(refusal.reason.contains("1024 opens"), "{refusal}");
        drop(held);
        // With a wait free, the same open waits (the replica just started).
        let started = std::time::Instant::now();
        let refusal = h.find_agent("ghost").await.err().unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1), "{refusal}");
        assert!(!refusal.reason.contains("1024 opens"), "{refusal}");
    }

    fn alice(h: &Opener) -> Caller {
        Caller::Client(h.0.auth.get().client("alice-token").unwrap())
    }

    fn pending(h: &Opener) -> i64 {
        h.0.metrics.pending_opens.get()
    }

    #[tokio::test]
    async fn listeners_bypass_the_policy_but_not_the_limits() {
        let (h, _agent, mut held) = silent_agent(4).await;
        let listener = Caller::listener("127.0.0.1:9000".parse().unwrap(), false);
        // A UDP listener on the same port has limits of its own.
        let udp = Caller::listener("127.0.0.1:9000".parse().unwrap(), true);
        assert_ne!(udp.key(), listener.key());
        // The policy: alice may not open prod/db; a listener may.
        let r = h
            .open(&alice(&h), "prod/db", TargetKind::Tcp, Bytes::new())
            .await;
        assert_eq!(r.err().map(|r| r.code), Some(OpenErrorCode::Forbidden));
        let first = tokio::spawn({
            let h = h.clone();
            let listener = listener.clone();
            async move {
                h.open(&listener, "prod/db", TargetKind::Tcp, Bytes::new())
                    .await
            }
        });
        // Kept: a dropped one would answer the open.
        let _got_first = held.recv().await.unwrap();
        assert_eq!(pending(&h), 1);
        // The limits: a second open of the same listener waits on nothing,
        // it is refused at its pending-open cap, like a client's.
        let second = h
            .open(&listener, "prod/db", TargetKind::Udp, Bytes::new())
            .await;
        let refusal = second.err().unwrap();
        assert_eq!(refusal.code, OpenErrorCode::TooManyStreams);
        assert!(
            refusal.reason.contains("listener:127.0.0.1:9000"),
            "{refusal}"
        );
        // Another caller has its own budget.
        let theirs = tokio::spawn({
            let h = h.clone();
            let alice = alice(&h);
            async move {
                h.open(&alice, "prod/web", TargetKind::Tcp, Bytes::new())
                    .await
            }
        });
        let _got_theirs = held.recv().await.unwrap();
        assert_eq!(pending(&h), 2);
        first.abort();
        theirs.abort();
        let _ = (first.await, theirs.await);
        assert_eq!(pending(&h), 0);
    }

    #[tokio::test]
    async fn a_cancelled_open_gives_everything_back() {
        let (h, _agent, mut held) = silent_agent(1).await;
        let client = alice(&h);
        for _ in 0..3 {
            // Cancelled while the agent dials: the pending slot, the gauge
            // and the stream slot (at most one per caller here) are all
            // back, or the next round would be refused.
            let open = h.open(&client, "prod/web", TargetKind::Tcp, Bytes::new());
            let r = tokio::time::timeout(Duration::from_millis(100), open).await;
            assert!(r.is_err(), "the open is still pending when cancelled");
            assert_eq!(pending(&h), 0);
            let _got = held.recv().await.unwrap();
        }
        // A refused open gives back what it took too: the stream slot.
        let r = h
            .open(&client, "prod/db", TargetKind::Tcp, Bytes::new())
            .await;
        assert_eq!(r.err().map(|r| r.code), Some(OpenErrorCode::Forbidden));
        assert!(h.0.limits.take_stream(&client.key()));
    }
}
