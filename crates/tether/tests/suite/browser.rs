//! A real browser through the tunnel: headless Chromium (Debian's
//! `chromium` + `chromium-driver`, driven over WebDriver) signs in, reads
//! the console, and opens a tunneled app by host and by path; the app's page
//! loads a script, opens a WebSocket and shows the echo, and reads
//! server-sent events. Screenshots go to `target/test-artifacts/browser/`.

use crate::common::web::*;
use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver and the Chromium it started share a process group
        // (see `chromium`): a test that fails halfway leaves no browser behind.
        signal_group(self.0.id(), Signal::KILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts/browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    match c.screenshot().await {
        Ok(png) => {
            let path = artifacts().join(name);
            std::fs::write(&path, png).unwrap();
            eprintln!("screenshot: {}", path.display());
        }
        Err(e) => eprintln!("screenshot {name} failed: {e}"),
    }
}

/// Waits (bounded) until the element's text satisfies `ok`; returns the text.
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < end {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{css}: text never matched; last seen {last:?}");
}

/// Runs `script` in the page; its string result.
/// The agents whose cards the console shows, in order, comma-separated.
async fn shown_cards(c: &Client) -> String {
    js(
        c,
        "return [...document.querySelectorAll('#agents section')].map(s => s.dataset.agent).join(',');",
    )
    .await
}

async fn js(c: &Client, script: &str) -> String {
    match c.execute(script, vec![]).await.expect("script runs") {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the browser tests can run here (in CI they must).
fn chromium_available() -> bool {
    if have("chromium") && have("chromedriver") {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "chromium and chromium-driver are required in CI"
    );
    eprintln!("SKIPPED: install chromium and chromium-driver to run the browser test");
    false
}

/// Starts chromedriver and a headless Chromium session that resolves the
/// test's base domain to loopback.
async fn chromium(w: &Web) -> (Driver, Client) {
    let port = free_port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver"),
    );
    let profile = w.dir.join("chromium-profile");
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--ignore-certificate-errors",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
                // Wildcard DNS for the base domain, on loopback only.
                format!("--host-resolver-rules=MAP *.{BASE} 127.0.0.1, MAP {BASE} 127.0.0.1, EXCLUDE localhost"),
            ]
        }
    }))
    .unwrap();
    for _ in 0..50 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => return (driver, client),
            Err(e) => {
                eprintln!("waiting for chromedriver: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!("no chromedriver session");
}

/// Signs in on the login page with `token`.
async fn sign_in(c: &Client, origin: &str, token: &str) {
    c.goto(&format!("{origin}/")).await.unwrap();
    submit_token(c, token).await;
}

/// Types `token` into the login page on screen and submits it.
async fn submit_token(c: &Client, token: &str) {
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Css("#login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_uses_a_tunneled_app_with_a_websocket() {
    if !chromium_available() {
        return;
    }
    let w = Web::start();
    let (driver, c) = chromium(&w).await;
    let origin = format!("https://{BASE}:{}", w.port);

    // Not signed in: the console sends the browser to the login page.
    c.goto(&format!("{origin}/")).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert!(url.path().starts_with("/login"), "{url}");
    screenshot(&c, "1-login.png").await;
    submit_token(&c, "wrong-token").await;
    wait_text(&c, "#message", |t| t.contains("not valid")).await;
    submit_token(&c, CLIENT_TOKEN).await;

    // The console: live agent list from server-sent events.
    wait_text(&c, "[data-agent=prod] .state", |t| t == "online").await;
    wait_text(&c, "[data-agent=ghost] .state", |t| t == "offline").await;
    let identity = wait_text(&c, "#identity", |t| !t.is_empty()).await;
    assert_eq!(identity, "dev");
    let link = c
        .find(Locator::Css("[data-agent=prod] a[data-service=web]"))
        .await
        .unwrap();
    let href = link.attr("href").await.unwrap().unwrap();
    assert_eq!(href, format!("https://web.prod.{BASE}:{}/", w.port));
    screenshot(&c, "2-console.png").await;

    // Host routing: the app's page, its script, its WebSocket and its events.
    c.goto(&href).await.unwrap();
    wait_text(&c, "h1", |t| t == "tether sample app").await;
    wait_text(&c, "#ws", |t| t == "echo: hello through tether").await;
    wait_text(&c, "#sse", |t| t == "events: tick 0, tick 1, tick 2").await;
    screenshot(&c, "3-app-by-host.png").await;

    // Path routing, same app under /a/prod/web/.
    c.goto(&format!("{origin}/a/prod/web/")).await.unwrap();
    wait_text(&c, "#ws", |t| t == "echo: hello through tether").await;
    wait_text(&c, "#sse", |t| t.ends_with("tick 2")).await;
    screenshot(&c, "4-app-by-path.png").await;

    // A service the server refuses shows a readable error page.
    c.goto(&format!("{origin}/a/prod/refused/")).await.unwrap();
    let msg = wait_text(&c, "#message", |t| !t.is_empty()).await;
    assert!(msg.contains("refused"), "{msg}");
    let h1 = c
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(h1, "502 Bad Gateway");

    // The console fits a phone screen.
    c.set_window_size(390, 844).await.unwrap();
    c.goto(&format!("{origin}/")).await.unwrap();
    wait_text(&c, "[data-agent=prod] .state", |t| t == "online").await;
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        fits,
        serde_json::Value::Bool(true),
        "console overflows a phone screen"
    );
    screenshot(&c, "5-console-phone.png").await;

    // Sign out: back to the login page, and the console is closed again.
    c.find(Locator::Css("#logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !c.current_url().await.unwrap().path().starts_with("/login") {
        assert!(Instant::now() < end, "logout did not land on /login");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.goto(&format!("{origin}/a/prod/web/")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().starts_with("/login"));

    // Signed out, a host-routed service's page sends the browser to the
    // login page on the base domain, and signing in brings it back there
    // (the login page's form-action must allow that redirect).
    c.goto(&href).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert!(url.path().starts_with("/login"), "{url}");
    submit_token(&c, CLIENT_TOKEN).await;
    wait_text(&c, "h1", |t| t == "tether sample app").await;
    let url = c.current_url().await.unwrap();
    assert_eq!(url.host_str(), Some(&*format!("web.prod.{BASE}")), "{url}");
    c.close().await.unwrap();
    drop(driver);
}

/// The console with a thousand agents: online ones first, at most a page of
/// cards in the document, search by agent or service name, the exact
/// `tether client forward` line for a TCP service (which works when run),
/// a traffic sparkline per agent, and (for an admin) the live streams with
/// their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_console_finds_one_agent_among_a_thousand_and_shows_live_streams() {
    if !chromium_available() {
        return;
    }
    let config = format!("admins = [\"dev\"]\n{}", fleet_config(1000, 4));
    let w = Web::start_with(WebOpts {
        config,
        ..Default::default()
    });
    let (driver, c) = chromium(&w).await;
    let origin = format!("https://{BASE}:{}", w.port);
    sign_in(&c, &origin, CLIENT_TOKEN).await;

    // 1002 agents, one online: it comes first, and the page holds one page
    // of cards, not a thousand.
    let status = wait_text(&c, "#status", |t| t.starts_with("1 of 1002 agents online")).await;
    assert!(status.contains("refine the search"), "{status}");
    let first = js(
        &c,
        "return document.querySelector('#agents section').dataset.agent;",
    )
    .await;
    assert_eq!(first, "prod");
    let cards = js(
        &c,
        "return String(document.querySelectorAll('#agents section').length);",
    )
    .await;
    assert!(
        cards.parse::<usize>().unwrap() <= 60,
        "{cards} cards in the page"
    );

    // Search: one agent among a thousand, then by service name.
    let search = c.find(Locator::Css("#search")).await.unwrap();
    search.send_keys("fleet-0999").await.unwrap();
    wait_text(&c, "#status", |t| t.contains("· 1 match")).await;
    let shown = shown_cards(&c).await;
    assert_eq!(shown, "fleet-0999");
    search.clear().await.unwrap();
    search.send_keys("echo").await.unwrap();
    wait_text(&c, "#status", |t| t.contains("· 1 match")).await;
    wait_text(&c, "[data-agent=prod] .state", |t| t == "online").await;
    // Online only (the server filters): prod alone, then the fleet again.
    search.clear().await.unwrap();
    let online_only = c.find(Locator::Css("#online-only")).await.unwrap();
    online_only.click().await.unwrap();
    wait_text(&c, "#status", |t| {
        t.starts_with("1 of 1002 agents online · 1 match") && !t.contains("refine")
    })
    .await;
    let shown = shown_cards(&c).await;
    assert_eq!(shown, "prod");
    online_only.click().await.unwrap();
    wait_text(&c, "#status", |t| t.contains("refine the search")).await;
    search.send_keys("echo").await.unwrap();
    wait_text(&c, "#status", |t| t.contains("· 1 match")).await;

    // The forward line for the TCP service, exactly as a user would paste
    // it (with TETHER_TOKEN set): run it and reach the service through it.
    let line = wait_text(&c, "[data-agent=prod] [data-forward=echo]", |t| {
        t.starts_with("tether client --server ")
    })
    .await;
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[..3], ["tether", "client", "--server"], "{line}");
    assert_eq!(words[3], format!("wss://{BASE}:{}", w.port), "{line}");
    assert_eq!(words[4], "forward", "{line}");
    let (listen, target) = words[5].split_once('=').expect("LISTEN=TARGET");
    assert_eq!(target, "prod/echo");
    let local: std::net::SocketAddr = listen.parse().expect("a local address");
    assert!(local.ip().is_loopback());
    assert_eq!(
        local.port(),
        CONSOLE_PROD_ECHO_PORT,
        "the console's port for prod/echo changed: update the constant other tests avoid"
    );
    let fingerprint = w.fingerprint();
    // The line names the server by its public name; this test maps that
    // name to loopback for Chromium only, so the client dials loopback.
    let server_arg = words[3].replace(BASE, "127.0.0.1");
    let mut args: Vec<String> = words[1..].iter().map(|s| s.to_string()).collect();
    args[2] = server_arg;
    args.insert(1, "--fingerprint".into());
    args.insert(2, fingerprint);
    let forward = Proc::spawn_env("copied-forward", &args, &[("TETHER_TOKEN", CLIENT_TOKEN)]);
    assert!(
        forward.wait_log("connected", Duration::from_secs(10)),
        "{}",
        forward.log_text()
    );

    // A live stream with traffic: the admin sees it, with its bytes, and
    // prod's sparkline shows the rate.
    let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "the copied forward reaches the service"
    );
    wait_text(&c, "#streams-note", |t| t.starts_with("1 live stream")).await;
    let row = wait_text(&c, "#streams-body tr", |t| t.contains("prod/echo")).await;
    assert!(row.starts_with("dev"), "{row}");
    assert!(
        row.contains(&format!("{} B", request.len())),
        "bytes up shown: {row}"
    );
    let points = {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            // Keep traffic flowing (keep-alive requests) while waiting.
            s.write_all(request).await.unwrap();
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the service answers again");
            // One script call: the cards are redrawn every 2 s, so an
            // element found in one call may be gone by the next.
            let p = js(
                &c,
                "return document.querySelector('[data-agent=prod] svg.spark polyline')?.getAttribute('points') || '';",
            )
            .await;
            let peak = p
                .split_whitespace()
                .filter_map(|xy| xy.split_once(',').and_then(|(_, y)| y.parse::<f64>().ok()))
                .fold(f64::MAX, f64::min);
            // y is drawn downwards: a point above the baseline is traffic;
            // a line needs two points.
            if peak < 20.0 && p.split_whitespace().count() >= 2 {
                break p;
            }
            assert!(Instant::now() < end, "no traffic in the sparkline: {p:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    eprintln!("prod's sparkline: {points}");
    screenshot(&c, "6-console-search-streams.png").await;

    // A client that is not an admin sees no live streams.
    drop(s);
    c.delete_all_cookies().await.unwrap();
    sign_in(&c, &origin, LIMITED_TOKEN).await;
    wait_text(&c, "[data-agent=prod] .state", |t| t == "online").await;
    let hidden = c
        .execute("return document.getElementById('streams').hidden;", vec![])
        .await
        .unwrap();
    assert_eq!(hidden, serde_json::Value::Bool(true));
    c.close().await.unwrap();
    drop(forward);
    drop(driver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_console_polls_when_its_live_updates_are_refused() {
    if !chromium_available() {
        return;
    }
    let w = Web::start();
    // Sixteen consoles of this client are open elsewhere: the server's cap.
    let mut held = vec![];
    for i in 0..16 {
        let (child, mut lines) = w.console_events(120);
        let first = lines.next().and_then(Result::ok);
        assert_eq!(first.as_deref(), Some("event: agents"), "console {i}");
        held.push((child, lines));
    }
    let (driver, c) = chromium(&w).await;
    let origin = format!("https://{BASE}:{}", w.port);
    sign_in(&c, &origin, CLIENT_TOKEN).await;
    // The page's event stream is refused (429), so it polls instead and
    // says so: the agents still show.
    wait_text(&c, "[data-agent=prod] .state", |t| t == "online").await;
    assert!(
        w.server
            .wait_log("console event stream refused", Duration::from_secs(10)),
        "the refusal is logged"
    );
    wait_text(&c, "#status", |t| {
        t.contains("agents online") && t.contains("refreshing every 3 s (live updates refused")
    })
    .await;
    screenshot(&c, "console-polling.png").await;
    // A search while refused: the page tries live updates again, is
    // refused again and polls with the search (ghost only).
    let search = c.find(Locator::Css("#search")).await.unwrap();
    search.send_keys("gho").await.unwrap();
    wait_text(&c, "#status", |t| {
        t.contains("· 1 match") && t.contains("refreshing every 3 s")
    })
    .await;
    assert_eq!(shown_cards(&c).await, "ghost");
    // The other consoles close; the next search goes live again.
    for (mut child, _) in held {
        let _ = child.kill();
        let _ = child.wait();
    }
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        search.clear().await.unwrap();
        search.send_keys("prod").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status = wait_text(&c, "#status", |t| t.contains("· 1 match")).await;
        if !status.contains("refreshing") {
            break;
        }
        // Refused again: the server has not yet noticed a close.
        assert!(Instant::now() < end, "never live again: {status}");
    }
    assert_eq!(shown_cards(&c).await, "prod");
    // Signed out elsewhere (here a request of the page's own, as another
    // tab's sign-out would be): the live stream ends with the login, and
    // the page goes to the sign-in page instead of polling 401s.
    js(
        &c,
        "fetch('/logout', {method: 'POST', body: new URLSearchParams({csrf: document.querySelector('input[name=csrf]').value})}); return 'sent';",
    )
    .await;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let url = c.current_url().await.unwrap();
        if url.path() == "/login" {
            assert_eq!(url.query(), Some("next=%2F"), "{url}");
            break;
        }
        assert!(Instant::now() < end, "still on {url} after the logout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.close().await.unwrap();
    drop(driver);
}
