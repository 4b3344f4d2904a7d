#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs every test tier.
#   bash scripts/test.sh          phase 1: the fast tiers (rules, plans, simulated ranks; a few tiny launcher tests)
#                                 and the slow tests marked one_process (ranks as threads of the test process, or a
#                                 notebook kernel) on 2 pytest-xdist workers; phase 2: the gloo tier (real processes,
#                                 marked slow) one test at a time: its ranks already use every core, and two launches
#                                 at once are slower than one after another. Both phases run; either failing fails.
#   bash scripts/test.sh fast [ARGS...]   the fast tiers only (ARGS go to pytest)
#   bash scripts/test.sh ARGS...          one serial pytest run with ARGS (a file, -k, -m ...)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import tpfx, pytest, xdist" 2>/dev/null || python3 -m pip install -q -e '.[dev]'
PYTEST=(python3 -m pytest -q -p no:cacheprovider --durations=12)
WORKERS=${TPFX_TEST_WORKERS:-2}
if [[ ${1:-} == fast ]]; then shift; exec "${PYTEST[@]}" -n "$WORKERS" --dist loadfile -m "not slow" tests "$@"; fi
if [[ $# -gt 0 ]]; then exec "${PYTEST[@]}" "$@"; fi
start=$SECONDS
rc=0
"${PYTEST[@]}" -n "$WORKERS" --dist loadfile -m "not slow or one_process" tests || rc=$?
"${PYTEST[@]}" -m "slow and not one_process" tests || rc=$?
echo "tpfx tests: both phases ran in $((SECONDS - start)) s; exit status $rc"
exit "$rc"
