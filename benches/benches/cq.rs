//! Completion-queue benches.
//!
//! * `cq/throughput`: 1 or 2 producer threads complete operations that one consumer drains
//!   with `try_drain`, against the same number of messages through two baselines:
//!   - `array_queue` and `mpsc`: `u64` messages through `crossbeam_queue::ArrayQueue`
//!     (push / pop) and `std::sync::mpsc` (send / try_recv). Less work than a completion: no
//!     status is published for pollers, nobody can wait on a message, nothing is owned.
//!   - `array_queue_handles`: the same work as the completion queue, built from ArrayQueue:
//!     each operation has a shared, reference-counted state allocated at set-up (like a
//!     registered slot); the producer publishes the status with the waiter-aware `swap` a
//!     futex-based completion needs (its old value says whether a waiter sleeps) and pushes
//!     the `Arc` (the operation's ownership) into the ring; the consumer pops it into a `Vec`
//!     (like `try_drain`'s output), dropped after the clock stops.
//!
//!   Registering the operations (one allocation each) is set-up and the drained handles are
//!   dropped after the clock stops; thread start-up is inside the timed part for all alike.
//!   `inline` does the producers' work on the consumer's thread first: the cost of the
//!   operations without cache lines moving between cores.
//! * `cq/complete_to_seen`: one thread calls `Completer::complete` while another spins on
//!   `Handle::status`; the time from just before `complete()` to the poller seeing `Done`,
//!   on the shared monotonic clock (`Instant`). `cq/store_to_seen` is the same with a bare
//!   atomic store: the floor the machine sets. Besides criterion's mean, the bench prints
//!   the median and tail of a fixed number of rounds, since the target is on the median.
//!
//! For the throughput ratio the bench first prints the median ratio of 21 alternating runs
//! of each (completion queue against each baseline), steadier than criterion's figures
//! taken a minute apart on a shared machine, and the same pairing of ArrayQueue against
//! itself: how far the load alone moves such a ratio.
//!
//! `BPS_BENCH_CQ_MSGS` sets the messages per round (default 65536).
//!
//! Nothing is pinned: on a 2-vCPU machine the producer(s) and the consumer share two cores.

use std::cell::RefCell;
use std::hint::{black_box, spin_loop};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use bps_benches::{full_run, note_smoke_test, paired, percentile, summaries_wanted, Side};
use bps_transport::cq::{Abandoned, Completer, CompletionQueue, Handle, Status};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use crossbeam_queue::ArrayQueue;

/// The error type of the benched operations (never produced).
#[derive(Debug)]
struct BenchError;

impl From<Abandoned> for BenchError {
    fn from(_: Abandoned) -> Self {
        BenchError
    }
}

/// Splits `0..msgs` round-robin over `producers` lists (one list when `producers` is 0).
fn split<T>(msgs: usize, producers: usize, mut make: impl FnMut(u64) -> T) -> Vec<Vec<T>> {
    let n = producers.max(1);
    let mut lists: Vec<Vec<T>> = (0..n).map(|_| Vec::with_capacity(msgs / n + 1)).collect();
    for i in 0..msgs {
        lists[i % n].push(make(i as u64));
    }
    lists
}

/// The timed part of a round: one thread per list runs `produce` on it while this thread
/// calls `consume` (which returns how many messages it took) until `msgs` have arrived.
/// With `producers == 0` this thread produces everything first, then consumes: the cost of
/// the operations themselves, without cache lines moving between cores.
#[inline(never)] // a symbol of its own, for `--profile-time` under callgrind
fn timed<T: Send>(
    producers: usize,
    msgs: usize,
    lists: Vec<Vec<T>>,
    produce: impl Fn(Vec<T>) + Sync,
    mut consume: impl FnMut() -> usize,
) -> Duration {
    let start = Instant::now();
    thread::scope(|s| {
        if producers == 0 {
            lists.into_iter().for_each(&produce);
        } else {
            let produce = &produce;
            for list in lists {
                s.spawn(move || produce(list));
            }
        }
        let mut seen = 0;
        while seen < msgs {
            seen += consume();
        }
        start.elapsed()
    })
}

thread_local! {
    /// The consumer's `try_drain` output, kept between rounds so that its pages are already
    /// mapped (a fresh 512 KiB vector would take ~128 page faults inside the timed part,
    /// while the baselines' buffers are written before the clock starts).
    static DRAINED: RefCell<Vec<Handle<BenchError>>> = const { RefCell::new(Vec::new()) };
}

/// One round through the completion queue: producers `complete()`, the consumer
/// `try_drain()`s. Registering (one allocation per operation) is set-up, and the drained
/// handles are dropped after the clock stops.
fn cq_round(producers: usize, msgs: usize) -> Duration {
    let cq = CompletionQueue::<BenchError>::new(true);
    let lists: Vec<Vec<Completer<BenchError>>> = split(msgs, producers, |i| cq.register(i).1);
    DRAINED.with_borrow_mut(|out| {
        out.reserve(msgs);
        let elapsed = timed(
            producers,
            msgs,
            lists,
            |list| list.into_iter().for_each(|c| c.complete(Ok(()))),
            || cq.try_drain(out),
        );
        assert_eq!(out.len(), msgs);
        out.clear();
        elapsed
    })
}

/// One round through a `crossbeam_queue::ArrayQueue` big enough never to be full.
fn array_queue_round(producers: usize, msgs: usize) -> Duration {
    let q = ArrayQueue::<u64>::new(msgs.max(1));
    let lists = split(msgs, producers, |i| i);
    timed(
        producers,
        msgs,
        lists,
        |list| {
            for i in list {
                q.push(i).expect("the queue holds every message");
            }
        },
        || q.pop().map_or(0, |i| usize::from(black_box(i) != u64::MAX)),
    )
}

/// An operation's shared state in the `array_queue_handles` baseline: the status word a
/// handle would poll (and a waiter would sleep on) and the operation id.
struct OpState {
    state: AtomicU32,
    id: u64,
}

/// Set in `OpState::state` by a waiter about to sleep (never, in this bench).
const OP_WAITERS: u32 = 0b100;

thread_local! {
    /// The `array_queue_handles` consumer's output, kept between rounds like `DRAINED`.
    static POPPED: RefCell<Vec<Arc<OpState>>> = const { RefCell::new(Vec::new()) };
}

/// One round of the same work as `cq_round` built from a `crossbeam_queue::ArrayQueue`
/// (big enough never to be full) of `Arc`s: publish the status with a waiter-aware `swap`,
/// push the operation; pop it into a `Vec`. Allocating the states is set-up, and the popped
/// `Arc`s are dropped after the clock stops, as for the completion queue.
fn array_queue_handles_round(producers: usize, msgs: usize) -> Duration {
    let q = ArrayQueue::<Arc<OpState>>::new(msgs.max(1));
    let lists = split(msgs, producers, |id| {
        Arc::new(OpState {
            state: AtomicU32::new(0),
            id,
        })
    });
    POPPED.with_borrow_mut(|out| {
        out.reserve(msgs);
        let elapsed = timed(
            producers,
            msgs,
            lists,
            |list| {
                for op in list {
                    if op.state.swap(1, Ordering::Release) & OP_WAITERS != 0 {
                        unreachable!("nobody waits in this bench (a futex wake would go here)");
                    }
                    if q.push(op).is_err() {
                        unreachable!("the queue holds every message");
                    }
                }
            },
            || {
                q.pop().map_or(0, |op| {
                    out.push(op);
                    1
                })
            },
        );
        assert_eq!(out.len(), msgs);
        assert!(out.iter().all(|op| op.id < msgs as u64));
        out.clear();
        elapsed
    })
}

/// One round through `std::sync::mpsc` (unbounded), the consumer polling with `try_recv`.
fn mpsc_round(producers: usize, msgs: usize) -> Duration {
    let (tx, rx) = mpsc::channel::<u64>();
    let lists = split(msgs, producers, |i| i);
    timed(
        producers,
        msgs,
        lists,
        |list| {
            let tx = tx.clone();
            for i in list {
                tx.send(i).expect("the receiver outlives the senders");
            }
        },
        || {
            rx.try_recv()
                .map_or(0, |i| usize::from(black_box(i) != u64::MAX))
        },
    )
}

/// Messages per round: `BPS_BENCH_CQ_MSGS`, default 65536 (4 MiB of completion slots, more
/// than a core's L2; 4096 fit in it).
fn messages() -> usize {
    match std::env::var("BPS_BENCH_CQ_MSGS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&m| (1..=1 << 24).contains(&m))
            .unwrap_or_else(|| panic!("BPS_BENCH_CQ_MSGS={v:?}: expected 1..=16777216")),
        Err(_) => 1 << 16,
    }
}

/// One timed round: `(producers, messages) -> time`.
type Round = fn(usize, usize) -> Duration;

fn bench_throughput(c: &mut Criterion) {
    note_smoke_test();
    let msgs = if full_run() { messages() } else { 256 };
    let mut group = c.benchmark_group("cq/throughput");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .throughput(Throughput::Elements(msgs as u64));
    let kinds: [(&str, Round); 4] = [
        ("completion_queue", cq_round),
        ("array_queue", array_queue_round),
        ("array_queue_handles", array_queue_handles_round),
        ("mpsc", mpsc_round),
    ];
    let pairs = if full_run() { 21 } else { 3 };
    for producers in [0, 1, 2]
        .into_iter()
        .filter(|_| summaries_wanted() || !full_run())
    {
        // The noise floor: the same pairing of ArrayQueue against itself. Its spread around 1
        // is how far a ratio below can move with the load alone.
        let p = paired(pairs, |_| array_queue_round(producers, msgs));
        println!(
            "paired {producers} producer(s): noise check, array_queue against itself, ratio {:.2}",
            p.speed_ratio,
        );
        for (name, round) in &kinds[1..] {
            let p = paired(pairs, |side| match side {
                Side::Base => round(producers, msgs),
                Side::Subject => cq_round(producers, msgs),
            });
            println!(
                "paired {producers} producer(s): completion_queue {:.2} Melem/s, {name} {:.2} \
                 Melem/s, ratio {:.2} (median of {pairs} alternating pairs; target >= 1 vs \
                 array_queue; array_queue_handles does the same work as the completion queue)",
                msgs as f64 / p.subject.as_secs_f64() / 1e6,
                msgs as f64 / p.base.as_secs_f64() / 1e6,
                p.speed_ratio,
            );
        }
    }
    for producers in [0, 1, 2] {
        for (name, round) in kinds {
            let id = match producers {
                0 => "inline".to_string(),
                p => format!("{p}p"),
            };
            group.bench_function(BenchmarkId::new(name, id), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| round(producers, msgs)).sum())
            });
        }
    }
    group.finish();
}

/// Keeps a value on a cache line of its own (two, against the adjacent-line prefetcher).
#[repr(align(128))]
struct Padded<T>(T);

/// `rounds` one-way signals from a second thread to this one, in lock step. Round `i`: this
/// thread releases the signalling thread, then spins on `seen(&probes[i])`; the other
/// thread reads the clock and calls `fire(signals[i])`. Returns, per round, the time from
/// that clock reading to this thread's first reading after `seen` turned true, in ns. Each
/// thread keeps its clock readings in its own memory, so nothing but the signal itself
/// crosses between cores inside the measured interval.
fn one_way<S: Send, P: Sync>(
    signals: Vec<S>,
    probes: &[P],
    fire: impl Fn(S) + Sync,
    seen: impl Fn(&P) -> bool,
) -> Vec<u64> {
    let rounds = probes.len();
    let base = Instant::now();
    let go = Padded(AtomicU64::new(0)); // round i may start when it holds i + 1
    let mut seen_at = Vec::with_capacity(rounds);
    let fired_at = thread::scope(|s| {
        let (go, fire) = (&go, &fire);
        let signaller = s.spawn(move || {
            let mut fired_at = Vec::with_capacity(rounds);
            for (i, signal) in signals.into_iter().enumerate() {
                while go.0.load(Ordering::Acquire) != i as u64 + 1 {
                    spin_loop();
                }
                fired_at.push(base.elapsed().as_nanos() as u64);
                fire(signal);
            }
            fired_at
        });
        for (i, probe) in probes.iter().enumerate() {
            go.0.store(i as u64 + 1, Ordering::Release);
            while !seen(probe) {
                spin_loop();
            }
            seen_at.push(base.elapsed().as_nanos() as u64);
        }
        signaller
            .join()
            .expect("the signalling thread does not panic")
    });
    fired_at
        .iter()
        .zip(&seen_at)
        .map(|(fired, seen)| seen.saturating_sub(*fired))
        .collect()
}

/// Complete-to-seen latencies of `rounds` operations, in ns (unsorted).
fn complete_to_seen(rounds: usize) -> Vec<u64> {
    let cq = CompletionQueue::<BenchError>::new(false); // as the runtime makes it
    let (handles, completers): (Vec<_>, Vec<_>) =
        (0..rounds as u64).map(|i| cq.register(i)).unzip();
    one_way(
        completers,
        &handles,
        |c| c.complete(Ok(())),
        |h| h.status() != Status::Pending,
    )
}

/// The same lock step with a bare `AtomicU32` store (`Release`) seen by an `Acquire` load,
/// one flag per round on a cache line of its own: the floor that the machine's cache
/// coherence sets for any completion signal.
fn store_to_seen(rounds: usize) -> Vec<u64> {
    let flags: Vec<Padded<AtomicU32>> = (0..rounds).map(|_| Padded(AtomicU32::new(0))).collect();
    one_way(
        flags.iter().collect(),
        &flags,
        |f| f.0.store(1, Ordering::Release),
        |f| f.0.load(Ordering::Acquire) != 0,
    )
}

/// Median cost of one clock reading (two back-to-back reads), in ns.
fn clock_cost() -> u64 {
    let base = Instant::now();
    let mut d: Vec<u64> = (0..10_000)
        .map(|_| {
            let a = base.elapsed().as_nanos() as u64;
            let b = base.elapsed().as_nanos() as u64;
            b - a
        })
        .collect();
    d.sort_unstable();
    percentile(&d, 0.5)
}

/// Prints min, median and tail of `lat` (ns).
fn report(what: &str, mut lat: Vec<u64>) {
    lat.sort_unstable();
    let p = |q| percentile(&lat, q);
    println!(
        "{what}: {} rounds: min {} ns, median {} ns, p90 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        lat.len(),
        p(0.0),
        p(0.5),
        p(0.9),
        p(0.99),
        p(0.999),
        p(1.0),
    );
}

fn bench_latency(c: &mut Criterion) {
    if summaries_wanted() {
        let (runs, rounds) = if full_run() { (3, 200_000) } else { (1, 1_000) };
        println!(
            "clock read (Instant::now) costs {} ns (median)",
            clock_cost()
        );
        for run in 1..=runs {
            report(
                &format!("cq/store_to_seen run {run}"),
                store_to_seen(rounds),
            );
            report(
                &format!("cq/complete_to_seen run {run}"),
                complete_to_seen(rounds),
            );
        }
        println!("(target: median complete_to_seen <= 200 ns)");
    }
    // Criterion's figure is the mean, which the tail (preemption on shared cores) inflates.
    for (name, f) in [
        (
            "cq/complete_to_seen",
            complete_to_seen as fn(usize) -> Vec<u64>,
        ),
        ("cq/store_to_seen", store_to_seen),
    ] {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| Duration::from_nanos(f(iters as usize).iter().sum()))
        });
    }
}

criterion_group!(benches, bench_throughput, bench_latency);
criterion_main!(benches);
