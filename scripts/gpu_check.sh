#!/usr/bin/env bash
# GPU checks (issue 33): one command, one line per check; on a machine with no CUDA device it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch
python3 -c "import tpfx" 2>/dev/null || python3 -m pip install -q -e .
exec python3 scripts/gpu_check.py "$@"
