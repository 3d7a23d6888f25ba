"""``byteps.mxnet``: an alias of :mod:`bps.mxnet` (same functions, same state).

MXNet's own ``mx.kv.create('byteps')`` store imports this module; it accepts GPU arrays only,
so on CPU use ``mx.kv.create('bps')``."""

import bps.mxnet as _impl
from bps.mxnet import *  # noqa: F401,F403
from bps.mxnet import __all__  # noqa: F401


def __getattr__(name):
    return getattr(_impl, name)
