"""bps: push_pull for data-parallel training (BytePS's model) on a Rust runtime.

The common API, shared by the framework modules ``bps.torch`` and ``bps.mxnet``::

    import bps
    bps.init()                       # joins the job described by the environment
    bps.rank(), bps.size(), bps.local_rank(), bps.local_size()
    bps.declare("layer1.weight")     # optional: push_pull declares on first use
    bps.barrier()
    bps.shutdown()                   # also run at interpreter exit

Start jobs with ``bps-launch --workers N [--servers S] -- python train.py`` (or BytePS's
``DMLC_*`` variables, or ``torchrun``). Every error bps raises is a :class:`BpsError` (a
``RuntimeError``) whose message is the runtime's error text; see the subclasses below.
``UnsupportedError`` (also a ``NotImplementedError``) is raised for what this build or machine
cannot do, e.g. CUDA tensors without CUDA support or without a usable GPU: its message says why.
"""

import atexit as _atexit

from . import _native
from ._native import (  # noqa: F401  (re-exported)
    BpsError,
    BpsTimeoutError,
    ConfigError,
    InvalidArgumentError,
    MismatchError,
    NotInitializedError,
    PeerError,
    ShutDownError,
    UnsupportedError,
)

__version__ = _native.__version__

__all__ = [
    "init",
    "shutdown",
    "is_initialized",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "num_servers",
    "declare",
    "barrier",
    "cuda_built",
    "gpus",
    "BpsError",
    "BpsTimeoutError",
    "ConfigError",
    "InvalidArgumentError",
    "MismatchError",
    "NotInitializedError",
    "PeerError",
    "ShutDownError",
    "UnsupportedError",
    "DtypeError",
]


class DtypeError(BpsError, TypeError):
    """A tensor's element type is not one bps can sum."""


_atexit_registered = False


def init(lazy=False):
    """Start bps in this process from the environment and join the job.

    Blocks until every worker and server registered (at most BPS_TIMEOUT). Calling it again
    while bps runs does nothing. ``lazy`` is accepted for BytePS compatibility and ignored.
    Registers :func:`shutdown` to run at interpreter exit.
    """
    global _atexit_registered
    del lazy
    _native.init()
    if not _atexit_registered:
        _atexit.register(_shutdown_at_exit)
        _atexit_registered = True


def _shutdown_at_exit():
    try:
        _native.shutdown()
    except BpsError:
        pass


def shutdown():
    """Leave the job (waits until every worker left). Idempotent."""
    _native.shutdown()


def suspend():
    """BytePS compatibility: not supported (bps has no elastic suspend/resume)."""
    raise UnsupportedError("bps.suspend: elastic suspend/resume is not supported by bps")


def resume(num_workers=None, num_servers=None, global_rank=None, context=None):
    """BytePS compatibility: not supported (bps has no elastic suspend/resume)."""
    raise UnsupportedError("bps.resume: elastic suspend/resume is not supported by bps")


def is_initialized():
    """Whether bps runs in this process."""
    return _native.is_initialized()


def rank():
    """This worker's rank, 0 .. size() - 1."""
    return _native.rank()


def size():
    """Number of workers in the job."""
    return _native.size()


def local_rank():
    """This worker's rank among the workers of its host."""
    return _native.local_rank()


def local_size():
    """Number of workers on this host."""
    return _native.local_size()


def num_servers():
    """Number of server processes (0: the workers serve the keys themselves)."""
    return _native.num_servers()


def declare(name):
    """Declare a tensor by name; returns its id. Every worker must declare the same tensors in
    the same order (push_pull declares a name on first use)."""
    return _native.declare(str(name))


def barrier():
    """Block until every worker reached the barrier."""
    _native.barrier()


def cuda_built():
    """Whether this build of bps has the CUDA path (GPU tensors). A build with it still runs on
    a machine without a GPU; :func:`gpus` says whether this one has a usable GPU."""
    return _native.cuda_built()


def gpus():
    """The GPUs this process can use (after :func:`init`): a list of dicts with ``index``,
    ``name``, ``memory`` (bytes) and ``pci_bus_id``. Raises :class:`UnsupportedError` saying
    why there is none (a build without CUDA, no NVIDIA driver, no device)."""
    return _native.gpus()
