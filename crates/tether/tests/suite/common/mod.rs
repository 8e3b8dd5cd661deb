//! Test harness: runs the real `tether` binary as separate processes on
//! loopback, plus small sample services, and reads their metrics.

#![allow(dead_code)]

pub(crate) mod ha;
pub(crate) mod kube;

pub(crate) mod web;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) const AGENT_TOKEN: &str = "agent-token-for-tests";
pub(crate) const CLIENT_TOKEN: &str = "client-token-for-tests";
pub(crate) const LIMITED_TOKEN: &str = "limited-token-for-tests";

pub(crate) use rustix::process::Signal;

/// Sends `sig` to process `pid`; a process that is already gone is not an
/// error. By syscall, never by running `kill(1)`: procps-ng 4.0.2 parses
/// `kill -KILL -1234` as `kill(-1, SIGKILL)`, every process on the machine.
/// Refuses pid 1 and the test process itself.
pub(crate) fn signal_process(pid: u32, sig: Signal) {
    if pid <= 1 || pid == std::process::id() {
        return;
    }
    if let Some(pid) = as_pid(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Sends `sig` to every process of the group `pgid` (a child started with
/// `process_group(0)` leads the group of its own id). Refuses group ids 0
/// and 1, which would reach the caller's own group or init's.
pub(crate) fn signal_group(pgid: u32, sig: Signal) {
    if pgid <= 1 {
        return;
    }
    if let Some(pgid) = as_pid(pgid) {
        let _ = rustix::process::kill_process_group(pgid, sig);
    }
}

fn as_pid(id: u32) -> Option<rustix::process::Pid> {
    i32::try_from(id)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The local port the web console suggests in its forward line for
/// `prod/echo` (stable per target: a hash of the name). The browser test
/// runs that line as printed, so no other test may be handed this port.
pub(crate) const CONSOLE_PROD_ECHO_PORT: u16 = 22064;

/// A free loopback port for a process to bind later. Picked below the
/// kernel's ephemeral range (32768+), so outgoing connections of parallel
/// tests cannot grab it between this check and the bind.
pub(crate) fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = (std::process::id() as usize * 7919) % 12000;
    for _ in 0..12000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + ((base + n * 13) % 12000) as u16;
        if port == CONSOLE_PROD_ECHO_PORT {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// A child process that is killed when dropped; its output goes to a log file.
pub(crate) struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &str, args: &[String]) -> Proc {
        Self::spawn_env(name, args, &[])
    }

    /// Like [`Proc::spawn`], with extra environment variables.
    pub(crate) fn spawn_env(name: &str, args: &[String], envs: &[(&str, &str)]) -> Proc {
        let dir = std::env::temp_dir().join(format!("tether-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("log dir");
        Proc::spawn_in_env(&ha::Net::Root, &dir, name, args, envs)
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, like a crash or a node going away.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `sig` (`Signal::TERM`, `Signal::HUP`, ...).
    pub(crate) fn signal(&self, sig: Signal) {
        signal_process(self.child.id(), sig);
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) until the log contains `needle`.
    pub(crate) fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} log ({}) -----", self.name, self.log.display());
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// Sends a WebSocket upgrade by hand and returns the status line and body.
pub(crate) fn raw_upgrade(addr: std::net::SocketAddr, path: &str, extra: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A plain HTTP GET on loopback (enough for /metrics and /healthz).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = StdStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Reads one sample of a metric (first line starting with `name` and a space or `{`).
pub(crate) fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with([' ', '{'])
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Server + agent (+ optional client) as three processes.
pub(crate) struct Tunnel {
    pub server: Proc,
    pub agent: Proc,
    pub server_port: u16,
    pub agent_metrics: SocketAddr,
}

pub(crate) struct Services {
    /// name -> address
    pub list: Vec<(String, SocketAddr)>,
}

impl Tunnel {
    pub(crate) fn server_args(port: u16) -> Vec<String> {
        [
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--agent",
            &format!("prod={AGENT_TOKEN}"),
            "--client",
            &format!("dev={CLIENT_TOKEN}=prod/*,prod/*:*,ghost/*"),
            "--client",
            &format!("limited={LIMITED_TOKEN}=prod/echo"),
            // Short, so tests that stop the server do not wait 10 s (the
            // delay itself is exercised by the ha tests).
            "--shutdown-delay-ms",
            "300",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Starts server and agent; `services` become `--service` flags.
    pub(crate) fn start(services: &[(&str, SocketAddr)], extra_agent_args: &[&str]) -> Tunnel {
        Self::start_with(services, &[], extra_agent_args)
    }

    /// Like [`Tunnel::start`], with extra server flags too.
    pub(crate) fn start_with(
        services: &[(&str, SocketAddr)],
        extra_server_args: &[&str],
        extra_agent_args: &[&str],
    ) -> Tunnel {
        Self::start_with_env(services, extra_server_args, extra_agent_args, &[])
    }

    /// Like [`Tunnel::start_with`], with environment variables for the
    /// server and the agent.
    pub(crate) fn start_with_env(
        services: &[(&str, SocketAddr)],
        extra_server_args: &[&str],
        extra_agent_args: &[&str],
        env: &[(&str, &str)],
    ) -> Tunnel {
        let server_port = free_port();
        let mut server_args = Self::server_args(server_port);
        server_args.extend(extra_server_args.iter().map(|s| s.to_string()));
        let server = Proc::spawn_env("server", &server_args, env);
        let server_addr: SocketAddr = format!("127.0.0.1:{server_port}").parse().unwrap();
        wait_until(Duration::from_secs(10), || {
            http_get(server_addr, "/healthz").is_some_and(|(s, _)| s == 200)
        });
        let metrics_port = free_port();
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--server".into(),
            format!("ws://127.0.0.1:{server_port}"),
            "--name".into(),
            "prod".into(),
            "--token".into(),
            AGENT_TOKEN.into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
        ];
        for (name, addr) in services {
            args.push("--service".into());
            args.push(format!("{name}={addr}"));
        }
        args.extend(extra_agent_args.iter().map(|s| s.to_string()));
        let agent = Proc::spawn_env("agent", &args, env);
        let t = Tunnel {
            server,
            agent,
            server_port,
            agent_metrics: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
        };
        assert!(
            wait_until(Duration::from_secs(15), || t.server_metric("tether_agents")
                == Some(1.0)),
            "agent did not register"
        );
        t
    }

    pub(crate) fn server_addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.server_port).parse().unwrap()
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.server_port)
    }

    pub(crate) fn server_metrics(&self) -> String {
        http_get(self.server_addr(), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub(crate) fn server_metric(&self, name: &str) -> Option<f64> {
        metric(&self.server_metrics(), name)
    }

    pub(crate) fn agent_metric(&self, name: &str) -> Option<f64> {
        http_get(self.agent_metrics, "/metrics").and_then(|(_, b)| metric(&b, name))
    }

    /// Starts a CLI client forwarding each `(local_port, target)`.
    pub(crate) fn client(&self, token: &str, forwards: &[(u16, &str)]) -> Proc {
        let p = forward_client(&self.url(), token, forwards);
        assert!(
            p.wait_log("connected", Duration::from_secs(10)),
            "client did not connect"
        );
        p
    }
}

/// Starts `tether client forward` to `server` (not waiting for it to connect).
pub(crate) fn forward_client(server: &str, token: &str, forwards: &[(u16, &str)]) -> Proc {
    forward_client_with(server, token, &[], forwards)
}

/// Like [`forward_client`], with client options (`--no-early-data`, ...)
/// before `forward`.
pub(crate) fn forward_client_with(
    server: &str,
    token: &str,
    options: &[&str],
    forwards: &[(u16, &str)],
) -> Proc {
    forward_client_with_env(server, token, options, forwards, &[])
}

/// Like [`forward_client_with`], with environment variables.
pub(crate) fn forward_client_with_env(
    server: &str,
    token: &str,
    options: &[&str],
    forwards: &[(u16, &str)],
    env: &[(&str, &str)],
) -> Proc {
    let mut args: Vec<String> = vec![
        "client".into(),
        "--server".into(),
        server.into(),
        "--token".into(),
        token.into(),
    ];
    args.extend(options.iter().map(|o| o.to_string()));
    args.push("forward".into());
    for (port, target) in forwards {
        args.push(format!("127.0.0.1:{port}={target}"));
    }
    Proc::spawn_env("client", &args, env)
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub(crate) fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

// ---------------------------------------------------------------------------
// Sample services (in the test process, on loopback).
// ---------------------------------------------------------------------------

/// A loopback listener for a test service, with the accept queue tether's
/// own listeners use: tests open hundreds of connections at once, and
/// `TcpListener::bind`'s 128 would drop (and now and then reset) some.
pub(crate) fn service_listener() -> TcpListener {
    tether_net::listen::bind("127.0.0.1:0".parse().unwrap()).expect("bind a test service")
}

/// Sends `msg` through the local forward at `port`, half-closes, and
/// reads the echo to its end.
pub(crate) async fn echo_through(port: u16, msg: &[u8]) -> Vec<u8> {
    let mut s = connect(port).await;
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    back
}

/// Echoes every byte back; closes its write side at EOF (keeps half-close).
pub(crate) async fn echo_service() -> SocketAddr {
    let l = service_listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Reads everything until EOF, then answers with the byte count and a
/// checksum: proves the service saw the client's half-close.
pub(crate) async fn count_then_answer_service() -> SocketAddr {
    let l = service_listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut n = 0u64;
                let mut h = Fnv::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => {
                            n += k as u64;
                            h.update(&buf[..k]);
                        }
                        Err(_) => return,
                    }
                }
                let _ = s
                    .write_all(format!("{n} {:016x}\n", h.finish()).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Writes `len` bytes of [`Pattern`] `len` to `w`.
pub(crate) async fn write_pattern<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    len: u64,
) -> std::io::Result<()> {
    let mut gen = Pattern::new(len);
    let mut buf = vec![0u8; 65536];
    let mut left = len;
    while left > 0 {
        let k = (left as usize).min(buf.len());
        gen.fill(&mut buf[..k]);
        w.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// Sends `len` deterministic bytes to every connection, then closes.
pub(crate) async fn source_service(len: u64) -> SocketAddr {
    let l = service_listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if write_pattern(&mut s, len).await.is_ok() {
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A tiny HTTP service answering every request with `body` (one request per
/// connection).
pub(crate) async fn http_service(body: &'static str) -> SocketAddr {
    let l = service_listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let line = head.lines().next().unwrap_or_default().to_owned();
                let reply = format!("{body}\nrequest: {line}\n");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                            reply.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A port where nothing listens (connection refused).
pub(crate) fn refused_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// A listener that never accepts and whose backlog is full, so new
/// connections hang in SYN: a service that does not answer.
pub(crate) fn blackhole_addr() -> (socket2_free::Holder, SocketAddr) {
    socket2_free::blackhole()
}

pub(crate) mod socket2_free {
    use super::*;

    /// Keeps the listener and the connections that fill its backlog alive.
    pub(crate) struct Holder {
        _listener: StdListener,
        _fill: Vec<StdStream>,
    }

    pub(crate) fn blackhole() -> (Holder, SocketAddr) {
        // std listens with a large backlog; fill it with connections nobody
        // accepts, until a connect attempt no longer completes at once.
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut fill = Vec::new();
        for _ in 0..5000 {
            match StdStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fill.push(s),
                Err(_) => break,
            }
        }
        (
            Holder {
                _listener: l,
                _fill: fill,
            },
            addr,
        )
    }
}

/// FNV-1a, for cheap checksums of test data.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }
    pub(crate) fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

/// A deterministic byte sequence seeded per stream (xorshift).
pub(crate) struct Pattern(u64);

impl Pattern {
    pub(crate) fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// Checks a received byte stream against [`Pattern`] generated in blocks.
pub(crate) struct Verifier {
    gen: Pattern,
    block: Vec<u8>,
    pos: usize,
    /// Bytes checked so far.
    pub total: u64,
    /// No byte differed so far.
    pub ok: bool,
}

impl Verifier {
    pub(crate) fn new(seed: u64, block: usize) -> Verifier {
        Verifier {
            gen: Pattern::new(seed),
            block: vec![0u8; block],
            pos: block,
            total: 0,
            ok: true,
        }
    }

    /// Feeds received bytes; `ok` turns false at the first wrong byte.
    pub(crate) fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.pos == self.block.len() {
                self.gen.fill(&mut self.block);
                self.pos = 0;
            }
            let n = data.len().min(self.block.len() - self.pos);
            if data[..n] != self.block[self.pos..self.pos + n] {
                self.ok = false;
            }
            self.pos += n;
            self.total += n as u64;
            data = &data[n..];
        }
    }
}

/// `streams` connections to the echo service behind `port` at once, stream
/// `i` sending `len` bytes of [`Pattern`] seeded `first_seed + i` and
/// reading them back; panics at the first byte that differs, a wrong
/// length, or a stream not done within `timeout`.
pub(crate) async fn echo_patterns(
    port: u16,
    streams: u64,
    len: usize,
    first_seed: u64,
    timeout: Duration,
) {
    let mut tasks = Vec::new();
    for i in 0..streams {
        let seed = first_seed + i;
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = connect(port).await.into_split();
            let writer = tokio::spawn(async move {
                let mut gen = Pattern::new(seed);
                let mut buf = vec![0u8; 65536];
                let mut left = len;
                while left > 0 {
                    gen.fill(&mut buf);
                    let k = left.min(buf.len());
                    w.write_all(&buf[..k]).await.unwrap();
                    left -= k;
                }
                w.shutdown().await.unwrap();
            });
            let mut v = Verifier::new(seed, 65536);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                v.update(&buf[..n]);
                assert!(
                    v.ok,
                    "stream {i} to port {port}: bytes differ within the first {}",
                    v.total
                );
            }
            writer.await.unwrap();
            assert_eq!(v.total, len as u64, "stream {i} to port {port}: length");
        }));
    }
    for task in tasks {
        tokio::time::timeout(timeout, task)
            .await
            .expect("streams finish")
            .unwrap();
    }
}

/// The byte at position `i` of the sample app's `/bytes` download.
pub(crate) fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// Connects to a local forward.
pub(crate) async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to forward")
}

/// Echoes every datagram back to its sender.
pub(crate) async fn udp_echo() -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// A loopback port free for both TCP and UDP.
pub(crate) fn free_udp_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A CLI-protocol session to the server at `ws_url` (`ws://host:port`) with
/// `token`, speaking tether-net directly (for exact refusal codes).
pub(crate) async fn cli_session(ws_url: &str, token: &str) -> tether_net::Connection {
    let (sink, source) = tether_net::transport::ws::dial(
        &format!("{ws_url}{}", tether_proto::endpoints::CLIENT_PATH),
        tether_proto::SUBPROTOCOL,
        &[("authorization".into(), format!("Bearer {token}"))],
        &Default::default(),
    )
    .await
    .expect("dial the client endpoint");
    let cfg = tether_proto::Config {
        accept_opens: false,
        ..Default::default()
    };
    tether_net::Connection::start(tether_proto::Role::Initiator, cfg, sink, source, "test")
        .await
        .expect("handshake")
        .0
}

/// The harness's own signal helpers: a group signal reaches every process of
/// that group and nothing else (the test process, which is in another group,
/// lives on to assert it).
#[test]
fn a_group_signal_reaches_the_whole_group_and_only_it() {
    use std::os::unix::process::CommandExt;
    let mut outside = Command::new("sleep").arg("30").spawn().expect("sleep");
    let mut leader = Command::new("sh")
        .args(["-c", "sleep 30 & echo $!; wait"])
        .process_group(0)
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(leader.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("child pid");
    let member: u32 = line.trim().parse().expect("a pid");
    signal_group(leader.id(), Signal::KILL);
    assert!(
        leader.wait().expect("wait").code().is_none(),
        "the leader was killed"
    );
    let member_gone = wait_until(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{member}")).exists()
            || std::fs::read_to_string(format!("/proc/{member}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(member_gone, "the group's other process was killed too");
    assert!(
        matches!(outside.try_wait(), Ok(None)),
        "a process outside the group is untouched"
    );
    signal_process(outside.id(), Signal::TERM);
    assert!(outside.wait().expect("wait").code().is_none());
}
