//! Every process on several runtime threads: `TETHER_WORKER_THREADS`, which
//! the README suggests for a server on many cores. A session's reader,
//! writer and streams then run on different threads at once (on as many
//! CPUs as the machine has); the rest of the suite runs each process on one
//! thread, the default.

use crate::common::*;
use std::time::Duration;

const THREADS: &[(&str, &str)] = &[("TETHER_WORKER_THREADS", "4")];

/// Whether `p` said it runs its async runtime on `threads` threads.
fn runs_on(p: &Proc, threads: usize) -> bool {
    p.wait_log("runtime runs on several threads", Duration::from_secs(5))
        && p.log_text().lines().any(|l| {
            l.contains("runtime runs on several threads")
                && l.contains(&format!("threads={threads}"))
        })
}

/// `count` downloads of `/bytes?n=len` on one keep-alive connection by
/// curl, through the server's HTTP proxy; checks every byte.
fn proxied_downloads(server: std::net::SocketAddr, count: usize, len: usize) {
    let url = format!("http://{server}/a/prod/web/bytes?n={len}");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60", "-H"])
        .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
        .args(std::iter::repeat_n(&url, count))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), count * len, "downloaded length");
    for (i, body) in out.stdout.chunks(len).enumerate() {
        if let Some(at) = body
            .iter()
            .enumerate()
            .position(|(j, b)| *b != pattern_byte(j as u64))
        {
            panic!("download {i}: byte {at} differs");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_in_is_byte_exact_with_four_worker_threads_per_process() {
    let echo = echo_service().await;
    let app_port = free_port();
    let app = Proc::spawn_env(
        "sample-app",
        &[
            "sample-app".into(),
            "--listen".into(),
            format!("127.0.0.1:{app_port}"),
        ],
        THREADS,
    );
    assert!(app.wait_log("sample app listening", Duration::from_secs(10)));
    let listener_port = free_port();
    let t = Tunnel::start_with_env(
        &[("echo", echo)],
        &[
            "--listener",
            &format!("127.0.0.1:{listener_port}=prod/echo"),
        ],
        &["--service", &format!("web=http://127.0.0.1:{app_port}")],
        THREADS,
    );
    let forward_port = free_port();
    let client = forward_client_with_env(
        &t.url(),
        CLIENT_TOKEN,
        &[],
        &[(forward_port, "prod/echo")],
        THREADS,
    );
    assert!(client.wait_log("connected", Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            listener_port
        ))
        .is_ok()),
        "the listener was not bound"
    );
    // The setting took: each process says it runs four runtime threads.
    for p in [&t.server, &t.agent, &client, &app] {
        assert!(runs_on(p, 4), "{}: {}", p.name, p.log_text());
    }

    // All three ways in at once: a CLI forward (client, server and agent
    // threaded), a server listener, and HTTP downloads on keep-alive
    // connections through the proxy's pool.
    let server = t.server_addr();
    let http = (0..4)
        .map(|_| tokio::task::spawn_blocking(move || proxied_downloads(server, 4, 1 << 20)))
        .collect::<Vec<_>>();
    let within = Duration::from_secs(120);
    tokio::join!(
        echo_patterns(forward_port, 24, 2 << 20, 1000, within),
        echo_patterns(listener_port, 24, 2 << 20, 2000, within),
    );
    for h in http {
        h.await.unwrap();
    }
    // What stays: at most the proxy's pooled keep-alive connections, one
    // per curl connection.
    assert!(
        wait_until(Duration::from_secs(10), || t
            .server_metric("tether_live_streams")
            .is_some_and(|n| n <= 4.0)),
        "streams left behind: {:?}",
        t.server_metric("tether_live_streams")
    );
    for p in [&t.server, &t.agent, &client, &app] {
        let log = p.log_text();
        assert!(!log.contains("panicked"), "{}: {log}", p.name);
    }
}

/// `TETHER_WORKER_THREADS=auto`: a thread per core the process may use;
/// a value that is neither a number nor `auto` stops the process with a
/// message that says what it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_gives_a_thread_per_core_and_a_bad_value_is_named() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let echo = echo_service().await;
    let t = Tunnel::start_with_env(
        &[("echo", echo)],
        &[],
        &[],
        &[("TETHER_WORKER_THREADS", "auto")],
    );
    if cores > 1 {
        assert!(runs_on(&t.server, cores), "{}", t.server.log_text());
    }
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    assert_eq!(echo_through(port, b"auto\n").await, b"auto\n");

    let mut bad = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(Tunnel::server_args(free_port()))
        .env("TETHER_WORKER_THREADS", "lots")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tether runs");
    let exited = wait_until(Duration::from_secs(10), || {
        bad.try_wait().is_ok_and(|s| s.is_some())
    });
    if !exited {
        let _ = bad.kill();
    }
    let out = bad.wait_with_output().expect("tether's output");
    assert!(exited && !out.status.success(), "a bad setting was taken");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TETHER_WORKER_THREADS=\"lots\"") && err.contains("auto"),
        "{err}"
    );
}
