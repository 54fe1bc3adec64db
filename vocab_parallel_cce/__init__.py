"""vocab_parallel_cce: memory-efficient, vocabulary-parallel fused linear cross-entropy."""

from .api import LinearCrossEntropy, VocabParallelOptions, linear_cross_entropy
from .tuning import Tuning

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "VocabParallelOptions", "Tuning"]
__version__ = "0.1.0"
