"""Helpers the notebooks call, so that no notebook defines library logic of its own.

Only what notebooks need beyond :mod:`bh_helpers.app.pipeline`, :mod:`bh_helpers.app.paths`
(model keys, output and bank folders) and :mod:`bh_helpers.models.texts` (corpus texts). Three groups:

- run settings: :func:`check_runtime`, :func:`small_mode` (``BH_NOTEBOOK_SMALL``), :func:`model_choice`
  (``BH_MODEL``), :func:`free_accelerator_memory`, :func:`load_notebook_model` (frees GPU memory
  first, falls back to ``device_map="auto"`` when the GPU is short);
- data: token batches, the router logits notebook 01 captures and notebooks 02 and 04 reuse
  (:data:`LOGITS_NAME`, :func:`get_router_logits`; the file format is :meth:`CapturedLogits.save`),
  a held-out split by document (:func:`split_by_sequence`), goodness-of-fit tables;
- figures for notebooks 01 and 02 (matplotlib ``Figure`` objects built without pyplot, shown with
  :func:`show`, which works under any backend, including ``MPLBACKEND=Agg`` in CI).

Nothing here changes what a model computes; routing lives in :mod:`bh_helpers.routing.patch`.
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

import numpy as np
import torch

from bh_helpers.app.paths import default_null_bank_dir, model_key, resolve_model_key
from bh_helpers.capture import CapturedLogits, capture_router_logits, header_value
from bh_helpers.models.loading import OLMOE_HUB_ID, load_model
from bh_helpers.models.texts import corpus_texts

__all__ = [
    "LOGITS_NAME",
    "capture_settings",
    "check_runtime",
    "choose_kernel",
    "cpu_threads",
    "describe_model",
    "find_null_bank",
    "free_accelerator_memory",
    "generate_side_by_side",
    "get_router_logits",
    "goodness_table",
    "live_run_html",
    "load_notebook_model",
    "model_choice",
    "plot_expert_usage",
    "plot_logit_distributions",
    "plot_null_fits",
    "routing_table",
    "show",
    "small_mode",
    "split_by_sequence",
    "token_batches",
    "top_tokens_per_expert",
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
    """Whether notebook 02 may replace the committed bank under ``kde_models/``.

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


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """A one-row summary of a loaded MoE model (shown in the first output of notebook 01)."""
    from bh_helpers.models.families import find_moe_blocks

    blocks = find_moe_blocks(model)
    param = next(model.parameters())
    return {
        "model": model_key(model),
        "class": type(model).__name__,
        "moe_layers": len(blocks),
        "experts": blocks[0].num_experts,
        "native_top_k": blocks[0].native_k,
        "weights": blocks[0].native_weights,
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def token_batches(tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 256) -> list:
    """Tokenizer outputs of ``batch_size`` texts each, right-padded and cut to ``max_length``."""
    tokenizer.padding_side = "right"
    return [
        tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        for i in range(0, len(texts), batch_size)
    ]


def get_router_logits(
    path: str | os.PathLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_name: str = "auto",
    n_texts: int | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    max_tokens_per_layer: int | None = None,
) -> tuple[CapturedLogits, Any, Any]:
    """Router logits of the calibration texts: from ``path`` when it holds a capture with the
    same settings (notebook 01 writes it), else captured now (and saved to ``path``).

    Returns
    -------
    captured : CapturedLogits
    model, tokenizer
        As passed, or loaded when a capture was needed (None when the cache was used and none
        was passed).
    """
    wanted = capture_settings(n_texts=n_texts, max_length=max_length, max_tokens_per_layer=max_tokens_per_layer)
    path = Path(path)
    if path.is_file():
        captured, header = CapturedLogits.load(path)
        if all(header.get(k) == v for k, v in wanted.items()):
            return captured, model, tokenizer
    if model is None or tokenizer is None:
        model, tokenizer = load_notebook_model(model_name)
    texts = corpus_texts("calibration", n_texts)
    batches = token_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length)
    captured = capture_router_logits(model, batches, max_tokens_per_layer=max_tokens_per_layer)
    captured.save(path, metadata={"model": model_key(model), **wanted})
    return captured, model, tokenizer


def capture_settings(**settings: Any) -> dict[str, str]:
    """``settings`` as :meth:`CapturedLogits.save` stores them, for comparing with a saved file's header."""
    return {k: header_value(v) for k, v in settings.items()}


def split_by_sequence(
    captured: CapturedLogits, *, held_out_fraction: float = 0.25, seed: int = 0
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Split captured logits by DOCUMENT (all tokens of a sequence on one side).

    Tokens of one document are correlated, so a split by token would make held-out logits look
    better fitted than they are.

    Returns
    -------
    fit, held_out : dict of int to Tensor ``[n, E]``
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"`held_out_fraction` must be in (0, 1); got {held_out_fraction}.")
    sequences = torch.unique(captured.sequence_index)
    g = torch.Generator().manual_seed(seed)
    shuffled = sequences[torch.randperm(sequences.numel(), generator=g)]
    n_held = max(1, int(round(held_out_fraction * sequences.numel())))
    if n_held >= sequences.numel():
        raise ValueError("need at least two captured sequences to hold some out.")
    held = torch.isin(captured.sequence_index, shuffled[:n_held])  # (N,)
    fit = {layer: captured[layer][~held] for layer in captured}
    held_out = {layer: captured[layer][held] for layer in captured}
    return fit, held_out


def goodness_table(banks_by_kernel: Mapping[str, Any], held_out: Mapping[int, torch.Tensor]):
    """Goodness of fit of every kernel's null on held-out logits, per layer.

    Returns
    -------
    pandas.DataFrame
        Columns ``kernel``, ``layer``, ``ks_distance``, ``pit_ks_statistic``, ``pit_ks_pvalue``,
        ``p<=0.001``, ``p<=0.01``, ``p<=0.05`` (observed share of held-out p-values under each
        level: about the level when calibrated, above it when the null's tail is too light).
    """
    import pandas as pd

    from bh_helpers.nulls.diagnostics import goodness_of_fit

    rows = []
    for kernel, bank in banks_by_kernel.items():
        for layer, logits in held_out.items():
            fit = goodness_of_fit(bank[layer], logits)
            rows.append({
                "kernel": kernel,
                "layer": layer,
                "ks_distance": fit.ks_distance,
                "pit_ks_statistic": fit.pit_ks_statistic,
                "pit_ks_pvalue": fit.pit_ks_pvalue,
                **{f"p<={t:g}": fit.tail_fractions[t] for t in (0.001, 0.01, 0.05)},
            })
    return pd.DataFrame(rows)


def choose_kernel(table) -> str:
    """The kernel with the smallest mean KS distance over layers (ties: the first listed)."""
    means = table.groupby("kernel", sort=False)["ks_distance"].mean()
    return str(means.idxmin())


def find_null_bank(key: str, out: str | os.PathLike, *, model: Any = None, tokenizer: Any = None,
                   calibration_tokens: int = 4096, prefer_own: bool = False):
    """The null bank to route ``key`` with, and where it came from.

    In order: the bank committed under ``kde_models/<model>/`` (or written there by notebook 02
    with ``BH_UPDATE_COMMITTED_BANK=1``), the one notebook 02 wrote to ``<out>/null_bank``, else a
    Gaussian bank fitted now on ``calibration_tokens`` tokens (needs ``model`` and ``tokenizer``)
    and saved to ``<out>/null_bank``. ``prefer_own=True`` (full mode) puts ``<out>/null_bank``
    first: the bank the user just fitted on more text.

    Returns
    -------
    bank : NullBank
    source : str
    """
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.app.pipeline import capture_step, fit_step

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
    captured = capture_step(model, tokenizer, max_tokens=calibration_tokens, model_id=key)
    bank = fit_step(captured, model_id=key)
    bank.save(path)
    return bank, f"fitted now on {captured.num_tokens} calibration tokens, saved to {path}"


def generate_side_by_side(model: Any, tokenizer: Any, prompts: Sequence[str], selector: Any, *,
                          max_new_tokens: int = 32):
    """Greedy continuations of each prompt, native and routed by ``selector``.

    Returns
    -------
    table : pandas.DataFrame
        ``prompt``, ``native``, ``routed`` (continuations only), ``routed mean k``.
    token_views : list of (list of str, Tensor [T, L])
        Per prompt, the tokens the routed model read (prompt and generated, in order) and the
        experts each got in every layer.
    """
    import pandas as pd

    from bh_helpers.routing.patch import route

    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    rows, views = [], []
    for prompt in prompts:
        batch = tokenizer([prompt], return_tensors="pt").to(device)
        n = batch["input_ids"].shape[1]
        with torch.no_grad():
            native = model.generate(**batch, **kwargs)[0, n:]
            with route(model, selector) as rec:
                routed = model.generate(**batch, **kwargs)[0, n:]
        counts = rec.per_token_counts()
        views.append((tokenizer.batch_decode([[int(i)] for i in counts.token_ids]), counts.matrix()))
        rows.append({
            "prompt": prompt,
            "native": tokenizer.decode(native, skip_special_tokens=True),
            "routed": tokenizer.decode(routed, skip_special_tokens=True),
            "routed mean k": rec.summary()["mean_k"],
        })
    return pd.DataFrame(rows), views


# ----------------------------------------------------------------------------------------------
# Tables about routing (notebook 01)
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


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [t.replace("\n", "\\n") for t in tokenizer.batch_decode([[int(i)] for i in ids])]


def top_tokens_per_expert(captured: CapturedLogits, tokenizer: Any, *, layer: int, k: int = 8,
                          experts: int = 8, tokens: int = 6):
    """The tokens each of the most used experts receives most often (native top-k routing).

    Returns
    -------
    pandas.DataFrame
        One row per expert (the ``experts`` most used in ``layer``): ``expert``, ``share`` (of
        tokens routed to it), and ``top tokens`` with their counts.
    """
    import pandas as pd

    logits = captured[layer]  # (N, E)
    chosen = logits.topk(k, dim=-1).indices  # (N, k)
    usage = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1])  # (E,)
    rows = []
    for e in usage.argsort(descending=True)[:experts].tolist():
        hit = (chosen == e).any(-1)  # (N,)
        ids, counts = torch.unique(captured.token_ids[hit], return_counts=True)
        order = counts.argsort(descending=True)[:tokens]
        names = _decode(tokenizer, ids[order].tolist())
        rows.append({
            "expert": e,
            "share of tokens": round(float(hit.double().mean()), 3),
            "top tokens (count)": ", ".join(f"{n!r} ({c})" for n, c in zip(names, counts[order].tolist())),
        })
    return pd.DataFrame(rows)


def routing_table(captured: CapturedLogits, tokenizer: Any, *, sequence: int = 0, tokens: int = 20,
                  k: int = 3):
    """Where the first tokens of one captured sequence go: the top-``k`` experts per layer.

    Returns
    -------
    pandas.DataFrame
        One row per token; a column per layer with its ``k`` largest-logit experts.
    """
    import pandas as pd

    rows = (captured.sequence_index == sequence).nonzero().squeeze(-1)[:tokens]  # (t,)
    data = {"token": _decode(tokenizer, captured.token_ids[rows].tolist())}
    for layer in captured.layers:
        top = captured[layer][rows].topk(k, dim=-1).indices.tolist()
        data[f"L{layer}"] = [" ".join(str(e) for e in t) for t in top]
    return pd.DataFrame(data)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


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


def _figure(rows: int, cols: int, *, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def plot_logit_distributions(captured: CapturedLogits, *, k: int = 8, bins: int = 120):
    """Per layer: histogram of all router logits, and of the top-1 and k-th largest (log y)."""
    layers = captured.layers
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = _figure(rows, cols, size=(3.4 * cols, 2.6 * rows))
    for ax, layer in zip(axes.flat, layers):
        x = captured[layer]  # (N, E)
        top = x.topk(k, dim=-1).values  # (N, k)
        edges = np.linspace(float(x.min()), float(x.max()), bins + 1)
        ax.hist(x.reshape(-1).numpy(), bins=edges, density=True, color="0.6", label="all logits")
        ax.hist(top[:, 0].numpy(), bins=edges, density=True, histtype="step", color="tab:red", label="top-1")
        ax.hist(top[:, -1].numpy(), bins=edges, density=True, histtype="step", color="tab:blue", label=f"top-{k}")
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("router logit")
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"router logit distributions ({captured.num_tokens} tokens per layer)")
    return fig


def plot_expert_usage(captured: CapturedLogits, *, k: int = 8):
    """Share of tokens routed to each expert under native top-k, per layer (heatmap), and the
    sorted usage curve per layer (flat = balanced)."""
    layers = captured.layers
    usage = []
    for layer in layers:
        chosen = captured[layer].topk(k, dim=-1).indices  # (N, k)
        hits = torch.bincount(chosen.reshape(-1), minlength=captured[layer].shape[-1])  # (E,)
        usage.append(hits.double() / captured.num_tokens)
    mat = torch.stack(usage).numpy()  # (L, E)
    fig, axes = _figure(1, 2, size=(13, 3.6))
    ax_map, ax_curve = axes[0]
    im = ax_map.imshow(mat, aspect="auto", cmap="magma", interpolation="nearest")
    ax_map.set(xlabel="expert", ylabel="layer", title=f"share of tokens using each expert (top-{k})")
    ax_map.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    fig.colorbar(im, ax=ax_map)
    for row, layer in zip(mat, layers):
        ax_curve.plot(np.sort(row)[::-1], label=f"L{layer}")
    ax_curve.axhline(k / mat.shape[1], color="k", ls="--", lw=1, label="balanced")
    ax_curve.set(xlabel="expert rank", ylabel="share of tokens", title="sorted expert usage")
    ax_curve.legend(fontsize=7, ncol=2)
    return fig


def plot_null_fits(banks_by_kernel: Mapping[str, Any], held_out: Mapping[int, torch.Tensor], *, layer: int):
    """One layer: CDF of each null vs the held-out ECDF, the upper tail on a log scale (where BH
    works), and the histogram of held-out p-values (flat when calibrated)."""
    x = held_out[layer].reshape(-1).double()
    xs = torch.sort(x).values
    n = xs.numel()
    ecdf_sf = 1.0 - torch.arange(1, n + 1, dtype=torch.float64) / n  # P(X > x_(i))
    lo, hi = float(xs[0]), float(xs[-1])
    grid = torch.linspace(lo - 0.1 * (hi - lo), hi + 0.25 * (hi - lo), 600, dtype=torch.float64)
    fig, axes = _figure(1, 3, size=(15, 3.8))
    ax_cdf, ax_tail, ax_pit = axes[0]
    step = max(1, n // 4000)
    ax_cdf.plot(xs[::step], 1 - ecdf_sf[::step], color="k", lw=2.5, alpha=0.35, label="held-out ECDF")
    ax_tail.plot(xs[::step], ecdf_sf[::step].clamp(min=0.5 / n), color="k", lw=2.5, alpha=0.35, label="held-out")
    pit_bins = np.linspace(0, 1, 21)
    for kernel, bank in banks_by_kernel.items():
        null = bank[layer]
        ax_cdf.plot(grid, null.cdf(grid).numpy(), lw=1, label=kernel)
        ax_tail.plot(grid, null.sf(grid).numpy(), lw=1, label=kernel)
        p = null.sf(x).numpy()
        ax_pit.hist(p, bins=pit_bins, density=True, histtype="step", lw=1.2, alpha=0.8, label=kernel)
    ax_cdf.set(xlabel="router logit", ylabel="CDF", title=f"layer {layer}: null CDFs vs held-out")
    ax_tail.set_yscale("log")
    ax_tail.set_ylim(0.1 / n, 1.0)
    ax_tail.set_xlim(float(xs[n // 2]), hi + 0.25 * (hi - lo))  # upper half and beyond the data
    ax_tail.set(xlabel="router logit", ylabel="P(X > x)  (p-value)", title="upper tail (log scale)")
    ax_pit.axhline(1.0, color="k", ls="--", lw=1)
    ax_pit.set(xlabel="held-out p-value", ylabel="density", title="PIT histogram (flat = calibrated)")
    ax_tail.legend(fontsize=7)
    return fig
