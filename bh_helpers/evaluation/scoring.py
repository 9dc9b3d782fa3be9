"""Windowed scoring of a (possibly re-routed) causal language model: perplexity, memory-bounded token losses.

Every function takes ``model, tokenizer`` and plain Python data, runs under
:func:`torch.no_grad` with the model in eval mode, and changes nothing about the routing:
the caller wraps the call with :func:`bh_helpers.routing.patch.route` to evaluate a selector::

    with route(model, selector) as rec:
        ppl = perplexity(model, tokenizer, texts, window=1024, stride=512)
    compute = compute_summary(rec.summary(), native_k=8)  # bh_helpers.evaluation.speed

Protocols (state them next to every number; perplexities are only comparable under one):

- **Windowed scoring** (:func:`perplexity`). Documents are
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
- **Continuations** (:mod:`bh_helpers.evaluation.tasks`: last word, multiple choice): see there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bh_helpers._validate import check_int
from bh_helpers.models.families import check_window_fits, context_length, moe_shape
from bh_helpers.models.texts import encode, eos_id

__all__ = [
    "MIN_WINDOW",
    "PerplexityResult",
    "perplexity",
    "resolve_window",
    "scored_token_nll",
    "scoring_window_count",
    "window_count",
    "fit_batch_size",
    "window_bytes",
]

DEFAULT_WINDOW = 2048  # capped at the model's context length
MIN_WINDOW = 2  # a window scores its tokens after the first: one token scores nothing
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------


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
    window_nll, window_tokens : list
        Per window (in order): the summed NLL of its scored tokens and their number; the same
        windows for every routing of one text, so two results can be compared pair by pair
        (:func:`bh_helpers.experiments.bootstrap.paired_bootstrap`).
    window_docs : list of int
        Per window: the index (in ``texts``) of the document holding most of its scored tokens,
        the clusters of a document-level bootstrap (windows of one document are correlated).
    """

    perplexity: float
    nll: float
    n_tokens: int
    protocol: dict = field(default_factory=dict)
    window_nll: list = field(default_factory=list)
    window_tokens: list = field(default_factory=list)
    window_docs: list = field(default_factory=list)

    def protocol_str(self) -> str:
        """One line describing the protocol, for table captions."""
        p = self.protocol
        return (f"window={p['window']} stride={p['stride']} weighting={p['weighting']} windows={p['n_windows']} "
                f"tokenizer={p['tokenizer']}")

    def to_dict(self) -> dict:
        """Flat ``dict`` (metrics plus ``protocol``) for sweeps and tables."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return name or type(tokenizer).__name__


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    shape = moe_shape(config)
    slots, experts = max(shape.top_k, 8), shape.num_experts
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
    check_int("batch_size", requested, 1)
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
# Windowed scoring: perplexity
# ----------------------------------------------------------------------------------------------


def _as_text_list(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("`texts` must be a string or a sequence of strings.")
    return texts


def _token_stream(tokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    """Tokenize documents and join them with one EOS between consecutive documents.

    Returns the stream and, per stream position, the index in ``texts`` of its document (an EOS
    belongs to the document it ends).
    """
    eos = eos_id(tokenizer)
    stream: list[int] = []
    docs: list[int] = []
    for index, text in enumerate(texts):
        ids = encode(tokenizer, text) if text else []
        if not ids:
            continue
        if stream:
            stream.append(eos)
            docs.append(docs[-1])
        stream.extend(ids)
        docs += [index] * len(ids)
    return stream, docs


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


def window_count(tokens: int, window: int, stride: int) -> int:
    """Number of scoring windows :func:`perplexity` cuts from a stream of ``tokens`` tokens (0 for none)."""
    return len(_windows(tokens, window, stride)) if tokens > 0 else 0


def scoring_window_count(tokenizer, texts, *, window: int, stride: int) -> tuple[int, int]:
    """``(tokens, windows)``: the token stream :func:`perplexity` would score on ``texts`` and its windows."""
    stream, _ = _token_stream(tokenizer, _as_text_list(texts))
    return len(stream), window_count(len(stream), window, stride)


def resolve_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
    """``(window, stride)`` of :func:`perplexity` on ``model`` (or its config): defaults filled in,
    checked against the model's context length; ValueError naming the argument otherwise."""
    limit = context_length(model)
    if window is None:
        window = DEFAULT_WINDOW if limit is None else min(DEFAULT_WINDOW, int(limit))
    if not isinstance(window, int) or window < MIN_WINDOW:
        raise ValueError(f"`window` must be an integer >= {MIN_WINDOW} tokens, got {window!r}.")
    check_window_fits(model, window)
    if stride is None:
        stride = max(1, window // 2)
    if not isinstance(stride, int) or stride <= 0 or stride > window:
        raise ValueError(
            f"`stride` must be an integer with 0 < stride <= window ({window}), got {stride!r}; "
            "stride == window gives disjoint windows, stride < window overlapping ones."
        )
    return window, stride


def _windowed_scores(model, tokenizer, texts, *, window, stride, batch_size, progress, desc):
    """Run the windowed protocol; return (per-window NLL sums float64, per-window token counts, protocol)."""
    texts = _as_text_list(texts)
    check_int("batch_size", batch_size, 1)
    window, stride = resolve_window(model, window, stride)
    stream, stream_docs = _token_stream(tokenizer, texts)
    if len(stream) < 2:
        raise ValueError(
            "`texts` is empty: need at least 2 tokens of text to score "
            f"(got {len(texts)} text(s), {len(stream)} token(s))."
        )
    spans = _windows(len(stream), window, stride)
    device = _device(model)
    pad_id = _pad_id(tokenizer)
    window_nll: list[float] = []  # per window: summed NLL of its scored tokens (float64)
    window_tokens: list[int] = []  # per window: its scored tokens
    # per window: the document holding most of its scored tokens (the cluster of a document-level bootstrap)
    window_docs = [int(np.bincount(stream_docs[first:e]).argmax()) for _, e, first in spans]
    model.eval()
    with torch.no_grad():
        for batch in tqdm(list(_batched(spans, batch_size)), desc=desc, disable=not progress):
            rows = [stream[b:e] for b, e, _ in batch]
            ids, mask = _right_pad(rows, pad_id, device)
            # scored[i, j] is True when token j of window i is scored (predicted from j - 1).
            scored = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            for i, (b, e, first) in enumerate(batch):
                scored[i, first - b : e - b] = True
            nll, _ = scored_token_nll(model, ids, mask, scored[:, 1:])  # (n,)
            per_row = scored[:, 1:].sum(dim=1).tolist()  # scored tokens per window, row-major as nll
            window_nll += [float(part.double().sum()) for part in torch.split(nll, per_row)]
            window_tokens += per_row
    protocol = {
        "window": window,
        "stride": stride,
        "weighting": "token",
        "n_windows": len(spans),
        "tokenizer": _tokenizer_name(tokenizer),
    }
    return window_nll, window_tokens, window_docs, protocol


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
    window_nll, window_tokens, window_docs, protocol = _windowed_scores(
        model, tokenizer, texts, window=window, stride=stride, batch_size=batch_size,
        progress=progress, desc="perplexity",
    )
    n = sum(window_tokens)
    nll = math.fsum(window_nll) / n
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, n_tokens=n, protocol=protocol,
                            window_nll=window_nll, window_tokens=window_tokens, window_docs=window_docs)
