//! `tether doctor`: checks the way from here to a server step by step (the
//! URL, DNS, TCP, TLS and the certificate check, the WebSocket upgrade and
//! the token, the protocol handshake) and says in one line per step what is
//! wrong and how to fix it. It stops at the first step that fails.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tether_net::reconnect::{server_trust, ConnectError, Endpoint};
use tether_net::transport::tls::{client_config, fingerprint, ServerTrust};
use tether_net::transport::ws::{endpoint_url, is_loopback_host};
use tether_proto::endpoints::{AGENT_NAME_HEADER, AGENT_PATH, AGENT_PROBE_HEADER, CLIENT_PATH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::terminal::printable;

/// How long one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// `tether doctor` arguments.
#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// Server URL, e.g. wss://tether.example.com:7700.
    #[arg(long, env = "TETHER_SERVER")]
    server: String,
    /// Token to check (a client token, or an agent token with --agent).
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Check as this agent (the agent endpoint) instead of as a client.
    #[arg(long, value_name = "NAME")]
    agent: Option<String>,
    /// Verify the server against this PEM CA file instead of system roots.
    #[arg(long, env = "TETHER_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Accept exactly the server certificate with this SHA-256 fingerprint.
    #[arg(long, env = "TETHER_FINGERPRINT")]
    fingerprint: Option<String>,
}

/// One step's verdict.
struct Step {
    name: &'static str,
}

impl Step {
    fn ok(&self, what: impl std::fmt::Display) {
        println!("ok    {:<9} {what}", self.name);
    }

    fn fail(&self, what: impl std::fmt::Display, fix: impl std::fmt::Display) -> anyhow::Error {
        println!("FAIL  {:<9} {what}\n      fix: {fix}", self.name);
        anyhow::anyhow!("{} check failed", self.name)
    }
}

/// Runs the checks; an error once one failed (after printing why).
pub(crate) async fn run(a: DoctorArgs) -> anyhow::Result<Checked> {
    // The URL.
    let step = Step { name: "url" };
    let uri: http::Uri = match a.server.parse() {
        Ok(u) => u,
        Err(e) => {
            return Err(step.fail(
                format!("{:?} is not a URL: {e}", a.server),
                "write it as wss://HOST:PORT",
            ))
        }
    };
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        other => {
            return Err(step.fail(
                format!("scheme {other:?}"),
                "use wss://HOST:PORT (or ws:// for a plain-text server on loopback)",
            ))
        }
    };
    let Some(host) = uri.host().map(|h| h.trim_matches(['[', ']']).to_owned()) else {
        return Err(step.fail("no host in the URL", "write it as wss://HOST:PORT"));
    };
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    step.ok(format!(
        "{}://{host}:{port}",
        if tls { "wss" } else { "ws" }
    ));
    if !tls && !is_loopback_host(&host) {
        println!("      note: plain ws:// to a host that is not loopback: the token and every tunneled byte would cross the network unencrypted; use wss://");
    }

    // DNS.
    let step = Step { name: "dns" };
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host.as_str(), port)))
            .await
        {
            Ok(Ok(found)) => found.collect(),
            Ok(Err(e)) => {
                return Err(step.fail(
                    format!("{host} does not resolve: {e}"),
                    "check the name (and your DNS); an IP address works too",
                ))
            }
            Err(_) => {
                return Err(step.fail(
                    format!("resolving {host} took over {STEP_TIMEOUT:?}"),
                    "check your DNS server",
                ))
            }
        };
    if addrs.is_empty() {
        return Err(step.fail(format!("{host} has no address"), "check the name"));
    }
    step.ok(format!(
        "{host} -> {}",
        addrs
            .iter()
            .map(|a| a.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // TCP: each address in turn, as agents and clients connect.
    let step = Step { name: "tcp" };
    let mut failed = vec![];
    let mut connected = None;
    for &addr in &addrs {
        match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                connected = Some((s, addr));
                break;
            }
            Ok(Err(e)) => failed.push((addr, Some(e))),
            Err(_) => failed.push((addr, None)),
        }
    }
    let Some((tcp, addr)) = connected else {
        let (addr, err) = failed.swap_remove(0);
        let others = if failed.is_empty() {
            String::new()
        } else {
            format!(" (and {} other addresses failed too)", failed.len())
        };
        return Err(match err {
            Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => step.fail(
                format!("{addr} refused the connection{others}"),
                "is the server running, and is this its port (the server's --listen)?",
            ),
            Some(e) => step.fail(
                format!("cannot connect to {addr}: {e}{others}"),
                "check the address and any firewall in between",
            ),
            None => step.fail(
                format!("no answer from {addr} within {STEP_TIMEOUT:?}{others}"),
                "a firewall drops the connection, or the address is wrong",
            ),
        });
    };
    if failed.is_empty() {
        step.ok(format!("connected to {addr}"));
    } else {
        let tried: Vec<String> = failed.iter().map(|(a, _)| a.ip().to_string()).collect();
        step.ok(format!(
            "connected to {addr}; {} failed first (agents try each address in turn; a client dials the name and may give up on an address that hangs)",
            tried.join(", ")
        ));
    }

    // TLS, or that the port does not speak TLS when the URL says ws://.
    let trust = server_trust(a.fingerprint.as_ref(), a.ca_file.as_ref());
    if tls {
        check_tls(tcp, &host, &trust, addr).await?;
    } else {
        check_plain(tcp, &host).await?;
    }

    // The WebSocket upgrade, the token and the handshake.
    let step = Step { name: "token" };
    let (path, role) = match &a.agent {
        Some(_) => (AGENT_PATH, "an agent"),
        None => (CLIENT_PATH, "a client"),
    };
    let endpoint = Endpoint {
        url: endpoint_url(&a.server, path),
        trust,
        identity: None,
    };
    let cfg = tether_proto::Config {
        software: format!("tether-doctor/{}", env!("CARGO_PKG_VERSION")),
        accept_opens: false,
        ..Default::default()
    };
    let Some(token) = a.token.as_deref() else {
        // Without a token, the upgrade alone: a tether server refuses it
        // with its own 401, which a wrong service or a proxy that drops
        // upgrades would not.
        let step = Step { name: "upgrade" };
        return match endpoint.connect_via(Some(addr), &[], cfg, "doctor").await {
            // Tether's own words (upgrade.rs), not any 401: a service
            // behind basic auth asks for credentials too.
            Err(e)
                if e.refused_status() == Some(401)
                    && e.to_string().contains("token (Authorization: Bearer") =>
            {
                step.ok("a tether server answers the upgrade and asks for a token");
                println!("skip  {:<9} no --token (or TETHER_TOKEN) to check", "token");
                Ok(Checked::WithoutToken)
            }
            Ok((conn, _, _)) => {
                conn.close(tether_proto::ErrorCode::Normal, "doctor done");
                step.ok("the server took a session without a token");
                Ok(Checked::All)
            }
            Err(e) => Err(refusal(&step, &e, role)),
        };
    };
    let mut headers = vec![("authorization".to_owned(), format!("Bearer {token}"))];
    if let Some(name) = &a.agent {
        headers.push((AGENT_NAME_HEADER.to_owned(), name.clone()));
        // Checked, not registered: the real agent's pool stays as it is.
        headers.push((AGENT_PROBE_HEADER.to_owned(), "1".to_owned()));
    }
    // The address the TCP step reached: the name's other addresses may
    // not answer (agents dial each address in turn, as that step did).
    match endpoint
        .connect_via(Some(addr), &headers, cfg, "doctor")
        .await
    {
        Ok((conn, info, _)) => {
            step.ok(format!(
                "accepted as {role}; {} speaks protocol version {}",
                printable(&info.peer_software),
                info.version
            ));
            if a.agent.is_some() && info.version < tether_proto::PROBE_VERSION {
                println!("      note: this server predates protocol {}: it counted the check as one more instance of the agent for a moment", tether_proto::PROBE_VERSION);
            }
            conn.close(tether_proto::ErrorCode::Normal, "doctor done");
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.transport_closed()).await;
            Ok(Checked::All)
        }
        Err(e) => Err(refusal(&step, &e, role)),
    }
}

/// How far the checks went when none failed.
pub(crate) enum Checked {
    /// Every step, the token and the handshake too.
    All,
    /// Every step but the token's (none given) and the handshake's.
    WithoutToken,
}

/// The failed step for a refused or failed upgrade, with the fix that fits
/// the server's status. The server's text is shown escaped: it may come
/// from anything that answers on the port.
fn refusal(step: &Step, e: &ConnectError, role: &str) -> anyhow::Error {
    let said = printable(&e.to_string());
    match e.refused_status() {
        Some(401) => step.fail(
            format!("the server does not accept this token for {role}: {said}"),
            match role {
                "an agent" => "use the agent's token, and check the server's [[agent]] entry (token or token_sha256)",
                _ => "use a client token the server lists in [[client]] (or a valid JWT)",
            },
        ),
        Some(403) => step.fail(
            format!("refused: {said}"),
            "the token belongs to another agent name: pass that name to --agent",
        ),
        Some(409) => step.fail(
            format!("refused: {said}"),
            "this agent instance is connected already; the running agent is fine",
        ),
        Some(429 | 503) => step.fail(
            format!("the server is at a limit: {said}"),
            "a tether server, busy or at a configured limit ([limits]); try again, or raise the limit its reason names",
        ),
        _ if matches!(e, ConnectError::Handshake(_)) => step.fail(
            format!("the WebSocket is up, the tether handshake failed: {said}"),
            "the server and this build may share no protocol version: upgrade the older one",
        ),
        _ => step.fail(
            format!("the WebSocket upgrade failed: {said}"),
            "is this a tether server (a proxy in between may not pass WebSocket upgrades)?",
        ),
    }
}

/// The TLS handshake with the configured trust; on failure, a second one
/// that accepts any certificate tells what the server presents.
async fn check_tls(
    tcp: TcpStream,
    host: &str,
    trust: &ServerTrust,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let step = Step { name: "tls" };
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
        step.fail(
            format!("{host} is not a TLS server name: {e}"),
            "use a DNS name or an IP address",
        )
    })?;
    let cfg = match client_config(trust) {
        Ok(c) => c,
        Err(e) => {
            return Err(step.fail(
                format!("{e:#}"),
                "pass --ca-file FILE or --fingerprint SHA256",
            ))
        }
    };
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let done = tokio::time::timeout(STEP_TIMEOUT, connector.connect(name.clone(), tcp)).await;
    let err = match done {
        Ok(Ok(_)) => {
            step.ok(match trust {
                ServerTrust::Fingerprint(_) => {
                    "the certificate matches the pinned fingerprint".to_owned()
                }
                ServerTrust::CaFile(f) => {
                    format!("the certificate is valid for {host} under {}", f.display())
                }
                _ => format!("the certificate is valid for {host} (system roots)"),
            });
            return Ok(());
        }
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(step.fail(
                format!("no TLS answer within {STEP_TIMEOUT:?}"),
                "the port may not speak TLS: try ws:// (plain text, loopback only)",
            ))
        }
    };
    let rustls_err = err
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned();
    // What does the server present?
    let presented = presented_fingerprint(addr, name).await;
    let shown = presented.as_deref().unwrap_or("?");
    use rustls::{CertificateError, Error as E};
    Err(match (rustls_err, trust) {
        (Some(E::InvalidMessage(_)), _) => step.fail(
            format!("the port does not speak TLS ({err})"),
            "use ws:// for a plain-text server, or the server's TLS port",
        ),
        (Some(E::InvalidCertificate(CertificateError::Expired)), _)
        | (Some(E::InvalidCertificate(CertificateError::ExpiredContext { .. })), _) => step.fail(
            format!("the server's certificate has expired ({err})"),
            "renew the server's certificate (tls cert/key) and reload it",
        ),
        (Some(E::InvalidCertificate(CertificateError::NotValidForName)), _)
        | (Some(E::InvalidCertificate(CertificateError::NotValidForNameContext { .. })), _) => step
            .fail(
                format!("the certificate is not for {host} ({err})"),
                "use the name the certificate was issued for, or pin it with --fingerprint",
            ),
        (_, ServerTrust::Fingerprint(want)) => step.fail(
            format!("the server presents fingerprint {shown}, not the pinned {want}"),
            "pin the fingerprint the server prints at start (or the server's certificate changed)",
        ),
        (Some(E::InvalidCertificate(CertificateError::UnknownIssuer)), _) => step.fail(
            format!("the certificate (fingerprint {shown}) is not signed by a CA you trust"),
            "pass --ca-file with the issuing CA, or --fingerprint to pin this certificate",
        ),
        _ => step.fail(
            format!("TLS handshake failed: {err}"),
            "check the server's TLS settings",
        ),
    })
}

/// The fingerprint of the certificate the server at `addr` presents.
async fn presented_fingerprint(
    addr: SocketAddr,
    name: rustls::pki_types::ServerName<'static>,
) -> Option<String> {
    let cfg = client_config(&ServerTrust::AnyCertificate).ok()?;
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let tls = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()?;
    let cert = tls.get_ref().1.peer_certificates()?.first()?.clone();
    Some(fingerprint(&cert))
}

/// A ws:// URL: the port must answer plain HTTP (a TLS port answers a
/// plain request with a TLS alert, or not at all).
async fn check_plain(mut tcp: TcpStream, host: &str) -> anyhow::Result<()> {
    let step = Step { name: "plain" };
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut buf = [0u8; 64];
    let read = async {
        tcp.write_all(req.as_bytes()).await?;
        tcp.read(&mut buf).await
    };
    match tokio::time::timeout(STEP_TIMEOUT, read).await {
        Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/") => {
            step.ok("the port answers plain HTTP");
            Ok(())
        }
        Ok(Ok(n)) if n > 0 && (buf[0] == 0x15 || buf[0] == 0x16) => Err(step.fail(
            "the port speaks TLS, the URL says ws://",
            "use wss:// (and --fingerprint or --ca-file)",
        )),
        Ok(Ok(_)) | Ok(Err(_)) => Err(step.fail(
            "no HTTP answer on this port (a TLS port closes on plain text)",
            "use wss:// if the server has TLS, else check the port",
        )),
        Err(_) => Err(step.fail(
            format!("no answer within {STEP_TIMEOUT:?}"),
            "check the port (the server's --listen)",
        )),
    }
}

/// Ends the command: exit status 0 when every check passed, 1 otherwise
/// (the steps printed the details).
pub(crate) fn summary(r: anyhow::Result<Checked>) -> anyhow::Result<()> {
    match r {
        Ok(Checked::All) => {
            println!("all checks passed");
            Ok(())
        }
        Ok(Checked::WithoutToken) => {
            println!("all checks passed (the token and the handshake not checked: no --token)");
            Ok(())
        }
        Err(e) => {
            println!("{e}");
            std::process::exit(1)
        }
    }
}
