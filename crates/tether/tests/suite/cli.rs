//! The command line as operators use it: shell completions and the man page
//! generated from it, and JSON logs for log pipelines.

use crate::common::*;
use std::process::Command;
use std::time::Duration;
use tokio::io::AsyncReadExt;

fn tether(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .expect("run tether");
    assert!(
        out.status.success(),
        "tether {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// An agent whose dial may take longer than the server waits for an open
/// is told so when its config is checked: the server's timeout, not its own
/// setting, is what its clients would hit.
#[test]
fn a_dial_timeout_past_the_servers_open_timeout_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("tether-dial-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |ms: u64| {
        let cfg = dir.join(format!("agent-{ms}.toml"));
        std::fs::write(
            &cfg,
            format!("server = \"ws://127.0.0.1:1\"\nname = \"a\"\ntoken = \"t\"\ndial_timeout_ms = {ms}\n[services]\nweb = \"127.0.0.1:80\"\n"),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args([
                "agent",
                "--config",
                &cfg.display().to_string(),
                "--check-config",
            ])
            .env("NO_COLOR", "1")
            .output()
            .expect("run tether");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let long = check(30_000);
    assert!(
        long.contains("dial_timeout_ms = 30000: the server gives up on an open after 15s"),
        "{long}"
    );
    let short = check(10_000);
    assert!(!short.contains("gives up"), "{short}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Completions for bash (syntax-checked by bash itself), zsh and fish name
/// the subcommands and flags; the man page is roff for `tether` with every
/// subcommand.
#[test]
fn completions_and_the_man_page_come_from_the_cli() {
    let bash = tether(&["completions", "bash"]);
    for word in ["server", "agent", "client", "--replica-id", "--log-format"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let dir = std::env::temp_dir().join(format!("tether-completions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("tether.bash");
    std::fs::write(&script, &bash).expect("write");
    let checked = Command::new("bash").arg("-n").arg(&script).status();
    assert!(
        checked.is_ok_and(|s| s.success()),
        "bash -n rejects the completion script"
    );
    // Loaded into bash, it completes `tether se` to `server`.
    let completed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(tether se); COMP_CWORD=1; COMP_LINE='tether se'; COMP_POINT=9; _tether tether se tether; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .expect("bash");
    let words = String::from_utf8_lossy(&completed.stdout);
    assert!(
        words.split_whitespace().any(|w| w == "server"),
        "completing 'tether se' gave {words:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(tether(&["completions", "zsh"]).starts_with("#compdef tether"));
    assert!(tether(&["completions", "fish"]).contains("complete -c tether"));
    let man = tether(&["man"]);
    assert!(man.contains(".TH tether"), "not a man page");
    for sub in ["server", "agent", "client", "completions"] {
        assert!(man.contains(sub), "man page lacks {sub}");
    }
}

/// `--log-format json`: every line the server writes is one JSON object
/// with a level and a message; the audit line of a stream says who opened
/// what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_audit_included() {
    let echo = echo_service().await;
    let t = Tunnel::start_with(&[("echo", echo)], &["--log-format", "json"], &[]);
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    assert_eq!(echo_through(port, b"ping\n").await, b"ping\n");
    assert!(t.server.wait_log("\"audit\"", Duration::from_secs(5)));
    let log = t.server.log_text();
    let mut audit = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(v["level"].is_string(), "no level: {line}");
        assert!(v["fields"]["message"].is_string(), "no message: {line}");
        if v["target"] == "audit" && v["fields"]["identity"] == "dev" {
            audit = Some(v);
        }
    }
    let audit = audit.expect("an audit line for client dev");
    assert_eq!(audit["fields"]["target"], "prod/echo");
    drop(client);
}

/// `RUST_LOG=info,audit=off` (README, Tuning) turns the audit lines off
/// and nothing else: the stream's open line stays (its audit line is the
/// one written when it ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_can_be_turned_off_alone() {
    let echo = echo_service().await;
    let t = Tunnel::start_with_env(
        &[("echo", echo)],
        &[],
        &[],
        &[("RUST_LOG", "info,audit=off")],
    );
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    assert_eq!(echo_through(port, b"ping\n").await, b"ping\n");
    // The audit line is written as the stream's gauge drops, in one step.
    assert!(
        wait_until(Duration::from_secs(5), || t
            .server_metric("tether_live_streams")
            == Some(0.0)),
        "the stream did not end"
    );
    let log = t.server.log_text();
    assert!(log.contains("stream open"), "{log}");
    assert!(
        !log.lines().any(|l| l.contains(" audit ")),
        "an audit line despite audit=off: {log}"
    );
    drop(client);
}

/// Every metric the Grafana dashboard and the alert rules in
/// `deploy/observability/` query exists in a live `/metrics` of a server or
/// an agent, once the things they count have happened (a stream, a refused
/// open, a limit hit, a reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_metrics_that_exist() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/observability/");
    let wanted: std::collections::BTreeSet<String> = ["grafana-dashboard.json", "alerts.yaml"]
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(format!("{root}{f}")).expect("read");
            metric_names_in(&text)
        })
        .collect();
    assert!(wanted.len() >= 10, "too few metrics found: {wanted:?}");

    let dir = std::env::temp_dir().join(format!("tether-observe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, "[limits]\nmax_sessions_per_client = 1\n").expect("config");
    let echo = echo_service().await;
    let t = Tunnel::start_with(
        &[("echo", echo)],
        &["--config", &cfg.display().to_string()],
        &[],
    );
    let (port, ghost) = (free_port(), free_port());
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/echo"), (ghost, "ghost/web")]);
    // A stream with bytes both ways.
    assert_eq!(echo_through(port, b"ping\n").await, b"ping\n");
    // A refused open (no such agent) and a refused session (the limit).
    let mut g = connect(ghost).await;
    let mut buf = [0u8; 8];
    let _ = tokio::time::timeout(Duration::from_secs(5), g.read(&mut buf)).await;
    let second = forward_client(&t.url(), CLIENT_TOKEN, &[(free_port(), "prod/echo")]);
    assert!(
        second.wait_log("HTTP 429", Duration::from_secs(10)),
        "{}",
        second.log_text()
    );
    // A reload.
    t.server.signal(Signal::HUP);
    assert!(t.server.wait_log("reload", Duration::from_secs(10)));
    let ok = wait_until(Duration::from_secs(10), || {
        let have = live_names(&t);
        wanted.iter().all(|m| have.contains(m))
    });
    let have = live_names(&t);
    let missing: Vec<&String> = wanted.iter().filter(|m| !have.contains(*m)).collect();
    assert!(
        ok,
        "dashboard/alerts query metrics that do not exist: {missing:?}\nlive: {have:?}"
    );
    drop(second);
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every `tether_*` name in a dashboard or rules file.
fn metric_names_in(text: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = text;
    while let Some(i) = rest.find("tether_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Metric names with samples in the server's and the agent's `/metrics`.
fn live_names(t: &Tunnel) -> std::collections::BTreeSet<String> {
    let agent = http_get(t.agent_metrics, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    [t.server_metrics(), agent]
        .iter()
        .flat_map(|text| {
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `tether doctor` against a real TLS server: all checks pass with the
/// right settings, and each common mistake is named on its own line with
/// its fix (wrong port, ws:// to a TLS port, a wrong pin, an expired
/// certificate, a wrong token); the exit status says which.
#[test]
fn doctor_names_each_common_mistake() {
    let port = free_port();
    let server = Proc::spawn(
        "doctor-server",
        &[
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--self-signed".into(),
            "--client".into(),
            format!("dev={CLIENT_TOKEN}=prod/*"),
        ],
    );
    assert!(server.wait_log("server listening", Duration::from_secs(10)));
    let log = server.log_text();
    let fp = log
        .split("fingerprint=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the server prints its fingerprint")
        .to_owned();
    let doctor = |args: &[&str]| -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("doctor")
            .args(args)
            .env_remove("TETHER_TOKEN")
            .output()
            .expect("run doctor");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let url = format!("wss://127.0.0.1:{port}");
    let (ok, out) = doctor(&[
        "--server",
        &url,
        "--fingerprint",
        &fp,
        "--token",
        CLIENT_TOKEN,
    ]);
    assert!(ok && out.contains("all checks passed"), "{out}");
    assert!(
        out.contains(&format!(
            "protocol version {}",
            tether_proto::PROTOCOL_VERSION
        )),
        "{out}"
    );

    // Without a token, the upgrade alone: the server's own 401.
    let (ok, out) = doctor(&["--server", &url, "--fingerprint", &fp]);
    assert!(
        ok && out.contains("ok    upgrade") && out.contains("skip  token"),
        "{out}"
    );
    assert!(
        out.contains("(the token and the handshake not checked"),
        "{out}"
    );
    // Something else that speaks HTTP on the port is not passed.
    let app_port = free_port();
    let app = Proc::spawn(
        "doctor-app",
        &[
            "sample-app".into(),
            "--listen".into(),
            format!("127.0.0.1:{app_port}"),
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || http_get(
        format!("127.0.0.1:{app_port}").parse().unwrap(),
        "/hello"
    )
    .is_some()));
    let (ok, out) = doctor(&["--server", &format!("ws://127.0.0.1:{app_port}")]);
    assert!(
        !ok && out.contains("FAIL  upgrade") && out.contains("is this a tether server"),
        "{out}"
    );
    drop(app);

    let closed = format!("wss://127.0.0.1:{}", free_port());
    let (ok, out) = doctor(&["--server", &closed, "--fingerprint", &fp]);
    assert!(
        !ok && out.contains("FAIL  tcp") && out.contains("refused"),
        "{out}"
    );

    let plain = format!("ws://127.0.0.1:{port}");
    let (ok, out) = doctor(&["--server", &plain, "--token", CLIENT_TOKEN]);
    assert!(
        !ok && out.contains("FAIL  plain") && out.contains("use wss://"),
        "{out}"
    );

    let other = ["AB"; 32].join(":");
    let (ok, out) = doctor(&["--server", &url, "--fingerprint", &other]);
    assert!(
        !ok && out.contains("FAIL  tls") && out.contains(&fp) && out.contains("not the pinned"),
        "{out}"
    );

    let (ok, out) = doctor(&["--server", &url, "--fingerprint", &fp, "--token", "nope"]);
    assert!(
        !ok && out.contains("FAIL  token") && out.contains("401"),
        "{out}"
    );

    // An expired certificate, checked against its CA.
    let dir = std::env::temp_dir().join(format!("tether-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    let expired_port = free_port();
    let expired = Proc::spawn(
        "doctor-expired",
        &[
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{expired_port}"),
            "--tls-cert".into(),
            cert_file.display().to_string(),
            "--tls-key".into(),
            key_file.display().to_string(),
        ],
    );
    assert!(expired.wait_log("server listening", Duration::from_secs(10)));
    let (ok, out) = doctor(&[
        "--server",
        &format!("wss://127.0.0.1:{expired_port}"),
        "--ca-file",
        &cert_file.display().to_string(),
    ]);
    assert!(
        !ok && out.contains("FAIL  tls") && out.contains("expired"),
        "{out}"
    );
    drop(expired);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tether doctor --agent` checks the agent's token without joining the
/// agent's pool: the running agent keeps every open, and the pool keeps
/// one member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_an_agent_token_without_joining_its_pool() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "doctor",
            "--server",
            &t.url(),
            "--agent",
            "prod",
            "--token",
            AGENT_TOKEN,
        ])
        .env_remove("TETHER_TOKEN")
        .output()
        .expect("run doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("accepted as an agent"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = t.server.log_text();
    assert_eq!(
        log.matches("agent connected").count(),
        1,
        "the doctor's session was registered\n{log}"
    );
    assert!(!log.contains("re-registered"), "{log}");
    assert!(log.contains("agent credential checked (probe)"), "{log}");
}

/// The `[cluster]` settings come from the environment too (as a Kubernetes
/// manifest sets them): the replica id, a comma-separated peer list, and
/// the replica list the server builds from them. A replica new among peers
/// is not ready until an agent arrives, and calls an agent it has not seen
/// `not_here` (retry elsewhere), not offline.
#[test]
fn cluster_settings_come_from_the_environment() {
    let port = free_port();
    let metrics = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--client",
            "dev=dev-token=*",
            "--agent",
            "ghost=ghost-token",
        ])
        .env("TETHER_REPLICA_ID", "pod-a")
        .env("TETHER_PEERS", "pod-b=127.0.0.12:7700,127.0.0.13:7700")
        .env("TETHER_AGENT_WAIT_MS", "500")
        .env("TETHER_SHUTDOWN_DELAY_MS", "0")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let addr = format!("127.0.0.1:{metrics}").parse().expect("addr");
    let up = wait_until(Duration::from_secs(10), || {
        http_get(addr, "/metrics")
            .is_some_and(|(_, b)| b.contains("tether_replica{replica=\"pod-a\"} 1"))
    });
    // With peers and no agent yet, the replica is not ready.
    let ready = http_get(addr, "/readyz").map(|(s, _)| s);
    // Nor can it know that an agent it has not seen is offline: agents
    // reach a new replica only once its peers tell them of it.
    // A name no agent may register under is offline for sure.
    let get = |agent: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET /a/{agent}/web/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer dev-token\r\n\
             Connection: close\r\n\r\n"
        )
        .expect("write");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let unseen = get("ghost");
    let unknown = get("nobody");
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(up, "no tether_replica metric for pod-a:\n{log}");
    assert_eq!(ready, Some(503), "{log}");
    assert!(
        unseen.starts_with("HTTP/1.1 503")
            && unseen.contains("not_here")
            && unseen.contains("agent ghost has not reached it yet"),
        "an agent a new replica among peers has not seen is not_here, not offline:\n{unseen}\n{log}"
    );
    assert!(
        unknown.starts_with("HTTP/1.1 503") && unknown.contains("agent_offline"),
        "an agent name no agent may use is offline:\n{unknown}\n{log}"
    );
    assert!(
        log.contains(&format!("pod-a@127.0.0.1:{port}"))
            && log.contains("pod-b@127.0.0.12:7700")
            && log.contains("127.0.0.13:7700"),
        "the replica list should hold this replica and both peers:\n{log}"
    );
}

/// `tether status --watch` rides out a server that stops answering (a
/// replica restarting in a rollout): it says so and tries again at the next
/// tick instead of ending. A watch whose first fetch fails (a wrong name or
/// token) ends at once, as a single `tether status` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_keeps_watching_through_a_failed_fetch() {
    let mut t = Tunnel::start_with(&[], &["--admin", "dev"], &[]);
    let url = t.url();
    let status = |token: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
        c.args(["status", "--server", &url, "--token", token, "--watch", "1"]);
        c
    };
    let never = status("wrong").output().expect("run tether status");
    assert!(!never.status.success(), "a watch that never worked ends");
    assert!(
        String::from_utf8_lossy(&never.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&never.stderr)
    );
    let mut watch = status(CLIENT_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tether status --watch");
    std::thread::sleep(Duration::from_millis(1500));
    t.server.kill();
    let mut running = true;
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        running = watch.try_wait().expect("wait").is_none();
        if !running {
            break;
        }
    }
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(running, "the watch ended: {err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\x1b[2J"),
        "a table was shown first"
    );
    assert!(err.matches("trying again in 1 s").count() >= 2, "{err}");
}

/// `tether status --watch --json | head -1`: once the reader has its line
/// and goes, the watch ends quietly at its next write. Before, `print!`
/// panicked on the closed pipe (Rust ignores SIGPIPE): exit 101 and a
/// panic message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_ends_quietly_when_its_reader_goes() {
    use std::io::BufRead;
    let t = Tunnel::start_with(&[], &["--admin", "dev"], &[]);
    let url = t.url();
    let mut watch = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "status",
            "--server",
            &url,
            "--token",
            CLIENT_TOKEN,
            "--watch",
            "1",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tether status --watch --json");
    let stdout = watch.stdout.take().expect("stdout");
    let mut first = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut first)
        .expect("read the first snapshot");
    assert!(first.starts_with('{'), "{first}");
    // The reader (and with it the pipe) is gone now.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = watch.try_wait().expect("wait") {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    let status = status.expect("the watch went on writing to a closed pipe");
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
