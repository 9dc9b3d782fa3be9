"""GPU speed of BH routing against native top-8, side by side in ONE run (OLMoE-1B-7B shape).

Builds an ``OlmoeForCausalLM`` with OLMoE-1B-7B's shape (16 layers, hidden 2048, 64 experts x
intermediate 1024, top-8, vocab 50304, 16 heads) and random bf16 weights directly on the GPU (no
download), then times, in the same process:

- prefill: ``model(input_ids[32, 1024], use_cache=False, logits_to_keep=1)`` (tokens/s);
- greedy decode: ``generate`` of 64 new tokens after a 32-token prompt, batch 1 and 8 (tokens/s);
- the selector alone for 1 .. 1M tokens x 64 experts against ``softmax + topk(8)``.

Variants: native top-8 (transformers' "grouped_mm", which ``generate`` switches to "batched_mm"
while decoding), native top-4, patched top-8 through ``route`` (equal work), BH-like (``route``
with a forced per-token k = 1..8 from a fixed pattern, mean 4.5), static top-4 through ``route``,
and patched top-8 through the plain-torch reference selector + dispatch (the pre-issue-8 path).
Ratios are to native top-8 measured in the same run. CUDA events / synchronize, warm-ups, medians.

    python benchmarks/bench_gpu.py --rounds 5 --json --profile 2>&1 | tee bench_gpu_log.txt

``--json`` / ``--profile`` without a value write ``benchmarks/results/bench_gpu_<device>_<commit>.json``
and ``bench_gpu_profile_<device>_<commit>.txt``; keep the log as ``bench_gpu_log_<device>_<commit>.txt``
(``benchmarks/results/INDEX.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import bh_helpers.routing.graphs as graphs
import bh_helpers.routing.patch as patching
from bh_helpers import TopKSelector
from bh_helpers.routing.dispatch import dispatch_experts
from bh_helpers.selection.fused import fused_select_experts, select_with_null
from bh_helpers.nulls.fit import fit_null
from bh_helpers.selection.reference import Selection, select_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _results import output  # noqa: E402  (the results naming of benchmarks/results/INDEX.md)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def event_median(fn, *, warmup: int = 3, reps: int = 20) -> float:
    """Median seconds per call of ``fn`` (CUDA events around each call, after warm-ups)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall_median(fn, *, warmup: int = 1, reps: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def versions() -> dict:
    """The GPU and the versions every GPU benchmark records."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                triton=triton_version, python=platform.python_version())


# ----------------------------------------------------------------------------------------------
# Selectors
# ----------------------------------------------------------------------------------------------


class ForcedKSelector:
    """BH-like load: top-k logits with k = 1..8 from a fixed deterministic pattern (mean 4.5).

    ``k(token, layer, call) = 1 + (token + 3 * layer + 5 * call) mod 8``, so every decode step
    and every prefill row cycles through 1..8. Weights: renormalised softmax of the kept experts.
    The call counter lives on the device (layer 0 adds 1), so the selector is a pure device
    function and ``route`` may capture it in its per-block CUDA graphs (``graph_safe``); graph
    warm-ups advance the counter too, which only shifts the pattern (every step still averages
    4.5 over the 16 layers).
    """

    graph_safe = True

    def __init__(self, max_k: int = 8) -> None:
        self.max_k, self.min_k = max_k, 1
        self._calls: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        top = fused_select_experts(logits, method="topk", k=self.max_k, max_k=self.max_k, weights="softmax",
                                   validate=False)
        rows = logits.shape[0]
        if self._calls is None or self._calls.device != logits.device:
            self._calls = torch.zeros((), dtype=torch.long, device=logits.device)
        if layer == 0:
            self._calls.add_(1)
        offset = 3 * layer + 5 * self._calls  # () device
        counts = (torch.arange(rows, device=logits.device) + offset) % self.max_k + 1  # (T,)
        used = torch.arange(self.max_k, device=logits.device) < counts[:, None]  # (T, K)
        w = top.weights * used
        w = w / w.sum(-1, keepdim=True)
        return Selection(indices=torch.where(used, top.indices, -1), weights=w, counts=counts)


class ReferenceTopK:
    """Top-k through the plain-torch reference ``select_experts`` (as before issue 8)."""

    def __init__(self, k: int) -> None:
        self.k, self.min_k, self.max_k = k, k, k

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        return select_experts(logits, method="topk", k=self.k, max_k=self.k, weights="softmax")


@contextlib.contextmanager
def reference_dispatch():
    """Route through the reference dispatch (one host sync per layer) inside the block."""
    original = patching.fast_dispatch_experts
    patching.fast_dispatch_experts = dispatch_experts
    try:
        yield
    finally:
        patching.fast_dispatch_experts = original


@contextlib.contextmanager
def eager_blocks():
    """Route without the whole-block CUDA graphs (the v2 path: eager block, graphed dispatch only)."""
    original = graphs.GRAPH_MAX_TOKENS, graphs.PREFILL_GRAPH_MAX_TOKENS
    graphs.GRAPH_MAX_TOKENS = graphs.PREFILL_GRAPH_MAX_TOKENS = 0
    try:
        yield
    finally:
        graphs.GRAPH_MAX_TOKENS, graphs.PREFILL_GRAPH_MAX_TOKENS = original


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(layers: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, norm_topk_prob=False, initializer_range=0.02,
    )
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OlmoeForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # random weights, small std: finite activations
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def set_native_k(model, k: int) -> None:
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def ceilings() -> dict:
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = event_median(lambda: b.copy_(a), reps=10)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = event_median(lambda: x @ y, reps=10)
    del a, b, x, y
    return {"copy_GBps": 2 * n * 2 / t / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / tm / 1e12}


def selector_table(rows: list[dict]) -> list[str]:
    """Markdown table of the selector micro-benchmark."""
    out = ["| tokens | softmax+topk8 ms | fused BH ms | x | fused BH, per-expert null ms | x | reference BH ms | x "
           "| fused topk8 ms | x | identical |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        out.append(f"| {r['tokens']} | {r['native_ms']:.3f} | {r['fused_bh_ms']:.3f} | {r['fused_bh_ratio']:.2f} | "
                   f"{r['fused_bh_per_expert_ms']:.3f} | {r['fused_bh_per_expert_ratio']:.2f} | "
                   f"{r['ref_bh_ms']:.3f} | {r['ref_bh_ratio']:.1f} | {r['fused_topk8_ms']:.3f} | "
                   f"{r['fused_topk_ratio']:.2f} | {r['identical']} |")
    return out


def model_table(results: dict) -> list[str]:
    """Markdown table of the route variants; sets each variant's ``<key>_x_native_paired``: the
    median over rounds of (variant tok/s / native top-8 tok/s) in the same round."""
    base = results["native top-8"]
    table = ["| variant | prefill tok/s | x native | decode b1 tok/s | x native | decode b8 tok/s | x native |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        cells = []
        for key in ("prefill", "decode_b1", "decode_b8"):
            v = r.get(f"{key}_tok_s")
            if v is None:
                cells += ["-", "-"]
                continue
            paired = statistics.median(x / y for x, y in zip(r[f"{key}_rounds_tok_s"], base[f"{key}_rounds_tok_s"]))
            r[f"{key}_x_native_paired"] = paired
            cells += [f"{v:,.0f}" if v > 1000 else f"{v:.1f}", f"{paired:.2f}"]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    return table


def print_selector_table(rows: list[dict], meta: dict) -> None:
    print(f"\n{meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}")
    print("\n".join(selector_table(rows)))


def event_medians_interleaved(fns: dict, *, warmup: int = 3, reps: int = 20) -> dict:
    """Median seconds per call of each fn, timed in turn within every repetition (host drift
    between variants cancels out in the ratios)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def round_medians(fns: dict, *, rounds: int, warmup: int = 5, reps: int = 30) -> dict:
    """Per variant, the list of per-round median seconds per call: each round times every variant
    in turn (``event_median`` over ``reps`` calls), after ``warmup`` untimed calls of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    per_round: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(event_median(fn, warmup=0, reps=reps))
    return per_round


def host_us(fn, n: int = 2000) -> float:
    """Host microseconds per call: ``n`` calls back to back, timed without synchronising (the
    GPU finishes each tiny kernel faster than the host issues the next)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def host_costs(logits: torch.Tensor, null) -> dict:
    """Where the host time of a small selector call goes (launch-bound sizes)."""
    import triton

    from bh_helpers.selection import fused as fs
    from bh_helpers.selection.fused_tables import logit_cuts

    n, e = logits.shape
    cut = logit_cuts(null, "bh", 0.05, e, e, logits.device)
    idx, w, cnt = fs._outputs(n, 8, logits.device)
    block_r, warps = fs._sorted_config(n, e)

    def triton_launch():  # the kernel launch alone, outputs preallocated
        fs._sorted_select_kernel[(triton.cdiv(n, block_r),)](
            logits, cut, idx, w, cnt, n, E=e, EP=e, MAX_K=8, BLOCK_R=block_r, CUT=True,
            STEP_DOWN=False, MIN_K=1, WMODE=0, TEMPERATURE=1.0, STAT=0, LIBDEV=True, num_warps=warps)

    compiled = fs._sorted_select_kernel[(triton.cdiv(n, block_r),)](
        logits, cut, idx, w, cnt, n, E=e, EP=e, MAX_K=8, BLOCK_R=block_r, CUT=True,
        STEP_DOWN=False, MIN_K=1, WMODE=0, TEMPERATURE=1.0, STAT=0, LIBDEV=True, num_warps=warps)

    def direct_launch():  # the compiled kernel launched directly (what select_with_null does)
        compiled[(triton.cdiv(n, block_r), 1, 1)](logits, cut, idx, w, cnt, n, e, e, 8, block_r, True,
                                                  False, 1, 0, 1.0, 0, True)

    def fused_bh():
        select_with_null(logits, null, method="bh", alpha=0.05, validate=False)

    out = {
        "host_us_softmax_topk8": host_us(lambda: torch.softmax(logits, -1, dtype=torch.float).topk(8, dim=-1)),
        "host_us_softmax": host_us(lambda: torch.softmax(logits, -1, dtype=torch.float)),
        "host_us_fused_bh": host_us(fused_bh),
    }
    fs._DIRECT_LAUNCH = False
    try:
        out["host_us_fused_bh_jit_launch"] = host_us(fused_bh)
    finally:
        fs._DIRECT_LAUNCH = True
    out.update({
        "host_us_triton_jit_launch": host_us(triton_launch),
        "host_us_direct_launch": host_us(direct_launch),
        "host_us_three_outputs": host_us(lambda: fs._outputs(n, 8, logits.device)),
    })
    return out


def bench_selector(sizes: list[int], rows: list[dict]) -> dict:
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(200_000, 64, generator=g) * 1.5
    null = fit_null(calib)
    null_pe = fit_null(calib, per_expert=True)
    # one-time set-up of the pooled null's logit cuts (per null, method, alpha, device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    select_with_null(torch.zeros(1, 64, device="cuda"), null, method="bh", alpha=0.05, validate=False)
    torch.cuda.synchronize()
    setup = {"pooled_null_cut_setup_ms": (time.perf_counter() - t0) * 1e3}
    print(f"selector set-up (logit cuts, first call incl. compile): {setup['pooled_null_cut_setup_ms']:.1f} ms", flush=True)
    for n in sizes:
        logits = (torch.randn(n, 64, generator=g) * 1.5 + 0.3).cuda()
        reps = 200 if n <= 4096 else (50 if n <= 65536 else 20)
        t = event_medians_interleaved({
            "native": lambda: torch.softmax(logits, -1, dtype=torch.float).topk(8, dim=-1),
            "fused_bh": lambda: select_with_null(logits, null, method="bh", alpha=0.05, validate=False),
            "fused_bh_pe": lambda: select_with_null(logits, null_pe, method="bh", alpha=0.05, validate=False),
            "fused_topk": lambda: fused_select_experts(logits, method="topk", k=8, weights="softmax", validate=False),
        }, reps=reps)
        ref_bh = event_median(
            lambda: select_experts(logits, null.sf(logits, dtype=torch.float32), method="bh", alpha=0.05, validate=False),
            reps=10,
        )
        # identical selections here too (pooled and per-expert nulls)
        same = True
        for nl in (null, null_pe):
            a = select_with_null(logits, nl, method="bh", alpha=0.05, validate=False)
            b = select_experts(logits, nl.sf(logits, dtype=torch.float32), method="bh", alpha=0.05, validate=False)
            same = same and bool(torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts))
        a = select_with_null(logits, null, method="bh", alpha=0.05, validate=False)
        native = t["native"]
        host = host_costs(logits, null) if n <= 64 else {}
        rows.append(dict(tokens=n, native_ms=native * 1e3, fused_bh_ms=t["fused_bh"] * 1e3,
                         fused_bh_per_expert_ms=t["fused_bh_pe"] * 1e3, ref_bh_ms=ref_bh * 1e3,
                         fused_topk8_ms=t["fused_topk"] * 1e3, fused_bh_ratio=t["fused_bh"] / native,
                         fused_bh_per_expert_ratio=t["fused_bh_pe"] / native,
                         ref_bh_ratio=ref_bh / native, fused_topk_ratio=t["fused_topk"] / native,
                         identical=same, mean_k=float(a.counts.float().mean()), **host))
        r = rows[-1]
        print(f"selector {n:>8} tokens: softmax+topk8 {native*1e3:8.3f} ms | fused BH {r['fused_bh_ms']:8.3f} ms "
              f"({r['fused_bh_ratio']:5.2f}x) | per-expert null {r['fused_bh_per_expert_ms']:8.3f} ms "
              f"({r['fused_bh_per_expert_ratio']:5.2f}x) | reference BH {ref_bh*1e3:8.3f} ms ({ref_bh/native:5.1f}x) | "
              f"fused topk8 {r['fused_topk8_ms']:8.3f} ms ({r['fused_topk_ratio']:5.2f}x) identical={same}", flush=True)
        if host:
            print("    host us per call (launch throughput, no sync): " + ", ".join(f"{k[8:]} {v:.1f}" for k, v in host.items()),
                  flush=True)
    return setup


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prefill", type=int, nargs=2, default=[32, 1024], metavar=("BATCH", "SEQ"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (prefill and decode)")
    parser.add_argument("--selector-sizes", type=int, nargs="+", default=[1, 64, 4096, 65536, 1048576])
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow reference-path variants")
    parser.add_argument("--selector-only", action="store_true", help="only the selector micro-benchmark")
    parser.add_argument("--profile", nargs="?", const="scheme", default=None,
                        help="torch.profiler tables of one prefill per variant; without a value: "
                             "benchmarks/results/bench_gpu_profile_<device>_<commit>.txt")
    parser.add_argument("--json", nargs="?", const="scheme", default=None, help="results JSON; without a value: benchmarks/results/bench_gpu_<device>_<commit>.json (INDEX.md)")
    args = parser.parse_args(argv)
    claim = "selector" if args.selector_only else "bench_gpu"
    args.json = output(args.json, claim)
    args.profile = output(args.profile, "bench_gpu_profile", ext="txt")

    meta = dict(**versions(), layers=args.layers, prefill=args.prefill, new_tokens=args.new_tokens,
                protocol=f"variants interleaved, {args.rounds} rounds: per round each variant enters route, runs "
                         "1 warm-up + 1 timed call; tok/s = median of rounds, x native = median of per-round ratios. prefill: model(ids, use_cache=False, "
                         "logits_to_keep=1); decode: generate(greedy, prompt 32, max_new_tokens=min_new_tokens=N)")
    print(meta, flush=True)
    meta.update(ceilings())
    print(f"ceilings: copy {meta['copy_GBps']:.0f} GB/s, bf16 matmul {meta['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)

    sel_rows: list[dict] = []
    meta.update(bench_selector(args.selector_sizes, sel_rows))
    if args.selector_only:
        print_selector_table(sel_rows, meta)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "selector": sel_rows}, f, indent=2)
        return {"meta": meta, "selector": sel_rows}

    model = build_model(args.layers)
    b, s = args.prefill
    ids = torch.randint(0, 50304, (b, s), device="cuda")

    variants = {
        "native top-8": (None, 8, False),
        "native top-4": (None, 4, False),
        "patched top-8": (TopKSelector(8, weights="softmax"), 8, False),
        "BH-like k~U{1..8} (mean 4.5)": ("forced", 8, False),
        "static top-4 (patched)": (TopKSelector(4, weights="softmax"), 8, False),
        "patched top-8, eager block (v2)": (TopKSelector(8, weights="softmax"), 8, "eager"),
        "BH-like, eager block (v2)": ("forced", 8, "eager"),
    }
    if not args.skip_reference:
        variants["patched top-8, reference paths"] = (ReferenceTopK(8), 8, True)

    def context(name):
        selector, native_k, reference = variants[name]
        set_native_k(model, native_k)
        if selector is None:
            return contextlib.nullcontext()
        if selector == "forced":
            selector = ForcedKSelector(8)
        stack = contextlib.ExitStack()
        if reference == "eager":
            stack.enter_context(eager_blocks())
        elif reference:
            stack.enter_context(reference_dispatch())
        stack.enter_context(patching.route(model, selector))
        return stack

    results: dict[str, dict] = {}
    profiles = []
    with torch.inference_mode():
        # Variants take turns, round by round (host speed drifts on a shared machine); medians.
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name in variants:
                with context(name):
                    times[name].append(
                        wall_median(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), warmup=1, reps=1)
                    )
        for name in variants:
            t = statistics.median(times[name])
            results[name] = {"prefill_tok_s": b * s / t, "prefill_rounds_tok_s": [b * s / x for x in times[name]]}
            print(f"prefill {name:34s} {b * s / t:10.0f} tok/s (rounds: "
                  f"{', '.join(f'{b * s / x:.0f}' for x in times[name])})", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name in variants:
                with context(name):
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                        torch.cuda.synchronize()
                profiles.append(f"== {name} ==\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
        torch.cuda.empty_cache()
        for batch in args.decode_batches:
            prompt = torch.randint(0, 50304, (batch, 32), device="cuda")
            n_new = args.new_tokens

            def gen():
                out = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
                assert out.shape[1] == 32 + n_new

            # Decode is bound by host time, which drifts on a shared machine: the variants take
            # turns, round by round (enter route, one warm-up generate, one timed), medians.
            names = [name for name in variants if batch == 1 or "reference paths" not in name]
            dtimes: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:
                    with context(name):
                        dtimes[name].append(wall_median(gen, warmup=1, reps=1))
            for name in names:
                t = statistics.median(dtimes[name])
                results[name][f"decode_b{batch}_tok_s"] = batch * n_new / t
                results[name][f"decode_b{batch}_rounds_tok_s"] = [batch * n_new / x for x in dtimes[name]]
                spread = [f"{batch * n_new / x:.1f}" for x in dtimes[name]]
                print(f"decode b={batch} {name:34s} {batch * n_new / t:8.1f} tok/s (rounds: {', '.join(spread)})",
                      flush=True)
    set_native_k(model, 8)

    table = model_table(results) + [""] + selector_table(sel_rows)
    print(f"\n{meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}")
    print("\n".join(table))
    out = {"meta": meta, "model": results, "selector": sel_rows, "table_md": "\n".join(table)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.profile:
        with open(args.profile, "w") as f:
            f.write("\n\n".join(profiles))
    return out


if __name__ == "__main__":
    main()
