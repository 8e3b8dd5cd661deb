//! Name lookups with the system resolver or one given DNS server: the
//! agent's services and raw targets (its `dns_server` setting applies to
//! raw targets) and the server's peer replicas (`[cluster] dns_server`).
//!
//! The agent resolves a raw target's host itself, checks every address
//! (see `tether_agent::policy::TargetPolicy::check_addresses`) and then
//! dials those addresses: the name is looked up at most once per open,
//! never again at connect time.
//!
//! The system resolver (`getaddrinfo`) keeps no answers and runs on a
//! blocking thread: each lookup is a thread hand-off, a read of the hosts
//! file and, in a cluster, DNS queries for every search domain. The
//! agent's resolver is built [`NameResolver::remembering`]: it reuses the
//! system resolver's answer for a name for [`REMEMBER_FOR`] ([`NameCache`];
//! the record's own TTL is not known through `getaddrinfo`), so a service
//! opened often is looked up once per 5 s, not once per connection. A DNS
//! server set with `dns_server` keeps its own answers (hickory's cache, for
//! as long as their TTL says).

use anyhow::bail;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The DNS port, when `dns_server` gives none.
const DNS_PORT: u16 = 53;

/// How long one query to the configured DNS server may take, and how often
/// it is tried (the open's dial timeout bounds the whole lookup too).
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
const QUERY_ATTEMPTS: usize = 2;

/// How long a remembering resolver reuses the system resolver's answer for
/// a name: the TTL Kubernetes' cluster DNS gives its records by default
/// (a cache in front of `getaddrinfo`, such as NodeLocal DNSCache, adds its
/// own time to this).
pub const REMEMBER_FOR: Duration = Duration::from_secs(5);

/// At most this many names are remembered (raw targets may name many).
const MAX_REMEMBERED: usize = 4096;

/// An answer with more addresses than this is used but not remembered, so
/// the cache's memory stays bounded by [`MAX_REMEMBERED`] small answers.
const MAX_ADDRESSES_REMEMBERED: usize = 64;

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
    /// returned as it is, without a lookup; a remembering resolver may give
    /// the system resolver's answer of up to [`REMEMBER_FOR`] ago.
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
                lock(cache).insert(host, &found, Instant::now());
                found
            }
        };
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    /// Whether an answer for `host` is remembered and still fresh.
    pub fn remembers(&self, host: &str) -> bool {
        self.remembered
            .as_ref()
            .is_some_and(|c| lock(c).holds(host, Instant::now()))
    }

    /// Drops what is remembered of `host`: none of its addresses answered a
    /// TCP dial, so the next open asks again (a pod that moved, a Service
    /// recreated). Its other ports' opens ask again too: a lookup is cheap
    /// next to leaving a dead address in use.
    pub fn forget(&self, host: &str) {
        if let Some(cache) = &self.remembered {
            lock(cache).forget(host);
        }
    }
}

/// The cache's lock; a panic while holding it cannot leave it half-written
/// (each step of a change leaves a valid map), so a poisoned lock is used
/// as is.
fn lock(cache: &Mutex<NameCache>) -> std::sync::MutexGuard<'_, NameCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Names and the addresses they resolved to, each kept for a fixed time.
///
/// A pure structure (the caller passes the time), so its rules are tested
/// without waiting: an answer is reused until `ttl` after it was stored;
/// empty answers, failures and answers of more than
/// `MAX_ADDRESSES_REMEMBERED` addresses are never stored (a Service
/// created a moment later is found at once); each reuse starts one address
/// further along, so the opens of a name with several addresses (a headless
/// Service) still spread over them as the DNS server's rotation would; at
/// `MAX_REMEMBERED` names, the expired ones go first and, if none has,
/// everything does.
#[derive(Debug)]
pub struct NameCache {
    ttl: Duration,
    entries: HashMap<String, Remembered>,
}

/// One name's answer.
#[derive(Debug)]
struct Remembered {
    addresses: Vec<IpAddr>,
    stored: Instant,
    /// How many times it was given out: where the next reuse starts.
    uses: usize,
}

impl NameCache {
    /// An empty cache keeping answers for `ttl`.
    pub fn new(ttl: Duration) -> NameCache {
        NameCache {
            ttl,
            entries: HashMap::new(),
        }
    }

    /// The addresses of `host` if they were stored less than `ttl` before
    /// `now`, starting one further along than the previous time.
    pub fn get(&mut self, host: &str, now: Instant) -> Option<Vec<IpAddr>> {
        let r = self.entries.get_mut(host)?;
        if now.saturating_duration_since(r.stored) >= self.ttl {
            return None;
        }
        r.uses = r.uses.wrapping_add(1);
        let mut addresses = r.addresses.clone();
        let start = r.uses % addresses.len();
        addresses.rotate_left(start);
        Some(addresses)
    }

    /// Stores the addresses `host` resolved to at `now` (see the type's
    /// rules for what is not stored).
    pub fn insert(&mut self, host: &str, addresses: &[IpAddr], now: Instant) {
        if addresses.is_empty() || addresses.len() > MAX_ADDRESSES_REMEMBERED || self.ttl.is_zero()
        {
            return;
        }
        if self.entries.len() >= MAX_REMEMBERED && !self.entries.contains_key(host) {
            let ttl = self.ttl;
            self.entries
                .retain(|_, r| now.saturating_duration_since(r.stored) < ttl);
            if self.entries.len() >= MAX_REMEMBERED {
                self.entries.clear();
            }
        }
        let r = Remembered {
            addresses: addresses.to_vec(),
            stored: now,
            uses: 0,
        };
        self.entries.insert(host.to_owned(), r);
    }

    /// Drops `host`.
    pub fn forget(&mut self, host: &str) {
        self.entries.remove(host);
    }

    /// Whether a fresh answer for `host` is stored (without using it).
    pub fn holds(&self, host: &str, now: Instant) -> bool {
        self.entries
            .get(host)
            .is_some_and(|r| now.saturating_duration_since(r.stored) < self.ttl)
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

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// An answer is reused until its time is up, then asked for again;
    /// empty and very long answers are not kept, and a forgotten name is
    /// asked for again.
    #[test]
    fn remembered_answers_expire_and_can_be_forgotten() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut c = NameCache::new(ttl);
        c.insert("web.default.svc", &ips(&["10.0.0.7"]), t0);
        let almost = t0 + Duration::from_millis(4999);
        assert!(c.holds("web.default.svc", almost));
        assert_eq!(c.get("web.default.svc", almost), Some(ips(&["10.0.0.7"])));
        assert_eq!(c.get("web.default.svc", t0 + ttl), None);
        assert!(!c.holds("web.default.svc", t0 + ttl));
        assert_eq!(c.get("db.default.svc", t0), None);
        // A newer answer replaces the old one and starts its own time.
        c.insert("web.default.svc", &ips(&["10.0.0.8"]), t0 + ttl);
        let later = t0 + ttl + Duration::from_secs(1);
        assert_eq!(c.get("web.default.svc", later), Some(ips(&["10.0.0.8"])));
        c.forget("web.default.svc");
        assert_eq!(c.get("web.default.svc", later), None);
        c.insert("gone.default.svc", &[], t0);
        let many: Vec<IpAddr> = (0..=MAX_ADDRESSES_REMEMBERED)
            .map(|i| IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]))
            .collect();
        c.insert("huge.example", &many, t0);
        c.insert("largest.example", &many[..MAX_ADDRESSES_REMEMBERED], t0);
        assert_eq!(c.len(), 1, "only the answer within the limit is kept");
        assert!(c.holds("largest.example", t0));
        // A zero time keeps nothing.
        let mut never = NameCache::new(Duration::ZERO);
        never.insert("web", &ips(&["10.0.0.7"]), t0);
        assert!(never.is_empty());
    }

    /// Each reuse of an answer starts one address further along, so opens
    /// still spread over a headless Service's pods; the addresses are the
    /// same ones every time.
    #[test]
    fn a_remembered_answer_rotates_its_addresses() {
        let t0 = Instant::now();
        let mut c = NameCache::new(Duration::from_secs(5));
        c.insert(
            "pods.default.svc",
            &ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            t0,
        );
        let firsts: Vec<IpAddr> = (0..6)
            .map(|_| c.get("pods.default.svc", t0).unwrap()[0])
            .collect();
        assert_eq!(
            firsts,
            ips(&["10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"])
        );
        let mut all = c.get("pods.default.svc", t0).unwrap();
        all.sort();
        assert_eq!(all, ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    }

    /// The cache stays bounded: when full, expired names go first, and if
    /// every name is still fresh, all of them go.
    #[test]
    fn a_full_cache_drops_expired_names_first_then_everything() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let one = ips(&["10.0.0.1"]);
        let mut c = NameCache::new(ttl);
        for i in 0..MAX_REMEMBERED - 1 {
            c.insert(&format!("old{i}"), &one, t0);
        }
        let later = t0 + Duration::from_secs(3);
        c.insert("fresh", &one, later);
        assert_eq!(c.len(), MAX_REMEMBERED);
        // Full: the expired names go, the fresh one stays.
        let past = t0 + ttl + Duration::from_secs(1);
        c.insert("new", &one, past);
        assert_eq!(c.len(), 2);
        assert!(c.holds("fresh", past));
        assert!(c.holds("new", past));
        // Full of fresh names: everything goes but the newcomer.
        for i in 0..MAX_REMEMBERED - 2 {
            c.insert(&format!("more{i}"), &one, past);
        }
        assert_eq!(c.len(), MAX_REMEMBERED);
        c.insert("last", &one, past);
        assert_eq!(c.len(), 1);
        assert!(c.holds("last", past));
        // Replacing a stored name never counts as growing.
        c.insert("last", &ips(&["10.0.0.5"]), past);
        assert_eq!(c.len(), 1);
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
        assert!(r.remembers("localhost"));
        let cache = r.remembered.as_ref().unwrap();
        assert_eq!(lock(cache).len(), 1);
        let mut second = r.lookup("localhost", 9000).await.unwrap();
        let mut want: Vec<SocketAddr> = first
            .iter()
            .map(|a| SocketAddr::new(a.ip(), 9000))
            .collect();
        second.sort();
        want.sort();
        assert_eq!(second, want);
        r.forget("localhost");
        assert!(!r.remembers("localhost"));
        // IP literals are never looked up, so never stored.
        r.lookup_system("127.0.0.1", 80).await.unwrap();
        assert_eq!(lock(cache).len(), 0);
        // A resolver that does not remember stores nothing.
        let plain = NameResolver::system();
        plain.lookup_system("localhost", 80).await.unwrap();
        assert!(!plain.remembers("localhost"));
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
