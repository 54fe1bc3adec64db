"""vocab_parallel_cce: memory-efficient, vocabulary-parallel fused linear cross-entropy."""

from .api import (
    CrossEntropyOutput,
    LinearCrossEntropy,
    LinearCrossEntropyImpl,
    VocabParallelOptions,
    linear_cross_entropy,
)
from .integrations.compat import torch_linear_cross_entropy
from .rl import linear_log_probs
from .tuning import Tuning

__all__ = [
    "linear_cross_entropy", "LinearCrossEntropy", "VocabParallelOptions", "LinearCrossEntropyImpl",
    "CrossEntropyOutput", "linear_log_probs", "torch_linear_cross_entropy", "Tuning",
]  # fmt: skip
__version__ = "0.1.0"
