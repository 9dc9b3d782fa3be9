"""Per-token statistics on the GPU: the fused selector's cost, and routing at OLMoE-1B-7B shape.

1. Selector: ``softmax + topk(8)`` against the fused BH selector with a pooled Gaussian null on
   the raw, centred and z-scored statistic, at 1 .. 65,536 tokens x 64 experts (float32 logits,
   as ``route`` computes them). Variants take turns over interleaved rounds; the ratio is the
   median of per-round paired ratios (target: fused <= 1.2x of softmax + topk(8) at every size for
   the raw statistic, the acceptance bar of issue 14; the other statistics are reported).
   Every fused selection is checked equal to the reference (``select_experts`` on the bank's
   p-values) first.
2. ``--model FOLDER`` (an OLMoE-1B-7B-shaped checkpoint, e.g. from ``benchmarks/t4_emulation.py
   --steps build``): loaded in bfloat16, calibration logits captured, one bank per statistic
   fitted, then BH at a compute target, its mixed top-k and shuffled controls routed through the
   model on evaluation text: finite outputs, mean k, perplexity, wall time per forward.

    python benchmarks/bench_statistics.py --rounds 5 --json [--model /tmp/t4/olmoe-7b-shaped]

``--json`` without a value writes ``benchmarks/results/statistics_<device>_<commit>.json``.
"""

from __future__ import annotations

import argparse
import json
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
    calib = {0: torch.randn(50_000, 64, generator=g) * 1.3 + torch.randn(50_000, 1, generator=g)}
    banks = {s: fit_null_bank(calib, statistic=s) for s in ("raw", "centred", "zscore")}
    out: dict = {}
    for n in sizes:
        x = (torch.randn(n, 64, generator=g) * 1.3 + torch.randn(n, 1, generator=g)).cuda()
        variants = {"softmax+topk8": lambda x=x: torch.softmax(x, -1, dtype=torch.float).topk(8, dim=-1)}
        for s, bank in banks.items():
            null = bank[0]
            ref = select_experts(x, bank.pvalues(x, 0), method="bh", alpha=0.05, max_k=8)
            got = select_with_null(x, null, method="bh", alpha=0.05, max_k=8, validate=False)
            assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts), (s, n)
            variants[f"fused bh {s}"] = lambda x=x, null=null: select_with_null(x, null, method="bh", alpha=0.05,
                                                                                max_k=8, validate=False)
        per_round = round_medians(variants, rounds=rounds)  # warm-up: compilation, plans, cuts
        base = per_round["softmax+topk8"]
        out[n] = {name: {"us": 1e6 * statistics.median(t),
                         "x_softmax_topk": statistics.median(a / b for a, b in zip(t, base))}
                  for name, t in per_round.items()}
        print(n, {k: round(v["x_softmax_topk"], 3) for k, v in out[n].items()}, flush=True)
    return out


def model_check(folder: str, target: float, tokens: int) -> dict:
    from bh_helpers.capture import capture_calibration
    from bh_helpers.evaluation.scoring import perplexity
    from bh_helpers.models.loading import load_model
    from bh_helpers.models.texts import evaluation_texts
    from bh_helpers.routing.patch import route
    from bh_helpers.selection.budget import alpha_for_mean_k
    from bh_helpers.selection.controls import MixedTopKSelector, ShuffledSelector
    from bh_helpers.selection.selectors import BHSelector

    model, tok = load_model(folder, device="cuda", dtype=torch.bfloat16)
    captured = capture_calibration(model, tok, max_tokens=4096, model_id=folder, progress=False)
    texts = evaluation_texts("prose", tok, max_tokens=tokens)
    out: dict = {"dtype": "bfloat16", "gpu": torch.cuda.get_device_name(), "target_mean_k": target}
    for statistic in ("raw", "centred", "zscore"):
        bank = fit_null_bank(captured, statistic=statistic, model_id=folder)
        alpha = alpha_for_mean_k(bank, captured, target)
        bh = BHSelector(bank, alpha=alpha, max_k=8, weights="softmax")
        rows = {}
        with route(model, bh) as rec:
            t0 = time.perf_counter()
            ppl = perplexity(model, tok, texts, window=256, stride=256, batch_size=8, progress=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        per_layer = {layer: s["mean_k"] for layer, s in rec.summary()["per_layer"].items()}
        rows["bh"] = {"alpha": alpha, "mean_k": rec.summary()["mean_k"], "perplexity": ppl.perplexity, "s": seconds}
        for name, sel in (("mixed", MixedTopKSelector(per_layer, max_k=8, weights="softmax")),
                          ("shuffled", ShuffledSelector(bh, weights="softmax"))):
            with route(model, sel) as rec:
                t0 = time.perf_counter()
                ppl = perplexity(model, tok, texts, window=256, stride=256, batch_size=8, progress=False)
                torch.cuda.synchronize()
                rows[name] = {"mean_k": rec.summary()["mean_k"], "perplexity": ppl.perplexity,
                              "s": time.perf_counter() - t0}
        assert all(torch.isfinite(torch.tensor(r["perplexity"])) for r in rows.values())
        out[statistic] = rows
        print(statistic, json.dumps(rows), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 4096, 65536])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default=None, help="OLMoE-1B-7B-shaped checkpoint folder for the model check")
    parser.add_argument("--target", type=float, default=4.0, help="mean k target of the model check")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens of the model check")
    parser.add_argument("--json", nargs="?", const="scheme", default=None, help="results JSON; without a value: benchmarks/results/statistics_<device>_<commit>.json (INDEX.md)")
    args = parser.parse_args()
    args.json = output(args.json, "statistics")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "selector": selector_bench(args.sizes, args.rounds)}
    if args.model:
        report["model"] = model_check(args.model, args.target, args.tokens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
