"""Task accuracy beside perplexity (issue 27, item 6): last-word and multiple-choice accuracy of each
verdict row and of its strongest control, against direct scoring on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bh_helpers.evaluation import tasks
from bh_helpers.experiments.task_accuracy import (
    TASKS,
    paired_accuracy_interval,
    task_accuracy_table,
    task_fixtures,
)
from bh_helpers.report.verdict import task_accuracy_markdown

LAMBADA = [
    "The quick brown fox jumps over the lazy dog",
    "every token picks a few experts",
    "She opened the door and saw the garden",
    "Benjamini and Hochberg control the false discovery rate",
    "Numbers like 12, 345 and 6789",
]


# --------------------------------------------------------------------------- last-word accuracy


def test_split_last_word():
    assert tasks.split_last_word("a b  c ") == ("a b", "  c")
    assert tasks.split_last_word("one\ntwo") == ("one", "\ntwo")
    with pytest.raises(ValueError, match="two words"):
        tasks.split_last_word("single")


def _greedy(model, ctx_ids, n):
    out = model.generate(torch.tensor([ctx_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ctx_ids):].tolist()


def test_last_word_equals_greedy_generate(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    examples = [{"text": t} for t in LAMBADA]
    # Positive examples by construction: the target is the model's own greedy continuation.
    for text in LAMBADA:
        ctx = text.rsplit(" ", 1)[0]
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        gen = _greedy(model, ctx_ids, 1)
        target = tok.decode(gen)
        if tok(target, add_special_tokens=False).input_ids == gen:
            examples.append({"context": ctx, "target": target})
    assert len(examples) > len(LAMBADA), "no positive example could be constructed"
    res = tasks.last_word_accuracy(model, tok, examples, batch_size=3, progress=False)
    assert res.n_examples == len(examples)
    for ex, correct in zip(examples, res.correct):
        ctx, target = tasks._last_word_pair(ex)
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        tgt_ids = tok(target, add_special_tokens=False).input_ids
        assert correct == (_greedy(model, ctx_ids, len(tgt_ids)) == tgt_ids)
    assert all(res.correct[len(LAMBADA):])
    assert res.accuracy == pytest.approx(sum(res.correct) / len(examples))


def test_last_word_nll_matches_bruteforce(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    res = tasks.last_word_accuracy(model, tok, LAMBADA, batch_size=4, progress=False)
    for text, nll in zip(LAMBADA, res.target_nll):
        ctx, target = tasks.split_last_word(text)
        c = tok(ctx, add_special_tokens=False).input_ids
        t = tok(target, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([c + t])).logits[0].double()
        ref = F.cross_entropy(logits[len(c) - 1: -1], torch.tensor(t), reduction="sum")
        assert nll == pytest.approx(float(ref), rel=1e-5)


# --------------------------------------------------------------------------- the paired interval


def test_paired_accuracy_interval_is_scipys_paired_t_interval():
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 70).astype(float), rng.random(70)
    delta, low, high = paired_accuracy_interval(a, b)
    ci = ttest_rel(a, b).confidence_interval(0.95)
    assert delta == pytest.approx(a.mean() - b.mean())
    assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert paired_accuracy_interval([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="at least 2 paired examples"):
        paired_accuracy_interval([1.0], [0.0])


# --------------------------------------------------------------------------- the table


@pytest.fixture(scope="module")
def small_sweep(tiny_model_and_tokenizer, tmp_path_factory):
    """A BH row with its three controls on 4 windows of prose, and a static path up to k 3."""
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.experiments.configs import SweepConfig, with_controls
    from bh_helpers.experiments.evaluate import perplexity_sweep
    from bh_helpers.experiments.static_allocation import static_allocation_path
    from bh_helpers.nulls.bank import NullBank

    model, tok = tiny_model_and_tokenizer
    bank = NullBank.load(default_null_bank_dir("tiny"))
    path = static_allocation_path(model, tok, texts=LAMBADA, max_k=3, window=32, batch_size=4)
    configs = with_controls([SweepConfig("bh", alpha=0.5, min_k=1, max_k=3, kernel=bank.metadata.kernel)])
    results = perplexity_sweep(model, tok, configs, null_bank=bank, results_path=tmp_path_factory.mktemp("t") / "s.jsonl",
                               datasets=["prose"], max_tokens=4 * 64, window=64, stride=64, static_path=path,
                               progress=False)
    fixtures = {task: examples[:12] for task, examples in task_fixtures().items()}
    return bank, path, results, fixtures


@pytest.mark.parametrize("strongest", ["mixed", "shuffled", "static_chord"])
def test_task_table_scores_the_row_and_its_strongest_control(tiny_model_and_tokenizer, small_sweep, strongest):
    """Each row's accuracies equal direct scoring of the configuration and of its strongest control
    at the compute the configuration reached on the fixtures (the chord: its allocations' weighted mean)."""
    from bh_helpers.experiments.comparison import compare_with_controls
    from bh_helpers.experiments.configs import config_of
    from bh_helpers.routing.patch import route
    from bh_helpers.selection.controls import MixedTopKSelector, ShuffledSelector
    from bh_helpers.selection.static import StaticLayerSelector

    model, tok = tiny_model_and_tokenizer
    bank, path, results, fixtures = small_sweep
    comparison = compare_with_controls(results)
    comparison["strongest"] = strongest  # each control kind in turn, whichever won on perplexity
    table = task_accuracy_table(model, tok, results, null_bank=bank, static_path=path, comparison=comparison,
                                fixtures=fixtures)
    assert list(table["task"]) == list(TASKS) and set(table["strongest"]) == {strongest}
    assert (table["n_examples"] == 12).all()

    def direct(selector):
        with route(model, selector) as rec:
            lw = tasks.last_word_accuracy(model, tok, fixtures["last word"], progress=False)
            mc = tasks.multiple_choice_accuracy(model, tok, fixtures["multiple choice"], progress=False)
        per_layer = {layer: s["mean_k"] for layer, s in rec.summary()["per_layer"].items()}
        return {"last word": np.array(lw.correct, float), "multiple choice": np.array(mc.correct, float)}, per_layer

    config = config_of(results, comparison["key"].iloc[0])
    adaptive = config.to_selector(model, null_bank=bank, weights="softmax")
    own, per_layer = direct(adaptive)
    mean_k = sum(per_layer.values()) / len(per_layer)
    if strongest == "mixed":
        control, _ = direct(MixedTopKSelector(per_layer, seed=0, max_k=3, weights="softmax"))
    elif strongest == "shuffled":
        control, _ = direct(ShuffledSelector(adaptive, seed=0, weights="softmax"))
    else:
        parts = path.chord(mean_k)
        scored = [(direct(StaticLayerSelector(dict(zip(path.layers, ks)), weights="softmax"))[0], p) for ks, p in parts]
        control = {task: sum(p * s[task] for s, p in scored) for task in TASKS}
    for _, row in table.iterrows():
        assert row["mean_k"] == pytest.approx(mean_k)
        assert row["accuracy"] == pytest.approx(own[row["task"]].mean())
        assert row["control_accuracy"] == pytest.approx(control[row["task"]].mean())
        assert (row["delta"], row["ci_low"], row["ci_high"]) == pytest.approx(
            paired_accuracy_interval(own[row["task"]], control[row["task"]]))
    text = task_accuracy_markdown(table)
    assert "last word 12 examples" in text and "multiple choice 12 examples" in text


def test_task_markdown_says_when_the_fixtures_cannot_tell():
    import pandas as pd

    base = {"dataset": "code:confirm", "key": "k", "label": "bh a=0.1 k=1..8 gaussian", "strongest": "mixed",
            "n_examples": 70, "mean_k": 4.0, "control_mean_k": 4.0, "accuracy": 0.5, "control_accuracy": 0.45}
    table = pd.DataFrame([{**base, "task": "last word", "delta": 0.05, "ci_low": -0.05, "ci_high": 0.15},
                          {**base, "task": "multiple choice", "delta": 0.2, "ci_low": 0.1, "ci_high": 0.3}])
    text = task_accuracy_markdown(table)
    assert "| too few examples to tell |" in text and "| better |" in text
    assert "of 2 (row, task) pairs, 1 were better, 0 worse and 1 could not be told apart" in text
    assert task_accuracy_markdown(table.iloc[:0]).startswith("(no verdict rows")


def test_task_table_refuses_fixtures_of_other_tasks(tiny_model_and_tokenizer, small_sweep):
    model, tok = tiny_model_and_tokenizer
    bank, path, results, _ = small_sweep
    with pytest.raises(ValueError, match="`fixtures` must hold examples for the tasks"):
        task_accuracy_table(model, tok, results, null_bank=bank, static_path=path, fixtures={"lambada": []})
