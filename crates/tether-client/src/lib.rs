//! The tether CLI client: local TCP listeners whose connections travel as
//! streams of one multiplexed session to the server, and on to an agent's
//! service; and a local SOCKS5 / HTTP CONNECT proxy ([`proxy`]).

#![deny(missing_docs)]

mod current;
pub mod proxy;

pub use current::{CurrentSession, SESSION_WAIT};

use anyhow::{bail, Context};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_net::reconnect::{keep_connected, server_trust, Endpoint, Established, SessionEnd};
use tether_net::splice::{socket_halves, splice};
use tether_net::transport::tls::ServerTrust;
use tether_net::transport::ws::endpoint_url;
use tether_proto::Target;
use tokio::net::{TcpListener, TcpStream};

use tether_proto::endpoints::CLIENT_PATH;

/// Client configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Server URL, `wss://host:port`.
    pub server: String,
    /// The client token, or a JWT from your identity provider (prefer
    /// `token_file` or `TETHER_TOKEN` over writing it into a file here).
    #[serde(default)]
    pub token: String,
    /// File holding the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM CA file to verify the server with.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Pinned SHA-256 fingerprint of the server certificate.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Forwards, `LISTEN=AGENT/SERVICE`.
    #[serde(default)]
    pub forward: Vec<String>,
    /// Heartbeat settings.
    #[serde(default)]
    pub session: tether_net::tuning::SessionTuning,
    /// A local SOCKS5 / HTTP CONNECT proxy.
    #[serde(default)]
    pub proxy: Option<proxy::ProxyConfig>,
    /// Close a UDP flow after this long without datagrams, in milliseconds.
    #[serde(default = "default_udp_idle_ms")]
    pub udp_idle_timeout_ms: u64,
    /// Most UDP flows per forward; the least recently used is evicted beyond.
    #[serde(default = "default_max_udp_flows")]
    pub max_udp_flows: usize,
    /// Send what a forwarded connection has already written with its open
    /// (early data, PROTOCOL.md 6.3): a round trip less per connection. Off,
    /// a retry after a lost session can never repeat a byte to the service.
    #[serde(default = "default_early_data")]
    pub early_data: bool,
}

fn default_early_data() -> bool {
    true
}

fn default_udp_idle_ms() -> u64 {
    tether_net::udp::DEFAULT_IDLE_TIMEOUT.as_millis() as u64
}

fn default_max_udp_flows() -> usize {
    tether_net::udp::DEFAULT_MAX_FLOWS
}

impl ClientConfig {
    /// How to check the server's certificate.
    pub fn trust(&self) -> ServerTrust {
        server_trust(self.fingerprint.as_ref(), self.ca_file.as_ref())
    }
}

/// One local forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Where to listen locally.
    pub listen: SocketAddr,
    /// `agent/service` to reach.
    pub target: String,
    /// TCP or UDP (`udp:` prefix).
    pub udp: bool,
}

impl std::str::FromStr for Forward {
    type Err = anyhow::Error;

    /// `127.0.0.1:15432=prod/db`, or `15432=prod/db` (loopback); a `udp:`
    /// prefix forwards UDP: `udp:127.0.0.1:5353=prod/dns`.
    fn from_str(s: &str) -> anyhow::Result<Forward> {
        let (udp, rest) = match s.strip_prefix("udp:") {
            Some(r) => (true, r),
            None => (false, s.strip_prefix("tcp:").unwrap_or(s)),
        };
        let (listen, target) = rest
            .split_once('=')
            .with_context(|| format!("forward {s:?}: expected LISTEN=AGENT/SERVICE"))?;
        let listen: SocketAddr = if let Ok(port) = listen.parse::<u16>() {
            SocketAddr::from(([127, 0, 0, 1], port))
        } else {
            listen
                .parse()
                .with_context(|| format!("forward {s:?}: {listen:?} is not PORT or IP:PORT"))?
        };
        // Checked now, as the server will check it: a target it would refuse
        // (`prod/db:abc`) stops the client at start, not each connection.
        let target = tether_proto::target::ClientTarget::parse(target)
            .map_err(|e| anyhow::anyhow!("forward {s:?}: {e}"))?;
        Ok(Forward {
            listen,
            target: target.to_string(),
            udp,
        })
    }
}

/// A client with its listeners bound.
pub struct Client {
    config: ClientConfig,
    listeners: Vec<(TcpListener, Forward)>,
    udp_sockets: Vec<(Arc<tokio::net::UdpSocket>, Forward)>,
    udp_stats: Arc<tether_net::udp::UdpStats>,
    /// The proxy's port, routes and password (if one is set).
    proxy: Option<(
        TcpListener,
        Arc<proxy::Router>,
        Option<Arc<proxy::ProxyAuth>>,
    )>,
}

impl Client {
    /// Parses forwards and binds every listener (so a port in use fails now).
    pub async fn bind(mut config: ClientConfig) -> anyhow::Result<Client> {
        config.session.validate()?;
        if config.udp_idle_timeout_ms == 0 {
            bail!(
                "udp_idle_timeout_ms = 0 would close every UDP flow at once: give it at least 1 (default {})",
                tether_net::udp::DEFAULT_IDLE_TIMEOUT.as_millis()
            );
        }
        if config.max_udp_flows == 0 {
            bail!(
                "max_udp_flows = 0 would leave no room for a UDP flow: give it at least 1 (default {})",
                default_max_udp_flows()
            );
        }
        if let Some(f) = &config.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("token_file {}", f.display()))?;
            config.token = t.trim().to_owned();
        }
        if config.token.is_empty() {
            bail!("no client token: set TETHER_TOKEN, --token or token_file");
        }
        if config.forward.is_empty() && config.proxy.is_none() {
            bail!("nothing to do: add forwards (LISTEN=AGENT/SERVICE) or a proxy");
        }
        let mut listeners = Vec::new();
        let mut udp_sockets = Vec::new();
        for f in &config.forward {
            let fwd: Forward = f.parse()?;
            if !fwd.listen.ip().is_loopback() {
                // As for the proxy: whoever reaches the port opens streams
                // with this client's credential.
                tracing::warn!(listen = %fwd.listen, target = %fwd.target, "a forward listens beyond this machine: anyone who can reach it uses this client's credential for {}; listen on 127.0.0.1 unless that is meant", fwd.target);
            }
            if fwd.udp {
                let sock = tokio::net::UdpSocket::bind(fwd.listen)
                    .await
                    .with_context(|| format!("cannot bind udp {}", fwd.listen))?;
                udp_sockets.push((Arc::new(sock), fwd));
                continue;
            }
            let l = tether_net::listen::bind(fwd.listen)
                .with_context(|| format!("cannot listen on {}", fwd.listen))?;
            listeners.push((l, fwd));
        }
        let proxy = match &config.proxy {
            None => None,
            Some(p) => {
                let router = proxy::Router::new(&p.route, p.default_agent.clone())?;
                let auth = match &p.auth_file {
                    Some(f) => Some(Arc::new(proxy::ProxyAuth::load(f)?)),
                    None => None,
                };
                let l = tether_net::listen::bind(p.listen)
                    .with_context(|| format!("cannot listen on {} (proxy)", p.listen))?;
                if !p.listen.ip().is_loopback() && auth.is_none() {
                    // The proxy asks for no password: whoever reaches the
                    // port opens streams with this client's credential.
                    tracing::warn!(listen = %p.listen, "the proxy listens beyond this machine and asks for no password: anyone who can reach it opens streams with this client's credential; listen on 127.0.0.1, or set auth_file");
                }
                Some((l, Arc::new(router), auth))
            }
        };
        Ok(Client {
            config,
            listeners,
            udp_sockets,
            udp_stats: Arc::default(),
            proxy,
        })
    }

    /// The proxy's bound address, if a proxy is configured.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy
            .as_ref()
            .and_then(|(l, _, _)| l.local_addr().ok())
    }

    /// The bound local addresses, in forward order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// UDP flow counters (for metrics).
    pub fn udp_stats(&self) -> Arc<tether_net::udp::UdpStats> {
        self.udp_stats.clone()
    }

    /// Runs the listeners and keeps the session up, forever.
    pub async fn run(self) -> anyhow::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Like [`Client::run`] until `shutdown` resolves; then closes the
    /// session cleanly (GOAWAY and a WebSocket close) instead of vanishing,
    /// and stops the listeners: the ports close when this returns.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let current = CurrentSession::new();
        // Aborted when this returns (dropped with the set).
        let mut listeners = tokio::task::JoinSet::new();
        let limits = tether_net::udp::UdpLimits {
            idle_timeout: Duration::from_millis(self.config.udp_idle_timeout_ms),
            max_flows: self.config.max_udp_flows,
        };
        for (sock, fwd) in self.udp_sockets {
            tracing::info!(listen = %fwd.listen, target = %fwd.target, "forwarding udp");
            let current = current.clone();
            let target = fwd.target.clone();
            let open = move || {
                let current = current.clone();
                let target = target.clone();
                async move {
                    current
                        .open(tether_proto::Target {
                            kind: tether_proto::TargetKind::Udp,
                            address: target,
                        })
                        .await
                        .map_err(|r| r.to_string())
                }
            };
            listeners.spawn(tether_net::udp::serve_socket(
                sock,
                open,
                limits.clone(),
                self.udp_stats.clone(),
                |_| true,
            ));
        }
        for (listener, fwd) in self.listeners {
            let addr = listener.local_addr().unwrap_or(fwd.listen);
            tracing::info!(listen = %addr, target = %fwd.target, "forwarding");
            listeners.spawn(accept_loop(
                listener,
                fwd,
                current.clone(),
                self.config.early_data,
            ));
        }
        if let Some((listener, router, auth)) = self.proxy {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(listen = %addr, "SOCKS5 / HTTP CONNECT proxy");
            }
            listeners.spawn(proxy::serve(
                listener,
                router,
                auth,
                current.clone(),
                limits.idle_timeout,
            ));
        }
        tokio::select! {
            r = keep_session(self.config, current.clone()) => r,
            _ = shutdown => {
                let conn = current.now();
                if let Some(conn) = conn {
                    conn.close(tether_proto::ErrorCode::Normal, "client exiting");
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.transport_closed()).await;
                }
                Ok(())
            }
        }
    }
}

async fn keep_session(cfg: ClientConfig, current: CurrentSession) -> anyhow::Result<()> {
    let endpoint = Endpoint {
        url: endpoint_url(&cfg.server, CLIENT_PATH),
        trust: cfg.trust(),
        identity: None,
    };
    tether_net::transport::ws::warn_if_plain(&endpoint.url);
    let url = endpoint.url.clone();
    let headers = vec![("authorization".to_owned(), format!("Bearer {}", cfg.token))];
    let dial = || {
        let mut scfg = tether_proto::Config {
            software: format!("tether-client/{}", env!("CARGO_PKG_VERSION")),
            accept_opens: false,
            // Longer than the server's own wait for the agent, so the
            // server's explanation (refused, timeout...) arrives first.
            open_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        cfg.session.apply(&mut scfg);
        let (endpoint, headers) = (&endpoint, &headers);
        async move {
            endpoint
                .connect(headers, scfg, "client")
                .await
                .map_err(|e| e.to_string())
        }
    };
    let serve = |(conn, info, _incoming): Established| {
        let (current, url) = (&current, &url);
        async move {
            tracing::info!(server = %url, peer = %info.peer_software, "connected");
            current.publish(conn.clone());
            tokio::select! {
                () = conn.draining() => {}
                // An open found this replica without the agent: a fresh
                // session may land on another one.
                () = current.renew_requested(&conn) => {
                    current.clear();
                    tracing::info!(server = %url, "moving to a fresh session");
                    return SessionEnd::Drained;
                }
            }
            // New connections must not go to a draining session; its open
            // streams finish on their own.
            current.clear();
            if conn.is_closed() {
                let why = conn.closed().await;
                tracing::warn!(server = %url, reason = why.as_deref().unwrap_or("drained"), "disconnected; reconnecting");
                SessionEnd::Lost
            } else {
                tracing::info!(server = %url, "server is draining this session (GOAWAY); reconnecting");
                SessionEnd::Drained
            }
        }
    };
    keep_connected(&url, dial, serve).await;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    fwd: Forward,
    session: CurrentSession,
    early_data: bool,
) {
    let fwd = Arc::new(fwd);
    loop {
        let (tcp, peer) = tether_net::listen::accept(&listener).await;
        tokio::spawn(forward_one(
            session.clone(),
            tcp,
            peer,
            fwd.clone(),
            early_data,
        ));
    }
}

async fn forward_one(
    session: CurrentSession,
    mut tcp: TcpStream,
    peer: SocketAddr,
    fwd: Arc<Forward>,
    early_data: bool,
) {
    let started = Instant::now();
    tether_net::listen::tune_accepted(&tcp);
    // With no session (the server is being reconnected), the connection
    // waits up to SESSION_WAIT for one, then is closed: the application
    // sees a failure soon instead of hanging until the server is back.
    // What the application has sent already goes with the open.
    let read_early = if early_data {
        tether_net::early::arrived(&mut tcp, tether_proto::MAX_EARLY_DATA)
    } else {
        Ok(bytes::Bytes::new())
    };
    let early = match read_early {
        Ok(b) => b,
        Err(e) => {
            tracing::info!(%peer, target = %fwd.target, "connection failed before its open: {e}");
            return;
        }
    };
    let early_len = early.len() as u64;
    let stream = match session
        .open_with(Target::tcp(fwd.target.clone()), early)
        .await
    {
        Ok(s) => s,
        Err(tether_net::Refusal { code, reason }) => {
            tracing::warn!(%peer, target = %fwd.target, %code, "cannot open: {reason}");
            return;
        }
    };
    let id = stream.id();
    tracing::debug!(%peer, stream = %id, target = %fwd.target, "stream open");
    let (tr, tw) = socket_halves(tcp);
    let (sr, sw) = stream.split();
    let mut report = splice(tr, tw, sr, sw).await;
    report.a_to_b += early_len; // sent with the open, before the splice
    let ms = started.elapsed().as_millis() as u64;
    match report.error {
        None => {
            tracing::info!(%peer, stream = %id, target = %fwd.target, bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, "stream closed")
        }
        Some(e) => {
            tracing::info!(%peer, stream = %id, target = %fwd.target, bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, "stream ended with error: {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zero for a UDP flow's idle time or for the flow cap would break
    /// every flow: refused at start, by name, as the agent refuses them.
    #[tokio::test]
    async fn zero_udp_settings_are_refused_by_name() {
        let config = |text: &str| -> ClientConfig {
            toml::from_str(&format!(
                "server = \"ws://127.0.0.1:1\"\ntoken = \"t\"\nforward = [\"127.0.0.1:0=prod/db\"]\n{text}"
            ))
            .unwrap()
        };
        for (text, name) in [
            ("udp_idle_timeout_ms = 0", "udp_idle_timeout_ms"),
            ("max_udp_flows = 0", "max_udp_flows"),
        ] {
            let e = Client::bind(config(text))
                .await
                .err()
                .map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(name)),
                "{text}: {e:?}"
            );
        }
    }

    #[test]
    fn forwards_parse() {
        let f: Forward = "127.0.0.1:15432=prod/db".parse().unwrap();
        assert_eq!(f.listen, "127.0.0.1:15432".parse().unwrap());
        assert_eq!(f.target, "prod/db");
        let f: Forward = "8080=prod/web".parse().unwrap();
        assert_eq!(f.listen.port(), 8080);
        assert!("8080=prod".parse::<Forward>().is_err());
        assert!("nonsense".parse::<Forward>().is_err());
        assert!("x:1=a/b".parse::<Forward>().is_err());
        assert!("8080=prod/cache.default.svc:6379"
            .parse::<Forward>()
            .is_ok());
        // Targets the server would refuse stop the client at start.
        for bad in [
            "8080=prod/db:abc",
            "8080=prod/host.:80",
            "8080=prod/a/b",
            "8080=/db",
        ] {
            let e = bad.parse::<Forward>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("forward {bad:?}")), "{e}");
        }
        // A raw target takes its canonical spelling.
        let f: Forward = "8080=prod/DB.Example:443"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.target, "prod/db.example:443");
    }
}
