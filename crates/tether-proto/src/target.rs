//! The target grammar: what a client names when it opens a stream.
//!
//! A client asks the server for `AGENT/SERVICE`. `SERVICE` is either a
//! *named service* the agent offers (`db`, `grafana`) or a *raw target*
//! `HOST:PORT` the agent may allow. Raw targets have exactly one spelling
//! here, so that a policy rule about a target cannot be side-stepped by
//! naming the same place another way (`:08002`, `:+8002`, `127.1`,
//! `0x7f.0.0.1`, `[::ffff:127.0.0.1]`):
//!
//! * the port is decimal, 1-65535, without sign or leading zero;
//! * an IPv4 address is four decimal octets without leading zeros; any
//!   other all-numeric or hexadecimal spelling of an address is refused;
//! * an IPv6 address is in one pair of brackets and is rewritten to its
//!   canonical text (`[0:0::1]` becomes `[::1]`); an IPv4-mapped address
//!   becomes the IPv4 address;
//! * a host name is lowercased; it holds letters, digits, `-` and `_` in
//!   dot-separated labels, has no trailing dot and at most 253 characters.
//!
//! [`ClientTarget::parse`] does this once, before any policy runs, and the
//! server's policy writes its raw rule targets the same way. The agent
//! parses what it is asked for with its own allow-list grammar and checks
//! every address a name resolves to (`tether-agent/src/policy.rs`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest host name accepted (the DNS limit, without a trailing dot).
const MAX_HOST_LEN: usize = 253;

/// Why a target was refused (for the requester, as the OPEN_ERR reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError(String);

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TargetError {}

/// A refusal, clipped to what a frame carries: the target is echoed
/// escaped, and 1 KiB of control characters would escape to 5.
fn refuse<T>(why: impl Into<String>) -> Result<T, TargetError> {
    let mut why = why.into();
    why.truncate(crate::frame::clip_reason(&why).len());
    Err(TargetError(why))
}

/// The host part of a raw target, in its one spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP address (IPv4-mapped IPv6 stored as IPv4).
    Ip(IpAddr),
    /// A lowercased DNS name.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// `HOST:PORT`, canonical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawTarget {
    /// Where to connect.
    pub host: Host,
    /// Which port.
    pub port: u16,
}

impl fmt::Display for RawTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl RawTarget {
    /// Parses `HOST:PORT` strictly (see the module docs).
    pub fn parse(s: &str) -> Result<RawTarget, TargetError> {
        let Some((host, port)) = s.rsplit_once(':') else {
            return refuse(format!("{s:?} is not HOST:PORT"));
        };
        let port = parse_port(port).ok_or_else(|| {
            TargetError(format!(
                "{s:?}: the port must be 1-65535, written in plain decimal"
            ))
        })?;
        let host = parse_host(host).map_err(|e| TargetError(format!("{s:?}: {e}")))?;
        Ok(RawTarget { host, port })
    }

    /// Whether `s` is already in canonical form.
    pub fn is_canonical(s: &str) -> bool {
        RawTarget::parse(s).is_ok_and(|t| t.to_string() == s)
    }
}

/// What a client asks for, after parsing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Service {
    /// A service the agent names (`db`).
    Named(String),
    /// A raw `HOST:PORT` the agent may allow.
    Raw(RawTarget),
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Service::Named(n) => f.write_str(n),
            Service::Raw(r) => r.fmt(f),
        }
    }
}

/// `AGENT/SERVICE`, parsed; its `Display` is the canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientTarget {
    /// The agent's name.
    pub agent: String,
    /// The service on it.
    pub service: Service,
}

impl fmt::Display for ClientTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.agent, self.service)
    }
}

impl ClientTarget {
    /// Parses `AGENT/SERVICE`. A service with a `:` is a raw target and must
    /// be canonical-able `HOST:PORT`; anything else is a service name.
    pub fn parse(s: &str) -> Result<ClientTarget, TargetError> {
        let Some((agent, service)) = s.split_once('/') else {
            return refuse(format!("target {s:?} is not AGENT/SERVICE"));
        };
        if agent.is_empty() || service.is_empty() {
            return refuse(format!("target {s:?} is not AGENT/SERVICE"));
        }
        if agent.chars().any(char::is_control) {
            return refuse(format!(
                "target {s:?}: an agent name has no control characters"
            ));
        }
        let service = if service.contains(':') {
            Service::Raw(RawTarget::parse(service)?)
        } else if service.contains('/') || service.chars().any(char::is_control) {
            return refuse(format!(
                "target {s:?}: a service name has no '/' or control characters"
            ));
        } else {
            Service::Named(service.to_owned())
        };
        Ok(ClientTarget {
            agent: agent.to_owned(),
            service,
        })
    }
}

/// A decimal port: 1-65535, digits only, no sign, no leading zero.
pub fn parse_port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || s.starts_with('0') {
        return None;
    }
    s.parse().ok().filter(|&p| p != 0)
}

fn parse_host(host: &str) -> Result<Host, String> {
    if let Some(inner) = host.strip_prefix('[') {
        let Some(v6) = inner.strip_suffix(']') else {
            return Err("an IPv6 address goes in one pair of brackets".into());
        };
        let v6: Ipv6Addr = v6
            .parse()
            .map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
        return Ok(Host::Ip(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }));
    }
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if looks_numeric(host) {
        return match strict_ipv4(host) {
            Some(v4) => Ok(Host::Ip(IpAddr::V4(v4))),
            None => Err(format!(
                "{host:?} is not an IPv4 address in dotted decimal (four octets, no leading zeros)"
            )),
        };
    }
    if host.contains(':') {
        return Err("an IPv6 address goes in brackets: [ADDRESS]:PORT".into());
    }
    if host.ends_with('.') {
        return Err("write the host name without a trailing dot".into());
    }
    if host.len() > MAX_HOST_LEN {
        return Err("the host name is longer than 253 characters".into());
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !host.split('.').all(valid_label) {
        return Err(format!(
            "{host:?} is not a host name (letters, digits, '-' and '_' in dot-separated labels)"
        ));
    }
    Ok(Host::Name(host.to_ascii_lowercase()))
}

/// Whether every label is a number (decimal, or `0x` hex): such a name is
/// how resolvers spell addresses (`127.1`, `0x7f000001`, `2130706433`).
fn looks_numeric(host: &str) -> bool {
    host.trim_end_matches('.').split('.').all(|l| {
        let hex = l
            .strip_prefix("0x")
            .or_else(|| l.strip_prefix("0X"))
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        hex || (!l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Four decimal octets 0-255 without leading zeros.
fn strict_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_echoes_at_most_a_frame_reason() {
        let control = format!("prod/{}", "\u{1}".repeat(1000));
        let e = ClientTarget::parse(&control).unwrap_err().to_string();
        assert!(e.len() <= crate::frame::MAX_REASON_LEN, "{} bytes", e.len());
        assert!(e.starts_with("target \"prod/\\u{1}"), "{e}");
    }

    fn canon(s: &str) -> Result<String, TargetError> {
        ClientTarget::parse(s).map(|t| t.to_string())
    }

    #[test]
    fn one_spelling_per_raw_target() {
        assert_eq!(canon("a/127.0.0.2:8002").unwrap(), "a/127.0.0.2:8002");
        assert_eq!(
            canon("a/DB.Example.COM:5432").unwrap(),
            "a/db.example.com:5432"
        );
        assert_eq!(canon("a/[0:0::1]:80").unwrap(), "a/[::1]:80");
        assert_eq!(
            canon("a/[::ffff:127.0.0.2]:8002").unwrap(),
            "a/127.0.0.2:8002"
        );
        assert_eq!(canon("a/db").unwrap(), "a/db");
        for other in [
            "a/127.0.0.2:08002",
            "a/127.0.0.2:+8002",
            "a/127.0.0.2:0008002",
            "a/127.0.0.2:0",
            "a/127.0.0.2:65536",
            "a/127.0.0.2: 8002",
            "a/127.1:8002",
            "a/0x7f.0.0.2:8002",
            "a/0x7f000002:8002",
            "a/2130706434:8002",
            "a/127.000.0.2:8002",
            "a/127.0.0.02:8002",
            "a/[[127.0.0.2]]:8002",
            "a/[::1:80",
            "a/::1:80",
            "a/db.example.:80",
            "a/db..example:80",
            "a/db example:80",
            "a/:80",
            "/db",
            "a/",
            "a",
            "a\nb/db",
            "a/d\u{1b}b",
        ] {
            assert!(canon(other).is_err(), "{other:?} was accepted");
        }
    }

    #[test]
    fn canonical_text_parses_to_itself() {
        for s in ["a/[2001:db8::1]:443", "a/x_y-z.svc:1", "a/10.0.0.1:65535"] {
            let once = canon(s).unwrap();
            assert_eq!(canon(&once).unwrap(), once);
            let raw = once.split_once('/').unwrap().1;
            assert!(RawTarget::is_canonical(raw));
        }
        assert!(!RawTarget::is_canonical("[0::1]:80"));
    }
}
