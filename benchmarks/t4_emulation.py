"""Colab T4 emulation harness: OLMoE-1B-7B in float16 under a 14 GiB cap, on any CUDA GPU.

Our users run the notebooks on a Colab T4 (15 GB, compute capability 7.5, float16, no grouped
GEMM). This harness reproduces that path on a bigger GPU and checks what users hit:

1. ``build``: an OLMoE-1B-7B-shaped ``OlmoeForCausalLM`` (16 layers, hidden 2048, 64 experts x
   1024, top-8, vocab 50304) with random float16 weights made on the GPU (router rows scaled per
   expert so routing is far from uniform), saved with the embedded tokenizer to a folder that
   ``load_model(path)`` and the notebooks (``BH_MODEL=path``) load as they would the hub model;
2. ``numerics``: inf/NaN and the largest magnitude in the MoE outputs and the residual stream
   on evaluation text, 7B-shaped and tiny model in float16, native and BH-like routing;
3. ``speed``: native vs ``route`` (patched top-8, BH-like load with mean k 4.5, and patched top-8
   through the reference dispatch), prefill 8 x 256 and greedy decode batch 1 and 8, variants
   interleaved round by round, ratios = medians of per-round paired ratios; plus the routed
   logits of the fast dispatch against the reference dispatch (float16 tolerance);
4. ``demo``: ``bh-routing demo --device cuda --model <folder>`` at default settings;
5. ``notebooks``: all four notebooks in full mode (``BH_NOTEBOOK_SMALL=0``) under ``pytest --nbmake``,
   checking that ``kde_models/`` stays byte-identical.

Every process runs emulated (``benchmarks/t4_site/sitecustomize.py``: capability switch 7.5,
allocator cap, transformers' sm75 MoE path); its peak memory is recorded per step. One JSON
(merged into ``--json`` when it exists) holds wall time, peak memory and results per step.

    python benchmarks/t4_emulation.py --work /tmp/t4 --json   # all steps

``--json`` without a value writes ``benchmarks/results/t4_emulation_<device>_<commit>.json`` (the host
GPU, e.g. ``h200``); the README tables are ``render`` of the file INDEX.md names
(``python scripts/render_results.py``).

Speed is emulated too: an H200 is not a T4 (bandwidth, SDPA and cuBLAS kernels); the ratios
say how our path compares with transformers' own T4 path under the same conditions.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SITE = HERE / "t4_site"
STEPS = ("build", "numerics", "speed", "demo", "notebooks")


def _emulated_env(work: Path, step: str) -> dict[str, str]:
    env = dict(os.environ, BH_T4_EMULATION="1", BH_T4_STEP=step, BH_T4_PEAK_LOG=str(work / "peaks"),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _peaks(work: Path, step: str) -> dict:
    """Largest peak memory of the processes of one step (from the site hook's files)."""
    rows = []
    for path in glob.glob(str(work / "peaks") + ".*.json"):
        with open(path, encoding="utf-8") as f:
            row = json.load(f)
        if row.get("step") == step:
            rows.append(row)
    if not rows:
        return {}
    return {"peak_allocated_gib": round(max(r["peak_allocated_gib"] for r in rows), 3),
            "peak_reserved_gib": round(max(r["peak_reserved_gib"] for r in rows), 3), "processes": len(rows)}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Steps run in this (emulated) process
# ----------------------------------------------------------------------------------------------


def build_model(model_dir: Path, layers: int = 16) -> dict:
    """Random float16 OLMoE-1B-7B-shaped model + the embedded tokenizer, saved to ``model_dir``."""
    import torch
    from sitecustomize import apply_t4_emulation
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    from bh_helpers.models.loading import embedded_model_dir

    cfg = OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, norm_topk_prob=False, initializer_range=0.02, tie_word_embeddings=False,
    )
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    # Building and saving is not the user's path (save_pretrained copies shards on the GPU):
    # the T4 cap is lifted for this step only and restored below.
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # made in float16 on the GPU: never a float32 copy
    try:
        with torch.device("cuda"):
            model = OlmoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            if name.endswith("mlp.gate.weight"):  # [E, H]: per-expert scale, so some experts win often
                scale = torch.exp(0.5 * torch.randn(p.shape[0], 1, device="cuda", generator=g, dtype=torch.float32))
                p.mul_(scale.to(p.dtype))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    apply_t4_emulation()  # the cap again
    return {"weights_gib": round(n_bytes / 2**30, 3), "config": {k: getattr(cfg, k) for k in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_experts", "num_experts_per_tok", "vocab_size")}}


def _evaluation_ids(tokenizer, n_tokens: int) -> list[int]:
    from bh_helpers.models.loading import load_corpus_slice

    ids: list[int] = []
    for record in load_corpus_slice("evaluation"):
        ids += tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def numerics(model_dir: Path) -> dict:
    """inf/NaN and max |value| of every MoE output and decoder-layer output on evaluation text."""
    import torch

    import bh_helpers.routing.patch as patching
    from bh_helpers.models.loading import load_model
    from bh_helpers.models.families import find_moe_blocks
    from bench_gpu import ForcedKSelector

    out = {}
    for name in (str(model_dir), "tiny"):
        model, tok = load_model(name, device="cuda")
        ids = torch.tensor(_evaluation_ids(tok, 4 * 256), device="cuda").reshape(4, 256)
        stats: dict[str, list[float]] = {"moe_max_abs": [], "residual_max_abs": []}
        bad: list[str] = []

        def hook(kind, label):
            def fn(module, args, output):
                y = output[0] if isinstance(output, tuple) else output
                if not torch.isfinite(y).all():
                    bad.append(label)
                stats[kind].append(float(y.float().abs().max()))
            return fn

        handles = [b.module.register_forward_hook(hook("moe_max_abs", f"moe{b.layer}")) for b in find_moe_blocks(model)]
        handles += [layer.register_forward_hook(hook("residual_max_abs", f"layer{i}"))
                    for i, layer in enumerate(model.model.layers)]
        row = {"dtype": str(next(model.parameters()).dtype)}
        try:
            for routing in ("native", "BH-like (mean k 4.5)"):
                stats["moe_max_abs"].clear()
                stats["residual_max_abs"].clear()
                bad.clear()
                ctx = contextlib.nullcontext() if routing == "native" else patching.route(model, ForcedKSelector(8))
                with torch.no_grad(), ctx:
                    logits = model(input_ids=ids, use_cache=False).logits
                row[routing] = {"non_finite": list(bad), "logits_finite": bool(torch.isfinite(logits).all()),
                                "moe_max_abs": max(stats["moe_max_abs"]),
                                "residual_max_abs": max(stats["residual_max_abs"]),
                                "float16_max": float(torch.finfo(torch.float16).max)}
        finally:
            for h in handles:
                h.remove()
        out["7B-shaped" if name != "tiny" else "tiny"] = row
        del model
        torch.cuda.empty_cache()
    return out


def speed(model_dir: Path, rounds: int, new_tokens: int) -> dict:
    """Native vs routed, interleaved rounds, medians of per-round paired ratios; plus equality."""
    import torch

    import bh_helpers.routing.patch as patching
    from bh_helpers import TopKSelector
    from bh_helpers.models.loading import load_model
    from bench_gpu import ForcedKSelector, eager_blocks, reference_dispatch, wall_median

    model, _ = load_model(str(model_dir), device="cuda")
    model.generation_config.eos_token_id = None  # fixed-length decode
    model.generation_config.pad_token_id = 0
    torch.manual_seed(0)
    ids = torch.randint(0, 50304, (8, 256), device="cuda")
    variants = {
        "native top-8": (None, False),
        "patched top-8": (TopKSelector(8, weights="softmax"), False),
        "BH-like k~U{1..8} (mean 4.5)": ("forced", False),
        "patched top-8, reference dispatch": (TopKSelector(8, weights="softmax"), True),
    }

    def context(name):
        selector, reference = variants[name]
        if selector is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if reference:  # the reference dispatch everywhere: no graphed decode either
            stack.enter_context(reference_dispatch())
            stack.enter_context(eager_blocks())
        stack.enter_context(patching.route(model, ForcedKSelector(8) if selector == "forced" else selector))
        return stack

    result: dict = {}
    with torch.inference_mode():
        # outputs: the fast T4 dispatch against the reference dispatch (same selector)
        with patching.route(model, TopKSelector(8, weights="softmax")):
            fast = model(input_ids=ids[:2], use_cache=False).logits.float()
        with reference_dispatch(), patching.route(model, TopKSelector(8, weights="softmax")):
            ref = model(input_ids=ids[:2], use_cache=False).logits.float()
        native = model(input_ids=ids[:2], use_cache=False).logits.float()
        result["equality"] = {
            "fast_vs_reference_rel_err": float((fast - ref).norm() / ref.norm()),
            "fast_vs_native_rel_err": float((fast - native).norm() / native.norm()),
            "argmax_agreement_fast_vs_reference": float((fast.argmax(-1) == ref.argmax(-1)).float().mean()),
            "tolerance": "relative L2 error of float16 logits < 5e-3",
        }
        del fast, ref, native
        torch.cuda.empty_cache()
        times: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
        failed: dict[str, dict[str, str]] = {name: {} for name in variants}

        def timed(name: str, key: str, fn) -> None:
            """One timed round of one variant; an out-of-memory error is a result, not a crash."""
            if key in failed[name]:
                return
            try:
                with context(name):
                    times[name].setdefault(key, []).append(wall_median(fn, warmup=1, reps=1))
            except torch.cuda.OutOfMemoryError as err:
                failed[name][key] = "out of memory: " + str(err).splitlines()[0][:160]
                times[name].pop(key, None)
                torch.cuda.empty_cache()
            print(f"  {key} {name}: {times[name].get(key, failed[name].get(key))}", flush=True)

        for _ in range(rounds):
            for name in variants:
                timed(name, "prefill", lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))
        for batch in (1, 8):
            prompt = torch.randint(0, 50304, (batch, 32), device="cuda")

            def gen(prompt=prompt):
                out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                assert out.shape[1] == 32 + new_tokens

            for _ in range(rounds):
                for name in variants:
                    timed(name, f"decode_b{batch}", gen)
    work = {"prefill": 8 * 256, "decode_b1": new_tokens, "decode_b8": 8 * new_tokens}
    base = times["native top-8"]
    table = {}
    for name, per in times.items():
        row = {f"{key}_error": msg for key, msg in failed[name].items()}
        for key, ts in per.items():
            row[f"{key}_tok_s"] = work[key] / statistics.median(ts)
            if key in base:
                row[f"{key}_x_native"] = statistics.median(b / t for b, t in zip(base[key], ts))
            row[f"{key}_rounds_s"] = ts
        table[name] = row
    result["variants"] = table
    result["protocol"] = (f"{rounds} interleaved rounds; per round each variant enters route, 1 warm-up + 1 timed "
                          f"call; prefill model(ids[8, 256], use_cache=False, logits_to_keep=1); decode "
                          f"generate(greedy, prompt 32, {new_tokens} new tokens), batch 1 and 8; tok/s = median of "
                          "rounds; x native = median of per-round paired ratios")
    targets = {"patched top-8": {"prefill": 0.95, "decode_b1": 0.95},
               "BH-like k~U{1..8} (mean 4.5)": {"prefill": 1.3, "decode_b1": 1.0}}
    result["targets"] = {f"{name} {key} >= {t}x": table[name].get(f"{key}_x_native", 0.0) >= t
                         for name, ts in targets.items() for key, t in ts.items()}
    return result


# ----------------------------------------------------------------------------------------------
# Steps run as subprocesses (as users run them)
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "output_tail": (proc.stdout + proc.stderr)[-2500:]}


def demo(work: Path, model_dir: Path, timeout: int) -> dict:
    out_dir = work / "demo"
    cli = [shutil.which("bh-routing") or "bh-routing"] if shutil.which("bh-routing") else [sys.executable, "-m", "bh_helpers.app.cli"]
    res = _run([*cli, "demo", "--device", "cuda", "--model", str(model_dir), "--out", str(out_dir),
                "--no-progress"], _emulated_env(work, "demo"), REPO, timeout)
    steps = out_dir / "steps.json"
    if steps.is_file():
        res["steps"] = json.loads(steps.read_text())
    return res


def notebooks(work: Path, model_dir: Path, timeout: int, save=lambda partial: None, only=None,
              eval_datasets: str = "") -> dict:
    before = _digest(REPO / "bh_helpers" / "data" / "kde_models")
    rows: dict = {}
    for nb in sorted((REPO / "notebooks").glob("0*.ipynb")):
        if only and not any(nb.stem.startswith(prefix) for prefix in only):
            continue
        step = f"notebook {nb.stem}"
        env = _emulated_env(work, step)
        env.update(BH_MODEL=str(model_dir), BH_NOTEBOOK_SMALL="0")
        if eval_datasets:  # offline: an embedded slice in WikiText-2's place, same number of tokens
            env["BH_EVAL_DATASETS"] = eval_datasets
        res = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
                    f"--nbmake-timeout={timeout}", str(nb)], env, REPO, timeout + 60)
        res.update(_peaks(work, step))
        rows[nb.stem] = res
        save({"notebooks": rows})  # a run stopped between notebooks keeps what finished
    return {"notebooks": rows, "kde_models_byte_identical": _digest(REPO / "bh_helpers" / "data" / "kde_models") == before}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def render(report: dict) -> str:
    """The README's "Colab T4" tables, generated from a results JSON of this harness."""
    meta, steps = report["meta"], report["steps"]
    out = [f"Emulated T4 on {meta['gpu']} (torch {meta['torch']}, transformers {meta['transformers']}): "
           f"{meta['emulated']}.", ""]
    if "build" in steps:
        out += [f"Weights: {steps['build']['weights_gib']:.2f} GiB (float16, OLMoE-1B-7B shape, random).", ""]
    rows = ["| step | wall s | peak GiB allocated | result |", "|---|---:|---:|---|"]
    demo = steps.get("demo", {})
    if demo:
        peaks = demo.get("steps", {}).get("peak_gpu_gib", {})
        rows.append(f"| `bh-routing demo --device cuda` (defaults) | {demo['wall_s']:.0f} | "
                    f"{max(peaks.values(), default=float('nan')):.2f} | exit {demo['returncode']} |")
        for name, peak in demo.get("steps", {}).get("peak_gpu_gib", {}).items():
            rows.append(f"| demo: {name} | {demo['steps']['seconds'][name]:.1f} | {peak:.2f} | |")
    for name, nb in steps.get("notebooks", {}).get("notebooks", {}).items():
        peak = nb.get("peak_allocated_gib", 0.0)
        rows.append(f"| notebook {name}, full mode (nbmake) | {nb['wall_s']:.0f} | "
                    f"{peak:.2f}{' (no model on the GPU)' if peak < 0.01 else ''} | exit {nb['returncode']} |")
    if "notebooks" in steps:
        rows.append(f"| committed null banks (`bh_helpers/data/kde_models/`) byte-identical after the notebooks | | | "
                    f"{steps['notebooks'].get('kde_models_byte_identical')} |")
    out += rows + [""]
    speed = steps.get("speed")
    if speed:
        out += ["| variant | prefill 8x256 tok/s | x native | decode b1 tok/s | x native | decode b8 tok/s |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in speed["variants"].items():
            def cell(key, r=r):
                if f"{key}_error" in r:
                    return "out of memory", "-"
                return f"{r[f'{key}_tok_s']:,.0f}", f"{r.get(f'{key}_x_native', float('nan')):.2f}"
            p, px = cell("prefill")
            d1, d1x = cell("decode_b1")
            d8, _ = cell("decode_b8")
            out.append(f"| {name} | {p} | {px} | {d1} | {d1x} | {d8} |")
        eq = speed["equality"]
        out += ["", f"Protocol: {speed['protocol']}. Routed logits, fast T4 dispatch vs the reference dispatch: "
                f"relative L2 error {eq['fast_vs_reference_rel_err']:.1e} ({eq['tolerance']}); argmax agreement "
                f"{eq['argmax_agreement_fast_vs_reference']:.3f}. Targets: "
                + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in speed["targets"].items()) + "."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/t4_emulation"), help="model folder and outputs")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per subprocess step")
    parser.add_argument("--notebooks", nargs="+", default=None, metavar="PREFIX",
                        help="only these notebooks in the notebooks step, e.g. 03 (default all)")
    parser.add_argument("--eval-datasets", default="",
                        help="BH_EVAL_DATASETS for the notebooks, e.g. prose (offline: no WikiText-2 download)")
    parser.add_argument("--json", nargs="?", const="scheme", default=None,
                        help="results file, merged into when it exists; without a value: "
                             "benchmarks/results/t4_emulation_<device>_<commit>.json")
    args = parser.parse_args(argv)
    if os.environ.get("BH_T4_EMULATION") != "1":  # re-run this process emulated (site hook on the path)
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])],
                  _emulated_env(args.work, "harness"))
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "scripts"))
    import torch
    import transformers
    from _results import output

    args.json = Path(output(args.json, "t4_emulation")) if args.json else None

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "model"
    report = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    report["meta"] = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "emulated": "Colab T4: capability 7.5 (BH_ROUTING_CUDA_CAPABILITY), "
        f"float16, allocator cap {os.environ.get('BH_T4_MEMORY_GIB', '14')} GiB, transformers' grouped_mm "
        "fallback forced; timings are of the host GPU, not of a T4",
    }
    def save(step: str, res: dict) -> None:
        report.setdefault("steps", {})[step] = res
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    failed = False
    for step in args.steps:
        t0 = time.perf_counter()
        if step in ("build", "numerics", "speed"):
            torch.cuda.reset_peak_memory_stats()
        try:
            if step == "build":
                res = build_model(model_dir)
            elif step == "numerics":
                res = numerics(model_dir)
            elif step == "speed":
                res = speed(model_dir, args.rounds, args.new_tokens)
            elif step == "demo":
                res = demo(args.work, model_dir, args.timeout)
                res.update(_peaks(args.work, "demo"))
            else:
                res = notebooks(args.work, model_dir, args.timeout, save=lambda partial: save("notebooks", partial),
                                only=args.notebooks, eval_datasets=args.eval_datasets)
                res["eval_datasets"] = args.eval_datasets or "notebook default"
        except Exception as err:  # noqa: BLE001 - one failed step is a result; the others still run
            import traceback

            res = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            failed = True
        if step in ("build", "numerics", "speed"):
            res["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        res["step_wall_s"] = round(time.perf_counter() - t0, 1)
        save(step, res)
        print(f"== {step}: {json.dumps(res, default=str)[:3000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
