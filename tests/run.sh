#!/usr/bin/env bash
# Set-up and tests on a fresh machine (the README's test command; .ci/run calls it too).
# Each set-up step is skipped when already done:
#   1. a virtual environment .venv (python3.11 -m venv; PYTHON_BIN to choose another python);
#   2. torch, triton and megatron-core at the versions pinned in launch/pins.sh (torch==2.13.0,
#      triton==3.7.1: without a GPU the Triton kernels run in its interpreter; megatron-core==0.19.2,
#      installed past its Requires-Python on 3.11), the same as launch/run.sh: an installed version
#      that differs (say, from another script) is replaced; TORCH_SPEC, TRITON_SPEC, MCORE_SPEC override;
#   3. `pip install -e .[test,megatron,transformers,launch]` unless this checkout and those import;
# then it prints the installed versions and runs `pytest -n auto` over tests/ (extra arguments go
# to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON_BIN=${PYTHON_BIN:-python3.11}
# shellcheck source=launch/pins.sh
source launch/pins.sh
PINS=("$TORCH_SPEC" "$TRITON_SPEC" "$MCORE_SPEC")

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
pins_ensure "$PY" tests/run.sh "${PINS[@]}"
if ! checkout_importable "$PY" pytest xdist numpy transformers matplotlib megatron.core; then
    "$PY" -m pip install -q -e ".[test,megatron,transformers,launch]"
    pins_check "$PY" tests/run.sh "${PINS[@]}"
fi
echo "tests/run.sh: $(pins_show "$PY" torch triton megatron-core transformers) (pinned: ${PINS[*]})"
exec "$PY" -m pytest -n auto -q -p no:cacheprovider tests "$@"
