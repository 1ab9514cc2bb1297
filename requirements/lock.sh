#!/usr/bin/env bash
# Regenerate requirements/lock.txt: every package of the test environment (pyproject.toml with the `test`
# extra, which includes demo, llm, fusionbench, mergekit), exact versions, for CPython 3.11 on x86_64 Linux,
# with the top-level pins of requirements/pins.in. Run after changing a dependency in pyproject.toml or
# pins.in, then run both README Quickstart commands in a brand-new venv.
#
#     bash requirements/lock.sh
#
# uv's resolver (pinned here) reads PyPI; pip then installs the same versions (`pip install -c lock.txt`).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tool=${TMPDIR:-/tmp}/pmkernels-uv-$UV_VERSION
[ -x "$tool/bin/uv" ] || { python3 -m venv "$tool" && "$tool/bin/pip" install -q "uv==$UV_VERSION"; }
"$tool/bin/uv" pip compile pyproject.toml requirements/pins.in --extra test \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash requirements/lock.sh" \
    -o requirements/lock.txt
