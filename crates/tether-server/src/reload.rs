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
use tether_net::transport::tls::ServerIdentity;

use crate::config::{ServerConfig, TlsConfig};
use crate::State;

/// How often watched files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Where a fresh config comes from (the file plus the command line's flags).
pub type ConfigSource = Arc<dyn Fn() -> anyhow::Result<ServerConfig> + Send + Sync>;

/// Builds the TLS acceptor a `[tls]` section describes; returns it with the
/// certificate's fingerprint.
pub fn build_tls(t: &TlsConfig) -> anyhow::Result<(tokio_rustls::TlsAcceptor, String)> {
    let id = match (&t.cert, &t.key, t.self_signed) {
        (Some(c), Some(k), false) => ServerIdentity::from_pem_files(c, k)?,
        (None, None, true) => ServerIdentity::self_signed(&t.names)?,
        _ => anyhow::bail!("[tls]: set cert and key, or self_signed = true"),
    };
    // h2 for browsers; agents and clients ask for http/1.1 (WebSocket
    // upgrades need it).
    let sc = id.server_config_with_client_ca(&[b"h2", b"http/1.1"], t.client_ca.as_deref())?;
    Ok((tokio_rustls::TlsAcceptor::from(sc), id.fingerprint()))
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sessions closed because their credentials were removed.
    pub sessions_closed: usize,
    /// Streams reset because the policy no longer allows them.
    pub streams_reset: usize,
    /// Whether a new certificate was loaded.
    pub tls_reloaded: bool,
}

/// Applies a new config to a running server: credentials, policy, JWT keys,
/// limits and (file-based) certificates, including the client CA. The
/// listen address, `[[listener]]`s, `[http]`, `[session]`,
/// `max_streams_per_client` and a self-signed certificate need a restart.
pub fn apply(state: &State, cfg: &ServerConfig) -> anyhow::Result<ReloadReport> {
    let auth = crate::auth::Authenticator::from_config(cfg)?;
    let mut report = ReloadReport::default();
    let new_tls = match &cfg.tls {
        // A self-signed certificate is kept: a new one would break every pin.
        Some(t) if !t.self_signed && state.tls => Some(build_tls(t)?),
        _ => None,
    };
    auth.warn_plaintext();
    state.set_auth(auth);
    state.limits.set_config(cfg.limits.clone());
    if let Some((acceptor, fingerprint)) = new_tls {
        state.set_tls_acceptor(acceptor);
        tracing::info!(%fingerprint, "TLS certificate reloaded");
        report.tls_reloaded = true;
    }
    let (closed, reset) = state.enforce();
    report.sessions_closed = closed;
    report.streams_reset = reset;
    Ok(report)
}

/// Files whose change triggers a reload.
pub fn watched_files(cfg: &ServerConfig, config_file: Option<&PathBuf>) -> Vec<PathBuf> {
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

/// Reloads on SIGHUP and on file changes, forever.
pub async fn watch(state: Arc<State>, source: ConfigSource, config_file: Option<PathBuf>) {
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
        last = now;
        let loaded = source().context("loading the config");
        match loaded.and_then(|cfg| {
            let r = apply(&state, &cfg)?;
            files = watched_files(&cfg, config_file.as_ref());
            last = stamp(&files);
            Ok(r)
        }) {
            Ok(r) => {
                state.metrics.reloads_of("ok").inc();
                tracing::info!(
                    trigger = why,
                    sessions_closed = r.sessions_closed,
                    streams_reset = r.streams_reset,
                    tls = r.tls_reloaded,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                state.metrics.reloads_of("failed").inc();
                tracing::error!(
                    trigger = why,
                    "reload failed, keeping the running configuration: {e:#}"
                );
            }
        }
    }
}
