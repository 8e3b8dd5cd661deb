//! Process lifecycle and TLS: graceful drain on SIGTERM, certificates from
//! PEM files verified against a CA, fingerprint pinning, and the demo.

use crate::common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_before_the_server_exits() {
    const LEN: u64 = 48 * 1024 * 1024;
    let src = source_service(LEN).await;
    let mut t = Tunnel::start(&[("src", src)], &[]);
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/src")]);
    let mut s = connect(port).await;
    let mut buf = vec![0u8; 65536];
    let mut total = s.read(&mut buf).await.unwrap() as u64;
    let mut h = Fnv::new();
    h.update(&buf[..total as usize]);

    // Ask the server to stop while the transfer is in flight (the reader is
    // slow, so most of it is still to come).
    t.server.signal(Signal::TERM);
    assert!(t.server.wait_log("draining", Duration::from_secs(5)));
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("transfer continues during the drain")
            .unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    assert_eq!(total, LEN, "the in-flight stream finished whole");
    let mut expect = Fnv::new();
    let mut gen = Pattern::new(LEN);
    let mut block = vec![0u8; 65536];
    for _ in 0..LEN / 65536 {
        gen.fill(&mut block);
        expect.update(&block);
    }
    assert_eq!(h.finish(), expect.finish(), "bytes differ");
    // Our side of the stream is still open (half-closed): closing it lets
    // the last stream end, and with it the drain.
    drop(s);
    assert!(
        wait_until(Duration::from_secs(10), || !t.server.is_running()),
        "server exits once drained"
    );
    assert!(t.server.log_text().contains("all sessions drained"));
    assert!(t.agent.wait_log("GOAWAY", Duration::from_secs(5)));
    assert!(client.wait_log("GOAWAY", Duration::from_secs(5)));
}

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl {args:?}");
}

/// A CA and a server certificate for localhost / 127.0.0.1 signed by it.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tether test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_pem_files_ca_verification_and_pinning() {
    let dir = std::env::temp_dir().join(format!("tether-pki-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_pki(&dir);
    let echo = echo_service().await;
    let sp = free_port();
    let server = Proc::spawn(
        "tls-server",
        &[
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{sp}"),
            "--tls-cert".into(),
            dir.join("server.pem").display().to_string(),
            "--tls-key".into(),
            dir.join("server.key").display().to_string(),
            "--agent".into(),
            format!("prod={AGENT_TOKEN}"),
            "--client".into(),
            format!("dev={CLIENT_TOKEN}=prod/*"),
        ],
    );
    assert!(server.wait_log("server listening", Duration::from_secs(10)));
    let url = format!("wss://localhost:{sp}");
    let ca = dir.join("ca.pem").display().to_string();

    // Verified against the CA file.
    let agent = Proc::spawn(
        "tls-agent",
        &[
            "agent".into(),
            "--server".into(),
            url.clone(),
            "--name".into(),
            "prod".into(),
            "--token".into(),
            AGENT_TOKEN.into(),
            "--ca-file".into(),
            ca.clone(),
            "--service".into(),
            format!("echo={echo}"),
        ],
    );
    assert!(
        agent.wait_log("registered as prod", Duration::from_secs(10)),
        "{}",
        agent.log_text()
    );

    let port = free_port();
    let client = Proc::spawn(
        "tls-client",
        &[
            "client".into(),
            "--server".into(),
            url.clone(),
            "--token".into(),
            CLIENT_TOKEN.into(),
            "--ca-file".into(),
            ca.clone(),
            "forward".into(),
            format!("127.0.0.1:{port}=prod/echo"),
        ],
    );
    assert!(client.wait_log("connected", Duration::from_secs(10)));
    let mut s = connect(port).await;
    s.write_all(b"over tls").await.unwrap();
    let mut b = [0u8; 8];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"over tls");

    // Without the CA (system roots only) the certificate is refused, clearly.
    let untrusting = Proc::spawn(
        "tls-agent-no-ca",
        &[
            "agent".into(),
            "--server".into(),
            url.clone(),
            "--name".into(),
            "prod".into(),
            "--token".into(),
            AGENT_TOKEN.into(),
        ],
    );
    assert!(
        untrusting.wait_log("TLS with localhost", Duration::from_secs(10)),
        "{}",
        untrusting.log_text()
    );
    assert!(untrusting.log_text().to_lowercase().contains("certificate"));

    // A wrong pinned fingerprint is refused and says so.
    let wrong_pin = Proc::spawn(
        "tls-agent-wrong-pin",
        &[
            "agent".into(),
            "--server".into(),
            url,
            "--name".into(),
            "prod".into(),
            "--token".into(),
            AGENT_TOKEN.into(),
            "--fingerprint".into(),
            "00".repeat(32),
        ],
    );
    assert!(
        wrong_pin.wait_log("does not match the pinned one", Duration::from_secs(10)),
        "{}",
        wrong_pin.log_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_sample_page_and_echo_through_the_tunnel() {
    let (web, echo) = (free_port(), free_port());
    let demo = Proc::spawn(
        "demo",
        &[
            "demo".into(),
            "--web-port".into(),
            web.to_string(),
            "--echo-port".into(),
            echo.to_string(),
        ],
    );
    assert!(
        demo.wait_log("tether demo is running", Duration::from_secs(15)),
        "{}",
        demo.log_text()
    );
    let (status, body) = http_get(format!("127.0.0.1:{web}").parse().unwrap(), "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("tether sample app"), "{body}");
    let mut s = connect(echo).await;
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "hello");
    assert!(demo
        .log_text()
        .contains(&format!("curl http://127.0.0.1:{web}/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_declared_dead_and_reconnects_when_it_wakes() {
    let echo = echo_service().await;
    let fast = ["--heartbeat-ms", "200", "--idle-timeout-ms", "1500"];
    let t = Tunnel::start_with(&[("echo", echo)], &fast, &fast);
    // Freeze the agent: its TCP connection stays open but nothing comes out,
    // like a peer behind a network that silently drops packets.
    t.agent.signal(Signal::STOP);
    assert!(
        t.server
            .wait_log("agent disconnected", Duration::from_secs(10)),
        "server did not notice the silent agent"
    );
    assert!(
        t.server.log_text().contains("peer silent"),
        "{}",
        t.server.log_text()
    );
    assert_eq!(t.server_metric("tether_agents"), Some(0.0));
    t.agent.signal(Signal::CONT);
    assert!(
        wait_until(Duration::from_secs(15), || t.server_metric("tether_agents")
            == Some(1.0)),
        "agent did not come back"
    );
}

/// Protocol version 7: the server's heartbeat paces agents that set none
/// (the HEARTBEAT frame). Only the server is set fast here; the agent takes
/// its values, so it finds a frozen server in about 1.5 s instead of its
/// own default 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_takes_the_servers_heartbeat() {
    let echo = echo_service().await;
    let fast = ["--heartbeat-ms", "200", "--idle-timeout-ms", "1500"];
    let t = Tunnel::start_with(&[("echo", echo)], &fast, &[]);
    assert!(
        t.agent
            .wait_log("heartbeat set by the server", Duration::from_secs(5)),
        "{}",
        t.agent.log_text()
    );
    assert!(
        t.agent
            .log_text()
            .contains("PING every 200ms, 1.5s of silence ends the session"),
        "{}",
        t.agent.log_text()
    );
    t.server.signal(Signal::STOP);
    let stopped = std::time::Instant::now();
    let noticed = t.agent.wait_log("peer silent", Duration::from_secs(20));
    let after = stopped.elapsed();
    t.server.signal(Signal::CONT);
    assert!(noticed, "{}", t.agent.log_text());
    assert!(after < Duration::from_secs(8), "noticed after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_new_gives_a_hash_the_server_accepts() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["token", "new"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split('"').nth(1))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {k} in {text}"))
    };
    let (token, hash) = (field("token "), field("token_sha256"));
    assert_eq!(hash.len(), 64);
    let dir = std::env::temp_dir().join(format!("tether-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:{port}\"\n[[agent]]\nname = \"hashed\"\ntoken_sha256 = \"{hash}\"\n"),
    )
    .unwrap();
    let server = Proc::spawn(
        "server-hashed",
        &[
            "server".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
    );
    assert!(server.wait_log("server listening", Duration::from_secs(10)));
    let agent = Proc::spawn(
        "agent-hashed",
        &[
            "agent".into(),
            "--server".into(),
            format!("ws://127.0.0.1:{port}"),
            "--name".into(),
            "hashed".into(),
            "--token".into(),
            token.clone(),
        ],
    );
    assert!(
        agent.wait_log("registered as hashed", Duration::from_secs(10)),
        "{}",
        agent.log_text()
    );
    // The token itself never appears in the server's log.
    assert!(!server.log_text().contains(&token));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_client_leave_cleanly_on_sigterm() {
    let echo = echo_service().await;
    let mut t = Tunnel::start(&[("echo", echo)], &[]);
    let port = free_port();
    let mut client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    client.signal(Signal::TERM);
    t.agent.signal(Signal::TERM);
    assert!(
        wait_until(Duration::from_secs(10), || !client.is_running()),
        "client exits"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !t.agent.is_running()),
        "agent exits"
    );
    assert!(t.agent.log_text().contains("draining the session"));
    assert!(t
        .server
        .wait_log("agent disconnected", Duration::from_secs(5)));
    assert!(t
        .server
        .wait_log("client disconnected", Duration::from_secs(5)));
    // (The harness passes tokens as flags, which the server warns about.)
    let log: String = t
        .server
        .log_text()
        .lines()
        .filter(|l| !l.contains("token in clear text"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !log.contains("without closing handshake") && !log.contains("WARN"),
        "server saw an unclean goodbye:\n{log}"
    );
}
