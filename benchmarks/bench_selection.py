"""Time per call of the expert selector against the native router's ``softmax + topk(8)``.

Both run on the same logits in one process, side by side, so the printed ratios are comparable
even on a noisy shared machine (absolute times are not).

    python benchmarks/bench_selection.py                 # CPU, tokens in 1, 64, 4096, 65536
    python benchmarks/bench_selection.py --device cuda --tokens 1 64 4096 65536 1048576 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bh_helpers.selection.reference import select_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _results import output  # noqa: E402  (the results naming of benchmarks/results/INDEX.md)


def median_time(fn, *, device: torch.device, min_repeats: int = 5, min_seconds: float = 0.5) -> float:
    """Median wall time of ``fn()`` in seconds, after a warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10_000:
            break
    return statistics.median(times)


def native_router(logits: torch.Tensor, k: int = 8):
    """What OLMoE's router does after its linear layer: softmax over experts, then top-k."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    return probs.topk(k, dim=-1)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 65536], help="token counts")
    parser.add_argument("--experts", type=int, default=64, help="number of experts E")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="logit dtype")
    parser.add_argument("--alpha", type=float, default=0.05, help="BH level")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", nargs="?", const="scheme", default=None, help="results JSON; without a value: benchmarks/results/bench_selection_<device>_<commit>.json (INDEX.md)")
    args = parser.parse_args(argv)
    args.json = output(args.json, "bench_selection", args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    header = f"{'tokens':>9} {'softmax+topk8':>14} {'select bh':>12} {'ratio':>7} {'select topk8':>13} {'ratio':>7}"
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, E={args.experts}, dtype={args.dtype}")
    print(header)
    for n in args.tokens:
        logits = (torch.randn(n, args.experts, generator=gen) * 2).to(device=device, dtype=dtype)
        pvalues = torch.rand(n, args.experts, generator=gen).pow(3).to(device)  # some small p-values
        t_native = median_time(lambda: native_router(logits), device=device)
        t_bh = median_time(
            lambda: select_experts(logits, pvalues, method="bh", alpha=args.alpha, max_k=8, validate=False),
            device=device,
        )
        t_topk = median_time(
            lambda: select_experts(logits, method="topk", k=8, weights="softmax", validate=False), device=device
        )
        row = dict(tokens=n, native_s=t_native, bh_s=t_bh, topk_s=t_topk,
                   bh_ratio=t_bh / t_native, topk_ratio=t_topk / t_native)
        rows.append(row)
        print(f"{n:>9} {t_native * 1e3:>12.3f}ms {t_bh * 1e3:>10.3f}ms {row['bh_ratio']:>6.1f}x "
              f"{t_topk * 1e3:>11.3f}ms {row['topk_ratio']:>6.1f}x")
    if args.json:
        meta = dict(device=str(device), torch=torch.__version__, experts=args.experts, dtype=args.dtype,
                    gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
