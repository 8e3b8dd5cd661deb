//! Server-side listeners: public ports bound to agent/service.

use crate::common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads a PROXY v2 header and answers with the source address it names.
async fn proxy_header_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let sig = b"\r\n\r\n\0\r\nQUIT\n";
                let answer = if &head[..12] != sig || head[12] != 0x21 || head[13] != 0x11 {
                    "bad header".to_owned()
                } else {
                    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let ip = std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                    let port = u16::from_be_bytes([body[8], body[9]]);
                    format!("src={ip}:{port}")
                };
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn connect_refused(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_their_agent_and_enforce_sources() {
    let echo = echo_service().await;
    let pp = proxy_header_service().await;
    let (pa, pb, pc, pd) = (free_port(), free_port(), free_port(), free_port());
    let pe = free_port();
    let dir = std::env::temp_dir().join(format!("tether-listeners-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[listener]]
listen = "127.0.0.1:{pa}"
target = "prod/echo"
allow_from = ["127.0.0.0/8"]
max_connections_per_source = 3

[[listener]]
listen = "127.0.0.1:{pb}"
target = "prod/pp"
proxy_protocol = true

[[listener]]
listen = "127.0.0.1:{pc}"
target = "prod/echo"
allow_from = ["10.0.0.0/8"]

[[listener]]
listen = "0.0.0.0:{pd}"
target = "prod/echo"
opens_per_sec_per_source = 0.5

[[listener]]
listen = "[::]:{pe}"
target = "prod/pp"
proxy_protocol = true
early_data = false
"#
        ),
    )
    .unwrap();
    let cfg_arg = cfg.display().to_string();
    let mut t = Tunnel::start_with(&[("echo", echo), ("pp", pp)], &["--config", &cfg_arg], &[]);
    assert!(t
        .server
        .wait_log(&format!("127.0.0.1:{pa}"), Duration::from_secs(5)));
    assert!(wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", pa)).is_ok()
    }));

    // Plain forwarding through the public port.
    let mut s = connect(pa).await;
    s.write_all(b"via listener").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "via listener");

    // One source holds at most 3 connections through it; the 4th is closed
    // at once, and a slot frees when a connection ends.
    let mut held = vec![];
    for _ in 0..3 {
        let mut s = connect(pa).await;
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let mut fourth = connect(pa).await;
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), fourth.read(&mut b))
        .await
        .expect("4th connection must be closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t.server.wait_log(
        "too many connections through this listener",
        Duration::from_secs(5)
    ));
    drop(held.pop());
    assert!(wait_until(Duration::from_secs(5), || {
        let m = t.server_metrics();
        metric(
            &m,
            "tether_limit_hits_total{limit=\"listener_connections_per_source\"}",
        ) == Some(1.0)
    }));
    let ok = wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", pa))
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"y")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)
            })
            .is_ok()
    });
    assert!(ok, "a freed slot is usable again");
    drop(held);

    // One source opening connections faster than the listener allows
    // (0.5 a second, a burst of 1) is closed at accept; another source is
    // not held up by it.
    let echoes_from = |source: &'static str| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let Ok(mut s) = sock.connect(([127, 0, 0, 1], pd).into()).await else {
            return false;
        };
        let _ = s.write_all(b"r").await;
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await,
            Ok(Ok(_))
        )
    };
    let mut first = false;
    for _ in 0..50 {
        // (Until the listener is bound: refused connects take no token.)
        if echoes_from("127.0.0.1").await {
            first = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first, "{}", t.server.log_text());
    assert!(
        !echoes_from("127.0.0.1").await,
        "a second connection within 2 s"
    );
    assert!(echoes_from("127.0.0.2").await, "another source");
    assert!(t
        .server
        .wait_log("faster than it allows", Duration::from_secs(5)));
    let m = t.server_metrics();
    assert!(
        metric(
            &m,
            "tether_limit_hits_total{limit=\"listener_opens_per_source\"}"
        ) >= Some(1.0),
        "{m}"
    );

    // The PROXY v2 header carries the real client address.
    let mut s = connect(pb).await;
    let me = s.local_addr().unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, format!("src={}:{}", me.ip(), me.port()));
    // Through a dual-stack socket an IPv4 client is named as IPv4 (not
    // `::ffff:127.0.0.1` as TCP6), and with early data off the header
    // still comes first.
    let mut s = connect(pe).await;
    let me = s.local_addr().unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, format!("src={}:{}", me.ip(), me.port()));

    // A source outside allow_from is closed at once.
    let mut s = connect(pc).await;
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(t
        .server
        .wait_log("outside allow_from", Duration::from_secs(5)));

    // The agent goes away: the ports close.
    t.agent.kill();
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            pa
        ))
        .is_err()),
        "listener must close when its agent leaves"
    );
    assert!(connect_refused(pb).await);

    // It comes back: the same ports open again, no "address already in use".
    let _agent2 = Proc::spawn(
        "agent-again",
        &[
            "agent".into(),
            "--server".into(),
            t.url(),
            "--name".into(),
            "prod".into(),
            "--token".into(),
            AGENT_TOKEN.into(),
            "--service".into(),
            format!("echo={echo}"),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(15), || std::net::TcpStream::connect((
            "127.0.0.1",
            pa
        ))
        .is_ok()),
        "listener must reopen: {}",
        t.server.log_text()
    );
    let mut s = connect(pa).await;
    s.write_all(b"again").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "again");
    assert!(!t.server.log_text().contains("Address already in use"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_listener_forwards_datagrams_while_the_agent_is_connected() {
    // A UDP echo service behind the agent.
    let svc_addr = udp_echo().await;
    let port = free_udp_port();
    let dir = std::env::temp_dir().join(format!("tether-udp-listener-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"prod/uecho\"\nprotocol = \"udp\"\n\
             [cluster]\nshutdown_delay_ms = 0\ndrain_timeout_ms = 5000\n"
        ),
    )
    .unwrap();
    let cfg_arg = cfg.display().to_string();
    let t = Tunnel::start_with(&[("uecho", svc_addr)], &["--config", &cfg_arg], &[]);
    assert!(t
        .server
        .wait_log("udp listener open", Duration::from_secs(10)));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = vec![0u8; 65536];
    for i in 0..20u8 {
        let d = vec![i; 100 + i as usize];
        sock.send(&d).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("echo through the udp listener")
            .unwrap();
        assert_eq!(&buf[..n], &d[..]);
    }
    // A flow counts as a live stream, like a TCP connection.
    assert_eq!(t.server_metric("tether_live_streams"), Some(1.0));
    assert_eq!(t.server_metric("tether_streams_total"), Some(1.0));
    // Shutting down, the listener takes no new flow (a new source gets no
    // answer), while the flow it carries keeps echoing through the drain.
    t.server.signal(Signal::TERM);
    assert!(t
        .server
        .wait_log("draining: GOAWAY", Duration::from_secs(10)));
    let late = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    late.connect(("127.0.0.1", port)).await.unwrap();
    late.send(b"too late").await.unwrap();
    sock.send(b"still here").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .expect("the open flow echoes during the drain")
        .unwrap();
    assert_eq!(&buf[..n], b"still here");
    let late_answer = tokio::time::timeout(Duration::from_secs(1), late.recv(&mut buf)).await;
    assert!(
        late_answer.is_err(),
        "a new flow was opened during the drain: {late_answer:?}\n{}",
        t.server.log_text()
    );
    // Ended by the drain, the flow leaves an audit line with its source
    // and its bytes (20 datagrams of 100 to 119 bytes, and "still here").
    let audit = format!("identity=\"listener udp 127.0.0.1:{port} from 127.0.0.1:");
    assert!(
        t.server.wait_log(&audit, Duration::from_secs(15)),
        "{}",
        t.server.log_text()
    );
    let log = t.server.log_text();
    let line = log.lines().find(|l| l.contains(&audit)).unwrap_or_default();
    assert!(
        line.contains("protocol=\"udp\"") || line.contains("protocol=udp"),
        "{line}"
    );
    assert!(
        line.contains("bytes_up=2200") && line.contains("bytes_down=2200"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dual-stack UDP listener takes IPv4 sources its `allow_from` names;
/// a flood of made-up sources past the open rate is logged a second apart
/// at most, not a line (or two) per source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_refusals_from_many_sources_are_logged_a_second_apart() {
    let svc_addr = udp_echo().await;
    let port = free_udp_port();
    let dir = std::env::temp_dir().join(format!("tether-udp-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nlisten = \"[::]:{port}\"\ntarget = \"prod/uecho\"\nprotocol = \"udp\"\n\
             allow_from = [\"127.0.0.0/8\"]\n[limits]\nopens_per_sec = 1\nopen_burst = 1\n"
        ),
    )
    .unwrap();
    let cfg_arg = cfg.display().to_string();
    let t = Tunnel::start_with(&[("uecho", svc_addr)], &["--config", &cfg_arg], &[]);
    assert!(t
        .server
        .wait_log("udp listener open", Duration::from_secs(10)));
    // An IPv4 source on the [::] socket (::ffff:127.0.0.1) is in allow_from.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(("127.0.0.1", port)).await.unwrap();
    sock.send(b"hello").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("an allowed IPv4 source answered through the dual-stack listener")
        .unwrap();
    assert_eq!(&buf[..n], b"hello");
    // 300 sources, one datagram each, as fast as they go: past the rate.
    let flood = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = std::time::Instant::now();
    for _ in 0..300 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"x", ("127.0.0.1", port)).unwrap();
    }
    drop(flood);
    std::thread::sleep(Duration::from_secs(2));
    let seconds = started.elapsed().as_secs() + 1;
    let log = t.server.log_text();
    let refused = log.matches("udp flow refused").count() as u64;
    let denied = log
        .lines()
        .filter(|l| l.contains("decision=\"denied\"") || l.contains("decision=denied"))
        .count() as u64;
    assert!(refused >= 1, "nothing refused:\n{log}");
    assert!(
        refused <= seconds + 1 && denied <= seconds + 1,
        "{refused} refusal and {denied} denial lines in {seconds} s"
    );
    assert!(log.contains("skipped="), "{log}");
    // A source outside allow_from (::1 is not in 127.0.0.0/8) is dropped
    // and counted; the listener's own counts are on /metrics.
    let v6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
    v6.send_to(b"x", ("::1", port)).unwrap();
    let listen = format!("{{listen=\"[::]:{port}\"}}");
    assert!(
        wait_until(Duration::from_secs(5), || t
            .server_metric("tether_errors_total{kind=\"listener_source_denied\"}")
            .is_some_and(|n| n >= 1.0)),
        "{}",
        t.server_metrics()
    );
    let metrics = t.server_metrics();
    let value = |name: &str| metric(&metrics, &format!("{name}{listen}")).unwrap_or(-1.0);
    assert!(value("tether_listener_udp_live_flows") >= 1.0, "{metrics}");
    assert!(
        value("tether_listener_udp_flows_total") >= 100.0,
        "{metrics}"
    );
    assert!(
        value("tether_listener_udp_datagrams_in_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tether_listener_udp_datagrams_out_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tether_listener_udp_drops_total") >= 100.0,
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server alone (no agent), with `config` as its config file.
fn server_only(config: &str, tag: &str) -> (Proc, SocketAddr, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tether-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, config).unwrap();
    let port = free_port();
    let mut args = Tunnel::server_args(port);
    args.extend(["--config".to_owned(), cfg.display().to_string()]);
    let server = Proc::spawn("server", &args);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(addr, "/healthz").is_some_and(|(s, _)| s == 200)
    }));
    (server, addr, dir)
}

/// An agent `prod` that takes every open and never answers it: each open
/// on it stays pending (until the server's open timeout, 15 s). Returns the
/// session and a count of the opens it holds.
async fn silent_agent(server: SocketAddr) -> (tether_net::Connection, Arc<AtomicUsize>) {
    let (sink, source) = tether_net::transport::ws::dial(
        &format!("ws://{server}/tether/v1/agent"),
        tether_proto::SUBPROTOCOL,
        &[
            ("authorization".into(), format!("Bearer {AGENT_TOKEN}")),
            (
                tether_proto::endpoints::AGENT_NAME_HEADER.into(),
                "prod".into(),
            ),
        ],
        &Default::default(),
    )
    .await
    .unwrap();
    let (conn, _, mut incoming) = tether_net::Connection::start(
        tether_proto::Role::Initiator,
        Default::default(),
        sink,
        source,
        "silent-agent",
    )
    .await
    .unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        // Held, not dropped: a dropped open is answered.
        let mut held = Vec::new();
        while let Some(open) = incoming.recv().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(open);
        }
    });
    (conn, seen)
}

/// Opens through a TCP listener, through a UDP listener and from a CLI
/// session count alike as pending while the agent dials, and each caller
/// (a listener is one, by its address) is refused at the same per-identity
/// pending-open cap; when the opens end, every gauge is back at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_opens_are_pending_opens_with_the_same_cap() {
    let (tcp_port, udp_port) = (free_port(), free_udp_port());
    let (server, addr, dir) = server_only(
        &format!(
            r#"
[limits]
max_pending_opens_per_client = 1

[[listener]]
listen = "127.0.0.1:{tcp_port}"
target = "prod/echo"

[[listener]]
listen = "127.0.0.1:{udp_port}"
target = "prod/uecho"
protocol = "udp"
"#
        ),
        "pending",
    );
    let metrics = || {
        http_get(addr, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    let gauge = |name: &str| metric(&metrics(), name);
    let hits = || {
        metric(
            &metrics(),
            "tether_limit_hits_total{limit=\"pending_opens\"}",
        )
    };
    let (agent, seen) = silent_agent(addr).await;
    assert!(server.wait_log("udp listener open", Duration::from_secs(10)));
    // The TCP listener's own line: "listener open (agent connected)" alone
    // also matches the UDP listener's, which may come first.
    assert!(server.wait_log(
        &format!("listener open (agent connected) listen=127.0.0.1:{tcp_port}"),
        Duration::from_secs(10)
    ));

    // TCP listener: the first connection's open waits on the agent...
    let _first = connect(tcp_port).await;
    assert!(wait_until(Duration::from_secs(5), || seen
        .load(Ordering::SeqCst)
        == 1));
    assert!(wait_until(Duration::from_secs(5), || gauge(
        "tether_pending_opens"
    ) == Some(1.0)));
    // ...so the second one is refused at the listener's cap, and closed.
    let mut second = connect(tcp_port).await;
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), second.read(&mut b))
        .await
        .expect("the refused connection is closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(wait_until(Duration::from_secs(5), || hits() == Some(1.0)));
    assert!(server.wait_log(
        &format!("listener:127.0.0.1:{tcp_port} already has 1 opens waiting"),
        Duration::from_secs(5)
    ));

    // UDP listener: its own identity, the same cap. One source's flow
    // waits; another source's flow is refused.
    let u1 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    u1.send_to(b"one", ("127.0.0.1", udp_port)).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || seen
        .load(Ordering::SeqCst)
        == 2));
    assert!(wait_until(Duration::from_secs(5), || gauge(
        "tether_pending_opens"
    ) == Some(2.0)));
    let u2 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    u2.send_to(b"two", ("127.0.0.1", udp_port)).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || hits() == Some(2.0)));
    assert!(server.wait_log(
        &format!("listener:udp:127.0.0.1:{udp_port} already has 1 opens waiting"),
        Duration::from_secs(5)
    ));

    // A CLI session: the same count, the same cap, the same refusal.
    let client = cli_session(&format!("ws://{addr}"), CLIENT_TOKEN).await;
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.open(tether_proto::Target::tcp("prod/echo")).await }
    });
    assert!(wait_until(Duration::from_secs(5), || seen
        .load(Ordering::SeqCst)
        == 3));
    assert!(wait_until(Duration::from_secs(5), || gauge(
        "tether_pending_opens"
    ) == Some(3.0)));
    let refused = client
        .open(tether_proto::Target::tcp("prod/echo"))
        .await
        .err()
        .expect("a second pending open is refused");
    assert_eq!(refused.code, tether_proto::OpenErrorCode::TooManyStreams);
    assert!(
        refused.reason.contains("opens waiting for their agent"),
        "{refused}"
    );
    assert!(wait_until(Duration::from_secs(5), || hits() == Some(3.0)));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "refused opens never reach the agent"
    );

    // The agent goes away: every pending open fails, and nothing is left
    // counted.
    agent.close(tether_proto::ErrorCode::Normal, "done");
    let _ = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(
        wait_until(Duration::from_secs(10), || {
            gauge("tether_pending_opens") == Some(0.0) && gauge("tether_live_streams") == Some(0.0)
        }),
        "{}",
        metrics()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
