//! Live relayed streams and their revocation.
//!
//! Every stream a client identity has open (CLI and SOCKS streams, raw
//! WebSockets, HTTP requests whose responses are still streaming, WebSockets
//! upgraded through the proxy) has an entry here for its whole life, so a
//! reload can check it against the new credentials and policy
//! ([`Streams::enforce`]) and end it. Entries are added and removed by the
//! open path's guard ([`crate::open::OpenGuard`]); what ends a stream is
//! [`ended`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::auth::Authenticator;
use crate::config::Protocol;
use crate::identity::ClientIdentity;

/// Why a tracked stream must end (see [`ended`]).
pub(crate) const ACCESS_REVOKED: &str = "access revoked by the server's configuration";
/// Why a tracked stream of an expired JWT identity ends.
pub(crate) const CREDENTIAL_EXPIRED: &str = "credential expired";

/// One relayed stream, re-checked against the policy on reload.
struct LiveStream {
    identity: ClientIdentity,
    agent: String,
    service: String,
    protocol: Protocol,
    /// Notified when the stream must end (its access was revoked).
    revoked: Arc<Notify>,
}

/// Every live stream opened by a client identity.
#[derive(Default)]
pub(crate) struct Streams {
    map: Mutex<HashMap<u64, LiveStream>>,
    next: AtomicU64,
}

impl Streams {
    /// Adds a stream; returns its key (for [`Streams::remove`]) and what
    /// [`Streams::enforce`] notifies to end it.
    pub(crate) fn insert(
        &self,
        identity: &ClientIdentity,
        agent: &str,
        service: &str,
        protocol: Protocol,
    ) -> (u64, Arc<Notify>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(Notify::new());
        self.lock().insert(
            key,
            LiveStream {
                identity: identity.clone(),
                agent: agent.to_owned(),
                service: service.to_owned(),
                protocol,
                revoked: revoked.clone(),
            },
        );
        (key, revoked)
    }

    /// Forgets a stream.
    pub(crate) fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Ends every stream whose identity no longer holds or that `auth`'s
    /// policy no longer allows; returns how many.
    pub(crate) fn enforce(&self, auth: &Authenticator) -> usize {
        let mut ended = 0;
        for s in self.lock().values() {
            let allowed = auth.client_revalidate(&s.identity)
                && auth
                    .decide(&s.identity, &s.agent, &s.service, s.protocol)
                    .allowed;
            if !allowed {
                s.revoked.notify_one();
                ended += 1;
            }
        }
        ended
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveStream>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves, with the reason, when a stream must end: `revoked` was
/// notified (a reload took its access away), or `expires_at` (its JWT's
/// `exp`) passed. Without either it never resolves.
pub(crate) fn ended(
    revoked: Option<Arc<Notify>>,
    expires_at: Option<Instant>,
) -> Pin<Box<dyn Future<Output = &'static str> + Send>> {
    Box::pin(async move {
        let expiry = async {
            match expires_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let revocation = async {
            match &revoked {
                Some(r) => r.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = revocation => ACCESS_REVOKED,
            _ = expiry => CREDENTIAL_EXPIRED,
        }
    })
}
