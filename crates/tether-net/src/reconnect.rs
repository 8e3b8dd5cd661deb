//! How an agent or a client reaches its server, shared by both: which
//! certificate to trust, the token to present, one dial-and-handshake, and
//! the loop that keeps a session up with backoff.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_proto::{Role, SUBPROTOCOL};

use crate::backoff::Backoff;
use crate::session::IncomingStreams;
use crate::transport::tls::{ServerIdentity, ServerTrust};
use crate::transport::ws::{dial_via, DialError};
use crate::{Connection, SessionInfo};

/// A session that lasted this long counts as healthy: backoff starts over.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// How to check the server's certificate, from the `fingerprint` and
/// `ca_file` settings (a pin wins over a CA; neither means system roots).
pub fn server_trust(fingerprint: Option<&String>, ca_file: Option<&PathBuf>) -> ServerTrust {
    match (fingerprint, ca_file) {
        (Some(fp), _) => ServerTrust::Fingerprint(fp.clone()),
        (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
        (None, None) => ServerTrust::SystemRoots,
    }
}

/// The token to present: the contents of `file` (trimmed) when there is
/// one, else `token`. Read per connection, so a rotated file (a re-mounted
/// Kubernetes Secret) is picked up without a restart; when the file cannot
/// be read, `token` is used and a warning logged.
pub fn current_token(token: &str, file: Option<&Path>) -> String {
    match file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                tracing::warn!(file = %f.display(), "cannot read token_file ({e}); using the token read at start");
                token.to_owned()
            }
        },
        None => token.to_owned(),
    }
}

/// Where and how to dial: the endpoint URL, the certificate check and an
/// optional client certificate (agents with mutual TLS).
pub struct Endpoint<'a> {
    /// The full WebSocket URL (`wss://host:port/tether/v1/...`).
    pub url: String,
    /// How to check the server's certificate.
    pub trust: ServerTrust,
    /// A client certificate to present, if any.
    pub identity: Option<&'a ServerIdentity>,
}

/// A session just established: the connection, what the peer said in the
/// handshake, and the streams it opens.
pub type Established = (Connection, SessionInfo, IncomingStreams);

/// Why a session could not be set up: the dial (TCP, TLS, the WebSocket
/// upgrade) or the session's handshake after it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Dialing failed, or the server refused the upgrade.
    #[error("cannot connect: {0}")]
    Dial(#[from] DialError),
    /// The WebSocket is up but the session's handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(tether_proto::SessionError),
}

impl ConnectError {
    /// The HTTP status the server refused the upgrade with, if it did.
    pub fn refused_status(&self) -> Option<u16> {
        match self {
            ConnectError::Dial(DialError::Refused { status, .. }) => Some(*status),
            _ => None,
        }
    }

    /// The replica that refused the upgrade, when it named itself.
    pub fn refused_by(&self) -> Option<&str> {
        match self {
            ConnectError::Dial(DialError::Refused { replica, .. }) => replica.as_deref(),
            _ => None,
        }
    }
}

impl Endpoint<'_> {
    /// Dials the endpoint with `headers` and runs the handshake; the error
    /// says which of the two failed.
    pub async fn connect(
        &self,
        headers: &[(String, String)],
        config: tether_proto::Config,
        label: &str,
    ) -> Result<Established, ConnectError> {
        self.connect_via(None, headers, config, label).await
    }

    /// Like [`Endpoint::connect`], with the TCP connection to `connect_to`
    /// when given (one server replica's own address; TLS is still checked
    /// against the URL's host).
    pub async fn connect_via(
        &self,
        connect_to: Option<std::net::SocketAddr>,
        headers: &[(String, String)],
        config: tether_proto::Config,
        label: &str,
    ) -> Result<Established, ConnectError> {
        let (sink, source) = dial_via(
            &self.url,
            connect_to,
            SUBPROTOCOL,
            headers,
            &self.trust,
            self.identity,
        )
        .await?;
        Connection::start(Role::Initiator, config, sink, source, label)
            .await
            .map_err(ConnectError::Handshake)
    }
}

/// How a session ended, which decides when to dial again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Lost (error, timeout, server gone): back off.
    Lost,
    /// The server drained it (GOAWAY): the next dial comes at once if the
    /// session lasted a second or more (else after the shortest delay: a
    /// server draining every session at once), and the backoff starts over.
    Drained,
    /// Wait this long first (e.g. another agent took our name).
    RetryAfter(Duration),
}

/// Keeps a session up forever: `dial` makes one, `serve` runs it until it
/// ends; between attempts the delay grows, a random point in its upper
/// half (see [`Backoff`]), and starts over after a healthy session.
pub async fn keep_connected<D, DF, S, SF>(server: &str, mut dial: D, mut serve: S)
where
    D: FnMut() -> DF,
    DF: Future<Output = Result<Established, String>>,
    S: FnMut(Established) -> SF,
    SF: Future<Output = SessionEnd>,
{
    let mut backoff = Backoff::default();
    loop {
        // How long the session lasted: zero when the dial failed (a dial
        // that timed out took as long as a healthy session, and reset the
        // backoff: a black-holed server was retried every 10 s for good).
        let mut lasted = Duration::ZERO;
        match dial().await {
            Err(e) => tracing::warn!(%server, "{e}"),
            Ok(established) => {
                let began = tokio::time::Instant::now();
                let end = serve(established).await;
                lasted = began.elapsed();
                match end {
                    SessionEnd::Lost => {}
                    SessionEnd::Drained => {
                        // Drained (GOAWAY): the server asked us to move, so
                        // a fresh session at once, through the load balancer
                        // (unless it drains every session at once: then wait).
                        backoff.reset();
                        if lasted >= Duration::from_secs(1) {
                            continue;
                        }
                    }
                    SessionEnd::RetryAfter(d) => {
                        tokio::time::sleep(d).await;
                        continue;
                    }
                }
            }
        }
        if lasted >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::debug!(?delay, "reconnecting after backoff");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A server that drops SYNs: every dial times out after 10 s, as long
    /// as a healthy session lasts. The retries must still back off.
    #[tokio::test(start_paused = true)]
    async fn dials_that_time_out_still_back_off() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let seen = starts.clone();
        let dial = move || {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(tokio::time::Instant::now());
                tokio::time::sleep(Duration::from_secs(10)).await;
                Err::<Established, _>("cannot connect: timed out".to_owned())
            }
        };
        let serve = |_: Established| async { SessionEnd::Lost };
        let run = keep_connected("test", dial, serve);
        let _ = tokio::time::timeout(Duration::from_secs(400), run).await;
        let starts = starts.lock().unwrap();
        // The waits between a dial's end and the next one grow past the
        // first delays (200 ms, doubling) instead of starting over.
        let waits: Vec<Duration> = starts
            .windows(2)
            .map(|w| w[1] - w[0] - Duration::from_secs(10))
            .collect();
        assert!(waits.len() >= 5, "{waits:?}");
        assert!(
            waits.last().is_some_and(|w| *w >= Duration::from_secs(8)),
            "{waits:?}"
        );
    }
}
