"""The arithmetic of the GPU benchmarks, checked on CPU: the k-scaling line fit and the T4
projection of the notebooks' wall time (the GPU runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import k_scaling  # noqa: E402
import t4_projection  # noqa: E402


def test_fit_line_matches_numpy_polyfit():
    ks, ts = [1, 2, 4, 6, 8], [34.4, 34.9, 35.6, 35.9, 35.7]
    a, b = k_scaling.fit_line(ks, ts)
    slope, intercept = np.polyfit(ks, ts, 1)
    assert (a, b) == pytest.approx((intercept, slope), rel=1e-12)


def test_notebook_projection_scales_by_the_largest_prefill_ratio():
    rows = {"prefill 8x256 | native top-8": {"t4_projected_ms": 240.0, "measured_wall_ms": 60.0},  # 4x
            "prefill 8x256 | top-8": {"t4_projected_ms": 250.0, "measured_wall_ms": 40.0},  # 6.25x: the largest
            "prefill 32x1024 | top-8": {"t4_projected_ms": 3000.0, "measured_wall_ms": 250.0}}  # 12x, other size
    emulation = {"meta": {"gpu": "NVIDIA H100 80GB HBM3"},
                 "steps": {"notebooks": {"eval_datasets": "prose", "notebooks": {
                     "03_online_bh_routing": {"returncode": 0, "wall_s": 120.0}}}}}
    out = t4_projection.notebook_projection(emulation, rows)
    assert out["factor_used"] == 6.25 and out["factors"] == {"native top-8": 4.0, "top-8": 6.25}
    assert out["notebooks"]["03_online_bh_routing"] == {"returncode": 0, "emulated_wall_s": 120.0,
                                                         "projected_t4_wall_s": 750.0}
    text = t4_projection.render({"paths": {}, "notebooks": out})
    assert "| 03_online_bh_routing | 0 | 2.0 | 12.5 |" in text and "upper bound" in text
    # never projected faster than measured, and no prefill profile is an error, not a zero
    fast = {"prefill 8x256 | top-8": {"t4_projected_ms": 10.0, "measured_wall_ms": 40.0}}
    assert t4_projection.notebook_projection(emulation, fast)["factor_used"] == 1.0
    assert "error" in t4_projection.notebook_projection(emulation, {})


def test_summarise_reports_the_logit_screen_cost_from_paired_rounds():
    """The screen's cost is the median of per-round ratios top-8 / top-8 without the screen, minus 1."""
    times = {"top-8": [0.0102, 0.0101, 0.0110], k_scaling.NO_SCREEN: [0.0100, 0.0100, 0.0100],
             "native top-8": [0.0200, 0.0200, 0.0200]}
    raw = {"times_s": {"prefill 8x256": times}, "blocks_ms": {}, "errors": {}}
    row = k_scaling.summarise(raw)["prefill 8x256"]
    ratios = sorted(a / b for a, b in zip(times["top-8"], times[k_scaling.NO_SCREEN]))
    assert row["logit_screen_cost"] == pytest.approx(ratios[1] - 1, abs=1e-4)  # 2 %, the middle round
    assert row["x_native"]["top-8"] == pytest.approx(0.0200 / 0.0102, abs=1e-4)
