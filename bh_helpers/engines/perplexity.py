"""Perplexity through a vLLM engine (prompt log-probs), under the project's sliding-window protocol.

The protocol is :mod:`bh_helpers.evaluation.scoring`'s, restated here without transformers:
documents are tokenized without special tokens and joined with one EOS between consecutive
documents; window ``i`` covers tokens ``[i*S, min(i*S + W, N))`` and scores the tokens
``max(i*S + 1, end_{i-1}) <= t < end_i``; the NLL is token-weighted over the stream and
``perplexity = exp(nll)``. Each window is one vLLM prompt scored with ``prompt_logprobs=0``
(the log-probability of each prompt token given the tokens before it).

The routing is whatever the engine runs: start it with ``BH_ROUTING_CONFIG`` set to score a
selector (:mod:`bh_helpers.engines.vllm_plugin`), without to score native routing.

>>> from vllm import LLM  # doctest: +SKIP
>>> llm = LLM(model="path/to/olmoe", dtype="float32")  # doctest: +SKIP
>>> vllm_perplexity(llm, ["first document", "second document"], window=256).perplexity  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bh_helpers._validate import check_int

__all__ = ["EnginePerplexity", "token_stream", "vllm_perplexity", "windows"]

DEFAULT_WINDOW = 2048  # capped at the engine's max_model_len, as scoring.perplexity caps at the context


@dataclass(frozen=True)
class EnginePerplexity:
    """Token-weighted perplexity of an engine run (the fields of ``scoring.PerplexityResult``)."""

    perplexity: float
    nll: float
    n_tokens: int
    protocol: dict
    window_nll: list = field(default_factory=list)
    window_tokens: list = field(default_factory=list)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window of an ``n``-token stream; ``first..end-1`` are scored."""
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n)
        out.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end >= n:
            return out
        begin += stride


def token_stream(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Documents tokenized without special tokens, joined with one EOS between consecutive ones."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the engine's tokenizer defines no eos_token_id, which separates documents.")
    stream: list[int] = []
    for text in texts:
        ids = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
        if not ids:
            continue
        if stream:
            stream.append(int(eos))
        stream.extend(int(i) for i in ids)
    return stream


def vllm_perplexity(
    llm: Any,
    texts: str | Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
) -> EnginePerplexity:
    """Perplexity of ``texts`` under a vLLM engine's routing (sliding windows, prompt log-probs).

    Parameters
    ----------
    llm : vllm.LLM
    texts : str or sequence of str
    window : int, optional
        Window ``W`` in tokens; default ``min(2048, max_model_len)``.
    stride : int, optional
        ``0 < S <= W``; default ``W // 2``.

    Raises
    ------
    ValueError
        Empty texts, a window over the engine's ``max_model_len``, a stride outside ``(0, W]``.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("`texts` must be a string or a sequence of strings.")
    limit = int(llm.llm_engine.model_config.max_model_len)
    window = min(DEFAULT_WINDOW, limit) if window is None else check_int("window", window, 2)
    if window > limit:
        raise ValueError(f"`window`={window} exceeds the engine's max_model_len={limit}; pass window <= {limit}.")
    stride = max(1, window // 2) if stride is None else check_int("stride", stride, 1, window)
    stream = token_stream(llm.get_tokenizer(), texts)
    if len(stream) < 2:
        raise ValueError(f"`texts` is empty: need at least 2 tokens of text to score (got {len(stream)}).")
    spans = windows(len(stream), window, stride)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=stream[b:e]) for b, e, _ in spans], params,
                           use_tqdm=False)
    window_nll, window_tokens = [], []
    for (begin, end, first), output in zip(spans, outputs, strict=True):
        logprobs = output.prompt_logprobs  # [None, {token: Logprob}, ...], one entry per prompt token
        nll = [-logprobs[t - begin][stream[t]].logprob for t in range(first, end)]
        window_nll.append(math.fsum(nll))
        window_tokens.append(end - first)
    n = sum(window_tokens)
    nll = math.fsum(window_nll) / n
    protocol = {"window": window, "stride": stride, "weighting": "token", "n_windows": len(spans),
                "tokenizer": str(getattr(llm.llm_engine.model_config, "tokenizer", "")), "engine": "vllm"}
    return EnginePerplexity(perplexity=math.exp(nll), nll=nll, n_tokens=n, protocol=protocol,
                            window_nll=window_nll, window_tokens=window_tokens)
