//! Live multiplexed sessions (agents and CLI clients), for draining at
//! shutdown and for closing those whose credentials a reload removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tether_net::Connection;
use tether_proto::ErrorCode;

use crate::auth::Authenticator;
use crate::identity::ClientIdentity;

/// Who a tracked session belongs to (re-checked on reload).
#[derive(Debug, Clone)]
pub(crate) enum SessionOwner {
    /// An agent, by token (its SHA-256) or by certificate (`None`).
    Agent {
        /// Agent name.
        name: String,
        /// SHA-256 of the token it used, if any.
        token_hash: Option<[u8; 32]>,
    },
    /// A CLI client.
    Client(ClientIdentity),
}

/// Every live session.
#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<u64, (Connection, SessionOwner)>>,
    next: AtomicU64,
}

impl Sessions {
    /// Remembers a live session until [`Sessions::untrack`].
    pub(crate) fn track(&self, conn: Connection, owner: SessionOwner) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, (conn, owner));
        key
    }

    /// Forgets a session.
    pub(crate) fn untrack(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Closes (GOAWAY `unauthorized`) every session whose credentials `auth`
    /// no longer accepts; returns how many.
    pub(crate) fn enforce(&self, auth: &Authenticator) -> usize {
        let mut closed = 0;
        for (conn, owner) in self.lock().values() {
            let valid = match owner {
                SessionOwner::Agent { name, token_hash } => {
                    auth.agent_still_valid(name, token_hash.as_ref())
                }
                SessionOwner::Client(id) => auth.client_revalidate(id),
            };
            if !valid && !conn.is_closed() {
                tracing::warn!(session = %conn.label(), "credentials revoked: closing the session");
                conn.close(
                    ErrorCode::Unauthorized,
                    "credentials revoked by the server's configuration",
                );
                closed += 1;
            }
        }
        closed
    }

    /// Sends GOAWAY on every session and waits until they are all gone (each
    /// session resets its last streams at its drain deadline).
    pub(crate) async fn drain(&self, reason: &str) {
        let conns: Vec<Connection> = self.lock().values().map(|(c, _)| c.clone()).collect();
        tracing::info!(
            sessions = conns.len(),
            "draining: GOAWAY sent to every session"
        );
        for c in &conns {
            c.go_away(ErrorCode::Normal, reason);
        }
        for c in conns {
            c.closed().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Connection, SessionOwner)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}
