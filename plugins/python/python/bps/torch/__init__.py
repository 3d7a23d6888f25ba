"""bps for PyTorch, with BytePS's ``byteps.torch`` API.

::

    import bps.torch as bps            # or: import byteps.torch as bps
    bps.init()
    model = ...
    optimizer = bps.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    bps.broadcast_parameters(model.state_dict(), root_rank=0)
    bps.broadcast_optimizer_state(optimizer, root_rank=0)
    for batch in data:
        optimizer.zero_grad(); loss(model(batch)).backward(); optimizer.step()

Tensors must be contiguous, of a dtype bps sums (float32, float64, float16, bfloat16, int32,
int64, uint8), on the CPU or on a CUDA device. Operations are zero-copy: the runtime reads and
writes the tensor's memory directly, and the tensors are kept alive until the operation is
synchronized.

CUDA tensors (in a build with CUDA, :func:`bps.cuda_built`) go to the runtime's GPU path as they
are: its device address, its device, and the *current stream* of its device
(``torch.cuda.current_stream(tensor.device)``). The runtime orders its work after what is
queued on that stream when the call is made, so a gradient produced by a kernel still running
needs no ``torch.cuda.synchronize()``; no host copy of the tensor is made by the plugin (the
reduction among one host's GPUs stays on the devices; only what crosses hosts is staged through
pinned host memory by the runtime). When :func:`synchronize` returns, the result is in the
tensor and every GPU operation bps made on it has finished, so any stream may use it. Each
process uses one GPU (``torch.cuda.set_device(bps.local_rank())``). The out-of-place forms
(:func:`push_pull_async`, :func:`broadcast_async`) first copy the input into the new tensor on
the current stream (device to device), since the GPU path works in place. Without CUDA support,
or on a machine without a usable GPU, CUDA tensors raise :class:`UnsupportedError` saying why.
"""

import collections
import contextlib
import itertools
import pickle

import torch

from .. import _native
from .. import (  # noqa: F401  (re-exported, as byteps.torch does)
    BpsError,
    BpsTimeoutError,
    ConfigError,
    DtypeError,
    InvalidArgumentError,
    MismatchError,
    NotInitializedError,
    PeerError,
    ShutDownError,
    UnsupportedError,
    barrier,
    cuda_built,
    declare,
    gpus,
    init,
    is_initialized,
    local_rank,
    local_size,
    num_servers,
    rank,
    resume,
    shutdown,
    size,
    suspend,
)
from .compression import Compression, Compressor, FP16Compressor, NoneCompressor  # noqa: F401

__all__ = [
    "init",
    "shutdown",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "declare",
    "barrier",
    "push_pull",
    "push_pull_async",
    "push_pull_inplace",
    "push_pull_async_inplace",
    "broadcast",
    "broadcast_",
    "broadcast_async",
    "broadcast_async_",
    "poll",
    "synchronize",
    "DistributedOptimizer",
    "broadcast_parameters",
    "broadcast_optimizer_state",
    "broadcast_object",
    "Compression",
]

_DTYPE_CODES = {
    torch.float32: _native.FLOAT32,
    torch.float64: _native.FLOAT64,
    torch.float16: _native.FLOAT16,
    torch.bfloat16: _native.BFLOAT16,
    torch.int32: _native.INT32,
    torch.int64: _native.INT64,
    torch.uint8: _native.UINT8,
}
_SUPPORTED = "torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8"

# Pending operations: handle id -> (result tensor, finishing function or None). The native
# table holds the tensors' references until the operation is waited on.
_handles = {}
# Per-process counters for default names: identical on every worker as long as every worker
# makes the same sequence of calls (as in BytePS).
_noname_counter = itertools.count()
_bcast_noname_counter = itertools.count()
_object_counter = itertools.count()


def _check_device(tensor, op):
    """Raise UnsupportedError unless ``tensor`` is on the CPU or (in a build with CUDA) on a
    CUDA device."""
    kind = tensor.device.type
    if kind == "cpu":
        return
    if kind != "cuda":
        raise UnsupportedError(
            "bps.torch.%s: tensor is on device %s, but bps works on CPU and CUDA tensors only; "
            "move it with .cpu() first" % (op, tensor.device)
        )
    if not _native.cuda_built():
        raise UnsupportedError(
            "bps.torch.%s: tensor is on %s, but this build of bps has no CUDA support (it was "
            "built without the `cuda` feature); move it to the CPU with .cpu() first, or use a "
            "build with CUDA" % (op, tensor.device)
        )


def _check(tensor, op):
    """Raise a clear error unless ``tensor`` is a tensor the runtime can work on."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError("bps.torch.%s: expected a torch.Tensor, got %s" % (op, type(tensor).__name__))
    _check_device(tensor, op)
    if tensor.layout != torch.strided:
        raise InvalidArgumentError(
            "bps.torch.%s: %s tensors are not supported; convert with .to_dense()" % (op, tensor.layout)
        )
    if tensor.dtype not in _DTYPE_CODES:
        raise DtypeError(
            "bps.torch.%s: unsupported dtype %s; bps supports %s" % (op, tensor.dtype, _SUPPORTED)
        )
    if not tensor.is_contiguous():
        raise InvalidArgumentError(
            "bps.torch.%s: tensor of shape %s is not contiguous (strides %s); call .contiguous() "
            "on it first" % (op, tuple(tensor.shape), tuple(tensor.stride()))
        )


def _nbytes(tensor):
    return tensor.numel() * tensor.element_size()


def _push_pull_name(name):
    if name is None:
        return "PushPull.noname.%d" % next(_noname_counter)
    return str(name)


def _stream(tensor):
    """The raw handle (``cudaStream_t`` as an int, 0 = legacy default) of the current stream of
    ``tensor``'s device: the stream whose queued work produces the data."""
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _device_call(op, tensor, fn, *args):
    """Call the native GPU function ``fn``; an UnsupportedError (no usable GPU, ...) gets the
    operation and the tensor's device in front of the runtime's reason."""
    try:
        return fn(*args)
    except UnsupportedError as e:
        raise UnsupportedError("bps.torch.%s: tensor on %s: %s" % (op, tensor.device, e)) from None


def _start_push_pull(src, out, average, name, priority, op="push_pull_async"):
    """Start a push_pull of ``src`` into ``out`` (both checked, same dtype, size and device;
    the runtime works on their memory directly, autograd is not involved)."""
    name = _push_pull_name(name)
    if out.is_cuda:
        # The GPU path works in place: an out-of-place push_pull copies the input into ``out``
        # first, device to device on the current stream, which the runtime waits for.
        if out is not src:
            out.copy_(src.detach())
        h = _device_call(
            op,
            out,
            _native.push_pull_device_async,
            name,
            out.data_ptr(),
            out.device.index,
            _nbytes(out),
            _DTYPE_CODES[out.dtype],
            _stream(out),
            bool(average),
            int(priority),
            out,
        )
        _handles[h] = (out, None)
        return h
    h = _native.push_pull_async(
        name,
        _DTYPE_CODES[src.dtype],
        src.data_ptr(),
        out.data_ptr(),
        _nbytes(src),
        bool(average),
        int(priority),
        (src, out) if src is not out else src,
    )
    _handles[h] = (out, None)
    return h


def push_pull_async(tensor, average=True, name=None, version=0, priority=0):
    """Start summing ``tensor`` across all workers (averaged if ``average``) into a new tensor.

    Returns a handle for :func:`poll` and :func:`synchronize` (which returns the new tensor).
    ``tensor`` must not be modified until then (a CUDA tensor is copied into the new tensor on
    the current stream first, so later work on that stream may modify it). ``name`` identifies
    the tensor across workers (default: a per-process counter, identical on every worker making
    the same calls); ``version`` is accepted for BytePS compatibility and ignored; higher
    ``priority`` goes first.
    """
    del version
    _check(tensor, "push_pull_async")
    out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _start_push_pull(tensor, out, average, name, priority, "push_pull_async")


def push_pull_async_inplace(tensor, average=True, name=None, version=0, priority=0):
    """As :func:`push_pull_async`, writing the result into ``tensor`` itself."""
    del version
    _check(tensor, "push_pull_async_inplace")
    return _start_push_pull(tensor, tensor, average, name, priority, "push_pull_async_inplace")


class _PushPull(torch.autograd.Function):
    """push_pull as an autograd function: the gradient of a push_pull is the push_pull of the
    gradient (averaged alike)."""

    @staticmethod
    def forward(ctx, tensor, average, name, priority):
        ctx.average, ctx.name, ctx.priority = average, name, priority
        return synchronize(push_pull_async(tensor, average, name, 0, priority))

    @staticmethod
    def backward(ctx, grad_output):
        name = None if ctx.name is None else str(ctx.name) + ".grad"
        grad = synchronize(push_pull_async(grad_output.contiguous(), ctx.average, name, 0, ctx.priority))
        return grad, None, None, None


def push_pull(tensor, average=True, name=None, version=0, priority=0, compression=Compression.none):
    """Sum ``tensor`` across all workers (averaged if ``average``); returns a new tensor.

    If ``tensor`` requires gradients (and autograd is on), the result does too: its gradient
    is push_pulled back the same way. ``compression`` (e.g. ``Compression.fp16``) changes what
    travels on the wire.
    """
    del version
    if not isinstance(tensor, torch.Tensor):
        raise TypeError("bps.torch.push_pull: expected a torch.Tensor, got %s" % type(tensor).__name__)
    compressed, ctx = compression.compress(tensor)
    if compressed.requires_grad and torch.is_grad_enabled():
        _check(compressed, "push_pull")
        out = _PushPull.apply(compressed, average, name, priority)
    else:
        out = synchronize(push_pull_async(compressed, average, name, 0, priority))
    return compression.decompress(out, ctx)


def push_pull_inplace(tensor, average=True, name=None, version=0, priority=0):
    """Sum ``tensor`` across all workers (averaged if ``average``) in place; returns it."""
    return synchronize(push_pull_async_inplace(tensor, average, name, version, priority))


def _broadcast_name(name):
    if name is None:
        return "Broadcast.noname.%d" % next(_bcast_noname_counter)
    return str(name)


def _as_wire(tensor, op):
    """A contiguous tensor sharing bytes with ``tensor`` (or a copy) of a dtype the runtime
    carries, plus a function to run after the broadcast (copy back) or None. Broadcast is
    bit-exact, so any dtype goes as its bytes."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError("bps.torch.%s: expected a torch.Tensor, got %s" % (op, type(tensor).__name__))
    _check_device(tensor, op)
    t = tensor.detach()
    if t.layout != torch.strided:
        _check(t, op)
    post = None
    buf = t
    if not buf.is_contiguous():
        buf = buf.contiguous()
        post = lambda: t.copy_(buf)  # noqa: E731
    if buf.dtype not in _DTYPE_CODES:
        return buf, buf.reshape(-1).view(torch.uint8), post
    return buf, buf, post


def broadcast_async_(tensor, root_rank=0, name=None, priority=0):
    """Start replacing ``tensor`` on every worker by root_rank's (in place); returns a handle.

    Any dtype works (broadcast copies bytes); a non-contiguous tensor is broadcast through a
    contiguous copy that is written back by :func:`synchronize`. CUDA tensors go through the
    GPU path in place, after the work queued on the device's current stream.
    """
    buf, raw, post = _as_wire(tensor, "broadcast_async_")
    name = _broadcast_name(name)
    if raw.is_cuda:
        h = _device_call(
            "broadcast_async_",
            raw,
            _native.broadcast_device_async,
            name,
            raw.data_ptr(),
            raw.device.index,
            _nbytes(raw),
            _DTYPE_CODES[raw.dtype],
            _stream(raw),
            int(root_rank),
            int(priority),
            (buf, raw),
        )
        _handles[h] = (tensor, post)
        return h
    h = _native.broadcast_async(
        name, _DTYPE_CODES[raw.dtype], raw.data_ptr(), _nbytes(raw), int(root_rank), int(priority), (buf, raw)
    )
    _handles[h] = (tensor, post)
    return h


def broadcast_(tensor, root_rank=0, name=None, priority=0):
    """Replace ``tensor`` on every worker by root_rank's, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, priority))


def broadcast_async(tensor, root_rank=0, name=None, priority=0):
    """As :func:`broadcast_async_` into a new tensor (``tensor`` is left as it is)."""
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return broadcast_async_(out, root_rank, name, priority)


def broadcast(tensor, root_rank=0, name=None, priority=0):
    """root_rank's ``tensor``, on every worker, as a new tensor."""
    return synchronize(broadcast_async(tensor, root_rank, name, priority))


def poll(handle):
    """Whether the operation of ``handle`` finished (then :func:`synchronize` returns at once)."""
    return _native.poll(handle)


def synchronize(handle):
    """Wait for the operation of ``handle`` (without holding the GIL) and return its output
    tensor. Raises the operation's error (a :class:`BpsError`), e.g. a :class:`MismatchError`
    when another worker used the same name with another size or dtype."""
    if handle not in _handles:
        raise InvalidArgumentError(
            "bps.torch.synchronize: unknown handle %r (already synchronized?)" % (handle,)
        )
    try:
        _native.wait(handle)
    except BpsError:
        _handles.pop(handle, None)
        raise
    out, post = _handles.pop(handle)
    if post is not None:
        post()
    return out


# ---------------------------------------------------------------------------------------------
# Objects, parameters and optimizer state.


def broadcast_object(obj, root_rank=0, name=None):
    """root_rank's ``obj`` (any picklable object) on every worker: pickled into a uint8
    tensor, whose length is broadcast first, then its bytes. Every worker must call it."""
    base = "BroadcastObject.%s.%d" % ("noname" if name is None else name, next(_object_counter))
    is_root = rank() == root_rank
    if is_root:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        length = torch.tensor([len(data)], dtype=torch.int64)
    else:
        length = torch.zeros(1, dtype=torch.int64)
    broadcast_(length, root_rank, name=base + ".len")
    n = int(length.item())
    if is_root:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buf = torch.empty(n, dtype=torch.uint8)
    broadcast_(buf, root_rank, name=base + ".data")
    if is_root:
        return obj
    return pickle.loads(buf.numpy().tobytes())


def _named_items(params, what):
    if isinstance(params, dict):
        return sorted(params.items())
    if isinstance(params, (list, tuple)) or hasattr(params, "__iter__"):
        items = list(params)
        for it in items:
            if not (isinstance(it, (list, tuple)) and len(it) == 2):
                raise ValueError(
                    "bps.torch.%s: expected a state_dict or (name, tensor) pairs such as "
                    "model.named_parameters(), got an item %r" % (what, type(it).__name__)
                )
        return items
    raise ValueError("bps.torch.%s: invalid params of type %s" % (what, type(params).__name__))


def broadcast_parameters(params, root_rank=0, prefix="Parameter."):
    """Replace every tensor of ``params`` (a ``state_dict()`` or ``named_parameters()``) by
    root_rank's, in place. Every worker must pass the same names."""
    items = _named_items(params, "broadcast_parameters")
    handles = []
    for i, (name, p) in enumerate(items):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                "bps.torch.broadcast_parameters: %r is a %s, not a tensor" % (name, type(p).__name__)
            )
        handles.append(broadcast_async_(p.data, root_rank, name=prefix + str(name), priority=-i))
    err = None
    for h in handles:
        try:
            synchronize(h)
        except BpsError as e:
            err = err or e
    if err is not None:
        raise err


def _on_cpu(obj):
    """``obj`` with every tensor in it (through dicts, lists and tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _on_cpu(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_on_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer, root_rank=0, prefix="Parameter."):
    """Give every worker root_rank's optimizer state (``state_dict()``: hyper-parameters of each
    param group and per-parameter state such as momentum buffers), through
    :func:`broadcast_object`. Every worker's optimizer must hold the same parameters.

    State on a GPU travels through the CPU (so it does not land on root_rank's GPU elsewhere);
    ``load_state_dict`` puts it back on each worker's parameters' device."""
    del prefix
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "bps.torch.broadcast_optimizer_state: expected a torch.optim.Optimizer, got %s"
            % type(optimizer).__name__
        )
    state = _on_cpu(optimizer.state_dict()) if rank() == root_rank else None
    state = broadcast_object(state, root_rank, name="OptimizerState")
    if rank() != root_rank:
        optimizer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# DistributedOptimizer.


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods mixed into a subclass of the wrapped optimizer's class (see
    :func:`DistributedOptimizer`)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step=1):
        super(self.__class__, self).__init__(params)
        self._compression = compression
        all_params = [p for group in self.param_groups for p in group["params"]]
        if named_parameters is not None:
            named_parameters = list(named_parameters)
        else:
            named_parameters = [("push_pull.noname.%d" % i, p) for i, p in enumerate(all_params)]
        names = [n for n, _ in named_parameters]
        dups = sorted(n for n, c in collections.Counter(names).items() if c > 1)
        if dups:
            raise ValueError(
                "bps.torch.DistributedOptimizer: parameter names must be unique; repeated: %s"
                % ", ".join(dups)
            )
        in_opt = {id(p) for p in all_params}
        named_ids = {id(p) for _, p in named_parameters}
        unnamed = [i for i, p in enumerate(all_params) if id(p) not in named_ids]
        if unnamed:
            raise ValueError(
                "bps.torch.DistributedOptimizer: named_parameters does not name every parameter "
                "of the optimizer (unnamed positions: %s); pass model.named_parameters() of the "
                "model the optimizer was built on" % unnamed[:10]
            )
        # Order: as named_parameters lists them (model order: nearest the input first), keeping
        # only the optimizer's parameters that need gradients. Declared in this order on every
        # worker; the first ones get the highest priority (BytePS's convention).
        self._order = []
        seen = set()
        for name, p in named_parameters:
            if id(p) in in_opt and id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                self._order.append((name, p))
        self._parameter_names = {p: name for name, p in self._order}
        self._priority = {p: -i for i, (_, p) in enumerate(self._order)}
        self.backward_passes_per_step = int(backward_passes_per_step)
        if self.backward_passes_per_step < 1:
            raise ValueError("bps.torch.DistributedOptimizer: backward_passes_per_step must be >= 1")
        self._push_pull_delay = {p: self.backward_passes_per_step for _, p in self._order}
        self._handles = {}
        self._hook_handles = []
        self._grad_accs = []
        self._should_sync = True
        # Every worker declares the same names in the same order (model order), before any
        # hook runs: the runtime keys tensors by declaration order.
        self._wire_names = {}
        for name, p in self._order:
            wire_dtype = self._compression.compress(torch.zeros(1, dtype=p.dtype))[0].dtype
            wire = "Gradient." + name
            if wire_dtype != p.dtype:  # a compressed gradient is another tensor on the wire
                wire += "." + str(wire_dtype).replace("torch.", "")
            self._wire_names[p] = wire
            declare(wire)
        self._register_hooks()

    def _register_hooks(self):
        for _, p in self._order:
            hook = self._make_hook(p)
            if hasattr(p, "register_post_accumulate_grad_hook"):
                self._hook_handles.append(p.register_post_accumulate_grad_hook(hook))
            else:  # torch < 2.1: the gradient accumulator's hook, as Horovod/BytePS do
                p_tmp = p.expand_as(p)
                grad_acc = p_tmp.grad_fn.next_functions[0][0]
                grad_acc.register_hook(hook)
                self._grad_accs.append(grad_acc)

    def _make_hook(self, p):
        def hook(*ignore):
            if p in self._handles and self._handles[p][0] is not None:
                raise AssertionError(
                    "Gradients were computed more than backward_passes_per_step times before "
                    "call to step(). Increase backward_passes_per_step to accumulate gradients "
                    "locally."
                )
            if p.grad is None:
                return
            self._push_pull_delay[p] -= 1
            handle, ctx = None, None
            if self._push_pull_delay[p] == 0:
                handle, ctx = self._push_pull_grad_async(p)
            self._handles[p] = (handle, ctx)

        return hook

    def _push_pull_grad_async(self, p):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad
        if not grad.is_contiguous():
            grad = p.grad = grad.contiguous()
        compressed, cctx = self._compression.compress(grad)
        handle = push_pull_async_inplace(
            compressed, average=True, name=self._wire_names[p], priority=self._priority[p]
        )
        return handle, (compressed, cctx)

    def synchronize(self):
        """Start the push_pull of every gradient whose hook did not (a parameter unused in this
        pass gets a zero gradient, so every worker sends the same tensors) and wait for all."""
        for _, p in self._order:
            if p not in self._handles or self._handles[p][0] is None:
                self._handles[p] = self._push_pull_grad_async(p)
        err = None
        for p, (handle, (compressed, cctx)) in list(self._handles.items()):
            try:
                out = synchronize(handle)
                if cctx is not None:
                    p.grad.copy_(self._compression.decompress(out, cctx))
            except BpsError as e:
                err = err or e
            self._push_pull_delay[p] = self.backward_passes_per_step
        self._handles.clear()
        if err is not None:
            raise err

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Use after an explicit ``optimizer.synchronize()`` so ``step()`` does not sync again."""
        self._should_sync = False
        try:
            yield
        finally:
            self._should_sync = True

    def step(self, closure=None):
        if self._should_sync:
            self.synchronize()
        return super(self.__class__, self).step(closure)

    def zero_grad(self, *args, **kwargs):
        if self._handles:
            raise AssertionError(
                "optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                "cause a race condition."
            )
        return super(self.__class__, self).zero_grad(*args, **kwargs)


def DistributedOptimizer(optimizer, named_parameters=None, backward_passes_per_step=1,
                         compression=Compression.none):
    """Wrap ``optimizer`` so each gradient is averaged across workers.

    Each gradient's push_pull starts from a backward hook as soon as it is accumulated, with
    priority by layer order (parameters listed first, nearest the input, go first), and
    ``step()`` waits for all of them before updating. ``named_parameters`` (normally
    ``model.named_parameters()``) names the tensors; every worker must build the same model.
    ``backward_passes_per_step`` accumulates that many backward passes locally before
    communicating. ``compression=Compression.fp16`` sends float16 on the wire.

    CUDA parameters work as CPU ones: each hook starts the push_pull of the gradient in place
    on its device, after the work queued on the device's current stream (the stream autograd
    computed the gradient on); fp16 compression converts on the device.
    """
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    opt = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step)
    if optimizer.state:
        opt.load_state_dict(optimizer.state_dict())
    return opt
