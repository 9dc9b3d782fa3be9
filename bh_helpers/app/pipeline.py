"""The demo's wiring: capture -> fit -> sweep -> report in one folder (``run_demo``).

Each step reads and writes plain files, so the command line (:mod:`bh_helpers.app.cli`) can run
them one at a time or all at once; the science of each step lives in its floor:

==============  ==================================================================  =========================
step            writes                                                              done by
==============  ==================================================================  =========================
capture         ``captured_logits.safetensors`` (router logits ``[N, E]`` per       :func:`bh_helpers.capture.capture_calibration`
                layer, token ids, positions, sequence index; safetensors, no pickle)
fit             a :class:`~bh_helpers.nulls.bank.NullBank` folder                   :func:`bh_helpers.nulls.fit.fit_captured`
sweep           ``sweep.jsonl`` (resumable)                                         :func:`bh_helpers.experiments.evaluate.perplexity_sweep`
report          ``report.md`` + PNG figures                                         :func:`bh_helpers.report.assemble.report_step`
==============  ==================================================================  =========================

The evaluation protocol is stated in :mod:`bh_helpers.experiments.evaluate`. Selected experts
keep their softmax router probabilities (``weights="softmax"``, OLMoE's own
``norm_topk_prob=False`` convention, so static top-8 equals the native model) for
BH/BY/top-k/top-p; ``"renorm"`` is available but the embedded model was not trained for it
(top-8 perplexity 22.3 instead of 15.0 on 1k prose tokens). Evaluation data sets are listed in
:data:`bh_helpers.models.texts.EVAL_DATASETS`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bh_helpers._locks import exclusive, lock_path
from bh_helpers._validate import check_choice, check_int
from bh_helpers.capture import (MIN_CALIBRATION_TOKENS, CapturedLogits, capture_calibration, check_capture_model,
                                window_batches)
from bh_helpers.evaluation.scoring import fit_batch_size, window_count
from bh_helpers.experiments.bootstrap import MIN_WINDOWS
from bh_helpers.experiments.comparison import compare_with_controls
from bh_helpers.experiments.grids import check_grid, check_grid_fits, sweep_grid
from bh_helpers.experiments.evaluate import check_enough_text, check_protocol, perplexity_sweep
from bh_helpers.experiments.frontier import compute_frontier
from bh_helpers.experiments.k_matching import RoutedBudget
from bh_helpers.experiments.run_folder import (
    CAPTURED_NAME,
    CONFIRM_NAME,
    NULLS_DIR,
    RESULTS_NAME,
    SETTINGS_NAME,
    STATIC_NAME,
    STEPS_NAME,
    check_run_folder,
    record_settings,
)
from bh_helpers.experiments.task_accuracy import task_accuracy_table
from bh_helpers.experiments.tune_confirm import confirmation_configs, pick_on_tuning
from bh_helpers.experiments.static_allocation import (ALLOCATION_METHODS, StaticAllocationPath,
                                                      check_allocation_tokens, static_allocation_path)
from bh_helpers.models.families import moe_shape
from bh_helpers.models.loading import load_model
from bh_helpers.models.texts import MIN_CALIBRATION_TEXT_TOKENS, SPLITS, calibration_token_ids, split_name
from bh_helpers.nulls.bank import NullBank, bank_name, load_bank_folder
from bh_helpers.nulls.fit import check_fit_options, check_fitted_on, fit_captured
from bh_helpers.report.assemble import report_step

__all__ = ["DEFAULT_OUTPUT_DIR", "CAPTURED_NAME", "NULLS_DIR", "RESULTS_NAME", "SETTINGS_NAME", "DemoSettings",
           "DemoResult", "GPUOutOfMemory", "load_banks", "room_for", "run_demo"]

DEFAULT_OUTPUT_DIR = "bh_routing_output"
K_MATCHING_TOKENS = 4096  # calibration tokens on which alpha is solved routed (--k-matching)


# ----------------------------------------------------------------------------------------------
# Capture and fit
# ----------------------------------------------------------------------------------------------


def room_for(model, window: int, batch_size: int) -> int:
    """``batch_size``, lowered (with a warning naming ``--batch-size``) when the GPU has no room for it."""
    import warnings

    fitted = fit_batch_size(model, window, batch_size)
    if fitted < batch_size:
        warnings.warn(
            f"{batch_size} windows of {window} tokens per forward pass do not fit in the GPU memory left beside the "
            f"model; running {fitted} windows per forward pass (results do not depend on it; pass --batch-size "
            f"{fitted} or lower to choose yourself).", stacklevel=3)
    return fitted


def load_banks(folder: str, allow_unverified: bool = False):
    """``--nulls``: one bank folder, or a folder of banks (the demo's ``nulls/``, one per statistic and trim)."""
    try:
        return load_bank_folder(folder, allow_unverified=allow_unverified)
    except ValueError as err:
        raise ValueError(str(err).replace("`path`", "--nulls", 1)) from None


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the numbers of ``bh-routing demo`` (stored as ``run.json``).

    A folder is resumed with the same settings for the outputs it holds (a late failure, e.g. a
    compute target out of reach, leaves the capture and banks for a corrected run); any difference
    in those raises before anything is written (:mod:`bh_helpers.experiments.run_folder`).
    """

    model: str = "tiny"  # "tiny", a hub id or a local path
    calibration_tokens: int = 16384  # tokens of calibration text for the nulls
    kernel: str = "gaussian"  # null kernel
    grid_size: int = 8192  # null grid points per layer
    methods: tuple[str, ...] = ("bh",)  # multiple-testing methods (BY at a compute target is BH: same experts)
    alphas: tuple[float, ...] = ()  # explicit levels (besides those chosen for mean_ks)
    mean_ks: tuple[float, ...] = (2.0, 4.0)  # compute targets: alpha chosen on the calibration logits
    layer_alphas: tuple[tuple[float, ...], ...] = ()  # explicit per-layer levels (adaptive FDR), one row each
    layer_targets: str = "global"  # compute targets reached over all layers, per layer, or both
    statistics: tuple[str, ...] = ("raw", "zscore")  # per-token test statistics (one bank each)
    trims: tuple[int, ...] = (0, 8)  # nulls fitted without each token's largest values (one bank each)
    max_ks: tuple[int, ...] = (8,)  # ceilings of the adaptive methods
    min_ks: tuple[int, ...] = (1,)  # floors of the adaptive methods
    topk_max: int = 8  # static top-k baselines k = 1 .. topk_max
    top_ps: tuple[float, ...] = (0.5, 0.8)  # top-p baselines
    weights: str = "softmax"  # weights of the selected experts (OLMoE's own convention)
    datasets: tuple[str, ...] = ("prose", "code")  # evaluation data sets
    max_tokens: int = 4096  # evaluation tokens per data set (README: interval width against tokens)
    window: int = 256  # perplexity window
    stride: int = 256  # perplexity stride
    batch_size: int = 8  # windows per forward pass
    categories: bool = True  # run the prompt-category analysis
    seed: int = 0  # bootstrap seed
    static_allocation: str = "auto"  # the static per-layer control: greedy, separable (cheaper), auto, none
    allocation_tokens: int = 2048  # calibration tokens on which the static allocation is fitted
    split: bool = True  # choose configurations on even-numbered documents, state the verdict on odd-numbered ones
    k_matching: bool = True  # solve each compute target's alpha on the routed model's own logits

    def __post_init__(self) -> None:
        """Every option, before a model loads or anything is written (one check per option, in its floor)."""
        for name in ("methods", "alphas", "mean_ks", "statistics", "trims", "max_ks", "min_ks", "top_ps", "datasets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "layer_alphas", tuple(tuple(row) for row in self.layer_alphas))
        for name in ("categories", "split", "k_matching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False; got {getattr(self, name)!r}.")
        check_choice("static_allocation", self.static_allocation, (*ALLOCATION_METHODS, "auto", "none"))
        check_int("calibration_tokens", self.calibration_tokens, MIN_CALIBRATION_TOKENS)
        check_int("allocation_tokens", self.allocation_tokens, MIN_CALIBRATION_TEXT_TOKENS)
        check_int("seed", self.seed, 0, 2**63 - 1)  # torch and numpy seed generators take 64-bit seeds
        for flag, value in (("statistics", self.statistics), ("trims", self.trims)):
            if not value:
                raise ValueError(f"`{flag}` is empty; give at least one value.")
        for statistic, trim in self.bank_settings():
            check_fit_options(kernel=self.kernel, grid_size=self.grid_size, statistic=statistic, trim=trim)
        check_grid(methods=self.methods, alphas=self.alphas, mean_ks=self.mean_ks, max_ks=self.max_ks,
                   min_ks=self.min_ks, top_ps=self.top_ps, layer_alphas=self.layer_alphas,
                   layer_targets=self.layer_targets, topk_max=self.topk_max)
        check_protocol(datasets=self.evaluated_datasets(), max_tokens=self.max_tokens, window=self.window,  # split:
                       stride=self.stride, batch_size=self.batch_size, weights=self.weights)  # both halves hold text
        windows = window_count(self.max_tokens, self.window, self.stride)
        if windows < MIN_WINDOWS:
            need = self.window + (MIN_WINDOWS - 1) * self.stride
            raise ValueError(
                f"`max_tokens` {self.max_tokens} gives {windows} scoring window{'s' * (windows != 1)} of {self.window} "
                f"tokens per data set; a paired-bootstrap interval needs at least {MIN_WINDOWS}: pass `max_tokens` "
                f"{need} or more (or a smaller `window`).")
        if self.static_allocation != "none":  # at least a window of each half of the calibration text
            check_allocation_tokens(self.allocation_tokens, self.window, name="allocation_tokens")

    def evaluated_datasets(self) -> list[str]:
        """The data sets scored: each one's tuning and confirmation halves when split."""
        return [split_name(d, s) for d in self.datasets for s in SPLITS] if self.split else list(self.datasets)

    def check_model(self, model) -> None:
        """Raise ValueError (naming the option) when the settings do not fit ``model``'s shape.

        ``model`` may also be its config (``transformers.AutoConfig``), so the check runs before loading.
        """
        check_grid_fits(model, max_ks=self.max_ks, min_ks=self.min_ks, topk_max=self.topk_max,
                        layer_alphas=self.layer_alphas, model_name=self.model)
        for statistic, trim in self.bank_settings():
            check_fit_options(kernel=self.kernel, grid_size=self.grid_size, statistic=statistic, trim=trim,
                              num_experts=moe_shape(model).num_experts)
        check_protocol(datasets=self.datasets, max_tokens=self.max_tokens, window=self.window, stride=self.stride,
                       batch_size=self.batch_size, weights=self.weights, model=model)

    def bank_settings(self) -> list[tuple[str, int]]:
        """(statistic, trim) of each null bank the demo fits."""
        return [(statistic, trim) for trim in self.trims for statistic in self.statistics]

    def configs(self, banks: Mapping[str, NullBank], calibration: Mapping[int, Any], static_path=None,
                budget_for=None):
        """The sweep grid (:func:`sweep_grid`) for these banks, alphas chosen on ``calibration`` (or by
        ``budget_for``, e.g. on the routed model's logits)."""
        return sweep_grid(banks=banks, calibration=calibration, methods=self.methods, alphas=self.alphas,
                          mean_ks=self.mean_ks, max_ks=self.max_ks, min_ks=self.min_ks, topk_max=self.topk_max,
                          top_ps=self.top_ps, seed=self.seed, layer_alphas=self.layer_alphas,
                          layer_targets=self.layer_targets, static_path=static_path, budget_for=budget_for)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
                for k, v in d.items()}


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    out_dir, report_path, results_path : Path
    frontier : pandas.DataFrame
    timings : dict of str to float
        Seconds per step.
    resumed : bool
        True when the folder held outputs of an earlier run with the same settings for them (reused).
    peak_gpu_gib : dict of str to float
        Peak CUDA memory allocated by torch during each step (GiB); empty on CPU.
    """

    out_dir: Path
    report_path: Path
    results_path: Path
    frontier: Any
    timings: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    peak_gpu_gib: dict[str, float] = field(default_factory=dict)


class GPUOutOfMemory(MemoryError):
    """A demo step ran out of GPU memory; the message names the settings to lower."""


@contextlib.contextmanager
def _demo_step(name: str, *, timings: dict, peaks: dict, settings: "DemoSettings") -> Iterator[None]:
    """Time one step of :func:`run_demo`, record its peak GPU memory, and explain an OOM."""
    import torch

    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        raise GPUOutOfMemory(
            f"out of GPU memory in the {name} step with {settings.batch_size} windows of {settings.window} "
            f"tokens per forward pass; lower `batch_size` or `window`, or free the GPU (torch: {str(err).splitlines()[0]})"
        ) from None
    timings[name] = time.perf_counter() - t0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30


def _check_folder(out: Path, settings: DemoSettings) -> bool:
    """Raise when ``out`` holds outputs of other settings; return True when it holds outputs to reuse."""
    return check_run_folder(out, settings.to_dict(), DemoSettings().to_dict())


def run_demo(settings: DemoSettings | None = None, *, out_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
             device: str | None = "cpu", progress: bool = True, allow_unverified: bool = False) -> DemoResult:
    """Capture, fit, sweep and report in one folder, resuming a previous run (its outputs' settings unchanged).

    Parameters
    ----------
    settings : DemoSettings, optional
        Default: :class:`DemoSettings` ().
    out_dir : path-like, default "bh_routing_output"
    device : str, optional
        Torch device (default CPU; None picks CUDA when available).
    progress : bool
    allow_unverified : bool, default False
        Resume with null banks in ``out_dir`` whose ``metadata.json`` has no checksum or fails it
        (older or edited; only banks you trust), with a warning.

    Returns
    -------
    DemoResult

    Raises
    ------
    ValueError
        Bad settings, or ``out_dir`` holding a run with other settings (nothing is changed).
    """
    import torch

    settings = settings or DemoSettings()
    out = Path(out_dir)
    _check_folder(out, settings)  # fail fast, before loading the model; checked again under the lock
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}
    step = functools.partial(_demo_step, timings=timings, peaks=peaks, settings=settings)
    with step("load model"):
        model, tokenizer = load_model(settings.model, device=device, dtype=torch.float32 if device == "cpu" else None)
    settings.check_model(model)  # before anything is written: a bad grid leaves no folder behind
    check_enough_text(settings.evaluated_datasets(), tokenizer, max_tokens=settings.max_tokens,
                      window=settings.window, stride=settings.stride)  # a short .txt file: no interval
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path(out, folder=True), what=f"output folder {str(out)!r}", flag="--out folder"):
        resumed = _check_folder(out, settings)  # again, now that no other process can write here
        return _run_demo_locked(settings, out, model, tokenizer, resumed, step, timings, peaks, progress,
                                allow_unverified)


def _static_path(path: Path, model, tokenizer, settings: DemoSettings, progress: bool) -> StaticAllocationPath:
    """The demo's static allocation path: read back from ``path`` (a resumed run), else fitted and saved."""
    if path.is_file():
        return StaticAllocationPath.load(path)
    fitted = static_allocation_path(model, tokenizer, method=settings.static_allocation, max_k=max(settings.topk_max, *settings.max_ks),
                                    max_tokens=settings.allocation_tokens, window=settings.window,
                                    batch_size=room_for(model, settings.window, settings.batch_size),
                                    weights=settings.weights, progress=progress)
    fitted.save(path)
    return fitted


def _run_demo_locked(settings: DemoSettings, out: Path, model, tokenizer, resumed: bool, step, timings: dict,
                     peaks: dict, progress: bool, allow_unverified: bool) -> DemoResult:
    """:func:`run_demo` once it holds the output folder's lock: capture, fit, sweep, task accuracy, report."""
    captured_path = out / CAPTURED_NAME
    if captured_path.is_file():  # resumed: same settings are not enough if the model folder's weights changed
        header = CapturedLogits.load(captured_path)[1]  # a damaged capture says so itself
        try:
            check_capture_model(header, model, captured_path)
        except ValueError:
            raise ValueError(f"`out_dir` {str(out)!r} holds a run of other weights than `model` {settings.model!r} "
                             "has now (its routers differ: weights or routing settings): pass a new `out_dir`.") from None
    # the settings of the outputs kept are unchanged (checked); those of the steps still to run are these
    record_settings(out, settings.to_dict())

    if not captured_path.is_file():  # a resumed run reuses it; fit_captured reads (and checks) it
        with step("capture"):
            capture_calibration(model, tokenizer, max_tokens=settings.calibration_tokens, window=settings.window,
                                batch_size=room_for(model, settings.window, settings.batch_size),
                                out_path=captured_path, model_id=settings.model, progress=progress)
    banks: dict[str, NullBank] = {}
    with step("fit"):
        for statistic, trim in settings.bank_settings():
            name = bank_name(settings.kernel, statistic, trim)
            folder = out / NULLS_DIR / name.replace("/", "-")
            if not (folder / "metadata.json").is_file():
                fit_captured(captured_path, kernel=settings.kernel, grid_size=settings.grid_size, model_id=settings.model,
                         out_dir=folder, statistic=statistic, trim=trim)
            banks[name] = NullBank.load(folder, allow_unverified=allow_unverified)
            check_fitted_on(banks[name], captured_path, folder)  # a capture replaced after the fit is not its own
    static_path = None
    if settings.static_allocation != "none":
        with step("static allocation"):
            static_path = _static_path(out / STATIC_NAME, model, tokenizer, settings, progress)
    with step("choose alphas"):
        calibration, _ = CapturedLogits.load(captured_path)
        budget_for = None
        if settings.k_matching:  # solve each target on the routed model's logits (realised k = target)
            ids = calibration_token_ids(tokenizer, max_tokens=K_MATCHING_TOKENS)
            batches = window_batches(ids, window=settings.window, batch_size=settings.batch_size)
            budget_for = functools.partial(RoutedBudget, model, batches=batches, weights=settings.weights)
        configs = settings.configs(banks, calibration, static_path, budget_for)

    sweep = functools.partial(
        perplexity_sweep, model, tokenizer, null_bank=banks, max_tokens=settings.max_tokens, window=settings.window,
        stride=settings.stride, batch_size=room_for(model, settings.window, settings.batch_size),
        weights=settings.weights, model_id=settings.model, static_path=static_path, progress=progress)
    results_path, tuning = out / RESULTS_NAME, None
    datasets = [split_name(d, "tune") for d in settings.datasets] if settings.split else list(settings.datasets)
    with step("sweep"):
        results = sweep(configs, results_path=results_path, datasets=datasets)
    if settings.split:  # the verdict is read on documents never used for choosing
        with step("confirm"):
            tuning, results_path = results, out / CONFIRM_NAME
            picks = pick_on_tuning(compare_with_controls(tuning, seed=settings.seed), tuning,
                                   targets=settings.mean_ks or tuple(range(1, settings.topk_max + 1)))
            results = sweep(confirmation_configs(configs, picks, seed=settings.seed, static=static_path is not None),
                            results_path=results_path,
                            datasets=[split_name(d, "confirm") for d in settings.datasets])

    with step("task accuracy"):  # last-word and multiple-choice accuracy of each verdict row and its strongest control
        tasks = task_accuracy_table(model, tokenizer, results, null_bank=banks, static_path=static_path, weights=settings.weights)
    with step("report"):
        report = report_step(out, results=results, model=model, tokenizer=tokenizer, null_bank=banks,
                             model_id=settings.model, categories=settings.categories, seed=settings.seed, tasks=tasks,
                             static_path=static_path,
                             weights=settings.weights, calibration=calibration, tuning=tuning, progress=progress)

    (out / STEPS_NAME).write_text(json.dumps({
        "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
        "seconds": timings, "peak_gpu_gib": peaks}, indent=2) + "\n", encoding="utf-8")
    return DemoResult(out_dir=out, report_path=report, results_path=results_path,
                      frontier=compute_frontier(results), timings=timings, resumed=resumed, peak_gpu_gib=peaks)
