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

    /// Reloads on SIGHUP and on file changes, forever.
    pub(crate) async fn watch(self, source: ConfigSource, config_file: Option<PathBuf>) {
        let mut files = match source() {
            Ok(cfg) => watched_files(&cfg, config_file.as_ref()),
            Err(_) => config_file.iter().cloned().collect(),
        };
        let mut last = stamp(&files);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
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
