//! End-to-end tests: real `tether` processes (server, agent, client) on
//! loopback, real sockets, byte-exact checks.

use crate::common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_still_gets_whole_response() {
    let svc = count_then_answer_service().await;
    let t = Tunnel::start(&[("count", svc)], &[]);
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/count")]);

    let mut s = connect(port).await;
    let mut data = vec![0u8; 3 * 1024 * 1024 + 17];
    Pattern::new(7).fill(&mut data);
    let mut h = Fnv::new();
    h.update(&data);
    s.write_all(&data).await.unwrap();
    // Half-close: the service only answers after it sees EOF.
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(answer, format!("{} {:016x}\n", data.len(), h.finish()));
}

/// Early data (PROTOCOL.md 6.3): a connection's first bytes may travel
/// with its open. Through a CLI forward (early data on, the default), one
/// with `--no-early-data`, and a server `[[listener]]`, short connections
/// that write their whole request at once and half-close get exact
/// answers, and every audit line counts all the bytes the client sent,
/// the early ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_sent_with_the_open_arrive_exactly_and_are_counted() {
    let svc = count_then_answer_service().await;
    let listener = free_port();
    let listener_flag = format!("127.0.0.1:{listener}=prod/count");
    let t = Tunnel::start_with(&[("count", svc)], &["--listener", &listener_flag], &[]);
    let early = free_port();
    let early_client = t.client(CLIENT_TOKEN, &[(early, "prod/count")]);
    let late = free_port();
    let late_client = forward_client_with(
        &t.url(),
        CLIENT_TOKEN,
        &["--no-early-data"],
        &[(late, "prod/count")],
    );
    assert!(late_client.wait_log("connected", Duration::from_secs(10)));
    assert!(t.server.wait_log("listener open", Duration::from_secs(10)));
    const PER_ENTRANCE: usize = 40;
    const LEN: usize = 1000;
    for port in [early, late, listener] {
        for i in 0..PER_ENTRANCE {
            let mut data = vec![0u8; LEN];
            Pattern::new((port as u64) << 16 | i as u64).fill(&mut data);
            let mut h = Fnv::new();
            h.update(&data);
            let mut s = connect(port).await;
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
                .await
                .expect("answer in time")
                .unwrap();
            assert_eq!(
                answer,
                format!("{LEN} {:016x}\n", h.finish()),
                "port {port} #{i}"
            );
        }
    }
    let audit_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(" audit ") && l.contains("target=prod/count"))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || audit_lines(
            &t.server.log_text()
        )
        .len()
            >= 3 * PER_ENTRANCE),
        "{}",
        t.server.log_text()
    );
    for line in audit_lines(&t.server.log_text()) {
        assert!(line.contains(&format!("bytes_up={LEN} ")), "{line}");
        assert!(line.contains("result=closed"), "{line}");
    }
    // The CLI's own line for each connection counts them too.
    let closed = || -> Vec<String> {
        late_client
            .log_text()
            .lines()
            .chain(early_client.log_text().lines())
            .filter(|l| l.contains("stream closed"))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || closed().len()
            >= 2 * PER_ENTRANCE),
        "{:?}",
        closed()
    );
    let closed = closed();
    for line in closed {
        assert!(line.contains(&format!("bytes_up={LEN} ")), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_are_byte_exact() {
    let svc = echo_service().await;
    let t = Tunnel::start(&[("echo", svc)], &[]);
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    const STREAMS: u64 = 100;
    const LEN: usize = 3 * 1024 * 1024;

    let started = Instant::now();
    echo_patterns(port, STREAMS, LEN, 1, Duration::from_secs(240)).await;
    eprintln!("100 x 3 MiB echoed in {:?}", started.elapsed());
    assert!(wait_until(Duration::from_secs(10), || {
        t.server_metric("tether_live_streams") == Some(0.0)
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_does_not_stall_other_streams() {
    const BIG: u64 = 64 * 1024 * 1024;
    const SMALL: u64 = 16 * 1024 * 1024;
    let big = source_service(BIG).await;
    let small = source_service(SMALL).await;
    let t = Tunnel::start(&[("big", big), ("small", small)], &[]);
    let (pb, ps) = (free_port(), free_port());
    let _client = t.client(CLIENT_TOKEN, &[(pb, "prod/big"), (ps, "prod/small")]);

    // This reader stops reading after connecting: its window fills up.
    let mut stalled = connect(pb).await;
    let mut first = [0u8; 1024];
    stalled.read_exact(&mut first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Meanwhile 8 other streams on the same session run to completion.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut s = connect(ps).await;
            let mut v = Verifier::new(SMALL, 65536);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                v.update(&buf[..n]);
                assert!(v.ok);
            }
            v.total
        }));
    }
    for task in tasks {
        let got = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("other streams are not blocked by the stalled one")
            .unwrap();
        assert_eq!(got, SMALL);
    }

    // The stalled stream resumes and loses nothing.
    let mut v = Verifier::new(BIG, 65536);
    v.update(&first);
    assert!(v.ok);
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), stalled.read(&mut buf))
            .await
            .expect("stalled stream resumes")
            .unwrap();
        if n == 0 {
            break;
        }
        v.update(&buf[..n]);
        assert!(
            v.ok,
            "stalled stream corrupted within the first {}",
            v.total
        );
    }
    assert_eq!(v.total, BIG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_connections_leave_no_streams_behind() {
    let svc = count_then_answer_service().await;
    let t = Tunnel::start(&[("count", svc)], &[]);
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/count")]);
    // Each connection reports its failure instead of panicking, so that a
    // failure shows what the client logged about it (a refused open drops
    // the local connection with unread bytes: the test sees a reset).
    let one = |i: u64| async move {
        let mut s = connect(port).await;
        let local = s.local_addr().map_err(|e| e.to_string())?;
        let msg = format!("request {i}");
        let io = |e: std::io::Error| format!("connection {i} from {local}: {e}");
        s.write_all(msg.as_bytes()).await.map_err(io)?;
        s.shutdown().await.map_err(io)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.map_err(io)?;
        if !answer.starts_with(&format!("{} ", msg.len())) {
            return Err(format!("connection {i} from {local}: answer {answer:?}"));
        }
        Ok::<(), String>(())
    };
    let mut failures = Vec::new();
    for i in 0..200 {
        if let Err(e) = one(i).await {
            failures.push(e);
        }
    }
    let mut tasks = Vec::new();
    for i in 0..300 {
        tasks.push(tokio::spawn(one(i)));
    }
    for task in tasks {
        if let Err(e) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every connection ends within 60 s")
            .expect("connection task")
        {
            failures.push(e);
        }
    }
    let client_log = client.log_text();
    let complaints: Vec<&str> = client_log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("ended with error"))
        .collect();
    assert!(
        failures.is_empty(),
        "{} connections failed: {failures:?}\nclient complaints: {complaints:#?}",
        failures.len()
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            t.server_metric("tether_live_streams") == Some(0.0)
                && t.server_metric("tether_pending_opens") == Some(0.0)
                && t.agent_metric("tether_agent_live_streams") == Some(0.0)
        }),
        "live streams did not return to zero: server {:?}, agent {:?}",
        t.server_metric("tether_live_streams"),
        t.agent_metric("tether_agent_live_streams")
    );
    assert_eq!(t.server_metric("tether_streams_total"), Some(500.0));
    assert_eq!(t.agent_metric("tether_agent_streams_total"), Some(500.0));
}

/// The defaults hold what a team does: 1000 connections at once through
/// one CLI forward, each proven open end to end and all held together; the
/// identity's limit refuses beyond it, and the refusal names the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_through_one_forward_are_held_at_once() {
    // This process holds both ends of every connection (and the service).
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit < 4500 {
        assert!(
            std::env::var_os("CI").is_none(),
            "the open-file hard limit ({limit}) is too low for this test"
        );
        eprintln!("SKIPPED: open-file limit {limit}");
        return;
    }
    const N: usize = 1000;
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &[]);
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let mut held = Vec::with_capacity(N);
    // Opened 100 at a time, each with a round trip before the next batch.
    for batch in 0..N / 100 {
        let mut tasks = Vec::new();
        for i in 0..100 {
            tasks.push(tokio::spawn(async move {
                let mut s = connect(port).await;
                let b = [(batch * 100 + i) as u8];
                s.write_all(&b).await.map_err(|e| e.to_string())?;
                let mut back = [0u8; 1];
                tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
                    .await
                    .map_err(|_| "no echo within 20 s".to_owned())?
                    .map_err(|e| e.to_string())?;
                if back != b {
                    return Err("wrong echo".to_owned());
                }
                Ok::<_, String>(s)
            }));
        }
        for task in tasks {
            match task.await.expect("task") {
                Ok(s) => held.push(s),
                Err(e) => panic!(
                    "connection {} of {N} failed: {e}\nclient log:\n{}",
                    held.len() + 1,
                    client.log_text()
                ),
            }
        }
    }
    assert_eq!(held.len(), N);
    assert!(
        wait_until(Duration::from_secs(10), || t
            .server_metric("tether_live_streams")
            == Some(N as f64)),
        "the server holds {N} live streams: {:?}",
        t.server_metric("tether_live_streams")
    );
    // Every one of them still echoes while all are held.
    for (i, s) in held.iter_mut().enumerate().step_by(97) {
        s.write_all(&[i as u8]).await.unwrap();
        let mut back = [0u8; 1];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [i as u8]);
    }
    drop(held);
    drop(client);

    // The limit is still there, and says how to raise it.
    let cfg = std::env::temp_dir().join(format!("tether-small-limit-{}.toml", free_port()));
    std::fs::write(&cfg, "max_streams_per_client = 5\n").unwrap();
    let small = Tunnel::start_with(&[("echo", echo)], &["--config", cfg.to_str().unwrap()], &[]);
    let port = free_port();
    let _client = small.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let mut five = Vec::new();
    for i in 0..5u8 {
        let mut s = connect(port).await;
        s.write_all(&[i]).await.unwrap();
        let mut back = [0u8; 1];
        s.read_exact(&mut back).await.unwrap();
        five.push(s);
    }
    expect_closed_promptly(port).await;
    assert!(
        small.server.wait_log(
            "already has 5 streams open (the limit, over all its sessions; the server's max_streams_per_client",
            Duration::from_secs(5)
        ),
        "the refusal names the setting that raises it:\n{}",
        small.server.log_text()
    );
}

/// Connects to a forward and expects the tunnel to close it promptly
/// (the open was refused), rather than hang.
async fn expect_closed_promptly(port: u16) {
    let mut s = connect(port).await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("refused stream closes promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "expected close, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_opens_close_promptly_and_are_logged() {
    let echo = echo_service().await;
    let (_hole, blackhole) = blackhole_addr();
    let t = Tunnel::start(
        &[
            ("echo", echo),
            ("down", refused_addr()),
            ("hole", blackhole),
        ],
        &["--dial-timeout-ms", "1000"],
    );
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let client = t.client(
        CLIENT_TOKEN,
        &[
            (ports[0], "ghost/echo"),
            (ports[1], "prod/nope"),
            (ports[2], "prod/down"),
            (ports[3], "prod/hole"),
            (ports[4], "prod/echo"),
        ],
    );
    let limited = t.client(LIMITED_TOKEN, &[(free_port(), "prod/down")]);
    for p in &ports[..4] {
        expect_closed_promptly(*p).await;
    }
    let log = client.log_text();
    for needle in [
        "agent_offline",
        "agent ghost is not connected",
        "unknown_service",
        "no service named \"nope\"",
        "refused",
        "timeout",
        "did not answer within",
    ] {
        assert!(log.contains(needle), "client log lacks {needle:?}:\n{log}");
    }
    // The session survived all of that: a good stream still works.
    let mut s = connect(ports[4]).await;
    s.write_all(b"still alive").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "still alive");
    drop(limited);
    let server_log = t.server.log_text();
    assert!(server_log.contains("open refused"), "{server_log}");
    let m = t.server_metrics();
    for kind in ["agent_offline", "unknown_service", "refused", "timeout"] {
        assert!(
            m.contains(&format!("tether_errors_total{{kind=\"{kind}\"}}")),
            "no error metric for {kind}:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_allow_list_is_enforced() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo), ("echo2", echo)], &[]);
    let (ok, denied) = (free_port(), free_port());
    let client = t.client(LIMITED_TOKEN, &[(ok, "prod/echo"), (denied, "prod/echo2")]);
    expect_closed_promptly(denied).await;
    assert!(client.wait_log("forbidden", Duration::from_secs(5)));
    let mut s = connect(ok).await;
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused_with_a_reason_and_local_connections_fail_fast() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &[]);
    let port = free_port();
    let bad = Proc::spawn(
        "client-bad-token",
        &[
            "client".into(),
            "--server".into(),
            t.url(),
            "--token".into(),
            "not-a-token".into(),
            "forward".into(),
            format!("127.0.0.1:{port}=prod/echo"),
        ],
    );
    assert!(
        bad.wait_log("HTTP 401: invalid client token", Duration::from_secs(10)),
        "{}",
        bad.log_text()
    );
    expect_closed_promptly(port).await;
    assert!(bad.wait_log("not connected to the server", Duration::from_secs(5)));
    // A bad agent token is refused too, and logged on the server.
    let bad_agent = Proc::spawn(
        "agent-bad-token",
        &[
            "agent".into(),
            "--server".into(),
            t.url(),
            "--name".into(),
            "prod".into(),
            "--token".into(),
            "wrong".into(),
        ],
    );
    assert!(bad_agent.wait_log("HTTP 401: invalid agent token", Duration::from_secs(10)));
    assert!(t.server.wait_log(
        "agent connection with an unknown token",
        Duration::from_secs(5)
    ));
    // The real agent is still the registered one.
    assert_eq!(t.server_metric("tether_agents"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_vanishing_mid_stream_closes_client_connection_promptly() {
    let echo = echo_service().await;
    let mut t = Tunnel::start(&[("echo", echo)], &[]);
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let mut s = connect(port).await;
    s.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.unwrap();
    t.agent.kill();
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .expect("client sees the close promptly, not a hang");
    // Reset, not an orderly end: the transfer failed.
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    eprintln!("reset seen {:?} after the agent died", started.elapsed());
    assert!(wait_until(Duration::from_secs(5), || {
        t.server_metric("tether_agents") == Some(0.0)
            && t.server_metric("tether_live_streams") == Some(0.0)
    }));
}

/// A service that resets its connection mid-transfer: the application at
/// the other end of agent, server and CLI client sees a reset too, after
/// every byte sent before it, and never an orderly end that would make a
/// cut-off transfer look complete; the CLI says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_reset_reaches_the_application_as_a_reset() {
    const SENT: usize = 256 * 1024;
    let l = service_listener();
    let svc = l.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let mut data = vec![0u8; SENT];
        Pattern::new(3).fill(&mut data);
        s.write_all(&data).await.unwrap();
        // Reset once the application has everything (it says so).
        let mut go = [0u8; 1];
        let _ = s.read_exact(&mut go).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let t = Tunnel::start(&[("resets", svc)], &[]);
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/resets")]);
    let mut s = connect(port).await;
    let mut got = vec![0u8; SENT];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut got))
        .await
        .expect("the bytes before the reset arrive")
        .unwrap();
    let mut want = vec![0u8; SENT];
    Pattern::new(3).fill(&mut want);
    assert!(got == want, "the bytes before the reset arrive intact");
    s.write_all(b"k").await.unwrap();
    let mut more = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut more))
        .await
        .expect("the reset arrives, not a hang");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the application saw {r:?} instead of a reset"
    );
    assert!(
        client.wait_log("io_error", Duration::from_secs(5)),
        "{}",
        client.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_agent_and_client_reconnect() {
    let echo = echo_service().await;
    let mut t = Tunnel::start(&[("echo", echo)], &[]);
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    t.server.kill();
    // While the server is down, new local connections fail fast.
    assert!(client.wait_log("disconnected", Duration::from_secs(5)));
    expect_closed_promptly(port).await;
    // Same port, new process.
    t.server = Proc::spawn("server-restarted", &Tunnel::server_args(t.server_port));
    assert!(
        wait_until(Duration::from_secs(30), || t.server_metric("tether_agents")
            == Some(1.0)),
        "agent did not reconnect"
    );
    let ok = async {
        loop {
            let mut s = connect(port).await;
            if s.write_all(b"back").await.is_ok() {
                let mut b = [0u8; 4];
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await
                {
                    if &b == b"back" {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ok)
        .await
        .expect("client reconnected and forwards again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_agent_session_wins() {
    // The same agent instance connecting again (a reconnect after a
    // half-open socket) replaces its old session.
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &["--instance", "prod-0"]);
    let second = agent_instance(&t, "prod-0", echo);
    assert!(second.wait_log("registered as prod", Duration::from_secs(10)));
    assert!(t
        .server
        .wait_log("newest session wins", Duration::from_secs(5)));
    assert!(t.agent.wait_log("GOAWAY", Duration::from_secs(5)));
    assert_eq!(t.server_metric("tether_agents"), Some(1.0));
    assert_eq!(
        t.server_metric("tether_agent_instances{agent=\"prod\"}"),
        Some(1.0)
    );
}

/// Two members of one agent's pool offer different services (a roll that
/// adds one): every open of the new one reaches the member that has it,
/// whichever member the load picks first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_goes_to_the_pool_member_that_offers_the_service() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &["--instance", "old"]);
    let new = agent_instance_with(&t, "new", &[format!("echo={echo}"), format!("api={echo}")]);
    assert!(new.wait_log("registered as prod", Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(10), || t
        .server_metric("tether_agent_instances{agent=\"prod\"}")
        == Some(2.0)));
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/api")]);
    for i in 0..30u8 {
        let mut s = connect(port).await;
        s.write_all(&[i; 4]).await.unwrap();
        let mut b = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await;
        assert!(
            matches!(read, Ok(Ok(_))) && b == [i; 4],
            "open {i} of prod/api failed: {read:?}\n{}",
            t.server.log_text()
        );
    }
}

/// A second agent process `prod` with instance id `instance`, serving `echo`.
fn agent_instance(t: &Tunnel, instance: &str, echo: std::net::SocketAddr) -> Proc {
    agent_instance_with(t, instance, &[format!("echo={echo}")])
}

/// A second agent process `prod` with instance id `instance`, serving
/// `services` (`NAME=ADDRESS` each).
fn agent_instance_with(t: &Tunnel, instance: &str, services: &[String]) -> Proc {
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--server".into(),
        t.url(),
        "--name".into(),
        "prod".into(),
        "--instance".into(),
        instance.into(),
        "--token".into(),
        AGENT_TOKEN.into(),
    ];
    for s in services {
        args.extend(["--service".into(), s.clone()]);
    }
    Proc::spawn(&format!("agent-{instance}"), &args)
}

/// A pool holds eight instances of a name: a ninth is refused before the
/// `101`, with a 503 that says why, and an empty instance id is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninth_instance_is_refused_before_the_upgrade() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &["--instance", "i1"]);
    let others: Vec<Proc> = (2..=8)
        .map(|i| agent_instance(&t, &format!("i{i}"), echo))
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || t
            .server_metric("tether_agent_instances{agent=\"prod\"}")
            == Some(8.0)),
        "eight instances connect"
    );
    let upgrade = |instance: &str| {
        raw_upgrade(
            t.server_addr(),
            "/tether/v1/agent",
            &format!(
                "Sec-WebSocket-Protocol: tether.v1\r\nAuthorization: Bearer {AGENT_TOKEN}\r\n\
                 X-Tether-Instance: {instance}\r\n"
            ),
        )
    };
    let r = upgrade("i9");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("already has 8 instances"), "{r}");
    let r = upgrade("");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("1 to 128"), "{r}");
    assert_eq!(
        t.server_metric("tether_agent_instances{agent=\"prod\"}"),
        Some(8.0),
        "the members stay"
    );
    drop(others);
    assert!(
        wait_until(Duration::from_secs(15), || t
            .server_metric("tether_agent_instances{agent=\"prod\"}")
            == Some(1.0)),
        "the gauge follows the members that left"
    );
}

/// Two agent processes with one name and different instance ids form a
/// pool: both stay connected and new streams go to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_one_name_and_two_instances_share_the_streams() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &["--instance", "i1"]);
    let second = agent_instance(&t, "i2", echo);
    assert!(second.wait_log("registered as prod", Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(5), || t
        .server_metric("tether_agent_instances{agent=\"prod\"}")
        == Some(2.0)));
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    for i in 0..40u32 {
        let mut s = connect(port).await;
        let msg = format!("hello {i}\n");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    let served = |p: &Proc| {
        let log = p.log_text();
        log.matches("stream closed").count() + log.matches("stream ended with error").count()
    };
    assert!(wait_until(Duration::from_secs(5), || served(&t.agent)
        + served(&second)
        >= 40));
    let (a, b) = (served(&t.agent), served(&second));
    assert!(
        a >= 5 && b >= 5,
        "40 streams spread over the pool: {a} and {b}"
    );
    assert!(!t.server.log_text().contains("newest session wins"));
    // The console's API lists both instances of the pool.
    let out = std::process::Command::new("curl")
        .args(["-s", "-H", &format!("Authorization: Bearer {CLIENT_TOKEN}")])
        .arg(format!("http://{}/api/agents", t.server_addr()))
        .output()
        .expect("curl");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let prod = j["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "prod"))
        .expect("agent prod listed");
    let mut ids: Vec<&str> = prod["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["i1", "i2"], "{j}");
}

/// A relay between dialers and `to` that keeps every byte the dialers
/// sent (all connections, in arrival order), to read the WebSocket
/// handshake and frames off the wire.
async fn tap(to: std::net::SocketAddr) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((dialer, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut dr, mut dw) = dialer.into_split();
            let (mut sr, mut sw) = server.into_split();
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = dr.read(&mut buf).await {
                    if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    kept.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = sw.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut dw).await;
            });
        }
    });
    (port, seen)
}

/// What a dialer's side of a tap shows: whether the upgrade request
/// offered the unmasked extension, and whether its first frame was masked.
fn offer_and_first_mask(sent: &[u8]) -> (bool, bool) {
    let end = sent
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an upgrade request")
        + 4;
    let request = String::from_utf8_lossy(&sent[..end]).to_ascii_lowercase();
    let offered = request.contains("sec-websocket-extensions: tether-unmasked");
    let frame = &sent[end..];
    assert!(frame.len() >= 2, "a frame after the upgrade");
    assert_eq!(frame[0] & 0x0f, 2, "a binary frame");
    (offered, frame[1] & 0x80 != 0)
}

/// Version 8 (PROTOCOL.md 2.6): a CLI client dialing a loopback server
/// offers `tether-unmasked` and, the server agreeing, sends its frames
/// unmasked; with `--ws-mask always` it offers nothing and masks, and the
/// server (whose decoder then insists on masks) serves it all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sends_unmasked_frames_by_agreement_and_masked_ones_when_told() {
    let svc = echo_service().await;
    let t = Tunnel::start(&[("echo", svc)], &[]);
    for (options, want_unmasked) in [(&[][..], true), (&["--ws-mask", "always"][..], false)] {
        let (tap_port, seen) = tap(t.server_addr()).await;
        let port = free_port();
        let client = forward_client_with(
            &format!("ws://127.0.0.1:{tap_port}"),
            CLIENT_TOKEN,
            options,
            &[(port, "prod/echo")],
        );
        assert!(client.wait_log("connected", Duration::from_secs(10)));
        let msg = vec![0x5au8; 100_000];
        assert_eq!(echo_through(port, &msg).await, msg, "{options:?}");
        let (offered, masked) = offer_and_first_mask(&seen.lock().unwrap());
        assert_eq!(
            (offered, masked),
            (want_unmasked, !want_unmasked),
            "{options:?}"
        );
    }
}

/// A configured agent that has not connected to this replica since it
/// started counts 0 instances (so an alert on `== 0` fires), not no series
/// at all; one added by a reload too.
#[test]
fn a_configured_agent_that_never_connected_counts_zero_instances() {
    let dir = std::env::temp_dir().join(format!("tether-zero-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    let port = free_port();
    let config = |agents: &[&str]| {
        let mut text = format!("listen = \"127.0.0.1:{port}\"\n");
        for a in agents {
            text += &format!("[[agent]]\nname = \"{a}\"\ntoken = \"{a}-{AGENT_TOKEN}\"\n");
        }
        std::fs::write(&cfg, text).unwrap();
    };
    config(&["ghost"]);
    let server = Proc::spawn(
        "server",
        &[
            "server".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
    );
    assert!(server.wait_log("server listening", Duration::from_secs(10)));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let instances = |agent: &str| {
        let body = http_get(addr, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        metric(
            &body,
            &format!("tether_agent_instances{{agent=\"{agent}\"}}"),
        )
    };
    assert_eq!(instances("ghost"), Some(0.0));
    config(&["ghost", "later"]);
    server.signal(Signal::HUP);
    assert!(wait_until(Duration::from_secs(10), || instances("later") == Some(0.0)));
    // Removed from the config: its series goes (else an alert on 0 would
    // fire for an agent nobody expects any more).
    config(&["later"]);
    server.signal(Signal::HUP);
    assert!(wait_until(Duration::from_secs(10), || instances("ghost").is_none()));
    assert_eq!(instances("later"), Some(0.0));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS service that ends with a TCP close and no `close_notify` (many
/// servers close that way) between two records has ended: the client gets
/// every byte it sent, then a clean end, not a reset that drops what was
/// still queued. A close inside a record is a cut, and still a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_service_closing_without_close_notify_loses_no_bytes() {
    use crate::common::web::{Web, WebOpts};
    const LEN: u64 = 8 * 1024 * 1024;
    let id =
        tether_net::transport::tls::ServerIdentity::self_signed(&["127.0.0.1".into()]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config(&[]).unwrap());
    // Sends LEN bytes, then closes TCP under TLS: after its last record,
    // or (`cut`) after the first bytes of one more.
    let tls_service = |cut: bool| {
        let acceptor = acceptor.clone();
        let l = service_listener();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if write_pattern(&mut tls, LEN).await.is_err() {
                        return;
                    }
                    let _ = tls.flush().await;
                    let (mut tcp, _) = tls.into_inner();
                    if cut {
                        // A record header for 16 KiB, and 3 bytes of it.
                        let _ = tcp.write_all(&[23, 3, 3, 0x40, 0, 1, 2, 3]).await;
                    }
                    drop(tcp);
                });
            }
        });
        addr
    };
    let (whole, cut) = (tls_service(false), tls_service(true));
    let (listen, listen_cut) = (free_port(), free_port());
    let w = Web::start_with(WebOpts {
        plain: true,
        config: format!(
            "[[listener]]\nlisten = \"127.0.0.1:{listen}\"\ntarget = \"prod/tlsdown\"\n\
             [[listener]]\nlisten = \"127.0.0.1:{listen_cut}\"\ntarget = \"prod/tlscut\"\n"
        ),
        services: format!(
            "tlsdown = {{ address = \"tls://{whole}\", tls_verify = false }}\n\
             tlscut = {{ address = \"tls://{cut}\", tls_verify = false }}"
        ),
        ..Default::default()
    });
    // What a reader gets: the bytes (checked), then how it ended.
    let read_all = |port: u16| async move {
        let mut s = connect(port).await;
        let mut v = Verifier::new(LEN, 65536);
        let mut buf = vec![0u8; 65536];
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                Ok(Ok(0)) => break Ok(()),
                Ok(Ok(n)) => {
                    v.update(&buf[..n]);
                    assert!(v.ok, "corrupted within the first {}", v.total);
                    // A slow reader, so the end comes while bytes are queued.
                    if v.total < 2 * 1024 * 1024 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                Ok(Err(e)) => break Err(e.to_string()),
                Err(_) => break Err("no end in 30 s".into()),
            }
        };
        (end, v.total)
    };
    for round in 0..3 {
        assert_eq!(
            read_all(listen).await,
            (Ok(()), LEN),
            "round {round}:\n{}",
            w.agent.log_text()
        );
    }
    let (end, _) = read_all(listen_cut).await;
    assert!(end.is_err(), "a cut inside a record ended cleanly");
}
