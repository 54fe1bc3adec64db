"""Adapters to other code: Megatron-core's GPTModel (megatron.py), Hugging Face Transformers'
causal LMs (transformers.py), PyTorch's and Apple CCE's fused linear cross-entropy APIs
(compat.py). Importing this package imports none of those libraries."""
