//! `bps._native`: the native half of the `bps` Python package (`bps`, `bps.torch`, `bps.mxnet`
//! and the `byteps.*` aliases live in `python/`).
//!
//! A thin layer over the public API of `bps_runtime`, as the C ABI is: one process-global
//! instance started by `init()` (configured from the environment like every bps worker) and
//! stopped by `shutdown()`, asynchronous push_pull and broadcast on caller-owned memory given
//! as raw addresses, and a table of pending operations addressed by integer ids.
//!
//! What it does not do: it knows no framework (the Python modules turn tensors into addresses),
//! it does not run servers or schedulers (`bps-launch` does), and it does not copy buffers.
//!
//! GPU memory goes through `push_pull_device_async` / `broadcast_device_async` (device
//! address, CUDA device ordinal, and the CUDA stream whose work produces the data: the runtime
//! orders its own work after it). In a build without CUDA, or on a machine without a usable
//! GPU, they raise `UnsupportedError` saying why; `cuda_built()` and `gpus()` ask beforehand.
//!
//! Memory contract of the `*_async` functions: the caller guarantees that the addresses are
//! valid for `nbytes` bytes. The module keeps the object passed as `keep` (the tensors) alive
//! in its table until the operation is waited on, so the memory cannot be freed while the
//! runtime may still read or write it; the table entry (and the reference) goes away only once
//! the operation has finished and `wait` reported it (or `release` was called on a finished
//! one).
//!
//! Errors are Python exceptions, all subclasses of `bps.BpsError` (a `RuntimeError`):
//! `NotInitializedError`, `ShutDownError`, `InvalidArgumentError` and `ConfigError` (also
//! `ValueError`), `MismatchError` (also `ValueError`), `PeerError` (also `ConnectionError`),
//! `BpsTimeoutError` (also `TimeoutError`), `UnsupportedError` (also `NotImplementedError`).
//! Their message is the runtime's error text.
//!
//! ```python
//! from bps import _native as n
//! n.init()
//! h = n.push_pull_async("g", n.FLOAT32, addr, addr, 4096, True, 0, keep=tensor)
//! n.wait(h)
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use bps_runtime::{Bps, DType, DeviceBuf, Error, Handle, PushPullOpts};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// The process-global instance.
enum State {
    /// `init` not called (or it failed).
    Uninit,
    /// Initialised.
    Running(Bps),
    /// `shutdown` was called.
    Down,
}

/// The instance. Held only long enough to clone the (cheap, shared) `Bps` out of it.
static STATE: Mutex<State> = Mutex::new(State::Uninit);
/// Serialises `init` and `shutdown`, which may block for the rendezvous or the job's end; taken
/// only with the GIL released, and the other calls never take it.
static LIFECYCLE: Mutex<()> = Mutex::new(());

/// A pending (or finished, not yet waited on) operation.
struct Op {
    handle: Handle,
    /// What keeps the operation's memory alive (the tensors): never read, only held until the
    /// entry is dropped.
    _keep: Option<Py<PyAny>>,
}

/// Operations by id. Never locked across a GIL release nor while a Python object is dropped.
static OPS: LazyLock<Mutex<HashMap<u64, Op>>> = LazyLock::new(|| Mutex::new(HashMap::new()));
/// Ids of this module's operations: unique over the process's life (across re-inits).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Slice of a wait between checks for Python signals (Ctrl-C).
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// A poisoned lock only means a panic was caught while it was held; the state it guards is
/// always left consistent (single assignments and map operations), so carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The exception classes, created at module import.
struct Exceptions {
    base: Py<PyType>,
    not_initialized: Py<PyType>,
    shut_down: Py<PyType>,
    invalid: Py<PyType>,
    config: Py<PyType>,
    mismatch: Py<PyType>,
    peer: Py<PyType>,
    timeout: Py<PyType>,
    unsupported: Py<PyType>,
}

static EXC: PyOnceLock<Exceptions> = PyOnceLock::new();

/// Which exception class a failure gets.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Base,
    NotInitialized,
    ShutDown,
    Invalid,
    Config,
    Mismatch,
    Peer,
    Timeout,
    Unsupported,
}

fn kind_of(e: &Error) -> Kind {
    match e {
        Error::Config { .. } => Kind::Config,
        Error::InvalidArgument(_) => Kind::Invalid,
        Error::NotInitialized => Kind::NotInitialized,
        Error::ShutDown => Kind::ShutDown,
        Error::Mismatch { .. } => Kind::Mismatch,
        Error::Peer { .. } | Error::Rendezvous { .. } | Error::Transport(_) => Kind::Peer,
        Error::Timeout { .. } => Kind::Timeout,
        Error::Unsupported(_) => Kind::Unsupported,
        Error::Abandoned => Kind::Base,
    }
}

/// A Python exception of class `kind` with `msg`.
fn py_err(py: Python<'_>, kind: Kind, msg: String) -> PyErr {
    let Some(x) = EXC.get(py) else {
        // Only reachable if the module failed to initialise, which Python reports itself.
        return pyo3::exceptions::PyRuntimeError::new_err(msg);
    };
    let ty = match kind {
        Kind::Base => &x.base,
        Kind::NotInitialized => &x.not_initialized,
        Kind::ShutDown => &x.shut_down,
        Kind::Invalid => &x.invalid,
        Kind::Config => &x.config,
        Kind::Mismatch => &x.mismatch,
        Kind::Peer => &x.peer,
        Kind::Timeout => &x.timeout,
        Kind::Unsupported => &x.unsupported,
    };
    PyErr::from_type(ty.bind(py).clone(), msg)
}

/// The runtime error `e` of call `func` as a Python exception.
fn rt_err(py: Python<'_>, func: &str, e: &Error) -> PyErr {
    py_err(py, kind_of(e), format!("{func}: {e}"))
}

/// The running instance, or NotInitializedError / ShutDownError.
fn instance(py: Python<'_>, func: &str) -> PyResult<Bps> {
    match &*lock(&STATE) {
        State::Running(b) => Ok(b.clone()),
        State::Uninit => Err(py_err(
            py,
            Kind::NotInitialized,
            format!("{func}: bps is not initialised: call bps.init() first"),
        )),
        State::Down => Err(py_err(
            py,
            Kind::ShutDown,
            format!(
                "{func}: bps was shut down (bps.shutdown()); call bps.init() to join a new job"
            ),
        )),
    }
}

fn dtype_arg(py: Python<'_>, func: &str, code: i64) -> PyResult<DType> {
    u8::try_from(code)
        .ok()
        .and_then(DType::from_u8)
        .ok_or_else(|| {
            py_err(
                py,
                Kind::Invalid,
                format!("{func}: {code} is not a dtype code (FLOAT32 = 0 ... UINT8 = 6)"),
            )
        })
}

/// Install a log subscriber for the runtime's messages (stderr; filter from BPS_LOG, else
/// RUST_LOG, else warn). Once per process; a subscriber installed by someone else wins.
fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("BPS_LOG")
            .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
            .unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    });
}

/// Start bps in this process from the environment (BytePS, torchrun or bps variables). Blocks
/// (without the GIL) until every worker and server of the job registered, at most BPS_TIMEOUT.
/// Returns True if this call started it, False if it was already running. After `shutdown` it
/// starts a fresh instance, which needs a fresh job to join.
#[pyfunction]
fn init(py: Python<'_>) -> PyResult<bool> {
    init_logging();
    let r = py.detach(|| -> Result<bool, Error> {
        let _life = lock(&LIFECYCLE);
        if matches!(*lock(&STATE), State::Running(_)) {
            return Ok(false);
        }
        let b = bps_runtime::init()?;
        *lock(&STATE) = State::Running(b);
        Ok(true)
    });
    r.map_err(|e| rt_err(py, "bps.init", &e))
}

/// Leave the job: waits (without the GIL) until every worker left, so colocated servers finish
/// serving, fails whatever is still pending with ShutDownError and stops bps's threads.
/// Idempotent; does nothing if bps was never initialised.
#[pyfunction]
fn shutdown(py: Python<'_>) -> PyResult<()> {
    let r = py.detach(|| -> Result<(), Error> {
        let _life = lock(&LIFECYCLE);
        let b = {
            let mut st = lock(&STATE);
            match std::mem::replace(&mut *st, State::Down) {
                State::Running(b) => b,
                State::Down => return Ok(()),
                State::Uninit => {
                    *st = State::Uninit;
                    return Ok(());
                }
            }
        };
        b.shutdown()
    });
    r.map_err(|e| rt_err(py, "bps.shutdown", &e))
}

/// Whether bps runs in this process (init succeeded, no shutdown since).
#[pyfunction]
fn is_initialized() -> bool {
    matches!(*lock(&STATE), State::Running(_))
}

/// This worker's rank, 0 ..= size() - 1.
#[pyfunction]
fn rank(py: Python<'_>) -> PyResult<u32> {
    Ok(instance(py, "bps.rank")?.rank())
}

/// Number of workers in the job.
#[pyfunction]
fn size(py: Python<'_>) -> PyResult<u32> {
    Ok(instance(py, "bps.size")?.size())
}

/// This worker's rank among the workers of its host.
#[pyfunction]
fn local_rank(py: Python<'_>) -> PyResult<u32> {
    Ok(instance(py, "bps.local_rank")?.local_rank())
}

/// Number of workers on this host.
#[pyfunction]
fn local_size(py: Python<'_>) -> PyResult<u32> {
    Ok(instance(py, "bps.local_size")?.local_size())
}

/// Number of server processes (0: the workers serve the keys themselves).
#[pyfunction]
fn num_servers(py: Python<'_>) -> PyResult<u32> {
    Ok(instance(py, "bps.num_servers")?.num_servers())
}

/// Declare a tensor by name; returns its id (declaration order). Declaring again returns the
/// same id. Every worker must declare the same tensors in the same order.
#[pyfunction]
fn declare(py: Python<'_>, name: &str) -> PyResult<u32> {
    instance(py, "bps.declare")?
        .declare(name)
        .map_err(|e| rt_err(py, "bps.declare", &e))
}

/// Put a started operation in the table; returns its id.
fn track(handle: Handle, keep: Option<Py<PyAny>>) -> u64 {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock(&OPS).insert(
        id,
        Op {
            handle,
            _keep: keep,
        },
    );
    id
}

fn handle_of(py: Python<'_>, func: &str, id: u64) -> PyResult<Handle> {
    match lock(&OPS).get(&id) {
        Some(op) => Ok(op.handle.clone()),
        None => Err(py_err(
            py,
            Kind::Invalid,
            format!("{func}: no operation with handle {id} (already waited on, or never started)"),
        )),
    }
}

/// Drop the entry of `id` (and with it the references that kept its memory alive). The lock
/// is released before the Python objects are dropped.
fn forget(id: u64) {
    let op = lock(&OPS).remove(&id);
    drop(op);
}

/// Start a push_pull: sum `nbytes` bytes of dtype `dtype` at address `in_ptr` across all
/// workers into address `out_ptr` (may equal `in_ptr`: in place), divided by the number of
/// workers if `average`. Returns the handle id at once.
///
/// The caller guarantees both addresses are valid for `nbytes` bytes and untouched until the
/// operation is waited on; `keep` (e.g. the tensors) is referenced until then so the memory
/// stays alive.
#[pyfunction]
#[pyo3(signature = (name, dtype, in_ptr, out_ptr, nbytes, average=true, priority=0, keep=None))]
#[allow(clippy::too_many_arguments)]
fn push_pull_async(
    py: Python<'_>,
    name: &str,
    dtype: i64,
    in_ptr: usize,
    out_ptr: usize,
    nbytes: usize,
    average: bool,
    priority: i32,
    keep: Option<Py<PyAny>>,
) -> PyResult<u64> {
    const F: &str = "bps.push_pull_async";
    let b = instance(py, F)?;
    let dt = dtype_arg(py, F, dtype)?;
    let opts = PushPullOpts { average, priority };
    // SAFETY: the caller (the bps Python package) passes the data addresses of live tensors of
    // at least `nbytes` bytes and does not touch them until the operation is waited on; `keep`
    // holds those tensors in the table until then, so the memory outlives the operation.
    let h = unsafe {
        b.push_pull_raw(
            name,
            dt,
            in_ptr as *const u8,
            out_ptr as *mut u8,
            nbytes,
            opts,
        )
    }
    .map_err(|e| rt_err(py, F, &e))?;
    Ok(track(h, keep))
}

/// Start a broadcast: every worker gets the `root` worker's `nbytes` bytes at address `ptr`
/// (in place). Returns the handle id at once. Memory contract as `push_pull_async`.
#[pyfunction]
#[pyo3(signature = (name, dtype, ptr, nbytes, root=0, priority=0, keep=None))]
#[allow(clippy::too_many_arguments)]
fn broadcast_async(
    py: Python<'_>,
    name: &str,
    dtype: i64,
    ptr: usize,
    nbytes: usize,
    root: u32,
    priority: i32,
    keep: Option<Py<PyAny>>,
) -> PyResult<u64> {
    const F: &str = "bps.broadcast_async";
    let b = instance(py, F)?;
    let dt = dtype_arg(py, F, dtype)?;
    // SAFETY: as in push_pull_async: a live buffer of `nbytes` bytes kept alive by `keep` in
    // the table until the operation is waited on.
    let h = unsafe { b.broadcast_raw(name, dt, ptr as *mut u8, nbytes, root, priority) }
        .map_err(|e| rt_err(py, F, &e))?;
    Ok(track(h, keep))
}

/// Whether operation `id` finished (successfully or not). One atomic load on the handle; the
/// outcome is reported by `wait`.
#[pyfunction]
fn poll(py: Python<'_>, id: u64) -> PyResult<bool> {
    Ok(handle_of(py, "bps.poll", id)?.status().is_finished())
}

/// Wait for operation `id` without holding the GIL; raises its error. `timeout` in seconds
/// (None: until it finishes; the runtime fails it within BPS_TIMEOUT if a peer is silent). If
/// it is still pending after `timeout`, BpsTimeoutError is raised and the operation stays
/// pending (wait again later). Ctrl-C interrupts the wait, not the operation. Once it returned
/// or raised the operation's outcome, the id is forgotten.
#[pyfunction]
#[pyo3(signature = (id, timeout=None))]
fn wait(py: Python<'_>, id: u64, timeout: Option<f64>) -> PyResult<()> {
    const F: &str = "bps.wait";
    let h = handle_of(py, F, id)?;
    let deadline = match timeout {
        None => None,
        Some(t) if t.is_finite() && t >= 0.0 => {
            Instant::now().checked_add(Duration::from_secs_f64(t))
        }
        Some(t) => {
            return Err(py_err(
                py,
                Kind::Invalid,
                format!("{F}: timeout must be a number of seconds >= 0 or None, got {t}"),
            ))
        }
    };
    loop {
        // Fast path: already finished (no GIL release).
        let outcome = match h.result() {
            Some(r) => Some(r.map_err(Clone::clone)),
            None => {
                let slice = match deadline {
                    None => WAIT_SLICE,
                    Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_SLICE),
                };
                let h2 = h.clone();
                py.detach(move || h2.wait_timeout(slice).map(|r| r.map_err(Clone::clone)))
            }
        };
        match outcome {
            Some(r) => {
                forget(id);
                return r.map_err(|e| rt_err(py, F, &e));
            }
            None => {
                py.check_signals()?;
                if let Some(d) = deadline {
                    if Instant::now() >= d {
                        return Err(py_err(
                            py,
                            Kind::Timeout,
                            format!(
                                "{F}: operation {id} still pending after {:.3} s (it keeps running; wait again)",
                                timeout.unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
        }
    }
}

/// Forget a finished operation without waiting on it (its outcome is dropped). Raises
/// InvalidArgumentError if it is still pending: its memory must stay referenced until it ends.
#[pyfunction]
fn release(py: Python<'_>, id: u64) -> PyResult<()> {
    const F: &str = "bps.release";
    let h = handle_of(py, F, id)?;
    if !h.status().is_finished() {
        return Err(py_err(
            py,
            Kind::Invalid,
            format!("{F}: operation {id} is still pending; wait on it first"),
        ));
    }
    forget(id);
    Ok(())
}

/// Number of operations in the table (pending, or finished and not waited on).
#[pyfunction]
fn pending_count() -> usize {
    lock(&OPS).len()
}

/// Synchronous push_pull (start and wait without the GIL, no table entry): the shortest path
/// for callers that block anyway. Memory contract as `push_pull_async`, for the duration of
/// the call.
#[pyfunction]
#[pyo3(signature = (name, dtype, in_ptr, out_ptr, nbytes, average=true, priority=0))]
#[allow(clippy::too_many_arguments)]
fn push_pull(
    py: Python<'_>,
    name: &str,
    dtype: i64,
    in_ptr: usize,
    out_ptr: usize,
    nbytes: usize,
    average: bool,
    priority: i32,
) -> PyResult<()> {
    const F: &str = "bps.push_pull";
    let b = instance(py, F)?;
    let dt = dtype_arg(py, F, dtype)?;
    let opts = PushPullOpts { average, priority };
    // SAFETY: the caller passes addresses valid for `nbytes` bytes and holds the objects that
    // own them for the whole call; the call returns only after the operation finished (the
    // wait below never gives up early).
    let h = unsafe {
        b.push_pull_raw(
            name,
            dt,
            in_ptr as *const u8,
            out_ptr as *mut u8,
            nbytes,
            opts,
        )
    }
    .map_err(|e| rt_err(py, F, &e))?;
    wait_done(py, F, h)
}

/// Synchronous broadcast from `root` (in place); as `push_pull`.
#[pyfunction]
#[pyo3(signature = (name, dtype, ptr, nbytes, root=0, priority=0))]
#[allow(clippy::too_many_arguments)]
fn broadcast(
    py: Python<'_>,
    name: &str,
    dtype: i64,
    ptr: usize,
    nbytes: usize,
    root: u32,
    priority: i32,
) -> PyResult<()> {
    const F: &str = "bps.broadcast";
    let b = instance(py, F)?;
    let dt = dtype_arg(py, F, dtype)?;
    // SAFETY: as in push_pull: valid memory held by the caller for the whole call, which ends
    // only once the operation finished.
    let h = unsafe { b.broadcast_raw(name, dt, ptr as *mut u8, nbytes, root, priority) }
        .map_err(|e| rt_err(py, F, &e))?;
    wait_done(py, F, h)
}

/// Wait until `h` finished, without the GIL. Never returns before the operation ended (the
/// caller's memory is in use until then).
fn wait_done(py: Python<'_>, func: &str, h: Handle) -> PyResult<()> {
    let r = match h.result() {
        Some(r) => r.map_err(Clone::clone),
        None => py.detach(|| h.wait().map_err(Clone::clone)),
    };
    r.map_err(|e| rt_err(py, func, &e))
}

/// Block (without the GIL) until every worker reached the barrier.
#[pyfunction]
fn barrier(py: Python<'_>) -> PyResult<()> {
    let b = instance(py, "bps.barrier")?;
    py.detach(|| b.barrier())
        .map_err(|e| rt_err(py, "bps.barrier", &e))
}

/// Size in bytes of one element of dtype code `dtype`.
#[pyfunction]
fn dtype_size(py: Python<'_>, dtype: i64) -> PyResult<usize> {
    Ok(dtype_arg(py, "bps.dtype_size", dtype)?.size())
}

/// Short name ("f32", ...) of dtype code `dtype`.
#[pyfunction]
fn dtype_name(py: Python<'_>, dtype: i64) -> PyResult<&'static str> {
    Ok(dtype_arg(py, "bps.dtype_name", dtype)?.name())
}

/// The GPU memory of a device call, checked.
#[allow(clippy::too_many_arguments)]
fn device_buf(
    py: Python<'_>,
    func: &str,
    ptr: usize,
    device: i32,
    nbytes: usize,
    dtype: i64,
    stream: usize,
) -> PyResult<DeviceBuf> {
    let dtype = dtype_arg(py, func, dtype)?;
    if device < 0 {
        return Err(py_err(
            py,
            Kind::Invalid,
            format!("{func}: device {device} is negative (a CUDA device ordinal)"),
        ));
    }
    Ok(DeviceBuf {
        ptr: ptr as u64,
        device,
        bytes: nbytes,
        dtype,
        stream: stream as u64,
    })
}

/// Start a push_pull of GPU memory, in place: sum `nbytes` bytes of dtype `dtype` at device
/// address `ptr` on CUDA device `device` across all workers, divided by the number of workers
/// if `average`. `stream` is the CUDA stream (`cudaStream_t` as an int; 0 = the legacy default
/// stream) whose queued work produces the data: the runtime orders its work after it, so the
/// caller need not synchronise. Returns the handle id at once; once `wait` returned, the
/// result is in place and every GPU operation bps made on it has finished (any stream may use
/// it). No host copy of the data is made here.
///
/// Raises UnsupportedError (saying why) in a build without CUDA or on a machine without a
/// usable GPU. Memory contract as `push_pull_async`: the memory stays untouched (by every
/// stream) until the operation is waited on, and `keep` (the tensor) holds it alive until then.
/// The submission runs without the GIL (the first one starts the GPU engine).
#[pyfunction]
#[pyo3(signature = (name, ptr, device, nbytes, dtype, stream=0, average=true, priority=0, keep=None))]
#[allow(clippy::too_many_arguments)]
fn push_pull_device_async(
    py: Python<'_>,
    name: &str,
    ptr: usize,
    device: i32,
    nbytes: usize,
    dtype: i64,
    stream: usize,
    average: bool,
    priority: i32,
    keep: Option<Py<PyAny>>,
) -> PyResult<u64> {
    const F: &str = "bps.push_pull_device_async";
    let b = instance(py, F)?;
    let buf = device_buf(py, F, ptr, device, nbytes, dtype, stream)?;
    let opts = PushPullOpts { average, priority };
    // SAFETY: the caller (the bps Python package) passes the device address of a live CUDA
    // tensor of at least `nbytes` bytes on `device` and a live stream of that device (its
    // current stream), and touches the tensor on no stream until the operation is waited on;
    // `keep` holds the tensor in the table until then, so the memory outlives the operation.
    let r = py.detach(|| unsafe { b.push_pull_device(name, buf, opts) });
    let h = r.map_err(|e| rt_err(py, F, &e))?;
    Ok(track(h, keep))
}

/// Start a broadcast of GPU memory from worker `root` (in place). Arguments, stream, memory
/// contract and errors as `push_pull_device_async`.
#[pyfunction]
#[pyo3(signature = (name, ptr, device, nbytes, dtype, stream=0, root=0, priority=0, keep=None))]
#[allow(clippy::too_many_arguments)]
fn broadcast_device_async(
    py: Python<'_>,
    name: &str,
    ptr: usize,
    device: i32,
    nbytes: usize,
    dtype: i64,
    stream: usize,
    root: u32,
    priority: i32,
    keep: Option<Py<PyAny>>,
) -> PyResult<u64> {
    const F: &str = "bps.broadcast_device_async";
    let b = instance(py, F)?;
    let buf = device_buf(py, F, ptr, device, nbytes, dtype, stream)?;
    // SAFETY: as in push_pull_device_async: a live CUDA tensor of `nbytes` bytes on `device`
    // kept alive by `keep` in the table until the operation is waited on, a live stream.
    let r = py.detach(|| unsafe { b.broadcast_device(name, buf, root, priority) });
    let h = r.map_err(|e| rt_err(py, F, &e))?;
    Ok(track(h, keep))
}

/// Whether this build has the CUDA path (GPU memory in the `*_device_async` functions). A
/// build with it still starts without a GPU; `gpus()` says whether this machine has one.
#[pyfunction]
fn cuda_built() -> bool {
    bps_runtime::gpu::compiled()
}

/// The GPUs this process can use, as dicts (index, name, memory in bytes, pci_bus_id).
/// Raises UnsupportedError saying why there is none usable (a build without CUDA, no driver,
/// no device).
#[pyfunction]
fn gpus(py: Python<'_>) -> PyResult<Vec<Py<PyDict>>> {
    const F: &str = "bps.gpus";
    let b = instance(py, F)?;
    let list = py
        .detach(|| b.gpus())
        .map_err(|why| py_err(py, Kind::Unsupported, format!("{F}: no usable GPU: {why}")))?;
    list.into_iter()
        .map(|g| {
            let d = PyDict::new(py);
            d.set_item("index", g.index)?;
            d.set_item("name", g.name)?;
            d.set_item("memory", g.memory)?;
            d.set_item("pci_bus_id", g.pci_bus_id)?;
            Ok(d.unbind())
        })
        .collect()
}

/// Create `bps.<name>(bases...)` with a docstring.
fn new_exc<'py>(
    py: Python<'py>,
    name: &str,
    bases: Vec<Bound<'py, PyAny>>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "bps")?;
    ns.set_item("__doc__", doc)?;
    let ty = py
        .get_type::<PyType>()
        .call1((name, PyTuple::new(py, bases)?, ns))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

fn make_exceptions(py: Python<'_>) -> PyResult<Exceptions> {
    use pyo3::exceptions::{
        PyConnectionError, PyNotImplementedError, PyRuntimeError, PyTimeoutError, PyValueError,
    };
    let rt = py.get_type::<PyRuntimeError>().into_any();
    let base = new_exc(
        py,
        "BpsError",
        vec![rt],
        "Base class of every error bps raises; the message is the runtime's error text.",
    )?;
    let b = || base.bind(py).clone().into_any();
    let value = || py.get_type::<PyValueError>().into_any();
    Ok(Exceptions {
        not_initialized: new_exc(
            py,
            "NotInitializedError",
            vec![b()],
            "bps.init() was not called.",
        )?,
        shut_down: new_exc(py, "ShutDownError", vec![b()], "bps was shut down.")?,
        invalid: new_exc(
            py,
            "InvalidArgumentError",
            vec![b(), value()],
            "A call's arguments are wrong.",
        )?,
        config: new_exc(
            py,
            "ConfigError",
            vec![b(), value()],
            "An environment variable has a value that is not allowed.",
        )?,
        mismatch: new_exc(
            py,
            "MismatchError",
            vec![b(), value()],
            "A tensor is used inconsistently across workers or calls (size, dtype, order).",
        )?,
        peer: new_exc(
            py,
            "PeerError",
            vec![b(), py.get_type::<PyConnectionError>().into_any()],
            "A peer died or refused, the rendezvous failed, or the transport failed.",
        )?,
        timeout: new_exc(
            py,
            "BpsTimeoutError",
            vec![b(), py.get_type::<PyTimeoutError>().into_any()],
            "No answer within BPS_TIMEOUT, or a wait with a timeout expired.",
        )?,
        unsupported: new_exc(
            py,
            "UnsupportedError",
            vec![b(), py.get_type::<PyNotImplementedError>().into_any()],
            "Something this build or machine cannot do (e.g. CUDA tensors without CUDA or \
             without a usable GPU); the message says why.",
        )?,
        base,
    })
}

/// The native module `bps._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let x = EXC.get_or_try_init(py, || make_exceptions(py))?;
    m.add("BpsError", x.base.clone_ref(py))?;
    m.add("NotInitializedError", x.not_initialized.clone_ref(py))?;
    m.add("ShutDownError", x.shut_down.clone_ref(py))?;
    m.add("InvalidArgumentError", x.invalid.clone_ref(py))?;
    m.add("ConfigError", x.config.clone_ref(py))?;
    m.add("MismatchError", x.mismatch.clone_ref(py))?;
    m.add("PeerError", x.peer.clone_ref(py))?;
    m.add("BpsTimeoutError", x.timeout.clone_ref(py))?;
    m.add("UnsupportedError", x.unsupported.clone_ref(py))?;
    for d in DType::ALL {
        let n = match d {
            DType::F32 => "FLOAT32",
            DType::F64 => "FLOAT64",
            DType::F16 => "FLOAT16",
            DType::BF16 => "BFLOAT16",
            DType::I32 => "INT32",
            DType::I64 => "INT64",
            DType::U8 => "UINT8",
        };
        m.add(n, d.to_u8())?;
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_function(wrap_pyfunction!(shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(is_initialized, m)?)?;
    m.add_function(wrap_pyfunction!(rank, m)?)?;
    m.add_function(wrap_pyfunction!(size, m)?)?;
    m.add_function(wrap_pyfunction!(local_rank, m)?)?;
    m.add_function(wrap_pyfunction!(local_size, m)?)?;
    m.add_function(wrap_pyfunction!(num_servers, m)?)?;
    m.add_function(wrap_pyfunction!(declare, m)?)?;
    m.add_function(wrap_pyfunction!(push_pull_async, m)?)?;
    m.add_function(wrap_pyfunction!(broadcast_async, m)?)?;
    m.add_function(wrap_pyfunction!(poll, m)?)?;
    m.add_function(wrap_pyfunction!(wait, m)?)?;
    m.add_function(wrap_pyfunction!(release, m)?)?;
    m.add_function(wrap_pyfunction!(pending_count, m)?)?;
    m.add_function(wrap_pyfunction!(push_pull, m)?)?;
    m.add_function(wrap_pyfunction!(broadcast, m)?)?;
    m.add_function(wrap_pyfunction!(barrier, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_size, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_name, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_built, m)?)?;
    m.add_function(wrap_pyfunction!(gpus, m)?)?;
    m.add_function(wrap_pyfunction!(push_pull_device_async, m)?)?;
    m.add_function(wrap_pyfunction!(broadcast_device_async, m)?)?;
    Ok(())
}
