"""How the width of the paired intervals changes with evaluation tokens (issue 14, item 6).

Reads a sweep with controls (``sweep.jsonl`` of ``bh-routing demo``) and recomputes each
adaptive row's interval against its mixed top-k control on the first 1/4, 1/2, 3/4 and all of its
scoring windows (the same windows for both arms), printing the median and mean width per token
count as a markdown table.

    python scripts/interval_width.py bh_routing_output/sweep.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys

from bh_helpers.experiments.bootstrap import paired_bootstrap
from bh_helpers.experiments.configs import SweepConfig
from bh_helpers.experiments.sweep import load_results


def widths(path: str, fractions=(0.25, 0.5, 0.75, 1.0)) -> dict[int, list[float]]:
    """{tokens: [interval width of each adaptive row vs its mixed control]}."""
    df = load_results(path)
    rows = {(r["key"], r["dataset"]): r for _, r in df.iterrows()}
    out: dict[int, list[float]] = {}
    for _, mixed in df[df["method"] == "mixed"].iterrows():
        adaptive = rows[(SweepConfig.from_dict(json.loads(mixed["control_of"])).key(), mixed["dataset"])]
        windows = len(mixed["window_nll"])
        for fraction in fractions:
            n = max(2, round(fraction * windows))
            b = paired_bootstrap(adaptive["window_nll"][:n], adaptive["window_tokens"][:n], mixed["window_nll"][:n],
                                 mixed["window_tokens"][:n], resamples=1000)
            out.setdefault(int(sum(mixed["window_tokens"][:n])), []).append(b.high - b.low)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    table = widths(argv[0])
    print("| scored tokens per data set | adaptive rows | median 95% interval width | mean width |")
    print("|---:|---:|---:|---:|")
    for tokens, w in sorted(table.items()):
        print(f"| {tokens:,} | {len(w)} | {statistics.median(w):.3f} | {statistics.mean(w):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
