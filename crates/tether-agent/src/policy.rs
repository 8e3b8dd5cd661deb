//! What the agent may dial: named services and allow-listed `host:port` targets.
//!
//! The agent enforces this itself, whatever the server asks: a compromised or
//! misconfigured server cannot make the agent reach anything else.

use anyhow::{bail, Context};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tether_net::pattern::glob_match;
use tether_net::transport::tls::{client_config, ServerTrust};
use tether_proto::{CatalogEntry, OpenErrorCode, ServiceKind};

/// A named service as written in the config: a string
/// (`HOST:PORT` for TCP, `http://HOST:PORT`, `https://HOST:PORT`,
/// `https+insecure://HOST:PORT`) or a table with every option.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ServiceSpec {
    /// The short form.
    Short(String),
    /// The long form.
    Full(ServiceTable),
}

impl From<&str> for ServiceSpec {
    fn from(s: &str) -> Self {
        ServiceSpec::Short(s.to_owned())
    }
}

/// The long form of a service.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceTable {
    /// `HOST:PORT` (or one of the URL forms of the short form).
    pub address: String,
    /// The service speaks HTTP: the server may proxy browsers to it.
    #[serde(default)]
    pub http: bool,
    /// The agent speaks TLS to the service (the tunnel carries plain bytes
    /// from the server to the agent, inside the tunnel's own TLS).
    #[serde(default)]
    pub tls: bool,
    /// Check the service's certificate (default true). `false` accepts any
    /// certificate: for self-signed in-cluster services only.
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// PEM CA file to check the service's certificate with (default: system roots).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Name to send in SNI and check the certificate for (default: the host).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// The server sends the service's own `HOST:PORT` as `Host` instead of
    /// the name the browser used (for services that check it).
    #[serde(default)]
    pub rewrite_host: bool,
}

fn yes() -> bool {
    true
}

/// TLS to a service: the connector and the name to verify.
#[derive(Clone)]
pub struct ServiceTls {
    /// Configured connector.
    pub connector: tokio_rustls::TlsConnector,
    /// SNI / certificate name.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

impl std::fmt::Debug for ServiceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceTls({:?})", self.server_name)
    }
}

/// A named service, checked and ready to dial.
#[derive(Debug, Clone)]
pub struct Service {
    /// `HOST:PORT` to dial.
    pub address: String,
    /// It speaks HTTP.
    pub http: bool,
    /// TLS towards the service, when configured.
    pub tls: Option<ServiceTls>,
    /// `Host` header the server should send, when rewriting.
    pub host_header: Option<String>,
}

impl Service {
    /// Checks a config entry and builds its TLS settings.
    pub fn from_spec(name: &str, spec: &ServiceSpec) -> anyhow::Result<Service> {
        let mut t = match spec {
            ServiceSpec::Full(t) => t.clone(),
            ServiceSpec::Short(s) => ServiceTable {
                address: s.clone(),
                http: false,
                tls: false,
                tls_verify: true,
                tls_ca: None,
                tls_server_name: None,
                rewrite_host: false,
            },
        };
        if let Some((scheme, rest)) = t.address.split_once("://") {
            match scheme {
                "http" => t.http = true,
                "https" => (t.http, t.tls) = (true, true),
                "https+insecure" => (t.http, t.tls, t.tls_verify) = (true, true, false),
                "tcp" => {}
                "tls" => t.tls = true,
                other => bail!("service {name}: unknown scheme {other:?} (http, https, https+insecure, tcp, tls)"),
            }
            t.address = rest.trim_end_matches('/').to_owned();
        }
        let Some((host, _port)) = split_host_port(&t.address) else {
            bail!("service {name}: address {:?} is not HOST:PORT", t.address);
        };
        let tls = if t.tls {
            let trust = match (&t.tls_ca, t.tls_verify) {
                (_, false) => ServerTrust::AnyCertificate,
                (Some(ca), true) => ServerTrust::CaFile(ca.clone()),
                (None, true) => ServerTrust::SystemRoots,
            };
            let cfg = client_config(&trust).with_context(|| format!("service {name}: TLS"))?;
            let sni = t.tls_server_name.clone().unwrap_or_else(|| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            });
            let server_name = rustls_pki_types::ServerName::try_from(sni.clone())
                .with_context(|| format!("service {name}: {sni:?} is not a TLS server name"))?;
            Some(ServiceTls {
                connector: tokio_rustls::TlsConnector::from(cfg),
                server_name,
            })
        } else {
            None
        };
        Ok(Service {
            host_header: t.rewrite_host.then(|| t.address.clone()),
            address: t.address,
            http: t.http,
            tls,
        })
    }
}

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
    services: BTreeMap<String, Service>,
    allow: Vec<AllowRule>,
}

/// A target that passed the policy.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `host:port` to dial (names resolve in the agent's network).
    pub address: String,
    /// The service name, when the target was one.
    pub service: Option<String>,
    /// TLS towards the service.
    pub tls: Option<ServiceTls>,
}

impl TargetPolicy {
    /// Builds the policy; named services must be `host:port` (or a URL form).
    pub fn new(services: &BTreeMap<String, ServiceSpec>, allow: &[String]) -> anyhow::Result<Self> {
        let mut checked = BTreeMap::new();
        for (name, spec) in services {
            if name.contains(':') || name.contains('/') || name.is_empty() || name.len() > 255 {
                bail!("service name {name:?} may not be empty or contain ':' or '/'");
            }
            checked.insert(name.clone(), Service::from_spec(name, spec)?);
        }
        Ok(TargetPolicy {
            services: checked,
            allow: allow
                .iter()
                .map(|r| AllowRule::parse(r))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Decides whether `target` (a service name or `host:port`) may be dialed.
    pub fn resolve(&self, target: &str) -> Result<Resolved, (OpenErrorCode, String)> {
        if let Some(svc) = self.services.get(target) {
            return Ok(Resolved {
                address: svc.address.clone(),
                service: Some(target.to_owned()),
                tls: svc.tls.clone(),
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
                        tls: None,
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

    /// What the agent announces to the server (CATALOG): names and kinds,
    /// never addresses, except a `Host` value the service asked to be sent.
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        self.services
            .iter()
            .map(|(name, s)| CatalogEntry {
                name: name.clone(),
                kind: if s.http {
                    ServiceKind::Http
                } else {
                    ServiceKind::Tcp
                },
                host: s.host_header.clone().unwrap_or_default(),
            })
            .collect()
    }

    /// Shared handle (the agent keeps one per session).
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
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
            "postgres.default.svc.cluster.local:5432".into(),
        );
        services.insert(
            "grafana".to_owned(),
            "http://grafana.monitoring:3000".into(),
        );
        services.insert(
            "kibana".to_owned(),
            ServiceSpec::Full(ServiceTable {
                address: "kibana:5601".into(),
                http: true,
                tls: true,
                tls_verify: false,
                tls_ca: None,
                tls_server_name: None,
                rewrite_host: true,
            }),
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
    fn catalog_says_kinds_not_addresses() {
        let p = policy();
        let c = p.catalog();
        let kinds: Vec<_> = c
            .iter()
            .map(|e| (e.name.as_str(), e.kind, e.host.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("db", ServiceKind::Tcp, ""),
                ("grafana", ServiceKind::Http, ""),
                ("kibana", ServiceKind::Http, "kibana:5601"),
            ]
        );
        assert_eq!(
            p.resolve("grafana").unwrap().address,
            "grafana.monitoring:3000"
        );
        assert!(p.resolve("kibana").unwrap().tls.is_some());
        let bad: BTreeMap<String, ServiceSpec> =
            [("x".to_owned(), "ftp://a:1".into())].into_iter().collect();
        assert!(TargetPolicy::new(&bad, &[]).is_err());
    }

    #[test]
    fn bad_rules_are_rejected() {
        assert!(AllowRule::parse("host").is_err());
        assert!(AllowRule::parse("host:0").is_err());
        assert!(AllowRule::parse("host:9-3").is_err());
        assert!(AllowRule::parse(":80").is_err());
    }
}
