//! [`InlineQueue`]: the per-stream FIFO of byte chunks.

use std::collections::VecDeque;

/// Room a queue keeps once it is empty again; more, left by a burst, is
/// given back.
const KEPT_CAPACITY: usize = 64;

/// A first-in, first-out queue that keeps its front item inline.
///
/// Every stream has queues (chunks to send, chunks received and not yet
/// read), and most of the time each holds one item or none: an interactive
/// stream's message waits alone, and an idle stream's queue is empty. A
/// `VecDeque` allocates room for four items on its first push and keeps it
/// for the stream's life; this allocates only when a second item waits
/// behind the first (a bulk transfer), so an idle stream holds no queue
/// memory at all.
#[derive(Debug)]
pub struct InlineQueue<T> {
    /// The front item; `None` only when the queue is empty.
    head: Option<T>,
    /// The items behind the front one.
    rest: VecDeque<T>,
}

impl<T> Default for InlineQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> InlineQueue<T> {
    /// An empty queue (allocates nothing).
    pub const fn new() -> Self {
        InlineQueue {
            head: None,
            rest: VecDeque::new(),
        }
    }

    /// Whether the queue holds nothing.
    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// How many items it holds.
    pub fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    /// Appends `item` at the back.
    pub fn push_back(&mut self, item: T) {
        if self.head.is_none() {
            self.head = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    /// Removes and returns the front item.
    pub fn pop_front(&mut self) -> Option<T> {
        let item = self.head.take()?;
        self.head = self.rest.pop_front();
        if self.head.is_none() && self.rest.capacity() > KEPT_CAPACITY {
            // A burst is over: its room goes, not kept for the queue's life.
            self.rest = VecDeque::new();
        }
        Some(item)
    }

    /// The front item.
    pub fn front(&self) -> Option<&T> {
        self.head.as_ref()
    }

    /// The front item, to change in place.
    pub fn front_mut(&mut self) -> Option<&mut T> {
        self.head.as_mut()
    }

    /// The last item, mutable (to add to it).
    pub fn back_mut(&mut self) -> Option<&mut T> {
        match self.rest.back_mut() {
            Some(last) => Some(last),
            None => self.head.as_mut(),
        }
    }

    /// The items, front to back.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.head.iter().chain(self.rest.iter())
    }

    /// Drops every item and frees the queue's memory.
    pub fn clear(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::{InlineQueue, KEPT_CAPACITY};

    #[test]
    fn keeps_order_across_the_inline_slot() {
        let mut q = InlineQueue::new();
        assert!(q.is_empty());
        assert_eq!(q.pop_front(), None);
        q.push_back(1);
        assert_eq!(q.front(), Some(&1));
        q.push_back(2);
        q.push_back(3);
        assert_eq!(q.len(), 3);
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(q.pop_front(), Some(1));
        q.push_back(4);
        if let Some(front) = q.front_mut() {
            *front = 20;
        }
        if let Some(back) = q.back_mut() {
            *back += 40;
        }
        assert_eq!(q.pop_front(), Some(20));
        assert_eq!(q.pop_front(), Some(3));
        assert_eq!(q.pop_front(), Some(44));
        assert_eq!(q.pop_front(), None);
        assert!(q.is_empty());
        q.push_back(5);
        q.push_back(6);
        q.clear();
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn the_room_of_a_burst_is_given_back_once_empty() {
        let mut q = InlineQueue::new();
        for i in 0..10_000 {
            q.push_back(i);
        }
        while q.len() > 1 {
            q.pop_front();
        }
        assert!(q.rest.capacity() >= 10_000 - 1);
        assert_eq!(q.pop_front(), Some(9_999));
        assert!(q.rest.capacity() <= KEPT_CAPACITY);
    }

    #[test]
    fn one_item_at_a_time_never_allocates_the_rest() {
        let mut q = InlineQueue::new();
        for i in 0..100 {
            q.push_back(i);
            assert_eq!(q.pop_front(), Some(i));
        }
        assert_eq!(q.rest.capacity(), 0);
    }
}
