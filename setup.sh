#!/usr/bin/env bash
# Creates .venv and installs everything the project needs from its own files (no downloads at
# run time afterwards). Safe to re-run. PYTHON=python3.11 bash setup.sh picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first and alone: with the pin, pip takes the CPU build instead of a multi-GB CUDA one.
.venv/bin/python -m pip install --quiet "$(grep -E '^torch==' requirements.txt)"
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
# Our kernels (rowdot.c, panels.c, attend.c) built now, once, into the cache, rather than at the first run's start;
# with no C compiler they are not candidates, and this says why.
.venv/bin/python -c "from starcoder_tp import rowdot; print('kernels:', rowdot.path() or 'not built: ' + rowdot.unavailable())"
.venv/bin/python -c "import torch, transformers, starcoder_tp; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__)"
