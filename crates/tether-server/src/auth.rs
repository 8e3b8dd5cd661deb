//! Token checks and client allow-lists.

use anyhow::{bail, Context};
use std::collections::HashMap;
use tether_net::pattern::glob_match;

use crate::config::{AgentCredential, ClientCredential, ServerConfig};

/// SHA-256 of a token, as 32 bytes. Tokens are compared by hash so that the
/// comparison time says nothing about the token, and configs can hold hashes.
pub fn token_hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// [`token_hash`] as lowercase hex, as `token_sha256` in the config wants it.
pub fn token_hash_hex(token: &str) -> String {
    token_hash(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hex32(s: &str) -> anyhow::Result<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        bail!("a SHA-256 hash has 64 hex digits, got {}", s.len());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("not hex")?;
    }
    Ok(out)
}

fn credential_hash(
    who: &str,
    token: &Option<String>,
    hash: &Option<String>,
) -> anyhow::Result<[u8; 32]> {
    match (token, hash) {
        (Some(t), None) if !t.is_empty() => Ok(token_hash(t)),
        (None, Some(h)) => parse_hex32(h).with_context(|| format!("{who}: token_sha256")),
        _ => bail!("{who}: set exactly one of token / token_sha256"),
    }
}

/// A client that presented a valid token.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// Its configured name.
    pub name: String,
    allow: Vec<String>,
}

impl ClientIdentity {
    /// Whether this client may open `agent/service`.
    pub fn may_open(&self, agent: &str, service: &str) -> bool {
        let target = format!("{agent}/{service}");
        self.allow.iter().any(|p| glob_match(p, &target))
    }

    /// Whether any allow rule can reach something on `agent` (the console
    /// lists only those agents).
    pub fn may_see_agent(&self, agent: &str) -> bool {
        self.allow.iter().any(|p| {
            let agent_part = p.split_once('/').map_or(p.as_str(), |(a, _)| a);
            glob_match(agent_part, agent)
        })
    }
}

/// The server's credential tables.
#[derive(Debug, Default)]
pub struct Authenticator {
    agents: HashMap<[u8; 32], String>,
    clients: HashMap<[u8; 32], ClientIdentity>,
    clients_by_name: HashMap<String, ClientIdentity>,
}

impl Authenticator {
    /// Builds the tables, rejecting incomplete or duplicate credentials.
    pub fn from_config(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let mut a = Authenticator::default();
        for AgentCredential {
            name,
            token,
            token_sha256,
        } in &cfg.agents
        {
            validate_name(name)?;
            let h = credential_hash(&format!("agent {name}"), token, token_sha256)?;
            if a.agents.insert(h, name.clone()).is_some() {
                bail!("agent {name}: the same token is configured twice");
            }
        }
        for ClientCredential {
            name,
            token,
            token_sha256,
            allow,
        } in &cfg.clients
        {
            let h = credential_hash(&format!("client {name}"), token, token_sha256)?;
            let id = ClientIdentity {
                name: name.clone(),
                allow: allow.clone(),
            };
            if a.clients.insert(h, id.clone()).is_some() {
                bail!("client {name}: the same token is configured twice");
            }
            if a.clients_by_name.insert(name.clone(), id).is_some() {
                bail!("client {name}: the name is configured twice");
            }
        }
        Ok(a)
    }

    /// The agent name this token belongs to.
    pub fn agent(&self, token: &str) -> Option<&str> {
        self.agents.get(&token_hash(token)).map(String::as_str)
    }

    /// The client this token belongs to.
    pub fn client(&self, token: &str) -> Option<&ClientIdentity> {
        self.clients.get(&token_hash(token))
    }

    /// A client by its configured name (browser sessions remember the name).
    pub fn client_by_name(&self, name: &str) -> Option<&ClientIdentity> {
        self.clients_by_name.get(name)
    }

    /// Names of every configured agent, sorted.
    pub fn agent_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.agents.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Agent names are path and label safe: letters, digits, `-`, `_`, `.`.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("invalid agent name {name:?}: use 1-63 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_allow_lists() {
        let cfg: ServerConfig = toml::from_str(&format!(
            r#"
            [[agent]]
            name = "prod"
            token = "agent-secret"
            [[client]]
            name = "alice"
            token_sha256 = "{}"
            allow = ["prod/db", "staging/*"]
            "#,
            hex(&token_hash("alice-secret"))
        ))
        .unwrap();
        let a = Authenticator::from_config(&cfg).unwrap();
        assert_eq!(a.agent("agent-secret"), Some("prod"));
        assert_eq!(a.agent("nope"), None);
        let alice = a.client("alice-secret").unwrap();
        assert!(alice.may_open("prod", "db"));
        assert!(!alice.may_open("prod", "redis"));
        assert!(alice.may_open("staging", "anything"));
        assert!(a.client("agent-secret").is_none());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
