//! The agent's settings (`agent.toml`, flags and environment). Besides
//! plain values it names only the setting types of the modules that own
//! them (a service's spec, Kubernetes discovery).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tether_net::reconnect::server_trust;
use tether_net::transport::tls::ServerTrust;
use tether_net::transport::ws::endpoint_url;
use tether_proto::endpoints::AGENT_PATH;

use crate::discovery;
use crate::policy::ServiceSpec;

/// How long the agent waits, by default, for a service to accept a TCP connection.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

fn default_dial_timeout_ms() -> u64 {
    DIAL_TIMEOUT.as_millis() as u64
}

/// Most streams the server may have open on this agent at once (all clients
/// together; each client is held to a smaller share by the server).
pub const MAX_STREAMS: usize = 8192;

fn default_drain_timeout_ms() -> u64 {
    tether_proto::DEFAULT_DRAIN_TIMEOUT.as_millis() as u64
}

/// Agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Server URL, `wss://host:port` (the agent path is added if missing).
    pub server: String,
    /// The name to register under (must match the token's name on the server).
    pub name: String,
    /// This process's instance id: agent processes with one name and
    /// different instance ids form a pool (opens are spread over them).
    /// Default: the host name (a pod's name) and a random suffix.
    #[serde(default)]
    pub instance: Option<String>,
    /// On shutdown, how long live streams may take to finish, in
    /// milliseconds.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The agent token (prefer `token_file` or `TETHER_TOKEN`: a config
    /// file should not hold secrets).
    #[serde(default)]
    pub token: String,
    /// File holding the token (e.g. a mounted Kubernetes Secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (the server's agent entry has
    /// `mtls = true`); with it, no token is needed.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// PEM CA file to verify the server with (instead of system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Pinned SHA-256 fingerprint of the server certificate.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Named services: `db = "postgres.default.svc.cluster.local:5432"`,
    /// `grafana = "http://grafana.monitoring:3000"`, or a table
    /// (see [`crate::policy::ServiceTable`]).
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    /// Raw `host:port` targets clients may ask for: `*.svc.cluster.local:*`,
    /// `10.0.0.0/8:5432`, `localhost:8000-8100`. Every address a name
    /// resolves to is checked too; loopback, link-local and cloud metadata
    /// addresses need a rule of their own (see [`crate::policy::builtin_deny`]).
    #[serde(default)]
    pub allow: Vec<String>,
    /// DNS server for the names of raw targets (`IP` or `IP:PORT`, port 53
    /// by default), instead of the system resolver: e.g. the cluster DNS.
    /// Named services always use the system resolver.
    #[serde(default)]
    pub dns_server: Option<String>,
    /// How long to wait for a service to accept a connection (and finish
    /// its TLS handshake), in milliseconds. A name's addresses are tried
    /// a quarter second apart, the slow ones still waited on.
    #[serde(default = "default_dial_timeout_ms")]
    pub dial_timeout_ms: u64,
    /// Close a UDP flow after this long without datagrams, in milliseconds.
    #[serde(default = "default_udp_idle_ms")]
    pub udp_idle_timeout_ms: u64,
    /// Heartbeat settings.
    #[serde(default)]
    pub session: tether_net::tuning::SessionTuning,
    /// Publish Services found in the Kubernetes API (see [`discovery`]).
    #[serde(default)]
    pub kubernetes: Option<discovery::KubernetesDiscovery>,
}

fn default_udp_idle_ms() -> u64 {
    tether_net::udp::DEFAULT_IDLE_TIMEOUT.as_millis() as u64
}

impl AgentConfig {
    /// Checks the settings no type can rule out: a zero timeout would fail
    /// every dial, or close every UDP flow, at once.
    pub(crate) fn validate_timeouts(&self) -> anyhow::Result<()> {
        if self.dial_timeout_ms == 0 {
            anyhow::bail!(
                "dial_timeout_ms = 0 would fail every dial: give it at least 1 (default {})",
                default_dial_timeout_ms()
            );
        }
        if self.udp_idle_timeout_ms == 0 {
            anyhow::bail!("udp_idle_timeout_ms = 0 would close every UDP flow at once: give it at least 1 (default {})", default_udp_idle_ms());
        }
        // The server gives up on an open it sent after its own timeout; a
        // dial allowed longer than that is cut there, and the client reads
        // the server's timeout, not this setting.
        let server_waits = tether_proto::Config::default().open_timeout;
        if Duration::from_millis(self.dial_timeout_ms) >= server_waits {
            tracing::warn!(
                "dial_timeout_ms = {}: the server gives up on an open after {server_waits:?}, so a dial longer than that fails there",
                self.dial_timeout_ms
            );
        }
        Ok(())
    }

    /// How to check the server's certificate.
    pub fn trust(&self) -> ServerTrust {
        server_trust(self.fingerprint.as_ref(), self.ca_file.as_ref())
    }

    /// The full URL of the agent endpoint.
    pub fn url(&self) -> String {
        endpoint_url(&self.server, AGENT_PATH)
    }
}
