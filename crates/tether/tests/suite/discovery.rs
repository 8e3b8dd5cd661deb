//! Services discovered from the Kubernetes API, against a fake API server
//! (list and watch, a Service modified, 410 Gone, a dropped watch): an annotated Service appears
//! in the server's catalog and is reachable through the tunnel; deleted, it
//! disappears and opens are refused; the watch resumes after the API server
//! expires or drops it; the agent's allow list still applies.

use crate::common::ha::Dnsmasq;
use crate::common::kube::{service, FakeKube};
use crate::common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EXPOSE: (&str, &str) = ("tether.dev/expose", "true");

/// The services the console shows for agent prod (as client dev).
fn catalog(t: &Tunnel) -> Vec<String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "-H"])
        .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
        .arg(format!("http://127.0.0.1:{}/api/agents", t.server_port))
        .output()
        .expect("curl");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["name"] == "prod")
        .flat_map(|a| a["services"].as_array().cloned().unwrap_or_default())
        .map(|s| {
            format!(
                "{}:{}",
                s["name"].as_str().unwrap_or(""),
                s["kind"].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn wait_catalog(t: &Tunnel, what: &str, ok: impl Fn(&[String]) -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let c = catalog(t);
        if ok(&c) {
            return;
        }
        assert!(std::time::Instant::now() < end, "{what}: catalog is {c:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request through a forward of `target`: the echo comes back.
async fn echoes(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"hello").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"hello"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_follow_the_kubernetes_api_through_expiry_and_drops() {
    let dir = std::env::temp_dir().join(format!(
        "tether-kube-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let web = echo_service().await;
    let later = echo_service().await;
    let dns_port = free_port();
    let _dns = Dnsmasq::start(
        &dir,
        dns_port,
        "127.0.0.1 web.default.svc.cluster.test\n127.0.0.1 later.default.svc.cluster.test\n\
         127.0.0.1 again.default.svc.cluster.test\n127.0.0.1 outside.default.svc.cluster.test\n",
    );
    let kube = FakeKube::start("default").await;
    kube.apply(
        service("default", "web", &[EXPOSE], &[("", web.port(), "TCP")]),
        false,
    );
    // Not annotated: not published.
    kube.apply(
        service("default", "hidden", &[], &[("", web.port(), "TCP")]),
        false,
    );
    let cfg = format!(
        r#"
dns_server = "127.0.0.1:{dns_port}"
# What discovery may publish is bounded by the allow list: the test
# services listen on loopback, which needs an explicit rule; port 9 is not
# allowed.
allow = ["*.svc.cluster.test:*", "127.0.0.1:{web_port}", "127.0.0.1:{later_port}"]

[kubernetes]
namespaces = ["default"]
cluster_domain = "cluster.test"
kubeconfig = "{kubeconfig}"
"#,
        web_port = web.port(),
        later_port = later.port(),
        kubeconfig = kube.kubeconfig(&dir).display(),
    );
    let cfg_path = dir.join("agent.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let t = Tunnel::start(&[], &["--config", cfg_path.to_str().unwrap()]);

    // Listed at start: the annotated Service only.
    wait_catalog(&t, "web is published", |c| c == ["web:tcp"]);
    let (p_web, p_later, p_again, p_outside) = (free_port(), free_port(), free_port(), free_port());
    let client = t.client(
        CLIENT_TOKEN,
        &[
            (p_web, "prod/web"),
            (p_later, "prod/later"),
            (p_again, "prod/again"),
            (p_outside, "prod/outside"),
        ],
    );
    assert!(echoes(p_web).await, "web is reachable through the tunnel");

    // Added while watched: published, reachable.
    kube.apply(
        service(
            "default",
            "later",
            &[EXPOSE],
            &[("http", later.port(), "TCP")],
        ),
        false,
    );
    wait_catalog(&t, "later appears", |c| {
        c.contains(&"later:http".to_owned())
    });
    assert!(echoes(p_later).await, "later is reachable");

    // Published, but its address is outside the agent's allow list.
    kube.apply(
        service("default", "outside", &[EXPOSE], &[("", 9, "TCP")]),
        false,
    );
    wait_catalog(&t, "outside appears", |c| {
        c.contains(&"outside:tcp".to_owned())
    });
    assert!(!echoes(p_outside).await, "the allow list still applies");
    assert!(
        t.agent.wait_log(
            "open refused: outside.default.svc.cluster.test resolves to 127.0.0.1",
            Duration::from_secs(5)
        ),
        "the refusal names the address and the rule it needs"
    );

    // Modified (a watch sees MODIFIED): the published kind follows the
    // Service's new annotation, under the same name.
    kube.apply(
        service(
            "default",
            "outside",
            &[EXPOSE, ("tether.dev/kind", "http")],
            &[("", 9, "TCP")],
        ),
        false,
    );
    wait_catalog(&t, "outside changes kind", |c| {
        c.contains(&"outside:http".to_owned()) && !c.contains(&"outside:tcp".to_owned())
    });

    // Deleted: gone from the catalog, and opens are refused.
    kube.delete("web");
    wait_catalog(&t, "web disappears", |c| !c.contains(&"web:tcp".to_owned()));
    assert!(!echoes(p_web).await, "a deleted service is not reachable");
    assert!(t
        .agent
        .wait_log("no service named \"web\"", Duration::from_secs(5)));

    // The API server expires the watch (410 Gone) while a Service is
    // added that no watch saw: the agent lists again and finds it.
    let lists = kube.lists();
    kube.apply(
        service("default", "again", &[EXPOSE], &[("", later.port(), "TCP")]),
        true,
    );
    kube.expire_watches();
    wait_catalog(&t, "again appears after the relist", |c| {
        c.contains(&"again:tcp".to_owned())
    });
    assert!(kube.lists() > lists, "a 410 makes the agent list again");
    assert!(echoes(p_again).await, "again is reachable");

    // The API server drops the watch: the agent watches again and keeps
    // following changes.
    // (A change while no watch is open reaches the next watch, which starts
    // from the last version the agent saw.)
    let watches = kube.watches_started();
    kube.drop_watches();
    kube.delete("later");
    assert!(
        wait_until(Duration::from_secs(15), || kube.watches_started() > watches),
        "the agent watches again after a dropped connection"
    );
    wait_catalog(&t, "later disappears after the drop", |c| {
        !c.contains(&"later:http".to_owned())
    });
    assert!(catalog(&t).contains(&"again:tcp".to_owned()));
    drop(client);
}

/// A fake API server whose namespace `shop` holds the annotated Service
/// `db`, and a tunnel whose agent watches it with `kubernetes` (more
/// `[kubernetes]` lines) and `env`; its files go in a directory of its own
/// (`test` names it), which the caller removes.
async fn shop_db_watched_with(
    test: &str,
    kubernetes: &str,
    env: &[(&str, &str)],
) -> (Tunnel, FakeKube, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "tether-kube-{test}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let kube = FakeKube::start("shop").await;
    kube.apply(
        service("shop", "db", &[EXPOSE], &[("", 5432, "TCP")]),
        false,
    );
    let cfg = format!(
        r#"
allow = ["*.svc.cluster.test:*"]

[kubernetes]
{kubernetes}cluster_domain = "cluster.test"
kubeconfig = "{kubeconfig}"
"#,
        kubeconfig = kube.kubeconfig(&dir).display(),
    );
    let cfg_path = dir.join("agent.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let t = Tunnel::start_with_env(&[], &[], &["--config", cfg_path.to_str().unwrap()], env);
    (t, kube, dir)
}

/// With no namespaces configured and no pod namespace (an agent run outside
/// the cluster with a kubeconfig), the kubeconfig context's namespace is
/// watched, not "default".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_namespaces_the_kubeconfig_context_namespace_is_watched() {
    let (t, _kube, dir) = shop_db_watched_with("ctx", "", &[]).await;
    wait_catalog(&t, "db in the context's namespace is published", |c| {
        c == ["db:tcp"]
    });
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A namespace the API server will not list (403: no Role there) is tried
/// again with a growing wait, not every 0.8 s for good, and said once in
/// the log (kube-runtime's own warning at each retry is kept out); the
/// namespace beside it is published all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_cannot_be_listed_is_retried_with_a_growing_wait() {
    let (t, kube, dir) = shop_db_watched_with(
        "fail",
        "namespaces = [\"shop\", \"vault\"]\n",
        // The default log filter (no RUST_LOG), as deployed.
        &[("RUST_LOG", "")],
    )
    .await;
    wait_catalog(&t, "db in shop is published beside vault", |c| {
        c == ["db-shop:tcp"]
    });
    // 0.8 s doubling (each a random point in its upper half): at most 5
    // lists in 8 s. A wait that never grows lists 10 times.
    let vault = "/api/v1/namespaces/vault/services";
    let before = kube.requests_for(vault);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let lists = kube.requests_for(vault) - before;
    let metrics = http_get(t.agent_metrics, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let log = t.agent.log_text();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("vault"))
        .count();
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        lists <= 6,
        "{lists} lists of vault in 8 s after it first failed:\n{log}"
    );
    assert!(lists >= 1, "vault was not tried again:\n{log}");
    assert_eq!(warned, 1, "one warning for the same error:\n{log}");
    // And the agent's metrics say so.
    assert_eq!(
        metric(&metrics, "tether_agent_discovery_namespaces_failing"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tether_agent_discovered_services"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "tether_agent_discovery_errors_total").is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
}
