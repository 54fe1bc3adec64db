#!/usr/bin/env bash
# Set up (once) and run the GPT training demo: Megatron-core GPT, tensor + sequence parallel,
# fused loss vs Megatron's loss, from the same initial weights.
#
#   bash launch/run.sh                       # CPU: 2 gloo processes, tiny model; GPU: NCCL, every local GPU
#   bash launch/run.sh --steps 100 --out runs/long      # any launch/train_gpt.py option passes through
#
# Set-up, each step skipped when already done: a virtual environment .venv (python3.11 -m venv),
# torch (`pip install torch==2.13.0` unless torch already imports), then `pip install -e .[launch]`
# (megatron-core, matplotlib). An activated virtual environment, or PYTHON=/path/to/python, is used
# as it is instead of .venv.
#
# Environment:
#   PYTHON         interpreter to use (no venv is created; installs go into its environment)
#   VENV           venv folder (default .venv)          PYTHON_BIN  python to create it (python3.11)
#   TORCH_SPEC     what to pip-install when torch is missing (default torch==2.13.0)
#   NPROC          processes on this node (default: the number of GPUs, or 2 without GPUs)
#   NNODES         nodes (default 1). With NNODES > 1 also set RDZV_ENDPOINT=host:port (a node
#                  every node can reach) and the same RDZV_ID on every node; see launch/README.md
#   RDZV_ID        rendezvous id (default vcce-gpt)      RDZV_TIMEOUT  seconds to wait for all nodes (300)
#   SKIP_CHECK=1   do not validate the arguments before starting torchrun
#   SETUP_ONLY=1   set up, print what would run, and exit (e.g. once on a cluster's shared filesystem)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "run.sh: $*" >&2; }
die() { echo "run.sh: error: $*" >&2; exit "${2:-1}"; }

# ---- interpreter ----------------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
    PY="${VIRTUAL_ENV}/bin/python"
else
    VENV="${VENV:-.venv}"
    if [[ ! -x "$VENV/bin/python" ]]; then
        PYTHON_BIN="${PYTHON_BIN:-python3.11}"
        command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
        command -v "$PYTHON_BIN" >/dev/null 2>&1 || die "no python3.11 or python3 found; install Python >= 3.10"
        "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || die "$PYTHON_BIN is older than Python 3.10"
        say "creating $VENV with $PYTHON_BIN"
        "$PYTHON_BIN" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
fi
command -v "$PY" >/dev/null 2>&1 || [[ -x "$PY" ]] || die "python interpreter $PY not found"

# ---- packages (one probe: torch imported once, the others only looked up) --------------------
probe() {
    "$PY" - <<'EOF' 2>/dev/null || echo "broken 0"
import importlib.util, sys
try:
    import torch
except Exception:
    print("notorch 0"); sys.exit()
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
ok = all(found(m) for m in ("vocab_parallel_cce", "megatron.core", "matplotlib"))
print("ok" if ok else "missing", torch.cuda.device_count() if torch.cuda.is_available() else 0)
EOF
}
read -r STATE NGPU < <(probe)
if [[ "$STATE" == notorch || "$STATE" == broken ]]; then
    say "installing ${TORCH_SPEC:-torch==2.13.0}"
    "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
    read -r STATE NGPU < <(probe)
fi
if [[ "$STATE" != ok ]]; then
    say "installing this package with the [launch] extra (megatron-core, matplotlib)"
    "$PY" -m pip install -e ".[launch]"
    read -r STATE NGPU < <(probe)
    [[ "$STATE" == ok ]] || die "the installation did not make vocab_parallel_cce, megatron.core and matplotlib importable"
fi

# ---- processes and backend ------------------------------------------------------------------
if [[ -z "${NPROC:-}" ]]; then
    if [[ "$NGPU" -gt 0 ]]; then NPROC="$NGPU"; else NPROC=2; fi
fi
NNODES="${NNODES:-1}"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'" 2
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'" 2
if [[ "$NGPU" -gt 0 ]]; then
    say "$NGPU GPU(s): $NPROC process(es) per node x $NNODES node(s), NCCL"
else
    say "no GPU: $NPROC CPU process(es) per node x $NNODES node(s), gloo"
fi

for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then
        exec "$PY" launch/train_gpt.py --help
    fi
done
if [[ "${SETUP_ONLY:-0}" == 1 ]]; then
    say "set up: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
    exit 0
fi

# ---- validate before starting any process (clear message, nothing written) ------------------
if [[ "${SKIP_CHECK:-0}" != 1 && "$NNODES" == 1 ]]; then
    status=0
    RANK=0 LOCAL_RANK=0 WORLD_SIZE="$NPROC" LOCAL_WORLD_SIZE="$NPROC" \
        "$PY" launch/train_gpt.py --check "$@" || status=$?
    [[ $status == 0 ]] || exit "$status"
fi

# ---- torchrun -------------------------------------------------------------------------------
if [[ "$NNODES" == 1 ]]; then
    LAUNCH=(--standalone --nnodes 1 --nproc-per-node "$NPROC")
else
    [[ -n "${RDZV_ENDPOINT:-}" ]] || die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (reachable from every node)" 2
    LAUNCH=(--nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-backend c10d
            --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-vcce-gpt}"
            --rdzv-conf "join_timeout=${RDZV_TIMEOUT:-300},read_timeout=${RDZV_TIMEOUT:-300}")
fi

# One thread per process unless told otherwise (train_gpt.py raises it to cores / processes on CPU).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ERRLOG="$(mktemp "${TMPDIR:-/tmp}/vcce-run.XXXXXX")"
trap 'rm -f "$ERRLOG"' EXIT
set +e
# stderr goes to the terminal and, through tee, to ERRLOG (to explain a rendezvous failure).
{ "$PY" -m torch.distributed.run "${LAUNCH[@]}" launch/train_gpt.py "$@" 2>&1 1>&3 3>&- | tee "$ERRLOG" >&2; } 3>&1
rc=$?
set -e
if [[ $rc != 0 ]]; then
    if grep -q -E "Rendezvous(Connection|Timeout|Closed)Error|DistNetworkError|DistStoreError" "$ERRLOG"; then
        die "the nodes could not meet at the rendezvous ${RDZV_ENDPOINT:-(local)} within ${RDZV_TIMEOUT:-300}s: check that every node was started with the same RDZV_ENDPOINT and RDZV_ID, and that host:port is reachable from each node" 3
    fi
    if grep -q "train_gpt.py: error:" "$ERRLOG"; then
        grep "train_gpt.py: error:" "$ERRLOG" | sort -u >&2
    fi
    die "training failed (torchrun exit status $rc)" "$rc"
fi
