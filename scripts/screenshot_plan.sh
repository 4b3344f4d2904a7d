#!/usr/bin/env bash
# Render a plan's HTML page and screenshot it in headless Chromium, to check by eye that the page renders
# (drawing, tables, explanations). A manual check, not part of CI.
#
#   bash scripts/screenshot_plan.sh [OUT_DIR] [-- tpfx plan arguments]
#
# Defaults: OUT_DIR=/tmp, model `llama --world-size 2 --layers 2` (default Llama widths, meta device).
# Writes OUT_DIR/plan.html and OUT_DIR/plan.png (1400x1000; set HEIGHT=3000 for the whole page) and
# prints their paths; open the PNG in any image viewer.
#
# Needs: chromium (`apt-get install -y chromium`) and, for the drawing, Graphviz (`apt-get install -y
# graphviz`; without it the page shows the DOT text instead of the SVG).
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir=${1:-/tmp}
shift || true
[[ "${1:-}" == "--" ]] && shift
plan_args=("$@")
[[ ${#plan_args[@]} -eq 0 ]] && plan_args=(llama --world-size 2 --layers 2)

browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "screenshot_plan.sh: no chromium found; install it with: apt-get install -y chromium" >&2
    exit 1
fi
command -v dot >/dev/null || echo "screenshot_plan.sh: Graphviz 'dot' missing: the page will show DOT text" \
    "(apt-get install -y graphviz)" >&2

mkdir -p "$out_dir"
html="$out_dir/plan.html"
png="$out_dir/plan.png"
python3 -m tpfx.cli plan "${plan_args[@]}" --format html -o "$html"
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --screenshot="$png" --window-size="1400,${HEIGHT:-1000}" "file://$(realpath "$html")" \
    2>/dev/null
echo "page:       $html"
echo "screenshot: $png"
