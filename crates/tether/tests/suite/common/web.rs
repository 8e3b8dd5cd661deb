//! Harness for browser-access tests: sample apps (plain and HTTPS), an agent
//! offering them under several service kinds, and a TLS server with a base
//! domain for host routing.

use super::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub(crate) const BASE: &str = "tether.test";

/// Sample apps, an agent offering them, and a TLS server with a base domain.
pub(crate) struct Web {
    pub server: Proc,
    pub agent: Proc,
    pub apps: Vec<Proc>,
    pub port: u16,
    pub dir: PathBuf,
    _blackhole: Option<Box<dyn std::any::Any>>,
}

/// The lines of a console event stream (see [`Web::console_events`]).
pub(crate) type ConsoleLines = std::io::Lines<std::io::BufReader<std::process::ChildStdout>>;

/// Server config for `count` more offline agents, `fleet-0..` (numbers
/// `width` digits wide, token `fleet-token-N`), which dev may reach.
pub(crate) fn fleet_config(count: usize, width: usize) -> String {
    let mut config = String::new();
    for i in 0..count {
        config.push_str(&format!(
            "[[agent]]\nname = \"fleet-{i:0width$}\"\ntoken = \"fleet-token-{i:0width$}\"\n"
        ));
    }
    config.push_str("[[rule]]\nwho = [\"dev\"]\nallow = [\"fleet-*/*\"]\n");
    config
}

/// How to start the test server.
#[derive(Debug, Clone, Default)]
pub(crate) struct WebOpts {
    /// Plain HTTP instead of TLS.
    pub plain: bool,
    /// No base domain: path routing only (and, with TLS, `__Host-` cookies).
    pub no_base_domain: bool,
    /// Server config (TOML) given with `--config`, e.g. an `[http]` table.
    pub config: String,
    /// More lines for the agent's `[services]` table.
    pub services: String,
}

/// What one curl call saw.
#[derive(Debug)]
pub(crate) struct CurlOut {
    pub status: u16,
    pub headers: String,
    pub body: String,
    pub raw: Vec<u8>,
    /// curl's own error output (empty when all went well).
    pub stderr: String,
}

impl CurlOut {
    /// All values of a response header (lowercase name).
    pub(crate) fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().last()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

impl Web {
    pub(crate) fn start() -> Web {
        Self::start_opts(true)
    }

    pub(crate) fn start_opts(tls: bool) -> Web {
        Self::start_with(WebOpts {
            plain: !tls,
            ..Default::default()
        })
    }

    pub(crate) fn start_with(opts: WebOpts) -> Web {
        let tls = !opts.plain;
        let dir =
            std::env::temp_dir().join(format!("tether-web-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let (app_port, tls_app_port) = (free_port(), free_port());
        let app = Proc::spawn(
            "sample-app",
            &[
                "sample-app".into(),
                "--listen".into(),
                format!("127.0.0.1:{app_port}"),
            ],
        );
        let tls_app = Proc::spawn(
            "sample-app-tls",
            &[
                "sample-app".into(),
                "--listen".into(),
                format!("127.0.0.1:{tls_app_port}"),
                "--self-signed".into(),
            ],
        );
        assert!(app.wait_log("sample app listening", Duration::from_secs(10)));
        assert!(tls_app.wait_log("sample app listening", Duration::from_secs(10)));
        let port = free_port();
        let mut args: Vec<String> = [
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--agent",
            &format!("prod={AGENT_TOKEN}"),
            "--agent",
            "ghost=ghost-agent-token",
            "--client",
            &format!("dev={CLIENT_TOKEN}=prod/*,ghost/*"),
            "--client",
            &format!("limited={LIMITED_TOKEN}=prod/echo"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !opts.no_base_domain {
            args.extend(["--base-domain", BASE].map(String::from));
        }
        if !opts.config.is_empty() {
            let path = dir.join("server.toml");
            std::fs::write(&path, &opts.config).unwrap();
            args.extend(["--config".to_owned(), path.display().to_string()]);
        }
        if tls {
            args.extend(
                [
                    "--self-signed",
                    "--tls-name",
                    "tether.test",
                    "--tls-name",
                    "*.prod.tether.test",
                ]
                .map(String::from),
            );
        }
        let server = Proc::spawn("server", &args);
        assert!(
            server.wait_log("server listening", Duration::from_secs(10)),
            "{}",
            server.log_text()
        );
        let fingerprint = server
            .log_text()
            .split("fingerprint=")
            .nth(1)
            .map(|s| s.split_whitespace().next().unwrap_or("").to_owned());
        let (holder, blackhole) = blackhole_addr();
        let refused = refused_addr();
        let cfg = format!(
            r#"
server = "{scheme}://127.0.0.1:{port}"
name = "prod"
token = "{AGENT_TOKEN}"
{fp}
dial_timeout_ms = 700

[services]
web = "http://127.0.0.1:{app_port}"
echo = "127.0.0.1:{app_port}"
secure = "https+insecure://127.0.0.1:{tls_app_port}"
strict = "https://127.0.0.1:{tls_app_port}"
refused = "http://{refused}"
blackhole = "http://{blackhole}"
hosty = {{ address = "127.0.0.1:{app_port}", http = true, rewrite_host = true }}
h2web = "h2c://127.0.0.1:{app_port}"
h2secure = {{ address = "https+insecure://127.0.0.1:{tls_app_port}", http2 = true }}
{extra}
"#,
            extra = opts.services,
            scheme = if tls { "wss" } else { "ws" },
            fp = fingerprint
                .map(|f| format!("fingerprint = \"{f}\""))
                .unwrap_or_default(),
        );
        let cfg_path = dir.join("agent.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let agent = Proc::spawn(
            "agent",
            &[
                "agent".into(),
                "--config".into(),
                cfg_path.display().to_string(),
            ],
        );
        assert!(
            agent.wait_log("registered as prod", Duration::from_secs(15)),
            "{}",
            agent.log_text()
        );
        Web {
            server,
            agent,
            apps: vec![app, tls_app],
            port,
            dir,
            _blackhole: Some(Box::new(holder)),
        }
    }

    pub(crate) fn scheme(&self) -> &'static str {
        "https"
    }

    /// The server's certificate fingerprint, as it printed it (TLS only).
    pub(crate) fn fingerprint(&self) -> String {
        self.server
            .log_text()
            .split("fingerprint=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .expect("the server prints its fingerprint")
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// Opens the console's event stream (`/api/events`) as [`CLIENT_TOKEN`]
    /// with curl, for at most `max_secs`: the process and its output lines.
    pub(crate) fn console_events(&self, max_secs: u32) -> (std::process::Child, ConsoleLines) {
        self.console_events_filtered("", max_secs)
    }

    /// [`Web::console_events`] with the console's filter (`?q=...`).
    pub(crate) fn console_events_filtered(
        &self,
        query: &str,
        max_secs: u32,
    ) -> (std::process::Child, ConsoleLines) {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new("curl")
            .args(["-sS", "-k", "-N", "--max-time", &max_secs.to_string(), "-H"])
            .arg(format!("Authorization: Bearer {CLIENT_TOKEN}"))
            .arg(self.url(&format!("/api/events{query}")))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run curl");
        let lines = BufReader::new(child.stdout.take().expect("curl's stdout")).lines();
        (child, lines)
    }

    /// `https://HOST:PORT{path}` for a name under the base domain.
    pub(crate) fn host_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    /// curl with `--resolve` for the base domain names this test uses.
    pub(crate) fn curl(&self, args: &[&str]) -> CurlOut {
        let n = free_port();
        let hfile = self.dir.join(format!("h{n}"));
        let bfile = self.dir.join(format!("b{n}"));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-k", "--max-time", "30"])
            .arg("-D")
            .arg(&hfile)
            .arg("-o")
            .arg(&bfile)
            .args(["-w", "%{http_code}"]);
        for h in [
            BASE.to_owned(),
            format!("web.prod.{BASE}"),
            format!("hosty.prod.{BASE}"),
            format!("secure.prod.{BASE}"),
        ] {
            cmd.arg("--resolve")
                .arg(format!("{h}:{}:127.0.0.1", self.port));
        }
        let out = cmd.args(args).output().expect("curl");
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let headers = std::fs::read_to_string(&hfile).unwrap_or_default();
        let raw = std::fs::read(&bfile).unwrap_or_default();
        let body = String::from_utf8_lossy(&raw).into_owned();
        let _ = std::fs::remove_file(hfile);
        let _ = std::fs::remove_file(bfile);
        CurlOut {
            status,
            headers,
            body,
            raw,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// curl with the dev client's bearer token.
    pub(crate) fn get(&self, url: &str, extra: &[&str]) -> CurlOut {
        let auth = format!("Authorization: Bearer {CLIENT_TOKEN}");
        let mut args = vec!["-H", auth.as_str()];
        args.extend_from_slice(extra);
        args.push(url);
        self.curl(&args)
    }

    pub(crate) fn server_metrics(&self) -> String {
        self.curl(&[&self.url("/metrics")]).body
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
