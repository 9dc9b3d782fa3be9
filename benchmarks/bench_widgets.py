"""How long one slider move of the alpha explorer takes (the promise: well under 100 ms).

Builds :class:`~bh_helpers.app.widgets.AlphaExplorer` on synthetic router logits (per token a few
"strong" experts shifted up, as in ``tests/test_widgets.py``) at the tiny model's notebook size and
at OLMoE-1B-7B's (16 layers, 64 experts), moves alpha, kernel and layer like a user dragging the
sliders, and prints the median and slowest update against the 100 ms budget. Exit status 1 when
a median misses it. A benchmark, not a test: shared machines are noisy.

    python benchmarks/bench_widgets.py [--moves 25] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from bh_helpers.app.widgets import AlphaExplorer
from bh_helpers.nulls.fit import fit_null_bank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _results import output  # noqa: E402  (the results naming of benchmarks/results/INDEX.md)

BUDGET_MS = 100.0
# notebook 04 caches EXPLORER_TOKENS = 2048 tokens of every MoE layer
SHAPES = {"tiny OLMoE (2048 tokens x 6 layers)": (2048, 6), "OLMoE-1B-7B (2048 tokens x 16 layers)": (2048, 16)}
EXPERTS = 64


def synthetic_logits(seed: int, tokens: int, layers: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        x = torch.randn(tokens, EXPERTS, generator=g)  # (N, E)
        strong = torch.randint(0, EXPERTS, (tokens, 1 + layer % 4), generator=g)  # (N, s)
        x.scatter_add_(1, strong, 4.0 + 2.0 * torch.rand(tokens, 1 + layer % 4, generator=g))
        out[layer] = x
    return out


def measure(tokens: int, layers: int, moves: int) -> dict:
    calibration = synthetic_logits(0, 4096, layers)
    banks = {k: fit_null_bank(calibration, kernel=k) for k in ("gaussian", "empirical")}
    explorer = AlphaExplorer(synthetic_logits(1, tokens, layers), banks, [f"t{i}" for i in range(tokens)],
                             max_tokens=tokens)
    explorer.update(alpha=0.05)  # warm-up: first call builds caches
    explorer.timings_ms.clear()
    for i, alpha in enumerate(np.geomspace(1e-4, 0.9, moves)):
        explorer.update(alpha=float(alpha), kernel=("gaussian", "empirical")[i % 2], layer=i % layers)
    return {"median_ms": explorer.median_update_ms(), "max_ms": max(explorer.timings_ms), "moves": moves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=25)
    parser.add_argument("--json", nargs="?", const="scheme", default=None, help="results JSON; without a value: benchmarks/results/bench_widgets_<device>_<commit>.json (INDEX.md)")
    args = parser.parse_args(argv)
    args.json = output(args.json, "bench_widgets", "cpu")
    results = {name: measure(tokens, layers, args.moves) for name, (tokens, layers) in SHAPES.items()}
    print(f"AlphaExplorer.update on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; budget {BUDGET_MS:.0f} ms per move")
    missed = False
    for name, r in results.items():
        ok = r["median_ms"] < BUDGET_MS
        missed |= not ok
        print(f"  {name}: median {r['median_ms']:.1f} ms, slowest {r['max_ms']:.1f} ms over {r['moves']} moves; "
              f"median / budget = {r['median_ms'] / BUDGET_MS:.2f} ({'met' if ok else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget_ms": BUDGET_MS, "results": results}, f, indent=2)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
