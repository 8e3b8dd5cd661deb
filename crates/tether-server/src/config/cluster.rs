//! `[cluster]`: running as one of several server replicas behind a load
//! balancer (see README "Running more than one server"), and the drain at
//! shutdown.

use serde::Deserialize;
use std::net::SocketAddr;

/// How this replica names itself, finds its peers and leaves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    tether_proto::DEFAULT_DRAIN_TIMEOUT.as_millis() as u64
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
        let peers = self.static_peers()?;
        // Two replicas with one id are one replica to the agents (each
        // holds a session to "it" and leaves the other out), and each
        // replica drops the peers with its own id as itself.
        for (i, p) in peers.iter().enumerate() {
            if let Some(id) = &p.id {
                if let Some(o) = peers[..i].iter().find(|o| o.id.as_ref() == Some(id)) {
                    anyhow::bail!(
                        "[cluster] peers: {id} is named at {} and at {}: replica ids must differ",
                        o.addr,
                        p.addr
                    );
                }
            }
            if let (Some(id), Some(me), Some(at)) = (&p.id, &self.replica_id, self.advertise) {
                if id == me && p.addr != at {
                    anyhow::bail!(
                        "[cluster] peers: {id} at {} has this replica's id, but this replica \
                         advertises {at}: is replica_id shared by several replicas?",
                        p.addr
                    );
                }
            }
        }
        self.peers_dns()?;
        if let Some(s) = &self.dns_server {
            tether_net::dns::parse_dns_server(s)?;
        }
        if let Some(id) = &self.replica_id {
            // Agents list ids comma-separated in X-Tether-Held, and the
            // server names itself in a header.
            // A quote or backslash would break every scrape: the metrics
            // library writes label values as they are.
            if id.is_empty()
                || id.len() > 200
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'"' | b'\\'))
            {
                anyhow::bail!(
                    "[cluster] replica_id must be 1 to 200 visible ASCII characters, no comma, quote or backslash"
                );
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

    /// One id at two addresses is refused: agents would hold one of the
    /// two replicas only.
    #[test]
    fn replica_ids_must_differ() {
        let peers = |p: &[&str]| ClusterConfig {
            peers: p.iter().map(|s| s.to_string()).collect(),
            replica_id: Some("r1".into()),
            advertise: Some("10.0.0.1:8443".parse().unwrap()),
            ..Default::default()
        };
        assert!(peers(&["r1=10.0.0.1:8443", "r2=10.0.0.2:8443"])
            .validate()
            .is_ok());
        assert!(peers(&["r2=10.0.0.2:8443", "r2=10.0.0.3:8443"])
            .validate()
            .is_err());
        // This replica's id at another address: a replica_id shared by all.
        assert!(peers(&["r1=10.0.0.2:8443"]).validate().is_err());
        let bad_id = ClusterConfig {
            replica_id: Some("a,b".into()),
            ..Default::default()
        };
        assert!(bad_id.validate().is_err());
    }
}
