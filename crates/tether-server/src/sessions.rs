//! Live multiplexed sessions (agents and CLI clients): for draining at
//! shutdown, for closing those whose credentials a reload removed, and for
//! the admin API's list ([`Sessions::list`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use tether_net::Connection;
use tether_proto::ErrorCode;

use crate::auth::{AuthStore, Revalidation};
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

impl SessionOwner {
    /// Whether its credential still holds under `check`'s configuration.
    fn holds(&self, check: &mut Revalidation) -> bool {
        match self {
            SessionOwner::Agent { name, token_hash } => {
                check.auth().agent_still_valid(name, token_hash.as_ref())
            }
            SessionOwner::Client(id) => check.holds(id),
        }
    }
}

/// Whether `owner`'s credential, checked at auth generation `checked_at`,
/// still holds after any reload since.
pub(crate) fn credential_holds(owner: &SessionOwner, auth: &AuthStore, checked_at: u64) -> bool {
    auth.generation() == checked_at || owner.holds(&mut auth.get().revalidation())
}

/// Closes a session whose credential no longer holds.
pub(crate) fn revoke(conn: &Connection) {
    tracing::warn!(session = %conn.label(), "credentials revoked: closing the session");
    conn.close(
        ErrorCode::Unauthorized,
        "credentials revoked by the server's configuration",
    );
}

/// One tracked session.
struct Tracked {
    conn: Connection,
    owner: SessionOwner,
    peer: SocketAddr,
    software: String,
    since: SystemTime,
}

/// What the admin API shows of one session.
#[derive(Debug, Clone)]
pub(crate) struct SessionView {
    /// Its key in the table (stable while it lives).
    pub(crate) key: u64,
    /// `agent` or `client`.
    pub(crate) kind: &'static str,
    /// The agent's or the client identity's name.
    pub(crate) name: String,
    /// Where it connects from (as the server sees it).
    pub(crate) peer: SocketAddr,
    /// The peer's software string.
    pub(crate) software: String,
    /// The negotiated protocol version.
    pub(crate) version: u16,
    /// Connected since.
    pub(crate) since: SystemTime,
    /// Streams open on it.
    pub(crate) streams: u64,
    /// Payload bytes received on it.
    pub(crate) bytes_in: u64,
    /// Payload bytes sent on it.
    pub(crate) bytes_out: u64,
    /// It was told to go away (or is closing): no new streams.
    pub(crate) draining: bool,
}

/// Tells an agent's session this replica is leaving (`normal` before the
/// version that knows `leaving`).
fn leave(conn: &Connection, reason: &str) {
    let code = if conn.version() >= tether_proto::REPLICAS_VERSION {
        ErrorCode::Leaving
    } else {
        ErrorCode::Normal
    };
    conn.go_away(code, reason);
}

/// Every live session.
#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<u64, Tracked>>,
    next: AtomicU64,
    /// Why agent sessions were told this replica is leaving, once they
    /// were ([`Sessions::go_away_agents`]): one tracked later (its
    /// handshake was under way) is told at once.
    leaving: std::sync::OnceLock<String>,
}

impl Sessions {
    /// Remembers a live session from `peer` until [`Sessions::untrack`].
    ///
    /// `checked_at` is the [`AuthStore::generation`] read before the
    /// credential was checked: a reload since then (during the handshake)
    /// did not see this session, so its credential is checked again here,
    /// against the configuration in force, and the session closed when it
    /// no longer holds. A reload after this sees it tracked.
    pub(crate) fn track(
        &self,
        conn: Connection,
        owner: SessionOwner,
        peer: SocketAddr,
        software: &str,
        auth: &AuthStore,
        checked_at: u64,
    ) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let mut map = self.lock();
        map.insert(
            key,
            Tracked {
                conn: conn.clone(),
                owner: owner.clone(),
                peer,
                software: software.to_owned(),
                since: SystemTime::now(),
            },
        );
        // (Read under the lock `go_away_agents` sets it under: a session is
        // either in its walk or told here.)
        if let (Some(reason), SessionOwner::Agent { .. }) = (self.leaving.get(), &owner) {
            leave(&conn, reason);
        }
        drop(map);
        if !credential_holds(&owner, auth, checked_at) {
            revoke(&conn);
        }
        key
    }

    /// Every live session, oldest first.
    pub(crate) fn list(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = self
            .lock()
            .iter()
            .map(|(key, t)| {
                let (kind, name) = match &t.owner {
                    SessionOwner::Agent { name, .. } => ("agent", name.clone()),
                    SessionOwner::Client(id) => ("client", id.name.clone()),
                };
                let c = t.conn.counters();
                SessionView {
                    key: *key,
                    kind,
                    name,
                    peer: t.peer,
                    software: t.software.clone(),
                    version: t.conn.version(),
                    since: t.since,
                    streams: t.conn.stats().live as u64,
                    bytes_in: c.bytes_in.load(Ordering::Relaxed),
                    bytes_out: c.bytes_out.load(Ordering::Relaxed),
                    draining: t.conn.is_draining() || t.conn.is_closed(),
                }
            })
            .collect();
        v.sort_by_key(|s| s.key);
        v
    }

    /// Forgets a session.
    pub(crate) fn untrack(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Closes (GOAWAY `unauthorized`) every session whose credentials `auth`
    /// no longer accepts; returns how many.
    pub(crate) fn enforce(&self, check: &mut Revalidation) -> usize {
        let mut closed = 0;
        for Tracked { conn, owner, .. } in self.lock().values() {
            if !owner.holds(check) && !conn.is_closed() {
                revoke(conn);
                closed += 1;
            }
        }
        closed
    }

    /// Sends GOAWAY (`normal`) on every client session: they open nothing
    /// new here, their live streams finish.
    pub(crate) fn go_away_clients(&self, reason: &str) -> usize {
        let mut n = 0;
        for Tracked { conn, owner, .. } in self.lock().values() {
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
        let map = self.lock();
        let _ = self.leaving.set(reason.to_owned());
        for Tracked { conn, owner, .. } in map.values() {
            if matches!(owner, SessionOwner::Agent { .. }) {
                leave(conn, reason);
                conns.push(conn.clone());
            }
        }
        conns
    }

    /// Closes every session now (their last streams are reset).
    pub(crate) fn close_all(&self, reason: &str) {
        for Tracked { conn, .. } in self.lock().values() {
            conn.close(ErrorCode::Normal, reason);
        }
    }

    /// Live agent and client sessions, counted without a view of each.
    pub(crate) fn counts(&self) -> (usize, usize) {
        self.lock()
            .values()
            .fold((0, 0), |(agents, clients), t| match t.owner {
                SessionOwner::Agent { .. } => (agents + 1, clients),
                SessionOwner::Client(_) => (agents, clients + 1),
            })
    }

    /// Live client sessions (a drained one leaves once its streams are done).
    pub(crate) fn clients(&self) -> usize {
        self.counts().1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;
    use crate::config::ServerConfig;
    use tether_net::transport::mem;

    /// An agent session whose handshake finished after the replica told
    /// its agents it is leaving is told too, when it is tracked.
    #[tokio::test]
    async fn an_agent_tracked_after_the_leaving_notice_is_told_at_once() {
        let cfg: ServerConfig = toml::from_str("").unwrap();
        let auth = AuthStore::new(Authenticator::from_config(&cfg).unwrap());
        let sessions = Sessions::default();
        let agent = SessionOwner::Agent {
            name: "prod".into(),
            token_hash: None,
        };
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let ((early_agent, _), (early_server, _)) = mem::sessions().await.unwrap();
        sessions.track(
            early_server,
            agent.clone(),
            peer,
            "t",
            &auth,
            auth.generation(),
        );
        assert_eq!(sessions.go_away_agents("leaving").len(), 1);
        let ((late_agent, _), (late_server, _)) = mem::sessions().await.unwrap();
        sessions.track(late_server, agent, peer, "t", &auth, auth.generation());
        for side in [early_agent, late_agent] {
            let told = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while side.peer_goaway().is_none() {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            })
            .await;
            assert!(told.is_ok(), "no GOAWAY");
            assert_eq!(side.peer_goaway(), Some(ErrorCode::Leaving));
        }
    }
}
