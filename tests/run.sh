#!/usr/bin/env bash
# Set-up and tests on a fresh machine (the README's test command; .ci/run calls it too).
# Each set-up step is skipped when already done:
#   1. a virtual environment .venv (python3.11 -m venv; PYTHON_BIN to choose another python);
#   2. torch (TORCH_SPEC, default torch==2.13.0) and triton (TRITON_SPEC, default triton==3.7.1, the
#      release torch 2.13 pairs with: without a GPU the Triton kernels run in its interpreter);
#   3. megatron-core 0.19.2 (MCORE_SPEC; it says Python >= 3.12 but runs on 3.11, so it is installed
#      with --ignore-requires-python after its hard dependencies, numpy and packaging, are resolved
#      for this Python), then `pip install -e .[test,megatron,transformers,launch]`;
# then `pytest -n auto` over tests/ (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON_BIN=${PYTHON_BIN:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.7.1}
MCORE_SPEC=${MCORE_SPEC:-megatron-core==0.19.2}

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_SPEC"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
    "$PY" -m pip install -q "$TRITON_SPEC"
fi
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    # its hard dependencies resolved for this Python first (numpy's newest needs 3.12), then it alone
    "$PY" -m pip install -q numpy "packaging>=24.2"
    "$PY" -m pip install -q --no-deps --ignore-requires-python "$MCORE_SPEC"
fi
if ! "$PY" -c "import vocab_parallel_cce, pytest, xdist, transformers, matplotlib" 2>/dev/null; then
    "$PY" -m pip install -q -e ".[test,megatron,transformers,launch]"
fi
"$PY" -c "import torch, triton, megatron.core, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
exec "$PY" -m pytest -n auto -q -p no:cacheprovider tests "$@"
