#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs every test tier.
#   bash scripts/test.sh          the fast tiers (rules, plans, simulated ranks: no process group) on 2 pytest-xdist
#                                 workers, then the gloo tier (real processes, marked slow) serially: its ranks
#                                 already use every core, and two launches at once are slower than one after another
#   bash scripts/test.sh fast     the fast tiers only
#   bash scripts/test.sh ARGS...  one serial pytest run with ARGS (a file, -k, -m ...)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import tpfx, pytest, xdist" 2>/dev/null || python3 -m pip install -q -e '.[dev]'
PYTEST=(python3 -m pytest -q -p no:cacheprovider --durations=12)
WORKERS=${TPFX_TEST_WORKERS:-2}
if [[ $# -gt 0 && $1 != fast ]]; then exec "${PYTEST[@]}" "$@"; fi
start=$SECONDS
"${PYTEST[@]}" -n "$WORKERS" --dist loadfile -m "not slow" tests
[[ ${1:-} == fast ]] && exit 0
"${PYTEST[@]}" -m slow tests
echo "tpfx tests: every tier passed in $((SECONDS - start)) s"
