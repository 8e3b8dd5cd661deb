//! Where the protocol is spoken: the server's WebSocket endpoints and the
//! header names the roles exchange at the upgrade. Defined once here; the
//! server routes by them, the agent and the client dial them.

/// Agent sessions (WebSocket, subprotocol [`crate::SUBPROTOCOL`], agent
/// credential).
pub const AGENT_PATH: &str = "/tether/v1/agent";

/// CLI client sessions (the same protocol, client credential).
pub const CLIENT_PATH: &str = "/tether/v1/client";

/// Prefix of the raw WebSocket endpoint, `/tether/v1/ws/AGENT/SERVICE`: one
/// WebSocket carries one TCP stream's bytes, no framing of ours.
pub const RAW_WS_PREFIX: &str = "/tether/v1/ws/";

/// Header in which an agent names itself at the upgrade.
pub const AGENT_NAME_HEADER: &str = "x-tether-agent";

/// Header in which an agent tells its instance id at the upgrade: agent
/// processes with one name and different instance ids form a pool; a new
/// session of the same instance replaces the old one. At most
/// [`MAX_INSTANCE_ID_LEN`] bytes of visible ASCII.
pub const AGENT_INSTANCE_HEADER: &str = "x-tether-instance";

/// Longest instance id a server accepts.
pub const MAX_INSTANCE_ID_LEN: usize = 128;

/// Whether `id` is an instance id a server accepts: 1 to
/// [`MAX_INSTANCE_ID_LEN`] visible ASCII bytes (no spaces).
pub fn valid_instance_id(id: &str) -> bool {
    (1..=MAX_INSTANCE_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Header in which an agent lists, comma-separated, the ids of the server
/// replicas it holds a live session to (version 9). A replica that finds
/// its own id there, and a live session of the same agent instance,
/// refuses the upgrade with [`HELD_STATUS`] instead of replacing that
/// session: a dial through the load balancer that lands on a replica the
/// agent already holds costs the agent nothing.
pub const AGENT_HELD_HEADER: &str = "x-tether-held";

/// Most replica ids an agent lists in [`AGENT_HELD_HEADER`].
pub const MAX_HELD_IDS: usize = 32;

/// The status of an upgrade refused because the agent instance already
/// holds this replica (409 Conflict). The answer names the replica in
/// [`REPLICA_HEADER`].
pub const HELD_STATUS: u16 = 409;

/// Header with which a dialer on the agent endpoint asks only to have its
/// credential checked (`tether doctor --agent`; version 9): the server
/// runs the handshake but does not register the session, so no open is
/// routed to it and it replaces no agent process.
pub const AGENT_PROBE_HEADER: &str = "x-tether-probe";

/// Header in which a server names its replica id on a [`HELD_STATUS`]
/// refusal (version 9).
pub const REPLICA_HEADER: &str = "x-tether-replica";
