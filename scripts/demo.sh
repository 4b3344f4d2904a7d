#!/usr/bin/env bash
# The README's demo command: installs what it needs, then shards the built-in Llama over 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import tpfx" 2>/dev/null || python3 -m pip install -q -e '.[dev]'
exec python3 -m tpfx.cli demo "$@"
