//! HTTP/2 to the web services that speak only HTTP/2 (catalog kind
//! `http2`: gRPC servers, say). One tunnel stream per service carries all
//! of this replica's requests to it, as HTTP/2 streams, where the HTTP/1.1
//! pool ([`super::pool`]) needs a tunnel stream per request in flight.
//!
//! The connection is opened by the first request that needs it (charged to
//! that request's caller while the agent answers, like the pool's opens)
//! and shared by every request after it. It is let go after
//! [`POOL_IDLE_TIMEOUT`] without a new request, when its agent session
//! drains or ends, or when it fails; requests still in flight on it finish
//! first (hyper closes the connection once the last of them is done). A
//! failed open answers every request that was waiting for it; the next
//! request tries again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tether_net::io::StreamIo;
use tether_net::Refusal;

use super::pool::TunnelConn;
use super::POOL_IDLE_TIMEOUT;
use crate::open::Opener;
use crate::response::{Body, BoxError};

/// What a service may send on one request before the browser reads it
/// (HTTP/2 stream window): what the server buffers for a slow reader.
const STREAM_WINDOW: u32 = 1 << 20;

/// What a service may send on all requests together before browsers read
/// (HTTP/2 connection window): the server's buffer per service.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// The HTTP/2 connections to services, one per `agent/service`.
pub(crate) struct H2Pool {
    opener: Opener,
    /// agent -> service -> its slot, looked up with borrowed names.
    slots: Mutex<HashMap<String, HashMap<String, Arc<Slot>>>>,
}

/// One service's connection, or what happened to the last attempt. The
/// async lock is held while a connection is opened, so requests that
/// arrive meanwhile wait for it instead of opening their own.
#[derive(Default)]
struct Slot(tokio::sync::Mutex<SlotState>);

#[derive(Default)]
struct SlotState {
    live: Option<Live>,
    /// When the last request took the connection.
    last_used: Option<Instant>,
    /// The last failed open, and when it ended.
    failed: Option<(Instant, Refusal)>,
    /// Counts connections, so an idle timer knows whether its connection
    /// is still the slot's.
    generation: u64,
}

/// An open HTTP/2 connection over a tunnel stream.
struct Live {
    send: SendRequest<Body>,
    /// The agent session its tunnel stream runs on.
    session: tether_net::Connection,
    generation: u64,
}

impl Live {
    /// Whether new requests may go on it.
    fn usable(&self) -> bool {
        !self.send.is_closed() && !self.session.is_draining() && !self.session.is_closed()
    }
}

impl H2Pool {
    /// Connections whose tunnel streams `opener` opens.
    pub(crate) fn new(opener: Opener) -> H2Pool {
        H2Pool {
            opener,
            slots: Mutex::default(),
        }
    }

    /// Sends `req` (its URI absolute: the authority becomes `:authority`)
    /// to `agent/service`; a connection it has to open is charged to
    /// `caller` (a limits key). The error is a [`Refusal`] when the tunnel
    /// stream could not be opened, else hyper's.
    pub(crate) async fn request(
        &self,
        caller: Arc<str>,
        agent: &str,
        service: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        let mut send = self.sender(caller, agent, service).await?;
        Ok(send.send_request(req).await?)
    }

    /// The slot of `agent/service`, made on first use. (Only services an
    /// agent announced as HTTP/2 get here, so the map is bounded by the
    /// catalogs.)
    fn slot(&self, agent: &str, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(agent).and_then(|m| m.get(service)) {
            return s.clone();
        }
        slots
            .entry(agent.to_owned())
            .or_default()
            .entry(service.to_owned())
            .or_default()
            .clone()
    }

    /// A sender on the service's connection, opening one when there is no
    /// usable one.
    async fn sender(
        &self,
        caller: Arc<str>,
        agent: &str,
        service: &str,
    ) -> Result<SendRequest<Body>, Refusal> {
        let slot = self.slot(agent, service);
        let arrived = Instant::now();
        let mut state = slot.0.lock().await;
        state.last_used = Some(Instant::now());
        if let Some(live) = state.live.as_ref().filter(|l| l.usable()) {
            return Ok(live.send.clone());
        }
        state.live = None;
        if let Some((at, why)) = &state.failed {
            // This request waited for that attempt: it is the answer.
            if *at >= arrived {
                return Err(why.clone());
            }
        }
        match self.connect(caller, agent, service).await {
            Ok((send, session)) => {
                state.generation += 1;
                state.failed = None;
                let send_out = send.clone();
                state.live = Some(Live {
                    send,
                    session,
                    generation: state.generation,
                });
                tokio::spawn(let_go_when_idle(Arc::downgrade(&slot), state.generation));
                Ok(send_out)
            }
            Err(why) => {
                state.failed = Some((Instant::now(), why.clone()));
                Err(why)
            }
        }
    }

    /// Opens a tunnel stream to `agent/service` and starts HTTP/2 on it.
    async fn connect(
        &self,
        caller: Arc<str>,
        agent: &str,
        service: &str,
    ) -> Result<(SendRequest<Body>, tether_net::Connection), Refusal> {
        let (stream, session) = self.opener.dial_pooled(caller, agent, service).await?;
        let io = TunnelConn::new(TokioIo::new(StreamIo::new(stream)), session.clone());
        let (send, conn) = Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(io)
            .await
            .map_err(|e| {
                Refusal::new(
                    tether_proto::OpenErrorCode::Unreachable,
                    format!("agent {agent}: HTTP/2 to {service}: {e}"),
                )
            })?;
        let target = format!("{agent}/{service}");
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%target, "HTTP/2 connection to the service ended: {e}");
            }
        });
        Ok((send, session))
    }
}

/// Lets the slot's connection `generation` go once no request has taken it
/// for [`POOL_IDLE_TIMEOUT`] (its requests in flight still finish), or once
/// it is no longer usable.
async fn let_go_when_idle(slot: Weak<Slot>, generation: u64) {
    let mut wake = Instant::now() + POOL_IDLE_TIMEOUT;
    loop {
        tokio::time::sleep_until(wake.into()).await;
        let Some(slot) = slot.upgrade() else { return };
        let mut state = slot.0.lock().await;
        let Some(live) = state.live.as_ref().filter(|l| l.generation == generation) else {
            return;
        };
        let idle_until = state.last_used.unwrap_or(wake) + POOL_IDLE_TIMEOUT;
        if !live.usable() || idle_until <= Instant::now() {
            state.live = None;
            return;
        }
        wake = idle_until;
    }
}
