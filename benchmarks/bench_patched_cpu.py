"""CPU forward time of the patched model (top-8 through bh_helpers.routing.dispatch) vs the native model.

Run with ``python benchmarks/bench_patched_cpu.py [--threads 2] [--batch 2] [--seq 128] [--repeats 9]``.
Uses the embedded tiny OLMoE when its weights are present, else a random model of the same shape
(6 layers, 64 experts, top-8, hidden 128). Native and patched forwards alternate in one run (so
machine load hits both alike); prints the median of each and their ratio, for every
``config._experts_implementation`` of the native model (the patched path does not use it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def tiny_model():
    """The embedded tiny OLMoE, or a random model of its shape, float32 in eval mode."""
    import torch

    import bh_helpers

    if (Path(bh_helpers.__file__).parent / "data" / "tiny_olmoe" / "model.safetensors").exists():
        from bh_helpers.models.loading import load_model

        model, _ = load_model("tiny", device="cpu", dtype=torch.float32)
        return model.eval(), "embedded tiny OLMoE"
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                         norm_topk_prob=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return OlmoeForCausalLM(config).eval(), "random OLMoE of the tiny shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch / BLAS")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--k", type=int, nargs="*", default=[4], help="extra static top-k to time patched")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import torch

    from bh_helpers import NativeSelector, TopKSelector, route

    torch.set_num_threads(args.threads)
    model, what = tiny_model()
    native_selector = NativeSelector.for_model(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    print(f"{what}: batch {args.batch} x {args.seq} tokens, threads={args.threads}, "
          f"median of {args.repeats} alternating repeats, native routing {native_selector}")

    def timed(selector) -> float:
        start = time.perf_counter()
        if selector is None:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            with route(model, selector):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - start

    selectors = {"patched native top-8": native_selector}
    selectors.update({f"patched top-{k}": TopKSelector(k, weights=native_selector.weights) for k in args.k})
    with torch.no_grad():
        for impl in ("eager", "batched_mm", "grouped_mm"):
            model.config._experts_implementation = impl
            for sel in [None, *selectors.values()]:  # warm-up
                timed(sel)
            times: dict[str, list[float]] = {"native": [], **{name: [] for name in selectors}}
            for _ in range(args.repeats):
                times["native"].append(timed(None))
                for name, sel in selectors.items():
                    times[name].append(timed(sel))
            native = statistics.median(times["native"])
            print(f"native {impl:>10s}: {native * 1e3:8.1f} ms")
            for name in selectors:
                t = statistics.median(times[name])
                print(f"  {name:>22s}: {t * 1e3:8.1f} ms   ratio patched/native = {t / native:5.2f}")


if __name__ == "__main__":
    main()
