//! `[limits]`: what one identity (and the server as a whole) may hold. The
//! counting itself is in [`crate::limits`].

use serde::Deserialize;

/// Default cap on all live sessions (agents, clients, raw WebSockets).
pub(crate) const MAX_SESSIONS: usize = 10_000;
/// Default cap on one client identity's live sessions.
pub(crate) const MAX_SESSIONS_PER_CLIENT: usize = 64;
/// Default sustained stream opens per second per identity.
pub(crate) const OPENS_PER_SEC: f64 = 1000.0;
/// Default burst of opens above the sustained rate.
pub(crate) const OPEN_BURST: f64 = 2000.0;
/// Default sustained HTTP proxy requests per second per identity (requests
/// reuse pooled streams, so they have their own, higher budget).
pub(crate) const REQUESTS_PER_SEC: f64 = 20_000.0;
/// Default burst of HTTP requests above the sustained rate.
pub(crate) const REQUEST_BURST: f64 = 40_000.0;
/// Default cap on one identity's opens waiting for the agent's answer (as
/// many as its streams: 1000 connections opened at once through one forward
/// all wait at the same moment).
pub(crate) const MAX_PENDING_OPENS_PER_CLIENT: usize = 2048;
/// Default cap on open TCP connections to the public port.
pub(crate) const MAX_CONNECTIONS: usize = 20_000;
/// Default cap on one source address's connections to the public port
/// (IPv6: per /64). A browser opens a handful; a NAT'd office a few hundred.
pub(crate) const MAX_CONNECTIONS_PER_SOURCE: usize = 512;
/// Default for how long a write to a client on the public port may wait
/// with nothing read by the client (nginx's `send_timeout` default).
pub(crate) const SEND_TIMEOUT_SECS: u64 = 60;

/// `[limits]` in the server config (reloadable).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// All live sessions.
    #[serde(default = "d_max_sessions")]
    pub max_sessions: usize,
    /// Live sessions of one client identity.
    #[serde(default = "d_max_sessions_per_client")]
    pub max_sessions_per_client: usize,
    /// Sustained stream opens per second per identity (CLI streams, SOCKS
    /// and HTTP CONNECT streams, raw WebSockets, each `[[listener]]`).
    #[serde(default = "d_opens_per_sec")]
    pub opens_per_sec: f64,
    /// Burst above that rate.
    #[serde(default = "d_open_burst")]
    pub open_burst: f64,
    /// Sustained HTTP proxy requests per second per identity.
    #[serde(default = "d_requests_per_sec")]
    pub requests_per_sec: f64,
    /// Burst above that rate.
    #[serde(default = "d_request_burst")]
    pub request_burst: f64,
    /// Opens of one identity (or one `[[listener]]`) waiting for their
    /// agent's answer.
    #[serde(default = "d_max_pending")]
    pub max_pending_opens_per_client: usize,
    /// Open TCP connections to the public port (before any authentication).
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Open TCP connections to the public port from one source address.
    #[serde(default = "d_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Seconds a write to a connection on the public port may wait while
    /// its client reads nothing; then the connection is dropped (a client
    /// that never reads would otherwise hold its connection forever). Over
    /// HTTP/2, also how long an answer may wait for the client to grant it
    /// window; then that stream is reset.
    #[serde(default = "d_send_timeout_secs")]
    pub send_timeout_secs: u64,
}

impl LimitsConfig {
    /// Checks the caps and rates: a cap of at least one (0 is often meant
    /// as "unlimited" and would refuse everything); rates and bursts
    /// finite, a rate not negative, a burst of at least one. (NaN or
    /// infinity would lift a limit without a word, a negative rate refuse
    /// everything.)
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, cap, what) in [
            (
                "max_sessions",
                self.max_sessions,
                "every session, agents' too",
            ),
            (
                "max_sessions_per_client",
                self.max_sessions_per_client,
                "every client session",
            ),
            (
                "max_pending_opens_per_client",
                self.max_pending_opens_per_client,
                "every open",
            ),
            ("max_connections", self.max_connections, "every connection"),
            (
                "max_connections_per_source",
                self.max_connections_per_source,
                "every connection",
            ),
        ] {
            if cap == 0 {
                anyhow::bail!(
                    "[limits] {name} = 0 would refuse {what} (there is no \"unlimited\"; leave it out for the default)"
                );
            }
        }
        if !(1..=86_400).contains(&self.send_timeout_secs) {
            anyhow::bail!(
                "[limits] send_timeout_secs = {}: seconds from 1 to 86400 (a day)",
                self.send_timeout_secs
            );
        }
        for (name, rate, burst_name, burst) in [
            (
                "opens_per_sec",
                self.opens_per_sec,
                "open_burst",
                self.open_burst,
            ),
            (
                "requests_per_sec",
                self.requests_per_sec,
                "request_burst",
                self.request_burst,
            ),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                anyhow::bail!("[limits] {name} = {rate}: a rate is a number of 0 or more");
            }
            if !burst.is_finite() || burst < 1.0 {
                anyhow::bail!("[limits] {burst_name} = {burst}: a burst is a number of 1 or more");
            }
        }
        Ok(())
    }
}

fn d_send_timeout_secs() -> u64 {
    SEND_TIMEOUT_SECS
}
fn d_max_connections_per_source() -> usize {
    MAX_CONNECTIONS_PER_SOURCE
}
fn d_max_connections() -> usize {
    MAX_CONNECTIONS
}
fn d_max_sessions() -> usize {
    MAX_SESSIONS
}
fn d_max_sessions_per_client() -> usize {
    MAX_SESSIONS_PER_CLIENT
}
fn d_opens_per_sec() -> f64 {
    OPENS_PER_SEC
}
fn d_open_burst() -> f64 {
    OPEN_BURST
}
fn d_requests_per_sec() -> f64 {
    REQUESTS_PER_SEC
}
fn d_request_burst() -> f64 {
    REQUEST_BURST
}
fn d_max_pending() -> usize {
    MAX_PENDING_OPENS_PER_CLIENT
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: MAX_SESSIONS,
            max_sessions_per_client: MAX_SESSIONS_PER_CLIENT,
            opens_per_sec: OPENS_PER_SEC,
            open_burst: OPEN_BURST,
            requests_per_sec: REQUESTS_PER_SEC,
            request_burst: REQUEST_BURST,
            max_pending_opens_per_client: MAX_PENDING_OPENS_PER_CLIENT,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
            send_timeout_secs: SEND_TIMEOUT_SECS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cap of 0 (often meant as "unlimited") would refuse everything: it
    /// is refused at load, by name.
    #[test]
    fn a_cap_of_zero_is_refused() {
        assert!(LimitsConfig::default().validate().is_ok());
        let zero = LimitsConfig {
            max_connections: 0,
            ..Default::default()
        };
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("max_connections = 0"), "{e}");
        let zero = LimitsConfig {
            max_pending_opens_per_client: 0,
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        let never = LimitsConfig {
            send_timeout_secs: 0,
            ..Default::default()
        };
        let e = never.validate().unwrap_err().to_string();
        assert!(e.contains("send_timeout_secs = 0"), "{e}");
    }
}
