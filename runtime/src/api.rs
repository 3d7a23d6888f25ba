//! The public Rust API: [`Bps`], started by [`init`] (from the environment) or
//! [`Bps::init_with`] (from an explicit [`Config`]).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bps_transport::cq::{CompletionQueue, Status};
use bps_transport::{LinkKind, Net, NetConfig, PeerAddr, PeerId, Transport, Waker};
use crossbeam_channel::Sender;

use crate::config::{Config, Role};
use crate::dtype::DType;
use crate::mem::RawSlice;
use crate::node::{Command, LoopAsleep, Node, OpKind, OpRequest, Stats};
use crate::proto::{BookEntry, Msg, Register};
use crate::sched::{self, read_msg, write_msg, Scheduler};
use crate::{Error, Result};

/// The handle of an asynchronous operation: poll it, wait on it, or drain it from the
/// completion queue.
pub type Handle = bps_transport::cq::Handle<Error>;

/// Options of a push_pull.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushPullOpts {
    /// Divide the sum by the number of workers.
    pub average: bool,
    /// Higher leaves first (BytePS: layers nearest the input get the highest priority).
    pub priority: i32,
}

/// Element types the safe API accepts.
pub trait Element: bytemuck::Pod + Send + 'static {
    /// Its dtype.
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

#[derive(Default)]
struct Names {
    by_name: HashMap<String, u32>,
    list: Vec<String>,
}

struct Inner {
    cfg: Config,
    role: Role,
    rank: u32,
    num_workers: u32,
    num_servers: u32,
    cmds: Sender<Command>,
    waker: Waker,
    /// Whether the event loop sleeps (operations wake it only then).
    asleep: LoopAsleep,
    cq: CompletionQueue<Error>,
    names: Mutex<Names>,
    next_op: AtomicU64,
    down: AtomicBool,
    node: Mutex<Option<JoinHandle<Option<Error>>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    sched_stream: TcpStream,
    scheduler: Mutex<Option<Scheduler>>,
    stats: Arc<Stats>,
    book: Vec<BookEntry>,
    /// Writer of the scheduler connection (shared with the event loop).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    sched_w: Arc<Mutex<TcpStream>>,
    /// The GPU engine's inbox, kept until the engine starts.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    gpu_inbox: (
        Sender<crate::node::GpuMsg>,
        Mutex<Option<crossbeam_channel::Receiver<crate::node::GpuMsg>>>,
    ),
    /// The GPU engine, started by the first GPU operation (or why it cannot start).
    #[cfg(feature = "cuda")]
    gpu: std::sync::OnceLock<Result<crate::gpu::GpuEngine>>,
}

/// A running bps instance (worker side). Cheap to clone; every clone is the same instance.
#[derive(Clone)]
pub struct Bps {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bps")
            .field("rank", &self.inner.rank)
            .field("size", &self.inner.num_workers)
            .finish()
    }
}

/// Start bps from the environment (BytePS, torchrun or bps variables).
///
/// # Errors
/// A bad variable ([`Error::Config`]), a failed rendezvous, a port in use.
pub fn init() -> Result<Bps> {
    Bps::init_with(Config::from_env()?)
}

/// Run a server process until the job ends (`DMLC_ROLE=server`).
///
/// # Errors
/// As [`init`], or the job failed (a peer died).
pub fn run_server(mut cfg: Config) -> Result<()> {
    cfg.role = Role::Server;
    let inner = start(cfg)?;
    let h = inner.node.lock().unwrap_or_else(|p| p.into_inner()).take();
    let broken = h.and_then(|h| h.join().unwrap_or(Some(Error::Abandoned)));
    let _ = inner.sched_stream.shutdown(std::net::Shutdown::Both);
    match broken {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn read_until_not_heartbeat(s: &mut TcpStream) -> std::io::Result<Msg> {
    loop {
        match read_msg(s)? {
            Msg::Heartbeat => continue,
            m => return Ok(m),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn start(cfg: Config) -> Result<Inner> {
    let deadline = Instant::now() + cfg.timeout;
    let scheduler = if cfg.embed_scheduler && cfg.role == Role::Worker {
        Some(Scheduler::start(&cfg)?)
    } else {
        None
    };
    let mut stream = sched::connect(cfg.scheduler, deadline)?;
    let _ = stream.set_read_timeout(Some(cfg.timeout));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    sched::authenticate_to_scheduler(&mut stream, cfg.secret.as_ref()).map_err(|reason| {
        Error::Rendezvous {
            addr: cfg.scheduler.to_string(),
            reason,
        }
    })?;
    let sched_addr = cfg.scheduler.to_string();
    let rv = |reason: String| Error::Rendezvous {
        addr: sched_addr.clone(),
        reason,
    };
    // Advertise the address that reaches the scheduler unless told otherwise.
    let ip = match cfg.host {
        Some(ip) => ip,
        None => stream
            .local_addr()
            .map_err(|e| rv(format!("local address: {e}")))?
            .ip(),
    };
    let mut ncfg = NetConfig::new(PeerId(u32::MAX), SocketAddr::new(ip, cfg.port));
    ncfg.force = cfg.transport;
    ncfg.lanes = cfg.tcp_lanes;
    ncfg.ring_bytes = cfg.ring_bytes;
    ncfg.max_msg = cfg.max_msg;
    ncfg.connect_timeout = cfg.timeout;
    ncfg.secret = cfg.secret.clone();
    ncfg.rdma = cfg.rdma.clone();
    if cfg.transport == Some(LinkKind::Rdma) && !bps_transport::rdma::COMPILED {
        return Err(Error::Config {
            var: "BPS_TRANSPORT".into(),
            value: "rdma".into(),
            allowed:
                "auto | tcp | shm (this build has no RDMA backend: build with the `rdma` feature)"
                    .into(),
        });
    }
    if cfg.transport == Some(LinkKind::Tcp) {
        ncfg.unix_dir = None;
    }
    // The id is only known after the rendezvous; Net is bound first (its address goes in the
    // registration) and told its id below.
    let mut net = Net::bind(ncfg.clone())?;
    let addr = net.local_addr();
    let reg = Register {
        role: cfg.role,
        rank: if cfg.role == Role::Worker {
            cfg.rank
        } else {
            None
        },
        local_rank: cfg.local_rank,
        local_size: cfg.local_size,
        num_workers: cfg.num_workers,
        num_servers: cfg.num_servers,
        partition_bytes: cfg.partition_bytes as u64,
        min_chunks: cfg.min_chunks_per_server,
        lanes: cfg.tcp_lanes,
        tcp: addr.tcp.to_string(),
        unix: addr
            .unix
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        host: addr.host.clone(),
        hostname: hostname(),
        pid: std::process::id(),
    };
    write_msg(&mut stream, &Msg::Register(reg)).map_err(|e| rv(format!("register: {e}")))?;
    let wait = cfg.timeout + Duration::from_secs(5);
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| rv(e.to_string()))?;
    let welcome = match read_until_not_heartbeat(&mut stream) {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(rv(format!(
                "no address book within {wait:?}: not every worker/server registered (BPS_TIMEOUT)"
            )))
        }
        Err(e) => return Err(rv(format!("waiting for the address book: {e}"))),
    };
    // From now on the scheduler sends heartbeats: a silent scheduler for the whole timeout is
    // a lost one (the reader thread's reads time out).
    stream
        .set_read_timeout(Some(cfg.timeout))
        .map_err(|e| rv(e.to_string()))?;
    let Msg::Welcome {
        rank,
        peer: me,
        num_workers,
        num_servers,
        local_size,
        partition_bytes,
        min_chunks,
        book,
    } = welcome
    else {
        return Err(match welcome {
            Msg::Refused { reason } => rv(format!("refused: {reason}")),
            other => rv(format!("unexpected answer {other:?}")),
        });
    };
    // Servers adopt the job's partition size (it bounds what a push may claim).
    let mut cfg = cfg;
    if partition_bytes > 0 {
        cfg.partition_bytes = partition_bytes as usize;
    }
    // Everyone cuts tensors by the job's rule, with the job's shape.
    cfg.min_chunks_per_server = min_chunks;
    cfg.num_workers = num_workers;
    cfg.num_servers = num_servers;
    // Re-bind with our id: Net's id is part of every Hello, so the listener made above is kept
    // by rebuilding the config and swapping the id in place.
    net.set_local_peer(PeerId(me));
    let is_worker = cfg.role == Role::Worker;
    let wanted = |b: &BookEntry| -> bool {
        if is_worker {
            if num_servers == 0 {
                b.role == Role::Worker
            } else {
                b.role == Role::Server
            }
        } else {
            b.role == Role::Worker
        }
    };
    // Colocated servers also hear from every worker; with local reduction, the workers of a
    // host group talk to each other.
    let l = local_size.max(1);
    let same_group =
        |b: &BookEntry| is_worker && l > 1 && b.role == Role::Worker && b.rank / l == rank / l;
    for b in &book {
        if wanted(b) || (is_worker && num_servers == 0) || same_group(b) {
            let tcp: SocketAddr = b
                .tcp
                .parse()
                .map_err(|_| rv(format!("bad address {:?} in the address book", b.tcp)))?;
            let unix = (!b.unix.is_empty()).then(|| b.unix.clone().into());
            net.add_peer(
                PeerId(b.peer),
                PeerAddr {
                    tcp,
                    unix,
                    host: b.host.clone(),
                },
            )?;
        }
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let (gpu_tx, gpu_rx) = crossbeam_channel::unbounded();
    let waker = net.waker();
    let asleep = LoopAsleep::default();
    let stats = Arc::new(Stats::default());
    let sched_w = Arc::new(Mutex::new(
        stream.try_clone().map_err(|e| rv(e.to_string()))?,
    ));
    let mut reader_stream = stream.try_clone().map_err(|e| rv(e.to_string()))?;
    let reader_tx = tx.clone();
    let reader_gpu = gpu_tx.clone();
    let reader_waker = waker.clone();
    let reader_timeout = cfg.timeout;
    let reader = std::thread::Builder::new()
        .name("bps-sched-reader".into())
        .spawn(move || loop {
            match read_msg(&mut reader_stream) {
                Ok(Msg::Heartbeat) => {}
                Ok(m @ (Msg::GpuGo { .. } | Msg::GpuId { .. })) => {
                    // Straight to the GPU engine: its go-aheads are on the critical path.
                    let _ = reader_gpu.send(crate::node::GpuMsg::Sched(m));
                }
                Ok(m) => {
                    let end = matches!(m, Msg::Terminate);
                    if reader_tx.send(Command::Sched(m)).is_err() {
                        return;
                    }
                    reader_waker.wake();
                    if end {
                        return;
                    }
                }
                Err(e) => {
                    let why = if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) {
                        format!("silent for {reader_timeout:?} (no heartbeat)")
                    } else {
                        e.to_string()
                    };
                    let _ = reader_tx.send(Command::SchedLost(why));
                    reader_waker.wake();
                    return;
                }
            }
        })
        .map_err(|e| rv(format!("spawn: {e}")))?;
    let node = Node::new(
        cfg.clone(),
        net,
        PeerId(me),
        rank,
        num_workers,
        num_servers,
        book.clone(),
        rx,
        sched_w.clone(),
        waker.clone(),
        stats.clone(),
        local_size,
        gpu_tx.clone(),
        asleep.clone(),
    );
    let node = std::thread::Builder::new()
        .name(format!("bps-{}-{rank}", cfg.role))
        .spawn(move || node.run())
        .map_err(|e| rv(format!("spawn: {e}")))?;
    tracing::info!(
        "bps {} {rank} of {num_workers} workers / {num_servers} servers up at {}",
        cfg.role,
        addr.tcp
    );
    Ok(Inner {
        role: cfg.role,
        cfg,
        rank,
        num_workers,
        num_servers,
        cmds: tx,
        waker,
        asleep,
        cq: CompletionQueue::new(false),
        names: Mutex::new(Names::default()),
        next_op: AtomicU64::new(1),
        down: AtomicBool::new(false),
        node: Mutex::new(Some(node)),
        reader: Mutex::new(Some(reader)),
        sched_stream: stream,
        scheduler: Mutex::new(scheduler),
        stats,
        book,
        sched_w,
        gpu_inbox: (gpu_tx, Mutex::new(Some(gpu_rx))),
        #[cfg(feature = "cuda")]
        gpu: std::sync::OnceLock::new(),
    })
}

/// A push_pull or broadcast of an owned vector; the vector comes back from [`Pending::wait`].
/// Dropping it waits for the operation (the runtime may still be writing into the vector).
pub struct Pending<T: Element> {
    handle: Handle,
    data: Option<Vec<T>>,
}

impl<T: Element> Pending<T> {
    /// The underlying handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    /// Wait and get the result back.
    ///
    /// # Errors
    /// The operation's error; the vector is dropped then.
    pub fn wait(mut self) -> Result<Vec<T>> {
        self.handle.wait().map_err(|e| e.clone())?;
        Ok(self.data.take().expect("data present until taken"))
    }
}

impl<T: Element> Drop for Pending<T> {
    fn drop(&mut self) {
        if self.data.is_some() {
            let _ = self.handle.wait();
        }
    }
}

/// A push_pull from one vector into another; both come back from [`PendingInto::wait`].
/// Dropping it waits for the operation.
pub struct PendingInto<T: Element> {
    handle: Handle,
    bufs: Option<(Vec<T>, Vec<T>)>,
}

impl<T: Element> PendingInto<T> {
    /// The underlying handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    /// Wait; returns (input, output).
    ///
    /// # Errors
    /// The operation's error.
    pub fn wait(mut self) -> Result<(Vec<T>, Vec<T>)> {
        self.handle.wait().map_err(|e| e.clone())?;
        Ok(self.bufs.take().expect("buffers present until taken"))
    }
}

impl<T: Element> Drop for PendingInto<T> {
    fn drop(&mut self) {
        if self.bufs.is_some() {
            let _ = self.handle.wait();
        }
    }
}

impl Bps {
    /// Start bps with an explicit configuration.
    ///
    /// # Errors
    /// As [`init`].
    pub fn init_with(mut cfg: Config) -> Result<Bps> {
        if cfg.role == Role::Scheduler {
            return Err(Error::InvalidArgument(
                "DMLC_ROLE=scheduler runs bps::run_scheduler (or bps-launch), not init()".into(),
            ));
        }
        if cfg.role == Role::Server {
            return Err(Error::InvalidArgument(
                "DMLC_ROLE=server runs bps::run_server (or bps-launch), not init()".into(),
            ));
        }
        cfg.role = Role::Worker;
        Ok(Bps {
            inner: Arc::new(start(cfg)?),
        })
    }

    /// This worker's rank.
    pub fn rank(&self) -> u32 {
        self.inner.rank
    }
    /// Number of workers.
    pub fn size(&self) -> u32 {
        self.inner.num_workers
    }
    /// Rank among the workers of this host.
    pub fn local_rank(&self) -> u32 {
        self.inner.cfg.local_rank
    }
    /// Workers on this host.
    pub fn local_size(&self) -> u32 {
        self.inner.cfg.local_size
    }
    /// Whether chunks are first summed inside each host group of `local_size` workers (then
    /// a sum is `(w0 + … + w(L-1)) + (wL + …) + …`, group by group, in rank order).
    pub fn local_reduce(&self) -> bool {
        self.inner.stats.local_reduce.load(Ordering::Relaxed)
    }

    /// Number of server processes (0 = colocated).
    pub fn num_servers(&self) -> u32 {
        self.inner.num_servers
    }
    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }
    /// Counters (bytes pushed, registrations, rounds summed).
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }
    /// Links by kind to the peers this worker talks to, once connected.
    pub fn links(&self) -> Vec<(String, Option<LinkKind>)> {
        let links = self
            .inner
            .stats
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.inner
            .book
            .iter()
            .map(|b| {
                (
                    format!("{} {}", b.role, b.rank),
                    links.get(&b.peer).copied(),
                )
            })
            .collect()
    }

    /// Declare a tensor by name; returns its id (declaration order). Declaring again returns
    /// the same id. Every worker must declare the same tensors in the same order.
    ///
    /// # Errors
    /// An empty or over-long name.
    pub fn declare(&self, name: &str) -> Result<u32> {
        if name.is_empty() || name.len() > crate::proto::MAX_STR {
            return Err(Error::InvalidArgument(format!(
                "tensor name must be 1..={} bytes, got {} bytes",
                crate::proto::MAX_STR,
                name.len()
            )));
        }
        let mut n = self.inner.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = n.by_name.get(name) {
            return Ok(*id);
        }
        let id = n.list.len() as u32;
        n.list.push(name.to_string());
        n.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        name: &str,
        dtype: DType,
        bytes: usize,
        input: RawSlice,
        output: RawSlice,
        kind: OpKind,
        priority: i32,
    ) -> Result<Handle> {
        if self.inner.down.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        if !bytes.is_multiple_of(dtype.size()) {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?}: {bytes} bytes is not a whole number of {dtype} elements"
            )));
        }
        if bytes > 0 && (input.addr == 0 || output.addr == 0) {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?}: null data pointer"
            )));
        }
        let tensor = self.declare(name)?;
        let id = self.inner.next_op.fetch_add(1, Ordering::Relaxed);
        let (handle, completer) = self.inner.cq.register(id);
        let req = OpRequest {
            tensor,
            name: name.to_string(),
            dtype,
            bytes,
            input,
            output,
            kind,
            priority,
            completer,
            gpu: None,
        };
        if let Err(e) = self.inner.cmds.send(Command::Op(req)) {
            // The event loop is gone: the completer inside fails the handle when dropped.
            drop(e);
            return Err(Error::ShutDown);
        }
        self.inner.asleep.notify(&self.inner.waker);
        Ok(handle)
    }

    /// Sum `bytes` bytes of `dtype` at `input` across all workers into `output` (which may be
    /// `input`: in place). Returns at once; the handle completes when the result is in place.
    ///
    /// # Safety
    /// `input` and `output` must be valid for `bytes` bytes until the handle completes; the
    /// caller must not write `input` nor read or write `output` before then (they may be
    /// equal).
    ///
    /// # Errors
    /// Bad arguments, or the runtime was shut down. Failures of the operation itself (a dead
    /// peer, a mismatched tensor, a timeout) are reported through the handle.
    pub unsafe fn push_pull_raw(
        &self,
        name: &str,
        dtype: DType,
        input: *const u8,
        output: *mut u8,
        bytes: usize,
        opts: PushPullOpts,
    ) -> Result<Handle> {
        let input = RawSlice {
            addr: input as usize,
            len: bytes,
        };
        let output = RawSlice {
            addr: output as usize,
            len: bytes,
        };
        self.submit(
            name,
            dtype,
            bytes,
            input,
            output,
            OpKind::Sum {
                average: opts.average,
            },
            opts.priority,
        )
    }

    /// Give every worker the `root` worker's `bytes` at `buf` (in place).
    ///
    /// # Safety
    /// As [`Bps::push_pull_raw`] with input = output = `buf`.
    ///
    /// # Errors
    /// Bad arguments (root out of range), or the runtime was shut down.
    pub unsafe fn broadcast_raw(
        &self,
        name: &str,
        dtype: DType,
        buf: *mut u8,
        bytes: usize,
        root: u32,
        priority: i32,
    ) -> Result<Handle> {
        self.check_root(name, root)?;
        let r = RawSlice {
            addr: buf as usize,
            len: bytes,
        };
        self.submit(
            name,
            dtype,
            bytes,
            r,
            r,
            OpKind::Broadcast { root },
            priority,
        )
    }

    /// Sum a vector across workers (in place); the vector comes back from [`Pending::wait`].
    ///
    /// # Errors
    /// As [`Bps::push_pull_raw`].
    pub fn push_pull<T: Element>(
        &self,
        name: &str,
        mut data: Vec<T>,
        opts: PushPullOpts,
    ) -> Result<Pending<T>> {
        let bytes = std::mem::size_of_val(data.as_slice());
        let p = data.as_mut_ptr() as *mut u8;
        // SAFETY: the vector's heap buffer is owned by the returned Pending, which does not
        // touch it and whose Drop waits for the operation before the buffer can be freed.
        let handle = unsafe { self.push_pull_raw(name, T::DTYPE, p, p, bytes, opts)? };
        Ok(Pending {
            handle,
            data: Some(data),
        })
    }

    /// Sum `input` across workers into `output` (same length); `input` is left as it was.
    ///
    /// # Errors
    /// As [`Bps::push_pull_raw`]; lengths that differ.
    pub fn push_pull_into<T: Element>(
        &self,
        name: &str,
        input: Vec<T>,
        mut output: Vec<T>,
        opts: PushPullOpts,
    ) -> Result<PendingInto<T>> {
        if input.len() != output.len() {
            return Err(Error::InvalidArgument(format!(
                "push_pull_into of {name:?}: input has {} elements, output {}",
                input.len(),
                output.len()
            )));
        }
        let bytes = std::mem::size_of_val(input.as_slice());
        let i = input.as_ptr() as *const u8;
        let o = output.as_mut_ptr() as *mut u8;
        // SAFETY: both heap buffers are owned by the returned PendingInto, which does not touch
        // them and whose Drop waits for the operation before they can be freed.
        let handle = unsafe { self.push_pull_raw(name, T::DTYPE, i, o, bytes, opts)? };
        Ok(PendingInto {
            handle,
            bufs: Some((input, output)),
        })
    }

    /// Sum a byte buffer holding elements of `dtype` (in place); for callers that keep tensors
    /// as bytes. The buffer comes back from [`Pending::wait`].
    ///
    /// # Errors
    /// As [`Bps::push_pull_raw`].
    pub fn push_pull_bytes(
        &self,
        name: &str,
        dtype: DType,
        mut data: Vec<u8>,
        opts: PushPullOpts,
    ) -> Result<Pending<u8>> {
        let p = data.as_mut_ptr();
        // SAFETY: as in push_pull.
        let handle = unsafe { self.push_pull_raw(name, dtype, p, p, data.len(), opts)? };
        Ok(Pending {
            handle,
            data: Some(data),
        })
    }

    /// Broadcast a byte buffer holding elements of `dtype` from `root` (in place).
    ///
    /// # Errors
    /// As [`Bps::broadcast_raw`].
    pub fn broadcast_bytes(
        &self,
        name: &str,
        dtype: DType,
        mut data: Vec<u8>,
        root: u32,
        priority: i32,
    ) -> Result<Pending<u8>> {
        let p = data.as_mut_ptr();
        // SAFETY: as in push_pull.
        let handle = unsafe { self.broadcast_raw(name, dtype, p, data.len(), root, priority)? };
        Ok(Pending {
            handle,
            data: Some(data),
        })
    }

    /// Broadcast a vector from `root` (in place).
    ///
    /// # Errors
    /// As [`Bps::broadcast_raw`].
    pub fn broadcast<T: Element>(
        &self,
        name: &str,
        mut data: Vec<T>,
        root: u32,
    ) -> Result<Pending<T>> {
        let bytes = std::mem::size_of_val(data.as_slice());
        let p = data.as_mut_ptr() as *mut u8;
        // SAFETY: as in push_pull.
        let handle = unsafe { self.broadcast_raw(name, T::DTYPE, p, bytes, root, 0)? };
        Ok(Pending {
            handle,
            data: Some(data),
        })
    }

    /// Sum a GPU tensor across all workers, in place (`average` divides by the number of
    /// workers). Returns at once; when the handle completes the result is in `buf` and every
    /// copy or NCCL call bps made on it has finished, so any stream may use it.
    ///
    /// # Safety
    /// `buf.ptr` must be device memory of `buf.bytes` bytes on `buf.device`, valid and not
    /// written by anyone else until the handle completes; `buf.stream` must be a live stream of
    /// that device (or 0).
    ///
    /// # Errors
    /// [`Error::Unsupported`] in a build without CUDA or on a machine without a usable GPU
    /// (the message says why); bad arguments (another device than the first GPU call used,
    /// a size that is not whole elements). Failures of the operation come through the handle.
    pub unsafe fn push_pull_device(
        &self,
        name: &str,
        buf: crate::gpu::DeviceBuf,
        opts: PushPullOpts,
    ) -> Result<Handle> {
        self.device_op(
            name,
            buf,
            OpKind::Sum {
                average: opts.average,
            },
            opts.priority,
        )
    }

    /// Give every worker the `root` worker's GPU tensor (in place).
    ///
    /// # Safety
    /// As [`Bps::push_pull_device`].
    ///
    /// # Errors
    /// As [`Bps::push_pull_device`]; a root that is not a worker rank.
    pub unsafe fn broadcast_device(
        &self,
        name: &str,
        buf: crate::gpu::DeviceBuf,
        root: u32,
        priority: i32,
    ) -> Result<Handle> {
        self.check_root(name, root)?;
        self.device_op(name, buf, OpKind::Broadcast { root }, priority)
    }

    fn device_op(
        &self,
        name: &str,
        buf: crate::gpu::DeviceBuf,
        kind: OpKind,
        priority: i32,
    ) -> Result<Handle> {
        if self.inner.down.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        if !buf.bytes.is_multiple_of(buf.dtype.size()) {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?}: {} bytes is not a whole number of {} elements",
                buf.bytes, buf.dtype
            )));
        }
        if buf.bytes > 0 && buf.ptr == 0 {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?}: null device pointer"
            )));
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (kind, priority);
            Err(crate::gpu::unsupported(&buf))
        }
        #[cfg(feature = "cuda")]
        {
            let engine = self
                .inner
                .gpu
                .get_or_init(|| self.start_gpu(buf.device))
                .as_ref()
                .map_err(|e| e.clone())?;
            if engine.device() != buf.device {
                return Err(Error::InvalidArgument(format!(
                    "tensor {name:?} is on GPU {} but this worker uses GPU {} (one GPU per worker)",
                    buf.device,
                    engine.device()
                )));
            }
            let tensor = self.declare(name)?;
            let l = self.local_size().max(1);
            let multi_host = self.size() > l;
            let host_tensor = match kind {
                OpKind::Broadcast { .. } if multi_host => {
                    self.declare(&format!("{name}#gpu-broadcast"))?
                }
                _ => tensor,
            };
            let id = self.inner.next_op.fetch_add(1, Ordering::Relaxed);
            let (handle, completer) = self.inner.cq.register(id);
            engine.submit(crate::gpu::GpuOp {
                tensor,
                host_tensor,
                name: name.to_string(),
                buf,
                kind,
                priority,
                completer,
            })?;
            Ok(handle)
        }
    }

    #[cfg(feature = "cuda")]
    fn start_gpu(&self, device: i32) -> Result<crate::gpu::GpuEngine> {
        let inbox = self
            .inner
            .gpu_inbox
            .1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::Unsupported("the GPU engine failed to start before".into()))?;
        let shape = crate::gpu::Shape {
            rank: self.rank(),
            num_workers: self.size(),
            local_size: self.local_size().max(1),
            local_reduce: self.local_reduce() || self.local_size() <= 1,
            partition_bytes: self.inner.cfg.partition_bytes,
            num_servers: match self.num_servers() {
                0 => self.size(),
                s => s,
            },
            min_chunks_per_server: self.inner.cfg.min_chunks_per_server,
            credit_bytes: self.inner.cfg.credit_bytes,
            timeout: self.inner.cfg.timeout,
            cache_user_memory: self.inner.cfg.rdma_cache_user_memory,
            server_link: match self.inner.cfg.transport {
                Some(k) => k,
                None if bps_transport::rdma::COMPILED
                    && bps_transport::rdma::probe(&self.inner.cfg.rdma).is_ok() =>
                {
                    LinkKind::Rdma
                }
                None => LinkKind::Tcp,
            },
        };
        let links = crate::gpu::Links {
            cmds: self.inner.cmds.clone(),
            waker: self.inner.waker.clone(),
            sched: self.inner.sched_w.clone(),
            inbox,
            inbox_tx: self.inner.gpu_inbox.0.clone(),
        };
        crate::gpu::GpuEngine::start(device, shape, links)
    }

    /// The GPUs this process can use, or why it cannot use any.
    pub fn gpus(&self) -> std::result::Result<Vec<crate::gpu::GpuInfo>, String> {
        crate::gpu::probe()
    }

    fn check_root(&self, name: &str, root: u32) -> Result<()> {
        if root >= self.size() {
            return Err(Error::InvalidArgument(format!(
                "broadcast of {name:?}: root rank {root} is not below the {} workers",
                self.size()
            )));
        }
        Ok(())
    }

    /// Whether an operation finished (no lock).
    pub fn poll(&self, h: &Handle) -> bool {
        h.status() != Status::Pending
    }

    /// Wait for an operation.
    ///
    /// # Errors
    /// The operation's error.
    pub fn wait(&self, h: &Handle) -> Result<()> {
        h.wait().map_err(|e| e.clone())
    }

    /// Wait at most `timeout`; `None` if still pending.
    pub fn wait_timeout(&self, h: &Handle, timeout: Duration) -> Option<Result<()>> {
        h.wait_timeout(timeout).map(|r| r.map_err(|e| e.clone()))
    }

    /// Block until every worker reached the barrier.
    ///
    /// # Errors
    /// A dead peer or a lost scheduler.
    pub fn barrier(&self) -> Result<()> {
        if self.inner.down.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let id = self.inner.next_op.fetch_add(1, Ordering::Relaxed);
        let (h, c) = self.inner.cq.register(id);
        self.inner
            .cmds
            .send(Command::Barrier(id, c))
            .map_err(|_| Error::ShutDown)?;
        self.inner.waker.wake();
        h.wait().map_err(|e| e.clone())
    }

    /// Leave the job: waits until every worker left (so colocated servers finish serving),
    /// fails whatever is still pending, and stops the threads. Later calls fail with
    /// [`Error::ShutDown`]. Idempotent.
    ///
    /// # Errors
    /// None today; reserved.
    pub fn shutdown(&self) -> Result<()> {
        if self.inner.down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.inner.cmds.send(Command::Shutdown(tx)).is_ok() {
            self.inner.waker.wake();
            let _ = rx.recv_timeout(self.inner.cfg.timeout + Duration::from_secs(5));
        }
        if let Some(h) = self
            .inner
            .node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
        #[cfg(feature = "cuda")]
        if let Some(Ok(g)) = self.inner.gpu.get() {
            g.stop();
        }
        let _ = self.inner.sched_stream.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self
            .inner
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
        if let Some(s) = self
            .inner
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            s.wait(Some(Duration::from_secs(2)));
        }
        let _ = self.inner.role;
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(Ok(g)) = self.gpu.get() {
            g.stop();
        }
        if !self.down.swap(true, Ordering::AcqRel) {
            let (tx, _rx) = crossbeam_channel::bounded(1);
            let _ = self.cmds.send(Command::Shutdown(tx));
            self.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host part of a GPUDirect RDMA operation: the buffer comes registered (a region
    /// token), so the runtime pushes the released chunks from it and the servers' answers land
    /// in it; it registers nothing itself, leaves an average to the GPU (no division), announces
    /// every chunk, and a failed operation revokes the region. Host memory stands in for device
    /// memory (the transport treats both as a token), over tcp.
    #[test]
    fn a_registered_gpu_region_is_pushed_from_and_answered_into_as_is() {
        use crate::config::Lookup;
        use crate::dtype::DType;
        use crate::mem::RawSlice;
        use crate::node::{Command, GpuHost, GpuMsg, OpKind, OpRequest};
        use std::collections::HashMap;
        use std::sync::atomic::Ordering::Relaxed;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let cfg = move |role: &str, rank: Option<u32>| {
            let mut m: HashMap<String, String> = [
                ("DMLC_ROLE", role.to_string()),
                ("DMLC_NUM_WORKER", "2".into()),
                ("BPS_NUM_WORKER", "2".into()),
                ("DMLC_NUM_SERVER", "1".into()),
                ("DMLC_PS_ROOT_URI", "127.0.0.1".into()),
                ("DMLC_PS_ROOT_PORT", port.to_string()),
                ("BPS_TIMEOUT", "20s".into()),
                ("BPS_TRANSPORT", "tcp".into()),
                ("BYTEPS_PARTITION_BYTES", "65536".into()),
                ("BPS_MIN_CHUNKS_PER_SERVER", "0".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            if let Some(r) = rank {
                m.insert("BPS_RANK".into(), r.to_string());
                m.insert(
                    "BPS_EMBED_SCHEDULER".into(),
                    if r == 0 { "1" } else { "0" }.into(),
                );
            } else {
                m.insert("BPS_EMBED_SCHEDULER".into(), "0".into());
            }
            let c = crate::config::Config::from_lookup(&Lookup::map(&m)).expect("config");
            c
        };
        let server = {
            let c = cfg("server", None);
            std::thread::spawn(move || run_server(c).expect("server"))
        };
        let worker = |rank: u32| {
            let c = cfg("worker", Some(rank));
            std::thread::spawn(move || {
                let b = Bps::init_with(c).expect("worker");
                let n = 1 << 16; // 256 KiB of f32: 4 chunks of 64 KiB
                let mut buf: Vec<f32> = (0..n)
                    .map(|i| (i % 100) as f32 * (rank + 1) as f32)
                    .collect();
                let raw = RawSlice {
                    addr: buf.as_mut_ptr() as usize,
                    len: n * 4,
                };
                let (tx, rx) = crossbeam_channel::bounded(1);
                b.inner
                    .cmds
                    .send(Command::RegisterHost { raw, reply: tx })
                    .expect("send");
                b.inner.waker.wake();
                let token = rx.recv().expect("reply").expect("register");
                let regs = b.stats().registrations.load(Relaxed);
                let run = |op: u64, chunks: u32, average: bool| {
                    let tensor = b.declare("dev").expect("declare");
                    let (handle, completer) = b.inner.cq.register(1000 + op);
                    let (ntx, nrx) = crossbeam_channel::unbounded();
                    let req = OpRequest {
                        tensor,
                        name: "dev".into(),
                        dtype: DType::F32,
                        bytes: raw.len,
                        input: raw,
                        output: raw,
                        kind: OpKind::Sum { average },
                        priority: 0,
                        completer,
                        gpu: Some(GpuHost {
                            op,
                            owned: vec![true; 4],
                            notify: ntx,
                            region: Some(token),
                        }),
                    };
                    b.inner.cmds.send(Command::Op(req)).expect("op");
                    for chunk in 0..chunks {
                        b.inner
                            .cmds
                            .send(Command::Release { tensor, op, chunk })
                            .expect("release");
                    }
                    b.inner.waker.wake();
                    (handle, nrx)
                };
                // Average asked: the runtime must not divide a region (the GPU did).
                let (h, notes) = run(1, 4, true);
                b.wait(&h).expect("push_pull from the region");
                let mut done: Vec<u32> = notes
                    .try_iter()
                    .map(|m| match m {
                        GpuMsg::ChunkDone { op: 1, chunk } => chunk,
                        _ => u32::MAX,
                    })
                    .collect();
                done.sort_unstable();
                assert_eq!(done, vec![0, 1, 2, 3], "every chunk announced");
                for (i, x) in buf.iter().enumerate() {
                    assert_eq!(*x, (i % 100) as f32 * 3.0, "i {i}: the sum, not divided");
                }
                assert_eq!(
                    b.stats().registrations.load(Relaxed),
                    regs,
                    "nothing registered"
                );
                b.barrier().expect("barrier");
                b.shutdown().expect("shutdown");
            })
        };
        let (w0, w1) = (worker(0), worker(1));
        w0.join().expect("worker 0");
        w1.join().expect("worker 1");
        server.join().expect("server");
    }
}
