//! Relaying one opened stream: the client side (a CLI stream, a raw
//! WebSocket, a listener's TCP connection) spliced onto the agent stream,
//! with the stream metrics, the end on revocation, and the closing audit
//! line.

use std::time::Instant;

use tether_net::splice::{splice_until, ChunkRead, ChunkWrite};
use tether_proto::ResetCode;

use crate::metrics::Metrics;
use crate::open::OpenGuard;

/// Splices a client side onto an agent stream until both ends finish, or
/// the guard's stream must end (revoked, credential expired: RST
/// `forbidden` both ways). `who` and `target` name the stream in the audit
/// line.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_relay<CR, CW, AR, AW>(
    metrics: &Metrics,
    who: &str,
    target: &str,
    started: Instant,
    guard: &OpenGuard,
    (cr, cw): (CR, CW),
    (ar, aw): (AR, AW),
) where
    CR: ChunkRead,
    CW: ChunkWrite,
    AR: ChunkRead,
    AW: ChunkWrite,
{
    metrics.live_streams.inc();
    metrics.streams_total.inc();
    let ended = guard.ended();
    let stop = async move { (ResetCode::Forbidden, ended.await.to_owned()) };
    let mut report = splice_until(cr, cw, ar, aw, stop).await;
    report.a_to_b += guard.early_bytes();
    metrics.live_streams.dec();
    metrics.add_bytes(report.a_to_b, report.b_to_a);
    let ms = started.elapsed().as_millis() as u64;
    let protocol = guard.protocol().as_str();
    let result = match &report.error {
        None => "closed".to_owned(),
        Some(e) => {
            metrics.error("stream_reset");
            format!("error: {e}")
        }
    };
    tracing::info!(target: "audit", identity = %who, %target, protocol, decision = "allowed", bytes_up = report.a_to_b, bytes_down = report.b_to_a, duration_ms = ms, %result, "audit");
}
