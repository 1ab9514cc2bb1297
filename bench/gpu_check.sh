#!/usr/bin/env bash
# One command for a CUDA machine, sized for a short GPU window (a lent GPU here has 15 minutes in all):
#   bash bench/gpu_check.sh [--budget SECONDS] [--full] [OUT_DIR]
# Stages, the essential ones first; each one's wall time is printed and kept in OUT_DIR/stages.tsv:
#   1 cuda-tests   the `cuda`-marked tests: the docs/design.md shape grid (bf16/fp16/fp32, shared and
#                  per-sample γ, output and every gradient vs float64), no host sync on the forward path,
#                  a decode step captured in a CUDA graph and replayed, the data-free kernels
#   2 fwd          forward, bf16, at the ViT / LLM / decode shapes: triton vs F.linear, naive and torch
#   3 fwdbwd       forward + backward (frozen W), bf16, same shapes
#   4 autotune     the config each kernel picked at the §5 shapes
#   5 op-rest      the other op cases (fp16, trainable W)
#   6 triton-tests the interpreter's test files, compiled on the GPU (odd shapes, layouts, compile, autocast)
#   7 bench-rest   the model / LLM / new-preference / data-free suites
#   8 aot-subset   the ahead-of-time compile subset (CPU work; last)
# --budget SECONDS (default 540): no stage starts once that much time has passed since the start, and a
#   running stage is interrupted (SIGINT: pytest still writes what it measured) when the budget runs out.
# After every stage the "GPU run" section of bench/RESULTS.md is rewritten with what exists so far
#   (bench/scripts/gpu_run_report.py), so a cut run keeps its finished tables.
# Autotuning tries at most 2 configs per launch (PMKERNELS_AUTOTUNE_CONFIGS=2: the first ones each pruner
#   keeps, a fixed set per shape class); --full lifts the cap and the budget (the whole sweep: ~25+ min).
# Without a CUDA device it runs stage 8 only and exits with status 2.
set -uo pipefail
cd "$(dirname "$0")/.."

budget=540
full=0
out=bench-gpu
while [ $# -gt 0 ]; do
    case "$1" in
        --budget)
            [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs a number of seconds, got '${2:-}'" >&2; exit 2; }
            budget=$2; shift 2 ;;
        --full) full=1; budget=100000; shift ;;
        -h|--help) sed -n 2,22p "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option '$1' (expected --budget SECONDS, --full, OUT_DIR)" >&2; exit 2 ;;
        *) out=$1; shift ;;
    esac
done
if [ "$full" = 1 ]; then export PMKERNELS_AUTOTUNE_CONFIGS=0; else export PMKERNELS_AUTOTUNE_CONFIGS=${PMKERNELS_AUTOTUNE_CONFIGS:-2}; fi
mkdir -p "$out"
rm -f "$out"/bench-*.json "$out/stages.tsv" "$out/autotune.md"
if ! python -c "import torch, triton" 2>/dev/null; then
    echo "gpu_check: torch and triton must be importable by '$(command -v python)' (activate the project's venv)" >&2
    exit 2
fi

start=$SECONDS
failed=0
device=""

# stage NAME COMMAND...: run it with what is left of the budget, log to $out/NAME.log, record its time.
stage() {
    local name=$1; shift
    local left=$((budget - (SECONDS - start)))
    if [ "$left" -le 0 ]; then
        echo "stage $name: not started (budget of ${budget}s spent)"
        printf '%s\t-\tnot started (budget spent)\n' "$name" >> "$out/stages.tsv"
        return 0
    fi
    echo "stage $name: starting (${left}s of budget left)"
    local t0=$SECONDS rc=0
    timeout -s INT -k 20 "$left" "$@" > "$out/$name.log" 2>&1 || rc=$?
    local dt=$((SECONDS - t0)) status=ok
    if [ "$rc" = 124 ]; then status="cut at the budget"; elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; failed=1; fi
    tail -n 4 "$out/$name.log"
    echo "stage $name: ${dt}s, $status (log: $out/$name.log)"
    printf '%s\t%s\t%s\n' "$name" "$dt" "$status" >> "$out/stages.tsv"
    if [ -n "$device" ]; then python bench/scripts/gpu_run_report.py "$out" "$device" > "$out/report.log" 2>&1 || true; fi
}

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    stage aot-subset python bench/scripts/aot_sweep.py --subset
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); stages 1-7 need a machine with a GPU" >&2
    exit 2
fi
device=$(python -c "import torch, triton; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda)")
cap=$PMKERNELS_AUTOTUNE_CONFIGS; [ "$cap" = 0 ] && cap=all
echo "device: $device; budget ${budget}s; autotune configs per launch: $cap"

op=bench/test_bench_pareto_linear.py
pyt=(python -m pytest -q -p no:cacheprovider)
stage cuda-tests "${pyt[@]}" -rs -m cuda tests/ops/test_triton_pareto_linear.py tests/ops/test_triton_decode_graph.py \
    tests/ops/test_weight_distances.py
stage fwd "${pyt[@]}" "$op" --benchmark-only -k "bf16-fwd-" --benchmark-json="$out/bench-1-fwd.json"
stage fwdbwd "${pyt[@]}" "$op" --benchmark-only -k "bf16-fwdbwd-frozenW" --benchmark-json="$out/bench-2-fwdbwd.json"
stage autotune python bench/scripts/autotune_report.py --md "$out/autotune.md"
stage op-rest "${pyt[@]}" "$op" --benchmark-only -k "not bf16-fwd- and not bf16-fwdbwd-frozenW" \
    --benchmark-json="$out/bench-3-op-rest.json"
stage triton-tests "${pyt[@]}" -rs -m "not cuda" tests/ops/test_triton_pareto_linear.py tests/ops/test_triton_decode_graph.py
stage bench-rest "${pyt[@]}" bench --benchmark-only --ignore="$op" --benchmark-json="$out/bench-4-rest.json"
stage aot-subset python bench/scripts/aot_sweep.py --subset

echo "total: $((SECONDS - start))s of a ${budget}s budget; stages in $out/stages.tsv, tables in $out/report.md;" \
     "bench/RESULTS.md's GPU run section rewritten"
exit "$failed"
