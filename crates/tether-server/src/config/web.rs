//! `[http]`: browser access (host routing, login cookies, who may vouch for
//! a client's address, the server's public name).

use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;
use std::time::Duration;

/// Default lifetime of a browser login.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The longest a browser login may be set to last: 400 days, the longest a
/// browser keeps a cookie (RFC 6265bis; Chrome caps `Max-Age` there), so a
/// longer setting could only be a mistake.
pub(crate) const MAX_SESSION_TTL: Duration = Duration::from_secs(400 * 24 * 3600);

/// Browser access settings (`[http]` in the server config).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Base domain for host routing: `SERVICE.AGENT.BASE_DOMAIN` (needs a
    /// wildcard DNS record and certificate). Path routing works without it.
    #[serde(default)]
    pub base_domain: Option<String>,
    /// Lifetime of a browser login, in seconds (default 12 hours).
    #[serde(default = "default_ttl")]
    pub session_ttl_secs: u64,
    /// Mark cookies `Secure`. Default: when the server itself serves TLS;
    /// set `true` behind a TLS-terminating load balancer.
    #[serde(default)]
    pub secure_cookies: Option<bool>,
    /// Networks of load balancers whose `X-Forwarded-For` the server
    /// believes (CIDRs). Default: none, and the TCP peer is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// The name (`host[:port]`) browsers use to reach the server itself.
    /// Path-routed services get it as `Host` / `X-Forwarded-Host` instead of
    /// whatever the client sent, and its port goes with host-routed names.
    /// Default: the base domain, with the port the browser used.
    #[serde(default)]
    pub public_name: Option<String>,
    /// Serve services at `/a/AGENT/SERVICE/` on the server's own name
    /// (default true). Such a page shares the origin of the console and the
    /// admin API, so it can read them, and every other service, with the
    /// user's login (docs/SECURITY.md). With a base domain, `false` leaves
    /// each service on its own host only.
    #[serde(default = "yes")]
    pub path_routing: bool,
}

fn yes() -> bool {
    true
}

fn default_ttl() -> u64 {
    SESSION_TTL.as_secs()
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            base_domain: None,
            session_ttl_secs: default_ttl(),
            secure_cookies: None,
            trusted_proxies: vec![],
            public_name: None,
            path_routing: true,
        }
    }
}

/// Whether `d` is a DNS name: dot-separated labels of letters, digits and `-`.
fn is_dns_name(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Whether `a` is `host[:port]` with a DNS name, an IPv4 address or a
/// bracketed IPv6 address, and a port from 1 to 65535.
fn is_authority(a: &str) -> bool {
    let (host, port) = split_port(a);
    let port_ok = port.is_empty() || port[1..].parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || is_dns_name(host),
    };
    port_ok && host_ok
}

/// Splits `host[:port]` (IPv6 in brackets) into host and the `:port` suffix.
pub fn split_port(host: &str) -> (&str, &str) {
    match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            (&host[..i], &host[i..])
        }
        _ => (host, ""),
    }
}

impl WebConfig {
    /// Checks the base domain, the public name and the login lifetime.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.session_ttl_secs > MAX_SESSION_TTL.as_secs() {
            anyhow::bail!(
                "[http] session_ttl_secs = {} is longer than a browser keeps a cookie ({} s, 400 days)",
                self.session_ttl_secs,
                MAX_SESSION_TTL.as_secs()
            );
        }
        if let Some(d) = &self.base_domain {
            if !is_dns_name(d) {
                anyhow::bail!("[http] base_domain {d:?} is not a DNS name");
            }
        } else if !self.path_routing {
            anyhow::bail!(
                "[http] path_routing = false needs a base_domain: browsers would reach no service"
            );
        }
        if let Some(n) = &self.public_name {
            if !is_authority(n) {
                anyhow::bail!(
                    "[http] public_name {n:?}: expected HOST or HOST:PORT (a DNS name or an IP address)"
                );
            }
        }
        Ok(())
    }

    /// The base domain, lowercase.
    pub fn base(&self) -> Option<String> {
        self.base_domain.as_ref().map(|d| d.to_ascii_lowercase())
    }

    /// The public name, lowercase.
    pub fn public(&self) -> Option<String> {
        self.public_name.as_ref().map(|d| d.to_ascii_lowercase())
    }

    /// Whether the server believes `X-Forwarded-For` from `ip`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_split() {
        assert_eq!(split_port("a.b:8443"), ("a.b", ":8443"));
        assert_eq!(split_port("a.b"), ("a.b", ""));
        assert_eq!(split_port("[::1]:80"), ("[::1]", ":80"));
        assert_eq!(split_port("[::1]"), ("[::1]", ""));
    }

    #[test]
    fn base_domain_checked() {
        let mut c = WebConfig {
            base_domain: Some("tether.example.com".into()),
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        c.base_domain = Some("*.example.com".into());
        assert!(c.validate().is_err());
    }

    #[test]
    fn path_routing_is_turned_off_only_beside_host_routing() {
        let mut c: WebConfig = toml::from_str("path_routing = false").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("path_routing") && e.contains("base_domain"),
            "{e}"
        );
        c.base_domain = Some("tether.example.com".into());
        assert!(c.validate().is_ok());
        assert!(WebConfig::default().path_routing);
        assert!(toml::from_str::<WebConfig>("").unwrap().path_routing);
    }

    #[test]
    fn a_login_lifetime_beyond_a_cookies_is_refused() {
        let ttl = |secs| {
            WebConfig {
                session_ttl_secs: secs,
                ..Default::default()
            }
            .validate()
        };
        assert!(ttl(MAX_SESSION_TTL.as_secs()).is_ok());
        let e = ttl(u64::MAX).unwrap_err().to_string();
        assert!(
            e.contains("session_ttl_secs") && e.contains("400 days"),
            "{e}"
        );
    }

    #[test]
    fn public_name_checked() {
        let ok = |n: &str| {
            WebConfig {
                public_name: Some(n.into()),
                ..Default::default()
            }
            .validate()
            .is_ok()
        };
        for good in [
            "tether.example.com",
            "tether.example.com:8443",
            "192.0.2.1:80",
            "[2001:db8::1]:443",
            "[::1]",
        ] {
            assert!(ok(good), "{good}");
        }
        for bad in [
            "",
            "https://t.example",
            "t.example/x",
            "t.example:0",
            "t.example:99999",
            "a@b",
            "[::1",
            "t example",
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }

    #[test]
    fn trusted_proxies_parse_from_toml() {
        #[derive(Deserialize)]
        struct T {
            http: WebConfig,
        }
        let t: T =
            toml::from_str("[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"fd00::/8\"]\n").unwrap();
        assert!(t.http.trusts("10.1.2.3".parse().unwrap()));
        assert!(
            t.http.trusts("::ffff:10.1.2.3".parse().unwrap()),
            "IPv4-mapped"
        );
        assert!(t.http.trusts("fd00::1".parse().unwrap()));
        assert!(!t.http.trusts("192.0.2.1".parse().unwrap()));
        assert!(toml::from_str::<T>("[http]\ntrusted_proxies = [\"not-a-net\"]\n").is_err());
        assert!(
            WebConfig::default().trusted_proxies.is_empty(),
            "trust nobody by default"
        );
    }
}
