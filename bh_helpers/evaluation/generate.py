"""Greedy generation side by side: the native model and the same model routed by a selector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bh_helpers.routing.patch import route

__all__ = ["generate_side_by_side"]


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
