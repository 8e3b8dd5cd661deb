//! A local SOCKS5 and HTTP CONNECT proxy whose connections travel through
//! the tunnel. Host names are sent as they are and resolved by the agent, in
//! the cluster's DNS, so `grafana.monitoring.svc.cluster.local:3000` works
//! from a laptop. Routing rules pick the agent by domain glob or CIDR.
//!
//! SOCKS5 (RFC 1928: CONNECT, UDP ASSOCIATE; no authentication, or a user
//! name and password, RFC 1929) and HTTP CONNECT (`Proxy-Authorization:
//! Basic` when a password is set) share one port: the first byte tells them
//! apart (SOCKS5 starts with 0x05). The
//! handshakes are small enough to write out here; doing so keeps the target
//! as the client named it (no local DNS), which generic proxy crates resolve.
//! The parsers take untrusted bytes: the `proxy_handshake` fuzz target
//! (`fuzz/`) runs them in CI.

use anyhow::{bail, Context};
use ipnet::IpNet;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_net::pattern::glob_match;
use tether_net::splice::{socket_halves, splice};
use tether_proto::target::RawTarget;
use tether_proto::{OpenErrorCode, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a proxy client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest HTTP request head accepted on the proxy port.
const MAX_HTTP_HEAD: usize = 16 * 1024;

/// Connections (and SOCKS5 UDP associations, one each) the proxy serves at
/// once: twice the streams the server gives one identity by default, so
/// never the limit a browser meets first. Past it a new connection is
/// closed at accept: a local program that opens connections and leaves
/// them (each with its task, its buffers, an association's socket) cannot
/// take the client's memory or file descriptors.
const MAX_CONNECTIONS: usize = 4096;

/// Proxy settings (`[proxy]` in the client config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where to listen, e.g. `127.0.0.1:1080`.
    pub listen: SocketAddr,
    /// Routing rules, `PATTERN=AGENT`: a domain glob (`*.prod.svc.cluster.local`)
    /// or a CIDR (`10.0.0.0/8`). First match wins.
    #[serde(default)]
    pub route: Vec<String>,
    /// The agent for targets no rule matches; without one they are refused.
    #[serde(default)]
    pub default_agent: Option<String>,
    /// A file whose first line is `USER:PASSWORD`: proxy clients must give
    /// them (SOCKS5 RFC 1929, HTTP `Proxy-Authorization: Basic`). Without
    /// it anyone who reaches the port may use it.
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
}

/// The user name and password proxy clients must give.
#[derive(Clone)]
pub struct ProxyAuth {
    user: Vec<u8>,
    password: Vec<u8>,
}

impl std::fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAuth")
            .field("user", &String::from_utf8_lossy(&self.user))
            .finish_non_exhaustive()
    }
}

impl ProxyAuth {
    /// Reads `USER:PASSWORD` from the first line of `path`.
    pub fn load(path: &Path) -> anyhow::Result<ProxyAuth> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the proxy's auth_file {}", path.display()))?;
        ProxyAuth::parse(text.lines().next().unwrap_or_default())
            .with_context(|| format!("auth_file {}", path.display()))
    }

    /// `USER:PASSWORD` (split at the first `:`), each 1 to 255 bytes, as
    /// SOCKS5 carries them.
    pub fn parse(line: &str) -> anyhow::Result<ProxyAuth> {
        let line = line.trim_end_matches(['\r', '\n']);
        let Some((user, password)) = line.split_once(':') else {
            bail!("expected USER:PASSWORD on its first line");
        };
        for (what, v) in [("user name", user), ("password", password)] {
            if !(1..=255).contains(&v.len()) {
                bail!("the {what} must be 1 to 255 bytes (SOCKS5's limit)");
            }
        }
        Ok(ProxyAuth {
            user: user.into(),
            password: password.into(),
        })
    }

    /// Whether `user` and `password` are the ones set, in time that
    /// depends neither on where they differ nor on their lengths (digests
    /// of a fixed size are compared).
    fn matches(&self, user: &[u8], password: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
        let same = |a: &[u8], b: &[u8]| digest(a).as_ref().ct_eq(digest(b).as_ref());
        (same(&self.user, user) & same(&self.password, password)).into()
    }

    /// Whether an HTTP `Proxy-Authorization` value gives them (`Basic`,
    /// base64 of `USER:PASSWORD`).
    fn matches_basic(&self, value: &str) -> bool {
        use base64::Engine;
        let Some((scheme, encoded)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return false;
        };
        self.matches(&decoded[..colon], &decoded[colon + 1..])
    }
}

#[derive(Debug, Clone)]
enum RouteMatch {
    Domain(String),
    Net(IpNet),
}

/// Parsed routing rules.
#[derive(Debug, Clone)]
pub struct Router {
    rules: Vec<(RouteMatch, String)>,
    default_agent: Option<String>,
}

impl Router {
    /// Parses `PATTERN=AGENT` rules.
    pub fn new(rules: &[String], default_agent: Option<String>) -> anyhow::Result<Router> {
        let mut parsed = Vec::new();
        for r in rules {
            let (pat, agent) = r
                .rsplit_once('=')
                .with_context(|| format!("route {r:?}: expected PATTERN=AGENT"))?;
            if agent.is_empty() || pat.is_empty() {
                bail!("route {r:?}: expected PATTERN=AGENT");
            }
            let m = match pat.parse::<IpNet>() {
                Ok(net) => RouteMatch::Net(net),
                Err(_) => RouteMatch::Domain(pat.to_ascii_lowercase()),
            };
            parsed.push((m, agent.to_owned()));
        }
        Ok(Router {
            rules: parsed,
            default_agent,
        })
    }

    /// The agent that serves `host`.
    pub fn agent_for(&self, host: &str) -> Option<&str> {
        let host_l = host.to_ascii_lowercase();
        // `::ffff:10.1.2.3` is 10.1.2.3 for a `10.0.0.0/8` rule, as the
        // server and the agent see it.
        let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        for (m, agent) in &self.rules {
            let hit = match (m, ip) {
                (RouteMatch::Net(net), Some(ip)) => net.contains(&ip),
                (RouteMatch::Net(_), None) => false,
                (RouteMatch::Domain(g), _) => glob_match(g, &host_l),
            };
            if hit {
                return Some(agent);
            }
        }
        self.default_agent.as_deref()
    }
}

/// Formats `host:port` with brackets for IPv6.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Serves the proxy port until the process ends; a SOCKS5 UDP flow ends
/// after `udp_idle` without a datagram.
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    auth: Option<Arc<ProxyAuth>>,
    session: crate::CurrentSession,
    udp_idle: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut full_warned: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tether_net::listen::accept(&listener).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // One line a second: the program doing it may try thousands.
            if full_warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                full_warned = Some(std::time::Instant::now());
                tracing::warn!(%peer, "the proxy serves {MAX_CONNECTIONS} connections already; closing a new one (more this second not logged)");
            }
            continue;
        };
        let router = router.clone();
        let auth = auth.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tether_net::listen::tune_accepted(&tcp);
            if let Err(e) = handle(tcp, peer, &router, auth.as_deref(), session, udp_idle).await {
                tracing::info!(%peer, "proxy connection failed: {e:#}");
            }
        });
    }
}

/// What a proxy handshake asked for.
#[derive(Debug)]
pub struct Request {
    /// The host as the client named it (never resolved here).
    pub host: String,
    /// The port.
    pub port: u16,
    /// Which protocol asked, and how to answer it.
    pub kind: Kind,
}

/// The kind of proxy request.
#[derive(Debug)]
pub enum Kind {
    /// SOCKS5 CONNECT.
    Socks5,
    /// SOCKS5 UDP ASSOCIATE: datagrams relayed while the TCP connection lives.
    UdpAssociate,
    /// HTTP CONNECT, with the bytes the client sent after the request head
    /// (a client need not wait for the `200`).
    HttpConnect(Vec<u8>),
    /// An absolute-form HTTP request (`GET http://host/path`): forward the
    /// rewritten head (asking the service to close after its answer, since
    /// the client's next request on this connection may be for another
    /// host), then splice.
    HttpForward(Vec<u8>),
}

async fn handle(
    mut tcp: TcpStream,
    peer: SocketAddr,
    router: &Router,
    auth: Option<&ProxyAuth>,
    session: crate::CurrentSession,
    udp_idle: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.read_exact(&mut first)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e).context("reading the proxy handshake"),
        Err(_) => bail!("proxy handshake timed out: the client sent nothing"),
    }
    let mut req =
        match tokio::time::timeout_at(deadline, read_request_after(&mut tcp, first[0], auth)).await
        {
            Ok(Ok(req)) => req,
            Ok(Err(e)) => {
                close_after_answer(tcp).await;
                return Err(e);
            }
            Err(_) => {
                if first[0] != SOCKS5 {
                    write_http_error(
                        &mut tcp,
                        "408 Request Timeout",
                        "tether: the request head did not arrive in time\n",
                    )
                    .await;
                    close_after_answer(tcp).await;
                }
                bail!("proxy handshake timed out");
            }
        };
    if let Kind::UdpAssociate = req.kind {
        return udp_associate(tcp, peer, req.port, router, session, udp_idle).await;
    }
    drop_root_dot(&mut req.host);
    if let Err(e) = RawTarget::parse(&host_port(&req.host, req.port)) {
        refuse_bad_target(&mut tcp, &req.kind, &e.to_string()).await;
        close_after_answer(tcp).await;
        bail!("{e}");
    }
    let Some(agent) = router.agent_for(&req.host).map(str::to_owned) else {
        refuse(
            &mut tcp,
            &req.kind,
            OpenErrorCode::Forbidden,
            "no route to an agent for this host (the client's --route PATTERN=AGENT or --default-agent)",
        )
        .await;
        close_after_answer(tcp).await;
        bail!("no route for {}", req.host);
    };
    let target = format!("{agent}/{}", host_port(&req.host, req.port));
    let stream = match session.open(Target::tcp(target.clone())).await {
        Ok(s) => s,
        Err(tether_net::Refusal { code, reason }) => {
            refuse(&mut tcp, &req.kind, code, &reason).await;
            close_after_answer(tcp).await;
            bail!("{target}: {code}: {reason}");
        }
    };
    match &req.kind {
        Kind::Socks5 => {
            tcp.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        }
        Kind::HttpConnect(_) => {
            tcp.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await?;
        }
        Kind::HttpForward(_) | Kind::UdpAssociate => {}
    }
    let id = stream.id();
    let (sr, mut sw) = stream.split();
    // What the client sent after its request head goes first.
    match req.kind {
        Kind::HttpForward(first) | Kind::HttpConnect(first) if !first.is_empty() => {
            sw.write(bytes::Bytes::from(first)).await?;
        }
        _ => {}
    }
    let (tr, tw) = socket_halves(tcp);
    let report = splice(tr, tw, sr, sw).await;
    let ms = started.elapsed().as_millis() as u64;
    match report.error {
        None => {
            tracing::info!(%peer, stream = %id, %target, bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, "proxy stream closed")
        }
        Some(e) => {
            tracing::info!(%peer, stream = %id, %target, bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, "proxy stream ended with error: {e}")
        }
    }
    Ok(())
}

// SOCKS5 reply codes (RFC 1928 section 6) for requests refused before any
// open: general failure, command not supported, address type not supported.
const SOCKS5_GENERAL_FAILURE: u8 = 1;
const SOCKS5_HOST_UNREACHABLE: u8 = 4;
const SOCKS5_COMMAND: u8 = 7;
const SOCKS5_ADDRESS_TYPE: u8 = 8;

/// Writes a SOCKS5 reply with code `rep` and no bound address (best
/// effort: the client may be gone).
async fn write_socks5_reply<S: AsyncWrite + Unpin>(tcp: &mut S, rep: u8) {
    let _ = tcp.write_all(&[5, rep, 0, 1, 0, 0, 0, 0, 0, 0]).await;
}

/// Writes an HTTP answer with `status` and `body` as plain text, after which
/// the connection closes (best effort).
async fn write_http_error<S: AsyncWrite + Unpin>(tcp: &mut S, status: &str, body: &str) {
    write_http_answer(tcp, status, "", body).await
}

/// [`write_http_error`] with `headers` (each ending in CRLF) besides.
async fn write_http_answer<S: AsyncWrite + Unpin>(
    tcp: &mut S,
    status: &str,
    headers: &str,
    body: &str,
) {
    let answer = format!(
        "HTTP/1.1 {status}\r\n{headers}content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
}

/// How long, and how many bytes, a refused client's unread input is read and
/// dropped after the answer.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 1 << 20;

/// Closes a connection that was answered with a refusal. Closed with input
/// still unread (a request body on its way), the socket would send a reset,
/// and a client still writing would report "connection reset" instead of
/// the answer; so the write side is shut first and the rest of the input is
/// read and dropped for a bounded time.
async fn close_after_answer(mut tcp: TcpStream) {
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut rest = (&mut tcp).take(LINGER_BYTES);
    let _ = tokio::time::timeout(LINGER, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
}

/// Answers a SOCKS5 request that cannot be served with reply code `rep`
/// and returns the error to log.
async fn socks5_failure<S: AsyncWrite + Unpin>(tcp: &mut S, rep: u8, why: String) -> anyhow::Error {
    write_socks5_reply(tcp, rep).await;
    anyhow::anyhow!(why)
}

/// Answers an HTTP proxy request that cannot be served with `400` and the
/// reason, and returns the error to log.
async fn http_bad_request<S: AsyncWrite + Unpin>(tcp: &mut S, why: String) -> anyhow::Error {
    write_http_error(tcp, "400 Bad Request", &format!("{why}\n")).await;
    anyhow::anyhow!(why)
}

/// The first byte of a SOCKS5 handshake (its version), and of SOCKS4's.
const SOCKS5: u8 = 5;
const SOCKS4: u8 = 4;

/// Reads one proxy handshake (SOCKS5 or HTTP) from `tcp`, answering the
/// SOCKS5 method negotiation and refusing what is not supported, and what
/// does not give `auth`'s user name and password when there is one. Public
/// for the `proxy_handshake` fuzz target: this parses untrusted local input.
pub async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut S,
    auth: Option<&ProxyAuth>,
) -> anyhow::Result<Request> {
    let mut first = [0u8; 1];
    tcp.read_exact(&mut first).await?;
    read_request_after(tcp, first[0], auth).await
}

/// [`read_request`] after its first byte, `first`, which tells the
/// protocols apart.
async fn read_request_after<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut S,
    mut first: u8,
    auth: Option<&ProxyAuth>,
) -> anyhow::Result<Request> {
    // An empty line or two before an HTTP request line is ignored (RFC 9112
    // 2.2: a client may send one after a previous request's body).
    for _ in 0..4 {
        if !matches!(first, b'\r' | b'\n') {
            break;
        }
        first = tcp.read_u8().await?;
    }
    match first {
        SOCKS5 => read_socks5(tcp, auth).await,
        SOCKS4 => {
            // SOCKS4's own refusal (version 0, code 91), so that the client
            // says "rejected" at once instead of waiting for a timeout.
            let _ = tcp.write_all(&[0, 91, 0, 0, 0, 0, 0, 0]).await;
            bail!("a SOCKS4 client: the proxy speaks SOCKS5 (socks5h://) and HTTP CONNECT")
        }
        // A method is a token; anything else is not HTTP either.
        b if b.is_ascii_alphabetic() => read_http(tcp, b, auth).await,
        0x16 => bail!(
            "a TLS handshake: the proxy speaks plain SOCKS5 and HTTP (an http:// proxy URL, not https://)"
        ),
        b => bail!("not a SOCKS5 or HTTP handshake (first byte {b:#04x})"),
    }
}

/// SOCKS5 authentication methods (RFC 1928 section 3).
const SOCKS5_NO_AUTH: u8 = 0;
const SOCKS5_USER_PASSWORD: u8 = 2;
const SOCKS5_NO_METHOD: u8 = 0xff;

async fn read_socks5<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut S,
    auth: Option<&ProxyAuth>,
) -> anyhow::Result<Request> {
    let n = tcp.read_u8().await? as usize;
    let mut methods = vec![0u8; n];
    tcp.read_exact(&mut methods).await?;
    let method = match auth {
        Some(_) => SOCKS5_USER_PASSWORD,
        None => SOCKS5_NO_AUTH,
    };
    if !methods.contains(&method) {
        tcp.write_all(&[5, SOCKS5_NO_METHOD]).await?;
        match auth {
            Some(_) => bail!("SOCKS5 client offers no user name and password (the proxy asks for them: socks5h://USER:PASSWORD@HOST:PORT)"),
            None => bail!("SOCKS5 client offers no 'no authentication' method (the proxy has no password set)"),
        }
    }
    tcp.write_all(&[5, method]).await?;
    if let Some(auth) = auth {
        socks5_user_password(tcp, auth).await?;
    }
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await?;
    if head[0] != 5 {
        let why = format!("bad SOCKS5 request version {}", head[0]);
        return Err(socks5_failure(tcp, SOCKS5_GENERAL_FAILURE, why).await);
    }
    let host = match head[3] {
        1 => {
            let mut a = [0u8; 4];
            tcp.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let len = tcp.read_u8().await? as usize;
            let mut d = vec![0u8; len];
            tcp.read_exact(&mut d).await?;
            match String::from_utf8(d) {
                Ok(host) => host,
                // Domains are supported: one that is no name we can route
                // is refused as other bad names are (04), not as an
                // address type we lack (08, RFC 1928 6).
                Err(_) => {
                    let why = "SOCKS5 domain is not UTF-8".to_owned();
                    return Err(socks5_failure(tcp, SOCKS5_HOST_UNREACHABLE, why).await);
                }
            }
        }
        4 => {
            let mut a = [0u8; 16];
            tcp.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        other => {
            let why = format!("SOCKS5 address type {other} not supported");
            return Err(socks5_failure(tcp, SOCKS5_ADDRESS_TYPE, why).await);
        }
    };
    let port = tcp.read_u16().await?;
    if head[1] == 3 {
        return Ok(Request {
            host,
            port,
            kind: Kind::UdpAssociate,
        });
    }
    if head[1] != 1 {
        // BIND.
        let why = format!("SOCKS5 command {} not supported", head[1]);
        return Err(socks5_failure(tcp, SOCKS5_COMMAND, why).await);
    }
    Ok(Request {
        host,
        port,
        kind: Kind::Socks5,
    })
}

/// RFC 1929: the client's user name and password, answered with success or
/// failure (after which the client closes).
async fn socks5_user_password<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut S,
    auth: &ProxyAuth,
) -> anyhow::Result<()> {
    const FAILURE: [u8; 2] = [1, 1];
    let version = tcp.read_u8().await?;
    if version != 1 {
        let _ = tcp.write_all(&FAILURE).await;
        bail!("SOCKS5 user name and password: version {version}, not 1");
    }
    let mut user = vec![0u8; usize::from(tcp.read_u8().await?)];
    tcp.read_exact(&mut user).await?;
    let mut password = vec![0u8; usize::from(tcp.read_u8().await?)];
    tcp.read_exact(&mut password).await?;
    if !auth.matches(&user, &password) {
        let _ = tcp.write_all(&FAILURE).await;
        bail!("SOCKS5 client gave a wrong user name or password");
    }
    tcp.write_all(&[1, 0]).await?;
    Ok(())
}

async fn read_http<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut S,
    first: u8,
    auth: Option<&ProxyAuth>,
) -> anyhow::Result<Request> {
    let mut buf = vec![first];
    let mut chunk = [0u8; 2048];
    let mut searched = 0;
    let end = loop {
        if let Some(end) = head_end(&buf, searched) {
            break end;
        }
        // The next search starts where an end could still begin: a line
        // break in the last two bytes.
        searched = buf.len().saturating_sub(2);
        if buf.len() > MAX_HTTP_HEAD {
            let _ = tcp
                .write_all(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\r\n",
                )
                .await;
            bail!("HTTP request head too large");
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed during the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Err(http_bad_request(tcp, "request head is not UTF-8".to_owned()).await);
    };
    let line = head.lines().next().unwrap_or_default();
    let fields = || {
        head.lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| (l.split(':').next().unwrap_or_default().trim(), l))
    };
    let mut parts = line.split_whitespace();
    let (method, uri, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("HTTP/1.1"),
    );
    if let Some(auth) = auth {
        // Exactly one `Proxy-Authorization` (RFC 9110 11.7.1): a head with
        // hundreds would be hundreds of guesses.
        let mut given = fields()
            .filter(|(name, _)| name.eq_ignore_ascii_case("proxy-authorization"))
            .filter_map(|(_, l)| l.split_once(':').map(|(_, v)| v));
        let right = match (given.next(), given.next()) {
            (Some(v), None) => auth.matches_basic(v),
            _ => false,
        };
        if !right {
            write_http_answer(
                tcp,
                "407 Proxy Authentication Required",
                "proxy-authenticate: Basic realm=\"tether proxy\"\r\n",
                "tether: the proxy asks for a user name and password (http://USER:PASSWORD@HOST:PORT)\n",
            )
            .await;
            bail!("HTTP proxy client gave no or a wrong user name and password");
        }
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = match split_authority(uri, 443) {
            Ok(x) => x,
            Err(e) => return Err(http_bad_request(tcp, format!("CONNECT {uri:?}: {e:#}")).await),
        };
        return Ok(Request {
            host,
            port,
            kind: Kind::HttpConnect(buf.split_off(end)),
        });
    }
    // Absolute-form request to a plain HTTP site: rewrite to origin-form.
    // The scheme in any letter case (RFC 3986 3.1).
    let scheme = uri.get(..7).filter(|s| s.eq_ignore_ascii_case("http://"));
    let Some(rest) = scheme.map(|s| &uri[s.len()..]) else {
        let why = if uri
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            format!("{line:?}: an https:// URL goes through CONNECT")
        } else {
            format!("not a proxy request: {line:?}: use CONNECT or an absolute http:// URL")
        };
        return Err(http_bad_request(tcp, why).await);
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        // `OPTIONS http://host` asks about the server, not a resource: the
        // last proxy sends `*` (RFC 9112 3.2.4).
        None if method.eq_ignore_ascii_case("OPTIONS") => (rest, "*".to_owned()),
        None => (rest, "/".to_owned()),
    };
    // Credentials in the URL (`http://user:pass@host/`) are not part of
    // the address.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match split_authority(authority, 80) {
        Ok(x) => x,
        Err(e) => return Err(http_bad_request(tcp, format!("{authority:?}: {e:#}")).await),
    };
    // The target's authority is the `Host` (RFC 9112 3.2.2: a proxy
    // replaces the one received): an HTTP/1.0 client may have sent none,
    // and a different one would be served by the wrong virtual host.
    let mut new_head = format!("{method} {path} {version}\r\nHost: {authority}\r\n").into_bytes();
    // The connection carries this one request to this host: the client's
    // next request on it may be for another host (another route, another
    // agent), so the service is asked to close after its answer and the
    // client opens a new connection. An upgrade keeps its `upgrade` token
    // beside `close` (after a 101 the connection is that protocol's; a
    // declined upgrade closes like any other answer).
    let upgrade = fields().any(|(name, l)| {
        name.eq_ignore_ascii_case("connection")
            && l.split_once(':').is_some_and(|(_, v)| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
    });
    // Fields the client's `Connection` names are for this hop only, and
    // go with it (RFC 9110 7.6.1); an upgrade's `Upgrade` goes on, and the
    // request's framing stays whatever it names (its body follows as is).
    let named: Vec<&str> = fields()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .filter_map(|(_, l)| l.split_once(':').map(|(_, v)| v))
        .flat_map(|v| v.split(',').map(str::trim))
        .filter(|t| {
            !t.is_empty()
                && !["upgrade", "content-length", "transfer-encoding"]
                    .iter()
                    .any(|keep| t.eq_ignore_ascii_case(keep))
        })
        .collect();
    for (name, l) in fields() {
        // Hop-by-hop headers meant for the proxy stay here; `Host` is
        // written above.
        let hop = [
            "proxy-connection",
            "proxy-authorization",
            "keep-alive",
            "connection",
            "host",
        ]
        .iter()
        .chain(named.iter())
        .any(|h| name.eq_ignore_ascii_case(h));
        if hop {
            continue;
        }
        new_head.extend_from_slice(l.as_bytes());
        new_head.extend_from_slice(b"\r\n");
    }
    new_head.extend_from_slice(if upgrade {
        b"Connection: upgrade, close\r\n"
    } else {
        b"Connection: close\r\n"
    });
    new_head.extend_from_slice(b"\r\n");
    new_head.extend_from_slice(&buf[end..]);
    Ok(Request {
        host,
        port,
        kind: Kind::HttpForward(new_head),
    })
}

/// Where the head in `buf` ends (just past its empty line), looking for
/// the end's line break from `from` on. Lines end with CRLF or, as RFC 9112
/// 2.2 lets a recipient accept, a bare LF (`printf ... | nc`).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(p) = buf.get(at..)?.iter().position(|b| *b == b'\n') {
        let lf = at + p;
        match (buf.get(lf + 1), buf.get(lf + 2)) {
            (Some(b'\n'), _) => return Some(lf + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(lf + 3),
            _ => at = lf + 1,
        }
    }
    None
}

fn split_authority(a: &str, default_port: u16) -> anyhow::Result<(String, u16)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (h, p) = rest.split_once(']').context("bad IPv6 authority")?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().context("bad port")?,
            None => default_port,
        };
        return Ok((h.to_owned(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_owned(), p.parse().context("bad port")?)),
        None => Ok((a.to_owned(), default_port)),
    }
}

/// Refuses a target that is not `HOST:PORT` in tether's grammar (an empty
/// name, port 0) here, with the reason, rather than after a round trip to
/// the server (or, offline, as "network unreachable").
async fn refuse_bad_target(tcp: &mut TcpStream, kind: &Kind, why: &str) {
    match kind {
        // RFC 1928 has no "bad address"; "host unreachable" is what it is.
        Kind::Socks5 | Kind::UdpAssociate => write_socks5_reply(tcp, SOCKS5_HOST_UNREACHABLE).await,
        Kind::HttpConnect(_) | Kind::HttpForward(_) => {
            write_http_error(
                tcp,
                "400 Bad Request",
                &format!("tether: bad_target: {why}\n"),
            )
            .await;
        }
    }
}

/// Tells the proxy client why its connection is refused, in its protocol.
async fn refuse(tcp: &mut TcpStream, kind: &Kind, code: OpenErrorCode, reason: &str) {
    match kind {
        Kind::Socks5 | Kind::UdpAssociate => {
            let rep = match code {
                OpenErrorCode::Forbidden => 2,
                OpenErrorCode::AgentOffline
                | OpenErrorCode::SessionLost
                | OpenErrorCode::NotHere
                | OpenErrorCode::GoingAway => 3,
                OpenErrorCode::Unreachable | OpenErrorCode::UnknownService => 4,
                OpenErrorCode::Refused => 5,
                OpenErrorCode::Timeout => 6,
                _ => 1,
            };
            write_socks5_reply(tcp, rep).await;
        }
        Kind::HttpConnect(_) | Kind::HttpForward(_) => {
            let status = match code.http_status() {
                400 => "400 Bad Request",
                403 => "403 Forbidden",
                404 => "404 Not Found",
                429 => "429 Too Many Requests",
                503 => "503 Service Unavailable",
                504 => "504 Gateway Timeout",
                _ => "502 Bad Gateway",
            };
            write_http_error(tcp, status, &format!("tether: {code}: {reason}\n")).await;
        }
    }
}

/// Most destinations one UDP association may talk to at once.
const MAX_ASSOCIATION_FLOWS: usize = 256;

/// Most datagram bytes one UDP association holds in its flows' queues
/// (while their streams open, or behind a slow tunnel); past it datagrams
/// are dropped, as a full network would. Without it, 256 flows of 256
/// queued 64 KiB datagrams were 4 GiB.
const ASSOCIATION_QUEUE_BYTES: usize = 4 << 20;

/// Most of those bytes one destination's queue holds: a few whose opens
/// hang (their agent offline) do not take the others' room.
const FLOW_QUEUE_BYTES: usize = 256 << 10;

/// Queued datagram bytes, up to a limit.
struct Budget {
    used: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl Budget {
    fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: Default::default(),
            max,
        })
    }

    /// Takes `n` bytes, if they fit.
    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u + n <= self.max).then_some(u + n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A datagram waiting in a flow's queue: its bytes count against the
/// association's and the flow's [`Budget`] until it is dropped (sent, or
/// thrown away with its queue).
struct Queued {
    datagram: bytes::Bytes,
    budgets: [Arc<Budget>; 2],
}

impl Queued {
    /// `datagram`, if both `budgets` (the association's, the flow's) have
    /// room for it.
    fn admit(datagram: &[u8], budgets: [&Arc<Budget>; 2]) -> Option<Queued> {
        let n = datagram.len();
        if !budgets[0].take(n) {
            return None;
        }
        if !budgets[1].take(n) {
            budgets[0].give(n);
            return None;
        }
        Some(Queued {
            datagram: bytes::Bytes::copy_from_slice(datagram),
            budgets: budgets.map(Arc::clone),
        })
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        for b in &self.budgets {
            b.give(self.datagram.len());
        }
    }
}

/// One destination of an association: its queue and the queue's budget.
struct AssociationFlow {
    tx: tokio::sync::mpsc::Sender<Queued>,
    budget: Arc<Budget>,
}

/// SOCKS5 UDP ASSOCIATE (RFC 1928 section 7): a relay socket for the client;
/// each destination it names becomes a UDP stream to the routed agent, which
/// resolves and sends. The association ends with its TCP connection.
async fn udp_associate(
    mut tcp: TcpStream,
    peer: SocketAddr,
    from_port: u16,
    router: &Router,
    session: crate::CurrentSession,
    idle: Duration,
) -> anyhow::Result<()> {
    // Canonical: on a dual-stack [::] listener an IPv4 client's address is
    // IPv4-mapped, which its IPv4 UDP socket cannot send to.
    let local_ip = tcp.local_addr()?.ip().to_canonical();
    let relay = Arc::new(tokio::net::UdpSocket::bind((local_ip, 0)).await?);
    let bound = relay.local_addr()?;
    let mut reply = vec![5, 0, 0];
    match bound {
        SocketAddr::V4(a) => {
            reply.push(1);
            reply.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            reply.push(4);
            reply.extend_from_slice(&a.ip().octets());
        }
    }
    reply.extend_from_slice(&bound.port().to_be_bytes());
    tcp.write_all(&reply).await?;
    tracing::info!(%peer, relay = %bound, "SOCKS5 UDP association open");

    // destination (as the client named it) -> sender into that flow's stream
    let mut flows: std::collections::HashMap<(String, u16), AssociationFlow> =
        std::collections::HashMap::new();
    let queued = Budget::new(ASSOCIATION_QUEUE_BYTES);
    // The client's socket: the port it named (0: whichever sends first).
    // Set once; every flow starts after it is, and sends its replies there.
    // Addresses compared in canonical form (see local_ip).
    let peer_ip = peer.ip().to_canonical();
    let mut client = (from_port != 0).then(|| SocketAddr::new(peer_ip, from_port));
    let mut warned_port = false;
    let mut no_route = std::collections::HashSet::new();
    let mut buf = vec![0u8; 65536];
    let mut tcp_probe = [0u8; 1];
    loop {
        tokio::select! {
            // The association lives as long as the TCP connection.
            r = tcp.read(&mut tcp_probe) => {
                if matches!(r, Ok(0) | Err(_)) { break; }
            }
            got = relay.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                // Only the client that asked for the association may use
                // it: its address, and the port it named in its request
                // (RFC 1928 section 7), or, if it named none, the port of
                // its first well-formed datagram. Another program on its
                // host (a VM or a container behind the same address) may
                // neither send with its credential nor take its replies.
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                if from.ip() != peer_ip {
                    continue;
                }
                let Some((mut host, port, payload)) = parse_udp_header(&buf[..n]) else { continue };
                drop_root_dot(&mut host);
                match client {
                    Some(c) if c != from => {
                        if !warned_port {
                            warned_port = true;
                            tracing::info!(%peer, relay = %bound, client = %c, %from, "udp: a datagram from another port of the client's address; dropped (an association serves one client socket)");
                        }
                        continue;
                    }
                    Some(_) => {}
                    None => client = Some(from),
                }
                let key = (host.clone(), port);
                // A flow that ended (idle) makes way for a new one.
                if flows.get(&key).is_some_and(|f| f.tx.is_closed()) {
                    flows.remove(&key);
                }
                if let Some(f) = flows.get(&key) {
                    // Past either budget, or with a full queue, it is dropped.
                    if let Some(d) = Queued::admit(payload, [&queued, &f.budget]) {
                        let _ = f.tx.try_send(d);
                    }
                    continue;
                }
                if flows.len() >= MAX_ASSOCIATION_FLOWS {
                    flows.retain(|_, f| !f.tx.is_closed()); // forget idle-ended flows
                    if flows.len() >= MAX_ASSOCIATION_FLOWS {
                        continue;
                    }
                }
                let Some(agent) = router.agent_for(&host).map(str::to_owned) else {
                    // Said once per destination (up to a bound), not per datagram.
                    if no_route.len() < MAX_ASSOCIATION_FLOWS && no_route.insert(host.clone()) {
                        tracing::info!(%peer, %host, "udp: no route to an agent for this host (--route PATTERN=AGENT or --default-agent); its datagrams are dropped");
                    }
                    continue;
                };
                // Datagrams that come while the flow opens (on a fresh
                // session if this one is being replaced) wait in its queue.
                let budget = Budget::new(FLOW_QUEUE_BYTES);
                let Some(datagram) = Queued::admit(payload, [&queued, &budget]) else {
                    continue; // the association's queues are full: drop
                };
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                let _ = tx.try_send(datagram);
                flows.insert(key, AssociationFlow { tx, budget });
                tokio::spawn(association_flow(
                    session.clone(),
                    format!("{agent}/{}", host_port(&host, port)),
                    udp_header(&host, port),
                    rx,
                    (relay.clone(), from),
                    idle,
                ));
            }
        }
    }
    tracing::info!(%peer, relay = %bound, "SOCKS5 UDP association closed");
    Ok(())
}

/// A fully qualified name (`kubernetes.default.svc.cluster.local.`, as some
/// write it to skip the search list) is the same name here, without its
/// root dot: the agent's own lookup decides. (`.` or `a..` stay as they
/// are, for the target check to refuse.)
fn drop_root_dot(host: &mut String) {
    if let Some(name) = host.strip_suffix('.') {
        if !name.is_empty() && !name.ends_with('.') {
            host.pop();
        }
    }
}

/// Relays one destination of an association.
async fn association_flow(
    session: crate::CurrentSession,
    target: String,
    header: Vec<u8>,
    mut rx: tokio::sync::mpsc::Receiver<Queued>,
    (relay, client): (Arc<tokio::net::UdpSocket>, SocketAddr),
    idle: Duration,
) {
    let stream = match session
        .open(Target {
            kind: tether_proto::TargetKind::Udp,
            address: target.clone(),
        })
        .await
    {
        Ok(s) => s,
        Err(tether_net::Refusal { code, reason }) => {
            let hold = tether_net::udp::REFUSED_HOLD;
            tracing::info!(%target, %code, "udp association flow refused: {reason}; its datagrams are dropped for {hold:?}");
            // As a forward's flow: without the hold, every datagram to a
            // refused destination would start an open (and a log line).
            let until = tokio::time::Instant::now() + hold;
            while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {}
            return;
        }
    };
    let (mut r, mut w) = stream.split();
    let mut dec = tether_proto::datagram::Decoder::default();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break };
                last = Instant::now();
                if let Ok(rec) = tether_proto::datagram::encode(&d.datagram) {
                    if w.try_write(rec).is_err() { break; }
                }
            }
            chunk = r.read() => {
                let Ok(Some(chunk)) = chunk else { break };
                last = Instant::now();
                dec.push(&chunk);
                loop {
                    let d = match dec.next_datagram() {
                        Ok(Some(d)) => d,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(%target, "bad datagram record: {e}");
                            return;
                        }
                    };
                    let mut out = header.clone();
                    out.extend_from_slice(&d);
                    let _ = relay.send_to(&out, client).await;
                }
            }
            _ = tokio::time::sleep_until((last + idle).into()) => break,
        }
    }
}

/// Parses a SOCKS5 UDP request header into host, port and payload;
/// fragments (FRAG != 0) are dropped. Public for the fuzz target.
pub fn parse_udp_header(b: &[u8]) -> Option<(String, u16, &[u8])> {
    if b.len() < 4 || b[2] != 0 {
        return None;
    }
    let (host, rest) = match b[3] {
        1 if b.len() >= 10 => (Ipv4Addr::new(b[4], b[5], b[6], b[7]).to_string(), &b[8..]),
        3 if b.len() >= 5 => {
            let len = b[4] as usize;
            let name = b.get(5..5 + len)?;
            (String::from_utf8(name.to_vec()).ok()?, &b[5 + len..])
        }
        4 if b.len() >= 22 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[4..20]);
            (Ipv6Addr::from(a).to_string(), &b[20..])
        }
        _ => return None,
    };
    if rest.len() < 2 {
        return None;
    }
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    Some((host, port, &rest[2..]))
}

/// The SOCKS5 UDP header naming `host:port`, for answers to the client.
fn udp_header(host: &str, port: u16) -> Vec<u8> {
    let mut h = vec![0, 0, 0];
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        h.push(1);
        h.extend_from_slice(&ip.octets());
    } else if let Ok(ip) = host.parse::<Ipv6Addr>() {
        h.push(4);
        h.extend_from_slice(&ip.octets());
    } else {
        h.push(3);
        h.push(host.len().min(255) as u8);
        h.extend_from_slice(&host.as_bytes()[..host.len().min(255)]);
    }
    h.extend_from_slice(&port.to_be_bytes());
    h
}

#[cfg(test)]
mod udp_tests {
    use super::*;

    #[test]
    fn udp_headers_roundtrip() {
        for host in ["10.1.2.3", "::1", "dns.kube-system.svc.cluster.local"] {
            let mut d = udp_header(host, 53);
            d.extend_from_slice(b"payload");
            let (h, p, rest) = parse_udp_header(&d).unwrap();
            assert_eq!((h.as_str(), p, rest), (host, 53, &b"payload"[..]));
        }
        assert!(
            parse_udp_header(&[0, 0, 1, 1]).is_none(),
            "fragments are dropped"
        );
        assert!(parse_udp_header(&[0, 0, 0, 3, 200, b'a']).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client gets back for `request` when the handshake fails, and
    /// the error logged.
    async fn refused(request: &[u8]) -> (Vec<u8>, String) {
        let (mut client, mut proxy) = tokio::io::duplex(64 * 1024);
        client.write_all(request).await.unwrap();
        let e = read_request(&mut proxy, None).await.expect_err("refused");
        drop(proxy);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (answer, format!("{e:#}"))
    }

    /// An absolute-form request goes on in origin form, asking the service
    /// to close after its answer (an upgrade keeps its token beside it),
    /// without the headers meant for the proxy.
    #[tokio::test]
    async fn a_forwarded_request_asks_for_close() {
        for (connection, sent) in [
            ("keep-alive", "Connection: close\r\n"),
            ("keep-alive, Upgrade", "Connection: upgrade, close\r\n"),
        ] {
            let head = format!(
                "GET http://web.test:8080/x HTTP/1.1\r\nHost: web.test:8080\r\n\
                 Connection: {connection}\r\nProxy-Authorization: Basic eA==\r\nKeep-Alive: 5\r\n\r\n"
            );
            let mut io = tokio::io::join(head.as_bytes(), tokio::io::sink());
            let req = read_request(&mut io, None).await.unwrap();
            let Kind::HttpForward(out) = req.kind else {
                panic!("{:?}", req.kind)
            };
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("GET /x HTTP/1.1\r\nHost: web.test:8080\r\n{sent}\r\n")
            );
        }
    }

    /// A handshake that cannot be served is answered in its own protocol,
    /// with the reason, before the connection closes: never a bare close.
    #[tokio::test]
    async fn bad_handshakes_get_the_protocols_own_refusal() {
        for (request, reason) in [
            (&b"CONNECT db:abc HTTP/1.1\r\n\r\n"[..], "CONNECT"),
            (b"GET http://h:99999/ HTTP/1.1\r\n\r\n", "h:99999"),
            (b"GET /x HTTP/1.1\r\n\r\n", "use CONNECT"),
            (b"GET http://h/ HTTP/1.1\r\nx: \xff\r\n\r\n", "not UTF-8"),
        ] {
            let (answer, e) = refused(request).await;
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
            assert!(text.contains(reason) && e.contains(reason), "{text} / {e}");
        }
        // SOCKS5: the method reply, then the request's refusal with the
        // RFC 1928 code (1 general failure, 7 command, 8 address type).
        for (request, code) in [
            (
                &[5u8, 1, 0, 4, 1, 0, 1, 127, 0, 0, 1, 0, 80][..],
                SOCKS5_GENERAL_FAILURE,
            ),
            (&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80], SOCKS5_COMMAND),
            (&[5, 1, 0, 5, 1, 0, 9], SOCKS5_ADDRESS_TYPE),
            (
                &[5, 1, 0, 5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80],
                SOCKS5_HOST_UNREACHABLE,
            ),
        ] {
            let (answer, e) = refused(request).await;
            assert_eq!(&answer[..2], &[5, 0], "{e}");
            assert_eq!(&answer[2..4], &[5, code], "{e}");
        }
    }

    /// Headers the client's `Connection` names stay with this hop (RFC
    /// 9110 7.6.1); `OPTIONS` for a whole server goes on as `OPTIONS *`.
    #[tokio::test]
    async fn connection_options_stay_and_options_asks_for_star() {
        let out = forwarded(
            b"GET http://h/ HTTP/1.1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-End: kept\r\n\r\n",
        )
        .await;
        assert!(!out.contains("X-Hop"), "{out}");
        assert!(out.contains("X-End: kept\r\n"), "{out}");
        // The request's framing is never a connection option.
        let out = forwarded(
            b"POST http://h/ HTTP/1.1\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await;
        assert!(out.contains("Content-Length: 2\r\n"), "{out}");
        let out = forwarded(b"OPTIONS http://h:8001 HTTP/1.1\r\n\r\n").await;
        assert!(
            out.starts_with("OPTIONS * HTTP/1.1\r\nHost: h:8001\r\n"),
            "{out}"
        );
        let out = forwarded(b"OPTIONS http://h:8001/x HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("OPTIONS /x HTTP/1.1\r\n"), "{out}");
    }

    /// The rewritten head of an absolute-form request.
    async fn forwarded(head: &[u8]) -> String {
        let mut io = tokio::io::join(head, tokio::io::sink());
        let req = read_request(&mut io, None).await.unwrap();
        let Kind::HttpForward(out) = req.kind else {
            panic!("{:?}", req.kind)
        };
        String::from_utf8(out).unwrap()
    }

    /// The target's authority is the `Host` the service sees (RFC 9112
    /// 3.2.2), whatever the client sent; an HTTP/1.0 client's bare-LF head
    /// and a scheme in capitals are read too.
    #[tokio::test]
    async fn a_forwarded_request_carries_the_target_s_host() {
        assert_eq!(
            forwarded(b"GET HTTP://u:p@web.test:8080?q=1 HTTP/1.0\nHost: elsewhere\nAccept: */*\n\nbody").await,
            "GET /?q=1 HTTP/1.0\r\nHost: web.test:8080\r\nAccept: */*\r\nConnection: close\r\n\r\nbody"
        );
        assert_eq!(
            forwarded(b"GET http://[::1]/a/b HTTP/1.0\r\n\r\n").await,
            "GET /a/b HTTP/1.0\r\nHost: [::1]\r\nConnection: close\r\n\r\n"
        );
        let (answer, e) = refused(b"GET https://h/ HTTP/1.1\r\n\r\n").await;
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400 "));
        assert!(e.contains("CONNECT"), "{e}");
    }

    /// With a password set, SOCKS5 asks for it (RFC 1929) and HTTP wants it
    /// in `Proxy-Authorization: Basic` (else 407); the right one passes, a
    /// wrong one or none is refused in the protocol's own way.
    #[tokio::test]
    async fn a_password_is_asked_for_when_one_is_set() {
        let auth = ProxyAuth::parse("alice:s3cret:x").unwrap();
        let exchange = |request: Vec<u8>| {
            let auth = auth.clone();
            async move {
                let (mut client, mut proxy) = tokio::io::duplex(64 * 1024);
                client.write_all(&request).await.unwrap();
                let r = read_request(&mut proxy, Some(&auth)).await;
                drop(proxy);
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.unwrap();
                (
                    r.map(|r| (r.host, r.port)).map_err(|e| format!("{e:#}")),
                    answer,
                )
            }
        };
        let socks = |user: &[u8], password: &[u8]| {
            let mut r = vec![5, 2, 0, 2, 1, user.len() as u8];
            r.extend_from_slice(user);
            r.push(password.len() as u8);
            r.extend_from_slice(password);
            r.extend_from_slice(&[5, 1, 0, 3, 2, b'd', b'b', 0x15, 0x38]);
            r
        };
        let (r, answer) = exchange(socks(b"alice", b"s3cret:x")).await;
        assert_eq!(r, Ok(("db".to_owned(), 5432)));
        assert_eq!(answer, [5, 2, 1, 0]);
        let (r, answer) = exchange(socks(b"alice", b"s3cret")).await;
        assert!(r.unwrap_err().contains("wrong"));
        assert_eq!(answer, [5, 2, 1, 1]);
        // A client that offers no user name and password method.
        let (r, answer) = exchange(vec![5, 1, 0]).await;
        assert!(r.unwrap_err().contains("socks5h://USER:PASSWORD@"));
        assert_eq!(answer, [5, 0xff]);

        use base64::Engine;
        let basic = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let connect = |auth: Option<String>| {
            let line = auth.map_or(String::new(), |a| format!("Proxy-Authorization: {a}\r\n"));
            format!("CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n{line}\r\n").into_bytes()
        };
        let (r, answer) =
            exchange(connect(Some(format!("basic {}", basic("alice:s3cret:x"))))).await;
        assert_eq!(r, Ok(("db".to_owned(), 5432)));
        assert!(answer.is_empty());
        let right = format!("Basic {}", basic("alice:s3cret:x"));
        let two = format!(
            "Basic {}\r\nProxy-Authorization: {right}",
            basic("alice:guess")
        );
        for wrong in [
            None,
            Some(format!("Basic {}", basic("alice:nope"))),
            Some("Bearer x".into()),
            // One guess per request, not one per header.
            Some(two),
        ] {
            let (r, answer) = exchange(connect(wrong)).await;
            assert!(r.is_err());
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 407 "), "{text}");
            assert!(text.contains("proxy-authenticate: Basic realm="), "{text}");
        }
        for bad in ["nocolon", ":p", "u:", &format!("u:{}", "p".repeat(256))] {
            assert!(ProxyAuth::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    /// A head's end is found across reads of any size, by CRLF or bare LF.
    #[test]
    fn the_head_ends_at_its_empty_line() {
        for head in [
            &b"A\r\nB: c\r\n\r\n"[..],
            b"A\nB: c\n\n",
            b"A\nB: c\r\n\n",
            b"A\r\n\r\n",
        ] {
            let mut searched = 0;
            let mut end = None;
            for n in 1..=head.len() {
                end = head_end(&head[..n], searched);
                if end.is_some() {
                    break;
                }
                searched = n.saturating_sub(2);
            }
            assert_eq!(end, Some(head.len()), "{:?}", String::from_utf8_lossy(head));
        }
        assert_eq!(head_end(b"A\r\nB\r\n", 0), None);
        assert_eq!(head_end(b"A\r\n\r\nrest", 0), Some(5));
    }

    /// Neither SOCKS5 nor HTTP: a SOCKS4 client gets SOCKS4's refusal at
    /// once, a TLS client a clear log line; neither waits for the timeout.
    #[tokio::test]
    async fn other_protocols_are_told_at_once() {
        let (answer, e) = refused(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await;
        assert_eq!(answer, [0, 91, 0, 0, 0, 0, 0, 0]);
        assert!(e.contains("SOCKS4"), "{e}");
        let (answer, e) = refused(&[0x16, 3, 1, 0, 5]).await;
        assert!(answer.is_empty());
        assert!(e.contains("TLS"), "{e}");
        // An empty line before an HTTP request is not "another protocol".
        assert_eq!(
            forwarded(b"\r\nGET http://h/ HTTP/1.1\r\n\r\n").await,
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        );
    }

    /// An association's queues hold at most [`ASSOCIATION_QUEUE_BYTES`],
    /// one flow's [`FLOW_QUEUE_BYTES`]; a datagram that leaves gives its
    /// room back to both.
    #[test]
    fn an_association_s_queues_are_bounded_in_bytes() {
        let association = Budget::new(ASSOCIATION_QUEUE_BYTES);
        let big = vec![0u8; 65_000];
        let fill = |flow: &Arc<Budget>| -> Vec<Queued> {
            std::iter::from_fn(|| Queued::admit(&big, [&association, flow]))
                .take(1000)
                .collect()
        };
        let stuck = Budget::new(FLOW_QUEUE_BYTES);
        let first = fill(&stuck);
        assert_eq!(first.len(), FLOW_QUEUE_BYTES / big.len());
        let flows: Vec<Arc<Budget>> = (0..=ASSOCIATION_QUEUE_BYTES / FLOW_QUEUE_BYTES)
            .map(|_| Budget::new(FLOW_QUEUE_BYTES))
            .collect();
        let rest: Vec<Vec<Queued>> = flows.iter().map(fill).collect();
        let held = first.len() + rest.iter().map(Vec::len).sum::<usize>();
        assert_eq!(held, ASSOCIATION_QUEUE_BYTES / big.len());
        // Refused by the association: the flow's budget is not charged.
        let last = flows.last().unwrap();
        let before = last.used.load(std::sync::atomic::Ordering::Relaxed);
        assert!(before < FLOW_QUEUE_BYTES - big.len(), "room in the flow");
        assert!(Queued::admit(&big, [&association, last]).is_none());
        assert_eq!(last.used.load(std::sync::atomic::Ordering::Relaxed), before);
        drop((first, rest));
        assert_eq!(
            association.used.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(stuck.used.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(Queued::admit(&big, [&association, &stuck]).is_some());
    }

    #[test]
    fn routing_rules() {
        let r = Router::new(
            &[
                "*.prod.svc.cluster.local=prod".into(),
                "10.1.0.0/16=staging".into(),
            ],
            Some("dev".into()),
        )
        .unwrap();
        assert_eq!(r.agent_for("grafana.prod.svc.cluster.local"), Some("prod"));
        assert_eq!(r.agent_for("GRAFANA.Prod.svc.cluster.local"), Some("prod"));
        assert_eq!(r.agent_for("10.1.2.3"), Some("staging"));
        assert_eq!(r.agent_for("10.2.2.3"), Some("dev"));
        assert_eq!(r.agent_for("::ffff:10.1.2.3"), Some("staging"));
        let strict = Router::new(&["*.x=a".into()], None).unwrap();
        assert_eq!(strict.agent_for("y"), None);
        assert!(Router::new(&["nope".into()], None).is_err());
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("h:8080", 80).unwrap(), ("h".into(), 8080));
        assert_eq!(split_authority("h", 80).unwrap(), ("h".into(), 80));
        assert_eq!(split_authority("[::1]:22", 80).unwrap(), ("::1".into(), 22));
        assert_eq!(host_port("::1", 22), "[::1]:22");
    }
}
