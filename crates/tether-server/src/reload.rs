//! Reloading tokens, policy, JWT keys, limits and certificates without a
//! restart: on SIGHUP, or when one of the files they come from changes
//! (checked every [`WATCH_INTERVAL`]; polling the modification time and size
//! also catches Kubernetes' symlink swaps of mounted Secrets and ConfigMaps).
//!
//! A reload is all or nothing: a config that does not load is logged and
//! the running one stays. After a reload, sessions whose credentials are gone
//! are closed (GOAWAY `unauthorized`) and streams the new policy no longer
//! allows are reset (RST `forbidden`).

use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::auth::{AuthStore, Authenticator};
use crate::config::ServerConfig;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::sessions::Sessions;
use crate::streams::Streams;
use crate::tls::TlsSlot;
use crate::web::logins::WebSessions;

/// How often watched files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Where a fresh config comes from (the file plus the command line's flags).
pub type ConfigSource = Arc<dyn Fn() -> anyhow::Result<ServerConfig> + Send + Sync>;

/// Taken before the server reads its config: from then on SIGHUP asks for
/// a reload instead of ending the process (its default action), and a
/// watched file changed after this moment is loaded as soon as watching
/// starts. Without it, a `systemctl reload` right after the start killed
/// the server, and a Secret rotated while it started was never applied.
pub struct Baseline {
    at: SystemTime,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Baseline {
    /// Now; call it before loading the config (inside the runtime).
    pub fn now() -> Baseline {
        Baseline {
            // File times come from the kernel's coarse clock, a tick (1 to
            // 10 ms) behind: a file written in the same tick as now is
            // missed, but one written before never counts as changed (a
            // reload at every start would muddle the log).
            at: SystemTime::now(),
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReloadReport {
    /// Sessions closed because their credentials were removed.
    pub(crate) sessions_closed: usize,
    /// Streams reset because the policy no longer allows them.
    pub(crate) streams_reset: usize,
    /// Whether a new certificate was loaded.
    pub(crate) tls_reloaded: bool,
    /// Changed settings that only a restart applies (left as they run).
    pub(crate) needs_restart: Vec<&'static str>,
}

/// What a reload replaces, and what it checks again afterwards.
pub(crate) struct Reloader {
    auth: Arc<AuthStore>,
    limits: Arc<Limits>,
    tls: Arc<TlsSlot>,
    sessions: Arc<Sessions>,
    streams: Arc<Streams>,
    logins: Arc<WebSessions>,
    metrics: Arc<Metrics>,
    /// The config the server started with: what the restart-only
    /// settings still are.
    started: ServerConfig,
}

impl Reloader {
    /// A reloader over these handles, for a server started with `started`.
    #[allow(clippy::too_many_arguments)] // one per handle a reload touches
    pub(crate) fn new(
        started: ServerConfig,
        auth: Arc<AuthStore>,
        limits: Arc<Limits>,
        tls: Arc<TlsSlot>,
        sessions: Arc<Sessions>,
        streams: Arc<Streams>,
        logins: Arc<WebSessions>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            auth,
            limits,
            tls,
            sessions,
            streams,
            logins,
            metrics,
            started,
        }
    }

    /// Applies a new config to a running server: credentials, policy, JWT
    /// keys, limits and (file-based) certificates, including the client CA.
    /// The rest (the listen address, `[[listener]]`s, `[http]`,
    /// `[session]`, `[cluster]`, ...: [`ServerConfig::restart_only_changes`])
    /// needs a restart; the report names what of it changed.
    pub(crate) fn apply(&self, cfg: &ServerConfig) -> anyhow::Result<ReloadReport> {
        // All of it, the parts that need a restart too: what a restart
        // would refuse is not applied in part.
        cfg.validate()?;
        let auth = Authenticator::from_config(cfg)?;
        let mut report = ReloadReport {
            needs_restart: self.started.restart_only_changes(cfg),
            ..Default::default()
        };
        let new_tls = match &cfg.tls {
            // A self-signed certificate is kept: a new one would break every pin.
            Some(t) if !t.self_signed && self.tls.serving() => Some(crate::tls::build(t)?),
            // Not applied (turning TLS on, or a self-signed server's
            // client CA, needs a restart) but built all the same: a restart
            // would refuse what does not build.
            Some(t) => {
                crate::tls::build(t)?;
                None
            }
            None => None,
        };
        auth.warn_plaintext();
        self.auth.set(auth);
        self.metrics
            .expect_agents(cfg.agents.iter().map(|a| a.name.as_str()));
        self.limits.set_config(cfg.limits.clone());
        if let Some((acceptor, fingerprint)) = new_tls {
            self.tls.set(acceptor);
            tracing::info!(%fingerprint, "TLS certificate reloaded");
            report.tls_reloaded = true;
        }
        let (closed, reset) = self.enforce();
        report.sessions_closed = closed;
        report.streams_reset = reset;
        Ok(report)
    }

    /// Closes sessions whose credentials no longer hold, ends streams the
    /// policy no longer allows and forgets browser logins whose credential
    /// is gone. Returns (sessions closed, streams ended).
    fn enforce(&self) -> (usize, usize) {
        let auth = self.auth.get();
        let mut check = auth.revalidation();
        let closed = self.sessions.enforce(&mut check);
        let ended = self.streams.enforce(&mut check);
        self.logins.retain(|id| check.holds(id));
        (closed, ended)
    }

    /// Reloads on SIGHUP and on file changes, forever. `since` was taken
    /// before the running config was read: what changed after it is
    /// loaded at once.
    pub(crate) async fn watch(
        self,
        source: ConfigSource,
        config_file: Option<PathBuf>,
        since: Baseline,
    ) {
        // The files the running config names, not those of a fresh read:
        // that read may fail (a file half written), and a change made since
        // the server read its config must still count as one.
        let mut files = watched_files(&self.started, config_file.as_ref());
        let mut last = stamp(&files);
        let mut changed_while_starting = last.iter().flatten().any(|(m, _)| *m > since.at);
        #[cfg(unix)]
        let mut hup = since.hangup;
        loop {
            let why = if std::mem::take(&mut changed_while_starting) {
                "a watched file changed while the server started"
            } else {
                #[cfg(unix)]
                let why = tokio::select! {
                    _ = async {
                        match hup.as_mut() {
                            Some(h) => { h.recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => "SIGHUP",
                    _ = tokio::time::sleep(WATCH_INTERVAL) => "",
                };
                #[cfg(not(unix))]
                let why = {
                    tokio::time::sleep(WATCH_INTERVAL).await;
                    ""
                };
                why
            };
            let now = stamp(&files);
            let why = if why.is_empty() {
                if now == last {
                    continue;
                }
                "a watched file changed"
            } else {
                why
            };
            last = now.clone();
            let loaded = source().context("loading the config");
            // The files a config names are watched from when it parses,
            // applied or not: one that fails for a key file not there yet
            // is loaded again when the file comes.
            if let Ok(cfg) = &loaded {
                let watched = watched_files(cfg, config_file.as_ref());
                if watched != files {
                    // Files newly watched are stamped now; those watched
                    // before keep the stamp taken before the load, so that
                    // a change made while it ran is loaded next time.
                    let fresh = stamp(&watched);
                    last = watched
                        .iter()
                        .zip(fresh)
                        .map(|(f, new)| match files.iter().position(|o| o == f) {
                            Some(i) => now[i],
                            None => new,
                        })
                        .collect();
                    files = watched;
                }
            }
            match loaded.and_then(|cfg| self.apply(&cfg)) {
                Ok(r) => {
                    self.metrics.reloads_of("ok").inc();
                    tracing::info!(
                        trigger = why,
                        sessions_closed = r.sessions_closed,
                        streams_reset = r.streams_reset,
                        tls = r.tls_reloaded,
                        "configuration reloaded"
                    );
                    if !r.needs_restart.is_empty() {
                        tracing::warn!(
                            "changed settings that only a restart applies were not applied: {}",
                            r.needs_restart.join(", ")
                        );
                    }
                }
                Err(e) => {
                    self.metrics.reloads_of("failed").inc();
                    tracing::error!(
                        trigger = why,
                        "reload failed, keeping the running configuration: {e:#}"
                    );
                }
            }
        }
    }
}

/// Files whose change triggers a reload.
fn watched_files(cfg: &ServerConfig, config_file: Option<&PathBuf>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = config_file.into_iter().cloned().collect();
    if let Some(t) = &cfg.tls {
        v.extend(t.cert.iter().chain(&t.key).chain(&t.client_ca).cloned());
    }
    if let Some(j) = &cfg.jwt {
        v.extend(
            j.secret_file
                .iter()
                .chain(&j.public_key_file)
                .chain(&j.jwks_file)
                .cloned(),
        );
    }
    v
}

fn stamp(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config edited after the server read it but before it started
    /// watching is loaded at once, and a SIGHUP sent meanwhile neither
    /// ends the process nor is lost.
    #[tokio::test]
    async fn what_happens_while_the_server_starts_is_not_lost() {
        let dir = std::env::temp_dir().join(format!("tether-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.toml");
        let agent = |name: &str| {
            format!("[[agent]]\nname = \"{name}\"\ntoken = \"token-of-{name}-0123456789abcdef\"\n")
        };
        std::fs::write(&file, format!("listen = \"127.0.0.1:0\"\n{}", agent("a"))).unwrap();
        let source: ConfigSource = Arc::new({
            let file = file.clone();
            move || Ok(toml::from_str(&std::fs::read_to_string(&file)?)?)
        });

        let since = Baseline::now();
        let server = crate::Server::bind(&source().unwrap()).await.unwrap();
        // Past the coarse clock's tick, then an edit and a SIGHUP before
        // serving starts.
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(
            &file,
            format!("listen = \"127.0.0.1:0\"\n{}{}", agent("a"), agent("b")),
        )
        .unwrap();
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());

        let reloads = server.state().metrics().reloads_of("ok");
        tokio::spawn(server.with_reload(source, Some(file), since).serve());
        // Both within less than one WATCH_INTERVAL: neither waits for a
        // later change.
        let t = std::time::Instant::now();
        while reloads.get() < 2 && t.elapsed() < WATCH_INTERVAL / 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(reloads.get(), 2, "the edit and the SIGHUP each reload once");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
