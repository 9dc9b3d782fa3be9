"""Non-finite captured router logits are refused at every entry point that takes them (issue 25, class 6).

A float16 capture can overflow; a NaN or inf row in calibration logits used to pass quietly where
the finiteness check came after something that hid it: ``fit`` with ``trim > 0`` dropped the +inf
(and NaN, which sorts last) before checking, and ``alpha_for_mean_k``/``ComputeBudget``,
``saturation_table`` and the explorer never checked (a NaN p-value counts as no rejection). Now
one validator (:func:`bh_helpers._validate.check_finite_logits`) runs on the logits as given, at
the root of each entry point, and names the argument, the first bad row and the fix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bh_helpers._validate import check_finite_logits

BAD = [float("nan"), float("inf"), float("-inf")]
IDS = ["nan", "+inf", "-inf"]
FIX = r"re-capture them in float32.*drop the non-finite rows"
#: finite but no router logit: an edited or overflowed entry (one 3e38 moved a whole null before)
DAMAGED = [3e38, -1e5]
DAMAGED_FIX = r"has 1 value beyond \+-65504 .*the first in row 7\).*damaged value: drop the row or capture again"


@pytest.fixture(scope="module")
def bank():
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.nulls.bank import NullBank

    return NullBank.load(default_null_bank_dir("tiny"))


def _logits(value: float, *, rows: int = 600, experts: int = 64, bad_row: int = 7) -> torch.Tensor:
    """Random calibration logits ``(rows, experts)`` with ``value`` at one entry of row ``bad_row``."""
    x = torch.randn(rows, experts, generator=torch.Generator().manual_seed(0))
    x[bad_row, 3] = value
    return x


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("value", BAD, ids=IDS)
@pytest.mark.parametrize("statistic", ["raw", "centred", "zscore"])
def test_fit_with_trim_refuses_non_finite_logits(value, statistic):
    """The trim drops each token's largest values: it used to drop a +inf (or a NaN) before the check."""
    from bh_helpers.nulls.fit import fit_null, fit_null_bank

    with pytest.raises(ValueError, match=rf"`logits` has 1 NaN/inf values \(the first in row 7\).*{FIX}"):
        fit_null(_logits(value), statistic=statistic, trim=2)
    with pytest.raises(ValueError, match=r"`logits_by_layer\[2\]` has 1 NaN/inf"):
        fit_null_bank({0: _logits(0.0), 2: _logits(value)}, statistic=statistic, trim=2)


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("value", BAD, ids=IDS)
def test_fit_captured_with_trim_refuses_non_finite_logits(value):
    from bh_helpers.capture import CapturedLogits
    from bh_helpers.nulls.fit import fit_captured

    n = 600
    captured = CapturedLogits(logits={0: _logits(0.0), 1: _logits(value)}, token_ids=torch.zeros(n, dtype=torch.long),
                              positions=torch.arange(n), sequence_index=torch.zeros(n, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`logits_by_layer\[1\]` has 1 NaN/inf"):
        fit_captured(captured, statistic="zscore", trim=4)


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("value", BAD, ids=IDS)
@pytest.mark.parametrize("entry", ["alpha_for_mean_k", "ComputeBudget", "ComputeBudget max_tokens", "saturation_table",
                                   "RoutingExplorer"])
def test_alpha_by_compute_saturation_and_explorer_refuse_non_finite_logits(bank, value, entry):
    from bh_helpers.experiments.explorer import RoutingExplorer
    from bh_helpers.experiments.saturation import saturation_table
    from bh_helpers.selection.budget import ComputeBudget, alpha_for_mean_k

    logits = {layer: _logits(0.0) for layer in range(6)}
    logits[3] = _logits(value)
    name = r"`cached_logits\[3\]`" if entry == "RoutingExplorer" else r"`logits_by_layer\[3\]`"
    with pytest.raises(ValueError, match=rf"{name} has 1 NaN/inf values \(the first in row 7\).*{FIX}"):
        if entry == "alpha_for_mean_k":
            alpha_for_mean_k(bank, logits, 2.0)
        elif entry == "ComputeBudget":
            ComputeBudget(bank, logits).alpha(2.0, per_layer=True)
        elif entry == "ComputeBudget max_tokens":  # the evenly spaced subsample would skip row 7
            ComputeBudget(bank, logits, max_tokens=10).alpha(2.0)
        elif entry == "saturation_table":
            saturation_table(bank, logits, [0.05, 0.2])
        else:
            RoutingExplorer(logits, {"gaussian": bank}, list(range(600)))


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("value", DAMAGED)
@pytest.mark.parametrize("entry", ["fit_null", "fit_null trim", "fit_null_bank", "alpha_for_mean_k", "ComputeBudget",
                                   "saturation_table", "RoutingExplorer", "goodness_of_fit"])
def test_every_entry_refuses_a_finite_logit_beyond_float16(bank, value, entry):
    from bh_helpers.experiments.explorer import RoutingExplorer
    from bh_helpers.experiments.saturation import saturation_table
    from bh_helpers.nulls.diagnostics import goodness_of_fit
    from bh_helpers.nulls.fit import fit_null, fit_null_bank
    from bh_helpers.selection.budget import ComputeBudget, alpha_for_mean_k

    logits = {layer: _logits(0.0) for layer in range(6)}
    logits[3] = _logits(value)
    with pytest.raises(ValueError, match=DAMAGED_FIX):
        if entry.startswith("fit_null "):
            fit_null(logits[3], statistic="zscore", trim=2)
        elif entry == "fit_null":
            fit_null(logits[3])
        elif entry == "fit_null_bank":
            fit_null_bank(logits)
        elif entry == "alpha_for_mean_k":
            alpha_for_mean_k(bank, logits, 2.0)
        elif entry == "ComputeBudget":
            ComputeBudget(bank, logits, max_tokens=10).alpha(2.0)
        elif entry == "saturation_table":
            saturation_table(bank, logits, [0.05, 0.2])
        elif entry == "RoutingExplorer":
            RoutingExplorer(logits, {"gaussian": bank}, list(range(600)))
        else:
            goodness_of_fit(fit_null(_logits(0.0)), logits[3])


@pytest.mark.parametrize("value", BAD, ids=IDS)
def test_goodness_of_fit_refuses_non_finite_held_out_logits(value):
    from bh_helpers.nulls.diagnostics import goodness_of_fit
    from bh_helpers.nulls.fit import fit_null

    with pytest.raises(ValueError, match=rf"`held_out_logits` has 1 NaN/inf values \(the first in row 7\).*{FIX}"):
        goodness_of_fit(fit_null(_logits(0.0)), _logits(value))


@pytest.mark.parametrize("kind", ["tensor", "float16 tensor", "numpy", "list"])
def test_the_one_finiteness_check(kind):
    x = np.zeros((5, 4))
    x[2, 1], x[4, 0] = np.nan, np.inf
    given = {"tensor": torch.as_tensor(x), "float16 tensor": torch.as_tensor(x).half(), "numpy": x,
             "list": x.tolist()}[kind]
    with pytest.raises(ValueError, match=r"`calib` has 2 NaN/inf values \(the first in row 2\)"):
        check_finite_logits("calib", given)
    check_finite_logits("calib", np.nan_to_num(x, nan=0.0, posinf=1.0))  # finite: accepted
    check_finite_logits("calib", torch.tensor([-1.0, 1.0]))  # 1-D
    with pytest.raises(ValueError, match="`calib` must be a tensor or array of numbers"):
        check_finite_logits("calib", [["a", "b"]])


@pytest.mark.fault("mismatched null banks", "clear error")
def test_calibration_logits_of_other_layers_or_another_model_are_refused(bank, tiny_model_and_tokenizer, tmp_path,
                                                                         capsys):
    """alpha_for_mean_k / ComputeBudget took a capture of another model (alpha 1.2e-10) and a capture of layers
    the bank lacks (a KeyError) without a word; a sweep or report applied an alpha solved on 3 layers to all 6
    (issue 25 re-run). A subset through the API stays an alpha for those layers (route them with `layers=`)."""
    import copy

    from bh_helpers.app import cli
    from bh_helpers.capture import capture_router_logits
    from bh_helpers.selection.budget import ComputeBudget, alpha_for_mean_k

    model, tok = tiny_model_and_tokenizer
    batches = [tok(["calibration text for the layers check, " * 8], return_tensors="pt")]
    own = capture_router_logits(model, batches, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.model.layers:
            layer.mlp.gate.weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"`logits_by_layer` comes from another model than the bank \('tiny'\): "
                                         r"their routers \(weights or routing settings\) differ at layers "
                                         r"\[0, 1, 2, 3, 4, 5\]"):
        alpha_for_mean_k(bank, capture_router_logits(other, batches, progress=False), 2.0)
    shifted = {layer + 1: x for layer, x in own.items()}
    with pytest.raises(ValueError, match=r"holds layers \[1, 2, 3, 4, 5, 6\], but the bank has nulls for layers "
                                         r"\[0, 1, 2, 3, 4, 5\]"):
        ComputeBudget(bank, shifted)
    assert 0 < alpha_for_mean_k(bank, {layer: own[layer] for layer in (0, 1, 2)}, 2.0) <= 1  # the API's subset
    three = type(own)({layer: own[layer] for layer in (0, 1, 2)}, own.token_ids, own.positions, own.sequence_index,
                      own.total_tokens, router_fingerprint=own.router_fingerprint)
    three.save(tmp_path / "only3.safetensors")
    argv = ["sweep", "--results", str(tmp_path / "s.jsonl"), "--captured", str(tmp_path / "only3.safetensors"),
            "--mean-ks", "2.0", "--alphas", "", "--topk-max", "1", "--top-ps", "", "--datasets", "prose",
            "--no-controls", "--max-tokens", "64", "--window", "64", "--stride", "64", "--no-progress"]
    assert cli.main(argv) == 2 and not (tmp_path / "s.jsonl").exists()
    assert capsys.readouterr().err.startswith("bh-routing: error: --captured holds layers [0, 1, 2], but the bank has "
                                              "nulls for layers [0, 1, 2, 3, 4, 5]: an alpha is solved on the layers "
                                              "it routes (all of them)")
