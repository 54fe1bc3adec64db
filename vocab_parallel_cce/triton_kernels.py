"""Former home of the Triton kernels, now each beside its launcher in `vocab_parallel_cce.backends.triton`:
the memory-first path's in `recompute`, the products' in `products`, the float32 stored-logits
passes in `logits_fp32`, the scaling in `stored_logits`. Their names, re-exported."""

from .backends.triton.common import grouped_tile as _grouped_tile, tanh as _tanh  # noqa: F401
from .backends.triton.logits_fp32 import row_logit_grad_kernel, row_stats_kernel  # noqa: F401
from .backends.triton.products import _pointer_product, sparse_matmul_kernel  # noqa: F401
from .backends.triton.recompute import _logit_tile, forward_kernel, logit_grad_kernel  # noqa: F401
from .backends.triton.stored_logits import scale_kernel  # noqa: F401
