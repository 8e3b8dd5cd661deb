//! The web console: agents and their services, live.
//!
//! `/` is a static page; its script reads `/api/events` (server-sent events,
//! one JSON snapshot per change, checked once a second) and falls back to
//! polling `/api/agents`. A client sees only the agents and services its
//! allow-list reaches, and never an agent's network address. Identities in
//! `admins` also see the live streams: the page reads them from the admin
//! API ([`super::admin`]), which checks the identity again.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tether_proto::ServiceKind;

use super::login::Via;
use super::pages::{error, escape, html_page};
use super::{Web, PATH_PREFIX};
use crate::auth::is_plain_name;
use crate::config::Protocol;
use crate::identity::ClientIdentity;
use crate::limits::ConsoleSlot;
use crate::response::{api_headers, full, BoxError, Resp};

/// How often the event stream checks for changes (byte counters move
/// without registry events).
pub(crate) const EVENTS_TICK: Duration = Duration::from_secs(1);

/// How long one event stream lasts before the browser reconnects (bounds
/// stale connections; `EventSource` reconnects by itself).
pub(crate) const EVENTS_MAX_AGE: Duration = Duration::from_secs(300);

/// One service in the console.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct ServiceView {
    /// Name.
    pub(crate) name: String,
    /// `http`, `tcp`, ...
    pub(crate) kind: String,
    /// Where to open it in a browser (HTTP services the client may open).
    pub(crate) url: Option<String>,
}

/// One agent in the console.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct AgentView {
    /// Name.
    pub(crate) name: String,
    /// Connected now.
    pub(crate) online: bool,
    /// Its software string.
    pub(crate) version: Option<String>,
    /// Connected since (Unix seconds).
    pub(crate) since: Option<u64>,
    /// Streams open on its session.
    pub(crate) streams: u64,
    /// Bytes from the agent to the server.
    pub(crate) bytes_in: u64,
    /// Bytes from the server to the agent.
    pub(crate) bytes_out: u64,
    /// Its services (empty for agents that do not announce them).
    pub(crate) services: Vec<ServiceView>,
    /// Its instances connected to this server replica (a pool has several).
    pub(crate) instances: Vec<InstanceView>,
}

/// One instance of an agent (one agent process) on this replica.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct InstanceView {
    /// The instance id it told (empty for agents that tell none).
    pub(crate) id: String,
    /// Connected since (Unix seconds).
    pub(crate) since: Option<u64>,
    /// Streams open on its session.
    pub(crate) streams: u64,
    /// It is shutting down: no new streams go to it.
    pub(crate) draining: bool,
}

/// What the console shows one client.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Snapshot {
    /// The client's name.
    pub(crate) identity: String,
    /// It may read the admin API (the page then shows live streams).
    pub(crate) admin: bool,
    /// Agents it can reach.
    pub(crate) agents: Vec<AgentView>,
}

/// The console data for `client`. `origin` is `scheme://host[:port]` of the
/// request, to build service links.
pub(crate) fn snapshot(web: &Web, client: &ClientIdentity, scheme: &str, port: &str) -> Snapshot {
    let base = web.base();
    let auth = web.auth.get();
    let mut agents = vec![];
    for name in auth.agent_names() {
        if !auth.may_see_agent(client, name) {
            continue;
        }
        let entry = web.registry.get(name);
        let mut view = AgentView {
            name: name.clone(),
            online: entry.is_some(),
            version: None,
            since: None,
            streams: 0,
            bytes_in: 0,
            bytes_out: 0,
            services: vec![],
            instances: vec![],
        };
        for i in web.registry.instances(name) {
            view.instances.push(InstanceView {
                id: i.instance.clone(),
                since: i.since.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs()),
                streams: i.conn.stats().live as u64,
                draining: i.conn.is_draining(),
            });
        }
        if let Some(e) = entry {
            view.version = Some(e.software.clone());
            view.since = e.since.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
            // Streams and bytes over all its instances here.
            view.streams = view.instances.iter().map(|i| i.streams).sum();
            for i in web.registry.instances(name) {
                let c = i.conn.counters();
                view.bytes_in += c.bytes_in.load(std::sync::atomic::Ordering::Relaxed);
                view.bytes_out += c.bytes_out.load(std::sync::atomic::Ordering::Relaxed);
            }
            let catalog = e.conn.peer_catalog();
            let catalog = catalog.borrow();
            for s in catalog.iter().flatten() {
                // Names go into links and host names: show only plain ones
                // (an agent could announce anything).
                if !is_plain_name(&s.name) {
                    continue;
                }
                let proto = match s.kind {
                    k if k.is_http() => Protocol::Http,
                    ServiceKind::Udp => Protocol::Udp,
                    _ => Protocol::Tcp,
                };
                if !auth.decide(client, name, &s.name, proto).allowed {
                    continue;
                }
                let url = s.kind.is_http().then(|| match &base {
                    Some(b) => format!("{scheme}://{}.{name}.{b}{port}/", s.name),
                    None => format!("{PATH_PREFIX}{name}/{}/", s.name),
                });
                view.services.push(ServiceView {
                    name: s.name.clone(),
                    kind: s.kind.as_str().into_owned(),
                    url,
                });
            }
        }
        agents.push(view);
    }
    Snapshot {
        identity: client.name.clone(),
        admin: auth.is_admin(client),
        agents,
    }
}

/// `GET /`: the console page.
pub(crate) fn page(client: &ClientIdentity, via: &Via) -> Resp {
    let logout = match via {
        Via::Cookie { csrf } => format!(
            "<form method=\"post\" action=\"/logout\" class=\"inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button id=\"logout\" class=\"link\">Sign out</button></form>",
            escape(csrf)
        ),
        Via::Bearer => String::new(),
    };
    html_page(
        StatusCode::OK,
        "Console",
        &format!(
            "<header><strong>tether</strong><span class=\"muted\" id=\"identity\">{}</span>{logout}</header>\
             <main><h1>Agents</h1>\
             <div class=\"filters\"><input id=\"search\" type=\"search\" placeholder=\"Search agents and services\" aria-label=\"Search agents and services\" autocomplete=\"off\">\
             <label class=\"check\"><input id=\"online-only\" type=\"checkbox\"> online only</label></div>\
             <p class=\"muted\" id=\"status\">Loading…</p>\
             <div id=\"agents\" class=\"grid\"></div>\
             <section id=\"streams\" hidden><h1>Live streams</h1><p class=\"muted\" id=\"streams-note\"></p>\
             <div class=\"scroll\"><table><thead><tr><th>who</th><th>target</th><th>protocol</th><th>age</th><th class=\"num\">up</th><th class=\"num\">down</th></tr></thead>\
             <tbody id=\"streams-body\"></tbody></table></div></section></main>\
             <script src=\"/_tether/console.js\"></script>",
            escape(&client.name)
        ),
    )
}

/// `GET /api/agents`: the snapshot as JSON.
pub(crate) fn agents_json(web: &Web, client: &ClientIdentity, scheme: &str, port: &str) -> Resp {
    let s = snapshot(web, client, scheme, port);
    let mut r = Response::new(full(serde_json::to_vec(&s).unwrap_or_default()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    api_headers(r.headers_mut());
    r
}

/// `GET /api/events`: a snapshot now and after every change, while the
/// client has a console stream slot left (429 naming the limit if not); the
/// slot is held as long as the stream is.
pub(crate) fn events(
    web: Arc<Web>,
    req_headers: &HeaderMap,
    client: ClientIdentity,
    peer: SocketAddr,
    scheme: &'static str,
    port: String,
) -> Resp {
    let slot = match web.limits.console_stream(&client.name) {
        Ok(slot) => slot,
        Err(hit) => {
            web.metrics.limit_hit(hit.limit);
            tracing::warn!(client = %client.name, %peer, "console event stream refused: {}", hit.reason);
            return error(
                req_headers,
                StatusCode::TOO_MANY_REQUESTS,
                hit.limit.as_str(),
                &hit.reason,
            );
        }
    };
    struct Ev {
        web: Arc<Web>,
        client: ClientIdentity,
        _slot: ConsoleSlot,
        port: String,
        last: String,
        changes: tokio::sync::watch::Receiver<u64>,
        deadline: tokio::time::Instant,
        first: bool,
    }
    let ev = Ev {
        changes: web.registry.subscribe(),
        web,
        client,
        _slot: slot,
        port,
        last: String::new(),
        deadline: tokio::time::Instant::now() + EVENTS_MAX_AGE,
        first: true,
    };
    let stream = futures_util::stream::unfold(ev, move |mut ev| async move {
        loop {
            if !ev.first {
                tokio::select! {
                    _ = ev.changes.changed() => {}
                    _ = tokio::time::sleep(EVENTS_TICK) => {}
                    _ = tokio::time::sleep_until(ev.deadline) => return None,
                }
            }
            ev.first = false;
            // A revoked or expired identity's console stops updating.
            if !ev.web.auth.get().client_still_valid(&ev.client) {
                return None;
            }
            let snap = snapshot(&ev.web, &ev.client, scheme, &ev.port);
            let json = serde_json::to_string(&snap).unwrap_or_default();
            if json != ev.last {
                ev.last = json.clone();
                let msg = Bytes::from(format!("event: agents\ndata: {json}\n\n"));
                return Some((Ok::<_, BoxError>(Frame::data(msg)), ev));
            }
        }
    });
    let body = StreamBody::new(stream.boxed()).boxed_unsync();
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    api_headers(h);
    r
}
