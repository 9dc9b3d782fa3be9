"""Time fitting a NullBank: 16 layers x 200,000 tokens x 64 experts, per kernel.

Run with ``python benchmarks/bench_null_fit.py [--threads 2] [--tokens 200000] [--per-expert]``.
Prints the wall time per kernel; the target is well under 60 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch / BLAS")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--per-expert", action="store_true", help="fit one null per expert column")
    parser.add_argument("--kernels", nargs="*", default=None)
    args = parser.parse_args()
    # Limit native thread pools before numpy/torch start them.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import torch

    from bh_helpers.nulls.fit import fit_null_bank
    from bh_helpers.nulls.kernels import VALID_KERNELS

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    # Router-logit-like data: per-expert offsets and scales, float32 as captured.
    logits = {}
    for layer in range(args.layers):
        scale = 0.5 + torch.rand(args.experts, generator=gen)
        offset = torch.randn(args.experts, generator=gen)
        logits[layer] = torch.randn(args.tokens, args.experts, generator=gen) * scale + offset
    n = args.layers * args.tokens * args.experts
    print(
        f"{args.layers} layers x {args.tokens} tokens x {args.experts} experts = {n:,} logits, "
        f"threads={args.threads}, per_expert={args.per_expert}"
    )
    for kernel in args.kernels or VALID_KERNELS:
        start = time.perf_counter()
        bank = fit_null_bank(logits, kernel=kernel, per_expert=args.per_expert)
        elapsed = time.perf_counter() - start
        grid = bank[0].grid_.shape
        print(f"{kernel:>13s}: {elapsed:6.2f} s  ({elapsed / args.layers:.2f} s/layer, grid {grid})")


if __name__ == "__main__":
    main()
