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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_proto::{CatalogEntry, ServiceKind};

use super::login::Via;
use super::pages::{error, escape, html_page};
use super::route::host_routable;
use super::{Web, PATH_PREFIX};
use crate::auth::{is_plain_name, Authenticator};
use crate::config::Protocol;
use crate::identity::ClientIdentity;
use crate::limits::ConsoleSlot;
use crate::response::{api_headers, full, BoxError, Resp};
use crate::streams::Revocation;

/// How often the event stream checks for changes (byte counters move
/// without registry events).
pub(crate) const EVENTS_TICK: Duration = Duration::from_secs(1);

/// Least time between two snapshots of one event stream, however often
/// agents come and go.
pub(crate) const EVENTS_MIN_GAP: Duration = Duration::from_millis(250);

/// How long an event stream may keep its page's agents and counts while no
/// agent comes or goes: what can change them without that (an agent's
/// service list, a session starting to drain) shows within this.
pub(crate) const RESELECT_EVERY: Duration = Duration::from_secs(10);

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

/// What the console shows one client: the counts over every agent it may
/// see, and one page of them.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Snapshot {
    /// The client's name.
    pub(crate) identity: String,
    /// It may read the admin API (the page then shows live streams).
    pub(crate) admin: bool,
    /// Agents it may see.
    pub(crate) total: usize,
    /// Of those, connected now.
    pub(crate) online: usize,
    /// Of those, matching the console's [`Filter`].
    pub(crate) matched: usize,
    /// The first [`Filter::limit`] of the matching agents: online ones
    /// first, then by name.
    pub(crate) agents: Vec<AgentView>,
}

/// Agents in one answer unless the console asks for fewer or more: the page
/// renders at most this many cards.
pub(crate) const PAGE: usize = 60;

/// Most agents one answer may carry (`limit=`).
pub(crate) const MAX_PAGE: usize = 500;

/// Longest search kept, in bytes (names are at most 63).
const MAX_SEARCH: usize = 128;

/// What one console asks to see (`?q=TEXT&online=1&limit=N` on
/// `/api/agents` and `/api/events`). The server filters, orders and cuts, so
/// an update for a console over 100 000 agents carries a page of them, not
/// the fleet (which every open console would otherwise build, serialize and
/// send each time a byte counter moved).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Filter {
    /// Lowercase text an agent's name, or one of its services' names the
    /// client may see, contains (empty: every agent).
    search: String,
    /// Connected agents only.
    online_only: bool,
    /// Most agents in the answer.
    limit: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            search: String::new(),
            online_only: false,
            limit: PAGE,
        }
    }
}

impl Filter {
    /// From a request's query string; what does not parse is left at its
    /// default (a console is a view, not an API a typo should break).
    pub(crate) fn from_query(query: Option<&str>) -> Filter {
        let mut f = Filter::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "q" => {
                    let mut q = v.trim().to_lowercase();
                    if q.len() > MAX_SEARCH {
                        let mut cut = MAX_SEARCH;
                        while !q.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        q.truncate(cut);
                    }
                    f.search = q;
                }
                "online" => f.online_only = matches!(&*v, "1" | "true"),
                "limit" => {
                    if let Ok(n) = v.parse::<usize>() {
                        f.limit = n.clamp(1, MAX_PAGE);
                    }
                }
                _ => {}
            }
        }
        f
    }

    /// Whether `name` contains the search (names are ASCII; any case).
    fn names(&self, name: &str) -> bool {
        let (hay, needle) = (name.as_bytes(), self.search.as_bytes());
        needle.is_empty()
            || hay
                .windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
    }
}

/// The console data for `client`, cut to `filter`. `scheme` and `port` are
/// those of the request, to build service links.
pub(crate) fn snapshot(
    web: &Web,
    client: &ClientIdentity,
    filter: &Filter,
    scheme: &str,
    port: &str,
) -> Snapshot {
    let auth = web.auth.get();
    let selection = Selection::new(web, &auth, client, filter);
    selection.snapshot(web, &auth, client, scheme, port)
}

/// Which agents one console's page holds, with the counts over every agent
/// the client may see: a walk over the whole fleet, which an event stream
/// repeats only when agents came or went (or every [`RESELECT_EVERY`]),
/// while the page itself is rebuilt every tick.
#[derive(Debug)]
struct Selection {
    total: usize,
    online: usize,
    matched: usize,
    /// The page, in order.
    names: Vec<String>,
}

impl Selection {
    fn new(web: &Web, auth: &Authenticator, client: &ClientIdentity, filter: &Filter) -> Self {
        let (mut total, mut online, mut matched) = (0, 0, 0);
        // The first `limit` matches of each kind, in name order; online
        // ones go first, so both are kept until the walk ends.
        let (mut first_online, mut first_offline) = (vec![], vec![]);
        for name in auth.agent_names() {
            if !auth.may_see_agent(client, name) {
                continue;
            }
            total += 1;
            let is_online = web.registry.is_online(name);
            online += usize::from(is_online);
            if filter.online_only && !is_online {
                continue;
            }
            let found = filter.names(name)
                || (is_online && services_named(web, auth, client, name, filter));
            if !found {
                continue;
            }
            matched += 1;
            let page = if is_online {
                &mut first_online
            } else {
                &mut first_offline
            };
            if page.len() < filter.limit {
                page.push(name.clone());
            }
        }
        first_online.extend(first_offline);
        first_online.truncate(filter.limit);
        Selection {
            total,
            online,
            matched,
            names: first_online,
        }
    }

    /// The page's agents as they are now.
    fn snapshot(
        &self,
        web: &Web,
        auth: &Authenticator,
        client: &ClientIdentity,
        scheme: &str,
        port: &str,
    ) -> Snapshot {
        Snapshot {
            identity: client.name.clone(),
            admin: auth.is_admin(client),
            total: self.total,
            online: self.online,
            matched: self.matched,
            agents: self
                .names
                .iter()
                .map(|name| agent_view(web, auth, client, name, scheme, port))
                .collect(),
        }
    }
}

/// Whether a service of `agent` that `client` may see has a name with the
/// filter's search in it.
fn services_named(
    web: &Web,
    auth: &Authenticator,
    client: &ClientIdentity,
    agent: &str,
    filter: &Filter,
) -> bool {
    let Some(e) = web.registry.get(agent) else {
        return false;
    };
    let catalog = e.conn.peer_catalog();
    let catalog = catalog.borrow();
    catalog
        .iter()
        .flatten()
        .any(|s| filter.names(&s.name) && visible(auth, client, agent, s).is_some())
}

/// How `client` may reach `service` of `agent`, if it may see it at all.
fn visible(
    auth: &Authenticator,
    client: &ClientIdentity,
    agent: &str,
    service: &CatalogEntry,
) -> Option<Protocol> {
    // Names go into links and host names: show only plain ones (an agent
    // could announce anything).
    if !is_plain_name(&service.name) {
        return None;
    }
    let proto = match service.kind {
        k if k.is_http() => Protocol::Http,
        ServiceKind::Udp => Protocol::Udp,
        _ => Protocol::Tcp,
    };
    auth.decide(client, agent, &service.name, proto)
        .allowed
        .then_some(proto)
}

/// One agent's card: its sessions here, traffic and the services `client`
/// may see.
fn agent_view(
    web: &Web,
    auth: &Authenticator,
    client: &ClientIdentity,
    name: &str,
    scheme: &str,
    port: &str,
) -> AgentView {
    let entry = web.registry.get(name);
    let mut view = AgentView {
        name: name.to_owned(),
        online: entry.is_some(),
        version: None,
        since: None,
        streams: 0,
        bytes_in: 0,
        bytes_out: 0,
        services: vec![],
        instances: vec![],
    };
    let instances = web.registry.instances(name);
    for i in &instances {
        view.instances.push(InstanceView {
            id: i.instance.clone(),
            since: unix_secs(i.since),
            streams: i.conn.stats().live as u64,
            draining: i.conn.is_draining(),
        });
    }
    let Some(e) = entry else {
        return view;
    };
    view.version = Some(e.software.clone());
    view.since = unix_secs(e.since);
    // Streams and bytes over all its instances here.
    view.streams = view.instances.iter().map(|i| i.streams).sum();
    for i in &instances {
        let c = i.conn.counters();
        view.bytes_in += c.bytes_in.load(Ordering::Relaxed);
        view.bytes_out += c.bytes_out.load(Ordering::Relaxed);
    }
    let base = web.base();
    let catalog = e.conn.peer_catalog();
    let catalog = catalog.borrow();
    for s in catalog.iter().flatten() {
        let Some(proto) = visible(auth, client, name, s) else {
            continue;
        };
        // A name a host name cannot carry gets the path link, or none.
        let url = match &base {
            _ if proto != Protocol::Http => None,
            Some(b) if host_routable(name, &s.name) => {
                Some(format!("{scheme}://{}.{name}.{b}{port}/", s.name))
            }
            _ if web.path_routing() => Some(format!("{PATH_PREFIX}{name}/{}/", s.name)),
            _ => None,
        };
        view.services.push(ServiceView {
            name: s.name.clone(),
            kind: s.kind.as_str().into_owned(),
            url,
        });
    }
    view
}

fn unix_secs(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// `GET /`: the console page.
pub(crate) fn page(client: &ClientIdentity, via: &Via) -> Resp {
    let logout = match via {
        Via::Cookie { csrf, .. } => format!(
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
pub(crate) fn agents_json(
    web: &Web,
    client: &ClientIdentity,
    filter: &Filter,
    scheme: &str,
    port: &str,
) -> Resp {
    let s = snapshot(web, client, filter, scheme, port);
    let mut r = Response::new(full(serde_json::to_vec(&s).unwrap_or_default()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    api_headers(r.headers_mut());
    r
}

/// `GET /api/events`: a snapshot now and after every change (at most one
/// per [`EVENTS_MIN_GAP`]), while the client has a console stream slot left
/// (429 naming the limit if not); the slot is held as long as the stream is.
pub(crate) fn events(
    web: Arc<Web>,
    req_headers: &HeaderMap,
    client: ClientIdentity,
    login: Option<(Arc<Revocation>, std::time::Instant)>,
    filter: Filter,
    peer: SocketAddr,
    port: String,
) -> Resp {
    let scheme = web.public_scheme();
    let slot = match web.limits.console_stream(client.key()) {
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
        filter: Filter,
        _slot: ConsoleSlot,
        port: String,
        last: String,
        changes: tokio::sync::watch::Receiver<u64>,
        deadline: tokio::time::Instant,
        /// The browser login it came with signing out (it ends then).
        signed_out: Option<Arc<Revocation>>,
        /// The last walk over the fleet: under which credential tables and
        /// registry version, and when (`None` before the first).
        selected: Option<(Arc<Authenticator>, u64, tokio::time::Instant, Selection)>,
        /// When the last snapshot was built (`None` before the first).
        built: Option<tokio::time::Instant>,
        /// The credential tables the client was last checked against in
        /// full (at first: those it was just identified under).
        checked: Arc<Authenticator>,
    }
    let far = tokio::time::Instant::now() + EVENTS_MAX_AGE;
    let ev = Ev {
        checked: web.auth.get(),
        changes: web.registry.subscribe(),
        web,
        client,
        filter,
        _slot: slot,
        port,
        last: String::new(),
        // The login's end ends it too.
        deadline: login.as_ref().map_or(far, |(_, at)| far.min((*at).into())),
        signed_out: login.map(|(r, _)| r),
        selected: None,
        built: None,
    };
    let stream = futures_util::stream::unfold(ev, move |mut ev| async move {
        loop {
            if let Some(built) = ev.built {
                let signing_out = Revocation::revoked_or_never(ev.signed_out.as_deref());
                tokio::select! {
                    _ = ev.changes.changed() => {}
                    _ = tokio::time::sleep(EVENTS_TICK) => {}
                    _ = tokio::time::sleep_until(ev.deadline) => return None,
                    _ = signing_out => return None,
                }
                // Agents come and go all the time in a large fleet: one
                // snapshot covers every change within the gap.
                let next = (built + EVENTS_MIN_GAP).min(ev.deadline);
                tokio::time::sleep_until(next).await;
            }
            let now = tokio::time::Instant::now();
            if now >= ev.deadline || ev.signed_out.as_ref().is_some_and(|r| r.is_revoked()) {
                return None;
            }
            ev.built = Some(now);
            let auth = ev.web.auth.get();
            // A revoked or expired identity's console stops updating. After
            // a reload the identity is checked in full: a JWT whose key, or
            // issuer, went out with it is revoked before it expires.
            if !Arc::ptr_eq(&ev.checked, &auth) {
                if !auth.client_revalidate(&ev.client) {
                    return None;
                }
                ev.checked = auth.clone();
            }
            if !auth.client_still_valid(&ev.client) {
                return None;
            }
            let version = *ev.changes.borrow_and_update();
            let current = ev.selected.as_ref().is_some_and(|(a, v, at, _)| {
                Arc::ptr_eq(a, &auth) && *v == version && now < *at + RESELECT_EVERY
            });
            if !current {
                let selection = Selection::new(&ev.web, &auth, &ev.client, &ev.filter);
                ev.selected = Some((auth.clone(), version, now, selection));
            }
            let Some((_, _, _, selection)) = &ev.selected else {
                return None;
            };
            let snap = selection.snapshot(&ev.web, &auth, &ev.client, scheme, &ev.port);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_reads_its_query_and_keeps_defaults_for_what_does_not_parse() {
        assert_eq!(Filter::from_query(None), Filter::default());
        let f = Filter::from_query(Some("q=%20Fleet-09%20&online=1&limit=5"));
        assert_eq!(
            f,
            Filter {
                search: "fleet-09".into(),
                online_only: true,
                limit: 5
            }
        );
        let f = Filter::from_query(Some("limit=zero&online=yes&other=1"));
        assert_eq!(f, Filter::default());
        assert_eq!(Filter::from_query(Some("limit=0")).limit, 1);
        assert_eq!(Filter::from_query(Some("limit=1000000")).limit, MAX_PAGE);
        // A long search is cut at a character boundary, not mid-character.
        let long = "é".repeat(100);
        let f = Filter::from_query(Some(&format!("q={long}")));
        assert!(f.search.len() <= MAX_SEARCH && f.search.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_search_finds_names_containing_it_in_any_case() {
        let f = Filter::from_query(Some("q=ET-0"));
        assert!(f.names("fleet-0999"));
        assert!(f.names("FLEET-0999"));
        assert!(!f.names("fleet"));
        assert!(!f.names(""));
        assert!(Filter::default().names("anything"));
        assert!(Filter::default().names(""));
    }
}
