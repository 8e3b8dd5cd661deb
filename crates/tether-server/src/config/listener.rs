//! `[[listener]]`: a public port on the server bound to one `AGENT/SERVICE`.

use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use tether_proto::target::ClientTarget;

/// Default for `max_connections_per_source`: a whole office behind one NAT
/// address holds a few hundred connections; one source still cannot take
/// all of an agent's 8192 streams.
pub(crate) const MAX_CONNECTIONS_PER_SOURCE: usize = 1024;

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
    /// listener at once (default 1024), so one source cannot take the agent's
    /// streams from everyone else.
    #[serde(default = "default_per_source")]
    pub max_connections_per_source: usize,
    /// Send what a connection has already written with its open (early
    /// data, PROTOCOL.md 6.3; TCP only): a round trip less per connection.
    /// Off, a retry after a lost agent session can never repeat a byte to
    /// the service.
    #[serde(default = "default_early_data")]
    pub early_data: bool,
}

fn default_early_data() -> bool {
    true
}

fn default_protocol() -> String {
    "tcp".into()
}

fn default_per_source() -> usize {
    MAX_CONNECTIONS_PER_SOURCE
}

impl ListenerConfig {
    /// The agent the target names.
    pub(crate) fn agent(&self) -> &str {
        self.target.split_once('/').map_or("", |(a, _)| a)
    }

    /// Whether this is a UDP listener.
    pub(crate) fn is_udp(&self) -> bool {
        self.protocol == "udp"
    }

    /// Checks the protocol and the target: it must be `AGENT/SERVICE` in the
    /// one spelling every open is parsed with, so that no open through the
    /// listener can fail on it later.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.protocol != "tcp" && self.protocol != "udp" {
            anyhow::bail!("listener {}: protocol must be tcp or udp", self.listen);
        }
        if self.is_udp() && self.proxy_protocol {
            anyhow::bail!(
                "listener {}: proxy_protocol is for TCP listeners",
                self.listen
            );
        }
        if let Err(e) = ClientTarget::parse(&self.target) {
            anyhow::bail!("listener {}: {e}", self.listen);
        }
        Ok(())
    }

    /// Whether a connection (or datagram) from `peer` may use the listener.
    pub(crate) fn allows(&self, peer: &SocketAddr) -> bool {
        self.allow_from.is_empty() || self.allow_from.iter().any(|n| n.contains(&peer.ip()))
    }
}
