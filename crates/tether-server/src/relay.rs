//! Relaying client streams onto agent streams.

use std::sync::Arc;
use std::time::Instant;
use tether_net::splice::{splice, ChunkRead, ChunkWrite};
use tether_net::{Incoming, Stream};
use tether_proto::{OpenErrorCode, Target, TargetKind};

use crate::auth::ClientIdentity;
use crate::State;

/// Splits a client target `agent/service` (the service part may itself be
/// `host:port`).
pub fn parse_client_target(address: &str) -> Option<(&str, &str)> {
    let (agent, service) = address.split_once('/')?;
    if agent.is_empty() || service.is_empty() {
        return None;
    }
    Some((agent, service))
}

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

/// Checks policy and the client's stream budget, finds the agent and opens
/// the stream on it. The permit must live as long as the relayed stream.
pub async fn open_on_agent(
    state: &Arc<State>,
    client: &ClientIdentity,
    kind: TargetKind,
    address: &str,
) -> Result<(Stream, ClientStreamPermit), RelayRefusal> {
    let refuse = |code: OpenErrorCode, reason: String| {
        state.metrics.error(code.as_str());
        Err(RelayRefusal { code, reason })
    };
    let Some((agent, service)) = parse_client_target(address) else {
        return refuse(
            OpenErrorCode::BadTarget,
            format!("target {address:?} is not AGENT/SERVICE"),
        );
    };
    if !client.may_open(agent, service) {
        return refuse(
            OpenErrorCode::Forbidden,
            format!("client {} may not open {agent}/{service}", client.name),
        );
    }
    let Some(permit) = acquire_permit(state, &client.name) else {
        return refuse(
            OpenErrorCode::TooManyStreams,
            format!(
                "client {} already has {} streams open (the limit, over all its sessions)",
                client.name, state.max_streams_per_client
            ),
        );
    };
    let Some(entry) = state.registry.get(agent) else {
        return refuse(
            OpenErrorCode::AgentOffline,
            format!("agent {agent} is not connected"),
        );
    };
    state.metrics.pending_opens.inc();
    let r = entry
        .conn
        .open(Target {
            kind,
            address: service.to_owned(),
        })
        .await;
    state.metrics.pending_opens.dec();
    match r {
        Ok(s) => Ok((s, permit)),
        Err((code, reason)) => refuse(code, format!("agent {agent}: {reason}")),
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
        Ok((agent_stream, _permit)) => {
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
                &target.to_string(),
                started,
                cr,
                cw,
                ar,
                aw,
            )
            .await;
        }
    }
}

/// Splices a client side onto an agent stream with metrics and a closing log line.
#[allow(clippy::too_many_arguments)]
pub async fn run_relay<CR, CW, AR, AW>(
    state: &Arc<State>,
    client: &str,
    target: &str,
    started: Instant,
    cr: CR,
    cw: CW,
    ar: AR,
    aw: AW,
) where
    CR: ChunkRead,
    CW: ChunkWrite,
    AR: ChunkRead,
    AW: ChunkWrite,
{
    state.metrics.live_streams.inc();
    state.metrics.streams_total.inc();
    let report = splice(cr, cw, ar, aw).await;
    state.metrics.live_streams.dec();
    state.metrics.add_bytes(report.a_to_b, report.b_to_a);
    let ms = started.elapsed().as_millis() as u64;
    match &report.error {
        None => {
            tracing::info!(%client, %target, bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, "stream closed")
        }
        Some(e) => {
            state.metrics.error("stream_reset");
            tracing::info!(%client, %target, bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, "stream ended with error: {e}")
        }
    }
}
