"""Task accuracy by continuation scoring: last word (LAMBADA) and multiple choice (HellaSwag).

Context and continuation are tokenized separately (no special tokens) and concatenated; an
empty context becomes a single EOS token; a request longer than the model's context is truncated
on the left of the context. One forward pass scores all continuation tokens. Like every
evaluation function, these take ``model, tokenizer`` and leave routing to the caller's ``route``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from bh_helpers._validate import check_int
from bh_helpers.models.families import context_length
from bh_helpers.models.texts import encode, eos_id
from bh_helpers.evaluation.scoring import (
    DEFAULT_BATCH_SIZE,
    _batched,
    _device,
    _forward_hidden,
    _pad_id,
    _right_pad,
)

__all__ = ["LastWordResult", "MultipleChoiceResult", "last_word_accuracy", "multiple_choice_accuracy", "split_last_word"]


def _scalars(result) -> dict:
    """The scalar fields of a result dataclass (no per-example lists), for sweeps and tables."""
    return {f.name: getattr(result, f.name) for f in fields(result) if not isinstance(getattr(result, f.name), list)}


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
        return _scalars(self)


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
    correct : list of bool
        Per example, whether ``acc`` counted it (the largest summed log-likelihood is the label's).
    loglik : list of list of float
        Per example and ending, summed log-likelihood (nats) of ``" " + ending``.
    n_chars, n_tokens : list of list of int
        Per example and ending, the normalisers used above.
    """

    acc: float
    acc_norm: float
    acc_per_token: float
    n_examples: int
    correct: list = field(default_factory=list)
    loglik: list = field(default_factory=list)
    n_chars: list = field(default_factory=list)
    n_tokens: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Scalar metrics only (no per-example lists), for sweeps and tables."""
        return _scalars(self)


@dataclass(frozen=True)
class _ContinuationScore:
    logprob: float  # summed over the continuation tokens (nats)
    n_tokens: int
    greedy: bool = False  # argmax equals the token at every continuation position
    argmax: list = field(default_factory=list)  # argmax token per continuation position


def _build_request(tokenizer, context: str, continuation: str, limit: int | None) -> tuple[list[int], list[int]]:
    ctx = encode(tokenizer, context)
    cont = encode(tokenizer, continuation)
    if not cont:
        raise ValueError(f"continuation {continuation!r} has no tokens; every target must be non-empty.")
    if not ctx:
        ctx = [eos_id(tokenizer)]
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
                argmax = lp.argmax(-1)  # (L,)
                results[j] = _ContinuationScore(logprob=float(token_lp.double().sum()), n_tokens=len(cont),
                                                greedy=bool((argmax == target).all()), argmax=argmax.tolist())
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
    check_int("batch_size", batch_size, 1)
    pairs = [_last_word_pair(ex) for ex in examples]
    if not pairs:
        raise ValueError("`examples` is empty.")
    limit = context_length(model)
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
    check_int("batch_size", batch_size, 1)
    parsed = [_check_mc_example(i, ex) for i, ex in enumerate(examples)]
    if not parsed:
        raise ValueError("`examples` is empty.")
    limit = context_length(model)
    requests = []
    for context, endings, _ in parsed:
        requests.extend(_build_request(tokenizer, context, " " + e, limit) for e in endings)
    scores = _score_continuations(
        model, requests, pad_id=_pad_id(tokenizer), batch_size=batch_size, progress=progress,
        desc="multiple choice",
    )
    loglik, n_chars, n_tokens, correct = [], [], [], []
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
            hit = max(range(len(values)), key=values.__getitem__) == label
            hits[name] += int(hit)
            if name == "acc":
                correct.append(bool(hit))
        loglik.append(ll)
        n_chars.append(nc)
        n_tokens.append(nt)
    n = len(parsed)
    return MultipleChoiceResult(
        acc=hits["acc"] / n,
        acc_norm=hits["acc_norm"] / n,
        acc_per_token=hits["acc_per_token"] / n,
        n_examples=n,
        correct=correct,
        loglik=loglik,
        n_chars=n_chars,
        n_tokens=n_tokens,
    )
