#!/usr/bin/env bash
# Triton version matrix: for each supported Triton, build (or reuse) a venv, then run the interpreter
# tests of the kernels and the ahead-of-time compile subset (sm_90 + sm_80) with that Triton.
#   bash bench/scripts/triton_matrix.sh [VERSION ...]        # default: 3.6 3.8 3.9
# Env: PMK_VENV_DIR (default ~/.cache/pmkernels-triton-matrix): venvs live in $PMK_VENV_DIR/triton-X.Y.
#      PMK_TORCH_X_Y (e.g. PMK_TORCH_3_9): the torch requirement paired with Triton X.Y. Defaults: torch 2.11
#      for 3.6 (the docs/design.md §5 H100 image), torch 2.14.1 for 3.8 (CI); for 3.9 a torch that does not pin
#      another triton (a CPU build: torch==2.13.0+cpu from a local wheel directory or PyTorch's CPU index).
# A venv is reused when its triton already matches; the active python is used when it has that triton. Prints one line per version; exit 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venvs=${PMK_VENV_DIR:-$HOME/.cache/pmkernels-triton-matrix}
if [ $# -gt 0 ]; then versions=("$@"); else versions=(3.6 3.8 3.9); fi
declare -A default_torch=([3.6]="torch==2.11.0" [3.8]="torch==2.14.1" [3.9]="torch==2.13.0+cpu")
# Triton 3.6's interpreter converts 1-element arrays to scalars, which NumPy 2.4 turned into an error
declare -A numpy_req=([3.6]="numpy<2.4")
declare -A triton_pin=([3.6]="3.6.0" [3.8]="3.8.0" [3.9]="3.9.0")
summary=()
status=0
for v in "${versions[@]}"; do
    pin=${triton_pin[$v]:-$v.0}
    var="PMK_TORCH_${v//./_}"
    torch_req=${!var:-${default_torch[$v]:-torch}}
    venv="$venvs/triton-$v"
    py="$venv/bin/python"
    # the active environment already has this Triton (CI's venv has 3.8): use it, build nothing
    if python -c "import torch, triton, sys; sys.exit(triton.__version__ != '$pin')" 2>/dev/null; then
        py=$(python -c "import sys; print(sys.executable)")
    elif ! "$py" -c "import triton, sys; sys.exit(triton.__version__ != '$pin')" 2>/dev/null; then
        echo "== building $venv ($torch_req, triton==$pin)"
        mkdir -p "$venvs" && python3 -m venv "$venv" || { summary+=("$v: venv creation failed"); status=1; continue; }
        # torch first (its own triton pin, if any, is then replaced by the one under test)
        "$py" -m pip install -q "$torch_req" "${numpy_req[$v]:-numpy}" pytest hypothesis \
            && "$py" -m pip install -q --no-deps "triton==$pin" \
            || { summary+=("$v: install failed ($torch_req, triton==$pin)"); status=1; continue; }
    fi
    vers=$("$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)")
    echo "== Triton $v: $vers"
    mkdir -p "$venvs"; log="$venvs/triton-$v.log"
    PYTHONPATH="$root:$root/python_api" "$py" -m pytest -q -p no:cacheprovider \
        tests/ops/test_triton_pareto_linear.py tests/ops/test_weight_distances.py > "$log" 2>&1
    rc=$?
    line=$(tail -n 1 "$log")
    [ $rc -eq 0 ] || { status=1; tail -n 40 "$log"; }
    summary+=("$v ($vers): rc=$rc, $line  [log: $log]")
done
echo
echo "Triton matrix (interpreter tests + AOT compile subset):"
printf '  %s\n' "${summary[@]}"
exit $status
