//! `tether status`: what is connected to a server and what flows through
//! it, from the admin API (`/api/v1/...`), as tables or JSON.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tether_net::reconnect::server_trust;
use tether_net::transport::tls::client_config;

use crate::terminal::printable;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// Live streams a table shows unless `--streams` says otherwise.
const TABLE_STREAMS: usize = 50;

/// Most streams the admin API sends in one answer with a limit.
const MAX_STREAMS: usize = 10_000;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `tether status` arguments.
#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Server URL: wss://HOST:PORT (or https://, ws://, http://).
    #[arg(long, env = "TETHER_SERVER")]
    server: String,
    /// A client token of an identity the server's `admins` names.
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: String,
    /// Verify the server against this PEM CA file instead of system roots.
    #[arg(long, env = "TETHER_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Accept exactly the server certificate with this SHA-256 fingerprint.
    #[arg(long, env = "TETHER_FINGERPRINT")]
    fingerprint: Option<String>,
    /// Print the API's answers as one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
    /// Show the N busiest live streams (at most 10 000; 0: the 10 000
    /// oldest). A replica may carry 100 000; the count of all is shown
    /// either way. Default: 50 in tables, the 10 000 oldest with --json.
    #[arg(long, value_name = "N")]
    streams: Option<usize>,
    /// With --watch: stop after this many refreshes (for scripts).
    #[arg(long, hide = true)]
    count: Option<u64>,
}

/// Where the server is.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
}

fn parse_server(s: &str) -> anyhow::Result<Target> {
    let uri: http::Uri = s
        .parse()
        .with_context(|| format!("{s:?} is not a URL (write wss://HOST:PORT)"))?;
    let tls = match uri.scheme_str() {
        Some("wss" | "https") => true,
        Some("ws" | "http") => false,
        other => bail!("{s}: scheme {other:?}; use wss://HOST:PORT"),
    };
    let host = uri
        .host()
        .context("no host in the server URL")?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    Ok(Target {
        tls,
        host,
        port,
        authority,
    })
}

/// Runs `tether status`.
pub(crate) async fn run(a: StatusArgs) -> anyhow::Result<()> {
    let target = parse_server(&a.server)?;
    if !target.tls {
        // The admin token goes in every request.
        tether_net::transport::ws::warn_if_plain(&format!("ws://{}", target.authority));
    }
    let mut done = 0u64;
    loop {
        let snapshot = match (fetch_all(&a, &target).await, a.watch) {
            (Ok(s), _) => s,
            // Watching without an end, once a fetch worked (a wrong token
            // or name fails at once): a replica restarting in a rollout is
            // shown and tried again at the next tick.
            (Err(e), Some(every)) if done > 0 && a.count.is_none() => {
                let every = every.max(1);
                eprintln!("tether status: {e:#} (trying again in {every} s)");
                tokio::time::sleep(Duration::from_secs(every)).await;
                continue;
            }
            (Err(e), _) => return Err(e),
        };
        let out = if a.json && a.watch.is_some() {
            // One line per snapshot, for a script reading line by line.
            serde_json::to_string(&snapshot)? + "\n"
        } else if a.json {
            serde_json::to_string_pretty(&snapshot)? + "\n"
        } else {
            render(&snapshot)
        };
        // Home and clear: the table redraws in place.
        let clear = if a.watch.is_some() && !a.json {
            "\x1b[H\x1b[2J"
        } else {
            ""
        };
        if !emit(clear, &out)? {
            // The reader went away (`| head -1`): that is the end.
            return Ok(());
        }
        done += 1;
        let Some(every) = a.watch else {
            return Ok(());
        };
        if a.count.is_some_and(|n| done >= n) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(every.max(1))).await;
    }
}

/// How many times a snapshot is fetched again when its parts came from
/// different replicas.
const MIXED_REPLICA_TRIES: usize = 4;

/// Status, agents, sessions and streams, as one JSON object, all from one
/// replica.
///
/// Behind a load balancer each connection may land on another replica,
/// and the tables would show one replica's header above another's rows.
/// The four requests share one connection, which a TCP balancer keeps on
/// one replica; an HTTP balancer may still spread them, so the parts'
/// `replica` fields are compared and a mixed snapshot is fetched again.
async fn fetch_all(a: &StatusArgs, t: &Target) -> anyhow::Result<Value> {
    let mut replicas = vec![];
    for _ in 0..MIXED_REPLICA_TRIES {
        let snapshot = fetch_once(a, t).await?;
        replicas = ["status", "agents", "sessions", "streams"]
            .iter()
            .map(|part| str_of(&snapshot[*part]["replica"]))
            .collect::<Vec<_>>();
        if replicas.iter().all(|r| *r == replicas[0]) {
            return Ok(snapshot);
        }
    }
    bail!(
        "the answers kept coming from different replicas ({}): the load balancer spreads \
         requests; point --server at one replica (each replica answers for itself)",
        replicas.join(", ")
    )
}

/// The four parts of a snapshot, over one connection.
async fn fetch_once(a: &StatusArgs, t: &Target) -> anyhow::Result<Value> {
    let mut send = connect(a, t).await?;
    let mut all = serde_json::Map::new();
    for part in ["status", "agents", "sessions", "streams"] {
        let streams = a.streams.unwrap_or(if a.json { 0 } else { TABLE_STREAMS });
        let query = match (part, streams) {
            ("streams", n) if n > 0 => format!("?limit={}", n.min(MAX_STREAMS)),
            _ => String::new(),
        };
        let path = format!("/api/v1/{part}{query}");
        let v = tokio::time::timeout(REQUEST_TIMEOUT, request(&mut send, a, t, &path))
            .await
            .with_context(|| format!("{path}: no answer within {REQUEST_TIMEOUT:?}"))??;
        all.insert(part.to_owned(), v);
    }
    Ok(Value::Object(all))
}

/// An HTTP/1.1 connection to the server (TLS when the URL says so).
async fn connect(
    a: &StatusArgs,
    t: &Target,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>> {
    let tcp = tokio::time::timeout(
        REQUEST_TIMEOUT,
        TcpStream::connect((t.host.as_str(), t.port)),
    )
    .await
    .with_context(|| format!("connecting to {}:{} timed out", t.host, t.port))?
    .with_context(|| format!("cannot connect to {}:{}", t.host, t.port))?;
    let _ = tcp.set_nodelay(true);
    let fut = async {
        if t.tls {
            let trust = server_trust(a.fingerprint.as_ref(), a.ca_file.as_ref());
            let cfg = client_config(&trust)?;
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .context("the server's host is not a TLS name")?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .context("TLS handshake (tether doctor tells what is wrong)")?;
            handshake(tls).await
        } else {
            handshake(tcp).await
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .with_context(|| {
            format!(
                "{}:{}: no handshake within {REQUEST_TIMEOUT:?}",
                t.host, t.port
            )
        })?
}

async fn handshake<S>(
    io: S,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(conn);
    Ok(send)
}

/// `GET path` with the token; the JSON answer, or the API's reason.
async fn request(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
    a: &StatusArgs,
    t: &Target,
    path: &str,
) -> anyhow::Result<Value> {
    send.ready()
        .await
        .context("the server closed the connection")?;
    let req = http::Request::get(path)
        .header(http::header::HOST, &t.authority)
        .header(http::header::AUTHORIZATION, format!("Bearer {}", a.token))
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = send.send_request(req).await.context("HTTP request")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&body).with_context(|| {
        format!(
            "{path}: HTTP {status}, not JSON (is this a tether server with the admin API?): {}",
            printable(&String::from_utf8_lossy(&body[..body.len().min(200)]))
        )
    })?;
    if !status.is_success() {
        let reason = v["reason"].as_str().unwrap_or("(no reason given)");
        bail!("{path}: HTTP {status}: {}", printable(reason));
    }
    Ok(v)
}

/// The snapshot as tables.
/// Writes one snapshot to stdout; `false` once stdout's reader has gone (a
/// closed pipe), where `print!` would panic: Rust ignores SIGPIPE, so a
/// write to a closed pipe is an error, not the end of the process.
fn emit(clear: &str, out: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(clear.as_bytes())
        .and_then(|()| stdout.write_all(out.as_bytes()))
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

fn render(v: &Value) -> String {
    let mut out = String::new();
    let s = &v["status"];
    // One of several: the figures below are this replica's alone (a
    // server older than the field says nothing).
    let of = match num(&s["replicas"]) {
        n if n > 1 => format!(" (1 of {n}: its figures only)"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "replica {}{of}  tether {}  protocol {}  up {}  {}  agents {}  client sessions {}  streams {}",
        str_of(&s["replica"]),
        str_of(&s["version"]),
        num(&s["protocol"]),
        duration(num(&s["uptime_secs"])),
        str_of(&s["phase"]),
        num(&s["agents_online"]),
        num(&s["client_sessions"]),
        num(&s["live_streams"]),
    );

    let mut rows = vec![vec![
        "AGENT".into(),
        "ONLINE".into(),
        "INSTANCES".into(),
        "STREAMS".into(),
        "IN".into(),
        "OUT".into(),
        "UP".into(),
        "VERSION".into(),
        "SERVICES".into(),
    ]];
    for ag in array(&v["agents"]["agents"]) {
        let inst = array(&ag["instances"]);
        let draining = |i: &Value| i["draining"].as_bool() == Some(true);
        // Saturating: the figures come from the server's answer, not from us.
        let sum = |k: &str| {
            inst.iter()
                .map(|i| num(&i[k]))
                .fold(0u64, u64::saturating_add)
        };
        let oldest = inst.iter().map(|i| num(&i["uptime_secs"])).max();
        let services: Vec<String> = array(&ag["services"])
            .iter()
            .map(|s| format!("{}({})", str_of(&s["name"]), str_of(&s["kind"])))
            .collect();
        rows.push(vec![
            str_of(&ag["name"]),
            if ag["online"].as_bool() == Some(true) {
                "yes".into()
            } else {
                "no".into()
            },
            match inst.iter().filter(|i| draining(i)).count() {
                0 => inst.len().to_string(),
                draining => format!("{} ({draining} draining)", inst.len()),
            },
            sum("streams").to_string(),
            bytes(sum("bytes_in")),
            bytes(sum("bytes_out")),
            oldest.map(duration).unwrap_or_else(|| "-".into()),
            // A live instance's: a draining one may be the old version of a
            // rolling update.
            inst.iter()
                .find(|i| !draining(i))
                .or(inst.first())
                .map(|i| str_of(&i["software"]))
                .unwrap_or_else(|| "-".into()),
            if services.is_empty() {
                "-".into()
            } else {
                services.join(", ")
            },
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);

    let mut rows = vec![vec![
        "SESSION".into(),
        "KIND".into(),
        "NAME".into(),
        "PEER".into(),
        "UP".into(),
        "STREAMS".into(),
        "IN".into(),
        "OUT".into(),
        "SOFTWARE".into(),
    ]];
    for s in array(&v["sessions"]["sessions"]) {
        rows.push(vec![
            num(&s["id"]).to_string(),
            str_of(&s["kind"]),
            str_of(&s["name"])
                + if s["draining"].as_bool() == Some(true) {
                    " (draining)"
                } else {
                    ""
                },
            str_of(&s["peer"]),
            duration(num(&s["uptime_secs"])),
            num(&s["streams"]).to_string(),
            bytes(num(&s["bytes_in"])),
            bytes(num(&s["bytes_out"])),
            str_of(&s["software"]),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);

    let mut rows = vec![vec![
        "STREAM".into(),
        "WHO".into(),
        "TARGET".into(),
        "PROTO".into(),
        "AGE".into(),
        "UP".into(),
        "DOWN".into(),
    ]];
    for s in array(&v["streams"]["streams"]) {
        rows.push(vec![
            num(&s["id"]).to_string(),
            str_of(&s["who"]),
            format!("{}/{}", str_of(&s["agent"]), str_of(&s["service"])),
            str_of(&s["protocol"]),
            duration(s["age_secs"].as_f64().unwrap_or(0.0) as u64),
            bytes(num(&s["bytes_up"])),
            bytes(num(&s["bytes_down"])),
        ]);
    }
    out.push('\n');
    if rows.len() == 1 {
        out.push_str("no live streams\n");
    } else {
        table(&mut out, &rows);
        let total = num(&v["streams"]["total"]);
        let shown = rows.len() as u64 - 1;
        if total > shown {
            let _ = writeln!(
                out,
                "{shown} of {total} live streams shown (--streams N: the N busiest, up to 10 000)"
            );
        }
    }
    out
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// A string from the API as a table cell. Names, software strings and
/// reasons come from agents and clients: control characters (a newline that
/// forges a row, an escape sequence that drives the terminal) and Unicode's
/// direction overrides are shown escaped, never passed to the terminal.
fn str_of(v: &Value) -> String {
    printable(v.as_str().unwrap_or("-"))
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Left-aligned columns, two spaces apart.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `1.5 KiB`, `12 B`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `45s`, `3m12s`, `2h05m`, `3d04h`.
fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(192), "3m12s");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(duration(3 * 86400 + 4 * 3600), "3d04h");
    }

    /// Names and software strings come from agents and clients: a newline
    /// or an escape sequence in one must not forge a row or reach the
    /// terminal.
    #[test]
    fn peer_strings_cannot_forge_rows_or_drive_the_terminal() {
        let v = serde_json::json!({
            "status": {"replica": "r1"},
            "agents": {"agents": [{"name": "prod", "online": true,
                "services": [{"name": "db\nFAKE  yes  1", "kind": "tcp"}],
                "instances": [{"software": "x\u{1b}]52;c;cHdu\u{7}\u{1b}[2J", "streams": 0}]}]},
            "sessions": {"sessions": [{"id": 1, "kind": "client", "name": "dev",
                "software": "evil\u{202e}gnp.exe\r"}]},
            "streams": {"streams": [], "total": 0}
        });
        let out = render(&v);
        assert!(
            !out.contains('\u{1b}') && !out.contains('\r') && !out.contains('\u{202e}'),
            "{out:?}"
        );
        assert!(!out.lines().any(|l| l.starts_with("FAKE")), "{out}");
        assert!(out.contains("db\\u{a}FAKE"), "{out}");
        assert_eq!(printable("plain-name_1.0 é"), "plain-name_1.0 é");
    }

    #[test]
    fn server_urls_of_every_scheme_parse() {
        let t = parse_server("wss://tether.example.com").unwrap();
        assert!(t.tls && t.port == 443 && t.host == "tether.example.com");
        let t = parse_server("ws://127.0.0.1:7700").unwrap();
        assert!(!t.tls && t.port == 7700 && t.authority == "127.0.0.1:7700");
        let t = parse_server("https://[::1]:8443").unwrap();
        assert!(t.tls && t.host == "::1");
        assert!(parse_server("ftp://x").is_err());
    }

    #[test]
    fn an_agent_in_a_rolling_update_shows_its_new_version_and_the_draining_count() {
        let v = serde_json::json!({
            "status": {"replica": "r1", "replicas": 3, "version": "0.1.0", "protocol": 9, "uptime_secs": 75,
                       "phase": "serving", "agents_online": 1, "client_sessions": 0, "live_streams": 0},
            "agents": {"agents": [
                {"name": "prod", "online": true, "services": [],
                 "instances": [
                    {"streams": 0, "bytes_in": 0, "bytes_out": 0, "uptime_secs": 900, "software": "tether/0.0.9", "draining": true},
                    {"streams": 0, "bytes_in": 0, "bytes_out": 0, "uptime_secs": 5, "software": "tether/0.1.0", "draining": false}
                 ]}
            ]},
            "sessions": {"sessions": []},
            "streams": {"streams": []}
        });
        let out = render(&v);
        assert!(
            out.starts_with("replica r1 (1 of 3: its figures only)"),
            "{out}"
        );
        let row = out
            .lines()
            .find(|l| l.starts_with("prod "))
            .unwrap_or_default();
        assert!(row.contains("2 (1 draining)"), "{out}");
        assert!(
            row.contains("tether/0.1.0") && !row.contains("0.0.9"),
            "{out}"
        );
    }

    #[test]
    fn tables_show_every_agent_and_stream() {
        let v = serde_json::json!({
            "status": {"replica": "r1", "version": "0.1.0", "protocol": 4, "uptime_secs": 75,
                       "phase": "serving", "agents_online": 1, "client_sessions": 1, "live_streams": 1},
            "agents": {"agents": [
                {"name": "prod", "online": true, "services": [{"name": "db", "kind": "tcp"}],
                 "instances": [{"streams": 1, "bytes_in": 2048, "bytes_out": 10, "uptime_secs": 70, "software": "tether/0.1.0"}]},
                {"name": "staging", "online": false, "services": [], "instances": []}
            ]},
            "sessions": {"sessions": [{"id": 3, "kind": "client", "name": "alice", "peer": "127.0.0.1:5000",
                          "uptime_secs": 5, "streams": 1, "bytes_in": 1, "bytes_out": 2, "software": "tether/0.1.0", "draining": false}]},
            "streams": {"streams": [{"id": 7, "who": "alice", "agent": "prod", "service": "db",
                         "protocol": "tcp", "age_secs": 4.2, "bytes_up": 100, "bytes_down": 2048}]}
        });
        let out = render(&v);
        assert!(out.contains("replica r1"), "{out}");
        assert!(out.contains("up 1m15s"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("prod ") && l.contains("db(tcp)") && l.contains("2.0 KiB")),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with("staging ") && l.contains(" no ")),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.contains("alice") && l.contains("prod/db") && l.contains("100 B")),
            "{out}"
        );
        assert!(!out.contains("busiest"), "all streams shown: {out}");
        // The server sent a page of a larger list: the table says so.
        let mut paged = v.clone();
        paged["streams"]["total"] = 120.into();
        let out = render(&paged);
        assert!(
            out.contains("1 of 120 live streams shown (--streams N: the N busiest, up to 10 000)"),
            "{out}"
        );
    }
}
