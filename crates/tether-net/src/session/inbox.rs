//! A stream's inbox: what the reader task hands one stream (data, FIN,
//! reset), queued until the stream's reader takes it.
//!
//! One sender (the session's route for the stream), one receiver (the
//! stream's reading half), no bound of its own: the session's flow-control
//! window bounds what can arrive. A tokio unbounded channel does the same
//! job but allocates a block of 32 slots and a cache-padded channel up front,
//! about 2 KiB for every stream whether it ever carries a byte; an idle
//! stream passes through four of them across client, server and agent. This
//! is one small allocation, and its queue allocates only when a second item
//! waits behind the first.
//!
//! A small chunk is added to the chunk queued last instead of taking a
//! place of its own: a peer sending its window as one-byte DATA frames would
//! otherwise make each byte a queue entry and an allocation (tens of bytes
//! of memory per byte of window, [`MERGE_BELOW`]).

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tether_proto::InlineQueue;

use super::Inbound;

/// A chunk shorter than this is added to the chunk queued before it, while
/// that one is shorter than [`MERGE_UP_TO`]. Every queued chunk but the last
/// is then at least this long, so the queue's own cost (a slot, an
/// allocation's header) stays a few percent of the bytes it holds.
const MERGE_BELOW: usize = 4096;

/// How long a chunk grows by merging (the copy of a chunk that was a slice
/// of a shared buffer is at most this).
const MERGE_UP_TO: usize = 16 * 1024;

/// Creates a connected sender and receiver.
pub(super) fn inbox() -> (InboxTx, InboxRx) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State {
            queue: InlineQueue::new(),
            reset_queued: false,
            sender_gone: false,
            receiver_gone: false,
            waker: None,
        }),
    });
    (InboxTx(slot.clone()), InboxRx(slot))
}

struct Slot {
    state: Mutex<State>,
}

struct State {
    queue: InlineQueue<Inbound>,
    /// A reset waits in `queue`: what a pending open watches for, kept here
    /// so that early data queued in front of it is not searched per wake-up.
    /// A flag, not a count: a stream gets at most one reset (its route is
    /// gone after it), and nothing is queued behind one.
    reset_queued: bool,
    sender_gone: bool,
    receiver_gone: bool,
    waker: Option<Waker>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here can panic while holding it; keep serving anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side (held by the session's route for the stream). Dropping
/// it tells the receiver that nothing more will come.
pub(super) struct InboxTx(Arc<Slot>);

impl InboxTx {
    /// Queues `item` and wakes the receiver; dropped when the receiver is
    /// gone.
    pub(super) fn send(&self, item: Inbound) {
        let waker = {
            let mut s = self.0.lock();
            if s.receiver_gone {
                return;
            }
            match item {
                Inbound::Data(chunk) if chunk.len() < MERGE_BELOW => match s.queue.back_mut() {
                    Some(Inbound::Data(last)) if last.len() < MERGE_UP_TO => append(last, &chunk),
                    _ => s.queue.push_back(Inbound::Data(chunk)),
                },
                Inbound::Reset(_) => {
                    s.reset_queued = true;
                    s.queue.push_back(item);
                }
                item => s.queue.push_back(item),
            }
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Adds `more` to the end of `last`: in place when `last` owns its buffer
/// (a chunk merged before, or copied out of its message's), else copied
/// once into a buffer of its own.
fn append(last: &mut Bytes, more: &[u8]) {
    let mut grown = match std::mem::take(last).try_into_mut() {
        Ok(owned) => owned,
        Err(shared) => {
            let mut b = BytesMut::with_capacity(shared.len() + more.len());
            b.extend_from_slice(&shared);
            b
        }
    };
    grown.extend_from_slice(more);
    *last = grown.freeze();
}

impl Drop for InboxTx {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.lock();
            s.sender_gone = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The receiving side (held by the stream's reading half).
pub(super) struct InboxRx(Arc<Slot>);

impl InboxRx {
    /// A receiver whose sender is already gone (it yields nothing).
    pub(super) fn closed() -> InboxRx {
        inbox().1
    }

    /// The next item; `None` once the sender is gone and the queue is empty.
    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        let mut s = self.0.lock();
        if let Some(item) = s.queue.pop_front() {
            if matches!(item, Inbound::Reset(_)) {
                s.reset_queued = false;
            }
            return Poll::Ready(Some(item));
        }
        if s.sender_gone {
            return Poll::Ready(None);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next item if it is data already queued; FIN, a reset and an
    /// empty queue are left for [`InboxRx::poll_recv`].
    pub(super) fn try_recv_data(&mut self) -> Option<Bytes> {
        let mut s = self.0.lock();
        if !matches!(s.queue.front(), Some(Inbound::Data(_))) {
            return None;
        }
        match s.queue.pop_front() {
            Some(Inbound::Data(b)) => Some(b),
            _ => None,
        }
    }

    /// Waits for the next item (cancel-safe: nothing is taken until it is
    /// returned).
    #[cfg(test)]
    pub(super) async fn recv(&mut self) -> Option<Inbound> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Waits until a reset is queued or the sender is gone, taking nothing:
    /// data and FIN queued before (early data) stay for the reader.
    pub(super) async fn reset_or_gone(&mut self) {
        poll_fn(|cx| {
            let mut s = self.0.lock();
            if s.sender_gone || s.reset_queued {
                return Poll::Ready(());
            }
            match &mut s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Takes the data at the front of the queue, up to `max` bytes, without
    /// waiting (empty when none is there). What is left of a chunk stays at
    /// the front, so nothing is reordered.
    pub(super) fn take_front_data(&mut self, max: usize) -> Vec<Bytes> {
        let mut s = self.0.lock();
        let mut taken = Vec::new();
        let mut left = max;
        while left > 0 {
            let Some(Inbound::Data(chunk)) = s.queue.front_mut() else {
                break;
            };
            if chunk.len() <= left {
                left -= chunk.len();
                if let Some(Inbound::Data(c)) = s.queue.pop_front() {
                    taken.push(c);
                }
            } else {
                taken.push(chunk.split_to(left));
                left = 0;
            }
        }
        taken
    }
}

impl Drop for InboxRx {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.receiver_gone = true;
        s.waker = None;
        // What was queued is nobody's now; let it go at once.
        s.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_then_none_when_the_sender_is_gone() {
        let (tx, mut rx) = inbox();
        tx.send(Inbound::Data(Bytes::from_static(b"a")));
        tx.send(Inbound::Fin);
        tx.send(Inbound::Data(Bytes::from_static(b"b")));
        drop(tx);
        assert!(matches!(rx.recv().await, Some(Inbound::Data(b)) if b == "a"));
        assert!(matches!(rx.recv().await, Some(Inbound::Fin)));
        assert!(matches!(rx.recv().await, Some(Inbound::Data(b)) if b == "b"));
        assert!(rx.recv().await.is_none());
        assert!(InboxRx::closed().recv().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_sender_leaving() {
        let (tx, mut rx) = inbox();
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await; // the reader is waiting now
        tx.send(Inbound::Fin);
        tokio::task::yield_now().await;
        drop(tx);
        let (first, second) = reader.await.unwrap();
        assert!(matches!(first, Some(Inbound::Fin)));
        assert!(second.is_none());
    }

    #[test]
    fn front_data_is_taken_up_to_the_limit_and_the_rest_keeps_its_place() {
        let (tx, mut rx) = inbox();
        tx.send(Inbound::Data(Bytes::from(vec![b'x'; MERGE_UP_TO])));
        tx.send(Inbound::Data(Bytes::from_static(b"abc")));
        tx.send(Inbound::Data(Bytes::from_static(b"defg")));
        tx.send(Inbound::Fin);
        assert_eq!(
            rx.take_front_data(MERGE_UP_TO).concat(),
            vec![b'x'; MERGE_UP_TO]
        );
        let taken = rx.take_front_data(5);
        assert_eq!(taken.concat(), b"abcde");
        assert!(matches!(rx.0.lock().queue.front(), Some(Inbound::Data(b)) if b == "fg"));
        assert_eq!(rx.take_front_data(10).concat(), b"fg");
        // A FIN at the front stops the taking and stays.
        assert!(rx.take_front_data(10).is_empty());
        assert!(matches!(rx.0.lock().queue.front(), Some(Inbound::Fin)));
    }

    #[tokio::test]
    async fn waiting_for_a_reset_takes_no_data() {
        let (tx, mut rx) = inbox();
        tx.send(Inbound::Data(Bytes::from_static(b"early")));
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), rx.reset_or_gone()).await;
        assert!(waited.is_err(), "data alone is no reset");
        drop(tx);
        rx.reset_or_gone().await;
        assert!(matches!(rx.recv().await, Some(Inbound::Data(b)) if b == "early"));
    }

    #[tokio::test]
    async fn a_reset_behind_early_data_ends_the_wait_and_keeps_the_order() {
        let (tx, mut rx) = inbox();
        for i in 0..4096u32 {
            tx.send(Inbound::Data(Bytes::from(i.to_be_bytes().to_vec())));
        }
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), rx.reset_or_gone()).await;
        assert!(waited.is_err(), "data alone is no reset");
        tx.send(Inbound::Reset(crate::StreamError::Reset {
            code: tether_proto::ResetCode::Cancel,
            reason: "gave up".into(),
            remote: true,
        }));
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.reset_or_gone())
            .await
            .expect("a queued reset ends the wait");
        let mut early = Vec::new();
        loop {
            match rx.recv().await {
                Some(Inbound::Data(b)) => early.extend_from_slice(&b),
                Some(Inbound::Reset(_)) => break,
                other => panic!("{}", other.is_some()),
            }
        }
        let sent: Vec<u8> = (0..4096u32).flat_map(u32::to_be_bytes).collect();
        assert_eq!(early, sent);
        // Read, the reset no longer counts as waiting.
        assert!(!rx.0.lock().reset_queued);
    }

    /// A window's worth of one-byte chunks takes a few queue places, not
    /// one per byte, and arrives whole and in order.
    #[test]
    fn small_chunks_share_queue_places() {
        let (tx, mut rx) = inbox();
        let window = 256 * 1024;
        for i in 0..window {
            tx.send(Inbound::Data(Bytes::copy_from_slice(&[i as u8])));
        }
        let places = rx.0.lock().queue.len();
        assert!(places <= window / MERGE_BELOW, "{places} queue places");
        let mut got = Vec::new();
        while let Some(b) = rx.try_recv_data() {
            got.extend_from_slice(&b);
        }
        assert_eq!(got.len(), window);
        assert!(got.iter().enumerate().all(|(i, b)| *b == i as u8));
        // A large chunk keeps its own place (and is not copied).
        let large = Bytes::from(vec![1u8; MERGE_BELOW]);
        tx.send(Inbound::Data(Bytes::from_static(b"a")));
        tx.send(Inbound::Data(large.clone()));
        assert_eq!(rx.try_recv_data().as_deref(), Some(&b"a"[..]));
        assert_eq!(rx.try_recv_data().map(|b| b.as_ptr()), Some(large.as_ptr()));
    }

    #[test]
    fn sends_to_a_dropped_receiver_are_not_kept() {
        let (tx, rx) = inbox();
        tx.send(Inbound::Fin);
        drop(rx);
        tx.send(Inbound::Data(Bytes::from(vec![0u8; 1024])));
        assert!(tx.0.lock().queue.is_empty());
    }
}
