"""Former path of the backend contract, `vocab_parallel_cce.backends.protocol`: this name is that
module itself (the same module object)."""

import sys

from .backends import protocol as _protocol

sys.modules[__name__] = _protocol
