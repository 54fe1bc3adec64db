"""Former home of the autograd Functions, now one module per path in `vocab_parallel_cce.paths`
(recompute, held, chunked; what they share in shared): their names, re-exported."""

from .paths.chunked import LossWithGradInForward  # noqa: F401
from .paths.held import LossWithHeldLogits  # noqa: F401
from .paths.recompute import ShardStats  # noqa: F401
from .paths.shared import AccumulateGradInto as _AccumulateGradInto  # noqa: F401
