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

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tether_proto::InlineQueue;

use super::Inbound;

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
            if matches!(item, Inbound::Reset(_)) {
                s.reset_queued = true;
            }
            s.queue.push_back(item);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
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
        tx.send(Inbound::Data(Bytes::from_static(b"b")));
        tx.send(Inbound::Fin);
        drop(tx);
        assert!(matches!(rx.recv().await, Some(Inbound::Data(b)) if b == "a"));
        assert!(matches!(rx.recv().await, Some(Inbound::Data(b)) if b == "b"));
        assert!(matches!(rx.recv().await, Some(Inbound::Fin)));
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
        tx.send(Inbound::Data(Bytes::from_static(b"abc")));
        tx.send(Inbound::Data(Bytes::from_static(b"defg")));
        tx.send(Inbound::Fin);
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
        for i in 0..4096u32 {
            assert!(matches!(rx.recv().await, Some(Inbound::Data(b)) if b[..] == i.to_be_bytes()));
        }
        assert!(matches!(rx.recv().await, Some(Inbound::Reset(_))));
        // Read, the reset no longer counts as waiting.
        assert!(!rx.0.lock().reset_queued);
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
