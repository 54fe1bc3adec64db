"""Former path of `vocab_parallel_cce.integrations.megatron`: this name is that module itself (the
same module object), so attributes set through it are the module's own."""

import sys

from .integrations import megatron as _module

sys.modules[__name__] = _module
