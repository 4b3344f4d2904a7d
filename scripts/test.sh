#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs every test tier (slow gloo tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import tpfx, pytest" 2>/dev/null || python3 -m pip install -q -e '.[dev]'
exec python3 -m pytest -q -p no:cacheprovider --durations=12 tests "$@"
