//! Browser access through the server, tested with curl against the real
//! processes: sample app(s) ← agent ← server (TLS, host and path routing).

use crate::common::web::*;
use crate::common::*;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

fn headers_seen(out: &CurlOut) -> HashMap<String, String> {
    let j = out.json();
    j["headers"]
        .as_object()
        .unwrap_or_else(|| panic!("no headers in {}", out.body))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
        .collect()
}

#[test]
fn path_and_host_routing_forward_headers_and_rewrite_redirects() {
    let w = Web::start();

    // Path routing: the prefix is stripped and announced.
    let out = w.get(
        &w.url("/a/prod/web/headers?x=1"),
        &[
            "--http1.1",
            "-H",
            "Connection: keep-alive, x-hop",
            "-H",
            "X-Hop: secret",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "Cookie: app=1; tether_session=abc; other=2",
            "-H",
            "X-Forwarded-For: 203.0.113.9",
        ],
    );
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["uri"], "/headers?x=1");
    let h = headers_seen(&out);
    assert_eq!(h["x-forwarded-prefix"], "/a/prod/web");
    assert_eq!(h["x-forwarded-proto"], "https");
    // Path routing names the server by its base domain (with the port the
    // browser used), not by whatever Host the client sent.
    assert_eq!(h["x-forwarded-host"], format!("{BASE}:{}", w.port));
    assert_eq!(h["host"], format!("{BASE}:{}", w.port));
    // No proxy is trusted: what the client wrote in X-Forwarded-For is
    // dropped, and the service gets the address the server saw.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        h["cookie"], "app=1; other=2",
        "tether's cookie must not reach the service"
    );
    for hop in ["x-hop", "keep-alive", "authorization", "te"] {
        assert!(!h.contains_key(hop), "{hop} was forwarded: {h:?}");
    }

    // A made-up Host and forwarding headers never reach the service.
    let out = w.get(
        &w.url("/a/prod/web/headers"),
        &[
            "-H",
            "Host: evil.example",
            "-H",
            "X-Forwarded-Host: evil.example",
            "-H",
            "X-Forwarded-Proto: http",
            "-H",
            "X-Forwarded-Prefix: /evil",
            "-H",
            "Forwarded: for=198.51.100.66;host=evil.example;proto=http",
            "-H",
            "X-Real-IP: 198.51.100.66",
            "-H",
            "X-Forwarded-Port: 1",
            "-H",
            "X-Forwarded-Server: evil.example",
            "-H",
            "X-Original-URL: /admin",
            "-H",
            "X-Rewrite-URL: /admin",
            "-H",
            "X-Client-IP: 198.51.100.66",
            "-H",
            "True-Client-IP: 198.51.100.66",
            "-H",
            "X-Original-Host: evil.example",
            "-H",
            "X-Host: evil.example",
            "-H",
            "X-Forwarded-Scheme: http",
            "-H",
            "X-Scheme: http",
            "-H",
            "CF-Connecting-IP: 198.51.100.66",
            "-H",
            "X-Forwarded-User: admin",
            // CGI spelling: servers that read headers as HTTP_X_FORWARDED_FOR
            // would take these for the real ones.
            "-H",
            "X_Forwarded_For: 198.51.100.66",
            "-H",
            "X_Real_IP: 198.51.100.66",
            "-H",
            "Client-IP: 198.51.100.66",
        ],
    );
    assert_eq!(out.status, 200, "{out:?}");
    let h = headers_seen(&out);
    assert_eq!(h["host"], BASE, "{h:?}");
    assert_eq!(h["x-forwarded-host"], BASE);
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-prefix"], "/a/prod/web");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    for gone in [
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-server",
        "x-original-url",
        "x-rewrite-url",
        "x-client-ip",
        "true-client-ip",
        "x-original-host",
        "x-host",
        "x-forwarded-scheme",
        "x-scheme",
        "cf-connecting-ip",
        "x-forwarded-user",
        "x_forwarded_for",
        "x_real_ip",
        "client-ip",
    ] {
        assert!(!h.contains_key(gone), "{gone} was forwarded: {h:?}");
    }

    // `/a/prod/web` (no slash) redirects to the slash form, keeping the query.
    let out = w.get(&w.url("/a/prod/web?q=1"), &[]);
    assert_eq!(out.status, 308);
    assert_eq!(out.header("location").as_deref(), Some("/a/prod/web/?q=1"));

    // Host routing: SERVICE.AGENT.BASE, nothing stripped, no prefix header.
    let out = w.get(&w.host_url(&format!("web.prod.{BASE}"), "/headers"), &[]);
    assert_eq!(out.status, 200, "{out:?}");
    let h = headers_seen(&out);
    assert_eq!(h["host"], format!("web.prod.{BASE}:{}", w.port));
    assert!(!h.contains_key("x-forwarded-prefix"));

    // rewrite_host: the service sees its own name.
    let out = w.get(&w.host_url(&format!("hosty.prod.{BASE}"), "/headers"), &[]);
    let h = headers_seen(&out);
    assert!(h["host"].starts_with("127.0.0.1:"), "{h:?}");
    assert_eq!(
        h["x-forwarded-host"],
        format!("hosty.prod.{BASE}:{}", w.port)
    );

    // Redirects and cookies under the path prefix.
    let out = w.get(&w.url("/a/prod/web/redirect"), &[]);
    assert_eq!(out.status, 302);
    assert_eq!(
        out.header("location").as_deref(),
        Some("/a/prod/web/headers")
    );
    assert_eq!(
        out.header("set-cookie").as_deref(),
        Some("sample=1; Path=/a/prod/web/; HttpOnly")
    );
    // An absolute redirect naming the service's own Host comes back to us.
    let out = w.get(&w.url("/a/prod/hosty/absolute-redirect"), &[]);
    assert_eq!(
        out.header("location"),
        Some(format!("https://127.0.0.1:{}/a/prod/hosty/headers", w.port))
    );
    // Host routing keeps the service's paths as they are.
    let out = w.get(&w.host_url(&format!("web.prod.{BASE}"), "/redirect"), &[]);
    assert_eq!(out.header("location").as_deref(), Some("/headers"));

    // HTTPS services: the agent speaks TLS to them.
    let out = w.get(&w.url("/a/prod/secure/headers"), &[]);
    assert_eq!(out.status, 200, "{out:?}");
    let out = w.get(&w.url("/a/prod/strict/headers"), &[]);
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.body.contains("TLS to 127.0.0.1"), "{}", out.body);

    // HTTP/2 from the browser side, HTTP/1.1 to the service.
    let out = w.get(&w.url("/a/prod/web/headers"), &["--http2"]);
    assert!(out.headers.starts_with("HTTP/2 200"), "{}", out.headers);
    assert_eq!(out.json()["version"], "HTTP/1.1");
}

#[test]
fn keep_alive_reuses_pooled_tunnel_streams() {
    let w = Web::start();
    let opened = |w: &Web| metric(&w.server_metrics(), "tether_streams_total").unwrap_or(0.0);
    // Warm the pool with one request, then send twenty more over fresh
    // browser connections: they reuse the idle tunnel stream.
    assert_eq!(w.get(&w.url("/a/prod/web/headers"), &[]).status, 200);
    let before = opened(&w);
    for _ in 0..20 {
        assert_eq!(w.get(&w.url("/a/prod/web/headers"), &[]).status, 200);
    }
    let after = opened(&w);
    assert!(
        after - before <= 1.0,
        "20 sequential requests opened {} tunnel streams",
        after - before
    );
}

/// `count` requests to `path` at once (curl, new connections where it can),
/// as the dev client: their status codes.
fn burst(w: &Web, path: &str, count: usize) -> Vec<u16> {
    let auth = format!("Authorization: Bearer {CLIENT_TOKEN}");
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "30", "--parallel"])
        .args(["--parallel-immediate", "--parallel-max", &count.to_string()])
        .args(["-H", &auth, "-w", "%{http_code}\\n", "-o"])
        .arg(w.dir.join("burst_#1"))
        .arg(format!("{}&i=[1-{count}]", w.url(path)))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

#[test]
fn a_burst_of_concurrent_requests_leaves_its_connections_pooled() {
    let w = Web::start();
    let opened = |w: &Web| metric(&w.server_metrics(), "tether_streams_total").unwrap_or(0.0);
    // A hundred requests at once, each answered over 400 ms: the first
    // burst opens a tunnel stream per request in flight, and all of them go
    // back to the pool; the second finds them there, opening more only as
    // far as it has more in flight at once, so the two together open at
    // most a hundred. (With a pool that kept 32, the second burst opened 68
    // again: the service's connections churned whenever more than 32
    // requests were in flight.)
    let path = "/a/prod/web/events?n=5";
    let before = opened(&w);
    let codes = burst(&w, path, 100);
    assert_eq!(codes.len(), 100, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    let first = opened(&w) - before;
    assert!(first >= 50.0, "the first burst overlapped: {first} streams");
    std::thread::sleep(Duration::from_millis(300));
    let before = opened(&w);
    let codes = burst(&w, path, 100);
    assert_eq!(codes.len(), 100, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    let second = opened(&w) - before;
    assert!(
        first + second <= 102.0,
        "the second burst opened {second} tunnel streams (the first {first})"
    );
}

/// A service on a free port that serves each connection with `serve` in a
/// thread of its own. Returns its port.
fn thread_per_connection_service(
    serve: impl Fn(std::net::TcpStream) + Clone + Send + 'static,
) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(conn));
        }
    });
    port
}

/// Reads one request head (up to its blank line) from `conn`, a byte at a
/// time so that nothing after it is taken; `None` once the connection ends.
fn read_head(conn: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A service that answers the first request on each connection, keeping it
/// alive, and closes the connection unanswered when a second request comes
/// on it (with a reset when `reset`, else a FIN): a keep-alive timeout
/// firing just as a request arrives, every time. Returns its port and the
/// methods of the requests it saw.
fn service_closing_kept_connections(
    reset: bool,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::Write;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let port = thread_per_connection_service(move |mut conn| {
        for second in [false, true] {
            // One request head (none of the requests has a body).
            let Some(head) = read_head(&mut conn) else {
                return;
            };
            let method = head.split(' ').next().unwrap_or("").to_owned();
            log.lock().unwrap().push(method);
            if second {
                if reset {
                    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                }
                return; // closed, the request unanswered
            }
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    (port, seen)
}

#[test]
fn an_idempotent_request_on_a_connection_the_service_closed_is_sent_again() {
    let (closing, closing_seen) = service_closing_kept_connections(false);
    let (resetting, resetting_seen) = service_closing_kept_connections(true);
    let w = Web::start_with(WebOpts {
        services: format!(
            "closing = \"http://127.0.0.1:{closing}\"\nresetting = \"http://127.0.0.1:{resetting}\"\n"
        ),
        ..Default::default()
    });
    for (service, seen) in [("closing", closing_seen), ("resetting", resetting_seen)] {
        let url = w.url(&format!("/a/prod/{service}/x"));
        let out = w.get(&url, &[]);
        assert_eq!(
            (out.status, out.body.as_str()),
            (200, "ok"),
            "{service}: {out:?}"
        );
        // The connection is pooled; idle long enough, the next GET goes on
        // it, the service closes it unanswered, and the GET goes again on a
        // new one.
        std::thread::sleep(Duration::from_millis(400));
        let out = w.get(&url, &[]);
        assert_eq!(
            (out.status, out.body.as_str()),
            (200, "ok"),
            "{service}: {out:?}"
        );
        assert_eq!(*seen.lock().unwrap(), ["GET", "GET", "GET"], "{service}");
        // A POST is not sent twice: the browser gets the gateway's error.
        // (Without a body: a body still on its way when the proxy gives up
        // makes the HTTP/2 stream end in a reset instead of the 502.)
        std::thread::sleep(Duration::from_millis(400));
        let out = w.get(&url, &["-X", "POST"]);
        assert_eq!(out.status, 502, "{service}: {out:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["GET", "GET", "GET", "POST"],
            "{service}"
        );
    }
}

/// A service that answers each request with the raw response its path
/// names, then closes the connection.
fn service_with_raw_framing() -> u16 {
    use std::io::Write;
    thread_per_connection_service(|mut conn| {
        let Some(head) = read_head(&mut conn) else {
            return;
        };
        let path = head.split(' ').nth(1).unwrap_or("");
        let answer = match path {
            // A length beside chunks: the chunks frame the 100 bytes.
            "/length-beside-chunks" => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n{}\r\n0\r\n\r\n",
                "a".repeat(100)
            ),
            // Trailers only when asked for (`TE: trailers`), as hyper's
            // HTTP/1.1 server sends them.
            "/trailer" if head.to_ascii_lowercase().contains("\r\nte: trailers") => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n2\r\nok\r\n0\r\nx-sum: abc\r\n\r\n".into(),
            "/trailer" => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into(),
            // Still gzip-coded once the chunks are undone.
            _ => "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nxx\r\n0\r\n\r\n".into(),
        };
        let _ = conn.write_all(answer.as_bytes());
    })
}

#[test]
fn a_response_keeps_the_framing_and_trailers_its_chunks_gave_it() {
    let raw = service_with_raw_framing();
    let w = Web::start_with(WebOpts {
        services: format!("raw = \"http://127.0.0.1:{raw}\"\n"),
        ..Default::default()
    });
    for http in ["--http1.1", "--http2"] {
        let out = w.get(&w.url("/a/prod/raw/length-beside-chunks"), &[http]);
        assert_eq!(out.status, 200, "{http}: {out:?}");
        assert_eq!(out.body, "a".repeat(100), "{http}: cut at the stale length");
        assert!(
            out.header("content-length").is_none_or(|l| l == "100"),
            "{http}: {out:?}"
        );

        let out = w.get(&w.url("/a/prod/raw/trailer"), &[http, "-H", "TE: trailers"]);
        assert_eq!(
            (out.status, out.body.as_str()),
            (200, "ok"),
            "{http}: {out:?}"
        );
        assert_eq!(
            out.header("x-sum").as_deref(),
            Some("abc"),
            "{http}: no trailer: {out:?}"
        );

        let out = w.get(&w.url("/a/prod/raw/gzip"), &[http]);
        assert_eq!(out.status, 502, "{http}: {out:?}");
        assert!(out.body.contains("transfer coding"), "{http}: {out:?}");
    }
}

#[test]
fn every_failure_has_a_clear_status_and_reason() {
    let w = Web::start();
    // Not logged in: a browser is sent to the login page, an API client gets 401.
    let out = w.curl(&["-H", "Accept: text/html", &w.url("/a/prod/web/")]);
    assert_eq!(out.status, 302);
    assert_eq!(
        out.header("location").as_deref(),
        Some("/login?next=%2Fa%2Fprod%2Fweb%2F")
    );
    let out = w.curl(&[
        "-H",
        "Accept: text/html",
        &w.host_url(&format!("web.prod.{BASE}"), "/x"),
    ]);
    assert_eq!(out.status, 302);
    assert_eq!(
        out.header("location"),
        Some(format!(
            "https://{BASE}:{}/login?next=https%3A%2F%2Fweb.prod.{BASE}%3A{}%2Fx",
            w.port, w.port
        ))
    );
    let out = w.curl(&[&w.url("/a/prod/web/")]);
    assert_eq!(out.status, 401);
    assert_eq!(out.json()["error"], "login_required");
    assert_eq!(
        out.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{out:?}"
    );
    let out = w.curl(&["-H", "Authorization: Bearer wrong", &w.url("/a/prod/web/")]);
    assert_eq!(out.status, 401);
    assert_eq!(out.json()["error"], "bad_token");

    let cases: &[(&str, &str, u16, &str, &str)] = &[
        (
            LIMITED_TOKEN,
            "/a/prod/web/",
            403,
            "forbidden",
            "may not open prod/web",
        ),
        (
            CLIENT_TOKEN,
            "/a/ghost/web/",
            503,
            "agent_offline",
            "agent ghost is not connected",
        ),
        (
            CLIENT_TOKEN,
            "/a/prod/nope/",
            404,
            "unknown_service",
            "no service named nope",
        ),
        (CLIENT_TOKEN, "/a/prod/echo/", 400, "not_http", "not HTTP"),
        (
            CLIENT_TOKEN,
            "/a/prod/127.0.0.1:0080/",
            400,
            "bad_target",
            "canonical form",
        ),
        (CLIENT_TOKEN, "/a/prod/refused/", 502, "refused", "refused"),
        (
            CLIENT_TOKEN,
            "/a/prod/blackhole/",
            504,
            "timeout",
            "did not answer",
        ),
    ];
    for (token, path, status, code, reason) in cases {
        let auth = format!("Authorization: Bearer {token}");
        let out = w.curl(&["-H", &auth, &w.url(path)]);
        assert_eq!(out.status, *status, "{path}: {out:?}");
        let j = out.json();
        assert_eq!(j["error"], *code, "{path}: {j}");
        assert!(
            j["message"].as_str().unwrap_or("").contains(reason),
            "{path}: {j}"
        );
        // Browsers get the same as an HTML page.
        let html = w.curl(&["-H", &auth, "-H", "Accept: text/html", &w.url(path)]);
        assert_eq!(html.status, *status);
        assert!(html.body.contains("<h1>"), "{}", html.body);
        assert!(html
            .header("content-type")
            .unwrap_or_default()
            .starts_with("text/html"));
    }
    let log = w.server.log_text();
    assert!(
        log.contains("http request refused"),
        "no log line for refusals"
    );
    // The session survived all of it.
    assert_eq!(w.get(&w.url("/a/prod/web/headers"), &[]).status, 200);
}

#[test]
fn login_sets_a_safe_cookie_that_opens_host_routed_services() {
    let w = Web::start();
    let base = w.host_url(BASE, "");
    // The form and its CSRF cookie.
    let jar = w.dir.join("jar");
    let jar_s = jar.display().to_string();
    let page = w.curl(&[
        "-c",
        &jar_s,
        &format!("{base}/login?next=%2Fa%2Fprod%2Fweb%2F"),
    ]);
    assert_eq!(page.status, 200);
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("csrf field")
        .to_owned();
    assert!(page.header("content-security-policy").is_some());
    // The CSRF cookie is host-only and Secure: `__Host-` keeps neighbours
    // from planting one.
    let csrf_cookie = page
        .header_all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("__Host-tether_csrf="))
        .expect("__Host- CSRF cookie");
    for attr in ["Path=/;", "Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(csrf_cookie.contains(attr), "{attr} missing: {csrf_cookie}");
    }
    assert!(!csrf_cookie.contains("Domain"), "{csrf_cookie}");

    // Without the CSRF value, or from another site: refused.
    let form = format!("token={CLIENT_TOKEN}&next=%2F");
    let out = w.curl(&["-b", &jar_s, "--data", &form, &format!("{base}/login")]);
    assert_eq!(out.status, 403);
    let with_csrf = format!("{form}&csrf={csrf}");
    let out = w.curl(&[
        "-b",
        &jar_s,
        "-H",
        "Origin: https://evil.example",
        "--data",
        &with_csrf,
        &format!("{base}/login"),
    ]);
    assert_eq!(out.status, 403, "{out:?}");
    // Same host and port but plain http, or another port: another origin.
    for origin in [
        format!("http://{BASE}:{}", w.port),
        format!("https://{BASE}:{}", w.port + 1),
        format!("https://{BASE}"),
    ] {
        let out = w.curl(&[
            "-b",
            &jar_s,
            "-H",
            &format!("Origin: {origin}"),
            "--data",
            &with_csrf,
            &format!("{base}/login"),
        ]);
        assert_eq!(out.status, 403, "{origin}: {out:?}");
    }
    // A value the server did not sign fails, even when cookie and form
    // field agree (under either cookie name).
    let out = w.curl(&[
        "-H",
        "Cookie: __Host-tether_csrf=abc; tether_csrf=abc",
        "--data",
        &format!("{form}&csrf=abc"),
        &format!("{base}/login"),
    ]);
    assert_eq!(out.status, 403, "{out:?}");
    // A wrong token: 401 and the form again.
    let bad = format!("token=nope&csrf={csrf}&next=%2F");
    let out = w.curl(&["-b", &jar_s, "--data", &bad, &format!("{base}/login")]);
    assert_eq!(out.status, 401);
    assert!(out.body.contains("not valid"));

    // The real thing; `next` pointing at another site is ignored.
    let good = format!("token={CLIENT_TOKEN}&csrf={csrf}&next=https%3A%2F%2Fevil.example%2F");
    let origin = format!("Origin: https://{BASE}:{}", w.port);
    let out = w.curl(&[
        "-b",
        &jar_s,
        "-c",
        &jar_s,
        "-H",
        &origin,
        "--data",
        &good,
        &format!("{base}/login"),
    ]);
    assert_eq!(out.status, 303, "{out:?}");
    assert_eq!(out.header("location").as_deref(), Some("/"));
    let cookie = out
        .header_all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("tether_session="))
        .expect("session cookie");
    for attr in [
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        &format!("Domain={BASE}"),
        "Max-Age=",
    ] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    assert!(
        !w.server.log_text().contains(CLIENT_TOKEN),
        "token in a log line"
    );

    // The cookie opens the console, its API and host-routed services.
    let console = w.curl(&["-b", &jar_s, &format!("{base}/")]);
    assert_eq!(console.status, 200);
    assert!(console.body.contains("console.js"));
    let api = w.curl(&["-b", &jar_s, &format!("{base}/api/agents")]);
    assert_eq!(
        api.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    let j = api.json();
    assert_eq!(j["identity"], "dev");
    let agents = j["agents"].as_array().unwrap();
    let names: Vec<_> = agents.iter().map(|a| a["name"].as_str().unwrap()).collect();
    // Online agents first.
    assert_eq!(names, ["prod", "ghost"]);
    assert_eq!(agents[0]["online"], true);
    assert_eq!(agents[1]["online"], false);
    assert!(
        agents[0].get("address").is_none(),
        "an agent's address is shown to clients: {j}"
    );
    let web = agents[0]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    assert_eq!(web["kind"], "http");
    assert_eq!(web["url"], format!("https://web.prod.{BASE}:{}/", w.port));
    let echo = agents[0]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    assert!(echo["url"].is_null(), "TCP services get no link");

    let out = w.curl(&[
        "-b",
        &jar_s,
        &w.host_url(&format!("web.prod.{BASE}"), "/headers"),
    ]);
    assert_eq!(out.status, 200, "{out:?}");
    assert!(
        !headers_seen(&out).contains_key("cookie"),
        "session cookie leaked"
    );
    // A bearer header in any case and spacing is the credential, and never
    // reaches the service, even beside a login cookie.
    for auth in [
        format!("Authorization: Bearer\t{CLIENT_TOKEN}"),
        format!("Authorization: bEaReR \t  {CLIENT_TOKEN}"),
    ] {
        let out = w.curl(&[
            "-b",
            &jar_s,
            "-H",
            &auth,
            &w.host_url(&format!("web.prod.{BASE}"), "/headers"),
        ]);
        assert_eq!(out.status, 200, "{auth:?}: {out:?}");
        let h = headers_seen(&out);
        assert!(!h.contains_key("authorization"), "{auth:?} leaked: {h:?}");
        let out = w.curl(&["-H", &auth, &w.url("/a/prod/web/headers")]);
        assert_eq!(out.status, 200, "{auth:?} alone: {out:?}");
        assert!(!headers_seen(&out).contains_key("authorization"));
    }
    // A bearer that is not ours beside the login is the service's own (a
    // single-page app's token for its API): it passes, the login decides.
    let web_headers = w.host_url(&format!("web.prod.{BASE}"), "/headers");
    let app_bearer = "Authorization: Bearer app-token";
    let out = w.curl(&["-b", &jar_s, "-H", app_bearer, &web_headers]);
    assert_eq!(out.status, 200, "{out:?}");
    let h = headers_seen(&out);
    assert_eq!(
        h.get("authorization").map(String::as_str),
        Some("Bearer app-token")
    );
    // Not with a tether token in a second header: it would reach the
    // service beside the app's.
    let ours = format!("Authorization: Bearer {CLIENT_TOKEN}");
    let out = w.curl(&["-b", &jar_s, "-H", app_bearer, "-H", &ours, &web_headers]);
    assert_eq!(out.status, 401, "{out:?}");
    assert_eq!(out.json()["error"], "bad_token", "{out:?}");

    // The limited client sees only what it may open.
    let auth = format!("Authorization: Bearer {LIMITED_TOKEN}");
    let j = w.curl(&["-H", &auth, &w.url("/api/agents")]).json();
    let services = j["agents"][0]["services"].as_array().unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0]["name"], "echo");
    // A token that was sent and refused is said to be one, not "log in".
    let out = w.curl(&[
        "-H",
        "Authorization: Bearer not-a-token",
        &w.url("/api/agents"),
    ]);
    assert_eq!(out.status, 401, "{out:?}");
    assert_eq!(out.json()["error"], "bad_token", "{out:?}");
    assert!(out.headers.contains("error=\"invalid_token\""), "{out:?}");

    // Logout needs the session's CSRF value, then the cookie is dead.
    let session_csrf = console
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    let out = w.curl(&["-b", &jar_s, "-X", "POST", &format!("{base}/logout")]);
    assert_eq!(out.status, 403);
    // A second session cookie beside the real one (a sibling host may
    // plant one) does not make the logout end nothing.
    let jar_text = std::fs::read_to_string(&jar_s).unwrap();
    let session_cookie = jar_text
        .lines()
        .filter_map(|l| l.split('\t').nth(5))
        .find(|name| name.contains("session"))
        .expect("the session cookie in the jar")
        .to_owned();
    let out = w.curl(&[
        "-b",
        &jar_s,
        "-H",
        &format!("Cookie: {session_cookie}=planted"),
        "--data",
        &format!("csrf={session_csrf}"),
        &format!("{base}/logout"),
    ]);
    assert_eq!(out.status, 303);
    let out = w.curl(&["-b", &jar_s, &format!("{base}/api/agents")]);
    assert_eq!(out.status, 401, "the login outlived its logout");
}

/// Fetches the login form into `jar`; returns its CSRF value.
fn login_form_csrf(w: &Web, base: &str, jar: &str) -> String {
    let page = w.curl(&["-c", jar, &format!("{base}/login")]);
    assert_eq!(page.status, 200, "{page:?}");
    page.body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("csrf field")
        .to_owned()
}

/// Posts the login form; returns what curl saw.
fn post_login(w: &Web, base: &str, jar: &str, body: &str, extra: &[&str]) -> CurlOut {
    let url = format!("{base}/login");
    let mut args = vec!["-b", jar, "-c", jar, "--data", body];
    args.extend_from_slice(extra);
    args.push(&url);
    w.curl(&args)
}

/// Follows `url` with curl and the cookies in `jar` (`-N`, at most 30 s):
/// the process and its output lines.
fn follow_with_login(
    w: &Web,
    jar: &str,
    url: &str,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "-N",
            "--max-time",
            "30",
            "-b",
            jar,
            "--resolve",
        ])
        .arg(format!("web.prod.{BASE}:{}:127.0.0.1", w.port))
        .args(["--resolve", &format!("{BASE}:{}:127.0.0.1", w.port), url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run curl");
    let lines = BufReader::new(child.stdout.take().expect("curl's stdout")).lines();
    (child, lines)
}

#[test]
fn signing_out_ends_what_the_login_opened() {
    let w = Web::start();
    let base = w.host_url(BASE, "");
    let jar = w.dir.join("jar").display().to_string();
    let csrf = login_form_csrf(&w, &base, &jar);
    let out = post_login(
        &w,
        &base,
        &jar,
        &format!("csrf={csrf}&token={CLIENT_TOKEN}"),
        &[],
    );
    assert_eq!(out.status, 303, "{out:?}");
    let console = w.curl(&["-b", &jar, &format!("{base}/")]);
    let session_csrf = console
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the logout form's csrf")
        .to_owned();
    // A long response from a service (100 events, 10 s) and the console's
    // own event stream, both opened by the login.
    let events = w.host_url(&format!("web.prod.{BASE}"), "/events?n=100");
    let (mut service, mut service_lines) = follow_with_login(&w, &jar, &events);
    assert_eq!(service_lines.next().unwrap().unwrap(), "id: 0");
    let (mut console, mut console_lines) =
        follow_with_login(&w, &jar, &format!("{base}/api/events"));
    assert_eq!(console_lines.next().unwrap().unwrap(), "event: agents");

    let out = w.curl(&[
        "-b",
        &jar,
        "--data",
        &format!("csrf={session_csrf}"),
        &format!("{base}/logout"),
    ]);
    assert_eq!(out.status, 303, "{out:?}");
    let signed_out = Instant::now();
    let ticks = service_lines
        .map_while(Result::ok)
        .filter(|l| l.starts_with("data:"))
        .count();
    assert!(
        signed_out.elapsed() < Duration::from_secs(3),
        "the service's answer went on for {:?} after the logout ({ticks} more events)",
        signed_out.elapsed()
    );
    assert!(ticks < 50, "{ticks} events after the logout");
    console_lines.map_while(Result::ok).for_each(drop);
    assert!(
        signed_out.elapsed() < Duration::from_secs(3),
        "the console's event stream went on for {:?} after the logout",
        signed_out.elapsed()
    );
    let _ = service.wait();
    let _ = console.wait();
    assert!(
        w.server.log_text().contains("signed out"),
        "no log line says why"
    );
}

#[test]
fn only_real_login_attempts_count_against_an_address() {
    let w = Web::start();
    let base = w.host_url(BASE, "");
    let jar = w.dir.join("jar").display().to_string();
    // Posts without a CSRF value, and posts without a token: none of them
    // is a login attempt, so none locks the address out.
    for _ in 0..25 {
        let out = w.curl(&["--data", "token=&next=%2F", &format!("{base}/login")]);
        assert_eq!(out.status, 403, "{out:?}");
    }
    let csrf = login_form_csrf(&w, &base, &jar);
    for _ in 0..25 {
        let out = post_login(&w, &base, &jar, &format!("csrf={csrf}&token="), &[]);
        assert_eq!(out.status, 401, "{out:?}");
    }
    let good = format!("csrf={csrf}&token={CLIENT_TOKEN}&next=%2F");
    let out = post_login(&w, &base, &jar, &good, &[]);
    assert_eq!(out.status, 303, "a correct login was locked out: {out:?}");
    // A pasted token's spaces and line end are no part of it (as with a
    // Bearer header or the CLI).
    let padded = format!("csrf={csrf}&token=%20{CLIENT_TOKEN}%20%0A&next=%2F");
    let out = post_login(&w, &base, &jar, &padded, &[]);
    assert_eq!(out.status, 303, "a padded token was refused: {out:?}");

    // Wrong tokens are attempts: after the burst, 429, and no proxy is
    // trusted, so a made-up X-Forwarded-For does not help.
    let bad = format!("csrf={csrf}&token=wrong&next=%2F");
    let limited = (0..60).find(|i| {
        let xff = format!("X-Forwarded-For: 198.51.100.{i}");
        let out = post_login(&w, &base, &jar, &bad, &["-H", &xff]);
        assert!(out.status == 401 || out.status == 429, "{out:?}");
        out.status == 429
    });
    assert!(
        limited.is_some_and(|i| i >= 15),
        "limited after {limited:?} attempts"
    );
    assert!(
        metric(
            &w.server_metrics(),
            "tether_limit_hits_total{limit=\"logins_per_source\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

#[test]
fn trusted_proxies_name_the_client_and_public_name_the_server() {
    let w = Web::start_with(WebOpts {
        config:
            "[http]\ntrusted_proxies = [\"127.0.0.0/8\"]\npublic_name = \"gw.tether.test:8443\"\n"
                .into(),
        ..Default::default()
    });
    // The client is the right-most address the proxy vouches for; what the
    // client wrote before it is dropped.
    let out = w.get(
        &w.url("/a/prod/web/headers"),
        &[
            "-H",
            "X-Forwarded-For: 198.51.100.66, 203.0.113.9",
            "-H",
            "Host: evil.example",
            "-H",
            "X-Forwarded-Host: evil.example",
        ],
    );
    assert_eq!(out.status, 200, "{out:?}");
    let h = headers_seen(&out);
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "gw.tether.test:8443");
    assert_eq!(h["host"], "gw.tether.test:8443");
    // Host routing keeps the routed name, with the public name's port.
    let out = w.get(&w.host_url(&format!("web.prod.{BASE}"), "/headers"), &[]);
    let h = headers_seen(&out);
    assert_eq!(h["host"], format!("web.prod.{BASE}:8443"));

    // Login attempts are counted per client address behind the proxy: one
    // client using up its budget leaves the next one alone.
    let base = w.host_url(BASE, "");
    let jar = w.dir.join("jar").display().to_string();
    let csrf = login_form_csrf(&w, &base, &jar);
    let bad = format!("csrf={csrf}&token=wrong&next=%2F");
    let noisy = "X-Forwarded-For: 198.51.100.7";
    let good = format!("csrf={csrf}&token={CLIENT_TOKEN}&next=%2F");
    // The budget refills at 2/s: on a loaded machine a token may come back
    // between the 429 and the next request, so exhaust it again and retry.
    let refused_while_limited = (0..5).any(|_| {
        let limited =
            (0..60).any(|_| post_login(&w, &base, &jar, &bad, &["-H", noisy]).status == 429);
        assert!(limited, "never limited");
        post_login(&w, &base, &jar, &good, &["-H", noisy]).status == 429
    });
    assert!(
        refused_while_limited,
        "a limited address could still log in"
    );
    let out = post_login(
        &w,
        &base,
        &jar,
        &good,
        &["-H", "X-Forwarded-For: 198.51.100.8"],
    );
    assert_eq!(out.status, 303, "{out:?}");
    assert!(w.server.log_text().contains("source=198.51.100.7"));
}

#[test]
fn host_only_secure_cookies_carry_the_host_prefix() {
    let w = Web::start_with(WebOpts {
        no_base_domain: true,
        ..Default::default()
    });
    let base = w.url("");
    let jar = w.dir.join("jar").display().to_string();
    let csrf = login_form_csrf(&w, &base, &jar);
    let out = post_login(
        &w,
        &base,
        &jar,
        &format!("csrf={csrf}&token={CLIENT_TOKEN}&next=%2F"),
        &[],
    );
    assert_eq!(out.status, 303, "{out:?}");
    let cookie = out
        .header_all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("__Host-tether_session="))
        .unwrap_or_else(|| panic!("no __Host- session cookie: {out:?}"));
    for attr in ["Path=/;", "Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    assert!(!cookie.contains("Domain"), "{cookie}");
    let id = cookie
        .split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .unwrap();
    // The cookie the server set opens the console; the unprefixed name,
    // which any neighbour could plant, is not accepted.
    assert_eq!(w.curl(&["-b", &jar, &w.url("/api/agents")]).status, 200);
    let out = w.curl(&[
        "-H",
        &format!("Cookie: tether_session={id}"),
        &w.url("/api/agents"),
    ]);
    assert_eq!(out.status, 401, "{out:?}");
    // Neither prefixed cookie reaches a service.
    let out = w.curl(&["-b", &jar, &w.url("/a/prod/web/headers")]);
    assert_eq!(out.status, 200, "{out:?}");
    assert!(!headers_seen(&out).contains_key("cookie"), "{}", out.body);
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn large_bodies_stream_both_ways_with_flat_server_memory() {
    let w = Web::start();
    let warm = w.get(&w.url("/a/prod/web/bytes?n=1048576"), &[]);
    assert_eq!(warm.raw.len(), 1 << 20);
    let before = vm_hwm_kib(w.server.pid());
    // 1 GiB down, checked by size (the content is checked on a smaller body).
    let n: u64 = 1 << 30;
    let started = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "-H",
        ])
        .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
        .arg(w.url(&format!("/a/prod/web/bytes?n={n}")))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), n.to_string());
    eprintln!("1 GiB download in {:?}", started.elapsed());
    let small = w.get(&w.url("/a/prod/web/bytes?n=300000"), &[]);
    let want: Vec<u8> = (0..300000u64).map(pattern_byte).collect();
    assert_eq!(small.raw, want);

    // 256 MiB up, streamed from a file, checked by size and hash.
    let file = w.dir.join("upload.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        let mut p = Pattern::new(7);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..256 {
            p.fill(&mut buf);
            f.write_all(&buf).unwrap();
        }
    }
    let mut fnv = 0xcbf29ce484222325u64;
    for b in std::fs::read(&file).unwrap() {
        fnv ^= b as u64;
        fnv = fnv.wrapping_mul(0x100000001b3);
    }
    let upload = format!("@{}", file.display());
    let out = w.get(
        &w.url("/a/prod/web/upload"),
        &[
            "--data-binary",
            &upload,
            "-H",
            "Content-Type: application/octet-stream",
        ],
    );
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["bytes"], 256u64 << 20);
    assert_eq!(out.json()["fnv"], format!("{fnv:016x}"));
    let after = vm_hwm_kib(w.server.pid());
    eprintln!("server peak RSS: {before} KiB before, {after} KiB after 1 GiB down + 256 MiB up");
    assert!(
        after < before + 48 * 1024,
        "server memory grew by {} KiB while streaming",
        after - before
    );
}

#[test]
fn server_sent_events_arrive_as_they_are_sent() {
    let w = Web::start();
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("curl")
        .args(["-sS", "-k", "-N", "-H"])
        .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
        .arg(w.url("/a/prod/web/events?n=10"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first, "id: 0");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let total = started.elapsed();
    let data: Vec<&String> = rest.iter().filter(|l| l.starts_with("data:")).collect();
    assert_eq!(data.len(), 10, "{rest:?}");
    assert_eq!(data[9], "data: tick 9");
    // Ten events 100 ms apart: the first must not wait for the last.
    assert!(
        first_at + Duration::from_millis(500) < total,
        "first event after {first_at:?}, all after {total:?}: buffered"
    );
    let _ = child.wait();

    // The console's own event stream sends a snapshot at once.
    let (mut child, mut lines) = w.console_events(5);
    assert_eq!(lines.next().unwrap().unwrap(), "event: agents");
    let data = lines.next().unwrap().unwrap();
    assert!(data.starts_with("data: {\"identity\":\"dev\""), "{data}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_client_holds_at_most_sixteen_live_consoles_and_a_closed_one_frees_its_slot() {
    let w = Web::start();
    let open = || {
        let (child, mut lines) = w.console_events(60);
        let first = lines.next().and_then(Result::ok);
        (child, first, lines)
    };
    let refused = || {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-k",
                "--max-time",
                "5",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-H",
            ])
            .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
            .args(["-H", "Accept: application/json"])
            .arg(w.url("/api/events"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut held = vec![];
    for i in 0..16 {
        let (child, first, lines) = open();
        assert_eq!(first.as_deref(), Some("event: agents"), "console {i}");
        held.push((child, lines));
    }
    // The seventeenth is refused with the limit's name and what to do.
    let out = refused();
    assert!(out.ends_with("\n429"), "{out}");
    assert!(
        out.contains("console_streams") && out.contains("close one"),
        "{out}"
    );
    // A closed tab gives its slot back.
    let (mut gone, _) = held.pop().unwrap();
    let _ = gone.kill();
    let _ = gone.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut child, first, _lines) = open();
        let _ = child.kill();
        let _ = child.wait();
        if first.as_deref() == Some("event: agents") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed console's slot never came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (mut c, _) in held {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The console's data is filtered, ordered and cut on the server: with 152
/// agents a console gets the counts and one page, online agents first, then
/// by name; a search finds agent names in any case and service names only
/// among those the client may see; the event stream carries the same cut.
#[test]
fn the_console_filters_orders_and_pages_on_the_server() {
    let w = Web::start_with(WebOpts {
        config: fleet_config(150, 3),
        ..Default::default()
    });
    let dev = format!("Authorization: Bearer {CLIENT_TOKEN}");
    let limited = format!("Authorization: Bearer {LIMITED_TOKEN}");
    let get = |auth: &str, query: &str| {
        let out = w.curl(&["-H", auth, &w.url(&format!("/api/agents{query}"))]);
        assert_eq!(out.status, 200, "{out:?}");
        out.json()
    };
    let names = |j: &serde_json::Value| -> Vec<String> {
        j["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .map(|a| a["name"].as_str().expect("a name").to_owned())
            .collect()
    };

    // dev may see prod, ghost and the fleet; only prod is online.
    let j = get(&dev, "");
    assert_eq!(
        (&j["total"], &j["online"], &j["matched"]),
        (&152.into(), &1.into(), &152.into()),
        "{j}"
    );
    let page = names(&j);
    assert_eq!(page.len(), 60, "one page by default");
    assert_eq!(page[..3], ["prod", "fleet-000", "fleet-001"]);
    assert!(page[1..].windows(2).all(|p| p[0] < p[1]), "{page:?}");
    assert_eq!(j["agents"][0]["services"].as_array().map(Vec::len), Some(9));
    assert_eq!(
        names(&get(&dev, "?limit=3")),
        ["prod", "fleet-000", "fleet-001"]
    );
    let all = names(&get(&dev, "?limit=100000"));
    assert_eq!(
        (all.len(), all.last().map(String::as_str)),
        (152, Some("ghost"))
    );
    let j = get(&dev, "?online=1");
    assert_eq!((&j["total"], &j["matched"]), (&152.into(), &1.into()));
    assert_eq!(names(&j), ["prod"]);

    // Agent names, in any case.
    let j = get(&dev, "?q=FLEET-14");
    assert_eq!(j["matched"], 10);
    let want: Vec<String> = (140..150).map(|i| format!("fleet-{i}")).collect();
    assert_eq!(names(&j), want);
    // Service names: prod offers `secure`, which dev may open and limited
    // (allowed prod/echo only) may not even see.
    assert_eq!(names(&get(&dev, "?q=secur")), ["prod"]);
    let j = get(&limited, "?q=secur");
    assert_eq!((&j["total"], &j["matched"]), (&1.into(), &0.into()), "{j}");
    assert!(names(&j).is_empty());
    assert_eq!(names(&get(&limited, "?q=ech")), ["prod"]);

    // The event stream: the same cut.
    let (mut child, mut lines) = w.console_events_filtered("?q=fleet-007", 10);
    assert_eq!(lines.next().unwrap().unwrap(), "event: agents");
    let data = lines.next().unwrap().unwrap();
    let j: serde_json::Value =
        serde_json::from_str(data.strip_prefix("data: ").expect("a data line")).unwrap();
    assert_eq!((&j["total"], &j["matched"]), (&152.into(), &1.into()));
    assert_eq!(names(&j), ["fleet-007"]);
    assert_eq!(
        (&j["online"], &j["agents"][0]["online"]),
        (&1.into(), &false.into())
    );
    // fleet-007 connects: the stream says so at once (its next event, well
    // before the 10 s after which a stream walks the fleet again anyway).
    let fingerprint = w.fingerprint();
    let started = Instant::now();
    let agent = Proc::spawn(
        "fleet-007",
        &[
            "agent",
            "--server",
            &format!("wss://127.0.0.1:{}", w.port),
            "--fingerprint",
            &fingerprint,
            "--name",
            "fleet-007",
            "--token",
            "fleet-token-007",
        ]
        .map(String::from),
    );
    let j = loop {
        let line = lines.next().expect("the stream goes on").unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let j: serde_json::Value = serde_json::from_str(data).unwrap();
            if j["online"] == 2 {
                break j;
            }
        }
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(j["agents"][0]["online"], true, "{j}");
    assert_eq!(names(&j), ["fleet-007"]);
    drop(agent);
    let _ = child.kill();
    let _ = child.wait();
}

/// A service that switches to `h2c` whenever a request asks for any upgrade
/// (and answers `plain` otherwise). Returns its port and the request heads.
fn service_switching_to_anything() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::Write;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let port = thread_per_connection_service(move |mut conn| loop {
        let Some(head) = read_head(&mut conn) else {
            return;
        };
        let head = head.to_ascii_lowercase();
        log.lock().unwrap().push(head.clone());
        if head.contains("\r\nupgrade:") {
            let _ = conn.write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nnot http any more",
                        );
            std::thread::sleep(Duration::from_secs(5));
            return;
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain");
    });
    (port, seen)
}

/// Sends `request` on a new connection to the server and returns what came
/// back within a second of the last byte (or until the server closed).
fn raw_exchange(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = c.read(&mut chunk) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A service that signs a connection in (`Authorization: Negotiate USER`)
/// for the connection's life, as IIS does, and answers `/whoami` with the
/// user signed in on the connection, or 401 with a Negotiate challenge.
fn service_with_connection_logins() -> u16 {
    use std::io::Write;
    thread_per_connection_service(|mut conn| {
        let mut user: Option<String> = None;
        loop {
            let Some(head) = read_head(&mut conn) else {
                return;
            };
            let head = head.to_ascii_lowercase();
            if let Some(u) = head.split("\r\nauthorization: negotiate ").nth(1) {
                user = u.split("\r\n").next().map(str::to_owned);
            }
            let answer = match &user {
                Some(u) => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{u}", u.len()),
                None => "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n".to_owned(),
            };
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_connection_bound_login_never_serves_another_request() {
    let port = service_with_connection_logins();
    let w = Web::start_with(WebOpts {
        services: format!("iis = \"http://127.0.0.1:{port}\"\n"),
        ..Default::default()
    });
    let base = w.host_url(BASE, "");
    let jar = w.dir.join("jar").display().to_string();
    let csrf = login_form_csrf(&w, &base, &jar);
    let good = format!("csrf={csrf}&token={CLIENT_TOKEN}&next=%2F");
    assert_eq!(post_login(&w, &base, &jar, &good, &[]).status, 303);
    let url = w.host_url(BASE, "/a/prod/iis/whoami");
    let signed_in = w.curl(&["-b", &jar, "-H", "Authorization: Negotiate alice", &url]);
    assert_eq!((signed_in.status, signed_in.body.as_str()), (200, "alice"));
    // The next request, without the login (another browser, another
    // tether identity: the pool belongs to no caller), on a new connection.
    for _ in 0..3 {
        let next = w.get(&url, &[]);
        assert_eq!(
            next.status, 401,
            "served as the user signed in before: {next:?}"
        );
    }
}

#[test]
fn only_websocket_upgrades_reach_the_service() {
    let (port, seen) = service_switching_to_anything();
    let w = Web::start_with(WebOpts {
        plain: true,
        services: format!("switcher = \"http://127.0.0.1:{port}\"\n"),
        ..Default::default()
    });
    // curl's `--http2` on http://: an h2c upgrade. Spliced, the service's
    // HTTP/2 would pass the proxy's per-request checks; dropped, the request
    // is answered as HTTP/1.1.
    let got = raw_exchange(
        w.port,
        &format!(
            "GET /a/prod/switcher/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        ),
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("plain"), "{got}");
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        !heads[0].contains("\r\nupgrade:") && !heads[0].contains("http2-settings"),
        "{}",
        heads[0]
    );
    // A WebSocket upgrade the service answers by switching to something
    // else: the client is told, nothing is spliced.
    let got = raw_exchange(
        w.port,
        &format!(
            "GET /a/prod/switcher/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    );
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    assert!(
        got.contains("switched to a protocol it was not asked for"),
        "{got}"
    );
    assert!(!got.contains("not http any more"), "{got}");
    assert!(
        w.server.wait_log(
            "switched to a protocol it was not asked for",
            Duration::from_secs(5)
        ),
        "no log line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_to_the_service() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let w = Web::start_opts(false);
    let url = format!("ws://127.0.0.1:{}/a/prod/web/ws", w.port);
    // Without a login the upgrade is refused before reaching the service.
    let err = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {CLIENT_TOKEN}").parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..50 {
        let msg = format!("message {i} {}", "x".repeat(i * 100));
        ws.send(Message::text(msg.clone())).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), msg),
            other => panic!("{other:?}"),
        }
    }
    let big = vec![7u8; 3 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert_eq!(b.len(), big.len()),
        other => panic!("{other:?}"),
    }
    ws.close(None).await.unwrap();
}

/// A service sets no policy for tether's origin: under path routing a
/// service worker stays under the service's prefix, and reporting policies
/// and `Clear-Site-Data` go. Under host routing the origin is the
/// service's own, and its worker scope and reporting are left alone, but
/// `Clear-Site-Data: "cookies"` still goes (it would clear tether's login
/// with the site's cookies).
#[test]
fn a_service_sets_no_policy_for_the_server_s_origin() {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "self.addEventListener('fetch', () => {});";
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/javascript\r\n\
                     service-worker-allowed: /\r\n\
                     nel: {{\"report_to\":\"x\",\"max_age\":86400,\"success_fraction\":1}}\r\n\
                     report-to: {{\"group\":\"x\",\"max_age\":86400,\"endpoints\":[{{\"url\":\"https://evil.example/r\"}}]}}\r\n\
                     clear-site-data: \"cookies\"\r\n\
                     connection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    let w = Web::start_with(WebOpts {
        services: format!("sw = \"http://127.0.0.1:{port}\""),
        ..Default::default()
    });
    let out = w.get(&w.url("/a/prod/sw/sw.js"), &[]);
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        out.header("service-worker-allowed").as_deref(),
        Some("/a/prod/sw/"),
        "{}",
        out.headers
    );
    for gone in ["nel", "report-to", "clear-site-data"] {
        assert_eq!(out.header(gone), None, "{gone} passed: {}", out.headers);
    }
    let resolve = format!("sw.prod.{BASE}:{}:127.0.0.1", w.port);
    let out = w.get(
        &w.host_url(&format!("sw.prod.{BASE}"), "/sw.js"),
        &["--resolve", &resolve],
    );
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.header("service-worker-allowed").as_deref(), Some("/"));
    assert!(out.header("nel").is_some(), "{}", out.headers);
    assert_eq!(out.header("clear-site-data"), None, "{}", out.headers);
}

/// With `[http] path_routing = false`, services are served on their own
/// hosts only: `/a/AGENT/SERVICE/` on the server's name is refused (a page
/// there would share the console's origin), host routing goes on, and the
/// console links to the hosts.
#[test]
fn path_routing_can_be_turned_off() {
    let w = Web::start_with(WebOpts {
        config: "[http]\npath_routing = false\n".into(),
        ..Default::default()
    });
    let out = w.get(&w.url("/a/prod/web/headers"), &[]);
    assert_eq!(out.status, 404, "{out:?}");
    assert!(out.body.contains("path_routing"), "{}", out.body);
    let out = w.get(&w.host_url(&format!("web.prod.{BASE}"), "/headers"), &[]);
    assert_eq!(out.status, 200, "{out:?}");
    let agents = w.get(&w.url("/api/agents"), &[]).body;
    assert!(
        agents.contains(&format!("https://web.prod.{BASE}")) && !agents.contains("/a/prod/web/"),
        "{agents}"
    );
}
