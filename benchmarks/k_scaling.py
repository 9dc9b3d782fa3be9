"""Does time follow k? Static top-1..8 and the BH-like load on the T4 path and the bf16 path.

On an OLMoE-1B-7B-shaped model with random weights made on the GPU (``bench_gpu.build_model``),
in ONE process per path, variants interleaved round by round:

- native top-8 (transformers; on the T4 path its sm75 fallback), ``route`` with static top-k for
  k = 1, 2, 4, 6, 8 (``TopKSelector``), and the BH-like load (``bench_gpu.ForcedKSelector``: per-token
  k = 1..8 from a fixed pattern, mean 4.5);
- prefill ``model(ids[B, S], use_cache=False, logits_to_keep=1)`` for every ``--prefill`` size;
- greedy decode (prompt 32, ``--new-tokens`` new tokens) at every ``--decode-batches`` size;
- per round: each variant enters ``route``, two warm-ups (where ``route`` captures its CUDA graphs:
  decode sizes on first use, a prefill size when it comes back) and one timed call (wall clock
  around a synchronised call); x ratios = medians of per-round paired ratios;
- the previous prefill path side by side (``(previous prefill path)``: blocks above decode sizes
  eager, bf16 prefill through the compact dispatch with its host synchronisation). On the T4 path
  the other variants run the candidate: prefill graphs with ``PREFILL_GRAPH_MIN_CAPABILITY``
  lowered to 7; ``(previous prefill path)`` is what ships there today;
- top-8 without the non-finite router-logit screen (``(no logit screen)``), for the screen's cost.

Beside the end-to-end times: the MoE blocks' own time (CUDA events around each block's forward,
summed over the layers, median of ``--block-reps`` calls), its share ``s`` of the forward, and the
ceiling ``1 / (1 - s (1 - 4.5 / 8))`` that ``s`` allows the BH-like load against our top-8; a least-squares fit
``t(k) = a + b k`` over the static variants, the share ``8 b / t(8)`` of top-8 time that follows k, and the
BH-like time against the fit at k = 4.5 (the cost of a variable k). ``--profile`` adds per-kernel
tables (torch.profiler) of one prefill and a few decode steps for native, top-8 and the BH-like load.

The T4 path is emulated (``benchmarks/t4_site``: capability switch 7.5, float16, 14 GiB cap,
transformers' sm75 MoE path); an H100 is not a T4: see ``benchmarks/t4_projection.py`` for the
projection to a real T4.

    python benchmarks/k_scaling.py --paths t4 bf16 --rounds 5 --profile --json   # about 8 minutes on an H100

``--json`` without a value writes ``benchmarks/results/k_scaling_<device>_<commit>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STATIC_KS = (1, 2, 4, 6, 8)
BH_LIKE = "BH-like (mean 4.5)"
BH_LIKE_MEAN_K = 4.5
BEFORE = "(previous prefill path)"
NO_SCREEN = "top-8 (no logit screen)"

# Kernel families of the per-kernel tables (first match wins; lower-case kernel names).
KERNEL_FAMILIES = (
    ("expert GEMM (ours)", r"_grouped_up_kernel|_grouped_down_kernel|_gate_up_kernel|_down_combine_kernel"),
    ("combine (ours)", r"_combine_kernel"),
    ("selection (ours)", r"_select|_bh_|_topk_kernel|fused_select|_count"),
    ("grouped GEMM (torch)", r"grouped|cutlass.*group|gemm.*group"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("dense GEMM", r"gemm|nvjet|cutlass|sm90_xmma|sm80_xmma|ampere|cublas|gemv"),
    ("sort / scan / index", r"sort|radix|scan|cub::|index|gather|scatter|bincount|histogram|searchsorted|nonzero"),
    ("softmax / top-k", r"softmax|topk|top_k|bitonic"),
    ("memory copy / set", r"memcpy|memset|copy"),
    ("elementwise / reduce", r"elementwise|reduce|vectorized|unrolled"),
)


def kernel_family(name: str) -> str:
    """The family of one CUDA kernel name (``KERNEL_FAMILIES``; "other" when none matches)."""
    low = name.lower()
    for family, pattern in KERNEL_FAMILIES:
        if re.search(pattern, low):
            return family
    return "other"


def fit_line(ks: list[float], ts: list[float]) -> tuple[float, float]:
    """Least-squares ``t = a + b k``: returns ``(a, b)``."""
    n = len(ks)
    mk, mt = sum(ks) / n, sum(ts) / n
    sxx = sum((k - mk) ** 2 for k in ks)
    b = sum((k - mk) * (t - mt) for k, t in zip(ks, ts)) / sxx
    return mt - b * mk, b


# ----------------------------------------------------------------------------------------------
# One path, in this process
# ----------------------------------------------------------------------------------------------


def _variants():
    from bench_gpu import ForcedKSelector

    from bh_helpers import TopKSelector

    out = {"native top-8": None}
    for k in STATIC_KS:
        out[f"top-{k}"] = lambda k=k: TopKSelector(k, weights="softmax")
    out[BH_LIKE] = lambda: ForcedKSelector(8)
    # the previous prefill path, side by side: eager blocks above decode sizes, compact bf16 dispatch
    out[f"top-8 {BEFORE}"] = lambda: TopKSelector(8, weights="softmax")
    out[f"{BH_LIKE} {BEFORE}"] = lambda: ForcedKSelector(8)
    out[NO_SCREEN] = lambda: TopKSelector(8, weights="softmax")  # what the non-finite screen costs
    return out


@contextlib.contextmanager
def no_logit_screen():
    """The non-finite router-logit screen left out (a constant False): top-8 against it gives its cost."""
    import torch

    import bh_helpers.routing.aggregates as aggregates

    saved, false = aggregates.non_finite_rows, torch.zeros((), dtype=torch.bool, device="cuda")
    aggregates.non_finite_rows = lambda logits: false  # the OR it feeds stays: only the screen's kernels go
    try:
        yield
    finally:
        aggregates.non_finite_rows = saved


@contextlib.contextmanager
def previous_prefill_path():
    """Blocks above decode sizes run eagerly and bf16 prefill takes the compact dispatch (as before)."""
    import bh_helpers.routing.graphs as graphs
    import bh_helpers.routing.grouped as grouped

    saved = graphs.PREFILL_GRAPH_MAX_TOKENS, grouped.COMPACT_MIN_PAIRS
    graphs.PREFILL_GRAPH_MAX_TOKENS, grouped.COMPACT_MIN_PAIRS = graphs.GRAPH_MAX_TOKENS, 2048
    try:
        yield
    finally:
        graphs.PREFILL_GRAPH_MAX_TOKENS, grouped.COMPACT_MIN_PAIRS = saved


class BlockTimer:
    """CUDA events around every MoE block's forward (hooks), summed per model call."""

    def __init__(self, blocks) -> None:
        import torch

        self.torch = torch
        self.pairs: list = []
        self.handles = []
        for block in blocks:
            self.handles.append(block.register_forward_pre_hook(self._start))
            self.handles.append(block.register_forward_hook(self._end))

    def _start(self, module, args) -> None:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        self.pairs.append([event, None])

    def _end(self, module, args, output) -> None:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        self.pairs[-1][1] = event

    def take_ms(self) -> float:
        """Total block milliseconds since the last call (synchronises)."""
        self.torch.cuda.synchronize()
        total = sum(start.elapsed_time(end) for start, end in self.pairs)
        self.pairs = []
        return total

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_path(path: str, args) -> dict:
    """Every measurement of one path (``t4``: emulated T4 float16; ``bf16``) in this process."""
    import torch

    import bh_helpers.routing.patch as patching
    from bench_gpu import build_model

    if path == "t4":  # the harness's hook, by path (this interpreter imported its own sitecustomize)
        import importlib.util

        spec = importlib.util.spec_from_file_location("t4_site", HERE / "t4_site" / "sitecustomize.py")
        t4_site = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(t4_site)
        apply_t4_emulation = t4_site.apply_t4_emulation

    torch.manual_seed(0)
    model = build_model(args.layers)
    if path == "t4":
        model.to(torch.float16)
        torch.cuda.empty_cache()
        apply_t4_emulation()  # capability 7.5, 14 GiB cap, transformers' sm75 MoE path
        import bh_helpers.routing.graphs as graphs

        graphs.PREFILL_GRAPH_MIN_CAPABILITY = 7  # the candidate; "(previous prefill path)" is the shipped one
    blocks = [layer.mlp for layer in model.model.layers]
    variants = _variants()

    def context(name):
        make = variants[name]
        if make is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if name.endswith(BEFORE):
            stack.enter_context(previous_prefill_path())
        if name == NO_SCREEN:
            stack.enter_context(no_logit_screen())
        stack.enter_context(patching.route(model, make()))
        return stack

    def timed(fn) -> float:
        for _ in range(2):  # warm-ups: graphs are captured here (decode on first use, prefill on the second)
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    workloads = {}
    for b, s in args.prefill:
        ids = torch.randint(0, 50304, (b, s), device="cuda")
        workloads[f"prefill {b}x{s}"] = (b * s, lambda ids=ids: model(input_ids=ids, use_cache=False, logits_to_keep=1))
    for b in args.decode_batches:
        prompt = torch.randint(0, 50304, (b, 32), device="cuda")

        def gen(prompt=prompt):
            out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
            assert out.shape[1] == 32 + args.new_tokens

        workloads[f"decode b{b}"] = (b * args.new_tokens, gen)

    times: dict = {w: {v: [] for v in variants} for w in workloads}
    errors: dict = {w: {} for w in workloads}
    blocks_ms: dict = {w: {} for w in workloads}
    with torch.inference_mode():
        for work, (_, fn) in workloads.items():
            for _ in range(args.rounds):
                for name in variants:
                    if name in errors[work]:
                        continue
                    try:
                        with context(name):
                            times[work][name].append(timed(fn))
                    except torch.cuda.OutOfMemoryError as err:
                        errors[work][name] = "out of memory: " + str(err).splitlines()[0][:120]
                        times[work][name] = []
                        torch.cuda.empty_cache()
            # the blocks' own time, per model call (hooks on: not part of the timings above)
            timer = BlockTimer(blocks)
            try:
                for name in variants:
                    if name in errors[work]:
                        continue
                    with context(name):
                        fn()
                        fn()
                        timer.take_ms()
                        per = []
                        for _ in range(args.block_reps):
                            fn()
                            per.append(timer.take_ms())
                    blocks_ms[work][name] = statistics.median(per)
            finally:
                timer.close()
            line = ", ".join(f"{n} {1e3 * statistics.median(t):.1f} ms" for n, t in times[work].items() if t)
            print(f"[{path}] {work}: {line}", flush=True)
        profile = profile_tables(model, context, workloads, args) if args.profile else {}
    return {"times_s": times, "errors": errors, "blocks_ms": blocks_ms, "profile": profile,
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "work_tokens": {w: n for w, (n, _) in workloads.items()}}


def profile_tables(model, context, workloads, args) -> dict:
    """Per-kernel CUDA time of one call of every workload for native, top-8 and the BH-like load.

    Each MoE block's forward runs inside a ``record_function("moe_block")`` range (hooks), so the
    blocks' GPU time is the kernel time launched inside those ranges (graph replays included):
    the span of each range on the GPU timeline (graph replays included): selector, dispatch and combine.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    blocks = [layer.mlp for layer in model.model.layers]
    open_ranges: list = []

    def enter(module, args):
        rng = record_function("moe_block")
        rng.__enter__()
        open_ranges.append(rng)

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    out = {}
    for work, (_, fn) in workloads.items():
        if args.profile_workloads and work not in args.profile_workloads:
            continue
        for name in ("native top-8", "top-8", BH_LIKE, f"top-8 {BEFORE}", f"{BH_LIKE} {BEFORE}"):
            try:
                with context(name):
                    fn()
                    fn()
                    torch.cuda.synchronize()
                    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
                    try:
                        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                            t0 = time.perf_counter()
                            fn()
                            torch.cuda.synchronize()
                            wall_ms = 1e3 * (time.perf_counter() - t0)
                    finally:
                        for h in handles:
                            h.remove()
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                out[f"{work} | {name}"] = {"error": "out of memory"}
                continue
            events = prof.events()
            kernels: dict = {}
            block_ms = 0.0
            for event in events:
                if event.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                if event.name == "moe_block":  # the range's span on the GPU timeline (graph replays included)
                    block_ms += event.device_time_total / 1e3
                    continue
                row = kernels.setdefault(event.name, [0.0, 0])
                row[0] += event.device_time_total / 1e3  # ms
                row[1] += 1
            families: dict = {}
            for kname, (ms, n) in kernels.items():
                fam = families.setdefault(kernel_family(kname), [0.0, 0])
                fam[0] += ms
                fam[1] += n
            top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
            entry = {
                "wall_ms_profiled": round(wall_ms, 3),
                "gpu_ms_total": round(sum(v[0] for v in kernels.values()), 3),
                "moe_blocks_gpu_ms": round(block_ms, 3),
                "launches": sum(v[1] for v in kernels.values()),
                "families_ms_launches": {k: [round(v[0], 3), v[1]] for k, v in sorted(families.items(), key=lambda kv: -kv[1][0])},
                "top_kernels_ms_launches": [[k[:110], round(v[0], 3), v[1]] for k, v in top],
            }
            out[f"{work} | {name}"] = entry
            print(f"  profile {work} | {name}: wall {entry['wall_ms_profiled']:.1f} ms, GPU {entry['gpu_ms_total']:.1f} ms "
                  f"({entry['launches']} kernels), MoE blocks GPU {block_ms:.1f} ms; "
                  + ", ".join(f"{k} {v[0]:.1f}/{v[1]}" for k, v in list(entry["families_ms_launches"].items())[:7]),
                  flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def summarise(raw: dict) -> dict:
    """Medians, paired ratios, the line fit and the ceilings of one path's raw times."""
    summary = {}
    for work, per in raw["times_s"].items():
        med = {name: statistics.median(ts) for name, ts in per.items() if ts}
        row: dict = {"median_ms": {n: round(1e3 * t, 3) for n, t in med.items()}}

        def paired(a: str, b: str) -> float | None:
            if not per.get(a) or not per.get(b):
                return None
            return round(statistics.median(x / y for x, y in zip(per[a], per[b])), 4)

        # speed-up = time(reference) / time(variant): > 1 is faster
        row["x_native"] = {n: paired("native top-8", n) for n in med}
        row["x_top8"] = {n: paired("top-8", n) for n in med}
        screen = paired("top-8", NO_SCREEN)  # time with the screen / time without it
        if screen is not None:
            row["logit_screen_cost"] = round(screen - 1, 4)  # the share it adds to patched top-8
        ks = [k for k in STATIC_KS if f"top-{k}" in med]
        if len(ks) >= 2:
            a, b = fit_line(ks, [1e3 * med[f"top-{k}"] for k in ks])
            row["fit_ms"] = {"a": round(a, 3), "b_per_k": round(b, 4)}
            row["share_of_top8_following_k"] = round(8 * b / (a + 8 * b), 4)
            if BH_LIKE in med:
                row["bh_like_vs_fit_at_4.5"] = round(1e3 * med[BH_LIKE] / (a + BH_LIKE_MEAN_K * b) - 1, 4)
        blocks = raw["blocks_ms"].get(work, {})
        if blocks:
            row["moe_blocks_ms"] = {n: round(v, 3) for n, v in blocks.items()}
            if "top-8" in blocks and "top-8" in med:
                s = min(1.0, blocks["top-8"] / (1e3 * med["top-8"]))
                row["moe_share_top8"] = round(s, 4)
                row["ceiling_bh_like_vs_top8"] = round(1 / (1 - s * (1 - BH_LIKE_MEAN_K / 8)), 4)
                if BH_LIKE in blocks:
                    row["moe_blocks_bh_like_vs_top8"] = round(blocks["top-8"] / blocks[BH_LIKE], 4)
                x = row["x_top8"].get(BH_LIKE)
                if x is not None:
                    row["end_to_end_share_of_ceiling"] = round((x - 1) / (row["ceiling_bh_like_vs_top8"] - 1), 4) \
                        if row["ceiling_bh_like_vs_top8"] > 1 else None
        prof = raw.get("profile", {})
        p8, pbh = prof.get(f"{work} | top-8", {}), prof.get(f"{work} | {BH_LIKE}", {})
        if p8.get("moe_blocks_gpu_ms") and pbh.get("moe_blocks_gpu_ms"):
            row["moe_blocks_gpu_ms"] = {"top-8": p8["moe_blocks_gpu_ms"], BH_LIKE: pbh["moe_blocks_gpu_ms"]}
            row["moe_blocks_gpu_bh_like_vs_top8"] = round(p8["moe_blocks_gpu_ms"] / pbh["moe_blocks_gpu_ms"], 4)
            row["gpu_busy_share_top8"] = round(p8["gpu_ms_total"] / p8["wall_ms_profiled"], 4)
        if raw["errors"].get(work):
            row["errors"] = raw["errors"][work]
        summary[work] = row
    return summary


def render(result: dict) -> str:
    """Markdown tables of a result: times per variant, then the ratios and the ceiling (per path)."""
    nan = float("nan")
    meta = result["meta"]
    lines = [f"On one {meta['gpu']} (torch {meta['torch']}, transformers {meta['transformers']}, triton "
             f"{meta.get('triton')}); median ms of {meta.get('rounds')} interleaved rounds."]
    for path, res in result["paths"].items():
        if "error" in res:
            lines += ["", f"**{path} path: failed** ({res['error'].strip().splitlines()[-1][:160]})"]
            continue
        title = "T4 path (emulated: float16, capability 7.5, 14 GiB cap; not a T4)" if path == "t4" else "bf16 path"
        lines += ["", f"**{title}**", "",
                  "| workload | native | top-1 | top-2 | top-4 | top-6 | top-8 | BH-like | previous top-8 | previous BH-like |",
                  "|---|" + "---:|" * 9]
        for work, row in res["summary"].items():
            med = row["median_ms"]
            names = ["native top-8", *(f"top-{k}" for k in STATIC_KS), BH_LIKE, f"top-8 {BEFORE}", f"{BH_LIKE} {BEFORE}"]
            lines.append(f"| {work} | " + " | ".join(f"{med[n]:.1f}" if n in med else "-" for n in names) + " |")
        lines += ["", "| workload | top-8 x native | BH-like x top-8 | share of top-8 following k | BH-like vs fit at 4.5 | "
                  "MoE blocks BH-like x top-8 (events / profiler) | GPU busy, top-8 | MoE share s | ceiling | share of ceiling | "
                  "logit screen cost |",
                  "|---|" + "---:|" * 10]
        for work, row in res["summary"].items():
            prof = row.get("moe_blocks_gpu_bh_like_vs_top8")
            cells = [f"{row['x_native'].get('top-8') or nan:.2f}x", f"{row['x_top8'].get(BH_LIKE) or nan:.2f}x",
                     f"{row.get('share_of_top8_following_k', nan):.0%}", f"{row.get('bh_like_vs_fit_at_4.5', nan):+.1%}",
                     f"{row.get('moe_blocks_bh_like_vs_top8', nan):.2f}x / " + (f"{prof:.2f}x" if prof else "-"),
                     f"{row['gpu_busy_share_top8']:.0%}" if "gpu_busy_share_top8" in row else "-",
                     f"{row.get('moe_share_top8', nan):.2f}", f"{row.get('ceiling_bh_like_vs_top8', nan):.2f}x",
                     f"{row['end_to_end_share_of_ceiling']:.0%}" if row.get("end_to_end_share_of_ceiling") is not None else "-",
                     f"{row['logit_screen_cost']:+.1%}" if "logit_screen_cost" in row else "-"]
            lines.append(f"| {work} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=("t4", "bf16"), default=["t4", "bf16"])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prefill", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                        default=[(8, 256), (32, 1024)], help="prefill sizes as BATCHxSEQ")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="per-kernel tables (torch.profiler)")
    parser.add_argument("--profile-workloads", nargs="*", default=None,
                        help="only these workloads are profiled, e.g. 'prefill 8x256' 'decode b1' (default all)")
    parser.add_argument("--json", nargs="?", const="scheme", default=None,
                        help="results JSON; without a value benchmarks/results/k_scaling_<device>_<commit>.json")
    parser.add_argument("--one-path", default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "scripts"))

    if args.one_path:  # the child: one path, results as JSON on the last stdout line
        raw = run_path(args.one_path, args)
        print("RESULT " + json.dumps(raw), flush=True)
        return 0

    from _results import output
    from bench_gpu import versions

    meta = dict(**versions(), layers=args.layers, rounds=args.rounds, new_tokens=args.new_tokens,
                protocol="one process per path; per round each variant enters route, 2 warm-ups + 1 timed call "
                         "(wall clock, synchronised); medians of rounds; x = medians of per-round paired ratios "
                         "(reference time / variant time, > 1 is faster). MoE blocks: CUDA events around each "
                         "block's forward, summed over layers, median of calls.")
    result = {"meta": meta, "paths": {}}
    for path in args.paths:
        cmd = [sys.executable, __file__, "--one-path", path, "--layers", str(args.layers), "--rounds", str(args.rounds),
               "--block-reps", str(args.block_reps), "--new-tokens", str(args.new_tokens),
               "--prefill", *[f"{b}x{s}" for b, s in args.prefill], "--decode-batches", *map(str, args.decode_batches)]
        if args.profile:
            cmd.append("--profile")
        if args.profile_workloads:
            cmd += ["--profile-workloads", *args.profile_workloads]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        # the child's lines are echoed as they come, so a run cut short still shows what it measured
        with subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            lines = []
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    lines.append(line.rstrip("\n"))
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            stderr = proc.stderr.read()
        if proc.returncode or not lines:
            result["paths"][path] = {"error": stderr[-2000:]}
            print(stderr[-4000:], flush=True)
            continue
        raw = json.loads(lines[-1][len("RESULT "):])
        result["paths"][path] = {"summary": summarise(raw), "raw": raw}
    print(render(result), flush=True)
    path = output(args.json, "k_scaling")
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
