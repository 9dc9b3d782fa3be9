"""The end-to-end job as step functions: capture -> fit -> sweep -> report (and ``run_demo``).

Each step reads and writes plain files, so the command line (:mod:`bh_helpers.app.cli`) can run
them one at a time or all at once:

==============  ============================================================================
step            writes
==============  ============================================================================
capture         ``captured_logits.safetensors``: ``layer.<i>`` float32 ``[N, E]``, plus
                ``token_ids``, ``positions``, ``sequence_index``; metadata in the header
                (safetensors: no pickle)
fit             a :class:`~bh_helpers.nulls.bank.NullBank` folder (``nulls.npz`` + ``metadata.json``)
sweep           ``sweep.jsonl`` (:func:`bh_helpers.experiments.sweep.run_sweep`, resumable)
report          ``report.md`` + PNG figures (:func:`bh_helpers.report.write.write_report`)
==============  ============================================================================

Evaluation protocol of the sweep (stated in every report): perplexity with
:func:`bh_helpers.evaluation.scoring.perplexity` (documents joined by EOS, windows of ``window`` tokens
with stride ``stride``, token-weighted mean NLL); the text of each data set is cut to its first
``max_tokens`` tokens (whole documents, the last one truncated). Mean experts per token is
measured by the routing recorder over every routed token and layer. Selected experts keep
their softmax router probabilities (``weights="softmax"``, OLMoE's own ``norm_topk_prob=False``
convention, so static top-8 equals the native model) for BH/BY/top-k/top-p; ``"renorm"`` is
available but the embedded model was not trained for it (top-8 perplexity 22.3 instead of 15.0
on 1k prose tokens).

Evaluation data sets (:data:`EVAL_DATASETS`): ``prose`` and ``code`` are the two domains of
the embedded corpus's evaluation slice (held out from training and from calibration),
``wikitext2`` the real WikiText-2 test split (through ``datasets``, from the hub),
``wikitext2-fixture`` the embedded WikiText-style sample (offline; named apart so that no table
calls it WikiText-2); a path to a UTF-8 ``.txt`` file is used as one document.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bh_helpers._locks import exclusive
from bh_helpers._validate import check_choice, check_int
from bh_helpers.app.paths import sweep_grid_id
from bh_helpers.app.report_step import report_step
from bh_helpers.capture import CapturedLogits, capture_router_logits
from bh_helpers.evaluation.scoring import fit_batch_size, perplexity
from bh_helpers.evaluation.speed import compute_summary
from bh_helpers.experiments.frontier import compute_frontier
from bh_helpers.experiments.configs import LAYER_TARGETS, bank_name, sweep_grid
from bh_helpers.experiments.sweep import run_sweep
from bh_helpers.models.families import router_fingerprint
from bh_helpers.models.loading import load_model
from bh_helpers.models.texts import calibration_token_ids, check_datasets, evaluation_texts
from bh_helpers.nulls.bank import NullBank
from bh_helpers.nulls.fit import fit_null_bank
from bh_helpers.nulls.statistics import check_statistic
from bh_helpers.routing.patch import route
from bh_helpers.selection.reference import WEIGHT_MODES
from bh_helpers.selection.selectors import NativeSelector

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "CAPTURED_NAME",
    "NULLS_DIR",
    "RESULTS_NAME",
    "SETTINGS_NAME",
    "DemoSettings",
    "DemoResult",
    "GPUOutOfMemory",
    "capture_step",
    "fit_step",
    "make_evaluate_fn",
    "sweep_step",
    "report_step",
    "run_demo",
]

DEFAULT_OUTPUT_DIR = "bh_routing_output"
CAPTURED_NAME = "captured_logits.safetensors"
NULLS_DIR = "nulls"
RESULTS_NAME = "sweep.jsonl"
SETTINGS_NAME = "run.json"
STEPS_NAME = "steps.json"  # seconds and peak GPU memory per step of the last demo run


# ----------------------------------------------------------------------------------------------
# Where things live
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------


def capture_step(model, tokenizer, *, max_tokens: int = 4096, window: int = 256, batch_size: int = 8,
                 text_file: str | os.PathLike | None = None, out_path: str | os.PathLike | None = None,
                 model_id: str = "tiny", progress: bool = True):
    """Capture router logits on calibration text (windows of ``window`` tokens, batched).

    Parameters
    ----------
    model, tokenizer
    max_tokens : int, default 4096
        Calibration tokens (see :func:`calibration_token_ids`).
    window : int, default 256
        Tokens per sequence.
    batch_size : int, default 8
        Sequences per forward pass.
    text_file : path-like, optional
        Calibrate on this text instead of the embedded calibration slice.
    out_path : path-like, optional
        Save the result there with :meth:`CapturedLogits.save`.
    model_id : str
        Recorded in the file's metadata.
    progress : bool

    Returns
    -------
    CapturedLogits
    """
    import torch


    window, batch_size = check_int("window", window, 1), check_int("batch_size", batch_size, 1)
    batch_size = _room_for(model, window, batch_size)
    ids = calibration_token_ids(tokenizer, max_tokens=max_tokens, text_file=text_file)
    if len(ids) < 2:
        raise ValueError("the calibration text has fewer than 2 tokens; give it more text.")
    rows = [ids[i: i + window] for i in range(0, len(ids), window)]
    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for i, r in enumerate(chunk):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    captured = capture_router_logits(model, batches, progress=progress)
    if out_path is not None:
        source = str(text_file) if text_file is not None else "embedded corpus, calibration slice (half prose, half code)"

        captured.save(out_path, metadata={
            "model_id": model_id, "calibration": f"{source}, {len(ids)} tokens, windows of {window}",
            "router_fingerprint": {str(k): v for k, v in router_fingerprint(model).items()}})
    return captured


def _room_for(model, window: int, batch_size: int) -> int:
    """``batch_size``, lowered (with a warning naming ``--batch-size``) when the GPU has no room for it."""
    import warnings


    fitted = fit_batch_size(model, window, batch_size)
    if fitted < batch_size:
        warnings.warn(
            f"batch_size={batch_size} windows of {window} tokens does not fit in the GPU memory left beside the "
            f"model; running {fitted} windows per forward pass (results do not depend on it; pass --batch-size "
            f"{fitted} or lower to choose yourself).", stacklevel=3)
    return fitted


# ----------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------


def fit_step(captured, *, kernel: str = "gaussian", grid_size: int | None = 8192, model_id: str = "tiny",
             calibration: str | None = None, out_dir: str | os.PathLike | None = None, statistic: str = "raw",
             trim: int = 0):
    """Fit one null per layer (:func:`bh_helpers.nulls.fit.fit_null_bank`) and optionally save it.

    Parameters
    ----------
    captured : CapturedLogits or path-like
        Logits, or a file written by :meth:`CapturedLogits.save`.
    kernel : str, default "gaussian"
    statistic, trim
        Per-token statistic and trim (:func:`~bh_helpers.nulls.fit.fit_null_bank`).
    grid_size : int or None, default 8192
        Grid points per layer (None: the library default, larger files).
    model_id, calibration : str
        Provenance for the bank's metadata (``calibration`` defaults to the capture file's).
    out_dir : path-like, optional
        Save the bank there.

    Returns
    -------
    NullBank
    """

    meta: dict = {}
    if isinstance(captured, (str, os.PathLike)):
        captured, meta = CapturedLogits.load(captured)
    if calibration is None:
        calibration = meta.get("calibration", f"{captured.num_tokens} captured tokens")
    fingerprint = json.loads(meta["router_fingerprint"]) if "router_fingerprint" in meta else None
    bank = fit_null_bank(captured, kernel=kernel, grid_size=grid_size, model_id=model_id, statistic=statistic, trim=trim,
                         calibration=f"{calibration} ({captured.num_tokens} tokens used)",
                         router_fingerprint=None if fingerprint is None else {int(k): v for k, v in fingerprint.items()})
    if out_dir is not None:
        bank.save(out_dir)
    return bank


# ----------------------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------------------


def make_evaluate_fn(model, tokenizer, data: dict[str, list[str]], *, null_bank, window: int = 256,
                     stride: int = 256, batch_size: int = 8, weights: str = "softmax"):
    """The ``evaluate_fn(config, dataset)`` of :func:`bh_helpers.experiments.sweep.run_sweep`.

    Metrics per row: the :class:`~bh_helpers.evaluation.scoring.PerplexityResult` fields (with
    ``protocol`` and the per-window NLL the bootstrap pairs on), :func:`~bh_helpers.evaluation.speed.compute_summary`
    (``mean_experts_per_token``, ``relative_compute``, ...), ``std_k``, ``floor_rate``,
    ``ceiling_rate``, ``per_layer_mean_k`` (``{layer: mean k}``), the load balance per layer
    (``per_layer_utilisation_cv``: coefficient of variation of the activations over experts,
    ``per_layer_unused_share``: share of experts never chosen) and ``k_hist`` (token-layer pairs
    with 0, 1, 2, ... experts).

    ``null_bank`` is one :class:`~bh_helpers.nulls.bank.NullBank` or a mapping of
    :func:`~bh_helpers.experiments.sweep.bank_name` to banks. A ``"mixed"`` control runs at the
    per-layer mean k its adaptive configuration reached on the same data set (evaluated again
    when a resumed sweep did not evaluate it in this process).
    """

    native_k = NativeSelector.for_model(model).k
    if isinstance(null_bank, NullBank):  # itself a Mapping (layer -> null): name it
        meta = null_bank.metadata
        banks = {bank_name(meta.kernel, meta.statistic, meta.trim): null_bank}
    else:
        banks = dict(null_bank) if null_bank is not None else None
    reached: dict[tuple[str, str], dict[int, float]] = {}  # (adaptive key, data set) -> per-layer mean k

    def run(config, name: str, **kwargs) -> dict:
        selector = config.to_selector(model, null_bank=banks, weights=weights, **kwargs)
        with route(model, selector) as rec:
            ppl = perplexity(model, tokenizer, data[name], window=window, stride=stride, batch_size=batch_size,
                             progress=False)
        summary = rec.summary()
        counts = rec.per_token_counts().matrix().reshape(-1)
        counts = counts[counts >= 0]
        per_layer = {layer: s["mean_k"] for layer, s in summary["per_layer"].items()}
        reached[(config.key(), name)] = per_layer
        return {
            **ppl.to_dict(),
            **compute_summary(summary, native_k=native_k),
            "std_k": summary["std_k"],
            "floor_rate": summary["floor_rate"],
            "ceiling_rate": summary["ceiling_rate"],
            "per_layer_mean_k": {str(layer): k for layer, k in per_layer.items()},
            # load balance: spread of activations over experts, and experts never chosen
            "per_layer_utilisation_cv": {str(layer): s["utilisation_cv"] for layer, s in summary["per_layer"].items()},
            "per_layer_unused_share": {str(layer): s["unused_share"] for layer, s in summary["per_layer"].items()},
            "k_hist": np.bincount(counts.numpy()).tolist(),
        }

    def evaluate(config, name: str) -> dict:
        if config.method != "mixed":
            return run(config, name)
        adaptive = config.adaptive()
        if (adaptive.key(), name) not in reached:  # resumed after the adaptive row: measure it again
            run(adaptive, name)
        metrics = run(config, name, mean_k=reached[(adaptive.key(), name)])
        metrics["target_per_layer_mean_k"] = {str(k): v for k, v in reached[(adaptive.key(), name)].items()}
        return metrics

    return evaluate


def sweep_step(model, tokenizer, configs, *, null_bank, results_path: str | os.PathLike,
               datasets: Sequence[str] = ("prose", "code"), max_tokens: int = 2048, window: int = 256,
               stride: int = 256, batch_size: int = 8, weights: str = "softmax", model_id: str = "tiny",
               progress: bool = True):
    """Run (or resume) a perplexity sweep; returns :func:`~bh_helpers.experiments.sweep.load_results`.

    Parameters
    ----------
    model, tokenizer
    configs : list of SweepConfig
        E.g. from :func:`bh_helpers.experiments.sweep.expand_grid`.
    null_bank : NullBank or mapping of str to NullBank
        Nulls of ``model`` (for the multiple-testing configurations); a mapping is keyed by
        :func:`~bh_helpers.experiments.sweep.bank_name` (one bank per statistic and trim).
    results_path : path-like
        JSON Lines results; an existing file of another grid raises ``ValueError`` untouched.
    datasets : sequence of str
        Names from :data:`EVAL_DATASETS` or ``.txt`` paths.
    max_tokens : int, default 2048
        Tokens per data set.
    window, stride, batch_size : int
        Perplexity protocol (:func:`bh_helpers.evaluation.scoring.perplexity`).
    weights : {"softmax", "renorm", "uniform"}, default "softmax"
        Weights of the selected experts for BH-family, top-k and top-p configurations.
        ``"softmax"`` (raw router probabilities) is OLMoE's own convention
        (``norm_topk_prob=False``), so top-8 equals the native model; ``"renorm"`` rescales the
        selected probabilities to sum to 1, which the tiny model was not trained for.
    model_id : str
    progress : bool

    Returns
    -------
    pandas.DataFrame
    """

    check_choice("weights", weights, WEIGHT_MODES)
    datasets = list(datasets)
    if not datasets:
        raise ValueError("`datasets` is empty; pass e.g. ['prose', 'code'].")
    for bank in ([null_bank] if isinstance(null_bank, NullBank) else list(null_bank.values())):
        bank.check_compatible(model)
    data = {name: evaluation_texts(name, tokenizer, max_tokens=max_tokens) for name in datasets}
    grid_id = sweep_grid_id(model_id=model_id, null_bank=null_bank, datasets=datasets, max_tokens=max_tokens,
                            window=window, stride=stride, weights=weights)
    batch_size = _room_for(model, window, batch_size)
    evaluate = make_evaluate_fn(model, tokenizer, data, null_bank=null_bank, window=window, stride=stride,
                                batch_size=batch_size, weights=weights)
    protocol = {"window": int(window), "stride": int(stride), "max_tokens": int(max_tokens), "weights": weights}
    return run_sweep(configs, datasets, evaluate, results_path, grid_id=grid_id, protocol=protocol, progress=progress)


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the numbers of ``bh-routing demo`` (stored as ``run.json``).

    A folder is resumed only with identical settings; any difference raises before anything
    is written.
    """

    model: str = "tiny"  # "tiny", a hub id or a local path
    calibration_tokens: int = 16384  # tokens of calibration text for the nulls
    kernel: str = "gaussian"  # null kernel
    grid_size: int = 8192  # null grid points per layer
    methods: tuple[str, ...] = ("bh",)  # multiple-testing methods (BY at a compute target is BH: same experts)
    alphas: tuple[float, ...] = ()  # explicit levels (besides those chosen for mean_ks)
    mean_ks: tuple[float, ...] = (2.0, 5.0)  # compute targets: alpha chosen on the calibration logits
    layer_alphas: tuple[tuple[float, ...], ...] = ()  # explicit per-layer levels (adaptive FDR), one row each
    layer_targets: str = "global"  # compute targets reached over all layers, per layer, or both
    statistics: tuple[str, ...] = ("raw", "centred", "zscore")  # per-token test statistics (one bank each)
    trims: tuple[int, ...] = (0, 8)  # nulls fitted without each token's largest values (one bank each)
    max_ks: tuple[int, ...] = (8,)  # ceilings of the adaptive methods
    min_ks: tuple[int, ...] = (1, 2, 4)  # floors of the adaptive methods
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

    def __post_init__(self) -> None:
        for name in ("methods", "alphas", "mean_ks", "statistics", "trims", "max_ks", "min_ks", "top_ps", "datasets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("calibration_tokens", "grid_size", "topk_max", "max_tokens", "window", "stride", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for flag, value in (("--statistics", self.statistics), ("--trims", self.trims), ("--min-ks", self.min_ks),
                            ("--max-ks", self.max_ks), ("--methods", self.methods)):
            if not value:
                raise ValueError(f"{flag} is empty; give at least one value.")
        for statistic in self.statistics:
            check_statistic(statistic)
        for trim in self.trims:
            check_int("--trims", trim, 0)
        object.__setattr__(self, "layer_alphas", tuple(tuple(float(a) for a in row) for row in self.layer_alphas))
        check_choice("--layer-targets", self.layer_targets, LAYER_TARGETS)
        if not (self.alphas or self.mean_ks or self.layer_alphas):
            raise ValueError("give --mean-ks (compute targets), --alphas or --layer-alphas (levels).")
        if self.stride > self.window:
            raise ValueError(f"`stride` ({self.stride}) must not exceed `window` ({self.window}).")

        check_choice("weights", self.weights, WEIGHT_MODES)
        check_datasets(self.datasets)  # unknown names raise here, before anything runs

    def check_model(self, model) -> None:
        """Raise ValueError (naming the CLI flag) when the grid asks for more experts than ``model`` has."""
        cfg = model.config
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        if experts is None:
            return
        for flag, values in (("--max-ks", self.max_ks), ("--topk-max", (self.topk_max,)), ("--min-ks", self.min_ks),
                             ("--trims", tuple(t + 2 for t in self.trims))):
            too_many = [v for v in values if v > experts]
            if too_many:
                limit = experts - 2 if flag == "--trims" else experts
                shown = [v - 2 for v in too_many] if flag == "--trims" else too_many
                raise ValueError(f"{flag} {','.join(map(str, shown))} is too large for the {experts} experts per layer "
                                 f"of {self.model!r}; pass {flag} {limit} or lower.")

    def bank_settings(self) -> list[tuple[str, int]]:
        """(statistic, trim) of each null bank the demo fits."""
        return [(statistic, trim) for trim in self.trims for statistic in self.statistics]

    def configs(self, banks: Mapping[str, NullBank], calibration: Mapping[int, Any]):
        """The sweep grid (:func:`sweep_grid`) for these banks, alphas chosen on ``calibration``."""
        return sweep_grid(banks=banks, calibration=calibration, methods=self.methods, alphas=self.alphas,
                          mean_ks=self.mean_ks, max_ks=self.max_ks, min_ks=self.min_ks, topk_max=self.topk_max,
                          top_ps=self.top_ps, seed=self.seed, layer_alphas=self.layer_alphas,
                          layer_targets=self.layer_targets)

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
        True when the folder held a run with the same settings.
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
            f"out of GPU memory in the {name} step with batch_size={settings.batch_size} windows of "
            f"{settings.window} tokens; lower --batch-size (DemoSettings.batch_size) or --window, or free the "
            f"GPU (torch: {str(err).splitlines()[0]})"
        ) from None
    timings[name] = time.perf_counter() - t0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30


def _check_folder(out: Path, settings: DemoSettings) -> bool:
    """Raise when ``out`` holds another run; return True when it holds this one."""
    path = out / SETTINGS_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
        except json.JSONDecodeError:
            raise ValueError(f"{str(path)!r} is corrupt; pass another --out folder or delete it.") from None
        new = settings.to_dict()
        # a setting added after the folder was written reads as its default there
        defaults = DemoSettings().to_dict()
        diff = {k: (old.get(k, defaults[k]), new[k]) for k in new if old.get(k, defaults[k]) != new[k]}
        if diff:
            text = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ValueError(
                f"output folder {str(out)!r} holds a run with different settings ({text}); nothing was changed. "
                "Pass another --out folder, or rerun with the same options to resume."
            )
        return True
    if (out / RESULTS_NAME).exists() or (out / NULLS_DIR).exists() or (out / CAPTURED_NAME).exists():
        raise ValueError(
            f"output folder {str(out)!r} holds results without {SETTINGS_NAME}; nothing was changed. "
            "Pass another --out folder."
        )
    return False


def run_demo(settings: DemoSettings | None = None, *, out_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
             device: str | None = "cpu", progress: bool = True) -> DemoResult:
    """Capture, fit, sweep and report in one folder, resuming a previous run with the same settings.

    Parameters
    ----------
    settings : DemoSettings, optional
        Default: :class:`DemoSettings` ().
    out_dir : path-like, default "bh_routing_output"
    device : str, optional
        Torch device (default CPU; None picks CUDA when available).
    progress : bool

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
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".lock", what=f"output folder {str(out)!r}", flag="--out folder"):
        resumed = _check_folder(out, settings)  # again, now that no other process can write here
        return _run_demo_locked(settings, out, model, tokenizer, resumed, step, timings, peaks, progress)


def _run_demo_locked(settings: DemoSettings, out: Path, model, tokenizer, resumed: bool, step, timings: dict,
                     peaks: dict, progress: bool) -> DemoResult:
    """:func:`run_demo` once it holds the output folder's lock: capture, fit, sweep, report."""

    if not resumed:
        tmp = out / (SETTINGS_NAME + ".tmp")
        tmp.write_text(json.dumps({"settings": settings.to_dict(),
                                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
                                  indent=2) + "\n", encoding="utf-8")
        tmp.replace(out / SETTINGS_NAME)

    captured_path = out / CAPTURED_NAME
    if not captured_path.is_file():  # a resumed run reuses it; fit_step reads (and checks) it
        with step("capture"):
            capture_step(model, tokenizer, max_tokens=settings.calibration_tokens, window=settings.window,
                         batch_size=settings.batch_size, out_path=captured_path, model_id=settings.model,
                         progress=progress)
    banks: dict[str, NullBank] = {}
    with step("fit"):
        for statistic, trim in settings.bank_settings():
            name = bank_name(settings.kernel, statistic, trim)
            folder = out / NULLS_DIR / name.replace("/", "-")
            if not (folder / "metadata.json").is_file():
                fit_step(captured_path, kernel=settings.kernel, grid_size=settings.grid_size, model_id=settings.model,
                         out_dir=folder, statistic=statistic, trim=trim)
            banks[name] = NullBank.load(folder)
    with step("choose alphas"):
        calibration, _ = CapturedLogits.load(captured_path)
        configs = settings.configs(banks, calibration)

    results_path = out / RESULTS_NAME
    with step("sweep"):
        results = sweep_step(model, tokenizer, configs, null_bank=banks, results_path=results_path,
                             datasets=settings.datasets, max_tokens=settings.max_tokens, window=settings.window,
                             stride=settings.stride, batch_size=settings.batch_size, weights=settings.weights,
                             model_id=settings.model, progress=progress)

    with step("report"):
        report = report_step(out, results=results, model=model, tokenizer=tokenizer, null_bank=banks,
                             model_id=settings.model, categories=settings.categories, seed=settings.seed,
                             weights=settings.weights, calibration=calibration, progress=progress)

    (out / STEPS_NAME).write_text(json.dumps({
        "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
        "seconds": timings, "peak_gpu_gib": peaks}, indent=2) + "\n", encoding="utf-8")
    return DemoResult(out_dir=out, report_path=report, results_path=results_path,
                      frontier=compute_frontier(results), timings=timings, resumed=resumed, peak_gpu_gib=peaks)
