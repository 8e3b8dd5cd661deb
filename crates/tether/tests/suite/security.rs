//! Identities, policy, reload and limits against real processes: JWTs of
//! three algorithms, agent client certificates made with openssl, a config
//! file rewritten under a running server, and one identity's flood beside
//! another's traffic.

use crate::common::*;
use futures_util::StreamExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "tether-sec-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, &claims, key).unwrap()
}

fn claims(sub: &str, groups: &[&str], aud: &str, exp_in: i64) -> serde_json::Value {
    serde_json::json!({
        "sub": sub, "groups": groups, "iss": "https://idp.test", "aud": aud,
        "exp": (now() as i64 + exp_in) as u64, "iat": now(),
    })
}

/// base64url without padding.
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

fn hex_to_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

fn curl_status(url: &str, bearer: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "-H",
        ])
        .arg(format!("Authorization: Bearer {bearer}"))
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Server (plain HTTP) from a config file + agent with the sample app.
struct Setup {
    server: Proc,
    _agent: Proc,
    _app: Proc,
    port: u16,
    dir: PathBuf,
    cfg_path: PathBuf,
}

impl Setup {
    fn start(tag: &str, server_toml: &str) -> Setup {
        let dir = tmpdir(tag);
        let app_port = free_port();
        let app = Proc::spawn(
            "sample-app",
            &[
                "sample-app".into(),
                "--listen".into(),
                format!("127.0.0.1:{app_port}"),
            ],
        );
        assert!(app.wait_log("sample app listening", Duration::from_secs(10)));
        let port = free_port();
        let cfg_path = dir.join("server.toml");
        std::fs::write(
            &cfg_path,
            format!("listen = \"127.0.0.1:{port}\"\n{server_toml}"),
        )
        .unwrap();
        let server = Proc::spawn(
            "server",
            &[
                "server".into(),
                "--config".into(),
                cfg_path.display().to_string(),
            ],
        );
        assert!(
            server.wait_log("server listening", Duration::from_secs(10)),
            "{}",
            server.log_text()
        );
        let agent = Proc::spawn(
            "agent",
            &[
                "agent".into(),
                "--server".into(),
                format!("ws://127.0.0.1:{port}"),
                "--name".into(),
                "prod".into(),
                "--token".into(),
                AGENT_TOKEN.into(),
                "--service".into(),
                format!("web=http://127.0.0.1:{app_port}"),
                "--service".into(),
                format!("secret=http://127.0.0.1:{app_port}"),
                "--service".into(),
                format!("echo=127.0.0.1:{app_port}"),
            ],
        );
        assert!(
            agent.wait_log("registered as prod", Duration::from_secs(15)),
            "{}",
            agent.log_text()
        );
        Setup {
            server,
            _agent: agent,
            _app: app,
            port,
            dir,
            cfg_path,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn metrics(&self) -> String {
        http_get(
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
            "/metrics",
        )
        .map(|(_, b)| b)
        .unwrap_or_default()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn jwt_identities_of_three_algorithms_follow_the_policy() {
    let dir = tmpdir("jwtkeys");
    // RS256 key as PEM, ES256 key published in a JWKS file.
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"],
    );
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.key",
        ],
    );
    let ec_text = Command::new("openssl")
        .current_dir(&dir)
        .args(["pkey", "-in", "ec.key", "-text", "-noout"])
        .output()
        .unwrap();
    let ec_text = String::from_utf8_lossy(&ec_text.stdout).into_owned();
    // The public point: "pub:" then hex bytes 04 || X || Y.
    let pub_hex: String = ec_text
        .split("pub:")
        .nth(1)
        .unwrap()
        .split("ASN1 OID")
        .next()
        .unwrap()
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    let point = hex_to_bytes(&pub_hex);
    assert_eq!(point.len(), 65, "{ec_text}");
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
        "x": b64(&point[1..33]), "y": b64(&point[33..]),
    }]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
    std::fs::write(dir.join("hs.secret"), format!("{HS_SECRET}\n")).unwrap();

    let s = Setup::start(
        "jwt",
        &format!(
            r#"
[[agent]]
name = "prod"
token_sha256 = "{agent_hash}"
[jwt]
issuer = "https://idp.test"
audience = "tether"
secret_file = "{d}/hs.secret"
public_key_file = "{d}/rsa.pub"
[[rule]]
who = ["group:sre"]
allow = ["prod/*"]
[[rule]]
who = ["group:sre"]
deny = ["prod/secret"]
[[rule]]
who = ["dana"]
allow = ["prod/web"]
protocols = ["tcp"]
"#,
            agent_hash = sha256_hex(AGENT_TOKEN),
            d = dir.display()
        ),
    );
    // The JWKS file comes in by reload (and proves file-change reloads).
    let cfg = std::fs::read_to_string(&s.cfg_path).unwrap();
    std::fs::write(
        &s.cfg_path,
        cfg.replace(
            "[jwt]\n",
            &format!("[jwt]\njwks_file = \"{}/jwks.json\"\n", dir.display()),
        ),
    )
    .unwrap();
    assert!(
        s.server
            .wait_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        s.server.log_text()
    );

    let hs = EncodingKey::from_secret(HS_SECRET.as_bytes());
    let rs = EncodingKey::from_rsa_pem(&std::fs::read(dir.join("rsa.key")).unwrap()).unwrap();
    let es = EncodingKey::from_ec_pem(&std::fs::read(dir.join("ec.key")).unwrap()).unwrap();
    let web = s.url("/a/prod/web/headers");
    for (alg, key, kid) in [
        (Algorithm::HS256, &hs, None),
        (Algorithm::RS256, &rs, None),
        (Algorithm::ES256, &es, Some("ec-1")),
    ] {
        let t = jwt(alg, key, kid, claims("bob", &["sre"], "tether", 300));
        let (code, body) = curl_status(&web, &t);
        assert_eq!(code, 200, "{alg:?}: {body}");
        assert!(!body.contains(&t), "the JWT reached the service");
    }
    // An `exp` further off than the server's clock can count (10^19 s) is a
    // token that does not expire, not a panic in the request's task.
    let far = jwt(Algorithm::HS256, &hs, None, {
        let mut c = claims("bob", &["sre"], "tether", 300);
        c["exp"] = 10_000_000_000_000_000_000u64.into();
        c
    });
    let (code, body) = curl_status(&web, &far);
    assert_eq!(code, 200, "exp 10^19: {body}");
    // A browser login with a JWT that expired within the leeway (30 s) is
    // refused with the reason, not a login whose cookie is gone at once.
    let late = jwt(
        Algorithm::HS256,
        &hs,
        None,
        claims("bob", &["sre"], "tether", -5),
    );
    assert_eq!(
        curl_status(&web, &late).0,
        200,
        "accepted within the leeway"
    );
    let jar = dir.join("jar").display().to_string();
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code}",
                "-b",
                &jar,
                "-c",
                &jar,
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let page = curl(&[&s.url("/login")]);
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .expect("csrf field")
        .to_owned();
    let answer = curl(&[
        "--data",
        &format!("token={late}&csrf={csrf}&next=%2F"),
        &s.url("/login"),
    ]);
    assert!(answer.ends_with("\n401"), "{answer}");
    assert!(answer.contains("That token has expired."), "{answer}");
    // Deny wins, protocols matter, no rule = no access.
    let sre = jwt(
        Algorithm::RS256,
        &rs,
        None,
        claims("bob", &["sre"], "tether", 300),
    );
    let (code, body) = curl_status(&s.url("/a/prod/secret/"), &sre);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("denied by rule #2"), "{body}");
    let dana = jwt(
        Algorithm::HS256,
        &hs,
        None,
        claims("dana", &[], "tether", 300),
    );
    let (code, body) = curl_status(&web, &dana);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("no rule allows"), "{body}");
    // Wrong audience, wrong issuer, expired, wrong key, algorithm confusion.
    let bad = [
        jwt(
            Algorithm::HS256,
            &hs,
            None,
            claims("bob", &["sre"], "someone-else", 300),
        ),
        jwt(Algorithm::HS256, &hs, None, {
            let mut c = claims("bob", &["sre"], "tether", 300);
            c["iss"] = "https://evil.test".into();
            c
        }),
        jwt(
            Algorithm::HS256,
            &hs,
            None,
            claims("bob", &["sre"], "tether", -120),
        ),
        jwt(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret-that-is-32-bytes-long!!"),
            None,
            claims("bob", &["sre"], "tether", 300),
        ),
        // HS256 "signed" with the RSA public key as the secret.
        jwt(
            Algorithm::HS256,
            &EncodingKey::from_secret(&std::fs::read(dir.join("rsa.pub")).unwrap()),
            None,
            claims("bob", &["sre"], "tether", 300),
        ),
    ];
    for t in &bad {
        let (code, body) = curl_status(&web, t);
        assert_eq!(code, 401, "{body}");
    }
    // The CLI takes a JWT too.
    let local = free_port();
    let client = forward_client(&s.ws_url(), &sre, &[(local, "prod/web")]);
    assert!(
        client.wait_log("connected", Duration::from_secs(10)),
        "{}",
        client.log_text()
    );
    let (status, _) =
        wait_for(|| http_get(format!("127.0.0.1:{local}").parse().unwrap(), "/hello"));
    assert_eq!(status, 200);
    // One accepted within the clock-skew leeway lasts to the leeway's end,
    // not a moment: the session is not closed at once (and reopened, and
    // closed, for the rest of the leeway).
    let late_local = free_port();
    let late_client = forward_client(&s.ws_url(), &late, &[(late_local, "prod/web")]);
    assert!(
        late_client.wait_log("connected", Duration::from_secs(10)),
        "{}",
        late_client.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !s.server.log_text().contains("credential expired"),
        "a session within the leeway was closed at once\n{}",
        s.server.log_text()
    );
    let (status, _) =
        wait_for(|| http_get(format!("127.0.0.1:{late_local}").parse().unwrap(), "/hello"));
    assert_eq!(status, 200);
    drop(late_client);
    // Audit lines: who, what, decision, bytes (a stream's line comes when it closes).
    assert!(s.server.wait_log("result=closed", Duration::from_secs(5)));
    let log = s.server.log_text();
    let audit = |want: &[&str]| {
        log.lines()
            .any(|l| l.contains(" audit ") && want.iter().all(|w| l.contains(w)))
    };
    assert!(
        audit(&["identity=dana", "decision=\"denied\"", "no rule allows"]),
        "{log}"
    );
    assert!(
        audit(&[
            "identity=bob",
            "protocol=\"tcp\"",
            "decision=\"allowed\"",
            "bytes_up=",
            "duration_ms="
        ]),
        "{log}"
    );
    assert!(
        audit(&[
            "identity=bob",
            "protocol=\"http\"",
            "status=200",
            "bytes_down="
        ]),
        "{log}"
    );
    for t in [&sre, &dana] {
        assert!(!log.contains(t.as_str()), "a JWT was logged");
    }

    // A console's event stream, identified by a JWT signed with that key.
    let mut console = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", "-H"])
        .arg(format!("Authorization: Bearer {sre}"))
        .args(["-H", "Accept: text/event-stream"])
        .arg(s.url("/api/events"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut events =
        std::io::BufRead::lines(std::io::BufReader::new(console.stdout.take().unwrap()));
    assert_eq!(
        events.next().and_then(Result::ok).as_deref(),
        Some("event: agents")
    );

    // The RS256 key is withdrawn (compromised): the reload verifies live
    // JWT sessions again and closes the one signed with it.
    let cfg = std::fs::read_to_string(&s.cfg_path).unwrap();
    let without: String = cfg
        .lines()
        .filter(|l| !l.starts_with("public_key_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(cfg, without);
    std::fs::write(&s.cfg_path, without).unwrap();
    s.server.signal(Signal::HUP);
    assert!(
        client.wait_log("credentials revoked", Duration::from_secs(10)),
        "{}",
        client.log_text()
    );
    let (code, _) = curl_status(&web, &sre);
    assert_eq!(code, 401, "a JWT signed with the withdrawn key still works");
    // The console's event stream ends too, long before the JWT expires.
    assert!(
        wait_until(Duration::from_secs(10), || console
            .try_wait()
            .is_ok_and(|done| done.is_some())),
        "the console's event stream outlived the withdrawn key"
    );
    drop(events);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload that removes a credential while a session holding it is still
/// in its handshake (upgraded, HELLO not yet sent) closes that session once
/// it is up: the reload did not see it, so it is checked when registered.
/// Both an agent's and a client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_removed_during_the_handshake_does_not_survive_it() {
    let base = |with_alice: bool| {
        let alice = if with_alice {
            format!(
                "[[client]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\nallow = [\"prod/*\"]\n\
                 [[agent]]\nname = \"side\"\ntoken_sha256 = \"{}\"\n",
                sha256_hex("alice-token"),
                sha256_hex("side-token")
            )
        } else {
            String::new()
        };
        format!(
            "[[agent]]\nname = \"prod\"\ntoken_sha256 = \"{}\"\n{alice}",
            sha256_hex(AGENT_TOKEN)
        )
    };
    let s = Setup::start("handshake-reload", &base(true));
    let upgraded = |path: &'static str, token: &'static str, agent: Option<&'static str>| {
        let url = format!("{}/tether/v1/{path}", s.ws_url());
        async move {
            let mut headers = vec![("authorization".to_owned(), format!("Bearer {token}"))];
            if let Some(name) = agent {
                headers.push((
                    tether_proto::endpoints::AGENT_NAME_HEADER.to_owned(),
                    name.to_owned(),
                ));
            }
            tether_net::transport::ws::dial(
                &url,
                tether_proto::SUBPROTOCOL,
                &headers,
                &Default::default(),
            )
            .await
            .unwrap()
        }
    };
    // Both upgraded (101), neither has sent its HELLO.
    let (client_sink, client_source) = upgraded("client", "alice-token", None).await;
    let (agent_sink, agent_source) = upgraded("agent", "side-token", Some("side")).await;
    std::fs::write(
        &s.cfg_path,
        format!("listen = \"127.0.0.1:{}\"\n{}", s.port, base(false)),
    )
    .unwrap();
    s.server.signal(Signal::HUP);
    assert!(
        s.server
            .wait_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        s.server.log_text()
    );
    for (role, sink, source) in [
        ("client", client_sink, client_source),
        ("agent", agent_sink, agent_source),
    ] {
        let (conn, _, _incoming) = tether_net::Connection::start(
            tether_proto::Role::Initiator,
            Default::default(),
            sink,
            source,
            role,
        )
        .await
        .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        let Ok(why) = closed else {
            panic!(
                "the {role} session outlived its removed credential\n{}",
                s.server.log_text()
            )
        };
        assert!(
            why.as_deref().is_some_and(|w| w.contains("revoked")),
            "{role}: {why:?}"
        );
    }
}

/// A reload that changes settings only a restart applies says which, and
/// leaves them as they run (here a new listener's port stays unbound).
#[test]
fn a_reload_names_the_settings_only_a_restart_applies() {
    let agent = prod_agent();
    let s = Setup::start("restart-only", &agent);
    let reloads = |n: usize| {
        wait_until(Duration::from_secs(10), || {
            s.server
                .log_text()
                .matches("configuration reloaded")
                .count()
                >= n
        })
    };
    const WARNING: &str = "only a restart applies were not applied";
    // The same settings again: reloaded, nothing to warn of.
    s.server.signal(Signal::HUP);
    assert!(reloads(1), "{}", s.server.log_text());
    assert!(
        !s.server.log_text().contains(WARNING),
        "{}",
        s.server.log_text()
    );

    let listener_port = free_port();
    std::fs::write(
        &s.cfg_path,
        format!(
            "listen = \"127.0.0.1:{}\"\n{agent}[http]\nsession_ttl_secs = 60\n\
             [[listener]]\nlisten = \"127.0.0.1:{listener_port}\"\ntarget = \"prod/echo\"\n",
            s.port
        ),
    )
    .unwrap();
    s.server.signal(Signal::HUP);
    assert!(reloads(2), "{}", s.server.log_text());
    assert!(
        s.server.wait_log(WARNING, Duration::from_secs(5)),
        "{}",
        s.server.log_text()
    );
    let log = s.server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_default();
    assert!(
        line.ends_with("[[listener]], [http]"),
        "the warning names the changed settings, and only those: {line}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", listener_port)).is_err(),
        "a reload bound the new listener"
    );

    // TLS turned on (a restart's) with files that are not there: a restart
    // would refuse it, so the reload applies none of it.
    let missing = s.dir.join("missing.pem").display().to_string();
    std::fs::write(
        &s.cfg_path,
        format!(
            "listen = \"127.0.0.1:{}\"\n{agent}[tls]\ncert = \"{missing}\"\nkey = \"{missing}\"\n",
            s.port
        ),
    )
    .unwrap();
    s.server.signal(Signal::HUP);
    assert!(
        s.server.wait_log("reload failed", Duration::from_secs(10)),
        "{}",
        s.server.log_text()
    );
    assert_eq!(
        s.server
            .log_text()
            .matches("configuration reloaded")
            .count(),
        2,
        "{}",
        s.server.log_text()
    );
}

/// A reload that fails for a key file that is not there yet watches that
/// file: when it comes, the config loads, with no other edit or signal.
#[test]
fn a_reload_waiting_for_a_key_file_loads_when_the_file_comes() {
    let agent = prod_agent();
    let s = Setup::start("reload-later", &agent);
    let secret = s.cfg_path.with_file_name("later.secret");
    std::fs::write(
        &s.cfg_path,
        format!(
            "listen = \"127.0.0.1:{}\"\n{agent}[jwt]\nissuer = \"i\"\naudience = \"a\"\nsecret_file = \"{}\"\n",
            s.port,
            secret.display()
        ),
    )
    .unwrap();
    assert!(
        s.server.wait_log("reload failed", Duration::from_secs(10)),
        "{}",
        s.server.log_text()
    );
    assert!(!s.server.log_text().contains("configuration reloaded"));
    std::fs::write(&secret, "a-shared-secret-of-at-least-32-bytes\n").unwrap();
    assert!(
        s.server
            .wait_log("configuration reloaded", Duration::from_secs(10)),
        "the key file came and nothing reloaded\n{}",
        s.server.log_text()
    );
}

/// A 404 echoes at most 200 bytes of the path, also when the path holds
/// UTF-8 (hyper takes bytes above 0x7f in it).
#[test]
fn a_404_echoes_a_bounded_part_of_any_path() {
    use std::io::{Read, Write};
    let s = Setup::start("notfound", &prod_agent());
    let path = format!("/{}", "\u{e9}".repeat(3000));
    let mut c = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(
        body.contains("no such endpoint") && body.len() < 300,
        "{} bytes: {body:.300}",
        body.len()
    );
}

/// A login form that does not arrive whole is answered with what went
/// wrong: 413 for one over the limit, 400 for one cut short.
#[test]
fn a_login_form_that_does_not_arrive_is_answered_with_why() {
    use std::io::{Read, Write};
    let s = Setup::start("loginform", &prod_agent());
    let ask = |head: &str, body: &[u8]| {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        c.write_all(head.as_bytes()).unwrap();
        let _ = c.write_all(body);
        // The server may have answered (413) and closed already.
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let big = vec![b'a'; 64 * 1024];
    let r = ask(
        &format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n\r\n",
            big.len()
        ),
        &big,
    );
    assert!(
        r.starts_with("HTTP/1.1 413") && r.contains("too large"),
        "{r}"
    );
    let r = ask(
        "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 100\r\n\r\n",
        b"token=abc",
    );
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("unreadable"),
        "{r}"
    );
}

/// An HS256 JWT with a header of our choosing (the `Header` type has no
/// `crit`).
fn jwt_with_header(header: serde_json::Value, claims: serde_json::Value, secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{input}.{sig}")
}

#[test]
fn jwt_refusals_tell_the_log_not_the_caller() {
    let dir = tmpdir("jwtwhy");
    std::fs::write(dir.join("hs.secret"), HS_SECRET).unwrap();
    let s = Setup::start(
        "jwtwhy",
        &format!(
            r#"
[[agent]]
name = "prod"
token_sha256 = "{agent_hash}"
[jwt]
issuer = "https://idp.test"
audience = "tether"
secret_file = "{d}/hs.secret"
leeway_secs = 0
[[rule]]
who = ["bob"]
allow = ["prod/*"]
"#,
            agent_hash = sha256_hex(AGENT_TOKEN),
            d = dir.display()
        ),
    );
    let hs = EncodingKey::from_secret(HS_SECRET.as_bytes());
    let web = s.url("/a/prod/web/headers");
    let raw = s.url("/tether/v1/ws/prod/web");
    let good = jwt(
        Algorithm::HS256,
        &hs,
        None,
        claims("bob", &[], "tether", 300),
    );
    assert_eq!(curl_status(&web, &good).0, 200);

    // Expired: the caller hears "invalid client token", the log says why.
    let expired = jwt(
        Algorithm::HS256,
        &hs,
        None,
        claims("bob", &[], "tether", -120),
    );
    for url in [&web, &raw] {
        let (code, body) = curl_status(url, &expired);
        assert_eq!(code, 401, "{url}: {body}");
        assert!(body.contains("invalid client token"), "{url}: {body}");
        for detail in ["xpired", "JWT", "Signature", "exp"] {
            assert!(!body.contains(detail), "{url}: {detail} in {body:?}");
        }
    }
    assert!(
        s.server
            .wait_log("JWT refused: expired", Duration::from_secs(5)),
        "{}",
        s.server.log_text()
    );

    // A `crit` header names extensions we do not implement: refused, even
    // with a good signature and claims. (A second later: refusals are
    // logged at most once a second.)
    std::thread::sleep(Duration::from_millis(1100));
    let crit = jwt_with_header(
        serde_json::json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"], "exp": 1}),
        claims("bob", &[], "tether", 300),
        HS_SECRET.as_bytes(),
    );
    let plain = jwt_with_header(
        serde_json::json!({"alg": "HS256", "typ": "JWT"}),
        claims("bob", &[], "tether", 300),
        HS_SECRET.as_bytes(),
    );
    assert_eq!(
        curl_status(&web, &plain).0,
        200,
        "the hand-made JWT is valid"
    );
    for url in [&web, &raw] {
        let (code, body) = curl_status(url, &crit);
        assert_eq!(code, 401, "{url}: {body}");
        assert!(!body.contains("crit"), "{url}: {body}");
    }
    assert!(s.server.log_text().contains("crit parameter"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("never happened");
}

/// The `[[agent]]` entry of the agent every [`Setup`] starts (`prod`).
fn prod_agent() -> String {
    format!(
        "[[agent]]\nname = \"prod\"\ntoken_sha256 = \"{}\"\n",
        sha256_hex(AGENT_TOKEN)
    )
}

fn sha256_hex(s: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("printf %s '{s}' | sha256sum")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// One GET on a kept-alive HTTP/1.1 connection with a bearer token: the
/// status code (the body is read whole, so the connection can go on).
async fn keep_alive_get(c: &mut tokio::net::TcpStream, path: &str, token: &str) -> u16 {
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = c.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let head = text[..end].to_ascii_lowercase();
            let done = match head.lines().find_map(|l| l.strip_prefix("content-length:")) {
                Some(len) => buf.len() >= end + 4 + len.trim().parse::<usize>().unwrap(),
                None => text.ends_with("0\r\n\r\n"), // chunked
            };
            if done {
                return text[9..12].parse::<u16>().unwrap();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no whole response in 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_revokes_tokens_and_policy_without_a_restart() {
    let base = |alice_allow: &str, with_bob: bool| {
        let bob = if with_bob {
            format!(
                "[[client]]\nname = \"bob\"\ntoken_sha256 = \"{}\"\nallow = [\"prod/*\"]\n",
                sha256_hex("bob-token")
            )
        } else {
            String::new()
        };
        format!(
            "[[agent]]\nname = \"prod\"\ntoken_sha256 = \"{}\"\n[[client]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\nallow = [{alice_allow}]\n{bob}",
            sha256_hex(AGENT_TOKEN),
            sha256_hex("alice-token")
        )
    };
    let s = Setup::start("reload", &base("\"prod/echo\", \"prod/web\"", true));
    let (pa, pb) = (free_port(), free_port());
    let client = |token: &str, port: u16| {
        let p = forward_client(&s.ws_url(), token, &[(port, "prod/echo")]);
        assert!(
            p.wait_log("connected", Duration::from_secs(10)),
            "{}",
            p.log_text()
        );
        p
    };
    let mut alice = client("alice-token", pa);
    let bob = client("bob-token", pb);
    // bob also holds a raw WebSocket (a browser's way in).
    let (mut bob_ws, _) = tokio_tungstenite::connect_async(format!(
        "{}/tether/v1/ws/prod/web?token=bob-token",
        s.ws_url()
    ))
    .await
    .unwrap();
    // Long-lived connections through both (the sample app answers HTTP; a
    // kept-alive connection stays open).
    let mut a_conn = connect(pa).await;
    let mut b_conn = connect(pb).await;
    for c in [&mut a_conn, &mut b_conn] {
        c.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    }

    // 1. alice loses prod/echo (a file change): her live stream is reset,
    //    her session stays; bob is untouched.
    std::fs::write(
        &s.cfg_path,
        format!(
            "listen = \"127.0.0.1:{}\"\n{}",
            s.port,
            base("\"prod/web\"", true)
        ),
    )
    .unwrap();
    assert!(
        s.server
            .wait_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        s.server.log_text()
    );
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), a_conn.read(&mut buf))
        .await
        .expect("alice's stream was not ended");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    b_conn
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = b_conn.read(&mut [0u8; 256]).await.unwrap();
    assert!(n > 0, "bob's stream was cut");
    assert!(
        s.server.log_text().contains("streams_reset=1"),
        "{}",
        s.server.log_text()
    );

    // 2. A broken config is refused and the running one stays.
    std::fs::write(&s.cfg_path, "this is = = not toml").unwrap();
    s.server.signal(Signal::HUP);
    assert!(s.server.wait_log(
        "reload failed, keeping the running configuration",
        Duration::from_secs(10)
    ));
    b_conn
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(b_conn.read(&mut [0u8; 256]).await.unwrap() > 0);

    // A config that a restart would refuse (two listeners on one port) is
    // not applied in part: bob's token, removed in it, still works.
    let twice = "[[listener]]\nlisten = \"127.0.0.1:1\"\ntarget = \"prod/echo\"\n";
    std::fs::write(
        &s.cfg_path,
        format!(
            "listen = \"127.0.0.1:{}\"\n{}\n{twice}{twice}",
            s.port,
            base("\"prod/web\"", false)
        ),
    )
    .unwrap();
    s.server.signal(Signal::HUP);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .server
            .log_text()
            .matches("reload failed, keeping the running configuration")
            .count()
            == 2),
        "{}",
        s.server.log_text()
    );
    assert!(s.server.log_text().contains("want the same tcp port"));
    b_conn
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(b_conn.read(&mut [0u8; 256]).await.unwrap() > 0);

    // A kept-alive HTTP connection with bob's bearer token: the second
    // request is served with the credential the connection remembers.
    let mut web_conn = connect(s.port).await;
    for _ in 0..2 {
        assert_eq!(
            keep_alive_get(&mut web_conn, "/a/prod/web/hello", "bob-token").await,
            200
        );
    }

    // 3. bob's token is removed (SIGHUP): his session is closed at once.
    std::fs::write(
        &s.cfg_path,
        format!(
            "listen = \"127.0.0.1:{}\"\n{}",
            s.port,
            base("\"prod/web\"", false)
        ),
    )
    .unwrap();
    s.server.signal(Signal::HUP);
    let r = tokio::time::timeout(Duration::from_secs(5), b_conn.read(&mut buf))
        .await
        .expect("bob's stream survived");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        bob.wait_log("credentials revoked", Duration::from_secs(5)),
        "{}",
        bob.log_text()
    );
    // His raw WebSocket is closed with a code that says why (1008, policy).
    match tokio::time::timeout(Duration::from_secs(5), bob_ws.next()).await {
        Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame))))) => {
            assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
            assert!(frame.reason.contains("revoked"), "{frame:?}");
        }
        other => panic!("bob's raw WebSocket: {other:?}"),
    }
    assert!(
        s.server.log_text().contains("trigger=\"SIGHUP\"")
            || s.server.log_text().contains("trigger=SIGHUP")
    );
    // The same HTTP connection does not get by on what it remembered.
    assert_eq!(
        keep_alive_get(&mut web_conn, "/a/prod/web/hello", "bob-token").await,
        401
    );
    // Alice still works for what she may open.
    assert!(alice.is_running());
    assert!(s.metrics().contains("tether_reloads_total{result=\"ok\"}"));

    // 4. A streaming HTTP response (server-sent events) of alice's is cut
    //    when she loses prod/web.
    use std::io::{BufRead, BufReader};
    let mut sse = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "--max-time",
            "60",
            "-H",
            "Authorization: Bearer alice-token",
        ])
        .arg(s.url("/a/prod/web/events?n=600"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sse.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "id: 0");
    std::fs::write(
        &s.cfg_path,
        format!("listen = \"127.0.0.1:{}\"\n{}", s.port, base("", false)),
    )
    .unwrap();
    s.server.signal(Signal::HUP);
    let started = std::time::Instant::now();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the event stream ran on for {:?}",
        started.elapsed()
    );
    assert!(rest.len() < 100, "{} more lines", rest.len());
    let _ = sse.wait();
}

#[test]
fn limits_refuse_the_flooding_identity_only() {
    let s = Setup::start(
        "limits",
        &format!(
            "[[agent]]\nname = \"prod\"\ntoken_sha256 = \"{}\"\n[[client]]\nname = \"flood\"\ntoken_sha256 = \"{}\"\nallow = [\"prod/*\"]\n[[client]]\nname = \"calm\"\ntoken_sha256 = \"{}\"\nallow = [\"prod/*\"]\n[limits]\nrequests_per_sec = 5\nrequest_burst = 5\nmax_sessions_per_client = 1\n",
            sha256_hex(AGENT_TOKEN),
            sha256_hex("flood-token"),
            sha256_hex("calm-token")
        ),
    );
    let web = s.url("/a/prod/web/hello");
    let mut refused = 0;
    for _ in 0..30 {
        let (code, body) = curl_status(&web, "flood-token");
        if code == 429 {
            assert!(body.contains("per second"), "{body}");
            refused += 1;
        }
    }
    assert!(refused >= 20, "only {refused} of 30 refused");
    for _ in 0..4 {
        assert_eq!(curl_status(&web, "calm-token").0, 200, "calm was refused");
    }
    let m = s.metrics();
    assert!(
        metric(&m, "tether_limit_hits_total{limit=\"requests_per_sec\"}").unwrap_or(0.0) >= 20.0,
        "{m}"
    );
    // One session per client: the second CLI session of "calm" is refused.
    let c1 = forward_client(&s.ws_url(), "calm-token", &[(free_port(), "prod/echo")]);
    assert!(c1.wait_log("connected", Duration::from_secs(10)));
    let c2 = forward_client(&s.ws_url(), "calm-token", &[(free_port(), "prod/echo")]);
    assert!(
        c2.wait_log("429", Duration::from_secs(10)),
        "{}",
        c2.log_text()
    );
    assert!(c2.log_text().contains("sessions"), "{}", c2.log_text());
}

#[test]
fn agents_authenticate_with_client_certificates() {
    let dir = tmpdir("mtls");
    let ca = |name: &str| {
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    };
    ca("ca");
    ca("rogue");
    let leaf = |issuer: &str, dns: &str| {
        let base = format!("{dns}-{issuer}");
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={dns}"),
                "-keyout",
                &format!("{base}.key"),
                "-out",
                &format!("{base}.csr"),
            ],
        );
        std::fs::write(
            dir.join(format!("{base}.ext")),
            format!("subjectAltName=DNS:{dns}\nextendedKeyUsage=clientAuth\n"),
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{base}.csr"),
                "-CA",
                &format!("{issuer}.pem"),
                "-CAkey",
                &format!("{issuer}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{base}.ext"),
                "-out",
                &format!("{base}.pem"),
            ],
        );
        base
    };
    let good = leaf("ca", "prod");
    let other = leaf("ca", "staging");
    let rogue = leaf("rogue", "prod");
    let port = free_port();
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[tls]\nself_signed = true\nclient_ca = \"{}/ca.pem\"\n[[agent]]\nname = \"prod\"\nmtls = true\n[[agent]]\nname = \"staging\"\ntoken_sha256 = \"{}\"\n",
            dir.display(),
            sha256_hex("staging-token")
        ),
    )
    .unwrap();
    let server = Proc::spawn(
        "server",
        &[
            "server".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
    );
    assert!(
        server.wait_log("fingerprint=", Duration::from_secs(10)),
        "{}",
        server.log_text()
    );
    let fp = server
        .log_text()
        .split("fingerprint=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let agent = |name: &str, cert: &str| {
        Proc::spawn(
            "agent",
            &[
                "agent".into(),
                "--server".into(),
                format!("wss://127.0.0.1:{port}"),
                "--fingerprint".into(),
                fp.clone(),
                "--name".into(),
                name.into(),
                "--config".into(),
                {
                    let p = dir.join(format!("agent-{cert}.toml"));
                    std::fs::write(&p, format!("client_cert = \"{0}/{cert}.pem\"\nclient_key = \"{0}/{cert}.key\"\n[services]\nx = \"127.0.0.1:9\"\n", dir.display())).unwrap();
                    p.display().to_string()
                },
            ],
        )
    };
    let ok = agent("prod", &good);
    assert!(
        ok.wait_log("registered as prod", Duration::from_secs(15)),
        "{}",
        ok.log_text()
    );
    assert!(
        server.wait_log("auth=\"certificate\"", Duration::from_secs(5))
            || server.log_text().contains("auth=certificate"),
        "{}",
        server.log_text()
    );
    // A certificate for another name, or from another CA, is no credential.
    let wrong_name = agent("prod", &other);
    assert!(
        wrong_name.wait_log("401", Duration::from_secs(10)),
        "{}",
        wrong_name.log_text()
    );
    // It is told why: the certificate, not a missing token.
    assert!(
        wrong_name
            .log_text()
            .contains("client certificate not accepted: the certificate has no DNS name \"prod\""),
        "{}",
        wrong_name.log_text()
    );
    let wrong_ca = agent("prod", &rogue);
    assert!(
        wrong_ca.wait_log("cannot connect", Duration::from_secs(10)),
        "{}",
        wrong_ca.log_text()
    );
    assert!(!wrong_ca.log_text().contains("registered as"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload that takes an identity's access away ends its request while
/// the body is still being sent (a long upload), not after the service has
/// taken all of it and answered.
#[test]
fn a_revoked_upload_is_cut_while_it_is_sent() {
    let toml = |alice: bool| {
        let mut t = prod_agent();
        if alice {
            t.push_str(&format!(
                "[[client]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\nallow = [\"prod/web\"]\n",
                sha256_hex("alice-token")
            ));
        }
        t
    };
    let s = Setup::start("revoked-upload", &toml(true));
    let file = s.dir.join("upload");
    std::fs::write(&file, vec![b'u'; 4 << 20]).unwrap();
    // 4 MiB at 256 KiB/s: about 16 s to send.
    let upload = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--limit-rate", "256K", "-H", "Expect:"])
        .args(["-H", "Authorization: Bearer alice-token", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(s.url("/a/prod/web/upload"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(
        &s.cfg_path,
        format!("listen = \"127.0.0.1:{}\"\n{}", s.port, toml(false)),
    )
    .unwrap();
    s.server.signal(Signal::HUP);
    assert!(s
        .server
        .wait_log("configuration reloaded", Duration::from_secs(10)));
    let reloaded = std::time::Instant::now();
    let out = upload.wait_with_output().unwrap();
    let took = reloaded.elapsed();
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        took < Duration::from_secs(6),
        "the upload went on for {took:?} after the reload (curl: {code} {})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(code, "403", "the revoked upload is told why");
}
