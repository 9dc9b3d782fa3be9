"""Tests for bh_helpers.evaluation against slow, independent reference computations.

The model is a tiny random ``OlmoeForCausalLM`` with a byte-level BPE tokenizer built here;
the embedded trained model (``bh_helpers.models.loading.load_model("tiny")``) is used in addition when
its weights are in the package.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bh_helpers.evaluation import scoring as ev
from bh_helpers.evaluation import speed, tasks

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TINY_DIR = Path(__file__).resolve().parents[1] / "bh_helpers" / "data" / "tiny_olmoe"
EMBEDDED = TINY_DIR / "model.safetensors"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few experts.",
    "Benjamini and Hochberg control the false discovery rate.",
    "def add(x, y):\n    return x + y\n",
    "She opened the door and saw the garden full of roses.",
    "Numbers like 12, 345 and 6789 appear in text too.",
]

TEXTS = [
    "The lazy dog sleeps while the quick fox runs around the garden. " * 3,
    "Experts and tokens: every token picks a few experts, the router decides.",
    "def mul(a, b):\n    return a * b\n" * 2,
    "Short one.",
]


def _tokenizer():
    """The embedded model's tokenizer when present, else a byte-level BPE trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (TINY_DIR / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(TINY_DIR)
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 3, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def _random_model_and_tokenizer():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = OlmoeConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = OlmoeForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init, so predictions are not near-ties
        model.lm_head.weight.mul_(20.0)
    return model, tok


def _embedded_model_and_tokenizer():
    models = pytest.importorskip("bh_helpers.models.loading")
    return models.load_model("tiny", device="cpu")


MODEL_KINDS = ["random"] + (["embedded"] if EMBEDDED.exists() else [])


@pytest.fixture(scope="module", params=MODEL_KINDS)
def model_tok(request):
    if request.param == "random":
        return _random_model_and_tokenizer()
    return _embedded_model_and_tokenizer()


@pytest.fixture(scope="module")
def random_model_tok():
    return _random_model_and_tokenizer()


# ---------------------------------------------------------------------------------------------
# Slow references
# ---------------------------------------------------------------------------------------------


def _reference_perplexity(model, tok, texts, window, stride):
    """Hugging Face's documented loop, one window at a time, NLL in float64."""
    ids = []
    for t in texts:
        enc = tok(t, add_special_tokens=False).input_ids
        if enc:
            ids += ([tok.eos_token_id] if ids else []) + enc
    seq = torch.tensor([ids])
    nll_sum, n_tok, correct = 0.0, 0, 0
    prev_end = 0
    with torch.no_grad():
        for begin in range(0, seq.size(1), stride):
            end = min(begin + window, seq.size(1))
            trg_len = end - prev_end
            inp = seq[:, begin:end]
            labels = inp.clone()
            labels[:, :-trg_len] = -100
            logits = model(inp).logits.double()
            shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
            nll_sum += float(F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum"))
            keep = shift_labels != -100
            n_tok += int(keep.sum())
            correct += int((shift_logits.argmax(-1)[keep] == shift_labels[keep]).sum())
            prev_end = end
            if end == seq.size(1):
                break
    return nll_sum / n_tok, n_tok, correct


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window,stride", [(32, 32), (32, 8), (32, 31), (16, 5), (64, 64)])
def test_perplexity_matches_bruteforce(model_tok, window, stride):
    model, tok = model_tok
    nll, n, _ = _reference_perplexity(model, tok, TEXTS, window, stride)
    res = ev.perplexity(model, tok, TEXTS, window=window, stride=stride, batch_size=3, progress=False)
    assert res.n_tokens == n
    assert res.nll == pytest.approx(nll, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert res.protocol["window"] == window and res.protocol["stride"] == stride
    assert res.protocol["weighting"] == "token"
    assert f"window={window}" in res.protocol_str()


def test_perplexity_scores_each_token_once(random_model_tok):
    model, tok = random_model_tok
    n_stream = sum(len(tok(t, add_special_tokens=False).input_ids) for t in TEXTS) + len(TEXTS) - 1
    overlapping = ev.perplexity(model, tok, TEXTS, window=32, stride=8, progress=False)
    assert overlapping.n_tokens == n_stream - 1  # every token but the first
    disjoint = ev.perplexity(model, tok, TEXTS, window=32, stride=32, progress=False)
    assert disjoint.n_tokens == n_stream - disjoint.protocol["n_windows"]  # window starts unscored


def test_padding_excluded(random_model_tok):
    """A batch mixing a full and a short (padded) last window equals batch_size=1."""
    model, tok = random_model_tok
    one = ev.perplexity(model, tok, TEXTS, window=40, stride=40, batch_size=1, progress=False)
    many = ev.perplexity(model, tok, TEXTS, window=40, stride=40, batch_size=64, progress=False)
    assert one.protocol["n_windows"] > 1
    assert many.n_tokens == one.n_tokens
    assert many.nll == pytest.approx(one.nll, rel=1e-6)


def test_single_string_and_defaults(random_model_tok):
    model, tok = random_model_tok
    res = ev.perplexity(model, tok, TEXTS[0], progress=False)
    assert res.protocol["window"] == model.config.max_position_embeddings
    assert res.protocol["stride"] == res.protocol["window"] // 2
    assert math.isfinite(res.perplexity) and res.perplexity > 1


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("texts", [[], [""], "", ["", ""]])
def test_empty_text_raises(random_model_tok, texts):
    model, tok = random_model_tok
    with pytest.raises(ValueError, match="empty"):
        ev.perplexity(model, tok, texts, progress=False)


@pytest.mark.fault("bad arguments", "clear error")
def test_window_larger_than_context_raises(random_model_tok):
    model, tok = random_model_tok
    with pytest.raises(ValueError, match=r"`window` 256 is longer than the model.s context of 128 tokens"):
        ev.perplexity(model, tok, TEXTS, window=256, progress=False)


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("stride", [0, -3, 33])
def test_invalid_stride_raises(random_model_tok, stride):
    model, tok = random_model_tok
    with pytest.raises(ValueError, match="`stride`"):
        ev.perplexity(model, tok, TEXTS, window=32, stride=stride, progress=False)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

MC = [
    {"context": "The fox", "endings": ["jumps over the dog.", "is a number.", "returns x + y", "sleeps"], "label": 0},
    {"context": "def add(x, y):", "endings": ["return x + y", "the garden", "roses.", "Hochberg"], "label": 0},
    {"context": "She opened the door and", "endings": ["saw the garden.", "12", "def", "control the rate"], "label": 0},
    {"context": "", "endings": ["A mixture of experts", "of"], "label": 1},
]


def test_multiple_choice_matches_bruteforce(model_tok):
    model, tok = model_tok
    res = tasks.multiple_choice_accuracy(model, tok, MC, batch_size=5, progress=False)
    hits = {"acc": 0, "acc_norm": 0, "acc_per_token": 0}
    for ex, ll_row in zip(MC, res.loglik):
        ref_ll, ref_tok = [], []
        for ending in ex["endings"]:
            c = tok(ex["context"], add_special_tokens=False).input_ids or [tok.eos_token_id]
            t = tok(" " + ending, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([c + t])).logits[0].double()
            lp = torch.log_softmax(logits[len(c) - 1 : -1], -1).gather(-1, torch.tensor(t)[:, None]).sum()
            ref_ll.append(float(lp))
            ref_tok.append(len(t))
        assert ll_row == pytest.approx(ref_ll, rel=1e-6)
        norm = [a / len(e) for a, e in zip(ref_ll, ex["endings"])]
        per_tok = [a / n for a, n in zip(ref_ll, ref_tok)]
        hits["acc"] += int(max(range(len(ref_ll)), key=ref_ll.__getitem__) == ex["label"])
        hits["acc_norm"] += int(max(range(len(norm)), key=norm.__getitem__) == ex["label"])
        hits["acc_per_token"] += int(max(range(len(per_tok)), key=per_tok.__getitem__) == ex["label"])
    assert res.acc == hits["acc"] / len(MC)
    assert res.acc_norm == hits["acc_norm"] / len(MC)
    assert res.acc_per_token == hits["acc_per_token"] / len(MC)


@pytest.mark.fault("bad arguments", "clear error")
def test_multiple_choice_bad_examples(random_model_tok):
    model, tok = random_model_tok
    with pytest.raises(ValueError, match="endings"):
        tasks.multiple_choice_accuracy(model, tok, [{"context": "x", "endings": ["a"], "label": 0}], progress=False)
    with pytest.raises(ValueError, match="label"):
        tasks.multiple_choice_accuracy(model, tok, [{"context": "x", "endings": ["a", "b"]}], progress=False)
    with pytest.raises(ValueError, match="empty"):
        tasks.multiple_choice_accuracy(model, tok, [], progress=False)


# ---------------------------------------------------------------------------------------------
# Speed and compute
# ---------------------------------------------------------------------------------------------


def test_measure_speed(random_model_tok):
    model, tok = random_model_tok
    res = speed.measure_speed(model, tok, TEXTS, max_new_tokens=4, prompt_tokens=16, batch_size=2, progress=False)
    assert res.n_new_tokens == len(TEXTS) * 4
    assert 0 < res.n_prompt_tokens <= len(TEXTS) * 16
    assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0
    assert res.device == "cpu"
    with pytest.raises(ValueError, match="context length"):
        speed.measure_speed(model, tok, TEXTS, max_new_tokens=100, prompt_tokens=100, progress=False)


def test_compute_summary():
    out = speed.compute_summary({"mean_k": 3.0, "expert_activations": 300, "activation_ratio": 0.375}, native_k=8)
    assert out == {
        "mean_experts_per_token": 3.0, "relative_compute": 0.375, "native_k": 8,
        "total_expert_activations": 300, "activation_ratio": 0.375,
    }
    # the recorder's own keys only: a synonym is not guessed
    with pytest.raises(ValueError, match="no 'mean_k'"):
        speed.compute_summary({"mean_experts_per_token": 3.0}, native_k=8)
    with pytest.raises(ValueError, match="native_k"):
        speed.compute_summary({"mean_k": 1}, native_k=0)


def test_under_route_native_and_topk(random_model_tok):
    """Evaluation composes with the patcher: native routing changes nothing, top-1 halves compute."""
    patching = pytest.importorskip("bh_helpers")
    model, tok = random_model_tok
    plain = ev.perplexity(model, tok, TEXTS, window=40, stride=20, batch_size=4, progress=False)
    with patching.route(model, patching.NativeSelector.for_model(model)) as rec:
        native = ev.perplexity(model, tok, TEXTS, window=40, stride=20, batch_size=4, progress=False)
    assert native.nll == pytest.approx(plain.nll, rel=1e-6)
    assert speed.compute_summary(rec.summary(), native_k=2)["relative_compute"] == pytest.approx(1.0)
    with patching.route(model, patching.TopKSelector(k=1)) as rec:
        top1 = ev.perplexity(model, tok, TEXTS, window=40, stride=20, batch_size=4, progress=False)
    summary = speed.compute_summary(rec.summary(), native_k=2)
    assert summary["relative_compute"] == pytest.approx(0.5)
    assert summary["mean_experts_per_token"] == pytest.approx(1.0)
    assert top1.nll != pytest.approx(plain.nll, rel=1e-6)
    n_forwarded = sum(e - b for b, e, _ in ev._windows(top1.n_tokens + 1, 40, 20))
    assert rec.summary()["tokens"] == n_forwarded  # padding of the last window is not routed


def test_batching_does_not_change_continuation_scores(random_model_tok):
    model, tok = random_model_tok
    one = tasks.multiple_choice_accuracy(model, tok, MC, batch_size=1, progress=False)
    many = tasks.multiple_choice_accuracy(model, tok, MC, batch_size=16, progress=False)
    for a, b in zip(one.loglik, many.loglik):
        assert a == pytest.approx(b, rel=1e-6)


def test_on_embedded_fixtures(model_tok):
    """The fixtures' normalised formats feed the evaluation functions directly."""
    datasets = pytest.importorskip("bh_helpers.models.datasets")
    try:
        wiki = datasets.embedded_fixture("wikitext2")[:2]
        lambada = datasets.embedded_fixture("lambada")[:6]
        hellaswag = datasets.embedded_fixture("hellaswag")[:3]
    except FileNotFoundError:
        pytest.skip("fixtures not built")
    model, tok = model_tok
    window = min(128, model.config.max_position_embeddings)
    ppl = ev.perplexity(model, tok, wiki, window=window, stride=window // 2, progress=False)
    assert ppl.n_tokens > window and math.isfinite(ppl.perplexity)
    assert len(lambada) == 6 and all(len(ex["text"].split()) >= 2 for ex in lambada)
    mc = tasks.multiple_choice_accuracy(model, tok, hellaswag, progress=False)
    assert mc.n_examples == 3 and len(mc.loglik[0]) == 4
