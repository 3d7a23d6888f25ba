"""bps for MXNet (1.x NDArrays on CPU contexts), with BytePS's ``byteps.mxnet`` API.

::

    import bps.mxnet as bps            # or: import byteps.mxnet as bps
    bps.init()
    trainer = bps.DistributedTrainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    ...
    trainer.step(batch_size)

or, through MXNet's KVStore interface::

    kv = mx.kv.create("bps")           # also "dist_sync_bps"
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {...}, kvstore=kv)

Operations are zero-copy on the NDArray's memory: bps waits for MXNet's engine to finish every
pending read and write of the array, then the runtime reads and writes it directly.
``byteps_push_pull`` is synchronous from the caller's view. The MXNet plugin has no GPU path
(the runtime's GPU path is used by ``bps.torch``): arrays must live on a CPU context.
"""

import ctypes
import itertools

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call

from .. import _native
from .. import (  # noqa: F401  (re-exported, as byteps.mxnet does)
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
    declare,
    init,
    is_initialized,
    local_rank,
    local_size,
    num_servers,
    rank,
    shutdown,
    size,
)

__all__ = [
    "init",
    "shutdown",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "byteps_declare_tensor",
    "byteps_push_pull",
    "broadcast_parameters",
    "DistributedTrainer",
    "DistributedOptimizer",
    "BPS",
]

_DTYPE_CODES = {
    np.dtype(np.float32): _native.FLOAT32,
    np.dtype(np.float64): _native.FLOAT64,
    np.dtype(np.float16): _native.FLOAT16,
    np.dtype(np.int32): _native.INT32,
    np.dtype(np.int64): _native.INT64,
    np.dtype(np.uint8): _native.UINT8,
}
try:  # MXNet's bfloat16 is a structured numpy dtype
    _DTYPE_CODES[np.dtype([("bfloat16", np.uint16)])] = _native.BFLOAT16
except TypeError:  # pragma: no cover
    pass
_SUPPORTED = "float32, float64, float16, bfloat16, int32, int64, uint8"
_CPU_DEVICES = ("cpu", "cpu_pinned", "cpu_shared")

_noname_counter = itertools.count()
_trainer_counter = itertools.count()


def _check(tensor, op):
    """Raise a clear error unless ``tensor`` is an NDArray bps can work on; returns its dtype
    code."""
    if not isinstance(tensor, mx.nd.NDArray):
        raise TypeError("bps.mxnet.%s: expected an mxnet NDArray, got %s" % (op, type(tensor).__name__))
    if tensor.context.device_type not in _CPU_DEVICES:
        raise UnsupportedError(
            "bps.mxnet.%s: array is on %s, but bps.mxnet works on CPU contexts only (no CUDA "
            "support for MXNet arrays); use a CPU context (mx.cpu())" % (op, tensor.context)
        )
    if tensor.stype != "default":
        raise InvalidArgumentError(
            "bps.mxnet.%s: %s storage is not supported; use .tostype('default')" % (op, tensor.stype)
        )
    dt = np.dtype(tensor.dtype)
    code = _DTYPE_CODES.get(dt)
    if code is None:
        raise DtypeError("bps.mxnet.%s: unsupported dtype %s; bps supports %s" % (op, dt, _SUPPORTED))
    return code


def _nbytes(tensor):
    return int(tensor.size) * np.dtype(tensor.dtype).itemsize


def _wait_to_write(tensor):
    """Wait until MXNet's engine finished every pending read and write of ``tensor``."""
    check_call(_LIB.MXNDArrayWaitToWrite(tensor.handle))


def _data_ptr(tensor):
    p = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(tensor.handle, ctypes.byref(p)))
    return p.value or 0


def _name(name):
    if name is None:
        return "PushPull.noname.%d" % next(_noname_counter)
    return str(name)


def byteps_declare_tensor(name, **kwargs):
    """Declare a tensor by name (BytePS API); ``kwargs`` (BytePS's compression options) are
    not supported and must be empty."""
    if kwargs:
        raise UnsupportedError(
            "bps.mxnet.byteps_declare_tensor: options %s are not supported by bps" % sorted(kwargs)
        )
    return declare(str(name))


def byteps_push_pull(tensor, version=0, priority=0, name=None, is_average=True):
    """Sum ``tensor`` across all workers in place (divided by the number of workers if
    ``is_average``). Synchronous: returns once the result is in ``tensor``. ``version`` is
    accepted for BytePS compatibility and ignored; higher ``priority`` goes first."""
    del version
    code = _check(tensor, "byteps_push_pull")
    name = _name(name)
    _wait_to_write(tensor)
    ptr = _data_ptr(tensor)
    _native.push_pull(name, code, ptr, ptr, _nbytes(tensor), bool(is_average), int(priority))


def _push_pull_async(tensor, name, average, priority):
    code = _check(tensor, "push_pull")
    _wait_to_write(tensor)
    ptr = _data_ptr(tensor)
    return _native.push_pull_async(name, code, ptr, ptr, _nbytes(tensor), bool(average), int(priority), tensor)


def _broadcast_async(tensor, name, root_rank, priority=0):
    """Start an in-place broadcast of ``tensor``; any dtype travels as bytes."""
    if not isinstance(tensor, mx.nd.NDArray):
        raise TypeError("bps.mxnet.broadcast: expected an mxnet NDArray, got %s" % type(tensor).__name__)
    if tensor.context.device_type not in _CPU_DEVICES or tensor.stype != "default":
        _check(tensor, "broadcast")
    _wait_to_write(tensor)
    ptr = _data_ptr(tensor)
    return _native.broadcast_async(
        name, _native.UINT8, ptr, _nbytes(tensor), int(root_rank), int(priority), tensor
    )


def _wait_all(handles):
    """Wait for every handle; raise the first error after all finished."""
    err = None
    for h in handles:
        try:
            _native.wait(h)
        except BpsError as e:
            err = err or e
    if err is not None:
        raise err


def broadcast_(tensor, root_rank=0, name=None):
    """Replace ``tensor`` on every worker by root_rank's, in place (exact copy of the bytes)."""
    _wait_all([_broadcast_async(tensor, "Broadcast." + _name(name), root_rank)])
    return tensor


def _param_arrays(name, p):
    """The data arrays of a Parameter (one per context), or [p] for an NDArray."""
    if isinstance(p, mx.gluon.Parameter):
        if p._deferred_init or p._data is None:
            raise InvalidArgumentError(
                "bps.mxnet.broadcast_parameters: parameter %r is not initialized yet (deferred "
                "initialization); run a forward pass first, or use DistributedTrainer, which "
                "broadcasts parameters once they are initialized" % name
            )
        return p.list_data()
    if isinstance(p, mx.nd.NDArray):
        return [p]
    raise TypeError(
        "bps.mxnet.broadcast_parameters: %r is a %s, not an NDArray or Parameter" % (name, type(p).__name__)
    )


def broadcast_parameters(params, root_rank=0):
    """Replace every array of ``params`` (a dict of name -> NDArray, e.g. ``arg_params``, or a
    gluon ``ParameterDict``) by root_rank's, in place. Every worker must pass the same names."""
    if not hasattr(params, "items"):
        raise ValueError("bps.mxnet.broadcast_parameters: invalid params of type %s" % type(params).__name__)
    items = sorted(params.items(), key=lambda kv: str(kv[0]))
    started = []
    for key, p in items:
        arrays = _param_arrays(key, p)
        h = _broadcast_async(arrays[0], "BroadcastParameter." + str(key), root_rank)
        started.append((h, arrays))
    _wait_all([h for h, _ in started])
    for _, arrays in started:
        for other in arrays[1:]:
            arrays[0].copyto(other)
    for _, arrays in started:
        for a in arrays:
            a.wait_to_read()


class DistributedTrainer(mx.gluon.Trainer):
    """A gluon Trainer that averages every gradient across workers (push_pull) before the
    update, and starts from root_rank's parameters (broadcast once they are initialized: at
    construction, or at the first step for deferred initialization)."""

    def __init__(self, params, optimizer, optimizer_params=None, root_rank=0):
        if isinstance(params, (dict, mx.gluon.ParameterDict)):
            params = [params[k] for k in sorted(params.keys())]
        super(DistributedTrainer, self).__init__(
            params, optimizer, optimizer_params=optimizer_params, kvstore=None
        )
        self.root_rank = root_rank
        self._bps_prefix = "DistributedTrainer.%d." % next(_trainer_counter)
        for i, param in enumerate(self._params):
            declare(self._bps_prefix + "parameter_%d" % i)
            if param.grad_req != "null":
                declare(self._bps_prefix + "gradient_%d" % i)
        # Broadcast what is initialized already, so the first step starts from root's values.
        self._init_params()

    def _init_params(self):
        deferred = []
        started = []
        for param in self._params_to_init:
            if param._deferred_init or param._data is None:
                deferred.append(param)
                continue
            arrays = param._check_and_get(param._data, list)
            idx = self._param2idx[param.name]
            h = _broadcast_async(arrays[0], self._bps_prefix + "parameter_%d" % idx, self.root_rank)
            started.append((h, arrays))
        self._params_to_init = deferred
        _wait_all([h for h, _ in started])
        for _, arrays in started:
            for other in arrays[1:]:
                arrays[0].copyto(other)

    def _allreduce_grads(self):
        started = []
        for i, param in enumerate(self._params):
            if param.grad_req == "null":
                continue
            grads = param.list_grad()
            g = grads[0]
            for other in grads[1:]:  # several devices: sum locally first
                g += other.as_in_context(g.context)
            h = _push_pull_async(g, self._bps_prefix + "gradient_%d" % i, True, -i)
            started.append((h, grads))
        _wait_all([h for h, _ in started])
        for _, grads in started:
            for other in grads[1:]:
                grads[0].copyto(other)


class DistributedOptimizer(mx.optimizer.Optimizer):
    """Wraps an MXNet optimizer (Module API) so each gradient is averaged across workers before
    the wrapped optimizer's update."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def __getattr__(self, item):
        return getattr(self._optimizer, item)

    def create_state_multi_precision(self, index, weight):
        return self._optimizer.create_state_multi_precision(index, weight)

    def create_state(self, index, weight):
        return self._optimizer.create_state(index, weight)

    def _do_push_pull(self, index, grad):
        if isinstance(index, (tuple, list)):
            for i, g in zip(index, grad):
                byteps_push_pull(g, priority=-i, name="DistributedOptimizer.gradient_%s" % i, is_average=True)
        else:
            byteps_push_pull(grad, priority=-index, name="DistributedOptimizer.gradient_%s" % index, is_average=True)

    def update(self, index, weight, grad, state):
        self._do_push_pull(index, grad)
        self._optimizer.update(index, weight, grad, state)

    def update_multi_precision(self, index, weight, grad, state):
        self._do_push_pull(index, grad)
        self._optimizer.update_multi_precision(index, weight, grad, state)

    def set_learning_rate(self, lr):
        self._optimizer.set_learning_rate(lr)

    def set_lr_mult(self, args_lr_mult):
        self._optimizer.set_lr_mult(args_lr_mult)

    def set_wd_mult(self, args_wd_mult):
        self._optimizer.set_wd_mult(args_wd_mult)


# Registers the kvstore types "bps" and "dist_sync_bps" with MXNet (needs the functions above).
from .kvstore import BPS, Dist_Sync_Bps  # noqa: E402,F401
