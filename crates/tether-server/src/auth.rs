//! Token checks and client allow-lists.

use anyhow::{bail, Context};
use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{AgentCredential, ClientCredential, ServerConfig};
use crate::jwt::{looks_like_jwt, JwtVerifier};
use crate::policy::{Decision, Policy, Protocol};

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
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("a SHA-256 hash is written in hex digits");
    }
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

/// How a client proved who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum IdentityKind {
    /// A static token (`[[client]]`); `hash` is its SHA-256, so a reload can
    /// tell whether this token is still configured.
    Token {
        /// SHA-256 of the token.
        hash: [u8; 32],
    },
    /// A JWT from the identity provider, valid until `expires` (Unix seconds).
    Jwt {
        /// The token's `exp`.
        expires: u64,
        /// The JWT itself, kept in memory only so that a reload can verify
        /// it again against the new keys (never logged: see `Debug`).
        token: Arc<str>,
    },
}

impl std::fmt::Debug for IdentityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityKind::Token { .. } => f.write_str("Token"),
            IdentityKind::Jwt { expires, .. } => write!(f, "Jwt {{ expires: {expires} }}"),
        }
    }
}

/// A client that presented a valid credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Its name (`[[client]] name`, or the JWT's name claim).
    pub name: String,
    /// Its groups (JWT group claim; empty for token clients).
    pub groups: Vec<String>,
    /// Token or JWT.
    pub kind: IdentityKind,
}

impl ClientIdentity {
    /// The key its limits and stream slots are counted under: a token
    /// client and a JWT subject of the same name are different identities.
    pub fn key(&self) -> String {
        match self.kind {
            IdentityKind::Token { .. } => format!("token:{}", self.name),
            IdentityKind::Jwt { .. } => format!("jwt:{}", self.name),
        }
    }

    /// Seconds until the credential expires (`None`: it does not).
    pub fn expires_in(&self) -> Option<std::time::Duration> {
        match self.kind {
            IdentityKind::Token { .. } => None,
            IdentityKind::Jwt { expires, .. } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Some(std::time::Duration::from_secs(expires.saturating_sub(now)))
            }
        }
    }
}

/// The server's credential tables and policy. Rebuilt as a whole on reload.
#[derive(Debug, Default)]
pub struct Authenticator {
    agents: HashMap<[u8; 32], String>,
    /// Agents that may authenticate with a client certificate naming them.
    mtls_agents: std::collections::HashSet<String>,
    clients: HashMap<[u8; 32], String>,
    policy: Policy,
    jwt: Option<JwtVerifier>,
    /// Configured secrets in clear text (warned about at load).
    pub plaintext_secrets: Vec<String>,
}

impl Authenticator {
    /// Logs one warning per credential configured in clear text (at start
    /// and on every reload).
    pub fn warn_plaintext(&self) {
        for who in &self.plaintext_secrets {
            tracing::warn!("{who}: token in clear text (config file or flag); store token_sha256 instead (tether token hash)");
        }
    }

    /// Builds the tables, rejecting incomplete or duplicate credentials.
    pub fn from_config(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let mut a = Authenticator::default();
        for AgentCredential {
            name,
            token,
            token_sha256,
            mtls,
        } in &cfg.agents
        {
            validate_name(name)?;
            if token.is_some() {
                a.plaintext_secrets.push(format!("agent {name}"));
            }
            if *mtls {
                a.mtls_agents.insert(name.clone());
                if token.is_none() && token_sha256.is_none() {
                    continue;
                }
            }
            let h = credential_hash(&format!("agent {name}"), token, token_sha256)?;
            if a.agents.insert(h, name.clone()).is_some() {
                bail!("agent {name}: the same token is configured twice");
            }
        }
        let mut allows = vec![];
        let mut names = std::collections::HashSet::new();
        for ClientCredential {
            name,
            token,
            token_sha256,
            allow,
        } in &cfg.clients
        {
            if token.is_some() {
                a.plaintext_secrets.push(format!("client {name}"));
            }
            let h = credential_hash(&format!("client {name}"), token, token_sha256)?;
            if a.clients.insert(h, name.clone()).is_some() {
                bail!("client {name}: the same token is configured twice");
            }
            // The same name may appear twice with two tokens (rotation);
            // both entries' allow lists apply to it.
            names.insert(name.clone());
            allows.push((name.clone(), allow.clone()));
        }
        a.policy = Policy::new(&cfg.rules, &allows)?;
        if let Some(j) = &cfg.jwt {
            a.jwt = Some(JwtVerifier::new(j)?);
        }
        Ok(a)
    }

    /// The agent name this token belongs to.
    pub fn agent(&self, token: &str) -> Option<&str> {
        self.agents.get(&token_hash(token)).map(String::as_str)
    }

    /// The agent a verified client certificate names (one of its DNS
    /// names is an agent configured with `mtls = true`).
    pub fn agent_by_cert<'a>(
        &self,
        dns_names: impl IntoIterator<Item = &'a str>,
    ) -> Option<String> {
        dns_names
            .into_iter()
            .find(|n| self.mtls_agents.contains(*n))
            .map(str::to_owned)
    }

    /// Whether an agent session that authenticated as `name` (by token hash
    /// `hash`, or by certificate when `None`) is still allowed in.
    pub fn agent_still_valid(&self, name: &str, hash: Option<&[u8; 32]>) -> bool {
        match hash {
            Some(h) => self.agents.get(h).is_some_and(|n| n == name),
            None => self.mtls_agents.contains(name),
        }
    }

    /// The client a bearer credential (static token or JWT) belongs to; the
    /// error is for the log and never contains the credential.
    pub fn client(&self, credential: &str) -> Result<ClientIdentity, String> {
        if let Some(name) = self.clients.get(&token_hash(credential)) {
            return Ok(ClientIdentity {
                name: name.clone(),
                groups: vec![],
                kind: IdentityKind::Token {
                    hash: token_hash(credential),
                },
            });
        }
        match &self.jwt {
            Some(j) if looks_like_jwt(credential) => j.verify(credential),
            _ => Err("unknown token".into()),
        }
    }

    /// Whether a live identity still holds after a reload: like
    /// [`Authenticator::client_still_valid`], and a JWT must verify against
    /// the current keys (a removed signing key ends its sessions).
    pub fn client_revalidate(&self, id: &ClientIdentity) -> bool {
        match &id.kind {
            IdentityKind::Jwt { token, .. } => self
                .jwt
                .as_ref()
                .is_some_and(|j| j.verify(token).is_ok_and(|v| v.name == id.name)),
            IdentityKind::Token { .. } => self.client_still_valid(id),
        }
    }

    /// Whether a live identity still holds (cheap, per request): its token is
    /// still configured under its name, or its JWT has not expired (and JWTs
    /// are still accepted).
    pub fn client_still_valid(&self, id: &ClientIdentity) -> bool {
        match &id.kind {
            IdentityKind::Token { hash } => self.clients.get(hash).is_some_and(|n| *n == id.name),
            IdentityKind::Jwt { .. } => {
                self.jwt.is_some() && id.expires_in().is_some_and(|d| !d.is_zero())
            }
        }
    }

    /// Decides one open.
    pub fn decide(
        &self,
        id: &ClientIdentity,
        agent: &str,
        service: &str,
        proto: Protocol,
    ) -> Decision {
        self.policy.decide(id, agent, service, proto)
    }

    /// Whether the console shows `agent` to `id`.
    pub fn may_see_agent(&self, id: &ClientIdentity, agent: &str) -> bool {
        self.policy.may_see_agent(id, agent)
    }

    /// Names of every configured agent, sorted.
    pub fn agent_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .agents
            .values()
            .chain(self.mtls_agents.iter())
            .cloned()
            .collect();
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
        let may = |agent: &str, svc: &str| a.decide(&alice, agent, svc, Protocol::Tcp).allowed;
        assert!(may("prod", "db"));
        assert!(!may("prod", "redis"));
        assert!(may("staging", "anything"));
        assert!(a.client("agent-secret").is_err());
        assert!(a.client_still_valid(&alice));
        assert_eq!(a.plaintext_secrets, vec!["agent prod".to_owned()]);
    }

    #[test]
    fn bad_hashes_are_errors_not_panics() {
        assert!(parse_hex32(&"é".repeat(32)).is_err());
        assert!(parse_hex32("zz").is_err());
        assert!(parse_hex32(&"a".repeat(64)).is_ok());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
