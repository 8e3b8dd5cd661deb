//! Per-stream state kept by a [`crate::Session`].

use bytes::Bytes;
use std::time::Instant;

use crate::queue::InlineQueue;

/// What each queued chunk costs the send buffers on top of its bytes: about
/// what its queue entry and its allocation take. A writer of one-byte
/// chunks then queues a few thousand within the buffers, not millions of
/// entries (each in an allocation of its own).
pub const CHUNK_COST: usize = 64;

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// We sent OPEN and wait for OPEN_OK / OPEN_ERR.
    Opening,
    /// The peer sent OPEN; our application has not accepted or rejected it yet.
    PendingAccept,
    /// Both sides may exchange data.
    Open,
}

/// One stream's flow-control and close bookkeeping.
#[derive(Debug)]
pub(crate) struct Stream {
    pub phase: Phase,
    /// When a pending open gives up (Opening only).
    pub open_deadline: Option<Instant>,

    // --- sending ---
    /// Bytes the peer still lets us send (granted minus accepted from the app).
    pub send_credit: u64,
    /// Data accepted from the application, not yet framed.
    pub send_queue: InlineQueue<Bytes>,
    /// Bytes in `send_queue` (bounded by the local send buffer).
    pub queued: usize,
    /// The application finished its side; a FIN follows the queued data.
    pub fin_queued: bool,
    /// The FIN went out.
    pub fin_sent: bool,
    /// The stream is in the session's round-robin queue.
    pub in_ready: bool,
    /// Its bytes come from another session in whole messages (a relay):
    /// the sender batches its messages even while it sends alone
    /// ([`crate::Session::batch_sends`]).
    pub relayed: bool,

    // --- receiving ---
    /// Bytes the peer may still send before exceeding the window we granted.
    pub recv_remaining: u64,
    /// Bytes the application consumed that we have not granted back yet.
    pub recv_unacked: u64,
    /// The peer sent FIN.
    pub fin_received: bool,
    /// Current receive window (grows by auto-tuning).
    pub recv_window: u32,
    /// When the last WINDOW_UPDATE for this stream was queued.
    pub last_update_at: Option<Instant>,

    /// Last frame seen or sent for this stream (drives the half-close linger).
    pub last_activity: Instant,
    /// This stream's entry among the session's linger checks (set once it
    /// is half-closed): the instant it was filed under, at or before
    /// `last_activity + linger`.
    pub linger_check: Option<Instant>,

    /// Bytes the application wrote (accepted into the send queue).
    pub bytes_sent: u64,
    /// Bytes of DATA the peer sent on it.
    pub bytes_received: u64,
}

impl Stream {
    pub(crate) fn new(phase: Phase, send_credit: u32, recv_window: u32, now: Instant) -> Self {
        Stream {
            phase,
            open_deadline: None,
            send_credit: u64::from(send_credit),
            send_queue: InlineQueue::new(),
            queued: 0,
            fin_queued: false,
            fin_sent: false,
            in_ready: false,
            relayed: false,
            recv_remaining: u64::from(recv_window),
            recv_unacked: 0,
            recv_window,
            last_update_at: None,
            fin_received: false,
            last_activity: now,
            linger_check: None,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// Both directions are finished and everything went out.
    pub(crate) fn is_done(&self) -> bool {
        self.fin_sent && self.fin_received
    }

    /// Takes `chunk` into the send queue, charged to the credit (the caller
    /// checked there is enough) and, with [`CHUNK_COST`], to the send
    /// buffer; returns that charge, for the session's queued total.
    pub(crate) fn enqueue(&mut self, chunk: Bytes) -> usize {
        let n = chunk.len();
        self.send_credit -= n as u64;
        self.bytes_sent += n as u64;
        self.queued += n + CHUNK_COST;
        self.send_queue.push_back(chunk);
        n + CHUNK_COST
    }
}
