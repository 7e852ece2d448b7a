#!/usr/bin/env bash
# Installs moray and everything it needs into the current Python, in the order that works:
# torch's CPU build first (a looser requirement would pull a multi-GB CUDA build), then
# DeepSpeed against that torch (its build imports torch, so no build isolation), then moray.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${MORAY_TORCH_VERSION:-2.13.0}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==${TORCH_VERSION}"
fi
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    "$PY" -m pip install --quiet setuptools wheel ninja
    "$PY" -m pip install --quiet --no-build-isolation "deepspeed>=0.16"
fi
"$PY" -m pip install --quiet -e ".[test]"
# torch's CPU build comes without Triton; the suite runs the GPU kernels in Triton's interpreter
# (tests/model/test_kernels_interpreted.py). 3.8.0: 3.9.0's interpreter refuses load masks made
# from a comparison with a scalar. A CUDA torch brings its own Triton, left as it is.
if "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" &&
        ! "$PY" -c "import sys, triton; sys.exit(triton.__version__ != '3.8.0')" 2>/dev/null; then
    "$PY" -m pip install --quiet "triton==3.8.0"
fi
# the dashboard's browser tests drive Debian's Chromium through Playwright (never `playwright install`)
command -v chromium >/dev/null || apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
echo "moray installed: $("$PY" -c 'import ray, torch, deepspeed; print("ray", ray.__version__, "| torch", torch.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
