//! The tether server: the public gateway.
//!
//! It listens on one port (plain or TLS) and serves:
//!
//! | path | what |
//! |------|------|
//! | `/tether/v1/agent` | agent sessions (WebSocket, subprotocol `tether.v1`, agent token) |
//! | `/tether/v1/client` | CLI client sessions (same protocol, client token) |
//! | `/tether/v1/ws/AGENT/SERVICE` | raw WebSocket: one WebSocket = one stream |
//! | `/healthz`, `/livez` | liveness |
//! | `/readyz` | readiness (agents arrived; 404 while shutting down, or with `?exclude=shutdown` once the listeners close) |
//! | `/metrics` | Prometheus metrics |
//! | `/`, `/login`, `/a/AGENT/SERVICE/`, `SERVICE.AGENT.BASE_DOMAIN` | browser access (see [`web`]) |
//!
//! The public API is what the `tether` binary, its tests and the fuzz
//! targets use: [`Server`] (and [`ServeError`]), the [`config`] types,
//! [`auth::token_hash_hex`], [`reload::ConfigSource`], and the browser
//! proxy's pure routing and rewriting functions in [`web`]. Everything else
//! is internal; the layout is described in `docs/ARCHITECTURE.md`.

#![deny(missing_docs)]
// The module docs are a newcomer's map of the crate and link to its
// private items; `cargo doc --document-private-items` renders them.
#![allow(rustdoc::private_intra_doc_links)]

// Configuration (leaves: nothing of the runtime below).
pub mod config;

// Who is who, and who may do what.
pub mod auth;
mod identity;
mod jwt;
mod policy;

// Shared handles.
mod cluster;
mod limits;
mod metrics;
mod registry;
mod sessions;
mod streams;
mod tls;

// The open path and relaying.
mod open;
mod relay;

// The public port: accept, connections, routing, endpoints.
mod admission;
mod connection;
mod h2_stall;
mod raw_ws;
mod router;
mod server;
mod session_agent;
mod session_client;
mod upgrade;

// Browser access, server-side listeners, reload, and the composition.
mod listeners;
pub mod reload;
mod response;
mod state;
pub mod web;

pub use config::{ServerConfig, MAX_STREAMS_PER_CLIENT};
pub use server::{ServeError, Server};
