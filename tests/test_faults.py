"""The always-on screen of what a selector returns inside ``route`` (issue 15, item 4).

Without ``validate=True`` a broken selection used to reach the dispatch as it was: a NaN weight
gave all-NaN outputs, counts that disagreed with the indices were recorded as mean k 8 for zero
experts, an id past the expert bank read out of bounds. Now every selection is screened on the
device (no host synchronisation) and ``route`` raises when it exits, naming the layers; the model
is restored first. Every test here is part of the fault battery (``pytest -m fault``) counted in
the README's reliability figure (``python scripts/reliability.py``).
"""

from __future__ import annotations

import pytest
import torch

from bh_helpers.routing.patch import route
from bh_helpers.selection.reference import Selection
from bh_helpers.selection.selectors import BHSelector, NativeSelector, TopKSelector

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


class BrokenSelector:
    """Top-2 by softmax, with one chosen defect at layer 1, token 2 (``validate`` off)."""

    validate = False

    def __init__(self, defect: str) -> None:
        self.defect, self.max_k = defect, 2

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        sel = TopKSelector(2, weights="softmax")(logits, layer)
        idx, w, counts = sel.indices.clone(), sel.weights.clone(), sel.counts.clone()  # (T, 2), (T, 2), (T,)
        if layer == 1:
            if self.defect == "nan weight":
                w[2, 0] = float("nan")
            elif self.defect == "inf weight":
                w[2, 1] = float("inf")
            elif self.defect == "negative weight":
                w[2, 0] = -0.5
            elif self.defect == "counts too high":
                counts[2] = 8  # recorded as mean k 8 before
            elif self.defect == "counts too low":
                counts[2] = 0
            elif self.defect == "id past the bank":
                idx[2, 1] = 10_000  # an out-of-bounds read on the GPU before
            elif self.defect == "id below -1":
                idx[2, 1] = -7
            elif self.defect == "float indices":
                idx = idx.float()
            elif self.defect == "integer weights":
                w = w.long()
        return Selection(indices=idx, weights=w, counts=counts)


@pytest.fixture(scope="module")
def tiny(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    ids = tok("a few tokens to route through every layer of the model", return_tensors="pt").input_ids
    assert ids.shape[1] > 3
    with torch.no_grad():
        reference = model(ids).logits  # (1, S, V)
    return model, ids, reference


_ON_DEVICE: dict = {}


def _on(device: str, tiny):
    """The tiny model, its ids and its own unrouted logits on ``device`` (one copy per device)."""
    if device == "cpu":
        return tiny
    if device not in _ON_DEVICE:
        import copy

        model, ids, _ = tiny
        model, ids = copy.deepcopy(model).to(device), ids.to(device)
        with torch.no_grad():
            _ON_DEVICE[device] = (model, ids, model(ids).logits)  # the reference on that device
    return _ON_DEVICE[device]


@pytest.mark.fault("route: selector output", "clear error")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("defect", ["nan weight", "inf weight", "negative weight", "counts too high",
                                    "counts too low", "id past the bank", "id below -1"])
def test_broken_selection_raises_when_route_exits(tiny, device, defect):
    model, ids, reference = _on(device, tiny)
    with torch.no_grad(), pytest.raises(ValueError, match=r"broken selections for some tokens \(layer 1: 1[,)]"):
        with route(model, BrokenSelector(defect)) as rec:
            model(ids)
    invalid = rec.invalid_tokens()
    assert invalid[0] == 0 and invalid[1] == 1  # a NaN or inf weight also spreads to later layers' tokens
    assert rec.summary()["invalid_tokens"] == sum(invalid.values())
    with torch.no_grad():  # restored exactly
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)


@pytest.mark.fault("route: selector output", "clear error")
@pytest.mark.parametrize("defect", ["float indices", "integer weights"])
def test_selection_of_the_wrong_dtype_is_refused_at_once(tiny, defect):
    model, ids, _ = tiny
    with torch.no_grad(), pytest.raises(TypeError, match="indices and counts must be integer tensors"):
        with route(model, BrokenSelector(defect)):
            model(ids)


def _poison(model: torch.nn.Module, layer: int, value: float):
    """A forward pre-hook that writes ``value`` into one token's hidden state before MoE ``layer``."""
    from bh_helpers.models.families import find_moe_blocks

    block = next(b for b in find_moe_blocks(model) if b.layer == layer)

    def hook(module, args):
        hidden = args[0].clone()  # (B, S, H)
        hidden[..., 1, :] = value
        return (hidden,)

    return block.module.register_forward_pre_hook(hook)


def _row_model(device: str, tiny):
    """A copy of the tiny model whose layer-3 router reads hidden coordinate 0 with a positive weight
    for every expert, so that a token whose hidden state is ``[v, 0, ..., 0]`` there gets the router
    row ``v * w`` (w > 0): NaN, +inf or -inf for EVERY expert, as chosen (a NaN or inf written into
    every coordinate would give NaN rows only: the +inf and -inf terms cancel)."""
    key = ("row", device)
    if key not in _ON_DEVICE:
        import copy

        from bh_helpers.models.families import find_moe_blocks

        model, ids, _ = tiny
        model = copy.deepcopy(model)
        gate = next(b for b in find_moe_blocks(model) if b.layer == 3).module.gate
        with torch.no_grad():
            gate.weight[:, 0] = gate.weight[:, 0].abs() + 0.01  # (E,) positive
        _ON_DEVICE[key] = (model.to(device), ids.to(device))
    return _ON_DEVICE[key]


def _poison_row(model: torch.nn.Module, layer: int, value: float):
    """A forward pre-hook that makes token 1's hidden state ``[value, 0, ..., 0]`` before MoE ``layer``."""
    from bh_helpers.models.families import find_moe_blocks

    block = next(b for b in find_moe_blocks(model) if b.layer == layer)

    def hook(module, args):
        hidden = args[0].clone()  # (B, S, H)
        hidden[..., 1, :] = 0.0
        hidden[..., 1, 0] = value
        return (hidden,)

    return block.module.register_forward_pre_hook(hook)


WEIGHTS = ("renorm", "softmax", "uniform", "inverse_p")


def _selector(name: str, weights: str, model, bank):
    """Every ready-made selector, with each weight option (native: the model's own)."""
    from bh_helpers.selection.controls import MixedTopKSelector, ShuffledSelector
    from bh_helpers.selection.selectors import TopPSelector
    from bh_helpers.selection.static import StaticLayerSelector

    if name == "native":
        return NativeSelector.for_model(model)
    return {
        "bh": lambda: BHSelector(bank, alpha=0.5, max_k=8, weights=weights),
        "topk": lambda: TopKSelector(8, weights=weights, null_bank=bank),
        "top_p": lambda: TopPSelector(0.5, max_k=4, weights=weights, null_bank=bank),
        "mixed": lambda: MixedTopKSelector(2.5, weights=weights, null_bank=bank),
        "static": lambda: StaticLayerSelector((3, 2, 2, 2, 2, 1), weights=weights, null_bank=bank),
        "shuffled": lambda: ShuffledSelector(BHSelector(bank, alpha=0.5, max_k=8), weights=weights),
    }[name]()


SELECTOR_WEIGHTS = [("native", "native")] + [(name, weights) for name in ("bh", "topk", "top_p", "mixed", "static",
                                                                          "shuffled") for weights in WEIGHTS]


@pytest.mark.fault("route: non-finite router logits", "clear error")
@pytest.mark.filterwarnings("ignore::bh_helpers.routing.recorder.BoundWarning")  # alpha 0.5 sits at min_k here
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("selector,weights", SELECTOR_WEIGHTS)
def test_non_finite_router_logits_are_never_quietly_routed(tiny, olmoe_tiny_bank, device, value, selector, weights):
    """A router row of NaN, +inf or -inf (float16 overflow upstream) is refused by the default
    screen (validate off) for every selector and weight option: uniform, inverse-p and top-k
    weights are finite for such a row, so the screen looks at the logits themselves."""
    model, ids = _row_model(device, tiny)
    chosen = _selector(selector, weights, model, olmoe_tiny_bank)
    handle = _poison_row(model, 3, value)
    try:
        # allow_other_model: _row_model edits a router column, so the committed bank's fingerprint differs
        with torch.no_grad(), pytest.raises(ValueError, match=r"some tokens \(layer 3: 1[,)].*non-finite router "):
            with route(model, chosen, allow_other_model=True):
                model(ids)
    finally:
        handle.remove()
    with torch.no_grad(), route(model, chosen, allow_other_model=True) as rec:  # unpoisoned: routes cleanly
        model(ids)
    assert rec.summary()["invalid_tokens"] == 0


@pytest.mark.fault("route: non-finite router logits", "clear error")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hidden_states_are_never_quietly_routed(tiny, device, value):
    """NaN or inf in every coordinate of a hidden state (the old form of the case): uniform weights too."""
    model, ids, _ = _on(device, tiny)
    handle = _poison(model, 3, value)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=r"some tokens \(layer 3: 1[,)]"):
            with route(model, TopKSelector(2, weights="uniform")):
                model(ids)
    finally:
        handle.remove()


def test_the_logit_screen_follows_the_validate_rule():
    """The screen's one reduction refuses NaN or +inf anywhere and a row of -inf, as ``validate=True``
    does, and accepts a single -inf (an expert masked out); padding rows are not counted."""
    from bh_helpers.routing.aggregates import aggregate
    from bh_helpers.selection.reference import _check_logits

    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.5, 1.0, -1.0], [-inf, 1.0, 0.0], [nan, 1.0, 0.0], [0.0, inf, 1.0],
                           [-inf, -inf, -inf], [nan, nan, nan]])  # (6, 3); the last row is padding
    valid = torch.tensor([1, 1, 1, 1, 1, 0])
    sel = TopKSelector(1, weights="uniform")(logits.nan_to_num(0.0, 0.0, 0.0), 0)  # a sound selection
    faults = torch.zeros(1, dtype=torch.long)
    aggregate(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), faults, sel.counts, sel.indices,
              sel.weights, valid, valid.bool().unsqueeze(-1), logits)
    assert int(faults) == 3
    refused = []
    for row in logits[:5]:
        try:
            _check_logits(row[None])
        except ValueError:
            refused.append(True)
        else:
            refused.append(False)
    assert refused == [False, False, True, True, True]  # the same rule


@pytest.fixture(scope="module")
def olmoe_tiny_bank():
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.nulls.bank import NullBank

    return NullBank.load(default_null_bank_dir("tiny"))


@pytest.mark.parametrize("device", DEVICES)
def test_sound_selections_pass_the_screen_and_are_not_altered(tiny, olmoe_tiny_bank, device):
    """The screen must not change a sound selection: native routing stays equal to no routing."""
    model, ids, reference = _on(device, tiny)
    with torch.no_grad():
        with route(model, NativeSelector.for_model(model)) as rec:
            out = model(ids).logits
        with route(model, BHSelector(olmoe_tiny_bank, alpha=0.5, max_k=8)) as bh:
            model(ids)
    assert rec.summary()["invalid_tokens"] == 0 and bh.summary()["invalid_tokens"] == 0
    if device == "cpu":
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    else:  # other kernels than transformers' (grouped GEMMs, TF32): the T4 harness's tolerance
        assert float((out - reference).norm() / reference.norm()) < 5e-3


@pytest.mark.fault("route: selector output", "clear error")
def test_an_error_inside_route_is_not_masked_by_the_screen(tiny):
    model, ids, _ = tiny
    with torch.no_grad(), pytest.raises(KeyError, match="the user's own error"):
        with route(model, BrokenSelector("nan weight")):
            model(ids)
            raise KeyError("the user's own error")


# ----------------------------------------------------------------------------------------------
# The battery's record in the README
# ----------------------------------------------------------------------------------------------


def test_readme_reliability_section_is_the_committed_battery_run():
    """The README's figure and table are rendered from benchmarks/results/reliability_cpu_<commit>.json, and
    that run covers exactly the tests marked fault today, with no failure."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    check = subprocess.run([sys.executable, str(root / "scripts" / "reliability.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    sys.path.insert(0, str(root / "scripts"))
    try:
        from _results import block_files
    finally:
        sys.path.remove(str(root / "scripts"))
    committed = json.loads(block_files("reliability")[0].read_text())
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "fault",
                                "-p", "no:cacheprovider", "tests"], cwd=root, capture_output=True, text=True)
    marked = {line for line in collected.stdout.splitlines() if line.startswith("tests/")}
    assert marked == set(committed["tests"]), "fault tests changed: run python scripts/reliability.py"
    assert committed["exit"] == 0 and all(r["result"] in ("passed", "skipped") for r in committed["tests"].values())
