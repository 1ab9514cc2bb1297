#!/usr/bin/env bash
# One command for a CUDA machine: correctness on real hardware, then the benchmarks and their report.
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. tests/ with CUDA present: the Triton kernels run compiled on the GPU (not the interpreter), and the
#    tests marked `cuda` (the DESIGN.md shape grid at bf16/fp16/fp32, shared and per-sample γ) run.
# 2. pytest bench --benchmark-only at full size (the default on CUDA), every impl side by side.
# 3. bench.report: Markdown tables (ratios to F.linear and naive in the same run) and a PNG per shape.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$out/tests.log"
python -m pytest bench --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.log"
python -m bench.report "$out/bench.json" --md "$out/report.md" --png "$out/report.png"
echo "results in $out/ (paste report.md into bench/RESULTS.md with the date, device and versions)"
