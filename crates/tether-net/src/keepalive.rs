//! TCP keepalive for the connections tether carries.
//!
//! A peer that vanishes without a FIN or RST (a laptop closed, a node lost,
//! a firewall that starts dropping) leaves a quiet connection open for the
//! kernel's default two hours, and with it whatever the connection holds: a
//! relayed stream, a slot of its client's limits, an agent's service
//! socket. With [`KEEPALIVE`], such a connection fails in about 90 s.
//! Busy connections send no probes; an idle one sends one small probe a
//! minute.

use std::time::Duration;

/// Silence after which probes start, the time between probes, and how many
/// go unanswered before the connection is given up.
pub const KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(60), Duration::from_secs(10), 3);

/// Turns [`KEEPALIVE`] on for a socket: a connection, or a listener (Linux
/// copies the setting into every connection it accepts). Best effort: a
/// failure costs only the early notice, and is logged at debug level.
pub fn keep_alive<'s, S>(socket: &'s S)
where
    socket2::SockRef<'s>: From<&'s S>,
{
    let (time, interval, retries) = KEEPALIVE;
    let ka = socket2::TcpKeepalive::new()
        .with_time(time)
        .with_interval(interval)
        .with_retries(retries);
    if let Err(e) = socket2::SockRef::from(socket).set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
}
