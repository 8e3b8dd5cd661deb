//! UDP through the tunnel: a real DNS server (dnsmasq) queried with dig,
//! datagram boundaries, flow caps and idle expiry.

use crate::common::*;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::net::UdpSocket;

struct Dnsmasq(std::process::Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dnsmasq(port: u16) -> Option<Dnsmasq> {
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
            "--address=/tether.test/10.9.8.7",
            "--cache-size=0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Dnsmasq(child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_over_the_tunnel_with_dig_and_bounded_flows() {
    let dns_port = free_udp_port();
    let _dns = dnsmasq(dns_port).expect("dnsmasq is installed (.ci/run installs dnsmasq-base)");
    let echo = udp_echo().await;
    let dns: std::net::SocketAddr = format!("127.0.0.1:{dns_port}").parse().unwrap();
    let t = Tunnel::start(&[("dns", dns), ("uecho", echo)], &[]);
    let (local_dns, local_echo, metrics) = (free_udp_port(), free_udp_port(), free_port());
    let client = Proc::spawn(
        "udp-client",
        &[
            "client".into(),
            "--server".into(),
            t.url(),
            "--token".into(),
            CLIENT_TOKEN.into(),
            "--udp-idle-timeout-ms".into(),
            "1500".into(),
            "--max-udp-flows".into(),
            "64".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
            "forward".into(),
            format!("udp:127.0.0.1:{local_dns}=prod/dns"),
            format!("udp:127.0.0.1:{local_echo}=prod/uecho"),
        ],
    );
    assert!(client.wait_log("connected", Duration::from_secs(10)));
    let client_metric = |name: &str| {
        http_get(format!("127.0.0.1:{metrics}").parse().unwrap(), "/metrics")
            .and_then(|(_, b)| metric(&b, name))
    };

    // One query.
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &local_dns.to_string(),
            "one.tether.test",
            "+short",
            "+tries=3",
            "+time=2",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.9.8.7");

    // Thousands of queries, each from a new source port (a new flow).
    const N: usize = 2000;
    let batch: String = (0..N)
        .map(|i| format!("@127.0.0.1 -p {local_dns} q{i}.tether.test +short +tries=3 +time=2\n"))
        .collect();
    let dir = std::env::temp_dir().join(format!("tether-udp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let batch_file = dir.join("batch.txt");
    std::fs::write(&batch_file, batch).unwrap();
    let out = Command::new("dig")
        .arg("-f")
        .arg(&batch_file)
        .output()
        .unwrap();
    let answers = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == "10.9.8.7")
        .count();
    assert_eq!(answers, N, "every query answered");
    let flows = client_metric("tether_client_udp_flows").unwrap();
    assert!(flows <= 64.0, "flow table capped: {flows}");
    assert!(client_metric("tether_client_udp_evicted_total").unwrap() > 0.0);

    // Datagram boundaries are kept, up to the largest UDP payload.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(("127.0.0.1", local_echo)).await.unwrap();
    let mut buf = vec![0u8; 65536];
    for size in [1usize, 512, 1400, 9000, 65507] {
        let mut d = vec![0u8; size];
        Pattern::new(size as u64).fill(&mut d);
        sock.send(&d).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("echo arrives")
            .unwrap();
        assert_eq!(&buf[..n], &d[..], "datagram of {size} bytes");
    }

    // Flows expire after the idle timeout, on both sides.
    assert!(
        wait_until(Duration::from_secs(10), || {
            client_metric("tether_client_udp_flows") == Some(0.0)
                && t.agent_metric("tether_agent_udp_flows") == Some(0.0)
        }),
        "flows linger: client {:?}, agent {:?}",
        client_metric("tether_client_udp_flows"),
        t.agent_metric("tether_agent_udp_flows")
    );
    assert!(wait_until(Duration::from_secs(5), || {
        t.server_metric("tether_live_streams") == Some(0.0)
    }));
    let _ = std::fs::remove_dir_all(&dir);
}
