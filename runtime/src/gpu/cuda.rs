//! The CUDA path (feature `cuda`): one engine thread per process owns the CUDA streams, the
//! NCCL communicator of the host's GPUs and the pinned staging buffers, and drives every GPU
//! operation through its stages (see the module documentation of [`super`]).

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::time::{Duration, Instant};

use bps_scheduler::{partition, Chunk, CreditQueue, Priority};
use bps_transport::cq::{Completer, CompletionQueue, Handle, Status};
use bps_transport::Waker;
use crossbeam_channel::{Receiver, Select, Sender};
use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;

use super::{DeviceBuf, GpuInfo};
use crate::dtype::DType;
use crate::mem::RawSlice;
use crate::node::{Command, GpuHost, GpuMsg, OpKind, OpRequest};
use crate::proto::Msg;
use crate::Error;

/// Why the CUDA driver cannot be used, or `None` when it can.
fn driver_missing() -> Option<String> {
    // SAFETY: only tries to dlopen the driver library under its usual names; no CUDA call.
    if unsafe { cu::is_culib_present() } {
        None
    } else {
        Some("no NVIDIA driver on this machine (libcuda.so.1 not found on the library path)".into())
    }
}

fn check(r: cu::CUresult, what: &str) -> Result<(), String> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what} failed: {r:?}"))
    }
}

fn nccl_check(r: nc::ncclResult_t, what: &str) -> Result<(), String> {
    if r == nc::ncclResult_t::ncclSuccess {
        Ok(())
    } else {
        Err(format!("{what} failed: {r:?}"))
    }
}

/// The GPUs of this machine, or why there are none usable.
///
/// # Errors
/// No CUDA driver library, a driver call failing, or no device.
pub fn probe() -> Result<Vec<GpuInfo>, String> {
    if let Some(why) = driver_missing() {
        return Err(why);
    }
    // SAFETY: the driver library is present (checked above); cuInit has no preconditions.
    check(unsafe { cu::cuInit(0) }, "cuInit")?;
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer.
    check(unsafe { cu::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    if n == 0 {
        return Err("the NVIDIA driver is loaded but reports no GPU".into());
    }
    let mut out = Vec::new();
    for i in 0..n {
        let mut dev = 0;
        // SAFETY: valid out-pointer, ordinal below the count.
        check(unsafe { cu::cuDeviceGet(&mut dev, i) }, "cuDeviceGet")?;
        let mut name = [0 as std::ffi::c_char; 256];
        check(
            // SAFETY: the buffer holds 256 bytes, as passed.
            unsafe { cu::cuDeviceGetName(name.as_mut_ptr(), 256, dev) },
            "cuDeviceGetName",
        )?;
        let mut pci = [0 as std::ffi::c_char; 64];
        check(
            // SAFETY: the buffer holds 64 bytes, as passed.
            unsafe { cu::cuDeviceGetPCIBusId(pci.as_mut_ptr(), 64, dev) },
            "cuDeviceGetPCIBusId",
        )?;
        let mut mem = 0usize;
        check(
            // SAFETY: valid out-pointer.
            unsafe { cu::cuDeviceTotalMem_v2(&mut mem, dev) },
            "cuDeviceTotalMem",
        )?;
        let s = |b: &[std::ffi::c_char]| {
            // Never read past the buffer, even if the driver left no NUL.
            let bytes: Vec<u8> = b
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        out.push(GpuInfo {
            index: i,
            name: s(&name),
            memory: mem as u64,
            pci_bus_id: s(&pci).to_lowercase(),
        });
    }
    Ok(out)
}

/// Whether NCCL can be loaded, or why not.
pub fn nccl_version() -> Result<i32, String> {
    // SAFETY: only tries to dlopen NCCL under the names cudarc looks for.
    if !unsafe { nc::is_culib_present() } {
        return Err("NCCL not found: cudarc loads it as libnccl.so (pip's NCCL ships only libnccl.so.2: put a libnccl.so link to it on LD_LIBRARY_PATH)".into());
    }
    let mut v = 0;
    // SAFETY: NCCL is present (checked above); `v` is a valid out-pointer.
    nccl_check(unsafe { nc::ncclGetVersion(&mut v) }, "ncclGetVersion")?;
    Ok(v)
}

fn nccl_type(d: DType) -> nc::ncclDataType_t {
    use nc::ncclDataType_t as T;
    match d {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
        DType::U8 => T::ncclUint8,
    }
}

// ---------------------------------------------------------------- the engine's handle

/// What the API needs to reach the engine.
pub(crate) struct GpuEngine {
    device: i32,
    subs: std::sync::Mutex<Option<Sender<GpuOp>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// One GPU operation as submitted.
pub(crate) struct GpuOp {
    /// Tensor id of the name (its chunks and keys are the node's).
    pub tensor: u32,
    /// Tensor id used by the host stage of a broadcast across hosts.
    pub host_tensor: u32,
    pub name: String,
    pub buf: DeviceBuf,
    pub kind: OpKind,
    pub priority: i32,
    pub completer: Completer<Error>,
}

/// The job's shape as the engine needs it.
pub(crate) struct Shape {
    pub rank: u32,
    pub num_workers: u32,
    pub local_size: u32,
    pub local_reduce: bool,
    pub partition_bytes: usize,
    /// Servers of the job (every worker when colocated) and chunks per server wanted: the
    /// adaptive partition rule, applied as the scheduler applies it.
    pub num_servers: u32,
    pub min_chunks_per_server: u32,
    pub credit_bytes: u64,
    pub timeout: Duration,
    /// How this worker reaches the servers (for the GPUDirect decision).
    pub server_link: bps_transport::LinkKind,
    /// Keep device memory registered between operations (BPS_RDMA_CACHE_USER_MEMORY=1).
    pub cache_user_memory: bool,
}

impl Shape {
    /// The partition size of a tensor of `total_bytes` (the job's adaptive rule).
    fn tensor_partition_bytes(&self, total_bytes: usize) -> usize {
        bps_scheduler::adaptive_partition_bytes(
            total_bytes,
            self.partition_bytes,
            self.num_servers,
            self.min_chunks_per_server,
        )
    }
}

/// Exports `len` bytes of device memory at `ptr` as a dma-buf and has the event loop register
/// it with the transport (`Net::register_dmabuf`, addressed by the device pointer); the token.
fn register_device_memory(
    links: &Links,
    timeout: Duration,
    ptr: u64,
    len: usize,
) -> Result<u64, String> {
    let span = super::dmabuf::page_span(ptr, len, super::dmabuf::page_size())?;
    let fd = super::dmabuf::export_dmabuf(ptr, len)?;
    let (reply, answer) = crossbeam_channel::bounded(1);
    links
        .cmds
        .send(Command::RegisterDmabuf {
            fd,
            offset: span.offset,
            len,
            iova: ptr,
            reply,
        })
        .map_err(|_| "the event loop stopped".to_string())?;
    links.waker.wake();
    match answer.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the event loop did not register the dma-buf within {timeout:?}"
        )),
    }
}

/// Links from the engine to the rest of the process.
pub(crate) struct Links {
    pub cmds: Sender<Command>,
    pub waker: Waker,
    pub sched: std::sync::Arc<std::sync::Mutex<std::net::TcpStream>>,
    pub inbox: Receiver<GpuMsg>,
    pub inbox_tx: Sender<GpuMsg>,
}

impl GpuEngine {
    /// Check the machine and start the engine for `device`.
    pub(crate) fn start(device: i32, shape: Shape, links: Links) -> Result<GpuEngine, Error> {
        let gpus = probe().map_err(|why| Error::Unsupported(format!("GPU tensors: {why}")))?;
        if device < 0 || device as usize >= gpus.len() {
            return Err(Error::InvalidArgument(format!(
                "device {device} does not exist: this machine has GPUs 0..{}",
                gpus.len()
            )));
        }
        let l = shape.local_size.max(1);
        if l > 1 && !shape.local_reduce {
            return Err(Error::Unsupported(format!(
                "GPU tensors with BYTEPS_LOCAL_SIZE={l} need the {l} workers of each host group on one host (and {} workers to split into such groups)",
                shape.num_workers
            )));
        }
        if l > 1 {
            nccl_version().map_err(|why| Error::Unsupported(format!("GPU tensors: {why}")))?;
        }
        let mut dev = 0;
        // SAFETY: probe() ran cuInit; valid out-pointer and an ordinal below the count.
        check(unsafe { cu::cuDeviceGet(&mut dev, device) }, "cuDeviceGet")
            .map_err(Error::Unsupported)?;
        let mut ctx = std::ptr::null_mut();
        check(
            // SAFETY: valid out-pointer; the primary context is the one frameworks share.
            unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )
        .map_err(Error::Unsupported)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let ctx_addr = ctx as usize;
        let thread = std::thread::Builder::new()
            .name(format!("bps-gpu-{device}"))
            .spawn(move || {
                let ctx = ctx_addr as cu::CUcontext;
                match Engine::new(device, ctx, shape, links, rx) {
                    Ok(mut e) => e.run(),
                    Err((why, rx)) => {
                        tracing::error!("GPU engine: {why}");
                        // Fail whatever arrives from now on.
                        while let Ok(op) = rx.recv() {
                            op.completer.complete(Err(Error::Unsupported(why.clone())));
                        }
                    }
                }
            })
            .map_err(|e| Error::Unsupported(format!("spawn the GPU thread: {e}")))?;
        Ok(GpuEngine {
            device,
            subs: std::sync::Mutex::new(Some(tx)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Stop the engine: pending GPU operations fail with [`Error::ShutDown`], the NCCL
    /// communicator is aborted, streams and buffers are released; returns once its thread has
    /// ended (so nothing touches the GPU while the process exits).
    pub(crate) fn stop(&self) {
        drop(self.subs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    pub(crate) fn device(&self) -> i32 {
        self.device
    }

    pub(crate) fn submit(&self, op: GpuOp) -> Result<(), Error> {
        match self.subs.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(tx) => tx.send(op).map_err(|_| Error::ShutDown),
            None => Err(Error::ShutDown),
        }
    }
}

// ---------------------------------------------------------------- pinned memory

/// Page-locked host buffers, reused across steps (by power-of-two size class).
struct PinnedPool {
    free: HashMap<usize, Vec<usize>>,
    all: Vec<usize>,
}

impl PinnedPool {
    fn class(bytes: usize) -> usize {
        bytes.max(64 << 10).next_power_of_two()
    }

    fn get(&mut self, bytes: usize) -> Result<RawSlice, String> {
        let class = Self::class(bytes);
        if let Some(addr) = self.free.get_mut(&class).and_then(|v| v.pop()) {
            return Ok(RawSlice { addr, len: class });
        }
        let mut p: *mut c_void = std::ptr::null_mut();
        check(
            // SAFETY: valid out-pointer; the engine thread has its context current.
            unsafe { cu::cuMemHostAlloc(&mut p, class, cu::CU_MEMHOSTALLOC_PORTABLE) },
            "cuMemHostAlloc (pinned staging buffer)",
        )?;
        self.all.push(p as usize);
        Ok(RawSlice {
            addr: p as usize,
            len: class,
        })
    }

    fn put(&mut self, r: RawSlice) {
        self.free.entry(r.len).or_default().push(r.addr);
    }
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        for a in self.all.drain(..) {
            // SAFETY: allocated by cuMemHostAlloc above and not used any more (the engine is
            // going away; the event loop revoked its registrations when it stopped).
            unsafe {
                cu::cuMemFreeHost(a as *mut c_void);
            }
        }
    }
}

// ---------------------------------------------------------------- engine state

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for the scheduler's go for the first NCCL step.
    WaitGo0,
    /// Staged out; chunks travel to the servers and back.
    Network,
    /// Waiting for the go of the gather step.
    WaitGo1,
    /// Everything posted; waiting for the last event.
    Finishing,
}

struct OpState {
    op: GpuOp,
    seq: u32,
    chunks: Vec<Chunk>,
    owner: Vec<u32>,
    phase: Phase,
    staging: Option<RawSlice>,
    /// GPUDirect RDMA: the caller's device buffer, registered as a dma-buf region (this
    /// transport token); chunks go to the servers from it and come back into it, no copies.
    region: Option<u64>,
    host: Option<Handle<Error>>,
    /// D2H copies in flight: (chunk, event).
    d2h: Vec<(u32, cu::CUevent)>,
    /// H2D copies still expected (owned chunks not answered yet).
    h2d_left: usize,
    /// The last H2D copy's event.
    last_h2d: Option<cu::CUevent>,
    done_event: Option<cu::CUevent>,
    deadline: Instant,
}

struct Engine {
    device: i32,
    ctx: cu::CUcontext,
    shape: Shape,
    links: Links,
    subs: Receiver<GpuOp>,
    s_nccl: cu::CUstream,
    s_d2h: cu::CUstream,
    s_h2d: cu::CUstream,
    comm: Option<nc::ncclComm_t>,
    comm_err: Option<String>,
    pool: PinnedPool,
    events: Vec<cu::CUevent>,
    ops: HashMap<u64, OpState>,
    next_op: u64,
    seqs: HashMap<u32, u32>,
    /// Go-aheads that arrived before their operation asked: (tensor, seq, phase).
    early_go: HashSet<(u32, u32, u8)>,
    /// Chunks waiting for the STAGE_OUT copy, under priority and credit.
    stage_out: CreditQueue<(u64, u32)>,
    /// Operations not started because the communicator is not ready yet.
    parked: Vec<GpuOp>,
    /// Several hosts: operations waiting for the one in flight on the same tensor, each with the
    /// caller-stream event recorded when it was submitted. One operation per tensor at a time
    /// reuses one staging buffer instead of pinning a new one per queued operation (pinning
    /// hundreds of MiB blocks this thread for tens of milliseconds), and the host part sees the
    /// operations of a tensor in order anyway.
    waiting: HashMap<u32, std::collections::VecDeque<(GpuOp, cu::CUevent)>>,
    /// Caller-stream events recorded at submission for operations that waited (by op id).
    pre_user: HashMap<u64, cu::CUevent>,
    /// What a STAGE_OUT copy must wait for: the chunk's reduction or the caller's stream.
    d2h_wait: HashMap<(u64, u32), cu::CUevent>,
    /// Caller-stream events shared by all chunks of an operation (one GPU per host).
    keep_user_event: HashMap<u64, cu::CUevent>,
    host_cq: CompletionQueue<Error>,
    broken: Option<Error>,
    nodes: u32,
    /// GPUDirect RDMA or staging for the links to the servers (`choose_route`).
    route: bps_transport::rdma::gpudirect::Route,
    /// Registered device buffers kept between operations (BPS_RDMA_CACHE_USER_MEMORY=1):
    /// (device pointer, bytes) → transport token.
    regions: HashMap<(u64, usize), u64>,
    /// A communicator of this GPU alone: NCCL's pre-multiplying reduction scales a direct
    /// buffer for an average when the host has one GPU (no host communicator).
    solo: Option<nc::ncclComm_t>,
}

// SAFETY (for the raw CUDA handles held above): they are used only on the engine thread.

impl Engine {
    fn new(
        device: i32,
        ctx: cu::CUcontext,
        shape: Shape,
        links: Links,
        subs: Receiver<GpuOp>,
    ) -> Result<Engine, (String, Receiver<GpuOp>)> {
        // SAFETY: `ctx` is the retained primary context of `device`.
        if let Err(e) = check(unsafe { cu::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent") {
            return Err((e, subs));
        }
        let mut streams = [std::ptr::null_mut(); 3];
        for s in streams.iter_mut() {
            if let Err(e) = check(
                // SAFETY: valid out-pointer; context current. Non-blocking: no implicit sync with
                // the legacy default stream (the caller's stream is waited for explicitly).
                unsafe { cu::cuStreamCreate(s, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
                "cuStreamCreate",
            ) {
                return Err((e, subs));
            }
        }
        let l = shape.local_size.max(1);
        let nodes = shape.num_workers / l;
        let credit = shape.credit_bytes.max(shape.partition_bytes as u64);
        Ok(Engine {
            device,
            ctx,
            subs,
            s_nccl: streams[0],
            s_d2h: streams[1],
            s_h2d: streams[2],
            comm: None,
            comm_err: None,
            pool: PinnedPool {
                free: HashMap::new(),
                all: Vec::new(),
            },
            events: Vec::new(),
            ops: HashMap::new(),
            next_op: 1,
            seqs: HashMap::new(),
            early_go: HashSet::new(),
            stage_out: CreditQueue::new(credit),
            parked: Vec::new(),
            waiting: HashMap::new(),
            pre_user: HashMap::new(),
            d2h_wait: HashMap::new(),
            keep_user_event: HashMap::new(),
            host_cq: CompletionQueue::new(false),
            broken: None,
            nodes,
            route: bps_transport::rdma::gpudirect::Route::Staged {
                reason: "one host: no servers to reach".into(),
            },
            regions: HashMap::new(),
            solo: None,
            shape,
            links,
        })
    }

    fn l(&self) -> u32 {
        self.shape.local_size.max(1)
    }

    fn local_rank(&self) -> u32 {
        self.shape.rank % self.l()
    }

    fn group(&self) -> u32 {
        self.shape.rank / self.l()
    }

    fn send_sched(&self, m: &Msg) {
        let mut s = self.links.sched.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = crate::sched::write_msg(&mut s, m) {
            tracing::debug!("GPU engine: send to the scheduler failed: {e}");
        }
    }

    fn event(&mut self) -> Result<cu::CUevent, String> {
        if let Some(e) = self.events.pop() {
            return Ok(e);
        }
        let mut e = std::ptr::null_mut();
        check(
            // SAFETY: valid out-pointer, context current.
            unsafe { cu::cuEventCreate(&mut e, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) },
            "cuEventCreate",
        )?;
        Ok(e)
    }

    fn record(&mut self, stream: cu::CUstream) -> Result<cu::CUevent, String> {
        let e = self.event()?;
        // SAFETY: a live event and stream of this context.
        check(unsafe { cu::cuEventRecord(e, stream) }, "cuEventRecord")?;
        Ok(e)
    }

    fn wait(&self, stream: cu::CUstream, e: cu::CUevent) -> Result<(), String> {
        check(
            // SAFETY: a live stream and a recorded event of this context.
            unsafe { cu::cuStreamWaitEvent(stream, e, 0) },
            "cuStreamWaitEvent",
        )
    }

    /// Whether the work before `e` finished.
    fn done(e: cu::CUevent) -> Result<bool, String> {
        // SAFETY: a live event.
        match unsafe { cu::cuEventQuery(e) } {
            cu::CUresult::CUDA_SUCCESS => Ok(true),
            cu::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => Err(format!("GPU work failed: {r:?}")),
        }
    }

    // ------------------------------------------------------------ the loop

    /// Run the stage thread (and so the pinned buffers it allocates) on the cores nearest
    /// this GPU.
    fn place_near_gpu(&self) {
        let Ok(gpus) = probe() else {
            return;
        };
        let Some(me) = gpus.iter().find(|g| g.index == self.device) else {
            return;
        };
        let topo = crate::topo::Topology::detect();
        let Some(g) = topo.gpu_by_pci(&me.pci_bus_id) else {
            tracing::debug!(
                "GPU {}: not in the topology; stage thread not pinned",
                self.device
            );
            return;
        };
        let (cpus, why) = topo.nearest_cpus_why(g.index);
        match crate::topo::pin_current_thread(&cpus) {
            Ok(()) => tracing::debug!(
                "GPU {} stage thread on cpus {} ({why})",
                self.device,
                crate::topo::format_cpulist(&cpus)
            ),
            Err(e) => tracing::debug!("GPU {}: stage thread not pinned: {e}", self.device),
        }
    }

    /// GPUDirect RDMA or staging for the servers' link, decided once and logged.
    fn choose_route(&mut self) {
        if self.nodes <= 1 {
            return;
        }
        let route = match crate::topo::gpudirect_inputs(self.device) {
            Ok(inputs) => bps_transport::rdma::gpudirect::select_route(
                "the servers",
                self.shape.server_link,
                &inputs,
            ),
            Err(e) => bps_transport::rdma::gpudirect::Route::Staged { reason: e },
        };
        if route.is_direct() {
            tracing::info!(
                "GPU {}: GPUDirect RDMA: sums go to the servers straight from device memory (registered as dma-bufs), staged only where a registration fails",
                self.device
            );
        } else {
            tracing::info!("GPU {}: {route}", self.device);
        }
        self.route = route;
    }

    /// The transport token of `buf` registered for GPUDirect RDMA, or `None` when this
    /// operation is staged: the route says so, the operation cannot go direct
    /// ([`super::dmabuf::direct_eligible`]), or a registration failed (then every later one
    /// is staged too, said once: [`super::dmabuf::direct_or_staged`]).
    fn direct_region(&mut self, buf: &DeviceBuf, sum: bool, average: bool) -> Option<u64> {
        if !self.route.is_direct() {
            return None;
        }
        if let Err(why) =
            super::dmabuf::direct_eligible(buf.dtype, sum, average, self.shape.num_workers)
        {
            tracing::debug!("GPU {}: {why}", self.device);
            return None;
        }
        if let Some(t) = self.regions.get(&(buf.ptr, buf.bytes)) {
            return Some(*t);
        }
        let (links, timeout) = (&self.links, self.shape.timeout);
        let path = super::dmabuf::direct_or_staged(self.device, &self.route, || {
            register_device_memory(links, timeout, buf.ptr, buf.bytes)
        });
        match path {
            super::dmabuf::GpuPath::Direct(token) => {
                if self.shape.cache_user_memory {
                    self.regions.insert((buf.ptr, buf.bytes), token);
                }
                Some(token)
            }
            super::dmabuf::GpuPath::Staged { .. } => None,
        }
    }

    /// An operation is over with its registered buffer: drop the registration unless it is
    /// kept (BPS_RDMA_CACHE_USER_MEMORY=1); `revoked`: the runtime dropped it already (a failed
    /// host part), forget it.
    fn release_region(&mut self, token: u64, revoked: bool) {
        let kept = self.regions.values().any(|t| *t == token);
        if revoked {
            self.regions.retain(|_, t| *t != token);
        }
        if revoked || !kept {
            let _ = self.links.cmds.send(Command::Deregister(token));
            self.links.waker.wake();
        }
    }

    /// Average of a direct buffer: NCCL's pre-multiplying sum, each GPU's part times
    /// 1 / workers, reduced in place to `root` of `comm` (with a communicator of one GPU: a
    /// scaling in place).
    fn premul_reduce(
        &self,
        ptr: u64,
        count: usize,
        dtype: DType,
        root: i32,
        comm: nc::ncclComm_t,
    ) -> Result<(), String> {
        let mut scalar = super::dmabuf::premul_scalar(dtype, self.shape.num_workers)
            .ok_or_else(|| format!("no GPU average for {dtype}"))?;
        // cudarc declares NCCL's reduction operator as a Rust enum, which cannot hold the
        // operator numbers `ncclRedOpCreatePreMulSum` hands out: these three are called
        // through their C signatures, the operator as the C `int` it is.
        type Create = unsafe extern "C" fn(
            *mut std::ffi::c_int,
            *mut c_void,
            nc::ncclDataType_t,
            nc::ncclScalarResidence_t,
            nc::ncclComm_t,
        ) -> nc::ncclResult_t;
        type Reduce = unsafe extern "C" fn(
            *const c_void,
            *mut c_void,
            usize,
            nc::ncclDataType_t,
            std::ffi::c_int,
            std::ffi::c_int,
            nc::ncclComm_t,
            nc::cudaStream_t,
        ) -> nc::ncclResult_t;
        type Destroy = unsafe extern "C" fn(std::ffi::c_int, nc::ncclComm_t) -> nc::ncclResult_t;
        // SAFETY: NCCL was loaded when the engine started (cudarc's loader, which panics
        // otherwise, has run); the symbols are looked up with their C signatures (nccl.h).
        let (create, reduce, destroy) = unsafe {
            let lib = nc::culib();
            let f = |name: &[u8]| {
                format!(
                    "{} not in this NCCL (PreMulSum needs NCCL 2.11 or later)",
                    String::from_utf8_lossy(name)
                )
            };
            (
                *lib.get::<Create>(b"ncclRedOpCreatePreMulSum")
                    .map_err(|_| f(b"ncclRedOpCreatePreMulSum"))?,
                *lib.get::<Reduce>(b"ncclReduce")
                    .map_err(|_| f(b"ncclReduce"))?,
                *lib.get::<Destroy>(b"ncclRedOpDestroy")
                    .map_err(|_| f(b"ncclRedOpDestroy"))?,
            )
        };
        let mut op: std::ffi::c_int = 0;
        nccl_check(
            // SAFETY: `scalar` holds one element of `dtype`, read at once (host immediate);
            // `op` is a valid out-pointer; our communicator.
            unsafe {
                create(
                    &mut op,
                    scalar.as_mut_ptr().cast(),
                    nccl_type(dtype),
                    nc::ncclScalarResidence_t::ncclScalarHostImmediate,
                    comm,
                )
            },
            "ncclRedOpCreatePreMulSum",
        )?;
        let p = ptr as *mut c_void;
        // SAFETY: `count` elements of device memory of the caller's buffer, in place; the
        // operator was created on this communicator just above.
        let r = unsafe {
            reduce(
                p,
                p,
                count,
                nccl_type(dtype),
                op,
                root,
                comm,
                self.s_nccl as nc::cudaStream_t,
            )
        };
        // SAFETY: NCCL allows destroying an operator once the calls using it were enqueued.
        let d = unsafe { destroy(op, comm) };
        nccl_check(r, "ncclReduce (PreMulSum)")?;
        nccl_check(d, "ncclRedOpDestroy")
    }

    /// The communicator of this GPU alone (made once).
    fn solo_comm(&mut self) -> Result<nc::ncclComm_t, String> {
        if let Some(c) = self.solo {
            return Ok(c);
        }
        let mut c: nc::ncclComm_t = std::ptr::null_mut();
        let dev = [self.device];
        nccl_check(
            // SAFETY: valid out-pointer and a list of one device ordinal.
            unsafe { nc::ncclCommInitAll(&mut c, 1, dev.as_ptr()) },
            "ncclCommInitAll",
        )?;
        self.solo = Some(c);
        Ok(c)
    }

    fn run(&mut self) {
        self.place_near_gpu();
        self.choose_route();
        if self.l() > 1 && self.nodes >= 1 {
            if let Err(e) = self.init_comm() {
                self.comm_err = Some(e.clone());
                self.broken = Some(Error::Peer {
                    what: "NCCL communicator of this host's GPUs".into(),
                    peer: format!("local ranks of host group {}", self.group()),
                    reason: e,
                });
            }
        }
        for op in std::mem::take(&mut self.parked) {
            self.start(op);
        }
        let (subs, inbox) = (self.subs.clone(), self.links.inbox.clone());
        loop {
            let busy = !self.ops.is_empty();
            let timeout = if busy {
                Duration::from_micros(20)
            } else {
                Duration::from_millis(100)
            };
            let mut sel = Select::new();
            let i_subs = sel.recv(&subs);
            let i_inbox = sel.recv(&inbox);
            match sel.select_timeout(timeout) {
                Ok(o) if o.index() == i_subs => match o.recv(&subs) {
                    Ok(op) => self.start(op),
                    Err(_) => break,
                },
                Ok(o) if o.index() == i_inbox => match o.recv(&inbox) {
                    Ok(m) => self.on_msg(m),
                    Err(_) => break,
                },
                _ => {}
            }
            while let Ok(m) = self.links.inbox.try_recv() {
                self.on_msg(m);
            }
            self.progress();
        }
        self.teardown();
    }

    fn teardown(&mut self) {
        let err = self.broken.clone().unwrap_or(Error::ShutDown);
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        // Waiting operations first: failing one in flight would start the next.
        for (_, q) in std::mem::take(&mut self.waiting) {
            for (op, ev) in q {
                self.events.push(ev);
                op.completer.complete(Err(err.clone()));
            }
        }
        for id in ids {
            self.fail(id, err.clone());
        }
        for (_, ev) in std::mem::take(&mut self.pre_user) {
            self.events.push(ev);
        }
        for c in [self.comm.take(), self.solo.take()].into_iter().flatten() {
            // SAFETY: our communicators; abort does not wait for other ranks.
            unsafe {
                nc::ncclCommAbort(c);
            }
        }
        for e in self.events.drain(..) {
            // SAFETY: events created by this engine and no longer referenced.
            unsafe {
                cu::cuEventDestroy_v2(e);
            }
        }
        for s in [self.s_nccl, self.s_d2h, self.s_h2d] {
            // SAFETY: streams created by this engine; the pool's buffers are freed after.
            unsafe {
                cu::cuStreamSynchronize(s);
                cu::cuStreamDestroy_v2(s);
            }
        }
        let _ = self.ctx;
    }

    /// Build the NCCL communicator of the host group: local rank 0 makes the id and sends it
    /// through the scheduler; everyone joins.
    fn init_comm(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + self.shape.timeout;
        let id: nc::ncclUniqueId = if self.local_rank() == 0 {
            let mut id = std::mem::MaybeUninit::<nc::ncclUniqueId>::uninit();
            nccl_check(
                // SAFETY: valid out-pointer; NCCL was found at start.
                unsafe { nc::ncclGetUniqueId(id.as_mut_ptr()) },
                "ncclGetUniqueId",
            )?;
            // SAFETY: initialised by the successful call above.
            let id = unsafe { id.assume_init() };
            let bytes: Vec<u8> = id.internal.iter().map(|c| *c as u8).collect();
            self.send_sched(&Msg::GpuId {
                group: self.group(),
                id: bytes,
            });
            id
        } else {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "no NCCL id from local rank 0 of host group {} within {:?} (BPS_TIMEOUT): does every worker of the host use GPU tensors?",
                        self.group(),
                        self.shape.timeout
                    ));
                }
                // Submissions that arrive meanwhile wait.
                while let Ok(op) = self.subs.try_recv() {
                    self.parked.push(op);
                }
                match self
                    .links
                    .inbox
                    .recv_timeout(left.min(Duration::from_millis(50)))
                {
                    Ok(GpuMsg::Sched(Msg::GpuId { group, id })) if group == self.group() => {
                        if id.len() != 128 {
                            return Err(format!("NCCL id of {} bytes, expected 128", id.len()));
                        }
                        let mut u = nc::ncclUniqueId { internal: [0; 128] };
                        for (d, s) in u.internal.iter_mut().zip(&id) {
                            *d = *s as std::ffi::c_char;
                        }
                        break u;
                    }
                    Ok(GpuMsg::Sched(Msg::GpuGo { tensor, seq, phase })) => {
                        self.early_go.insert((tensor, seq, phase));
                    }
                    Ok(_) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(_) => return Err("the runtime stopped".into()),
                }
            }
        };
        // ncclCommInitRank blocks until every local rank joined: run it aside so a missing
        // rank becomes a timeout, not a hang.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (l, r, ctx) = (self.l() as i32, self.local_rank() as i32, self.ctx as usize);
        std::thread::Builder::new()
            .name("bps-nccl-init".into())
            .spawn(move || {
                let mut comm = std::ptr::null_mut();
                // SAFETY: `ctx` is the retained primary context; valid out-pointer; the id
                // is the group's.
                let res = unsafe {
                    cu::cuCtxSetCurrent(ctx as cu::CUcontext);
                    nc::ncclCommInitRank(&mut comm, l, id, r)
                };
                let _ = tx.send((res, comm as usize));
            })
            .map_err(|e| format!("spawn: {e}"))?;
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_secs(1))) {
            Ok((res, comm)) => {
                nccl_check(res, "ncclCommInitRank")?;
                self.comm = Some(comm as nc::ncclComm_t);
                tracing::debug!(
                    "GPU {}: NCCL communicator of {} local GPUs ready (local rank {})",
                    self.device,
                    l,
                    r
                );
                Ok(())
            }
            Err(_) => Err(format!(
                "the NCCL communicator of host group {} did not form within {:?} (BPS_TIMEOUT): a local rank is missing",
                self.group(),
                self.shape.timeout
            )),
        }
    }

    fn on_msg(&mut self, m: GpuMsg) {
        match m {
            GpuMsg::Sched(Msg::GpuGo { tensor, seq, phase }) => {
                let found = self
                    .ops
                    .iter()
                    .find(|(_, o)| o.op.tensor == tensor && o.seq == seq)
                    .map(|(id, _)| *id);
                match found {
                    Some(id) => self.on_go(id, phase),
                    None => {
                        self.early_go.insert((tensor, seq, phase));
                    }
                }
            }
            GpuMsg::Sched(_) => {}
            GpuMsg::ChunkDone { op, chunk } => self.on_chunk_done(op, chunk),
        }
    }

    fn fail(&mut self, id: u64, err: Error) {
        if let Some(o) = self.ops.remove(&id) {
            for (ci, e) in &o.d2h {
                self.events.push(*e);
                self.stage_out.release(o.chunks[*ci as usize].len as u64);
            }
            // The staging buffer may still be written by a late answer if the host op did not
            // fail: it is not reused (leaked to the pool only when the host op is finished).
            if let Some(s) = o.staging {
                if o.host
                    .as_ref()
                    .is_none_or(|h| h.status() != Status::Pending)
                {
                    self.pool.put(s);
                }
            }
            if let Some(ev) = self.pre_user.remove(&id) {
                self.events.push(ev);
            }
            if let Some(t) = o.region {
                // Revoked: a late answer must not land in memory the caller gets back now.
                self.release_region(t, true);
            }
            let tensor = o.op.tensor;
            o.op.completer.complete(Err(err));
            self.start_next(tensor);
        }
    }

    fn fail_op_and_comm(&mut self, id: u64, why: String) {
        let err = Error::Peer {
            what: format!(
                "GPU operation on {:?}",
                self.ops
                    .get(&id)
                    .map(|o| o.op.name.clone())
                    .unwrap_or_default()
            ),
            peer: format!("GPU {}", self.device),
            reason: why,
        };
        // Broken first: the operations waiting behind this one then fail instead of starting.
        if self.broken.is_none() {
            self.broken = Some(err.clone());
        }
        self.fail(id, err.clone());
        self.break_engine(err);
    }

    /// NCCL calls other local ranks may be waiting in cannot complete now: abort the
    /// communicator so nothing spins forever, and fail everything pending and later.
    fn break_engine(&mut self, err: Error) {
        if let Some(c) = self.comm.take() {
            // SAFETY: our communicator; abort does not wait for other ranks.
            unsafe {
                nc::ncclCommAbort(c);
            }
        }
        if self.broken.is_none() {
            self.broken = Some(err.clone());
        }
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for id in ids {
            self.fail(id, err.clone());
        }
    }

    // ------------------------------------------------------------ stages

    fn start(&mut self, op: GpuOp) {
        self.start_recorded(op, None);
    }

    /// Start the next waiting operation of `tensor`, if any (one that cannot start, because the
    /// engine broke or it needs no work, lets the one after it go).
    fn start_next(&mut self, tensor: u32) {
        while !self.ops.values().any(|o| o.op.tensor == tensor) {
            let Some(q) = self.waiting.get_mut(&tensor) else {
                return;
            };
            let Some((op, ev)) = q.pop_front() else {
                self.waiting.remove(&tensor);
                return;
            };
            if q.is_empty() {
                self.waiting.remove(&tensor);
            }
            self.start_recorded(op, Some(ev));
        }
    }

    fn start_recorded(&mut self, op: GpuOp, user: Option<cu::CUevent>) {
        // An event recorded at submission goes back to the pool whatever happens below (it
        // is moved into `pre_user` when the operation really starts).
        let mut user = user;
        let give_back = |s: &mut Self, u: &mut Option<cu::CUevent>| {
            if let Some(ev) = u.take() {
                s.events.push(ev);
            }
        };
        if let Some(e) = &self.broken {
            op.completer.complete(Err(e.clone()));
            give_back(self, &mut user);
            return;
        }
        if op.buf.device != self.device {
            let e = Error::InvalidArgument(format!(
                "tensor {:?} is on GPU {} but this process uses GPU {} (one GPU per worker: set CUDA_VISIBLE_DEVICES or use the same device)",
                op.name, op.buf.device, self.device
            ));
            op.completer.complete(Err(e));
            give_back(self, &mut user);
            return;
        }
        if op.buf.bytes == 0 || (self.shape.num_workers == 1) {
            // Nothing to reduce with: the tensor already is the result (a one-worker average
            // divides by one).
            op.completer.complete(Ok(()));
            give_back(self, &mut user);
            return;
        }
        // Several hosts: one operation per tensor in flight, the others wait in order (with
        // the caller's stream as it was when they were submitted).
        if self.nodes > 1
            && user.is_none()
            && (self.waiting.contains_key(&op.tensor)
                || self.ops.values().any(|o| o.op.tensor == op.tensor))
        {
            match self.record(op.buf.stream as usize as cu::CUstream) {
                Ok(ev) => self
                    .waiting
                    .entry(op.tensor)
                    .or_default()
                    .push_back((op, ev)),
                Err(why) => op.completer.complete(Err(Error::Peer {
                    what: format!("GPU {}", self.device),
                    peer: String::new(),
                    reason: why,
                })),
            }
            return;
        }
        let chunks = match partition(
            op.buf.bytes,
            op.buf.dtype.size(),
            self.shape.tensor_partition_bytes(op.buf.bytes),
        ) {
            Ok(c) => c,
            Err(e) => {
                op.completer
                    .complete(Err(Error::InvalidArgument(e.to_string())));
                give_back(self, &mut user);
                return;
            }
        };
        let l = self.l();
        let owner: Vec<u32> = chunks
            .iter()
            .map(|c| op.tensor.wrapping_add(c.index.0) % l)
            .collect();
        let seq = {
            let s = self.seqs.entry(op.tensor).or_insert(0);
            let v = *s;
            *s += 1;
            v
        };
        let id = self.next_op;
        self.next_op += 1;
        let deadline = Instant::now() + self.shape.timeout;
        let tensor = op.tensor;
        self.ops.insert(
            id,
            OpState {
                op,
                seq,
                chunks,
                owner,
                phase: Phase::WaitGo0,
                staging: None,
                region: None,
                host: None,
                d2h: Vec::new(),
                h2d_left: 0,
                last_h2d: None,
                done_event: None,
                deadline,
            },
        );
        if let Some(ev) = user.take() {
            self.pre_user.insert(id, ev);
        }
        if l > 1 {
            self.ask_go(id, tensor, seq, 0);
        } else {
            self.on_go(id, 0);
        }
    }

    fn ask_go(&mut self, id: u64, tensor: u32, seq: u32, phase: u8) {
        if self.early_go.remove(&(tensor, seq, phase)) {
            self.on_go(id, phase);
        } else {
            self.send_sched(&Msg::GpuReady { tensor, seq, phase });
        }
    }

    fn on_go(&mut self, id: u64, phase: u8) {
        let r = match phase {
            0 => self.go_first(id),
            _ => self.go_gather(id),
        };
        if let Err(why) = r {
            self.fail_op_and_comm(id, why);
        }
    }

    /// The first GPU step: all-reduce on one host; else reduce each chunk to its owner and
    /// queue the owned chunks for STAGE_OUT.
    fn go_first(&mut self, id: u64) -> Result<(), String> {
        let nodes = self.nodes;
        let l = self.l();
        let me = self.local_rank();
        let Some(o) = self.ops.get(&id) else {
            return Ok(());
        };
        if o.phase != Phase::WaitGo0 {
            return Ok(());
        }
        let buf = o.op.buf;
        let kind = o.op.kind;
        let chunks = o.chunks.clone();
        let owner = o.owner.clone();
        // Work on the caller's stream so far (as of submission, for an operation that waited
        // for the previous one on its tensor) comes first.
        let user = match self.pre_user.remove(&id) {
            Some(ev) => ev,
            None => self.record(buf.stream as usize as cu::CUstream)?,
        };
        let dt = nccl_type(buf.dtype);
        let count = buf.bytes / buf.dtype.size();
        let p = buf.ptr as *mut c_void;
        if nodes == 1 {
            let comm = self.comm.ok_or("no NCCL communicator")?;
            self.wait(self.s_nccl, user)?;
            // SAFETY: `p` is device memory of `count` elements (the API caller's promise);
            // in-place collectives are allowed; our communicator and stream.
            let r = unsafe {
                match kind {
                    OpKind::Sum { average } => nc::ncclAllReduce(
                        p,
                        p,
                        count,
                        dt,
                        if average {
                            nc::ncclRedOp_t::ncclAvg
                        } else {
                            nc::ncclRedOp_t::ncclSum
                        },
                        comm,
                        self.s_nccl as nc::cudaStream_t,
                    ),
                    OpKind::Broadcast { root } => nc::ncclBroadcast(
                        p,
                        p,
                        count,
                        dt,
                        (root % l) as i32,
                        comm,
                        self.s_nccl as nc::cudaStream_t,
                    ),
                }
            };
            nccl_check(r, "NCCL collective")?;
            let done = self.record(self.s_nccl)?;
            self.events.push(user);
            let o = self.ops.get_mut(&id).expect("checked");
            o.done_event = Some(done);
            o.phase = Phase::Finishing;
            return Ok(());
        }
        if let OpKind::Broadcast { .. } = kind {
            return self.broadcast_across_hosts(id, user);
        }
        // GPUDirect RDMA: the buffer itself is registered and goes to the servers, else a
        // pinned staging buffer does.
        let average = matches!(kind, OpKind::Sum { average: true });
        let region = self.direct_region(&buf, true, average);
        if let Some(o) = self.ops.get_mut(&id) {
            o.region = region; // released by `fail` from here on
        }
        let staging = match region {
            Some(_) => None,
            None => Some(self.pool.get(buf.bytes)?),
        };
        // A direct buffer is averaged on the GPU (the runtime does not touch it): each GPU's
        // part is pre-multiplied by 1 / workers in the local reduction.
        let premul = region.is_some() && average;
        // LOCAL_REDUCE: each chunk to its owner.
        let esz = buf.dtype.size();
        if l > 1 {
            let comm = self.comm.ok_or("no NCCL communicator")?;
            self.wait(self.s_nccl, user)?;
            let mut reduced = Vec::new();
            for (c, ow) in chunks.iter().zip(&owner) {
                if premul {
                    self.premul_reduce(
                        buf.ptr + c.offset as u64,
                        c.len / esz,
                        buf.dtype,
                        *ow as i32,
                        comm,
                    )?;
                    if *ow == me {
                        reduced.push((c.index.0, self.record(self.s_nccl)?));
                    }
                    continue;
                }
                let cp = (buf.ptr + c.offset as u64) as *mut c_void;
                // SAFETY: the chunk lies inside the caller's device buffer; in place.
                let r = unsafe {
                    nc::ncclReduce(
                        cp,
                        cp,
                        c.len / esz,
                        dt,
                        nc::ncclRedOp_t::ncclSum,
                        *ow as i32,
                        comm,
                        self.s_nccl as nc::cudaStream_t,
                    )
                };
                nccl_check(r, "ncclReduce")?;
                if *ow == me {
                    reduced.push((c.index.0, self.record(self.s_nccl)?));
                }
            }
            self.events.push(user);
            for (ci, ev) in reduced {
                self.stage_out.push(
                    (id, ci),
                    Priority(self.prio(id)),
                    chunks[ci as usize].len as u64,
                );
                self.d2h_wait.insert((id, ci), ev);
            }
        } else {
            let user = if premul {
                // One GPU on the host: scale the whole buffer in place first.
                let solo = self.solo_comm()?;
                self.wait(self.s_nccl, user)?;
                self.premul_reduce(buf.ptr, count, buf.dtype, 0, solo)?;
                self.events.push(user);
                self.record(self.s_nccl)?
            } else {
                user
            };
            for c in &chunks {
                self.stage_out
                    .push((id, c.index.0), Priority(self.prio(id)), c.len as u64);
                // Every D2H copy (or direct release) waits for the caller's stream.
                self.d2h_wait.insert((id, c.index.0), user);
            }
            self.keep_user_event.insert(id, user);
        }
        let owned: Vec<bool> = owner.iter().map(|ow| *ow == me).collect();
        let n_owned = owned.iter().filter(|x| **x).count();
        let (handle, completer) = self.host_cq.register(id);
        let o = self.ops.get_mut(&id).expect("checked");
        o.staging = staging;
        o.h2d_left = n_owned;
        o.phase = Phase::Network;
        let io = RawSlice {
            addr: staging.map_or(buf.ptr as usize, |s| s.addr),
            len: buf.bytes,
        };
        let req = OpRequest {
            tensor: o.op.tensor,
            name: o.op.name.clone(),
            dtype: buf.dtype,
            bytes: buf.bytes,
            input: io,
            output: io,
            // A direct buffer was averaged on the GPU already.
            kind: OpKind::Sum {
                average: average && !premul,
            },
            priority: o.op.priority,
            completer,
            gpu: Some(GpuHost {
                op: id,
                owned,
                notify: self.links.inbox_tx.clone(),
                region,
            }),
        };
        o.host = Some(handle);
        self.links
            .cmds
            .send(Command::Op(req))
            .map_err(|_| "the event loop stopped".to_string())?;
        self.links.waker.wake();
        if n_owned == 0 {
            self.after_network(id)?;
        }
        Ok(())
    }

    fn prio(&self, id: u64) -> i32 {
        self.ops.get(&id).map_or(0, |o| o.op.priority)
    }

    /// A broadcast across hosts: every worker stages its tensor out, the host path broadcasts
    /// the root's, and the result is staged in.
    fn broadcast_across_hosts(&mut self, id: u64, user: cu::CUevent) -> Result<(), String> {
        let o = self.ops.get(&id).expect("checked by the caller");
        let buf = o.op.buf;
        let staging = self.pool.get(buf.bytes)?;
        self.wait(self.s_d2h, user)?;
        check(
            // SAFETY: pinned buffer of at least `bytes` bytes; device range of the caller.
            unsafe {
                cu::cuMemcpyDtoHAsync_v2(
                    staging.addr as *mut c_void,
                    buf.ptr,
                    buf.bytes,
                    self.s_d2h,
                )
            },
            "cuMemcpyDtoHAsync",
        )?;
        // The host op must not read the buffer before the copy ends: wait here (broadcasts
        // are for start-up, not the training step).
        check(
            // SAFETY: a live stream.
            unsafe { cu::cuStreamSynchronize(self.s_d2h) },
            "cuStreamSynchronize",
        )?;
        self.events.push(user);
        let (handle, completer) = self.host_cq.register(id);
        let o = self.ops.get_mut(&id).expect("checked by the caller");
        let OpKind::Broadcast { root } = o.op.kind else {
            return Err("not a broadcast".into());
        };
        let r = RawSlice {
            addr: staging.addr,
            len: buf.bytes,
        };
        let req = OpRequest {
            tensor: o.op.host_tensor,
            name: format!("{} (GPU broadcast)", o.op.name),
            dtype: buf.dtype,
            bytes: buf.bytes,
            input: r,
            output: r,
            kind: OpKind::Broadcast { root },
            priority: o.op.priority,
            completer,
            gpu: None,
        };
        o.staging = Some(staging);
        o.host = Some(handle);
        o.phase = Phase::Network;
        o.h2d_left = usize::MAX; // finished when the host op completes
        self.links
            .cmds
            .send(Command::Op(req))
            .map_err(|_| "the event loop stopped".to_string())?;
        self.links.waker.wake();
        Ok(())
    }

    fn on_chunk_done(&mut self, id: u64, chunk: u32) {
        let r = (|| -> Result<(), String> {
            let Some(o) = self.ops.get(&id) else {
                return Ok(());
            };
            let Some(c) = o.chunks.get(chunk as usize).copied() else {
                return Ok(());
            };
            let buf = o.op.buf;
            if o.region.is_some() {
                // GPUDirect RDMA: the NIC wrote the sum into the device buffer already.
                let o = self.ops.get_mut(&id).expect("checked");
                o.h2d_left = o.h2d_left.saturating_sub(1);
                o.deadline = Instant::now() + self.shape.timeout;
                if o.h2d_left == 0 {
                    self.after_network(id)?;
                }
                return Ok(());
            }
            let staging = o.staging.ok_or("no staging buffer")?;
            // STAGE_IN of this chunk, while other chunks are still on the wire.
            check(
                // SAFETY: the chunk lies inside both the pinned buffer and the device buffer; the
                // event loop wrote the answer before announcing it.
                unsafe {
                    cu::cuMemcpyHtoDAsync_v2(
                        buf.ptr + c.offset as u64,
                        (staging.addr + c.offset) as *const c_void,
                        c.len,
                        self.s_h2d,
                    )
                },
                "cuMemcpyHtoDAsync",
            )?;
            let o = self.ops.get_mut(&id).expect("checked");
            o.h2d_left = o.h2d_left.saturating_sub(1);
            o.deadline = Instant::now() + self.shape.timeout;
            if o.h2d_left == 0 {
                self.after_network(id)?;
            }
            Ok(())
        })();
        if let Err(why) = r {
            self.fail_op_and_comm(id, why);
        }
    }

    /// Every owned chunk is back on the GPU (copies posted): gather across local GPUs.
    fn after_network(&mut self, id: u64) -> Result<(), String> {
        let last = self.record(self.s_h2d)?;
        let Some(o) = self.ops.get_mut(&id) else {
            return Ok(());
        };
        o.last_h2d = Some(last);
        if self.shape.local_size.max(1) > 1 {
            o.phase = Phase::WaitGo1;
            let (t, s) = (o.op.tensor, o.seq);
            self.ask_go(id, t, s, 1);
        } else {
            o.phase = Phase::Finishing;
            o.done_event = o.last_h2d.take();
        }
        Ok(())
    }

    /// LOCAL_GATHER: broadcast each chunk from its owner to the host's other GPUs.
    fn go_gather(&mut self, id: u64) -> Result<(), String> {
        let Some(o) = self.ops.get_mut(&id) else {
            return Ok(());
        };
        if o.phase != Phase::WaitGo1 {
            return Ok(());
        }
        let comm = self.comm.ok_or("no NCCL communicator")?;
        let last = o.last_h2d.take().ok_or("no staging-in event")?;
        let buf = o.op.buf;
        let esz = buf.dtype.size();
        let dt = nccl_type(buf.dtype);
        let work: Vec<(Chunk, u32)> = o.chunks.iter().copied().zip(o.owner.clone()).collect();
        self.wait(self.s_nccl, last)?;
        self.events.push(last);
        nccl_check(nc::ncclResult_t::ncclSuccess, "")?;
        // SAFETY: group calls bracket the broadcasts below.
        nccl_check(unsafe { nc::ncclGroupStart() }, "ncclGroupStart")?;
        let mut res = Ok(());
        for (c, ow) in &work {
            let cp = (buf.ptr + c.offset as u64) as *mut c_void;
            // SAFETY: the chunk lies inside the caller's device buffer; in place.
            let r = unsafe {
                nc::ncclBroadcast(
                    cp,
                    cp,
                    c.len / esz,
                    dt,
                    *ow as i32,
                    comm,
                    self.s_nccl as nc::cudaStream_t,
                )
            };
            if res.is_ok() {
                res = nccl_check(r, "ncclBroadcast");
            }
        }
        // SAFETY: closes the group opened above.
        nccl_check(unsafe { nc::ncclGroupEnd() }, "ncclGroupEnd")?;
        res?;
        let done = self.record(self.s_nccl)?;
        let o = self.ops.get_mut(&id).expect("checked");
        o.done_event = Some(done);
        o.phase = Phase::Finishing;
        Ok(())
    }

    /// Poll events and host operations; move operations along.
    fn progress(&mut self) {
        // STAGE_OUT under priority and credit.
        while let Some(((id, ci), bytes)) = self.stage_out.pop() {
            if !self.ops.contains_key(&id) {
                self.stage_out.release(bytes);
                if let Some(ev) = self.d2h_wait.remove(&(id, ci)) {
                    if self.shape.local_size.max(1) > 1 {
                        self.events.push(ev);
                    }
                }
                continue;
            }
            if let Err(why) = self.stage_out_chunk(id, ci) {
                self.stage_out.release(bytes);
                self.fail_op_and_comm(id, why);
            }
        }
        let now = Instant::now();
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for id in ids {
            if let Err(why) = self.progress_op(id, now) {
                self.fail_op_and_comm(id, why);
            }
        }
    }

    fn stage_out_chunk(&mut self, id: u64, ci: u32) -> Result<(), String> {
        let wait_on = self.d2h_wait.remove(&(id, ci));
        let Some(o) = self.ops.get(&id) else {
            return Ok(());
        };
        let c = o.chunks[ci as usize];
        let buf = o.op.buf;
        let (staging, direct) = (o.staging, o.region.is_some());
        if let Some(ev) = wait_on {
            self.wait(self.s_d2h, ev)?;
            if self.shape.local_size.max(1) > 1 {
                self.events.push(ev);
            }
        }
        if direct {
            // GPUDirect RDMA: no copy; the chunk goes once its reduction is done.
            let e = self.record(self.s_d2h)?;
            self.ops.get_mut(&id).expect("checked").d2h.push((ci, e));
            return Ok(());
        }
        let staging = staging.ok_or("no staging buffer")?;
        check(
            // SAFETY: the chunk lies inside both the device buffer and the pinned buffer.
            unsafe {
                cu::cuMemcpyDtoHAsync_v2(
                    (staging.addr + c.offset) as *mut c_void,
                    buf.ptr + c.offset as u64,
                    c.len,
                    self.s_d2h,
                )
            },
            "cuMemcpyDtoHAsync",
        )?;
        let e = self.record(self.s_d2h)?;
        self.ops.get_mut(&id).expect("checked").d2h.push((ci, e));
        Ok(())
    }

    fn progress_op(&mut self, id: u64, now: Instant) -> Result<(), String> {
        let Some(o) = self.ops.get_mut(&id) else {
            return Ok(());
        };
        // STAGE_OUT copies that finished release their chunk to the network.
        let mut i = 0;
        while i < o.d2h.len() {
            let (ci, ev) = o.d2h[i];
            if Self::done(ev)? {
                o.d2h.swap_remove(i);
                self.events.push(ev);
                self.stage_out.release(o.chunks[ci as usize].len as u64);
                let _ = self.links.cmds.send(Command::Release {
                    tensor: o.op.tensor,
                    op: id,
                    chunk: ci,
                });
                self.links.waker.wake();
            } else {
                i += 1;
            }
        }
        if o.d2h.is_empty() {
            if let Some(ev) = self.keep_user_event.get(&id).copied() {
                if !self.d2h_wait.keys().any(|(i, _)| *i == id) {
                    self.keep_user_event.remove(&id);
                    self.events.push(ev);
                }
            }
        }
        // The host part failed: the GPU operation fails with its error.
        if let Some(h) = &o.host {
            match h.status() {
                Status::Pending => {}
                _ => {
                    if let Some(Err(e)) = h.result() {
                        let e = e.clone();
                        o.host = None;
                        if let Some(s) = o.staging.take() {
                            self.pool.put(s);
                        }
                        self.fail_after_host_error(id, e);
                        return Ok(());
                    }
                    if o.h2d_left == usize::MAX {
                        // A staged broadcast: its result is in the pinned buffer.
                        let buf = o.op.buf;
                        let staging = o.staging.ok_or("no staging buffer")?;
                        check(
                            // SAFETY: pinned buffer of at least `bytes` bytes; caller's device range.
                            unsafe {
                                cu::cuMemcpyHtoDAsync_v2(
                                    buf.ptr,
                                    staging.addr as *const c_void,
                                    buf.bytes,
                                    self.s_h2d,
                                )
                            },
                            "cuMemcpyHtoDAsync",
                        )?;
                        let e = self.record(self.s_h2d)?;
                        let o = self.ops.get_mut(&id).expect("present");
                        o.h2d_left = 0;
                        o.done_event = Some(e);
                        o.phase = Phase::Finishing;
                        o.host = None;
                        return Ok(());
                    }
                }
            }
        }
        let o = self.ops.get_mut(&id).expect("present");
        if o.phase == Phase::Finishing {
            let host_done = o
                .host
                .as_ref()
                .is_none_or(|h| h.status() != Status::Pending);
            if let Some(ev) = o.done_event {
                if host_done && Self::done(ev)? {
                    let o = self.ops.remove(&id).expect("present");
                    self.events.push(ev);
                    if let Some(s) = o.staging {
                        self.pool.put(s);
                    }
                    if let Some(t) = o.region {
                        self.release_region(t, false);
                    }
                    let tensor = o.op.tensor;
                    o.op.completer.complete(Ok(()));
                    self.start_next(tensor);
                    return Ok(());
                }
            }
        }
        let o = self.ops.get_mut(&id).expect("present");
        if now > o.deadline {
            let what = match o.phase {
                Phase::WaitGo0 | Phase::WaitGo1 => format!(
                    "the other GPUs of host group {} did not reach the same tensor within {:?} (BPS_TIMEOUT)",
                    self.shape.rank / self.shape.local_size.max(1),
                    self.shape.timeout
                ),
                Phase::Network => format!(
                    "chunks did not come back from the servers within {:?} (BPS_TIMEOUT)",
                    self.shape.timeout
                ),
                Phase::Finishing => format!(
                    "GPU work did not finish within {:?} (BPS_TIMEOUT)",
                    self.shape.timeout
                ),
            };
            return Err(what);
        }
        Ok(())
    }

    fn fail_after_host_error(&mut self, id: u64, e: Error) {
        let l = self.l();
        self.fail(id, e.clone());
        if l > 1 {
            // The other local GPUs may wait in the gather step for this one.
            self.break_engine(e);
        }
    }
}

// ---------------------------------------------------------------- staging benchmark

/// Copy bandwidths of the staging path against plain pinned copies, in GB/s.
#[derive(Clone, Copy, Debug, Default)]
pub struct StagingFigures {
    /// One device → pinned host copy of the whole buffer.
    pub plain_d2h: f64,
    /// One pinned host → device copy of the whole buffer.
    pub plain_h2d: f64,
    /// STAGE_OUT as the engine does it: chunk by chunk on its copy stream, an event per chunk,
    /// into a pooled pinned buffer.
    pub staged_d2h: f64,
    /// STAGE_IN as the engine does it.
    pub staged_h2d: f64,
    /// Both directions at once on their two streams (the engine overlaps them), per direction.
    pub staged_both: f64,
}

/// Measure the staging path on `device` with `bytes` bytes cut into `chunk` byte chunks
/// (`reps` repetitions each; the best is kept, as bandwidth tools do).
///
/// # Errors
/// No usable GPU, or a CUDA call failing.
pub fn staging_bandwidth(
    device: i32,
    bytes: usize,
    chunk: usize,
    reps: u32,
) -> Result<StagingFigures, String> {
    let gpus = probe()?;
    if device < 0 || device as usize >= gpus.len() {
        return Err(format!(
            "device {device} does not exist ({} GPUs)",
            gpus.len()
        ));
    }
    if bytes == 0 || chunk == 0 {
        return Err("bytes and chunk must be positive".into());
    }
    let mut dev = 0;
    let mut ctx = std::ptr::null_mut();
    // SAFETY: probe() initialised the driver; valid out-pointers; an existing ordinal.
    check(unsafe { cu::cuDeviceGet(&mut dev, device) }, "cuDeviceGet")?;
    check(
        // SAFETY: valid out-pointer.
        unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
    )?;
    // SAFETY: the retained primary context.
    check(unsafe { cu::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")?;
    let mut d = 0;
    // SAFETY: valid out-pointer; context current.
    check(unsafe { cu::cuMemAlloc_v2(&mut d, bytes) }, "cuMemAlloc")?;
    let mut pool = PinnedPool {
        free: HashMap::new(),
        all: Vec::new(),
    };
    let result = (|| -> Result<StagingFigures, String> {
        let host = pool.get(bytes)?;
        let host2 = pool.get(bytes)?;
        let mut d2 = 0;
        // SAFETY: valid out-pointer; context current.
        check(unsafe { cu::cuMemAlloc_v2(&mut d2, bytes) }, "cuMemAlloc")?;
        let mut streams = [std::ptr::null_mut(); 2];
        for s in streams.iter_mut() {
            check(
                // SAFETY: valid out-pointer; context current.
                unsafe { cu::cuStreamCreate(s, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
                "cuStreamCreate",
            )?;
        }
        let (s0, s1) = (streams[0], streams[1]);
        let mut events: Vec<cu::CUevent> = Vec::new();
        let time = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) {
                let t = Instant::now();
                f()?;
                for s in [s0, s1] {
                    // SAFETY: live streams.
                    check(unsafe { cu::cuStreamSynchronize(s) }, "cuStreamSynchronize")?;
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let gbs = |secs: f64| bytes as f64 / secs / 1e9;
        let plain_d2h = gbs(time(&mut || {
            check(
                // SAFETY: both buffers hold `bytes` bytes.
                unsafe { cu::cuMemcpyDtoHAsync_v2(host.addr as *mut c_void, d, bytes, s0) },
                "cuMemcpyDtoHAsync",
            )
        })?);
        let plain_h2d = gbs(time(&mut || {
            check(
                // SAFETY: both buffers hold `bytes` bytes.
                unsafe { cu::cuMemcpyHtoDAsync_v2(d, host.addr as *const c_void, bytes, s0) },
                "cuMemcpyHtoDAsync",
            )
        })?);
        let chunked = |dir: u8, ev: &mut Vec<cu::CUevent>| -> Result<(), String> {
            let mut off = 0;
            while off < bytes {
                let len = chunk.min(bytes - off);
                // SAFETY: every chunk lies inside the buffers of `bytes` bytes.
                let r = unsafe {
                    match dir {
                        0 => cu::cuMemcpyDtoHAsync_v2(
                            (host.addr + off) as *mut c_void,
                            d + off as u64,
                            len,
                            s0,
                        ),
                        1 => cu::cuMemcpyHtoDAsync_v2(
                            d + off as u64,
                            (host.addr + off) as *const c_void,
                            len,
                            s1,
                        ),
                        _ => {
                            let a = cu::cuMemcpyDtoHAsync_v2(
                                (host.addr + off) as *mut c_void,
                                d + off as u64,
                                len,
                                s0,
                            );
                            if a != cu::CUresult::CUDA_SUCCESS {
                                a
                            } else {
                                cu::cuMemcpyHtoDAsync_v2(
                                    d2 + off as u64,
                                    (host2.addr + off) as *const c_void,
                                    len,
                                    s1,
                                )
                            }
                        }
                    }
                };
                check(r, "chunk copy")?;
                let mut e = std::ptr::null_mut();
                check(
                    // SAFETY: valid out-pointer; context current.
                    unsafe {
                        cu::cuEventCreate(&mut e, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
                    },
                    "cuEventCreate",
                )?;
                check(
                    // SAFETY: live event and stream.
                    unsafe { cu::cuEventRecord(e, if dir == 1 { s1 } else { s0 }) },
                    "cuEventRecord",
                )?;
                ev.push(e);
                off += len;
            }
            Ok(())
        };
        let staged_d2h = gbs(time(&mut || chunked(0, &mut events))?);
        let staged_h2d = gbs(time(&mut || chunked(1, &mut events))?);
        let staged_both = gbs(time(&mut || chunked(2, &mut events))?);
        for e in events {
            // SAFETY: events created above; their streams were synchronised.
            unsafe {
                cu::cuEventDestroy_v2(e);
            }
        }
        for s in streams {
            // SAFETY: streams created above, idle.
            unsafe {
                cu::cuStreamDestroy_v2(s);
            }
        }
        // SAFETY: allocated above, idle.
        unsafe {
            cu::cuMemFree_v2(d2);
        }
        Ok(StagingFigures {
            plain_d2h,
            plain_h2d,
            staged_d2h,
            staged_h2d,
            staged_both,
        })
    })();
    // SAFETY: allocated above; every stream using it was synchronised.
    unsafe {
        cu::cuMemFree_v2(d);
    }
    result
}

// ---------------------------------------------------------------- device memory for tools

/// A device allocation for tools and tests (benchmarks fill and read tensors with it).
#[derive(Debug)]
pub struct DeviceMem {
    ptr: u64,
    bytes: usize,
    device: i32,
}

/// Make the primary context of `device` current on the calling thread.
fn make_current(device: i32) -> Result<(), String> {
    let gpus = probe()?;
    if device < 0 || device as usize >= gpus.len() {
        return Err(format!(
            "device {device} does not exist ({} GPUs)",
            gpus.len()
        ));
    }
    let mut dev = 0;
    let mut ctx = std::ptr::null_mut();
    // SAFETY: probe() initialised the driver; valid out-pointer; an existing ordinal.
    check(unsafe { cu::cuDeviceGet(&mut dev, device) }, "cuDeviceGet")?;
    check(
        // SAFETY: valid out-pointer.
        unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
    )?;
    // SAFETY: the retained primary context.
    check(unsafe { cu::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")
}

impl DeviceMem {
    /// Allocate `bytes` bytes on `device` (its primary context becomes current on this
    /// thread).
    ///
    /// # Errors
    /// No such GPU, out of memory.
    pub fn alloc(device: i32, bytes: usize) -> Result<DeviceMem, String> {
        make_current(device)?;
        let mut p = 0;
        check(
            // SAFETY: valid out-pointer; context current.
            unsafe { cu::cuMemAlloc_v2(&mut p, bytes.max(1)) },
            "cuMemAlloc",
        )?;
        Ok(DeviceMem {
            ptr: p,
            bytes,
            device,
        })
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The whole allocation as a tensor of `dtype` (produced on the legacy default stream).
    pub fn buf(&self, dtype: DType) -> DeviceBuf {
        DeviceBuf {
            ptr: self.ptr,
            device: self.device,
            bytes: self.bytes,
            dtype,
            stream: 0,
        }
    }

    /// Copy `src` to the start of the allocation (synchronously).
    ///
    /// # Errors
    /// `src` longer than the allocation; a CUDA failure.
    pub fn upload(&self, src: &[u8]) -> Result<(), String> {
        if src.len() > self.bytes {
            return Err(format!(
                "upload of {} bytes into {} bytes",
                src.len(),
                self.bytes
            ));
        }
        make_current(self.device)?;
        check(
            // SAFETY: the allocation holds at least src.len() bytes; synchronous copy.
            unsafe { cu::cuMemcpyHtoD_v2(self.ptr, src.as_ptr() as *const c_void, src.len()) },
            "cuMemcpyHtoD",
        )
    }

    /// Copy the start of the allocation into `dst` (synchronously, after all work on the
    /// device).
    ///
    /// # Errors
    /// `dst` longer than the allocation; a CUDA failure.
    pub fn download(&self, dst: &mut [u8]) -> Result<(), String> {
        if dst.len() > self.bytes {
            return Err(format!(
                "download of {} bytes from {} bytes",
                dst.len(),
                self.bytes
            ));
        }
        make_current(self.device)?;
        // SAFETY: context current.
        check(unsafe { cu::cuCtxSynchronize() }, "cuCtxSynchronize")?;
        check(
            // SAFETY: the allocation holds at least dst.len() bytes; synchronous copy.
            unsafe { cu::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, self.ptr, dst.len()) },
            "cuMemcpyDtoH",
        )
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        if make_current(self.device).is_ok() {
            // SAFETY: allocated by alloc(); the owner finished every use (operations on it
            // completed before the owner dropped it).
            unsafe {
                cu::cuMemFree_v2(self.ptr);
            }
        }
    }
}
