"""Issue 27, item 3: weighted BH, a per-token level from the previous layer's count (a benchmark; kept only if it wins).

What it is. BH's family here is one token's E experts in one layer. Genovese, Roeder and
Wasserman [1] weight the hypotheses of ONE family (``p_i / w_i``, weights of mean 1 over the
family); a per-token covariate is constant within the family, so such weights change nothing.
What can help is the other reading of their idea, a per-token LEVEL: token ``t`` in layer ``l``
runs BH at ``alpha_{t,l} = alpha_l * w_{t,l}`` with

    w_{t,l} = c_{t,l-1} ** gamma / mean_calibration(c_{l-1} ** gamma)     (layer 0: w = 1)

where ``c_{t,l-1}`` is the number of experts the same token got in the layer before (in the same
forward pass), so a token that needed many experts in layer ``l-1`` gets a looser level in ``l``
(``gamma > 0``: "hard" tokens stay hard), or a tighter one (``gamma < 0``: experts move to the
tokens that got few before); the default grid tries both directions, ``gamma`` in -1, -0.5, 0.5, 1.
The weights have mean 1 over the calibration tokens, and the per-layer ``alpha_l`` are solved on the ROUTED model (a fixed point like
:class:`bh_helpers.experiments.k_matching.RoutedBudget`) so that each layer's mean k equals the
static allocation's ``k_l``: the same compute as "per-layer budgets + BH" (the unweighted rule), so
the only difference is which tokens get the experts. A level above 1 is used as is (BH's count is
monotone in the level; ``max_k`` caps it).

Protocol (the demo's): embedded tiny model in float32 on CPU, zscore trim-8 Gaussian null fitted on
16,384 calibration tokens, greedy static allocation path on 2,048 calibration tokens, k-matching on
4,096 calibration tokens, perplexity on windows of 256 (``--tokens`` per data set and half). gamma is
chosen per compute target on the TUNING halves (``prose:tune``, ``code:tune``: the lowest mean
relative perplexity against the best of the unweighted rule and the two controls); the result is
stated on the CONFIRMATION halves only, against (b) per-layer-budgets BH, (c) the static chord at
(a)'s realised mean k, (d) mixed top-k at (a)'s per-layer mean k, with delete-one-document jackknife
intervals (:func:`bh_helpers.experiments.bootstrap.paired_jackknife`).

    PYTHONPATH=. python benchmarks/weighted_bh.py --json     # benchmarks/results/weighted_bh_cpu_<commit>.json

References
----------
.. [1] C. R. Genovese, K. Roeder and L. Wasserman, "False discovery control with p-value
       weighting", Biometrika 93 (2006) 509-524.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bh_helpers.selection.reference import Selection, select_top_counts
from bh_helpers.selection.selectors import RoutedModel, Selector, check_null_bank

ALPHA_MIN = 1e-12  # the smallest level, as ComputeBudget's (a layer whose k_l is the floor gets it)
BISECTION_STEPS = 40  # on log(alpha): the bracket (at most ~36 in log) shrinks below 1e-10


def _counts_from_sorted(sorted_p: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """BH step-up counts ``(T,)`` from ascending p-values ``(T, m)`` at one level per row ``(T,)``."""
    m = sorted_p.shape[-1]
    ecdf = torch.arange(1, m + 1, dtype=torch.float64, device=sorted_p.device) / float(m)  # (m,)
    # ecdf * alpha in float64, the order of operations of statsmodels (and fdr_counts): same counts on ties
    below = sorted_p.double() <= ecdf * level.double().unsqueeze(-1)  # (T, m)
    ranks = torch.arange(1, m + 1, device=sorted_p.device)  # (m,)
    return (below * ranks).amax(dim=-1)  # (T,) largest rank under its threshold, 0 if none


def weighted_bh_counts(pvalues: torch.Tensor, level: torch.Tensor | float, *, min_k: int = 0,
                       max_k: int | None = None) -> torch.Tensor:
    """Benjamini-Hochberg counts with one level per row, clamped to ``[min_k, max_k]``.

    Parameters
    ----------
    pvalues : torch.Tensor, shape ``(T, m)``
        P-values of each row's ``m`` hypotheses (one token's experts).
    level : torch.Tensor of shape ``(T,)``, or float
        Each row's BH level (> 0; above 1 allowed: every threshold grows with it).
    min_k, max_k : int
        Floor and ceiling of the count (``max_k`` None: ``m``).

    Returns
    -------
    torch.LongTensor, shape ``(T,)``
        The largest ``i`` with ``p_(i) <= level_t * i / m`` (0 if none), clamped.
    """
    level = torch.as_tensor(level, dtype=torch.float64, device=pvalues.device).expand(pvalues.shape[:-1])
    if not bool((level > 0).all()):
        raise ValueError("`level` must be > 0 in every row.")
    sorted_p = pvalues.double().sort(dim=-1).values  # (T, m)
    return _counts_from_sorted(sorted_p, level).clamp(min_k, pvalues.shape[-1] if max_k is None else max_k)


def count_weights(prev_counts: torch.Tensor, gamma: float, norm: float) -> torch.Tensor:
    """Per-token level weights ``(T,)`` float64: ``prev_counts ** gamma / norm`` (norm: calibration mean)."""
    return prev_counts.double().clamp(min=1) ** gamma / norm  # a token at 0 experts (min_k 0) counts as 1


@dataclass(eq=False)
class WeightedBHSelector(Selector):
    """BH per token at level ``alpha[l] * count_weights(previous layer's counts)``; eager only.

    It keeps the counts of the layer it routed last and expects the layers of one forward pass in
    increasing order (as :func:`bh_helpers.routing.patch.route` calls them), so it is neither
    CUDA-graph capturable nor graph-safe (its state lives between layer calls, on the host side).

    Parameters
    ----------
    null_bank : NullBank
        P-values per layer (``.pvalues(logits, layer)``).
    alpha : dict of int to float
        ``alpha_l`` per routed layer.
    gamma : float
        Exponent of the previous layer's count (0: unweighted per-layer BH).
    norm : dict of int to float, optional
        ``mean_calibration(c_{l-1} ** gamma)`` per layer (missing: 1).
    min_k, max_k : int, default 1 and 8
    weights : str, default "softmax"
        Mixing weights of the chosen experts (as in :func:`select_top_counts`).
    trace : list, optional
        When a list, each call appends ``(layer, sorted p (N, E) float64, previous counts (N,))`` of
        its non-padding rows (the k-matching solve reads it).
    """

    null_bank: Any = field(repr=False)
    alpha: dict
    gamma: float
    norm: dict = field(default_factory=dict)
    min_k: int = 1
    max_k: int = 8
    weights: str = "softmax"
    trace: list | None = field(default=None, repr=False)
    graph_safe = False
    reads_valid_rows = True  # route passes `valid`: padding rows stay out of the trace
    _last: tuple | None = field(default=None, init=False, repr=False)

    def __call__(self, logits: torch.Tensor, layer: int, valid: torch.Tensor | None = None) -> Selection:
        first = layer == min(self.alpha)
        if not first and (self._last is None or self._last[0] != layer - 1 or self._last[1].shape != logits.shape[:1]):
            raise RuntimeError(f"weighted BH at layer {layer} needs the counts of layer {layer - 1} for the same "
                               f"{logits.shape[0]} tokens: route every layer, in order, in one forward pass.")
        p = self.null_bank.pvalues(logits, layer).to(logits.device)  # (T, E)
        sorted_p = p.double().sort(dim=-1).values  # (T, E)
        prev = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device) if first else self._last[1]  # (T,)
        w = count_weights(prev, self.gamma, 1.0 if first else self.norm.get(layer, 1.0))  # (T,) ones in the first
        counts = _counts_from_sorted(sorted_p, self.alpha[layer] * w).clamp(self.min_k, self.max_k)  # (T,)
        self._last = (layer, counts)
        if self.trace is not None:
            keep = slice(None) if valid is None else valid.reshape(-1).to(torch.bool)
            self.trace.append((layer, sorted_p[keep].cpu(), prev[keep].cpu()))
        # a pooled null's p-values fall as the statistic (a per-token monotone map of the logit) rises:
        # BH's smallest p-values are the largest logits, which select_top_counts takes
        return select_top_counts(logits, counts, max_k=self.max_k, weights=self.weights)

    def check(self, target: RoutedModel) -> None:
        """The bank fits the model; ``alpha`` has a level for every routed layer, and they are consecutive."""
        check_null_bank(self.null_bank, target)
        if sorted(self.alpha) != list(target.layers) or list(target.layers) != list(
                range(target.layers[0], target.layers[-1] + 1)):
            raise ValueError(f"weighted BH needs `alpha` for exactly the routed layers, consecutive; got "
                             f"{sorted(self.alpha)} for routed layers {list(target.layers)}.")

    def capturable(self, device: torch.device) -> bool:
        """Never: the level of a layer depends on the counts the previous call left behind."""
        return False


# ----------------------------------------------------------------------------------------------
# k-matching: alpha_l per layer on the routed model (fixed point), and the evaluation
# ----------------------------------------------------------------------------------------------


def _bisect_level(sorted_p: torch.Tensor, w: torch.Tensor, target: float, min_k: int, max_k: int) -> float:
    """Smallest ``a`` (to bisection precision) with mean clamped count at levels ``a * w`` >= ``target``."""
    def mean_k(log_a: float) -> float:
        return float(_counts_from_sorted(sorted_p, math.exp(log_a) * w).clamp(min_k, max_k).double().mean())

    lo, hi = math.log(ALPHA_MIN), math.log(1.0 / float(w.min()))  # at hi every level is >= 1: every p rejected
    if not mean_k(lo) <= target <= mean_k(hi):
        raise ValueError(f"target mean k {target:g} is out of reach ({mean_k(lo):.3f} .. {mean_k(hi):.3f}).")
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if mean_k(mid) >= target else (mid, hi)
    return math.exp(hi)


def _routed_trace(model, selector: WeightedBHSelector, batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (sorted p (N, E), previous counts (N,))}`` of the model routed by ``selector`` on ``batches``."""
    from bh_helpers.routing.patch import route

    trace: list = []
    traced = replace(selector, trace=trace)
    with torch.no_grad(), route(model, traced):
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out: dict[int, list] = {}
    for layer, p, prev in trace:
        out.setdefault(layer, []).append((p, prev))
    return {layer: (torch.cat([p for p, _ in parts]), torch.cat([c for _, c in parts])) for layer, parts in out.items()}


def match_weighted(model, bank, batches, targets: dict[int, float], gamma: float, *, start: dict[int, float],
                   min_k: int = 1, max_k: int = 8, steps: int = 6, tolerance: float = 0.05) -> dict:
    """Per-layer ``alpha_l`` (and weight norms) at which the routed model's layer ``l`` uses ``targets[l]`` experts.

    Fixed point: route with the current levels on the calibration ``batches``, take each layer's
    p-values and previous-layer counts from that run, set the norm to the calibration mean of
    ``c ** gamma`` and bisect ``alpha_l`` to the target on them; stop when every layer's realised
    mean k is within ``tolerance`` (experts per token, the per-layer tolerance of RoutedBudget),
    after at least one re-solve (so the norms are calibration means, not the first guess).

    Returns
    -------
    dict
        ``alpha``, ``norm``, ``realised`` (per layer), ``gap`` (largest), ``history`` (gap per step).
        Not strict: after ``steps`` the closest step is returned (its gap says how close).
    """
    layers = sorted(targets)
    alpha = dict(start)
    # the first layer's previous counts are ones (weight 1); elsewhere a first guess: c ~ its layer's target
    norm = {l: 1.0 if l == layers[0] else float(targets[l - 1]) ** gamma for l in layers}
    history, best = [], None
    for step in range(steps + 1):
        selector = WeightedBHSelector(bank, alpha=dict(alpha), gamma=gamma, norm=dict(norm), min_k=min_k, max_k=max_k)
        trace = _routed_trace(model, selector, batches)
        realised = {layer: float(_counts_from_sorted(p, alpha[layer] * count_weights(c, gamma, norm[layer]))
                                 .clamp(min_k, max_k).double().mean()) for layer, (p, c) in trace.items()}
        history.append(max(abs(realised[l] - targets[l]) for l in layers))
        if step and (best is None or history[-1] < best["gap"]):
            best = {"alpha": dict(alpha), "norm": dict(norm), "realised": realised, "gap": history[-1]}
        if step and history[-1] <= tolerance:  # step 0 only starts: the norms are guesses there
            break
        for layer, (sorted_p, prev) in trace.items():  # re-solve every layer on this run's p-values and counts
            if layer != layers[0]:
                norm[layer] = float((prev.double().clamp(min=1) ** gamma).mean())
            alpha[layer] = ALPHA_MIN if targets[layer] == min_k else _bisect_level(
                sorted_p, count_weights(prev, gamma, norm[layer]), targets[layer], min_k, max_k)
    return {**best, "history": history}


class Scorer:
    """Perplexity of routings on the evaluation halves (the demo's protocol), with the controls."""

    def __init__(self, model, tokenizer, static_path, *, tokens: int, window: int = 256, batch_size: int = 8):
        self.model, self.tokenizer, self.path = model, tokenizer, static_path
        self.tokens, self.window, self.batch_size = tokens, window, batch_size
        self._texts: dict[str, list[str]] = {}
        self._static: dict[tuple, Any] = {}  # (allocation, data set) -> PerplexityResult

    def score(self, selector, dataset: str):
        """``(PerplexityResult, {layer: mean k})`` of the model routed by ``selector`` on ``dataset``."""
        from bh_helpers.evaluation.scoring import perplexity
        from bh_helpers.models.texts import evaluation_texts
        from bh_helpers.routing.patch import route

        if dataset not in self._texts:
            self._texts[dataset] = evaluation_texts(dataset, self.tokenizer, max_tokens=self.tokens)
        with route(self.model, selector) as rec:
            ppl = perplexity(self.model, self.tokenizer, self._texts[dataset], window=self.window,
                             stride=self.window, batch_size=self.batch_size, progress=False)
        return ppl, {layer: s["mean_k"] for layer, s in rec.summary()["per_layer"].items()}

    def chord(self, mean_k: float, dataset: str):
        """The static chord at ``mean_k``: the two bracketing allocations mixed per window."""
        from bh_helpers.experiments.static_allocation import mix_windows
        from bh_helpers.selection.static import StaticLayerSelector

        parts = []
        for ks, p in self.path.chord(mean_k):
            if (ks, dataset) not in self._static:
                selector = StaticLayerSelector(dict(zip(self.path.layers, ks)), weights="softmax")
                self._static[ks, dataset] = self.score(selector, dataset)[0]
            parts.append((self._static[ks, dataset], p))
        return mix_windows(parts)


def _versus(a, b) -> dict:
    """perplexity(a) - perplexity(b) with the delete-one-document jackknife interval."""
    from bh_helpers.experiments.bootstrap import paired_jackknife

    r = paired_jackknife(a.window_nll, a.window_tokens, b.window_nll, b.window_tokens, clusters=a.window_docs)
    return {"delta": r.delta, "low": r.low, "high": r.high, "relative": r.delta / b.perplexity, "documents": r.units}


def compare(scorer: Scorer, weighted, unweighted, dataset: str) -> dict:
    """(a) ``weighted`` against (b) ``unweighted``, (c) the static chord and (d) mixed top-k at (a)'s compute."""
    from bh_helpers.selection.controls import MixedTopKSelector

    a, a_k = scorer.score(weighted, dataset)
    mean_k = sum(a_k.values()) / len(a_k)
    arms = {"unweighted": scorer.score(unweighted, dataset), "static_chord": (scorer.chord(mean_k, dataset), None),
            "mixed": scorer.score(MixedTopKSelector(a_k, max_k=weighted.max_k, weights="softmax"), dataset)}
    row = {"dataset": dataset, "perplexity": a.perplexity, "mean_k": mean_k, "per_layer_mean_k": a_k,
           "windows": len(a.window_nll)}
    for name, (res, k) in arms.items():
        row[name] = {"perplexity": res.perplexity, "mean_k": sum(k.values()) / len(k) if k else mean_k,
                     **_versus(a, res)}
    strongest = min(arms, key=lambda n: arms[n][0].perplexity)
    row["strongest"] = strongest
    return row


def _line(target, gamma, row) -> str:
    cells = [f"{target:g}", f"{gamma:g}", row["dataset"], f"{row['perplexity']:.3f}", f"{row['mean_k']:.3f}"]
    for name in ("unweighted", "static_chord", "mixed"):
        r = row[name]
        cells.append(f"{r['perplexity']:.3f} ({r['mean_k']:.2f}) {100 * r['relative']:+.2f}% "
                     f"[{r['low']:+.3f}, {r['high']:+.3f}]")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| target | gamma | data set | (a) weighted ppl | mean k | (b) per-layer budgets BH: ppl (k) a-b [95%] | "
          "(c) static chord | (d) mixed top-k |\n|---:|---:|---|---:|---:|---|---|---|")


def _setup(args):
    """Tiny model, the zscore trim-8 bank, the static allocation path (cached in ``--work``) and k-matching batches."""
    from bh_helpers.capture import capture_calibration, window_batches
    from bh_helpers.experiments.static_allocation import StaticAllocationPath, static_allocation_path
    from bh_helpers.models.loading import load_model
    from bh_helpers.models.texts import calibration_token_ids
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.nulls.fit import fit_null_bank

    model, tok = load_model("tiny", device="cpu", dtype=torch.float32)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if (work / "bank" / "metadata.json").is_file():
        bank = NullBank.load(work / "bank")
    else:
        captured = capture_calibration(model, tok, max_tokens=args.calibration_tokens, window=256, batch_size=8,
                                       model_id="tiny", progress=False)
        bank = fit_null_bank(captured, kernel="gaussian", grid_size=8192, statistic="zscore", trim=8, model_id="tiny",
                             calibration=f"{args.calibration_tokens} calibration tokens")
        bank.save(work / "bank")
    if (work / "static.json").is_file():
        path = StaticAllocationPath.load(work / "static.json")
    else:
        path = static_allocation_path(model, tok, method="greedy", max_k=8, max_tokens=args.allocation_tokens,
                                      window=256, batch_size=8, weights="softmax")
        path.save(work / "static.json")
    batches = window_batches(calibration_token_ids(tok, max_tokens=args.kmatch_tokens), window=256, batch_size=8)
    return model, tok, bank, path, batches


def run_target(args, model, tok, bank, path, batches, scorer: Scorer, target: float) -> dict:
    """One compute target: solve (b) and (a) for every gamma, pick gamma on the tuning halves, confirm it."""
    from bh_helpers.experiments.k_matching import RoutedBudget
    from bh_helpers.models.texts import split_name
    from bh_helpers.selection.selectors import BHSelector

    ks = dict(zip(path.layers, path.allocation(target)))
    b_alpha = RoutedBudget(model, bank, batches, weights="softmax").alpha(ks, method="bh", min_k=1, max_k=8)
    unweighted = BHSelector(bank, alpha=b_alpha, max_k=8, weights="softmax")
    out = {"target": target, "allocation": ks, "unweighted_alpha": b_alpha, "gammas": {}}
    for gamma in args.gammas:
        solved = match_weighted(model, bank, batches, ks, gamma, start=b_alpha)
        print(f"target {target:g}, gamma {gamma:g}: largest per-layer gap of the routed solve, by step: "
              + ", ".join(f"{g:.3f}" for g in solved["history"]), flush=True)
        selector = WeightedBHSelector(bank, alpha=solved["alpha"], gamma=gamma, norm=solved["norm"])
        rows = [compare(scorer, selector, unweighted, split_name(d, "tune")) for d in args.datasets]
        # the best alternative on each data set: the unweighted rule or a control
        score = sum(max(r[n]["relative"] for n in ("unweighted", "static_chord", "mixed")) for r in rows) / len(rows)
        out["gammas"][gamma] = {"solve": solved, "tune": rows, "tune_score": score}
        for r in rows:
            print(_line(target, gamma, r), flush=True)
    pick = min(args.gammas, key=lambda g: out["gammas"][g]["tune_score"])
    g = out["gammas"][pick]
    selector = WeightedBHSelector(bank, alpha=g["solve"]["alpha"], gamma=pick, norm=g["solve"]["norm"])
    out["pick"] = pick
    out["confirm"] = [compare(scorer, selector, unweighted, split_name(d, "confirm")) for d in args.datasets]
    print(f"target {target:g}: gamma {pick:g} picked on the tuning halves; confirmation halves:", flush=True)
    for r in out["confirm"]:
        print(_line(target, pick, r), flush=True)
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from _results import commit, output

    from bh_helpers.routing.recorder import BoundWarning

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[4.0, 2.0], help="mean k targets")
    parser.add_argument("--gammas", type=float, nargs="+", default=[-1.0, -0.5, 0.5, 1.0],
                        help="exponents of the count (< 0: a token that used many experts before gets a tighter level)")
    parser.add_argument("--datasets", nargs="+", default=["prose", "code"])
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per data set and half")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--allocation-tokens", type=int, default=2048)
    parser.add_argument("--kmatch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/weighted_bh", help="cache of the bank and the static path")
    parser.add_argument("--json", nargs="?", const="scheme", default=None,
                        help="results JSON; without a value: benchmarks/results/weighted_bh_cpu_<commit>.json")
    args = parser.parse_args()
    args.json = output(args.json, "weighted_bh", device="cpu")
    torch.set_num_threads(args.threads)
    # layers whose static k_l is the floor run at alpha 1e-12, in (b) and (a) alike: expected, not news
    warnings.filterwarnings("ignore", category=BoundWarning)
    t0 = time.perf_counter()
    model, tok, bank, path, batches = _setup(args)
    scorer = Scorer(model, tok, path, tokens=args.tokens)
    print(HEADER, flush=True)
    report = {"commit": commit(), "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items()},
              "static_allocations": {str(s): list(ks) for s, ks in path.allocations.items()},
              "targets": [run_target(args, model, tok, bank, path, batches, scorer, t) for t in args.targets]}
    report["seconds"] = time.perf_counter() - t0
    print(f"{report['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
