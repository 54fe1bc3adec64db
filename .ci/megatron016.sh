#!/usr/bin/env bash
# Run tests/integrations/test_megatron.py against megatron-core 0.16.x (the last release for Python 3.11),
# in its own virtualenv built from nothing: .venv-mcore016 (override with VENV=...).
#   .ci/megatron016.sh            # create the venv if missing, then run the tests
#   FRESH=1 .ci/megatron016.sh    # rebuild the venv first
# Needs python3.11 and a package index (or local wheels) with torch and megatron-core==0.16.1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-mcore016}
PY=${PYTHON:-python3.11}
MCORE_SPEC=${MCORE_SPEC:-megatron-core==0.16.1}
# shellcheck source=launch/pins.sh
source launch/pins.sh  # TORCH_SPEC, and the version check

start=$(date +%s)
if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" "$MCORE_SPEC" pytest pytest-xdist numpy packaging
    "$VENV/bin/pip" install -q --no-deps -e .
fi
# an existing venv with other versions is brought back to the specs
pins_ensure "$VENV/bin/python" megatron016 "$TORCH_SPEC" "$MCORE_SPEC"
echo "megatron016: $(pins_show "$VENV/bin/python" megatron-core torch) (pinned: $MCORE_SPEC $TORCH_SPEC)"
"$VENV/bin/python" -m pytest tests/integrations/test_megatron.py -q -p no:cacheprovider -n "${WORKERS:-2}" "$@"
echo "megatron016: $(( $(date +%s) - start )) s in all"
