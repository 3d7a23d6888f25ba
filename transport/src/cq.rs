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
//! # What `complete()` costs
//!
//! On the common path — events on, and the completing thread has completed an operation of
//! this queue before — [`Completer::complete`] makes **no locked read-modify-write**: one
//! `Release` store of the state, one load of the waiters flag, then, in the thread's lane, one
//! `Release` store of the slot's pointer and one store of the lane's post counter. The
//! completer's own `Arc` count of the slot becomes the queue's, and its count of the queue is
//! kept by the thread's claim (see *Ownership*). With events off it is the state store, the
//! flag load and the `Arc` decrement of the completer's slot.
//! Locked operations are kept for the rare paths: a waiter going to sleep, a thread's first
//! completion for a queue, registering, draining (one try-lock per drain), closing.
//!
//! # The slot, its state word and waiters
//!
//! A slot holds an `AtomicU32` state (`PENDING`, `DONE` or `FAILED`), a `waiters` flag and the
//! error in an `UnsafeCell<MaybeUninit<E>>`.
//!
//! * The completer writes the error (if any), then stores the final state (`Release`). Readers
//!   load the state with `Acquire` and touch the error only after seeing `FAILED`; the
//!   Release/Acquire pair makes the error write happen-before the read. The error is never
//!   written again, so any number of readers may borrow it; it is dropped with the slot, if and
//!   only if the state is `FAILED`. The state has one writer, so a plain store suffices.
//! * Waiting spins briefly (`crossbeam_utils::Backoff`: ~130 pause instructions then four
//!   `sched_yield`s, a few µs; a cross-core wake-up costs far more), then sets `waiters`,
//!   issues the *heavy* fence of an asymmetric pair (`primitive::asym`), re-reads the
//!   state and sleeps on a Linux futex on the state word, expecting `PENDING`. The completer,
//!   after its store, issues the *light* fence and loads `waiters`: it calls `FUTEX_WAKE` only
//!   when the flag is set. This is the store-buffering pattern (each side stores its word,
//!   fences, loads the other's), so no wake-up is lost: either the completer sees the flag and
//!   wakes, or the waiter's re-read sees the final state and does not sleep; the kernel
//!   compares the word and queues the sleeper atomically with respect to `FUTEX_WAKE`, so a
//!   sleeper that compared before the store is woken and one that compares after it does not
//!   sleep. The heavy fence is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` (it runs a full
//!   barrier on every CPU running a thread of this process), which lets the light fence be a
//!   compiler fence: the cost moves from every completion to the waits that go to sleep (a
//!   system call that interrupts this process's running threads once, next to the futex
//!   sleep it precedes). Where `membarrier` is unavailable both are `SeqCst` fences.
//!
//! # The event queue: per-thread lanes
//!
//! Completed slots are delivered through *lanes*: single-producer, single-consumer queues of
//! slot pointers, in segments of 511 entries (a 4 KiB page each; a new one is allocated when
//! the last fills, the consumer frees the ones it has read). Each lane belongs to one queue;
//! a thread posting to a queue *claims* one of its lanes (a CAS on the lane's `claimed` flag,
//! or a new lane pushed onto the queue's list of lanes), keeps the claim in a thread-local
//! cache of a few (4) claims, and is then the lane's only producer: posting is a
//! `Release` store of the entry into the next cell, which the consumer finds non-null with an
//! `Acquire` load — so a drained handle always reports `Done` or `Failed`. The thread-local
//! cache is only read on the fast path (the most recent claim is this queue's and its segment
//! has room), which calls nothing; the rest runs with a `busy` flag set, so a post re-entering
//! from there (an allocator, a destructor) takes the fallback list. A claim is released
//! (flag cleared with `Release`, so the next claimant continues at the right cell) when the
//! thread exits, when it is evicted from the cache, or when its queue is closed. Lanes are
//! never unlinked while the queue lives; a new thread reuses a released lane first.
//!
//! The consumer (`try_drain`, which holds the `draining` flag: a CAS with `Acquire`, cleared
//! with `Release`, so the consumer-side cursors pass between successive consumers) walks the
//! list of lanes and reads each lane from its cursor; a second concurrent drainer gets `0` at
//! once instead of blocking. It never dereferences a slot: the pointers become handles as
//! they are. The list is only pushed onto (CAS, `Release`), so the walk is safe with
//! concurrent claims.
//!
//! When the thread-local cache cannot be used (while thread-locals are being destroyed, or on
//! re-entry) the slot goes to a shared fallback list instead, Dmitry Vyukov's *intrusive
//! non-blocking MPSC node-based queue*
//! (<https://www.1024cores.net/home/lock-free-algorithms/queues/intrusive-mpsc-node-based-queue>),
//! whose nodes are the slots themselves (one `next` link each) around a stub node:
//!
//! * Push (any thread): `node.next = null` (`Relaxed`); `prev = head.swap(node)` (`AcqRel`);
//!   `prev.next = node` (`Release`). The swap's `Release` half publishes `node.next = null` to
//!   the producer that swaps next and then writes that field, so the null can never overwrite
//!   its link; its `Acquire` half is that producer's side. The final `Release` store publishes
//!   everything the producer wrote before to the consumer, which loads `next` with `Acquire`.
//! * Pop (the consumer): follow `tail.next`, skipping the stub; return `tail` once its `next`
//!   is set. When `tail` is the last node, re-push the stub behind it so it can be detached.
//!   Between a producer's swap and its link the list is broken ("inconsistent" in Vyukov's
//!   words); pop then returns nothing and the rest waits for a later drain — it never spins on
//!   a producer. A popped node is never touched by a producer again.
//!
//! # Ownership
//!
//! * A queued slot — in a lane or in the shared list — owns one `Arc` strong count: the
//!   completer's own (`Arc::into_raw` on posting, `Arc::from_raw` on draining).
//! * The queue's shared part (`Inner`) is counted by hand (`Hub::refs`): one count per
//!   [`CompletionQueue`], one per not-yet-completed [`Completer`] of an events queue, and, for
//!   each completion posted to a lane, one held by the posting thread's claim. A claim does not
//!   count them one by one: it remembers the lane's post counter when it was made, and the
//!   difference is what it holds (the same counter is the lane's write position, so a post
//!   stores the entry and the counter, nothing else — this is what spares `complete()` the
//!   decrement). Releasing a claim returns all its counts with one `fetch_sub`. Since a cached
//!   claim holds at least one count, its queue (and so its lane) outlives it, and no queue
//!   address in a cache can be reused while it is cached.
//! * When the last [`CompletionQueue`] is dropped the queue is *closed*: nobody can drain any
//!   more, so that thread drains and drops every queued slot at once, and later completions
//!   (which see the flag) post nothing and release their claim. A completion racing with the
//!   close may still land in its lane; it is freed with the queue. The queue itself is freed
//!   when its last count goes: the last handle, completer or claim.
//!
//! The atomics, cells, `Arc`, the fences and the futex come from `crate::primitive` (and the
//! thread-local is loom's under loom), so the same code runs under loom (`tests/cq_loom.rs`), where the futex is
//! modelled with a mutex and condvar (a lost wake-up shows up as a deadlock), the fences as
//! `SeqCst` fences, and segments hold two entries so that models cross segment boundaries.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::primitive::{
    asym, fence, Arc, AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Backoff, Futex, LeakCheck,
    Ordering, UnsafeCell,
};

const PENDING: u32 = 0;
const DONE: u32 = 1;
const FAILED: u32 = 2;

/// Entries per lane segment; with the link, a segment is one 4 KiB page.
#[cfg(not(loom))]
const SEGMENT_LEN: usize = 511;
/// Under loom, small enough that a model crosses segments.
#[cfg(loom)]
const SEGMENT_LEN: usize = 2;

/// Claims a thread caches, one per queue it posts to; the least recently used goes first.
const MAX_CLAIMS: usize = 4;

/// How often a waiter re-checks when no fence could be had (see `asym::heavy`; not expected).
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// A count above this aborts, as `Arc`'s does (it cannot be reached without leaking counts).
const MAX_REFS: usize = isize::MAX as usize;

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
        match word {
            PENDING => Status::Pending,
            DONE => Status::Done,
            _ => Status::Failed,
        }
    }
}

/// The state shared by an operation's handles, its completer and (once completed) the event
/// queue. Also the node type of the shared fallback list.
struct Slot<E> {
    /// `PENDING`, then `DONE` or `FAILED`: stored once, by the completer. The futex word.
    state: Futex,
    /// Non-zero once a waiter may sleep on `state`: tells the completer to make the wake call.
    waiters: AtomicU32,
    /// Intrusive link of the shared fallback list.
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
            waiters: AtomicU32::new(0),
            next: AtomicPtr::new(ptr::null_mut()),
            id,
            error: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// The result, if completed: one Acquire load, plus a borrow of the error when failed.
    fn outcome(&self) -> Option<Result<(), &E>> {
        match self.state.load(Ordering::Acquire) {
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

    /// Publishes the result and wakes sleeping waiters. Called once, by the completer.
    #[inline]
    fn publish(&self, result: Result<(), E>) {
        let word = match result {
            Ok(()) => DONE,
            Err(error) => {
                self.error.with_mut(|cell| {
                    // SAFETY: the completer is the slot's only writer and publishes once (it is
                    // consumed doing so); no reader touches `error` before seeing FAILED, which
                    // is stored below, after this write, with Release.
                    unsafe { (*cell).write(error) };
                });
                FAILED
            }
        };
        self.state.store(word, Ordering::Release);
        // The store-buffering pair with `wait_until`: store the state, fence, load the flag.
        asym::light();
        if self.waiters.load(Ordering::Relaxed) != 0 {
            self.state.wake_all();
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
        // The other half of the pair in `publish`: store the flag, fence, load the state (in
        // `outcome`, below). Either the completer sees the flag and wakes us, or we see its
        // state and do not sleep.
        self.waiters.store(1, Ordering::Relaxed);
        let fenced = asym::heavy();
        loop {
            if let Some(result) = self.outcome() {
                return Some(result);
            }
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return None,
                },
            };
            // Without the fence a wake-up could be missed: poll instead of sleeping for good.
            let timeout = if fenced {
                timeout
            } else {
                Some(timeout.map_or(POLL_INTERVAL, |t| t.min(POLL_INTERVAL)))
            };
            // Returns at once if the word is no longer PENDING; spurious returns and timeouts
            // loop back to the re-read above.
            self.state.wait(PENDING, timeout);
        }
    }
}

impl<E> Drop for Slot<E> {
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) == FAILED {
            self.error.with_mut(|error| {
                // SAFETY: FAILED is stored only after `error` was initialised; `&mut self` means
                // no borrow of it is alive, and the slot is dropped once, so this is the single
                // drop of that value.
                unsafe { (*error).assume_init_drop() }
            });
        }
    }
}

/// The counts of a queue's shared part, on a cache line of their own (registering writes
/// them; completions read the line after, which changes rarely).
struct Counts {
    /// Counted references; the queue is freed when they reach 0 (see the module docs).
    refs: AtomicUsize,
    /// Live [`CompletionQueue`] handles; the last one to go closes the queue.
    handles: AtomicUsize,
}

/// The part of a queue that does not depend on `E`: what claims and lanes need. The first
/// field of the `repr(C)` `Inner<E>`, so a pointer to an `Inner<E>` is a pointer to its hub.
struct Hub {
    counts: CachePadded<Counts>,
    /// Set when the last handle is dropped: nobody can drain any more.
    closed: AtomicBool,
    /// The list of lanes, newest first. Only pushed onto (CAS); freed with the queue.
    lanes: AtomicPtr<Lane>,
    /// False only in tests of the fallback: every event goes to the shared list.
    lanes_enabled: bool,
    /// Frees the `Inner<E>` this hub heads (the last count calls it).
    free: unsafe fn(NonNull<Hub>),
    _leak: LeakCheck,
}

impl Hub {
    /// Takes one more count.
    fn acquire(&self) {
        if self.counts.refs.fetch_add(1, Ordering::Relaxed) > MAX_REFS {
            std::process::abort();
        }
    }

    /// Gives up `n` counts, freeing the queue if they were the last.
    ///
    /// # Safety
    /// The caller owns `n` counts of the queue `hub` heads, and does not use them afterwards.
    unsafe fn release(hub: NonNull<Hub>, n: usize) {
        if n == 0 {
            return;
        }
        // SAFETY: the caller's counts keep the hub alive until the `fetch_sub`.
        let this = unsafe { hub.as_ref() };
        // Release, then Acquire once zero: every owner's accesses happen-before the free.
        if this.counts.refs.fetch_sub(n, Ordering::Release) != n {
            return;
        }
        fence(Ordering::Acquire);
        let free = this.free;
        // SAFETY: that was the last count: nobody else can reach the queue.
        unsafe { free(hub) };
    }

    /// Claims a released lane of this queue, or adds a new, claimed one.
    fn claim_lane(&self) -> NonNull<Lane> {
        let mut p = self.lanes.load(Ordering::Acquire);
        while let Some(lane) = NonNull::new(p) {
            // SAFETY: lanes are freed only with the queue, which the caller keeps alive.
            let lane = unsafe { lane.as_ref() };
            if lane
                .claimed
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return NonNull::from(lane);
            }
            // Set before the lane was published; our Acquire load of the head (a later link
            // of the same release sequence of CASes) makes it visible.
            p = lane.next.load(Ordering::Relaxed);
        }
        let lane = NonNull::from(Box::leak(Lane::new_claimed()));
        let mut head = self.lanes.load(Ordering::Relaxed);
        loop {
            // SAFETY: the lane is not shared yet.
            unsafe { lane.as_ref() }.next.store(head, Ordering::Relaxed);
            match self.lanes.compare_exchange_weak(
                head,
                lane.as_ptr(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return lane,
                Err(now) => head = now,
            }
        }
    }
}

/// A block of a lane: entries written once each, in order, by the lane's producer.
struct Segment {
    /// Slot pointers (`Arc::into_raw`), null until written.
    entries: [AtomicPtr<()>; SEGMENT_LEN],
    /// The next segment, set by the producer once every entry here is written.
    next: AtomicPtr<Segment>,
    _leak: LeakCheck,
}

impl Segment {
    fn alloc() -> *mut Segment {
        Box::into_raw(Box::new(Segment {
            entries: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            next: AtomicPtr::new(ptr::null_mut()),
            _leak: LeakCheck::new(),
        }))
    }
}

/// The producer's position in a lane.
struct ProducerCursor {
    /// The segment being filled.
    segment: *mut Segment,
    /// Entries posted to this lane before `segment`.
    base: usize,
    /// Entries posted to this lane in all (so `posted - base` are in `segment`). One counter
    /// serves as the position and, for a claim, as the count of posts it holds counts for.
    posted: usize,
}

/// The consumer's position in a lane.
struct ConsumerCursor {
    segment: *mut Segment,
    index: usize,
}

/// A single-producer, single-consumer queue of slot pointers (see the module docs). The
/// producer is the thread holding the claim, the consumer the holder of `draining`.
struct Lane {
    /// The next lane of the queue's list: set before the lane is published, then constant.
    next: AtomicPtr<Lane>,
    /// Held by the thread that posts to this lane.
    claimed: AtomicBool,
    /// Where the next entry goes. Only the claim holder touches it; the claim's
    /// Acquire/Release hands it from one holder to the next.
    producer: CachePadded<UnsafeCell<ProducerCursor>>,
    /// The next entry to read. Only the consumer touches it.
    consumer: CachePadded<UnsafeCell<ConsumerCursor>>,
    _leak: LeakCheck,
}

impl Lane {
    fn new_claimed() -> Box<Lane> {
        let segment = Segment::alloc();
        Box::new(Lane {
            next: AtomicPtr::new(ptr::null_mut()),
            claimed: AtomicBool::new(true),
            producer: CachePadded::new(UnsafeCell::new(ProducerCursor {
                segment,
                base: 0,
                posted: 0,
            })),
            consumer: CachePadded::new(UnsafeCell::new(ConsumerCursor { segment, index: 0 })),
            _leak: LeakCheck::new(),
        })
    }

    /// Entries posted to this lane so far.
    ///
    /// # Safety
    /// The caller holds the lane's claim.
    unsafe fn posted(&self) -> usize {
        // SAFETY: the claim makes us the only user of the producer cursor.
        self.producer.with(|cursor| unsafe { (*cursor).posted })
    }

    /// Appends `entry` if the current segment has room (no allocation, no call): one store of
    /// the entry, one of the count.
    ///
    /// # Safety
    /// The caller holds the lane's claim; `entry` is non-null.
    #[inline]
    unsafe fn try_push(&self, entry: *mut ()) -> bool {
        self.producer.with_mut(|cursor| {
            // SAFETY: the claim makes us the only user of the producer cursor.
            let cursor = unsafe { &mut *cursor };
            let index = cursor.posted - cursor.base;
            if index == SEGMENT_LEN {
                return false;
            }
            // SAFETY: the producer's segment is alive (the consumer frees a segment only after
            // seeing its `next` set, which the producer does after its last access to it).
            // Release publishes the slot (state, error) and the Arc behind `entry` to the
            // consumer's Acquire load.
            unsafe { &*cursor.segment }.entries[index].store(entry, Ordering::Release);
            cursor.posted += 1;
            true
        })
    }

    /// Appends `entry`, allocating the next segment if the current one is full.
    ///
    /// # Safety
    /// As [`Lane::try_push`].
    unsafe fn push(&self, entry: *mut ()) {
        // SAFETY: the caller's contract.
        if unsafe { self.try_push(entry) } {
            return;
        }
        let next = Segment::alloc();
        self.producer.with_mut(|cursor| {
            // SAFETY: the claim makes us the only user of the producer cursor.
            let cursor = unsafe { &mut *cursor };
            // SAFETY: as in `try_push`; this is our last access to the full segment, and
            // Release hands it, with its entries, to the consumer.
            unsafe { &*cursor.segment }
                .next
                .store(next, Ordering::Release);
            cursor.segment = next;
            cursor.base = cursor.posted;
        });
        // SAFETY: the caller's contract; the new segment is empty.
        let pushed = unsafe { self.try_push(entry) };
        debug_assert!(pushed, "a fresh segment has room");
    }

    /// Hands every entry posted so far to `f`, in order, and returns how many. Frees the
    /// segments it leaves.
    ///
    /// # Safety
    /// The caller is the queue's only consumer (holds `draining`, or has the queue to itself).
    unsafe fn drain(&self, mut f: impl FnMut(*mut ())) -> usize {
        self.consumer.with_mut(|cursor| {
            // SAFETY: single consumer (the caller's contract).
            let cursor = unsafe { &mut *cursor };
            let mut moved = 0;
            loop {
                if cursor.index == SEGMENT_LEN {
                    // SAFETY: the consumer's segment is alive: only the consumer frees it.
                    let next = unsafe { &*cursor.segment }.next.load(Ordering::Acquire);
                    if next.is_null() {
                        break;
                    }
                    // SAFETY: `next` is set, so the producer is done with this segment, and
                    // every entry of it has been read; it came from `Box::into_raw`.
                    drop(unsafe { Box::from_raw(cursor.segment) });
                    *cursor = ConsumerCursor {
                        segment: next,
                        index: 0,
                    };
                }
                // SAFETY: as above.
                let entry =
                    unsafe { &*cursor.segment }.entries[cursor.index].load(Ordering::Acquire);
                if entry.is_null() {
                    break;
                }
                // Advance first: if `f` unwinds, the entry it was given is not read again.
                cursor.index += 1;
                moved += 1;
                f(entry);
            }
            moved
        })
    }
}

impl Drop for Lane {
    /// Frees the segments. The entries must have been drained (the queue does, typed).
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no producer or consumer is left.
        let mut segment = self.consumer.with(|cursor| unsafe { (*cursor).segment });
        while !segment.is_null() {
            // SAFETY: every segment from the consumer's on came from `Box::into_raw` and is
            // linked once; nothing else frees them.
            let boxed = unsafe { Box::from_raw(segment) };
            segment = boxed.next.load(Ordering::Relaxed);
        }
    }
}

/// A thread's claim on a lane of one queue. It holds one count of the queue per post made
/// through it (at least one: a claim is made to post), so the queue and its lanes outlive it.
struct Claim {
    hub: NonNull<Hub>,
    lane: NonNull<Lane>,
    /// The lane's `posted` when the claim was made: the claim holds `posted - start` counts.
    start: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // SAFETY: the claim's counts keep the queue, and with it the lane, alive until the
        // release below; we hold the claim, so we may read the producer cursor.
        let lane = unsafe { self.lane.as_ref() };
        // SAFETY: as above.
        let owed = unsafe { lane.posted() } - self.start;
        lane.claimed.store(false, Ordering::Release);
        // SAFETY: the counts are ours (one per post through this claim), given up once here.
        unsafe { Hub::release(self.hub, owed) };
    }
}

/// A thread's claims, most recently used first, at most `MAX_CLAIMS`.
struct Claims {
    /// Set while the slow path runs (it allocates and may claim or release): a post re-entering
    /// from there (from an allocator, say) takes the fallback list instead.
    busy: Cell<bool>,
    /// Only touched by this thread, through `post_to_lane`, while not `busy`.
    list: std::cell::UnsafeCell<Vec<Claim>>,
}

impl Claims {
    const fn new() -> Self {
        Self {
            busy: Cell::new(false),
            list: std::cell::UnsafeCell::new(Vec::new()),
        }
    }
}

#[cfg(not(loom))]
thread_local! {
    static CLAIMS: Claims = const { Claims::new() };
}

// Loom's macro takes no `const` initialiser; it drops the value when the modelled thread ends.
#[cfg(loom)]
loom::thread_local! {
    static CLAIMS: Claims = Claims::new();
}

/// Clears `Claims::busy` when the slow path ends, even by unwinding.
struct BusyGuard<'a>(&'a Cell<bool>);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// Why an event did not go into a lane.
enum Rejected {
    /// The queue is closed: nobody will drain the event.
    Closed,
    /// No lane could be used (thread-locals being destroyed, a re-entrant call, lanes off).
    NoLane,
}

/// Posts `entry` to this thread's lane of the queue `hub` heads.
///
/// # Safety
/// The caller owns one count of the queue and `entry` (a slot's `Arc` count, non-null). On
/// `Ok` both are handed over: the entry to the lane, the count to the thread's claim. On `Err`
/// the caller keeps both.
#[inline]
unsafe fn post_to_lane(hub: NonNull<Hub>, entry: *mut ()) -> Result<(), Rejected> {
    CLAIMS
        .try_with(|claims| {
            if claims.busy.get() {
                return Err(Rejected::NoLane);
            }
            // The fast path: the most recent claim is this queue's and its segment has room.
            // No call, no allocation, nothing that could re-enter: a few loads, the entry
            // store and the count store.
            {
                // SAFETY: not busy, and nothing in this block calls out, so this is the only
                // reference to the list.
                let list = unsafe { &*claims.list.get() };
                if let Some(claim) = list.first() {
                    // SAFETY: the caller's count keeps the hub alive.
                    let closed = unsafe { hub.as_ref() }.closed.load(Ordering::Relaxed);
                    // SAFETY: we hold the claim; its counts keep the lane alive; `entry` is
                    // the caller's, handed over on success (its count joins the claim's,
                    // which `posted` now counts).
                    if claim.hub == hub && !closed && unsafe { claim.lane.as_ref().try_push(entry) }
                    {
                        return Ok(());
                    }
                }
            }
            claims.busy.set(true);
            let guard = BusyGuard(&claims.busy);
            // Claims dropped here release counts, which may free a queue and run `E`'s
            // destructor: that happens after the list is no longer borrowed.
            let mut evicted = Vec::new();
            // SAFETY: busy, so this is the only reference to the list until `guard` drops;
            // the caller's contract is passed on.
            let posted = unsafe { post_slow(&mut *claims.list.get(), hub, entry, &mut evicted) };
            drop(guard);
            drop(evicted);
            posted
        })
        .unwrap_or(Err(Rejected::NoLane))
}

/// [`post_to_lane`] past its fast path, with the thread's claims borrowed; claims to drop
/// go to `evicted`.
///
/// # Safety
/// As [`post_to_lane`].
#[cold]
unsafe fn post_slow(
    claims: &mut Vec<Claim>,
    hub: NonNull<Hub>,
    entry: *mut (),
    evicted: &mut Vec<Claim>,
) -> Result<(), Rejected> {
    // SAFETY: the caller's count keeps the hub alive.
    let queue = unsafe { hub.as_ref() };
    // A cached claim keeps its queue alive, so an equal address is the same queue.
    if let Some(i) = claims.iter().position(|claim| claim.hub == hub) {
        // Relaxed: a post that misses a concurrent close only lingers until the queue is
        // freed (see the module docs).
        if queue.closed.load(Ordering::Relaxed) {
            evicted.push(claims.remove(i));
            return Err(Rejected::Closed);
        }
        // SAFETY: we hold the claim; the lane is alive while the claim holds counts.
        unsafe { claims[i].lane.as_ref().push(entry) };
        claims[..=i].rotate_right(1);
        return Ok(());
    }
    if queue.closed.load(Ordering::Relaxed) {
        return Err(Rejected::Closed);
    }
    if !queue.lanes_enabled {
        return Err(Rejected::NoLane);
    }
    // Release the claims of queues closed meanwhile, and make room.
    let mut i = 0;
    while i < claims.len() {
        // SAFETY: a cached claim keeps its queue alive.
        if unsafe { claims[i].hub.as_ref() }
            .closed
            .load(Ordering::Relaxed)
        {
            evicted.push(claims.remove(i));
        } else {
            i += 1;
        }
    }
    if claims.len() >= MAX_CLAIMS {
        evicted.extend(claims.pop());
    }
    let lane = queue.claim_lane();
    // SAFETY: just claimed (the claim's Acquire makes the cursor ours); the caller's count
    // keeps the lane alive until the claim holds one.
    let start = unsafe { lane.as_ref().posted() };
    // SAFETY: as above.
    unsafe { lane.as_ref().push(entry) };
    claims.insert(0, Claim { hub, lane, start });
    Ok(())
}

/// The queue's shared part: the hub (counts, lanes), the shared fallback list (Vyukov's MPSC,
/// see the module docs) and the consumer flag. Counted by hand (`Hub::refs`), freed by
/// `free_inner`.
#[repr(C)]
struct Inner<E> {
    /// Must stay first: claims and lanes reach the queue as a `NonNull<Hub>`.
    hub: Hub,
    /// Producers' end of the fallback list: the node pushed last. Never null (the stub at worst).
    head: CachePadded<AtomicPtr<Slot<E>>>,
    /// Consumer's end of the fallback list: the oldest node not yet popped (possibly the stub).
    /// Accessed only by the holder of `draining`, or under `&mut`.
    tail: CachePadded<UnsafeCell<*mut Slot<E>>>,
    /// The consumer's try-lock.
    draining: AtomicBool,
    /// Whether completions are queued at all.
    events: bool,
    /// The stub node. Its state stays PENDING; its address is stable because `Inner` lives in
    /// a `Box` from birth.
    stub: Slot<E>,
}

/// Frees an `Inner<E>` (the hub's `free`).
///
/// # Safety
/// `hub` heads an `Inner<E>` made by [`CompletionQueue::new`], whose last count the caller
/// just gave up.
unsafe fn free_inner<E>(hub: NonNull<Hub>) {
    // SAFETY: `Inner<E>` is `repr(C)` with the hub first, and the pointer came from
    // `Box::into_raw` of that `Inner<E>` (cast, keeping its provenance); nobody else holds it.
    drop(unsafe { Box::from_raw(hub.cast::<Inner<E>>().as_ptr()) });
}

impl<E> Inner<E> {
    fn stub_ptr(&self) -> *mut Slot<E> {
        ptr::from_ref(&self.stub).cast_mut()
    }

    /// Pushes `node` onto the fallback list (Vyukov's `mpscq_push`). Wait-free: one swap, one
    /// store.
    ///
    /// # Safety
    /// `node` is the stub or comes from `Arc::into_raw` (the queue takes over that count); it is
    /// not in the list now.
    unsafe fn push(&self, node: *mut Slot<E>) {
        // SAFETY: `node` is alive: the stub lives in `self`, a slot through the count the
        // caller handed over.
        unsafe { &*node }
            .next
            .store(ptr::null_mut(), Ordering::Relaxed);
        let prev = self.head.swap(node, Ordering::AcqRel);
        // SAFETY: `prev` is in the list and cannot have been popped: pop releases a node only
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

    /// Pops the oldest slot of the fallback list (Vyukov's `mpscq_pop`). `None` when empty, or
    /// when the next node's producer is between its swap and its link: the node stays for a
    /// later pop.
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
            // SAFETY: the stub is not in the list: it was passed (tail != stub) and is only
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

    /// Hands every queued slot to `f` — the lanes, then the fallback list — and returns how
    /// many.
    ///
    /// # Safety
    /// The caller is the only consumer (holds `draining`, or has the queue to itself).
    unsafe fn drain(&self, mut f: impl FnMut(Arc<Slot<E>>)) -> usize {
        let mut moved = 0;
        let mut p = self.hub.lanes.load(Ordering::Acquire);
        while let Some(lane) = NonNull::new(p) {
            // SAFETY: lanes live as long as the queue, which the caller holds.
            let lane = unsafe { lane.as_ref() };
            // SAFETY: single consumer (caller's contract); a lane's entries of this queue are
            // `Arc::into_raw` of `Slot<E>` counts, which the queue owns and now hands over.
            moved += unsafe { lane.drain(|entry| f(Arc::from_raw(entry.cast::<Slot<E>>()))) };
            p = lane.next.load(Ordering::Relaxed);
        }
        // SAFETY: single consumer.
        while let Some(slot) = unsafe { self.pop() } {
            moved += 1;
            f(slot);
        }
        moved
    }

    /// Called by the last [`CompletionQueue`] to go: marks the queue closed and drops what is
    /// queued, since nobody can drain it any more.
    fn close(&self) {
        self.hub.closed.store(true, Ordering::Release);
        if self
            .draining
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return; // cannot happen (no handle is left to drain); freed with the queue then
        }
        let _guard = DrainGuard(&self.draining);
        // SAFETY: we hold `draining`.
        unsafe { self.drain(drop) };
    }
}

impl<E> Drop for Inner<E> {
    fn drop(&mut self) {
        // `&mut self`: no drain is running, and no producer exists (each `Completer` of an
        // events queue holds a count until it has posted, each post through a claim keeps one
        // until the claim is gone), so both queues are consistent and drain finds everything.
        // SAFETY: `&mut self` makes us the only consumer.
        unsafe { self.drain(drop) };
        let mut p = self.hub.lanes.load(Ordering::Acquire);
        while let Some(lane) = NonNull::new(p) {
            // SAFETY: lanes come from `Box::leak` in `claim_lane` and are freed only here; no
            // claim is left (it would hold a count).
            let lane = unsafe { Box::from_raw(lane.as_ptr()) };
            p = lane.next.load(Ordering::Relaxed);
            drop(lane);
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
/// Cheap to clone (a counted pointer); `Send + Sync` when `E: Send + Sync`. Dropping the last
/// clone drops the queued events that were not drained.
pub struct CompletionQueue<E> {
    inner: NonNull<Inner<E>>,
    _owns: PhantomData<Inner<E>>,
}

// SAFETY: the queue's shared state is built for concurrent use (atomics; `tail` and the lane
// cursors behind the `draining` flag or a claim); the slots it holds are `Send + Sync` for
// `E: Send + Sync`.
unsafe impl<E: Send + Sync> Send for CompletionQueue<E> {}
// SAFETY: as for `Send`.
unsafe impl<E: Send + Sync> Sync for CompletionQueue<E> {}

impl<E> CompletionQueue<E> {
    fn inner(&self) -> &Inner<E> {
        // SAFETY: our count keeps the queue alive.
        unsafe { self.inner.as_ref() }
    }
}

impl<E> Clone for CompletionQueue<E> {
    fn clone(&self) -> Self {
        let hub = &self.inner().hub;
        hub.counts.handles.fetch_add(1, Ordering::Relaxed);
        hub.acquire();
        Self {
            inner: self.inner,
            _owns: PhantomData,
        }
    }
}

impl<E> Drop for CompletionQueue<E> {
    fn drop(&mut self) {
        let inner = self.inner();
        if inner.hub.counts.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            inner.close();
        }
        // SAFETY: we own one count, given up here.
        unsafe { Hub::release(self.inner.cast(), 1) };
    }
}

impl<E> fmt::Debug for CompletionQueue<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("events", &self.inner().events)
            .finish_non_exhaustive()
    }
}

impl<E: From<Abandoned> + Send + Sync + 'static> CompletionQueue<E> {
    /// A new queue. With `events = false` it only makes handles and keeps nothing for
    /// [`CompletionQueue::try_drain`]; with `events = true` every completed operation is also
    /// queued, once, until drained.
    pub fn new(events: bool) -> Self {
        Self::with_lanes(events, true)
    }

    /// A queue whose events all take the shared fallback list (for the loom models of it).
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn new_without_lanes(events: bool) -> Self {
        Self::with_lanes(events, false)
    }

    fn with_lanes(events: bool, lanes_enabled: bool) -> Self {
        // Decide the fence flavour now, off the completion path.
        asym::init();
        let inner = Box::new(Inner {
            hub: Hub {
                counts: CachePadded::new(Counts {
                    refs: AtomicUsize::new(1),
                    handles: AtomicUsize::new(1),
                }),
                closed: AtomicBool::new(false),
                lanes: AtomicPtr::new(ptr::null_mut()),
                lanes_enabled,
                free: free_inner::<E>,
                _leak: LeakCheck::new(),
            },
            head: CachePadded::new(AtomicPtr::new(ptr::null_mut())),
            tail: CachePadded::new(UnsafeCell::new(ptr::null_mut())),
            draining: AtomicBool::new(false),
            events,
            stub: Slot::new(u64::MAX),
        });
        let inner = NonNull::from(Box::leak(inner));
        let queue = Self {
            inner,
            _owns: PhantomData,
        };
        let stub = queue.inner().stub_ptr();
        queue.inner().head.store(stub, Ordering::Relaxed);
        // SAFETY: the queue has not been shared yet, so this is the only access to `tail`.
        unsafe { queue.inner().set_tail(stub) };
        queue
    }

    /// Whether completed operations are queued for [`CompletionQueue::try_drain`].
    pub fn events(&self) -> bool {
        self.inner().events
    }

    /// Starts tracking operation `id` (the caller's id, reported back by [`Handle::id`]).
    /// Allocates once (the shared slot).
    pub fn register(&self, id: u64) -> (Handle<E>, Completer<E>) {
        let slot = Arc::new(Slot::new(id));
        let handle = Handle {
            slot: Arc::clone(&slot),
        };
        let queue = self.inner().events.then(|| {
            self.inner().hub.acquire();
            QueueRef { inner: self.inner }
        });
        let completer = Completer {
            slot: ManuallyDrop::new(slot),
            queue,
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
    /// later one. A completion still in flight on another thread can miss this drain and is
    /// delivered by the next one; so 0 does not prove nothing finished, and callers keep
    /// draining (e.g. after each [`Handle::wait`]). Operations completed on different threads
    /// may come in any order.
    pub fn try_drain(&self, out: &mut Vec<Handle<E>>) -> usize {
        let inner = self.inner();
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
        // SAFETY: we hold `draining`, so we are the only consumer until `_guard` drops.
        unsafe { inner.drain(|slot| out.push(Handle { slot })) }
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

/// One count of an events queue, held by a [`Completer`] until it posts.
struct QueueRef<E> {
    inner: NonNull<Inner<E>>,
}

// SAFETY: a count of a `CompletionQueue<E>`, which is `Send + Sync` under the same bounds.
unsafe impl<E: Send + Sync> Send for QueueRef<E> {}
// SAFETY: as for `Send`.
unsafe impl<E: Send + Sync> Sync for QueueRef<E> {}

impl<E> QueueRef<E> {
    /// Queues the completed `slot`, handing over the slot's count and this queue count.
    #[inline]
    fn post(self, slot: Arc<Slot<E>>) {
        let this = ManuallyDrop::new(self);
        let hub = this.inner.cast::<Hub>();
        let entry = Arc::into_raw(slot).cast_mut();
        // SAFETY: our count keeps the queue alive and `entry` is a slot count we own; on `Ok`
        // both went to the lane and this thread's claim.
        match unsafe { post_to_lane(hub, entry.cast::<()>()) } {
            Ok(()) => {}
            Err(Rejected::Closed) => {
                // Nobody will drain it.
                // SAFETY: `entry` is still ours (from `Arc::into_raw` above).
                drop(unsafe { Arc::from_raw(entry) });
                // SAFETY: our count, given up once.
                unsafe { Hub::release(hub, 1) };
            }
            Err(Rejected::NoLane) => {
                // SAFETY: our count keeps the queue alive; `entry` comes from `Arc::into_raw`
                // and was never queued (a slot is posted once).
                unsafe { this.inner.as_ref().push(entry) };
                // SAFETY: our count, given up once, after the push (the queue's `Drop` finds it).
                unsafe { Hub::release(hub, 1) };
            }
        }
    }
}

impl<E> Drop for QueueRef<E> {
    fn drop(&mut self) {
        // SAFETY: our count, given up once (`post` forgets `self` instead).
        unsafe { Hub::release(self.inner.cast(), 1) };
    }
}

/// The runtime's end of one operation: exactly one per operation, not `Clone`; `Send` when
/// `E: Send + Sync`.
///
/// [`Completer::complete`] consumes it; dropping it without completing fails the operation
/// with `E::from(Abandoned)`, so a waiter is never left hanging.
pub struct Completer<E: From<Abandoned>> {
    /// Taken exactly once: by `complete`, or else by `Drop`.
    slot: ManuallyDrop<Arc<Slot<E>>>,
    /// The queue to post the completion to (`events = true` only).
    queue: Option<QueueRef<E>>,
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
    /// queues the event for [`CompletionQueue::try_drain`] (no lock; no allocation but one
    /// segment per 511 events of a thread).
    #[inline]
    pub fn complete(self, result: Result<(), E>) {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is not dropped, so `Drop` will not take the slot again.
        let slot = unsafe { ManuallyDrop::take(&mut this.slot) };
        let queue = this.queue.take();
        finish(slot, queue, result);
    }
}

impl<E: From<Abandoned>> Drop for Completer<E> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once, and only if `complete` did not take the slot.
        let slot = unsafe { ManuallyDrop::take(&mut self.slot) };
        finish(slot, self.queue.take(), Err(E::from(Abandoned)));
    }
}

/// Publishes `result` in `slot`, then posts it to `queue`, or drops the completer's count.
#[inline]
fn finish<E>(slot: Arc<Slot<E>>, queue: Option<QueueRef<E>>, result: Result<(), E>) {
    slot.publish(result);
    match queue {
        None => drop(slot),
        Some(queue) => queue.post(slot),
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
        drain_each_op_exactly_once_many_producers(CompletionQueue::new(true));
    }

    #[test]
    fn cq_drain_each_op_exactly_once_many_producers_fallback_list() {
        drain_each_op_exactly_once_many_producers(CompletionQueue::with_lanes(true, false));
    }

    fn drain_each_op_exactly_once_many_producers(cq: CompletionQueue<TestError>) {
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 10_000;
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
        concurrent_drainers_share_without_duplicates(CompletionQueue::new(true));
    }

    #[test]
    fn cq_concurrent_drainers_share_without_duplicates_fallback_list() {
        concurrent_drainers_share_without_duplicates(CompletionQueue::with_lanes(true, false));
    }

    fn concurrent_drainers_share_without_duplicates(cq: CompletionQueue<TestError>) {
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
        cq.inner().draining.store(true, Ordering::SeqCst); // pretend another consumer is active
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 0);
        cq.inner().draining.store(false, Ordering::SeqCst);
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
        drop_with_queued_items_frees_everything_once(CompletionQueue::new(true));
    }

    #[test]
    fn cq_drop_with_queued_items_frees_everything_once_fallback_list() {
        drop_with_queued_items_frees_everything_once(CompletionQueue::with_lanes(true, false));
    }

    fn drop_with_queued_items_frees_everything_once(cq: CompletionQueue<Counted>) {
        let drops = std::sync::Arc::new(AtomicUsize::new(0));
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

    impl<E> CompletionQueue<E> {
        /// Lanes in the queue's list.
        fn lane_count(&self) -> usize {
            let mut n = 0;
            let mut p = self.inner().hub.lanes.load(Ordering::Acquire);
            while let Some(lane) = NonNull::new(p) {
                n += 1;
                // SAFETY: lanes live as long as the queue.
                p = unsafe { lane.as_ref() }.next.load(Ordering::Relaxed);
            }
            n
        }
    }

    fn claims_of_this_thread() -> usize {
        // SAFETY: no post is running on this thread, so nothing else borrows the list.
        CLAIMS.with(|claims| unsafe { (*claims.list.get()).len() })
    }

    #[test]
    fn cq_events_cross_segments_in_order_per_thread() {
        let cq = CompletionQueue::<TestError>::new(true);
        let n = 3 * SEGMENT_LEN as u64 + 7;
        let mut out = Vec::new();
        let mut next = 0;
        // Drains of every size in between posts, across segment boundaries.
        for chunk in [
            1,
            SEGMENT_LEN as u64 - 1,
            2,
            SEGMENT_LEN as u64,
            SEGMENT_LEN as u64 + 3,
            1,
        ] {
            for _ in 0..chunk {
                cq.register(next).1.complete(Ok(()));
                next += 1;
            }
            cq.try_drain(&mut out);
        }
        while next < n {
            cq.register(next).1.complete(Ok(()));
            next += 1;
        }
        cq.try_drain(&mut out);
        let ids: Vec<u64> = out.iter().map(Handle::id).collect();
        assert_eq!(
            ids,
            (0..n).collect::<Vec<_>>(),
            "one thread's events come in order"
        );
        assert_eq!(cq.lane_count(), 1);
    }

    #[test]
    fn cq_lanes_are_reused_by_later_threads() {
        let cq = CompletionQueue::<TestError>::new(true);
        for round in 0..4 {
            let completers: Vec<_> = (0..700).map(|i| cq.register(round * 700 + i).1).collect();
            thread::spawn(move || completers.into_iter().for_each(|c| c.complete(Ok(()))))
                .join()
                .unwrap();
        }
        // Each thread released its claim on exit; the next one took the same lane over, at
        // the cell where the previous one stopped.
        assert_eq!(cq.lane_count(), 1);
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 2800);
        let ids: Vec<u64> = out.iter().map(Handle::id).collect();
        assert_eq!(ids, (0..2800).collect::<Vec<_>>());
        // Two threads at once need two lanes.
        let (a, b): (Vec<_>, Vec<_>) = (0..2000)
            .map(|i| cq.register(i).1)
            .partition(|c| c.id() % 2 == 0);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = [a, b]
            .into_iter()
            .map(|list| {
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let mut list = list.into_iter();
                    if let Some(c) = list.next() {
                        c.complete(Ok(())); // claims a lane
                    }
                    barrier.wait(); // both hold a claim now
                    list.for_each(|c| c.complete(Ok(())));
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(cq.lane_count(), 2);
        out.clear();
        assert_eq!(cq.try_drain(&mut out), 2000);
    }

    #[test]
    fn cq_claims_are_bounded_and_release_their_queues() {
        let drops = std::sync::Arc::new(AtomicUsize::new(0));
        let d = drops.clone();
        thread::spawn(move || {
            // Open queues: the cache keeps the most recent MAX_CLAIMS claims.
            let queues: Vec<_> = (0..MAX_CLAIMS + 2)
                .map(|_| CompletionQueue::<Counted>::new(true))
                .collect();
            let mut handles = Vec::new();
            for (i, cq) in queues.iter().enumerate() {
                let (h, c) = cq.register(i as u64);
                handles.push(h);
                c.complete(Err(Counted(d.clone())));
                assert!(claims_of_this_thread() <= MAX_CLAIMS);
            }
            let mut out = Vec::new();
            for cq in &queues {
                assert_eq!(cq.try_drain(&mut out), 1);
            }
            drop(out);
            // Closed queues: their events are dropped at once, and the next miss drops their
            // claims (the counts they hold), so the queues are freed.
            drop(queues);
            for h in &handles {
                assert_eq!(std::sync::Arc::strong_count(&h.slot), 1);
            }
            let cq = CompletionQueue::<Counted>::new(true);
            let (h, c) = cq.register(99);
            c.complete(Err(Counted(d.clone())));
            assert_eq!(
                claims_of_this_thread(),
                1,
                "claims of closed queues are released"
            );
            drop(cq);
            assert_eq!(std::sync::Arc::strong_count(&h.slot), 1);
            drop(handles);
            drop(h);
            assert_eq!(d.load(Ordering::SeqCst), MAX_CLAIMS + 3);
        })
        .join()
        .unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), MAX_CLAIMS + 3);
    }

    #[test]
    fn cq_completions_racing_the_last_drop_free_everything_once() {
        let drops = std::sync::Arc::new(AtomicUsize::new(0));
        for round in 0..50 {
            let cq = CompletionQueue::<Counted>::new(true);
            let completers: Vec<_> = (0..200).map(|i| cq.register(i).1).collect();
            let d = drops.clone();
            let producer = thread::spawn(move || {
                for c in completers {
                    c.complete(Err(Counted(d.clone())));
                }
            });
            if round % 2 == 0 {
                thread::yield_now();
            }
            drop(cq); // closes while the producer posts
            producer.join().unwrap();
        }
        // Every error was dropped exactly once: with the queue, or by a late completion, or
        // (for a post that raced the close) when the producer's claim went with its thread.
        assert_eq!(drops.load(Ordering::SeqCst), 50 * 200);
    }

    #[test]
    fn cq_wait_never_misses_a_racing_complete() {
        // Delays around the end of the waiter's spin phase, so that waiters go to sleep
        // (announce, heavy fence, futex) just as the completer stores: a lost wake-up hangs.
        eprintln!("membarrier in use: {}", asym::init());
        for i in 0..600u64 {
            let cq = CompletionQueue::<TestError>::new(i % 3 == 0);
            let (h, c) = cq.register(i);
            let waiters: Vec<_> = (0..(1 + i % 2))
                .map(|_| {
                    let h = h.clone();
                    thread::spawn(move || h.wait().is_ok())
                })
                .collect();
            let delay = Duration::from_micros(i % 40);
            let t0 = Instant::now();
            while t0.elapsed() < delay {
                std::hint::spin_loop();
            }
            c.complete(Ok(()));
            for w in waiters {
                assert!(w.join().unwrap());
            }
            assert_eq!(h.wait_timeout(Duration::ZERO), Some(Ok(())));
        }
    }
}
