"""Evaluation of a (possibly re-routed) causal language model: perplexity, accuracy, speed.

Every function takes ``model, tokenizer`` and plain Python data, runs under
:func:`torch.no_grad` with the model in eval mode, and changes nothing about the routing:
the caller wraps the call with :func:`bh_helpers.routing.patch.route` to evaluate a selector::

    with route(model, selector) as rec:
        ppl = perplexity(model, tokenizer, texts, window=1024, stride=512)
    compute = compute_summary(rec.summary(), native_k=8)

Protocols (state them next to every number; perplexities are only comparable under one):

- **Windowed scoring** (:func:`perplexity`, :func:`next_token_accuracy`). Documents are
  tokenized without special tokens and concatenated with one EOS token *between* consecutive
  documents, giving one stream of ``N`` tokens. Window ``i`` covers tokens
  ``[i*S, min(i*S + W, N))`` (window ``W``, stride ``S``); windows stop at the first one that
  reaches the end. Window ``i`` scores the tokens ``t`` with
  ``max(i*S + 1, end_{i-1}) <= t < end_i`` (``end_{-1} = 0``), the prediction of token ``t``
  coming from the logits at ``t - 1`` in that window. This is Hugging Face's sliding-window
  protocol (``docs/transformers/perplexity``): with ``S < W`` every token but the first is scored
  exactly once, with at least ``W - S`` tokens of left context (the first window excepted);
  with ``S == W`` the windows are disjoint and each window's first token is not scored.
  Scores are token-weighted over the whole stream: ``nll`` is the mean negative log-likelihood
  (natural log) over all scored tokens and ``perplexity = exp(nll)``. Padding of the last,
  shorter window is never scored.
- **Continuations** (:func:`last_word_accuracy`, :func:`multiple_choice_accuracy`). Context and
  continuation are tokenized separately (no special tokens) and concatenated; an empty context
  becomes a single EOS token; a request longer than the model's context is truncated on the
  left of the context. One forward pass scores all continuation tokens.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "PerplexityResult",
    "AccuracyResult",
    "LastWordResult",
    "MultipleChoiceResult",
    "SpeedResult",
    "perplexity",
    "next_token_accuracy",
    "last_word_accuracy",
    "multiple_choice_accuracy",
    "measure_speed",
    "compute_summary",
    "split_last_word",
    "scored_token_nll",
    "fit_batch_size",
    "window_bytes",
]

DEFAULT_WINDOW = 2048  # capped at the model's context length
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------


def _protocol_line(protocol: Mapping[str, Any]) -> str:
    return (
        f"window={protocol['window']} stride={protocol['stride']} "
        f"weighting={protocol['weighting']} windows={protocol['n_windows']} "
        f"tokenizer={protocol['tokenizer']}"
    )


@dataclass(frozen=True)
class PerplexityResult:
    """Token-weighted perplexity under the sliding-window protocol (see the module docstring).

    Attributes
    ----------
    perplexity : float
        ``exp(nll)``.
    nll : float
        Mean negative log-likelihood (nats) over all scored tokens.
    n_tokens : int
        Number of scored tokens.
    protocol : dict
        ``{"window", "stride", "weighting": "token", "n_windows", "tokenizer"}``.
    """

    perplexity: float
    nll: float
    n_tokens: int
    protocol: dict = field(default_factory=dict)

    def protocol_str(self) -> str:
        """One line describing the protocol, for table captions."""
        return _protocol_line(self.protocol)

    def to_dict(self) -> dict:
        """Flat ``dict`` (metrics plus ``protocol``) for sweeps and tables."""
        return asdict(self)


@dataclass(frozen=True)
class AccuracyResult:
    """Greedy next-token accuracy under the sliding-window protocol.

    Attributes
    ----------
    accuracy : float
        ``n_correct / n_tokens``.
    n_correct, n_tokens : int
        Scored tokens whose argmax prediction equals the token, and all scored tokens.
    protocol : dict
        As in :class:`PerplexityResult`.
    """

    accuracy: float
    n_correct: int
    n_tokens: int
    protocol: dict = field(default_factory=dict)

    def protocol_str(self) -> str:
        """One line describing the protocol, for table captions."""
        return _protocol_line(self.protocol)

    def to_dict(self) -> dict:
        """Flat ``dict`` for sweeps and tables."""
        return asdict(self)


@dataclass(frozen=True)
class LastWordResult:
    """LAMBADA-style last-word accuracy.

    Attributes
    ----------
    accuracy : float
        Fraction of examples whose whole target word is reproduced by greedy decoding.
    n_correct, n_examples : int
    perplexity : float
        ``exp`` of the mean per-example target NLL (lm-eval's LAMBADA ``perplexity``).
    correct : list of bool
        Per example.
    target_nll : list of float
        Per example, summed over the target's tokens (nats).
    predictions : list of list of int
        Per example, the argmax token at each target position. Up to and including the first
        wrong position this is exactly what greedy decoding produces.
    """

    accuracy: float
    n_correct: int
    n_examples: int
    perplexity: float
    correct: list = field(default_factory=list)
    target_nll: list = field(default_factory=list)
    predictions: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Scalar metrics only (no per-example lists), for sweeps and tables."""
        return _scalar_fields(self)


@dataclass(frozen=True)
class MultipleChoiceResult:
    """HellaSwag-style multiple-choice accuracy.

    Attributes
    ----------
    acc : float
        Unnormalised: the ending with the largest summed log-likelihood wins
        (lm-eval's ``acc``).
    acc_norm : float
        Per-character normalised: summed log-likelihood divided by the number of characters of
        the ending (without the leading space), as lm-eval's ``acc_norm``.
    acc_per_token : float
        Per-token normalised: mean log-likelihood over the ending's tokens.
    n_examples : int
    loglik : list of list of float
        Per example and ending, summed log-likelihood (nats) of ``" " + ending``.
    n_chars, n_tokens : list of list of int
        Per example and ending, the normalisers used above.
    """

    acc: float
    acc_norm: float
    acc_per_token: float
    n_examples: int
    loglik: list = field(default_factory=list)
    n_chars: list = field(default_factory=list)
    n_tokens: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Scalar metrics only (no per-example lists), for sweeps and tables."""
        return _scalar_fields(self)


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


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _scalar_fields(result: Any) -> dict:
    """A result dataclass's fields in order, without the per-example lists."""
    return {f.name: getattr(result, f.name) for f in fields(result) if not isinstance(getattr(result, f.name), list)}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "`tokenizer` has no `eos_token_id`; set `tokenizer.eos_token` (documents are "
            "separated by EOS and empty contexts start with it)."
        )
    return int(eos)


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return name or type(tokenizer).__name__


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: long texts are windowed later, the tokenizer's length warning does not apply.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(input_ids, attention_mask)``, padded on the right."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


#: Positions per output-head call when scoring: float32 logits of [512, V] (98 MiB at V = 50,304),
#: never [B, T, V] for a whole batch (392 MiB at 8 x 256 beside a 12.9 GiB model on a 15 GB T4).
SCORE_CHUNK = 512


def _plain_linear_head(model) -> torch.nn.Module | None:
    """The output head when logits are exactly ``head(final hidden state)``, else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    scaled = any(getattr(config, name, None) not in (None, 1, 1.0)
                 for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if not isinstance(head, torch.nn.Linear) or scaled or getattr(model, "lm_head", None) is not head:
        return None
    return head


def _forward_hidden(model, ids: torch.Tensor, mask: torch.Tensor):
    """One forward pass; returns ``(states, to_logits)``.

    ``states`` are the final hidden states ``[B, T, H]`` and ``to_logits`` the model's own output
    head, when the head is a plain linear layer (every supported MoE family): the head is swapped
    for an identity during the call (the model's hooks and routing still run) and applied later,
    only to the positions that are scored, :data:`SCORE_CHUNK` at a time. Otherwise ``states``
    are the logits ``[B, T, V]`` and ``to_logits`` the identity.
    """
    head = _plain_linear_head(model)
    if head is None:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, (lambda x: x)
    model.lm_head = torch.nn.Identity()
    try:
        states = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, H)
    finally:
        model.lm_head = head
    return states, head


def _chunked_scores(states: torch.Tensor, to_logits, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL (float32) and argmax hits of ``states[n, H or V]`` against ``targets[n]``."""
    nll = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)  # (n,)
    hit = torch.empty(targets.shape, dtype=torch.bool, device=targets.device)  # (n,)
    for start in range(0, targets.shape[0], SCORE_CHUNK):
        end = start + SCORE_CHUNK
        logits = to_logits(states[start:end]).float()  # (chunk, V)
        nll[start:end] = F.cross_entropy(logits, targets[start:end], reduction="none")
        hit[start:end] = logits.argmax(-1) == targets[start:end]
    return nll, hit


def _free_gpu_bytes(device: torch.device) -> int:
    """Bytes torch can still allocate on ``device``: driver-free plus cached, within any fraction cap."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        available = min(available, int(get_fraction(device) * total) - allocated)
    return max(0, int(available))


def window_bytes(config, window: int, dtype_bytes: int = 2) -> int:
    """Upper estimate of the activation memory of one ``window``-token sequence in a forward pass.

    Per token: about 16 hidden-sized tensors alive at once (residual stream, norms, q/k/v/o, MLP
    input), the routed slots (``max(top-k, 8)`` slots of gate-up ``2I``, activation ``I`` and output
    ``H``), float32 router logits and sort keys, and attention scores of ``heads x window`` in float32
    (the worst case, when the attention kernel materialises them). Deliberately generous: on the
    OLMoE-1B-7B shape it says 42 MB per 256-token window; with one chunk of logits that is 0.60 GiB
    for the demo's batch of 8, where the T4 emulation's sweep peaked 0.30 GiB above the weights.
    """
    hidden = config.hidden_size
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    slots = max(int(getattr(config, "num_experts_per_tok", 8) or 8), 8)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 64)
    per_token = (16 * hidden * dtype_bytes + slots * (3 * inter + hidden) * dtype_bytes + experts * 4 * 3
                 + config.num_attention_heads * window * 4)
    return per_token * window


def fit_batch_size(model, window: int, requested: int, *, free_bytes: int | None = None) -> int:
    """The largest batch of ``window``-token sequences, up to ``requested``, that memory has room for.

    Parameters
    ----------
    model : transformers causal LM
    window : int
        Tokens per sequence.
    requested : int
        The batch size asked for (``--batch-size``); never exceeded.
    free_bytes : int, optional
        Memory available for activations; default: what torch can still allocate on the model's CUDA
        device (within a ``set_per_process_memory_fraction`` cap). On CPU, and when it is not given
        there, ``requested`` is returned unchanged.

    Returns
    -------
    int
        In ``[1, requested]``: 70% of the free memory, less one :data:`SCORE_CHUNK` block of float32
        logits, over :func:`window_bytes`. Below 1 it still returns 1 (an out-of-memory error then
        names the option to lower).
    """
    _check_batch_size(requested)
    if free_bytes is None:
        device = _device(model)
        if device.type != "cuda":
            return requested
        free_bytes = _free_gpu_bytes(device)
    config = model.config
    dtype_bytes = next(model.parameters()).element_size()
    fixed = SCORE_CHUNK * config.vocab_size * 4 * 3  # float32 logits, log-softmax, argmax of one chunk
    fits = int((0.7 * free_bytes - fixed) // window_bytes(config, window, dtype_bytes))
    return max(1, min(requested, fits))


def scored_token_nll(model, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL and argmax hits of the tokens ``ids[:, 1:][scored]``, predicted from the position before.

    Parameters
    ----------
    model : transformers causal LM
    ids, mask : torch.LongTensor, shape ``[B, T]``
        Token ids and attention mask, on the model's device.
    scored : torch.BoolTensor, shape ``[B, T - 1]``
        Which next-token predictions to score (aligned with ``ids[:, 1:]``).

    Returns
    -------
    nll : torch.Tensor, shape ``[n]``, float32
        Negative log-likelihood of each scored token (row-major order of ``scored``).
    hit : torch.BoolTensor, shape ``[n]``
        Whether the argmax prediction equals the token.

    Notes
    -----
    Peak memory beyond the forward pass is one ``[SCORE_CHUNK, V]`` float32 block, not the
    ``[B, T, V]`` logits of the batch.
    """
    states, to_logits = _forward_hidden(model, ids, mask)  # (B, T, H) or (B, T, V)
    picked = states[:, :-1][scored]  # (n, H) or (n, V)
    return _chunked_scores(picked, to_logits, ids[:, 1:][scored])


# ----------------------------------------------------------------------------------------------
# Windowed scoring: perplexity and next-token accuracy
# ----------------------------------------------------------------------------------------------


def _as_text_list(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("`texts` must be a string or a sequence of strings.")
    return texts


def _token_stream(tokenizer, texts: list[str]) -> list[int]:
    """Tokenize documents and join them with one EOS between consecutive documents."""
    eos = _eos_id(tokenizer)
    stream: list[int] = []
    for text in texts:
        ids = _encode(tokenizer, text) if text else []
        if not ids:
            continue
        if stream:
            stream.append(eos)
        stream.extend(ids)
    return stream


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window; tokens ``first_scored..end-1`` are scored."""
    out = []
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + window, n)
        first = max(begin + 1, prev_end)
        out.append((begin, end, first))
        prev_end = end
        if end >= n:
            return out
        begin += stride


def _resolve_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
    limit = _context_length(model)
    if window is None:
        window = DEFAULT_WINDOW if limit is None else min(DEFAULT_WINDOW, int(limit))
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"`window` must be an integer >= 2 tokens, got {window!r}.")
    if limit is not None and window > limit:
        raise ValueError(
            f"`window`={window} is larger than the model's context length "
            f"(config.max_position_embeddings={limit}); pass window <= {limit}."
        )
    if stride is None:
        stride = max(1, window // 2)
    if not isinstance(stride, int) or stride <= 0 or stride > window:
        raise ValueError(
            f"`stride` must be an integer with 0 < stride <= window ({window}), got {stride!r}; "
            "stride == window gives disjoint windows, stride < window overlapping ones."
        )
    return window, stride


def _windowed_scores(model, tokenizer, texts, *, window, stride, batch_size, progress, desc):
    """Run the windowed protocol; return (sum NLL float64, n_correct, n_tokens, protocol)."""
    texts = _as_text_list(texts)
    _check_batch_size(batch_size)
    window, stride = _resolve_window(model, window, stride)
    stream = _token_stream(tokenizer, texts)
    if len(stream) < 2:
        raise ValueError(
            "`texts` is empty: need at least 2 tokens of text to score "
            f"(got {len(texts)} text(s), {len(stream)} token(s))."
        )
    spans = _windows(len(stream), window, stride)
    device = _device(model)
    pad_id = _pad_id(tokenizer)
    nll_sum = 0.0
    n_correct = 0
    n_tokens = 0
    model.eval()
    with torch.no_grad():
        for batch in tqdm(list(_batched(spans, batch_size)), desc=desc, disable=not progress):
            rows = [stream[b:e] for b, e, _ in batch]
            ids, mask = _right_pad(rows, pad_id, device)
            # scored[i, j] is True when token j of window i is scored (predicted from j - 1).
            scored = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            for i, (b, e, first) in enumerate(batch):
                scored[i, first - b : e - b] = True
            nll, hit = scored_token_nll(model, ids, mask, scored[:, 1:])  # (n,), (n,)
            nll_sum += float(nll.double().sum())
            n_correct += int(hit.sum())
            n_tokens += int(nll.numel())
    protocol = {
        "window": window,
        "stride": stride,
        "weighting": "token",
        "n_windows": len(spans),
        "tokenizer": _tokenizer_name(tokenizer),
    }
    return nll_sum, n_correct, n_tokens, protocol


def perplexity(
    model,
    tokenizer,
    texts: str | Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> PerplexityResult:
    """Token-weighted perplexity with fixed sliding windows (Hugging Face's protocol).

    Parameters
    ----------
    model : transformers causal LM
        Used as is (wrap the call in :func:`bh_helpers.routing.patch.route` to change its routing).
    tokenizer : transformers tokenizer
        Must define ``eos_token_id`` (inserted between documents).
    texts : str or sequence of str
        Documents; empty strings are skipped, but at least two tokens of text are required.
    window : int, optional
        Window length ``W`` in tokens; default ``min(2048, config.max_position_embeddings)``.
    stride : int, optional
        Stride ``S`` with ``0 < S <= W``; default ``W // 2``.
    batch_size : int
        Windows per forward pass (one forward pass per batch).
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    PerplexityResult

    Raises
    ------
    ValueError
        Empty ``texts``; ``window`` above the model's context; ``stride`` outside ``(0, window]``.

    Notes
    -----
    See the module docstring for the exact protocol. Logits are scored in float32 and the NLL
    is summed in float64.
    """
    nll_sum, _, n, protocol = _windowed_scores(
        model, tokenizer, texts, window=window, stride=stride, batch_size=batch_size,
        progress=progress, desc="perplexity",
    )
    nll = nll_sum / n
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, n_tokens=n, protocol=protocol)


def next_token_accuracy(
    model,
    tokenizer,
    texts: str | Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> AccuracyResult:
    """Fraction of tokens whose argmax prediction is correct, under :func:`perplexity`'s windows.

    Parameters and errors are those of :func:`perplexity`; the same tokens are scored.

    Returns
    -------
    AccuracyResult
    """
    _, n_correct, n, protocol = _windowed_scores(
        model, tokenizer, texts, window=window, stride=stride, batch_size=batch_size,
        progress=progress, desc="next-token accuracy",
    )
    return AccuracyResult(accuracy=n_correct / n, n_correct=n_correct, n_tokens=n, protocol=protocol)


# ----------------------------------------------------------------------------------------------
# Continuation scoring: last word (LAMBADA) and multiple choice (HellaSwag)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ContinuationScore:
    logprob: float  # summed over the continuation tokens (nats)
    n_tokens: int
    greedy: bool  # argmax equals the token at every continuation position
    argmax: list  # argmax token per continuation position


def _build_request(tokenizer, context: str, continuation: str, limit: int | None) -> tuple[list[int], list[int]]:
    ctx = _encode(tokenizer, context)
    cont = _encode(tokenizer, continuation)
    if not cont:
        raise ValueError(f"continuation {continuation!r} has no tokens; every target must be non-empty.")
    if not ctx:
        ctx = [_eos_id(tokenizer)]
    if limit is not None:
        # The model sees ctx + cont[:-1]; keep at most `limit` tokens, dropping context on the left.
        room = limit - (len(cont) - 1)
        if room < 1:
            raise ValueError(
                f"continuation of {len(cont)} tokens does not fit the model's context of {limit} tokens."
            )
        ctx = ctx[-room:]
    return ctx, cont


def _score_continuations(
    model, requests: Sequence[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int,
    progress: bool, desc: str,
) -> list[_ContinuationScore]:
    """Score each ``(context_ids, continuation_ids)`` with one forward pass per batch."""
    device = _device(model)
    results: list[_ContinuationScore | None] = [None] * len(requests)
    # Longest first, so that each batch holds similar lengths (less padding); padding is never
    # scored, so the order changes nothing but speed. Results come back in the input order.
    order = sorted(range(len(requests)), key=lambda j: -(len(requests[j][0]) + len(requests[j][1])))
    model.eval()
    with torch.no_grad():
        for batch_idx in tqdm(list(_batched(order, batch_size)), desc=desc, disable=not progress):
            batch = [requests[j] for j in batch_idx]
            rows = [ctx + cont[:-1] for ctx, cont in batch]
            ids, mask = _right_pad(rows, pad_id, device)
            states, to_logits = _forward_hidden(model, ids, mask)  # (B, T, H) or (B, T, V)
            for i, (j, (ctx, cont)) in enumerate(zip(batch_idx, batch)):
                start = len(ctx) - 1  # logits at `start` predict cont[0]
                lp = torch.log_softmax(to_logits(states[i, start : start + len(cont)]).float(), dim=-1)  # (L, V)
                target = torch.as_tensor(cont, device=device)
                token_lp = lp.gather(-1, target[:, None]).squeeze(-1)  # (L,)
                argmax = lp.argmax(-1)
                results[j] = _ContinuationScore(
                    logprob=float(token_lp.double().sum()),
                    n_tokens=len(cont),
                    greedy=bool((argmax == target).all()),
                    argmax=argmax.tolist(),
                )
    return results  # type: ignore[return-value]


_LAST_WORD = re.compile(r"^(.*\S)(\s+\S+)\s*$", re.DOTALL)


def split_last_word(text: str) -> tuple[str, str]:
    """Split ``text`` into ``(context, target)`` at its last whitespace-separated word.

    The whitespace before the last word belongs to the target (``"a b c" -> ("a b", " c")``),
    as in lm-eval's LAMBADA task; trailing whitespace is dropped.

    Raises
    ------
    ValueError
        When ``text`` has fewer than two words.

    Examples
    --------
    >>> split_last_word("the cat sat on the mat")
    ('the cat sat on the', ' mat')
    """
    m = _LAST_WORD.match(text)
    if m is None:
        raise ValueError(f"example text must contain at least two words, got {text!r}.")
    return m.group(1), m.group(2)


def _last_word_pair(example) -> tuple[str, str]:
    if isinstance(example, str):
        return split_last_word(example)
    if isinstance(example, Mapping):
        if "context" in example and "target" in example:
            return str(example["context"]), str(example["target"])
        if "text" in example:
            return split_last_word(str(example["text"]))
    raise ValueError(
        "each example must be a string, a {'text': ...} dict, or a {'context', 'target'} dict; "
        f"got {example!r}."
    )


def last_word_accuracy(
    model,
    tokenizer,
    examples: Iterable[str | Mapping[str, str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> LastWordResult:
    """LAMBADA-style accuracy: does greedy decoding reproduce the final word exactly?

    Parameters
    ----------
    examples : iterable of str or dict
        ``"text"`` strings or ``{"text": ...}`` dicts (split with :func:`split_last_word`: the
        target is the last whitespace-separated word with the whitespace before it), or explicit
        ``{"context": ..., "target": ...}`` dicts.
    batch_size : int
        Examples per forward pass.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    LastWordResult

    Notes
    -----
    The target may span several tokens. It is checked teacher-forced in one forward pass over
    ``context + target[:-1]``: an example is correct iff the argmax at every target position
    equals the target token. This is equivalent to greedy-decoding ``len(target)`` tokens from
    the context and comparing them: if the first ``j`` greedy tokens equal the target's, greedy
    decoding's input at step ``j`` is exactly the teacher-forced input, so the two argmaxes
    agree; by induction all match iff greedy decoding emits the target. (Argmax ties break to
    the lowest index in both. Incremental decoding with a KV cache can differ from a full
    forward pass in the last floating-point bits, which matters only at near-ties.)
    """
    _check_batch_size(batch_size)
    pairs = [_last_word_pair(ex) for ex in examples]
    if not pairs:
        raise ValueError("`examples` is empty.")
    limit = _context_length(model)
    requests = [_build_request(tokenizer, c, t, limit) for c, t in pairs]
    scores = _score_continuations(
        model, requests, pad_id=_pad_id(tokenizer), batch_size=batch_size, progress=progress,
        desc="last-word accuracy",
    )
    correct = [s.greedy for s in scores]
    nll = [-s.logprob for s in scores]
    n_correct = sum(correct)
    return LastWordResult(
        accuracy=n_correct / len(scores),
        n_correct=n_correct,
        n_examples=len(scores),
        perplexity=math.exp(sum(nll) / len(nll)),
        correct=correct,
        target_nll=nll,
        predictions=[s.argmax for s in scores],
    )


def _check_mc_example(i: int, ex) -> tuple[str, list[str], int]:
    try:
        context, endings, label = ex["context"], list(ex["endings"]), int(ex["label"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"example {i} must be a dict with 'context' (str), 'endings' (list of str) and "
            f"'label' (int): {err!r}"
        ) from None
    if len(endings) < 2 or not 0 <= label < len(endings):
        raise ValueError(f"example {i}: need >= 2 endings and 0 <= label < len(endings), got {ex!r}.")
    return str(context), [str(e) for e in endings], label


def multiple_choice_accuracy(
    model,
    tokenizer,
    examples: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> MultipleChoiceResult:
    """HellaSwag-style multiple-choice accuracy by log-likelihood of each ending.

    Parameters
    ----------
    examples : iterable of dict
        ``{"context": str, "endings": list[str], "label": int}``. Each ending is scored as the
        continuation ``" " + ending`` of ``context`` (lm-eval's target delimiter).
    batch_size : int
        (example, ending) pairs per forward pass.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    MultipleChoiceResult
        ``acc`` (unnormalised summed log-likelihood), ``acc_norm`` (divided by the number of
        characters of the ending, lm-eval's ``acc_norm``) and ``acc_per_token`` (divided by its
        number of tokens). Ties go to the first ending.
    """
    _check_batch_size(batch_size)
    parsed = [_check_mc_example(i, ex) for i, ex in enumerate(examples)]
    if not parsed:
        raise ValueError("`examples` is empty.")
    limit = _context_length(model)
    requests = []
    for context, endings, _ in parsed:
        requests.extend(_build_request(tokenizer, context, " " + e, limit) for e in endings)
    scores = _score_continuations(
        model, requests, pad_id=_pad_id(tokenizer), batch_size=batch_size, progress=progress,
        desc="multiple choice",
    )
    loglik, n_chars, n_tokens = [], [], []
    hits = {"acc": 0, "acc_norm": 0, "acc_per_token": 0}
    pos = 0
    for context, endings, label in parsed:
        ll = [s.logprob for s in scores[pos : pos + len(endings)]]
        nt = [s.n_tokens for s in scores[pos : pos + len(endings)]]
        nc = [max(len(e), 1) for e in endings]
        pos += len(endings)
        for name, values in (
            ("acc", ll),
            ("acc_norm", [a / c for a, c in zip(ll, nc)]),
            ("acc_per_token", [a / t for a, t in zip(ll, nt)]),
        ):
            hits[name] += int(max(range(len(values)), key=values.__getitem__) == label)
        loglik.append(ll)
        n_chars.append(nc)
        n_tokens.append(nt)
    n = len(parsed)
    return MultipleChoiceResult(
        acc=hits["acc"] / n,
        acc_norm=hits["acc_norm"] / n,
        acc_per_token=hits["acc_per_token"] / n,
        n_examples=n,
        loglik=loglik,
        n_chars=n_chars,
        n_tokens=n_tokens,
    )


# ----------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------


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
    _check_batch_size(batch_size)
    for name, value in (("max_new_tokens", max_new_tokens), ("prompt_tokens", prompt_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be a non-negative integer, got {warmup!r}.")
    prompts = [ids[:prompt_tokens] for ids in (_encode(tokenizer, t) for t in texts if t) if ids]
    if not prompts:
        raise ValueError("`texts` is empty: no prompt has any tokens.")
    limit = _context_length(model)
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


# ----------------------------------------------------------------------------------------------
# Compute accounting
# ----------------------------------------------------------------------------------------------

_MEAN_K_KEYS = ("mean_experts_per_token", "mean_k", "experts_per_token_mean", "mean_experts")
_TOTAL_KEYS = ("total_expert_activations", "total_activations", "expert_activations", "n_activations")


def compute_summary(recorder_summary: Mapping[str, Any], native_k: int) -> dict:
    """Relative expert compute from a routing recorder's summary.

    Parameters
    ----------
    recorder_summary : mapping
        ``rec.summary()`` of :func:`bh_helpers.routing.patch.route`; must hold the mean number of
        experts per token (key ``"mean_experts_per_token"``, or ``"mean_k"``); a total of expert
        activations (``"total_expert_activations"`` or ``"total_activations"``) is copied when
        present.
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
    >>> compute_summary({"mean_experts_per_token": 4.0}, native_k=8)["relative_compute"]
    0.5
    """
    if not isinstance(native_k, (int, float)) or native_k <= 0:
        raise ValueError(f"`native_k` must be positive (the model's own top-k), got {native_k!r}.")
    mean_k = next((recorder_summary[k] for k in _MEAN_K_KEYS if k in recorder_summary), None)
    if mean_k is None:
        raise ValueError(
            "`recorder_summary` has no mean experts per token; expected one of "
            f"{list(_MEAN_K_KEYS)}, got keys {sorted(recorder_summary)}."
        )
    mean_k = float(mean_k)
    out = {
        "mean_experts_per_token": mean_k,
        "relative_compute": mean_k / native_k,
        "native_k": native_k,
    }
    total = next((recorder_summary[k] for k in _TOTAL_KEYS if k in recorder_summary), None)
    if total is not None:
        out["total_expert_activations"] = int(total)
    if "activation_ratio" in recorder_summary:
        out["activation_ratio"] = float(recorder_summary["activation_ratio"])
    return out
