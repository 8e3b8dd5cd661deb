//! Server configuration: the TOML file, the `TETHER_*` environment and the
//! flags all end up in a [`ServerConfig`].
//!
//! Config types are leaves: they import nothing of the server's runtime
//! modules, so loading and checking a configuration never needs a running
//! server (and the runtime modules can all depend on them without cycles).
//! One file per section: `[limits]` ([`LimitsConfig`]), `[http]`
//! ([`WebConfig`]), `[[listener]]` ([`ListenerConfig`]), `[[rule]]`
//! ([`RuleConfig`]), `[jwt]` ([`JwtConfig`]), `[cluster]`
//! ([`ClusterConfig`]); the top level, `[tls]` and the
//! credentials are here.

mod cluster;
mod jwt;
mod limits;
mod listener;
mod rules;
mod web;

pub use cluster::{ClusterConfig, StaticPeer};
pub use jwt::JwtConfig;
pub use limits::LimitsConfig;
pub use listener::ListenerConfig;
pub use rules::{Protocol, RuleConfig};
pub use web::{split_port, WebConfig};

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default for the most streams one client (identity, over all its
/// sessions) may have open or opening at once (`max_streams_per_client`).
/// Enough for a team's real use (a browser-heavy page, a connection pool,
/// 1000 connections through one CLI forward) and a quarter of an agent's own
/// limit (8192), so a client that floods opens cannot take every stream of
/// an agent from the others.
pub const MAX_STREAMS_PER_CLIENT: usize = 2048;

/// The most `max_streams_per_client` may be set to: a million streams
/// (each session's queue of incoming opens is sized by it, and the runtime
/// refuses a queue much larger than that: a bigger setting would make
/// every client session fail at its start).
pub const MAX_STREAMS_PER_CLIENT_CEILING: usize = 1 << 20;

/// Everything the server needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on for agents, clients and HTTP.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TLS settings; plain WebSocket when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Agents allowed to register.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentCredential>,
    /// Clients allowed to connect, each with its allow-list.
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientCredential>,
    /// Heartbeat settings.
    #[serde(default)]
    pub session: tether_net::tuning::SessionTuning,
    /// Most streams one client (identity, over all its sessions and the raw
    /// WebSocket endpoint) may have at once (default 2048).
    #[serde(default = "default_max_streams_per_client")]
    pub max_streams_per_client: usize,
    /// Public TCP ports bound to `agent/service`.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Browser access: host routing, login cookies.
    #[serde(default)]
    pub http: WebConfig,
    /// Access rules beyond each client's own `allow` list.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Identities that may use the admin API (`/api/v1/...`, `tether
    /// status`): names and `group:NAME`s, globs, as in a rule's `who`.
    #[serde(default)]
    pub admins: Vec<String>,
    /// JWT client identities.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Limits per identity and overall.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Serve `/metrics` on this (private) address instead of the public port.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Replicas, peers and the drain at shutdown.
    #[serde(default)]
    pub cluster: ClusterConfig,
}

fn default_max_streams_per_client() -> usize {
    MAX_STREAMS_PER_CLIENT
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7700))
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls: None,
            agents: vec![],
            clients: vec![],
            session: Default::default(),
            listeners: vec![],
            max_streams_per_client: MAX_STREAMS_PER_CLIENT,
            http: Default::default(),
            rules: vec![],
            admins: vec![],
            jwt: None,
            limits: Default::default(),
            metrics_listen: None,
            cluster: Default::default(),
        }
    }
}

impl ServerConfig {
    /// Checks every part of the config that needs no file and no other
    /// module: listeners (and that no two of them, or one and `listen`,
    /// want the same port), `[http]`, `[limits]`, `[cluster]`, `[session]`,
    /// the stream cap, and that `mtls` agents have a CA to be checked
    /// against. Credentials and rules are checked where they are built
    /// (`Authenticator::from_config`). Startup and every reload run both,
    /// so a reload never applies what a restart would refuse.
    pub fn validate(&self) -> anyhow::Result<()> {
        for l in &self.listeners {
            l.validate()?;
        }
        listener::no_overlaps(self.listen, self.metrics_listen, &self.listeners)?;
        self.http.validate()?;
        self.limits.validate()?;
        if self.max_streams_per_client == 0 {
            anyhow::bail!(
                "max_streams_per_client = 0 would refuse every stream (there is no \"unlimited\"; the default is {MAX_STREAMS_PER_CLIENT})"
            );
        }
        if self.max_streams_per_client > MAX_STREAMS_PER_CLIENT_CEILING {
            anyhow::bail!(
                "max_streams_per_client = {} is over {} (a million streams per client)",
                self.max_streams_per_client,
                MAX_STREAMS_PER_CLIENT_CEILING
            );
        }
        // A certificate-only agent with no CA to check it against could
        // never sign in (one with a token still can, by its token).
        if let Some(a) = self
            .agents
            .iter()
            .find(|a| a.mtls && a.token.is_none() && a.token_sha256.is_none())
        {
            if self
                .tls
                .as_ref()
                .and_then(|t| t.client_ca.as_ref())
                .is_none()
            {
                anyhow::bail!(
                    "agent {}: mtls = true needs [tls] client_ca (the CA its certificate is checked against)",
                    a.name
                );
            }
        }
        self.cluster.validate()?;
        self.session.validate()?;
        Ok(())
    }

    /// The settings in which `new` differs from this (running) config and
    /// that only a restart applies, by the name an operator edits: a
    /// reload warns of them instead of saying "reloaded" as if it had
    /// applied them.
    pub(crate) fn restart_only_changes(&self, new: &ServerConfig) -> Vec<&'static str> {
        // Turning TLS on or off, or to a fresh self-signed certificate
        // (whose new fingerprint would break every pin); a file-based
        // certificate and client CA do reload.
        let tls_restart = match (&self.tls, &new.tls) {
            (None, None) => false,
            (Some(old), Some(new)) => {
                // A self-signed certificate is kept whole, its client CA
                // with it.
                new.self_signed
                    && (!old.self_signed
                        || old.names != new.names
                        || old.client_ca != new.client_ca)
            }
            _ => true,
        };
        [
            ("listen", self.listen != new.listen),
            ("[tls] (on/off, self_signed)", tls_restart),
            ("[session]", self.session != new.session),
            (
                "max_streams_per_client",
                self.max_streams_per_client != new.max_streams_per_client,
            ),
            ("[[listener]]", self.listeners != new.listeners),
            ("[http]", self.http != new.http),
            ("metrics_listen", self.metrics_listen != new.metrics_listen),
            ("[cluster]", self.cluster != new.cluster),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }
}

/// Where the server's certificate comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first).
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Generate a self-signed certificate at start (its fingerprint is printed).
    #[serde(default)]
    pub self_signed: bool,
    /// Names for the self-signed certificate.
    #[serde(default = "default_names")]
    pub names: Vec<String>,
    /// PEM CA file for client certificates (agents with `mtls = true`).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

fn default_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

/// One agent that may register: by token (exactly one of `token` /
/// `token_sha256`), by client certificate (`mtls = true`), or both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCredential {
    /// The agent's name (what clients address it by).
    pub name: String,
    /// Its token in clear text (prefer `token_sha256`).
    pub token: Option<String>,
    /// Hex SHA-256 of its token.
    pub token_sha256: Option<String>,
    /// Accept a client certificate from `[tls] client_ca` whose DNS name is
    /// this agent's name.
    #[serde(default)]
    pub mtls: bool,
}

/// One client identity. Exactly one of `token` / `token_sha256`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredential {
    /// The client's name (for logs and metrics).
    pub name: String,
    /// Its token in clear text (prefer `token_sha256`).
    pub token: Option<String>,
    /// Hex SHA-256 of its token.
    pub token_sha256: Option<String>,
    /// `agent/service` glob patterns it may open. Empty: nothing (deny by default).
    #[serde(default)]
    pub allow: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server config shipped in deploy/kubernetes/server.yaml is valid.
    #[test]
    fn the_kubernetes_server_config_parses() {
        let yaml = include_str!("../../../../deploy/kubernetes/server.yaml");
        let block: String = yaml
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("server.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let c: ServerConfig = toml::from_str(&block).unwrap();
        c.cluster.validate().unwrap();
        assert_eq!(c.listen, "0.0.0.0:7700".parse().unwrap());
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(c.agents.len(), 1);
        assert_eq!(c.clients.len(), 1);
        // The Deployment's grace period (60 s) covers the delay and the drain.
        assert_eq!(
            (c.cluster.shutdown_delay_ms, c.cluster.drain_timeout_ms),
            (10_000, 30_000)
        );
        // Token hashes and allow patterns load as the server loads them.
        crate::auth::Authenticator::from_config(&c).unwrap();
    }

    /// What a reload cannot apply is named; what it can (credentials,
    /// rules, limits, a certificate file) is not.
    #[test]
    fn restart_only_changes_name_what_a_reload_leaves() {
        let load = |text: &str| toml::from_str::<ServerConfig>(text).unwrap();
        let running =
            load("[[agent]]\nname = \"a\"\ntoken = \"t\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n");
        let same_but_reloadable = load(
            "[[agent]]\nname = \"b\"\ntoken = \"u\"\n[limits]\nmax_sessions = 5\n\
             [tls]\ncert = \"c2\"\nkey = \"k2\"\nclient_ca = \"ca\"\n",
        );
        assert!(running
            .restart_only_changes(&same_but_reloadable)
            .is_empty());
        let moved = load(
            "listen = \"127.0.0.1:1\"\nmetrics_listen = \"127.0.0.1:2\"\n\
             [session]\nheartbeat_ms = 5000\n[cluster]\nagent_wait_ms = 1\n",
        );
        assert_eq!(
            running.restart_only_changes(&moved),
            [
                "listen",
                "[tls] (on/off, self_signed)",
                "[session]",
                "metrics_listen",
                "[cluster]"
            ]
        );
        // A file certificate may replace a self-signed one, not the reverse.
        let self_signed = load("[tls]\nself_signed = true\n");
        assert!(self_signed.restart_only_changes(&running).is_empty());
        assert_eq!(
            running.restart_only_changes(&self_signed),
            ["[tls] (on/off, self_signed)"]
        );
    }

    /// Settings that would make every client session panic at its start,
    /// lift a rate limit without a word (NaN, infinity), refuse everything
    /// (a negative rate) or overflow the JWT library's clock arithmetic
    /// stop the server at load, naming the setting.
    #[test]
    fn settings_that_break_a_limit_are_refused_at_load() {
        let check = |text: &str| {
            let c: ServerConfig = toml::from_str(text).unwrap();
            crate::server::Server::check(&c)
                .err()
                .map(|e| format!("{e:#}"))
        };
        assert_eq!(check(""), None);
        assert_eq!(check("[limits]\nopens_per_sec = 0.0\n"), None);
        // mTLS beside a token needs no CA (TLS may end at a proxy); a
        // certificate-only agent does.
        let mtls = "[[agent]]\nname = \"prod\"\nmtls = true\n";
        assert_eq!(
            check(&format!("{mtls}token_sha256 = \"{}\"\n", "ab".repeat(32))),
            None
        );
        assert!(check(mtls).is_some_and(|e| e.contains("client_ca")));
        let jwt = "[jwt]\nissuer = \"https://idp\"\naudience = \"tether\"\n";
        for (bad, names) in [
            (
                "max_streams_per_client = 9223372036854775807\n".to_owned(),
                "max_streams_per_client",
            ),
            (
                "[limits]\nopens_per_sec = nan\n".to_owned(),
                "opens_per_sec",
            ),
            (
                "[limits]\nrequests_per_sec = inf\n".to_owned(),
                "requests_per_sec",
            ),
            (
                "[limits]\nopens_per_sec = -5.0\n".to_owned(),
                "opens_per_sec",
            ),
            (
                "[limits]\nrequest_burst = 0.0\n".to_owned(),
                "request_burst",
            ),
            (format!("{jwt}leeway_secs = 2000000000\n"), "leeway_secs"),
            (
                "max_streams_per_client = 0\n".to_owned(),
                "max_streams_per_client",
            ),
            ("[limits]\nmax_sessions = 0\n".to_owned(), "max_sessions"),
        ] {
            let e = check(&bad).unwrap_or_else(|| panic!("accepted: {bad}"));
            assert!(e.contains(names), "{bad}: {e}");
        }
    }
}
