//! `tether`: one binary for the server, the agent, the client and a demo.

mod demo;
mod doctor;
mod logging;
mod sample_app;
mod status;
mod terminal;

/// mimalloc instead of the system allocator: the data path allocates and
/// frees buffers of tens to hundreds of KiB per message, and glibc's malloc
/// turned that into page faults and memsets (perf: ~12% of the relay's
/// time); mimalloc raised single-stream throughput by about a third.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use logging::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use toml::{Table, Value};

/// Reach services inside private networks (Kubernetes clusters, VPCs) from
/// anywhere, through one outbound WebSocket from an agent inside.
///
///   client --ws--> server --ws--> agent --tcp--> service
///
/// Start with `tether demo`: it runs all parts on loopback and tells you what to try.
#[derive(Parser)]
#[command(name = "tether", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// Log lines as text for people, or as one JSON object per line for log
    /// pipelines (audit lines included, with target "audit").
    #[arg(long, global = true, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the public gateway that agents and clients connect to.
    Server(ServerArgs),
    /// Run inside the private network: dial out to the server and serve its services.
    Agent(AgentArgs),
    /// Run on your machine: forward local ports to services behind agents.
    Client(ClientArgs),
    /// Run server, agent, sample services and client on loopback, and say how to try them.
    Demo(demo::DemoArgs),
    /// Make and hash tokens (configs can hold the hash instead of the token).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check the way to a server step by step (DNS, TCP, TLS, token) and say what to fix.
    Doctor(doctor::DoctorArgs),
    /// Show what is connected to a server and what flows through it (admin API).
    Status(status::StatusArgs),
    /// Print a shell completion script: `tether completions bash > /etc/bash_completion.d/tether`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `tether man | man -l -`.
    Man,
    /// A small web app (page, WebSocket echo, events) to try browser access with.
    #[command(hide = true)]
    SampleApp(sample_app::SampleAppArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random token and the SHA-256 to put in the server config.
    New,
    /// Print the SHA-256 of a token (read from stdin when not given).
    Hash {
        /// The token; prefer stdin, so it stays out of the shell history.
        token: Option<String>,
    },
}

/// Settings may come from a TOML file (`--config`), `TETHER_*` environment
/// variables and flags; flags and environment win over the file.
/// Heartbeat flags shared by every subcommand.
#[derive(Args, Clone)]
struct SessionArgs {
    /// PING interval in milliseconds [default: 10000].
    #[arg(long, env = "TETHER_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Declare a silent session dead after this many milliseconds [default: 30000].
    #[arg(long, env = "TETHER_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
}

impl SessionArgs {
    fn apply(self, t: &mut Table) {
        if self.heartbeat_ms.is_none() && self.idle_timeout_ms.is_none() {
            return;
        }
        let entry = t
            .entry("session".to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        if let Value::Table(s) = entry {
            set(s, "heartbeat_ms", self.heartbeat_ms.map(toml_int));
            set(s, "idle_timeout_ms", self.idle_timeout_ms.map(toml_int));
        }
    }
}

/// How agents and clients reach the server.
#[derive(Args)]
struct DialArgs {
    /// Server URL, e.g. wss://tether.example.com:7700.
    #[arg(long, env = "TETHER_SERVER")]
    server: Option<String>,
    /// Token (prefer the environment variable over the flag: flags show in `ps`).
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Verify the server against this PEM CA file instead of system roots.
    #[arg(long, env = "TETHER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Accept exactly the server certificate with this SHA-256 fingerprint.
    #[arg(long, env = "TETHER_FINGERPRINT")]
    fingerprint: Option<String>,
    /// WebSocket masking: `auto` sends unmasked frames where the server
    /// agrees, over TLS or to a loopback address (docs/PROTOCOL.md 2.6);
    /// `always` masks every frame, for a gateway that insists on it.
    #[arg(long, env = "TETHER_WS_MASK", value_enum, default_value_t = WsMask::Auto)]
    ws_mask: WsMask,
}

/// `--ws-mask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum WsMask {
    /// Unmasked where the server agrees, over TLS or loopback.
    Auto,
    /// Every frame masked, as RFC 6455 has it.
    Always,
}

impl DialArgs {
    fn apply(self, t: &mut Table) {
        // Not a config key: a switch for every dial this process makes.
        tether_net::transport::ws::always_mask(self.ws_mask == WsMask::Always);
        set(t, "server", self.server);
        // Flags and the environment win over the file, also over the file's
        // other way to say the same thing (a token_file read first, a
        // fingerprint pin checked before a CA).
        if self.token.is_some() {
            t.remove("token_file");
        }
        if self.ca_file.is_some() {
            t.remove("fingerprint");
        }
        if self.fingerprint.is_some() {
            t.remove("ca_file");
        }
        set(t, "token", self.token);
        set(t, "ca_file", path_str(self.ca_file));
        set(t, "fingerprint", self.fingerprint);
    }
}

#[derive(Args, Clone)]
struct ServerArgs {
    #[command(flatten)]
    session: SessionArgs,
    /// TOML config file (see README for the format).
    #[arg(long, short, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration (file, environment, flags) and exit.
    #[arg(long)]
    check_config: bool,
    /// Address to listen on [default: 0.0.0.0:7700].
    #[arg(long, env = "TETHER_LISTEN")]
    listen: Option<SocketAddr>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "TETHER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve TLS with a freshly generated self-signed certificate (prints its fingerprint).
    #[arg(long, env = "TETHER_SELF_SIGNED", conflicts_with = "tls_cert")]
    self_signed: bool,
    /// Allow an agent: NAME=TOKEN or NAME=sha256:HEX (repeatable).
    #[arg(long = "agent", value_name = "NAME=TOKEN")]
    agents: Vec<String>,
    /// Allow a client: NAME=TOKEN=PATTERN[,PATTERN...] (TOKEN may be sha256:HEX),
    /// patterns like prod/* (repeatable).
    #[arg(long = "client", value_name = "NAME=TOKEN=ALLOW")]
    clients: Vec<String>,
    /// An identity that may use the admin API and `tether status`: a name
    /// or group:NAME, globs allowed (repeatable; adds to the config's `admins`).
    #[arg(long = "admin", value_name = "NAME")]
    admins: Vec<String>,
    /// Public port bound to a service while its agent is connected:
    /// LISTEN=AGENT/SERVICE, e.g. 0.0.0.0:15432=prod/db (repeatable; use the
    /// config file for source allow-lists and the PROXY protocol).
    #[arg(long = "listener", value_name = "LISTEN=AGENT/SERVICE")]
    listeners: Vec<String>,
    /// Base domain for browser host routing: SERVICE.AGENT.BASE_DOMAIN
    /// (wildcard DNS and certificate). Path routing (/a/AGENT/SERVICE/) always works.
    #[arg(long, env = "TETHER_BASE_DOMAIN")]
    base_domain: Option<String>,
    /// Additional names for the self-signed certificate (repeatable; e.g. *.tether.example.com).
    #[arg(long = "tls-name", value_name = "NAME", requires = "self_signed")]
    tls_names: Vec<String>,
    /// Serve /metrics on this (private) address instead of the public port;
    /// /livez and /readyz are served there too (and still on the public port).
    #[arg(long, env = "TETHER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// This replica's id, told to agents (under Kubernetes: the pod name)
    /// [default: host name and a random suffix].
    #[arg(long, env = "TETHER_REPLICA_ID")]
    replica_id: Option<String>,
    /// The address agents may dial to reach this replica directly (a pod
    /// IP and port) [default: the listen address, when it is one IP].
    #[arg(long, env = "TETHER_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// A server replica: [ID=]IP:PORT (repeatable, or comma-separated in
    /// TETHER_PEERS; this one may be listed).
    #[arg(
        long = "peer",
        value_name = "[ID=]IP:PORT",
        env = "TETHER_PEERS",
        value_delimiter = ','
    )]
    peers: Vec<String>,
    /// The replicas are the addresses of NAME (a headless Service), at PORT.
    #[arg(long, env = "TETHER_PEERS_DNS", value_name = "NAME:PORT")]
    peers_dns: Option<String>,
    /// DNS server for --peers-dns (IP or IP:PORT) [default: the system resolver].
    #[arg(long, env = "TETHER_PEERS_DNS_SERVER")]
    peers_dns_server: Option<String>,
    /// How often --peers-dns is resolved again, in milliseconds [default: 5000].
    #[arg(long, env = "TETHER_PEERS_INTERVAL_MS")]
    peers_interval_ms: Option<u64>,
    /// How long an open waits for an agent this replica does not hold yet
    /// (just started, or the agent just dropped), in milliseconds [default: 3000].
    #[arg(long, env = "TETHER_AGENT_WAIT_MS")]
    agent_wait_ms: Option<u64>,
    /// After SIGTERM, keep serving this long while /readyz fails, so load
    /// balancers stop sending new connections first [default: 10000].
    #[arg(long, env = "TETHER_SHUTDOWN_DELAY_MS")]
    shutdown_delay_ms: Option<u64>,
    /// Then give live streams and requests this long to finish [default: 30000].
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    dial: DialArgs,
    /// TOML config file.
    #[arg(long, short, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Name to register as.
    #[arg(long, env = "TETHER_AGENT_NAME")]
    name: Option<String>,
    /// A named service: NAME=HOST:PORT for TCP, NAME=http://HOST:PORT or
    /// NAME=https://HOST:PORT (https+insecure:// skips the certificate check)
    /// for web services, NAME=h2c://HOST:PORT for cleartext HTTP/2 ones such
    /// as gRPC (repeatable).
    #[arg(long = "service", value_name = "NAME=HOST:PORT")]
    services: Vec<String>,
    /// Raw targets clients may ask for: HOSTGLOB:PORTS or CIDR:PORTS (repeatable).
    #[arg(long = "allow", value_name = "PATTERN")]
    allow: Vec<String>,
    /// Close a UDP flow after this long without datagrams, in milliseconds [default: 60000].
    #[arg(long, env = "TETHER_UDP_IDLE_TIMEOUT_MS")]
    udp_idle_timeout_ms: Option<u64>,
    /// How long to wait for a service to accept a connection, in milliseconds [default: 10000].
    #[arg(long, env = "TETHER_DIAL_TIMEOUT_MS")]
    dial_timeout_ms: Option<u64>,
    /// Serve /metrics, /healthz, /livez and /readyz (ready once a session to every server replica is up) here.
    #[arg(long, env = "TETHER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Resolve raw targets with this DNS server (IP or IP:PORT) instead of
    /// the system resolver.
    #[arg(long, env = "TETHER_DNS_SERVER")]
    dns_server: Option<String>,
    /// This process's instance id: agents with one name and different
    /// instance ids form a pool [default: host name and a random suffix].
    #[arg(long, env = "TETHER_AGENT_INSTANCE")]
    instance: Option<String>,
    /// On SIGTERM, give live streams this long to finish [default: 30000].
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
    /// Check the configuration (file, environment, flags) and exit.
    #[arg(long)]
    check_config: bool,
    /// Publish Services annotated tether.dev/expose=true from the Kubernetes
    /// API (in the agent's own namespace unless --kubernetes-namespace).
    #[arg(long, env = "TETHER_KUBERNETES")]
    kubernetes: bool,
    /// Watch this namespace for Services to publish ("*" for all);
    /// repeatable; implies --kubernetes.
    #[arg(long = "kubernetes-namespace", value_name = "NAMESPACE")]
    kubernetes_namespaces: Vec<String>,
}

#[derive(Args)]
struct ClientArgs {
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    dial: DialArgs,
    /// TOML config file.
    #[arg(long, short, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Close a UDP flow after this long without datagrams, in milliseconds [default: 60000].
    #[arg(long, env = "TETHER_UDP_IDLE_TIMEOUT_MS")]
    udp_idle_timeout_ms: Option<u64>,
    /// Most UDP flows per forward (least recently used evicted) [default: 1024].
    #[arg(long, env = "TETHER_MAX_UDP_FLOWS")]
    max_udp_flows: Option<u64>,
    /// Serve /metrics and /healthz here.
    #[arg(long, env = "TETHER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Wait for the server's answer before sending a forwarded connection's
    /// first bytes (no early data; see PROTOCOL.md 6.3).
    #[arg(long, env = "TETHER_NO_EARLY_DATA")]
    no_early_data: bool,
    #[command(subcommand)]
    action: Option<ClientAction>,
}

// `[udp:]` in the help text below is clap's notation, not a doc link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Subcommand)]
enum ClientAction {
    /// Listen locally and forward each connection: LISTEN=AGENT/SERVICE, e.g.
    /// 15432=prod/db; prefix udp: for UDP, e.g. udp:5353=prod/dns.
    Forward {
        /// One or more [udp:]LISTEN=AGENT/SERVICE (LISTEN is PORT or IP:PORT).
        #[arg(required = true, value_name = "LISTEN=AGENT/SERVICE")]
        forwards: Vec<String>,
    },
    /// Run a local SOCKS5 and HTTP CONNECT proxy (one port) into the cluster;
    /// host names are resolved by the agent.
    Proxy {
        /// Where to listen [default: the config file's, else 127.0.0.1:1080].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Which agent serves which hosts: PATTERN=AGENT, a domain glob
        /// (*.prod.svc.cluster.local=prod) or a CIDR (10.0.0.0/8=prod). Repeatable.
        #[arg(long = "route", value_name = "PATTERN=AGENT")]
        routes: Vec<String>,
        /// Agent for hosts no route matches (otherwise they are refused).
        #[arg(long)]
        default_agent: Option<String>,
        /// A file whose first line is USER:PASSWORD, which proxy clients must
        /// then give (socks5h://USER:PASSWORD@..., http://USER:PASSWORD@...).
        #[arg(long, value_name = "PATH")]
        auth_file: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "tether", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            return Ok(());
        }
        _ => {}
    }
    logging::init(cli.log_format);
    if matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Client(_) | Command::Demo(_)
    ) {
        raise_open_file_limit();
    }
    let cores = usable_cores();
    let setting = std::env::var("TETHER_WORKER_THREADS").ok();
    let threads = worker_threads(setting.as_deref(), cores)?;
    if matches!(cli.command, Command::Server(_)) && left_cores_idle(setting.as_deref(), cores) {
        tracing::info!(
            cores,
            "the server runs on one thread; TETHER_WORKER_THREADS=auto gives it one per core"
        );
    }
    if threads > 1 {
        tracing::info!(threads, "the async runtime runs on several threads");
    }
    let rt = runtime(threads)?;
    rt.block_on(async move {
        match cli.command {
            Command::Server(a) => run_server(a).await,
            Command::Agent(a) => run_agent(a).await,
            Command::Client(a) => run_client(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::SampleApp(a) => sample_app::run(a).await,
            Command::Token(t) => token_command(t),
            Command::Doctor(a) => doctor::summary(doctor::run(a).await),
            Command::Status(a) => status::run(a).await,
            Command::Completions { .. } | Command::Man => Ok(()),
        }
    })
}

/// Sockets are files: a server holding thousands of sessions, or a client
/// forwarding a thousand connections, needs more than the soft limit many
/// systems start processes with (1024). Raise it to the hard limit where the
/// system allows, and say so.
fn raise_open_file_limit() {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok(before), Ok(now)) if now > before => {
            tracing::info!(from = before, to = now, "raised the open-file limit")
        }
        (_, Ok(now)) if now < 4096 => tracing::warn!(
            limit = now,
            "the open-file limit is low: at most about {now} connections (raise the hard limit: ulimit -Hn, LimitNOFILE=)"
        ),
        (_, Ok(_)) => {}
        (_, Err(e)) => tracing::warn!("cannot read or raise the open-file limit: {e}"),
    }
}

/// The async runtime: one thread unless `TETHER_WORKER_THREADS` asks for
/// more ([`worker_threads`]).
///
/// Measured on the full client -> server -> agent path on this project's
/// 2-core machine: with a thread per process, a 64-byte round trip cost
/// 40-70 us more than direct, against about 220 us with tokio's
/// multi-threaded default, and throughput was higher too: every hop is a
/// wake-up, and a wake-up on another core is the expensive kind. A busy server with many sessions can
/// trade some latency for more cores with `TETHER_WORKER_THREADS`.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().context("starting the async runtime")
}

/// The runtime threads `TETHER_WORKER_THREADS` (`setting`) asks for: one
/// when unset; `auto`, one per core this process may use (`cores`); else
/// the number given.
fn worker_threads(setting: Option<&str>, cores: usize) -> anyhow::Result<usize> {
    match setting.map(str::trim) {
        None => Ok(1),
        Some(v) if v.eq_ignore_ascii_case("auto") => Ok(cores.max(1)),
        Some(v) => v.parse().map_err(|_| {
            anyhow::anyhow!("TETHER_WORKER_THREADS={v:?} is neither a number nor \"auto\"")
        }),
    }
}

/// A server on the default one thread where it may use four cores or
/// more: the default suits small machines, and one that owns its cores is
/// told it may use them (README, Tuning).
fn left_cores_idle(setting: Option<&str>, cores: usize) -> bool {
    setting.is_none() && cores >= 4
}

/// The cores this process may use: its CPU affinity and, in a container,
/// its cgroup's CPU quota (as the standard library reads them).
fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn load_table(path: &Option<PathBuf>) -> anyhow::Result<Table> {
    match path {
        None => Ok(Table::new()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            text.parse::<Table>().map_err(|e| {
                // toml's own text quotes the line, which may hold a token:
                // the position and the message only.
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
                let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
                anyhow::anyhow!(
                    "parsing config {}{at}: {}",
                    p.display(),
                    e.message().trim_end()
                )
            })
        }
    }
}

/// A flag's number as a TOML integer (an `i64`): a value past `i64::MAX`
/// (in milliseconds, 292 million years) means as long as can be, rather
/// than wrapping to a negative number the config would refuse under a
/// value the user never typed.
fn toml_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn set<T: Into<Value>>(t: &mut Table, key: &str, v: Option<T>) {
    if let Some(v) = v {
        t.insert(key.to_owned(), v.into());
    }
}

fn path_str(p: Option<PathBuf>) -> Option<String> {
    p.map(|p| p.display().to_string())
}

/// The table `key` of `t`, made (or replacing a value that is not a
/// table) when needed: what the flags set is merged into the file's.
fn sub_table<'a>(t: &'a mut Table, key: &str) -> &'a mut Table {
    let v = t
        .entry(key.to_owned())
        .or_insert_with(|| Value::Table(Table::new()));
    if !v.is_table() {
        *v = Value::Table(Table::new());
    }
    v.as_table_mut().expect("a table: made so above")
}

/// Where `tether client proxy` listens unless told.
const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:1080";

fn push_array(t: &mut Table, key: &str, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    let arr = t
        .entry(key.to_owned())
        .or_insert_with(|| Value::Array(vec![]));
    if let Value::Array(a) = arr {
        a.extend(items);
    }
}

fn finish<T: serde::de::DeserializeOwned>(t: Table, what: &str) -> anyhow::Result<T> {
    T::deserialize(Value::Table(t)).with_context(|| format!("invalid {what} configuration"))
}

fn token_command(t: TokenCommand) -> anyhow::Result<()> {
    match t {
        TokenCommand::New => {
            let token = demo::random_token() + &demo::random_token();
            println!("token        = \"{token}\"");
            println!(
                "token_sha256 = \"{}\"",
                tether_server::auth::token_hash_hex(&token)
            );
        }
        TokenCommand::Hash { token } => {
            let token = match token {
                Some(t) => t,
                None => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    s.trim().to_owned()
                }
            };
            if token.is_empty() {
                bail!("empty token");
            }
            println!("{}", tether_server::auth::token_hash_hex(&token));
        }
    }
    Ok(())
}

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGTERM (an orchestrator: Kubernetes, systemd).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

async fn shutdown_signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = term.recv() => Signal::Terminate,
                _ = tokio::signal::ctrl_c() => Signal::Interrupt,
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    Signal::Interrupt
}

async fn run_server(a: ServerArgs) -> anyhow::Result<()> {
    // Before the config is read: see `Baseline`.
    let since = tether_server::reload::Baseline::now();
    let config_file = a.config.clone();
    let cfg = server_config(a.clone())?;
    if a.check_config {
        tether_server::Server::check(&cfg)?;
        println!("server configuration is valid");
        return Ok(());
    }
    if cfg.agents.is_empty() {
        tracing::warn!("no agents configured: add --agent NAME=TOKEN or [[agent]] in the config");
    }
    let source: tether_server::reload::ConfigSource = Arc::new(move || server_config(a.clone()));
    let server = tether_server::Server::bind(&cfg)
        .await?
        .with_reload(source, config_file, since);
    if let Some(fp) = server.fingerprint() {
        tracing::info!(fingerprint = %fp, "TLS certificate SHA-256 fingerprint (pin it with --fingerprint)");
    }
    // On SIGTERM / Ctrl-C: fail /readyz, serve on for the shutdown delay,
    // then stop accepting, GOAWAY every session, let streams finish (up to
    // the drain timeout), then exit. A second signal exits now.
    let skip_delay = server.skip_shutdown_delay_handle();
    let shutdown = async move {
        if shutdown_signal().await == Signal::Interrupt {
            // Ctrl-C at a terminal: no load balancer to wait for.
            skip_delay();
        }
        tracing::info!("shutting down: draining (signal again to exit now)");
        tokio::spawn(async {
            shutdown_signal().await;
            std::process::exit(130);
        });
    };
    Ok(server.serve_until(shutdown).await?)
}

/// `TOKEN` or `sha256:HEX` (keeps the token itself out of `ps`).
fn insert_token(e: &mut Table, token: &str) {
    match token.strip_prefix("sha256:") {
        Some(h) => e.insert("token_sha256".into(), h.into()),
        None => e.insert("token".into(), token.into()),
    };
}

/// The server config from the file, the environment and the flags (called
/// again on every reload).
fn server_config(a: ServerArgs) -> anyhow::Result<tether_server::ServerConfig> {
    let mut t = load_table(&a.config)?;
    a.session.apply(&mut t);
    set(&mut t, "listen", a.listen.map(|l| l.to_string()));
    if a.tls_cert.is_some() || a.self_signed {
        // Merged into the file's [tls]: its client_ca (and names) stay.
        // Only the keys of the other way to get a certificate go.
        let tls = sub_table(&mut t, "tls");
        if a.self_signed {
            tls.remove("cert");
            tls.remove("key");
            tls.insert("self_signed".into(), true.into());
            if !a.tls_names.is_empty() {
                let mut names: Vec<Value> = vec!["localhost".into(), "127.0.0.1".into()];
                names.extend(a.tls_names.iter().map(|n| Value::from(n.as_str())));
                tls.insert("names".into(), Value::Array(names));
            }
        } else {
            tls.remove("self_signed");
            set(tls, "cert", path_str(a.tls_cert));
            set(tls, "key", path_str(a.tls_key));
        }
    }
    let mut agents = vec![];
    for s in a.agents {
        // The value may be a token alone: never quoted in the error.
        let (name, token) = s
            .split_once('=')
            .context("--agent: expected NAME=TOKEN (the value has no '=')")?;
        let mut e = Table::new();
        e.insert("name".into(), name.into());
        insert_token(&mut e, token);
        agents.push(Value::Table(e));
    }
    push_array(&mut t, "agent", agents);
    let mut clients = vec![];
    for s in a.clients {
        // NAME=TOKEN=PATTERNS: the name ends at the first '=', the patterns
        // start after the last (a base64 token may end in '='). The token
        // is never quoted in the error.
        let parts = s
            .split_once('=')
            .and_then(|(name, rest)| Some((name, rest.rsplit_once('=')?)))
            .filter(|(name, (token, _))| !name.is_empty() && !token.is_empty());
        let Some((name, (token, allow))) = parts else {
            bail!("--client: expected NAME=TOKEN=PATTERN[,PATTERN...] (the value is not quoted here: it holds a token)");
        };
        let mut e = Table::new();
        e.insert("name".into(), name.into());
        insert_token(&mut e, token);
        e.insert(
            "allow".into(),
            Value::Array(allow.split(',').map(|p| p.trim().into()).collect()),
        );
        clients.push(Value::Table(e));
    }
    push_array(&mut t, "client", clients);
    push_array(
        &mut t,
        "admins",
        a.admins.into_iter().map(Value::String).collect(),
    );
    let mut listeners = vec![];
    for s in a.listeners {
        let (listen, target) = s
            .split_once('=')
            .with_context(|| format!("--listener {s:?}: expected LISTEN=AGENT/SERVICE"))?;
        let mut e = Table::new();
        e.insert("listen".into(), listen.into());
        e.insert("target".into(), target.into());
        listeners.push(Value::Table(e));
    }
    push_array(&mut t, "listener", listeners);
    set(
        &mut t,
        "metrics_listen",
        a.metrics_listen.map(|l| l.to_string()),
    );
    let cluster = t
        .entry("cluster".to_owned())
        .or_insert_with(|| Value::Table(Table::new()));
    let Value::Table(cluster) = cluster else {
        bail!("config: cluster must be a table");
    };
    set(cluster, "replica_id", a.replica_id);
    set(cluster, "advertise", a.advertise.map(|l| l.to_string()));
    set(cluster, "peers_dns", a.peers_dns);
    set(cluster, "dns_server", a.peers_dns_server);
    set(
        cluster,
        "peers_interval_ms",
        a.peers_interval_ms.map(toml_int),
    );
    set(cluster, "agent_wait_ms", a.agent_wait_ms.map(toml_int));
    set(
        cluster,
        "shutdown_delay_ms",
        a.shutdown_delay_ms.map(toml_int),
    );
    set(
        cluster,
        "drain_timeout_ms",
        a.drain_timeout_ms.map(toml_int),
    );
    push_array(
        cluster,
        "peers",
        a.peers.into_iter().map(Value::from).collect(),
    );
    if let Some(d) = a.base_domain {
        let entry = t
            .entry("http".to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        if let Value::Table(h) = entry {
            h.insert("base_domain".into(), d.into());
        }
    }
    finish(t, "server")
}

async fn run_agent(a: AgentArgs) -> anyhow::Result<()> {
    let check_config = a.check_config;
    let mut t = load_table(&a.config)?;
    if a.kubernetes || !a.kubernetes_namespaces.is_empty() {
        let k = t
            .entry("kubernetes".to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(k) = k else {
            bail!("config: kubernetes must be a table");
        };
        push_array(
            k,
            "namespaces",
            a.kubernetes_namespaces
                .into_iter()
                .map(Value::String)
                .collect(),
        );
    }
    a.session.apply(&mut t);
    a.dial.apply(&mut t);
    set(&mut t, "name", a.name);
    set(&mut t, "dns_server", a.dns_server);
    set(&mut t, "instance", a.instance);
    set(&mut t, "drain_timeout_ms", a.drain_timeout_ms.map(toml_int));
    set(&mut t, "dial_timeout_ms", a.dial_timeout_ms.map(toml_int));
    set(
        &mut t,
        "udp_idle_timeout_ms",
        a.udp_idle_timeout_ms.map(toml_int),
    );
    if !a.services.is_empty() {
        let svc = t
            .entry("services".to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(svc) = svc else {
            bail!("config: services must be a table");
        };
        for s in a.services {
            let (name, addr) = s
                .split_once('=')
                .with_context(|| format!("--service {s:?}: expected NAME=HOST:PORT"))?;
            svc.insert(name.to_owned(), addr.into());
        }
    }
    push_array(
        &mut t,
        "allow",
        a.allow.into_iter().map(Value::from).collect(),
    );
    let cfg: tether_agent::AgentConfig = finish(t, "agent")?;
    if check_config {
        tether_agent::Agent::check(&cfg)?;
        println!("agent configuration is valid");
        return Ok(());
    }
    let agent = tether_agent::Agent::new(cfg)?;
    if let Some(addr) = a.metrics_listen {
        let stats = agent.stats();
        let probed = stats.clone();
        let bound = tether_net::observe::serve_observe(
            addr,
            Arc::new(move || stats.render()),
            Arc::new(move |path: &str, _: Option<&str>| probed.probe(path)),
        )
        .await
        .with_context(|| format!("metrics listener {addr}"))?;
        tracing::info!(addr = %bound, "serving /metrics, /livez and /readyz");
    }
    agent
        .run_until(async {
            shutdown_signal().await;
        })
        .await
}

/// The client subcommand's forwards or proxy, merged into the file's.
fn merge_action(t: &mut Table, action: Option<ClientAction>) {
    match action {
        Some(ClientAction::Forward { forwards }) => {
            push_array(
                t,
                "forward",
                forwards.into_iter().map(Value::from).collect(),
            );
        }
        Some(ClientAction::Proxy {
            listen,
            routes,
            default_agent,
            auth_file,
        }) => {
            // Merged into the file's [proxy]: its routes stay, the flags'
            // are added, and what the flags name replaces the file's.
            let p = sub_table(t, "proxy");
            match listen {
                Some(l) => {
                    p.insert("listen".into(), l.to_string().into());
                }
                None => {
                    p.entry("listen")
                        .or_insert_with(|| DEFAULT_PROXY_LISTEN.into());
                }
            }
            push_array(p, "route", routes.into_iter().map(Value::from).collect());
            set(p, "default_agent", default_agent);
            set(p, "auth_file", path_str(auth_file));
        }
        None => {}
    }
}

async fn run_client(a: ClientArgs) -> anyhow::Result<()> {
    let mut t = load_table(&a.config)?;
    a.session.apply(&mut t);
    a.dial.apply(&mut t);
    merge_action(&mut t, a.action);
    set(
        &mut t,
        "udp_idle_timeout_ms",
        a.udp_idle_timeout_ms.map(toml_int),
    );
    set(&mut t, "max_udp_flows", a.max_udp_flows.map(toml_int));
    if a.no_early_data {
        t.insert("early_data".into(), false.into());
    }
    let cfg: tether_client::ClientConfig = finish(t, "client")?;
    let client = tether_client::Client::bind(cfg).await?;
    if let Some(addr) = a.metrics_listen {
        let stats = client.udp_stats();
        let bound = tether_net::observe::serve_metrics(
            addr,
            Arc::new(move || stats.render("tether_client")),
        )
        .await
        .with_context(|| format!("metrics listener {addr}"))?;
        tracing::info!(addr = %bound, "serving /metrics");
    }
    client
        .run_until(async {
            shutdown_signal().await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A duration flag past i64::MAX milliseconds is as long as can be, not
    /// a negative number refused under a value nobody typed.
    #[test]
    fn a_huge_duration_flag_saturates_instead_of_wrapping() {
        let cli = Cli::try_parse_from([
            "tether",
            "server",
            "--drain-timeout-ms",
            "18446744073709551615",
            "--heartbeat-ms",
            "5000",
        ])
        .unwrap();
        let Command::Server(a) = cli.command else {
            panic!("not a server command")
        };
        let cfg = server_config(a).unwrap();
        assert_eq!(cfg.cluster.drain_timeout_ms, i64::MAX as u64);
        assert_eq!(cfg.session.heartbeat_ms, Some(5000));
    }

    /// A directory of this test's own (`tag`) holding `server.toml` with
    /// `text`: the directory (to remove) and the file.
    fn config_file(tag: &str, text: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("tether-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.toml");
        std::fs::write(&file, text).unwrap();
        (dir, file)
    }

    fn server_cfg_from(args: &[&str]) -> anyhow::Result<tether_server::ServerConfig> {
        let cli = Cli::try_parse_from(["tether", "server"].iter().chain(args)).unwrap();
        let Command::Server(a) = cli.command else {
            panic!("not a server command")
        };
        server_config(a)
    }

    /// A TLS flag merges into the file's [tls]: the client CA the file
    /// names stays (mutual TLS kept working).
    #[test]
    fn tls_flags_keep_the_files_client_ca() {
        let (dir, file) = config_file(
            "tls-merge",
            "[tls]\nclient_ca = \"/ca.pem\"\nself_signed = true\n",
        );
        let f = file.display().to_string();
        let cfg =
            server_cfg_from(&["-c", &f, "--tls-cert", "/c.pem", "--tls-key", "/k.pem"]).unwrap();
        let tls = cfg.tls.expect("[tls]");
        assert_eq!(
            tls.client_ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(tls.cert.as_deref(), Some(std::path::Path::new("/c.pem")));
        assert!(!tls.self_signed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A base64 token may end in '='; a malformed value is refused without
    /// quoting the token.
    #[test]
    fn client_flags_take_tokens_with_equals_signs_and_never_echo_them() {
        let cfg = server_cfg_from(&["--client", "alice=YWJj===prod/*,staging/db"]).unwrap();
        assert_eq!(cfg.clients[0].name, "alice");
        assert_eq!(cfg.clients[0].token.as_deref(), Some("YWJj=="));
        assert_eq!(cfg.clients[0].allow, ["prod/*", "staging/db"]);
        let e = format!(
            "{:#}",
            server_cfg_from(&["--client", "alice=s3cret"]).unwrap_err()
        );
        assert!(!e.contains("s3cret"), "{e}");
        let e = format!("{:#}", server_cfg_from(&["--agent", "s3cret"]).unwrap_err());
        assert!(!e.contains("s3cret"), "{e}");
    }

    /// A token or CA given by flag or environment wins over the file's
    /// other way to give it (token_file, fingerprint).
    #[test]
    fn dial_flags_win_over_the_files_other_way_to_say_it() {
        let cli = Cli::try_parse_from(["tether", "agent", "--token", "T", "--ca-file", "/ca.pem"])
            .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not an agent command")
        };
        let mut t: Table = "token_file = \"/t\"\nfingerprint = \"AB\"\n"
            .parse()
            .unwrap();
        a.dial.apply(&mut t);
        assert!(
            !t.contains_key("token_file") && !t.contains_key("fingerprint"),
            "{t}"
        );
        assert_eq!(t["token"].as_str(), Some("T"));
        assert_eq!(t["ca_file"].as_str(), Some("/ca.pem"));
    }

    /// `tether client proxy` adds to the file's [proxy] rather than
    /// replacing it with the flags' defaults.
    #[test]
    fn proxy_flags_merge_into_the_files_proxy() {
        let mut t: Table = "[proxy]\nlisten = \"127.0.0.1:9000\"\nroute = [\"*.prod=prod\"]\n"
            .parse()
            .unwrap();
        merge_action(
            &mut t,
            Some(ClientAction::Proxy {
                listen: None,
                routes: vec!["10.0.0.0/8=prod".into()],
                default_agent: None,
                auth_file: Some("/etc/tether/proxy-auth".into()),
            }),
        );
        let p = t["proxy"].as_table().unwrap();
        assert_eq!(p["listen"].as_str(), Some("127.0.0.1:9000"));
        assert_eq!(p["route"].as_array().map(Vec::len), Some(2));
        assert_eq!(p["auth_file"].as_str(), Some("/etc/tether/proxy-auth"));
        let mut empty = Table::new();
        merge_action(
            &mut empty,
            Some(ClientAction::Proxy {
                listen: None,
                routes: vec![],
                default_agent: None,
                auth_file: None,
            }),
        );
        assert_eq!(
            empty["proxy"]["listen"].as_str(),
            Some(DEFAULT_PROXY_LISTEN)
        );
    }

    /// A config file that does not parse is reported by line, without the
    /// line itself (it may hold a token).
    #[test]
    fn a_config_that_does_not_parse_is_reported_without_its_text() {
        let (dir, file) = config_file("bad-toml", "[[agent]]\nname = \"prod\"\ntoken = s3cret\n");
        let e = format!("{:#}", load_table(&Some(file)).unwrap_err());
        assert!(!e.contains("s3cret") && e.contains("line 3"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn worker_threads_are_one_a_number_or_one_per_core() {
        assert_eq!(worker_threads(None, 8).unwrap(), 1);
        assert_eq!(worker_threads(Some("auto"), 8).unwrap(), 8);
        assert_eq!(worker_threads(Some(" AUTO "), 2).unwrap(), 2);
        assert_eq!(worker_threads(Some("auto"), 0).unwrap(), 1);
        assert_eq!(worker_threads(Some("4"), 8).unwrap(), 4);
        let e = worker_threads(Some("lots"), 8).unwrap_err().to_string();
        assert!(e.contains("\"lots\"") && e.contains("auto"), "{e}");
    }

    #[test]
    fn a_server_on_one_thread_with_cores_to_spare_is_told() {
        assert!(left_cores_idle(None, 4));
        assert!(!left_cores_idle(None, 2));
        assert!(!left_cores_idle(Some("1"), 16));
        assert!(!left_cores_idle(Some("auto"), 16));
    }
}
