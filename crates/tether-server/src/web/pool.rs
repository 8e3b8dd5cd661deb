//! The keep-alive pool of tunnel streams to web services: hyper's pooled
//! HTTP/1.1 client, with a connector that opens tunnel streams instead of
//! sockets, so a page with fifty assets does not open fifty streams.
//!
//! A pooled stream serves whichever request comes next for its service, so
//! it belongs to no client: each request holds its own open guard (see
//! [`crate::open`]). Opening a new stream is still charged to the caller
//! whose request needed it (its pending-open slot, while the agent
//! answers): [`Pool::request`] names that caller to the connector.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tether_net::io::StreamIo;
use tether_net::Refusal;
use tether_proto::OpenErrorCode;

use super::{POOL_IDLE_PER_SERVICE, POOL_IDLE_TIMEOUT};
use crate::open::Opener;
use crate::response::Body;

tokio::task_local! {
    /// The limits key of the caller whose request the pool is serving
    /// ([`Pool::request`]). hyper calls the connector from within the
    /// request's own future, so the connector reads it there.
    static CALLER: Arc<str>;
}

/// A tunnel stream as hyper's client connection.
pub(crate) struct TunnelConn(TokioIo<StreamIo>, AgentSession);

impl TunnelConn {
    /// `io`, a tunnel stream on the agent session `session`.
    pub(crate) fn new(io: TokioIo<StreamIo>, session: tether_net::Connection) -> TunnelConn {
        TunnelConn(io, AgentSession(session))
    }
}

/// The agent session a pooled stream runs on (kept in hyper's connection
/// metadata, so [`Pool::request`] can tell a draining one).
#[derive(Clone)]
struct AgentSession(tether_net::Connection);

impl Connection for TunnelConn {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.1.clone())
    }
}

impl hyper::rt::Read for TunnelConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Maps pool keys (URI hosts `sN`) to `agent/service`. Short on purpose:
/// hyper-util's pool hashes the authority byte by byte with SipHash three
/// times per request (a 17-byte `sN.tether.invalid` cost 2 000
/// instructions); it never reaches the wire (`set_host(false)`).
#[derive(Default)]
struct Targets {
    /// agent -> service -> its pool key's URI authority, looked up with
    /// borrowed names on every request.
    by_target: HashMap<String, HashMap<String, Authority>>,
    by_id: HashMap<u64, (String, String)>,
}

/// Opens tunnel streams for hyper's pooled client.
#[derive(Clone)]
pub(crate) struct TunnelConnector {
    opener: Opener,
    targets: Arc<Mutex<Targets>>,
}

impl tower_service::Service<Uri> for TunnelConnector {
    type Response = TunnelConn;
    type Error = Refusal;
    type Future = Pin<Box<dyn Future<Output = Result<TunnelConn, Refusal>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let opener = self.opener.clone();
        let caller = CALLER.try_with(Arc::clone).ok();
        let target = uri
            .host()
            .and_then(|h| h.strip_prefix('s'))
            .and_then(|h| h.split('.').next())
            .and_then(|n| n.parse::<u64>().ok())
            .and_then(|id| {
                self.targets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .by_id
                    .get(&id)
                    .cloned()
            });
        Box::pin(async move {
            let internal = |why: &str| Refusal::new(OpenErrorCode::Internal, why);
            let (agent, service) = target.ok_or_else(|| internal("unknown pool key"))?;
            let caller = caller.ok_or_else(|| internal("pool used outside a request"))?;
            let (stream, session) = opener.dial_pooled(caller, &agent, &service).await?;
            Ok(TunnelConn::new(
                TokioIo::new(StreamIo::new(stream)),
                session,
            ))
        })
    }
}

/// The keep-alive pool of tunnel streams to web services.
pub(crate) struct Pool {
    client: Client<TunnelConnector, Body>,
    targets: Arc<Mutex<Targets>>,
}

impl Pool {
    /// A pool whose connector opens streams with `opener`.
    pub(crate) fn new(opener: Opener) -> Pool {
        let targets: Arc<Mutex<Targets>> = Arc::default();
        let connector = TunnelConnector {
            opener,
            targets: targets.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_SERVICE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .set_host(false)
            .build(connector);
        Pool { client, targets }
    }

    /// The URI of `path_and_query` on `agent/service` in the pool: its
    /// authority is a pool key only the connector reads.
    pub(crate) fn uri(&self, agent: &str, service: &str, path_and_query: &str) -> Option<Uri> {
        // Origin form only (`OPTIONS *` and the like are not forwarded).
        if !path_and_query.starts_with('/') {
            return None;
        }
        let authority = {
            let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            let known = t
                .by_target
                .get(agent)
                .and_then(|services| services.get(service))
                .cloned();
            match known {
                Some(a) => a,
                None => {
                    let id = t.by_id.len() as u64;
                    let a = Authority::try_from(format!("s{id}")).ok()?;
                    t.by_id.insert(id, (agent.to_owned(), service.to_owned()));
                    t.by_target
                        .entry(agent.to_owned())
                        .or_default()
                        .insert(service.to_owned(), a.clone());
                    a
                }
            }
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .ok()
    }

    /// Sends `req` (its URI from [`Pool::uri`]); a new stream it needs is
    /// charged to `caller` (a limits key).
    ///
    /// A pooled stream on an agent session that is draining (the agent
    /// instance is shutting down) serves this request and is then not used
    /// again, so the agent's drain is not held up by idle keep-alives.
    pub(crate) async fn request(
        &self,
        caller: Arc<str>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let captured = hyper_util::client::legacy::connect::capture_connection(&mut req);
        let resp = CALLER.scope(caller, self.client.request(req)).await?;
        // The client copies the connection's extras into every response.
        let draining = resp
            .extensions()
            .get::<AgentSession>()
            .is_some_and(|s| s.0.is_draining() || s.0.is_closed());
        if draining {
            if let Some(meta) = captured.connection_metadata().as_ref() {
                meta.poison();
            }
        }
        Ok(resp)
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
