"""Tests of bh_helpers.routing (route, recorder, dispatch), bh_helpers.selection.selectors and bh_helpers.models.families.

Runs on the embedded tiny OLMoE when ``bh_helpers/data/tiny_olmoe/model.safetensors`` exists,
otherwise on a random tiny OLMoE; Mixtral, Qwen2-MoE and Qwen3-MoE are random tiny configs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import bh_helpers
from bh_helpers.capture import capture_router_logits
from bh_helpers.routing.dispatch import dispatch_experts
from bh_helpers.models.families import SUPPORTED_FAMILIES, find_moe_blocks
from bh_helpers import BHSelector, NativeSelector, TopKSelector, TopPSelector, route
from bh_helpers.selection.reference import Selection, select_experts

EMBEDDED = Path(bh_helpers.__file__).parent / "data" / "tiny_olmoe" / "model.safetensors"
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
FAMILIES = ("olmoe", "olmoe_norm", "mixtral", "qwen2_moe", "qwen3_moe")
VOCAB = 128


# ----------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------


def _sharpen_router(model: nn.Module, seed: int) -> None:
    """Random routers with std 0.02 give near-tied logits; spread them like a trained router."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in find_moe_blocks(model):
            w = block.module.gate.weight
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]) * 3.0)


def random_model(family: str, *, num_experts: int = 8, top_k: int = 2, seed: int = 0) -> nn.Module:
    """A random tiny causal LM of one family (float32, eval mode)."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts_per_tok=top_k,
    )
    if family in ("olmoe", "olmoe_norm"):
        config = tf.OlmoeConfig(intermediate_size=16, num_experts=num_experts,
                                norm_topk_prob=family == "olmoe_norm", **common)
        cls = tf.OlmoeForCausalLM
    elif family == "mixtral":
        config = tf.MixtralConfig(intermediate_size=16, num_local_experts=num_experts, **common)
        cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16, num_experts=num_experts,
                                   shared_expert_intermediate_size=24, norm_topk_prob=False, **common)
        cls = tf.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=16, num_experts=num_experts,
                                   norm_topk_prob=True, head_dim=16, **common)
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise AssertionError(family)
    torch.manual_seed(seed)
    model = cls(config).eval()
    _sharpen_router(model, seed)
    return model


@pytest.fixture(scope="module")
def olmoe() -> nn.Module:
    """The embedded trained tiny OLMoE when present, else a random one with 32 experts, top-8."""
    if EMBEDDED.exists():
        from bh_helpers.models.loading import load_model

        model, _ = load_model("tiny")
        return model.float().eval()
    return random_model("olmoe", num_experts=32, top_k=8, seed=1)


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding, relative to the logit scale.

    transformers' own expert implementations differ from each other by about this much (on the
    embedded model: 1.0e-5 between "eager" and "grouped_mm" on logits of magnitude 15).
    """
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() < 2e-6 * scale


def batch(model: nn.Module, *, rows: int = 3, length: int = 12, seed: int = 0, pad: bool = True) -> dict:
    """Random ids with left padding of different lengths (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    if pad:
        for r in range(1, rows):
            mask[r, : 2 * r] = 0
        ids = ids.masked_fill(mask == 0, model.config.pad_token_id or 0)
    return {"input_ids": ids, "attention_mask": mask}


class EmpiricalBank:
    """Stand-in null bank: pooled empirical survival function per layer, ``p = (#{X >= x} + 1) / (n + 1)``."""

    def __init__(self, logits_by_layer) -> None:
        self.sorted = {layer: torch.sort(x.reshape(-1).double()).values for layer, x in logits_by_layer.items()}

    def pvalues(self, logits: torch.Tensor, layer: int) -> torch.Tensor:
        s = self.sorted[layer]
        below = torch.searchsorted(s, logits.double().contiguous(), right=False)  # (T, E)
        return ((s.numel() - below + 1) / (s.numel() + 1)).float()


def null_bank(captured):
    """``bh_helpers.nulls.fit.fit_null_bank`` when it exists, else the empirical stand-in."""
    try:
        from bh_helpers.nulls.fit import fit_null_bank
    except ImportError:
        return EmpiricalBank(captured.logits)
    return fit_null_bank(captured)  # the capture carries the model's router fingerprint into the bank


@pytest.fixture(scope="module")
def olmoe_bank(olmoe):
    captured = capture_router_logits(olmoe, [batch(olmoe, rows=4, length=24, seed=s) for s in range(3)], progress=False)
    return null_bank(captured)


def snapshot(model: nn.Module) -> tuple[list, dict]:
    """Each MoE block's instance ``forward`` (or None) and ``vars`` keys, and every module's hook ids.

    Hooks are compared with a snapshot, not with "none": transformers 5.23 installs its own
    output-capturing forward hooks the first time a model records outputs.
    """
    blocks = [(b.module, vars(b.module).get("forward"), set(vars(b.module))) for b in find_moe_blocks(model)]
    hooks = {n: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for n, m in model.named_modules()}
    return blocks, hooks


def assert_restored(model: nn.Module, before) -> None:
    blocks, hooks = snapshot(model)
    for (module, forward, keys), (module_now, forward_now, keys_now) in zip(before[0], blocks):
        assert module is module_now
        assert forward_now is forward
        assert keys_now == keys
    assert hooks == before[1]


# ----------------------------------------------------------------------------------------------
# Adapters and dispatch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, weights",
    [("olmoe", "softmax"), ("olmoe_norm", "renorm"), ("mixtral", "renorm"), ("qwen2_moe", "softmax"), ("qwen3_moe", "renorm")],
)
def test_native_selector_reads_k_and_convention(family, weights):
    model = random_model(family, top_k=3)
    assert NativeSelector.for_model(model) == NativeSelector(k=3, weights=weights)
    assert [b.layer for b in find_moe_blocks(model)] == [0, 1]


@pytest.mark.fault("models and untrusted code", "clear error")
def test_unsupported_model_raises_listing_families():
    import transformers as tf

    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                               num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="Supported families: " + ", ".join(SUPPORTED_FAMILIES)):
        with route(llama, TopKSelector(1)):
            pass
    assert not llama._forward_pre_hooks and not llama._forward_hooks


def slow_dispatch(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
    """Reference: one token and one slot at a time."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            if e < 0:
                continue
            gate, up = (experts.gate_up_proj[e] @ hidden[t]).chunk(2)
            out[t] += weights[t, k] * (experts.down_proj[e] @ (experts.act_fn(gate) * up))
    return out


def test_dispatch_matches_transformers_eager_and_slow_reference():
    model = random_model("olmoe", num_experts=8, top_k=3)
    experts = find_moe_blocks(model)[0].module.experts
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 32, generator=g)
    # Fixed k: equal to transformers' own eager loop.
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(20)])  # (T, 3)
    w = torch.rand(20, 3, generator=g)
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(dispatch_experts(experts, hidden, idx, w), experts(hidden, idx, w), rtol=0, atol=1e-6)
        # Variable k with -1 slots, including a token with no expert at all.
        var_idx = idx.clone()
        var_idx[::2, 2] = -1
        var_idx[5] = -1
        var_w = w.masked_fill(var_idx < 0, 0.0)
        out = dispatch_experts(experts, hidden, var_idx, var_w)
        torch.testing.assert_close(out, slow_dispatch(experts, hidden, var_idx, var_w), rtol=0, atol=1e-6)
        assert torch.equal(out[5], torch.zeros(32))
        with pytest.raises(ValueError, match="indices"):
            dispatch_experts(experts, hidden, idx[:3], w[:3])


# ----------------------------------------------------------------------------------------------
# Patch mode reproduces the native model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_native_topk_patch_equals_native_logits(family, implementation, olmoe):
    model = olmoe if family == "olmoe" else random_model(family, top_k=2)
    model.config._experts_implementation = implementation
    inputs = batch(model)
    with torch.no_grad():
        native = model(**inputs).logits
        with route(model, NativeSelector.for_model(model)) as rec:
            patched = model(**inputs).logits
    assert_rounding_close(patched, native)
    assert rec.summary()["mean_k"] == NativeSelector.for_model(model).k


def _generate_pair(model, selector, **kwargs):
    inputs = batch(model, rows=2, length=6, seed=5)
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.update(pad_token_id=model.config.pad_token_id or 0)
    torch.manual_seed(123)
    native = model.generate(**inputs, **kwargs)
    with route(model, selector) as rec:
        torch.manual_seed(123)
        patched = model.generate(**inputs, **kwargs)
    return native, patched, rec


@pytest.mark.parametrize(
    "implementation, kwargs",
    [
        ("grouped_mm", dict(do_sample=False)),
        ("batched_mm", dict(do_sample=False)),
        ("eager", dict(do_sample=True, top_k=0, temperature=1.0)),
        ("grouped_mm", dict(do_sample=True, top_k=0, temperature=1.0)),
        ("batched_mm", dict(do_sample=False, num_beams=3)),
    ],
    ids=["greedy-grouped_mm", "greedy-batched_mm", "sampling-eager", "sampling-grouped_mm", "beam-batched_mm"],
)
def test_generate_left_padded_identical_to_native(olmoe, implementation, kwargs):
    olmoe.config._experts_implementation = implementation
    native, patched, rec = _generate_pair(olmoe, NativeSelector.for_model(olmoe), **kwargs)
    assert torch.equal(native, patched)
    # One prefill plus one call per new token; padding never counted.
    s = rec.summary()
    assert s["forward_calls"] >= 2 and s["std_k"] == 0.0
    if kwargs.get("num_beams", 1) == 1:
        prompt = batch(olmoe, rows=2, length=6, seed=5)
        per_token = rec.per_token_counts()
        prefill = per_token.call_index == 0
        assert torch.equal(per_token.token_ids[prefill], prompt["input_ids"][prompt["attention_mask"].bool()])
        # Decode steps: call c feeds the token generated at step c (the last one is never fed back).
        decoded = native[:, prompt["input_ids"].shape[1] : -1]  # (B, steps)
        assert torch.equal(per_token.token_ids[~prefill], decoded.T.reshape(-1))
        assert s["tokens"] == int(prompt["attention_mask"].sum()) + decoded.numel()


# ----------------------------------------------------------------------------------------------
# Analyze mode
# ----------------------------------------------------------------------------------------------


def test_analyze_is_bit_identical_and_records_what_select_experts_chooses(olmoe, olmoe_bank):
    inputs = [batch(olmoe, seed=11), batch(olmoe, seed=12, rows=2)]
    selector = BHSelector(olmoe_bank, alpha=0.1, min_k=1, max_k=12)
    with torch.no_grad():
        native = [olmoe(**x).logits for x in inputs]
        with route(olmoe, selector, mode="analyze") as rec:
            analyzed = [olmoe(**x).logits for x in inputs]
    assert all(torch.equal(a, b) for a, b in zip(native, analyzed))
    captured = capture_router_logits(olmoe, inputs, progress=False)
    per_token = rec.per_token_counts()
    assert torch.equal(per_token.token_ids, captured.token_ids)
    assert torch.equal(per_token.positions, captured.positions)
    for layer in captured:
        logits = captured[layer]
        expected = select_experts(logits, olmoe_bank.pvalues(logits, layer), method="bh", alpha=0.1, min_k=1,
                                  max_k=12, weights="renorm").counts
        assert torch.equal(per_token.counts[layer], expected)
        assert rec.summary()["per_layer"][layer]["tokens"] == captured.num_tokens


# ----------------------------------------------------------------------------------------------
# Restoration
# ----------------------------------------------------------------------------------------------


@pytest.mark.fault("route: selector output", "recovered")
@pytest.mark.parametrize("mode", ["patch", "analyze"])
def test_restored_after_normal_exit_and_after_exception(olmoe, mode):
    inputs = batch(olmoe, seed=21)
    before = snapshot(olmoe)
    with torch.no_grad():
        reference = olmoe(**inputs).logits
        with route(olmoe, TopKSelector(1), mode=mode):
            assert all(isinstance(vars(b.module).get("forward"), type(olmoe.forward)) for b in find_moe_blocks(olmoe))
            olmoe(**inputs)
        assert_restored(olmoe, before)
        assert torch.equal(olmoe(**inputs).logits, reference)

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            with route(olmoe, TopKSelector(1), mode=mode):
                olmoe(**inputs)
                raise Boom
        assert_restored(olmoe, before)
        assert torch.equal(olmoe(**inputs).logits, reference)

        # An exception raised inside the patched forward itself (the selector fails).
        def failing(logits, layer):
            raise Boom

        with pytest.raises(Boom):
            with route(olmoe, failing, mode=mode):
                olmoe(**inputs)
        assert_restored(olmoe, before)
        assert torch.equal(olmoe(**inputs).logits, reference)


def test_existing_instance_forward_is_restored_as_the_same_object():
    model = random_model("olmoe")
    block = find_moe_blocks(model)[0].module
    calls = []

    def wrapper(hidden_states):  # a user's own instance-level wrapper
        calls.append(1)
        return type(block).forward(block, hidden_states)

    block.forward = wrapper
    before = snapshot(model)
    inputs = batch(model)
    with torch.no_grad():
        with route(model, NativeSelector.for_model(model), mode="analyze"):
            model(**inputs)
        assert calls  # analyze mode calls the previous (wrapped) forward
        assert_restored(model, before)
        assert block.forward is wrapper


@pytest.mark.fault("bad arguments", "clear error")
def test_nesting_overlapping_raises_and_disjoint_works():
    model = random_model("olmoe")
    inputs = batch(model)
    before = snapshot(model)
    with route(model, TopKSelector(1), layers=0) as outer:
        inner_forward = vars(find_moe_blocks(model)[0].module)["forward"]
        with pytest.raises(RuntimeError, match="already routed"):
            with route(model, TopKSelector(2)):
                pass
        assert vars(find_moe_blocks(model)[0].module)["forward"] is inner_forward  # outer patch intact
        with route(model, TopKSelector(3), layers=[1]) as inner, torch.no_grad():
            model(**inputs)
        assert inner.summary()["mean_k"] == 3 and outer.summary()["per_layer"][0]["mean_k"] == 1
    assert_restored(model, before)


@pytest.mark.parametrize("layers, expected", [(1, [1]), ([0], [0]), (lambda layer: layer > 0, [1]), (None, [0, 1])])
def test_layers_argument_routes_only_chosen_layers(layers, expected):
    model = random_model("olmoe")
    inputs = batch(model)
    with torch.no_grad(), route(model, TopKSelector(1), layers=layers) as rec:
        model(**inputs)
    assert sorted(rec.summary()["per_layer"]) == expected
    with pytest.raises(ValueError, match="not MoE layers"):
        with route(model, TopKSelector(1), layers=[5]):
            pass


def test_accelerate_hook_on_block_keeps_working_and_is_restored():
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    model = random_model("olmoe")
    block = find_moe_blocks(model)[0].module
    seen = []

    class Counting(accelerate_hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(1)
            return args, kwargs

    accelerate_hooks.add_hook_to_module(block, Counting())
    hooked_forward, old_forward = block.forward, block._old_forward
    before = snapshot(model)
    inputs = batch(model)
    with torch.no_grad():
        native = model(**inputs).logits
        with route(model, NativeSelector.for_model(model)):
            assert block.forward is hooked_forward  # accelerate's wrapper stays in front
            n = len(seen)
            patched = model(**inputs).logits
            assert len(seen) == n + 1  # ... and still runs
    assert_rounding_close(patched, native)
    assert_restored(model, before)
    assert block.forward is hooked_forward and block._old_forward is old_forward


def test_accelerate_disk_offload_dispatch_model(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = random_model("olmoe", num_experts=8, top_k=2, seed=4)
    inputs = batch(model)
    with torch.no_grad():
        reference = model(**inputs).logits
    captured_before = capture_router_logits(model, [inputs], progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    offloaded = find_moe_blocks(model)[1].module
    assert offloaded.gate.weight.device.type == "meta"  # weights live on disk between calls
    before = snapshot(model)
    with torch.no_grad():
        native = model(**inputs).logits
        with route(model, NativeSelector.for_model(model)) as rec:
            patched = model(**inputs).logits
    assert_rounding_close(native, reference)
    assert_rounding_close(patched, native)
    assert rec.summary()["per_layer"][1]["tokens"] == int(inputs["attention_mask"].sum())
    assert_restored(model, before)
    assert offloaded.gate.weight.device.type == "meta"
    # Capture reads the offloaded router weight through the same accelerate hook.
    captured = capture_router_logits(model, [inputs], progress=False)
    for layer in captured:
        torch.testing.assert_close(captured[layer], captured_before[layer], rtol=0, atol=1e-6)
    assert offloaded.gate.weight.device.type == "meta"


# ----------------------------------------------------------------------------------------------
# BH routing and the recorder
# ----------------------------------------------------------------------------------------------


def test_bh_varies_k_monotone_in_alpha_and_activations_add_up(olmoe, olmoe_bank):
    inputs = batch(olmoe, rows=4, length=16, seed=31)
    means = []
    with torch.no_grad():
        for alpha in (0.01, 0.05, 0.2, 0.5):
            # Analyze mode: every alpha sees the same logits, so BH counts are monotone per token.
            with route(olmoe, BHSelector(olmoe_bank, alpha=alpha, max_k=16), mode="analyze") as rec:
                olmoe(**inputs)
            means.append(rec.summary()["mean_k"])
        assert means == sorted(means)
        with route(olmoe, BHSelector(olmoe_bank, alpha=0.2, min_k=1, max_k=16)) as rec:
            out = olmoe(**inputs).logits
    assert torch.isfinite(out).all()
    s = rec.summary()
    assert s["std_k"] > 0
    counts = rec.per_token_counts()
    assert s["expert_activations"] == sum(int(c.sum()) for c in counts.counts.values())
    for layer, stats in s["per_layer"].items():
        assert sum(stats["expert_counts"]) == int(counts.counts[layer].sum()) == stats["activations"]
        assert stats["native_activations"] == NativeSelector.for_model(olmoe).k * stats["tokens"]
        assert 0.0 <= stats["floor_rate"] <= 1.0 and 0.0 <= stats["ceiling_rate"] <= 1.0
        assert 0.0 <= stats["unused_share"] <= 1.0
    assert s["tokens"] == int(inputs["attention_mask"].sum())


def test_perplexity_under_bh_with_max_k_16_one_forward_per_batch(olmoe, olmoe_bank):
    batches = [batch(olmoe, rows=2, length=16, seed=s) for s in (41, 42)]
    nll, n = 0.0, 0
    with torch.no_grad(), route(olmoe, BHSelector(olmoe_bank, alpha=0.5, min_k=1, max_k=16)) as rec:
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            out = olmoe(**b, labels=labels)
            tokens = int((labels[:, 1:] != -100).sum())
            nll += float(out.loss) * tokens
            n += tokens
    ppl = math.exp(nll / n)
    assert math.isfinite(ppl)
    s = rec.summary()
    assert s["forward_calls"] == len(batches)
    assert s["max_k"] <= 16 and s["per_layer"][0]["ceiling_rate"] >= 0.0


def test_top_p_selector_and_recorder_truncation(olmoe):
    inputs = batch(olmoe, rows=3, length=12, seed=51)
    n_tokens = int(inputs["attention_mask"].sum())
    with torch.no_grad(), route(olmoe, TopPSelector(0.5, max_k=8), max_tokens_per_layer=10) as rec:
        olmoe(**inputs)
        olmoe(**inputs)
    s = rec.summary()
    assert s["tokens"] == 2 * n_tokens  # aggregates stay exact
    assert s["truncated"] and rec.per_token_counts().truncated
    per_token = rec.per_token_counts()
    assert per_token.token_ids.numel() == 10
    assert per_token.matrix().shape == (10, len(s["per_layer"]))
    assert torch.equal(per_token.token_ids, inputs["input_ids"][inputs["attention_mask"].bool()][:10])


@pytest.mark.fault("bad arguments", "clear error")
def test_selector_reprs_and_validation(olmoe, olmoe_bank):
    assert repr(TopKSelector(4)) == "TopKSelector(k=4, weights='renorm')"
    experts = olmoe.config.num_experts
    with pytest.raises(ValueError, match=f"`k` {experts + 1} exceeds the routed model's {experts} experts"):
        with route(olmoe, TopKSelector(experts + 1)):  # it said "`max_k` must be in [1, E]" at the first forward
            pass
    assert repr(BHSelector(olmoe_bank, alpha=0.1, max_k=16)) == (
        "BHSelector(method='bh', alpha=0.1, min_k=1, max_k=16, weights='renorm')"
    )
    assert "p=0.9" in repr(TopPSelector(0.9))
    with pytest.raises(ValueError, match="method"):
        BHSelector(olmoe_bank, method="fdr")
    with pytest.raises(ValueError, match="alpha"):
        BHSelector(olmoe_bank, alpha=0.0)
    with pytest.raises(ValueError, match="min_k"):
        BHSelector(olmoe_bank, min_k=9, max_k=8)
    with pytest.raises(ValueError, match="`k`"):
        TopKSelector(0)
    with pytest.raises(ValueError, match="weights"):
        TopKSelector(2, weights="sum")
    with pytest.raises(ValueError, match="mode"):
        with route(random_model("olmoe"), TopKSelector(1), mode="dry"):
            pass


@pytest.mark.fault("route: selector output", "clear error")
def test_selector_returning_wrong_shape_is_rejected():
    model = random_model("olmoe")
    before = snapshot(model)

    def bad(logits, layer):
        sel = select_experts(logits, method="topk", k=1, max_k=1)
        return Selection(indices=sel.indices[:1], weights=sel.weights[:1], counts=sel.counts[:1])

    with pytest.raises(ValueError, match="must be \\[T, K\\]"), torch.no_grad():
        with route(model, bad):
            model(**batch(model))
    assert_restored(model, before)


def test_output_router_logits_in_patch_mode_and_router_called_only_then():
    # transformers records router_logits with a hook on the router module, which the patched
    # block calls only when those outputs are requested.
    model = random_model("qwen2_moe")
    inputs = batch(model)
    gate = find_moe_blocks(model)[0].module.gate
    calls = []
    handle = gate.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            native = model(**inputs, output_router_logits=True)
            with route(model, NativeSelector.for_model(model)):
                n = len(calls)
                model(**inputs)
                assert len(calls) == n  # not requested: the router module is not run
                patched = model(**inputs, output_router_logits=True)
                assert len(calls) == n + 1
    finally:
        handle.remove()
    assert len(patched.router_logits) == len(native.router_logits)
    torch.testing.assert_close(patched.aux_loss, native.aux_loss)
    assert_rounding_close(patched.logits, native.logits)


def test_bfloat16_patched_forward_keeps_dtype_and_is_finite():
    model = random_model("olmoe").to(torch.bfloat16)
    inputs = batch(model)
    with torch.no_grad(), route(model, BHSelector(EmpiricalBank({0: torch.randn(64, 8), 1: torch.randn(64, 8)}),
                                                  alpha=0.2, max_k=4)) as rec:
        out = model(**inputs).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rec.summary()["tokens"] == int(inputs["attention_mask"].sum())


@pytest.mark.fault("mismatched null banks", "clear error")
def test_route_refuses_a_bank_of_another_model():
    """A 16-layer bank on the 6-layer tiny model routed silently with mean k 1.0 before; a bank of
    32 experts failed only at forward time."""
    from bh_helpers.models.loading import load_model
    from bh_helpers.nulls.fit import fit_null_bank
    from bh_helpers import BHSelector, route

    model, _ = load_model("tiny", device="cpu", dtype=torch.float32)
    n_layers, n_experts = model.config.num_hidden_layers, model.config.num_experts
    g = torch.Generator().manual_seed(0)
    other_depth = fit_null_bank({layer: torch.randn(300, n_experts, generator=g) for layer in range(16)})
    other_width = fit_null_bank({layer: torch.randn(300, 32, generator=g) for layer in range(n_layers)})
    forward_before = model.model.layers[0].mlp.forward
    for bank, match in ((other_depth, f"16 layers.*routed model has {n_layers}"),
                        (other_width, f"32 experts per layer.*routed model has {n_experts}")):
        with pytest.raises(ValueError, match=match):
            with route(model, BHSelector(bank, alpha=0.5)):
                raise AssertionError("route must refuse before the block runs")
    assert model.model.layers[0].mlp.forward == forward_before  # nothing was installed


@pytest.mark.fault("mismatched null banks", "clear error")
def test_route_refuses_a_bank_missing_routed_layers():
    """A bank without layer 5 failed mid-forward with a KeyError (a traceback from the CLI)."""
    from bh_helpers.models.families import router_fingerprint
    from bh_helpers.models.loading import load_model
    from bh_helpers.nulls.fit import fit_null_bank

    model, tok = load_model("tiny", device="cpu", dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({layer: torch.randn(300, 64, generator=g) for layer in range(n_layers - 1)},
                         num_layers=n_layers, router_fingerprint=router_fingerprint(model))
    with pytest.raises(ValueError, match=rf"no null for MoE layers \[{n_layers - 1}\].*bh-routing fit"):
        with route(model, BHSelector(bank, alpha=0.5)):
            pass
    ids = tok("the layers the bank has are routed", return_tensors="pt").input_ids
    with torch.no_grad(), route(model, BHSelector(bank, alpha=0.5), layers=list(range(n_layers - 1))) as rec:
        model(ids)
    assert sorted(rec.summary()["per_layer"]) == list(range(n_layers - 1))


# ----------------------------------------------------------------------------------------------
# Non-finite logits and bad selector output: validate=True names the layer and the token
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,row_fill,match", [
    (float("inf"), None, r"\+inf at token 0, expert 3"),
    (float("nan"), None, r"NaN at token 0, expert 3"),
    (None, float("-inf"), r"-inf for every expert at token 0"),
])
@pytest.mark.fault("route: non-finite router logits", "clear error")
def test_validate_names_layer_and_token_of_non_finite_logits(value, row_fill, match):
    """+inf logits passed even validate=True (NaN weights); a row of -inf too."""
    from bh_helpers.selection.reference import select_experts

    x = torch.randn(4, 16)
    if value is not None:
        x[0, 3] = value
    else:
        x[0] = row_fill
    with pytest.raises(ValueError, match=match):
        select_experts(x, method="topk", k=2, max_k=2, validate=True)
    masked = torch.randn(4, 16)
    masked[0, 0] = -float("inf")  # one expert masked out is fine
    assert select_experts(masked, method="topk", k=2, max_k=2, validate=True).counts.tolist() == [2, 2, 2, 2]


class _BadSelector:
    """A selector that returns a chosen defect at layer 1."""

    validate = True

    def __init__(self, defect: str) -> None:
        self.defect, self.max_k = defect, 2

    def __call__(self, logits, layer):
        from bh_helpers.selection.reference import Selection

        sel = TopKSelector(2, weights="softmax")(logits, layer)
        idx, w, counts = sel.indices.clone(), sel.weights.clone(), sel.counts.clone()
        if layer == 1:
            if self.defect == "nan weight":
                w[2, 0] = float("nan")
            elif self.defect == "counts":
                counts[2] = 0
            elif self.defect == "duplicate":
                idx[2, 1] = idx[2, 0]
            elif self.defect == "out of range":
                idx[2, 1] = 10_000
        return Selection(indices=idx, weights=w, counts=counts)


@pytest.mark.parametrize("defect,match", [
    ("nan weight", "non-finite or negative weights at layer 1, token 2"),
    ("counts", "counts disagree with its indices at layer 1, token 2"),
    ("duplicate", "one expert twice at layer 1, token 2"),
    ("out of range", r"expert id outside \[-1, num_experts\) at layer 1, token 2"),
])
@pytest.mark.fault("route: selector output", "clear error")
def test_validate_checks_selector_output_in_route(tiny_model_and_tokenizer, defect, match):
    """A NaN weight made all-NaN outputs; counts that disagree with indices were recorded as mean k 8."""
    model, tok = tiny_model_and_tokenizer
    ids = tok("a few tokens to route through every layer", return_tensors="pt").input_ids
    assert ids.shape[1] > 3
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        with route(model, _BadSelector(defect)):
            model(ids)


@pytest.mark.fault("mismatched null banks", "clear error")
def test_bank_of_another_checkpoint_is_refused_by_its_router_fingerprint(tmp_path, tiny_model_and_tokenizer):
    """Same shape, other weights: routed silently before. The fingerprint travels capture -> fit ->
    save -> load, survives a dtype cast, and only allow_other_model=True overrides it."""
    import copy

    from bh_helpers.models.families import fingerprints_differ, router_fingerprint
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.nulls.fit import fit_captured
    from bh_helpers.capture import capture_calibration

    model, tok = tiny_model_and_tokenizer
    capture_calibration(model, tok, max_tokens=256, window=64, out_path=tmp_path / "c.safetensors", progress=False)
    fit_captured(tmp_path / "c.safetensors", grid_size=256, out_dir=tmp_path / "bank")
    bank = NullBank.load(tmp_path / "bank")
    assert bank.metadata.router_fingerprint == router_fingerprint(model)
    assert fingerprints_differ(router_fingerprint(model), router_fingerprint(copy.deepcopy(model).half())) == []
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.model.layers:
            layer.mlp.gate.weight.copy_(layer.mlp.gate.weight.flip(0))  # the same numbers, experts reordered
    ids = tok("routing with a bank of another model", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=r"fitted on another model.*allow_other_model=True"):
        with route(other, BHSelector(bank, alpha=0.5)):
            pass
    with torch.no_grad(), route(other, BHSelector(bank, alpha=0.5), allow_other_model=True):
        other(ids)
    with torch.no_grad(), route(model, BHSelector(bank, alpha=0.5)):
        model(ids)


@pytest.mark.fault("mismatched null banks", "clear error")
def test_a_bank_without_a_fingerprint_is_routed_with_a_warning(tiny_model_and_tokenizer):
    """A bank fitted from a plain dict of logits cannot be checked against the model: it routed any
    model without a word (issue 25 re-run). A capture carries its model's fingerprint into the bank."""
    import warnings

    from bh_helpers.capture import capture_router_logits
    from bh_helpers.models.families import router_fingerprint
    from bh_helpers.nulls.fit import fit_null_bank

    model, tok = tiny_model_and_tokenizer
    ids = tok("a bank of unknown origin routes this text", return_tensors="pt").input_ids
    captured = capture_router_logits(model, [{"input_ids": ids}], progress=False)
    assert captured.router_fingerprint == router_fingerprint(model)
    plain = fit_null_bank(dict(captured.logits), grid_size=256)
    assert plain.metadata.router_fingerprint is None
    with pytest.warns(UserWarning, match="records no router fingerprint, so it cannot be checked against the "
                                         "routed model.*allow_other_model=True"):
        with torch.no_grad(), route(model, BHSelector(plain, alpha=0.5)):
            model(ids)
    with warnings.catch_warnings():  # a bank from the capture, or an explicit opt-out: no warning
        warnings.simplefilter("error")
        with torch.no_grad(), route(model, BHSelector(fit_null_bank(captured, grid_size=256), alpha=0.5)):
            model(ids)
        with torch.no_grad(), route(model, BHSelector(plain, alpha=0.5), allow_other_model=True):
            model(ids)
    with pytest.raises(ValueError, match="`allow_other_model` must be True or False; got 'no'"):
        with route(model, BHSelector(plain, alpha=0.5), allow_other_model="no"):  # 'no' is truthy
            pass


# Not yet in the committed fault battery (run python scripts/reliability.py to add it with the fault marker).
def test_a_bank_of_the_model_before_its_config_was_edited_is_refused(tmp_path, tiny_model_and_tokenizer):
    """config.json edited from 8 to 4 experts per token after the bank and capture were made: same router weights,
    other router inputs in every later layer (captured logits moved by up to 5.7); both were used without a word
    (issue 25 re-run). The fingerprint records the routing settings; older fingerprints (weights only) still
    compare on the weights."""
    import copy

    from bh_helpers.capture import capture_router_logits, check_capture_model
    from bh_helpers.models.families import fingerprints_differ, router_fingerprint
    from bh_helpers.nulls.fit import fit_null_bank

    model, tok = tiny_model_and_tokenizer
    ids = tok("the bank of the model as it was", return_tensors="pt").input_ids
    captured = capture_router_logits(model, [{"input_ids": ids}], progress=False)
    bank = fit_null_bank(captured, grid_size=256)
    edited = copy.deepcopy(model)
    edited.config.num_experts_per_tok = 4
    assert fingerprints_differ(router_fingerprint(model), router_fingerprint(edited)) == list(range(6))
    with pytest.raises(ValueError, match=r"fitted on another model .*routers \(weights or routing settings\) differ"):
        with route(edited, BHSelector(bank, alpha=0.5)):
            pass
    path = captured.save(tmp_path / "c.safetensors")
    from bh_helpers.capture import CapturedLogits

    with pytest.raises(ValueError, match="holds router logits of another model"):
        check_capture_model(CapturedLogits.load(path)[1], edited, path)
    weights_only = {layer: fp[:10] for layer, fp in router_fingerprint(model).items()}  # an older bank's
    assert fingerprints_differ(weights_only, router_fingerprint(edited)) == []


def test_load_balance_statistics_equal_a_bincount_of_what_was_chosen(tiny_model_and_tokenizer):
    """utilisation_cv and unused_share (the report's load balance) against numpy on the selections
    the selector itself returned (issue 16, item 6)."""
    import numpy as np

    model, tok = tiny_model_and_tokenizer
    chosen: dict[int, list] = {}
    inner = TopPSelector(0.5, max_k=8, weights="softmax")

    def recording(logits, layer):
        sel = inner(logits, layer)
        chosen.setdefault(layer, []).append(sel.indices.reshape(-1))
        return sel

    recording.max_k = 8
    ids = tok("the load of each expert, counted twice: by the recorder and by hand", return_tensors="pt").input_ids
    with torch.no_grad(), route(model, recording) as rec:
        model(ids)
    per_layer = rec.summary()["per_layer"]
    for layer, parts in chosen.items():
        idx = torch.cat(parts).numpy()
        counts = np.bincount(idx[idx >= 0], minlength=model.config.num_experts).astype(float)
        assert per_layer[layer]["expert_counts"] == counts.astype(int).tolist()
        assert per_layer[layer]["utilisation_cv"] == pytest.approx(counts.std() / counts.mean(), rel=1e-12)
        assert per_layer[layer]["unused_share"] == pytest.approx(float((counts == 0).mean()), rel=1e-12)


def test_route_asks_the_selector_to_check_the_model_before_installing_anything():
    """route passes the routed layers, expert count, layer count and a fingerprint callable to
    Selector.check; a refusal reaches the caller with nothing installed (issue 24, item 1)."""
    from bh_helpers.selection.selectors import RoutedModel

    model = random_model("olmoe")
    before = snapshot(model)
    seen = []

    class Refusing:
        max_k = 1

        def __call__(self, logits, layer):
            return TopKSelector(1)(logits, layer)

        def check(self, target):
            seen.append(target)
            raise ValueError("refused by the selector")

    with pytest.raises(ValueError, match="refused by the selector"):
        with route(model, Refusing(), layers=[1], allow_other_model=True):
            raise AssertionError("route must refuse before the block runs")
    assert_restored(model, before)
    (target,) = seen
    assert isinstance(target, RoutedModel) and target.layers == (1,) and target.allow_other_model
    assert (target.num_experts, target.num_hidden_layers) == (model.config.num_experts, model.config.num_hidden_layers)
    assert sorted(target.router_fingerprint([0, 1])) == [0, 1]
    # built-in selectors without a bank accept any model; a plain function has no check at all
    assert TopKSelector(1).check(target) is None
    with torch.no_grad(), route(model, lambda logits, layer: TopKSelector(1)(logits, layer)):
        model(**batch(model))


def test_routing_floor_never_imports_the_nulls_floor():
    """The selector checks its own null bank (Selector.check): routing/ is selector-agnostic."""
    import bh_helpers.routing as routing

    for path in Path(routing.__file__).parent.glob("*.py"):
        assert "bh_helpers.nulls" not in path.read_text(), path.name
