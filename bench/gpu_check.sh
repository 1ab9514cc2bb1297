#!/usr/bin/env bash
# One command for a CUDA machine: correctness on real hardware, autotuning, the benchmarks, their report.
#   bash bench/gpu_check.sh [OUT_DIR]
# 0. the ahead-of-time compile sweep (no GPU needed): every kept config fits and does not spill.
# 1. tests/ with CUDA present: the Triton kernels run compiled on the GPU (not the interpreter), and the
#    tests marked `cuda` (the docs/design.md shape grid at bf16/fp16/fp32, shared and per-sample γ) run.
# 2. autotuning at the docs/design.md §5 shapes: which config each kernel picked on this GPU.
# 3. pytest bench --benchmark-only at full size (the default on CUDA), every impl side by side.
# 4. bench.scripts.report: Markdown tables (ratios to F.linear and naive in the same run) and a PNG per shape,
#    written into the "GPU run" section of bench/RESULTS.md with the device and versions.
# Without a CUDA device it stops after step 0 with a message and exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
if ! python -c "import torch, triton" 2>/dev/null; then
    echo "gpu_check: torch and triton must be importable by '$(command -v python)' (activate the project's venv)" >&2
    exit 2
fi
sweep="passed"
python bench/scripts/aot_sweep.py --subset > "$out/aot_sweep.log" 2>&1 || {
    rc=$?; tail -n 30 "$out/aot_sweep.log"
    [ "$rc" = 77 ] || { echo "gpu_check: the AOT compile sweep failed (log: $out/aot_sweep.log)" >&2; exit 1; }
    sweep="skipped (this Triton has no CUDA compiler)"
}
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False). The compile sweep $sweep" \
         "(log: $out/aot_sweep.log); steps 1-4 need a machine with a GPU." >&2
    exit 2
fi
device=$(python -c "import torch, triton; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda)")
echo "device: $device"
python -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$out/tests.log"
python bench/scripts/autotune_report.py --md "$out/autotune.md" 2>&1 | tee "$out/autotune.log"
python -m pytest bench --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.log"
python -m bench.scripts.report "$out/bench.json" --md "$out/report.md" --png "$out/report.png"
python - "$out" "$device" <<'PY'
import datetime, subprocess, sys
sys.path.insert(0, "bench/scripts")
from aot_sweep import write_results
out, device = sys.argv[1], sys.argv[2]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
body = open(f"{out}/report.md").read() + "\n\n### Autotuned configs\n\n" + open(f"{out}/autotune.md").read()
write_results(f"## GPU run, {datetime.date.today()}: {device}, commit {commit or '?'}\n\n"
              "`bash bench/gpu_check.sh` (measured; ratios in the same run)\n\n" + body,
              begin="<!-- gpu-run:begin -->", end="<!-- gpu-run:end -->")
PY
echo "results in $out/; bench/RESULTS.md's GPU run section rewritten"
