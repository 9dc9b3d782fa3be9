"""The notebooks' environment: run settings, model loading on Colab, a cached calibration capture, display.

Everything a notebook computes lives in the floors below (capture, nulls, evaluation, report);
this module holds only what depends on where a notebook runs:

- run settings: :func:`check_runtime`, :func:`small_mode` (``BH_NOTEBOOK_SMALL``), :func:`model_choice`
  (``BH_MODEL``), :func:`cpu_threads` (``BH_THREADS``), :func:`update_committed_bank`,
  :func:`free_accelerator_memory`, :func:`load_notebook_model` (frees GPU memory first, falls back to
  ``device_map="auto"`` when the GPU is short);
- data: :func:`calibration_logits` (notebook 01's capture, reused by 02 and 04; the demo's
  protocol, :func:`bh_helpers.capture.capture_calibration`) and :func:`find_null_bank`;
- display: :func:`show` (a matplotlib figure as PNG under any backend, ``MPLBACKEND=Agg`` in CI
  included) and :func:`live_run_html`.
"""

from __future__ import annotations

import gc
import html
import io
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bh_helpers.app.paths import default_null_bank_dir, model_key, resolve_model_key
from bh_helpers.capture import CapturedLogits, capture_calibration
from bh_helpers.models.loading import OLMOE_HUB_ID, load_model
from bh_helpers.models.texts import EVAL_DATASETS

__all__ = [
    "LOGITS_NAME",
    "calibration_logits",
    "check_runtime",
    "cpu_threads",
    "find_null_bank",
    "free_accelerator_memory",
    "live_run_html",
    "load_notebook_model",
    "model_choice",
    "show",
    "small_mode",
    "update_committed_bank",
]

#: The router logits notebook 01 captures, in each model's output folder (reused by 02 and 04).
LOGITS_NAME = "router_logits.safetensors"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# ----------------------------------------------------------------------------------------------
# Run settings
# ----------------------------------------------------------------------------------------------


def small_mode(environ: Mapping[str, str] | None = None) -> bool:
    """Whether to run the notebooks small (CI-sized).

    ``BH_NOTEBOOK_SMALL=1`` forces small, ``BH_NOTEBOOK_SMALL=0`` forces full size; unset, the
    notebooks run small when no CUDA GPU is present (so a plain ``pytest --nbmake`` on a CPU
    machine stays within minutes).
    """
    env = os.environ if environ is None else environ
    value = env.get("BH_NOTEBOOK_SMALL", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        raise ValueError(f"BH_NOTEBOOK_SMALL must be 1 or 0 (or unset); got {value!r}.")
    return not torch.cuda.is_available()


def update_committed_bank(environ: Mapping[str, str] | None = None) -> bool:
    """Whether notebook 02 may replace the committed bank under the package's ``data/kde_models/``.

    Only when asked: ``BH_UPDATE_COMMITTED_BANK=1``. Otherwise (the default, also in full mode)
    every notebook writes only under its output folder.
    """
    env = os.environ if environ is None else environ
    value = env.get("BH_UPDATE_COMMITTED_BANK", "").strip().lower()
    if value and value not in _TRUE | _FALSE:
        raise ValueError(f"BH_UPDATE_COMMITTED_BANK must be 1 or 0 (or unset); got {value!r}.")
    return value in _TRUE


def model_choice(environ: Mapping[str, str] | None = None) -> str:
    """Model name from ``BH_MODEL`` (default ``"auto"``: OLMoE on a GPU with the hub, else tiny)."""
    env = os.environ if environ is None else environ
    return env.get("BH_MODEL", "").strip() or "auto"


def eval_datasets(default: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Evaluation data sets from ``BH_EVAL_DATASETS`` (comma-separated names), else ``default``.

    E.g. ``BH_EVAL_DATASETS=prose`` runs notebook 03's full protocol offline at WikiText-2's size
    (the T4 emulation does); names are those of ``bh_helpers.models.texts.EVAL_DATASETS``.
    """
    env = os.environ if environ is None else environ
    value = env.get("BH_EVAL_DATASETS", "").strip()
    if not value:
        return list(default)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in EVAL_DATASETS]
    if unknown or not names:
        raise ValueError(f"BH_EVAL_DATASETS must name data sets from {', '.join(EVAL_DATASETS)} (comma-separated); "
                         f"got {value!r}.")
    return names


def cpu_threads(environ: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op CPU threads from ``BH_THREADS`` and return the number.

    Unset, one thread without a CUDA GPU (the tiny model's operations are too small to gain from
    more, and on a shared 2-core machine two threads spin against other processes: tens of
    times slower), else torch's default.
    """
    env = os.environ if environ is None else environ
    value = env.get("BH_THREADS", "").strip()
    if value:
        n = int(value)
        if n < 1:
            raise ValueError(f"BH_THREADS must be a positive integer; got {value!r}.")
    elif not torch.cuda.is_available():
        n = 1
    else:
        return torch.get_num_threads()
    torch.set_num_threads(n)
    return n


def free_accelerator_memory() -> None:
    """Collect garbage and release cached CUDA memory (before loading a large model on Colab)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_runtime(model_name: str = "auto", environ: Mapping[str, str] | None = None) -> str:
    """Where this notebook runs and what ``model_name`` will load, in a few lines (for the first cell).

    On a Colab runtime without a GPU it says how to switch to a T4, since ``"auto"`` then means
    the embedded tiny model, not OLMoE-1B-7B.

    Parameters
    ----------
    model_name : str
        ``BH_MODEL`` as read by :func:`model_choice`.
    environ : mapping, optional
        Defaults to ``os.environ``.

    Returns
    -------
    str
    """
    from bh_helpers._cuda import CAPABILITY_ENV, device_capability

    env = os.environ if environ is None else environ
    lines = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = device_capability(0)
        emulated = f" (emulated through {CAPABILITY_ENV})" if env.get(CAPABILITY_ENV) else ""
        dtype = "float16" if major < 8 else "bfloat16"
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{major}.{minor}{emulated}: models load in {dtype}.")
    elif "google.colab" in sys.modules:
        lines.append("No GPU on this Colab runtime. For OLMoE-1B-7B choose Runtime > Change runtime type > "
                     "T4 GPU, then Runtime > Run all. Without a GPU the notebooks run small on the tiny model.")
    else:
        lines.append("No CUDA GPU: the notebooks run small (BH_NOTEBOOK_SMALL) on CPU.")
    key = resolve_model_key(model_name)
    if model_name == "auto" and key == "tiny":
        why = "no CUDA GPU" if not torch.cuda.is_available() else "the Hugging Face hub is not reachable"
        lines.append(f"BH_MODEL=auto loads the embedded tiny OLMoE ({why}), not {OLMOE_HUB_ID}; set BH_MODEL to "
                     "a hub id or a local folder to choose.")
    else:
        lines.append(f"Model: {key}")
    return "\n".join(lines)


def load_notebook_model(name: str = "auto", **kwargs: Any):
    """``load_model(name)`` after freeing memory; on a CUDA out-of-memory error, retry with
    ``device_map="auto"`` (accelerate spreads the weights over GPU and CPU).

    Returns
    -------
    model, tokenizer
    """
    free_accelerator_memory()
    with warnings.catch_warnings():
        # load_model("auto") says which model it fell back to; keep that notice, drop the rest.
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            return load_model(name, **kwargs)
        except torch.cuda.OutOfMemoryError:
            free_accelerator_memory()
            warnings.warn("the model does not fit on the GPU; retrying with device_map='auto'.", stacklevel=2)
            return load_model(name, device_map="auto", **kwargs)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def calibration_logits(
    path: str | os.PathLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_name: str = "auto",
    max_tokens: int = 4096,
    window: int = 256,
    batch_size: int = 8,
) -> tuple[CapturedLogits, Any, Any]:
    """Router logits of the calibration text, captured as the demo and the CLI capture them.

    Reuses ``path`` when it holds a capture of the same model with the same ``max_tokens`` and
    ``window`` (notebook 01 writes it; 02 and 04 reuse it), else captures now with
    :func:`bh_helpers.capture.capture_calibration` and saves to ``path``.

    Returns
    -------
    captured : CapturedLogits
    model, tokenizer
        As passed, or loaded when a capture was needed (None when the file was reused and none
        was passed).
    """
    path = Path(path)
    wanted = {"model_id": resolve_model_key(model_name) if model is None else model_key(model),
              "max_tokens": str(max_tokens), "window": str(window)}
    if path.is_file():
        try:
            captured, header = CapturedLogits.load(path)
        except ValueError as err:  # an older or damaged cache of this notebook's own: captured again, said so
            print(f"capturing again: {err}")
            header = {}
        if header and all(header.get(k) == v for k, v in wanted.items()):
            return captured, model, tokenizer
    if model is None or tokenizer is None:
        model, tokenizer = load_notebook_model(model_name)
    path.unlink(missing_ok=True)  # a cached capture of other settings is replaced (captures are never overwritten)
    captured = capture_calibration(model, tokenizer, max_tokens=max_tokens, window=window, batch_size=batch_size,
                                   out_path=path, model_id=model_key(model))
    return captured, model, tokenizer


def find_null_bank(key: str, out: str | os.PathLike, *, model: Any = None, tokenizer: Any = None,
                   calibration_tokens: int = 4096, prefer_own: bool = False):
    """The null bank to route ``key`` with, and where it came from.

    In order: the bank committed under ``bh_helpers/data/kde_models/<model>/`` (or written there by notebook 02
    with ``BH_UPDATE_COMMITTED_BANK=1``), the one notebook 02 wrote to ``<out>/null_bank``, else a
    Gaussian bank fitted now on ``calibration_tokens`` tokens (needs ``model`` and ``tokenizer``)
    and saved to ``<out>/null_bank``. ``prefer_own=True`` (full mode) puts ``<out>/null_bank``
    first: the bank the user just fitted on more text.

    Returns
    -------
    bank : NullBank
    source : str
    """
    from bh_helpers.nulls.fit import fit_captured
    from bh_helpers.nulls.bank import NullBank

    own = Path(out) / "null_bank"
    if prefer_own and (own / "metadata.json").is_file():
        return NullBank.load(own), f"bank fitted by notebook 02: {own}"
    try:
        path = default_null_bank_dir(key)
        return NullBank.load(path), f"committed bank {path}"
    except FileNotFoundError:
        pass
    path = own
    if (path / "metadata.json").is_file():
        return NullBank.load(path), f"bank fitted by notebook 02: {path}"
    if model is None or tokenizer is None:
        raise FileNotFoundError(f"no null bank for {key!r}; run notebook 02 or pass model and tokenizer.")
    captured = capture_calibration(model, tokenizer, max_tokens=calibration_tokens, model_id=key)
    bank = fit_captured(captured, model_id=key)
    bank.save(path)
    return bank, f"fitted now on {captured.num_tokens} calibration tokens, saved to {path}"


# ----------------------------------------------------------------------------------------------
# Display
# ----------------------------------------------------------------------------------------------


def live_run_html(res: Mapping[str, Any]):
    """The explorer's "run on the model" result (:meth:`AlphaExplorer.run_live`) as an HTML table."""
    from IPython.display import HTML

    rows = [
        ("native top-k", res["native_text"], res.get("native_ppl"), res["native_generate_s"], None),
        ("current setting", res["routed_text"], res.get("routed_ppl"), res["generate_s"], res["routed_mean_k"]),
    ]
    body = "".join(
        f"<tr><td>{name}</td><td style='text-align:left'>{html.escape(text)}</td>"
        f"<td>{'' if ppl is None else f'{ppl:.2f}'}</td><td>{secs:.2f}</td>"
        f"<td>{'' if k is None else f'{k:.2f}'}</td></tr>"
        for name, text, ppl, secs, k in rows
    )
    return HTML(
        "<table><tr><th>routing</th><th>greedy generation</th><th>perplexity</th>"
        f"<th>generate s</th><th>mean k</th></tr>{body}</table>"
    )


def show(fig, save_as: str | os.PathLike | None = None, *, dpi: int = 90) -> None:
    """Display a matplotlib figure as PNG in the notebook (any backend), optionally saving it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    if save_as is not None:
        Path(save_as).parent.mkdir(parents=True, exist_ok=True)
        Path(save_as).write_bytes(data)
    try:
        from IPython.display import Image, display
    except ImportError:  # plain Python: saving is all we can do
        return
    display(Image(data=data, format="png"))
