#!/usr/bin/env bash
# Execute the notebooks and render them to HTML for reading (never committed).
# Usage: scripts/render_notebooks.sh [OUT_DIR] [NOTEBOOK...]   (default OUT_DIR: outputs/notebooks_html)
# Needs nbconvert (`pip install nbconvert`); honours BH_MODEL and BH_NOTEBOOK_SMALL like the notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mkdir -p "${1:-outputs/notebooks_html}" && cd "${1:-outputs/notebooks_html}" && pwd)"
shift || true
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(notebooks/0*.ipynb)
for nb in "${notebooks[@]}"; do
    name="$(basename "$nb" .ipynb)"
    # Execute in the notebook's own directory (outputs/ lands next to it, as under nbmake).
    (cd "$(dirname "$nb")" && jupyter nbconvert --to notebook --execute --output-dir "$out" \
        --output "$name.executed" "$(basename "$nb")")
    jupyter nbconvert --to html --output-dir "$out" --output "$name" "$out/$name.executed.ipynb"
done
echo "rendered into $out"
