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

    /// Sends GOAWAY (`normal`) on every client session: they open nothing
    /// new here, their live streams finish.
    pub(crate) fn go_away_clients(&self, reason: &str) -> usize {
        let mut n = 0;
        for (conn, owner) in self.lock().values() {
            if matches!(owner, SessionOwner::Client(_)) {
                conn.go_away(ErrorCode::Normal, reason);
                n += 1;
            }
        }
        n
    }

    /// Sends GOAWAY on every agent session: `leaving` to agents that know
    /// it (version 4: do not dial this replica again unless it is
    /// advertised anew), `normal` to older ones; returns the sessions.
    pub(crate) fn go_away_agents(&self, reason: &str) -> Vec<Connection> {
        let mut conns = vec![];
        for (conn, owner) in self.lock().values() {
            if matches!(owner, SessionOwner::Agent { .. }) {
                let code = if conn.version() >= tether_proto::REPLICAS_VERSION {
                    ErrorCode::Leaving
                } else {
                    ErrorCode::Normal
                };
                conn.go_away(code, reason);
                conns.push(conn.clone());
            }
        }
        conns
    }

    /// Closes every session now (their last streams are reset).
    pub(crate) fn close_all(&self, reason: &str) {
        for (conn, _) in self.lock().values() {
            conn.close(ErrorCode::Normal, reason);
        }
    }

    /// Live client sessions (a drained one leaves once its streams are done).
    pub(crate) fn clients(&self) -> usize {
        self.lock()
            .values()
            .filter(|(_, o)| matches!(o, SessionOwner::Client(_)))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Connection, SessionOwner)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}
