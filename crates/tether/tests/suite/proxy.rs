//! The client's SOCKS5 / HTTP CONNECT proxy, driven by curl.

use crate::common::*;
use std::process::Command;
use std::time::Duration;
use tether_proto::{OpenErrorCode, Target};

/// A CLI client running `proxy` with `args`, connected; returns it and its port.
fn proxy_client(t: &Tunnel, args: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let mut all: Vec<String> = [
        "client",
        "--server",
        &t.url(),
        "--token",
        CLIENT_TOKEN,
        "proxy",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.push("--listen".into());
    all.push(format!("127.0.0.1:{port}"));
    all.extend(args.iter().map(|s| s.to_string()));
    let p = Proc::spawn("proxy-client", &all);
    assert!(p.wait_log("connected", Duration::from_secs(10)));
    (p, port)
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The proxy serves at most 4 096 connections at once: past them a new one
/// is closed at accept (and said so in the log), and once the held ones
/// go, a request goes through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_full_of_idle_connections_closes_new_ones() {
    use tokio::io::AsyncReadExt;
    let web = http_service("after the flood").await;
    let allow = format!("localhost:{}", web.port());
    let t = Tunnel::start(&[], &["--allow", &allow]);
    let (client, port) = proxy_client(&t, &["--route", "localhost=prod"]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut idle = Vec::with_capacity(4096);
    for _ in 0..4096 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut b))
        .await
        .expect("the connection past the cap was kept open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(client.wait_log("4096 connections already", Duration::from_secs(5)));
    drop(idle);
    let (ok, body, err) = curl(&[
        "--retry",
        "5",
        "--retry-all-errors",
        "--retry-delay",
        "1",
        "--socks5-hostname",
        &format!("127.0.0.1:{port}"),
        &format!("http://localhost:{}/", web.port()),
    ]);
    assert!(ok && body.contains("after the flood"), "{body} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_and_http_connect_reach_allowed_hosts_by_name() {
    let web = http_service("hello from the web service").await;
    let other = http_service("should not be reachable").await;
    // The agent allows raw targets on localhost only at web's port.
    let allow = format!("localhost:{}", web.port());
    let t = Tunnel::start(&[], &["--allow", &allow]);
    let (client, proxy_port) = proxy_client(
        &t,
        &[
            "--route",
            "localhost=prod",
            "--route",
            "*.nowhere.example=ghost",
        ],
    );
    let proxy = format!("127.0.0.1:{proxy_port}");
    let url = format!("http://localhost:{}/page", web.port());

    // SOCKS5 with the name resolved on the far side.
    let (ok, body, err) = curl(&["--socks5-hostname", &proxy, &url]);
    assert!(ok, "socks5: {err}");
    assert!(body.contains("hello from the web service"), "{body}");
    // The same name fully qualified (a trailing dot) is the same host.
    let fqdn = format!("http://localhost.:{}/page", web.port());
    let (ok, body, err) = curl(&["--socks5-hostname", &proxy, &fqdn]);
    assert!(ok, "socks5 with a trailing dot: {err}");
    assert!(body.contains("hello from the web service"), "{body}");

    // HTTP CONNECT (tunnel through the proxy).
    let (ok, body, err) = curl(&["--proxytunnel", "--proxy", &format!("http://{proxy}"), &url]);
    assert!(ok, "connect: {err}");
    assert!(body.contains("request: GET /page HTTP/1.1"), "{body}");

    // Plain HTTP proxying of an absolute URL, rewritten to origin form.
    let (ok, body, err) = curl(&["--proxy", &format!("http://{proxy}"), &url]);
    assert!(ok, "forward: {err}");
    assert!(body.contains("request: GET /page HTTP/1.1"), "{body}");

    // Not in the agent's allow list: refused by the agent, reported by the proxy.
    let denied = format!("http://localhost:{}/", other.port());
    let (ok, _, err) = curl(&["--socks5-hostname", &proxy, &denied]);
    assert!(!ok, "agent allow list must refuse");
    assert!(err.contains("SOCKS") || err.contains("socks"), "{err}");
    let (ok, _, err) = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://{proxy}"),
        &denied,
    ]);
    assert!(!ok);
    assert!(err.contains("403"), "{err}");

    // No route for the host: refused locally with a reason.
    let (ok, _, _) = curl(&["--socks5-hostname", &proxy, "http://unrouted.example/"]);
    assert!(!ok);
    // A route to an agent that is not connected.
    let (ok, _, err) = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://{proxy}"),
        "http://a.nowhere.example/",
    ]);
    assert!(!ok);
    assert!(err.contains("503") || err.contains("403"), "{err}");
    let log = client.log_text();
    assert!(log.contains("no route for unrouted.example"), "{log}");
    assert!(log.contains("forbidden"), "{log}");
}

/// With `--auth-file`, curl gets through with the user name and password
/// (SOCKS5's RFC 1929 and HTTP's Basic) and is refused without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_a_password_lets_only_those_who_give_it_through() {
    let web = http_service("behind a password").await;
    let allow = format!("localhost:{}", web.port());
    let t = Tunnel::start(&[], &["--allow", &allow]);
    let dir = std::env::temp_dir().join(format!("tether-proxy-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("auth");
    std::fs::write(&file, "alice:correct horse\n").unwrap();
    let (client, port) = proxy_client(
        &t,
        &[
            "--route",
            "localhost=prod",
            "--auth-file",
            &file.display().to_string(),
        ],
    );
    let url = format!("http://localhost:{}/", web.port());
    for (proxy, works) in [
        (
            format!("socks5h://alice:correct%20horse@127.0.0.1:{port}"),
            true,
        ),
        (
            format!("http://alice:correct%20horse@127.0.0.1:{port}"),
            true,
        ),
        (format!("socks5h://alice:wrong@127.0.0.1:{port}"), false),
        (format!("socks5h://127.0.0.1:{port}"), false),
        (format!("http://alice:wrong@127.0.0.1:{port}"), false),
        (format!("http://127.0.0.1:{port}"), false),
    ] {
        // (curl reports a plain HTTP proxy's 407 as a successful answer.)
        let (_, body, err) = curl(&["--proxy", &proxy, &url]);
        assert_eq!(
            body.contains("behind a password"),
            works,
            "{proxy}: {body} {err}"
        );
    }
    // The HTTP refusal is a 407 that asks for Basic.
    let (_, head, _) = curl(&["-i", "--proxy", &format!("http://127.0.0.1:{port}"), &url]);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(head.contains("proxy-authenticate: Basic"), "{head}");
    assert!(client.log_text().contains("wrong user name or password"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_associate_relays_datagrams_by_name() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // UDP echo service, reachable by the agent as localhost:PORT.
    let svc_port = udp_echo().await.port();
    let allow = format!("localhost:{svc_port}");
    let t = Tunnel::start(&[], &["--allow", &allow]);
    let (client, proxy_port) = proxy_client(&t, &["--default-agent", "prod"]);

    // SOCKS5 greeting and UDP ASSOCIATE.
    let mut ctl = connect(proxy_port).await;
    ctl.write_all(&[5, 1, 0]).await.unwrap();
    let mut b2 = [0u8; 2];
    ctl.read_exact(&mut b2).await.unwrap();
    assert_eq!(b2, [5, 0]);
    ctl.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut rep = [0u8; 10];
    ctl.read_exact(&mut rep).await.unwrap();
    assert_eq!(&rep[..2], &[5, 0], "association granted");
    let relay_port = u16::from_be_bytes([rep[8], rep[9]]);

    // Junk from another socket of the client's address before the client's
    // first datagram does not take the association.
    let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    other.connect(("127.0.0.1", relay_port)).await.unwrap();
    other.send(b"junk").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.connect(("127.0.0.1", relay_port)).await.unwrap();
    let name = b"localhost";
    let mut header = vec![0, 0, 0, 3, name.len() as u8];
    header.extend_from_slice(name);
    header.extend_from_slice(&svc_port.to_be_bytes());
    let mut buf = vec![0u8; 65536];
    for i in 0..10u8 {
        let mut d = header.clone();
        d.extend_from_slice(&[i; 300]);
        udp.send(&d).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
            .await
            .expect("answer through the association")
            .unwrap();
        assert_eq!(
            &buf[..header.len()],
            &header[..],
            "answer names the destination"
        );
        assert_eq!(&buf[header.len()..n], &[i; 300][..]);
    }
    // Another socket on the client's address (another program on its host)
    // may not use the association: dropped, and the client's own replies
    // keep coming to the client.
    let mut d = header.clone();
    d.extend_from_slice(b"not mine");
    other.send(&d).await.unwrap();
    let stolen = tokio::time::timeout(Duration::from_millis(500), other.recv(&mut buf)).await;
    assert!(stolen.is_err(), "a datagram from another port was relayed");
    let mut d = header.clone();
    d.extend_from_slice(b"mine");
    udp.send(&d).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
        .await
        .expect("the client's answers still come to it")
        .unwrap();
    assert_eq!(&buf[header.len()..n], b"mine");
    drop(ctl);
    assert!(client.wait_log("UDP association closed", Duration::from_secs(5)));
}

/// A deny rule holds whatever the target is called: `AGENT/*` covers named
/// services only, so a denied service's address is not reachable through
/// it, and a raw target has one spelling (`:08002`, `127.1` are refused)
/// over the CLI protocol, SOCKS5 and HTTP CONNECT alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_hold_whatever_the_target_is_called() {
    let db = http_service("the database").await;
    let dir = std::env::temp_dir().join(format!("tether-canon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    let port = db.port();
    std::fs::write(
        &cfg,
        format!(
            "[[client]]\nname = \"alice\"\ntoken = \"alice-token\"\n\
             [[client]]\nname = \"bob\"\ntoken = \"bob-token\"\n\
             [[rule]]\nwho = [\"alice\"]\nallow = [\"prod/*\"]\n\
             [[rule]]\nwho = [\"alice\"]\ndeny = [\"prod/db\"]\n\
             [[rule]]\nwho = [\"bob\"]\nallow = [\"prod/*:*\"]\n\
             [[rule]]\nwho = [\"bob\"]\ndeny = [\"prod/127.0.0.1:{port}\"]\n"
        ),
    )
    .unwrap();
    let cfg_arg = cfg.display().to_string();
    // The agent itself would dial db's address (an explicit loopback rule).
    let allow = format!("127.0.0.1:{port}");
    let t = Tunnel::start_with(&[("db", db)], &["--config", &cfg_arg], &["--allow", &allow]);

    let alice = cli_session(&t.url(), "alice-token").await;
    let refused = |r: Result<tether_net::Stream, tether_net::Refusal>| match r {
        Ok(_) => panic!("opened"),
        Err(e) => (e.code, e.reason),
    };
    let (code, why) = refused(alice.open(Target::tcp("prod/db")).await);
    assert_eq!(code, OpenErrorCode::Forbidden, "{why}");
    // db's address through `prod/*`: no rule names raw targets for alice.
    let (code, why) = refused(
        alice
            .open(Target::tcp(format!("prod/127.0.0.1:{port}")))
            .await,
    );
    assert_eq!(code, OpenErrorCode::Forbidden, "{why}");
    assert!(why.contains("no rule allows"), "{why}");

    let bob = cli_session(&t.url(), "bob-token").await;
    let (code, why) = refused(
        bob.open(Target::tcp(format!("prod/127.0.0.1:{port}")))
            .await,
    );
    assert_eq!(code, OpenErrorCode::Forbidden, "{why}");
    for other in [
        format!("prod/127.0.0.1:0{port}"),
        format!("prod/127.0.0.1:+{port}"),
        format!("prod/127.0.0.1:000{port}"),
        format!("prod/127.1:{port}"),
        format!("prod/0x7f.0.0.1:{port}"),
        format!("prod/[[127.0.0.1]]:{port}"),
    ] {
        let (code, why) = refused(bob.open(Target::tcp(other.clone())).await);
        assert_eq!(code, OpenErrorCode::BadTarget, "{other}: {why}");
    }
    // Another address form of the same place is the same target.
    let (code, _) = refused(
        bob.open(Target::tcp(format!("prod/[::ffff:127.0.0.1]:{port}")))
            .await,
    );
    assert_eq!(code, OpenErrorCode::Forbidden);

    // SOCKS5 and HTTP CONNECT through alice's proxy client: refused too.
    let p_port = free_port();
    let proxy = Proc::spawn(
        "proxy-client",
        &[
            "client".into(),
            "--server".into(),
            t.url(),
            "--token".into(),
            "alice-token".into(),
            "proxy".into(),
            "--listen".into(),
            format!("127.0.0.1:{p_port}"),
            "--default-agent".into(),
            "prod".into(),
        ],
    );
    assert!(proxy.wait_log("connected", Duration::from_secs(10)));
    let url = format!("http://127.0.0.1:{port}/");
    let via = format!("127.0.0.1:{p_port}");
    let (ok, body, _) = curl(&["--socks5", &via, &url]);
    assert!(
        !ok && !body.contains("the database"),
        "SOCKS5 reached db: {body}"
    );
    let (ok, body, _) = curl(&["--proxytunnel", "--proxy", &format!("http://{via}"), &url]);
    assert!(
        !ok && !body.contains("the database"),
        "CONNECT reached db: {body}"
    );
    assert!(
        proxy.wait_log("no rule allows", Duration::from_secs(5)),
        "{}",
        proxy.log_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The HTTP side of the proxy as clients use it: a plain-HTTP connection
/// that the client reuses for another host reaches that host (each request
/// is routed, not spliced to the first host); bytes sent right behind a
/// CONNECT arrive; and a refused upload is told its answer, not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxying_routes_each_request_and_loses_no_byte() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let apps: Vec<(Proc, u16)> = (0..2)
        .map(|i| {
            let port = free_port();
            let app = Proc::spawn(
                &format!("sample-app-{i}"),
                &[
                    "sample-app".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                ],
            );
            assert!(app.wait_log("sample app listening", Duration::from_secs(10)));
            (app, port)
        })
        .collect();
    let (a, b) = (apps[0].1, apps[1].1);
    let echo = echo_service().await.port();
    let allow = [a, b, echo].map(|p| format!("localhost:{p}"));
    let t = Tunnel::start(
        &[],
        &[
            "--allow", &allow[0], "--allow", &allow[1], "--allow", &allow[2],
        ],
    );
    let (client, proxy_port) = proxy_client(
        &t,
        &[
            "--route",
            "localhost=prod",
            "--route",
            "*.nowhere.example=ghost",
        ],
    );
    let proxy = format!("http://127.0.0.1:{proxy_port}");

    // curl reuses a keep-alive proxy connection for the second URL.
    let (ok, body, err) = curl(&[
        "--proxy",
        &proxy,
        &format!("http://localhost:{a}/hello"),
        &format!("http://localhost:{b}/hello"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(body, "hello\nhello\n");
    for port in [a, b] {
        let opened = format!("target=prod/localhost:{port}");
        assert!(
            client.wait_log(&opened, Duration::from_secs(5)),
            "no stream to localhost:{port}: {}",
            client.log_text()
        );
    }

    // Bytes in the same segment as the CONNECT head.
    let mut c = connect(proxy_port).await;
    c.write_all(
        format!("CONNECT localhost:{echo} HTTP/1.1\r\nHost: localhost:{echo}\r\n\r\nhello")
            .as_bytes(),
    )
    .await
    .unwrap();
    let want = b"HTTP/1.1 200 Connection Established\r\n\r\nhello";
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .expect("the early bytes come back")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));

    // An HTTP/1.0 client's absolute-form request, bare LF, capital scheme,
    // no Host: the echo service shows the head the proxy sent on.
    let mut c = connect(proxy_port).await;
    c.write_all(format!("GET HTTP://localhost:{echo}/x HTTP/1.0\nX-A: 1\n\n").as_bytes())
        .await
        .unwrap();
    let want =
        format!("GET /x HTTP/1.0\r\nHost: localhost:{echo}\r\nX-A: 1\r\nConnection: close\r\n\r\n");
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .expect("the forwarded head comes back")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);

    // Addresses that are not HOST:PORT are refused here, with the reason,
    // without asking the server: a SOCKS5 empty name (host unreachable),
    // a CONNECT without a host.
    let mut c = connect(proxy_port).await;
    c.write_all(&[5, 1, 0, 5, 1, 0, 3, 0, 0, 80]).await.unwrap();
    let mut got = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .expect("a SOCKS5 refusal")
        .unwrap();
    assert_eq!(&got[..4], &[5, 0, 5, 4]);
    let mut c = connect(proxy_port).await;
    c.write_all(b"CONNECT :443 HTTP/1.1\r\n\r\n").await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut got))
        .await
        .expect("a CONNECT refusal")
        .unwrap();
    assert!(
        got.starts_with("HTTP/1.1 400 ") && got.contains("bad_target"),
        "{got}"
    );

    // A SOCKS4 client is told no in SOCKS4 (curl: "request rejected"),
    // not left to time out.
    let (ok, _, err) = curl(&[
        "--socks4a",
        &format!("127.0.0.1:{proxy_port}"),
        "http://localhost/",
    ]);
    assert!(!ok && err.contains("rejected"), "{err}");

    // A 4 MiB upload to an agent this client may not reach: the answer, not a
    // reset while curl is still sending.
    let dir = std::env::temp_dir().join(format!("tether-proxy-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("upload");
    std::fs::write(&file, vec![b'x'; 4 << 20]).unwrap();
    let (ok, code, err) = curl(&[
        "--proxy",
        &proxy,
        "-H",
        "Expect:",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &format!("@{}", file.display()),
        "http://a.nowhere.example/upload",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{err}");
    assert_eq!(code, "403", "{err}");
}
