//! A priority queue with credit-based flow control on bytes in flight.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use crate::Priority;

/// One queued item, ordered by `(priority, Reverse(seq))` so the heap's maximum is the
/// highest priority, oldest first among equals.
#[derive(Debug)]
struct Entry<T> {
    priority: Priority,
    seq: u64,
    bytes: u64,
    item: T,
}

impl<T> Entry<T> {
    fn rank(&self) -> (Priority, Reverse<u64>) {
        (self.priority, Reverse(self.seq))
    }
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.rank() == other.rank()
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// The queue of one pipeline stage: items leave by priority, and only while the bytes in
/// flight stay within a credit.
///
/// - **Order.** [`pop`](Self::pop) takes the highest [`Priority`], first in first out among
///   equal priorities. Push and pop are `O(log n)`.
/// - **Credit.** An item may leave if `in_flight + bytes <= credit`, or if nothing is in flight
///   at all: an item larger than the whole credit still runs, alone, so nothing starves. Its
///   bytes count as in flight until the caller hands them back with
///   [`release`](Self::release).
/// - **Strict.** If the head does not fit, nothing leaves: a smaller item of lower priority
///   does not overtake it. This is what keeps a large low-priority tensor from delaying a
///   high-priority one for long, and it keeps the head from waiting forever behind a stream
///   of small items.
///
/// A credit of `u64::MAX` turns flow control off. Zero-byte items take no credit and always
/// fit.
///
/// # Examples
///
/// ```
/// use bps_scheduler::{CreditQueue, Priority};
///
/// let mut q = CreditQueue::new(100);
/// q.push("low", Priority(0), 60);
/// q.push("high", Priority(9), 60);
/// q.push("also-low", Priority(0), 10);
///
/// assert_eq!(q.pop(), Some(("high", 60)));
/// assert_eq!(q.pop(), None); // "low" does not fit; "also-low" may not overtake it
/// q.release(60);
/// assert_eq!(q.pop(), Some(("low", 60)));
/// assert_eq!(q.pop(), Some(("also-low", 10)));
/// assert_eq!(q.in_flight(), 70);
/// ```
#[derive(Debug)]
pub struct CreditQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    next_seq: u64,
    credit: u64,
    in_flight: u64,
}

impl<T> CreditQueue<T> {
    /// An empty queue allowing at most `credit_bytes` in flight; `u64::MAX` means unlimited.
    pub fn new(credit_bytes: u64) -> Self {
        CreditQueue {
            heap: BinaryHeap::new(),
            next_seq: 0,
            credit: credit_bytes,
            in_flight: 0,
        }
    }

    /// An empty queue without flow control (a credit of `u64::MAX`).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// Queue `item`, which will occupy `bytes` of credit while in flight.
    pub fn push(&mut self, item: T, priority: Priority, bytes: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Entry {
            priority,
            seq,
            bytes,
            item,
        });
    }

    /// Take the highest-priority item (FIFO among equal priorities) if it fits in the credit,
    /// together with its bytes, which now count as in flight.
    ///
    /// Returns `None` if the queue is empty or the head does not fit: `in_flight + bytes` would
    /// exceed the credit while something else is in flight. Lower-priority items never bypass
    /// a head that does not fit.
    pub fn pop(&mut self) -> Option<(T, u64)> {
        let head = self.heap.peek()?;
        if !self.fits(head.bytes) {
            return None;
        }
        let entry = self.heap.pop()?;
        self.in_flight = self.in_flight.saturating_add(entry.bytes);
        Some((entry.item, entry.bytes))
    }

    /// The item [`pop`](Self::pop) would consider next, with its priority and bytes, whether or
    /// not it fits in the credit now.
    pub fn peek(&self) -> Option<(&T, Priority, u64)> {
        self.heap.peek().map(|e| (&e.item, e.priority, e.bytes))
    }

    /// Whether [`pop`](Self::pop) would return an item now.
    pub fn can_pop(&self) -> bool {
        self.heap.peek().is_some_and(|e| self.fits(e.bytes))
    }

    /// Hand back the credit of a finished item.
    ///
    /// Releasing more than is in flight is a logic error in the caller: it panics in debug
    /// builds and saturates at 0 in release builds.
    pub fn release(&mut self, bytes: u64) {
        debug_assert!(
            bytes <= self.in_flight,
            "CreditQueue::release({bytes}) with only {} bytes in flight",
            self.in_flight
        );
        self.in_flight = self.in_flight.saturating_sub(bytes);
    }

    /// Bytes popped and not yet released.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// The most bytes allowed in flight (`u64::MAX`: unlimited).
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// Number of queued items (items in flight are not counted).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no items are queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Remove and return every queued item, in the order they would have been popped (used
    /// when a peer dies, to fail them all). Bytes in flight are untouched: the caller still
    /// releases the items it popped earlier.
    pub fn drain(&mut self) -> Vec<T> {
        let mut entries = std::mem::take(&mut self.heap).into_sorted_vec();
        entries.reverse();
        entries.into_iter().map(|e| e.item).collect()
    }

    fn fits(&self, bytes: u64) -> bool {
        self.in_flight == 0 || self.in_flight.saturating_add(bytes) <= self.credit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_queue_pops_none() {
        let mut q: CreditQueue<u32> = CreditQueue::new(10);
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
        assert_eq!(q.pop(), None);
        assert!(!q.can_pop());
        assert_eq!(q.peek(), None);
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = CreditQueue::unlimited();
        q.push('a', Priority(0), 1);
        q.push('b', Priority(5), 1);
        q.push('c', Priority(0), 1);
        q.push('d', Priority(5), 1);
        q.push('e', Priority(-3), 1);
        let order: Vec<char> = std::iter::from_fn(|| q.pop().map(|(x, _)| x)).collect();
        assert_eq!(order, ['b', 'd', 'a', 'c', 'e']);
        assert_eq!(q.in_flight(), 5);
    }

    #[test]
    fn credit_limits_bytes_in_flight() {
        let mut q = CreditQueue::new(10);
        for i in 0..4 {
            q.push(i, Priority(0), 4);
        }
        assert_eq!(q.pop(), Some((0, 4)));
        assert_eq!(q.pop(), Some((1, 4)));
        assert_eq!(q.pop(), None);
        assert_eq!(q.in_flight(), 8);
        q.release(4);
        assert_eq!(q.pop(), Some((2, 4)));
        assert_eq!(q.pop(), None);
        q.release(8);
        assert_eq!(q.pop(), Some((3, 4)));
        assert_eq!(q.in_flight(), 4);
    }

    #[test]
    fn exact_fit_is_allowed() {
        let mut q = CreditQueue::new(10);
        q.push(0, Priority(0), 6);
        q.push(1, Priority(0), 4);
        assert!(q.pop().is_some());
        assert!(q.pop().is_some());
        assert_eq!(q.in_flight(), 10);
    }

    #[test]
    fn oversized_item_runs_alone() {
        let mut q = CreditQueue::new(10);
        q.push("small", Priority(1), 2);
        q.push("huge", Priority(0), 100);
        assert_eq!(q.pop(), Some(("small", 2)));
        assert_eq!(q.pop(), None, "huge must wait for the wire to be empty");
        q.release(2);
        assert_eq!(q.pop(), Some(("huge", 100)));
        assert_eq!(q.in_flight(), 100);
        q.push("next", Priority(0), 1);
        assert_eq!(q.pop(), None, "nothing joins an oversized item");
        q.release(100);
        assert_eq!(q.pop(), Some(("next", 1)));
    }

    #[test]
    fn strict_head_is_not_bypassed() {
        let mut q = CreditQueue::new(10);
        q.push("first", Priority(0), 8);
        assert!(q.pop().is_some());
        q.push("big-high", Priority(9), 8);
        q.push("small-low", Priority(1), 1);
        assert!(!q.can_pop());
        assert_eq!(q.pop(), None);
        assert_eq!(q.peek(), Some((&"big-high", Priority(9), 8)));
        q.release(8);
        assert_eq!(q.pop(), Some(("big-high", 8)));
        assert_eq!(q.pop(), Some(("small-low", 1)));
    }

    #[test]
    fn zero_byte_items_always_fit() {
        let mut q = CreditQueue::new(0);
        q.push(1, Priority(0), 0);
        q.push(2, Priority(0), 0);
        assert_eq!(q.pop(), Some((1, 0)));
        assert_eq!(q.pop(), Some((2, 0)));
    }

    #[test]
    fn unlimited_credit_never_blocks() {
        let mut q = CreditQueue::unlimited();
        assert_eq!(q.credit(), u64::MAX);
        q.push(0, Priority(0), u64::MAX / 2);
        q.push(1, Priority(0), u64::MAX / 2);
        q.push(2, Priority(0), u64::MAX);
        assert!(q.pop().is_some());
        assert!(q.pop().is_some());
        assert!(q.pop().is_some());
    }

    #[test]
    fn drain_returns_queued_items_in_pop_order_and_keeps_in_flight() {
        let mut q = CreditQueue::new(5);
        q.push('x', Priority(0), 5);
        assert!(q.pop().is_some());
        q.push('a', Priority(0), 1);
        q.push('b', Priority(3), 1);
        q.push('c', Priority(0), 1);
        assert_eq!(q.drain(), ['b', 'a', 'c']);
        assert!(q.is_empty());
        assert_eq!(q.in_flight(), 5);
        q.release(5);
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "bytes in flight"))]
    fn over_release_is_a_logic_error() {
        let mut q: CreditQueue<()> = CreditQueue::new(5);
        q.release(1);
        // Release builds saturate.
        assert_eq!(q.in_flight(), 0);
    }
}
