"""Speed and compute: wall-clock throughput of a (routed) model and its expert compute relative to native.

:func:`measure_speed` times prefill and greedy decoding side by side in one process; speed
targets are read off ratios measured in one run, never off absolute numbers.
:func:`compute_summary` turns a routing recorder's summary into the relative expert compute
every comparison is matched on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bh_helpers._validate import check_int
from bh_helpers.models.texts import encode
from bh_helpers.evaluation.scoring import _as_text_list, _batched, _device, _pad_id
from bh_helpers.models.families import context_length

__all__ = ["SpeedResult", "compute_summary", "measure_speed"]


@dataclass(frozen=True)
class SpeedResult:
    """Throughput of prefill (plain forward passes) and greedy decoding (``generate``).

    Attributes
    ----------
    prefill_tokens_per_s : float
        Non-padding prompt tokens per second of forward passes.
    decode_tokens_per_s : float
        New tokens per second of ``generate`` wall time (the prompt's prefill included).
    decode_only_tokens_per_s : float
        New tokens per second of ``generate`` time minus the measured prefill time of the same
        batches (an estimate of the incremental decode speed); ``nan`` when not positive.
    prefill_time_s, decode_time_s : float
        Wall times summed over the batches (after warm-up).
    n_prompt_tokens, n_new_tokens : int
    batch_size, max_new_tokens : int
    device, dtype : str
    """

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_only_tokens_per_s: float
    prefill_time_s: float
    decode_time_s: float
    n_prompt_tokens: int
    n_new_tokens: int
    batch_size: int
    max_new_tokens: int
    device: str
    dtype: str

    def to_dict(self) -> dict:
        """Flat ``dict`` for sweeps and tables."""
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    model,
    tokenizer,
    texts: str | Sequence[str],
    *,
    max_new_tokens: int = 32,
    prompt_tokens: int = 128,
    batch_size: int = 1,
    warmup: int = 1,
    progress: bool = True,
) -> SpeedResult:
    """Tokens per second of prefill and of greedy decoding.

    Parameters
    ----------
    texts : str or sequence of str
        Prompts; each is tokenized and cut to its first ``prompt_tokens`` tokens.
    max_new_tokens : int
        Tokens generated per prompt; EOS is suppressed (``min_new_tokens = max_new_tokens``)
        so every prompt generates exactly this many.
    prompt_tokens : int
        Maximum prompt length in tokens.
    batch_size : int
        Prompts per forward pass / ``generate`` call (left-padded).
    warmup : int
        Batches run once, untimed, before measuring.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    SpeedResult

    Notes
    -----
    Timings are wall-clock (``time.perf_counter``) with ``torch.cuda.synchronize`` before and
    after each timed call on CUDA.
    """
    texts = _as_text_list(texts)
    check_int("batch_size", batch_size, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("prompt_tokens", prompt_tokens, 1)
    check_int("warmup", warmup, 0)
    prompts = [ids[:prompt_tokens] for ids in (encode(tokenizer, t) for t in texts if t) if ids]
    if not prompts:
        raise ValueError("`texts` is empty: no prompt has any tokens.")
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"`prompt_tokens` + `max_new_tokens` = {prompt_tokens + max_new_tokens} exceeds the "
            f"model's context length ({limit}); lower one of them."
        )
    device = _device(model)
    pad_id = _pad_id(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    batches = list(_batched(prompts, batch_size))

    def left_pad(rows):
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, longest - len(r) :] = torch.as_tensor(r)
            mask[i, longest - len(r) :] = 1
        return ids.to(device), mask.to(device)

    def prefill(ids, mask):
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    def decode(ids, mask):
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
            eos_token_id=eos_id,
        )

    def timed(fn, *args):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(device)
        return time.perf_counter() - t0, out

    model.eval()
    with torch.no_grad():
        for rows in batches[:warmup]:
            ids, mask = left_pad(rows)
            prefill(ids, mask)
            decode(ids, mask)
        t_prefill = t_decode = 0.0
        n_prompt = n_new = 0
        for rows in tqdm(batches, desc="speed", disable=not progress):
            ids, mask = left_pad(rows)
            dt, _ = timed(prefill, ids, mask)
            t_prefill += dt
            n_prompt += int(mask.sum())
            dt, out = timed(decode, ids, mask)
            t_decode += dt
            n_new += int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    only = t_decode - t_prefill
    param = next(model.parameters())
    return SpeedResult(
        prefill_tokens_per_s=n_prompt / t_prefill if t_prefill > 0 else math.inf,
        decode_tokens_per_s=n_new / t_decode if t_decode > 0 else math.inf,
        decode_only_tokens_per_s=n_new / only if only > 0 else math.nan,
        prefill_time_s=t_prefill,
        decode_time_s=t_decode,
        n_prompt_tokens=n_prompt,
        n_new_tokens=n_new,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=str(param.device),
        dtype=str(param.dtype).replace("torch.", ""),
    )


def compute_summary(recorder_summary: Mapping[str, Any], native_k: int) -> dict:
    """Relative expert compute from a routing recorder's summary.

    Parameters
    ----------
    recorder_summary : mapping
        :meth:`RoutingRecorder.summary() <bh_helpers.routing.recorder.RoutingRecorder.summary>` of a
        ``route``: ``"mean_k"`` (mean experts per token) is required; ``"expert_activations"`` and
        ``"activation_ratio"`` are copied when present.
    native_k : int
        The model's own top-k (OLMoE: 8).

    Returns
    -------
    dict
        ``{"mean_experts_per_token", "relative_compute", "native_k"}`` plus
        ``"total_expert_activations"`` and the recorder's own ``"activation_ratio"`` (activations
        over native activations, which equals ``relative_compute`` when every routed layer's
        native k is ``native_k``) when available; ``relative_compute = mean_k / native_k``.

    Examples
    --------
    >>> compute_summary({"mean_k": 4.0}, native_k=8)["relative_compute"]
    0.5
    """
    if not isinstance(native_k, (int, float)) or native_k <= 0:
        raise ValueError(f"`native_k` must be positive (the model's own top-k), got {native_k!r}.")
    if "mean_k" not in recorder_summary:
        raise ValueError(
            "`recorder_summary` has no 'mean_k' (mean experts per token); pass the `.summary()` of the recorder "
            f"that `route` yields (got keys {sorted(recorder_summary)})."
        )
    mean_k = float(recorder_summary["mean_k"])
    out = {
        "mean_experts_per_token": mean_k,
        "relative_compute": mean_k / native_k,
        "native_k": native_k,
    }
    if "expert_activations" in recorder_summary:
        out["total_expert_activations"] = int(recorder_summary["expert_activations"])
    if "activation_ratio" in recorder_summary:
        out["activation_ratio"] = float(recorder_summary["activation_ratio"])
    return out
