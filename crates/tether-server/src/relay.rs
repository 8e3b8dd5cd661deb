//! Relaying client streams onto agent streams.

use std::sync::Arc;
use std::time::Instant;
use tether_net::splice::{splice_until, ChunkRead, ChunkWrite};
use tether_net::{Incoming, Stream};
use tether_proto::target::ClientTarget;
use tether_proto::{OpenErrorCode, ResetCode, Target, TargetKind};

use crate::auth::ClientIdentity;
use crate::policy::Protocol;
use crate::State;

/// Why a client's open could not be relayed.
pub struct RelayRefusal {
    /// Code for OPEN_ERR / HTTP status mapping.
    pub code: OpenErrorCode,
    /// Human-readable reason for the client.
    pub reason: String,
}

/// One of a client identity's streams, counted against
/// `max_streams_per_client` across all its sessions and endpoints until
/// dropped.
pub struct ClientStreamPermit {
    state: Arc<State>,
    client: String,
}

impl Drop for ClientStreamPermit {
    fn drop(&mut self) {
        let mut g = self
            .state
            .client_streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.client);
            }
        }
    }
}

/// Takes one of `client`'s stream slots, if it has one left.
pub fn acquire_permit(state: &Arc<State>, client: &str) -> Option<ClientStreamPermit> {
    let mut g = state
        .client_streams
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let n = g.entry(client.to_owned()).or_insert(0);
    if *n >= state.max_streams_per_client {
        return None;
    }
    *n += 1;
    Some(ClientStreamPermit {
        state: state.clone(),
        client: client.to_owned(),
    })
}

/// Counts one open in `tether_pending_opens` until dropped (also when the
/// open is cancelled midway).
pub struct PendingGauge(prometheus_client::metrics::gauge::Gauge);

impl PendingGauge {
    /// Increments the gauge.
    pub fn new(state: &State) -> PendingGauge {
        state.metrics.pending_opens.inc();
        PendingGauge(state.metrics.pending_opens.clone())
    }
}

impl Drop for PendingGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What an allowed open holds for the life of its stream: the client's
/// stream slot, and the ticket that ends the stream if access is revoked
/// or the credential expires.
pub struct OpenGrant {
    _permit: ClientStreamPermit,
    /// Revocation ticket.
    pub ticket: crate::StreamTicket,
    /// The protocol the policy allowed.
    pub protocol: Protocol,
}

/// An open that passed [`admit`]: the client's stream slot, and the auth
/// generation it was decided under (for [`State::track_stream`]).
pub struct Admission {
    /// The client's stream slot.
    pub permit: ClientStreamPermit,
    /// Auth generation of the decision.
    pub generation: u64,
}

/// The policy's protocol for a stream kind.
pub fn protocol_of(kind: TargetKind) -> Protocol {
    match kind {
        TargetKind::Udp => Protocol::Udp,
        _ => Protocol::Tcp,
    }
}

/// Checks a client's open against the limits and the policy, with its metric
/// and audit line; `Ok` carries the client's stream slot.
pub fn admit(
    state: &Arc<State>,
    client: &ClientIdentity,
    agent: &str,
    service: &str,
    protocol: Protocol,
) -> Result<Admission, RelayRefusal> {
    // Read before the rules: a reload after this point makes
    // `track_stream` check the open again.
    let generation = state.auth_generation();
    let target = format!("{agent}/{service}");
    let deny = |code: OpenErrorCode, reason: String| {
        tracing::info!(target: "audit", identity = %client.name, %target, protocol = protocol.as_str(), decision = "denied", %reason, "audit");
        Err(RelayRefusal { code, reason })
    };
    let rate = match protocol {
        Protocol::Http => state.limits.request(&client.key()),
        _ => state.limits.open(&client.key()),
    };
    if let Err(hit) = rate {
        state.metrics.limit_hit(hit.limit);
        return deny(OpenErrorCode::TooManyStreams, hit.reason);
    }
    let auth = state.auth();
    let d = auth.decide(client, agent, service, protocol);
    state.metrics.decision(d.allowed);
    if !d.allowed {
        state.metrics.error("forbidden");
        return deny(OpenErrorCode::Forbidden, d.reason);
    }
    let Some(permit) = acquire_permit(state, &client.key()) else {
        state.metrics.limit_hit("streams_per_client");
        return deny(
            OpenErrorCode::TooManyStreams,
            format!(
                "client {} already has {} streams open (the limit, over all its sessions)",
                client.name, state.max_streams_per_client
            ),
        );
    };
    Ok(Admission { permit, generation })
}

/// Checks limits and policy, finds the agent and opens the stream on it.
/// The grant must live as long as the relayed stream.
pub async fn open_on_agent(
    state: &Arc<State>,
    client: &ClientIdentity,
    kind: TargetKind,
    address: &str,
) -> Result<(Stream, OpenGrant), RelayRefusal> {
    let refuse = |code: OpenErrorCode, reason: String| {
        state.metrics.error(code.as_str());
        Err(RelayRefusal { code, reason })
    };
    // One spelling per target before any policy runs (see tether_proto::target).
    let target = match ClientTarget::parse(address) {
        Ok(t) => t,
        Err(e) => return refuse(OpenErrorCode::BadTarget, e.to_string()),
    };
    let agent = target.agent.as_str();
    let service = &target.service.to_string();
    let protocol = protocol_of(kind);
    let admission = admit(state, client, agent, service, protocol)?;
    let Some(entry) = state.registry.get(agent) else {
        return refuse(
            OpenErrorCode::AgentOffline,
            format!("agent {agent} is not connected"),
        );
    };
    let pending = match state.limits.pending(&client.key()) {
        Ok(p) => p,
        Err(hit) => {
            state.metrics.limit_hit(hit.limit);
            return refuse(OpenErrorCode::TooManyStreams, hit.reason);
        }
    };
    let gauge = PendingGauge::new(state);
    let r = entry
        .conn
        .open(Target {
            kind,
            address: service.to_owned(),
        })
        .await;
    drop(gauge);
    drop(pending);
    match r {
        Ok(s) => {
            let Some(ticket) =
                state.track_stream(client, agent, service, protocol, admission.generation)
            else {
                drop(s);
                return refuse(OpenErrorCode::Forbidden, crate::ACCESS_REVOKED.into());
            };
            Ok((
                s,
                OpenGrant {
                    _permit: admission.permit,
                    ticket,
                    protocol,
                },
            ))
        }
        Err(tether_net::Refusal { code, reason }) => {
            tracing::info!(target: "audit", identity = %client.name, target = %address, protocol = protocol.as_str(), decision = "allowed", result = %code, %reason, "audit");
            refuse(code, format!("agent {agent}: {reason}"))
        }
    }
}

/// Serves one stream a client session asked for.
pub async fn relay_client_stream(
    state: Arc<State>,
    client: ClientIdentity,
    mut incoming: Incoming,
) {
    let started = Instant::now();
    let target = incoming.target().clone();
    let client_stream_id = incoming.id();
    // If the client gives up while the agent is still dialing, drop the
    // agent-side open too (it is reset), so pending opens stay within the
    // client's stream cap.
    let opened = tokio::select! {
        r = open_on_agent(&state, &client, target.kind, &target.address) => r,
        _ = incoming.cancelled() => {
            tracing::debug!(client = %client.name, stream = %client_stream_id, target = %target, "client cancelled the open");
            return;
        }
    };
    match opened {
        Err(RelayRefusal { code, reason }) => {
            tracing::info!(client = %client.name, stream = %client_stream_id, target = %target, %code, "open refused: {reason}");
            incoming.reject(code, &reason);
        }
        Ok((agent_stream, grant)) => {
            let client_stream = match incoming.accept() {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(client = %client.name, "client went away before the open finished: {e}");
                    return;
                }
            };
            tracing::info!(client = %client.name, stream = %client_stream_id, target = %target, "stream open");
            let (cr, cw) = client_stream.split();
            let (ar, aw) = agent_stream.split();
            run_relay(
                &state,
                &client.name,
                &target.address,
                started,
                Some(grant),
                (cr, cw),
                (ar, aw),
            )
            .await;
        }
    }
}

/// Splices a client side onto an agent stream with metrics, revocation and
/// the closing audit line.
pub async fn run_relay<CR, CW, AR, AW>(
    state: &Arc<State>,
    client: &str,
    target: &str,
    started: Instant,
    grant: Option<OpenGrant>,
    (cr, cw): (CR, CW),
    (ar, aw): (AR, AW),
) where
    CR: ChunkRead,
    CW: ChunkWrite,
    AR: ChunkRead,
    AW: ChunkWrite,
{
    state.metrics.live_streams.inc();
    state.metrics.streams_total.inc();
    // Server-side listeners are the operator's: no identity, no revocation.
    let ended = grant.as_ref().map(|g| g.ticket.ended());
    let stop = async move {
        let why = match ended {
            Some(e) => e.await,
            None => std::future::pending().await,
        };
        (ResetCode::Forbidden, why.to_owned())
    };
    let report = splice_until(cr, cw, ar, aw, stop).await;
    state.metrics.live_streams.dec();
    state.metrics.add_bytes(report.a_to_b, report.b_to_a);
    let ms = started.elapsed().as_millis() as u64;
    let protocol = grant.as_ref().map_or("tcp", |g| g.protocol.as_str());
    let result = match &report.error {
        None => "closed".to_owned(),
        Some(e) => {
            state.metrics.error("stream_reset");
            format!("error: {e}")
        }
    };
    tracing::info!(target: "audit", identity = %client, %target, protocol, decision = "allowed", bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, %result, "audit");
}
