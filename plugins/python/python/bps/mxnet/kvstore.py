"""MXNet KVStore types ``bps`` and ``dist_sync_bps`` (``mx.kv.create('bps')``).

Both are the same store: ``pushpull`` sums a value across all workers (as MXNet's ``dist_sync``
does; a value given as several per-device arrays is summed locally first), ``broadcast`` gives
every worker rank 0's value. bps servers only sum: they keep no weights and run no optimizer,
so ``is_capable('optimizer')`` is False and gluon's Trainer applies the optimizer on each worker
(``update_on_kvstore=False``).

``gluon.Trainer(..., kvstore='bps')`` given as a *string* on a single device is skipped by
gluon (it creates no kvstore for one device unless the name contains "dist"): pass the object
(``kvstore=mx.kv.create('bps')``) or the name ``'dist_sync_bps'``.
"""

import itertools

import mxnet as mx
from mxnet.kvstore.base import KVStoreBase

from .. import UnsupportedError, init, local_rank, rank, size
from . import _broadcast_async, _check, _push_pull_async, _wait_all

_NO_OPTIMIZER = (
    "bps servers only sum gradients: they keep no weights and no optimizer state, so {what} "
    "is not available. Apply the optimizer on the workers instead: use "
    "bps.mxnet.DistributedTrainer, or gluon.Trainer(params, optimizer, kvstore=kv) with this "
    "kvstore (it runs with update_on_kvstore=False){extra}."
)


# Each store has its own key space: its tensor names carry a per-process instance number
# (identical on every worker as long as every worker creates its stores in the same order).
_instances = itertools.count()


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _check_key(key, op):
    if not isinstance(key, (str, int)):
        raise TypeError(
            "bps kvstore %s: key must be a str or an int (one key per call), got %s" % (op, type(key).__name__)
        )


@KVStoreBase.register
class BPS(KVStoreBase):
    """bps as an MXNet KVStore (registered as ``bps``)."""

    def __init__(self):
        init()
        self._prefix = "KVStore%d." % next(_instances)

    def broadcast(self, key, value, out, priority=0):
        """Store worker 0's ``value`` (an NDArray, or a list whose first element is used) into
        ``out`` (an NDArray or a list) on every worker; into ``value`` if ``out`` is None."""
        _check_key(key, "broadcast")
        value = _as_list(value)[0]
        _check(value, "kvstore.broadcast")
        outs = [value] if out is None else _as_list(out)
        inplace = any(o is value for o in outs)
        buf = value if inplace else value.copy()
        _wait_all([_broadcast_async(buf, self._prefix + "broadcast.%s" % key, 0, priority)])
        for o in outs:
            if o is not buf:
                buf.copyto(o)

    def pushpull(self, key, value, out=None, priority=0):
        """Sum ``value`` across all workers into ``out`` (an NDArray or a list); into the
        value(s) themselves if ``out`` is None. A list of values (one per device) is summed
        locally first."""
        _check_key(key, "pushpull")
        values = _as_list(value)
        for v in values:
            _check(v, "kvstore.pushpull")
        fresh = False
        if len(values) == 1:
            src = values[0]
        else:
            ctx = values[0].context
            src = mx.nd.add_n(*[v.as_in_context(ctx) for v in values])
            fresh = True
        outs = values if out is None else _as_list(out)
        if fresh or any(o is src for o in outs):
            buf = src
        else:
            buf = src.copy()
        _wait_all([_push_pull_async(buf, self._prefix + "pushpull.%s" % key, False, priority)])
        for o in outs:
            if o is not buf:
                buf.copyto(o)

    @staticmethod
    def is_capable(capability):
        """Always False: bps servers keep no weights and run no optimizer."""
        return False

    def set_optimizer(self, optimizer):
        raise UnsupportedError(_NO_OPTIMIZER.format(what="set_optimizer", extra=""))

    def save_optimizer_states(self, fname, dump_optimizer=False):
        raise UnsupportedError(
            _NO_OPTIMIZER.format(
                what="save_optimizer_states",
                extra="; save the optimizer state held on a worker with trainer.save_states(fname)",
            )
        )

    def load_optimizer_states(self, fname):
        raise UnsupportedError(
            _NO_OPTIMIZER.format(
                what="load_optimizer_states",
                extra="; load it on every worker with trainer.load_states(fname)",
            )
        )

    @property
    def type(self):
        """``dist_sync_bps``: gluon treats names containing "dist" as distributed stores."""
        return "dist_sync_bps"

    @property
    def rank(self):
        return rank()

    @property
    def local_rank(self):
        return local_rank()

    @property
    def num_workers(self):
        return size()


@KVStoreBase.register
class Dist_Sync_Bps(BPS):  # noqa: N801  (the lowercased class name is the registry key)
    """The same store under the name ``dist_sync_bps`` (so gluon's Trainer accepts the string)."""
