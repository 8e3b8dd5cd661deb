//! The admin API (`/api/v1/...`) and `tether status`: only admins may read
//! it, it lists agents, sessions and live streams with their bytes, and the
//! running server keeps to `docs/openapi.yaml` (schemathesis).

use crate::common::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `curl` with `extra` arguments against `url`: (status, headers, body).
fn curl(url: &str, extra: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').expect("curl wrote a status");
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().expect("status code"),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// `GET /api/v1/PART` as an admin, parsed.
fn api(t: &Tunnel, part: &str) -> Value {
    let (status, _, body) = curl(
        &format!("{}/api/v1/{part}", t.url().replace("ws://", "http://")),
        &["-H", &bearer(CLIENT_TOKEN)],
    );
    assert_eq!(status, 200, "{part}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_see_agents_sessions_and_live_streams_with_their_bytes() {
    let echo = echo_service().await;
    // `dev` (CLIENT_TOKEN) is an admin; `limited` is not.
    let t = Tunnel::start_with(&[("echo", echo)], &["--admin", "dev"], &[]);
    let base = t.url().replace("ws://", "http://");

    // Who may not read it, and why.
    let (status, headers, body) = curl(&format!("{base}/api/v1/status"), &[]);
    assert_eq!(status, 401, "{body}");
    assert!(headers.contains("www-authenticate: bearer"), "{headers}");
    assert!(body.contains("\"error\":\"unauthorized\""), "{body}");
    let (status, _, body) = curl(
        &format!("{base}/api/v1/status"),
        &["-H", &bearer("not-a-token")],
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid client token"), "{body}");
    let (status, _, body) = curl(
        &format!("{base}/api/v1/streams"),
        &["-H", &bearer(LIMITED_TOKEN)],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("limited is not an admin"), "{body}");
    assert!(
        t.server
            .wait_log("admin API refused: not an admin", Duration::from_secs(5)),
        "the refusal is logged"
    );
    let (status, headers, body) = curl(
        &format!("{base}/api/v1/status"),
        &["-X", "POST", "-H", &bearer(CLIENT_TOKEN)],
    );
    assert_eq!(status, 405, "{body}");
    assert!(headers.contains("allow: get"), "{headers}");
    let (status, _, body) = curl(
        &format!("{base}/api/v1/nothing"),
        &["-H", &bearer(CLIENT_TOKEN)],
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"error\":\"not_found\""), "{body}");

    // A live stream through a CLI forward: 3000 bytes up, echoed down.
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let mut s = connect(port).await;
    s.write_all(&[7u8; 3000]).await.unwrap();
    let mut back = vec![0u8; 3000];
    s.read_exact(&mut back).await.unwrap();

    let status = api(&t, "status");
    assert_eq!(status["agents_online"], 1, "{status}");
    assert_eq!(status["client_sessions"], 1, "{status}");
    assert_eq!(status["live_streams"], 1, "{status}");
    assert_eq!(status["phase"], "serving", "{status}");

    let agents = api(&t, "agents");
    let prod = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "prod")
        .expect("prod is listed");
    assert_eq!(prod["online"], true);
    assert_eq!(prod["instances"].as_array().unwrap().len(), 1, "{prod}");
    assert!(prod["instances"][0]["software"]
        .as_str()
        .unwrap()
        .starts_with("tether-agent/"));
    assert!(
        prod["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "echo"),
        "{prod}"
    );

    let sessions = api(&t, "sessions");
    let kinds: Vec<(String, String)> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["kind"].as_str().unwrap().to_owned(),
                s["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("client".into(), "dev".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("agent".into(), "prod".into())),
        "{kinds:?}"
    );

    let streams = api(&t, "streams");
    let list = streams["streams"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{streams}");
    let st = &list[0];
    assert_eq!(st["who"], "dev");
    assert_eq!(st["agent"], "prod");
    assert_eq!(st["service"], "echo");
    assert_eq!(st["protocol"], "tcp");
    assert_eq!(st["bytes_up"], 3000, "{st}");
    assert_eq!(st["bytes_down"], 3000, "{st}");
    assert_eq!(streams["total"], 1, "{streams}");

    // Two more streams, one busier and one quieter: `limit` returns the
    // busiest first and counts them all; a limit out of range is refused.
    let mut busier = connect(port).await;
    let mut quieter = connect(port).await;
    for (conn, n) in [(&mut busier, 5000), (&mut quieter, 1000)] {
        conn.write_all(&vec![1u8; n]).await.unwrap();
        let mut back = vec![0u8; n];
        conn.read_exact(&mut back).await.unwrap();
    }
    let top = api(&t, "streams?limit=2");
    let ups: Vec<&Value> = top["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["bytes_up"])
        .collect();
    assert_eq!(ups, [5000, 3000], "{top}");
    assert_eq!(top["total"], 3, "{top}");
    assert_eq!(
        api(&t, "streams")["streams"].as_array().map(Vec::len),
        Some(3)
    );
    for bad in ["0", "10001", "many", "-1"] {
        let (status, _, body) = curl(
            &format!("{base}/api/v1/streams?limit={bad}"),
            &["-H", &bearer(CLIENT_TOKEN)],
        );
        assert_eq!(status, 400, "limit={bad}: {body}");
        assert!(
            body.contains("\"error\":\"bad_request\"") && body.contains("limit must be"),
            "{body}"
        );
    }
    drop((busier, quieter));

    // `tether status`: the same, as JSON and as a table.
    let status_as = |token: &str, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["status", "--server", &t.url(), "--token", token])
            .args(extra)
            .output()
            .expect("run tether status");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let status_cmd = |extra: &[&str]| status_as(CLIENT_TOKEN, extra);
    let (ok, out, err) = status_cmd(&["--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["streams"]["streams"][0]["bytes_up"], 3000, "{out}");
    let (ok, out, err) = status_cmd(&["--watch", "1", "--count", "2"]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("\x1b[2J").count(), 2, "two refreshes: {out}");
    assert!(
        out.lines()
            .any(|l| l.contains("dev") && l.contains("prod/echo") && l.contains("2.9 KiB")),
        "{out}"
    );
    let (ok, _, err) = status_as(LIMITED_TOKEN, &[]);
    assert!(!ok);
    assert!(err.contains("limited is not an admin"), "{err}");

    // Closed, the stream leaves the list.
    drop(s);
    assert!(
        wait_until(Duration::from_secs(5), || api(&t, "streams")["streams"]
            .as_array()
            .is_some_and(Vec::is_empty)),
        "the closed stream is gone"
    );
    drop(client);
}

/// schemathesis (PyPI) checks the running server against
/// `docs/openapi.yaml`: every operation, generated requests, status codes,
/// content types, headers and schemas of the answers, and that the
/// endpoints refuse requests without the credential.
#[test]
fn the_running_server_keeps_to_its_openapi_document() {
    let found = Command::new("schemathesis").arg("--version").output();
    if found.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is not installed (.ci/run installs it from PyPI)"
        );
        eprintln!("schemathesis not installed: skipped");
        return;
    }
    let t = Tunnel::start_with(&[], &["--admin", "dev"], &[]);
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let out = Command::new("schemathesis")
        .args(["run", doc, "--url"])
        .arg(t.url().replace("ws://", "http://"))
        .args(["-H", &bearer(CLIENT_TOKEN)])
        .args(["--checks", "all", "--max-time", "15", "--workers", "1"])
        .env("NO_COLOR", "1")
        // It keeps a cache directory where it runs.
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("4 selected / 4 total"), "{text}");
    assert!(text.contains("No issues found"), "{text}");
}
