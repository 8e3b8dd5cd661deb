//! The keep-alive pool of tunnel streams to HTTP/1.1 web services: each
//! pooled tunnel stream is one HTTP/1.1 connection (hyper's client
//! connection over the stream), so a page with fifty assets does not open
//! fifty streams.
//!
//! A pooled stream serves whichever request comes next for its service, so
//! it belongs to no client: each request holds its own open guard (see
//! [`crate::open`]). Opening a new stream is still charged to the caller
//! whose request needed it (its pending-open slot, while the agent
//! answers).
//!
//! A connection goes back to the pool when its response's body is dropped
//! (read to the end, hyper ready for the next request: see
//! [`ServiceBody`]), and leaves it after [`POOL_IDLE_TIMEOUT`] unused
//! ([`expire_idle`], one task for the pool), when the service closes it,
//! or at once when its agent session drains or ends ([`watch_session`],
//! one task per session): an idle keep-alive must not hold up the drain of
//! an agent instance that is shutting down. Each connection has a task
//! that drives it and nothing else. A request that never left because its
//! pooled connection had just closed is sent once more on a new one, and so
//! is an idempotent request without a body that a connection closing after
//! [`REPLAY_AFTER_IDLE`] idle left unanswered ([`Replay`]). A connection
//! that carried a connection-bound login (NTLM, Negotiate) never goes back:
//! the service would take the next caller for the one who signed in on it
//! ([`names_connection_login`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Request, Response, Uri, Version};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tether_net::io::StreamIo;
use tether_net::Refusal;
use tether_proto::OpenErrorCode;

use super::{POOL_IDLE_PER_SERVICE, POOL_IDLE_TIMEOUT, POOL_IDLE_TOTAL};
use crate::open::Opener;
use crate::response::{empty, Body, BoxError};

/// The keep-alive pool of tunnel streams to HTTP/1.1 web services.
pub(crate) struct Pool {
    opener: Opener,
    idle: Arc<Mutex<Idle>>,
    /// Numbers connections, so a connection's driver finds its own entry.
    next_id: AtomicU64,
    /// The agent sessions a [`watch_session`] task follows, by
    /// [`tether_net::Connection::key`].
    watched: Arc<Mutex<HashSet<usize>>>,
    /// The [`expire_idle`] task was started (at the first connection).
    expiring: AtomicBool,
}

/// How long a pooled connection must have been idle for its request to be
/// copied, to be sent again if the connection closes unanswered
/// ([`Replay`]). A service closes an idle keep-alive connection when its
/// own timeout fires (a second or more: gunicorn 2 s, Node and uvicorn 5 s,
/// nginx 75 s); a connection in steady use is not closed that way, and its
/// requests skip the copy (~1 800 instructions, 3 % of a proxied request).
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(200);

/// A copy of a request that may be sent again when its connection closes
/// before any answer: idempotent (RFC 9110, 9.2.2) and without a body, so
/// the service cannot have acted on it in a way a second copy changes.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    /// The copy of `req`, if it may be sent again. Boxed: it is rare, and
    /// the request's future, which hyper moves per request, holds it.
    fn of(req: &Request<Body>) -> Option<Box<Replay>> {
        (req.method().is_idempotent() && req.body().is_end_stream()).then(|| {
            Box::new(Replay {
                method: req.method().clone(),
                uri: req.uri().clone(),
                version: req.version(),
                headers: req.headers().clone(),
            })
        })
    }

    /// The request again, with its empty body.
    fn request(self) -> Request<Body> {
        let mut req = Request::new(empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Whether a header value names NTLM or Negotiate (Kerberos): logins that
/// authenticate the TCP connection, not the request (IIS keeps them for the
/// connection's life). A connection that carried one (the request's
/// `Authorization`, or a 401's `WWW-Authenticate` challenge, the handshake
/// under way) must never serve another request from the pool, which
/// belongs to no caller; it closes after its response. (So these logins do
/// not work through the proxy; a `[[listener]]` or the CLI forward carries
/// them.) Any challenge in a list counts; a false match only costs a
/// connection.
fn names_connection_login(v: &http::HeaderValue) -> bool {
    v.as_bytes().split(|b| *b == b',').any(|part| {
        let part = part.trim_ascii_start();
        [&b"ntlm"[..], b"negotiate"].iter().any(|s| {
            part.len() >= s.len()
                && part[..s.len()].eq_ignore_ascii_case(s)
                && part.get(s.len()).is_none_or(|b| *b == b' ')
        })
    })
}

/// Whether a request ties a login to its connection (see
/// [`names_connection_login`]).
fn request_binds_login(h: &HeaderMap) -> bool {
    h.get_all(http::header::AUTHORIZATION)
        .iter()
        .any(names_connection_login)
}

/// Whether a response ties a login to its connection: a 401 challenging
/// for NTLM or Negotiate (one lookup, and only in a 401).
fn response_binds_login<B>(resp: &Response<B>) -> bool {
    resp.status() == http::StatusCode::UNAUTHORIZED
        && resp
            .headers()
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .any(names_connection_login)
}

/// Whether `e` says the connection ended before an answer began: it
/// closed (the service's FIN) or failed (its reset, which the agent passes
/// on) while the request was out.
fn closed_unanswered(e: &hyper::Error) -> bool {
    e.is_incomplete_message()
        || std::error::Error::source(e).is_some_and(|cause| cause.is::<std::io::Error>())
}

/// agent -> service -> its idle connections (the most recently used
/// last), looked up with borrowed names; and how many there are in all.
struct Idle<P = Pooled> {
    by_target: HashMap<String, HashMap<String, Vec<P>>>,
    total: usize,
    /// Most kept per service.
    per_service: usize,
    /// Most kept over all services.
    max_total: usize,
}

/// What the idle lists need to know of a connection.
trait Reusable {
    /// Its number (see [`Pool::next_id`]).
    fn id(&self) -> u64;
    /// When it went back to the pool.
    fn since(&self) -> Instant;
    /// Whether a new request may go on it.
    fn usable(&self) -> bool;
}

/// A connection to one service.
struct Pooled {
    id: u64,
    send: SendRequest<Body>,
    /// The agent session its tunnel stream runs on.
    session: tether_net::Connection,
    /// Its agent and service.
    target: Arc<Target>,
    /// When it went back to the pool.
    since: Instant,
}

/// An agent and one of its services.
struct Target {
    agent: String,
    service: String,
}

impl Reusable for Pooled {
    fn id(&self) -> u64 {
        self.id
    }
    fn since(&self) -> Instant {
        self.since
    }
    fn usable(&self) -> bool {
        self.send.is_ready() && !self.session.is_draining() && !self.session.is_closed()
    }
}

impl<P: Reusable> Idle<P> {
    /// Empty lists keeping at most `per_service` connections per service
    /// and `max_total` in all.
    fn new(per_service: usize, max_total: usize) -> Self {
        Idle {
            by_target: HashMap::new(),
            total: 0,
            per_service,
            max_total,
        }
    }

    /// A usable idle connection to `agent/service` and how long it was
    /// idle, dropping (and so closing) the unusable ones it passes.
    fn take(&mut self, agent: &str, service: &str) -> Option<(P, Duration)> {
        let list = self.by_target.get_mut(agent)?.get_mut(service)?;
        while let Some(p) = list.pop() {
            self.total -= 1;
            let idle_for = p.since().elapsed();
            if p.usable() && idle_for < POOL_IDLE_TIMEOUT {
                return Some((p, idle_for));
            }
        }
        None
    }

    /// Keeps `p` for the next request to `agent/service`, unless the
    /// service already has as many idle connections as it may keep (then
    /// `p` is dropped: closed). When the pool holds as many as all services
    /// may, the connection idle longest, whichever its service, makes room:
    /// a service that was busy a minute ago must not keep one in use now
    /// from being pooled.
    fn put(&mut self, agent: &str, service: &str, p: P) {
        if self.total >= self.max_total {
            let kept = self
                .by_target
                .get(agent)
                .and_then(|s| s.get(service))
                .map_or(0, Vec::len);
            if kept >= self.per_service || !self.drop_longest_idle() {
                return;
            }
        }
        let services = match self.by_target.get_mut(agent) {
            Some(s) => s,
            None => self.by_target.entry(agent.to_owned()).or_default(),
        };
        let list = match services.get_mut(service) {
            Some(l) => l,
            None => services.entry(service.to_owned()).or_default(),
        };
        if list.len() < self.per_service {
            list.push(p);
            self.total += 1;
        }
    }

    /// Drops (closes) the connection idle longest over all services:
    /// `false` when there is none. Each list's first is its oldest, so
    /// this visits one entry per service with idle connections (it runs
    /// only at the cap).
    fn drop_longest_idle(&mut self) -> bool {
        let oldest = self
            .by_target
            .iter()
            .flat_map(|(agent, services)| {
                services.iter().filter_map(move |(service, list)| {
                    Some((list.first()?.since(), agent, service))
                })
            })
            .min_by_key(|(since, ..)| *since)
            .map(|(_, agent, service)| (agent.clone(), service.clone()));
        let Some((agent, service)) = oldest else {
            return false;
        };
        if let Some(list) = self
            .by_target
            .get_mut(&agent)
            .and_then(|s| s.get_mut(&service))
        {
            list.remove(0);
            self.total -= 1;
        }
        self.forget_if_empty(&agent, &service);
        true
    }

    /// Removes the entries of `agent/service` once it has no idle
    /// connection left.
    fn forget_if_empty(&mut self, agent: &str, service: &str) {
        let Some(services) = self.by_target.get_mut(agent) else {
            return;
        };
        if services.get(service).is_some_and(Vec::is_empty) {
            services.remove(service);
            if services.is_empty() {
                self.by_target.remove(agent);
            }
        }
    }

    /// Drops connection `id` of `agent/service` if it is idle.
    fn evict(&mut self, agent: &str, service: &str, id: u64) {
        let Some(list) = self
            .by_target
            .get_mut(agent)
            .and_then(|s| s.get_mut(service))
        else {
            return;
        };
        let before = list.len();
        list.retain(|p| p.id() != id);
        self.total -= before - list.len();
        self.forget_if_empty(agent, service);
    }

    /// Keeps only the idle connections `keep` says yes to (the others are
    /// dropped: closed). Visits every idle connection: for the rare sweeps
    /// (a session draining, the periodic expiry), not per request.
    fn retain(&mut self, mut keep: impl FnMut(&P) -> bool) {
        let mut total = 0;
        self.by_target.retain(|_, services| {
            services.retain(|_, list| {
                list.retain(&mut keep);
                total += list.len();
                !list.is_empty()
            });
            !services.is_empty()
        });
        self.total = total;
    }
}

impl Pool {
    /// A pool whose streams `opener` opens.
    pub(crate) fn new(opener: Opener) -> Pool {
        Pool {
            opener,
            idle: Arc::new(Mutex::new(Idle::new(
                POOL_IDLE_PER_SERVICE,
                POOL_IDLE_TOTAL,
            ))),
            next_id: AtomicU64::new(0),
            watched: Arc::default(),
            expiring: AtomicBool::new(false),
        }
    }

    /// Sends `req` (its URI in origin form, its `Host` header set) to
    /// `agent/service`; a new stream it needs is charged to `caller` (a
    /// limits key). The error is a [`Refusal`] when the tunnel stream could
    /// not be opened, else hyper's. The connection goes back to the pool
    /// when the response's body is dropped.
    pub(crate) async fn request(
        &self,
        caller: Arc<str>,
        agent: &str,
        service: &str,
        mut req: Request<Body>,
    ) -> Result<Response<ServiceBody>, BoxError> {
        let mut pooled = lock(&self.idle).take(agent, service);
        // At most twice: on a pooled connection the service closed (it ended
        // its keep-alive) a request that never left, or an idempotent one
        // without a body that got no answer, goes once more on a new
        // connection, as nginx and browsers do. (One await of each kind: each
        // await takes its own room in the request's future, which hyper
        // moves per request.)
        loop {
            let reused = pooled.is_some();
            let replay = pooled
                .as_ref()
                .filter(|(_, idle_for)| *idle_for >= REPLAY_AFTER_IDLE)
                .and_then(|_| Replay::of(&req));
            let mut conn = match pooled.take() {
                Some((p, _)) => p,
                // Boxed: a new connection is the rare case, and its future
                // would otherwise size every request's.
                None => Box::pin(self.connect(caller.clone(), agent, service)).await?,
            };
            let bound = request_binds_login(req.headers());
            match conn.send.try_send_request(req).await {
                Ok(resp) => {
                    let give_back = (!bound && !response_binds_login(&resp))
                        .then(|| (conn, Arc::downgrade(&self.idle)));
                    return Ok(resp.map(|inner| ServiceBody {
                        inner,
                        give_back,
                        _in_flight: None,
                    }));
                }
                Err(mut e) => match (e.take_message(), replay) {
                    (Some(again), _) if reused => {
                        tracing::debug!(%agent, %service, "pooled connection closed before the request left ({}): once more on a new one", e.error());
                        req = again;
                    }
                    (None, Some(replay)) if closed_unanswered(e.error()) => {
                        tracing::debug!(%agent, %service, "pooled connection closed without an answer ({}): the idempotent request once more on a new one", e.error());
                        req = replay.request();
                    }
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// Opens a tunnel stream to `agent/service` and starts HTTP/1.1 on it.
    async fn connect(
        &self,
        caller: Arc<str>,
        agent: &str,
        service: &str,
    ) -> Result<Pooled, Refusal> {
        let (stream, session) = self.opener.dial_pooled(caller, agent, service).await?;
        let (send, conn) = Builder::new()
            .handshake(TokioIo::new(StreamIo::new(stream)))
            .await
            .map_err(|e| {
                Refusal::new(
                    OpenErrorCode::Internal,
                    format!("agent {agent}: HTTP/1.1 to {service}: {}", with_causes(&e)),
                )
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let target = Arc::new(Target {
            agent: agent.to_owned(),
            service: service.to_owned(),
        });
        if !self.expiring.swap(true, Ordering::Relaxed) {
            tokio::spawn(expire_idle(Arc::downgrade(&self.idle)));
        }
        if lock(&self.watched).insert(session.key()) {
            tokio::spawn(watch_session(
                session.clone(),
                Arc::downgrade(&self.idle),
                Arc::downgrade(&self.watched),
            ));
        }
        let idle = Arc::downgrade(&self.idle);
        let driven = target.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(agent = %driven.agent, service = %driven.service, "pooled connection to the service ended: {e}");
            }
            if let Some(idle) = idle.upgrade() {
                lock(&idle).evict(&driven.agent, &driven.service, id);
            }
        });
        Ok(Pooled {
            id,
            send,
            session,
            target,
            since: Instant::now(),
        })
    }
}

/// Locks `m`, whether or not a holder panicked (the pool's lists stay
/// consistent at every step).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A response body from a pooled connection. Dropping it (the response
/// was sent, or its client left) gives the connection back: hyper has
/// usually read the response to its end by then and the connection takes
/// the next request, so no task waits for that per request. A connection
/// that is not ready yet (hyper's connection task has not seen the end,
/// or the body was left unread) gets a task that waits for it; one that
/// closed, or whose session drains, is dropped.
pub(crate) struct ServiceBody {
    inner: Incoming,
    give_back: Option<(Pooled, Weak<Mutex<Idle>>)>,
    /// The request's place in its HTTP/2 connection's count, held until
    /// its response is done.
    _in_flight: Option<InFlight>,
}

impl ServiceBody {
    /// A body on an HTTP/2 connection (not the pool's), counted there
    /// until it ends.
    pub(crate) fn counted(inner: Incoming, in_flight: InFlight) -> Self {
        ServiceBody {
            inner,
            give_back: None,
            _in_flight: Some(in_flight),
        }
    }
}

/// One request counted among those in flight on a connection, from when
/// it takes the connection until its response body is done or dropped.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more request on `count`.
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl http_body::Body for ServiceBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ServiceBody {
    fn drop(&mut self) {
        let Some((mut conn, idle)) = self.give_back.take() else {
            return;
        };
        if conn.send.is_ready() {
            give_back(&idle, conn);
            return;
        }
        // Not ready yet (its body dropped before hyper's connection task
        // saw the end, or left unread): a task waits for it. Outside a
        // runtime (being torn down) the connection just closes.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if conn.send.ready().await.is_ok() {
                    give_back(&idle, conn);
                }
            });
        }
    }
}

/// Returns `conn` to the pool if it may take another request.
fn give_back(idle: &Weak<Mutex<Idle>>, mut conn: Pooled) {
    let Some(idle) = idle.upgrade() else {
        return;
    };
    // Judged under the lock: a session's watcher sweeps its connections out
    // under it once the session drains, and a drain does not end, so a
    // connection checked here after that sweep is seen to be unusable.
    let mut idle = lock(&idle);
    if conn.usable() {
        conn.since = Instant::now();
        let target = conn.target.clone();
        idle.put(&target.agent, &target.service, conn);
    }
}

/// Follows one agent session that has pooled connections and closes them
/// all at once when it drains or ends: an idle keep-alive must not hold up
/// the drain of an agent instance that is shutting down. One task per
/// session, not per connection: a connection's own driver then polls
/// nothing but the connection each time it wakes.
async fn watch_session(
    session: tether_net::Connection,
    idle: Weak<Mutex<Idle>>,
    watched: Weak<Mutex<HashSet<usize>>>,
) {
    session.drain_begun().await;
    if let Some(idle) = idle.upgrade() {
        lock(&idle).retain(|p| !p.session.same_session(&session));
    }
    if let Some(watched) = watched.upgrade() {
        lock(&watched).remove(&session.key());
    }
}

/// Closes, every quarter of [`POOL_IDLE_TIMEOUT`], the connections idle
/// longer than that; ends with the pool. One task for the whole pool.
async fn expire_idle(idle: Weak<Mutex<Idle>>) {
    let mut sweep = tokio::time::interval(POOL_IDLE_TIMEOUT / 4);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        sweep.tick().await;
        let Some(idle) = idle.upgrade() else { return };
        lock(&idle).retain(|p| p.since.elapsed() < POOL_IDLE_TIMEOUT);
    }
}

/// The refusal behind a failed pool request, if it was the open of a
/// tunnel stream.
pub(crate) fn refusal_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// `e` and what caused it, as one line ("a: b: c"), each cause once (a
/// wrapper often repeats its source's text).
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cur = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_bound_logins_are_recognised() {
        let with = |value: &str| names_connection_login(&value.parse().unwrap());
        assert!(with(
            "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAO5CAAAADw=="
        ));
        assert!(with("negotiate YIIFyw"));
        assert!(with("Negotiate"));
        assert!(with("NTLM"));
        assert!(!with("Basic YWxhZGRpbjpvcGVuc2VzYW1l"));
        assert!(!with("Bearer x"));
        assert!(!with("NTLMish realm=x"));
        assert!(!with("Basic realm=\"x\""));
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, "NTLM x".parse().unwrap());
        assert!(request_binds_login(&h));
        let challenge = |status: u16| {
            let mut r = Response::new(());
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
            r.headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, "Negotiate".parse().unwrap());
            response_binds_login(&r)
        };
        assert!(challenge(401));
        assert!(!challenge(200), "a challenge outside a 401 is no handshake");
        assert!(with("Basic realm=\"x\", Negotiate"));
    }

    struct Conn {
        id: u64,
        since: Instant,
        usable: bool,
    }

    impl Reusable for Conn {
        fn id(&self) -> u64 {
            self.id
        }
        fn since(&self) -> Instant {
            self.since
        }
        fn usable(&self) -> bool {
            self.usable
        }
    }

    fn conn(id: u64) -> Conn {
        Conn {
            id,
            since: Instant::now(),
            usable: true,
        }
    }

    /// Connection `id`, back in the pool `ms` milliseconds after `t0`.
    fn conn_at(id: u64, t0: Instant, ms: u64) -> Conn {
        Conn {
            since: t0 + Duration::from_millis(ms),
            ..conn(id)
        }
    }

    #[test]
    fn idle_connections_are_capped_per_service_and_in_all() {
        let t0 = Instant::now();
        let mut idle = Idle::new(3, 5);
        for id in 0..4 {
            idle.put("a", "web", conn_at(id, t0, id));
        }
        assert_eq!(idle.total, 3, "the fourth for a/web is closed");
        for id in 10..12 {
            idle.put("b", "web", conn_at(id, t0, id));
        }
        assert_eq!(idle.total, 5);
        // The pool is full: the newcomer takes the place of the connection
        // idle longest (a/web's first), whichever service it belongs to.
        idle.put("c", "api", conn_at(20, t0, 20));
        assert_eq!(idle.total, 5, "still at the cap");
        let a: Vec<u64> = idle.by_target["a"]["web"].iter().map(|c| c.id).collect();
        assert_eq!(a, [1, 2], "a/web's oldest made room");
        assert_eq!(idle.take("c", "api").map(|(c, _)| c.id), Some(20));
        // Most recently used first.
        assert_eq!(idle.take("a", "web").map(|(c, _)| c.id), Some(2));
        assert_eq!(idle.total, 3);
        // A list emptied by making room goes too.
        let mut idle = Idle::new(3, 1);
        idle.put("a", "web", conn_at(1, t0, 1));
        idle.put("b", "web", conn_at(2, t0, 2));
        assert!(!idle.by_target.contains_key("a"));
        assert_eq!(idle.total, 1);
    }

    #[test]
    fn an_expired_connection_is_evicted_and_never_taken() {
        let Some(long_ago) = Instant::now().checked_sub(POOL_IDLE_TIMEOUT * 2) else {
            return; // a clock this close to its start cannot express it
        };
        let mut idle = Idle::new(8, 8);
        let old = Conn {
            since: long_ago,
            ..conn(1)
        };
        idle.put("a", "web", old);
        idle.put("a", "web", conn(2));
        idle.retain(|p| p.since().elapsed() < POOL_IDLE_TIMEOUT);
        assert_eq!(idle.total, 1);
        idle.put(
            "a",
            "web",
            Conn {
                since: long_ago,
                ..conn(3)
            },
        );
        assert_eq!(
            idle.take("a", "web").map(|(c, _)| c.id),
            Some(2),
            "the expired one on top is dropped, the fresh one under it taken"
        );
        assert_eq!(idle.total, 0);
    }

    #[test]
    fn the_count_follows_evictions_and_unusable_connections() {
        let mut idle = Idle::new(8, 8);
        for id in 0..4 {
            idle.put("a", "web", conn(id));
        }
        idle.evict("a", "web", 1);
        idle.evict("a", "web", 9); // not there
        assert_eq!(idle.total, 3);
        let mut dead = conn(5);
        dead.usable = false;
        idle.put("a", "web", dead);
        assert_eq!(
            idle.take("a", "web").map(|(c, _)| c.id),
            Some(3),
            "the unusable one is dropped on the way"
        );
        assert_eq!(idle.total, 2);
        idle.evict("a", "web", 0);
        idle.evict("a", "web", 2);
        assert_eq!(idle.total, 0);
        assert!(idle.by_target.is_empty(), "empty lists are removed");
    }

    #[test]
    fn only_idempotent_requests_without_a_body_are_replayed() {
        use http_body_util::{BodyExt, Full};
        let request = |method: Method, body: &'static str| {
            let body = Full::new(bytes::Bytes::from_static(body.as_bytes()))
                .map_err(BoxError::from)
                .boxed_unsync();
            let mut req = Request::new(body);
            *req.method_mut() = method;
            *req.uri_mut() = Uri::from_static("/x?y=1");
            req.headers_mut()
                .insert(http::header::HOST, http::HeaderValue::from_static("app"));
            req
        };
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            let again = Replay::of(&request(m.clone(), ""))
                .unwrap_or_else(|| panic!("{m} is replayed"))
                .request();
            assert_eq!(again.method(), m);
            assert_eq!(again.uri(), "/x?y=1");
            assert_eq!(again.headers()[http::header::HOST], "app");
            assert!(again.body().is_end_stream());
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(Replay::of(&request(m.clone(), "")).is_none(), "{m}");
        }
        assert!(Replay::of(&request(Method::PUT, "data")).is_none());
    }
}
