"""The host-sync-free recorder and the cached float32 router weight of ``route`` (CPU)."""

from __future__ import annotations

import pytest
import torch

import bh_helpers.routing.graphs as block_graphs
import bh_helpers.routing.recorder as recorder
import bh_helpers.routing.patch as patching
from bh_helpers.models.families import find_moe_blocks, router_logits
from bh_helpers import BHSelector, TopKSelector, TopPSelector, route

from test_route import batch, random_model


@pytest.fixture(scope="module")
def model():
    return random_model("olmoe", num_experts=8, top_k=2, seed=7)


@pytest.mark.parametrize("cap", [0, 5, 27, 30, 31, 33, 59, 60, 1000])
@pytest.mark.parametrize("flush", [1, 1 << 23])
def test_per_token_counts_cap_and_flush(model, cap, flush, monkeypatch):
    monkeypatch.setattr(recorder, "_FLUSH_ELEMENTS", flush)
    inputs = batch(model, rows=3, length=12, seed=3)  # 30 valid tokens of 36 rows
    mask = inputs["attention_mask"].bool()
    n = int(mask.sum())
    with torch.no_grad(), route(model, TopPSelector(0.6, max_k=4), max_tokens_per_layer=cap) as rec:
        model(**inputs)
        model(**inputs)
    s = rec.summary()
    assert s["tokens"] == 2 * n
    assert s["truncated"] == (cap < 2 * n)
    per_token = rec.per_token_counts()
    keep = min(cap, 2 * n)
    ids = torch.cat([inputs["input_ids"][mask]] * 2)[:keep]
    assert torch.equal(per_token.token_ids, ids)
    assert per_token.truncated == s["truncated"]
    for layer, counts in per_token.counts.items():
        assert counts.numel() == keep
        if keep == 2 * n:
            assert int(counts.sum()) == s["per_layer"][layer]["activations"]


def test_gate_weight_cache_follows_in_place_updates_and_is_dropped(model):
    inputs = batch(model, rows=2, length=8, seed=5)
    block = find_moe_blocks(model)[0].module
    seen = []

    def selector(logits, layer):
        if layer == 0:
            seen.append(logits.clone())
        return TopKSelector(2)(logits, layer)

    hidden = torch.randn(16, model.config.hidden_size)
    with torch.no_grad(), route(model, selector):
        model(**inputs)
        original = block.gate.weight.detach().clone()
        block.gate.weight.mul_(2.0)  # in place: bumps the version counter
        block(hidden.reshape(2, 8, -1))
        expected = router_logits(block, hidden)
        block.gate.weight.copy_(original)
    torch.testing.assert_close(seen[-1], expected)
    # grad flows to the router weight when autograd is on (no detached cache then)
    block.gate.weight.grad = None
    with route(model, TopKSelector(2, weights="renorm")):
        model(**inputs).logits.float().sum().backward()
    assert block.gate.weight.grad is not None and torch.isfinite(block.gate.weight.grad).all()
    block.gate.weight.grad = None


# ----------------------------------------------------------------------------------------------
# The whole patched block in one CUDA graph (decode shapes)
# ----------------------------------------------------------------------------------------------


def test_graph_safe_selectors():
    from bh_helpers.selection.fused import fused_available

    cpu = torch.device("cpu")
    assert not block_graphs.graph_safe_selector(TopKSelector(2), cpu) or fused_available(cpu)
    assert not block_graphs.graph_safe_selector(TopPSelector(0.5), cpu)
    assert not block_graphs.graph_safe_selector(lambda logits, layer: None, cpu)
    assert not block_graphs.graph_safe_selector(TopKSelector(2, validate=True), cpu)

    class OptIn:
        graph_safe = True

    assert block_graphs.graph_safe_selector(OptIn(), cpu)


def test_gate_weight_cache_updates_in_place(model):
    block = find_moe_blocks(model)[0].module
    cache = patching._GateWeightCache()
    with torch.no_grad():
        w1 = cache.weight_for(block, torch.device("cpu"))
        original = block.gate.weight.detach().clone()
        block.gate.weight.mul_(3.0)
        w2 = cache.weight_for(block, torch.device("cpu"))
        assert w2 is w1  # same buffer (captured graphs keep reading it), new values
        torch.testing.assert_close(w2, block.gate.weight.float())
        block.gate.weight.copy_(original)


def test_block_graphs_not_used_on_cpu(model, monkeypatch):
    calls = []
    monkeypatch.setattr(block_graphs._BlockGraph, "__call__", lambda self, h: calls.append(1))
    with torch.no_grad(), route(model, TopKSelector(2)):
        model(**batch(model, rows=2, length=1, seed=1, pad=False))
    assert not calls


def test_grouped_dispatch_graphs_do_not_outlive_route(model):
    """The grouped dispatch's decode graphs were a module cache that outlived ``route``; now route
    drops those of its blocks on exit (and only those)."""
    import bh_helpers.routing.grouped as grouped

    blocks = find_moe_blocks(model)
    other = torch.nn.Linear(2, 2)  # stands for another model's experts bank
    for experts in [b.module.experts for b in blocks] + [other]:
        grouped._GRAPHS[experts] = {("shape",): object()}
        grouped._POOLS[experts] = {"cuda:0": object()}
    try:
        with torch.no_grad(), route(model, TopKSelector(2), layers=[blocks[0].layer]):
            assert blocks[0].module.experts in grouped._GRAPHS  # kept while the context is open
        assert blocks[0].module.experts not in grouped._GRAPHS and blocks[0].module.experts not in grouped._POOLS
        assert all(b.module.experts in grouped._GRAPHS for b in blocks[1:])  # not routed: untouched
        assert other in grouped._GRAPHS and other in grouped._POOLS
    finally:
        grouped.clear_graphs()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _count_replays(monkeypatch) -> list:
    """A list that gets one entry per CUDA-graph replay of a patched block (the replay still runs)."""
    replays: list = []
    real_call = block_graphs._BlockGraph.__call__

    def counting(self, h):
        replays.append(1)
        return real_call(self, h)

    monkeypatch.setattr(block_graphs._BlockGraph, "__call__", counting)
    return replays


@needs_cuda
@pytest.mark.parametrize("inference", [False, True])
def test_graphed_block_matches_eager_on_gpu(monkeypatch, inference):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from bh_helpers.nulls.fit import fit_null_bank

    cfg = OlmoeConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    gpu_model = OlmoeForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({0: torch.randn(4000, 16, generator=g), 1: torch.randn(4000, 16, generator=g)})
    selectors = [TopKSelector(4, weights="softmax"), BHSelector(bank, alpha=0.2, max_k=8)]
    replays = _count_replays(monkeypatch)
    prompt = torch.randint(0, 128, (3, 6), device="cuda")
    ctx = torch.inference_mode if inference else torch.no_grad
    for selector in selectors:
        results = {}
        for graphs in (False, True):
            monkeypatch.setattr(block_graphs, "GRAPH_MAX_TOKENS", 64 if graphs else 0)
            monkeypatch.setattr(block_graphs, "PREFILL_GRAPH_MAX_TOKENS", 4096 if graphs else 0)
            replays.clear()
            with ctx(), route(gpu_model, selector) as rec:
                out = gpu_model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
                steps = [gpu_model(prompt[:, :1]).logits, gpu_model(prompt[:1, :1]).logits]  # T = 3, T = 1
            assert bool(replays) == graphs
            results[graphs] = (out, steps, rec.summary(), rec.per_token_counts())
        (o0, s0, sum0, pt0), (o1, s1, sum1, pt1) = results[False], results[True]
        assert torch.equal(o0, o1)  # greedy tokens
        for a, b in zip(s0, s1):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding
        assert sum0 == sum1
        assert torch.equal(pt0.token_ids, pt1.token_ids)
        for layer in pt0.counts:
            assert torch.equal(pt0.counts[layer], pt1.counts[layer])


class _EagerGraphs:
    """Stands in for BlockGraphs on the CPU: runs the captured body (``compute``) without capture."""

    def __init__(self, shared=None):
        pass

    def clear(self):
        pass

    runs: list = []

    def run(self, module, hidden, *, layer, selector, recorder, gate_cache, compute):
        _EagerGraphs.runs.append(layer)
        device = hidden.device
        inputs = recorder.inputs_for(hidden.shape[0], device)
        valid, _ = recorder.valid_for(inputs, device)
        hist, experts, faults = recorder.buffers(layer, selector.max_k, device)
        out, counts16 = compute(module, gate_cache.weight_for(module, device), hidden, valid, hist, experts, faults)
        recorder.store_tokens(layer, inputs, counts16)
        return out


@pytest.mark.parametrize("selector", [TopKSelector(2, weights="softmax"), TopPSelector(0.5, max_k=4)])
def test_graph_body_equals_the_eager_forward(model, monkeypatch, selector):
    """The CUDA-graph forward and the eager one run ONE block body (issue 24, item 2): run eagerly
    on the CPU, the graph path's body gives the eager outputs and statistics exactly."""
    from bh_helpers.routing.dispatch import dispatch_experts

    inputs = batch(model, rows=2, length=6, seed=2)
    with torch.no_grad(), route(model, selector) as rec:
        eager = model(**inputs).logits
    monkeypatch.setattr(patching, "BlockGraphs", _EagerGraphs)
    monkeypatch.setattr(patching, "sync_free_dispatch", dispatch_experts)  # the CPU's dispatch
    _EagerGraphs.runs.clear()
    with torch.no_grad(), route(model, selector) as rec_graph:
        graphed = model(**inputs).logits
    assert sorted(set(_EagerGraphs.runs)) == [b.layer for b in find_moe_blocks(model)]  # the graph body ran
    assert torch.equal(eager, graphed)
    assert rec.summary() == rec_graph.summary()
    for layer, counts in rec.per_token_counts().counts.items():
        assert torch.equal(counts, rec_graph.per_token_counts().counts[layer])


def _poison_first_token(model, layer: int):
    """A forward pre-hook that writes NaN into the first row's hidden state before MoE ``layer``."""
    block = next(b for b in find_moe_blocks(model) if b.layer == layer).module

    def hook(module, args):
        hidden = args[0].clone()  # (B, S, H)
        hidden[0, 0, :] = float("nan")
        return (hidden,)

    return block.register_forward_pre_hook(hook)


@pytest.mark.fault("route: non-finite router logits", "clear error")
@pytest.mark.parametrize("weights", ["uniform", "softmax"])
def test_graph_body_screens_non_finite_router_logits(model, monkeypatch, weights):
    """The CUDA-graph forward's body (run eagerly on the CPU here) screens the router logits too:
    a NaN row with uniform weights (finite) is refused when route exits."""
    from bh_helpers.routing.dispatch import dispatch_experts

    monkeypatch.setattr(patching, "BlockGraphs", _EagerGraphs)
    monkeypatch.setattr(patching, "sync_free_dispatch", dispatch_experts)
    _EagerGraphs.runs.clear()
    last = find_moe_blocks(model)[-1].layer
    handle = _poison_first_token(model, last)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=rf"some tokens \(layer {last}: 1\).*non-finite router"):
            with route(model, TopKSelector(2, weights=weights)):
                model(**batch(model, rows=1, length=3, seed=1, pad=False))
    finally:
        handle.remove()
    assert last in _EagerGraphs.runs  # the graph body ran


@needs_cuda
@pytest.mark.gpu
@pytest.mark.fault("route: non-finite router logits", "clear error")
@pytest.mark.parametrize("selector", ["topk-uniform", "topk-softmax", "bh-uniform", "static-uniform"])
def test_graphed_block_screens_non_finite_router_logits_on_gpu(monkeypatch, selector):
    """Under CUDA graphs (decode shapes, fused selectors) the logit screen runs inside the captured
    graph, without a host synchronisation (one would make the capture fail and the graphs be
    turned off: no replay), and a NaN router row is refused when route exits."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from bh_helpers.nulls.fit import fit_null_bank
    from bh_helpers.selection.static import StaticLayerSelector

    cfg = OlmoeConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    gpu_model = OlmoeForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({layer: torch.randn(2000, 16, generator=g) for layer in range(2)})
    chosen = {"topk-uniform": TopKSelector(4, weights="uniform"), "topk-softmax": TopKSelector(4, weights="softmax"),
              "bh-uniform": BHSelector(bank, alpha=0.2, max_k=8, weights="uniform"),
              "static-uniform": StaticLayerSelector((4, 3), weights="uniform")}[selector]
    assert block_graphs.graph_safe_selector(chosen, torch.device("cuda"))
    replays = _count_replays(monkeypatch)
    prompt = torch.randint(0, 128, (1, 1), device="cuda")
    with torch.inference_mode(), route(gpu_model, chosen) as rec:  # clean decode steps: graphed, no fault
        gpu_model(prompt)
        gpu_model(prompt)
    assert replays and rec.invalid_tokens() == {0: 0, 1: 0}
    replays.clear()
    handle = _poison_first_token(gpu_model, 1)
    try:
        with torch.inference_mode(), pytest.raises(ValueError, match=r"some tokens \(layer 1: 2\).*non-finite"):
            with route(gpu_model, chosen):
                gpu_model(prompt)
                gpu_model(prompt)
    finally:
        handle.remove()
    assert replays  # the poisoned steps ran in the graphs, and were screened there


@needs_cuda
@pytest.mark.parametrize("path", ["bf16", "t4", "t4 graphed"])
def test_prefill_blocks_are_graphed_when_the_size_comes_back_on_gpu(monkeypatch, path):
    """An evaluation-sized prefill (above GRAPH_MAX_TOKENS) runs eagerly the first time, is captured
    the second time and replayed after (bf16 path); outputs, aggregates and per-token counts equal
    the eager route's. On the T4 path (float16, capability switch 7.5) prefill stays eager as
    shipped; "t4 graphed" lowers PREFILL_GRAPH_MIN_CAPABILITY to 7 and checks the T4 path's graphs."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from bh_helpers.nulls.fit import fit_null_bank

    if path.startswith("t4"):
        monkeypatch.setenv("BH_ROUTING_CUDA_CAPABILITY", "7.5")
    if path == "t4 graphed":
        monkeypatch.setattr(block_graphs, "PREFILL_GRAPH_MIN_CAPABILITY", 7)
    graphed_path = path != "t4"
    dtype = torch.float16 if path.startswith("t4") else torch.bfloat16
    cfg = OlmoeConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    gpu_model = OlmoeForCausalLM(cfg).to("cuda", dtype).eval()
    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({0: torch.randn(4000, 16, generator=g), 1: torch.randn(4000, 16, generator=g)})
    ids = torch.randint(0, 128, (3, 40), device="cuda")  # 120 rows per block call
    assert block_graphs.GRAPH_MAX_TOKENS < 120 <= block_graphs.PREFILL_GRAPH_MAX_TOKENS
    replays = _count_replays(monkeypatch)
    for selector in (TopKSelector(4, weights="softmax"), BHSelector(bank, alpha=0.2, max_k=8)):
        results = {}
        for graphs in (False, True):
            monkeypatch.setattr(block_graphs, "PREFILL_GRAPH_MAX_TOKENS", 4096 if graphs else 64)
            replays.clear()
            with torch.inference_mode(), route(gpu_model, selector) as rec:
                outs = []
                for _ in range(3):
                    outs.append(gpu_model(ids).logits.float())
                    if graphs and graphed_path:
                        assert len(replays) == 2 * (len(outs) - 1)  # call 1 eager, then both layers replayed
            assert bool(replays) == (graphs and graphed_path)
            results[graphs] = (outs, rec.summary(), rec.per_token_counts())
        (o0, sum0, pt0), (o1, sum1, pt1) = results[False], results[True]
        for a, b in zip(o0, o1):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # same kernels; dtype rounding at most
        assert sum0 == sum1
        for layer in pt0.counts:
            assert torch.equal(pt0.counts[layer], pt1.counts[layer])
