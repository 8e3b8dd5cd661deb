//! What the agent may dial: named services and allow-listed `host:port` targets.
//!
//! The agent enforces this itself, whatever the server asks: a compromised or
//! misconfigured server cannot make the agent reach anything else.

use anyhow::{bail, Context};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use tether_net::pattern::glob_match;
use tether_proto::OpenErrorCode;

/// How an allow rule matches the host part.
#[derive(Debug, Clone)]
enum HostRule {
    /// Host names (and literal IPs) by glob: `*.svc.cluster.local`.
    Glob(String),
    /// IP addresses in a network: `10.0.0.0/8`.
    Net(IpNet),
}

/// One `HOST:PORTS` allow rule.
#[derive(Debug, Clone)]
pub struct AllowRule {
    host: HostRule,
    ports: (u16, u16),
}

impl AllowRule {
    /// Parses `HOSTGLOB:PORTS` or `CIDR:PORTS` (`[v6]/len:PORTS` for IPv6),
    /// where PORTS is `*`, `N` or `N-M`.
    pub fn parse(s: &str) -> anyhow::Result<AllowRule> {
        let (host, ports) = s
            .rsplit_once(':')
            .with_context(|| format!("allow rule {s:?}: expected HOST:PORTS"))?;
        let ports = match ports {
            "*" => (1, 65535),
            p => match p.split_once('-') {
                Some((a, b)) => (a.parse()?, b.parse()?),
                None => {
                    let n: u16 = p
                        .parse()
                        .with_context(|| format!("allow rule {s:?}: bad port"))?;
                    (n, n)
                }
            },
        };
        if ports.0 > ports.1 || ports.0 == 0 {
            bail!("allow rule {s:?}: bad port range");
        }
        let bare = host.trim_start_matches('[').replace(']', "");
        let host = if let Ok(net) = bare.parse::<IpNet>() {
            HostRule::Net(net)
        } else if let Ok(ip) = bare.parse::<IpAddr>() {
            HostRule::Net(IpNet::from(ip))
        } else if host.is_empty() {
            bail!("allow rule {s:?}: empty host");
        } else {
            HostRule::Glob(host.to_ascii_lowercase())
        };
        Ok(AllowRule { host, ports })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        if port < self.ports.0 || port > self.ports.1 {
            return false;
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match (&self.host, bare.parse::<IpAddr>()) {
            (HostRule::Net(net), Ok(ip)) => net.contains(&ip),
            (HostRule::Net(_), Err(_)) => false,
            (HostRule::Glob(g), _) => glob_match(g, &bare.to_ascii_lowercase()),
        }
    }
}

/// The agent's dial policy.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    services: BTreeMap<String, String>,
    allow: Vec<AllowRule>,
}

/// A target that passed the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `host:port` to dial (names resolve in the agent's network).
    pub address: String,
    /// The service name, when the target was one.
    pub service: Option<String>,
}

impl TargetPolicy {
    /// Builds the policy; named services must be `host:port`.
    pub fn new(services: &BTreeMap<String, String>, allow: &[String]) -> anyhow::Result<Self> {
        for (name, addr) in services {
            if split_host_port(addr).is_none() {
                bail!("service {name}: address {addr:?} is not HOST:PORT");
            }
            if name.contains(':') || name.contains('/') || name.is_empty() {
                bail!("service name {name:?} may not be empty or contain ':' or '/'");
            }
        }
        Ok(TargetPolicy {
            services: services.clone(),
            allow: allow
                .iter()
                .map(|r| AllowRule::parse(r))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Decides whether `target` (a service name or `host:port`) may be dialed.
    pub fn resolve(&self, target: &str) -> Result<Resolved, (OpenErrorCode, String)> {
        if let Some(addr) = self.services.get(target) {
            return Ok(Resolved {
                address: addr.clone(),
                service: Some(target.to_owned()),
            });
        }
        match split_host_port(target) {
            None => Err((
                OpenErrorCode::UnknownService,
                format!("no service named {target:?} on this agent"),
            )),
            Some((host, port)) => {
                if self.allow.iter().any(|r| r.matches(host, port)) {
                    Ok(Resolved {
                        address: target.to_owned(),
                        service: None,
                    })
                } else {
                    Err((
                        OpenErrorCode::Forbidden,
                        format!("{target} is not in this agent's allow list"),
                    ))
                }
            }
        }
    }

    /// Names of the configured services.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }
}

/// Splits `host:port` / `[v6]:port`.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || port == 0 {
        return None;
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None; // bare IPv6 without brackets is ambiguous
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TargetPolicy {
        let mut services = BTreeMap::new();
        services.insert(
            "db".to_owned(),
            "postgres.default.svc.cluster.local:5432".to_owned(),
        );
        TargetPolicy::new(
            &services,
            &[
                "*.svc.cluster.local:*".into(),
                "10.0.0.0/8:5432".into(),
                "localhost:8000-8100".into(),
                "[::1]:22".into(),
            ],
        )
        .unwrap()
    }

    #[test]
    fn services_and_rules() {
        let p = policy();
        assert_eq!(
            p.resolve("db").unwrap().address,
            "postgres.default.svc.cluster.local:5432"
        );
        assert!(p
            .resolve("grafana.monitoring.svc.cluster.local:3000")
            .is_ok());
        assert!(p.resolve("10.1.2.3:5432").is_ok());
        assert_eq!(
            p.resolve("10.1.2.3:5433").unwrap_err().0,
            OpenErrorCode::Forbidden
        );
        assert_eq!(
            p.resolve("11.1.2.3:5432").unwrap_err().0,
            OpenErrorCode::Forbidden
        );
        assert!(p.resolve("localhost:8080").is_ok());
        assert!(p.resolve("localhost:9000").is_err());
        assert!(p.resolve("[::1]:22").is_ok());
        assert_eq!(
            p.resolve("redis").unwrap_err().0,
            OpenErrorCode::UnknownService
        );
        // A name never matches a CIDR rule, even if it would resolve into it.
        assert_eq!(
            p.resolve("evil.example:5432").unwrap_err().0,
            OpenErrorCode::Forbidden
        );
        assert!(p.resolve("svc.cluster.local.evil.com:80").is_err());
    }

    #[test]
    fn bad_rules_are_rejected() {
        assert!(AllowRule::parse("host").is_err());
        assert!(AllowRule::parse("host:0").is_err());
        assert!(AllowRule::parse("host:9-3").is_err());
        assert!(AllowRule::parse(":80").is_err());
    }
}
