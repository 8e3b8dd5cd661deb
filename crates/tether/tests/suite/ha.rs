//! High availability, for real on one machine: three server replicas on
//! their own loopback addresses (127.0.N.11-13, one block per test), HAProxy
//! in front (127.0.N.10: a clients frontend health-checked on `/readyz`
//! with `disable-on-404`, an agents frontend on `/livez`), two instances of
//! agent `prod` (`--instance a1`, `a2`) holding a session to every replica,
//! and clients through HAProxy or pinned to one replica. The cases are
//! those of `shared/design/high-availability.md`, "Testing it for real on
//! one machine": a kill -9, a rolling restart under load, a partition
//! between the agents and one replica (network namespaces), and a scale-up
//! found through DNS (dnsmasq). See `common/ha.rs` for the harness.

use crate::common::ha::*;
use crate::common::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream as StdStream};
use std::process::Command;
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The ok/failed summary of load loops, and their first failures.
fn report(stats: &[&LoadStats]) -> String {
    stats
        .iter()
        .map(|s| format!("{}\n{}", s.summary(), s.failures_text(20)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_agent_instance_holds_a_session_to_every_replica() {
    const T: &str = "every_agent_instance_holds_a_session_to_every_replica";
    if !require_tool(T, "haproxy", "haproxy") {
        return;
    }
    let svc = HaServices::start();
    let mut spec = ClusterSpec::loopback("sessions", 71, svc.agent_services());
    spec.server_args = vec!["--admin".into(), "dev".into()];
    let c = Cluster::start(spec);
    eprintln!(
        "{T}: every replica held both agent instances {:.0} ms after the agents started",
        ms(c.agents_settled)
    );
    assert!(
        c.agents_settled <= Duration::from_secs(10),
        "the replicas showed tether_agent_instances{{agent=\"prod\"}} 2 only after {:?} (> 10 s)\n{}",
        c.agents_settled,
        c.diag()
    );
    for a in &c.agents {
        assert_eq!(
            a.replica_sessions(),
            Some(3.0),
            "agent {}: tether_agent_replica_sessions\n{}",
            a.instance,
            c.diag()
        );
        assert_eq!(
            a.metric("tether_agent_replicas_missing"),
            Some(0.0),
            "agent {}: tether_agent_replicas_missing\n{}",
            a.instance,
            c.diag()
        );
        assert_eq!(
            a.readyz(),
            Some(200),
            "agent {}: /readyz with a session to every replica\n{}",
            a.instance,
            c.diag()
        );
    }

    // Each replica, reached directly, serves a browser request and a CLI
    // forward (its agent sessions were dialed at its own address, with the
    // certificate of the load balancer's name).
    for i in 0..c.replicas.len() {
        let id = c.replicas[i].id.clone();
        let body = c
            .browser_get(Via::Replica(i), &format!("/direct-{id}"))
            .unwrap_or_else(|e| panic!("browser request straight to {id}: {e}\n{}", c.diag()));
        assert!(body.contains(&format!("GET /direct-{id} ")), "{body}");
        let port = free_port();
        let client = c.client(Via::Replica(i), &[(port, "prod/echo")]);
        let msg = format!("hello {id}");
        echo_once(port, msg.as_bytes(), Duration::from_secs(10)).unwrap_or_else(|e| {
            panic!(
                "CLI forward pinned to {id}: {e}\n{}\n{}",
                client.log_text(),
                c.diag()
            )
        });
    }

    // Through HAProxy: browser requests (round robin over the replicas)
    // and a CLI forward.
    for n in 0..6 {
        c.browser_get(Via::Lb, &format!("/lb-{n}"))
            .unwrap_or_else(|e| panic!("browser request {n} through HAProxy: {e}\n{}", c.diag()));
    }
    let served: Vec<u64> = c
        .replicas
        .iter()
        .map(|r| {
            c.haproxy
                .server("clients", &r.id)
                .map(|s| s.total)
                .unwrap_or(0)
        })
        .collect();
    assert!(
        served.iter().all(|n| *n > 0),
        "HAProxy did not spread connections over every replica: {served:?}\n{}",
        c.diag()
    );
    let port = free_port();
    let client = c.client(Via::Lb, &[(port, "prod/echo")]);
    for n in 0..10 {
        echo_once(
            port,
            format!("via lb {n}").as_bytes(),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| {
            panic!(
                "CLI forward through HAProxy, request {n}: {e}\n{}\n{}",
                client.log_text(),
                c.diag()
            )
        });
    }

    // `tether status` through HAProxy (a new replica per connection): every
    // part of a snapshot comes from one replica.
    for n in 0..4 {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["status", "--json", "--server", &c.lb_url(), "--ca-file"])
            .arg(&c.pki.ca)
            .args(["--token", CLIENT_TOKEN])
            .output()
            .expect("run tether status");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "tether status {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("--json prints JSON");
        let replicas: Vec<&str> = ["status", "agents", "sessions", "streams"]
            .iter()
            .map(|p| v[p]["replica"].as_str().unwrap_or("?"))
            .collect();
        assert!(
            replicas.iter().all(|r| *r == replicas[0]),
            "tether status {n} mixed replicas: {replicas:?}"
        );
    }

    // The pool: four streams open at once on one replica are spread over
    // both instances (least loaded first).
    let before: Vec<f64> = c
        .agents
        .iter()
        .map(|a| a.metric("tether_agent_live_streams").unwrap_or(-1.0))
        .collect();
    let mut held = Vec::new();
    for n in 0..4u8 {
        let mut s = StdStream::connect(("127.0.0.1", port)).expect("connect to the forward");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[b'h', b'o', b'l', b'0' + n]).unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("held stream {n}: {e}\n{}", c.diag()));
        held.push(s);
    }
    let live = || -> Vec<f64> {
        c.agents
            .iter()
            .map(|a| a.metric("tether_agent_live_streams").unwrap_or(-1.0))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || live().iter().all(|n| *n >= 1.0)),
        "4 concurrent streams were not spread over both agent instances: live streams {:?} (before: {before:?})\n{}",
        live(),
        c.diag()
    );
    drop(held);
}

#[test]
fn kill_9_of_a_replica_loses_only_its_own_connections() {
    const T: &str = "kill_9_of_a_replica_loses_only_its_own_connections";
    if !require_tool(T, "haproxy", "haproxy") {
        return;
    }
    let svc = HaServices::start();
    let mut c = Cluster::start(ClusterSpec::loopback("kill9", 72, svc.agent_services()));
    let tl = Timeline::new();

    // A CLI client that came through HAProxy and landed on r2.
    let lb_port = free_port();
    let lb_on_r2 = c.lb_client_on(1, &[(lb_port, "prod/echo")]);
    echo_once(lb_port, b"before", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("echo through the client on r2: {e}\n{}", c.diag()));

    // One 60 MB transfer pinned to each replica, read up to half.
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let pinned: Vec<Proc> = (0..3)
        .map(|i| c.client(Via::Replica(i), &[(ports[i], "prod/src")]))
        .collect();
    let mut dl: Vec<Download> = ports
        .iter()
        .map(|p| Download::open(*p, SRC_LEN, 65536))
        .collect();
    for (i, d) in dl.iter_mut().enumerate() {
        d.read_until(SRC_LEN / 2, Duration::from_secs(60));
        assert!(
            d.check.total == SRC_LEN / 2 && d.check.ok,
            "transfer via {}: {} bytes by halfway (ok={}, ended={:?})\n{}\n{}",
            c.replicas[i].id,
            d.check.total,
            d.check.ok,
            d.ended,
            pinned[i].log_text(),
            c.diag()
        );
    }
    tl.note("three transfers at 30 MB");

    let killed_at = Instant::now();
    c.replicas[1].kill9();
    tl.note("kill -9 r2");

    let browser = c.browser();
    let (http, lb_back, r2_cut) = std::thread::scope(|s| {
        // New connections through HAProxy right after the kill.
        let http = s.spawn(|| {
            let mut first_ok = None;
            let mut failed = Vec::new();
            let mut n = 0;
            while killed_at.elapsed() < Duration::from_secs(3) {
                match browser.get(Via::Lb, &format!("/after-kill-{n}")) {
                    Ok(_) => {
                        first_ok.get_or_insert(killed_at.elapsed());
                    }
                    Err(e) => failed.push(format!("{:?}: {e}", killed_at.elapsed())),
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (first_ok, failed, n)
        });
        // The client that was on r2: a new local connection right away,
        // served as soon as it has a new session (through HAProxy).
        let lb_back = s.spawn(|| {
            let mut errors = Vec::new();
            while killed_at.elapsed() < Duration::from_secs(6) {
                match echo_once(lb_port, b"after", Duration::from_secs(6)) {
                    Ok(()) => return (Some(killed_at.elapsed()), errors),
                    Err(e) => errors.push(format!("{:?}: {e}", killed_at.elapsed())),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (None, errors)
        });
        // r2's own transfer is cut, and its client sees it at once.
        dl[1].read_to_end(Duration::from_secs(5));
        let r2_cut = (dl[1].ended.is_some(), killed_at.elapsed());
        (
            http.join().expect("http probe"),
            lb_back.join().expect("lb probe"),
            r2_cut,
        )
    });
    tl.note(format!(
        "after the kill: first new connection through HAProxy ok at {:?} ({} requests, {} failed); \
         the client that was on r2 served again at {:?}; r2's transfer ended={} at {:?}",
        http.0,
        http.2,
        http.1.len(),
        lb_back.0,
        r2_cut.0,
        r2_cut.1
    ));
    assert!(
        http.0.is_some_and(|t| t <= Duration::from_secs(1)),
        "no new connection through HAProxy succeeded within 1 s of the kill: first ok {:?}, failures {:?}\n{}",
        http.0,
        http.1,
        c.diag()
    );
    assert!(
        http.1.is_empty(),
        "new connections through HAProxy failed after the kill (redispatch should hide r2): {:?}\n{}",
        http.1,
        c.diag()
    );
    assert!(
        lb_back.0.is_some_and(|t| t <= Duration::from_secs(2)),
        "the client that was on r2 was not served again within 2 s: {:?}, errors {:?}\n{}\n{}",
        lb_back.0,
        lb_back.1,
        lb_on_r2.log_text(),
        c.diag()
    );
    assert!(
        r2_cut.0 && r2_cut.1 <= Duration::from_secs(1) && dl[1].check.total < SRC_LEN,
        "the transfer through r2 should end within 1 s of the kill: ended={} after {:?}, {} bytes\n{}",
        r2_cut.0,
        r2_cut.1,
        dl[1].check.total,
        pinned[1].log_text()
    );

    // r2 comes back: not ready at first, then both agent instances within 5 s
    // of it listening.
    c.replicas[1].start();
    tl.note("r2 started again");
    let mut first_readyz = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            first_readyz = c.replicas[1].readyz();
            first_readyz.is_some()
        }),
        "r2's metrics port does not answer after the restart\n{}",
        c.diag()
    );
    assert_eq!(
        first_readyz,
        Some(503),
        "a replica that just started must not be ready yet\n{}",
        c.diag()
    );
    assert!(
        wait_until(Duration::from_secs(10), || c.replicas[1].listening()),
        "r2 does not listen after the restart\n{}",
        c.diag()
    );
    let listening = Instant::now();
    tl.note("r2 listening");
    let back = wait_until(Duration::from_secs(10), || {
        c.replicas[1].instances() == Some(2.0)
    });
    let took = listening.elapsed();
    tl.note(format!(
        "r2 holds both agent instances: {back} after {took:?}"
    ));
    assert!(
        back && took <= Duration::from_secs(5),
        "r2 did not hold both agent instances within 5 s of listening (after {took:?}: {back})\n{}\n{}",
        tl.render(),
        c.diag()
    );
    c.wait_in_rotation(1, Duration::from_secs(25));

    // The transfers through r1 and r3 finish, byte-exact.
    for i in [0, 2] {
        let d = &mut dl[i];
        d.read_to_end(Duration::from_secs(60));
        assert!(
            matches!(d.ended, Some(Ok(()))) && d.check.total == SRC_LEN && d.check.ok,
            "transfer via {}: {} of {SRC_LEN} bytes, bytes ok={}, end {:?}\n{}\n{}\n{}",
            c.replicas[i].id,
            d.check.total,
            d.check.ok,
            d.ended,
            tl.render(),
            pinned[i].log_text(),
            c.diag()
        );
    }
    for a in &c.agents {
        assert_eq!(
            a.replica_sessions(),
            Some(3.0),
            "agent {} after r2's return\n{}",
            a.instance,
            c.diag()
        );
    }
    eprintln!("{T}: timeline\n{}", tl.render());
}

#[test]
fn rolling_restart_under_load_loses_no_request() {
    const T: &str = "rolling_restart_under_load_loses_no_request";
    if !require_tool(T, "haproxy", "haproxy") {
        return;
    }
    let svc = HaServices::start();
    let mut spec = ClusterSpec::loopback("rolling", 73, svc.agent_services());
    spec.server_args = ["--shutdown-delay-ms", "2000", "--drain-timeout-ms", "15000"]
        .map(String::from)
        .to_vec();
    let mut c = Cluster::start(spec);
    let tl = Timeline::new();

    let echo_port = free_port();
    let lb_client = c.client(Via::Lb, &[(echo_port, "prod/echo")]);
    let slow_port = free_port();
    let slow_client = c.client(Via::Replica(0), &[(slow_port, "prod/slow")]);
    echo_once(echo_port, b"warm-up", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("warm-up echo: {e}\n{}", c.diag()));
    c.browser_get(Via::Lb, "/warm-up")
        .unwrap_or_else(|e| panic!("warm-up browser request: {e}\n{}", c.diag()));

    // Load: a new connection per request, until stopped (at most 100 s).
    let max = Duration::from_secs(100);
    let echo = Load::start(
        "echo via CLI forward via HAProxy",
        &tl,
        Duration::from_millis(5),
        max,
        move |n| {
            echo_once(
                echo_port,
                format!("request {n}\n").as_bytes(),
                Duration::from_secs(15),
            )
        },
    );
    let browser = c.browser();
    let http = Load::start(
        "HTTP via the browser proxy via HAProxy",
        &tl,
        Duration::from_millis(5),
        max,
        move |n| browser.get(Via::Lb, &format!("/roll-{n}")).map(|_| ()),
    );
    tl.note("load started");
    std::thread::sleep(Duration::from_secs(2));

    // A 10 s stream through r1, started before r1 is told to stop.
    let mut slow = Download::open(slow_port, SLOW_SEED, SLOW_CHUNK);
    slow.read_until(SLOW_CHUNK as u64, Duration::from_secs(10));
    assert_eq!(
        slow.check.total,
        SLOW_CHUNK as u64,
        "the slow stream through r1 did not start\n{}\n{}",
        slow_client.log_text(),
        c.diag()
    );
    tl.note("slow stream through r1 started");
    let slow_reader = std::thread::spawn(move || {
        slow.read_to_end(Duration::from_secs(40));
        // Close our side too, as a program would at EOF: a half-closed
        // stream would hold r1's drain until its deadline.
        let _ = slow.sock.shutdown(std::net::Shutdown::Both);
        slow
    });

    // Replicas, one after another: SIGTERM, exit 0 within delay + drain +
    // 1 s, start again, ready, back in HAProxy, holding both agents.
    for i in 0..3 {
        c.restart_replica(i, Duration::from_secs(2 + 15 + 1), &tl);
    }
    // Then the agent instances, one after another.
    for k in 0..2 {
        c.restart_agent(k, &tl);
    }
    std::thread::sleep(Duration::from_secs(2));
    let echo = echo.stop();
    let http = http.stop();
    tl.note("load stopped");
    let slow = slow_reader.join().expect("slow reader");
    let total = (SLOW_CHUNKS * SLOW_CHUNK) as u64;
    let summary = report(&[&echo, &http]);
    eprintln!("{T}:\n{summary}\ntimeline:\n{}", tl.render());

    assert!(
        matches!(slow.ended, Some(Ok(()))) && slow.check.total == total && slow.check.ok,
        "the 10 s stream started through r1 before its SIGTERM: {} of {total} bytes, bytes ok={}, end {:?}\n{}\n{}",
        slow.check.total,
        slow.check.ok,
        slow.ended,
        slow_client.log_text(),
        c.diag()
    );
    assert!(
        echo.failures.is_empty() && http.failures.is_empty(),
        "requests failed during the rolling restart:\n{summary}\ntimeline:\n{}\n--- client through HAProxy ---\n{}\n{}",
        tl.render(),
        lb_client.log_lines(&["WARN", "ERROR", "GOAWAY", "connected"], 40),
        c.diag()
    );
    assert!(
        echo.total() >= 200 && http.total() >= 50,
        "too little load to mean anything:\n{summary}"
    );
    // No stream had to be cut at a drain deadline.
    for r in &c.replicas {
        for p in &r.retired {
            let cut = p.log_lines(&["drain deadline", "drain_timeout:"], 5);
            assert!(
                cut.is_empty(),
                "{}: streams cut at the drain deadline:\n{cut}",
                p.name
            );
        }
    }
}

#[test]
fn a_partitioned_replica_stops_getting_opens_and_recovers() {
    const T: &str = "a_partitioned_replica_stops_getting_opens_and_recovers";
    if !is_root() {
        assert!(
            !under_ci(),
            "{T}: network namespaces need root (CI runs as root)"
        );
        eprintln!("SKIPPED {T}: network namespaces need root");
        return;
    }
    if !require_tool(T, "haproxy", "haproxy")
        || !require_tool(T, "curl", "curl")
        || !require_tool(T, "ip", "iproute2")
    {
        return;
    }
    // Servers, HAProxy and clients in one namespace, the agents in another,
    // joined by two veth pairs: r2's address is reachable from the agents
    // over the second pair only.
    //
    //   agents 10.201.1.1 --va1/vs1-- 10.201.1.2 servers: lb .9.10, r1 .9.11, r3 .9.13
    //          10.201.2.1 --va2/vs2-- 10.201.2.2          r2 .9.12
    let srv_ns = Netns::create("s");
    let agt_ns = Netns::create("a");
    let (s, a) = (srv_ns.name.as_str(), agt_ns.name.as_str());
    for (ours, theirs) in [("va1", "vs1"), ("va2", "vs2")] {
        ip(&[
            "link", "add", ours, "netns", a, "type", "veth", "peer", "name", theirs, "netns", s,
        ]);
    }
    ip(&["-n", a, "addr", "add", "10.201.1.1/24", "dev", "va1"]);
    ip(&["-n", s, "addr", "add", "10.201.1.2/24", "dev", "vs1"]);
    ip(&["-n", a, "addr", "add", "10.201.2.1/24", "dev", "va2"]);
    ip(&["-n", s, "addr", "add", "10.201.2.2/24", "dev", "vs2"]);
    for (ns, dev) in [(a, "va1"), (s, "vs1"), (a, "va2"), (s, "vs2")] {
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    for host in 10..=13 {
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("10.201.9.{host}/32"),
            "dev",
            "lo",
        ]);
    }
    for host in [10, 11, 13] {
        ip(&[
            "-n",
            a,
            "route",
            "add",
            &format!("10.201.9.{host}/32"),
            "via",
            "10.201.1.2",
        ]);
    }
    let r2_route = [
        "-n",
        a,
        "route",
        "replace",
        "10.201.9.12/32",
        "via",
        "10.201.2.2",
    ];
    ip(&r2_route);

    let web_port = free_port();
    let spec = ClusterSpec {
        tag: "partition".into(),
        lb: IpAddr::from([10, 201, 9, 10]),
        replica_ips: (11..=13).map(|h| IpAddr::from([10, 201, 9, h])).collect(),
        start_replicas: 3,
        // The agents reach r2 over the second pair only, never through
        // HAProxy (which sits next to r2).
        lb_agents_skip: vec![1],
        peers: Peers::Static,
        server_args: Vec::new(),
        agents: 2,
        services: vec![
            format!("web=http://127.0.0.1:{web_port}"),
            format!("webtcp=127.0.0.1:{web_port}"),
        ],
        // The agents' own view of a silent session is bounded by their idle
        // timeout (30 s by default); this test is about the servers'.
        agent_args: ["--heartbeat-ms", "1000", "--idle-timeout-ms", "5000"]
            .map(String::from)
            .to_vec(),
        server_net: srv_ns.net(),
        agent_net: agt_ns.net(),
        web_marker: "tether sample app".into(),
    };
    let c = Cluster::start(spec);
    let app = Proc::spawn_in(
        &agt_ns.net(),
        &c.dir.path,
        "sample-app",
        &[
            "sample-app".into(),
            "--listen".into(),
            format!("127.0.0.1:{web_port}"),
        ],
    );
    assert!(app.wait_log("sample app listening", Duration::from_secs(10)));
    let tl = Timeline::new();

    // The CLI client whose session (through HAProxy) is on r2.
    let fwd = free_port();
    let lb_on_r2 = c.lb_client_on(1, &[(fwd, "prod/webtcp")]);
    let net = srv_ns.net();
    forward_get(&net, fwd, "tether sample app")
        .unwrap_or_else(|e| panic!("warm-up through the forward: {e}\n{}", c.diag()));
    c.browser_get(Via::Lb, "/")
        .unwrap_or_else(|e| panic!("warm-up browser request: {e}\n{}", c.diag()));

    let max = Duration::from_secs(80);
    let cli_net = net.clone();
    let cli = Load::start(
        "CLI forward via HAProxy (session on r2)",
        &tl,
        Duration::from_millis(20),
        max,
        move |_| forward_get(&cli_net, fwd, "tether sample app"),
    );
    let browser = c.browser();
    let http = Load::start(
        "HTTP via the browser proxy via HAProxy",
        &tl,
        Duration::from_millis(20),
        max,
        move |_| browser.get(Via::Lb, "/").map(|_| ()),
    );
    std::thread::sleep(Duration::from_secs(3));

    ip(&["-n", a, "link", "set", "va2", "down"]);
    let parted = tl.start().elapsed();
    tl.note("link to r2 down on the agents' side");
    // Watch r2 and the agents while the link is down.
    let mut r2_dropped = None;
    let mut seen = Vec::new();
    // Long enough for a request already carrying bytes at the cut to time
    // out (curl's 15 s) and the next ones to probe r2's sessions, also on a
    // loaded machine.
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        let r2 = c.replicas[1].instances();
        let sessions: Vec<Option<f64>> = c.agents.iter().map(|a| a.replica_sessions()).collect();
        let at = tl.start().elapsed() - parted;
        if r2_dropped.is_none() && r2.is_some_and(|n| n < 2.0) {
            r2_dropped = Some(at);
            tl.note(format!("r2 holds {r2:?} agent instances"));
        }
        if seen
            .last()
            .is_none_or(|(_, a, b)| (*a, b) != (r2, &sessions))
        {
            seen.push((at, r2, sessions));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen_text = seen
        .iter()
        .map(|(t, r2, s)| {
            format!(
                "  +{:.1}s r2 instances {r2:?}, agents' replica sessions {s:?}",
                t.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");

    ip(&["-n", a, "link", "set", "va2", "up"]);
    // Taking the link down removed the route through it.
    assert!(
        wait_until(Duration::from_secs(5), || Command::new("ip")
            .args(r2_route)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())),
        "cannot restore the route to r2"
    );
    let healed = Instant::now();
    let healed_at = tl.start().elapsed();
    tl.note("link to r2 up again");
    let back = wait_until(Duration::from_secs(15), || {
        c.agents.iter().all(|a| a.replica_sessions() == Some(3.0))
            && c.replicas[1].instances() == Some(2.0)
    });
    let took = healed.elapsed();
    tl.note(format!(
        "agents hold all 3 replicas again: {back} after {took:?}"
    ));
    std::thread::sleep(Duration::from_secs(3));
    let cli = cli.stop();
    let http = http.stop();
    let summary = report(&[&cli, &http]);
    eprintln!(
        "{T}:\n{summary}\nr2 dropped an agent session {r2_dropped:?} after the cut\n{seen_text}\n\
         CLI requests ok during the partition: {}\nHTTP requests ok during the partition: {}\ntimeline:\n{}",
        cli.ok_between(parted, healed_at),
        http.ok_between(parted, healed_at),
        tl.render()
    );
    assert!(
        back,
        "the agents did not hold sessions to all 3 replicas within 15 s of the link coming back\n{}\n{}",
        tl.render(),
        c.diag()
    );
    assert!(
        r2_dropped.is_some(),
        "r2 never noticed that its agent sessions went silent (opens unanswered for 2 s should \
         trigger a PING, and no PONG in 2 s end the session)\n{seen_text}\n{}\n{}",
        tl.render(),
        c.diag()
    );
    assert!(
        http.ok_between(parted, healed_at) >= 3,
        "browser requests through HAProxy stalled while r2 was cut off: {} ok during the 30 s partition\n{summary}\n{}",
        http.ok_between(parted, healed_at),
        c.diag()
    );
    // No open through HAProxy may fail: an open waiting for OPEN_OK on a
    // session that turns out dead is retried on another member, then
    // refused `not_here`, which the client retries elsewhere. (A stream
    // already carrying bytes when the link went down may be lost with its
    // session; that is a request begun before the cut.)
    let refused = lb_on_r2.log_lines(&["cannot open"], 20);
    let late: Vec<_> = cli.failures.iter().filter(|(t, _)| *t >= parted).collect();
    assert!(
        refused.is_empty() && late.is_empty(),
        "CLI opens through HAProxy failed while r2 was cut off from the agents (pending opens must \
         be retried, not_here retried by the client):\n--- refused opens (client log) ---\n{refused}\n\
         --- failed requests begun after the cut ---\n{late:?}\n{summary}\n{}\n{}",
        lb_on_r2.log_lines(&["WARN", "ERROR", "not_here", "connected"], 40),
        c.diag()
    );
    // Opens kept succeeding during the partition: an open sent to a dead
    // session costs at most the detection (2 s to a PING, 2 s to give up)
    // per agent instance, then `not_here` and a retry elsewhere. (A request
    // already carrying bytes at the cut waits for curl's 15 s limit: its
    // session is found dead only when an open probes it.)
    let slowest = cli.percentile(100.0);
    assert!(
        cli.ok_between(parted, healed_at) >= 3 && slowest <= Duration::from_secs(16),
        "CLI requests through HAProxy stalled while r2 was cut off: {} ok during the 30 s partition, \
         slowest {slowest:?}; r2 dropped an agent session after {r2_dropped:?}\n{seen_text}\n{summary}\n{}\n{}",
        cli.ok_between(parted, healed_at),
        lb_on_r2.log_lines(&["WARN", "ERROR", "not_here", "connected"], 40),
        c.diag()
    );
    drop(c);
    drop(app);
}

#[test]
fn scale_up_from_two_to_three_replicas_under_load() {
    const T: &str = "scale_up_from_two_to_three_replicas_under_load";
    if !require_tool(T, "haproxy", "haproxy") || !require_tool(T, "dnsmasq", "dnsmasq-base") {
        return;
    }
    let svc = HaServices::start();
    let dns_dir = TestDir::new("scale-dns");
    let dns_port = free_udp_port();
    let name = "replicas.tether.test";
    let mut spec = ClusterSpec::loopback("scale", 75, svc.agent_services());
    let hosts = |n: usize| -> String {
        spec.replica_ips[..n]
            .iter()
            .map(|ip| format!("{ip} {name}\n"))
            .collect()
    };
    let (two, three) = (hosts(2), hosts(3));
    let dns = Dnsmasq::start(&dns_dir.path, dns_port, &two);
    spec.start_replicas = 2;
    spec.peers = Peers::Dns {
        name: name.into(),
        server: SocketAddr::from(([127, 0, 0, 1], dns_port)),
    };
    let mut c = Cluster::start(spec);
    let tl = Timeline::new();
    assert!(
        wait_until(Duration::from_secs(5), || c
            .haproxy
            .status("clients", "r3")
            .is_some_and(|s| s.starts_with("DOWN"))),
        "HAProxy should have r3 down before it starts\n{}",
        c.diag()
    );

    let echo_port = free_port();
    let lb_client = c.client(Via::Lb, &[(echo_port, "prod/echo")]);
    let max = Duration::from_secs(60);
    let echo = Load::start(
        "echo via CLI forward via HAProxy",
        &tl,
        Duration::from_millis(5),
        max,
        move |n| {
            echo_once(
                echo_port,
                format!("request {n}\n").as_bytes(),
                Duration::from_secs(15),
            )
        },
    );
    let browser = c.browser();
    let http = Load::start(
        "HTTP via the browser proxy via HAProxy",
        &tl,
        Duration::from_millis(5),
        max,
        move |n| browser.get(Via::Lb, &format!("/scale-{n}")).map(|_| ()),
    );
    std::thread::sleep(Duration::from_secs(2));

    dns.set_hosts(&three);
    tl.note("r3 added to the DNS name");
    c.replicas[2].start();
    let started = Instant::now();
    tl.note("r3 started");
    let got = wait_until(Duration::from_secs(15), || {
        c.replicas[2].instances() == Some(2.0)
    });
    let took = started.elapsed();
    tl.note(format!(
        "r3 holds both agent instances: {got} after {took:?}"
    ));
    assert!(
        got,
        "r3 did not hold both agent instances within 15 s of starting\n{}\n{}\n--- dnsmasq queries ---\n{}",
        tl.render(),
        c.diag(),
        dns.log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    c.wait_in_rotation(2, Duration::from_secs(25));
    tl.note("r3 ready and UP in HAProxy");
    for a in &c.agents {
        assert_eq!(
            a.replica_sessions(),
            Some(3.0),
            "agent {} after the scale-up\n{}",
            a.instance,
            c.diag()
        );
    }

    // r3 serves: straight to it, and through HAProxy, which now sends it
    // new connections.
    c.browser_get(Via::Replica(2), "/straight-to-r3")
        .unwrap_or_else(|e| panic!("browser request straight to r3: {e}\n{}", c.diag()));
    let port = free_port();
    let pinned = c.client(Via::Replica(2), &[(port, "prod/echo")]);
    echo_once(port, b"r3", Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!(
            "CLI forward pinned to r3: {e}\n{}\n{}",
            pinned.log_text(),
            c.diag()
        )
    });
    let before = c
        .haproxy
        .server("clients", "r3")
        .map(|s| s.total)
        .unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(10), || c
            .haproxy
            .server("clients", "r3")
            .is_some_and(|s| s.total > before + 2)),
        "HAProxy does not send new connections to r3\n{}",
        c.diag()
    );
    std::thread::sleep(Duration::from_secs(2));
    let echo = echo.stop();
    let http = http.stop();
    let summary = report(&[&echo, &http]);
    eprintln!("{T}:\n{summary}\ntimeline:\n{}", tl.render());
    assert!(
        echo.failures.is_empty() && http.failures.is_empty(),
        "requests failed during the scale-up:\n{summary}\ntimeline:\n{}\n--- client through HAProxy ---\n{}\n{}",
        tl.render(),
        lb_client.log_lines(&["WARN", "ERROR", "GOAWAY", "connected"], 40),
        c.diag()
    );
    assert!(
        echo.total() >= 100 && http.total() >= 20,
        "too little load to mean anything:\n{summary}"
    );
}

/// "A plain multi-address DNS name works too": two replicas that know
/// nothing of each other (no peers), and a server URL whose name has both
/// addresses. The agent counts each address as a replica and holds a
/// session to both. Runs in a network namespace of its own, whose
/// `/etc/hosts` (`/etc/netns/NAME/hosts`, which `ip netns exec` mounts)
/// gives the name its two addresses.
#[test]
fn a_server_name_with_several_addresses_counts_each_as_a_replica() {
    several_addresses(
        "a_server_name_with_several_addresses_counts_each_as_a_replica",
        false,
    );
}

/// One replica on `0.0.0.0` (advertising no address) that the name reaches
/// at both its addresses is held once: a session at the second address
/// would replace the first, whose redial would replace the second, and so
/// on. The agent holds one session, misses nothing, and stops dialing.
#[test]
fn one_replica_at_two_addresses_is_held_once() {
    several_addresses("one_replica_at_two_addresses_is_held_once", true);
}

/// `tether.test` at 127.0.0.11 and 127.0.0.12 in a network namespace: two
/// replicas, one at each address, or (`one_server`) one replica listening
/// on both.
fn several_addresses(test: &str, one_server: bool) {
    if !is_root() {
        assert!(!under_ci(), "{test} needs root (network namespaces)");
        eprintln!("SKIPPED {test}: network namespaces need root");
        return;
    }
    let tag = if one_server { "mb" } else { "ma" };
    let dir = TestDir::new(&format!("multiaddr-{tag}"));
    let ns = Netns::create(tag);
    let net = ns.net();
    let _hosts = NetnsHosts::write(
        &ns,
        "127.0.0.1 localhost\n127.0.0.11 tether.test\n127.0.0.12 tether.test\n",
    );
    let pki = Pki::new(&dir.path, "127.0.0.10".parse().expect("ip"));
    let port = 7443;
    let listen_on: &[&str] = if one_server {
        &["0.0.0.0"]
    } else {
        &["127.0.0.11", "127.0.0.12"]
    };
    let replicas: Vec<Proc> = listen_on
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let metrics_ip = if one_server { "127.0.0.11" } else { ip };
            let args: Vec<String> = [
                "server",
                "--listen",
                &format!("{ip}:{port}"),
                "--metrics-listen",
                &format!("{metrics_ip}:9090"),
                "--tls-cert",
                &pki.cert.display().to_string(),
                "--tls-key",
                &pki.key.display().to_string(),
                "--replica-id",
                &format!("m{}", i + 1),
                "--agent",
                &format!("prod={AGENT_TOKEN}"),
                "--shutdown-delay-ms",
                "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            Proc::spawn_in(&net, &dir.path, &format!("m{}", i + 1), &args)
        })
        .collect();
    let agent_args: Vec<String> = [
        "agent",
        "--server",
        &format!("wss://tether.test:{port}"),
        "--ca-file",
        &pki.ca.display().to_string(),
        "--name",
        "prod",
        "--token",
        AGENT_TOKEN,
        "--instance",
        "a1",
        "--service",
        "echo=127.0.0.1:9",
        "--metrics-listen",
        "127.0.0.1:9191",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = Proc::spawn_in(&net, &dir.path, "agent", &agent_args);
    let instances = |ip: &str| {
        net.http_get(format!("{ip}:9090").parse().expect("addr"), "/metrics")
            .and_then(|(_, body)| metric(&body, "tether_agent_instances{agent=\"prod\"}"))
    };
    let agent_metric = |name: &str| {
        net.http_get("127.0.0.1:9191".parse().expect("addr"), "/metrics")
            .and_then(|(_, body)| metric(&body, name))
    };
    if one_server {
        let held = wait_until(Duration::from_secs(20), || {
            instances("127.0.0.11") == Some(1.0)
                && agent_metric("tether_agent_replicas_missing") == Some(0.0)
        });
        // Past two resolutions of the name and many looks at the view.
        std::thread::sleep(Duration::from_secs(12));
        let sessions_total = agent_metric("tether_agent_sessions_total");
        assert!(
            held && agent_metric("tether_agent_replica_sessions") == Some(1.0)
                && agent_metric("tether_agent_replicas_missing") == Some(0.0)
                && sessions_total.is_some_and(|n| n <= 3.0)
                && !agent.log_text().contains("ERROR"),
            "one replica at two addresses: held {held}, sessions {:?}, missing {:?}, \
             sessions so far {sessions_total:?}\n--- agent ---\n{}",
            agent_metric("tether_agent_replica_sessions"),
            agent_metric("tether_agent_replicas_missing"),
            agent.log_lines(&["registered", "WARN", "ERROR"], 20),
        );
        drop(agent);
        drop(replicas);
        return;
    }
    let both = wait_until(Duration::from_secs(20), || {
        instances("127.0.0.11") == Some(1.0) && instances("127.0.0.12") == Some(1.0)
    });
    let agent_sessions = agent_metric("tether_agent_replica_sessions");
    assert!(
        both && agent_sessions == Some(2.0),
        "the agent should hold a session to each address of tether.test: replicas {:?} {:?}, \
         agent sessions {agent_sessions:?}\n--- agent ---\n{}\n--- m1 ---\n{}\n--- m2 ---\n{}",
        instances("127.0.0.11"),
        instances("127.0.0.12"),
        agent.log_lines(&["registered", "WARN", "ERROR"], 20),
        replicas[0].log_lines(&["agent", "WARN"], 10),
        replicas[1].log_lines(&["agent", "WARN"], 10),
    );
    drop(agent);
    drop(replicas);
}

/// An agent that cannot reach a replica at its advertised address looks
/// for it through the server URL; a look that lands on a replica the agent
/// already holds must not replace its session there (protocol 9: the
/// agent's `X-Tether-Held`, the server's 409). Before, every look replaced
/// the session and drained it, cutting its long streams after the drain
/// timeout, over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_that_lands_on_a_held_replica_keeps_the_session_there() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo_service().await;
    // r2 is advertised at an address where nothing listens.
    let dead = free_port();
    let t = Tunnel::start_with(
        &[("echo", echo)],
        &[
            "--replica-id",
            "r1",
            "--peer",
            &format!("r2=127.0.0.1:{dead}"),
            "--drain-timeout-ms",
            "1000",
        ],
        &["--instance", "a1"],
    );
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let mut held = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the forward");
    // Long enough for r2's address to fail twice and for several looks
    // through the URL (every other attempt, backoff capped at 2 s).
    for i in 0..24 {
        let msg = format!("ping {i:02}");
        held.write_all(msg.as_bytes()).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("echo {i} timed out\n{}", t.server.log_text()))
            .unwrap_or_else(|e| {
                panic!(
                    "the long stream was cut at echo {i}: {e}\n--- server ---\n{}\n--- agent ---\n{}",
                    t.server.log_text(),
                    t.agent.log_text()
                )
            });
        assert_eq!(back, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        t.agent_metric("tether_agent_replicas_missing"),
        Some(1.0),
        "r2 should stay missing"
    );
    assert!(
        !t.server.log_text().contains("re-registered"),
        "the agent's session was replaced\n{}",
        t.server.log_text()
    );
    assert_eq!(t.agent_metric("tether_agent_sessions_total"), Some(1.0));
}

/// `tether doctor` tries every address of the server's name, as agents and
/// clients connect: a name whose first address refuses (an AAAA record
/// for a server on IPv4 only) still passes, and the line says which failed.
#[test]
fn doctor_tries_every_address_of_the_name() {
    const T: &str = "doctor_tries_every_address_of_the_name";
    if !is_root() {
        assert!(
            !under_ci(),
            "{T}: network namespaces need root (CI runs as root)"
        );
        eprintln!("SKIPPED {T}: network namespaces need root");
        return;
    }
    let dir = TestDir::new("doctor-addrs");
    let ns = Netns::create("dr");
    let net = ns.net();
    // ::1 sorts first; the server listens on 127.0.0.1 only.
    let _hosts = NetnsHosts::write(
        &ns,
        "127.0.0.1 localhost\n::1 tether.test\n127.0.0.1 tether.test\n",
    );
    let server = Proc::spawn_in(
        &net,
        &dir.path,
        "server",
        &[
            "server".into(),
            "--listen".into(),
            "127.0.0.1:7443".into(),
            "--client".into(),
            format!("dev={CLIENT_TOKEN}=prod/*"),
        ],
    );
    assert!(server.wait_log("server listening", Duration::from_secs(10)));
    let out = net
        .command(env!("CARGO_BIN_EXE_tether"))
        .args([
            "doctor",
            "--server",
            "ws://tether.test:7443",
            "--token",
            CLIENT_TOKEN,
        ])
        .env_remove("TETHER_TOKEN")
        .output()
        .expect("run doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("all checks passed"),
        "{text}"
    );
    assert!(
        text.contains("connected to 127.0.0.1:7443; ::1 failed first"),
        "{text}"
    );
    drop(server);
}
