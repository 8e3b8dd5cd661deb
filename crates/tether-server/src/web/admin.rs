//! The admin API: `GET /api/v1/{status,agents,sessions,streams}`, JSON
//! (`streams?limit=N`: the N busiest).
//!
//! What is connected to this replica and what flows through it, for
//! `tether status`, the console's live view and an operator's scripts. Only
//! identities the config names in `admins` may read it (a client token as
//! `Authorization: Bearer`, or a browser login); everyone else gets a JSON
//! error with the reason. The document is `docs/openapi.yaml`; its schemas
//! are the structs below (a test checks the running server against it).
//!
//! Each replica answers for itself: with several replicas, ask each one
//! (the `replica` field says which answered).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use super::login::{identify, refused_bearer};
use super::Web;
use crate::cluster::{Cluster, Phase};
use crate::registry::Registry;
use crate::response::{api_headers, full, Resp};
use crate::sessions::{SessionView, Sessions};
use crate::streams::{StreamView, Streams};

/// Where the admin API lives.
pub(crate) const API_PREFIX: &str = "/api/v1/";

/// The handles the admin API reads.
pub(crate) struct AdminApi {
    registry: Arc<Registry>,
    sessions: Arc<Sessions>,
    streams: Arc<Streams>,
    cluster: Arc<Cluster>,
}

/// `GET /api/v1/status`.
#[derive(Debug, Serialize)]
struct Status {
    replica: String,
    /// Replicas this one knows of, itself included: the figures here are
    /// this replica's alone.
    replicas: usize,
    version: &'static str,
    protocol: u16,
    uptime_secs: u64,
    /// `serving`, `leaving` (shutting down, still serving) or `closing`.
    phase: &'static str,
    agents_online: usize,
    agent_sessions: usize,
    client_sessions: usize,
    live_streams: usize,
}

/// `GET /api/v1/agents`.
#[derive(Debug, Serialize)]
struct Agents {
    replica: String,
    agents: Vec<Agent>,
}

#[derive(Debug, Serialize)]
struct Agent {
    name: String,
    online: bool,
    services: Vec<Service>,
    instances: Vec<Instance>,
}

#[derive(Debug, Serialize)]
struct Service {
    name: String,
    kind: String,
}

#[derive(Debug, Serialize)]
struct Instance {
    /// The instance id the agent told (empty when it told none).
    instance: String,
    peer: String,
    software: String,
    protocol: u16,
    since: u64,
    uptime_secs: u64,
    streams: u64,
    bytes_in: u64,
    bytes_out: u64,
    draining: bool,
}

/// `GET /api/v1/sessions`.
#[derive(Debug, Serialize)]
struct SessionList {
    replica: String,
    sessions: Vec<Session>,
}

#[derive(Debug, Serialize)]
struct Session {
    id: u64,
    kind: &'static str,
    name: String,
    peer: String,
    software: String,
    protocol: u16,
    since: u64,
    uptime_secs: u64,
    streams: u64,
    bytes_in: u64,
    bytes_out: u64,
    draining: bool,
}

/// `GET /api/v1/streams[?limit=N]`.
#[derive(Debug, Serialize)]
struct StreamList {
    replica: String,
    /// Live streams on this replica (`streams` may hold fewer).
    total: usize,
    streams: Vec<LiveStream>,
}

/// Most streams `?limit=` may ask for.
const MAX_STREAMS_LIMIT: usize = 10_000;

/// The `limit` of a `/api/v1/streams` query: `Ok(None)` without one.
fn streams_limit(query: Option<&str>) -> Result<Option<usize>, String> {
    let Some((_, v)) =
        form_urlencoded::parse(query.unwrap_or("").as_bytes()).find(|(k, _)| k == "limit")
    else {
        return Ok(None);
    };
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_STREAMS_LIMIT).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "limit must be a whole number from 1 to {MAX_STREAMS_LIMIT}, not {v:?}"
        )),
    }
}

#[derive(Debug, Serialize)]
struct LiveStream {
    id: u64,
    who: String,
    kind: &'static str,
    agent: String,
    service: String,
    protocol: &'static str,
    since: u64,
    age_secs: f64,
    bytes_up: u64,
    bytes_down: u64,
}

/// An error answer.
#[derive(Debug, Serialize)]
struct ApiError<'a> {
    error: &'a str,
    reason: String,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn age(t: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs())
}

impl From<SessionView> for Session {
    fn from(s: SessionView) -> Session {
        Session {
            id: s.key,
            kind: s.kind,
            name: s.name,
            peer: s.peer.to_string(),
            software: s.software,
            protocol: s.version,
            since: unix(s.since),
            uptime_secs: age(s.since),
            streams: s.streams,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            draining: s.draining,
        }
    }
}

impl From<StreamView> for LiveStream {
    fn from(s: StreamView) -> LiveStream {
        LiveStream {
            id: s.key,
            who: s.who,
            kind: s.kind,
            agent: s.agent,
            service: s.service,
            protocol: s.protocol,
            since: unix(s.since),
            age_secs: (s.age_secs * 1000.0).round() / 1000.0,
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
        }
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Resp {
    let mut r = Response::new(full(serde_json::to_vec(body).unwrap_or_default()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    api_headers(h);
    r
}

fn error(status: StatusCode, code: &str, reason: String) -> Resp {
    let mut r = json(
        status,
        &ApiError {
            error: code,
            reason,
        },
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tether\""),
        );
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    r
}

impl AdminApi {
    /// The admin API over these handles.
    pub(crate) fn new(
        registry: Arc<Registry>,
        sessions: Arc<Sessions>,
        streams: Arc<Streams>,
        cluster: Arc<Cluster>,
    ) -> AdminApi {
        AdminApi {
            registry,
            sessions,
            streams,
            cluster,
        }
    }

    /// Answers `req` (its path starts with [`API_PREFIX`]).
    pub(crate) fn serve(&self, web: &Web, req: &Request<Incoming>, peer: SocketAddr) -> Resp {
        let Some((client, _)) = identify(web, req.headers()) else {
            let reason = if refused_bearer(web, req.headers(), peer, req.uri().path()) {
                "invalid client token"
            } else {
                "sign in, or send a client token as Authorization: Bearer"
            };
            return error(StatusCode::UNAUTHORIZED, "unauthorized", reason.into());
        };
        if !web.auth.get().is_admin(&client) {
            tracing::warn!(identity = %client.name, path = %req.uri().path(), "admin API refused: not an admin");
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} is not an admin (the server config's `admins` names who is)",
                    client.name
                ),
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is read-only: use GET", req.uri().path()),
            );
        }
        let path = &req.uri().path()[API_PREFIX.len()..];
        match path {
            "status" => json(StatusCode::OK, &self.status()),
            "agents" => json(StatusCode::OK, &self.agents(web)),
            "sessions" => json(
                StatusCode::OK,
                &SessionList {
                    replica: self.cluster.id().to_owned(),
                    sessions: self.sessions.list().into_iter().map(Into::into).collect(),
                },
            ),
            "streams" => match streams_limit(req.uri().query()) {
                Ok(limit) => json(StatusCode::OK, &self.stream_list(limit)),
                Err(reason) => error(StatusCode::BAD_REQUEST, "bad_request", reason),
            },
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such endpoint: {API_PREFIX}{path} (status, agents, sessions, streams)"),
            ),
        }
    }

    fn status(&self) -> Status {
        let (agent_sessions, client_sessions) = self.sessions.counts();
        Status {
            replica: self.cluster.id().to_owned(),
            replicas: self.cluster.replicas().borrow().entries.len(),
            version: env!("CARGO_PKG_VERSION"),
            protocol: tether_proto::PROTOCOL_VERSION,
            uptime_secs: self.cluster.uptime().as_secs(),
            phase: match self.cluster.phase() {
                Phase::Serving => "serving",
                Phase::Leaving => "leaving",
                Phase::Closing => "closing",
            },
            agents_online: self.registry.online(),
            agent_sessions,
            client_sessions,
            live_streams: self.streams.len(),
        }
    }

    /// The oldest live streams (at most [`MAX_STREAMS_LIMIT`]), or the
    /// `limit` busiest.
    fn stream_list(&self, limit: Option<usize>) -> StreamList {
        let (total, streams) = match limit {
            Some(n) => self.streams.busiest(n),
            None => self.streams.oldest(MAX_STREAMS_LIMIT),
        };
        StreamList {
            replica: self.cluster.id().to_owned(),
            total,
            streams: streams.into_iter().map(Into::into).collect(),
        }
    }

    fn agents(&self, web: &Web) -> Agents {
        let mut agents = vec![];
        for name in web.auth.get().agent_names() {
            let instances = self.registry.instances(name);
            // A live member's catalog: a draining one may be the old
            // version of a rolling update.
            let services = instances
                .iter()
                .find(|e| e.is_live())
                .or(instances.first())
                .and_then(|e| e.conn.peer_catalog().borrow().clone())
                .unwrap_or_default()
                .into_iter()
                .map(|s| Service {
                    name: s.name,
                    kind: s.kind.as_str().into_owned(),
                })
                .collect();
            agents.push(Agent {
                online: self.registry.is_online(name),
                services,
                instances: instances
                    .iter()
                    .map(|i| {
                        let c = i.conn.counters();
                        Instance {
                            instance: i.instance.clone(),
                            peer: i.addr.to_string(),
                            software: i.software.clone(),
                            protocol: i.version,
                            since: unix(i.since),
                            uptime_secs: age(i.since),
                            streams: i.conn.stats().live as u64,
                            bytes_in: c.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
                            bytes_out: c.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
                            draining: i.conn.is_draining(),
                        }
                    })
                    .collect(),
                name: name.clone(),
            });
        }
        Agents {
            replica: self.cluster.id().to_owned(),
            agents,
        }
    }
}
