"""Adaptive FDR: one alpha per layer, in selectors, ``route``, the compute rule, sweeps and the CLI.

Oracles: brute-force per-layer BH (statsmodels' ``multipletests`` row by row at each layer's
level), each layer's own scalar-alpha selection, and a bisection checked by counting directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from statsmodels.stats.multitest import multipletests

from bh_helpers.experiments.configs import SweepConfig
from bh_helpers.experiments.grids import sweep_grid
from bh_helpers.routing.patch import route
from bh_helpers.selection.budget import ComputeBudget, alpha_at, layer_alphas
from bh_helpers.selection.reference import fdr_counts
from bh_helpers.selection.selectors import BHSelector


@pytest.fixture(scope="module")
def bank():
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.nulls.bank import NullBank

    return NullBank.load(default_null_bank_dir("tiny"))


def test_layer_alphas_normalises_and_refuses():
    assert layer_alphas(0.1) == 0.1
    assert layer_alphas([0.2, 0.1]) == {0: 0.2, 1: 0.1}
    assert layer_alphas({3: 0.05, 1: 1}) == {3: 0.05, 1: 1.0}
    assert alpha_at({0: 0.2, 1: 0.1}, 1) == 0.1 and alpha_at(0.3, 7) == 0.3
    with pytest.raises(ValueError, match="no level for layer 2"):
        alpha_at({0: 0.2, 1: 0.1}, 2)
    with pytest.raises(ValueError, match=r"`alpha\[1\]`"):
        layer_alphas([0.1, 0.0])
    with pytest.raises(ValueError, match="layer numbers"):
        layer_alphas({"a": 0.1})
    with pytest.raises(ValueError, match="no level"):
        layer_alphas([])


def test_per_layer_selector_equals_brute_force_bh_per_layer(bank):
    """Each layer's counts are statsmodels' BH rejections at that layer's level, row by row."""
    levels = [0.9 - 0.05 * layer for layer in range(len(list(bank)))]
    selector = BHSelector(bank, alpha=levels, min_k=0, max_k=64)
    g = torch.Generator().manual_seed(0)
    for layer in bank:
        x = torch.randn(60, 64, generator=g) * 2.5
        p = bank.pvalues(x, layer).double().numpy()
        expected = [int(multipletests(row, alpha=levels[layer], method="fdr_bh")[0].sum()) for row in p]
        assert selector(x, layer).counts.tolist() == expected, layer


@pytest.mark.fault("bad arguments", "clear error")
def test_route_with_per_layer_alpha_on_the_tiny_model(tiny_model_and_tokenizer, bank):
    """Route with a loose level in early layers and a strict one later: each layer's mean k is
    what a per-call scalar-alpha selector (an independent second implementation) gives."""
    from bh_helpers.selection.fused import select_from_bank

    model, tok = tiny_model_and_tokenizer
    layers = sorted(bank)
    levels = {layer: (0.9 if layer < len(layers) // 2 else 1e-4) for layer in layers}
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    with torch.no_grad(), route(model, BHSelector(bank, alpha=levels, max_k=8)) as rec:
        model(ids)

    def by_hand(logits, layer):
        return select_from_bank(logits, bank, layer, method="bh", alpha=levels[layer], min_k=1, max_k=8)

    by_hand.max_k = 8
    with torch.no_grad(), route(model, by_hand) as rec2:
        model(ids)
    got = {layer: s["mean_k"] for layer, s in rec.summary()["per_layer"].items()}
    assert got == {layer: s["mean_k"] for layer, s in rec2.summary()["per_layer"].items()}
    assert min(got[layer] for layer in layers if levels[layer] == 0.9) > max(
        got[layer] for layer in layers if levels[layer] == 1e-4)
    with pytest.raises(ValueError, match=r"`alpha` has no level for MoE layers \[1"):
        with route(model, BHSelector(bank, alpha={0: 0.1})):
            pass


def test_compute_rule_reaches_a_target_per_layer(bank):
    """target_mean_k as {layer: target}: each layer reaches its own target, and the alpha is
    the smallest that does (one bisection step lower falls short)."""
    g = torch.Generator().manual_seed(5)
    logits = {layer: torch.randn(2000, 64, generator=g) * 1.6 for layer in bank}
    targets = {layer: 1.5 + 0.5 * layer for layer in bank}
    found = ComputeBudget(bank, logits).alpha(targets, method="bh", min_k=1, max_k=8)
    for layer, alpha in found.items():
        p = bank.pvalues(logits[layer], layer)
        k = float(fdr_counts(p, alpha, "bh").clamp(1, 8).double().mean())
        below = float(fdr_counts(p, alpha * (1 - 1e-6), "bh").clamp(1, 8).double().mean())
        assert k >= targets[layer] - 1e-12 and abs(k - targets[layer]) < 0.05, (layer, k)
        assert below <= k
    with pytest.raises(ValueError, match="one target for each calibration layer"):
        ComputeBudget(bank, logits).alpha({0: 2.0})
    with pytest.raises(ValueError, match=r"target_mean_k\[1\]"):
        ComputeBudget(bank, logits).alpha({layer: ("x" if layer == 1 else 2.0) for layer in bank})


@pytest.mark.fault("bad arguments", "clear error")
def test_sweep_config_with_layer_alphas():
    c = SweepConfig("bh", layer_alphas=[0.2, 0.1, 0.05], max_k=8, min_k=1, kernel="gaussian")
    assert c.layer_alphas == (0.2, 0.1, 0.05) and c.level() == (0.2, 0.1, 0.05)
    assert c.label() == "bh a=0.05..0.2/layer k=1..8 gaussian"
    assert SweepConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    scalar = SweepConfig("bh", alpha=0.1, max_k=8, min_k=1, kernel="gaussian")
    assert "layer_alphas" not in json.dumps({k: v for k, v in scalar.to_dict().items() if v is not None})
    with pytest.raises(ValueError, match="not both"):
        SweepConfig("bh", alpha=0.1, layer_alphas=[0.1], max_k=8, min_k=1, kernel="gaussian")
    with pytest.raises(ValueError, match="needs `alpha`"):
        SweepConfig("bh", max_k=8, min_k=1, kernel="gaussian")
    with pytest.raises(ValueError, match=r"layer_alphas\[1\]"):
        SweepConfig("bh", layer_alphas=[0.1, 1.5], max_k=8, min_k=1, kernel="gaussian")
    with pytest.raises(ValueError, match="does not use `layer_alphas`"):
        SweepConfig("topk", k=2, layer_alphas=[0.1])
    with pytest.raises(ValueError, match="one alpha per layer"):
        c.selector_kwargs()


def test_sweep_grid_per_layer_targets(bank):
    g = torch.Generator().manual_seed(1)
    calibration = {layer: torch.randn(1500, 64, generator=g) * 1.6 for layer in bank}
    common = dict(banks={"gaussian": bank}, calibration=calibration, methods=("bh",), alphas=(), mean_ks=(3.0,),
                  max_ks=(8,), min_ks=(1,), topk_max=2, top_ps=(), controls=False)
    both = [c for c in sweep_grid(**common, layer_targets="both", layer_alphas=[[0.5] * len(calibration)])
            if c.method == "bh"]
    assert [c.alpha is None for c in both] == [False, True, True]
    per_layer = both[2]
    budget = ComputeBudget(bank, calibration)
    for layer, level in enumerate(per_layer.layer_alphas):
        k = float(fdr_counts(budget.sorted_p[layer], level, "bh").clamp(1, 8).double().mean())
        assert abs(k - 3.0) < 0.05, (layer, k)
    with pytest.raises(ValueError, match="layer_targets"):
        sweep_grid(**common, layer_targets="everywhere")


@pytest.mark.fault("bad arguments", "clear error")
def test_cli_layer_alphas_file(tmp_path, capsys):
    from bh_helpers.app import cli
    from bh_helpers.experiments.sweep import load_results

    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps([[0.9] * 3 + [0.01] * 3, [0.5] * 6]))
    results = tmp_path / "s.jsonl"
    rc = cli.main(["sweep", "--results", str(results), "--layer-alphas", str(levels), "--mean-ks", "", "--methods", "bh",
                   "--min-ks", "1", "--topk-max", "2", "--top-ps", "", "--no-controls", "--datasets", "prose",
                   "--max-tokens", "128", "--window", "128", "--stride", "128", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    df = load_results(results)
    rows = df[df["method"] == "bh"]
    assert rows["label"].tolist() == ["bh a=0.01..0.9/layer k=1..8 gaussian", "bh a=0.5..0.5/layer k=1..8 gaussian"]
    early = [rows.iloc[0][f"per_layer_mean_k.{layer}"] for layer in range(6)]
    assert min(early[:3]) > max(early[3:])
    for bad, needle in (("[0.1, 2]", "levels in (0, 1]"), ("{", "cannot read")):
        levels.write_text(bad)
        with pytest.raises(SystemExit) as exited:  # argparse's own refusal: usage and one line, exit 2
            cli.main(["sweep", "--results", str(tmp_path / "t.jsonl"), "--layer-alphas", str(levels)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--layer-alphas" in err and needle in err and "Traceback" not in err
