//! HTTP/2 to services that speak only HTTP/2: the proxy sends requests as
//! HTTP/2 (cleartext with prior knowledge, or over the agent's TLS with
//! ALPN `h2`), all over one tunnel stream per service; gRPC works through
//! it with a real gRPC client and server (grpcio).

use super::common::web::{Web, WebOpts};
use super::common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Tunnel streams the server has opened so far.
fn opened(w: &Web) -> f64 {
    metric(&w.server_metrics(), "tether_streams_total").unwrap_or(0.0)
}

/// `n` curl processes fetching `url` at the same time with the dev
/// client's token; their status codes.
fn concurrent_gets(url: &str, n: usize) -> Vec<String> {
    let children: Vec<Child> = (0..n)
        .map(|_| {
            Command::new("curl")
                .args(["-sS", "-k", "--max-time", "30", "-o", "/dev/null"])
                .args(["-w", "%{http_code}", "-H"])
                .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
                .arg(url)
                .stdout(Stdio::piped())
                .spawn()
                .expect("curl")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

#[test]
fn http2_services_get_http2_requests_over_one_tunnel_stream() {
    let w = Web::start();
    // Twelve slow responses at once, the first requests to the service:
    // those that arrive while the connection opens wait for it, and all of
    // them share its one tunnel stream (the HTTP/1.1 pool, below, needs a
    // stream for each request in flight).
    let slow = |service: &str| w.url(&format!("/a/prod/{service}/events?n=5"));
    let before = opened(&w);
    let codes = concurrent_gets(&slow("h2web"), 12);
    assert!(codes.iter().all(|c| c == "200"), "{codes:?}");
    let h2_streams = opened(&w) - before;
    assert_eq!(
        h2_streams, 1.0,
        "12 concurrent HTTP/2 requests opened {h2_streams} tunnel streams"
    );
    for service in ["h2web", "h2secure"] {
        let out = w.get(&w.url(&format!("/a/prod/{service}/headers")), &[]);
        assert_eq!(out.status, 200, "{service}: {out:?}");
        let seen = out.json();
        assert_eq!(seen["version"], "HTTP/2.0", "{service}: {seen}");
        // The host the browser used travels as `:authority`; the proxy's
        // own headers as with HTTP/1.1; the bearer token never.
        let headers = &seen["headers"];
        assert_eq!(
            seen["uri"],
            format!("http://tether.test:{}/headers", w.port),
            "{seen}"
        );
        assert_eq!(
            headers["x-forwarded-host"],
            format!("tether.test:{}", w.port)
        );
        assert_eq!(headers["x-forwarded-prefix"], format!("/a/prod/{service}"));
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
        assert!(headers.get("authorization").is_none(), "{seen}");
        assert!(headers.get("host").is_none(), "{seen}");
    }
    // The HTTP/1.1 service still gets HTTP/1.1.
    let out = w.get(&w.url("/a/prod/web/headers"), &[]);
    assert_eq!(out.json()["version"], "HTTP/1.1");

    let slow = |service: &str| w.url(&format!("/a/prod/{service}/events?n=5"));
    let before = opened(&w);
    let codes = concurrent_gets(&slow("web"), 12);
    assert!(codes.iter().all(|c| c == "200"), "{codes:?}");
    let h1_streams = opened(&w) - before;
    assert!(
        h1_streams >= 6.0,
        "the HTTP/1.1 control opened only {h1_streams} streams for 12 concurrent requests"
    );

    // Bodies both ways, larger than every window on the way.
    let out = w.get(&w.url("/a/prod/h2web/bytes?n=8388608"), &[]);
    assert_eq!(out.status, 200);
    assert_eq!(out.raw.len(), 8 << 20);
    assert!(out
        .raw
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern_byte(i as u64)));
    let upload = w.dir.join("upload.bin");
    let mut data = vec![0u8; 5 << 20];
    Pattern::new(7).fill(&mut data);
    std::fs::write(&upload, &data).unwrap();
    let out = w.get(
        &w.url("/a/prod/h2secure/upload"),
        &["--data-binary", &format!("@{}", upload.display())],
    );
    assert_eq!(out.status, 200, "{out:?}");
    let mut h = Fnv::new();
    h.update(&data);
    assert_eq!(out.json()["bytes"], 5 << 20);
    assert_eq!(out.json()["fnv"], format!("{:016x}", h.finish()));

    // A WebSocket upgrade has no HTTP/2 form here: a clear refusal.
    let out = w.get(
        &w.url("/a/prod/h2web/ws"),
        &[
            "--http1.1",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ],
    );
    assert_eq!(out.status, 501, "{out:?}");
    assert!(out.body.contains("HTTP/2 only"), "{}", out.body);
}

#[test]
fn one_callers_unread_responses_do_not_stall_another_callers() {
    // bob leaves six large responses unread: more than his connection's
    // HTTP/2 window (4 MiB) waits at the server once the sockets on the
    // way are full. dev's requests to the same service go on a connection
    // of their own and are not held up.
    let w = Web::start_with(WebOpts {
        plain: true,
        config: "[[client]]\nname = \"bob\"\ntoken = \"bob-token\"\nallow = [\"prod/*\"]\n".into(),
        ..Default::default()
    });
    let big = 64 << 20;
    let stalled: Vec<std::net::TcpStream> = (0..6)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", w.port)).expect("connect");
            write!(
                s,
                "GET /a/prod/h2web/bytes?n={big} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
                 Authorization: Bearer bob-token\r\n\r\n",
                w.port
            )
            .expect("request");
            s
        })
        .collect();
    // Until the sockets on the way are full and the rest waits in bob's
    // HTTP/2 connection (a few hundred MB/s through the tunnel: well
    // within this).
    std::thread::sleep(Duration::from_secs(4));
    let started = std::time::Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{size_download}", "-H"])
        .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
        .arg(format!(
            "http://127.0.0.1:{}/a/prod/h2web/bytes?n=2097152",
            w.port
        ))
        .output()
        .expect("curl");
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        seen,
        "200 2097152",
        "dev's download beside bob's unread ones ({:?}): {}\nserver:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr),
        w.server.log_text()
    );
    drop(stalled);
}

#[test]
fn an_agent_drains_at_once_with_idle_connections_in_the_pools() {
    // An HTTP/2 connection and an HTTP/1.1 keep-alive stream sit idle on
    // the agent's session when it is told to stop: the server lets them go
    // when the session drains, so the agent exits without waiting for its
    // drain timeout (30 s).
    let mut w = Web::start();
    for service in ["h2web", "web"] {
        let out = w.get(&w.url(&format!("/a/prod/{service}/headers")), &[]);
        assert_eq!(out.status, 200, "{service}: {out:?}");
    }
    let asked = std::time::Instant::now();
    w.agent.signal(Signal::TERM);
    let exited = wait_until(Duration::from_secs(20), || !w.agent.is_running());
    assert!(
        exited && asked.elapsed() < Duration::from_secs(8),
        "the agent took {:?} to drain (exited: {exited})\nagent:\n{}",
        asked.elapsed(),
        w.agent.log_text()
    );
}

/// The gRPC server process, killed when the test ends.
struct GrpcPeer(Child);

impl Drop for GrpcPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether grpcio can run here (in CI it must).
fn grpcio_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "python3 with grpcio is required in CI (pip install grpcio)"
    );
    eprintln!("SKIPPED: pip install grpcio to run the gRPC test");
    false
}

#[test]
fn grpc_passes_through_the_proxy_with_trailers_and_streams() {
    if !grpcio_available() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/suite/grpc_peer.py");
    let grpc_port = free_port();
    let _peer = GrpcPeer(
        Command::new("python3")
            .arg(&script)
            .args(["serve", &grpc_port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_ok()
        }),
        "the gRPC server did not start"
    );
    let w = Web::start_with(WebOpts {
        plain: true,
        services: format!("grpc = \"h2c://127.0.0.1:{grpc_port}\""),
        ..Default::default()
    });
    let out = Command::new("timeout")
        .args(["120", "python3"])
        .arg(&script)
        .args([
            "call",
            &format!("127.0.0.1:{}", w.port),
            &format!("grpc.prod.{}:{}", super::common::web::BASE, w.port),
            CLIENT_TOKEN,
        ])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.server.log_text()
    );
    let got: serde_json::Value = serde_json::from_str(text.trim()).expect("JSON from the client");
    // A 1 MiB message each way, and its trailer.
    assert_eq!(got["echo_ok"], true, "{got}");
    assert_eq!(got["echo_trailer"], "1048576", "{got}");
    // A server stream, in order.
    let count: Vec<u64> = (0..200).collect();
    assert_eq!(got["count"], serde_json::json!(count));
    // The status and message come in trailers.
    assert_eq!(
        got["fail"],
        serde_json::json!(["NOT_FOUND", "no such thing: x"])
    );
    // The bearer token stays at the server; the forwarding headers arrive.
    let meta: Vec<&str> = got["meta"]
        .as_array()
        .expect("meta")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(!meta.contains(&"authorization"), "{meta:?}");
    assert!(meta.contains(&"x-forwarded-for"), "{meta:?}");
    assert_eq!(got["concurrent_ok"], 32);
    // A wrong token is refused before the service: gRPC's UNAUTHENTICATED.
    assert_eq!(got["bad_token"], "UNAUTHENTICATED");
}

/// A TLS server that knows nothing of ALPN (`openssl s_server`), killed
/// when dropped.
struct TlsServer(Child);

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_http2_service_that_does_not_agree_to_h2_is_refused_clearly() {
    let dir = std::env::temp_dir().join(format!("tether-h2-alpn-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success());
    let port = free_port();
    let _tls = TlsServer(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let w = Web::start_with(WebOpts {
        services: format!(
            "noh2 = {{ address = \"https+insecure://127.0.0.1:{port}\", http2 = true }}"
        ),
        ..Default::default()
    });
    let out = w.get(&w.url("/a/prod/noh2/"), &[]);
    assert_eq!(out.status, 502, "{out:?}");
    assert!(
        out.body.contains("did not agree to h2"),
        "the refusal should say why: {}",
        out.body
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTP/2 service that allows `max_streams` requests at once on a
/// connection (Kestrel: 100): `/hold/N` answers once the test has let phase
/// `N` go, anything else at once. Returns its address, the count of `/hold`
/// requests it has taken, and the phase let go so far.
fn kestrel_like_service(
    max_streams: u32,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::sync::watch::Sender<u32>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let holding = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(0u32);
    let count = holding.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (count, released) = (count.clone(), released.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let (count, mut released) = (count.clone(), released.clone());
                        async move {
                            if let Some(phase) = req.uri().path().strip_prefix("/hold/") {
                                let phase: u32 = phase.parse().unwrap_or(0);
                                count.fetch_add(1, Ordering::SeqCst);
                                let _ = released.wait_for(|go| *go >= phase).await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_concurrent_streams(max_streams)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
    });
    (addr, holding, release)
}

/// A client holding as many long requests as an HTTP/2 service takes on
/// one connection: its next request opens another connection instead of
/// waiting, unseen, for one of them to end; and the connections are kept
/// and filled in turn, not one opened per hundred requests.
#[test]
fn a_full_http2_connection_does_not_hold_up_the_next_request() {
    use std::sync::atomic::Ordering;
    let (addr, holding, release) = kestrel_like_service(100);
    let w = Web::start_with(WebOpts {
        services: format!("limited = \"h2c://{addr}\"\n"),
        ..Default::default()
    });
    let url = |path: &str| w.url(&format!("/a/prod/limited{path}"));
    // `n` requests to `path` at once, in one curl; its status codes.
    let parallel = |path: &str, n: usize| {
        let urls: Vec<String> = (0..n).map(|_| url(path)).collect();
        Command::new("curl")
            .args(["-sS", "-k", "-Z", "--parallel-immediate", "--parallel-max"])
            .arg(n.to_string())
            .args(["--max-time", "30", "-w", "%{http_code}\n", "-H"])
            .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
            .args(urls.iter().flat_map(|u| ["-o", "/dev/null", u.as_str()]))
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl")
    };
    let all_ok = |child: Child, n: usize| {
        let out = child.wait_with_output().expect("curl");
        let codes = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(codes.lines().filter(|c| *c == "200").count(), n, "{codes}");
    };
    let holds = |n: usize| {
        assert!(
            wait_until(Duration::from_secs(20), || holding.load(Ordering::SeqCst)
                == n),
            "the service holds {} requests, not {n}",
            holding.load(Ordering::SeqCst)
        );
    };
    let before = opened(&w);
    let first = parallel("/hold/1", 100);
    holds(100);
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "5", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
        .arg(url("/quick"))
        .output()
        .expect("curl");
    let quick = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = release.send(1);
    all_ok(first, 100);
    assert_eq!(
        quick,
        "200",
        "the 101st request beside 100 held ones: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 150 at once now: the two connections take them, no third.
    let second = parallel("/hold/2", 150);
    holds(250);
    let _ = release.send(2);
    all_ok(second, 150);
    assert_eq!(
        opened(&w) - before,
        2.0,
        "tunnel streams (HTTP/2 connections) opened for 251 requests"
    );
}

/// A service that allows fewer requests at once than the pool's own
/// limit (here 10, as a tuned gRPC server may): the connection is full at
/// the service's number, and the next request opens another connection.
/// Before, requests 11 to 100 queued unseen in hyper behind the held ones.
#[test]
fn a_service_that_allows_few_streams_fills_its_connection_at_its_own_limit() {
    use std::sync::atomic::Ordering;
    let (addr, holding, release) = kestrel_like_service(10);
    let w = Web::start_with(WebOpts {
        services: format!("few = \"h2c://{addr}\"\n"),
        ..Default::default()
    });
    let url = |path: &str| w.url(&format!("/a/prod/few{path}"));
    let curl = |path: &str| {
        let mut c = Command::new("curl");
        c.args(["-sS", "-k", "--max-time", "20", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
            .arg(url(path));
        c
    };
    // One request first, so the pool's connection has the service's SETTINGS.
    let first = curl("/quick").output().expect("curl");
    assert_eq!(String::from_utf8_lossy(&first.stdout), "200");
    let held: Vec<Child> = (0..10)
        .map(|_| {
            curl("/hold/1")
                .stdout(Stdio::piped())
                .spawn()
                .expect("curl")
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || holding.load(Ordering::SeqCst)
            == 10),
        "the service holds {} requests, not 10",
        holding.load(Ordering::SeqCst)
    );
    let quick = curl("/quick")
        .args(["--max-time", "5"])
        .output()
        .expect("curl");
    let _ = release.send(1);
    for h in held {
        let out = h.wait_with_output().expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
    assert_eq!(
        String::from_utf8_lossy(&quick.stdout),
        "200",
        "the 11th request beside 10 held ones: {}",
        String::from_utf8_lossy(&quick.stderr)
    );
}

/// New pooled connections are opens, charged to the caller's open rate:
/// requests that each need a connection of their own (here four slow ones
/// at once) are refused past the open burst, with 429 naming the limit.
#[test]
fn new_pooled_connections_count_against_the_open_rate() {
    let w = Web::start_with(WebOpts {
        config: "[limits]\nopens_per_sec = 0.1\nopen_burst = 2\n".into(),
        ..Default::default()
    });
    // Each lasts 2 s: none ends, and gives its connection back, before the
    // last starts.
    let codes = concurrent_gets(&w.url("/a/prod/web/events?n=20"), 4);
    let count = |want: &str| codes.iter().filter(|c| *c == want).count();
    assert_eq!((count("200"), count("429")), (2, 2), "{codes:?}");
    assert_eq!(
        metric(
            &w.server_metrics(),
            "tether_limit_hits_total{limit=\"opens_per_sec\"}"
        ),
        Some(2.0)
    );
}
