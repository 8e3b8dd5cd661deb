//! `tether demo`: the whole path on loopback in one process.
//!
//! Starts a TLS server (self-signed, the agent pins its fingerprint), an
//! agent offering two sample services (a web app and a TCP echo), and a
//! client forwarding local ports to them, then prints what to try: the web
//! app in a browser through the server, and both services through the
//! client's local ports.

use anyhow::Context;
use clap::Args;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Options of `tether demo`.
#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Local port of the forwarded web page.
    #[arg(long, default_value_t = 18080)]
    web_port: u16,
    /// Local port of the forwarded echo service.
    #[arg(long, default_value_t = 17007)]
    echo_port: u16,
    /// Port of the tether server (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    server_port: u16,
}

/// A fresh random token (hex of 16 random bytes).
pub(crate) fn random_token() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the demo until Ctrl-C.
pub(crate) async fn run(a: DemoArgs) -> anyhow::Result<()> {
    // Sample services, on ephemeral loopback ports: only the agent knows them.
    let web = TcpListener::bind("127.0.0.1:0").await?;
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let web_addr = web.local_addr()?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(crate::sample_app::serve(web));
    tokio::spawn(serve_echo(echo));

    let agent_token = random_token();
    let client_token = format!("c{}", random_token());
    let server_cfg: tether_server::ServerConfig = toml::from_str(&format!(
        r#"
        listen = "127.0.0.1:{port}"
        [tls]
        self_signed = true
        [[agent]]
        name = "demo"
        token_sha256 = "{agent_hash}"
        [[client]]
        name = "you"
        token_sha256 = "{client_hash}"
        allow = ["demo/*"]
        "#,
        port = a.server_port,
        agent_hash = tether_server::auth::token_hash_hex(&agent_token),
        client_hash = tether_server::auth::token_hash_hex(&client_token),
    ))?;
    let server = tether_server::Server::bind(&server_cfg).await?;
    let server_addr = server.local_addr();
    let fingerprint = server.fingerprint().unwrap_or_default().to_owned();
    let url = format!("wss://localhost:{}", server_addr.port());
    tokio::spawn(server.serve());

    let agent_cfg = tether_agent::AgentConfig {
        server: url.clone(),
        name: "demo".into(),
        instance: None,
        drain_timeout_ms: tether_proto::DEFAULT_DRAIN_TIMEOUT.as_millis() as u64,
        token: agent_token,
        token_file: None,
        client_cert: None,
        client_key: None,
        ca_file: None,
        fingerprint: Some(fingerprint.clone()),
        services: [
            (
                "web".to_owned(),
                tether_agent::ServiceSpec::Short(format!("http://{web_addr}")),
            ),
            (
                "echo".to_owned(),
                tether_agent::ServiceSpec::Short(echo_addr.to_string()),
            ),
        ]
        .into_iter()
        .collect(),
        allow: vec![],
        kubernetes: None,
        dns_server: None,
        dial_timeout_ms: tether_agent::DIAL_TIMEOUT.as_millis() as u64,
        udp_idle_timeout_ms: tether_net::udp::DEFAULT_IDLE_TIMEOUT.as_millis() as u64,
        session: Default::default(),
    };
    let agent = tether_agent::Agent::new(agent_cfg)?;
    let agent_stats = agent.stats();
    tokio::spawn(agent.run());

    let client_cfg = tether_client::ClientConfig {
        server: url.clone(),
        token: client_token.clone(),
        token_file: None,
        ca_file: None,
        fingerprint: Some(fingerprint.clone()),
        forward: vec![
            format!("127.0.0.1:{}=demo/web", a.web_port),
            format!("127.0.0.1:{}=demo/echo", a.echo_port),
        ],
        session: Default::default(),
        proxy: None,
        udp_idle_timeout_ms: tether_net::udp::DEFAULT_IDLE_TIMEOUT.as_millis() as u64,
        max_udp_flows: tether_net::udp::DEFAULT_MAX_FLOWS,
        early_data: true,
    };
    let client = tether_client::Client::bind(client_cfg)
        .await
        .context("binding the demo's local ports (choose others with --web-port / --echo-port)")?;
    let local = client.local_addrs();
    tokio::spawn(client.run());

    // Wait until the agent is registered so the printed commands work at once.
    let connected = || {
        agent_stats
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    };
    for _ in 0..100 {
        if connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !connected() {
        tracing::warn!("the demo's agent has not connected within 5 s (see the lines above): the commands below fail until it does");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (web_local, echo_local) = (local[0], local[1]);
    println!(
        r#"
tether demo is running (Ctrl-C to stop).

  server  {url}   (self-signed TLS, fingerprint {fingerprint})
  agent   "demo", offering web -> {web_addr} (http) and echo -> {echo_addr} (tcp)
  client  forwarding {web_local} -> demo/web and {echo_local} -> demo/echo

In a browser (accept the self-signed certificate), sign in with the client token
  {client_token}
at https://localhost:{server_port}/ : the console lists the agent; "open" shows the web app at
  https://localhost:{server_port}/a/demo/web/

From a shell:
  curl http://{web_local}/                          # the sample page, through the tunnel
  curl -k -H 'Authorization: Bearer {client_token}' https://localhost:{server_port}/a/demo/web/headers
  echo hello | nc -q1 {echo_ip} {echo_port}             # TCP echo, through the tunnel
  curl -sk https://localhost:{server_port}/metrics | grep tether_   # server metrics

Raw WebSocket (no CLI needed), e.g. with websocat:
  websocat -k -b 'wss://localhost:{server_port}/tether/v1/ws/demo/echo?token={client_token}'
"#,
        echo_ip = echo_local.ip(),
        echo_port = echo_local.port(),
        server_port = server_addr.port(),
    );
    tokio::signal::ctrl_c().await.ok();
    Ok(())
}

async fn serve_echo(l: TcpListener) {
    loop {
        let (s, _) = tether_net::listen::accept(&l).await;
        tokio::spawn(echo(s));
    }
}

async fn echo(s: TcpStream) {
    let (mut r, mut w) = s.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}
