"""Former path of the PyTorch backend, `vocab_parallel_cce.backends.torch_backend`: this name is
that module itself (the same module object)."""

import sys

from .backends import torch_backend as _backend

sys.modules[__name__] = _backend
