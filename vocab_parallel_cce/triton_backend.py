"""Former path of the Triton backend, `vocab_parallel_cce.backends.triton`: this name is that
package itself (the same module object), so attributes set through it are the backend's own."""

import sys

from .backends import triton as _backend

sys.modules[__name__] = _backend
