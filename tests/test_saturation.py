"""max_k saturation: against a hand-built table and against direct counting on the tiny model's bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bh_helpers.experiments.saturation import saturation_from_counts, saturation_points, saturation_table
from bh_helpers.selection.reference import select_experts


def test_saturation_from_hand_built_counts():
    # uncapped counts of 8 token-layers at two levels, min_k=1
    counts = {0.05: [0, 1, 1, 2, 2, 3, 5, 9], 0.5: [3, 4, 6, 8, 12, 20, 30, 40]}
    table = saturation_from_counts(counts, [2, 4, 8, 16, 32], min_k=1)
    by = {(r.alpha, r.max_k): (r.mean_k, r.ceiling_rate) for r in table.itertuples()}
    # alpha 0.05, max_k 2: clamp -> [1,1,1,2,2,2,2,2] = 13/8; at or above 2: 5 of 8
    assert by[(0.05, 2)] == (13 / 8, 5 / 8)
    assert by[(0.05, 4)] == ((1 + 1 + 1 + 2 + 2 + 3 + 4 + 4) / 8, 2 / 8)
    assert by[(0.05, 8)] == ((1 + 1 + 1 + 2 + 2 + 3 + 5 + 8) / 8, 1 / 8)
    assert by[(0.05, 16)] == by[(0.05, 32)] == ((1 + 1 + 1 + 2 + 2 + 3 + 5 + 9) / 8, 0.0)
    assert by[(0.5, 8)] == ((3 + 4 + 6 + 8 + 8 + 8 + 8 + 8) / 8, 5 / 8)
    assert by[(0.5, 32)] == ((3 + 4 + 6 + 8 + 12 + 20 + 30 + 32) / 8, 1 / 8)
    points = saturation_points(table).set_index("alpha")
    # 0.05: 24/8=3.0 at 16; at 8 it is 23/8 (3.0 / 2.875 - 1 = 4.3% < 5%), at 4: 18/8 (33% more)
    assert points.loc[0.05, "saturation_max_k"] == 8
    # 0.5: 115/8 at 32; at 16: 3+4+6+8+12+16+16+16 = 81 -> 42% more: only 32 itself
    assert points.loc[0.5, "saturation_max_k"] == 32
    assert points.loc[0.5, "mean_k_at_largest"] == 115 / 8
    assert saturation_points(table, threshold=0.5).set_index("alpha").loc[0.5, "saturation_max_k"] == 16


@pytest.mark.fault("bad arguments", "clear error")
def test_saturation_bad_arguments():
    with pytest.raises(ValueError, match="increasing"):
        saturation_from_counts({0.1: [1, 2]}, [4, 2])
    with pytest.raises(ValueError, match="min_k"):
        saturation_from_counts({0.1: [1, 2]}, [1, 2], min_k=2)
    with pytest.raises(ValueError, match="threshold"):
        saturation_points(saturation_from_counts({0.1: [1, 2]}, [2, 4]), threshold=1.5)


def test_saturation_table_equals_selection_at_each_ceiling(tiny_model_and_tokenizer):
    """Mean k at each ceiling is the mean count of select_experts with that max_k."""
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.nulls.bank import NullBank

    bank = NullBank.load(default_null_bank_dir("tiny"))
    g = torch.Generator().manual_seed(2)
    logits = {layer: torch.randn(500, 64, generator=g) * 2.0 for layer in bank}
    table = saturation_table(bank, logits, [0.05, 0.9], min_k=1, max_tokens=None)
    assert sorted(table["max_k"].unique()) == [2, 4, 8, 16, 32, 64]
    for row in table.itertuples():
        counts = torch.cat([select_experts(x, bank.pvalues(x, layer), alpha=row.alpha, min_k=1, max_k=row.max_k).counts
                            for layer, x in logits.items()])
        assert row.mean_k == pytest.approx(float(counts.double().mean()), abs=1e-12)
    assert (np.diff(table[table["alpha"] == 0.9].sort_values("max_k")["mean_k"]) >= 0).all()
    with pytest.raises(ValueError, match="64 experts"):
        saturation_table(bank, logits, [0.1], max_ks=[8, 128])
