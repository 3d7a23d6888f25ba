//! The lock-free completion queue: how the runtime tells the framework that an asynchronous
//! operation (a `push_pull` of a tensor) finished.
//!
//! [`CompletionQueue::register`] makes one shared *slot* per operation (its only allocation) and
//! returns its two ends: a [`Handle`] for the framework (clonable; poll it with
//! [`Handle::status`], block with [`Handle::wait`] / [`Handle::wait_timeout`]) and a
//! [`Completer`] for the runtime (exactly one; [`Completer::complete`] consumes it, dropping it
//! fails the operation with [`Abandoned`] so nobody waits forever). If the queue was made with
//! `events = true`, each completed slot is also queued once, and [`CompletionQueue::try_drain`]
//! hands the completed operations to one consumer as a batch.
//!
//! ```
//! use bps_transport::cq::{Abandoned, CompletionQueue, Status};
//!
//! #[derive(Debug)]
//! struct MyError(&'static str);
//! impl From<Abandoned> for MyError {
//!     fn from(_: Abandoned) -> Self { MyError("abandoned") }
//! }
//!
//! let cq = CompletionQueue::<MyError>::new(true);
//! let (handle, completer) = cq.register(42);
//! assert_eq!(handle.status(), Status::Pending);
//! std::thread::spawn(move || completer.complete(Ok(())));
//! assert!(handle.wait().is_ok());
//! let mut done = Vec::new();
//! while done.is_empty() { cq.try_drain(&mut done); } // the event may trail wait() by a moment
//! assert_eq!(done[0].id(), 42);
//! ```
//!
//! # The slot and its state word
//!
//! A slot holds an `AtomicU32` state — `PENDING`, `DONE` or `FAILED` in the low bits, plus a
//! `WAITERS` bit — and the error in an `UnsafeCell<MaybeUninit<E>>`.
//!
//! * The completer writes the error (if any), then stores the final state with one `swap`
//!   (`Release`). Readers load the state with `Acquire` and touch the error only after seeing
//!   `FAILED`; the Release/Acquire pair makes the error write happen-before the read. The error
//!   is never written again, so any number of readers may borrow it; it is dropped with the
//!   slot, if and only if the state is `FAILED`.
//! * Waiting spins briefly (`crossbeam_utils::Backoff`: ~130 pause instructions then four
//!   `sched_yield`s, a few µs; a cross-core wake-up costs far more), then sets `WAITERS` with a
//!   CAS and sleeps on a Linux futex on the state word, expecting `PENDING | WAITERS`. The
//!   completer's `swap` returns the previous word: it calls `FUTEX_WAKE` only when `WAITERS` was
//!   set. No wake-up is lost: the CAS and the swap are read-modify-writes of one word, so either
//!   the CAS comes first (the swap sees the bit and wakes) or it fails (the waiter re-reads and
//!   sees the final state); the kernel compares the word and queues the sleeper atomically
//!   with respect to `FUTEX_WAKE`, so a sleeper that compared before the swap is woken and one
//!   that compares after it does not sleep. The `WAITERS` bit and the CAS need no ordering of
//!   their own (`Relaxed`): the waiter re-reads the state with `Acquire` before using it.
//!
//! # The event queue
//!
//! Dmitry Vyukov's *intrusive non-blocking MPSC node-based queue*
//! (<https://www.1024cores.net/home/lock-free-algorithms/queues/intrusive-mpsc-node-based-queue>).
//! The nodes are the slots themselves (an operation is enqueued once, on completion, so a slot
//! has one `next` link and completing allocates nothing); a stub node lives in the queue.
//!
//! * Push (any thread): `node.next = null` (`Relaxed`); `prev = head.swap(node)` (`AcqRel`);
//!   `prev.next = node` (`Release`). The swap's `Release` half publishes `node.next = null` to
//!   the producer that swaps next and then writes that field, so the null can never overwrite
//!   its link; its `Acquire` half is that producer's side. The final `Release` store publishes
//!   everything the producer wrote before — the slot's state and error, and the null `next` —
//!   to the consumer, which loads `next` with `Acquire`. A drained handle therefore always
//!   reports `Done` or `Failed`.
//! * Pop (one consumer, holding the `draining` flag): follow `tail.next`, skipping the stub;
//!   return `tail` once its `next` is set. When `tail` is the last node, re-push the stub behind
//!   it so it can be detached. Between a producer's swap and its link the list is broken
//!   ("inconsistent" in Vyukov's words); pop then returns nothing and the rest waits for a later
//!   drain — it never spins on a producer. A popped node is never touched by a producer again
//!   (the only producer that had it as `prev` already linked it), so the queue's reference can be
//!   handed to the caller.
//! * Ownership: a queued slot owns one `Arc` strong count (`Arc::into_raw` on push,
//!   `Arc::from_raw` on pop). Every [`Completer`] of an events queue keeps the queue alive, so
//!   when it is dropped no producer is left; its `Drop` pops and releases what is still queued.
//! * Single consumer: `try_drain` takes the `draining` flag with a CAS (`Acquire`) and clears it
//!   with `Release`, so the consumer side's plain state (`tail`) passes between successive
//!   consumers; a second concurrent drainer gets `0` at once instead of blocking.
//!
//! The atomics, cells, `Arc` and the futex come from `crate::primitive`, so the same code runs
//! under loom (`tests/cq_loom.rs`), where the futex is modelled with a mutex and condvar and a
//! lost wake-up shows up as a deadlock.

use std::fmt;
use std::mem::MaybeUninit;
use std::ptr;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::primitive::{Arc, AtomicBool, AtomicPtr, Backoff, Futex, Ordering, UnsafeCell};

const PENDING: u32 = 0;
const DONE: u32 = 1;
const FAILED: u32 = 2;
const STATUS_MASK: u32 = 0b11;
/// Set by a thread about to sleep on the futex; tells the completer to make the wake syscall.
const WAITERS: u32 = 0b100;

/// The error an operation fails with when its [`Completer`] is dropped without completing.
///
/// The runtime's error type `E` must implement `From<Abandoned>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Abandoned;

impl fmt::Display for Abandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("operation abandoned by the runtime")
    }
}

impl std::error::Error for Abandoned {}

/// Where an operation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Not completed yet.
    Pending,
    /// Completed successfully.
    Done,
    /// Completed with an error (see [`Handle::result`]).
    Failed,
}

impl Status {
    /// True for [`Status::Done`] and [`Status::Failed`].
    pub fn is_finished(self) -> bool {
        self != Status::Pending
    }

    fn from_word(word: u32) -> Self {
        match word & STATUS_MASK {
            PENDING => Status::Pending,
            DONE => Status::Done,
            _ => Status::Failed,
        }
    }
}

/// The state shared by an operation's handles, its completer and (once completed) the event
/// queue. Also the event queue's node type.
struct Slot<E> {
    /// `PENDING` / `DONE` / `FAILED`, plus `WAITERS`.
    state: Futex,
    /// Intrusive link of the event queue.
    next: AtomicPtr<Slot<E>>,
    /// The caller's operation id.
    id: u64,
    /// Initialised iff `state` is `FAILED`; written once, before that state is published.
    error: UnsafeCell<MaybeUninit<E>>,
}

// SAFETY: the only non-thread-safe field is `error`. It is written once, by the unique
// `Completer`, before `FAILED` is published with Release; afterwards it is only read (through
// `&E`, hence `E: Sync`) by threads that saw `FAILED` with Acquire, and dropped by whoever drops
// the last `Arc` (hence `E: Send`). The raw `next` pointer only ever names other `Slot<E>`s.
unsafe impl<E: Send + Sync> Send for Slot<E> {}
// SAFETY: as for `Send` above: shared access to `error` is read-only after publication.
unsafe impl<E: Send + Sync> Sync for Slot<E> {}

impl<E> Slot<E> {
    fn new(id: u64) -> Self {
        Self {
            state: Futex::new(PENDING),
            next: AtomicPtr::new(ptr::null_mut()),
            id,
            error: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// The result, if completed: one Acquire load, plus a borrow of the error when failed.
    fn outcome(&self) -> Option<Result<(), &E>> {
        match self.state.load(Ordering::Acquire) & STATUS_MASK {
            PENDING => None,
            DONE => Some(Ok(())),
            _ => Some(Err(self.error.with(|error| {
                // SAFETY: the Acquire load above saw FAILED, which the completer stores with
                // Release only after initialising `error`; nothing writes `error` afterwards
                // (only `Drop`, which has `&mut self`), so a shared borrow for as long as `self`
                // is borrowed is valid.
                unsafe { (*error).assume_init_ref() }
            }))),
        }
    }

    /// Blocks until the slot is completed or `deadline` passes (`None`: no deadline).
    fn wait_until(&self, deadline: Option<Instant>) -> Option<Result<(), &E>> {
        let expired = || deadline.is_some_and(|d| Instant::now() >= d);
        // Spin first: most operations finish within microseconds of being waited on, and a
        // futex round trip costs tens to hundreds of them.
        let backoff = Backoff::new();
        loop {
            if let Some(result) = self.outcome() {
                return Some(result);
            }
            if backoff.is_completed() || expired() {
                break;
            }
            backoff.snooze();
        }
        loop {
            let word = self.state.load(Ordering::Relaxed);
            if word & STATUS_MASK != PENDING {
                return self.outcome();
            }
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return None,
                },
            };
            if word & WAITERS == 0
                && self
                    .state
                    .compare_exchange(word, word | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue; // completed meanwhile (or another waiter set the bit): re-read
            }
            // Returns at once if the word is no longer PENDING | WAITERS; spurious returns and
            // timeouts loop back to the re-read above.
            self.state.wait(PENDING | WAITERS, timeout);
        }
    }
}

impl<E> Drop for Slot<E> {
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) & STATUS_MASK == FAILED {
            self.error.with_mut(|error| {
                // SAFETY: FAILED is stored only after `error` was initialised; `&mut self` means
                // no borrow of it is alive, and the slot is dropped once, so this is the single
                // drop of that value.
                unsafe { (*error).assume_init_drop() }
            });
        }
    }
}

/// The queue's shared part: Vyukov's MPSC list (see the module docs) and the consumer flag.
struct Inner<E> {
    /// Producers' end: the node pushed last. Never null (the stub at worst).
    head: CachePadded<AtomicPtr<Slot<E>>>,
    /// Consumer's end: the oldest node not yet popped (possibly the stub). Accessed only by the
    /// holder of `draining`, or by `Drop`.
    tail: CachePadded<UnsafeCell<*mut Slot<E>>>,
    /// The consumer's try-lock.
    draining: AtomicBool,
    /// Whether completions are queued at all.
    events: bool,
    /// The stub node. Its state stays PENDING; its address is stable because `Inner` lives in
    /// an `Arc` from birth.
    stub: Slot<E>,
}

// SAFETY: the raw pointers name the stub (inside `self`) or slots the queue holds a strong
// count of, which are `Send + Sync` for `E: Send + Sync`; `tail` is only touched by the single
// consumer that holds `draining` (Acquire/Release hands it between consumers) or under `&mut`.
unsafe impl<E: Send + Sync> Send for Inner<E> {}
// SAFETY: see `Send`: every shared-access path to `tail` goes through the `draining` flag.
unsafe impl<E: Send + Sync> Sync for Inner<E> {}

impl<E> Inner<E> {
    fn stub_ptr(&self) -> *mut Slot<E> {
        ptr::from_ref(&self.stub).cast_mut()
    }

    /// Pushes `node` (Vyukov's `mpscq_push`). Wait-free: one swap, one store.
    ///
    /// # Safety
    /// `node` is the stub or comes from `Arc::into_raw` (the queue takes over that count); it is
    /// not in the queue now.
    unsafe fn push(&self, node: *mut Slot<E>) {
        // SAFETY: `node` is alive: the stub lives in `self`, a slot through the count the
        // caller handed over.
        unsafe { &*node }
            .next
            .store(ptr::null_mut(), Ordering::Relaxed);
        let prev = self.head.swap(node, Ordering::AcqRel);
        // SAFETY: `prev` is in the queue and cannot have been popped: pop releases a node only
        // after seeing its `next` set, and only this producer (the one whose swap returned
        // `prev`) sets it.
        unsafe { &*prev }.next.store(node, Ordering::Release);
    }

    /// # Safety
    /// The caller is the only consumer (holds `draining`, or has `&mut self`).
    unsafe fn tail(&self) -> *mut Slot<E> {
        // SAFETY: single consumer (caller's contract), so no write is concurrent.
        self.tail.with(|tail| unsafe { *tail })
    }

    /// # Safety
    /// As [`Inner::tail`].
    unsafe fn set_tail(&self, node: *mut Slot<E>) {
        // SAFETY: single consumer (caller's contract), so no access is concurrent.
        self.tail.with_mut(|tail| unsafe { *tail = node });
    }

    /// Pops the oldest completed slot (Vyukov's `mpscq_pop`). `None` when empty, or when the
    /// next node's producer is between its swap and its link: the node stays for a later pop.
    ///
    /// # Safety
    /// The caller is the only consumer (holds `draining`, or has `&mut self`).
    unsafe fn pop(&self) -> Option<Arc<Slot<E>>> {
        let stub = self.stub_ptr();
        // SAFETY: single consumer (caller's contract).
        let mut tail = unsafe { self.tail() };
        // SAFETY: `tail` is the stub or a node the queue holds a count of (not yet popped), so
        // it is alive. The same holds for every `&*tail` below.
        let mut next = unsafe { &*tail }.next.load(Ordering::Acquire);
        if tail == stub {
            if next.is_null() {
                return None; // empty
            }
            // SAFETY: single consumer.
            unsafe { self.set_tail(next) };
            tail = next;
            // SAFETY: see above; `tail` is now a queued slot.
            next = unsafe { &*tail }.next.load(Ordering::Acquire);
        }
        debug_assert_ne!(tail, stub, "the stub is never linked behind itself");
        if next.is_null() {
            // `tail` looks last. If `head` moved on, a producer has swapped past `tail` but not
            // yet linked it: give up for now. Relaxed suffices: a stale `head == tail` only
            // makes us push the stub, which is safe at any time `tail` is not the stub.
            if tail != self.head.load(Ordering::Relaxed) {
                return None;
            }
            // Put the stub behind `tail` so `tail` can be detached.
            // SAFETY: the stub is not in the queue: it was passed (tail != stub) and is only
            // re-pushed here, when `tail` is the last node.
            unsafe { self.push(stub) };
            // SAFETY: see above.
            next = unsafe { &*tail }.next.load(Ordering::Acquire);
            if next.is_null() {
                return None; // another producer got in between; its link will follow
            }
        }
        // SAFETY: single consumer.
        unsafe { self.set_tail(next) };
        // SAFETY: `tail` is not the stub, so it came from `Arc::into_raw` in `Completer` and the
        // queue owns that count; its `next` is set, so no producer touches it again and the
        // count can go to the caller.
        Some(unsafe { Arc::from_raw(tail) })
    }
}

impl<E> Drop for Inner<E> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no drain is running, and no producer exists (each Completer of
        // an events queue holds an `Arc<Inner>`), so the list is consistent and pop finds all.
        while let Some(slot) = unsafe { self.pop() } {
            drop(slot);
        }
    }
}

/// Releases the consumer flag when a drain ends, even by unwinding.
struct DrainGuard<'a>(&'a AtomicBool);

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Lock-free completion queue: makes [`Handle`] / [`Completer`] pairs and, when built with
/// `events = true`, queues completed operations for [`CompletionQueue::try_drain`].
///
/// Cheap to clone (an `Arc`); `Send + Sync` when `E: Send + Sync`.
pub struct CompletionQueue<E> {
    inner: Arc<Inner<E>>,
}

impl<E> Clone for CompletionQueue<E> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E> fmt::Debug for CompletionQueue<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("events", &self.inner.events)
            .finish_non_exhaustive()
    }
}

impl<E: From<Abandoned> + Send + Sync + 'static> CompletionQueue<E> {
    /// A new queue. With `events = false` it only makes handles and keeps nothing for
    /// [`CompletionQueue::try_drain`]; with `events = true` every completed operation is also
    /// queued, once, until drained.
    pub fn new(events: bool) -> Self {
        let inner = Arc::new(Inner {
            head: CachePadded::new(AtomicPtr::new(ptr::null_mut())),
            tail: CachePadded::new(UnsafeCell::new(ptr::null_mut())),
            draining: AtomicBool::new(false),
            events,
            stub: Slot::new(u64::MAX),
        });
        let stub = inner.stub_ptr();
        inner.head.store(stub, Ordering::Relaxed);
        // SAFETY: `inner` has not been shared yet, so this is the only access to `tail`.
        unsafe { inner.set_tail(stub) };
        Self { inner }
    }

    /// Whether completed operations are queued for [`CompletionQueue::try_drain`].
    pub fn events(&self) -> bool {
        self.inner.events
    }

    /// Starts tracking operation `id` (the caller's id, reported back by [`Handle::id`]).
    /// Allocates once (the shared slot).
    pub fn register(&self, id: u64) -> (Handle<E>, Completer<E>) {
        let slot = Arc::new(Slot::new(id));
        let handle = Handle {
            slot: Arc::clone(&slot),
        };
        let completer = Completer {
            slot,
            queue: self.inner.events.then(|| Arc::clone(&self.inner)),
            done: false,
        };
        (handle, completer)
    }

    /// Moves the operations completed since the last drain into `out`, each exactly once over
    /// the queue's life, and returns how many it moved. Never blocks.
    ///
    /// Returns 0 at once when the queue was made with `events = false`, or when another thread
    /// is draining (single consumer, taken with a try-lock).
    ///
    /// An operation whose [`Completer::complete`] has returned is delivered by this drain or a
    /// later one. A completion still in flight on another thread, and any queued behind it, can
    /// miss this drain and is delivered by the next one; so 0 does not prove nothing finished,
    /// and callers keep draining (e.g. after each [`Handle::wait`]).
    pub fn try_drain(&self, out: &mut Vec<Handle<E>>) -> usize {
        let inner = &*self.inner;
        if !inner.events {
            return 0;
        }
        if inner
            .draining
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return 0;
        }
        let _guard = DrainGuard(&inner.draining);
        let mut moved = 0;
        // SAFETY: we hold `draining`, so we are the only consumer until `_guard` drops.
        while let Some(slot) = unsafe { inner.pop() } {
            out.push(Handle { slot });
            moved += 1;
        }
        moved
    }
}

/// The framework's view of one operation. Cheap to clone; `Send + Sync` when `E: Send + Sync`.
///
/// Polling ([`Handle::status`], [`Handle::result`]) is one atomic load, no lock.
pub struct Handle<E> {
    slot: Arc<Slot<E>>,
}

impl<E> Clone for Handle<E> {
    fn clone(&self) -> Self {
        Self {
            slot: Arc::clone(&self.slot),
        }
    }
}

impl<E> fmt::Debug for Handle<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("id", &self.id())
            .field("status", &self.status())
            .finish()
    }
}

impl<E> Handle<E> {
    /// The operation id given to [`CompletionQueue::register`].
    pub fn id(&self) -> u64 {
        self.slot.id
    }

    /// The operation's status: one `Acquire` load. Once it is `Failed`,
    /// [`Handle::result`] shows the error.
    pub fn status(&self) -> Status {
        Status::from_word(self.slot.state.load(Ordering::Acquire))
    }

    /// `None` while pending, else the outcome (the error is borrowed from the shared slot).
    pub fn result(&self) -> Option<Result<(), &E>> {
        self.slot.outcome()
    }

    /// Blocks until the operation completes: spins for a few µs, then sleeps on a futex.
    ///
    /// # Errors
    /// The operation's error, [`Abandoned`] converted into `E` if its completer was dropped.
    pub fn wait(&self) -> Result<(), &E> {
        loop {
            if let Some(result) = self.slot.wait_until(None) {
                return result;
            }
        }
    }

    /// As [`Handle::wait`], giving up after `timeout`: `None` if still pending by then.
    /// Spurious wake-ups are absorbed. A zero timeout is a poll.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<(), &E>> {
        if let Some(result) = self.slot.outcome() {
            return Some(result);
        }
        if timeout.is_zero() {
            return None;
        }
        // A deadline that cannot be represented is as good as none.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let result = self.slot.wait_until(deadline);
            if result.is_some() || deadline.is_some() {
                return result;
            }
        }
    }
}

/// The runtime's end of one operation: exactly one per operation, not `Clone`; `Send` when
/// `E: Send + Sync`.
///
/// [`Completer::complete`] consumes it; dropping it without completing fails the operation
/// with `E::from(Abandoned)`, so a waiter is never left hanging.
pub struct Completer<E: From<Abandoned>> {
    slot: Arc<Slot<E>>,
    /// The queue to post the completion to (`events = true` only).
    queue: Option<Arc<Inner<E>>>,
    /// Set once the result is published; `Drop` does nothing then.
    done: bool,
}

impl<E: From<Abandoned>> fmt::Debug for Completer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completer")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl<E: From<Abandoned>> Completer<E> {
    /// The operation id given to [`CompletionQueue::register`].
    pub fn id(&self) -> u64 {
        self.slot.id
    }

    /// Completes the operation: stores the error (if any), publishes the status (`Release`),
    /// wakes the threads sleeping in [`Handle::wait`] (a syscall only if some sleep), and
    /// queues the event for [`CompletionQueue::try_drain`] (no allocation, no lock).
    pub fn complete(mut self, result: Result<(), E>) {
        self.publish(result);
    }

    fn publish(&mut self, result: Result<(), E>) {
        debug_assert!(!self.done, "an operation is completed once");
        self.done = true;
        let slot = &*self.slot;
        let word = match result {
            Ok(()) => DONE,
            Err(error) => {
                slot.error.with_mut(|cell| {
                    // SAFETY: this completer is the slot's only writer and publishes once
                    // (`done`); no reader touches `error` before seeing FAILED, which is stored
                    // below, after this write, with Release.
                    unsafe { (*cell).write(error) };
                });
                FAILED
            }
        };
        let prev = slot.state.swap(word, Ordering::Release);
        debug_assert_eq!(prev & STATUS_MASK, PENDING);
        if prev & WAITERS != 0 {
            slot.state.wake_all();
        }
        if let Some(queue) = self.queue.take() {
            let node = Arc::into_raw(Arc::clone(&self.slot)).cast_mut();
            // SAFETY: `node` comes from `Arc::into_raw`, whose count the queue now owns; the slot
            // was never queued (publish runs once per operation), so it is not in the queue.
            unsafe { queue.push(node) };
        }
    }
}

impl<E: From<Abandoned>> Drop for Completer<E> {
    fn drop(&mut self) {
        if !self.done {
            self.publish(Err(E::from(Abandoned)));
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;
    use std::thread;

    #[derive(Debug, PartialEq)]
    enum TestError {
        Abandoned,
        Io(&'static str),
    }

    impl From<Abandoned> for TestError {
        fn from(_: Abandoned) -> Self {
            TestError::Abandoned
        }
    }

    /// An error that counts its drops, to catch leaks and double drops.
    #[derive(Debug)]
    struct Counted(std::sync::Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl From<Abandoned> for Counted {
        fn from(_: Abandoned) -> Self {
            unreachable!("tests complete every Counted op explicitly")
        }
    }

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn cq_auto_traits() {
        assert_send_sync::<CompletionQueue<TestError>>();
        assert_send_sync::<Handle<TestError>>();
        assert_send::<Completer<TestError>>();
    }

    #[test]
    fn cq_abandoned_display() {
        assert_eq!(Abandoned.to_string(), "operation abandoned by the runtime");
        let _: &dyn std::error::Error = &Abandoned;
    }

    #[test]
    fn cq_status_transitions() {
        let cq = CompletionQueue::<TestError>::new(false);
        let (h, c) = cq.register(5);
        assert_eq!((h.id(), c.id()), (5, 5));
        assert_eq!(h.status(), Status::Pending);
        assert!(!h.status().is_finished());
        assert!(h.result().is_none());
        assert!(h.wait_timeout(Duration::ZERO).is_none());
        c.complete(Ok(()));
        assert_eq!(h.status(), Status::Done);
        assert_eq!(h.result(), Some(Ok(())));
        assert_eq!(h.wait(), Ok(()));
        assert_eq!(h.clone().wait_timeout(Duration::ZERO), Some(Ok(())));
        assert_eq!(format!("{h:?}"), "Handle { id: 5, status: Done }");
    }

    #[test]
    fn cq_wait_wakes_on_complete_from_other_thread() {
        let cq = CompletionQueue::<TestError>::new(false);
        let (h, c) = cq.register(1);
        // Several waiters, all past the spin phase and asleep on the futex.
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let h = h.clone();
                thread::spawn(move || h.wait().is_ok())
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(h.status(), Status::Pending);
        c.complete(Ok(()));
        for w in waiters {
            assert!(w.join().unwrap());
        }
    }

    #[test]
    fn cq_wait_timeout_times_out_then_succeeds() {
        let cq = CompletionQueue::<TestError>::new(false);
        let (h, c) = cq.register(1);
        let t0 = Instant::now();
        assert!(h.wait_timeout(Duration::from_millis(30)).is_none());
        assert!(t0.elapsed() >= Duration::from_millis(30));
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            c.complete(Err(TestError::Io("late")));
        });
        assert_eq!(
            h.wait_timeout(Duration::from_secs(30)),
            Some(Err(&TestError::Io("late")))
        );
        t.join().unwrap();
        // A huge timeout (deadline overflows Instant) behaves as wait().
        assert!(h.wait_timeout(Duration::MAX).is_some());
    }

    #[test]
    fn cq_error_path() {
        let cq = CompletionQueue::<TestError>::new(true);
        let (h, c) = cq.register(9);
        c.complete(Err(TestError::Io("link down")));
        assert_eq!(h.status(), Status::Failed);
        assert_eq!(h.result(), Some(Err(&TestError::Io("link down"))));
        assert_eq!(h.wait(), Err(&TestError::Io("link down")));
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 1);
        assert_eq!(out[0].id(), 9);
        assert_eq!(out[0].result(), Some(Err(&TestError::Io("link down"))));
    }

    #[test]
    fn cq_dropped_completer_fails_with_abandoned() {
        let cq = CompletionQueue::<TestError>::new(true);
        let (h, c) = cq.register(3);
        let waiter = {
            let h = h.clone();
            thread::spawn(move || h.wait() == Err(&TestError::Abandoned))
        };
        thread::sleep(Duration::from_millis(10));
        thread::spawn(move || drop(c)).join().unwrap();
        assert!(waiter.join().unwrap());
        assert_eq!(h.status(), Status::Failed);
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 1);
        assert_eq!(out[0].id(), 3);
    }

    #[test]
    fn cq_drain_each_op_exactly_once_many_producers() {
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 10_000;
        let cq = CompletionQueue::<TestError>::new(true);
        let mut handles = Vec::new();
        let mut producers = Vec::new();
        for t in 0..THREADS {
            let completers: Vec<_> = (0..PER_THREAD)
                .map(|i| {
                    let (h, c) = cq.register(t * PER_THREAD + i);
                    handles.push(h);
                    c
                })
                .collect();
            producers.push(thread::spawn(move || {
                for (i, c) in completers.into_iter().enumerate() {
                    if i % 7 == 0 {
                        c.complete(Err(TestError::Io("odd one")));
                    } else {
                        c.complete(Ok(()));
                    }
                }
            }));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let check = |out: &mut Vec<Handle<TestError>>, seen: &mut HashSet<u64>| {
            for h in out.drain(..) {
                assert!(h.status().is_finished(), "drained op {} pending", h.id());
                assert!(seen.insert(h.id()), "op {} drained twice", h.id());
            }
        };
        // Drain concurrently with the producers ...
        while producers.iter().any(|p| !p.is_finished()) {
            cq.try_drain(&mut out);
            check(&mut out, &mut seen);
        }
        for p in producers {
            p.join().unwrap();
        }
        // ... and once more after every complete() has returned: nothing may be missing.
        cq.try_drain(&mut out);
        check(&mut out, &mut seen);
        assert_eq!(seen.len() as u64, THREADS * PER_THREAD);
        assert_eq!(cq.try_drain(&mut out), 0);
        assert!(handles.iter().all(|h| h.status().is_finished()));
    }

    #[test]
    fn cq_concurrent_drainers_share_without_duplicates() {
        let cq = CompletionQueue::<TestError>::new(true);
        let completers: Vec<_> = (0..20_000).map(|i| cq.register(i).1).collect();
        let producer =
            thread::spawn(move || completers.into_iter().for_each(|c| c.complete(Ok(()))));
        let drainers: Vec<_> = (0..2)
            .map(|_| {
                let cq = cq.clone();
                thread::spawn(move || {
                    let mut ids = Vec::new();
                    let mut out = Vec::new();
                    for _ in 0..2_000 {
                        cq.try_drain(&mut out);
                        ids.extend(out.drain(..).map(|h| h.id()));
                    }
                    ids
                })
            })
            .collect();
        producer.join().unwrap();
        let mut ids: Vec<u64> = drainers
            .into_iter()
            .flat_map(|d| d.join().unwrap())
            .collect();
        let mut out = Vec::new();
        cq.try_drain(&mut out);
        ids.extend(out.iter().map(Handle::id));
        ids.sort_unstable();
        assert_eq!(ids, (0..20_000).collect::<Vec<_>>());
    }

    #[test]
    fn cq_try_drain_returns_zero_while_another_drains() {
        let cq = CompletionQueue::<TestError>::new(true);
        cq.register(1).1.complete(Ok(()));
        cq.inner.draining.store(true, Ordering::SeqCst); // pretend another consumer is active
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 0);
        cq.inner.draining.store(false, Ordering::SeqCst);
        assert_eq!(cq.try_drain(&mut out), 1);
    }

    #[test]
    fn cq_events_off_keeps_nothing() {
        let cq = CompletionQueue::<TestError>::new(false);
        assert!(!cq.events());
        let (h, c) = cq.register(1);
        assert!(c.queue.is_none());
        c.complete(Ok(()));
        drop(cq.register(2)); // abandoned
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 0);
        assert!(out.is_empty());
        assert_eq!(std::sync::Arc::strong_count(&h.slot), 1);
    }

    #[test]
    fn cq_drop_with_queued_items_frees_everything_once() {
        let drops = std::sync::Arc::new(AtomicUsize::new(0));
        let cq = CompletionQueue::<Counted>::new(true);
        let mut handles = Vec::new();
        for i in 0..100 {
            let (h, c) = cq.register(i);
            handles.push(h);
            c.complete(Err(Counted(drops.clone())));
        }
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 100);
        for i in 100..200 {
            let (h, c) = cq.register(i);
            handles.push(h);
            if i % 2 == 0 {
                c.complete(Err(Counted(drops.clone())));
            } else {
                c.complete(Ok(()));
            }
        }
        // Also one op whose completer outlives the queue handle.
        let (late_h, late_c) = cq.register(999);
        drop(cq);
        late_c.complete(Err(Counted(drops.clone()))); // the Completer kept the queue alive
        drop(out);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            0,
            "errors live as long as a handle"
        );
        // The queue is gone: every slot is referenced by our handle only.
        for h in handles.iter().chain([&late_h]) {
            assert_eq!(std::sync::Arc::strong_count(&h.slot), 1, "op {}", h.id());
        }
        drop(handles);
        drop(late_h);
        assert_eq!(drops.load(Ordering::SeqCst), 100 + 50 + 1);
    }

    #[test]
    fn cq_drop_queue_with_nothing_drained() {
        let drops = std::sync::Arc::new(AtomicUsize::new(0));
        let cq = CompletionQueue::<Counted>::new(true);
        for i in 0..10 {
            cq.register(i).1.complete(Err(Counted(drops.clone())));
        }
        drop(cq);
        assert_eq!(drops.load(Ordering::SeqCst), 10);
    }
}
