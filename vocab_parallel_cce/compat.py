"""Former path of `vocab_parallel_cce.integrations.compat`: this name is that module itself (the
same module object), so attributes set through it are the module's own."""

import sys

from .integrations import compat as _module

sys.modules[__name__] = _module
