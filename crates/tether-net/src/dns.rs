//! Name lookups with the system resolver or one given DNS server: the
//! agent's raw targets (its `dns_server` setting) and the server's peer
//! replicas (`[cluster] dns_server`).
//!
//! The agent resolves a raw target's host itself, checks every address
//! (see `tether_agent::policy::TargetPolicy::check_addresses`) and then
//! dials those addresses: the name is looked up once per open, never again
//! at connect time.

use anyhow::bail;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The DNS port, when `dns_server` gives none.
const DNS_PORT: u16 = 53;

/// How long one query to the configured DNS server may take, and how often
/// it is tried (the open's dial timeout bounds the whole lookup too).
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
const QUERY_ATTEMPTS: usize = 2;

/// Where the agent looks up the names of raw targets.
pub struct NameResolver {
    server: Option<(SocketAddr, TokioResolver)>,
}

impl std::fmt::Debug for NameResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.server {
            None => write!(f, "NameResolver(system)"),
            Some((addr, _)) => write!(f, "NameResolver({addr})"),
        }
    }
}

impl NameResolver {
    /// The system resolver (`getaddrinfo`: hosts file, search domains).
    pub fn system() -> NameResolver {
        NameResolver { server: None }
    }

    /// Every lookup asks the DNS server at `addr` (UDP, TCP for truncated
    /// answers) for A and AAAA records: no hosts file, no search domains.
    pub fn server(addr: SocketAddr) -> NameResolver {
        let servers = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
        let config = ResolverConfig::from_parts(None, vec![], servers);
        let mut opts = ResolverOpts::default();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.timeout = QUERY_TIMEOUT;
        opts.attempts = QUERY_ATTEMPTS;
        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        NameResolver {
            server: Some((addr, resolver)),
        }
    }

    /// From the `dns_server` setting: `IP`, `IP:PORT` or `[IPv6]:PORT`
    /// (port 53 when absent); the system resolver when unset.
    pub fn from_setting(setting: Option<&str>) -> anyhow::Result<NameResolver> {
        Ok(match setting {
            None => NameResolver::system(),
            Some(s) => NameResolver::server(parse_dns_server(s)?),
        })
    }

    /// The configured DNS server, if any.
    pub fn dns_server(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|(a, _)| *a)
    }

    /// Every address `host` resolves to, with `port`. An IP literal is
    /// returned as it is, without a lookup.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        match &self.server {
            None => Ok(tokio::net::lookup_host((host, port)).await?.collect()),
            Some((_, resolver)) => {
                let found = resolver
                    .lookup_ip(host)
                    .await
                    .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
                Ok(found.iter().map(|ip| SocketAddr::new(ip, port)).collect())
            }
        }
    }
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`; port 53 when absent.
pub fn parse_dns_server(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DNS_PORT));
    }
    bail!("dns_server {s:?}: expected IP, IP:PORT or [IPv6]:PORT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_server_setting() {
        assert_eq!(
            parse_dns_server("10.96.0.10").unwrap(),
            "10.96.0.10:53".parse().unwrap()
        );
        assert_eq!(
            parse_dns_server("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_dns_server("[fd00::a]:53").unwrap(),
            "[fd00::a]:53".parse().unwrap()
        );
        assert!(parse_dns_server("kube-dns.kube-system:53").is_err());
        assert!(NameResolver::from_setting(Some("nope")).is_err());
        assert_eq!(NameResolver::from_setting(None).unwrap().dns_server(), None);
    }

    /// The system resolver takes the shorthand IPv4 forms (`127.1`) as
    /// addresses: only the resolved address tells where they lead.
    #[tokio::test]
    async fn system_lookup_of_a_shorthand_address() {
        let addrs = NameResolver::system().lookup("127.1", 80).await.unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:80".parse().unwrap()]);
    }

    /// A one-name DNS server on loopback: every A question is answered
    /// 127.0.0.1 and every AAAA question ::1, whatever the name.
    async fn loopback_dns() -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                if let Some(answer) = answer_loopback(&buf[..n]) {
                    let _ = sock.send_to(&answer, from).await;
                }
            }
        });
        addr
    }

    /// The answer to one query (header, one question; extra records ignored).
    fn answer_loopback(q: &[u8]) -> Option<Vec<u8>> {
        let mut end = 12;
        while *q.get(end)? != 0 {
            end += 1 + usize::from(q[end]);
        }
        let question = q.get(12..end + 5)?;
        let qtype = u16::from_be_bytes([q[end + 1], q[end + 2]]);
        let rdata: &[u8] = match qtype {
            1 => &[127, 0, 0, 1],
            28 => &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            _ => &[],
        };
        let mut r = Vec::new();
        r.extend_from_slice(&q[..2]); // id
        r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(!rdata.is_empty()), 0, 0, 0, 0]);
        r.extend_from_slice(question);
        if !rdata.is_empty() {
            r.extend_from_slice(&[0xc0, 12]); // the question's name
            r.extend_from_slice(&q[end + 1..end + 5]); // type, class
            r.extend_from_slice(&[0, 0, 0, 0, 0, rdata.len() as u8]); // ttl 0, length
            r.extend_from_slice(rdata);
        }
        Some(r)
    }

    /// With `dns_server`, names are looked up there (A and AAAA), not in
    /// the system resolver, which knows nothing of `rebind.test`.
    #[tokio::test]
    async fn configured_server_answers_lookups() {
        let server = loopback_dns().await;
        let r = NameResolver::server(server);
        assert_eq!(r.dns_server(), Some(server));
        let mut addrs = r.lookup("rebind.test", 8002).await.unwrap();
        addrs.sort();
        assert_eq!(
            addrs,
            vec![
                "127.0.0.1:8002".parse().unwrap(),
                "[::1]:8002".parse().unwrap()
            ]
        );
        assert_eq!(
            r.lookup("10.1.2.3", 5).await.unwrap(),
            vec!["10.1.2.3:5".parse().unwrap()]
        );
    }
}
