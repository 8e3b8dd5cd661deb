//! The client's current session to the server, shared by every listener:
//! which session new connections open on, waiting briefly for one when
//! there is none (a reconnect in progress), and moving to a fresh session
//! when a server replica cannot reach the agent.

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_net::{Connection, Refusal, Stream};
use tether_proto::{OpenErrorCode, Target};
use tokio::sync::watch;

/// How long a new connection waits for a session when there is none but
/// there was one lately (the server drained it and a fresh one is being
/// dialed), or when the client has just started and its first session is
/// being dialed. A client that has had no session for longer fails new
/// connections at once.
pub const SESSION_WAIT: Duration = Duration::from_secs(3);

/// "Lately", for [`SESSION_WAIT`].
const HANDOVER: Duration = Duration::from_secs(10);

/// How often an open is tried again after a refusal another replica, or a
/// fresh session, may not give. A load balancer may hand the fresh session
/// to the same replica again (a Kubernetes Service picks at random): with
/// four retries (five tries in all), an open fails only if one replica in
/// three is cut off and the balancer picks it five times running (under
/// 1 %), and the retries take about 6 s at most (one fresh session a
/// second, plus 200 to 500 ms each).
const RETRIES: usize = 4;

/// At most one fresh session per this long, whatever the refusals.
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// The session new streams open on (cheap to clone).
#[derive(Clone)]
pub struct CurrentSession {
    tx: Arc<watch::Sender<Option<Connection>>>,
    /// The session an open asked to replace ([`Connection::key`]); only the
    /// published one can be, so a late refusal from an older session does
    /// not throw away its successor.
    renew: Arc<watch::Sender<Option<usize>>>,
    last_renew: Arc<std::sync::Mutex<Option<Instant>>>,
    /// When the last session stopped taking streams.
    lost_at: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Default for CurrentSession {
    fn default() -> Self {
        CurrentSession {
            tx: Arc::new(watch::channel(None).0),
            renew: Arc::new(watch::channel(None).0),
            last_renew: Arc::default(),
            // Starting counts as a hand-over: a connection accepted while
            // the first session is dialed waits for it (a script that starts
            // the client and at once connects through it).
            lost_at: Arc::new(std::sync::Mutex::new(Some(Instant::now()))),
        }
    }
}

impl CurrentSession {
    /// No session yet.
    pub fn new() -> CurrentSession {
        CurrentSession::default()
    }

    /// New streams go to `conn` from now on.
    pub fn publish(&self, conn: Connection) {
        self.renew.send_replace(None);
        self.tx.send_replace(Some(conn));
    }

    /// The session stopped taking new streams (drained or lost).
    pub fn clear(&self) {
        *self.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.tx.send_replace(None);
    }

    /// Resolves when an open asked for a fresh session in place of `conn`.
    pub async fn renew_requested(&self, conn: &Connection) {
        let key = conn.key();
        let mut rx = self.renew.subscribe();
        if rx.wait_for(|k| *k == Some(key)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The current session if it takes new streams; else, during a
    /// hand-over, the next one within [`SESSION_WAIT`]; never `avoid` (a
    /// session that just failed an open). A hand-over: the published
    /// session has just been told GOAWAY or closed (its successor is being
    /// dialed, and it is not cleared yet), or there was one in the last 10 s.
    pub async fn get(&self, avoid: Option<&Connection>) -> Option<Connection> {
        let usable = |c: &Option<Connection>| {
            c.as_ref().is_some_and(|c| {
                !c.is_closed() && !c.is_draining() && avoid.is_none_or(|a| !a.same_session(c))
            })
        };
        let mut rx = self.tx.subscribe();
        let now = rx.borrow().clone();
        if usable(&now) {
            return now;
        }
        let handover = avoid.is_some()
            || now.is_some()
            || self
                .lost_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < HANDOVER);
        if !handover {
            return None;
        }
        let found = tokio::time::timeout(SESSION_WAIT, rx.wait_for(usable)).await;
        match found {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        }
    }

    /// The current session if it takes new streams, without waiting.
    pub fn now(&self) -> Option<Connection> {
        self.tx
            .borrow()
            .clone()
            .filter(|c| !c.is_closed() && !c.is_draining())
    }

    /// Asks for a fresh session through the server URL (the load balancer
    /// may pick another replica); `old` is told GOAWAY, its streams finish.
    /// At most one fresh session per [`RENEW_EVERY`]: an open that asks
    /// sooner waits its turn rather than being dropped, or its next try
    /// would find `old` still current and give up.
    async fn renew(&self, old: &Connection) {
        loop {
            let current = self
                .tx
                .borrow()
                .as_ref()
                .is_some_and(|c| c.same_session(old));
            if !current || old.is_draining() || old.is_closed() {
                return; // already being replaced
            }
            let wait = {
                let mut last = self.last_renew.lock().unwrap_or_else(|p| p.into_inner());
                match *last {
                    Some(t) if t.elapsed() < RENEW_EVERY => RENEW_EVERY - t.elapsed(),
                    _ => {
                        *last = Some(Instant::now());
                        Duration::ZERO
                    }
                }
            };
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        old.go_away(
            tether_proto::ErrorCode::Normal,
            "moving to a fresh session: this server replica cannot reach the agent",
        );
        self.renew.send_replace(Some(old.key()));
    }

    /// Opens `target`. A refusal that another replica may not give (the
    /// replica has no session to the agent, or it is draining) is retried
    /// on a fresh session: no byte has moved yet, so nothing is lost.
    pub async fn open(&self, target: Target) -> Result<Stream, Refusal> {
        self.open_with(target, Bytes::new()).await
    }

    /// Like [`CurrentSession::open`], with the stream's first bytes sent
    /// along (early data, at most [`tether_proto::MAX_EARLY_DATA`]); a
    /// retry sends them again (PROTOCOL.md 6.3).
    pub async fn open_with(&self, target: Target, early: Bytes) -> Result<Stream, Refusal> {
        // Boxed: the retries' state lives only while opening; the caller's
        // task keeps its own state for the stream's whole life.
        Box::pin(self.open_with_retries(target, early)).await
    }

    async fn open_with_retries(&self, target: Target, early: Bytes) -> Result<Stream, Refusal> {
        let mut avoid: Option<Connection> = None;
        let mut last_err = None;
        for attempt in 0..=RETRIES {
            let Some(conn) = self.get(avoid.as_ref()).await else {
                return Err(last_err.unwrap_or_else(|| {
                    Refusal::new(OpenErrorCode::SessionLost, "not connected to the server")
                }));
            };
            match conn.open_with(target.clone(), early.clone()).await {
                Ok(s) => return Ok(s),
                // Refusals another replica, or a fresh session, may not give.
                // The early data goes again: after `not_here` and `going_away`
                // it reached nothing; after `session_lost` it may have, and
                // the service may see it twice (PROTOCOL.md 6.3).
                Err(r)
                    if attempt < RETRIES
                        && matches!(
                            r.code,
                            OpenErrorCode::NotHere
                                | OpenErrorCode::GoingAway
                                | OpenErrorCode::SessionLost
                        ) =>
                {
                    tracing::info!(target = %target, code = %r.code, "open refused by this server replica; retrying on a fresh session: {}", r.reason);
                    if r.code == OpenErrorCode::NotHere {
                        self.renew(&conn).await;
                    }
                    tokio::time::sleep(Duration::from_millis(rand::random_range(200..500))).await;
                    // After not_here, not this session again (it is being
                    // replaced); otherwise the same session is fine.
                    avoid = (r.code == OpenErrorCode::NotHere).then_some(conn);
                    last_err = Some(r);
                }
                Err(r) => return Err(r),
            }
        }
        Err(last_err.unwrap_or_else(|| Refusal::new(OpenErrorCode::Internal, "no attempt made")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_net::transport::mem;
    use tether_proto::ErrorCode;

    /// A client session and its server end, over memory.
    async fn session() -> (Connection, Connection) {
        let ((client, _), (server, _)) = mem::sessions().await.unwrap();
        (client, server)
    }

    /// A connection accepted the moment the server drains the session
    /// (GOAWAY seen, the session not yet cleared by the reconnect loop)
    /// waits for the next session instead of failing at once: a rolling
    /// restart loses no connection.
    #[tokio::test]
    async fn an_open_during_a_goaway_waits_for_the_next_session() {
        let current = CurrentSession::new();
        let (first, first_server) = session().await;
        current.publish(first.clone());
        assert!(current
            .get(None)
            .await
            .is_some_and(|c| c.same_session(&first)));
        first_server.go_away(ErrorCode::Normal, "server shutting down");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !first.is_draining() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the GOAWAY arrives");
        let waiting = tokio::spawn({
            let current = current.clone();
            async move { current.get(None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "gave up without waiting for the next session"
        );
        let (second, _second_server) = session().await;
        current.publish(second.clone());
        let got = waiting.await.unwrap().expect("the next session");
        assert!(got.same_session(&second));
    }

    /// Just started, a connection waits for the first session; with none
    /// for long, it fails at once.
    #[tokio::test]
    async fn only_a_client_without_a_session_for_long_fails_at_once() {
        let current = CurrentSession::new();
        let waiting = tokio::spawn({
            let current = current.clone();
            async move { current.get(None).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "gave up before the first session");
        let (first, _first_server) = session().await;
        current.publish(first.clone());
        let got = waiting.await.unwrap().expect("the first session");
        assert!(got.same_session(&first));

        current.clear();
        *current.lost_at.lock().unwrap() = Instant::now().checked_sub(HANDOVER * 2);
        let t = Instant::now();
        assert!(current.get(None).await.is_none());
        assert!(t.elapsed() < SESSION_WAIT / 2);
    }

    /// Fresh sessions that land on replicas without the agent, twice
    /// running, within the one-a-second limit on fresh sessions: the open
    /// waits its turn for a third one, and succeeds there.
    #[tokio::test]
    async fn an_open_outlasts_two_replicas_in_a_row_without_the_agent() {
        let current = CurrentSession::new();
        let mut servers = Vec::new();
        let mut clients = Vec::new();
        for has_agent in [false, false, true] {
            let ((client, _), (server, mut opens)) = mem::sessions().await.unwrap();
            tokio::spawn(async move {
                while let Some(open) = opens.recv().await {
                    if has_agent {
                        let _stream = open.accept();
                        std::future::pending::<()>().await;
                    } else {
                        open.reject(OpenErrorCode::NotHere, "no session to the agent here");
                    }
                }
            });
            servers.push(server);
            clients.push(client);
        }
        // The client's reconnect loop: the next session when one is asked.
        tokio::spawn({
            let current = current.clone();
            let clients = clients.clone();
            async move {
                for c in clients {
                    current.publish(c.clone());
                    current.renew_requested(&c).await;
                    current.clear();
                }
            }
        });
        let target = Target::tcp("prod/web");
        let opened = tokio::time::timeout(Duration::from_secs(10), current.open(target))
            .await
            .expect("the open finishes");
        assert!(opened.is_ok(), "{:?}", opened.err());
        assert!(clients[0].is_draining() && clients[1].is_draining());
        assert!(!clients[2].is_draining());
    }

    /// A `not_here` that arrives late from a session already replaced does
    /// not throw away its successor; one from the current session does.
    #[tokio::test]
    async fn only_the_current_session_is_renewed() {
        let current = CurrentSession::new();
        let (old, _old_server) = session().await;
        let (new, _new_server) = session().await;
        current.publish(old.clone());
        current.publish(new.clone());
        current.renew(&old).await;
        let asked =
            tokio::time::timeout(Duration::from_millis(200), current.renew_requested(&new)).await;
        assert!(asked.is_err(), "a stale refusal replaced the new session");
        assert!(!new.is_draining());
        current.renew(&new).await;
        tokio::time::timeout(Duration::from_secs(1), current.renew_requested(&new))
            .await
            .expect("the current session is replaced");
    }
}
