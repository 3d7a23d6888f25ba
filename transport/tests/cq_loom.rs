//! Loom models of the completion queue (`bps_transport::cq`).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p bps-transport --test cq_loom --release`.
//!
//! Under loom the futex is modelled by a mutex + condvar with the futex contract, so a lost
//! wake-up makes every thread block and loom reports a deadlock; the asymmetric fence pair
//! (`membarrier` on real builds) is a pair of `SeqCst` fences, the contract the system call
//! gives; loom's `UnsafeCell` reports an error read that does not happen-after its write, or a
//! lane cursor used by two threads without a hand-over; loom's `Arc` reports leaks (the
//! slots, and a tracker in each queue, lane and lane segment). Lane segments hold two entries
//! under loom, so three posts cross a segment boundary.
//!
//! Models named `*_fallback_list` use a queue whose events all take the shared fallback list
//! (Vyukov's MPSC), which real builds use only while thread-locals are being destroyed.
#![cfg(loom)]

use bps_transport::cq::{Abandoned, CompletionQueue, Handle, Status};
use loom::thread;

#[derive(Debug, PartialEq)]
enum TestError {
    Abandoned,
    Code(u32),
}

impl From<Abandoned> for TestError {
    fn from(_: Abandoned) -> Self {
        TestError::Abandoned
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

/// What a concurrent observer may see: pending, or the whole result.
fn observe(h: &Handle<TestError>, expected: Result<(), &TestError>) {
    match h.status() {
        Status::Pending => {}
        Status::Done => assert_eq!(expected, Ok(())),
        // Failed: the error must be visible, complete, right now.
        Status::Failed => assert_eq!(h.result(), Some(expected)),
    }
    match h.result() {
        None => {}
        Some(r) => assert_eq!(r, expected),
    }
}

#[test]
fn complete_vs_status_error() {
    model(|| {
        let cq = CompletionQueue::<TestError>::new(false);
        let (h, c) = cq.register(1);
        let t = thread::spawn(move || c.complete(Err(TestError::Code(7))));
        observe(&h, Err(&TestError::Code(7)));
        t.join().unwrap();
        assert_eq!(h.status(), Status::Failed);
        assert_eq!(h.result(), Some(Err(&TestError::Code(7))));
    });
}

#[test]
fn complete_vs_status_ok_with_events() {
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
        let (h, c) = cq.register(1);
        let t = thread::spawn(move || c.complete(Ok(())));
        observe(&h, Ok(()));
        t.join().unwrap();
        assert_eq!(h.result(), Some(Ok(())));
        // Dropping the queue with the event still queued must free it (loom checks Arc leaks).
    });
}

#[test]
fn two_producers_one_consumer_each_once() {
    model(|| two_producers_one_consumer(CompletionQueue::new(true)));
}

#[test]
fn two_producers_one_consumer_each_once_fallback_list() {
    model(|| two_producers_one_consumer(CompletionQueue::new_without_lanes(true)));
}

fn two_producers_one_consumer(cq: CompletionQueue<TestError>) {
    let (_h1, c1) = cq.register(1);
    let (_h2, c2) = cq.register(2);
    let t1 = thread::spawn(move || c1.complete(Ok(())));
    let t2 = thread::spawn(move || c2.complete(Err(TestError::Code(2))));
    let mut out = Vec::new();
    // Two drains while the producers run: a pop that meets a half-linked push (Vyukov's
    // "inconsistent" state) must leave the queue intact for the next one.
    cq.try_drain(&mut out);
    cq.try_drain(&mut out);
    for h in &out {
        // A drained op is always finished, with its error visible.
        match h.id() {
            1 => assert_eq!(h.result(), Some(Ok(()))),
            2 => assert_eq!(h.result(), Some(Err(&TestError::Code(2)))),
            id => panic!("unknown id {id}"),
        }
    }
    t1.join().unwrap();
    t2.join().unwrap();
    cq.try_drain(&mut out);
    let mut ids: Vec<u64> = out.iter().map(Handle::id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
}

#[test]
fn producer_vs_consumer_then_drop_with_queued() {
    model(|| producer_vs_consumer_then_drop(CompletionQueue::new(true)));
}

#[test]
fn producer_vs_consumer_then_drop_with_queued_fallback_list() {
    model(|| producer_vs_consumer_then_drop(CompletionQueue::new_without_lanes(true)));
}

/// One producer completes two ops while the consumer drains once; the queue is then dropped
/// with whatever is left queued (no leak, no double free: loom checks the Arcs).
fn producer_vs_consumer_then_drop(cq: CompletionQueue<TestError>) {
    let (h1, c1) = cq.register(1);
    let (h2, c2) = cq.register(2);
    let t = thread::spawn(move || {
        c1.complete(Ok(()));
        drop(c2); // abandoned: Failed, and queued too
    });
    let mut out = Vec::new();
    cq.try_drain(&mut out);
    let mut ids: Vec<u64> = out.iter().map(Handle::id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), out.len(), "an op was drained twice");
    assert!(out.iter().all(|h| h.status().is_finished()));
    t.join().unwrap();
    drop(cq);
    assert_eq!(h2.result(), Some(Err(&TestError::Abandoned)));
    assert_eq!(h1.result(), Some(Ok(())));
}

#[test]
fn concurrent_drainers_each_op_once() {
    model(|| concurrent_drainers(CompletionQueue::new(true)));
}

#[test]
fn concurrent_drainers_each_op_once_fallback_list() {
    model(|| concurrent_drainers(CompletionQueue::new_without_lanes(true)));
}

fn concurrent_drainers(cq: CompletionQueue<TestError>) {
    let (_h, c) = cq.register(1);
    let other = cq.clone();
    let drainer = thread::spawn(move || {
        let mut out = Vec::new();
        other.try_drain(&mut out)
    });
    c.complete(Ok(()));
    let mut out = Vec::new();
    let mine = cq.try_drain(&mut out);
    let theirs = drainer.join().unwrap();
    let last = cq.try_drain(&mut out);
    assert_eq!(mine + theirs + last, 1, "op lost or drained twice");
}

#[test]
fn waiter_vs_completer_no_lost_wakeup() {
    model(|| {
        let cq = CompletionQueue::<TestError>::new(false);
        let (h, c) = cq.register(1);
        let waiter = thread::spawn(move || h.wait() == Ok(()));
        c.complete(Ok(()));
        assert!(waiter.join().unwrap());
    });
}

#[test]
fn two_waiters_vs_abandoning_completer() {
    model(|| {
        let cq = CompletionQueue::<TestError>::new(false);
        let (h, c) = cq.register(1);
        let h2 = h.clone();
        let w1 = thread::spawn(move || h.wait() == Err(&TestError::Abandoned));
        let w2 = thread::spawn(move || h2.wait() == Err(&TestError::Abandoned));
        drop(c);
        assert!(w1.join().unwrap());
        assert!(w2.join().unwrap());
    });
}

#[test]
fn waiter_vs_completer_with_events_no_lost_wakeup() {
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
        let (h, c) = cq.register(1);
        let waiter = thread::spawn(move || h.wait() == Err(&TestError::Code(3)));
        c.complete(Err(TestError::Code(3)));
        assert!(waiter.join().unwrap());
        let mut out = Vec::new();
        assert_eq!(cq.try_drain(&mut out), 1);
    });
}

#[test]
fn lane_crosses_segments_while_drained() {
    // A first thread posts op 0 and exits, leaving a released lane (loom's DPOR tracks only
    // the last access to each atomic, so a lane created during the drain would hide the
    // race: see `lane_published_to_spinning_consumer` for that). A second thread claims it
    // and posts ops 1-3 — filling the two-entry segment and starting the next — while the
    // consumer drains: nothing lost or seen twice, every drained op finished, and the consumer
    // frees the full segment only after the producer has moved on.
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
        let mut completers: Vec<_> = (0..4).map(|i| cq.register(i).1).collect();
        let first = completers.remove(0);
        thread::spawn(move || first.complete(Ok(())))
            .join()
            .unwrap();
        let t = thread::spawn(move || completers.into_iter().for_each(|c| c.complete(Ok(()))));
        let mut out = Vec::new();
        cq.try_drain(&mut out);
        assert!(out.iter().all(|h| h.result() == Some(Ok(()))));
        cq.try_drain(&mut out);
        assert!(out.iter().all(|h| h.result() == Some(Ok(()))));
        t.join().unwrap();
        cq.try_drain(&mut out);
        let ids: Vec<u64> = out.iter().map(Handle::id).collect();
        assert_eq!(
            ids,
            [0, 1, 2, 3],
            "one lane's posts arrive once each, in order"
        );
    });
}

#[test]
fn lane_published_to_spinning_consumer() {
    // A thread's first post creates its lane and pushes it onto the queue's list; a consumer
    // spinning on `try_drain` must find the lane fully built (its cursors and segment) and
    // the op finished.
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
        let (_h, c) = cq.register(7);
        let t = thread::spawn(move || c.complete(Err(TestError::Code(7))));
        let mut out = Vec::new();
        while cq.try_drain(&mut out) == 0 {
            thread::yield_now();
        }
        assert_eq!(out[0].result(), Some(Err(&TestError::Code(7))));
        t.join().unwrap();
    });
}

#[test]
fn lane_handed_over_between_threads() {
    // Two threads post in turn (the first may exit, releasing its claim, before the second
    // claims — then the second continues in the same lane at the first's cursor) while the
    // consumer drains; loom's cells check the cursor hand-over.
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
        let (_h1, c1) = cq.register(1);
        let (_h2, c2) = cq.register(2);
        let (_h3, c3) = cq.register(3);
        let t1 = thread::spawn(move || {
            c1.complete(Ok(()));
            c2.complete(Ok(()));
        });
        let t2 = thread::spawn(move || c3.complete(Ok(())));
        let mut out = Vec::new();
        cq.try_drain(&mut out);
        assert!(out.iter().all(|h| h.status().is_finished()));
        t1.join().unwrap();
        t2.join().unwrap();
        cq.try_drain(&mut out);
        let mut ids: Vec<u64> = out.iter().map(Handle::id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3]);
    });
}

#[test]
fn last_handle_dropped_while_completing() {
    // The only queue handle goes while a completer posts: the close drains what it finds, a
    // post that lands after it is freed with the queue (when the posting thread's claim goes),
    // a completion that sees the close posts nothing. No leak, no double free, either way.
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
        let (h1, c1) = cq.register(1);
        let (h2, c2) = cq.register(2);
        let t = thread::spawn(move || {
            c1.complete(Err(TestError::Code(1)));
            drop(c2);
        });
        drop(cq);
        t.join().unwrap();
        assert_eq!(h1.result(), Some(Err(&TestError::Code(1))));
        assert_eq!(h2.result(), Some(Err(&TestError::Abandoned)));
    });
}
