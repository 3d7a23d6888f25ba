//! The event loop of a process: worker and/or server roles over one transport.
//!
//! One thread per process owns the [`Net`] and every piece of protocol state; framework threads
//! talk to it through a command channel and the transport's waker, and learn of completions
//! through the completion queue. Summation runs on separate engine threads
//! (`BYTEPS_SERVER_ENGINE_THREAD`).
//!
//! # Protocol of one chunk (key)
//!
//! 1. First use of a key by a worker: `InitKey` (size, dtype, the immediate the server must put
//!    on answers) to the key's server, which checks it against the other workers' and answers
//!    `InitAck` with the slot of the key and where this worker's pushes land (a region of its
//!    receive buffer). This is the one exchange of addresses per (key, peer, direction).
//! 2. Whenever the output buffer changed: `SetReply` (token and offset of the worker's output
//!    chunk) on the key's lane, ahead of the push.
//! 3. Push: one-sided write of the chunk into the server's buffer, immediate = slot | flags.
//! 4. When every worker pushed, an engine thread sums the receive buffers into the sum buffer in
//!    one fused pass (a broadcast copies the root's push), and the server writes the result
//!    straight into each worker's output chunk, immediate = the worker's reply slot.
//!
//! A worker has at most one operation per tensor in flight (later ones wait in order), so the
//! server can count rounds per key without version numbers on the wire: a worker's next push
//! for a key only comes after it received the answer of the previous round, which the server
//! sent only after every worker's push of that round.

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bps_scheduler::{partition, Chunk, CreditQueue, Key, Priority};
use bps_transport::cq::Completer;
use bps_transport::{
    Event, LinkKind, Net, PeerId, RegistrationCache, RemoteSlice, Transport, Waker,
};
use crossbeam_channel::{Receiver, Sender};

use crate::config::{Config, Role};
use crate::dtype::DType;
use crate::mem::{RawSlice, SharedMem};
use crate::proto::{BookEntry, Msg, SCOPE_GLOBAL, SCOPE_LOCAL};
use crate::sched::write_msg;
use crate::sum::{scale_div, sum_into};
use crate::Error;

/// Immediate flag: this push is part of a broadcast.
const F_BCAST: u32 = 1 << 24;
/// Immediate flag: this push carries the broadcast root's data.
const F_ROOT: u32 = 1 << 25;
const SLOT_MASK: u32 = (1 << 24) - 1;
/// wr_id bit of writes made by the server part.
const WR_SERVER: u64 = 1 << 63;
/// wr_id bit of a host aggregator's pushes to the key's server.
const WR_UP: u64 = 1 << 62;

/// What a push_pull or broadcast does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// Sum across workers (then divide by the number of workers if `average`).
    Sum { average: bool },
    /// Every worker gets the root's tensor.
    Broadcast { root: u32 },
}

/// A request from the API.
pub(crate) struct OpRequest {
    pub tensor: u32,
    pub name: String,
    pub dtype: DType,
    pub bytes: usize,
    pub input: RawSlice,
    pub output: RawSlice,
    pub kind: OpKind,
    pub priority: i32,
    pub completer: Completer<Error>,
    /// Set for the host part of a GPU operation (see [`GpuHost`]).
    pub gpu: Option<GpuHost>,
}

/// The host part of a GPU operation: the input/output is a pinned staging buffer, only the
/// chunks this process owns are pushed (straight to their servers: the local reduction was
/// done on the GPUs), each only once the GPU side released it, and each answer is announced.
pub(crate) struct GpuHost {
    /// The GPU engine's number of the operation.
    pub op: u64,
    /// Per chunk: whether this process pushes it.
    pub owned: Vec<bool>,
    /// Where answered chunks are announced.
    pub notify: Sender<GpuMsg>,
    /// GPUDirect RDMA: the input (== output) is device memory registered as a dma-buf region
    /// (this transport token, see `Command::RegisterDmabuf`): chunks are written from it and
    /// answers into it by the NIC; the runtime neither registers nor touches its bytes (the
    /// engine averages on the GPU). `None`: a pinned staging buffer.
    pub region: Option<u64>,
}

/// Inputs of the GPU engine.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum GpuMsg {
    /// A message from the scheduler (NCCL id, go-aheads).
    Sched(Msg),
    /// A chunk's sum arrived in the staging buffer of operation `op`.
    ChunkDone { op: u64, chunk: u32 },
}

/// Messages to the event loop.
pub(crate) enum Command {
    Op(OpRequest),
    Barrier(u64, Completer<Error>),
    Shutdown(Sender<()>),
    Sched(Msg),
    SchedLost(String),
    /// The GPU side staged chunk `chunk` of GPU operation `op` on `tensor`: push it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Release {
        tensor: u32,
        op: u64,
        chunk: u32,
    },
    /// GPUDirect RDMA: register `len` bytes at `offset` of the dma-buf `fd` (device memory,
    /// addressed by `iova`) with the transport; the token, or why not, goes to `reply`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    RegisterDmabuf {
        fd: std::os::fd::OwnedFd,
        offset: u64,
        len: usize,
        iova: u64,
        reply: Sender<Result<u64, Error>>,
    },
    /// Drop a registration made by `RegisterDmabuf` (unknown tokens are ignored: a failed
    /// operation's region was revoked already).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Deregister(u64),
    /// Tests: register host memory as a GPU engine registers device memory (a region the
    /// runtime is handed, not one it caches).
    #[cfg(test)]
    RegisterHost {
        raw: RawSlice,
        reply: Sender<Result<u64, Error>>,
    },
}

struct SumJob {
    slot: u32,
    dtype: DType,
    out: RawSlice,
    inputs: Vec<RawSlice>,
}

// ---------------------------------------------------------------- worker state

enum PlaceState {
    None,
    Requested,
    Ready,
    Failed(Error),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyInit {
    None,
    Sent,
    Ready { slot: u32, token: u64, offset: u64 },
}

struct WKey {
    /// Where this worker pushes the key: its server, or its host's aggregator of the key.
    server: PeerId,
    /// The key's server (differs from `server` with local reduction).
    upstream: PeerId,
    scope: u8,
    lane: u32,
    init: KeyInit,
    reply_slot: u32,
    announced: Option<(u64, u64)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkSt {
    /// A GPU operation's chunk whose staging copy is not done yet.
    Held,
    Queued,
    WaitInit,
    Pushed,
    Done,
}

struct Active {
    req: OpRequest,
    in_token: u64,
    out_token: u64,
    left: usize,
    deadline: Instant,
    chunks: Vec<ChunkSt>,
    /// Per chunk: its bytes count against the credit (from the moment the queue let it go
    /// until its push left this process, or its answer came, whichever is first).
    credit: Vec<bool>,
    /// Per chunk: its bytes count against its server's window (`Worker::at_server`), from
    /// the moment it was let go to that server until its answer came.
    at_server: Vec<bool>,
    /// This operation's number among the worker's operations (tells parked chunks of a
    /// failed operation from those of the next one on the same tensor).
    seq: u64,
}

struct WTensor {
    name: String,
    dtype: DType,
    bytes: usize,
    chunks: Vec<Chunk>,
    place: PlaceState,
    keys: Vec<WKey>,
    active: Option<Active>,
    waiting: VecDeque<OpRequest>,
    /// When the scheduler must have answered the placement request.
    place_deadline: Option<Instant>,
    /// A GPU tensor: chunks go to their servers directly (NCCL reduced them in the host).
    gpu: bool,
    /// Bytes of this tensor's chunks a worker may have at one server without their sums
    /// back (BPS_SERVER_CREDIT partitions of this tensor's partition size; 0 = no limit).
    server_window: u64,
    /// Chunks released by the GPU side before their operation started: (op, chunk).
    early: Vec<(u64, u32)>,
}

struct Worker {
    tensors: HashMap<u32, WTensor>,
    /// reply slot → (tensor, chunk)
    reply_slots: Vec<(u32, u32)>,
    queue: CreditQueue<(u32, u32)>,
    retry: VecDeque<(u32, u32)>,
    cache: RegistrationCache,
    barriers: HashMap<u64, Completer<Error>>,
    /// Bytes pushed to each server (or host aggregator) whose sums have not come back.
    at_server: HashMap<PeerId, u64>,
    /// Per server: the priorities of the chunks counted in `at_server` (priority → chunks).
    at_server_prio: HashMap<PeerId, std::collections::BTreeMap<i32, u32>>,
    /// Chunks let go by the credit queue but held back because their server's window was
    /// full, per server in the order the queue gave them: (tensor, chunk, operation seq).
    parked: HashMap<PeerId, VecDeque<(u32, u32, u64)>>,
    /// Operations started so far (numbers `Active::seq`).
    ops_started: u64,
    /// Per server: when it last answered one of this worker's chunks (or its window last
    /// filled), and the smoothed gap between its answers (see `unpark`).
    answered: HashMap<PeerId, (Instant, Duration)>,
}

impl Worker {
    /// A worker with nothing in flight; `credit_bytes` bounds the bytes it pushes at once.
    fn new(credit_bytes: u64) -> Worker {
        Worker {
            tensors: HashMap::new(),
            reply_slots: Vec::new(),
            queue: CreditQueue::new(credit_bytes),
            retry: VecDeque::new(),
            cache: RegistrationCache::new(1 << 16, 64 << 30),
            barriers: HashMap::new(),
            at_server: HashMap::new(),
            at_server_prio: HashMap::new(),
            parked: HashMap::new(),
            ops_started: 0,
            answered: HashMap::new(),
        }
    }
}

// ---------------------------------------------------------------- server state

#[derive(Clone, Copy, Default)]
struct SWorker {
    peer: Option<PeerId>,
    inited: bool,
    reply_slot: u32,
    reply: Option<(u64, u64)>,
    pushed: bool,
}

struct SKey {
    key: Key,
    /// SCOPE_GLOBAL: a server's key; SCOPE_LOCAL: a host aggregator's, forwarded upstream.
    scope: u8,
    name: String,
    bytes: usize,
    dtype: DType,
    recv: SharedMem,
    recv_token: u64,
    sum: SharedMem,
    sum_token: u64,
    workers: Vec<SWorker>,
    arrived: u32,
    flags: Option<u32>,
    root: Option<u32>,
    sends_pending: u32,
    deferred: bool,
    summing: bool,
    lane: u32,
    up_peer: PeerId,
    up_init: KeyInit,
    up_announced: bool,
    /// The host's sum is ready and waits to be forwarded to the key's server.
    up_pending: bool,
}

struct Server {
    keys: Vec<SKey>,
    by_key: HashMap<(u8, u64), u32>,
    by_token: HashMap<u64, u32>,
    /// Sum buffers of host aggregators: the server's answers land there.
    by_sum_token: HashMap<u64, u32>,
    retry: VecDeque<(u32, u32)>,
    up_retry: VecDeque<u32>,
    /// Sums done on the event-loop thread, handled like the engines' reports.
    inline_done: Vec<Result<u32, (u32, String)>>,
    /// Bytes of receive and sum buffers held (bounded by BPS_SERVER_MAX_BYTES).
    key_bytes: u64,
    engines: Vec<Sender<SumJob>>,
    done_rx: Receiver<Result<u32, (u32, String)>>,
}

impl Server {
    fn new(cfg: &Config, waker: Waker) -> Server {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let engines = (0..cfg.engine_threads)
            .map(|i| {
                let (tx, rx) = crossbeam_channel::unbounded::<SumJob>();
                let done = done_tx.clone();
                let w = waker.clone();
                std::thread::Builder::new()
                    .name(format!("bps-engine-{i}"))
                    .spawn(move || engine(rx, done, w))
                    .expect("spawn summation thread");
                tx
            })
            .collect();
        Server {
            keys: Vec::new(),
            by_key: HashMap::new(),
            by_token: HashMap::new(),
            by_sum_token: HashMap::new(),
            retry: VecDeque::new(),
            up_retry: VecDeque::new(),
            inline_done: Vec::new(),
            key_bytes: 0,
            engines,
            done_rx,
        }
    }
}

/// The event loop's state.
pub(crate) struct Node {
    cfg: Config,
    net: Net,
    me: PeerId,
    rank: u32,
    num_workers: u32,
    num_servers: u32,
    book: Vec<BookEntry>,
    cmds: Receiver<Command>,
    sched: Arc<Mutex<TcpStream>>,
    worker: Option<Worker>,
    server: Option<Server>,
    broken: Option<Error>,
    /// A link dropped: if the scheduler neither ends the job nor names a dead process within a
    /// grace period, the link failure itself breaks the job.
    suspect: Option<(Instant, Error)>,
    shutdown: Option<(Sender<()>, Instant)>,
    terminated: bool,
    events: Vec<Event>,
    lanes: u32,
    stats: Arc<Stats>,
    waker: Waker,
    /// Workers per host group (BYTEPS_LOCAL_SIZE, as agreed at the rendezvous).
    local_size: u32,
    /// Whether chunks are first reduced within each host group (through shm) and only one
    /// sum per host goes to the key's server.
    local_reduce: bool,
    /// The GPU engine's inbox (scheduler messages for it pass through here).
    gpu_tx: Sender<GpuMsg>,
    /// Some link is rdma: a NIC registration pins pages, so registrations of application
    /// memory are dropped after each operation (the application may free the memory and get
    /// the same addresses back on other pages) unless BPS_RDMA_CACHE_USER_MEMORY=1.
    rdma_links: bool,
    /// When an operation of this process last completed, or this server last answered a round:
    /// the next one probably comes within microseconds, so the loop keeps polling a moment
    /// (see `run`).
    last_done: Option<Instant>,
    /// Set while the loop is about to sleep or asleep in the kernel (see [`LoopAsleep`]).
    asleep: LoopAsleep,
}

/// Whether an event loop sleeps in the kernel, so that the threads submitting operations
/// write to its waker (a system call, and a cross-core wake-up) only when it does: while the
/// loop polls without sleeping it finds new commands by itself.
///
/// Store-buffering on both sides: the loop sets the flag, fences, then checks the command
/// queue; a submitter sends its command, fences, then reads the flag. Either the loop sees
/// the command (and does not sleep) or the submitter sees the flag (and wakes it).
#[derive(Clone, Default)]
pub(crate) struct LoopAsleep(Arc<AtomicBool>);

impl LoopAsleep {
    /// After sending a command: wake the loop if it may be asleep.
    pub(crate) fn notify(&self, waker: &Waker) {
        fence(Ordering::SeqCst);
        if self.0.load(Ordering::Relaxed) {
            waker.wake();
        }
    }

    /// Before a blocking poll; returns whether commands arrived meanwhile (then do not block).
    fn going_to_sleep(&self, cmds: &Receiver<Command>) -> bool {
        self.0.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        !cmds.is_empty()
    }

    fn awake(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Counters the tests and tools read.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes pushed by this worker.
    pub pushed_bytes: std::sync::atomic::AtomicU64,
    /// Registrations made (cache misses).
    pub registrations: std::sync::atomic::AtomicU64,
    /// Rounds summed by this server.
    pub rounds: std::sync::atomic::AtomicU64,
    /// Most bytes of this worker's chunks one server held without their sums back (servers
    /// over a network link; `BPS_SERVER_CREDIT`).
    pub max_at_server: std::sync::atomic::AtomicU64,
    /// Chunks this worker held back because their server's window was full.
    pub parked_chunks: std::sync::atomic::AtomicU64,
    /// Times a server's window was overridden because the server stopped answering while
    /// chunks were parked (workers pushing in different orders).
    pub window_stalls: std::sync::atomic::AtomicU64,
    /// Whether chunks are reduced inside host groups first (sums then add up group by group).
    pub local_reduce: std::sync::atomic::AtomicBool,
    /// Link kind of each connected peer (by transport id).
    pub links: Mutex<HashMap<u32, bps_transport::LinkKind>>,
}

fn label(book: &[BookEntry], peer: PeerId) -> String {
    match book.get(peer.0 as usize) {
        Some(b) => format!("{} {} ({} on {})", b.role, b.rank, b.tcp, b.hostname),
        None => format!("peer {peer}"),
    }
}

/// Register a raw range with the transport, through the cache.
fn register_cached(
    net: &mut Net,
    cache: &mut RegistrationCache,
    stats: &Stats,
    r: RawSlice,
) -> Result<u64, Error> {
    if let Some(t) = cache.lookup(r.addr, r.len) {
        return Ok(t);
    }
    // SAFETY: `r` is either runtime-owned SharedMem (alive until deregistered) or user memory the
    // caller of the unsafe API promised to keep valid and untouched until the operation's handle
    // completes; the runtime revokes (deregisters) a user range before completing a failed
    // operation, so the transport never writes it afterwards.
    let region = unsafe { crate::mem::register(net, r)? };
    stats
        .registrations
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for old in cache.insert(r.addr, r.len, region.token) {
        let _ = net.deregister(old);
    }
    Ok(region.token)
}

/// Count a chunk of `len` bytes and priority `prio` against `server`'s window.
fn window_add(w: &mut Worker, stats: &Stats, server: PeerId, len: u64, prio: i32) {
    let used = w.at_server.entry(server).or_insert(0);
    *used += len;
    stats.max_at_server.fetch_max(*used, Ordering::Relaxed);
    *w.at_server_prio
        .entry(server)
        .or_default()
        .entry(prio)
        .or_insert(0) += 1;
}

/// A chunk counted by [`window_add`] was answered, or its operation failed.
fn window_remove(
    at_server: &mut HashMap<PeerId, u64>,
    at_server_prio: &mut HashMap<PeerId, std::collections::BTreeMap<i32, u32>>,
    server: PeerId,
    len: u64,
    prio: i32,
) {
    if let Some(u) = at_server.get_mut(&server) {
        *u = u.saturating_sub(len);
    }
    if let Some(m) = at_server_prio.get_mut(&server) {
        if let Some(n) = m.get_mut(&prio) {
            *n -= 1;
            if *n == 0 {
                m.remove(&prio);
            }
        }
    }
}

/// Whether `len` more bytes fit `server`'s window (one that holds nothing always has room).
/// A chunk more urgent than everything in the window goes anyway ([`window_urgent`]): that
/// keeps workers that pushed different tensors first (one had submitted a more urgent tensor
/// the other had not yet) from waiting on each other: the urgent tensor passes, its rounds
/// complete, and the windows drain.
fn window_room(w: &Worker, server: PeerId, len: u64, window: u64) -> bool {
    let used = w.at_server.get(&server).copied().unwrap_or(0);
    used == 0 || used + len <= window
}

/// Whether a chunk of priority `prio` is more urgent than every chunk in `server`'s window (an
/// empty window counts as room instead).
fn window_urgent(w: &Worker, server: PeerId, prio: i32) -> bool {
    w.at_server_prio
        .get(&server)
        .and_then(|m| m.keys().next_back())
        .is_some_and(|top| prio > *top)
}

/// A server that has not answered a worker with a full window for this long (or eight of its
/// usual gaps between answers, if longer) lets that worker's parked chunks go (see `unpark`).
const MIN_SERVER_STALL: Duration = Duration::from_millis(50);

/// The least window a server gets (unless the window is off), so that tiny fixed partitions
/// (`BYTEPS_PARTITION_BYTES` of a few KiB) still keep a link busy. On the emulated 1 Gbit/s
/// cluster 768 KiB windows beat 1 MiB ones (`docs/cluster.md`); over loopback tcp 512 KiB and
/// no floor measured the same.
const MIN_SERVER_WINDOW: u64 = 512 << 10;

/// Bytes of one tensor's chunks a worker may have at one server without their sums back:
/// `credit` partitions of the tensor's `partition_bytes`, at least [`MIN_SERVER_WINDOW`];
/// 0 (no limit) when `credit` is 0.
fn server_window(credit: u32, partition_bytes: usize) -> u64 {
    if credit == 0 {
        return 0;
    }
    u64::from(credit)
        .saturating_mul(partition_bytes as u64)
        .max(MIN_SERVER_WINDOW)
}

/// The credit queue let chunk `c` of tensor `t` go: count it against its server's window, or
/// park it there (false) while the server already holds a window's worth of this worker's
/// chunks without their sums back. A chunk always goes when its server holds none, so a
/// chunk larger than the window still moves. Servers on this host (shm, loopback) have no
/// window: no network link is shared there.
fn admit_to_server(w: &mut Worker, net: &Net, stats: &Stats, t: u32, c: u32) -> bool {
    let ci = c as usize;
    let Some(x) = w.tensors.get(&t) else {
        return true;
    };
    // GPU chunks are released in the order their copies finish, which differs between
    // workers: a window would mostly wait for the stall rule.
    if x.server_window == 0 || x.gpu {
        return true;
    }
    let (Some(k), Some(ch), Some(a)) = (x.keys.get(ci), x.chunks.get(ci), x.active.as_ref()) else {
        return true;
    };
    let (server, len, prio, seq, window) = (
        k.server,
        ch.len as u64,
        a.req.priority,
        a.seq,
        x.server_window,
    );
    if matches!(
        net.link_kind(server),
        Some(LinkKind::Shm | LinkKind::Loopback)
    ) {
        return true;
    }
    let queued = w.parked.get(&server).is_some_and(|q| !q.is_empty());
    let urgent = window_urgent(w, server, prio);
    if !(urgent || (!queued && window_room(w, server, len, window))) {
        if !queued {
            // The window just filled: the stall clock of this server starts now (an older
            // last answer is from before this worker had anything there).
            let e = w
                .answered
                .entry(server)
                .or_insert((Instant::now(), Duration::ZERO));
            e.0 = Instant::now();
        }
        w.parked.entry(server).or_default().push_back((t, c, seq));
        stats.parked_chunks.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if let Some(a) = w.tensors.get_mut(&t).and_then(|x| x.active.as_mut()) {
        a.at_server[ci] = true;
    }
    window_add(w, stats, server, len, prio);
    true
}

/// An operation finished with its memory: unpin it in the registration cache, and with
/// `drop_regs` also deregister it (application memory over rdma: see `Node::rdma_links`).
fn release_op_memory(
    net: &mut Net,
    cache: &mut RegistrationCache,
    input: RawSlice,
    output: RawSlice,
    drop_regs: bool,
) {
    cache.unpin(input.addr, input.len);
    if output != input {
        cache.unpin(output.addr, output.len);
    }
    if drop_regs {
        for r in [input, output] {
            if let Some(tok) = cache.remove(r.addr, r.len) {
                let _ = net.deregister(tok);
            }
        }
    }
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: Config,
        net: Net,
        me: PeerId,
        rank: u32,
        num_workers: u32,
        num_servers: u32,
        book: Vec<BookEntry>,
        cmds: Receiver<Command>,
        sched: Arc<Mutex<TcpStream>>,
        waker: Waker,
        stats: Arc<Stats>,
        local_size: u32,
        gpu_tx: Sender<GpuMsg>,
        asleep: LoopAsleep,
    ) -> Node {
        let is_worker = book
            .get(me.0 as usize)
            .is_some_and(|b| b.role == Role::Worker);
        let serves = !is_worker || num_servers == 0;
        let worker = is_worker.then(|| Worker::new(cfg.credit_bytes));
        let server = serves.then(|| Server::new(&cfg, waker.clone()));
        // Local reduction needs whole host groups that really share a host (shm between them).
        let l = local_size.max(1);
        let local_reduce = l > 1
            && num_workers.is_multiple_of(l)
            && (0..num_workers).all(|r| {
                let leader = &book[(r / l * l) as usize];
                book.get(r as usize)
                    .is_some_and(|b| b.role == Role::Worker && b.host == leader.host)
            });
        stats
            .local_reduce
            .store(local_reduce, std::sync::atomic::Ordering::Relaxed);
        if l > 1 && !local_reduce {
            tracing::warn!(
                "BYTEPS_LOCAL_SIZE={l}: workers of a host group are not all on one host (or {num_workers} workers do not split into groups of {l}); local reduction is off"
            );
        }
        let lanes = net.lanes().max(1);
        Node {
            cfg,
            net,
            me,
            rank,
            num_workers,
            num_servers,
            book,
            cmds,
            sched,
            worker,
            server,
            broken: None,
            suspect: None,
            shutdown: None,
            terminated: false,
            events: Vec::new(),
            lanes,
            stats,
            waker,
            local_size: l,
            local_reduce,
            gpu_tx,
            rdma_links: false,
            last_done: None,
            asleep,
        }
    }

    fn server_peer(&self, index: u32) -> PeerId {
        if self.num_servers == 0 {
            PeerId(index)
        } else {
            PeerId(self.num_workers + index)
        }
    }

    fn send_sched(&self, m: &Msg) {
        let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = write_msg(&mut s, m) {
            tracing::debug!("send to scheduler failed: {e}");
        }
    }

    /// Run until shut down. Returns the error that broke the job, if one did.
    pub(crate) fn run(mut self) -> Option<Error> {
        let spin = self.cfg.poll_spin;
        let mut last_activity = Instant::now();
        let mut last_heartbeat = Instant::now();
        loop {
            if last_heartbeat.elapsed() >= self.cfg.timeout / 4 && !self.terminated {
                last_heartbeat = Instant::now();
                self.send_sched(&Msg::Heartbeat);
            }
            while let Ok(c) = self.cmds.try_recv() {
                self.on_command(c);
            }
            self.drain_sums();
            self.pump();
            self.check_deadlines();
            if self.should_exit() {
                break;
            }
            let mut timeout = self.next_timeout();
            if self.has_inline_work() {
                timeout = Duration::ZERO;
            } else if !spin.is_zero()
                && last_activity.elapsed() < spin
                && (self.in_flight() || self.last_done.is_some_and(|t| t.elapsed() < spin))
            {
                // Waiting for an answer that is probably microseconds away, for the next
                // operation of a caller that was just told its last one is done, or (a server)
                // for the next round after answering one: a blocking wake-up costs far more
                // (tens of µs across cores in a VM), so poll without sleeping a moment.
                timeout = Duration::ZERO;
            }
            let blocking = !timeout.is_zero();
            if blocking && self.asleep.going_to_sleep(&self.cmds) {
                timeout = Duration::ZERO;
            }
            let mut events = std::mem::take(&mut self.events);
            if let Err(e) = self.net.poll(&mut events, Some(timeout)) {
                self.fail_all(Error::Transport(e.to_string()));
            }
            if blocking {
                self.asleep.awake();
            }
            if !events.is_empty() {
                last_activity = Instant::now();
            } else if !blocking {
                // Polling without sleeping and nothing came: let a thread that shares this CPU
                // (the peer's event loop, the caller) run first.
                std::thread::yield_now();
            }
            for ev in events.drain(..) {
                self.on_event(ev);
            }
            self.events = events;
        }
        let err = self.broken.clone().unwrap_or(Error::ShutDown);
        self.fail_everything(err);
        if let Some((tx, _)) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.broken.take()
    }

    fn has_inline_work(&self) -> bool {
        self.server
            .as_ref()
            .is_some_and(|s| !s.inline_done.is_empty())
    }

    /// Whether this process waits for something from a peer.
    fn in_flight(&self) -> bool {
        self.worker
            .as_ref()
            .is_some_and(|w| w.tensors.values().any(|t| t.active.is_some()))
            || self.server.as_ref().is_some_and(|s| {
                s.keys
                    .iter()
                    .any(|k| k.arrived > 0 || k.up_pending || k.sends_pending > 0)
            })
    }

    fn should_exit(&mut self) -> bool {
        if self.terminated {
            return true;
        }
        match &self.shutdown {
            Some((_, started)) => {
                // Without a scheduler (lost, or the job broke) nobody will say Terminate.
                if self.broken.is_some() {
                    return true;
                }
                if started.elapsed() > self.cfg.timeout {
                    tracing::warn!(
                        "shutdown: the scheduler did not confirm within {:?}; leaving",
                        self.cfg.timeout
                    );
                    return true;
                }
                false
            }
            None => {
                // A server-only process ends with the job.
                self.worker.is_none() && self.broken.is_some()
            }
        }
    }

    fn next_timeout(&self) -> Duration {
        let mut t = Duration::from_millis(200);
        if let Some(w) = &self.worker {
            if !w.retry.is_empty() {
                return Duration::ZERO;
            }
            if !w.parked.is_empty() {
                // Parked chunks: check for a stalled server now and then (see `unpark`).
                t = t.min(MIN_SERVER_STALL / 4);
            }
            let now = Instant::now();
            for tensor in w.tensors.values() {
                if let Some(a) = &tensor.active {
                    t = t.min(a.deadline.saturating_duration_since(now));
                }
            }
        }
        if self
            .server
            .as_ref()
            .is_some_and(|s| !s.retry.is_empty() || !s.up_retry.is_empty())
        {
            return Duration::ZERO;
        }
        t
    }

    // ------------------------------------------------------------ commands

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Op(req) => self.on_op(req),
            Command::Barrier(id, completer) => {
                if let Some(e) = &self.broken {
                    completer.complete(Err(e.clone()));
                    return;
                }
                if let Some(w) = self.worker.as_mut() {
                    w.barriers.insert(id, completer);
                    self.send_sched(&Msg::Barrier { id });
                }
            }
            Command::Shutdown(tx) => {
                // Leaving after the job broke is not a clean end: say so, so the scheduler
                // tells the others (a server must not take the workers' leaving for success).
                match &self.broken {
                    Some(e) if self.worker.is_some() => self.send_sched(&Msg::Abort {
                        reason: e.to_string(),
                    }),
                    _ => self.send_sched(&Msg::Goodbye),
                }
                self.shutdown = Some((tx, Instant::now()));
            }
            Command::Sched(m) => self.on_sched(m),
            Command::Release { tensor, op, chunk } => self.release(tensor, op, chunk),
            Command::RegisterDmabuf {
                fd,
                offset,
                len,
                iova,
                reply,
            } => {
                use std::os::fd::AsFd;
                // SAFETY: the GPU engine registers device memory of an operation it runs; the
                // NIC writes into it only the answers of that operation's chunks (after their
                // pushes left), and the region is revoked when the operation fails and dropped
                // when it ends (unless BPS_RDMA_CACHE_USER_MEMORY=1).
                let r = unsafe { self.net.register_dmabuf(fd.as_fd(), offset, len, iova) };
                if let Err(e) = reply.send(r.map(|region| region.token).map_err(Error::from)) {
                    // The engine stopped waiting (its timeout): nobody will use or drop it.
                    if let Ok(token) = e.into_inner() {
                        let _ = self.net.deregister(token);
                    }
                }
            }
            Command::Deregister(token) => {
                let _ = self.net.deregister(token);
            }
            #[cfg(test)]
            Command::RegisterHost { raw, reply } => {
                // SAFETY: the test keeps the memory alive and untouched until it deregisters.
                let r = unsafe { crate::mem::register(&mut self.net, raw) };
                let _ = reply.send(r.map(|region| region.token).map_err(Error::from));
            }
            Command::SchedLost(why) => {
                if !self.terminated {
                    self.fail_all(Error::Peer {
                        what: "rendezvous".into(),
                        peer: format!("scheduler {}", self.cfg.scheduler),
                        reason: format!("lost: {why}"),
                    });
                }
            }
        }
    }

    fn on_sched(&mut self, m: Msg) {
        match m {
            Msg::Placement { tensor, servers } => {
                let lanes = self.lanes;
                let num_servers = if self.num_servers == 0 {
                    self.num_workers
                } else {
                    self.num_servers
                };
                let peers: Vec<PeerId> = servers.iter().map(|s| self.server_peer(*s)).collect();
                let (lr, l, group) = (
                    self.local_reduce,
                    self.local_size,
                    self.rank / self.local_size * self.local_size,
                );
                let Some(w) = self.worker.as_mut() else {
                    return;
                };
                let Some(t) = w.tensors.get_mut(&tensor) else {
                    return;
                };
                let gpu_tensor = t.gpu;
                if servers.len() != t.chunks.len() || servers.iter().any(|s| *s >= num_servers) {
                    let err = Error::Mismatch {
                        name: t.name.clone(),
                        reason: format!(
                            "the scheduler placed {} chunks but this worker cut the tensor into {} (is BYTEPS_PARTITION_BYTES the same everywhere?)",
                            servers.len(),
                            t.chunks.len()
                        ),
                    };
                    t.place = PlaceState::Failed(err.clone());
                    self.fail_tensor(tensor, err);
                    return;
                } else {
                    t.keys = t
                        .chunks
                        .iter()
                        .zip(peers)
                        .map(|(c, server)| {
                            let key = Key::new(bps_scheduler::TensorId(tensor), c.index);
                            let slot = w.reply_slots.len() as u32;
                            w.reply_slots.push((tensor, c.index.0));
                            let (target, scope) = if lr && !gpu_tensor {
                                // The chunk's aggregator on this host: spread over the group.
                                let leader = group + (tensor.wrapping_add(c.index.0)) % l;
                                (PeerId(leader), SCOPE_LOCAL)
                            } else {
                                (server, SCOPE_GLOBAL)
                            };
                            WKey {
                                server: target,
                                upstream: server,
                                scope,
                                lane: (key.0 ^ (key.0 >> 32)) as u32 % lanes,
                                init: KeyInit::None,
                                reply_slot: slot,
                                announced: None,
                            }
                        })
                        .collect();
                    t.place = PlaceState::Ready;
                }
                self.start_ready(tensor);
            }
            Msg::PlaceError { tensor, reason } => {
                let name = self
                    .worker
                    .as_ref()
                    .and_then(|w| w.tensors.get(&tensor))
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                let err = Error::Mismatch { name, reason };
                if let Some(t) = self
                    .worker
                    .as_mut()
                    .and_then(|w| w.tensors.get_mut(&tensor))
                {
                    t.place = PlaceState::Failed(err.clone());
                }
                self.fail_tensor(tensor, err);
            }
            Msg::BarrierDone { id } => {
                if let Some(c) = self.worker.as_mut().and_then(|w| w.barriers.remove(&id)) {
                    c.complete(Ok(()));
                }
            }
            Msg::Terminate => self.terminated = true,
            Msg::PeerDead { peer, reason } => {
                let _ = peer;
                if self.shutdown.is_some() {
                    tracing::debug!("during shutdown: {reason}");
                }
                self.fail_all(Error::Peer {
                    what: "job".into(),
                    peer: String::new(),
                    reason,
                });
            }
            m @ (Msg::GpuId { .. } | Msg::GpuGo { .. }) => {
                let _ = self.gpu_tx.send(GpuMsg::Sched(m));
            }
            other => tracing::warn!("unexpected message from the scheduler: {other:?}"),
        }
    }

    fn on_op(&mut self, req: OpRequest) {
        if let Some(e) = &self.broken {
            req.completer.complete(Err(e.clone()));
            return;
        }
        if self.shutdown.is_some() {
            req.completer.complete(Err(Error::ShutDown));
            return;
        }
        let partition_bytes = self.cfg.tensor_partition_bytes(req.bytes);
        let Some(w) = self.worker.as_mut() else {
            req.completer.complete(Err(Error::InvalidArgument(
                "this process is not a worker".into(),
            )));
            return;
        };
        let tensor = req.tensor;
        match w.tensors.get(&tensor) {
            Some(t) => {
                if t.gpu != req.gpu.is_some() {
                    let e = Error::Mismatch {
                        name: req.name.clone(),
                        reason: "used both as a GPU tensor and as a host tensor: give them different names".into(),
                    };
                    req.completer.complete(Err(e));
                    return;
                }
                if t.bytes != req.bytes || t.dtype != req.dtype {
                    let e = Error::Mismatch {
                        name: req.name.clone(),
                        reason: format!(
                            "first used with {} bytes of {}, now {} bytes of {}",
                            t.bytes, t.dtype, req.bytes, req.dtype
                        ),
                    };
                    req.completer.complete(Err(e));
                    return;
                }
            }
            None => {
                let chunks = match partition(req.bytes, req.dtype.size(), partition_bytes) {
                    Ok(c) => c,
                    Err(e) => {
                        req.completer
                            .complete(Err(Error::InvalidArgument(e.to_string())));
                        return;
                    }
                };
                w.tensors.insert(
                    tensor,
                    WTensor {
                        name: req.name.clone(),
                        dtype: req.dtype,
                        bytes: req.bytes,
                        chunks,
                        place: PlaceState::None,
                        keys: Vec::new(),
                        active: None,
                        waiting: VecDeque::new(),
                        place_deadline: None,
                        gpu: req.gpu.is_some(),
                        early: Vec::new(),
                        server_window: server_window(self.cfg.server_credit, partition_bytes),
                    },
                );
            }
        }
        if req.bytes == 0 {
            req.completer.complete(Ok(()));
            return;
        }
        let t = w.tensors.get_mut(&tensor).expect("inserted above");
        if let PlaceState::Failed(e) = &t.place {
            req.completer.complete(Err(e.clone()));
            return;
        }
        t.waiting.push_back(req);
        if matches!(t.place, PlaceState::None) {
            t.place = PlaceState::Requested;
            t.place_deadline = Some(Instant::now() + self.cfg.timeout);
            let (name, bytes, dtype) = (t.name.clone(), t.bytes as u64, t.dtype as u8);
            self.send_sched(&Msg::Place {
                tensor,
                name,
                bytes,
                dtype,
            });
            return;
        }
        self.start_ready(tensor);
    }

    /// Start the next waiting operation of a tensor if it is placed and idle.
    fn start_ready(&mut self, tensor: u32) {
        let timeout = self.cfg.timeout;
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let Some(t) = w.tensors.get_mut(&tensor) else {
            return;
        };
        if !matches!(t.place, PlaceState::Ready) || t.active.is_some() {
            return;
        }
        let Some(req) = t.waiting.pop_front() else {
            return;
        };
        let region = req.gpu.as_ref().and_then(|g| g.region);
        let in_token = match region {
            Some(tok) => Ok(tok),
            None => register_cached(&mut self.net, &mut w.cache, &self.stats, req.input),
        };
        let out_token = if req.output == req.input {
            in_token.clone()
        } else {
            register_cached(&mut self.net, &mut w.cache, &self.stats, req.output)
        };
        let (in_token, out_token) = match (in_token, out_token) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                req.completer.complete(Err(e));
                return;
            }
        };
        let n = t.chunks.len();
        let prio = Priority(req.priority);
        let mut states = vec![ChunkSt::Queued; n];
        let mut left = n;
        for (i, c) in t.chunks.iter().enumerate() {
            if let Some(g) = &req.gpu {
                if !g.owned.get(i).copied().unwrap_or(false) {
                    states[i] = ChunkSt::Done;
                    left -= 1;
                    continue;
                }
                if let Some(at) = t.early.iter().position(|e| *e == (g.op, i as u32)) {
                    t.early.swap_remove(at);
                } else {
                    states[i] = ChunkSt::Held;
                    continue;
                }
            }
            w.queue.push((tensor, c.index.0), prio, c.len as u64);
        }
        if left == 0 {
            // A GPU operation with no chunk owned here.
            let drop_regs =
                self.rdma_links && !self.cfg.rdma_cache_user_memory && req.gpu.is_none();
            release_op_memory(
                &mut self.net,
                &mut w.cache,
                req.input,
                req.output,
                drop_regs,
            );
            req.completer.complete(Ok(()));
            self.start_ready(tensor);
            return;
        }
        t.active = Some(Active {
            req,
            in_token,
            out_token,
            left,
            deadline: Instant::now() + timeout,
            chunks: states,
            credit: vec![false; n],
            at_server: vec![false; n],
            seq: {
                w.ops_started += 1;
                w.ops_started
            },
        });
    }

    /// The GPU side staged a chunk: queue its push.
    fn release(&mut self, tensor: u32, op: u64, chunk: u32) {
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let Some(t) = w.tensors.get_mut(&tensor) else {
            return;
        };
        let ci = chunk as usize;
        if let Some(a) = t.active.as_mut() {
            if a.req.gpu.as_ref().is_some_and(|g| g.op == op) {
                if a.chunks.get(ci) == Some(&ChunkSt::Held) {
                    a.chunks[ci] = ChunkSt::Queued;
                    let c = t.chunks[ci];
                    w.queue
                        .push((tensor, c.index.0), Priority(a.req.priority), c.len as u64);
                }
                return;
            }
        }
        t.early.push((op, chunk));
    }

    // ------------------------------------------------------------ issuing

    fn pump(&mut self) {
        // server answers that hit back-pressure
        if let Some(s) = self.server.as_mut() {
            let retry: Vec<(u32, u32)> = s.retry.drain(..).collect();
            let up: Vec<u32> = s.up_retry.drain(..).collect();
            for (slot, w) in retry {
                self.send_answer(slot, w);
            }
            for slot in up {
                self.forward(slot);
            }
        }
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let retry: Vec<(u32, u32)> = w.retry.drain(..).collect();
        for (t, c) in retry {
            self.issue(t, c);
        }
        self.unpark();
        loop {
            let Some(w) = self.worker.as_mut() else {
                return;
            };
            if !w.retry.is_empty() {
                return;
            }
            let Some(((t, c), bytes)) = w.queue.pop() else {
                return;
            };
            match w.tensors.get_mut(&t).and_then(|x| x.active.as_mut()) {
                Some(a)
                    if a.chunks.get(c as usize) == Some(&ChunkSt::Queued)
                        && !a.credit[c as usize] =>
                {
                    a.credit[c as usize] = true;
                }
                _ => {
                    // A stale entry (its operation failed): give the credit back.
                    w.queue.release(bytes);
                    continue;
                }
            }
            if !admit_to_server(w, &self.net, &self.stats, t, c) {
                continue;
            }
            self.issue(t, c);
        }
    }

    /// Let go the parked chunks whose server's window has room again.
    fn unpark(&mut self) {
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        if w.parked.is_empty() {
            return;
        }
        let mut go = Vec::new();
        let servers: Vec<PeerId> = w.parked.keys().copied().collect();
        let now = Instant::now();
        for server in servers {
            // Workers may push in different orders (tensors submitted in another order, GPU
            // chunks released as their copies finish): each can fill its window at a server
            // with chunks whose rounds wait for the others' parked ones. A server that has not
            // answered this worker for a while (several of its usual gaps) is taken to be in
            // that state, and its parked chunks all go.
            let stalled = w.answered.get(&server).is_some_and(|(at, gap)| {
                now.duration_since(*at) > (*gap * 8).max(MIN_SERVER_STALL)
            });
            if stalled {
                tracing::debug!(
                    "server window of peer {server}: no answer for a while, letting {} parked chunks go",
                    w.parked.get(&server).map_or(0, VecDeque::len)
                );
                self.stats.window_stalls.fetch_add(1, Ordering::Relaxed);
                if let Some(e) = w.answered.get_mut(&server) {
                    e.0 = now;
                }
            }
            while let Some(&(t, c, seq)) = w.parked.get(&server).and_then(|q| q.front()) {
                let Some(a) = w
                    .tensors
                    .get(&t)
                    .and_then(|x| x.active.as_ref().map(|a| (x, a)))
                else {
                    w.parked.get_mut(&server).map(|q| q.pop_front());
                    continue;
                };
                let (x, a) = a;
                let ci = c as usize;
                if a.seq != seq || a.chunks.get(ci) != Some(&ChunkSt::Queued) || a.at_server[ci] {
                    // Its operation failed (the credit went back with it).
                    w.parked.get_mut(&server).map(|q| q.pop_front());
                    continue;
                }
                let (len, prio, window) =
                    (x.chunks[ci].len as u64, a.req.priority, x.server_window);
                if !stalled
                    && !window_urgent(w, server, prio)
                    && !window_room(w, server, len, window)
                {
                    break;
                }
                w.parked.get_mut(&server).map(|q| q.pop_front());
                if let Some(a) = w.tensors.get_mut(&t).and_then(|x| x.active.as_mut()) {
                    a.at_server[ci] = true;
                }
                window_add(w, &self.stats, server, len, prio);
                go.push((t, c));
            }
        }
        w.parked.retain(|_, q| !q.is_empty());
        for (t, c) in go {
            self.issue(t, c);
        }
    }

    /// Move one chunk forward: key set-up, reply address, push.
    fn issue(&mut self, tensor: u32, chunk: u32) {
        let rank = self.rank;
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let Some(t) = w.tensors.get_mut(&tensor) else {
            return;
        };
        let Some(a) = t.active.as_mut() else {
            return;
        };
        let ci = chunk as usize;
        if a.chunks[ci] == ChunkSt::Done || a.chunks[ci] == ChunkSt::Pushed {
            return;
        }
        let c = t.chunks[ci];
        let key = Key::new(bps_scheduler::TensorId(tensor), c.index);
        let k = &mut t.keys[ci];
        match k.init {
            KeyInit::None => {
                let m = Msg::InitKey {
                    key: key.0,
                    bytes: c.len as u64,
                    dtype: t.dtype as u8,
                    reply_slot: k.reply_slot,
                    name: t.name.clone(),
                    scope: k.scope,
                    upstream: k.upstream.0,
                };
                match self.net.try_send(k.server, k.lane, &m.encode()) {
                    Ok(()) => {
                        k.init = KeyInit::Sent;
                        a.chunks[ci] = ChunkSt::WaitInit;
                    }
                    Err(e) if e.is_busy() => w.retry.push_back((tensor, chunk)),
                    Err(e) => {
                        let server = k.server;
                        self.fail_send(tensor, key, server, &e);
                    }
                }
            }
            KeyInit::Sent => a.chunks[ci] = ChunkSt::WaitInit,
            KeyInit::Ready {
                slot,
                token,
                offset,
            } => {
                let want = (a.out_token, c.offset as u64);
                if k.announced != Some(want) {
                    let m = Msg::SetReply {
                        server_slot: slot,
                        token: want.0,
                        offset: want.1,
                    };
                    match self.net.try_send(k.server, k.lane, &m.encode()) {
                        Ok(()) => k.announced = Some(want),
                        Err(e) if e.is_busy() => {
                            w.retry.push_back((tensor, chunk));
                            return;
                        }
                        Err(e) => {
                            let server = k.server;
                            self.fail_send(tensor, key, server, &e);
                            return;
                        }
                    }
                }
                let (len, flags) = match a.req.kind {
                    OpKind::Sum { .. } => (c.len as u64, 0),
                    OpKind::Broadcast { root } if root == rank => (c.len as u64, F_BCAST | F_ROOT),
                    OpKind::Broadcast { .. } => (0, F_BCAST),
                };
                let wr_id = ((tensor as u64) << 32) | chunk as u64;
                let r = self.net.try_write_imm(
                    k.server,
                    k.lane,
                    a.in_token,
                    c.offset as u64,
                    len,
                    RemoteSlice { token, offset },
                    slot | flags,
                    wr_id,
                );
                match r {
                    Ok(()) => {
                        a.chunks[ci] = ChunkSt::Pushed;
                        self.stats
                            .pushed_bytes
                            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) if e.is_busy() => w.retry.push_back((tensor, chunk)),
                    Err(e) => {
                        let server = k.server;
                        self.fail_send(tensor, key, server, &e);
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------ events

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected { peer, kind } => {
                tracing::debug!("connected to {} over {kind}", label(&self.book, peer));
                if kind == bps_transport::LinkKind::Rdma {
                    self.rdma_links = true;
                }
                self.stats
                    .links
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(peer.0, kind);
            }
            Event::Message { peer, data, .. } => match Msg::decode(&data) {
                Ok(m) => self.on_peer_msg(peer, m),
                Err(e) => {
                    let who = label(&self.book, peer);
                    tracing::warn!("undecodable message from {who}: {e}");
                    self.fail_all(Error::Peer {
                        what: "control message".into(),
                        peer: who,
                        reason: format!("sent an undecodable message: {e}"),
                    });
                }
            },
            Event::WriteDone { peer: _, wr_id } => {
                if wr_id & WR_SERVER != 0 {
                    let slot = (wr_id & 0xffff_ffff) as u32;
                    self.on_answer_sent(slot);
                } else if wr_id & WR_UP == 0 {
                    self.on_push_sent((wr_id >> 32) as u32, (wr_id & 0xffff_ffff) as u32);
                }
            }
            Event::WriteReceived {
                peer,
                imm,
                token,
                offset,
                len,
            } => {
                let to_server = self
                    .server
                    .as_ref()
                    .is_some_and(|s| s.by_token.contains_key(&token));
                let upstream_answer = self
                    .server
                    .as_ref()
                    .and_then(|s| s.by_sum_token.get(&token).copied());
                if to_server {
                    self.on_push(peer, imm, token, offset, len);
                } else if let Some(slot) = upstream_answer {
                    self.on_upstream_answer(peer, slot, offset, len);
                } else {
                    self.on_answer(peer, imm, token, offset, len);
                }
            }
            Event::PeerLost { peer, error } => {
                let who = label(&self.book, peer);
                tracing::debug!("link to {who} dropped: {error}");
                if self.terminated || self.broken.is_some() {
                    return;
                }
                // Processes leave at the end of a job before the scheduler's Terminate reaches
                // everyone, and a dead process is announced by the scheduler: wait a moment
                // for either before calling the link failure fatal.
                let err = Error::Peer {
                    what: "connection".into(),
                    peer: who,
                    reason: format!("lost: {error}"),
                };
                let grace = self.cfg.timeout.min(Duration::from_secs(2));
                self.suspect.get_or_insert((Instant::now() + grace, err));
            }
        }
    }

    fn on_peer_msg(&mut self, peer: PeerId, m: Msg) {
        match m {
            Msg::InitKey {
                key,
                bytes,
                dtype,
                reply_slot,
                name,
                scope,
                upstream,
            } => self.on_init_key(peer, key, bytes, dtype, reply_slot, name, scope, upstream),
            Msg::SetReply {
                server_slot,
                token,
                offset,
            } => {
                let scope = self
                    .server
                    .as_ref()
                    .and_then(|s| s.keys.get(server_slot as usize))
                    .map(|k| k.scope);
                let wi = scope.and_then(|sc| self.participant(sc, peer));
                let ok = self.server.as_mut().and_then(|s| {
                    let k = s.keys.get_mut(server_slot as usize)?;
                    let w = k.workers.get_mut(wi? as usize)?;
                    (w.inited && w.peer == Some(peer)).then(|| w.reply = Some((token, offset)))
                });
                if ok.is_none() {
                    self.protocol_violation(
                        peer,
                        format!("SetReply for unknown slot {server_slot}"),
                    );
                }
            }
            Msg::InitAck {
                scope,
                key,
                server_slot,
                token,
                offset,
            } => {
                let gpu_key = self
                    .worker
                    .as_ref()
                    .and_then(|w| w.tensors.get(&Key(key).tensor().0))
                    .is_some_and(|t| t.gpu);
                if self.local_reduce && scope == SCOPE_GLOBAL && !gpu_key {
                    // Answer to this host's aggregator of the key (a GPU tensor's chunks go
                    // to their servers straight from the worker).
                    self.on_upstream_ack(key, server_slot, token, offset);
                    return;
                }
                let k = Key(key);
                let (tensor, chunk) = (k.tensor().0, k.chunk().0 as usize);
                let Some(t) = self
                    .worker
                    .as_mut()
                    .and_then(|w| w.tensors.get_mut(&tensor))
                else {
                    return;
                };
                let Some(wk) = t.keys.get_mut(chunk) else {
                    return;
                };
                wk.init = KeyInit::Ready {
                    slot: server_slot & SLOT_MASK,
                    token,
                    offset,
                };
                let waiting = t
                    .active
                    .as_ref()
                    .is_some_and(|a| a.chunks[chunk] == ChunkSt::WaitInit);
                if waiting {
                    self.issue(tensor, chunk as u32);
                }
            }
            Msg::KeyError { key, reason } => {
                // A host aggregator passes a server's refusal on to its host's workers (once:
                // the aggregator may be one of them, and hears its own message).
                let agg = self.server.as_ref().and_then(|s| {
                    let slot = *s.by_key.get(&(SCOPE_LOCAL, key))?;
                    (s.keys[slot as usize].up_peer == peer && peer != self.me).then_some(slot)
                });
                if let Some(slot) = agg {
                    self.key_error(slot, reason.clone());
                }
                let k = Key(key);
                let name = self
                    .worker
                    .as_ref()
                    .and_then(|w| w.tensors.get(&k.tensor().0))
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                let who = label(&self.book, peer);
                self.fail_tensor(
                    k.tensor().0,
                    Error::Mismatch {
                        name,
                        reason: format!("key {k} refused by {who}: {reason}"),
                    },
                );
            }
            other => {
                self.protocol_violation(peer, format!("unexpected message {other:?}"));
            }
        }
    }

    fn protocol_violation(&mut self, peer: PeerId, what: String) {
        let who = label(&self.book, peer);
        tracing::warn!("protocol violation by {who}: {what}");
        self.fail_all(Error::Peer {
            what: "protocol".into(),
            peer: who,
            reason: what,
        });
    }

    // ------------------------------------------------------------ server part

    /// Index of `peer` among the participants of a key of `scope`, if it may push it.
    fn participant(&self, scope: u8, peer: PeerId) -> Option<u32> {
        let (w, l) = (self.num_workers, self.local_size);
        if peer.0 >= w {
            return None;
        }
        match scope {
            SCOPE_GLOBAL if self.local_reduce => Some(peer.0 / l),
            SCOPE_GLOBAL => Some(peer.0),
            SCOPE_LOCAL if self.local_reduce && peer.0 / l == self.rank / l => Some(peer.0 % l),
            _ => None,
        }
    }

    fn participants(&self, scope: u8) -> u32 {
        match scope {
            SCOPE_GLOBAL if self.local_reduce => self.num_workers / self.local_size,
            SCOPE_GLOBAL => self.num_workers,
            _ => self.local_size,
        }
    }

    /// Tell every participant of a key that it failed.
    fn key_error(&mut self, slot: u32, reason: String) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let sk = &mut s.keys[slot as usize];
        sk.arrived = 0;
        sk.flags = None;
        sk.root = None;
        sk.summing = false;
        sk.up_pending = false;
        for w in sk.workers.iter_mut() {
            w.pushed = false;
        }
        let (key, lane) = (sk.key.0, sk.lane);
        let peers: Vec<PeerId> = sk.workers.iter().filter_map(|w| w.peer).collect();
        for p in peers {
            let m = Msg::KeyError {
                key,
                reason: reason.clone(),
            };
            let _ = self.net.try_send(p, lane, &m.encode());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_init_key(
        &mut self,
        peer: PeerId,
        key: u64,
        bytes: u64,
        dtype: u8,
        reply_slot: u32,
        name: String,
        scope: u8,
        upstream: u32,
    ) {
        let lanes = self.lanes;
        let max_bytes = self.cfg.partition_bytes as u64;
        let who = label(&self.book, peer);
        let k = Key(key);
        let lane = (k.0 ^ (k.0 >> 32)) as u32 % lanes;
        let refuse = |net: &mut Net, reason: String| {
            let m = Msg::KeyError { key, reason };
            if let Err(e) = net.try_send(peer, lane, &m.encode()) {
                tracing::warn!("answer to {who} failed: {e}");
            }
        };
        if self.server.is_none() && scope == SCOPE_GLOBAL {
            refuse(&mut self.net, "this process serves no keys".into());
            return;
        }
        let Some(index) = self.participant(scope, peer) else {
            refuse(
                &mut self.net,
                format!("{who} may not push key {k} here (scope {scope})"),
            );
            return;
        };
        let n = self.participants(scope);
        let up_peer = if scope == SCOPE_LOCAL {
            if (upstream as usize) >= self.book.len() {
                refuse(&mut self.net, format!("unknown upstream server {upstream}"));
                return;
            }
            PeerId(upstream)
        } else {
            PeerId(u32::MAX)
        };
        let Some(dt) = DType::from_u8(dtype) else {
            refuse(&mut self.net, format!("unknown dtype code {dtype}"));
            return;
        };
        if bytes == 0 || bytes > max_bytes || !bytes.is_multiple_of(dt.size() as u64) {
            refuse(
                &mut self.net,
                format!("chunk of {bytes} bytes is not allowed (1..={max_bytes} bytes, whole {dt} elements)"),
            );
            return;
        }
        if self.server.is_none() {
            // A worker that aggregates for its host but serves no global keys still needs the
            // machinery: create it on first use.
            self.server = Some(Server::new(&self.cfg, self.waker.clone()));
        }
        let s = self.server.as_mut().expect("created above");
        if s.keys.len() >= SLOT_MASK as usize && !s.by_key.contains_key(&(scope, key)) {
            refuse(
                &mut self.net,
                "this server holds the maximum number of keys".into(),
            );
            return;
        }
        let slot = match s.by_key.get(&(scope, key)) {
            Some(&slot) => {
                let sk = &s.keys[slot as usize];
                if sk.bytes as u64 != bytes || sk.dtype != dt {
                    let reason = format!(
                        "tensor {:?} key {k} is {} bytes of {} on the first worker that used it but {bytes} bytes of {dt} ({name:?}) on {who}",
                        sk.name, sk.bytes, sk.dtype
                    );
                    refuse(&mut self.net, reason);
                    return;
                }
                slot
            }
            None => {
                // Bounded memory: a peer cannot make this process allocate without limit.
                let need = (n as u64 + 1) * bytes;
                if s.key_bytes + need > self.cfg.server_max_bytes {
                    let reason = format!(
                        "this process already holds {} bytes of key buffers; key {k} needs {need} more, over BPS_SERVER_MAX_BYTES={} (raise it, add servers, or use fewer/smaller tensors)",
                        s.key_bytes, self.cfg.server_max_bytes
                    );
                    refuse(&mut self.net, reason);
                    return;
                }
                s.key_bytes += need;
                let recv = SharedMem::new(n as usize * bytes as usize);
                let sum = SharedMem::new(bytes as usize);
                // SAFETY: both buffers are owned by the SKey stored below and are deregistered
                // before they are dropped (Node::drop).
                let (rt, st) = unsafe {
                    (
                        crate::mem::register(&mut self.net, recv.raw()),
                        crate::mem::register(&mut self.net, sum.raw()),
                    )
                };
                let (rt, st) = match (rt, st) {
                    (Ok(a), Ok(b)) => (a.token, b.token),
                    (Err(e), _) | (_, Err(e)) => {
                        refuse(&mut self.net, e.to_string());
                        return;
                    }
                };
                let slot = s.keys.len() as u32;
                s.keys.push(SKey {
                    key: k,
                    scope,
                    name: name.clone(),
                    bytes: bytes as usize,
                    dtype: dt,
                    recv,
                    recv_token: rt,
                    sum,
                    sum_token: st,
                    workers: vec![SWorker::default(); n as usize],
                    arrived: 0,
                    flags: None,
                    root: None,
                    sends_pending: 0,
                    deferred: false,
                    summing: false,
                    lane,
                    up_peer,
                    up_init: KeyInit::None,
                    up_announced: false,
                    up_pending: false,
                });
                s.by_key.insert((scope, key), slot);
                s.by_token.insert(rt, slot);
                if scope == SCOPE_LOCAL {
                    s.by_sum_token.insert(st, slot);
                }
                slot
            }
        };
        let sk = &mut s.keys[slot as usize];
        let w = &mut sk.workers[index as usize];
        w.inited = true;
        w.reply_slot = reply_slot;
        w.peer = Some(peer);
        let ack = Msg::InitAck {
            scope,
            key,
            server_slot: slot,
            token: sk.recv_token,
            offset: index as u64 * sk.bytes as u64,
        };
        if let Err(e) = self.net.try_send(peer, lane, &ack.encode()) {
            tracing::warn!("answer to {} failed: {e}", label(&self.book, peer));
        }
    }

    fn on_push(&mut self, peer: PeerId, imm: u32, token: u64, offset: u64, len: u64) {
        let slot = imm & SLOT_MASK;
        let flags = imm & !SLOT_MASK;
        let scope = match self.server.as_ref().and_then(|s| s.keys.get(slot as usize)) {
            Some(sk) => sk.scope,
            None => {
                self.protocol_violation(peer, format!("push for unknown slot {slot}"));
                return;
            }
        };
        let index = self.participant(scope, peer);
        let n = self.participants(scope);
        let s = self.server.as_mut().expect("checked above");
        let check = (|| {
            let sk = &s.keys[slot as usize];
            let wi =
                index.ok_or_else(|| format!("push for key {} from a non-participant", sk.key))?;
            if s.by_token.get(&token) != Some(&slot) {
                return Err(format!(
                    "push for slot {slot} landed in another key's buffer"
                ));
            }
            let w = &sk.workers[wi as usize];
            if !w.inited || w.peer != Some(peer) {
                return Err(format!("push for key {} before InitKey", sk.key));
            }
            if offset != wi as u64 * sk.bytes as u64 {
                return Err(format!("push for key {} at the wrong offset", sk.key));
            }
            let want_len = if flags & F_BCAST != 0 && flags & F_ROOT == 0 {
                0
            } else {
                sk.bytes as u64
            };
            if len != want_len {
                return Err(format!(
                    "push of {len} bytes for key {} of {} bytes",
                    sk.key, sk.bytes
                ));
            }
            if w.pushed {
                return Err(format!(
                    "second push for key {} before the round ended",
                    sk.key
                ));
            }
            Ok(wi)
        })();
        let wi = match check {
            Ok(wi) => wi,
            Err(why) => {
                self.protocol_violation(peer, why);
                return;
            }
        };
        let sk = &mut s.keys[slot as usize];
        let round_kind = flags & F_BCAST;
        match sk.flags {
            None => sk.flags = Some(round_kind),
            Some(f) if f != round_kind => {
                let reason = format!(
                    "workers disagree on the operation for key {} of {:?}: some push_pull, some broadcast",
                    sk.key, sk.name
                );
                self.key_error(slot, reason);
                return;
            }
            Some(_) => {}
        }
        if flags & F_ROOT != 0 {
            if sk.root.is_some() {
                let why = format!("two broadcast roots for key {}", sk.key);
                self.key_error(slot, why);
                return;
            }
            sk.root = Some(wi);
        }
        sk.workers[wi as usize].pushed = true;
        sk.arrived += 1;
        if sk.arrived == n {
            if sk.sends_pending > 0 || sk.summing || sk.up_pending {
                sk.deferred = true;
            } else {
                self.reduce(slot);
            }
        }
    }

    /// Every participant pushed: sum (or copy the broadcast root's data) on an engine thread.
    fn reduce(&mut self, slot: u32) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let sk = &mut s.keys[slot as usize];
        let n = sk.bytes;
        let bcast = sk.flags.is_some_and(|f| f & F_BCAST != 0);
        let inputs: Vec<RawSlice> = match (bcast, sk.root) {
            (true, Some(root)) => vec![sk.recv.raw().sub(root as usize * n, n)],
            (true, None) if sk.scope == SCOPE_LOCAL => {
                // The root is on another host: nothing to contribute from here.
                self.forward(slot);
                return;
            }
            (true, None) => {
                let reason = format!("broadcast of key {} has no root among the workers", sk.key);
                self.key_error(slot, reason);
                return;
            }
            (false, _) => (0..sk.workers.len())
                .map(|w| sk.recv.raw().sub(w * n, n))
                .collect(),
        };
        sk.summing = true;
        let job = SumJob {
            slot,
            dtype: sk.dtype,
            out: sk.sum.raw(),
            inputs,
        };
        if sk.bytes <= self.cfg.inline_sum_bytes {
            // Small chunks: two thread hand-offs cost more than the sum itself.
            let r = run_sum(&job);
            let s = self.server.as_mut().expect("server");
            s.inline_done.push(r);
            return;
        }
        let e = slot as usize % s.engines.len();
        if s.engines[e].send(job).is_err() {
            self.fail_all(Error::Transport("a summation thread died".into()));
        }
    }

    fn drain_sums(&mut self) {
        let Some(s) = self.server.as_ref() else {
            return;
        };
        let mut done: Vec<_> = s.done_rx.try_iter().collect();
        let s = self.server.as_mut().expect("checked above");
        done.append(&mut s.inline_done);
        for d in done {
            match d {
                Ok(slot) => {
                    let s = self.server.as_mut().expect("server");
                    let sk = &mut s.keys[slot as usize];
                    sk.summing = false;
                    if sk.scope == SCOPE_LOCAL {
                        self.forward(slot);
                    } else {
                        self.answer(slot);
                    }
                }
                Err((slot, why)) => self.key_error(slot, why),
            }
        }
    }

    /// A host's local sum is ready: push it to the key's server (first use: InitKey).
    fn forward(&mut self, slot: u32) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let sk = &mut s.keys[slot as usize];
        sk.up_pending = true;
        let (up, lane) = (sk.up_peer, sk.lane);
        match sk.up_init {
            KeyInit::None => {
                let m = Msg::InitKey {
                    key: sk.key.0,
                    bytes: sk.bytes as u64,
                    dtype: sk.dtype as u8,
                    reply_slot: slot,
                    name: sk.name.clone(),
                    scope: SCOPE_GLOBAL,
                    upstream: 0,
                };
                match self.net.try_send(up, lane, &m.encode()) {
                    Ok(()) => sk.up_init = KeyInit::Sent,
                    Err(e) if e.is_busy() => s.up_retry.push_back(slot),
                    Err(e) => {
                        let why = format!("forwarding to {}: {e}", label(&self.book, up));
                        self.key_error(slot, why);
                    }
                }
            }
            KeyInit::Sent => {}
            KeyInit::Ready {
                slot: up_slot,
                token,
                offset,
            } => {
                if !sk.up_announced {
                    let m = Msg::SetReply {
                        server_slot: up_slot,
                        token: sk.sum_token,
                        offset: 0,
                    };
                    match self.net.try_send(up, lane, &m.encode()) {
                        Ok(()) => sk.up_announced = true,
                        Err(e) if e.is_busy() => {
                            s.up_retry.push_back(slot);
                            return;
                        }
                        Err(e) => {
                            let why = format!("forwarding to {}: {e}", label(&self.book, up));
                            self.key_error(slot, why);
                            return;
                        }
                    }
                }
                let bcast = sk.flags.is_some_and(|f| f & F_BCAST != 0);
                let (len, flags) = match (bcast, sk.root) {
                    (false, _) => (sk.bytes as u64, 0),
                    (true, Some(_)) => (sk.bytes as u64, F_BCAST | F_ROOT),
                    (true, None) => (0, F_BCAST),
                };
                let r = self.net.try_write_imm(
                    up,
                    lane,
                    sk.sum_token,
                    0,
                    len,
                    RemoteSlice { token, offset },
                    up_slot | flags,
                    WR_UP | slot as u64,
                );
                match r {
                    Ok(()) => sk.up_pending = false,
                    Err(e) if e.is_busy() => s.up_retry.push_back(slot),
                    Err(e) => {
                        let why = format!("forwarding to {}: {e}", label(&self.book, up));
                        self.key_error(slot, why);
                    }
                }
            }
        }
    }

    /// The server answered a host aggregator's InitKey.
    fn on_upstream_ack(&mut self, key: u64, up_slot: u32, token: u64, offset: u64) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let Some(&slot) = s.by_key.get(&(SCOPE_LOCAL, key)) else {
            return;
        };
        let sk = &mut s.keys[slot as usize];
        sk.up_init = KeyInit::Ready {
            slot: up_slot & SLOT_MASK,
            token,
            offset,
        };
        if sk.up_pending {
            self.forward(slot);
        }
    }

    /// The global sum of a host-aggregated key arrived (in its sum buffer).
    fn on_upstream_answer(&mut self, peer: PeerId, slot: u32, offset: u64, len: u64) {
        let ok = self.server.as_ref().is_some_and(|s| {
            let sk = &s.keys[slot as usize];
            sk.up_peer == peer && offset == 0 && len == sk.bytes as u64 && !sk.up_pending
        });
        if !ok {
            self.protocol_violation(
                peer,
                format!("unexpected answer into aggregator slot {slot}"),
            );
            return;
        }
        self.answer(slot);
    }

    /// The round's result is ready: write it to every participant.
    fn answer(&mut self, slot: u32) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let sk = &mut s.keys[slot as usize];
        sk.summing = false;
        sk.arrived = 0;
        sk.flags = None;
        sk.root = None;
        for w in sk.workers.iter_mut() {
            w.pushed = false;
        }
        let n = sk.workers.len() as u32;
        if sk.scope == SCOPE_GLOBAL {
            self.stats
                .rounds
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        for w in 0..n {
            self.send_answer(slot, w);
        }
        self.last_done = Some(Instant::now());
    }

    fn send_answer(&mut self, slot: u32, w: u32) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let sk = &mut s.keys[slot as usize];
        let sw = sk.workers[w as usize];
        let (Some((token, offset)), Some(peer)) = (sw.reply, sw.peer) else {
            let why = format!(
                "participant {w} pushed key {} without a reply address",
                sk.key
            );
            self.key_error(slot, why);
            return;
        };
        let r = self.net.try_write_imm(
            peer,
            sk.lane,
            sk.sum_token,
            0,
            sk.bytes as u64,
            RemoteSlice { token, offset },
            sw.reply_slot,
            WR_SERVER | slot as u64,
        );
        match r {
            Ok(()) => sk.sends_pending += 1,
            Err(e) if e.is_busy() => s.retry.push_back((slot, w)),
            Err(e) => {
                tracing::debug!("answer to {} failed: {e}", label(&self.book, peer));
            }
        }
    }

    fn on_answer_sent(&mut self, slot: u32) {
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let Some(sk) = s.keys.get_mut(slot as usize) else {
            return;
        };
        sk.sends_pending = sk.sends_pending.saturating_sub(1);
        if sk.sends_pending == 0 && sk.deferred {
            sk.deferred = false;
            self.reduce(slot);
        }
    }

    // ------------------------------------------------------------ worker completions

    /// A push left this process: its bytes stop counting against the credit, so the next
    /// chunks go out while answers come back (both directions of the link busy).
    fn on_push_sent(&mut self, tensor: u32, chunk: u32) {
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let Some(t) = w.tensors.get_mut(&tensor) else {
            return;
        };
        let Some(a) = t.active.as_mut() else {
            return;
        };
        let ci = chunk as usize;
        if a.credit.get(ci).copied().unwrap_or(false) {
            a.credit[ci] = false;
            w.queue.release(t.chunks[ci].len as u64);
        }
    }

    fn on_answer(&mut self, peer: PeerId, imm: u32, token: u64, offset: u64, len: u64) {
        let nw = self.num_workers;
        let timeout = self.cfg.timeout;
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let Some(&(tensor, chunk)) = w.reply_slots.get(imm as usize) else {
            self.protocol_violation(peer, format!("answer with unknown reply slot {imm}"));
            return;
        };
        let Some(t) = w.tensors.get_mut(&tensor) else {
            return;
        };
        let ci = chunk as usize;
        let c = t.chunks[ci];
        let Some(a) = t.active.as_mut() else {
            self.protocol_violation(peer, format!("answer for idle tensor {tensor}"));
            return;
        };
        if a.chunks[ci] != ChunkSt::Pushed
            || token != a.out_token
            || offset != c.offset as u64
            || len != c.len as u64
            || t.keys[ci].server != peer
        {
            let why = format!(
                "unexpected answer for key {} (state {:?})",
                Key::new(bps_scheduler::TensorId(tensor), c.index),
                a.chunks[ci]
            );
            self.protocol_violation(peer, why);
            return;
        }
        a.chunks[ci] = ChunkSt::Done;
        if std::mem::take(&mut a.at_server[ci]) {
            let prio = a.req.priority;
            window_remove(
                &mut w.at_server,
                &mut w.at_server_prio,
                peer,
                c.len as u64,
                prio,
            );
            let now = Instant::now();
            let e = w.answered.entry(peer).or_insert((now, Duration::ZERO));
            let gap = now.duration_since(e.0);
            // Smoothed, and only over gaps while the window is in use (not idle time).
            e.1 = if e.1.is_zero() {
                gap
            } else {
                (e.1 * 7 + gap) / 8
            };
            e.0 = now;
        }
        let device_memory = a.req.gpu.as_ref().is_some_and(|g| g.region.is_some());
        if let (OpKind::Sum { average: true }, false) = (a.req.kind, device_memory) {
            // SAFETY: the server's answer for this chunk has fully arrived, no other write
            // targets this chunk of the output until the operation completes, and the API
            // caller may not touch the output before then.
            let out = unsafe { a.req.output.sub(c.offset, c.len).view_mut() };
            if let Err(e) = scale_div(t.dtype, out, nw) {
                tracing::error!("average failed: {e}");
            }
        }
        if std::mem::take(&mut a.credit[ci]) {
            w.queue.release(c.len as u64);
        }
        if let Some(g) = &a.req.gpu {
            let _ = g.notify.send(GpuMsg::ChunkDone { op: g.op, chunk });
        }
        a.left -= 1;
        a.deadline = Instant::now() + timeout;
        if a.left == 0 {
            let a = t.active.take().expect("active");
            let drop_regs =
                self.rdma_links && !self.cfg.rdma_cache_user_memory && a.req.gpu.is_none();
            release_op_memory(
                &mut self.net,
                &mut w.cache,
                a.req.input,
                a.req.output,
                drop_regs,
            );
            a.req.completer.complete(Ok(()));
            self.last_done = Some(Instant::now());
            self.start_ready(tensor);
        }
    }

    // ------------------------------------------------------------ failures

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        if let Some((at, _)) = &self.suspect {
            if *at <= now && !self.terminated {
                let (_, err) = self.suspect.take().expect("checked");
                self.fail_all(err);
            }
        }
        let Some(w) = self.worker.as_ref() else {
            return;
        };
        let mut expired = None;
        for (id, t) in &w.tensors {
            if matches!(t.place, PlaceState::Requested)
                && !t.waiting.is_empty()
                && t.place_deadline.is_some_and(|d| d <= now)
            {
                let name = t.name.clone();
                let e = Error::Timeout {
                    what: format!("placement of tensor {name:?}"),
                    peer: format!("scheduler {}", self.cfg.scheduler),
                    timeout: self.cfg.timeout,
                };
                self.fail_all(e);
                return;
            }
            if let Some(a) = &t.active {
                if a.deadline <= now {
                    let pending: Vec<usize> = a
                        .chunks
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| **s != ChunkSt::Done)
                        .map(|(i, _)| i)
                        .collect();
                    let first = pending[0];
                    let key = Key::new(bps_scheduler::TensorId(*id), t.chunks[first].index);
                    let server = t.keys.get(first).map(|k| k.server);
                    expired = Some((t.name.clone(), key, server, pending.len()));
                    break;
                }
            }
        }
        if let Some((name, key, server, n)) = expired {
            let peer = match server {
                Some(s) => label(&self.book, s),
                None => format!("scheduler {}", self.cfg.scheduler),
            };
            // A peer silent for the whole timeout is treated as dead: the job cannot finish
            // without it, so everything pending fails now, with its name.
            self.fail_all(Error::Timeout {
                what: format!("push_pull of {name:?} (key {key}, {n} chunks pending)"),
                peer,
                timeout: self.cfg.timeout,
            });
        }
    }

    /// A send to a key's server failed: fail the tensor's operations, naming the server and key.
    fn fail_send(&mut self, tensor: u32, key: Key, server: PeerId, e: &bps_transport::Error) {
        let name = self
            .worker
            .as_ref()
            .and_then(|w| w.tensors.get(&tensor))
            .map(|t| t.name.clone())
            .unwrap_or_default();
        let err = Error::Peer {
            what: format!("push_pull of {name:?} (key {key})"),
            peer: label(&self.book, server),
            reason: e.to_string(),
        };
        self.fail_tensor(tensor, err);
    }

    /// Fail the active and waiting operations of one tensor.
    fn fail_tensor(&mut self, tensor: u32, err: Error) {
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let Some(t) = w.tensors.get_mut(&tensor) else {
            return;
        };
        if let Some(a) = t.active.take() {
            // Revoke the output so a late answer cannot land in memory the caller may reuse.
            for r in [a.req.input, a.req.output] {
                if let Some(tok) = w.cache.remove(r.addr, r.len) {
                    let _ = self.net.deregister(tok);
                }
            }
            if let Some(tok) = a.req.gpu.as_ref().and_then(|g| g.region) {
                let _ = self.net.deregister(tok);
            }
            // Give back the credit of chunks that were counted in flight, and their room at
            // their servers (parked chunks of this operation are dropped when met).
            for (i, held) in a.credit.iter().enumerate() {
                if *held {
                    w.queue.release(t.chunks[i].len as u64);
                }
            }
            for (i, held) in a.at_server.iter().enumerate() {
                if *held {
                    let (server, len) = (t.keys[i].server, t.chunks[i].len as u64);
                    window_remove(
                        &mut w.at_server,
                        &mut w.at_server_prio,
                        server,
                        len,
                        a.req.priority,
                    );
                }
            }
            a.req.completer.complete(Err(err.clone()));
        }
        for r in t.waiting.drain(..) {
            r.completer.complete(Err(err.clone()));
        }
        // Queued chunks of this tensor are dropped when popped (no active op).
        for k in t.keys.iter_mut() {
            if k.init == KeyInit::Sent {
                k.init = KeyInit::None;
            }
        }
    }

    /// The job is broken: fail everything pending now and every later call.
    fn fail_all(&mut self, err: Error) {
        if self.broken.is_none() {
            tracing::error!("{err}");
            self.broken = Some(err.clone());
        }
        self.fail_everything(err);
    }

    fn fail_everything(&mut self, err: Error) {
        let ids: Vec<u32> = self
            .worker
            .as_ref()
            .map(|w| w.tensors.keys().copied().collect())
            .unwrap_or_default();
        for id in ids {
            self.fail_tensor(id, err.clone());
        }
        if let Some(w) = self.worker.as_mut() {
            w.queue.drain();
            w.retry.clear();
            w.parked.clear();
            w.at_server.clear();
            w.at_server_prio.clear();
            w.answered.clear();
            for (_, c) in w.barriers.drain() {
                c.complete(Err(err.clone()));
            }
        }
        // Stop reading user memory: drop every link (queued writes from user buffers go too).
        if self.broken.is_some() {
            for p in 0..self.book.len() as u32 {
                if PeerId(p) != self.me {
                    self.net.disconnect(PeerId(p));
                }
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.server.as_mut() {
            for k in &s.keys {
                let _ = self.net.deregister(k.recv_token);
                let _ = self.net.deregister(k.sum_token);
            }
        }
    }
}

/// A summation thread: sums (or copies) and reports back.
/// Sum (or copy) one round of a key.
fn run_sum(job: &SumJob) -> Result<u32, (u32, String)> {
    // SAFETY: every participant has pushed this round and no push of the next round can
    // arrive before the answer of this one is sent (module docs), so the receive buffers are
    // quiet; the sum buffer is written only here, and read by the transport only after this
    // job reports back.
    let (out, inputs) = unsafe {
        (
            job.out.view_mut(),
            job.inputs.iter().map(|r| r.view()).collect::<Vec<_>>(),
        )
    };
    sum_into(job.dtype, out, &inputs)
        .map(|_| job.slot)
        .map_err(|e| (job.slot, e.to_string()))
}

fn engine(rx: Receiver<SumJob>, done: Sender<Result<u32, (u32, String)>>, waker: Waker) {
    for job in rx {
        let r = run_sum(&job);
        if done.send(r).is_err() {
            return;
        }
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    /// The window's bookkeeping: room while the bytes fit (an empty window always has room),
    /// urgency only for a priority above everything counted, and both restored as chunks are
    /// answered.
    #[test]
    fn window_room_and_urgency_follow_what_is_counted() {
        use super::*;
        let mut w = Worker::new(1 << 20);
        let (s, other, stats) = (PeerId(3), PeerId(4), Stats::default());
        let win = 768 << 10;
        assert!(
            window_room(&w, s, 4 << 20, win),
            "empty: even a chunk over the window"
        );
        assert!(!window_urgent(&w, s, i32::MAX), "empty: room, not urgency");
        window_add(&mut w, &stats, s, 256 << 10, 0);
        window_add(&mut w, &stats, s, 256 << 10, -5);
        assert!(window_room(&w, s, 256 << 10, win), "512 + 256 KiB fit 768");
        window_add(&mut w, &stats, s, 256 << 10, 0);
        assert!(!window_room(&w, s, 1, win), "full");
        assert!(
            window_room(&w, other, 256 << 10, win),
            "windows are per server"
        );
        assert!(
            !window_urgent(&w, s, 0),
            "equal to the top is not more urgent"
        );
        assert!(window_urgent(&w, s, 1));
        assert_eq!(stats.max_at_server.load(Ordering::Relaxed), 768 << 10);
        // Both priority-0 chunks answered: the top is now -5.
        for _ in 0..2 {
            window_remove(&mut w.at_server, &mut w.at_server_prio, s, 256 << 10, 0);
        }
        assert!(window_urgent(&w, s, 0));
        assert!(!window_urgent(&w, s, -5));
        window_remove(&mut w.at_server, &mut w.at_server_prio, s, 256 << 10, -5);
        assert_eq!(w.at_server[&s], 0);
        assert!(window_room(&w, s, 4 << 20, win));
        assert!(!window_urgent(&w, s, i32::MAX), "nothing counted any more");
    }

    #[test]
    fn server_window_is_partitions_with_a_floor_or_off() {
        use super::{server_window, MIN_SERVER_WINDOW};
        assert_eq!(server_window(0, 4 << 20), 0, "0 turns it off");
        assert_eq!(server_window(3, 256 << 10), 768 << 10);
        assert_eq!(server_window(3, 4 << 20), 12 << 20);
        assert_eq!(server_window(3, 4096), MIN_SERVER_WINDOW);
        assert_eq!(server_window(1 << 16, usize::MAX), u64::MAX, "saturates");
    }

    use super::*;
    use bps_transport::NetConfig;

    /// Submitters wake the loop only when it said it sleeps: no command may be left waiting
    /// while the loop sleeps. One command at a time, each sent 0-4 µs after the loop took the
    /// last one (so sends land while it is about to sleep, or asleep); the loop blocks for up
    /// to 10 s per poll, so a lost wake-up shows as a command not taken within 5 s.
    #[test]
    fn loop_asleep_loses_no_wakeup() {
        use std::sync::atomic::AtomicU32;
        const N: u32 = 5_000;
        let mut cfg = NetConfig::new(PeerId(0), "127.0.0.1:0".parse().unwrap());
        cfg.unix_dir = None;
        let mut net = Net::bind(cfg).unwrap();
        let waker = net.waker();
        let asleep = LoopAsleep::default();
        let (tx, rx) = crossbeam_channel::unbounded::<Command>();
        let got = Arc::new(AtomicU32::new(0));
        let (flag, seen) = (asleep.clone(), got.clone());
        let looper = std::thread::spawn(move || {
            let mut slept = 0u32;
            let mut events = Vec::new();
            loop {
                while rx.try_recv().is_ok() {
                    seen.fetch_add(1, Ordering::Release);
                }
                if seen.load(Ordering::Relaxed) >= N {
                    return slept;
                }
                // Widen the window between finding the queue empty and saying it sleeps.
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(2) {
                    std::hint::spin_loop();
                }
                if !flag.going_to_sleep(&rx) {
                    slept += 1;
                    net.poll(&mut events, Some(Duration::from_secs(10)))
                        .unwrap();
                }
                flag.awake();
            }
        });
        for i in 0..N {
            let gap = Duration::from_nanos(u64::from(i.wrapping_mul(2_654_435_761) % 4_000));
            let t = Instant::now();
            while t.elapsed() < gap {
                std::hint::spin_loop();
            }
            let (done, _) = crossbeam_channel::bounded(1);
            tx.send(Command::Shutdown(done)).unwrap();
            asleep.notify(&waker);
            let t = Instant::now();
            while got.load(Ordering::Acquire) <= i {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "command {i} not taken in 5 s: the loop slept through it"
                );
                std::thread::yield_now();
            }
        }
        let slept = looper.join().unwrap();
        assert!(
            slept > 0,
            "the loop never went to sleep: the test did not test the wake-up"
        );
    }
}
