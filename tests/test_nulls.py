"""Tests for bh_helpers.nulls: exactness against brute force, calibration, tails, persistence."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import types
import zipfile

import numpy as np
import pytest
import torch
from scipy import special, stats

from bh_helpers import __version__
from bh_helpers.nulls import (
    SCHEMA_VERSION,
    VALID_KERNELS,
    GoodnessOfFit,
    NullBank,
    NullModel,
    fit_null,
    fit_null_bank,
    goodness_of_fit,
)
from bh_helpers.nulls.metadata import BANK_DIGEST, seal

SMOOTH_KERNELS = [k for k in VALID_KERNELS if k not in ("empirical", "efron")]  # KDEs


# ---------------------------------------------------------------------------------------------
# Slow plain-NumPy references
# ---------------------------------------------------------------------------------------------


def kernel_cdf_slow(kernel: str, u: np.ndarray) -> np.ndarray:
    """Integrated unit kernels written out piece by piece (independent of the library's code)."""
    if kernel == "gaussian":
        return special.ndtr(u)
    out = np.zeros_like(u)
    inside = np.abs(u) < 1
    v = u[inside]
    if kernel == "tophat":
        out[inside] = (v + 1) / 2
    elif kernel == "epanechnikov":
        out[inside] = (2 + 3 * v - v**3) / 4
    elif kernel == "linear":
        out[inside] = np.where(v < 0, (1 + v) ** 2 / 2, 1 - (1 - v) ** 2 / 2)
    out[u >= 1] = 1.0
    return out


def kde_sf_slow(data: np.ndarray, x: np.ndarray, kernel: str, h: float) -> np.ndarray:
    """P(X >= x) of the KDE: the mean over samples of the kernel's survival function, float64."""
    u = (x[:, None] - data[None, :]) / h  # (points, samples)
    if kernel == "gaussian":
        return special.ndtr(-u).mean(axis=1)  # ndtr(-u) keeps relative precision in the tail
    return (1.0 - kernel_cdf_slow(kernel, u)).mean(axis=1)


def midp_sf_slow(data: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(#{X > x} + #{X = x} / 2) / n."""
    return ((data[None, :] > x[:, None]).sum(1) + 0.5 * (data[None, :] == x[:, None]).sum(1)) / data.size


def kernel_noise(kernel: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws from the unit-scale kernel."""
    if kernel == "gaussian":
        return rng.standard_normal(size)
    if kernel == "tophat":
        return rng.uniform(-1, 1, size)
    if kernel == "linear":
        return rng.uniform(0, 1, size) - rng.uniform(0, 1, size)
    if kernel == "epanechnikov":
        # Devroye's rule: of three U(-1, 1), take the second if the third is the largest in size.
        u1, u2, u3 = rng.uniform(-1, 1, (3, size))
        return np.where((np.abs(u3) >= np.abs(u2)) & (np.abs(u3) >= np.abs(u1)), u2, u3)
    raise AssertionError(kernel)


@pytest.fixture(scope="module")
def normal_data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(2000)


@pytest.fixture(scope="module")
def fitted(normal_data) -> dict[str, NullModel]:
    return {kernel: fit_null(normal_data, kernel=kernel) for kernel in VALID_KERNELS}


def router_like_logits(n_tokens: int, n_experts: int, seed: int, *, layer_seed: int = 0) -> torch.Tensor:
    """Float32 logits with per-expert offsets and scales, a bit skewed, like real router logits.

    ``layer_seed`` fixes the distribution (the "layer"), ``seed`` the tokens drawn from it.
    """
    g = torch.Generator().manual_seed(layer_seed)
    offset = torch.randn(n_experts, generator=g) * 0.5
    scale = 0.7 + 0.6 * torch.rand(n_experts, generator=g)
    z = torch.randn(n_tokens, n_experts, generator=torch.Generator().manual_seed(seed))
    return (z + 0.15 * z.clamp(min=0) ** 2) * scale + offset


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", SMOOTH_KERNELS)
def test_sf_matches_brute_force(kernel, normal_data, fitted):
    null = fitted[kernel]
    data = normal_data
    x = np.linspace(data.min(), data.max(), 3001)
    expected = kde_sf_slow(data, x, kernel, null.bandwidth_)
    got = null.sf(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Both tails, relative: the top and bottom 1% up to the largest / from the smallest sample.
    top = np.linspace(np.quantile(data, 0.99), data.max(), 400)
    np.testing.assert_allclose(
        null.sf(torch.from_numpy(top)).numpy(), kde_sf_slow(data, top, kernel, null.bandwidth_), rtol=0.01
    )
    np.testing.assert_allclose(
        null.logsf(torch.from_numpy(top)).numpy(),
        np.log(kde_sf_slow(data, top, kernel, null.bandwidth_)),
        atol=0.01,
    )
    bottom = np.linspace(data.min(), np.quantile(data, 0.01), 400)
    cdf_expected = 1.0 - kde_sf_slow(data, bottom, kernel, null.bandwidth_)
    np.testing.assert_allclose(null.cdf(torch.from_numpy(bottom)).numpy(), cdf_expected, rtol=0.01)
    np.testing.assert_allclose(null.cdf(torch.from_numpy(x)).numpy(), 1.0 - expected, atol=1e-6)


def test_empirical_is_midp_ecdf_at_the_data(normal_data, fitted):
    null = fitted["empirical"]
    x = np.sort(normal_data)
    np.testing.assert_allclose(
        null.sf(torch.from_numpy(x)).numpy(), midp_sf_slow(normal_data, x), rtol=1e-12, atol=0
    )
    # Linear between consecutive order statistics.
    mid = 0.5 * (x[:-1] + x[1:])
    np.testing.assert_allclose(
        null.sf(torch.from_numpy(mid)).numpy(),
        (midp_sf_slow(normal_data, x[:-1]) + midp_sf_slow(normal_data, x[1:])) / 2,
        atol=1e-12,
    )


def test_empirical_handles_ties():
    # bf16-like data: few distinct values, many ties.
    data = torch.randn(5000, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    flat = data.double().numpy().ravel()
    null = fit_null(data, kernel="empirical")
    values = np.unique(flat)
    np.testing.assert_array_equal(null.grid_, values)
    np.testing.assert_allclose(
        null.sf(torch.from_numpy(values)).numpy(), midp_sf_slow(flat, values), rtol=1e-12
    )


def test_empirical_subsampled_grid_is_exact_at_kept_values():
    data = np.random.default_rng(2).standard_normal(20_000)
    null = fit_null(data, kernel="empirical", grid_size=2048)
    assert null.grid_.size <= 2048
    # The most extreme values are all kept.
    np.testing.assert_array_equal(null.grid_[-512:], np.sort(data)[-512:])
    np.testing.assert_allclose(null.sf_grid_, midp_sf_slow(data, null.grid_), rtol=1e-12)


@pytest.mark.parametrize("kernel", SMOOTH_KERNELS)
def test_density_matches_sklearn(kernel, normal_data):
    from sklearn.neighbors import KernelDensity

    data = normal_data[:500]
    for bandwidth in ("scott", 0.4):
        null = fit_null(data, kernel=kernel, bandwidth=bandwidth)
        kde = KernelDensity(kernel=kernel, bandwidth=null.bandwidth_).fit(data[:, None])
        x = np.linspace(data.min(), data.max(), 701)
        expected = np.exp(kde.score_samples(x[:, None]))
        got = null.pdf(torch.from_numpy(x)).numpy()
        # Tophat's density jumps at every sample +- h; interpolation smears each jump over one cell.
        atol = 5e-3 if kernel == "tophat" else 1e-5
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=atol)


def test_bandwidth_rules_follow_scipy(normal_data):
    data = normal_data
    sigma = data.std(ddof=1)
    for rule in ("scott", "silverman"):
        kde = stats.gaussian_kde(data, bw_method=rule)
        gauss = fit_null(data, kernel="gaussian", bandwidth=rule).bandwidth_
        assert gauss == pytest.approx(kde.factor * sigma, rel=1e-12)
        # Compact kernels get the scale whose standard deviation equals the Gaussian rule.
        for kernel, std in (
            ("tophat", 1 / math.sqrt(3)),
            ("epanechnikov", 1 / math.sqrt(5)),
            ("linear", 1 / math.sqrt(6)),
        ):
            assert fit_null(data, kernel=kernel, bandwidth=rule).bandwidth_ * std == pytest.approx(
                gauss, rel=1e-12
            )
    assert fit_null(data, kernel="epanechnikov", bandwidth=0.3).bandwidth_ == 0.3
    assert fit_null(data, kernel="empirical").bandwidth_ == 0.0


# ---------------------------------------------------------------------------------------------
# Calibration: p-values of fresh draws from the fitted distribution are uniform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", SMOOTH_KERNELS)
def test_pvalues_of_kde_draws_are_uniform(kernel, normal_data, fitted):
    null = fitted[kernel]
    rng = np.random.default_rng(123)
    n = 20_000
    draws = rng.choice(normal_data, size=n) + null.bandwidth_ * kernel_noise(kernel, rng, n)
    p = null.sf(torch.from_numpy(draws)).numpy()
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_pvalues_of_empirical_draws_are_uniform(normal_data, fitted):
    null = fitted["empirical"]
    rng = np.random.default_rng(7)
    n = 20_000
    # Continuous check: inverse-transform draws from the fitted (interpolated, tailed) distribution.
    q = rng.uniform(size=n)
    grid, sf = null.grid_, null.sf_grid_
    draws = np.interp(q, sf[::-1], grid[::-1])
    upper, lower = q < sf[-1], q > sf[0]
    draws[upper] = grid[-1] - null.tail_scale_upper_ * np.log(q[upper] / sf[-1])
    draws[lower] = grid[0] + null.tail_scale_lower_ * np.log((1 - q[lower]) / null.cdf_grid_[0])
    p = null.sf(torch.from_numpy(draws)).numpy()
    np.testing.assert_allclose(p, q, atol=1e-9)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    # Resampled data: mid-p values sit at (i - 1/2) / n, uniform up to a step of 1/n.
    p_resampled = null.sf(torch.from_numpy(rng.choice(normal_data, size=n))).numpy()
    assert stats.kstest(p_resampled, "uniform").pvalue > 0.01


# ---------------------------------------------------------------------------------------------
# Tails, monotonicity, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", VALID_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_monotone_and_never_zero_or_one(kernel, dtype, fitted):
    null = fitted[kernel]
    x = torch.cat([torch.linspace(-200, 200, 20_001), torch.linspace(-5, 5, 20_001)]).sort().values.to(dtype)
    sf, cdf, logsf, pdf = null.sf(x), null.cdf(x), null.logsf(x), null.pdf(x)
    for out in (sf, cdf, logsf, pdf):
        assert out.dtype == dtype and out.shape == x.shape
        assert bool(torch.isfinite(out).all())
    assert bool((sf[1:] <= sf[:-1]).all()) and bool((cdf[1:] >= cdf[:-1]).all())
    assert bool((logsf[1:] <= logsf[:-1]).all())
    assert bool((sf > 0).all()) and bool((sf < 1).all()) and bool((cdf > 0).all()) and bool((cdf < 1).all())
    assert bool((logsf < 0).all()) and bool((pdf >= 0).all())


@pytest.mark.parametrize("kernel", [k for k in VALID_KERNELS if k != "efron"])  # efron: Gaussian to 10 sigma
def test_upper_tail_keeps_decreasing_and_logsf_is_exact(kernel, fitted, normal_data):
    null = fitted[kernel]
    top = normal_data.max()
    x = torch.from_numpy(top + np.linspace(0, 400, 4001))
    sf, logsf = null.sf(x), null.logsf(x)
    assert bool((sf[1:] < sf[:-1])[:2000].all())  # strictly decreasing while representable
    assert bool((logsf[1:] < logsf[:-1]).all())  # strictly decreasing everywhere, no -inf
    # Exponential tail: logsf is linear with slope -1 / scale; exp(logsf) == sf where no underflow.
    slope = np.diff(logsf.numpy()) / np.diff(x.numpy())
    np.testing.assert_allclose(slope, -1.0 / null.tail_scale_upper_, rtol=1e-6)
    ok = logsf.numpy() > -700
    np.testing.assert_allclose(sf.numpy()[ok], np.exp(logsf.numpy()[ok]), rtol=1e-12)
    # Continuous at the largest sample.
    below = torch.tensor([top - 1e-9, top], dtype=torch.float64)
    assert float(null.sf(below)[0]) == pytest.approx(float(null.sf(below)[1]), rel=1e-5)


def test_output_dtypes_and_devices(fitted):
    null = fitted["gaussian"]
    x = torch.randn(4, 64)
    assert null.sf(x.to(torch.bfloat16)).dtype == torch.float32
    assert null.sf(x.to(torch.float16)).dtype == torch.float32
    assert null.sf(x).dtype == torch.float32
    assert null.sf(x.double()).dtype == torch.float64
    assert null.sf(x, dtype=torch.float64).dtype == torch.float64
    assert null.sf(np.zeros(3)).dtype == torch.float64
    torch.testing.assert_close(null.sf(x.double()).float(), null.sf(x))
    with pytest.raises(ValueError, match="dtype"):
        null.sf(x, dtype=torch.bfloat16)
    assert torch.isnan(null.sf(torch.tensor([float("nan")]))).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(fitted):
    null = fitted["gaussian"]
    x = torch.randn(1000, 64) * 3
    torch.testing.assert_close(null.sf(x.cuda()).cpu(), null.sf(x), rtol=1e-6, atol=1e-12)


def test_per_expert_uses_each_column():
    logits = router_like_logits(3000, 6, seed=3)
    null = fit_null(logits, per_expert=True, grid_size=4096)
    assert null.per_expert and null.num_experts == 6 and null.grid_.shape == (6, 4096)
    assert null.bandwidth_.shape == (6,) and null.n_samples_ == 3000
    x = torch.randn(2, 5, 6, dtype=torch.float64) * 2
    got = null.sf(x)
    assert got.shape == x.shape
    for e in range(6):
        column = fit_null(logits[:, e], grid_size=4096)
        assert torch.equal(got[..., e], column.sf(x[..., e]))
    with pytest.raises(ValueError, match="experts"):
        null.sf(torch.zeros(3, 5))


def test_per_expert_empirical_pads_grids():
    logits = torch.randn(500, 3, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    null = fit_null(logits, kernel="empirical", per_expert=True)
    x = logits.double()
    for e in range(3):
        col = logits[:, e].double().numpy()
        np.testing.assert_allclose(null.sf(x)[:, e].numpy(), midp_sf_slow(col, col), rtol=1e-12)


# efron is left out: a Gaussian null's sf underflows float32 about 13 sigma out (ties there are
# broken by the logit, as for every kernel).
@pytest.mark.parametrize("kernel", [k for k in VALID_KERNELS if k != "efron"])
def test_top8_of_64_never_tie_in_float32(kernel):
    calibration = router_like_logits(20_000, 64, seed=5)
    bank = fit_null_bank({0: calibration}, kernel=kernel)
    top = float(calibration.max())
    sigma = float(calibration.std())
    logits = router_like_logits(4000, 64, seed=6)
    g = torch.Generator().manual_seed(7)
    rows = torch.arange(4000)
    # A few boosted experts per token: moderately, to the data maximum, and far beyond it.
    for boost in (1.5 * sigma, 3.0 * sigma):
        logits[rows, torch.randint(64, (4000,), generator=g)] += boost
    far = top + sigma * torch.tensor([0.0, 0.5, 2.0, 5.0, 10.0, 20.0])
    picks = torch.randint(64, (4000, 3), generator=g)
    logits[rows[:, None], picks] = far[
        torch.randint(far.numel(), (4000, 3), generator=g)
    ] + 0.01 * torch.rand(4000, 3, generator=g)
    p = bank.pvalues(logits, 0)
    assert p.dtype == torch.float32
    values, order = logits.topk(8, dim=-1)
    p_top = p.gather(-1, order)
    distinct = (values[:, 1:] < values[:, :-1]).all(-1)
    assert int(distinct.sum()) > 3900
    assert bool((p_top[distinct][:, 1:] > p_top[distinct][:, :-1]).all()), (
        "tied or misordered p-values among the top 8"
    )
    assert bool((p > 0).all())


# ---------------------------------------------------------------------------------------------
# NullBank: persistence and compatibility
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_logits() -> dict[int, torch.Tensor]:
    return {layer: router_like_logits(2000, 8, seed=10 + layer, layer_seed=layer) for layer in range(3)}


@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("kernel", ["gaussian", "empirical"])
def test_save_load_round_trip_is_bit_exact(tmp_path, small_logits, per_expert, kernel):
    bank = fit_null_bank(
        small_logits, kernel=kernel, per_expert=per_expert, model_id="tiny", calibration="unit test"
    )
    bank.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["metadata.json", "nulls.npz"]
    with np.load(tmp_path / "nulls.npz", allow_pickle=False) as npz:
        assert all(npz[key].dtype != object for key in npz.files)
    loaded = NullBank.load(tmp_path, num_layers=3, num_experts=8)
    x = torch.randn(50, 8) * 4
    for layer in range(3):
        assert torch.equal(loaded.pvalues(x, layer), bank.pvalues(x, layer))
        assert torch.equal(loaded[layer].logsf(x.double()), bank[layer].logsf(x.double()))
        np.testing.assert_array_equal(loaded[layer].bandwidth_, bank[layer].bandwidth_)
    assert loaded.metadata == bank.metadata
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["schema_version"] == 1 and meta["library_version"] == __version__  # raw, no trim: schema 1
    assert meta["num_layers"] == 3 and meta["num_experts"] == 8 and meta["model_id"] == "tiny"
    assert meta["calibration"] == "unit test" and meta["kernel"] == kernel and meta["created"]


def test_bank_is_a_mapping_and_pvalues_is_sf_in_float32(small_logits):
    bank = fit_null_bank(small_logits)
    assert len(bank) == 3 and list(bank) == [0, 1, 2] and 1 in bank
    x = torch.randn(7, 8, dtype=torch.float64)
    assert torch.equal(bank.pvalues(x, 2), bank[2].sf(x).float())
    with pytest.raises(KeyError, match="layer 5"):
        bank.pvalues(x, 5)
    with pytest.raises(ValueError, match="8 experts"):
        bank.pvalues(torch.randn(7, 9), 0)


def test_compatibility_checks(tmp_path, small_logits):
    bank = fit_null_bank(small_logits)
    bank.save(tmp_path)
    config = types.SimpleNamespace(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2)
    assert bank.check_compatible(config) is bank
    assert bank.check_compatible(types.SimpleNamespace(config=config)) is bank
    with pytest.raises(ValueError, match="3 layers"):
        bank.check_compatible(types.SimpleNamespace(num_hidden_layers=16, num_experts=8, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="8 experts"):
        bank.check_compatible(types.SimpleNamespace(num_hidden_layers=3, num_local_experts=64, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="model_or_config"):
        bank.check_compatible(object())
    with pytest.raises(ValueError, match="num_layers"):
        NullBank.load(tmp_path, num_layers=16)
    with pytest.raises(ValueError, match="num_experts"):
        NullBank.load(tmp_path, num_experts=64)


@pytest.mark.fault("damaged files", "clear error")
def test_load_rejects_bad_files(tmp_path, small_logits):
    bank = fit_null_bank(small_logits)
    good = tmp_path / "good"
    bank.save(good)
    npz_bytes = (good / "nulls.npz").read_bytes()
    meta = json.loads((good / "metadata.json").read_text())

    def variant(name, *, npz=npz_bytes, meta_text=None):
        meta_text = json.dumps(meta) if meta_text is None else meta_text
        d = tmp_path / name
        d.mkdir()
        (d / "nulls.npz").write_bytes(npz)
        (d / "metadata.json").write_text(meta_text)
        return d

    with pytest.raises(ValueError, match="directory"):
        NullBank.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        NullBank.load(variant("truncated_npz", npz=npz_bytes[: len(npz_bytes) // 2]))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        NullBank.load(variant("garbage_npz", npz=b"not a zip file at all"))
    corrupted = bytearray(npz_bytes)
    corrupted[200:260] = bytes(60)  # damage compressed data inside the archive
    with pytest.raises(ValueError, match="corrupt|valid null"):
        NullBank.load(variant("damaged_npz", npz=bytes(corrupted)))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        NullBank.load(variant("truncated_json", meta_text=json.dumps(meta)[:50]))
    with pytest.raises(ValueError, match="schema_version.*newer"):
        NullBank.load(variant("newer", meta_text=json.dumps({**meta, "schema_version": SCHEMA_VERSION + 1})))
    with pytest.raises(ValueError, match="schema_version"):
        NullBank.load(
            variant(
                "noschema", meta_text=json.dumps({k: v for k, v in meta.items() if k != "schema_version"})
            )
        )
    with pytest.raises(ValueError, match="num_layers|malformed"):
        NullBank.load(
            variant(
                "missing_field", meta_text=json.dumps(seal({k: v for k, v in meta.items() if k != "num_layers"}))
            )
        )
    # An archive without one layer's arrays.
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(npz_bytes)) as src, zipfile.ZipFile(buf, "w") as dst:
        for item in src.infolist():
            if not item.filename.startswith("layer_1."):
                dst.writestr(item, src.read(item.filename))
    with pytest.raises(ValueError, match="layer 1"):
        NullBank.load(variant("missing_layer", npz=buf.getvalue()))


# ---------------------------------------------------------------------------------------------
# Legacy pickles
# ---------------------------------------------------------------------------------------------


def write_legacy(directory, layers=2, protocol=pickle.DEFAULT_PROTOCOL):
    # The old research code stored a normal-looking CDF on a grid running past the data.
    x = np.linspace(-8, 8, 3001)
    for layer in range(layers):
        with open(directory / f"distribution_model_layer_{layer}.pkl", "wb") as fh:
            pickle.dump({"x": x, "cdf": stats.norm.cdf(x, scale=1 + layer)}, fh, protocol=protocol)
    return x


@pytest.mark.fault("models and untrusted code", "clear error")
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_legacy_reader_needs_trust_and_reads_old_format(tmp_path, protocol):
    write_legacy(tmp_path, protocol=protocol)
    with pytest.raises(ValueError, match="trust=True"):
        NullBank.from_legacy_pickles(tmp_path)
    bank = NullBank.from_legacy_pickles(tmp_path, trust=True, model_id="old", num_experts=64)
    assert list(bank) == [0, 1] and bank.num_layers == 2 and bank.metadata.kernel == "legacy"
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    np.testing.assert_allclose(bank[1].sf(x).numpy(), stats.norm.sf(x.numpy(), scale=2), atol=1e-6)
    far = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)
    assert bool((bank[0].sf(far) > 0).all()) and bool((bank[0].logsf(far).diff() < 0).all())
    # Saved in the new format, it loads without pickle.
    bank.save(tmp_path / "converted")
    logits = torch.randn(3, 64)
    assert torch.equal(
        NullBank.load(tmp_path / "converted", num_experts=64).pvalues(logits, 1), bank.pvalues(logits, 1)
    )


class _CallsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.fault("models and untrusted code", "clear error")
@pytest.mark.parametrize("payload", ["system", "eval"])
def test_legacy_reader_refuses_code_execution(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _CallsSystem(marker) if payload == "system" else _CallsEval()
    with open(tmp_path / "distribution_model_layer_0.pkl", "wb") as fh:
        pickle.dump({"x": np.arange(3.0), "cdf": evil}, fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        NullBank.from_legacy_pickles(tmp_path, trust=True)
    assert not marker.exists()


@pytest.mark.fault("damaged files", "clear error")
def test_a_legacy_file_beyond_num_layers_is_named(tmp_path):
    """Files for layers 0 and 7 with ``num_layers=6`` said the bank "was fitted for a model with 6 layers ...
    but `num_layers` has 6": it now names the file of the layer the model does not have."""
    write_legacy(tmp_path, layers=1)
    (tmp_path / "distribution_model_layer_7.pkl").write_bytes((tmp_path / "distribution_model_layer_0.pkl").read_bytes())
    with pytest.raises(ValueError, match=r"`num_layers` is 6 \(layers 0\.\.5\), but .* has a null file for layer 7 "
                                         r"\(distribution_model_layer_7\.pkl\): pass the model's own layer count"):
        NullBank.from_legacy_pickles(tmp_path, trust=True, num_layers=6)
    assert list(NullBank.from_legacy_pickles(tmp_path, trust=True, num_layers=8)) == [0, 7]


@pytest.mark.fault("damaged files", "clear error")
def test_two_legacy_files_for_one_layer_are_refused_naming_both(tmp_path):
    """``..._layer_1.pkl`` and ``..._layer_01.pkl`` both name layer 1: one was dropped silently."""
    from bh_helpers.nulls.legacy import legacy_layer_files

    write_legacy(tmp_path)
    (tmp_path / "distribution_model_layer_01.pkl").write_bytes((tmp_path / "distribution_model_layer_0.pkl").read_bytes())
    with pytest.raises(ValueError, match=r"two legacy null files for layer 1: 'distribution_model_layer_01\.pkl' and "
                                         r"'distribution_model_layer_1\.pkl'; move or delete"):
        legacy_layer_files(tmp_path)
    (tmp_path / "distribution_model_layer_01.pkl").unlink()
    assert {k: p.name for k, p in legacy_layer_files(tmp_path).items()} == {
        0: "distribution_model_layer_0.pkl", 1: "distribution_model_layer_1.pkl"}


def test_from_legacy_pickles_refuses_two_files_for_one_layer(tmp_path):
    write_legacy(tmp_path)
    (tmp_path / "distribution_model_layer_01.pkl").write_bytes((tmp_path / "distribution_model_layer_0.pkl").read_bytes())
    with pytest.raises(ValueError, match="two legacy null files for layer 1"):
        NullBank.from_legacy_pickles(tmp_path, trust=True)


def test_legacy_reader_rejects_malformed_content(tmp_path):
    with open(tmp_path / "distribution_model_layer_0.pkl", "wb") as fh:
        pickle.dump({"x": np.array([0.0, 2.0, 1.0]), "cdf": np.array([0.1, 0.5, 0.9])}, fh)
    with pytest.raises(ValueError, match="'x' must increase"):
        NullBank.from_legacy_pickles(tmp_path, trust=True)
    with pytest.raises(ValueError, match="no distribution_model_layer"):
        NullBank.from_legacy_pickles(tmp_path / "nope", trust=True)


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_goodness_of_fit_reports_numbers():
    calibration = router_like_logits(20_000, 16, seed=20)
    held_out = router_like_logits(20_000, 16, seed=21)
    null = fit_null(calibration)
    fit = goodness_of_fit(null, held_out)
    assert isinstance(fit, GoodnessOfFit)
    assert fit.n_held_out == 320_000 and fit.n_tested == 20_000
    assert fit.ks_distance < 0.01 and fit.pit_ks_pvalue > 0.01
    assert fit.pvalue_histogram.shape == (10,) and fit.pvalue_histogram.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(fit.pvalue_histogram, 0.1, atol=0.01)
    assert fit.tail_fractions[0.01] == pytest.approx(0.01, abs=0.003)
    assert goodness_of_fit(null, held_out).pit_ks_pvalue == fit.pit_ks_pvalue  # seeded subsample
    # The KS distance matches scipy on the whole set (continuous null CDF vs held-out ECDF).
    small = held_out[:500]
    u = null.cdf(small.double()).numpy().ravel()
    assert goodness_of_fit(null, small).ks_distance == pytest.approx(
        stats.kstest(u, "uniform").statistic, rel=1e-12
    )
    # A shifted held-out set is flagged.
    shifted = goodness_of_fit(null, held_out + 0.3)
    assert shifted.ks_distance > 0.05 and shifted.pit_ks_pvalue < 1e-6
    per_expert = fit_null(calibration, per_expert=True)
    assert goodness_of_fit(per_expert, held_out).pit_ks_pvalue > 0.01


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logits": torch.empty(0, 64)}, "logits.*empty"),
        ({"logits": torch.full((100, 4), 1.5)}, "logits have zero variance"),
        ({"logits": torch.tensor([[0.0, float("nan")], [1.0, 2.0]])}, "logits.*NaN/inf"),
        ({"logits": torch.tensor([[0.0, float("inf")], [1.0, 2.0]])}, "logits.*NaN/inf"),
        # a finite but damaged value (an edited or overflowed entry): issue 25's huge-logit case
        ({"logits": torch.tensor([[0.0, 3e38], [1.0, 2.0]])}, r"1 value beyond \+-65504 .*first in row 0"),
        ({"logits": torch.tensor([[0.0, 1.0], [-7e4, 2.0]], dtype=torch.bfloat16)}, r"beyond \+-65504 .*row 1"),
        ({"logits": torch.randn(10, 2, 2)}, "logits.*shape"),
        ({"logits": torch.randn(10), "per_expert": True}, "logits.*shape"),
        (
            {"logits": torch.cat([torch.randn(50, 1), torch.ones(50, 1)], 1), "per_expert": True},
            "logits in expert column 1 have zero variance \\(all values equal 1.0\\)",
        ),
        ({"kernel": "cosine"}, "kernel"),
        ({"kernel": None}, "kernel"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"bandwidth": -1.0}, "bandwidth"),
        ({"bandwidth": float("nan")}, "bandwidth"),
        ({"bandwidth": "normal_reference"}, "bandwidth"),
        ({"kernel": "empirical", "bandwidth": 0.5}, "bandwidth"),
        ({"grid_size": 3}, "grid_size"),
        ({"per_expert": "yes"}, "per_expert"),
    ],
)
@pytest.mark.fault("bad arguments", "clear error")
def test_fit_null_rejects_bad_input(kwargs, match):
    kwargs = {"logits": torch.randn(100, 4, generator=torch.Generator().manual_seed(0)), **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_null(**kwargs)


@pytest.mark.fault("bad arguments", "clear error")
def test_fit_null_bank_rejects_bad_input():
    with pytest.raises(ValueError, match="logits_by_layer"):
        fit_null_bank({})
    with pytest.raises(ValueError, match="logits_by_layer.*experts"):
        fit_null_bank({0: torch.randn(10, 4), 1: torch.randn(10, 5)})
    with pytest.raises(ValueError, match="logits_by_layer.*shape"):
        fit_null_bank({0: torch.randn(10)})
    with pytest.raises(ValueError, match=r"`logits_by_layer\[1\]` has 40 NaN"):
        fit_null_bank({0: torch.randn(10, 4), 1: torch.full((10, 4), float("nan"))})
    with pytest.raises(ValueError, match="num_layers"):
        fit_null_bank({3: torch.randn(10, 4)}, num_layers=2)
    with pytest.raises(ValueError, match="held_out_logits"):
        goodness_of_fit(fit_null(torch.randn(100)), torch.tensor([float("nan")]))


def test_per_expert_empirical_grid_is_bounded():
    logits = router_like_logits(6000, 4, seed=30)
    null = fit_null(logits, kernel="empirical", per_expert=True)
    assert null.grid_.shape[0] == 4 and 3000 < null.grid_.shape[1] <= 4096
    small = fit_null(logits, kernel="empirical", per_expert=True, grid_size=16)
    assert small.grid_.shape[0] == 4 and small.grid_.shape[1] <= 16
    column = logits[:, 2].double().numpy()
    np.testing.assert_allclose(small.sf_grid_[2], midp_sf_slow(column, small.grid_[2]), rtol=1e-12)
    np.testing.assert_array_equal(small.grid_[2, -4:], np.sort(column)[-4:])


# ---------------------------------------------------------------------------------------------
# Damaged banks that used to load and give p-values off by 0.35-0.55
# ---------------------------------------------------------------------------------------------


def _rewrite(directory, change, *, keep_checksums=True):
    """Rewrite ``nulls.npz`` of a saved bank with ``change(arrays)`` applied (metadata untouched,
    or without its checksums to act like a bank saved before they existed)."""
    import json

    npz = directory / "nulls.npz"
    with np.load(npz, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    with open(npz, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    if not keep_checksums:
        meta = json.loads((directory / "metadata.json").read_text())
        meta.pop("array_sha256")
        meta.pop(BANK_DIGEST)
        (directory / "metadata.json").write_text(json.dumps(meta))


def _swap_layers(a):
    for name in ("grid", "sf", "cdf", "pdf"):
        a[f"layer_0.{name}"], a[f"layer_1.{name}"] = a[f"layer_1.{name}"], a[f"layer_0.{name}"]


DAMAGE = {
    "sf halved": (lambda a: a.__setitem__("layer_0.sf", a["layer_0.sf"] / 2), "sf \\+ cdf differs from 1"),
    "integer grid": (lambda a: a.__setitem__("layer_1.grid", np.round(a["layer_1.grid"]).astype(np.int64)),
                     "grid must be float64"),
    "grid shifted by +3": (lambda a: a.__setitem__("layer_0.grid", a["layer_0.grid"] + 3.0), None),
    "two layers swapped": (_swap_layers, None),
    "cdf not monotone": (lambda a: a["layer_1.cdf"].__setitem__((0, slice(10, 20)), a["layer_1.cdf"][0, 10:20][::-1]),
                         "not probabilities monotone|sf \\+ cdf"),
}


@pytest.mark.fault("damaged files", "clear error")
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_banks_are_refused_on_load(tmp_path, case):
    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({0: torch.randn(2000, 8, generator=g), 1: torch.randn(2000, 8, generator=g) * 2 - 1})
    bank.save(tmp_path / "bank")
    change, invariant = DAMAGE[case]
    _rewrite(tmp_path / "bank", change)
    with pytest.raises(ValueError, match="changed after it was saved|valid null"):
        NullBank.load(tmp_path / "bank")  # the checksums catch every case
    bank.save(tmp_path / "legacy")
    _rewrite(tmp_path / "legacy", change, keep_checksums=False)
    with pytest.raises(ValueError, match="no checksum of its fields.*allow_unverified"):
        NullBank.load(tmp_path / "legacy")  # a bank without checksums is refused ...
    if invariant is not None:  # ... and, opted in, the invariants still catch what they can
        with pytest.warns(UserWarning, match="unverified"), pytest.raises(ValueError, match=invariant):
            NullBank.load(tmp_path / "legacy", allow_unverified=True)


# Every field of metadata.json that changes the transform logit -> p-value (or what the bank is
# checked against), each with an edit that still parses: before the bank checksum, all of these
# loaded silently (statistic: p-values moved by up to 0.56).
FIELD_EDITS = {
    "statistic": lambda m: m.__setitem__("statistic", "zscore"),
    "statistic deleted": lambda m: m.pop("statistic"),
    "trim": lambda m: m.__setitem__("trim", 2),
    "kernel": lambda m: m.__setitem__("kernel", "tophat"),
    "bandwidth": lambda m: m.__setitem__("bandwidth", "silverman"),
    "per_expert": lambda m: m.__setitem__("per_expert", True),
    "layers reordered": lambda m: m.__setitem__("layers", m["layers"][::-1]),
    "layers dropped": lambda m: m.__setitem__("layers", m["layers"][:1]),
    "num_layers": lambda m: m.__setitem__("num_layers", m["num_layers"] + 1),
    "num_experts": lambda m: m.__setitem__("num_experts", 16),
    "model_id": lambda m: m.__setitem__("model_id", "another/model"),
    "router_fingerprint": lambda m: m.__setitem__("router_fingerprint", {"0": [0.1] * 10, "1": [0.2] * 10}),
    "router_fingerprint deleted": lambda m: m.pop("router_fingerprint"),
    "schema_version": lambda m: m.__setitem__("schema_version", 1),
    "n_samples": lambda m: m.__setitem__("n_samples", {"0": 1, "1": 1}),
    "array_sha256 deleted": lambda m: m.pop("array_sha256"),
    "array_sha256 of two layers swapped": lambda m: m["array_sha256"].update(
        {"layer_0.grid": m["array_sha256"]["layer_1.grid"], "layer_1.grid": m["array_sha256"]["layer_0.grid"]}),
    "bank checksum edited": lambda m: m.__setitem__(BANK_DIGEST, "0" * 64),
    "bank checksum deleted": lambda m: m.pop(BANK_DIGEST),
}


def _saved_centred_bank(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({0: torch.randn(2000, 8, generator=g), 1: torch.randn(2000, 8, generator=g) * 2 - 1},
                         statistic="centred", router_fingerprint={0: [1.0] * 10, 1: [2.0] * 10})
    return bank, bank.save(tmp_path / "bank")


@pytest.mark.fault("mismatched null banks", "clear error")
@pytest.mark.parametrize("case", sorted(FIELD_EDITS))
def test_an_edited_metadata_field_is_refused(tmp_path, case):
    """Each field that decides a p-value is inside the one checksum: an edit is refused, naming the file and the
    fix; opted in, the bank loads with a warning."""
    _, folder = _saved_centred_bank(tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    FIELD_EDITS[case](meta)
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
    missing = case == "bank checksum deleted"
    with pytest.raises(ValueError) as err:
        NullBank.load(folder)
    message = str(err.value)
    assert str(folder / "metadata.json") in message and "allow_unverified" in message and "fit or save" in message
    assert ("no checksum of its fields" if missing else "was edited after it was saved") in message
    if case in ("statistic", "trim", "kernel", "bandwidth", "model_id", "router_fingerprint", "n_samples",
                "router_fingerprint deleted", "statistic deleted", "bank checksum edited", "bank checksum deleted",
                "array_sha256 deleted", "schema_version", "layers reordered"):  # edits that still make a bank
        with pytest.warns(UserWarning, match=r"loading it unverified as asked \(`allow_unverified=True`"):
            NullBank.load(folder, allow_unverified=True)


@pytest.mark.fault("mismatched null banks", "clear error")
def test_the_checksum_covers_statistic_and_swapped_layer_files(tmp_path):
    """The two silently wrong examples of the issue: ``statistic`` edited (p-values moved by up to 0.56) and two
    layers' arrays swapped together with their array checksums."""
    bank, folder = _saved_centred_bank(tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    x = 3 * torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    # The edit matters: the same arrays read as "raw" give other p-values.
    raw = NullModel.from_arrays({k.split(".", 1)[1]: v for k, v in np.load(folder / "nulls.npz").items()
                                 if k.startswith("layer_0.")}, kernel="gaussian", statistic="raw")
    assert float((raw.sf(x) - bank.pvalues(x, 0)).abs().max()) > 0.1
    (folder / "metadata.json").write_text(json.dumps({**meta, "statistic": "raw"}))
    with pytest.raises(ValueError, match="edited after it was saved"):
        NullBank.load(folder)
    # Layer files swapped, their array checksums swapped with them (only the bank checksum sees it).
    _rewrite(folder, _swap_layers)
    digests = meta["array_sha256"]
    for name in ("grid", "sf", "cdf", "pdf"):
        digests[f"layer_0.{name}"], digests[f"layer_1.{name}"] = digests[f"layer_1.{name}"], digests[f"layer_0.{name}"]
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited after it was saved"):
        NullBank.load(folder)


def test_the_bank_checksum_round_trips_and_ignores_layout(tmp_path):
    """What save writes verifies on load, however the JSON is laid out (key order, indentation)."""
    bank, folder = _saved_centred_bank(tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta[BANK_DIGEST] == seal(meta)[BANK_DIGEST]
    (folder / "metadata.json").write_text(json.dumps(dict(reversed(list(meta.items())))))
    again = NullBank.load(folder)
    assert again.metadata == bank.metadata
    with pytest.raises(ValueError, match="allow_unverified.*True or False"):
        NullBank.load(folder, allow_unverified="yes")


@pytest.mark.fault("mismatched null banks", "recovered")
def test_a_bank_saved_before_the_checksum_loads_opted_in_and_resaves_sealed(tmp_path):
    """The backward-compatible path: an older bank (no ``bank_sha256``) is refused by default, loads with
    ``allow_unverified=True`` (warning) and, saved again, loads verified with the same p-values."""
    bank, folder = _saved_centred_bank(tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if k != BANK_DIGEST}))
    with pytest.raises(ValueError, match="no checksum of its fields"):
        NullBank.load(folder)
    with pytest.warns(UserWarning, match="unverified"):
        old = NullBank.load(folder, allow_unverified=True)
    old.save(folder)
    again = NullBank.load(folder)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.pvalues(x, 1), bank.pvalues(x, 1))


@pytest.mark.fault("mismatched null banks", "clear error")
def test_the_committed_bank_is_sealed_with_the_tiny_models_fingerprint(tiny_model_and_tokenizer, tmp_path):
    """The committed bank has both checksums and the embedded model's router fingerprint: a shifted grid or
    swapped layers in it are refused, and it routes the embedded model."""
    import shutil

    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.models.families import fingerprints_differ, router_fingerprint

    folder = default_null_bank_dir("tiny")
    meta = json.loads((folder / "metadata.json").read_text())
    assert BANK_DIGEST in meta and "array_sha256" in meta
    bank = NullBank.load(folder)
    model = tiny_model_and_tokenizer[0]
    assert bank.metadata.router_fingerprint is not None
    assert sorted(bank.metadata.router_fingerprint) == list(range(bank.num_layers))
    assert fingerprints_differ(bank.metadata.router_fingerprint, router_fingerprint(model)) == []
    for case in ("grid shifted by +3", "two layers swapped"):
        copy = tmp_path / case.replace(" ", "_")
        shutil.copytree(folder, copy)
        _rewrite(copy, DAMAGE[case][0])
        with pytest.raises(ValueError, match="changed after it was saved"):
            NullBank.load(copy)


def test_null_arrays_round_trip_on_the_committed_bank():
    """``to_arrays`` gives back exactly the committed file's arrays, and ``from_arrays`` of them the same p-values."""
    from bh_helpers.app.paths import default_null_bank_dir

    folder = default_null_bank_dir("tiny")
    bank = NullBank.load(folder)
    with np.load(folder / "nulls.npz", allow_pickle=False) as npz:
        stored = {key: npz[key] for key in npz.files}
    x = 3 * torch.randn(400, bank.num_experts, generator=torch.Generator().manual_seed(0))
    for layer, null in bank.items():
        arrays = null.to_arrays()
        assert list(arrays) == ["grid", "sf", "cdf", "pdf", "tail_scale_upper", "tail_scale_lower", "bandwidth",
                                "n_samples", "per_expert"]
        for name, value in arrays.items():
            want = stored[f"layer_{layer}.{name}"]
            assert value.dtype == want.dtype and value.shape == want.shape and np.array_equal(value, want), name
        again = NullModel.from_arrays(arrays, kernel=bank.metadata.kernel, statistic=bank.statistic,
                                      trim=bank.metadata.trim)
        assert torch.equal(again.sf(x), bank.pvalues(x, layer))
        assert torch.equal(again.logsf(x), null.logsf(x))


def test_null_arrays_round_trip_per_expert_and_refuse_bad_arrays():
    logits = torch.randn(2000, 4, generator=torch.Generator().manual_seed(3))
    null = fit_null(logits, kernel="empirical", per_expert=True, statistic="centred")
    again = NullModel.from_arrays(null.to_arrays(), kernel="empirical", statistic="centred")
    assert again.per_expert and again.num_experts == 4 and again.statistic == "centred"
    assert torch.equal(again.sf(logits), null.sf(logits))
    arrays = null.to_arrays()
    with pytest.raises(ValueError, match="sf \\+ cdf differs from 1"):
        NullModel.from_arrays({**arrays, "sf": arrays["sf"] / 2}, kernel="empirical", statistic="centred")
    with pytest.raises(KeyError, match="pdf"):
        NullModel.from_arrays({k: v for k, v in arrays.items() if k != "pdf"}, kernel="empirical")


# ----------------------------------------------------------------------------------------------
# Efron's empirical null and the per-token statistics
# ----------------------------------------------------------------------------------------------


def test_efron_central_matching_ignores_the_contaminating_tail():
    """95% null N(0.3, 1.2^2) plus 5% signal N(5, 1): central matching recovers the null's centre
    and scale (the plain mean and std do not), and the null is that Gaussian (scipy.stats.norm)."""
    from scipy import stats

    rng = np.random.default_rng(11)
    data = np.concatenate([rng.normal(0.3, 1.2, 190_000), rng.normal(5.0, 1.0, 10_000)])
    null = fit_null(data, kernel="efron")
    x = np.linspace(-3, 6, 301)
    z = (x - 0.3) / 1.2
    np.testing.assert_allclose(null.sf(torch.from_numpy(x)).numpy(), stats.norm.sf(z), rtol=0.12, atol=2e-4)
    delta = float(null.grid_[0] + null.grid_[-1]) / 2
    sigma = float(null.grid_[-1] - null.grid_[0]) / 20
    assert abs(delta - 0.3) < 0.03 and abs(sigma - 1.2) < 0.03
    assert abs(data.mean() - 0.3) > 0.2 and abs(data.std() - 1.2) > 0.2  # what a plain fit would take
    # Exactly a Gaussian with those parameters on the grid, tails beyond it.
    inner = torch.from_numpy(np.linspace(delta - 9 * sigma, delta + 9 * sigma, 101))
    # (linear interpolation between 16,384 grid points: relative error ~1e-5)
    np.testing.assert_allclose(null.sf(inner).numpy(), stats.norm.sf((inner.numpy() - delta) / sigma), rtol=1e-4)
    with pytest.raises(ValueError, match="kernel='efron'"):
        fit_null(data, kernel="efron", bandwidth=0.5)


def _brute_statistic(x: np.ndarray, statistic: str) -> np.ndarray:
    """The statistic in float64 by hand: per row, minus the mean, over the population std."""
    if statistic == "raw":
        return x
    out = x - x.mean(axis=-1, keepdims=True)
    if statistic == "zscore":
        sd = x.std(axis=-1, keepdims=True)
        out = out / np.where(sd > 0, sd, 1.0)
    return out


@pytest.mark.parametrize("statistic", ["raw", "centred", "zscore"])
@pytest.mark.parametrize("trim", [0, 8])
def test_statistic_pvalues_match_brute_force_float64(statistic, trim):
    """The bank's p-values = a Gaussian KDE sf (bandwidth 0.3) of the per-token statistic, computed
    by hand in float64 (scipy.stats.norm over every calibration value, no binning) from the
    calibration rows without each token's `trim` largest values."""
    from scipy import stats

    g = torch.Generator().manual_seed(3)
    calibration = torch.randn(600, 16, generator=g) * 1.5 + torch.randn(600, 1, generator=g) * 2  # token levels
    bank = fit_null_bank({0: calibration}, kernel="gaussian", bandwidth=0.3, statistic=statistic, trim=trim)
    values = _brute_statistic(calibration.double().numpy(), statistic)
    pool = np.sort(values, axis=-1)[:, : 16 - trim].reshape(-1)  # the trim largest per token dropped
    logits = torch.randn(50, 16, generator=g) * 1.5 + torch.randn(50, 1, generator=g) * 2
    t = _brute_statistic(logits.double().numpy(), statistic).reshape(-1)
    inside = (t > pool.min()) & (t < pool.max())  # the KDE body (the tails are exponential fits)
    expected = stats.norm.sf((t[inside, None] - pool[None, :]) / 0.3).mean(axis=1)
    got = bank.pvalues(logits, 0).double().numpy().reshape(-1)[inside]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)  # float32 statistic and p-values
    assert bank[0].statistic == statistic and bank[0].trim == trim


def test_centred_and_zscore_are_shift_invariant_raw_is_not():
    """A token's logits shifted by a constant: same p-values under centred/zscore, not under raw."""
    g = torch.Generator().manual_seed(4)
    calibration = torch.randn(2000, 16, generator=g)
    logits = torch.randn(20, 16, generator=g)
    for statistic in ("raw", "centred", "zscore"):
        bank = fit_null_bank({0: calibration}, statistic=statistic)
        same = torch.equal(bank.pvalues(logits, 0), bank.pvalues(logits + 0.75, 0))
        close = torch.allclose(bank.pvalues(logits, 0), bank.pvalues(logits + 0.75, 0), rtol=1e-4, atol=1e-6)
        assert close if statistic != "raw" else not same


@pytest.mark.parametrize("statistic,trim", [("centred", 0), ("zscore", 4), ("raw", 2)])
def test_bank_round_trip_keeps_statistic_and_trim(tmp_path, statistic, trim):
    bank = fit_null_bank({0: torch.randn(500, 16), 1: torch.randn(500, 16)}, statistic=statistic, trim=trim)
    loaded = NullBank.load(bank.save(tmp_path / "b"))
    assert (loaded.metadata.statistic, loaded.metadata.trim) == (statistic, trim)
    assert loaded.metadata == bank.metadata and loaded.metadata.schema_version == 2
    x = torch.randn(7, 16)
    assert torch.equal(loaded.pvalues(x, 1), bank.pvalues(x, 1))
    raw = fit_null_bank({0: torch.randn(500, 16)})
    assert raw.metadata.schema_version == 1  # still readable by older versions


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("kwargs,match", [
    (dict(statistic="center"), "statistic"), (dict(trim=15), "trim"), (dict(trim=-1), "trim"),
    (dict(trim=2, per_expert=True), "trim"), (dict(statistic=None), "statistic"),
])
def test_statistic_and_trim_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_null_bank({0: torch.randn(100, 16)}, **kwargs)


# ----------------------------------------------------------------------------------------------
# Bank folders
# ----------------------------------------------------------------------------------------------


def test_load_bank_folder_single_bank_folder_of_banks_and_empty(tmp_path, small_logits):
    from bh_helpers.experiments.configs import bank_name as configs_bank_name
    from bh_helpers.nulls import bank_name, load_bank_folder

    assert configs_bank_name is bank_name
    assert [bank_name("gaussian"), bank_name("gaussian", "zscore"), bank_name("gaussian", "centred", 8)] == [
        "gaussian", "gaussian/zscore", "gaussian/centred/trim8"]
    raw = fit_null_bank(small_logits).save(tmp_path / "banks" / "gaussian")
    fit_null_bank(small_logits, statistic="zscore", trim=2).save(tmp_path / "banks" / "gaussian-zscore-trim2")
    (tmp_path / "banks" / "not-a-bank").mkdir()
    one = load_bank_folder(raw)
    assert isinstance(one, NullBank) and one.statistic == "raw"
    many = load_bank_folder(str(tmp_path / "banks"))
    assert list(many) == ["gaussian", "gaussian/zscore/trim2"]
    assert many["gaussian/zscore/trim2"].metadata.trim == 2
    assert torch.equal(many["gaussian"].pvalues(small_logits[0], 0), one.pvalues(small_logits[0], 0))
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError, match=r"`path` .* holds no null bank \(metadata.json\) nor folders of banks"):
            load_bank_folder(folder)


def test_goodness_table_and_choose_kernel(small_logits):
    from bh_helpers.nulls import choose_kernel, goodness_table

    banks = {kernel: fit_null_bank(small_logits, kernel=kernel) for kernel in ("gaussian", "tophat")}
    held_out = {layer: router_like_logits(1000, 8, seed=99 + layer, layer_seed=layer) for layer in (0, 2)}
    table = goodness_table(banks, held_out)
    assert list(table.columns) == ["kernel", "layer", "ks_distance", "pit_ks_statistic", "pit_ks_pvalue",
                                   "p<=0.001", "p<=0.01", "p<=0.05"]
    assert list(zip(table["kernel"], table["layer"])) == [("gaussian", 0), ("gaussian", 2), ("tophat", 0), ("tophat", 2)]
    assert table["ks_distance"].iloc[1] == goodness_of_fit(banks["gaussian"][2], held_out[2]).ks_distance
    best = table.groupby("kernel")["ks_distance"].mean().idxmin()
    assert choose_kernel(table) == best
    tied = table.assign(ks_distance=0.1)
    assert choose_kernel(tied) == "gaussian"  # ties: the first listed
