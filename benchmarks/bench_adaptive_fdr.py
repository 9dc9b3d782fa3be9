"""Issue 16 on the GPU: inverse-p weights in the fused selector, and per-layer alpha at OLMoE-1B-7B shape.

1. Selector: the fused BH selector (pooled Gaussian null) with renormalised softmax weights (the
   sorted kernel: logit cuts, no p-value per token) against inverse-p weights (the lookup kernel:
   each p-value computed in the kernel), at 1 .. 65,536 tokens x 64 experts, interleaved rounds,
   ratio = median of per-round paired ratios. Every selection is first checked against the
   reference (``select_experts`` on the bank's p-values): same experts, weights within 1e-5.
2. ``--model FOLDER`` (an OLMoE-1B-7B-shaped checkpoint from ``benchmarks/t4_emulation.py --steps
   build``), in ``--dtype`` (bfloat16, or float16 for the emulated T4 path): calibration logits
   captured, a raw Gaussian bank fitted, then routed on evaluation text: BH at one global alpha
   for a mean-k target, BH with per-layer alphas that reach the target in every layer
   (``ComputeBudget.alpha(per_layer=True)``), and BH, mixed top-k and top-8 with inverse-p
   weights: finite perplexity, mean k overall and per layer, wall time.

    python benchmarks/bench_adaptive_fdr.py --json [--model /tmp/t4/model --dtype bfloat16]
    BH_T4_EMULATION=1 PYTHONPATH=benchmarks/t4_site:. python benchmarks/bench_adaptive_fdr.py --json \
        --model /tmp/t4/model --dtype float16      # the emulated T4 run

``--json`` without a value writes ``benchmarks/results/adaptive_fdr_<bf16|fp16|t4_emulated>_<device>_<commit>.json``;
the README tables are ``render`` of the two files INDEX.md names (``python scripts/render_results.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_gpu import round_medians  # benchmarks/ is on sys.path when a benchmark runs

from bh_helpers.nulls.fit import fit_null_bank
from bh_helpers.selection.fused import select_with_null
from bh_helpers.selection.reference import select_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _results import output  # noqa: E402  (the results naming of benchmarks/results/INDEX.md)


def selector_bench(sizes: list[int], rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({0: torch.randn(50_000, 64, generator=g) * 1.3})
    null = bank[0]
    out: dict = {}
    for n in sizes:
        x = (torch.randn(n, 64, generator=g) * 1.3).cuda()
        variants = {}
        for weights in ("renorm", "inverse_p"):
            ref = select_experts(x, bank.pvalues(x, 0), method="bh", alpha=0.2, max_k=8, weights=weights)
            got = select_with_null(x, null, method="bh", alpha=0.2, max_k=8, weights=weights, validate=False)
            assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts), (weights, n)
            torch.testing.assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
            variants[weights] = lambda x=x, w=weights: select_with_null(x, null, method="bh", alpha=0.2, max_k=8,
                                                                        weights=w, validate=False)
        per_round = round_medians(variants, rounds=rounds)  # warm-up: compilation, plans, cuts
        out[n] = {name: 1e6 * statistics.median(t) for name, t in per_round.items()}
        out[n]["inverse_p_x_renorm"] = statistics.median(
            a / b for a, b in zip(per_round["inverse_p"], per_round["renorm"]))
        print(n, {k: round(v, 3) for k, v in out[n].items()}, flush=True)
    return out


def model_check(folder: str, dtype: torch.dtype, target: float, tokens: int) -> dict:
    from bh_helpers.capture import capture_calibration
    from bh_helpers.evaluation.scoring import perplexity
    from bh_helpers.models.loading import load_model
    from bh_helpers.models.texts import evaluation_texts
    from bh_helpers.routing.patch import route
    from bh_helpers.selection.budget import ComputeBudget
    from bh_helpers.selection.controls import MixedTopKSelector
    from bh_helpers.selection.selectors import BHSelector, TopKSelector

    model, tok = load_model(folder, device="cuda", dtype=dtype)
    captured = capture_calibration(model, tok, max_tokens=4096, model_id=folder, progress=False)
    texts = evaluation_texts("prose", tok, max_tokens=tokens)
    bank = fit_null_bank(captured, model_id=folder)
    budget = ComputeBudget(bank, captured)
    alpha, layer_alpha = budget.alpha(target), budget.alpha(target, per_layer=True)
    out: dict = {"dtype": str(dtype), "gpu": torch.cuda.get_device_name(), "target_mean_k": target,
                 "alpha": alpha, "layer_alphas": layer_alpha}

    def run(name, selector):
        with route(model, selector) as rec:
            t0 = time.perf_counter()
            ppl = perplexity(model, tok, texts, window=256, stride=256, batch_size=8, progress=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        summary = rec.summary()
        out[name] = {"perplexity": ppl.perplexity, "mean_k": summary["mean_k"], "s": seconds,
                     "per_layer_mean_k": {layer: s["mean_k"] for layer, s in summary["per_layer"].items()}}
        assert torch.isfinite(torch.tensor(ppl.perplexity)), name
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "per_layer_mean_k"}), flush=True)
        return out[name]

    run("bh global alpha, softmax", BHSelector(bank, alpha=alpha, max_k=8, weights="softmax"))
    per_layer = run("bh per-layer alpha, softmax", BHSelector(bank, alpha=layer_alpha, max_k=8, weights="softmax"))
    spread = per_layer["per_layer_mean_k"].values()
    out["per_layer_spread_of_mean_k"] = {"per-layer alpha": max(spread) - min(spread)}
    spread = out["bh global alpha, softmax"]["per_layer_mean_k"].values()
    out["per_layer_spread_of_mean_k"]["global alpha"] = max(spread) - min(spread)
    bh = run("bh global alpha, inverse_p", BHSelector(bank, alpha=alpha, max_k=8, weights="inverse_p"))
    run("mixed top-k, inverse_p", MixedTopKSelector(bh["per_layer_mean_k"], max_k=8, weights="inverse_p",
                                                    null_bank=bank))
    run("top-8, inverse_p", TopKSelector(k=8, weights="inverse_p", null_bank=bank))
    return out


def render(bf16: dict, t4: dict) -> str:
    """The README's tables of this benchmark, from its JSON files (bfloat16 run, emulated T4 run)."""
    sel = bf16["selector"]
    lines = [f"On one {bf16['gpu']} (torch {bf16['torch']}):",
             "", "| tokens x 64 | fused BH, renorm weights | inverse-p weights | ratio |", "|---:|---:|---:|---:|"]
    for n, row in sel.items():
        lines.append(f"| {int(n):,} | {row['renorm']:.1f} us | {row['inverse_p']:.1f} us | "
                     f"{row['inverse_p_x_renorm']:.2f}x |")
    lines += ["", "| OLMoE-1B-7B shape, random weights, 4,096 prose tokens | dtype | perplexity | mean k | "
              "per-layer mean k (min..max) |", "|---|---|---:|---:|---|"]
    for run in (bf16["model"], t4["model"]):
        dtype = "bfloat16" if "bfloat16" in run["dtype"] else "float16, emulated T4"
        for name, row in run.items():
            if isinstance(row, dict) and "perplexity" in row:
                k = row["per_layer_mean_k"].values()
                lines.append(f"| {name} | {dtype} | {row['perplexity']:,.0f} | {row['mean_k']:.2f} | "
                             f"{min(k):.2f}..{max(k):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 4096, 65536])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default=None, help="OLMoE-1B-7B-shaped checkpoint folder for the model check")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--target", type=float, default=4.0, help="mean k target of the model check")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens of the model check")
    parser.add_argument("--json", nargs="?", const="scheme", default=None,
                        help="results JSON; without a value: benchmarks/results/adaptive_fdr_<bf16|fp16|t4_emulated>"
                             "_<device>_<commit>.json (INDEX.md)")
    args = parser.parse_args()
    variant = "t4_emulated" if os.environ.get("BH_T4_EMULATION") == "1" else {"bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    args.json = output(args.json, f"adaptive_fdr_{variant}")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.sizes:
        report["selector"] = selector_bench(args.sizes, args.rounds)
    if args.model:
        report["model"] = model_check(args.model, getattr(torch, args.dtype), args.target, args.tokens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
