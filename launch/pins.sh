# shellcheck shell=bash
# The pinned versions that launch/run.sh and tests/run.sh (and .ci/megatron016.sh) install, and the
# set-up steps they share. Sourced, not run. Each pin can be overridden from the environment with a
# pip requirement: TORCH_SPEC=torch==2.13.0 (a version), or TORCH_SPEC=torch (whatever is installed).
: "${TORCH_SPEC:=torch==2.13.0}"
if [[ "$(uname -s)" == Linux ]]; then
    : "${TRITON_SPEC:=triton==3.7.1}"     # the release torch 2.13 pairs with (CPU: its interpreter)
else
    : "${TRITON_SPEC=}"                   # no triton wheels off Linux; empty specs are skipped
fi
: "${MCORE_SPEC:=megatron-core==0.19.2}"  # says Python >= 3.12 but runs on 3.11 (see pin_install)

# pins_unmet PY SPEC...: one line "SPEC<tab>FOUND" per requirement the interpreter's installed
# version does not satisfy (FOUND: the installed version, or "none"). Versions, not imports, are
# compared, with pip's own `packaging` when the environment has none.
pins_unmet() {
    local py=$1
    shift
    "$py" - "$@" <<'EOF'
import sys
from importlib import metadata
try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
for spec in filter(None, sys.argv[1:]):
    try:
        req = Requirement(spec)
    except InvalidRequirement:
        sys.exit(f"not a pip requirement (name==version, or a name alone): {spec!r}")
    try:
        found = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        found = "none"
    if found == "none" or not req.specifier.contains(found, prereleases=True):
        print(f"{spec}\t{found}")
EOF
}

# checkout_importable PY MODULE...: status 0 when every module is found (not imported) and
# vocab_parallel_cce is this checkout's (run in isolated mode, so the current folder is not on the path).
checkout_importable() {
    local py=$1
    shift
    "$py" -I - "$PWD" "$@" <<'EOF'
import importlib.util, os, sys
def found(name):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
ours = found("vocab_parallel_cce")
ours = ours is not None and os.path.realpath(ours.origin or "").startswith(os.path.realpath(sys.argv[1]) + os.sep)
sys.exit(0 if ours and all(found(m) for m in sys.argv[2:]) else 1)
EOF
}

# pins_show PY NAME...: "name version | name version ..." as installed.
pins_show() {
    local py=$1
    shift
    "$py" - "$@" <<'EOF'
import sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
print(" | ".join(f"{n} {version(n)}" for n in sys.argv[1:]))
EOF
}

# pin_install PY SPEC: install one requirement (replacing another installed version).
pin_install() {
    local py=$1 spec=$2
    if [[ "$spec" == megatron-core* || "$spec" == megatron_core* ]]; then
        # Its hard dependencies resolved for this Python first (numpy's newest needs 3.12), then it
        # alone, past its Requires-Python (0.19 says 3.12 and runs on 3.11).
        "$py" -m pip install -q numpy "packaging>=24.2"
        "$py" -m pip install -q --no-deps --ignore-requires-python "$spec"
    else
        "$py" -m pip install -q "$spec"
    fi
}

# pins_ensure PY WHO SPEC...: install, in the order given, each requirement whose installed version
# differs; fails (status 1, naming them) if any is still unmet afterwards.
pins_ensure() {
    local py=$1 who=$2 line unmet
    shift 2
    unmet=$(pins_unmet "$py" "$@") || return 1
    local -a lines=()
    [[ -z "$unmet" ]] || mapfile -t lines <<<"$unmet"
    for line in "${lines[@]}"; do
        echo "$who: installing ${line%%$'\t'*} (installed: ${line#*$'\t'})" >&2
        pin_install "$py" "${line%%$'\t'*}" || return 1
    done
    pins_check "$py" "$who" "$@"
}

# pins_check PY WHO SPEC...: status 1, naming them, if installed versions do not satisfy the specs.
pins_check() {
    local py=$1 who=$2 unmet
    shift 2
    unmet=$(pins_unmet "$py" "$@") || return 1
    if [[ -n "$unmet" ]]; then
        unmet=${unmet//$'\t'/ installed: }
        echo "$who: error: installed versions differ from the pins: ${unmet//$'\n'/; }" >&2
        return 1
    fi
}
