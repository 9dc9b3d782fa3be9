"""From an emulated T4 to a real one: a stated cost model, checked on the GPU that ran the benchmark.

An H100 is not a T4: it has about 10x a T4's memory bandwidth and 15x its float16 tensor throughput
at a similar per-kernel cost, so a call that is launch-bound on the H100 may be bandwidth- or
compute-bound on a T4. This script takes the per-kernel profiles of ``benchmarks/k_scaling.py``
(one JSON per path, ``--profile``) and models each profiled call's GPU time from its shapes:

- **expert GEMMs** (per layer): ``2 x rows x 3 H I`` FLOPs, rows rounded up per expert to the
  kernel's tile (64 for our Triton kernels on the T4 path; torch's grouped GEMM and the per-expert
  ``torch.mm`` are not padded in the model), plus the weights of the experts that got a row
  (``E (1 - (1 - k/E)^T)`` of them, ``3 H I`` each) and the rows' activations read and written;
- **dense GEMMs** (per layer): q, k, v, o (``2 T 4 H^2`` FLOPs, ``4 H^2`` weights); **attention**
  ``4 T S H`` FLOPs (halved for a causal prefill) and the KV cache read; the **router**; the
  **lm_head** of the last position (``2 B H V`` FLOPs, ``H V`` weights);
- native bf16 decode (transformers' "batched_mm" in ``generate``): each pair's expert weights
  copied out and read back, three passes of ``3 H I`` per pair;
- **every other kernel** (norms, elementwise, copies, sort, selection, combine; their number is
  the profile's): a fixed cost ``tau`` plus one hidden-sized tensor (``T x H``) moved;
- each GEMM term takes ``FLOPs / (peak x eta_flops) + bytes / (bandwidth x eta_bytes)``.

The constants are stated, not fitted: published peaks (H100 SXM: 989 TFLOP/s dense bf16/fp16, 3.35
TB/s; H200: 989 TFLOP/s, 4.8 TB/s; T4: 65 TFLOP/s fp16 tensor, 320 GB/s), ``eta_flops = 0.7``,
``eta_bytes = 0.8``, ``tau = 1.5 us`` (the smallest kernels' time in the decode profiles).
First the model predicts the measuring GPU's summed kernel time per profiled call with that GPU's
figures (how close it gets is printed beside it); then it projects native top-8, patched top-8
and the BH-like load onto a T4 with the T4's figures and the T4 path's kernel counts. It projects
GPU time only: where the host issues kernels more slowly than a T4 runs them (decode), the wall time
is the host's, which no GPU figure predicts.

``--notebooks`` adds the notebooks' full-mode wall time from a ``t4_emulation.py`` result, projected
onto a T4 by the T4 path's prefill ratio (an upper bound; see ``notebook_projection``).

    python benchmarks/t4_projection.py benchmarks/results/k_scaling_t4_h100_<commit>.json \\
        benchmarks/results/k_scaling_bf16_h100_<commit>.json --notebooks <t4_emulation json> --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# OLMoE-1B-7B's shape (the benchmark's model)
LAYERS, HIDDEN, INTER, EXPERTS, VOCAB = 16, 2048, 1024, 64, 50304
PROMPT = 32  # k_scaling's decode prompt length

GPUS = {  # published peaks: dense fp16/bf16 tensor FLOP/s, memory bytes/s
    "H100": {"flops": 989e12, "bytes": 3.35e12},
    "H200": {"flops": 989e12, "bytes": 4.8e12},
    "T4": {"flops": 65e12, "bytes": 320e9},
}
ETA_FLOPS, ETA_BYTES, TAU_S = 0.7, 0.8, 1.5e-6
BYTES_PER_VALUE = 2  # float16 / bfloat16
VARIANT_K = {"native top-8": 8.0, "top-8": 8.0, "BH-like (mean 4.5)": 4.5}
TRITON_TILE_M = 64  # rows per tile of bh_helpers.routing.turing.tiled_dispatch_experts


def _gemm_s(flops: float, n_bytes: float, gpu: dict) -> float:
    return flops / (gpu["flops"] * ETA_FLOPS) + n_bytes / (gpu["bytes"] * ETA_BYTES)


def call_gemm_s(tokens: int, batch: int, context: int, k: float, gpu: dict, *, tile_m: int, causal: bool,
                gathered_weights: bool = False) -> dict:
    """Modelled seconds of the GEMM-like work of one forward call of ``tokens`` rows (all layers).

    ``gathered_weights``: transformers' "batched_mm" (native bf16 decode) copies each pair's expert
    weights out and reads them back (three passes over ``3 H I`` per pair) instead of reading each
    active expert once.
    """
    pairs = tokens * k
    per_expert = pairs / EXPERTS
    rows = EXPERTS * (-(-per_expert // tile_m) * tile_m) if tile_m > 1 and tokens > 16 else pairs
    active = EXPERTS * (1 - (1 - k / EXPERTS) ** tokens)
    weight_reads = 3 * pairs if gathered_weights else active
    expert_flops = 2 * rows * 3 * HIDDEN * INTER
    expert_bytes = (weight_reads * 3 * HIDDEN * INTER + pairs * (2 * HIDDEN + 5 * INTER)) * BYTES_PER_VALUE
    dense_flops = 2 * tokens * 4 * HIDDEN**2
    dense_bytes = (4 * HIDDEN**2 + 8 * tokens * HIDDEN) * BYTES_PER_VALUE
    attn_flops = 4 * tokens * context * HIDDEN * (0.5 if causal else 1.0)
    attn_bytes = 2 * batch * context * HIDDEN * BYTES_PER_VALUE
    router_flops = 2 * tokens * HIDDEN * EXPERTS
    head = _gemm_s(2 * batch * HIDDEN * VOCAB, HIDDEN * VOCAB * BYTES_PER_VALUE, gpu)
    return {
        "experts": LAYERS * _gemm_s(expert_flops, expert_bytes, gpu),
        "dense and attention": LAYERS * (_gemm_s(dense_flops, dense_bytes, gpu) + _gemm_s(attn_flops, attn_bytes, gpu)
                                         + _gemm_s(router_flops, 0.0, gpu)) + head,
    }


def workload_calls(work: str, new_tokens: int) -> list[tuple[int, int, int, bool]]:
    """``(tokens, batch, context, causal)`` of every forward call of a k_scaling workload."""
    kind, size = work.split()
    if kind == "prefill":
        b, s = (int(x) for x in size.split("x"))
        return [(b * s, b, s, True)]
    b = int(size.lstrip("b"))
    return [(b * PROMPT, b, PROMPT, True)] + [(b, b, PROMPT + i, False) for i in range(1, new_tokens)]


def model_call(work: str, variant: str, entry: dict, gpu: dict, *, path: str, new_tokens: int) -> dict:
    """Modelled GPU seconds of one profiled call (``entry`` gives its kernel counts)."""
    k = VARIANT_K[variant]
    tile_m = TRITON_TILE_M if (path == "t4" and variant != "native top-8") else 1
    calls = workload_calls(work, new_tokens)
    gemm_families = {"expert GEMM (ours)", "grouped GEMM (torch)", "dense GEMM", "attention"}
    fam = entry["families_ms_launches"]
    gemm_launches = sum(n for name, (_, n) in fam.items() if name in gemm_families)
    other_launches = entry["launches"] - gemm_launches
    parts = {"experts": 0.0, "dense and attention": 0.0}
    for tokens, batch, context, causal in calls:
        gathered = path == "bf16" and variant == "native top-8" and not causal  # generate's "batched_mm"
        for name, s in call_gemm_s(tokens, batch, context, k, gpu, tile_m=tile_m, causal=causal,
                                   gathered_weights=gathered).items():
            parts[name] += s
    tokens_total = sum(c[0] for c in calls)
    # the other kernels, spread evenly over the calls: each a fixed cost plus one T x H tensor moved
    per_call = other_launches / len(calls)
    parts["other kernels"] = sum(per_call * (TAU_S + t * HIDDEN * BYTES_PER_VALUE / (gpu["bytes"] * ETA_BYTES))
                                 for t, *_ in calls)
    parts["launch floor of GEMMs"] = gemm_launches * TAU_S
    return {"parts_ms": {n: round(1e3 * s, 3) for n, s in parts.items()}, "total_ms": round(1e3 * sum(parts.values()), 3),
            "tokens": tokens_total}


def project(result: dict, path: str, measured_gpu: str) -> dict:
    """Check on the measuring GPU, then project onto a T4 (every profiled call of one path)."""
    res = result["paths"][path]
    profile = res["raw"]["profile"]
    new_tokens = result["meta"].get("new_tokens", 32)
    rows = {}
    for key, entry in profile.items():
        if "error" in entry:
            continue
        work, variant = (part.strip() for part in key.split("|"))
        if variant not in VARIANT_K:
            continue  # the previous-path variants: same kernels' work, not projected
        here = model_call(work, variant, entry, GPUS[measured_gpu], path=path, new_tokens=new_tokens)
        t4 = model_call(work, variant, entry, GPUS["T4"], path=path, new_tokens=new_tokens)
        rows[key] = {"measured_gpu_ms": entry["gpu_ms_total"], "measured_wall_ms": entry["wall_ms_profiled"],
                     f"model_{measured_gpu}_ms": here["total_ms"],
                     "model_over_measured": round(here["total_ms"] / entry["gpu_ms_total"], 3),
                     "model_parts_ms": here["parts_ms"], "t4_projected_ms": t4["total_ms"], "t4_parts_ms": t4["parts_ms"]}
    return rows


def ratios(rows: dict) -> dict:
    """Projected T4 ratios per workload: patched top-8 x native, BH-like x top-8 (> 1 is faster)."""
    out = {}
    works = sorted({key.split("|")[0].strip() for key in rows})
    for work in works:
        get = lambda v: rows.get(f"{work} | {v}", {}).get("t4_projected_ms")  # noqa: E731
        native, top8, bh = get("native top-8"), get("top-8"), get("BH-like (mean 4.5)")
        out[work] = {"top8_x_native": round(native / top8, 3) if native and top8 else None,
                     "bh_like_x_top8": round(top8 / bh, 3) if top8 and bh else None}
    return out


def notebook_projection(emulation: dict, rows: dict, work: str = "prefill 8x256") -> dict:
    """Project the emulated notebooks' wall time onto a T4 (an upper bound, stated).

    The notebooks' GPU work is evaluation-window prefill (batches of 256-token windows), so every
    emulated second is scaled by the largest ratio, over native, patched top-8 and the BH-like load, of
    the projected T4 GPU time of ``work`` to its wall time measured here. Host-side work (fitting,
    plotting) does not slow down on a T4 yet is scaled too: the projection errs long.
    """
    factors = {key.split("|")[1].strip(): row["t4_projected_ms"] / row["measured_wall_ms"]
               for key, row in rows.items() if key.split("|")[0].strip() == work}
    if not factors:
        return {"error": f"no profiled '{work}' call on the T4 path to scale by"}
    factor = max(1.0, *factors.values())
    out = {"work_scaled_by": work, "factors": {v: round(f, 3) for v, f in factors.items()},
           "factor_used": round(factor, 3), "eval_datasets": emulation["steps"]["notebooks"].get("eval_datasets"),
           "gpu": emulation["meta"]["gpu"], "notebooks": {}}
    for name, nb in emulation["steps"]["notebooks"]["notebooks"].items():
        out["notebooks"][name] = {"returncode": nb["returncode"], "emulated_wall_s": nb["wall_s"],
                                  "projected_t4_wall_s": round(nb["wall_s"] * factor, 1)}
    return out


def render(projection: dict) -> str:
    lines = [f"Model constants: eta_flops {ETA_FLOPS}, eta_bytes {ETA_BYTES}, tau {TAU_S * 1e6:.1f} us; peaks: "
             + "; ".join(f"{g} {v['flops'] / 1e12:.0f} TFLOP/s, {v['bytes'] / 1e9:.0f} GB/s" for g, v in GPUS.items()) + "."]
    for path, block in projection["paths"].items():
        gpu = block["measured_gpu"]
        title = "T4 path (float16 Triton kernels, emulated on the" if path == "t4" else "bf16 path (on the"
        lines += ["", f"**{title} {gpu}; T4 column projected)**", "",
                  f"| call | measured GPU ms ({gpu}) | model ms ({gpu}) | model / measured | measured wall ms | projected T4 GPU ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key, row in block["rows"].items():
            lines.append(f"| {key.replace(' | ', ', ')} | {row['measured_gpu_ms']:.1f} | {row[f'model_{gpu}_ms']:.1f} | "
                         f"{row['model_over_measured']:.2f} | {row['measured_wall_ms']:.1f} | {row['t4_projected_ms']:.1f} |")
        if path == "t4":
            lines += ["", "| workload | projected T4: patched top-8 x native | projected T4: BH-like x top-8 |", "|---|---:|---:|"]
            for work, r in block["ratios"].items():
                fmt = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
                lines.append(f"| {work} | {fmt(r['top8_x_native'])} | {fmt(r['bh_like_x_top8'])} |")
    nbs = projection.get("notebooks")
    if nbs and "error" not in nbs:
        lines += ["", f"**Notebooks in full mode on an OLMoE-1B-7B-shaped model** (emulated T4 on the {nbs['gpu']}, "
                  f"evaluation data {nbs['eval_datasets']}; projected: every emulated second x "
                  f"{nbs['factor_used']:.1f}, the largest projected-T4 / measured ratio of {nbs['work_scaled_by']} "
                  "on the T4 path, an upper bound)", "",
                  "| notebook | exit | emulated wall (min) | projected T4 wall (min) |", "|---|---:|---:|---:|"]
        for name, row in nbs["notebooks"].items():
            lines.append(f"| {name} | {row['returncode']} | {row['emulated_wall_s'] / 60:.1f} | "
                         f"{row['projected_t4_wall_s'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="k_scaling JSON files with --profile tables")
    parser.add_argument("--json", nargs="?", const="scheme", default=None,
                        help="write the projection; without a value benchmarks/results/t4_projection_cpu_<commit>.json")
    parser.add_argument("--notebooks", type=Path, default=None, metavar="T4_EMULATION_JSON",
                        help="a t4_emulation.py result with a notebooks step: project its wall times onto a T4")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "scripts"))
    from _results import output

    projection = {"constants": {"eta_flops": ETA_FLOPS, "eta_bytes": ETA_BYTES, "tau_s": TAU_S, "gpus": GPUS},
                  "sources": [p.name for p in args.results], "paths": {}}
    for file in args.results:
        result = json.loads(file.read_text(encoding="utf-8"))
        gpu = next((g for g in ("H200", "H100") if g in result["meta"]["gpu"]), None)
        if gpu is None:
            parser.error(f"{file}: measured on {result['meta']['gpu']}; the model knows H100 and H200 figures")
        for path, res in result["paths"].items():
            if "raw" not in res or not res["raw"].get("profile"):
                continue
            rows = project(result, path, gpu)
            projection["paths"][path] = {"measured_gpu": gpu, "rows": rows, "ratios": ratios(rows)}
    if args.notebooks:
        if "t4" not in projection["paths"]:
            parser.error("--notebooks needs a k_scaling result of the T4 path with --profile tables")
        emulation = json.loads(args.notebooks.read_text(encoding="utf-8"))
        projection["sources"].append(args.notebooks.name)
        projection["notebooks"] = notebook_projection(emulation, projection["paths"]["t4"]["rows"])
    print(render(projection))
    path = output(args.json, "t4_projection", device="cpu")
    if path:
        Path(path).write_text(json.dumps(projection, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
