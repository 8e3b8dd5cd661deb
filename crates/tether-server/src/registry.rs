//! The registry of connected agents: for each name, its pool of instances.
//!
//! Several agent processes with one name (a Deployment with replicas > 1)
//! form a **pool**: each tells its instance id when it connects, and opens
//! go to the least loaded live member ([`Registry::pick`]). The rule for a
//! reconnect is **the newest session of an instance wins**: when the same
//! instance registers again (a reconnect after a half-open socket), the new
//! session takes over at once and the old one is sent GOAWAY (`replaced`),
//! its open streams may finish within the drain deadline. Agents that tell
//! no instance (older builds) are all one instance, so for them the newest
//! session of the name wins, as before pools existed.

use foldhash::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tether_net::Connection;

/// Most instances one agent name may have connected to this replica.
pub(crate) const MAX_INSTANCES: usize = 8;

/// One registered agent session.
#[derive(Clone)]
pub(crate) struct AgentEntry {
    /// The session.
    pub(crate) conn: Connection,
    /// Distinguishes sessions, also of the same instance.
    pub(crate) generation: u64,
    /// The instance id the agent told (empty for agents that tell none).
    pub(crate) instance: String,
    /// When it registered.
    pub(crate) since: SystemTime,
    /// Where it connected from.
    pub(crate) addr: SocketAddr,
    /// The agent's software string.
    pub(crate) software: String,
    /// The negotiated protocol version (3 and up announce a catalog).
    pub(crate) version: u16,
}

impl AgentEntry {
    /// Takes new opens: neither closed nor draining.
    pub(crate) fn is_live(&self) -> bool {
        !self.conn.is_closed() && !self.conn.is_draining()
    }

    /// Streams live or opening on this session (its load here).
    fn load(&self) -> usize {
        self.conn.stats().live
    }
}

/// Why a session could not join its name's pool.
#[derive(Debug)]
pub(crate) struct PoolFull;

/// When a name was last present here.
#[derive(Clone, Copy)]
struct Seen {
    /// Still has a session, or the moment its last one ended.
    present_until: Option<Instant>,
}

#[derive(Default)]
struct Table {
    pools: HashMap<String, Vec<AgentEntry>>,
    /// Every name that ever registered in this process (bounded by the
    /// configured agents: only authenticated names get here).
    seen: HashMap<String, Seen>,
    /// When a name registered here for the first time.
    last_new_name: Option<Instant>,
}

/// Live agents by name.
pub(crate) struct Registry {
    table: Mutex<Table>,
    next_generation: std::sync::atomic::AtomicU64,
    /// Bumped on every change, so listeners can follow agents coming and going.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            table: Mutex::default(),
            next_generation: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

/// Whether a pool refuses a new session of `instance`: not one of its
/// members, and [`MAX_INSTANCES`] live members there already. Members that
/// drain (an agent shutting down in a rolling update) leave within the drain
/// timeout and do not count against the pool; at most as many again may be
/// draining.
fn refuses(pool: &[AgentEntry], instance: &str) -> bool {
    !pool.iter().any(|e| e.instance == instance)
        && (pool.iter().filter(|e| e.is_live()).count() >= MAX_INSTANCES
            || pool.len() >= 2 * MAX_INSTANCES)
}

/// What [`Registry::register`] did.
pub(crate) struct Registered {
    /// The new session's generation (for [`Registry::unregister`]).
    pub(crate) generation: u64,
    /// The older session of the same instance it replaced.
    pub(crate) replaced: Option<AgentEntry>,
    /// Instances of the name now connected.
    pub(crate) instances: usize,
}

impl Registry {
    /// Whether a session of `instance` of `name` would be refused for a
    /// full pool ([`Registry::register`]'s rule), asked before the upgrade
    /// is answered; the registration still checks, as another instance
    /// may join in between.
    pub(crate) fn is_full_for(&self, name: &str, instance: &str) -> bool {
        self.lock()
            .pools
            .get(name)
            .is_some_and(|pool| refuses(pool, instance))
    }

    /// Registers a session as `instance` of `name`; refused when the pool
    /// already has [`MAX_INSTANCES`] other instances. `count` hears how
    /// many instances are connected now, under the registry's lock, so
    /// that two sessions coming or going at once leave the last word with
    /// the latest count.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn register(
        &self,
        name: &str,
        instance: &str,
        conn: Connection,
        addr: SocketAddr,
        software: String,
        version: u16,
        count: impl FnOnce(usize),
    ) -> Result<Registered, PoolFull> {
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = AgentEntry {
            conn,
            generation,
            instance: instance.to_owned(),
            since: SystemTime::now(),
            addr,
            software,
            version,
        };
        let mut t = self.lock();
        let pool = t.pools.entry(name.to_owned()).or_default();
        let replaced = match pool.iter().position(|e| e.instance == instance) {
            Some(i) => Some(std::mem::replace(&mut pool[i], entry)),
            None if refuses(pool, instance) => return Err(PoolFull),
            None => {
                pool.push(entry);
                None
            }
        };
        let instances = pool.len();
        count(instances);
        let now = Instant::now();
        if t.seen
            .insert(
                name.to_owned(),
                Seen {
                    present_until: None,
                },
            )
            .is_none()
        {
            t.last_new_name = Some(now);
        }
        drop(t);
        self.changes.send_modify(|v| *v += 1);
        Ok(Registered {
            generation,
            replaced,
            instances,
        })
    }

    /// Removes the session if it is still registered (a newer session of
    /// its instance may have taken its place); `count` hears how many
    /// instances of the name are left, under the lock as in
    /// [`Registry::register`].
    pub(crate) fn unregister(&self, name: &str, generation: u64, count: impl FnOnce(usize)) {
        let mut t = self.lock();
        let Some(pool) = t.pools.get_mut(name) else {
            return;
        };
        let Some(i) = pool.iter().position(|e| e.generation == generation) else {
            return;
        };
        pool.remove(i);
        let left = pool.len();
        count(left);
        if left == 0 {
            t.pools.remove(name);
            t.seen.insert(
                name.to_owned(),
                Seen {
                    present_until: Some(Instant::now()),
                },
            );
        }
        drop(t);
        self.changes.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever an agent registers or leaves.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The live member of `name` with the fewest streams here (ties at
    /// random, so short requests spread too), leaving out the session
    /// `except`.
    pub(crate) fn pick(&self, name: &str, except: Option<u64>) -> Option<AgentEntry> {
        let t = self.lock();
        let live: Vec<&AgentEntry> = t
            .pools
            .get(name)?
            .iter()
            .filter(|e| e.is_live() && Some(e.generation) != except)
            .collect();
        let least = live.iter().map(|e| e.load()).min()?;
        let tied: Vec<&&AgentEntry> = live.iter().filter(|e| e.load() == least).collect();
        let i = if tied.len() > 1 {
            rand::random_range(0..tied.len())
        } else {
            0
        };
        tied.get(i).map(|e| (**e).clone())
    }

    /// A live member of `name`, other than the session `except`, whose
    /// catalog lists `service`: where an open goes when the member
    /// picked by load does not offer it (a pool's members offering
    /// different services: a roll that adds one, discovery seeing a
    /// change at different times). Looked for only then: the catalogs
    /// may be long.
    pub(crate) fn pick_listing(
        &self,
        name: &str,
        service: &str,
        except: Option<u64>,
    ) -> Option<AgentEntry> {
        // The catalogs are read with the registry unlocked: a session's
        // reader updates its catalog under the session's own lock, which
        // `is_live` takes under the registry's.
        let members: Vec<AgentEntry> = {
            let t = self.lock();
            t.pools
                .get(name)?
                .iter()
                .filter(|e| e.is_live() && Some(e.generation) != except)
                .cloned()
                .collect()
        };
        members
            .into_iter()
            .filter(|e| {
                let catalog = e.conn.peer_catalog();
                let listed = catalog
                    .borrow()
                    .as_deref()
                    .is_some_and(|c| c.iter().any(|s| s.name == service));
                listed
            })
            .min_by_key(|e| e.load())
    }

    /// The live member of `name` to show or use (see [`Registry::pick`]).
    pub(crate) fn get(&self, name: &str) -> Option<AgentEntry> {
        self.pick(name, None)
    }

    /// Whether `name` has a live (not draining) session here: what
    /// [`Registry::get`] would find, without choosing one.
    pub(crate) fn is_online(&self, name: &str) -> bool {
        self.lock()
            .pools
            .get(name)
            .is_some_and(|p| p.iter().any(AgentEntry::is_live))
    }

    /// Every session of `name` (draining ones included), oldest first.
    pub(crate) fn instances(&self, name: &str) -> Vec<AgentEntry> {
        self.lock().pools.get(name).cloned().unwrap_or_default()
    }

    /// Whether `name` had a session here within `window` (now included).
    pub(crate) fn seen_within(&self, name: &str, window: Duration) -> bool {
        match self.lock().seen.get(name) {
            None => false,
            Some(Seen {
                present_until: None,
            }) => true,
            Some(Seen {
                present_until: Some(at),
            }) => at.elapsed() <= window,
        }
    }

    /// When a name registered here for the first time, most recently.
    pub(crate) fn last_new_name(&self) -> Option<Instant> {
        self.lock().last_new_name
    }

    /// Whether `instance` of `name` has a live session here.
    pub(crate) fn has_live(&self, name: &str, instance: &str) -> bool {
        self.lock()
            .pools
            .get(name)
            .is_some_and(|pool| pool.iter().any(|e| e.instance == instance && e.is_live()))
    }

    /// Agent names with a live (not draining) session here: what
    /// `tether_agents` and the admin API's `agents_online` count. A walk
    /// over every pool: for a scrape or an API call, not per session.
    pub(crate) fn online(&self) -> usize {
        self.lock()
            .pools
            .values()
            .filter(|pool| pool.iter().any(AgentEntry::is_live))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_net::transport::mem;
    use tether_proto::ErrorCode;

    /// Registers a session of `instance` of `prod`; the agent's end is
    /// kept in `agents` (dropped, the session would close).
    async fn register(
        r: &Registry,
        instance: &str,
        agents: &mut Vec<Connection>,
    ) -> (Result<Registered, PoolFull>, Connection) {
        let ((agent, _), (conn, _)) = mem::sessions().await.unwrap();
        agents.push(agent);
        let got = r.register(
            "prod",
            instance,
            conn.clone(),
            "127.0.0.1:1".parse().unwrap(),
            "agent".into(),
            3,
            |_| {},
        );
        (got, conn)
    }

    /// A member that drains (an agent process shutting down in a rolling
    /// update) neither counts as online nor fills the pool.
    #[tokio::test]
    async fn draining_members_are_not_online_and_do_not_fill_the_pool() {
        let r = Registry::default();
        let a = &mut vec![];
        let mut conns = vec![];
        for i in 0..MAX_INSTANCES {
            let (got, conn) = register(&r, &format!("i{i}"), a).await;
            assert!(got.is_ok());
            conns.push(conn);
        }
        assert_eq!(r.online(), 1);
        assert!(r.is_full_for("prod", "full"), "told before the upgrade");
        assert!(!r.is_full_for("prod", "i0"), "a member may reconnect");
        assert!(
            register(&r, "full", a).await.0.is_err(),
            "a ninth live member"
        );
        conns[0].go_away(ErrorCode::Normal, "shutting down");
        assert!(!r.is_full_for("prod", "new"));
        assert!(
            register(&r, "new", a).await.0.is_ok(),
            "the draining member filled the pool"
        );
        for c in &conns[1..] {
            c.go_away(ErrorCode::Normal, "shutting down");
        }
        assert_eq!(r.online(), 1, "the new member is live");
        let (got, _) = register(&r, "new", a).await;
        let replaced = got.ok().and_then(|g| g.replaced).expect("replaced");
        replaced.conn.go_away(ErrorCode::Normal, "replaced");
        assert_eq!(r.online(), 1);
    }
}
