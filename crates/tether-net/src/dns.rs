//! Name lookups with the system resolver or one given DNS server: the
//! agent's raw targets (its `dns_server` setting) and the server's peer
//! replicas (`[cluster] dns_server`).
//!
//! The agent resolves a raw target's host itself, checks every address
//! (see `tether_agent::policy::TargetPolicy::check_addresses`) and then
//! dials those addresses: the name is looked up once per open, never again
//! at connect time.
//!
//! The system resolver (`getaddrinfo`) keeps no answers and runs on a
//! blocking thread: each lookup is a thread hand-off, a read of the hosts
//! file and, in a cluster, DNS queries for every search domain. A resolver
//! built [`NameResolver::remembering`] keeps its answers for a few seconds
//! ([`NameCache`]), so a service opened often is looked up once per
//! [`REMEMBER_FOR`], not once per connection. A DNS server set with
//! `dns_server` keeps its own answers, for as long as their TTL says.

use anyhow::bail;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The DNS port, when `dns_server` gives none.
const DNS_PORT: u16 = 53;

/// How long one query to the configured DNS server may take, and how often
/// it is tried (the open's dial timeout bounds the whole lookup too).
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
const QUERY_ATTEMPTS: usize = 2;

/// How long a remembering resolver reuses the system resolver's answer for
/// a name: the TTL Kubernetes' cluster DNS gives its records by default, so
/// a Service's addresses are as fresh as any client in the cluster sees them.
pub const REMEMBER_FOR: Duration = Duration::from_secs(5);

/// At most this many names are remembered (raw targets may name many).
const MAX_REMEMBERED: usize = 4096;

/// Where the agent looks up the names of raw targets and services.
pub struct NameResolver {
    server: Option<(SocketAddr, TokioResolver)>,
    /// The system resolver's recent answers (`None`: every lookup asks).
    remembered: Option<Mutex<NameCache>>,
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
        NameResolver {
            server: None,
            remembered: None,
        }
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
            remembered: None,
        }
    }

    /// The same resolver, reusing each answer of the system resolver for
    /// `ttl` (see [`NameCache`]); a failed dial should [`forget`](Self::forget)
    /// the name.
    pub fn remembering(mut self, ttl: Duration) -> NameResolver {
        self.remembered = Some(Mutex::new(NameCache::new(ttl)));
        self
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
            None => self.lookup_system(host, port).await,
            Some((_, resolver)) => {
                let found = resolver
                    .lookup_ip(host)
                    .await
                    .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
                Ok(found.iter().map(|ip| SocketAddr::new(ip, port)).collect())
            }
        }
    }

    /// Like [`lookup`](Self::lookup), always with the system resolver (the
    /// agent's named services), and remembered when this resolver is.
    pub async fn lookup_system(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let Some(cache) = &self.remembered else {
            return Ok(tokio::net::lookup_host((host, port)).await?.collect());
        };
        let known = lock(cache).get(host, Instant::now());
        let ips = match known {
            Some(ips) => ips,
            None => {
                let found: Vec<IpAddr> = tokio::net::lookup_host((host, port))
                    .await?
                    .map(|a| a.ip())
                    .collect();
                let ips: Arc<[IpAddr]> = found.into();
                lock(cache).insert(host, ips.clone(), Instant::now());
                ips
            }
        };
        Ok(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect())
    }

    /// Whether an answer for `host` is remembered and still fresh.
    pub fn remembers(&self, host: &str) -> bool {
        self.remembered
            .as_ref()
            .is_some_and(|c| lock(c).get(host, Instant::now()).is_some())
    }

    /// Drops what is remembered of `host`: none of its addresses answered,
    /// so the next open asks again (a pod that moved, a Service recreated).
    pub fn forget(&self, host: &str) {
        if let Some(cache) = &self.remembered {
            lock(cache).forget(host);
        }
    }
}

/// The cache's lock; a panic while holding it cannot leave it half-written
/// (every change is one map operation), so a poisoned lock is used as is.
fn lock(cache: &Mutex<NameCache>) -> std::sync::MutexGuard<'_, NameCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Names and the addresses they resolved to, each kept for a fixed time.
///
/// A pure structure (the caller passes the time), so its rules are tested
/// without waiting: an answer is reused until `ttl` after it was stored;
/// empty answers and failures are never stored (a Service created a moment
/// later is found at once); at [`MAX_REMEMBERED`] names, the expired ones
/// go first and, if none has, everything does.
#[derive(Debug)]
pub struct NameCache {
    ttl: Duration,
    entries: HashMap<String, (Arc<[IpAddr]>, Instant)>,
}

impl NameCache {
    /// An empty cache keeping answers for `ttl`.
    pub fn new(ttl: Duration) -> NameCache {
        NameCache {
            ttl,
            entries: HashMap::new(),
        }
    }

    /// The addresses of `host` if they were stored less than `ttl` before `now`.
    pub fn get(&self, host: &str, now: Instant) -> Option<Arc<[IpAddr]>> {
        let (ips, stored) = self.entries.get(host)?;
        (now.saturating_duration_since(*stored) < self.ttl).then(|| ips.clone())
    }

    /// Stores the addresses `host` resolved to at `now` (nothing when empty).
    pub fn insert(&mut self, host: &str, ips: Arc<[IpAddr]>, now: Instant) {
        if ips.is_empty() || self.ttl.is_zero() {
            return;
        }
        if self.entries.len() >= MAX_REMEMBERED && !self.entries.contains_key(host) {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, stored)| now.saturating_duration_since(*stored) < ttl);
            if self.entries.len() >= MAX_REMEMBERED {
                self.entries.clear();
            }
        }
        self.entries.insert(host.to_owned(), (ips, now));
    }

    /// Drops `host`.
    pub fn forget(&mut self, host: &str) {
        self.entries.remove(host);
    }

    /// How many names are stored (expired ones included, until pushed out).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no name is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Splits a `host:port` address (`name:80`, `10.0.0.1:80`, `[fd00::1]:80`)
/// into its host (without brackets) and port; `None` for anything else.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        let host = match a {
            SocketAddr::V4(_) => address.rsplit_once(':')?.0,
            SocketAddr::V6(_) => address.strip_prefix('[')?.rsplit_once("]:")?.0,
        };
        return Some((host, a.port()));
    }
    let (host, port) = address.rsplit_once(':')?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    Some((host, port.parse().ok()?))
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

    fn ips(list: &[&str]) -> Arc<[IpAddr]> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// An answer is reused until its time is up, then asked for again;
    /// empty answers are not kept, and a forgotten name is asked for again.
    #[test]
    fn remembered_answers_expire_and_can_be_forgotten() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut c = NameCache::new(ttl);
        c.insert("web.default.svc", ips(&["10.0.0.7"]), t0);
        assert_eq!(
            c.get("web.default.svc", t0 + Duration::from_millis(4999)),
            Some(ips(&["10.0.0.7"]))
        );
        assert_eq!(c.get("web.default.svc", t0 + ttl), None);
        assert_eq!(c.get("db.default.svc", t0), None);
        // A newer answer replaces the old one and starts its own time.
        c.insert("web.default.svc", ips(&["10.0.0.8", "fd00::8"]), t0 + ttl);
        assert_eq!(
            c.get("web.default.svc", t0 + ttl + Duration::from_secs(1)),
            Some(ips(&["10.0.0.8", "fd00::8"]))
        );
        c.forget("web.default.svc");
        assert_eq!(
            c.get("web.default.svc", t0 + ttl + Duration::from_secs(1)),
            None
        );
        c.insert("gone.default.svc", ips(&[]), t0);
        assert!(c.is_empty());
        // A zero time keeps nothing.
        let mut never = NameCache::new(Duration::ZERO);
        never.insert("web", ips(&["10.0.0.7"]), t0);
        assert!(never.is_empty());
    }

    /// The cache stays bounded: when full, expired names go first, and if
    /// every name is still fresh, all of them go.
    #[test]
    fn a_full_cache_drops_expired_names_first_then_everything() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut c = NameCache::new(ttl);
        for i in 0..MAX_REMEMBERED - 1 {
            c.insert(&format!("old{i}"), ips(&["10.0.0.1"]), t0);
        }
        let later = t0 + Duration::from_secs(3);
        c.insert("fresh", ips(&["10.0.0.2"]), later);
        assert_eq!(c.len(), MAX_REMEMBERED);
        // Full: the expired names go, the fresh one stays.
        let past = t0 + ttl + Duration::from_secs(1);
        c.insert("new", ips(&["10.0.0.3"]), past);
        assert_eq!(c.len(), 2);
        assert!(c.get("fresh", past).is_some());
        assert!(c.get("new", past).is_some());
        // Full of fresh names: everything goes but the newcomer.
        for i in 0..MAX_REMEMBERED - 2 {
            c.insert(&format!("more{i}"), ips(&["10.0.0.1"]), past);
        }
        assert_eq!(c.len(), MAX_REMEMBERED);
        c.insert("last", ips(&["10.0.0.4"]), past);
        assert_eq!(c.len(), 1);
        assert!(c.get("last", past).is_some());
        // Replacing a stored name never counts as growing.
        c.insert("last", ips(&["10.0.0.5"]), past);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn host_and_port_of_an_address() {
        assert_eq!(
            split_host_port("web.default.svc:80"),
            Some(("web.default.svc", 80))
        );
        assert_eq!(split_host_port("10.0.0.1:5432"), Some(("10.0.0.1", 5432)));
        assert_eq!(split_host_port("[fd00::1]:22"), Some(("fd00::1", 22)));
        assert_eq!(split_host_port("localhost:0"), Some(("localhost", 0)));
        for bad in [
            "web",
            "web:",
            ":80",
            "web:http",
            "fd00::1:22",
            "web:65536",
            "",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
    }

    /// A remembering resolver asks the system once per name and time: the
    /// second lookup of `localhost` (the hosts file) is the stored answer,
    /// with the port of its own call; a forgotten name is asked again.
    #[tokio::test]
    async fn a_remembering_resolver_keeps_system_answers() {
        let r = NameResolver::system().remembering(REMEMBER_FOR);
        let first = r.lookup_system("localhost", 8000).await.unwrap();
        assert!(first
            .iter()
            .any(|a| a.ip().is_loopback() && a.port() == 8000));
        let cache = r.remembered.as_ref().unwrap();
        assert_eq!(lock(cache).len(), 1);
        let stored = lock(cache).get("localhost", Instant::now()).unwrap();
        let second = r.lookup("localhost", 9000).await.unwrap();
        let want: Vec<SocketAddr> = stored.iter().map(|&ip| SocketAddr::new(ip, 9000)).collect();
        assert_eq!(second, want);
        r.forget("localhost");
        assert_eq!(lock(cache).len(), 0);
        // IP literals are never looked up, so never stored.
        r.lookup_system("127.0.0.1", 80).await.unwrap();
        assert_eq!(lock(cache).len(), 0);
        // A resolver that does not remember stores nothing.
        let plain = NameResolver::system();
        plain.lookup_system("localhost", 80).await.unwrap();
        assert!(plain.remembered.is_none());
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
