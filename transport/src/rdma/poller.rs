//! The completion poller: one thread per RDMA [`Engine`](super::Engine) that drains the
//! completion queues of every queue pair and hands the completions to the event loop through a
//! bounded single-producer / single-consumer ring, waking the loop only when it sleeps.
//!
//! # The thread
//!
//! It polls every watched CQ (`ibv_poll_cq`, a read of a ring in user space) and pushes what it
//! got into the [`Ring`]. While completions keep coming it keeps polling; once none came for
//! [`RdmaConfig::busy_poll`](super::RdmaConfig::busy_poll) (yielding the CPU between rounds) it
//! backs off to the completion channel: it arms the CQs that are not armed yet
//! (`ibv_req_notify_cq`), polls once more (a completion between the last poll and the arming
//! raises no event), and blocks in its own `mio::Poll` on the channel's fd and a control waker
//! (new CQs, shutdown). Events are read and acknowledged at once; a CQ whose event was read
//! counts as disarmed.
//!
//! # The hand-over
//!
//! The ring holds completions packed in three `AtomicU64`s each; the producer publishes a batch
//! with one release store of its tail, the consumer takes everything with one release store of
//! its head. No lock, no system call and no allocation on either side. The event loop wakes up
//! through `Net`'s own `mio::Waker` only when it declared it was going to sleep
//! ([`Poller::park`]): a Dekker-style pair (the loop stores `parked` then reads the ring, the
//! poller stores into the ring then reads `parked`, a `SeqCst` fence between each pair) makes
//! sure one of them sees the other, so a completion is never left in the ring of a sleeping loop.
//! A busy loop is never woken: it finds the completions the next time it polls.
//!
//! When the ring is full the poller stops taking completions (they wait in the CQs, which are
//! sized for every request that can be outstanding) and retries with a growing pause.
//!
//! # Watching CQs
//!
//! The event loop adds a CQ when it creates a queue pair and removes it when the link dies
//! ([`Poller::watch`], [`Poller::unwatch`]): the list sits behind a mutex, but the poller only
//! reads a generation counter on its hot path and copies the list when it changed. Each entry
//! is tagged with the link's id so that completions still in the ring after a link died are
//! recognised and dropped.

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::sys;
use super::verbs::{completion_of, ChannelHandle, Completion, CqHandle};

/// Completions the ring holds (a power of two).
pub(crate) const RING_CAPACITY: usize = 8192;
/// Largest pause while the ring is full.
const FULL_PAUSE_MAX: Duration = Duration::from_millis(1);
/// Completions taken from one CQ in one `ibv_poll_cq`.
const POLL_BATCH: usize = 32;

const CHANNEL: Token = Token(0);
const CONTROL: Token = Token(1);

/// A completion as the poller hands it over: the link whose CQ it came from, and what it says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Polled {
    /// The link's id (given by the engine to [`Poller::watch`]).
    pub(crate) link: u32,
    /// The completion; meaningless when `failed` is set.
    pub(crate) c: Completion,
    /// Polling or arming this link's CQ failed (the link must be dropped).
    pub(crate) failed: bool,
}

const HAS_IMM: u64 = 1 << 62;
const FAILED: u64 = 1 << 63;

impl Polled {
    fn pack(&self) -> [u64; 3] {
        let c = &self.c;
        let status = u64::from(c.status.min(0xffff));
        let opcode = u64::from(c.opcode.min(0x3fff));
        let mut w2 = u64::from(c.imm.unwrap_or(0)) | status << 32 | opcode << 48;
        if c.imm.is_some() {
            w2 |= HAS_IMM;
        }
        if self.failed {
            w2 |= FAILED;
        }
        [
            c.wr_id,
            u64::from(self.link) | u64::from(c.byte_len) << 32,
            w2,
        ]
    }

    fn unpack(w: [u64; 3]) -> Polled {
        Polled {
            link: w[1] as u32,
            c: Completion {
                wr_id: w[0],
                status: ((w[2] >> 32) & 0xffff) as u32,
                opcode: ((w[2] >> 48) & 0x3fff) as u32,
                byte_len: (w[1] >> 32) as u32,
                imm: (w[2] & HAS_IMM != 0).then_some(w[2] as u32),
            },
            failed: w[2] & FAILED != 0,
        }
    }
}

/// A bounded single-producer / single-consumer ring of [`Polled`], made of atomics only.
///
/// `push` must only be called by one thread at a time and `pop_into` by one thread at a time
/// (the poller and the event loop); breaking that garbles entries but cannot corrupt memory.
pub(crate) struct Ring {
    slots: Box<[[AtomicU64; 3]]>,
    mask: usize,
    /// Next position the consumer reads.
    head: CachePadded<AtomicUsize>,
    /// Next position the producer writes.
    tail: CachePadded<AtomicUsize>,
}

impl Ring {
    pub(crate) fn new(capacity: usize) -> Ring {
        let cap = capacity.max(2).next_power_of_two();
        Ring {
            slots: (0..cap).map(|_| Default::default()).collect(),
            mask: cap - 1,
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// Room left (producer side).
    pub(crate) fn room(&self) -> usize {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Acquire);
        self.slots.len() - tail.wrapping_sub(head)
    }

    /// Producer: appends as many of `items` as fit, published at once; returns how many.
    pub(crate) fn push(&self, items: &[Polled]) -> usize {
        let n = items.len().min(self.room());
        let tail = self.tail.load(Ordering::Relaxed);
        for (i, it) in items[..n].iter().enumerate() {
            let slot = &self.slots[tail.wrapping_add(i) & self.mask];
            for (a, v) in slot.iter().zip(it.pack()) {
                a.store(v, Ordering::Relaxed);
            }
        }
        if n > 0 {
            self.tail.store(tail.wrapping_add(n), Ordering::Release);
        }
        n
    }

    /// Consumer: moves every published entry into `out`; returns how many.
    pub(crate) fn pop_into(&self, out: &mut Vec<Polled>) -> usize {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Acquire);
        let n = tail.wrapping_sub(head);
        out.reserve(n);
        for i in 0..n {
            let slot = &self.slots[head.wrapping_add(i) & self.mask];
            out.push(Polled::unpack([
                slot[0].load(Ordering::Relaxed),
                slot[1].load(Ordering::Relaxed),
                slot[2].load(Ordering::Relaxed),
            ]));
        }
        if n > 0 {
            self.head.store(tail, Ordering::Release);
        }
        n
    }

    /// Whether nothing is published (either side).
    pub(crate) fn is_empty(&self) -> bool {
        self.tail.load(Ordering::Acquire) == self.head.load(Ordering::Acquire)
    }
}

/// Counters of the poller thread.
#[derive(Default)]
pub(crate) struct PollerCounters {
    /// Completions handed over.
    pub(crate) completions: AtomicU64,
    /// Times the event loop was woken.
    pub(crate) wakeups: AtomicU64,
    /// Times the thread blocked on the completion channel.
    pub(crate) sleeps: AtomicU64,
}

struct Shared {
    ring: Ring,
    /// The event loop is about to block (or blocks) and must be woken for new completions.
    parked: AtomicBool,
    stop: AtomicBool,
    watch: Mutex<Vec<(u32, CqHandle)>>,
    watch_gen: AtomicU64,
    net: Arc<Waker>,
    counters: PollerCounters,
}

/// The poller thread of an engine; stopped and joined when dropped.
pub(crate) struct Poller {
    shared: Arc<Shared>,
    control: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    /// Starts the thread on `channel`; `net` is the event loop's waker.
    pub(crate) fn start(
        channel: ChannelHandle,
        net: Arc<Waker>,
        busy_poll: Duration,
    ) -> io::Result<Poller> {
        let poll = Poll::new()?;
        let fd = channel.fd();
        poll.registry()
            .register(&mut SourceFd(&fd), CHANNEL, Interest::READABLE)?;
        let control = Arc::new(Waker::new(poll.registry(), CONTROL)?);
        let shared = Arc::new(Shared {
            ring: Ring::new(RING_CAPACITY),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            watch: Mutex::new(Vec::new()),
            watch_gen: AtomicU64::new(0),
            net,
            counters: PollerCounters::default(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bps-rdma-cq".into())
            .spawn(move || run(&s, &channel, poll, busy_poll))?;
        Ok(Poller {
            shared,
            control,
            thread: Some(thread),
        })
    }

    /// Starts polling `cq` for link `link`.
    pub(crate) fn watch(&self, link: u32, cq: CqHandle) {
        self.edit(|w| w.push((link, cq)));
    }

    /// Stops polling the CQ of link `link` (its completions still in the ring are stale).
    pub(crate) fn unwatch(&self, link: u32) {
        self.edit(|w| w.retain(|(l, _)| *l != link));
    }

    fn edit(&self, f: impl FnOnce(&mut Vec<(u32, CqHandle)>)) {
        {
            let mut w = self.shared.watch.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut w);
            self.shared.watch_gen.fetch_add(1, Ordering::Release);
        }
        // A sleeping poller must arm the new CQ (or forget the old one).
        let _ = self.control.wake();
    }

    /// Event loop: takes every completion handed over so far.
    pub(crate) fn drain(&self, out: &mut Vec<Polled>) -> usize {
        self.shared.ring.pop_into(out)
    }

    /// Event loop: it is about to block. Returns false (and stays unparked) when completions
    /// are already waiting; otherwise the poller wakes it for the next ones.
    pub(crate) fn park(&self) -> bool {
        self.shared.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.shared.ring.is_empty() {
            true
        } else {
            self.shared.parked.store(false, Ordering::Relaxed);
            false
        }
    }

    /// Event loop: it is awake again (no wake-ups needed until the next `park`).
    pub(crate) fn unpark(&self) {
        self.shared.parked.store(false, Ordering::Relaxed);
    }

    /// The thread's counters.
    pub(crate) fn counters(&self) -> &PollerCounters {
        &self.shared.counters
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.control.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("rdma: the completion poller thread panicked");
            }
        }
    }
}

struct Watched {
    link: u32,
    cq: CqHandle,
    armed: bool,
    /// Polling or arming it failed; reported once, then left alone until unwatched.
    failed: bool,
}

/// Tells a sleeping event loop that completions wait.
fn notify(s: &Shared) {
    fence(Ordering::SeqCst);
    if s.parked.load(Ordering::Relaxed) && s.parked.swap(false, Ordering::SeqCst) {
        s.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = s.net.wake() {
            tracing::warn!("rdma: cannot wake the event loop: {e}");
        }
    }
}

/// One round over every CQ. Returns (completions handed over, whether the ring filled up).
fn poll_round(
    s: &Shared,
    cqs: &mut [Watched],
    wcs: &mut [rdma_mummy_sys::ibv_wc],
    batch: &mut Vec<Polled>,
) -> (usize, bool) {
    let mut total = 0;
    for w in cqs.iter_mut().filter(|w| !w.failed) {
        loop {
            let room = s.ring.room();
            if room == 0 {
                return (total, true);
            }
            let want = room.min(wcs.len());
            batch.clear();
            let n = match w.cq.poll(&mut wcs[..want]) {
                Ok(n) => {
                    batch.extend(wcs[..n].iter().map(|wc| Polled {
                        link: w.link,
                        c: completion_of(wc),
                        failed: false,
                    }));
                    n
                }
                Err(e) => {
                    tracing::debug!("rdma: link {}: {e}", w.link);
                    w.failed = true;
                    batch.push(failure(w.link));
                    0
                }
            };
            if !batch.is_empty() {
                let pushed = s.ring.push(batch);
                debug_assert_eq!(pushed, batch.len(), "room was checked");
                total += pushed;
            }
            if n < want {
                break;
            }
        }
    }
    if total > 0 {
        s.counters
            .completions
            .fetch_add(total as u64, Ordering::Relaxed);
    }
    (total, false)
}

fn failure(link: u32) -> Polled {
    Polled {
        link,
        c: Completion {
            wr_id: 0,
            status: u32::MAX,
            opcode: 0,
            byte_len: 0,
            imm: None,
        },
        failed: true,
    }
}

fn run(s: &Shared, channel: &ChannelHandle, mut poll: Poll, busy_poll: Duration) {
    let mut events = Events::with_capacity(16);
    let mut cqs: Vec<Watched> = Vec::new();
    let mut seen_gen = u64::MAX;
    let mut wcs = [sys::empty_wc(); POLL_BATCH];
    let mut batch = Vec::with_capacity(POLL_BATCH);
    let mut idle_since: Option<Instant> = None;
    let mut pause = Duration::from_micros(20);
    // Failures that did not fit in the ring yet.
    let mut pending: Vec<Polled> = Vec::new();
    while !s.stop.load(Ordering::Acquire) {
        if !pending.is_empty() {
            let n = s.ring.push(&pending);
            pending.drain(..n);
            notify(s);
            if !pending.is_empty() {
                std::thread::sleep(pause);
                pause = (pause * 2).min(FULL_PAUSE_MAX);
                continue;
            }
        }
        let gen = s.watch_gen.load(Ordering::Acquire);
        if gen != seen_gen {
            seen_gen = gen;
            let now = s.watch.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let old = std::mem::take(&mut cqs);
            cqs = now
                .into_iter()
                .map(|(link, cq)| {
                    let same = old.iter().find(|w| w.link == link && w.cq.id() == cq.id());
                    Watched {
                        link,
                        cq,
                        armed: same.is_some_and(|w| w.armed),
                        failed: same.is_some_and(|w| w.failed),
                    }
                })
                .collect();
        }
        let (got, full) = poll_round(s, &mut cqs, &mut wcs, &mut batch);
        if got > 0 {
            notify(s);
            idle_since = None;
        }
        if full {
            notify(s);
            std::thread::sleep(pause);
            pause = (pause * 2).min(FULL_PAUSE_MAX);
            continue;
        }
        pause = Duration::from_micros(20);
        if got > 0 {
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < busy_poll {
            std::thread::yield_now();
            continue;
        }
        // Back off to the completion channel.
        let mut failed = Vec::new();
        for w in cqs.iter_mut().filter(|w| !w.armed && !w.failed) {
            match w.cq.arm() {
                Ok(()) => w.armed = true,
                Err(e) => {
                    tracing::debug!("rdma: link {}: {e}", w.link);
                    w.failed = true;
                    failed.push(failure(w.link));
                }
            }
        }
        if !failed.is_empty() {
            let n = s.ring.push(&failed);
            failed.drain(..n);
            pending.append(&mut failed);
            notify(s);
            if !pending.is_empty() {
                continue; // the ring is full: hand the failures over before sleeping
            }
        }
        // Completions already in a CQ raise no event once it is armed: take them (or, with the
        // ring full, keep polling) before sleeping.
        let (got, full) = poll_round(s, &mut cqs, &mut wcs, &mut batch);
        if got > 0 || full {
            notify(s);
            idle_since = None;
            continue;
        }
        if s.stop.load(Ordering::Acquire) {
            break;
        }
        s.counters.sleeps.fetch_add(1, Ordering::Relaxed);
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("rdma: the completion poller cannot wait: {e}; it polls instead");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if events.iter().any(|e| e.token() == CHANNEL) {
            let r = channel.drain(|id| {
                for w in cqs.iter_mut().filter(|w| w.cq.id() == id) {
                    w.armed = false;
                }
            });
            if let Err(e) = r {
                tracing::warn!("rdma: {e}");
            }
        }
        idle_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u64) -> Polled {
        Polled {
            link: (i % 7) as u32 + 1,
            c: Completion {
                wr_id: i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                status: (i % 23) as u32,
                opcode: [0u32, 1, 3, 128, 129][(i % 5) as usize],
                byte_len: (i as u32).wrapping_mul(4099),
                imm: i.is_multiple_of(3).then_some(!(i as u32)),
            },
            failed: i.is_multiple_of(11),
        }
    }

    #[test]
    fn packing_round_trips() {
        for i in 0..1000 {
            let p = item(i);
            assert_eq!(Polled::unpack(p.pack()), p);
        }
        let f = failure(9);
        let back = Polled::unpack(f.pack());
        assert!(back.failed);
        assert_eq!(back.link, 9);
    }

    #[test]
    fn ring_is_bounded_and_fifo() {
        let r = Ring::new(8);
        assert!(r.is_empty());
        let items: Vec<Polled> = (0..12).map(item).collect();
        assert_eq!(r.push(&items), 8, "only what fits");
        assert_eq!(r.room(), 0);
        let mut out = Vec::new();
        assert_eq!(r.pop_into(&mut out), 8);
        assert_eq!(out, items[..8]);
        assert_eq!(r.push(&items[8..]), 4, "wraps around");
        out.clear();
        r.pop_into(&mut out);
        assert_eq!(out, items[8..]);
        assert!(r.is_empty());
    }

    #[test]
    fn ring_hands_over_between_threads_in_order() {
        const N: u64 = 200_000;
        let r = Arc::new(Ring::new(64));
        let p = r.clone();
        let producer = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                let batch: Vec<Polled> = (i..(i + 5).min(N)).map(item).collect();
                let n = p.push(&batch) as u64;
                i += n;
                if n == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let mut got = Vec::new();
        let mut next = 0u64;
        while next < N {
            got.clear();
            if r.pop_into(&mut got) == 0 {
                std::thread::yield_now();
            }
            for g in &got {
                assert_eq!(*g, item(next));
                next += 1;
            }
        }
        producer.join().unwrap();
        assert!(r.is_empty());
    }
}
