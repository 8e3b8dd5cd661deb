//! The registry of connected agents.
//!
//! Rule for duplicate names: **the newest session wins**. When an agent
//! registers under a name that already has a live session, the new session
//! takes over at once (new opens go to it) and the old one is sent GOAWAY
//! (`replaced`): its open streams may finish within the drain deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;
use tether_net::Connection;

/// One registered agent session.
#[derive(Clone)]
pub(crate) struct AgentEntry {
    /// The session.
    pub(crate) conn: Connection,
    /// Distinguishes sessions of the same name.
    pub(crate) generation: u64,
    /// When it registered.
    pub(crate) since: SystemTime,
    /// Where it connected from.
    pub(crate) addr: SocketAddr,
    /// The agent's software string.
    pub(crate) software: String,
    /// The negotiated protocol version (3 and up announce a catalog).
    pub(crate) version: u16,
}

/// Live agents by name.
pub(crate) struct Registry {
    agents: Mutex<HashMap<String, AgentEntry>>,
    next_generation: std::sync::atomic::AtomicU64,
    /// Bumped on every change, so listeners can follow agents coming and going.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            agents: Mutex::default(),
            next_generation: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Registry {
    /// Registers a session; returns its generation and the session it replaced.
    pub(crate) fn register(
        &self,
        name: &str,
        conn: Connection,
        addr: SocketAddr,
        software: String,
        version: u16,
    ) -> (u64, Option<AgentEntry>) {
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = AgentEntry {
            conn,
            generation,
            since: SystemTime::now(),
            addr,
            software,
            version,
        };
        let old = self.lock().insert(name.to_owned(), entry);
        self.changes.send_modify(|v| *v += 1);
        (generation, old)
    }

    /// Removes the agent if it is still the given generation.
    pub(crate) fn unregister(&self, name: &str, generation: u64) -> bool {
        let mut g = self.lock();
        if g.get(name).is_some_and(|e| e.generation == generation) {
            g.remove(name);
            drop(g);
            self.changes.send_modify(|v| *v += 1);
            true
        } else {
            false
        }
    }

    /// A receiver that changes whenever an agent registers or leaves.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The live session of an agent.
    pub(crate) fn get(&self, name: &str) -> Option<AgentEntry> {
        self.lock().get(name).cloned()
    }

    /// Number of registered agents.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentEntry>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }
}
