//! `[[rule]]`: who may open what, over which protocol. Compiled by
//! [`crate::policy::Policy`].

use serde::Deserialize;

/// The protocol an open asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A TCP stream (CLI forwards, SOCKS/HTTP CONNECT, raw WebSocket, listeners).
    Tcp,
    /// A UDP flow.
    Udp,
    /// A browser or API request through the HTTP proxy.
    Http,
}

impl Protocol {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Http => "http",
        }
    }
}

/// A `[[rule]]` as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Identities: names (globs), `group:NAME`, `*`.
    pub who: Vec<String>,
    /// `AGENT/SERVICE` globs this rule allows.
    #[serde(default)]
    pub allow: Vec<String>,
    /// `AGENT/SERVICE` globs this rule denies (deny wins over any allow).
    #[serde(default)]
    pub deny: Vec<String>,
    /// Protocols the rule applies to (default: all).
    #[serde(default)]
    pub protocols: Vec<Protocol>,
}
