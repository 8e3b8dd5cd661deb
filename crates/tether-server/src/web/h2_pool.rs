//! HTTP/2 to the web services that speak only HTTP/2 (catalog kind
//! `http2`: gRPC servers, say). One tunnel stream per service and caller
//! carries that caller's requests to it, as HTTP/2 streams, where the
//! HTTP/1.1 pool ([`super::pool`]) needs a tunnel stream per request in
//! flight.
//!
//! Connections are per caller (the limits key of the request's identity),
//! not shared by everyone: HTTP/2's connection window is shared by the
//! requests on it, so responses one caller leaves unread would otherwise
//! stall every other caller's responses from that service; and the open
//! is charged to the caller, whose own limits may refuse it.
//!
//! The connection is opened by the first request that needs it and shared
//! by the caller's requests after it. It is let go after
//! [`POOL_IDLE_TIMEOUT`] without a new request, as soon as its agent
//! session drains or ends (so the agent's drain is not held up), or when it
//! fails; requests still in flight on it finish first (hyper closes the
//! connection once the last of them is done). A failed open answers every
//! request that was waiting for it; the next request tries again. A
//! request that never left because its connection was closing (the
//! service's GOAWAY, say) is sent once more on a new connection.
//!
//! A connection carrying [`MAX_STREAMS_PER_CONNECTION`] requests, or the
//! service's own limit (`SETTINGS_MAX_CONCURRENT_STREAMS`) if that is
//! lower, is full: when every connection of the slot is, the next request
//! opens another (if that open fails, it queues on the least loaded one).
//! Past the service's limit hyper queues requests on a connection, without
//! bound or a word, until one ends: a caller holding ten long streaming
//! calls to a service that allows ten would have its next, quick, call
//! hang. Requests go to the newest connection with room, so the older ones
//! keep theirs and none is opened and dropped per hundred requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tether_net::io::StreamIo;
use tether_net::Refusal;

use super::pool::{with_causes, InFlight, ServiceBody};
use super::POOL_IDLE_TIMEOUT;
use crate::open::Opener;
use crate::policy::target_name;
use crate::response::{Body, BoxError};

/// What a service may send on one request before the browser reads it
/// (HTTP/2 stream window): what the server buffers for a slow reader.
const STREAM_WINDOW: u32 = 1 << 20;

/// What a service may send on all of a caller's requests together before
/// they are read (HTTP/2 connection window): the server's buffer per
/// service and caller.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// How often a connection with requests in flight is pinged, and how long
/// the answer may take: a link between agent and service that died
/// without a word fails its requests instead of hanging them.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// The most requests one connection carries before the next opens another:
/// at or under what services allow at once (Kestrel 100, nginx 128, Go's
/// server 250, grpc-go and hyper more); a service that allows fewer says
/// so in its SETTINGS, and that is the connection's limit then.
const MAX_STREAMS_PER_CONNECTION: usize = 100;

/// The HTTP/2 connections to services, one per `agent/service` and caller.
pub(crate) struct H2Pool {
    opener: Opener,
    slots: Arc<Mutex<Slots>>,
}

/// agent -> service -> caller -> its slot, looked up with borrowed names.
#[derive(Default)]
struct Slots(HashMap<String, HashMap<String, CallerSlots>>);

/// One service's slots, by caller.
type CallerSlots = HashMap<Arc<str>, Arc<Slot>>;

/// One caller's connections to one service, or what happened to the last
/// attempt. The async lock is held while a connection is opened (the
/// agent's answer, at most the open timeout, and the HTTP/2 handshake),
/// so the caller's requests that arrive meanwhile wait for it instead of
/// opening their own.
struct Slot {
    agent: String,
    service: String,
    caller: Arc<str>,
    state: tokio::sync::Mutex<SlotState>,
}

/// The mutable part of a [`Slot`].
#[derive(Default)]
struct SlotState {
    /// The usable connections, oldest first.
    conns: Vec<Live>,
    /// The last failed open, and when it ended.
    failed: Option<(Instant, Refusal)>,
    /// Counts connections, so an idle timer or a retry knows whether the
    /// connection it means is still the slot's.
    generation: u64,
}

/// An open HTTP/2 connection over a tunnel stream.
struct Live {
    send: SendRequest<Body>,
    /// The agent session its tunnel stream runs on.
    session: tether_net::Connection,
    generation: u64,
    /// Requests on it whose responses are not done.
    in_flight: Arc<AtomicUsize>,
    /// The most requests it carries: [`MAX_STREAMS_PER_CONNECTION`], or the
    /// service's SETTINGS_MAX_CONCURRENT_STREAMS if lower (kept by the task
    /// that drives the connection).
    max_streams: Arc<AtomicUsize>,
    /// When a request last took it.
    last_used: Instant,
}

impl Live {
    /// Whether new requests may go on it.
    fn usable(&self) -> bool {
        !self.send.is_closed() && !self.session.is_draining() && !self.session.is_closed()
    }

    /// Whether it carries fewer requests than its limit.
    fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) < self.max_streams.load(Ordering::Relaxed)
    }

    /// Takes it for one request: a sender, its generation, the request's
    /// place in its count.
    fn take(&mut self) -> (SendRequest<Body>, u64, InFlight) {
        self.last_used = Instant::now();
        (
            self.send.clone(),
            self.generation,
            InFlight::new(&self.in_flight),
        )
    }
}

impl Slots {
    /// Removes `slot` if nobody but the map and the one caller of this
    /// holds it (no request is using or waiting for it).
    fn forget(&mut self, slot: &Arc<Slot>) {
        if Arc::strong_count(slot) > 2 {
            return;
        }
        let Some(services) = self.0.get_mut(&slot.agent) else {
            return;
        };
        let Some(callers) = services.get_mut(&slot.service) else {
            return;
        };
        if callers
            .get(&slot.caller)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            callers.remove(&slot.caller);
        }
        if callers.is_empty() {
            services.remove(&slot.service);
        }
        if services.is_empty() {
            self.0.remove(&slot.agent);
        }
    }
}

/// A request's hold on its slot: when the request ends, however it ends
/// (answered, failed, or dropped while its connection was being opened),
/// a slot left with no connection and no other request is removed. The
/// connection's idle timer removes the others, but a slot whose open was
/// cancelled, or whose timer fired while a request held it, has none: it
/// stayed in the map for good, one per caller and service.
struct Release<'a> {
    slots: &'a Mutex<Slots>,
    slot: &'a Arc<Slot>,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        // Locked: another request is using it; it releases it in turn.
        let Ok(state) = self.slot.state.try_lock() else {
            return;
        };
        if state.conns.is_empty() {
            drop(state);
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget(self.slot);
        }
    }
}

impl H2Pool {
    /// Connections whose tunnel streams `opener` opens.
    pub(crate) fn new(opener: Opener) -> H2Pool {
        H2Pool {
            opener,
            slots: Arc::default(),
        }
    }

    /// Sends `req` (its URI absolute: the authority becomes `:authority`)
    /// to `agent/service` on `caller`'s connection (`caller`: a limits key,
    /// charged for the open of one). The error is a [`Refusal`] when the
    /// tunnel stream could not be opened, else hyper's.
    pub(crate) async fn request(
        &self,
        caller: Arc<str>,
        agent: &str,
        service: &str,
        req: Request<Body>,
    ) -> Result<Response<ServiceBody>, BoxError> {
        let slot = self.slot(caller, agent, service);
        let _release = Release {
            slots: &self.slots,
            slot: &slot,
        };
        let (mut send, generation, counted) = self.sender(&slot).await?;
        let req = match send.try_send_request(req).await {
            Ok(resp) => return Ok(resp.map(|b| ServiceBody::counted(b, counted))),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    tracing::debug!(%agent, %service, "HTTP/2 request not sent ({}): once more on a new connection", e.error());
                    discard(&slot, generation).await;
                    req
                }
                None => return Err(e.into_error().into()),
            },
        };
        let (mut send, _, counted) = self.sender(&slot).await?;
        let resp = send.send_request(req).await?;
        Ok(resp.map(|b| ServiceBody::counted(b, counted)))
    }

    /// The slot of `caller` for `agent/service`, made on first use.
    fn slot(&self, caller: Arc<str>, agent: &str, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots
            .0
            .get(agent)
            .and_then(|m| m.get(service))
            .and_then(|m| m.get(&caller))
        {
            return s.clone();
        }
        slots
            .0
            .entry(agent.to_owned())
            .or_default()
            .entry(service.to_owned())
            .or_default()
            .entry(caller.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    agent: agent.to_owned(),
                    service: service.to_owned(),
                    caller,
                    state: tokio::sync::Mutex::default(),
                })
            })
            .clone()
    }

    /// A sender on one of the slot's connections, the connection's
    /// generation and the request's place in its count: the newest
    /// connection with room, else a new one, else (that open failed) the
    /// least loaded full one.
    async fn sender(
        &self,
        slot: &Arc<Slot>,
    ) -> Result<(SendRequest<Body>, u64, InFlight), Refusal> {
        let arrived = Instant::now();
        let mut state = slot.state.lock().await;
        state.conns.retain(Live::usable);
        if let Some(live) = state.conns.iter_mut().rev().find(|l| l.has_room()) {
            return Ok(live.take());
        }
        // Full (hyper would queue on them), or none: queued on the least
        // loaded only when no new one can be had.
        let least_loaded = |conns: &mut Vec<Live>| {
            conns
                .iter_mut()
                .min_by_key(|l| l.in_flight.load(Ordering::Relaxed))
                .map(Live::take)
        };
        if let Some((at, why)) = &state.failed {
            // This request waited for that attempt: it is the answer.
            if *at >= arrived {
                let why = why.clone();
                if let Some(taken) = least_loaded(&mut state.conns) {
                    return Ok(taken);
                }
                drop(state);
                self.forget(slot);
                return Err(why);
            }
        }
        match self.connect(slot).await {
            Ok((send, session, max_streams)) => {
                state.generation += 1;
                state.failed = None;
                let generation = state.generation;
                let mut live = Live {
                    send,
                    session: session.clone(),
                    generation,
                    in_flight: Arc::default(),
                    max_streams,
                    last_used: Instant::now(),
                };
                let taken = live.take();
                state.conns.push(live);
                tokio::spawn(let_go_when_idle(
                    Arc::downgrade(&self.slots),
                    Arc::downgrade(slot),
                    generation,
                    session,
                ));
                Ok(taken)
            }
            Err(why) => {
                state.failed = Some((Instant::now(), why.clone()));
                if let Some(taken) = least_loaded(&mut state.conns) {
                    tracing::debug!(agent = %slot.agent, service = %slot.service, "HTTP/2: every connection full and no new one ({}): queued on the least loaded", why.reason);
                    return Ok(taken);
                }
                drop(state);
                self.forget(slot);
                Err(why)
            }
        }
    }

    /// Removes `slot` from the map unless a request still holds it.
    fn forget(&self, slot: &Arc<Slot>) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(slot);
    }

    /// Opens a tunnel stream to the slot's service and starts HTTP/2 on it.
    async fn connect(
        &self,
        slot: &Slot,
    ) -> Result<(SendRequest<Body>, tether_net::Connection, Arc<AtomicUsize>), Refusal> {
        let (agent, service) = (&slot.agent, &slot.service);
        let (stream, session) = self
            .opener
            .dial_pooled(slot.caller.clone(), agent, service)
            .await?;
        let io = TokioIo::new(StreamIo::new(stream));
        let (send, conn) = Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .handshake(io)
            .await
            .map_err(|e| {
                Refusal::new(
                    tether_proto::OpenErrorCode::Unreachable,
                    format!("agent {agent}: HTTP/2 to {service}: {}", with_causes(&e)),
                )
            })?;
        let target = target_name(agent, service);
        let max_streams = Arc::new(AtomicUsize::new(MAX_STREAMS_PER_CONNECTION));
        let limit = max_streams.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            // The service's limit, as its SETTINGS (first or later) give it.
            let ended = std::future::poll_fn(|cx| {
                let r = std::future::Future::poll(conn.as_mut(), cx);
                let allowed = conn.current_max_send_streams();
                limit.store(allowed.min(MAX_STREAMS_PER_CONNECTION), Ordering::Relaxed);
                r
            })
            .await;
            if let Err(e) = ended {
                tracing::debug!(%target, "HTTP/2 connection to the service ended: {e}");
            }
        });
        Ok((send, session, max_streams))
    }
}

/// Lets go of the slot's connection `generation` (a request found it
/// closing), so the next request opens a new one.
async fn discard(slot: &Slot, generation: u64) {
    let mut state = slot.state.lock().await;
    state.conns.retain(|l| l.generation != generation);
}

/// Lets the slot's connection `generation` go once no request has taken it
/// for [`POOL_IDLE_TIMEOUT`], once its agent session drains or ends, or once
/// it is no longer usable (its requests in flight still finish); then
/// removes the slot unless a request holds it.
async fn let_go_when_idle(
    slots: Weak<Mutex<Slots>>,
    slot: Weak<Slot>,
    generation: u64,
    session: tether_net::Connection,
) {
    let mut wake = Instant::now() + POOL_IDLE_TIMEOUT;
    loop {
        let draining = tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => false,
            () = session.drain_begun() => true,
        };
        let Some(slot) = slot.upgrade() else { return };
        let mut state = slot.state.lock().await;
        let Some(at) = state.conns.iter().position(|l| l.generation == generation) else {
            return;
        };
        let live = &state.conns[at];
        let idle_until = live.last_used + POOL_IDLE_TIMEOUT;
        if draining || !live.usable() || idle_until <= Instant::now() {
            state.conns.remove(at);
            let empty = state.conns.is_empty();
            drop(state);
            if let (true, Some(slots)) = (empty, slots.upgrade()) {
                slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .forget(&slot);
            }
            return;
        }
        wake = idle_until;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_in(slots: &Mutex<Slots>, caller: &str) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            agent: "prod".into(),
            service: "grpc".into(),
            caller: caller.into(),
            state: tokio::sync::Mutex::default(),
        });
        slots
            .lock()
            .unwrap()
            .0
            .entry("prod".into())
            .or_default()
            .entry("grpc".into())
            .or_default()
            .insert(caller.into(), slot.clone());
        slot
    }

    /// A request that ends while its slot has no connection (its open was
    /// cancelled, or the connection was let go while it ran) takes the slot
    /// out of the map; one still used by another request stays.
    #[test]
    fn a_slot_without_a_connection_goes_with_its_last_request() {
        let slots = Mutex::new(Slots::default());
        let alone = slot_in(&slots, "alice");
        drop(Release {
            slots: &slots,
            slot: &alone,
        });
        assert!(slots.lock().unwrap().0.is_empty(), "the slot stayed");

        let shared = slot_in(&slots, "bob");
        let other_request = shared.clone();
        drop(Release {
            slots: &slots,
            slot: &shared,
        });
        assert_eq!(slots.lock().unwrap().0.len(), 1, "a slot in use went");
        drop(other_request);
    }
}
