//! TCP listeners: an accept queue sized for bursts, `TCP_NODELAY` for what
//! they accept, and an accept loop that waits out a failing accept.
//!
//! `TcpListener::bind` (tokio, like the standard library) asks the kernel
//! for a queue of 128 connections not yet accepted. A browser opening a page,
//! a connection pool starting or a load balancer's health checks arrive in
//! bursts of hundreds: past 128 the kernel drops SYNs (the client retries
//! after a second) and may reset a connection whose handshake it had half
//! completed. Every listener tether opens for traffic (the server's port, its
//! `[[listener]]`s, the CLI's forwards and proxy) asks for [`BACKLOG`]; the
//! kernel caps it at `net.core.somaxconn`.
//!
//! Tether's traffic is request and response, so every connection it carries
//! has `TCP_NODELAY` (no Nagle wait for the rest of a small write). Linux
//! gives an accepted socket the listener's setting: set once on the
//! listener, it saves a system call per accepted connection, which
//! [`tune_accepted`] sets only on systems that do not inherit it.
//!
//! Every connection they accept has TCP keepalive too
//! ([`crate::keepalive`]), inherited from the listener in the same way: a
//! browser that vanished behind a raw WebSocket, a forwarded connection whose
//! laptop was closed, frees its stream and its limits' slots in about 90 s.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The accept queue tether asks for.
pub const BACKLOG: u32 = 4096;

/// Binds `addr` (with `SO_REUSEADDR`, like `TcpListener::bind`) and listens
/// with a [`BACKLOG`]-deep accept queue; the connections it accepts have
/// `TCP_NODELAY` and TCP keepalive (with [`tune_accepted`] called on each).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_nodelay(true)?;
    crate::keepalive::keep_alive(&sock);
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

/// How long [`accept`] waits after a failed accept before the next try.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The next connection on `listener`. A failed accept (out of file
/// descriptors, most likely: it fails again at once while nothing closes)
/// is logged and retried after [`ACCEPT_BACKOFF`] instead of in a loop that
/// would take a core from the connections being served. An error that
/// belongs to one connection (it was reset while queued: macOS and the BSDs
/// report it at accept) is skipped at once, or a peer sending resets could
/// hold the listener still. Cancel-safe: a connection is never accepted and
/// then dropped.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) if one_connections_error(&e) => {
                tracing::debug!("accept skipped a connection that failed in the queue: {e}");
            }
            Err(e) => {
                let listen = listener
                    .local_addr()
                    .map_or_else(|_| "?".to_owned(), |a| a.to_string());
                tracing::warn!(%listen, "accept failed: {e}; trying again in 100 ms");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Whether a failed accept concerns only the connection it would have
/// returned, not the listener or the process.
fn one_connections_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Gives a connection accepted from a [`bind`] listener `TCP_NODELAY` and
/// keepalive where the kernel did not copy them from the listener (on Linux
/// it did: nothing to do). A failure is ignored: the connection works, only
/// less promptly.
pub fn tune_accepted(tcp: &TcpStream) {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        let _ = tcp.set_nodelay(true);
        crate::keepalive::keep_alive(tcp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_beyond_128_waits_in_the_queue() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        // 300 handshakes complete without a single accept: they wait in
        // the queue (with the default 128, the rest would be dropped and
        // retried a second later).
        let mut conns = Vec::new();
        for _ in 0..300 {
            let c = tokio::time::timeout(
                std::time::Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .expect("connects without waiting for a SYN retry")
            .unwrap();
            conns.push(c);
        }
        for _ in 0..300 {
            l.accept().await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_accepted_connection_has_nodelay_and_keepalive_without_being_told() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        tune_accepted(&accepted);
        assert!(
            accepted.nodelay().unwrap(),
            "the listener's TCP_NODELAY was not inherited"
        );
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.keepalive().unwrap(), "no keepalive on the connection");
        assert_eq!(
            sock.tcp_keepalive_time().unwrap(),
            crate::keepalive::KEEPALIVE.0
        );
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            crate::keepalive::KEEPALIVE.1
        );
    }
}
