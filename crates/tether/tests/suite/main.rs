//! tether's end-to-end tests, as one test binary: the real `tether` binary
//! runs as separate processes on loopback (or in network namespaces),
//! driven by real clients (curl, dig, chromium, raw protocol peers). Each
//! module is one theme; `common` is the shared harness, linked once.

mod common;

mod abuse;
mod admin;
mod agent_dns;
mod browser;
mod cli;
mod discovery;
mod e2e;
mod ha;
mod http2;
mod lifecycle;
mod listeners;
mod netns;
mod proxy;
mod security;
mod udp;
mod web;
mod worker_threads;
