//! Loom models of the completion queue (`bps_transport::cq`).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p bps-transport --test cq_loom --release`.
//!
//! Under loom the futex is modelled by a mutex + condvar with the futex contract, so a lost
//! wake-up makes every thread block and loom reports a deadlock; loom's `UnsafeCell` reports
//! an error read that does not happen-after its write; loom's `Arc` reports leaks.
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
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
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
    });
}

#[test]
fn producer_vs_consumer_then_drop_with_queued() {
    // One producer completes two ops while the consumer drains once; the queue is then dropped
    // with whatever is left queued (no leak, no double free: loom checks the Arcs).
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
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
    });
}

#[test]
fn concurrent_drainers_each_op_once() {
    model(|| {
        let cq = CompletionQueue::<TestError>::new(true);
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
    });
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
