"""Tables about native routing on captured logits: which tokens go where (notebook 01).

Each returns a :class:`pandas.DataFrame` (pandas is imported inside, as an optional dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bh_helpers.capture import CapturedLogits

__all__ = ["routing_table", "top_tokens_per_expert"]


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
