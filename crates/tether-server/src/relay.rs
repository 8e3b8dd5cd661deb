//! Relaying one opened stream: the client side (a CLI stream, a raw
//! WebSocket, a listener's TCP connection) spliced onto the agent stream,
//! with the stream metrics, the end on revocation, and the closing audit
//! line.

use std::fmt::Display;
use std::future::Future;
use std::time::Instant;

use tether_net::splice::{splice_until, ChunkRead, ChunkWrite};
use tether_proto::ResetCode;

use crate::metrics::Metrics;
use crate::open::OpenGuard;

/// Splices a client side onto an agent stream until both ends finish, or
/// the guard's stream must end (revoked, credential expired: RST
/// `forbidden` both ways). `who` and `target` name the stream in the audit
/// line; `who` is only formatted into that line, not spelled out in
/// advance for every connection (a listener connection's name holds two
/// socket addresses).
///
/// Not an `async fn`: the endpoints move straight into the splice, so the
/// relay's future does not also keep them as arguments (it lives as long
/// as the stream, and every idle stream holds one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_relay<'a, CR, CW, AR, AW>(
    metrics: &'a Metrics,
    who: &'a (dyn Display + Sync),
    target: &'a str,
    started: Instant,
    guard: &'a OpenGuard,
    (cr, cw): (CR, CW),
    (ar, aw): (AR, AW),
) -> impl Future<Output = ()> + Send + 'a
where
    CR: ChunkRead + 'a,
    CW: ChunkWrite + 'a,
    AR: ChunkRead + 'a,
    AW: ChunkWrite + 'a,
{
    stream_started(metrics);
    let ended = guard.ended();
    let stop = async move { (ResetCode::Forbidden, ended.await.to_owned()) };
    let splice = splice_until(cr, cw, ar, aw, stop);
    async move {
        let mut report = splice.await;
        report.a_to_b += guard.early_bytes();
        let result = match &report.error {
            None => "closed".to_owned(),
            Some(e) => {
                metrics.error("stream_reset");
                format!("error: {e}")
            }
        };
        stream_ended(
            metrics,
            who,
            target,
            guard,
            (report.a_to_b, report.b_to_a),
            started,
            &result,
        );
    }
}

/// Counts a relayed stream in the stream metrics from its start: pair with
/// [`stream_ended`].
pub(crate) fn stream_started(metrics: &Metrics) {
    metrics.live_streams.inc();
    metrics.streams_total.inc();
}

/// A relayed stream ended: its bytes into the metrics, and its audit line.
pub(crate) fn stream_ended(
    metrics: &Metrics,
    who: &(dyn Display + Sync),
    target: &str,
    guard: &OpenGuard,
    (up, down): (u64, u64),
    started: Instant,
    result: &str,
) {
    metrics.live_streams.dec();
    metrics.add_bytes(up, down);
    let ms = started.elapsed().as_millis() as u64;
    let protocol = guard.protocol().as_str();
    tracing::info!(target: "audit", identity = %who, %target, protocol, decision = "allowed", bytes_up = up, bytes_down = down, duration_ms = ms, %result, "audit");
}
