"""How long one slider move of the alpha explorer takes (the promise: under 100 ms, end to end).

Builds :class:`~bh_helpers.app.widgets.AlphaExplorer` on synthetic router logits (per token a few
"strong" experts shifted up, as in ``tests/test_widgets.py``) at the tiny model's notebook size and
at OLMoE-1B-7B's (16 layers, 64 experts) and measures two things:

- ``update``: the computation alone (``AlphaExplorer.update``), moving alpha, kernel and layer;
- ``end to end``: the widget itself (ipywidgets, no browser): from a control's value change (alpha
  slider on most moves, the kernel and layer dropdowns now and then) to the moment the output
  image widget's value is replaced with the new PNG, timed in Python by an observer on the image.

It prints medians and the slowest move against the 100 ms budget; exit status 1 when an
end-to-end median misses it. A benchmark, not a test: shared machines are noisy.

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


def measure_widget(tokens: int, layers: int, moves: int) -> dict:
    """Slider value change -> image widget value replaced, in ms, through the real ipywidgets UI."""
    import time

    calibration = synthetic_logits(0, 4096, layers)
    banks = {k: fit_null_bank(calibration, kernel=k) for k in ("gaussian", "empirical")}
    explorer = AlphaExplorer(synthetic_logits(1, tokens, layers), banks, [f"t{i}" for i in range(tokens)],
                             max_tokens=tokens)
    explorer.widget()
    controls, image = explorer._ui["controls"], explorer._ui["image"]
    replaced: list[float] = []
    image.observe(lambda change: replaced.append(time.perf_counter()), names="value")
    controls["alpha"].value = 0.05  # warm-up: the first draw at a max_k builds its cached figure
    times = []
    for i, alpha in enumerate(np.geomspace(1e-4, 0.9, moves)):
        control, value = (controls["kernel"], ("empirical", "gaussian")[(i // 5) % 2]) if i % 5 == 4 else \
            (controls["layer"], explorer.layers[(i // 7) % layers]) if i % 7 == 6 else (controls["alpha"], float(alpha))
        if control.value == value:
            control, value = controls["alpha"], float(alpha) * 1.01
        replaced.clear()
        start = time.perf_counter()
        control.value = value
        if not replaced:
            raise RuntimeError(f"moving {control.description} to {value!r} did not replace the image")
        times.append((replaced[-1] - start) * 1e3)
    return {"median_ms": float(np.median(times)), "max_ms": max(times), "moves": moves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=25)
    parser.add_argument("--json", nargs="?", const="scheme", default=None, help="results JSON; without a value: benchmarks/results/bench_widgets_<device>_<commit>.json (INDEX.md)")
    args = parser.parse_args(argv)
    args.json = output(args.json, "bench_widgets", "cpu")
    results = {name: {"update": measure(tokens, layers, args.moves),
                      "end_to_end": measure_widget(tokens, layers, args.moves)}
               for name, (tokens, layers) in SHAPES.items()}
    print(f"AlphaExplorer on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; budget {BUDGET_MS:.0f} ms per move, end to end")
    missed = False
    for name, r in results.items():
        for what, m in r.items():
            ok = m["median_ms"] < BUDGET_MS
            missed |= what == "end_to_end" and not ok
            print(f"  {name}, {what.replace('_', ' ')}: median {m['median_ms']:.1f} ms, slowest {m['max_ms']:.1f} ms "
                  f"over {m['moves']} moves; median / budget = {m['median_ms'] / BUDGET_MS:.2f} "
                  f"({'met' if ok else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget_ms": BUDGET_MS, "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
