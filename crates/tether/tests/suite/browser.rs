//! A real browser through the tunnel: headless Chromium (Debian's
//! `chromium` + `chromium-driver`, driven over WebDriver) signs in, reads
//! the console, and opens a tunneled app by host and by path; the app's page
//! loads a script, opens a WebSocket and shows the echo, and reads
//! server-sent events. Screenshots go to `target/test-artifacts/browser/`.

use crate::common::web::*;
use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
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

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_uses_a_tunneled_app_with_a_websocket() {
    if !(have("chromium") && have("chromedriver")) {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium and chromium-driver are required in CI"
        );
        eprintln!("SKIPPED: install chromium and chromium-driver to run the browser test");
        return;
    }
    let w = Web::start();
    let port = free_port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
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
    let mut c = None;
    for _ in 0..50 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => {
                c = Some(client);
                break;
            }
            Err(e) => {
                eprintln!("waiting for chromedriver: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let c = c.expect("chromedriver session");
    let origin = format!("https://{BASE}:{}", w.port);

    // Not signed in: the console sends the browser to the login page.
    c.goto(&format!("{origin}/")).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert!(url.path().starts_with("/login"), "{url}");
    screenshot(&c, "1-login.png").await;
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys("wrong-token")
        .await
        .unwrap();
    c.find(Locator::Css("#login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "#message", |t| t.contains("not valid")).await;
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(CLIENT_TOKEN)
        .await
        .unwrap();
    c.find(Locator::Css("#login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

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
    c.close().await.unwrap();
    drop(driver);
}
