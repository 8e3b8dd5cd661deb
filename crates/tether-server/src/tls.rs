//! The server's TLS identity: built from `[tls]` at start, replaced by a
//! reload (new handshakes use the new one).

use std::sync::RwLock;

use tether_net::transport::tls::ServerIdentity;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Builds the TLS acceptor a `[tls]` section describes; returns it with the
/// certificate's fingerprint.
pub(crate) fn build(t: &TlsConfig) -> anyhow::Result<(TlsAcceptor, String)> {
    let id = match (&t.cert, &t.key, t.self_signed) {
        (Some(c), Some(k), false) => ServerIdentity::from_pem_files(c, k)?,
        (None, None, true) => ServerIdentity::self_signed(&t.names)?,
        _ => anyhow::bail!("[tls]: set cert and key, or self_signed = true"),
    };
    // h2 for browsers; agents and clients ask for http/1.1 (WebSocket
    // upgrades need it).
    let sc = id.server_config_with_client_ca(&[b"h2", b"http/1.1"], t.client_ca.as_deref())?;
    Ok((TlsAcceptor::from(sc), id.fingerprint()))
}

/// The acceptor in force; `None` when the server speaks plain HTTP.
pub(crate) struct TlsSlot(RwLock<Option<TlsAcceptor>>);

impl TlsSlot {
    /// A slot holding `acceptor`.
    pub(crate) fn new(acceptor: Option<TlsAcceptor>) -> TlsSlot {
        TlsSlot(RwLock::new(acceptor))
    }

    /// The current acceptor.
    pub(crate) fn get(&self) -> Option<TlsAcceptor> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs a new acceptor (new handshakes use it).
    pub(crate) fn set(&self, a: TlsAcceptor) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(a);
    }

    /// Whether the server serves TLS (fixed at start: switching needs a
    /// restart).
    pub(crate) fn serving(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}
