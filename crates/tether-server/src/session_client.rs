//! CLI client sessions (`/tether/v1/client`): authentication, the upgrade,
//! the session's life (closed when its JWT expires), and each stream it
//! opens, relayed to its agent through the one open path.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use tether_net::{Incoming as IncomingStream, Refusal, Stream};
use tether_proto::{ErrorCode, MAX_EARLY_DATA};

use crate::auth::AuthStore;
use crate::identity::ClientIdentity;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::open::{Caller, OpenGuard, Opener};
use crate::relay::run_relay;
use crate::response::Resp;
use crate::sessions::{SessionOwner, Sessions};
use crate::upgrade::{
    accept_session, authenticate_client, authenticated_hold, limit_refusal, tether_upgrade,
};

/// How far above `max_streams_per_client` a client session's protocol-level
/// stream cap sits (see `ClientEndpoint::serve`).
const SESSION_CAP_MARGIN: usize = 64;

/// The client endpoint and the handles its sessions use.
pub(crate) struct ClientEndpoint {
    auth: Arc<AuthStore>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    sessions: Arc<Sessions>,
    opener: Opener,
    /// Protocol settings of accepted sessions.
    session_config: tether_proto::Config,
}

impl ClientEndpoint {
    /// The endpoint over these handles.
    pub(crate) fn new(
        auth: Arc<AuthStore>,
        metrics: Arc<Metrics>,
        limits: Arc<Limits>,
        sessions: Arc<Sessions>,
        opener: Opener,
        session_config: tether_proto::Config,
    ) -> ClientEndpoint {
        ClientEndpoint {
            auth,
            metrics,
            limits,
            sessions,
            opener,
            session_config,
        }
    }

    /// Authenticates a client's upgrade request and, when it passes, runs
    /// its session in a task; returns the answer to the request.
    pub(crate) fn upgrade(self: &Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let checked_at = self.auth.generation();
        let client = match authenticate_client(&self.auth, &self.metrics, &req, peer, false) {
            Ok(c) => c,
            Err(r) => return *r,
        };
        let resp = tether_upgrade(&req);
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return resp;
        }
        let slot = match self.limits.session(Some(client.key())) {
            Ok(s) => s,
            Err(hit) => return limit_refusal(&self.metrics, peer, hit),
        };
        let hold = authenticated_hold(&req);
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _hold = hold;
            this.run(req, peer, client, checked_at).await
        });
        resp
    }

    /// One client session, from the handshake to its end.
    async fn run(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        client: ClientIdentity,
        checked_at: u64,
    ) {
        let label = format!("client={}", client.name);
        let mut cfg = self.session_config.clone();
        // One client must not be able to take all of an agent's streams:
        // the open path refuses past `max_streams_per_client` (over all the
        // identity's sessions, naming the setting); the session's own cap
        // is a backstop just above it, so that refusal is the one a user
        // sees.
        cfg.max_peer_streams = self.limits.max_streams() + SESSION_CAP_MARGIN;
        let Some((conn, info, mut incoming)) =
            accept_session(&self.metrics, req, cfg, label, peer).await
        else {
            return;
        };
        let key = self.sessions.track(
            conn.clone(),
            SessionOwner::Client(client.clone()),
            peer,
            &info.peer_software,
            &self.auth,
            checked_at,
        );
        let live = self.metrics.session_live("client");
        tracing::info!(client = %client.name, %peer, "client connected");
        // A JWT identity's session ends when its token does (one accepted
        // within the clock-skew leeway, at the leeway's end: closed at once,
        // its client would only reconnect to be closed again).
        let leeway = self.auth.get().jwt_leeway();
        if let Some(at) = client.expires_at_within(tokio::time::Instant::now(), leeway) {
            let c = conn.clone();
            let who = client.name.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {
                        tracing::info!(client = %who, "credential expired: closing the session");
                        c.close(ErrorCode::Unauthorized, "credential expired");
                    }
                    _ = c.closed() => {}
                }
            });
        }
        let caller = Arc::new(Caller::Client(client.clone()));
        while let Some(inc) = incoming.recv().await {
            tokio::spawn(self.clone().relay_stream(caller.clone(), inc));
        }
        let why = conn.closed().await;
        drop(live);
        self.sessions.untrack(key);
        tracing::info!(client = %client.name, %peer, reason = why.as_deref().unwrap_or("closed"), "client disconnected");
    }

    /// Serves one stream the session asked for: opens it on the agent and
    /// relays it, or answers OPEN_ERR.
    ///
    /// Not an `async fn`, so that the task keeps only what the relay needs
    /// for the stream's whole life: the open runs boxed (its state is freed
    /// when it is done), and `incoming`, moved into it, is not kept beside.
    fn relay_stream(
        self: Arc<Self>,
        caller: Arc<Caller>,
        incoming: IncomingStream,
    ) -> impl Future<Output = ()> + Send + 'static {
        let started = Instant::now();
        let target = incoming.target().address.clone();
        let opening = Box::pin(self.clone().open_both(caller.clone(), incoming));
        async move {
            let Some((client_stream, agent_stream, guard)) = opening.await else {
                return;
            };
            // Each side's bytes come from the other session in whole
            // messages: let both writers batch them.
            client_stream.mark_relayed();
            agent_stream.mark_relayed();
            run_relay(
                &self.metrics,
                &caller.name(),
                &target,
                started,
                &guard,
                client_stream.split(),
                agent_stream.split(),
            )
            .await;
        }
    }

    /// Opens the stream on the agent, then accepts the client's: both
    /// streams and the open's guard, or `None` when either side refused or
    /// went away (answered and logged here).
    async fn open_both(
        self: Arc<Self>,
        caller: Arc<Caller>,
        mut incoming: IncomingStream,
    ) -> Option<(Stream, Stream, OpenGuard)> {
        let name = caller.name();
        let target = incoming.target().clone();
        let id = incoming.id();
        // If the client gives up while the agent is still dialing, the open
        // is dropped: the agent-side open is reset, and the guard gives
        // back the pending-open and stream slots.
        // What the client sent with its open goes on with ours.
        let early = incoming.take_early_data(MAX_EARLY_DATA);
        let opened = tokio::select! {
            r = self.opener.open(&caller, &target.address, target.kind, early) => r,
            _ = incoming.cancelled() => {
                tracing::debug!(client = %name, stream = %id, %target, "client cancelled the open");
                return None;
            }
        };
        let (agent_stream, guard) = match opened {
            Ok(x) => x,
            Err(Refusal { code, reason }) => {
                tracing::info!(client = %name, stream = %id, %target, %code, "open refused: {reason}");
                incoming.reject(code, &reason);
                return None;
            }
        };
        let client_stream = match incoming.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(client = %name, "client went away before the open finished: {e}");
                return None;
            }
        };
        tracing::info!(client = %name, stream = %id, %target, "stream open");
        Some((client_stream, agent_stream, guard))
    }
}
