//! HTTP routing: which part of the server answers a request.
//!
//! | request | answered by |
//! |---------|-------------|
//! | `/_tether/style.css`, `/_tether/console.js` (every host) | [`crate::web::pages`] |
//! | `Host: SERVICE.AGENT.BASE_DOMAIN` (every other path) | [`crate::web::proxy`] |
//! | `/healthz`, `/livez`, `/readyz` | [`crate::cluster::Cluster::probe`] |
//! | `/metrics` | here |
//! | `/tether/v1/agent` | [`crate::session_agent`] |
//! | `/tether/v1/client` | [`crate::session_client`] |
//! | `/tether/v1/ws/AGENT/SERVICE` | [`crate::raw_ws`] |
//! | `/login`, `/logout` | [`crate::web::login`] |
//! | `/`, `/api/agents`, `/api/events` | [`crate::web::console`] |
//! | `/api/v1/...` | [`crate::web::admin`] |
//! | `/a/AGENT/SERVICE/...` | [`crate::web::proxy`] |

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, Method, Request, StatusCode};
use hyper::body::Incoming;
use tether_proto::endpoints::{AGENT_PATH, CLIENT_PATH, RAW_WS_PREFIX};
use tokio_rustls::rustls::pki_types::CertificateDer;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::raw_ws::RawWsEndpoint;
use crate::registry::Registry;
use crate::response::{redirect, text, Resp};
use crate::session_agent::AgentEndpoint;
use crate::session_client::ClientEndpoint;
use crate::web::admin::{AdminApi, API_PREFIX};
use crate::web::credential::ConnectionCredential;
use crate::web::route::{route_by_host, route_by_path};
use crate::web::{console, login, pages, proxy, request_host, split_port, Web, PATH_PREFIX};

/// Routes each request to the part of the server that answers it.
pub(crate) struct Router {
    agents: Arc<AgentEndpoint>,
    clients: Arc<ClientEndpoint>,
    raw: Arc<RawWsEndpoint>,
    web: Arc<Web>,
    admin: AdminApi,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
    /// Whether `/metrics` is served here (no `metrics_listen`).
    public_metrics: bool,
}

/// The endpoints a [`Router`] dispatches to.
pub(crate) struct Endpoints {
    /// Agent sessions.
    pub(crate) agents: AgentEndpoint,
    /// CLI client sessions.
    pub(crate) clients: ClientEndpoint,
    /// Raw WebSockets.
    pub(crate) raw: RawWsEndpoint,
    /// Browser access.
    pub(crate) web: Web,
    /// The admin API.
    pub(crate) admin: AdminApi,
}

impl Router {
    /// A router over these endpoints.
    pub(crate) fn new(
        endpoints: Endpoints,
        metrics: Arc<Metrics>,
        registry: Arc<Registry>,
        cluster: Arc<Cluster>,
        public_metrics: bool,
    ) -> Router {
        let Endpoints {
            agents,
            clients,
            raw,
            web,
            admin,
        } = endpoints;
        Router {
            agents: Arc::new(agents),
            clients: Arc::new(clients),
            raw: Arc::new(raw),
            web: Arc::new(web),
            admin,
            metrics,
            registry,
            cluster,
            public_metrics,
        }
    }

    /// Resolves once the server is closing (after its shutdown delay):
    /// connections finish what is in flight and close.
    pub(crate) async fn closing(&self) {
        self.cluster.closing().await
    }

    /// What a connection accepted into the session reserve may ask for:
    /// agent and client session upgrades and raw WebSockets (they
    /// authenticate at once) and the health check; never a host-routed
    /// service, whatever its path.
    pub(crate) fn reserve_may_serve(&self, req: &Request<Incoming>) -> bool {
        let host = request_host(req).unwrap_or_default();
        if self
            .web
            .base()
            .and_then(|b| route_by_host(b, &host))
            .is_some()
        {
            return false;
        }
        let path = req.uri().path();
        matches!(
            path,
            AGENT_PATH | CLIENT_PATH | "/healthz" | "/livez" | "/readyz"
        ) || path.starts_with(RAW_WS_PREFIX)
    }

    /// Answers one request from `peer` (`client_cert`: the certificate
    /// rustls verified on this connection, if any; `credential`: the
    /// connection's last bearer credential, see [`ConnectionCredential`]).
    pub(crate) async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        client_cert: Option<Arc<CertificateDer<'static>>>,
        credential: &ConnectionCredential,
    ) -> Resp {
        let path = req.uri().path().to_owned();
        let host = request_host(&req).unwrap_or_default();
        let web = &self.web;
        // Our own static files, on every host (also host-routed service
        // hosts, whose error pages use them).
        match path.as_str() {
            "/_tether/style.css" => return pages::asset(pages::STYLE_CSS, "text/css"),
            "/_tether/console.js" => return pages::asset(pages::CONSOLE_JS, "text/javascript"),
            _ => {}
        }
        // Host routing: every other path of SERVICE.AGENT.BASE is the service's.
        if let Some(route) = web.base().and_then(|base| route_by_host(base, &host)) {
            let rest = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into());
            return proxy::serve(web, req, peer, route, rest, host, credential).await;
        }
        if let Some((code, body)) = self.cluster.probe(&path, req.uri().query(), &self.registry) {
            return text(StatusCode::from_u16(code).unwrap_or(StatusCode::OK), body);
        }
        match path.as_str() {
            "/metrics" if self.public_metrics => {
                self.metrics.agents.set(self.registry.online() as i64);
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            AGENT_PATH => self.agents.upgrade(req, peer, client_cert.as_deref()),
            CLIENT_PATH => self.clients.upgrade(req, peer),
            p if p.starts_with(RAW_WS_PREFIX) => {
                self.raw.serve(req, peer, &p[RAW_WS_PREFIX.len()..]).await
            }
            "/login" if req.method() == Method::POST => {
                login::login_submit(web, req, peer, &host).await
            }
            "/login" => login::login_page(web, &req),
            "/logout" => login::logout(web, req, &host).await,
            "/" | "/api/agents" | "/api/events" => {
                let Some((client, via)) = login::identify(web, req.headers()) else {
                    // A token that was sent and refused is not a missing
                    // login: the caller is told, and the log says why.
                    if login::refused_bearer(web, req.headers(), peer, &path) {
                        return login::bad_token(req.headers());
                    }
                    return login::login_required(web, &req, &host);
                };
                let scheme = web.public_scheme();
                let port = split_port(&host).1.to_owned();
                let filter = console::Filter::from_query(req.uri().query());
                match path.as_str() {
                    "/" => console::page(&client, &via),
                    "/api/agents" => console::agents_json(web, &client, &filter, scheme, &port),
                    _ => console::events(
                        web.clone(),
                        req.headers(),
                        client,
                        via.login_end(),
                        filter,
                        peer,
                        port,
                    ),
                }
            }
            p if p.starts_with(API_PREFIX) => self.admin.serve(web, &req, peer),
            p if p.starts_with(PATH_PREFIX) && !web.path_routing() => pages::error(
                req.headers(),
                StatusCode::NOT_FOUND,
                "path_routing_off",
                "this server serves services on their own hosts only (SERVICE.AGENT.BASE_DOMAIN; [http] path_routing = false)",
            ),
            p if p.starts_with(PATH_PREFIX) => {
                let Some((route, tail)) = route_by_path(p) else {
                    return pages::error(
                        req.headers(),
                        StatusCode::NOT_FOUND,
                        "bad_path",
                        "expected /a/AGENT/SERVICE/",
                    );
                };
                let Some(tail) = tail else {
                    // `/a/AGENT/SERVICE` → `/a/AGENT/SERVICE/` so relative links resolve.
                    let q = req
                        .uri()
                        .query()
                        .map(|q| format!("?{q}"))
                        .unwrap_or_default();
                    return redirect(StatusCode::PERMANENT_REDIRECT, &format!("{p}/{q}"));
                };
                let rest = match req.uri().query() {
                    Some(q) => format!("{tail}?{q}"),
                    None => tail.to_owned(),
                };
                proxy::serve(web, req, peer, route, rest, host, credential).await
            }
            _ => {
                // At most 200 bytes of the path echoed: the answer to a long
                // one is not as large as the request. The path may hold
                // UTF-8 (hyper takes bytes above 0x7f): cut at a character.
                let mut cut = path.len().min(200);
                while !path.is_char_boundary(cut) {
                    cut -= 1;
                }
                let shown = &path[..cut];
                let more = if shown.len() < path.len() { "..." } else { "" };
                text(
                    StatusCode::NOT_FOUND,
                    format!("no such endpoint: {shown}{more}"),
                )
            }
        }
    }
}
