//! probe: a small loopback load tool for tether's benchmark suite.
//!
//! Servers: `echo-server`, `source-server`, `sink-server`.
//! Measurements: `rtt`, `connect`, `idle`, `many`, `fair`; `agents` holds
//! many idle agent sessions to a tether server (the scale benchmark).
//!
//! Every measurement prints exactly one result line of `key=value` pairs on
//! stdout (prefixed with the subcommand name) so `bench/run.sh` can parse it,
//! and is bounded both in count and in time (`--timeout-secs`): on timeout it
//! exits non-zero instead of hanging.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "Loopback load tool for tether's benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server; on the peer's FIN it finishes echoing and then sends its own FIN (half-close kept).
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Writes zeros to every connection as fast as it can, forever; ignores what it receives.
    SourceServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Reads and discards everything; sends FIN after the peer's FIN.
    SinkServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// A plain byte-copy relay (the limit for a hop that speaks no protocol): accepts on
    /// LISTEN, connects to TO, copies both ways with BUF-byte buffers, keeping half-close.
    /// One thread, no fork: its connection setup and round trip are a relay's, not a
    /// process start's.
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 256 * 1024)]
        buf: usize,
    },
    /// One connection, COUNT ping-pong round trips of SIZE bytes (after WARMUP ones) against an echo server.
    Rtt {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 500)]
        warmup: usize,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// COUNT sequential new connections, each: connect + 1-byte echo round trip (after WARMUP ones).
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Open COUNT connections to an echo server, one 1-byte round trip on each, print READY, hold them idle HOLD seconds.
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// Connections set up in parallel.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// CONNS connections at once, each doing SIZE-byte ping-pongs against an echo server for
    /// SECS seconds (after WARMUP_SECS): aggregate round trips per second.
    Many {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 50)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
    },
    /// Aggregate read throughput of STREAMS connections to a source server, optionally beside one
    /// more connection (via STALL_ADDR) that never reads.
    Fair {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 8)]
        streams: usize,
        #[arg(long)]
        stall_addr: Option<SocketAddr>,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        /// Time the stalled stream gets to fill its windows and buffers before the others start.
        #[arg(long, default_value_t = 1.0)]
        stall_fill_secs: f64,
    },
    /// Holds COUNT idle agent sessions to a tether server, speaking the agent protocol (the
    /// WebSocket upgrade with the agent's name and token, HELLO, heartbeats): agent `NAME-i`
    /// with token `TOKEN-i`, from source addresses 127.0.0.2, 127.0.0.3, ... (`--sources` of
    /// them, each with its own range of ports; `--source-net N` uses 127.N.0.2, ... instead, so
    /// a run right after another does not meet its TIME_WAIT sockets). Prints `READY agents ...` once all are up,
    /// holds them `--hold` seconds, then `DONE agents ... alive=N`.
    Agents {
        /// The server's address (plain ws on loopback).
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        sources: u8,
        #[arg(long, default_value_t = 0)]
        source_net: u8,
        #[arg(long, default_value = "load")]
        name: String,
        #[arg(long, default_value = "load-token")]
        token: String,
        #[arg(long, default_value_t = 10)]
        hold: u64,
        #[arg(long, default_value_t = 128)]
        parallel: usize,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // One thread: the probe must not compete for the machine's 2 cores more than the
    // thing it measures; servers and measurements alike are I/O bound.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::EchoServer { listen } => serve(listen, Kind::Echo).await,
            Cmd::SourceServer { listen } => serve(listen, Kind::Source).await,
            Cmd::SinkServer { listen } => serve(listen, Kind::Sink).await,
            Cmd::Relay { listen, to, buf } => relay(listen, to, buf).await,
            Cmd::Rtt { addr, count, size, warmup, timeout_secs } => {
                bounded(timeout_secs, "rtt", rtt(addr, count, size, warmup)).await
            }
            Cmd::Connect { addr, count, warmup, timeout_secs } => {
                bounded(timeout_secs, "connect", connect(addr, count, warmup)).await
            }
            Cmd::Idle { addr, count, hold, parallel, timeout_secs } => {
                idle(addr, count, hold, parallel, timeout_secs).await
            }
            Cmd::Many { addr, conns, size, secs, warmup_secs } => {
                bounded((secs + warmup_secs) as u64 + 30, "many", many(addr, conns, size, secs, warmup_secs)).await
            }
            Cmd::Fair { addr, streams, stall_addr, secs, warmup_secs, stall_fill_secs } => {
                fair(addr, streams, stall_addr, secs, warmup_secs, stall_fill_secs).await
            }
            Cmd::Agents { addr, count, sources, source_net, name, token, hold, parallel, timeout_secs } => {
                agents(AgentLoad { addr, count, sources, source_net, name, token, hold, parallel, timeout_secs }).await
            }
        }
    })
}

async fn bounded<F: std::future::Future<Output = Result<()>>>(secs: u64, what: &str, f: F) -> Result<()> {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(r) => r,
        Err(_) => bail!("{what}: did not finish within {secs} s"),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Source,
    Sink,
}

async fn serve(listen: SocketAddr, kind: Kind) -> Result<()> {
    let l = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    eprintln!("listening on {}", l.local_addr()?);
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = match kind {
                Kind::Echo => echo_conn(s).await,
                Kind::Source => source_conn(s).await,
                Kind::Sink => sink_conn(s).await,
            };
        });
    }
}

async fn relay(listen: SocketAddr, to: SocketAddr, buf: usize) -> Result<()> {
    let l = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    eprintln!("relaying {} -> {to}", l.local_addr()?);
    loop {
        let (mut a, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let mut b = match TcpStream::connect(to).await {
                Ok(b) => b,
                Err(e) => return eprintln!("connect {to}: {e}"),
            };
            let _ = a.set_nodelay(true);
            let _ = b.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, buf, buf).await;
        });
    }
}

async fn echo_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            // Peer half-closed: everything was echoed; now close our side.
            return s.shutdown().await;
        }
        s.write_all(&buf[..n]).await?;
    }
}

async fn source_conn(s: TcpStream) -> std::io::Result<()> {
    let (mut r, mut w) = s.into_split();
    // Drain (and ignore) whatever the peer sends so it never blocks on us.
    tokio::spawn(async move {
        let mut b = vec![0u8; 4096];
        while let Ok(n) = r.read(&mut b).await {
            if n == 0 {
                break;
            }
        }
    });
    let buf = vec![0u8; 64 * 1024];
    loop {
        w.write_all(&buf).await?;
    }
}

async fn sink_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while s.read(&mut buf).await? != 0 {}
    s.shutdown().await
}

struct Stats {
    median: f64,
    p90: f64,
    p99: f64,
    min: f64,
    max: f64,
    mean: f64,
}

fn stats(mut us: Vec<f64>) -> Stats {
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| us[(((us.len() - 1) as f64) * p).round() as usize];
    Stats {
        median: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        min: us[0],
        max: us[us.len() - 1],
        mean: us.iter().sum::<f64>() / us.len() as f64,
    }
}

fn print_stats(what: &str, extra: &str, s: &Stats) {
    println!(
        "{what} {extra} median_us={:.1} p90_us={:.1} p99_us={:.1} min_us={:.1} max_us={:.1} mean_us={:.1}",
        s.median, s.p90, s.p99, s.min, s.max, s.mean
    );
}

async fn rtt(addr: SocketAddr, count: usize, size: usize, warmup: usize) -> Result<()> {
    if count == 0 || size == 0 {
        bail!("count and size must be > 0");
    }
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let out: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut inb = vec![0u8; size];
    let mut us = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        s.write_all(&out).await?;
        s.read_exact(&mut inb).await.context("echo closed early")?;
        let d = t.elapsed();
        if inb != out {
            bail!("echo returned different bytes");
        }
        if i >= warmup {
            us.push(d.as_secs_f64() * 1e6);
        }
    }
    print_stats("rtt", &format!("count={count} size={size}"), &stats(us));
    Ok(())
}

async fn connect(addr: SocketAddr, count: usize, warmup: usize) -> Result<()> {
    if count == 0 {
        bail!("count must be > 0");
    }
    let mut us = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        s.write_all(&[i as u8]).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.with_context(|| format!("connection {i}: echo closed early"))?;
        let d = t.elapsed();
        if b[0] != i as u8 {
            bail!("echo returned a different byte");
        }
        if i >= warmup {
            us.push(d.as_secs_f64() * 1e6);
        }
        drop(s);
    }
    print_stats("connect", &format!("count={count}"), &stats(us));
    Ok(())
}

async fn many(addr: SocketAddr, conns: usize, size: usize, secs: f64, warmup_secs: f64) -> Result<()> {
    if conns == 0 || size == 0 || secs <= 0.0 {
        bail!("conns, size and secs must be > 0");
    }
    let start = Instant::now() + Duration::from_secs_f64(warmup_secs);
    let end = start + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for c in 0..conns {
        set.spawn(async move {
            let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
            s.set_nodelay(true)?;
            let out: Vec<u8> = (0..size).map(|i| (i + c) as u8).collect();
            let mut inb = vec![0u8; size];
            let mut counted = 0u64;
            loop {
                let t = Instant::now();
                if t >= end {
                    return anyhow::Ok(counted);
                }
                s.write_all(&out).await?;
                s.read_exact(&mut inb).await.context("echo closed early")?;
                if inb != out {
                    bail!("echo returned different bytes");
                }
                if t >= start {
                    counted += 1;
                }
            }
        });
    }
    let mut total = 0u64;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    println!("many conns={conns} size={size} round_trips={total} per_sec={:.0}", total as f64 / secs);
    Ok(())
}

/// Runs `open(0) .. open(count - 1)`, at most `parallel` at a time; all the results in
/// the order they finished, or the first error.
async fn open_all<T, F, Fut>(count: usize, parallel: usize, open: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let parallel = parallel.clamp(1, count.max(1));
    let mut done = Vec::with_capacity(count);
    let mut set = tokio::task::JoinSet::new();
    let mut started = 0usize;
    while done.len() < count {
        while started < count && set.len() < parallel {
            set.spawn(open(started));
            started += 1;
        }
        match set.join_next().await {
            Some(r) => done.push(r??),
            None => break,
        }
    }
    Ok(done)
}

async fn open_one(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&[7]).await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(s)
}

async fn idle(addr: SocketAddr, count: usize, hold: u64, parallel: usize, timeout_secs: u64) -> Result<()> {
    let t = Instant::now();
    let setup = open_all(count, parallel, |i| async move {
        open_one(addr).await.with_context(|| format!("idle: connection {} of {count}", i + 1))
    });
    let mut conns = match tokio::time::timeout(Duration::from_secs(timeout_secs), setup).await {
        Ok(r) => r?,
        Err(_) => bail!("idle: opening {count} connections took more than {timeout_secs} s"),
    };
    println!("READY idle count={} setup_ms={:.0}", conns.len(), t.elapsed().as_secs_f64() * 1e3);
    tokio::time::sleep(Duration::from_secs(hold)).await;
    // Check every stream is still alive end to end after the idle period.
    let t2 = Instant::now();
    let mut alive = 0usize;
    let check = async {
        for s in conns.iter_mut() {
            let mut b = [0u8; 1];
            if s.write_all(&[9]).await.is_ok() && s.read_exact(&mut b).await.is_ok() && b[0] == 9 {
                alive += 1;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(timeout_secs), check).await;
    println!("DONE idle count={count} alive_after_hold={alive} check_ms={:.0}", t2.elapsed().as_secs_f64() * 1e3);
    drop(conns);
    Ok(())
}

async fn fair(
    addr: SocketAddr,
    streams: usize,
    stall_addr: Option<SocketAddr>,
    secs: f64,
    warmup_secs: f64,
    stall_fill_secs: f64,
) -> Result<()> {
    if streams == 0 || !(secs > 0.0 && secs <= 600.0) {
        bail!("streams must be > 0 and 0 < secs <= 600");
    }
    // The stalled stream: connected, never read. Keep it alive till the end.
    let _stalled = match stall_addr {
        Some(a) => {
            let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(a))
                .await
                .context("stall connect timed out")??;
            tokio::time::sleep(Duration::from_secs_f64(stall_fill_secs)).await;
            Some(s)
        }
        None => None,
    };
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..streams).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for i in 0..streams {
        let c = counters.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    anyhow::bail!("stream {i}: source closed");
                }
                c[i].fetch_add(n as u64, Ordering::Relaxed);
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(warmup_secs)).await;
    let snap = |c: &Vec<AtomicU64>| c.iter().map(|x| x.load(Ordering::Relaxed)).collect::<Vec<u64>>();
    let a = snap(&counters);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let b = snap(&counters);
    let el = t.elapsed().as_secs_f64();
    let mut failed = 0;
    for task in &tasks {
        if task.is_finished() {
            failed += 1;
        }
    }
    for task in tasks {
        task.abort();
    }
    let per: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (y - x) as f64 / el / (1024.0 * 1024.0)).collect();
    let total: f64 = per.iter().sum();
    let min = per.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = per.iter().cloned().fold(0.0, f64::max);
    println!(
        "fair streams={streams} stalled={} secs={el:.2} aggregate_mib_s={total:.1} min_stream_mib_s={min:.1} max_stream_mib_s={max:.1} failed_streams={failed}",
        stall_addr.is_some() as u8
    );
    if failed > 0 {
        bail!("{failed} streams ended early");
    }
    Ok(())
}

struct AgentLoad {
    addr: SocketAddr,
    count: usize,
    sources: u8,
    source_net: u8,
    name: String,
    token: String,
    hold: u64,
    parallel: usize,
    timeout_secs: u64,
}

/// One agent session: its connection and the (unused) streams the server would open.
type AgentSession = (tether_net::Connection, tether_net::session::IncomingStreams);

async fn agent_one(load: Arc<AgentLoad>, i: usize) -> Result<AgentSession> {
    use tether_proto::endpoints::{AGENT_INSTANCE_HEADER, AGENT_NAME_HEADER};
    let source = std::net::Ipv4Addr::new(127, load.source_net, 0, 2 + (i % usize::from(load.sources.max(1))) as u8);
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((source, 0))).with_context(|| format!("bind {source}"))?;
    let tcp = sock.connect(load.addr).await.with_context(|| format!("connect from {source}"))?;
    let name = format!("{}-{i}", load.name);
    let headers = vec![
        (AGENT_NAME_HEADER.to_owned(), name.clone()),
        (AGENT_INSTANCE_HEADER.to_owned(), format!("probe-{i}")),
        ("authorization".to_owned(), format!("Bearer {}-{i}", load.token)),
    ];
    let url = format!("ws://{}/tether/v1/agent", load.addr);
    let trust = tether_net::transport::tls::ServerTrust::SystemRoots;
    let (sink, source) = tether_net::transport::ws::dial_over(tcp, &url, tether_proto::SUBPROTOCOL, &headers, &trust, None)
        .await
        .with_context(|| format!("{name}: upgrade"))?;
    let cfg = tether_proto::Config { software: "probe-agents".into(), ..Default::default() };
    let (conn, _info, incoming) = tether_net::Connection::start(tether_proto::Role::Initiator, cfg, sink, source, name.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{name}: handshake: {e}"))?;
    Ok((conn, incoming))
}

async fn agents(load: AgentLoad) -> Result<()> {
    let t = Instant::now();
    let load = Arc::new(load);
    let (count, timeout_secs) = (load.count, load.timeout_secs);
    let setup = open_all(count, load.parallel, |i| agent_one(load.clone(), i));
    let sessions = match tokio::time::timeout(Duration::from_secs(timeout_secs), setup).await {
        Ok(r) => r?,
        Err(_) => bail!("agents: opening {count} sessions took more than {timeout_secs} s"),
    };
    println!("READY agents count={} setup_ms={:.0}", sessions.len(), t.elapsed().as_secs_f64() * 1e3);
    tokio::time::sleep(Duration::from_secs(load.hold)).await;
    let alive = sessions.iter().filter(|(c, _)| !c.is_closed()).count();
    println!("DONE agents count={count} alive={alive}");
    Ok(())
}
