"""``byteps``: BytePS's package name, an alias of :mod:`bps` so BytePS scripts run unchanged
(``import byteps.torch as bps``, ``import byteps.mxnet as bps``)."""

import bps as _impl
from bps import *  # noqa: F401,F403
from bps import __all__, __version__  # noqa: F401


def __getattr__(name):
    return getattr(_impl, name)
