"""Former path of the fast mode's kernels over stored bf16 logits,
`vocab_parallel_cce.backends.triton.logits_bf16`: this name is that module itself."""

import sys

from .backends.triton import logits_bf16 as _module

sys.modules[__name__] = _module
