//! `[cluster]`: running as one of several server replicas behind a load
//! balancer (see README "Running more than one server"), and the drain at
//! shutdown.

use serde::Deserialize;
use std::net::SocketAddr;

/// How this replica names itself, finds its peers and leaves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's id, told to agents (the pod name under Kubernetes,
    /// from the downward API). Default: the host name and a random suffix.
    #[serde(default)]
    pub replica_id: Option<String>,
    /// The address agents may dial to reach this replica directly (a pod
    /// IP). Default: the listen address when it names one IP.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// A static list of the replicas: `ID=IP:PORT` or `IP:PORT` (this one
    /// may be among them).
    #[serde(default)]
    pub peers: Vec<String>,
    /// `NAME:PORT` whose A/AAAA records are the replicas (a headless
    /// Service with `publishNotReadyAddresses: true`), resolved again
    /// every `peers_interval_ms`.
    #[serde(default)]
    pub peers_dns: Option<String>,
    /// DNS server for `peers_dns` (`IP` or `IP:PORT`); default the system
    /// resolver.
    #[serde(default)]
    pub dns_server: Option<String>,
    /// How often `peers_dns` is resolved again, in milliseconds.
    #[serde(default = "default_peers_interval_ms")]
    pub peers_interval_ms: u64,
    /// How long an open waits for an agent this replica has no session to
    /// (yet), when it just started or the agent's session here just
    /// dropped, in milliseconds.
    #[serde(default = "default_agent_wait_ms")]
    pub agent_wait_ms: u64,
    /// After SIGTERM: how long `/readyz` fails while everything is still
    /// served, so load balancers stop sending new connections first, in
    /// milliseconds.
    #[serde(default = "default_shutdown_delay_ms")]
    pub shutdown_delay_ms: u64,
    /// After the shutdown delay: how long live streams and requests may
    /// take to finish before they are reset, in milliseconds.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

fn default_peers_interval_ms() -> u64 {
    5_000
}

fn default_agent_wait_ms() -> u64 {
    3_000
}

fn default_shutdown_delay_ms() -> u64 {
    10_000
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            replica_id: None,
            advertise: None,
            peers: vec![],
            peers_dns: None,
            dns_server: None,
            peers_interval_ms: default_peers_interval_ms(),
            agent_wait_ms: default_agent_wait_ms(),
            shutdown_delay_ms: default_shutdown_delay_ms(),
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

/// One entry of the static `peers` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticPeer {
    /// The replica's id, when the entry names one.
    pub id: Option<String>,
    /// Its address.
    pub addr: SocketAddr,
}

impl ClusterConfig {
    /// Checks the settings; returns the parsed static peers.
    pub fn static_peers(&self) -> anyhow::Result<Vec<StaticPeer>> {
        self.peers
            .iter()
            .map(|p| {
                let (id, addr) = match p.split_once('=') {
                    Some((id, addr)) if !id.is_empty() => (Some(id.to_owned()), addr),
                    Some(_) => anyhow::bail!("[cluster] peers: {p:?} has an empty id"),
                    None => (None, p.as_str()),
                };
                let addr = addr.parse().map_err(|e| {
                    anyhow::anyhow!("[cluster] peers: {p:?} is not [ID=]IP:PORT ({e})")
                })?;
                Ok(StaticPeer { id, addr })
            })
            .collect()
    }

    /// The `peers_dns` name and port.
    pub fn peers_dns(&self) -> anyhow::Result<Option<(String, u16)>> {
        let Some(s) = &self.peers_dns else {
            return Ok(None);
        };
        let (name, port) = s
            .rsplit_once(':')
            .and_then(|(n, p)| Some((n, p.parse::<u16>().ok()?)))
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| anyhow::anyhow!("[cluster] peers_dns {s:?} is not NAME:PORT"))?;
        Ok(Some((name.to_owned(), port)))
    }

    /// Checks every setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.static_peers()?;
        self.peers_dns()?;
        if let Some(s) = &self.dns_server {
            tether_net::dns::parse_dns_server(s)?;
        }
        if let Some(id) = &self.replica_id {
            if id.is_empty() || id.len() > 200 {
                anyhow::bail!("[cluster] replica_id must be 1 to 200 characters");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        let c = ClusterConfig {
            peers: vec!["r1=127.0.0.11:8443".into(), "[::1]:8443".into()],
            peers_dns: Some("tether-peers.ns.svc.cluster.local:8443".into()),
            ..Default::default()
        };
        let p = c.static_peers().unwrap();
        assert_eq!(p[0].id.as_deref(), Some("r1"));
        assert_eq!(p[1].addr, "[::1]:8443".parse().unwrap());
        assert_eq!(
            c.peers_dns().unwrap(),
            Some(("tether-peers.ns.svc.cluster.local".into(), 8443))
        );
        for bad in ["=1.2.3.4:1", "r1=host:1", "1.2.3.4"] {
            let c = ClusterConfig {
                peers: vec![bad.into()],
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        let c = ClusterConfig {
            peers_dns: Some("noport".into()),
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
