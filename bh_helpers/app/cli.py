"""``bh-routing``: the command line of bh_helpers (thin: argparse over the floors, the demo in :mod:`bh_helpers.app.pipeline`).

Subcommands::

    bh-routing demo      capture + fit + sweep + report on the embedded model (the main job)
    bh-routing capture   router logits on calibration text -> .safetensors
    bh-routing fit       captured logits -> null bank folder (nulls.npz + metadata.json)
    bh-routing sweep     null bank + grid -> sweep.jsonl (resumable)
    bh-routing optimize  sweep.jsonl -> the best configuration under a compute budget
    bh-routing report    sweep.jsonl (+ null bank) -> report.md with figures

Errors in the input (unknown data set, empty text, a folder or results file of another
configuration grid) print one line ``bh-routing: error: ...`` and exit with status 2; existing
results are never overwritten.

Why one module: every flag, its help and the check that names it in an error are read together
(a user's flag maps to one line here); the work itself is in the floors below.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import time
import warnings
from collections.abc import Sequence

from bh_helpers._locks import check_kind, refuse_existing
from bh_helpers._validate import as_flags
from bh_helpers.app import paths, pipeline
from bh_helpers.capture import CapturedLogits, capture_calibration, check_capture, check_capture_model
from bh_helpers.experiments.configs import bank_name
from bh_helpers.experiments.grids import LAYER_TARGETS, check_grid, check_grid_fits, sweep_grid
from bh_helpers.experiments.evaluate import check_protocol, perplexity_sweep
from bh_helpers.experiments.static_allocation import AUTO_GREEDY_LAYERS
from bh_helpers.models import texts
from bh_helpers.models.families import moe_shape
from bh_helpers.nulls.fit import fit_captured
from bh_helpers.nulls.kernels import VALID_KERNELS
from bh_helpers.nulls.statistics import STATISTICS
from bh_helpers.report.assemble import report_step
from bh_helpers.routing.recorder import BoundWarning
from bh_helpers.selection.reference import WEIGHT_MODES

__all__ = ["as_flags", "build_parser", "main"]

_D = pipeline.DemoSettings()  # defaults shown in --help


def _once(values: tuple) -> tuple:
    """``values`` unless one is given twice: every list option refuses repeats alike (none is merged quietly)."""
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise argparse.ArgumentTypeError(f"{repeated[0]} is given twice; give each value once")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    return _once(values)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    return _once(values)


def _layer_alphas_file(path: str) -> tuple[tuple[float, ...], ...]:
    """--layer-alphas FILE: a JSON list of per-layer levels, or a list of such lists."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path!r} as JSON: {err}") from None
    rows = data if isinstance(data, list) and data and all(isinstance(r, list) for r in data) else [data]
    out = []
    for row in rows:
        if not isinstance(row, list) or not row or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a <= 1 for a in row):
            raise argparse.ArgumentTypeError(
                f"{path!r} must hold a list of levels in (0, 1], one per layer number (e.g. [0.2, 0.1, 0.05]), "
                f"or a list of such lists; got {row!r}.")
        out.append(tuple(float(a) for a in row))
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    return _once(tuple(x for x in text.replace(",", " ").split() if x))


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_D.model,
                   help="'tiny' (embedded tiny OLMoE, default), 'auto', a hub id or a local model folder")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (cuda when available, else cpu; the default), cpu, cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; on a shared or small CPU more threads are often much "
                        "slower, 0 keeps torch's default)")


def _add_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", type=_names, default=_D.datasets,
                   help=f"evaluation data sets, comma-separated: {', '.join(texts.EVAL_DATASETS)} or .txt paths "
                        f"(default: {','.join(_D.datasets)})")
    p.add_argument("--max-tokens", type=int, default=_D.max_tokens,
                   help=f"evaluation tokens per data set (default: {_D.max_tokens})")
    p.add_argument("--window", type=int, default=_D.window, help=f"perplexity window in tokens (default: {_D.window})")
    p.add_argument("--stride", type=int, default=_D.stride, help=f"perplexity stride in tokens (default: {_D.stride})")
    p.add_argument("--batch-size", type=int, default=_D.batch_size,
                   help=f"windows per forward pass (default: {_D.batch_size})")
    p.add_argument("--weights", choices=WEIGHT_MODES, default=_D.weights,
                   help="weights of the selected experts (default: softmax, OLMoE's own convention; inverse_p: "
                        "1/p under the layer's null, renormalised)")


def _add_grid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", type=_names, default=_D.methods,
                   help=f"multiple-testing methods among bh,by,bonferroni,holm (default: {','.join(_D.methods)})")
    p.add_argument("--alphas", type=_floats, default=_D.alphas,
                   help="explicit levels of the methods, besides those chosen for --mean-ks (default: none)")
    p.add_argument("--layer-alphas", type=_layer_alphas_file, default=_D.layer_alphas, metavar="FILE",
                   help="JSON file of per-layer levels (adaptive FDR): a list with one alpha per layer number, or a "
                        "list of such lists (one configuration each) (default: none)")
    p.add_argument("--layer-targets", choices=LAYER_TARGETS, default=_D.layer_targets,
                   help="reach each --mean-ks target over all layers with one alpha (global), in every layer with "
                        f"one alpha per layer (per-layer), or both (default: {_D.layer_targets})")
    p.add_argument("--mean-ks", type=_floats, default=_D.mean_ks,
                   help="compute targets in mean experts per token: for each, the alpha that reaches it on the "
                        f"calibration logits ('' for none; default: {','.join(map(str, _D.mean_ks))})")
    p.add_argument("--max-ks", type=_ints, default=_D.max_ks,
                   help=f"ceilings on experts per token (default: {','.join(map(str, _D.max_ks))})")
    p.add_argument("--min-ks", type=_ints, default=_D.min_ks,
                   help=f"floors on experts per token (default: {','.join(map(str, _D.min_ks))})")
    p.add_argument("--topk-max", type=int, default=_D.topk_max,
                   help=f"static top-k baselines k = 1..N (default: {_D.topk_max})")
    p.add_argument("--top-ps", type=_floats, default=_D.top_ps,
                   help=f"top-p baselines, '' for none (default: {','.join(map(str, _D.top_ps))})")


def _add_controls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--static-allocation", choices=("greedy", "separable", "auto", "none"),
                   default=_D.static_allocation,
                   help="the static per-layer control (one k per layer fitted on calibration text, run as the "
                        "static chord at each adaptive row's compute): greedy by calibration perplexity, the "
                        f"cheaper separable proxy, auto (greedy up to {AUTO_GREEDY_LAYERS} MoE layers, "
                        f"else separable), or none (default: {_D.static_allocation})")
    p.add_argument("--allocation-tokens", type=int, default=_D.allocation_tokens,
                   help=f"calibration tokens for the static allocation (default: {_D.allocation_tokens})")
    p.add_argument("--no-k-matching", action="store_true",
                   help="choose each compute target's alpha on the native model's calibration logits (default: on "
                        "the routed model's own logits, so that the realised mean k matches the target)")
    p.add_argument("--no-split", action="store_true",
                   help="evaluate the whole grid on whole data sets (default: choose configurations on the "
                        "even-numbered documents of each data set, state the verdict on the odd-numbered ones)")


def _add_unverified(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unverified-bank", action="store_true", help="load a null bank whose metadata.json has no "
                   "checksum or fails it (older or edited; only one you trust), with a warning")


def _add_report(sub) -> None:
    rep = sub.add_parser("report", help="sweep.jsonl -> report.md with figures",
                         description="Write report.md (frontier table, results, figures, protocol) into a folder.")
    rep.add_argument("--results", required=True, help="results file (.jsonl) of `bh-routing sweep` or `demo`")
    rep.add_argument("--out", required=True, help="report folder (its own report.md, summary.json, PNGs are replaced)")
    rep.add_argument("--nulls", default=None,
                     help="null bank folder, or a demo's nulls/ folder of banks; with it the model is loaded for "
                          "the category analysis and token view")
    _add_model(rep)
    rep.add_argument("--captured", default=None,
                     help="calibration logits (`bh-routing capture`): with --nulls, adds the max_k saturation table")
    rep.add_argument("--no-categories", action="store_true", help="skip the prompt-category analysis")
    _add_unverified(rep)


def _add_optimize(sub) -> None:
    opt = sub.add_parser("optimize", help="sweep.jsonl -> the best configuration under a compute budget",
                         description="Per data set, the configuration with the lowest perplexity within --budget mean "
                                     "experts per token, or the highest weighted quality and speed, with the "
                                     "compute-matched controls of an adaptive pick beside it.")
    opt.add_argument("--results", required=True, help="results file (.jsonl) of `bh-routing sweep` or `demo`")
    opt.add_argument("--budget", type=float, default=None, help="maximum mean experts per token")
    opt.add_argument("--quality-weight", type=float, default=None, help="weight of (min-max scaled) quality")
    opt.add_argument("--speed-weight", type=float, default=None, help="weight of (min-max scaled) speed: fewer experts")
    opt.add_argument("--save-config", default=None, metavar="FILE",
                     help="write the pick of the first data set as a routing config (JSON) that route() users "
                          "(RoutingConfig.load(FILE).to_selector()) and the vLLM plugin (BH_ROUTING_CONFIG) read; "
                          "needs --nulls for a BH-family pick")
    opt.add_argument("--nulls", default=None,
                     help="the null bank folder (or the demo's nulls/ folder of banks) the sweep routed with, "
                          "named in the saved config")
    opt.add_argument("--weights", choices=WEIGHT_MODES, default=None,
                     help="weights of the chosen experts in the saved config (default: the sweep's; another is refused)")
    _add_unverified(opt)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``bh-routing`` (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="bh-routing",
        description="Benjamini-Hochberg expert routing for mixture-of-experts language models.",
        epilog="Start with `bh-routing demo`; each step also runs on its own.",
    )
    from bh_helpers import __version__

    parser.add_argument("--version", action="version", version=f"bh-routing {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="capture, fit, sweep and report in one folder (the main job)",
        description="Capture router logits on calibration text, fit per-layer nulls, sweep BH/BY against "
                    "static top-k, top-p and native routing, and write report.md. Rerunning resumes: the "
                    "outputs already there are reused; an option that would change one of them stops with an "
                    "error and changes nothing.",
    )
    demo.add_argument("--out", default=pipeline.DEFAULT_OUTPUT_DIR,
                      help=f"output folder (default: ./{pipeline.DEFAULT_OUTPUT_DIR})")
    _add_model(demo)
    demo.add_argument("--calibration-tokens", type=int, default=_D.calibration_tokens,
                      help=f"calibration tokens for the nulls (default: {_D.calibration_tokens})")
    demo.add_argument("--kernel", choices=VALID_KERNELS, default=_D.kernel,
                      help=f"null kernel: {', '.join(VALID_KERNELS)} (default: {_D.kernel})")
    demo.add_argument("--statistics", type=_names, default=_D.statistics,
                      help="per-token test statistics, one null bank each: raw, centred, zscore "
                           f"(default: {','.join(_D.statistics)})")
    demo.add_argument("--trims", type=_ints, default=_D.trims,
                      help="fit nulls without each token's N largest values, one bank per N "
                           f"(default: {','.join(map(str, _D.trims))})")
    demo.add_argument("--grid-size", type=int, default=_D.grid_size,
                      help=f"null grid points per layer (default: {_D.grid_size})")
    _add_grid(demo)
    _add_protocol(demo)
    _add_controls(demo)
    demo.add_argument("--no-categories", action="store_true", help="skip the prompt-category analysis")
    demo.add_argument("--seed", type=int, default=_D.seed, help=f"bootstrap seed (default: {_D.seed})")
    _add_unverified(demo)  # a folder whose banks an older bh_helpers wrote

    cap = sub.add_parser("capture", help="router logits on calibration text -> .safetensors",
                         description="Run the model over calibration text and save float32 router logits of "
                                     "every MoE layer (safetensors, no pickle).")
    cap.add_argument("--out", required=True, help="output file (.safetensors); an existing file is an error")
    _add_model(cap)
    cap.add_argument("--calibration-tokens", type=int, default=_D.calibration_tokens,
                     help=f"calibration tokens (default: {_D.calibration_tokens})")
    cap.add_argument("--text-file", default=None,
                     help="calibrate on this UTF-8 text file instead of the embedded calibration slice")
    cap.add_argument("--window", type=int, default=_D.window, help=f"tokens per sequence (default: {_D.window})")
    cap.add_argument("--batch-size", type=int, default=_D.batch_size,
                     help=f"sequences per forward pass (default: {_D.batch_size})")

    fit = sub.add_parser("fit", help="captured logits -> null bank folder",
                         description="Fit one null per layer and save nulls.npz + metadata.json.")
    fit.add_argument("--captured", required=True, help="file written by `bh-routing capture`")
    fit.add_argument("--out", required=True, help="null bank folder; one that already holds a bank is an error")
    fit.add_argument("--kernel", choices=VALID_KERNELS, default=_D.kernel,
                     help=f"null kernel: {', '.join(VALID_KERNELS)} (default: {_D.kernel})")
    fit.add_argument("--grid-size", type=int, default=_D.grid_size,
                     help=f"grid points per layer (default: {_D.grid_size})")
    fit.add_argument("--model-id", default=None, help="model id for the metadata (default: the capture's)")
    fit.add_argument("--statistic", choices=STATISTICS, default="raw",
                     help=f"per-token test statistic: {', '.join(STATISTICS)} (default: raw)")
    fit.add_argument("--trim", type=int, default=0, help="fit without each token's N largest values (default: 0)")

    sw = sub.add_parser("sweep", help="null bank + grid -> sweep.jsonl (resumable)",
                        description="Evaluate every configuration of the grid on every data set; an existing "
                                    "results file of the same grid is resumed, one of another grid is an error.")
    sw.add_argument("--nulls", default=None,
                    help="null bank folder (default: the committed one of --model, see default_null_bank_dir)")
    sw.add_argument("--results", required=True, help="results file (.jsonl)")
    sw.add_argument("--captured", default=None,
                    help="calibration logits (`bh-routing capture`) on which --mean-ks choose alpha; without it "
                         "pass --mean-ks '' and --alphas")
    sw.add_argument("--no-controls", action="store_true",
                    help="skip the compute-matched controls (mixed and shuffled top-k) of each adaptive row")
    _add_model(sw)
    _add_unverified(sw)
    _add_grid(sw)
    _add_protocol(sw)

    _add_optimize(sub)
    _add_report(sub)
    return parser


def _check_model_name(name: str) -> None:
    """``--model``: 'tiny', 'auto', an existing folder, or an org/name hub id (checked before loading)."""
    import re

    if name in ("tiny", "auto") or os.path.isdir(name):
        return
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or os.path.exists(name)
    if looks_like_path or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ValueError(
            f"--model {name!r} is neither a model folder here nor a hub id of the form org/name; use --model tiny "
            "(the embedded model), --model auto, a folder written by save_pretrained, or e.g. "
            "--model allenai/OLMoE-1B-7B-0924."
        )


def _model_config(name: str):
    """The config of ``--model`` without loading its weights (so grid checks run before the load)."""
    from transformers import AutoConfig

    from bh_helpers.models.loading import EMBEDDED_MODEL_DIR

    _check_model_name(name)
    key = paths.resolve_model_key(name)
    try:
        return AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR if key == "tiny" else key)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--model {name!r} cannot be found ({first}); check the hub id or folder, or use --model tiny "
                         "(the embedded model).") from None
    except ValueError:  # configs that need trust_remote_code: load_model says what to do
        return None


def _load(args):
    import torch

    from bh_helpers.models.loading import load_model, resolve_device

    _model_config(args.model)
    device = str(resolve_device(args.device))
    return load_model(args.model, device=device, dtype=torch.float32 if device == "cpu" else None)


def _calibration(path: str | None, config, model: str):
    """``--captured``: ``(calibration logits, header)``, refused (naming the file) when --model has other experts."""
    experts = moe_shape(config).num_experts if config is not None else None
    return CapturedLogits.load(path, num_experts=experts, of=f"--model {model!r}")


def _cmd_demo(args) -> int:
    settings = pipeline.DemoSettings(
        model=args.model, calibration_tokens=args.calibration_tokens, kernel=args.kernel, grid_size=args.grid_size,
        methods=args.methods, alphas=args.alphas, mean_ks=args.mean_ks, statistics=args.statistics, trims=args.trims,
        layer_alphas=args.layer_alphas, layer_targets=args.layer_targets,
        max_ks=args.max_ks, min_ks=args.min_ks, topk_max=args.topk_max,
        top_ps=args.top_ps, weights=args.weights, datasets=args.datasets, max_tokens=args.max_tokens,
        window=args.window, stride=args.stride, batch_size=args.batch_size, categories=not args.no_categories,
        seed=args.seed, static_allocation=args.static_allocation, allocation_tokens=args.allocation_tokens,
        split=not args.no_split, k_matching=not args.no_k_matching,
    )
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file; pass a folder (a new one, or the folder of an earlier run "
                         "to resume it).")
    from bh_helpers.models.loading import resolve_device

    device = str(resolve_device(args.device))
    config = _model_config(args.model)
    if config is not None:
        settings.check_model(config)  # before the weights load and before anything is written
    t0 = time.perf_counter()
    result = pipeline.run_demo(settings, out_dir=args.out, device=device, progress=not args.no_progress,
                               allow_unverified=args.allow_unverified_bank)
    n_bh = int((result.frontier["status"] == "ok").sum())
    print(f"{'resumed' if result.resumed else 'finished'} in {time.perf_counter() - t0:.0f} s: "
          f"{len(result.frontier)} adaptive rows, {n_bh} inside the static top-k range, each beside its "
          "compute-matched controls")
    print("seconds per step: " + ", ".join(f"{name} {sec:.0f}" for name, sec in result.timings.items()))
    print(f"report:  {result.report_path}")
    print(f"results: {result.results_path}")
    if result.peak_gpu_gib:
        print("peak GPU memory (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in result.peak_gpu_gib.items()))
    return 0


def _cmd_capture(args) -> int:
    check_capture(max_tokens=args.calibration_tokens, window=args.window, batch_size=args.batch_size,
                  out_path=args.out, text_file=args.text_file)  # before the model loads
    model, tok = _load(args)
    captured = capture_calibration(model, tok, max_tokens=args.calibration_tokens, window=args.window,
                                   batch_size=pipeline.room_for(model, args.window, args.batch_size),
                                   text_file=args.text_file, out_path=args.out, model_id=args.model,
                                   progress=not args.no_progress)
    print(f"captured {captured.num_tokens} tokens x {len(captured)} layers -> {args.out}")
    return 0


def _cmd_fit(args) -> int:
    bank = fit_captured(args.captured, kernel=args.kernel, grid_size=args.grid_size, model_id=args.model_id,
                        out_dir=args.out, statistic=args.statistic, trim=args.trim)  # checks, then locks --out
    extra = f", {args.statistic}" if args.statistic != "raw" else ""
    extra += f", trim {args.trim}" if args.trim else ""
    print(f"fitted {len(bank)} layers ({args.kernel}{extra}) -> {args.out}")
    return 0


def _cmd_sweep(args) -> int:
    from bh_helpers.nulls.bank import NullBank

    grid = dict(methods=args.methods, alphas=args.alphas, mean_ks=args.mean_ks, max_ks=args.max_ks, min_ks=args.min_ks,
                top_ps=args.top_ps, layer_alphas=args.layer_alphas, layer_targets=args.layer_targets,
                topk_max=args.topk_max)
    protocol = dict(datasets=args.datasets, max_tokens=args.max_tokens, window=args.window, stride=args.stride,
                    batch_size=args.batch_size, weights=args.weights)
    check_kind(args.results, "--results")
    check_grid(**grid)
    check_protocol(**protocol)
    if args.mean_ks and not args.captured:
        raise ValueError("--mean-ks needs --captured (calibration logits from `bh-routing capture`) to choose alpha; "
                         "or pass --mean-ks '' and --alphas.")
    config = _model_config(args.model)
    if config is not None:  # the grid and the window against the model's shape, before it loads
        check_grid_fits(config, max_ks=args.max_ks, min_ks=args.min_ks, topk_max=args.topk_max,
                        layer_alphas=args.layer_alphas, model_name=args.model)
        check_protocol(**protocol, model=config)
    nulls = args.nulls or paths.default_null_bank_dir(args.model)
    bank = NullBank.load(nulls, allow_unverified=args.allow_unverified_bank)
    if config is not None:  # before its p-values meet the calibration logits
        bank.check_compatible(config, what=f"--model {args.model!r}")
    meta = bank.metadata
    calibration, header = _calibration(args.captured, config, args.model) if args.captured else (None, None)
    configs = sweep_grid(banks={bank_name(meta.kernel, meta.statistic, meta.trim): bank}, calibration=calibration,
                         controls=not args.no_controls, **grid)
    source = "--nulls" if args.nulls else f"the committed bank of --model {args.model} (pass --nulls to choose)"
    print(f"null bank: {nulls} ({source}; {meta.kernel} kernel, {meta.statistic} statistic, {len(list(bank))} layers)")
    model, tok = _load(args)
    if header is not None:  # before anything is written
        check_capture_model(header, model, args.captured)
    df = perplexity_sweep(model, tok, configs, null_bank=bank, results_path=args.results, model_id=args.model,
                          **{**protocol, "batch_size": pipeline.room_for(model, args.window, args.batch_size)},
                          progress=not args.no_progress)
    print(f"{len(df)} rows in {args.results}")
    return 0


def _cmd_report(args) -> int:
    from bh_helpers.experiments.sweep import load_results

    results = load_results(args.results)
    model = tok = bank = None
    if args.nulls:
        from bh_helpers.experiments.optimize import check_banks_are_the_sweeps

        bank = pipeline.load_banks(args.nulls, args.allow_unverified_bank)
        check_banks_are_the_sweeps(results, bank, args.nulls)  # before the report is written
        model, tok = _load(args)
    if args.captured and not args.nulls:
        raise ValueError("--captured (for the max_k saturation table) needs --nulls, the bank to test with.")
    calibration, header = _calibration(args.captured, _model_config(args.model), args.model) if args.captured \
        else (None, None)
    if header is not None and model is not None:
        check_capture_model(header, model, args.captured)
    path = report_step(args.out, results=results, model=model, tokenizer=tok, null_bank=bank,
                       calibration=calibration, model_id=args.model, categories=not args.no_categories,
                       progress=not args.no_progress)
    print(f"report: {path}")
    return 0


def _cmd_optimize(args) -> int:
    from bh_helpers.experiments.optimize import optimize
    from bh_helpers.experiments.sweep import load_results
    from bh_helpers.report.write import markdown_table

    weights = (args.quality_weight, args.speed_weight)
    if args.budget is None and None in weights and weights != (None, None):
        raise ValueError("--quality-weight and --speed-weight go together; give both (or --budget).")
    if args.save_config:
        refuse_existing(args.save_config, "--save-config")  # before reading anything; again under its lock
    results = load_results(args.results)
    picks = optimize(results, budget=args.budget, quality_weight=args.quality_weight,
                     speed_weight=args.speed_weight)
    print(markdown_table(picks, floatfmt=".3f"))
    if args.save_config:
        from bh_helpers.experiments.optimize import save_routing_config

        pick = picks.iloc[0]
        if not isinstance(pick["key"], str):  # optimize warned which configuration is the cheapest
            raise ValueError(f"--save-config: nothing fits --budget {args.budget:g}; nothing was saved.")
        try:
            config = save_routing_config(results, pick["key"], args.save_config, nulls=args.nulls,
                                         weights=args.weights, allow_unverified=args.allow_unverified_bank)
        except ValueError as err:
            flags = {"`nulls`": "--nulls", "`key`": "--budget", "`path`": "--save-config"}
            raise ValueError(functools.reduce(lambda m, kv: m.replace(*kv), flags.items(), str(err))) from None
        print(f"routing config of {config.label()!r} ({pick['dataset']}) -> {args.save_config}")
    return 0


_COMMANDS = {"demo": _cmd_demo, "capture": _cmd_capture, "fit": _cmd_fit, "sweep": _cmd_sweep,
             "optimize": _cmd_optimize, "report": _cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bh-routing`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    empty = [dest for dest, value in vars(args).items() if value == ""]  # lists parse to tuples: '' is a path or name
    if empty:  # `--out ''` wrote into the current folder, `--model-id ''` stored no id
        parser.error(f"--{empty[0].replace('_', '-')} is empty; pass a name (for a path, '.' is the current folder)")
    threads, cores = getattr(args, "threads", 0), os.cpu_count() or 1
    if not 0 <= threads <= cores:  # more threads than cores only slows torch down (and far more crashes it)
        parser.error(f"--threads must be between 0 (torch's default) and {cores} (this machine's cores), got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar too
    options = _options_of(parser, args.command)
    try:
        with warnings.catch_warnings():  # one per routed configuration: the report lists the rows at a bound
            warnings.filterwarnings("ignore", category=BoundWarning)
            # a warning reads like an error: one line in the user's flags, not a source line and a Python name
            warnings.showwarning = lambda message, *_, **__: print(
                f"bh-routing: warning: {as_flags(str(message), options)}", file=sys.stderr)
            return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, MemoryError) as err:
        return _fail(as_flags(str(err), options))
    except KeyboardInterrupt:
        # Every step writes whole files or fsynced lines: what finished is kept and resumed.
        print("bh-routing: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        output = next((flag for flag in ("--out", "--save-config", "--results") if flag in options), "output")
        fix = _OS_FIXES.get(err.errno, "").replace("--out", output)  # the option that names this command's output
        return _fail(f"{err.strerror or err}{where}{fix}")
    except ImportError as err:  # pandas / matplotlib are optional dependencies of the package
        return _fail(f"{err}; install the extras with `pip install 'bh-routing[notebooks]'`.")
    except Exception as err:  # never a traceback: one line, and how to get the details
        if os.environ.get("BH_ROUTING_DEBUG"):
            raise
        return _fail(f"{type(err).__name__}: {as_flags(str(err), options).splitlines()[0] if str(err) else ''} "
                     "(an unexpected failure; rerun with BH_ROUTING_DEBUG=1 for the traceback and report it)")


def _fail(message: str) -> int:
    print(f"bh-routing: error: {message}", file=sys.stderr)
    return 2


_OS_FIXES = {errno.ENOSPC: "; free space or choose another --out.", errno.EDQUOT: "; free space or choose another --out.",
             errno.EROFS: "; choose a writable --out.", errno.EACCES: "; choose a writable --out.",
             errno.EPERM: "; choose a writable --out."}

def _options_of(parser: argparse.ArgumentParser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return set(sub._option_string_actions)


if __name__ == "__main__":  # pragma: no cover - `python -m bh_helpers` is the module form with Ctrl-C answered early
    sys.exit(main())
