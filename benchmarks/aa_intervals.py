"""A/A test of the verdict's intervals: two runs of ONE policy, how often an interval excludes zero.

The demo calls a configuration better than its control when a 95% paired-bootstrap interval of
the perplexity difference excludes zero. If the interval holds its level, two runs of the same
policy (here mixed top-k at one mean k, under two seeds: the same compute, the same rule, only the
random draws differ) should give an interval excluding zero in about 5% of replications. This
script runs ``--replications`` such pairs per data set and reports, for the window-level and the
document-level (cluster) bootstrap and the delete-one-document jackknife with t quantiles, the
false-positive rate with its exact binomial 95% interval (Clopper-Pearson, ``scipy.stats.binomtest``).

    python benchmarks/aa_intervals.py --replications 200 --json     # about 25 min on 2 CPU cores

``--json`` without a value writes ``benchmarks/results/aa_intervals_<device>_<commit>.json``.
The evaluation protocol is the demo's (windows of 256 tokens, the confirmation halves of the
embedded corpus's prose and code, 4,096 tokens each, softmax weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The intervals compared: window-level and document-level percentile bootstrap, document jackknife-t.
UNITS = ("window", "document", "document jackknife-t")
sys.path.insert(0, str(HERE.parent / "scripts"))


def run(*, replications: int, datasets: list[str], mean_k: float, max_tokens: int, window: int,
        resamples: int, device: str | None) -> dict:
    import torch
    from scipy.stats import binomtest

    from bh_helpers.evaluation.scoring import perplexity
    from bh_helpers.experiments.bootstrap import paired_bootstrap, paired_jackknife
    from bh_helpers.models.loading import load_model
    from bh_helpers.models.texts import evaluation_texts
    from bh_helpers.routing.patch import route
    from bh_helpers.selection.controls import MixedTopKSelector

    model, tok = load_model("tiny", device=device, dtype=torch.float32)
    out: dict = {"mean_k": mean_k, "replications": replications, "resamples": resamples, "window": window,
                 "max_tokens": max_tokens, "policy": f"MixedTopKSelector({mean_k}, seed=s), softmax weights",
                 "level": 0.95, "datasets": {}}
    for name in datasets:
        texts = evaluation_texts(name, tok, max_tokens=max_tokens)
        arms = []
        t0 = time.perf_counter()
        for seed in range(2 * replications):
            with route(model, MixedTopKSelector(mean_k, seed=seed, weights="softmax")):
                arms.append(perplexity(model, tok, texts, window=window, stride=window, progress=False))
        hits = dict.fromkeys(UNITS, 0)
        for r in range(replications):
            a, b = arms[2 * r], arms[2 * r + 1]
            arm_args = (a.window_nll, a.window_tokens, b.window_nll, b.window_tokens)
            for unit, clusters in (("window", None), ("document", a.window_docs)):
                res = paired_bootstrap(*arm_args, resamples=resamples, seed=r, clusters=clusters)
                hits[unit] += res.excludes_zero
            hits["document jackknife-t"] += paired_jackknife(*arm_args, clusters=a.window_docs).excludes_zero
        per_set = {"windows": len(arms[0].window_nll), "documents": len(set(arms[0].window_docs)),
                   "seconds": round(time.perf_counter() - t0, 1)}
        for unit, k in hits.items():
            ci = binomtest(k, replications).proportion_ci(confidence_level=0.95, method="exact")
            per_set[unit] = {"false_positives": k, "rate": k / replications,
                             "rate_ci95": [round(ci.low, 4), round(ci.high, 4)]}
        out["datasets"][name] = per_set
        print(name, json.dumps(per_set), flush=True)
    return out


def render(result: dict) -> str:
    """The README/docs table of one result file."""
    rows = ["| data set | windows | documents | " + " | ".join(f"{u}: false positives (95% CI)" for u in UNITS) + " |",
            "|---|---:|---:|" + "---|" * len(UNITS)]
    for name, r in result["datasets"].items():
        cells = [f"{r[u]['false_positives']}/{result['replications']} = {r[u]['rate']:.1%} "
                 f"[{r[u]['rate_ci95'][0]:.1%}, {r[u]['rate_ci95'][1]:.1%}]" for u in UNITS]
        rows.append(f"| {name} | {r['windows']} | {r['documents']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument("--datasets", nargs="+", default=["prose:confirm", "code:confirm"])
    parser.add_argument("--mean-k", type=float, default=2.5)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", nargs="?", const="scheme", default=None,
                        help="results file; without a value benchmarks/results/aa_intervals_<device>_<commit>.json")
    args = parser.parse_args(argv)
    if args.replications < 10:
        parser.error("--replications must be at least 10 (200 or more for a rate with a useful interval)")
    import torch

    from _results import output

    torch.set_num_threads(args.threads)
    result = run(replications=args.replications, datasets=args.datasets, mean_k=args.mean_k,
                 max_tokens=args.max_tokens, window=args.window, resamples=args.resamples, device=args.device)
    print(render(result))
    path = output(args.json, "aa_intervals", device=args.device)
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
