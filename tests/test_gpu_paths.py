"""Fast paths (fused selector, grouped dispatch) against the plain-torch references.

GPU tests are skipped cleanly without CUDA. On CPU: the grouped dispatch variants (CPU
``torch._grouped_mm`` where this torch has it), the automatic fallbacks, and the Triton selector
kernel under Triton's interpreter (in a subprocess, since ``TRITON_INTERPRET`` is read at import).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bh_helpers.routing.auto import fast_dispatch_experts
from bh_helpers.routing.dispatch import dispatch_experts
from bh_helpers.selection.fused import fused_select_experts, select_with_null
from bh_helpers.routing.grouped import (
    _dispatch_compact,
    _dispatch_sync_free,
    grouped_dispatch_experts,
)
from bh_helpers.nulls.fit import fit_null
from bh_helpers.selection.reference import FDR_METHODS, select_experts

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def make_experts(num_experts=8, hidden=64, inter=32, dtype=torch.float32, device="cpu", seed=0):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    cfg = OlmoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=num_experts, num_experts_per_tok=2)
    experts = OlmoeExperts(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.1)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.1)
    return experts.to(device=device, dtype=dtype)


def random_selection(tokens, k, num_experts, *, seed, device="cpu", skew=False):
    """Variable-k selection: distinct experts per token, -1 at unused slots, one row with none."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=g)
    if skew:  # most tokens to few experts, some experts empty
        scores[:, : num_experts // 2] += 2.0
    idx = scores.topk(k, dim=-1).indices
    counts = torch.randint(0, k + 1, (tokens,), generator=g)
    counts[0] = 0
    counts[-1] = k
    used = torch.arange(k) < counts[:, None]
    idx = torch.where(used, idx, -1)
    w = torch.rand(tokens, k, generator=g) * used
    return idx.to(device), w.to(device)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------


def test_fast_dispatch_falls_back_to_reference_on_cpu():
    experts = make_experts()
    hidden = torch.randn(37, 64)
    idx, w = random_selection(37, 4, 8, seed=1)
    torch.testing.assert_close(fast_dispatch_experts(experts, hidden, idx, w), dispatch_experts(experts, hidden, idx, w))
    with pytest.raises(ValueError, match="grouped GEMMs need CUDA"):
        grouped_dispatch_experts(experts, hidden, idx, w)


def _cpu_grouped_mm() -> bool:
    try:
        torch._grouped_mm(torch.randn(4, 16), torch.randn(2, 16, 16), offs=torch.tensor([2, 4], dtype=torch.int32))
        return True
    except Exception:  # noqa: BLE001 - any failure means: not available here
        return False


@pytest.mark.skipif(not _cpu_grouped_mm(), reason="this torch has no CPU torch._grouped_mm")
@pytest.mark.parametrize("variant", [_dispatch_sync_free, _dispatch_compact])
@pytest.mark.parametrize("skew", [False, True])
def test_grouped_variants_match_reference_on_cpu(variant, skew):
    experts = make_experts()
    hidden = torch.randn(53, 64)
    idx, w = random_selection(53, 6, 8, seed=2, skew=skew)
    out = variant(experts, hidden, idx, w)
    ref = dispatch_experts(experts, hidden, idx, w)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-4  # float32 GEMMs summed in another order
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # the token with no expert


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreter)")
def test_fused_kernel_under_interpreter_matches_reference():
    code = textwrap.dedent(
        """
        import torch
        from bh_helpers.nulls.fit import fit_null
        from bh_helpers.selection.reference import select_experts
        from bh_helpers.selection.fused import select_with_null, fused_select_experts, fused_available
        from bh_helpers.selection.fused_tables import float_from_ordered, logit_cuts, ordered_from_float
        assert fused_available("cpu")
        g = torch.Generator().manual_seed(0)
        null = fit_null(torch.randn(5000, 64, generator=g) * 1.5)
        x = torch.randn(12, 64, generator=g) * 2
        x[0] *= 5; x[1, :10] = x[1, 10]; x[2] = 0.0; x[2, 3] = -0.0
        # rows on the logit cuts and one float32 below them: decisions flip exactly there
        cut = logit_cuts(null, "bh", 0.1, 64, 64, torch.device("cpu"))
        x[3] = cut[torch.randperm(64, generator=g)]
        x[4] = float_from_ordered(ordered_from_float(cut) - 1)[torch.randperm(64, generator=g)]
        x[5] = -10.0; x[5, :3] = cut[:3]; x[5, 3] = float_from_ordered(ordered_from_float(cut[3]) - 1)
        p = null.sf(x, dtype=torch.float32)
        assert select_experts(x, p, method="bh", alpha=0.1, min_k=0).counts[3:6].tolist() == [8, 0, 3]
        for method in ("bh", "holm"):
            ref = select_experts(x, p, method=method, alpha=0.1, min_k=0, max_k=8)
            for got in (select_with_null(x, null, method=method, alpha=0.1, min_k=0),
                        fused_select_experts(x, p, method=method, alpha=0.1, min_k=0)):
                assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts)
                torch.testing.assert_close(got.weights, ref.weights)
        # per-expert null (p-value lookup in the kernel), 48 experts (padded to 64 lanes)
        xe = x[:, :48].contiguous()
        null_e = fit_null(torch.randn(3000, 48, generator=g) * 1.5, per_expert=True)
        ref = select_experts(xe, null_e.sf(xe, dtype=torch.float32), method="by", alpha=0.3, max_k=6, weights="uniform")
        got = select_with_null(xe, null_e, method="by", alpha=0.3, max_k=6, weights="uniform")
        assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts)
        torch.testing.assert_close(got.weights, ref.weights)
        # inverse-p weights: p-values of the chosen experts in the kernel (pooled null: the lookup
        # kernel instead of the cuts), and given p-values with zeros (1/p would overflow)
        for nl, xx in ((null, x), (null_e, xe)):
            pp = nl.sf(xx, dtype=torch.float32)
            ref = select_experts(xx, pp, method="bh", alpha=0.3, max_k=6, weights="inverse_p")
            got = select_with_null(xx, nl, method="bh", alpha=0.3, max_k=6, weights="inverse_p")
            assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts)
            torch.testing.assert_close(got.weights, ref.weights)
        pz = p.clone(); pz[0, :4] = 0.0; pz[1, :2] = 1e-39
        ref = select_experts(x, pz, method="holm", alpha=0.3, max_k=6, weights="inverse_p")
        got = fused_select_experts(x, pz, method="holm", alpha=0.3, max_k=6, weights="inverse_p")
        assert torch.equal(got.indices, ref.indices) and bool(torch.isfinite(got.weights).all())
        torch.testing.assert_close(got.weights, ref.weights)
        ref = select_experts(xe.bfloat16(), method="topk", k=8, weights="softmax", temperature=0.7)
        got = fused_select_experts(xe.bfloat16(), method="topk", k=8, weights="softmax", temperature=0.7)
        assert torch.equal(got.indices, ref.indices)
        torch.testing.assert_close(got.weights, ref.weights)
        # cached launch plans never admit what the checks refuse (True == 1 and 2.0 == 2 hash alike)
        fused_select_experts(x, method="topk", k=1, max_k=2)
        for bad in (dict(k=True, max_k=2), dict(k=1, max_k=2.0)):
            try:
                fused_select_experts(x, method="topk", **bad)
            except TypeError as err:
                assert "must be an integer" in str(err)
            else:
                raise AssertionError(bad)
        select_with_null(x, null, method="bh", alpha=1, min_k=1)
        try:
            select_with_null(x, null, method="bh", alpha=True, min_k=1)  # True == 1 hashes alike
        except TypeError as err:
            assert "must be a number" in str(err)
        else:
            raise AssertionError("alpha=True accepted from a cached plan")
        select_with_null(x, null, method="bh", alpha=0.1, min_k=1)
        try:
            select_with_null(x, null, method="bh", alpha=0.1, min_k=True)
        except TypeError as err:
            assert "must be an integer" in str(err)
        else:
            raise AssertionError("min_k=True accepted")
        print("OK")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreter)")
def test_fused_statistics_under_interpreter_match_reference():
    """Centred and z-score statistics in the sorted kernel (CPU oracle of the CUDA path)."""
    code = textwrap.dedent(
        """
        import torch
        from bh_helpers.nulls.fit import fit_null
        from bh_helpers.nulls.statistics import apply_statistic
        from bh_helpers.selection.reference import select_experts
        from bh_helpers.selection.fused import select_with_null
        g = torch.Generator().manual_seed(0)
        calib = torch.randn(5000, 64, generator=g) * 1.5 + torch.randn(5000, 1, generator=g)
        x = torch.randn(40, 64, generator=g) * 2 + torch.randn(40, 1, generator=g) * 3
        x[0] = 1.0  # constant row: statistic 0 everywhere
        for statistic in ("centred", "zscore"):
            null = fit_null(calib, statistic=statistic)
            p = null.sf(apply_statistic(x, statistic), dtype=torch.float32)
            for method, weights in (("bh", "renorm"), ("holm", "renorm"), ("bh", "inverse_p")):
                ref = select_experts(x, p, method=method, alpha=0.3, min_k=0, max_k=8, weights=weights)
                got = select_with_null(x, null, method=method, alpha=0.3, min_k=0, max_k=8, weights=weights)
                assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts), statistic
                torch.testing.assert_close(got.weights, ref.weights)
            assert 0 < int(ref.counts.sum()) < 40 * 8
        print("OK")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("kernel", ["gaussian", "empirical", "tophat"])
@pytest.mark.parametrize("method", FDR_METHODS)
def test_logit_cuts_reproduce_pvalue_tests_exactly(kernel, method):
    """Pooled null: "sf(x) <= t_i" is "x >= c_i" for EVERY float32 x near each cut and across the range.

    Oracle: the reference ``NullModel.sf`` in float32 compared with the float64 thresholds of
    ``fdr_counts``, evaluated on dense runs of consecutive float32 values around each cut.
    """
    from bh_helpers.selection.fused_tables import float_from_ordered, logit_cuts, ordered_from_float
    from bh_helpers.selection.reference import _thresholds_np

    g = torch.Generator().manual_seed(2)
    null = fit_null(torch.randn(4000, 16, generator=g) * 1.4 + 0.3, kernel=kernel)
    m, alpha = 64, 0.3
    cut = logit_cuts(null, method, alpha, m, 128, torch.device("cpu"))
    assert cut.shape == (128,) and cut.dtype == torch.float32
    assert torch.isnan(cut[m:]).all() and torch.isfinite(cut[:m]).all()
    t64 = torch.from_numpy(_thresholds_np(method, alpha, m))  # (m,)
    s = ordered_from_float(cut[:m])  # (m,)
    around = s[:, None] + torch.arange(-2000, 2001)  # (m, 4001) consecutive float32 values
    wide = torch.cat([torch.linspace(-60, 60, 20001), torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    for x in (float_from_ordered(around), wide.expand(m, -1)):
        passes = null.sf(x, dtype=torch.float32).double() <= t64[:, None]
        assert torch.equal(passes, x >= cut[:m, None])
    # the sweep crosses each cut: the cut passes, the float32 just below it does not
    assert torch.equal(float_from_ordered(s), cut[:m])
    assert (null.sf(float_from_ordered(s - 1), dtype=torch.float32).double() > t64).all()
    assert logit_cuts(null, method, alpha, m, 128, torch.device("cpu")) is cut  # cached


def test_fused_entry_points_fall_back_on_cpu():
    x = torch.randn(20, 16)
    null = fit_null(torch.randn(3000, 16))
    p = null.sf(x, dtype=torch.float32)
    ref = select_experts(x, p, method="bh", alpha=0.2)
    got = select_with_null(x, null, method="bh", alpha=0.2)
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.weights, ref.weights)
    with pytest.raises(ValueError, match="needs `pvalues`"):
        fused_select_experts(x, method="bh")


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


def adversarial_logits(tokens, num_experts, *, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, num_experts, generator=g) * 2
    x[: tokens // 8] *= 6  # far into both tails (upper tail: exponential, no ties at 0)
    x[tokens // 8 : tokens // 4, : num_experts // 4] = 3.0  # exact ties in logits (and p-values)
    x[tokens // 4 : tokens // 4 + 4] = 0.0
    x[tokens // 4, 1] = -0.0
    x[-4:] = x[-4:].round(decimals=1)  # many equal values on grid-like points
    return x.to(device)


def rows_on_cuts(null, method, alpha, *, seed, device):
    """Logit rows at a pooled null's per-rank cuts and one float32 below them (decisions flip there)."""
    from bh_helpers.selection.fused_tables import float_from_ordered, logit_cuts, ordered_from_float

    cut = logit_cuts(null, method, alpha, 64, 64, torch.device(device))
    below = float_from_ordered(ordered_from_float(cut) - 1)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(16):
        pick = torch.rand(64, generator=g) < r / 16
        rows.append(torch.where(pick.to(device), cut, below)[torch.randperm(64, generator=g).to(device)])
    return torch.stack(rows)  # (16, 64)


@needs_cuda
@pytest.mark.parametrize("kind", ["gaussian", "empirical", "tophat", "per_expert"])
@pytest.mark.parametrize("method", FDR_METHODS)
def test_fused_select_with_null_identical_on_gpu(kind, method):
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(20_000, 64, generator=g) * 1.3 + 0.2
    null = fit_null(calib, kernel="gaussian", per_expert=True) if kind == "per_expert" else fit_null(calib, kernel=kind)
    for seed, tokens in ((0, 1), (1, 63), (2, 4099)):
        x = adversarial_logits(tokens, 64, seed=seed, device="cuda")
        if kind != "per_expert" and tokens > 1:
            x = torch.cat([x, rows_on_cuts(null, method, 0.2, seed=seed, device="cuda")])
        p = null.sf(x, dtype=torch.float32)
        # unclamped up to 16 (a max_k of 64 unrolls 64 selection rounds: slow to compile)
        assert torch.equal(select_with_null(x, null, method=method, alpha=0.2, max_k=16, min_k=0).counts,
                           select_experts(x, p, method=method, alpha=0.2, max_k=16, min_k=0).counts)
        for weights, (min_k, max_k) in (("renorm", (1, 8)), ("softmax", (0, 8)), ("uniform", (2, 5)),
                                        ("inverse_p", (0, 8))):
            ref = select_experts(x, p, method=method, alpha=0.2, min_k=min_k, max_k=max_k, weights=weights)
            got = select_with_null(x, null, method=method, alpha=0.2, min_k=min_k, max_k=max_k, weights=weights)
            got_p = fused_select_experts(x, p, method=method, alpha=0.2, min_k=min_k, max_k=max_k, weights=weights)
            # inverse_p: float32 log and exp of torch and of the kernel, relative error ~|log p| * eps
            tol = dict(rtol=1e-5, atol=1e-6) if weights == "inverse_p" else dict(rtol=2e-6, atol=1e-7)
            for sel in (got, got_p):
                assert torch.equal(sel.counts, ref.counts)
                assert torch.equal(sel.indices, ref.indices)
                torch.testing.assert_close(sel.weights, ref.weights, **tol)


@needs_cuda
@pytest.mark.parametrize("statistic", ["centred", "zscore"])
@pytest.mark.parametrize("kind", ["gaussian", "empirical", "per_expert"])
@pytest.mark.parametrize("method", ["bh", "by", "holm"])
def test_fused_statistics_identical_on_gpu(statistic, kind, method):
    """The per-token statistic in the fused kernel (shift and scale per row, round-to-nearest
    float32 ops) selects exactly what the reference selects from NullBank-style p-values."""
    from bh_helpers.nulls.statistics import apply_statistic

    g = torch.Generator().manual_seed(2)
    calib = torch.randn(20_000, 64, generator=g) * 1.3 + torch.randn(20_000, 1, generator=g)
    null = fit_null(calib, kernel="gaussian" if kind == "per_expert" else kind, per_expert=kind == "per_expert",
                    statistic=statistic)
    for seed, tokens in ((0, 1), (1, 63), (2, 4099)):
        x = adversarial_logits(tokens, 64, seed=seed, device="cuda") + torch.randn(tokens, 1, device="cuda")
        p = null.sf(apply_statistic(x, statistic), dtype=torch.float32)
        for weights, (min_k, max_k) in (("renorm", (1, 8)), ("softmax", (0, 16)), ("inverse_p", (1, 8))):
            ref = select_experts(x, p, method=method, alpha=0.2, min_k=min_k, max_k=max_k, weights=weights)
            got = select_with_null(x, null, method=method, alpha=0.2, min_k=min_k, max_k=max_k, weights=weights)
            tol = dict(rtol=1e-5, atol=1e-6) if weights == "inverse_p" else dict(rtol=2e-6, atol=1e-7)
            assert torch.equal(got.counts, ref.counts) and torch.equal(got.indices, ref.indices)
            torch.testing.assert_close(got.weights, ref.weights, **tol)


@needs_cuda
def test_direct_launch_serves_every_row_count_and_unaligned_logits():
    """The compiled-kernel launch (after the first JIT call) against the reference, row counts in
    an order that would expose a specialisation on T, and logits at a 4-byte offset (JIT path)."""
    from bh_helpers.selection.fused_tables import CACHE

    g = torch.Generator().manual_seed(4)
    null = fit_null(torch.randn(20_000, 64, generator=g) * 1.3)
    for tokens in (1, 17, 16, 2, 64, 65, 4096, 1, 3):
        flat = torch.randn(tokens * 64 + 1, generator=g).cuda() * 2
        for x in (flat[:-1].view(tokens, 64), flat[1:].view(tokens, 64)):  # aligned, then 4-byte offset
            p = null.sf(x, dtype=torch.float32)
            for got, ref in (
                (select_with_null(x, null, method="bh", alpha=0.2, validate=False),
                 select_experts(x, p, method="bh", alpha=0.2)),
                (fused_select_experts(x, method="topk", k=4, max_k=8, validate=False),
                 select_experts(x, method="topk", k=4, max_k=8)),
            ):
                assert torch.equal(got.counts, ref.counts) and torch.equal(got.indices, ref.indices)
                torch.testing.assert_close(got.weights, ref.weights, rtol=2e-6, atol=1e-7)
    assert any(key[0] == "launch" for key in CACHE.keys())  # the direct launch was taken


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_paths_launch_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current (a model split across GPUs): Triton launches on
    the current device unless told otherwise."""
    g = torch.Generator().manual_seed(5)
    null = fit_null(torch.randn(20_000, 64, generator=g))
    null_e = fit_null(torch.randn(20_000, 64, generator=g), per_expert=True)
    x = adversarial_logits(300, 64, seed=5, device="cuda:1")
    experts = make_experts(num_experts=64, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda:1")
    hidden = torch.randn(300, 256, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        for nl in (null, null_e):
            got = select_with_null(x, nl, method="bh", alpha=0.2)
            ref = select_experts(x, nl.sf(x, dtype=torch.float32), method="bh", alpha=0.2)
            assert got.indices.device == x.device
            assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts)
        got = fused_select_experts(x, method="topk", k=8, weights="softmax")
        assert torch.equal(got.indices, select_experts(x, method="topk", k=8, weights="softmax").indices)
        idx, w = random_selection(300, 8, 64, seed=5, device="cuda:1")
        with torch.no_grad():
            out = grouped_dispatch_experts(experts, hidden, idx, w, variant="compact", use_graphs=False)
            ref = dispatch_experts(experts, hidden, idx, w)
        assert rel_err(out, ref) < 1e-2
        torch.cuda.synchronize(1)


@needs_cuda
def test_fused_pvalues_on_threshold_are_rejected_like_reference():
    from bh_helpers.selection.reference import _thresholds_np

    t = torch.from_numpy(_thresholds_np("bh", 0.05, 64)).float().cuda()  # float32 rounding of thresholds
    p = t.repeat(256, 1)
    p = p * (1 + (torch.rand_like(p) - 0.5) * 2e-7)  # on, just above, just below
    p = p.clamp(1e-38, 1.0)
    x = torch.randn(256, 64, device="cuda")
    for method in FDR_METHODS:
        ref = select_experts(x, p, method=method, alpha=0.05, max_k=16, min_k=0)
        got = fused_select_experts(x, p, method=method, alpha=0.05, max_k=16, min_k=0)
        assert torch.equal(got.counts, ref.counts) and torch.equal(got.indices, ref.indices)


@needs_cuda
@pytest.mark.parametrize("k", [1, 4, 8])
def test_fused_topk_identical_on_gpu(k):
    x = adversarial_logits(1000, 64, seed=3, device="cuda").bfloat16()
    for weights in ("renorm", "softmax"):
        ref = select_experts(x, method="topk", k=k, max_k=8, weights=weights)
        got = fused_select_experts(x, method="topk", k=k, max_k=8, weights=weights)
        assert torch.equal(got.indices, ref.indices) and torch.equal(got.counts, ref.counts)
        torch.testing.assert_close(got.weights, ref.weights, rtol=2e-6, atol=1e-7)


@needs_cuda
@pytest.mark.parametrize("variant", ["sync_free", "compact", "graph"])
@pytest.mark.parametrize("tokens", [1, 8, 700])
def test_grouped_dispatch_matches_reference_on_gpu(variant, tokens):
    experts = make_experts(num_experts=64, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda")
    for seed, skew in ((0, False), (1, True)):
        hidden = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
        idx, w = random_selection(tokens, 8, 64, seed=seed, device="cuda", skew=skew)
        with torch.no_grad():
            ref = dispatch_experts(experts, hidden, idx, w)
            kwargs = {"variant": "sync_free", "use_graphs": True} if variant == "graph" else {"variant": variant, "use_graphs": False}
            out = grouped_dispatch_experts(experts, hidden, idx, w, **kwargs)
            out2 = grouped_dispatch_experts(experts, hidden, idx, w, **kwargs)  # replay / reuse
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2
        assert torch.equal(out, out2)
        if tokens > 1:
            assert torch.equal(out[0], torch.zeros_like(out[0]))


@needs_cuda
def test_route_fast_paths_match_reference_on_gpu():
    import bh_helpers.routing.patch as patching
    from bh_helpers import TopKSelector
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 128, (3, 40), device="cuda")
    with torch.no_grad():
        with patching.route(model, TopKSelector(4, weights="softmax")):
            fast = model(ids).logits
        original = patching.fast_dispatch_experts
        patching.fast_dispatch_experts = dispatch_experts
        try:
            with patching.route(model, TopKSelector(4, weights="softmax")):
                ref = model(ids).logits
        finally:
            patching.fast_dispatch_experts = original
        native = model(ids).logits
    assert rel_err(fast, ref) < 2e-2
    assert rel_err(fast, native) < 2e-2


@needs_cuda
def test_graphed_dispatch_after_a_freed_model_on_gpu():
    """Graphs of a freed experts bank take their memory pool with them: a new bank captures fine
    (a pool shared across banks tripped the allocator's use_count assert after run_demo)."""
    import gc

    for seed in (0, 1):
        experts = make_experts(num_experts=64, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda", seed=seed)
        hidden = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
        idx, w = random_selection(8, 8, 64, seed=seed, device="cuda")
        with torch.no_grad():
            out = grouped_dispatch_experts(experts, hidden, idx, w, variant="sync_free", use_graphs=True)
            ref = dispatch_experts(experts, hidden, idx, w)
        assert rel_err(out, ref) < 1e-2
        del experts, out
        gc.collect()


@needs_cuda
def test_inverse_p_and_per_layer_alpha_graphed_route_equals_validated_route_on_gpu():
    """Few tokens per call take the CUDA-graph path; ``validate=True`` takes the eager one. With
    inverse-p weights and one alpha per layer both give the same counts and logits."""
    import dataclasses

    import bh_helpers.routing.patch as patching
    from bh_helpers import BHSelector
    from bh_helpers.capture import capture_router_logits
    from bh_helpers.nulls.fit import fit_null_bank
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    calib = capture_router_logits(model, [{"input_ids": torch.randint(0, 128, (4, 64), device="cuda")}],
                                  progress=False)
    selector = BHSelector(fit_null_bank(calib), alpha={0: 0.6, 1: 0.05}, max_k=8, weights="inverse_p")
    ids = torch.randint(0, 128, (1, 16), device="cuda")  # 16 rows per call: under GRAPH_MAX_TOKENS
    with torch.no_grad():
        runs = []
        for sel in (selector, selector, dataclasses.replace(selector, validate=True)):  # capture, replay, eager
            with patching.route(model, sel) as rec:
                logits = model(ids).logits
            runs.append((logits, {layer: s["mean_k"] for layer, s in rec.summary()["per_layer"].items()}))
    (graphed, k1), (replayed, k2), (eager, k3) = runs
    assert k1 == k2 == k3 and k1[0] > k1[1]
    assert rel_err(graphed, eager) < 2e-2 and rel_err(replayed, eager) < 2e-2
