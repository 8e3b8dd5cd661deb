//! wslib-bench: loopback comparison of tokio-tungstenite and fastwebsockets
//! against a raw-TCP baseline, for tether's choice of WebSocket crate.
//!
//! Everything runs on 127.0.0.1 only. Each measurement uses two OS threads,
//! each with its own current-thread tokio runtime (one for the "server", one
//! for the "client"), so the two ends behave like two processes sharing the
//! machine's 2 cores. Every loop is bounded by a message count and every
//! connection by a timeout.
//!
//! Variants:
//!   raw        plain TCP (write_all / read), the baseline
//!   tt-direct  tokio-tungstenite on a bare TcpStream on both ends
//!              (server: accept_hdr_async_with_config, client: client_async_with_config)
//!   tt-hyper   tokio-tungstenite, server side upgraded through hyper 1.x
//!              (WebSocketStream::from_raw_socket over TokioIo<Upgraded>),
//!              client as tt-direct. This is how tether's server would run it.
//!   tt-tuned   tt-hyper with, on both ends, WebSocketConfig
//!              write_buffer_size(0) (each message written eagerly instead of
//!              being coalesced into the default 128 KiB write buffer) and
//!              read_buffer_size(32 KiB) (tungstenite zero-fills up to
//!              read_buffer_size bytes before EVERY read() call, 128 KiB by
//!              default, which costs ~4-5 µs per read on this machine).
//!   fws-hyper  fastwebsockets with its own `upgrade` feature: server through
//!              hyper 1.x (upgrade::upgrade), client through
//!              handshake::client (also hyper). Both ends run over TokioIo<Upgraded>.
//!   fws-direct fastwebsockets after the same hyper handshakes, but the
//!              Upgraded is downcast back to the bare TcpStream on both ends
//!              (WebSocket::after_handshake), i.e. the codec without hyper's
//!              Upgraded indirection.
//!
//! All WebSocket variants perform a real handshake with
//! `Authorization: Bearer ...` and `Sec-WebSocket-Protocol: tether.v1`, which
//! the server checks (401 / 400 otherwise) and echoes.
//!
//! Throughput uses split halves (like tether's reader task + writer task):
//! tokio-tungstenite via futures' StreamExt::split (BiLock), fastwebsockets via
//! WebSocket::split(tokio::io::split) (feature unstable-split).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt, StreamExt,
};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, upgrade::Upgraded, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
};
use tokio_tungstenite::{
    tungstenite::{
        self,
        client::IntoClientRequest,
        protocol::{Role as TtRole, WebSocketConfig},
        Message,
    },
    WebSocketStream,
};

const TOKEN: &str = "Bearer bench-token-0123456789";
const SUBPROTO: &str = "tether.v1";
/// Upper bound for one measurement (handshake + transfer); keeps every run bounded.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;
type Up = TokioIo<Upgraded>;

// ---------------------------------------------------------------------------
// Transport-agnostic halves
// ---------------------------------------------------------------------------

/// Sending half. Each implementation owns a payload buffer of the largest
/// message size and sends its first `len` bytes as one message, using the
/// library's natural zero-/low-copy path (tt: `Bytes` slice; fws: a
/// `&mut [u8]` it may mask in place).
trait Tx {
    async fn send(&mut self, len: usize) -> Result<()>;
    async fn flush(&mut self) -> Result<()>;
}

/// Receiving half. `recv` returns the payload length of one data message
/// (raw TCP: the bytes of one read()).
trait Rx {
    async fn recv(&mut self) -> Result<usize>;
    /// One message of exactly `n` bytes (raw TCP: read_exact).
    async fn recv_exact(&mut self, n: usize) -> Result<()> {
        let got = self.recv().await?;
        if got != n {
            bail!("expected a {n}-byte message, got {got}");
        }
        Ok(())
    }
}

// --- raw TCP ---------------------------------------------------------------

struct RawTx {
    w: OwnedWriteHalf,
    buf: Vec<u8>,
}
struct RawRx {
    r: OwnedReadHalf,
    buf: Vec<u8>,
}
impl Tx for RawTx {
    async fn send(&mut self, len: usize) -> Result<()> {
        self.w.write_all(&self.buf[..len]).await?;
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
impl Rx for RawRx {
    async fn recv(&mut self) -> Result<usize> {
        let n = self.r.read(&mut self.buf).await?;
        if n == 0 {
            bail!("raw: unexpected EOF");
        }
        Ok(n)
    }
    async fn recv_exact(&mut self, n: usize) -> Result<()> {
        self.r.read_exact(&mut self.buf[..n]).await?;
        Ok(())
    }
}
fn raw_halves(tcp: TcpStream, max_msg: usize) -> (RawTx, RawRx) {
    let (r, w) = tcp.into_split();
    (
        RawTx { w, buf: pattern(max_msg) },
        RawRx { r, buf: vec![0; 256 * 1024] },
    )
}

// --- tokio-tungstenite -----------------------------------------------------

struct TtTx<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    payload: Bytes,
}
struct TtRx<S> {
    stream: SplitStream<WebSocketStream<S>>,
}
impl<S: AsyncRead + AsyncWrite + Unpin> Tx for TtTx<S> {
    async fn send(&mut self, len: usize) -> Result<()> {
        // feed = queue into tungstenite's write buffer; it writes to the
        // socket by itself once the buffer exceeds write_buffer_size (128 KiB).
        self.sink.feed(Message::Binary(self.payload.slice(..len))).await?;
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        self.sink.flush().await?;
        Ok(())
    }
}
impl<S: AsyncRead + AsyncWrite + Unpin> Rx for TtRx<S> {
    async fn recv(&mut self) -> Result<usize> {
        // Bounded: control frames are interleaved at most a few times here.
        for _ in 0..1024 {
            match self.stream.next().await {
                Some(Ok(Message::Binary(b))) => return Ok(b.len()),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(m)) => bail!("tt: unexpected message {m:?}"),
                Some(Err(e)) => return Err(e.into()),
                None => bail!("tt: stream ended"),
            }
        }
        bail!("tt: too many control frames")
    }
}
fn tt_halves<S: AsyncRead + AsyncWrite + Unpin>(
    ws: WebSocketStream<S>,
    max_msg: usize,
) -> (TtTx<S>, TtRx<S>) {
    let (sink, stream) = ws.split();
    (
        TtTx { sink, payload: Bytes::from(pattern(max_msg)) },
        TtRx { stream },
    )
}
fn tt_config(tuned: bool) -> WebSocketConfig {
    // Library defaults (read/write buffer 128 KiB, max message 64 MiB, max
    // frame 16 MiB); tether would lower the limits to ~1 MiB.
    // `tuned` (variant tt-tuned): write_buffer_size = 0, i.e. every
    // message is written to the socket as soon as it is queued instead of
    // being coalesced into a >= 128 KiB write buffer; read_buffer_size =
    // 32 KiB, because FrameCodec::read_in zero-fills that many bytes before
    // each read() (also the ones that end in WouldBlock).
    // TT_WRITE_BUF / TT_READ_BUF (bytes) override the buffer sizes for tuning runs.
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let mut c = WebSocketConfig::default();
    if tuned {
        c = c.write_buffer_size(0).read_buffer_size(32 * 1024);
    }
    if let Some(w) = env("TT_WRITE_BUF") {
        c = c.write_buffer_size(w);
    }
    if let Some(r) = env("TT_READ_BUF") {
        c = c.read_buffer_size(r);
    }
    c
}

// --- fastwebsockets --------------------------------------------------------

type FwsRead<S> = fastwebsockets::WebSocketRead<tokio::io::ReadHalf<S>>;
type FwsWrite<S> = fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<S>>;

struct FwsTx<S> {
    w: FwsWrite<S>,
    buf: Vec<u8>,
}
struct FwsRx<S> {
    r: FwsRead<S>,
}
impl<S: AsyncRead + AsyncWrite + Unpin> Tx for FwsTx<S> {
    async fn send(&mut self, len: usize) -> Result<()> {
        // BorrowedMut: the client role masks the payload in place (no copy);
        // the server role writes it with writev (header + payload, no copy).
        let frame = fastwebsockets::Frame::binary(fastwebsockets::Payload::BorrowedMut(
            &mut self.buf[..len],
        ));
        self.w.write_frame(frame).await?;
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        self.w.flush().await?;
        Ok(())
    }
}
impl<S: AsyncRead + AsyncWrite + Unpin> Rx for FwsRx<S> {
    async fn recv(&mut self) -> Result<usize> {
        for _ in 0..1024 {
            // The split read half hands "obligated" frames (auto-pong, close
            // reply) to this closure; nothing sends pings in the benchmark.
            let frame = self
                .r
                .read_frame(&mut |_f| async { Ok::<(), std::io::Error>(()) })
                .await?;
            match frame.opcode {
                fastwebsockets::OpCode::Binary => return Ok(frame.payload.len()),
                fastwebsockets::OpCode::Ping | fastwebsockets::OpCode::Pong => continue,
                op => bail!("fws: unexpected opcode {op:?}"),
            }
        }
        bail!("fws: too many control frames")
    }
}
fn fws_halves<S: AsyncRead + AsyncWrite + Unpin>(
    ws: fastwebsockets::WebSocket<S>,
    max_msg: usize,
) -> (FwsTx<S>, FwsRx<S>) {
    let (r, w) = ws.split(tokio::io::split);
    (FwsTx { w, buf: pattern(max_msg) }, FwsRx { r })
}
fn fws_configure<S>(ws: &mut fastwebsockets::WebSocket<S>) {
    // Defaults, spelled out: auto pong + auto close on, 64 MiB max message.
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    ws.set_max_message_size(64 << 20);
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

// ---------------------------------------------------------------------------
// Handshakes
// ---------------------------------------------------------------------------

/// Server-side admission check shared by all variants.
fn check_headers(h: &HeaderMap) -> std::result::Result<(), StatusCode> {
    if h.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(TOKEN.as_bytes()) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let proto_ok = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTO);
    if !proto_ok {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(())
}

/// Serves exactly one HTTP/1.1 upgrade request with hyper 1.x and returns
/// whatever the library-specific `upgrade` fn produces once the 101 is out.
async fn hyper_accept<T: Send + 'static>(
    tcp: TcpStream,
    upgrade: fn(&mut Request<Incoming>) -> Result<(Response<Empty<Bytes>>, BoxFut<T>)>,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel::<BoxFut<T>>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let status_only = |s: StatusCode| {
                let mut r = Response::new(Empty::<Bytes>::new());
                *r.status_mut() = s;
                r
            };
            let resp = match check_headers(req.headers()) {
                Err(s) => status_only(s),
                Ok(()) => match upgrade(&mut req) {
                    Ok((mut resp, fut)) => {
                        resp.headers_mut()
                            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTO));
                        if let Some(tx) = tx.lock().unwrap().take() {
                            let _ = tx.send(fut);
                        }
                        resp
                    }
                    Err(_) => status_only(StatusCode::BAD_REQUEST),
                },
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), svc)
        .with_upgrades();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let fut = rx.await.map_err(|_| anyhow!("connection closed before a valid upgrade"))?;
    fut.await
}

/// hyper upgrade for tokio-tungstenite: compute the accept key ourselves.
fn tt_hyper_upgrade(req: &mut Request<Incoming>) -> Result<(Response<Empty<Bytes>>, BoxFut<Up>)> {
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        bail!("bad version");
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).context("no key")?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on = hyper::upgrade::on(req);
    let resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Empty::new())?;
    Ok((resp, Box::pin(async move { Ok(TokioIo::new(on.await?)) })))
}

/// hyper upgrade for fastwebsockets: its own helper.
fn fws_hyper_upgrade(
    req: &mut Request<Incoming>,
) -> Result<(Response<Empty<Bytes>>, BoxFut<fastwebsockets::WebSocket<Up>>)> {
    let (resp, fut) = fastwebsockets::upgrade::upgrade(req)?;
    Ok((resp, Box::pin(async move { Ok(fut.await?) })))
}

async fn tt_accept_direct(tcp: TcpStream) -> Result<WebSocketStream<TcpStream>> {
    use tungstenite::handshake::server::{ErrorResponse, Request as TReq, Response as TResp};
    let cb = |req: &TReq, mut resp: TResp| -> std::result::Result<TResp, ErrorResponse> {
        if let Err(s) = check_headers(req.headers()) {
            let mut e = ErrorResponse::new(None);
            *e.status_mut() = s;
            return Err(e);
        }
        resp.headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTO));
        Ok(resp)
    };
    Ok(tokio_tungstenite::accept_hdr_async_with_config(tcp, cb, Some(tt_config(false))).await?)
}

async fn tt_accept_hyper(tcp: TcpStream, tuned: bool) -> Result<WebSocketStream<Up>> {
    let io = hyper_accept(tcp, tt_hyper_upgrade).await?;
    Ok(WebSocketStream::from_raw_socket(io, TtRole::Server, Some(tt_config(tuned))).await)
}

async fn fws_accept_hyper(tcp: TcpStream) -> Result<fastwebsockets::WebSocket<Up>> {
    let mut ws = hyper_accept(tcp, fws_hyper_upgrade).await?;
    fws_configure(&mut ws);
    Ok(ws)
}

/// Undo hyper's `Upgraded` indirection: get the bare TcpStream back.
fn fws_unwrap_upgraded(
    ws: fastwebsockets::WebSocket<Up>,
    role: fastwebsockets::Role,
) -> Result<fastwebsockets::WebSocket<TcpStream>> {
    let upgraded = ws.into_inner().into_inner();
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| anyhow!("downcast to TcpStream failed"))?;
    if !parts.read_buf.is_empty() {
        // Cannot happen with our protocol (the client always speaks first).
        bail!("{} bytes already buffered by hyper", parts.read_buf.len());
    }
    let mut ws = fastwebsockets::WebSocket::after_handshake(parts.io.into_inner(), role);
    fws_configure(&mut ws);
    Ok(ws)
}

async fn tt_connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    host: &str,
    token: &str,
    tuned: bool,
) -> Result<WebSocketStream<S>> {
    let mut req = format!("ws://{host}/tunnel").into_client_request()?;
    req.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_str(token)?);
    req.headers_mut()
        .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTO));
    // tungstenite verifies Sec-WebSocket-Accept and that the server picked
    // one of the offered subprotocols.
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, io, Some(tt_config(tuned))).await?;
    if resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).map(|v| v.as_bytes()) != Some(SUBPROTO.as_bytes()) {
        bail!("tt: subprotocol not negotiated");
    }
    Ok(ws)
}

struct SpawnExecutor;
impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::task::spawn(fut);
    }
}

async fn fws_connect(tcp: TcpStream, host: &str, token: &str) -> Result<fastwebsockets::WebSocket<Up>> {
    // fastwebsockets' client handshake is hyper's client: every WebSocket
    // header must be supplied by hand, and it does NOT verify
    // Sec-WebSocket-Accept nor the subprotocol, so we check the latter here.
    let req = Request::builder()
        .method("GET")
        .uri("/tunnel")
        .header(header::HOST, host)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(header::SEC_WEBSOCKET_KEY, fastwebsockets::handshake::generate_key())
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::AUTHORIZATION, token)
        .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTO)
        .body(Empty::<Bytes>::new())?;
    let (mut ws, resp) = fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await?;
    if resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).map(|v| v.as_bytes()) != Some(SUBPROTO.as_bytes()) {
        bail!("fws: subprotocol not negotiated");
    }
    fws_configure(&mut ws);
    Ok(ws)
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Raw,
    TtDirect,
    TtHyper,
    TtTuned,
    FwsHyper,
    FwsDirect,
}
impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Raw => "raw",
            Variant::TtDirect => "tt-direct",
            Variant::TtHyper => "tt-hyper",
            Variant::TtTuned => "tt-tuned",
            Variant::FwsHyper => "fws-hyper",
            Variant::FwsDirect => "fws-direct",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "raw" => Variant::Raw,
            "tt-direct" => Variant::TtDirect,
            "tt-hyper" => Variant::TtHyper,
            "tt-tuned" => Variant::TtTuned,
            "fws-hyper" => Variant::FwsHyper,
            "fws-direct" => Variant::FwsDirect,
            _ => bail!("unknown variant {s}"),
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Job {
    /// `msgs` messages of `size` bytes; c2s = client sends.
    Bulk { c2s: bool, msgs: usize, size: usize },
    /// `warmup + n` 64-byte round trips initiated by the client.
    Ping { n: usize, warmup: usize },
}
impl Job {
    fn max_msg(self) -> usize {
        match self {
            Job::Bulk { size, .. } => size,
            Job::Ping { .. } => 64,
        }
    }
}

#[derive(Default)]
struct Out {
    t0: Option<Instant>,
    t1: Option<Instant>,
    rtts_ns: Vec<u64>,
    /// CPU time (user + sys) this side's thread spent in the job.
    cpu_secs: f64,
}

/// CPU time consumed so far by the calling OS thread (CLOCK_THREAD_CPUTIME_ID).
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and a valid out-pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

async fn bulk_send(tx: &mut impl Tx, rx: &mut impl Rx, msgs: usize, size: usize) -> Result<Out> {
    rx.recv_exact(1).await.context("waiting for go")?;
    let t0 = Instant::now();
    for _ in 0..msgs {
        tx.send(size).await?;
    }
    tx.flush().await?;
    rx.recv_exact(1).await.context("waiting for ack")?;
    Ok(Out { t0: Some(t0), ..Default::default() })
}

async fn bulk_recv(tx: &mut impl Tx, rx: &mut impl Rx, msgs: usize, size: usize) -> Result<Out> {
    tx.send(1).await?;
    tx.flush().await?; // "go"
    let total = msgs * size;
    let mut got = 0usize;
    // Bounded: each recv returns >= 1 byte, so at most `total` iterations.
    for _ in 0..total {
        got += rx.recv().await?;
        if got >= total {
            break;
        }
    }
    let t1 = Instant::now();
    if got != total {
        bail!("received {got} bytes, expected {total}");
    }
    tx.send(1).await?;
    tx.flush().await?; // "ack"
    Ok(Out { t1: Some(t1), ..Default::default() })
}

async fn run_side(is_client: bool, tx: &mut impl Tx, rx: &mut impl Rx, job: Job) -> Result<Out> {
    let cpu0 = thread_cpu_secs();
    let mut out = run_side_inner(is_client, tx, rx, job).await?;
    out.cpu_secs = thread_cpu_secs() - cpu0;
    Ok(out)
}

async fn run_side_inner(is_client: bool, tx: &mut impl Tx, rx: &mut impl Rx, job: Job) -> Result<Out> {
    // Preamble: the client always speaks first (see fws_unwrap_upgraded).
    if is_client {
        tx.send(1).await?;
        tx.flush().await?;
    } else {
        rx.recv_exact(1).await.context("waiting for hello")?;
    }
    match job {
        Job::Bulk { c2s, msgs, size } => {
            if c2s == is_client {
                bulk_send(tx, rx, msgs, size).await
            } else {
                bulk_recv(tx, rx, msgs, size).await
            }
        }
        Job::Ping { n, warmup } => {
            let mut out = Out { rtts_ns: Vec::with_capacity(n), ..Default::default() };
            for i in 0..warmup + n {
                if is_client {
                    let t = Instant::now();
                    tx.send(64).await?;
                    tx.flush().await?;
                    rx.recv_exact(64).await?;
                    if i >= warmup {
                        out.rtts_ns.push(t.elapsed().as_nanos() as u64);
                    }
                } else {
                    rx.recv_exact(64).await?;
                    tx.send(64).await?;
                    tx.flush().await?;
                }
            }
            Ok(out)
        }
    }
}

async fn server_main(v: Variant, tcp: TcpStream, job: Job) -> Result<Out> {
    let m = job.max_msg();
    match v {
        Variant::Raw => {
            let (mut t, mut r) = raw_halves(tcp, m);
            run_side(false, &mut t, &mut r, job).await
        }
        Variant::TtDirect => {
            let (mut t, mut r) = tt_halves(tt_accept_direct(tcp).await?, m);
            run_side(false, &mut t, &mut r, job).await
        }
        Variant::TtHyper | Variant::TtTuned => {
            let tuned = v == Variant::TtTuned;
            let (mut t, mut r) = tt_halves(tt_accept_hyper(tcp, tuned).await?, m);
            run_side(false, &mut t, &mut r, job).await
        }
        Variant::FwsHyper => {
            let (mut t, mut r) = fws_halves(fws_accept_hyper(tcp).await?, m);
            run_side(false, &mut t, &mut r, job).await
        }
        Variant::FwsDirect => {
            let ws = fws_unwrap_upgraded(fws_accept_hyper(tcp).await?, fastwebsockets::Role::Server)?;
            let (mut t, mut r) = fws_halves(ws, m);
            run_side(false, &mut t, &mut r, job).await
        }
    }
}

async fn client_main(v: Variant, tcp: TcpStream, job: Job) -> Result<Out> {
    let m = job.max_msg();
    let host = tcp.peer_addr()?.to_string();
    match v {
        Variant::Raw => {
            let (mut t, mut r) = raw_halves(tcp, m);
            run_side(true, &mut t, &mut r, job).await
        }
        Variant::TtDirect | Variant::TtHyper | Variant::TtTuned => {
            let tuned = v == Variant::TtTuned;
            let (mut t, mut r) = tt_halves(tt_connect(tcp, &host, TOKEN, tuned).await?, m);
            run_side(true, &mut t, &mut r, job).await
        }
        Variant::FwsHyper => {
            let (mut t, mut r) = fws_halves(fws_connect(tcp, &host, TOKEN).await?, m);
            run_side(true, &mut t, &mut r, job).await
        }
        Variant::FwsDirect => {
            let ws = fws_unwrap_upgraded(fws_connect(tcp, &host, TOKEN).await?, fastwebsockets::Role::Client)?;
            let (mut t, mut r) = fws_halves(ws, m);
            run_side(true, &mut t, &mut r, job).await
        }
    }
}

/// Runs `server` and `client` on two threads with one current-thread runtime
/// each, connected over 127.0.0.1.
fn run_pair<SF, SFut, SR, CF, CFut, CR>(server: SF, client: CF) -> Result<(SR, CR)>
where
    SF: FnOnce(TcpStream) -> SFut + Send + 'static,
    SFut: Future<Output = Result<SR>>,
    SR: Send + 'static,
    CF: FnOnce(TcpStream) -> CFut + Send + 'static,
    CFut: Future<Output = Result<CR>>,
    CR: Send + 'static,
{
    run_pair_mode(server, client, false)
}

/// `same_thread`: both ends are polled by ONE current-thread runtime on one
/// OS thread (tokio::join!), so a round trip involves no cross-CPU wake-up.
/// This isolates the libraries' per-message CPU path from the VM's idle
/// wake-up latency, which dominates the two-thread figure on this machine.
fn run_pair_mode<SF, SFut, SR, CF, CFut, CR>(server: SF, client: CF, same_thread: bool) -> Result<(SR, CR)>
where
    SF: FnOnce(TcpStream) -> SFut + Send + 'static,
    SFut: Future<Output = Result<SR>>,
    SR: Send + 'static,
    CF: FnOnce(TcpStream) -> CFut + Send + 'static,
    CFut: Future<Output = Result<CR>>,
    CR: Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if same_thread {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return rt.block_on(async move {
            let l = TcpListener::from_std(listener)?;
            let srv = async move {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                server(s).await
            };
            let cli = async move {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                client(s).await
            };
            let (s, c) = tokio::time::timeout(RUN_TIMEOUT, async { tokio::join!(srv, cli) })
                .await
                .context("same-thread run timed out")?;
            Ok((s.context("server")?, c.context("client")?))
        });
    }
    let srv = std::thread::spawn(move || -> Result<SR> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let l = TcpListener::from_std(listener)?;
            let (s, _) = tokio::time::timeout(RUN_TIMEOUT, l.accept()).await.context("accept timed out")??;
            s.set_nodelay(true)?;
            tokio::time::timeout(RUN_TIMEOUT, server(s)).await.context("server side timed out")?
        })
    });
    let cli = std::thread::spawn(move || -> Result<CR> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            tokio::time::timeout(RUN_TIMEOUT, client(s)).await.context("client side timed out")?
        })
    });
    let c = cli.join().map_err(|_| anyhow!("client thread panicked"))?;
    let s = srv.join().map_err(|_| anyhow!("server thread panicked"))?;
    Ok((s.context("server")?, c.context("client")?))
}

fn run_job(v: Variant, job: Job, same_thread: bool) -> Result<(Out, Out)> {
    run_pair_mode(
        move |tcp| server_main(v, tcp, job),
        move |tcp| client_main(v, tcp, job),
        same_thread,
    )
}

/// MiB/s for one bulk transfer.
/// (MiB/s, CPU seconds per GiB summed over both ends) for one bulk transfer.
fn measure_bulk(v: Variant, c2s: bool, total_mib: usize, size: usize) -> Result<(f64, f64)> {
    let msgs = total_mib * 1024 * 1024 / size;
    let (s, c) = run_job(v, Job::Bulk { c2s, msgs, size }, false)?;
    let (t0, t1) = if c2s { (c.t0, s.t1) } else { (s.t0, c.t1) };
    let (t0, t1) = (t0.context("no t0")?, t1.context("no t1")?);
    let secs = t1.duration_since(t0).as_secs_f64();
    let mib = (msgs * size) as f64 / (1024.0 * 1024.0);
    Ok((mib / secs, (s.cpu_secs + c.cpu_secs) / (mib / 1024.0)))
}

/// (median µs, p99 µs) of 64-byte round trips.
fn measure_ping(v: Variant, n: usize, same_thread: bool) -> Result<(f64, f64)> {
    let (_, c) = run_job(v, Job::Ping { n, warmup: n / 20 }, same_thread)?;
    let mut r = c.rtts_ns;
    r.sort_unstable();
    let pick = |q: f64| r[((r.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    Ok((pick(0.5), pick(0.99)))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// Functional / ergonomics checks (not timed)
// ---------------------------------------------------------------------------

fn check(name: &str, r: Result<String>) -> bool {
    match r {
        Ok(detail) => {
            println!("  [ok]   {name}: {detail}");
            true
        }
        Err(e) => {
            println!("  [FAIL] {name}: {e:#}");
            false
        }
    }
}

/// Bad bearer token must be refused with 401 and the client must see it.
fn check_reject(v: Variant) -> Result<String> {
    let (srv, cli) = run_pair(
        move |tcp| async move {
            // A refused upgrade surfaces as "connection closed before upgrade".
            let r = match v {
                Variant::TtDirect => tt_accept_direct(tcp).await.map(|_| ()),
                Variant::TtHyper => tt_accept_hyper(tcp, false).await.map(|_| ()),
                _ => fws_accept_hyper(tcp).await.map(|_| ()),
            };
            Ok(r.is_err())
        },
        move |tcp| async move {
            let host = tcp.peer_addr()?.to_string();
            Ok(match v {
                Variant::TtDirect | Variant::TtHyper => match tt_connect(tcp, &host, "Bearer wrong", false).await {
                    Ok(_) => "accepted?!".to_string(),
                    Err(e) => format!("{e}"),
                },
                _ => match fws_connect(tcp, &host, "Bearer wrong").await {
                    Ok(_) => "accepted?!".to_string(),
                    Err(e) => format!("{e}"),
                },
            })
        },
    )?;
    if !srv || !cli.contains("401") {
        bail!("server refused={srv}, client saw: {cli}");
    }
    Ok(format!("client error: {cli}"))
}

/// Split halves in separate tasks on both ends: the server's writer task
/// streams data while its reader task is parked; a client Ping must be
/// answered while split; a client Close must be echoed and end both readers.
/// Also: a message above the configured max size is refused.
fn check_split_tt(oversize: bool) -> Result<String> {
    let (srv, cli) = run_pair(
        move |tcp| async move {
            let io = hyper_accept(tcp, tt_hyper_upgrade).await?;
            let mut cfg = tt_config(false);
            if oversize {
                cfg = cfg.max_message_size(Some(64 * 1024));
            }
            let ws = WebSocketStream::from_raw_socket(io, TtRole::Server, Some(cfg)).await;
            let (mut sink, mut stream) = ws.split();
            let writer = tokio::spawn(async move {
                for i in 0..10u8 {
                    sink.send(Message::Binary(Bytes::from(vec![i; 1000]))).await?;
                }
                anyhow::Ok(sink)
            });
            let reader = tokio::spawn(async move {
                let mut log = Vec::new();
                for _ in 0..100 {
                    match stream.next().await {
                        Some(Ok(Message::Ping(p))) => log.push(format!("ping({})", p.len())),
                        Some(Ok(Message::Close(c))) => log.push(format!("close({:?})", c.map(|c| u16::from(c.code)))),
                        Some(Ok(Message::Binary(b))) => log.push(format!("bin({})", b.len())),
                        Some(Ok(m)) => log.push(format!("{m:?}")),
                        Some(Err(e)) => {
                            log.push(format!("err({e})"));
                            break;
                        }
                        None => {
                            log.push("end".into());
                            break;
                        }
                    }
                }
                log
            });
            let _sink = writer.await??;
            let log = reader.await?;
            Ok(log.join(","))
        },
        move |tcp| async move {
            let host = tcp.peer_addr()?.to_string();
            let ws = tt_connect(tcp, &host, TOKEN, false).await?;
            let (mut sink, mut stream) = ws.split();
            let reader = tokio::spawn(async move {
                let (mut data, mut pong, mut close) = (0, false, false);
                for _ in 0..100 {
                    match stream.next().await {
                        Some(Ok(Message::Binary(_))) => data += 1,
                        Some(Ok(Message::Pong(_))) => pong = true,
                        Some(Ok(Message::Close(_))) => close = true,
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
                (data, pong, close)
            });
            sink.send(Message::Ping(Bytes::from_static(b"p1"))).await?;
            if oversize {
                // 128 KiB > server's 64 KiB limit: server reader must error out.
                sink.send(Message::Binary(Bytes::from(vec![0u8; 128 * 1024]))).await?;
            } else {
                sink.send(Message::Close(None)).await?;
            }
            let (data, pong, close) = tokio::time::timeout(Duration::from_secs(5), reader).await??;
            Ok(format!("client got data={data} pong={pong} close-reply={close}"))
        },
    )?;
    Ok(format!("server reader: [{srv}]; {cli}"))
}

fn check_split_fws(oversize: bool) -> Result<String> {
    use fastwebsockets::{Frame, OpCode, Payload};
    let (srv, cli) = run_pair(
        move |tcp| async move {
            let mut ws = fws_accept_hyper(tcp).await?;
            if oversize {
                ws.set_max_message_size(64 * 1024);
            }
            let (mut r, mut w) = ws.split(tokio::io::split);
            // Obligated frames (pong, close reply) from the read half must be
            // routed to whoever owns the write half: here, via a channel.
            let (otx, mut orx) = tokio::sync::mpsc::channel::<(OpCode, Vec<u8>)>(16);
            let writer = tokio::spawn(async move {
                for i in 0..10u8 {
                    w.write_frame(Frame::binary(Payload::Owned(vec![i; 1000]))).await?;
                }
                while let Some((op, p)) = orx.recv().await {
                    w.write_frame(Frame::new(true, op, None, Payload::Owned(p))).await?;
                    if op == OpCode::Close {
                        break;
                    }
                }
                anyhow::Ok(())
            });
            let reader = tokio::spawn(async move {
                let mut log = Vec::new();
                let mut send_fn = |f: Frame<'_>| {
                    let otx = otx.clone();
                    let op = f.opcode;
                    let p: Vec<u8> = f.payload.into();
                    async move { otx.send((op, p)).await.map_err(|e| std::io::Error::other(e.to_string())) }
                };
                for _ in 0..100 {
                    match r.read_frame(&mut send_fn).await {
                        Ok(f) => {
                            log.push(format!("{:?}({})", f.opcode, f.payload.len()));
                            if f.opcode == OpCode::Close {
                                break;
                            }
                        }
                        Err(e) => {
                            log.push(format!("err({e})"));
                            break;
                        }
                    }
                }
                drop(otx);
                log
            });
            let log = reader.await?;
            let _ = writer.await?;
            Ok(log.join(","))
        },
        move |tcp| async move {
            let host = tcp.peer_addr()?.to_string();
            let ws = fws_connect(tcp, &host, TOKEN).await?;
            let (mut r, mut w) = ws.split(tokio::io::split);
            let reader = tokio::spawn(async move {
                let (mut data, mut pong, mut close) = (0, false, false);
                for _ in 0..100 {
                    match r.read_frame(&mut |_f| async { Ok::<(), std::io::Error>(()) }).await {
                        Ok(f) => match f.opcode {
                            OpCode::Binary => data += 1,
                            OpCode::Pong => pong = true,
                            OpCode::Close => {
                                close = true;
                                break;
                            }
                            _ => {}
                        },
                        Err(_) => break,
                    }
                }
                (data, pong, close)
            });
            w.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Owned(b"p1".to_vec()))).await?;
            if oversize {
                w.write_frame(Frame::binary(Payload::Owned(vec![0u8; 128 * 1024]))).await?;
            } else {
                w.write_frame(Frame::close(1000, b"")).await?;
            }
            let (data, pong, close) = tokio::time::timeout(Duration::from_secs(5), reader).await??;
            Ok(format!("client got data={data} pong={pong} close-reply={close}"))
        },
    )?;
    Ok(format!("server reader: [{srv}]; {cli}"))
}

fn run_checks() -> bool {
    println!("## Functional checks (handshake headers, split halves, control frames, size limit)");
    let mut ok = true;
    for v in [Variant::TtDirect, Variant::TtHyper, Variant::FwsHyper] {
        ok &= check(&format!("{}: bad bearer -> 401", v.name()), check_reject(v));
    }
    ok &= check("tt-hyper: split, ping while split, close", check_split_tt(false));
    ok &= check("tt-hyper: split, ping, 128 KiB > 64 KiB limit", check_split_tt(true));
    ok &= check("fws-hyper: split, ping while split, close", check_split_fws(false));
    ok &= check("fws-hyper: split, ping, 128 KiB > 64 KiB limit", check_split_fws(true));
    println!();
    ok
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

struct Args {
    mib: usize,
    reps: usize,
    rtt: usize,
    sizes_kib: Vec<usize>,
    variants: Vec<Variant>,
    checks: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        mib: 2048,
        reps: 3,
        rtt: 20_000,
        sizes_kib: vec![32, 256],
        variants: vec![
            Variant::Raw,
            Variant::TtDirect,
            Variant::TtHyper,
            Variant::TtTuned,
            Variant::FwsHyper,
            Variant::FwsDirect,
        ],
        checks: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--mib" => a.mib = val()?.parse()?,
            "--reps" => a.reps = val()?.parse()?,
            "--rtt" => a.rtt = val()?.parse()?,
            "--sizes" => a.sizes_kib = val()?.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?,
            "--variants" => {
                a.variants = val()?.split(',').map(Variant::parse).collect::<Result<_>>()?;
                if !a.variants.contains(&Variant::Raw) {
                    a.variants.insert(0, Variant::Raw); // ratios need the baseline
                }
            }
            "--no-checks" => a.checks = false,
            "-h" | "--help" => {
                println!(
                    "wslib-bench [--mib 2048] [--reps 3] [--rtt 20000] [--sizes 32,256] \
                     [--variants raw,tt-direct,tt-hyper,tt-tuned,fws-hyper,fws-direct] [--no-checks]\n\
                     env TT_WRITE_BUF / TT_READ_BUF override tokio-tungstenite's buffer sizes (tuning only)"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {k} (try --help)"),
        }
    }
    if a.reps == 0 || a.mib == 0 || a.rtt < 100 || a.sizes_kib.is_empty() {
        bail!("bad arguments");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    println!(
        "# wslib-bench: {} MiB per transfer, sizes {:?} KiB, {} x 64 B round trips, median of {} runs, 127.0.0.1",
        args.mib, args.sizes_kib, args.rtt, args.reps
    );
    println!("loadavg at start: {}", loadavg());
    println!();
    let checks_ok = if args.checks { run_checks() } else { true };

    // Interleave variants inside each repetition so slow drift on the shared
    // machine hits all variants alike.
    let dirs = [(true, "c2s"), (false, "s2c")];
    let ncols = args.sizes_kib.len() * dirs.len();
    let nv = args.variants.len();
    let mut thr: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); ncols]; nv];
    let mut cpu: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); ncols]; nv];
    let mut lat: Vec<Vec<(f64, f64)>> = vec![Vec::new(); nv];
    let mut lat1: Vec<Vec<(f64, f64)>> = vec![Vec::new(); nv];
    // Order: rep -> cell -> variant, so the variants of one cell are measured
    // back to back (a few seconds apart) and ratios to raw are taken within
    // the same rep; this keeps load changes from other users of the machine
    // from skewing one variant more than another.
    for rep in 0..args.reps {
        let mut col = 0;
        for &kib in &args.sizes_kib {
            for &(c2s, dname) in &dirs {
                for (vi, &v) in args.variants.iter().enumerate() {
                    let (r, c) = measure_bulk(v, c2s, args.mib, kib * 1024)
                        .with_context(|| format!("{} {dname} {kib}KiB", v.name()))?;
                    eprintln!("rep {rep} {:<12} {dname} {kib:>3} KiB: {r:8.0} MiB/s  {c:.3} CPU-s/GiB", v.name());
                    thr[vi][col].push(r);
                    cpu[vi][col].push(c);
                }
                col += 1;
            }
        }
        for (vi, &v) in args.variants.iter().enumerate() {
            let (p50, p99) = measure_ping(v, args.rtt, false).with_context(|| format!("{} ping", v.name()))?;
            eprintln!("rep {rep} {:<12} ping 2 threads: p50 {p50:.1} us  p99 {p99:.1} us", v.name());
            lat[vi].push((p50, p99));
            let (p50, p99) = measure_ping(v, args.rtt, true).with_context(|| format!("{} ping 1 thread", v.name()))?;
            eprintln!("rep {rep} {:<12} ping 1 thread:  p50 {p50:.1} us  p99 {p99:.1} us", v.name());
            lat1[vi].push((p50, p99));
        }
    }

    let raw = args.variants.iter().position(|&v| v == Variant::Raw).unwrap();
    let thr_med: Vec<Vec<f64>> = thr.iter().map(|cols| cols.iter().map(|c| median(c.clone())).collect()).collect();
    let med2 = |lat: &Vec<Vec<(f64, f64)>>| -> Vec<(f64, f64)> {
        lat.iter()
            .map(|l| (median(l.iter().map(|x| x.0).collect()), median(l.iter().map(|x| x.1).collect())))
            .collect()
    };
    let lat_med = med2(&lat);
    let lat1_med = med2(&lat1);
    // Median over reps of the per-rep ratio to raw TCP.
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let lat_ratio = |lat: &Vec<Vec<(f64, f64)>>, vi: usize, q: usize| {
        let pick = |l: &Vec<(f64, f64)>| l.iter().map(|x| if q == 0 { x.0 } else { x.1 }).collect::<Vec<_>>();
        ratio(&pick(&lat[vi]), &pick(&lat[raw]))
    };

    println!(
        "## Throughput, MiB/s (median of {}); in parentheses: median of the per-rep ratios to raw TCP",
        args.reps
    );
    print!("| variant |");
    for &kib in &args.sizes_kib {
        for &(_, d) in &dirs {
            print!(" {kib} KiB {d} |");
        }
    }
    println!();
    println!("|---|{}", "---:|".repeat(ncols));
    for (vi, &v) in args.variants.iter().enumerate() {
        print!("| {} |", v.name());
        for c in 0..ncols {
            print!(" {:.0} ({:.2}) |", thr_med[vi][c], ratio(&thr[vi][c], &thr[raw][c]));
        }
        println!();
    }
    println!();
    println!(
        "## CPU cost, CPU-seconds per GiB moved, client + server threads (user + sys; median of {}); \
         in parentheses: median of per-rep ratios to raw TCP. Less sensitive to other load than MiB/s.",
        args.reps
    );
    print!("| variant |");
    for &kib in &args.sizes_kib {
        for &(_, d) in &dirs {
            print!(" {kib} KiB {d} |");
        }
    }
    println!();
    println!("|---|{}", "---:|".repeat(ncols));
    for (vi, &v) in args.variants.iter().enumerate() {
        print!("| {} |", v.name());
        for c in 0..ncols {
            print!(" {:.3} ({:.2}) |", median(cpu[vi][c].clone()), ratio(&cpu[vi][c], &cpu[raw][c]));
        }
        println!();
    }
    println!();
    println!(
        "## Latency, 64 B round trip, µs (median of {} runs of {} round trips; ratios = median of per-rep ratios)",
        args.reps, args.rtt
    );
    println!("2 threads = client and server on separate threads/cores (realistic, includes the VM's wake-up latency);");
    println!("1 thread = both ends on one runtime thread (pure per-message CPU + syscall path).");
    println!();
    println!("| variant | 2 threads p50 | p99 | p50 / raw | p99 / raw | 1 thread p50 | p99 | p50 / raw | p99 / raw |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (vi, &v) in args.variants.iter().enumerate() {
        let (a50, a99) = lat_med[vi];
        let (b50, b99) = lat1_med[vi];
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} |",
            v.name(),
            a50,
            a99,
            lat_ratio(&lat, vi, 0),
            lat_ratio(&lat, vi, 1),
            b50,
            b99,
            lat_ratio(&lat1, vi, 0),
            lat_ratio(&lat1, vi, 1)
        );
    }
    println!();
    println!("## All runs (MiB/s; per column: {})", {
        let mut s = Vec::new();
        for &kib in &args.sizes_kib {
            for &(_, d) in &dirs {
                s.push(format!("{kib}K-{d}"));
            }
        }
        s.join(", ")
    });
    for (vi, &v) in args.variants.iter().enumerate() {
        let cols: Vec<String> = thr[vi]
            .iter()
            .map(|c| c.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join("/"))
            .collect();
        let l: Vec<String> = lat[vi].iter().map(|(a, b)| format!("{a:.1}/{b:.1}")).collect();
        let l1: Vec<String> = lat1[vi].iter().map(|(a, b)| format!("{a:.1}/{b:.1}")).collect();
        println!(
            "- {}: {} | p50/p99 µs 2 threads: {} | 1 thread: {}",
            v.name(),
            cols.join(", "),
            l.join(" "),
            l1.join(" ")
        );
    }
    println!();
    println!("loadavg at end: {}", loadavg());
    println!("total wall time: {:.1} s; checks {}", started.elapsed().as_secs_f64(), if checks_ok { "passed" } else { "had failures" });
    Ok(())
}
