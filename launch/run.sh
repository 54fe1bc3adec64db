#!/usr/bin/env bash
# Set up (once) and run the GPT training demo: Megatron-core GPT, tensor + sequence parallel,
# fused loss vs Megatron's loss, from the same initial weights.
#
#   bash launch/run.sh                       # CPU: 2 gloo processes, tiny model; GPU: NCCL, every local GPU
#   bash launch/run.sh --steps 100 --out runs/long      # any launch/train_gpt.py option passes through
#   bash launch/run.sh --help                # train_gpt.py's options and these variables, before any set-up
#
# Set-up, each step skipped when already done: a virtual environment .venv (python3.11 -m venv);
# torch, triton and megatron-core at the versions pinned in launch/pins.sh (the same as tests/run.sh;
# an installed version that differs is replaced); `pip install -e .[launch]` (matplotlib) unless this
# checkout's package already imports. It ends by printing the installed versions. An activated
# virtual environment, or PYTHON=/path/to/python, is used instead of .venv (the pins go into it).
#
# Environment:
#   PYTHON         interpreter to use (no venv is created; installs go into its environment)
#   VENV           venv folder (default .venv)          PYTHON_BIN  python to create it (python3.11)
#   TORCH_SPEC, TRITON_SPEC, MCORE_SPEC   pip requirements replacing the pins of launch/pins.sh
#                  (torch==2.13.0, triton==3.7.1, megatron-core==0.19.2); a bare name accepts any version
#   SETUP=0        use the interpreter's packages as they are: no version check, no installs
#   NPROC          processes on this node (default: the number of GPUs, or 2 without GPUs)
#   NNODES         nodes (default 1). With NNODES > 1 also set RDZV_ENDPOINT=host:port (a node
#                  every node can reach) and the same RDZV_ID on every node; see launch/README.md
#   RDZV_ID        rendezvous id (default vcce-gpt)      RDZV_TIMEOUT  seconds to wait for all nodes (300)
#   RUN_DIR        output folder when no --out is given (default runs/gpt-<date>-<time>)
#   SKIP_CHECK=1   do not validate the arguments before starting torchrun
#   SETUP_ONLY=1   set up, print the versions, and exit (e.g. once on a cluster's shared filesystem)
# Exit status: 0 success; 2 bad arguments (nothing started); 3 the nodes could not meet; else failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "run.sh: $*" >&2; }
die() { echo "run.sh: error: $1" >&2; exit "${2:-1}"; }

# ---- --help: train_gpt.py's options (standard library only) and this script's variables ------
for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then
        HELP_PY="${PYTHON:-${VENV:-.venv}/bin/python}"
        [[ -x "$HELP_PY" ]] || HELP_PY=python3
        "$HELP_PY" launch/train_gpt.py --help
        echo
        echo "launch/run.sh sets up, checks the arguments (--check), then starts torchrun. Environment:"
        sed -n '/^# Environment:/,/^set -euo pipefail/{/^# Environment:/d;/^set /d;s/^# \{0,1\}//;p;}' \
            "${BASH_SOURCE[0]}"
        exit 0
    fi
done

# ---- the options' syntax (standard library only): a bad option is refused in one line, status 2,
# before any set-up. Sizes, data and output folder are checked after set-up (--check, below).
PARSE_PY="${PYTHON:-${VENV:-.venv}/bin/python}"
command -v "$PARSE_PY" >/dev/null 2>&1 || PARSE_PY=python3
if command -v "$PARSE_PY" >/dev/null 2>&1; then
    RANK=0 "$PARSE_PY" -c 'import sys; sys.path.insert(0, "launch"); from gpt.args import parse_args
parse_args(sys.argv[1:])' "$@" || exit $?
fi

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

# ---- packages: the pinned versions (compared, not just imported), then this checkout ---------
# shellcheck source=launch/pins.sh
source launch/pins.sh
PINS=("$TORCH_SPEC" "$TRITON_SPEC" "$MCORE_SPEC")
if [[ "${SETUP:-1}" != 0 ]]; then
    pins_ensure "$PY" run.sh "${PINS[@]}" || die "could not install ${PINS[*]}"
    if ! checkout_importable "$PY" megatron.core matplotlib; then
        say "installing this checkout with the [launch] extra (matplotlib)"
        "$PY" -m pip install -q -e ".[launch]"
        pins_check "$PY" run.sh "${PINS[@]}" || die "installing .[launch] changed the pinned versions"
    fi
fi
checkout_importable "$PY" torch megatron.core matplotlib \
    || die "vocab_parallel_cce (from this checkout), megatron.core and matplotlib are not all importable with $PY"
say "$(pins_show "$PY" torch triton megatron-core matplotlib)"
[[ "${SETUP:-1}" == 0 ]] || say "as pinned: ${PINS[*]}"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') \
    || die "torch does not import with $PY"

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
if [[ "${SETUP_ONLY:-0}" == 1 ]]; then
    say "set up: $PY"
    exit 0
fi

# One output folder for the check and the run: the default goes first, so a later --out wins.
if [[ -z "${RUN_DIR:-}" ]]; then
    mkdir -p runs
    RUN_DIR="runs/gpt-$(date +%Y%m%d-%H%M%S)"
fi
ARGS=(--out "$RUN_DIR" "$@")

# ---- validate before starting any process (clear message, nothing written) ------------------
if [[ "${SKIP_CHECK:-0}" != 1 && "$NNODES" == 1 ]]; then
    status=0
    RANK=0 LOCAL_RANK=0 WORLD_SIZE="$NPROC" LOCAL_WORLD_SIZE="$NPROC" \
        "$PY" launch/train_gpt.py --check "${ARGS[@]}" || status=$?
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
{ "$PY" -m torch.distributed.run "${LAUNCH[@]}" launch/train_gpt.py "${ARGS[@]}" 2>&1 1>&3 3>&- | tee "$ERRLOG" >&2; } 3>&1
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
