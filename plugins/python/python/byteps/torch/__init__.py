"""``byteps.torch``: an alias of :mod:`bps.torch` (same functions, same state)."""

import bps.torch as _impl
from bps.torch import *  # noqa: F401,F403
from bps.torch import __all__  # noqa: F401


def __getattr__(name):
    return getattr(_impl, name)
