//! What the agent may dial: named services and allow-listed `host:port` targets.
//!
//! The agent enforces this itself, whatever the server asks: a compromised or
//! misconfigured server cannot make the agent reach anything else.
//!
//! Raw `host:port` targets are checked twice: the name against the host
//! globs before it is resolved, then every address it resolves to against the
//! address rules and the built-in deny ranges ([`builtin_deny`]). The agent
//! dials exactly the addresses it checked. Named services are the operator's
//! own choice and are not subject to the built-in deny ranges.

use anyhow::{anyhow, bail, Context};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use tether_net::pattern::glob_match;
use tether_net::transport::tls::{client_config, ServerTrust};
use tether_net::Refusal;
use tether_proto::frame::MAX_ENTRY_TEXT;
use tether_proto::target::parse_port;
use tether_proto::{CatalogEntry, OpenErrorCode, ServiceKind};

/// A named service as written in the config: a string
/// (`HOST:PORT` for TCP, `http://HOST:PORT`, `https://HOST:PORT`,
/// `https+insecure://HOST:PORT`, `h2c://HOST:PORT`) or a table with every
/// option.
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
    /// The service speaks HTTP/2 only (gRPC, say): the server sends it
    /// requests as HTTP/2, all over one tunnel stream; cleartext with prior
    /// knowledge, or over TLS with ALPN `h2`. Implies `http`.
    #[serde(default)]
    pub http2: bool,
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
    /// The ALPN protocol the service must choose (`h2` for an HTTP/2
    /// service: the server will speak nothing else on the stream).
    pub require_alpn: Option<&'static [u8]>,
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
    /// It speaks HTTP/2 only (the server proxies to it with HTTP/2).
    pub http2: bool,
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
                http2: false,
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
                "h2c" => t.http2 = true,
                "tcp" => {}
                "tls" => t.tls = true,
                other => bail!("service {name}: unknown scheme {other:?} (http, https, https+insecure, h2c, tcp, tls)"),
            }
            t.address = rest.trim_end_matches('/').to_owned();
        }
        t.http |= t.http2;
        let Some((host, _port)) = split_host_port(&t.address) else {
            bail!("service {name}: address {:?} is not HOST:PORT", t.address);
        };
        let tls = if t.tls {
            let trust = match (&t.tls_ca, t.tls_verify) {
                (_, false) => ServerTrust::AnyCertificate,
                (Some(ca), true) => ServerTrust::CaFile(ca.clone()),
                (None, true) => ServerTrust::SystemRoots,
            };
            let mut cfg = client_config(&trust).with_context(|| format!("service {name}: TLS"))?;
            let require_alpn: Option<&'static [u8]> = t.http2.then_some(b"h2");
            // Offer what the service will be spoken to in, and nothing for
            // raw TLS: a server that enforces ALPN (PostgreSQL's direct TLS
            // wants `postgresql`) aborts a handshake that offers a protocol
            // it does not speak, and the open would fail as unreachable.
            Arc::make_mut(&mut cfg).alpn_protocols = match (require_alpn, t.http) {
                (Some(p), _) => vec![p.to_vec()],
                (None, true) => vec![b"http/1.1".to_vec()],
                (None, false) => vec![],
            };
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
                require_alpn,
            })
        } else {
            None
        };
        Ok(Service {
            host_header: t.rewrite_host.then(|| t.address.clone()),
            address: t.address,
            http: t.http,
            http2: t.http2,
            tls,
        })
    }
}

/// An address range the agent does not dial for a raw target unless a rule
/// names it explicitly: loopback, "this host", link-local and the cloud
/// metadata endpoints. See [`builtin_deny`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenyRange {
    /// The range.
    pub net: IpNet,
    /// What it is, for refusals and logs.
    pub what: &'static str,
    /// A loopback range: a rule for the name `localhost` allows it too.
    loopback: bool,
    /// Never dialed, whatever the rules say: an unspecified address
    /// (`0.0.0.0`, `::`) connects to this host, which a rule meaning "any
    /// host" (`0.0.0.0:5432`) did not ask for.
    never: bool,
}

/// The built-in deny ranges for raw targets. An address in one is allowed
/// only by an address rule whose network lies inside that range
/// (`127.0.0.0/8:*`, `127.0.0.1:8000`, `169.254.169.254:80`), or, for
/// loopback, by a rule naming `localhost` itself; never by a broader network
/// (`0.0.0.0/0:*`) or a host glob. IPv4-mapped IPv6 addresses
/// (`::ffff:127.0.0.1`) count as the IPv4 address they reach.
pub fn builtin_deny() -> &'static [DenyRange] {
    static RANGES: LazyLock<Vec<DenyRange>> = LazyLock::new(|| {
        [
            // (range, what it is, loopback, never dialed)
            ("127.0.0.0/8", "loopback", true, false),
            ("::1/128", "loopback", true, false),
            ("0.0.0.0/8", "this-host", false, true),
            ("::/128", "unspecified", false, true),
            (
                "169.254.0.0/16",
                "link-local (cloud metadata)",
                false,
                false,
            ),
            ("fe80::/10", "link-local", false, false),
            ("100.100.100.200/32", "cloud metadata", false, false),
            // AWS's IPv6 instance services: metadata (::254), DNS (::253),
            // NTP (::123), EKS Pod Identity (::23), as 169.254.0.0/16 in IPv4.
            ("fd00:ec2::/64", "cloud metadata (AWS)", false, false),
            ("fd20:ce::254/128", "cloud metadata (GCP)", false, false),
            ("168.63.129.16/32", "cloud platform (Azure)", false, false),
        ]
        .into_iter()
        .map(|(net, what, loopback, never)| DenyRange {
            net: net.parse().expect("built-in deny ranges are valid"),
            what,
            loopback,
            never,
        })
        .collect()
    });
    &RANGES
}

/// The built-in deny range `ip` falls in, if any. An IPv6 address that
/// carries an IPv4 one the network would deliver to (NAT64, IPv4-compatible, 6to4)
/// falls in the IPv6 form of the IPv4 address's range: `64:ff9b::a9fe:a9fe`
/// (NAT64 to 169.254.169.254) is in `64:ff9b::a9fe:0/112`, which only a rule
/// inside it allows.
pub fn deny_range_of(ip: IpAddr) -> Option<DenyRange> {
    let ip = ip.to_canonical();
    if let Some(d) = builtin_deny().iter().find(|d| d.net.contains(&ip)) {
        return Some(*d);
    }
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    let (v4, embed) = embedded_ipv4(v6)?;
    let d = builtin_deny()
        .iter()
        .find(|d| d.net.contains(&IpAddr::V4(v4)))?;
    let IpNet::V4(range) = d.net else {
        return None;
    };
    Some(DenyRange {
        net: IpNet::V6(embed.lift(range)),
        ..*d
    })
}

/// How an IPv6 address carries an IPv4 one the network would deliver to.
#[derive(Debug, Clone, Copy)]
enum Embedding {
    /// NAT64's well-known prefix, `64:ff9b::/96`.
    Nat64,
    /// The deprecated IPv4-compatible form, `::a.b.c.d` (outside `::/127`).
    Compatible,
    /// 6to4, `2002:AABB:CCDD::/48`.
    SixToFour,
}

impl Embedding {
    /// The IPv6 network that carries the IPv4 network `net` this way.
    fn lift(self, net: Ipv4Net) -> Ipv6Net {
        let mut b = [0u8; 16];
        let v4 = net.network().octets();
        let at = match self {
            Embedding::Nat64 => {
                b[..4].copy_from_slice(&[0, 0x64, 0xff, 0x9b]);
                b[12..].copy_from_slice(&v4);
                96
            }
            Embedding::Compatible => {
                b[12..].copy_from_slice(&v4);
                96
            }
            Embedding::SixToFour => {
                b[..2].copy_from_slice(&[0x20, 0x02]);
                b[2..6].copy_from_slice(&v4);
                16
            }
        };
        Ipv6Net::new(Ipv6Addr::from(b), at + net.prefix_len()).expect("at most 128 bits")
    }
}

/// The IPv4 address an IPv6 address leads to where the network translates
/// or tunnels it (IPv4-mapped addresses are [`IpAddr::to_canonical`]'s).
fn embedded_ipv4(ip: Ipv6Addr) -> Option<(Ipv4Addr, Embedding)> {
    let o = ip.octets();
    let last4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if o[..12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0] {
        Some((last4, Embedding::Nat64))
    } else if o[..12] == [0; 12] && u32::from(last4) > 1 {
        Some((last4, Embedding::Compatible))
    } else if o[..2] == [0x20, 0x02] {
        Some((Ipv4Addr::new(o[2], o[3], o[4], o[5]), Embedding::SixToFour))
    } else {
        None
    }
}

/// A network in the form of [`IpAddr::to_canonical`]: an IPv4-mapped IPv6 network
/// of /96 or longer becomes the IPv4 network it maps.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), Some(len)) = (
            v6.network().to_ipv4_mapped(),
            v6.prefix_len().checked_sub(96),
        ) {
            if let Ok(n) = Ipv4Net::new(v4, len) {
                return IpNet::V4(n);
            }
        }
    }
    net
}

/// How an allow rule matches the host part.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    /// Host names by glob, in lower case: `*.svc.cluster.local`. It matches
    /// the name asked for; the addresses the name resolves to are allowed
    /// unless they fall in a built-in deny range.
    Glob(String),
    /// IP addresses in a network: `10.0.0.0/8`, `[fd00::]/8`, `10.0.*.*`.
    Net(IpNet),
}

/// One `HOST:PORTS` allow rule.
#[derive(Debug, Clone)]
pub struct AllowRule {
    host: HostRule,
    ports: (u16, u16),
}

impl AllowRule {
    /// Parses `HOSTGLOB:PORTS`, `IP:PORTS` or `CIDR:PORTS` (`[v6]:PORTS`,
    /// `[v6]/len:PORTS` for IPv6), where PORTS is `*`, `N` or `N-M`. An
    /// IPv4 glob with whole-octet wildcards at the end (`10.0.*.*`, `10.*`)
    /// becomes the CIDR it means (`10.0.0.0/16`, `10.0.0.0/8`); any other
    /// glob of digits and dots (`10.*.0.1`) is refused.
    pub fn parse(s: &str) -> anyhow::Result<AllowRule> {
        let (host, ports) = s
            .rsplit_once(':')
            .with_context(|| format!("allow rule {s:?}: expected HOST:PORTS"))?;
        let ports = parse_port_range(ports).with_context(|| {
            format!("allow rule {s:?}: ports must be *, N or N-M (1-65535, N <= M)")
        })?;
        let host = parse_host_rule(host).with_context(|| format!("allow rule {s:?}"))?;
        Ok(AllowRule { host, ports })
    }

    fn has_port(&self, port: u16) -> bool {
        (self.ports.0..=self.ports.1).contains(&port)
    }

    /// The rule's host glob matches `host` (lower case) on `port`.
    fn matches_name(&self, host: &str, port: u16) -> bool {
        match &self.host {
            HostRule::Glob(g) => self.has_port(port) && glob_match(g, host),
            HostRule::Net(_) => false,
        }
    }

    /// The rule's host is a glob of wildcards only (`*:443`).
    fn is_wildcard_only(&self) -> bool {
        matches!(&self.host, HostRule::Glob(g) if g.bytes().all(|b| b == b'*'))
    }

    /// The rule is the name `localhost` itself (no wildcard).
    fn is_localhost(&self) -> bool {
        matches!(&self.host, HostRule::Glob(g) if g == "localhost")
    }

    /// The rule's network allows dialing `ip` (canonical) on `port`. An
    /// address in the built-in deny range `deny` needs a network inside it.
    fn allows_address(&self, ip: IpAddr, port: u16, deny: Option<&DenyRange>) -> bool {
        match &self.host {
            HostRule::Net(net) => {
                self.has_port(port)
                    && net.contains(&ip)
                    && deny.is_none_or(|d| !d.never && d.net.contains(net))
            }
            HostRule::Glob(_) => false,
        }
    }
}

/// Parses a decimal number of at most 5 digits, without sign or leading
/// zero (`0` itself is fine).
fn parse_decimal(s: &str) -> Option<u32> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// `*`, `N` or `N-M`.
fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s {
        "*" => return Some((1, 65535)),
        s => match s.split_once('-') {
            Some((a, b)) => (parse_port(a)?, parse_port(b)?),
            None => (parse_port(s)?, parse_port(s)?),
        },
    };
    (a <= b).then_some((a, b))
}

/// A prefix length of at most `max` bits.
fn parse_prefix(s: &str, max: u8) -> Option<u8> {
    parse_decimal(s)
        .and_then(|n| u8::try_from(n).ok())
        .filter(|&n| n <= max)
}

/// The host part of an allow rule.
fn parse_host_rule(host: &str) -> anyhow::Result<HostRule> {
    if host.is_empty() {
        bail!("empty host");
    }
    if let Some(rest) = host.strip_prefix('[') {
        let (inner, tail) = rest
            .split_once(']')
            .with_context(|| format!("{host:?}: '[' without ']'"))?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| {
            anyhow!(
                "{host:?}: brackets hold exactly one IPv6 address, as in [fd00::1] or [fd00::]/8"
            )
        })?;
        let len = match tail {
            "" => 128,
            t => t
                .strip_prefix('/')
                .and_then(|l| parse_prefix(l, 128))
                .with_context(|| format!("{host:?}: expected [IPv6] or [IPv6]/LEN"))?,
        };
        return Ok(HostRule::Net(canonical_net(Ipv6Net::new(ip, len)?.into())));
    }
    if host.contains([':', '[', ']']) {
        bail!("{host:?}: write an IPv6 address in brackets, as in [fd00::1] or [fd00::]/8");
    }
    if let Some((ip, len)) = host.split_once('/') {
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| anyhow!("{host:?} is not an IPv4 CIDR"))?;
        let len = parse_prefix(len, 32).with_context(|| format!("{host:?}: bad prefix length"))?;
        return Ok(HostRule::Net(Ipv4Net::new(ip, len)?.into()));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(HostRule::Net(IpAddr::V4(ip).into()));
    }
    if looks_like_ip(host) {
        return ip_glob_to_net(host).map(HostRule::Net);
    }
    let glob = host.to_ascii_lowercase();
    if !glob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._*?".contains(&b))
    {
        bail!("{host:?} is not a host glob (letters, digits, '-', '.', '_', '*' and '?')");
    }
    Ok(HostRule::Glob(glob))
}

/// Made of digits, dots and wildcards, with at least one digit or dot: an
/// IPv4 address or glob, never a host name glob (`*` alone is a name glob).
fn looks_like_ip(host: &str) -> bool {
    host.bytes()
        .all(|b| b.is_ascii_digit() || b"*?.".contains(&b))
        && host.bytes().any(|b| b.is_ascii_digit() || b == b'.')
}

/// `10.0.*.*` (or `10.0.*`) as `10.0.0.0/16`: whole decimal octets first,
/// then whole-octet `*`s, at least one of each.
fn ip_glob_to_net(host: &str) -> anyhow::Result<IpNet> {
    if !host.contains(['*', '?']) {
        bail!("{host:?} is not an IPv4 address");
    }
    let refuse = || {
        anyhow!(
            "{host:?} looks like an IPv4 glob, but only whole octets at the end may be \
             wildcards (10.0.*.* means 10.0.0.0/16): write a CIDR instead"
        )
    };
    let parts: Vec<&str> = host.split('.').collect();
    let fixed = parts.iter().take_while(|p| **p != "*").count();
    if parts.len() > 4 || fixed == 0 || !parts[fixed..].iter().all(|p| *p == "*") {
        return Err(refuse());
    }
    let mut octets = [0u8; 4];
    for (o, p) in octets.iter_mut().zip(&parts[..fixed]) {
        *o = parse_decimal(p)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(refuse)?;
    }
    let len = u8::try_from(fixed * 8).map_err(|_| refuse())?;
    Ok(Ipv4Net::new(Ipv4Addr::from(octets), len)?.into())
}

/// The agent's dial policy.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    services: BTreeMap<String, Service>,
    allow: Vec<AllowRule>,
}

/// What a raw target's name earned from the host globs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NameGrant {
    /// A host glob matched: the addresses outside the built-in deny ranges.
    any: bool,
    /// A rule names `localhost` itself: loopback addresses too.
    loopback: bool,
}

/// A raw `host:port` target whose name passed the allow list; the addresses
/// it resolves to still have to pass [`TargetPolicy::check_addresses`].
#[derive(Debug, Clone)]
pub struct RawTarget {
    /// The host asked for (an IPv6 address without its brackets).
    pub host: String,
    /// The port asked for.
    pub port: u16,
    grant: NameGrant,
}

/// A target that passed the policy.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `host:port`: a service's configured address, or the raw target.
    pub address: String,
    /// The service name, when the target was one.
    pub service: Option<String>,
    /// TLS towards the service.
    pub tls: Option<ServiceTls>,
    /// A raw target: resolve its host, check the addresses with
    /// [`TargetPolicy::check_addresses`], dial exactly those.
    pub raw: Option<RawTarget>,
}

impl Resolved {
    /// The host to look up (an IPv6 address without its brackets) and the
    /// port to dial: a raw target's, or a service's configured address
    /// (checked as `HOST:PORT` when the config loaded).
    pub fn host_port(&self) -> Option<(&str, u16)> {
        if let Some(raw) = &self.raw {
            return Some((raw.host.as_str(), raw.port));
        }
        let (host, port) = split_host_port(&self.address)?;
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some((bare, port))
    }
}

/// Why an address is refused.
enum AddressRefusal {
    /// No rule covers it.
    NoRule,
    /// It is in a built-in deny range and no rule names it.
    Reserved(DenyRange),
}

impl AddressRefusal {
    fn explain(&self, addr: SocketAddr) -> String {
        match self {
            AddressRefusal::NoRule => "which no rule allows".to_owned(),
            AddressRefusal::Reserved(d) if d.never => format!(
                "a {} address ({}), which connects to this host: never dialed (a rule for 127.0.0.1 or localhost allows this host)",
                d.what, d.net
            ),
            AddressRefusal::Reserved(d) => format!(
                "a {} address ({}) that only an explicit rule for it allows (such as {})",
                d.what,
                d.net,
                SocketAddr::new(addr.ip().to_canonical(), addr.port())
            ),
        }
    }
}

impl TargetPolicy {
    /// Builds the policy; named services must be `host:port` (or a URL form).
    pub fn new(services: &BTreeMap<String, ServiceSpec>, allow: &[String]) -> anyhow::Result<Self> {
        let mut checked = BTreeMap::new();
        for (name, spec) in services {
            if name.contains([':', '/'])
                || name.chars().any(char::is_control)
                || !(1..=MAX_ENTRY_TEXT).contains(&name.len())
            {
                bail!(
                    "service name {name:?}: 1 to {MAX_ENTRY_TEXT} bytes, without ':', '/' or control characters"
                );
            }
            let service = Service::from_spec(name, spec)?;
            if service
                .host_header
                .as_ref()
                .is_some_and(|h| h.len() > MAX_ENTRY_TEXT)
            {
                // CATALOG carries it in 255 bytes; cut, it would be wrong.
                bail!("service {name:?}: an address over {MAX_ENTRY_TEXT} bytes cannot be the Host header the service gets (rewrite_host)");
            }
            checked.insert(name.clone(), service);
        }
        Ok(TargetPolicy {
            services: checked,
            allow: allow
                .iter()
                .map(|r| AllowRule::parse(r))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Decides whether `target` (a service name or `host:port`) may be
    /// dialed, as far as it can before resolving: a named service is
    /// allowed as configured; a raw target's name must match a host glob (it
    /// is not resolved otherwise) and an IP literal must pass the address
    /// rules. The addresses a raw name resolves to are checked with
    /// [`TargetPolicy::check_addresses`].
    pub fn resolve(&self, target: &str) -> Result<Resolved, Refusal> {
        if let Some(svc) = self.services.get(target) {
            return Ok(Resolved {
                address: svc.address.clone(),
                service: Some(target.to_owned()),
                tls: svc.tls.clone(),
                raw: None,
            });
        }
        let Some((host, port)) = split_host_port(target) else {
            return Err(if target.contains(':') {
                Refusal::new(
                    OpenErrorCode::BadTarget,
                    format!("{target:?} is not a valid HOST:PORT"),
                )
            } else {
                Refusal::new(
                    OpenErrorCode::UnknownService,
                    format!("no service named {target:?} on this agent"),
                )
            });
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let raw = RawTarget {
            host: host.to_owned(),
            port,
            grant: self.name_grant(host, port),
        };
        let not_allowed = || format!("{target} is not in this agent's allow list");
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                let addr = SocketAddr::new(ip, port);
                self.check_address(&raw, addr).map_err(|why| {
                    let why = match why {
                        AddressRefusal::NoRule => String::new(),
                        r => format!(": {ip} is {}", r.explain(addr)),
                    };
                    Refusal::new(OpenErrorCode::Forbidden, not_allowed() + &why)
                })?;
            }
            Err(_) if !raw.grant.any => {
                return Err(Refusal::new(OpenErrorCode::Forbidden, not_allowed()))
            }
            Err(_) => {}
        }
        Ok(Resolved {
            address: target.to_owned(),
            service: None,
            tls: None,
            raw: Some(raw),
        })
    }

    /// Checks every address a raw target resolved to: each must be allowed
    /// (see [`builtin_deny`] for the ranges that need an explicit rule). The
    /// refusal names the first address that is not.
    pub fn check_addresses(&self, raw: &RawTarget, addrs: &[SocketAddr]) -> Result<(), Refusal> {
        // Named as users write it (a discovered name is looked up with a
        // trailing dot).
        let name = raw.host.strip_suffix('.').unwrap_or(&raw.host);
        if addrs.is_empty() {
            return Err(Refusal::new(
                OpenErrorCode::Unreachable,
                format!("{name} resolves to no address"),
            ));
        }
        for &addr in addrs {
            if let Err(why) = self.check_address(raw, addr) {
                return Err(Refusal::new(
                    OpenErrorCode::Forbidden,
                    format!("{name} resolves to {}, {}", addr.ip(), why.explain(addr)),
                ));
            }
        }
        Ok(())
    }

    /// One address of a raw target: allowed by an address rule, or by the
    /// name's glob when it is outside the built-in deny ranges.
    fn check_address(&self, raw: &RawTarget, addr: SocketAddr) -> Result<(), AddressRefusal> {
        let ip = addr.ip().to_canonical();
        let deny = deny_range_of(ip);
        let by_rule = self
            .allow
            .iter()
            .any(|r| r.allows_address(ip, addr.port(), deny.as_ref()));
        let by_name = addr.port() == raw.port
            && match deny {
                None => raw.grant.any,
                Some(d) => d.loopback && raw.grant.loopback,
            };
        match (by_rule || by_name, deny) {
            (true, _) => Ok(()),
            (false, None) => Err(AddressRefusal::NoRule),
            (false, Some(d)) => Err(AddressRefusal::Reserved(d)),
        }
    }

    /// Which host globs match `host` on `port`.
    fn name_grant(&self, host: &str, port: u16) -> NameGrant {
        let host = host.to_ascii_lowercase();
        // An IP literal is not a name: only a glob of wildcards only (which
        // matches everything) reaches it, never one that happens to match
        // its text (`*db` and `[fd00::db]`).
        let literal = host.parse::<IpAddr>().is_ok();
        self.allow
            .iter()
            .filter(|r| {
                if literal {
                    r.is_wildcard_only() && r.has_port(port)
                } else {
                    r.matches_name(&host, port)
                }
            })
            .fold(NameGrant::default(), |g, r| NameGrant {
                any: true,
                loopback: g.loopback || r.is_localhost(),
            })
    }

    /// Whether `name` is a configured service.
    pub fn has_service(&self, name: &str) -> bool {
        self.services.contains_key(name)
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
                kind: match (s.http2, s.http) {
                    (true, _) => ServiceKind::Http2,
                    (false, true) => ServiceKind::Http,
                    (false, false) => ServiceKind::Tcp,
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

/// Splits `host:port` / `[v6]:port`, strictly: a decimal port 1-65535
/// without sign or leading zero; an IPv6 address in exactly one pair of
/// brackets; otherwise a host name or IPv4 address (letters, digits, `-`,
/// `.`, `_`).
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = parse_port(port)?;
    valid_host(host).then_some((host, port))
}

/// `[IPv6]`, or a host name / IPv4 address of at most 254 characters.
fn valid_host(host: &str) -> bool {
    match host.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host.len() <= 254
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        }
    }
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
                http2: false,
                tls: true,
                tls_verify: false,
                tls_ca: None,
                tls_server_name: None,
                rewrite_host: true,
            }),
        );
        services.insert("grpc".to_owned(), "h2c://grpc.shop:50051".into());
        services.insert("local".to_owned(), "127.0.0.1:8002".into());
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

    /// A policy from allow rules only.
    fn rules(allow: &[&str]) -> TargetPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        TargetPolicy::new(&BTreeMap::new(), &allow).unwrap()
    }

    /// Checks `target` as if its host resolved to `addrs`.
    fn check(p: &TargetPolicy, target: &str, addrs: &[&str]) -> Result<(), Refusal> {
        let r = p.resolve(target)?;
        let raw = r.raw.expect("a raw target");
        let addrs: Vec<SocketAddr> = addrs
            .iter()
            .map(|a| SocketAddr::new(a.parse().unwrap(), raw.port))
            .collect();
        p.check_addresses(&raw, &addrs)
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
            p.resolve("10.1.2.3:5433").unwrap_err().code,
            OpenErrorCode::Forbidden
        );
        assert_eq!(
            p.resolve("11.1.2.3:5432").unwrap_err().code,
            OpenErrorCode::Forbidden
        );
        assert!(p.resolve("localhost:8080").is_ok());
        assert!(p.resolve("localhost:9000").is_err());
        assert!(p.resolve("[::1]:22").is_ok());
        assert_eq!(
            p.resolve("redis").unwrap_err().code,
            OpenErrorCode::UnknownService
        );
        // A name never matches a CIDR rule, even if it would resolve into it.
        assert_eq!(
            p.resolve("evil.example:5432").unwrap_err().code,
            OpenErrorCode::Forbidden
        );
        assert!(p.resolve("svc.cluster.local.evil.com:80").is_err());
    }

    /// A name glob never reaches an IP literal through its text (IPv4-like
    /// globs are networks, refused unless whole octets); a glob
    /// of wildcards only does (outside the deny ranges).
    #[test]
    fn name_globs_do_not_match_the_text_of_ip_literals() {
        let p = rules(&["*db:5432", "fd*:22"]);
        assert!(p.resolve("[fd00::1:db]:5432").is_err());
        assert!(p.resolve("[fd00::db]:5432").is_err());
        assert!(p.resolve("[fd00::1]:22").is_err());
        assert!(p.resolve("pgdb:5432").is_ok());
        let any = rules(&["*:5432"]);
        assert!(any.resolve("[fd00::1:db]:5432").is_ok());
        assert!(any.resolve("10.1.2.3:5432").is_ok());
    }

    #[test]
    fn named_services_skip_the_address_checks() {
        // The operator named it: no built-in deny, nothing left to check.
        let r = policy().resolve("local").unwrap();
        assert_eq!(r.address, "127.0.0.1:8002");
        assert!(r.raw.is_none());
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
                ("grpc", ServiceKind::Http2, ""),
                ("kibana", ServiceKind::Http, "kibana:5601"),
                ("local", ServiceKind::Tcp, ""),
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
        // A name with a control character; a Host too long for the catalog
        // (a 251-byte name is fine to dial).
        let host = vec!["h".repeat(62); 4].join(".");
        let long = |rewrite_host| {
            ServiceSpec::Full(ServiceTable {
                address: format!("{host}:65535"),
                http: true,
                http2: false,
                tls: false,
                tls_verify: true,
                tls_ca: None,
                tls_server_name: None,
                rewrite_host,
            })
        };
        let one = |name: &str, spec: ServiceSpec| {
            TargetPolicy::new(&[(name.to_owned(), spec)].into_iter().collect(), &[])
        };
        assert!(one("a\u{1b}b", "db:5432".into()).is_err());
        assert!(one("long", long(false)).is_ok());
        let e = one("long", long(true)).err().unwrap().to_string();
        assert!(e.contains("over 255 bytes"), "{e}");
    }

    #[test]
    fn bad_rules_are_rejected() {
        for bad in [
            "host",
            "host:0",
            "host:9-3",
            ":80",
            "host:08002",
            "host:+8002",
            "host:0008002",
            "host:65536",
            "host:80-",
            "[[127.0.0.2]]:8002",
            "[127.0.0.2]:8002",
            "[::1]]:22",
            "[::1:22",
            "::1:22",
            "fe80::/10:*",
            "[fe80::]/010:*",
            "[fe80::]/129:*",
            "10.0.0.0/33:*",
            "10.0.0.0/08:*",
            "300.1.2.3:80",
            "bad host:80",
            "host/x:80",
        ] {
            assert!(AllowRule::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            AllowRule::parse("Host.Example:80-81").unwrap().ports,
            (80, 81)
        );
        assert_eq!(
            AllowRule::parse("[::ffff:127.0.0.1]:80").unwrap().host,
            HostRule::Net("127.0.0.1/32".parse().unwrap()),
            "IPv4-mapped rules are IPv4 rules"
        );
    }

    #[test]
    fn targets_are_parsed_strictly() {
        for bad in [
            "[[127.0.0.2]]:8002",
            "[127.0.0.2]:8002",
            "127.0.0.2:08002",
            "127.0.0.2:+8002",
            "127.0.0.2:0008002",
            "127.0.0.2:0",
            "127.0.0.2:65536",
            "127.0.0.2:",
            ":8002",
            "::1:22",
            "[::1]]:22",
            "[[::1]]:22",
            "a b:80",
            "a/b:80",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad:?} accepted");
        }
        assert_eq!(split_host_port("[::1]:22"), Some(("[::1]", 22)));
        assert_eq!(
            split_host_port("db.example:65535"),
            Some(("db.example", 65535))
        );
        assert_eq!(split_host_port("10.0.0.1:1"), Some(("10.0.0.1", 1)));
        // Malformed raw targets are refused as such, not as unknown services.
        let p = rules(&["*:*"]);
        assert_eq!(
            p.resolve("[[127.0.0.2]]:8002").unwrap_err().code,
            OpenErrorCode::BadTarget
        );
        assert_eq!(
            p.resolve("x:08002").unwrap_err().code,
            OpenErrorCode::BadTarget
        );
    }

    #[test]
    fn ip_globs_become_cidrs_or_are_refused() {
        let net = |s: &str| match AllowRule::parse(s).unwrap().host {
            HostRule::Net(n) => n.to_string(),
            HostRule::Glob(g) => panic!("{s} stayed a glob: {g}"),
        };
        assert_eq!(net("10.0.*.*:*"), "10.0.0.0/16");
        assert_eq!(net("10.*:*"), "10.0.0.0/8");
        assert_eq!(net("192.168.1.*:22"), "192.168.1.0/24");
        for bad in [
            "10.*.0.1:*",
            "*.*.0.1:*",
            "10.0.0.1?:*",
            "1*:*",
            "*.1:*",
            "*.*:*",
            "10..*:*",
            "010.*:*",
        ] {
            let e = AllowRule::parse(bad).unwrap_err();
            assert!(format!("{e:#}").contains("CIDR"), "{bad}: {e:#}");
        }
        // An IP glob never matches names; `*` alone still is a name glob.
        let p = rules(&["10.0.*.*:*"]);
        assert!(p.resolve("10.0.5.6:80").is_ok());
        assert!(p.resolve("10.1.5.6:80").is_err());
        assert!(p.resolve("10.0.evil.example:80").is_err());
        assert!(rules(&["*:*"]).resolve("anything.example:80").is_ok());
    }

    /// What the agent looks up and dials: a service's configured host and
    /// port (an IPv6 address without brackets), or a raw target's.
    #[test]
    fn resolved_targets_name_the_host_to_look_up() {
        let mut services = BTreeMap::new();
        services.insert("v6".to_owned(), "[fd00::7]:8080".into());
        let p = TargetPolicy::new(&services, &["*.svc.cluster.local:*".into()]).unwrap();
        assert_eq!(
            p.resolve("v6").unwrap().host_port(),
            Some(("fd00::7", 8080))
        );
        let db = policy().resolve("db").unwrap();
        assert_eq!(
            db.host_port(),
            Some(("postgres.default.svc.cluster.local", 5432))
        );
        let raw = policy()
            .resolve("web.default.svc.cluster.local:80")
            .unwrap();
        assert!(raw.raw.is_some());
        assert_eq!(raw.host_port(), Some(("web.default.svc.cluster.local", 80)));
    }

    #[test]
    fn resolved_addresses_are_checked() {
        let p = rules(&["*.test:*", "10.0.0.0/8:5432"]);
        assert!(check(&p, "db.test:5432", &["10.1.2.3"]).is_ok());
        assert!(check(&p, "db.test:80", &["192.0.2.7", "2001:db8::7"]).is_ok());
        // A name in the glob that resolves into a built-in deny range.
        for (addr, what) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("0.0.0.0", "this-host"),
            ("::", "unspecified"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("100.100.100.200", "metadata"),
            ("fd00:ec2::254", "metadata"),
            ("168.63.129.16", "Azure"),
        ] {
            let Refusal { code, reason } =
                check(&p, "evil.test:80", &["192.0.2.7", addr]).unwrap_err();
            assert_eq!(code, OpenErrorCode::Forbidden);
            assert!(reason.starts_with("evil.test resolves to "), "{reason}");
            assert!(reason.contains(what), "{addr}: {reason}");
        }
        let Refusal { reason, .. } = check(&p, "evil.test:80", &["127.0.0.1"]).unwrap_err();
        assert_eq!(
            reason,
            "evil.test resolves to 127.0.0.1, a loopback address (127.0.0.0/8) that only an \
             explicit rule for it allows (such as 127.0.0.1:80)"
        );
        // Names need a glob; an address rule alone is not enough.
        let p = rules(&["10.0.0.0/8:*"]);
        assert!(p.resolve("db.test:80").is_err());
        // With a glob on another port, the address rules decide.
        let p = rules(&["*.test:80", "10.0.0.0/8:5432"]);
        assert!(check(&p, "db.test:80", &["10.1.2.3"]).is_ok());
        let Refusal { reason, .. } = check(&p, "db.test:5432", &["192.0.2.7"]).unwrap_err();
        assert!(
            reason.contains("is not in this agent's allow list") || reason.contains("no rule"),
            "{reason}"
        );
        let Refusal { code, .. } = check(&p, "db.test:80", &[]).unwrap_err();
        assert_eq!(code, OpenErrorCode::Unreachable);
    }

    #[test]
    fn deny_ranges_need_an_explicit_rule() {
        let p = rules(&[
            "*.test:*",
            "0.0.0.0/0:*",
            "[::]/0:*",
            "127.0.0.0/8:8002",
            "[::1]:8003",
            "169.254.169.254:80",
        ]);
        // Broad networks do not open the deny ranges...
        assert!(check(&p, "x.test:8003", &["127.0.0.1"]).is_err());
        assert!(check(&p, "x.test:81", &["169.254.169.254"]).is_err());
        assert!(check(&p, "x.test:80", &["169.254.169.253"]).is_err());
        assert!(p.resolve("127.0.0.1:8003").is_err());
        assert!(p.resolve("[::ffff:127.0.0.1]:8003").is_err());
        assert!(p.resolve("0.0.0.0:80").is_err());
        assert!(p.resolve("[fe80::1]:80").is_err());
        // ...a rule inside them does, for its ports.
        assert!(check(&p, "x.test:8002", &["127.0.0.1", "127.1.2.3"]).is_ok());
        assert!(check(&p, "x.test:8002", &["::ffff:127.0.0.1"]).is_ok());
        assert!(check(&p, "x.test:8002", &["127.0.0.1", "::1"]).is_err());
        assert!(check(&p, "x.test:8003", &["::1"]).is_ok());
        assert!(check(&p, "x.test:80", &["169.254.169.254"]).is_ok());
        assert!(p.resolve("127.0.0.1:8002").is_ok());
        assert!(p.resolve("[::1]:8003").is_ok());
        // Everything else is allowed by the broad rules.
        assert!(p.resolve("192.0.2.1:9").is_ok());
        assert!(p.resolve("[2001:db8::1]:9").is_ok());
        let Refusal { code, reason } = rules(&["0.0.0.0/0:*"]).resolve("127.0.0.1:22").unwrap_err();
        assert_eq!(code, OpenErrorCode::Forbidden);
        assert!(
            reason.contains("not in this agent's allow list: 127.0.0.1 is a loopback address"),
            "{reason}"
        );
    }

    #[test]
    fn ipv4_behind_ipv6_is_judged_as_the_ipv4_address() {
        let p = rules(&["*.test:*", "[::]/0:*", "[64:ff9b::a9fe:a9fe]:80"]);
        // NAT64, IPv4-compatible and 6to4 forms of loopback and metadata.
        for ip in [
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fd",
            "::7f00:1",
            "::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
        ] {
            assert!(check(&p, "x.test:80", &[ip]).is_err(), "{ip}");
            assert!(p.resolve(&format!("[{ip}]:80")).is_err(), "{ip}");
        }
        // An explicit rule for the IPv6 form opens it, as for the IPv4 one.
        assert!(check(&p, "x.test:80", &["64:ff9b::a9fe:a9fe"]).is_ok());
        // Other addresses behind NAT64 (a DNS64 cluster's answer for an
        // IPv4-only name) are allowed like any other.
        assert!(check(&p, "x.test:443", &["64:ff9b::c000:201"]).is_ok());
        assert!(check(&p, "x.test:443", &["2002:c000:201::1"]).is_ok());
        // The cloud platforms' IPv6 service addresses.
        for ip in ["fd00:ec2::254", "fd00:ec2::23", "fd20:ce::254"] {
            assert!(check(&p, "x.test:80", &[ip]).is_err(), "{ip}");
        }
        let reason = p.resolve("[64:ff9b::7f00:1]:22").unwrap_err().reason;
        assert!(
            reason.contains("loopback address (64:ff9b::7f00:0/104)"),
            "{reason}"
        );
    }

    #[test]
    fn an_unspecified_address_is_never_dialed() {
        // "Any host on 5432", as some write it, would reach this host.
        let p = rules(&["0.0.0.0:5432", "[::]:80", "0.0.0.0/8:*", "*.test:*"]);
        assert!(p.resolve("0.0.0.0:5432").is_err());
        assert!(p.resolve("[::]:80").is_err());
        assert!(check(&p, "x.test:5432", &["0.0.0.0"]).is_err());
        assert!(check(&p, "x.test:80", &["::"]).is_err());
        let reason = p.resolve("0.0.0.0:5432").unwrap_err().reason;
        assert!(
            reason.contains("connects to this host: never dialed"),
            "{reason}"
        );
    }

    #[test]
    fn localhost_rule_allows_loopback_for_that_name_only() {
        let p = rules(&["localhost:8000-8100", "*.test:*"]);
        assert!(check(&p, "localhost:8080", &["127.0.0.1", "::1"]).is_ok());
        assert!(check(&p, "LOCALHOST:8080", &["127.0.0.1"]).is_ok());
        assert!(check(&p, "localhost:8080", &["169.254.169.254"]).is_err());
        assert!(check(&p, "evil.test:8080", &["127.0.0.1"]).is_err());
        // A wildcard that happens to match `localhost` is not an explicit allow.
        let p = rules(&["local*:*"]);
        assert!(check(&p, "localhost:8080", &["127.0.0.1"]).is_err());
    }
}
