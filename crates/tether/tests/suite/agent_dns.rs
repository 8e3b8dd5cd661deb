//! The agent checks the addresses a raw target's name resolves to, not just
//! the name: a name inside an allowed glob that resolves to loopback (DNS
//! rebinding, a Kubernetes ExternalName) is refused unless a rule names that
//! address. The agent resolves with a real DNS server (dnsmasq, on loopback,
//! given as `dns_server`), never the machine's resolver; all traffic stays on
//! loopback.

use crate::common::*;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;

struct Dnsmasq(std::process::Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on 127.0.0.1:`port`, authoritative for `.test` only (nothing is
/// forwarded anywhere), logging the queries it gets to `log`:
/// - `rebind.test` -> 127.0.0.1
/// - `mixed.test`  -> 127.0.0.1 and ::1
/// - `mapped.test` -> ::ffff:127.0.0.1 (IPv4-mapped loopback)
///
/// `None` when dnsmasq is not installed.
fn dnsmasq(port: u16, log: &std::path::Path) -> Option<Dnsmasq> {
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--user=root",
            "--cache-size=0",
            "--local=/test/",
            "--address=/rebind.test/127.0.0.1",
            "--address=/mixed.test/127.0.0.1",
            "--address=/mixed.test/::1",
            "--address=/mapped.test/::ffff:127.0.0.1",
            "--log-queries",
            &format!("--log-facility={}", log.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let dns = Dnsmasq(child);
    // dnsmasq answers on TCP too: it is up once the port accepts.
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
        "dnsmasq did not start on port {port}"
    );
    Some(dns)
}

/// Expects the forward's stream to be closed at once: the open was refused.
async fn expect_refused(port: u16) {
    let mut s = connect(port).await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("refused stream closes promptly");
    assert!(matches!(r, Ok(0) | Err(_)), "expected close, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_to_loopback_need_an_explicit_rule() {
    let dir = std::env::temp_dir().join(format!("tether-agent-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let query_log = dir.join("dnsmasq.log");
    let dns_port = free_udp_port();
    let Some(_dns) = dnsmasq(dns_port, &query_log) else {
        if std::env::var_os("CI").is_some() {
            panic!("dnsmasq is not installed (.ci/run installs dnsmasq-base)");
        }
        eprintln!("skipping: dnsmasq is not installed (apt-get install dnsmasq-base)");
        return;
    };

    // Two echo services on loopback; a rule names only the first one's port.
    let allowed = echo_service().await;
    let other = echo_service().await;
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("dns_server = \"127.0.0.1:{dns_port}\"\n")).unwrap();
    let loopback_rule = format!("127.0.0.0/8:{}", allowed.port());
    let t = Tunnel::start(
        &[],
        &[
            "--config",
            &config.display().to_string(),
            "--allow",
            "*.test:*",
            "--allow",
            &loopback_rule,
        ],
    );
    let targets = [
        format!("prod/rebind.test:{}", other.port()), // glob only: refused
        format!("prod/rebind.test:{}", allowed.port()), // explicit rule: reached
        format!("prod/mixed.test:{}", allowed.port()), // ::1 has no rule: refused
        format!("prod/mapped.test:{}", other.port()), // mapped loopback: refused
        format!("prod/127.0.0.1:{}", other.port()),   // literal loopback: refused
        format!("prod/elsewhere.example:{}", allowed.port()), // outside the glob
    ];
    let ports: Vec<u16> = targets.iter().map(|_| free_port()).collect();
    let forwards: Vec<(u16, &str)> = ports
        .iter()
        .zip(&targets)
        .map(|(p, t)| (*p, t.as_str()))
        .collect();
    let client = t.client(CLIENT_TOKEN, &forwards);

    // With the explicit rule, real bytes echo through the name.
    let back = echo_through(ports[1], b"hello through rebind.test").await;
    assert_eq!(back, b"hello through rebind.test");

    for p in [ports[0], ports[2], ports[3], ports[4], ports[5]] {
        expect_refused(p).await;
    }
    let other_port = other.port();
    let expected = [
        "rebind.test resolves to 127.0.0.1, a loopback address (127.0.0.0/8)".to_owned(),
        "mixed.test resolves to ::1, a loopback address (::1/128)".to_owned(),
        "mapped.test resolves to ::ffff:127.0.0.1, a loopback address (127.0.0.0/8)".to_owned(),
        format!("127.0.0.1:{other_port} is not in this agent's allow list: 127.0.0.1 is a loopback address"),
        format!("elsewhere.example:{} is not in this agent's allow list", allowed.port()),
    ];
    assert!(
        wait_until(Duration::from_secs(5), || {
            let log = client.log_text();
            expected.iter().all(|e| log.contains(e.as_str()))
        }),
        "client log lacks a refusal reason ({expected:?}):\n{}",
        client.log_text()
    );
    let log = client.log_text();
    assert!(log.contains("forbidden"), "{log}");
    let agent_log = t.agent.log_text();
    assert!(
        agent_log.contains("open refused: rebind.test resolves to 127.0.0.1"),
        "the agent logs its refusal:\n{agent_log}"
    );
    assert_eq!(t.agent_metric("tether_agent_open_errors_total"), Some(5.0));
    assert_eq!(t.agent_metric("tether_agent_streams_total"), Some(1.0));

    // The names came from dnsmasq; a name outside every glob was never looked up.
    let names = ["rebind.test", "mixed.test", "mapped.test"];
    let asked = || {
        let queries = std::fs::read_to_string(&query_log).unwrap_or_default();
        names
            .iter()
            .all(|n| queries.contains(&format!("] {n} from 127.0.0.1")))
    };
    let queries = std::fs::read_to_string(&query_log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), asked),
        "dnsmasq was not asked for all of {names:?}:\n{queries}"
    );
    let queries = std::fs::read_to_string(&query_log).unwrap_or_default();
    assert!(!queries.contains("elsewhere.example"), "{queries}");
    drop(client);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}
