//! One stream the server opened: its target checked against the agent's
//! allow-list, the service dialed (TCP, TLS or a UDP flow), the bytes
//! spliced, and every refusal answered, counted and logged.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_net::splice::{socket_halves, splice, ChunkWrite, IoReader, IoWriter};
use tether_net::Incoming;
use tether_net::Refusal;
use tether_proto::{OpenErrorCode, TargetKind};
use tokio::io::WriteHalf;
use tokio::net::TcpStream;

use crate::tls_end::{EndWithoutNotify, RecordEdges};
use crate::{AgentStats, Discovered, NameResolver, Resolved, TargetPolicy};

/// The OPEN_ERR code a failed dial is answered with.
fn dial_error_code(e: &io::Error) -> OpenErrorCode {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => OpenErrorCode::Refused,
        io::ErrorKind::TimedOut => OpenErrorCode::Timeout,
        _ => OpenErrorCode::Unreachable,
    }
}

/// Counts, logs and answers a failed open: "refused" when the policy said
/// no, "failed" when the service could not be reached.
fn refuse(stats: &AgentStats, inc: Incoming, code: OpenErrorCode, reason: &str) {
    stats.open_errors.fetch_add(1, Ordering::Relaxed);
    let (id, target) = (inc.id(), inc.target().clone());
    let by_policy = matches!(
        code,
        OpenErrorCode::Forbidden | OpenErrorCode::UnknownService | OpenErrorCode::BadTarget
    );
    if by_policy {
        tracing::info!(stream = %id, target = %target, %code, "open refused: {reason}");
    } else {
        tracing::info!(stream = %id, target = %target, %code, "open failed: {reason}");
    }
    inc.reject(code, reason);
}

/// The exact addresses to dial for a target the policy let through: a
/// named service's address as the system resolves it, or a raw target's
/// addresses from the agent's resolver once every one passed the policy.
async fn dial_addresses(
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
) -> Result<Vec<SocketAddr>, Refusal> {
    let found = match (&resolved.raw, resolved.host_port()) {
        (Some(raw), _) => resolver.lookup(&raw.host, raw.port).await,
        (None, Some((host, port))) => resolver.lookup_system(host, port).await,
        // Not reached: a service's address was checked when the config loaded.
        (None, None) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address is not HOST:PORT",
        )),
    };
    let addrs: Vec<SocketAddr> = found.map_err(|e| {
        Refusal::new(
            OpenErrorCode::Unreachable,
            format!("cannot resolve {}: {e}", resolved.address),
        )
    })?;
    match &resolved.raw {
        Some(raw) => policy.check_addresses(raw, &addrs)?,
        None if addrs.is_empty() => {
            return Err(Refusal::new(
                OpenErrorCode::Unreachable,
                format!("{} resolves to no address", resolved.address),
            ))
        }
        None => {}
    }
    Ok(addrs)
}

/// How long a dial waits on one address before it also tries the next
/// (RFC 8305's connection attempt delay): an address that drops packets (a
/// black-holed IPv6 route, a dead pod IP still in a headless Service) costs
/// a quarter second, not the whole dial timeout.
const NEXT_ADDRESS_DELAY: Duration = Duration::from_millis(250);

/// Connects to the first of `addrs` that answers: the next address is tried
/// when one fails or has not answered within [`NEXT_ADDRESS_DELAY`], while
/// the earlier attempts go on; the first connection made wins and the
/// others are dropped. With every attempt failed, the last error.
async fn connect_first(addrs: &[SocketAddr]) -> io::Result<(TcpStream, SocketAddr)> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    // The usual case (a Service's one cluster IP, a pod's one address):
    // nothing to race.
    if let [addr] = addrs {
        return Ok((TcpStream::connect(*addr).await?, *addr));
    }
    let dial = |addr: SocketAddr| async move { (addr, TcpStream::connect(addr).await) };
    let mut next = addrs.iter().copied();
    let mut dials = FuturesUnordered::new();
    let mut last = None;
    loop {
        if dials.is_empty() {
            match next.next() {
                Some(addr) => dials.push(dial(addr)),
                None => return Err(last.unwrap_or_else(|| io::Error::other("no address"))),
            }
        }
        tokio::select! {
            Some((addr, result)) = dials.next() => match result {
                Ok(tcp) => return Ok((tcp, addr)),
                Err(e) => {
                    last = Some(e);
                    if let Some(addr) = next.next() {
                        dials.push(dial(addr));
                    }
                }
            },
            () = tokio::time::sleep(NEXT_ADDRESS_DELAY), if next.len() > 0 => {
                if let Some(addr) = next.next() {
                    dials.push(dial(addr));
                }
            }
        }
    }
}

/// Resolves and connects by `deadline` to the checked addresses
/// ([`connect_first`]): the connection and the address that answered. When
/// none answers, the name's remembered addresses are forgotten, so the next
/// open looks it up again.
async fn connect_tcp(
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
    dial_timeout: Duration,
    deadline: tokio::time::Instant,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let dial = async {
        let addrs = dial_addresses(policy, resolver, resolved).await?;
        match connect_first(&addrs).await {
            Ok((tcp, addr)) => {
                tether_net::keepalive::keep_alive(&tcp);
                Ok((tcp, addr))
            }
            Err(e) => Err(Refusal::new(
                dial_error_code(&e),
                format!(
                    "dialing {}: {e} ({})",
                    resolved.address,
                    address_list(&addrs)
                ),
            )),
        }
    };
    let result = match tokio::time::timeout_at(deadline, dial).await {
        Ok(r) => r,
        Err(_) => Err(Refusal::new(
            OpenErrorCode::Timeout,
            format!(
                "{} did not answer within {dial_timeout:?} (the agent's dial_timeout_ms)",
                resolved.address
            ),
        )),
    };
    if let (Err(_), Some((host, _))) = (&result, resolved.host_port()) {
        resolver.forget(host);
    }
    result
}

/// What `target` means here: a configured service, then a discovered one
/// (dialed as the raw target it names, so the allow list decides), then a
/// raw `host:port`.
///
/// A discovered name is complete (`NAME.NS.svc.CLUSTER_DOMAIN`) and is
/// looked up as such (a trailing dot): in a pod (`ndots:5`) the resolver
/// would otherwise try it under every search domain first, several wasted
/// queries per lookup, and a wildcard record in a node's search domain
/// would answer with an address the allow list never named.
fn resolve_target(
    policy: &TargetPolicy,
    discovered: &Discovered,
    target: &str,
) -> Result<Resolved, Refusal> {
    if !policy.has_service(target) {
        if let Some(found) = discovered.get(target) {
            return match policy.resolve(&found.address) {
                Ok(mut r) => {
                    r.service = Some(target.to_owned());
                    if let Some(raw) = &mut r.raw {
                        if raw.host.parse::<std::net::IpAddr>().is_err() && !raw.host.ends_with('.')
                        {
                            raw.host.push('.');
                        }
                    }
                    Ok(r)
                }
                Err(Refusal { code, reason }) => Err(Refusal::new(
                    code,
                    format!(
                        "discovered service {target} ({}, {}): {reason}",
                        found.source, found.address
                    ),
                )),
            };
        }
    }
    policy.resolve(target)
}

pub(crate) async fn serve_stream(
    policy: Arc<TargetPolicy>,
    discovered: Arc<Discovered>,
    resolver: Arc<NameResolver>,
    stats: Arc<AgentStats>,
    dial_timeout: Duration,
    udp_idle: Duration,
    mut inc: Incoming,
) {
    let target = inc.target().clone();
    let id = inc.id();
    // The session refuses unknown kinds before they get here; kept for a
    // kind the session learns before this code does.
    if !matches!(target.kind, TargetKind::Tcp | TargetKind::Udp) {
        refuse(&stats, inc, OpenErrorCode::BadTarget, "unknown stream kind");
        return;
    }
    let resolved = match resolve_target(&policy, &discovered, &target.address) {
        Ok(r) => r,
        Err(Refusal { code, reason }) => return refuse(&stats, inc, code, &reason),
    };
    let started = Instant::now();
    if target.kind == TargetKind::Udp {
        // Boxed, like the dial below: a TCP stream's task should not carry
        // the UDP flow's state for its whole life.
        return Box::pin(open_udp(
            stats,
            &policy,
            &resolver,
            &resolved,
            inc,
            dial_timeout,
            udp_idle,
        ))
        .await;
    }
    // Boxed: the dial's state lives only while dialing, the task's for the
    // stream's whole life. An open the opener gives up on (RST) stops its
    // dial: its slot is free again at once, so a client that opens and
    // cancels in a loop must not pile up dials (and service connections)
    // beyond the stream caps.
    let dial = Box::pin(dial_service(&policy, &resolver, &resolved, dial_timeout));
    let (io, peer) = tokio::select! {
        dialed = dial => match dialed {
            Ok(x) => x,
            Err(Refusal { code, reason }) => return refuse(&stats, inc, code, &reason),
        },
        () = inc.cancelled() => {
            tracing::debug!(stream = %id, target = %target, "open cancelled while dialing");
            return;
        }
    };
    let stream = match inc.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(stream = %id, "stream gone before accept: {e}");
            return;
        }
    };
    stats.streams_total.fetch_add(1, Ordering::Relaxed);
    stats.live_streams.fetch_add(1, Ordering::Relaxed);
    // One info line per stream, at its end (below); the server's admin API
    // lists the streams that are live.
    tracing::debug!(stream = %id, target = %target, address = %resolved.address, %peer, tls = resolved.tls.is_some(), "stream open");
    let (sr, sw) = stream.split();
    let report = match io {
        ServiceIo::Tls(tls) => {
            let socket = socket2::SockRef::from(tls.get_ref().0.get_ref()).try_clone();
            let clean_close = tls.get_ref().0.clean_close();
            let (tr, tw) = tokio::io::split(*tls);
            let tw = TlsServiceWriter {
                io: IoWriter(tw),
                socket: socket.ok(),
            };
            splice(
                sr,
                sw,
                IoReader::new(EndWithoutNotify::new(tr, clean_close)),
                tw,
            )
            .await
        }
        ServiceIo::Plain(tcp) => {
            let (tr, tw) = socket_halves(tcp);
            splice(sr, sw, tr, tw).await
        }
    };
    stats.live_streams.fetch_sub(1, Ordering::Relaxed);
    let ms = started.elapsed().as_millis() as u64;
    match report.error {
        None => {
            tracing::info!(stream = %id, target = %target, %peer, bytes_in = report.a_to_b, bytes_out = report.b_to_a, duration_ms = ms, "stream closed")
        }
        Some(e) => {
            tracing::info!(stream = %id, target = %target, %peer, bytes_in = report.a_to_b, bytes_out = report.b_to_a, duration_ms = ms, "stream ended with error: {e}")
        }
    }
}

/// The write half of a TLS connection to a service. A failed stream resets
/// it (RST), as it does a plain one (PROTOCOL.md 9.2): closed with a FIN, a
/// cut-off upload whose end is the connection's end would look complete to
/// a service that takes a missing `close_notify` for the end (Go's
/// `crypto/tls` does).
struct TlsServiceWriter {
    io: IoWriter<WriteHalf<TlsService>>,
    /// A second descriptor of the connection's socket: the TLS stream owns
    /// the first, behind the split's lock. `None` when it could not be had
    /// (out of descriptors): a failure then ends with a FIN.
    socket: Option<socket2::Socket>,
}

impl ChunkWrite for TlsServiceWriter {
    fn poll_write_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
        chunk: &mut bytes::Bytes,
    ) -> std::task::Poll<io::Result<()>> {
        self.io.poll_write_chunk(cx, chunk)
    }
    fn poll_finish(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        self.io.poll_finish(cx)
    }
    /// `SO_LINGER` of zero belongs to the socket, not the descriptor: the
    /// last close (the TLS stream's or this one's, when the splice drops
    /// both) sends RST and drops what is unsent.
    fn abort(&mut self, _code: tether_proto::ResetCode, _reason: &str) {
        if let Some(socket) = &self.socket {
            let _ = socket.set_linger(Some(Duration::ZERO));
        }
    }
}

/// A TLS connection to a service, over its socket as [`RecordEdges`] reads it.
type TlsService = tokio_rustls::client::TlsStream<RecordEdges<TcpStream>>;

/// The service's end of a TCP stream: the socket, or TLS over it.
enum ServiceIo {
    Plain(TcpStream),
    Tls(Box<TlsService>),
}

/// Dials a TCP service (TLS towards it included, within one dial timeout):
/// its connection and peer address (for the log).
async fn dial_service(
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
    dial_timeout: Duration,
) -> Result<(ServiceIo, SocketAddr), Refusal> {
    // One deadline for the connection and the TLS handshake: the server
    // gives up on an open after its own timeout, and a reason that comes
    // later reaches nobody.
    let deadline = tokio::time::Instant::now() + dial_timeout;
    let (tcp, peer) = connect_tcp(policy, resolver, resolved, dial_timeout, deadline).await?;
    let _ = tcp.set_nodelay(true);
    let Some(t) = &resolved.tls else {
        return Ok((ServiceIo::Plain(tcp), peer));
    };
    let hs = t
        .connector
        .connect(t.server_name.clone(), RecordEdges::new(tcp));
    match tokio::time::timeout_at(deadline, hs).await {
        Ok(Ok(s)) => match t.require_alpn {
            Some(want) if s.get_ref().1.alpn_protocol() != Some(want) => Err(Refusal::new(
                OpenErrorCode::Unreachable,
                format!(
                    "TLS to {}: the service did not agree to {} (ALPN); is it an HTTP/2 server? (set http2 = false for HTTP/1.1)",
                    resolved.address,
                    String::from_utf8_lossy(want)
                ),
            )),
            _ => Ok((ServiceIo::Tls(Box::new(s)), peer)),
        },
        Ok(Err(e)) => Err(Refusal::new(
            OpenErrorCode::Unreachable,
            format!("TLS to {}: {e}", resolved.address),
        )),
        Err(_) => Err(Refusal::new(
            OpenErrorCode::Timeout,
            format!(
                "TLS to {} did not finish within the dial timeout ({dial_timeout:?}, connecting included)",
                resolved.address
            ),
        )),
    }
}

/// Resolves a UDP service and serves the flow, or refuses the open.
async fn open_udp(
    stats: Arc<AgentStats>,
    policy: &TargetPolicy,
    resolver: &NameResolver,
    resolved: &Resolved,
    mut inc: Incoming,
    dial_timeout: Duration,
    udp_idle: Duration,
) {
    let resolving = tokio::time::timeout(dial_timeout, dial_addresses(policy, resolver, resolved));
    let found = tokio::select! {
        found = resolving => found,
        () = inc.cancelled() => return,
    };
    match found {
        Ok(Ok(addrs)) => serve_udp(stats, &resolved.address, &addrs, inc, udp_idle).await,
        Ok(Err(Refusal { code, reason })) => refuse(&stats, inc, code, &reason),
        Err(_) => {
            let reason = format!("resolving {} took over {dial_timeout:?}", resolved.address);
            refuse(&stats, inc, OpenErrorCode::Timeout, &reason);
        }
    }
}

/// The addresses a dial tried, for its refusal: the cause comes first and
/// the list is cut, since a reason is clipped at 1 KiB and a headless
/// Service may have dozens of pods.
fn address_list(addrs: &[SocketAddr]) -> String {
    const SHOWN: usize = 4;
    let shown: Vec<String> = addrs.iter().take(SHOWN).map(ToString::to_string).collect();
    match addrs.len().checked_sub(SHOWN) {
        Some(more) if more > 0 => format!("tried {} and {more} more", shown.join(", ")),
        _ => format!("tried {}", shown.join(", ")),
    }
}

/// A UDP socket connected to `addr`, or the refusal to answer with.
async fn connect_udp(addr: SocketAddr) -> Result<tokio::net::UdpSocket, (OpenErrorCode, String)> {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| (OpenErrorCode::Internal, format!("udp socket: {e}")))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| (OpenErrorCode::Unreachable, format!("udp {addr}: {e}")))?;
    Ok(socket)
}

/// Connects a UDP socket to the first of the service's checked addresses
/// that this host can reach (an IPv6 address fails at once where IPv6 is
/// off), and serves the flow.
async fn serve_udp(
    stats: Arc<AgentStats>,
    address: &str,
    addrs: &[SocketAddr],
    inc: Incoming,
    idle: Duration,
) {
    let id = inc.id();
    let mut failed = None;
    let mut connected = None;
    for &addr in addrs {
        match connect_udp(addr).await {
            Ok(socket) => {
                connected = Some((socket, addr));
                break;
            }
            Err(e) => failed = Some(e),
        }
    }
    let Some((socket, addr)) = connected else {
        let (code, reason) = failed.unwrap_or_else(|| {
            (
                OpenErrorCode::Unreachable,
                format!("{address} resolves to no address"),
            )
        });
        return refuse(&stats, inc, code, &reason);
    };
    let Ok(stream) = inc.accept() else { return };
    stats.streams_total.fetch_add(1, Ordering::Relaxed);
    stats.live_streams.fetch_add(1, Ordering::Relaxed);
    stats.udp.flows.fetch_add(1, Ordering::Relaxed);
    stats.udp.flows_total.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(stream = %id, %address, peer = %addr, "udp flow open");
    tether_net::udp::serve_flow(stream, socket, idle, &stats.udp).await;
    stats.udp.flows.fetch_sub(1, Ordering::Relaxed);
    stats.live_streams.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(stream = %id, %address, "udp flow closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Agent, AgentConfig};

    #[test]
    fn an_address_list_is_cut_after_four() {
        let addrs: Vec<SocketAddr> = (1..=6)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        assert_eq!(
            address_list(&addrs),
            "tried 10.0.0.1:80, 10.0.0.2:80, 10.0.0.3:80, 10.0.0.4:80 and 2 more"
        );
        assert_eq!(address_list(&addrs[..1]), "tried 10.0.0.1:80");
    }

    /// A named service's host is looked up once and then remembered; when
    /// none of its addresses answers, it is forgotten, so the next open
    /// asks the resolver again (the service may have moved).
    #[tokio::test]
    async fn a_service_name_is_remembered_until_a_dial_fails() {
        let listener = tether_net::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let c: AgentConfig = toml::from_str(&format!(
            "server = \"ws://127.0.0.1:1\"\nname = \"a\"\ntoken = \"t\"\n[services]\nweb = \"localhost:{port}\"\n"
        ))
        .unwrap();
        let a = Agent::new(c).unwrap();
        let web = a.policy.resolve("web").unwrap();
        let wait = Duration::from_secs(2);
        assert!(!a.resolver.remembers("localhost"));
        let deadline = || tokio::time::Instant::now() + wait;
        let (tcp, peer) = connect_tcp(&a.policy, &a.resolver, &web, wait, deadline())
            .await
            .unwrap();
        assert_eq!(peer, listener.local_addr().unwrap());
        let sock = socket2::SockRef::from(&tcp);
        assert!(
            sock.keepalive().unwrap(),
            "keepalive on the service connection"
        );
        assert_eq!(
            sock.tcp_keepalive_time().unwrap(),
            tether_net::keepalive::KEEPALIVE.0
        );
        assert!(a.resolver.remembers("localhost"));
        drop(listener);
        let refused = connect_tcp(&a.policy, &a.resolver, &web, wait, deadline())
            .await
            .unwrap_err();
        assert_eq!(refused.code, OpenErrorCode::Refused, "{}", refused.reason);
        assert!(!a.resolver.remembers("localhost"));
    }

    /// An address that does not answer (its SYNs dropped) does not hold up
    /// the next one: the dial moves on after a quarter second, where it
    /// used to wait out the whole dial timeout. Every address refused: the
    /// last refusal.
    #[cfg(target_os = "linux")] // where a full accept queue drops SYNs
    #[tokio::test]
    async fn an_address_that_does_not_answer_does_not_hold_up_the_next() {
        use socket2::{Domain, Socket, Type};
        // A listener that never accepts, its backlog full: SYNs are dropped.
        let hole = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        hole.listen(0).unwrap();
        let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
        let mut fill = Vec::new();
        for _ in 0..64 {
            match std::net::TcpStream::connect_timeout(&hole_addr, Duration::from_millis(200)) {
                Ok(s) => fill.push(s),
                Err(_) => break,
            }
        }
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let (_tcp, addr) = tokio::time::timeout(
            Duration::from_secs(5),
            connect_first(&[hole_addr, live_addr]),
        )
        .await
        .expect("the dial went on to the next address")
        .unwrap();
        assert_eq!(addr, live_addr);
        drop(live);
        let refused = connect_first(&[live_addr, live_addr]).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A discovered service's name is looked up as the complete name it is
    /// (no search domains); the address it is shown by stays as published.
    #[test]
    fn a_discovered_name_is_looked_up_as_complete() {
        let policy =
            TargetPolicy::new(&Default::default(), &["*.svc.cluster.local:*".into()]).unwrap();
        let discovered = Discovered::default();
        discovered.replace(
            [(
                "grafana".to_owned(),
                crate::discovery::Found {
                    address: "grafana.mon.svc.cluster.local:3000".into(),
                    kind: tether_proto::ServiceKind::Http,
                    source: "mon/grafana:3000".into(),
                },
            )]
            .into(),
        );
        let r = resolve_target(&policy, &discovered, "grafana").unwrap();
        assert_eq!(
            r.host_port(),
            Some(("grafana.mon.svc.cluster.local.", 3000))
        );
        assert_eq!(r.address, "grafana.mon.svc.cluster.local:3000");
        // A raw target keeps what its opener wrote (short names may rely on
        // the search list).
        let r = resolve_target(&policy, &discovered, "web.ns.svc.cluster.local:80").unwrap();
        assert_eq!(r.host_port(), Some(("web.ns.svc.cluster.local", 80)));
    }

    /// An agent whose one service `svc` is `service` (a `[services]`
    /// value), an in-memory session to it, and an open of `svc` on it:
    /// the opener's open (its stream once answered) and the agent's task
    /// serving it (dial timeout 10 s).
    async fn serve_an_open_of(
        service: &str,
    ) -> (
        tokio::task::JoinHandle<Result<tether_net::Stream, Refusal>>,
        tokio::task::JoinHandle<()>,
    ) {
        use tether_net::transport::mem;
        let c: AgentConfig = toml::from_str(&format!(
            "server = \"ws://127.0.0.1:1\"\nname = \"a\"\ntoken = \"t\"\n[services]\nsvc = {service}\n"
        ))
        .unwrap();
        let a = Agent::new(c).unwrap();
        let ((agent_conn, mut opens), (server, _)) = mem::sessions().await.unwrap();
        let opening = tokio::spawn(async move {
            server
                .open(tether_proto::Target {
                    kind: TargetKind::Tcp,
                    address: "svc".into(),
                })
                .await
        });
        let inc = opens.recv().await.unwrap();
        let serving = tokio::spawn(async move {
            let _session = agent_conn;
            serve_stream(
                a.policy.clone(),
                a.discovered.clone(),
                a.resolver.clone(),
                a.stats.clone(),
                Duration::from_secs(10),
                Duration::from_secs(10),
                inc,
            )
            .await
        });
        (opening, serving)
    }

    /// A stream that fails resets a TLS service's connection (RST), as it
    /// does a plain one, and raw TLS offers no ALPN protocol (a service
    /// that enforces its own, like PostgreSQL's `postgresql`, would abort
    /// the handshake on `http/1.1`).
    #[tokio::test]
    async fn a_failed_stream_resets_a_tls_service() {
        use tether_net::transport::tls::ServerIdentity;
        use tether_proto::ResetCode;
        use tokio::io::AsyncReadExt;
        let identity = ServerIdentity::self_signed(&["localhost".into()]).unwrap();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(identity.server_config(&[b"postgresql"]).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (opening, _serving) = serve_an_open_of(&format!(
            "{{ address = \"127.0.0.1:{port}\", tls = true, tls_verify = false }}"
        ))
        .await;
        let (tcp, _) = listener.accept().await.unwrap();
        let mut service_side = acceptor.accept(tcp).await.expect("the TLS handshake");
        let stream = opening.await.unwrap().expect("the open");
        let (_r, mut w) = stream.split();
        w.write(bytes::Bytes::from_static(b"part")).await.unwrap();
        let mut got = [0u8; 4];
        service_side.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"part");
        w.reset(ResetCode::IoError, "the client's connection failed");
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), service_side.read_to_end(&mut rest))
            .await
            .expect("the service sees the end");
        assert!(
            matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "the service saw {end:?}, not a reset"
        );
    }

    /// An open the opener gives up on while the agent is still dialing
    /// stops the dial: the service's half-made connection is closed at once,
    /// not held until the dial timeout (10 s here).
    #[tokio::test]
    async fn a_cancelled_open_stops_its_dial() {
        use tokio::io::AsyncReadExt;
        // A TLS service that accepts and never answers the handshake.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (opening, serving) =
            serve_an_open_of(&format!("{{ address = \"127.0.0.1:{port}\", tls = true }}")).await;
        let (mut service_side, _) = listener.accept().await.unwrap();
        // The opener gives up (its open is dropped: RST).
        opening.abort();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), service_side.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the dial went on after the open was cancelled"
        );
        tokio::time::timeout(Duration::from_secs(2), serving)
            .await
            .expect("the stream's task ended")
            .unwrap();
    }
}
