//! Harness for the high-availability tests (`ha.rs`): several server
//! replicas, each on its own loopback address (or in a network namespace),
//! HAProxy in front of them with a clients and an agents frontend (as in
//! `shared/design/high-availability.md`, "Testing it for real on one
//! machine"), dnsmasq for peers found by DNS, a pool of agent instances,
//! and load loops that count every failed request.
//!
//! One certificate, valid for the load balancer's address (and
//! `tether.test`) only, serves every replica: agents dial the replicas'
//! own addresses and must still check TLS against the load balancer's
//! name. Clients pinned to one replica pin the certificate's fingerprint.

use super::*;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The agent name every instance of the pool registers as.
pub(crate) const AGENT: &str = "prod";
/// What the `web` service of the loopback tests puts in every answer.
pub(crate) const WEB_MARKER: &str = "tether-ha-web-marker";
/// Length of the `src` service's answer (deterministic [`Pattern`]).
pub(crate) const SRC_LEN: u64 = 60 * 1024 * 1024;
/// The `slow` service sends this many chunks, one per second.
pub(crate) const SLOW_CHUNKS: usize = 10;
/// Size of one `slow` chunk.
pub(crate) const SLOW_CHUNK: usize = 32 * 1024;
/// Seed of the `slow` service's [`Pattern`].
pub(crate) const SLOW_SEED: u64 = 0x51_0e;

// ---------------------------------------------------------------------------
// Tools, privileges, directories.
// ---------------------------------------------------------------------------

/// Whether `tool` is on the PATH.
pub(crate) fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this runs under CI (`.ci/run` exports `CI=true`).
pub(crate) fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// True when `tool` is installed. Without it the test fails under CI and
/// prints SKIPPED elsewhere (the caller then returns).
pub(crate) fn require_tool(test: &str, tool: &str, package: &str) -> bool {
    if have_tool(tool) {
        return true;
    }
    assert!(
        !under_ci(),
        "{test}: `{tool}` is not installed; CI must have it (.ci/run installs the package {package})"
    );
    eprintln!("SKIPPED {test}: `{tool}` is not installed (apt-get install {package})");
    false
}

/// Whether the test runs as root (network namespaces need it).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A directory for one test's files and logs: removed when the test
/// passes, kept (and named on stderr) when it fails or when
/// `TETHER_TEST_KEEP_LOGS` is set.
pub(crate) struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub(crate) fn new(tag: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!(
            "tether-ha-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("test dir");
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("TETHER_TEST_KEEP_LOGS").is_some() {
            eprintln!("----- logs kept in {} -----", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Where processes run: the test's own network namespace, or one it made.
// ---------------------------------------------------------------------------

/// The network namespace processes and probes run in.
#[derive(Clone, Debug)]
pub(crate) enum Net {
    /// The test's own namespace (loopback addresses only).
    Root,
    /// A namespace the test created (`ip netns exec NAME ...`).
    Ns(String),
}

impl Net {
    /// A command for `program`, run in this namespace.
    pub(crate) fn command(&self, program: &str) -> Command {
        match self {
            Net::Root => Command::new(program),
            Net::Ns(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
        }
    }

    /// A plain HTTP GET (status, body) from inside this namespace.
    pub(crate) fn http_get(&self, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        match self {
            Net::Root => http_get(addr, path),
            Net::Ns(_) => {
                let out = self
                    .command("curl")
                    .args(["-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"])
                    .arg(format!("http://{addr}{path}"))
                    .stderr(Stdio::null())
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let (body, code) = text.rsplit_once('\n')?;
                let code: u16 = code.trim().parse().ok()?;
                (code != 0).then(|| (code, body.to_owned()))
            }
        }
    }

    /// Whether a TCP connection to `addr` succeeds from this namespace.
    pub(crate) fn tcp_connects(&self, addr: SocketAddr) -> bool {
        match self {
            Net::Root => StdStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok(),
            Net::Ns(_) => self
                .command("bash")
                .arg("-c")
                .arg(format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        }
    }
}

/// Runs `ip ARGS` and panics with its output when it fails.
pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made by the test; on drop every process still in it
/// (all started by the test) is killed and the namespace is deleted, which
/// also removes the veth ends inside it.
pub(crate) struct Netns {
    pub name: String,
}

impl Netns {
    pub(crate) fn create(tag: &str) -> Netns {
        let name = format!("tha{}{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub(crate) fn net(&self) -> Net {
        Net::Ns(self.name.clone())
    }
}

/// A hosts file for one namespace (`/etc/netns/NAME/hosts`, which `ip
/// netns exec` mounts over `/etc/hosts`), removed on drop.
pub(crate) struct NetnsHosts(PathBuf);

impl NetnsHosts {
    pub(crate) fn write(ns: &Netns, hosts: &str) -> NetnsHosts {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).expect("/etc/netns/NAME");
        let made = NetnsHosts(dir);
        std::fs::write(made.0.join("hosts"), hosts).expect("hosts file");
        made
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    signal_process(pid, Signal::KILL);
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// ---------------------------------------------------------------------------
// Processes.
// ---------------------------------------------------------------------------

impl Proc {
    /// Starts `tether ARGS` in `net`; its output goes to `dir/NAME-N.log`.
    pub(crate) fn spawn_in(net: &Net, dir: &Path, name: &str, args: &[String]) -> Proc {
        Self::spawn_in_env(net, dir, name, args, &[])
    }

    /// Like [`Proc::spawn_in`], with extra environment variables.
    pub(crate) fn spawn_in_env(
        net: &Net,
        dir: &Path,
        name: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Proc {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(format!("{name}-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = net
            .command(env!("CARGO_BIN_EXE_tether"))
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn tether");
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Waits (bounded) for the process to exit: its status, or `None` while
    /// it still runs after `timeout`.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` log lines that contain any of `needles`.
    pub(crate) fn log_lines(&self, needles: &[&str], n: usize) -> String {
        let text = self.log_text();
        let hits: Vec<&str> = text
            .lines()
            .filter(|l| needles.iter().any(|k| l.contains(k)))
            .collect();
        hits[hits.len().saturating_sub(n)..].join("\n")
    }
}

// ---------------------------------------------------------------------------
// Certificates.
// ---------------------------------------------------------------------------

/// A CA and a certificate it signed for `tether.test` and the load
/// balancer's address only.
pub(crate) struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 of the certificate, `AB:CD:...`.
    pub fingerprint: String,
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Pki {
    pub(crate) fn new(dir: &Path, lb: IpAddr) -> Pki {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tether ha test CA",
        ]);
        openssl(dir, &a);
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=tether.test",
        ]);
        openssl(dir, &a);
        std::fs::write(
            dir.join("ext.cnf"),
            format!("subjectAltName=DNS:tether.test,IP:{lb}\nbasicConstraints=CA:FALSE\n"),
        )
        .expect("write ext.cnf");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let fp = openssl(
            dir,
            &[
                "x509",
                "-in",
                "server.pem",
                "-noout",
                "-fingerprint",
                "-sha256",
            ],
        );
        let fingerprint = fp
            .trim()
            .rsplit_once('=')
            .map(|(_, f)| f.to_owned())
            .unwrap_or_else(|| panic!("no fingerprint in {fp:?}"));
        Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            fingerprint,
        }
    }
}

// ---------------------------------------------------------------------------
// HAProxy.
// ---------------------------------------------------------------------------

/// One backend server in the HAProxy config: name, TLS address, metrics port.
pub(crate) struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub metrics_port: u16,
}

/// The two frontends of the design: `clients` (health-checked on
/// `/readyz`, soft-stopped by its 404) and `agents` (on `/livez`, so agents
/// reach a replica that is still warming up).
pub(crate) fn haproxy_config(
    sock: &Path,
    clients: SocketAddr,
    agents: SocketAddr,
    servers: &[Backend],
    agent_servers: &[Backend],
) -> String {
    let list = |servers: &[Backend]| {
        let mut lines = String::new();
        for s in servers {
            let _ = writeln!(
                lines,
                "    server {} {} check port {}",
                s.name, s.addr, s.metrics_port
            );
        }
        lines
    };
    let (lines, agent_lines) = (list(servers), list(agent_servers));
    format!(
        r#"global
    stats socket "{sock}" mode 600 level admin
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 2
    # Redispatch on every retry: a connection refused by a replica that
    # just died goes to another one at once (HAProxy waits its turn-around
    # second only before retrying the same server).
    option redispatch 1
listen clients
    bind {clients}
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host tether.test
    http-check expect status 200
    http-check disable-on-404
    default-server inter 500ms fall 2 rise 2
{lines}listen agents
    bind {agents}
    option httpchk
    http-check send meth GET uri /livez ver HTTP/1.1 hdr Host tether.test
    default-server inter 500ms fall 2 rise 1
{agent_lines}"#,
        sock = sock.display()
    )
}

/// HAProxy in the foreground (`-db`), killed on drop.
pub(crate) struct Haproxy {
    child: Child,
    pub log: PathBuf,
    pub sock: PathBuf,
}

/// One server line of `show stat`.
#[derive(Debug, Clone)]
pub(crate) struct HaServer {
    pub proxy: String,
    pub server: String,
    pub status: String,
    /// Connections it was given so far (`stot`).
    pub total: u64,
}

impl Haproxy {
    pub(crate) fn start(net: &Net, dir: &Path, config: &str) -> Haproxy {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).expect("write haproxy.cfg");
        let check = net
            .command("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy rejects its config:\n{}{}\n{config}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = dir.join("haproxy.log");
        let file = std::fs::File::create(&log).expect("haproxy log");
        let child = net
            .command("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn haproxy");
        let h = Haproxy {
            child,
            log,
            sock: dir.join("haproxy.sock"),
        };
        assert!(
            wait_until(Duration::from_secs(10), || !h.stat().is_empty()),
            "haproxy did not start:\n{}",
            h.log_text()
        );
        h
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one command on the stats socket (unix sockets are files, so
    /// this works whatever namespace HAProxy runs in).
    pub(crate) fn command(&self, cmd: &str) -> String {
        let Ok(mut s) = UnixStream::connect(&self.sock) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        if s.write_all(format!("{cmd}\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// Every server line of `show stat`.
    pub(crate) fn stat(&self) -> Vec<HaServer> {
        let text = self.command("show stat");
        let mut lines = text.lines();
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| cols.iter().position(|c| *c == name);
        let (Some(px), Some(sv), Some(st), Some(stot)) =
            (col("pxname"), col("svname"), col("status"), col("stot"))
        else {
            return Vec::new();
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st.max(stot) && f[sv] != "FRONTEND" && f[sv] != "BACKEND")
            .map(|f| HaServer {
                proxy: f[px].to_owned(),
                server: f[sv].to_owned(),
                status: f[st].to_owned(),
                total: f[stot].parse().unwrap_or(0),
            })
            .collect()
    }

    /// The status of one server (`UP`, `DOWN`, `NOLB`, `UP 1/2`, ...).
    pub(crate) fn status(&self, proxy: &str, server: &str) -> Option<String> {
        self.server(proxy, server).map(|s| s.status)
    }

    pub(crate) fn server(&self, proxy: &str, server: &str) -> Option<HaServer> {
        self.stat()
            .into_iter()
            .find(|s| s.proxy == proxy && s.server == server)
    }

    /// `proxy/server=STATUS ...` for messages.
    pub(crate) fn summary(&self) -> String {
        self.stat()
            .iter()
            .map(|s| format!("{}/{}={} (conns {})", s.proxy, s.server, s.status, s.total))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- haproxy log ({}) -----", self.log.display());
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// dnsmasq.
// ---------------------------------------------------------------------------

/// dnsmasq on 127.0.0.1:`port`, answering from a hosts file only (re-read on
/// SIGHUP), TTL 1 s, logging queries; killed on drop.
pub(crate) struct Dnsmasq {
    child: Child,
    pub hosts: PathBuf,
    pub log: PathBuf,
    pub port: u16,
}

impl Dnsmasq {
    pub(crate) fn start(dir: &Path, port: u16, hosts: &str) -> Dnsmasq {
        let hosts_path = dir.join("hosts.txt");
        std::fs::write(&hosts_path, hosts).expect("write hosts.txt");
        let log = dir.join("dnsmasq.log");
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--user=root",
                "--local=/test/",
                "--local-ttl=1",
                &format!("--addn-hosts={}", hosts_path.display()),
                "--log-queries",
                &format!("--log-facility={}", log.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        let d = Dnsmasq {
            child,
            hosts: hosts_path,
            log,
            port,
        };
        assert!(
            wait_until(Duration::from_secs(10), || {
                StdStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "dnsmasq did not start on port {port}"
        );
        d
    }

    /// Replaces the hosts file and tells dnsmasq to read it again.
    pub(crate) fn set_hosts(&self, hosts: &str) {
        let tmp = self.hosts.with_extension("new");
        std::fs::write(&tmp, hosts).expect("write hosts");
        std::fs::rename(&tmp, &self.hosts).expect("rename hosts");
        signal_process(self.child.id(), Signal::HUP);
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Services the agents offer (in the test process, on loopback).
// ---------------------------------------------------------------------------

/// Sends [`SLOW_CHUNKS`] chunks of [`SLOW_CHUNK`] bytes, one per second
/// (the first at once), then closes: a ~10 s stream.
pub(crate) async fn slow_source() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind slow");
    let addr = l.local_addr().expect("slow addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut gen = Pattern::new(SLOW_SEED);
                let mut buf = vec![0u8; SLOW_CHUNK];
                for i in 0..SLOW_CHUNKS {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    gen.fill(&mut buf);
                    if s.write_all(&buf).await.is_err() {
                        return;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// echo, web (HTTP, answers with [`WEB_MARKER`]), src ([`SRC_LEN`] bytes)
/// and slow ([`slow_source`]) on their own runtime, so the tests can block.
pub(crate) struct HaServices {
    _rt: tokio::runtime::Runtime,
    pub echo: SocketAddr,
    pub web: SocketAddr,
    pub src: SocketAddr,
    pub slow: SocketAddr,
}

impl HaServices {
    pub(crate) fn start() -> HaServices {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (echo, web, src, slow) = rt.block_on(async {
            (
                echo_service().await,
                http_service(WEB_MARKER).await,
                source_service(SRC_LEN).await,
                slow_source().await,
            )
        });
        HaServices {
            _rt: rt,
            echo,
            web,
            src,
            slow,
        }
    }

    /// `NAME=SPEC` for the agents' `--service` flags.
    pub(crate) fn agent_services(&self) -> Vec<String> {
        vec![
            format!("echo={}", self.echo),
            format!("web=http://{}", self.web),
            format!("src={}", self.src),
            format!("slow={}", self.slow),
        ]
    }
}

// ---------------------------------------------------------------------------
// Byte checks ([`Verifier`] is in the parent module).
// ---------------------------------------------------------------------------

/// One stream read from a local forward (blocking), checked as it comes.
pub(crate) struct Download {
    pub sock: StdStream,
    pub check: Verifier,
    pub ended: Option<std::io::Result<()>>,
}

impl Download {
    pub(crate) fn open(port: u16, seed: u64, block: usize) -> Download {
        let sock = StdStream::connect(("127.0.0.1", port)).expect("connect to the forward");
        Download {
            sock,
            check: Verifier::new(seed, block),
            ended: None,
        }
    }

    /// Reads until `upto` bytes in all, the end of the stream, or `timeout`.
    pub(crate) fn read_until(&mut self, upto: u64, timeout: Duration) {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while self.ended.is_none() && self.check.total < upto {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let _ = self
                .sock
                .set_read_timeout(Some(left.min(Duration::from_millis(200))));
            let want = ((upto - self.check.total) as usize).min(buf.len());
            match self.sock.read(&mut buf[..want]) {
                Ok(0) => self.ended = Some(Ok(())),
                Ok(n) => self.check.update(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => self.ended = Some(Err(e)),
            }
        }
    }

    /// Reads to the end of the stream (bounded by `timeout`).
    pub(crate) fn read_to_end(&mut self, timeout: Duration) {
        self.read_until(u64::MAX, timeout);
    }
}

/// One request through a local TCP forward to an echo service: a new
/// connection, `msg`, half-close, the whole echo back.
pub(crate) fn echo_once(port: u16, msg: &[u8], timeout: Duration) -> Result<(), String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = StdStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    match s.read_to_end(&mut back) {
        Ok(_) if back == msg => Ok(()),
        Ok(_) => Err(format!(
            "echo got {} of {} bytes back ({:?})",
            back.len(),
            msg.len(),
            String::from_utf8_lossy(&back[..back.len().min(60)])
        )),
        Err(e) => Err(format!("read after {} bytes: {e}", back.len())),
    }
}

// ---------------------------------------------------------------------------
// Load loops and a timeline of what the test did.
// ---------------------------------------------------------------------------

/// What the test did when (for messages next to failed requests).
#[derive(Clone)]
pub(crate) struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Timeline {
    pub(crate) fn new() -> Timeline {
        Timeline {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    pub(crate) fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let at = self.start.elapsed();
        eprintln!("[{:7.3}s] {what}", at.as_secs_f64());
        if let Ok(mut e) = self.events.lock() {
            e.push((at, what));
        }
    }

    pub(crate) fn render(&self) -> String {
        self.events
            .lock()
            .map(|e| {
                e.iter()
                    .map(|(t, w)| format!("  {:7.3}s {w}", t.as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

/// What one load loop saw.
#[derive(Debug, Default)]
pub(crate) struct LoadStats {
    pub name: String,
    pub ok: usize,
    /// (time since the timeline's start, what went wrong)
    pub failures: Vec<(Duration, String)>,
    pub latencies: Vec<Duration>,
    /// When each successful request began (since the timeline's start).
    pub ok_at: Vec<Duration>,
}

impl LoadStats {
    /// Successful requests that began between `from` and `to`.
    pub(crate) fn ok_between(&self, from: Duration, to: Duration) -> usize {
        self.ok_at
            .iter()
            .filter(|t| **t >= from && **t <= to)
            .count()
    }

    pub(crate) fn total(&self) -> usize {
        self.ok + self.failures.len()
    }

    /// The `p`th percentile (0..=100) of request latencies.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        let i = ((l.len() - 1) as f64 * p / 100.0).round() as usize;
        l[i.min(l.len() - 1)]
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "{}: {} requests, {} failed, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.name,
            self.total(),
            self.failures.len(),
            self.percentile(50.0).as_secs_f64() * 1e3,
            self.percentile(99.0).as_secs_f64() * 1e3,
            self.percentile(100.0).as_secs_f64() * 1e3,
        )
    }

    /// The first `n` failures, one a line.
    pub(crate) fn failures_text(&self, n: usize) -> String {
        self.failures
            .iter()
            .take(n)
            .map(|(t, e)| format!("  {:7.3}s {}: {e}", t.as_secs_f64(), self.name))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A thread making one request after another (`f(n)`), with `pause`
/// between them, until stopped or `max` has passed.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<LoadStats>,
}

impl Load {
    pub(crate) fn start(
        name: &str,
        tl: &Timeline,
        pause: Duration,
        max: Duration,
        mut f: impl FnMut(u64) -> Result<(), String> + Send + 'static,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let t0 = tl.start();
        let name = name.to_owned();
        let handle = std::thread::spawn(move || {
            let mut st = LoadStats {
                name,
                ..Default::default()
            };
            let end = Instant::now() + max;
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < end {
                let began = Instant::now();
                match f(n) {
                    Ok(()) => {
                        st.ok += 1;
                        st.latencies.push(began.elapsed());
                        st.ok_at.push(began.duration_since(t0));
                    }
                    Err(e) => st.failures.push((began.duration_since(t0), e)),
                }
                n += 1;
                std::thread::sleep(pause);
            }
            st
        });
        Load { stop, handle }
    }

    pub(crate) fn stop(self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

// ---------------------------------------------------------------------------
// The cluster: replicas, HAProxy, agent instances.
// ---------------------------------------------------------------------------

/// How replicas find their peers.
#[derive(Clone, Debug)]
pub(crate) enum Peers {
    /// `--peer rN=IP:PORT` for every replica of the spec.
    Static,
    /// `--peers-dns NAME:PORT --peers-dns-server SERVER`.
    Dns { name: String, server: SocketAddr },
}

/// What [`Cluster::start`] builds.
pub(crate) struct ClusterSpec {
    pub tag: String,
    /// The load balancer's address (clients and agents frontends).
    pub lb: IpAddr,
    /// Every replica HAProxy lists (`r1`, `r2`, ... in order).
    pub replica_ips: Vec<IpAddr>,
    /// How many of them `start` runs (the first ones).
    pub start_replicas: usize,
    /// Replicas (0-based) left out of HAProxy's agents frontend.
    pub lb_agents_skip: Vec<usize>,
    pub peers: Peers,
    pub server_args: Vec<String>,
    /// Agent instances (`a1`, `a2`, ...).
    pub agents: usize,
    /// `NAME=SPEC` services of every agent instance.
    pub services: Vec<String>,
    pub agent_args: Vec<String>,
    pub server_net: Net,
    pub agent_net: Net,
    /// What the `web` service's answers contain.
    pub web_marker: String,
}

impl ClusterSpec {
    /// Three replicas on 127.0.`block`.11-13, the load balancer on .10,
    /// static peers, two agent instances, everything in the test's
    /// namespace.
    pub(crate) fn loopback(tag: &str, block: u8, services: Vec<String>) -> ClusterSpec {
        ClusterSpec {
            tag: tag.to_owned(),
            lb: IpAddr::from([127, 0, block, 10]),
            replica_ips: (11..=13)
                .map(|i| IpAddr::from([127, 0, block, i]))
                .collect(),
            start_replicas: 3,
            lb_agents_skip: Vec::new(),
            peers: Peers::Static,
            server_args: Vec::new(),
            agents: 2,
            services,
            agent_args: Vec::new(),
            server_net: Net::Root,
            agent_net: Net::Root,
            web_marker: WEB_MARKER.to_owned(),
        }
    }
}

/// One server replica: its fixed arguments, and the current process.
pub(crate) struct Replica {
    pub id: String,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub args: Vec<String>,
    proc: Option<Proc>,
    /// Earlier processes of this replica (exited), for their logs.
    pub retired: Vec<Proc>,
    net: Net,
    dir: PathBuf,
}

impl Replica {
    /// Starts the replica (again), with the same arguments.
    pub(crate) fn start(&mut self) {
        if let Some(old) = self.proc.take() {
            self.retired.push(old);
        }
        self.proc = Some(Proc::spawn_in(&self.net, &self.dir, &self.id, &self.args));
    }

    pub(crate) fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("replica was started")
    }

    pub(crate) fn proc_mut(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("replica was started")
    }

    pub(crate) fn started(&self) -> bool {
        self.proc.is_some()
    }

    /// SIGKILL, like a crash or a node going away.
    pub(crate) fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
    }

    pub(crate) fn get(&self, path: &str) -> Option<(u16, String)> {
        self.net.http_get(self.metrics, path)
    }

    pub(crate) fn metrics_text(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    pub(crate) fn metric(&self, name: &str) -> Option<f64> {
        metric(&self.metrics_text(), name)
    }

    /// `tether_agent_instances{agent="prod"}` (0 when absent from a live
    /// replica's metrics; `None` when the metrics do not answer).
    pub(crate) fn instances(&self) -> Option<f64> {
        let text = self.get("/metrics")?.1;
        Some(
            metric(
                &text,
                &format!("tether_agent_instances{{agent=\"{AGENT}\"}}"),
            )
            .unwrap_or(0.0),
        )
    }

    /// Live CLI client sessions here.
    pub(crate) fn client_sessions(&self) -> f64 {
        metric(&self.metrics_text(), "tether_sessions{kind=\"client\"}").unwrap_or(0.0)
    }

    pub(crate) fn readyz(&self) -> Option<u16> {
        self.get("/readyz").map(|(s, _)| s)
    }

    pub(crate) fn livez(&self) -> Option<u16> {
        self.get("/livez").map(|(s, _)| s)
    }

    /// Whether its TLS port accepts connections.
    pub(crate) fn listening(&self) -> bool {
        self.net.tcp_connects(self.addr)
    }
}

/// One agent instance of the pool.
pub(crate) struct AgentInst {
    pub instance: String,
    pub metrics: SocketAddr,
    pub args: Vec<String>,
    proc: Option<Proc>,
    pub retired: Vec<Proc>,
    net: Net,
    dir: PathBuf,
}

impl AgentInst {
    pub(crate) fn start(&mut self) {
        if let Some(old) = self.proc.take() {
            self.retired.push(old);
        }
        self.proc = Some(Proc::spawn_in(
            &self.net,
            &self.dir,
            &format!("agent-{}", self.instance),
            &self.args,
        ));
    }

    pub(crate) fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("agent was started")
    }

    pub(crate) fn proc_mut(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("agent was started")
    }

    pub(crate) fn metric(&self, name: &str) -> Option<f64> {
        self.net
            .http_get(self.metrics, "/metrics")
            .and_then(|(_, b)| metric(&b, name))
    }

    /// `tether_agent_replica_sessions`.
    pub(crate) fn replica_sessions(&self) -> Option<f64> {
        self.metric("tether_agent_replica_sessions")
    }

    pub(crate) fn readyz(&self) -> Option<u16> {
        self.net.http_get(self.metrics, "/readyz").map(|(s, _)| s)
    }
}

/// Which way a request enters the cluster.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Via {
    /// Through HAProxy's clients frontend.
    Lb,
    /// Straight to replica `i` (0-based).
    Replica(usize),
}

/// Browser-style requests (curl, `Authorization: Bearer`, path routing
/// `/a/prod/web/...`), each on a new connection.
#[derive(Clone)]
pub(crate) struct Browser {
    net: Net,
    ca: PathBuf,
    lb: SocketAddr,
    replicas: Vec<SocketAddr>,
    marker: String,
}

impl Browser {
    /// GET `/a/prod/web{path}` through HAProxy or straight to a replica
    /// (TLS and `Host` still name the load balancer): Ok(body) when the
    /// answer is 200 with the web marker.
    pub(crate) fn get(&self, via: Via, path: &str) -> Result<String, String> {
        let mut cmd = self.net.command("curl");
        cmd.args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&self.ca)
            .args(["-H", &format!("Authorization: Bearer {CLIENT_TOKEN}")])
            .args(["-o", "-", "-w", "\n%{http_code}"]);
        if let Via::Replica(i) = via {
            let to = self.replicas[i];
            cmd.arg("--connect-to").arg(format!(
                "{}:{}:{}:{}",
                self.lb.ip(),
                self.lb.port(),
                to.ip(),
                to.port()
            ));
        }
        cmd.arg(format!("https://{}/a/{AGENT}/web{path}", self.lb));
        let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        if code.trim() == "200" && body.contains(&self.marker) {
            Ok(body.to_owned())
        } else {
            Err(format!(
                "HTTP {} (curl exit {:?}) {} {}",
                code.trim(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim(),
                body.chars()
                    .take(160)
                    .collect::<String>()
                    .replace('\n', " ")
            ))
        }
    }
}

/// A GET of `/` through a local forward (`http://127.0.0.1:PORT/`, curl in
/// `net`, a new connection): Ok when the answer is 200 and has `marker`.
pub(crate) fn forward_get(net: &Net, port: u16, marker: &str) -> Result<(), String> {
    let out = net
        .command("curl")
        .args(["-sS", "--max-time", "15", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    if code.trim() == "200" && body.contains(marker) {
        Ok(())
    } else {
        Err(format!(
            "HTTP {} (curl exit {:?}) {}",
            code.trim(),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Replicas, HAProxy and an agent pool; every process is killed on drop.
pub(crate) struct Cluster {
    // Processes first: they are dropped (killed) before the directory.
    pub agents: Vec<AgentInst>,
    pub replicas: Vec<Replica>,
    pub haproxy: Haproxy,
    pub pki: Pki,
    /// HAProxy's clients frontend (also every replica's port).
    pub lb_clients: SocketAddr,
    /// HAProxy's agents frontend.
    pub lb_agents: SocketAddr,
    pub server_net: Net,
    pub agent_net: Net,
    pub web_marker: String,
    /// From the agents' start to every started replica holding them all.
    pub agents_settled: Duration,
    pub dir: TestDir,
}

impl Cluster {
    pub(crate) fn start(spec: ClusterSpec) -> Cluster {
        let dir = TestDir::new(&spec.tag);
        let pki = Pki::new(&dir.path, spec.lb);
        let (port, agents_port, metrics_port) = (free_port(), free_port(), free_port());
        let lb_clients = SocketAddr::new(spec.lb, port);
        let lb_agents = SocketAddr::new(spec.lb, agents_port);
        let addrs: Vec<SocketAddr> = spec
            .replica_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
        let peer_args: Vec<String> = match &spec.peers {
            Peers::Static => addrs
                .iter()
                .enumerate()
                .flat_map(|(i, a)| ["--peer".to_owned(), format!("r{}={a}", i + 1)])
                .collect(),
            Peers::Dns { name, server } => vec![
                "--peers-dns".into(),
                format!("{name}:{port}"),
                "--peers-dns-server".into(),
                server.to_string(),
            ],
        };
        let replicas: Vec<Replica> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let id = format!("r{}", i + 1);
                let metrics = SocketAddr::new(addr.ip(), metrics_port);
                let mut args: Vec<String> = vec![
                    "server".into(),
                    "--listen".into(),
                    addr.to_string(),
                    "--tls-cert".into(),
                    pki.cert.display().to_string(),
                    "--tls-key".into(),
                    pki.key.display().to_string(),
                    "--agent".into(),
                    format!("{AGENT}={AGENT_TOKEN}"),
                    "--client".into(),
                    format!("dev={CLIENT_TOKEN}={AGENT}/*"),
                    "--replica-id".into(),
                    id.clone(),
                    "--advertise".into(),
                    addr.to_string(),
                    "--metrics-listen".into(),
                    metrics.to_string(),
                ];
                args.extend(peer_args.iter().cloned());
                args.extend(spec.server_args.iter().cloned());
                Replica {
                    id,
                    addr: *addr,
                    metrics,
                    args,
                    proc: None,
                    retired: Vec::new(),
                    net: spec.server_net.clone(),
                    dir: dir.path.clone(),
                }
            })
            .collect();
        let agents: Vec<AgentInst> = (1..=spec.agents)
            .map(|k| {
                let instance = format!("a{k}");
                let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
                let mut args: Vec<String> = vec![
                    "agent".into(),
                    "--server".into(),
                    format!("wss://{lb_agents}"),
                    "--ca-file".into(),
                    pki.ca.display().to_string(),
                    "--name".into(),
                    AGENT.into(),
                    "--token".into(),
                    AGENT_TOKEN.into(),
                    "--instance".into(),
                    instance.clone(),
                    "--metrics-listen".into(),
                    metrics.to_string(),
                ];
                for s in &spec.services {
                    args.push("--service".into());
                    args.push(s.clone());
                }
                args.extend(spec.agent_args.iter().cloned());
                AgentInst {
                    instance,
                    metrics,
                    args,
                    proc: None,
                    retired: Vec::new(),
                    net: spec.agent_net.clone(),
                    dir: dir.path.clone(),
                }
            })
            .collect();
        let backend = |r: &Replica| Backend {
            name: r.id.clone(),
            addr: r.addr,
            metrics_port,
        };
        let backends: Vec<Backend> = replicas.iter().map(backend).collect();
        let agent_backends: Vec<Backend> = replicas
            .iter()
            .enumerate()
            .filter(|(i, _)| !spec.lb_agents_skip.contains(i))
            .map(|(_, r)| backend(r))
            .collect();
        let cfg = haproxy_config(
            &dir.path.join("haproxy.sock"),
            lb_clients,
            lb_agents,
            &backends,
            &agent_backends,
        );
        let haproxy = Haproxy::start(&spec.server_net, &dir.path, &cfg);
        let mut c = Cluster {
            agents,
            replicas,
            haproxy,
            pki,
            lb_clients,
            lb_agents,
            server_net: spec.server_net,
            agent_net: spec.agent_net,
            web_marker: spec.web_marker,
            agents_settled: Duration::ZERO,
            dir,
        };
        for i in 0..spec.start_replicas {
            c.replicas[i].start();
        }
        for i in 0..spec.start_replicas {
            let r = &c.replicas[i];
            assert!(
                wait_until(Duration::from_secs(15), || r.livez() == Some(200)
                    && r.listening()),
                "replica {} did not come up (/livez on {}, TLS on {})\n{}",
                r.id,
                r.metrics,
                r.addr,
                c.diag()
            );
        }
        let began = Instant::now();
        for a in &mut c.agents {
            a.start();
        }
        let n = c.agents.len() as f64;
        let live: Vec<usize> = (0..spec.start_replicas).collect();
        assert!(
            wait_until(Duration::from_secs(30), || live
                .iter()
                .all(|&i| c.replicas[i].instances() == Some(n))),
            "the agent instances did not reach every replica within 30 s\n{}",
            c.diag()
        );
        c.agents_settled = began.elapsed();
        for &i in &live {
            c.wait_in_rotation(i, Duration::from_secs(25));
        }
        c
    }

    /// Waits until replica `i` answers /readyz 200 and HAProxy's clients
    /// frontend has it UP; panics (with the cluster's state) otherwise.
    pub(crate) fn wait_in_rotation(&self, i: usize, timeout: Duration) {
        let r = &self.replicas[i];
        assert!(
            wait_until(timeout, || r.readyz() == Some(200)),
            "replica {} not ready (/readyz 200) within {timeout:?}\n{}",
            r.id,
            self.diag()
        );
        assert!(
            wait_until(Duration::from_secs(10), || self
                .haproxy
                .status("clients", &r.id)
                .is_some_and(|s| s == "UP")),
            "HAProxy did not put {} UP in the clients frontend\n{}",
            r.id,
            self.diag()
        );
    }

    /// Waits until every started replica holds `n` agent instances.
    pub(crate) fn wait_instances_everywhere(&self, n: f64, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.replicas
                .iter()
                .filter(|r| r.started())
                .all(|r| r.instances() == Some(n))
        })
    }

    /// `wss://LB:PORT`: what clients and browsers are told to use.
    pub(crate) fn lb_url(&self) -> String {
        format!("wss://{}", self.lb_clients)
    }

    fn client_args(&self, via: Via, forwards: &[(u16, &str)]) -> Vec<String> {
        let mut args: Vec<String> = vec!["client".into(), "--server".into()];
        match via {
            Via::Lb => {
                args.push(self.lb_url());
                args.push("--ca-file".into());
                args.push(self.pki.ca.display().to_string());
            }
            Via::Replica(i) => {
                args.push(format!("wss://{}", self.replicas[i].addr));
                args.push("--fingerprint".into());
                args.push(self.pki.fingerprint.clone());
            }
        }
        args.extend(["--token".into(), CLIENT_TOKEN.into(), "forward".into()]);
        for (port, target) in forwards {
            args.push(format!("127.0.0.1:{port}={target}"));
        }
        args
    }

    /// A `tether client forward` through HAProxy or pinned to one replica
    /// (`--fingerprint`: the certificate names the load balancer only),
    /// connected.
    pub(crate) fn client(&self, via: Via, forwards: &[(u16, &str)]) -> Proc {
        let name = match via {
            Via::Lb => "client-lb".to_owned(),
            Via::Replica(i) => format!("client-{}", self.replicas[i].id),
        };
        let p = Proc::spawn_in(
            &self.server_net,
            &self.dir.path,
            &name,
            &self.client_args(via, forwards),
        );
        assert!(
            p.wait_log("connected", Duration::from_secs(15)),
            "{name} did not connect:\n{}\n{}",
            p.log_text(),
            self.diag()
        );
        p
    }

    /// Starts LB clients one by one until one lands on replica `i` (seen in
    /// its client session count); returns it (others are dropped).
    pub(crate) fn lb_client_on(&self, i: usize, forwards: &[(u16, &str)]) -> Proc {
        for _ in 0..6 {
            let before = self.replicas[i].client_sessions();
            let p = self.client(Via::Lb, forwards);
            if wait_until(Duration::from_secs(2), || {
                self.replicas[i].client_sessions() > before
            }) {
                return p;
            }
        }
        panic!(
            "no client through HAProxy landed on {} in 6 tries\n{}",
            self.replicas[i].id,
            self.diag()
        )
    }

    /// A browser-style requester for this cluster, to use from threads.
    pub(crate) fn browser(&self) -> Browser {
        Browser {
            net: self.server_net.clone(),
            ca: self.pki.ca.clone(),
            lb: self.lb_clients,
            replicas: self.replicas.iter().map(|r| r.addr).collect(),
            marker: self.web_marker.clone(),
        }
    }

    /// See [`Browser::get`].
    pub(crate) fn browser_get(&self, via: Via, path: &str) -> Result<String, String> {
        self.browser().get(via, path)
    }

    /// The cluster's state and each process's recent warnings, for messages.
    pub(crate) fn diag(&self) -> String {
        let mut s = String::from("--- cluster state ---\n");
        for r in &self.replicas {
            let _ = writeln!(
                s,
                "{} {}: instances={:?} readyz={:?} livez={:?} client_sessions={}",
                r.id,
                r.addr,
                r.instances(),
                r.readyz(),
                r.livez(),
                r.client_sessions()
            );
        }
        for a in &self.agents {
            let _ = writeln!(
                s,
                "agent {}: replica_sessions={:?} replicas_missing={:?} readyz={:?}",
                a.instance,
                a.replica_sessions(),
                a.metric("tether_agent_replicas_missing"),
                a.readyz()
            );
        }
        let _ = writeln!(s, "haproxy: {}", self.haproxy.summary());
        let keys = [
            "WARN",
            "ERROR",
            "GOAWAY",
            "not_here",
            "agent_offline",
            "panic",
        ];
        let procs = self
            .replicas
            .iter()
            .flat_map(|r| r.retired.iter().chain(r.proc.iter()))
            .chain(
                self.agents
                    .iter()
                    .flat_map(|a| a.retired.iter().chain(a.proc.iter())),
            );
        for p in procs {
            let lines = p.log_lines(&keys, 12);
            if !lines.is_empty() {
                let _ = writeln!(s, "--- {} ({}) ---\n{lines}", p.name, p.log.display());
            }
        }
        s
    }

    /// SIGTERM replica `i`, expect exit code 0 within `exit_within`, start
    /// it again with the same arguments, and wait until it is ready, back
    /// in HAProxy's rotation and holding every agent instance.
    pub(crate) fn restart_replica(&mut self, i: usize, exit_within: Duration, tl: &Timeline) {
        let id = self.replicas[i].id.clone();
        tl.note(format!("SIGTERM {id}"));
        self.replicas[i].proc().signal(Signal::TERM);
        // Draining starts with /readyz 404 (HAProxy's soft stop) while the
        // replica keeps serving (this expects a shutdown delay of 2 s).
        let r = &self.replicas[i];
        let said_404 = wait_until(Duration::from_secs(1), || r.readyz() == Some(404));
        tl.note(format!("{id} /readyz 404 after SIGTERM: {said_404}"));
        assert!(
            said_404,
            "{id}: /readyz did not answer 404 within 1 s of SIGTERM\n{}",
            self.diag()
        );
        // Kubernetes' question (still serving?) has the other answer until
        // the listeners close at the end of the delay, then the same.
        let serving = r.get("/readyz?exclude=shutdown").map(|(s, _)| s);
        tl.note(format!(
            "{id} /readyz?exclude=shutdown in the delay: {serving:?}"
        ));
        assert_eq!(
            serving,
            Some(200),
            "{id}: /readyz?exclude=shutdown not 200 in the shutdown delay\n{}",
            self.diag()
        );
        let stopped = wait_until(Duration::from_secs(4), || {
            r.get("/readyz?exclude=shutdown").map(|(s, _)| s) != Some(200)
        });
        assert!(
            stopped,
            "{id}: /readyz?exclude=shutdown still 200 4 s after SIGTERM (delay 2 s)\n{}",
            self.diag()
        );
        tl.note(format!("{id} /readyz?exclude=shutdown no longer 200"));
        let st = self.replicas[i].proc_mut().wait_exit(exit_within);
        tl.note(format!("{id} exited: {st:?}"));
        assert!(
            st.is_some_and(|s| s.success()),
            "{id} did not exit with code 0 within {exit_within:?} of SIGTERM: {st:?}\n{}\n{}",
            tl.render(),
            self.diag()
        );
        self.replicas[i].start();
        tl.note(format!("{id} started again"));
        self.wait_in_rotation(i, Duration::from_secs(25));
        tl.note(format!("{id} ready and UP in HAProxy"));
        let n = self.agents.len() as f64;
        let r = &self.replicas[i];
        assert!(
            wait_until(Duration::from_secs(15), || r.instances() == Some(n)),
            "{id} does not hold all {n} agent instances after its restart\n{}\n{}",
            tl.render(),
            self.diag()
        );
        tl.note(format!("{id} holds {n} agent instances"));
    }

    /// SIGTERM agent instance `k`, expect exit code 0, start it again and
    /// wait until it holds a session to every running replica.
    pub(crate) fn restart_agent(&mut self, k: usize, tl: &Timeline) {
        let inst = self.agents[k].instance.clone();
        tl.note(format!("SIGTERM agent {inst}"));
        self.agents[k].proc().signal(Signal::TERM);
        let st = self.agents[k].proc_mut().wait_exit(Duration::from_secs(20));
        tl.note(format!("agent {inst} exited: {st:?}"));
        assert!(
            st.is_some_and(|s| s.success()),
            "agent {inst} did not exit with code 0 within 20 s of SIGTERM: {st:?}\n{}\n{}",
            tl.render(),
            self.diag()
        );
        self.agents[k].start();
        tl.note(format!("agent {inst} started again"));
        let n = self.agents.len() as f64;
        let running = self.replicas.iter().filter(|r| r.started()).count() as f64;
        let a = &self.agents[k];
        assert!(
            wait_until(Duration::from_secs(15), || a.replica_sessions()
                == Some(running)
                && a.readyz() == Some(200))
                && self.wait_instances_everywhere(n, Duration::from_secs(10)),
            "agent {inst} did not get back to every replica\n{}\n{}",
            tl.render(),
            self.diag()
        );
        tl.note(format!("agent {inst} holds a session to every replica"));
    }
}
