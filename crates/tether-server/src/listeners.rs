//! Server-side listeners: a public TCP or UDP port on the server bound to
//! one `agent/service`, for clients that cannot run the tether CLI (like
//! rathole's or frp's public ports).
//!
//! A listener is bound only while its agent is connected, and closed when the
//! agent goes away, so nobody connects to a port that leads nowhere. A newer
//! session of the same agent takes over without the port ever closing. The
//! socket is bound with `SO_REUSEADDR`, so rebinding after the agent returns
//! never fails with "address already in use" because of old connections.
//!
//! Every connection (TCP) or flow (UDP) opens its stream through the one
//! open path as the listener's pseudo-identity ([`Caller::Listener`]): no
//! policy (the operator configured the listener), but the same rate, stream
//! and pending-open limits as a client identity.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tether_net::splice::socket_halves;
use tether_proto::{TargetKind, MAX_EARLY_DATA};
use tokio::net::TcpStream;

use tether_net::sources::SourceCounts;

use crate::admission::SourceRates;
use crate::cluster::{Cluster, Phase};
use crate::config::ListenerConfig;
use crate::limits::{Limit, Limits};
use crate::metrics::Metrics;
use crate::open::{Caller, OpenGuard, Opener};
use crate::registry::Registry;
use crate::relay::{run_relay, stream_ended, stream_started};

/// How long to wait before retrying a bind that failed.
const REBIND_DELAY: Duration = Duration::from_secs(5);

/// How long a UDP listener waits for its aborted flows to let go of the
/// socket.
const FLOWS_END_WAIT: Duration = Duration::from_secs(2);

/// One configured listener and the handles it uses.
pub(crate) struct Listener {
    cfg: ListenerConfig,
    caller: Caller,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    opener: Opener,
    /// Whether the server is draining (a UDP listener then takes no new
    /// flows).
    cluster: Arc<Cluster>,
    /// Most UDP flows: no more than the streams one identity may hold, so
    /// the least recently used flow makes room before the stream cap
    /// refuses a new one.
    max_flows: usize,
    /// The server's limits: the default per-source rate is half of its
    /// `opens_per_sec`.
    limits: Arc<Limits>,
}

impl Listener {
    /// A listener for `cfg` (checked by [`ListenerConfig::validate`]),
    /// whose connections or flows hold at most `limits`' streams per
    /// identity.
    pub(crate) fn new(
        cfg: ListenerConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        opener: Opener,
        cluster: Arc<Cluster>,
        limits: Arc<Limits>,
    ) -> Listener {
        Listener {
            caller: Caller::listener(cfg.listen, cfg.is_udp()),
            cfg,
            registry,
            metrics,
            opener,
            cluster,
            max_flows: limits.max_streams().min(tether_net::udp::DEFAULT_MAX_FLOWS),
            limits,
        }
    }

    /// Runs the listener forever: bound while its agent is connected.
    pub(crate) async fn run(self) {
        let this = Arc::new(self);
        if this.cfg.is_udp() {
            this.run_udp().await
        } else {
            this.run_tcp().await
        }
    }

    /// Waits until the agent is connected; `false` when the registry is gone.
    async fn agent_connected(&self, changes: &mut tokio::sync::watch::Receiver<u64>) -> bool {
        while self.registry.get(self.cfg.agent()).is_none() {
            if changes.changed().await.is_err() {
                return false;
            }
        }
        true
    }

    async fn run_tcp(self: Arc<Self>) {
        let cfg = &self.cfg;
        let per_source: Arc<SourceCounts> = Arc::default();
        let rates = SourceRates::default();
        // A source refused for its rate may try thousands of times a
        // second: one log line a second says it (the metric counts all).
        let mut rate_warned: Option<Instant> = None;
        let mut denied_warned: Option<Instant> = None;
        let mut full_warned: Option<Instant> = None;
        let once_a_second = |last: &mut Option<Instant>, now: Instant| {
            let due = last.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
            if due {
                *last = Some(now);
            }
            due
        };
        let mut changes = self.registry.subscribe();
        loop {
            if !self.agent_connected(&mut changes).await {
                return;
            }
            let listener = match tether_net::listen::bind(cfg.listen) {
                Ok(l) => l,
                Err(e) => {
                    self.metrics.error("listener_bind");
                    tracing::error!(listen = %cfg.listen, target = %cfg.target, "binding {}: {e}; retrying in {REBIND_DELAY:?}", cfg.listen);
                    tokio::time::sleep(REBIND_DELAY).await;
                    continue;
                }
            };
            tracing::info!(listen = %cfg.listen, target = %cfg.target, "listener open (agent connected)");
            let live = self.metrics.session_live("listener");
            loop {
                tokio::select! {
                    r = changes.changed() => {
                        if r.is_err() || self.registry.get(cfg.agent()).is_none() {
                            break;
                        }
                    }
                    (tcp, peer) = tether_net::listen::accept(&listener) => {
                        let now = Instant::now();
                        // Sources outside allow_from take no rate bucket.
                        if !cfg.allows(&peer) {
                            self.metrics.error("listener_source_denied");
                            if once_a_second(&mut denied_warned, now) {
                                tracing::warn!(listen = %cfg.listen, %peer, "connection from a source outside allow_from; closed (more this second not logged)");
                            }
                            continue;
                        }
                        // Half the listener's rate unless set; none when
                        // that rate is 0 (the listener's own bucket, which
                        // never refills then, is the limit).
                        let rate = cfg
                            .opens_per_sec_per_source
                            .unwrap_or_else(|| self.limits.opens_per_sec() / 2.0);
                        if rate > 0.0 && !rates.take(peer.ip(), rate, now) {
                            self.metrics.limit_hit(Limit::ListenerOpensPerSource);
                            if once_a_second(&mut rate_warned, now) {
                                tracing::warn!(listen = %cfg.listen, %peer, max = rate, raise_with = Limit::ListenerOpensPerSource.setting(), "source opens connections through this listener faster than it allows; closed (more this second not logged)");
                            }
                            continue;
                        }
                        let Some(slot) = per_source.take(peer.ip(), cfg.max_connections_per_source.max(1)) else {
                            self.metrics.limit_hit(Limit::ListenerConnectionsPerSource);
                            if once_a_second(&mut full_warned, now) {
                                tracing::warn!(listen = %cfg.listen, %peer, max = cfg.max_connections_per_source, raise_with = Limit::ListenerConnectionsPerSource.setting(), "source has too many connections through this listener; closed (more this second not logged)");
                            }
                            continue;
                        };
                        let this = self.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            this.serve_one(tcp, peer).await
                        });
                    }
                }
            }
            drop(listener);
            drop(live);
            tracing::info!(listen = %cfg.listen, target = %cfg.target, "listener closed (agent gone)");
        }
    }

    async fn serve_one(&self, mut tcp: TcpStream, peer: SocketAddr) {
        let cfg = &self.cfg;
        let started = Instant::now();
        tether_net::listen::tune_accepted(&tcp);
        // The PROXY header, then what the client has sent already, go with
        // the open (early data). With early data off the header waits for
        // OPEN_OK too, so a retried open never hands the service a
        // connection that carries only a header.
        let mut early = BytesMut::new();
        if cfg.proxy_protocol {
            // An IPv4 client of a dual-stack socket arrives as
            // `::ffff:a.b.c.d`: the service is told the IPv4 address.
            let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let local = tcp.local_addr().unwrap_or(cfg.listen);
            let header = ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                (canonical(peer), canonical(local)),
            )
            .build();
            match header {
                Ok(h) => early.extend_from_slice(&h),
                Err(e) => {
                    tracing::warn!(%peer, "cannot build PROXY header: {e}");
                    return;
                }
            }
        }
        let first_data = if cfg.early_data {
            let room = MAX_EARLY_DATA.saturating_sub(early.len());
            if let Err(e) = tether_net::early::arrived_into(&mut tcp, &mut early, room) {
                tracing::info!(listen = %cfg.listen, %peer, "connection failed before its open: {e}");
                return;
            }
            None
        } else {
            Some(early.split().freeze()).filter(|h| !h.is_empty())
        };
        let (stream, guard) = match self
            .opener
            .open(&self.caller, &cfg.target, TargetKind::Tcp, early.freeze())
            .await
        {
            Ok(x) => x,
            Err(tether_net::Refusal { code, reason }) => {
                tracing::info!(listen = %cfg.listen, %peer, target = %cfg.target, %code, "open refused: {reason}");
                return;
            }
        };
        let (sr, mut sw) = stream.split();
        if let Some(header) = first_data {
            if let Err(e) = sw.write(header).await {
                tracing::info!(listen = %cfg.listen, %peer, target = %cfg.target, "stream failed before the PROXY header went: {e}");
                return;
            }
        }
        let (tr, tw) = socket_halves(tcp);
        let who = ListenerConnection {
            listener: self.caller.name(),
            peer,
        };
        run_relay(
            &self.metrics,
            &who,
            &cfg.target,
            started,
            &guard,
            (tr, tw),
            (sr, sw),
        )
        .await;
    }

    /// A UDP listener: every source address is a flow (one tunnel stream,
    /// holding its open's guard for its life).
    async fn run_udp(self: Arc<Self>) {
        let cfg = &self.cfg;
        if cfg.allow_from.is_empty() && !cfg.listen.ip().is_loopback() {
            tracing::warn!(listen = %cfg.listen, target = %cfg.target, "udp listener open to every source (no allow_from): a datagram with a made-up source address has the service's answer sent there, reflecting it at a victim; set allow_from");
        }
        let mut changes = self.registry.subscribe();
        let stats = self.metrics.udp_listener(cfg.listen);
        loop {
            if !self.agent_connected(&mut changes).await {
                return;
            }
            let socket = match tokio::net::UdpSocket::bind(cfg.listen).await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    self.metrics.error("listener_bind");
                    tracing::error!(listen = %cfg.listen, target = %cfg.target, "binding udp: {e}; retrying in {REBIND_DELAY:?}");
                    tokio::time::sleep(REBIND_DELAY).await;
                    continue;
                }
            };
            tracing::info!(listen = %cfg.listen, target = %cfg.target, "udp listener open (agent connected)");
            let live = self.metrics.session_live("listener");
            let open = {
                let this = self.clone();
                move |src: SocketAddr| {
                    let this = this.clone();
                    async move {
                        let started = Instant::now();
                        let (stream, guard) = this
                            .opener
                            .open(
                                &this.caller,
                                &this.cfg.target,
                                TargetKind::Udp,
                                bytes::Bytes::new(),
                            )
                            .await
                            .map_err(|r| r.to_string())?;
                        stream_started(&this.metrics);
                        let flow = AuditedFlow {
                            listener: this.clone(),
                            src,
                            guard,
                            started,
                            up: AtomicU64::new(0),
                            down: AtomicU64::new(0),
                        };
                        Ok((stream, flow))
                    }
                }
            };
            let allow = {
                let this = self.clone();
                let denied = self.metrics.error_counter("listener_source_denied");
                move |peer: &SocketAddr| {
                    let allowed = this.cfg.allows(peer);
                    if !allowed {
                        denied.inc(); // per datagram
                    }
                    allowed
                }
            };
            let server = tokio::spawn(tether_net::udp::serve_socket_guarded(
                socket,
                open,
                tether_net::udp::UdpLimits {
                    max_flows: self.max_flows,
                    ..Default::default()
                },
                stats.clone(),
                allow,
                {
                    // A draining server keeps the flows it carries but takes
                    // no new ones (aborting the listener's task at drain
                    // leaves this task, and its flows, running until the
                    // process exits).
                    let cluster = self.cluster.clone();
                    move || cluster.phase() != Phase::Closing
                },
            ));
            while self.registry.get(cfg.agent()).is_some() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
            // Its flows end with it (their session is gone), and with them
            // their hold on the socket. Each flow's task lets go of it when
            // the runtime drops that task, shortly after: wait for that, so
            // that the next bind finds the port free.
            server.abort();
            let _ = server.await;
            let deadline = Instant::now() + FLOWS_END_WAIT;
            while stats.flows.load(std::sync::atomic::Ordering::Relaxed) > 0
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            drop(live);
            tracing::info!(listen = %cfg.listen, target = %cfg.target, "udp listener closed (agent gone)");
        }
    }
}

/// A UDP listener flow's hold on its stream (the open's guard) and its
/// account: counted in the stream metrics while it lives, and written in
/// an audit line when it ends, however it ends, like a TCP connection's.
struct AuditedFlow {
    listener: Arc<Listener>,
    src: SocketAddr,
    guard: OpenGuard,
    started: Instant,
    up: AtomicU64,
    down: AtomicU64,
}

impl tether_net::udp::FlowGuard for AuditedFlow {
    fn sent(&self, len: usize) {
        self.up.fetch_add(len as u64, Ordering::Relaxed);
    }
    fn received(&self, len: usize) {
        self.down.fetch_add(len as u64, Ordering::Relaxed);
    }
}

impl Drop for AuditedFlow {
    fn drop(&mut self) {
        let who = ListenerConnection {
            listener: self.listener.caller.name(),
            peer: self.src,
        };
        stream_ended(
            &self.listener.metrics,
            &who,
            &self.listener.cfg.target,
            &self.guard,
            (
                self.up.load(Ordering::Relaxed),
                self.down.load(Ordering::Relaxed),
            ),
            self.started,
            "closed",
        );
    }
}

/// A listener connection's name in its audit line: `listener ADDR from PEER`.
struct ListenerConnection<'a> {
    listener: &'a str,
    peer: SocketAddr,
}

impl std::fmt::Display for ListenerConnection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} from {}", self.listener, self.peer)
    }
}
