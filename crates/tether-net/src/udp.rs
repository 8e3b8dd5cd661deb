//! UDP over tunnel streams (protocol version 2): each flow (one source
//! address) is one stream carrying length-prefixed datagrams.
//!
//! Datagrams are never waited for: when a flow's queue is full or its stream
//! has no send credit, the datagram is dropped and counted, like a congested
//! network would. Flows end after an idle timeout; a capped flow table evicts
//! the least recently used flow (closing its stream and, on the agent, its
//! socket) to make room.

use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_proto::datagram::{self, Decoder, MAX_DATAGRAM};
use tether_proto::ResetCode;
use tokio::net::UdpSocket;

use crate::log_gate::LogGate;
use tokio::sync::mpsc;

use crate::scratch::{with_scratch, SCRATCH_LEN};
use crate::Stream;

// A flow reads each datagram (and one byte more: a datagram too large is
// seen as such) into the thread's scratch buffer.
const _: () = assert!(MAX_DATAGRAM < SCRATCH_LEN);

/// Default idle time after which a flow is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on flows per socket (or per agent session).
pub const DEFAULT_MAX_FLOWS: usize = 1024;
/// Datagrams queued per flow while its stream opens.
const FLOW_QUEUE: usize = 256;
/// How long a source whose flow was refused has its datagrams dropped
/// before one of them may try to open a flow again.
pub const REFUSED_HOLD: Duration = Duration::from_secs(1);
/// Bytes queued per flow while its stream opens. Datagrams are up to
/// 64 KiB: counted in datagrams alone, a flow table of unauthenticated
/// sources (one per source port) could hold 16 MiB each.
const FLOW_QUEUE_BYTES: usize = 64 * 1024;

/// Limits of a UDP flow table.
#[derive(Debug, Clone)]
pub struct UdpLimits {
    /// Close a flow after this long without a datagram either way.
    pub idle_timeout: Duration,
    /// Most flows at once; the least recently used is evicted beyond.
    pub max_flows: usize,
}

impl Default for UdpLimits {
    fn default() -> Self {
        UdpLimits {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_flows: DEFAULT_MAX_FLOWS,
        }
    }
}

/// Counters of UDP flows (exported as metrics).
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Flows alive now.
    pub flows: AtomicI64,
    /// Flows ever opened.
    pub flows_total: AtomicU64,
    /// Flows evicted to stay under the cap.
    pub evicted: AtomicU64,
    /// Datagrams dropped (full queue, no credit, too large, open failed).
    pub drops: AtomicU64,
    /// Datagrams forwarded into the tunnel.
    pub datagrams_in: AtomicU64,
    /// Datagrams delivered out of the tunnel.
    pub datagrams_out: AtomicU64,
}

impl UdpStats {
    /// Prometheus text lines with `prefix` (e.g. `tether_client`).
    pub fn render(&self, prefix: &str) -> String {
        let l = |o: &AtomicU64| o.load(Ordering::Relaxed);
        format!(
            "# TYPE {prefix}_udp_flows gauge\n{prefix}_udp_flows {}\n\
             # TYPE {prefix}_udp_flows_total counter\n{prefix}_udp_flows_total {}\n\
             # TYPE {prefix}_udp_evicted_total counter\n{prefix}_udp_evicted_total {}\n\
             # TYPE {prefix}_udp_drops_total counter\n{prefix}_udp_drops_total {}\n\
             # TYPE {prefix}_udp_datagrams_in_total counter\n{prefix}_udp_datagrams_in_total {}\n\
             # TYPE {prefix}_udp_datagrams_out_total counter\n{prefix}_udp_datagrams_out_total {}\n",
            self.flows.load(Ordering::Relaxed),
            l(&self.flows_total),
            l(&self.evicted),
            l(&self.drops),
            l(&self.datagrams_in),
            l(&self.datagrams_out),
        )
    }
}

struct FlowEntry {
    tx: mpsc::Sender<Bytes>,
    /// Bytes in `tx`'s queue, and whether the flow's stream is open.
    queue: Arc<QueueState>,
    last_used: Instant,
    generation: u64,
    /// Ends the flow's task at once on eviction, even while its open is
    /// still pending (which resets that open).
    task: tokio::task::AbortHandle,
}

/// What a flow holds for its life (the server's accounting of the stream,
/// say), told of every datagram the flow carries. Whatever it must do when
/// the flow ends, however it ends (idle, evicted, the stream closed, the
/// socket's task gone), it does when dropped.
pub trait FlowGuard: Send + 'static {
    /// A datagram of `len` bytes went into the tunnel.
    fn sent(&self, _len: usize) {}
    /// A datagram of `len` bytes came out of the tunnel to the source.
    fn received(&self, _len: usize) {}
}

impl FlowGuard for () {}

impl FlowEntry {
    /// When the flow last carried a datagram either way.
    fn last_active(&self) -> Instant {
        let answered = Duration::from_millis(self.queue.answered_ms.load(Ordering::Relaxed));
        self.last_used.max(epoch() + answered)
    }
}

/// What the socket's task and a flow share about the flow's queue.
#[derive(Default)]
struct QueueState {
    /// Bytes queued: within [`FLOW_QUEUE_BYTES`] until the stream is open.
    bytes: AtomicUsize,
    /// The stream is open: the flow drains its queue as datagrams come,
    /// and a burst may fill all [`FLOW_QUEUE`] places.
    open: std::sync::atomic::AtomicBool,
    /// When the flow last delivered an answer to its source, in ms after
    /// [`epoch`]: a flow the service talks on is in use too, and is not
    /// the least recently used one to evict.
    answered_ms: AtomicU64,
}

/// A fixed instant that flows' answer times are counted from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl QueueState {
    /// Whether a datagram of `len` bytes may be queued now.
    fn takes(&self, len: usize) -> bool {
        self.open.load(Ordering::Relaxed)
            || self.bytes.load(Ordering::Relaxed) + len <= FLOW_QUEUE_BYTES
    }
}

/// A socket's flows. Dropped with the task that serves the socket, it ends
/// them all: each holds the socket, and a flow that outlived its server
/// (its open still waiting, say) would keep the port bound with nobody
/// reading it.
#[derive(Default)]
struct FlowTable(Mutex<HashMap<SocketAddr, FlowEntry>>);

impl FlowTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, FlowEntry>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Aborts every flow of a table when the socket's task ends.
struct EndFlows(Arc<FlowTable>);

impl Drop for EndFlows {
    fn drop(&mut self) {
        for (_, e) in self.0.lock().drain() {
            e.task.abort();
        }
    }
}

/// Counts a flow as alive for as long as its task exists (also when aborted).
struct FlowCount(Arc<UdpStats>);

impl Drop for FlowCount {
    fn drop(&mut self) {
        self.0.flows.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves a local UDP socket whose every source address becomes a flow: a
/// stream opened with `open`, carrying that source's datagrams to the far
/// side and the answers back to the source.
pub async fn serve_socket<F, Fut>(
    socket: Arc<UdpSocket>,
    open: F,
    limits: UdpLimits,
    stats: Arc<UdpStats>,
    accept: impl Fn(&SocketAddr) -> bool + Send + 'static,
) where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Stream, String>> + Send + 'static,
{
    let open = move |_src: SocketAddr| {
        let opening = open();
        async move { opening.await.map(|s| (s, ())) }
    };
    serve_socket_guarded(socket, open, limits, stats, accept, || true).await
}

/// [`serve_socket`] for opens that come with a guard (`G`, see
/// [`FlowGuard`]) and are told the flow's source: the flow holds the guard
/// until it ends. A source without a flow starts one only
/// while `new_flows()` says so (a draining server's listener keeps the
/// flows it has and takes no new ones); its datagrams are dropped
/// otherwise.
pub async fn serve_socket_guarded<F, Fut, G>(
    socket: Arc<UdpSocket>,
    open: F,
    limits: UdpLimits,
    stats: Arc<UdpStats>,
    accept: impl Fn(&SocketAddr) -> bool + Send + 'static,
    new_flows: impl Fn() -> bool + Send + 'static,
) where
    F: Fn(SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(Stream, G), String>> + Send + 'static,
    G: FlowGuard,
{
    let open = Arc::new(open);
    let flows: Arc<FlowTable> = Arc::default();
    let _end_flows = EndFlows(flows.clone());
    let mut generation = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // E.g. ICMP port unreachable reported on the socket: not fatal.
                tracing::debug!("udp recv: {e}");
                continue;
            }
        };
        if !accept(&src) {
            stats.drops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut map = flows.lock();
        let d = match map.get_mut(&src) {
            None => Bytes::copy_from_slice(&buf[..n]),
            Some(e) => {
                e.last_used = Instant::now();
                if !e.queue.takes(n) {
                    stats.drops.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                e.queue.bytes.fetch_add(n, Ordering::Relaxed);
                match e.tx.try_send(Bytes::copy_from_slice(&buf[..n])) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        e.queue.bytes.fetch_sub(n, Ordering::Relaxed);
                        stats.drops.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // The flow ended (idle): start a fresh one with this datagram.
                    Err(mpsc::error::TrySendError::Closed(d)) => {
                        map.remove(&src);
                        d
                    }
                }
            }
        };
        if !new_flows() {
            stats.drops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        start_flow(
            &mut map,
            &flows,
            src,
            d,
            &socket,
            &open,
            &limits,
            &stats,
            &mut generation,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn start_flow<F, Fut, G>(
    map: &mut HashMap<SocketAddr, FlowEntry>,
    flows: &Arc<FlowTable>,
    src: SocketAddr,
    first: Bytes,
    socket: &Arc<UdpSocket>,
    open: &Arc<F>,
    limits: &UdpLimits,
    stats: &Arc<UdpStats>,
    generation: &mut u64,
) where
    F: Fn(SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(Stream, G), String>> + Send + 'static,
    G: FlowGuard,
{
    if map.len() >= limits.max_flows {
        // Evict the least recently used flow: its task ends now, its stream resets.
        if let Some(oldest) = map
            .iter()
            .min_by_key(|(_, e)| e.last_active())
            .map(|(k, _)| *k)
        {
            if let Some(e) = map.remove(&oldest) {
                e.task.abort();
            }
            stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }
    *generation += 1;
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    let queue = Arc::new(QueueState {
        bytes: AtomicUsize::new(first.len()),
        ..Default::default()
    });
    let _ = tx.try_send(first);
    let queue2 = queue.clone();
    let gen = *generation;
    let flows2 = flows.clone();
    let socket = socket.clone();
    let open = open.clone();
    let limits = limits.clone();
    let stats2 = stats.clone();
    stats.flows.fetch_add(1, Ordering::Relaxed);
    stats.flows_total.fetch_add(1, Ordering::Relaxed);
    let count = FlowCount(stats.clone());
    let task = tokio::spawn(async move {
        let _count = count;
        let queue = FlowQueue { rx, state: queue2 };
        local_flow(src, queue, socket, open(src), limits.idle_timeout, &stats2).await;
        let mut map = flows2.lock();
        if map.get(&src).is_some_and(|e| e.generation == gen) {
            map.remove(&src);
        }
    });
    map.insert(
        src,
        FlowEntry {
            tx,
            queue,
            last_used: Instant::now(),
            generation: gen,
            task: task.abort_handle(),
        },
    );
}

/// The receiving end of a flow's queue, and its state.
struct FlowQueue {
    rx: mpsc::Receiver<Bytes>,
    state: Arc<QueueState>,
}

impl FlowQueue {
    async fn recv(&mut self) -> Option<Bytes> {
        let d = self.rx.recv().await?;
        self.state.bytes.fetch_sub(d.len(), Ordering::Relaxed);
        Some(d)
    }
}

async fn local_flow<G: FlowGuard>(
    src: SocketAddr,
    mut rx: FlowQueue,
    socket: Arc<UdpSocket>,
    open: impl Future<Output = Result<(Stream, G), String>>,
    idle: Duration,
    stats: &UdpStats,
) {
    // The guard lives as long as this function: the flow's whole life.
    let (stream, guard) = match open.await {
        Ok(s) => s,
        Err(e) => {
            // A source costs nothing to make up (no handshake; spoofed
            // addresses, a port per datagram): a line a second at most.
            static GATE: LogGate = LogGate::new();
            if let Some(skipped) = GATE.allow() {
                tracing::info!(%src, skipped, "udp flow refused: {e}; its datagrams are dropped for {REFUSED_HOLD:?}");
            }
            // Everything queued for it is lost, and what comes in the next
            // moment too: UDP needs no handshake, so a source sending fast
            // would otherwise start an open (and its log lines) for every
            // datagram while the refusal stands.
            let until = tokio::time::Instant::now() + REFUSED_HOLD;
            while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {
                stats.drops.fetch_add(1, Ordering::Relaxed);
            }
            stats.drops.fetch_add(rx.rx.len() as u64, Ordering::Relaxed);
            return;
        }
    };
    rx.state.open.store(true, Ordering::Relaxed);
    let id = stream.id();
    tracing::debug!(%src, stream = %id, "udp flow open");
    let (mut r, mut w) = stream.split();
    let mut dec = Decoder::default();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break }; // evicted
                last = Instant::now();
                match datagram::encode(&d) {
                    Ok(rec) => match w.try_write(rec) {
                        Ok(true) => {
                            stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
                            guard.sent(d.len());
                        }
                        Ok(false) => { stats.drops.fetch_add(1, Ordering::Relaxed); }
                        Err(_) => break,
                    },
                    Err(_) => { stats.drops.fetch_add(1, Ordering::Relaxed); }
                }
            }
            chunk = r.read() => {
                let Ok(Some(chunk)) = chunk else { break };
                last = Instant::now();
                // Answers count as use: once per chunk, from the clock read
                // just taken.
                let ms = last.saturating_duration_since(epoch()).as_millis() as u64;
                rx.state.answered_ms.store(ms, Ordering::Relaxed);
                dec.push(&chunk);
                loop {
                    match dec.next_datagram() {
                        Ok(Some(d)) => {
                            if socket.send_to(&d, src).await.is_ok() {
                                stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
                                guard.received(d.len());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            // The peer is told why, not that the stream
                            // was dropped.
                            tracing::warn!(%src, stream = %id, "bad datagram record: {e}");
                            w.reset(ResetCode::ProtocolError, &format!("bad datagram record: {e}"));
                            return;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until((last + idle).into()) => {
                tracing::debug!(%src, stream = %id, "udp flow idle; closed");
                break;
            }
        }
    }
}

/// Serves one UDP flow on the far side: datagrams from the stream go to
/// `socket` (connected to the service), answers go back into the stream.
/// Returns when the stream ends or the flow idles out; the socket closes
/// with it.
pub async fn serve_flow(stream: Stream, socket: UdpSocket, idle: Duration, stats: &UdpStats) {
    let id = stream.id();
    let (mut r, mut w) = stream.split();
    let mut dec = Decoder::default();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            chunk = r.read() => {
                let Ok(Some(chunk)) = chunk else { break };
                last = Instant::now();
                dec.push(&chunk);
                loop {
                    match dec.next_datagram() {
                        Ok(Some(d)) => {
                            match socket.send(&d).await {
                                Ok(_) => { stats.datagrams_out.fetch_add(1, Ordering::Relaxed); }
                                Err(_) => { stats.drops.fetch_add(1, Ordering::Relaxed); }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(stream = %id, "bad datagram record: {e}");
                            w.reset(ResetCode::ProtocolError, &format!("bad datagram record: {e}"));
                            return;
                        }
                    }
                }
            }
            ready = socket.readable() => {
                // Read into the thread's scratch buffer and encoded (copied)
                // out of it at once: an idle flow (a peer may hold
                // thousands) keeps no 64 KiB buffer of its own.
                let got = ready.and_then(|()| {
                    with_scratch(|buf| {
                        let n = socket.try_recv(&mut buf[..MAX_DATAGRAM + 1])?;
                        Ok(datagram::encode(&buf[..n]))
                    })
                });
                match got {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(record) => {
                        last = Instant::now();
                        match record.map(|rec| w.try_write(rec)) {
                            Ok(Ok(true)) => { stats.datagrams_in.fetch_add(1, Ordering::Relaxed); }
                            Ok(Ok(false)) | Err(_) => { stats.drops.fetch_add(1, Ordering::Relaxed); }
                            Ok(Err(_)) => break,
                        }
                    }
                    // ICMP errors (port unreachable) surface here; keep going.
                    Err(e) => tracing::debug!(stream = %id, "udp recv: {e}"),
                }
            }
            _ = tokio::time::sleep_until((last + idle).into()) => {
                tracing::debug!(stream = %id, "udp flow idle; closed");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket served with `open`, and a sender on loopback.
    async fn served_with<F, Fut>(
        open: F,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<()>,
        Arc<UdpStats>,
        std::net::UdpSocket,
    )
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Stream, String>> + Send + 'static,
    {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let stats = Arc::new(UdpStats::default());
        let task = tokio::spawn(serve_socket(
            socket,
            open,
            UdpLimits::default(),
            stats.clone(),
            |_| true,
        ));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        (addr, task, stats, sender)
    }

    /// Opens that never complete: an agent that does not answer.
    fn silent() -> impl Future<Output = Result<Stream, String>> {
        std::future::pending()
    }

    /// While a flow's stream opens, its queue holds at most
    /// FLOW_QUEUE_BYTES, not 256 datagrams of up to 64 KiB each.
    #[tokio::test]
    async fn a_flow_waiting_for_its_open_queues_a_bounded_number_of_bytes() {
        let (addr, task, stats, sender) = served_with(silent).await;
        let big = vec![7u8; 60_000];
        // Paced, so that the socket's receive buffer drops none.
        for _ in 0..16 {
            sender.send_to(&big, addr).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let dropped = || stats.drops.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while dropped() < 15 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The first fits; every later one would pass 64 KiB.
        assert_eq!(dropped(), 15, "datagrams kept beyond the byte budget");
        assert_eq!(stats.flows.load(Ordering::Relaxed), 1);
        task.abort();
    }

    /// A refused source's datagrams are dropped for a moment, not each
    /// turned into an open (and its log lines) of its own.
    #[tokio::test]
    async fn a_refused_source_does_not_open_a_flow_per_datagram() {
        let opens = Arc::new(AtomicU64::new(0));
        let counted = opens.clone();
        let open = move || {
            counted.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Err::<Stream, String>("too_many_streams".into()))
        };
        let (addr, task, stats, sender) = served_with(open).await;
        for _ in 0..40 {
            sender.send_to(b"query", addr).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while stats.drops.load(Ordering::Relaxed) < 40 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.drops.load(Ordering::Relaxed), 40);
        assert_eq!(opens.load(Ordering::Relaxed), 1, "an open per datagram");
        task.abort();
    }

    /// A flow that only receives (the service talks, the source listens)
    /// counts as in use by its answers.
    #[tokio::test]
    async fn answers_keep_a_flow_from_being_the_least_recently_used() {
        let entry = |last_used: Instant, answered: Option<Instant>| {
            let (tx, _rx) = mpsc::channel(1);
            let queue = QueueState::default();
            if let Some(at) = answered {
                let ms = at.duration_since(epoch()).as_millis() as u64;
                queue.answered_ms.store(ms, Ordering::Relaxed);
            }
            FlowEntry {
                tx,
                queue: Arc::new(queue),
                last_used,
                generation: 0,
                task: tokio::spawn(async {}).abort_handle(),
            }
        };
        let start = epoch();
        let listening = entry(start, Some(start + Duration::from_millis(40)));
        let quiet = entry(start + Duration::from_millis(10), None);
        assert!(quiet.last_active() < listening.last_active());
    }

    /// Ending the socket's task ends its flows, and so their hold on the
    /// socket: the port can be bound again (a listener whose agent came
    /// back at once).
    /// A stream that carries something that is no datagram record is reset
    /// with the reason (protocol_error: bad datagram record), not dropped
    /// with a generic "stream dropped" cancel.
    #[tokio::test]
    async fn a_bad_datagram_record_is_reset_with_its_reason() {
        let ((a, _a_in), (_b, mut b_in)) = crate::transport::mem::sessions().await.unwrap();
        let opening = tokio::spawn(async move {
            a.open(tether_proto::Target {
                kind: tether_proto::frame::TargetKind::Udp,
                address: "127.0.0.1:9".into(),
            })
            .await
        });
        let incoming = b_in.recv().await.unwrap();
        let far = incoming.accept().unwrap();
        let service = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        service.connect("127.0.0.1:9").await.unwrap();
        let stats = UdpStats::default();
        let (mut near_r, mut near_w) = opening.await.unwrap().unwrap().split();
        // A record longer than any datagram: 0xffff bytes announced.
        near_w
            .write(Bytes::from_static(&[0xff, 0xff, 1, 2, 3]))
            .await
            .unwrap();
        serve_flow(far, service, Duration::from_secs(5), &stats).await;
        let e = loop {
            match near_r.read().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a reset"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.reset_code(), Some(ResetCode::ProtocolError), "{e}");
        assert!(e.to_string().contains("bad datagram record"), "{e}");
    }

    #[tokio::test]
    async fn flows_end_with_their_socket_and_free_the_port() {
        let (addr, task, stats, sender) = served_with(silent).await;
        sender.send_to(b"hello", addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.flows.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.flows.load(Ordering::Relaxed), 1, "no flow started");
        task.abort();
        let _ = task.await;
        let deadline = Instant::now() + Duration::from_secs(2);
        let rebound = loop {
            match UdpSocket::bind(addr).await {
                Ok(s) => break Some(s),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(_) => break None,
            }
        };
        assert!(rebound.is_some(), "the port stayed bound by a flow");
        assert_eq!(stats.flows.load(Ordering::Relaxed), 0);
    }
}
